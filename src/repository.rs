//! The repository: pitr's objects on object storage, and the only code that talks to the store.
//!
//! A repository is a prefix in an `object_store` backend (`file://`, `s3://`, `gs://`, `az://`).
//! It starts with an identity object naming the cluster, PostgreSQL version, segment size and
//! the key it is encrypted with; every command checks it before reading or writing anything
//! else. Objects are written create-only and never overwritten, and every write and read goes
//! through the envelope codec, so no command can store plaintext or skip verification. On the
//! local filesystem object_store does not fsync, so this module does: an object is reported
//! stored only once its data and every directory on its path are durable.

use std::io::{self, Read, Write};
use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use object_store::path::Path;
use object_store::{
    BackoffConfig, ClientConfigKey, GetResultPayload, ObjectMeta, ObjectStore, ObjectStoreExt,
    PutMode, PutOptions, PutPayload, RetryConfig,
};
use serde::{Deserialize, Serialize};

use crate::config::Settings;
use crate::envelope::{self, ContentSummary, DecodeMode, EncodeOptions, EnvelopeError, Header};
use crate::keyring::{KeyId, Keyring};
use crate::wal::{PgVersion, SystemIdentifier, WalFileName, WalSegmentSize};

pub const FORMAT_VERSION: u32 = 1;
const IDENTITY_KEY: &str = "pitr.identity";
pub const WAL_PREFIX: &str = "wal";
/// Objects that exist only while a write is under way: probes and replacements being staged.
const TEMPORARY_PREFIX: &str = "tmp";
/// Objects a backup or restore keeps in flight on a remote store (see `transfers_in_flight`).
const REMOTE_TRANSFERS_IN_FLIGHT: usize = 16;

/// When a create-only write becomes durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Before the write returns (on `file://`: the object and every directory on its path).
    Immediate,
    /// At the next `Repository::sync_deferred`, which the caller must await before it
    /// acknowledges anything that refers to the object.
    Deferred,
}

/// What a repository belongs to, written once by its first use and checked by every later one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub format: String,
    pub format_version: u32,
    pub system_identifier: SystemIdentifier,
    pub pg_version: u32,
    pub wal_segment_size: u32,
    pub encryption: Option<EncryptionIdentity>,
    pub created: String,
}

/// A local copy of a repository's identity, naming the repository it came from.
#[derive(Serialize, Deserialize)]
struct IdentityCopy {
    url: String,
    identity: Identity,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EncryptionIdentity {
    pub cipher: String,
    pub key_id: String,
    /// A keyed hash that proves a keyring holds the right key without revealing it.
    pub key_check: String,
}

impl Identity {
    pub fn new(
        system_identifier: SystemIdentifier,
        pg_version: PgVersion,
        segment_size: WalSegmentSize,
        keyring: Option<&Keyring>,
    ) -> Self {
        Identity {
            format: "pitr".to_string(),
            format_version: FORMAT_VERSION,
            system_identifier,
            pg_version: pg_version.0,
            wal_segment_size: segment_size.0,
            encryption: keyring.map(|keyring| EncryptionIdentity {
                cipher: IDENTITY_CIPHER.to_string(),
                key_id: keyring.newest().id.to_string(),
                key_check: keyring.newest().check_value(),
            }),
            created: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        }
    }

    pub fn segment_size(&self) -> WalSegmentSize {
        WalSegmentSize(self.wal_segment_size)
    }

    /// Checks every field a reader relies on, so a damaged or forged identity is an error that
    /// names the field instead of a panic later (a segment size of 0 divides by zero).
    /// Returns what is wrong, phrased to follow "its identity object says".
    fn validate(&self) -> Result<(), String> {
        let size = self.wal_segment_size;
        if !size.is_power_of_two() || !(1 << 20..=1 << 30).contains(&size) {
            return Err(format!(
                "wal_segment_size {size}, which is not a power of two from 1 MiB to 1 GiB"
            ));
        }
        if !(13..=18).contains(&self.pg_version) {
            return Err(format!(
                "pg_version {}, which is not a PostgreSQL version from 13 to 18",
                self.pg_version
            ));
        }
        if self.system_identifier.0 == 0 {
            return Err("system_identifier 0, which no database system has".to_string());
        }
        if let Some(encryption) = &self.encryption {
            if encryption.cipher != IDENTITY_CIPHER {
                return Err(format!(
                    "cipher '{}', which this pitr does not know",
                    encryption.cipher
                ));
            }
            if encryption.key_id.parse::<KeyId>().is_err() {
                return Err("a key_id that is not 16 hex digits".to_string());
            }
            let check = &encryption.key_check;
            if check.len() != 16 || !check.bytes().all(|byte| byte.is_ascii_hexdigit()) {
                return Err("a key_check that is not 16 hex digits".to_string());
            }
        }
        Ok(())
    }
}

/// 16 random hex digits for a temporary object's name. A failing random source is an error,
/// never a fixed name that two processes would share.
fn random_suffix() -> Result<String, RepositoryError> {
    getrandom::u64()
        .map(|value| format!("{value:016x}"))
        .map_err(|error| {
            RepositoryError::Config(format!(
                "the operating system's random source failed ({error}); check the system"
            ))
        })
}

/// The cipher an encrypted repository's identity names: the envelope's AES-256-GCM STREAM.
const IDENTITY_CIPHER: &str = "aes-256-gcm-stream";

/// The directory a `file://` URL names, percent-decoded. A host is refused rather than
/// dropped: `file://tmp/x` is a typo for `file:///tmp/x`, and would otherwise land in `/x`.
fn local_root(url: &url::Url) -> Result<PathBuf, String> {
    if let Some(host) = url.host_str().filter(|host| !host.is_empty()) {
        return Err(format!(
            "a file:// URL names a local path, not the host '{host}'; write file:///path (three slashes)"
        ));
    }
    url.to_file_path()
        .map_err(|()| "it does not name an absolute local path; write file:///path".to_string())
}

/// The result of a create-only write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    Created,
    AlreadyExists,
}

pub struct Repository {
    store: Arc<dyn ObjectStore>,
    /// The same store without object_store's own retries, for create-only writes (see
    /// `put_create_only`). On `file://` it is `store` itself.
    create_store: Arc<dyn ObjectStore>,
    prefix: Path,
    /// The directory behind a `file://` repository, which this module must fsync itself.
    local_root: Option<PathBuf>,
    pub url: String,
    timeout: Duration,
    keyring: Option<Keyring>,
    /// The identity once checked: it never changes, so long-lived processes read it once.
    identity: std::sync::OnceLock<Identity>,
}

impl Repository {
    /// Connects to the repository named in `settings`, with its keyring. Nothing is read yet.
    pub fn open(settings: &Settings) -> Result<Self, RepositoryError> {
        let url_text = settings
            .repo_url()
            .map_err(|error| RepositoryError::Config(error.to_string()))?;
        let keyring = match &settings.key_file {
            Some(path) => Some(
                Keyring::load(path).map_err(|error| RepositoryError::Config(error.to_string()))?,
            ),
            None => None,
        };
        let bad_url = |reason: String| {
            RepositoryError::Config(format!(
                "repository URL '{url_text}' is not valid: {reason}; use file:///path, s3://bucket/prefix, gs://bucket/prefix or az://container/prefix"
            ))
        };
        let url = url::Url::parse(url_text).map_err(|error| bad_url(error.to_string()))?;
        let prefix = Path::from(url.path().trim_start_matches('/'));
        let retrying = retry_config(settings.store_timeout);
        let once = RetryConfig {
            max_retries: 0,
            ..retry_config(settings.store_timeout)
        };
        let built = |result: Result<Arc<dyn ObjectStore>, RemoteBuildError>| {
            result.map_err(|error| match error {
                RemoteBuildError::Store(error) => bad_url(error.to_string()),
                RemoteBuildError::NoCredentials(detail) => RepositoryError::Config(format!(
                    "no credentials for repository {url_text}: {detail}"
                )),
            })
        };
        let remote = |build: RemoteBuilder| -> Result<[Arc<dyn ObjectStore>; 2], RepositoryError> {
            let store = built(build(url_text, settings, retrying.clone()))?;
            let create_store = built(build(url_text, settings, once.clone()))?;
            Ok([store, create_store])
        };
        let ([store, create_store], prefix, local_root) = match url.scheme() {
            "file" => {
                let root = local_root(&url).map_err(|reason| {
                    RepositoryError::Config(format!(
                        "repository URL '{url_text}' is not valid: {reason}"
                    ))
                })?;
                create_local_root(&root).map_err(|error| {
                    RepositoryError::Config(format!(
                        "cannot create the repository directory {}: {error}",
                        root.display()
                    ))
                })?;
                let local = |fsync: bool| -> Result<Arc<dyn ObjectStore>, RepositoryError> {
                    Ok(Arc::new(
                        object_store::local::LocalFileSystem::new_with_prefix(&root)
                            .map_err(|error| bad_url(error.to_string()))?
                            .with_automatic_cleanup(true)
                            .with_fsync(fsync),
                    ))
                };
                // Create-only writes fsync the staged file before linking it under its name,
                // so no object is ever visible there before it is durable (a crash once left
                // empty objects that blocked every re-push). Reads and deferred writes, which
                // one syncfs makes durable, skip the per-object fsyncs.
                ([local(false)?, local(true)?], Path::default(), Some(root))
            }
            "s3" | "s3a" => (remote(build_s3)?, prefix, None),
            "gs" => (remote(build_gcs)?, prefix, None),
            "az" | "azure" | "abfs" | "abfss" => (remote(build_azure)?, prefix, None),
            other => return Err(bad_url(format!("the scheme '{other}' is not supported"))),
        };
        Ok(Repository {
            store,
            create_store,
            prefix,
            local_root,
            url: url_text.to_string(),
            timeout: settings.store_timeout,
            keyring,
            identity: std::sync::OnceLock::new(),
        })
    }

    /// Checks that the store answers, bypassing the cached identity.
    pub async fn probe(&self) -> Result<(), RepositoryError> {
        self.get_bytes(IDENTITY_KEY).await.map(|_| ())
    }

    pub fn keyring(&self) -> Option<&Keyring> {
        self.keyring.as_ref()
    }

    pub fn is_encrypted(&self) -> bool {
        self.keyring.is_some()
    }

    fn location(&self, key: &str) -> Path {
        Path::from(format!("{}/{key}", self.prefix).trim_start_matches('/'))
    }

    /// Runs one store operation under the configured deadline, so a stalled store fails the
    /// command in bounded time instead of hanging it.
    async fn bounded<T>(
        &self,
        what: &str,
        operation: impl std::future::Future<Output = object_store::Result<T>>,
    ) -> Result<T, RepositoryError> {
        match tokio::time::timeout(self.timeout, operation).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(error)) => Err(RepositoryError::from_store(&self.url, what, error)),
            Err(_) => Err(RepositoryError::Unreachable {
                url: self.url.clone(),
                detail: format!("{what} did not finish within {} s", self.timeout.as_secs()),
            }),
        }
    }

    /// The repository's identity, or `None` if nothing was ever written here.
    pub async fn read_identity(&self) -> Result<Option<Identity>, RepositoryError> {
        if let Some(identity) = self.identity.get() {
            return Ok(Some(identity.clone()));
        }
        let Some(bytes) = self.get_bytes(IDENTITY_KEY).await? else {
            return Ok(None);
        };
        let identity: Identity =
            serde_json::from_slice(&bytes).map_err(|error| RepositoryError::Corrupt {
                url: self.url.clone(),
                detail: format!(
                    "its identity object is not valid: {error}; restore {IDENTITY_KEY} from a copy, or use a new repository"
                ),
            })?;
        self.adopt_identity(identity.clone())?;
        Ok(Some(identity))
    }

    /// Takes an identity as this repository's after the checks a read from the store gets: a
    /// format this pitr reads and the right keyring. Short-lived hooks use it for the copy a
    /// previous hook read (see `prefetch`), which saves a round trip to a remote store.
    pub fn adopt_identity(&self, identity: Identity) -> Result<(), RepositoryError> {
        if identity.format != "pitr" || identity.format_version != FORMAT_VERSION {
            return Err(RepositoryError::Corrupt {
                url: self.url.clone(),
                detail: format!(
                    "its identity says format {} version {}, which this pitr does not read; upgrade pitr",
                    identity.format, identity.format_version
                ),
            });
        }
        identity
            .validate()
            .map_err(|problem| RepositoryError::Corrupt {
                url: self.url.clone(),
                detail: format!(
                    "its identity object says {problem}; restore {IDENTITY_KEY} from a copy, or use a new repository"
                ),
            })?;
        self.check_keyring(&identity)?;
        let _ = self.identity.set(identity);
        Ok(())
    }

    /// Keeps a local copy at `path` of the identity this process has read, for later processes
    /// to adopt (`adopt_identity_copy`). Written to a temporary name and renamed, so a reader
    /// sees all of it or nothing, and only when it differs from what is there. Not fsynced:
    /// losing the copy only means the next process asks the store. False if nothing is known
    /// yet or the write failed.
    pub fn keep_identity_copy(&self, path: &FsPath) -> bool {
        let Some(identity) = self.known_identity() else {
            return false;
        };
        let copy = IdentityCopy {
            url: self.url.clone(),
            identity: identity.clone(),
        };
        let bytes = serde_json::to_vec(&copy).expect("an identity always serializes");
        if std::fs::read(path).is_ok_and(|existing| existing == bytes) {
            return true;
        }
        let file_name = path.file_name().unwrap_or_default().to_string_lossy();
        let temporary = path.with_file_name(format!(".{file_name}.{}", std::process::id()));
        let written = std::fs::create_dir_all(path.parent().unwrap_or(FsPath::new(".")))
            .and_then(|()| std::fs::write(&temporary, &bytes))
            .and_then(|()| std::fs::rename(&temporary, path));
        if written.is_err() {
            let _ = std::fs::remove_file(&temporary);
        }
        written.is_ok()
    }

    /// Adopts the copy `keep_identity_copy` left at `path`, with the checks of `adopt_identity`
    /// (whose refusal is the error). False if there is no usable copy (absent, torn, another URL).
    pub fn adopt_identity_copy(&self, path: &FsPath) -> Result<bool, RepositoryError> {
        let copy = std::fs::read(path)
            .ok()
            .and_then(|bytes| serde_json::from_slice::<IdentityCopy>(&bytes).ok())
            .filter(|copy| copy.url == self.url);
        match copy {
            Some(copy) => self.adopt_identity(copy.identity).map(|()| true),
            None => Ok(false),
        }
    }

    /// The identity this process has read or adopted, if any; never asks the store.
    pub fn known_identity(&self) -> Option<&Identity> {
        self.identity.get()
    }

    /// The identity, refusing a repository that does not exist yet.
    pub async fn require_identity(&self) -> Result<Identity, RepositoryError> {
        self.read_identity()
            .await?
            .ok_or_else(|| RepositoryError::NoRepository(self.url.clone()))
    }

    /// Checks the repository's identity against `expected`, creating it on first use.
    pub async fn ensure_identity(&self, expected: &Identity) -> Result<Identity, RepositoryError> {
        if let Some(found) = self.read_identity().await? {
            check_same_cluster(&self.url, &found, expected.system_identifier)?;
            return Ok(found);
        }
        self.probe_create_only().await?;
        let bytes = serde_json::to_vec_pretty(expected).expect("an identity always serializes");
        match self.put_raw(IDENTITY_KEY, PutPayload::from(bytes)).await? {
            PutOutcome::Created => {
                if expected.encryption.is_none() {
                    tracing::warn!(repository = %self.url, "repository created WITHOUT encryption: objects are compressed and checksummed but readable by anyone with storage access; create a keyring with `pitr keygen` and set PITR_KEY_FILE");
                }
                Ok(expected.clone())
            }
            // Another process created it first: check theirs instead.
            PutOutcome::AlreadyExists => {
                let found = self.require_identity().await?;
                check_same_cluster(&self.url, &found, expected.system_identifier)?;
                Ok(found)
            }
        }
    }

    fn check_keyring(&self, identity: &Identity) -> Result<(), RepositoryError> {
        let mismatch = |detail: String| RepositoryError::WrongKeyring {
            url: self.url.clone(),
            detail,
        };
        match (&identity.encryption, &self.keyring) {
            (None, None) => Ok(()),
            (Some(_), None) => Err(mismatch("the repository is encrypted but no keyring is configured; set PITR_KEY_FILE to its keyring".to_string())),
            (None, Some(keyring)) => Err(mismatch(format!(
                "the repository was created without encryption but keyring {} is configured; unset PITR_KEY_FILE or use a new repository",
                keyring.path.display()
            ))),
            (Some(encryption), Some(keyring)) => {
                let key = encryption.key_id.parse::<KeyId>().ok().and_then(|id| keyring.find(id));
                match key {
                    Some(key) if key.check_value() == encryption.key_check => Ok(()),
                    Some(_) => Err(mismatch(format!(
                        "key {} in keyring {} is not the key the repository was created with; use the repository's own keyring",
                        encryption.key_id,
                        keyring.path.display()
                    ))),
                    None => Err(mismatch(format!(
                        "the repository was created with key {}, which keyring {} does not hold; use the repository's own keyring",
                        encryption.key_id,
                        keyring.path.display()
                    ))),
                }
            }
        }
    }

    /// Where a WAL file lives: grouped by timeline, under its own name.
    pub fn wal_key(name: &WalFileName) -> String {
        format!("{WAL_PREFIX}/{}/{name}", name.timeline())
    }

    /// How many objects to keep in flight for `workers` CPU workers. Locally a transfer is CPU
    /// and disk work, so one per worker. A remote request mostly waits for its round trip, so
    /// more run at once, or a backup or restore of thousands of small objects would spend its
    /// time waiting on latency.
    pub fn transfers_in_flight(&self, workers: usize) -> usize {
        let workers = workers.max(1);
        if self.is_local() {
            workers
        } else {
            workers.max(REMOTE_TRANSFERS_IN_FLIGHT)
        }
    }

    /// Whether this is a `file://` repository on a local filesystem.
    pub fn is_local(&self) -> bool {
        self.local_root.is_some()
    }

    /// Whether `key` already exists in a `file://` repository; always false for a remote store.
    /// A stat costs nothing locally, so a repeated push can skip encoding entirely; remotely the
    /// extra round trip would slow every first push, so the create-only write finds out instead.
    pub fn exists_locally(&self, key: &str) -> bool {
        self.local_root
            .as_ref()
            .is_some_and(|root| root.join(self.location(key).as_ref()).is_file())
    }

    /// Encodes a local file and stores it under `key`, create-only; returns the outcome and
    /// the file's summary, computed in the same read.
    pub async fn put_file(
        &self,
        key: &str,
        path: &FsPath,
        options: &EncodeOptions,
        encode_slots: Option<&tokio::sync::Semaphore>,
    ) -> Result<(PutOutcome, ContentSummary), RepositoryError> {
        let (key_owned, path_owned, options, keyring) = (
            key.to_string(),
            path.to_path_buf(),
            options.clone(),
            self.keyring.clone(),
        );
        let slot = match encode_slots {
            Some(slots) => Some(
                slots
                    .acquire()
                    .await
                    .expect("the semaphore is never closed"),
            ),
            None => None,
        };
        let encoded = tokio::task::spawn_blocking(move || {
            envelope::encode_file(&path_owned, &key_owned, keyring.as_ref(), &options)
        })
        .await;
        drop(slot);
        let (content, parts) =
            encoded
                .expect("the encoding task does not panic")
                .map_err(|error| match error {
                    EnvelopeError::Source(io) => RepositoryError::Io {
                        url: self.url.clone(),
                        detail: format!("cannot read {}: {io}", path.display()),
                    },
                    other => RepositoryError::Envelope(other),
                })?;
        let outcome = self.put_raw(key, parts.into_iter().collect()).await?;
        Ok((outcome, content))
    }

    /// Stores an object that is already an envelope (from the outage spool), create-only and
    /// durably. The caller has authenticated it.
    pub async fn put_encoded(
        &self,
        key: &str,
        object: Bytes,
    ) -> Result<PutOutcome, RepositoryError> {
        self.put_raw(key, PutPayload::from(object)).await
    }

    /// Encodes bytes held in memory (a manifest, an index entry) and stores them create-only
    /// and durably.
    pub async fn put_bytes(
        &self,
        key: &str,
        bytes: Bytes,
        options: &EncodeOptions,
    ) -> Result<PutOutcome, RepositoryError> {
        self.put_bytes_with(key, bytes, options, Durability::Immediate)
            .await
    }

    /// `put_bytes` with a choice of when the object becomes durable. `Deferred` suits the
    /// thousands of chunks of one backup: nothing acknowledges them but the manifest, so one
    /// `sync_deferred` before the manifest replaces four fsyncs per chunk.
    pub async fn put_bytes_with(
        &self,
        key: &str,
        bytes: Bytes,
        options: &EncodeOptions,
        durability: Durability,
    ) -> Result<PutOutcome, RepositoryError> {
        let (key_owned, options, keyring) =
            (key.to_string(), options.clone(), self.keyring.clone());
        let (_, parts) = tokio::task::spawn_blocking(move || {
            envelope::encode_bytes(&bytes, &key_owned, keyring.as_ref(), &options)
        })
        .await
        .expect("the encoding task does not panic")
        .map_err(RepositoryError::Envelope)?;
        self.put_raw_with(key, parts.into_iter().collect(), durability)
            .await
    }

    /// Makes every `Deferred` write so far durable. On `file://` one `syncfs` of the
    /// repository's filesystem flushes them all (and reports any writeback error since the
    /// writes); a remote store acknowledged each write as durable already.
    pub async fn sync_deferred(&self) -> Result<(), RepositoryError> {
        let Some(root) = self.local_root.clone() else {
            return Ok(());
        };
        let synced = tokio::task::spawn_blocking(move || crate::durable::sync_filesystem(&root))
            .await
            .expect("the sync task does not panic");
        synced.map_err(|error| RepositoryError::Io {
            url: self.url.clone(),
            detail: format!("syncing the repository's filesystem failed: {error}"),
        })
    }

    /// Removes an object no manifest references, such as a damaged chunk an interrupted backup
    /// left behind. Callers must have proved it unreferenced: the repository never deletes on
    /// its own.
    pub async fn remove_unreferenced(&self, key: &str) -> Result<(), RepositoryError> {
        let location = self.location(key);
        self.bounded(&format!("removing {key}"), self.store.delete(&location))
            .await
    }

    /// Proves a stored object intact without decoding it into anything; `None` if it does not
    /// exist. See `envelope::authenticate`. On `file://` it is also made durable, since a
    /// writer killed between its write and its fsync may have left it in the page cache only.
    pub async fn authenticate_object(&self, key: &str) -> Result<Option<Header>, RepositoryError> {
        self.require_identity().await?;
        let Some(bytes) = self.get_bytes(key).await? else {
            return Ok(None);
        };
        self.sync_if_local(key, &self.location(key))?;
        let (key_owned, keyring) = (key.to_string(), self.keyring.clone());
        let header = tokio::task::spawn_blocking(move || {
            envelope::authenticate(&bytes[..], &key_owned, keyring.as_ref())
        })
        .await
        .expect("the verification task does not panic")
        .map_err(RepositoryError::Envelope)?;
        Ok(Some(header))
    }

    /// Stores a fresh copy of the local file at `path` in place of the object at `key`, which
    /// failed verification (`EnvelopeError::is_damaged_object`: a write torn by a crash, a
    /// flipped bit, an object planted in the bucket). `false` if the object verified after
    /// all (another writer replaced it first): the caller then compares as for any object.
    pub async fn replace_damaged(
        &self,
        key: &str,
        path: &FsPath,
        options: &EncodeOptions,
    ) -> Result<bool, RepositoryError> {
        let (key_owned, path_owned, options, keyring) = (
            key.to_string(),
            path.to_path_buf(),
            options.clone(),
            self.keyring.clone(),
        );
        let (_, parts) = tokio::task::spawn_blocking(move || {
            envelope::encode_file(&path_owned, &key_owned, keyring.as_ref(), &options)
        })
        .await
        .expect("the encoding task does not panic")
        .map_err(RepositoryError::Envelope)?;
        self.replace_damaged_with(key, parts.into_iter().collect())
            .await
    }

    /// `replace_damaged` with an object already encoded (the outage spool's copy, which the
    /// caller has authenticated).
    pub async fn replace_damaged_with(
        &self,
        key: &str,
        payload: PutPayload,
    ) -> Result<bool, RepositoryError> {
        if self.is_local() {
            self.replace_local(key, payload).await
        } else {
            self.replace_remote(key, payload).await
        }
    }

    /// The write is conditional on the ETag of the very read whose bytes failed verification,
    /// so a concurrent replacement (a valid object by now) is never overwritten.
    async fn replace_remote(
        &self,
        key: &str,
        payload: PutPayload,
    ) -> Result<bool, RepositoryError> {
        let location = self.location(key);
        let read = async {
            let result = self.store.get(&location).await?;
            let meta = result.meta.clone();
            Ok((result.bytes().await?, meta))
        };
        let (bytes, meta) = self.bounded(&format!("reading {key}"), read).await?;
        if !self.is_damaged(key, bytes).await? {
            return Ok(false);
        }
        let replace = PutOptions {
            mode: PutMode::Update(object_store::UpdateVersion {
                e_tag: meta.e_tag,
                version: meta.version,
            }),
            ..PutOptions::default()
        };
        let put = self.create_store.put_opts(&location, payload, replace);
        match tokio::time::timeout(self.timeout, put).await {
            Ok(Ok(_)) => Ok(true),
            Ok(Err(object_store::Error::Precondition { .. })) => Ok(false),
            Ok(Err(error)) => Err(RepositoryError::from_store(
                &self.url,
                &format!("replacing {key}"),
                error,
            )),
            Err(_) => Err(RepositoryError::Unreachable {
                url: self.url.clone(),
                detail: format!(
                    "replacing {key} did not finish within {} s",
                    self.timeout.as_secs()
                ),
            }),
        }
    }

    /// The new object is staged complete and durable under `tmp/`, then, holding a lock that
    /// every replacing pitr takes, the stored object is checked again and the staged one
    /// renamed over it: two pushers can never both see "damaged" and replace each other.
    async fn replace_local(&self, key: &str, payload: PutPayload) -> Result<bool, RepositoryError> {
        let location = self.location(key);
        let staged = self.location(&format!(
            "{TEMPORARY_PREFIX}/replace-{}-{}",
            std::process::id(),
            random_suffix()?
        ));
        let options = PutOptions {
            mode: PutMode::Overwrite,
            ..PutOptions::default()
        };
        let staging = self.create_store.put_opts(&staged, payload, options);
        self.bounded(&format!("staging a new copy of {key}"), staging)
            .await?;
        let lock = self.replace_lock()?;
        let result = match self.get_bytes(key).await {
            Ok(Some(bytes)) => match self.is_damaged(key, bytes).await {
                Ok(true) => {
                    // The fsyncing store syncs the directory after the rename.
                    let rename = self.create_store.rename(&staged, &location);
                    self.bounded(&format!("replacing {key}"), rename)
                        .await
                        .map(|()| true)
                }
                other => other,
            },
            Ok(None) => Ok(false),
            Err(error) => Err(error),
        };
        drop(lock);
        if !matches!(result, Ok(true)) {
            let _ = self.store.delete(&staged).await;
        }
        result
    }

    /// An exclusive lock on `tmp/.replace.lock` in a `file://` repository, released on drop.
    fn replace_lock(&self) -> Result<std::fs::File, RepositoryError> {
        let root = self.local_root.as_ref().expect("only a file:// repository");
        let directory = root.join(TEMPORARY_PREFIX);
        let locked = std::fs::create_dir_all(&directory).and_then(|()| {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(directory.join(".replace.lock"))?;
            file.lock()?;
            Ok(file)
        });
        locked.map_err(|error| RepositoryError::Io {
            url: self.url.clone(),
            detail: format!(
                "cannot lock {} for a replacement: {error}",
                directory.display()
            ),
        })
    }

    /// Whether `bytes`, read from `key`, fail verification as a damaged object.
    async fn is_damaged(&self, key: &str, bytes: Bytes) -> Result<bool, RepositoryError> {
        let (key_owned, keyring) = (key.to_string(), self.keyring.clone());
        let verified = tokio::task::spawn_blocking(move || {
            envelope::authenticate(&bytes[..], &key_owned, keyring.as_ref())
        })
        .await
        .expect("the verification task does not panic");
        match verified {
            Ok(_) => Ok(false),
            Err(error) if error.is_damaged_object() => Ok(true),
            Err(error) => Err(RepositoryError::Envelope(error)),
        }
    }

    /// Proves that the store refuses a create-only write of a name that exists, by writing a
    /// probe object twice. Every promise of the archive rests on this: a store that ignores
    /// `If-None-Match` would let a second writer overwrite archived WAL silently. Run before a
    /// repository is created, and by `pitr check`.
    pub async fn probe_create_only(&self) -> Result<(), RepositoryError> {
        let key = format!("{TEMPORARY_PREFIX}/create-only-probe-{}", random_suffix()?);
        let location = self.location(&key);
        let first = PutPayload::from_static(b"first");
        let second = PutPayload::from_static(b"second");
        let store = &self.create_store;
        let outcomes = (
            self.put_create_only(&key, &location, first, store).await,
            self.put_create_only(&key, &location, second, store).await,
        );
        let _ = self
            .bounded(&format!("removing {key}"), self.store.delete(&location))
            .await;
        match outcomes {
            (Ok(PutOutcome::Created), Ok(PutOutcome::AlreadyExists)) => Ok(()),
            (Ok(_), Ok(_)) => Err(RepositoryError::Overwrites(self.url.clone())),
            (Err(error), _) | (_, Err(error)) => Err(error),
        }
    }

    /// Reads and verifies a small object into memory; `None` if it does not exist.
    pub async fn read_bytes(&self, key: &str) -> Result<Option<Vec<u8>>, RepositoryError> {
        Ok(self
            .read_object(key, Vec::new(), DecodeMode::Alone)
            .await?
            .map(|(_, bytes)| bytes))
    }

    /// Stores already-encoded bytes create-only, and makes them durable.
    async fn put_raw(&self, key: &str, payload: PutPayload) -> Result<PutOutcome, RepositoryError> {
        self.put_raw_with(key, payload, Durability::Immediate).await
    }

    async fn put_raw_with(
        &self,
        key: &str,
        payload: PutPayload,
        durability: Durability,
    ) -> Result<PutOutcome, RepositoryError> {
        let immediate = durability == Durability::Immediate;
        let location = self.location(key);
        let store = match (immediate, self.is_local()) {
            (false, true) => &self.store,
            _ => &self.create_store,
        };
        let outcome = self.put_create_only(key, &location, payload, store).await?;
        // A name already taken may hold the object of a writer that died before its fsync (an
        // older pitr, or a deferred write), so it is made durable now, before anyone reports it
        // archived. A new object on `file://` was made durable by the write itself.
        if immediate && outcome == PutOutcome::AlreadyExists {
            self.sync_if_local(key, &location)?;
        }
        Ok(outcome)
    }

    /// One create-only write, retried here rather than inside object_store, because between
    /// attempts it asks whether the name exists. Some stores answer a create-only write of a
    /// taken name by closing the connection before reading the body (s3s-fs does, and a server
    /// that stops reading a request it refuses may reset it), which the client sees as a
    /// failure to send. Retried blindly, as object_store does, the whole body went out up to
    /// ten more times with backoff: an identical re-push took up to 5 s instead of 0.1 s, and
    /// could miss its deadline. A lost response can also hide a write that landed. Either way
    /// the name exists now, and the caller compares contents, which settles both safely.
    async fn put_create_only(
        &self,
        key: &str,
        location: &Path,
        payload: PutPayload,
        store: &Arc<dyn ObjectStore>,
    ) -> Result<PutOutcome, RepositoryError> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut backoff = CREATE_RETRY_BACKOFF;
        let mut retries = 0;
        loop {
            let options = PutOptions {
                mode: PutMode::Create,
                ..PutOptions::default()
            };
            let put = store.put_opts(location, payload.clone(), options);
            let error = match tokio::time::timeout_at(deadline, put).await {
                Ok(Ok(_)) => return Ok(PutOutcome::Created),
                Ok(Err(object_store::Error::AlreadyExists { .. })) => {
                    return Ok(PutOutcome::AlreadyExists);
                }
                Ok(Err(error)) => error,
                Err(_) => {
                    return Err(RepositoryError::Unreachable {
                        url: self.url.clone(),
                        detail: format!(
                            "writing {key} did not finish within {} s",
                            self.timeout.as_secs()
                        ),
                    });
                }
            };
            if self.exists_before(location, deadline).await {
                return Ok(PutOutcome::AlreadyExists);
            }
            let retry_at = tokio::time::Instant::now() + backoff;
            if !is_transient(&error) || retries == CREATE_RETRIES || retry_at >= deadline {
                return Err(RepositoryError::from_store(
                    &self.url,
                    &format!("writing {key}"),
                    error,
                ));
            }
            tracing::info!(key, "writing failed ({}); retrying", one_line(&error));
            tokio::time::sleep_until(retry_at).await;
            backoff = (backoff * 2).min(CREATE_RETRY_BACKOFF_MAX);
            retries += 1;
        }
    }

    /// Whether an object exists at `location`; false also when the store cannot say by
    /// `deadline`.
    async fn exists_before(&self, location: &Path, deadline: tokio::time::Instant) -> bool {
        matches!(
            tokio::time::timeout_at(deadline, self.store.head(location)).await,
            Ok(Ok(_))
        )
    }

    fn sync_if_local(&self, key: &str, location: &Path) -> Result<(), RepositoryError> {
        let Some(root) = &self.local_root else {
            return Ok(());
        };
        sync_local_object(root, location).map_err(|error| RepositoryError::Io {
            url: self.url.clone(),
            detail: format!("fsync of {key} failed: {error}"),
        })
    }

    /// Reads, verifies and decodes the object at `key` into `sink`. Like every read of an
    /// object, it first checks the identity (cached after the first time): the identity, not
    /// the object, decides whether objects must be encrypted, and a process whose keyring
    /// disagrees with it must read nothing, or a missing keyring would make planted
    /// unencrypted objects acceptable. `None` if there is no
    /// such object. Memory stays at a few chunks, the body streaming from the store to the
    /// sink, except that `DecodeMode::Concurrent` may decode a local segment in one pooled
    /// buffer; a remote body is always decoded `Alone`.
    pub async fn read_object<W: Write + Send + 'static>(
        &self,
        key: &str,
        sink: W,
        mode: DecodeMode,
    ) -> Result<Option<(Header, W)>, RepositoryError> {
        self.require_identity().await?;
        let location = self.location(key);
        let result = match self
            .bounded(&format!("reading {key}"), self.store.get(&location))
            .await
        {
            Ok(result) => result,
            Err(RepositoryError::NotFound) => return Ok(None),
            Err(error) => return Err(error),
        };
        // A local object is decoded straight from its file; a remote body streams in through
        // a bounded queue, so memory stays at a few chunks either way.
        let (source, pump, mode): (Box<dyn Read + Send>, _, _) = match result.payload {
            // Unbuffered: the envelope reads whole sealed chunks, straight into their buffers.
            GetResultPayload::File(file, _) => (Box::new(file), None, mode),
            GetResultPayload::Stream(body) => {
                let (reader, pump) = self.bridge(body);
                (Box::new(reader), Some(pump), DecodeMode::Alone)
            }
        };
        let keyring = self.keyring.clone();
        let key_owned = key.to_string();
        let decoded = tokio::task::spawn_blocking(move || {
            let mut sink = sink;
            let header = envelope::decode(source, &key_owned, keyring.as_ref(), &mut sink, mode)?;
            Ok::<_, EnvelopeError>((header, sink))
        })
        .await
        .expect("the decoding task does not panic");
        if let Some(pump) = pump {
            pump.abort();
        }
        match decoded {
            Ok(decoded) => Ok(Some(decoded)),
            Err(EnvelopeError::Source(error)) => Err(RepositoryError::Unreachable {
                url: self.url.clone(),
                detail: format!("reading {key} failed: {error}"),
            }),
            Err(EnvelopeError::Sink(error)) => Err(RepositoryError::Sink(error)),
            Err(error) => Err(RepositoryError::Envelope(error)),
        }
    }

    /// Feeds an async body stream to a blocking reader, failing it if the store stalls.
    fn bridge(
        &self,
        mut body: futures::stream::BoxStream<'static, object_store::Result<Bytes>>,
    ) -> (ChannelReader, tokio::task::JoinHandle<()>) {
        let (sender, receiver) = tokio::sync::mpsc::channel::<io::Result<Bytes>>(4);
        let timeout = self.timeout;
        let url = self.url.clone();
        let pump = tokio::spawn(async move {
            loop {
                let next = match tokio::time::timeout(timeout, body.next()).await {
                    Ok(next) => next,
                    Err(_) => Some(Err(object_store::Error::Generic {
                        store: "pitr",
                        source: format!(
                            "{url} stalled for {} s while sending an object",
                            timeout.as_secs()
                        )
                        .into(),
                    })),
                };
                let Some(item) = next else { break };
                let item = item.map_err(io::Error::other);
                let failed = item.is_err();
                if sender.send(item).await.is_err() || failed {
                    break;
                }
            }
        });
        let reader = ChannelReader {
            receiver,
            current: Bytes::new(),
        };
        (reader, pump)
    }

    async fn get_bytes(&self, key: &str) -> Result<Option<Bytes>, RepositoryError> {
        let location = self.location(key);
        let what = format!("reading {key}");
        let read = async { self.store.get(&location).await?.bytes().await };
        match self.bounded(&what, read).await {
            Ok(bytes) => Ok(Some(bytes)),
            Err(RepositoryError::NotFound) => Ok(None),
            Err(error) => Err(error),
        }
    }

    /// Every object under `prefix`, sorted by key (the local store lists in no order).
    pub async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, RepositoryError> {
        let location = self.location(prefix);
        let listing = self.store.list(Some(&location)).collect::<Vec<_>>();
        let listing = tokio::time::timeout(self.timeout, listing)
            .await
            .map_err(|_| RepositoryError::Unreachable {
                url: self.url.clone(),
                detail: format!(
                    "listing {prefix} did not finish within {} s",
                    self.timeout.as_secs()
                ),
            })?;
        let mut objects = listing
            .into_iter()
            .collect::<object_store::Result<Vec<_>>>()
            .map_err(|error| {
                RepositoryError::from_store(&self.url, &format!("listing {prefix}"), error)
            })?;
        objects.sort_by(|a, b| a.location.cmp(&b.location));
        Ok(objects)
    }

    /// The key of a listed object, relative to the repository prefix.
    pub fn relative_key<'a>(&self, meta: &'a ObjectMeta) -> &'a str {
        let full = meta.location.as_ref();
        let prefix = self.prefix.as_ref();
        full.strip_prefix(prefix)
            .map(|rest| rest.trim_start_matches('/'))
            .unwrap_or(full)
    }
}

/// Refuses a repository that belongs to another cluster.
pub fn check_same_cluster(
    url: &str,
    identity: &Identity,
    local: SystemIdentifier,
) -> Result<(), RepositoryError> {
    if identity.system_identifier != local {
        return Err(RepositoryError::OtherCluster {
            url: url.to_string(),
            repository: identity.system_identifier,
            local,
        });
    }
    Ok(())
}

/// Creates a `file://` repository's directory, 0700 like every directory pitr makes there,
/// and makes its entry durable. The umask (`main` sets 077) keeps object_store's own files and
/// directories private too.
fn create_local_root(root: &FsPath) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if root.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(root)?;
    match root.parent() {
        Some(parent) => std::fs::File::open(parent)?.sync_all(),
        None => Ok(()),
    }
}

/// Makes a stored local object durable: its data, then each directory from it up to the root.
fn sync_local_object(root: &FsPath, location: &Path) -> io::Result<()> {
    let path = root.join(location.as_ref());
    std::fs::File::open(&path)?.sync_all()?;
    let mut directory = path.parent();
    while let Some(current) = directory {
        std::fs::File::open(current)?.sync_all()?;
        if current == root {
            break;
        }
        directory = current.parent();
    }
    Ok(())
}

/// Bridges the async body stream to the blocking decoder, with a bounded queue between them.
struct ChannelReader {
    receiver: tokio::sync::mpsc::Receiver<io::Result<Bytes>>,
    current: Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            match self.receiver.blocking_recv() {
                Some(item) => self.current = item?,
                None => return Ok(0),
            }
        }
        let count = out.len().min(self.current.len());
        out[..count].copy_from_slice(&self.current.split_to(count));
        Ok(count)
    }
}

/// Retries of a failed create-only write (`put_create_only`), as many as object_store makes.
const CREATE_RETRIES: u32 = 10;
const CREATE_RETRY_BACKOFF: Duration = Duration::from_millis(100);
const CREATE_RETRY_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Whether a failed write may succeed if sent again: a connection that failed or dropped, or
/// a server error. Refusals (permissions, credentials, preconditions) have their own error
/// kinds and are final.
fn is_transient(error: &object_store::Error) -> bool {
    matches!(error, object_store::Error::Generic { .. })
}

type RemoteBuilder =
    fn(&str, &Settings, RetryConfig) -> Result<Arc<dyn ObjectStore>, RemoteBuildError>;

/// Why a remote store could not be built: a bad URL or option, or no credentials to use.
enum RemoteBuildError {
    Store(object_store::Error),
    NoCredentials(String),
}

impl From<object_store::Error> for RemoteBuildError {
    fn from(error: object_store::Error) -> Self {
        RemoteBuildError::Store(error)
    }
}

fn retry_config(timeout: Duration) -> RetryConfig {
    RetryConfig {
        backoff: BackoffConfig {
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            base: 2.0,
        },
        max_retries: 10,
        retry_timeout: timeout,
    }
}

/// Request timeouts, set key by key: replacing the whole `ClientOptions` would drop what the
/// builder read from the environment (`AWS_ALLOW_HTTP`, proxies, ...).
fn client_timeouts(timeout: Duration) -> [(ClientConfigKey, String); 2] {
    let connect = timeout.min(Duration::from_secs(5));
    [
        (
            ClientConfigKey::ConnectTimeout,
            format!("{}ms", connect.as_millis()),
        ),
        (
            ClientConfigKey::Timeout,
            format!("{}ms", timeout.as_millis()),
        ),
    ]
}

fn build_s3(
    url: &str,
    settings: &Settings,
    retry: RetryConfig,
) -> Result<Arc<dyn ObjectStore>, RemoteBuildError> {
    use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
    let mut builder = AmazonS3Builder::from_env().with_url(url).with_retry(retry);
    for (key, value) in client_timeouts(settings.store_timeout) {
        builder = builder.with_config(AmazonS3ConfigKey::Client(key), value);
    }
    for (key, value) in &settings.store_options {
        builder = builder.with_config(key.parse::<AmazonS3ConfigKey>()?, value);
    }
    let source = s3_credential_source(&builder);
    if source == S3_INSTANCE_METADATA && !settings.store_instance_metadata {
        return Err(RemoteBuildError::NoCredentials("none are configured and the instance metadata endpoint is turned off (store_instance_metadata = false); set aws_access_key_id and aws_secret_access_key in [store] (or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY), or use a web identity".to_string()));
    }
    // Once per process: the daemon and the backup open the store more than once.
    static LOGGED: std::sync::Once = std::sync::Once::new();
    LOGGED.call_once(|| tracing::info!(repository = url, "S3 credentials: {source}"));
    Ok(Arc::new(builder.build()?))
}

const S3_INSTANCE_METADATA: &str = "the instance metadata endpoint (no other credentials are configured; store_instance_metadata = false turns this off)";

/// Which credentials object_store will use, in the order it tries them. Without any, it asks
/// the instance metadata endpoint, which outside a cloud VM only times out: worth saying.
fn s3_credential_source(builder: &object_store::aws::AmazonS3Builder) -> &'static str {
    use object_store::aws::AmazonS3ConfigKey;
    let set = |key: AmazonS3ConfigKey| {
        builder
            .get_config_value(&key)
            .is_some_and(|v| !v.is_empty())
    };
    let environment = |name: &str| std::env::var_os(name).is_some_and(|v| !v.is_empty());
    let unsigned = builder.get_config_value(&AmazonS3ConfigKey::SkipSignature);
    if unsigned.is_some_and(|value| value == "true") {
        "none: requests are unsigned (aws_skip_signature)"
    } else if set(AmazonS3ConfigKey::AccessKeyId) && set(AmazonS3ConfigKey::SecretAccessKey) {
        "a static access key (aws_access_key_id or AWS_ACCESS_KEY_ID)"
    } else if environment("AWS_WEB_IDENTITY_TOKEN_FILE") && environment("AWS_ROLE_ARN") {
        "a web identity token (AWS_WEB_IDENTITY_TOKEN_FILE and AWS_ROLE_ARN)"
    } else if set(AmazonS3ConfigKey::ContainerCredentialsRelativeUri)
        || set(AmazonS3ConfigKey::ContainerCredentialsFullUri)
    {
        "the container credentials endpoint (AWS_CONTAINER_CREDENTIALS_*)"
    } else {
        S3_INSTANCE_METADATA
    }
}

fn build_gcs(
    url: &str,
    settings: &Settings,
    retry: RetryConfig,
) -> Result<Arc<dyn ObjectStore>, RemoteBuildError> {
    use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey};
    let mut builder = GoogleCloudStorageBuilder::from_env()
        .with_url(url)
        .with_retry(retry);
    for (key, value) in client_timeouts(settings.store_timeout) {
        builder = builder.with_config(GoogleConfigKey::Client(key), value);
    }
    for (key, value) in &settings.store_options {
        builder = builder.with_config(key.parse::<GoogleConfigKey>()?, value);
    }
    Ok(Arc::new(builder.build()?))
}

fn build_azure(
    url: &str,
    settings: &Settings,
    retry: RetryConfig,
) -> Result<Arc<dyn ObjectStore>, RemoteBuildError> {
    use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
    let mut builder = MicrosoftAzureBuilder::from_env()
        .with_url(url)
        .with_retry(retry);
    for (key, value) in client_timeouts(settings.store_timeout) {
        builder = builder.with_config(AzureConfigKey::Client(key), value);
    }
    for (key, value) in &settings.store_options {
        builder = builder.with_config(key.parse::<AzureConfigKey>()?, value);
    }
    Ok(Arc::new(builder.build()?))
}

#[derive(Debug, thiserror::Error)]
pub enum RepositoryError {
    #[error("{0}")]
    Config(String),
    #[error(
        "no pitr repository at {0} (it has no identity object yet); check PITR_REPO, or archive a segment to create it"
    )]
    NoRepository(String),
    #[error(
        "repository {url} belongs to database system {repository}, but this cluster is {local}; give each cluster its own PITR_REPO"
    )]
    OtherCluster {
        url: String,
        repository: SystemIdentifier,
        local: SystemIdentifier,
    },
    #[error("wrong keyring for repository {url}: {detail}")]
    WrongKeyring { url: String, detail: String },
    #[error("repository {url} is damaged: {detail}")]
    Corrupt { url: String, detail: String },
    #[error(
        "cannot reach the repository at {url}: {detail}; check PITR_REPO, the endpoint, credentials and network"
    )]
    Unreachable { url: String, detail: String },
    #[error(
        "the store behind repository {url} refused pitr's credentials: {detail}; check the credentials and the permissions on the bucket (waiting will not help)"
    )]
    Denied { url: String, detail: String },
    #[error(
        "the store behind repository {0} overwrote an existing object on a create-only write (it ignores If-None-Match), so archived WAL would not be safe there; use a store that honours conditional writes (AWS S3, MinIO, Cloudflare R2, GCS, Azure Blob) or a file:// repository"
    )]
    Overwrites(String),
    #[error("repository {url}: {detail}; check the store's settings")]
    Store { url: String, detail: String },
    #[error("repository {url}: {detail}")]
    Io { url: String, detail: String },
    #[error("{0}")]
    Envelope(EnvelopeError),
    #[error("{0}")]
    Sink(io::Error),
    #[error("object not found")]
    NotFound,
}

impl RepositoryError {
    /// Keeps the store's error kind: only a store that could not be reached (a transport
    /// failure, a timeout, a server error) is `Unreachable`, which is what the outage spool
    /// waits out. A refusal of the credentials would never heal by waiting, so it fails at once.
    fn from_store(url: &str, what: &str, error: object_store::Error) -> Self {
        match error {
            object_store::Error::NotFound { .. } => RepositoryError::NotFound,
            object_store::Error::PermissionDenied { .. }
            | object_store::Error::Unauthenticated { .. } => RepositoryError::Denied {
                url: url.to_string(),
                detail: format!("{what} was refused: {}", one_line(&error)),
            },
            object_store::Error::Generic { .. } => match classify_generic(&error) {
                GenericKind::Outage => RepositoryError::Unreachable {
                    url: url.to_string(),
                    detail: format!("{what} failed: {}", one_line(&error)),
                },
                GenericKind::Denied => RepositoryError::Denied {
                    url: url.to_string(),
                    detail: format!("{what} was refused: {}", one_line(&error)),
                },
                GenericKind::Refused => RepositoryError::Store {
                    url: url.to_string(),
                    detail: format!("{what} failed: {}", one_line(&error)),
                },
            },
            other => RepositoryError::Store {
                url: url.to_string(),
                detail: format!("{what} failed: {}", one_line(&other)),
            },
        }
    }
}

/// What an object_store `Generic` error means for the caller. object_store gives 401, 403,
/// 404, 409 and 412 their own kinds and folds every other failure into `Generic`: a transport
/// failure, a timeout, a 5xx, but also a 400 that S3 sends for an expired session token, and
/// a failure to obtain credentials at all.
enum GenericKind {
    /// The store could not be reached or failed on its side: waiting may help.
    Outage,
    /// The credentials were refused or could not be obtained: waiting never helps.
    Denied,
    /// The store refused the request for another reason.
    Refused,
}

/// S3 error codes that mean the credentials, not the store, are the problem.
const CREDENTIAL_ERROR_CODES: [&str; 9] = [
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AuthorizationHeaderMalformed",
    "InvalidSecurity",
    "AccessDenied",
    "AccountProblem",
];

fn classify_generic(error: &object_store::Error) -> GenericKind {
    let text = one_line(error);
    if CREDENTIAL_ERROR_CODES
        .iter()
        .any(|code| text.contains(code))
        || text.to_ascii_lowercase().contains("credential")
    {
        return GenericKind::Denied;
    }
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(current) = cause {
        if current
            .downcast_ref::<object_store::client::HttpError>()
            .is_some()
        {
            return GenericKind::Outage;
        }
        if let Some(io) = current.downcast_ref::<io::Error>() {
            return match io.kind() {
                io::ErrorKind::PermissionDenied => GenericKind::Denied,
                _ => GenericKind::Outage,
            };
        }
        cause = current.source();
    }
    // An HTTP status, as object_store words it: a server error or throttling is an outage,
    // any other client error a refusal.
    match text
        .split("status code: ")
        .nth(1)
        .and_then(|rest| rest.get(..3))
    {
        Some(code) if code.starts_with('5') || code == "429" => GenericKind::Outage,
        Some(code) if code.starts_with('4') => GenericKind::Refused,
        _ => GenericKind::Outage,
    }
}

/// object_store errors nest their causes; keep the message on one line, as hooks log it.
fn one_line(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text.replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn generic(message: &str) -> object_store::Error {
        object_store::Error::Generic {
            store: "S3",
            source: message.to_string().into(),
        }
    }

    #[test]
    fn only_an_unreachable_store_is_an_outage() {
        let url = "s3://bucket/prefix";
        let kind = |error| RepositoryError::from_store(url, "reading x", error);
        // S3 answers an expired session token with 400, which object_store folds into Generic.
        for denied in [
            "Error performing PUT http://s3/x in 20ms - Server returned non-2xx status code: 400 Bad Request: <Error><Code>ExpiredToken</Code></Error>",
            "Error getting credentials from instance metadata: connection refused",
        ] {
            assert!(
                matches!(kind(generic(denied)), RepositoryError::Denied { .. }),
                "{denied}"
            );
        }
        for outage in [
            "Error performing GET http://s3/x in 5s - Server returned non-2xx status code: 503 Service Unavailable: ",
            "Error performing GET http://s3/x in 5s - Server returned non-2xx status code: 429 Too Many Requests: ",
        ] {
            assert!(
                matches!(kind(generic(outage)), RepositoryError::Unreachable { .. }),
                "{outage}"
            );
        }
        let refused = "Error performing PUT http://s3/x in 2ms - Server returned non-2xx status code: 400 Bad Request: <Error><Code>InvalidArgument</Code></Error>";
        assert!(matches!(
            kind(generic(refused)),
            RepositoryError::Store { .. }
        ));
        let io = object_store::Error::Generic {
            store: "LocalFileSystem",
            source: Box::new(io::Error::from(io::ErrorKind::PermissionDenied)),
        };
        assert!(matches!(kind(io), RepositoryError::Denied { .. }));
    }
}

//! The repository: pitr's objects on a store, with their identity, envelopes and key layout.
//!
//! A repository is a prefix in a store behind the storage contract (`crate::storage`: `file://`,
//! `s3://`, `gs://`, `az://`, or in memory for unit tests); every key it holds is built by
//! `layout`.
//! It starts with an identity object naming the cluster, PostgreSQL version, segment size and
//! the key it is encrypted with; every command checks it before reading or writing anything
//! else. Objects are written create-only and never overwritten, and every write and read goes
//! through the envelope codec, so no command can store plaintext or skip verification. The
//! store reports an object stored only once it is durable (see the contract).

pub mod layout;

use std::io::{self, Read, Write};
use std::path::Path as FsPath;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use crate::config::Settings;
use crate::envelope::{self, ContentSummary, DecodeMode, EncodeOptions, EnvelopeError, Header};
use crate::keyring::{KeyId, Keyring};
use crate::storage::{self, Body, ObjectStorage, OpenError, Storage, StorageError};
use crate::wal::{PgVersion, SystemIdentifier, WalFileName, WalSegmentSize};

pub use crate::storage::{Durability, ObjectInfo, PutOutcome};
pub use layout::WAL_PREFIX;

pub const FORMAT_VERSION: u32 = 1;
const IDENTITY_KEY: &str = layout::IDENTITY;
/// Objects a backup or restore keeps in flight on a remote store (see `transfers_in_flight`).
const REMOTE_TRANSFERS_IN_FLIGHT: usize = 16;

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

/// A copy of a repository's identity kept elsewhere (the outage spool, the prefetch spool),
/// naming the repository it came from. Flat, so that it also reads as a plain `Identity`: the
/// outage spool is itself a repository, and this is its identity object.
#[derive(Serialize, Deserialize)]
struct IdentityCopy {
    url: String,
    #[serde(flatten)]
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

/// What a marker of work in progress (`layout::marker`) records: when and where it began.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MarkerRecord {
    pub started: chrono::DateTime<chrono::Utc>,
    pub host: String,
    pub pid: u32,
}

impl MarkerRecord {
    fn now() -> MarkerRecord {
        MarkerRecord {
            started: chrono::Utc::now(),
            host: std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|name| name.trim().to_string())
                .unwrap_or_default(),
            pid: std::process::id(),
        }
    }
}

/// The cipher an encrypted repository's identity names: the envelope's AES-256-GCM STREAM.
const IDENTITY_CIPHER: &str = "aes-256-gcm-stream";

pub struct Repository {
    /// The store, behind the storage contract; the repository adds identity and envelopes.
    storage: Arc<dyn Storage>,
    pub url: String,
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
        let config = storage::StoreConfig {
            timeout: settings.store_timeout,
            options: settings.store_options.clone(),
            instance_metadata: settings.store_instance_metadata,
        };
        let storage = ObjectStorage::open(url_text, &config).map_err(|error| match error {
            OpenError::BadUrl(reason) => RepositoryError::Config(format!(
                "repository URL '{url_text}' is not valid: {reason}; use file:///path, s3://bucket/prefix, gs://bucket/prefix or az://container/prefix"
            )),
            OpenError::LocalPath(reason) => RepositoryError::Config(format!(
                "repository URL '{url_text}' is not valid: {reason}"
            )),
            OpenError::NoCredentials(detail) => RepositoryError::Config(format!(
                "no credentials for repository {url_text}: {detail}"
            )),
            create @ OpenError::CreateRoot { .. } => RepositoryError::Config(create.to_string()),
        })?;
        Ok(Self::over(Arc::new(storage), url_text, keyring))
    }

    /// A repository over `storage`, named `url` in messages: an in-memory store in unit tests,
    /// or any other implementation of the contract.
    pub fn over(storage: Arc<dyn Storage>, url: &str, keyring: Option<Keyring>) -> Self {
        Repository {
            storage,
            url: url.to_string(),
            keyring,
            identity: std::sync::OnceLock::new(),
        }
    }

    /// An empty repository in memory, for unit tests of the use-cases.
    pub fn in_memory(keyring: Option<Keyring>) -> Self {
        let storage = ObjectStorage::memory(Duration::from_secs(60));
        Self::over(Arc::new(storage), "memory:///", keyring)
    }

    /// A repository in a local directory, with `keyring`: the outage spool, which keeps the
    /// main repository's objects under the same keys while its store cannot be reached. The
    /// directory is created if missing.
    pub fn open_local(
        directory: &FsPath,
        keyring: Option<Keyring>,
        timeout: Duration,
    ) -> Result<Self, RepositoryError> {
        let absolute = std::path::absolute(directory).map_err(|error| {
            RepositoryError::Config(format!("cannot resolve {}: {error}", directory.display()))
        })?;
        let url = url::Url::from_directory_path(&absolute).map_err(|()| {
            RepositoryError::Config(format!(
                "{} is not a usable directory path",
                directory.display()
            ))
        })?;
        let config = storage::StoreConfig {
            timeout,
            options: Default::default(),
            instance_metadata: false,
        };
        let storage = ObjectStorage::open(url.as_str(), &config)
            .map_err(|error| RepositoryError::Config(error.to_string()))?;
        Ok(Self::over(Arc::new(storage), url.as_str(), keyring))
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

    /// The typed error for a failed store operation described by `what` ("reading {key}").
    fn failed(&self, what: &str, error: StorageError) -> RepositoryError {
        RepositoryError::from_storage(&self.url, what, error)
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

    /// Keeps this repository's identity, with its URL, as the identity object of `mirror` (the
    /// outage spool, a repository with the same layout on a local disk), for processes that
    /// cannot reach this repository's store. Written through the storage contract like every
    /// object: create-only, or a conditional update of a copy that differs (another
    /// repository's, or an older pitr's). `mirror` adopts the identity too. Does nothing while
    /// this repository's identity is unknown.
    pub async fn keep_identity_in(&self, mirror: &Repository) -> Result<(), RepositoryError> {
        let Some(identity) = self.known_identity() else {
            return Ok(());
        };
        let copy = IdentityCopy {
            url: self.url.clone(),
            identity: identity.clone(),
        };
        let bytes =
            Bytes::from(serde_json::to_vec_pretty(&copy).expect("an identity always serializes"));
        let written = match mirror.storage.get_bytes_versioned(IDENTITY_KEY).await {
            Ok((existing, _)) if existing == bytes => Ok(()),
            Ok((_, version)) => {
                mirror
                    .storage
                    .update(IDENTITY_KEY, vec![bytes], &version)
                    .await
            }
            Err(StorageError::NotFound) => mirror
                .storage
                .put_create(IDENTITY_KEY, vec![bytes], Durability::Immediate)
                .await
                .map(|_| ()),
            Err(error) => Err(error),
        };
        written.map_err(|error| mirror.failed(&format!("writing {IDENTITY_KEY}"), error))?;
        mirror.adopt_identity(identity.clone())
    }

    /// Adopts the identity `keep_identity_in` left in `mirror`, with the checks of
    /// `adopt_identity` (whose refusal is the error), and makes `mirror` use it too. False if
    /// `mirror` holds no usable copy (none, another repository's, one it cannot parse).
    pub async fn adopt_identity_from(&self, mirror: &Repository) -> Result<bool, RepositoryError> {
        let Some(bytes) = mirror.get_bytes(IDENTITY_KEY).await? else {
            return Ok(false);
        };
        let copy = serde_json::from_slice::<IdentityCopy>(&bytes)
            .ok()
            .filter(|copy| copy.url == self.url);
        let Some(copy) = copy else {
            return Ok(false);
        };
        self.adopt_identity(copy.identity.clone())?;
        mirror.adopt_identity(copy.identity)?;
        Ok(true)
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
        match self.put_raw(IDENTITY_KEY, vec![Bytes::from(bytes)]).await? {
            PutOutcome::Created => {
                // This process wrote it: it is the identity from now on.
                let _ = self.identity.set(expected.clone());
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
        layout::wal(name)
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
        self.storage.is_local()
    }

    /// Whether `key` already exists in a `file://` repository; always false for a remote store.
    /// A stat costs nothing locally, so a repeated push can skip encoding entirely; remotely the
    /// extra round trip would slow every first push, so the create-only write finds out instead.
    pub fn exists_locally(&self, key: &str) -> bool {
        self.storage.exists_locally(key)
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
        let outcome = self.put_raw(key, parts).await?;
        Ok((outcome, content))
    }

    /// Stores an object that is already an envelope (from the outage spool), create-only and
    /// durably. The caller has authenticated it.
    pub async fn put_encoded(
        &self,
        key: &str,
        object: Vec<Bytes>,
    ) -> Result<PutOutcome, RepositoryError> {
        self.put_raw(key, object).await
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
        self.put_raw_with(key, parts, durability).await
    }

    /// Makes every `Deferred` write so far durable. On `file://` one `syncfs` of the
    /// repository's filesystem flushes them all (and reports any writeback error since the
    /// writes); a remote store acknowledged each write as durable already.
    pub async fn sync_deferred(&self) -> Result<(), RepositoryError> {
        self.storage
            .sync_deferred()
            .await
            .map_err(|error| match error {
                StorageError::Sync { source, .. } => RepositoryError::Io {
                    url: self.url.clone(),
                    detail: format!("syncing the repository's filesystem failed: {source}"),
                },
                other => self.failed("syncing the repository", other),
            })
    }

    /// Removes an object nothing needs any more: a damaged chunk no manifest references, which
    /// an interrupted backup left behind, or a spooled object the repository now holds. Callers
    /// must have proved that: the repository never deletes on its own.
    pub async fn remove(&self, key: &str) -> Result<(), RepositoryError> {
        self.storage
            .delete(key)
            .await
            .map_err(|error| self.failed(&format!("removing {key}"), error))
    }

    /// Writes the marker `kind`/`name` (create-only, sealed like every object) saying that this
    /// process has begun that work now.
    pub async fn put_marker(
        &self,
        kind: layout::MarkerKind,
        name: &str,
    ) -> Result<MarkerRecord, RepositoryError> {
        let record = MarkerRecord::now();
        let bytes = serde_json::to_vec(&record).expect("a marker always serializes");
        self.put_bytes(
            &layout::marker(kind, name),
            Bytes::from(bytes),
            &EncodeOptions::default(),
        )
        .await?;
        Ok(record)
    }

    /// Every marker of `kind`, by name, read and verified.
    pub async fn markers(
        &self,
        kind: layout::MarkerKind,
    ) -> Result<Vec<(String, MarkerRecord)>, RepositoryError> {
        let mut markers = Vec::new();
        for object in self.list(&layout::markers(kind)).await? {
            let Some(layout::ObjectKey::Marker(_, name)) = layout::ObjectKey::parse(&object.key)
            else {
                continue;
            };
            let Some(bytes) = self.read_bytes(&object.key).await? else {
                continue;
            };
            let record =
                serde_json::from_slice(&bytes).map_err(|error| RepositoryError::Corrupt {
                    url: self.url.clone(),
                    detail: format!("the marker {} is not valid: {error}; delete it", object.key),
                })?;
            markers.push((name, record));
        }
        Ok(markers)
    }

    /// The markers of `kind` younger than its `max_age`: work that is still running. Older
    /// ones are left by crashed processes; each is named in a warning.
    pub async fn live_markers(
        &self,
        kind: layout::MarkerKind,
    ) -> Result<Vec<(String, MarkerRecord)>, RepositoryError> {
        let now = chrono::Utc::now();
        let mut live = Vec::new();
        for (name, record) in self.markers(kind).await? {
            if (now - record.started).to_std().unwrap_or_default() < kind.max_age() {
                live.push((name, record));
            } else {
                tracing::warn!(
                    "ignoring {}, older than {} s: the process that wrote it has crashed; delete it",
                    layout::marker(kind, &name),
                    kind.max_age().as_secs()
                );
            }
        }
        Ok(live)
    }

    pub async fn remove_marker(
        &self,
        kind: layout::MarkerKind,
        name: &str,
    ) -> Result<(), RepositoryError> {
        self.remove(&layout::marker(kind, name)).await
    }

    /// Seals `bytes` and stores them at `key` in place of what is there, which must still be
    /// the version `head` finds now (or nothing): for the one object pitr rewrites, the
    /// verify results. `Precondition` (as `RepositoryError::Store`) when another writer won.
    pub async fn replace_bytes(&self, key: &str, bytes: Bytes) -> Result<(), RepositoryError> {
        let (key_owned, keyring) = (key.to_string(), self.keyring.clone());
        let (_, parts) = tokio::task::spawn_blocking(move || {
            envelope::encode_bytes(
                &bytes,
                &key_owned,
                keyring.as_ref(),
                &EncodeOptions::default(),
            )
        })
        .await
        .expect("the encoding task does not panic")
        .map_err(RepositoryError::Envelope)?;
        let written = match self.storage.head(key).await {
            Ok(info) => self.storage.update(key, parts, &info.version).await,
            Err(StorageError::NotFound) => match self
                .storage
                .put_create(key, parts, Durability::Immediate)
                .await
            {
                Ok(PutOutcome::Created) => Ok(()),
                Ok(PutOutcome::AlreadyExists) => Err(StorageError::Precondition(
                    "created by another writer meanwhile".to_string(),
                )),
                Err(error) => Err(error),
            },
            Err(error) => Err(error),
        };
        written.map_err(|error| self.failed(&format!("replacing {key}"), error))
    }

    /// Removes every key in `keys` (see `remove`), as few requests as the store allows.
    pub async fn remove_many(&self, keys: Vec<String>) -> Result<(), RepositoryError> {
        if keys.is_empty() {
            return Ok(());
        }
        let count = keys.len();
        self.storage
            .delete_many(keys)
            .await
            .map_err(|error| self.failed(&format!("removing {count} objects"), error))
    }

    /// Proves a stored object intact without decoding it into anything; `None` if it does not
    /// exist. See `envelope::authenticate`. On `file://` it is also made durable, since a
    /// writer killed between its write and its fsync may have left it in the page cache only.
    pub async fn authenticate_object(&self, key: &str) -> Result<Option<Header>, RepositoryError> {
        self.require_identity().await?;
        let Some(bytes) = self.get_bytes(key).await? else {
            return Ok(None);
        };
        self.storage
            .make_durable(key)
            .await
            .map_err(|error| self.failed(&format!("syncing {key}"), error))?;
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
    /// flipped bit, an object planted in the bucket). The new object is complete and durable
    /// before it is visible, and replaces the damaged one only if that is still the version
    /// read here (`Storage::update`: on `file://` a rename over it, elsewhere a write
    /// conditional on its ETag). `false` if it changed meanwhile and now verifies (another
    /// writer fixed it first): the caller then compares as for any stored object.
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
        self.replace_damaged_with(key, parts).await
    }

    /// `replace_damaged` with an object already encoded (the outage spool's copy, which the
    /// caller has authenticated). The update is conditional on the version of the very read
    /// whose bytes failed verification here, so a concurrent replacement (a valid object by
    /// now) is never overwritten.
    pub async fn replace_damaged_with(
        &self,
        key: &str,
        parts: Vec<Bytes>,
    ) -> Result<bool, RepositoryError> {
        let (bytes, version) = match self.storage.get_bytes_versioned(key).await {
            Ok(read) => read,
            Err(StorageError::NotFound) => return Ok(false),
            Err(error) => return Err(self.failed(&format!("reading {key}"), error)),
        };
        if !self.is_damaged(key, bytes).await? {
            return Ok(false);
        }
        match self.storage.update(key, parts, &version).await {
            Ok(()) => Ok(true),
            Err(StorageError::Precondition(_)) => Ok(false),
            Err(error) => Err(self.failed(&format!("replacing {key}"), error)),
        }
    }

    /// Whether `bytes`, read from `key`, fail verification as a damaged object; an error for
    /// any other failure (an unknown key, a newer format), which must not be replaced.
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
        // A failing random source is an error, never a fixed name two processes would share.
        let suffix = getrandom::u64().map_err(|error| {
            RepositoryError::Config(format!(
                "the operating system's random source failed ({error}); check the system"
            ))
        })?;
        let key = layout::temporary(&format!("create-only-probe-{suffix:016x}"));
        let outcomes = (
            self.put_raw(&key, vec![Bytes::from_static(b"first")]).await,
            self.put_raw(&key, vec![Bytes::from_static(b"second")])
                .await,
        );
        let _ = self.storage.delete(&key).await;
        match outcomes {
            (Ok(PutOutcome::Created), Ok(PutOutcome::AlreadyExists)) => Ok(()),
            (Ok(_), Ok(_)) => Err(RepositoryError::Overwrites(self.url.clone())),
            (Err(error), _) | (_, Err(error)) => Err(error),
        }
    }

    /// Proves that the store refuses a conditional update of a version that is no longer
    /// there, and makes one that is: what the writer lease relies on. A probe object under
    /// `tmp/` is written, updated once at its version, updated again at the stale version (which
    /// must fail), and removed.
    pub async fn probe_conditional_update(&self) -> Result<(), RepositoryError> {
        let suffix = getrandom::u64().map_err(|error| {
            RepositoryError::Config(format!(
                "the operating system's random source failed ({error}); check the system"
            ))
        })?;
        let key = layout::temporary(&format!("conditional-update-probe-{suffix:016x}"));
        let result = async {
            self.put_raw(&key, vec![Bytes::from_static(b"first")]).await?;
            let (_, first) = self
                .storage
                .get_bytes_versioned(&key)
                .await
                .map_err(|error| self.failed(&format!("reading {key}"), error))?;
            self.storage
                .update(&key, vec![Bytes::from_static(b"second")], &first)
                .await
                .map_err(|error| self.failed(&format!("updating {key}"), error))?;
            match self
                .storage
                .update(&key, vec![Bytes::from_static(b"third")], &first)
                .await
            {
                Err(StorageError::Precondition(_)) => Ok(()),
                Ok(()) => Err(RepositoryError::Store {
                    url: self.url.clone(),
                    detail: "the store replaced an object although its version had changed (a conditional update was not honoured); the writer lease cannot rely on it: use a store that supports If-Match".to_string(),
                }),
                Err(error) => Err(self.failed(&format!("updating {key}"), error)),
            }
        }
        .await;
        let _ = self.storage.delete(&key).await;
        result
    }

    /// Reads and verifies a small object into memory; `None` if it does not exist.
    pub async fn read_bytes(&self, key: &str) -> Result<Option<Vec<u8>>, RepositoryError> {
        Ok(self
            .read_object(key, Vec::new(), DecodeMode::Alone)
            .await?
            .map(|(_, bytes)| bytes))
    }

    /// An object as stored (its envelope), authenticated but not decoded, to store elsewhere
    /// as it is (the outage spool's objects, moved into the repository); `None` if absent.
    /// Objects are whole segments at most, so memory stays bounded.
    pub async fn read_encoded(
        &self,
        key: &str,
    ) -> Result<Option<(Header, Bytes)>, RepositoryError> {
        self.require_identity().await?;
        let Some(bytes) = self.get_bytes(key).await? else {
            return Ok(None);
        };
        let (key_owned, keyring, object) = (key.to_string(), self.keyring.clone(), bytes.clone());
        let header = tokio::task::spawn_blocking(move || {
            envelope::authenticate(&object[..], &key_owned, keyring.as_ref())
        })
        .await
        .expect("the verification task does not panic")
        .map_err(RepositoryError::Envelope)?;
        Ok(Some((header, bytes)))
    }

    /// Stores already-encoded bytes create-only, and makes them durable.
    async fn put_raw(&self, key: &str, parts: Vec<Bytes>) -> Result<PutOutcome, RepositoryError> {
        self.put_raw_with(key, parts, Durability::Immediate).await
    }

    async fn put_raw_with(
        &self,
        key: &str,
        parts: Vec<Bytes>,
        durability: Durability,
    ) -> Result<PutOutcome, RepositoryError> {
        self.storage
            .put_create(key, parts, durability)
            .await
            .map_err(|error| self.failed(&format!("writing {key}"), error))
    }

    /// Reads, verifies and decodes the object at `key` into `sink`. `None` if there is no
    /// such object. Memory stays at a few chunks, the body streaming from the store to the
    /// sink, except that `DecodeMode::Concurrent` may decode a local segment in one pooled
    /// buffer; a remote body is always decoded `Alone`.
    pub async fn read_object<W: Write + Send + 'static>(
        &self,
        key: &str,
        sink: W,
        mode: DecodeMode,
    ) -> Result<Option<(Header, W)>, RepositoryError> {
        // The identity, not the object, decides whether objects must be encrypted: a process
        // whose keyring disagrees with it reads nothing, or a missing keyring would make a
        // planted unencrypted object acceptable. Cached after the first check.
        self.require_identity().await?;
        let body = match self.storage.get(key).await {
            Ok(body) => body,
            Err(StorageError::NotFound) => return Ok(None),
            Err(error) => return Err(self.failed(&format!("reading {key}"), error)),
        };
        // A local object is decoded straight from its file; a remote body streams in through
        // a bounded queue, so memory stays at a few chunks either way.
        let (source, pump, mode): (Box<dyn Read + Send>, _, _) = match body {
            // Unbuffered: the envelope reads whole sealed chunks, straight into their buffers.
            Body::File(file) => (Box::new(file), None, mode),
            Body::Stream(body) => {
                let (reader, pump) = bridge(body);
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

    async fn get_bytes(&self, key: &str) -> Result<Option<Bytes>, RepositoryError> {
        match self.storage.get_bytes(key).await {
            Ok(bytes) => Ok(Some(bytes)),
            Err(StorageError::NotFound) => Ok(None),
            Err(error) => Err(self.failed(&format!("reading {key}"), error)),
        }
    }

    /// Every object under `prefix`, sorted by key.
    pub async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, RepositoryError> {
        self.storage
            .list(prefix)
            .await
            .map_err(|error| self.failed(&format!("listing {prefix}"), error))
    }

    /// Every WAL file archived under `prefix` (`layout::WAL_PREFIX` or one timeline's
    /// `layout::wal_timeline`), in key order; objects the layout does not name are skipped.
    pub async fn list_wal(&self, prefix: &str) -> Result<Vec<WalFileName>, RepositoryError> {
        Ok(self
            .list(prefix)
            .await?
            .iter()
            .filter_map(|object| layout::ObjectKey::wal_file(&object.key))
            .collect())
    }

    /// The key of a listed object, relative to the repository prefix.
    pub fn relative_key<'a>(&self, meta: &'a ObjectInfo) -> &'a str {
        &meta.key
    }
}

/// Feeds an async body stream to a blocking reader. The store ends a stalled stream with an
/// error (see `Storage::get`), which the reader returns.
fn bridge(
    mut body: futures::stream::BoxStream<'static, storage::StorageResult<Bytes>>,
) -> (ChannelReader, tokio::task::JoinHandle<()>) {
    let (sender, receiver) = tokio::sync::mpsc::channel::<io::Result<Bytes>>(4);
    let pump = tokio::spawn(async move {
        while let Some(item) = body.next().await {
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
    fn from_storage(url: &str, what: &str, error: StorageError) -> Self {
        let url = url.to_string();
        match error {
            StorageError::NotFound => RepositoryError::NotFound,
            StorageError::Denied(detail) => RepositoryError::Denied {
                url,
                detail: format!("{what} was refused: {detail}"),
            },
            StorageError::Unreachable(detail) => RepositoryError::Unreachable {
                url,
                detail: format!("{what} failed: {detail}"),
            },
            StorageError::TimedOut(after) => RepositoryError::Unreachable {
                url,
                detail: format!("{what} did not finish within {} s", after.as_secs()),
            },
            sync @ StorageError::Sync { .. } => RepositoryError::Io {
                url,
                detail: sync.to_string(),
            },
            other @ (StorageError::AlreadyExists
            | StorageError::Precondition(_)
            | StorageError::Unsupported(_)) => RepositoryError::Store {
                url,
                detail: format!("{what} failed: {other}"),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::{SegmentName, TimelineId};

    fn identity() -> Identity {
        Identity::new(
            SystemIdentifier(7_300_000_000_000_000_001),
            PgVersion(15),
            WalSegmentSize(16 << 20),
            None,
        )
    }

    /// The in-memory store carries a whole repository: identity, envelopes, the layout.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_repository_in_memory_keeps_identity_objects_and_listing() {
        let repository = Repository::in_memory(None);
        assert!(repository.read_identity().await.unwrap().is_none());
        repository.ensure_identity(&identity()).await.unwrap();
        assert_eq!(
            repository
                .require_identity()
                .await
                .unwrap()
                .system_identifier,
            identity().system_identifier
        );
        let segment = SegmentName {
            timeline: TimelineId(1),
            log_id: 0,
            segment: 3,
        };
        let key = Repository::wal_key(&WalFileName::Segment(segment));
        let options = EncodeOptions::default();
        let body = Bytes::from_static(b"not really WAL");
        let first = repository.put_bytes(&key, body.clone(), &options).await;
        assert_eq!(first.unwrap(), PutOutcome::Created);
        let second = repository.put_bytes(&key, body.clone(), &options).await;
        assert_eq!(second.unwrap(), PutOutcome::AlreadyExists);
        assert_eq!(repository.read_bytes(&key).await.unwrap().unwrap(), body);
        assert_eq!(
            repository.list_wal(WAL_PREFIX).await.unwrap(),
            [WalFileName::Segment(segment)]
        );
        // The create-only probe cleaned up after itself.
        assert!(
            repository
                .list(layout::TEMPORARY_PREFIX)
                .await
                .unwrap()
                .is_empty()
        );
    }
}

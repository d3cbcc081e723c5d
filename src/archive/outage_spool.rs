//! The outage spool: where archive-push keeps WAL while the repository cannot be reached.
//!
//! It is optional (`PITR_OUTAGE_SPOOL`, a directory that should be on another volume than
//! `pg_wal`, so that one outage does not fill both). When a push fails because the store is
//! unreachable or stalls, the file is encoded exactly as the repository would store it (the same
//! envelope: compressed, encrypted, checksummed, its key in the header) and stored here under the
//! same key. The spool is itself a repository: a local `file://` store with the same layout,
//! written and read through the same storage contract (create-only and durable before it is
//! acknowledged, verified on every read), so it has no file code of its own. Only once the
//! spooled copy is durable does archive-push exit 0, so Postgres may recycle the segment: the
//! spooled copy is what keeps it. The spool is bounded
//! (`PITR_OUTAGE_SPOOL_MAX_MB`); past the cap archive-push fails as it would without a spool,
//! and Postgres keeps the WAL in `pg_wal`.
//!
//! The daemon drains the spool into the repository whenever the store answers again (without
//! a daemon, every archive-push that reaches the store drains a few objects). Each object is
//! verified, written create-only, and removed only once the repository holds the same content
//! durably. archive-get falls back to the spool for a file the repository does not hold yet.
//! A hook cannot ask an unreachable store for the repository's identity, so the spool keeps a
//! copy of it as its own identity object (with the repository's URL), written while the store
//! answered: a hook checks the cluster and the keyring against that copy, and with no copy it
//! does not spool.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;
use serde::Serialize;

use crate::config::Settings;
use crate::envelope::{self, ContentSummary, DecodeMode};
use crate::keyring::Keyring;
use crate::repository::layout;
use crate::repository::{PutOutcome, Repository, RepositoryError, WAL_PREFIX};
use crate::wal::WalFileName;

/// The outage spool named in the settings.
#[derive(Clone)]
pub struct OutageSpool {
    directory: PathBuf,
    /// The spool itself: a repository in `directory`, with the main repository's keyring and,
    /// once known, its identity.
    spool: Arc<Repository>,
    max_bytes: u64,
    /// Set once this process has checked or written the identity copy: a repository's identity
    /// never changes, so the daemon's pushes need not read the copy again each time.
    identity_remembered: Arc<OnceLock<()>>,
    /// What the spool held when last listed (`refresh_usage`), for status and metrics.
    last_usage: Arc<Mutex<SpoolUsage>>,
}

/// What the spool holds now.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SpoolUsage {
    pub directory: String,
    pub objects: usize,
    pub bytes: u64,
    pub max_bytes: u64,
    pub oldest: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error(
        "the store is unreachable and the outage spool {directory} is full ({used} of {max} MiB); Postgres keeps the WAL and retries: restore the store, or raise PITR_OUTAGE_SPOOL_MAX_MB"
    )]
    Full {
        directory: String,
        used: u64,
        max: u64,
    },
    #[error(
        "the store is unreachable and the outage spool {0} has no copy of the repository's identity yet (it is written while the store answers), so {1} was not spooled; Postgres keeps the WAL and retries"
    )]
    NoIdentity(String, String),
    #[error(
        "{name} is already in the outage spool {directory} with different content (spooled checksum {spooled}, this file {this}); the spooled copy was left untouched"
    )]
    Different {
        name: String,
        directory: String,
        spooled: String,
        this: String,
    },
    #[error("the outage spool {directory}: {detail}; free space or fix the volume holding it")]
    Io { directory: String, detail: String },
}

impl OutageSpool {
    /// The outage spool `settings` name, for the repository whose keyring is `keyring`; `None`
    /// without one. Its directory is created if missing.
    pub fn open(
        settings: &Settings,
        keyring: Option<&Keyring>,
    ) -> Result<Option<Self>, SpoolError> {
        let Some(directory) = &settings.outage_spool else {
            return Ok(None);
        };
        let spool = Repository::open_local(directory, keyring.cloned(), settings.store_timeout)
            .map_err(|error| SpoolError::Io {
                directory: directory.display().to_string(),
                detail: format!("cannot open it: {error}"),
            })?;
        Ok(Some(OutageSpool {
            directory: directory.clone(),
            spool: Arc::new(spool),
            max_bytes: settings.outage_spool_max_bytes,
            identity_remembered: Arc::default(),
            last_usage: Arc::new(Mutex::new(SpoolUsage {
                directory: directory.display().to_string(),
                max_bytes: settings.outage_spool_max_bytes,
                ..SpoolUsage::default()
            })),
        }))
    }

    fn io_error(&self, detail: impl std::fmt::Display) -> SpoolError {
        SpoolError::Io {
            directory: self.directory.display().to_string(),
            detail: detail.to_string(),
        }
    }

    /// Keeps the identity `repository` has read from the store, for hooks during an outage
    /// (`Repository::keep_identity_in`), once per process: it never changes.
    pub async fn remember_identity(&self, repository: &Repository) {
        if self.identity_remembered.get().is_some() || repository.known_identity().is_none() {
            return;
        }
        match repository.keep_identity_in(&self.spool).await {
            Ok(()) => {
                let _ = self.identity_remembered.set(());
            }
            Err(error) => {
                tracing::warn!(spool = %self.directory.display(), "cannot keep the repository identity in the outage spool: {error}")
            }
        }
    }

    /// Makes `repository` use the identity copy, after the same checks as one read from the
    /// store (the keyring must match). Fails if there is no usable copy for this URL.
    pub async fn adopt_identity(
        &self,
        repository: &Repository,
        name: &str,
    ) -> Result<(), SpoolError> {
        let adopted = repository
            .adopt_identity_from(&self.spool)
            .await
            .map_err(|error| self.io_error(error))?;
        if adopted {
            return Ok(());
        }
        Err(SpoolError::NoIdentity(
            self.directory.display().to_string(),
            name.to_string(),
        ))
    }

    /// Stores an encoded object under its repository key, durably and never over another.
    /// An object already spooled under that key is accepted if it holds the same content.
    /// `repository`'s identity must be known: the spool's copy of it is written first.
    pub async fn store(
        &self,
        key: &str,
        object: Vec<Bytes>,
        content: &ContentSummary,
        repository: &Repository,
    ) -> Result<(), SpoolError> {
        self.remember_identity(repository).await;
        if self.spool.exists_locally(key) {
            return self.compare(key, content).await;
        }
        let size: u64 = object.iter().map(|part| part.len() as u64).sum();
        let used = self.refresh_usage().await?.bytes;
        if used + size > self.max_bytes {
            return Err(SpoolError::Full {
                directory: self.directory.display().to_string(),
                used: used >> 20,
                max: self.max_bytes >> 20,
            });
        }
        match self.spool.put_encoded(key, object).await {
            Ok(PutOutcome::Created) => Ok(()),
            Ok(PutOutcome::AlreadyExists) => self.compare(key, content).await,
            Err(error) => Err(self.io_error(format!("writing {key} failed: {error}"))),
        }
    }

    async fn compare(&self, key: &str, content: &ContentSummary) -> Result<(), SpoolError> {
        let header = self
            .spool
            .authenticate_object(key)
            .await
            .map_err(|error| self.io_error(error))?
            .ok_or_else(|| self.io_error(format!("{key} vanished while it was compared")))?;
        let spooled = if header.content.checksum.algorithm() == content.checksum.algorithm() {
            header.content
        } else {
            self.summarize(key, content.checksum.algorithm()).await?
        };
        if spooled == *content {
            return Ok(());
        }
        Err(SpoolError::Different {
            name: file_name_of(key),
            directory: self.directory.display().to_string(),
            spooled: spooled.checksum.to_string(),
            this: content.checksum.to_string(),
        })
    }

    /// The plaintext summary of a spooled object in `algorithm`: for an object spooled by an
    /// older pitr, whose header carries another checksum algorithm than this pitr computes.
    async fn summarize(
        &self,
        key: &str,
        algorithm: envelope::ChecksumAlgorithm,
    ) -> Result<ContentSummary, SpoolError> {
        let sink = envelope::SummarySink::new(algorithm);
        let (_, sink) = self
            .spool
            .read_object(key, sink, DecodeMode::Alone)
            .await
            .map_err(|error| self.io_error(error))?
            .ok_or_else(|| self.io_error(format!("{key} vanished while it was compared")))?;
        Ok(sink.summary())
    }

    /// Whether the spool holds `name`, waiting for the repository.
    pub fn holds(&self, name: &WalFileName) -> bool {
        self.spool.exists_locally(&layout::wal(name))
    }

    /// The spool as a repository, to read a spooled file from as from the main one; its
    /// identity is the main repository's once `adopt_identity` or `remember_identity` ran.
    pub fn repository(&self) -> &Repository {
        &self.spool
    }

    /// The spooled WAL files, histories first, then in WAL order, the order Postgres archived
    /// them; with their sizes.
    async fn objects(&self) -> Result<Vec<(WalFileName, u64)>, SpoolError> {
        let listed = self
            .spool
            .list(WAL_PREFIX)
            .await
            .map_err(|error| self.io_error(error))?;
        let mut objects: Vec<(WalFileName, u64)> = listed
            .iter()
            .filter_map(|object| {
                layout::ObjectKey::wal_file(&object.key).map(|name| (name, object.size))
            })
            .collect();
        objects
            .sort_by_key(|(name, _)| (!matches!(name, WalFileName::History(_)), name.to_string()));
        Ok(objects)
    }

    /// What the spool held when it was last listed; see `refresh_usage`.
    pub fn usage(&self) -> SpoolUsage {
        self.last_usage.lock().unwrap().clone()
    }

    /// Lists the spool and returns what it holds now (also for `usage`).
    pub async fn refresh_usage(&self) -> Result<SpoolUsage, SpoolError> {
        let objects = self.objects().await?;
        let usage = SpoolUsage {
            directory: self.directory.display().to_string(),
            objects: objects.len(),
            bytes: objects.iter().map(|(_, size)| size).sum(),
            max_bytes: self.max_bytes,
            oldest: objects.first().map(|(name, _)| name.to_string()),
        };
        *self.last_usage.lock().unwrap() = usage.clone();
        Ok(usage)
    }

    /// Moves up to `limit` spooled objects into the repository; returns how many. Stops at the
    /// first that fails: the store is likely still down, and the rest waits for the next try.
    pub async fn drain(&self, repository: &Repository, limit: usize) -> anyhow::Result<usize> {
        let mut moved = 0;
        let objects = self.objects().await?;
        if !objects.is_empty() {
            // The spool reads its objects as the repository's: with the repository's identity.
            repository.require_identity().await?;
            self.remember_identity(repository).await;
        }
        for (name, _) in objects.into_iter().take(limit) {
            self.move_to_repository(&name, repository).await?;
            moved += 1;
        }
        self.refresh_usage().await?;
        Ok(moved)
    }

    async fn move_to_repository(
        &self,
        name: &WalFileName,
        repository: &Repository,
    ) -> anyhow::Result<()> {
        let key = layout::wal(name);
        let kept = |error: &dyn std::fmt::Display| {
            anyhow::anyhow!(
                "the spooled copy of {key} in {} cannot be verified ({error}); it was kept: it may be the only copy of that WAL",
                self.directory.display()
            )
        };
        let (header, bytes) = match self.spool.read_encoded(&key).await {
            Ok(Some(read)) => read,
            Ok(None) => return Ok(()),
            Err(error) => return Err(kept(&error)),
        };
        if repository.put_encoded(&key, vec![bytes.clone()]).await? == PutOutcome::AlreadyExists {
            let stored = match repository.authenticate_object(&key).await {
                // A torn or planted object under this name must not keep the spool full for
                // ever: the spooled copy, just authenticated, takes its place.
                Err(RepositoryError::Envelope(error)) if error.is_damaged_object() => {
                    tracing::warn!(
                        key,
                        "the stored copy failed verification ({error}); replacing it with the spooled copy"
                    );
                    if repository.replace_damaged_with(&key, vec![bytes]).await? {
                        Some(header.clone())
                    } else {
                        repository.authenticate_object(&key).await?
                    }
                }
                other => other?,
            };
            if stored.as_ref().map(|stored| &stored.content) != Some(&header.content) {
                anyhow::bail!(
                    "{key} is in the repository with other content than its spooled copy in {}; the spooled copy was kept. Another cluster or a diverged timeline may be archiving into this repository: find out which",
                    self.directory.display()
                );
            }
        }
        self.spool.remove(&key).await?;
        tracing::info!(key, "moved from the outage spool into the repository");
        Ok(())
    }
}

/// The WAL file name a spooled object's key names, as the repository's layout parses it.
fn file_name_of(key: &str) -> String {
    layout::ObjectKey::wal_file(key).map_or_else(|| key.to_string(), |name| name.to_string())
}

/// Whether a failed push should go to the spool: the store could not be reached in time.
/// Refusals (another cluster, the wrong keyring, different content) never do.
pub fn is_outage(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<RepositoryError>(),
            Some(RepositoryError::Unreachable { .. })
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::GlobalOptions;
    use std::path::Path;
    use std::time::Duration;

    const MIB: usize = 1 << 20;

    /// A spool beside a repository whose identity is known, as after a push that reached it.
    async fn spool_and_repository(root: &Path, max_bytes: u64) -> (OutageSpool, Repository) {
        let options = GlobalOptions {
            repo: Some(format!("file://{}", root.join("repo").display())),
            ..Default::default()
        };
        let mut settings = Settings::resolve(&options).unwrap();
        settings.outage_spool = Some(root.join("spool"));
        settings.outage_spool_max_bytes = max_bytes;
        let repository = Repository::open(&settings).unwrap();
        let identity = crate::repository::Identity::new(
            crate::wal::SystemIdentifier(7),
            crate::wal::PgVersion(15),
            crate::wal::WalSegmentSize(16 << 20),
            None,
        );
        repository.ensure_identity(&identity).await.unwrap();
        let spool = OutageSpool::open(&settings, None).unwrap().unwrap();
        (spool, repository)
    }

    fn object_of(length: usize, fill: u8) -> (Vec<Bytes>, ContentSummary) {
        let bytes = vec![fill; length];
        let content = ContentSummary::of_bytes(&bytes);
        (vec![Bytes::from(bytes)], content)
    }

    #[tokio::test]
    async fn an_object_spooled_by_an_older_pitr_is_compared_by_its_plaintext() {
        let root = tempfile::tempdir().unwrap();
        let (spool, repository) = spool_and_repository(root.path(), 64 * MIB as u64).await;
        let key = "wal/00000001/000000010000000000000001";
        let plaintext = vec![5u8; MIB];
        // A v1 object (BLAKE3 checksum), as pitr wrote before format v2.
        let old_content =
            ContentSummary::of_bytes_in(&plaintext, envelope::ChecksumAlgorithm::Blake3);
        let old_object = envelope::encode(
            &plaintext[..],
            old_content,
            key,
            None,
            &envelope::EncodeOptions::default(),
            Vec::new(),
        )
        .unwrap();
        spool
            .store(
                key,
                vec![Bytes::from(old_object)],
                &old_content,
                &repository,
            )
            .await
            .unwrap();
        // The same segment pushed again by this pitr, which summarizes it in XXH3.
        let (object, content) = encoded(&plaintext, key, &repository);
        assert_ne!(
            content.checksum.algorithm(),
            old_content.checksum.algorithm()
        );
        spool
            .store(key, object, &content, &repository)
            .await
            .unwrap();
        // A different segment under that name is still refused.
        let mut different = plaintext.clone();
        different[100] = 6;
        let (object, content) = encoded(&different, key, &repository);
        let error = spool
            .store(key, object, &content, &repository)
            .await
            .unwrap_err();
        assert!(
            matches!(error, SpoolError::Different { .. }),
            "a different file is refused: {error}"
        );
    }

    fn encoded(
        plaintext: &[u8],
        name: &str,
        repository: &Repository,
    ) -> (Vec<Bytes>, ContentSummary) {
        let (content, parts) = envelope::encode_bytes(
            plaintext,
            name,
            repository.keyring(),
            &envelope::EncodeOptions::default(),
        )
        .unwrap();
        (parts, content)
    }

    #[tokio::test]
    async fn a_full_spool_refuses_the_next_object_and_writes_nothing_of_it() {
        let root = tempfile::tempdir().unwrap();
        let (spool, repository) = spool_and_repository(root.path(), 3 * MIB as u64).await;
        let (first, first_content) = object_of(2 * MIB, 1);
        spool
            .store(
                "wal/00000001/000000010000000000000001",
                first,
                &first_content,
                &repository,
            )
            .await
            .unwrap();
        let (second, second_content) = object_of(2 * MIB, 2);
        let error = spool
            .store(
                "wal/00000001/000000010000000000000002",
                second,
                &second_content,
                &repository,
            )
            .await
            .unwrap_err();
        assert_eq!(
            error.to_string(),
            format!(
                "the store is unreachable and the outage spool {} is full (2 of 3 MiB); Postgres keeps the WAL and retries: restore the store, or raise PITR_OUTAGE_SPOOL_MAX_MB",
                spool.directory.display()
            )
        );
        let entries: Vec<_> = std::fs::read_dir(spool.directory.join("wal/00000001"))
            .unwrap()
            .map(|entry| entry.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(entries, ["000000010000000000000001"]);
        let usage = spool.refresh_usage().await.unwrap();
        assert_eq!((usage.objects, usage.bytes), (1, 2 * MIB as u64));
        assert_eq!(usage.oldest.as_deref(), Some("000000010000000000000001"));
    }

    /// The spool is a repository of its own with the main one's layout and identity: what a
    /// hook spools can be listed, verified and read back through the repository code alone,
    /// and a hook that cannot reach the store takes the identity from the spool's copy, but
    /// only for the repository that copy came from.
    #[tokio::test]
    async fn the_spool_is_a_repository_with_the_same_layout_and_identity() {
        let root = tempfile::tempdir().unwrap();
        let (spool, repository) = spool_and_repository(root.path(), 64 * MIB as u64).await;
        let name: WalFileName = "000000010000000000000003".parse().unwrap();
        let key = layout::wal(&name);
        let plaintext = vec![9u8; MIB];
        let (object, content) = encoded(&plaintext, &key, &repository);
        spool
            .store(&key, object, &content, &repository)
            .await
            .unwrap();
        assert!(spool.holds(&name));

        let reopened =
            Repository::open_local(&root.path().join("spool"), None, Duration::from_secs(5))
                .unwrap();
        assert_eq!(
            reopened.require_identity().await.unwrap(),
            repository.require_identity().await.unwrap()
        );
        assert_eq!(reopened.list_wal(WAL_PREFIX).await.unwrap(), vec![name]);
        assert_eq!(reopened.read_bytes(&key).await.unwrap(), Some(plaintext));

        // A later process that cannot reach the store adopts the spool's copy of the identity.
        let mut settings = Settings::resolve(&GlobalOptions {
            repo: Some(format!("file://{}", root.path().join("repo").display())),
            ..Default::default()
        })
        .unwrap();
        settings.outage_spool = Some(root.path().join("spool"));
        let later = Repository::open(&settings).unwrap();
        let later_spool = OutageSpool::open(&settings, None).unwrap().unwrap();
        later_spool.adopt_identity(&later, "x").await.unwrap();
        assert_eq!(later.known_identity(), repository.known_identity());

        // Another repository's hooks find no copy for them there.
        settings.repo = Some(format!("file://{}", root.path().join("other").display()));
        let other = Repository::open(&settings).unwrap();
        let error = later_spool
            .adopt_identity(&other, "000000010000000000000004")
            .await
            .unwrap_err();
        assert!(matches!(error, SpoolError::NoIdentity(..)), "{error}");
        assert!(other.known_identity().is_none());
    }
}

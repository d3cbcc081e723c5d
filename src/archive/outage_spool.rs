//! The outage spool: where archive-push keeps WAL while the repository cannot be reached.
//!
//! It is optional (`PITR_OUTAGE_SPOOL`, a directory that should be on another volume than
//! `pg_wal`, so that one outage does not fill both). When a push fails because the store is
//! unreachable or stalls, the file is encoded exactly as the repository would store it (the same
//! envelope: compressed, encrypted, checksummed, its key in the header) and written here
//! durably: a temporary file, fsync, a link to the final name that never replaces an existing
//! one, then fsyncs of the directories. Only then does archive-push exit 0, so Postgres may
//! recycle the segment: the spooled copy is what keeps it. The spool is bounded
//! (`PITR_OUTAGE_SPOOL_MAX_MB`); past the cap archive-push fails as it would without a spool,
//! and Postgres keeps the WAL in `pg_wal`.
//!
//! The daemon drains the spool into the repository whenever the store answers again (without
//! a daemon, every archive-push that reaches the store drains a few objects). Each object is
//! verified, written create-only, and removed only once the repository holds the same content
//! durably. archive-get falls back to the spool for a file the repository does not hold yet.
//! A hook cannot ask an unreachable store for the repository's identity, so the spool keeps a
//! copy of it, written while the store answered: a hook checks the cluster and the keyring
//! against that copy, and with no copy it does not spool.

use std::io;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use serde::Serialize;

use crate::config::Settings;
use crate::envelope::{self, ContentSummary, Header};
use crate::repository::layout;
use crate::repository::{PutOutcome, Repository, RepositoryError};

const IDENTITY_COPY: &str = "pitr.identity";

/// The outage spool named in the settings.
#[derive(Clone)]
pub struct OutageSpool {
    directory: PathBuf,
    max_bytes: u64,
    /// Set once this process has checked or written the identity copy: a repository's identity
    /// never changes, so the daemon's pushes need not read the copy again each time.
    identity_remembered: std::sync::OnceLock<()>,
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

/// A spooled object: its repository key and where it lies.
struct SpooledObject {
    key: String,
    path: PathBuf,
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
    pub fn open(settings: &Settings) -> Option<Self> {
        settings.outage_spool.as_ref().map(|directory| OutageSpool {
            directory: directory.clone(),
            max_bytes: settings.outage_spool_max_bytes,
            identity_remembered: std::sync::OnceLock::new(),
        })
    }

    fn io_error(&self, detail: String) -> SpoolError {
        SpoolError::Io {
            directory: self.directory.display().to_string(),
            detail,
        }
    }

    /// Keeps the identity `repository` has read from the store, for hooks during an outage
    /// (`Repository::keep_identity_copy`), once per process: it never changes.
    pub fn remember_identity(&self, repository: &Repository) {
        if self.identity_remembered.get().is_some() {
            return;
        }
        if repository.keep_identity_copy(&self.directory.join(IDENTITY_COPY)) {
            let _ = self.identity_remembered.set(());
        } else if repository.known_identity().is_some() {
            tracing::warn!(spool = %self.directory.display(), "cannot keep the repository identity in the outage spool");
        }
    }

    /// Makes `repository` use the identity copy, after the same checks as one read from the
    /// store (the keyring must match). Fails if there is no usable copy for this URL.
    pub fn adopt_identity(&self, repository: &Repository, name: &str) -> Result<(), SpoolError> {
        let adopted = repository
            .adopt_identity_copy(&self.directory.join(IDENTITY_COPY))
            .map_err(|error| self.io_error(error.to_string()))?;
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
    pub fn store(
        &self,
        key: &str,
        object: &[Bytes],
        content: &ContentSummary,
        repository: &Repository,
    ) -> Result<(), SpoolError> {
        let destination = self.directory.join(key);
        if destination.exists() {
            return self.compare(&destination, key, content, repository);
        }
        let size: u64 = object.iter().map(|part| part.len() as u64).sum();
        let used = self.usage().bytes;
        if used + size > self.max_bytes {
            return Err(SpoolError::Full {
                directory: self.directory.display().to_string(),
                used: used >> 20,
                max: self.max_bytes >> 20,
            });
        }
        match self.write_new(&destination, object) {
            Ok(()) => Ok(()),
            Err(error) if error.kind() == io::ErrorKind::AlreadyExists => {
                self.compare(&destination, key, content, repository)
            }
            Err(error) => Err(self.io_error(format!("writing {key} failed: {error}"))),
        }
    }

    fn compare(
        &self,
        path: &Path,
        key: &str,
        content: &ContentSummary,
        repository: &Repository,
    ) -> Result<(), SpoolError> {
        let header = self.authenticate(path, key, repository)?;
        let spooled = if header.content.checksum.algorithm() == content.checksum.algorithm() {
            header.content
        } else {
            self.summarize(path, key, content.checksum.algorithm(), repository)?
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
    fn summarize(
        &self,
        path: &Path,
        key: &str,
        algorithm: envelope::ChecksumAlgorithm,
        repository: &Repository,
    ) -> Result<ContentSummary, SpoolError> {
        let file = std::fs::File::open(path)
            .map_err(|error| self.io_error(format!("cannot read {key}: {error}")))?;
        let mut sink = envelope::SummarySink::new(algorithm);
        envelope::decode(
            io::BufReader::new(file),
            key,
            repository.keyring(),
            &mut sink,
            envelope::DecodeMode::Alone,
        )
        .map_err(|error| self.io_error(error.to_string()))?;
        Ok(sink.summary())
    }

    fn authenticate(
        &self,
        path: &Path,
        key: &str,
        repository: &Repository,
    ) -> Result<Header, SpoolError> {
        let file = std::fs::File::open(path)
            .map_err(|error| self.io_error(format!("cannot read {key}: {error}")))?;
        envelope::authenticate(io::BufReader::new(file), key, repository.keyring())
            .map_err(|error| self.io_error(error.to_string()))
    }

    /// Temporary file, fsync, a hard link to the final name (which fails rather than replace
    /// an existing file), then fsyncs of every directory that changed.
    fn write_new(&self, destination: &Path, object: &[Bytes]) -> io::Result<()> {
        use std::io::Write;
        let directory = destination.parent().expect("a key has a directory");
        self.create_directories(directory)?;
        let mut pending = crate::durable::PendingFile::create(destination)?;
        for part in object {
            pending.write_all(part)?;
        }
        pending.link_into_place()
    }

    /// Creates `directory` and any parents inside the spool, fsyncing each new entry's parent.
    fn create_directories(&self, directory: &Path) -> io::Result<()> {
        if directory.is_dir() {
            return Ok(());
        }
        let parent = directory.parent().expect("inside the spool");
        if parent != self.directory && parent.starts_with(&self.directory) {
            self.create_directories(parent)?;
        } else {
            std::fs::create_dir_all(parent)?;
        }
        match std::fs::create_dir(directory) {
            Ok(()) => {}
            Err(error) if error.kind() == io::ErrorKind::AlreadyExists => {}
            Err(error) => return Err(error),
        }
        crate::durable::sync_parent_directory(directory)
    }

    /// Whether the spool holds an object under `key`, waiting for the repository.
    pub fn holds(&self, key: &str) -> bool {
        self.directory.join(key).is_file()
    }

    /// Restores the spooled copy of `key` at `destination`, verified, as archive-get does
    /// from the repository. False if the spool does not hold it.
    pub fn restore(
        &self,
        key: &str,
        repository: &Repository,
        destination: &Path,
    ) -> anyhow::Result<bool> {
        let Ok(file) = std::fs::File::open(self.directory.join(key)) else {
            return Ok(false);
        };
        let mut pending = crate::durable::PendingFile::create(destination)?;
        envelope::decode(
            io::BufReader::new(file),
            key,
            repository.keyring(),
            &mut pending,
            envelope::DecodeMode::Alone,
        )
        .map_err(|error| {
            anyhow::anyhow!("the spooled copy in {}: {error}", self.directory.display())
        })?;
        pending.commit()?;
        Ok(true)
    }

    fn objects(&self) -> Vec<SpooledObject> {
        let wal = self.directory.join(crate::repository::WAL_PREFIX);
        let mut objects = Vec::new();
        for timeline in std::fs::read_dir(&wal).into_iter().flatten().flatten() {
            let Ok(timeline_name) = timeline.file_name().into_string() else {
                continue;
            };
            for entry in std::fs::read_dir(timeline.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                let Ok(name) = entry.file_name().into_string() else {
                    continue;
                };
                // Dot files are writes in progress.
                if name.starts_with('.') {
                    continue;
                }
                objects.push(SpooledObject {
                    key: format!("{}/{timeline_name}/{name}", crate::repository::WAL_PREFIX),
                    path: entry.path(),
                });
            }
        }
        // Histories first, then in WAL order, the order Postgres archived them.
        objects.sort_by_key(|object| (!object.key.ends_with(".history"), object.key.clone()));
        objects
    }

    pub fn usage(&self) -> SpoolUsage {
        let objects = self.objects();
        SpoolUsage {
            directory: self.directory.display().to_string(),
            objects: objects.len(),
            bytes: objects
                .iter()
                .filter_map(|object| std::fs::metadata(&object.path).ok())
                .map(|metadata| metadata.len())
                .sum(),
            max_bytes: self.max_bytes,
            oldest: objects.first().map(|object| file_name_of(&object.key)),
        }
    }

    /// Moves up to `limit` spooled objects into the repository; returns how many. Stops at the
    /// first that fails: the store is likely still down, and the rest waits for the next try.
    pub async fn drain(&self, repository: &Repository, limit: usize) -> anyhow::Result<usize> {
        let mut moved = 0;
        for object in self.objects().into_iter().take(limit) {
            self.move_to_repository(&object, repository).await?;
            moved += 1;
        }
        Ok(moved)
    }

    async fn move_to_repository(
        &self,
        object: &SpooledObject,
        repository: &Repository,
    ) -> anyhow::Result<()> {
        let key = &object.key;
        let bytes = Bytes::from(std::fs::read(&object.path)?);
        let header = envelope::authenticate(&bytes[..], key, repository.keyring()).map_err(
            |error| {
                anyhow::anyhow!(
                    "the spooled copy of {key} in {} cannot be verified ({error}); it was kept: it may be the only copy of that WAL",
                    self.directory.display()
                )
            },
        )?;
        if repository.put_encoded(key, bytes.clone()).await? == PutOutcome::AlreadyExists {
            let stored = match repository.authenticate_object(key).await {
                // A torn or planted object under this name must not keep the spool full for
                // ever: the spooled copy, just authenticated, takes its place.
                Err(RepositoryError::Envelope(error)) if error.is_damaged_object() => {
                    tracing::warn!(
                        key,
                        "the stored copy failed verification ({error}); replacing it with the spooled copy"
                    );
                    if repository.replace_damaged_with(key, vec![bytes]).await? {
                        Some(header.clone())
                    } else {
                        repository.authenticate_object(key).await?
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
        std::fs::remove_file(&object.path)?;
        crate::durable::sync_parent_directory(&object.path)?;
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

    const MIB: usize = 1 << 20;

    fn spool_and_repository(root: &Path, max_bytes: u64) -> (OutageSpool, Repository) {
        let options = GlobalOptions {
            repo: Some(format!("file://{}", root.join("repo").display())),
            ..Default::default()
        };
        let settings = Settings::resolve(&options).unwrap();
        let spool = OutageSpool {
            directory: root.join("spool"),
            max_bytes,
            identity_remembered: std::sync::OnceLock::new(),
        };
        (spool, Repository::open(&settings).unwrap())
    }

    fn object_of(length: usize, fill: u8) -> (Vec<Bytes>, ContentSummary) {
        let bytes = vec![fill; length];
        let content = ContentSummary::of_bytes(&bytes);
        (vec![Bytes::from(bytes)], content)
    }

    #[test]
    fn an_object_spooled_by_an_older_pitr_is_compared_by_its_plaintext() {
        let root = tempfile::tempdir().unwrap();
        let (spool, repository) = spool_and_repository(root.path(), 64 * MIB as u64);
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
            .store(key, &[Bytes::from(old_object)], &old_content, &repository)
            .unwrap();
        // The same segment pushed again by this pitr, which summarizes it in XXH3.
        let (object, content) = encoded(&plaintext, key, &repository);
        assert_ne!(
            content.checksum.algorithm(),
            old_content.checksum.algorithm()
        );
        spool.store(key, &object, &content, &repository).unwrap();
        // A different segment under that name is still refused.
        let mut different = plaintext.clone();
        different[100] = 6;
        let (object, content) = encoded(&different, key, &repository);
        let error = spool
            .store(key, &object, &content, &repository)
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

    #[test]
    fn a_full_spool_refuses_the_next_object_and_writes_nothing_of_it() {
        let root = tempfile::tempdir().unwrap();
        let (spool, repository) = spool_and_repository(root.path(), 3 * MIB as u64);
        let (first, first_content) = object_of(2 * MIB, 1);
        spool
            .store(
                "wal/00000001/000000010000000000000001",
                &first,
                &first_content,
                &repository,
            )
            .unwrap();
        let (second, second_content) = object_of(2 * MIB, 2);
        let error = spool
            .store(
                "wal/00000001/000000010000000000000002",
                &second,
                &second_content,
                &repository,
            )
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
        let usage = spool.usage();
        assert_eq!((usage.objects, usage.bytes), (1, 2 * MIB as u64));
        assert_eq!(usage.oldest.as_deref(), Some("000000010000000000000001"));
    }
}

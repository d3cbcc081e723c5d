//! Archiving one WAL file: the checks before any network, the create-only upload, the
//! comparison with a copy already stored, and the outage spool's decision.
//!
//! `Stored` or `AlreadyArchived` means the file is durable in the repository. The file is validated first (a segment's
//! long page header must match its name, size and cluster), then encoded and written
//! create-only. If the name is already taken, the stored object is read back in full: identical
//! content is a success (Postgres may re-archive after a crash), different content is an error
//! that leaves the stored object untouched. With an outage spool configured, a push that cannot
//! reach the store goes there instead (see `outage_spool`).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::archive::outage_spool::{self, OutageSpool};
use crate::envelope::{ContentSummary, EncodeOptions};
use crate::repository::{Identity, PutOutcome, Repository, RepositoryError, check_same_cluster};
use crate::wal::{self, SegmentHeader, WalFileName};

/// What happened to the pushed file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushOutcome {
    Stored,
    AlreadyArchived,
    /// Durable in the outage spool; the repository receives it when the store answers again.
    Spooled,
}

/// A file that passed every local check and may be uploaded.
#[derive(Debug, Clone)]
pub struct WalFile {
    pub name: WalFileName,
    pub path: PathBuf,
    /// The long page header, for segments; for other files, that of a segment beside them.
    pub header: Option<SegmentHeader>,
}

/// The local checks, before any network: a WAL file name, a regular file whose content matches
/// it (a segment header, or a history or backup history file that parses), and the cluster of
/// this data directory. Both the hook and the daemon's archiver run them.
/// `pgdata` is the data directory whose `global/pg_control` names this cluster.
pub fn validate(pgdata: &Path, path: &Path) -> Result<WalFile> {
    let file_name = path
        .file_name()
        .and_then(|name| name.to_str())
        .with_context(|| {
            format!(
                "'{}' has no file name; archive_command must pass %p",
                path.display()
            )
        })?;
    let name: WalFileName = file_name.parse()?;
    let path = resolve_against_working_directory(path);
    let header = match name {
        WalFileName::Segment(segment) | WalFileName::Partial(segment) => {
            Some(wal::read_segment_header(&path, file_name, segment)?)
        }
        WalFileName::History(timeline) => {
            wal::check_history_file(&path, file_name, timeline)?;
            header_of_any_segment_beside(&path)
        }
        WalFileName::Backup { segment, offset } => {
            let header = header_of_any_segment_beside(&path);
            let size = header.map(|header| header.segment_size);
            wal::check_backup_history_file(&path, file_name, segment, offset, size)?;
            header
        }
    };
    let local_system = wal::control_file_system_identifier(pgdata);
    if let (Some(header), Some(local)) = (header, local_system)
        && header.system_identifier != local
    {
        bail!(
            "{file_name} belongs to database system {}, but this data directory ({}) is system {local}; refusing to archive a segment from another cluster",
            header.system_identifier,
            pgdata.display()
        );
    }
    Ok(WalFile { name, path, header })
}

/// Postgres creates `archive_status/<name>.ready` once a file is complete, and only then runs
/// archive_command; it renames it to `.done` once archived. Without either, the file may still
/// be written (the current segment), and archiving it would make Postgres's own push of the
/// finished file fail for ever with "different content". A file outside a pg_wal directory
/// (no `archive_status` beside it) carries no such mark, so it is refused as well: only
/// `--force` (recovery work by hand) archives either.
pub fn require_ready(file: &WalFile) -> Result<()> {
    let directory = file.path.parent().unwrap_or(Path::new("/"));
    let status = directory.join("archive_status");
    if !status.is_dir() {
        bail!(
            "{} is not in a pg_wal directory ({} has no archive_status beside it), so pitr cannot tell whether Postgres finished it (to archive it anyway for recovery work, run pitr archive-push --force {})",
            file.name,
            file.path.display(),
            file.path.display()
        );
    }
    let ready = status.join(format!("{}.ready", file.name));
    let done = status.join(format!("{}.done", file.name));
    if !ready.exists() && !done.exists() {
        bail!(
            "{} is not ready for archiving: {} does not exist, so Postgres may still be writing it; archive_command runs only once it does (to archive it anyway for recovery work, run pitr archive-push --force {})",
            file.name,
            ready.display(),
            file.path.display()
        );
    }
    Ok(())
}

/// Makes a validated file durable in the repository, or, if the store cannot be reached and
/// `spool` is given, in the outage spool. `known_to_exist` skips the upload and goes
/// straight to comparing with the stored copy (the daemon listed it after a restart).
/// `encode_slots`, when given, bounds how many encodings run at once (the CPU-bound part); the
/// write that follows does not hold a slot.
pub async fn push(
    repository: &Repository,
    file: &WalFile,
    options: &EncodeOptions,
    known_to_exist: bool,
    encode_slots: Option<&tokio::sync::Semaphore>,
    spool: Option<&OutageSpool>,
) -> Result<PushOutcome> {
    let pushed = push_to_repository(repository, file, options, known_to_exist, encode_slots).await;
    let Some(spool) = spool else {
        return pushed;
    };
    match pushed {
        Ok(outcome) => {
            spool.remember_identity(repository).await;
            Ok(outcome)
        }
        Err(error) if outage_spool::is_outage(&error) => {
            push_to_spool(repository, file, options, spool)
                .await
                .with_context(|| format!("{error:#}"))?;
            tracing::warn!(file = %file.name, "the store is unreachable ({error:#}); kept in the outage spool until it answers");
            Ok(PushOutcome::Spooled)
        }
        Err(error) => Err(error),
    }
}

/// Encodes the file as the repository would store it and writes it to the outage spool,
/// after the same cluster and keyring checks, made against the spool's copy of the identity
/// when this process has not read it from the store.
async fn push_to_spool(
    repository: &Repository,
    file: &WalFile,
    options: &EncodeOptions,
    spool: &OutageSpool,
) -> Result<()> {
    let file_name = file.name.to_string();
    let identity = match repository.known_identity() {
        Some(identity) => identity.clone(),
        None => {
            spool.adopt_identity(repository, &file_name).await?;
            repository.require_identity().await?
        }
    };
    refuse_other_cluster(repository, &identity, file)?;
    let key = Repository::wal_key(&file.name);
    let (path, key_owned, keyring, options) = (
        file.path.clone(),
        key.clone(),
        repository.keyring().cloned(),
        options.clone(),
    );
    let (content, object) = tokio::task::spawn_blocking(move || {
        crate::envelope::encode_file(&path, &key_owned, keyring.as_ref(), &options)
    })
    .await?
    .with_context(|| format!("cannot read {}", file.path.display()))?;
    spool.store(&key, object, &content, repository).await?;
    Ok(())
}

/// A segment's header names the cluster that wrote it; it must be the repository's.
fn refuse_other_cluster(
    repository: &Repository,
    identity: &Identity,
    file: &WalFile,
) -> Result<()> {
    if let Some(header) = file.header {
        check_same_cluster(&repository.url, identity, header.system_identifier)
            .with_context(|| format!("refusing to archive {}", file.name))?;
    }
    Ok(())
}

async fn push_to_repository(
    repository: &Repository,
    file: &WalFile,
    options: &EncodeOptions,
    known_to_exist: bool,
    encode_slots: Option<&tokio::sync::Semaphore>,
) -> Result<PushOutcome> {
    let file_name = file.name.to_string();
    let identity = match file.header {
        Some(header) => {
            let expected = Identity::new(
                header.system_identifier,
                header.pg_version,
                header.segment_size,
                repository.keyring(),
            );
            repository.ensure_identity(&expected).await?
        }
        None => repository.require_identity().await?,
    };
    refuse_other_cluster(repository, &identity, file)?;
    let key = Repository::wal_key(&file.name);
    let content = if known_to_exist || repository.exists_locally(&key) {
        let path = file.path.clone();
        tokio::task::spawn_blocking(move || ContentSummary::of_file(&path))
            .await?
            .with_context(|| format!("cannot read {}", file.path.display()))?
    } else {
        match repository
            .put_file(&key, &file.path, options, encode_slots)
            .await?
        {
            (PutOutcome::Created, _) => return Ok(PushOutcome::Stored),
            (PutOutcome::AlreadyExists, content) => content,
        }
    };
    compare_with_stored(repository, &key, &file_name, &file.path, content, options).await
}

/// A name already taken: succeed only if the stored object decodes, verifies and holds exactly
/// this content. An object written by an older pitr carries another checksum algorithm; the
/// file is then hashed again in that one, so an upgrade never makes a re-push look different.
async fn compare_with_stored(
    repository: &Repository,
    key: &str,
    file_name: &str,
    path: &Path,
    mut content: ContentSummary,
    options: &EncodeOptions,
) -> Result<PushOutcome> {
    let stored = match repository.authenticate_object(key).await {
        // A damaged object (torn by a crash, or planted) holds nothing worth keeping, and this
        // file is verified WAL of this cluster: store it in its place rather than block
        // archiving forever.
        Err(RepositoryError::Envelope(error)) if error.is_damaged_object() => {
            tracing::warn!(key, "the stored copy failed verification ({error}); replacing it");
            if repository.replace_damaged(key, path, options).await? {
                return Ok(PushOutcome::Stored);
            }
            repository.authenticate_object(key).await
        }
        other => other,
    }
    .with_context(|| format!("{file_name} is already archived but the stored copy cannot be verified; it was left untouched"))?;
    let Some(header) = stored else {
        bail!(
            "{file_name} was reported as existing but cannot be read back from {}; retry",
            repository.url
        );
    };
    let algorithm = header.content.checksum.algorithm();
    if content.checksum.algorithm() != algorithm {
        let path = path.to_path_buf();
        content = tokio::task::spawn_blocking(move || ContentSummary::of_file_in(&path, algorithm))
            .await?
            .with_context(|| format!("cannot read {file_name}"))?;
    }
    if header.content == content {
        return Ok(PushOutcome::AlreadyArchived);
    }
    bail!(
        "{file_name} is already archived in {} with different content (stored checksum {}, {} bytes; this file {}, {} bytes); the stored copy was left untouched. Another cluster or a diverged timeline may be archiving into this repository: find out which before archiving resumes",
        repository.url,
        header.content.checksum,
        header.content.length,
        content.checksum,
        content.length
    )
}

/// Postgres runs archive_command in its data directory and passes %p relative to it, so a
/// relative path is resolved against the working directory, never against a configured one.
fn resolve_against_working_directory(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

/// History and backup files carry no WAL header; the segments beside them tell which cluster
/// wrote them, so a fresh repository can still record its identity.
fn header_of_any_segment_beside(path: &Path) -> Option<SegmentHeader> {
    let directory = path
        .parent()
        .filter(|parent| !parent.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    wal::any_segment_header(directory)
}

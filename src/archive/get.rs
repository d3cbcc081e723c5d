//! Restoring one WAL file from the archive to where Postgres wants it: the cluster check, the
//! outage spool's copy first, then the repository. The object is streamed from the repository, verified and decoded into a temporary
//! file next to `<dest>`, fsynced and renamed into place. A missing file is a quiet "not found",
//! which Postgres expects while it probes for timelines and the end of the archive. Any failure
//! removes the temporary file, so `<dest>` only ever appears complete and verified.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::archive::outage_spool::OutageSpool;
use crate::durable::{CommitError, PendingFile};
use crate::envelope::DecodeMode;
use crate::repository::{Repository, RepositoryError, check_same_cluster};
use crate::wal::{self, WalFileName};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GetOutcome {
    Restored,
    NotFound,
}

/// For a file the outage spool holds, makes `repository` use the identity the spool kept, so
/// that restoring it asks the store nothing: the store may still be down, and until the daemon
/// moves the file, the spool holds its only copy. True if the spool holds the file and its
/// identity copy was adopted.
pub async fn adopt_outage_spool_identity(
    spool: Option<&OutageSpool>,
    repository: &Repository,
    name: &WalFileName,
) -> bool {
    match spool {
        Some(spool) if spool.holds(name) => spool
            .adopt_identity(repository, &name.to_string())
            .await
            .is_ok(),
        _ => false,
    }
}

/// Refuses to restore into a data directory of another cluster.
pub async fn check_cluster(pgdata: &Path, repository: &Repository, wal_file: &str) -> Result<()> {
    let identity = repository.require_identity().await?;
    if let Some(local) = wal::control_file_system_identifier(pgdata) {
        check_same_cluster(&repository.url, &identity, local)
            .with_context(|| format!("refusing to restore {wal_file} into {}", pgdata.display()))?;
    }
    Ok(())
}

/// `%p` is relative to the data directory, which is where Postgres runs restore_command: a
/// relative destination is resolved against the working directory, never a configured one.
pub fn absolute_destination(destination: &Path) -> PathBuf {
    std::path::absolute(destination).unwrap_or_else(|_| destination.to_path_buf())
}

/// `fetch`, but a file the outage spool holds is restored from there: it was archived while the
/// store was unreachable, and until the daemon moves it into the repository the spool holds
/// its only copy (the store may still be down while this recovery runs).
pub async fn fetch_or_spooled(
    spool: Option<&OutageSpool>,
    repository: &Repository,
    name: &WalFileName,
    destination: &Path,
) -> Result<GetOutcome> {
    if let Some(spool) = spool
        && spool.holds(name)
    {
        // Verified with the repository's identity, which the spool takes on: adopted from its
        // copy during an outage, or kept there from the store.
        if spool.repository().known_identity().is_none()
            && let Some(identity) = repository.known_identity()
        {
            spool
                .repository()
                .adopt_identity(identity.clone())
                .context("the outage spool")?;
        }
        match fetch(spool.repository(), name, destination).await? {
            GetOutcome::NotFound => {}
            restored => return Ok(restored),
        }
    }
    fetch(repository, name, destination).await
}

/// Fetches, verifies and decodes one WAL file into `destination`, atomically.
pub async fn fetch(
    repository: &Repository,
    name: &WalFileName,
    destination: &Path,
) -> Result<GetOutcome> {
    match fetch_uncommitted(repository, name, destination, DecodeMode::Alone).await? {
        Some(pending) => commit(pending, destination).await,
        None => Ok(GetOutcome::NotFound),
    }
}

/// The decoding half of `fetch`: the verified file, written but not yet durable or in place.
/// `None` if the repository has no such file. `mode` says whether other fetches run beside it.
pub async fn fetch_uncommitted(
    repository: &Repository,
    name: &WalFileName,
    destination: &Path,
    mode: DecodeMode,
) -> Result<Option<PendingFile>> {
    let pending = PendingFile::create(destination).with_context(|| {
        format!(
            "cannot create a temporary file beside {}",
            destination.display()
        )
    })?;
    let key = Repository::wal_key(name);
    let restored = repository.read_object(&key, pending, mode).await.map_err(|error| match error {
        RepositoryError::Sink(io) => anyhow::anyhow!(
            "writing {name} to {} failed: {io}; free space or fix the volume holding it, nothing was written",
            destination.display()
        ),
        other => anyhow::Error::new(other),
    })?;
    Ok(restored.map(|(_, pending)| pending))
}

/// The durable half of `fetch`: fsync, rename into place, fsync the directory. It waits on the
/// disk, so it runs on a blocking thread rather than stalling the async ones. A failure leaves
/// nothing behind (see `PendingFile::commit`).
pub async fn commit(pending: PendingFile, destination: &Path) -> Result<GetOutcome> {
    let committed = tokio::task::spawn_blocking(move || pending.commit())
        .await
        .expect("the commit task does not panic");
    match committed {
        Ok(()) => Ok(GetOutcome::Restored),
        Err(CommitError::Rename(error)) => bail!(
            "cannot rename the restored file into place at {}: {error}; check the owner and permissions of that directory, nothing was left there",
            destination.display()
        ),
        Err(error) => bail!(
            "making {} durable failed ({error}); free space or fix the volume holding it, nothing was left there",
            destination.display()
        ),
    }
}

/// `%p` naming a directory can never be renamed over: refused before anything is fetched, so
/// no segment is downloaded only to be thrown away.
pub fn refuse_directory_destination(destination: &Path) -> Result<()> {
    // A symbolic link is replaced by the rename, whatever it points to: only a directory fails.
    if std::fs::symlink_metadata(destination).is_ok_and(|metadata| metadata.is_dir()) {
        bail!(
            "{} is a directory; restore_command must pass %p, the path of the file to create",
            destination.display()
        );
    }
    Ok(())
}

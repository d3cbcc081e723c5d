//! `pitr archive-get <walfile> <dest>`: Postgres's restore_command.
//!
//! When the daemon runs, it answers: from its prefetch spool if the segment was fetched ahead
//! (a rename), otherwise by fetching it. Without a daemon the hook fetches the object itself. In
//! both cases the object is streamed from the repository, verified and decoded into a temporary
//! file next to `<dest>`, fsynced and renamed into place. A missing file is a quiet "not found",
//! which Postgres expects while it probes for timelines and the end of the archive. Any failure
//! removes the temporary file, so `<dest>` only ever appears complete and verified.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};

use crate::config::Settings;
use crate::daemon::metrics::Metrics;
use crate::durable::{CommitError, PendingFile};
use crate::envelope::DecodeMode;
use crate::outage_spool::OutageSpool;
use crate::prefetch::Prefetcher;
use crate::repository::{Repository, RepositoryError, check_same_cluster};
use crate::wal::{self, SegmentName, WalFileName};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GetOutcome {
    Restored,
    NotFound,
}

pub async fn run(settings: &Settings, wal_file: &str, destination: &Path) -> Result<GetOutcome> {
    let name: WalFileName = wal_file.parse()?;
    let destination = absolute_destination(destination);
    refuse_directory_destination(&destination)?;
    if let Some(outcome) = crate::daemon::client::get(settings, &name, &destination).await? {
        return Ok(outcome);
    }
    let repository = Arc::new(Repository::open(settings)?);
    let outage_spool = OutageSpool::open(settings);
    let held_by_outage_spool =
        adopt_outage_spool_identity(outage_spool.as_ref(), &repository, &name);
    if settings.prefetch_segments == 0 || held_by_outage_spool {
        check_cluster(settings, &repository, wal_file).await?;
        return fetch_or_spooled(outage_spool.as_ref(), &repository, &name, &destination).await;
    }
    let prefetcher = Prefetcher::new(settings, Arc::clone(&repository), Arc::new(Metrics::new()));
    // A spooled copy was fetched and verified by a worker that a hook started here only after
    // this data directory passed the cluster check, or that `pitr restore` started for a
    // backup from the same repository, so serving it needs no round trip to the store (on a
    // remote one, that round trip was most of a hit's time).
    let served_from_spool = prefetcher.take_spooled(&name, &destination)?
        || (prefetcher
            .wait_for_worker(&name, settings.store_timeout)
            .await
            && prefetcher.take_spooled(&name, &destination)?);
    let outcome = if served_from_spool {
        GetOutcome::Restored
    } else {
        let adopted = crate::prefetch::adopt_remembered_identity(settings, &repository);
        check_cluster(settings, &repository, wal_file).await?;
        if !adopted {
            crate::prefetch::remember_identity(settings, &repository);
        }
        fetch_or_spooled(outage_spool.as_ref(), &repository, &name, &destination).await?
    };
    if let (GetOutcome::Restored, WalFileName::Segment(segment)) = (outcome, name) {
        // A running worker picks the request up by itself; starting another would only exit.
        prefetcher.record_request(segment);
        if !prefetcher.worker_running() {
            start_prefetch_worker(settings, segment);
        }
    }
    Ok(outcome)
}

/// For a file the outage spool holds, makes `repository` use the identity the spool kept, so
/// that restoring it asks the store nothing: the store may still be down, and until the daemon
/// moves the file, the spool holds its only copy. True if the spool holds the file and its
/// identity copy was adopted.
fn adopt_outage_spool_identity(
    spool: Option<&OutageSpool>,
    repository: &Repository,
    name: &WalFileName,
) -> bool {
    spool.is_some_and(|spool| {
        spool.holds(&Repository::wal_key(name))
            && spool.adopt_identity(repository, &name.to_string()).is_ok()
    })
}

/// Starts `pitr prefetch-worker` in the background to fill the spool with the segments after
/// `segment`, and returns at once. The worker reads the same settings, passed by environment.
pub fn start_prefetch_worker(settings: &Settings, segment: SegmentName) {
    use std::os::unix::process::CommandExt;
    let Ok(executable) = std::env::current_exe() else {
        return;
    };
    let mut command = std::process::Command::new(executable);
    command.arg("prefetch-worker").arg(segment.to_string());
    let pgdata = std::path::absolute(&settings.pgdata).unwrap_or_else(|_| settings.pgdata.clone());
    command.env("PITR_PGDATA", pgdata).env(
        "PITR_STORE_TIMEOUT",
        settings.store_timeout.as_secs().to_string(),
    );
    if let Some(config) = &settings.config_file {
        command.env("PITR_CONFIG", config);
    }
    if let Some(repo) = &settings.repo {
        command.env("PITR_REPO", repo);
    }
    if let Some(key_file) = &settings.key_file {
        command.env(
            "PITR_KEY_FILE",
            std::path::absolute(key_file).unwrap_or_else(|_| key_file.clone()),
        );
    }
    command.env("PITR_PREFETCH", settings.prefetch_segments.to_string());
    // Its own process group, no terminal: Postgres must not wait for it or signal it.
    command
        .process_group(0)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    if let Err(error) = command.spawn() {
        tracing::debug!("cannot start the prefetch worker: {error}");
    }
}

/// The background worker: fetch the segments after `segment` into the spool, then exit.
pub async fn prefetch_worker(settings: &Settings, segment: &str) -> Result<()> {
    let segment: SegmentName = segment.parse()?;
    let repository = Arc::new(Repository::open(settings)?);
    let prefetcher = Prefetcher::new(settings, Arc::clone(&repository), Arc::new(Metrics::new()));
    crate::prefetch::adopt_remembered_identity(settings, &repository);
    prefetcher.fetch_ahead(segment).await
}

/// Refuses to restore into a data directory of another cluster.
pub async fn check_cluster(
    settings: &Settings,
    repository: &Repository,
    wal_file: &str,
) -> Result<()> {
    let identity = repository.require_identity().await?;
    if let Some(local) = wal::control_file_system_identifier(&settings.pgdata) {
        check_same_cluster(&repository.url, &identity, local).with_context(|| {
            format!(
                "refusing to restore {wal_file} into {}",
                settings.pgdata.display()
            )
        })?;
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
        && spool.restore(&Repository::wal_key(name), repository, destination)?
    {
        return Ok(GetOutcome::Restored);
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

//! Phase 3 of a restore: download. The destination is checked first (empty, or `--delta` and
//! no Postgres running there); then every file of the backup is fetched in parallel, each
//! chunk verified by the envelope, each file checked against its whole-file checksum before it
//! is renamed into place, always through `data_directory`, which refuses any path that would
//! leave the data directory. The startup files and `global/pg_control` come last, in an order a
//! crash cannot break.

use std::collections::HashSet;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use futures::StreamExt;

use super::data_directory::{self, DataDirectory, TemporaryFile};
use super::{RestoreOptions, tablespaces};
use crate::backup::take::permissions;
use crate::backup::{Manifest, ManifestFile, ManifestPath};
use crate::config::Settings;
use crate::envelope::DecodeMode;
use crate::repository::Repository;
use crate::wal::{SegmentName, WalSegmentSize};

pub(super) fn check_destination(pgdata: &Path, delta: bool) -> Result<()> {
    let entries = match std::fs::read_dir(pgdata) {
        Ok(entries) => entries.count(),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(error) => return Err(error).with_context(|| format!("reading {}", pgdata.display())),
    };
    if entries > 0 && !delta {
        bail!(
            "{} is not empty; restore into an empty directory, or pass --delta to reuse the files that match",
            pgdata.display()
        );
    }
    if pgdata.join("postmaster.pid").exists() {
        bail!(
            "{} holds postmaster.pid: stop the Postgres running there before restoring over it",
            pgdata.display()
        );
    }
    Ok(())
}

/// Starts the background prefetch worker on the first segments recovery will ask for, from
/// the backup's start, with the identity this restore read. They are fetched while the base
/// downloads, so recovery's first requests find them spooled; on a remote store each would
/// otherwise wait a round trip or more.
pub(super) fn prefetch_from_backup_start(
    settings: &Settings,
    repository: &Repository,
    backup: &Manifest,
    size: WalSegmentSize,
) {
    let first = backup.start_lsn.0 / u64::from(size.0);
    let Some(before_first) = first
        .checked_sub(1)
        .filter(|_| settings.prefetch_segments > 0)
    else {
        return;
    };
    crate::archive::prefetch::remember_identity(&settings.pgdata, repository);
    crate::archive::prefetch::start_worker(
        &settings.child_environment(),
        SegmentName::from_segment_number(backup.timeline, before_first, size),
    );
}

/// Downloads every file of the backup, then writes what makes the directory startable in an
/// order a crash cannot break: every other file, `backup_label` and the recovery settings are
/// made durable first, and `global/pg_control` last, under a temporary name, fsynced, renamed
/// and its directory fsynced. Until that rename Postgres refuses to start the directory.
pub(super) async fn download(
    repository: &Repository,
    backup: &Manifest,
    directory: &DataDirectory,
    links: &[tablespaces::TablespaceLink],
    options: &RestoreOptions,
    write_startup_files: impl FnOnce() -> Result<()>,
) -> Result<()> {
    let pgdata = directory.root();
    std::fs::create_dir_all(pgdata)?;
    std::fs::set_permissions(pgdata, permissions(0o700))?;
    if options.delta {
        let wanted: HashSet<&str> = backup
            .files
            .iter()
            .map(|file| file.path.as_str())
            .chain(backup.directories.iter().map(ManifestPath::as_str))
            .collect();
        // Found first, removed after: a refusal leaves the directory as it was.
        let unlisted = directory.unlisted(&wanted)?;
        data_directory::remove_all(&unlisted)?;
    }
    tablespaces::link(pgdata, links)?;
    let _ = std::fs::remove_file(pgdata.join("global/pg_control"));
    for path in &backup.directories {
        directory.create_directory(path)?;
    }
    let (control, others): (Vec<&ManifestFile>, Vec<&ManifestFile>) = backup
        .files
        .iter()
        .partition(|file| file.path == *"global/pg_control");
    let progress = crate::progress::Progress::start("restore", backup.logical_bytes);
    let in_flight = repository.transfers_in_flight(options.concurrency);
    let budget = ChunkBudget::new(in_flight);
    let restore = |file, delta, durability| {
        restore_file(
            repository, directory, file, delta, durability, &budget, &progress,
        )
    };
    let results: Vec<Result<()>> = futures::stream::iter(others)
        .map(|file| restore(file, options.delta, Durability::AtTheEnd))
        .buffer_unordered(in_flight)
        .collect()
        .await;
    results.into_iter().collect::<Result<Vec<()>>>()?;
    write_startup_files()?;
    // Everything else must be on disk before pg_control makes the directory startable; a
    // crash before its rename leaves a directory that refuses to start.
    sync_filesystem(pgdata)?;
    fail_before_pg_control_if_asked()?;
    for file in control {
        restore(file, false, Durability::Immediate).await?;
    }
    Ok(())
}

/// A test-only stop right before pg_control is written (debug builds): what a crash at that
/// moment leaves on disk is then observable.
fn fail_before_pg_control_if_asked() -> Result<()> {
    #[cfg(debug_assertions)]
    if std::env::var_os("PITR_TEST_FAIL_BEFORE_PG_CONTROL").is_some() {
        bail!(
            "stopped before writing global/pg_control, as PITR_TEST_FAIL_BEFORE_PG_CONTROL asks; the restored directory will not start"
        );
    }
    Ok(())
}

/// When a restored file must be on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Durability {
    /// By the one syncfs before pg_control: thousands of fsyncs would cost far more.
    AtTheEnd,
    /// Before `restore_file` returns: fsync, rename, fsync of the directory.
    Immediate,
}

/// Decoded chunks in memory across all files being restored: each holds a permit from when its
/// fetch starts until the writer has written it. Files and their chunks are fetched
/// `in_flight` at a time (more on a remote store, see `Repository::transfers_in_flight`), so a
/// large file restores at the store's full parallelism while memory stays at twice that many
/// chunks. Permits are granted in request order and a file's chunks ask in file order, so the
/// chunk a writer waits for always gets one.
struct ChunkBudget {
    permits: Arc<tokio::sync::Semaphore>,
    per_file: usize,
}

impl ChunkBudget {
    fn new(in_flight: usize) -> Self {
        ChunkBudget {
            permits: Arc::new(tokio::sync::Semaphore::new(2 * in_flight)),
            per_file: in_flight,
        }
    }
}

async fn restore_file(
    repository: &Repository,
    directory: &DataDirectory,
    file: &ManifestFile,
    delta: bool,
    durability: Durability,
    budget: &ChunkBudget,
    progress: &crate::progress::Progress,
) -> Result<()> {
    let path = directory.resolve(&file.path)?;
    progress.advance(file.size);
    if delta && matches_checksum(&path, file) {
        return Ok(());
    }
    // Written beside its destination and renamed into place only once its checksum matched:
    // a file that fails leaves nothing under a name Postgres reads.
    let (pending, output) = TemporaryFile::create(&path)?;
    // Chunks of one file are fetched and decoded several at a time and handed, in order, to a
    // blocking writer that hashes and writes them, so a large relation file is not restored on
    // one core and the async threads never wait on the disk. Memory: see `ChunkBudget`.
    let (sender, receiver) = tokio::sync::mpsc::channel::<BudgetedChunk>(budget.per_file);
    let writer = tokio::task::spawn_blocking(move || write_hashed(output, receiver));
    let capacity = file.size.min(CHUNK_CAPACITY) as usize;
    let mut chunks = futures::stream::iter(&file.chunks)
        .map(|chunk| async move {
            let permit = Arc::clone(&budget.permits)
                .acquire_owned()
                .await
                .expect("the chunk budget is never closed");
            let restored = repository
                .read_object(&chunk.key(), Vec::with_capacity(capacity), DecodeMode::Alone)
                .await
                .with_context(|| format!("restoring {} failed at chunk {}; the restored directory is incomplete and will not start", file.path, chunk.0))?;
            let (_, bytes) = restored.with_context(|| format!("chunk {} of {} is missing from the repository; the restored directory is incomplete and will not start", chunk.0, file.path))?;
            anyhow::Ok((bytes, permit))
        })
        .buffered(budget.per_file);
    let mut fetched = Ok(());
    while let Some(bytes) = chunks.next().await {
        match bytes {
            // The writer stopped on an error; it reports it below.
            Ok(bytes) => {
                if sender.send(bytes).await.is_err() {
                    break;
                }
            }
            Err(error) => {
                fetched = Err(error);
                break;
            }
        }
    }
    drop(sender);
    let written = writer.await?;
    fetched?;
    let write_failed = || {
        format!(
            "writing {} failed; free space or fix the volume",
            path.display()
        )
    };
    let (checksum, output) = written.with_context(write_failed)?;
    if checksum != file.checksum {
        bail!(
            "{} does not match its checksum after restore; the repository is damaged, and the restored directory will not start",
            file.path
        );
    }
    // Permission bits only: a manifest cannot make a restored file setuid.
    output
        .set_permissions(permissions(file.mode & 0o777))
        .with_context(write_failed)?;
    if durability == Durability::Immediate {
        output.sync_all().with_context(write_failed)?;
    }
    drop(output);
    pending.rename()?;
    if durability == Durability::Immediate {
        crate::durable::sync_parent_directory(&path).with_context(write_failed)?;
    }
    Ok(())
}

/// A restore chunk is at most this large (the backup's chunk size).
const CHUNK_CAPACITY: u64 = 1 << 20;

/// A decoded chunk and its place in the `ChunkBudget`, given back once it is written.
type BudgetedChunk = (Vec<u8>, tokio::sync::OwnedSemaphorePermit);

/// Writes chunks in the order received, hashing them; returns the file's BLAKE3 in hex, and
/// the file. Writeback starts as the file grows, so the final syncfs finds little left to write.
fn write_hashed(
    mut file: std::fs::File,
    mut chunks: tokio::sync::mpsc::Receiver<BudgetedChunk>,
) -> std::io::Result<(String, std::fs::File)> {
    let mut hasher = blake3::Hasher::new();
    let mut writeback = crate::durable::Writeback::default();
    while let Some((chunk, _permit)) = chunks.blocking_recv() {
        hasher.update(&chunk);
        file.write_all(&chunk)?;
        writeback.wrote(&file, chunk.len());
    }
    writeback.finish(&file);
    Ok((hasher.finalize().to_hex().to_string(), file))
}

/// For --delta: whether a regular file (never a link followed) already holds what the backup does.
fn matches_checksum(path: &Path, file: &ManifestFile) -> bool {
    let Ok(metadata) = std::fs::symlink_metadata(path) else {
        return false;
    };
    if !metadata.is_file() || metadata.len() != file.size {
        return false;
    }
    let mut hasher = blake3::Hasher::new();
    hasher.update_mmap(path).is_ok() && hasher.finalize().to_hex().as_str() == file.checksum
}

/// One syncfs makes every restored file durable, far faster than an fsync per file.
fn sync_filesystem(pgdata: &Path) -> Result<()> {
    crate::durable::sync_filesystem(pgdata).context("syncing the restored files to disk")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_destination_must_be_empty_or_a_delta_without_postgres_running() {
        let directory = tempfile::tempdir().unwrap();
        let pgdata = directory.path().join("data");
        // Missing or empty: fine either way.
        check_destination(&pgdata, false).unwrap();
        std::fs::create_dir(&pgdata).unwrap();
        check_destination(&pgdata, false).unwrap();
        std::fs::write(pgdata.join("PG_VERSION"), "16\n").unwrap();
        let error = check_destination(&pgdata, false).unwrap_err().to_string();
        assert!(
            error.ends_with(
                " is not empty; restore into an empty directory, or pass --delta to reuse the files that match"
            ),
            "{error}"
        );
        check_destination(&pgdata, true).unwrap();
        std::fs::write(pgdata.join("postmaster.pid"), "4242\n").unwrap();
        let error = check_destination(&pgdata, true).unwrap_err().to_string();
        assert!(
            error.ends_with(
                " holds postmaster.pid: stop the Postgres running there before restoring over it"
            ),
            "{error}"
        );
    }

    #[test]
    fn a_delta_reuses_only_a_regular_file_with_the_same_content() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("16384");
        let content = b"relation pages".repeat(100);
        std::fs::write(&path, &content).unwrap();
        let file = |content: &[u8]| ManifestFile {
            path: ManifestPath::parse("base/1/16384").unwrap(),
            size: content.len() as u64,
            mode: 0o600,
            checksum: blake3::hash(content).to_hex().to_string(),
            chunks: Vec::new(),
        };
        assert!(matches_checksum(&path, &file(&content)));
        let mut other = content.clone();
        other[7] ^= 1;
        assert!(!matches_checksum(&path, &file(&other)));
        assert!(!matches_checksum(&path, &file(b"shorter")));
        assert!(!matches_checksum(
            &directory.path().join("missing"),
            &file(&content)
        ));
        // A link to the right content is not reused: a restore never follows one.
        let link = directory.path().join("link");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        assert!(!matches_checksum(&link, &file(&content)));
    }
}

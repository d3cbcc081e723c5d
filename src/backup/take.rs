//! `pitr backup`: an online base backup through the non-exclusive backup API.
//!
//! The backup session (`pg_backup_start` … `pg_backup_stop`) is held open on one connection
//! while the sidecar reads PGDATA itself with parallel readers. Each file is cut into 1 MiB
//! chunks; a chunk whose id the repository already holds is referenced, not uploaded again.
//! Page checksums are verified as the files are read. `backup_label` and `tablespace_map` come
//! from `pg_backup_stop` and go into the manifest, which is written last.

use std::collections::HashSet;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};

use super::page_checksum::{self, BLOCKS_PER_SEGMENT, PAGE_SIZE};
use super::{
    BackupId, CHUNK_SIZE, ChunkId, Manifest, ManifestFile, ManifestPath, TablespaceMap, catalog,
};
use crate::config::Settings;
use crate::envelope::EncodeOptions;
use crate::repository::layout::MarkerKind;
use crate::repository::{
    Durability, Identity, PutOutcome, Repository, RepositoryError, check_same_cluster,
};
use crate::wal::{self, Lsn, TimelineId};

/// Directories whose contents Postgres documents as safe to omit (they are recreated or
/// meaningless after a restore); the directories themselves are kept.
const EMPTIED_DIRECTORIES: [&str; 9] = [
    "pg_wal",
    "pg_replslot",
    "pg_dynshmem",
    "pg_notify",
    "pg_serial",
    "pg_snapshots",
    "pg_stat_tmp",
    "pg_subtrans",
    "pg_wal/archive_status",
];
const SKIPPED_FILES: [&str; 8] = [
    "postmaster.pid",
    "postmaster.opts",
    "backup_label",
    "tablespace_map",
    "recovery.signal",
    "standby.signal",
    "pitr.sock",
    "backup_label.old",
];

pub struct BackupOptions {
    pub label: Option<String>,
    pub ignore_checksum_failures: bool,
    pub concurrency: usize,
}

struct Shared {
    repository: Arc<Repository>,
    encode: EncodeOptions,
    known_chunks: HashSet<ChunkId>,
    claimed_chunks: Mutex<HashSet<ChunkId>>,
    start_lsn: Lsn,
    verify_pages: bool,
    uploaded_bytes: AtomicU64,
    progress: crate::progress::Progress,
    reused_chunks: AtomicU64,
    new_chunks: AtomicU64,
    corrupt_pages: Mutex<Vec<String>>,
    /// Chunks read but not yet stored, across all files: a reader takes a permit before it
    /// reads a chunk and the upload gives it back, so memory stays at this many chunks however
    /// many files and uploads are in flight.
    chunk_permits: Arc<tokio::sync::Semaphore>,
    /// Uploads in flight per file (and files in flight): `Repository::transfers_in_flight`.
    in_flight: usize,
}

/// How long a backup waits for a running expire to finish before it gives up.
const EXPIRE_WAIT: Duration = Duration::from_secs(600);

/// Takes a backup. While it runs, its marker (`locks/backup/<name>`) tells expire to leave
/// chunks alone: this backup may reuse any chunk the catalog showed it. The marker is written
/// before the catalog is read, after any running expire has finished (see `expire`).
pub async fn run(settings: &Settings, options: &BackupOptions) -> Result<Manifest> {
    let repository = Arc::new(Repository::open(settings)?);
    let marker = backup_marker_name()?;
    let taken = take(settings, options, &repository, &marker).await;
    if let Err(error) = repository.remove_marker(MarkerKind::Backup, &marker).await {
        tracing::warn!(
            "cannot remove the backup marker {marker}: {error}; expire leaves chunks alone until it is {} h old",
            MarkerKind::Backup.max_age().as_secs() / 3600
        );
    }
    taken
}

fn backup_marker_name() -> Result<String> {
    let suffix = getrandom::u64().context("the operating system's random source failed")?;
    Ok(format!(
        "{}-{suffix:016x}",
        chrono::Utc::now().format("%Y%m%dT%H%M%SZ")
    ))
}

/// Waits until no expire is running (its marker live), for at most `limit`.
async fn wait_for_expire(repository: &Repository, limit: Duration) -> Result<()> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let running = repository.live_markers(MarkerKind::Expire).await?;
        let Some((name, record)) = running.first() else {
            return Ok(());
        };
        if tokio::time::Instant::now() >= deadline {
            bail!(
                "an expire ({name}, started {} on {}, pid {}) is still running after {} s, and a backup must not read the catalog while it deletes; try again later, or delete {} if that expire has crashed",
                record
                    .started
                    .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                record.host,
                record.pid,
                limit.as_secs(),
                crate::repository::layout::marker(MarkerKind::Expire, name)
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn take(
    settings: &Settings,
    options: &BackupOptions,
    repository: &Arc<Repository>,
    marker: &str,
) -> Result<Manifest> {
    let pgdata = std::path::absolute(&settings.pgdata)?;
    let local = wal::control_file_system_identifier(&pgdata)
        .with_context(|| format!("{} is not a PostgreSQL data directory (no global/pg_control); set --pgdata or PITR_PGDATA", pgdata.display()))?;
    let header = wal::any_segment_header(&pgdata.join("pg_wal")).with_context(|| {
        format!(
            "{} holds no valid WAL segment to identify the cluster by",
            pgdata.join("pg_wal").display()
        )
    })?;
    let expected = Identity::new(
        header.system_identifier,
        header.pg_version,
        header.segment_size,
        repository.keyring(),
    );
    let identity = repository.ensure_identity(&expected).await?;
    check_same_cluster(&repository.url, &identity, local)?;
    // The marker first, then the wait: an expire that starts after the marker sees this backup
    // and keeps every chunk; one that started before it has finished by the time the catalog
    // is read, so the catalog shows no chunk that expire deletes.
    repository.put_marker(MarkerKind::Backup, marker).await?;
    wait_for_expire(repository, EXPIRE_WAIT).await?;
    let previous = catalog(repository).await?;
    let known_chunks: HashSet<ChunkId> = previous
        .iter()
        .flat_map(|manifest| {
            manifest
                .files
                .iter()
                .flat_map(|file| file.chunks.iter().cloned())
        })
        .collect();

    let client = crate::postgres::connect(settings, Duration::from_secs(30)).await?;
    // The files come from --pgdata and the backup_label from the server: they must be one cluster.
    let server_system: i64 = client
        .query_one("select system_identifier from pg_control_system()", &[])
        .await?
        .get(0);
    if server_system as u64 != local.0 {
        bail!(
            "the server at PGHOST/PGPORT (or --pg-url) is database system {}, but {} belongs to system {}; point them at the same cluster",
            server_system as u64,
            pgdata.display(),
            local
        );
    }
    let version: i32 = client
        .query_one("select current_setting('server_version_num')::int", &[])
        .await?
        .get(0);
    let checksums: String = client
        .query_one("select current_setting('data_checksums')", &[])
        .await?
        .get(0);
    let start_time = chrono::Utc::now();
    let id = BackupId::from_time(start_time);
    let label = options
        .label
        .clone()
        .unwrap_or_else(|| format!("pitr backup {id}"));
    let start_sql = if version >= 150000 {
        "select pg_backup_start($1, true)::text"
    } else {
        "select pg_start_backup($1, true, false)::text"
    };
    let start_lsn: Lsn = client
        .query_one(start_sql, &[&label])
        .await?
        .get::<_, String>(0)
        .parse()?;
    tracing::info!(backup = %id, start_lsn = %start_lsn, "backup started");

    let (directories, files) = walk(&pgdata)?;
    let directories = directories
        .iter()
        .map(|directory| recordable(&pgdata.join(directory), directory))
        .collect::<Result<Vec<_>>>()?;
    let logical_bytes = files.iter().map(|(_, _, size)| size).sum::<u64>();
    let in_flight = repository.transfers_in_flight(options.concurrency);
    let shared = Arc::new(Shared {
        repository: Arc::clone(repository),
        encode: EncodeOptions {
            compression_level: settings.compression_level,
            compression_workers: 0,
            ..EncodeOptions::default()
        },
        known_chunks,
        claimed_chunks: Mutex::new(HashSet::new()),
        start_lsn,
        verify_pages: checksums == "on",
        uploaded_bytes: AtomicU64::new(0),
        progress: crate::progress::Progress::start("backup", logical_bytes),
        reused_chunks: AtomicU64::new(0),
        new_chunks: AtomicU64::new(0),
        corrupt_pages: Mutex::new(Vec::new()),
        chunk_permits: Arc::new(tokio::sync::Semaphore::new(2 * in_flight)),
        in_flight,
    });
    // pg_control is copied after every other file: on a standby, its minimum recovery point
    // then covers every change the other files may hold, as Postgres requires.
    let (control, others): (Vec<_>, Vec<_>) = files
        .into_iter()
        .partition(|(_, relative, _)| relative == "global/pg_control");
    let mut results: Vec<Result<Option<ManifestFile>>> = futures::stream::iter(others)
        .map(|(path, relative, _)| backup_file(Arc::clone(&shared), path, relative))
        .buffer_unordered(in_flight)
        .collect()
        .await;
    for (path, relative, _) in control {
        results.push(backup_file(Arc::clone(&shared), path, relative).await);
    }
    let mut manifest_files = Vec::new();
    for result in results {
        if let Some(file) = result? {
            manifest_files.push(file);
        }
    }
    manifest_files.sort_by(|a, b| a.path.cmp(&b.path));

    let corrupt = shared.corrupt_pages.lock().unwrap().clone();
    if !corrupt.is_empty() && !options.ignore_checksum_failures {
        bail!(
            "page checksum verification failed for {} page(s): {}; the backup was not recorded. Repair the corruption, or pass --ignore-checksum-failures to keep the backup anyway",
            corrupt.len(),
            corrupt
                .iter()
                .take(10)
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    for page in &corrupt {
        tracing::warn!("page checksum failure kept in the backup: {page}");
    }

    let stop_sql = if version >= 150000 {
        "select lsn::text, labelfile, spcmapfile from pg_backup_stop(true)"
    } else {
        "select lsn::text, labelfile, spcmapfile from pg_stop_backup(false, true)"
    };
    let stop = client
        .query_one(stop_sql, &[])
        .await
        .context("pg_backup_stop failed")?;
    let stop_lsn: Lsn = stop.get::<_, String>(0).parse()?;
    let backup_label: String = stop.get(1);
    let tablespace_map = stop
        .get::<_, Option<String>>(2)
        .filter(|map| !map.is_empty())
        .map(|map| TablespaceMap::parse(&map))
        .transpose()
        .map_err(|refused| {
            anyhow::anyhow!(
                "pg_backup_stop's tablespace_map {refused}, so the backup could not be restored and was not recorded; give the tablespace a plain absolute location"
            )
        })?;
    let stop_time = chrono::Utc::now();
    let timeline = label_field(&backup_label, "START TIMELINE:")
        .and_then(|value| value.parse().ok())
        .map(TimelineId)
        .context("backup_label has no START TIMELINE")?;

    wait_for_stop_segment(
        &shared.repository,
        stop_lsn,
        timeline,
        identity.segment_size(),
        settings.store_timeout,
    )
    .await?;
    // The chunks were written without an fsync each; the manifest is what acknowledges them.
    shared.repository.sync_deferred().await?;
    let manifest = Manifest {
        format_version: 1,
        id: id.clone(),
        label,
        system_identifier: local,
        pg_version: (version / 10000) as u32,
        timeline,
        start_lsn,
        stop_lsn,
        start_time,
        stop_time,
        logical_bytes,
        uploaded_bytes: shared.uploaded_bytes.load(Ordering::Relaxed),
        reused_chunks: shared.reused_chunks.load(Ordering::Relaxed),
        new_chunks: shared.new_chunks.load(Ordering::Relaxed),
        based_on: previous.last().map(|manifest| manifest.id.clone()),
        directories,
        files: manifest_files,
        backup_label,
        tablespace_map,
    };
    let bytes = serde_json::to_vec(&manifest)?;
    if shared
        .repository
        .put_bytes(&id.manifest_key(), Bytes::from(bytes), &shared.encode)
        .await?
        != PutOutcome::Created
    {
        bail!("a backup named {id} already exists; wait a second and retry");
    }
    Ok(manifest)
}

/// pg_backup_stop waited for archive_command, but that may archive elsewhere: a backup counts
/// only once the WAL that makes it consistent is in this repository.
async fn wait_for_stop_segment(
    repository: &Repository,
    stop_lsn: Lsn,
    timeline: TimelineId,
    size: crate::wal::WalSegmentSize,
    limit: Duration,
) -> Result<()> {
    let segment = crate::wal::SegmentName::from_segment_number(
        timeline,
        stop_lsn.0 / u64::from(size.0),
        size,
    );
    let key = Repository::wal_key(&crate::wal::WalFileName::Segment(segment));
    let deadline = std::time::Instant::now() + limit;
    loop {
        if repository.authenticate_object(&key).await?.is_some() {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            bail!(
                "WAL segment {segment}, which this backup needs to be consistent, is not in the repository after {} s; check that archive_command is pitr archive-push into this repository. The backup was not recorded",
                limit.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Every directory and regular file to back up: (absolute path, relative path, size).
#[allow(clippy::type_complexity)]
fn walk(pgdata: &Path) -> Result<(Vec<String>, Vec<(PathBuf, String, u64)>)> {
    let mut directories = Vec::new();
    let mut files = Vec::new();
    let mut pending = vec![(pgdata.to_path_buf(), String::new())];
    while let Some((directory, relative)) = pending.pop() {
        let entries = match std::fs::read_dir(&directory) {
            Ok(entries) => entries,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
            Err(error) => {
                return Err(error).with_context(|| format!("reading {}", directory.display()));
            }
        };
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let child_relative = if relative.is_empty() {
                name.clone()
            } else {
                format!("{relative}/{name}")
            };
            if name.starts_with("pgsql_tmp")
                || name == "pg_internal.init"
                || (relative.is_empty() && SKIPPED_FILES.contains(&name.as_str()))
            {
                continue;
            }
            // Tablespaces are symlinks in pg_tblspc; follow them, and store their files in place.
            let metadata = match std::fs::metadata(entry.path()) {
                Ok(metadata) => metadata,
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
                Err(error) => {
                    return Err(error)
                        .with_context(|| format!("reading {}", entry.path().display()));
                }
            };
            if metadata.is_dir() {
                directories.push(child_relative.clone());
                if !EMPTIED_DIRECTORIES.contains(&child_relative.as_str()) {
                    pending.push((entry.path(), child_relative));
                }
            } else if metadata.is_file() {
                files.push((entry.path(), child_relative, metadata.len()));
            }
        }
    }
    directories.sort();
    files.sort_by_key(|file| std::cmp::Reverse(file.2));
    Ok((directories, files))
}

/// `relative` as the manifest records it. Restore refuses a path that is not clean (see
/// `ManifestPath`), so a backup holding one would be useless: it fails here instead.
fn recordable(path: &Path, relative: &str) -> Result<ManifestPath> {
    ManifestPath::parse(relative).map_err(|refused| {
        anyhow::anyhow!(
            "{} cannot be backed up: {}, which a restore would refuse; rename or remove it",
            path.display(),
            refused.problem
        )
    })
}

/// Backs up one file, uploading the chunks the repository lacks. A blocking reader reads it in
/// order, verifies page checksums, hashes the whole file and gives each chunk its id; the chunks
/// it hands over are compressed, encrypted and stored `in_flight` at a time, so one large
/// relation file uses every core (and, remotely, many connections). Memory: `chunk_permits`.
/// A file dropped while the backup runs is simply absent: WAL replay removes it anyway.
async fn backup_file(
    shared: Arc<Shared>,
    path: PathBuf,
    relative: String,
) -> Result<Option<ManifestFile>> {
    let file = match std::fs::File::open(&path) {
        Ok(file) => file,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(error).with_context(|| format!("reading {}", path.display())),
    };
    let manifest_path = recordable(&path, &relative)?;
    let mode = file.metadata()?.mode() & 0o7777;
    let (sender, receiver) = tokio::sync::mpsc::channel::<ReadChunk>(shared.in_flight);
    let reader = {
        let (shared, relative) = (Arc::clone(&shared), relative.clone());
        let runtime = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || {
            read_chunks(&shared, &runtime, file, &relative, &sender)
        })
    };
    let chunks = futures::stream::unfold(receiver, |mut receiver| async move {
        receiver.recv().await.map(|item| (item, receiver))
    })
    .map(|(id, chunk, permit)| store_chunk(&shared, id, chunk, permit))
    .buffered(shared.in_flight)
    .try_collect::<Vec<ChunkId>>()
    .await;
    // An upload error drops the receiver, which stops the reader; report the upload's error.
    let read = reader.await?;
    let chunks = chunks?;
    let (size, checksum) = read.with_context(|| format!("reading {}", path.display()))?;
    Ok(Some(ManifestFile {
        path: manifest_path,
        size,
        mode,
        checksum,
        chunks,
    }))
}

/// A chunk read from a file, with its id and its place among the `chunk_permits`.
type ReadChunk = (ChunkId, Vec<u8>, tokio::sync::OwnedSemaphorePermit);

/// The reading half of `backup_file`: returns the file's size and BLAKE3 checksum.
fn read_chunks(
    shared: &Shared,
    runtime: &tokio::runtime::Handle,
    mut file: std::fs::File,
    relative: &str,
    sender: &tokio::sync::mpsc::Sender<ReadChunk>,
) -> std::io::Result<(u64, String)> {
    let relation_segment =
        page_checksum::relation_segment(relative).filter(|_| shared.verify_pages);
    let mut hasher = blake3::Hasher::new();
    let mut size = 0u64;
    for index in 0u64.. {
        let permit = runtime
            .block_on(Arc::clone(&shared.chunk_permits).acquire_owned())
            .expect("the chunk permits are never closed");
        let mut chunk = vec![0u8; CHUNK_SIZE];
        let filled = read_full(&mut file, &mut chunk)?;
        chunk.truncate(filled);
        if chunk.is_empty() && index > 0 {
            break;
        }
        if let Some(segment) = relation_segment {
            verify_pages(shared, relative, segment, index, &chunk);
        }
        hasher.update(&chunk);
        size += chunk.len() as u64;
        shared.progress.advance(chunk.len() as u64);
        let last = chunk.len() < CHUNK_SIZE;
        let id = ChunkId::of(&chunk, shared.repository.keyring());
        if sender.blocking_send((id, chunk, permit)).is_err() || last {
            break;
        }
    }
    Ok((size, hasher.finalize().to_hex().to_string()))
}

/// Stores one chunk unless the repository has it; `_permit` is given back when this returns.
async fn store_chunk(
    shared: &Shared,
    id: ChunkId,
    chunk: Vec<u8>,
    _permit: tokio::sync::OwnedSemaphorePermit,
) -> Result<ChunkId> {
    if shared.known_chunks.contains(&id) {
        shared.reused_chunks.fetch_add(1, Ordering::Relaxed);
        return Ok(id);
    }
    if !shared.claimed_chunks.lock().unwrap().insert(id.clone()) {
        return Ok(id);
    }
    shared.new_chunks.fetch_add(1, Ordering::Relaxed);
    let length = chunk.len() as u64;
    let chunk = Bytes::from(chunk);
    let key = id.key();
    let put = |chunk: Bytes| {
        shared
            .repository
            .put_bytes_with(&key, chunk, &shared.encode, Durability::Deferred)
    };
    match put(chunk.clone()).await? {
        PutOutcome::Created => {}
        // No complete backup references this chunk, so an interrupted backup (or a concurrent
        // one) wrote it. After a crash it may be empty or torn: use it only once verified.
        PutOutcome::AlreadyExists => {
            // Only a damaged chunk is replaced: a store that cannot be reached, or a chunk
            // under a key this keyring lacks, fails the backup instead of removing a chunk
            // that a concurrent backup may be about to reference.
            match shared.repository.authenticate_object(&key).await {
                Ok(Some(_)) => return Ok(id),
                Ok(None) => {}
                Err(RepositoryError::Envelope(error)) if error.is_damaged_object() => {}
                Err(error) => return Err(error.into()),
            }
            tracing::warn!(chunk = %key, "replacing a damaged chunk that no backup references");
            shared.repository.remove(&key).await?;
            if put(chunk).await? != PutOutcome::Created {
                bail!(
                    "chunk {key} was damaged and could not be replaced; check that no other backup of this cluster is running, then retry"
                );
            }
        }
    }
    shared.uploaded_bytes.fetch_add(length, Ordering::Relaxed);
    Ok(id)
}

fn verify_pages(shared: &Shared, relative: &str, segment: u32, chunk_index: u64, chunk: &[u8]) {
    let first_block =
        segment as u64 * BLOCKS_PER_SEGMENT as u64 + chunk_index * (CHUNK_SIZE / PAGE_SIZE) as u64;
    for (offset, page) in chunk.chunks_exact(PAGE_SIZE).enumerate() {
        let block = (first_block + offset as u64) as u32;
        let page: &[u8; PAGE_SIZE] = page.try_into().expect("chunks_exact yields whole pages");
        if page_checksum::page_is_corrupt(page, block, shared.start_lsn.0) {
            let in_file = block - segment * BLOCKS_PER_SEGMENT;
            shared
                .corrupt_pages
                .lock()
                .unwrap()
                .push(format!("{relative} block {in_file}"));
        }
    }
}

fn read_full(file: &mut std::fs::File, buffer: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buffer.len() {
        match file.read(&mut buffer[filled..])? {
            0 => break,
            count => filled += count,
        }
    }
    Ok(filled)
}

/// A `KEY: value` line of a backup_label.
pub fn label_field<'a>(label: &'a str, key: &str) -> Option<&'a str> {
    label
        .lines()
        .find_map(|line| line.strip_prefix(key))
        .map(str::trim)
}

/// Restored files get their recorded mode back; Postgres insists on 0700/0600 data directories.
pub fn permissions(mode: u32) -> std::fs::Permissions {
    std::fs::Permissions::from_mode(mode)
}

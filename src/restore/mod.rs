//! `pitr restore`: bring a data directory back to a point in time.
//!
//! The order of work is what makes a restore safe. First everything is decided and checked
//! without touching the disk: the backup (the newest that finished before the target), the
//! timeline path, and that the archive holds every WAL segment from the backup's start to the
//! target. Then files download in parallel, each chunk verified, each file checked against its
//! whole-file checksum before it is renamed into place (`data_directory`). `backup_label` and
//! the recovery settings follow every other file, all of it is synced, and `global/pg_control`
//! comes last, itself fsynced: a restore that fails or crashes half-way leaves a directory
//! Postgres refuses to start rather than one that starts with missing data or without recovery.

pub mod data_directory;
pub mod reach;
pub mod tablespaces;
pub mod target;
pub mod timeline;

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::StreamExt;

use crate::backup::take::permissions;
use crate::backup::{BackupId, Manifest, ManifestFile, ManifestPath, catalog};
use crate::config::Settings;
use crate::envelope::DecodeMode;
use crate::repository::{Repository, WAL_PREFIX};
use crate::wal::records::{PgTimestamp, TransactionEnd};
use crate::wal::{Lsn, PgVersion, SegmentName, TimelineId, WalFileName, WalSegmentSize};
use data_directory::{DataDirectory, TemporaryFile};
use reach::{ArchiveIndex, TimeReach, XidReach};
use target::RecoveryTarget;
use timeline::{ArchivedSegments, TimelinePath, check_coverage};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetTimeline {
    Latest,
    Current,
    Id(TimelineId),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetAction {
    Promote,
    Pause,
    Shutdown,
}

impl TargetAction {
    fn setting(self) -> &'static str {
        match self {
            TargetAction::Promote => "promote",
            TargetAction::Pause => "pause",
            TargetAction::Shutdown => "shutdown",
        }
    }
}

pub struct RestoreOptions {
    pub target: RecoveryTarget,
    pub tablespaces: tablespaces::TablespacePlacement,
    pub inclusive: bool,
    pub timeline: TargetTimeline,
    pub action: TargetAction,
    pub backup: Option<BackupId>,
    pub delta: bool,
    pub start: bool,
    pub concurrency: usize,
    /// The config file to pass on to restore_command, if the restore was given one.
    pub config_file: Option<PathBuf>,
    pub pg_bin: Option<PathBuf>,
}

/// What the archive holds: segment numbers per timeline, and the history files.
struct ArchiveView {
    segments: ArchivedSegments,
    histories: HashMap<TimelineId, String>,
}

impl ArchiveView {
    /// The archived segments recovery reads from `first` on, in order, each from the timeline
    /// the path assigns it; stops at the first one missing.
    fn segments_on_path(
        &self,
        path: &TimelinePath,
        first: u64,
        size: WalSegmentSize,
    ) -> Vec<SegmentName> {
        let mut segments = Vec::new();
        for number in first.. {
            let timeline = path.timeline_of(number, size);
            if !self
                .segments
                .get(&timeline)
                .is_some_and(|numbers| numbers.contains(&number))
            {
                break;
            }
            segments.push(SegmentName::from_segment_number(timeline, number, size));
        }
        segments
    }

    /// The first segment missing after `segments` (as `segments_on_path` listed them from
    /// `first`), if WAL lies beyond it: then a target the index cannot find may still lie past
    /// the gap, and the coverage check, naming the missing segment, has the answer.
    fn gap_before_more_wal(&self, first: u64, segments: &[SegmentName]) -> Option<u64> {
        let missing = first + segments.len() as u64;
        self.has_segment_after(missing).then_some(missing)
    }

    /// Whether any timeline holds a segment numbered `number` or later.
    fn has_segment_after(&self, number: u64) -> bool {
        self.segments
            .values()
            .any(|numbers| numbers.range(number..).next().is_some())
    }
}

pub async fn run(settings: &Settings, options: &RestoreOptions) -> Result<()> {
    let started = Instant::now();
    let pgdata = std::path::absolute(&settings.pgdata)?;
    check_destination(&pgdata, options.delta)?;
    let repository = Repository::open(settings)?;
    let identity = repository.require_identity().await?;
    let size = identity.segment_size();
    let backups = catalog(&repository).await?;
    let archive = read_archive(&repository, size).await?;
    let index = ArchiveIndex::new(&repository, size, PgVersion(identity.pg_version));
    let backup = match (&options.target, &options.backup) {
        (RecoveryTarget::Name(name), None) => {
            backup_before_restore_point(&backups, name, &archive, options, &index, size).await?
        }
        (RecoveryTarget::Xid(xid), None) => {
            let xid = target::xid_of(xid)?;
            backup_reaching_xid(&backups, xid, &archive, options, &index, size).await?
        }
        _ => choose_backup(&backups, options)?,
    };
    match &options.backup {
        Some(_) => println!(
            "restoring to {} from backup {} as chosen with --backup (consistent at LSN {}, timeline {})",
            options.target, backup.id, backup.stop_lsn, backup.timeline.0
        ),
        None => println!("{}", explain_choice(backup, &options.target, &backups)),
    }
    let links = tablespaces::plan(backup, &options.tablespaces, &pgdata, options.delta)?;
    let path = timeline_path(backup, &archive, options.timeline)?;
    let last_needed = last_segment_needed(backup, options, &archive, &path, &index, size).await?;
    let first = backup.start_lsn.0 / u64::from(size.0);
    let reached = check_coverage(&archive.segments, &path, size, first, last_needed).map_err(|missing| {
        anyhow::anyhow!(
            "WAL segment {missing} is missing from the archive, so recovery from backup {} cannot reach {}; nothing was downloaded. Restore to an earlier target, or from a later backup",
            backup.id,
            options.target
        )
    })?;
    let stop_segment = backup.stop_lsn.0 / u64::from(size.0);
    if reached < stop_segment {
        bail!(
            "the archive ends before backup {} became consistent (it needs WAL through segment {}); nothing was downloaded",
            backup.id,
            stop_segment
        );
    }
    let target_timeline = path.0.last().expect("a path has a timeline").0;
    println!(
        "WAL is archived without gaps from the backup's start through timeline {target_timeline}; downloading {} files",
        backup.files.len()
    );

    if !options.delta {
        prefetch_from_backup_start(settings, &repository, backup, size);
    }
    let directory = DataDirectory::new(&pgdata, &links);
    download(&repository, backup, &directory, &links, options, || {
        write_startup_files(&pgdata, settings, options, backup, target_timeline)
    })
    .await?;
    if options.delta {
        // Not before: a delta restore removes what the backup does not list, the spool too.
        prefetch_from_backup_start(settings, &repository, backup, size);
    }
    println!(
        "restored backup {} into {} in {:.1} s",
        backup.id,
        pgdata.display(),
        started.elapsed().as_secs_f64()
    );
    if options.start {
        start_and_wait(&pgdata, options, backup, started)?;
    } else {
        println!("start it with: pg_ctl -D {} start", pgdata.display());
    }
    Ok(())
}

fn check_destination(pgdata: &Path, delta: bool) -> Result<()> {
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

fn choose_backup<'a>(backups: &'a [Manifest], options: &RestoreOptions) -> Result<&'a Manifest> {
    if backups.is_empty() {
        bail!("the repository holds no backups yet; take one with `pitr backup`");
    }
    if let Some(id) = &options.backup {
        return backups
            .iter()
            .find(|backup| &backup.id == id)
            .with_context(|| format!("there is no backup {id}; `pitr list` shows the backups"));
    }
    let eligible: Vec<&Manifest> = match &options.target {
        RecoveryTarget::Time(time) => backups
            .iter()
            .filter(|backup| backup.stop_time <= time.with_timezone(&chrono::Utc))
            .collect(),
        RecoveryTarget::Lsn(lsn) => backups
            .iter()
            .filter(|backup| backup.stop_lsn <= *lsn)
            .collect(),
        _ => backups.iter().collect(),
    };
    eligible.last().copied().with_context(|| {
        let earliest = &backups[0];
        format!(
            "{} is before the end of the earliest backup ({}, consistent at {} / LSN {}), so no backup can reach it",
            options.target,
            earliest.id,
            earliest.stop_time.format("%Y-%m-%d %H:%M:%S%.6f+00"),
            earliest.stop_lsn
        )
    })
}

/// For `--target-name` without `--backup`: the newest backup from which recovery meets a
/// restore point of that name only once consistent. Recovery stops at the first such point
/// after the backup's start, so a backup that ends after it cannot serve. If none qualifies, the
/// newest backup is returned and `last_segment_needed` explains why it cannot reach the point.
async fn backup_before_restore_point<'a>(
    backups: &'a [Manifest],
    name: &str,
    archive: &ArchiveView,
    options: &RestoreOptions,
    index: &ArchiveIndex<'_>,
    size: WalSegmentSize,
) -> Result<&'a Manifest> {
    for backup in backups.iter().rev() {
        let Ok(path) = timeline_path(backup, archive, options.timeline) else {
            continue;
        };
        let segments =
            archive.segments_on_path(&path, backup.start_lsn.0 / u64::from(size.0), size);
        if let Some((_, point)) = index.first_restore_point_named(&segments, name).await?
            && point.lsn >= backup.stop_lsn
        {
            return Ok(backup);
        }
    }
    choose_backup(backups, options)
}

/// For `--target-xid` without `--backup`: the newest backup after whose start transaction
/// `xid` ends, and not before the segment where the backup becomes consistent (recovery that
/// stops before then fails). If none qualifies, the newest backup is returned and
/// `last_segment_needed` explains why it cannot reach the transaction.
async fn backup_reaching_xid<'a>(
    backups: &'a [Manifest],
    xid: u32,
    archive: &ArchiveView,
    options: &RestoreOptions,
    index: &ArchiveIndex<'_>,
    size: WalSegmentSize,
) -> Result<&'a Manifest> {
    for backup in backups.iter().rev() {
        let Ok(path) = timeline_path(backup, archive, options.timeline) else {
            continue;
        };
        let segment_of = |lsn: Lsn| lsn.0 / u64::from(size.0);
        let segments = archive.segments_on_path(&path, segment_of(backup.start_lsn), size);
        match index.segment_ending_xid(&segments, xid).await? {
            XidReach::StopsIn(segment)
                if segment.segment_number(size) >= segment_of(backup.stop_lsn) =>
            {
                return Ok(backup);
            }
            XidReach::Unknown => return Ok(backup),
            XidReach::StopsIn(_) | XidReach::NotFound => {}
        }
    }
    choose_backup(backups, options)
}

fn explain_choice(backup: &Manifest, target: &RecoveryTarget, backups: &[Manifest]) -> String {
    format!(
        "restoring to {target} from backup {} (consistent at {} / LSN {}, timeline {}): the newest of {} backup(s) that ends before the target",
        backup.id,
        backup.stop_time.format("%Y-%m-%d %H:%M:%S+00"),
        backup.stop_lsn,
        backup.timeline.0,
        backups.len()
    )
}

async fn read_archive(repository: &Repository, size: WalSegmentSize) -> Result<ArchiveView> {
    let mut view = ArchiveView {
        segments: ArchivedSegments::new(),
        histories: HashMap::new(),
    };
    for meta in repository.list(WAL_PREFIX).await? {
        let key = repository.relative_key(&meta).to_string();
        match key
            .rsplit('/')
            .next()
            .and_then(|name| name.parse::<WalFileName>().ok())
        {
            Some(WalFileName::Segment(segment)) => {
                let number = segment.segment_number(size);
                view.segments
                    .entry(segment.timeline)
                    .or_default()
                    .insert(number);
            }
            Some(WalFileName::History(timeline)) => {
                let bytes = repository
                    .read_bytes(&key)
                    .await?
                    .with_context(|| format!("{key} disappeared"))?;
                view.histories
                    .insert(timeline, String::from_utf8_lossy(&bytes).into_owned());
            }
            _ => {}
        }
    }
    Ok(view)
}

/// The path to the target timeline; `latest` is the newest timeline that descends from the
/// backup's timeline after the backup started.
fn timeline_path(
    backup: &Manifest,
    archive: &ArchiveView,
    wanted: TargetTimeline,
) -> Result<TimelinePath> {
    let path_of = |timeline: TimelineId| {
        TimelinePath::from_history(
            timeline,
            archive.histories.get(&timeline).map(String::as_str),
        )
    };
    let descends = |path: &TimelinePath| {
        path.0
            .iter()
            .position(|(timeline, _)| *timeline == backup.timeline)
            .is_some_and(|index| {
                path.0
                    .get(index + 1)
                    .is_none_or(|(_, begin)| *begin > backup.start_lsn)
            })
    };
    match wanted {
        TargetTimeline::Current => path_of(backup.timeline),
        TargetTimeline::Id(timeline) => {
            let path = path_of(timeline)?;
            if !descends(&path) {
                bail!(
                    "timeline {} does not descend from backup {}'s timeline {} after the backup started; choose another --target-timeline or --backup",
                    timeline.0,
                    backup.id,
                    backup.timeline.0
                );
            }
            Ok(path)
        }
        TargetTimeline::Latest => {
            let mut candidates: Vec<TimelineId> = archive
                .histories
                .keys()
                .copied()
                .chain([backup.timeline])
                .collect();
            candidates.sort();
            for timeline in candidates.into_iter().rev() {
                let path = path_of(timeline)?;
                if descends(&path) {
                    return Ok(path);
                }
            }
            path_of(backup.timeline)
        }
    }
}

/// The last segment recovery must find, or `None` to check through the end of the archive.
async fn last_segment_needed(
    backup: &Manifest,
    options: &RestoreOptions,
    archive: &ArchiveView,
    path: &TimelinePath,
    index: &ArchiveIndex<'_>,
    size: WalSegmentSize,
) -> Result<Option<u64>> {
    let segment_of = |lsn: Lsn| lsn.0 / u64::from(size.0);
    let stop_segment = segment_of(backup.stop_lsn);
    Ok(match &options.target {
        RecoveryTarget::Immediate => Some(stop_segment),
        RecoveryTarget::Lsn(lsn) => Some(segment_of(*lsn).max(stop_segment)),
        RecoveryTarget::Time(time) => {
            let target = PgTimestamp::from_utc(time.with_timezone(&chrono::Utc));
            let segments = archive.segments_on_path(path, stop_segment, size);
            let reach = index
                .segment_ending_after(&segments, target, options.inclusive)
                .await?;
            let gap = archive.gap_before_more_wal(stop_segment, &segments);
            match reach {
                TimeReach::StopsIn(segment) => Some(segment.segment_number(size).max(stop_segment)),
                TimeReach::Beyond { .. } if gap.is_some() => gap,
                TimeReach::Beyond { last } => bail!(target_beyond_archive(options, last)),
            }
        }
        RecoveryTarget::Name(name) => {
            let start_segment = segment_of(backup.start_lsn);
            let segments = archive.segments_on_path(path, start_segment, size);
            let gap = archive.gap_before_more_wal(start_segment, &segments);
            match index.first_restore_point_named(&segments, name).await? {
                Some((_, point)) if point.lsn < backup.stop_lsn => bail!(
                    "restore point '{name}' at LSN {} lies before backup {} is consistent (LSN {}); recovery would stop there and fail. Restore from an earlier backup with --backup",
                    point.lsn,
                    backup.id,
                    backup.stop_lsn
                ),
                Some((segment, _)) => Some(segment.segment_number(size).max(stop_segment)),
                None if gap.is_some() => gap,
                None => bail!(
                    "restore point '{name}' is not in the archive after backup {}; Postgres would replay to the end and stop with FATAL. Check the name (pg_create_restore_point), or restore to a time or LSN instead",
                    backup.id
                ),
            }
        }
        RecoveryTarget::Xid(xid) => {
            // The search starts at the segment holding the backup's start, so a transaction
            // that ended earlier in that segment is taken as reachable: recovery then fails
            // only as it would without this check.
            let start_segment = segment_of(backup.start_lsn);
            let segments = archive.segments_on_path(path, start_segment, size);
            let gap = archive.gap_before_more_wal(start_segment, &segments);
            match index
                .segment_ending_xid(&segments, target::xid_of(xid)?)
                .await?
            {
                XidReach::StopsIn(segment) if segment.segment_number(size) < stop_segment => bail!(
                    "transaction {xid} ends before backup {} is consistent (LSN {}); recovery would stop there and fail. Restore from an earlier backup with --backup",
                    backup.id,
                    backup.stop_lsn
                ),
                XidReach::StopsIn(segment) => Some(segment.segment_number(size)),
                XidReach::Unknown => None,
                XidReach::NotFound if gap.is_some() => gap,
                XidReach::NotFound => bail!(
                    "transaction {xid} does not end in the archive after the start of backup {}; Postgres would replay to the end and stop with FATAL. Check the id (a top-level transaction's, as txid_current() shows it), restore from an earlier backup with --backup, or restore to a time or LSN instead",
                    backup.id
                ),
            }
        }
        RecoveryTarget::EndOfArchive => None,
    })
}

/// The refusal for a time no transaction end in the archive comes after, naming the last one.
fn target_beyond_archive(
    options: &RestoreOptions,
    last: Option<(TransactionEnd, PgTimestamp)>,
) -> String {
    let last = match last {
        Some((end, latest)) => format!(
            "the last transaction end in the archive (transaction {}, {} at {})",
            end.xid,
            if end.committed {
                "committed"
            } else {
                "aborted"
            },
            latest.to_utc().format("%Y-%m-%d %H:%M:%S%.6f+00")
        ),
        None => {
            "any transaction end in the archive (this timeline path holds none since the backup)"
                .to_string()
        }
    };
    format!(
        "{} is not before {last}; Postgres stops at a time only on reaching the first transaction that ended after it, so recovery would end in FATAL. Restore without a target to reach the end of the archive, or wait until more WAL is archived",
        options.target
    )
}

/// Starts the background prefetch worker on the first segments recovery will ask for, from
/// the backup's start, with the identity this restore read. They are fetched while the base
/// downloads, so recovery's first requests find them spooled; on a remote store each would
/// otherwise wait a round trip or more.
fn prefetch_from_backup_start(
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
async fn download(
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

/// What tells Postgres to recover, and from where: `backup_label` (the checkpoint of
/// pg_backup_start, not the one pg_control recorded while the files were being copied) and the
/// recovery settings. The tablespace links are already in place (or the tablespaces are
/// in-place directories), so no tablespace_map.
fn write_startup_files(
    pgdata: &Path,
    settings: &Settings,
    options: &RestoreOptions,
    backup: &Manifest,
    timeline: TimelineId,
) -> Result<()> {
    std::fs::write(pgdata.join("backup_label"), &backup.backup_label)?;
    std::fs::set_permissions(pgdata.join("backup_label"), permissions(0o600))?;
    write_recovery_settings(pgdata, settings, options, backup, timeline)
}

fn write_recovery_settings(
    pgdata: &Path,
    settings: &Settings,
    options: &RestoreOptions,
    backup: &Manifest,
    timeline: TimelineId,
) -> Result<()> {
    let executable = std::env::current_exe()?;
    let mut command = shell_quote(&executable.display().to_string());
    let mut flag = |name: &str, value: String| {
        command.push_str(&format!(" --{name} {}", shell_quote(&value)));
    };
    if let Some(config) = &options.config_file {
        flag("config", std::path::absolute(config)?.display().to_string());
    }
    // The restored cluster's own data directory and socket: never those of the cluster the
    // configuration (or an inherited PITR_SOCKET) names, which may be production.
    flag("pgdata", pgdata.display().to_string());
    flag("socket", pgdata.join("pitr.sock").display().to_string());
    if let Some(repo) = &settings.repo {
        flag("repo", repo.clone());
    }
    if let Some(key_file) = &settings.key_file {
        flag(
            "key-file",
            std::path::absolute(key_file)?.display().to_string(),
        );
    }
    command.push_str(" archive-get %f %p");
    let mut lines = vec![
        ("restore_command".to_string(), command),
        (
            "recovery_target_timeline".to_string(),
            timeline.0.to_string(),
        ),
        (
            "recovery_target_action".to_string(),
            options.action.setting().to_string(),
        ),
    ];
    lines.extend(options.target.settings());
    // From PostgreSQL 15 on, recovery refuses directories in pg_tblspc unless told that
    // in-place tablespaces are intended.
    if options.tablespaces.in_place
        && !tablespaces::tablespaces_of(backup).is_empty()
        && backup.pg_version >= 15
    {
        lines.push(("allow_in_place_tablespaces".to_string(), "on".to_string()));
    }
    if !matches!(
        options.target,
        RecoveryTarget::EndOfArchive | RecoveryTarget::Immediate
    ) {
        lines.push((
            "recovery_target_inclusive".to_string(),
            options.inclusive.to_string(),
        ));
    }
    let mut text = String::from(RESTORE_BLOCK_BEGIN);
    text.push('\n');
    for (key, value) in lines {
        text.push_str(&format!("{key} = '{}'\n", value.replace('\'', "''")));
    }
    text.push_str(RESTORE_BLOCK_END);
    text.push('\n');
    let auto_conf = pgdata.join("postgresql.auto.conf");
    let existing = std::fs::read_to_string(&auto_conf).unwrap_or_default();
    std::fs::write(
        &auto_conf,
        format!("{}{text}", without_recovery_settings(&existing)),
    )?;
    std::fs::write(pgdata.join("recovery.signal"), "")?;
    Ok(())
}

const RESTORE_BLOCK_BEGIN: &str = "# pitr restore settings: rewritten by every pitr restore";
const RESTORE_BLOCK_END: &str = "# end of pitr restore settings";

/// postgresql.auto.conf without recovery settings from an earlier restore or ALTER SYSTEM:
/// left in place they would apply to this restore (or conflict with its target), because a
/// backup of a restored cluster carries them along.
fn without_recovery_settings(text: &str) -> String {
    let mut kept = String::new();
    let mut inside_block = false;
    for line in text.lines() {
        let key = line.split('=').next().unwrap_or_default().trim();
        if line.starts_with(RESTORE_BLOCK_BEGIN) {
            inside_block = true;
        } else if line.starts_with(RESTORE_BLOCK_END) {
            inside_block = false;
        } else if !inside_block && !key.starts_with("recovery_target") && key != "restore_command" {
            kept.push_str(line);
            kept.push('\n');
        }
    }
    kept
}

/// Quotes a word for the shell Postgres runs restore_command with.
fn shell_quote(word: &str) -> String {
    if !word.is_empty()
        && word
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || b"/._-:=+@,".contains(&byte))
    {
        return word.to_string();
    }
    format!("'{}'", word.replace('\'', "'\\''"))
}

/// One syncfs makes every restored file durable, far faster than an fsync per file.
fn sync_filesystem(pgdata: &Path) -> Result<()> {
    crate::durable::sync_filesystem(pgdata).context("syncing the restored files to disk")
}

fn start_and_wait(
    pgdata: &Path,
    options: &RestoreOptions,
    backup: &Manifest,
    started: Instant,
) -> Result<()> {
    let pg_ctl = options
        .pg_bin
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("/usr/lib/postgresql/{}/bin", backup.pg_version)))
        .join("pg_ctl");
    let log = pgdata.join("pitr-restore.log");
    // Without -w: a long recovery is not a failed start. Progress is judged from the data
    // directory itself, which works whatever the logging configuration.
    let status = std::process::Command::new(&pg_ctl)
        .arg("-D")
        .arg(pgdata)
        .arg("-l")
        .arg(&log)
        .args(["-W", "start"])
        .stdout(std::process::Stdio::null())
        .status()
        .with_context(|| {
            format!(
                "running {}; set --pg-bin to the directory holding pg_ctl",
                pg_ctl.display()
            )
        })?;
    let log_tail = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .rev()
            .take(5)
            .collect::<Vec<_>>()
            .join(" | ")
    };
    if !status.success() {
        bail!("Postgres did not start: {}", log_tail());
    }
    let mut seen_running = false;
    let started_at = Instant::now();
    loop {
        if !seen_running && started_at.elapsed() > Duration::from_secs(60) {
            bail!("Postgres did not start within 60 s: {}", log_tail());
        }
        let running = pgdata.join("postmaster.pid").exists();
        seen_running |= running;
        let done = match options.action {
            TargetAction::Promote => running && !pgdata.join("recovery.signal").exists(),
            TargetAction::Shutdown => seen_running && !running,
            TargetAction::Pause => std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("pausing at the end of recovery"),
        };
        if done {
            break;
        }
        if seen_running && !running && options.action != TargetAction::Shutdown {
            bail!("Postgres stopped during recovery: {}", log_tail());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    println!(
        "recovery reached {} and the cluster is {} after {:.1} s in total",
        options.target,
        match options.action {
            TargetAction::Promote => "promoted",
            TargetAction::Pause => "paused",
            TargetAction::Shutdown => "shut down",
        },
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

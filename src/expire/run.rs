//! One expire run against the repository: list, plan, delete, report.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::Instant;

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use serde::Serialize;

use super::plan::{self, ArchiveListing, BackupPoint, ExpirePlan, PlanOptions};
use crate::backup::{Manifest, catalog};
use crate::config::RetentionPolicy;
use crate::repository::layout::{self, MarkerKind, ObjectKey};
use crate::repository::{ObjectInfo, Repository};

use crate::wal::WalFileName;

/// Keys per delete request batch handed to the store.
const DELETE_BATCH: usize = 1000;

#[derive(Debug, Clone, Copy, Default)]
pub struct ExpireOptions {
    pub dry_run: bool,
    pub allow_gap: bool,
}

/// What a run deleted (or, with `--dry-run`, would delete), as `--output json` prints it.
#[derive(Debug, Serialize)]
pub struct ExpireReport {
    pub repository: String,
    pub dry_run: bool,
    pub plan: ExpirePlan,
    pub expired_wal_files: usize,
    pub expired_chunks: usize,
    pub expired_index_entries: usize,
    /// Bytes the deleted objects took in the store.
    pub bytes_freed: u64,
    /// Why chunks were left alone, when they were: a backup in progress.
    pub chunks_skipped: Option<String>,
    pub seconds: f64,
}

/// Lists the repository, plans with `policy` as of `now`, and deletes what the plan names.
pub async fn run(
    repository: &Repository,
    policy: &RetentionPolicy,
    now: DateTime<Utc>,
    options: ExpireOptions,
) -> Result<ExpireReport> {
    let started = Instant::now();
    let identity = repository.require_identity().await?;
    let size = identity.segment_size();
    let marker = marker_name()?;
    if !options.dry_run {
        // Written before the catalog is read: a backup that starts after this waits for it to
        // go before it reads the catalog, so it never counts on a chunk this run deletes.
        repository.put_marker(MarkerKind::Expire, &marker).await?;
    }
    let pg_version = crate::wal::PgVersion(identity.pg_version);
    let result = plan_and_delete(repository, policy, now, options, size, pg_version).await;
    if !options.dry_run
        && let Err(error) = repository.remove_marker(MarkerKind::Expire, &marker).await
    {
        tracing::warn!(
            "cannot remove the expire marker {marker}: {error}; backups wait for it at most {} s",
            MarkerKind::Expire.max_age().as_secs()
        );
    }
    let mut report = result?;
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

async fn plan_and_delete(
    repository: &Repository,
    policy: &RetentionPolicy,
    now: DateTime<Utc>,
    options: ExpireOptions,
    size: crate::wal::WalSegmentSize,
    pg_version: crate::wal::PgVersion,
) -> Result<ExpireReport> {
    let manifests = catalog(repository).await?;
    let wal_objects = repository.list(layout::WAL_PREFIX).await?;
    let mut archive = archive_listing(repository, &wal_objects).await?;
    archive.last_activity = last_activity(repository, &archive, size, pg_version).await?;
    let points: Vec<BackupPoint> = manifests.iter().map(point_of).collect();
    let plan = plan::plan(
        &points,
        &archive,
        size,
        policy,
        now,
        PlanOptions {
            allow_gap: options.allow_gap,
        },
    )?;
    let kept: HashSet<layout::BackupId> = plan.kept_backups.iter().cloned().collect();
    let wal_sizes: HashMap<WalFileName, u64> = wal_objects
        .iter()
        .filter_map(|object| Some((ObjectKey::wal_file(&object.key)?, object.size)))
        .collect();
    let mut report = ExpireReport {
        repository: repository.url.clone(),
        dry_run: options.dry_run,
        expired_wal_files: plan.expired_wal.len(),
        expired_chunks: 0,
        expired_index_entries: 0,
        bytes_freed: plan
            .expired_wal
            .iter()
            .filter_map(|name| wal_sizes.get(name))
            .sum(),
        chunks_skipped: None,
        plan,
        seconds: 0.0,
    };
    let expired_manifests: Vec<String> = report
        .plan
        .expired_backups
        .iter()
        .map(layout::manifest)
        .collect();
    let expired_wal: HashSet<&WalFileName> = report.plan.expired_wal.iter().collect();
    let remaining_wal: BTreeSet<WalFileName> = wal_sizes
        .keys()
        .filter(|name| !expired_wal.contains(name))
        .copied()
        .collect();
    let chunks = unreferenced_chunks(repository, &manifests, &kept).await?;
    let index = stale_index_entries(repository, &remaining_wal).await?;
    report.bytes_freed += chunks
        .iter()
        .chain(&index)
        .map(|object| object.size)
        .sum::<u64>();
    report.expired_chunks = chunks.len();
    report.expired_index_entries = index.len();
    if options.dry_run {
        return Ok(report);
    }
    // Manifests first: a backup without its manifest no longer exists, so if this run stops
    // half-way, its WAL and chunks are what a later run finds unneeded and collects.
    remove_in_batches(repository, expired_manifests).await?;
    let wal_keys = report.plan.expired_wal.iter().map(layout::wal).collect();
    remove_in_batches(repository, wal_keys).await?;
    match backup_in_progress(repository).await? {
        Some(reason) => {
            tracing::info!("{reason}");
            report.chunks_skipped = Some(reason);
            report.expired_chunks = 0;
        }
        None => {
            let keys = chunks.into_iter().map(|object| object.key).collect();
            remove_in_batches(repository, keys).await?;
        }
    }
    remove_in_batches(
        repository,
        index.into_iter().map(|object| object.key).collect(),
    )
    .await?;
    Ok(report)
}

fn point_of(manifest: &Manifest) -> BackupPoint {
    BackupPoint {
        id: manifest.id.clone(),
        timeline: manifest.timeline,
        start_lsn: manifest.start_lsn,
        stop_lsn: manifest.stop_lsn,
        stop_time: manifest.stop_time,
    }
}

/// Every WAL file the listing names, and the text of each history file (read and verified).
async fn archive_listing(
    repository: &Repository,
    objects: &[ObjectInfo],
) -> Result<ArchiveListing> {
    let mut listing = ArchiveListing::default();
    for object in objects {
        let Some(name) = ObjectKey::wal_file(&object.key) else {
            continue;
        };
        if let WalFileName::History(timeline) = name {
            let bytes = repository
                .read_bytes(&object.key)
                .await?
                .with_context(|| format!("{} disappeared while expire read it", object.key))?;
            listing
                .histories
                .insert(timeline, String::from_utf8_lossy(&bytes).into_owned());
        }
        listing.files.push(name);
    }
    Ok(listing)
}

/// How many segments back from the end of each timeline to look for its last transaction
/// (as `pitr list` does); a timeline idle for longer counts as reaching into the window.
const SEARCHED_SEGMENTS: usize = 64;

/// When the last transaction on each timeline ended, from the commit-timestamp index; a
/// timeline whose last transaction is not found is left out (the planner keeps its window).
async fn last_activity(
    repository: &Repository,
    archive: &ArchiveListing,
    size: crate::wal::WalSegmentSize,
    pg_version: crate::wal::PgVersion,
) -> Result<HashMap<crate::wal::TimelineId, DateTime<Utc>>> {
    let index = crate::restore::reach::ArchiveIndex::new(repository, size, pg_version);
    let mut by_timeline: HashMap<crate::wal::TimelineId, Vec<crate::wal::SegmentName>> =
        HashMap::new();
    for file in &archive.files {
        if let WalFileName::Segment(segment) = file {
            by_timeline
                .entry(segment.timeline)
                .or_default()
                .push(*segment);
        }
    }
    let mut activity = HashMap::new();
    for (timeline, mut segments) in by_timeline {
        segments.sort();
        // A segment the index cannot summarize leaves the timeline's activity unknown, which
        // the planner treats as reaching into the window: it keeps more, never less.
        match index
            .last_transaction_end(&segments, SEARCHED_SEGMENTS)
            .await
        {
            Ok(Some((_, _, time))) => {
                activity.insert(timeline, time.to_utc());
            }
            Ok(None) => {}
            Err(error) => tracing::warn!(
                %timeline,
                "the last transaction on this timeline is not known ({error:#}); expire keeps its whole window"
            ),
        }
    }
    Ok(activity)
}

/// Chunks that no kept manifest references. Read from the listing of `chunks/`, so chunks an
/// interrupted backup left behind (referenced by no manifest at all) go too.
async fn unreferenced_chunks(
    repository: &Repository,
    manifests: &[Manifest],
    kept: &HashSet<layout::BackupId>,
) -> Result<Vec<ObjectInfo>> {
    let referenced: HashSet<String> = manifests
        .iter()
        .filter(|manifest| kept.contains(&manifest.id))
        .flat_map(|manifest| manifest.files.iter().flat_map(|file| file.chunks.iter()))
        .map(layout::ChunkId::key)
        .collect();
    Ok(repository
        .list(layout::CHUNK_PREFIX)
        .await?
        .into_iter()
        .filter(|object| {
            matches!(ObjectKey::parse(&object.key), Some(ObjectKey::Chunk(_)))
                && !referenced.contains(&object.key)
        })
        .collect())
}

/// Index entries of segments the archive no longer holds.
async fn stale_index_entries(
    repository: &Repository,
    remaining: &BTreeSet<WalFileName>,
) -> Result<Vec<ObjectInfo>> {
    Ok(repository
        .list(layout::INDEX_PREFIX)
        .await?
        .into_iter()
        .filter(|object| match ObjectKey::parse(&object.key) {
            Some(ObjectKey::Index(segment)) => !remaining.contains(&WalFileName::Segment(segment)),
            _ => false,
        })
        .collect())
}

/// Why chunks must stay, if a backup is in progress (its marker is live, see
/// `MarkerKind::max_age`). Asked after this run's own marker was written, so a backup that
/// starts later sees that marker and waits.
async fn backup_in_progress(repository: &Repository) -> Result<Option<String>> {
    let live = repository.live_markers(MarkerKind::Backup).await?;
    Ok(live.first().map(|(name, record)| {
        format!(
            "chunks were not collected: backup {name} is in progress (started {} on {}, pid {}); the next expire collects them",
            record.started.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            record.host,
            record.pid
        )
    }))
}

async fn remove_in_batches(repository: &Repository, keys: Vec<String>) -> Result<()> {
    for batch in keys.chunks(DELETE_BATCH) {
        repository.remove_many(batch.to_vec()).await?;
    }
    Ok(())
}

/// A fresh random name for this run's marker; a failing random source is an error, never a
/// fixed name two runs would share.
pub fn marker_name() -> Result<String> {
    let suffix = getrandom::u64().context("the operating system's random source failed")?;
    Ok(format!("{suffix:016x}"))
}

/// The segments a report's plan removes, for messages.
pub fn describe(report: &ExpireReport) -> String {
    let verb = if report.dry_run {
        "would expire"
    } else {
        "expired"
    };
    let earliest = report.plan.earliest_recovery_point.map_or_else(
        || "none (no backup with unbroken WAL)".to_string(),
        |time| time.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
    );
    let first_wal = report
        .plan
        .expired_wal
        .iter()
        .filter_map(WalFileName::segment)
        .min();
    let last_wal = report
        .plan
        .expired_wal
        .iter()
        .filter_map(WalFileName::segment)
        .max();
    let range = match (first_wal, last_wal) {
        (Some(first), Some(last)) => format!(" ({first} to {last})"),
        _ => String::new(),
    };
    format!(
        "{verb} {} backups, {} WAL files{range}, {} chunks, {} index entries: {} MiB; kept {} backups; earliest recovery point {earliest}",
        report.plan.expired_backups.len(),
        report.expired_wal_files,
        report.expired_chunks,
        report.expired_index_entries,
        report.bytes_freed >> 20,
        report.plan.kept_backups.len(),
    )
}

//! `pitr list` (alias `pitr info`): the backups, and the window one can restore to.

use anyhow::Result;
use serde::Serialize;

use crate::backup::catalog;
use crate::config::Settings;
use crate::repository::{Repository, layout};
use crate::restore::reach::ArchiveIndex;
use crate::wal::{PgVersion, SegmentName, TimelineId, WalFileName};

/// One backup as `--output json` prints it (`pitr list`, `pitr backup`).
#[derive(Debug, Serialize)]
pub struct BackupSummary {
    pub id: String,
    pub label: String,
    pub start_time: String,
    pub stop_time: String,
    pub start_lsn: String,
    pub stop_lsn: String,
    pub timeline: u32,
    pub logical_bytes: u64,
    pub uploaded_bytes: u64,
    pub incremental: bool,
}

impl From<&crate::backup::Manifest> for BackupSummary {
    fn from(backup: &crate::backup::Manifest) -> Self {
        BackupSummary {
            id: backup.id.to_string(),
            label: backup.label.clone(),
            start_time: backup.start_time.to_rfc3339(),
            stop_time: backup.stop_time.to_rfc3339(),
            start_lsn: backup.start_lsn.to_string(),
            stop_lsn: backup.stop_lsn.to_string(),
            timeline: backup.timeline.0,
            logical_bytes: backup.logical_bytes,
            uploaded_bytes: backup.uploaded_bytes,
            incremental: backup.incremental(),
        }
    }
}

/// The recoverable window of one timeline.
#[derive(Debug, Serialize)]
pub struct Window {
    pub timeline: u32,
    /// The earliest time a restore can target: the end of the oldest backup.
    pub earliest: Option<String>,
    /// When the last transaction in this timeline's archived WAL ended (commit or abort, from
    /// the commit-timestamp index): a time target must lie before it.
    pub latest: Option<String>,
    /// That transaction's id.
    pub latest_xid: Option<u32>,
    pub gaps: usize,
    /// The last transaction ended before the earliest backup did: nothing on this timeline can
    /// be restored to yet.
    pub empty: bool,
}

#[derive(Debug, Serialize)]
pub struct Listing {
    pub repository: String,
    pub backups: Vec<BackupSummary>,
    pub windows: Vec<Window>,
}

/// How many segments back from the end of a timeline `pitr list` looks for its last
/// transaction; an archive idle for longer shows no `latest`.
const SEARCHED_SEGMENTS: usize = 64;

pub async fn collect(settings: &Settings) -> Result<Listing> {
    let repository = Repository::open(settings)?;
    let backups = catalog(&repository).await?;
    let wal = crate::commands::wal_list::collect(settings).await?;
    let identity = repository.require_identity().await?;
    let size = identity.segment_size();
    let index = ArchiveIndex::new(&repository, size, PgVersion(identity.pg_version));
    let earliest_time = backups.first().map(|backup| backup.stop_time);
    let earliest = earliest_time.map(|time| time.to_rfc3339());
    let mut windows = Vec::new();
    for timeline in &wal.timelines {
        let segments = archived_segments(&repository, TimelineId(timeline.timeline)).await?;
        let last = index
            .last_transaction_end(&segments, SEARCHED_SEGMENTS)
            .await?;
        let latest_time = last.map(|(_, _, latest)| latest.to_utc());
        windows.push(Window {
            empty: matches!((earliest_time, latest_time), (Some(earliest), Some(latest)) if latest < earliest),
            timeline: timeline.timeline,
            earliest: earliest.clone(),
            latest: last.map(|(_, _, latest)| latest.to_utc().to_rfc3339()),
            latest_xid: last.map(|(_, end, _)| end.xid),
            gaps: timeline.gaps.len(),
        });
    }
    Ok(Listing {
        repository: repository.url.clone(),
        backups: backups.iter().map(BackupSummary::from).collect(),
        windows,
    })
}

/// The segments archived on one timeline, in order.
async fn archived_segments(
    repository: &Repository,
    timeline: TimelineId,
) -> Result<Vec<SegmentName>> {
    let mut segments: Vec<SegmentName> = repository
        .list_wal(&layout::wal_timeline(timeline))
        .await?
        .into_iter()
        .filter_map(|name| match name {
            WalFileName::Segment(segment) => Some(segment),
            _ => None,
        })
        .collect();
    segments.sort();
    Ok(segments)
}

pub fn print_table(listing: &Listing) {
    println!("repository {}", listing.repository);
    println!(
        "{:<17} {:<20} {:<20} {:<12} {:<12} {:>3} {:>10} {:>10} {:<5} LABEL",
        "BACKUP", "START", "STOP", "START LSN", "STOP LSN", "TL", "SIZE MiB", "SENT MiB", "INCR"
    );
    for backup in &listing.backups {
        println!(
            "{:<17} {:<20} {:<20} {:<12} {:<12} {:>3} {:>10} {:>10} {:<5} {}",
            backup.id,
            &backup.start_time[..19],
            &backup.stop_time[..19],
            backup.start_lsn,
            backup.stop_lsn,
            backup.timeline,
            backup.logical_bytes >> 20,
            backup.uploaded_bytes >> 20,
            if backup.incremental { "yes" } else { "no" },
            backup.label
        );
    }
    println!("\nrecoverable window");
    for window in &listing.windows {
        if window.empty {
            println!(
                "timeline {:<3} empty: its last transaction ({}) ended before the earliest backup did ({}); take a backup, or restore from one on another timeline",
                window.timeline,
                window.latest.as_deref().unwrap_or("-"),
                window.earliest.as_deref().unwrap_or("-"),
            );
            continue;
        }
        println!(
            "timeline {:<3} from {} until {}{}",
            window.timeline,
            window.earliest.as_deref().unwrap_or("(no backup yet)"),
            match (&window.latest, window.latest_xid) {
                (Some(time), Some(xid)) =>
                    format!("{time} (transaction {xid}, the last in the archive)"),
                _ => format!("- (no transaction in the last {SEARCHED_SEGMENTS} segments)"),
            },
            if window.gaps > 0 {
                format!(" ({} gaps: see `pitr wal list`)", window.gaps)
            } else {
                String::new()
            }
        );
    }
}

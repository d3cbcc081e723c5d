//! `pitr list` (alias `pitr info`): the backups, and the window one can restore to.

use anyhow::Result;
use serde::Serialize;

use crate::backup::catalog;
use crate::config::Settings;
use crate::repository::Repository;

/// One backup as `--output json` prints it.
#[derive(Debug, Serialize)]
pub struct BackupSummary {
    pub id: String,
    pub start_time: String,
    pub stop_time: String,
    pub start_lsn: String,
    pub stop_lsn: String,
    pub timeline: u32,
    pub logical_bytes: u64,
    pub uploaded_bytes: u64,
    pub incremental: bool,
}

/// The recoverable window of one timeline.
#[derive(Debug, Serialize)]
pub struct Window {
    pub timeline: u32,
    /// The earliest time a restore can target: the end of the oldest backup.
    pub earliest: Option<String>,
    /// When the newest WAL on this timeline was archived; targets must lie before it.
    pub wal_archived_until: Option<String>,
    pub gaps: usize,
}

#[derive(Debug, Serialize)]
pub struct Listing {
    pub repository: String,
    pub backups: Vec<BackupSummary>,
    pub windows: Vec<Window>,
}

pub async fn collect(settings: &Settings) -> Result<Listing> {
    let repository = Repository::open(settings)?;
    let backups = catalog(&repository).await?;
    let wal = crate::commands::wal_list::collect(settings).await?;
    let times = repository.list(crate::repository::WAL_PREFIX).await?;
    let earliest = backups.first().map(|backup| backup.stop_time.to_rfc3339());
    let windows = wal
        .timelines
        .iter()
        .map(|timeline| Window {
            timeline: timeline.timeline,
            earliest: earliest.clone(),
            wal_archived_until: times
                .iter()
                .filter(|meta| {
                    meta.location
                        .as_ref()
                        .contains(&format!("/{:08X}/", timeline.timeline))
                })
                .map(|meta| meta.last_modified)
                .max()
                .map(|time| time.to_rfc3339()),
            gaps: timeline.gaps.len(),
        })
        .collect();
    Ok(Listing {
        repository: repository.url.clone(),
        backups: backups
            .iter()
            .map(|backup| BackupSummary {
                id: backup.id.to_string(),
                start_time: backup.start_time.to_rfc3339(),
                stop_time: backup.stop_time.to_rfc3339(),
                start_lsn: backup.start_lsn.to_string(),
                stop_lsn: backup.stop_lsn.to_string(),
                timeline: backup.timeline.0,
                logical_bytes: backup.logical_bytes,
                uploaded_bytes: backup.uploaded_bytes,
                incremental: backup.incremental(),
            })
            .collect(),
        windows,
    })
}

pub fn print_table(listing: &Listing) {
    println!("repository {}", listing.repository);
    println!(
        "{:<17} {:<20} {:<20} {:<12} {:<12} {:>3} {:>10} {:>10} {:<5}",
        "BACKUP", "START", "STOP", "START LSN", "STOP LSN", "TL", "SIZE MiB", "SENT MiB", "INCR"
    );
    for backup in &listing.backups {
        println!(
            "{:<17} {:<20} {:<20} {:<12} {:<12} {:>3} {:>10} {:>10} {:<5}",
            backup.id,
            &backup.start_time[..19],
            &backup.stop_time[..19],
            backup.start_lsn,
            backup.stop_lsn,
            backup.timeline,
            backup.logical_bytes >> 20,
            backup.uploaded_bytes >> 20,
            if backup.incremental { "yes" } else { "no" }
        );
    }
    println!("\nrecoverable window");
    for window in &listing.windows {
        println!(
            "timeline {:<3} from {} until WAL archived at {}{}",
            window.timeline,
            window.earliest.as_deref().unwrap_or("(no backup yet)"),
            window.wal_archived_until.as_deref().unwrap_or("-"),
            if window.gaps > 0 {
                format!(" ({} gaps: see `pitr wal list`)", window.gaps)
            } else {
                String::new()
            }
        );
    }
}

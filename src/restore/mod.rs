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
//!
//! One file per phase, in the order `run` calls them: `choose` (the backup), `plan` (the
//! timeline path and the reach: the archive must hold the WAL to the target), `download` (the
//! files, through `data_directory`), `recovery_settings` (what tells Postgres to recover), and
//! `start` (start Postgres and wait for the target action).

mod choose;
pub mod data_directory;
mod download;
mod plan;
pub mod reach;
mod recovery_settings;
mod start;
pub mod tablespaces;
pub mod target;
pub mod timeline;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;

use crate::backup::{BackupId, catalog};
use crate::config::Settings;
use crate::repository::Repository;
use crate::wal::{PgVersion, TimelineId};
use data_directory::DataDirectory;
use reach::ArchiveIndex;
use target::RecoveryTarget;

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

/// Restores the backup that reaches `options.target` into `settings.pgdata`: choose, plan,
/// download (the recovery settings written just before pg_control), then start if asked.
pub async fn run(settings: &Settings, options: &RestoreOptions) -> Result<()> {
    let started = Instant::now();
    let pgdata = std::path::absolute(&settings.pgdata)?;
    download::check_destination(&pgdata, options.delta)?;
    let repository = Repository::open(settings)?;
    let identity = repository.require_identity().await?;
    let size = identity.segment_size();
    let backups = catalog(&repository).await?;
    let archive = plan::read_archive(&repository, size).await?;
    let index = ArchiveIndex::new(&repository, size, PgVersion(identity.pg_version));

    let backup = choose::backup_for(&backups, options, &archive, &index, size).await?;
    println!("{}", choose::announcement(backup, options, &backups));

    // Everything is decided and checked before anything is written.
    let links = tablespaces::plan(backup, &options.tablespaces, &pgdata, options.delta)?;
    let target_timeline = plan::recovery_timeline(backup, options, &archive, &index, size).await?;
    println!(
        "WAL is archived without gaps from the backup's start through timeline {target_timeline}; downloading {} files",
        backup.files.len()
    );

    if !options.delta {
        download::prefetch_from_backup_start(settings, &repository, backup, size);
    }
    let directory = DataDirectory::new(&pgdata, &links);
    download::download(&repository, backup, &directory, &links, options, || {
        recovery_settings::write_startup_files(&pgdata, settings, options, backup, target_timeline)
    })
    .await?;
    if options.delta {
        // Not before: a delta restore removes what the backup does not list, the spool too.
        download::prefetch_from_backup_start(settings, &repository, backup, size);
    }
    println!(
        "restored backup {} into {} in {:.1} s",
        backup.id,
        pgdata.display(),
        started.elapsed().as_secs_f64()
    );

    if options.start {
        start::start_and_wait(&pgdata, options, backup, started)?;
    } else {
        println!("start it with: pg_ctl -D {} start", pgdata.display());
    }
    Ok(())
}

#[cfg(test)]
mod test_support {
    //! What the phases' unit tests build their inputs from.

    use super::*;
    use crate::backup::Manifest;
    use crate::wal::{Lsn, SystemIdentifier};

    /// Options as `pitr restore` with only a target gives them.
    pub(super) fn options(target: RecoveryTarget) -> RestoreOptions {
        RestoreOptions {
            target,
            tablespaces: tablespaces::TablespacePlacement::default(),
            inclusive: true,
            timeline: TargetTimeline::Latest,
            action: TargetAction::Pause,
            backup: None,
            delta: false,
            start: false,
            concurrency: 4,
            config_file: None,
            pg_bin: None,
        }
    }

    /// A backup on timeline 1 from `start_lsn` to `stop_lsn` that finished at `stop_time`
    /// (RFC 3339), with no files.
    pub(super) fn manifest(id: &str, start_lsn: u64, stop_lsn: u64, stop_time: &str) -> Manifest {
        let stop_time = chrono::DateTime::parse_from_rfc3339(stop_time)
            .expect("a test time")
            .with_timezone(&chrono::Utc);
        Manifest {
            format_version: 1,
            id: BackupId(id.to_string()),
            label: format!("pitr {id}"),
            system_identifier: SystemIdentifier(7),
            pg_version: 16,
            timeline: TimelineId(1),
            start_lsn: Lsn(start_lsn),
            stop_lsn: Lsn(stop_lsn),
            start_time: stop_time - chrono::Duration::seconds(60),
            stop_time,
            logical_bytes: 0,
            uploaded_bytes: 0,
            reused_chunks: 0,
            new_chunks: 0,
            based_on: None,
            directories: Vec::new(),
            files: Vec::new(),
            backup_label: String::new(),
            tablespace_map: None,
        }
    }
}

//! Phase 5 of a restore, with `--start`: start Postgres on the restored directory and wait
//! until recovery has done what the target action asks (promoted, paused or shut down),
//! judging progress from the data directory itself, whatever the logging configuration.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::{RestoreOptions, TargetAction};
use crate::backup::Manifest;

/// How long Postgres may take to show up as running before the start counts as failed.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// How often the data directory is looked at while recovery runs.
const POLL_INTERVAL: Duration = Duration::from_millis(100);

pub(super) fn start_and_wait(
    pgdata: &Path,
    options: &RestoreOptions,
    backup: &Manifest,
    started: Instant,
) -> Result<()> {
    let pg_ctl = pg_ctl_path(options, backup);
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
        if !seen_running && started_at.elapsed() > START_TIMEOUT {
            bail!("Postgres did not start within 60 s: {}", log_tail());
        }
        let running = pgdata.join("postmaster.pid").exists();
        seen_running |= running;
        let observed = Observed {
            running,
            seen_running,
        };
        let done = recovery_finished(
            options.action,
            observed,
            || pgdata.join("recovery.signal").exists(),
            || std::fs::read_to_string(&log).unwrap_or_default(),
        );
        if done {
            break;
        }
        if stopped_during_recovery(options.action, observed) {
            bail!("Postgres stopped during recovery: {}", log_tail());
        }
        std::thread::sleep(POLL_INTERVAL);
    }
    println!(
        "recovery reached {} and the cluster is {} after {:.1} s in total",
        options.target,
        outcome(options.action),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `pg_ctl` in `--pg-bin`, or in the Debian directory of the backup's major version.
fn pg_ctl_path(options: &RestoreOptions, backup: &Manifest) -> PathBuf {
    options
        .pg_bin
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("/usr/lib/postgresql/{}/bin", backup.pg_version)))
        .join("pg_ctl")
}

/// What one look at the data directory showed.
#[derive(Debug, Clone, Copy)]
struct Observed {
    /// postmaster.pid exists now.
    running: bool,
    /// postmaster.pid has existed at some look so far.
    seen_running: bool,
}

/// Whether recovery has done what `action` asks. The recovery signal and the log are read only
/// when the action needs them.
fn recovery_finished(
    action: TargetAction,
    observed: Observed,
    recovery_signal_present: impl FnOnce() -> bool,
    log: impl FnOnce() -> String,
) -> bool {
    match action {
        TargetAction::Promote => observed.running && !recovery_signal_present(),
        TargetAction::Shutdown => observed.seen_running && !observed.running,
        TargetAction::Pause => log().contains("pausing at the end of recovery"),
    }
}

/// Whether Postgres went away before recovery finished: only shutting down may end that way.
fn stopped_during_recovery(action: TargetAction, observed: Observed) -> bool {
    observed.seen_running && !observed.running && action != TargetAction::Shutdown
}

/// What the cluster is once recovery has finished under `action`.
fn outcome(action: TargetAction) -> &'static str {
    match action {
        TargetAction::Promote => "promoted",
        TargetAction::Pause => "paused",
        TargetAction::Shutdown => "shut down",
    }
}

#[cfg(test)]
mod tests {
    use super::super::target::RecoveryTarget;
    use super::super::test_support::{manifest, options};
    use super::*;

    const RUNNING: Observed = Observed {
        running: true,
        seen_running: true,
    };
    const STOPPED: Observed = Observed {
        running: false,
        seen_running: true,
    };
    const NOT_YET: Observed = Observed {
        running: false,
        seen_running: false,
    };

    #[test]
    fn pg_ctl_is_taken_from_pg_bin_or_the_backups_major_version() {
        let backup = manifest("b", 0x2000028, 0x2000100, "2026-01-01T00:00:00Z");
        let mut asked = options(RecoveryTarget::EndOfArchive);
        assert_eq!(
            pg_ctl_path(&asked, &backup),
            Path::new("/usr/lib/postgresql/16/bin/pg_ctl")
        );
        asked.pg_bin = Some(PathBuf::from("/opt/pg/bin"));
        assert_eq!(
            pg_ctl_path(&asked, &backup),
            Path::new("/opt/pg/bin/pg_ctl")
        );
    }

    #[test]
    fn promotion_is_done_once_running_without_the_recovery_signal() {
        let finished = |observed, signal| {
            recovery_finished(TargetAction::Promote, observed, || signal, String::new)
        };
        assert!(finished(RUNNING, false));
        assert!(!finished(RUNNING, true));
        assert!(!finished(NOT_YET, false));
        assert!(stopped_during_recovery(TargetAction::Promote, STOPPED));
        assert!(!stopped_during_recovery(TargetAction::Promote, NOT_YET));
    }

    #[test]
    fn shutdown_is_done_once_postgres_ran_and_stopped() {
        let finished = |observed| {
            recovery_finished(
                TargetAction::Shutdown,
                observed,
                || unreachable!("shutdown does not look at the signal"),
                || unreachable!("shutdown does not read the log"),
            )
        };
        assert!(finished(STOPPED));
        assert!(!finished(RUNNING));
        assert!(!finished(NOT_YET));
        assert!(!stopped_during_recovery(TargetAction::Shutdown, STOPPED));
    }

    #[test]
    fn pause_is_done_once_the_log_says_so() {
        let finished = |log: &str| {
            let log = log.to_string();
            recovery_finished(TargetAction::Pause, RUNNING, || true, move || log)
        };
        assert!(finished("LOG:  pausing at the end of recovery\n"));
        assert!(!finished("LOG:  redo starts at 0/2000028\n"));
        assert!(stopped_during_recovery(TargetAction::Pause, STOPPED));
    }

    #[test]
    fn the_outcome_names_what_the_action_did() {
        assert_eq!(outcome(TargetAction::Promote), "promoted");
        assert_eq!(outcome(TargetAction::Pause), "paused");
        assert_eq!(outcome(TargetAction::Shutdown), "shut down");
    }
}

//! `pitr expire` against a real PostgreSQL 15, on a file:// and an S3 repository: with a short
//! window it deletes the backups, WAL and chunks before the window and nothing the window
//! needs; a restore to the window's first instant is exact and one before it is refused; a
//! backup that runs while expire deletes stays restorable.

mod support;

use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

use support::{Cluster, S3Server, Workspace, pg15_available, stderr_of};

/// A primary archiving into `config`'s repository, with a ledger of one row per transaction.
struct Primary {
    workspace: Workspace,
    cluster: Cluster,
    config: PathBuf,
    /// (id, commit time in UTC as Postgres prints it)
    commits: Vec<(u32, String)>,
}

impl Primary {
    fn start(workspace: Workspace, config: PathBuf) -> Primary {
        let archive_command = workspace.archive_command(&config);
        let mut cluster = Cluster::init_with(
            &workspace,
            "primary",
            &format!(
                "wal_level = replica\narchive_mode = on\narchive_command = '{archive_command}'\ntrack_commit_timestamp = on\ntimezone = 'UTC'"
            ),
            &["--data-checksums"],
        );
        cluster.start();
        cluster.sql("create table ledger (id int primary key, note text)");
        Primary {
            workspace,
            cluster,
            config,
            commits: Vec::new(),
        }
    }

    fn write(&mut self, ids: std::ops::RangeInclusive<u32>) {
        for id in ids {
            self.cluster
                .sql(&format!("insert into ledger values ({id}, 'row {id}')"));
            let time = self.cluster.sql(&format!(
                "select to_char(pg_xact_commit_timestamp(xmin), 'YYYY-MM-DD HH24:MI:SS.US') from ledger where id = {id}"
            ));
            self.commits.push((id, time));
            std::thread::sleep(Duration::from_millis(10));
        }
        self.cluster.sql("select pg_switch_wal()");
    }

    fn pitr(&self, arguments: &[&str]) -> Output {
        self.workspace
            .pitr_with_env(&self.config, arguments, &self.cluster.libpq_environment())
    }

    fn backup(&self) -> String {
        let output = self.pitr(&["backup"]);
        assert!(output.status.success(), "backup: {}", stderr_of(&output));
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        stdout
            .split_whitespace()
            .nth(1)
            .expect("backup <id> complete")
            .to_string()
    }

    /// Restores into a fresh directory with `arguments`, starts it and returns the ids present.
    fn restore(&self, name: &str, arguments: &[&str]) -> Vec<u32> {
        let data = self.workspace.path(name);
        let mut command = vec!["restore", "--pgdata", data.to_str().unwrap()];
        command.extend_from_slice(arguments);
        let output = self.pitr(&command);
        assert!(
            output.status.success(),
            "restore {arguments:?}: {}",
            stderr_of(&output)
        );
        let mut restored = Cluster::existing(&self.workspace, name);
        restored.append_settings("archive_mode = off");
        restored.start();
        restored.wait_for("select pg_is_in_recovery()", "f", Duration::from_secs(120));
        let ids =
            restored.sql("select coalesce(string_agg(id::text, ',' order by id), '') from ledger");
        restored.stop();
        ids.split(',')
            .filter(|id| !id.is_empty())
            .map(|id| id.parse().unwrap())
            .collect()
    }

    fn expire(&self, arguments: &[&str]) -> serde_json::Value {
        let mut command = vec!["expire", "--output", "json"];
        command.extend_from_slice(arguments);
        let output = self.pitr(&command);
        assert!(
            output.status.success(),
            "expire {arguments:?}: {}",
            stderr_of(&output)
        );
        serde_json::from_slice(&output.stdout).expect("expire --output json prints JSON")
    }

    fn backup_ids(&self) -> Vec<String> {
        let output = self.pitr(&["list", "--output", "json"]);
        assert!(output.status.success(), "list: {}", stderr_of(&output));
        let listing: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        listing["backups"]
            .as_array()
            .unwrap()
            .iter()
            .map(|backup| backup["id"].as_str().unwrap().to_string())
            .collect()
    }
}

fn strings(value: &serde_json::Value) -> Vec<String> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|item| item.as_str().unwrap().to_string())
        .collect()
}

/// Three backups a few seconds apart; a window that begins after the second ends keeps the
/// second and third, drops the first with its WAL, and the window's first instant restores
/// exactly.
fn a_short_window_keeps_exactly_what_it_promises(primary: &mut Primary) {
    primary.write(1..=10);
    let first = primary.backup();
    primary.write(11..=20);
    let second = primary.backup();
    let second_done = std::time::Instant::now();
    std::thread::sleep(Duration::from_secs(4));
    primary.write(21..=30);
    let third_started = std::time::Instant::now();
    let third = primary.backup();
    primary.write(31..=40);
    primary.cluster.wait_until_archived(Duration::from_secs(60));

    // A window that began after the second backup ended and before the third started.
    let window = third_started.elapsed() + Duration::from_millis(2500);
    assert!(
        window < second_done.elapsed(),
        "the test ran too slowly to place its window"
    );
    let window = format!("{}ms", window.as_millis());
    let window = [
        "--retention-window",
        window.as_str(),
        "--retention-min-backups",
        "1",
    ];
    let mut dry = vec!["--dry-run"];
    dry.extend_from_slice(&window);
    let planned = primary.expire(&dry);
    assert_eq!(planned["dry_run"], true);
    assert_eq!(
        strings(&planned["plan"]["expired_backups"]),
        vec![first.clone()]
    );
    assert_eq!(
        primary.backup_ids(),
        [first.clone(), second.clone(), third.clone()],
        "a dry run deletes nothing"
    );

    let report = primary.expire(&window);
    assert_eq!(
        strings(&report["plan"]["expired_backups"]),
        vec![first.clone()]
    );
    assert_eq!(
        strings(&report["plan"]["kept_backups"]),
        [second.clone(), third.clone()]
    );
    assert_eq!(strings(&report["plan"]["anchors"]), vec![second.clone()]);
    assert!(
        report["expired_wal_files"].as_u64().unwrap() > 0,
        "{report}"
    );
    assert!(
        report["expired_chunks"].as_u64().unwrap() > 0,
        "the first backup's own chunks go: {report}"
    );
    assert_eq!(primary.backup_ids(), [second.clone(), third.clone()]);

    // Again at once, with nothing left to do: it deletes nothing.
    let again = primary.expire(&window);
    assert!(strings(&again["plan"]["expired_backups"]).is_empty());
    assert_eq!(again["expired_wal_files"], 0);
    assert_eq!(again["expired_chunks"], 0);

    // The earliest recovery point is the end of the second backup: a restore to just after
    // it holds every row committed by then, and one before it is refused.
    let earliest = report["plan"]["earliest_recovery_point"]
        .as_str()
        .unwrap()
        .to_string();
    let earliest_time = chrono::DateTime::parse_from_rfc3339(&earliest)
        .unwrap()
        .to_utc();
    let target = earliest_time + chrono::Duration::milliseconds(1);
    let target_text = target.format("%Y-%m-%d %H:%M:%S%.6f+00").to_string();
    let expected: Vec<u32> = primary
        .commits
        .iter()
        .filter(|(_, time)| {
            chrono::NaiveDateTime::parse_from_str(time, "%Y-%m-%d %H:%M:%S%.6f")
                .unwrap()
                .and_utc()
                <= target
        })
        .map(|(id, _)| *id)
        .collect();
    assert_eq!(
        expected,
        (1..=20).collect::<Vec<_>>(),
        "the ledger around the second backup"
    );
    assert_eq!(
        primary.restore("at-window-start", &["--target-time", &target_text]),
        expected
    );
    let before = (earliest_time - chrono::Duration::milliseconds(500))
        .format("%Y-%m-%d %H:%M:%S%.6f+00")
        .to_string();
    let data = primary.workspace.path("before-window");
    let refused = primary.pitr(&[
        "restore",
        "--pgdata",
        data.to_str().unwrap(),
        "--target-time",
        &before,
    ]);
    assert!(!refused.status.success());
    assert!(
        stderr_of(&refused).contains("is before the end of the earliest backup"),
        "{}",
        stderr_of(&refused)
    );
    // The newest state is intact too.
    assert_eq!(primary.restore("at-end", &[]), (1..=40).collect::<Vec<_>>());
}

fn file_repository(workspace: &Workspace) -> PathBuf {
    workspace
        .encrypted_file_repository("store_timeout = 30\n")
        .0
}

#[test]
fn a_short_window_on_a_file_repository() {
    if !pg15_available() {
        return;
    }
    let workspace = Workspace::new();
    let config = file_repository(&workspace);
    let mut primary = Primary::start(workspace, config);
    a_short_window_keeps_exactly_what_it_promises(&mut primary);
}

#[test]
fn a_short_window_on_an_s3_repository() {
    if !pg15_available() {
        return;
    }
    let workspace = Workspace::new();
    let Some(s3) = S3Server::start(&workspace) else {
        return;
    };
    let config = s3.encrypted_repository_config(&workspace);
    let mut primary = Primary::start(workspace, config);
    a_short_window_keeps_exactly_what_it_promises(&mut primary);
}

#[test]
fn without_a_policy_expire_refuses_and_deletes_nothing() {
    if !pg15_available() {
        return;
    }
    let workspace = Workspace::new();
    let config = file_repository(&workspace);
    let mut primary = Primary::start(workspace, config);
    primary.write(1..=3);
    let only = primary.backup();
    let output = primary.pitr(&["expire"]);
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(
        stderr_of(&output).trim_end(),
        "pitr expire: error: no retention policy is configured, so expire keeps everything: set retention_window (PITR_RETENTION_WINDOW, e.g. 14d) or retention_backups (PITR_RETENTION_BACKUPS)"
    );
    let output = primary.pitr(&["expire", "--retention-window", "fortnight"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr_of(&output).starts_with("pitr expire: error: retention window (PITR_RETENTION_WINDOW) 'fortnight' is not a duration"),
        "{}",
        stderr_of(&output)
    );
    assert_eq!(primary.backup_ids(), [only]);
}

/// A backup that runs while expire deletes may reuse chunks that only the backups being
/// expired hold: here a file in the data directory that the oldest backup saw, the next did
/// not, and the racing one sees again. Those chunks must survive, and the racing backup must
/// restore with that file intact.
#[test]
fn a_backup_racing_expire_stays_restorable() {
    if !pg15_available() {
        return;
    }
    let workspace = Workspace::new();
    let config = file_repository(&workspace);
    let mut primary = Primary::start(workspace, config);
    // Enough data that a backup takes a moment.
    primary.cluster.sql("create table bulk as select g as id, md5(g::text) || repeat('y', 300) as payload from generate_series(1, 300000) g");
    let blob_path = primary.workspace.path("primary").join("pitr_test_blob");
    let blob: Vec<u8> = (0..(4u32 << 20))
        .map(|index| (index.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&blob_path, &blob).unwrap();
    primary.write(1..=5);
    let oldest = primary.backup();
    std::fs::remove_file(&blob_path).unwrap();
    primary.write(6..=8);
    let middle = primary.backup();
    std::fs::write(&blob_path, &blob).unwrap();
    primary.write(9..=10);
    let racing = {
        let environment = primary.cluster.libpq_environment();
        let pitr = primary.workspace.pitr.clone();
        let config = primary.config.clone();
        std::thread::spawn(move || {
            let mut command = support::as_postgres(&pitr);
            command.arg("--config").arg(config).arg("backup");
            command.envs(environment);
            command.output().unwrap()
        })
    };
    // The racing backup has read the catalog (with the oldest backup's chunks) by now.
    std::thread::sleep(Duration::from_millis(400));
    let expired = primary.expire(&["--retention-backups", "1"]);
    let output = racing.join().unwrap();
    assert!(
        output.status.success(),
        "the racing backup: {}",
        stderr_of(&output)
    );
    assert_eq!(
        strings(&expired["plan"]["expired_backups"]),
        vec![oldest.clone()],
        "{expired}"
    );
    assert_eq!(
        strings(&expired["plan"]["kept_backups"]),
        vec![middle],
        "{expired}"
    );
    let failed = unrestorable_backups(&primary, 0);
    assert!(failed.is_empty(), "{failed:?}; expire said {expired}");
    // The racing backup's copy of the file is whole.
    let racing_id = primary.backup_ids().last().unwrap().clone();
    let data = primary.workspace.path("racing");
    let output = primary.pitr(&[
        "restore",
        "--pgdata",
        data.to_str().unwrap(),
        "--backup",
        &racing_id,
        "--target",
        "immediate",
    ]);
    assert!(output.status.success(), "restore: {}", stderr_of(&output));
    assert!(
        std::fs::read(data.join("pitr_test_blob")).unwrap() == blob,
        "the file restored from the racing backup differs"
    );
    // A later expire, with no backup running, collects what was left.
    let later = primary.expire(&["--retention-backups", "1"]);
    assert!(later["chunks_skipped"].is_null(), "{later}");
}

/// The backups whose restore fails: each restore reads and verifies every chunk its manifest
/// names, so a chunk expire took from under a backup fails it, naming the chunk.
fn unrestorable_backups(primary: &Primary, round: u64) -> Vec<String> {
    let mut failed = Vec::new();
    for id in primary.backup_ids() {
        let data = primary.workspace.path(&format!("check-{round}-{id}"));
        let output = primary.pitr(&[
            "restore",
            "--pgdata",
            data.to_str().unwrap(),
            "--backup",
            &id,
            "--target",
            "immediate",
        ]);
        if !output.status.success() {
            failed.push(format!("{id}: {}", stderr_of(&output)));
        }
        let _ = std::fs::remove_dir_all(&data);
    }
    failed
}

/// `pitr backup --output json` prints the record `pitr list` lists, label included; and a
/// timeline whose last transaction ended before the earliest backup did is shown empty, never
/// as a window that ends before it begins.
#[test]
fn backup_records_for_scripts_and_an_empty_window_said_so() {
    if !pg15_available() {
        return;
    }
    let workspace = Workspace::new();
    let config = file_repository(&workspace);
    let mut primary = Primary::start(workspace, config);
    primary.write(1..=3);
    let output = primary.pitr(&["backup", "--label", "nightly", "--output", "json"]);
    assert!(output.status.success(), "backup: {}", stderr_of(&output));
    let record: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("one JSON record");
    assert_eq!(record["label"], "nightly");
    primary.cluster.sql("select pg_switch_wal()");
    primary.cluster.wait_until_archived(Duration::from_secs(60));
    let output = primary.pitr(&["list", "--output", "json"]);
    let listing: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(listing["backups"][0], record, "the same record in the list");
    let window = &listing["windows"][0];
    assert_eq!(window["empty"], true, "{listing}");
    let table = primary.pitr(&["list"]);
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(text.contains("nightly"), "{text}");
    assert!(
        text.contains("timeline 1   empty: its last transaction"),
        "{text}"
    );
    assert!(!text.contains(" until "), "no inverted window: {text}");
}

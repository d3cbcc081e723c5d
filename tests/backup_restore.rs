//! Base backups and point-in-time restore against a real PostgreSQL 15: restores land exactly on
//! the target (time, LSN, xid, restore point, immediate), follow timeline switches, deduplicate
//! unchanged data, reuse files with --delta, and refuse bad input before touching anything.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use support::{Cluster, S3Server, Workspace, pg15_available, stderr_of};

/// A primary archiving into an encrypted file:// repository, with a ledger of one row per
/// transaction and a backup taken in the middle of the writes.
struct Ledger {
    workspace: Workspace,
    primary: Cluster,
    config: PathBuf,
    repository: PathBuf,
    /// (id, xid, commit time as Postgres prints it in UTC, LSN right after the commit)
    commits: Vec<(u32, String, String, String)>,
    rows_at_backup: usize,
    restore_point_after: usize,
}

impl Ledger {
    fn new() -> Self {
        let workspace = Workspace::new();
        let (config, repository) = workspace.encrypted_file_repository("store_timeout = 30\n");
        let archive_command = workspace.archive_command(&config);
        let mut primary = Cluster::init_with(
            &workspace,
            "primary",
            &format!(
                "wal_level = replica\narchive_mode = on\narchive_command = '{archive_command}'\ntrack_commit_timestamp = on\ntimezone = 'UTC'"
            ),
            &["--data-checksums"],
        );
        primary.start();
        primary.sql("create table ledger (id int primary key, note text)");
        let mut ledger = Ledger {
            workspace,
            primary,
            config,
            repository,
            commits: Vec::new(),
            rows_at_backup: 0,
            restore_point_after: 0,
        };
        ledger.write(1..=20);
        ledger.rows_at_backup = 20;
        // The first rows end in a segment before the backup's: a target among them cannot be
        // reached from this backup, which the --target-xid check can tell by segment.
        ledger.primary.sql("select pg_switch_wal()");
        ledger.backup();
        ledger.write(21..=30);
        ledger
            .primary
            .sql("select pg_create_restore_point('before_31')");
        ledger.restore_point_after = 30;
        ledger.write(31..=45);
        ledger.primary.sql("select pg_switch_wal()");
        ledger.primary.wait_until_archived(Duration::from_secs(60));
        ledger
    }

    fn write(&mut self, ids: std::ops::RangeInclusive<u32>) {
        for id in ids {
            self.primary
                .sql(&format!("insert into ledger values ({id}, 'row {id}')"));
            let row = self.primary.sql(&format!(
                "select xmin::text, to_char(pg_xact_commit_timestamp(xmin), 'YYYY-MM-DD HH24:MI:SS.US'), pg_current_wal_lsn() from ledger where id = {id}"
            ));
            let fields: Vec<&str> = row.split('|').collect();
            self.commits
                .push((id, fields[0].into(), fields[1].into(), fields[2].into()));
            std::thread::sleep(Duration::from_millis(15));
        }
    }

    fn backup(&self) -> String {
        let output = self.workspace.pitr_with_env(
            &self.config,
            &["backup"],
            &self.primary.libpq_environment(),
        );
        assert!(
            output.status.success(),
            "backup failed: {}",
            stderr_of(&output)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Restores into a fresh directory, starts it on its own port and returns the ids present.
    fn restore(&self, name: &str, arguments: &[&str]) -> Vec<u32> {
        let ids = self.restore_and_query(
            name,
            arguments,
            "select coalesce(string_agg(id::text, ',' order by id), '') from ledger",
        );
        ids.split(',')
            .filter(|id| !id.is_empty())
            .map(|id| id.parse().unwrap())
            .collect()
    }

    /// Restores into a fresh directory, starts it on its own port and returns `sql`'s answer.
    fn restore_and_query(&self, name: &str, arguments: &[&str], sql: &str) -> String {
        let data = self.workspace.path(name);
        let mut command = vec!["restore", "--pgdata", data.to_str().unwrap()];
        command.extend_from_slice(arguments);
        let output = self.workspace.pitr(&self.config, &command);
        assert!(
            output.status.success(),
            "restore {arguments:?}: {}",
            stderr_of(&output)
        );
        let mut cluster = Cluster::existing(&self.workspace, name);
        cluster.append_settings("archive_mode = off");
        cluster.start();
        cluster.wait_for("select pg_is_in_recovery()", "f", Duration::from_secs(120));
        let answer = cluster.sql(sql);
        cluster.stop();
        answer
    }

    fn ids_through(&self, last: u32) -> Vec<u32> {
        (1..=last).collect()
    }
}

/// A timestamp halfway between two commit times, with its zone.
fn between(before: &str, after: &str) -> String {
    let parse =
        |text: &str| chrono::NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.6f").unwrap();
    let middle = parse(before) + (parse(after) - parse(before)) / 2;
    format!("{}+00", middle.format("%Y-%m-%d %H:%M:%S%.6f"))
}

#[test]
fn restores_land_exactly_on_every_kind_of_target() {
    if !pg15_available() {
        return;
    }
    let ledger = Ledger::new();
    let commit = |id: u32| &ledger.commits[id as usize - 1];

    let target = between(&commit(33).2, &commit(34).2);
    assert_eq!(
        ledger.restore("time_between", &["--target-time", &target]),
        ledger.ids_through(33)
    );

    let exact = format!("{}+00", commit(25).2);
    assert_eq!(
        ledger.restore("time_equal", &["--target-time", &exact]),
        ledger.ids_through(25),
        "inclusive by default"
    );
    assert_eq!(
        ledger.restore(
            "time_exclusive",
            &["--target-time", &exact, "--target-exclusive"]
        ),
        ledger.ids_through(24)
    );

    // Exclusive, the last commit in the archive is reachable: recovery stops just before it.
    let last = format!("{}+00", commit(45).2);
    assert_eq!(
        ledger.restore(
            "time_exclusive_last",
            &["--target-time", &last, "--target-exclusive"]
        ),
        ledger.ids_through(44)
    );

    assert_eq!(
        ledger.restore("lsn", &["--target-lsn", &commit(38).3]),
        ledger.ids_through(38)
    );
    assert_eq!(
        ledger.restore("xid", &["--target-xid", &commit(27).1]),
        ledger.ids_through(27)
    );
    assert_eq!(
        ledger.restore("name", &["--target-name", "before_31"]),
        ledger.ids_through(ledger.restore_point_after as u32)
    );
    assert_eq!(
        ledger.restore("immediate", &["--target", "immediate"]),
        ledger.ids_through(ledger.rows_at_backup as u32)
    );
    assert_eq!(ledger.restore("end", &[]), ledger.ids_through(45));

    // A backup taken after the restore point cannot reach it: the earlier one is chosen.
    ledger.backup();
    assert_eq!(
        ledger.restore("name_older_backup", &["--target-name", "before_31"]),
        ledger.ids_through(ledger.restore_point_after as u32)
    );
    // Likewise a transaction that ended before the newest backup.
    assert_eq!(
        ledger.restore("xid_older_backup", &["--target-xid", &commit(27).1]),
        ledger.ids_through(27)
    );
}

#[test]
fn restore_refuses_bad_input_before_downloading() {
    if !pg15_available() {
        return;
    }
    let ledger = Ledger::new();
    let workspace = &ledger.workspace;
    let restore = |name: &str, arguments: &[&str]| {
        let data = workspace.path(name);
        let mut command = vec!["restore", "--pgdata", data.to_str().unwrap()];
        command.extend_from_slice(arguments);
        let output = workspace.pitr(&ledger.config, &command);
        assert_eq!(output.status.code(), Some(1), "{}", stderr_of(&output));
        assert!(
            !data.join("global/pg_control").exists(),
            "a refused restore must not leave a startable cluster"
        );
        stderr_of(&output)
    };

    assert_eq!(
        restore("zoneless", &["--target-time", "2026-11-20 14:30:00"]),
        "pitr restore: error: timestamp '2026-11-20 14:30:00' has no time zone; add one, for example '2026-11-20 14:30:00+00'"
    );
    let message = restore("too_early", &["--target-time", "2000-01-01 00:00:00+00"]);
    assert!(message.starts_with("pitr restore: error: time 2000-01-01 00:00:00.000000+00:00 is before the end of the earliest backup ("), "{message}");
    // Postgres can stop at a time only by replaying the first transaction that ended after
    // it, so a target equal to the last commit in the archive is already too late.
    let (_, last_xid, last_time, _) = ledger.commits.last().unwrap();
    let beyond = "Postgres stops at a time only on reaching the first transaction that ended after it, so recovery would end in FATAL. Restore without a target to reach the end of the archive, or wait until more WAL is archived";
    assert_eq!(
        restore("too_late", &["--target-time", &format!("{last_time}+00")]),
        format!(
            "pitr restore: error: time {last_time}+00:00 is not before the last transaction end in the archive (transaction {last_xid}, committed at {last_time}+00); {beyond}"
        )
    );
    assert_eq!(
        restore("far_too_late", &["--target-time", "2099-01-01 00:00:00+00"]),
        format!(
            "pitr restore: error: time 2099-01-01 00:00:00.000000+00:00 is not before the last transaction end in the archive (transaction {last_xid}, committed at {last_time}+00); {beyond}"
        )
    );

    // A restore point the archive does not hold would replay to the end and stop in FATAL.
    let message = restore("no_such_point", &["--target-name", "no_such_point"]);
    assert!(
        message.starts_with(
            "pitr restore: error: restore point 'no_such_point' is not in the archive after backup "
        ),
        "{message}"
    );
    assert!(
        message.ends_with("; Postgres would replay to the end and stop with FATAL. Check the name (pg_create_restore_point), or restore to a time or LSN instead"),
        "{message}"
    );

    // So would a transaction id that never ends in the archive, or ended before the backup.
    let unused_xid = (last_xid.parse::<u64>().unwrap() + 1000).to_string();
    let (_, early_xid, _, _) = &ledger.commits[0];
    for (name, xid) in [
        ("no_such_xid", &unused_xid),
        ("xid_before_backup", early_xid),
    ] {
        let message = restore(name, &["--target-xid", xid]);
        assert!(
            message.starts_with(&format!(
                "pitr restore: error: transaction {xid} does not end in the archive after the start of backup "
            )),
            "{message}"
        );
        assert!(
            message.ends_with("; Postgres would replay to the end and stop with FATAL. Check the id (a top-level transaction's, as txid_current() shows it), restore from an earlier backup with --backup, or restore to a time or LSN instead"),
            "{message}"
        );
    }

    let occupied = workspace.path("occupied");
    std::fs::create_dir(&occupied).unwrap();
    std::fs::write(occupied.join("stale"), "x").unwrap();
    workspace.give_to_postgres(&occupied);
    assert_eq!(
        restore("occupied", &[]),
        format!(
            "pitr restore: error: {} is not empty; restore into an empty directory, or pass --delta to reuse the files that match",
            occupied.display()
        )
    );

    let other_keyring = workspace.keygen("other-keyring");
    let wrong = workspace.write_config(
        "wrong.toml",
        &format!(
            "repo = 'file://{}'\nkey_file = '{}'\n",
            ledger.repository.display(),
            other_keyring.display()
        ),
    );
    let data = workspace.path("wrong_key");
    let output = workspace.pitr(&wrong, &["restore", "--pgdata", data.to_str().unwrap()]);
    assert!(
        stderr_of(&output).starts_with("pitr restore: error: wrong keyring for repository "),
        "{}",
        stderr_of(&output)
    );

    // A segment missing in the middle of the range fails before download, naming it.
    let segments = wal_objects(&ledger.repository);
    let victim = &segments[segments.len() / 2];
    let saved = std::fs::read(victim).unwrap();
    std::fs::remove_file(victim).unwrap();
    let name = victim.file_name().unwrap().to_str().unwrap();
    let message = restore("gap", &[]);
    assert!(message.starts_with(&format!("pitr restore: error: WAL segment {name} is missing from the archive, so recovery from backup ")), "{message}");
    assert!(
        !workspace.path("gap").join("base").exists(),
        "nothing may be downloaded"
    );
    std::fs::write(victim, saved).unwrap();

    // A corrupt chunk fails the restore, names the file, and leaves a directory that cannot start.
    let chunk = largest_chunk(&ledger.repository);
    let original = std::fs::read(&chunk).unwrap();
    let mut damaged = original.clone();
    let last = damaged.len() - 5;
    damaged[last] ^= 0x40;
    std::fs::write(&chunk, &damaged).unwrap();
    let message = restore("corrupt", &[]);
    assert!(
        message.starts_with("pitr restore: error: restoring "),
        "{message}"
    );
    assert!(
        message.contains("the restored directory is incomplete and will not start"),
        "{message}"
    );
    assert!(message.contains("failed authentication"), "{message}");
    std::fs::write(&chunk, original).unwrap();
}

#[test]
fn incremental_backups_and_delta_restores_match_clean_ones() {
    if !pg15_available() {
        return;
    }
    let ledger = Ledger::new();
    ledger.primary.sql("create table bulk as select g as id, md5(g::text) || repeat('x', 200) as payload from generate_series(1, 200000) g");
    ledger.primary.sql("alter table bulk add primary key (id)");
    // Settle hint bits and the visibility map first: otherwise the first read of every page
    // after the backup rewrites it, and any block-level backup tool would send it all again.
    ledger.primary.sql("vacuum (freeze, analyze) bulk");
    ledger.primary.sql("checkpoint");
    let first = ledger.backup();
    ledger
        .primary
        .sql("update bulk set payload = 'changed' where id <= 50");
    ledger.primary.sql("checkpoint");
    let second = ledger.backup();
    let uploaded = |report: &str| -> u64 {
        let sent = report
            .split(" MiB uploaded")
            .next()
            .unwrap()
            .rsplit(' ')
            .next()
            .unwrap();
        sent.parse().unwrap()
    };
    let total = |report: &str| -> u64 {
        report
            .split("complete: ")
            .nth(1)
            .unwrap()
            .split(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    assert!(total(&first) >= 60, "the database should be large: {first}");
    assert!(
        uploaded(&second) * 10 < uploaded(&first),
        "the second backup sent too much:\n{first}\n{second}"
    );

    ledger.primary.sql("select pg_switch_wal()");
    ledger.primary.wait_until_archived(Duration::from_secs(60));
    let expected = ledger
        .primary
        .sql("select count(*), sum(length(payload)) from bulk");
    let listing = ledger
        .workspace
        .pitr(&ledger.config, &["list", "--output", "json"]);
    let listing: serde_json::Value = serde_json::from_slice(&listing.stdout).unwrap();
    let backups = listing["backups"].as_array().unwrap();
    assert_eq!(backups.len(), 3);
    assert_eq!(backups[2]["incremental"], true);

    let check = |name: &str, arguments: &[&str]| {
        let data = ledger.workspace.path(name);
        let mut command = vec!["restore", "--pgdata", data.to_str().unwrap()];
        command.extend_from_slice(arguments);
        let output = ledger.workspace.pitr(&ledger.config, &command);
        assert!(output.status.success(), "{}", stderr_of(&output));
        let mut cluster = Cluster::existing(&ledger.workspace, name);
        cluster.append_settings("archive_mode = off");
        cluster.start();
        cluster.wait_for("select pg_is_in_recovery()", "f", Duration::from_secs(120));
        let found = cluster.sql("select count(*), sum(length(payload)) from bulk");
        cluster.stop();
        found
    };
    let older = backups[1]["id"].as_str().unwrap().to_string();
    let newer = backups[2]["id"].as_str().unwrap().to_string();
    assert_eq!(check("from_older", &["--backup", &older]), expected);
    assert_eq!(check("from_newer", &["--backup", &newer]), expected);

    // --delta over the stale copy restored before: same result as a clean restore.
    let stale = ledger.workspace.path("from_older");
    std::fs::remove_file(stale.join("recovery.signal")).ok();
    let output = ledger.workspace.pitr(
        &ledger.config,
        &[
            "restore",
            "--pgdata",
            stale.to_str().unwrap(),
            "--delta",
            "--backup",
            &newer,
        ],
    );
    assert!(output.status.success(), "{}", stderr_of(&output));
    let mut cluster = Cluster::existing(&ledger.workspace, "from_older");
    cluster.append_settings("archive_mode = off");
    cluster.start();
    cluster.wait_for("select pg_is_in_recovery()", "f", Duration::from_secs(120));
    assert_eq!(
        cluster.sql("select count(*), sum(length(payload)) from bulk"),
        expected
    );
    assert_eq!(cluster.sql("select count(*) from ledger"), "45");
}

#[test]
fn a_backup_under_load_restores_consistent_and_follows_a_timeline_switch() {
    if !pg15_available() {
        return;
    }
    let ledger = Ledger::new();
    let primary = &ledger.primary;
    primary.pgbench(&["-i", "-s", "5", "-q"]);
    let load = {
        let bin = primary.bin.join("pgbench");
        let socket = primary.socket_directory.clone();
        let port = primary.port;
        std::thread::spawn(move || {
            support::run_checked(
                support::as_postgres_bounded(&bin, 300)
                    .args(["-h"])
                    .arg(&socket)
                    .args([
                        "-p",
                        &port.to_string(),
                        "-U",
                        "postgres",
                        "-c",
                        "2",
                        "-T",
                        "8",
                        "postgres",
                    ]),
            )
        })
    };
    std::thread::sleep(Duration::from_secs(2));
    ledger.backup();
    load.join().unwrap();
    primary.sql("select pg_switch_wal()");
    primary.wait_until_archived(Duration::from_secs(60));
    let expected = primary.sql("select count(*), sum(abalance) from pgbench_accounts");

    // Restore to the end, promote (timeline 2), write more there, then restore to a time on timeline 2.
    let config2 = ledger.workspace.write_config(
        "second.toml",
        &std::fs::read_to_string(&ledger.config)
            .unwrap()
            .replace("/primary'", "/promoted'"),
    );
    let data = ledger.workspace.path("promoted");
    let output = ledger
        .workspace
        .pitr(&config2, &["restore", "--pgdata", data.to_str().unwrap()]);
    assert!(output.status.success(), "{}", stderr_of(&output));
    let mut promoted = Cluster::existing(&ledger.workspace, "promoted");
    promoted.start();
    promoted.wait_for("select pg_is_in_recovery()", "f", Duration::from_secs(120));
    assert_eq!(
        promoted.sql("select count(*), sum(abalance) from pgbench_accounts"),
        expected
    );
    let amcheck = support::as_postgres_bounded(&promoted.bin.join("pg_amcheck"), 300)
        .args(["-h"])
        .arg(&promoted.socket_directory)
        .args([
            "-p",
            &promoted.port.to_string(),
            "-U",
            "postgres",
            "--install-missing",
            "--heapallindexed",
            "postgres",
        ])
        .output()
        .unwrap();
    assert!(
        amcheck.status.success(),
        "pg_amcheck found corruption: {}{}",
        String::from_utf8_lossy(&amcheck.stdout),
        stderr_of(&amcheck)
    );
    assert_eq!(
        promoted.sql("select timeline_id from pg_control_checkpoint()"),
        "2"
    );
    promoted.sql("insert into ledger values (1000, 'on timeline 2')");
    let after =
        promoted.sql("select to_char(now() at time zone 'UTC', 'YYYY-MM-DD HH24:MI:SS.US')");
    std::thread::sleep(Duration::from_millis(50));
    promoted.sql("insert into ledger values (1001, 'later on timeline 2')");
    promoted.sql("select pg_switch_wal()");
    promoted.wait_until_archived(Duration::from_secs(60));
    promoted.stop();

    let ids = ledger.restore("on_timeline_2", &["--target-time", &format!("{after}+00")]);
    assert!(ids.contains(&1000) && !ids.contains(&1001), "{ids:?}");
}

fn wal_objects(repository: &Path) -> Vec<PathBuf> {
    let mut segments: Vec<PathBuf> = support::snapshot(&repository.join("wal/00000001"))
        .into_iter()
        .map(|(path, _)| path)
        .filter(|path| path.file_name().unwrap().len() == 24)
        .collect();
    segments.sort();
    segments
}

fn largest_chunk(repository: &Path) -> PathBuf {
    support::snapshot(&repository.join("chunks"))
        .into_iter()
        .max_by_key(|(_, bytes)| bytes.len())
        .unwrap()
        .0
}

#[test]
fn corrupt_pages_fail_the_backup_unless_told_to_continue() {
    if !pg15_available() {
        return;
    }
    let mut ledger = Ledger::new();
    let relation = ledger.primary.sql("select pg_relation_filepath('ledger')");
    ledger.primary.stop();
    let file = ledger.primary.data.join(&relation);
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[4000] ^= 0x01;
    std::fs::write(&file, bytes).unwrap();
    ledger.primary.start();
    let output = ledger.workspace.pitr_with_env(
        &ledger.config,
        &["backup"],
        &ledger.primary.libpq_environment(),
    );
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(
        stderr_of(&output).lines().last().unwrap(),
        format!(
            "pitr backup: error: page checksum verification failed for 1 page(s): {relation} block 0; the backup was not recorded. Repair the corruption, or pass --ignore-checksum-failures to keep the backup anyway"
        )
    );
    let output = ledger.workspace.pitr_with_env(
        &ledger.config,
        &["backup", "--ignore-checksum-failures"],
        &ledger.primary.libpq_environment(),
    );
    assert!(output.status.success(), "{}", stderr_of(&output));
    assert!(stderr_of(&output).contains(&format!(
        "page checksum failure kept in the backup: {relation} block 0"
    )));
}

#[test]
fn tablespaces_return_to_their_place_or_where_they_are_mapped() {
    if !pg15_available() {
        return;
    }
    let ledger = Ledger::new();
    let workspace = &ledger.workspace;
    let original = workspace.path("ts_original");
    std::fs::create_dir(&original).unwrap();
    workspace.give_to_postgres(&original);
    ledger.primary.sql(&format!(
        "create tablespace extra location '{}'",
        original.display()
    ));
    ledger.primary.sql(
        "create table spaced tablespace extra as select g as id from generate_series(1, 5000) g",
    );
    let oid = ledger
        .primary
        .sql("select oid from pg_tablespace where spcname = 'extra'");
    ledger.backup();
    ledger
        .primary
        .sql("insert into spaced select g from generate_series(5001, 6000) g");
    ledger.primary.sql("select pg_switch_wal()");
    ledger.primary.wait_until_archived(Duration::from_secs(60));

    // The original location holds the live cluster's tablespace: refused before any write.
    let refused = workspace.path("refused");
    let output = workspace.pitr(
        &ledger.config,
        &["restore", "--pgdata", refused.to_str().unwrap()],
    );
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(
        stderr_of(&output),
        format!(
            "pitr restore: error: tablespace {oid} belongs at {}, which is not empty; restore it elsewhere with --tablespace-map {oid}=DIR, inside the data directory with --tablespace-in-place, or over it with --delta",
            original.display()
        )
    );
    assert!(!refused.exists(), "a refused restore writes nothing");
    let output = workspace.pitr(
        &ledger.config,
        &[
            "restore",
            "--pgdata",
            refused.to_str().unwrap(),
            "--tablespace-map",
            "1=/nowhere",
        ],
    );
    let message = stderr_of(&output);
    assert!(
        message.ends_with(&format!(
            "has no tablespace with OID 1; its tablespaces are: {oid} ({})",
            original.display()
        )),
        "{message}"
    );

    let moved = workspace.path("ts_moved");
    let mapping = format!("{oid}={}", moved.display());
    assert_eq!(
        ledger.restore_and_query(
            "mapped",
            &["--tablespace-map", &mapping],
            "select count(*), max(id) from spaced"
        ),
        "6000|6000"
    );
    let link = workspace.path("mapped").join("pg_tblspc").join(&oid);
    assert_eq!(std::fs::read_link(&link).unwrap(), moved);
    assert!(
        std::fs::read_dir(&moved)
            .unwrap()
            .flatten()
            .any(|entry| entry.file_name().to_string_lossy().starts_with("PG_15_")),
        "the tablespace's files are in {}",
        moved.display()
    );

    assert_eq!(
        ledger.restore_and_query(
            "in_place",
            &["--tablespace-in-place"],
            "select count(*), max(id) from spaced"
        ),
        "6000|6000"
    );
    let in_place = workspace.path("in_place").join("pg_tblspc").join(&oid);
    assert!(std::fs::symlink_metadata(&in_place).unwrap().is_dir());
}

#[test]
fn a_torn_chunk_left_by_an_interrupted_backup_is_replaced_not_reused() {
    if !pg15_available() {
        return;
    }
    let ledger = Ledger::new();
    // Without its manifest the backup never happened, but its chunks stay: what a backup
    // killed before its manifest leaves. A power cut can leave such a chunk empty.
    std::fs::remove_dir_all(ledger.repository.join("backups")).unwrap();
    let torn = largest_chunk(&ledger.repository);
    std::fs::write(&torn, b"").unwrap();

    let output = ledger.workspace.pitr_with_env(
        &ledger.config,
        &["backup"],
        &ledger.primary.libpq_environment(),
    );
    assert!(output.status.success(), "backup: {}", stderr_of(&output));
    assert!(
        stderr_of(&output).contains("replacing a damaged chunk that no backup references"),
        "{}",
        stderr_of(&output)
    );
    assert!(std::fs::metadata(&torn).unwrap().len() > 0);
    assert_eq!(
        ledger.restore("after_torn_chunk", &[]),
        ledger.ids_through(45)
    );
}

#[test]
fn backup_and_restore_on_an_s3_repository() {
    if !pg15_available() {
        return;
    }
    let workspace = Workspace::new();
    let Some(s3) = S3Server::start(&workspace) else {
        return;
    };
    let config = s3.encrypted_repository_config(&workspace);
    let archive_command = workspace.archive_command(&config);
    let mut primary = Cluster::init_with(
        &workspace,
        "primary",
        &format!("wal_level = replica\narchive_mode = on\narchive_command = '{archive_command}'"),
        &["--data-checksums"],
    );
    primary.start();
    // A relation file of tens of chunks and many small files: a remote restore keeps many
    // transfers in flight within one file and across files.
    primary.sql("create table bulk as select g as id, md5(g::text) || repeat('x', 200) as payload from generate_series(1, 120000) g");
    let output = workspace.pitr_with_env(&config, &["backup"], &primary.libpq_environment());
    assert!(output.status.success(), "backup: {}", stderr_of(&output));
    primary.sql("insert into bulk values (0, 'after the backup')");
    primary.sql("select pg_switch_wal()");
    primary.wait_until_archived(Duration::from_secs(60));
    let expected = primary.sql("select count(*), sum(length(payload)) from bulk");

    let data = workspace.path("restored");
    let output = workspace.pitr(&config, &["restore", "--pgdata", data.to_str().unwrap()]);
    assert!(output.status.success(), "restore: {}", stderr_of(&output));
    primary.stop();
    // The restore set the prefetch worker on the backup's first segment while the base
    // downloaded, so recovery's first request is served from the spool.
    let label = std::fs::read_to_string(data.join("backup_label")).unwrap();
    let first_segment = label
        .split("(file ")
        .nth(1)
        .and_then(|rest| rest.split(')').next())
        .unwrap()
        .to_string();
    let spooled = data.join("pg_wal/pitr-prefetch").join(&first_segment);
    let waited = std::time::Instant::now();
    while !spooled.exists() {
        assert!(
            waited.elapsed() < Duration::from_secs(30),
            "{first_segment} was never prefetched into the restored directory's spool"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut restored = Cluster::existing(&workspace, "restored");
    restored.append_settings("archive_mode = off");
    restored.start();
    restored.wait_for("select pg_is_in_recovery()", "f", Duration::from_secs(120));
    assert_eq!(
        restored.sql("select count(*), sum(length(payload)) from bulk"),
        expected
    );
    assert_eq!(
        restored.sql("select payload from bulk where id = 0"),
        "after the backup"
    );
}

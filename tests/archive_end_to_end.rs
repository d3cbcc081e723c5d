//! End to end with a real PostgreSQL 15: archive_command = pitr archive-push, then a second,
//! empty data directory recovers from a base backup using only restore_command = pitr
//! archive-get, on a file:// repository and on a real S3 server.

mod support;

use std::path::Path;
use std::time::Duration;

use support::{Cluster, S3Server, Workspace, pg15_available};

const MARKER: &str = "PITR-PLAINTEXT-MARKER-7f3a9c";
const TABLES: [&str; 5] = [
    "pgbench_accounts",
    "pgbench_branches",
    "pgbench_tellers",
    "pgbench_history",
    "marker",
];

#[test]
fn archive_and_recover_on_a_file_repository() {
    if !pg15_available() {
        return;
    }
    let workspace = Workspace::new();
    let repository = workspace.path("repo");
    let store = format!("repo = 'file://{}'\n", repository.display());
    archive_and_recover(&workspace, &store, &repository, None);
}

#[test]
fn archive_and_recover_on_an_s3_repository() {
    if !pg15_available() {
        return;
    }
    let workspace = Workspace::new();
    let Some(s3) = S3Server::start(&workspace) else {
        return;
    };
    let store = format!(
        "repo = 's3://{}/clusters/main'\n{}",
        s3.bucket,
        s3.store_settings()
    );
    let proxy = support::DelayProxy::start(s3.port, Duration::from_millis(10));
    let far_store = format!(
        "repo = 's3://{}/clusters/main'\n{}",
        s3.bucket,
        s3.store_settings_at(proxy.port)
    );
    archive_and_recover(&workspace, &store, &s3.data, Some(&far_store));
}

/// `far_store` is `store` reached through a proxy that adds 20 ms of round trip (remote stores).
fn archive_and_recover(
    workspace: &Workspace,
    store: &str,
    storage_root: &Path,
    far_store: Option<&str>,
) {
    let keyring = workspace.keygen("keyring");
    let config = workspace.write_config(
        "pitr.toml",
        &format!(
            "key_file = '{}'\ncompression_threads = 1\nstore_timeout = 30\n{store}",
            keyring.display()
        ),
    );
    let archive_command = workspace.archive_command(&config);
    let mut primary = Cluster::init(
        workspace,
        "primary",
        &format!(
            "wal_level = replica\narchive_mode = on\narchive_command = '{archive_command}'\nwal_keep_size = '2GB'\nmax_wal_size = '2GB'"
        ),
    );
    primary.start();
    primary.pgbench(&["-i", "-s", "2", "-q"]);
    primary.sql("create table marker (note text)");
    primary.base_backup(workspace, "restored");

    primary.pgbench(&["-c", "2", "-t", "300"]);
    primary.sql(&format!("insert into marker values ('{MARKER}')"));
    for round in 0..20 {
        primary.sql(&format!(
            "insert into marker select 'round {round} row ' || g from generate_series(1, 500) g"
        ));
        primary.sql("select pg_switch_wal()");
    }
    primary.wait_until_archived(Duration::from_secs(180));
    let archiver = primary.sql("select archived_count, failed_count from pg_stat_archiver");
    let (archived, failed) = archiver.split_once('|').unwrap();
    assert_eq!(
        failed,
        "0",
        "pg_stat_archiver: {archiver}\n{}",
        primary.log()
    );
    assert!(
        archived.parse::<u32>().unwrap() >= 20,
        "only {archived} segments archived"
    );
    let counts: Vec<String> = TABLES
        .iter()
        .map(|table| primary.sql(&format!("select count(*) from {table}")))
        .collect();

    let segments = support::round_trip_archived_segments(workspace, &config, &primary.data);
    assert!(segments >= 20, "only {segments} segments round-tripped");
    // Postgres re-archives after a crash: the same file again is a success, on every store
    // (s3s-fs answers the create-only PUT of a taken name by closing the connection).
    let archived = std::fs::read_dir(primary.data.join("pg_wal/archive_status"))
        .unwrap()
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().into_string().unwrap();
            name.strip_suffix(".done").map(str::to_string)
        })
        .find(|name| name.len() == 24)
        .unwrap();
    let segment = primary.data.join("pg_wal").join(&archived);
    let output = workspace.pitr(&config, &["archive-push", segment.to_str().unwrap()]);
    assert!(
        output.status.success(),
        "re-push of {archived}: {}",
        support::stderr_of(&output)
    );
    if let Some(far_store) = far_store {
        repush_to_a_far_store(workspace, &keyring, far_store, &primary.data);
    }
    assert_marker_only_in_plaintext(&primary.data.join("pg_wal"), storage_root);
    primary.stop();

    let restored_data = workspace.path("restored");
    std::fs::write(restored_data.join("recovery.signal"), "").unwrap();
    let mut restored = Cluster::existing(workspace, "restored");
    restored.append_settings(&format!(
        "archive_mode = off\nrestore_command = '{} --config {} archive-get %f %p'",
        workspace.pitr.display(),
        config.display()
    ));
    workspace.give_to_postgres(&restored_data);
    restored.start();
    restored.wait_for("select pg_is_in_recovery()", "f", Duration::from_secs(180));
    for (table, expected) in TABLES.iter().zip(&counts) {
        assert_eq!(
            &restored.sql(&format!("select count(*) from {table}")),
            expected,
            "rows of {table}"
        );
    }
    assert_eq!(
        restored.sql(&format!(
            "select count(*) from marker where note = '{MARKER}'"
        )),
        "1"
    );
    let log = restored.log();
    assert!(
        log.matches("restored log file").count() >= 20,
        "recovery did not replay from the archive:\n{log}"
    );
}

/// A re-push to a remote store succeeds within a short deadline: a store that drops the
/// connection on a taken name (s3s-fs does) must not make it resend the segment with backoff
/// until the deadline passes. With the fullest segment, the refusal comes while its body is
/// still on the way.
fn repush_to_a_far_store(workspace: &Workspace, keyring: &Path, far_store: &str, data: &Path) {
    let (archived, segment) = fullest_archived_segment(&data.join("pg_wal"));
    let config = workspace.write_config(
        "pitr-far.toml",
        &format!(
            "key_file = '{}'\ncompression_threads = 1\nstore_timeout = 2\n{far_store}",
            keyring.display()
        ),
    );
    for call in 1..=5 {
        let output = workspace.pitr(&config, &["archive-push", segment.to_str().unwrap()]);
        assert!(
            output.status.success(),
            "re-push {call} of {archived} with store_timeout = 2: {}",
            support::stderr_of(&output)
        );
    }
}

/// The archived segment with the most non-zero bytes, and its path.
fn fullest_archived_segment(pg_wal: &Path) -> (String, std::path::PathBuf) {
    std::fs::read_dir(pg_wal.join("archive_status"))
        .unwrap()
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().into_string().unwrap();
            let segment = name.strip_suffix(".done").filter(|name| name.len() == 24)?;
            Some((segment.to_string(), pg_wal.join(segment)))
        })
        .max_by_key(|(_, path)| {
            let bytes = std::fs::read(path).unwrap();
            bytes.iter().filter(|&&byte| byte != 0).count()
        })
        .unwrap()
}

/// The marker is in the WAL Postgres wrote, and in no object the repository stores.
fn assert_marker_only_in_plaintext(pg_wal: &Path, storage_root: &Path) {
    let contains = |bytes: &[u8]| {
        bytes
            .windows(MARKER.len())
            .any(|window| window == MARKER.as_bytes())
    };
    let in_wal = support::snapshot(pg_wal)
        .iter()
        .any(|(_, bytes)| contains(bytes));
    assert!(
        in_wal,
        "the marker never reached the WAL, so the check below would prove nothing"
    );
    let objects = support::snapshot(storage_root);
    assert!(
        objects.len() >= 20,
        "expected the repository objects under {}",
        storage_root.display()
    );
    for (path, bytes) in objects {
        assert!(
            !contains(&bytes),
            "plaintext marker found in {}",
            path.display()
        );
    }
}

//! The sidecar daemon with a real PostgreSQL 15: archive ahead and the hook fast path, a kill -9
//! in the middle of the load, a store outage, prefetch during recovery (across a timeline
//! switch), the socket's and the HTTP API's access rules.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use support::{
    Cluster, DaemonProcess, S3Server, Workspace, free_port, http, metric, pg15_available, stderr_of,
};

const TOKEN: &str = "test-token-5f1e";

fn write_config(
    workspace: &Workspace,
    name: &str,
    store: &str,
    pgdata: &Path,
    http_port: u16,
) -> PathBuf {
    let keyring = workspace.path("keyring");
    if !keyring.exists() {
        workspace.keygen("keyring");
    }
    workspace.write_config(
        name,
        &format!(
            "key_file = '{}'\npgdata = '{}'\nhttp_addr = '127.0.0.1:{http_port}'\nhttp_token = '{TOKEN}'\narchive_concurrency = 2\ncompression_threads = 1\nstore_timeout = 4\nmax_archive_lag = 2\nprefetch = 4\n{store}",
            keyring.display(),
            pgdata.display()
        ),
    )
}

fn archiving_cluster(workspace: &Workspace, name: &str, config: &Path) -> Cluster {
    let command = workspace.archive_command(config);
    Cluster::init(
        workspace,
        name,
        &format!(
            "wal_level = replica\narchive_mode = on\narchive_command = '{command}'\nwal_keep_size = '4GB'\nmax_wal_size = '4GB'\narchive_timeout = 0"
        ),
    )
}

/// Writes a little and switches to a new segment, `rounds` times.
fn switch_segments(cluster: &Cluster, rounds: usize) {
    for round in 0..rounds {
        cluster.sql(&format!(
            "insert into ledger select {round}, g from generate_series(1, 200) g"
        ));
        cluster.sql("select pg_switch_wal()");
    }
}

fn archived_and_failed(cluster: &Cluster) -> (u64, u64) {
    let row = cluster.sql("select archived_count, failed_count from pg_stat_archiver");
    let (archived, failed) = row.split_once('|').unwrap();
    (archived.parse().unwrap(), failed.parse().unwrap())
}

#[test]
fn the_daemon_archives_ahead_survives_kill_9_and_guards_its_interfaces() {
    if !pg15_available() {
        return;
    }
    let workspace = Workspace::new();
    let repository = workspace.path("repo");
    let http_port = free_port();
    let primary_data = workspace.path("primary");
    let config = write_config(
        &workspace,
        "pitr.toml",
        &format!("repo = 'file://{}'\n", repository.display()),
        &primary_data,
        http_port,
    );
    let mut primary = archiving_cluster(&workspace, "primary", &config);
    primary.start();
    primary.sql("create table ledger (round int, item int)");
    let mut daemon = DaemonProcess::start(&workspace, &config, &primary, http_port);

    switch_segments(&primary, 30);
    primary.wait_until_archived(Duration::from_secs(120));
    let before_kill = daemon.metrics();
    let answered = metric(&before_kill, "pitr_hook_requests_total{result=\"durable\"}")
        + metric(&before_kill, "pitr_hook_requests_total{result=\"waited\"}");
    assert!(
        answered >= 30.0,
        "the daemon answered only {answered} hooks:\n{before_kill}"
    );
    assert_eq!(
        metric(&before_kill, "pitr_hook_requests_total{result=\"failed\"}"),
        0.0
    );
    assert!(metric(&before_kill, "pitr_archived_segments_total") >= 30.0);
    // Only segments count as segments; no history or .backup file was archived here.
    assert_eq!(metric(&before_kill, "pitr_archived_other_files_total"), 0.0);
    assert_eq!(
        metric(
            &before_kill,
            &format!(
                "pitr_build_info{{version=\"{}\"}}",
                env!("CARGO_PKG_VERSION")
            )
        ),
        1.0
    );
    support::assert_valid_prometheus_text(&before_kill);

    daemon.kill_hard();
    switch_segments(&primary, 10);
    primary.wait_until_archived(Duration::from_secs(120));

    let daemon = DaemonProcess::start(&workspace, &config, &primary, http_port);
    switch_segments(&primary, 30);
    primary.wait_until_archived(Duration::from_secs(120));
    let after_restart = daemon.metrics();
    let answered = metric(
        &after_restart,
        "pitr_hook_requests_total{result=\"durable\"}",
    ) + metric(
        &after_restart,
        "pitr_hook_requests_total{result=\"waited\"}",
    );
    assert!(
        answered >= 30.0,
        "after the restart the daemon answered only {answered} hooks"
    );

    let (archived, failed) = archived_and_failed(&primary);
    assert_eq!(failed, 0, "{}", primary.log());
    assert!(archived >= 70, "only {archived} archived");
    assert!(support::round_trip_archived_segments(&workspace, &config, &primary_data) >= 64);
    let listing = workspace.pitr(&config, &["wal", "list", "--output", "json"]);
    let listing: serde_json::Value = serde_json::from_slice(&listing.stdout).unwrap();
    assert_eq!(
        listing["timelines"][0]["gaps"],
        serde_json::json!([]),
        "{listing}"
    );

    let (status, _) = http(http_port, "POST", "/archive/rescan", None);
    assert_eq!(
        status, 401,
        "a state change without the token must be refused"
    );
    let (status, _) = http(http_port, "POST", "/archive/rescan", Some("wrong"));
    assert_eq!(status, 401);
    let (status, _) = http(http_port, "POST", "/archive/rescan", Some(TOKEN));
    assert_eq!(status, 202);
    let (status, body) = http(http_port, "GET", "/status", None);
    assert_eq!(status, 200);
    let status: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(status["archive"]["ready_not_archived"], 0, "{status}");
    assert!(
        status["archive"]["last_archived_segment"].is_string(),
        "{status}"
    );
    let (code, body) = http(http_port, "GET", "/readyz", None);
    assert_eq!(code, 200, "{body}");

    if support::is_root() {
        // root can reach the socket despite its mode, so the daemon's peer check must refuse it.
        use std::io::{Read, Write};
        let mut stream =
            std::os::unix::net::UnixStream::connect(primary_data.join("pitr.sock")).unwrap();
        stream.write_all(b"push /etc/passwd\n").unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        assert!(
            answer.starts_with("err the pitr daemon only answers its own user (uid "),
            "{answer}"
        );
        let other_user = std::process::Command::new("runuser")
            .args(["-u", "nobody", "--", "python3", "-c"])
            .arg(format!(
                "import socket; socket.socket(socket.AF_UNIX).connect('{}')",
                primary_data.join("pitr.sock").display()
            ))
            .output()
            .unwrap();
        assert!(!other_user.status.success());
        assert!(
            stderr_of(&other_user).contains("PermissionError"),
            "{}",
            stderr_of(&other_user)
        );
    }
}

#[test]
fn a_store_outage_fails_fast_keeps_the_wal_and_recovers() {
    if !pg15_available() {
        return;
    }
    let workspace = Workspace::new();
    let Some(s3) = S3Server::start(&workspace) else {
        return;
    };
    let http_port = free_port();
    let primary_data = workspace.path("primary");
    let store = format!(
        "repo = 's3://{}/outage'\n{}",
        s3.bucket,
        s3.store_settings()
    );
    let config = write_config(&workspace, "pitr.toml", &store, &primary_data, http_port);
    let mut primary = archiving_cluster(&workspace, "primary", &config);
    primary.start();
    primary.sql("create table ledger (round int, item int)");
    let daemon = DaemonProcess::start(&workspace, &config, &primary, http_port);
    switch_segments(&primary, 5);
    primary.wait_until_archived(Duration::from_secs(60));

    let s3 = s3.stop();
    switch_segments(&primary, 5);
    let started = std::time::Instant::now();
    primary.wait_for(
        "select failed_count > 0 from pg_stat_archiver",
        "t",
        Duration::from_secs(60),
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "archive-push did not fail fast"
    );
    std::thread::sleep(Duration::from_secs(3));
    let ready =
        primary.sql("select count(*) from pg_ls_archive_statusdir() where name like '%.ready'");
    assert!(
        ready.parse::<u32>().unwrap() >= 5,
        "Postgres must keep the unarchived WAL, {ready} ready"
    );
    let (code, body) = http(http_port, "GET", "/readyz", None);
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("cannot reach the repository"), "{body}");
    let metrics = daemon.metrics();
    assert!(
        metric(&metrics, "pitr_wal_not_archived_bytes") >= 5.0 * 16.0 * 1048576.0,
        "{metrics}"
    );
    assert!(
        metric(&metrics, "pitr_archive_lag_seconds") > 2.0,
        "{metrics}"
    );
    assert!(metric(&metrics, "pitr_archive_failures_total") > 0.0);

    let _s3 = s3.restart();
    primary.wait_until_archived(Duration::from_secs(120));
    assert!(support::round_trip_archived_segments(&workspace, &config, &primary_data) >= 10);
    let (code, body) = http(http_port, "GET", "/readyz", None);
    assert_eq!(code, 200, "{body}");
}

#[test]
fn an_outage_spool_keeps_archiving_while_the_store_is_down_and_drains_after() {
    if !pg15_available() {
        return;
    }
    let workspace = Workspace::new();
    let Some(s3) = S3Server::start(&workspace) else {
        return;
    };
    let http_port = free_port();
    let primary_data = workspace.path("primary");
    let spool = workspace.path("outage-spool");
    std::fs::create_dir(&spool).unwrap();
    workspace.give_to_postgres(&spool);
    let store = format!(
        "repo = 's3://{}/spooled'\noutage_spool = '{}'\n{}",
        s3.bucket,
        spool.display(),
        s3.store_settings()
    );
    let config = write_config(&workspace, "pitr.toml", &store, &primary_data, http_port);
    let mut primary = archiving_cluster(&workspace, "primary", &config);
    primary.start();
    primary.sql("create table ledger (round int, item int)");
    let daemon = DaemonProcess::start(&workspace, &config, &primary, http_port);
    switch_segments(&primary, 3);
    primary.wait_until_archived(Duration::from_secs(60));
    let before_outage = primary.sql("select last_archived_wal from pg_stat_archiver");

    // During the outage every segment is archived all the same: into the spool.
    let s3 = s3.stop();
    switch_segments(&primary, 5);
    primary.wait_until_archived(Duration::from_secs(120));
    let (_, failed) = archived_and_failed(&primary);
    assert_eq!(failed, 0, "{}", primary.log());
    let metrics = daemon.metrics();
    assert!(
        metric(&metrics, "pitr_spooled_segments_total") >= 5.0,
        "{metrics}"
    );
    assert!(
        metric(&metrics, "pitr_outage_spool_objects") >= 5.0,
        "{metrics}"
    );
    let (code, status) = http(http_port, "GET", "/status", None);
    assert_eq!(code, 200, "{status}");
    assert!(status.contains("\"outage_spool\":{"), "{status}");
    let (code, body) = http(http_port, "GET", "/readyz", None);
    assert_eq!(code, 503, "the store is down: {body}");

    // A hook without the daemon spools too, checking the cluster against the spool's copy of
    // the identity; a segment the repository holds already is spooled again, and later
    // settled by comparing contents.
    let direct = workspace.write_config(
        "pitr-direct.toml",
        &std::fs::read_to_string(&config).unwrap().replace(
            "[store]",
            &format!(
                "socket = '{}'\n[store]",
                workspace.path("no-daemon.sock").display()
            ),
        ),
    );
    let segment = primary_data.join("pg_wal").join(&before_outage);
    let output = workspace.pitr(&direct, &["archive-push", segment.to_str().unwrap()]);
    assert!(
        output.status.success(),
        "direct push during the outage: {}",
        stderr_of(&output)
    );
    assert!(
        stderr_of(&output).contains("kept in the outage spool until it answers"),
        "{}",
        stderr_of(&output)
    );

    // A restore_command without the daemon, the store still down, restores a segment archived
    // during the outage from the spool, checking the cluster against the spool's identity copy
    // instead of asking the store.
    let during_outage = primary.sql("select last_archived_wal from pg_stat_archiver");
    let restored = workspace.path("restored-during-outage");
    let output = workspace.pitr(
        &direct,
        &["archive-get", &during_outage, restored.to_str().unwrap()],
    );
    assert!(
        output.status.success(),
        "direct get during the outage: {}",
        stderr_of(&output)
    );
    assert!(
        std::fs::read(&restored).unwrap()
            == std::fs::read(primary_data.join("pg_wal").join(&during_outage)).unwrap(),
        "{during_outage} restored from the spool differs"
    );

    // Back up: the daemon moves everything into the repository and empties the spool.
    let _s3 = s3.restart();
    let started = std::time::Instant::now();
    while metric(&daemon.metrics(), "pitr_outage_spool_objects") > 0.0 {
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "the spool did not drain: {}\n{}",
            daemon.metrics(),
            workspace.daemon_log()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let left: Vec<_> = walk_files(&spool)
        .into_iter()
        .filter(|path| !path.ends_with("pitr.identity"))
        .collect();
    assert!(left.is_empty(), "left in the spool: {left:?}");
    assert!(support::round_trip_archived_segments(&workspace, &config, &primary_data) >= 8);
    let (code, body) = http(http_port, "GET", "/readyz", None);
    assert_eq!(code, 200, "{body}");
}

fn walk_files(root: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(root).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(walk_files(&path));
        } else {
            files.push(path);
        }
    }
    files
}

#[test]
fn recovery_is_fed_by_prefetch_across_a_timeline_switch() {
    if !pg15_available() {
        return;
    }
    let workspace = Workspace::new();
    let repository = workspace.path("repo");
    let store = format!("repo = 'file://{}'\n", repository.display());
    let primary_http = free_port();
    let primary_config = write_config(
        &workspace,
        "primary.toml",
        &store,
        &workspace.path("primary"),
        primary_http,
    );
    let mut primary = archiving_cluster(&workspace, "primary", &primary_config);
    primary.start();
    primary.sql("create table ledger (round int, item int)");
    let primary_daemon = DaemonProcess::start(&workspace, &primary_config, &primary, primary_http);
    let backup = primary.base_backup(&workspace, "backup");
    switch_segments(&primary, 24);
    primary.wait_until_archived(Duration::from_secs(120));
    let expected = primary.sql("select count(*) from ledger");
    primary.stop();
    drop(primary_daemon);

    // First recovery: replay to the end of timeline 1 through the daemon, then promote (timeline 2)
    // and keep archiving from there.
    let first = copy_backup(&workspace, &backup, "first");
    let first_http = free_port();
    let first_config = write_config(&workspace, "first.toml", &store, &first, first_http);
    let mut replica = recovering_cluster(&workspace, "first", &first_config, true);
    let first_daemon = DaemonProcess::start(&workspace, &first_config, &replica, first_http);
    replica.start();
    replica.wait_for("select pg_is_in_recovery()", "f", Duration::from_secs(180));
    assert_eq!(replica.sql("select count(*) from ledger"), expected);
    let metrics = first_daemon.metrics();
    assert!(
        metric(&metrics, "pitr_prefetch_hits_total") >= 10.0,
        "prefetch did not feed recovery:\n{metrics}"
    );
    assert_eq!(
        replica.sql("select timeline_id from pg_control_checkpoint()"),
        "2"
    );
    switch_segments(&replica, 8);
    replica.wait_until_archived(Duration::from_secs(120));
    let expected_after_switch = replica.sql("select count(*) from ledger");
    replica.stop();
    drop(first_daemon);

    // Second recovery, from the same backup: it must follow the history file onto timeline 2.
    let second = copy_backup(&workspace, &backup, "second");
    let second_http = free_port();
    let second_config = write_config(&workspace, "second.toml", &store, &second, second_http);
    let mut second_cluster = recovering_cluster(&workspace, "second", &second_config, false);
    let second_daemon =
        DaemonProcess::start(&workspace, &second_config, &second_cluster, second_http);
    second_cluster.start();
    second_cluster.wait_for("select pg_is_in_recovery()", "f", Duration::from_secs(180));
    assert_eq!(
        second_cluster.sql("select count(*) from ledger"),
        expected_after_switch
    );
    assert_eq!(
        second_cluster.sql("select timeline_id from pg_control_checkpoint()"),
        "3"
    );
    let metrics = second_daemon.metrics();
    assert!(
        metric(&metrics, "pitr_prefetch_hits_total") >= 10.0,
        "{metrics}"
    );
}

fn copy_backup(workspace: &Workspace, backup: &Path, name: &str) -> PathBuf {
    let target = workspace.path(name);
    support::run_checked(
        std::process::Command::new("cp")
            .arg("-a")
            .arg(backup)
            .arg(&target),
    );
    std::fs::write(target.join("recovery.signal"), "").unwrap();
    workspace.give_to_postgres(&target);
    target
}

fn recovering_cluster(workspace: &Workspace, name: &str, config: &Path, archive: bool) -> Cluster {
    let cluster = Cluster::existing(workspace, name);
    let pitr = workspace.pitr.display();
    cluster.append_settings(&format!(
        "restore_command = '{pitr} --config {config} archive-get %f %p'\narchive_mode = {}\narchive_command = '{pitr} --config {config} archive-push %p'",
        if archive { "on" } else { "off" },
        config = config.display()
    ));
    cluster
}

#[test]
fn archive_get_without_a_daemon_prefetches_into_a_spool() {
    if !pg15_available() {
        return;
    }
    let workspace = Workspace::new();
    let repository = workspace.path("repo");
    let store = format!("repo = 'file://{}'\n", repository.display());
    let config = write_config(
        &workspace,
        "pitr.toml",
        &store,
        &workspace.path("primary"),
        free_port(),
    );
    let mut primary = archiving_cluster(&workspace, "primary", &config);
    primary.start();
    primary.sql("create table ledger (round int, item int)");
    switch_segments(&primary, 8);
    primary.wait_until_archived(Duration::from_secs(60));
    let mut segments: Vec<String> = std::fs::read_dir(primary.data.join("pg_wal/archive_status"))
        .unwrap()
        .flatten()
        .filter_map(|entry| {
            entry
                .file_name()
                .into_string()
                .ok()?
                .strip_suffix(".done")
                .map(str::to_string)
        })
        .filter(|name| name.len() == 24)
        .collect();
    segments.sort();

    // A stand-in data directory for a cluster in recovery, with no daemon running.
    let stage = workspace.path("stage");
    std::fs::create_dir_all(stage.join("pg_wal")).unwrap();
    workspace.give_to_postgres(&stage);
    let stage_config = write_config(&workspace, "stage.toml", &store, &stage, free_port());
    let spool = stage.join("pg_wal/pitr-prefetch");
    let get = |name: &str| {
        let destination = stage.join("pg_wal/RECOVERYXLOG");
        let output = workspace.pitr(
            &stage_config,
            &["archive-get", name, destination.to_str().unwrap()],
        );
        assert!(output.status.success(), "{}", stderr_of(&output));
        let restored = std::fs::read(&destination).unwrap();
        assert!(
            restored == std::fs::read(primary.data.join("pg_wal").join(name)).unwrap(),
            "{name} differs"
        );
    };
    get(&segments[1]);
    let expected: Vec<&String> = segments[2..6].iter().collect();
    let started = std::time::Instant::now();
    while !expected.iter().all(|name| spool.join(name).exists()) {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the spool never filled: {:?}",
            std::fs::read_dir(&spool).map(|entries| entries.count())
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    get(&segments[2]);
    assert!(
        !spool.join(&segments[2]).exists(),
        "a spooled segment is moved, not copied"
    );
    let remembered = std::fs::read_to_string(spool.join(".identity")).unwrap();
    assert!(
        remembered.contains(&format!("file://{}", repository.display())),
        "the miss left the repository identity for later hooks: {remembered}"
    );

    // A hook whose segment the worker is still writing waits for it instead of fetching it a
    // second time. This test stands in for the worker: it takes the lock once the real one has
    // exited and finishes the file late.
    let lock = std::fs::File::create(spool.join(".lock")).unwrap();
    let started = std::time::Instant::now();
    while lock.try_lock().is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the prefetch worker never exited"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let late = segments[4].clone();
    let _ = std::fs::remove_file(spool.join(&late));
    let in_flight = spool.join(format!(".{late}.pitr-999999.tmp"));
    std::fs::write(&in_flight, b"").unwrap();
    let source = primary.data.join("pg_wal").join(&late);
    let finisher = {
        let (spool, late, in_flight) = (spool.clone(), late.clone(), in_flight.clone());
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(600));
            std::fs::copy(&source, &in_flight).unwrap();
            std::fs::rename(&in_flight, spool.join(&late)).unwrap();
        })
    };
    let asked = std::time::Instant::now();
    get(&late);
    finisher.join().unwrap();
    assert!(
        asked.elapsed() >= Duration::from_millis(500),
        "the hook did not wait for the segment in flight ({:?})",
        asked.elapsed()
    );
    assert!(
        !spool.join(&late).exists(),
        "the hook served the worker's copy rather than fetching its own"
    );
    drop(lock);

    // The first archive-push after recovery clears what the spool still holds.
    assert!(spool.exists());
    let pushed = primary.data.join("pg_wal").join(&segments[1]);
    let output = workspace.pitr(&stage_config, &["archive-push", pushed.to_str().unwrap()]);
    assert!(output.status.success(), "{}", stderr_of(&output));
    assert!(
        !spool.exists(),
        "archive-push left the recovery's spool behind"
    );
}

//! The daemon under hostile or unlucky conditions (issue 16): a flood of unauthenticated
//! `/readyz` requests, an object removed from the store while the daemon runs, and hook-socket
//! clients that send too much or nothing at all. Each runs against a real PostgreSQL 15.

mod support;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use support::{Cluster, DaemonProcess, Workspace, free_port, http, metric, pg15_available};

const TOKEN: &str = "test-token-9c2a";

/// A config for an encrypted `file://` repository at `repo`, serving `pgdata`.
fn write_config(workspace: &Workspace, pgdata: &Path, http_port: u16) -> PathBuf {
    let keyring = workspace.keygen("keyring");
    workspace.write_config(
        "pitr.toml",
        &format!(
            "repo = 'file://{}'\nkey_file = '{}'\npgdata = '{}'\nhttp_addr = '127.0.0.1:{http_port}'\nhttp_token = '{TOKEN}'\narchive_concurrency = 2\ncompression_threads = 1\nstore_timeout = 4\n",
            workspace.path("repo").display(),
            keyring.display(),
            pgdata.display()
        ),
    )
}

/// A cluster `primary` whose archive_command is the pitr hook, with `extra` settings.
fn archiving_cluster(workspace: &Workspace, config: &Path, extra: &str) -> Cluster {
    let command = workspace.archive_command(config);
    Cluster::init(
        workspace,
        "primary",
        &format!(
            "wal_level = replica\narchive_mode = on\narchive_command = '{command}'\nwal_keep_size = '4GB'\nmax_wal_size = '4GB'\narchive_timeout = 0\n{extra}"
        ),
    )
}

fn switch_segments(cluster: &Cluster, rounds: usize) {
    for round in 0..rounds {
        cluster.sql(&format!(
            "insert into ledger select {round}, g from generate_series(1, 200) g"
        ));
        cluster.sql("select pg_switch_wal()");
    }
}

fn failed_archives(cluster: &Cluster) -> u64 {
    cluster
        .sql("select failed_count from pg_stat_archiver")
        .parse()
        .unwrap()
}

/// Defect 3: every `/readyz` used to open its own Postgres connection, so a flood of them
/// exhausted `max_connections`. One check at a time, reused briefly, keeps Postgres open to
/// its real clients.
#[test]
fn a_flood_of_readyz_requests_makes_one_postgres_connection_at_a_time() {
    if !pg15_available() {
        return;
    }
    let workspace = Workspace::new();
    let http_port = free_port();
    let primary_data = workspace.path("primary");
    let config = write_config(&workspace, &primary_data, http_port);
    let mut primary = archiving_cluster(
        &workspace,
        &config,
        "max_connections = 10\nlog_connections = on",
    );
    primary.start();
    primary.sql("create table ledger (round int, item int)");
    let _daemon = DaemonProcess::start(&workspace, &config, &primary, http_port);
    switch_segments(&primary, 1);
    primary.wait_until_archived(Duration::from_secs(60));
    let (code, body) = http(http_port, "GET", "/readyz", None);
    assert_eq!(code, 200, "{body}");

    let log_before = primary.log().len();
    let requests = 400;
    let barrier = Arc::new(Barrier::new(requests));
    let started = Instant::now();
    let answers: Vec<(u16, String)> = (0..requests)
        .map(|_| {
            let barrier = Arc::clone(&barrier);
            std::thread::spawn(move || {
                barrier.wait();
                http(http_port, "GET", "/readyz", None)
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|thread| thread.join().unwrap())
        .collect();
    let elapsed = started.elapsed();

    let refused: Vec<&(u16, String)> = answers.iter().filter(|(code, _)| *code != 200).collect();
    assert!(
        refused.is_empty(),
        "{} of {requests} /readyz requests were not 200, e.g. {:?}",
        refused.len(),
        refused[0]
    );
    let log = primary.log();
    let flood_log = &log[log_before..];
    assert!(
        !flood_log.contains("too many clients already"),
        "Postgres refused clients during the flood:\n{flood_log}"
    );
    // One check at a time, each reused for a second: a handful of connections, not 400.
    let connections = flood_log.matches("connection received").count();
    let bound = elapsed.as_secs() as usize + 3;
    assert!(
        connections <= bound,
        "the flood of {elapsed:?} opened {connections} Postgres connections, more than {bound}"
    );
    assert_eq!(
        primary.sql("select 1"),
        "1",
        "Postgres must still accept psql"
    );
}

/// Defect 7: a name the daemon listed at startup but that has since left the store made every
/// push fail with "reported as existing but cannot be read back" until a restart. It must be
/// uploaded again instead.
#[test]
fn an_object_removed_after_the_startup_listing_is_uploaded_again() {
    if !pg15_available() {
        return;
    }
    let workspace = Workspace::new();
    let http_port = free_port();
    let primary_data = workspace.path("primary");
    let config = write_config(&workspace, &primary_data, http_port);
    let mut primary = archiving_cluster(&workspace, &config, "");
    primary.start();
    primary.sql("create table ledger (round int, item int)");
    // Archived by the hooks alone, so the daemon knows these names only from its listing.
    switch_segments(&primary, 3);
    primary.wait_until_archived(Duration::from_secs(60));
    let daemon = DaemonProcess::start(&workspace, &config, &primary, http_port);

    let status = primary_data.join("pg_wal/archive_status");
    let segment = std::fs::read_dir(&status)
        .unwrap()
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            Some(name.strip_suffix(".done")?.to_string()).filter(|name| name.len() == 24)
        })
        .max()
        .expect("an archived segment");
    let object = walk_files(&workspace.path("repo"))
        .into_iter()
        .find(|path| {
            path.file_name()
                .is_some_and(|name| name == segment.as_str())
        })
        .unwrap_or_else(|| panic!("no object for {segment} in the repository"));
    std::fs::remove_file(&object).unwrap();
    // Postgres archives it again, as after a crash that lost the `.done`.
    std::fs::rename(
        status.join(format!("{segment}.done")),
        status.join(format!("{segment}.ready")),
    )
    .unwrap();
    switch_segments(&primary, 1);
    primary.wait_until_archived(Duration::from_secs(40));
    // A few rescans of the daemon, which would each have repeated the failure.
    std::thread::sleep(Duration::from_secs(6));

    assert_eq!(failed_archives(&primary), 0, "{}", primary.log());
    assert!(object.is_file(), "{segment} was not uploaded again");
    let fetched = workspace.path("fetched-segment");
    let output = workspace.pitr(
        &config,
        &["archive-get", &segment, fetched.to_str().unwrap()],
    );
    assert!(output.status.success(), "{}", support::stderr_of(&output));
    assert!(
        std::fs::read(&fetched).unwrap()
            == std::fs::read(primary_data.join("pg_wal").join(&segment)).unwrap(),
        "{segment} did not read back byte-identical"
    );
    let log = workspace.daemon_log();
    assert!(!log.contains("archiving failed"), "{log}");
    assert!(log.matches("cannot be read back").count() <= 1, "{log}");
    assert_eq!(
        metric(&daemon.metrics(), "pitr_archive_failures_total"),
        0.0,
        "{log}"
    );
}

fn walk_files(root: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut directories = vec![root.to_path_buf()];
    while let Some(directory) = directories.pop() {
        for entry in std::fs::read_dir(&directory).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                directories.push(path);
            } else {
                files.push(path);
            }
        }
    }
    files
}

/// A hook-socket client run as the Postgres user (the daemon answers only its own user):
/// `long <bytes>` sends that many bytes without a newline, `silent` sends nothing. Prints the
/// answer, the seconds until the daemon closed the connection, and the bytes it got to send.
const SOCKET_CLIENT: &str = r#"
import json, socket, sys, time
mode, path = sys.argv[1], sys.argv[2]
client = socket.socket(socket.AF_UNIX)
client.settimeout(20)
client.connect(path)
started = time.monotonic()
sent, error = 0, None
if mode == "long":
    size, block = int(sys.argv[3]), b"x" * (1 << 20)
    try:
        while sent < size:
            sent += client.send(block[: min(len(block), size - sent)])
    except OSError as failure:
        error = type(failure).__name__
answer = b""
try:
    while True:
        chunk = client.recv(4096)
        if not chunk:
            break
        answer += chunk
except OSError as failure:
    error = error or type(failure).__name__
print(json.dumps({"answer": answer.decode(errors="replace"), "seconds": time.monotonic() - started, "sent": sent, "error": error}))
"#;

fn socket_client(socket: &Path, arguments: &[&str]) -> serde_json::Value {
    let output = support::as_postgres(Path::new("/usr/bin/python3"))
        .arg("-c")
        .arg(SOCKET_CLIENT)
        .arg(arguments[0])
        .arg(socket)
        .args(&arguments[1..])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "socket client: {}",
        support::stderr_of(&output)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

/// Peak resident memory of a process, in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/<pid>/status")
}

/// Defect 13: the hook socket read a whole line, however long, before it even looked at who
/// sent it. Now the peer is checked first, a request is at most 8 KiB, and a client gets 5 s to
/// send it.
#[test]
fn the_hook_socket_bounds_what_it_reads_and_how_long_it_waits() {
    if !pg15_available() {
        return;
    }
    let workspace = Workspace::new();
    let http_port = free_port();
    let primary_data = workspace.path("primary");
    let config = write_config(&workspace, &primary_data, http_port);
    let mut primary = archiving_cluster(&workspace, &config, "");
    primary.start();
    primary.sql("create table ledger (round int, item int)");
    let daemon = DaemonProcess::start(&workspace, &config, &primary, http_port);
    let socket = primary_data.join("pitr.sock");
    let pid = daemon.pid();

    let peak_before = peak_rss_kib(pid);
    let long = socket_client(&socket, &["long", &(64u64 << 20).to_string()]);
    let peak_after = peak_rss_kib(pid);
    assert_eq!(
        long["answer"],
        "err the request is longer than 8192 bytes; a hook sends one line: push <absolute path> or get <WAL file name> <absolute destination>\n",
        "{long}"
    );
    assert!(long["seconds"].as_f64().unwrap() < 5.0, "{long}");
    assert!(
        long["sent"].as_u64().unwrap() < 64 << 20,
        "the daemon read the whole 64 MiB: {long}"
    );
    assert!(
        peak_after < peak_before + 4096,
        "a 64 MiB request raised the daemon's peak RSS from {peak_before} KiB to {peak_after} KiB"
    );

    let silent = socket_client(&socket, &["silent"]);
    assert_eq!(
        silent["answer"],
        "err no request line arrived within 5 s; a hook sends one line: push <absolute path> or get <WAL file name> <absolute destination>\n",
        "{silent}"
    );
    let waited = silent["seconds"].as_f64().unwrap();
    assert!((4.5..10.0).contains(&waited), "{silent}");

    if support::is_root() {
        // Refused before anything is read: a long line from root is never buffered.
        use std::io::{Read, Write};
        let mut stream = std::os::unix::net::UnixStream::connect(&socket).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let _ = stream.write_all(&vec![b'x'; 32 << 20]);
        let mut answer = Vec::new();
        let mut buffer = [0u8; 4096];
        while let Ok(count @ 1..) = stream.read(&mut buffer) {
            answer.extend_from_slice(&buffer[..count]);
        }
        let answer = String::from_utf8_lossy(&answer);
        assert!(
            answer.starts_with("err the pitr daemon only answers its own user (uid "),
            "{answer:?}"
        );
        assert!(peak_rss_kib(pid) < peak_before + 4096);
    }

    // The daemon still serves the hooks.
    switch_segments(&primary, 2);
    primary.wait_until_archived(Duration::from_secs(60));
    assert_eq!(failed_archives(&primary), 0, "{}", primary.log());
    let metrics = daemon.metrics();
    assert!(
        metric(&metrics, "pitr_hook_requests_total{result=\"waited\"}")
            + metric(&metrics, "pitr_hook_requests_total{result=\"durable\"}")
            >= 2.0,
        "{metrics}"
    );
}

#[test]
fn sigterm_stops_every_task_and_the_daemon_exits_cleanly() {
    if !pg15_available() {
        return;
    }
    let workspace = Workspace::new();
    let http_port = free_port();
    let config = write_config(&workspace, &workspace.path("primary"), http_port);
    let mut primary = archiving_cluster(&workspace, &config, "");
    primary.start();
    primary.sql("create table ledger (id int, note int)");
    let mut daemon = DaemonProcess::start(&workspace, &config, &primary, http_port);
    switch_segments(&primary, 3);
    primary.wait_until_archived(Duration::from_secs(60));
    let started = std::time::Instant::now();
    let exit = daemon.terminate(Duration::from_secs(40));
    let log = workspace.daemon_log();
    assert_eq!(exit, Some(0), "{log}");
    assert!(started.elapsed() < Duration::from_secs(30), "{log}");
    assert!(log.contains("stopped"), "{log}");
    assert!(!log.contains("aborted"), "{log}");
    // With the daemon gone, the hooks work on their own: archiving goes on.
    switch_segments(&primary, 1);
    primary.wait_until_archived(Duration::from_secs(60));
    assert_eq!(failed_archives(&primary), 0);
}

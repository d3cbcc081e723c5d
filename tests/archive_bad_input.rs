//! Bad input against the hooks, with real WAL from a real PostgreSQL 15: each case is refused
//! with its exact message, exits non-zero, and leaves the repository and the destination as
//! they were.

mod support;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use support::{Cluster, Workspace, pg15_available, snapshot, stderr_of};

/// A stopped cluster whose first segments are archived into an encrypted file:// repository.
struct Fixture {
    workspace: Workspace,
    cluster: Cluster,
    repository: PathBuf,
    config: PathBuf,
    keyring: PathBuf,
    segments: Vec<String>,
}

impl Fixture {
    fn new() -> Self {
        let workspace = Workspace::new();
        let mut cluster = Cluster::init(&workspace, "primary", "wal_keep_size = '1GB'");
        cluster.start();
        cluster.pgbench(&["-i", "-s", "1", "-q"]);
        for _ in 0..3 {
            cluster.sql("insert into pgbench_history (tid, bid, aid, delta) values (1, 1, 1, 1)");
            cluster.sql("select pg_switch_wal()");
        }
        let current = cluster.sql("select pg_walfile_name(pg_current_wal_lsn())");
        cluster.stop();
        let mut segments: Vec<String> = std::fs::read_dir(cluster.data.join("pg_wal"))
            .unwrap()
            .flatten()
            .map(|entry| entry.file_name().into_string().unwrap())
            .filter(|name| name.len() == 24 && name.as_str() < current.as_str())
            .collect();
        segments.sort();
        assert!(
            segments.len() >= 3,
            "expected completed segments, found {segments:?}"
        );
        let keyring = workspace.keygen("keyring");
        let repository = workspace.path("repo");
        let config = workspace.write_config(
            "pitr.toml",
            &format!(
                "repo = 'file://{}'\nkey_file = '{}'\npgdata = '{}'\nstore_timeout = 10\n",
                repository.display(),
                keyring.display(),
                cluster.data.display()
            ),
        );
        let fixture = Fixture {
            workspace,
            cluster,
            repository,
            config,
            keyring,
            segments,
        };
        for segment in fixture.segments.clone() {
            // What Postgres does for a completed segment before it runs archive_command.
            let ready = fixture
                .cluster
                .data
                .join(format!("pg_wal/archive_status/{segment}.ready"));
            std::fs::write(&ready, b"").unwrap();
            fixture.workspace.give_to_postgres(&ready);
            let output = fixture.push(&fixture.segment_path(&segment));
            assert!(
                output.status.success(),
                "push {segment}: {}",
                stderr_of(&output)
            );
        }
        fixture
    }

    fn segment_path(&self, name: &str) -> PathBuf {
        self.cluster.data.join("pg_wal").join(name)
    }

    fn object_path(&self, name: &str) -> PathBuf {
        self.repository.join("wal").join(&name[..8]).join(name)
    }

    fn push(&self, path: &Path) -> Output {
        self.workspace
            .pitr(&self.config, &["archive-push", path.to_str().unwrap()])
    }

    /// archive-push of a file Postgres never marked ready (made by hand, outside pg_wal).
    fn push_by_hand(&self, path: &Path) -> Output {
        self.workspace.pitr(
            &self.config,
            &["archive-push", "--force", path.to_str().unwrap()],
        )
    }

    fn get(&self, config: &Path, name: &str, destination: &Path) -> Output {
        self.workspace.pitr(
            config,
            &["archive-get", name, destination.to_str().unwrap()],
        )
    }

    /// A file owned by the Postgres user in the workspace.
    fn scratch_file(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let directory = self.workspace.path("scratch");
        std::fs::create_dir_all(&directory).unwrap();
        let path = directory.join(name);
        std::fs::write(&path, bytes).unwrap();
        self.workspace.give_to_postgres(&directory);
        path
    }

    fn url(&self) -> String {
        format!("file://{}", self.repository.display())
    }

    fn key_id(keyring: &Path) -> String {
        let text = std::fs::read_to_string(keyring).unwrap();
        let line = text.lines().find(|line| line.starts_with("id = ")).unwrap();
        line.trim_start_matches("id = ")
            .trim_matches('"')
            .to_string()
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

fn system_identifier(data: &Path) -> String {
    let bytes = std::fs::read(data.join("global/pg_control")).unwrap();
    u64::from_le_bytes(bytes[..8].try_into().unwrap()).to_string()
}

#[test]
fn damaged_objects_never_reach_the_destination() {
    if !pg15_available() {
        return;
    }
    let fixture = Fixture::new();
    let segment = fixture.segments[1].clone();
    let object = fixture.object_path(&segment);
    let original = std::fs::read(&object).unwrap();
    let header_length = 130 + format!("wal/00000001/{segment}").len() + 4;
    let destination = fixture.workspace.path("fetched");
    std::fs::create_dir(&destination).unwrap();
    fixture.workspace.give_to_postgres(&destination);
    let target = destination.join("RECOVERYXLOG");

    let mut flipped = original.clone();
    flipped[header_length + 10] ^= 0x01;
    std::fs::write(&object, &flipped).unwrap();
    let output = fixture.get(&fixture.config, &segment, &target);
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(
        stderr_of(&output),
        format!(
            "pitr archive-get: error: object wal/00000001/{segment} failed authentication at chunk 0; it is corrupt, truncated or was tampered with, and was not used"
        )
    );

    let mut header_edit = original.clone();
    header_edit[12] ^= 0x01;
    std::fs::write(&object, &header_edit).unwrap();
    let output = fixture.get(&fixture.config, &segment, &target);
    assert_eq!(
        stderr_of(&output),
        format!(
            "pitr archive-get: error: object wal/00000001/{segment} has a corrupt header; it was not used (check the repository's storage)"
        )
    );

    std::fs::write(&object, &original[..header_length + 1000]).unwrap();
    let output = fixture.get(&fixture.config, &segment, &target);
    assert_eq!(
        stderr_of(&output),
        format!(
            "pitr archive-get: error: object wal/00000001/{segment} failed authentication at chunk 0; it is corrupt, truncated or was tampered with, and was not used"
        )
    );

    std::fs::write(&object, &original[..100]).unwrap();
    let output = fixture.get(&fixture.config, &segment, &target);
    assert_eq!(
        stderr_of(&output),
        format!(
            "pitr archive-get: error: object wal/00000001/{segment} is truncated; it was not used (the upload was cut short or the storage lost data)"
        )
    );
    assert_eq!(
        std::fs::read_dir(&destination).unwrap().count(),
        0,
        "something was left at the destination"
    );

    std::fs::write(&object, &original).unwrap();
    let output = fixture.get(&fixture.config, &segment, &target);
    assert!(output.status.success(), "{}", stderr_of(&output));
    assert!(
        std::fs::read(&target).unwrap() == std::fs::read(fixture.segment_path(&segment)).unwrap()
    );

    let output = fixture.get(
        &fixture.config,
        "0000000100000000000000F0",
        &destination.join("missing"),
    );
    assert_eq!(
        (output.status.code(), stderr_of(&output).as_str()),
        (Some(1), ""),
        "a missing file is a quiet exit 1"
    );
    let output = fixture.get(
        &fixture.config,
        "00000007.history",
        &destination.join("missing"),
    );
    assert_eq!(
        (output.status.code(), stderr_of(&output).as_str()),
        (Some(1), "")
    );
}

#[test]
fn the_wrong_keyring_is_refused() {
    if !pg15_available() {
        return;
    }
    let fixture = Fixture::new();
    let other_keyring = fixture.workspace.keygen("other-keyring");
    let config = fixture.workspace.write_config(
        "other.toml",
        &format!(
            "repo = '{}'\nkey_file = '{}'\n",
            fixture.url(),
            other_keyring.display()
        ),
    );
    let destination = fixture.workspace.path("out");
    refused(
        &fixture,
        &format!(
            "pitr archive-get: error: wrong keyring for repository {}: the repository was created with key {}, which keyring {} does not hold; use the repository's own keyring",
            fixture.url(),
            Fixture::key_id(&fixture.keyring),
            other_keyring.display()
        ),
        || fixture.get(&config, &fixture.segments[0], &destination),
    );
    assert!(!destination.exists());
    refused(
        &fixture,
        &format!(
            "pitr archive-push: error: wrong keyring for repository {}: the repository was created with key {}, which keyring {} does not hold; use the repository's own keyring",
            fixture.url(),
            Fixture::key_id(&fixture.keyring),
            other_keyring.display()
        ),
        || {
            fixture.workspace.pitr(
                &config,
                &[
                    "archive-push",
                    fixture.segment_path(&fixture.segments[0]).to_str().unwrap(),
                ],
            )
        },
    );
}

#[test]
fn files_that_are_not_this_clusters_wal_are_refused() {
    if !pg15_available() {
        return;
    }
    let fixture = Fixture::new();
    let ours = system_identifier(&fixture.cluster.data);

    let mut other = Cluster::init(&fixture.workspace, "other", "wal_keep_size = '1GB'");
    other.start();
    other.sql("select pg_switch_wal()");
    let foreign_name = other.sql("select pg_walfile_name(pg_current_wal_lsn())");
    other.sql("create table t (i int); select pg_switch_wal()");
    other.stop();
    let theirs = system_identifier(&other.data);
    let foreign = other.data.join("pg_wal").join(&foreign_name);
    refused(
        &fixture,
        &format!(
            "pitr archive-push: error: {foreign_name} belongs to database system {theirs}, but this data directory ({}) is system {ours}; refusing to archive a segment from another cluster",
            fixture.cluster.data.display()
        ),
        || fixture.push(&foreign),
    );
    let no_pgdata = fixture.workspace.write_config(
        "no-pgdata.toml",
        &format!(
            "repo = '{}'\nkey_file = '{}'\n",
            fixture.url(),
            fixture.keyring.display()
        ),
    );
    refused(
        &fixture,
        &format!(
            "pitr archive-push: error: repository {} belongs to database system {ours}, but this cluster is {theirs}; give each cluster its own PITR_REPO",
            fixture.url()
        ),
        || {
            fixture.workspace.pitr(
                &no_pgdata,
                &["archive-push", "--force", foreign.to_str().unwrap()],
            )
        },
    );

    let not_wal = fixture.scratch_file("000000010000000000000042", &vec![0u8; 16 << 20]);
    refused(
        &fixture,
        "pitr archive-push: error: 000000010000000000000042 is not a PostgreSQL WAL segment: page magic 0x0000 is not that of PostgreSQL 13 to 18; refusing to archive it",
        || fixture.push(&not_wal),
    );
    let notes = fixture.scratch_file("notes.txt", b"hello");
    refused(
        &fixture,
        "pitr archive-push: error: 'notes.txt' is not a WAL file name: expected a 24-hex-digit segment, a TTTTTTTT.history, a .partial or a .backup file; check that archive_command passes %p and restore_command passes %f",
        || fixture.push(&notes),
    );

    let source = &fixture.segments[0];
    let renamed = fixture.scratch_file(
        "000000010000000000000030",
        &std::fs::read(fixture.segment_path(source)).unwrap(),
    );
    let found = format!(
        "0/{:X}000000",
        u32::from_str_radix(&source[16..], 16).unwrap()
    );
    refused(
        &fixture,
        &format!(
            "pitr archive-push: error: 000000010000000000000030: the header's page address {found} does not match the file name (expected 0/30000000); the file is a recycled or renamed segment, refusing to archive it"
        ),
        || fixture.push(&renamed),
    );
}

#[test]
fn a_different_file_under_an_archived_name_is_refused_and_identical_is_accepted() {
    if !pg15_available() {
        return;
    }
    let fixture = Fixture::new();
    let name = fixture.segments[1].clone();
    let original = std::fs::read(fixture.segment_path(&name)).unwrap();
    let again = fixture.push(&fixture.segment_path(&name));
    assert!(
        again.status.success(),
        "identical re-push: {}",
        stderr_of(&again)
    );

    // A stored copy that fails verification holds nothing restorable: a re-push stores a
    // verified copy in its place instead of blocking archiving forever (issue 16, defect 4).
    let object = fixture.object_path(&name);
    let stored = std::fs::read(&object).unwrap();
    let mut damaged = stored.clone();
    let last = damaged.len() - 3;
    damaged[last] ^= 0x10;
    std::fs::write(&object, &damaged).unwrap();
    let replaced = fixture.push(&fixture.segment_path(&name));
    assert!(replaced.status.success(), "{}", stderr_of(&replaced));
    assert!(
        std::fs::read(&object).unwrap() != damaged,
        "the damaged copy was kept"
    );
    let destination = fixture.workspace.path("replaced");
    std::fs::create_dir(&destination).unwrap();
    fixture.workspace.give_to_postgres(&destination);
    let output = fixture.get(&fixture.config, &name, &destination.join("RECOVERYXLOG"));
    assert!(output.status.success(), "{}", stderr_of(&output));
    assert!(std::fs::read(destination.join("RECOVERYXLOG")).unwrap() == original);

    refuses_a_changed_copy(&fixture, &name, &original, xxh3_hex);
}

/// Pushes `original` with one byte changed under its archived name and expects the exact
/// refusal, with both checksums in the stored object's algorithm (`checksum_hex`).
fn refuses_a_changed_copy(
    fixture: &Fixture,
    name: &str,
    original: &[u8],
    checksum_hex: impl Fn(&[u8]) -> String,
) {
    let mut changed = original.to_vec();
    changed[3 * 8192 + 100] ^= 0xFF;
    let path = fixture.scratch_file(name, &changed);
    refused(
        fixture,
        &format!(
            "pitr archive-push: error: {name} is already archived in {} with different content (stored checksum {}, {} bytes; this file {}, {} bytes); the stored copy was left untouched. Another cluster or a diverged timeline may be archiving into this repository: find out which before archiving resumes",
            fixture.url(),
            checksum_hex(original),
            original.len(),
            checksum_hex(&changed),
            changed.len()
        ),
        || fixture.push_by_hand(&path),
    );
}

/// The plaintext checksum format v2 objects carry, as pitr prints it.
fn xxh3_hex(bytes: &[u8]) -> String {
    hex::encode(xxhash_rust::xxh3::xxh3_128(bytes).to_be_bytes())
}

#[test]
fn a_segment_archived_by_an_older_pitr_in_format_v1_is_still_recognized_on_re_push() {
    if !pg15_available() {
        return;
    }
    let fixture = Fixture::new();
    let name = fixture.segments[1].clone();
    let original = std::fs::read(fixture.segment_path(&name)).unwrap();
    // Replace the stored object with the v1 object (BLAKE3 checksum) an older pitr wrote.
    let keyring = pitr::keyring::Keyring::load(&fixture.keyring).unwrap();
    let content = pitr::envelope::ContentSummary::of_bytes_in(
        &original,
        pitr::envelope::ChecksumAlgorithm::Blake3,
    );
    let v1 = pitr::envelope::encode(
        &original[..],
        content,
        &format!("wal/00000001/{name}"),
        Some(&keyring),
        &pitr::envelope::EncodeOptions::default(),
        Vec::new(),
    )
    .unwrap();
    assert_eq!(v1[4], 1, "a format v1 object");
    std::fs::write(fixture.object_path(&name), &v1).unwrap();

    let again = fixture.push(&fixture.segment_path(&name));
    assert!(
        again.status.success(),
        "re-push over a v1 object: {}",
        stderr_of(&again)
    );
    assert_eq!(std::fs::read(fixture.object_path(&name)).unwrap(), v1);
    let destination = fixture.workspace.path("restored-v1");
    let got = fixture.get(&fixture.config, &name, &destination);
    assert!(
        got.status.success(),
        "get of a v1 object: {}",
        stderr_of(&got)
    );
    assert!(std::fs::read(&destination).unwrap() == original);

    refuses_a_changed_copy(&fixture, &name, &original, |bytes| {
        blake3::hash(bytes).to_hex().to_string()
    });
    assert_eq!(std::fs::read(fixture.object_path(&name)).unwrap(), v1);
}

#[test]
fn an_unreachable_store_fails_in_bounded_time() {
    if !pg15_available() {
        return;
    }
    let fixture = Fixture::new();
    let port = support::free_port();
    let config = fixture.workspace.write_config(
        "unreachable.toml",
        &format!(
            "repo = 's3://nowhere/cluster'\nstore_timeout = 3\n[store]\naws_endpoint = 'http://127.0.0.1:{port}'\naws_allow_http = 'true'\naws_access_key_id = 'a'\naws_secret_access_key = 'b'\naws_region = 'us-east-1'\n"
        ),
    );
    let started = Instant::now();
    let output = fixture.workspace.pitr(
        &config,
        &[
            "archive-push",
            fixture.segment_path(&fixture.segments[0]).to_str().unwrap(),
        ],
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(output.status.code(), Some(1));
    let message = stderr_of(&output);
    assert!(
        message.starts_with("pitr archive-push: error: cannot reach the repository at s3://nowhere/cluster: reading pitr.identity ")
            && message.ends_with("; check PITR_REPO, the endpoint, credentials and network"),
        "{message}"
    );
    let destination = fixture.workspace.path("never");
    let started = Instant::now();
    let output = fixture.get(&config, &fixture.segments[0], &destination);
    assert!(started.elapsed() < Duration::from_secs(30));
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr_of(&output).starts_with(
        "pitr archive-get: error: cannot reach the repository at s3://nowhere/cluster"
    ));
    assert!(!destination.exists());
}

#[test]
fn a_full_destination_disk_leaves_nothing_behind() {
    if !pg15_available() {
        return;
    }
    if !support::is_root() {
        support::require(false, "root, to mount a small tmpfs");
        return;
    }
    let fixture = Fixture::new();
    let mount = fixture.workspace.path("full");
    std::fs::create_dir(&mount).unwrap();
    support::run_checked(
        std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
            .arg(&mount),
    );
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(mount.clone());
    fixture.workspace.give_to_postgres(&mount);
    let segment = &fixture.segments[0];
    let destination = mount.join(segment);
    refused(
        &fixture,
        &format!(
            "pitr archive-get: error: writing {segment} to {} failed: No space left on device (os error 28); free space or fix the volume holding it, nothing was written",
            destination.display()
        ),
        || fixture.get(&fixture.config, segment, &destination),
    );
    assert_eq!(
        std::fs::read_dir(&mount).unwrap().count(),
        0,
        "a partial file was left behind"
    );
}

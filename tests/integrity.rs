//! What a reader refuses, against a real PostgreSQL 15 and real repositories: objects forged by
//! someone who can write to the storage but holds no key, and an operator's mistakes with the
//! keyring and the repository URL. Each case asserts the exact message, a non-zero exit, and
//! that nothing reached the destination.
//!
//! The forged-object suite covers every object kind a reader meets (segment, history, manifest,
//! chunk, index entry, identity) with four forgeries each: an unencrypted copy with a correct
//! checksum, a copy encrypted under a foreign key, a copy with an edited header, and a genuine
//! object moved under another name.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use pitr::envelope::{self, DecodeMode, EncodeOptions};
use pitr::keyring::Keyring;
use support::{Cluster, S3Server, Workspace, pg15_available, stderr_of};

/// A stopped primary that archived into an encrypted file:// repository, took a backup, and
/// was restored once to a time (which wrote the commit-timestamp index).
struct Fixture {
    workspace: Workspace,
    _primary: Cluster,
    config: PathBuf,
    repository: PathBuf,
    keyring_path: PathBuf,
    backup: String,
    target_time: String,
}

impl Fixture {
    fn new() -> Self {
        let workspace = Workspace::new();
        let (config, repository) = workspace.encrypted_file_repository("store_timeout = 20\n");
        let keyring_path = workspace.path("keyring");
        let archive_command = workspace.archive_command(&config);
        let mut primary = Cluster::init(
            &workspace,
            "primary",
            &format!(
                "wal_level = replica\narchive_mode = on\narchive_command = '{archive_command}'\ntimezone = 'UTC'\nwal_keep_size = '1GB'"
            ),
        );
        primary.start();
        primary.sql("create table ledger (id int primary key)");
        primary.sql("insert into ledger select generate_series(1, 100)");
        let output = workspace.pitr_with_env(&config, &["backup"], &primary.libpq_environment());
        assert!(output.status.success(), "backup: {}", stderr_of(&output));
        primary.sql("insert into ledger values (101)");
        std::thread::sleep(Duration::from_millis(50));
        let target_time = primary.sql("select now()::text");
        std::thread::sleep(Duration::from_millis(50));
        primary.sql("insert into ledger values (102)");
        primary.sql("select pg_switch_wal()");
        primary.wait_until_archived(Duration::from_secs(60));
        primary.stop();
        let backups = std::fs::read_dir(repository.join("backups")).unwrap();
        let backup = backups
            .flatten()
            .map(|entry| entry.file_name().into_string().unwrap())
            .next()
            .unwrap();
        let fixture = Fixture {
            workspace,
            _primary: primary,
            config,
            repository,
            keyring_path,
            backup,
            target_time,
        };
        let output = fixture.restore("first-restore", &["--target-time", &fixture.target_time]);
        assert!(output.status.success(), "restore: {}", stderr_of(&output));
        assert!(
            fixture.keys_under("index").next().is_some(),
            "the restore to a time wrote no index entries"
        );
        fixture
    }

    fn keyring(&self) -> Keyring {
        Keyring::load(&self.keyring_path).unwrap()
    }

    /// Every object key under `prefix`, sorted.
    fn keys_under(&self, prefix: &str) -> impl Iterator<Item = String> {
        support::files_under(&self.repository.join(prefix))
            .into_iter()
            .map(|path| {
                let key = path.strip_prefix(&self.repository).unwrap();
                key.to_str().unwrap().to_string()
            })
    }

    fn segments(&self) -> Vec<String> {
        self.keys_under("wal/00000001")
            .filter(|key| key.len() == "wal/00000001/".len() + 24)
            .collect()
    }

    /// The plaintext of a genuine object, decoded with the repository's keyring.
    fn plaintext(&self, key: &str) -> Vec<u8> {
        let object = std::fs::read(self.repository.join(key)).unwrap();
        let keyring = self.keyring();
        let mut plaintext = Vec::new();
        envelope::decode(
            &object[..],
            key,
            Some(&keyring),
            &mut plaintext,
            DecodeMode::Alone,
        )
        .unwrap();
        plaintext
    }

    /// Replaces (or creates) the object at `key` with `bytes`, owned by the Postgres user.
    fn plant(&self, key: &str, bytes: &[u8]) {
        let path = self.repository.join(key);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, bytes).unwrap();
        self.workspace.give_to_postgres(&self.repository);
    }

    fn restore(&self, name: &str, arguments: &[&str]) -> Output {
        let data = self.workspace.path(name);
        let mut command = vec!["restore", "--pgdata", data.to_str().unwrap()];
        command.extend_from_slice(arguments);
        self.workspace.pitr(&self.config, &command)
    }

    fn archive_get(&self, name: &str, destination: &Path) -> Output {
        self.workspace.pitr(
            &self.config,
            &["archive-get", name, destination.to_str().unwrap()],
        )
    }

    /// A directory owned by the Postgres user for archive-get to write into.
    fn destination(&self, name: &str) -> PathBuf {
        let directory = self.workspace.path(name);
        std::fs::create_dir_all(&directory).unwrap();
        self.workspace.give_to_postgres(&directory);
        directory
    }
}

/// The one error line pitr prints last: a long restore logs its progress before it.
fn error_line(output: &Output) -> String {
    stderr_of(output)
        .lines()
        .last()
        .unwrap_or_default()
        .to_string()
}

/// The four forgeries of an object whose genuine copy is at `key`, each as the bytes to plant
/// at `key`, with the reason each is refused. `other_key` is a genuine object of the same kind.
fn forgeries(
    fixture: &Fixture,
    key: &str,
    other_key: &str,
) -> Vec<(&'static str, Vec<u8>, String)> {
    let plaintext = fixture.plaintext(key);
    let options = EncodeOptions::default();
    let join = |parts: Vec<bytes::Bytes>| parts.iter().flat_map(|part| part.to_vec()).collect();

    let (_, unencrypted) = envelope::encode_bytes(&plaintext, key, None, &options).unwrap();
    let foreign_path = fixture
        .workspace
        .keygen(&format!("foreign-{}", key.replace('/', "-")));
    let foreign = Keyring::load(&foreign_path).unwrap();
    let (_, foreign_sealed) =
        envelope::encode_bytes(&plaintext, key, Some(&foreign), &options).unwrap();
    let foreign_id = std::fs::read_to_string(&foreign_path).unwrap();
    let foreign_id = foreign_id
        .lines()
        .find_map(|line| line.strip_prefix("id = "))
        .unwrap()
        .trim_matches('"')
        .to_string();

    // An edited header with its CRC made right again: the plaintext length, which the data
    // key's wrapping authenticates.
    let mut edited = std::fs::read(fixture.repository.join(key)).unwrap();
    edited[12] ^= 0x01;
    let header_length = 130 + key.len();
    let crc = crc32fast::hash(&edited[..header_length]);
    edited[header_length..header_length + 4].copy_from_slice(&crc.to_le_bytes());

    let moved = std::fs::read(fixture.repository.join(other_key)).unwrap();
    vec![
        (
            "an unencrypted copy",
            join(unencrypted),
            format!(
                "object {key} is not encrypted, but this repository is; it was refused as forged (anyone who can write to the storage can plant such an object): delete it, archive it again from its source, and check who can write to the repository"
            ),
        ),
        (
            "a copy under a foreign key",
            join(foreign_sealed),
            format!(
                "object {key} is encrypted with key {foreign_id}, which the keyring does not hold; use the keyring the repository was written with"
            ),
        ),
        (
            "a copy with an edited header",
            edited,
            format!(
                "object {key} failed authentication; it is corrupt, truncated or was tampered with, and was not used"
            ),
        ),
        (
            "a genuine object moved under another name",
            moved,
            format!(
                "object {key} holds data for {other_key}; it was renamed or copied from elsewhere and was not used"
            ),
        ),
    ]
}

/// Plants each forgery of `key` in turn, runs `read`, and checks it is refused with the
/// forgery's reason (`message` turns the reason into the command's whole stderr), then puts
/// the genuine object back.
fn each_forgery_refused(
    fixture: &Fixture,
    key: &str,
    other_key: &str,
    message: impl Fn(&str) -> String,
    read: impl Fn(&str) -> (Output, bool),
) {
    let genuine = std::fs::read(fixture.repository.join(key)).ok();
    for (index, (forgery, bytes, reason)) in
        forgeries(fixture, key, other_key).into_iter().enumerate()
    {
        fixture.plant(key, &bytes);
        let (output, reached_destination) = read(&format!("{index}"));
        assert_eq!(
            (output.status.code(), error_line(&output)),
            (Some(1), message(&reason)),
            "{forgery} of {key}"
        );
        assert!(
            !reached_destination,
            "{forgery} of {key} reached the destination"
        );
    }
    match genuine {
        Some(bytes) => fixture.plant(key, &bytes),
        None => std::fs::remove_file(fixture.repository.join(key)).unwrap(),
    }
}

#[test]
fn forged_objects_of_every_kind_are_refused() {
    if !pg15_available() {
        return;
    }
    let fixture = Fixture::new();
    let segments = fixture.segments();
    let destination = fixture.destination("fetched");
    let fetch = |name: &str| {
        let fixture = &fixture;
        let destination = destination.clone();
        let name = name.to_string();
        move |attempt: &str| {
            let target = destination.join(format!("RECOVERYXLOG{attempt}"));
            let output = fixture.archive_get(&name, &target);
            (output, target.exists())
        }
    };
    let get_error = |reason: &str| format!("pitr archive-get: error: {reason}");

    // A segment.
    let segment = segments[1].rsplit('/').next().unwrap().to_string();
    each_forgery_refused(
        &fixture,
        &segments[1],
        &segments[0],
        get_error,
        fetch(&segment),
    );

    // A history file: planted where Postgres asks for the next timeline's history, which the
    // repository does not hold; the genuine object it is derived from is a segment's.
    let history = "wal/00000002/00000002.history";
    fixture.plant(
        history,
        &std::fs::read(fixture.repository.join(&segments[0])).unwrap(),
    );
    let genuine_history = envelope::encode_bytes(
        b"1\t0/3000000\tno recovery target specified\n",
        history,
        Some(&fixture.keyring()),
        &EncodeOptions::default(),
    )
    .unwrap()
    .1
    .iter()
    .flat_map(|part| part.to_vec())
    .collect::<Vec<u8>>();
    fixture.plant(history, &genuine_history);
    each_forgery_refused(
        &fixture,
        history,
        &segments[0],
        get_error,
        fetch("00000002.history"),
    );
    std::fs::remove_file(fixture.repository.join(history)).unwrap();

    // A manifest, a chunk and an index entry: each read by a restore, which must fail before
    // the directory could start.
    let restore_error = |reason: &str| format!("pitr restore: error: {reason}");
    let restored = |arguments: &'static [&'static str]| {
        let fixture = &fixture;
        move |attempt: &str| {
            let name = format!("restore-{attempt}-{}", arguments.len());
            let output = fixture.restore(&name, arguments);
            let started = fixture
                .workspace
                .path(&name)
                .join("global/pg_control")
                .exists();
            (output, started)
        }
    };
    // A second manifest would be read (and refused) first, so the object moved under the
    // manifest's name is a segment.
    let manifest = format!("backups/{}/manifest", fixture.backup);
    each_forgery_refused(
        &fixture,
        &manifest,
        &segments[0],
        restore_error,
        restored(&[]),
    );

    // A chunk that one file alone holds, so the restore's message names that file.
    let manifest: serde_json::Value =
        serde_json::from_slice(&fixture.plaintext(&manifest)).unwrap();
    let mut holders = std::collections::HashMap::<String, Vec<String>>::new();
    for file in manifest["files"].as_array().unwrap() {
        for chunk in file["chunks"].as_array().unwrap() {
            let id = chunk.as_str().unwrap().to_string();
            holders
                .entry(id)
                .or_default()
                .push(file["path"].as_str().unwrap().to_string());
        }
    }
    let (chunk_id, holder) = holders
        .iter()
        .filter(|(_, files)| files.len() == 1)
        .max_by_key(|(id, _)| {
            let key = format!("chunks/{}/{id}", &id[..2]);
            std::fs::metadata(fixture.repository.join(key))
                .unwrap()
                .len()
        })
        .map(|(id, files)| (id.clone(), files[0].clone()))
        .unwrap();
    let chunk = format!("chunks/{}/{chunk_id}", &chunk_id[..2]);
    let other_chunk = fixture
        .keys_under("chunks")
        .find(|key| *key != chunk)
        .unwrap();
    let chunk_error = |reason: &str| {
        format!(
            "pitr restore: error: restoring {holder} failed at chunk {chunk_id}; the restored directory is incomplete and will not start: {reason}"
        )
    };
    each_forgery_refused(&fixture, &chunk, &other_chunk, chunk_error, restored(&[]));

    let index: Vec<String> = fixture.keys_under("index").collect();
    let target_time: &'static str = Box::leak(fixture.target_time.clone().into_boxed_str());
    let arguments: &'static [&'static str] = Box::leak(Box::new(["--target-time", target_time]));
    for entry in &index {
        let other = index
            .iter()
            .find(|key| *key != entry)
            .unwrap_or(&segments[0]);
        each_forgery_refused(&fixture, entry, other, restore_error, restored(arguments));
    }

    // With every genuine object back, the restore still reaches its target.
    let output = fixture.restore("after-forgeries", &["--target-time", &fixture.target_time]);
    assert!(output.status.success(), "{}", stderr_of(&output));
}

#[test]
fn a_forged_identity_is_refused() {
    if !pg15_available() {
        return;
    }
    let fixture = Fixture::new();
    let segment = fixture.segments()[0]
        .rsplit('/')
        .next()
        .unwrap()
        .to_string();
    let destination = fixture.destination("fetched");
    let target = destination.join("RECOVERYXLOG");
    let genuine = std::fs::read_to_string(fixture.repository.join("pitr.identity")).unwrap();
    let url = format!("file://{}", fixture.repository.display());
    let identity: serde_json::Value = serde_json::from_str(&genuine).unwrap();
    let edit = |change: &dyn Fn(&mut serde_json::Value)| {
        let mut forged = identity.clone();
        change(&mut forged);
        serde_json::to_string(&forged).unwrap()
    };
    let foreign = Keyring::load(&fixture.workspace.keygen("foreign")).unwrap();
    let foreign_id = foreign.newest().id.to_string();
    let foreign_check = foreign.newest().check_value();
    let keyring = fixture.keyring_path.display();
    let cases = [
        (
            edit(&|identity| identity["encryption"] = serde_json::Value::Null),
            format!(
                "wrong keyring for repository {url}: the repository was created without encryption but keyring {keyring} is configured; unset PITR_KEY_FILE or use a new repository"
            ),
        ),
        (
            edit(&|identity| {
                identity["encryption"]["key_id"] = foreign_id.clone().into();
                identity["encryption"]["key_check"] = foreign_check.clone().into();
            }),
            format!(
                "wrong keyring for repository {url}: the repository was created with key {foreign_id}, which keyring {keyring} does not hold; use the repository's own keyring"
            ),
        ),
        (
            edit(&|identity| identity["wal_segment_size"] = 0.into()),
            format!(
                "repository {url} is damaged: its identity object says wal_segment_size 0, which is not a power of two from 1 MiB to 1 GiB; restore pitr.identity from a copy, or use a new repository"
            ),
        ),
        (
            edit(&|identity| identity["wal_segment_size"] = 3_000_000.into()),
            format!(
                "repository {url} is damaged: its identity object says wal_segment_size 3000000, which is not a power of two from 1 MiB to 1 GiB; restore pitr.identity from a copy, or use a new repository"
            ),
        ),
        (
            edit(&|identity| identity["pg_version"] = 120000.into()),
            format!(
                "repository {url} is damaged: its identity object says pg_version 120000, which is not a PostgreSQL version from 13 to 18; restore pitr.identity from a copy, or use a new repository"
            ),
        ),
        (
            edit(&|identity| identity["system_identifier"] = "0".into()),
            format!(
                "repository {url} is damaged: its identity object says system_identifier 0, which no database system has; restore pitr.identity from a copy, or use a new repository"
            ),
        ),
        (
            edit(&|identity| identity["encryption"]["cipher"] = "none".into()),
            format!(
                "repository {url} is damaged: its identity object says cipher 'none', which this pitr does not know; restore pitr.identity from a copy, or use a new repository"
            ),
        ),
        (
            "{\"format\": \"pitr\"".to_string(),
            format!(
                "repository {url} is damaged: its identity object is not valid: EOF while parsing an object at line 1 column 17; restore pitr.identity from a copy, or use a new repository"
            ),
        ),
    ];
    for (forged, expected) in cases {
        fixture.plant("pitr.identity", forged.as_bytes());
        let output = fixture.archive_get(&segment, &target);
        assert_eq!(
            (output.status.code(), stderr_of(&output)),
            (Some(1), format!("pitr archive-get: error: {expected}")),
            "identity {forged}"
        );
        assert!(!target.exists());
    }
    fixture.plant("pitr.identity", genuine.as_bytes());
    let output = fixture.archive_get(&segment, &target);
    assert!(output.status.success(), "{}", stderr_of(&output));
}

/// A keyring file with `body`, owned by the Postgres user, with `mode`.
fn keyring_file(workspace: &Workspace, name: &str, body: &str, mode: u32) -> PathBuf {
    let path = workspace.path(name);
    std::fs::write(&path, body).unwrap();
    workspace.give_to_postgres(&path);
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    path
}

/// `pitr wal list` on `repository` with `keyring`: every command loads the keyring first.
fn wal_list_with_keyring(workspace: &Workspace, repository: &Path, keyring: &Path) -> Output {
    let name = keyring.file_name().unwrap().to_str().unwrap();
    let config = workspace.write_config(
        &format!("{name}.toml"),
        &format!(
            "repo = 'file://{}'\nkey_file = '{}'\n",
            repository.display(),
            keyring.display()
        ),
    );
    workspace.pitr(&config, &["wal", "list"])
}

#[test]
fn keyrings_others_can_read_or_write_are_refused() {
    let workspace = Workspace::new();
    let genuine = std::fs::read_to_string(workspace.keygen("keyring")).unwrap();
    let repository = workspace.path("repo");
    for (mode, problem) in [
        (0o666, "is writable by other users (mode 0666)"),
        (0o620, "is writable by its group (mode 0620)"),
        (0o644, "is readable by every user (mode 0644)"),
        (0o604, "is readable by every user (mode 0604)"),
    ] {
        let keyring = keyring_file(&workspace, &format!("keyring-{mode:o}"), &genuine, mode);
        let output = wal_list_with_keyring(&workspace, &repository, &keyring);
        assert_eq!(
            (output.status.code(), stderr_of(&output)),
            (
                Some(1),
                format!(
                    "pitr wal list: error: keyring {} {problem}; run chmod 0600 {} (or 0640 for a group that must read it, such as a Kubernetes fsGroup)",
                    keyring.display(),
                    keyring.display()
                )
            ),
            "mode {mode:o}"
        );
    }
    // Group-readable is allowed: a Kubernetes Secret mounted with defaultMode 0440 and an
    // fsGroup. The repository does not exist yet, which is what the command then says.
    for mode in [0o600, 0o400, 0o640, 0o440] {
        let keyring = keyring_file(&workspace, &format!("keyring-ok-{mode:o}"), &genuine, mode);
        let output = wal_list_with_keyring(&workspace, &repository, &keyring);
        assert!(
            !stderr_of(&output).contains("keyring"),
            "mode {mode:o}: {}",
            stderr_of(&output)
        );
    }
}

#[test]
fn key_material_never_appears_in_an_error() {
    let workspace = Workspace::new();
    let genuine = std::fs::read_to_string(workspace.keygen("keyring")).unwrap();
    let key = genuine
        .lines()
        .find_map(|line| line.strip_prefix("key = "))
        .unwrap()
        .trim_matches('"')
        .to_string();
    let id = genuine
        .lines()
        .find_map(|line| line.strip_prefix("id = "))
        .unwrap()
        .trim_matches('"')
        .to_string();
    let swapped = genuine
        .replace(&format!("id = \"{id}\""), "id = \"SWAP\"")
        .replace(&format!("key = \"{key}\""), &format!("key = \"{id}\""))
        .replace("id = \"SWAP\"", &format!("id = \"{key}\""));
    let truncated = genuine.replace(&key, &key[..63]);
    let not_toml = format!("[[keys]]\nid = \"{id}\"\nkey = {key}\n");
    let repository = workspace.path("repo");
    for (name, body, problem) in [
        (
            "swapped",
            swapped,
            "the id of key 1 is not 16 hex digits".to_string(),
        ),
        (
            "truncated",
            truncated,
            format!("key 1 (id {id}) is not 64 hex digits"),
        ),
        (
            "not-toml",
            not_toml,
            "it is not valid TOML (line 3)".to_string(),
        ),
    ] {
        let keyring = keyring_file(&workspace, name, &body, 0o600);
        let output = wal_list_with_keyring(&workspace, &repository, &keyring);
        let stderr = stderr_of(&output);
        assert_eq!(
            (output.status.code(), stderr.as_str()),
            (
                Some(1),
                format!(
                    "pitr wal list: error: keyring {} is malformed: {problem}; fix the file, or restore it from your copy",
                    keyring.display()
                )
                .as_str()
            ),
            "{name}"
        );
        assert!(
            !stderr.contains(&key[..16]),
            "{name}: key material in {stderr}"
        );
        for window in key.as_bytes().windows(8) {
            assert!(
                !stderr.contains(std::str::from_utf8(window).unwrap()),
                "{name}: key material in {stderr}"
            );
        }
    }
}

#[test]
fn file_urls_are_decoded_and_a_host_is_refused() {
    let workspace = Workspace::new();
    let config = workspace.write_config(
        "spaced.toml",
        &format!("repo = 'file://{}'\n", workspace.path("repo%20a").display()),
    );
    // The URL is percent-decoded: nothing is ever made under the literal name.
    let output = workspace.pitr(&config, &["wal", "list"]);
    assert_eq!(
        (output.status.code(), stderr_of(&output)),
        (
            Some(1),
            format!(
                "pitr wal list: error: no pitr repository at file://{} (it has no identity object yet); check PITR_REPO, or archive a segment to create it",
                workspace.path("repo%20a").display()
            )
        )
    );
    assert!(!workspace.path("repo%20a").exists());

    for (url, host) in [
        ("file://tmp/x", "tmp"),
        ("file://backup-host/srv/repo", "backup-host"),
    ] {
        let config = workspace.write_config("host.toml", &format!("repo = '{url}'\n"));
        let output = workspace.pitr(&config, &["wal", "list"]);
        assert_eq!(
            (output.status.code(), stderr_of(&output)),
            (
                Some(1),
                format!(
                    "pitr wal list: error: repository URL '{url}' is not valid: a file:// URL names a local path, not the host '{host}'; write file:///path (three slashes)"
                )
            )
        );
    }
    assert!(!Path::new("/x").exists());
}

#[test]
fn a_torn_stored_object_is_replaced_on_the_next_push() {
    if !pg15_available() {
        return;
    }
    let fixture = Fixture::new();
    let key = fixture.segments()[1].clone();
    let name = key.rsplit('/').next().unwrap().to_string();
    let segment = fixture.workspace.path("primary/pg_wal").join(&name);
    let object = fixture.repository.join(&key);
    let genuine_length = std::fs::metadata(&object).unwrap().len() as usize;
    let destination = fixture.destination("fetched");
    // What a crash between a write and its fsync can leave: an empty object, or a short one.
    for (attempt, torn_length) in [0, genuine_length / 2].into_iter().enumerate() {
        let bytes = std::fs::read(&object).unwrap();
        fixture.plant(&key, &bytes[..torn_length]);
        let output = fixture.workspace.pitr(
            &fixture.config,
            &["archive-push", segment.to_str().unwrap()],
        );
        assert!(output.status.success(), "{}", stderr_of(&output));
        let target = destination.join(format!("RECOVERYXLOG{attempt}"));
        let output = fixture.archive_get(&name, &target);
        assert!(output.status.success(), "{}", stderr_of(&output));
        assert!(std::fs::read(&target).unwrap() == std::fs::read(&segment).unwrap());
    }
    assert!(
        fixture
            .keys_under("tmp")
            .all(|key| key == "tmp/.update.lock"),
        "a staged replacement was left behind"
    );
}

#[test]
fn repository_files_are_private_whatever_the_umask() {
    if !pg15_available() {
        return;
    }
    // The fixture's archive_command runs under the server's umask (022, from the test runner).
    let fixture = Fixture::new();
    let mut pending = vec![fixture.repository.clone()];
    while let Some(directory) = pending.pop() {
        let mode = std::fs::metadata(&directory).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "{}", directory.display());
        for entry in std::fs::read_dir(&directory).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
            } else {
                let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
                assert_eq!(mode, 0o600, "{}", path.display());
            }
        }
    }
}

/// A stopped cluster with completed segments in pg_wal, for pushes by hand.
fn stopped_cluster_with_segments(workspace: &Workspace) -> (Cluster, Vec<PathBuf>) {
    let mut cluster = Cluster::init(workspace, "primary", "wal_keep_size = '1GB'");
    cluster.start();
    for _ in 0..2 {
        cluster.sql("create table if not exists t (x int); insert into t values (1)");
        cluster.sql("select pg_switch_wal()");
    }
    let current = cluster.sql("select pg_walfile_name(pg_current_wal_lsn())");
    cluster.stop();
    let mut segments: Vec<PathBuf> = std::fs::read_dir(cluster.data.join("pg_wal"))
        .unwrap()
        .flatten()
        .filter(|entry| {
            let name = entry.file_name().into_string().unwrap();
            name.len() == 24 && name < current
        })
        .map(|entry| entry.path())
        .collect();
    segments.sort();
    (cluster, segments)
}

/// Forwards TCP to `target_port`, renaming every `if-none-match` request header on the way:
/// the S3 server behind it then overwrites on a create-only write, as a store that ignores
/// the header does.
fn header_stripping_proxy(target_port: u16) -> u16 {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            let Ok(server) = std::net::TcpStream::connect(("127.0.0.1", target_port)) else {
                continue;
            };
            let (mut from_client, mut to_server) =
                (client.try_clone().unwrap(), server.try_clone().unwrap());
            std::thread::spawn(move || {
                let mut buffer = vec![0u8; 64 << 10];
                while let Ok(count) = from_client.read(&mut buffer) {
                    if count == 0 {
                        break;
                    }
                    let chunk = &mut buffer[..count];
                    let needle = b"if-none-match:";
                    let mut at = 0;
                    while let Some(found) = chunk[at..]
                        .windows(needle.len())
                        .position(|window| window.eq_ignore_ascii_case(needle))
                    {
                        chunk[at + found..at + found + needle.len()]
                            .copy_from_slice(b"x-ignored-hdr:");
                        at += found + needle.len();
                    }
                    if to_server.write_all(chunk).is_err() {
                        break;
                    }
                }
                let _ = to_server.shutdown(std::net::Shutdown::Write);
            });
            let (mut from_server, mut to_client) = (server, client);
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut from_server, &mut to_client);
                let _ = to_client.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    port
}

#[test]
fn a_store_that_overwrites_on_create_only_writes_is_refused() {
    if !pg15_available() {
        return;
    }
    let workspace = Workspace::new();
    let Some(server) = S3Server::start_anonymous(&workspace) else {
        return;
    };
    let (_cluster, segments) = stopped_cluster_with_segments(&workspace);
    let proxy = header_stripping_proxy(server.port);
    let push = |prefix: &str, port: u16| {
        let config = workspace.write_config(
            &format!("{prefix}.toml"),
            &format!(
                "repo = 's3://{}/{prefix}'\npgdata = '{}'\nstore_timeout = 10\n{}",
                server.bucket,
                workspace.path("primary").display(),
                server.anonymous_store_settings_at(port)
            ),
        );
        // The cluster did not archive (archive_mode is off): nothing marked it ready.
        workspace.pitr(
            &config,
            &["archive-push", "--force", segments[0].to_str().unwrap()],
        )
    };
    let output = push("overwrites", proxy);
    assert_eq!(
        (output.status.code(), stderr_of(&output)),
        (
            Some(1),
            format!(
                "pitr archive-push: error: the store behind repository s3://{}/overwrites overwrote an existing object on a create-only write (it ignores If-None-Match), so archived WAL would not be safe there; use a store that honours conditional writes (AWS S3, MinIO, Cloudflare R2, GCS, Azure Blob) or a file:// repository",
                server.bucket
            )
        )
    );
    let prefix = server.data.join(&server.bucket).join("overwrites");
    assert!(
        !prefix.join("pitr.identity").exists() && !prefix.join("wal").exists(),
        "a repository was created on a store that overwrites"
    );
    // The same server, reached directly, honours If-None-Match: the probe passes.
    let output = push("honours", server.port);
    assert!(output.status.success(), "{}", stderr_of(&output));
}

#[test]
fn refused_credentials_fail_at_once_and_are_never_spooled() {
    if !pg15_available() {
        return;
    }
    let workspace = Workspace::new();
    let Some(server) = S3Server::start(&workspace) else {
        return;
    };
    let (_cluster, segments) = stopped_cluster_with_segments(&workspace);
    let spool = workspace.path("outage-spool");
    std::fs::create_dir(&spool).unwrap();
    workspace.give_to_postgres(&spool);
    let wrong_secret = server
        .store_settings()
        .replace(support::S3_SECRET_KEY, "not-the-secret-key-000000");
    let config = workspace.write_config(
        "denied.toml",
        &format!(
            "repo = 's3://{}/denied'\npgdata = '{}'\nstore_timeout = 10\noutage_spool = '{}'\n{wrong_secret}",
            server.bucket,
            workspace.path("primary").display(),
            spool.display()
        ),
    );
    let started = std::time::Instant::now();
    let output = workspace.pitr(
        &config,
        &["archive-push", "--force", segments[0].to_str().unwrap()],
    );
    let stderr = stderr_of(&output);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    let prefix = format!(
        "pitr archive-push: error: the store behind repository s3://{}/denied refused pitr's credentials: reading pitr.identity was refused: ",
        server.bucket
    );
    assert!(stderr.starts_with(&prefix), "{stderr}");
    assert!(
        stderr.ends_with(
            "; check the credentials and the permissions on the bucket (waiting will not help)"
        ),
        "{stderr}"
    );
    assert!(!stderr.contains("not-the-secret-key"), "{stderr}");
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "it waited {:?}",
        started.elapsed()
    );
    assert_eq!(
        std::fs::read_dir(&spool).unwrap().count(),
        0,
        "a refused credential was spooled as if the store were down"
    );
}

#[test]
fn the_s3_credential_source_is_logged_and_metadata_can_be_turned_off() {
    let workspace = Workspace::new();
    let Some(server) = S3Server::start(&workspace) else {
        return;
    };
    let config = workspace.write_config(
        "static.toml",
        &format!(
            "repo = 's3://{}/logged'\n{}",
            server.bucket,
            server.store_settings()
        ),
    );
    let output = workspace.pitr_with_env(&config, &["wal", "list"], &[("PITR_LOG", "info".into())]);
    assert!(
        stderr_of(&output).contains(
            "S3 credentials: a static access key (aws_access_key_id or AWS_ACCESS_KEY_ID)"
        ),
        "{}",
        stderr_of(&output)
    );
    let without_keys = format!(
        "[store]\naws_endpoint = 'http://127.0.0.1:{}'\naws_allow_http = 'true'\naws_region = 'us-east-1'\n",
        server.port
    );
    let config = workspace.write_config(
        "no-metadata.toml",
        &format!(
            "repo = 's3://{}/nokeys'\nstore_instance_metadata = false\n{without_keys}",
            server.bucket
        ),
    );
    let output = workspace.pitr(&config, &["wal", "list"]);
    assert_eq!(
        (output.status.code(), stderr_of(&output)),
        (
            Some(1),
            format!(
                "pitr wal list: error: no credentials for repository s3://{}/nokeys: none are configured and the instance metadata endpoint is turned off (store_instance_metadata = false); set aws_access_key_id and aws_secret_access_key in [store] (or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY), or use a web identity",
                server.bucket
            )
        )
    );
}

#[test]
fn a_daemon_without_the_repositorys_keyring_refuses_to_start() {
    if !pg15_available() {
        return;
    }
    // Without the keyring, an encrypted repository's genuine objects are unreadable, but a
    // planted unencrypted one would decode: a daemon that served requests anyway would hand
    // forged WAL to Postgres. The identity, not the object, decides.
    let fixture = Fixture::new();
    let history = "wal/00000002/00000002.history";
    let planted = envelope::encode_bytes(
        b"1\t0/3000000\tno recovery target specified\n",
        history,
        None,
        &EncodeOptions::default(),
    )
    .unwrap()
    .1
    .iter()
    .flat_map(|part| part.to_vec())
    .collect::<Vec<u8>>();
    fixture.plant(history, &planted);
    let url = format!("file://{}", fixture.repository.display());
    let config = fixture.workspace.write_config(
        "no-keyring.toml",
        &format!(
            "repo = '{url}'\npgdata = '{}'\nhttp_addr = '127.0.0.1:{}'\n",
            fixture.workspace.path("primary").display(),
            support::free_port()
        ),
    );
    let output = support::as_postgres_bounded(&fixture.workspace.pitr, 20)
        .env("PITR_LOG", "warn")
        .arg("--config")
        .arg(&config)
        .arg("daemon")
        .output()
        .unwrap();
    assert_eq!(
        (output.status.code(), stderr_of(&output)),
        (
            Some(1),
            format!(
                "pitr daemon: error: refusing to start the daemon: wrong keyring for repository {url}: the repository is encrypted but no keyring is configured; set PITR_KEY_FILE to its keyring"
            )
        )
    );
}

#[test]
fn keyring_ids_are_unique_and_never_zero() {
    let workspace = Workspace::new();
    let genuine = std::fs::read_to_string(workspace.keygen("keyring")).unwrap();
    let entry = genuine[genuine.find("[[keys]]").unwrap()..].to_string();
    let id = entry
        .lines()
        .find_map(|line| line.strip_prefix("id = "))
        .unwrap()
        .trim_matches('"')
        .to_string();
    let repository = workspace.path("repo");
    for (name, body, problem) in [
        (
            "repeated",
            format!("{genuine}\n{entry}"),
            format!("key 2 repeats the id {id} of an earlier key"),
        ),
        (
            "zero",
            genuine.replace(&id, "0000000000000000"),
            "key 1 has id 0000000000000000, which object headers reserve for \"not encrypted\""
                .to_string(),
        ),
    ] {
        let keyring = keyring_file(&workspace, name, &body, 0o600);
        let output = wal_list_with_keyring(&workspace, &repository, &keyring);
        assert_eq!(
            (output.status.code(), stderr_of(&output)),
            (
                Some(1),
                format!(
                    "pitr wal list: error: keyring {} is malformed: {problem}; fix the file, or restore it from your copy",
                    keyring.display()
                )
            ),
            "{name}"
        );
    }
}

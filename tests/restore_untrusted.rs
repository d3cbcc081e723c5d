//! Restore against a manifest it must not trust and a data directory it must not follow: paths
//! that leave the data directory, symbolic links the restore did not create, a file whose
//! content fails its checksum, and the order in which the directory becomes startable. Real
//! PostgreSQL 15, encrypted `file://` repository. A forged manifest is written the way a
//! keyholder's bug or mistake would write it: through the library, with the keyring.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use support::{Cluster, Workspace, pg15_available, stderr_of};

/// A primary archiving into an encrypted file:// repository, with one backup.
struct Fixture {
    workspace: Workspace,
    primary: Cluster,
    config: PathBuf,
    repository: PathBuf,
    backup: String,
}

impl Fixture {
    fn new() -> Self {
        let workspace = Workspace::new();
        let (config, repository) = workspace.encrypted_file_repository("store_timeout = 30\n");
        let archive_command = workspace.archive_command(&config);
        let mut primary = Cluster::init(
            &workspace,
            "primary",
            &format!(
                "wal_level = replica\narchive_mode = on\narchive_command = '{archive_command}'"
            ),
        );
        primary.start();
        primary.sql("create table kept as select g as id from generate_series(1, 1000) g");
        let output = workspace.pitr_with_env(&config, &["backup"], &primary.libpq_environment());
        assert!(output.status.success(), "backup: {}", stderr_of(&output));
        primary.sql("select pg_switch_wal()");
        primary.wait_until_archived(Duration::from_secs(60));
        let backup = std::fs::read_dir(repository.join("backups"))
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .file_name()
            .to_string_lossy()
            .into_owned();
        Fixture {
            workspace,
            primary,
            config,
            repository,
            backup,
        }
    }

    fn manifest_key(&self) -> String {
        format!("backups/{}/manifest", self.backup)
    }

    fn manifest_object(&self) -> PathBuf {
        self.repository.join(self.manifest_key())
    }

    fn keyring(&self) -> pitr::keyring::Keyring {
        pitr::keyring::Keyring::load(&self.workspace.path("keyring")).unwrap()
    }

    /// The backup's manifest as JSON, decoded with the keyring.
    fn manifest(&self) -> serde_json::Value {
        let object = std::fs::read(self.manifest_object()).unwrap();
        let mut plaintext = Vec::new();
        pitr::envelope::decode(
            &object[..],
            &self.manifest_key(),
            Some(&self.keyring()),
            &mut plaintext,
            pitr::envelope::DecodeMode::Alone,
        )
        .unwrap();
        serde_json::from_slice(&plaintext).unwrap()
    }

    /// Replaces the manifest with `manifest`, encrypted and named as pitr itself writes it.
    fn write_manifest(&self, manifest: &serde_json::Value) {
        let plaintext = serde_json::to_vec(manifest).unwrap();
        let (_, parts) = pitr::envelope::encode_bytes(
            &plaintext,
            &self.manifest_key(),
            Some(&self.keyring()),
            &pitr::envelope::EncodeOptions::default(),
        )
        .unwrap();
        std::fs::write(self.manifest_object(), parts.concat()).unwrap();
    }

    /// Runs `pitr restore --pgdata <workspace>/<name>` with `arguments` and `environment`.
    fn restore(
        &self,
        name: &str,
        arguments: &[&str],
        environment: &[(&str, String)],
    ) -> std::process::Output {
        let data = self.workspace.path(name);
        let mut command = vec!["restore", "--pgdata", data.to_str().unwrap()];
        command.extend_from_slice(arguments);
        self.workspace
            .pitr_with_env(&self.config, &command, environment)
    }
}

/// Every path under `root`, symbolic links not followed.
fn tree(root: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(directory) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&directory) else {
            continue;
        };
        for entry in entries.flatten() {
            if entry.file_type().unwrap().is_dir() {
                pending.push(entry.path());
            }
            found.push(entry.path());
        }
    }
    found.sort();
    found
}

/// Temporary files a restore writes beside a file's final name before its checksum matched.
fn temporary_files(root: &Path) -> Vec<PathBuf> {
    tree(root)
        .into_iter()
        .filter(|path| path.to_string_lossy().contains(".pitr-"))
        .collect()
}

#[test]
fn a_manifest_path_that_is_not_clean_and_inside_the_data_directory_is_refused() {
    if !pg15_available() {
        return;
    }
    let fixture = Fixture::new();
    let genuine = fixture.manifest();
    let outside = fixture.workspace.path("escaped");
    let absolute = PathBuf::from(format!("/tmp/pitr-forged-{}", std::process::id()));
    let refusal = |path: &str, reason: &str| {
        format!(
            "pitr restore: error: backup {id} is refused: its manifest lists the path '{path}', which is not a clean relative path inside the data directory: {reason}; the manifest is damaged or forged, and nothing was written. Find out who wrote {key} in the repository, then delete it to use the other backups",
            id = fixture.backup,
            key = fixture.manifest_key(),
        )
    };
    // (restore into, edit of the manifest, path shown, reason)
    type Edit = fn(&mut serde_json::Value, &str);
    let set_first_file: Edit = |manifest, path| manifest["files"][0]["path"] = path.into();
    let add_directory: Edit = |manifest, path| {
        manifest["directories"]
            .as_array_mut()
            .unwrap()
            .push(path.into())
    };
    let escaped = "../escaped".to_string();
    let absolute_text = absolute.display().to_string();
    let cases: Vec<(&str, Edit, String, &str, &str)> = vec![
        (
            "parent",
            set_first_file,
            escaped.clone(),
            "../escaped",
            "it has a '..' component",
        ),
        (
            "parent_inside",
            set_first_file,
            "base/../../escaped".into(),
            "base/../../escaped",
            "it has a '..' component",
        ),
        (
            "absolute",
            set_first_file,
            absolute_text.clone(),
            &absolute_text,
            "it is absolute",
        ),
        (
            "empty_component",
            add_directory,
            "base//escaped".into(),
            "base//escaped",
            "it has an empty component",
        ),
        (
            "dot_component",
            add_directory,
            "./escaped".into(),
            "./escaped",
            "it has a '.' component",
        ),
        (
            "nul",
            set_first_file,
            "base/1/\0escaped".into(),
            "base/1/\\0escaped",
            "it contains a NUL byte",
        ),
        (
            "backslash",
            set_first_file,
            "base\\..\\..\\escaped".into(),
            "base\\\\..\\\\..\\\\escaped",
            "it contains a backslash",
        ),
        ("empty", set_first_file, String::new(), "", "it is empty"),
    ];
    for (name, edit, path, shown, reason) in cases {
        let mut forged = genuine.clone();
        edit(&mut forged, &path);
        fixture.write_manifest(&forged);
        let output = fixture.restore(name, &[], &[]);
        assert_eq!(
            output.status.code(),
            Some(1),
            "{name}: {}",
            stderr_of(&output)
        );
        assert_eq!(stderr_of(&output), refusal(shown, reason), "{name}");
        assert!(
            !outside.exists(),
            "{name}: a file was written outside the data directory"
        );
        assert!(
            !absolute.exists(),
            "{name}: a file was written at an absolute path"
        );
        assert!(
            !fixture.workspace.path(name).exists(),
            "{name}: a refused manifest must be refused before anything is written"
        );
    }

    // A tablespace entry must name an OID and an absolute location.
    let mut forged = genuine.clone();
    forged["tablespace_map"] = "16390 relative/location\n".into();
    fixture.write_manifest(&forged);
    let output = fixture.restore("tablespace", &[], &[]);
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(
        stderr_of(&output),
        format!(
            "pitr restore: error: backup {id} is refused: its manifest lists the tablespace '16390 relative/location', which is not an OID and a clean absolute location; the manifest is damaged or forged, and nothing was written. Find out who wrote {key} in the repository, then delete it to use the other backups",
            id = fixture.backup,
            key = fixture.manifest_key(),
        )
    );
    assert!(!fixture.workspace.path("tablespace").exists());

    // The genuine manifest still restores.
    fixture.write_manifest(&genuine);
    let output = fixture.restore("genuine", &[], &[]);
    assert!(output.status.success(), "{}", stderr_of(&output));
}

#[test]
fn a_file_that_fails_its_checksum_leaves_nothing_under_its_name() {
    if !pg15_available() {
        return;
    }
    let fixture = Fixture::new();
    let mut forged = fixture.manifest();
    // The chunks authenticate, but the whole file is not what the manifest promises: one file
    // is given the chunks of another.
    let files = forged["files"].as_array_mut().unwrap();
    let version = files
        .iter()
        .position(|file| file["path"] == "PG_VERSION")
        .unwrap();
    let donor = files
        .iter()
        .position(|file| file["path"] == "postgresql.conf")
        .unwrap();
    files[version]["chunks"] = files[donor]["chunks"].clone();
    fixture.write_manifest(&forged);

    let output = fixture.restore("restored", &[], &[]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr_of(&output));
    assert_eq!(
        stderr_of(&output),
        "pitr restore: error: PG_VERSION does not match its checksum after restore; the repository is damaged, and the restored directory will not start"
    );
    let data = fixture.workspace.path("restored");
    assert!(
        !data.join("PG_VERSION").exists(),
        "a file that failed its checksum stayed under its final name"
    );
    assert_eq!(temporary_files(&data), Vec::<PathBuf>::new());
    assert!(!data.join("global/pg_control").exists());
}

#[test]
fn a_delta_restore_never_follows_a_symlink_it_did_not_create() {
    if !pg15_available() {
        return;
    }
    let fixture = Fixture::new();
    let data = fixture.workspace.path("restored");
    let outside = fixture.workspace.path("outside");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, data.join("base")).unwrap();
    fixture.workspace.give_to_postgres(&data);
    fixture.workspace.give_to_postgres(&outside);

    let output = fixture.restore("restored", &["--delta"], &[]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr_of(&output));
    assert_eq!(
        stderr_of(&output),
        format!(
            "pitr restore: error: {} is a symbolic link, and a restore writes only below the data directory through links it created itself; nothing was changed. Replace the link with a directory, or restore into an empty directory without --delta",
            data.join("base").display()
        )
    );
    assert_eq!(tree(&outside), Vec::<PathBuf>::new(), "written outside");
    assert_eq!(
        tree(&data),
        vec![data.join("base")],
        "the directory changed"
    );
}

#[test]
fn pg_control_is_the_last_thing_a_restore_makes_durable() {
    if !pg15_available() {
        return;
    }
    let mut fixture = Fixture::new();
    // A test-only stop (debug builds) right before pg_control: what a crash at that moment
    // leaves on disk.
    let output = fixture.restore(
        "restored",
        &[],
        &[("PITR_TEST_FAIL_BEFORE_PG_CONTROL", "1".to_string())],
    );
    assert_eq!(output.status.code(), Some(1), "{}", stderr_of(&output));
    assert_eq!(
        stderr_of(&output),
        "pitr restore: error: stopped before writing global/pg_control, as PITR_TEST_FAIL_BEFORE_PG_CONTROL asks; the restored directory will not start"
    );
    let data = fixture.workspace.path("restored");
    assert!(!data.join("global/pg_control").exists());
    assert!(data.join("backup_label").is_file(), "backup_label missing");
    assert!(
        data.join("recovery.signal").is_file(),
        "recovery.signal missing"
    );
    let settings = std::fs::read_to_string(data.join("postgresql.auto.conf")).unwrap();
    assert!(settings.contains("restore_command = "), "{settings}");
    assert!(data.join("PG_VERSION").is_file());
    assert_eq!(temporary_files(&data), Vec::<PathBuf>::new());
    let start = support::as_postgres_bounded(&fixture.primary.bin.join("pg_ctl"), 60)
        .args(["-D"])
        .arg(&data)
        .args(["-l"])
        .arg(data.with_extension("log"))
        .args(["-w", "-t", "20", "start"])
        .output()
        .unwrap();
    assert!(
        !start.status.success(),
        "a directory without pg_control started"
    );

    // Restored again with --delta, it starts and recovers.
    fixture.primary.stop();
    let output = fixture.restore("restored", &["--delta"], &[]);
    assert!(output.status.success(), "{}", stderr_of(&output));
    let mut restored = Cluster::existing(&fixture.workspace, "restored");
    restored.append_settings("archive_mode = off");
    restored.start();
    restored.wait_for("select pg_is_in_recovery()", "f", Duration::from_secs(120));
    assert_eq!(restored.sql("select count(*) from kept"), "1000");
}

//! `pitr verify` against a real PostgreSQL 15 and an encrypted file:// repository: a clean
//! repository verifies; a second run reads nothing it verified; a flipped byte in a chunk, a
//! deleted WAL segment and a truncated manifest are each named, with the backup they break.

mod support;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use support::{Cluster, Workspace, files_under, pg15_available, stderr_of};

fn verify(workspace: &Workspace, config: &Path, arguments: &[&str]) -> (Output, serde_json::Value) {
    let mut command = vec!["verify", "--output", "json"];
    command.extend_from_slice(arguments);
    let output = workspace.pitr(config, &command);
    let report = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|_| panic!("verify prints JSON: {}", stderr_of(&output)));
    (output, report)
}

fn backup(workspace: &Workspace, config: &Path, primary: &Cluster) -> String {
    let output = workspace.pitr_with_env(
        config,
        &["backup", "--output", "json"],
        &primary.libpq_environment(),
    );
    assert!(output.status.success(), "backup: {}", stderr_of(&output));
    let record: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    record["id"].as_str().unwrap().to_string()
}

#[test]
fn verify_names_every_problem_and_reads_nothing_twice() {
    if !pg15_available() {
        return;
    }
    let workspace = Workspace::new();
    let (config, repository) = workspace.encrypted_file_repository("store_timeout = 30\n");
    let archive_command = workspace.archive_command(&config);
    let mut primary = Cluster::init_with(
        &workspace,
        "primary",
        &format!("wal_level = replica\narchive_mode = on\narchive_command = '{archive_command}'"),
        &["--data-checksums"],
    );
    primary.start();
    primary.sql("create table t as select g from generate_series(1, 50000) g");
    let first = backup(&workspace, &config, &primary);
    let chunks_of_first = files_under(&repository.join("chunks"));
    for _ in 0..3 {
        primary.sql("insert into t select g from generate_series(1, 1000) g");
        primary.sql("select pg_switch_wal()");
    }
    let second = backup(&workspace, &config, &primary);
    for value in 0..2 {
        primary.sql(&format!("insert into t values ({value})"));
        primary.sql("select pg_switch_wal()");
    }
    primary.wait_until_archived(Duration::from_secs(60));

    // `pitr list` adds index entries (the commit-timestamp index), which verify reads too.
    let listed = workspace.pitr(&config, &["list", "--output", "json"]);
    let listing: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    let (output, clean) = verify(&workspace, &config, &[]);
    assert!(
        output.status.success(),
        "a clean repository verifies: {clean}"
    );
    assert_eq!(clean["problems"], serde_json::json!([]));
    assert_eq!(clean["backups"], 2);
    let read = clean["objects_read"].as_u64().unwrap();
    assert!(read > 10, "{clean}");
    assert_eq!(clean["objects_skipped"], 0);

    let (output, again) = verify(&workspace, &config, &[]);
    assert!(output.status.success());
    assert_eq!(
        again["objects_read"], 0,
        "nothing verified is read again: {again}"
    );
    assert_eq!(again["objects_skipped"].as_u64().unwrap(), read);
    // Asked to decode, it reads everything once more (so far each was only authenticated),
    // then nothing.
    let (output, decoded) = verify(&workspace, &config, &["--decode"]);
    assert!(output.status.success(), "{decoded}");
    assert_eq!(decoded["objects_read"].as_u64().unwrap(), read, "{decoded}");
    let (_, decoded_again) = verify(&workspace, &config, &["--decode"]);
    assert_eq!(decoded_again["objects_read"], 0, "{decoded_again}");

    // A flipped byte in the first backup's largest chunk.
    let chunk = chunks_of_first
        .into_iter()
        .max_by_key(|path| std::fs::metadata(path).unwrap().len())
        .unwrap();
    let mut bytes = std::fs::read(&chunk).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x20;
    std::fs::write(&chunk, &bytes).unwrap();
    let chunk_key = chunk
        .strip_prefix(&repository)
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    // A WAL segment after the second backup: it restores, but cannot reach the end.
    let manifest_of = |id: &str| repository.join("backups").join(id).join("manifest");
    let stop_lsn = listing["backups"][1]["stop_lsn"]
        .as_str()
        .unwrap()
        .to_string();
    let (high, low) = stop_lsn.split_once('/').unwrap();
    let stop =
        (u64::from_str_radix(high, 16).unwrap() << 32) | u64::from_str_radix(low, 16).unwrap();
    let after = (stop >> 24) + 1;
    let segments: Vec<PathBuf> = files_under(&repository.join("wal/00000001"))
        .into_iter()
        .filter(|path| path.file_name().unwrap().len() == 24)
        .collect();
    let doomed = segments
        .iter()
        .find(|path| {
            u64::from_str_radix(&path.file_name().unwrap().to_str().unwrap()[16..], 16).unwrap()
                == after
        })
        .expect("a segment after the second backup")
        .clone();
    assert!(
        segments.last().unwrap() != &doomed,
        "a segment lies after the deleted one"
    );
    std::fs::remove_file(&doomed).unwrap();
    let doomed_key = doomed
        .strip_prefix(&repository)
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    // The second backup's manifest, cut short.
    let manifest = manifest_of(&second);
    let length = std::fs::metadata(&manifest).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&manifest)
        .unwrap()
        .set_len(length / 2)
        .unwrap();

    let (output, damaged) = verify(&workspace, &config, &[]);
    assert_eq!(output.status.code(), Some(1), "{damaged}");
    assert_eq!(
        damaged["objects_read"], 1,
        "only the changed chunk is read again: {damaged}"
    );
    let problems: Vec<(String, String)> = damaged["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|problem| {
            (
                problem["object"].as_str().unwrap().to_string(),
                problem["backup"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    let mut expected = vec![
        (chunk_key.clone(), first.clone()),
        (doomed_key.clone(), first.clone()),
        (format!("backups/{second}/manifest"), second.clone()),
    ];
    expected.sort_by(|a, b| (&a.1, &a.0).cmp(&(&b.1, &b.0)));
    assert_eq!(problems, expected, "{damaged}");
    let detail = |object: &str| {
        damaged["problems"]
            .as_array()
            .unwrap()
            .iter()
            .find(|problem| problem["object"] == object)
            .unwrap()["detail"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert!(
        detail(&chunk_key).contains("failed"),
        "{}",
        detail(&chunk_key)
    );
    assert!(
        detail(&doomed_key).contains("cannot reach past it"),
        "{}",
        detail(&doomed_key)
    );
    assert!(
        detail(&format!("backups/{second}/manifest")).starts_with("the manifest cannot be read")
    );

    // The table form names each problem on its own line and exits 1.
    let table = workspace.pitr(&config, &["verify", "--full"]);
    assert_eq!(table.status.code(), Some(1));
    let text = String::from_utf8_lossy(&table.stdout);
    assert_eq!(
        text.lines()
            .filter(|line| line.starts_with("problem: "))
            .count(),
        3,
        "{text}"
    );
}

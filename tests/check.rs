//! `pitr check` against a real PostgreSQL 15: on a working setup every check passes, ending
//! with a real archive round trip; with another keyring it stops at the repository check and
//! names the problem; without an archive_command the round trip fails and says what to check.

mod support;

use std::time::Duration;

use support::{Cluster, Workspace, pg15_available, stderr_of};

fn lines(output: &std::process::Output) -> Vec<String> {
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn check_walks_the_whole_chain_and_stops_at_the_first_failure() {
    if !pg15_available() {
        return;
    }
    let workspace = Workspace::new();
    let (config, _) = workspace.encrypted_file_repository("store_timeout = 30\n");
    let archive_command = workspace.archive_command(&config);
    let mut primary = Cluster::init_with(
        &workspace,
        "primary",
        &format!("wal_level = replica\narchive_mode = on\narchive_command = '{archive_command}'"),
        &[],
    );
    primary.start();
    primary.sql("create table t as select 1 as x");
    primary.sql("select pg_switch_wal()");
    primary.wait_until_archived(Duration::from_secs(60));

    let environment = primary.libpq_environment();
    let output = workspace.pitr_with_env(&config, &["check"], &environment);
    assert!(
        output.status.success(),
        "check: {}\n{}",
        stderr_of(&output),
        lines(&output).join("\n")
    );
    let checks: Vec<String> = lines(&output)
        .iter()
        .map(|line| line.split(':').next().unwrap().to_string())
        .collect();
    assert_eq!(
        checks,
        [
            "ok   configuration",
            "ok   keyring",
            "ok   repository",
            "ok   create-only writes",
            "ok   conditional writes",
            "ok   clock",
            "ok   archiving",
        ]
    );
    let last = lines(&output).last().unwrap().clone();
    assert!(
        last.contains("was archived and read back verified"),
        "{last}"
    );

    let output = workspace.pitr_with_env(&config, &["check", "--output", "json"], &environment);
    let results: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(results.as_array().unwrap().len(), 7);
    assert!(
        results
            .as_array()
            .unwrap()
            .iter()
            .all(|result| result["ok"] == true)
    );

    // Another keyring: the repository check fails, naming it, and nothing after it runs.
    let other = workspace.keygen("other-keyring");
    let text = std::fs::read_to_string(&config).unwrap();
    let key_line = text
        .lines()
        .find(|line| line.starts_with("key_file"))
        .unwrap()
        .to_string();
    let wrong = workspace.write_config(
        "wrong.toml",
        &text.replace(&key_line, &format!("key_file = '{}'", other.display())),
    );
    let output = workspace.pitr_with_env(&wrong, &["check"], &environment);
    assert_eq!(output.status.code(), Some(1));
    let printed = lines(&output);
    assert_eq!(printed.len(), 3, "{printed:?}");
    assert!(
        printed[2].starts_with("FAIL repository: wrong keyring for repository"),
        "{}",
        printed[2]
    );

    // No archive_command: the round trip fails after its wait, saying what to check.
    primary.sql("alter system set archive_command = '/bin/false'");
    primary.sql("select pg_reload_conf()");
    let output = workspace.pitr_with_env(&config, &["check", "--archive-wait", "3"], &environment);
    assert_eq!(output.status.code(), Some(1));
    let last = lines(&output).last().unwrap().clone();
    assert!(
        last.starts_with("FAIL archiving: ")
            && last.contains(
                "is not in the repository 3 s after pg_switch_wal(); check that archive_command is"
            ),
        "{last}"
    );
}

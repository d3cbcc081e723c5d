//! The commit-timestamp index against Postgres's own reader: for every archived segment of a
//! real PostgreSQL 15 workload, `pitr wal show` finds exactly the transaction ends (commits,
//! aborts, prepared commits and rollbacks) and restore points that `pg_waldump` prints, with the
//! same LSNs, transaction ids and microsecond timestamps, records straddling segments included.

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use support::{Cluster, Workspace, pg15_available, stderr_of};

/// One transaction end or restore point as pg_waldump prints it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Event {
    lsn: u64,
    xid: u32,
    /// Microseconds since 2000-01-01 UTC (Postgres's TimestampTz).
    time: i64,
    label: String,
}

fn parse_lsn(text: &str) -> u64 {
    let (high, low) = text.split_once('/').unwrap();
    (u64::from_str_radix(high, 16).unwrap() << 32) | u64::from_str_radix(low, 16).unwrap()
}

fn postgres_micros(text: &str) -> i64 {
    let time = chrono::NaiveDateTime::parse_from_str(
        text.trim_end_matches(" UTC"),
        "%Y-%m-%d %H:%M:%S%.f",
    )
    .unwrap_or_else(|error| panic!("timestamp '{text}': {error}"));
    time.and_utc().timestamp_micros() - 946_684_800 * 1_000_000
}

/// pg_waldump's transaction ends and restore points, keyed by segment number.
/// Per segment: the ids of the transactions whose (not prepared) commit or abort record
/// starts there, and the number of COMMIT_PREPARED / ABORT_PREPARED records.
type EndedXids = BTreeMap<u64, (std::collections::BTreeSet<u32>, u64)>;

fn waldump_events(
    directory: &Path,
    first: &str,
    last: &str,
    ended_xids: &mut EndedXids,
) -> BTreeMap<u64, Vec<Event>> {
    let output = Command::new("/usr/lib/postgresql/15/bin/pg_waldump")
        .env("TZ", "UTC")
        .arg("-p")
        .arg(directory)
        .args([first, last])
        .output()
        .unwrap();
    let mut events: BTreeMap<u64, Vec<Event>> = BTreeMap::new();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let field = |name: &str| {
            line.split(name)
                .nth(1)
                .map(|rest| rest.split(',').next().unwrap().trim().to_string())
        };
        let (Some(lsn), Some(description)) = (field("lsn: "), line.split("desc: ").nth(1)) else {
            continue;
        };
        let lsn = parse_lsn(&lsn);
        let xid: u32 = field("tx: ").unwrap().parse().unwrap();
        let event = if line.starts_with("rmgr: Transaction") {
            let Some((kind, rest)) = description.split_once(' ') else {
                continue;
            };
            if !matches!(
                kind,
                "COMMIT" | "ABORT" | "COMMIT_PREPARED" | "ABORT_PREPARED"
            ) {
                continue;
            }
            let ended = ended_xids.entry(lsn >> 24).or_default();
            if kind.ends_with("_PREPARED") {
                ended.1 += 1;
            } else {
                ended.0.insert(xid);
            }
            // COMMIT_PREPARED and ABORT_PREPARED print the prepared xid first: "7: 2026-…".
            let time_text = rest.split(';').next().unwrap();
            let time_text = time_text
                .rsplit_once(": ")
                .map_or(time_text, |(_, time)| time);
            Event {
                lsn,
                xid,
                time: postgres_micros(time_text),
                label: if kind.starts_with("COMMIT") {
                    "committed"
                } else {
                    "aborted"
                }
                .into(),
            }
        } else if line.starts_with("rmgr: XLOG") && description.starts_with("RESTORE_POINT ") {
            Event {
                lsn,
                xid,
                time: 0,
                label: description["RESTORE_POINT ".len()..].trim().to_string(),
            }
        } else {
            continue;
        };
        events.entry(lsn >> 24).or_default().push(event);
    }
    events
}

fn transaction_end(value: &serde_json::Value) -> Event {
    Event {
        lsn: value["lsn"].as_u64().unwrap(),
        xid: value["xid"].as_u64().unwrap() as u32,
        time: value["time"].as_i64().unwrap(),
        label: if value["committed"].as_bool().unwrap() {
            "committed"
        } else {
            "aborted"
        }
        .into(),
    }
}

#[test]
fn the_commit_index_matches_pg_waldump_on_every_segment() {
    if !pg15_available() {
        return;
    }
    let workspace = Workspace::new();
    let (config, repository) = workspace.encrypted_file_repository("");
    let archive_command = workspace.archive_command(&config);
    let mut primary = Cluster::init_with(
        &workspace,
        "primary",
        &format!(
            "wal_level = replica\narchive_mode = on\narchive_command = '{archive_command}'\nmax_prepared_transactions = 4\ntimezone = 'UTC'"
        ),
        &[],
    );
    primary.start();
    primary.pgbench(&["-i", "-s", "10"]);
    primary.sql("select pg_create_restore_point('after_init')");
    primary.pgbench(&["-c", "2", "-t", "3000"]);
    primary.sql("create table kept (id int)");
    let _ = primary.try_sql("begin; insert into kept values (1); select 1/0; commit");
    primary.sql("begin; insert into kept values (2); prepare transaction 'p1'");
    primary.sql("commit prepared 'p1'");
    primary.sql("begin; insert into kept values (3); prepare transaction 'p2'");
    primary.sql("rollback prepared 'p2'");
    primary.sql("select pg_create_restore_point('the_end')");
    primary.sql("select pg_switch_wal()");
    primary.wait_until_archived(Duration::from_secs(120));

    // Every archived segment, fetched back through archive-get (and checked byte for byte).
    assert!(support::round_trip_archived_segments(&workspace, &config, &primary.data) >= 6);
    let fetched = workspace.path("fetched");
    let mut segments: Vec<String> = std::fs::read_dir(&fetched)
        .unwrap()
        .flatten()
        .map(|entry| entry.file_name().into_string().unwrap())
        .collect();
    segments.sort();
    let mut expected_xids = EndedXids::new();
    let expected = waldump_events(
        &fetched,
        &segments[0],
        segments.last().unwrap(),
        &mut expected_xids,
    );
    assert!(
        expected_xids
            .values()
            .map(|(_, prepared)| prepared)
            .sum::<u64>()
            >= 2,
        "the workload ends prepared transactions"
    );
    let all: Vec<&Event> = expected.values().flatten().collect();
    assert!(
        all.iter().any(|event| event.label == "aborted"),
        "the workload aborts"
    );
    assert!(
        all.iter()
            .filter(|event| event.label == "committed")
            .count()
            > 3000
    );

    let mut seen_transaction_ends = 0;
    for segment in &segments {
        let output = workspace.pitr(&config, &["wal", "show", segment, "--output", "json"]);
        assert!(
            output.status.success(),
            "wal show {segment}: {}",
            stderr_of(&output)
        );
        let shown: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        let summary = &shown["summary"];
        let number = u64::from_str_radix(&segment[8..16], 16).unwrap() * 256
            + u64::from_str_radix(&segment[16..24], 16).unwrap();
        let events = expected.get(&number).cloned().unwrap_or_default();
        let (points, ends): (Vec<Event>, Vec<Event>) = events
            .into_iter()
            .partition(|event| event.label != "committed" && event.label != "aborted");
        assert_eq!(
            summary["transaction_ends"].as_u64().unwrap(),
            ends.len() as u64,
            "{segment}: {summary}"
        );
        seen_transaction_ends += ends.len();
        // The transaction ids --target-xid is checked against: every run expanded, exactly
        // the ids pg_waldump shows ending here, and the prepared ends counted apart.
        let (xids, prepared) = expected_xids.get(&number).cloned().unwrap_or_default();
        let shown_xids: std::collections::BTreeSet<u32> = summary["ended_xids"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|run| run["first"].as_u64().unwrap()..=run["last"].as_u64().unwrap())
            .map(|xid| xid as u32)
            .collect();
        assert_eq!(shown_xids, xids, "{segment}");
        assert_eq!(
            summary["prepared_ends"].as_u64().unwrap(),
            prepared,
            "{segment}"
        );
        if let (Some(first), Some(last)) = (ends.first(), ends.last()) {
            assert_eq!(
                &transaction_end(&summary["first_transaction_end"]),
                first,
                "{segment}"
            );
            assert_eq!(
                &transaction_end(&summary["last_transaction_end"]),
                last,
                "{segment}"
            );
            let latest = ends.iter().map(|event| event.time).max().unwrap();
            assert_eq!(
                summary["latest_time"].as_i64().unwrap(),
                latest,
                "{segment}"
            );
        } else {
            assert!(
                summary["first_transaction_end"].is_null(),
                "{segment}: {summary}"
            );
        }
        let shown_points: Vec<(u64, String)> = summary["restore_points"]
            .as_array()
            .unwrap()
            .iter()
            .map(|point| {
                (
                    point["lsn"].as_u64().unwrap(),
                    point["name"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        let expected_points: Vec<(u64, String)> = points
            .into_iter()
            .map(|point| (point.lsn, point.label))
            .collect();
        assert_eq!(shown_points, expected_points, "{segment}");
    }
    assert_eq!(
        seen_transaction_ends,
        all.iter().filter(|event| event.time != 0).count()
    );

    // The index is stored: `pitr list` reads it and names the archive's last transaction.
    let output = workspace.pitr(&config, &["list", "--output", "json"]);
    assert!(output.status.success(), "list: {}", stderr_of(&output));
    let listing: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let last = all.iter().rfind(|event| event.time != 0).unwrap();
    assert_eq!(
        listing["windows"][0]["latest_xid"].as_u64().unwrap(),
        u64::from(last.xid)
    );
    assert!(
        repository
            .join("index/00000001")
            .join(&segments[0])
            .exists()
    );
    primary.stop();
}

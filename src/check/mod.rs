//! `pitr check`: the whole chain on a live cluster, one check at a time, stopping at the first
//! that fails: the configuration, the keyring, the repository's identity against this cluster,
//! the store's create-only and conditional writes, the clock against Postgres's, and then a
//! real archive round trip: `pg_switch_wal()`, a wait until that segment is in the repository,
//! and a verified read of it.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;

use crate::config::Settings;
use crate::repository::Repository;
use crate::wal::{self, WalFileName};

/// How far the clocks of pitr's host and Postgres's may differ: time targets and backup times
/// compare the two.
const MAX_CLOCK_SKEW: Duration = Duration::from_secs(5);

/// One check's outcome, as a line or a JSON entry.
#[derive(Debug, Clone, Serialize)]
pub struct CheckResult {
    pub check: &'static str,
    pub ok: bool,
    pub detail: String,
}

/// Runs the checks in order and returns each outcome, ending at the first that fails.
pub async fn run(settings: &Settings, archive_wait: Duration) -> Vec<CheckResult> {
    let mut results = Vec::new();
    let mut record = |check: &'static str, outcome: Result<String>| {
        let ok = outcome.is_ok();
        results.push(CheckResult {
            check,
            ok,
            detail: outcome.unwrap_or_else(|error| format!("{error:#}")),
        });
        ok
    };
    let repository = match Repository::open(settings) {
        Ok(repository) => repository,
        Err(error) => {
            record("configuration", Err(error.into()));
            return results;
        }
    };
    let configured = format!(
        "repository {}, data directory {}",
        repository.url,
        settings.pgdata.display()
    );
    if !record("configuration", Ok(configured)) {
        return results;
    }
    let keyring = match repository.keyring() {
        Some(keyring) => format!(
            "{} ({} key(s), newest {})",
            keyring.path.display(),
            keyring.keys().len(),
            keyring.newest().id
        ),
        None => "none: objects are compressed and checksummed but not encrypted".to_string(),
    };
    if !record("keyring", Ok(keyring))
        || !record("repository", check_identity(settings, &repository).await)
        || !record("create-only writes", probe_create_only(&repository).await)
        || !record("conditional writes", probe_conditional(&repository).await)
    {
        return results;
    }
    let client = match crate::postgres::connect(settings, Duration::from_secs(10)).await {
        Ok(client) => client,
        Err(error) => {
            record("postgres", Err(error));
            return results;
        }
    };
    if !record("clock", check_clock(&client).await) {
        return results;
    }
    record(
        "archiving",
        check_archiving(&client, &repository, archive_wait).await,
    );
    results
}

async fn check_identity(settings: &Settings, repository: &Repository) -> Result<String> {
    let identity = repository.require_identity().await?;
    if let Some(local) = wal::control_file_system_identifier(&settings.pgdata) {
        crate::repository::check_same_cluster(&repository.url, &identity, local)?;
    }
    Ok(format!(
        "cluster {}, PostgreSQL {}, {} MiB segments, {}",
        identity.system_identifier,
        identity.pg_version,
        identity.wal_segment_size >> 20,
        match &identity.encryption {
            Some(encryption) => format!("encrypted with key {}", encryption.key_id),
            None => "not encrypted".to_string(),
        }
    ))
}

async fn probe_create_only(repository: &Repository) -> Result<String> {
    repository.probe_create_only().await?;
    Ok("a second create of one name is refused, the first object kept".to_string())
}

async fn probe_conditional(repository: &Repository) -> Result<String> {
    repository.probe_conditional_update().await?;
    Ok("an update at a stale version is refused".to_string())
}

async fn check_clock(client: &tokio_postgres::Client) -> Result<String> {
    let before = chrono::Utc::now();
    let row = client
        .query_one("select extract(epoch from clock_timestamp())::float8", &[])
        .await
        .context("asking Postgres for its time")?;
    let after = chrono::Utc::now();
    let theirs: f64 = row.get(0);
    let ours = (before.timestamp_micros() + after.timestamp_micros()) as f64 / 2e6;
    let skew = (theirs - ours).abs();
    if skew > MAX_CLOCK_SKEW.as_secs_f64() {
        bail!(
            "this host's clock and Postgres's differ by {skew:.1} s (more than {} s): time targets and backup times would disagree; synchronise both clocks (NTP)",
            MAX_CLOCK_SKEW.as_secs()
        );
    }
    Ok(format!("within {:.0} ms of Postgres's", skew * 1000.0))
}

/// Forces a segment switch and waits until that segment is in the repository and reads back.
async fn check_archiving(
    client: &tokio_postgres::Client,
    repository: &Repository,
    wait: Duration,
) -> Result<String> {
    let in_recovery: bool = client
        .query_one("select pg_is_in_recovery()", &[])
        .await?
        .get(0);
    if in_recovery {
        return Ok("skipped: the server is a standby, which archives nothing itself".to_string());
    }
    // Some WAL first, so that the switch has a segment to finish even on an idle server.
    client
        .query_one(
            "select pg_logical_emit_message(false, 'pitr check', '')::text",
            &[],
        )
        .await
        .context("writing a WAL record")?;
    let name: String = client
        .query_one("select pg_walfile_name(pg_switch_wal())", &[])
        .await
        .context("pg_switch_wal()")?
        .get(0);
    let file: WalFileName = name.parse()?;
    let key = Repository::wal_key(&file);
    let started = Instant::now();
    loop {
        if let Some(bytes) = repository.read_bytes(&key).await? {
            return Ok(format!(
                "{name} was archived and read back verified ({} MiB) {:.1} s after pg_switch_wal()",
                bytes.len() >> 20,
                started.elapsed().as_secs_f64()
            ));
        }
        if started.elapsed() > wait {
            bail!(
                "{name} is not in the repository {} s after pg_switch_wal(); check that archive_command is pitr-archive-push (or pitr archive-push) with this configuration, and the server log",
                wait.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

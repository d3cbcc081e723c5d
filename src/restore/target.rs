//! Recovery targets: what the user asked for, parsed strictly, and the settings that tell
//! Postgres to stop there.

use std::fmt;

use anyhow::{Result, bail};
use chrono::{DateTime, FixedOffset, NaiveDateTime};

use crate::wal::Lsn;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecoveryTarget {
    /// Replay everything archived.
    EndOfArchive,
    /// Stop as soon as the backup is consistent.
    Immediate,
    Time(DateTime<FixedOffset>),
    Lsn(Lsn),
    Xid(String),
    Name(String),
}

impl fmt::Display for RecoveryTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RecoveryTarget::EndOfArchive => f.write_str("the end of the archive"),
            RecoveryTarget::Immediate => f.write_str("the earliest consistent point"),
            RecoveryTarget::Time(time) => {
                write!(f, "time {}", time.format("%Y-%m-%d %H:%M:%S%.6f%:z"))
            }
            RecoveryTarget::Lsn(lsn) => write!(f, "LSN {lsn}"),
            RecoveryTarget::Xid(xid) => write!(f, "transaction {xid}"),
            RecoveryTarget::Name(name) => write!(f, "restore point '{name}'"),
        }
    }
}

/// The 32-bit transaction id Postgres compares records with: like `recovery_target_xid`
/// itself, a 64-bit id (with its epoch, as `txid_current()` gives it) counts by its low bits.
pub fn xid_of(text: &str) -> Result<u32> {
    match text.trim().parse::<u64>() {
        Ok(full) => Ok(full as u32),
        Err(_) => {
            bail!("--target-xid '{text}' is not a transaction id: give a number such as 7421")
        }
    }
}

/// Parses a timestamp in ISO 8601 or Postgres timestamptz syntax. A zone is required: a
/// timestamp without one would silently mean the server's zone, and land somewhere else.
pub fn parse_time(text: &str) -> Result<DateTime<FixedOffset>> {
    let trimmed = text.trim();
    let normalized = trimmed
        .strip_suffix(" UTC")
        .or_else(|| trimmed.strip_suffix(" utc"))
        .map(|base| format!("{base}+00:00"))
        .unwrap_or_else(|| trimmed.to_string());
    if let Ok(time) = DateTime::parse_from_rfc3339(&normalized) {
        return Ok(time);
    }
    for format in [
        "%Y-%m-%d %H:%M:%S%.f%#z",
        "%Y-%m-%dT%H:%M:%S%.f%#z",
        "%Y-%m-%d %H:%M:%S%.f %#z",
    ] {
        if let Ok(time) = DateTime::parse_from_str(&normalized, format) {
            return Ok(time);
        }
    }
    for format in ["%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M:%S%.f"] {
        if NaiveDateTime::parse_from_str(&normalized, format).is_ok() {
            bail!("timestamp '{text}' has no time zone; add one, for example '{trimmed}+00'");
        }
    }
    bail!(
        "'{text}' is not a timestamp; use ISO 8601 or Postgres syntax with a zone, for example '2026-11-20 14:30:00+00'"
    )
}

impl RecoveryTarget {
    /// The postgresql.conf lines that make Postgres stop at this target.
    pub fn settings(&self) -> Vec<(String, String)> {
        let setting = |key: &str, value: String| vec![(key.to_string(), value)];
        match self {
            RecoveryTarget::EndOfArchive => Vec::new(),
            RecoveryTarget::Immediate => setting("recovery_target", "immediate".into()),
            RecoveryTarget::Time(time) => setting(
                "recovery_target_time",
                time.format("%Y-%m-%d %H:%M:%S%.6f%:z").to_string(),
            ),
            RecoveryTarget::Lsn(lsn) => setting("recovery_target_lsn", lsn.to_string()),
            RecoveryTarget::Xid(xid) => setting("recovery_target_xid", xid.clone()),
            RecoveryTarget::Name(name) => setting("recovery_target_name", name.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_need_a_zone() {
        for text in [
            "2026-11-20 14:30:00+00",
            "2026-11-20T14:30:00Z",
            "2026-11-20 14:30:00.123456+01:00",
            "2026-11-20 14:30:00 UTC",
        ] {
            assert!(parse_time(text).is_ok(), "{text}");
        }
        assert_eq!(
            parse_time("2026-11-20 14:30:00").unwrap_err().to_string(),
            "timestamp '2026-11-20 14:30:00' has no time zone; add one, for example '2026-11-20 14:30:00+00'"
        );
        assert!(
            parse_time("yesterday")
                .unwrap_err()
                .to_string()
                .contains("is not a timestamp")
        );
        let time = parse_time("2026-11-20 14:30:00.5+02").unwrap();
        assert_eq!(
            time.timestamp_micros(),
            parse_time("2026-11-20T12:30:00.5Z")
                .unwrap()
                .timestamp_micros()
        );
    }
}

//! The key layout: every name an object has in a repository, built and parsed here and nowhere
//! else (docs/FORMAT.md, "Repository layout").
//!
//! ```text
//! pitr.identity                          the identity (plain JSON)
//! wal/<timeline>/<WAL file name>         segments, .partial, .backup and .history files
//! backups/<backup id>/manifest           a backup's manifest
//! chunks/<first 2 hex digits>/<chunk id> a backup's file data, by content
//! index/<timeline>/<segment>             a segment's summary, for restore targets
//! tmp/<name>                             probes and staged writes, never read back
//! locks/backup/<backup id>               a backup in progress (see `expire`)
//! locks/expire/<name>                    an expire in progress
//! verify/results                         what `pitr verify` has proven intact, and its last report
//! ```
//!
//! `leases/` is reserved for the lease to come. Keys are typed by kind ([`ObjectKey`]); a
//! listing is parsed back with [`ObjectKey::parse`], which refuses any key that `to_key`
//! would not have built, so a stray object in the bucket is never taken for pitr's own.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::wal::{SegmentName, TimelineId, WalFileName};

/// The identity object's key.
pub const IDENTITY: &str = "pitr.identity";
pub const WAL_PREFIX: &str = "wal";
pub const BACKUP_PREFIX: &str = "backups";
pub const CHUNK_PREFIX: &str = "chunks";
pub const INDEX_PREFIX: &str = "index";
/// Objects that exist only while a write is under way: probes and replacements being staged.
pub const TEMPORARY_PREFIX: &str = "tmp";
/// Markers of work in progress that must not overlap: a backup and an expire (see `expire`).
pub const LOCK_PREFIX: &str = "locks";
pub const VERIFY_PREFIX: &str = "verify";
/// The key of `pitr verify`'s results object.
pub const VERIFY_RESULTS: &str = "verify/results";
const MANIFEST_NAME: &str = "manifest";

/// A backup's id: its start time, `20261122T034512Z`, which also sorts by age.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct BackupId(pub String);

impl BackupId {
    pub fn from_time(time: chrono::DateTime<chrono::Utc>) -> Self {
        BackupId(time.format("%Y%m%dT%H%M%SZ").to_string())
    }

    pub fn manifest_key(&self) -> String {
        manifest(self)
    }
}

impl fmt::Display for BackupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The id of a chunk: a hash of its content, in lowercase hex (see `backup::chunk_id`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ChunkId(pub String);

impl ChunkId {
    pub fn key(&self) -> String {
        chunk(self)
    }
}

/// Every kind of object a repository holds, by the value its key is built from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ObjectKey {
    Identity,
    Wal(WalFileName),
    Manifest(BackupId),
    Chunk(ChunkId),
    Index(SegmentName),
    /// A name under `tmp/`, one path segment.
    Temporary(String),
    /// A marker of work in progress, under `locks/<kind>/`.
    Marker(MarkerKind, String),
    /// `pitr verify`'s results.
    VerifyResults,
}

/// What a marker says is in progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MarkerKind {
    /// A backup, named by its id: it may reference any chunk that exists.
    Backup,
    /// An expire, named by a random id: it may be deleting chunks.
    Expire,
}

impl MarkerKind {
    /// A marker older than this was left by a process that crashed, and is ignored (with a
    /// warning): a backup may run for many hours, an expire for minutes.
    pub fn max_age(self) -> std::time::Duration {
        std::time::Duration::from_secs(match self {
            MarkerKind::Backup => 24 * 3600,
            MarkerKind::Expire => 3600,
        })
    }

    pub fn directory(self) -> &'static str {
        match self {
            MarkerKind::Backup => "backup",
            MarkerKind::Expire => "expire",
        }
    }
}

impl ObjectKey {
    pub fn to_key(&self) -> String {
        match self {
            ObjectKey::Identity => IDENTITY.to_string(),
            ObjectKey::Wal(name) => wal(name),
            ObjectKey::Manifest(id) => manifest(id),
            ObjectKey::Chunk(id) => chunk(id),
            ObjectKey::Index(segment) => index(*segment),
            ObjectKey::Temporary(name) => temporary(name),
            ObjectKey::Marker(kind, name) => marker(*kind, name),
            ObjectKey::VerifyResults => VERIFY_RESULTS.to_string(),
        }
    }

    /// The kind and value of a stored key; `None` for a key this layout does not build.
    pub fn parse(key: &str) -> Option<ObjectKey> {
        if key == IDENTITY {
            return Some(ObjectKey::Identity);
        }
        if key == VERIFY_RESULTS {
            return Some(ObjectKey::VerifyResults);
        }
        let (prefix, rest) = key.split_once('/')?;
        let parsed = match prefix {
            WAL_PREFIX => {
                let (_, name) = rest.split_once('/')?;
                ObjectKey::Wal(name.parse().ok()?)
            }
            BACKUP_PREFIX => {
                let (id, name) = rest.split_once('/')?;
                (name == MANIFEST_NAME && is_segment(id))
                    .then(|| ObjectKey::Manifest(BackupId(id.to_string())))?
            }
            CHUNK_PREFIX => {
                let (_, id) = rest.split_once('/')?;
                let valid = id.len() >= 2 && id.bytes().all(|b| b.is_ascii_hexdigit());
                valid.then(|| ObjectKey::Chunk(ChunkId(id.to_string())))?
            }
            INDEX_PREFIX => {
                let (_, segment) = rest.split_once('/')?;
                ObjectKey::Index(segment.parse().ok()?)
            }
            TEMPORARY_PREFIX => is_segment(rest).then(|| ObjectKey::Temporary(rest.to_string()))?,
            LOCK_PREFIX => {
                let (directory, name) = rest.split_once('/')?;
                let kind = [MarkerKind::Backup, MarkerKind::Expire]
                    .into_iter()
                    .find(|kind| kind.directory() == directory)?;
                is_segment(name).then(|| ObjectKey::Marker(kind, name.to_string()))?
            }
            _ => return None,
        };
        // Only the key this value builds: `wal/00000002/<timeline 1 segment>` is not pitr's.
        (parsed.to_key() == key).then_some(parsed)
    }

    /// The WAL file a key names, if it is one.
    pub fn wal_file(key: &str) -> Option<WalFileName> {
        match ObjectKey::parse(key)? {
            ObjectKey::Wal(name) => Some(name),
            _ => None,
        }
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_key())
    }
}

/// A non-empty name without `/`.
fn is_segment(text: &str) -> bool {
    !text.is_empty() && !text.contains('/')
}

/// Where a WAL file lives: grouped by timeline, under its own name.
pub fn wal(name: &WalFileName) -> String {
    format!("{WAL_PREFIX}/{}/{name}", name.timeline())
}

/// The prefix listing every WAL file of one timeline.
pub fn wal_timeline(timeline: TimelineId) -> String {
    format!("{WAL_PREFIX}/{timeline}")
}

pub fn manifest(id: &BackupId) -> String {
    format!("{BACKUP_PREFIX}/{id}/{MANIFEST_NAME}")
}

/// Chunks spread over 256 directories by their first two hex digits.
pub fn chunk(id: &ChunkId) -> String {
    format!("{CHUNK_PREFIX}/{}/{}", &id.0[..2], id.0)
}

pub fn index(segment: SegmentName) -> String {
    format!("{INDEX_PREFIX}/{}/{segment}", segment.timeline)
}

pub fn temporary(name: &str) -> String {
    format!("{TEMPORARY_PREFIX}/{name}")
}

pub fn marker(kind: MarkerKind, name: &str) -> String {
    format!("{LOCK_PREFIX}/{}/{name}", kind.directory())
}

/// The prefix listing every marker of one kind.
pub fn markers(kind: MarkerKind) -> String {
    format!("{LOCK_PREFIX}/{}", kind.directory())
}

/// The backup a manifest key belongs to, if `key` is a manifest's.
pub fn manifest_backup(key: &str) -> Option<BackupId> {
    match ObjectKey::parse(key)? {
        ObjectKey::Manifest(id) => Some(id),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segment(timeline: u32, log_id: u32, number: u32) -> SegmentName {
        SegmentName {
            timeline: TimelineId(timeline),
            log_id,
            segment: number,
        }
    }

    fn round_trips(key: ObjectKey, text: &str) {
        assert_eq!(key.to_key(), text);
        assert_eq!(ObjectKey::parse(text), Some(key));
    }

    #[test]
    fn every_kind_round_trips() {
        round_trips(ObjectKey::Identity, "pitr.identity");
        let first = segment(1, 0, 0x2A);
        round_trips(
            ObjectKey::Wal(WalFileName::Segment(first)),
            "wal/00000001/00000001000000000000002A",
        );
        round_trips(
            ObjectKey::Wal(WalFileName::Partial(segment(2, 1, 3))),
            "wal/00000002/000000020000000100000003.partial",
        );
        round_trips(
            ObjectKey::Wal(WalFileName::Backup {
                segment: first,
                offset: 0x28,
            }),
            "wal/00000001/00000001000000000000002A.00000028.backup",
        );
        round_trips(
            ObjectKey::Wal(WalFileName::History(TimelineId(3))),
            "wal/00000003/00000003.history",
        );
        round_trips(
            ObjectKey::Manifest(BackupId("20261122T034512Z".to_string())),
            "backups/20261122T034512Z/manifest",
        );
        let id = "ab".repeat(32);
        round_trips(
            ObjectKey::Chunk(ChunkId(id.clone())),
            &format!("chunks/ab/{id}"),
        );
        round_trips(
            ObjectKey::Index(segment(1, 0, 7)),
            "index/00000001/000000010000000000000007",
        );
        round_trips(
            ObjectKey::Temporary("create-only-probe-00ff".to_string()),
            "tmp/create-only-probe-00ff",
        );
        round_trips(
            ObjectKey::Marker(MarkerKind::Backup, "20261122T034512Z".to_string()),
            "locks/backup/20261122T034512Z",
        );
        round_trips(
            ObjectKey::Marker(MarkerKind::Expire, "00ff".to_string()),
            "locks/expire/00ff",
        );
        round_trips(ObjectKey::VerifyResults, "verify/results");
    }

    #[test]
    fn keys_it_would_not_build_are_refused() {
        for key in [
            "",
            "pitr.identity/x",
            "wal/00000002/000000010000000000000001",
            "wal/00000001",
            "wal/00000001/not-wal",
            "wal/00000001/000000010000000000000001/extra",
            "backups/20261122T034512Z/other",
            "backups/20261122T034512Z",
            "chunks/cd/ab12",
            "chunks/ab/xyz",
            "index/00000002/000000010000000000000001",
            "tmp/",
            "tmp/a/b",
            "leases/primary",
            "locks/other/x",
            "locks/backup/",
            "locks/backup/a/b",
            "elsewhere/x",
        ] {
            assert_eq!(ObjectKey::parse(key), None, "{key}");
        }
    }

    #[test]
    fn prefixes_cover_their_keys() {
        let name = WalFileName::Segment(segment(5, 0, 1));
        assert!(wal(&name).starts_with(&format!("{}/", wal_timeline(TimelineId(5)))));
        assert_eq!(
            ObjectKey::wal_file("wal/00000005/000000050000000000000001"),
            Some(name)
        );
        assert_eq!(
            manifest_backup("backups/20261122T034512Z/manifest"),
            Some(BackupId("20261122T034512Z".to_string()))
        );
        assert_eq!(manifest_backup("chunks/ab/abab"), None);
    }
}

//! `pitr verify`: proves that every backup can be restored and every archived WAL file read.
//!
//! It reads every manifest, reads every chunk the manifests reference and every WAL object and
//! index entry and proves it intact, and checks, from the archive listing, that each backup's WAL is
//! there from its start through its stop and on to the end of its timeline path. Each problem
//! is named: the object, the backup it breaks, what is wrong.
//!
//! Proving an object intact is authenticating it: in an encrypted repository every chunk's
//! AES-GCM tag covers its bytes and the whole header (plaintext length and checksum included),
//! so a complete sequence of authentic chunks is exactly the object pitr wrote, and no byte can
//! change without the key; an unencrypted object is decoded in full, checksum included.
//! `--decode` also decompresses every encrypted object and checks its plaintext checksum, the
//! whole read path of a restore (which finds a fault in pitr's own writer, not in the store).
//!
//! Incremental: what it proved intact is recorded in the repository (`verify/results`, sealed
//! like every object) with the object's size and version, and not read again until it changes,
//! `--full` is given, or the record is older than `PITR_VERIFY_MAX_AGE`. Manifests are read on
//! every run (they are the catalog). The last report is kept in the same object, where
//! monitoring reads it. Objects are read several at a time; memory stays at a few chunks per read.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::Result;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use crate::backup::{BACKUP_PREFIX, Manifest};
use crate::envelope::DecodeMode;
use crate::repository::layout::{self, ObjectKey};
use crate::repository::{ObjectInfo, Repository};
use crate::restore::timeline::{ArchivedSegments, TimelinePath, check_coverage};

use crate::wal::{TimelineId, WalFileName, WalSegmentSize};

#[derive(Debug, Clone, Copy)]
pub struct VerifyOptions {
    /// Read everything again, whatever was verified before.
    pub full: bool,
    /// Read again what was verified longer ago than this.
    pub max_age: Duration,
    /// Decompress and checksum every object too, not only authenticate it.
    pub decode: bool,
}

/// One thing that is wrong, by name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    /// The object (`chunks/3f/3f0c…`, `wal/00000001/…`, `backups/<id>/manifest`).
    pub object: String,
    /// The backup it breaks, if it breaks one.
    pub backup: Option<String>,
    pub detail: String,
}

/// What one run found, as `--output json` prints it and `verify/results` keeps it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VerifyReport {
    pub repository: String,
    pub started: DateTime<Utc>,
    pub seconds: f64,
    pub backups: usize,
    pub manifests_read: usize,
    /// Chunks, WAL objects and index entries read and proven intact in this run.
    pub objects_read: usize,
    /// Those proven intact before and unchanged since, not read again.
    pub objects_skipped: usize,
    pub bytes_read: u64,
    pub problems: Vec<Problem>,
}

/// The results object: what was proven intact, and the last report.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Results {
    verified: BTreeMap<String, Verified>,
    last: Option<VerifyReport>,
}

/// An object proven intact, as it was then.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Verified {
    size: u64,
    e_tag: Option<String>,
    version: Option<String>,
    at: DateTime<Utc>,
    /// Decoded in full, not only authenticated.
    #[serde(default)]
    decoded: bool,
}

impl Verified {
    fn of(object: &ObjectInfo, at: DateTime<Utc>, decoded: bool) -> Self {
        Verified {
            size: object.size,
            e_tag: object.version.e_tag.clone(),
            version: object.version.version.clone(),
            at,
            decoded,
        }
    }

    /// Still the object that was verified, recently enough, as deeply as asked.
    fn covers(&self, object: &ObjectInfo, now: DateTime<Utc>, options: &VerifyOptions) -> bool {
        (self.decoded || !options.decode)
            && self.size == object.size
            && self.e_tag == object.version.e_tag
            && self.version == object.version.version
            && (now - self.at).to_std().unwrap_or_default() < options.max_age
    }
}

/// The last report `pitr verify` stored, for monitoring; `None` before the first run.
pub async fn last_report(repository: &Repository) -> Result<Option<VerifyReport>> {
    Ok(load_results(repository).await.last)
}

pub async fn run(repository: &Repository, options: VerifyOptions) -> Result<VerifyReport> {
    let started = Instant::now();
    let now = Utc::now();
    let identity = repository.require_identity().await?;
    let size = identity.segment_size();
    let mut results = load_results(repository).await;
    let listing = repository.list("").await?;
    let mut report = VerifyReport {
        repository: repository.url.clone(),
        started: now,
        seconds: 0.0,
        backups: 0,
        manifests_read: 0,
        objects_read: 0,
        objects_skipped: 0,
        bytes_read: 0,
        problems: Vec::new(),
    };
    let by_key: HashMap<&str, &ObjectInfo> = listing
        .iter()
        .map(|object| (object.key.as_str(), object))
        .collect();
    let manifests = read_manifests(repository, &listing, &mut report).await;
    report.backups = manifests.len();

    // What to decode: every chunk a manifest names, every WAL object, every index entry.
    let mut referenced: BTreeMap<String, (String, String)> = BTreeMap::new();
    for manifest in &manifests {
        for file in &manifest.files {
            for chunk in &file.chunks {
                referenced
                    .entry(chunk.key())
                    .or_insert_with(|| (manifest.id.to_string(), file.path.to_string()));
            }
        }
    }
    let mut to_read: Vec<&ObjectInfo> = Vec::new();
    for (key, (backup, file)) in &referenced {
        match by_key.get(key.as_str()) {
            Some(object) => to_read.push(object),
            None => report.problems.push(Problem {
                object: key.clone(),
                backup: Some(backup.clone()),
                detail: format!(
                    "the chunk is missing (file {file} needs it); the backup cannot be restored"
                ),
            }),
        }
    }
    to_read.extend(listing.iter().filter(|object| {
        matches!(
            ObjectKey::parse(&object.key),
            Some(ObjectKey::Wal(_) | ObjectKey::Index(_))
        )
    }));
    let (skipped, pending): (Vec<&ObjectInfo>, Vec<&ObjectInfo>) =
        to_read.into_iter().partition(|object| {
            !options.full
                && results
                    .verified
                    .get(&object.key)
                    .is_some_and(|verified| verified.covers(object, now, &options))
        });
    report.objects_skipped = skipped.len();
    let workers = repository.transfers_in_flight(crate::config::cpu_count());
    let mut decoded = futures::stream::iter(pending)
        .map(|object| async move { (object, prove(repository, &object.key, options.decode).await) })
        .buffer_unordered(workers);
    let mut failed: HashSet<String> = HashSet::new();
    while let Some((object, outcome)) = decoded.next().await {
        report.objects_read += 1;
        match outcome {
            Ok(bytes) => {
                report.bytes_read += bytes;
                results.verified.insert(
                    object.key.clone(),
                    Verified::of(object, now, options.decode),
                );
            }
            Err(detail) => {
                results.verified.remove(&object.key);
                failed.insert(object.key.clone());
                report.problems.push(Problem {
                    object: object.key.clone(),
                    backup: referenced
                        .get(&object.key)
                        .map(|(backup, _)| backup.clone()),
                    detail,
                });
            }
        }
    }
    drop(decoded);
    check_continuity(repository, &listing, &failed, &manifests, size, &mut report).await;
    // Forget objects that are gone, so the results object does not grow with expired ones.
    let listed: HashSet<&str> = by_key.keys().copied().collect();
    results
        .verified
        .retain(|key, _| listed.contains(key.as_str()));
    report
        .problems
        .sort_by(|a, b| (&a.backup, &a.object).cmp(&(&b.backup, &b.object)));
    report.seconds = started.elapsed().as_secs_f64();
    results.last = Some(report.clone());
    let bytes = serde_json::to_vec(&results)?;
    if let Err(error) = repository
        .replace_bytes(layout::VERIFY_RESULTS, Bytes::from(bytes))
        .await
    {
        tracing::warn!(
            "the verify results were not stored ({error}); the next run reads everything again"
        );
    }
    Ok(report)
}

/// The stored results; none (everything is read) when absent or unreadable.
async fn load_results(repository: &Repository) -> Results {
    match repository.read_bytes(layout::VERIFY_RESULTS).await {
        Ok(Some(bytes)) => serde_json::from_slice(&bytes).unwrap_or_else(|error| {
            tracing::warn!(
                "{} is not valid ({error}); verifying everything",
                layout::VERIFY_RESULTS
            );
            Results::default()
        }),
        Ok(None) => Results::default(),
        Err(error) => {
            tracing::warn!(
                "cannot read {} ({error}); verifying everything",
                layout::VERIFY_RESULTS
            );
            Results::default()
        }
    }
}

/// Every manifest that reads and parses; each one that does not is a problem of its backup.
async fn read_manifests(
    repository: &Repository,
    listing: &[ObjectInfo],
    report: &mut VerifyReport,
) -> Vec<Manifest> {
    let keys: Vec<&str> = listing
        .iter()
        .map(|object| object.key.as_str())
        .filter(|key| key.starts_with(BACKUP_PREFIX) && layout::manifest_backup(key).is_some())
        .collect();
    let read: Vec<(&str, Result<Manifest, String>)> = futures::stream::iter(keys)
        .map(|key| async move {
            let parsed = match repository.read_bytes(key).await {
                Ok(Some(bytes)) => {
                    Manifest::from_json(key, &bytes).map_err(|error| error.to_string())
                }
                Ok(None) => Err("the manifest disappeared while verify read it".to_string()),
                Err(error) => Err(error.to_string()),
            };
            (key, parsed)
        })
        .buffered(repository.transfers_in_flight(1))
        .collect()
        .await;
    let mut manifests = Vec::new();
    for (key, parsed) in read {
        report.manifests_read += 1;
        match parsed {
            Ok(manifest) => manifests.push(manifest),
            Err(detail) => report.problems.push(Problem {
                object: key.to_string(),
                backup: layout::manifest_backup(key).map(|id| id.to_string()),
                detail: format!(
                    "the manifest cannot be read: {detail}; the backup cannot be restored"
                ),
            }),
        }
    }
    manifests.sort_by(|a, b| a.id.cmp(&b.id));
    manifests
}

/// Proves the object intact: authenticated, or with `decode` also decoded in full into
/// nothing. Returns the bytes read (stored, or decoded) or what is wrong.
async fn prove(repository: &Repository, key: &str, decode: bool) -> Result<u64, String> {
    if !decode {
        return match repository.read_encoded(key).await {
            Ok(Some((_, bytes))) => Ok(bytes.len() as u64),
            Ok(None) => Err("the object disappeared while verify read it".to_string()),
            Err(error) => Err(error.to_string()),
        };
    }
    match repository
        .read_object(key, CountingSink(0), DecodeMode::Alone)
        .await
    {
        Ok(Some((_, sink))) => Ok(sink.0),
        Ok(None) => Err("the object disappeared while verify read it".to_string()),
        Err(error) => Err(error.to_string()),
    }
}

struct CountingSink(u64);

impl Write for CountingSink {
    fn write(&mut self, buffer: &[u8]) -> std::io::Result<usize> {
        self.0 += buffer.len() as u64;
        Ok(buffer.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Each backup's WAL, from the listing less the objects that failed: present from its start
/// through its stop (else it cannot be restored), and on to the end of the newest timeline
/// that descends from it (else instants after the gap cannot be reached from it).
async fn check_continuity(
    repository: &Repository,
    listing: &[ObjectInfo],
    failed: &HashSet<String>,
    manifests: &[Manifest],
    size: WalSegmentSize,
    report: &mut VerifyReport,
) {
    let mut segments = ArchivedSegments::new();
    let mut histories: HashMap<TimelineId, String> = HashMap::new();
    for object in listing {
        if failed.contains(&object.key) {
            continue;
        }
        match ObjectKey::wal_file(&object.key) {
            Some(WalFileName::Segment(segment)) => {
                segments
                    .entry(segment.timeline)
                    .or_default()
                    .insert(segment.segment_number(size));
            }
            Some(WalFileName::History(timeline)) => {
                if let Ok(Some(bytes)) = repository.read_bytes(&object.key).await {
                    histories.insert(timeline, String::from_utf8_lossy(&bytes).into_owned());
                }
            }
            _ => {}
        }
    }
    let path_of = |timeline: TimelineId| {
        TimelinePath::from_history(timeline, histories.get(&timeline).map(String::as_str))
            .unwrap_or_else(|_| TimelinePath(vec![(timeline, crate::wal::Lsn(0))]))
    };
    let timelines: BTreeSet<TimelineId> =
        segments.keys().chain(histories.keys()).copied().collect();
    let mut reported: HashSet<String> = HashSet::new();
    for manifest in manifests {
        let first = manifest.start_lsn.0 / u64::from(size.0);
        let stop = manifest.stop_lsn.0 / u64::from(size.0);
        let own = path_of(manifest.timeline);
        if let Err(missing) = check_coverage(&segments, &own, size, first, Some(stop)) {
            report.problems.push(Problem {
                object: layout::wal(&WalFileName::Segment(missing)),
                backup: Some(manifest.id.to_string()),
                detail: format!(
                    "WAL segment {missing} is missing or damaged, and the backup needs it to become consistent; the backup cannot be restored"
                ),
            });
            continue;
        }
        let newest = timelines
            .iter()
            .rev()
            .map(|timeline| path_of(*timeline))
            .find(|path| path.descends_from(manifest.timeline, manifest.start_lsn))
            .unwrap_or(own);
        if let Err(missing) = check_coverage(&segments, &newest, size, first, None)
            && reported.insert(missing.to_string())
        {
            report.problems.push(Problem {
                object: layout::wal(&WalFileName::Segment(missing)),
                backup: Some(manifest.id.to_string()),
                detail: format!(
                    "WAL segment {missing} is missing or damaged: a restore from this backup cannot reach past it"
                ),
            });
        }
    }
}

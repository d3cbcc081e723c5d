//! How far the archive lets recovery reach: the commit-timestamp index.
//!
//! Postgres stops at a target time only when it replays the first transaction end after that
//! time; if the archive does not hold one, recovery ends in FATAL. So before anything is
//! downloaded, the restore proves that such a record exists, and `pitr list` reports the last
//! transaction end per timeline. Both read per-segment summaries (`wal::records`): the
//! transaction ends and restore points a segment holds.
//!
//! A summary is computed from the archived segment the first time it is needed and stored
//! beside it as `index/<timeline>/<segment>` through the same envelope and create-only writes
//! as everything else. A segment never changes once archived, so neither does its summary; a
//! summary that needed the next segment, not yet archived, is returned but not stored.

use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use bytes::Bytes;
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use crate::envelope::{DecodeMode, EncodeOptions};
use crate::repository::Repository;
use crate::wal::records::{
    PgTimestamp, RecordScanner, RestorePoint, ScanEnd, SegmentSummary, TransactionEnd,
};
use crate::wal::{PgVersion, SegmentName, WalFileName, WalSegmentSize};

pub use crate::repository::layout::INDEX_PREFIX;
/// 2 added the ended transaction ids; an entry of version 1 is recomputed (and not replaced).
const INDEX_FORMAT_VERSION: u32 = 2;

/// The stored form of a summary (see docs/FORMAT.md, "Segment index").
#[derive(Debug, Serialize, Deserialize)]
struct IndexEntry {
    format_version: u32,
    segment: String,
    summary: SegmentSummary,
}

/// Whether recovery to a time can stop within the archive.
pub enum TimeReach {
    /// It stops on reaching a transaction end in this segment.
    StopsIn(SegmentName),
    /// No transaction ended after the time; the last one that did end (with the latest
    /// transaction-end time), if any.
    Beyond {
        last: Option<(TransactionEnd, PgTimestamp)>,
    },
}

/// Whether recovery to a transaction id can stop within the archive.
pub enum XidReach {
    /// A commit or abort record of the transaction starts in this segment.
    StopsIn(SegmentName),
    /// Not decided: a prepared transaction ended before any match, and its id is not indexed.
    Unknown,
    /// No segment holds an end of the transaction.
    NotFound,
}

/// Summaries read at once when a search must look at every segment in turn.
const SUMMARIES_IN_FLIGHT: usize = 16;

/// Reads summaries of archived segments, computing and storing the missing ones.
pub struct ArchiveIndex<'a> {
    repository: &'a Repository,
    size: WalSegmentSize,
    pg_version: PgVersion,
    /// Summaries already read or computed by this index: choosing a backup and then checking
    /// its reach read many of the same segments, and each read is a round trip remotely.
    known: Mutex<std::collections::HashMap<SegmentName, SegmentSummary>>,
}

impl<'a> ArchiveIndex<'a> {
    pub fn new(repository: &'a Repository, size: WalSegmentSize, pg_version: PgVersion) -> Self {
        ArchiveIndex {
            repository,
            size,
            pg_version,
            known: Mutex::new(std::collections::HashMap::new()),
        }
    }

    fn index_key(segment: SegmentName) -> String {
        crate::repository::layout::index(segment)
    }

    /// The summary of an archived segment. `next` is the segment recovery reads after it (on
    /// the same or the next timeline), consulted only when a record straddles the boundary.
    /// `None` when the segment itself is not archived.
    pub async fn summary(
        &self,
        segment: SegmentName,
        next: Option<SegmentName>,
    ) -> Result<Option<SegmentSummary>> {
        if let Some(known) = self.known.lock().unwrap().get(&segment) {
            return Ok(Some(known.clone()));
        }
        let summary = self.read_or_compute(segment, next).await?;
        // One that needed the next segment depends on `next`, so it is not kept.
        if let Some(summary) = &summary
            && summary.end != ScanEnd::NeedsNextSegment
        {
            self.known.lock().unwrap().insert(segment, summary.clone());
        }
        Ok(summary)
    }

    async fn read_or_compute(
        &self,
        segment: SegmentName,
        next: Option<SegmentName>,
    ) -> Result<Option<SegmentSummary>> {
        let key = Self::index_key(segment);
        if let Some(bytes) = self.repository.read_bytes(&key).await? {
            let entry: IndexEntry = serde_json::from_slice(&bytes)
                .with_context(|| format!("the index entry {key} is not valid JSON"))?;
            if entry.format_version == INDEX_FORMAT_VERSION {
                return Ok(Some(entry.summary));
            }
        }
        let Some(summary) = self.scan(segment, next).await? else {
            return Ok(None);
        };
        if summary.end != ScanEnd::NeedsNextSegment {
            let entry = IndexEntry {
                format_version: INDEX_FORMAT_VERSION,
                segment: segment.to_string(),
                summary: summary.clone(),
            };
            let bytes = Bytes::from(serde_json::to_vec(&entry)?);
            // Another process may have stored it meanwhile: the same segment gives the same
            // summary, so either copy serves.
            self.repository
                .put_bytes(&key, bytes, &EncodeOptions::default())
                .await?;
        }
        Ok(Some(summary))
    }

    async fn scan(
        &self,
        segment: SegmentName,
        next: Option<SegmentName>,
    ) -> Result<Option<SegmentSummary>> {
        let scanner = SharedScanner::new(RecordScanner::new(
            segment.start_lsn(self.size),
            u64::from(self.size.0),
            self.pg_version,
        ));
        let key = Repository::wal_key(&WalFileName::Segment(segment));
        if self
            .repository
            .read_object(&key, scanner.clone(), DecodeMode::Alone)
            .await?
            .is_none()
        {
            return Ok(None);
        }
        if scanner.lock().needs_next_segment()
            && let Some(next) = next
        {
            scanner.lock().continue_into_next_segment();
            let next_key = Repository::wal_key(&WalFileName::Segment(next));
            // A next segment not archived yet leaves the record unfinished: the summary says
            // so and is not stored.
            self.repository
                .read_object(&next_key, scanner.clone(), DecodeMode::Alone)
                .await?;
        }
        Ok(Some(scanner.into_inner().finish()))
    }

    /// A segment of `segments` (in recovery order) holding a transaction end after `time` (at
    /// or after it when `inclusive` is false), where recovery to `time` will have stopped; or,
    /// if no segment holds one, the last transaction end there is.
    ///
    /// The last transaction end is found first, searching backwards from the end: whether the
    /// target is reachable at all is decided by it, exactly. Then a binary search over the
    /// segments' latest transaction-end times finds the boundary, reading a handful of
    /// summaries instead of every segment. Commit times are nearly but not strictly ordered
    /// along the WAL, so the search may land on a later segment than the first one past the
    /// target, never on one that is not past it: the answer can only demand more WAL.
    pub async fn segment_ending_after(
        &self,
        segments: &[SegmentName],
        time: PgTimestamp,
        inclusive: bool,
    ) -> Result<TimeReach> {
        let beyond = |latest: PgTimestamp| {
            if inclusive {
                latest > time
            } else {
                latest >= time
            }
        };
        let Some((last_with_ends, last_end, latest)) =
            self.last_transaction_end(segments, segments.len()).await?
        else {
            return Ok(TimeReach::Beyond { last: None });
        };
        if !beyond(latest) {
            return Ok(TimeReach::Beyond {
                last: Some((last_end, latest)),
            });
        }
        let mut high = segments
            .iter()
            .position(|segment| *segment == last_with_ends)
            .expect("found among these segments");
        let mut low = 0;
        // Invariant: segments[high] holds a transaction end past the target.
        while low < high {
            let middle = low + (high - low) / 2;
            match self.next_latest_time(segments, middle, high).await? {
                Some((index, latest)) if beyond(latest) => high = index,
                Some((index, _)) => low = index + 1,
                None => low = high,
            }
        }
        Ok(TimeReach::StopsIn(segments[high]))
    }

    /// The first segment from `from` up to (not including) `until` that holds transaction ends,
    /// with its latest transaction-end time.
    async fn next_latest_time(
        &self,
        segments: &[SegmentName],
        from: usize,
        until: usize,
    ) -> Result<Option<(usize, PgTimestamp)>> {
        for index in from..until {
            let next = segments.get(index + 1).copied();
            if let Some(latest) = self
                .summary(segments[index], next)
                .await?
                .and_then(|summary| summary.latest_time)
            {
                return Ok(Some((index, latest)));
            }
        }
        Ok(None)
    }

    /// The first restore point named `name` in `segments` (in recovery order), and the segment
    /// holding it: where recovery to that name stops. Restore points follow no order that could
    /// be searched, so this reads every summary up to the first match (stored summaries are
    /// small; missing ones are computed once and kept).
    pub async fn first_restore_point_named(
        &self,
        segments: &[SegmentName],
        name: &str,
    ) -> Result<Option<(SegmentName, RestorePoint)>> {
        for (index, segment) in segments.iter().enumerate() {
            let Some(summary) = self
                .summary(*segment, segments.get(index + 1).copied())
                .await?
            else {
                continue;
            };
            if let Some(point) = summary
                .restore_points
                .into_iter()
                .find(|point| point.name == name)
            {
                return Ok(Some((*segment, point)));
            }
        }
        Ok(None)
    }

    /// The first segment of `segments` (in recovery order) where transaction `xid` ends, which
    /// is where recovery to that id stops. Ids follow no order along the WAL that could be
    /// searched, so this reads summaries in order, several at a time, up to the first match.
    pub async fn segment_ending_xid(&self, segments: &[SegmentName], xid: u32) -> Result<XidReach> {
        let mut summaries = futures::stream::iter(segments.iter().enumerate())
            .map(|(index, segment)| async move {
                let next = segments.get(index + 1).copied();
                (*segment, self.summary(*segment, next).await)
            })
            .buffered(SUMMARIES_IN_FLIGHT);
        while let Some((segment, summary)) = summaries.next().await {
            let Some(summary) = summary? else {
                continue;
            };
            if summary.ends_xid(xid) {
                return Ok(XidReach::StopsIn(segment));
            }
            if summary.prepared_ends > 0 {
                return Ok(XidReach::Unknown);
            }
        }
        Ok(XidReach::NotFound)
    }

    /// The last transaction end in `segments` (in recovery order), searching backwards from the
    /// end through at most `limit` segments.
    pub async fn last_transaction_end(
        &self,
        segments: &[SegmentName],
        limit: usize,
    ) -> Result<Option<(SegmentName, TransactionEnd, PgTimestamp)>> {
        for (index, segment) in segments.iter().enumerate().rev().take(limit) {
            let Some(summary) = self
                .summary(*segment, segments.get(index + 1).copied())
                .await?
            else {
                continue;
            };
            if let (Some(end), Some(latest)) = (summary.last_transaction_end, summary.latest_time) {
                return Ok(Some((*segment, end, latest)));
            }
        }
        Ok(None)
    }
}

/// A scanner the repository can stream into and hand back even when the object is missing.
#[derive(Clone)]
struct SharedScanner(Arc<Mutex<RecordScanner>>);

impl SharedScanner {
    fn new(scanner: RecordScanner) -> Self {
        SharedScanner(Arc::new(Mutex::new(scanner)))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RecordScanner> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn into_inner(self) -> RecordScanner {
        match Arc::try_unwrap(self.0) {
            Ok(mutex) => mutex
                .into_inner()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
            Err(_) => unreachable!("the repository returns the sink before this"),
        }
    }
}

impl std::io::Write for SharedScanner {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.lock().write(data)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

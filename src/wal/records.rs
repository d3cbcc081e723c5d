//! WAL records: just enough of Postgres's record format to find where recovery can stop.
//!
//! `recovery_target_time` stops only at a transaction's commit or abort record, and Postgres can
//! tell it has reached time T only when the archive holds the first such record after T;
//! otherwise recovery ends in FATAL. `recovery_target_name` stops at a restore-point record. So
//! the restore needs, per segment, the commit timestamps and restore points it holds. This
//! module finds them in a segment's plaintext.
//!
//! `RecordScanner` is a `Write` sink, so a segment streams through it straight from the
//! envelope decoder: memory is one page and the few records it keeps, whatever the segment
//! size. It strips page headers, reassembles records across pages, checks each record's CRC-32C
//! and stops at the end of valid WAL (a zero length, a bad CRC, a page from an older use of a
//! recycled file, or a WAL switch). A record that starts in this segment and ends in the next is
//! finished by feeding the next segment after `continue_into_next_segment`; records that began in
//! the previous segment are skipped, because their summary belongs to that segment.
//!
//! Layouts (stable from PostgreSQL 9.5 through 18): `XLogPageHeaderData` (24 bytes; 40 with the
//! long header on a segment's first page), `XLogRecord` (24 bytes, then block headers, then the
//! main data, records aligned to 8 bytes), `xl_xact_commit`/`xl_xact_abort` (main data starts
//! with the i64 `xact_time`) and `xl_restore_point` (i64 time, then a 64-byte name).

use std::io;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{Lsn, PgVersion};

const SHORT_PAGE_HEADER: usize = 24;
const LONG_PAGE_HEADER: usize = 40;
const RECORD_HEADER: usize = 24;
const XLP_FIRST_IS_CONTRECORD: u16 = 0x0001;
const XLP_LONG_HEADER: u16 = 0x0002;

const RM_XLOG_ID: u8 = 0;
const RM_XACT_ID: u8 = 1;
const XLOG_SWITCH: u8 = 0x40;
const XLOG_RESTORE_POINT: u8 = 0x70;
const XLOG_XACT_OPMASK: u8 = 0x70;
const XLOG_XACT_COMMIT: u8 = 0x00;
const XLOG_XACT_ABORT: u8 = 0x20;
const XLOG_XACT_COMMIT_PREPARED: u8 = 0x30;
const XLOG_XACT_ABORT_PREPARED: u8 = 0x40;

/// Records of the two resource managers above are kept whole for parsing; larger ones (a commit
/// with an enormous list of invalidations) are still checked but their main data is read from
/// the kept prefix only, which is all the timestamp needs.
const KEPT_RECORD_BYTES: usize = 64 << 10;
/// Larger than any record Postgres writes (`XLogRecordMaxSize` is 1020 MiB).
const MAX_RECORD_BYTES: u32 = 1 << 30;

/// Microseconds since 2000-01-01 00:00:00 UTC: Postgres's `TimestampTz`, kept exact.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct PgTimestamp(pub i64);

/// 2000-01-01 in Unix seconds.
const POSTGRES_EPOCH_UNIX_SECONDS: i64 = 946_684_800;

impl PgTimestamp {
    pub fn to_utc(self) -> DateTime<Utc> {
        let unix_micros = self.0 + POSTGRES_EPOCH_UNIX_SECONDS * 1_000_000;
        DateTime::from_timestamp_micros(unix_micros).unwrap_or(DateTime::<Utc>::MIN_UTC)
    }

    pub fn from_utc(time: DateTime<Utc>) -> Self {
        PgTimestamp(time.timestamp_micros() - POSTGRES_EPOCH_UNIX_SECONDS * 1_000_000)
    }
}

/// A transaction end that `recovery_target_time` and `recovery_target_xid` can stop at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransactionEnd {
    pub lsn: Lsn,
    pub xid: u32,
    pub time: PgTimestamp,
    pub committed: bool,
}

/// A named point from `pg_create_restore_point`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestorePoint {
    pub lsn: Lsn,
    pub time: PgTimestamp,
    pub name: String,
}

/// Why the scan of a segment stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScanEnd {
    /// Every record starting in the segment was read.
    SegmentEnd,
    /// A WAL switch record: the rest of the segment is filler.
    Switch,
    /// Valid WAL ended inside the segment (a zero length, a bad CRC, a stale page).
    EndOfWal,
    /// The last record continues into the next segment, which was not fed.
    NeedsNextSegment,
}

/// What one segment holds for recovery targets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentSummary {
    pub transaction_ends: u64,
    pub first_transaction_end: Option<TransactionEnd>,
    pub last_transaction_end: Option<TransactionEnd>,
    /// The latest transaction-end time in the segment (commit times are not strictly ordered
    /// by LSN, since a timestamp is taken before the record is inserted).
    pub latest_time: Option<PgTimestamp>,
    pub restore_points: Vec<RestorePoint>,
    pub records: u64,
    pub end: ScanEnd,
    /// The transaction ids whose commit or abort record starts in the segment, as sorted,
    /// disjoint runs: what `recovery_target_xid` can stop at. Ends of prepared transactions
    /// are not among them; `prepared_ends` counts those.
    #[serde(default)]
    pub ended_xids: Vec<XidRange>,
    /// COMMIT PREPARED and ROLLBACK PREPARED records, whose prepared transaction's id sits in
    /// the record body, which this scanner does not decode.
    #[serde(default)]
    pub prepared_ends: u64,
}

/// A run of transaction ids, both ends included.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct XidRange {
    pub first: u32,
    pub last: u32,
}

impl SegmentSummary {
    fn empty() -> Self {
        SegmentSummary {
            transaction_ends: 0,
            first_transaction_end: None,
            last_transaction_end: None,
            latest_time: None,
            restore_points: Vec::new(),
            records: 0,
            end: ScanEnd::SegmentEnd,
            ended_xids: Vec::new(),
            prepared_ends: 0,
        }
    }

    fn add_transaction_end(&mut self, end: TransactionEnd, prepared: bool) {
        self.transaction_ends += 1;
        self.first_transaction_end.get_or_insert(end);
        self.last_transaction_end = Some(end);
        self.latest_time = Some(self.latest_time.map_or(end.time, |time| time.max(end.time)));
        if prepared {
            self.prepared_ends += 1;
        } else {
            self.add_ended_xid(end.xid);
        }
    }

    /// Transactions mostly end in the order they began, so consecutive ids extend one run.
    fn add_ended_xid(&mut self, xid: u32) {
        match self.ended_xids.last_mut() {
            Some(run) if run.last.checked_add(1) == Some(xid) => run.last = xid,
            _ => self.ended_xids.push(XidRange {
                first: xid,
                last: xid,
            }),
        }
    }

    /// Sorts the runs and merges those that touch or overlap.
    fn normalize_ended_xids(&mut self) {
        self.ended_xids.sort_by_key(|run| run.first);
        let mut merged: Vec<XidRange> = Vec::with_capacity(self.ended_xids.len());
        for run in self.ended_xids.drain(..) {
            match merged.last_mut() {
                Some(previous) if run.first <= previous.last.saturating_add(1) => {
                    previous.last = previous.last.max(run.last);
                }
                _ => merged.push(run),
            }
        }
        self.ended_xids = merged;
    }

    /// Whether a commit or abort record of transaction `xid` starts in the segment.
    pub fn ends_xid(&self, xid: u32) -> bool {
        let index = self.ended_xids.partition_point(|run| run.last < xid);
        self.ended_xids
            .get(index)
            .is_some_and(|run| run.first <= xid)
    }
}

#[derive(Debug)]
enum State {
    /// At the start of the first page: a record continued from the previous segment is skipped.
    Start,
    SkipContinuation {
        remaining: usize,
    },
    Padding {
        remaining: usize,
    },
    Header {
        bytes: [u8; RECORD_HEADER],
        have: usize,
        lsn: Lsn,
    },
    Body(Box<RecordInProgress>),
    Done,
}

#[derive(Debug)]
struct RecordInProgress {
    header: [u8; RECORD_HEADER],
    lsn: Lsn,
    remaining: usize,
    crc: u32,
    kept: Option<Vec<u8>>,
}

/// Scans one segment's plaintext; see the module comment.
pub struct RecordScanner {
    segment_start: Lsn,
    segment_size: u64,
    pg_version: PgVersion,
    page: Vec<u8>,
    page_size: usize,
    /// Bytes of the segment (and its successor) consumed so far.
    position: u64,
    state: State,
    summary: SegmentSummary,
    /// Feeding the next segment: finish the straddling record, then ignore the rest.
    in_next_segment: bool,
}

impl RecordScanner {
    pub fn new(segment_start: Lsn, segment_size: u64, pg_version: PgVersion) -> Self {
        RecordScanner {
            segment_start,
            segment_size,
            pg_version,
            page: Vec::with_capacity(8192),
            page_size: 0,
            position: 0,
            state: State::Start,
            summary: SegmentSummary::empty(),
            in_next_segment: false,
        }
    }

    /// Whether the last record continues past the segment, so the next segment is needed.
    pub fn needs_next_segment(&self) -> bool {
        !self.in_next_segment
            && matches!(self.state, State::Header { have: 1.., .. } | State::Body(_))
    }

    /// Prepares to take the next segment's bytes, to finish the record that straddles.
    pub fn continue_into_next_segment(&mut self) {
        self.in_next_segment = true;
        self.page.clear();
    }

    pub fn finish(mut self) -> SegmentSummary {
        if !matches!(self.state, State::Done) {
            self.summary.end = if self.needs_next_segment() {
                ScanEnd::NeedsNextSegment
            } else if self.in_next_segment {
                ScanEnd::EndOfWal
            } else {
                ScanEnd::SegmentEnd
            };
        }
        self.summary.normalize_ended_xids();
        self.summary
    }

    fn page_lsn(&self) -> u64 {
        self.segment_start.0 + self.position - self.page.len() as u64
    }

    fn end(&mut self, reason: ScanEnd) {
        // In the next segment, the straddling record simply did not complete: nothing more.
        self.summary.end = if self.in_next_segment {
            ScanEnd::EndOfWal
        } else {
            reason
        };
        self.state = State::Done;
    }

    /// A full page is buffered: check its header and feed its payload to the record state.
    fn process_page(&mut self) {
        let page_lsn = self.page_lsn();
        let page = std::mem::take(&mut self.page);
        let u16_at = |at: usize| u16::from_le_bytes([page[at], page[at + 1]]);
        let u32_at = |at: usize| u32::from_le_bytes(page[at..at + 4].try_into().unwrap());
        let u64_at = |at: usize| u64::from_le_bytes(page[at..at + 8].try_into().unwrap());
        let info = u16_at(2);
        let stale =
            PgVersion::from_page_magic(u16_at(0)) != Some(self.pg_version) || u64_at(8) != page_lsn;
        if stale {
            self.end(ScanEnd::EndOfWal);
        } else {
            let header_length = if info & XLP_LONG_HEADER != 0 {
                LONG_PAGE_HEADER
            } else {
                SHORT_PAGE_HEADER
            };
            if matches!(self.state, State::Start) {
                self.state = if info & XLP_FIRST_IS_CONTRECORD != 0 {
                    skip_continuation(u32_at(16) as usize)
                } else {
                    State::Padding { remaining: 0 }
                };
            }
            self.consume(&page[header_length..], page_lsn + header_length as u64);
        }
        self.page = page;
        self.page.clear();
    }

    /// Feeds page payload bytes, which start at `lsn`, through the record state machine.
    fn consume(&mut self, mut payload: &[u8], mut lsn: u64) {
        while !payload.is_empty() {
            let taken = match &mut self.state {
                State::Start | State::Done => return,
                State::SkipContinuation { remaining } | State::Padding { remaining } => {
                    let count = (*remaining).min(payload.len());
                    *remaining -= count;
                    if *remaining == 0 {
                        self.state = State::Header {
                            bytes: [0; RECORD_HEADER],
                            have: 0,
                            lsn: Lsn(lsn + count as u64),
                        };
                    }
                    count
                }
                State::Header {
                    bytes,
                    have,
                    lsn: start,
                } => {
                    let count = (RECORD_HEADER - *have).min(payload.len());
                    bytes[*have..*have + count].copy_from_slice(&payload[..count]);
                    *have += count;
                    if *have == RECORD_HEADER {
                        let (header, start) = (*bytes, *start);
                        self.begin_record(header, start);
                    } else if *have >= 4 && bytes[..4] == [0; 4] {
                        self.end(ScanEnd::EndOfWal);
                    }
                    count
                }
                State::Body(record) => {
                    let count = record.remaining.min(payload.len());
                    let piece = &payload[..count];
                    record.crc = crc32c::crc32c_append(record.crc, piece);
                    if let Some(kept) = &mut record.kept {
                        let room = KEPT_RECORD_BYTES.saturating_sub(kept.len());
                        kept.extend_from_slice(&piece[..room.min(count)]);
                    }
                    record.remaining -= count;
                    if record.remaining == 0 {
                        let State::Body(record) = std::mem::replace(&mut self.state, State::Start)
                        else {
                            unreachable!("matched above")
                        };
                        self.finish_record(*record, lsn + count as u64);
                    }
                    count
                }
            };
            payload = &payload[taken..];
            lsn += taken as u64;
        }
    }

    fn begin_record(&mut self, header: [u8; RECORD_HEADER], lsn: Lsn) {
        let total_length = u32::from_le_bytes(header[..4].try_into().unwrap());
        if total_length < RECORD_HEADER as u32 || total_length > MAX_RECORD_BYTES {
            self.end(ScanEnd::EndOfWal);
            return;
        }
        let resource_manager = header[17];
        let keep = matches!(resource_manager, RM_XLOG_ID | RM_XACT_ID);
        let record = RecordInProgress {
            header,
            lsn,
            remaining: total_length as usize - RECORD_HEADER,
            crc: 0,
            kept: keep.then(Vec::new),
        };
        if record.remaining == 0 {
            self.finish_record(record, lsn.0 + RECORD_HEADER as u64);
        } else {
            self.state = State::Body(Box::new(record));
        }
    }

    fn finish_record(&mut self, record: RecordInProgress, end_lsn: u64) {
        let crc = crc32c::crc32c_append(record.crc, &record.header[..20]);
        let stored_crc = u32::from_le_bytes(record.header[20..24].try_into().unwrap());
        if crc != stored_crc {
            self.end(ScanEnd::EndOfWal);
            return;
        }
        self.summary.records += 1;
        let info = record.header[16];
        let resource_manager = record.header[17];
        if let Some(body) = &record.kept {
            let xid = u32::from_le_bytes(record.header[4..8].try_into().unwrap());
            self.interpret(resource_manager, info, xid, record.lsn, body);
        }
        if resource_manager == RM_XLOG_ID && info & 0xF0 == XLOG_SWITCH {
            self.end(ScanEnd::Switch);
            return;
        }
        if self.in_next_segment {
            self.state = State::Done;
            return;
        }
        let aligned = end_lsn.next_multiple_of(8);
        self.state = State::Padding {
            remaining: (aligned - end_lsn) as usize,
        };
        if aligned == end_lsn {
            self.state = State::Header {
                bytes: [0; RECORD_HEADER],
                have: 0,
                lsn: Lsn(end_lsn),
            };
        }
    }

    fn interpret(&mut self, resource_manager: u8, info: u8, xid: u32, lsn: Lsn, body: &[u8]) {
        let Some(main) = main_data(body, self.pg_version) else {
            return;
        };
        let time_at_start = || {
            main.get(..8)
                .map(|bytes| PgTimestamp(i64::from_le_bytes(bytes.try_into().unwrap())))
        };
        match resource_manager {
            RM_XACT_ID => {
                let operation = info & XLOG_XACT_OPMASK;
                let committed = match operation {
                    XLOG_XACT_COMMIT | XLOG_XACT_COMMIT_PREPARED => true,
                    XLOG_XACT_ABORT | XLOG_XACT_ABORT_PREPARED => false,
                    _ => return,
                };
                let prepared = matches!(
                    operation,
                    XLOG_XACT_COMMIT_PREPARED | XLOG_XACT_ABORT_PREPARED
                );
                if let Some(time) = time_at_start() {
                    self.summary.add_transaction_end(
                        TransactionEnd {
                            lsn,
                            xid,
                            time,
                            committed,
                        },
                        prepared,
                    );
                }
            }
            RM_XLOG_ID if info & 0xF0 == XLOG_RESTORE_POINT => {
                if let (Some(time), Some(name)) = (time_at_start(), main.get(8..)) {
                    let name = name.split(|byte| *byte == 0).next().unwrap_or_default();
                    self.summary.restore_points.push(RestorePoint {
                        lsn,
                        time,
                        name: String::from_utf8_lossy(name).into_owned(),
                    });
                }
            }
            _ => {}
        }
    }
}

/// Skipping the record continued from the previous segment: its remaining bytes, then padding
/// to the next 8-byte boundary, which is where the first record of this segment starts.
fn skip_continuation(remaining: usize) -> State {
    State::SkipContinuation {
        remaining: remaining.next_multiple_of(8),
    }
}

/// Finds a record's main data: after the block headers, at the end of the record.
/// `body` is the record after its 24-byte header (possibly only a kept prefix of it).
fn main_data(body: &[u8], pg_version: PgVersion) -> Option<&[u8]> {
    const BLOCK_ID_DATA_SHORT: u8 = 255;
    const BLOCK_ID_DATA_LONG: u8 = 254;
    const BLOCK_ID_ORIGIN: u8 = 253;
    const BLOCK_ID_TOPLEVEL_XID: u8 = 252;
    const MAX_BLOCK_ID: u8 = 32;
    const BKPBLOCK_HAS_IMAGE: u8 = 0x10;
    const BKPBLOCK_SAME_REL: u8 = 0x80;
    const BKPIMAGE_HAS_HOLE: u8 = 0x01;
    // PostgreSQL 15 split "compressed" into one flag per method.
    let compressed_flags: u8 = if pg_version.0 >= 15 { 0x1C } else { 0x02 };
    let mut at = 0usize;
    let mut block_data = 0usize;
    let main_length = loop {
        let id = *body.get(at)?;
        at += 1;
        match id {
            BLOCK_ID_DATA_SHORT => {
                let length = *body.get(at)? as usize;
                at += 1;
                break length;
            }
            BLOCK_ID_DATA_LONG => {
                let length = u32::from_le_bytes(body.get(at..at + 4)?.try_into().ok()?) as usize;
                at += 4;
                break length;
            }
            BLOCK_ID_ORIGIN => at += 2,
            BLOCK_ID_TOPLEVEL_XID => at += 4,
            0..=MAX_BLOCK_ID => {
                let fork_flags = *body.get(at)?;
                let data_length = u16::from_le_bytes(body.get(at + 1..at + 3)?.try_into().ok()?);
                at += 3;
                block_data += data_length as usize;
                if fork_flags & BKPBLOCK_HAS_IMAGE != 0 {
                    let image_length = u16::from_le_bytes(body.get(at..at + 2)?.try_into().ok()?);
                    let image_info = *body.get(at + 4)?;
                    at += 5;
                    block_data += image_length as usize;
                    if image_info & BKPIMAGE_HAS_HOLE != 0 && image_info & compressed_flags != 0 {
                        at += 2;
                    }
                }
                if fork_flags & BKPBLOCK_SAME_REL == 0 {
                    at += 12;
                }
                at += 4;
            }
            _ => return None,
        }
    };
    // A kept prefix of a huge record may hold only the start of the main data; the fields read
    // from it are at its start.
    let start = at + block_data;
    body.get(start..(start + main_length).min(body.len()))
}

impl io::Write for RecordScanner {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let mut rest = data;
        while !rest.is_empty() && !matches!(self.state, State::Done) {
            if self.page_size == 0 {
                let wanted = LONG_PAGE_HEADER - self.page.len();
                let count = wanted.min(rest.len());
                self.page.extend_from_slice(&rest[..count]);
                rest = &rest[count..];
                if self.page.len() == LONG_PAGE_HEADER {
                    self.page_size = self.block_size_from_header()?;
                    self.page.reserve(self.page_size);
                }
                self.position += count as u64;
                continue;
            }
            let count = (self.page_size - self.page.len()).min(rest.len());
            self.page.extend_from_slice(&rest[..count]);
            rest = &rest[count..];
            self.position += count as u64;
            if self.page.len() == self.page_size {
                self.process_page();
            }
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl RecordScanner {
    fn block_size_from_header(&self) -> io::Result<usize> {
        let block_size = u32::from_le_bytes(self.page[36..40].try_into().unwrap()) as usize;
        let valid = block_size.is_power_of_two()
            && (1024..=65536).contains(&block_size)
            && self.segment_size.is_multiple_of(block_size as u64);
        if !valid {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("the segment's header names an impossible WAL block size {block_size}"),
            ));
        }
        Ok(block_size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary_of_ended(xids: &[u32]) -> SegmentSummary {
        let mut summary = SegmentSummary::empty();
        for xid in xids {
            summary.add_ended_xid(*xid);
        }
        summary.normalize_ended_xids();
        summary
    }

    #[test]
    fn ended_xids_merge_into_sorted_runs_and_answer_membership() {
        let summary = summary_of_ended(&[5, 6, 7, 3, 10, 4, 9, u32::MAX, 0, 1]);
        let runs: Vec<(u32, u32)> = summary
            .ended_xids
            .iter()
            .map(|run| (run.first, run.last))
            .collect();
        assert_eq!(runs, [(0, 1), (3, 7), (9, 10), (u32::MAX, u32::MAX)]);
        for xid in [0, 1, 3, 5, 7, 9, 10, u32::MAX] {
            assert!(summary.ends_xid(xid), "{xid} ended here");
        }
        for xid in [2, 8, 11, u32::MAX - 1] {
            assert!(!summary.ends_xid(xid), "{xid} did not end here");
        }
        assert!(!SegmentSummary::empty().ends_xid(7));
    }
}

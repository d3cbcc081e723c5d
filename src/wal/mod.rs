//! WAL naming and parsing: what Postgres hands the hooks, and whether it is what it claims to be.
//!
//! This module owns the domain types for write-ahead log positions and files (`Lsn`, `TimelineId`,
//! `SegmentName`, `WalFileName`) and the check of a segment's long page header. Everything that
//! decides "is this file a WAL segment of this cluster, at this position" lives here, so the
//! archive path can refuse a wrong file before a single byte is uploaded: only a regular file
//! (never a link or a FIFO) of the right size whose content parses (a segment header, or a
//! history or backup history file, see `history`) is archived.

pub mod history;
pub mod records;

use std::fmt;
use std::io::Read;
use std::path::Path;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A position in the write-ahead log, printed the way Postgres prints it (`16/B374D848`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Lsn(pub u64);

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

impl FromStr for Lsn {
    type Err = WalError;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let invalid = || WalError::InvalidLsn(text.to_string());
        let (high, low) = text.split_once('/').ok_or_else(invalid)?;
        let high = u32::from_str_radix(high, 16).map_err(|_| invalid())?;
        let low = u32::from_str_radix(low, 16).map_err(|_| invalid())?;
        Ok(Lsn((u64::from(high) << 32) | u64::from(low)))
    }
}

/// A timeline: incremented each time a cluster is promoted or recovered to a point in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TimelineId(pub u32);

impl fmt::Display for TimelineId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:08X}", self.0)
    }
}

/// The size of every WAL segment of a cluster, fixed at initdb (a power of two, 1 MiB to 1 GiB).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WalSegmentSize(pub u32);

impl WalSegmentSize {
    pub fn is_valid(self) -> bool {
        self.0.is_power_of_two() && (1 << 20..=1 << 30).contains(&self.0)
    }

    /// How many segments share one "log id" (the middle 8 hex digits of a segment name).
    fn segments_per_log_id(self) -> u64 {
        0x1_0000_0000 / u64::from(self.0)
    }
}

/// The major PostgreSQL version a segment was written by, from its page magic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PgVersion(pub u32);

impl PgVersion {
    /// The WAL page magic of each supported major version (`XLOG_PAGE_MAGIC` in xlog_internal.h).
    const MAGICS: [(u16, u32); 6] = [
        (0xD106, 13),
        (0xD10D, 14),
        (0xD110, 15),
        (0xD113, 16),
        (0xD116, 17),
        (0xD118, 18),
    ];

    pub fn from_page_magic(magic: u16) -> Option<Self> {
        Self::MAGICS
            .iter()
            .find(|(known, _)| *known == magic)
            .map(|(_, version)| PgVersion(*version))
    }
}

/// The cluster's system identifier: chosen at initdb, shared by every segment and every standby.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SystemIdentifier(#[serde(with = "u64_as_string")] pub u64);

impl fmt::Display for SystemIdentifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// JSON readers often lose precision above 2^53, and system identifiers are larger than that.
mod u64_as_string {
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(value: &u64, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&value.to_string())
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
        String::deserialize(deserializer)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// A WAL segment name: `TTTTTTTTXXXXXXXXYYYYYYYY` (timeline, log id, segment within the log id).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SegmentName {
    pub timeline: TimelineId,
    pub log_id: u32,
    pub segment: u32,
}

impl SegmentName {
    pub fn segment_number(self, size: WalSegmentSize) -> u64 {
        u64::from(self.log_id) * size.segments_per_log_id() + u64::from(self.segment)
    }

    pub fn from_segment_number(timeline: TimelineId, number: u64, size: WalSegmentSize) -> Self {
        let per_log = size.segments_per_log_id();
        SegmentName {
            timeline,
            log_id: (number / per_log) as u32,
            segment: (number % per_log) as u32,
        }
    }

    /// The LSN of the segment's first byte.
    pub fn start_lsn(self, size: WalSegmentSize) -> Lsn {
        Lsn(self.segment_number(size) * u64::from(size.0))
    }

    pub fn next(self, size: WalSegmentSize) -> Self {
        Self::from_segment_number(self.timeline, self.segment_number(size) + 1, size)
    }
}

impl fmt::Display for SegmentName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}{:08X}{:08X}",
            self.timeline, self.log_id, self.segment
        )
    }
}

impl FromStr for SegmentName {
    type Err = WalError;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text.len() != 24 || !is_upper_hex(text) {
            return Err(WalError::NotAWalFileName(text.to_string()));
        }
        let part = |range: std::ops::Range<usize>| u32::from_str_radix(&text[range], 16).unwrap();
        Ok(SegmentName {
            timeline: TimelineId(part(0..8)),
            log_id: part(8..16),
            segment: part(16..24),
        })
    }
}

fn is_upper_hex(text: &str) -> bool {
    text.bytes()
        .all(|byte| byte.is_ascii_digit() || (b'A'..=b'F').contains(&byte))
}

/// Every kind of file Postgres archives or asks back for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum WalFileName {
    Segment(SegmentName),
    /// The last, incomplete segment of an old timeline, archived at promotion.
    Partial(SegmentName),
    /// A backup history file: the segment the backup started in and the offset within it.
    Backup {
        segment: SegmentName,
        offset: u32,
    },
    /// A timeline history file, `TTTTTTTT.history`.
    History(TimelineId),
}

/// Written as its file name, as Postgres names it.
impl Serialize for WalFileName {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl WalFileName {
    pub fn timeline(&self) -> TimelineId {
        match self {
            WalFileName::Segment(name) | WalFileName::Partial(name) => name.timeline,
            WalFileName::Backup { segment, .. } => segment.timeline,
            WalFileName::History(timeline) => *timeline,
        }
    }

    /// Whether the file starts with a WAL long page header that can be validated.
    pub fn segment(&self) -> Option<SegmentName> {
        match self {
            WalFileName::Segment(name) | WalFileName::Partial(name) => Some(*name),
            _ => None,
        }
    }
}

impl fmt::Display for WalFileName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WalFileName::Segment(name) => write!(f, "{name}"),
            WalFileName::Partial(name) => write!(f, "{name}.partial"),
            WalFileName::Backup { segment, offset } => write!(f, "{segment}.{offset:08X}.backup"),
            WalFileName::History(timeline) => write!(f, "{timeline}.history"),
        }
    }
}

impl FromStr for WalFileName {
    type Err = WalError;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let not_wal = || WalError::NotAWalFileName(text.to_string());
        if let Some(timeline) = text.strip_suffix(".history") {
            if timeline.len() != 8 || !is_upper_hex(timeline) {
                return Err(not_wal());
            }
            let timeline = u32::from_str_radix(timeline, 16).map_err(|_| not_wal())?;
            return Ok(WalFileName::History(TimelineId(timeline)));
        }
        if let Some(segment) = text.strip_suffix(".partial") {
            return Ok(WalFileName::Partial(
                segment.parse().map_err(|_| not_wal())?,
            ));
        }
        if let Some(rest) = text.strip_suffix(".backup") {
            let (segment, offset) = rest.split_once('.').ok_or_else(not_wal)?;
            if offset.len() != 8 || !is_upper_hex(offset) {
                return Err(not_wal());
            }
            return Ok(WalFileName::Backup {
                segment: segment.parse().map_err(|_| not_wal())?,
                offset: u32::from_str_radix(offset, 16).map_err(|_| not_wal())?,
            });
        }
        Ok(WalFileName::Segment(text.parse().map_err(|_| not_wal())?))
    }
}

/// The long page header at the start of every WAL segment (`XLogLongPageHeaderData`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    pub pg_version: PgVersion,
    pub timeline: TimelineId,
    pub page_address: Lsn,
    pub system_identifier: SystemIdentifier,
    pub segment_size: WalSegmentSize,
    pub block_size: u32,
}

/// Bytes of the long page header that the checks need.
pub const LONG_HEADER_LEN: usize = 40;
const XLP_LONG_HEADER: u16 = 0x0002;

impl SegmentHeader {
    /// Parses and checks the header for internal consistency; `file` names the file in errors.
    pub fn parse(file: &str, bytes: &[u8]) -> Result<Self, WalError> {
        if bytes.len() < LONG_HEADER_LEN {
            return Err(WalError::NotASegment {
                file: file.to_string(),
                reason: format!("it is only {} bytes long", bytes.len()),
            });
        }
        let u16_at = |at: usize| u16::from_le_bytes(bytes[at..at + 2].try_into().unwrap());
        let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
        let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap());
        let magic = u16_at(0);
        let pg_version =
            PgVersion::from_page_magic(magic).ok_or_else(|| WalError::NotASegment {
                file: file.to_string(),
                reason: format!("page magic 0x{magic:04X} is not that of PostgreSQL 13 to 18"),
            })?;
        if u16_at(2) & XLP_LONG_HEADER == 0 {
            return Err(WalError::NotASegment {
                file: file.to_string(),
                reason: "its first page lacks the long page header".to_string(),
            });
        }
        let segment_size = WalSegmentSize(u32_at(32));
        if !segment_size.is_valid() {
            return Err(WalError::NotASegment {
                file: file.to_string(),
                reason: format!(
                    "its header names an impossible segment size {}",
                    segment_size.0
                ),
            });
        }
        Ok(SegmentHeader {
            pg_version,
            timeline: TimelineId(u32_at(4)),
            page_address: Lsn(u64_at(8)),
            system_identifier: SystemIdentifier(u64_at(24)),
            segment_size,
            block_size: u32_at(36),
        })
    }

    /// Checks that the header belongs at the position the file name claims.
    pub fn check_matches_name(&self, file: &str, name: SegmentName) -> Result<(), WalError> {
        let expected = name.start_lsn(self.segment_size);
        if self.page_address != expected {
            return Err(WalError::HeaderDoesNotMatchName {
                file: file.to_string(),
                found: self.page_address,
                expected,
            });
        }
        if name.segment_number(self.segment_size) % self.segment_size.segments_per_log_id()
            != u64::from(name.segment)
        {
            return Err(WalError::NotAWalFileName(file.to_string()));
        }
        Ok(())
    }
}

/// Opens a file Postgres handed over, only if it is a regular file: never through a symbolic
/// link (`O_NOFOLLOW`), and without blocking on a FIFO (`O_NONBLOCK`, then `fstat`). Returns
/// the open file and its length.
pub fn open_regular_file(path: &Path) -> Result<(std::fs::File, u64), WalError> {
    use std::os::unix::fs::OpenOptionsExt;
    let io_error = |error| WalError::Io {
        path: path.display().to_string(),
        error,
    };
    let opened = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path);
    let handle = match opened {
        Ok(handle) => handle,
        // A link fails with ELOOP, a socket with ENXIO: say what the file is instead.
        Err(error) => {
            return Err(match std::fs::symlink_metadata(path) {
                Ok(metadata) if !metadata.is_file() => not_regular(path, metadata.file_type()),
                _ => io_error(error),
            });
        }
    };
    let metadata = handle.metadata().map_err(io_error)?;
    if !metadata.is_file() {
        return Err(not_regular(path, metadata.file_type()));
    }
    Ok((handle, metadata.len()))
}

fn not_regular(path: &Path, kind: std::fs::FileType) -> WalError {
    use std::os::unix::fs::FileTypeExt;
    let path = path.display().to_string();
    if kind.is_symlink() {
        return WalError::SymbolicLink { path };
    }
    let kind = if kind.is_dir() {
        "a directory"
    } else if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_socket() {
        "a socket"
    } else {
        "a device"
    };
    WalError::NotARegularFile { path, kind }
}

/// Reads the first bytes of a file that should be a segment and validates them against its name
/// and the file's size.
pub fn read_segment_header(
    path: &Path,
    file: &str,
    name: SegmentName,
) -> Result<SegmentHeader, WalError> {
    let io_error = |error| WalError::Io {
        path: path.display().to_string(),
        error,
    };
    let (mut handle, length) = open_regular_file(path)?;
    let mut bytes = [0u8; LONG_HEADER_LEN];
    let mut filled = 0;
    while filled < bytes.len() {
        match handle.read(&mut bytes[filled..]).map_err(io_error)? {
            0 => break,
            read => filled += read,
        }
    }
    let header = SegmentHeader::parse(file, &bytes[..filled])?;
    if length != u64::from(header.segment_size.0) {
        return Err(WalError::NotASegment {
            file: file.to_string(),
            reason: format!(
                "it is {length} bytes long but its header says segments are {} bytes",
                header.segment_size.0
            ),
        });
    }
    header.check_matches_name(file, name)?;
    Ok(header)
}

/// Reads a history or backup history file: a regular file of at most
/// `history::MAX_TEXT_FILE_BYTES`. Invalid UTF-8 is kept as replacement characters: only the
/// ASCII fields are checked, and a restore point name may be in any encoding.
fn read_text_file(path: &Path, file: &str) -> Result<String, WalError> {
    let (handle, length) = open_regular_file(path)?;
    let too_large = |length| WalError::TextFileTooLarge {
        file: file.to_string(),
        length,
    };
    if length > history::MAX_TEXT_FILE_BYTES {
        return Err(too_large(length));
    }
    let mut bytes = Vec::new();
    // One byte past the cap, in case the file grew since fstat.
    handle
        .take(history::MAX_TEXT_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|error| WalError::Io {
            path: path.display().to_string(),
            error,
        })?;
    if bytes.len() as u64 > history::MAX_TEXT_FILE_BYTES {
        return Err(too_large(bytes.len() as u64));
    }
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// Checks a timeline history file the way Postgres reads it at every restore.
pub fn check_history_file(path: &Path, file: &str, timeline: TimelineId) -> Result<(), WalError> {
    let text = read_text_file(path, file)?;
    history::parse_history(timeline, &text).map_err(|problem| WalError::InvalidHistory {
        file: file.to_string(),
        problem,
    })?;
    Ok(())
}

/// Checks a backup history file: it parses and records the start its name encodes. `size` is
/// the cluster's segment size when a segment beside the file tells it.
pub fn check_backup_history_file(
    path: &Path,
    file: &str,
    segment: SegmentName,
    offset: u32,
    size: Option<WalSegmentSize>,
) -> Result<(), WalError> {
    let text = read_text_file(path, file)?;
    history::parse_backup_history(segment, offset, size, &text).map_err(|problem| {
        WalError::InvalidBackupHistory {
            file: file.to_string(),
            problem,
        }
    })?;
    Ok(())
}

/// The header of any valid segment in a `pg_wal` directory: it tells which cluster, version and
/// segment size the directory belongs to.
pub fn any_segment_header(pg_wal: &Path) -> Option<SegmentHeader> {
    std::fs::read_dir(pg_wal).ok()?.flatten().find_map(|entry| {
        let file_name = entry.file_name().into_string().ok()?;
        let WalFileName::Segment(segment) = file_name.parse().ok()? else {
            return None;
        };
        read_segment_header(&entry.path(), &file_name, segment).ok()
    })
}

/// The system identifier recorded in a data directory's `global/pg_control`, if there is one.
/// It is the first field of `ControlFileData` in every supported version.
pub fn control_file_system_identifier(data_directory: &Path) -> Option<SystemIdentifier> {
    let mut bytes = [0u8; 8];
    let mut file = std::fs::File::open(data_directory.join("global/pg_control")).ok()?;
    file.read_exact(&mut bytes).ok()?;
    Some(SystemIdentifier(u64::from_le_bytes(bytes)))
}

#[derive(Debug, thiserror::Error)]
pub enum WalError {
    #[error(
        "'{0}' is not a WAL file name: expected a 24-hex-digit segment, a TTTTTTTT.history, a .partial or a .backup file; check that archive_command passes %p and restore_command passes %f"
    )]
    NotAWalFileName(String),
    #[error("'{0}' is not an LSN: expected the form 16/B374D848")]
    InvalidLsn(String),
    #[error("{file} is not a PostgreSQL WAL segment: {reason}; refusing to archive it")]
    NotASegment { file: String, reason: String },
    #[error(
        "{file}: the header's page address {found} does not match the file name (expected {expected}); the file is a recycled or renamed segment, refusing to archive it"
    )]
    HeaderDoesNotMatchName {
        file: String,
        found: Lsn,
        expected: Lsn,
    },
    #[error(
        "{path} is a symbolic link, not a file Postgres wrote; refusing to archive it (archive_command must pass %p, the file in pg_wal itself)"
    )]
    SymbolicLink { path: String },
    #[error(
        "{path} is {kind}, not a regular file; refusing to archive it (archive_command must pass %p, the file in pg_wal itself)"
    )]
    NotARegularFile { path: String, kind: &'static str },
    #[error(
        "{file} is {length} bytes long, more than the {max} a timeline history or backup history file may be; refusing to archive it (Postgres writes these itself: check what created this file)",
        max = history::MAX_TEXT_FILE_BYTES
    )]
    TextFileTooLarge { file: String, length: u64 },
    #[error(
        "{file} is not a valid timeline history file: {problem}; refusing to archive it (Postgres writes these itself: check what created this file)"
    )]
    InvalidHistory {
        file: String,
        problem: history::TextFileProblem,
    },
    #[error(
        "{file} is not a valid backup history file: {problem}; refusing to archive it (Postgres writes these itself: check what created this file)"
    )]
    InvalidBackupHistory {
        file: String,
        problem: history::TextFileProblem,
    },
    #[error("cannot read {path}: {error}")]
    Io { path: String, error: std::io::Error },
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIXTEEN_MIB: WalSegmentSize = WalSegmentSize(16 << 20);

    #[test]
    fn names_round_trip() {
        for text in [
            "000000010000000000000003",
            "00000002000000A1000000FF",
            "00000002.history",
            "000000010000000000000004.partial",
            "000000010000000000000004.00000028.backup",
        ] {
            assert_eq!(text.parse::<WalFileName>().unwrap().to_string(), text);
        }
        for bad in [
            "RECOVERYXLOG",
            "00000001.HISTORY",
            "0000000100000000000000gg",
            "",
        ] {
            assert!(bad.parse::<WalFileName>().is_err(), "{bad}");
        }
    }

    #[test]
    fn segment_arithmetic_crosses_log_ids() {
        let name: SegmentName = "0000000100000000000000FF".parse().unwrap();
        assert_eq!(
            name.next(SIXTEEN_MIB).to_string(),
            "000000010000000100000000"
        );
        assert_eq!(name.start_lsn(SIXTEEN_MIB).to_string(), "0/FF000000");
    }

    #[test]
    fn lsn_parses_and_prints() {
        let lsn: Lsn = "16/B374D848".parse().unwrap();
        assert_eq!(lsn.0, 0x16_B374_D848);
        assert_eq!(lsn.to_string(), "16/B374D848");
    }
}

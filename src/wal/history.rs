//! The two small text files Postgres archives beside segments: timeline history files
//! (`TTTTTTTT.history`) and backup history files (`<segment>.<offset>.backup`).
//!
//! Both are parsed before upload, so that a file no restore could use never enters the
//! repository, and the restore reads history files with the same parser. The rules are those of
//! Postgres's own readers (`readTimeLineHistory` in timeline.c): blank lines and `#` comments are
//! skipped, every other line is `<parent timeline>\t<switch point>\t<reason>`, the parent
//! timelines increase and are all older than the file's own timeline.

use std::fmt;

use super::{Lsn, SegmentName, TimelineId, WalSegmentSize};

/// The largest history or backup history file accepted. Postgres writes a few hundred bytes per
/// timeline switch or backup; a larger file is not one Postgres wrote.
pub const MAX_TEXT_FILE_BYTES: u64 = 1 << 20;

/// One ancestor of a timeline: it was followed until `switch_point`, where the next began.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryEntry {
    pub parent: TimelineId,
    pub switch_point: Lsn,
    pub reason: String,
}

/// Why a history or backup history file does not parse, as one clause for an error message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextFileProblem(pub String);

impl fmt::Display for TextFileProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Parses the history file of `timeline`: its ancestors, oldest first.
pub fn parse_history(
    timeline: TimelineId,
    text: &str,
) -> Result<Vec<HistoryEntry>, TextFileProblem> {
    let mut entries: Vec<HistoryEntry> = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let entry = parse_history_line(index + 1, line.trim_end())?;
        check_order(index + 1, line.trim_end(), &entry, entries.last(), timeline)?;
        entries.push(entry);
    }
    if entries.is_empty() {
        return Err(TextFileProblem("it names no parent timeline".to_string()));
    }
    Ok(entries)
}

fn parse_history_line(number: usize, line: &str) -> Result<HistoryEntry, TextFileProblem> {
    let mut fields = line.trim_start().splitn(2, char::is_whitespace);
    let parent = fields
        .next()
        .and_then(|field| field.parse::<u32>().ok())
        .filter(|parent| *parent > 0)
        .ok_or_else(|| {
            TextFileProblem(format!(
                "line {number} ('{line}') does not start with a parent timeline number"
            ))
        })?;
    let rest = fields.next().unwrap_or_default().trim_start();
    let (switch_point, reason) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
    let switch_point = switch_point.parse::<Lsn>().map_err(|_| {
        TextFileProblem(format!(
            "line {number} ('{line}') has no valid switch point LSN"
        ))
    })?;
    Ok(HistoryEntry {
        parent: TimelineId(parent),
        switch_point,
        reason: reason.trim().to_string(),
    })
}

/// Parents strictly increase and are older than the file's timeline; switch points never go
/// back, because each timeline begins where its parent was left.
fn check_order(
    number: usize,
    line: &str,
    entry: &HistoryEntry,
    previous: Option<&HistoryEntry>,
    timeline: TimelineId,
) -> Result<(), TextFileProblem> {
    let parent = entry.parent.0;
    if let Some(previous) = previous {
        if entry.parent <= previous.parent {
            return Err(TextFileProblem(format!(
                "line {number} ('{line}') names timeline {parent}, but parent timelines must increase"
            )));
        }
        if entry.switch_point < previous.switch_point {
            return Err(TextFileProblem(format!(
                "line {number} ('{line}') has switch point {}, before the previous line's {}",
                entry.switch_point, previous.switch_point
            )));
        }
    }
    if entry.parent >= timeline {
        return Err(TextFileProblem(format!(
            "line {number} ('{line}') names timeline {parent}, but a parent must be older than timeline {}",
            timeline.0
        )));
    }
    Ok(())
}

/// What a backup history file says about the backup it records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackupHistory {
    pub start: Lsn,
    pub stop: Lsn,
}

/// Parses a backup history file named for `segment` and `offset`: its START and STOP WAL
/// LOCATION lines must parse, and the start must be the position the file name encodes. With
/// `size` unknown (no segment beside the file), any valid segment size that fits is accepted.
pub fn parse_backup_history(
    segment: SegmentName,
    offset: u32,
    size: Option<WalSegmentSize>,
    text: &str,
) -> Result<BackupHistory, TextFileProblem> {
    let (start, start_file, start_line) = location(text, "START WAL LOCATION")?;
    let (stop, _, _) = location(text, "STOP WAL LOCATION")?;
    let sizes: Vec<WalSegmentSize> = match size {
        Some(size) => vec![size],
        None => (20..=30).map(|bits| WalSegmentSize(1 << bits)).collect(),
    };
    let named = |size: WalSegmentSize| {
        segment.start_lsn(size).0 + u64::from(offset) == start.0 && offset < size.0
    };
    if start_file != segment || !sizes.into_iter().any(named) {
        return Err(TextFileProblem(format!(
            "'{start_line}' does not match the file name"
        )));
    }
    if stop < start {
        return Err(TextFileProblem(format!(
            "its STOP WAL LOCATION {stop} is before its START WAL LOCATION {start}"
        )));
    }
    Ok(BackupHistory { start, stop })
}

/// The LSN and segment of a `<key>: 0/2000028 (file 000000010000000000000002)` line.
fn location<'a>(text: &'a str, key: &str) -> Result<(Lsn, SegmentName, &'a str), TextFileProblem> {
    let line = text
        .lines()
        .map(str::trim_end)
        .find(|line| line.starts_with(key))
        .ok_or_else(|| TextFileProblem(format!("it has no {key} line")))?;
    let malformed = || {
        TextFileProblem(format!(
            "'{line}' is not of the form '{key}: 0/2000028 (file 000000010000000000000002)'"
        ))
    };
    let rest = line[key.len()..].strip_prefix(": ").ok_or_else(malformed)?;
    let (lsn, file) = rest.split_once(" (file ").ok_or_else(malformed)?;
    let file = file.strip_suffix(')').ok_or_else(malformed)?;
    let lsn = lsn.parse::<Lsn>().map_err(|_| malformed())?;
    let file = file.parse::<SegmentName>().map_err(|_| malformed())?;
    Ok((lsn, file, line))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_history_as_postgres_writes_it_parses() {
        let text = "1\t0/3000060\tno recovery target specified\n\n# comment\n2\t0/5000000\tbefore 2026-01-01 00:00:00+00\n";
        let entries = parse_history(TimelineId(3), text).unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[1].parent, TimelineId(2));
        assert_eq!(entries[1].switch_point, Lsn(0x5000000));
        assert_eq!(entries[1].reason, "before 2026-01-01 00:00:00+00");
    }

    #[test]
    fn switch_points_never_go_back() {
        let problem = parse_history(TimelineId(3), "1\t0/5000000\ta\n2\t0/4000000\tb\n")
            .unwrap_err()
            .to_string();
        assert_eq!(
            problem,
            "line 2 ('2\t0/4000000\tb') has switch point 0/4000000, before the previous line's 0/5000000"
        );
    }

    #[test]
    fn a_backup_history_must_match_its_name() {
        let segment: SegmentName = "000000010000000000000002".parse().unwrap();
        let text = "START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\nSTOP WAL LOCATION: 0/2000100 (file 000000010000000000000002)\n";
        let size = Some(WalSegmentSize(16 << 20));
        assert!(parse_backup_history(segment, 0x28, size, text).is_ok());
        assert!(parse_backup_history(segment, 0x28, None, text).is_ok());
        assert!(parse_backup_history(segment, 0x30, size, text).is_err());
        let other: SegmentName = "000000020000000000000002".parse().unwrap();
        assert!(parse_backup_history(other, 0x28, size, text).is_err());
    }
}

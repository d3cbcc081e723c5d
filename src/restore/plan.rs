//! Phase 2 of a restore: plan the timeline and the reach, before anything is written. What the
//! archive holds (`ArchiveView`), the timeline path from the backup to the target timeline,
//! the last segment recovery must find for the target, and the check that every segment from
//! the backup's start through it is archived. A target the archive cannot reach is refused
//! here, naming why, with nothing downloaded.

use std::collections::HashMap;

use anyhow::{Context, Result, bail};

use super::reach::{ArchiveIndex, TimeReach, XidReach};
use super::target::{self, RecoveryTarget};
use super::timeline::{ArchivedSegments, TimelinePath, check_coverage};
use super::{RestoreOptions, TargetTimeline};
use crate::backup::Manifest;
use crate::repository::{Repository, WAL_PREFIX};
use crate::wal::records::{PgTimestamp, TransactionEnd};
use crate::wal::{Lsn, SegmentName, TimelineId, WalFileName, WalSegmentSize};

/// Plans recovery from `backup` to the target and proves the archive can carry it: returns the
/// timeline recovery ends on once every segment from the backup's start through the last one
/// needed is archived on the path, and refuses otherwise, before anything is downloaded.
pub(super) async fn recovery_timeline(
    backup: &Manifest,
    options: &RestoreOptions,
    archive: &ArchiveView,
    index: &ArchiveIndex<'_>,
    size: WalSegmentSize,
) -> Result<TimelineId> {
    let path = timeline_path(backup, archive, options.timeline)?;
    let last_needed = last_segment_needed(backup, options, archive, &path, index, size).await?;
    let first = backup.start_lsn.0 / u64::from(size.0);
    let reached = check_coverage(&archive.segments, &path, size, first, last_needed).map_err(|missing| {
        anyhow::anyhow!(
            "WAL segment {missing} is missing from the archive, so recovery from backup {} cannot reach {}; nothing was downloaded. Restore to an earlier target, or from a later backup",
            backup.id,
            options.target
        )
    })?;
    let stop_segment = backup.stop_lsn.0 / u64::from(size.0);
    if reached < stop_segment {
        bail!(
            "the archive ends before backup {} became consistent (it needs WAL through segment {}); nothing was downloaded",
            backup.id,
            stop_segment
        );
    }
    Ok(path.0.last().expect("a path has a timeline").0)
}

/// What the archive holds: segment numbers per timeline, and the history files.
pub(super) struct ArchiveView {
    segments: ArchivedSegments,
    histories: HashMap<TimelineId, String>,
}

impl ArchiveView {
    /// The archived segments recovery reads from `first` on, in order, each from the timeline
    /// the path assigns it; stops at the first one missing.
    pub(super) fn segments_on_path(
        &self,
        path: &TimelinePath,
        first: u64,
        size: WalSegmentSize,
    ) -> Vec<SegmentName> {
        let mut segments = Vec::new();
        for number in first.. {
            let timeline = path.timeline_of(number, size);
            if !self
                .segments
                .get(&timeline)
                .is_some_and(|numbers| numbers.contains(&number))
            {
                break;
            }
            segments.push(SegmentName::from_segment_number(timeline, number, size));
        }
        segments
    }

    /// The first segment missing after `segments` (as `segments_on_path` listed them from
    /// `first`), if WAL lies beyond it: then a target the index cannot find may still lie past
    /// the gap, and the coverage check, naming the missing segment, has the answer.
    fn gap_before_more_wal(&self, first: u64, segments: &[SegmentName]) -> Option<u64> {
        let missing = first + segments.len() as u64;
        self.has_segment_after(missing).then_some(missing)
    }

    /// Whether any timeline holds a segment numbered `number` or later.
    fn has_segment_after(&self, number: u64) -> bool {
        self.segments
            .values()
            .any(|numbers| numbers.range(number..).next().is_some())
    }
}

pub(super) async fn read_archive(
    repository: &Repository,
    size: WalSegmentSize,
) -> Result<ArchiveView> {
    let mut view = ArchiveView {
        segments: ArchivedSegments::new(),
        histories: HashMap::new(),
    };
    // The layout parses the keys; a key it would not have built is not part of the archive.
    for name in repository.list_wal(WAL_PREFIX).await? {
        match name {
            WalFileName::Segment(segment) => {
                let number = segment.segment_number(size);
                view.segments
                    .entry(segment.timeline)
                    .or_default()
                    .insert(number);
            }
            WalFileName::History(timeline) => {
                let key = Repository::wal_key(&name);
                let bytes = repository
                    .read_bytes(&key)
                    .await?
                    .with_context(|| format!("{key} disappeared"))?;
                view.histories
                    .insert(timeline, String::from_utf8_lossy(&bytes).into_owned());
            }
            _ => {}
        }
    }
    Ok(view)
}

/// The path to the target timeline; `latest` is the newest timeline that descends from the
/// backup's timeline after the backup started.
pub(super) fn timeline_path(
    backup: &Manifest,
    archive: &ArchiveView,
    wanted: TargetTimeline,
) -> Result<TimelinePath> {
    let path_of = |timeline: TimelineId| {
        TimelinePath::from_history(
            timeline,
            archive.histories.get(&timeline).map(String::as_str),
        )
    };
    let descends = |path: &TimelinePath| path.descends_from(backup.timeline, backup.start_lsn);
    match wanted {
        TargetTimeline::Current => path_of(backup.timeline),
        TargetTimeline::Id(timeline) => {
            let path = path_of(timeline)?;
            if !descends(&path) {
                bail!(
                    "timeline {} does not descend from backup {}'s timeline {} after the backup started; choose another --target-timeline or --backup",
                    timeline.0,
                    backup.id,
                    backup.timeline.0
                );
            }
            Ok(path)
        }
        TargetTimeline::Latest => {
            let mut candidates: Vec<TimelineId> = archive
                .histories
                .keys()
                .copied()
                .chain([backup.timeline])
                .collect();
            candidates.sort();
            for timeline in candidates.into_iter().rev() {
                let path = path_of(timeline)?;
                if descends(&path) {
                    return Ok(path);
                }
            }
            path_of(backup.timeline)
        }
    }
}

/// The last segment recovery must find, or `None` to check through the end of the archive.
async fn last_segment_needed(
    backup: &Manifest,
    options: &RestoreOptions,
    archive: &ArchiveView,
    path: &TimelinePath,
    index: &ArchiveIndex<'_>,
    size: WalSegmentSize,
) -> Result<Option<u64>> {
    let segment_of = |lsn: Lsn| lsn.0 / u64::from(size.0);
    let stop_segment = segment_of(backup.stop_lsn);
    Ok(match &options.target {
        RecoveryTarget::Immediate => Some(stop_segment),
        RecoveryTarget::Lsn(lsn) => Some(segment_of(*lsn).max(stop_segment)),
        RecoveryTarget::Time(time) => {
            let target = PgTimestamp::from_utc(time.with_timezone(&chrono::Utc));
            let segments = archive.segments_on_path(path, stop_segment, size);
            let reach = index
                .segment_ending_after(&segments, target, options.inclusive)
                .await?;
            let gap = archive.gap_before_more_wal(stop_segment, &segments);
            match reach {
                TimeReach::StopsIn(segment) => Some(segment.segment_number(size).max(stop_segment)),
                TimeReach::Beyond { .. } if gap.is_some() => gap,
                TimeReach::Beyond { last } => bail!(target_beyond_archive(options, last)),
            }
        }
        RecoveryTarget::Name(name) => {
            let start_segment = segment_of(backup.start_lsn);
            let segments = archive.segments_on_path(path, start_segment, size);
            let gap = archive.gap_before_more_wal(start_segment, &segments);
            match index.first_restore_point_named(&segments, name).await? {
                Some((_, point)) if point.lsn < backup.stop_lsn => bail!(
                    "restore point '{name}' at LSN {} lies before backup {} is consistent (LSN {}); recovery would stop there and fail. Restore from an earlier backup with --backup",
                    point.lsn,
                    backup.id,
                    backup.stop_lsn
                ),
                Some((segment, _)) => Some(segment.segment_number(size).max(stop_segment)),
                None if gap.is_some() => gap,
                None => bail!(
                    "restore point '{name}' is not in the archive after backup {}; Postgres would replay to the end and stop with FATAL. Check the name (pg_create_restore_point), or restore to a time or LSN instead",
                    backup.id
                ),
            }
        }
        RecoveryTarget::Xid(xid) => {
            // The search starts at the segment holding the backup's start, so a transaction
            // that ended earlier in that segment is taken as reachable: recovery then fails
            // only as it would without this check.
            let start_segment = segment_of(backup.start_lsn);
            let segments = archive.segments_on_path(path, start_segment, size);
            let gap = archive.gap_before_more_wal(start_segment, &segments);
            match index
                .segment_ending_xid(&segments, target::xid_of(xid)?)
                .await?
            {
                XidReach::StopsIn(segment) if segment.segment_number(size) < stop_segment => bail!(
                    "transaction {xid} ends before backup {} is consistent (LSN {}); recovery would stop there and fail. Restore from an earlier backup with --backup",
                    backup.id,
                    backup.stop_lsn
                ),
                XidReach::StopsIn(segment) => Some(segment.segment_number(size)),
                XidReach::Unknown => None,
                XidReach::NotFound if gap.is_some() => gap,
                XidReach::NotFound => bail!(
                    "transaction {xid} does not end in the archive after the start of backup {}; Postgres would replay to the end and stop with FATAL. Check the id (a top-level transaction's, as txid_current() shows it), restore from an earlier backup with --backup, or restore to a time or LSN instead",
                    backup.id
                ),
            }
        }
        RecoveryTarget::EndOfArchive => None,
    })
}

/// The refusal for a time no transaction end in the archive comes after, naming the last one.
fn target_beyond_archive(
    options: &RestoreOptions,
    last: Option<(TransactionEnd, PgTimestamp)>,
) -> String {
    let last = match last {
        Some((end, latest)) => format!(
            "the last transaction end in the archive (transaction {}, {} at {})",
            end.xid,
            if end.committed {
                "committed"
            } else {
                "aborted"
            },
            latest.to_utc().format("%Y-%m-%d %H:%M:%S%.6f+00")
        ),
        None => {
            "any transaction end in the archive (this timeline path holds none since the backup)"
                .to_string()
        }
    };
    format!(
        "{} is not before {last}; Postgres stops at a time only on reaching the first transaction that ended after it, so recovery would end in FATAL. Restore without a target to reach the end of the archive, or wait until more WAL is archived",
        options.target
    )
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{manifest, options};
    use super::*;

    const SIZE: WalSegmentSize = WalSegmentSize(16 << 20);

    /// Timeline 1 holds segments 1 to 6; timeline 2, forked at segment 4, holds 4 to 8 but
    /// lacks 7, and 10.
    fn archive() -> ArchiveView {
        let mut segments = ArchivedSegments::new();
        segments.insert(TimelineId(1), (1..=6).collect());
        segments.insert(TimelineId(2), [4, 5, 6, 8, 10].into_iter().collect());
        let mut histories = HashMap::new();
        histories.insert(
            TimelineId(2),
            "1\t0/4000000\tno recovery target specified\n".to_string(),
        );
        ArchiveView {
            segments,
            histories,
        }
    }

    #[test]
    fn segments_on_the_path_follow_the_switch_and_stop_at_the_first_gap() {
        let archive = archive();
        let path = TimelinePath::from_history(
            TimelineId(2),
            archive.histories.get(&TimelineId(2)).map(String::as_str),
        )
        .unwrap();
        let names: Vec<String> = archive
            .segments_on_path(&path, 2, SIZE)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            names,
            [
                "000000010000000000000002",
                "000000010000000000000003",
                "000000020000000000000004",
                "000000020000000000000005",
                "000000020000000000000006",
            ]
        );
        // Segment 7 is missing and WAL lies beyond it: a target may lie past the gap.
        let listed = archive.segments_on_path(&path, 2, SIZE);
        assert_eq!(archive.gap_before_more_wal(2, &listed), Some(7));
        assert!(archive.has_segment_after(10));
        assert!(!archive.has_segment_after(11));
    }

    #[test]
    fn the_timeline_path_is_the_newest_that_descends_after_the_backup_started() {
        let archive = archive();
        let backup = manifest("b", 0x2000028, 0x2000100, "2026-01-01T00:00:00Z");
        let latest = timeline_path(&backup, &archive, TargetTimeline::Latest).unwrap();
        assert_eq!(latest.0.last().unwrap().0, TimelineId(2));
        let current = timeline_path(&backup, &archive, TargetTimeline::Current).unwrap();
        assert_eq!(current.0, vec![(TimelineId(1), Lsn(0))]);
        // A backup that started after timeline 2 forked cannot recover onto it.
        let later = manifest("later", 0x5000028, 0x5000100, "2026-01-01T00:00:00Z");
        let latest = timeline_path(&later, &archive, TargetTimeline::Latest).unwrap();
        assert_eq!(latest.0, vec![(TimelineId(1), Lsn(0))]);
        assert_eq!(
            timeline_path(&later, &archive, TargetTimeline::Id(TimelineId(2)))
                .unwrap_err()
                .to_string(),
            "timeline 2 does not descend from backup later's timeline 1 after the backup started; choose another --target-timeline or --backup"
        );
    }

    #[test]
    fn a_time_beyond_the_archive_is_refused_naming_the_last_transaction_end() {
        let asked = options(RecoveryTarget::Time(
            target::parse_time("2026-01-05 00:00:00+00").unwrap(),
        ));
        let end = TransactionEnd {
            lsn: Lsn(0x5000200),
            xid: 7421,
            time: PgTimestamp(0),
            committed: true,
        };
        let latest = PgTimestamp::from_utc(
            chrono::DateTime::parse_from_rfc3339("2026-01-04T10:00:00.25Z")
                .unwrap()
                .with_timezone(&chrono::Utc),
        );
        assert_eq!(
            target_beyond_archive(&asked, Some((end, latest))),
            "time 2026-01-05 00:00:00.000000+00:00 is not before the last transaction end in the archive (transaction 7421, committed at 2026-01-04 10:00:00.250000+00); Postgres stops at a time only on reaching the first transaction that ended after it, so recovery would end in FATAL. Restore without a target to reach the end of the archive, or wait until more WAL is archived"
        );
        let aborted = TransactionEnd {
            committed: false,
            ..end
        };
        assert!(
            target_beyond_archive(&asked, Some((aborted, latest)))
                .contains("(transaction 7421, aborted at 2026-01-04 10:00:00.250000+00)")
        );
        assert_eq!(
            target_beyond_archive(&asked, None),
            "time 2026-01-05 00:00:00.000000+00:00 is not before any transaction end in the archive (this timeline path holds none since the backup); Postgres stops at a time only on reaching the first transaction that ended after it, so recovery would end in FATAL. Restore without a target to reach the end of the archive, or wait until more WAL is archived"
        );
    }
}

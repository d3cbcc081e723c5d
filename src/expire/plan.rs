//! What expire deletes, decided from the catalog alone: a pure function of the backups, the
//! archived WAL, the timeline histories, the policy and the time, so that a property test can
//! prove it keeps the window over any catalog.
//!
//! The recoverable set comes from backup LSNs, the WAL chain and the timeline graph, never from
//! names or object dates, with the reachability code the restore precheck uses
//! (`restore::timeline`): a backup is restorable when every segment from its start through its
//! stop is archived on its timeline path, and an instant is reachable from it when the WAL from
//! its start through that instant is.

use std::collections::{BTreeSet, HashMap};

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::config::RetentionPolicy;
use crate::repository::layout::BackupId;
use crate::restore::timeline::{ArchivedSegments, TimelinePath, check_coverage};
use crate::wal::{Lsn, TimelineId, WalFileName, WalSegmentSize};

/// What the planner needs of one backup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupPoint {
    pub id: BackupId,
    pub timeline: TimelineId,
    pub start_lsn: Lsn,
    pub stop_lsn: Lsn,
    pub stop_time: DateTime<Utc>,
}

/// The archive as listed: every WAL file, the text of each timeline history file, and when
/// the last transaction on each timeline ended, where the index knows it.
#[derive(Debug, Clone, Default)]
pub struct ArchiveListing {
    pub files: Vec<WalFileName>,
    pub histories: HashMap<TimelineId, String>,
    /// A timeline whose last transaction ended before the window began holds no instant of
    /// the window; one missing here is taken to reach into it.
    pub last_activity: HashMap<TimelineId, DateTime<Utc>>,
}

/// What an expire run deletes, and what the repository offers after it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExpirePlan {
    /// The backups the window starts from, one per timeline that reaches into it: the newest
    /// restorable backup on that timeline's path that ended before the window began. A
    /// timeline whose window reaches past all its backups keeps them all and has none here.
    pub anchors: Vec<BackupId>,
    pub kept_backups: Vec<BackupId>,
    pub expired_backups: Vec<BackupId>,
    /// WAL files no kept backup needs. History files are never among them: a few bytes each,
    /// and recovery to any later timeline reads its ancestors' histories.
    pub expired_wal: Vec<WalFileName>,
    /// The earliest instant a restore can reach after the run: the end of the oldest kept
    /// backup whose WAL runs unbroken to the end of the archive.
    pub earliest_recovery_point: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error(
        "no retention policy is configured, so expire keeps everything: set retention_window (PITR_RETENTION_WINDOW, e.g. 14d) or retention_backups (PITR_RETENTION_BACKUPS)"
    )]
    NoPolicy,
    #[error(
        "WAL segment {segment} is missing from the archive, so the retention window has a gap after backup {backup}: instants after it cannot be restored until a later backup; expire deletes nothing while the window has a gap. Take a new backup now, or run expire with --allow-gap to expire around it"
    )]
    WindowGap { segment: String, backup: BackupId },
    #[error(
        "the history file of timeline {0} is not valid, so expire cannot tell which WAL recovery needs; nothing was deleted. Restore the history file from a copy"
    )]
    BadHistory(TimelineId),
    #[error(
        "the expire plan would leave backup {0} unrestorable; nothing was deleted. This is a bug in pitr: report it with `pitr list --output json`"
    )]
    WouldBreak(BackupId),
}

/// Options that change what the plan may do.
#[derive(Debug, Clone, Copy, Default)]
pub struct PlanOptions {
    /// Expire even though the window has a gap (whatever lies beyond the gap stays).
    pub allow_gap: bool,
}

/// Decides what to delete. Refuses (with nothing to delete) when no policy is set, when the
/// window has a gap (unless `allow_gap`), and when its own result would break a kept backup.
pub fn plan(
    backups: &[BackupPoint],
    archive: &ArchiveListing,
    size: WalSegmentSize,
    policy: &RetentionPolicy,
    now: DateTime<Utc>,
    options: PlanOptions,
) -> Result<ExpirePlan, PlanError> {
    if policy.window.is_none() && policy.backups.is_none() {
        return Err(PlanError::NoPolicy);
    }
    let graph = Graph::new(archive, size)?;
    let mut backups = backups.to_vec();
    backups.sort_by(|a, b| (a.stop_time, &a.id).cmp(&(b.stop_time, &b.id)));
    let window_start = policy
        .window
        .map(|window| now - chrono::Duration::from_std(window).unwrap_or(chrono::TimeDelta::MAX));
    let live = graph.live_paths(archive, &backups, window_start);
    let mut keep = vec![false; backups.len()];
    let mut anchors = Vec::new();
    if let Some(window_start) = window_start {
        for path in &live {
            let on_path =
                |backup: &BackupPoint| path.descends_from(backup.timeline, backup.start_lsn);
            let anchor = backups.iter().rposition(|backup| {
                backup.stop_time <= window_start && on_path(backup) && graph.is_restorable(backup)
            });
            if let Some(position) = anchor {
                let anchor = &backups[position];
                let first = graph.segment_of(anchor.start_lsn);
                if !options.allow_gap
                    && let Err(missing) = check_coverage(&graph.segments, path, size, first, None)
                {
                    return Err(PlanError::WindowGap {
                        segment: missing.to_string(),
                        backup: anchor.id.clone(),
                    });
                }
                if !anchors.contains(&position) {
                    anchors.push(position);
                }
            }
            // From the anchor on, or every backup of the path when none is old enough.
            let first = anchor.unwrap_or(0);
            for (position, backup) in backups.iter().enumerate().skip(first) {
                if on_path(backup) {
                    keep[position] = true;
                }
            }
        }
    }
    let counted = backups
        .len()
        .saturating_sub(policy.min_backups.max(policy.backups.unwrap_or(0)));
    keep.iter_mut().skip(counted).for_each(|kept| *kept = true);
    let kept: Vec<&BackupPoint> = backups
        .iter()
        .zip(&keep)
        .filter_map(|(backup, kept)| kept.then_some(backup))
        .collect();
    let expired_wal = if kept.is_empty() {
        Vec::new()
    } else {
        graph.unneeded_wal(archive, &kept)
    };
    let after = graph.without(&expired_wal);
    for backup in &kept {
        if graph.is_restorable(backup) && !after.is_restorable(backup) {
            return Err(PlanError::WouldBreak(backup.id.clone()));
        }
    }
    let earliest_recovery_point = kept
        .iter()
        .find(|backup| live.iter().any(|path| after.reaches_end_on(backup, path)))
        .map(|backup| backup.stop_time);
    anchors.sort_unstable();
    Ok(ExpirePlan {
        anchors: anchors
            .into_iter()
            .map(|position| backups[position].id.clone())
            .collect(),
        kept_backups: kept.iter().map(|backup| backup.id.clone()).collect(),
        expired_backups: backups
            .iter()
            .zip(&keep)
            .filter(|(_, kept)| !**kept)
            .map(|(backup, _)| backup.id.clone())
            .collect(),
        expired_wal,
        earliest_recovery_point,
    })
}

/// The timeline graph and the archived segments, with the questions expire asks of them.
struct Graph {
    segments: ArchivedSegments,
    paths: HashMap<TimelineId, TimelinePath>,
    size: WalSegmentSize,
}

impl Graph {
    fn new(archive: &ArchiveListing, size: WalSegmentSize) -> Result<Graph, PlanError> {
        let mut segments = ArchivedSegments::new();
        for file in &archive.files {
            if let WalFileName::Segment(segment) = file {
                segments
                    .entry(segment.timeline)
                    .or_default()
                    .insert(segment.segment_number(size));
            }
        }
        let mut paths = HashMap::new();
        let timelines: BTreeSet<TimelineId> = archive
            .files
            .iter()
            .map(WalFileName::timeline)
            .chain(archive.histories.keys().copied())
            .collect();
        for timeline in timelines {
            paths.insert(timeline, path_of(archive, timeline)?);
        }
        Ok(Graph {
            segments,
            paths,
            size,
        })
    }

    fn segment_of(&self, lsn: Lsn) -> u64 {
        lsn.0 / u64::from(self.size.0)
    }

    /// The path of `timeline`; one without a history file is a path of its own.
    fn path(&self, timeline: TimelineId) -> TimelinePath {
        self.paths
            .get(&timeline)
            .cloned()
            .unwrap_or_else(|| TimelinePath(vec![(timeline, Lsn(0))]))
    }

    /// The paths of the timelines that hold instants of the window: every timeline whose last
    /// transaction did not end before `window_start`, or is not known. When every timeline
    /// went quiet before the window began, the one that was active last: the cluster is idle on
    /// it, and the window's instants lie there.
    fn live_paths(
        &self,
        archive: &ArchiveListing,
        backups: &[BackupPoint],
        window_start: Option<DateTime<Utc>>,
    ) -> Vec<TimelinePath> {
        let timelines: BTreeSet<TimelineId> = self
            .paths
            .keys()
            .copied()
            .chain(backups.iter().map(|backup| backup.timeline))
            .collect();
        let activity = |timeline: &TimelineId| archive.last_activity.get(timeline).copied();
        let mut live: Vec<TimelineId> = timelines
            .iter()
            .copied()
            .filter(|timeline| match (window_start, activity(timeline)) {
                (Some(start), Some(last)) => last >= start,
                _ => true,
            })
            .collect();
        if live.is_empty() {
            live.extend(timelines.iter().copied().max_by_key(activity));
        }
        live.into_iter()
            .map(|timeline| self.path(timeline))
            .collect()
    }

    /// Every segment from the backup's start through its stop is archived on its timeline.
    fn is_restorable(&self, backup: &BackupPoint) -> bool {
        let path = self.path(backup.timeline);
        let (first, stop) = (
            self.segment_of(backup.start_lsn),
            self.segment_of(backup.stop_lsn),
        );
        check_coverage(&self.segments, &path, self.size, first, Some(stop)).is_ok()
    }

    /// The backup is restorable and the WAL runs unbroken from it to the end of `path`.
    fn reaches_end_on(&self, backup: &BackupPoint, path: &TimelinePath) -> bool {
        if !path.descends_from(backup.timeline, backup.start_lsn) {
            return false;
        }
        let first = self.segment_of(backup.start_lsn);
        matches!(
            check_coverage(&self.segments, path, self.size, first, None),
            Ok(last) if last >= self.segment_of(backup.stop_lsn)
        )
    }

    /// The WAL files no kept backup needs: a file on timeline T at segment n is needed when a
    /// kept backup started at or before n on T, or on a timeline T descends from (after the
    /// backup started). History files are always kept.
    fn unneeded_wal(&self, archive: &ArchiveListing, kept: &[&BackupPoint]) -> Vec<WalFileName> {
        let mut unneeded = Vec::new();
        for file in &archive.files {
            let Some(segment) = file.segment() else {
                continue;
            };
            let number = segment.segment_number(self.size);
            let path = self.path(segment.timeline);
            let needed = kept.iter().any(|backup| {
                number >= self.segment_of(backup.start_lsn)
                    && (segment.timeline == backup.timeline
                        || path.descends_from(backup.timeline, backup.start_lsn))
            });
            if !needed {
                unneeded.push(*file);
            }
        }
        unneeded
    }

    /// The same graph with `removed` gone.
    fn without(&self, removed: &[WalFileName]) -> Graph {
        let mut segments = self.segments.clone();
        for file in removed {
            if let WalFileName::Segment(segment) = file
                && let Some(numbers) = segments.get_mut(&segment.timeline)
            {
                numbers.remove(&segment.segment_number(self.size));
            }
        }
        Graph {
            segments,
            paths: self.paths.clone(),
            size: self.size,
        }
    }
}

fn path_of(archive: &ArchiveListing, timeline: TimelineId) -> Result<TimelinePath, PlanError> {
    TimelinePath::from_history(
        timeline,
        archive.histories.get(&timeline).map(String::as_str),
    )
    .map_err(|_| PlanError::BadHistory(timeline))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::SegmentName;
    use proptest::prelude::*;
    use std::time::Duration;

    const SIZE: WalSegmentSize = WalSegmentSize(16 << 20);
    const MINUTE: i64 = 60;

    fn base() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-12-01T00:00:00Z")
            .unwrap()
            .to_utc()
    }

    /// The instant segment `number` ends at, in these catalogs: one segment a minute.
    fn time_of(number: u64) -> DateTime<Utc> {
        base() + chrono::Duration::seconds(number as i64 * MINUTE)
    }

    fn lsn_in(number: u64, offset: u64) -> Lsn {
        Lsn(number * u64::from(SIZE.0) + offset)
    }

    /// The plan at the end of segment `now`, with the default options.
    fn planned(
        backups: &[BackupPoint],
        archive: &ArchiveListing,
        policy: &RetentionPolicy,
        now: u64,
    ) -> Result<ExpirePlan, PlanError> {
        plan(
            backups,
            archive,
            SIZE,
            policy,
            time_of(now),
            PlanOptions::default(),
        )
    }

    fn backup(name: &str, timeline: u32, start: u64, stop: u64) -> BackupPoint {
        BackupPoint {
            id: BackupId(name.to_string()),
            timeline: TimelineId(timeline),
            start_lsn: lsn_in(start, 0x28),
            stop_lsn: lsn_in(stop, 0x100),
            stop_time: time_of(stop),
        }
    }

    /// Backups at segments 2, 10 and 20 of timeline 1, each ending one segment later.
    fn three_backups() -> [BackupPoint; 3] {
        [
            backup("b1", 1, 2, 3),
            backup("b2", 1, 10, 11),
            backup("b3", 1, 20, 21),
        ]
    }

    fn segments(timeline: u32, numbers: impl IntoIterator<Item = u64>) -> Vec<WalFileName> {
        numbers
            .into_iter()
            .map(|number| {
                WalFileName::Segment(SegmentName::from_segment_number(
                    TimelineId(timeline),
                    number,
                    SIZE,
                ))
            })
            .collect()
    }

    fn window(minutes: u64) -> RetentionPolicy {
        RetentionPolicy {
            window: Some(Duration::from_secs(minutes * 60)),
            min_backups: 1,
            backups: None,
        }
    }

    fn names(ids: &[BackupId]) -> Vec<&str> {
        ids.iter().map(|id| id.0.as_str()).collect()
    }

    #[test]
    fn the_newest_backup_before_the_window_and_its_wal_stay() {
        let backups = three_backups();
        let archive = ArchiveListing {
            files: segments(1, 1..=30),
            ..ArchiveListing::default()
        };
        // The window starts at segment 15: b2 (ended at 11) is the newest backup before it.
        let plan = planned(&backups, &archive, &window(15), 30).unwrap();
        assert_eq!(names(&plan.anchors), ["b2"]);
        assert_eq!(names(&plan.kept_backups), ["b2", "b3"]);
        assert_eq!(names(&plan.expired_backups), ["b1"]);
        assert_eq!(plan.expired_wal, segments(1, 1..=9));
        assert_eq!(plan.earliest_recovery_point, Some(time_of(11)));
    }

    #[test]
    fn a_window_older_than_every_backup_keeps_everything() {
        let backups = [backup("b1", 1, 5, 6)];
        let archive = ArchiveListing {
            files: segments(1, 1..=10),
            ..ArchiveListing::default()
        };
        let plan = planned(&backups, &archive, &window(60), 10).unwrap();
        assert!(plan.anchors.is_empty());
        assert_eq!(names(&plan.kept_backups), ["b1"]);
        // WAL before the only backup restores nothing.
        assert_eq!(plan.expired_wal, segments(1, 1..=4));
    }

    #[test]
    fn a_gap_in_the_window_is_refused_unless_allowed() {
        let backups = [backup("b1", 1, 2, 3), backup("b2", 1, 10, 11)];
        let mut files = segments(1, 1..=20);
        files.retain(|file| file.to_string() != "000000010000000000000010");
        let archive = ArchiveListing {
            files,
            ..ArchiveListing::default()
        };
        let error = planned(&backups, &archive, &window(5), 20).unwrap_err();
        assert_eq!(
            error,
            PlanError::WindowGap {
                segment: "000000010000000000000010".to_string(),
                backup: BackupId("b2".to_string()),
            }
        );
        // The window starts from b2, and segment 0x10 after it is missing.
        let allowed = plan(
            &backups,
            &archive,
            SIZE,
            &window(5),
            time_of(20),
            PlanOptions { allow_gap: true },
        );
        assert!(allowed.is_ok(), "{allowed:?}");
    }

    #[test]
    fn no_policy_is_refused() {
        let policy = RetentionPolicy {
            window: None,
            min_backups: 1,
            backups: None,
        };
        let error = plan(
            &[],
            &ArchiveListing::default(),
            SIZE,
            &policy,
            time_of(0),
            PlanOptions::default(),
        )
        .unwrap_err();
        assert_eq!(error, PlanError::NoPolicy);
    }

    /// Timeline 2 forked from 1 at segment 5; 1 went on. Whether 2 holds instants of the
    /// window decides whether the backup before the fork must stay.
    fn forked_archive(last_activity: HashMap<TimelineId, DateTime<Utc>>) -> ArchiveListing {
        let histories =
            HashMap::from([(TimelineId(2), format!("1\t{}\tpromoted\n", lsn_in(5, 0)))]);
        let mut files = segments(1, 1..=30);
        files.extend(segments(2, 5..=8));
        files.push(WalFileName::History(TimelineId(2)));
        ArchiveListing {
            files,
            histories,
            last_activity,
        }
    }

    #[test]
    fn a_timeline_that_went_quiet_before_the_window_keeps_nothing_but_its_history() {
        let backups = three_backups();
        let quiet = HashMap::from([(TimelineId(1), time_of(30)), (TimelineId(2), time_of(8))]);
        let archive = forked_archive(quiet);
        let plan = planned(&backups, &archive, &window(15), 30).unwrap();
        assert_eq!(names(&plan.expired_backups), ["b1"]);
        let mut expected = segments(1, 1..=9);
        expected.extend(segments(2, 5..=8));
        assert_eq!(plan.expired_wal, expected);
    }

    #[test]
    fn a_timeline_that_may_reach_into_the_window_keeps_the_backup_before_its_fork() {
        let backups = three_backups();
        // Nothing is known of timeline 2's last transaction: it may be in the window, and only
        // b1 (before the fork) restores onto it.
        let unknown = HashMap::from([(TimelineId(1), time_of(30))]);
        let plan = planned(&backups, &forked_archive(unknown), &window(15), 30).unwrap();
        assert_eq!(names(&plan.kept_backups), ["b1", "b2", "b3"]);
        assert_eq!(names(&plan.anchors), ["b1", "b2"]);
        assert_eq!(plan.expired_wal, segments(1, 1..=1));
    }

    #[test]
    fn the_count_and_the_minimum_keep_backups_the_window_would_not() {
        let backups = three_backups();
        let archive = ArchiveListing {
            files: segments(1, 1..=30),
            ..ArchiveListing::default()
        };
        let count = RetentionPolicy {
            window: None,
            min_backups: 1,
            backups: Some(3),
        };
        let kept = planned(&backups, &archive, &count, 30).unwrap();
        assert_eq!(names(&kept.kept_backups), ["b1", "b2", "b3"]);
        let minimum = RetentionPolicy {
            window: Some(Duration::from_secs(60)),
            min_backups: 2,
            backups: None,
        };
        let kept = planned(&backups, &archive, &minimum, 30).unwrap();
        assert_eq!(names(&kept.kept_backups), ["b2", "b3"]);
    }

    /// A generated catalog: up to three timelines (2 forks from 1, 3 from 2), archived
    /// segments with holes, and backups anywhere on them; one segment a minute.
    #[derive(Debug, Clone)]
    struct Catalog {
        backups: Vec<BackupPoint>,
        archive: ArchiveListing,
        now: DateTime<Utc>,
        policy: RetentionPolicy,
    }

    fn catalogs() -> impl Strategy<Value = Catalog> {
        (
            1u32..=3,
            5u64..15,
            15u64..25,
            prop::collection::vec((1u32..=3, 1u64..40, 0u64..3), 0..7),
            prop::collection::btree_set((1u32..=3, 1u64..45), 0..5),
            1u64..50,
            1usize..3,
            prop::option::of(1usize..4),
            prop::collection::vec(prop::option::of(0u64..46), 3),
        )
            .prop_map(
                |(timelines, fork2, fork3, wanted, holes, minutes, min_backups, count, quiet)| {
                    let ends = [0, 45u64, 45, 45];
                    let begins = [0, 1u64, fork2, fork3];
                    let mut files = Vec::new();
                    let mut histories = HashMap::new();
                    for timeline in 1..=timelines {
                        let numbers = (begins[timeline as usize]..=ends[timeline as usize])
                            .filter(|number| !holes.contains(&(timeline, *number)));
                        files.extend(segments(timeline, numbers));
                    }
                    if timelines >= 2 {
                        histories.insert(
                            TimelineId(2),
                            format!("1\t{}\tpromoted\n", lsn_in(fork2, 0)),
                        );
                        files.push(WalFileName::History(TimelineId(2)));
                    }
                    if timelines >= 3 {
                        histories.insert(
                            TimelineId(3),
                            format!(
                                "1\t{}\tpromoted\n2\t{}\tpromoted\n",
                                lsn_in(fork2, 0),
                                lsn_in(fork3, 0)
                            ),
                        );
                        files.push(WalFileName::History(TimelineId(3)));
                    }
                    let backups = wanted
                        .into_iter()
                        .enumerate()
                        .map(|(index, (timeline, start, length))| {
                            let timeline = timeline.min(timelines);
                            let start = start.max(begins[timeline as usize]);
                            backup(&format!("b{index}"), timeline, start, start + length)
                        })
                        .collect();
                    // Each timeline's last transaction: at its last segment, or earlier (the
                    // cluster went idle), or not known.
                    let last_activity = (1..=timelines)
                        .filter_map(|timeline| {
                            let at = quiet[timeline as usize - 1]?;
                            Some((
                                TimelineId(timeline),
                                time_of(at.min(ends[timeline as usize])),
                            ))
                        })
                        .collect();
                    Catalog {
                        backups,
                        archive: ArchiveListing {
                            files,
                            histories,
                            last_activity,
                        },
                        now: time_of(46),
                        policy: RetentionPolicy {
                            window: Some(Duration::from_secs(minutes * 60)),
                            min_backups,
                            backups: count,
                        },
                    }
                },
            )
    }

    /// Whether the instant at the end of segment `number` can be restored on `path`: some
    /// backup on it ended by then and the WAL from its start through `number` is archived.
    fn reachable(
        graph: &Graph,
        backups: &[&BackupPoint],
        path: &TimelinePath,
        number: u64,
    ) -> bool {
        backups.iter().any(|backup| {
            path.descends_from(backup.timeline, backup.start_lsn)
                && graph.segment_of(backup.stop_lsn) <= number
                && check_coverage(
                    &graph.segments,
                    path,
                    SIZE,
                    graph.segment_of(backup.start_lsn),
                    Some(number),
                )
                .is_ok()
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// After expire, every instant of the promised window that was restorable is still
        /// restorable, every kept backup that was restorable still is, and nothing outside
        /// the policy remains.
        #[test]
        fn expire_keeps_every_restorable_instant_of_the_window(catalog in catalogs()) {
            let Catalog { backups, archive, now, policy } = catalog;
            let result = plan(&backups, &archive, SIZE, &policy, now, PlanOptions::default());
            let plan = match result {
                Ok(plan) => plan,
                Err(PlanError::WindowGap { .. }) => return Ok(()),
                Err(other) => panic!("unexpected refusal: {other}"),
            };
            let before = Graph::new(&archive, SIZE).unwrap();
            let after = before.without(&plan.expired_wal);
            let all: Vec<&BackupPoint> = backups.iter().collect();
            let kept: Vec<&BackupPoint> = backups
                .iter()
                .filter(|backup| plan.kept_backups.contains(&backup.id))
                .collect();
            let window_start = now - chrono::Duration::from_std(policy.window.unwrap()).unwrap();
            // Every timeline that may hold instants of the window: its last transaction is
            // unknown or not before the window, or it is the one active last.
            let live = before.live_paths(&archive, &backups, Some(window_start));
            let newest = (1..=3u32).map(TimelineId).filter(|timeline| archive.files.iter().any(|file| file.timeline() == *timeline)).max().unwrap();
            prop_assert!(
                live.iter().any(|path| path.contains(newest))
                    || archive.last_activity.get(&newest).is_some_and(|last| *last < window_start),
                "the newest timeline is live unless known quiet"
            );
            for path in &live {
                for number in 0..=46u64 {
                    if time_of(number) < window_start {
                        continue;
                    }
                    if reachable(&before, &all, path, number) {
                        prop_assert!(
                            reachable(&after, &kept, path, number),
                            "segment {number} on {path:?} was restorable and no longer is: {plan:?}"
                        );
                    }
                }
            }
            for backup in &kept {
                if before.is_restorable(backup) {
                    prop_assert!(after.is_restorable(backup), "{} broke", backup.id);
                }
            }
            // Nothing outside the policy: an expired backup is older than every kept one
            // and not among the newest the counts keep; an expired WAL file is needed by no
            // kept backup; history files stay.
            let mut sorted = backups.clone();
            sorted.sort_by(|a, b| (a.stop_time, &a.id).cmp(&(b.stop_time, &b.id)));
            let keep_at_least = policy.min_backups.max(policy.backups.unwrap_or(0));
            prop_assert!(plan.kept_backups.len() >= keep_at_least.min(sorted.len()));
            for id in &plan.expired_backups {
                let position = sorted.iter().position(|backup| &backup.id == id).unwrap();
                prop_assert!(position < sorted.len() - keep_at_least.min(sorted.len()));
                // On every live path it lies on, a restorable backup that ended before the
                // window began comes after it: the window starts there, not here.
                let expired = &sorted[position];
                for path in &live {
                    if !path.descends_from(expired.timeline, expired.start_lsn) {
                        continue;
                    }
                    let later_anchor = sorted[position + 1..].iter().any(|backup| {
                        backup.stop_time <= window_start
                            && path.descends_from(backup.timeline, backup.start_lsn)
                            && before.is_restorable(backup)
                    });
                    prop_assert!(later_anchor, "{} expired but the window on {path:?} needs it", expired.id);
                }
            }
            for file in &plan.expired_wal {
                prop_assert!(!matches!(file, WalFileName::History(_)));
                let segment = file.segment().unwrap();
                let number = segment.segment_number(SIZE);
                for backup in &kept {
                    let path = before.path(segment.timeline);
                    prop_assert!(
                        number < before.segment_of(backup.start_lsn)
                            || (segment.timeline != backup.timeline
                                && !path.descends_from(backup.timeline, backup.start_lsn)),
                        "{file} is needed by {}", backup.id
                    );
                }
            }
        }
    }
}

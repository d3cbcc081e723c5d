//! Timeline history and WAL coverage: which segments recovery will need, on which timeline,
//! and whether the archive holds every one of them.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Result, anyhow};

use crate::wal::history::parse_history;
use crate::wal::{Lsn, SegmentName, TimelineId, WalSegmentSize};

/// The timelines recovery walks through to reach a target timeline, oldest first, each with the
/// LSN where it begins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimelinePath(pub Vec<(TimelineId, Lsn)>);

impl TimelinePath {
    /// Builds the path of `target` from its history file (`None` for a timeline without one),
    /// parsed by the same rules archive-push checks it with.
    pub fn from_history(target: TimelineId, history: Option<&str>) -> Result<Self> {
        let mut path = Vec::new();
        let mut begin = Lsn(0);
        if let Some(text) = history {
            let entries = parse_history(target, text).map_err(|problem| {
                anyhow!("the history file of timeline {target} in the archive is not valid: {problem}; restore to a timeline whose history is intact (--target-timeline)")
            })?;
            for entry in entries {
                path.push((entry.parent, begin));
                begin = entry.switch_point;
            }
        }
        path.push((target, begin));
        Ok(TimelinePath(path))
    }

    pub fn contains(&self, timeline: TimelineId) -> bool {
        self.0.iter().any(|(id, _)| *id == timeline)
    }

    /// Whether recovery from a backup that started at `start` on `timeline` can follow this
    /// path: the path passes through `timeline` and leaves it (if it does) only after `start`.
    pub fn descends_from(&self, timeline: TimelineId, start: Lsn) -> bool {
        self.0
            .iter()
            .position(|(id, _)| *id == timeline)
            .is_some_and(|index| {
                self.0
                    .get(index + 1)
                    .is_none_or(|(_, begin)| *begin > start)
            })
    }

    /// The timeline whose copy of segment `number` recovery reads: the newest one that has
    /// begun by that segment (as Postgres's XLogFileReadAnyTLI chooses).
    pub fn timeline_of(&self, number: u64, size: WalSegmentSize) -> TimelineId {
        self.0
            .iter()
            .rev()
            .find(|(_, begin)| begin.0 / u64::from(size.0) <= number)
            .map(|(id, _)| *id)
            .unwrap_or(self.0[0].0)
    }
}

/// The archived segment numbers per timeline.
pub type ArchivedSegments = BTreeMap<TimelineId, BTreeSet<u64>>;

/// Checks that every segment from `first` through `last` is archived on the path, and returns
/// the first missing one otherwise. With `last = None`, checks up to the end of the archive
/// and returns the last segment found.
pub fn check_coverage(
    archived: &ArchivedSegments,
    path: &TimelinePath,
    size: WalSegmentSize,
    first: u64,
    last: Option<u64>,
) -> Result<u64, SegmentName> {
    let has = |number: u64| {
        let timeline = path.timeline_of(number, size);
        (
            archived
                .get(&timeline)
                .is_some_and(|set| set.contains(&number)),
            timeline,
        )
    };
    // Only segments on the timeline recovery would read them from count: an old primary that
    // kept archiving on the parent timeline after the fork does not extend this path.
    let newest_archived = path
        .0
        .iter()
        .filter_map(|(timeline, _)| {
            archived
                .get(timeline)?
                .iter()
                .rev()
                .find(|number| path.timeline_of(**number, size) == *timeline)
                .copied()
        })
        .max()
        .unwrap_or(0);
    let end = last.unwrap_or(newest_archived.max(first));
    for number in first..=end {
        let (present, timeline) = has(number);
        if !present {
            // At the end of the archive, running out is expected; before it, it is a gap.
            if last.is_none() && number > newest_archived {
                return Ok(number - 1);
            }
            return Err(SegmentName::from_segment_number(timeline, number, size));
        }
    }
    Ok(end)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIZE: WalSegmentSize = WalSegmentSize(16 << 20);

    #[test]
    fn a_promoted_timeline_takes_over_from_its_switch_segment() {
        let path = TimelinePath::from_history(
            TimelineId(2),
            Some("1\t0/5000060\tno recovery target specified\n"),
        )
        .unwrap();
        assert_eq!(path.timeline_of(4, SIZE), TimelineId(1));
        assert_eq!(path.timeline_of(5, SIZE), TimelineId(2));
        let mut archived = ArchivedSegments::new();
        archived.insert(TimelineId(1), (1..=5).collect());
        archived.insert(TimelineId(2), (5..=8).collect());
        assert_eq!(check_coverage(&archived, &path, SIZE, 2, None), Ok(8));
        archived.get_mut(&TimelineId(2)).unwrap().remove(&6);
        assert_eq!(
            check_coverage(&archived, &path, SIZE, 2, None)
                .unwrap_err()
                .to_string(),
            "000000020000000000000006"
        );
        assert_eq!(check_coverage(&archived, &path, SIZE, 2, Some(5)), Ok(5));
        // The old primary kept archiving timeline 1 past the fork: that is not a gap on 2.
        archived.get_mut(&TimelineId(2)).unwrap().insert(6);
        archived.get_mut(&TimelineId(1)).unwrap().extend(6..=12);
        assert_eq!(check_coverage(&archived, &path, SIZE, 2, None), Ok(8));
    }
}

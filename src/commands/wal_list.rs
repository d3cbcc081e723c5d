//! `pitr wal list`: what is archived, per timeline, and where the gaps are; `pitr wal show`:
//! what one segment holds for recovery targets.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::config::Settings;
use crate::repository::{Repository, WAL_PREFIX};
use crate::restore::reach::ArchiveIndex;
use crate::wal::records::{PgTimestamp, SegmentSummary};
use crate::wal::{PgVersion, SegmentName, TimelineId, WalFileName, WalSegmentSize};

/// The archive of one timeline, as `--output json` prints it.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct TimelineSummary {
    pub timeline: u32,
    pub has_history: bool,
    pub first_segment: Option<String>,
    pub last_segment: Option<String>,
    pub segments: u64,
    pub partial: Vec<String>,
    pub backup_labels: Vec<String>,
    pub gaps: Vec<Gap>,
}

/// A run of consecutive segments missing between two archived ones.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Gap {
    pub first_missing: String,
    pub last_missing: String,
    pub missing_segments: u64,
}

#[derive(Debug, Serialize)]
pub struct WalListing {
    pub repository: String,
    pub system_identifier: String,
    pub wal_segment_size: u32,
    pub timelines: Vec<TimelineSummary>,
}

pub async fn collect(settings: &Settings) -> Result<WalListing> {
    let repository = Repository::open(settings)?;
    let identity = repository.require_identity().await?;
    let mut by_timeline: BTreeMap<TimelineId, Vec<WalFileName>> = BTreeMap::new();
    for name in repository.list_wal(WAL_PREFIX).await? {
        by_timeline.entry(name.timeline()).or_default().push(name);
    }
    let timelines = by_timeline
        .into_iter()
        .map(|(timeline, names)| summarize(timeline, names, identity.segment_size()))
        .collect();
    Ok(WalListing {
        repository: repository.url.clone(),
        system_identifier: identity.system_identifier.to_string(),
        wal_segment_size: identity.wal_segment_size,
        timelines,
    })
}

fn summarize(
    timeline: TimelineId,
    mut names: Vec<WalFileName>,
    size: WalSegmentSize,
) -> TimelineSummary {
    names.sort();
    let segments: Vec<SegmentName> = names
        .iter()
        .filter_map(|name| match name {
            WalFileName::Segment(segment) => Some(*segment),
            _ => None,
        })
        .collect();
    let gaps = segments
        .windows(2)
        .filter_map(|pair| {
            let (before, after) = (pair[0].segment_number(size), pair[1].segment_number(size));
            (after > before + 1).then(|| Gap {
                first_missing: pair[0].next(size).to_string(),
                last_missing: SegmentName::from_segment_number(timeline, after - 1, size)
                    .to_string(),
                missing_segments: after - before - 1,
            })
        })
        .collect();
    TimelineSummary {
        timeline: timeline.0,
        has_history: names
            .iter()
            .any(|name| matches!(name, WalFileName::History(_))),
        first_segment: segments.first().map(ToString::to_string),
        last_segment: segments.last().map(ToString::to_string),
        segments: segments.len() as u64,
        partial: names
            .iter()
            .filter(|name| matches!(name, WalFileName::Partial(_)))
            .map(ToString::to_string)
            .collect(),
        backup_labels: names
            .iter()
            .filter(|name| matches!(name, WalFileName::Backup { .. }))
            .map(ToString::to_string)
            .collect(),
        gaps,
    }
}

pub fn print_table(listing: &WalListing) {
    println!(
        "repository {} (system {}, {} MiB segments)",
        listing.repository,
        listing.system_identifier,
        listing.wal_segment_size >> 20
    );
    println!(
        "{:<9} {:<25} {:<25} {:>9} {:>5}",
        "TIMELINE", "FIRST SEGMENT", "LAST SEGMENT", "SEGMENTS", "GAPS"
    );
    for timeline in &listing.timelines {
        println!(
            "{:<9} {:<25} {:<25} {:>9} {:>5}",
            format!("{:08X}", timeline.timeline),
            timeline.first_segment.as_deref().unwrap_or("-"),
            timeline.last_segment.as_deref().unwrap_or("-"),
            timeline.segments,
            timeline.gaps.len()
        );
    }
    for timeline in &listing.timelines {
        for gap in &timeline.gaps {
            println!(
                "gap on timeline {:08X}: {} to {} missing ({} segments)",
                timeline.timeline, gap.first_missing, gap.last_missing, gap.missing_segments
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_are_found_across_log_ids() {
        let size = WalSegmentSize(16 << 20);
        let names = [
            "0000000100000000000000FE",
            "000000010000000100000001",
            "000000010000000100000002",
            "00000001.history",
        ]
        .iter()
        .map(|name| name.parse().unwrap())
        .collect();
        let summary = summarize(TimelineId(1), names, size);
        assert_eq!(summary.segments, 3);
        assert_eq!(
            summary.gaps,
            vec![Gap {
                first_missing: "0000000100000000000000FF".into(),
                last_missing: "000000010000000100000000".into(),
                missing_segments: 2
            }]
        );
    }
}

/// One segment's summary, as `pitr wal show --output json` prints it.
#[derive(Debug, Serialize)]
pub struct ShownSegment {
    pub segment: String,
    pub summary: SegmentSummary,
}

pub async fn show_segment(settings: &Settings, segment: &str) -> Result<ShownSegment> {
    let name: SegmentName = segment.parse()?;
    let repository = Repository::open(settings)?;
    let identity = repository.require_identity().await?;
    let size = identity.segment_size();
    let index = ArchiveIndex::new(&repository, size, PgVersion(identity.pg_version));
    let next = name.next(size);
    let summary = index
        .summary(name, Some(next))
        .await?
        .with_context(|| format!("{segment} is not in the archive; see `pitr wal list`"))?;
    Ok(ShownSegment {
        segment: segment.to_string(),
        summary,
    })
}

pub fn print_segment(shown: &ShownSegment) {
    let summary = &shown.summary;
    let time = |time: PgTimestamp| time.to_utc().format("%Y-%m-%d %H:%M:%S%.6f+00").to_string();
    println!(
        "{}: {} records, {} transaction ends, scan ended at {:?}",
        shown.segment, summary.records, summary.transaction_ends, summary.end
    );
    for (label, end) in [
        ("first", summary.first_transaction_end),
        ("last", summary.last_transaction_end),
    ] {
        if let Some(end) = end {
            println!(
                "  {label} transaction end: xid {} {} at {} (LSN {})",
                end.xid,
                if end.committed {
                    "committed"
                } else {
                    "aborted"
                },
                time(end.time),
                end.lsn
            );
        }
    }
    if let Some(latest) = summary.latest_time {
        println!("  latest transaction end time: {}", time(latest));
    }
    for point in &summary.restore_points {
        println!(
            "  restore point '{}' at {} (LSN {})",
            point.name,
            time(point.time),
            point.lsn
        );
    }
}

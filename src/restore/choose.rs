//! Phase 1 of a restore: choose the backup. The newest that ends before the target (by time or
//! LSN), the one `--backup` names, or, for a restore point or a transaction, the newest from
//! which recovery meets the target only once the backup is consistent (which reads the
//! commit-timestamp index along the backup's timeline path).

use anyhow::{Context, Result, bail};

use super::RestoreOptions;
use super::plan::{ArchiveView, timeline_path};
use super::reach::{ArchiveIndex, XidReach};
use super::target::{self, RecoveryTarget};
use crate::backup::Manifest;
use crate::wal::{Lsn, WalSegmentSize};

/// The backup this restore starts from; `backups` is the catalog, oldest first.
pub(super) async fn backup_for<'a>(
    backups: &'a [Manifest],
    options: &RestoreOptions,
    archive: &ArchiveView,
    index: &ArchiveIndex<'_>,
    size: WalSegmentSize,
) -> Result<&'a Manifest> {
    match (&options.target, &options.backup) {
        (RecoveryTarget::Name(name), None) => {
            backup_before_restore_point(backups, name, archive, options, index, size).await
        }
        (RecoveryTarget::Xid(xid), None) => {
            let xid = target::xid_of(xid)?;
            backup_reaching_xid(backups, xid, archive, options, index, size).await
        }
        _ => choose_backup(backups, options),
    }
}

/// The line that tells the user which backup was chosen, and why.
pub(super) fn announcement(
    backup: &Manifest,
    options: &RestoreOptions,
    backups: &[Manifest],
) -> String {
    match &options.backup {
        Some(_) => format!(
            "restoring to {} from backup {} as chosen with --backup (consistent at LSN {}, timeline {})",
            options.target, backup.id, backup.stop_lsn, backup.timeline.0
        ),
        None => explain_choice(backup, &options.target, backups),
    }
}

fn choose_backup<'a>(backups: &'a [Manifest], options: &RestoreOptions) -> Result<&'a Manifest> {
    if backups.is_empty() {
        bail!("the repository holds no backups yet; take one with `pitr backup`");
    }
    if let Some(id) = &options.backup {
        return backups
            .iter()
            .find(|backup| &backup.id == id)
            .with_context(|| format!("there is no backup {id}; `pitr list` shows the backups"));
    }
    let eligible: Vec<&Manifest> = match &options.target {
        RecoveryTarget::Time(time) => backups
            .iter()
            .filter(|backup| backup.stop_time <= time.with_timezone(&chrono::Utc))
            .collect(),
        RecoveryTarget::Lsn(lsn) => backups
            .iter()
            .filter(|backup| backup.stop_lsn <= *lsn)
            .collect(),
        _ => backups.iter().collect(),
    };
    eligible.last().copied().with_context(|| {
        let earliest = &backups[0];
        format!(
            "{} is before the end of the earliest backup ({}, consistent at {} / LSN {}), so no backup can reach it",
            options.target,
            earliest.id,
            earliest.stop_time.format("%Y-%m-%d %H:%M:%S%.6f+00"),
            earliest.stop_lsn
        )
    })
}

/// For `--target-name` without `--backup`: the newest backup from which recovery meets a
/// restore point of that name only once consistent. Recovery stops at the first such point
/// after the backup's start, so a backup that ends after it cannot serve. If none qualifies, the
/// newest backup is returned and `last_segment_needed` explains why it cannot reach the point.
async fn backup_before_restore_point<'a>(
    backups: &'a [Manifest],
    name: &str,
    archive: &ArchiveView,
    options: &RestoreOptions,
    index: &ArchiveIndex<'_>,
    size: WalSegmentSize,
) -> Result<&'a Manifest> {
    for backup in backups.iter().rev() {
        let Ok(path) = timeline_path(backup, archive, options.timeline) else {
            continue;
        };
        let segments =
            archive.segments_on_path(&path, backup.start_lsn.0 / u64::from(size.0), size);
        if let Some((_, point)) = index.first_restore_point_named(&segments, name).await?
            && point.lsn >= backup.stop_lsn
        {
            return Ok(backup);
        }
    }
    choose_backup(backups, options)
}

/// For `--target-xid` without `--backup`: the newest backup after whose start transaction
/// `xid` ends, and not before the segment where the backup becomes consistent (recovery that
/// stops before then fails). If none qualifies, the newest backup is returned and
/// `last_segment_needed` explains why it cannot reach the transaction.
async fn backup_reaching_xid<'a>(
    backups: &'a [Manifest],
    xid: u32,
    archive: &ArchiveView,
    options: &RestoreOptions,
    index: &ArchiveIndex<'_>,
    size: WalSegmentSize,
) -> Result<&'a Manifest> {
    for backup in backups.iter().rev() {
        let Ok(path) = timeline_path(backup, archive, options.timeline) else {
            continue;
        };
        let segment_of = |lsn: Lsn| lsn.0 / u64::from(size.0);
        let segments = archive.segments_on_path(&path, segment_of(backup.start_lsn), size);
        match index.segment_ending_xid(&segments, xid).await? {
            XidReach::StopsIn(segment)
                if segment.segment_number(size) >= segment_of(backup.stop_lsn) =>
            {
                return Ok(backup);
            }
            XidReach::Unknown => return Ok(backup),
            XidReach::StopsIn(_) | XidReach::NotFound => {}
        }
    }
    choose_backup(backups, options)
}

fn explain_choice(backup: &Manifest, target: &RecoveryTarget, backups: &[Manifest]) -> String {
    format!(
        "restoring to {target} from backup {} (consistent at {} / LSN {}, timeline {}): the newest of {} backup(s) that ends before the target",
        backup.id,
        backup.stop_time.format("%Y-%m-%d %H:%M:%S+00"),
        backup.stop_lsn,
        backup.timeline.0,
        backups.len()
    )
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{manifest, options};
    use super::*;
    use crate::backup::BackupId;

    fn catalog() -> Vec<Manifest> {
        vec![
            manifest(
                "20260101T000000Z",
                0x1000028,
                0x1000100,
                "2026-01-01T00:01:00Z",
            ),
            manifest(
                "20260102T000000Z",
                0x3000028,
                0x3000100,
                "2026-01-02T00:01:00Z",
            ),
            manifest(
                "20260103T000000Z",
                0x5000028,
                0x5000100,
                "2026-01-03T00:01:00Z",
            ),
        ]
    }

    fn chosen(backups: &[Manifest], target: RecoveryTarget) -> Result<String> {
        choose_backup(backups, &options(target)).map(|backup| backup.id.0.clone())
    }

    fn time(text: &str) -> RecoveryTarget {
        RecoveryTarget::Time(target::parse_time(text).unwrap())
    }

    #[test]
    fn the_newest_backup_that_ends_before_a_time_or_lsn_is_chosen() {
        let backups = catalog();
        assert_eq!(
            chosen(&backups, time("2026-01-02 12:00:00+00")).unwrap(),
            "20260102T000000Z"
        );
        // A backup that ends exactly at the target can reach it.
        assert_eq!(
            chosen(&backups, time("2026-01-03 00:01:00+00")).unwrap(),
            "20260103T000000Z"
        );
        assert_eq!(
            chosen(&backups, RecoveryTarget::Lsn(Lsn(0x30000ff))).unwrap(),
            "20260101T000000Z"
        );
        assert_eq!(
            chosen(&backups, RecoveryTarget::Lsn(Lsn(0x3000100))).unwrap(),
            "20260102T000000Z"
        );
    }

    #[test]
    fn without_a_time_or_lsn_the_newest_backup_is_chosen() {
        let backups = catalog();
        for target in [
            RecoveryTarget::EndOfArchive,
            RecoveryTarget::Immediate,
            RecoveryTarget::Name("before upgrade".into()),
            RecoveryTarget::Xid("7421".into()),
        ] {
            assert_eq!(chosen(&backups, target).unwrap(), "20260103T000000Z");
        }
    }

    #[test]
    fn a_target_before_every_backup_is_refused_naming_the_earliest() {
        let error = chosen(&catalog(), time("2025-12-31 23:00:00+00")).unwrap_err();
        assert_eq!(
            error.to_string(),
            "time 2025-12-31 23:00:00.000000+00:00 is before the end of the earliest backup (20260101T000000Z, consistent at 2026-01-01 00:01:00.000000+00 / LSN 0/1000100), so no backup can reach it"
        );
    }

    #[test]
    fn an_empty_repository_is_refused() {
        let error = chosen(&[], RecoveryTarget::EndOfArchive).unwrap_err();
        assert_eq!(
            error.to_string(),
            "the repository holds no backups yet; take one with `pitr backup`"
        );
    }

    #[test]
    fn backup_chooses_by_id_whatever_the_target() {
        let backups = catalog();
        let mut asked = options(time("2026-01-03 12:00:00+00"));
        asked.backup = Some(BackupId("20260101T000000Z".into()));
        let backup = choose_backup(&backups, &asked).unwrap();
        assert_eq!(backup.id.0, "20260101T000000Z");
        assert_eq!(
            announcement(backup, &asked, &backups),
            "restoring to time 2026-01-03 12:00:00.000000+00:00 from backup 20260101T000000Z as chosen with --backup (consistent at LSN 0/1000100, timeline 1)"
        );
        asked.backup = Some(BackupId("20250101T000000Z".into()));
        assert_eq!(
            choose_backup(&backups, &asked).unwrap_err().to_string(),
            "there is no backup 20250101T000000Z; `pitr list` shows the backups"
        );
    }

    #[test]
    fn the_announcement_says_why_the_backup_was_chosen() {
        let backups = catalog();
        let asked = options(RecoveryTarget::EndOfArchive);
        let backup = choose_backup(&backups, &asked).unwrap();
        assert_eq!(
            announcement(backup, &asked, &backups),
            "restoring to the end of the archive from backup 20260103T000000Z (consistent at 2026-01-03 00:01:00+00 / LSN 0/5000100, timeline 1): the newest of 3 backup(s) that ends before the target"
        );
    }
}

//! Phase 4 of a restore: write what tells Postgres to recover, and from where. `backup_label`,
//! `recovery.signal`, and a block of recovery settings in `postgresql.auto.conf` (replacing
//! any earlier restore's, and dropping recovery settings a backup of a restored cluster carried
//! along): restore_command (this pitr, pointed at the restored cluster's own data directory and
//! socket), the target timeline, action and target, and what the target needs besides.

use std::path::Path;

use anyhow::Result;

use super::target::RecoveryTarget;
use super::{RestoreOptions, tablespaces};
use crate::backup::Manifest;
use crate::backup::take::permissions;
use crate::config::Settings;
use crate::wal::TimelineId;

/// What tells Postgres to recover, and from where: `backup_label` (the checkpoint of
/// pg_backup_start, not the one pg_control recorded while the files were being copied) and the
/// recovery settings. The tablespace links are already in place (or the tablespaces are
/// in-place directories), so no tablespace_map.
pub(super) fn write_startup_files(
    pgdata: &Path,
    settings: &Settings,
    options: &RestoreOptions,
    backup: &Manifest,
    timeline: TimelineId,
) -> Result<()> {
    std::fs::write(pgdata.join("backup_label"), &backup.backup_label)?;
    std::fs::set_permissions(pgdata.join("backup_label"), permissions(0o600))?;
    write_recovery_settings(pgdata, settings, options, backup, timeline)
}

fn write_recovery_settings(
    pgdata: &Path,
    settings: &Settings,
    options: &RestoreOptions,
    backup: &Manifest,
    timeline: TimelineId,
) -> Result<()> {
    let executable = std::env::current_exe()?;
    let command = RestoreCommand {
        executable: &executable,
        config_file: options.config_file.as_deref(),
        pgdata,
        repo: settings.repo.as_deref(),
        key_file: settings.key_file.as_deref(),
    }
    .text()?;
    let text = settings_block(recovery_settings(command, options, backup, timeline));
    let auto_conf = pgdata.join("postgresql.auto.conf");
    let existing = std::fs::read_to_string(&auto_conf).unwrap_or_default();
    std::fs::write(
        &auto_conf,
        format!("{}{text}", without_recovery_settings(&existing)),
    )?;
    std::fs::write(pgdata.join("recovery.signal"), "")?;
    Ok(())
}

/// What the restored cluster's restore_command runs: this pitr, with what it needs to find the
/// repository, pointed at the restored cluster and never at the one the configuration names.
struct RestoreCommand<'a> {
    executable: &'a Path,
    /// The config file the restore was given, if any.
    config_file: Option<&'a Path>,
    pgdata: &'a Path,
    repo: Option<&'a str>,
    key_file: Option<&'a Path>,
}

impl RestoreCommand<'_> {
    /// The command line, each word quoted for the shell Postgres runs it with.
    fn text(&self) -> Result<String> {
        let mut command = shell_quote(&self.executable.display().to_string());
        let mut flag = |name: &str, value: String| {
            command.push_str(&format!(" --{name} {}", shell_quote(&value)));
        };
        if let Some(config) = self.config_file {
            flag("config", std::path::absolute(config)?.display().to_string());
        }
        // The restored cluster's own data directory and socket: never those of the cluster the
        // configuration (or an inherited PITR_SOCKET) names, which may be production.
        flag("pgdata", self.pgdata.display().to_string());
        flag(
            "socket",
            self.pgdata.join("pitr.sock").display().to_string(),
        );
        if let Some(repo) = self.repo {
            flag("repo", repo.to_string());
        }
        if let Some(key_file) = self.key_file {
            flag(
                "key-file",
                std::path::absolute(key_file)?.display().to_string(),
            );
        }
        command.push_str(" archive-get %f %p");
        Ok(command)
    }
}

/// The recovery settings, in the order they are written.
fn recovery_settings(
    restore_command: String,
    options: &RestoreOptions,
    backup: &Manifest,
    timeline: TimelineId,
) -> Vec<(String, String)> {
    let mut lines = vec![
        ("restore_command".to_string(), restore_command),
        (
            "recovery_target_timeline".to_string(),
            timeline.0.to_string(),
        ),
        (
            "recovery_target_action".to_string(),
            options.action.setting().to_string(),
        ),
    ];
    lines.extend(options.target.settings());
    // From PostgreSQL 15 on, recovery refuses directories in pg_tblspc unless told that
    // in-place tablespaces are intended.
    if options.tablespaces.in_place
        && !tablespaces::tablespaces_of(backup).is_empty()
        && backup.pg_version >= 15
    {
        lines.push(("allow_in_place_tablespaces".to_string(), "on".to_string()));
    }
    if !matches!(
        options.target,
        RecoveryTarget::EndOfArchive | RecoveryTarget::Immediate
    ) {
        lines.push((
            "recovery_target_inclusive".to_string(),
            options.inclusive.to_string(),
        ));
    }
    lines
}

/// The settings as the block pitr owns in postgresql.auto.conf, each value quoted.
fn settings_block(lines: Vec<(String, String)>) -> String {
    let mut text = String::from(RESTORE_BLOCK_BEGIN);
    text.push('\n');
    for (key, value) in lines {
        text.push_str(&format!("{key} = '{}'\n", value.replace('\'', "''")));
    }
    text.push_str(RESTORE_BLOCK_END);
    text.push('\n');
    text
}

const RESTORE_BLOCK_BEGIN: &str = "# pitr restore settings: rewritten by every pitr restore";
const RESTORE_BLOCK_END: &str = "# end of pitr restore settings";

/// postgresql.auto.conf without recovery settings from an earlier restore or ALTER SYSTEM:
/// left in place they would apply to this restore (or conflict with its target), because a
/// backup of a restored cluster carries them along.
fn without_recovery_settings(text: &str) -> String {
    let mut kept = String::new();
    let mut inside_block = false;
    for line in text.lines() {
        let key = line.split('=').next().unwrap_or_default().trim();
        if line.starts_with(RESTORE_BLOCK_BEGIN) {
            inside_block = true;
        } else if line.starts_with(RESTORE_BLOCK_END) {
            inside_block = false;
        } else if !inside_block && !key.starts_with("recovery_target") && key != "restore_command" {
            kept.push_str(line);
            kept.push('\n');
        }
    }
    kept
}

/// Quotes a word for the shell Postgres runs restore_command with.
fn shell_quote(word: &str) -> String {
    if !word.is_empty()
        && word
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || b"/._-:=+@,".contains(&byte))
    {
        return word.to_string();
    }
    format!("'{}'", word.replace('\'', "'\\''"))
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{manifest, options};
    use super::super::{TargetAction, target};
    use super::*;
    use crate::wal::Lsn;

    fn settings_for(target: RecoveryTarget, action: TargetAction) -> Vec<(String, String)> {
        let mut asked = options(target);
        asked.action = action;
        let backup = manifest("b", 0x2000028, 0x2000100, "2026-01-01T00:00:00Z");
        recovery_settings(
            "pitr archive-get %f %p".into(),
            &asked,
            &backup,
            TimelineId(3),
        )
    }

    fn pairs(expected: &[(&str, &str)]) -> Vec<(String, String)> {
        expected
            .iter()
            .map(|(key, value)| (key.to_string(), value.to_string()))
            .collect()
    }

    #[test]
    fn each_target_kind_becomes_its_recovery_settings() {
        let common = [
            ("restore_command", "pitr archive-get %f %p"),
            ("recovery_target_timeline", "3"),
            ("recovery_target_action", "pause"),
        ];
        let with = |extra: &[(&str, &str)]| {
            let mut all = common.to_vec();
            all.extend_from_slice(extra);
            pairs(&all)
        };
        let cases = [
            (RecoveryTarget::EndOfArchive, with(&[])),
            (
                RecoveryTarget::Immediate,
                with(&[("recovery_target", "immediate")]),
            ),
            (
                RecoveryTarget::Time(target::parse_time("2026-01-02 03:04:05.5+02").unwrap()),
                with(&[
                    ("recovery_target_time", "2026-01-02 03:04:05.500000+02:00"),
                    ("recovery_target_inclusive", "true"),
                ]),
            ),
            (
                RecoveryTarget::Lsn(Lsn(0x5000060)),
                with(&[
                    ("recovery_target_lsn", "0/5000060"),
                    ("recovery_target_inclusive", "true"),
                ]),
            ),
            (
                RecoveryTarget::Xid("7421".into()),
                with(&[
                    ("recovery_target_xid", "7421"),
                    ("recovery_target_inclusive", "true"),
                ]),
            ),
            (
                RecoveryTarget::Name("before upgrade".into()),
                with(&[
                    ("recovery_target_name", "before upgrade"),
                    ("recovery_target_inclusive", "true"),
                ]),
            ),
        ];
        for (target, expected) in cases {
            assert_eq!(
                settings_for(target.clone(), TargetAction::Pause),
                expected,
                "{target}"
            );
        }
    }

    #[test]
    fn each_action_and_exclusive_targets_are_written_as_asked() {
        for (action, setting) in [
            (TargetAction::Promote, "promote"),
            (TargetAction::Pause, "pause"),
            (TargetAction::Shutdown, "shutdown"),
        ] {
            let lines = settings_for(RecoveryTarget::EndOfArchive, action);
            assert_eq!(
                lines[2],
                ("recovery_target_action".to_string(), setting.to_string())
            );
        }
        let mut asked = options(RecoveryTarget::Lsn(Lsn(0x5000060)));
        asked.inclusive = false;
        let backup = manifest("b", 0x2000028, 0x2000100, "2026-01-01T00:00:00Z");
        let lines = recovery_settings("c".into(), &asked, &backup, TimelineId(1));
        assert_eq!(
            lines.last().unwrap(),
            &("recovery_target_inclusive".to_string(), "false".to_string())
        );
    }

    #[test]
    fn the_block_quotes_each_value() {
        let block = settings_block(pairs(&[
            ("recovery_target_name", "it's here"),
            ("recovery_target_timeline", "2"),
        ]));
        assert_eq!(
            block,
            "# pitr restore settings: rewritten by every pitr restore\n\
             recovery_target_name = 'it''s here'\n\
             recovery_target_timeline = '2'\n\
             # end of pitr restore settings\n"
        );
    }

    #[test]
    fn restore_command_points_at_the_restored_cluster() {
        let command = RestoreCommand {
            executable: Path::new("/usr/local/bin/pitr"),
            config_file: Some(Path::new("/etc/pitr/pitr.toml")),
            pgdata: Path::new("/srv/restored data"),
            repo: Some("s3://bucket/cluster?region=eu-west-1"),
            key_file: Some(Path::new("/etc/pitr/keyring")),
        };
        assert_eq!(
            command.text().unwrap(),
            "/usr/local/bin/pitr --config /etc/pitr/pitr.toml --pgdata '/srv/restored data' --socket '/srv/restored data/pitr.sock' --repo 's3://bucket/cluster?region=eu-west-1' --key-file /etc/pitr/keyring archive-get %f %p"
        );
        let bare = RestoreCommand {
            config_file: None,
            repo: None,
            key_file: None,
            pgdata: Path::new("/srv/data"),
            ..command
        };
        assert_eq!(
            bare.text().unwrap(),
            "/usr/local/bin/pitr --pgdata /srv/data --socket /srv/data/pitr.sock archive-get %f %p"
        );
    }

    #[test]
    fn earlier_recovery_settings_are_dropped_and_the_rest_kept() {
        let existing = "# Do not edit this file manually!\n\
             shared_buffers = '1GB'\n\
             restore_command = 'cp /old/%f %p'\n\
             recovery_target_time = '2020-01-01 00:00:00+00'\n\
             # pitr restore settings: rewritten by every pitr restore\n\
             restore_command = 'pitr archive-get %f %p'\n\
             primary_conninfo = 'inside the block'\n\
             # end of pitr restore settings\n\
             work_mem = '64MB'\n";
        assert_eq!(
            without_recovery_settings(existing),
            "# Do not edit this file manually!\n\
             shared_buffers = '1GB'\n\
             work_mem = '64MB'\n"
        );
        assert_eq!(without_recovery_settings(""), "");
    }

    #[test]
    fn shell_quote_leaves_plain_words_and_quotes_the_rest() {
        assert_eq!(shell_quote("/usr/bin/pitr"), "/usr/bin/pitr");
        assert_eq!(shell_quote("a-b_c.d:e=f+g@h,i"), "a-b_c.d:e=f+g@h,i");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("with space"), "'with space'");
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
        assert_eq!(shell_quote("$HOME;rm"), "'$HOME;rm'");
    }
}

//! The `pitr` command line: parses arguments, resolves settings, runs one command and maps the
//! outcome to an exit code Postgres understands. Hooks never exit above 125 on an error, because
//! Postgres treats that as fatal for the archiver or the recovery.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use pitr::commands::{archive_get, archive_push, keygen, wal_list};
use pitr::config::{GlobalOptions, LogFormat, Settings};

const EXAMPLES: &str = "\
Examples:
  # once: create a keyring (keep a copy somewhere safe)
  pitr keygen --output /etc/pitr/keyring

  # postgresql.conf
  archive_mode = on
  archive_command = 'pitr archive-push %p'
  restore_command = 'pitr archive-get %f %p'

  # environment of the postgres server (or a --config file)
  PITR_REPO=s3://my-bucket/clusters/main PITR_KEY_FILE=/etc/pitr/keyring

  # what is archived, and any gaps
  pitr wal list --output json";

#[derive(Parser)]
#[command(name = "pitr", version, about = "PostgreSQL WAL archiving and point-in-time recovery on object storage", after_help = EXAMPLES)]
struct Cli {
    #[command(flatten)]
    global: GlobalOptions,
    #[command(subcommand)]
    command: Command,
}

// Parsed once per process; boxing the large restore variant would only cost clarity.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Archive one WAL file: archive_command = 'pitr archive-push %p'. Exit 0 only once durable.
    #[command(
        after_help = "Examples:\n  archive_command = 'pitr archive-push %p'\n  pitr archive-push pg_wal/000000010000000000000003\n  pitr archive-push --force /srv/salvaged/000000010000000000000003   # recovery work by hand\n\nA file is archived only once Postgres has marked it pg_wal/archive_status/<name>.ready (or .done): a segment still being written must never take the name of the finished one. --force skips that check, nothing else.\n\nExit codes: 0 archived (or already archived with identical content); 1 refused or failed, Postgres keeps the file and retries."
    )]
    ArchivePush {
        /// The file to archive (%p), relative to the data directory or absolute.
        path: PathBuf,
        /// Archive the file even though Postgres has not marked it ready (archive_status/<name>.ready), or it is outside pg_wal: for recovery work by hand, never in archive_command.
        #[arg(long)]
        force: bool,
    },
    /// Restore one WAL file: restore_command = 'pitr archive-get %f %p'.
    #[command(
        after_help = "Examples:\n  restore_command = 'pitr archive-get %f %p'\n  pitr archive-get 000000010000000000000003 /tmp/seg\n\nExit codes: 0 restored and verified; 1 not in the archive (quietly) or failed (with a message); nothing is left at the destination unless it is complete and verified."
    )]
    ArchiveGet {
        /// The WAL file name to restore (%f).
        wal_file: String,
        /// Where to write it (%p).
        destination: PathBuf,
    },
    /// Create a keyring file holding one new random 256-bit key (mode 0600).
    #[command(
        after_help = "Example:\n  pitr keygen --output /etc/pitr/keyring\n  export PITR_KEY_FILE=/etc/pitr/keyring"
    )]
    Keygen {
        /// The keyring file to create; an existing file is never overwritten.
        #[arg(long, short)]
        output: PathBuf,
    },
    /// Run the sidecar: archive ahead in parallel, prefetch during recovery, serve the HTTP API.
    #[command(
        after_help = "Examples:\n  pitr daemon --pgdata /var/lib/postgresql/data\n  PITR_ARCHIVE_CONCURRENCY=4 PITR_HTTP_ADDR=127.0.0.1:9851 pitr daemon --pgdata $PGDATA\n  curl -s localhost:9851/status | jq .archive\n\nThe hooks find the daemon through PITR_SOCKET (default <pgdata>/pitr.sock) and fall back to doing the work themselves when it is not running."
    )]
    Daemon,
    /// Take an online base backup of the running cluster.
    #[command(
        after_help = "Examples:\n  PGHOST=/var/run/postgresql pitr backup --pgdata /var/lib/postgresql/15/main\n  pitr backup --pgdata $PGDATA --pg-url 'host=localhost user=postgres' --label nightly\n\nOnly chunks the repository does not hold yet are uploaded, so later backups send only what changed. Page checksums are verified when the cluster has them enabled."
    )]
    Backup {
        /// A label recorded in the backup.
        #[arg(long)]
        label: Option<String>,
        /// Keep the backup even if page checksum verification finds corrupt pages.
        #[arg(long)]
        ignore_checksum_failures: bool,
        /// Parallel file readers and uploads [default: the CPU count].
        #[arg(long, env = "PITR_BACKUP_CONCURRENCY")]
        concurrency: Option<usize>,
        /// `json` prints the backup's record, as `pitr list --output json` lists it.
        #[arg(long, value_enum, default_value_t = OutputFormat::Table)]
        output: OutputFormat,
    },
    /// Restore a data directory to a point in time.
    #[command(
        after_help = "Examples:\n  pitr restore --pgdata /srv/pg/restored --target-time '2026-11-20 14:30:00+00' --start\n  pitr restore --pgdata /srv/pg/restored --target-lsn 0/5000028\n  pitr restore --pgdata /srv/pg/restored --target-name before_migration --target-action pause\n  pitr restore --pgdata /srv/pg/main --delta                   # to the end of the archive, reusing matching files\n  pitr restore --pgdata /srv/pg/copy --tablespace-map 16384=/srv/pg/copy_ts   # move a tablespace\n\nThe newest backup that ended before the target is chosen, and the archive is checked for every WAL segment needed before anything is downloaded."
    )]
    Restore {
        /// Stop at this time; ISO 8601 or Postgres syntax, with a zone.
        #[arg(long, group = "recovery_target")]
        target_time: Option<String>,
        /// Stop at this LSN.
        #[arg(long, group = "recovery_target")]
        target_lsn: Option<String>,
        /// Stop at this transaction id.
        #[arg(long, group = "recovery_target")]
        target_xid: Option<String>,
        /// Stop at this restore point (pg_create_restore_point).
        #[arg(long, group = "recovery_target")]
        target_name: Option<String>,
        /// `immediate`: stop at the earliest consistent point.
        #[arg(long, group = "recovery_target", value_parser = ["immediate"])]
        target: Option<String>,
        /// Stop just before the target instead of just after it.
        #[arg(long)]
        target_exclusive: bool,
        /// latest, current or a timeline number.
        #[arg(long, default_value = "latest")]
        target_timeline: String,
        /// What Postgres does at the target.
        #[arg(long, default_value = "promote", value_parser = ["promote", "pause", "shutdown"])]
        target_action: String,
        /// Restore this backup instead of choosing one.
        #[arg(long)]
        backup: Option<String>,
        /// Restore over an existing directory, keeping files whose checksums match.
        #[arg(long)]
        delta: bool,
        /// Put tablespace OID in DIR instead of its original location (repeatable).
        #[arg(long, value_name = "OID=DIR")]
        tablespace_map: Vec<String>,
        /// Keep every tablespace as a directory inside the data directory (in-place).
        #[arg(long, conflicts_with = "tablespace_map")]
        tablespace_in_place: bool,
        /// Start Postgres and wait until it reaches the target.
        #[arg(long)]
        start: bool,
        /// Directory holding pg_ctl, for --start [default: /usr/lib/postgresql/<version>/bin].
        #[arg(long)]
        pg_bin: Option<PathBuf>,
        /// Parallel downloads [default: the CPU count].
        #[arg(long, env = "PITR_BACKUP_CONCURRENCY")]
        concurrency: Option<usize>,
    },
    /// List backups and the recoverable window.
    #[command(
        visible_alias = "info",
        after_help = "Examples:\n  pitr list\n  pitr info --output json"
    )]
    List {
        #[arg(long, value_enum, default_value_t = OutputFormat::Table)]
        output: OutputFormat,
    },
    /// Delete backups, WAL and chunks the retention policy no longer needs.
    #[command(
        after_help = "Examples:\n  pitr expire --retention-window 14d --dry-run\n  PITR_RETENTION_WINDOW=14d PITR_RETENTION_MIN_BACKUPS=2 pitr expire\n  pitr expire --retention-backups 7 --output json\n\nThe window keeps every instant of its span restorable: the newest backup that ended before it began, every later backup, and the WAL from that backup on, per timeline. Expire refuses to run without a policy, and while the window has a gap in its WAL (--allow-gap expires around it). History files are never deleted."
    )]
    Expire {
        /// List what would be deleted and the earliest recovery point after it; delete nothing.
        #[arg(long)]
        dry_run: bool,
        /// Expire even though the WAL of the window has a gap (what lies after it stays).
        #[arg(long)]
        allow_gap: bool,
        #[arg(long, value_enum, default_value_t = OutputFormat::Table)]
        output: OutputFormat,
    },
    /// Prove every backup restorable and every archived WAL file readable.
    #[command(
        after_help = "Examples:\n  pitr verify\n  pitr verify --full --output json | jq .problems\n\nEvery chunk a manifest names, every WAL object and index entry is authenticated (--decode: decoded in full), and each backup's WAL is checked from its start to the end of its timeline. What was proven intact is recorded in the repository and not read again until it changes, --full is given, or PITR_VERIFY_MAX_AGE (7d) has passed.\n\nExit codes: 0 no problem found; 1 a problem (each named on its own line) or a failure."
    )]
    Verify {
        /// Read everything again, whatever was verified before.
        #[arg(long)]
        full: bool,
        /// Also decompress every object and check its plaintext checksum, as a restore does (authentication alone already proves every stored byte).
        #[arg(long)]
        decode: bool,
        #[arg(long, value_enum, default_value_t = OutputFormat::Table)]
        output: OutputFormat,
    },
    /// Check the whole chain on the live cluster: configuration, keyring, repository, the store's writes, the clock, and a real archive round trip.
    #[command(
        after_help = "Examples:\n  pitr check\n  pitr check --output json\n\nOne line per check, in order; the first that fails ends the run. The last check runs pg_switch_wal() and waits until that segment is archived into the repository and reads back verified.\n\nExit codes: 0 every check passed; 1 one failed (named on the last line)."
    )]
    Check {
        /// How long to wait for the switched segment to be archived, in seconds.
        #[arg(long, default_value_t = 60)]
        archive_wait: u64,
        #[arg(long, value_enum, default_value_t = OutputFormat::Table)]
        output: OutputFormat,
    },
    /// Internal: fill the prefetch spool after a segment (started by archive-get).
    #[command(hide = true)]
    PrefetchWorker { segment: String },
    /// Inspect the WAL archive.
    Wal {
        #[command(subcommand)]
        command: WalCommand,
    },
}

#[derive(Subcommand)]
enum WalCommand {
    /// List archived WAL per timeline, with the gaps between segments.
    #[command(
        after_help = "Examples:\n  pitr wal list\n  pitr wal list --output json | jq '.timelines[].gaps'"
    )]
    List {
        #[arg(long, value_enum, default_value_t = OutputFormat::Table)]
        output: OutputFormat,
    },
    /// Show what one archived segment holds for recovery targets: its transaction ends (commit
    /// and abort times) and restore points, from the commit-timestamp index.
    #[command(
        after_help = "Examples:\n  pitr wal show 000000010000000000000042\n  pitr wal show 000000010000000000000042 --output json | jq .summary.latest_time"
    )]
    Show {
        /// The segment's file name.
        segment: String,
        #[arg(long, value_enum, default_value_t = OutputFormat::Table)]
        output: OutputFormat,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum OutputFormat {
    Table,
    Json,
}

fn main() -> ExitCode {
    // Everything pitr creates is its user's alone: repository objects and directories on
    // file:// (which object_store creates with the default mode), spools, restored files.
    // Where a file needs another mode (a restored file's own, a keyring), it is set explicitly.
    // SAFETY: umask only swaps the process's file creation mask; no other thread runs yet.
    unsafe { libc::umask(0o077) };
    let cli = Cli::parse();
    let hook = matches!(
        cli.command,
        Command::ArchivePush { .. } | Command::ArchiveGet { .. }
    );
    let settings = match Settings::resolve(&cli.global) {
        Ok(settings) => settings,
        Err(error) => return fail(&cli.command, &anyhow::Error::new(error)),
    };
    init_logging(&settings, hook);
    // A hook is one request and runs once per WAL segment, so its start-up is on Postgres's
    // critical path: one thread, not a pool to spawn (its CPU work goes to spawn_blocking).
    let mut runtime = if hook {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(2);
        builder
    };
    let runtime = runtime
        .enable_all()
        .build()
        .expect("the tokio runtime starts");
    match runtime.block_on(run(&cli.command, &settings, cli.global.config.as_ref())) {
        Ok(code) => code,
        Err(error) => fail(&cli.command, &error),
    }
}

fn restore_options(
    command: &Command,
    settings: &Settings,
    config_file: Option<&PathBuf>,
) -> anyhow::Result<pitr::restore::RestoreOptions> {
    use pitr::restore::target::{RecoveryTarget, parse_time};
    use pitr::restore::{TargetAction, TargetTimeline};
    let Command::Restore {
        target_time,
        target_lsn,
        target_xid,
        target_name,
        target,
        target_exclusive,
        target_timeline,
        target_action,
        backup,
        delta,
        tablespace_map,
        tablespace_in_place,
        start,
        pg_bin,
        concurrency,
    } = command
    else {
        unreachable!("called for restore only")
    };
    let recovery_target = if let Some(time) = target_time {
        RecoveryTarget::Time(parse_time(time)?)
    } else if let Some(lsn) = target_lsn {
        RecoveryTarget::Lsn(lsn.parse()?)
    } else if let Some(xid) = target_xid {
        pitr::restore::target::xid_of(xid)?;
        RecoveryTarget::Xid(xid.clone())
    } else if let Some(name) = target_name {
        RecoveryTarget::Name(name.clone())
    } else if target.is_some() {
        RecoveryTarget::Immediate
    } else {
        RecoveryTarget::EndOfArchive
    };
    let timeline = match target_timeline.as_str() {
        "latest" => TargetTimeline::Latest,
        "current" => TargetTimeline::Current,
        number => TargetTimeline::Id(pitr::wal::TimelineId(number.parse().map_err(|_| {
            anyhow::anyhow!("--target-timeline '{number}' is not valid: use latest, current or a timeline number")
        })?)),
    };
    let action = match target_action.as_str() {
        "pause" => TargetAction::Pause,
        "shutdown" => TargetAction::Shutdown,
        _ => TargetAction::Promote,
    };
    let mut tablespaces = pitr::restore::tablespaces::TablespacePlacement {
        in_place: *tablespace_in_place,
        ..Default::default()
    };
    for mapping in tablespace_map {
        let (oid, directory) = pitr::restore::tablespaces::parse_mapping(mapping)?;
        tablespaces.remapped.insert(oid, directory);
    }
    Ok(pitr::restore::RestoreOptions {
        target: recovery_target,
        tablespaces,
        inclusive: !target_exclusive,
        timeline,
        action,
        backup: backup.clone().map(pitr::backup::BackupId),
        delta: *delta,
        start: *start,
        concurrency: concurrency.unwrap_or(settings.archive_concurrency),
        config_file: config_file.cloned(),
        pg_bin: pg_bin.clone(),
    })
}

async fn run(
    command: &Command,
    settings: &Settings,
    config_file: Option<&PathBuf>,
) -> anyhow::Result<ExitCode> {
    match command {
        Command::ArchivePush { path, force } => {
            let outcome = archive_push::run(settings, path, *force).await?;
            tracing::debug!(?outcome, path = %path.display(), "archive-push done");
            Ok(ExitCode::SUCCESS)
        }
        Command::ArchiveGet {
            wal_file,
            destination,
        } => match archive_get::run(settings, wal_file, destination).await? {
            pitr::archive::get::GetOutcome::Restored => Ok(ExitCode::SUCCESS),
            pitr::archive::get::GetOutcome::NotFound => {
                tracing::debug!(wal_file, "not in the archive");
                Ok(ExitCode::from(1))
            }
        },
        Command::Backup {
            label,
            ignore_checksum_failures,
            concurrency,
            output,
        } => {
            let options = pitr::backup::take::BackupOptions {
                label: label.clone(),
                ignore_checksum_failures: *ignore_checksum_failures,
                concurrency: concurrency.unwrap_or(settings.archive_concurrency),
            };
            let manifest = pitr::backup::take::run(settings, &options).await?;
            if let OutputFormat::Json = output {
                let record = pitr::commands::list::BackupSummary::from(&manifest);
                println!("{}", serde_json::to_string_pretty(&record)?);
                return Ok(ExitCode::SUCCESS);
            }
            println!(
                "backup {} complete: {} MiB in {} files, {} MiB uploaded ({} new chunks, {} reused), LSN {} to {}, timeline {}",
                manifest.id,
                manifest.logical_bytes >> 20,
                manifest.files.len(),
                manifest.uploaded_bytes >> 20,
                manifest.new_chunks,
                manifest.reused_chunks,
                manifest.start_lsn,
                manifest.stop_lsn,
                manifest.timeline.0
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Restore { .. } => {
            let options = restore_options(command, settings, config_file)?;
            pitr::restore::run(settings, &options)
                .await
                .map(|_| ExitCode::SUCCESS)
        }
        Command::Expire {
            dry_run,
            allow_gap,
            output,
        } => {
            let repository = pitr::repository::Repository::open(settings)?;
            let options = pitr::expire::run::ExpireOptions {
                dry_run: *dry_run,
                allow_gap: *allow_gap,
            };
            let report = pitr::expire::run::run(
                &repository,
                &settings.retention,
                chrono::Utc::now(),
                options,
            )
            .await?;
            match output {
                OutputFormat::Table => {
                    for id in &report.plan.expired_backups {
                        println!("backup {id}");
                    }
                    if let Some(reason) = &report.chunks_skipped {
                        println!("{reason}");
                    }
                    println!("{}", pitr::expire::run::describe(&report));
                }
                OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&report)?),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Verify {
            full,
            decode,
            output,
        } => {
            let repository = pitr::repository::Repository::open(settings)?;
            let options = pitr::verify::VerifyOptions {
                full: *full,
                max_age: settings.verify_max_age,
                decode: *decode,
            };
            let report = pitr::verify::run(&repository, options).await?;
            match output {
                OutputFormat::Table => {
                    for problem in &report.problems {
                        let backup = problem
                            .backup
                            .as_ref()
                            .map_or_else(String::new, |backup| format!(" (backup {backup})"));
                        println!("problem: {}{backup}: {}", problem.object, problem.detail);
                    }
                    println!(
                        "verified {} backups: {} objects read ({} MiB), {} unchanged since verified, {} manifests; {} problems",
                        report.backups,
                        report.objects_read,
                        report.bytes_read >> 20,
                        report.objects_skipped,
                        report.manifests_read,
                        report.problems.len()
                    );
                }
                OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&report)?),
            }
            if report.problems.is_empty() {
                Ok(ExitCode::SUCCESS)
            } else {
                Ok(ExitCode::from(1))
            }
        }
        Command::Check {
            archive_wait,
            output,
        } => {
            let results =
                pitr::check::run(settings, std::time::Duration::from_secs(*archive_wait)).await;
            match output {
                OutputFormat::Table => {
                    for result in &results {
                        let status = if result.ok { "ok  " } else { "FAIL" };
                        println!("{status} {}: {}", result.check, result.detail);
                    }
                }
                OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&results)?),
            }
            if results.iter().all(|result| result.ok) {
                Ok(ExitCode::SUCCESS)
            } else {
                Ok(ExitCode::from(1))
            }
        }
        Command::List { output } => {
            let listing = pitr::commands::list::collect(settings).await?;
            match output {
                OutputFormat::Table => pitr::commands::list::print_table(&listing),
                OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&listing)?),
            }
            Ok(ExitCode::SUCCESS)
        }
        // The worker may end up a child of the postmaster (PID 1 in many containers), which treats
        // an unknown child's non-zero exit as a crash: so it always exits 0.
        Command::PrefetchWorker { segment } => {
            if let Err(error) = archive_get::prefetch_worker(settings, segment).await {
                tracing::debug!("prefetch worker: {error:#}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Daemon => pitr::daemon::run(settings.clone())
            .await
            .map(|_| ExitCode::SUCCESS),
        Command::Keygen { output } => keygen::run(output).map(|_| ExitCode::SUCCESS),
        Command::Wal {
            command: WalCommand::List { output },
        } => {
            let listing = wal_list::collect(settings).await?;
            match output {
                OutputFormat::Table => wal_list::print_table(&listing),
                OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&listing)?),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Wal {
            command: WalCommand::Show { segment, output },
        } => {
            let shown = wal_list::show_segment(settings, segment).await?;
            match output {
                OutputFormat::Table => wal_list::print_segment(&shown),
                OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&shown)?),
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// One line on stderr (Postgres copies it into its log) and exit 1, never above 125.
fn fail(command: &Command, error: &anyhow::Error) -> ExitCode {
    let name = match command {
        Command::ArchivePush { .. } => "archive-push",
        Command::ArchiveGet { .. } => "archive-get",
        Command::Keygen { .. } => "keygen",
        Command::Daemon => "daemon",
        Command::PrefetchWorker { .. } => "prefetch-worker",
        Command::Backup { .. } => "backup",
        Command::Restore { .. } => "restore",
        Command::List { .. } => "list",
        Command::Expire { .. } => "expire",
        Command::Verify { .. } => "verify",
        Command::Check { .. } => "check",
        Command::Wal {
            command: WalCommand::List { .. },
        } => "wal list",
        Command::Wal {
            command: WalCommand::Show { .. },
        } => "wal show",
    };
    eprintln!(
        "pitr {name}: error: {}",
        format!("{error:#}").replace('\n', " ")
    );
    ExitCode::from(1)
}

fn init_logging(settings: &Settings, hook: bool) {
    let default_level = if hook { "warn" } else { "info" };
    let filter = tracing_subscriber::EnvFilter::try_from_env("PITR_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    use std::io::IsTerminal;
    // Hooks log into the Postgres server log: colour codes there are noise.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match settings.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.with_target(false).init(),
    }
}

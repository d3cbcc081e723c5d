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

#[derive(Subcommand)]
enum Command {
    /// Archive one WAL file: archive_command = 'pitr archive-push %p'. Exit 0 only once durable.
    #[command(
        after_help = "Examples:\n  archive_command = 'pitr archive-push %p'\n  pitr archive-push pg_wal/000000010000000000000003\n\nExit codes: 0 archived (or already archived with identical content); 1 refused or failed, Postgres keeps the file and retries."
    )]
    ArchivePush {
        /// The file to archive (%p), relative to the data directory or absolute.
        path: PathBuf,
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
}

#[derive(Clone, Copy, ValueEnum)]
enum OutputFormat {
    Table,
    Json,
}

fn main() -> ExitCode {
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
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("the tokio runtime starts");
    match runtime.block_on(run(&cli.command, &settings)) {
        Ok(code) => code,
        Err(error) => fail(&cli.command, &error),
    }
}

async fn run(command: &Command, settings: &Settings) -> anyhow::Result<ExitCode> {
    match command {
        Command::ArchivePush { path } => {
            let outcome = archive_push::run(settings, path).await?;
            tracing::debug!(?outcome, path = %path.display(), "archive-push done");
            Ok(ExitCode::SUCCESS)
        }
        Command::ArchiveGet {
            wal_file,
            destination,
        } => match archive_get::run(settings, wal_file, destination).await? {
            archive_get::GetOutcome::Restored => Ok(ExitCode::SUCCESS),
            archive_get::GetOutcome::NotFound => {
                tracing::debug!(wal_file, "not in the archive");
                Ok(ExitCode::from(1))
            }
        },
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
    }
}

/// One line on stderr (Postgres copies it into its log) and exit 1, never above 125.
fn fail(command: &Command, error: &anyhow::Error) -> ExitCode {
    let name = match command {
        Command::ArchivePush { .. } => "archive-push",
        Command::ArchiveGet { .. } => "archive-get",
        Command::Keygen { .. } => "keygen",
        Command::Daemon => "daemon",
        Command::Wal { .. } => "wal list",
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
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match settings.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.with_target(false).init(),
    }
}

//! Settings: every option as a flag, a `PITR_*` environment variable and a TOML key.
//!
//! Precedence is flag, then environment, then the file named by `--config`/`PITR_CONFIG`, then
//! the built-in default. clap resolves the first two; this module merges in the file, validates
//! every value and produces one `Settings` that the commands read. A bad value stops the command
//! with a message naming the setting and what would be accepted.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The options shared by every command, declared once: clap reads them from flags and
/// `PITR_*` variables, serde from the TOML file (the same names, with underscores), and
/// `Settings::resolve` overlays the first on the second and validates the result. A scalar in
/// the file (a number, a boolean) is read as its text, so one parser checks each value
/// whichever way it came.
#[derive(Debug, Clone, Default, clap::Args, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct GlobalOptions {
    /// TOML configuration file; flags and PITR_* variables override its keys.
    #[arg(long, env = "PITR_CONFIG", global = true, value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Repository URL: file:///path, s3://bucket/prefix, gs://bucket/prefix, az://container/prefix.
    #[arg(long, env = "PITR_REPO", global = true, value_name = "URL")]
    #[serde(deserialize_with = "scalar_as_text")]
    pub repo: Option<String>,
    /// Keyring file from `pitr keygen`; without one, objects are compressed but not encrypted.
    #[arg(long, env = "PITR_KEY_FILE", global = true, value_name = "FILE")]
    pub key_file: Option<PathBuf>,
    /// zstd level, 1 (fastest) to 19 [default: 1].
    #[arg(
        long,
        env = "PITR_COMPRESSION_LEVEL",
        global = true,
        value_name = "LEVEL"
    )]
    #[serde(deserialize_with = "scalar_as_text")]
    pub compression_level: Option<String>,
    /// zstd worker threads per object; 0 compresses on one thread [default: the CPU count].
    #[arg(
        long,
        env = "PITR_COMPRESSION_THREADS",
        global = true,
        value_name = "N"
    )]
    #[serde(deserialize_with = "scalar_as_text")]
    pub compression_threads: Option<String>,
    /// PostgreSQL data directory [default: the current directory, where Postgres runs hooks].
    #[arg(long, env = "PITR_PGDATA", global = true, value_name = "DIR")]
    pub pgdata: Option<PathBuf>,
    /// Give up on an unreachable or stalled object store after this many seconds [default: 60].
    #[arg(
        long,
        env = "PITR_STORE_TIMEOUT",
        global = true,
        value_name = "SECONDS"
    )]
    #[serde(deserialize_with = "scalar_as_text")]
    pub store_timeout: Option<String>,
    /// Let an s3:// store without other credentials ask the cloud's instance metadata endpoint: on or off [default: on].
    #[arg(
        long,
        env = "PITR_STORE_INSTANCE_METADATA",
        global = true,
        value_name = "ON|OFF"
    )]
    #[serde(deserialize_with = "scalar_as_text")]
    pub store_instance_metadata: Option<String>,
    /// Log format: text or json [default: text].
    #[arg(long, env = "PITR_LOG_FORMAT", global = true, value_name = "FORMAT")]
    #[serde(deserialize_with = "scalar_as_text")]
    pub log_format: Option<String>,
    /// Unix socket where the daemon answers the hooks [default: <pgdata>/pitr.sock].
    #[arg(long, env = "PITR_SOCKET", global = true, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Parallel uploads in the daemon [default: the CPU limit, cgroup quota included].
    #[arg(
        long,
        env = "PITR_ARCHIVE_CONCURRENCY",
        global = true,
        value_name = "N"
    )]
    #[serde(deserialize_with = "scalar_as_text")]
    pub archive_concurrency: Option<String>,
    /// Segments fetched ahead of recovery [default: 8]; 0 turns prefetch off.
    #[arg(long, env = "PITR_PREFETCH", global = true, value_name = "SEGMENTS")]
    #[serde(deserialize_with = "scalar_as_text")]
    pub prefetch: Option<String>,
    /// Cap on the bytes held in the prefetch spool, in MiB [default: 1024].
    #[arg(long, env = "PITR_PREFETCH_MAX_MB", global = true, value_name = "MIB")]
    #[serde(deserialize_with = "scalar_as_text")]
    pub prefetch_max_mb: Option<String>,
    /// Local directory, on another volume than pg_wal, where archive-push keeps encoded WAL while the store is unreachable [default: none: archive-push fails and Postgres keeps the WAL].
    #[arg(long, env = "PITR_OUTAGE_SPOOL", global = true, value_name = "DIR")]
    pub outage_spool: Option<PathBuf>,
    /// Cap on the bytes the outage spool holds, in MiB [default: 4096]; past it archive-push fails.
    #[arg(
        long,
        env = "PITR_OUTAGE_SPOOL_MAX_MB",
        global = true,
        value_name = "MIB"
    )]
    #[serde(deserialize_with = "scalar_as_text")]
    pub outage_spool_max_mb: Option<String>,
    /// Address of the daemon's HTTP API [default: 127.0.0.1:9851].
    #[arg(long, env = "PITR_HTTP_ADDR", global = true, value_name = "ADDR")]
    #[serde(deserialize_with = "scalar_as_text")]
    pub http_addr: Option<String>,
    /// Bearer token required by the HTTP endpoints that change state; unset disables them.
    #[arg(
        long,
        env = "PITR_HTTP_TOKEN",
        global = true,
        value_name = "TOKEN",
        hide_env_values = true
    )]
    #[serde(deserialize_with = "scalar_as_text")]
    pub http_token: Option<String>,
    /// /readyz fails when the oldest unarchived segment is older than this many seconds [default: 300].
    #[arg(
        long,
        env = "PITR_MAX_ARCHIVE_LAG",
        global = true,
        value_name = "SECONDS"
    )]
    #[serde(deserialize_with = "scalar_as_text")]
    pub max_archive_lag: Option<String>,
    /// Postgres connection URL for the daemon's checks [default: the libpq PG* variables].
    #[arg(
        long,
        env = "PITR_PG_URL",
        global = true,
        value_name = "URL",
        hide_env_values = true
    )]
    #[serde(deserialize_with = "scalar_as_text")]
    pub pg_url: Option<String>,
    /// Keep every instant of this recent past restorable, e.g. 14d, 36h, 2w [default: none].
    #[arg(
        long,
        env = "PITR_RETENTION_WINDOW",
        global = true,
        value_name = "DURATION"
    )]
    #[serde(deserialize_with = "scalar_as_text")]
    pub retention_window: Option<String>,
    /// Never keep fewer complete backups than this [default: 1].
    #[arg(
        long,
        env = "PITR_RETENTION_MIN_BACKUPS",
        global = true,
        value_name = "N"
    )]
    #[serde(deserialize_with = "scalar_as_text")]
    pub retention_min_backups: Option<String>,
    /// Also keep this many newest backups, and the WAL after the oldest of them [default: none].
    #[arg(long, env = "PITR_RETENTION_BACKUPS", global = true, value_name = "N")]
    #[serde(deserialize_with = "scalar_as_text")]
    pub retention_backups: Option<String>,
    /// `pitr verify` reads again what it verified longer ago than this, e.g. 7d [default: 7d].
    #[arg(
        long,
        env = "PITR_VERIFY_MAX_AGE",
        global = true,
        value_name = "DURATION"
    )]
    #[serde(deserialize_with = "scalar_as_text")]
    pub verify_max_age: Option<String>,
    /// Extra object_store options, e.g. `aws_endpoint = "http://127.0.0.1:9000"`; only in the
    /// file's `[store]` table.
    #[arg(skip)]
    pub store: BTreeMap<String, String>,
}

/// What expire keeps: every instant of `window` restorable, the newest `backups` backups with
/// the WAL after them, and never fewer than `min_backups` backups. With neither a window nor a
/// count, expire refuses to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetentionPolicy {
    pub window: Option<Duration>,
    pub min_backups: usize,
    pub backups: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// CPUs this process may use; `available_parallelism` honours a cgroup CPU quota, which is
/// what a sidecar with a CPU limit needs.
pub fn cpu_count() -> usize {
    // Reading the cgroup limit parses several files; every hook asks, so ask once.
    static CPUS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CPUS.get_or_init(|| std::thread::available_parallelism().map_or(1, std::num::NonZero::get))
}

/// Resolved, validated settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub repo: Option<String>,
    pub key_file: Option<PathBuf>,
    pub compression_level: i32,
    pub compression_threads: u32,
    pub pgdata: PathBuf,
    pub store_timeout: Duration,
    pub store_options: BTreeMap<String, String>,
    /// Whether an s3:// store may fall back to the instance metadata endpoint for credentials.
    pub store_instance_metadata: bool,
    pub log_format: LogFormat,
    pub socket: PathBuf,
    pub archive_concurrency: usize,
    pub prefetch_segments: usize,
    pub prefetch_max_bytes: u64,
    /// Where archive-push keeps WAL while the store is unreachable; `None`: it fails instead.
    pub outage_spool: Option<PathBuf>,
    pub outage_spool_max_bytes: u64,
    pub http_addr: std::net::SocketAddr,
    pub http_token: Option<String>,
    pub max_archive_lag: Duration,
    pub pg_url: Option<String>,
    /// What `pitr expire` keeps.
    pub retention: RetentionPolicy,
    /// How long `pitr verify` trusts an object it proved intact.
    pub verify_max_age: Duration,
    /// The configuration file these settings came from, made absolute, so that commands this
    /// one writes (restore_command) or starts (the prefetch worker) read the same file.
    pub config_file: Option<PathBuf>,
}

impl Settings {
    pub fn resolve(options: &GlobalOptions) -> Result<Self, ConfigError> {
        let file = match &options.config {
            Some(path) => read_file(path)?,
            None => GlobalOptions::default(),
        };
        let options = &options.overlaid_on(file);
        let compression_level = pick_number(
            "compression level (PITR_COMPRESSION_LEVEL)",
            options.compression_level.as_deref(),
            1,
            1..=19,
            "choose 1 (fastest) to 19 (smallest)",
        )?;
        let default_threads = cpu_count() as i64;
        let compression_threads = pick_number(
            "compression threads (PITR_COMPRESSION_THREADS)",
            options.compression_threads.as_deref(),
            default_threads,
            0..=256,
            "choose 0 (one thread) to 256",
        )?;
        let store_timeout = pick_number(
            "store timeout (PITR_STORE_TIMEOUT)",
            options.store_timeout.as_deref(),
            60,
            1..=86_400,
            "give whole seconds from 1 to 86400",
        )?;
        let log_format = match options.log_format.clone().as_deref() {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => {
                return Err(ConfigError::BadValue(format!(
                    "log format '{other}' is not valid: use text or json"
                )));
            }
        };
        let store_instance_metadata = match options.store_instance_metadata.as_deref() {
            None => true,
            Some("on" | "true") => true,
            Some("off" | "false") => false,
            Some(other) => {
                return Err(ConfigError::BadValue(format!(
                    "store instance metadata (PITR_STORE_INSTANCE_METADATA) '{other}' is not valid: use on or off"
                )));
            }
        };
        // available_parallelism already honours a cgroup CPU quota, which is what a sidecar with
        // a CPU limit needs.
        let archive_concurrency = pick_number(
            "archive concurrency (PITR_ARCHIVE_CONCURRENCY)",
            options.archive_concurrency.as_deref(),
            default_threads,
            1..=256,
            "choose 1 to 256 parallel uploads",
        )?;
        let prefetch = pick_number(
            "prefetch (PITR_PREFETCH)",
            options.prefetch.as_deref(),
            8,
            0..=1024,
            "choose 0 (off) to 1024 segments",
        )?;
        let prefetch_max_mb = pick_number(
            "prefetch cap (PITR_PREFETCH_MAX_MB)",
            options.prefetch_max_mb.as_deref(),
            1024,
            16..=1_048_576,
            "give MiB from 16 upwards",
        )?;
        let outage_spool_max_mb = pick_number(
            "outage spool cap (PITR_OUTAGE_SPOOL_MAX_MB)",
            options.outage_spool_max_mb.as_deref(),
            4096,
            64..=16_777_216,
            "give MiB from 64 upwards",
        )?;
        let outage_spool = options.outage_spool.clone();
        if let Some(spool) = &outage_spool
            && !spool.is_absolute()
        {
            return Err(ConfigError::BadValue(format!(
                "outage spool (PITR_OUTAGE_SPOOL) '{}' is not an absolute path: hooks run in the data directory, so give the full path of a directory on another volume",
                spool.display()
            )));
        }
        let max_archive_lag = pick_number(
            "maximum archive lag (PITR_MAX_ARCHIVE_LAG)",
            options.max_archive_lag.as_deref(),
            300,
            1..=604_800,
            "give whole seconds",
        )?;
        let http_text = options
            .http_addr
            .clone()
            .unwrap_or_else(|| "127.0.0.1:9851".to_string());
        let http_addr = http_text.parse().map_err(|_| {
            ConfigError::BadValue(format!(
                "HTTP address (PITR_HTTP_ADDR) '{http_text}' is not valid: give an IP and port such as 127.0.0.1:9851"
            ))
        })?;
        let pgdata = options.pgdata.clone().unwrap_or_else(|| PathBuf::from("."));
        let retention = retention_policy(options)?;
        let verify_max_age = match options.verify_max_age.as_deref().map(str::trim) {
            None => Duration::from_secs(7 * 86_400),
            Some(text) => humantime::parse_duration(text).map_err(|error| {
                ConfigError::BadValue(format!(
                    "verify max age (PITR_VERIFY_MAX_AGE) '{text}' is not a duration ({error}): give a number and a unit, such as 7d"
                ))
            })?,
        };
        Ok(Settings {
            retention,
            verify_max_age,
            socket: options
                .socket
                .clone()
                .unwrap_or_else(|| pgdata.join("pitr.sock")),
            archive_concurrency: archive_concurrency as usize,
            prefetch_segments: prefetch as usize,
            prefetch_max_bytes: (prefetch_max_mb as u64) << 20,
            outage_spool,
            outage_spool_max_bytes: (outage_spool_max_mb as u64) << 20,
            http_addr,
            http_token: options.http_token.clone().filter(|token| !token.is_empty()),
            max_archive_lag: Duration::from_secs(max_archive_lag as u64),
            pg_url: options.pg_url.clone(),
            config_file: options
                .config
                .as_ref()
                .map(|path| std::path::absolute(path).unwrap_or_else(|_| path.clone())),
            repo: options.repo.clone(),
            key_file: options.key_file.clone(),
            compression_level: compression_level as i32,
            compression_threads: compression_threads as u32,
            pgdata,
            store_timeout: Duration::from_secs(store_timeout as u64),
            store_options: options.store.clone(),
            store_instance_metadata,
            log_format,
        })
    }

    /// How archived WAL is encoded: the configured zstd level and threads.
    pub fn wal_encode_options(&self) -> crate::envelope::EncodeOptions {
        crate::envelope::EncodeOptions {
            compression_level: self.compression_level,
            compression_workers: self.compression_threads,
            ..crate::envelope::EncodeOptions::default()
        }
    }

    /// The settings a child pitr process (the prefetch worker) needs, as the `PITR_*`
    /// variables it reads: the one place that turns settings back into their environment.
    /// Paths are made absolute, since the child may run elsewhere.
    pub fn child_environment(&self) -> Vec<(&'static str, std::ffi::OsString)> {
        let absolute = |path: &Path| std::path::absolute(path).unwrap_or_else(|_| path.into());
        let mut environment = vec![
            ("PITR_PGDATA", absolute(&self.pgdata).into_os_string()),
            (
                "PITR_STORE_TIMEOUT",
                self.store_timeout.as_secs().to_string().into(),
            ),
            ("PITR_PREFETCH", self.prefetch_segments.to_string().into()),
        ];
        if let Some(config) = &self.config_file {
            environment.push(("PITR_CONFIG", config.clone().into_os_string()));
        }
        if let Some(repo) = &self.repo {
            environment.push(("PITR_REPO", repo.into()));
        }
        if let Some(key_file) = &self.key_file {
            environment.push(("PITR_KEY_FILE", absolute(key_file).into_os_string()));
        }
        environment
    }

    pub fn repo_url(&self) -> Result<&str, ConfigError> {
        self.repo.as_deref().ok_or(ConfigError::MissingRepo)
    }
}

impl GlobalOptions {
    /// These options (flags and environment) over `file`'s: a field given here wins, one left
    /// unset takes the file's. The `[store]` table comes from the file alone. No field is
    /// named, so a new option needs no line here.
    fn overlaid_on(&self, file: GlobalOptions) -> GlobalOptions {
        let mut merged = serde_json::to_value(&file).expect("options always serialize");
        let given = serde_json::to_value(self).expect("options always serialize");
        for (key, value) in given.as_object().expect("options are a struct") {
            if !value.is_null() && key != "store" {
                merged[key] = value.clone();
            }
        }
        let mut merged: GlobalOptions =
            serde_json::from_value(merged).expect("serialized options deserialize");
        merged.config = self.config.clone();
        merged
    }
}

/// A TOML scalar as its text: `compression_level = 5` and `PITR_COMPRESSION_LEVEL=5` reach the
/// same parser, and so give the same message when out of range.
fn scalar_as_text<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Scalar {
        Text(String),
        Integer(i64),
        Float(f64),
        Boolean(bool),
    }
    Ok(
        Option::<Scalar>::deserialize(deserializer)?.map(|scalar| match scalar {
            Scalar::Text(text) => text,
            Scalar::Integer(number) => number.to_string(),
            Scalar::Float(number) => number.to_string(),
            Scalar::Boolean(flag) => flag.to_string(),
        }),
    )
}

fn read_file(path: &Path) -> Result<GlobalOptions, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|error| {
        ConfigError::BadValue(format!(
            "cannot read the configuration file {}: {error}",
            path.display()
        ))
    })?;
    toml::from_str(&text).map_err(|error| {
        ConfigError::BadValue(format!(
            "configuration file {}: {}; fix the file or remove the key",
            path.display(),
            error.message()
        ))
    })
}

fn retention_policy(options: &GlobalOptions) -> Result<RetentionPolicy, ConfigError> {
    let window = match options.retention_window.as_deref().map(str::trim) {
        None => None,
        Some(text) => {
            let window = humantime::parse_duration(text).map_err(|error| {
                ConfigError::BadValue(format!(
                    "retention window (PITR_RETENTION_WINDOW) '{text}' is not a duration ({error}): give a number and a unit, such as 14d, 36h or 2w"
                ))
            })?;
            if window < Duration::from_secs(1) {
                return Err(ConfigError::BadValue(format!(
                    "retention window (PITR_RETENTION_WINDOW) '{text}' is shorter than a second: give the span that must stay restorable, such as 14d"
                )));
            }
            Some(window)
        }
    };
    let min_backups = pick_number(
        "minimum backups (PITR_RETENTION_MIN_BACKUPS)",
        options.retention_min_backups.as_deref(),
        1,
        1..=100_000,
        "choose 1 or more",
    )? as usize;
    let backups = match options.retention_backups.as_deref() {
        None => None,
        Some(text) => Some(pick_number(
            "retention backups (PITR_RETENTION_BACKUPS)",
            Some(text),
            1,
            1..=100_000,
            "choose 1 or more backups to keep",
        )? as usize),
    };
    Ok(RetentionPolicy {
        window,
        min_backups,
        backups,
    })
}

fn pick_number(
    what: &str,
    given: Option<&str>,
    default: i64,
    allowed: std::ops::RangeInclusive<i64>,
    advice: &str,
) -> Result<i64, ConfigError> {
    let value = match given {
        Some(text) => text.trim().parse::<i64>().map_err(|_| {
            ConfigError::BadValue(format!("{what} '{text}' is not a number: {advice}"))
        })?,
        None => default,
    };
    if !allowed.contains(&value) {
        return Err(ConfigError::BadValue(format!(
            "{what} {value} is out of range: {advice}"
        )));
    }
    Ok(value)
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "no repository is configured: set PITR_REPO or --repo (for example file:///var/lib/pitr)"
    )]
    MissingRepo,
    #[error("{0}")]
    BadValue(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_the_file_and_bad_values_are_named() {
        let directory = tempfile::tempdir().unwrap();
        let file = directory.path().join("pitr.toml");
        std::fs::write(&file, "repo = 'file:///from-file'\ncompression_level = 5\n[store]\naws_region = 'eu-west-1'\n").unwrap();
        let mut options = GlobalOptions {
            config: Some(file.clone()),
            ..GlobalOptions::default()
        };
        let settings = Settings::resolve(&options).unwrap();
        assert_eq!(settings.repo.as_deref(), Some("file:///from-file"));
        assert_eq!(settings.compression_level, 5);
        assert_eq!(settings.store_options["aws_region"], "eu-west-1");
        options.compression_level = Some("3".into());
        options.repo = Some("s3://bucket/flag".into());
        let settings = Settings::resolve(&options).unwrap();
        assert_eq!(
            (settings.repo.as_deref(), settings.compression_level),
            (Some("s3://bucket/flag"), 3)
        );
        options.compression_level = Some("30".into());
        assert_eq!(
            Settings::resolve(&options).unwrap_err().to_string(),
            "compression level (PITR_COMPRESSION_LEVEL) 30 is out of range: choose 1 (fastest) to 19 (smallest)"
        );
        std::fs::write(&file, "colour = 'blue'\n").unwrap();
        let error = Settings::resolve(&GlobalOptions {
            config: Some(file),
            ..GlobalOptions::default()
        })
        .unwrap_err()
        .to_string();
        assert!(error.contains("unknown field `colour`"), "{error}");
    }

    #[test]
    fn a_value_from_the_file_is_checked_exactly_as_one_from_a_flag() {
        let directory = tempfile::tempdir().unwrap();
        let file = directory.path().join("pitr.toml");
        std::fs::write(
            &file,
            "compression_level = 30\nstore_instance_metadata = false\n",
        )
        .unwrap();
        let from_file = GlobalOptions {
            config: Some(file),
            ..GlobalOptions::default()
        };
        let from_flag = GlobalOptions {
            compression_level: Some("30".into()),
            ..GlobalOptions::default()
        };
        assert_eq!(
            Settings::resolve(&from_file).unwrap_err().to_string(),
            Settings::resolve(&from_flag).unwrap_err().to_string()
        );
        let settings = Settings::resolve(&GlobalOptions {
            compression_level: Some("2".into()),
            ..from_file
        })
        .unwrap();
        assert_eq!(settings.compression_level, 2);
        assert!(!settings.store_instance_metadata);
    }
}

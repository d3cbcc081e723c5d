//! Settings: every option as a flag, a `PITR_*` environment variable and a TOML key.
//!
//! Precedence is flag, then environment, then the file named by `--config`/`PITR_CONFIG`, then
//! the built-in default. clap resolves the first two; this module merges in the file, validates
//! every value and produces one `Settings` that the commands read. A bad value stops the command
//! with a message naming the setting and what would be accepted.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// The options shared by every command.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct GlobalOptions {
    /// TOML configuration file; flags and PITR_* variables override its keys.
    #[arg(long, env = "PITR_CONFIG", global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Repository URL: file:///path, s3://bucket/prefix, gs://bucket/prefix, az://container/prefix.
    #[arg(long, env = "PITR_REPO", global = true, value_name = "URL")]
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
    pub compression_level: Option<String>,
    /// zstd worker threads per object; 0 compresses on one thread [default: the CPU count].
    #[arg(
        long,
        env = "PITR_COMPRESSION_THREADS",
        global = true,
        value_name = "N"
    )]
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
    pub store_timeout: Option<String>,
    /// Log format: text or json [default: text].
    #[arg(long, env = "PITR_LOG_FORMAT", global = true, value_name = "FORMAT")]
    pub log_format: Option<String>,
}

/// The TOML file's keys; the same names as the flags, with underscores.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSettings {
    repo: Option<String>,
    key_file: Option<PathBuf>,
    compression_level: Option<i64>,
    compression_threads: Option<i64>,
    pgdata: Option<PathBuf>,
    store_timeout: Option<i64>,
    log_format: Option<String>,
    /// Extra object_store options, e.g. `aws_endpoint = "http://127.0.0.1:9000"`.
    #[serde(default)]
    store: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
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
    pub log_format: LogFormat,
}

impl Settings {
    pub fn resolve(options: &GlobalOptions) -> Result<Self, ConfigError> {
        let file = match &options.config {
            Some(path) => read_file(path)?,
            None => FileSettings::default(),
        };
        let compression_level = pick_number(
            "compression level (PITR_COMPRESSION_LEVEL)",
            options.compression_level.as_deref(),
            file.compression_level,
            1,
            1..=19,
            "choose 1 (fastest) to 19 (smallest)",
        )?;
        let default_threads =
            std::thread::available_parallelism().map_or(1, |count| count.get() as i64);
        let compression_threads = pick_number(
            "compression threads (PITR_COMPRESSION_THREADS)",
            options.compression_threads.as_deref(),
            file.compression_threads,
            default_threads,
            0..=256,
            "choose 0 (one thread) to 256",
        )?;
        let store_timeout = pick_number(
            "store timeout (PITR_STORE_TIMEOUT)",
            options.store_timeout.as_deref(),
            file.store_timeout,
            60,
            1..=86_400,
            "give whole seconds from 1 to 86400",
        )?;
        let log_format = match options.log_format.clone().or(file.log_format).as_deref() {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => {
                return Err(ConfigError::BadValue(format!(
                    "log format '{other}' is not valid: use text or json"
                )));
            }
        };
        Ok(Settings {
            repo: options.repo.clone().or(file.repo),
            key_file: options.key_file.clone().or(file.key_file),
            compression_level: compression_level as i32,
            compression_threads: compression_threads as u32,
            pgdata: options
                .pgdata
                .clone()
                .or(file.pgdata)
                .unwrap_or_else(|| PathBuf::from(".")),
            store_timeout: Duration::from_secs(store_timeout as u64),
            store_options: file.store,
            log_format,
        })
    }

    pub fn repo_url(&self) -> Result<&str, ConfigError> {
        self.repo.as_deref().ok_or(ConfigError::MissingRepo)
    }
}

fn read_file(path: &Path) -> Result<FileSettings, ConfigError> {
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

fn pick_number(
    what: &str,
    given: Option<&str>,
    from_file: Option<i64>,
    default: i64,
    allowed: std::ops::RangeInclusive<i64>,
    advice: &str,
) -> Result<i64, ConfigError> {
    let value = match given {
        Some(text) => text.trim().parse::<i64>().map_err(|_| {
            ConfigError::BadValue(format!("{what} '{text}' is not a number: {advice}"))
        })?,
        None => from_file.unwrap_or(default),
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
}

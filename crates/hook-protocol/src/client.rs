//! The small hooks' side of the socket: find the daemon exactly as `pitr` does, ask it, and when
//! no daemon answers, hand over to the full `pitr` binary (exec, same arguments).
//!
//! The small hook reads only what it needs to find and wait for the daemon, by pitr's own rules
//! (flag, then `PITR_*` variable, then config file, then default):
//!
//! - the socket: `PITR_SOCKET`, else the config file's `socket`, else `<pgdata>/pitr.sock`;
//! - the data directory: `PITR_PGDATA`, else the config file's `pgdata`, else `.` (the working
//!   directory, where Postgres runs hooks); it is sent with a push for the cluster check;
//! - how long to wait for a reply: `PITR_STORE_TIMEOUT`, else `store_timeout`, else 60 s, plus 5 s;
//! - the config file: `--config FILE` (or `--config=FILE`) among the arguments, else `PITR_CONFIG`.
//!
//! Anything it does not understand, it leaves to `pitr`: any other flag (`--force`, `--socket`,
//! `--pgdata`, …), the wrong number of arguments, an empty or out-of-range variable, and a
//! config file it cannot read or that holds anything but top-level `key = value` lines with
//! plain values for pitr's own keys before its first table. `pitr` then reports the problem, or
//! does the work, exactly as when it is called directly.

use std::ffi::{OsStr, OsString};
use std::io::{BufRead, BufReader, Write};
use std::os::fd::FromRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use crate::{CONNECT_TIMEOUT, REPLY_MARGIN, REQUEST_LIMIT, Reply, Request};

/// What the hook makes of the daemon's reply.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Exit 0.
    Success,
    /// Exit 1 without a word: `archive-get`'s "not in the archive".
    NotFound,
    /// Exit 1, with `pitr <verb>: error: <message>` on stderr.
    Failed(String),
    /// No daemon can serve this: run `pitr`.
    HandOver,
}

/// Where the daemon is and how long to wait for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub socket: PathBuf,
    pub data_directory: PathBuf,
    pub reply_timeout: Duration,
}

/// The whole small hook: `verb` is pitr's subcommand (`archive-push`), `positionals` how many
/// arguments it takes; `request` builds the request from them (`None`: leave them to pitr),
/// `outcome` maps the reply.
pub fn run(
    verb: &str,
    positionals: usize,
    request: impl FnOnce(&[OsString], &Location) -> Option<Request>,
    outcome: impl FnOnce(Reply) -> Outcome,
) -> ExitCode {
    let arguments: Vec<OsString> = std::env::args_os().skip(1).collect();
    let Some((given, config)) = split_arguments(&arguments, positionals) else {
        return hand_over(verb, &arguments);
    };
    let config = config.or_else(|| std::env::var_os("PITR_CONFIG").map(PathBuf::from));
    let Some(location) = locate(config.as_deref(), &|name| std::env::var_os(name)) else {
        return hand_over(verb, &arguments);
    };
    let Some(request) = request(&given, &location) else {
        return hand_over(verb, &arguments);
    };
    let reply = match ask(&location, &request) {
        Asked::Reply(reply) => outcome(reply),
        Asked::Unreadable(line) => Outcome::Failed(line),
        Asked::NoDaemon => Outcome::HandOver,
    };
    match reply {
        Outcome::Success => ExitCode::SUCCESS,
        Outcome::NotFound => ExitCode::from(1),
        Outcome::Failed(message) => {
            eprintln!("pitr {verb}: error: {message}");
            ExitCode::from(1)
        }
        Outcome::HandOver => hand_over(verb, &arguments),
    }
}

/// The positional arguments and the `--config` file, or `None` if anything else is there.
pub fn split_arguments(
    arguments: &[OsString],
    positionals: usize,
) -> Option<(Vec<OsString>, Option<PathBuf>)> {
    let mut given = Vec::new();
    let mut config = None;
    let mut words = arguments.iter();
    while let Some(word) = words.next() {
        let bytes = std::os::unix::ffi::OsStrExt::as_bytes(word.as_os_str());
        if bytes == b"--config" {
            config = Some(PathBuf::from(words.next()?));
        } else if let Some(file) = bytes.strip_prefix(b"--config=") {
            config = Some(PathBuf::from(OsStr::new(std::str::from_utf8(file).ok()?)));
        } else if bytes.starts_with(b"-") {
            return None;
        } else {
            given.push(word.clone());
        }
    }
    (given.len() == positionals).then_some((given, config))
}

/// Where the daemon's socket is, by pitr's rules; `None` when pitr itself must decide.
pub fn locate(
    config: Option<&Path>,
    variable: &dyn Fn(&str) -> Option<OsString>,
) -> Option<Location> {
    let file = match config {
        Some(path) => ConfigFile::read(path)?,
        None => ConfigFile::default(),
    };
    let setting = |name: &str| match variable(name) {
        Some(value) if value.is_empty() => Err(()),
        other => Ok(other),
    };
    let data_directory = setting("PITR_PGDATA")
        .ok()?
        .map(PathBuf::from)
        .or(file.pgdata)
        .unwrap_or_else(|| PathBuf::from("."));
    let socket = setting("PITR_SOCKET")
        .ok()?
        .map(PathBuf::from)
        .or(file.socket)
        .unwrap_or_else(|| data_directory.join("pitr.sock"));
    let store_timeout = match setting("PITR_STORE_TIMEOUT").ok()? {
        Some(text) => text.to_str()?.trim().parse::<i64>().ok()?,
        None => file.store_timeout.unwrap_or(60),
    };
    if !(1..=86_400).contains(&store_timeout) {
        return None;
    }
    Some(Location {
        socket,
        data_directory,
        reply_timeout: Duration::from_secs(store_timeout as u64) + REPLY_MARGIN,
    })
}

/// The keys of pitr's config file (`config::FileSettings`); any other makes pitr refuse the file.
const CONFIG_KEYS: &[&str] = &[
    "repo",
    "key_file",
    "compression_level",
    "compression_threads",
    "pgdata",
    "store_timeout",
    "store_instance_metadata",
    "log_format",
    "socket",
    "archive_concurrency",
    "prefetch",
    "prefetch_max_mb",
    "outage_spool",
    "outage_spool_max_mb",
    "http_addr",
    "http_token",
    "max_archive_lag",
    "pg_url",
    "retention_window",
    "retention_min_backups",
    "retention_backups",
    "verify_max_age",
];

/// The three keys of a config file the small hook needs, read by a deliberately narrow subset of
/// TOML: anything outside it makes `read` return `None`, and pitr reads the file instead.
#[derive(Debug, Default, PartialEq, Eq)]
struct ConfigFile {
    socket: Option<PathBuf>,
    pgdata: Option<PathBuf>,
    store_timeout: Option<i64>,
}

impl ConfigFile {
    fn read(path: &Path) -> Option<ConfigFile> {
        Self::parse(&std::fs::read_to_string(path).ok()?)
    }

    fn parse(text: &str) -> Option<ConfigFile> {
        // A multi-line string could hold lines that look like keys.
        if text.contains("\"\"\"") || text.contains("'''") {
            return None;
        }
        let mut file = ConfigFile::default();
        let mut seen = Vec::new();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            // Top-level keys come before the first table; `[store]` holds object_store options.
            if line.starts_with('[') {
                break;
            }
            let (key, value) = line.split_once('=')?;
            let key = key.trim();
            if !CONFIG_KEYS.contains(&key) || seen.contains(&key) {
                return None;
            }
            seen.push(key);
            let value = Value::parse(value)?;
            match (key, value) {
                ("socket", Value::Text(text)) => file.socket = Some(PathBuf::from(text)),
                ("pgdata", Value::Text(text)) => file.pgdata = Some(PathBuf::from(text)),
                ("store_timeout", Value::Integer(number)) => file.store_timeout = Some(number),
                ("socket" | "pgdata" | "store_timeout", _) => return None,
                _ => {}
            }
        }
        Some(file)
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Value {
    Text(String),
    Integer(i64),
    Other,
}

impl Value {
    /// A string without escapes (`"…"` or `'…'`), a decimal integer, or a bare word such as
    /// `true`, each optionally followed by a `#` comment.
    fn parse(value: &str) -> Option<Value> {
        let value = value.trim();
        for quote in ['"', '\''] {
            if let Some(rest) = value.strip_prefix(quote) {
                let (text, after) = rest.split_once(quote)?;
                if (quote == '"' && text.contains('\\')) || !is_comment_or_nothing(after) {
                    return None;
                }
                return Some(Value::Text(text.to_string()));
            }
        }
        let word = value.split('#').next()?.trim();
        if word.is_empty() || !word.bytes().all(|byte| byte.is_ascii_alphanumeric()) {
            return None;
        }
        Some(match word.parse() {
            Ok(number) => Value::Integer(number),
            Err(_) => Value::Other,
        })
    }
}

fn is_comment_or_nothing(text: &str) -> bool {
    let text = text.trim();
    text.is_empty() || text.starts_with('#')
}

/// What came back over the socket.
#[derive(Debug)]
pub enum Asked {
    Reply(Reply),
    /// A line that is no reply: reported as the failure, as pitr does.
    Unreadable(String),
    /// No socket, no connection within `CONNECT_TIMEOUT`, or no reply line in time.
    NoDaemon,
}

/// Sends `request` and reads the reply, within the bounds pitr's own client keeps.
pub fn ask(location: &Location, request: &Request) -> Asked {
    let mut line = request.encode();
    if line.len() > REQUEST_LIMIT {
        return Asked::NoDaemon;
    }
    line.push('\n');
    let Some(mut stream) = connect(&location.socket) else {
        return Asked::NoDaemon;
    };
    if stream
        .set_read_timeout(Some(location.reply_timeout))
        .is_err()
        || stream.set_write_timeout(Some(CONNECT_TIMEOUT)).is_err()
        || stream.write_all(line.as_bytes()).is_err()
    {
        return Asked::NoDaemon;
    }
    let mut answer = String::new();
    // A reply is one line; 1 MiB bounds a daemon gone wrong.
    let mut reader = BufReader::new(std::io::Read::take(&mut stream, 1 << 20));
    match reader.read_line(&mut answer) {
        Ok(count) if count > 0 && answer.ends_with('\n') => {
            let answer = answer.trim_end();
            match Reply::parse(answer) {
                Ok(reply) => Asked::Reply(reply),
                Err(_) => Asked::Unreadable(answer.to_string()),
            }
        }
        _ => Asked::NoDaemon,
    }
}

/// Connects within `CONNECT_TIMEOUT`. A Unix connect returns at once unless the daemon's listen
/// queue is full (a daemon that stopped accepting); Linux then waits for room as long as the
/// socket's send timeout (`SO_SNDTIMEO`) allows, and without one for ever. So the timeout is set
/// on the socket before it connects. std has no way to set an option on a socket before it
/// connects, so creating and connecting it are two calls into the C library that std itself
/// links (no crate); a helper thread bounding a plain connect cost about 0.4 ms per hook (the
/// thread, its malloc arena and signal stack). A missing socket (no daemon, the usual fallback)
/// is seen first.
fn connect(socket: &Path) -> Option<UnixStream> {
    if !socket.exists() {
        return None;
    }
    let address = UnixAddress::of(socket)?;
    // SAFETY: socket(2) takes no pointers; a negative result is an error, anything else a new
    // descriptor that nothing else owns.
    let descriptor =
        unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if descriptor < 0 {
        return None;
    }
    // SAFETY: the descriptor is open and owned by nobody else; the stream closes it on drop.
    let stream = unsafe { UnixStream::from_raw_fd(descriptor) };
    stream.set_write_timeout(Some(CONNECT_TIMEOUT)).ok()?;
    // SAFETY: `address` is a valid sockaddr_un that outlives the call, and the length passed
    // is its size.
    let connected = unsafe {
        libc::connect(
            descriptor,
            (&raw const address).cast(),
            std::mem::size_of::<UnixAddress>() as u32,
        )
    };
    (connected == 0).then_some(stream)
}

/// `struct sockaddr_un` of Linux: the family, then a NUL-terminated path of at most 107 bytes.
#[repr(C)]
struct UnixAddress {
    family: u16,
    path: [u8; 108],
}

impl UnixAddress {
    /// `None` for a path too long for a Unix socket (pitr refuses to bind one, too).
    fn of(socket: &Path) -> Option<UnixAddress> {
        let bytes = std::os::unix::ffi::OsStrExt::as_bytes(socket.as_os_str());
        let mut address = UnixAddress {
            family: libc::AF_UNIX as u16,
            path: [0; 108],
        };
        if bytes.len() >= address.path.len() || bytes.contains(&0) {
            return None;
        }
        address.path[..bytes.len()].copy_from_slice(bytes);
        Some(address)
    }
}

/// The two calls of the C library that `connect` needs, declared here rather than taken from
/// the `libc` crate so the small hooks keep to the standard library. Values are Linux's.
mod libc {
    pub const AF_UNIX: i32 = 1;
    pub const SOCK_STREAM: i32 = 1;
    pub const SOCK_CLOEXEC: i32 = 0o2_000_000;
    unsafe extern "C" {
        pub fn socket(domain: i32, kind: i32, protocol: i32) -> i32;
        pub fn connect(descriptor: i32, address: *const u8, length: u32) -> i32;
    }
}

/// Replaces this process with `pitr <verb> <arguments>`: `PITR_BINARY`, else `pitr` beside this
/// program, else `pitr` on `PATH`. Returns only if that fails, with exit 1 and the reason.
pub fn hand_over(verb: &str, arguments: &[OsString]) -> ExitCode {
    let program = pitr_binary();
    let error = std::process::Command::new(&program)
        .arg(verb)
        .args(arguments)
        .exec();
    eprintln!(
        "pitr {verb}: error: no daemon answered and running {} failed: {error}; install pitr beside this hook, on PATH, or name it in PITR_BINARY",
        program.display()
    );
    ExitCode::from(1)
}

fn pitr_binary() -> PathBuf {
    if let Some(binary) = std::env::var_os("PITR_BINARY").filter(|value| !value.is_empty()) {
        return PathBuf::from(binary);
    }
    std::env::current_exe()
        .ok()
        .and_then(|own| own.parent().map(|directory| directory.join("pitr")))
        .filter(|beside| beside.is_file())
        .unwrap_or_else(|| PathBuf::from("pitr"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A daemon that stopped accepting fills its listen queue; the hook must then give up
    /// within `CONNECT_TIMEOUT` (and hand over to pitr), never wait for ever.
    #[test]
    fn a_full_listen_queue_fails_the_connect_within_its_timeout() {
        let directory =
            std::env::temp_dir().join(format!("pitr-hook-queue-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&directory);
        std::fs::create_dir_all(&directory).unwrap();
        let path = directory.join("pitr.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let mut held = Vec::new();
        let refused_after = loop {
            let started = std::time::Instant::now();
            match connect(&path) {
                Some(stream) => held.push(stream),
                None => break started.elapsed(),
            }
            assert!(held.len() < 100_000, "the listen queue never filled");
        };
        assert!(
            !held.is_empty(),
            "connections were accepted into the queue first"
        );
        assert!(
            refused_after >= CONNECT_TIMEOUT.mul_f32(0.9)
                && refused_after < CONNECT_TIMEOUT + Duration::from_secs(2),
            "gave up after {refused_after:?}, not after about {CONNECT_TIMEOUT:?}"
        );
        std::fs::remove_dir_all(&directory).unwrap();
    }

    fn words(list: &[&str]) -> Vec<OsString> {
        list.iter().map(OsString::from).collect()
    }

    #[test]
    fn only_the_positionals_and_a_config_file_stay_on_the_fast_path() {
        let split = |list: &[&str], count| split_arguments(&words(list), count);
        assert_eq!(split(&["pg_wal/x"], 1), Some((words(&["pg_wal/x"]), None)));
        assert_eq!(
            split(&["--config", "/etc/p.toml", "pg_wal/x"], 1),
            Some((words(&["pg_wal/x"]), Some("/etc/p.toml".into())))
        );
        assert_eq!(
            split(&["x", "--config=/c", "pg_wal/RECOVERYXLOG"], 2),
            Some((words(&["x", "pg_wal/RECOVERYXLOG"]), Some("/c".into())))
        );
        for handed_over in [
            &["--force", "pg_wal/x"][..],
            &["--socket", "/s", "pg_wal/x"],
            &["pg_wal/x", "extra"],
            &[],
            &["--config"],
            &["--", "pg_wal/x"],
        ] {
            assert_eq!(split(handed_over, 1), None, "{handed_over:?}");
        }
    }

    fn environment(
        pairs: &'static [(&'static str, &'static str)],
    ) -> impl Fn(&str) -> Option<OsString> {
        move |name| {
            pairs
                .iter()
                .find(|(key, _)| *key == name)
                .map(|(_, value)| OsString::from(value))
        }
    }

    #[test]
    fn the_socket_is_found_by_pitrs_rules() {
        let located = |config: Option<&Path>, pairs| locate(config, &environment(pairs));
        let default = located(None, &[]).unwrap();
        assert_eq!(default.socket, PathBuf::from("./pitr.sock"));
        assert_eq!(default.data_directory, PathBuf::from("."));
        assert_eq!(default.reply_timeout, Duration::from_secs(65));
        let data = located(None, &[("PITR_PGDATA", "/srv/pg")]).unwrap();
        assert_eq!(data.socket, PathBuf::from("/srv/pg/pitr.sock"));
        let both = located(
            None,
            &[
                ("PITR_PGDATA", "/srv/pg"),
                ("PITR_SOCKET", "/run/pitr.sock"),
                ("PITR_STORE_TIMEOUT", " 7 "),
            ],
        )
        .unwrap();
        assert_eq!(both.socket, PathBuf::from("/run/pitr.sock"));
        assert_eq!(both.reply_timeout, Duration::from_secs(12));
        for pitr_decides in [
            &[("PITR_SOCKET", "")][..],
            &[("PITR_PGDATA", "")],
            &[("PITR_STORE_TIMEOUT", "0")],
            &[("PITR_STORE_TIMEOUT", "soon")],
        ] {
            assert_eq!(located(None, pitr_decides), None, "{pitr_decides:?}");
        }
        assert_eq!(
            located(Some(Path::new("/nonexistent/pitr.toml")), &[]),
            None
        );

        let directory =
            std::env::temp_dir().join(format!("pitr-hook-protocol-{}", std::process::id()));
        std::fs::create_dir_all(&directory).unwrap();
        let config = directory.join("pitr.toml");
        std::fs::write(&config, "repo = 'file:///r'\npgdata = \"/srv/pg\" # here\nstore_timeout = 2\n[store]\nsocket = 'not ours'\n").unwrap();
        let from_file = located(Some(&config), &[]).unwrap();
        assert_eq!(from_file.socket, PathBuf::from("/srv/pg/pitr.sock"));
        assert_eq!(from_file.reply_timeout, Duration::from_secs(7));
        let flagged = located(Some(&config), &[("PITR_PGDATA", "/other")]).unwrap();
        assert_eq!(flagged.data_directory, PathBuf::from("/other"));
        std::fs::remove_dir_all(&directory).unwrap();
    }

    #[test]
    fn a_config_file_outside_the_narrow_subset_is_left_to_pitr() {
        assert_eq!(
            ConfigFile::parse("socket = '/run/p.sock'\n"),
            Some(ConfigFile {
                socket: Some("/run/p.sock".into()),
                ..ConfigFile::default()
            })
        );
        for refused in [
            "colour = 'blue'\n",
            "socket = \"/a\\tb\"\n",
            "socket = 5\n",
            "store_timeout = '5'\n",
            "store_timeout = 1_000\n",
            "socket = '/a' extra\n",
            "pgdata = \"\"\"\n/x\"\"\"\n",
            "\"socket\" = '/a'\n",
            "socket.x = '/a'\n",
            "socket = '/a'\nsocket = '/b'\n",
            "repo\n",
            "repo = ['a']\n",
        ] {
            assert_eq!(ConfigFile::parse(refused), None, "{refused:?}");
        }
    }
}

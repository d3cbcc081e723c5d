//! The hook socket's protocol: one request line from a hook, one reply line from the daemon.
//!
//! This crate owns the wire format, so the daemon (`pitr daemon`), the full hooks
//! (`pitr archive-push`, `pitr archive-get`) and the small hooks (`pitr-archive-push`,
//! `pitr-archive-get`) cannot drift apart. It uses the standard library only, so the small hooks
//! start in about the time of a bare process.
//!
//! A request is ASCII words separated by single spaces; paths are escaped (see `escape_path`), so
//! any Unix path, spaces and non-UTF-8 bytes included, travels intact:
//!
//! | request | replies |
//! |---|---|
//! | `push <absolute path>[ pgdata=<absolute data directory>][ force]` | `ok stored`, `ok already`, `ok spooled`, `err <message>` |
//! | `get <WAL file name> <absolute destination>` | `ok restored`, `missing`, `err <message>` |
//!
//! Any request may also be answered `unavailable <message>`: this daemon cannot serve it (for
//! example a request word it does not know, from a newer hook), and the hook does the work itself
//! as if no daemon ran. `err` is an outcome: the hook exits 1 with the message.
//!
//! `client` is the small hooks' side: where the socket is, asking over it, and handing over to
//! the full `pitr` binary when no daemon answers.

pub mod client;

use std::ffi::OsString;
use std::fmt;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The longest request line the daemon reads, newline excluded. A path is at most PATH_MAX (4096)
/// bytes, so this holds any ordinary request; a client whose encoded request is longer (a long
/// path of escaped bytes) does not ask, and does the work itself.
pub const REQUEST_LIMIT: usize = 8192;
/// How long a client has, from connecting, to send its whole request line.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a hook waits to connect before it does the work itself.
pub const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// What a hook waits for a reply beyond its `store_timeout`, the bound on the daemon's own work.
pub const REPLY_MARGIN: Duration = Duration::from_secs(5);
/// How a hook talks to the daemon, as told to a client whose request was not understood.
pub const PROTOCOL: &str =
    "a hook sends one line: push <absolute path> or get <WAL file name> <absolute destination>";

/// What a hook asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Make the WAL file at `path` durable in the repository, after the checks `pitr
    /// archive-push` makes: its cluster is checked against `data_directory` (the daemon's own
    /// when `None`), and unless `force`, Postgres must have marked it `.ready` (or `.done`).
    Push {
        path: PathBuf,
        data_directory: Option<PathBuf>,
        force: bool,
    },
    /// Restore the WAL file named `wal_file` at `destination`.
    Get {
        wal_file: String,
        destination: PathBuf,
    },
}

/// What the daemon answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `ok stored`: the file is now durable in the repository.
    Stored,
    /// `ok already`: the repository already held identical content.
    AlreadyArchived,
    /// `ok spooled`: durable in the outage spool, to reach the repository once it answers.
    Spooled,
    /// `ok restored`: the destination holds the complete, verified file.
    Restored,
    /// `missing`: the file is not in the archive.
    Missing,
    /// `err <message>`: refused or failed; the hook exits 1 with the message.
    Failed(String),
    /// `unavailable <message>`: this daemon cannot serve the request; the hook does the work.
    Unavailable(String),
}

/// Why a line is not a request or a reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseError {
    /// The first word is no request this daemon knows.
    UnknownRequest(String),
    /// A known request with the wrong words after it.
    Malformed(&'static str),
    /// A path that is not absolute: the daemon's working directory is not the hook's.
    RelativePath(PathBuf),
    /// A `%` not followed by two hexadecimal digits.
    BadEscape,
    /// A line that is no reply.
    UnknownReply(String),
}

impl fmt::Display for ParseError {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParseError::UnknownRequest(word) => write!(formatter, "unknown request '{word}'"),
            ParseError::Malformed(what) => write!(formatter, "malformed {what} request"),
            ParseError::RelativePath(path) => {
                write!(formatter, "'{}' is not an absolute path", path.display())
            }
            ParseError::BadEscape => write!(formatter, "a '%' escape is not two hex digits"),
            ParseError::UnknownReply(line) => write!(formatter, "unknown reply '{line}'"),
        }
    }
}

impl std::error::Error for ParseError {}

impl Request {
    /// The request line, without its newline.
    pub fn encode(&self) -> String {
        match self {
            Request::Push {
                path,
                data_directory,
                force,
            } => {
                let mut line = format!("push {}", escape_path(path));
                if let Some(directory) = data_directory {
                    line.push_str(" pgdata=");
                    line.push_str(&escape_path(directory));
                }
                if *force {
                    line.push_str(" force");
                }
                line
            }
            Request::Get {
                wal_file,
                destination,
            } => format!(
                "get {} {}",
                escape(wal_file.as_bytes()),
                escape_path(destination)
            ),
        }
    }

    /// Parses a request line (without its newline).
    pub fn parse(line: &str) -> Result<Request, ParseError> {
        let mut words = line.split(' ');
        let verb = words.next().unwrap_or_default();
        match verb {
            "push" => {
                let path = absolute_path(words.next().ok_or(ParseError::Malformed("push"))?)?;
                let (mut data_directory, mut force) = (None, false);
                for word in words {
                    match word.strip_prefix("pgdata=") {
                        Some(directory) if data_directory.is_none() => {
                            data_directory = Some(absolute_path(directory)?);
                        }
                        None if word == "force" && !force => force = true,
                        _ => return Err(ParseError::Malformed("push")),
                    }
                }
                Ok(Request::Push {
                    path,
                    data_directory,
                    force,
                })
            }
            "get" => {
                let (Some(wal_file), Some(destination), None) =
                    (words.next(), words.next(), words.next())
                else {
                    return Err(ParseError::Malformed("get"));
                };
                let wal_file = String::from_utf8(unescape(wal_file)?)
                    .map_err(|_| ParseError::Malformed("get"))?;
                if wal_file.is_empty() {
                    return Err(ParseError::Malformed("get"));
                }
                Ok(Request::Get {
                    wal_file,
                    destination: absolute_path(destination)?,
                })
            }
            other => Err(ParseError::UnknownRequest(other.to_string())),
        }
    }
}

impl Reply {
    /// The reply line, without its newline. Line breaks in a message become spaces.
    pub fn encode(&self) -> String {
        let one_line = |message: &str| message.replace(['\n', '\r'], " ");
        match self {
            Reply::Stored => "ok stored".to_string(),
            Reply::AlreadyArchived => "ok already".to_string(),
            Reply::Spooled => "ok spooled".to_string(),
            Reply::Restored => "ok restored".to_string(),
            Reply::Missing => "missing".to_string(),
            Reply::Failed(message) => format!("err {}", one_line(message)),
            Reply::Unavailable(message) => format!("unavailable {}", one_line(message)),
        }
    }

    /// Parses a reply line (with or without its newline).
    pub fn parse(line: &str) -> Result<Reply, ParseError> {
        let line = line.strip_suffix('\n').unwrap_or(line);
        Ok(match line {
            "ok stored" => Reply::Stored,
            "ok already" => Reply::AlreadyArchived,
            "ok spooled" => Reply::Spooled,
            "ok restored" => Reply::Restored,
            "missing" => Reply::Missing,
            "err" => Reply::Failed(String::new()),
            "unavailable" => Reply::Unavailable(String::new()),
            other => {
                if let Some(message) = other.strip_prefix("err ") {
                    Reply::Failed(message.to_string())
                } else if let Some(message) = other.strip_prefix("unavailable ") {
                    Reply::Unavailable(message.to_string())
                } else {
                    return Err(ParseError::UnknownReply(other.to_string()));
                }
            }
        })
    }
}

/// A path as one word: every byte that is not printable ASCII, and `%` and the space, becomes
/// `%XX`. An ordinary path such as `/var/lib/postgresql/15/main/pg_wal/000000010000000000000003`
/// is sent as it is.
pub fn escape_path(path: &Path) -> String {
    escape(path.as_os_str().as_bytes())
}

fn escape(bytes: &[u8]) -> String {
    let mut word = String::with_capacity(bytes.len());
    for &byte in bytes {
        if byte == b'%' || !(0x21..0x7f).contains(&byte) {
            word.push_str(&format!("%{byte:02X}"));
        } else {
            word.push(byte as char);
        }
    }
    word
}

fn unescape(word: &str) -> Result<Vec<u8>, ParseError> {
    let bytes = word.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'%' {
            let digits = bytes
                .get(index + 1..index + 3)
                .ok_or(ParseError::BadEscape)?;
            let text = std::str::from_utf8(digits).map_err(|_| ParseError::BadEscape)?;
            if !text.bytes().all(|digit| digit.is_ascii_hexdigit()) {
                return Err(ParseError::BadEscape);
            }
            decoded.push(u8::from_str_radix(text, 16).map_err(|_| ParseError::BadEscape)?);
            index += 3;
        } else {
            decoded.push(bytes[index]);
            index += 1;
        }
    }
    Ok(decoded)
}

fn absolute_path(word: &str) -> Result<PathBuf, ParseError> {
    let path = PathBuf::from(OsString::from_vec(unescape(word)?));
    if path.is_absolute() {
        Ok(path)
    } else {
        Err(ParseError::RelativePath(path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn push(path: &str) -> Request {
        Request::Push {
            path: path.into(),
            data_directory: None,
            force: false,
        }
    }

    #[test]
    fn ordinary_requests_read_as_they_did() {
        let segment = "/srv/pg/pg_wal/000000010000000000000003";
        assert_eq!(push(segment).encode(), format!("push {segment}"));
        assert_eq!(
            Request::parse(&format!("push {segment}")),
            Ok(push(segment))
        );
        let get = Request::Get {
            wal_file: "00000002.history".into(),
            destination: "/srv/pg/pg_wal/RECOVERYHISTORY".into(),
        };
        assert_eq!(
            get.encode(),
            "get 00000002.history /srv/pg/pg_wal/RECOVERYHISTORY"
        );
        assert_eq!(Request::parse(&get.encode()), Ok(get));
        let full = Request::Push {
            path: "/a b/pg_wal/x%y".into(),
            data_directory: Some("/a b".into()),
            force: true,
        };
        assert_eq!(
            full.encode(),
            "push /a%20b/pg_wal/x%25y pgdata=/a%20b force"
        );
        assert_eq!(Request::parse(&full.encode()), Ok(full));
    }

    #[test]
    fn malformed_requests_are_refused_with_the_reason() {
        let cases = [
            ("", ParseError::UnknownRequest(String::new())),
            ("fetch /x", ParseError::UnknownRequest("fetch".into())),
            ("PUSH /x", ParseError::UnknownRequest("PUSH".into())),
            ("push", ParseError::Malformed("push")),
            ("push /x force force", ParseError::Malformed("push")),
            ("push /x pgdata=/a pgdata=/b", ParseError::Malformed("push")),
            ("push /x bogus", ParseError::Malformed("push")),
            ("push /x  force", ParseError::Malformed("push")),
            ("push pg_wal/x", ParseError::RelativePath("pg_wal/x".into())),
            (
                "push /x pgdata=data",
                ParseError::RelativePath("data".into()),
            ),
            ("push /x%2", ParseError::BadEscape),
            ("push /x%zz", ParseError::BadEscape),
            ("push /x%", ParseError::BadEscape),
            ("get 000000010000000000000003", ParseError::Malformed("get")),
            (
                "get 000000010000000000000003 /a /b",
                ParseError::Malformed("get"),
            ),
            ("get  /a", ParseError::Malformed("get")),
            ("get %FF /a", ParseError::Malformed("get")),
            (
                "get x RECOVERYXLOG",
                ParseError::RelativePath("RECOVERYXLOG".into()),
            ),
        ];
        for (line, expected) in cases {
            assert_eq!(Request::parse(line), Err(expected), "{line:?}");
        }
    }

    #[test]
    fn replies_round_trip_and_unknown_ones_are_refused() {
        for reply in [
            Reply::Stored,
            Reply::AlreadyArchived,
            Reply::Spooled,
            Reply::Restored,
            Reply::Missing,
            Reply::Failed("no such file".into()),
            Reply::Unavailable("unknown request 'stream'".into()),
            Reply::Failed(String::new()),
        ] {
            assert_eq!(Reply::parse(&reply.encode()), Ok(reply.clone()));
            assert_eq!(Reply::parse(&format!("{}\n", reply.encode())), Ok(reply));
        }
        assert_eq!(
            Reply::Failed("two\nlines\r".into()).encode(),
            "err two lines "
        );
        for line in ["ok", "ok maybe", "OK stored", "error x", "", "missing x"] {
            assert_eq!(
                Reply::parse(line),
                Err(ParseError::UnknownReply(line.into()))
            );
        }
    }

    fn any_path(absolute: bool) -> impl Strategy<Value = PathBuf> {
        proptest::collection::vec(
            any::<u8>().prop_filter("no NUL in a path", |b| *b != 0),
            0..64,
        )
        .prop_map(move |bytes| {
            let mut full = if absolute { b"/".to_vec() } else { Vec::new() };
            full.extend(bytes);
            PathBuf::from(OsString::from_vec(full))
        })
    }

    proptest! {
        #[test]
        fn every_request_round_trips_as_one_ascii_line(
            path in any_path(true),
            directory in proptest::option::of(any_path(true)),
            force in any::<bool>(),
            wal_file in "[^\u{0}]{1,40}",
        ) {
            let requests = [
                Request::Push { path: path.clone(), data_directory: directory, force },
                Request::Get { wal_file, destination: path },
            ];
            for request in requests {
                let line = request.encode();
                prop_assert!(line.bytes().all(|byte| (0x20..0x7f).contains(&byte)), "{line:?}");
                prop_assert_eq!(Request::parse(&line), Ok(request));
            }
        }

        #[test]
        fn every_reply_round_trips(message in "[^\n\r]{0,200}") {
            for reply in [Reply::Failed(message.clone()), Reply::Unavailable(message)] {
                prop_assert_eq!(Reply::parse(&reply.encode()), Ok(reply));
            }
        }

        #[test]
        fn no_line_makes_the_parser_panic(line in ".{0,300}") {
            let _ = Request::parse(&line);
            let _ = Reply::parse(&line);
        }
    }
}

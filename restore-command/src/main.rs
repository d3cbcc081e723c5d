//! `pitr-archive-get %f %p`: restore_command that starts in about the time of a bare process.
//!
//! It sends the wanted file name and the absolute destination (resolved against the working
//! directory, as `pitr archive-get` does, never against `PITR_PGDATA`) to the daemon's socket.
//! The daemon checks the name and the destination, then serves the file from its prefetch spool
//! or the repository; its answer is the exit code (`missing`: exit 1 quietly). When no daemon
//! answers, this process becomes `pitr archive-get` with the same arguments. See
//! `pitr_hook_protocol::client` for how the socket is found and which arguments are left to pitr.

use std::process::ExitCode;

use pitr_hook_protocol::client::{self, Outcome};
use pitr_hook_protocol::{Reply, Request};

fn main() -> ExitCode {
    client::run(
        "archive-get",
        2,
        // A %f that is not text is left to pitr, which refuses it as pitr does.
        |given, _| {
            Some(Request::Get {
                wal_file: given[0].to_str()?.to_string(),
                destination: absolute(given[1].as_ref()),
            })
        },
        |reply| match reply {
            Reply::Restored => Outcome::Success,
            Reply::Missing => Outcome::NotFound,
            Reply::Failed(message) => Outcome::Failed(message),
            Reply::Unavailable(_) => Outcome::HandOver,
            other => Outcome::Failed(other.encode()),
        },
    )
}

/// Postgres runs restore_command in its data directory and passes %p relative to it.
fn absolute(path: &std::path::Path) -> std::path::PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

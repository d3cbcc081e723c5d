//! `pitr-archive-push %p`: archive_command that starts in about the time of a bare process.
//!
//! It sends the file's absolute path (resolved against the working directory, as `pitr
//! archive-push` does, never against `PITR_PGDATA`) and the data directory to the daemon's
//! socket. The daemon runs every check `pitr archive-push` runs (name, regular file, header,
//! history parse, cluster against this data directory, `.ready`) before anything else, then
//! answers; its answer is the exit code. When no daemon answers, this process becomes `pitr
//! archive-push` with the same arguments. See `pitr_hook_protocol::client` for how the socket is
//! found and which arguments are left to pitr.

use std::process::ExitCode;

use pitr_hook_protocol::client::{self, Outcome};
use pitr_hook_protocol::{Reply, Request};

fn main() -> ExitCode {
    client::run(
        "archive-push",
        1,
        |given, location| {
            Some(Request::Push {
                path: absolute(given[0].as_ref()),
                data_directory: Some(absolute(&location.data_directory)),
                force: false,
            })
        },
        |reply| match reply {
            Reply::Stored | Reply::AlreadyArchived | Reply::Spooled => Outcome::Success,
            Reply::Failed(message) => Outcome::Failed(message),
            Reply::Unavailable(_) => Outcome::HandOver,
            // What pitr does with a reply that makes no sense for a push: fail, naming it.
            other => Outcome::Failed(other.encode()),
        },
    )
}

/// Postgres runs archive_command in its data directory and passes %p relative to it.
fn absolute(path: &std::path::Path) -> std::path::PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

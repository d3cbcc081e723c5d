//! The daemon's side of the hook socket: accepts only the daemon's own user (checked before
//! anything is read), reads one request line of bounded length within a deadline, answers one
//! line. The wire format is `pitr_hook_protocol`'s, shared with both kinds of hooks.
//!
//! A push is checked here exactly as `pitr archive-push` checks it before it asks (name, regular
//! file, header, history parse, cluster against the hook's data directory, `.ready` unless
//! forced), so a hook that sends a path unchecked (the small `pitr-archive-push`) can never get
//! an `ok` that `pitr archive-push` would have refused.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use pitr_hook_protocol::{PROTOCOL, ParseError, REQUEST_LIMIT, REQUEST_TIMEOUT, Reply, Request};

use crate::archive::get::{self as archive_get, GetOutcome};
use crate::archive::push::{self as archive_push, PushOutcome};
use crate::daemon::Daemon;
use crate::daemon::metrics::HookLabels;

pub fn bind(path: &Path) -> Result<UnixListener> {
    // A socket left by a killed daemon would make bind fail; nothing else lives at this path.
    if path.exists() {
        std::fs::remove_file(path)
            .with_context(|| format!("removing the stale socket {}", path.display()))?;
    }
    let listener = UnixListener::bind(path)
        .with_context(|| format!("binding the hook socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

pub async fn serve(listener: UnixListener, daemon: Arc<Daemon>) {
    // SAFETY: getuid has no preconditions and cannot fail.
    let own_uid = unsafe { libc::getuid() };
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let daemon = Arc::clone(&daemon);
        tokio::spawn(async move {
            if let Err(error) = answer(stream, own_uid, &daemon).await {
                tracing::debug!("hook connection: {error:#}");
            }
        });
    }
}

async fn answer(mut stream: UnixStream, own_uid: u32, daemon: &Daemon) -> Result<()> {
    // Who is asking is known from the connection itself (SO_PEERCRED), so a stranger is
    // refused before the daemon reads, let alone buffers, a single byte of what it sent.
    let peer = stream.peer_cred()?.uid();
    if peer != own_uid {
        let refusal = format!(
            "err the pitr daemon only answers its own user (uid {own_uid}), not uid {peer}\n"
        );
        return refuse(stream, &refusal).await;
    }
    let request = match read_request(&mut stream).await {
        Ok(request) => request,
        Err(problem) => return refuse(stream, &format!("err {problem}; {PROTOCOL}\n")).await,
    };
    let reply = match Request::parse(request.trim_end()) {
        Ok(Request::Push {
            path,
            data_directory,
            force,
        }) => push(daemon, &path, data_directory.as_deref(), force).await,
        Ok(Request::Get {
            wal_file,
            destination,
        }) => get(daemon, &wal_file, &destination).await,
        // A request word from a newer hook: it does the work itself, as with no daemon.
        Err(ParseError::UnknownRequest(word)) => {
            Reply::Unavailable(format!("this daemon does not know the request '{word}'"))
        }
        Err(problem) => Reply::Failed(format!("{problem}; {PROTOCOL}")),
    };
    stream
        .write_all(format!("{}\n", reply.encode()).as_bytes())
        .await?;
    Ok(())
}

/// Why a request line was not accepted; the client gets it as `err <reason>; <PROTOCOL>`.
#[derive(Debug, thiserror::Error)]
enum RequestError {
    #[error("the request is longer than {REQUEST_LIMIT} bytes")]
    TooLong,
    #[error("no request line arrived within {} s", REQUEST_TIMEOUT.as_secs())]
    TimedOut,
    #[error("the connection closed before a whole request line arrived")]
    Incomplete,
    #[error("the request is not UTF-8")]
    NotText,
    #[error("reading the request failed: {0}")]
    Read(#[from] std::io::Error),
}

/// Reads one request line of at most `REQUEST_LIMIT` bytes within `REQUEST_TIMEOUT`, so a
/// client can hold neither memory nor a connection for long.
async fn read_request(stream: &mut UnixStream) -> Result<String, RequestError> {
    let mut line = Vec::with_capacity(256);
    let mut limited = BufReader::new(&mut *stream).take(REQUEST_LIMIT as u64 + 1);
    tokio::time::timeout(REQUEST_TIMEOUT, limited.read_until(b'\n', &mut line))
        .await
        .map_err(|_| RequestError::TimedOut)??;
    if line.last() != Some(&b'\n') {
        return Err(if line.len() > REQUEST_LIMIT {
            RequestError::TooLong
        } else {
            RequestError::Incomplete
        });
    }
    line.pop();
    String::from_utf8(line).map_err(|_| RequestError::NotText)
}

/// Answers `refusal` and closes. Whatever the client sent meanwhile is read and dropped, a
/// small buffer at a time and no more than one request's worth, so a client that is still
/// writing its request sees the answer, not a connection reset.
async fn refuse(mut stream: UnixStream, refusal: &str) -> Result<()> {
    stream.write_all(refusal.as_bytes()).await?;
    stream.shutdown().await?;
    let mut discard = [0u8; 1024];
    let mut discarded = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
    while discarded <= REQUEST_LIMIT {
        match tokio::time::timeout_at(deadline, stream.read(&mut discard)).await {
            Ok(Ok(count)) if count > 0 => {
                discarded += count;
                if discard[..count].contains(&b'\n') {
                    break;
                }
            }
            _ => break,
        }
    }
    Ok(())
}

/// `pitr archive-push`'s checks, for a hook whose data directory is `data_directory` (the
/// daemon's own when the hook did not say).
fn check_as_the_hook_does(
    daemon: &Daemon,
    path: &Path,
    data_directory: Option<&Path>,
    force: bool,
) -> Result<()> {
    let pgdata = data_directory.unwrap_or(&daemon.settings.pgdata);
    let file = archive_push::validate(pgdata, path)?;
    if !force {
        archive_push::require_ready(&file)?;
    }
    Ok(())
}

async fn push(daemon: &Daemon, path: &Path, data_directory: Option<&Path>, force: bool) -> Reply {
    let hook = |result| {
        daemon
            .metrics
            .hook_requests
            .get_or_create(&HookLabels { result })
            .inc()
    };
    if let Err(error) = check_as_the_hook_does(daemon, path, data_directory, force) {
        hook("failed");
        return Reply::Failed(format!("{error:#}"));
    }
    if daemon.archiver.is_durable(path) {
        hook("durable");
        return Reply::AlreadyArchived;
    }
    let upload = daemon.archiver.request(path);
    // With an outage spool the upload first tries the store for `store_timeout`, then spools;
    // the hook waits `store_timeout` + 5 s for the answer.
    let limit = match daemon.settings.outage_spool {
        Some(_) => daemon.settings.store_timeout + Duration::from_secs(3),
        None => daemon.settings.store_timeout,
    };
    match tokio::time::timeout(limit, upload).await {
        Ok(Ok(PushOutcome::Stored)) => {
            hook("waited");
            Reply::Stored
        }
        Ok(Ok(PushOutcome::AlreadyArchived)) => {
            hook("waited");
            Reply::AlreadyArchived
        }
        Ok(Ok(PushOutcome::Spooled)) => {
            hook("spooled");
            Reply::Spooled
        }
        Ok(Err(error)) => {
            hook("failed");
            Reply::Failed(error)
        }
        Err(_) => {
            hook("failed");
            Reply::Failed(format!(
                "archiving {} did not finish within {} s; Postgres will retry",
                path.display(),
                limit.as_secs()
            ))
        }
    }
}

/// `pitr archive-get`'s checks (a WAL file name, a destination that is no directory), then the
/// prefetcher's answer.
async fn get(daemon: &Daemon, wal_file: &str, destination: &Path) -> Reply {
    let name = match wal_file.parse() {
        Ok(name) => name,
        Err(error) => return Reply::Failed(format!("{error}")),
    };
    if let Err(error) = archive_get::refuse_directory_destination(destination) {
        return Reply::Failed(format!("{error:#}"));
    }
    match daemon.prefetcher.get(name, destination).await {
        Ok(GetOutcome::Restored) => Reply::Restored,
        Ok(GetOutcome::NotFound) => Reply::Missing,
        Err(error) => Reply::Failed(format!("{error:#}")),
    }
}

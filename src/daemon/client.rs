//! The full hooks' side of the daemon socket (the wire format is `pitr_hook_protocol`'s).
//!
//! One request per connection, one line each way. If no daemon answers (no socket, refused, it
//! dies mid-request, or it answers `unavailable`) the hook returns `None` and does the work
//! itself, so the daemon only ever makes the hooks faster, never less safe.

use std::path::Path;

use anyhow::{Result, bail};
use pitr_hook_protocol::{CONNECT_TIMEOUT, REPLY_MARGIN, REQUEST_LIMIT, Reply, Request};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::archive::get::GetOutcome;
use crate::archive::push::PushOutcome;
use crate::config::Settings;
use crate::wal::WalFileName;

/// Asks the daemon to make `path` durable, after the same checks (the `.ready` one unless
/// `force`). `None`: no daemon answered, push directly.
pub async fn push(settings: &Settings, path: &Path, force: bool) -> Result<Option<PushOutcome>> {
    let request = Request::Push {
        path: std::path::absolute(path)?,
        data_directory: Some(std::path::absolute(&settings.pgdata)?),
        force,
    };
    match ask(settings, &request).await {
        None | Some(Ok(Reply::Unavailable(_))) => Ok(None),
        Some(Ok(Reply::Stored)) => Ok(Some(PushOutcome::Stored)),
        Some(Ok(Reply::AlreadyArchived)) => Ok(Some(PushOutcome::AlreadyArchived)),
        Some(Ok(Reply::Spooled)) => Ok(Some(PushOutcome::Spooled)),
        Some(Ok(Reply::Failed(message))) => bail!("{message}"),
        Some(Ok(other)) => bail!("{}", other.encode()),
        Some(Err(line)) => bail!("{line}"),
    }
}

/// Asks the daemon to restore `name` at `destination`. `None`: no daemon answered.
pub async fn get(
    settings: &Settings,
    name: &WalFileName,
    destination: &Path,
) -> Result<Option<GetOutcome>> {
    let request = Request::Get {
        wal_file: name.to_string(),
        destination: destination.to_path_buf(),
    };
    match ask(settings, &request).await {
        None | Some(Ok(Reply::Unavailable(_))) => Ok(None),
        Some(Ok(Reply::Restored)) => Ok(Some(GetOutcome::Restored)),
        Some(Ok(Reply::Missing)) => Ok(Some(GetOutcome::NotFound)),
        Some(Ok(Reply::Failed(message))) => bail!("{message}"),
        Some(Ok(other)) => bail!("{}", other.encode()),
        Some(Err(line)) => bail!("{line}"),
    }
}

/// The reply, or the line that was no reply; `None` if no daemon answered.
async fn ask(settings: &Settings, request: &Request) -> Option<Result<Reply, String>> {
    let mut line = request.encode();
    // A path of many escaped bytes can exceed what the daemon reads: do the work here instead.
    if line.len() > REQUEST_LIMIT || !settings.socket.exists() {
        return None;
    }
    line.push('\n');
    let connect = UnixStream::connect(&settings.socket);
    let mut stream = tokio::time::timeout(CONNECT_TIMEOUT, connect)
        .await
        .ok()?
        .ok()?;
    stream.write_all(line.as_bytes()).await.ok()?;
    let mut answer = String::new();
    // The daemon bounds its own work by the store timeout; allow it that, plus a margin.
    let wait = settings.store_timeout + REPLY_MARGIN;
    let mut reader = BufReader::new(&mut stream);
    let read = reader.read_line(&mut answer);
    match tokio::time::timeout(wait, read).await {
        Ok(Ok(count)) if count > 0 => {
            let answer = answer.trim_end();
            Some(Reply::parse(answer).map_err(|_| answer.to_string()))
        }
        _ => None,
    }
}

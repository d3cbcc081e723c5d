//! The hooks' side of the daemon socket.
//!
//! One request per connection, one line each way: `push <path>` or `get <walfile> <dest>`, and
//! the answer `ok stored`, `ok already`, `ok spooled`, `ok restored`, `missing` or `err <message>`. If no
//! daemon answers (no socket, refused, or it dies mid-request) the hook returns `None` and does
//! the work itself, so the daemon only ever makes the hooks faster, never less safe.

use std::path::Path;
use std::time::Duration;

use anyhow::{Result, bail};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::archive::get::GetOutcome;
use crate::archive::push::PushOutcome;
use crate::config::Settings;
use crate::wal::WalFileName;

/// Asks the daemon to make `path` durable. `None`: no daemon answered, push directly.
pub async fn push(settings: &Settings, path: &Path) -> Result<Option<PushOutcome>> {
    let path = std::path::absolute(path)?;
    let Some(answer) = ask(settings, &format!("push {}", path.display())).await else {
        return Ok(None);
    };
    match answer.as_str() {
        "ok stored" => Ok(Some(PushOutcome::Stored)),
        "ok already" => Ok(Some(PushOutcome::AlreadyArchived)),
        "ok spooled" => Ok(Some(PushOutcome::Spooled)),
        other => bail!("{}", other.strip_prefix("err ").unwrap_or(other)),
    }
}

/// Asks the daemon to restore `name` at `destination`. `None`: no daemon answered.
pub async fn get(
    settings: &Settings,
    name: &WalFileName,
    destination: &Path,
) -> Result<Option<GetOutcome>> {
    let Some(answer) = ask(settings, &format!("get {name} {}", destination.display())).await else {
        return Ok(None);
    };
    match answer.as_str() {
        "ok restored" => Ok(Some(GetOutcome::Restored)),
        "missing" => Ok(Some(GetOutcome::NotFound)),
        other => bail!("{}", other.strip_prefix("err ").unwrap_or(other)),
    }
}

async fn ask(settings: &Settings, request: &str) -> Option<String> {
    if !settings.socket.exists() {
        return None;
    }
    let connect = UnixStream::connect(&settings.socket);
    let mut stream = tokio::time::timeout(Duration::from_millis(500), connect)
        .await
        .ok()?
        .ok()?;
    stream
        .write_all(format!("{request}\n").as_bytes())
        .await
        .ok()?;
    let mut answer = String::new();
    // The daemon bounds its own work by the store timeout; allow it that, plus a margin.
    let wait = settings.store_timeout + Duration::from_secs(5);
    let mut reader = BufReader::new(&mut stream);
    let read = reader.read_line(&mut answer);
    match tokio::time::timeout(wait, read).await {
        Ok(Ok(count)) if count > 0 => Some(answer.trim_end().to_string()),
        _ => None,
    }
}

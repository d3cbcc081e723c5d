//! The daemon's side of the hook socket: accepts only the daemon's own user, reads one request
//! line, answers one line. See `client` for the protocol.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::commands::archive_get::GetOutcome;
use crate::commands::archive_push::PushOutcome;
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
    // Read the request before refusing, so the refusal reaches the client instead of a reset.
    let mut request = String::new();
    BufReader::new(&mut stream).read_line(&mut request).await?;
    let peer = stream.peer_cred()?.uid();
    if peer != own_uid {
        stream
            .write_all(format!("err the pitr daemon only answers its own user (uid {own_uid}), not uid {peer}\n").as_bytes())
            .await?;
        return Ok(());
    }
    let reply = match request.trim_end().split_once(' ') {
        Some(("push", path)) => push(daemon, Path::new(path)).await,
        Some(("get", arguments)) => get(daemon, arguments).await,
        _ => "err unknown request".to_string(),
    };
    stream
        .write_all(format!("{}\n", reply.replace('\n', " ")).as_bytes())
        .await?;
    Ok(())
}

async fn push(daemon: &Daemon, path: &Path) -> String {
    let hook = |result| {
        daemon
            .metrics
            .hook_requests
            .get_or_create(&HookLabels { result })
            .inc()
    };
    if daemon.archiver.is_durable(path) {
        hook("durable");
        return "ok already".to_string();
    }
    let upload = daemon.archiver.request(path);
    // With an outage spool the upload first tries the store for `store_timeout`, then spools;
    // the hook waits `store_timeout` + 5 s for the answer.
    let limit = match daemon.settings.outage_spool {
        Some(_) => daemon.settings.store_timeout + std::time::Duration::from_secs(3),
        None => daemon.settings.store_timeout,
    };
    match tokio::time::timeout(limit, upload).await {
        Ok(Ok(PushOutcome::Stored)) => {
            hook("waited");
            "ok stored".to_string()
        }
        Ok(Ok(PushOutcome::AlreadyArchived)) => {
            hook("waited");
            "ok already".to_string()
        }
        Ok(Ok(PushOutcome::Spooled)) => {
            hook("spooled");
            "ok spooled".to_string()
        }
        Ok(Err(error)) => {
            hook("failed");
            format!("err {error}")
        }
        Err(_) => {
            hook("failed");
            format!(
                "err archiving {} did not finish within {} s; Postgres will retry",
                path.display(),
                limit.as_secs()
            )
        }
    }
}

async fn get(daemon: &Daemon, arguments: &str) -> String {
    let Some((name, destination)) = arguments.split_once(' ') else {
        return "err malformed get request".to_string();
    };
    let name = match name.parse() {
        Ok(name) => name,
        Err(error) => return format!("err {error}"),
    };
    match daemon.prefetcher.get(name, Path::new(destination)).await {
        Ok(GetOutcome::Restored) => "ok restored".to_string(),
        Ok(GetOutcome::NotFound) => "missing".to_string(),
        Err(error) => format!("err {error:#}"),
    }
}

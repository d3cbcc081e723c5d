//! `pitr archive-push <path>`: Postgres's archive_command.
//!
//! The command only resolves its argument, lets a running daemon answer, and otherwise calls
//! `archive::push` itself (which owns the checks, the upload and the comparison), then moves a
//! few objects out of the outage spool, since without a daemon nothing else empties it.

use std::path::Path;

use anyhow::Result;

use crate::archive::outage_spool::OutageSpool;
use crate::archive::push::{PushOutcome, push, require_ready, validate};
use crate::config::Settings;
use crate::repository::Repository;

/// The hook: validate, check that Postgres has finished the file (unless `force`), then let the
/// daemon answer if one runs, else push directly.
pub async fn run(settings: &Settings, path: &Path, force: bool) -> Result<PushOutcome> {
    let file = validate(&settings.pgdata, path)?;
    if !force {
        require_ready(&file)?;
    }
    if let Some(outcome) = crate::daemon::client::push(settings, &file.path, force).await? {
        return Ok(outcome);
    }
    let repository = Repository::open(settings)?;
    let spool = OutageSpool::open(settings, repository.keyring())?;
    let outcome = push(
        &repository,
        &file,
        &settings.wal_encode_options(),
        false,
        None,
        spool.as_ref(),
    )
    .await?;
    crate::archive::prefetch::clear_leftover_spool(&settings.pgdata);
    if let Some(spool) = &spool
        && outcome != PushOutcome::Spooled
    {
        // Without a daemon nothing else empties the spool: each push that reached the store
        // moves a few objects, so the spool shrinks faster than an outage-free archiver fills it.
        if let Err(error) = spool.drain(&repository, SPOOL_OBJECTS_PER_HOOK).await {
            tracing::warn!("the outage spool was not emptied: {error:#}");
        }
    }
    Ok(outcome)
}

/// Spooled objects a hook moves into the repository after its own push.
const SPOOL_OBJECTS_PER_HOOK: usize = 4;

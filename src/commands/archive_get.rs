//! `pitr archive-get <walfile> <dest>`: Postgres's restore_command.
//!
//! When the daemon runs, it answers: from its prefetch spool if the segment was fetched ahead
//! (a rename), otherwise by fetching it. Without a daemon the hook serves a segment the
//! prefetch worker already fetched, or fetches the object itself (`archive::get`), and then
//! starts the worker to fetch the segments after it. Also the hidden `pitr prefetch-worker`.

use std::path::Path;
use std::sync::Arc;

use anyhow::Result;

use crate::archive::get::{
    GetOutcome, absolute_destination, adopt_outage_spool_identity, check_cluster, fetch_or_spooled,
    refuse_directory_destination,
};
use crate::archive::outage_spool::OutageSpool;
use crate::archive::prefetch::{self, PrefetchCounters, PrefetchSettings, Prefetcher};
use crate::config::Settings;
use crate::repository::Repository;
use crate::wal::{SegmentName, WalFileName};

pub async fn run(settings: &Settings, wal_file: &str, destination: &Path) -> Result<GetOutcome> {
    let name: WalFileName = wal_file.parse()?;
    let destination = absolute_destination(destination);
    refuse_directory_destination(&destination)?;
    if let Some(outcome) = crate::daemon::client::get(settings, &name, &destination).await? {
        return Ok(outcome);
    }
    let repository = Arc::new(Repository::open(settings)?);
    let outage_spool = OutageSpool::open(settings, repository.keyring())?;
    let held_by_outage_spool =
        adopt_outage_spool_identity(outage_spool.as_ref(), &repository, &name).await;
    if settings.prefetch_segments == 0 || held_by_outage_spool {
        check_cluster(&settings.pgdata, &repository, wal_file).await?;
        return fetch_or_spooled(outage_spool.as_ref(), &repository, &name, &destination).await;
    }
    let prefetcher = Prefetcher::new(
        &PrefetchSettings::new(settings, outage_spool.clone()),
        Arc::clone(&repository),
        PrefetchCounters::default(),
    );
    // A spooled copy was fetched and verified by a worker that a hook started here only after
    // this data directory passed the cluster check, or that `pitr restore` started for a
    // backup from the same repository, so serving it needs no round trip to the store (on a
    // remote one, that round trip was most of a hit's time).
    let served_from_spool = prefetcher.take_spooled(&name, &destination)?
        || (prefetcher
            .wait_for_worker(&name, settings.store_timeout)
            .await
            && prefetcher.take_spooled(&name, &destination)?);
    let outcome = if served_from_spool {
        GetOutcome::Restored
    } else {
        let adopted = prefetch::adopt_remembered_identity(&settings.pgdata, &repository);
        check_cluster(&settings.pgdata, &repository, wal_file).await?;
        if !adopted {
            prefetch::remember_identity(&settings.pgdata, &repository);
        }
        fetch_or_spooled(outage_spool.as_ref(), &repository, &name, &destination).await?
    };
    if let (GetOutcome::Restored, WalFileName::Segment(segment)) = (outcome, name) {
        // A running worker picks the request up by itself; starting another would only exit.
        prefetcher.record_request(segment);
        if !prefetcher.worker_running() {
            prefetch::start_worker(&settings.child_environment(), segment);
        }
    }
    Ok(outcome)
}

/// The background worker: fetch the segments after `segment` into the spool, then exit.
pub async fn prefetch_worker(settings: &Settings, segment: &str) -> Result<()> {
    let segment: SegmentName = segment.parse()?;
    let repository = Arc::new(Repository::open(settings)?);
    let outage_spool = OutageSpool::open(settings, repository.keyring())?;
    let prefetcher = Prefetcher::new(
        &PrefetchSettings::new(settings, outage_spool),
        Arc::clone(&repository),
        PrefetchCounters::default(),
    );
    prefetch::adopt_remembered_identity(&settings.pgdata, &repository);
    prefetcher.fetch_ahead(segment).await
}

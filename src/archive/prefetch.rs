//! Prefetch on restore: keep recovery fed with segments fetched ahead, in parallel.
//!
//! The daemon runs it in-process. Without a daemon, `archive-get` serves from the same spool
//! and starts a short-lived background process (`pitr prefetch-worker`) that fills it, the way
//! pgBackRest's asynchronous archive-get does.
//!
//! When Postgres asks for segment N, the daemon answers it and starts fetching N+1…N+k (k from
//! `PITR_PREFETCH`, capped by `PITR_PREFETCH_MAX_MB`) into a spool directory inside `pg_wal`, so
//! that the next requests are a rename. Spooled files went through the same verification as any
//! fetch and are fsynced before they count. They are keyed by their full name, timeline
//! included, so a file from another timeline can never be served. Files older than the one
//! requested are deleted, and the whole spool is cleared when recovery is over.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::Result;
use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use serde::Serialize;
use tokio::sync::Semaphore;

use crate::archive::get::{self as archive_get, GetOutcome};
use crate::archive::outage_spool::OutageSpool;
use crate::config::Settings;
use crate::durable;
use crate::envelope::DecodeMode;
use crate::repository::Repository;
use crate::wal::{SegmentName, WalFileName};

pub const SPOOL_DIRECTORY: &str = "pitr-prefetch";
/// Held by the one background worker that fills the spool.
const WORKER_LOCK: &str = ".lock";
/// The segment recovery asked for last, written by the hooks.
const LATEST_REQUEST: &str = ".latest-request";
/// The repository identity a hook or worker read from the store, for later ones to reuse.
const IDENTITY_COPY: &str = ".identity";
/// How often a hook looks whether the worker has finished the file it waits for.
const WORKER_POLL: std::time::Duration = std::time::Duration::from_millis(1);
/// Fetches in flight from a remote store: enough to hide a round trip of tens of ms.
const REMOTE_FETCHES: usize = 8;

type Fetch = Shared<BoxFuture<'static, Result<GetOutcome, String>>>;

pub struct Prefetcher {
    repository: Arc<Repository>,
    counters: PrefetchCounters,
    spool: PathBuf,
    depth: usize,
    max_bytes: u64,
    fetching: Mutex<HashMap<String, Fetch>>,
    slots: Arc<Semaphore>,
    /// Where a file archived during an outage waits until the repository has it.
    outage_spool: Option<OutageSpool>,
}

/// What the prefetcher needs to know, and nothing else of the settings.
pub struct PrefetchSettings {
    /// The data directory, whose `pg_wal` holds the spool.
    pub pgdata: PathBuf,
    /// Segments fetched ahead (`PITR_PREFETCH`).
    pub depth: usize,
    /// Cap on the spool's bytes (`PITR_PREFETCH_MAX_MB`).
    pub max_bytes: u64,
    /// Parallel transfers allowed (`PITR_ARCHIVE_CONCURRENCY`).
    pub concurrency: usize,
    /// Where files archived during an outage wait until the repository has them.
    pub outage_spool: Option<OutageSpool>,
}

impl PrefetchSettings {
    pub fn new(settings: &Settings, outage_spool: Option<OutageSpool>) -> Self {
        PrefetchSettings {
            pgdata: settings.pgdata.clone(),
            depth: settings.prefetch_segments,
            max_bytes: settings.prefetch_max_bytes,
            concurrency: settings.archive_concurrency,
            outage_spool,
        }
    }
}

/// Hits and misses, counted where the daemon's metrics (or nobody, in a hook) can read them:
/// the daemon passes clones of its registered counters, which share their values.
#[derive(Clone, Default)]
pub struct PrefetchCounters {
    pub hits: prometheus_client::metrics::counter::Counter,
    pub misses: prometheus_client::metrics::counter::Counter,
}

/// Lets `repository` use the identity an earlier hook of this recovery read from it, so a
/// miss or a starting worker does not spend a round trip on it (see
/// `Repository::adopt_identity_copy`). True if adopted; any doubt about the copy, a refusal
/// included, means the store is asked.
pub fn adopt_remembered_identity(pgdata: &Path, repository: &Repository) -> bool {
    repository
        .adopt_identity_copy(&spool_of(pgdata).join(IDENTITY_COPY))
        .unwrap_or(false)
}

/// Keeps the identity `repository` has read, for `adopt_remembered_identity`.
pub fn remember_identity(pgdata: &Path, repository: &Repository) {
    repository.keep_identity_copy(&spool_of(pgdata).join(IDENTITY_COPY));
}

fn spool_of(pgdata: &Path) -> PathBuf {
    pgdata.join("pg_wal").join(SPOOL_DIRECTORY)
}

/// Removes the spool a recovery without a daemon left behind (up to `PITR_PREFETCH` segments
/// fetched past the recovery target), once no worker fills it. archive-push calls it: a server
/// that archives has finished recovery, or is a standby with archive_mode=always, which only
/// loses its prefetched copies and fetches those segments directly.
pub fn clear_leftover_spool(pgdata: &Path) {
    let spool = spool_of(pgdata);
    if spool.exists() && !worker_holds_lock(&spool) {
        let _ = std::fs::remove_dir_all(&spool);
    }
}

/// Starts `pitr prefetch-worker` in the background to fill the spool with the segments after
/// `segment`, and returns at once. The worker reads its settings from `environment`
/// (`Settings::child_environment`).
pub fn start_worker(environment: &[(&'static str, std::ffi::OsString)], segment: SegmentName) {
    use std::os::unix::process::CommandExt;
    let Ok(executable) = std::env::current_exe() else {
        return;
    };
    let mut command = std::process::Command::new(executable);
    command.arg("prefetch-worker").arg(segment.to_string());
    command.envs(environment.iter().map(|(key, value)| (key, value)));
    // Its own process group, no terminal: Postgres must not wait for it or signal it.
    command
        .process_group(0)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    if let Err(error) = command.spawn() {
        tracing::debug!("cannot start the prefetch worker: {error}");
    }
}

fn worker_holds_lock(spool: &Path) -> bool {
    std::fs::File::open(spool.join(WORKER_LOCK)).is_ok_and(|lock| lock.try_lock_shared().is_err())
}

#[derive(Debug, Serialize)]
pub struct PrefetchStatus {
    pub depth: usize,
    pub spooled: Vec<String>,
    pub fetching: usize,
    pub hits: u64,
    pub misses: u64,
}

impl Prefetcher {
    pub fn new(
        settings: &PrefetchSettings,
        repository: Arc<Repository>,
        counters: PrefetchCounters,
    ) -> Arc<Self> {
        // A local fetch is CPU work, so at most one per CPU (more only adds memory). A remote fetch mostly
        // waits on the network, so more run at once (each holds only a few decoded chunks).
        let slots = if repository.is_local() {
            settings.concurrency.min(crate::config::cpu_count()).max(2)
        } else {
            settings
                .concurrency
                .max(REMOTE_FETCHES.min(settings.depth))
                .max(2)
        };
        Arc::new(Prefetcher {
            repository,
            counters,
            spool: spool_of(&settings.pgdata),
            depth: settings.depth,
            max_bytes: settings.max_bytes,
            fetching: Mutex::new(HashMap::new()),
            slots: Arc::new(Semaphore::new(slots)),
            outage_spool: settings.outage_spool.clone(),
        })
    }

    /// Answers one restore_command request and schedules the segments after it.
    pub async fn get(
        self: &Arc<Self>,
        name: WalFileName,
        destination: &Path,
    ) -> Result<GetOutcome> {
        if let WalFileName::Segment(segment) = name {
            self.schedule_after(segment).await;
        }
        let pending = self
            .fetching
            .lock()
            .unwrap()
            .get(&name.to_string())
            .cloned();
        // A failed prefetch is not this request's failure: it falls through to a direct fetch.
        if let Some(pending) = pending
            && let Err(error) = pending.await
        {
            tracing::debug!(file = %name, "prefetch failed, fetching directly: {error}");
        }
        if self.take_spooled(&name, destination)? {
            return Ok(GetOutcome::Restored);
        }
        self.counters.misses.inc();
        archive_get::fetch_or_spooled(
            self.outage_spool.as_ref(),
            &self.repository,
            &name,
            destination,
        )
        .await
    }

    /// Moves a spooled copy of `name` to `destination`; false if none was fetched ahead.
    pub fn take_spooled(&self, name: &WalFileName, destination: &Path) -> Result<bool> {
        let spooled = self.spool.join(name.to_string());
        match std::fs::rename(&spooled, destination) {
            Ok(()) => {
                durable::sync_parent_directory(destination)?;
                self.counters.hits.inc();
                Ok(true)
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(false),
            // Another filesystem, say: the caller fetches directly instead.
            Err(error) => {
                tracing::debug!(file = %name, "cannot move the prefetched copy ({error}); fetching directly");
                let _ = std::fs::remove_file(&spooled);
                Ok(false)
            }
        }
    }

    /// Fetches the segments after `segment` into the spool: the work of the background process
    /// a hook starts when no daemon runs. Only one runs at a time. Recovery keeps asking while
    /// it runs, so each finished fetch moves the window up to the latest request the hooks
    /// recorded, and the spool does not drain between workers. It exits once nothing is in
    /// flight and recovery has not moved on.
    pub async fn fetch_ahead(self: &Arc<Self>, segment: SegmentName) -> Result<()> {
        std::fs::create_dir_all(&self.spool)?;
        let lock = std::fs::File::create(self.spool.join(WORKER_LOCK))?;
        if lock.try_lock().is_err() {
            return Ok(());
        }
        let mut requested = segment;
        self.schedule_after(requested).await;
        loop {
            let pending: Vec<Fetch> = self.fetching.lock().unwrap().values().cloned().collect();
            if pending.is_empty() {
                return Ok(());
            }
            // A failed prefetch only means the hook will fetch that segment itself.
            let _ = futures::future::select_all(pending).await;
            if let Some(latest) = self.latest_request()
                && latest > requested
            {
                requested = latest;
                self.schedule_after(requested).await;
            }
        }
    }

    /// Records the segment recovery asked for last, for a running worker to keep ahead of.
    /// Not durable, and need not be: a lost or torn record only makes the worker stop sooner.
    pub fn record_request(&self, segment: SegmentName) {
        let _ = std::fs::create_dir_all(&self.spool);
        let _ = std::fs::write(self.spool.join(LATEST_REQUEST), segment.to_string());
    }

    fn latest_request(&self) -> Option<SegmentName> {
        std::fs::read_to_string(self.spool.join(LATEST_REQUEST))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// When the background worker is fetching `name` right now, waits until it is spooled
    /// (true) or the worker gave up on it (false). Without this, a hook that arrives while its
    /// segment is in flight fetches it a second time, which on a remote store costs a full
    /// round trip and the bandwidth of the segment. Bounded by `limit`.
    pub async fn wait_for_worker(&self, name: &WalFileName, limit: std::time::Duration) -> bool {
        let spooled = self.spool.join(name.to_string());
        let in_flight_prefix = format!(".{name}.pitr-");
        let deadline = std::time::Instant::now() + limit;
        loop {
            // The worker renames its finished file into place, so once its temporary file is
            // gone the final one is there or never will be.
            let in_flight =
                self.worker_running() && self.has_entry_starting_with(&in_flight_prefix);
            if !in_flight || spooled.exists() {
                return spooled.exists();
            }
            if std::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(WORKER_POLL).await;
        }
    }

    fn has_entry_starting_with(&self, prefix: &str) -> bool {
        std::fs::read_dir(&self.spool).is_ok_and(|entries| {
            entries
                .flatten()
                .any(|entry| entry.file_name().to_string_lossy().starts_with(prefix))
        })
    }

    /// Whether a worker is running now (it holds the lock for its whole life).
    pub fn worker_running(&self) -> bool {
        worker_holds_lock(&self.spool)
    }

    /// Starts fetching the next segments of the same timeline, within the byte cap.
    async fn schedule_after(self: &Arc<Self>, segment: SegmentName) {
        if self.depth == 0 {
            return;
        }
        let Ok(identity) = self.repository.require_identity().await else {
            return;
        };
        let size = identity.segment_size();
        self.forget_older_than(segment, size);
        let depth = self
            .depth
            .min((self.max_bytes / u64::from(size.0)).max(1) as usize);
        let mut next = segment;
        for _ in 0..depth {
            next = next.next(size);
            let name = WalFileName::Segment(next);
            let key = name.to_string();
            let mut fetching = self.fetching.lock().unwrap();
            if fetching.contains_key(&key) || self.spool.join(&key).exists() {
                continue;
            }
            let prefetcher = Arc::clone(self);
            let fetch = async move { prefetcher.fetch_into_spool(name).await }
                .boxed()
                .shared();
            fetching.insert(key, fetch.clone());
            tokio::spawn(fetch);
        }
    }

    async fn fetch_into_spool(self: Arc<Self>, name: WalFileName) -> Result<GetOutcome, String> {
        let result = async {
            let destination = self.spool.join(name.to_string());
            // The slot covers the decoding (CPU) only: the fsync that follows waits on the disk,
            // and holding a slot through it would leave a core idle.
            let slot = self.slots.acquire().await?;
            std::fs::create_dir_all(&self.spool)?;
            // Up to one fetch per core decodes at a time: each can have a core to itself.
            let pending = archive_get::fetch_uncommitted(
                &self.repository,
                &name,
                &destination,
                DecodeMode::Concurrent,
            )
            .await?;
            drop(slot);
            match pending {
                Some(pending) => archive_get::commit(pending, &destination).await,
                None => Ok(GetOutcome::NotFound),
            }
        }
        .await
        .map_err(|error: anyhow::Error| format!("{error:#}"));
        self.fetching.lock().unwrap().remove(&name.to_string());
        result
    }

    /// Spooled segments before the one Postgres asks for will never be asked for again.
    fn forget_older_than(&self, requested: SegmentName, size: crate::wal::WalSegmentSize) {
        for (name, path) in self.spooled() {
            if let Ok(WalFileName::Segment(spooled)) = name.parse::<WalFileName>()
                && (spooled.timeline != requested.timeline
                    || spooled.segment_number(size) < requested.segment_number(size))
                && !self.fetching.lock().unwrap().contains_key(&name)
            {
                let _ = std::fs::remove_file(path);
            }
        }
    }

    fn spooled(&self) -> Vec<(String, PathBuf)> {
        let Ok(entries) = std::fs::read_dir(&self.spool) else {
            return Vec::new();
        };
        // Dot files are the spool's own bookkeeping (the worker's lock, the latest request,
        // fetches still being written), never a spooled segment.
        entries
            .flatten()
            .filter_map(|entry| Some((entry.file_name().into_string().ok()?, entry.path())))
            .filter(|(name, _)| !name.starts_with('.'))
            .collect()
    }

    /// Removes the spool once recovery is over.
    pub fn clear(&self) {
        if self.fetching.lock().unwrap().is_empty() && self.spool.exists() {
            let _ = std::fs::remove_dir_all(&self.spool);
        }
    }

    pub fn status(&self) -> PrefetchStatus {
        let mut spooled: Vec<String> = self.spooled().into_iter().map(|(name, _)| name).collect();
        spooled.sort();
        PrefetchStatus {
            depth: self.depth,
            spooled,
            fetching: self.fetching.lock().unwrap().len(),
            hits: self.counters.hits.get(),
            misses: self.counters.misses.get(),
        }
    }
}

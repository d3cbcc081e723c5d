//! Archive ahead: upload `.ready` WAL files before Postgres asks for them.
//!
//! The archiver watches `pg_wal/archive_status` (inotify through `notify`, plus a periodic rescan
//! in case an event is lost) and starts an upload for every `.ready` file that is not yet
//! durable, oldest first, history files before segments. Uploads share one future per file, so
//! a hook that asks for a file already in flight simply waits for the same upload. Encoding (the
//! CPU-bound part) runs `archive_concurrency` at a time; the writes that follow do not hold an
//! encoding slot, so the CPU keeps compressing while earlier objects travel or fsync. Uploads in
//! flight are bounded by a memory budget, because each holds its encoded object in memory. The daemon never marks anything `.done` itself: Postgres does that when the hook,
//! answered by the daemon, exits 0.
//!
//! With an outage spool, an upload that cannot reach the store lands there instead, and the
//! archiver moves spooled objects into the repository on every rescan until the spool is empty.
//!
//! After a restart the archiver lists the repository, so a file uploaded before a crash is never
//! sent again: it is read back and compared instead, exactly as a re-push by the hook would be.
//! The listing is only a hint: a listed file whose compare fails (the object left the store
//! since, say) is pushed again at once as a new file, create-only.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use serde::Serialize;
use tokio::sync::Semaphore;

use crate::archive::outage_spool::{self, OutageSpool, SpoolUsage};
use crate::archive::push::{self as archive_push, PushOutcome};
use crate::config::Settings;
use crate::daemon::metrics::Metrics;
use crate::envelope::EncodeOptions;
use crate::repository::{Repository, WAL_PREFIX};
use crate::wal::WalFileName;

/// Memory the in-flight uploads may hold, in MiB (each holds about one encoded segment).
const UPLOAD_MEMORY_MIB: u32 = 64;
const RESCAN_INTERVAL: Duration = Duration::from_secs(5);
/// Spooled objects moved into the repository per rescan, so one drain never runs for long.
const SPOOL_OBJECTS_PER_RESCAN: usize = 64;

type Upload = Shared<BoxFuture<'static, Result<PushOutcome, String>>>;

/// What is known to be durable in the repository.
#[derive(Debug, Clone, Copy)]
enum Durable {
    /// Uploaded or verified by this process: the local file had this size and modification time.
    Confirmed { length: u64, modified: SystemTime },
    /// Listed in the repository at startup, not yet compared with the local file.
    Listed,
}

#[derive(Default)]
struct State {
    durable: HashMap<String, Durable>,
    in_flight: HashMap<String, Upload>,
    last_archived: Option<(String, SystemTime)>,
    last_error: Option<String>,
    archived_bytes: u64,
}

pub struct Archiver {
    settings: Settings,
    repository: Arc<Repository>,
    metrics: Arc<Metrics>,
    pg_wal: PathBuf,
    options: EncodeOptions,
    state: Mutex<State>,
    encode_slots: Arc<Semaphore>,
    memory: Arc<Semaphore>,
    started: Instant,
    spool: Option<Arc<OutageSpool>>,
    draining: Arc<std::sync::atomic::AtomicBool>,
}

/// The archive's state for `/status` and the metrics.
#[derive(Debug, Serialize)]
pub struct ArchiveStatus {
    pub last_archived_segment: Option<String>,
    pub last_archived_time: Option<String>,
    pub oldest_ready: Option<String>,
    pub oldest_ready_age_seconds: f64,
    pub ready_not_archived: usize,
    pub wal_bytes_not_archived: u64,
    pub archive_lag_seconds: f64,
    pub archive_failures: u64,
    pub last_error: Option<String>,
    pub in_flight: usize,
    pub throughput_bytes_per_second: f64,
    /// `None` when no outage spool is configured.
    pub outage_spool: Option<SpoolUsage>,
}

impl Archiver {
    pub fn new(
        settings: &Settings,
        repository: Arc<Repository>,
        spool: Option<OutageSpool>,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        let mut options = settings.wal_encode_options();
        // Parallelism comes from concurrent uploads; one zstd thread each keeps the cores shared.
        options.compression_workers = 0;
        options.whole_files = true;
        Arc::new(Archiver {
            settings: settings.clone(),
            repository,
            metrics,
            pg_wal: settings.pgdata.join("pg_wal"),
            options,
            state: Mutex::new(State::default()),
            // Encoding is CPU work: more at once than there are CPUs only adds memory.
            encode_slots: Arc::new(Semaphore::new(
                settings.archive_concurrency.min(crate::config::cpu_count()),
            )),
            memory: Arc::new(Semaphore::new(UPLOAD_MEMORY_MIB as usize)),
            started: Instant::now(),
            spool: spool.map(Arc::new),
            draining: Arc::default(),
        })
    }

    /// Learns what the repository already holds, so nothing is uploaded twice after a restart.
    pub async fn load_repository_listing(&self) -> anyhow::Result<usize> {
        let listed = self.repository.list_wal(WAL_PREFIX).await?;
        let mut state = self.state.lock().unwrap();
        for name in &listed {
            state
                .durable
                .entry(name.to_string())
                .or_insert(Durable::Listed);
        }
        Ok(listed.len())
    }

    /// Whether `path` is durable as it is now, answered from memory: the hook's fast path.
    pub fn is_durable(&self, path: &Path) -> bool {
        let Some(name) = path.file_name().and_then(|name| name.to_str()) else {
            return false;
        };
        let Ok(metadata) = std::fs::metadata(path) else {
            return false;
        };
        let state = self.state.lock().unwrap();
        matches!(
            state.durable.get(name),
            Some(Durable::Confirmed { length, modified })
                if *length == metadata.len() && metadata.modified().ok() == Some(*modified)
        )
    }

    /// The upload of `path`, started now if it is not already running.
    pub fn request(self: &Arc<Self>, path: &Path) -> Upload {
        let name = path
            .file_name()
            .and_then(|name| name.to_str())
            .unwrap_or_default()
            .to_string();
        let mut state = self.state.lock().unwrap();
        if let Some(upload) = state.in_flight.get(&name) {
            return upload.clone();
        }
        let known_to_exist = matches!(state.durable.get(&name), Some(Durable::Listed));
        let archiver = Arc::clone(self);
        let path = path.to_path_buf();
        let upload = async move { archiver.upload(path, known_to_exist).await }
            .boxed()
            .shared();
        state.in_flight.insert(name, upload.clone());
        tokio::spawn(upload.clone());
        upload
    }

    async fn upload(
        self: Arc<Self>,
        path: PathBuf,
        known_to_exist: bool,
    ) -> Result<PushOutcome, String> {
        let name = path
            .file_name()
            .and_then(|name| name.to_str())
            .unwrap_or_default()
            .to_string();
        let result = self.upload_bounded(&path, known_to_exist).await;
        let mut state = self.state.lock().unwrap();
        state.in_flight.remove(&name);
        match &result {
            Ok((outcome, length, modified)) => {
                state.durable.insert(
                    name.clone(),
                    Durable::Confirmed {
                        length: *length,
                        modified: *modified,
                    },
                );
                if *outcome == PushOutcome::Spooled {
                    self.metrics.spooled_segments.inc();
                    return Ok(*outcome);
                }
                match name.parse::<crate::wal::WalFileName>() {
                    Ok(crate::wal::WalFileName::Segment(_)) => self.metrics.archived_segments.inc(),
                    _ => self.metrics.archived_other_files.inc(),
                };
                state.last_archived = Some((name, SystemTime::now()));
                state.archived_bytes += length;
                self.metrics.archived_bytes.inc_by(*length);
                self.metrics
                    .last_archived_timestamp
                    .set(unix_seconds(SystemTime::now()));
            }
            Err(error) => {
                tracing::warn!(file = %name, "archiving failed: {error}");
                state.last_error = Some(error.clone());
                self.metrics.archive_failures.inc();
            }
        }
        result.map(|(outcome, _, _)| outcome)
    }

    async fn upload_bounded(
        &self,
        path: &Path,
        known_to_exist: bool,
    ) -> Result<(PushOutcome, u64, SystemTime), String> {
        let metadata = std::fs::metadata(path)
            .map_err(|error| format!("cannot read {}: {error}", path.display()))?;
        let budget = (metadata.len().div_ceil(1 << 20) as u32).clamp(1, UPLOAD_MEMORY_MIB);
        let _memory = self
            .memory
            .acquire_many(budget)
            .await
            .map_err(|error| error.to_string())?;
        let started = Instant::now();
        let file = archive_push::validate(&self.settings.pgdata, path)
            .map_err(|error| format!("{error:#}"))?;
        let outcome = match self.push(&file, known_to_exist).await {
            // The startup listing is only a hint that saves an upload: the object may have left
            // the store since. The create-only put is the authority, so ask it; an object that
            // does exist is still compared there, and one with other content is still refused.
            Err(error) if known_to_exist && !outage_spool::is_outage(&error) => {
                tracing::info!(
                    file = %file.name,
                    "listed at startup but not confirmed now ({error:#}); pushing it as a new file"
                );
                self.forget_listing(&file.name.to_string());
                self.push(&file, false).await
            }
            pushed => pushed,
        }
        .map_err(|error| format!("{error:#}"))?;
        self.metrics
            .upload_duration
            .observe(started.elapsed().as_secs_f64());
        let modified = metadata.modified().map_err(|error| error.to_string())?;
        Ok((outcome, metadata.len(), modified))
    }

    async fn push(
        &self,
        file: &archive_push::WalFile,
        known_to_exist: bool,
    ) -> anyhow::Result<PushOutcome> {
        archive_push::push(
            &self.repository,
            file,
            &self.options,
            known_to_exist,
            Some(&self.encode_slots),
            self.spool.as_deref(),
        )
        .await
    }

    /// Drops the startup listing's record of `name`, so later pushes do not rely on it.
    fn forget_listing(&self, name: &str) {
        let mut state = self.state.lock().unwrap();
        if matches!(state.durable.get(name), Some(Durable::Listed)) {
            state.durable.remove(name);
        }
    }

    /// Starts uploads for every `.ready` file not yet durable or in flight, oldest first.
    pub fn scan(self: &Arc<Self>) {
        for name in self.ready_files() {
            let path = self.pg_wal.join(&name);
            if !self.is_durable(&path) {
                drop(self.request(&path));
            }
        }
        self.forget_removed_files();
    }

    /// `.ready` files in the order Postgres archives them: timeline histories first.
    fn ready_files(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(self.pg_wal.join("archive_status")) else {
            return Vec::new();
        };
        let mut names: Vec<String> = entries
            .flatten()
            .filter_map(|entry| {
                entry
                    .file_name()
                    .into_string()
                    .ok()?
                    .strip_suffix(".ready")
                    .map(str::to_string)
            })
            .filter(|name| name.parse::<WalFileName>().is_ok())
            .collect();
        names.sort_by_key(|name| (!name.ends_with(".history"), name.clone()));
        names
    }

    /// Drops records of files Postgres has removed, so memory does not grow with uptime.
    fn forget_removed_files(&self) {
        let Ok(entries) = std::fs::read_dir(&self.pg_wal) else {
            return;
        };
        let present: HashSet<String> = entries
            .flatten()
            .filter_map(|entry| entry.file_name().into_string().ok())
            .collect();
        let mut state = self.state.lock().unwrap();
        state
            .durable
            .retain(|name, durable| matches!(durable, Durable::Listed) || present.contains(name));
    }

    /// Watches `archive_status` and rescans on every change and every few seconds.
    pub async fn watch(self: Arc<Self>) {
        let (sender, mut receiver) = tokio::sync::mpsc::channel::<()>(1);
        let watcher = {
            let sender = sender.clone();
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                // Only a new or renamed status file matters. Access events must not count: every
                // scan opens the directory, and reacting to that would rescan in a busy loop.
                let relevant = event.is_ok_and(|event| {
                    matches!(
                        event.kind,
                        notify::EventKind::Create(_) | notify::EventKind::Modify(_)
                    )
                });
                if relevant {
                    let _ = sender.try_send(());
                }
            })
        };
        let _watcher = match watcher {
            Ok(mut watcher) => {
                use notify::Watcher;
                let status = self.pg_wal.join("archive_status");
                if let Err(error) = watcher.watch(&status, notify::RecursiveMode::NonRecursive) {
                    tracing::warn!(
                        "cannot watch {}: {error}; relying on the periodic rescan",
                        status.display()
                    );
                }
                Some(watcher)
            }
            Err(error) => {
                tracing::warn!(
                    "file watching is unavailable: {error}; relying on the periodic rescan"
                );
                None
            }
        };
        loop {
            self.scan();
            self.drain_spool();
            let _ = tokio::time::timeout(RESCAN_INTERVAL, receiver.recv()).await;
        }
    }

    /// Moves spooled objects into the repository in the background, one drain at a time. A
    /// failure means the store is still unreachable: the next rescan tries again.
    fn drain_spool(self: &Arc<Self>) {
        use std::sync::atomic::Ordering;
        let Some(spool) = self.spool.clone() else {
            return;
        };
        if self.draining.swap(true, Ordering::SeqCst) {
            return;
        }
        let archiver = Arc::clone(self);
        tokio::spawn(async move {
            // Listing a local directory is cheap; it also refreshes what /status reports.
            let waiting = match spool.refresh_usage().await {
                Ok(usage) => usage.objects,
                Err(error) => {
                    tracing::warn!("cannot list the outage spool: {error}");
                    0
                }
            };
            if waiting > 0
                && let Err(error) = spool
                    .drain(&archiver.repository, SPOOL_OBJECTS_PER_RESCAN)
                    .await
            {
                tracing::debug!("the outage spool waits for the store: {error:#}");
            }
            archiver.draining.store(false, Ordering::SeqCst);
        });
    }

    /// Waits for in-flight uploads to finish, up to `limit`. An abandoned upload leaves nothing
    /// behind: objects appear whole or not at all.
    pub async fn drain(&self, limit: Duration) {
        let uploads: Vec<Upload> = self
            .state
            .lock()
            .unwrap()
            .in_flight
            .values()
            .cloned()
            .collect();
        let _ = tokio::time::timeout(limit, futures::future::join_all(uploads)).await;
    }

    pub fn status(&self) -> ArchiveStatus {
        let segment_size = 16u64 << 20;
        let mut oldest: Option<(String, SystemTime)> = None;
        let mut waiting = 0;
        let mut waiting_bytes = 0;
        for name in self.ready_files() {
            let path = self.pg_wal.join(&name);
            if self.is_durable(&path) {
                continue;
            }
            waiting += 1;
            waiting_bytes += std::fs::metadata(&path)
                .map(|meta| meta.len())
                .unwrap_or(segment_size);
            let ready = self
                .pg_wal
                .join("archive_status")
                .join(format!("{name}.ready"));
            if let Ok(created) = std::fs::metadata(&ready).and_then(|meta| meta.modified())
                && oldest.as_ref().is_none_or(|(_, time)| created < *time)
            {
                oldest = Some((name, created));
            }
        }
        let state = self.state.lock().unwrap();
        let age = oldest.as_ref().map_or(0.0, |(_, time)| {
            time.elapsed().unwrap_or_default().as_secs_f64()
        });
        ArchiveStatus {
            last_archived_segment: state.last_archived.as_ref().map(|(name, _)| name.clone()),
            last_archived_time: state.last_archived.as_ref().map(|(_, time)| {
                chrono::DateTime::<chrono::Utc>::from(*time)
                    .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
            }),
            oldest_ready: oldest.map(|(name, _)| name),
            oldest_ready_age_seconds: age,
            ready_not_archived: waiting,
            wal_bytes_not_archived: waiting_bytes,
            archive_lag_seconds: age,
            archive_failures: self.metrics.archive_failures.get(),
            last_error: state.last_error.clone(),
            in_flight: state.in_flight.len(),
            throughput_bytes_per_second: state.archived_bytes as f64
                / self.started.elapsed().as_secs_f64().max(0.001),
            outage_spool: self.spool.as_ref().map(|spool| spool.usage()),
        }
    }

    /// Refreshes the state gauges just before a scrape.
    pub fn update_gauges(&self) -> ArchiveStatus {
        let status = self.status();
        self.metrics
            .archive_lag_seconds
            .set(status.archive_lag_seconds);
        self.metrics
            .wal_bytes_not_archived
            .set(status.wal_bytes_not_archived as i64);
        self.metrics
            .ready_segments
            .set(status.ready_not_archived as i64);
        if let Some(spool) = &status.outage_spool {
            self.metrics.outage_spool_objects.set(spool.objects as i64);
            self.metrics.outage_spool_bytes.set(spool.bytes as i64);
        }
        status
    }
}

fn unix_seconds(time: SystemTime) -> f64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

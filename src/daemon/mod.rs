//! `pitr daemon`: the sidecar next to Postgres.
//!
//! It archives ahead (`archiver`), fetches ahead during recovery (`prefetch`), answers the hooks
//! over a Unix socket (`server`, `client`) and serves health, readiness, metrics and status over
//! HTTP (`http`, `metrics`). Every upload and download goes through the same repository and
//! envelope code as the hooks; the daemon only changes when the work happens.

pub mod archiver;
pub mod client;
pub mod http;
pub mod metrics;
pub mod server;
pub mod tasks;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::archive::outage_spool::OutageSpool;
use crate::archive::prefetch::{PrefetchCounters, PrefetchSettings, Prefetcher};
use crate::config::Settings;
use crate::repository::Repository;
use crate::repository::RepositoryError;
use archiver::Archiver;
use metrics::Metrics;

const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);

/// How long one readiness result answers `/readyz`. The port may be reachable beyond
/// localhost without a token, so a request must not cost a Postgres connection each.
const READINESS_REUSE: Duration = Duration::from_secs(1);

/// Each readiness check by name: "ok" or what is wrong.
pub type Readiness = BTreeMap<&'static str, String>;

pub struct Daemon {
    pub settings: Settings,
    pub repository: Arc<Repository>,
    pub metrics: Arc<Metrics>,
    pub archiver: Arc<Archiver>,
    pub prefetcher: Arc<Prefetcher>,
    /// The last readiness result and when it was finished. The lock is held for the whole
    /// check, so concurrent requests wait for the one check in flight instead of each starting
    /// their own: at most one Postgres connection at a time, however many requests arrive.
    readiness: tokio::sync::Mutex<Option<(Instant, Readiness)>>,
}

impl Daemon {
    /// The readiness checks, run at most once per `READINESS_REUSE` and one at a time.
    pub async fn readiness(&self) -> Readiness {
        let mut last = self.readiness.lock().await;
        if let Some((finished, checks)) = last.as_ref()
            && finished.elapsed() < READINESS_REUSE
        {
            return checks.clone();
        }
        let checks = self.check_readiness().await;
        *last = Some((Instant::now(), checks.clone()));
        checks
    }

    async fn check_readiness(&self) -> Readiness {
        let mut checks = BTreeMap::new();
        let repository =
            tokio::time::timeout(http::READINESS_TIMEOUT, self.repository.probe()).await;
        checks.insert(
            "repository",
            match repository {
                Ok(Ok(())) => "ok".to_string(),
                Ok(Err(error)) => error.to_string(),
                Err(_) => "the repository did not answer within 5 s".to_string(),
            },
        );
        checks.insert(
            "postgres",
            match self.postgres_in_recovery().await {
                Ok(_) => "ok".to_string(),
                Err(error) => format!("{error:#}"),
            },
        );
        let status = self.archiver.status();
        let lag = Duration::from_secs_f64(status.archive_lag_seconds);
        checks.insert(
            "archiving",
            if lag > self.settings.max_archive_lag {
                format!(
                    "the oldest unarchived WAL file ({}) has waited {} s, more than {} s",
                    status.oldest_ready.unwrap_or_default(),
                    lag.as_secs(),
                    self.settings.max_archive_lag.as_secs()
                )
            } else {
                "ok".to_string()
            },
        );
        checks
    }

    /// Connects to Postgres with the libpq variables (or `PITR_PG_URL`).
    pub async fn postgres_in_recovery(&self) -> Result<bool> {
        let client = crate::postgres::connect(&self.settings, http::READINESS_TIMEOUT).await?;
        let row = client.query_one("select pg_is_in_recovery()", &[]).await?;
        Ok(row.get(0))
    }
}

pub async fn run(settings: Settings) -> Result<()> {
    limit_malloc_arenas();
    let repository = Arc::new(Repository::open(&settings)?);
    let metrics = Arc::new(Metrics::new());
    let outage_spool = OutageSpool::open(&settings, repository.keyring())?;
    let archiver = Archiver::new(
        &settings,
        Arc::clone(&repository),
        outage_spool.clone(),
        Arc::clone(&metrics),
    );
    match archiver.load_repository_listing().await {
        Ok(count) => {
            tracing::info!(objects = count, repository = %repository.url, "repository listed")
        }
        Err(error) => tracing::warn!(
            "cannot list the repository yet ({error:#}); uploads will compare with what exists"
        ),
    }
    // A repository that does not exist yet (the first push creates it) or a store that cannot
    // be reached now does not stop the daemon; a wrong keyring, a damaged identity or refused
    // credentials would fail every request, so they stop it at once.
    let identity = match repository.read_identity().await {
        Ok(identity) => identity,
        Err(error @ RepositoryError::Unreachable { .. }) => {
            tracing::warn!("cannot read the repository's identity yet: {error}");
            None
        }
        Err(error) => return Err(error).context("refusing to start the daemon"),
    };
    if let (Some(identity), Some(local)) = (
        identity,
        crate::wal::control_file_system_identifier(&settings.pgdata),
    ) {
        crate::repository::check_same_cluster(&repository.url, &identity, local)
            .with_context(|| format!("refusing to serve {}", settings.pgdata.display()))?;
    }
    let counters = PrefetchCounters {
        hits: metrics.prefetch_hits.clone(),
        misses: metrics.prefetch_misses.clone(),
    };
    let prefetcher = Prefetcher::new(
        &PrefetchSettings::new(&settings, outage_spool),
        Arc::clone(&repository),
        counters,
    );
    let daemon = Arc::new(Daemon {
        settings: settings.clone(),
        repository,
        metrics,
        archiver,
        prefetcher,
        readiness: tokio::sync::Mutex::default(),
    });

    let mut tasks = tasks::Tasks::new();
    let listener = server::bind(&settings.socket)?;
    tasks.spawn("hook socket", server::serve(listener, Arc::clone(&daemon)));
    let http = tokio::net::TcpListener::bind(settings.http_addr)
        .await
        .with_context(|| {
            format!(
                "binding the HTTP API to {} (PITR_HTTP_ADDR)",
                settings.http_addr
            )
        })?;
    let router = http::router(Arc::clone(&daemon));
    let http_shutdown = tasks.shutdown_signal();
    tasks.spawn("HTTP API", async move {
        let served = axum::serve(http, router).with_graceful_shutdown(http_shutdown.begun());
        if let Err(error) = served.await {
            tracing::warn!("the HTTP API stopped: {error}");
        }
    });
    tasks.spawn("archiver", Arc::clone(&daemon.archiver).watch());
    tasks.spawn(
        "prefetch cleanup",
        clear_spool_after_recovery(Arc::clone(&daemon)),
    );
    tracing::info!(socket = %settings.socket.display(), http = %settings.http_addr, pgdata = %settings.pgdata.display(), "pitr daemon running");

    wait_for_shutdown_signal().await;
    tracing::info!("shutting down: finishing in-flight uploads");
    let _ = std::fs::remove_file(&settings.socket);
    daemon.archiver.drain(SHUTDOWN_GRACE).await;
    let aborted = tasks.shutdown(TASK_GRACE).await;
    if !aborted.is_empty() {
        tracing::warn!(?aborted, "tasks that did not stop in time were aborted");
    }
    tracing::info!("stopped");
    Ok(())
}

/// How long the tasks get to stop once the archiver's uploads are done.
const TASK_GRACE: Duration = Duration::from_secs(5);

async fn clear_spool_after_recovery(daemon: Arc<Daemon>) {
    loop {
        tokio::time::sleep(Duration::from_secs(10)).await;
        if let Ok(false) = daemon.postgres_in_recovery().await {
            daemon.prefetcher.clear();
        }
    }
}

async fn wait_for_shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    tokio::select! {
        _ = terminate.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// glibc gives each thread that allocates its own arena and keeps freed memory in it, so a
/// long-lived daemon whose blocking threads handle 16 MiB segments in turn holds many copies of
/// the same peak. Two arenas keep the daemon's memory near what it uses at once.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tuning; it is called before the daemon's threads
    // start allocating in earnest.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

//! The daemon's Prometheus metrics. Counters and histograms are updated where the work
//! happens; the gauges that describe the archive's state are set just before each scrape.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HookLabels {
    /// `durable` (answered at once), `waited` (uploaded on request), `spooled` (kept in the
    /// outage spool while the store is unreachable) or `failed`.
    pub result: &'static str,
}

pub struct Metrics {
    registry: Registry,
    pub archived_segments: Counter,
    /// History, `.backup` and `.partial` files, kept apart from the segments.
    pub archived_other_files: Counter,
    pub archive_failures: Counter,
    pub archived_bytes: Counter,
    pub upload_duration: Histogram,
    pub archive_lag_seconds: Gauge<f64, AtomicU64>,
    pub wal_bytes_not_archived: Gauge,
    pub last_archived_timestamp: Gauge<f64, AtomicU64>,
    pub ready_segments: Gauge,
    pub prefetch_hits: Counter,
    pub prefetch_misses: Counter,
    pub hook_requests: Family<HookLabels, Counter>,
    pub spooled_segments: Counter,
    pub outage_spool_objects: Gauge,
    pub outage_spool_bytes: Gauge,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let metrics = Metrics {
            archived_segments: Counter::default(),
            archived_other_files: Counter::default(),
            archive_failures: Counter::default(),
            archived_bytes: Counter::default(),
            upload_duration: Histogram::new([
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
            archive_lag_seconds: Gauge::default(),
            wal_bytes_not_archived: Gauge::default(),
            last_archived_timestamp: Gauge::default(),
            ready_segments: Gauge::default(),
            prefetch_hits: Counter::default(),
            prefetch_misses: Counter::default(),
            hook_requests: Family::default(),
            spooled_segments: Counter::default(),
            outage_spool_objects: Gauge::default(),
            outage_spool_bytes: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "pitr_archived_segments",
            "WAL segments made durable in the repository",
            metrics.archived_segments.clone(),
        );
        registry.register(
            "pitr_archived_other_files",
            "History, .backup and .partial files made durable in the repository",
            metrics.archived_other_files.clone(),
        );
        registry.register(
            "pitr_build",
            "The running pitr",
            prometheus_client::metrics::info::Info::new(vec![(
                "version",
                env!("CARGO_PKG_VERSION"),
            )]),
        );
        registry.register(
            "pitr_archive_failures",
            "Failed attempts to archive a WAL file",
            metrics.archive_failures.clone(),
        );
        registry.register(
            "pitr_archived_bytes",
            "Bytes of WAL archived",
            metrics.archived_bytes.clone(),
        );
        registry.register(
            "pitr_upload_duration_seconds",
            "Time to make one WAL file durable",
            metrics.upload_duration.clone(),
        );
        registry.register(
            "pitr_archive_lag_seconds",
            "Age of the oldest WAL file waiting to be archived",
            metrics.archive_lag_seconds.clone(),
        );
        registry.register(
            "pitr_wal_not_archived_bytes",
            "Bytes of WAL marked ready but not yet durable",
            metrics.wal_bytes_not_archived.clone(),
        );
        registry.register(
            "pitr_last_archived_timestamp_seconds",
            "Unix time of the last WAL file archived",
            metrics.last_archived_timestamp.clone(),
        );
        registry.register(
            "pitr_ready_segments",
            "WAL files marked ready and not yet durable",
            metrics.ready_segments.clone(),
        );
        registry.register(
            "pitr_prefetch_hits",
            "restore_command answered from the prefetch spool",
            metrics.prefetch_hits.clone(),
        );
        registry.register(
            "pitr_prefetch_misses",
            "restore_command answered by a direct fetch",
            metrics.prefetch_misses.clone(),
        );
        registry.register(
            "pitr_hook_requests",
            "archive_command requests answered by the daemon",
            metrics.hook_requests.clone(),
        );
        registry.register(
            "pitr_spooled_segments",
            "WAL files kept in the outage spool because the store was unreachable",
            metrics.spooled_segments.clone(),
        );
        registry.register(
            "pitr_outage_spool_objects",
            "WAL files in the outage spool, not yet in the repository",
            metrics.outage_spool_objects.clone(),
        );
        registry.register(
            "pitr_outage_spool_bytes",
            "Bytes in the outage spool",
            metrics.outage_spool_bytes.clone(),
        );
        Metrics {
            registry,
            ..metrics
        }
    }

    pub fn encode(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

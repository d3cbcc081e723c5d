//! Progress of long commands (backup, restore): a bar with bytes and rate on a terminal, and a
//! plain log line every few seconds otherwise, so logs collected from a pipe stay readable.

use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

pub struct Progress {
    done: Arc<AtomicU64>,
    bar: Option<ProgressBar>,
    reporter: Option<tokio::task::JoinHandle<()>>,
}

impl Progress {
    pub fn start(what: &'static str, total: u64) -> Self {
        let done = Arc::new(AtomicU64::new(0));
        if std::io::stderr().is_terminal() {
            let bar = ProgressBar::new(total);
            bar.set_style(
                ProgressStyle::with_template(
                    "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                )
                .expect("the template is valid")
                .progress_chars("=> "),
            );
            bar.set_message(what);
            return Progress {
                done,
                bar: Some(bar),
                reporter: None,
            };
        }
        let counter = Arc::clone(&done);
        let reporter = tokio::spawn(async move {
            let started = Instant::now();
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                let bytes = counter.load(Ordering::Relaxed);
                let rate = bytes as f64 / started.elapsed().as_secs_f64() / 1048576.0;
                tracing::info!(
                    "{what}: {} of {} MiB ({rate:.0} MiB/s)",
                    bytes >> 20,
                    total >> 20
                );
            }
        });
        Progress {
            done,
            bar: None,
            reporter: Some(reporter),
        }
    }

    pub fn advance(&self, bytes: u64) {
        self.done.fetch_add(bytes, Ordering::Relaxed);
        if let Some(bar) = &self.bar {
            bar.inc(bytes);
        }
    }

    pub fn done(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        if let Some(reporter) = &self.reporter {
            reporter.abort();
        }
    }
}

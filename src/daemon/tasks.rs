//! The daemon's long-lived tasks, each with an owner: the hook socket's accept loop, the HTTP
//! API, the archiver's watch and the prefetch spool's cleanup. `Tasks` spawns each under one
//! shutdown signal, and `shutdown` cancels them all and waits until every one has stopped (or
//! the grace period ends, when it aborts what is left), so no task outlives the daemon's
//! `run` and nothing runs on after the process reported it stopped.

use std::future::Future;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;

/// A handle a task can wait on: it resolves once shutdown has begun.
#[derive(Clone)]
pub struct Shutdown(watch::Receiver<bool>);

impl Shutdown {
    /// Resolves when shutdown begins (at once if it has).
    pub async fn begun(mut self) {
        // An error means the sender is gone, which happens only once shutdown is under way.
        let _ = self.0.wait_for(|begun| *begun).await;
    }
}

pub struct Tasks {
    signal: watch::Sender<bool>,
    running: JoinSet<&'static str>,
}

impl Default for Tasks {
    fn default() -> Self {
        Self::new()
    }
}

impl Tasks {
    pub fn new() -> Self {
        Tasks {
            signal: watch::channel(false).0,
            running: JoinSet::new(),
        }
    }

    /// The signal for a task that stops itself gracefully (the HTTP server's shutdown).
    pub fn shutdown_signal(&self) -> Shutdown {
        Shutdown(self.signal.subscribe())
    }

    /// Runs `task` until it ends or shutdown begins, whichever is first; `name` is logged if
    /// it has to be aborted.
    pub fn spawn(&mut self, name: &'static str, task: impl Future<Output = ()> + Send + 'static) {
        let shutdown = self.shutdown_signal();
        self.running.spawn(async move {
            tokio::select! {
                () = shutdown.begun() => {}
                () = task => {}
            }
            name
        });
    }

    /// Signals every task to stop and waits for them, at most `grace`. Returns the names of
    /// the tasks that had to be aborted (none, normally).
    pub async fn shutdown(mut self, grace: Duration) -> Vec<&'static str> {
        self.signal.send_replace(true);
        let deadline = tokio::time::Instant::now() + grace;
        while let Ok(Some(_)) = tokio::time::timeout_at(deadline, self.running.join_next()).await {}
        let aborted = self.running.len();
        self.running.abort_all();
        let mut names = Vec::with_capacity(aborted);
        while let Some(result) = self.running.join_next().await {
            if let Ok(name) = result {
                names.push(name);
            }
        }
        names
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn shutdown_stops_every_task_and_waits_for_it() {
        let mut tasks = Tasks::new();
        let (finished, mut finished_receiver) = tokio::sync::mpsc::channel::<&str>(4);
        for name in ["accept loop", "watch"] {
            let finished = finished.clone();
            let on_stop = Guard(Some((finished, name)));
            tasks.spawn(name, async move {
                let _on_stop = on_stop;
                std::future::pending::<()>().await;
            });
        }
        let graceful = tasks.shutdown_signal();
        let server = tokio::spawn(graceful.begun());
        let aborted = tasks.shutdown(Duration::from_secs(5)).await;
        assert!(aborted.is_empty(), "{aborted:?}");
        drop(finished);
        let mut stopped = Vec::new();
        while let Some(name) = finished_receiver.recv().await {
            stopped.push(name);
        }
        stopped.sort();
        assert_eq!(stopped, ["accept loop", "watch"]);
        tokio::time::timeout(Duration::from_secs(1), server)
            .await
            .expect("a graceful task sees the shutdown")
            .unwrap();
    }

    /// Reports its task's name when the task is dropped, as a cancelled future is.
    struct Guard(Option<(tokio::sync::mpsc::Sender<&'static str>, &'static str)>);

    impl Drop for Guard {
        fn drop(&mut self) {
            if let Some((sender, name)) = self.0.take() {
                let _ = sender.try_send(name);
            }
        }
    }
}

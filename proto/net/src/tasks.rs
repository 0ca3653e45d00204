//! One cancellation tree per process: every task the hub or a device agent starts is
//! spawned through [`Tasks`], so shutdown (SIGTERM) cancels them all and waits for them,
//! in order, instead of aborting what happens to be running. Shared by `hub` and `device`.
//!
//! Two kinds of task:
//! - [`Tasks::spawn`]: dropped at its next await once the tree is cancelled — for work that
//!   is safe to abandon anywhere (answering a peer, a connection, a broker loop);
//! - [`Tasks::spawn_graceful`]: runs until it returns; it watches [`Tasks::token`] itself
//!   and stops at a point of its choosing (the updater finishes an activation, abandons a
//!   download);
//! - [`Tasks::spawn_blocking`]: synchronous work (a file written and synced, a store
//!   read) on tokio's blocking pool, tracked: it cannot be cut short, and shutdown waits
//!   for it like any other task.
//!
//! Also the one accept loop ([`accept_loop`]) the hub's and the device's listeners share.

use std::future::Future;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

#[derive(Clone, Debug, Default)]
pub struct Tasks {
    token: CancellationToken,
    tracker: TaskTracker,
}

impl Tasks {
    pub fn new() -> Tasks {
        Tasks::default()
    }

    /// A subtree: cancelled with this one (or on its own), tracked with it.
    pub fn child(&self) -> Tasks {
        Tasks {
            token: self.token.child_token(),
            tracker: self.tracker.clone(),
        }
    }

    pub fn token(&self) -> &CancellationToken {
        &self.token
    }

    pub fn is_cancelled(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Resolves once the tree is cancelled (cancel-safe).
    pub async fn cancelled(&self) {
        self.token.cancelled().await
    }

    /// Spawns `fut`, dropped at its next await once the tree is cancelled.
    pub fn spawn<F>(&self, fut: F)
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let token = self.token.clone();
        self.tracker.spawn(async move {
            tokio::select! {
                _ = token.cancelled() => {}
                _ = fut => {}
            }
        });
    }

    /// Spawns `fut`, which runs until it returns: it must watch [`Tasks::token`] itself.
    pub fn spawn_graceful<F>(&self, fut: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.tracker.spawn(fut)
    }

    /// Runs the blocking `f` on tokio's blocking pool, tracked by the tree (shutdown waits
    /// for it; it always runs to its end).
    pub fn spawn_blocking<F, T>(&self, f: F) -> tokio::task::JoinHandle<T>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        self.tracker.spawn_blocking(f)
    }

    /// Cancels the tree and waits up to `grace` for every task spawned through it; returns
    /// how many were still running when the wait ended.
    pub async fn shutdown(&self, grace: Duration) -> usize {
        self.token.cancel();
        self.tracker.close();
        if tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_err()
        {
            return self.tracker.len();
        }
        0
    }
}

/// First pause after a failed `accept` (out of file descriptors, say); it doubles to
/// [`ACCEPT_BACKOFF_MAX`] and is reset by the next success.
pub const ACCEPT_BACKOFF_FIRST: Duration = Duration::from_millis(10);
pub const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Accepts connections until `tasks` is cancelled, handing each to `on_conn`. A failed
/// accept is logged and retried after a growing pause: never a busy loop (EMFILE fails
/// at once, every time), never an end to accepting.
pub async fn accept_loop<C, Fut>(
    what: &str,
    tasks: &Tasks,
    mut accept: impl FnMut() -> Fut,
    mut on_conn: impl FnMut(C),
) where
    Fut: Future<Output = std::io::Result<C>>,
{
    let mut backoff = ACCEPT_BACKOFF_FIRST;
    loop {
        let accepted = tokio::select! {
            _ = tasks.cancelled() => return,
            a = accept() => a,
        };
        match accepted {
            Ok(conn) => {
                backoff = ACCEPT_BACKOFF_FIRST;
                on_conn(conn);
            }
            Err(e) => {
                tracing::warn!("{what}: accepting a connection: {e}; trying again in {backoff:?}");
                tokio::select! {
                    _ = tasks.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    #[tokio::test(start_paused = true)]
    async fn failed_accepts_back_off_and_never_stop() {
        let tasks = Tasks::new();
        let tries = Arc::new(AtomicU32::new(0));
        let got = Arc::new(AtomicU32::new(0));
        let (t, g) = (tries.clone(), got.clone());
        let loop_tasks = tasks.clone();
        let h = tokio::spawn(async move {
            accept_loop(
                "test",
                &loop_tasks,
                || {
                    let n = t.fetch_add(1, Ordering::Relaxed);
                    async move {
                        match n {
                            0..10 => Err(std::io::Error::other("out of descriptors")),
                            10 => Ok(n),
                            _ => std::future::pending().await,
                        }
                    }
                },
                |_n: u32| {
                    g.fetch_add(1, Ordering::Relaxed);
                },
            )
            .await
        });
        // 10 failures: 10 + 20 + 40 + … ms, capped at 1 s (4.3 s), then a connection.
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(
            tries.load(Ordering::Relaxed),
            12,
            "ten failures, one success, waiting"
        );
        assert_eq!(
            got.load(Ordering::Relaxed),
            1,
            "accepting again after the errors"
        );
        tasks.shutdown(Duration::from_secs(1)).await;
        h.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_accept_is_not_a_busy_loop() {
        let tasks = Tasks::new();
        let tries = Arc::new(AtomicU32::new(0));
        let t = tries.clone();
        let loop_tasks = tasks.clone();
        tokio::spawn(async move {
            accept_loop(
                "test",
                &loop_tasks,
                || {
                    t.fetch_add(1, Ordering::Relaxed);
                    async { Err::<(), _>(std::io::Error::other("EMFILE")) }
                },
                |_| {},
            )
            .await
        });
        tokio::time::sleep(Duration::from_secs(60)).await;
        // 10 ms doubling to 1 s: about 7 tries in the first 1.3 s, then one a second.
        let n = tries.load(Ordering::Relaxed);
        assert!((60..=70).contains(&n), "{n} accepts in 60 s");
        tasks.shutdown(Duration::from_secs(1)).await;
    }

    #[tokio::test]
    async fn shutdown_cancels_plain_tasks_and_waits_for_graceful_ones() {
        let tasks = Tasks::new();
        let child = tasks.child();
        child.spawn(std::future::pending::<()>());
        let done = Arc::new(AtomicU32::new(0));
        let d = done.clone();
        let token = child.token().clone();
        child.spawn_graceful(async move {
            token.cancelled().await;
            tokio::time::sleep(Duration::from_millis(50)).await; // finishing a write
            d.store(1, Ordering::Relaxed);
        });
        assert_eq!(tasks.shutdown(Duration::from_secs(5)).await, 0);
        assert_eq!(
            done.load(Ordering::Relaxed),
            1,
            "the graceful task finished"
        );
    }
}

//! Storage work off the actors' thread.

use std::sync::{mpsc, OnceLock};

use kiln_persistence::StoreError;
use tokio::sync::oneshot;

/// Runs a storage job on tokio's blocking pool and waits for it; a job that
/// panicked comes back as an error instead of taking the actor down.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(e) => Err(StoreError::Corrupt {
            path: Default::default(),
            what: "storage task".into(),
            detail: e.to_string(),
        }),
    }
}

/// [`blocking`] for work nothing waits for (flushes of applied state), on a
/// thread of its own at a lower CPU priority: on a busy machine the log
/// appends and replication that writes wait for go first (the 16-client p99
/// of a write: integration/BENCHMARKS.md, fourteenth session).
pub(crate) async fn background<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    let (tx, rx) = oneshot::channel();
    let job: BackgroundJob = Box::new(move || {
        let _ = tx.send(f());
    });
    let refused = match background_queue() {
        Some(queue) => queue.send(job).err().map(|e| e.0),
        None => Some(job),
    };
    if let Some(job) = refused {
        // No background thread: the blocking pool, at normal priority.
        let _ = tokio::task::spawn_blocking(job).await;
    }
    rx.await.unwrap_or_else(|_| Err(background_gone()))
}

type BackgroundJob = Box<dyn FnOnce() + Send>;

/// How much lower the background thread's priority is (a nice value).
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
const BACKGROUND_NICE: i32 = 10;

fn background_gone() -> StoreError {
    StoreError::Corrupt {
        path: Default::default(),
        what: "background storage task".into(),
        detail: "it ended without an answer (it panicked)".into(),
    }
}

/// The background thread's queue, started on first use (`None` if no thread
/// could be started).
fn background_queue() -> Option<&'static mpsc::Sender<BackgroundJob>> {
    static QUEUE: OnceLock<Option<mpsc::Sender<BackgroundJob>>> = OnceLock::new();
    QUEUE
        .get_or_init(|| {
            let (tx, rx) = mpsc::channel::<BackgroundJob>();
            let started = std::thread::Builder::new()
                .name("kiln-background".into())
                .spawn(move || {
                    lower_own_priority();
                    for job in rx {
                        // A job that panics loses its answer, not the thread.
                        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                    }
                });
            match started {
                Ok(_) => Some(tx),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot start the background storage thread; flushes run at normal priority");
                    None
                }
            }
        })
        .as_ref()
}

/// Raises the calling thread's nice value by [`BACKGROUND_NICE`] (for good:
/// only a privileged process may lower it again). Linux sets a nice value per
/// thread; elsewhere the thread keeps its priority.
#[cfg(not(target_os = "linux"))]
fn lower_own_priority() {}

#[cfg(target_os = "linux")]
fn lower_own_priority() {
    // SAFETY: gettid, getpriority and setpriority take no pointers.
    let failed = unsafe {
        let tid = libc::gettid() as libc::id_t;
        let now = libc::getpriority(libc::PRIO_PROCESS, tid);
        libc::setpriority(libc::PRIO_PROCESS, tid, now.saturating_add(BACKGROUND_NICE)) != 0
    };
    if failed {
        tracing::debug!(error = %std::io::Error::last_os_error(), "background thread keeps its priority");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_background_job_answers_and_one_that_panics_is_an_error() {
        assert_eq!(background(|| Ok(7)).await.ok(), Some(7));
        let panicked: Result<(), StoreError> = background(|| panic!("boom")).await;
        assert!(panicked.is_err());
        // The thread survived the panic.
        assert_eq!(background(|| Ok("again")).await.ok(), Some("again"));
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn the_background_thread_runs_at_a_lower_priority() {
        fn own_nice() -> i32 {
            // SAFETY: as in `lower_own_priority`.
            unsafe { libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t) }
        }
        let there = background(|| Ok(own_nice())).await.ok();
        assert_eq!(there, Some((own_nice() + BACKGROUND_NICE).min(19)));
    }
}

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
/// thread of its own that runs only on CPU nothing else wants (Linux's
/// `SCHED_IDLE`): the log appends and replication that writes wait for go
/// first, and do not wait for a core behind a flush (integration/BENCHMARKS.md,
/// fourteenth and eighteenth sessions).
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

/// Puts the calling thread in the `SCHED_IDLE` class: it runs only on CPU no
/// other thread wants, and a woken thread takes its core at once. At a nice
/// value (10, or 19) whole batches of writes still stalled 10-25 ms a few times
/// a second at 16 clients, in every stall traced while members' flushes ran.
/// The price: a flush preempted while it holds a lock a write needs (the
/// pending state's mutex, redb's page cache) holds that write until it gets a
/// core again, and the next flush goes to the blocking pool only once the
/// entries waiting pass `FLUSH_BEHIND` (stripe actor). Elsewhere the thread
/// keeps its priority.
#[cfg(not(target_os = "linux"))]
fn lower_own_priority() {}

#[cfg(target_os = "linux")]
fn lower_own_priority() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a valid sched_param that outlives the call; pid 0 is
    // the calling thread.
    let failed = unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) != 0 };
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
    async fn the_background_thread_runs_in_the_idle_class() {
        fn own_policy() -> i32 {
            // SAFETY: sched_getscheduler takes no pointers; pid 0 is this thread.
            unsafe { libc::sched_getscheduler(0) }
        }
        let there = background(|| Ok(own_policy())).await.ok();
        assert_eq!(there, Some(libc::SCHED_IDLE));
        assert_ne!(own_policy(), libc::SCHED_IDLE);
    }
}

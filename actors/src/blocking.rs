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

/// Which background thread a job runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Background {
    /// Linux's idle scheduling class (see `lower_own_priority`).
    Idle,
    /// Nice + 10: for when idle-class jobs starve (a CPU that other work keeps
    /// busy gives them almost nothing).
    Low,
}

/// [`blocking`] for work nothing waits for (flushes of applied state), on a
/// thread of its own at a low CPU priority (`class`): the log appends and
/// replication that writes wait for go first (integration/BENCHMARKS.md,
/// fourteenth and eighteenth sessions).
pub(crate) async fn background<T: Send + 'static>(
    class: Background,
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    let (tx, rx) = oneshot::channel();
    let job: BackgroundJob = Box::new(move || {
        let _ = tx.send(f());
    });
    let refused = match background_queue(class) {
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

/// How much lower the `Low` thread's priority is (a nice value).
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
const LOW_NICE: i32 = 10;

fn background_gone() -> StoreError {
    StoreError::Corrupt {
        path: Default::default(),
        what: "background storage task".into(),
        detail: "it ended without an answer (it panicked)".into(),
    }
}

/// The queue of `class`'s thread, started on first use (`None` if no thread
/// could be started).
fn background_queue(class: Background) -> Option<&'static mpsc::Sender<BackgroundJob>> {
    static IDLE: OnceLock<Option<mpsc::Sender<BackgroundJob>>> = OnceLock::new();
    static LOW: OnceLock<Option<mpsc::Sender<BackgroundJob>>> = OnceLock::new();
    let (queue, name) = match class {
        Background::Idle => (&IDLE, "kiln-background"),
        Background::Low => (&LOW, "kiln-bg-low"),
    };
    queue
        .get_or_init(|| {
            let (tx, rx) = mpsc::channel::<BackgroundJob>();
            let started = std::thread::Builder::new()
                .name(name.into())
                .spawn(move || {
                    lower_own_priority(class);
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

/// `Idle` puts the calling thread in the `SCHED_IDLE` class: a very small CPU
/// share, and a woken thread takes its core at once. At a nice value (10, or
/// 19) whole batches of writes still stalled 10-25 ms a few times a second at
/// 16 clients, in every stall traced while members' flushes ran. The price: a
/// flush preempted while it holds a lock a write needs (the pending state's
/// mutex, redb's page cache) holds that write until it gets a core again; and
/// on a CPU kept busy by other work a flush may take seconds (the stripe actor
/// then moves its flushes to `Low`). An unprivileged thread cannot leave the
/// class, hence two threads. `Low` raises the thread's nice value by
/// [`LOW_NICE`]. Elsewhere than Linux the threads keep their priority.
#[cfg(not(target_os = "linux"))]
fn lower_own_priority(_class: Background) {}

#[cfg(target_os = "linux")]
fn lower_own_priority(class: Background) {
    let failed = match class {
        Background::Idle => {
            let param = libc::sched_param { sched_priority: 0 };
            // SAFETY: `param` is a valid sched_param that outlives the call;
            // pid 0 is the calling thread.
            unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) != 0 }
        }
        // SAFETY: gettid, getpriority and setpriority take no pointers.
        Background::Low => unsafe {
            let tid = libc::gettid() as libc::id_t;
            let now = libc::getpriority(libc::PRIO_PROCESS, tid);
            libc::setpriority(libc::PRIO_PROCESS, tid, now.saturating_add(LOW_NICE)) != 0
        },
    };
    if failed {
        tracing::debug!(?class, error = %std::io::Error::last_os_error(), "background thread keeps its priority");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_background_job_answers_and_one_that_panics_is_an_error() {
        for class in [Background::Idle, Background::Low] {
            assert_eq!(background(class, || Ok(7)).await.ok(), Some(7));
            let panicked: Result<(), StoreError> = background(class, || panic!("boom")).await;
            assert!(panicked.is_err());
            // The thread survived the panic.
            assert_eq!(background(class, || Ok("again")).await.ok(), Some("again"));
        }
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn the_background_threads_run_at_their_priorities() {
        fn own_policy() -> i32 {
            // SAFETY: sched_getscheduler takes no pointers; pid 0 is this thread.
            unsafe { libc::sched_getscheduler(0) }
        }
        fn own_nice() -> i32 {
            // SAFETY: as in `lower_own_priority`.
            unsafe { libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t) }
        }
        let idle = background(Background::Idle, || Ok(own_policy())).await.ok();
        assert_eq!(idle, Some(libc::SCHED_IDLE));
        assert_ne!(own_policy(), libc::SCHED_IDLE);
        let low = background(Background::Low, || Ok((own_policy(), own_nice())))
            .await
            .ok();
        assert_eq!(
            low,
            Some((libc::SCHED_OTHER, (own_nice() + LOW_NICE).min(19)))
        );
    }
}

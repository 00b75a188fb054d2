//! When the active's next batch of client writes goes (group commit).
//!
//! Most writers are closed loops: a client whose write was answered sends its
//! next one at once. Started the moment the previous batch committed, a batch
//! held only the writes that arrived during that commit, while the clients just
//! answered were still on their way back, so the clients split into two halves
//! that took turns, each half a commit. Waiting briefly for the answered
//! clients puts them all in one batch: fewer commits for as many writes.
//! Measured at 64 clients, 12 s runs: ~11 % more writes a second at ~13 % less
//! CPU per write; at 16 clients ~28 % more, the p99 a little lower.

use std::time::{Duration, Instant};

/// How long the next batch may wait for the clients the last commit answered.
pub const BATCH_LINGER: Duration = Duration::from_millis(2);

#[derive(Debug, Default)]
pub struct Linger {
    /// Writes the last apply answered.
    awaited: usize,
    /// Writes that came since.
    arrived: usize,
    /// Until when the next batch waits for the rest of them.
    until: Option<Instant>,
}

impl Linger {
    /// The active's apply answered `n` writes at `now`.
    pub fn answered(&mut self, n: usize, now: Instant) {
        if n == 0 {
            return;
        }
        self.awaited = n;
        self.arrived = 0;
        self.until = Some(now + BATCH_LINGER);
    }

    /// A client write joined the next batch.
    pub fn arrived(&mut self) {
        self.arrived += 1;
    }

    /// `None` if the next batch may go at `now`; otherwise how long it waits at most.
    pub fn wait(&self, now: Instant) -> Option<Duration> {
        let until = self.until?;
        if self.arrived >= self.awaited || now >= until {
            return None;
        }
        Some(until - now)
    }

    /// A batch went: the next one waits only once an apply answered writes.
    pub fn started(&mut self) {
        *self = Linger::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_wait_before_any_write_was_answered() {
        let l = Linger::default();
        assert_eq!(l.wait(Instant::now()), None);
    }

    #[test]
    fn waits_until_every_answered_client_wrote_again() {
        let t0 = Instant::now();
        let mut l = Linger::default();
        l.answered(3, t0);
        l.arrived();
        l.arrived();
        assert_eq!(l.wait(t0), Some(BATCH_LINGER));
        let later = t0 + Duration::from_micros(500);
        assert_eq!(
            l.wait(later),
            Some(BATCH_LINGER - Duration::from_micros(500))
        );
        l.arrived();
        assert_eq!(l.wait(later), None);
    }

    #[test]
    fn waits_no_longer_than_the_linger() {
        let t0 = Instant::now();
        let mut l = Linger::default();
        l.answered(64, t0);
        l.arrived();
        assert!(l.wait(t0 + BATCH_LINGER / 2).is_some());
        assert_eq!(l.wait(t0 + BATCH_LINGER), None);
    }

    #[test]
    fn a_single_client_never_waits() {
        let t0 = Instant::now();
        let mut l = Linger::default();
        l.answered(1, t0);
        l.arrived();
        assert_eq!(l.wait(t0), None);
        l.started();
        // The next write, before its predecessor's answer came back: at once.
        assert_eq!(l.wait(t0), None);
    }

    #[test]
    fn an_apply_that_answered_nothing_changes_nothing() {
        let t0 = Instant::now();
        let mut l = Linger::default();
        l.answered(2, t0);
        l.arrived();
        l.answered(0, t0);
        assert!(l.wait(t0).is_some());
        l.arrived();
        assert_eq!(l.wait(t0), None);
    }
}

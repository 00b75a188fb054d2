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
//!
//! Not every answered client writes to this stripe again (its next key may
//! live in another stripe, or it may be done): the batch waits only for the
//! share of them that came back within the linger the round before, so a
//! client whose writes spread over stripes does not wait for others that went
//! elsewhere.

use std::time::{Duration, Instant};

/// How long the next batch may wait for the clients the last commit answered.
/// A client sent on to the active by another node is ~2 ms away at 64 clients
/// on two cores: with 3 ms instead of 2, ~5 % more writes a second at 64
/// clients (five rounds of six), the median write ~10 % faster; 4 ms gave no
/// more (integration/BENCHMARKS.md, twentieth session).
pub const BATCH_LINGER: Duration = Duration::from_millis(3);

#[derive(Debug)]
pub struct Linger {
    /// Writes the last apply answered (this round's).
    answered: usize,
    /// Writes that came within `BATCH_LINGER` of it.
    arrived: usize,
    /// End of this round's linger.
    until: Option<Instant>,
    /// No batch went yet this round.
    holding: bool,
    /// The round before: writes that came within its linger, and writes it
    /// answered (the share to wait for).
    returned: (usize, usize),
}

impl Default for Linger {
    fn default() -> Self {
        Linger {
            answered: 0,
            arrived: 0,
            until: None,
            holding: false,
            // Until measured: every answered client comes back.
            returned: (1, 1),
        }
    }
}

impl Linger {
    /// The active's apply answered `n` writes at `now`: a new round.
    pub fn answered(&mut self, n: usize, now: Instant) {
        if n == 0 {
            return;
        }
        if self.answered > 0 {
            self.returned = (self.arrived.min(self.answered), self.answered);
        }
        self.answered = n;
        self.arrived = 0;
        self.until = Some(now + BATCH_LINGER);
        self.holding = true;
    }

    /// `n` more writes were answered in this round, after those that began
    /// it (writes answered at their commit begin it, the rest follow after
    /// the apply): their clients count among those the batch waits for.
    pub fn answered_more(&mut self, n: usize) {
        self.answered += n;
    }

    /// A client write joined the next batch at `now`.
    pub fn arrived(&mut self, now: Instant) {
        if self.until.is_some_and(|until| now < until) {
            self.arrived += 1;
        }
    }

    /// `None` if the next batch may go at `now`; otherwise how long it waits at most.
    pub fn wait(&self, now: Instant) -> Option<Duration> {
        let until = self.until.filter(|_| self.holding)?;
        let (came, of) = self.returned;
        // arrived / answered ≥ came / of
        if now >= until || self.arrived * of >= self.answered * came {
            return None;
        }
        Some(until - now)
    }

    /// A batch went: the rest of this round is only counted.
    pub fn started(&mut self) {
        self.holding = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: Duration = Duration::from_micros(1);

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
        l.arrived(t0);
        l.arrived(t0);
        assert_eq!(l.wait(t0), Some(BATCH_LINGER));
        let later = t0 + 500 * US;
        assert_eq!(l.wait(later), Some(BATCH_LINGER - 500 * US));
        l.arrived(later);
        assert_eq!(l.wait(later), None);
    }

    #[test]
    fn writes_answered_after_the_round_began_are_waited_for_too() {
        // Two answered at their commit, two more after the apply.
        let t0 = Instant::now();
        let mut l = Linger::default();
        l.answered(2, t0);
        l.arrived(t0);
        l.arrived(t0);
        assert_eq!(l.wait(t0), None);
        l.answered_more(2);
        assert!(l.wait(t0).is_some());
        l.arrived(t0);
        l.arrived(t0);
        assert_eq!(l.wait(t0), None);
    }

    #[test]
    fn waits_no_longer_than_the_linger() {
        let t0 = Instant::now();
        let mut l = Linger::default();
        l.answered(64, t0);
        l.arrived(t0);
        assert!(l.wait(t0 + BATCH_LINGER / 2).is_some());
        assert_eq!(l.wait(t0 + BATCH_LINGER), None);
    }

    #[test]
    fn a_single_client_never_waits() {
        let t0 = Instant::now();
        let mut l = Linger::default();
        l.answered(1, t0);
        l.arrived(t0);
        assert_eq!(l.wait(t0), None);
        l.started();
        // The next write, before its predecessor's answer came back: at once.
        l.arrived(t0);
        assert_eq!(l.wait(t0), None);
    }

    #[test]
    fn an_apply_that_answered_nothing_changes_nothing() {
        let t0 = Instant::now();
        let mut l = Linger::default();
        l.answered(2, t0);
        l.arrived(t0);
        l.answered(0, t0);
        assert!(l.wait(t0).is_some());
        l.arrived(t0);
        assert_eq!(l.wait(t0), None);
    }

    #[test]
    fn waits_only_for_the_share_that_came_back_last_round() {
        // Two clients whose writes spread over two stripes: of the two this
        // stripe answered, one came back.
        let t0 = Instant::now();
        let mut l = Linger::default();
        l.answered(2, t0);
        l.arrived(t0 + 100 * US);
        assert!(l.wait(t0 + 100 * US).is_some());
        let t1 = t0 + 5 * BATCH_LINGER;
        l.answered(2, t1);
        assert!(l.wait(t1).is_some());
        l.arrived(t1 + 100 * US);
        assert_eq!(l.wait(t1 + 100 * US), None);
    }

    #[test]
    fn nobody_coming_back_means_no_wait_until_they_do() {
        let t0 = Instant::now();
        let mut l = Linger::default();
        l.answered(4, t0);
        let t1 = t0 + 5 * BATCH_LINGER;
        l.answered(4, t1);
        assert_eq!(l.wait(t1), None);
        // Arrivals after a batch went still count for the next round.
        l.started();
        for _ in 0..4 {
            l.arrived(t1 + 100 * US);
        }
        let t2 = t1 + 5 * BATCH_LINGER;
        l.answered(4, t2);
        l.arrived(t2);
        assert!(l.wait(t2).is_some());
    }

    #[test]
    fn writes_after_the_linger_do_not_count_as_returns() {
        let t0 = Instant::now();
        let mut l = Linger::default();
        l.answered(2, t0);
        l.arrived(t0 + BATCH_LINGER);
        l.arrived(t0 + BATCH_LINGER);
        let t1 = t0 + 5 * BATCH_LINGER;
        l.answered(2, t1);
        assert_eq!(l.wait(t1), None);
    }
}

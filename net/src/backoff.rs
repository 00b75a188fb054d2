//! Backoff of the dials a request makes on its own: a peer whose last dial
//! failed is not dialled again for every request sent its way (a leader's
//! heartbeats, a stripe's replication), only after a growing pause; meanwhile
//! they fail at once (their callers retry). Dials the membership protocol
//! asks for are not held back (it paces them itself), but their failures count
//! here too. Time is passed in: no clock inside.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::Duration;

/// The pause after the first failed dial; it doubles with each failure in a row.
pub const FIRST_PAUSE: Duration = Duration::from_millis(250);
/// The longest pause: a peer that comes back is dialled within it (and at once
/// by membership's own redials, whose success ends the backoff).
pub const MAX_PAUSE: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy)]
struct Failures {
    in_a_row: u32,
    last_ms: u64,
    until_ms: u64,
}

/// Per peer: failed dials in a row and until when requests do not dial it.
#[derive(Debug)]
pub struct DialBackoff<P> {
    peers: HashMap<P, Failures>,
}

impl<P> Default for DialBackoff<P> {
    fn default() -> Self {
        DialBackoff {
            peers: HashMap::new(),
        }
    }
}

impl<P: Hash + Eq + Clone> DialBackoff<P> {
    pub fn failed(&mut self, peer: &P, now_ms: u64) {
        let f = self.peers.entry(peer.clone()).or_insert(Failures {
            in_a_row: 0,
            last_ms: now_ms,
            until_ms: now_ms,
        });
        f.in_a_row = f.in_a_row.saturating_add(1);
        f.last_ms = now_ms;
        let pause = FIRST_PAUSE
            .saturating_mul(1 << (f.in_a_row - 1).min(16))
            .min(MAX_PAUSE);
        f.until_ms = now_ms + pause.as_millis() as u64;
    }

    /// A connection to the peer is up: it is reachable again.
    pub fn connected(&mut self, peer: &P) {
        self.peers.remove(peer);
    }

    /// `Some(ms since the last failed dial)` while a request must not dial `peer`.
    pub fn holding(&self, peer: &P, now_ms: u64) -> Option<u64> {
        self.peers
            .get(peer)
            .filter(|f| now_ms < f.until_ms)
            .map(|f| now_ms.saturating_sub(f.last_ms))
    }

    /// Forgets peers whose pause ended long ago (bounded memory under churn).
    pub fn prune(&mut self, now_ms: u64) {
        let keep_ms = 10 * MAX_PAUSE.as_millis() as u64;
        self.peers
            .retain(|_, f| now_ms.saturating_sub(f.until_ms) < keep_ms);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_double_up_to_the_cap_and_a_connection_ends_them() {
        let mut b = DialBackoff::default();
        assert_eq!(b.holding(&"p", 0), None, "never failed: dial");
        b.failed(&"p", 1_000);
        assert_eq!(b.holding(&"p", 1_100), Some(100));
        assert_eq!(b.holding(&"p", 1_250), None);
        b.failed(&"p", 1_300);
        assert!(b.holding(&"p", 1_799).is_some());
        assert_eq!(b.holding(&"p", 1_800), None);
        for i in 0..10 {
            b.failed(&"p", 10_000 + i);
        }
        assert!(b.holding(&"p", 10_009 + 1_999).is_some());
        assert_eq!(b.holding(&"p", 10_009 + 2_000), None, "capped");
        assert_eq!(b.holding(&"q", 10_100), None, "per peer");
        b.connected(&"p");
        assert_eq!(b.holding(&"p", 10_100), None);
        b.failed(&"p", 20_000);
        assert_eq!(b.holding(&"p", 20_250), None, "back to the first pause");
    }

    #[test]
    fn old_entries_are_pruned() {
        let mut b = DialBackoff::default();
        b.failed(&"p", 0);
        b.prune(1_000);
        assert!(b.peers.contains_key("p"));
        b.prune(250 + 20_000);
        assert!(b.peers.is_empty());
    }
}

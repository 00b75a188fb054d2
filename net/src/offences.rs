//! Bookkeeping of peers that send bad frames: a plain state machine, fed with
//! millisecond timestamps, so that it can be tested without a clock.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;

/// Offences counted inside `window_ms` before a peer is banned.
pub const OFFENCE_LIMIT: usize = 3;
/// Window over which offences are counted.
pub const OFFENCE_WINDOW_MS: u64 = 60_000;
/// How long a banned peer is refused.
pub const BAN_MS: u64 = 5 * 60_000;

/// What recording one offence leads to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Counted; `recent` offences are inside the window.
    Counted { recent: usize },
    /// The limit was reached: disconnect and refuse the peer until `until_ms`.
    Ban { until_ms: u64 },
    /// Already banned; nothing more to do.
    AlreadyBanned,
}

#[derive(Debug)]
pub struct Offences<P> {
    recent: HashMap<P, VecDeque<u64>>,
    banned: HashMap<P, u64>,
}

impl<P: Eq + Hash + Clone> Default for Offences<P> {
    fn default() -> Self {
        Offences {
            recent: HashMap::new(),
            banned: HashMap::new(),
        }
    }
}

impl<P: Eq + Hash + Clone> Offences<P> {
    pub fn record(&mut self, peer: &P, now_ms: u64) -> Verdict {
        if self.banned.contains_key(peer) {
            return Verdict::AlreadyBanned;
        }
        let times = self.recent.entry(peer.clone()).or_default();
        while times
            .front()
            .is_some_and(|t| now_ms.saturating_sub(*t) >= OFFENCE_WINDOW_MS)
        {
            times.pop_front();
        }
        times.push_back(now_ms);
        if times.len() >= OFFENCE_LIMIT {
            self.recent.remove(peer);
            let until_ms = now_ms + BAN_MS;
            self.banned.insert(peer.clone(), until_ms);
            Verdict::Ban { until_ms }
        } else {
            Verdict::Counted {
                recent: times.len(),
            }
        }
    }

    pub fn is_banned(&self, peer: &P) -> bool {
        self.banned.contains_key(peer)
    }

    /// Removes and returns the peers whose ban is over.
    pub fn expire(&mut self, now_ms: u64) -> Vec<P> {
        let over: Vec<P> = self
            .banned
            .iter()
            .filter(|(_, until)| **until <= now_ms)
            .map(|(p, _)| p.clone())
            .collect();
        for p in &over {
            self.banned.remove(p);
        }
        self.recent.retain(|_, t| {
            t.back()
                .is_some_and(|last| now_ms.saturating_sub(*last) < OFFENCE_WINDOW_MS)
        });
        over
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn three_offences_in_a_minute_ban_for_five_minutes() {
        let mut o = Offences::default();
        assert_eq!(o.record(&"p", 0), Verdict::Counted { recent: 1 });
        assert_eq!(o.record(&"p", 10_000), Verdict::Counted { recent: 2 });
        assert_eq!(o.record(&"p", 20_000), Verdict::Ban { until_ms: 320_000 });
        assert!(o.is_banned(&"p"));
        assert_eq!(o.record(&"p", 30_000), Verdict::AlreadyBanned);
        assert!(o.expire(319_999).is_empty());
        assert_eq!(o.expire(320_000), vec!["p"]);
        assert!(!o.is_banned(&"p"));
    }

    #[test]
    fn offences_spread_over_more_than_a_minute_do_not_ban() {
        let mut o = Offences::default();
        o.record(&"p", 0);
        o.record(&"p", 40_000);
        assert_eq!(o.record(&"p", 70_000), Verdict::Counted { recent: 2 });
        assert_eq!(o.record(&"q", 70_000), Verdict::Counted { recent: 1 });
    }
}

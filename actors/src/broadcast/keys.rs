//! Idempotency-Keys of this node's publishes: a publish retried under the key it
//! was first sent with gets the first answer (its seqs) instead of publishing its
//! events a second time, for the reconnect window and across a restart of the
//! node (the answers are kept in the log, in the commit that holds the events).
//!
//! A key's scope is the node that accepted the publish: the events' origin and
//! seqs are this node's. A retry sent to another node publishes there again.
//!
//! Plain state, no I/O: the actor stores what [`PublishKeys::finished`] is given
//! and hands on the answers.

use std::collections::{BTreeSet, HashMap};

use kiln_persistence::PublishKey;

/// Keys remembered at most; past this the oldest are forgotten before their
/// window ends (a key is up to 256 bytes: ~100 MiB at most).
pub const MAX_PUBLISH_KEYS: usize = 200_000;

/// What to do with a publish sent under a key.
#[derive(Debug, PartialEq, Eq)]
pub enum KeyCheck {
    /// Not known: publish it, then [`PublishKeys::finished`] or [`PublishKeys::failed`].
    New,
    /// Published before: answer with seqs `first..first + count`.
    Answered { first: u64, count: u64 },
    /// The same request under this key is being published: wait for its answer
    /// ([`PublishKeys::wait`]).
    InFlight,
    /// The key was used for a different request.
    Different,
}

struct InFlight<W> {
    digest: [u8; 32],
    waiters: Vec<W>,
}

/// The keys of the reconnect window. `W` is how a waiting retry is answered.
pub struct PublishKeys<W> {
    window_ms: u64,
    max: usize,
    answered: HashMap<String, PublishKey>,
    /// (accepted at, key), oldest first (kept in order whatever order keys
    /// come in: recalled ones, a clock stepped back); a key used again has a
    /// later entry and its older one is skipped when it expires.
    by_age: BTreeSet<(u64, String)>,
    in_flight: HashMap<String, InFlight<W>>,
    /// Keys in flight that the log was found to hold (see [`PublishKeys::recall`]).
    recalled: HashMap<String, PublishKey>,
}

impl<W> PublishKeys<W> {
    /// Starts from the keys the log holds (oldest first).
    pub fn new(window_ms: u64, max: usize, stored: Vec<PublishKey>) -> Self {
        let mut keys = PublishKeys {
            window_ms,
            max,
            answered: HashMap::new(),
            by_age: BTreeSet::new(),
            in_flight: HashMap::new(),
            recalled: HashMap::new(),
        };
        for k in stored {
            keys.remember(k);
        }
        keys
    }

    pub fn window_ms(&self) -> u64 {
        self.window_ms
    }

    /// Keys remembered with their answer.
    pub fn len(&self) -> usize {
        self.answered.len()
    }

    pub fn is_empty(&self) -> bool {
        self.answered.is_empty()
    }

    /// What to do with a publish of request `digest` under `key` at `now_ms`.
    /// `New` marks the key in flight.
    pub fn check(&mut self, key: &str, digest: &[u8; 32], now_ms: u64) -> KeyCheck {
        self.expire(now_ms);
        if let Some(f) = self.in_flight.get(key) {
            return if &f.digest == digest {
                KeyCheck::InFlight
            } else {
                KeyCheck::Different
            };
        }
        match self.answered.get(key) {
            Some(k) if &k.digest == digest => KeyCheck::Answered {
                first: k.first,
                count: k.count,
            },
            Some(_) => KeyCheck::Different,
            None => {
                self.in_flight.insert(
                    key.to_string(),
                    InFlight {
                        digest: *digest,
                        waiters: Vec::new(),
                    },
                );
                KeyCheck::New
            }
        }
    }

    /// Queues a retry of a publish in flight, answered when it ends. Given back
    /// if the key is not in flight.
    pub fn wait(&mut self, key: &str, waiter: W) -> Option<W> {
        match self.in_flight.get_mut(key) {
            Some(f) => {
                f.waiters.push(waiter);
                None
            }
            None => Some(waiter),
        }
    }

    /// The keyed publish is in the log: its retries from now on, and those
    /// waiting (returned), get this answer.
    pub fn finished(&mut self, answer: PublishKey) -> Vec<W> {
        let waiters = self
            .in_flight
            .remove(&answer.key)
            .map_or_else(Vec::new, |f| f.waiters);
        self.remember(answer);
        waiters
    }

    /// The keyed publish failed: the key is free again; those waiting
    /// (returned) are told it failed.
    pub fn failed(&mut self, key: &str) -> Vec<W> {
        self.recalled.remove(key);
        self.in_flight
            .remove(key)
            .map_or_else(Vec::new, |f| f.waiters)
    }

    fn remember(&mut self, k: PublishKey) {
        self.by_age.insert((k.at_ms, k.key.clone()));
        self.answered.insert(k.key.clone(), k);
        while self.answered.len() > self.max {
            if !self.forget_oldest() {
                break;
            }
        }
    }

    /// Takes in the keys the log holds that are not known here (an append
    /// answered with an error that reached the file after all): retries of
    /// those publishes get their seqs, not a second publish. A retry already
    /// queued under such a key learns it from [`PublishKeys::take_recalled`]
    /// before it is written.
    pub fn recall(&mut self, stored: Vec<PublishKey>) {
        for k in stored {
            if self.in_flight.contains_key(&k.key) {
                self.recalled.insert(k.key.clone(), k);
                continue;
            }
            let known = self
                .answered
                .get(&k.key)
                .is_some_and(|a| a.at_ms >= k.at_ms);
            if !known {
                self.remember(k);
            }
        }
    }

    /// For a publish of `digest` under `key`, queued before the log was read
    /// again: if the log turned out to hold the key, the key is answered from
    /// it instead of publishing again. Gives the answer for this publish
    /// (`Answered`, or `Different` if the log holds another request under the
    /// key) and the retries that waited for it (to be given the same).
    pub fn take_recalled(&mut self, key: &str, digest: &[u8; 32]) -> Option<(KeyCheck, Vec<W>)> {
        let stored = self.recalled.remove(key)?;
        let waiters = self
            .in_flight
            .remove(key)
            .map_or_else(Vec::new, |f| f.waiters);
        let check = if &stored.digest == digest {
            KeyCheck::Answered {
                first: stored.first,
                count: stored.count,
            }
        } else {
            KeyCheck::Different
        };
        self.remember(stored);
        Some((check, waiters))
    }

    /// Forgets the keys accepted before the window that ends at `now_ms`.
    pub fn expire(&mut self, now_ms: u64) {
        let before = now_ms.saturating_sub(self.window_ms);
        while self.by_age.first().is_some_and(|(at, _)| *at < before) {
            self.forget_oldest();
        }
    }

    fn forget_oldest(&mut self) -> bool {
        let Some((at, key)) = self.by_age.pop_first() else {
            return false;
        };
        if self.answered.get(&key).is_some_and(|k| k.at_ms == at) {
            self.answered.remove(&key);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(key: &str, at_ms: u64, digest: u8, first: u64) -> PublishKey {
        PublishKey {
            key: key.into(),
            at_ms,
            digest: [digest; 32],
            first,
            count: 2,
        }
    }

    #[test]
    fn a_retry_gets_the_first_answer_and_another_request_is_refused() {
        let mut keys: PublishKeys<u32> = PublishKeys::new(1_000, 10, Vec::new());
        assert_eq!(keys.check("k", &[1; 32], 100), KeyCheck::New);
        // Retries while it is written wait for it; a different request does not.
        assert_eq!(keys.check("k", &[1; 32], 110), KeyCheck::InFlight);
        assert_eq!(keys.wait("k", 7), None);
        assert_eq!(keys.check("k", &[2; 32], 110), KeyCheck::Different);
        assert_eq!(keys.finished(answer("k", 100, 1, 5)), vec![7]);
        assert_eq!(keys.wait("k", 8), Some(8));
        assert_eq!(
            keys.check("k", &[1; 32], 900),
            KeyCheck::Answered { first: 5, count: 2 }
        );
        assert_eq!(keys.check("k", &[2; 32], 900), KeyCheck::Different);
        // Past the window the key is new again.
        assert_eq!(keys.check("k", &[2; 32], 1_101), KeyCheck::New);
    }

    #[test]
    fn a_failed_publish_frees_its_key_and_tells_its_waiters() {
        let mut keys: PublishKeys<u32> = PublishKeys::new(1_000, 10, Vec::new());
        assert_eq!(keys.check("k", &[1; 32], 100), KeyCheck::New);
        assert_eq!(keys.wait("k", 3), None);
        assert_eq!(keys.failed("k"), vec![3]);
        assert_eq!(keys.check("k", &[1; 32], 100), KeyCheck::New);
    }

    #[test]
    fn keys_the_log_holds_are_recalled_after_a_failed_answer() {
        let mut keys: PublishKeys<u32> = PublishKeys::new(1_000, 10, Vec::new());
        assert_eq!(keys.check("k", &[1; 32], 100), KeyCheck::New);
        keys.failed("k");
        keys.recall(vec![answer("k", 100, 1, 7), answer("old", 50, 1, 1)]);
        assert_eq!(
            keys.check("k", &[1; 32], 200),
            KeyCheck::Answered { first: 7, count: 2 }
        );
        assert_eq!(
            keys.check("old", &[1; 32], 200),
            KeyCheck::Answered { first: 1, count: 2 }
        );
        assert_eq!(keys.len(), 2);
    }

    #[test]
    fn a_retry_queued_while_the_log_is_read_again_gets_the_answer_it_holds() {
        let mut keys: PublishKeys<u32> = PublishKeys::new(1_000, 10, Vec::new());
        // The first try failed (but reached the file); its retry is queued,
        // a second retry waits for it, and another key is queued too.
        assert_eq!(keys.check("k", &[1; 32], 100), KeyCheck::New);
        keys.failed("k");
        assert_eq!(keys.check("k", &[1; 32], 110), KeyCheck::New);
        assert_eq!(keys.wait("k", 4), None);
        assert_eq!(keys.check("o", &[3; 32], 110), KeyCheck::New);
        keys.recall(vec![answer("k", 100, 1, 7), answer("o", 90, 2, 1)]);
        assert_eq!(
            keys.take_recalled("k", &[1; 32]),
            Some((KeyCheck::Answered { first: 7, count: 2 }, vec![4]))
        );
        // The log holds another request under "o": this one is refused.
        assert_eq!(
            keys.take_recalled("o", &[3; 32]),
            Some((KeyCheck::Different, vec![]))
        );
        assert_eq!(keys.take_recalled("k", &[1; 32]), None);
        assert_eq!(
            keys.check("k", &[1; 32], 120),
            KeyCheck::Answered { first: 7, count: 2 }
        );
        assert_eq!(keys.check("o", &[3; 32], 120), KeyCheck::Different);
    }

    #[test]
    fn keys_expire_oldest_first_whatever_order_they_came_in() {
        let mut keys: PublishKeys<u32> = PublishKeys::new(100, 10, Vec::new());
        keys.recall(vec![answer("late", 90, 1, 3), answer("early", 10, 1, 1)]);
        // At 150 the window starts at 50: "early" is gone, "late" is kept.
        assert_eq!(keys.check("early", &[1; 32], 150), KeyCheck::New);
        assert_eq!(
            keys.check("late", &[1; 32], 150),
            KeyCheck::Answered { first: 3, count: 2 }
        );
    }

    #[test]
    fn stored_keys_are_answered_and_the_count_is_bounded() {
        let stored = vec![answer("a", 10, 1, 1), answer("b", 20, 1, 3)];
        let mut keys: PublishKeys<u32> = PublishKeys::new(1_000, 2, stored);
        assert_eq!(
            keys.check("a", &[1; 32], 500),
            KeyCheck::Answered { first: 1, count: 2 }
        );
        assert_eq!(keys.check("c", &[1; 32], 500), KeyCheck::New);
        keys.finished(answer("c", 500, 1, 5));
        // Three answered, two kept: the oldest went first.
        assert_eq!(keys.len(), 2);
        assert_eq!(keys.check("a", &[1; 32], 500), KeyCheck::New);
        assert_eq!(
            keys.check("b", &[1; 32], 500),
            KeyCheck::Answered { first: 3, count: 2 }
        );
        // A key used again keeps its later answer when its first one expires.
        keys.failed("a");
        let mut keys: PublishKeys<u32> = PublishKeys::new(100, 10, Vec::new());
        keys.check("k", &[1; 32], 0);
        keys.finished(answer("k", 0, 1, 1));
        assert_eq!(keys.check("k", &[2; 32], 150), KeyCheck::New);
        keys.finished(answer("k", 150, 2, 3));
        assert_eq!(
            keys.check("k", &[2; 32], 200),
            KeyCheck::Answered { first: 3, count: 2 }
        );
    }
}

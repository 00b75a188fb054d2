//! What this node's storage cannot do right now, by part of the node, for
//! `GET /v1/node`, `kiln status` and the `kiln_storage_failing` gauge: an
//! operator with a full disk sees it there, not only in the logs.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// The parts of a node that write to its data directory on their own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum StoragePart {
    /// `stripe.redb`, `stripe-state.redb`.
    Stripe,
    /// `broadcast.redb`.
    Broadcast,
    /// `artifacts/`: content fetched from peers.
    Artifacts,
}

impl StoragePart {
    pub const ALL: [StoragePart; 3] = [
        StoragePart::Stripe,
        StoragePart::Broadcast,
        StoragePart::Artifacts,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            StoragePart::Stripe => "stripe",
            StoragePart::Broadcast => "broadcast",
            StoragePart::Artifacts => "artifacts",
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PartLabel {
    part: String,
}

/// Shared by the actors that write (each reports its own part) and the HTTP API.
/// A part is failing while any of its sources is: each source (a job of the
/// stripe, one artifact's transfer) clears only its own failure.
#[derive(Clone, Default)]
pub struct StorageHealth {
    failing: Arc<Mutex<BTreeMap<(StoragePart, String), String>>>,
    gauge: Family<PartLabel, Gauge>,
}

impl StorageHealth {
    pub fn register(registry: &mut Registry) -> Self {
        let health = StorageHealth::default();
        registry.register(
            "kiln_storage_failing",
            "1 while a part of the node (stripe, broadcast, artifacts) cannot write its files (a full disk, an I/O error)",
            health.gauge.clone(),
        );
        let failing = health.lock();
        for part in StoragePart::ALL {
            health.update_gauge(&failing, part);
        }
        drop(failing);
        health
    }

    /// Sets `part`'s gauge from the map (called with its lock held, so the two
    /// agree).
    fn update_gauge(&self, failing: &BTreeMap<(StoragePart, String), String>, part: StoragePart) {
        let any = failing.keys().any(|(p, _)| *p == part);
        self.gauge
            .get_or_create(&PartLabel {
                part: part.as_str().to_string(),
            })
            .set(i64::from(any));
    }

    /// `source` of `part` cannot write: `error` says why (the latest failure).
    pub fn failing(&self, part: StoragePart, source: &str, error: String) {
        let mut failing = self.lock();
        failing.insert((part, source.to_string()), error);
        self.update_gauge(&failing, part);
    }

    /// `source` of `part` wrote successfully (or is gone).
    pub fn ok(&self, part: StoragePart, source: &str) {
        let mut failing = self.lock();
        // Called on every stripe append: no key made while nothing fails.
        if failing.is_empty() {
            return;
        }
        if failing.remove(&(part, source.to_string())).is_some() {
            self.update_gauge(&failing, part);
        }
    }

    /// Keeps the failures of `part` whose source `keep` accepts (the others are
    /// gone: an artifact retired, or held by now).
    pub fn retain(&self, part: StoragePart, keep: impl Fn(&str) -> bool) {
        let mut failing = self.lock();
        failing.retain(|(p, source), _| *p != part || keep(source));
        self.update_gauge(&failing, part);
    }

    /// The failing parts and why (the first failing source of each).
    pub fn failures(&self) -> Vec<(StoragePart, String)> {
        let mut out: Vec<(StoragePart, String)> = Vec::new();
        for ((part, _), e) in self.lock().iter() {
            if out.last().is_none_or(|(p, _)| p != part) {
                out.push((*part, e.clone()));
            }
        }
        out
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<(StoragePart, String), String>> {
        self.failing.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_part_is_failing_until_each_of_its_sources_writes_again() {
        let mut registry = Registry::default();
        let h = StorageHealth::register(&mut registry);
        h.failing(StoragePart::Broadcast, "log", "no space".into());
        h.failing(StoragePart::Stripe, "log", "I/O error".into());
        h.failing(StoragePart::Broadcast, "log", "still no space".into());
        assert_eq!(
            h.failures(),
            vec![
                (StoragePart::Stripe, "I/O error".to_string()),
                (StoragePart::Broadcast, "still no space".to_string())
            ]
        );
        h.ok(StoragePart::Stripe, "log");
        assert_eq!(h.failures().len(), 1);
        // Two sources of one part: one writing again does not clear the other.
        h.failing(StoragePart::Artifacts, "a", "no space".into());
        h.failing(StoragePart::Artifacts, "b", "no space".into());
        h.ok(StoragePart::Artifacts, "a");
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        assert!(
            text.contains(r#"kiln_storage_failing{part="broadcast"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"kiln_storage_failing{part="stripe"} 0"#),
            "{text}"
        );
        assert!(
            text.contains(r#"kiln_storage_failing{part="artifacts"} 1"#),
            "{text}"
        );
        h.ok(StoragePart::Artifacts, "b");
        assert_eq!(h.failures().len(), 1);
    }
}

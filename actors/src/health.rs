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
#[derive(Clone, Default)]
pub struct StorageHealth {
    failing: Arc<Mutex<BTreeMap<StoragePart, String>>>,
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
        for part in [
            StoragePart::Stripe,
            StoragePart::Broadcast,
            StoragePart::Artifacts,
        ] {
            health.set_gauge(part, 0);
        }
        health
    }

    fn set_gauge(&self, part: StoragePart, v: i64) {
        self.gauge
            .get_or_create(&PartLabel {
                part: part.as_str().to_string(),
            })
            .set(v);
    }

    /// `part` cannot write: `error` says why (the latest failure).
    pub fn failing(&self, part: StoragePart, error: String) {
        self.set_gauge(part, 1);
        self.lock().insert(part, error);
    }

    /// `part` wrote successfully.
    pub fn ok(&self, part: StoragePart) {
        if self.lock().remove(&part).is_some() {
            self.set_gauge(part, 0);
        }
    }

    /// The failing parts and why.
    pub fn failures(&self) -> Vec<(StoragePart, String)> {
        self.lock().iter().map(|(p, e)| (*p, e.clone())).collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<StoragePart, String>> {
        self.failing.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_part_is_failing_until_it_writes_again() {
        let mut registry = Registry::default();
        let h = StorageHealth::register(&mut registry);
        h.failing(StoragePart::Broadcast, "no space".into());
        h.failing(StoragePart::Stripe, "I/O error".into());
        h.failing(StoragePart::Broadcast, "still no space".into());
        assert_eq!(
            h.failures(),
            vec![
                (StoragePart::Stripe, "I/O error".to_string()),
                (StoragePart::Broadcast, "still no space".to_string())
            ]
        );
        h.ok(StoragePart::Stripe);
        assert_eq!(h.failures().len(), 1);
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
    }
}

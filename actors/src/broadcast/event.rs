//! The databroadcast event model (Servoy's data notification), its JSON form for
//! HTTP clients, and the resume token of a subscription.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::stripe::kv::{ChangeAction, KvChange};

/// What happened to rows of a table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Insert,
    Update,
    Delete,
}

/// The content of an event; every event also has an origin, a seq and a time,
/// which the log keeps beside it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum EventBody {
    /// Rows of `server`.`table` changed.
    Change {
        server: String,
        table: String,
        /// Primary keys of the rows, one tuple per row.
        pks: Vec<Vec<Value>>,
        action: Action,
        /// Column → value of inserted rows.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        columns: Option<BTreeMap<String, Value>>,
    },
    /// The whole datasource is stale.
    Flush { server: String, table: String },
    /// A free-form application message.
    Message { topic: String, payload: Value },
    /// A new artifact version is complete on the origin node.
    Artifact {
        name: String,
        version: u64,
        sha256: String,
    },
}

impl EventBody {
    /// About the memory the decoded event holds: a JSON value tree takes far
    /// more than its CBOR (`[0,0,...]` is a byte an element as CBOR, tens as
    /// values), which a subscriber's byte bound must count.
    pub fn heap_bytes(&self) -> usize {
        const STRING: usize = 24;
        match self {
            EventBody::Change {
                server,
                table,
                pks,
                columns,
                ..
            } => {
                server.len()
                    + table.len()
                    + pks
                        .iter()
                        .map(|t| STRING + t.iter().map(value_bytes).sum::<usize>())
                        .sum::<usize>()
                    + columns.as_ref().map_or(0, |c| {
                        c.iter()
                            .map(|(k, v)| MAP_ENTRY + k.len() + value_bytes(v))
                            .sum()
                    })
            }
            EventBody::Flush { server, table } => server.len() + table.len(),
            EventBody::Message { topic, payload } => topic.len() + value_bytes(payload),
            EventBody::Artifact { name, sha256, .. } => name.len() + sha256.len(),
        }
    }
}

/// A B-tree map entry's share of its nodes, beyond its key and value.
const MAP_ENTRY: usize = 48;

/// About the memory a JSON value holds, itself included.
fn value_bytes(v: &Value) -> usize {
    const VALUE: usize = 32;
    VALUE
        + match v {
            Value::String(s) => s.len(),
            Value::Array(a) => a.iter().map(value_bytes).sum(),
            Value::Object(o) => o
                .iter()
                .map(|(k, v)| MAP_ENTRY + k.len() + value_bytes(v))
                .sum(),
            _ => 0,
        }
}

/// Every field any kind of [`EventBody`] has, for decoding its CBOR in one pass.
#[derive(Deserialize)]
struct CborFields {
    kind: String,
    server: Option<String>,
    table: Option<String>,
    pks: Option<Vec<Vec<Value>>>,
    action: Option<Action>,
    columns: Option<BTreeMap<String, Value>>,
    topic: Option<String>,
    /// `Some(Value::Null)` for a payload that is JSON `null`.
    #[serde(default, deserialize_with = "present")]
    payload: Option<Value>,
    name: Option<String>,
    version: Option<u64>,
    sha256: Option<String>,
}

/// A field that is there, whatever its value (`null` included).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

/// Why a client's event is refused (`400`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    #[error("{0}")]
    Invalid(String),
}

impl EventBody {
    /// Checks an event a client publishes: only data changes, flushes and
    /// messages, with the names they need.
    pub fn check_publishable(&self) -> Result<(), EventError> {
        let need = |what: &str, v: &str| {
            if v.is_empty() {
                Err(EventError::Invalid(format!("`{what}` must not be empty")))
            } else {
                Ok(())
            }
        };
        match self {
            EventBody::Change {
                server, table, pks, ..
            } => {
                need("server", server)?;
                need("table", table)?;
                if pks.is_empty() {
                    return Err(EventError::Invalid(
                        "`pks` must list at least one primary-key tuple".into(),
                    ));
                }
                Ok(())
            }
            EventBody::Flush { server, table } => {
                need("server", server)?;
                need("table", table)
            }
            EventBody::Message { topic, .. } => need("topic", topic),
            EventBody::Artifact { .. } => Err(EventError::Invalid(
                "events of kind `artifact` are announced by nodes, not published".into(),
            )),
        }
    }

    /// CBOR, as stored in the log and sent between nodes.
    pub fn to_cbor(&self) -> Vec<u8> {
        let mut buf = Vec::with_capacity(128);
        let _ = ciborium::into_writer(self, &mut buf);
        buf
    }

    /// Decodes what [`to_cbor`](Self::to_cbor) wrote. Not through the derived
    /// `Deserialize`: an internally tagged enum first buffers the whole map into
    /// serde's `Content` (every key and value allocated twice), and every node
    /// decodes every event; this decodes in one pass into a struct of all fields
    /// (5 nodes at 40 000 events/s: p99 46–48 → 37–46 ms, see BENCHMARKS.md).
    pub fn from_cbor(bytes: &[u8]) -> Option<EventBody> {
        let f: CborFields = ciborium::from_reader(bytes).ok()?;
        Some(match f.kind.as_str() {
            "change" => EventBody::Change {
                server: f.server?,
                table: f.table?,
                pks: f.pks?,
                action: f.action?,
                columns: f.columns,
            },
            "flush" => EventBody::Flush {
                server: f.server?,
                table: f.table?,
            },
            "message" => EventBody::Message {
                topic: f.topic?,
                payload: f.payload?,
            },
            "artifact" => EventBody::Artifact {
                name: f.name?,
                version: f.version?,
                sha256: f.sha256?,
            },
            _ => return None,
        })
    }

    /// The `change` event of a key/value write.
    pub fn of_kv_change(change: &KvChange) -> EventBody {
        EventBody::Change {
            server: "kv".into(),
            table: change.map.clone(),
            pks: vec![vec![Value::String(change.key.clone())]],
            action: match change.action {
                ChangeAction::Insert => Action::Insert,
                ChangeAction::Update => Action::Update,
                ChangeAction::Delete => Action::Delete,
            },
            columns: None,
        }
    }

    fn datasource(&self) -> Option<(&str, &str)> {
        match self {
            EventBody::Change { server, table, .. } | EventBody::Flush { server, table } => {
                Some((server, table))
            }
            _ => None,
        }
    }
}

/// What an event retention dropped was about, kept so that a subscriber that
/// missed it learns what to refresh (see `BroadcastStore::missed`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum MissedAbout {
    Datasource { server: String, table: String },
    Topic(String),
    Artifact(String),
}

/// The fields that say what an event is about, for decoding only those.
#[derive(Deserialize)]
struct AboutFields {
    kind: String,
    server: Option<String>,
    table: Option<String>,
    topic: Option<String>,
    name: Option<String>,
}

impl MissedAbout {
    /// What the stored event `bytes` is about, encoded as the log keeps it
    /// (`None`: bytes of no known kind).
    pub fn label_of_event(bytes: &[u8]) -> Option<Vec<u8>> {
        let f: AboutFields = ciborium::from_reader(bytes).ok()?;
        let about = match f.kind.as_str() {
            "change" | "flush" => MissedAbout::Datasource {
                server: f.server?,
                table: f.table?,
            },
            "message" => MissedAbout::Topic(f.topic?),
            "artifact" => MissedAbout::Artifact(f.name?),
            _ => return None,
        };
        let mut buf = Vec::new();
        ciborium::into_writer(&about, &mut buf).ok()?;
        Some(buf)
    }

    pub fn from_label(label: &[u8]) -> Option<MissedAbout> {
        ciborium::from_reader(label).ok()
    }
}

/// An event as HTTP clients see it: the body's fields plus origin, seq and ts.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EventJson<'a> {
    pub origin: &'a str,
    pub seq: u64,
    pub ts: u64,
    #[serde(flatten)]
    pub body: &'a EventBody,
}

/// A subscription's filter (`?server=&table=&topic=`). With no filter every event
/// passes; with one, only the events it names: data events of the server/table,
/// messages of the topic.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct Filter {
    pub server: Option<String>,
    pub table: Option<String>,
    pub topic: Option<String>,
}

impl Filter {
    /// Whether this subscriber would have been sent events about `about`.
    pub fn passes_about(&self, about: &MissedAbout) -> bool {
        let data_filter = self.server.is_some() || self.table.is_some();
        if !data_filter && self.topic.is_none() {
            return true;
        }
        match about {
            MissedAbout::Datasource { server, table } => {
                data_filter
                    && self.server.as_deref().is_none_or(|s| s == server)
                    && self.table.as_deref().is_none_or(|t| t == table)
            }
            MissedAbout::Topic(topic) => self.topic.as_deref() == Some(topic.as_str()),
            MissedAbout::Artifact(_) => false,
        }
    }

    pub fn passes(&self, body: &EventBody) -> bool {
        let data_filter = self.server.is_some() || self.table.is_some();
        if !data_filter && self.topic.is_none() {
            return true;
        }
        if let Some((server, table)) = body.datasource() {
            return data_filter
                && self.server.as_deref().is_none_or(|s| s == server)
                && self.table.as_deref().is_none_or(|t| t == table);
        }
        match body {
            EventBody::Message { topic, .. } => self.topic.as_deref() == Some(topic.as_str()),
            _ => false,
        }
    }
}

/// Where a subscriber is in every origin's sequence: the last seq it was given
/// (or skipped by its filter). Sent as the SSE `id:` and taken back from
/// `Last-Event-ID`, so a client resumes on any node with exactly what it missed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Positions(pub BTreeMap<String, u64>);

impl Positions {
    /// `origin=seq,origin=seq` (origins are peer ids or `stripe:<k>`; neither
    /// contains `=` or `,`).
    pub fn to_token(&self) -> String {
        let mut out = String::with_capacity(self.0.len() * 64);
        Self::write_token(&self.0, &mut out);
        out
    }

    /// Appends the token of `positions` to `out` (an event stream writes one per
    /// event: no copy of the map, no allocation beyond `out`).
    pub fn write_token(positions: &BTreeMap<String, u64>, out: &mut String) {
        use std::fmt::Write;
        if positions.is_empty() {
            // Not empty: a browser sends no Last-Event-ID after an empty id,
            // and would resume at the live end instead of the start.
            out.push_str(EMPTY_TOKEN);
            return;
        }
        for (i, (origin, seq)) in positions.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(origin);
            let _ = write!(out, "={seq}");
        }
    }

    pub fn from_token(token: &str) -> Result<Positions, EventError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(EventError::Invalid(format!(
                "Last-Event-ID is {} bytes; at most {MAX_TOKEN_BYTES} (resume with an id this cluster sent)",
                token.len()
            )));
        }
        if token.chars().any(char::is_control) {
            return Err(EventError::Invalid(
                "Last-Event-ID holds control characters".to_string(),
            ));
        }
        let mut map = BTreeMap::new();
        for part in token
            .split(',')
            .filter(|p| !p.trim().is_empty() && p.trim() != EMPTY_TOKEN)
        {
            let (origin, seq) = part.trim().rsplit_once('=').ok_or_else(|| {
                EventError::Invalid(format!(
                    "bad Last-Event-ID part `{part}`: expected origin=seq"
                ))
            })?;
            let seq = seq.parse::<u64>().map_err(|_| {
                EventError::Invalid(format!(
                    "bad Last-Event-ID part `{part}`: seq is not a number"
                ))
            })?;
            if origin.is_empty() {
                return Err(EventError::Invalid(format!(
                    "bad Last-Event-ID part `{part}`: empty origin"
                )));
            }
            map.insert(origin.to_string(), seq);
        }
        Ok(Positions(map))
    }
}

/// The token of no positions (a stream that starts on an empty log): from the
/// start.
pub const EMPTY_TOKEN: &str = "-";

/// Longest resume token taken: every event a subscriber is sent carries its
/// token back (a few thousand origins of ~60 bytes fit).
pub const MAX_TOKEN_BYTES: usize = 256 * 1024;

/// The origin of a stripe's key/value change events.
pub fn stripe_origin(stripe: u32) -> String {
    format!("stripe:{stripe}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_decoded_event_weighs_what_its_values_hold_not_its_cbor() {
        let zeros = EventBody::Message {
            topic: "t".into(),
            payload: json!(vec![0; 10_000]),
        };
        // About a byte each as CBOR; a value each once decoded.
        assert!(zeros.to_cbor().len() < 11_000);
        assert!(zeros.heap_bytes() >= 320_000);
        let text = EventBody::Message {
            topic: "t".into(),
            payload: json!("x".repeat(50_000)),
        };
        assert!((50_000..51_000).contains(&text.heap_bytes()));
    }

    #[test]
    fn a_dropped_event_is_remembered_by_what_it_was_about() {
        let about = |body: EventBody| {
            MissedAbout::from_label(&MissedAbout::label_of_event(&body.to_cbor()).unwrap()).unwrap()
        };
        let change: EventBody = serde_json::from_value(json!({
            "kind": "change", "server": "crm", "table": "orders",
            "pks": [[42]], "action": "insert", "columns": {"a": 1}
        }))
        .unwrap();
        let orders = MissedAbout::Datasource {
            server: "crm".into(),
            table: "orders".into(),
        };
        assert_eq!(about(change), orders);
        let flush = EventBody::Flush {
            server: "crm".into(),
            table: "orders".into(),
        };
        assert_eq!(about(flush), orders);
        let message = EventBody::Message {
            topic: "t".into(),
            payload: json!({"x": [1, 2]}),
        };
        assert_eq!(about(message), MissedAbout::Topic("t".into()));
        assert_eq!(MissedAbout::label_of_event(b"not cbor"), None);

        let table = Filter {
            table: Some("orders".into()),
            ..Default::default()
        };
        assert!(table.passes_about(&orders));
        assert!(!table.passes_about(&MissedAbout::Topic("t".into())));
        assert!(!table.passes_about(&MissedAbout::Artifact("crm".into())));
        assert!(Filter::default().passes_about(&MissedAbout::Artifact("crm".into())));
    }

    #[test]
    fn json_form_matches_the_api() {
        let body: EventBody = serde_json::from_value(json!({
            "kind": "change", "server": "crm", "table": "orders",
            "pks": [[42]], "action": "update"
        }))
        .unwrap();
        body.check_publishable().unwrap();
        let out = serde_json::to_value(EventJson {
            origin: "n1",
            seq: 7,
            ts: 1000,
            body: &body,
        })
        .unwrap();
        assert_eq!(
            out,
            json!({"origin": "n1", "seq": 7, "ts": 1000, "kind": "change", "server": "crm",
                   "table": "orders", "pks": [[42]], "action": "update"})
        );
        // CBOR round trip keeps every value.
        let msg = EventBody::Message {
            topic: "t".into(),
            payload: json!({"a": [1, -2, 1.5, "x", null, true]}),
        };
        assert_eq!(EventBody::from_cbor(&msg.to_cbor()), Some(msg));
        assert_eq!(EventBody::from_cbor(&body.to_cbor()), Some(body));
        for other in [
            EventBody::Flush {
                server: "crm".into(),
                table: "orders".into(),
            },
            EventBody::Message {
                topic: "t".into(),
                payload: Value::Null,
            },
            EventBody::Artifact {
                name: "crm-solution".into(),
                version: 3,
                sha256: "ab".repeat(32),
            },
            EventBody::Change {
                server: "crm".into(),
                table: "orders".into(),
                pks: vec![vec![json!(1), json!("a")]],
                action: Action::Insert,
                columns: Some(BTreeMap::from([("qty".to_string(), json!(2))])),
            },
        ] {
            assert_eq!(EventBody::from_cbor(&other.to_cbor()), Some(other));
        }
        // A kind this version does not know, or a field missing: nothing.
        let mut unknown = Vec::new();
        ciborium::into_writer(&json!({"kind": "later", "x": 1}), &mut unknown).unwrap();
        assert_eq!(EventBody::from_cbor(&unknown), None);
        let mut partial = Vec::new();
        ciborium::into_writer(&json!({"kind": "flush", "server": "crm"}), &mut partial).unwrap();
        assert_eq!(EventBody::from_cbor(&partial), None);
    }

    #[test]
    fn bad_events_are_refused() {
        let unknown_action = serde_json::from_value::<EventBody>(json!({
            "kind": "change", "server": "crm", "table": "o", "pks": [[1]], "action": "upsert"
        }));
        assert!(unknown_action.is_err());
        let unknown_kind = serde_json::from_value::<EventBody>(json!({"kind": "boom"}));
        assert!(unknown_kind.is_err());
        let empty: EventBody = serde_json::from_value(json!({
            "kind": "flush", "server": "", "table": "o"
        }))
        .unwrap();
        assert!(empty.check_publishable().is_err());
        let artifact = EventBody::Artifact {
            name: "a".into(),
            version: 1,
            sha256: "x".into(),
        };
        assert!(artifact.check_publishable().is_err());
    }

    #[test]
    fn filters() {
        let change = EventBody::Flush {
            server: "crm".into(),
            table: "orders".into(),
        };
        let msg = EventBody::Message {
            topic: "chat".into(),
            payload: Value::Null,
        };
        let all = Filter::default();
        assert!(all.passes(&change) && all.passes(&msg));
        let table = Filter {
            table: Some("orders".into()),
            ..Default::default()
        };
        assert!(table.passes(&change) && !table.passes(&msg));
        let topic = Filter {
            topic: Some("chat".into()),
            ..Default::default()
        };
        assert!(!topic.passes(&change) && topic.passes(&msg));
    }

    #[test]
    fn tokens_round_trip() {
        let mut p = Positions::default();
        p.0.insert("12D3KooWabc".into(), 5);
        p.0.insert("stripe:0".into(), 12);
        assert_eq!(Positions::from_token(&p.to_token()).unwrap(), p);
        assert!(Positions::from_token("x").is_err());
        assert!(Positions::from_token("x=y").is_err());
        assert_eq!(Positions::from_token("").unwrap(), Positions::default());
        // No positions: a token a browser sends back, meaning the start.
        let empty = Positions::default().to_token();
        assert!(!empty.is_empty());
        assert_eq!(Positions::from_token(&empty).unwrap(), Positions::default());
        // A line break would split the `id:` line each event echoes it in.
        assert!(Positions::from_token("a=1,b\ndata: {}=2").is_err());
        assert!(Positions::from_token(&"a=1,".repeat(MAX_TOKEN_BYTES / 4 + 1)).is_err());
    }
}

//! What a stripe's log entries mean: key/value writes, applied deterministically
//! on every member (the same entries give the same state and the same answers).
//! Conditions and request ids are evaluated at apply time, in log order, so a
//! compare-and-set or a retried request means the same on every member and after
//! any failover.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use kiln_persistence::{KvTxn, StoreError};

/// Precondition of a write.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Condition {
    None,
    /// `If-Match: "n"`: the key's current version is `n`.
    IfVersion(u64),
    /// `If-None-Match: *`: the key does not exist.
    IfAbsent,
    /// `If-Match: *`: the key exists.
    IfExists,
    /// `If-Match: "a", "b"`: the key's current version is one of these (none
    /// listed: a list of tags that can never match, such as weak ones).
    IfVersionIn(Vec<u64>),
    /// `If-None-Match: "a", "b"`: the key does not exist at one of these versions.
    IfVersionNotIn(Vec<u64>),
}

impl Condition {
    /// Whether a write of a key now at `current` may go ahead.
    pub fn holds(&self, current: Option<u64>) -> bool {
        match self {
            Condition::None => true,
            Condition::IfVersion(v) => current == Some(*v),
            Condition::IfAbsent => current.is_none(),
            Condition::IfExists => current.is_some(),
            Condition::IfVersionIn(vs) => current.is_some_and(|c| vs.contains(&c)),
            Condition::IfVersionNotIn(vs) => current.is_none_or(|c| !vs.contains(&c)),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum KvOp {
    Put {
        map: String,
        key: String,
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
        cond: Condition,
    },
    Delete {
        map: String,
        key: String,
        cond: Condition,
    },
    /// Takes an `Idempotency-Key` (the command's request id) for the request
    /// whose fingerprint this is, in the key's home stripe (see
    /// [`idempotency_home`]) when the write goes to another stripe: the key's
    /// scope is the cluster, and only its home stripe sees every use of it.
    Reserve { fingerprint: [u8; 32] },
}

impl KvOp {
    /// Map and key the operation writes (`None` for a reservation).
    pub fn map_key(&self) -> Option<(&str, &str)> {
        match self {
            KvOp::Put { map, key, .. } | KvOp::Delete { map, key, .. } => Some((map, key)),
            KvOp::Reserve { .. } => None,
        }
    }
}

/// Map and key whose slot is the home stripe of an `Idempotency-Key` (the map
/// name is empty, which no client's can be).
pub fn idempotency_home(idempotency_key: &str) -> (&'static str, &str) {
    ("", idempotency_key)
}

/// One client write as it travels and as it sits in the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvCommand {
    /// `k:<Idempotency-Key>` from the client; empty for a write in a retry
    /// session. (`r:<random>`, a node's own id for a write without a key, is
    /// what entries from before retry sessions carry.)
    pub request: String,
    pub op: KvOp,
    /// Unix ms when the node that took the request received it (kept across its
    /// retries), and until when its result is remembered for retries (the
    /// reconnect window). Both travel in the entry, so every member expires
    /// request records alike.
    #[serde(default)]
    pub received_ms: u64,
    #[serde(default)]
    pub remember_until_ms: u64,
    /// A write without an `Idempotency-Key`: its place in the retry session of
    /// the node that took it, so the node's own retries apply once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<SessionTag>,
}

/// A write's place in the retry session of the node that took it. A node
/// numbers the writes it takes without an `Idempotency-Key` (one session per
/// process start) and sends each with the lowest number it still waits for:
/// a stripe keeps a write's outcome only until a later write of the session
/// says the node waits for it no more. Unlike a record per request id, which
/// every member writes to its file and deletes again a window later, an
/// outcome lives a few milliseconds, in memory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionTag {
    /// Random, chosen by the node at its start.
    pub id: String,
    /// The write's number in the session (from 1).
    pub seq: u64,
    /// Every write of the session below this one is answered or given up.
    pub done_below: u64,
}

impl SessionTag {
    /// Whether a stripe applies writes under this tag (its rows' ids must not
    /// reach into another session's); a write under any other is `Invalid`.
    fn is_valid(&self) -> bool {
        !self.id.is_empty()
            && self.id.len() <= 64
            && self.id.bytes().all(|c| c.is_ascii_alphanumeric())
    }
}

impl KvCommand {
    /// The command as the active appends it: received at `now` by the active's
    /// clock, remembered as long after that as the accepting node asked. The
    /// times in the log then come from the actives' clocks alone, not from
    /// every node that takes requests: a node with a clock minutes ahead would
    /// otherwise make every member drop request records still in their window
    /// (a retry then applied twice), one minutes behind keep its own too short.
    pub fn stamped_at(mut self, now: u64) -> KvCommand {
        let window = self.remember_until_ms.saturating_sub(self.received_ms);
        self.received_ms = now;
        self.remember_until_ms = now.saturating_add(window);
        self
    }

    /// Whether `apply` will answer this command, appended at `index`, with
    /// `Done { version: index }` whatever the state it meets, so that the active
    /// may answer it as soon as it commits instead of after the apply: an
    /// unconditional put in a retry session sent for the first time
    /// (`first_attempt`). A later attempt may find an earlier copy applied and
    /// repeat that copy's outcome; an `Idempotency-Key` may name an earlier
    /// request; a condition or a delete depends on the key's version. (One
    /// more outcome `apply` may give it, `Abandoned`, comes only once its node
    /// stopped waiting for the answer.)
    pub fn done_at_commit(&self, first_attempt: bool) -> bool {
        first_attempt
            && self.request.is_empty()
            && self.session.as_ref().is_some_and(SessionTag::is_valid)
            && matches!(
                self.op,
                KvOp::Put {
                    cond: Condition::None,
                    ..
                }
            )
    }

    /// What makes two requests under one id the same request.
    pub fn fingerprint(&self) -> [u8; 32] {
        if let KvOp::Reserve { fingerprint } = &self.op {
            return *fingerprint;
        }
        let mut buf = Vec::new();
        let _ = ciborium::into_writer(&self.op, &mut buf);
        Sha256::digest(&buf).into()
    }
}

/// The answer to a write.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum KvOutcome {
    /// Written (or deleted) at this version: the index of its log entry, which
    /// grows with every write of any key of the stripe.
    Done {
        version: u64,
    },
    NotFound,
    PreconditionFailed {
        current: Option<u64>,
    },
    /// The request id was used before for a different request.
    RequestIdReused,
    /// A copy of a write its node had stopped waiting for (answered, or given
    /// up and the client told the outcome is unknown) reached the log: it may
    /// have been applied already, so it is not applied again.
    Abandoned,
    /// The entry could not be decoded (never written by a correct node).
    Invalid,
}

/// What a write did to a key, as recorded in the stripe's change outbox; the
/// databroadcast turns it into a `change` event of origin `stripe:<k>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvChange {
    pub map: String,
    pub key: String,
    pub action: ChangeAction,
    /// When the active received the write (Unix ms): the same on every member.
    pub ts: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChangeAction {
    Insert,
    Update,
    Delete,
}

/// What the no-op an active writes on taking over an empty log carries when the
/// cluster already holds change events of the stripe: its data was lost (a
/// restart of the whole stripe in temporary persistence), and its change seqs
/// must go on above the ones already given out, or every node would take the new
/// changes for ones it has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TakeOver {
    pub change_floor: u64,
}

#[derive(Serialize, Deserialize)]
struct RequestRecord {
    fingerprint: [u8; 32],
    outcome: KvOutcome,
    #[serde(default)]
    remember_until_ms: u64,
}

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Option<T> {
    ciborium::from_reader(bytes).ok()
}

pub fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    let mut buf = Vec::new();
    let _ = ciborium::into_writer(v, &mut buf);
    buf
}

/// Every this many log entries, request records past their window are dropped.
const PRUNE_REQUESTS_EVERY: u64 = 256;
/// Records dropped at most per round: four times what the entries in between
/// can add, so a backlog drains.
const PRUNE_REQUESTS_LIMIT: usize = 4 * PRUNE_REQUESTS_EVERY as usize;
/// A record goes only this long after its window ended, counted on the clock of
/// the request that triggers the round: requests are stamped by whichever node
/// accepted them, and clocks and queues differ by that much at most.
const PRUNE_REQUESTS_MARGIN_MS: u64 = 60_000;

/// The expiry of an encoded request record (for the index of a snapshot's records).
pub fn request_expiry(record: &[u8]) -> Option<u64> {
    decode::<RequestRecord>(record).map(|r| r.remember_until_ms)
}

/// Applies the entry at `index` (an empty entry is an active's no-op).
pub fn apply(tx: &mut dyn KvTxn, index: u64, data: &[u8]) -> Result<KvOutcome, StoreError> {
    if data.is_empty() {
        return Ok(KvOutcome::Done { version: index });
    }
    let Some(cmd) = decode::<KvCommand>(data) else {
        if let Some(take_over) = decode::<TakeOver>(data) {
            tx.raise_changes_to(take_over.change_floor)?;
            return Ok(KvOutcome::Done { version: index });
        }
        return Ok(KvOutcome::Invalid);
    };
    if index.is_multiple_of(PRUNE_REQUESTS_EVERY) {
        // Decided by the entry alone, so every member drops the same records.
        let before = cmd.received_ms.saturating_sub(PRUNE_REQUESTS_MARGIN_MS);
        tx.prune_requests(before, PRUNE_REQUESTS_LIMIT)?;
        drop_idle_sessions(tx, before)?;
    }
    if index.is_multiple_of(SESSION_SWEEP_EVERY) {
        sweep_sessions(tx)?;
    }
    if let Some(tag) = &cmd.session {
        return apply_in_session(tx, index, &cmd, tag);
    }
    let fingerprint = cmd.fingerprint();
    let previous = tx
        .request(&cmd.request)?
        .and_then(|b| decode::<RequestRecord>(&b));
    let replaces = previous.as_ref().map(|rec| rec.remember_until_ms);
    let remembered = previous
        // Past the reconnect window a request id is free again.
        .filter(|rec| rec.remember_until_ms == 0 || rec.remember_until_ms >= cmd.received_ms);
    if let Some(rec) = remembered {
        return Ok(if rec.fingerprint == fingerprint {
            rec.outcome
        } else {
            KvOutcome::RequestIdReused
        });
    }
    let outcome = execute(tx, index, &cmd)?;
    record(tx, &cmd, fingerprint, &outcome, replaces)?;
    Ok(outcome)
}

/// What the write does to the state (its request id aside).
fn execute(tx: &mut dyn KvTxn, index: u64, cmd: &KvCommand) -> Result<KvOutcome, StoreError> {
    let Some((map, key)) = cmd.op.map_key() else {
        // A reservation: its request's record is all it writes.
        return Ok(KvOutcome::Done { version: index });
    };
    let current = tx.version(map, key)?;
    let holds = match &cmd.op {
        KvOp::Put { cond, .. } | KvOp::Delete { cond, .. } => cond.holds(current),
        KvOp::Reserve { .. } => true,
    };
    let outcome = if !holds {
        KvOutcome::PreconditionFailed { current }
    } else {
        match &cmd.op {
            KvOp::Put {
                map, key, value, ..
            } => {
                tx.put(map, key, index, value)?;
                let action = match current {
                    Some(_) => ChangeAction::Update,
                    None => ChangeAction::Insert,
                };
                record_change(tx, map, key, action, cmd.received_ms)?;
                KvOutcome::Done { version: index }
            }
            KvOp::Delete { map, key, .. } => {
                if current.is_none() {
                    KvOutcome::NotFound
                } else {
                    tx.delete(map, key)?;
                    record_change(tx, map, key, ChangeAction::Delete, cmd.received_ms)?;
                    KvOutcome::Done { version: index }
                }
            }
            KvOp::Reserve { .. } => KvOutcome::Done { version: index },
        }
    };
    Ok(outcome)
}

/// Every this many log entries, the outcomes sessions no longer wait for are
/// dropped (most while still in memory: a flush then has nothing to write).
const SESSION_SWEEP_EVERY: u64 = 64;

/// A session's row in the request table: `s:<session>` → what the stripe knows
/// of it. Its outcomes are rows `o:<session>:<seq, 16 hex digits>`, in seq order.
fn session_row_id(session: &str) -> String {
    format!("s:{session}")
}

fn outcome_row_id(session: &str, seq: u64) -> String {
    format!("o:{session}:{seq:016x}")
}

/// What a stripe keeps of a retry session.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct SessionRow {
    /// The highest `done_below` the session's writes carried.
    done_below: u64,
    /// Until when the session's last write asked its outcome to be kept: an
    /// idle session goes once this is past (see [`drop_idle_sessions`]).
    until_ms: u64,
    /// Outcomes below this are dropped (a sweep starts here, so it visits
    /// each outcome once).
    swept_below: u64,
}

impl SessionRow {
    fn to_bytes(self) -> [u8; 24] {
        let mut b = [0u8; 24];
        b[..8].copy_from_slice(&self.done_below.to_le_bytes());
        b[8..16].copy_from_slice(&self.until_ms.to_le_bytes());
        b[16..].copy_from_slice(&self.swept_below.to_le_bytes());
        b
    }

    /// `None` for bytes of another shape (a row this code never wrote).
    fn of_bytes(b: &[u8]) -> Option<SessionRow> {
        let b: &[u8; 24] = b.try_into().ok()?;
        let word = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[8 * i..8 * i + 8]);
            u64::from_le_bytes(w)
        };
        Some(SessionRow {
            done_below: word(0),
            until_ms: word(1),
            swept_below: word(2),
        })
    }
}

/// Applies a write of a retry session: once, whichever copies of it reach the
/// log, and never after its node stopped waiting for it.
fn apply_in_session(
    tx: &mut dyn KvTxn,
    index: u64,
    cmd: &KvCommand,
    tag: &SessionTag,
) -> Result<KvOutcome, StoreError> {
    if !tag.is_valid() {
        return Ok(KvOutcome::Invalid);
    }
    let row_id = session_row_id(&tag.id);
    let before = tx.request(&row_id)?.and_then(|b| SessionRow::of_bytes(&b));
    let mut row = before.unwrap_or_default();
    row.done_below = row.done_below.max(tag.done_below);
    let outcome = if tag.seq < row.done_below {
        KvOutcome::Abandoned
    } else {
        match tx.request(&outcome_row_id(&tag.id, tag.seq))? {
            // Applied already (an outcome this code cannot read was still one).
            Some(b) => decode::<KvOutcome>(&b).unwrap_or(KvOutcome::Invalid),
            None => {
                let outcome = execute(tx, index, cmd)?;
                tx.set_request_row(&outcome_row_id(&tag.id, tag.seq), Some(&encode(&outcome)))?;
                row.until_ms = row.until_ms.max(cmd.remember_until_ms);
                outcome
            }
        }
    };
    if before != Some(row) {
        tx.set_request_row(&row_id, Some(&row.to_bytes()))?;
    }
    Ok(outcome)
}

/// The rows of every session the stripe knows: (session, its row).
fn session_rows(tx: &dyn KvTxn) -> Result<Vec<(String, SessionRow)>, StoreError> {
    Ok(tx
        .request_rows("s:", "s;")?
        .into_iter()
        .filter_map(|(id, b)| {
            let session = id.strip_prefix("s:")?.to_string();
            Some((session, SessionRow::of_bytes(&b)?))
        })
        .collect())
}

/// Drops the outcomes each session no longer waits for.
fn sweep_sessions(tx: &mut dyn KvTxn) -> Result<(), StoreError> {
    for (session, mut row) in session_rows(tx)? {
        if row.swept_below < row.done_below {
            drop_outcomes(tx, &session, row.swept_below, row.done_below)?;
            row.swept_below = row.done_below;
            tx.set_request_row(&session_row_id(&session), Some(&row.to_bytes()))?;
        }
    }
    Ok(())
}

/// Outcome rows of `session` from seq `from` to below `below` (`u64::MAX`:
/// all from `from` on).
fn drop_outcomes(
    tx: &mut dyn KvTxn,
    session: &str,
    from: u64,
    below: u64,
) -> Result<(), StoreError> {
    let to = match below {
        u64::MAX => format!("o:{session};"),
        b => outcome_row_id(session, b),
    };
    for (id, _) in tx.request_rows(&outcome_row_id(session, from), &to)? {
        tx.set_request_row(&id, None)?;
    }
    Ok(())
}

/// Drops the sessions whose last write's window ended before `before_ms` (the
/// node that took it restarted, or left), with their outcomes.
fn drop_idle_sessions(tx: &mut dyn KvTxn, before_ms: u64) -> Result<(), StoreError> {
    for (session, row) in session_rows(tx)? {
        if row.until_ms < before_ms {
            drop_outcomes(tx, &session, row.swept_below, u64::MAX)?;
            tx.set_request_row(&session_row_id(&session), None)?;
        }
    }
    Ok(())
}

/// Remembers the outcome of `cmd` under its request id.
fn record(
    tx: &mut dyn KvTxn,
    cmd: &KvCommand,
    fingerprint: [u8; 32],
    outcome: &KvOutcome,
    replaces: Option<u64>,
) -> Result<(), StoreError> {
    tx.record_request(
        &cmd.request,
        &encode(&RequestRecord {
            fingerprint,
            outcome: outcome.clone(),
            remember_until_ms: cmd.remember_until_ms,
        }),
        cmd.remember_until_ms,
        replaces,
    )
}

fn record_change(
    tx: &mut dyn KvTxn,
    map: &str,
    key: &str,
    action: ChangeAction,
    ts: u64,
) -> Result<u64, StoreError> {
    tx.record_change(&encode(&KvChange {
        map: map.into(),
        key: key.into(),
        action,
        ts,
    }))
}

/// The slot of a key: a stable hash, so every node routes a key the same way.
pub fn slot_of(map: &str, key: &str, slots: u32) -> u32 {
    let d = Sha256::new()
        .chain_update(map.as_bytes())
        .chain_update([0u8])
        .chain_update(key.as_bytes())
        .finalize();
    u32::from_be_bytes([d[0], d[1], d[2], d[3]]) % slots.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[derive(Default)]
    struct Mem {
        kv: BTreeMap<(String, String), (u64, Vec<u8>)>,
        req: BTreeMap<String, Vec<u8>>,
        changes: Vec<KvChange>,
        change_floor: u64,
    }

    impl KvTxn for Mem {
        fn version(&self, m: &str, k: &str) -> Result<Option<u64>, StoreError> {
            Ok(self.kv.get(&(m.into(), k.into())).map(|(v, _)| *v))
        }
        fn put(&mut self, m: &str, k: &str, v: u64, val: &[u8]) -> Result<(), StoreError> {
            self.kv.insert((m.into(), k.into()), (v, val.to_vec()));
            Ok(())
        }
        fn delete(&mut self, m: &str, k: &str) -> Result<(), StoreError> {
            self.kv.remove(&(m.into(), k.into()));
            Ok(())
        }
        fn request(&self, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
            Ok(self.req.get(id).cloned())
        }
        fn record_request(
            &mut self,
            id: &str,
            r: &[u8],
            _until: u64,
            _replaces: Option<u64>,
        ) -> Result<(), StoreError> {
            self.req.insert(id.into(), r.to_vec());
            Ok(())
        }
        fn prune_requests(&mut self, before_ms: u64, _limit: usize) -> Result<u64, StoreError> {
            let n = self.req.len();
            self.req
                .retain(|_, r| request_expiry(r).is_none_or(|t| t >= before_ms));
            Ok((n - self.req.len()) as u64)
        }
        fn set_request_row(&mut self, id: &str, row: Option<&[u8]>) -> Result<(), StoreError> {
            match row {
                Some(r) => self.req.insert(id.into(), r.to_vec()),
                None => self.req.remove(id),
            };
            Ok(())
        }
        fn request_rows(
            &self,
            from: &str,
            below: &str,
        ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
            Ok(self
                .req
                .range(from.to_string()..below.to_string())
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect())
        }
        fn record_change(&mut self, change: &[u8]) -> Result<u64, StoreError> {
            self.changes
                .push(decode(change).expect("a change we encoded"));
            Ok(self.change_floor + self.changes.len() as u64)
        }
        fn raise_changes_to(&mut self, seq: u64) -> Result<(), StoreError> {
            let last = self.change_floor + self.changes.len() as u64;
            self.change_floor += seq.saturating_sub(last);
            Ok(())
        }
    }

    /// The home stripe of an Idempotency-Key takes it for one request: a retry
    /// passes, a different request is refused, and nothing else is written.
    #[test]
    fn a_reservation_takes_an_idempotency_key_for_one_request() {
        let mut m = Mem::default();
        let request = |v: &[u8]| -> KvCommand { decode(&put("k:X", v, Condition::None)).unwrap() };
        let reserve = |cmd: &KvCommand| {
            encode(&KvCommand {
                op: KvOp::Reserve {
                    fingerprint: cmd.fingerprint(),
                },
                ..cmd.clone()
            })
        };
        let first = request(b"1");
        assert_eq!(
            apply(&mut m, 5, &reserve(&first)).unwrap(),
            KvOutcome::Done { version: 5 }
        );
        assert_eq!(
            apply(&mut m, 6, &reserve(&first)).unwrap(),
            KvOutcome::Done { version: 5 }
        );
        assert_eq!(
            apply(&mut m, 7, &reserve(&request(b"2"))).unwrap(),
            KvOutcome::RequestIdReused
        );
        // A write in this stripe under the same key is the same request or not.
        assert_eq!(
            apply(&mut m, 8, &put("k:X", b"2", Condition::None)).unwrap(),
            KvOutcome::RequestIdReused
        );
        assert!(m.kv.is_empty() && m.changes.is_empty());
    }

    #[test]
    fn a_take_over_no_op_raises_the_change_seqs() {
        let mut m = Mem::default();
        let noop = encode(&TakeOver { change_floor: 41 });
        assert_eq!(
            apply(&mut m, 1, &noop).unwrap(),
            KvOutcome::Done { version: 1 }
        );
        assert_eq!(m.record_change(&encode(&change())).unwrap(), 42);
        // A floor below what is used already changes nothing.
        apply(&mut m, 3, &encode(&TakeOver { change_floor: 5 })).unwrap();
        assert_eq!(m.record_change(&encode(&change())).unwrap(), 43);
    }

    fn change() -> KvChange {
        KvChange {
            map: "m".into(),
            key: "k".into(),
            action: ChangeAction::Insert,
            ts: 0,
        }
    }

    fn put(req: &str, value: &[u8], cond: Condition) -> Vec<u8> {
        encode(&KvCommand {
            request: req.into(),
            op: KvOp::Put {
                map: "m".into(),
                key: "k".into(),
                value: value.to_vec(),
                cond,
            },
            received_ms: 1_000,
            remember_until_ms: 121_000,
            session: None,
        })
    }

    #[test]
    fn versions_conditions_and_retries() {
        let mut tx = Mem::default();
        assert_eq!(
            apply(&mut tx, 5, &put("a", b"1", Condition::IfAbsent)).unwrap(),
            KvOutcome::Done { version: 5 }
        );
        assert_eq!(
            apply(&mut tx, 6, &put("b", b"2", Condition::IfAbsent)).unwrap(),
            KvOutcome::PreconditionFailed { current: Some(5) }
        );
        assert_eq!(
            apply(&mut tx, 7, &put("c", b"3", Condition::IfVersion(5))).unwrap(),
            KvOutcome::Done { version: 7 }
        );
        // The same request again: the first answer, nothing written.
        assert_eq!(
            apply(&mut tx, 8, &put("c", b"3", Condition::IfVersion(5))).unwrap(),
            KvOutcome::Done { version: 7 }
        );
        assert_eq!(tx.kv[&("m".into(), "k".into())].0, 7);
        // Another request under a used id.
        assert_eq!(
            apply(&mut tx, 9, &put("c", b"other", Condition::None)).unwrap(),
            KvOutcome::RequestIdReused
        );
        let del = encode(&KvCommand {
            request: "d".into(),
            op: KvOp::Delete {
                map: "m".into(),
                key: "k".into(),
                cond: Condition::None,
            },
            received_ms: 2_000,
            remember_until_ms: 122_000,
            session: None,
        });
        assert_eq!(
            apply(&mut tx, 10, &del).unwrap(),
            KvOutcome::Done { version: 10 }
        );
        let del2 = encode(&KvCommand {
            request: "d2".into(),
            op: KvOp::Delete {
                map: "m".into(),
                key: "k".into(),
                cond: Condition::None,
            },
            received_ms: 3_000,
            remember_until_ms: 123_000,
            session: None,
        });
        assert_eq!(apply(&mut tx, 11, &del2).unwrap(), KvOutcome::NotFound);
        assert_eq!(
            apply(&mut tx, 12, b"\xff\x00garbage").unwrap(),
            KvOutcome::Invalid
        );
        assert_eq!(
            apply(&mut tx, 13, b"").unwrap(),
            KvOutcome::Done { version: 13 }
        );
        // One change per write that took effect: no retries, failed conditions,
        // deletes of absent keys or no-ops.
        let actions: Vec<(ChangeAction, u64)> =
            tx.changes.iter().map(|c| (c.action, c.ts)).collect();
        assert_eq!(
            actions,
            vec![
                (ChangeAction::Insert, 1_000),
                (ChangeAction::Update, 1_000),
                (ChangeAction::Delete, 2_000)
            ]
        );
    }

    #[test]
    fn request_ids_are_free_again_after_the_reconnect_window() {
        let mut tx = Mem::default();
        let at = |received_ms: u64, value: &[u8]| {
            encode(&KvCommand {
                request: "k:retry".into(),
                op: KvOp::Put {
                    map: "m".into(),
                    key: "k".into(),
                    value: value.to_vec(),
                    cond: Condition::None,
                },
                received_ms,
                remember_until_ms: received_ms + 120_000,
                session: None,
            })
        };
        assert_eq!(
            apply(&mut tx, 1, &at(0, b"a")).unwrap(),
            KvOutcome::Done { version: 1 }
        );
        // Within the window a different request under the id is refused…
        assert_eq!(
            apply(&mut tx, 2, &at(60_000, b"b")).unwrap(),
            KvOutcome::RequestIdReused
        );
        // …after it, the id is new again.
        assert_eq!(
            apply(&mut tx, 3, &at(200_000, b"b")).unwrap(),
            KvOutcome::Done { version: 3 }
        );
    }

    #[test]
    fn the_active_stamps_a_command_with_its_own_clock_keeping_the_window() {
        let cmd = KvCommand {
            request: "k:x".into(),
            op: KvOp::Delete {
                map: "m".into(),
                key: "k".into(),
                cond: Condition::None,
            },
            // From a node whose clock is ten minutes ahead.
            received_ms: 600_000 + 5_000,
            remember_until_ms: 600_000 + 125_000,
            session: None,
        };
        let stamped = cmd.stamped_at(5_100);
        assert_eq!(
            (stamped.received_ms, stamped.remember_until_ms),
            (5_100, 125_100)
        );
    }

    #[test]
    fn request_records_go_after_their_window_at_the_same_entry_everywhere() {
        let mut tx = Mem::default();
        let cmd = |request: &str, received_ms: u64| {
            encode(&KvCommand {
                request: request.into(),
                op: KvOp::Put {
                    map: "m".into(),
                    key: request.into(),
                    value: b"v".to_vec(),
                    cond: Condition::None,
                },
                received_ms,
                remember_until_ms: received_ms + 120_000,
                session: None,
            })
        };
        apply(&mut tx, 1, &cmd("old", 0)).unwrap();
        apply(&mut tx, 2, &cmd("recent", 100_000)).unwrap();
        // Past the window and the margin, but not at a pruning entry: kept.
        let late = 120_000 + PRUNE_REQUESTS_MARGIN_MS + 1;
        apply(&mut tx, 3, &cmd("x", late)).unwrap();
        assert!(tx.req.contains_key("old"));
        apply(&mut tx, PRUNE_REQUESTS_EVERY, &cmd("y", late)).unwrap();
        assert!(!tx.req.contains_key("old"));
        assert!(tx.req.contains_key("recent"));
        assert!(tx.req.contains_key("y"));
    }

    fn in_session(
        session: &str,
        seq: u64,
        done_below: u64,
        value: &[u8],
        received_ms: u64,
    ) -> Vec<u8> {
        encode(&KvCommand {
            request: String::new(),
            op: KvOp::Put {
                map: "m".into(),
                key: format!("k{seq}"),
                value: value.to_vec(),
                cond: Condition::IfAbsent,
            },
            received_ms,
            remember_until_ms: received_ms + 10_000,
            session: Some(SessionTag {
                id: session.into(),
                seq,
                done_below,
            }),
        })
    }

    fn outcome_rows(tx: &Mem) -> Vec<String> {
        tx.req
            .keys()
            .filter(|k| k.starts_with("o:"))
            .cloned()
            .collect()
    }

    /// Copies of a session's write reach the log in any order (a retry through
    /// another member, a new active keeping an old one's entry): the first
    /// applies, the others get its outcome; none applies once the node said
    /// it waits for it no more.
    #[test]
    fn a_session_write_applies_once_and_never_after_its_node_stopped_waiting() {
        let mut tx = Mem::default();
        let done = |v| KvOutcome::Done { version: v };
        assert_eq!(
            apply(&mut tx, 1, &in_session("a1", 2, 1, b"x", 0)).unwrap(),
            done(1)
        );
        // A retry of 2, and 1 (sent first) arriving after it.
        assert_eq!(
            apply(&mut tx, 2, &in_session("a1", 2, 1, b"x", 0)).unwrap(),
            done(1)
        );
        assert_eq!(
            apply(&mut tx, 3, &in_session("a1", 1, 1, b"y", 0)).unwrap(),
            done(3)
        );
        assert_eq!(tx.changes.len(), 2);
        // Another session's numbers are its own.
        assert_eq!(
            apply(&mut tx, 4, &in_session("b2", 1, 1, b"z", 0)).unwrap(),
            KvOutcome::PreconditionFailed { current: Some(3) }
        );
        // Node a1 has its answers for 1 and 2; late copies of them are not applied.
        assert_eq!(
            apply(&mut tx, 5, &in_session("a1", 3, 3, b"w", 0)).unwrap(),
            done(5)
        );
        assert_eq!(
            apply(&mut tx, 6, &in_session("a1", 2, 1, b"x", 0)).unwrap(),
            KvOutcome::Abandoned
        );
        assert_eq!(
            apply(&mut tx, 7, &in_session("a1", 1, 1, b"y", 0)).unwrap(),
            KvOutcome::Abandoned
        );
        assert_eq!(tx.changes.len(), 3);
        // A session id that could reach into another's rows is refused.
        assert_eq!(
            apply(&mut tx, 8, &in_session("a1:", 9, 9, b"v", 0)).unwrap(),
            KvOutcome::Invalid
        );
    }

    /// A write the active answers at its commit (`done_at_commit`) applies as
    /// it was answered, whatever state its apply meets; what the state decides
    /// waits for the apply.
    #[test]
    fn a_write_answered_at_its_commit_applies_as_answered() {
        let fresh = KvCommand {
            request: String::new(),
            op: KvOp::Put {
                map: "m".into(),
                key: "k".into(),
                value: b"v".to_vec(),
                cond: Condition::None,
            },
            received_ms: 1_000,
            remember_until_ms: 11_000,
            session: Some(SessionTag {
                id: "a1".into(),
                seq: 5,
                done_below: 3,
            }),
        };
        assert!(fresh.done_at_commit(true));
        // Sent again: an earlier copy may have been applied.
        assert!(!fresh.done_at_commit(false));
        let keyed = KvCommand {
            request: "k:x".into(),
            session: None,
            ..fresh.clone()
        };
        assert!(!keyed.done_at_commit(true));
        for cond in [Condition::IfAbsent, Condition::IfVersion(1)] {
            let conditional = KvCommand {
                op: KvOp::Put {
                    map: "m".into(),
                    key: "k".into(),
                    value: b"v".to_vec(),
                    cond,
                },
                ..fresh.clone()
            };
            assert!(!conditional.done_at_commit(true));
        }
        let delete = KvCommand {
            op: KvOp::Delete {
                map: "m".into(),
                key: "k".into(),
                cond: Condition::None,
            },
            ..fresh.clone()
        };
        assert!(!delete.done_at_commit(true));
        let invalid = KvCommand {
            session: Some(SessionTag {
                id: "a1:".into(),
                seq: 5,
                done_below: 3,
            }),
            ..fresh.clone()
        };
        assert!(!invalid.done_at_commit(true));

        // The states its apply may meet: nothing; the key written before;
        // the session's row and another outcome of it; requests to prune
        // (index 256) and sessions to sweep on the way.
        let empty = Mem::default();
        let mut written = Mem::default();
        apply(&mut written, 1, &put("other", b"0", Condition::None)).unwrap();
        let mut session_known = Mem::default();
        apply(&mut session_known, 1, &in_session("a1", 4, 3, b"w", 0)).unwrap();
        apply(&mut session_known, 2, &in_session("b2", 1, 1, b"z", 0)).unwrap();
        for (index, mut tx) in [(10, empty), (10, written), (256, session_known)] {
            assert_eq!(
                apply(&mut tx, index, &encode(&fresh)).unwrap(),
                KvOutcome::Done { version: index }
            );
            assert_eq!(tx.kv[&("m".to_string(), "k".to_string())].0, index);
        }
    }

    #[test]
    fn outcomes_go_once_their_node_stopped_waiting_and_idle_sessions_go_with_theirs() {
        let mut tx = Mem::default();
        for seq in 1..=4 {
            apply(&mut tx, seq, &in_session("a1", seq, 1, b"x", 0)).unwrap();
        }
        apply(&mut tx, 5, &in_session("a1", 5, 4, b"x", 0)).unwrap();
        apply(&mut tx, 6, &in_session("b2", 1, 1, b"x", 0)).unwrap();
        // Kept until a sweep, which drops what a1 waits for no more.
        assert_eq!(outcome_rows(&tx).len(), 6);
        apply(
            &mut tx,
            SESSION_SWEEP_EVERY,
            &in_session("b2", 2, 1, b"x", 0),
        )
        .unwrap();
        let left = outcome_rows(&tx);
        assert_eq!(
            left,
            vec![
                outcome_row_id("a1", 4),
                outcome_row_id("a1", 5),
                outcome_row_id("b2", 1),
                outcome_row_id("b2", 2)
            ]
        );
        // A session idle past its window and the margin goes, at a pruning
        // entry, with its outcomes; one still writing stays.
        apply(
            &mut tx,
            SESSION_SWEEP_EVERY + 1,
            &in_session("b2", 3, 1, b"x", 5_000),
        )
        .unwrap();
        let late = 10_000 + PRUNE_REQUESTS_MARGIN_MS + 1;
        apply(
            &mut tx,
            PRUNE_REQUESTS_EVERY,
            &in_session("b2", 4, 3, b"x", late),
        )
        .unwrap();
        assert!(!tx.req.contains_key(&session_row_id("a1")));
        let b2 = SessionRow::of_bytes(&tx.req[&session_row_id("b2")]).unwrap();
        assert_eq!(
            b2,
            SessionRow {
                done_below: 3,
                until_ms: late + 10_000,
                swept_below: 1
            }
        );
        assert_eq!(
            outcome_rows(&tx),
            vec![
                outcome_row_id("b2", 1),
                outcome_row_id("b2", 2),
                outcome_row_id("b2", 3),
                outcome_row_id("b2", 4)
            ]
        );
    }

    #[test]
    fn slots_are_stable_and_spread() {
        assert_eq!(slot_of("m", "k", 256), slot_of("m", "k", 256));
        let used: std::collections::BTreeSet<u32> = (0..2000)
            .map(|i| slot_of("m", &i.to_string(), 256))
            .collect();
        assert!(used.len() > 200);
    }
}

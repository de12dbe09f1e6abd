//! Receipts (SPEC §7): the chained, signed record of every decision and state
//! change, and their verification (used online by the ledger and offline by
//! `tai receipts --verify`).

use std::collections::BTreeMap;

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::signal::ReceiptState;

pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// What an engine asks the ledger to record; the ledger chains and signs it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReceiptDraft {
    pub receipt_id: String,
    pub kind: String,
    pub tenant_id: String,
    pub sku_id: String,
    pub signal_id: Option<String>,
    pub action_id: Option<String>,
    pub state_before: ReceiptState,
    pub state_after: ReceiptState,
    pub success: bool,
    pub reason: Option<String>,
    pub trace_id: Option<String>,
    pub timestamp_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Receipt {
    pub seq: u64,
    pub receipt_id: String,
    pub kind: String,
    pub tenant_id: String,
    pub sku_id: String,
    pub signal_id: Option<String>,
    pub action_id: Option<String>,
    pub state_before: ReceiptState,
    pub state_after: ReceiptState,
    pub success: bool,
    pub reason: Option<String>,
    pub trace_id: Option<String>,
    pub timestamp_ms: u64,
    pub prev_hash: String,
    pub hash: String,
    pub key_id: String,
    pub signature: String,
}

impl Receipt {
    /// Every field but `hash` and `signature`, in a fixed order, as
    /// compact JSON: what is hashed (SPEC §7).
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(512);
        self.write_canonical(&mut out);
        out
    }

    /// hex SHA-256 over `prev_hash` and the canonical bytes.
    pub fn compute_hash(&self) -> String {
        let mut h = Sha256::new();
        h.update(self.prev_hash.as_bytes());
        h.update(b"\n");
        CANONICAL.with_borrow_mut(|buf| {
            buf.clear();
            self.write_canonical(buf);
            h.update(&buf[..]);
            if buf.capacity() > CANONICAL_KEPT {
                // A receipt with a huge reason: not kept for the next one.
                *buf = Vec::new();
            }
        });
        lower_hex::<32>(&h.finalize().into())
    }

    /// Appends the canonical bytes, written field by field: serde_json's
    /// formatter over a struct of the fields, which looks at every byte of
    /// every string to escape it, took a fifth to a quarter of the time a
    /// seal takes (`cargo bench -p tai-core --bench receipt`), and the
    /// strings a receipt holds (ids, hashes, names) seldom need escaping.
    /// One that does is written by serde_json, so the bytes are the same
    /// (a property test compares them with that struct's JSON, kept in the
    /// tests, for any receipt).
    fn write_canonical(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"seq\":");
        out.extend_from_slice(itoa::Buffer::new().format(self.seq).as_bytes());
        out.extend_from_slice(b",\"receipt_id\":");
        json_str(out, &self.receipt_id);
        out.extend_from_slice(b",\"kind\":");
        json_str(out, &self.kind);
        out.extend_from_slice(b",\"tenant_id\":");
        json_str(out, &self.tenant_id);
        out.extend_from_slice(b",\"sku_id\":");
        json_str(out, &self.sku_id);
        out.extend_from_slice(b",\"signal_id\":");
        json_opt(out, self.signal_id.as_deref());
        out.extend_from_slice(b",\"action_id\":");
        json_opt(out, self.action_id.as_deref());
        out.extend_from_slice(b",\"state_before\":");
        json_str(out, self.state_before.as_str());
        out.extend_from_slice(b",\"state_after\":");
        json_str(out, self.state_after.as_str());
        out.extend_from_slice(b",\"success\":");
        out.extend_from_slice(if self.success { b"true" } else { b"false" });
        out.extend_from_slice(b",\"reason\":");
        json_opt(out, self.reason.as_deref());
        out.extend_from_slice(b",\"trace_id\":");
        json_opt(out, self.trace_id.as_deref());
        out.extend_from_slice(b",\"timestamp_ms\":");
        out.extend_from_slice(itoa::Buffer::new().format(self.timestamp_ms).as_bytes());
        out.extend_from_slice(b",\"prev_hash\":");
        json_str(out, &self.prev_hash);
        out.extend_from_slice(b",\"key_id\":");
        json_str(out, &self.key_id);
        out.push(b'}');
    }

    /// Chains and signs a draft after `prev_hash`.
    pub fn seal(
        draft: ReceiptDraft,
        seq: u64,
        prev_hash: &str,
        key_id: &str,
        key: &SigningKey,
    ) -> Receipt {
        let mut r = Receipt {
            seq,
            receipt_id: draft.receipt_id,
            kind: draft.kind,
            tenant_id: draft.tenant_id,
            sku_id: draft.sku_id,
            signal_id: draft.signal_id,
            action_id: draft.action_id,
            state_before: draft.state_before,
            state_after: draft.state_after,
            success: draft.success,
            reason: draft.reason,
            trace_id: draft.trace_id,
            timestamp_ms: draft.timestamp_ms,
            prev_hash: prev_hash.to_string(),
            hash: String::new(),
            key_id: key_id.to_string(),
            signature: String::new(),
        };
        r.hash = r.compute_hash();
        r.signature = key.sign(&r.hash);
        r
    }
}

/// `prefix` and a new ULID (`rcpt_01J…`, `act_01J…`) in one allocation of
/// the exact size: `format!("rcpt_{}", ulid)` allocated twice or more
/// (a first guess at the size, then its growth), and a receipt id, an
/// action id and a second receipt id are made for every signal.
pub fn prefixed_ulid(prefix: &str) -> String {
    let mut buf = [0u8; ulid::ULID_LEN];
    let mut id = String::with_capacity(prefix.len() + ulid::ULID_LEN);
    id.push_str(prefix);
    id.push_str(ulid::Ulid::new().array_to_str(&mut buf));
    id
}

/// hex HMAC-SHA256(key, message).
pub fn sign(key: &[u8], message: &str) -> String {
    SigningKey::new(key).sign(message)
}

/// An HMAC-SHA256 key with its pads hashed once: the ledger signs every
/// receipt with the same key, and keying a MAC costs two SHA-256 blocks of
/// the five a receipt's signature takes.
#[derive(Clone)]
pub struct SigningKey(Hmac<Sha256>);

impl SigningKey {
    pub fn new(key: &[u8]) -> Self {
        SigningKey(Hmac::<Sha256>::new_from_slice(key).expect("hmac takes any key length"))
    }

    /// hex HMAC-SHA256(key, message), as [`sign`].
    pub fn sign(&self, message: &str) -> String {
        let mut mac = self.0.clone();
        mac.update(message.as_bytes());
        lower_hex::<32>(&mac.finalize().into_bytes().into())
    }
}

/// Lower-case hex of up to 32 bytes (`hex::encode` goes char by char).
pub fn lower_hex<const N: usize>(bytes: &[u8; N]) -> String {
    let mut buf = [0u8; 64];
    let digits = &mut buf[..2 * N];
    hex::encode_to_slice(bytes, digits).expect("two hex digits per byte");
    String::from_utf8(digits.to_vec()).expect("hex is ASCII")
}

thread_local! {
    /// A receipt's canonical bytes on their way into its hash, kept for
    /// the next receipt (a few hundred bytes a thread).
    static CANONICAL: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The most the canonical buffer of a thread keeps between receipts.
const CANONICAL_KEPT: usize = 16 * 1024;

/// `s` as a JSON string, as serde_json writes it: quoted as it is when it
/// holds nothing JSON escapes (a quote, a backslash, a control character),
/// else by serde_json itself.
fn json_str(out: &mut Vec<u8>, s: &str) {
    // No early exit, so the check runs over whole words at a time.
    let escapes = s.bytes().fold(false, |any, b| {
        any | (b < 0x20) | (b == b'"') | (b == b'\\')
    });
    if escapes {
        serde_json::to_writer(&mut *out, s).expect("a string serializes");
    } else {
        out.reserve(s.len() + 2);
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    }
}

fn json_opt(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => json_str(out, s),
        None => out.extend_from_slice(b"null"),
    }
}

/// Constant-time check of a hex HMAC-SHA256.
pub fn verify_signature(key: &[u8], message: &str, signature_hex: &str) -> bool {
    let Ok(sig) = hex::decode(signature_hex) else {
        return false;
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("hmac takes any key length");
    mac.update(message.as_bytes());
    mac.verify_slice(&sig).is_ok()
}

/// The ledger's last sealed position, signed, kept apart from the receipts so
/// that a truncated tail is detected.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SignedHead {
    pub seq: u64,
    pub hash: String,
    pub key_id: String,
    pub signature: String,
}

impl SignedHead {
    fn message(seq: u64, hash: &str) -> String {
        format!("head:{seq}:{hash}")
    }
    pub fn new(seq: u64, hash: &str, key_id: &str, key: &SigningKey) -> Self {
        SignedHead {
            seq,
            hash: hash.to_string(),
            key_id: key_id.to_string(),
            signature: key.sign(&Self::message(seq, hash)),
        }
    }
    pub fn is_authentic(&self, keys: &BTreeMap<String, String>) -> bool {
        keys.get(&self.key_id).is_some_and(|k| {
            verify_signature(
                k.as_bytes(),
                &Self::message(self.seq, &self.hash),
                &self.signature,
            )
        })
    }
}

/// `GET /admin/receipts/verify` (SPEC §4).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VerifyReport {
    pub ok: bool,
    pub count: u64,
    pub head_seq: u64,
    pub head_hash: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_bad_seq: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Verifies a whole ledger (a store's, or an export): [`verify_chain`], and
/// a ledger with receipts must have its signed head too, since without it a
/// cut tail cannot be told from a shorter ledger (and cutting the tail of
/// an export would then only need its last line cut as well).
pub fn verify_ledger(
    receipts: &[Receipt],
    keys: &BTreeMap<String, String>,
    head: Option<&SignedHead>,
) -> VerifyReport {
    ChainVerifier::walk(receipts, keys).finish_ledger(head)
}

/// Walks a ledger in order. Any edit, deletion, insertion or reordering makes
/// it fail at the first receipt out of place; with `head`, a missing tail or
/// an unsigned extension fails too.
pub fn verify_chain<'a>(
    receipts: impl IntoIterator<Item = &'a Receipt>,
    keys: &BTreeMap<String, String>,
    head: Option<&SignedHead>,
) -> VerifyReport {
    ChainVerifier::walk(receipts, keys).finish(head)
}

/// Verifies a ledger one receipt at a time, so a ledger of any length (a
/// store's millions, a large export) is checked in constant memory.
pub struct ChainVerifier<'k> {
    keys: &'k BTreeMap<String, String>,
    count: u64,
    prev_hash: String,
    expected_seq: u64,
    failure: Option<VerifyReport>,
}

impl<'k> ChainVerifier<'k> {
    pub fn new(keys: &'k BTreeMap<String, String>) -> Self {
        ChainVerifier {
            keys,
            count: 0,
            prev_hash: GENESIS_HASH.to_string(),
            expected_seq: 1,
            failure: None,
        }
    }

    /// A verifier that has been fed `receipts` (up to the first bad one).
    fn walk<'a>(
        receipts: impl IntoIterator<Item = &'a Receipt>,
        keys: &'k BTreeMap<String, String>,
    ) -> Self {
        let mut v = ChainVerifier::new(keys);
        for r in receipts {
            if !v.push(r) {
                break;
            }
        }
        v
    }

    fn fail(&self, seq: u64, why: String) -> VerifyReport {
        VerifyReport {
            ok: false,
            count: self.count,
            head_seq: seq.saturating_sub(1),
            head_hash: self.prev_hash.clone(),
            first_bad_seq: Some(seq),
            reason: Some(why),
        }
    }

    /// Why `r` cannot be the next receipt, and at which seq.
    fn problem(&self, r: &Receipt) -> Option<(u64, String)> {
        if r.seq != self.expected_seq {
            let expected = self.expected_seq;
            return Some((
                expected,
                format!("expected seq {expected}, found {}", r.seq),
            ));
        }
        if r.prev_hash != self.prev_hash {
            return Some((
                r.seq,
                "prev_hash does not link to the previous receipt".into(),
            ));
        }
        if r.compute_hash() != r.hash {
            return Some((r.seq, "hash does not match the receipt's content".into()));
        }
        let Some(key) = self.keys.get(&r.key_id) else {
            return Some((r.seq, format!("unknown signing key {:?}", r.key_id)));
        };
        if !verify_signature(key.as_bytes(), &r.hash, &r.signature) {
            return Some((r.seq, "bad signature".into()));
        }
        None
    }

    /// Checks the next receipt; false once the chain has failed (what
    /// follows is not looked at).
    pub fn push(&mut self, r: &Receipt) -> bool {
        if self.failure.is_some() {
            return false;
        }
        if let Some((seq, why)) = self.problem(r) {
            self.failure = Some(self.fail(seq, why));
            return false;
        }
        self.count += 1;
        self.expected_seq += 1;
        self.prev_hash = r.hash.clone();
        true
    }

    /// The ledger could not be read on from here: it fails at the next seq.
    pub fn broken(mut self, why: String) -> VerifyReport {
        let seq = self.expected_seq;
        self.failure.take().unwrap_or_else(|| self.fail(seq, why))
    }

    /// The report; with `head`, the chain must end exactly at it.
    pub fn finish(self, head: Option<&SignedHead>) -> VerifyReport {
        if let Some(f) = self.failure {
            return f;
        }
        let last = self.expected_seq - 1;
        if let Some(head) = head {
            let problem = if !head.is_authentic(self.keys) {
                Some((last + 1, "the signed head's signature is bad".to_string()))
            } else if head.seq > last {
                Some((
                    last + 1,
                    format!(
                        "ledger ends at {last} but its signed head is at {}",
                        head.seq
                    ),
                ))
            } else if head.seq < last {
                Some((
                    head.seq + 1,
                    format!("receipts past the signed head at {}", head.seq),
                ))
            } else if head.hash != self.prev_hash {
                Some((
                    last,
                    "last receipt's hash differs from the signed head".to_string(),
                ))
            } else {
                None
            };
            if let Some((seq, why)) = problem {
                return self.fail(seq, why);
            }
        }
        VerifyReport {
            ok: true,
            count: self.count,
            head_seq: last,
            head_hash: self.prev_hash,
            first_bad_seq: None,
            reason: None,
        }
    }

    /// [`Self::finish`] for a whole ledger, which must have its signed head
    /// once it has receipts ([`verify_ledger`]).
    pub fn finish_ledger(self, head: Option<&SignedHead>) -> VerifyReport {
        let mut report = self.finish(head);
        if report.ok && head.is_none() && report.count > 0 {
            report.ok = false;
            report.first_bad_seq = Some(report.head_seq + 1);
            report.reason = Some(
                "no signed head: a cut tail cannot be ruled out (an export ends with its signed head)"
                    .into(),
            );
        }
        report
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signal::EngineState;

    /// SPEC §7's canonical form stated as serde_json output: every field
    /// but `hash` and `signature`, in order, as compact JSON. What the
    /// hand-written bytes are held to.
    #[derive(Serialize)]
    struct Canonical<'a> {
        seq: u64,
        receipt_id: &'a str,
        kind: &'a str,
        tenant_id: &'a str,
        sku_id: &'a str,
        signal_id: &'a Option<String>,
        action_id: &'a Option<String>,
        state_before: ReceiptState,
        state_after: ReceiptState,
        success: bool,
        reason: &'a Option<String>,
        trace_id: &'a Option<String>,
        timestamp_ms: u64,
        prev_hash: &'a str,
        key_id: &'a str,
    }

    fn serde_canonical(r: &Receipt) -> Vec<u8> {
        serde_json::to_vec(&Canonical {
            seq: r.seq,
            receipt_id: &r.receipt_id,
            kind: &r.kind,
            tenant_id: &r.tenant_id,
            sku_id: &r.sku_id,
            signal_id: &r.signal_id,
            action_id: &r.action_id,
            state_before: r.state_before,
            state_after: r.state_after,
            success: r.success,
            reason: &r.reason,
            trace_id: &r.trace_id,
            timestamp_ms: r.timestamp_ms,
            prev_hash: &r.prev_hash,
            key_id: &r.key_id,
        })
        .unwrap()
    }

    fn keys() -> BTreeMap<String, String> {
        BTreeMap::from([
            ("k1".into(), "secret-1".into()),
            ("k2".into(), "secret-2".into()),
        ])
    }

    #[test]
    fn prefixed_ulids_are_the_prefix_and_a_fresh_ulid_at_exact_capacity() {
        let a = prefixed_ulid("rcpt_");
        let b = prefixed_ulid("rcpt_");
        assert_ne!(a, b);
        for id in [&a, &b] {
            let ulid = id.strip_prefix("rcpt_").expect("the prefix first");
            assert!(ulid::Ulid::from_string(ulid).is_ok(), "{id} ends in a ULID");
            assert_eq!(id.len(), "rcpt_".len() + ulid::ULID_LEN);
            assert_eq!(id.capacity(), id.len());
        }
        assert!(prefixed_ulid("act_").starts_with("act_"));
    }

    fn chain(n: u64) -> (Vec<Receipt>, SignedHead) {
        let mut out = Vec::new();
        let mut prev = GENESIS_HASH.to_string();
        for seq in 1..=n {
            let (kid, key) = if seq <= n / 2 {
                ("k1", "secret-1")
            } else {
                ("k2", "secret-2")
            };
            let d = ReceiptDraft {
                receipt_id: format!("r{seq}"),
                kind: "action_generated".into(),
                tenant_id: "t".into(),
                sku_id: "s".into(),
                signal_id: Some(format!("sig{seq}")),
                action_id: None,
                state_before: EngineState::Stable.into(),
                state_after: EngineState::ActionPending.into(),
                success: true,
                reason: None,
                trace_id: None,
                timestamp_ms: seq,
            };
            let r = Receipt::seal(d, seq, &prev, kid, &SigningKey::new(key.as_bytes()));
            prev = r.hash.clone();
            out.push(r);
        }
        let head = SignedHead::new(n, &prev, "k2", &SigningKey::new(b"secret-2"));
        (out, head)
    }

    #[test]
    fn the_hash_and_signature_are_the_spec_formulas() {
        let (c, _) = chain(2);
        let r = &c[1];
        let mut h = Sha256::new();
        h.update(format!("{}\n", r.prev_hash).as_bytes());
        h.update(serde_canonical(r));
        assert_eq!(r.hash, hex::encode(h.finalize()));
        let mut mac = Hmac::<Sha256>::new_from_slice(b"secret-2").unwrap(); // seq 2 of 2: the second key
        mac.update(r.hash.as_bytes());
        assert_eq!(r.signature, hex::encode(mac.finalize().into_bytes()));
        assert_eq!(r.hash.len(), 64);
        assert!(r
            .hash
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
    }

    #[test]
    fn an_intact_chain_with_rotated_keys_verifies() {
        let (c, head) = chain(6);
        let r = verify_chain(&c, &keys(), Some(&head));
        assert!(r.ok, "{r:?}");
        assert_eq!((r.count, r.head_seq), (6, 6));
        assert_eq!(c[0].prev_hash, GENESIS_HASH);
    }

    #[test]
    fn every_kind_of_tampering_is_found_at_its_first_bad_seq() {
        let (c, head) = chain(6);
        let check = |c: &[Receipt], head: &SignedHead, want: u64| {
            let r = verify_chain(c, &keys(), Some(head));
            assert!(!r.ok);
            assert_eq!(r.first_bad_seq, Some(want), "{r:?}");
        };
        let mut edited = c.clone();
        edited[2].reason = Some("edited".into());
        check(&edited, &head, 3);
        let mut deleted = c.clone();
        deleted.remove(3);
        check(&deleted, &head, 4);
        let mut reordered = c.clone();
        reordered.swap(1, 2);
        check(&reordered, &head, 2);
        let mut inserted = c.clone();
        let mut fake = c[2].clone();
        fake.receipt_id = "fake".into();
        inserted.insert(3, fake);
        check(&inserted, &head, 4);
        let truncated = c[..4].to_vec();
        check(&truncated, &head, 5);
        let mut resigned = c.clone();
        resigned[4].signature = sign(b"wrong", &resigned[4].hash);
        check(&resigned, &head, 5);
        // Without the head a clean truncation is indistinguishable from a short
        // ledger: a whole ledger without its head does not verify.
        assert!(verify_chain(&truncated, &keys(), None).ok);
        let r = verify_ledger(&truncated, &keys(), None);
        assert_eq!(
            (r.ok, r.count, r.first_bad_seq),
            (false, 4, Some(5)),
            "{r:?}"
        );
        assert!(r.reason.unwrap().starts_with("no signed head"));
        assert!(verify_ledger(&c, &keys(), Some(&head)).ok);
        assert!(
            verify_ledger(&[], &keys(), None).ok,
            "an empty ledger has no head"
        );
    }

    /// One change to a ledger, and the seq verification must fail at.
    #[derive(Debug, Clone)]
    enum Tamper {
        /// A field of receipt `i` changed (0..10: which).
        Edit(usize, u8),
        Delete(usize),
        /// Receipts `i` and `j` (i < j) trade places.
        Swap(usize, usize),
        /// A copy of receipt `from`, its id changed, put in before `i`.
        Insert(usize, usize),
        /// Only the first `k` kept.
        Truncate(usize),
        /// Receipt `i` signed with a key that is not its own.
        Resign(usize),
        /// Receipt `i` said to be signed by the other (known) key.
        Rekey(usize),
        /// A receipt chained on past the signed head.
        Extend,
        /// The signed head's hash changed.
        Head,
    }

    use proptest::prelude::*;

    fn tamper(n: usize) -> impl Strategy<Value = Tamper> {
        prop_oneof![
            (0..n, 0..10u8).prop_map(|(i, f)| Tamper::Edit(i, f)),
            (0..n).prop_map(Tamper::Delete),
            // Two places, different when there are two (a swap of a
            // receipt with itself changes nothing: then a deletion).
            (0..n, 1..n.max(2)).prop_map(move |(i, d)| {
                let j = (i + d) % n;
                if i == j {
                    Tamper::Delete(i)
                } else {
                    Tamper::Swap(i.min(j), i.max(j))
                }
            }),
            (0..=n, 0..n).prop_map(|(i, from)| Tamper::Insert(i, from)),
            (0..n).prop_map(Tamper::Truncate),
            (0..n).prop_map(Tamper::Resign),
            (0..n).prop_map(Tamper::Rekey),
            Just(Tamper::Extend),
            Just(Tamper::Head),
        ]
    }

    /// Applies `t`; the seq verification must report first.
    fn apply(c: &mut Vec<Receipt>, head: &mut SignedHead, t: &Tamper) -> u64 {
        let n = c.len() as u64;
        let seq = |i: &usize| *i as u64 + 1;
        match t {
            Tamper::Edit(i, field) => {
                let r = &mut c[*i];
                match field {
                    0 => r.seq += n + 1,
                    1 => r.receipt_id.push('x'),
                    2 => r.kind = "action_failed".into(),
                    3 => r.tenant_id.push('x'),
                    4 => r.success = !r.success,
                    5 => r.reason = Some(format!("{:?}x", r.reason)),
                    6 => r.timestamp_ms += 1,
                    7 => r.prev_hash = "f".repeat(64),
                    8 => r.hash = "0".repeat(64),
                    _ => r.state_after = EngineState::Halted.into(),
                }
                seq(i)
            }
            Tamper::Delete(i) => {
                c.remove(*i);
                seq(i)
            }
            Tamper::Swap(i, j) => {
                c.swap(*i, *j);
                seq(i)
            }
            Tamper::Insert(i, from) => {
                let mut fake = c[*from].clone();
                fake.receipt_id.push_str("-fake");
                c.insert(*i, fake);
                if *i as u64 == n {
                    // After the last: past the signed head.
                    n + 1
                } else {
                    seq(i)
                }
            }
            Tamper::Truncate(k) => {
                c.truncate(*k);
                *k as u64 + 1
            }
            Tamper::Resign(i) => {
                c[*i].signature = sign(b"not-a-key-of-ours", &c[*i].hash);
                seq(i)
            }
            Tamper::Rekey(i) => {
                c[*i].key_id = if c[*i].key_id == "k1" { "k2" } else { "k1" }.into();
                seq(i)
            }
            Tamper::Extend => {
                let mut more = c[c.len() - 1].clone();
                let last = more.hash.clone();
                more.receipt_id = "more".into();
                let d = ReceiptDraft {
                    receipt_id: more.receipt_id,
                    kind: more.kind,
                    tenant_id: more.tenant_id,
                    sku_id: more.sku_id,
                    signal_id: more.signal_id,
                    action_id: more.action_id,
                    state_before: more.state_before,
                    state_after: more.state_after,
                    success: more.success,
                    reason: more.reason,
                    trace_id: more.trace_id,
                    timestamp_ms: more.timestamp_ms,
                };
                c.push(Receipt::seal(
                    d,
                    n + 1,
                    &last,
                    "k2",
                    &SigningKey::new(b"secret-2"),
                ));
                n + 1
            }
            Tamper::Head => {
                head.hash = "a".repeat(64);
                n + 1
            }
        }
    }

    /// Text of any kind: the ids and names a receipt usually holds, and
    /// anything JSON escapes or that is not ASCII.
    fn text() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-z0-9_:-]{0,40}",
            "[\\x00-\\x7f]{0,12}",
            ".{0,12}",
            Just("q\"uote\\back\u{7f}\u{1f}\n\té".to_string()),
        ]
    }

    fn state() -> impl Strategy<Value = ReceiptState> {
        proptest::sample::select(ReceiptState::all().collect::<Vec<_>>())
    }

    fn receipt() -> impl Strategy<Value = Receipt> {
        let texts = (text(), text(), text(), text(), text(), text(), text());
        let options = (
            proptest::option::of(text()),
            proptest::option::of(text()),
            proptest::option::of(text()),
            proptest::option::of(text()),
        );
        (any::<(u64, u64, bool)>(), texts, options, state(), state()).prop_map(
            |((seq, timestamp_ms, success), t, o, state_before, state_after)| Receipt {
                seq,
                receipt_id: t.0,
                kind: t.1,
                tenant_id: t.2,
                sku_id: t.3,
                signal_id: o.0,
                action_id: o.1,
                state_before,
                state_after,
                success,
                reason: o.2,
                trace_id: o.3,
                timestamp_ms,
                prev_hash: t.4,
                hash: t.5,
                key_id: t.6,
                signature: String::new(),
            },
        )
    }

    #[test]
    fn every_state_is_named_as_its_json_string() {
        assert_eq!(ReceiptState::all().count(), 11);
        for s in ReceiptState::all() {
            assert_eq!(
                serde_json::to_string(&s).unwrap(),
                format!("\"{}\"", s.as_str())
            );
        }
    }

    proptest! {
        /// The canonical bytes hashed are serde_json's, byte for byte,
        /// whatever the receipt holds.
        #[test]
        fn the_canonical_bytes_written_by_hand_are_serde_jsons(r in receipt()) {
            prop_assert_eq!(
                String::from_utf8(r.canonical_bytes()).unwrap(),
                String::from_utf8(serde_canonical(&r)).unwrap()
            );
        }

        /// Any one edit, deletion, insertion, reordering, cut, wrong
        /// signature, unsigned extension or forged head, anywhere in a
        /// ledger of any length, fails verification at its first bad seq.
        #[test]
        fn any_one_tampering_is_found_at_its_first_bad_seq(
            (n, t) in (1..24u64).prop_flat_map(|n| (Just(n), tamper(n as usize)))
        ) {
            let (mut c, mut head) = chain(n);
            prop_assert!(verify_ledger(&c, &keys(), Some(&head)).ok);
            let want = apply(&mut c, &mut head, &t);
            let r = verify_ledger(&c, &keys(), Some(&head));
            prop_assert!(!r.ok, "{:?} not found: {:?}", t, r);
            prop_assert_eq!(r.first_bad_seq, Some(want), "{:?}: {:?}", t, r);
            // What verified before the first bad seq is what the report
            // counts (an extension chains, and is counted, but is past the head).
            let counted = if matches!(t, Tamper::Extend) { want } else { want - 1 };
            prop_assert_eq!(r.count, counted, "{:?}: {:?}", t, r);
        }
    }
}

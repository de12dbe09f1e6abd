//! Signals (SPEC §2), their records and the engine states (SPEC §5).

use std::sync::OnceLock;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

/// A signal's payload: the JSON object as the client sent it, kept as text
/// while the signal is queued and parsed once, on first read, when a policy
/// or the engine looks into it. A queued signal then costs its bytes, not a
/// parsed map (a `serde_json::Map` allocates a B-tree node per object), and
/// the queue writes it out verbatim.
///
/// Text that passes as a JSON object can still fail to parse into one: a
/// number beyond `f64` (`1e400`) or nesting past serde_json's recursion
/// limit pass `RawValue`, which only checks the syntax. Ingress and the
/// broker's consumer refuse such a payload ([`Payload::check`]); one that
/// reaches an engine anyway (a store written by hand, or before that check)
/// is never read as an empty object by a policy: [`Payload::unreadable`]
/// says why, and the engine denies the signal.
#[derive(Clone)]
pub struct Payload {
    raw: Box<RawValue>,
    parsed: OnceLock<Result<Map<String, Value>, String>>,
}

/// Reads a JSON value through without keeping it, failing where parsing it
/// into a [`Value`] would.
struct ReadThrough;

impl<'de> Deserialize<'de> for ReadThrough {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<ReadThrough, D::Error> {
        d.deserialize_any(ReadThrough)
    }
}

impl<'de> serde::de::Visitor<'de> for ReadThrough {
    type Value = ReadThrough;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<ReadThrough, E> {
        Ok(ReadThrough)
    }
    fn visit_i64<E>(self, _: i64) -> Result<ReadThrough, E> {
        Ok(ReadThrough)
    }
    fn visit_u64<E>(self, _: u64) -> Result<ReadThrough, E> {
        Ok(ReadThrough)
    }
    fn visit_f64<E>(self, _: f64) -> Result<ReadThrough, E> {
        Ok(ReadThrough)
    }
    fn visit_str<E>(self, _: &str) -> Result<ReadThrough, E> {
        Ok(ReadThrough)
    }
    fn visit_unit<E>(self) -> Result<ReadThrough, E> {
        Ok(ReadThrough)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut a: A) -> Result<ReadThrough, A::Error> {
        while a.next_element::<ReadThrough>()?.is_some() {}
        Ok(ReadThrough)
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut a: A) -> Result<ReadThrough, A::Error> {
        while a.next_entry::<ReadThrough, ReadThrough>()?.is_some() {}
        Ok(ReadThrough)
    }
}

impl Payload {
    fn from_raw(raw: Box<RawValue>) -> Payload {
        Payload {
            raw,
            parsed: OnceLock::new(),
        }
    }

    /// A payload from JSON text, which must be an object.
    fn object(raw: Box<RawValue>) -> Result<Payload, String> {
        if raw.get().starts_with('{') {
            Ok(Payload::from_raw(raw))
        } else {
            Err("payload must be a JSON object".into())
        }
    }

    /// A payload from stored JSON text (as [`Payload::raw`] gave it), which
    /// must be an object.
    pub fn from_text(text: String) -> Result<Payload, String> {
        Payload::object(RawValue::from_string(text).map_err(|e| e.to_string())?)
    }

    /// The JSON text, as received.
    pub fn raw(&self) -> &str {
        self.raw.get()
    }

    /// Whether the text parses into an object, checked without building
    /// it (the queue keeps the text; a policy parses it when it reads it).
    pub fn check(&self) -> Result<(), String> {
        serde_json::from_str::<ReadThrough>(self.raw.get())
            .map(|_| ())
            .map_err(|e| format!("payload is not readable JSON: {e} (of the payload)"))
    }

    fn parsed(&self) -> &Result<Map<String, Value>, String> {
        self.parsed.get_or_init(|| {
            serde_json::from_str(self.raw.get())
                .map_err(|e| format!("payload cannot be read: {e} (of the payload)"))
        })
    }

    /// The parsed object (parsed on first use); empty if it cannot be
    /// parsed, which [`Payload::unreadable`] tells.
    pub fn map(&self) -> &Map<String, Value> {
        static EMPTY: std::sync::LazyLock<Map<String, Value>> = std::sync::LazyLock::new(Map::new);
        self.parsed().as_ref().unwrap_or(&EMPTY)
    }

    /// Why the text does not parse into an object, if it does not.
    pub fn unreadable(&self) -> Option<&str> {
        self.parsed().as_ref().err().map(String::as_str)
    }
}

impl Default for Payload {
    fn default() -> Payload {
        Payload::from_raw(RawValue::from_string("{}".into()).expect("{} is JSON"))
    }
}

impl From<Map<String, Value>> for Payload {
    fn from(m: Map<String, Value>) -> Payload {
        let raw = serde_json::value::to_raw_value(&m).expect("a JSON map serializes");
        let p = Payload::from_raw(raw);
        let _ = p.parsed.set(Ok(m));
        p
    }
}

impl std::ops::Deref for Payload {
    type Target = Map<String, Value>;
    fn deref(&self) -> &Map<String, Value> {
        self.map()
    }
}

impl PartialEq for Payload {
    fn eq(&self, other: &Payload) -> bool {
        self.raw.get() == other.raw.get() || self.map() == other.map()
    }
}

impl std::fmt::Debug for Payload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.raw.get())
    }
}

impl Serialize for Payload {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.raw.serialize(s)
    }
}

impl<'de> Deserialize<'de> for Payload {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Payload, D::Error> {
        Payload::object(Box::<RawValue>::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

/// A signal as accepted: validated, with its id assigned.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Signal {
    pub id: String,
    pub tenant_id: String,
    pub sku_id: String,
    pub kind: String,
    #[serde(default)]
    pub critical: bool,
    pub payload: Payload,
    pub received_at_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    /// W3C trace context to continue after the queue (`tai_core::trace`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

/// A shared signal as a set member or map key by one of its text fields:
/// keying costs a reference count, not a copy of the text. It hashes as
/// `str` does, so `Borrow<str>` look-ups by the bare text find it. (A key
/// keeps the signal it was made from alive while it is held.) Clippy's
/// `mutable_key_type` sees the payload's parse cache inside; the key's hash
/// and equality read only the field, which never changes.
macro_rules! signal_keyed_by {
    ($(#[$doc:meta])* $name:ident, $field:ident) => {
        $(#[$doc])*
        #[derive(Clone, Debug)]
        pub struct $name(pub std::sync::Arc<Signal>);

        impl PartialEq for $name {
            fn eq(&self, other: &Self) -> bool {
                self.0.$field == other.0.$field
            }
        }

        impl Eq for $name {}

        impl std::hash::Hash for $name {
            fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
                self.0.$field.as_str().hash(h);
            }
        }

        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0.$field
            }
        }
    };
}

signal_keyed_by!(
    /// A shared signal keyed by its id.
    ById,
    id
);
signal_keyed_by!(
    /// A shared signal keyed by its tenant.
    ByTenant,
    tenant_id
);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SignalIn {
    id: Option<Value>,
    tenant_id: Option<Value>,
    sku_id: Option<Value>,
    kind: Option<Value>,
    critical: Option<Value>,
    payload: Option<Box<RawValue>>,
}

fn id_chars(s: &str, extra: &[u8]) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b) || extra.contains(&b))
}

fn required(field: &str, v: Option<Value>) -> Result<String, String> {
    match v {
        None | Some(Value::Null) => Err(format!("{field} is required")),
        Some(Value::String(s)) if s.is_empty() || s.len() > 64 => {
            Err(format!("{field} must be 1-64 characters"))
        }
        Some(Value::String(s)) if !id_chars(&s, b"") => {
            Err(format!("{field} may only contain [A-Za-z0-9._-]"))
        }
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(format!("{field} must be a string")),
    }
}

/// The kind of signal that activates or revokes a tenant's SKU (SPEC §2).
pub const ENTITLEMENT: &str = "entitlement";

/// Parses and validates a request body. `new_id` is called when the client
/// gave no id. Errors are specific, human-readable messages for `invalid_signal`.
pub fn parse_signal(
    body: &[u8],
    received_at_ms: u64,
    new_id: impl FnOnce() -> String,
) -> Result<Signal, String> {
    let not_json = |e: serde_json::Error| format!("body is not valid JSON: {e}");
    if body.trim_ascii_start().first() != Some(&b'{') {
        // Valid JSON of another kind, or not JSON at all.
        serde_json::from_slice::<serde::de::IgnoredAny>(body).map_err(not_json)?;
        return Err("body must be a JSON object".into());
    }
    // Straight from the bytes: the payload stays text (see `Payload`).
    let raw: SignalIn = serde_json::from_slice(body).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => format!("body is not a valid signal: {e}"),
        _ => not_json(e),
    })?;
    let id = match raw.id {
        None | Some(Value::Null) => new_id(),
        Some(Value::String(s)) if s.is_empty() || s.len() > 128 => {
            return Err("id must be 1-128 characters".into())
        }
        Some(Value::String(s)) if !id_chars(&s, b":") => {
            return Err("id may only contain [A-Za-z0-9._:-]".into())
        }
        Some(Value::String(s)) => s,
        Some(_) => return Err("id must be a string".into()),
    };
    let tenant_id = required("tenant_id", raw.tenant_id)?;
    let sku_id = required("sku_id", raw.sku_id)?;
    let kind = required("kind", raw.kind)?;
    let critical = match raw.critical {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => b,
        Some(_) => return Err("critical must be true or false".into()),
    };
    let payload = match raw.payload {
        // `null` arrives as `None` (serde's Option).
        None => Payload::default(),
        Some(p) => {
            let p = Payload::object(p)?;
            p.check()?;
            p
        }
    };
    // SPEC §2's one special kind: without `payload.active` an entitlement
    // could only be denied after its 202, so it is refused here.
    if kind == ENTITLEMENT && !payload.get("active").is_some_and(Value::is_boolean) {
        return Err("an entitlement needs payload.active true or false".into());
    }
    Ok(Signal {
        id,
        tenant_id,
        sku_id,
        kind,
        critical,
        payload,
        received_at_ms,
        trace_id: None,
        traceparent: None,
    })
}

/// Where a signal is (SPEC §3.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SignalStatus {
    Accepted,
    Processing,
    Completed,
    Denied,
    Failed,
    Deadlettered,
}

impl SignalStatus {
    /// Decided: a redelivery of it must not be decided again.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            SignalStatus::Completed
                | SignalStatus::Denied
                | SignalStatus::Failed
                | SignalStatus::Deadlettered
        )
    }
    pub fn as_str(self) -> &'static str {
        match self {
            SignalStatus::Accepted => "accepted",
            SignalStatus::Processing => "processing",
            SignalStatus::Completed => "completed",
            SignalStatus::Denied => "denied",
            SignalStatus::Failed => "failed",
            SignalStatus::Deadlettered => "deadlettered",
        }
    }
}

/// What `GET /v1/signals/{id}` shows; also the dedupe key's value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SignalRecord {
    pub signal_id: String,
    pub tenant_id: String,
    pub sku_id: String,
    pub kind: String,
    pub status: SignalStatus,
    pub receipts: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl SignalRecord {
    pub fn accepted(s: &Signal) -> Self {
        SignalRecord {
            signal_id: s.id.clone(),
            tenant_id: s.tenant_id.clone(),
            sku_id: s.sku_id.clone(),
            kind: s.kind.clone(),
            status: SignalStatus::Accepted,
            receipts: Vec::new(),
            reason: None,
        }
    }
}

/// A signal taken out of the line, with why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub signal: Signal,
    pub reason: String,
    pub at_ms: u64,
}

/// The policy engine's states (SPEC §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EngineState {
    Boot,
    Stable,
    ActionPending,
    Degraded,
    Halted,
    QuotaExhausted,
}

impl EngineState {
    pub const ALL: [EngineState; 6] = [
        EngineState::Boot,
        EngineState::Stable,
        EngineState::ActionPending,
        EngineState::Degraded,
        EngineState::Halted,
        EngineState::QuotaExhausted,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            EngineState::Boot => "boot",
            EngineState::Stable => "stable",
            EngineState::ActionPending => "action_pending",
            EngineState::Degraded => "degraded",
            EngineState::Halted => "halted",
            EngineState::QuotaExhausted => "quota_exhausted",
        }
    }
}

/// A circuit breaker's states (SPEC §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    Closed,
    HalfOpen,
    Open,
}

impl BreakerState {
    pub const ALL: [BreakerState; 3] = [
        BreakerState::Closed,
        BreakerState::HalfOpen,
        BreakerState::Open,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::HalfOpen => "half_open",
            BreakerState::Open => "open",
        }
    }

    /// The `tai_breaker_state` gauge value (SPEC §9).
    pub fn gauge(self) -> f64 {
        match self {
            BreakerState::Closed => 0.0,
            BreakerState::HalfOpen => 1.0,
            BreakerState::Open => 2.0,
        }
    }
}

/// The state a receipt records before and after: an engine's, or, for a
/// breaker's own receipts (`breaker_open`, ...), the breaker's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ReceiptState {
    Engine(EngineState),
    Breaker(BreakerState),
    Queue(QueuedState),
}

/// Where a signal is when the queue itself writes its receipt (a poison
/// message taken out of the queue never reached an engine).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QueuedState {
    Queued,
    Deadlettered,
}

impl QueuedState {
    pub const ALL: [QueuedState; 2] = [QueuedState::Queued, QueuedState::Deadlettered];
    pub fn as_str(self) -> &'static str {
        match self {
            QueuedState::Queued => "queued",
            QueuedState::Deadlettered => "deadlettered",
        }
    }
}

impl ReceiptState {
    /// Every state a receipt can name: the engine's, the breaker's, the
    /// queue's.
    pub fn all() -> impl Iterator<Item = ReceiptState> {
        let engine = EngineState::ALL.map(ReceiptState::Engine);
        let breaker = BreakerState::ALL.map(ReceiptState::Breaker);
        let queue = QueuedState::ALL.map(ReceiptState::Queue);
        engine.into_iter().chain(breaker).chain(queue)
    }

    /// The name a receipt gives the state (its JSON string).
    pub fn as_str(self) -> &'static str {
        match self {
            ReceiptState::Engine(s) => s.as_str(),
            ReceiptState::Breaker(s) => s.as_str(),
            ReceiptState::Queue(s) => s.as_str(),
        }
    }
}

impl From<QueuedState> for ReceiptState {
    fn from(s: QueuedState) -> Self {
        ReceiptState::Queue(s)
    }
}

impl From<EngineState> for ReceiptState {
    fn from(s: EngineState) -> Self {
        ReceiptState::Engine(s)
    }
}

impl From<BreakerState> for ReceiptState {
    fn from(s: BreakerState) -> Self {
        ReceiptState::Breaker(s)
    }
}

/// What `GET /admin/tenants` shows per engine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EngineInfo {
    pub tenant_id: String,
    pub sku_id: String,
    pub state: EngineState,
    pub quota_remaining: u64,
    pub entitled: bool,
    pub in_flight_action: Option<String>,
    pub postponed: usize,
    pub restarts: u64,
    pub active: bool,
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: &str) -> Result<Signal, String> {
        parse_signal(body.as_bytes(), 1, || "generated".into())
    }

    #[test]
    fn a_full_signal_parses() {
        let s = parse(r#"{"id":"p-1","tenant_id":"acme","sku_id":"payments","kind":"payment","critical":true,"payload":{"amount":1}}"#).unwrap();
        assert_eq!((s.id.as_str(), s.critical), ("p-1", true));
        assert_eq!(s.payload["amount"], 1);
        let s = parse(r#"{"tenant_id":"acme","sku_id":"payments","kind":"payment"}"#).unwrap();
        assert_eq!(s.id, "generated");
        assert!(s.payload.is_empty());
    }

    #[test]
    fn the_payload_stays_text_until_read_and_round_trips() {
        let s = parse(
            r#"{"tenant_id":"a","sku_id":"s","kind":"k","payload": {"amount": 1.5, "n": [1,2]}}"#,
        )
        .unwrap();
        assert_eq!(s.payload.raw(), r#"{"amount": 1.5, "n": [1,2]}"#);
        assert!(s.payload.parsed.get().is_none(), "not parsed by ingress");
        assert_eq!(s.payload["amount"], 1.5);
        let stored = serde_json::to_string(&s).unwrap();
        assert!(
            stored.contains(r#""payload":{"amount": 1.5, "n": [1,2]}"#),
            "{stored}"
        );
        let back: Signal = serde_json::from_str(&stored).unwrap();
        assert_eq!(back, s);
        let null = parse(r#"{"tenant_id":"a","sku_id":"s","kind":"k","payload":null}"#).unwrap();
        assert_eq!(null.payload.raw(), "{}");
        let stored_bad = stored.replace(r#"{"amount": 1.5, "n": [1,2]}"#, "[1]");
        let e = serde_json::from_str::<Signal>(&stored_bad).unwrap_err();
        assert!(
            e.to_string().contains("payload must be a JSON object"),
            "{e}"
        );
    }

    fn with_payload(payload: &str) -> Result<Signal, String> {
        parse(&format!(
            r#"{{"tenant_id":"a","sku_id":"s","kind":"k","payload":{payload}}}"#
        ))
    }

    #[test]
    fn a_payload_that_cannot_be_parsed_into_an_object_is_refused_at_ingress() {
        let deep = |n: usize| format!(r#"{{"a":{}{}}}"#, "[".repeat(n), "]".repeat(n));
        // What a policy could not read: each passes `RawValue`'s syntax check.
        for (payload, why) in [
            (
                r#"{"amount": 9000, "note": 1e400}"#.to_string(),
                "number out of range",
            ),
            (r#"{"n": -1e309}"#.to_string(), "number out of range"),
            (deep(200), "recursion limit exceeded"),
        ] {
            let e = with_payload(&payload).unwrap_err();
            assert!(e.starts_with("payload is not readable JSON: "), "{e}");
            assert!(e.contains(why) && e.ends_with("(of the payload)"), "{e}");
            // Parsed behind ingress's back, it says so instead of reading as `{}`.
            let p = Payload::from_text(payload).unwrap();
            assert!(p.map().is_empty());
            assert!(
                p.unreadable().unwrap().contains(why),
                "{:?}",
                p.unreadable()
            );
        }
        // What it can read passes, and still is not parsed until read.
        for payload in [
            r#"{"big": 18446744073709551616, "small": -9223372036854775809, "f": 1.7e308}"#
                .to_string(),
            r#"{"s": "caf\u00e9 \ud83d\ude00", "e": {}, "a": [null, true, 1, "x", {"k": []}]}"#
                .to_string(),
            deep(120),
        ] {
            let s = with_payload(&payload).unwrap();
            assert!(s.payload.parsed.get().is_none());
            assert_eq!(s.payload.unreadable(), None, "{payload}");
            let full: Map<String, Value> = serde_json::from_str(&payload).unwrap();
            assert_eq!(*s.payload.map(), full);
        }
    }

    #[test]
    fn each_schema_error_says_what_is_wrong() {
        let cases = [
            ("[1]", "body must be a JSON object"),
            ("{", "body is not valid JSON"),
            (r#"{"sku_id":"s","kind":"k"}"#, "tenant_id is required"),
            (
                r#"{"tenant_id":"a b","sku_id":"s","kind":"k"}"#,
                "tenant_id may only contain",
            ),
            (
                r#"{"tenant_id":"a","sku_id":"","kind":"k"}"#,
                "sku_id must be 1-64",
            ),
            (
                r#"{"tenant_id":"a","sku_id":"s","kind":5}"#,
                "kind must be a string",
            ),
            (
                r#"{"tenant_id":"a","sku_id":"s","kind":"k","payload":[]}"#,
                "payload must be a JSON object",
            ),
            (
                r#"{"tenant_id":"a","sku_id":"s","kind":"k","critical":"yes"}"#,
                "critical must be true or false",
            ),
            (
                r#"{"tenant_id":"a","sku_id":"s","kind":"entitlement"}"#,
                "an entitlement needs payload.active true or false",
            ),
            (
                r#"{"tenant_id":"a","sku_id":"s","kind":"entitlement","payload":{"active":"yes"}}"#,
                "an entitlement needs payload.active true or false",
            ),
            (
                r#"{"id":"x y","tenant_id":"a","sku_id":"s","kind":"k"}"#,
                "id may only contain",
            ),
            (
                r#"{"tenant_id":"a","sku_id":"s","kind":"k","colour":1}"#,
                "unknown field `colour`",
            ),
            (
                r#"{"tenant_id":"a","tenant_id":"b","sku_id":"s","kind":"k"}"#,
                "duplicate field `tenant_id`",
            ),
            (
                r#"{"tenant_id":"a","sku_id":"s","kind":"k","payload":{"a":}}"#,
                "body is not valid JSON",
            ),
            ("  \"text\"", "body must be a JSON object"),
            ("", "body is not valid JSON"),
        ];
        for (body, want) in cases {
            let e = parse(body).unwrap_err();
            assert!(e.contains(want), "{body}: {e}");
        }
    }

    #[test]
    #[allow(clippy::mutable_key_type)] // see `signal_keyed_by`
    fn a_keyed_signal_is_found_by_its_bare_text() {
        let signal = |id: &str, tenant: &str| {
            let body = format!(r#"{{"id":"{id}","tenant_id":"{tenant}","sku_id":"s","kind":"k"}}"#);
            std::sync::Arc::new(parse(&body).unwrap())
        };
        let (a, b) = (signal("a", "acme"), signal("b", "acme"));
        let ids: std::collections::HashSet<ById> = [ById(a.clone()), ById(b.clone())].into();
        assert!(ids.contains("a") && ids.contains("b") && !ids.contains("acme"));
        let mut tenants = std::collections::HashMap::new();
        tenants.insert(ByTenant(a), 1);
        *tenants.entry(ByTenant(b)).or_insert(0) += 1;
        assert_eq!(tenants.len(), 1, "one key per tenant");
        assert_eq!(tenants.get("acme"), Some(&2));
        assert_eq!(tenants.get("a"), None);
    }
}

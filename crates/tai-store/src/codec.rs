//! Compact stored forms: a version byte, then bincode. The values written
//! for every signal (receipt blocks, signal records) are most of what sled
//! copies (leaf clones, its log, consolidations), so they are kept small;
//! values written before as JSON still read. Each stored form mirrors its
//! type field for field, so a non-self-describing format can read it back
//! (no untagged enums, no skipped fields).

use std::borrow::Cow;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tai_core::msg::Delivery;
use tai_core::signal::{Payload, Signal, SignalRecord, SignalStatus};

use crate::packed::{self, pack, Packed};
use crate::{decode, Result, StoreError};

pub(crate) const V1: u8 = 1;
/// Packed values ([`crate::packed`]).
pub(crate) const V2: u8 = 2;

pub(crate) fn encode_v1<T: Serialize>(v: &T) -> Vec<u8> {
    encode_versioned(V1, v)
}

/// Room first made for a value: a signal record (most of what is encoded,
/// one per decision) fits. Started at one byte, its buffer was grown four
/// times on the way (8, 16, 32, 64, 128).
const SMALL_VALUE: usize = 128;

pub(crate) fn encode_versioned<T: Serialize>(version: u8, v: &T) -> Vec<u8> {
    encode_sized(version, v, SMALL_VALUE)
}

/// [`encode_versioned`] into a buffer with room for `size` bytes first (a
/// block's estimate), so a large value is not copied at each doubling.
pub(crate) fn encode_sized<T: Serialize>(version: u8, v: &T, size: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(size.max(1));
    out.push(version);
    bincode::serde::encode_into_std_write(v, &mut out, bincode::config::standard())
        .expect("store values serialize");
    out
}

/// Reads a value written by [`encode_v1`]; anything else is corrupt, named
/// by its key. (Callers read their JSON-era values before calling this.)
pub(crate) fn decode_v1<T: DeserializeOwned>(key: &[u8], bytes: &[u8]) -> Result<T> {
    decode_versioned(V1, key, bytes)
}

/// Reads a value written by [`encode_versioned`] with `version`.
pub(crate) fn decode_versioned<T: DeserializeOwned>(
    version: u8,
    key: &[u8],
    bytes: &[u8],
) -> Result<T> {
    let corrupt = |message: String| StoreError::Corrupt {
        key: crate::check::key_text(key),
        message,
    };
    match bytes.split_first() {
        Some((&v, rest)) if v == version => {
            let (v, used) = decode_bounded(rest).map_err(|e| corrupt(e.to_string()))?;
            if used != rest.len() {
                return Err(corrupt("trailing bytes after the value".into()));
            }
            Ok(v)
        }
        _ => Err(corrupt("not a value of this kind".into())),
    }
}

/// Decodes `bytes` with a limit on what bincode may allocate for them.
/// bincode allocates a string (or byte string) as long as its length says
/// before it reads it; a damaged length would ask for exabytes and abort
/// the process. bincode's limit counts what it decodes: a string's length,
/// and for each number its size in memory (8 for a u64, 16 for a u128),
/// however few bytes its varint took. Each of those takes at least one
/// byte of the value, so a value that reads claims at most 16 times its
/// own size, and a limit of that refuses only damage. The limit is a
/// constant, so it is 16 times the smallest of a few sizes (64 KiB, then
/// steps of 4) that holds the value: a damaged value allocates at most
/// 1 MiB, or 64 times its size. (A value past 1 GiB, which the node never
/// writes, is read without a limit.)
fn decode_bounded<T: DeserializeOwned>(
    bytes: &[u8],
) -> std::result::Result<(T, usize), bincode::error::DecodeError> {
    use bincode::config::standard;
    use bincode::serde::decode_from_slice;
    macro_rules! by_size {
        ($($most:expr),*) => {
            $(
                if bytes.len() <= $most {
                    return decode_from_slice(bytes, standard().with_limit::<{ 16 * $most }>());
                }
            )*
        };
    }
    const KIB: usize = 1 << 10;
    by_size!(
        64 * KIB,
        256 * KIB,
        1024 * KIB,
        4096 * KIB,
        16384 * KIB,
        65536 * KIB,
        262144 * KIB,
        1048576 * KIB
    );
    decode_from_slice(bytes, standard())
}

/// A signal record (`s/`), borrowed to write, owned when read.
#[derive(Serialize, Deserialize)]
struct StoredRecord<'a> {
    signal_id: Cow<'a, str>,
    tenant_id: Cow<'a, str>,
    sku_id: Cow<'a, str>,
    kind: Cow<'a, str>,
    status: SignalStatus,
    receipts: Vec<Cow<'a, str>>,
    reason: Option<Cow<'a, str>>,
}

/// A signal record in version 2: its key (`s/` tenant `\0` id) holds
/// the tenant and the signal id, so they are not written again, and the
/// receipt ids are packed.
#[derive(Serialize, Deserialize)]
struct PackedRecord<'a> {
    sku_id: Packed<'a>,
    kind: Packed<'a>,
    status: SignalStatus,
    receipts: Vec<Packed<'a>>,
    reason: Option<Packed<'a>>,
}

/// A record in version 1, whole.
pub(crate) fn encode_record_v1(r: &SignalRecord) -> Vec<u8> {
    encode_v1(&StoredRecord {
        signal_id: Cow::Borrowed(&r.signal_id),
        tenant_id: Cow::Borrowed(&r.tenant_id),
        sku_id: Cow::Borrowed(&r.sku_id),
        kind: Cow::Borrowed(&r.kind),
        status: r.status,
        receipts: r
            .receipts
            .iter()
            .map(|s| Cow::Borrowed(s.as_str()))
            .collect(),
        reason: r.reason.as_deref().map(Cow::Borrowed),
    })
}

pub(crate) fn encode_record(r: &SignalRecord) -> Vec<u8> {
    if r.tenant_id.contains('\0') {
        // Its key could not be split back into tenant and id.
        return encode_record_v1(r);
    }
    encode_versioned(
        V2,
        &PackedRecord {
            sku_id: pack(&r.sku_id),
            kind: pack(&r.kind),
            status: r.status,
            receipts: r.receipts.iter().map(|s| pack(s)).collect(),
            reason: r.reason.as_deref().map(pack),
        },
    )
}

/// Reads the record stored under `key` (`s/` tenant `\0` id).
pub(crate) fn decode_record(key: &[u8], bytes: &[u8]) -> Result<SignalRecord> {
    let corrupt = |message: String| StoreError::Corrupt {
        key: crate::check::key_text(key),
        message,
    };
    match bytes.first() {
        Some(b'{') => decode(key, bytes),
        Some(&V2) => {
            let p: PackedRecord<'static> = decode_versioned(V2, key, bytes)?;
            let (tenant, id) = key
                .starts_with(b"s/")
                .then(|| crate::split_pair_key(key))
                .flatten()
                .ok_or_else(|| corrupt("a record under a key that names no signal".into()))?;
            let text = |b: &[u8]| {
                std::str::from_utf8(b)
                    .map(str::to_string)
                    .map_err(|e| corrupt(e.to_string()))
            };
            let unpack = |p| packed::unpack(p, &[]).map_err(corrupt);
            Ok(SignalRecord {
                signal_id: text(id)?,
                tenant_id: text(tenant)?,
                sku_id: unpack(p.sku_id)?,
                kind: unpack(p.kind)?,
                status: p.status,
                receipts: p.receipts.into_iter().map(unpack).collect::<Result<_>>()?,
                reason: p.reason.map(unpack).transpose()?,
            })
        }
        _ => {
            let s: StoredRecord<'static> = decode_v1(key, bytes)?;
            Ok(SignalRecord {
                signal_id: s.signal_id.into_owned(),
                tenant_id: s.tenant_id.into_owned(),
                sku_id: s.sku_id.into_owned(),
                kind: s.kind.into_owned(),
                status: s.status,
                receipts: s.receipts.into_iter().map(Cow::into_owned).collect(),
                reason: s.reason.map(Cow::into_owned),
            })
        }
    }
}

/// A queued signal (`q/` blocks hold a list of them), borrowed to write,
/// owned when read. The payload is kept as its JSON text.
#[derive(Serialize, Deserialize)]
struct StoredDelivery<'a> {
    seq: u64,
    id: Cow<'a, str>,
    tenant_id: Cow<'a, str>,
    sku_id: Cow<'a, str>,
    kind: Cow<'a, str>,
    critical: bool,
    payload: Cow<'a, str>,
    received_at_ms: u64,
    trace_id: Option<Cow<'a, str>>,
    traceparent: Option<Cow<'a, str>>,
}

impl StoredDelivery<'_> {
    /// The bytes of its texts.
    fn texts_len(&self) -> usize {
        let opt = |t: &Option<Cow<'_, str>>| t.as_deref().map_or(0, str::len);
        self.id.len()
            + self.tenant_id.len()
            + self.sku_id.len()
            + self.kind.len()
            + self.payload.len()
            + opt(&self.trace_id)
            + opt(&self.traceparent)
    }
}

pub(crate) fn encode_block(deliveries: &[Delivery]) -> Vec<u8> {
    // The room the block takes: its texts, and a little for the numbers
    // and lengths of each delivery.
    let mut size = 8;
    let stored: Vec<StoredDelivery<'_>> = deliveries
        .iter()
        .map(|d| {
            let s = &d.signal;
            let stored = StoredDelivery {
                seq: d.seq,
                id: Cow::Borrowed(&s.id),
                tenant_id: Cow::Borrowed(&s.tenant_id),
                sku_id: Cow::Borrowed(&s.sku_id),
                kind: Cow::Borrowed(&s.kind),
                critical: s.critical,
                payload: Cow::Borrowed(s.payload.raw()),
                received_at_ms: s.received_at_ms,
                trace_id: s.trace_id.as_deref().map(Cow::Borrowed),
                traceparent: s.traceparent.as_deref().map(Cow::Borrowed),
            };
            size += stored.texts_len() + 32;
            stored
        })
        .collect();
    encode_sized(V1, &stored, size)
}

/// Reads a queue block; one written before as JSON still reads.
pub(crate) fn decode_block(key: &[u8], bytes: &[u8]) -> Result<Vec<Delivery>> {
    if bytes.first() == Some(&b'[') {
        return decode(key, bytes);
    }
    let stored: Vec<StoredDelivery<'static>> = decode_v1(key, bytes)?;
    stored
        .into_iter()
        .map(|d| {
            let payload = Payload::from_text(d.payload.into_owned()).map_err(|message| {
                StoreError::Corrupt {
                    key: crate::check::key_text(key),
                    message: format!("payload of signal {:?}: {message}", d.id),
                }
            })?;
            Ok(Delivery {
                seq: d.seq,
                signal: std::sync::Arc::new(Signal {
                    id: d.id.into_owned(),
                    tenant_id: d.tenant_id.into_owned(),
                    sku_id: d.sku_id.into_owned(),
                    kind: d.kind.into_owned(),
                    critical: d.critical,
                    payload,
                    received_at_ms: d.received_at_ms,
                    trace_id: d.trace_id.map(Cow::into_owned),
                    traceparent: d.traceparent.map(Cow::into_owned),
                }),
                redelivered: false,
            })
        })
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn record(reason: Option<&str>) -> SignalRecord {
        SignalRecord {
            signal_id: "pay-1".into(),
            tenant_id: "acme".into(),
            sku_id: "payments".into(),
            kind: "payment".into(),
            status: SignalStatus::Denied,
            receipts: vec![
                format!("rcpt_{}", ulid::Ulid::new()),
                format!("rcpt_{}", ulid::Ulid::new()),
                "01KB".into(),
            ],
            reason: reason.map(str::to_string),
        }
    }

    const KEY: &[u8] = b"s/acme\0pay-1";

    #[test]
    fn records_round_trip_compactly_and_older_ones_still_read() {
        for r in [record(None), record(Some("velocity"))] {
            let bytes = encode_record(&r);
            assert_eq!(bytes[0], V2);
            assert_eq!(decode_record(KEY, &bytes).unwrap(), r);
            let json = serde_json::to_vec(&r).unwrap();
            let older = encode_record_v1(&r);
            assert!(
                bytes.len() * 2 < json.len() && bytes.len() * 4 < older.len() * 3,
                "{} vs {} (JSON) and {} (version 1)",
                bytes.len(),
                json.len(),
                older.len()
            );
            assert_eq!(decode_record(KEY, &json).unwrap(), r);
            assert_eq!(decode_record(KEY, &older).unwrap(), r);
        }
    }

    #[test]
    fn a_record_whose_key_cannot_be_split_is_kept_whole() {
        let mut r = record(None);
        r.tenant_id = "ac\0me".into();
        let bytes = encode_record(&r);
        assert_eq!(bytes[0], V1);
        assert_eq!(decode_record(b"s/ac\0me\0pay-1", &bytes).unwrap(), r);
        // A packed record under a key that names no signal is corrupt.
        match decode_record(b"s/x", &encode_record(&record(None))) {
            Err(StoreError::Corrupt { key, .. }) => assert_eq!(key, "s/x"),
            other => panic!("not reported: {other:?}"),
        }
    }

    fn block() -> Vec<Delivery> {
        let payload: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(r#"{"amount": 25.5, "customer_id": "c-1", "tags": ["a"]}"#)
                .unwrap();
        (1..=2)
            .map(|seq| Delivery {
                seq,
                signal: std::sync::Arc::new(Signal {
                    id: format!("pay-{seq}"),
                    tenant_id: "acme".into(),
                    sku_id: "payments".into(),
                    kind: "payment".into(),
                    critical: seq == 2,
                    payload: payload.clone().into(),
                    received_at_ms: 1_700_000_000_000 + seq,
                    trace_id: (seq == 1).then(|| "4bf92f3577b34da6a3ce929d0e0e4736".into()),
                    traceparent: (seq == 1)
                        .then(|| "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
                }),
                redelivered: false,
            })
            .collect()
    }

    #[test]
    fn queue_blocks_round_trip_compactly_and_json_ones_still_read() {
        let ds = block();
        let bytes = encode_block(&ds);
        let back = decode_block(b"q/x", &bytes).unwrap();
        assert_eq!(back, ds);
        assert_eq!(back[0].signal.payload.raw(), ds[0].signal.payload.raw());
        let json = serde_json::to_vec(&ds).unwrap();
        assert!(
            bytes.len() < json.len() * 3 / 4,
            "{} vs {}",
            bytes.len(),
            json.len()
        );
        assert_eq!(decode_block(b"q/x", &json).unwrap(), ds);
    }

    #[test]
    fn a_damaged_queue_block_is_reported_with_its_key() {
        let bytes = encode_block(&block());
        let not_an_object = encode_v1(&vec![StoredDelivery {
            seq: 1,
            id: "a".into(),
            tenant_id: "acme".into(),
            sku_id: "payments".into(),
            kind: "payment".into(),
            critical: false,
            payload: "[1]".into(),
            received_at_ms: 1,
            trace_id: None,
            traceparent: None,
        }]);
        for bad in [&bytes[..bytes.len() - 3], &[7u8][..], &not_an_object[..]] {
            match decode_block(b"q/x", bad) {
                Err(StoreError::Corrupt { key, .. }) => assert_eq!(key, "q/\\x78"),
                other => panic!("not reported: {other:?}"),
            }
        }
    }

    #[test]
    fn a_damaged_record_is_reported_with_its_key() {
        let bytes = encode_record(&record(None));
        let mut longer = bytes.clone();
        longer.push(0);
        for bad in [
            &bytes[..bytes.len() - 2],
            &[9u8, 1][..],
            &[][..],
            &longer[..],
        ] {
            match decode_record(KEY, bad) {
                Err(StoreError::Corrupt { key, .. }) => assert_eq!(key, "s/acme\\x00pay-1"),
                other => panic!("not reported: {other:?}"),
            }
        }
    }
}

//! Compact stored forms of the strings the node makes itself: receipt and
//! action ids (`rcpt_`/`act_` + a ULID), hashes and signatures (64 hex
//! digits), trace ids (32 hex digits). Stored as their bytes, they take
//! half or less; anything else is kept as text. Unpacking gives back the
//! exact string that was packed: a form is used only when it round-trips
//! (lowercase hex, a canonical ULID), so hashes over the unpacked values
//! verify.
//!
//! In a block of values (a ledger batch) the texts that repeat (tenant,
//! SKU, kind, key id) are written once, in a table, and referred to.

use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use tai_core::receipt::lower_hex;

/// The prefixes of ids stored as [`Packed::Ulid`], by index.
const ULID_PREFIXES: [&str; 3] = ["", "rcpt_", "act_"];
const ULID_LEN: usize = 26;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) enum Packed<'a> {
    Text(Cow<'a, str>),
    /// An entry of the block's table.
    Ref(u32),
    /// `ULID_PREFIXES[prefix]` + a canonical ULID, as the ULID's bytes.
    Ulid(u8, Bytes<16>),
    /// 32 lowercase hex digits.
    Hex16(Bytes<16>),
    /// 64 lowercase hex digits.
    Hex32(Bytes<32>),
}

/// `N` bytes, written as one byte string (serde writes an array element
/// by element).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Bytes<const N: usize>([u8; N]);

impl<const N: usize> Serialize for Bytes<N> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de, const N: usize> Deserialize<'de> for Bytes<N> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit<const N: usize>;
        impl<const N: usize> serde::de::Visitor<'_> for Visit<N> {
            type Value = Bytes<N>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "{N} bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Bytes<N>, E> {
                <[u8; N]>::try_from(v)
                    .map(Bytes)
                    .map_err(|_| E::invalid_length(v.len(), &self))
            }
        }
        d.deserialize_bytes(Visit::<N>)
    }
}

/// Digit values by byte: lowercase hex digits only (anything else,
/// uppercase included, is `BAD`, so only text that reads back the same
/// is packed).
const HEX: [u8; 256] = {
    let mut t = [BAD; 256];
    let mut i = 0;
    while i < 10 {
        t[b'0' as usize + i] = i as u8;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        t[b'a' as usize + i] = 10 + i as u8;
        i += 1;
    }
    t
};
const BAD: u8 = 0x80;

fn from_lower_hex<const N: usize>(s: &str) -> Option<Bytes<N>> {
    let digits = s.as_bytes();
    if digits.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    let mut bad = 0;
    for (o, pair) in out.iter_mut().zip(digits.chunks_exact(2)) {
        let (hi, lo) = (HEX[pair[0] as usize], HEX[pair[1] as usize]);
        bad |= hi | lo;
        *o = (hi << 4) | lo;
    }
    (bad & BAD == 0).then_some(Bytes(out))
}

/// Digit values by byte in a ULID's canonical text (Crockford's base 32,
/// uppercase); anything else is `BAD`.
const CROCKFORD: [u8; 256] = {
    let alphabet = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
    let mut t = [BAD; 256];
    let mut i = 0;
    while i < 32 {
        t[alphabet[i] as usize] = i as u8;
        i += 1;
    }
    t
};

fn ulid(s: &str) -> Option<(u8, Bytes<16>)> {
    let (prefix, rest) = ULID_PREFIXES
        .iter()
        .enumerate()
        .rev()
        .find_map(|(i, p)| s.strip_prefix(p).map(|rest| (i, rest)))?;
    let digits = rest.as_bytes();
    // 26 digits of 5 bits hold 130: the first may use only 3 of its 5.
    if digits.len() != ULID_LEN || digits[0] > b'7' {
        return None;
    }
    let (mut value, mut bad) = (0u128, 0);
    for d in digits {
        let v = CROCKFORD[*d as usize];
        bad |= v;
        value = (value << 5) | u128::from(v & 0x1f);
    }
    (bad & BAD == 0).then(|| (prefix as u8, Bytes(value.to_be_bytes())))
}

/// The compact form of `s`, if it has one.
fn compact(s: &str) -> Option<Packed<'static>> {
    match s.len() {
        64 => from_lower_hex(s).map(Packed::Hex32),
        32 => from_lower_hex(s).map(Packed::Hex16),
        _ => ulid(s).map(|(p, b)| Packed::Ulid(p, b)),
    }
}

/// Packs `s` on its own: its compact form or its text.
pub(crate) fn pack(s: &str) -> Packed<'_> {
    compact(s).unwrap_or(Packed::Text(Cow::Borrowed(s)))
}

/// Packs the strings of one block, writing each text that repeats once
/// into a table.
#[derive(Default)]
pub(crate) struct Interner<'a> {
    table: Vec<Cow<'a, str>>,
    /// Short keys, hashed per receipt field: Fx, not SipHash (a block
    /// comes from the node's own engines, not from a client).
    index: FxHashMap<&'a str, u32>,
}

impl<'a> Interner<'a> {
    /// Packs a text that is likely to repeat in the block (a tenant, a
    /// kind): its compact form, or a reference to its entry in the table.
    pub(crate) fn pack(&mut self, s: &'a str) -> Packed<'a> {
        if let Some(p) = compact(s) {
            return p;
        }
        let next = self.table.len() as u32;
        let i = *self.index.entry(s).or_insert(next);
        if i == next {
            self.table.push(Cow::Borrowed(s));
        }
        Packed::Ref(i)
    }

    pub(crate) fn into_table(self) -> Vec<Cow<'a, str>> {
        self.table
    }
}

/// The string `p` was packed from; `table` is its block's table (empty
/// for a value packed on its own).
pub(crate) fn unpack(p: Packed<'_>, table: &[Cow<'_, str>]) -> Result<String, String> {
    Ok(match p {
        Packed::Text(s) => s.into_owned(),
        Packed::Ref(i) => table
            .get(i as usize)
            .ok_or_else(|| format!("text {i} is not in the block's table of {}", table.len()))?
            .to_string(),
        Packed::Ulid(prefix, Bytes(bytes)) => {
            let prefix = ULID_PREFIXES
                .get(prefix as usize)
                .ok_or_else(|| format!("unknown id prefix {prefix}"))?;
            let mut buf = [0u8; ULID_LEN];
            let id = ulid::Ulid::from_bytes(bytes);
            let mut out = String::with_capacity(prefix.len() + ULID_LEN);
            out.push_str(prefix);
            out.push_str(id.array_to_str(&mut buf));
            out
        }
        Packed::Hex16(Bytes(b)) => lower_hex(&b),
        Packed::Hex32(Bytes(b)) => lower_hex(&b),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_form_unpacks_to_exactly_what_was_packed() {
        let id = ulid::Ulid::new().to_string();
        let cases = [
            (format!("rcpt_{id}"), "Ulid"),
            (format!("act_{id}"), "Ulid"),
            (id.clone(), "Ulid"),
            ("4bf92f3577b34da6a3ce929d0e0e4736".into(), "Hex16"),
            ("ab".repeat(32), "Hex32"),
            ("0".repeat(64), "Hex32"),
            // Not canonical, so kept as text: each would come back different.
            (id.to_lowercase(), "Text"),
            (format!("rcpt_{}", id.to_lowercase()), "Text"),
            ("AB".repeat(32), "Text"),
            ("ab".repeat(31), "Text"),
            (format!("tx_{id}"), "Text"),
            ("payment".into(), "Text"),
            (String::new(), "Text"),
            ("zz".repeat(16), "Text"),
            (format!("{}g", "a".repeat(63)), "Text"),
            ("7ZZZZZZZZZZZZZZZZZZZZZZZZZ".into(), "Ulid"),
            // Past 128 bits, and letters canonical text never uses.
            (format!("8{}", "0".repeat(25)), "Text"),
            (format!("{}U", "0".repeat(25)), "Text"),
            (format!("act_{}I", "0".repeat(25)), "Text"),
        ];
        for (s, form) in &cases {
            let p = pack(s);
            let name = format!("{p:?}");
            assert!(name.starts_with(form), "{s:?} packed as {name}");
            assert_eq!(&unpack(p, &[]).unwrap(), s);
        }
        let mut block = Interner::default();
        let packed: Vec<Packed<'_>> = cases.iter().map(|(s, _)| block.pack(s)).collect();
        let again = block.pack("payment");
        let table = block.into_table();
        assert_eq!(again, Packed::Ref(5), "a repeated text refers to its entry");
        assert_eq!(table.len(), 12, "each text once: {table:?}");
        for (p, (s, _)) in packed.into_iter().zip(&cases) {
            assert_eq!(&unpack(p, &table).unwrap(), s);
        }
        assert!(unpack(Packed::Ref(12), &table).is_err());
        assert!(unpack(Packed::Ulid(9, Bytes([0; 16])), &[]).is_err());
    }
}

//! The node's own records: `m/` and a name ([`crate::Store::put_meta`]).
//! Each has one writer, which reads it back leniently: a record that does
//! not read is logged and the node goes on without it (what that costs is
//! [`crate::check`]'s to say). The names and the readers are here, so that
//! the writers and `tai store check` agree on them. The store's own two,
//! `m/head` (the ledger's signed head) and `m/node_starts` (the count of
//! starts, read with [`read_u64`]), are written by [`crate::Store`] itself.

/// The queue backend the data dir last ran on: `embedded` or `amqp:{queue}`.
pub const KANBAN_BACKEND: &str = "kanban_backend";
/// Where the amqp backend's delivery seqs began at its last start
/// ([`SeqBase`]).
pub const AMQP_SEQ_BASE: &str = "amqp_seq_base";
/// The saved Kaizen baseline (a JSON object).
pub const KAIZEN_BASELINE: &str = "kaizen_baseline";
/// A webhook executor's circuit breaker, `breaker/{executor}` (JSON).
pub const BREAKER: &str = "breaker/";
/// A key that signed some of the ledger's receipts, `ledger_key/{key_id}`
/// (no value).
pub const LEDGER_KEY: &str = "ledger_key/";

/// The key of the record `name`: `m/` and the name.
pub(crate) fn key(name: &str) -> Vec<u8> {
    let mut k = b"m/".to_vec();
    k.extend_from_slice(name.as_bytes());
    k
}

/// A u64 record: 8 bytes, big-endian.
pub fn read_u64(bytes: &[u8]) -> Result<u64, String> {
    <[u8; 8]>::try_from(bytes)
        .map(u64::from_be_bytes)
        .map_err(|_| format!("{} bytes where a count takes 8", bytes.len()))
}

/// The backend record: `embedded` or `amqp:` and a queue's name.
pub fn read_backend(bytes: &[u8]) -> Result<&str, String> {
    let text = std::str::from_utf8(bytes).map_err(|e| format!("not UTF-8: {e}"))?;
    match text.strip_prefix("amqp:") {
        Some(queue) if !queue.is_empty() => Ok(text),
        None if text == "embedded" => Ok(text),
        _ => Err(format!(
            "{text:?} is neither `embedded` nor `amqp:` and a queue's name"
        )),
    }
}

/// Where a start of the amqp backend began numbering its deliveries, and
/// when (ms since the epoch; `None` in a record of an older node, which
/// kept the base alone).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqBase {
    pub base: u64,
    pub at_ms: Option<u64>,
}

impl SeqBase {
    /// Deliveries a start may number per millisecond of its life, at most
    /// (~10,000 times what a node delivers): a start's range begins at the
    /// clock (ms) times this.
    pub const PER_MS: u64 = 1 << 20;
    /// A start begins at least this far past the last one's base: what a
    /// node numbers in ~12 hours of deliveries at 100,000/s, for a clock
    /// set back while the last start ran.
    pub const FLOOR: u64 = 1 << 32;
    /// How far past the last base a start begins when the clock cannot
    /// bound what the last start numbered (it stands before the last
    /// start's time, or the record does not say when).
    pub const STEP: u64 = 1 << 40;

    /// The record: `base` then `at_ms`, 8 bytes each, big-endian.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = self.base.to_be_bytes().to_vec();
        out.extend_from_slice(&self.at_ms.unwrap_or(0).to_be_bytes());
        out
    }

    /// A record as [`SeqBase::encode`] writes it, or an older node's
    /// (the base alone).
    pub fn decode(bytes: &[u8]) -> Result<SeqBase, String> {
        match bytes.len() {
            8 => Ok(SeqBase {
                base: read_u64(bytes)?,
                at_ms: None,
            }),
            16 => Ok(SeqBase {
                base: read_u64(&bytes[..8])?,
                at_ms: Some(read_u64(&bytes[8..])?),
            }),
            n => Err(format!("{n} bytes where a seq base takes 8 or 16")),
        }
    }

    /// Where a start at `now_ms` begins, after the last start's record
    /// (`None`: no record, or one that did not read).
    ///
    /// Seqs must not repeat across starts: an engine's checkpoint names
    /// the seq of an action in flight, and acknowledges it when it starts
    /// again. The last start, begun at `at_ms`, numbered fewer than
    /// [`SeqBase::PER_MS`] deliveries a millisecond, so the new range
    /// begins that much past its base for each ms the clock moved since
    /// (at least [`SeqBase::FLOOR`], at least the clock times `PER_MS`);
    /// [`SeqBase::STEP`] past it where the clock stands before `at_ms` or
    /// the record has no time. With no record it begins at the clock times
    /// `PER_MS`, past every earlier start's range unless the clock was set
    /// back since or starts came seconds apart (the floor put them ahead
    /// of the clock, by at most `FLOOR` each: billions of deliveries).
    pub fn next(last: Option<SeqBase>, now_ms: u64) -> Result<SeqBase, String> {
        let exhausted = || "the amqp delivery seqs are exhausted (past 2^64)".to_string();
        let clock = now_ms.checked_mul(Self::PER_MS).ok_or_else(exhausted)?;
        let past = match last {
            None => 0,
            Some(SeqBase {
                base,
                at_ms: Some(at),
            }) if now_ms > at => base
                .checked_add(((now_ms - at).saturating_mul(Self::PER_MS)).max(Self::FLOOR))
                .ok_or_else(exhausted)?,
            Some(SeqBase { base, .. }) => base.checked_add(Self::STEP).ok_or_else(exhausted)?,
        };
        Ok(SeqBase {
            base: past.max(clock),
            at_ms: Some(now_ms),
        })
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// The most a node delivers a millisecond, with room: ~200,000/s.
    const RATE: u64 = 200;

    proptest! {
        /// Starts whose lives last from nothing to a day, the clock set
        /// back now and then by up to an hour (while a start runs), never
        /// begin inside the last start's range, and so inside no earlier
        /// one's (each begins past its predecessor's end).
        #[test]
        fn a_start_begins_past_what_the_last_one_numbered(
            lives in prop::collection::vec((0u64..86_400_000, 0u8..3, 0u64..3_600_000), 1..40),
        ) {
            let mut real: u64 = 0;
            let mut offset: u64 = 1_764_000_000_000;
            let mut last: Option<(SeqBase, u64)> = None;
            for (life, how, k) in lives {
                // Not set back; set back by up to an hour; or set back by
                // nearly all of the life (up to an hour), so that the
                // clock barely moved across it.
                let set_back = match how {
                    0 => 0,
                    1 => k,
                    _ => life.min(3_600_000).saturating_sub(k % 1_000),
                };
                let start = SeqBase::next(last.map(|(s, _)| s), real + offset).unwrap();
                if let Some((prev, began)) = last {
                    let used = (real - began) * RATE;
                    prop_assert!(
                        start.base >= prev.base + used,
                        "{start:?} inside {prev:?} + {used}"
                    );
                }
                last = Some((SeqBase::decode(&start.encode()).unwrap(), real));
                real += life;
                offset -= set_back;
            }
        }
    }

    #[test]
    fn without_a_record_a_start_begins_at_the_clock() {
        let now = 1_764_000_000_000;
        let first = SeqBase::next(None, now).unwrap();
        assert_eq!(
            first,
            SeqBase {
                base: now * SeqBase::PER_MS,
                at_ms: Some(now)
            }
        );
        // A start a second later, its record lost: past what the first
        // numbered in that second.
        let later = SeqBase::next(None, now + 1_000).unwrap();
        assert!(later.base >= first.base + 1_000 * RATE);
        // With the record, a quick restart goes at least FLOOR past it.
        let quick = SeqBase::next(Some(first), now + 1).unwrap();
        assert_eq!(quick.base, first.base + SeqBase::FLOOR);
        // An older node's record (the base alone, a few 2^40): the clock
        // is past it.
        let old = SeqBase::decode(&(3u64 << 40).to_be_bytes()).unwrap();
        assert_eq!(old.at_ms, None);
        assert_eq!(SeqBase::next(Some(old), now).unwrap().base, first.base);
        // A record ahead of the clock (set back since): STEP past it.
        assert_eq!(
            SeqBase::next(Some(first), now - 60_000).unwrap().base,
            first.base + SeqBase::STEP
        );
    }

    #[test]
    fn damaged_records_are_named() {
        assert_eq!(read_u64(&7u64.to_be_bytes()), Ok(7));
        assert!(read_u64(b"abc").unwrap_err().contains("3 bytes"));
        assert!(SeqBase::decode(b"abc").unwrap_err().contains("3 bytes"));
        assert_eq!(read_backend(b"embedded"), Ok("embedded"));
        assert_eq!(read_backend(b"amqp:tai.signals"), Ok("amqp:tai.signals"));
        for bad in [&b"amqp:"[..], b"sled", b"\xff"] {
            assert!(read_backend(bad).is_err(), "{bad:?}");
        }
        let past = SeqBase {
            base: u64::MAX - 1,
            at_ms: None,
        };
        assert!(SeqBase::next(Some(past), 1)
            .unwrap_err()
            .contains("exhausted"));
    }
}

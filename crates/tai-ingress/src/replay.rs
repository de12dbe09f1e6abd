//! Signatures seen inside the replay window, in bounded memory.
//!
//! A signature covers its request's timestamp, and ingress refuses a
//! timestamp more than a window away from now, so a replay can only carry
//! the timestamp of the original. Entries are kept in one bucket per minute
//! of their request's timestamp: a look-up reads that one bucket, and a
//! bucket goes once every timestamp in its minute has left the window (the
//! requests it holds can no longer be presented). Past `max_entries` the
//! oldest bucket goes early: memory stays bounded; under such a flood the
//! oldest signatures lose replay protection before their time, which is
//! logged.

use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, HashSet};
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};

/// The entries are already keyed hashes (`RandomState`), so the sets use
/// them as they are instead of hashing them again.
#[derive(Default)]
struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type Entries = HashSet<u64, BuildHasherDefault<Prehashed>>;

pub struct ReplayCache {
    hasher: RandomState,
    /// By the minute (its first second) of the requests' timestamps.
    buckets: BTreeMap<u64, Entries>,
    window_secs: u64,
    max_entries: usize,
    len: usize,
}

impl ReplayCache {
    pub fn new(window_secs: u64, max_entries: usize) -> Self {
        ReplayCache {
            hasher: RandomState::new(),
            buckets: BTreeMap::new(),
            window_secs,
            max_entries: max_entries.max(1),
            len: 0,
        }
    }

    /// Drops the minutes out of the window.
    fn expire(&mut self, now_secs: u64) {
        while let Some((&start, set)) = self.buckets.first_key_value() {
            // Its latest timestamp, start + 59, is out of the window.
            if start + 60 + self.window_secs > now_secs {
                break;
            }
            self.len -= set.len();
            self.buckets.pop_first();
        }
    }

    /// Drops the oldest minutes, still in the window, until there is room.
    fn make_room(&mut self) {
        while self.len >= self.max_entries {
            let Some((_, set)) = self.buckets.pop_first() else {
                return;
            };
            self.len -= set.len();
            tracing::warn!(
                entries = self.len,
                dropped = set.len(),
                "replay cache full, dropping its oldest minute early (its signatures could be replayed: raise ingress.replay_cache_max_entries)"
            );
        }
    }

    /// Records (tenant, signature) of a request timestamped `ts_secs`
    /// (already checked to be inside the window); false if it was already
    /// seen. A full cache is made room in only for a signature it does not
    /// hold, so a replay is refused even then.
    pub fn check_and_insert(
        &mut self,
        tenant: &str,
        signature: &str,
        ts_secs: u64,
        now_secs: u64,
    ) -> bool {
        self.expire(now_secs);
        let h = self.hasher.hash_one((tenant, signature));
        let minute = ts_secs / 60 * 60;
        if self.len >= self.max_entries {
            // Only a full cache looks before it inserts: making room first
            // could drop the very signature being replayed.
            if self
                .buckets
                .get(&minute)
                .is_some_and(|set| set.contains(&h))
            {
                return false;
            }
            self.make_room();
        }
        if !self.buckets.entry(minute).or_default().insert(h) {
            return false;
        }
        self.len += 1;
        true
    }

    /// Forgets a signature whose request was not accepted after all, so a retry is not a replay.
    pub fn remove(&mut self, tenant: &str, signature: &str, ts_secs: u64) {
        let h = self.hasher.hash_one((tenant, signature));
        if let Some(set) = self.buckets.get_mut(&(ts_secs / 60 * 60)) {
            if set.remove(&h) {
                self.len -= 1;
            }
        }
    }

    /// The bound on signatures held.
    pub fn max_entries(&self) -> usize {
        self.max_entries
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_is_refused_twice_within_the_window_and_forgotten_after() {
        let mut c = ReplayCache::new(300, 1000);
        assert!(c.check_and_insert("a", "s1", 1000, 1000));
        assert!(!c.check_and_insert("a", "s1", 1000, 1200), "a replay");
        assert!(
            !c.check_and_insert("a", "s1", 1000, 1000 + 300),
            "at the window's edge"
        );
        assert!(c.check_and_insert("b", "s1", 1000, 1200), "per tenant");
        assert!(c.check_and_insert("a", "s2", 1000, 1200));
        c.remove("a", "s2", 1000);
        assert!(c.check_and_insert("a", "s2", 1000, 1200), "forgotten");
        assert_eq!(c.len(), 3);
        // The minute of 1000 (960..1019) is out of the window from 1320 on:
        // its requests are refused as stale before they get here.
        assert!(!c.check_and_insert("a", "s1", 1000, 1319));
        assert!(c.check_and_insert("a", "s3", 1400, 1320));
        assert_eq!(c.len(), 1, "the minute of 1000 went");
        assert!(c.check_and_insert("a", "s1", 1000, 1320));
    }

    #[test]
    fn a_timestamp_ahead_of_the_clock_is_kept_until_it_leaves_the_window() {
        let mut c = ReplayCache::new(300, 1000);
        assert!(c.check_and_insert("a", "s1", 1290, 1000), "290 s early");
        assert!(c.check_and_insert("a", "s2", 1000, 1000));
        assert!(!c.check_and_insert("a", "s1", 1290, 1500), "a replay");
        assert_eq!(c.len(), 1, "the minute of 1000 went, the early one stays");
        assert!(!c.check_and_insert("a", "s1", 1290, 1619));
        assert!(
            c.check_and_insert("a", "s1", 1290, 1620),
            "its minute left the window"
        );
    }

    #[test]
    fn memory_is_bounded() {
        let mut c = ReplayCache::new(300, 100);
        for i in 0..1000u64 {
            c.check_and_insert("t", &i.to_string(), 1000 + i, 1000 + i);
        }
        assert!(c.len() <= 100, "{}", c.len());
    }

    #[test]
    fn a_full_cache_still_refuses_what_it_holds() {
        let mut c = ReplayCache::new(300, 2);
        assert!(c.check_and_insert("a", "s1", 1000, 1000));
        assert!(c.check_and_insert("a", "s2", 1000, 1000));
        // Full: a replay is refused, not let in by making room for it.
        assert!(!c.check_and_insert("a", "s1", 1000, 1000));
        assert!(!c.check_and_insert("a", "s2", 1000, 1000));
        assert_eq!(c.len(), 2);
        // A new signature (minute 1080) drops the oldest minute (960: s1 and s2).
        assert!(c.check_and_insert("a", "s3", 1090, 1090));
        assert_eq!(c.len(), 1);
        assert!(c.check_and_insert("a", "s1", 1000, 1090), "dropped early");
    }

    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        /// A request of tenant `a` or `b`, its signature numbered `sig`,
        /// timestamped `skew` seconds from now (inside the window, as
        /// ingress checks first). A signature covers its timestamp, so the
        /// same signature always comes with the same one.
        Check { tenant: bool, sig: u8, skew: i64 },
        /// A request seen before, again.
        Replay(prop::sample::Index),
        /// One seen before, not accepted after all.
        Remove(prop::sample::Index),
        /// The clock moves on.
        Advance(u64),
    }

    const WINDOW: u64 = 300;

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (any::<bool>(), 0..6u8, -(WINDOW as i64)..=WINDOW as i64)
                .prop_map(|(tenant, sig, skew)| Op::Check { tenant, sig, skew }),
            3 => any::<prop::sample::Index>().prop_map(Op::Replay),
            1 => any::<prop::sample::Index>().prop_map(Op::Remove),
            2 => (0..200u64).prop_map(Op::Advance),
        ]
    }

    proptest! {
        /// Against a plain list of what was let in: a request is let in
        /// once, refused again while it can still be presented (its
        /// timestamp inside the window), let in again once it could not
        /// be, or once it was forgotten. With a small bound, what is new
        /// is still always let in, and the bound holds.
        #[test]
        fn a_request_is_let_in_once_while_it_can_be_presented(
            ops in prop::collection::vec(op(), 1..150),
            bounded in any::<bool>(),
        ) {
            let max = if bounded { 5 } else { 100_000 };
            let mut c = ReplayCache::new(WINDOW, max);
            let mut now = 10_000u64;
            // (tenant, signature, timestamp) of what was let in, and
            // whether it is held still (not removed).
            let mut seen: Vec<(String, String, u64, bool)> = Vec::new();
            for op in ops {
                let (tenant, sig, ts) = match op {
                    Op::Advance(dt) => {
                        now += dt;
                        continue;
                    }
                    Op::Remove(i) => {
                        if !seen.is_empty() {
                            let s = i.get(&seen).clone();
                            c.remove(&s.0, &s.1, s.2);
                            for x in seen.iter_mut().filter(|x| (&x.0, &x.1) == (&s.0, &s.1)) {
                                x.3 = false;
                            }
                        }
                        continue;
                    }
                    Op::Check { tenant, sig, skew } => {
                        let ts = now.saturating_add_signed(skew);
                        let t = if tenant { "a" } else { "b" };
                        (t.to_string(), format!("s{sig}@{ts}"), ts)
                    }
                    Op::Replay(i) => {
                        if seen.is_empty() {
                            continue;
                        }
                        let s = i.get(&seen).clone();
                        (s.0, s.1, s.2)
                    }
                };
                if ts.abs_diff(now) > WINDOW {
                    // Refused as stale before the cache is asked.
                    continue;
                }
                let held = seen.iter().any(|x| x.0 == tenant && x.1 == sig && x.3);
                let let_in = c.check_and_insert(&tenant, &sig, ts, now);
                if !held {
                    prop_assert!(let_in, "a new request refused: {} {} at {}", tenant, sig, now);
                } else if !bounded {
                    prop_assert!(!let_in, "a replay let in: {} {} at {}", tenant, sig, now);
                }
                if let_in {
                    seen.retain(|x| !(x.0 == tenant && x.1 == sig));
                    seen.push((tenant, sig, ts, true));
                }
                prop_assert!(c.len() <= max);
                // Only what can still be presented is held: a request
                // whose timestamp's minute left the window has gone.
                for x in seen.iter_mut() {
                    if x.2 / 60 * 60 + 60 + WINDOW <= now {
                        x.3 = false;
                    }
                }
                if !bounded {
                    prop_assert_eq!(c.len(), seen.iter().filter(|x| x.3).count());
                }
            }
        }
    }
}

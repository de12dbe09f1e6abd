//! Signatures seen inside the replay window, in bounded memory.
//!
//! Entries live in one bucket per minute of arrival and expire with their
//! bucket, after twice the window (a timestamp may be up to a window early or
//! late). Past `max_entries` the oldest bucket goes early: memory stays
//! bounded; under such a flood the oldest signatures lose replay protection
//! before their time, which is logged.

use std::collections::hash_map::RandomState;
use std::collections::{HashSet, VecDeque};
use std::hash::BuildHasher;

pub struct ReplayCache {
    hasher: RandomState,
    buckets: VecDeque<(u64, HashSet<u64>)>,
    keep_secs: u64,
    max_entries: usize,
    len: usize,
}

impl ReplayCache {
    pub fn new(window_secs: u64, max_entries: usize) -> Self {
        ReplayCache {
            hasher: RandomState::new(),
            buckets: VecDeque::new(),
            keep_secs: window_secs * 2 + 60,
            max_entries: max_entries.max(1),
            len: 0,
        }
    }

    fn expire(&mut self, now_secs: u64) {
        while let Some((start, set)) = self.buckets.front() {
            if now_secs.saturating_sub(*start) > self.keep_secs || self.len >= self.max_entries {
                if self.len >= self.max_entries && now_secs.saturating_sub(*start) <= self.keep_secs
                {
                    tracing::warn!(
                        entries = self.len,
                        "replay cache full, dropping its oldest minute early"
                    );
                }
                self.len -= set.len();
                self.buckets.pop_front();
            } else {
                break;
            }
        }
    }

    /// Records (tenant, signature); false if it was already seen.
    pub fn check_and_insert(&mut self, tenant: &str, signature: &str, now_secs: u64) -> bool {
        self.expire(now_secs);
        let h = self.hasher.hash_one((tenant, signature));
        if self.buckets.iter().any(|(_, s)| s.contains(&h)) {
            return false;
        }
        let minute = now_secs / 60 * 60;
        match self.buckets.back_mut() {
            Some((start, set)) if *start == minute => {
                set.insert(h);
            }
            _ => self.buckets.push_back((minute, HashSet::from([h]))),
        }
        self.len += 1;
        true
    }

    /// Forgets a signature whose request was not accepted after all, so a retry is not a replay.
    pub fn remove(&mut self, tenant: &str, signature: &str) {
        let h = self.hasher.hash_one((tenant, signature));
        for (_, s) in self.buckets.iter_mut() {
            if s.remove(&h) {
                self.len -= 1;
                return;
            }
        }
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
        assert!(c.check_and_insert("a", "s1", 1000));
        assert!(!c.check_and_insert("a", "s1", 1200));
        assert!(c.check_and_insert("b", "s1", 1200), "per tenant");
        assert!(
            c.check_and_insert("a", "s1", 1000 + 2 * 300 + 121),
            "expired"
        );
        c.remove("a", "s1");
        assert!(c.check_and_insert("a", "s1", 1000 + 2 * 300 + 121));
    }

    #[test]
    fn memory_is_bounded() {
        let mut c = ReplayCache::new(300, 100);
        for i in 0..1000u64 {
            c.check_and_insert("t", &i.to_string(), 1000 + i);
        }
        assert!(c.len() <= 100, "{}", c.len());
    }
}

//! Passivated engines with a transition due that no signal brings: a state
//! timeout (boot's entitlement wait, `quota_exhausted`'s refill) or the
//! close of the breaker that halted them. A live engine sees to these
//! itself (its state timer, `RouterMsg::BreakerChanged`); a passive one has
//! no timer and hears no breaker, so `engine_router` keeps what each waits
//! for here and starts it when that comes, and its start records the
//! transition (`quota_refilled`, `bootstrap_timeout`, `jidoka_resume`) when
//! it happens rather than at a next signal that may never come.
//!
//! Only engines that wait for something are kept, so its size follows the
//! exhausted, booting and breaker-halted engines, not every engine.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use tai_core::names::engine_name;

/// What a passive engine waits for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Until {
    /// Its state timeout is due then (ms, on the caller's clock).
    Time(u64),
    /// The breaker that halted it is open; it resumes once it is not.
    Breaker(String),
}

/// One engine's wait costs its name once, shared by the maps that hold it;
/// the name gives the tenant and the SKU (neither may hold a `:`).
#[derive(Debug, Default)]
pub struct Wakes {
    /// By engine name.
    of: HashMap<Arc<str>, Until>,
    /// (due ms, engine name), soonest first.
    due: BTreeSet<(u64, Arc<str>)>,
    /// Breaker → the engines it holds halted.
    held: HashMap<String, HashSet<Arc<str>>>,
}

impl Wakes {
    /// Records what a passive engine waits for (replacing what it waited for).
    pub fn sleep(&mut self, tenant_id: &str, sku_id: &str, until: Until) {
        let name: Arc<str> = engine_name(tenant_id, sku_id).into();
        self.forget(&name);
        match &until {
            Until::Time(at) => {
                self.due.insert((*at, name.clone()));
            }
            Until::Breaker(b) => {
                self.held.entry(b.clone()).or_default().insert(name.clone());
            }
        }
        self.of.insert(name, until);
    }

    /// The engine started: it sees to its own transitions from now on.
    pub fn forget(&mut self, name: &str) {
        let Some((name, until)) = self.of.remove_entry(name) else {
            return;
        };
        match until {
            Until::Time(at) => {
                self.due.remove(&(at, name));
            }
            Until::Breaker(b) => {
                if let Some(set) = self.held.get_mut(&b) {
                    set.remove(&name);
                    if set.is_empty() {
                        self.held.remove(&b);
                    }
                }
            }
        }
    }

    /// The breaker is no longer open: the engines it held are due `now`.
    pub fn breaker_closed(&mut self, breaker: &str, now: u64) {
        for name in self.held.remove(breaker).unwrap_or_default() {
            if let Some(until) = self.of.get_mut(&name) {
                *until = Until::Time(now);
                self.due.insert((now, name));
            }
        }
    }

    /// At most `max` engines (tenant, SKU) due by `now`, soonest first,
    /// forgotten here: the caller starts them.
    pub fn take_due(&mut self, now: u64, max: usize) -> Vec<(String, String)> {
        let mut taken = Vec::new();
        while taken.len() < max {
            let Some((at, _)) = self.due.first() else {
                break;
            };
            if *at > now {
                break;
            }
            let (_, name) = self.due.pop_first().expect("a first entry");
            if self.of.remove(&name).is_some() {
                taken.push(tenant_and_sku(&name));
            }
        }
        taken
    }

    /// How many passive engines wait for something.
    pub fn len(&self) -> usize {
        self.of.len()
    }
}

/// `engine:{tenant}:{sku}` → (tenant, SKU).
pub(crate) fn tenant_and_sku(name: &str) -> (String, String) {
    let rest = name.strip_prefix("engine:").unwrap_or(name);
    let (tenant, sku) = rest.split_once(':').unwrap_or((rest, ""));
    (tenant.to_string(), sku.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(t: &str, s: &str) -> (String, String) {
        (t.to_string(), s.to_string())
    }

    #[test]
    fn the_engine_name_gives_back_its_tenant_and_sku() {
        let mut w = Wakes::default();
        w.sleep("acme.eu-1", "pay_v2", Until::Time(5));
        assert_eq!(w.take_due(5, 10), vec![pair("acme.eu-1", "pay_v2")]);
    }

    #[test]
    fn engines_come_due_soonest_first_a_batch_at_a_time() {
        let mut w = Wakes::default();
        w.sleep("b", "pay", Until::Time(300));
        w.sleep("a", "pay", Until::Time(100));
        w.sleep("c", "pay", Until::Time(200));
        w.sleep("d", "pay", Until::Time(900));
        assert!(w.take_due(99, 10).is_empty());
        assert_eq!(w.take_due(500, 2), vec![pair("a", "pay"), pair("c", "pay")]);
        assert_eq!(w.take_due(500, 2), vec![pair("b", "pay")]);
        assert_eq!(w.len(), 1);
        assert_eq!(w.take_due(u64::MAX, 10), vec![pair("d", "pay")]);
        assert_eq!(w.len(), 0);
    }

    #[test]
    fn a_new_wait_replaces_the_old_and_a_started_engine_is_forgotten() {
        let mut w = Wakes::default();
        w.sleep("a", "pay", Until::Time(100));
        w.sleep("a", "pay", Until::Time(700));
        assert!(w.take_due(500, 10).is_empty(), "the first wait is gone");
        w.sleep("a", "pay", Until::Breaker("gw".into()));
        assert!(w.take_due(u64::MAX, 10).is_empty(), "held by a breaker now");
        w.forget(&engine_name("a", "pay"));
        w.breaker_closed("gw", 1);
        assert!(w.take_due(u64::MAX, 10).is_empty());
        assert_eq!((w.len(), w.held.len()), (0, 0));
    }

    #[test]
    fn a_breaker_that_closes_makes_due_only_the_engines_it_held() {
        let mut w = Wakes::default();
        w.sleep("a", "pay", Until::Breaker("gw".into()));
        w.sleep("b", "pay", Until::Breaker("gw".into()));
        w.sleep("c", "pay", Until::Breaker("other".into()));
        w.sleep("d", "pay", Until::Time(1_000));
        w.breaker_closed("gw", 50);
        let mut woken = w.take_due(60, 10);
        woken.sort();
        assert_eq!(woken, vec![pair("a", "pay"), pair("b", "pay")]);
        w.breaker_closed("gw", 70);
        assert!(w.take_due(70, 10).is_empty(), "gw holds none any more");
        assert_eq!(w.len(), 2);
        w.breaker_closed("other", 80);
        assert_eq!(w.take_due(80, 10), vec![pair("c", "pay")]);
    }
}

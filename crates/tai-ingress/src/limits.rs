//! Rate limits (GCRA, the `governor` crate): one global limiter, and per
//! tenant limiters by tier, each with a burst of one second's worth. Idle
//! tenants' state is evicted by `retain_recent`, which only drops keys whose
//! bucket is indistinguishable from a fresh one: an active tenant's bucket is
//! never reset.

use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};
use tai_core::config::{RateLimits, Tier};

pub struct Limits {
    clock: DefaultClock,
    global: DefaultDirectRateLimiter,
    trial: DefaultKeyedRateLimiter<String>,
    standard: DefaultKeyedRateLimiter<String>,
    enterprise: DefaultKeyedRateLimiter<String>,
}

/// Which limit refused the request, and when to retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limited {
    pub scope: &'static str,
    pub retry_after_secs: u64,
}

fn quota(per_sec: u32) -> Quota {
    let n = NonZeroU32::new(per_sec.max(1)).expect("at least 1");
    Quota::per_second(n).allow_burst(n)
}

impl Limits {
    pub fn new(c: &RateLimits) -> Self {
        Limits {
            clock: DefaultClock::default(),
            global: RateLimiter::direct(quota(c.global_per_sec)),
            trial: RateLimiter::keyed(quota(c.trial_per_sec)),
            standard: RateLimiter::keyed(quota(c.standard_per_sec)),
            enterprise: RateLimiter::keyed(quota(c.enterprise_per_sec)),
        }
    }

    fn retry(&self, wait: Duration) -> u64 {
        // Retry-After is whole seconds; never tell a client 0.
        wait.as_secs() + u64::from(wait.subsec_nanos() > 0).max(u64::from(wait.as_secs() == 0))
    }

    pub fn check(&self, tenant: &str, tier: Tier) -> Result<(), Limited> {
        let keyed = match tier {
            Tier::Trial => &self.trial,
            Tier::Standard => &self.standard,
            Tier::Enterprise => &self.enterprise,
        };
        let key = tenant.to_string();
        if let Err(not_until) = keyed.check_key(&key) {
            return Err(Limited {
                scope: "tenant",
                retry_after_secs: self.retry(not_until.wait_time_from(self.clock.now())),
            });
        }
        if let Err(not_until) = self.global.check() {
            return Err(Limited {
                scope: "global",
                retry_after_secs: self.retry(not_until.wait_time_from(self.clock.now())),
            });
        }
        Ok(())
    }

    /// Forgets tenants whose buckets are full again.
    pub fn evict_idle(&self) {
        for l in [&self.trial, &self.standard, &self.enterprise] {
            l.retain_recent();
            l.shrink_to_fit();
        }
    }

    pub fn tracked_tenants(&self) -> usize {
        self.trial.len() + self.standard.len() + self.enterprise.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tier_allows_its_burst_then_says_when_to_retry() {
        let l = Limits::new(&RateLimits {
            global_per_sec: 1000,
            trial_per_sec: 3,
            standard_per_sec: 100,
            enterprise_per_sec: 1000,
        });
        for _ in 0..3 {
            l.check("t", Tier::Trial).unwrap();
        }
        let refused = l.check("t", Tier::Trial).unwrap_err();
        assert_eq!(refused.scope, "tenant");
        // Each scope is one `/metrics` has at 0 from the start.
        assert!(tai_core::telemetry::RATE_LIMIT_SCOPES.contains(&refused.scope));
        assert!(refused.retry_after_secs >= 1);
        l.check("u", Tier::Trial)
            .expect("another tenant has its own bucket");
        l.check("t", Tier::Standard).expect("tiers are separate");
    }

    #[test]
    fn the_global_limit_covers_all_tenants() {
        let l = Limits::new(&RateLimits {
            global_per_sec: 2,
            trial_per_sec: 100,
            standard_per_sec: 100,
            enterprise_per_sec: 100,
        });
        l.check("a", Tier::Standard).unwrap();
        l.check("b", Tier::Standard).unwrap();
        let refused = l.check("c", Tier::Standard).unwrap_err();
        assert_eq!(refused.scope, "global");
        assert!(tai_core::telemetry::RATE_LIMIT_SCOPES.contains(&refused.scope));
        assert!(l.tracked_tenants() >= 3);
    }
}

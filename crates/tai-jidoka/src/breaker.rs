//! One circuit breaker (SPEC §6) as plain data and pure transitions: time is
//! passed in, nothing is read from a clock, so every rule is table-tested.
//!
//! closed → open after `failure_threshold` consecutive failures, or when the
//! failure rate over the last `window` calls reaches `failure_rate_pct`
//! (once `minimum_calls` are in the window); a call slower than `slow_call_ms`
//! counts as a failure. open → half_open after the open time, which doubles
//! on each trip without a full close (capped). half_open admits one probe
//! at a time under a lease that expires, so a lost probe never leaves the
//! breaker stuck; `success_threshold` successes close it, a failure opens it
//! again. An operator can melt it (open until reset) and reset it (closed).

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};
use tai_core::config::ExecutorConfig;
pub use tai_core::signal::BreakerState;

#[derive(Debug, Clone, PartialEq)]
pub struct BreakerConfig {
    pub failure_threshold: u32,
    pub success_threshold: u32,
    pub reset_timeout_ms: u64,
    pub max_reset_timeout_ms: u64,
    pub failure_rate_pct: Option<u32>,
    pub window: u32,
    pub minimum_calls: u32,
    pub slow_call_ms: Option<u64>,
    pub probe_lease_ms: u64,
}

impl BreakerConfig {
    pub fn from_executor(c: &ExecutorConfig) -> Self {
        let reset = c.reset_timeout_secs.saturating_mul(1000).max(1);
        BreakerConfig {
            failure_threshold: c.failure_threshold.max(1),
            success_threshold: c.success_threshold.max(1),
            reset_timeout_ms: reset,
            max_reset_timeout_ms: c
                .max_reset_timeout_secs
                .map_or(reset.saturating_mul(16), |s| s.saturating_mul(1000))
                .max(reset),
            failure_rate_pct: c.failure_rate_pct,
            window: c.window_calls.max(1),
            minimum_calls: c.minimum_calls.max(1),
            slow_call_ms: c.slow_call_ms,
            // A probe is lost if it has not answered within twice the call timeout.
            probe_lease_ms: c.timeout_ms.saturating_mul(2).max(100),
        }
    }
}

/// What the breaker lets a caller do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Call,
    /// The one trial call of `half_open`.
    Probe,
    Reject,
}

/// A state change, for the receipt, the log, the gauge and the engines.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Transition {
    pub breaker: String,
    pub from: BreakerState,
    pub to: BreakerState,
    pub reason: String,
    pub at_ms: u64,
}

/// What survives a restart (persisted on every transition).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Breaker {
    pub state: BreakerState,
    pub consecutive_failures: u32,
    pub half_open_successes: u32,
    /// Trips since the last full close: the open time doubles with each.
    pub trips: u32,
    pub open_until_ms: u64,
    pub melted: bool,
    pub probe_until_ms: Option<u64>,
    pub changed_at_ms: u64,
    /// Recent outcomes, newest last: true = failure.
    pub window: VecDeque<bool>,
    pub calls: u64,
    pub failures: u64,
    pub slow_calls: u64,
    pub rejected: u64,
}

impl Default for Breaker {
    fn default() -> Self {
        Breaker {
            state: BreakerState::Closed,
            consecutive_failures: 0,
            half_open_successes: 0,
            trips: 0,
            open_until_ms: 0,
            melted: false,
            probe_until_ms: None,
            changed_at_ms: 0,
            window: VecDeque::new(),
            calls: 0,
            failures: 0,
            slow_calls: 0,
            rejected: 0,
        }
    }
}

impl Breaker {
    fn go(&mut self, name: &str, to: BreakerState, reason: String, now: u64) -> Option<Transition> {
        let from = self.state;
        if from == to {
            return None;
        }
        self.state = to;
        self.changed_at_ms = now;
        self.probe_until_ms = None;
        self.half_open_successes = 0;
        Some(Transition {
            breaker: name.to_string(),
            from,
            to,
            reason,
            at_ms: now,
        })
    }

    fn trip(&mut self, name: &str, c: &BreakerConfig, reason: String, now: u64) -> Transition {
        self.trips = self.trips.saturating_add(1);
        let factor = 1u64 << (self.trips - 1).min(20);
        let open_for = c
            .reset_timeout_ms
            .saturating_mul(factor)
            .min(c.max_reset_timeout_ms);
        self.open_until_ms = now.saturating_add(open_for);
        self.consecutive_failures = 0;
        self.window.clear();
        self.go(
            name,
            BreakerState::Open,
            format!("{reason}; open for {open_for} ms"),
            now,
        )
        .expect("trip happens from closed or half_open")
    }

    /// The wall clock stepped back past this breaker's last change (NTP, a
    /// VM snapshot restored): its open time and probe lease move back with
    /// it, so neither lasts more than its own length past the step (an
    /// hour back would otherwise keep a tripped breaker open an hour more).
    fn settle_clock(&mut self, now: u64) {
        let Some(back) = self.changed_at_ms.checked_sub(now).filter(|b| *b > 0) else {
            return;
        };
        self.changed_at_ms = now;
        if self.open_until_ms != u64::MAX {
            self.open_until_ms = self.open_until_ms.saturating_sub(back);
        }
        if let Some(p) = self.probe_until_ms.as_mut() {
            *p = p.saturating_sub(back);
        }
    }

    /// open → half_open once the open time is over (never while melted).
    pub fn tick(&mut self, name: &str, now: u64) -> Option<Transition> {
        self.settle_clock(now);
        if self.state == BreakerState::Open && !self.melted && now >= self.open_until_ms {
            return self.go(
                name,
                BreakerState::HalfOpen,
                "open time over: one probe at a time".into(),
                now,
            );
        }
        None
    }

    /// May a call go out now? A probe holds the half-open lease for
    /// `lease_ms`. Also reports the half-open transition it made.
    pub fn admit(
        &mut self,
        name: &str,
        now: u64,
        lease_ms: u64,
    ) -> (Admission, Option<Transition>) {
        let t = self.tick(name, now);
        let a = match self.state {
            BreakerState::Closed => Admission::Call,
            BreakerState::Open => Admission::Reject,
            // A lease taken after the last change can still lie past a
            // step back: it never runs longer than one lease from now.
            BreakerState::HalfOpen => match self.probe_until_ms {
                Some(until) if until > now && until - now <= lease_ms => Admission::Reject,
                _ => Admission::Probe,
            },
        };
        match a {
            Admission::Probe => self.probe_until_ms = Some(now.saturating_add(lease_ms)),
            Admission::Reject => self.rejected += 1,
            Admission::Call => {}
        }
        (a, t)
    }

    /// The outcome of an admitted call.
    pub fn record(
        &mut self,
        name: &str,
        c: &BreakerConfig,
        ok: bool,
        elapsed_ms: u64,
        now: u64,
    ) -> Option<Transition> {
        let slow = c.slow_call_ms.is_some_and(|s| elapsed_ms >= s);
        let failed = !ok || slow;
        self.calls += 1;
        if !ok {
            self.failures += 1;
        }
        if slow {
            self.slow_calls += 1;
        }
        match self.state {
            BreakerState::Closed => {
                self.window.push_back(failed);
                while self.window.len() > c.window as usize {
                    self.window.pop_front();
                }
                if !failed {
                    self.consecutive_failures = 0;
                    return None;
                }
                self.consecutive_failures += 1;
                let what = if slow && ok { "slow call" } else { "failure" };
                if self.consecutive_failures >= c.failure_threshold {
                    let n = self.consecutive_failures;
                    return Some(self.trip(
                        name,
                        c,
                        format!("{n} consecutive failures (last: {what})"),
                        now,
                    ));
                }
                if let Some(pct) = c.failure_rate_pct {
                    let n = self.window.len() as u32;
                    let bad = self.window.iter().filter(|f| **f).count() as u32;
                    if n >= c.minimum_calls && bad * 100 >= pct * n {
                        return Some(self.trip(
                            name,
                            c,
                            format!("failure rate {bad}/{n} calls reached {pct}%"),
                            now,
                        ));
                    }
                }
                None
            }
            BreakerState::HalfOpen => {
                self.probe_until_ms = None;
                if failed {
                    let what = if slow && ok { "slow" } else { "failed" };
                    return Some(self.trip(name, c, format!("probe {what}"), now));
                }
                self.half_open_successes += 1;
                if self.half_open_successes >= c.success_threshold {
                    let n = self.half_open_successes;
                    self.trips = 0;
                    self.consecutive_failures = 0;
                    self.window.clear();
                    return self.go(
                        name,
                        BreakerState::Closed,
                        format!("{n} successful probes"),
                        now,
                    );
                }
                None
            }
            // A call admitted before the breaker opened: counted, no change.
            BreakerState::Open => None,
        }
    }

    /// Operator: open until reset.
    pub fn melt(&mut self, name: &str, now: u64) -> Option<Transition> {
        self.melted = true;
        self.open_until_ms = u64::MAX;
        self.go(
            name,
            BreakerState::Open,
            "melted by the operator".into(),
            now,
        )
    }

    /// Operator: closed, counters cleared, melt lifted.
    pub fn reset(&mut self, name: &str, now: u64) -> Option<Transition> {
        self.melted = false;
        self.trips = 0;
        self.consecutive_failures = 0;
        self.window.clear();
        self.open_until_ms = 0;
        self.go(
            name,
            BreakerState::Closed,
            "reset by the operator".into(),
            now,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> BreakerConfig {
        BreakerConfig {
            failure_threshold: 5,
            success_threshold: 3,
            reset_timeout_ms: 1000,
            max_reset_timeout_ms: 3000,
            failure_rate_pct: None,
            window: 10,
            minimum_calls: 4,
            slow_call_ms: None,
            probe_lease_ms: 500,
        }
    }

    fn fail(b: &mut Breaker, c: &BreakerConfig, n: u32, now: u64) -> Option<Transition> {
        let mut last = None;
        for _ in 0..n {
            assert_eq!(b.admit("g", now, 500).0, Admission::Call);
            last = b.record("g", c, false, 1, now).or(last);
        }
        last
    }

    #[test]
    fn consecutive_failures_open_it_and_a_success_between_resets_the_count() {
        let c = cfg();
        let mut b = Breaker::default();
        assert!(fail(&mut b, &c, 4, 0).is_none());
        assert!(b.record("g", &c, true, 1, 0).is_none());
        assert!(fail(&mut b, &c, 4, 0).is_none(), "the count restarted");
        let t = fail(&mut b, &c, 1, 10).expect("fifth in a row trips");
        assert_eq!((t.from, t.to), (BreakerState::Closed, BreakerState::Open));
        assert_eq!(b.open_until_ms, 1010);
        assert_eq!(b.admit("g", 1009, 500).0, Admission::Reject);
        assert_eq!(b.rejected, 1);
    }

    #[test]
    fn half_open_admits_one_probe_and_closes_after_the_success_threshold() {
        let c = cfg();
        let mut b = Breaker::default();
        fail(&mut b, &c, 5, 0);
        let (a, t) = b.admit("g", 1000, 500);
        assert_eq!(a, Admission::Probe);
        assert_eq!(t.unwrap().to, BreakerState::HalfOpen);
        assert_eq!(
            b.admit("g", 1001, 500).0,
            Admission::Reject,
            "one probe at a time"
        );
        assert!(b.record("g", &c, true, 1, 1002).is_none());
        assert_eq!(b.admit("g", 1003, 500).0, Admission::Probe);
        assert!(b.record("g", &c, true, 1, 1003).is_none());
        assert_eq!(b.admit("g", 1004, 500).0, Admission::Probe);
        let t = b
            .record("g", &c, true, 1, 1004)
            .expect("third success closes");
        assert_eq!(
            (t.from, t.to),
            (BreakerState::HalfOpen, BreakerState::Closed)
        );
        assert_eq!(b.trips, 0);
    }

    #[test]
    fn a_lost_probe_expires_and_another_may_go() {
        let c = cfg();
        let mut b = Breaker::default();
        fail(&mut b, &c, 5, 0);
        assert_eq!(b.admit("g", 1000, 500).0, Admission::Probe);
        assert_eq!(b.admit("g", 1499, 500).0, Admission::Reject);
        assert_eq!(b.admit("g", 1500, 500).0, Admission::Probe, "lease expired");
    }

    #[test]
    fn repeated_trips_double_the_open_time_up_to_the_cap() {
        let c = cfg();
        let mut b = Breaker::default();
        fail(&mut b, &c, 5, 0);
        assert_eq!(b.open_until_ms, 1000);
        let mut now = 1000;
        for expected in [2000, 3000, 3000] {
            assert_eq!(b.admit("g", now, 500).0, Admission::Probe);
            let t = b
                .record("g", &c, false, 1, now)
                .expect("failed probe reopens");
            assert_eq!(t.to, BreakerState::Open);
            assert_eq!(b.open_until_ms - now, expected);
            now = b.open_until_ms;
        }
        // A full close forgets the trips.
        for _ in 0..3 {
            assert_eq!(b.admit("g", now, 500).0, Admission::Probe);
            b.record("g", &c, true, 1, now);
        }
        assert_eq!(b.state, BreakerState::Closed);
        fail(&mut b, &c, 5, now);
        assert_eq!(b.open_until_ms - now, 1000);
    }

    #[test]
    fn the_failure_rate_trips_only_with_enough_calls() {
        let c = BreakerConfig {
            failure_rate_pct: Some(50),
            ..cfg()
        };
        let mut b = Breaker::default();
        // fail, fail: 100% but under minimum_calls = 4; then ok, ok: 50%
        // but a success never opens the breaker.
        for ok in [false, false, true, true] {
            b.admit("g", 0, 500);
            assert!(b.record("g", &c, ok, 1, 0).is_none());
        }
        b.admit("g", 0, 500);
        let t = b.record("g", &c, false, 1, 0);
        assert!(t.is_some(), "3/5 failed with 5 calls trips");
        assert!(
            t.unwrap().reason.contains("failure rate 3/5"),
            "not the consecutive rule"
        );
    }

    #[test]
    fn a_slow_call_counts_as_a_failure() {
        let c = BreakerConfig {
            slow_call_ms: Some(100),
            failure_threshold: 2,
            ..cfg()
        };
        let mut b = Breaker::default();
        b.admit("g", 0, 500);
        assert!(b.record("g", &c, true, 99, 0).is_none());
        b.admit("g", 0, 500);
        assert!(b.record("g", &c, true, 100, 0).is_none());
        b.admit("g", 0, 500);
        let t = b
            .record("g", &c, true, 250, 0)
            .expect("two slow calls in a row");
        assert!(t.reason.contains("slow call"), "{}", t.reason);
        assert_eq!(b.slow_calls, 2);
        assert_eq!(b.failures, 0);
    }

    #[test]
    fn melt_holds_it_open_until_reset() {
        let c = cfg();
        let mut b = Breaker::default();
        assert_eq!(b.melt("g", 0).unwrap().to, BreakerState::Open);
        assert_eq!(b.admit("g", u64::MAX / 2, 500).0, Admission::Reject);
        assert!(b.tick("g", u64::MAX - 1).is_none());
        assert_eq!(b.reset("g", 5).unwrap().to, BreakerState::Closed);
        assert_eq!(b.admit("g", 6, 500).0, Admission::Call);
        fail(&mut b, &c, 5, 6);
        assert_eq!(b.open_until_ms, 1006, "reset forgot earlier trips");
    }

    #[test]
    fn it_survives_a_round_trip_through_its_checkpoint() {
        let c = cfg();
        let mut b = Breaker::default();
        fail(&mut b, &c, 5, 0);
        let back: Breaker = serde_json::from_slice(&serde_json::to_vec(&b).unwrap()).unwrap();
        assert_eq!(back, b);
    }

    #[test]
    fn a_clock_stepped_back_keeps_it_open_no_longer_than_its_open_time() {
        let c = cfg();
        let hour = 3_600_000;
        let mut b = Breaker::default();
        fail(&mut b, &c, 5, 10 * hour).expect("tripped");
        // Five hours back: open for its 1,000 ms from the step, not 5 h more.
        let back = 5 * hour;
        assert_eq!(b.admit("g", back, 500).0, Admission::Reject);
        let (a, t) = b.admit("g", back + 1000, 500);
        assert_eq!(a, Admission::Probe);
        assert_eq!(t.map(|t| t.to), Some(BreakerState::HalfOpen));
        // The probe's lease, taken before another step back, lapses after
        // one lease from the step, not the step's length.
        let again = back - hour;
        assert_eq!(b.admit("g", again, 500).0, Admission::Reject);
        assert_eq!(b.admit("g", again + 501, 500).0, Admission::Probe);
    }

    #[test]
    fn a_melted_breaker_stays_open_whatever_the_clock_does() {
        let mut b = Breaker::default();
        b.melt("g", 10_000);
        assert_eq!(b.admit("g", 1, 500).0, Admission::Reject);
        assert_eq!(b.admit("g", u64::MAX - 1, 500).0, Admission::Reject);
    }
}

//! The dispatch bookkeeping, apart from the actor so it can be tested alone:
//! ready signals per tenant, a round-robin of tenants, what is in flight.

use std::collections::VecDeque;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use rustc_hash::FxHashMap;
use tai_core::msg::Delivery;
use tai_core::signal::{ByTenant, Signal};
use tokio::time::Instant;

pub struct Flight {
    pub delivery: Delivery,
    pub sent_at: Instant,
    pub attempts: u32,
    /// Postponed by its engine until something outside it happens (an
    /// entitlement): not timed out, not counted in the WIP or its engine's
    /// prefetch, and not waited for by a quiesce.
    pub parked: bool,
}

/// A signal's engine (tenant, SKU) as a map key, the way [`ByTenant`] keys
/// by tenant: the shared signal, hashed and compared by the two names.
#[derive(Clone)]
struct EngineKey(Arc<Signal>);

impl PartialEq for EngineKey {
    fn eq(&self, other: &Self) -> bool {
        self.0.tenant_id == other.0.tenant_id && self.0.sku_id == other.0.sku_id
    }
}

impl Eq for EngineKey {}

impl Hash for EngineKey {
    fn hash<H: Hasher>(&self, h: &mut H) {
        self.0.tenant_id.hash(h);
        self.0.sku_id.hash(h);
    }
}

/// Heijunka: each tenant has its own FIFO, and tenants take turns, so one hot
/// tenant cannot starve the others; a tenant's own signals keep their order.
#[derive(Default)]
pub struct Dispatch {
    /// Boxed: most tenants have one or two signals waiting, and a deque
    /// reserves four slots at its first push. (These maps hash with Fx, not
    /// SipHash: their keys are seqs the node hands out and the tenants and
    /// SKUs of queued signals, which the ingress only accepts for configured
    /// ones; on amqp they come from the node's own broker queue, where only
    /// the node and the operator's own producers publish. No tenant can
    /// choose colliding keys.)
    ready: FxHashMap<ByTenant, VecDeque<Box<Delivery>>>,
    turn: VecDeque<ByTenant>,
    in_flight: FxHashMap<u64, Flight>,
    per_engine: PerEngine,
    ready_count: u64,
    /// In-flight signals parked by their engines.
    parked: u64,
}

fn engine_of(d: &Delivery) -> EngineKey {
    EngineKey(d.signal.clone())
}

/// Signals in flight (and not parked) per engine.
#[derive(Default)]
struct PerEngine(FxHashMap<EngineKey, u32>);

impl PerEngine {
    fn count(&self, engine: &EngineKey) -> u32 {
        self.0.get(engine).copied().unwrap_or(0)
    }

    fn add(&mut self, engine: EngineKey) {
        *self.0.entry(engine).or_default() += 1;
    }

    fn release(&mut self, engine: &EngineKey) {
        if let Some(n) = self.0.get_mut(engine) {
            *n -= 1;
            if *n == 0 {
                self.0.remove(engine);
            }
        }
    }
}

impl Dispatch {
    pub fn push(&mut self, d: Delivery) {
        let tenant = ByTenant(d.signal.clone());
        let q = self.ready.entry(tenant.clone()).or_default();
        if q.is_empty() {
            self.turn.push_back(tenant);
        }
        q.push_back(Box::new(d));
        self.ready_count += 1;
    }

    pub fn ready_len(&self) -> u64 {
        self.ready_count
    }

    pub fn in_flight_len(&self) -> u64 {
        self.in_flight.len() as u64
    }

    /// Of those in flight, how many their engines have parked.
    pub fn parked_len(&self) -> u64 {
        self.parked
    }

    /// Whether `seq` is in flight and parked.
    pub fn is_parked(&self, seq: u64) -> bool {
        self.in_flight.get(&seq).is_some_and(|f| f.parked)
    }

    /// In flight and being worked on (not parked): what a quiesce waits for.
    pub fn working_len(&self) -> u64 {
        self.in_flight_len() - self.parked
    }

    /// An engine holds these signals until something outside it happens
    /// (its entitlement): they stay in flight (sent again if the engine
    /// restarts), but waiting is not failing, so they do not time out; and
    /// they count neither against the WIP nor against their engine's
    /// prefetch, so the entitlement behind them reaches the engine and
    /// other engines go on meanwhile.
    pub fn park(&mut self, seqs: &[u64]) {
        self.set_parked(seqs, true);
    }

    /// Their engine is deciding them after all (it was entitled, or gave up
    /// waiting): their visibility starts now, not when they were sent (a
    /// signal parked longer than the visibility was otherwise sent again at
    /// the next tick, while its engine was deciding it).
    pub fn unpark(&mut self, seqs: &[u64], now: Instant) {
        for seq in seqs {
            if let Some(f) = self.in_flight.get_mut(seq) {
                if f.parked {
                    f.sent_at = now;
                }
            }
        }
        self.set_parked(seqs, false);
    }

    fn set_parked(&mut self, seqs: &[u64], to: bool) {
        for seq in seqs {
            if let Some(f) = self.in_flight.get_mut(seq) {
                Self::park_flight(&mut self.parked, &mut self.per_engine, f, to);
            }
        }
    }

    fn park_flight(parked: &mut u64, per_engine: &mut PerEngine, f: &mut Flight, to: bool) {
        if f.parked == to {
            return;
        }
        f.parked = to;
        let engine = engine_of(&f.delivery);
        if to {
            *parked += 1;
            per_engine.release(&engine);
        } else {
            *parked -= 1;
            per_engine.add(engine);
        }
    }

    /// Sent again: whichever engine gets it parks it again if it must wait.
    fn resent(parked: &mut u64, per_engine: &mut PerEngine, f: &mut Flight, now: Instant) {
        Self::park_flight(parked, per_engine, f, false);
        f.sent_at = now;
        f.delivery.redelivered = true;
    }

    /// Takes the next signals to send: tenants in turn, at most `prefetch`
    /// in flight per engine, at most `wip_limit` in flight in all (parked
    /// signals not counted).
    pub fn take(&mut self, wip_limit: u32, prefetch: u32, now: Instant) -> Vec<Delivery> {
        let mut out = Vec::new();
        let mut skipped = 0;
        while self.working_len() < u64::from(wip_limit) && skipped < self.turn.len() {
            let Some(tenant) = self.turn.pop_front() else {
                break;
            };
            let Some(q) = self.ready.get_mut::<str>(&tenant.0.tenant_id) else {
                continue;
            };
            let Some(head) = q.front() else {
                self.ready.remove::<str>(&tenant.0.tenant_id);
                continue;
            };
            let engine = engine_of(head);
            if self.per_engine.count(&engine) >= prefetch {
                // This tenant's next signal waits for its engine; keep its turn.
                self.turn.push_back(tenant);
                skipped += 1;
                continue;
            }
            skipped = 0;
            let d = *q.pop_front().expect("head exists");
            if q.is_empty() {
                self.ready.remove::<str>(&tenant.0.tenant_id);
            } else {
                self.turn.push_back(tenant);
            }
            self.ready_count -= 1;
            self.per_engine.add(engine);
            self.in_flight.insert(
                d.seq,
                Flight {
                    delivery: d.clone(),
                    sent_at: now,
                    attempts: 1,
                    parked: false,
                },
            );
            out.push(d);
        }
        out
    }

    /// The decision is made: frees the slot. False if it was not in flight.
    pub fn ack(&mut self, seq: u64) -> bool {
        let Some(f) = self.in_flight.remove(&seq) else {
            return false;
        };
        if f.parked {
            self.parked -= 1;
        } else {
            self.per_engine.release(&engine_of(&f.delivery));
        }
        true
    }

    /// In-flight signals of one engine, oldest first, to send again. After a
    /// crash the oldest is the one the engine was most likely deciding: it
    /// alone gets an attempt counted.
    pub fn redeliver_engine(
        &mut self,
        tenant: &str,
        sku: &str,
        after_crash: bool,
        now: Instant,
    ) -> Vec<(Delivery, u32)> {
        let mut seqs: Vec<u64> = self
            .in_flight
            .iter()
            .filter(|(_, f)| {
                f.delivery.signal.tenant_id == tenant && f.delivery.signal.sku_id == sku
            })
            .map(|(s, _)| *s)
            .collect();
        seqs.sort_unstable();
        let mut out = Vec::new();
        for (i, seq) in seqs.into_iter().enumerate() {
            let f = self.in_flight.get_mut(&seq).expect("listed");
            if i == 0 && after_crash {
                f.attempts += 1;
            }
            Self::resent(&mut self.parked, &mut self.per_engine, f, now);
            out.push((f.delivery.clone(), f.attempts));
        }
        crate::count_redelivered(out.len());
        out
    }

    /// Forgets every signal not yet sent (their source sends them again).
    pub fn clear_ready(&mut self) -> Vec<Delivery> {
        self.turn.clear();
        self.ready_count = 0;
        self.ready
            .drain()
            .flat_map(|(_, q)| q)
            .map(|d| *d)
            .collect()
    }

    pub fn redeliver_all(&mut self, now: Instant) -> Vec<Delivery> {
        let (parked, per_engine) = (&mut self.parked, &mut self.per_engine);
        let mut all: Vec<&mut Flight> = self.in_flight.values_mut().collect();
        all.sort_by_key(|f| f.delivery.seq);
        crate::count_redelivered(all.len());
        all.into_iter()
            .map(|f| {
                Self::resent(parked, per_engine, f, now);
                f.delivery.clone()
            })
            .collect()
    }

    /// In flight for longer than `visibility`, and not parked: sent again,
    /// with an attempt counted unless its engine still runs (`engine_runs`):
    /// a live engine busy with a long action holds its signals (and those
    /// postponed behind it) longer than the visibility, and counting that
    /// as failed deliveries dead-lettered them as poison while they were
    /// being decided. An engine that crashes is redelivered to apart
    /// ([`Self::redeliver_engine`]), with its attempt counted there.
    pub fn expired(
        &mut self,
        visibility: std::time::Duration,
        now: Instant,
        engine_runs: impl Fn(&Signal) -> bool,
    ) -> Vec<(Delivery, u32)> {
        let mut out: Vec<(Delivery, u32)> = self
            .in_flight
            .values_mut()
            .filter(|f| !f.parked && now.duration_since(f.sent_at) >= visibility)
            .map(|f| {
                if !engine_runs(&f.delivery.signal) {
                    f.attempts += 1;
                }
                f.sent_at = now;
                f.delivery.redelivered = true;
                (f.delivery.clone(), f.attempts)
            })
            .collect();
        out.sort_by_key(|(d, _)| d.seq);
        crate::count_redelivered(out.len());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(seq: u64, tenant: &str, sku: &str) -> Delivery {
        Delivery {
            redelivered: false,
            seq,
            signal: Arc::new(Signal {
                id: format!("s{seq}"),
                tenant_id: tenant.into(),
                sku_id: sku.into(),
                kind: "k".into(),
                critical: false,
                payload: Default::default(),
                received_at_ms: 0,
                trace_id: None,
                traceparent: None,
            }),
        }
    }

    fn seqs(v: &[Delivery]) -> Vec<u64> {
        v.iter().map(|d| d.seq).collect()
    }

    #[test]
    fn tenants_take_turns_and_keep_their_own_order() {
        let mut q = Dispatch::default();
        for s in 1..=6 {
            q.push(d(s, "hot", "a"));
        }
        q.push(d(7, "calm", "a"));
        q.push(d(8, "calm", "a"));
        let now = Instant::now();
        let out = q.take(4, 10, now);
        assert_eq!(seqs(&out), [1, 7, 2, 8]);
        assert_eq!(seqs(&q.take(100, 10, now)), [3, 4, 5, 6]);
    }

    #[test]
    fn wip_and_prefetch_bound_what_is_in_flight() {
        let mut q = Dispatch::default();
        for s in 1..=5 {
            q.push(d(s, "t", "a"));
        }
        q.push(d(6, "u", "a"));
        let now = Instant::now();
        assert_eq!(seqs(&q.take(50, 2, now)), [1, 6, 2]);
        assert_eq!(q.in_flight_len(), 3);
        assert!(
            q.take(50, 2, now).is_empty(),
            "engine t/a is at its prefetch"
        );
        assert!(q.ack(1));
        assert!(!q.ack(1));
        assert_eq!(seqs(&q.take(50, 2, now)), [3]);
        assert!(q.ack(2) && q.ack(3) && q.ack(6));
        assert_eq!(seqs(&q.take(1, 2, now)), [4]);
        assert_eq!(q.ready_len(), 1);
    }

    #[test]
    fn redelivery_counts_an_attempt_on_the_oldest_only() {
        let mut q = Dispatch::default();
        for s in 1..=3 {
            q.push(d(s, "t", "a"));
        }
        let now = Instant::now();
        q.take(50, 10, now);
        let fresh = q.redeliver_engine("t", "a", false, now);
        let counted: Vec<_> = fresh.iter().map(|(d, n)| (d.seq, *n)).collect();
        assert_eq!(
            counted,
            [(1, 1), (2, 1), (3, 1)],
            "a plain start counts nothing"
        );
        let again = q.redeliver_engine("t", "a", true, now);
        assert_eq!(
            again.iter().map(|(d, n)| (d.seq, *n)).collect::<Vec<_>>(),
            [(1, 2), (2, 1), (3, 1)]
        );
        assert!(q
            .expired(std::time::Duration::from_secs(60), now, |_| false)
            .is_empty());
        let later = now + std::time::Duration::from_secs(61);
        assert_eq!(
            q.expired(std::time::Duration::from_secs(60), later, |_| false)
                .len(),
            3
        );
    }

    #[test]
    fn a_parked_signal_stays_in_flight_but_neither_times_out_nor_holds_a_quiesce() {
        let mut q = Dispatch::default();
        for s in 1..=3 {
            q.push(d(s, "t", "a"));
        }
        let now = Instant::now();
        q.take(50, 10, now);
        q.park(&[1, 2]);
        q.park(&[2, 99]);
        assert_eq!(
            (q.in_flight_len(), q.parked_len(), q.working_len()),
            (3, 2, 1)
        );
        let visibility = std::time::Duration::from_secs(60);
        let later = now + std::time::Duration::from_secs(61);
        let again: Vec<_> = q
            .expired(visibility, later, |_| false)
            .iter()
            .map(|(d, n)| (d.seq, *n))
            .collect();
        assert_eq!(again, [(3, 2)], "only the unparked one timed out");
        q.unpark(&[3, 1], later);
        assert_eq!((q.parked_len(), q.working_len()), (1, 2));
        q.park(&[1]);
        // Decided: gone, parked or not.
        assert!(q.ack(1));
        assert_eq!((q.in_flight_len(), q.parked_len()), (2, 1));
        // Its engine restarted: sent again, unparked (the new engine parks it
        // again if it still must wait), and it times out again if not.
        let sent = q.redeliver_engine("t", "a", false, later);
        assert_eq!(
            seqs(&sent.into_iter().map(|(d, _)| d).collect::<Vec<_>>()),
            [2, 3]
        );
        assert_eq!((q.parked_len(), q.working_len()), (0, 2));
        q.park(&[2]);
        assert_eq!(q.redeliver_all(later).len(), 2);
        assert_eq!(q.parked_len(), 0);
        let much_later = later + std::time::Duration::from_secs(61);
        assert_eq!(q.expired(visibility, much_later, |_| false).len(), 2);
    }

    #[test]
    fn an_unparked_signal_has_its_whole_visibility_from_then() {
        let mut q = Dispatch::default();
        q.push(d(1, "t", "a"));
        let now = Instant::now();
        q.take(50, 10, now);
        q.park(&[1]);
        let visibility = std::time::Duration::from_secs(60);
        // Parked five minutes, then its engine decides it.
        let unparked = now + visibility * 5;
        q.unpark(&[1], unparked);
        let soon = unparked + std::time::Duration::from_secs(1);
        assert!(q.expired(visibility, soon, |_| false).is_empty());
        let late = unparked + visibility;
        assert_eq!(q.expired(visibility, late, |_| false).len(), 1);
    }

    #[test]
    fn a_signal_held_by_a_running_engine_is_sent_again_without_an_attempt() {
        let mut q = Dispatch::default();
        q.push(d(1, "t", "busy"));
        q.push(d(2, "t", "gone"));
        let now = Instant::now();
        q.take(50, 10, now);
        let visibility = std::time::Duration::from_secs(60);
        for i in 1..=5u32 {
            let at = now + visibility * (i + 1);
            let attempts: Vec<_> = q
                .expired(visibility, at, |s| s.sku_id == "busy")
                .iter()
                .map(|(d, n)| (d.seq, *n))
                .collect();
            // Still 1 for the live engine's; counted for the other's.
            assert_eq!(attempts, [(1, 1), (2, 1 + i)]);
        }
    }

    #[test]
    fn parked_signals_hold_neither_the_wip_nor_their_engines_prefetch() {
        let mut q = Dispatch::default();
        for s in 1..=5 {
            q.push(d(s, "waits", "a"));
        }
        for s in 6..=7 {
            q.push(d(s, "other", "a"));
        }
        let now = Instant::now();
        // WIP 2, prefetch 2: one of each tenant in turn.
        assert_eq!(seqs(&q.take(2, 2, now)), [1, 6]);
        assert!(q.take(2, 2, now).is_empty(), "the WIP is full");
        q.park(&[1]);
        assert_eq!(seqs(&q.take(2, 2, now)), [2]);
        q.park(&[2]);
        // Tenants still take turns.
        assert_eq!(seqs(&q.take(2, 2, now)), [7]);
        assert!(q.ack(6));
        // `waits` has nothing but parked in flight: its next goes.
        assert_eq!(seqs(&q.take(2, 2, now)), [3]);
        assert_eq!((q.in_flight_len(), q.working_len()), (4, 2));
        // Unparked (entitled): they count again, so nothing more goes.
        q.unpark(&[1, 2], Instant::now());
        assert_eq!(q.working_len(), 4);
        assert!(q.take(9, 2, now).is_empty(), "`waits` is over its prefetch");
        for seq in [1, 2, 3] {
            assert!(q.ack(seq));
        }
        assert_eq!(seqs(&q.take(9, 2, now)), [4, 5]);
    }

    /// What the dispatcher is told, in any order.
    #[derive(Debug, Clone)]
    enum Op {
        Push { tenant: u8, sku: u8 },
        Take { wip: u32, prefetch: u32 },
        Ack(prop::sample::Index),
        Park(prop::sample::Index),
        Unpark(prop::sample::Index),
        RedeliverEngine(prop::sample::Index, bool),
        Expired(bool),
        RedeliverAll,
        ClearReady,
    }

    use proptest::prelude::*;

    fn op() -> impl Strategy<Value = Op> {
        let pick = any::<prop::sample::Index>;
        prop_oneof![
            4 => (0..4u8, 0..2u8).prop_map(|(tenant, sku)| Op::Push { tenant, sku }),
            3 => (1..8u32, 1..4u32).prop_map(|(wip, prefetch)| Op::Take { wip, prefetch }),
            3 => pick().prop_map(Op::Ack),
            1 => pick().prop_map(Op::Park),
            1 => pick().prop_map(Op::Unpark),
            1 => (pick(), any::<bool>()).prop_map(|(i, c)| Op::RedeliverEngine(i, c)),
            1 => any::<bool>().prop_map(Op::Expired),
            1 => Just(Op::RedeliverAll),
            1 => Just(Op::ClearReady),
        ]
    }

    /// The dispatcher's bookkeeping, kept the plain way.
    #[derive(Default)]
    struct Model {
        ready: std::collections::BTreeMap<String, VecDeque<u64>>,
        /// seq: (tenant, sku, parked)
        in_flight: std::collections::BTreeMap<u64, (String, String, bool)>,
    }

    impl Model {
        fn working(&self, engine: Option<(&str, &str)>) -> u64 {
            self.in_flight
                .values()
                .filter(|(t, s, parked)| {
                    !parked && engine.is_none_or(|(et, es)| et == t && es == s)
                })
                .count() as u64
        }
    }

    fn pick_flight(m: &Model, i: &prop::sample::Index) -> Option<u64> {
        (!m.in_flight.is_empty()).then(|| *i.get(&m.in_flight.keys().copied().collect::<Vec<_>>()))
    }

    proptest! {
        /// Whatever happens in whatever order: the counts agree with what
        /// was pushed, sent and settled; a tenant's signals go out in its
        /// order; a take keeps to the WIP limit and each engine's prefetch,
        /// and stops short only when every tenant waiting is held by its
        /// engine's prefetch (nobody is left out of the turns).
        #[test]
        fn the_bookkeeping_agrees_with_a_plain_model(ops in prop::collection::vec(op(), 1..120)) {
            let mut q = Dispatch::default();
            let mut m = Model::default();
            let mut seq = 0u64;
            let now = Instant::now();
            let mut skus: std::collections::HashMap<u64, String> = Default::default();
            for op in ops {
                match op {
                    Op::Push { tenant, sku } => {
                        seq += 1;
                        let (t, s) = (format!("t{tenant}"), format!("k{sku}"));
                        q.push(d(seq, &t, &s));
                        skus.insert(seq, s);
                        m.ready.entry(t).or_default().push_back(seq);
                    }
                    Op::Take { wip, prefetch } => {
                        let before = q.working_len();
                        let out = q.take(wip, prefetch, now);
                        for x in &out {
                            let t = &x.signal.tenant_id;
                            let head = m.ready.get_mut(t).and_then(VecDeque::pop_front);
                            prop_assert_eq!(head, Some(x.seq), "{}'s signals out of order", t);
                            if m.ready[t].is_empty() {
                                m.ready.remove(t);
                            }
                            m.in_flight.insert(x.seq, (t.clone(), x.signal.sku_id.clone(), false));
                            let engine = (t.as_str(), x.signal.sku_id.as_str());
                            prop_assert!(m.working(Some(engine)) <= u64::from(prefetch));
                        }
                        if !out.is_empty() {
                            prop_assert!(q.working_len() <= u64::from(wip).max(before));
                        }
                        if q.working_len() < u64::from(wip) {
                            for (t, waiting) in &m.ready {
                                let s = &skus[&waiting[0]];
                                prop_assert!(
                                    m.working(Some((t, s))) >= u64::from(prefetch),
                                    "{}'s next signal was left out with room to send it", t
                                );
                            }
                        }
                    }
                    Op::Ack(i) => {
                        if let Some(s) = pick_flight(&m, &i) {
                            prop_assert!(q.ack(s));
                            m.in_flight.remove(&s);
                        }
                        prop_assert!(!q.ack(seq + 1), "not in flight");
                    }
                    Op::Park(i) | Op::Unpark(i) => {
                        let to = matches!(op, Op::Park(_));
                        if let Some(s) = pick_flight(&m, &i) {
                            if to { q.park(&[s]) } else { q.unpark(&[s], now) }
                            m.in_flight.get_mut(&s).unwrap().2 = to;
                        }
                    }
                    Op::RedeliverEngine(i, crash) => {
                        if let Some(s) = pick_flight(&m, &i) {
                            let (t, k, _) = m.in_flight[&s].clone();
                            let out = q.redeliver_engine(&t, &k, crash, now);
                            let mut theirs: Vec<u64> = Vec::new();
                            for (seq, f) in m.in_flight.iter_mut() {
                                if f.0 == t && f.1 == k {
                                    f.2 = false;
                                    theirs.push(*seq);
                                }
                            }
                            prop_assert_eq!(out.iter().map(|(d, _)| d.seq).collect::<Vec<_>>(), theirs);
                        }
                    }
                    Op::Expired(runs) => {
                        let out = q.expired(std::time::Duration::ZERO, now, |_| runs);
                        let working: Vec<u64> = m.in_flight.iter().filter(|(_, f)| !f.2).map(|(s, _)| *s).collect();
                        prop_assert_eq!(out.iter().map(|(d, _)| d.seq).collect::<Vec<_>>(), working);
                    }
                    Op::RedeliverAll => {
                        let out = q.redeliver_all(now);
                        prop_assert_eq!(seqs(&out), m.in_flight.keys().copied().collect::<Vec<_>>());
                        for f in m.in_flight.values_mut() {
                            f.2 = false;
                        }
                    }
                    Op::ClearReady => {
                        let mut out = seqs(&q.clear_ready());
                        out.sort_unstable();
                        let mut was: Vec<u64> = m.ready.values().flatten().copied().collect();
                        was.sort_unstable();
                        prop_assert_eq!(out, was);
                        m.ready.clear();
                    }
                }
                let ready: u64 = m.ready.values().map(|r| r.len() as u64).sum();
                prop_assert_eq!(q.ready_len(), ready);
                prop_assert_eq!(q.in_flight_len(), m.in_flight.len() as u64);
                prop_assert_eq!(q.working_len(), m.working(None));
                for (engine, n) in &q.per_engine.0 {
                    prop_assert_eq!(u64::from(*n), m.working(Some((&engine.0.tenant_id, &engine.0.sku_id))));
                }
                let mut turn: Vec<&str> = q.turn.iter().map(|t| t.0.tenant_id.as_str()).collect();
                turn.sort_unstable();
                prop_assert_eq!(turn, m.ready.keys().map(String::as_str).collect::<Vec<_>>(), "each waiting tenant in the turns once");
            }
        }
    }
}

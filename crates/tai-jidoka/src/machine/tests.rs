//! SPEC §5, row by row, and properties over random event sequences.

use super::*;
use crate::policy::PaymentFraud;
use proptest::prelude::*;
use serde_json::json;
use EngineState::*;

fn sku() -> Sku {
    Sku {
        quota: 2,
        period_ms: 3_600_000,
        entitlement_timeout_ms: 30_000,
        policies: vec![Policy::PaymentFraud(PaymentFraud::default())],
        executor: "log".into(),
        configured: true,
    }
}

fn signal(kind: &str, payload: Value, critical: bool) -> Arc<Signal> {
    Arc::new(Signal {
        id: format!("{kind}-1"),
        tenant_id: "t".into(),
        sku_id: "payments".into(),
        kind: kind.into(),
        critical,
        payload: payload.as_object().cloned().unwrap_or_default().into(),
        received_at_ms: 0,
        trace_id: None,
        traceparent: None,
    })
}

fn pay() -> Arc<Signal> {
    signal(
        "payment",
        json!({"amount": 10, "currency": "USD", "customer_id": "c"}),
        false,
    )
}
fn fraud() -> Arc<Signal> {
    signal("payment", json!({"amount": 9000, "currency": "XYZ"}), false)
}
fn ent(active: bool) -> Arc<Signal> {
    signal("entitlement", json!({"active": active}), false)
}

fn data(state: EngineState) -> Data {
    let mut d = Data::new(&sku(), 0);
    d.state = state;
    if state == ActionPending {
        d.in_flight = Some(InFlight {
            action_id: "a".into(),
            signal_id: "s".into(),
            seq: 9,
            return_to: Stable,
        });
    }
    d
}

fn run(d: &mut Data, ev: Event<'_>) -> Vec<Effect> {
    let mut n = 0;
    step(d, &sku(), ev, 1_000, &mut |p| {
        n += 1;
        format!("{p}id{n}")
    })
}

fn kinds(fx: &[Effect]) -> Vec<&'static str> {
    fx.iter()
        .filter_map(|e| match e {
            Effect::Receipt { kind, .. } => Some(*kind),
            _ => None,
        })
        .collect()
}

fn dead(fx: &[Effect]) -> Option<&'static str> {
    let reason = fx.iter().find_map(|e| match e {
        Effect::DeadLetter { reason, .. } => Some(*reason),
        _ => None,
    });
    // Each reason is one `/metrics` has at 0 from the start.
    if let Some(r) = reason {
        assert!(
            tai_core::telemetry::DEADLETTER_REASONS.contains(&r),
            "dead-letter reason {r:?} is not in telemetry::DEADLETTER_REASONS"
        );
    }
    reason
}

#[test]
fn the_table_of_spec_section_5() {
    let s_pay = pay();
    let s_fraud = fraud();
    let (s_on, s_off) = (ent(true), ent(false));
    let crit = signal("payment", json!({"amount": 1}), true);
    // (from, event, to, receipts, dead letter reason)
    type Row<'a> = (
        EngineState,
        Event<'a>,
        EngineState,
        Vec<&'a str>,
        Option<&'a str>,
    );
    let rows: Vec<Row<'_>> = vec![
        (
            Boot,
            Event::Signal {
                seq: 1,
                signal: &s_on,
            },
            Stable,
            vec!["entitlement_activated"],
            None,
        ),
        (
            Boot,
            Event::Signal {
                seq: 1,
                signal: &s_pay,
            },
            Boot,
            vec![],
            None,
        ),
        (
            Stable,
            Event::Signal {
                seq: 1,
                signal: &s_pay,
            },
            ActionPending,
            vec!["action_generated"],
            None,
        ),
        (
            Stable,
            Event::Signal {
                seq: 1,
                signal: &s_fraud,
            },
            Stable,
            vec!["policy_denied"],
            None,
        ),
        (
            ActionPending,
            Event::Signal {
                seq: 1,
                signal: &s_pay,
            },
            ActionPending,
            vec![],
            None,
        ),
        (
            ActionPending,
            Event::ActionDone { ok: true },
            Stable,
            vec!["action_successful"],
            None,
        ),
        (
            ActionPending,
            Event::ActionFailed {
                reason: "boom",
                tripped: None,
            },
            Stable,
            vec!["action_failed"],
            None,
        ),
        (
            ActionPending,
            Event::ActionFailed {
                reason: "boom",
                tripped: Some("gateway"),
            },
            Halted,
            vec!["action_failed", "jidoka_halt"],
            None,
        ),
        (
            Degraded,
            Event::Signal {
                seq: 1,
                signal: &crit,
            },
            ActionPending,
            vec!["action_generated"],
            None,
        ),
        (
            Degraded,
            Event::Signal {
                seq: 1,
                signal: &s_pay,
            },
            Degraded,
            vec!["signal_skipped"],
            Some("degraded"),
        ),
        (
            Degraded,
            Event::Signal {
                seq: 1,
                signal: &s_on,
            },
            Stable,
            vec!["entitlement_activated"],
            None,
        ),
        (
            Stable,
            Event::Signal {
                seq: 1,
                signal: &s_off,
            },
            Degraded,
            vec!["entitlement_revoked"],
            None,
        ),
        (
            Halted,
            Event::Signal {
                seq: 1,
                signal: &s_pay,
            },
            Halted,
            vec!["signal_skipped"],
            Some("halted"),
        ),
        (
            Stable,
            Event::Halt { reason: "op" },
            Halted,
            vec!["jidoka_halt"],
            None,
        ),
        (
            Degraded,
            Event::Halt { reason: "op" },
            Halted,
            vec!["jidoka_halt"],
            None,
        ),
        (Halted, Event::Resume, Stable, vec!["jidoka_resume"], None),
        (
            QuotaExhausted,
            Event::Resume,
            Stable,
            vec!["jidoka_resume"],
            None,
        ),
        (
            QuotaExhausted,
            Event::Signal {
                seq: 1,
                signal: &s_pay,
            },
            QuotaExhausted,
            vec!["quota_exceeded"],
            Some("quota_exhausted"),
        ),
    ];
    for (from, ev, to, receipts, dl) in rows {
        let mut d = data(from);
        let fx = run(&mut d, ev);
        assert_eq!(d.state, to, "{from:?} + {ev:?}");
        assert_eq!(kinds(&fx), receipts, "{from:?} + {ev:?}");
        assert_eq!(dead(&fx), dl, "{from:?} + {ev:?}");
    }
}

#[test]
fn quota_runs_out_then_refills_with_the_period() {
    let sku = sku();
    let mut d = data(Stable);
    let s = pay();
    let mut id = |p: &str| format!("{p}x");
    for _ in 0..2 {
        step(
            &mut d,
            &sku,
            Event::Signal { seq: 1, signal: &s },
            1_000,
            &mut id,
        );
        step(&mut d, &sku, Event::ActionDone { ok: true }, 1_000, &mut id);
    }
    assert_eq!((d.state, d.quota_remaining), (Stable, 0));
    let fx = step(
        &mut d,
        &sku,
        Event::Signal { seq: 3, signal: &s },
        1_000,
        &mut id,
    );
    assert_eq!(
        (d.state, kinds(&fx), dead(&fx)),
        (
            QuotaExhausted,
            vec!["quota_exceeded"],
            Some("quota_exhausted")
        )
    );
    assert_eq!(d.state_deadline_ms(&sku, 1_000), Some(sku.period_ms));
    let fx = step(&mut d, &sku, Event::StateTimeout, sku.period_ms, &mut id);
    assert_eq!(
        (d.state, d.quota_remaining, kinds(&fx)),
        (Stable, 2, vec!["quota_refilled"])
    );
}

#[test]
fn boot_times_out_to_degraded_only_when_due() {
    let sku = sku();
    let mut d = Data::new(&sku, 0);
    let mut id = |p: &str| format!("{p}x");
    assert!(step(&mut d, &sku, Event::StateTimeout, 29_999, &mut id).is_empty());
    let fx = step(&mut d, &sku, Event::StateTimeout, 30_000, &mut id);
    assert_eq!((d.state, kinds(&fx)), (Degraded, vec!["bootstrap_timeout"]));
}

#[test]
fn a_restored_in_flight_action_is_recorded_interrupted() {
    let mut d = data(ActionPending);
    let fx = run(&mut d, Event::Restored);
    assert_eq!(d.state, Stable);
    assert!(fx.contains(&Effect::Settle {
        seq: 9,
        signal_id: "s".into(),
        status: SignalStatus::Failed,
        reason: Some("interrupted".into())
    }));
    assert_eq!(kinds(&fx), ["action_failed"]);
}

#[test]
fn a_payload_no_policy_can_read_is_denied_not_read_as_empty() {
    // Denied by the policy when readable; the same with a number beyond
    // f64 beside it must not pass as `{}` (only a store written by hand or
    // by an older node holds one: ingress refuses it).
    for (text, reason) in [
        (
            r#"{"amount": 9000, "currency": "XYZ"}"#,
            "payment_fraud: amount 9000 over 5000 (+30)",
        ),
        (
            r#"{"amount": 9000, "currency": "XYZ", "note": 1e400}"#,
            "payload cannot be read: number out of range",
        ),
    ] {
        let mut s = (*fraud()).clone();
        s.payload = tai_core::signal::Payload::from_text(text.into()).unwrap();
        let s = Arc::new(s);
        let mut d = data(Stable);
        let fx = run(&mut d, Event::Signal { seq: 1, signal: &s });
        assert_eq!((d.state, d.quota_remaining), (Stable, 2), "{fx:?}");
        assert_eq!(kinds(&fx), ["policy_denied"]);
        let Some(Effect::Settle {
            status,
            reason: Some(why),
            ..
        }) = fx.iter().find(|e| matches!(e, Effect::Settle { .. }))
        else {
            panic!("no settle: {fx:?}");
        };
        assert_eq!(*status, SignalStatus::Denied);
        assert!(why.starts_with(reason), "{why}");
    }
}

/// A critical payment (seq 1) reaches the engine.
fn take_critical(d: &mut Data) -> Vec<Effect> {
    let crit = signal("payment", json!({"amount": 1}), true);
    run(
        d,
        Event::Signal {
            seq: 1,
            signal: &crit,
        },
    )
}

#[test]
fn a_critical_signal_in_degraded_returns_to_degraded() {
    let mut d = data(Degraded);
    take_critical(&mut d);
    assert_eq!(d.state, ActionPending);
    run(&mut d, Event::ActionDone { ok: true });
    assert_eq!(d.state, Degraded);
}

/// The state a receipt of `kind` among `fx` leaves the engine in.
fn after(fx: &[Effect], kind: &str) -> Option<EngineState> {
    fx.iter().find_map(|e| match e {
        Effect::Receipt { kind: k, after, .. } if *k == kind => Some(*after),
        _ => None,
    })
}

#[test]
fn a_degraded_engine_halted_by_its_breaker_goes_back_to_degraded_when_it_half_opens() {
    // The degraded row ends "back to degraded": a critical signal's action
    // that trips the breaker does not end the degradation when the breaker
    // lets the line go again. An operator's resume goes to stable (SPEC §5).
    for operator in [false, true] {
        let mut d = data(Degraded);
        take_critical(&mut d);
        run(
            &mut d,
            Event::ActionFailed {
                reason: "503",
                tripped: Some("gateway"),
            },
        );
        assert_eq!(d.state, Halted);
        let fx = match operator {
            false => run(
                &mut d,
                Event::BreakerChanged {
                    breaker: "gateway",
                    open: false,
                },
            ),
            true => run(&mut d, Event::Resume),
        };
        let want = if operator { Stable } else { Degraded };
        assert_eq!((d.state, after(&fx, "jidoka_resume")), (want, Some(want)));
        assert!(!d.back_to_degraded);
    }
    // An entitled engine never goes back to degraded, whatever it remembered.
    let mut d = halted_by_gateway();
    d.back_to_degraded = true;
    d.entitled = true;
    run(
        &mut d,
        Event::BreakerChanged {
            breaker: "gateway",
            open: false,
        },
    );
    assert_eq!(d.state, Stable);
}

#[test]
fn a_degraded_engine_out_of_quota_refills_back_to_degraded_unless_entitled_meanwhile() {
    for entitle in [false, true] {
        let mut d = data(Degraded);
        d.quota_remaining = 0;
        let fx = take_critical(&mut d);
        assert_eq!(
            (d.state, after(&fx, "quota_exceeded")),
            (QuotaExhausted, Some(QuotaExhausted))
        );
        if entitle {
            let on = ent(true);
            run(
                &mut d,
                Event::Signal {
                    seq: 2,
                    signal: &on,
                },
            );
            assert_eq!((d.state, d.entitled), (QuotaExhausted, true));
        }
        let mut n = 0;
        let later = d.period_start_ms + sku().period_ms;
        let fx = step(&mut d, &sku(), Event::StateTimeout, later, &mut |p| {
            n += 1;
            format!("{p}{n}")
        });
        let want = if entitle { Stable } else { Degraded };
        assert_eq!((d.state, after(&fx, "quota_refilled")), (want, Some(want)));
        assert_eq!(d.quota_remaining, sku().quota);
    }
    // From stable it refills to stable, as ever.
    let mut d = data(QuotaExhausted);
    let mut n = 0;
    let fx = step(
        &mut d,
        &sku(),
        Event::StateTimeout,
        sku().period_ms,
        &mut |p| {
            n += 1;
            format!("{p}{n}")
        },
    );
    assert_eq!(after(&fx, "quota_refilled"), Some(Stable));
}

fn arb_event() -> impl Strategy<Value = u8> {
    0u8..9
}

proptest! {
    /// Whatever happens: an action is in flight exactly in action_pending (or
    /// halted during one), quota never exceeds the SKU's, every signal gets at
    /// most one final outcome, and every state change has a receipt.
    #[test]
    fn invariants_hold_for_any_event_sequence(events in proptest::collection::vec(arb_event(), 1..60)) {
        let sku = sku();
        let mut d = Data::new(&sku, 0);
        let (p, f, on, off) = (pay(), fraud(), ent(true), ent(false));
        let crit = signal("payment", json!({"amount": 1}), true);
        let mut now = 0;
        let mut n = 0;
        for (i, e) in events.into_iter().enumerate() {
            now += 7_000;
            let seq = i as u64;
            let ev = match e {
                0 => Event::Signal { seq, signal: &p },
                1 => Event::Signal { seq, signal: &f },
                2 => Event::Signal { seq, signal: &on },
                3 => Event::Signal { seq, signal: &off },
                4 => Event::Signal { seq, signal: &crit },
                5 => Event::ActionDone { ok: true },
                6 => Event::ActionFailed { reason: "x", tripped: None },
                7 => Event::Halt { reason: "op" },
                _ => Event::Resume,
            };
            let before = d.state;
            let fx = step(&mut d, &sku, ev, now, &mut |p| { n += 1; format!("{p}{n}") });
            prop_assert!(d.quota_remaining <= sku.quota);
            prop_assert_eq!(d.in_flight.is_some() && d.state != Halted, d.state == ActionPending);
            let finals = fx.iter().filter(|e| matches!(e, Effect::Settle { seq: s, .. } | Effect::DeadLetter { seq: s, .. } if *s == seq)).count();
            let postponed = fx.contains(&Effect::Postpone);
            prop_assert!(finals <= 1);
            if let Event::Signal { .. } = ev {
                let processing = fx.iter().any(|e| matches!(e, Effect::Processing { .. }));
                prop_assert_eq!(finals + usize::from(postponed) + usize::from(processing), 1, "each signal: one outcome");
            }
            if d.state != before {
                let last = fx.iter().rev().find_map(|e| match e { Effect::Receipt { after, .. } => Some(*after), _ => None });
                prop_assert_eq!(last, Some(d.state), "a state change has its receipt");
            }
        }
    }
}

/// An engine whose action failed and tripped the breaker `gateway`.
fn halted_by_gateway() -> Data {
    let mut d = data(ActionPending);
    run(
        &mut d,
        Event::ActionFailed {
            reason: "503",
            tripped: Some("gateway"),
        },
    );
    d
}

#[test]
fn a_breaker_halt_ends_when_that_breaker_is_no_longer_open() {
    let mut d = halted_by_gateway();
    assert_eq!((d.state, d.halted_by.as_deref()), (Halted, Some("gateway")));
    // Another breaker, or the same one still open: nothing.
    for ev in [
        Event::BreakerChanged {
            breaker: "other",
            open: false,
        },
        Event::BreakerChanged {
            breaker: "gateway",
            open: true,
        },
    ] {
        assert!(run(&mut d, ev).is_empty());
        assert_eq!(d.state, Halted);
    }
    let fx = run(
        &mut d,
        Event::BreakerChanged {
            breaker: "gateway",
            open: false,
        },
    );
    assert_eq!(kinds(&fx), ["jidoka_resume"]);
    assert_eq!((d.state, d.halted_by.as_deref()), (Stable, None));
}

#[test]
fn a_passive_engine_waits_for_its_state_timeout_or_its_breaker_only() {
    let (sku, now) = (sku(), 5_000);
    let mut booting = data(Boot);
    booting.boot_started_ms = 1_000;
    assert_eq!(booting.waits_for(&sku, now), (Some(31_000), None));
    let mut exhausted = data(QuotaExhausted);
    exhausted.period_start_ms = 2_000;
    assert_eq!(exhausted.waits_for(&sku, now), (Some(3_602_000), None));
    for state in [Stable, Degraded, ActionPending] {
        assert_eq!(data(state).waits_for(&sku, now), (None, None), "{state:?}");
    }
    // Halted by a breaker: until that breaker is not open; by an operator
    // (who may take over a breaker's halt): until a resume, nothing to wait for.
    let mut d = halted_by_gateway();
    assert_eq!(d.waits_for(&sku, now), (None, Some("gateway".to_string())));
    run(&mut d, Event::Halt { reason: "audit" });
    assert_eq!((d.state, d.waits_for(&sku, now)), (Halted, (None, None)));
}

#[test]
fn an_operator_halt_is_not_lifted_by_a_breaker() {
    let mut d = halted_by_gateway();
    run(
        &mut d,
        Event::Halt {
            reason: "maintenance",
        },
    );
    let fx = run(
        &mut d,
        Event::BreakerChanged {
            breaker: "gateway",
            open: false,
        },
    );
    assert!(fx.is_empty());
    assert_eq!(d.state, Halted);
}

#[test]
fn an_action_reaches_an_executor_with_every_field_of_its_signal() {
    let s = pay();
    let a = Action {
        action_id: "act_1".into(),
        signal: s.clone(),
        asked: None,
        executor: "hooks".into(),
    };
    assert_eq!(
        serde_json::to_value(&a).unwrap(),
        json!({
            "action_id": "act_1", "tenant_id": "t", "sku_id": "payments",
            "signal_id": "payment-1", "kind": "payment", "executor": "hooks",
            "payload": {"amount": 10, "currency": "USD", "customer_id": "c"},
        })
    );
    let asked = Action {
        asked: Some("freeze".into()),
        ..a
    };
    assert_eq!(asked.kind(), "freeze", "a policy's request wins");
    assert_eq!(serde_json::to_value(&asked).unwrap()["kind"], "freeze");
}

/// The wall clock stepped back (NTP, a VM snapshot restored): no wait the
/// engine started before the step lasts more than its own length past the
/// step (it may start again at the step), whatever the size of the step.
const HOUR: u64 = 3_600_000;

#[test]
fn a_clock_stepped_back_does_not_stretch_the_quota_period() {
    let sku = sku();
    let mut d = Data::new(&sku, 10 * HOUR);
    d.state = Stable;
    let mut id = |p: &str| format!("{p}x");
    let signal = pay();
    for _ in 0..3 {
        step(
            &mut d,
            &sku,
            Event::Signal {
                seq: 1,
                signal: &signal,
            },
            10 * HOUR,
            &mut id,
        );
        step(
            &mut d,
            &sku,
            Event::ActionDone { ok: true },
            10 * HOUR,
            &mut id,
        );
    }
    assert_eq!(d.state, QuotaExhausted);
    // The refill timer fires (it runs on a monotonic clock) and finds the
    // wall clock five hours back.
    let back = 10 * HOUR + sku.period_ms - 5 * HOUR;
    let fx = step(&mut d, &sku, Event::StateTimeout, back, &mut id);
    assert_eq!((d.state, fx.len()), (QuotaExhausted, 0));
    let due = d.state_deadline_ms(&sku, back).unwrap();
    assert_eq!(
        due,
        back + sku.period_ms,
        "not {}",
        3 * HOUR + sku.period_ms
    );
    let fx = step(&mut d, &sku, Event::StateTimeout, due, &mut id);
    assert_eq!((d.state, kinds(&fx)), (Stable, vec!["quota_refilled"]));
}

#[test]
fn a_clock_stepped_back_does_not_stretch_the_entitlement_wait() {
    let sku = sku();
    let mut d = Data::new(&sku, HOUR);
    let mut id = |p: &str| format!("{p}x");
    let back = HOUR + sku.entitlement_timeout_ms - HOUR;
    assert!(step(&mut d, &sku, Event::StateTimeout, back, &mut id).is_empty());
    let due = d.state_deadline_ms(&sku, back).unwrap();
    assert_eq!(due, back + sku.entitlement_timeout_ms);
    let fx = step(&mut d, &sku, Event::StateTimeout, due, &mut id);
    assert_eq!((d.state, kinds(&fx)), (Degraded, vec!["bootstrap_timeout"]));
}

#[test]
fn a_clock_stepped_back_does_not_stretch_a_payment_window() {
    let sku = sku();
    let mut d = data(Stable);
    d.quota_remaining = 100;
    // Five payments from customer c just before the step: a sixth within
    // the minute is over `velocity_limit`.
    d.velocity
        .insert("c".into(), (0..5).map(|i| 2 * HOUR + i).collect());
    let mut id = |p: &str| format!("{p}x");
    let signal = pay();
    let mut pay_at = |d: &mut Data, now| {
        kinds(&step(
            d,
            &sku,
            Event::Signal {
                seq: 1,
                signal: &signal,
            },
            now,
            &mut id,
        ))
    };
    assert_eq!(
        pay_at(&mut d, HOUR),
        ["policy_denied"],
        "still recent at the step"
    );
    assert_eq!(
        pay_at(&mut d, HOUR + 60_001),
        ["action_generated"],
        "a minute after the step, not an hour"
    );
}

#[test]
fn a_sku_the_config_does_not_name_decides_nothing() {
    let sku = Sku {
        configured: false,
        policies: Vec::new(),
        ..sku()
    };
    let mut id = |p: &str| format!("{p}x");
    for state in [Boot, Stable] {
        let mut d = data(state);
        for s in [ent(true), pay()] {
            let fx = step(
                &mut d,
                &sku,
                Event::Signal { seq: 4, signal: &s },
                1_000,
                &mut id,
            );
            assert_eq!(
                (d.state, kinds(&fx), dead(&fx)),
                (state, vec!["signal_skipped"], Some("unknown_sku")),
                "{state:?} {}",
                s.kind
            );
        }
    }
}

#[test]
fn a_quota_changed_in_the_config_keeps_what_the_period_used() {
    let with_quota = |quota| Sku { quota, ..sku() };
    // Counted against 10, 3 used: (new quota, remaining after).
    for (quota, remaining) in [(10, 7), (20, 17), (5, 2), (3, 0), (1, 0)] {
        let mut d = Data::new(&with_quota(10), 0);
        d.quota_remaining = 7;
        d.reconcile(&with_quota(quota));
        assert_eq!(
            (d.quota_remaining, d.quota),
            (remaining, Some(quota)),
            "to {quota}"
        );
        // Starting again on the same config changes nothing.
        d.reconcile(&with_quota(quota));
        assert_eq!(d.quota_remaining, remaining, "again at {quota}");
    }
    // A checkpoint from before the quota was recorded: capped at the new one.
    let old: Data = serde_json::from_value(json!({
        "state": "stable", "quota_remaining": 900, "period_start_ms": 0,
        "entitled": true, "boot_started_ms": 0, "in_flight": null
    }))
    .unwrap();
    for (quota, remaining) in [(100, 100), (1000, 900)] {
        let mut d = old.clone();
        d.reconcile(&with_quota(quota));
        assert_eq!((d.quota_remaining, d.quota), (remaining, Some(quota)));
    }
    // A SKU no longer configured leaves it be.
    let mut d = old.clone();
    d.reconcile(&Sku {
        configured: false,
        ..with_quota(1)
    });
    assert_eq!(d, old);
}

//! OTP semantics of the supervisor, each case under paused time.

mod common;

use std::time::Duration;

use common::*;
use ractor::Actor;
use tai_otp::{
    Application, Backoff, ChildSpec, ChildStatus, Exit, Restart, Shutdown, StartChildError,
    Strategy, Supervisor, SupervisorSpec,
};

/// What OTP does when child `b` (of a, b, c) ends with `how`, as log lines.
fn expected_after(strategy: Strategy, restart: Restart, how: Failure) -> Vec<String> {
    let mut out = Vec::new();
    if how == Failure::Normal {
        // A normal stop runs the child's own post_stop.
        out.push("stop:b".to_string());
    }
    let restarts = match restart {
        Restart::Permanent => true,
        Restart::Transient => how.abnormal(),
        Restart::Temporary => false,
    };
    if !restarts {
        return out;
    }
    let (stop, start): (&[&str], &[&str]) = match strategy {
        Strategy::OneForOne | Strategy::SimpleOneForOne => (&[], &["b"]),
        Strategy::OneForAll => (&["c", "a"], &["a", "b", "c"]),
        Strategy::RestForOne => (&["c"], &["b", "c"]),
    };
    out.extend(stop.iter().map(|s| format!("stop:{s}")));
    out.extend(start.iter().map(|s| format!("start:{s}")));
    out
}

async fn run_case(strategy: Strategy, restart: Restart, how: Failure) {
    let log = new_log();
    let spec = SupervisorSpec::new(strategy)
        .intensity(10, Duration::from_secs(5))
        .child(probe("a", &log, Restart::Permanent))
        .child(probe("b", &log, restart))
        .child(probe("c", &log, Restart::Permanent));
    let (sup, _) = Actor::spawn(None, Supervisor, spec).await.unwrap();
    assert_eq!(entries(&log), ["start:a", "start:b", "start:c"]);
    let before = tai_otp::which_children(&sup.get_cell(), Duration::from_secs(1))
        .await
        .unwrap();

    fail(&sup, "b", how).await;
    let want = expected_after(strategy, restart, how);
    let case = format!("{strategy:?} {restart:?} {how:?}");
    eventually(&case, || entries(&log).len() >= 3 + want.len()).await;
    settle().await;
    assert_eq!(entries(&log)[3..], want[..], "{case}");

    let after = tai_otp::which_children(&sup.get_cell(), Duration::from_secs(1))
        .await
        .unwrap();
    for id in ["a", "b", "c"] {
        let restarted = want.contains(&format!("start:{id}"));
        let old = before.children.iter().find(|c| c.id == id).unwrap();
        let new = after.children.iter().find(|c| c.id == id);
        match new {
            Some(new) if restarted => {
                assert_eq!(new.restarts, 1, "{case}: {id} restarts");
                assert_eq!(new.status, ChildStatus::Running, "{case}: {id}");
                assert_ne!(new.actor_id, old.actor_id, "{case}: {id} is a new actor");
            }
            Some(new) if id == "b" => {
                assert_eq!(new.status, ChildStatus::Terminated, "{case}");
                assert_eq!(restart, Restart::Transient, "{case}");
            }
            Some(new) => assert_eq!(new.actor_id, old.actor_id, "{case}: {id} untouched"),
            None => assert_eq!((id, restart), ("b", Restart::Temporary), "{case}"),
        }
    }
    if how.abnormal() && restart != Restart::Temporary {
        let b = after.children.iter().find(|c| c.id == "b").unwrap();
        let cause = b.last_failure.as_deref().unwrap_or_default();
        assert!(cause.contains("in b"), "{case}: cause kept, got {cause:?}");
    }
    sup.stop_and_wait(None, None).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn every_strategy_restart_type_and_failure_kind() {
    for strategy in [
        Strategy::OneForOne,
        Strategy::OneForAll,
        Strategy::RestForOne,
    ] {
        for restart in [Restart::Permanent, Restart::Transient, Restart::Temporary] {
            for how in [Failure::Panic, Failure::Err, Failure::Normal] {
                run_case(strategy, restart, how).await;
            }
        }
    }
}

#[tokio::test(start_paused = true)]
async fn temporary_sibling_is_not_restarted_by_one_for_all() {
    let log = new_log();
    let spec = SupervisorSpec::new(Strategy::OneForAll)
        .child(probe("a", &log, Restart::Permanent))
        .child(probe("t", &log, Restart::Temporary));
    let (sup, _) = Actor::spawn(None, Supervisor, spec).await.unwrap();
    fail(&sup, "a", Failure::Panic).await;
    eventually("a restarted", || {
        entries(&log).contains(&"start:a".to_string()) && entries(&log).len() >= 4
    })
    .await;
    settle().await;
    assert_eq!(entries(&log), ["start:a", "start:t", "stop:t", "start:a"]);
    let report = tai_otp::which_children(&sup.get_cell(), Duration::from_secs(1))
        .await
        .unwrap();
    assert_eq!(report.children.len(), 1, "the temporary child is gone");
}

fn mid_supervisor(log: &Log, id: &str) -> ChildSpec {
    ChildSpec::supervisor(
        id,
        SupervisorSpec::new(Strategy::OneForOne)
            .intensity(2, Duration::from_secs(5))
            .child(probe("w", log, Restart::Permanent)),
    )
}

#[tokio::test(start_paused = true)]
async fn intensity_escalates_through_two_levels_with_the_cause() {
    let log = new_log();
    let spec = SupervisorSpec::new(Strategy::OneForOne)
        .intensity(1, Duration::from_secs(60))
        .child(mid_supervisor(&log, "mid_escalation"))
        .child(probe("sibling", &log, Restart::Permanent));
    let mut app = Application::start("top_escalation", spec).await.unwrap();
    let mid = || ractor::registry::where_is("mid_escalation").map(ractor::ActorRef::from);

    // Round one: three failures in 5 s exceed mid's 2; mid escalates, top restarts mid.
    let first_mid = mid().unwrap().get_id();
    for _ in 0..3 {
        let m = mid().unwrap();
        fail(&m, "w", Failure::Panic).await;
        settle().await;
    }
    eventually("mid restarted", || {
        mid().is_some_and(|m| m.get_id() != first_mid)
    })
    .await;
    let top = tai_otp::which_children(&app.root.get_cell(), Duration::from_secs(1))
        .await
        .unwrap();
    let mid_info = top
        .children
        .iter()
        .find(|c| c.id == "mid_escalation")
        .unwrap();
    assert_eq!(mid_info.restarts, 1);
    let cause = mid_info.last_failure.clone().unwrap();
    assert!(cause.contains("reached_max_restart_intensity"), "{cause}");
    assert!(
        cause.contains("boom in w"),
        "the worker's cause travels up: {cause}"
    );
    // The sibling under one_for_one was not touched.
    assert_eq!(
        top.children
            .iter()
            .find(|c| c.id == "sibling")
            .unwrap()
            .restarts,
        0
    );

    // Round two: mid escalates again, which exceeds top's 1 in 60 s: top fails.
    for _ in 0..3 {
        if let Some(m) = mid() {
            if child_cell(&m, "w").await.is_some() {
                fail(&m, "w", Failure::Err).await;
            }
        }
        settle().await;
    }
    match app.wait().await {
        Exit::Abnormal(reason) => {
            assert!(
                reason.contains("reached_max_restart_intensity (1 in 60s)"),
                "{reason}"
            );
            assert!(reason.contains("mid_escalation"), "{reason}");
        }
        other => panic!("top should fail, got {other:?}"),
    }
    // On the way down top stopped what was still running (the sibling), and
    // nothing was started after that.
    let log = entries(&log);
    assert_eq!(log.last().unwrap(), "stop:sibling", "{log:?}");
}

#[tokio::test(start_paused = true)]
async fn shutdown_is_reverse_order_with_timeouts_and_kill() {
    let log = new_log();
    let spec = SupervisorSpec::new(Strategy::OneForOne)
        .child(probe("a", &log, Restart::Permanent))
        .child(probe("b", &log, Restart::Permanent).shutdown(Shutdown::BrutalKill))
        .child(slow_probe(
            "c",
            &log,
            Duration::from_secs(100),
            Shutdown::Timeout(Duration::from_secs(2)),
        ))
        .child(slow_probe(
            "d",
            &log,
            Duration::from_millis(500),
            Shutdown::Timeout(Duration::from_secs(2)),
        ));
    let (sup, _) = Actor::spawn(None, Supervisor, spec).await.unwrap();
    let started = tokio::time::Instant::now();
    sup.stop_and_wait(None, None).await.unwrap();
    let took = started.elapsed();
    // d stops in its own time; c overruns its 2 s and is killed (no "stop:c");
    // b is killed outright (no post_stop); a stops last.
    assert_eq!(
        entries(&log)[4..],
        ["stopping:d", "stop:d", "stopping:c", "stop:a"]
    );
    assert!(
        took >= Duration::from_millis(2500) && took < Duration::from_secs(10),
        "{took:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn dynamic_supervisor_starts_finds_caps_and_terminates_by_key() {
    let log = new_log();
    let spec = SupervisorSpec::new(Strategy::SimpleOneForOne)
        .intensity(10, Duration::from_secs(5))
        .max_children(2);
    let (sup, _) = Actor::spawn(None, Supervisor, spec).await.unwrap();
    let t = Duration::from_secs(1);
    let e1 = tai_otp::start_child(&sup, probe("engine:a:x", &log, Restart::Transient), t)
        .await
        .unwrap();
    let again = tai_otp::start_child(&sup, probe("engine:a:x", &log, Restart::Transient), t)
        .await
        .unwrap();
    assert_eq!(
        e1.get_id(),
        again.get_id(),
        "a running key answers the running child"
    );
    tai_otp::start_child(&sup, probe("engine:b:x", &log, Restart::Transient), t)
        .await
        .unwrap();
    let over = tai_otp::start_child(&sup, probe("engine:c:x", &log, Restart::Transient), t).await;
    assert_eq!(over.unwrap_err(), StartChildError::MaxChildren(2));

    // A crash restarts only that child.
    fail(&sup, "engine:a:x", Failure::Panic).await;
    eventually("restart", || {
        entries(&log)
            .iter()
            .filter(|l| *l == "start:engine:a:x")
            .count()
            == 2
    })
    .await;
    // A normal exit of a transient dynamic child removes it (passivation).
    fail(&sup, "engine:b:x", Failure::Normal).await;
    settle().await;
    let report = tai_otp::which_children(&sup.get_cell(), t).await.unwrap();
    let ids: Vec<_> = report
        .children
        .iter()
        .map(|c| (c.id.as_str(), c.restarts))
        .collect();
    assert_eq!(ids, [("engine:a:x", 1)]);

    assert!(tai_otp::terminate_child(&sup, "engine:a:x", t).await);
    assert!(!tai_otp::terminate_child(&sup, "engine:a:x", t).await);
    assert_eq!(entries(&log).last().unwrap(), "stop:engine:a:x");
    let report = tai_otp::which_children(&sup.get_cell(), t).await.unwrap();
    assert!(report.children.is_empty());
}

#[tokio::test(start_paused = true)]
async fn backoff_delays_restart_and_waiting_does_not_count_against_intensity() {
    let log = new_log();
    let backoff = Backoff {
        base: Duration::from_secs(3),
        max: Duration::from_secs(60),
        jitter: 0.0,
        reset_after: Duration::from_secs(600),
    };
    let spec = SupervisorSpec::new(Strategy::OneForOne)
        .intensity(1, Duration::from_secs(5))
        .child(probe("flaky", &log, Restart::Permanent).backoff(backoff));
    let (sup, _) = Actor::spawn(None, Supervisor, spec).await.unwrap();
    let t0 = tokio::time::Instant::now();

    fail(&sup, "flaky", Failure::Panic).await;
    settle().await;
    let report = tai_otp::which_children(&sup.get_cell(), Duration::from_secs(1))
        .await
        .unwrap();
    assert_eq!(report.children[0].status, ChildStatus::Restarting);
    eventually("first restart", || entries(&log).len() == 2).await;
    assert!(t0.elapsed() >= Duration::from_secs(3));

    // Second failure right away: 6 s backoff. Two restarts 6 s apart never
    // sit in one 5 s window, so intensity 1 holds.
    fail(&sup, "flaky", Failure::Panic).await;
    eventually("second restart", || entries(&log).len() == 3).await;
    assert!(t0.elapsed() >= Duration::from_secs(9));
    let report = tai_otp::which_children(&sup.get_cell(), Duration::from_secs(1))
        .await
        .unwrap();
    assert_eq!(report.children[0].restarts, 2);
    assert_eq!(report.children[0].status, ChildStatus::Running);
}

#[tokio::test(start_paused = true)]
async fn failed_restart_is_retried_and_counts_against_intensity() {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;
    // A child whose start fails after the first: the supervisor keeps trying
    // until its intensity is spent, then fails itself.
    let starts = Arc::new(AtomicU32::new(0));
    let log = new_log();
    let inner = probe("fragile", &log, Restart::Permanent);
    let counter = starts.clone();
    let mut spec_child = inner.clone();
    spec_child.start = Arc::new(move |sup| {
        let n = counter.fetch_add(1, Ordering::SeqCst);
        let start = inner.start.clone();
        Box::pin(async move {
            if n == 0 {
                start(sup).await
            } else {
                Err(ractor::SpawnErr::StartupFailed("no database".into()))
            }
        })
    });
    let spec = SupervisorSpec::new(Strategy::OneForOne)
        .intensity(3, Duration::from_secs(5))
        .child(spec_child);
    let (sup, handle) = Actor::spawn(None, Supervisor, spec).await.unwrap();
    fail(&sup, "fragile", Failure::Panic).await;
    handle.await.unwrap();
    // One initial start, then the restarts OTP allows (3) and the one that exceeds.
    assert_eq!(starts.load(Ordering::SeqCst), 4);
}

#[tokio::test]
async fn a_killed_supervisor_comes_back_with_its_named_children() {
    // ractor kills a killed supervisor's children asynchronously; the restart
    // must wait for their registered names instead of failing on them.
    let log = new_log();
    let named = ChildSpec::worker(
        "named_w",
        Some("named_w_kill_test".to_string()),
        Probe {
            id: "named_w".into(),
            log: log.clone(),
            slow_stop: None,
        },
        || (),
    );
    let mid = ChildSpec::supervisor(
        "mid_kill_test",
        SupervisorSpec::new(Strategy::OneForOne).child(named),
    );
    let spec = SupervisorSpec::new(Strategy::OneForOne)
        .intensity(3, Duration::from_secs(5))
        .child(mid);
    let (top, _) = Actor::spawn(None, Supervisor, spec).await.unwrap();
    for round in 1..=3u64 {
        let old = ractor::registry::where_is("named_w_kill_test")
            .unwrap()
            .get_id();
        ractor::registry::where_is("mid_kill_test").unwrap().kill();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let back =
                ractor::registry::where_is("named_w_kill_test").is_some_and(|c| c.get_id() != old);
            if back {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "round {round}: not restarted"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let report = tai_otp::which_children(&top.get_cell(), Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(report.children[0].restarts, round);
        assert_eq!(report.children[0].status, ChildStatus::Running);
    }
    top.stop_and_wait(None, None).await.unwrap();
}

/// A worker whose `post_start` waits for the test to let it go.
#[derive(Clone)]
struct LateStarter {
    entered: std::sync::Arc<tokio::sync::Notify>,
    release: std::sync::Arc<tokio::sync::Notify>,
}

impl Actor for LateStarter {
    type Msg = ();
    type State = ();
    type Arguments = ();

    async fn pre_start(
        &self,
        _myself: ractor::ActorRef<()>,
        _args: (),
    ) -> Result<(), ractor::ActorProcessingErr> {
        Ok(())
    }

    async fn post_start(
        &self,
        _myself: ractor::ActorRef<()>,
        _state: &mut (),
    ) -> Result<(), ractor::ActorProcessingErr> {
        self.entered.notify_one();
        self.release.notified().await;
        Ok(())
    }
}

/// `Application::start` returns only once every actor of the tree has left
/// `starting` (ractor marks an actor running after its `post_start`), so a
/// node that announces itself right after start shows a running tree.
/// Real time: under paused time the runtime would skip through the start's
/// own deadline while the worker waits.
#[tokio::test]
async fn start_returns_once_the_whole_tree_is_running() {
    let late = LateStarter {
        entered: Default::default(),
        release: Default::default(),
    };
    let spec = SupervisorSpec::new(Strategy::OneForOne).child(ChildSpec::supervisor(
        "mid_settle",
        SupervisorSpec::new(Strategy::OneForOne).child(ChildSpec::worker(
            "late",
            Some("late_settle".into()),
            late.clone(),
            || (),
        )),
    ));
    let start = tokio::spawn(async {
        let app = Application::start("top_settle", spec).await.unwrap();
        let late = ractor::registry::where_is("late_settle").expect("late worker");
        (app, late.get_status())
    });
    late.entered.notified().await;
    for _ in 0..100 {
        tokio::task::yield_now().await;
    }
    assert!(
        !start.is_finished(),
        "start returned while a worker was still in post_start"
    );
    late.release.notify_one();
    let (app, status) = start.await.unwrap();
    assert_eq!(status, ractor::ActorStatus::Running);
    assert!(!app.stop(Duration::from_secs(5)).await.is_abnormal());
}

#[tokio::test]
async fn a_failed_start_names_each_level_once_and_the_cause() {
    // OTP's {shutdown, {failed_to_start_child, Id, Reason}} at each level,
    // ending in what the child's start said, not in ractor's wording of it
    // ("Actor panicked during startup '…'", once per level).
    let log = new_log();
    let mut db = probe("db", &log, Restart::Permanent);
    db.start = std::sync::Arc::new(|_sup| {
        Box::pin(async { Err(ractor::SpawnErr::StartupFailed("no database".into())) })
    });
    let mid = ChildSpec::supervisor(
        "storage_sup",
        SupervisorSpec::new(Strategy::OneForOne).child(db),
    );
    let spec = SupervisorSpec::new(Strategy::OneForOne).child(mid);
    let Err(e) = Application::start("top_failed_start", spec).await else {
        panic!("the start should fail");
    };
    assert_eq!(
        tai_otp::startup_reason(&e),
        "shutdown: child storage_sup failed_to_start_child: \
         shutdown: child db failed_to_start_child: no database"
    );
}

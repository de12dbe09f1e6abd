//! Random failure sequences against a model of OTP's rules: a live supervisor
//! never leaves a permanent child dead, and exceeding the intensity always
//! escalates (and only then).

mod common;

use std::collections::VecDeque;
use std::time::Duration;

use common::*;
use proptest::prelude::*;
use ractor::{Actor, ActorStatus};
use tai_otp::{ChildStatus, Restart, Strategy, Supervisor, SupervisorSpec};

const IDS: [&str; 4] = ["c0", "c1", "c2", "c3"];

#[derive(Debug, Clone, Copy, PartialEq)]
enum Model {
    Alive,
    Down,
    Gone,
}

fn strategy() -> impl proptest::strategy::Strategy<Value = Strategy> {
    prop_oneof![
        Just(Strategy::OneForOne),
        Just(Strategy::OneForAll),
        Just(Strategy::RestForOne)
    ]
}
fn restart() -> impl proptest::strategy::Strategy<Value = Restart> {
    prop_oneof![
        Just(Restart::Permanent),
        Just(Restart::Transient),
        Just(Restart::Temporary)
    ]
}
fn failure() -> impl proptest::strategy::Strategy<Value = Failure> {
    prop_oneof![
        Just(Failure::Panic),
        Just(Failure::Err),
        Just(Failure::Normal)
    ]
}

async fn check(
    strategy: Strategy,
    types: Vec<Restart>,
    intensity: u32,
    ops: Vec<(usize, Failure, u64)>,
) -> Result<(), TestCaseError> {
    let period = Duration::from_secs(5);
    let log = new_log();
    let mut spec = SupervisorSpec::new(strategy).intensity(intensity, period);
    for (id, restart) in IDS.iter().zip(&types) {
        spec = spec.child(probe(id, &log, *restart));
    }
    let (sup, handle) = Actor::spawn(None, Supervisor, spec).await.unwrap();
    let mut model = [Model::Alive; 4];
    let mut restarts: VecDeque<tokio::time::Instant> = VecDeque::new();
    let mut escalated = false;

    for (i, how, gap_ms) in ops {
        tokio::time::sleep(Duration::from_millis(gap_ms)).await;
        if model[i] != Model::Alive {
            continue;
        }
        let now = tokio::time::Instant::now();
        fail(&sup, IDS[i], how).await;
        settle().await;
        let restarts_it = match types[i] {
            Restart::Permanent => true,
            Restart::Transient => how.abnormal(),
            Restart::Temporary => false,
        };
        if !restarts_it {
            model[i] = if types[i] == Restart::Temporary {
                Model::Gone
            } else {
                Model::Down
            };
        } else {
            restarts.push_back(now);
            while restarts
                .front()
                .is_some_and(|t| now.duration_since(*t) > period)
            {
                restarts.pop_front();
            }
            if restarts.len() as u32 > intensity {
                escalated = true;
                break;
            }
            let affected: Vec<usize> = match strategy {
                Strategy::OneForAll => (0..4).collect(),
                Strategy::RestForOne => (i..4).collect(),
                _ => vec![i],
            };
            for j in affected {
                if model[j] == Model::Gone {
                    continue;
                }
                model[j] = if j != i && types[j] == Restart::Temporary {
                    Model::Gone
                } else {
                    Model::Alive
                };
            }
        }
        let report = tai_otp::which_children(&sup.get_cell(), Duration::from_secs(1)).await;
        let report =
            report.map_err(|e| TestCaseError::fail(format!("supervisor died early: {e}")))?;
        for (j, id) in IDS.iter().enumerate() {
            let actual =
                report
                    .children
                    .iter()
                    .find(|c| c.id == *id)
                    .map(|c| match (c.status, &c.cell) {
                        (ChildStatus::Running, Some(cell))
                            if cell.get_status() == ActorStatus::Running =>
                        {
                            Model::Alive
                        }
                        _ => Model::Down,
                    });
            let actual = actual.unwrap_or(Model::Gone);
            prop_assert_eq!(
                actual,
                model[j],
                "child {} after {:?} of {}",
                id,
                how,
                IDS[i]
            );
        }
    }
    settle().await;
    let stopped = sup.get_status() == ActorStatus::Stopped;
    prop_assert_eq!(stopped, escalated, "escalated iff intensity exceeded");
    if escalated {
        handle.await.unwrap();
    } else {
        sup.stop_and_wait(None, None).await.unwrap();
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]
    #[test]
    fn random_failures_follow_otp(
        strategy in strategy(),
        types in proptest::collection::vec(restart(), 4),
        intensity in 0u32..4,
        ops in proptest::collection::vec((0usize..4, failure(), 0u64..4000), 1..12),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
        rt.block_on(check(strategy, types, intensity, ops))?;
    }
}

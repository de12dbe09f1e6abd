//! Time from a child's panic to its replacement handling messages, under
//! `one_for_one` and `rest_for_one`, with 5 siblings. The first child fails,
//! so under `rest_for_one` all five are stopped and started again; the clock
//! stops when the last restarted child answers a call.
//!
//! Run: `cargo bench -p tai-otp --bench restart`. Besides criterion's
//! estimates, it prints p50/p99/max over every individual restart.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tai_otp::{ChildSpec, Strategy, Supervisor, SupervisorSpec};

#[derive(Clone)]
struct Worker;

enum Msg {
    Panic,
    Ping(RpcReplyPort<()>),
}

impl Actor for Worker {
    type Msg = Msg;
    type State = ();
    type Arguments = ();
    async fn pre_start(&self, _: ActorRef<Msg>, _: ()) -> Result<(), ActorProcessingErr> {
        Ok(())
    }
    async fn handle(
        &self,
        _: ActorRef<Msg>,
        msg: Msg,
        _: &mut (),
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            Msg::Panic => panic!("injected"),
            Msg::Ping(reply) => {
                let _ = reply.send(());
            }
        }
        Ok(())
    }
}

const CHILDREN: usize = 5;

fn name(strategy: Strategy, i: usize) -> String {
    format!("bench_{}_{i}", strategy.as_str())
}

async fn start(strategy: Strategy) -> ActorRef<tai_otp::SupervisorMsg> {
    let mut spec = SupervisorSpec::new(strategy).intensity(u32::MAX, Duration::from_secs(1));
    for i in 0..CHILDREN {
        let n = name(strategy, i);
        spec = spec.child(ChildSpec::worker(n.clone(), Some(n), Worker, || ()));
    }
    Actor::spawn(None, Supervisor, spec).await.unwrap().0
}

async fn wait_replaced(name: &str, old: ractor::ActorId) {
    loop {
        if let Some(cell) = ractor::registry::where_is(name) {
            if cell.get_id() != old {
                let r: ActorRef<Msg> = cell.into();
                if ractor::call!(r, Msg::Ping).is_ok() {
                    return;
                }
            }
        }
        tokio::task::yield_now().await;
    }
}

async fn one_restart(strategy: Strategy) -> Duration {
    let last = match strategy {
        Strategy::RestForOne => CHILDREN - 1,
        _ => 0,
    };
    let first = ractor::registry::where_is(name(strategy, 0)).unwrap();
    let last_old = ractor::registry::where_is(name(strategy, last))
        .unwrap()
        .get_id();
    let t = Instant::now();
    first.send_message(Msg::Panic).unwrap();
    wait_replaced(&name(strategy, last), last_old).await;
    wait_replaced(&name(strategy, 0), first.get_id()).await;
    t.elapsed()
}

static SAMPLES: Mutex<Vec<(String, Duration)>> = Mutex::new(Vec::new());

fn bench(c: &mut Criterion) {
    // The panics are the point; keep the default hook from printing each one.
    std::panic::set_hook(Box::new(|_| {}));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("restart_5_siblings");
    for strategy in [Strategy::OneForOne, Strategy::RestForOne] {
        rt.block_on(start(strategy));
        group.bench_function(strategy.as_str(), |b| {
            b.to_async(&rt).iter_custom(|iters| async move {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let d = one_restart(strategy).await;
                    SAMPLES
                        .lock()
                        .unwrap()
                        .push((strategy.as_str().to_string(), d));
                    total += d;
                }
                total
            })
        });
    }
    group.finish();
    let samples = SAMPLES.lock().unwrap();
    for strategy in ["one_for_one", "rest_for_one"] {
        let mut v: Vec<Duration> = samples
            .iter()
            .filter(|(s, _)| s == strategy)
            .map(|(_, d)| *d)
            .collect();
        v.sort();
        if v.is_empty() {
            continue;
        }
        let pct = |p: f64| v[((v.len() as f64 - 1.0) * p).round() as usize];
        println!(
            "restart {strategy}: n={} p50={:?} p99={:?} max={:?}",
            v.len(),
            pct(0.50),
            pct(0.99),
            v[v.len() - 1]
        );
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);

//! tai-kaizen: layer 4, `kaizen_sup`.
//!
//! Measurement. The process-wide Prometheus recorder (the layers record
//! through the `metrics` facade, which needs no I/O), the restart hook that
//! counts supervisor restarts, process metrics (RSS, CPU, open fds), and
//! the health monitor (`kaizen_health`: memory against its limit, the
//! data dir's free disk space against its minimum).
//! Depends on tai-core and tai-otp only.

use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tai_core::telemetry as t;
use tai_otp::{ChildSpec, Strategy, SupervisorSpec};

pub mod health;
pub mod report;

pub use health::{Health, HealthArgs, KAIZEN_HEALTH};

/// `kaizen_sup` with the health monitor: memory against
/// `kaizen.memory_limit_mb`, the data dir's disk against
/// `kaizen.disk_free_min_mb` (0: no such check).
pub fn supervisor_spec(config: &tai_core::config::Config) -> SupervisorSpec {
    let args = HealthArgs {
        memory_limit_bytes: config.kaizen.memory_limit_mb * 1024 * 1024,
        disk_free_min_bytes: config.kaizen.disk_free_min_mb * 1024 * 1024,
        data_dir: config.node.data_dir.clone(),
        every: Duration::from_secs(2),
    };
    SupervisorSpec::new(Strategy::OneForOne)
        .intensity(5, Duration::from_secs(10))
        .child(ChildSpec::worker(
            KAIZEN_HEALTH,
            Some(KAIZEN_HEALTH.to_string()),
            Health,
            move || args.clone(),
        ))
}

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot install the metrics recorder: {0}")]
    Install(String),
}

/// How often the recorder's histograms are drained (the exporter's own
/// default period). Without it a histogram keeps every sample until the
/// next scrape, so a node nobody scrapes kept one per decided signal,
/// without bound (BENCHMARKS.md, session 38).
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// The installed recorder; `render` gives the Prometheus text exposition.
pub struct Metrics {
    handle: PrometheusHandle,
    process: metrics_process::Collector,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// Latency buckets in seconds, from sub-millisecond to the slow tail.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Group flush buckets in seconds: a flush takes well under a millisecond
/// on a healthy disk.
const FLUSH_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

impl Metrics {
    /// Installs the process-wide recorder (once per process), describes
    /// every SPEC §9 metric, and starts the recorder's upkeep on the
    /// current tokio runtime (for as long as the process runs).
    pub fn install(tenant_label_cap: usize) -> Result<Metrics, MetricsError> {
        t::set_tenant_label_cap(tenant_label_cap);
        let handle = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Full(t::SIGNAL_PROCESSING_SECONDS.into()),
                LATENCY_BUCKETS,
            )
            .map_err(|e| MetricsError::Install(e.to_string()))?
            .set_buckets_for_metric(Matcher::Full(t::STORE_FLUSH_SECONDS.into()), FLUSH_BUCKETS)
            .map_err(|e| MetricsError::Install(e.to_string()))?
            .install_recorder()
            .map_err(|e| MetricsError::Install(e.to_string()))?;
        describe();
        zero_known_series();
        let upkeep = handle.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(UPKEEP_EVERY);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                upkeep.run_upkeep();
            }
        });
        tai_otp::set_restart_hook(|e| {
            metrics::counter!(t::ACTOR_RESTARTS, "supervisor" => e.supervisor.to_string())
                .increment(1);
            // A whole layer restarting stops the line (SPEC §8: red).
            let severity = if e.supervisor == tai_core::names::TAI_SUP {
                tai_core::alert::Severity::Critical
            } else {
                tai_core::alert::Severity::Warning
            };
            tai_core::alert::raise(tai_core::alert::Alert::new(
                severity,
                "layer_restart",
                format!("restart:{}:{}", e.supervisor, e.child),
                e.supervisor,
                format!("{} restarted {}: {}", e.supervisor, e.child, e.reason),
            ));
        });
        let process = metrics_process::Collector::default();
        process.describe();
        Ok(Metrics { handle, process })
    }

    pub fn render(&self) -> String {
        self.process.collect();
        self.handle.render()
    }
}

/// Puts the series whose label values are known in advance on `/metrics`
/// at 0 from the start. Prometheus's `increase()` and `rate()` see an event
/// only as a change between two samples: a series that first appears at 1
/// (the first dead letter of a reason, a supervisor's first restart) hides
/// that event from them, and from the deploy kit's alert rules built on
/// them.
fn zero_known_series() {
    use tai_core::names;
    for supervisor in [names::TAI_SUP, names::ENGINE_SUP]
        .into_iter()
        .chain(names::LAYERS)
    {
        metrics::counter!(t::ACTOR_RESTARTS, "supervisor" => supervisor).increment(0);
    }
    for reason in t::DEADLETTER_REASONS {
        metrics::counter!(t::DEADLETTER, "reason" => reason).increment(0);
    }
    for severity in [
        tai_core::alert::Severity::Critical,
        tai_core::alert::Severity::Warning,
        tai_core::alert::Severity::Info,
    ] {
        metrics::counter!(t::ALERTS, "severity" => severity.as_str()).increment(0);
    }
    for scope in t::RATE_LIMIT_SCOPES {
        metrics::counter!(t::RATE_LIMITED, "scope" => scope).increment(0);
    }
    for state in tai_core::signal::EngineState::ALL {
        metrics::gauge!(t::ENGINE_STATE, "state" => state.as_str()).increment(0.0);
    }
    metrics::gauge!(t::ENGINES_LIVE).increment(0.0);
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        t::SIGNALS_RECEIVED,
        "Signals received at ingress, by outcome"
    );
    describe_counter!(
        t::SIGNALS_PROCESSED,
        "Signals decided, by tenant, SKU and final status"
    );
    describe_histogram!(
        t::SIGNAL_PROCESSING_SECONDS,
        Unit::Seconds,
        "Time from acceptance to decision"
    );
    describe_histogram!(
        t::STORE_FLUSH_SECONDS,
        Unit::Seconds,
        "Time each group flush of the store took (queue blocks written, sled flushed, the log synced)"
    );
    describe_gauge!(t::QUEUE_DEPTH, "Signals queued (ready and in flight)");
    describe_gauge!(
        t::QUEUE_IN_FLIGHT,
        "Signals handed to engines and not yet acknowledged"
    );
    describe_gauge!(
        t::QUEUE_PARKED,
        "Signals in flight that their engines hold until entitled"
    );
    describe_counter!(
        t::QUEUE_REDELIVERED,
        "Signals the queue took back from an engine to deliver again (an engine or the router restarted, or the visibility timeout passed)"
    );
    describe_counter!(t::DEADLETTER, "Signals dead-lettered, by reason");
    describe_gauge!(
        t::DISK_FREE,
        Unit::Bytes,
        "Space the node may still use on the filesystem of its data dir"
    );
    describe_gauge!(
        t::DISK_TOTAL,
        Unit::Bytes,
        "Size of the filesystem of the data dir"
    );
    describe_gauge!(
        t::ENGINE_STATE,
        "Policy engines per state, live or passive (a passive one in the state it stopped in)"
    );
    describe_gauge!(
        t::ENGINES_LIVE,
        "Policy engines running now; the rest are passivated"
    );
    describe_gauge!(
        t::BREAKER_STATE,
        "Circuit breaker state: 0 closed, 1 half-open, 2 open"
    );
    describe_counter!(t::ACTOR_RESTARTS, "Children restarted, by supervisor");
    describe_counter!(t::RECEIPTS, "Receipts written, by kind");
    describe_counter!(t::ALERTS, "Alerts raised, by severity");
    describe_gauge!(
        t::HTTP_CONNECTIONS,
        "Connections open on each HTTP listener (at most node.max_connections)"
    );
    describe_counter!(
        t::RATE_LIMITED,
        "Requests refused by a rate limit, by scope"
    );
}

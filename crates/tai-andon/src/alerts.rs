//! `andon_alerts`: routes alerts (SPEC §8) by severity to the configured
//! channels (`log`, `webhook`, `slack`, `pagerduty`), drops repeats of a key
//! within the dedupe window, and keeps the recent ones for
//! `GET /admin/alerts`. Each delivery runs in its own task with retries and
//! backoff, so a slow or dead channel never holds up the actor, another
//! channel, or the signal path; a critical alert goes out at once.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef};
use serde_json::{json, Value};
use tai_core::alert::{Alert, AlertMsg, Severity};
use tai_core::config::{AlertsConfig, ChannelConfig, ChannelKind};
use tracing::{error, info, warn};

/// Alerts kept for `GET /admin/alerts`.
const RECENT: usize = 200;
const ATTEMPTS: u32 = 4;
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const SEND_TIMEOUT: Duration = Duration::from_secs(5);
/// Deliveries under way to one channel at once; the rest wait their turn.
/// An alert storm (thousands of engines halted at once, each raising its
/// own alert) otherwise opened a connection per alert. (Engines halted by a
/// shared breaker raise theirs under the breaker's key: repeats.)
const CHANNEL_CONCURRENCY: usize = 4;
/// Deliveries one channel may have waiting or under way; past it an alert
/// is recorded (`GET /admin/alerts`, the log) but not sent there.
const CHANNEL_BACKLOG: usize = 1_000;

/// One channel's line of deliveries.
#[derive(Clone)]
struct Line {
    permits: std::sync::Arc<tokio::sync::Semaphore>,
    /// Deliveries waiting or under way.
    queued: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Line {
    fn new() -> Self {
        Line {
            permits: std::sync::Arc::new(tokio::sync::Semaphore::new(CHANNEL_CONCURRENCY)),
            queued: Default::default(),
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub struct Alerts;

pub struct AlertsState {
    config: AlertsConfig,
    client: reqwest::Client,
    next_id: u64,
    /// When each key last went out (a resolve clears it).
    last_sent: HashMap<String, u64>,
    recent: VecDeque<Record>,
    /// Per channel name.
    lines: HashMap<String, Line>,
}

struct Record {
    id: u64,
    alert: Alert,
    deduplicated: bool,
    /// Per channel: `pending`, `delivered` or the last error.
    deliveries: Vec<(String, String)>,
}

impl Record {
    fn json(&self) -> Value {
        let mut v = serde_json::to_value(&self.alert).unwrap_or_default();
        v["id"] = json!(self.id);
        v["deduplicated"] = json!(self.deduplicated);
        v["deliveries"] = self
            .deliveries
            .iter()
            .map(|(c, s)| json!({"channel": c, "status": s}))
            .collect();
        v
    }
}

/// The request body a channel expects.
fn body(kind: ChannelKind, ch: &ChannelConfig, a: &Alert) -> Value {
    match kind {
        ChannelKind::Slack => {
            let mark = if a.resolve {
                "RESOLVED"
            } else {
                a.severity.as_str()
            };
            json!({"text": format!("[{}] {}: {} ({})", mark.to_uppercase(), a.kind, a.summary, a.source)})
        }
        ChannelKind::Pagerduty => json!({
            "routing_key": ch.routing_key.clone().unwrap_or_default(),
            "event_action": if a.resolve { "resolve" } else { "trigger" },
            "dedup_key": a.key,
            "payload": {
                "summary": a.summary,
                "source": a.source,
                "severity": a.severity.as_str(),
                "component": "tai-node",
                "class": a.kind,
                "timestamp_ms": a.at_ms,
            },
        }),
        ChannelKind::Webhook | ChannelKind::Log => serde_json::to_value(a).unwrap_or_default(),
    }
}

async fn deliver(client: reqwest::Client, url: String, body: Value) -> Result<(), String> {
    let mut backoff = FIRST_BACKOFF;
    let mut last = String::new();
    for attempt in 1..=ATTEMPTS {
        match client
            .post(&url)
            .timeout(SEND_TIMEOUT)
            .json(&body)
            .send()
            .await
        {
            Ok(r) if r.status().is_success() => return Ok(()),
            Ok(r) => last = format!("answered {}", r.status()),
            Err(e) => last = format!("request failed: {e}"),
        }
        if attempt < ATTEMPTS {
            tokio::time::sleep(backoff).await;
            backoff *= 2;
        }
    }
    Err(format!("{last} after {ATTEMPTS} attempts"))
}

/// Whether `alert` repeats one of its key sent within the last `window`
/// ms. A send time past the alert's own (the wall clock stepped back since,
/// NTP or a VM snapshot restored) is taken as the alert's: it silences
/// repeats for one window from the step, not for the step's length too.
fn repeats(last_sent: &mut HashMap<String, u64>, alert: &Alert, window: u64) -> bool {
    last_sent.get_mut(&alert.key).is_some_and(|t| {
        *t = (*t).min(alert.at_ms);
        alert.at_ms - *t < window
    })
}

impl Alerts {
    fn raise(myself: &ActorRef<AlertMsg>, st: &mut AlertsState, alert: Alert) {
        st.next_id += 1;
        let id = st.next_id;
        let window = st.config.dedupe_window_secs.saturating_mul(1000);
        let repeat = !alert.resolve && repeats(&mut st.last_sent, &alert, window);
        let mut record = Record {
            id,
            alert,
            deduplicated: repeat,
            deliveries: Vec::new(),
        };
        if !repeat {
            let a = &record.alert;
            metrics::counter!(tai_core::telemetry::ALERTS, "severity" => a.severity.as_str())
                .increment(1);
            if a.resolve {
                st.last_sent.remove(&a.key);
            } else {
                st.last_sent.insert(a.key.clone(), a.at_ms);
            }
            Self::log(a);
            for ch in st
                .config
                .channels
                .iter()
                .filter(|c| c.severities.contains(&a.severity))
            {
                let Some(url) = ch.url.clone().filter(|_| ch.kind != ChannelKind::Log) else {
                    record
                        .deliveries
                        .push((ch.name.clone(), "delivered".into()));
                    continue;
                };
                let line = st
                    .lines
                    .entry(ch.name.clone())
                    .or_insert_with(Line::new)
                    .clone();
                use std::sync::atomic::Ordering::Relaxed;
                if line.queued.load(Relaxed) >= CHANNEL_BACKLOG {
                    warn!(alert = id, channel = %ch.name, "alert not sent: {CHANNEL_BACKLOG} deliveries already wait for this channel");
                    record.deliveries.push((
                        ch.name.clone(),
                        format!(
                            "dropped: {CHANNEL_BACKLOG} deliveries already wait for this channel"
                        ),
                    ));
                    continue;
                }
                line.queued.fetch_add(1, Relaxed);
                record.deliveries.push((ch.name.clone(), "pending".into()));
                let (client, body, me, name) = (
                    st.client.clone(),
                    body(ch.kind, ch, a),
                    myself.clone(),
                    ch.name.clone(),
                );
                tokio::spawn(async move {
                    let result = match line.permits.acquire().await {
                        Ok(_turn) => deliver(client, url, body).await,
                        Err(_) => Err("the channel's line is closed".to_string()),
                    };
                    line.queued.fetch_sub(1, Relaxed);
                    let _ = me.send_message(AlertMsg::Delivered {
                        id,
                        channel: name,
                        result,
                    });
                });
            }
        }
        st.recent.push_back(record);
        while st.recent.len() > RECENT {
            st.recent.pop_front();
        }
        // Bounded: keys whose window has passed are forgotten.
        if st.last_sent.len() > 10_000 {
            let now = tai_core::signal::now_ms();
            st.last_sent.retain(|_, t| now.saturating_sub(*t) < window);
        }
    }

    fn log(a: &Alert) {
        let what = if a.resolve { "alert resolved" } else { "alert" };
        match (a.severity, a.resolve) {
            (_, true) | (Severity::Info, _) => {
                info!(key = %a.key, kind = %a.kind, source = %a.source, summary = %a.summary, "{what}")
            }
            (Severity::Warning, _) => {
                warn!(key = %a.key, kind = %a.kind, source = %a.source, summary = %a.summary, "{what}")
            }
            (Severity::Critical, _) => {
                error!(key = %a.key, kind = %a.kind, source = %a.source, summary = %a.summary, "{what}")
            }
        }
    }
}

impl Actor for Alerts {
    type Msg = AlertMsg;
    type State = AlertsState;
    type Arguments = AlertsConfig;

    async fn pre_start(
        &self,
        myself: ActorRef<AlertMsg>,
        config: AlertsConfig,
    ) -> Result<AlertsState, ActorProcessingErr> {
        // Redirects are not followed: a POST turned into a GET is no delivery.
        let client = reqwest::Client::builder()
            .user_agent(concat!("tai-node/", env!("CARGO_PKG_VERSION")))
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        let mut st = AlertsState {
            config,
            client,
            next_id: 0,
            last_sent: HashMap::new(),
            recent: VecDeque::new(),
            lines: HashMap::new(),
        };
        // Raised while no router ran, or left by one that died: in the
        // order raised (its name is registered already, so later ones tell
        // it).
        let kept = tai_core::alert::take_pending();
        if !kept.is_empty() {
            info!(
                alerts = kept.len(),
                "routing the alerts raised while andon_alerts was not running"
            );
        }
        for a in kept {
            Self::raise(&myself, &mut st, a);
        }
        Ok(st)
    }

    async fn handle(
        &self,
        myself: ActorRef<AlertMsg>,
        msg: AlertMsg,
        st: &mut AlertsState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            AlertMsg::Raised => {
                for a in tai_core::alert::take_pending() {
                    Self::raise(&myself, st, a);
                }
            }
            AlertMsg::Recent(reply) => {
                let _ = reply.send(st.recent.iter().map(Record::json).collect());
            }
            AlertMsg::Delivered {
                id,
                channel,
                result,
            } => {
                if let Err(e) = &result {
                    error!(alert = id, channel = %channel, error = %e, "alert not delivered");
                }
                if let Some(r) = st.recent.iter_mut().find(|r| r.id == id) {
                    if let Some(d) = r.deliveries.iter_mut().find(|(c, _)| *c == channel) {
                        d.1 = match result {
                            Ok(()) => "delivered".into(),
                            Err(e) => e,
                        };
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(at_ms: u64) -> Alert {
        let mut a = Alert::new(Severity::Warning, "k", "key", "src", "summary");
        a.at_ms = at_ms;
        a
    }

    /// Alerts raised while the router does not run (before it starts, as
    /// its layer restarts) reach it when it starts, in the order raised;
    /// they used to be only logged. Then it takes alerts as before.
    #[tokio::test]
    async fn alerts_raised_while_the_router_is_down_reach_it_when_it_starts() {
        use tai_core::msg::ANDON_ALERTS;
        let alert = |key: &str, resolve: bool| {
            let a = Alert::new(
                Severity::Critical,
                "layer_restart",
                key,
                "andon_sup",
                "down",
            );
            if resolve {
                a.resolved()
            } else {
                a
            }
        };
        let recent = |a: &ActorRef<AlertMsg>| {
            let a = a.clone();
            async move {
                let list = ractor::call!(a, AlertMsg::Recent).unwrap();
                list.iter()
                    .map(|r| (r["key"].as_str().unwrap().to_string(), r["resolve"] == true))
                    .collect::<Vec<_>>()
            }
        };
        tai_core::alert::raise(alert("early-1", false));
        tai_core::alert::raise(alert("early-2", false));
        tai_core::alert::raise(alert("early-1", true));
        let (router, _) = Actor::spawn(Some(ANDON_ALERTS.into()), Alerts, AlertsConfig::default())
            .await
            .unwrap();
        tai_core::alert::raise(alert("late", false));
        let keys = |v: &[(&str, bool)]| -> Vec<(String, bool)> {
            v.iter().map(|(k, r)| (k.to_string(), *r)).collect()
        };
        assert_eq!(
            recent(&router).await,
            keys(&[
                ("early-1", false),
                ("early-2", false),
                ("early-1", true),
                ("late", false)
            ])
        );
        // Down again (its layer restarting): kept for the next one.
        router.stop_and_wait(None, None).await.unwrap();
        tai_core::alert::raise(alert("between", false));
        let (router, _) = Actor::spawn(Some(ANDON_ALERTS.into()), Alerts, AlertsConfig::default())
            .await
            .unwrap();
        assert_eq!(recent(&router).await, keys(&[("between", false)]));
        assert!(tai_core::alert::take_pending().is_empty());
        router.stop_and_wait(None, None).await.unwrap();
    }

    /// A router killed with alerts raised but not yet routed (a mailbox
    /// dies with its actor) leaves them to the next one, every one, in order.
    #[tokio::test]
    async fn alerts_a_killed_router_had_not_routed_reach_the_next() {
        use tai_core::msg::ANDON_ALERTS;
        let spawn = || Actor::spawn(Some(ANDON_ALERTS.into()), Alerts, AlertsConfig::default());
        let (router, handle) = spawn().await.unwrap();
        let keys: Vec<String> = (0..100).map(|i| format!("storm-{i}")).collect();
        // On this one-thread runtime the router does not run until the test
        // awaits, and then takes its kill before any message.
        for key in &keys {
            tai_core::alert::raise(Alert::new(Severity::Warning, "k", key, "src", "s"));
        }
        router.kill();
        handle.await.unwrap();
        let (router, _) = spawn().await.unwrap();
        let list = ractor::call!(router, AlertMsg::Recent).unwrap();
        let routed: Vec<&str> = list.iter().map(|r| r["key"].as_str().unwrap()).collect();
        assert_eq!(routed, keys);
        router.stop_and_wait(None, None).await.unwrap();
    }

    #[test]
    fn a_repeat_is_silenced_for_one_window_even_after_the_clock_steps_back() {
        let hour = 3_600_000;
        let mut sent = HashMap::from([("key".to_string(), 10 * hour)]);
        assert!(repeats(&mut sent, &at(10 * hour + 59_000), 60_000));
        assert!(!repeats(&mut sent, &at(10 * hour + 60_000), 60_000));
        // Five hours back: still a repeat at the step, no more a minute on.
        assert!(repeats(&mut sent, &at(5 * hour), 60_000));
        assert!(!repeats(&mut sent, &at(5 * hour + 60_000), 60_000));
        assert!(!repeats(&mut HashMap::new(), &at(0), 60_000));
    }
}

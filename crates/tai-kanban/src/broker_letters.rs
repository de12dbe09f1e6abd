//! Signals the broker dead-lettered by itself, recorded by the node.
//!
//! RabbitMQ dead-letters a message on its own when a queue policy says so:
//! `message-ttl` (reason `expired`), `max-length` with `drop-head`
//! (`maxlen`), a quorum queue's `delivery-limit` (`delivery_limit`). The
//! work queue's dead-letter exchange then routes it to the dead-letter
//! queue, and the node never heard of it: its signal, answered 202, stayed
//! `accepted` for ever, with no dead letter, receipt, metric or alert.
//!
//! So the dead-letter exchange also routes to a watch queue
//! (`{queue}.deadletter.watch`, single active consumer), which the node
//! consumes: a message the node dead-lettered itself (it carries
//! `x-tai-deadletter-reason`) is already recorded; any other is committed
//! like a poison message (dead letter, `deadlettered` status and a
//! `signal_deadlettered` receipt, one ledger commit) with the broker's
//! reason, unless its signal was decided already (a second copy of it).
//! It is acknowledged only once that is durable. The dead-letter queue
//! keeps its own copy of every message, as before.

use std::time::Duration;

use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel};
use ractor::ActorRef;
use tai_core::alert::{Alert, Severity};
use tai_core::msg::KanbanMsg;
use tai_core::signal::{now_ms, DeadLetter, Signal};
use tai_store::Store;
use tracing::{info, warn};

use crate::amqp::{claim_letter, letter_done, watch_lost, Claim, REASON_HEADER};
use crate::poison::{self, Poisoned};

/// The watch queue of work queue `queue`.
pub fn watch_queue(queue: &str) -> String {
    format!("{queue}.deadletter.watch")
}

/// Why the broker dead-lettered a message: the newest `x-death` entry's
/// `reason` (`expired`, `maxlen`, `rejected`, `delivery_limit`).
fn broker_reason(props: &BasicProperties) -> Option<String> {
    let headers = props.headers().as_ref()?.inner();
    let AMQPValue::FieldArray(deaths) = headers.get("x-death")? else {
        return None;
    };
    let AMQPValue::FieldTable(newest) = deaths.as_slice().first()? else {
        return None;
    };
    match newest.inner().get("reason")? {
        AMQPValue::LongString(s) => Some(s.to_string()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        _ => None,
    }
}

/// What to do with one message of the watch queue.
enum Letter {
    /// Dead-lettered by the node itself (poison): recorded already.
    Ours,
    /// Not a signal (a broker-side copy of a malformed message).
    Unreadable(String),
    Signal(Box<Signal>, String),
}

fn read(data: &[u8], props: &BasicProperties) -> Letter {
    let ours = props
        .headers()
        .as_ref()
        .is_some_and(|h| h.contains_key(REASON_HEADER));
    if ours {
        return Letter::Ours;
    }
    let reason = broker_reason(props).unwrap_or_else(|| "dead-lettered by the broker".into());
    match serde_json::from_slice::<Signal>(data) {
        Ok(s) => Letter::Signal(Box::new(s), reason),
        Err(e) => Letter::Unreadable(format!("{reason}; not a signal: {e}")),
    }
}

/// Records one signal the broker dead-lettered; `Ok(false)` if it was
/// decided already (the ledger checks, in turn with every decision).
async fn record(store: &Store, s: Signal, reason: String) -> Result<bool, String> {
    let p = Poisoned {
        tenant_id: s.tenant_id.clone(),
        sku_id: s.sku_id.clone(),
        signal_id: Some(s.id.clone()),
        trace_id: s.trace_id.clone(),
        reason: reason.clone(),
        letter: Some(DeadLetter {
            signal: s,
            reason,
            at_ms: now_ms(),
        }),
    };
    poison::commit(store, p).await
}

/// What became of a signal the broker dead-lettered.
enum Outcome {
    Recorded,
    /// Decided (or dead-lettered) already.
    Final,
}

/// Records a signal the broker dead-lettered once no copy of it is held
/// by the queue (`kanban`). A held copy is being decided (or waits,
/// parked for an entitlement): recorded now, the dead letter and that
/// copy's decision would give the signal two ends; acknowledged now
/// without a record, the signal would be lost with that copy if the node
/// stopped before deciding it (the broker may have no other copy: the
/// held one may be the very message it dead-lettered, returned at a
/// reconnect). So the letter waits, unacknowledged, for the held copy's
/// end, and then the ledger finds the signal final and writes nothing.
async fn settle(
    store: &Store,
    kanban: &ActorRef<KanbanMsg>,
    s: Signal,
    reason: String,
) -> Result<Outcome, String> {
    let key = (s.tenant_id.clone(), s.id.clone());
    loop {
        match claim_letter(kanban, key.clone()).await {
            None => return Err("the queue is restarting".into()),
            Some(Claim::Granted) => break,
            Some(Claim::Held(done)) => {
                info!(tenant = %key.0, signal = %key.1, reason = %reason,
                    "the broker dead-lettered a copy of a signal held here; waiting for that copy's decision");
                done.await.map_err(|_| "the queue stopped".to_string())?;
            }
        }
    }
    let result = record(store, s, reason).await;
    letter_done(kanban, key);
    match result? {
        true => Ok(Outcome::Recorded),
        false => Ok(Outcome::Final),
    }
}

/// Settles one signal of the watch queue and acknowledges it (or requeues
/// it, to be tried again, if it could not be recorded).
async fn letter(
    store: Store,
    kanban: ActorRef<KanbanMsg>,
    queue: String,
    s: Signal,
    reason: String,
    acker: lapin::Acker,
) {
    let (tenant, id, sku) = (s.tenant_id.clone(), s.id.clone(), s.sku_id.clone());
    let settled = settle(&store, &kanban, s, reason.clone()).await;
    match &settled {
        Ok(Outcome::Recorded) => {
            metrics::counter!(tai_core::telemetry::DEADLETTER, "reason" => reason.clone())
                .increment(1);
            warn!(tenant = %tenant, signal = %id, reason = %reason, queue = %queue,
                "the broker dead-lettered a signal (a queue policy?); recorded as a dead letter");
            tai_core::alert::raise(Alert::new(
                Severity::Warning,
                "deadletter",
                format!("deadletter:{queue}:{reason}"),
                format!("engine:{tenant}:{sku}"),
                format!("the broker dead-lettered signals of {queue} ({reason}): check the queue's policies"),
            ));
        }
        Ok(Outcome::Final) => {
            info!(tenant = %tenant, signal = %id, reason = %reason,
                "the broker dead-lettered a copy of a signal decided already");
        }
        Err(e) => {
            // Back to the watch queue, to be recorded later.
            warn!(error = %e, "cannot record a signal the broker dead-lettered; trying again");
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
    // On a channel that is gone this fails: the broker has the message
    // back for the next connection's watcher.
    let _ = match settled {
        Ok(_) => acker.ack(BasicAckOptions::default()).await,
        Err(_) => {
            acker
                .nack(BasicNackOptions {
                    requeue: true,
                    ..Default::default()
                })
                .await
        }
    };
}

/// Consumes the watch queue of `queue` on `ch`, a channel of its own,
/// until the connection goes (the task is aborted with its connection's
/// others). Each signal is settled by a task of its own, as one may wait
/// long for its held copy. If the broker ends the consumer or closes its
/// channel alone (a letter left unacknowledged past the broker's
/// `consumer_timeout`, say), connection `gen` is reported lost: the node
/// connects anew rather than leave the watch queue unread.
pub async fn watch(
    ch: Channel,
    queue: String,
    store: Store,
    kanban: ActorRef<KanbanMsg>,
    gen: u64,
) {
    let watch = watch_queue(&queue);
    let consumer = async {
        ch.basic_qos(64, BasicQosOptions::default()).await?;
        let tag = format!("tai-{}-watch", std::process::id());
        ch.basic_consume(
            watch.as_str().into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
    };
    let mut consumer = match consumer.await {
        Ok(c) => c,
        Err(e) => {
            warn!(queue = %watch, error = %e, "cannot watch for signals the broker dead-letters");
            watch_lost(&kanban, gen, format!("cannot consume {watch}: {e}"));
            return;
        }
    };
    let reason = loop {
        let d = match consumer.next().await {
            Some(Ok(d)) => d,
            Some(Err(e)) => break e.to_string(),
            None => break format!("the broker cancelled the consumer of {watch}"),
        };
        match read(&d.data, &d.properties) {
            Letter::Ours => {}
            Letter::Unreadable(why) => {
                warn!(queue = %queue, reason = %why, "the broker dead-lettered a message that is not a signal");
            }
            Letter::Signal(s, reason) => {
                let task = letter(
                    store.clone(),
                    kanban.clone(),
                    queue.clone(),
                    *s,
                    reason,
                    d.acker,
                );
                tokio::spawn(task);
                continue;
            }
        }
        if let Err(e) = d.acker.ack(BasicAckOptions::default()).await {
            break e.to_string();
        }
    };
    watch_lost(&kanban, gen, reason);
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::{FieldArray, LongString};

    fn props(headers: Vec<(&str, AMQPValue)>) -> BasicProperties {
        let mut t = FieldTable::default();
        for (k, v) in headers {
            t.insert(k.into(), v);
        }
        BasicProperties::default().with_headers(t)
    }

    fn death(reason: &str) -> AMQPValue {
        let mut t = FieldTable::default();
        t.insert(
            "reason".into(),
            AMQPValue::LongString(LongString::from(reason)),
        );
        AMQPValue::FieldTable(t)
    }

    #[test]
    fn the_newest_death_gives_the_reason_and_our_own_letters_are_known() {
        let signal = br#"{"id":"s1","tenant_id":"t","sku_id":"k","kind":"payment","payload":{},"received_at_ms":1}"#;
        let expired = props(vec![(
            "x-death",
            AMQPValue::FieldArray(FieldArray::from(vec![death("expired"), death("rejected")])),
        )]);
        match read(signal, &expired) {
            Letter::Signal(s, reason) => {
                assert_eq!((s.id.as_str(), reason.as_str()), ("s1", "expired"))
            }
            _ => panic!("a signal the broker expired"),
        }
        let ours = props(vec![(
            REASON_HEADER,
            AMQPValue::LongString(LongString::from("poison")),
        )]);
        assert!(matches!(read(signal, &ours), Letter::Ours));
        match read(b"not json", &expired) {
            Letter::Unreadable(why) => assert!(why.starts_with("expired; not a signal"), "{why}"),
            _ => panic!("not a signal"),
        }
        match read(signal, &BasicProperties::default()) {
            Letter::Signal(_, reason) => assert_eq!(reason, "dead-lettered by the broker"),
            _ => panic!("a signal"),
        }
    }
}

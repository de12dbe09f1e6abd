//! `tai drain-amqp`: moves what an amqp work queue holds into a stopped
//! node's fallback buffer, for a switch to the embedded backend. The
//! embedded queue does not read the broker, so without it the signals an
//! amqp node left there wait until an amqp node drains them.

use std::collections::HashSet;
use std::time::Duration;

use lapin::options::{BasicAckOptions, BasicGetOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use tai_core::signal::Signal;
use tai_store::Store;

/// Signals moved per store write (each batch is flushed before its
/// messages are acknowledged).
const BATCH: usize = 256;

/// Tries after the first when the broker cuts a drain off (a connection
/// dropped or closed, no answer: a broker restarting), 0.5 s apart at
/// first, doubling to 8 s (~40 s in all). A cut leaves nothing half done:
/// what a try moved is durable before it is acknowledged, the broker takes
/// back what was not acknowledged, and the next try acknowledges those
/// signals without moving them again.
const RETRIES: u32 = 8;

/// Why a try stopped short.
enum Cut {
    /// The broker's passing trouble: tried again.
    Broker(String),
    /// The store, a queue that is not there, a consumer on it: not.
    Final(String),
}

/// A broker error, `why`: passing, unless the broker answered about the
/// queue itself (not found, refused, locked).
fn cut(why: String, e: &lapin::Error) -> Cut {
    if e.is_amqp_soft_error() {
        Cut::Final(why)
    } else {
        Cut::Broker(why)
    }
}

/// What a drain did so far, over its tries.
#[derive(Default)]
struct Progress {
    done: Drained,
    /// Signals earlier tries moved, not met again since: met after a cut
    /// (moved, its acknowledgement cut off), one is acknowledged and
    /// counted nowhere; a copy met after that counts as held already.
    earlier: HashSet<(String, String)>,
    /// Signals this try moved.
    now: Vec<(String, String)>,
}

/// What a drain did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Drained {
    /// Signals appended to the fallback buffer.
    pub moved: u64,
    /// Signals the data dir already holds (decided, or in its queue or
    /// buffer), or a second copy of one moved: acknowledged only.
    pub already: u64,
    /// Messages that are not signals: left in the queue.
    pub unreadable: u64,
}

/// Takes every message `queue` holds (basic.get, one at a time), appends
/// the signals to `store`'s fallback buffer in the queue's order (durable
/// before any is acknowledged) and acknowledges them. A node started on
/// the data dir takes them from there on either backend: the embedded
/// queue moves the buffer into itself, an amqp node publishes it. Refused
/// while any consumer reads the queue: a node on it would split the
/// signals between two data dirs.
///
/// A broker that cuts the drain off (or does not answer) is tried again
/// ([`RETRIES`]), going on from where it was.
pub async fn drain_broker_queue(url: &str, queue: &str, store: &Store) -> Result<Drained, String> {
    let mut p = Progress::default();
    let mut wait = Duration::from_millis(500);
    let mut tries = 0;
    loop {
        // What is not a signal stays in the queue, and comes back to each try.
        p.done.unreadable = 0;
        let result = drain_once(url, queue, store, &mut p).await;
        let now = std::mem::take(&mut p.now);
        p.earlier.extend(now);
        match result {
            Ok(()) => return Ok(p.done),
            Err(Cut::Broker(e)) if tries < RETRIES => {
                tries += 1;
                tracing::warn!(
                    error = %e,
                    moved = p.done.moved,
                    retry_in_ms = wait.as_millis() as u64,
                    "the broker cut the drain off: trying again (what it moved is kept)"
                );
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(8));
            }
            Err(Cut::Broker(e)) => {
                return Err(format!(
                    "{e} ({} tries; the {} signal(s) moved meanwhile are kept: run it again)",
                    tries + 1,
                    p.done.moved
                ))
            }
            Err(Cut::Final(e)) => return Err(e),
        }
    }
}

/// One try: a connection of its own.
async fn drain_once(url: &str, queue: &str, store: &Store, p: &mut Progress) -> Result<(), Cut> {
    let props = ConnectionProperties::default()
        .with_connection_name(format!("tai-drain-{}", std::process::id()).into());
    let conn = tokio::time::timeout(
        super::amqp::CONNECT_TIMEOUT,
        Connection::connect(url, props),
    )
    .await
    .map_err(|_| Cut::Broker(format!("no answer from the broker at {url}")))?
    .map_err(|e| cut(format!("cannot connect to the broker: {e}"), &e))?;
    let drained = drain(&conn, queue, store, p).await;
    let _ = conn.close(200, "drained".into()).await;
    drained
}

async fn drain(conn: &Connection, queue: &str, store: &Store, p: &mut Progress) -> Result<(), Cut> {
    let broker = |e: lapin::Error| cut(format!("the broker: {e}"), &e);
    let store_err = |e: tai_store::StoreError| Cut::Final(format!("the store: {e}"));
    let ch = conn.create_channel().await.map_err(broker)?;
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let q = ch
        .queue_declare(queue.into(), passive, FieldTable::default())
        .await
        .map_err(|e| match broker(e) {
            Cut::Final(why) => Cut::Final(format!("no queue {queue:?} on the broker ({why})")),
            cut => cut,
        })?;
    if q.consumer_count() > 0 {
        return Err(Cut::Final(format!(
            "{} consumer(s) read {queue:?}: a node still runs on it; stop it first (or let it decide what the queue holds)",
            q.consumer_count()
        )));
    }
    let mut held = store.held_keys().map_err(store_err)?;
    loop {
        let mut signals: Vec<Signal> = Vec::new();
        let mut tags = Vec::new();
        while signals.len() < BATCH {
            let Some(m) = ch
                .basic_get(queue.into(), BasicGetOptions { no_ack: false })
                .await
                .map_err(broker)?
            else {
                break;
            };
            match crate::amqp::read_signal(&m.delivery.data) {
                Ok(s) => {
                    signals.push(s);
                    tags.push(m.delivery.delivery_tag);
                }
                // Left unacknowledged: the broker takes it back when the
                // channel closes (a node's consumer dead-letters it).
                Err(_) => p.done.unreadable += 1,
            }
        }
        if signals.is_empty() {
            return Ok(());
        }
        let mut fresh = Vec::with_capacity(signals.len());
        for s in signals {
            let rec = store
                .signal_record(&s.tenant_id, &s.id)
                .map_err(store_err)?;
            let decided = rec.is_some_and(|r| r.status.is_final());
            let key = (s.tenant_id.clone(), s.id.clone());
            if p.earlier.remove(&key) {
                // Moved by an earlier try, whose acknowledgement was cut off.
            } else if decided || !held.insert(key.clone()) {
                p.done.already += 1;
            } else {
                p.now.push(key);
                fresh.push(s);
            }
        }
        if !fresh.is_empty() {
            p.done.moved += fresh.len() as u64;
            store
                .buffer_append(&fresh, u64::MAX, false)
                .map_err(store_err)?;
            store.flush().map_err(store_err)?;
        }
        for tag in tags {
            ch.basic_ack(tag, BasicAckOptions::default())
                .await
                .map_err(broker)?;
        }
    }
}

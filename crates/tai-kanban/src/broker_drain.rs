//! `tai drain-amqp`: moves what an amqp work queue holds into a stopped
//! node's fallback buffer, for a switch to the embedded backend. The
//! embedded queue does not read the broker, so without it the signals an
//! amqp node left there wait until an amqp node drains them.

use lapin::options::{BasicAckOptions, BasicGetOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use tai_core::signal::Signal;
use tai_store::Store;

/// Signals moved per store write (each batch is flushed before its
/// messages are acknowledged).
const BATCH: usize = 256;

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
pub async fn drain_broker_queue(url: &str, queue: &str, store: &Store) -> Result<Drained, String> {
    let props = ConnectionProperties::default()
        .with_connection_name(format!("tai-drain-{}", std::process::id()).into());
    let conn = tokio::time::timeout(
        super::amqp::CONNECT_TIMEOUT,
        Connection::connect(url, props),
    )
    .await
    .map_err(|_| format!("no answer from the broker at {url}"))?
    .map_err(|e| format!("cannot connect to the broker: {e}"))?;
    let drained = drain(&conn, queue, store).await;
    let _ = conn.close(200, "drained".into()).await;
    drained
}

async fn drain(conn: &Connection, queue: &str, store: &Store) -> Result<Drained, String> {
    let broker = |e: lapin::Error| format!("the broker: {e}");
    let store_err = |e: tai_store::StoreError| format!("the store: {e}");
    let ch = conn.create_channel().await.map_err(broker)?;
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let q = ch
        .queue_declare(queue.into(), passive, FieldTable::default())
        .await
        .map_err(|e| format!("no queue {queue:?} on the broker ({e})"))?;
    if q.consumer_count() > 0 {
        return Err(format!(
            "{} consumer(s) read {queue:?}: a node still runs on it; stop it first (or let it decide what the queue holds)",
            q.consumer_count()
        ));
    }
    let mut held = store.held_keys().map_err(store_err)?;
    let mut done = Drained::default();
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
                Err(_) => done.unreadable += 1,
            }
        }
        if signals.is_empty() {
            return Ok(done);
        }
        let mut fresh = Vec::with_capacity(signals.len());
        for s in signals {
            let rec = store
                .signal_record(&s.tenant_id, &s.id)
                .map_err(store_err)?;
            let decided = rec.is_some_and(|r| r.status.is_final());
            if decided || !held.insert((s.tenant_id.clone(), s.id.clone())) {
                done.already += 1;
            } else {
                fresh.push(s);
            }
        }
        if !fresh.is_empty() {
            done.moved += fresh.len() as u64;
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

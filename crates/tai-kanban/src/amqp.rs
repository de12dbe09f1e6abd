//! `kanban_queue` on RabbitMQ (`kanban.backend = "amqp"`), the only module
//! that names lapin.
//!
//! The promise is the embedded queue's: a 202 is sent only once the broker
//! confirmed the message (publisher confirms, pipelined) or, while the broker
//! is down, once it is in the local fallback buffer (sled, bounded); a
//! message is acknowledged to the broker only after its decision, checkpoint
//! and receipts are durable. Dispatch to the engines goes through the same
//! [`Dispatch`] as the embedded queue (WIP limit, per-engine prefetch,
//! tenants in turn).
//!
//! One actor owns the state; tasks do the waiting: one connect attempt at a
//! time (exponential backoff with jitter between attempts), a consumer task
//! per connection forwarding deliveries, a publish task per batch (one at a
//! time, so batches reach the broker in order; the next batch gathers
//! enqueues until the one before has handed its messages to the channel),
//! one buffer drain at a time, and one acker. Everything the tasks report
//! comes back as [`KanbanMsg::Backend`] events tagged with the connection
//! generation, so a late report from a dead connection is recognised and
//! ignored.
//!
//! Exactly once: every delivery is treated as possibly decided (the engine
//! checks the store first), and a second copy of a signal already held here
//! (republished after a lost confirm, or redelivered after a reconnect while
//! the engine still holds the first) is not dispatched: it is acknowledged
//! with the first one's decision.

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{Hash, Hasher};
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions,
    BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tai_core::alert::{Alert, Severity};
use tai_core::config::{AmqpQueueType, KanbanConfig};
use tai_core::msg::{
    BrokerStats, Delivery, EnqueueOutcome, IdOrigin, KanbanMsg, QueueStats, ReplayOutcome,
};
use tai_core::signal::{now_ms, DeadLetter, Signal, SignalRecord};
use tai_store::meta::{self, SeqBase};
use tai_store::Store;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use crate::dispatch::Dispatch;
use crate::poison::{self, Poisoned};
use crate::{send_to_router, QueueGauges};

/// Header with the reason a dead-lettered message carries.
pub const REASON_HEADER: &str = "x-tai-deadletter-reason";
/// Signals the drain publishes per confirm round.
const DRAIN_BATCH: usize = 512;
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A message's signal, or why it is not one (a payload no policy could
/// read is refused as ingress refuses it: only a message published past
/// the node can carry one).
pub(crate) fn read_signal(data: &[u8]) -> Result<Signal, String> {
    serde_json::from_slice::<Signal>(data)
        .map_err(|e| e.to_string())
        .and_then(|s| s.payload.check().map(|()| s))
}

#[derive(Clone, Copy, Debug)]
pub struct AmqpQueue;

pub struct AmqpArgs {
    pub store: Store,
    pub config: KanbanConfig,
    /// In flight longer than this without an ack: sent to the engine again.
    pub visibility: Duration,
}

/// The names the node declares.
#[derive(Clone, Debug)]
pub struct Topology {
    pub queue: String,
    pub deadletter: String,
    pub queue_type: AmqpQueueType,
    pub prefetch: u16,
}

impl Topology {
    pub fn new(config: &KanbanConfig) -> Self {
        Topology {
            queue: config.amqp_queue.clone(),
            deadletter: format!("{}.deadletter", config.amqp_queue),
            queue_type: config.amqp_queue_type,
            prefetch: u16::try_from(config.prefetch).unwrap_or(u16::MAX),
        }
    }

    /// The work queue's arguments (a redeclare must repeat them exactly).
    fn queue_args(&self) -> FieldTable {
        let mut args = FieldTable::default();
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(LongString::from(self.deadletter.as_str())),
        );
        args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
        let kind = match self.queue_type {
            AmqpQueueType::Classic => "classic",
            AmqpQueueType::Quorum => "quorum",
        };
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString(LongString::from(kind)),
        );
        args
    }

    /// Declares the work queue, the dead-letter exchange and queue, bound
    /// (idempotent: at start and after every reconnect). Returns the
    /// messages ready in the work queue then.
    pub async fn declare(&self, ch: &Channel) -> lapin::Result<u64> {
        let durable = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        ch.exchange_declare(
            self.deadletter.as_str().into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
        ch.queue_declare(
            self.deadletter.as_str().into(),
            durable,
            FieldTable::default(),
        )
        .await?;
        ch.queue_bind(
            self.deadletter.as_str().into(),
            self.deadletter.as_str().into(),
            self.queue.as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
        // Also to the watch queue: what the broker dead-letters by itself
        // reaches the node (`broker_letters`).
        let watch = crate::broker_letters::watch_queue(&self.queue);
        let mut single = FieldTable::default();
        single.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
        ch.queue_declare(watch.as_str().into(), durable, single)
            .await?;
        ch.queue_bind(
            watch.as_str().into(),
            self.deadletter.as_str().into(),
            self.queue.as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
        let work = ch
            .queue_declare(self.queue.as_str().into(), durable, self.queue_args())
            .await?;
        Ok(u64::from(work.message_count()))
    }
}

/// A signal as the node publishes it: JSON body, persistent, its metadata in headers.
pub fn message(signal: &Signal) -> (Vec<u8>, BasicProperties) {
    let body = serde_json::to_vec(signal).expect("a signal serializes");
    let mut headers = FieldTable::default();
    for (k, v) in [
        ("tai-tenant", signal.tenant_id.as_str()),
        ("tai-sku", signal.sku_id.as_str()),
        ("tai-kind", signal.kind.as_str()),
    ] {
        headers.insert(k.into(), AMQPValue::LongString(LongString::from(v)));
    }
    if let Some(t) = &signal.trace_id {
        headers.insert(
            "tai-trace-id".into(),
            AMQPValue::LongString(LongString::from(t.as_str())),
        );
    }
    if let Some(tp) = &signal.traceparent {
        headers.insert(
            "traceparent".into(),
            AMQPValue::LongString(LongString::from(tp.as_str())),
        );
    }
    let props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
        .with_message_id(ShortString::from(signal.id.as_str()))
        .with_timestamp(signal.received_at_ms / 1000)
        .with_headers(headers);
    (body, props)
}

/// Publishes a signal to the default exchange (routed to `queue`).
async fn publish(
    ch: &Channel,
    queue: &str,
    signal: &Signal,
) -> lapin::Result<lapin::PublisherConfirm> {
    let (body, props) = message(signal);
    publish_raw(ch, "", queue, &body, props).await
}

/// A mandatory publish: an unroutable message comes back instead of vanishing.
async fn publish_raw(
    ch: &Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    props: BasicProperties,
) -> lapin::Result<lapin::PublisherConfirm> {
    ch.basic_publish(
        exchange.into(),
        routing_key.into(),
        BasicPublishOptions {
            mandatory: true,
            ..Default::default()
        },
        body,
        props,
    )
    .await
}

/// Whether a confirm means the broker has the message.
fn confirmed(c: &lapin::Result<Confirmation>) -> bool {
    matches!(c, Ok(Confirmation::Ack(None)))
}

/// One live connection.
struct Link {
    gen: u64,
    conn: Connection,
    publish: Channel,
    consume: Channel,
    probe: Channel,
    /// The current consumer's tag (it changes when the consumer turns).
    consumer_tag: String,
    /// Handed to [`forward`] when the actor takes the link.
    consumer: Option<lapin::Consumer>,
    /// To the [`forward`] task: turn the consumer, or stop consuming.
    control: Option<mpsc::UnboundedSender<Control>>,
    /// Handed to [`crate::broker_letters::watch`] when the actor takes the link.
    watch: Option<Channel>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// The work queue's ready messages when it was declared: the broker's
    /// depth until the first probe, so a node that just (re)connected does
    /// not report an empty queue over a backlog.
    depth: u64,
}

/// A link's tasks end with it: the one place this matters is a queue actor
/// that is killed (no `post_stop`). Its `forward` task held the consumer
/// and the channels, so the connection stayed open and its consumer stayed
/// the single active one, the next incarnation's a standby, until a
/// message came for the dead one. Aborted, the task drops them: lapin
/// cancels the consumer and closes the connection once its last handle
/// goes, and the broker takes back what it held unacknowledged.
impl Drop for Link {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// What the actor asks of a connection's [`forward`] task.
#[derive(Clone, Copy, Debug)]
enum Control {
    /// Cancel the consumer and, once its last delivery is forwarded,
    /// consume anew: fresh prefetch slots, the parked deliveries of the old
    /// consumer staying unacknowledged on the channel.
    Turn,
    /// Cancel the consumer and end (a graceful stop).
    Stop,
}

/// What tasks report to the actor.
enum Event {
    Connected(Box<Link>),
    Lost {
        gen: u64,
        reason: String,
    },
    Reconnect,
    Delivered {
        gen: u64,
        /// Which consumer of the connection (0, then 1 after a turn...).
        consumer: u32,
        delivery: Box<lapin::message::Delivery>,
    },
    /// The connection's consumer turned: `consumer` with `tag` is current.
    Turned {
        gen: u64,
        consumer: u32,
        tag: String,
    },
    /// A publish batch is answered: waiting duplicates get the same answer.
    Published(Vec<Answered>),
    /// Publish batch `n` has handed all its messages to the channel.
    Sent(u64),
    /// The buffer drain ended (`Err`: the broker went away meanwhile).
    Drained {
        gen: u64,
        result: Result<u64, String>,
    },
    Depth {
        gen: u64,
        depth: u64,
    },
    /// A turn was not made: the queue has other consumers (a standby node).
    TurnHeld {
        gen: u64,
        consumers: u32,
    },
    /// The watch queue has a signal the broker dead-lettered: may it be
    /// recorded? Not while a copy of it is held here (being decided, or
    /// parked) or being dead-lettered: then the answer is a wait that ends
    /// once no copy is held. If granted, copies delivered until
    /// [`Event::LetterDone`] go with it.
    LetterClaim {
        key: (String, String),
        reply: tokio::sync::oneshot::Sender<Claim>,
    },
    /// The broker's dead letter is recorded (or could not be, or its
    /// signal was decided already).
    LetterDone((String, String)),
    /// A poison message is dead-lettered (or could not be: it stays).
    PoisonDone {
        key: (String, String),
        result: Result<(), String>,
    },
}

fn event(e: Event) -> KanbanMsg {
    KanbanMsg::Backend(Box::new(e))
}

/// The queue's answer to a broker dead letter's [`Event::LetterClaim`].
pub(crate) enum Claim {
    /// No copy is held here: record it.
    Granted,
    /// A copy is held here; ask again when this ends (an error: the queue
    /// stopped).
    Held(tokio::sync::oneshot::Receiver<()>),
}

/// Reports a publish batch sent when dropped (its task ended, one way or another).
struct SentGuard(ActorRef<KanbanMsg>, u64);

impl Drop for SentGuard {
    fn drop(&mut self) {
        let _ = self.0.send_message(event(Event::Sent(self.1)));
    }
}

/// A delivery held here: its engine key and every broker copy to ack with it.
struct Entry {
    key: (String, String),
    ackers: Vec<Tag>,
}

/// A delivery as the broker knows it: its channel's generation and tag,
/// and which of the connection's consumers it came to.
#[derive(Clone, Copy, Debug)]
struct Tag {
    gen: u64,
    consumer: u32,
    tag: u64,
}

/// To the acker task.
enum AckOp {
    /// The consume channel of a new connection.
    Link(u64, Channel),
    /// Done with a delivery: ack it (true) or requeue it (false).
    Settle(Tag, bool),
}

pub struct AmqpState {
    store: Store,
    config: KanbanConfig,
    topology: Topology,
    visibility: Duration,
    gen: u64,
    link: Option<Box<Link>>,
    connecting: bool,
    backoff: ExponentialBackoff,
    last_error: Option<String>,
    reconnects: u64,
    lost_gen: u64,
    down_since: Option<Instant>,
    /// The link's current consumer (see [`forward`]), and whether it is
    /// being turned.
    consumer_no: u32,
    turning: bool,
    /// Consumer turns since the start.
    turns: u64,
    dispatch: Dispatch,
    next_seq: u64,
    entries: HashMap<u64, Entry>,
    by_key: HashMap<(String, String), u64>,
    /// The entries each consumer (link generation, consumer number) has
    /// delivered and not yet had settled: what it holds of its prefetch,
    /// so [`AmqpState::maybe_turn`] counts the current consumer's parked
    /// deliveries among at most its prefetch, not among every parked one.
    by_consumer: HashMap<(u64, u32), std::collections::HashSet<u64>>,
    /// Enqueues waiting for the next publish batch.
    batch: Vec<(Signal, RpcReplyPort<EnqueueOutcome>)>,
    /// Signals being published, with duplicates waiting for their answer.
    publishing: HashMap<(String, String), Vec<RpcReplyPort<EnqueueOutcome>>>,
    /// Signals this node put in the fallback buffer (new, or a retry
    /// published again): a retry of one is a plain duplicate, the buffer
    /// holding it until the broker has it.
    buffered_here: RecentKeys,
    /// The publish batch whose messages are being handed to the channel
    /// (its number): the next batch waits, and grows, until it is done.
    sending: Option<u64>,
    /// Publish batches started (numbers them).
    batches: u64,
    draining_buffer: bool,
    /// Messages that failed once (requeued), by signal or by body hash.
    failures: HashMap<(String, String), u32>,
    /// Signals being dead-lettered (poison, or recorded from the watch
    /// queue): a copy delivered meanwhile goes with them.
    poisoning: std::collections::HashSet<(String, String)>,
    /// Broker dead letters waiting for the copy of their signal held here
    /// to be decided (or dead-lettered), by signal.
    letter_waits: HashMap<(String, String), Vec<tokio::sync::oneshot::Sender<()>>>,
    broker_depth: Option<u64>,
    /// A turn was held back (by another consumer on the queue, or the
    /// queue type) while parked signals hold half the prefetch: logged once
    /// a time.
    turn_held: bool,
    delivered: u64,
    acks: mpsc::UnboundedSender<AckOp>,
    acker: tokio::task::JoinHandle<()>,
    ticker: tokio::task::JoinHandle<()>,
    quiescing: bool,
    quiesce_waiters: Vec<RpcReplyPort<u64>>,
    gauges: QueueGauges,
}

/// Whether the broker closed a channel for RabbitMQ's `consumer_timeout`
/// (406 PRECONDITION_FAILED "delivery acknowledgement on channel N timed
/// out"): a delivery stayed unacknowledged longer than it allows.
fn consumer_timed_out(reason: &str) -> bool {
    reason.contains("delivery acknowledgement") && reason.contains("timed out")
}

fn backoff() -> ExponentialBackoff {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(5))
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build()
}

/// Connects, declares the topology, opens the channels and starts consuming.
async fn connect(
    me: ActorRef<KanbanMsg>,
    url: String,
    topology: Topology,
    gen: u64,
) -> Result<Box<Link>, String> {
    let props = ConnectionProperties::default()
        .with_connection_name(format!("tai-node-{}", std::process::id()).into());
    let conn = tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect(&url, props))
        .await
        .map_err(|_| format!("no answer from the broker in {CONNECT_TIMEOUT:?}"))?
        .map_err(|e| e.to_string())?;
    let setup = async {
        let publish = conn.create_channel().await?;
        let depth = topology.declare(&publish).await?;
        publish
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let probe = conn.create_channel().await?;
        let watch = conn.create_channel().await?;
        let consume = conn.create_channel().await?;
        consume
            .basic_qos(topology.prefetch, BasicQosOptions::default())
            .await?;
        let tag = format!("tai-{}-{gen}", std::process::id());
        let consumer = consume
            .basic_consume(
                topology.queue.as_str().into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok::<_, lapin::Error>((publish, probe, watch, consume, consumer, tag, depth))
    };
    let (publish, probe, watch, consume, consumer, consumer_tag, depth) =
        match tokio::time::timeout(CONNECT_TIMEOUT, setup).await {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => {
                let _ = conn.close(200, "setup failed".into()).await;
                return Err(e.to_string());
            }
            Err(_) => return Err(format!("broker setup took over {CONNECT_TIMEOUT:?}")),
        };
    let mut events = conn.events_listener();
    let to_actor = me.clone();
    let watching = tokio::spawn(async move {
        while let Some(e) = events.next().await {
            if let lapin::Event::Error(err) = e {
                let _ = to_actor.send_message(event(Event::Lost {
                    gen,
                    reason: err.to_string(),
                }));
                return;
            }
        }
    });
    Ok(Box::new(Link {
        gen,
        conn,
        publish,
        consume,
        probe,
        consumer_tag,
        consumer: Some(consumer),
        control: None,
        watch: Some(watch),
        tasks: vec![watching],
        depth,
    }))
}

/// Forwards a connection's deliveries to the actor; started by the actor
/// once it holds the link, so no delivery arrives before its connection.
///
/// It also turns the consumer when asked ([`Control::Turn`]): a consumer's
/// prefetch (`basic.qos`, per consumer) bounds its unacknowledged
/// deliveries, parked ones too, and RabbitMQ neither raises it for a live
/// consumer nor takes a per-channel limit on a quorum queue. A cancelled
/// consumer's deliveries stay unacknowledged on the channel and are acked
/// there as usual, so a new consumer gets fresh slots. The new one is
/// started only after the old one's last delivery is forwarded (lapin ends
/// its stream at the cancel-ok), so deliveries reach the actor in the
/// queue's order.
///
/// The queue is single-active-consumer: cancelling ours would hand it to a
/// standby node's consumer. So a turn first asks the broker (a passive
/// declare on the probe channel, just before the cancel) whether ours is
/// the queue's only consumer, and is held back if not.
fn forward(
    me: ActorRef<KanbanMsg>,
    gen: u64,
    mut consumer: lapin::Consumer,
    (ch, probe): (Channel, Channel),
    queue: String,
    mut control: mpsc::UnboundedReceiver<Control>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let to_actor = me;
        let base = consumer.tag().to_string();
        let mut tag = base.clone();
        let mut no = 0u32;
        // Our own cancel under way, and what follows it.
        let mut cancelling: Option<Control> = None;
        let reason = loop {
            tokio::select! {
                biased;
                next = consumer.next() => match next {
                    Some(Ok(delivery)) => {
                        let msg = event(Event::Delivered {
                            gen,
                            consumer: no,
                            delivery: Box::new(delivery),
                        });
                        if to_actor.send_message(msg).is_err() {
                            return;
                        }
                    }
                    Some(Err(e)) => break e.to_string(),
                    None => match cancelling.take() {
                        Some(Control::Stop) => return,
                        Some(Control::Turn) => {
                            no += 1;
                            tag = format!("{base}.{no}");
                            match ch
                                .basic_consume(
                                    queue.as_str().into(),
                                    tag.as_str().into(),
                                    BasicConsumeOptions::default(),
                                    FieldTable::default(),
                                )
                                .await
                            {
                                Ok(c) => consumer = c,
                                Err(e) => break format!("could not consume anew: {e}"),
                            }
                            let turned = event(Event::Turned {
                                gen,
                                consumer: no,
                                tag: tag.clone(),
                            });
                            if to_actor.send_message(turned).is_err() {
                                return;
                            }
                        }
                        None => break "the broker cancelled the consumer".to_string(),
                    },
                },
                Some(op) = control.recv(), if cancelling.is_none() => {
                    if matches!(op, Control::Turn) {
                        let passive = QueueDeclareOptions {
                            passive: true,
                            ..Default::default()
                        };
                        let consumers = match probe
                            .queue_declare(queue.as_str().into(), passive, FieldTable::default())
                            .await
                        {
                            Ok(q) => q.consumer_count(),
                            Err(e) => break format!("could not probe the queue: {e}"),
                        };
                        if consumers != 1 {
                            let held = event(Event::TurnHeld { gen, consumers });
                            if to_actor.send_message(held).is_err() {
                                return;
                            }
                            continue;
                        }
                    }
                    if let Err(e) = ch
                        .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
                        .await
                    {
                        break format!("could not cancel the consumer: {e}");
                    }
                    cancelling = Some(op);
                }
            }
        };
        let _ = to_actor.send_message(event(Event::Lost { gen, reason }));
    })
}

/// Publishes the oldest buffered signals until the buffer is empty.
async fn drain_buffer(ch: Channel, store: Store, queue: String) -> Result<u64, String> {
    let mut sent = 0;
    loop {
        let batch = store.buffered(DRAIN_BATCH).map_err(|e| e.to_string())?;
        if batch.is_empty() {
            return Ok(sent);
        }
        let mut confirms = Vec::with_capacity(batch.len());
        for (seq, s) in &batch {
            let c = publish(&ch, &queue, s).await.map_err(|e| e.to_string())?;
            confirms.push((*seq, c));
        }
        let mut done = Vec::with_capacity(confirms.len());
        let mut failed = None;
        for (seq, c) in confirms {
            let c = c.await;
            if confirmed(&c) {
                done.push(seq);
            } else {
                failed = Some(format!("the broker did not confirm: {c:?}"));
                break;
            }
        }
        store.unbuffer(&done).map_err(|e| e.to_string())?;
        sent += done.len() as u64;
        if let Some(e) = failed {
            return Err(e);
        }
    }
}

/// A signal of an answered publish batch, and what became of it.
pub(crate) struct Answered {
    key: (String, String),
    /// Its record once accepted (`None`: refused or failed).
    record: Option<SignalRecord>,
    /// Accepted into the fallback buffer, not confirmed by the broker.
    buffered: bool,
}

/// How many signals [`AmqpState`] remembers having put in the fallback
/// buffer. Past it the oldest is forgotten: a retry of that one publishes
/// one more copy, which is harmless (decided once).
const RECENT_BUFFERED: usize = 100_000;

/// A set of at most `cap` keys that forgets the oldest first.
struct RecentKeys {
    set: HashSet<(String, String)>,
    order: VecDeque<(String, String)>,
    cap: usize,
}

impl RecentKeys {
    fn new(cap: usize) -> Self {
        RecentKeys {
            set: HashSet::new(),
            order: VecDeque::new(),
            cap,
        }
    }

    fn contains(&self, key: &(String, String)) -> bool {
        self.set.contains(key)
    }

    fn insert(&mut self, key: (String, String)) {
        if self.set.contains(&key) {
            return;
        }
        if self.order.len() == self.cap {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        self.set.insert(key.clone());
        self.order.push_back(key);
    }
}

/// Answers a publish batch: what the broker confirmed is accepted; the rest
/// goes to the fallback buffer (or, past its bound, is refused).
async fn settle_batch(
    store: Store,
    buffer_max: u64,
    recorded: bool,
    signals: Vec<Signal>,
    replies: Vec<RpcReplyPort<EnqueueOutcome>>,
    confirmed: Vec<bool>,
) -> Vec<Answered> {
    let unconfirmed: Vec<Signal> = signals
        .iter()
        .zip(&confirmed)
        .filter(|(_, ok)| !**ok)
        .map(|(s, _)| s.clone())
        .collect();
    let fallback: Result<(), EnqueueOutcome> = if unconfirmed.is_empty() {
        Ok(())
    } else {
        match store.buffer_append(&unconfirmed, buffer_max, recorded) {
            Ok(true) => Ok(()),
            Ok(false) => Err(EnqueueOutcome::Full(format!(
                "the broker is unreachable and the fallback buffer is full ({buffer_max} signals)"
            ))),
            Err(e) => Err(EnqueueOutcome::Failed(e.to_string())),
        }
    };
    // The broker's confirm is the promise for what it took: the `accepted`
    // records written before publishing are only a dedupe hint (a record
    // lost in a crash lets a retry publish a second copy, which the engine
    // acknowledges without deciding), so only the fallback buffer waits for
    // the group flush.
    let durable = if unconfirmed.is_empty() && recorded {
        Ok(())
    } else {
        store.durable().await.map_err(|e| e.to_string())
    };
    if fallback.is_err() {
        if let Err(e) = store.forget_accepted(&unconfirmed) {
            warn!(error = %e, "could not forget refused signals");
        }
    }
    let mut answers = Vec::with_capacity(signals.len());
    for ((s, reply), ok) in signals.into_iter().zip(replies).zip(confirmed) {
        let outcome = match (&durable, ok, &fallback) {
            (Err(e), _, _) => EnqueueOutcome::Failed(e.clone()),
            (Ok(()), true, _) | (Ok(()), false, Ok(())) => EnqueueOutcome::Accepted,
            (Ok(()), false, Err(refusal)) => refusal.clone(),
        };
        let record =
            matches!(outcome, EnqueueOutcome::Accepted).then(|| SignalRecord::accepted(&s));
        let _ = reply.send(outcome);
        answers.push(Answered {
            buffered: record.is_some() && !ok,
            key: (s.tenant_id, s.id),
            record,
        });
    }
    answers
}

impl AmqpState {
    fn current_gen(&self) -> Option<u64> {
        self.link.as_ref().map(|l| l.gen)
    }

    fn start_connect(&mut self, myself: &ActorRef<KanbanMsg>) {
        if self.connecting || self.link.is_some() || self.quiescing {
            return;
        }
        self.connecting = true;
        self.gen += 1;
        let (me, url, topology, gen) = (
            myself.clone(),
            self.config.amqp_url.clone(),
            self.topology.clone(),
            self.gen,
        );
        tokio::spawn(async move {
            let msg = match connect(me.clone(), url, topology, gen).await {
                Ok(link) => Event::Connected(link),
                Err(reason) => Event::Lost { gen, reason },
            };
            let _ = me.send_message(event(msg));
        });
    }

    fn dispatch(&mut self) {
        if self.quiescing {
            return;
        }
        let now = Instant::now();
        for d in self
            .dispatch
            .take(self.config.wip_limit, self.config.prefetch, now)
        {
            send_to_router(d);
        }
    }

    fn maybe_drain(&mut self, myself: &ActorRef<KanbanMsg>) {
        if self.draining_buffer || self.store.buffered_count() == 0 {
            return;
        }
        let Some(link) = &self.link else {
            return;
        };
        self.draining_buffer = true;
        let (ch, store, queue, gen, me) = (
            link.publish.clone(),
            self.store.clone(),
            self.topology.queue.clone(),
            link.gen,
            myself.clone(),
        );
        info!(
            buffered = store.buffered_count(),
            "draining the fallback buffer to the broker"
        );
        tokio::spawn(async move {
            let result = drain_buffer(ch, store, queue).await;
            let _ = me.send_message(event(Event::Drained { gen, result }));
        });
    }

    /// A retry of a signal whose record is still `accepted`, and which this
    /// node does not hold (delivered, being decided or parked). The record is
    /// written before the publish, so it does not prove that the broker has
    /// the signal: a node killed between the two left only the record, and
    /// answering the retry as a plain duplicate lost the signal. It goes to
    /// the fallback buffer (without its record written again, and not at
    /// all if it was decided meanwhile), published from there in order like
    /// any buffered signal, and the retry is answered as the duplicate it is
    /// once that is durable. A second copy in the broker is harmless: the
    /// queue attaches it to the one it holds, or the engine acknowledges it
    /// without deciding, the signal being final.
    fn republish(
        &mut self,
        myself: &ActorRef<KanbanMsg>,
        signal: Signal,
        record: SignalRecord,
        reply: RpcReplyPort<EnqueueOutcome>,
    ) {
        let max = self.config.buffer_max;
        match self
            .store
            .buffer_append(std::slice::from_ref(&signal), max, true)
        {
            Ok(true) => {}
            Ok(false) => {
                let _ = reply.send(EnqueueOutcome::Full(format!(
                    "the fallback buffer is full ({max} signals)"
                )));
                return;
            }
            Err(e) => {
                let _ = reply.send(EnqueueOutcome::Failed(e.to_string()));
                return;
            }
        }
        debug!(tenant = %signal.tenant_id, signal = %signal.id, "a retry of an undecided signal: published again");
        self.buffered_here
            .insert((signal.tenant_id.clone(), signal.id.clone()));
        self.maybe_drain(myself);
        let store = self.store.clone();
        tokio::spawn(async move {
            let outcome = match store.durable().await {
                Ok(()) => EnqueueOutcome::Duplicate(
                    store
                        .signal_record(&signal.tenant_id, &signal.id)
                        .ok()
                        .flatten()
                        .unwrap_or(record),
                ),
                Err(e) => EnqueueOutcome::Failed(e.to_string()),
            };
            let _ = reply.send(outcome);
        });
    }

    fn enqueue(
        &mut self,
        myself: &ActorRef<KanbanMsg>,
        signal: Signal,
        origin: IdOrigin,
        reply: RpcReplyPort<EnqueueOutcome>,
    ) -> Result<(), ActorProcessingErr> {
        let key = (signal.tenant_id.clone(), signal.id.clone());
        if let Some(waiting) = self.publishing.get_mut(&key) {
            waiting.push(reply);
            return Ok(());
        }
        let reply = match crate::look_up(&self.store, &key, origin, reply) {
            crate::Known::New(reply) => reply,
            // Held here, the broker has it: a plain duplicate. (Published
            // again, a retry of a parked signal would add a copy holding a
            // prefetch slot until the entitlement comes.)
            crate::Known::Accepted(record, reply)
                if self.by_key.contains_key(&key) || self.buffered_here.contains(&key) =>
            {
                let _ = reply.send(EnqueueOutcome::Duplicate(record));
                return Ok(());
            }
            crate::Known::Accepted(record, reply) => {
                self.republish(myself, signal, record, reply);
                return Ok(());
            }
            crate::Known::Answered => return Ok(()),
        };
        if self
            .broker_depth
            .is_some_and(|d| d >= self.config.max_depth)
        {
            let _ = reply.send(EnqueueOutcome::Full(format!(
                "queue is full ({} signals)",
                self.config.max_depth
            )));
            return Ok(());
        }
        if self.batch.is_empty() {
            myself.send_message(KanbanMsg::FlushEnqueues)?;
        }
        self.publishing.insert(key, Vec::new());
        self.batch.push((signal, reply));
        Ok(())
    }

    /// Publishes the batch (in order after the previous one), or writes it to
    /// the fallback buffer while the broker is away or the buffer still holds
    /// older signals (so a tenant's signals keep their order).
    fn flush_batch(&mut self, myself: &ActorRef<KanbanMsg>) {
        let direct = self.store.buffered_count() == 0 && !self.draining_buffer;
        if direct && self.link.is_some() && self.sending.is_some() {
            // Published when the batch before it is sent ([`Event::Sent`]),
            // with whatever arrives meanwhile: one hand-off to lapin's I/O
            // thread for many messages instead of one each.
            return;
        }
        let batch = std::mem::take(&mut self.batch);
        if batch.is_empty() {
            return;
        }
        let (signals, replies): (Vec<Signal>, Vec<_>) = batch.into_iter().unzip();
        let (store, me, max) = (self.store.clone(), myself.clone(), self.config.buffer_max);
        match (&self.link, direct) {
            (Some(link), true) => {
                if let Err(e) = self.store.record_accepted(&signals) {
                    let answers = signals
                        .iter()
                        .map(|s| Answered {
                            key: (s.tenant_id.clone(), s.id.clone()),
                            record: None,
                            buffered: false,
                        })
                        .collect();
                    for r in replies {
                        let _ = r.send(EnqueueOutcome::Failed(e.to_string()));
                    }
                    let _ = me.send_message(event(Event::Published(answers)));
                    return;
                }
                let ch = link.publish.clone();
                let queue = self.topology.queue.clone();
                self.batches += 1;
                let n = self.batches;
                self.sending = Some(n);
                tokio::spawn(async move {
                    // Reported however this task ends, so the next batch goes.
                    let sent = SentGuard(me.clone(), n);
                    // All the batch's publishes are started before any is
                    // awaited: each takes its delivery tag and queues its
                    // frames at its first poll, in order, so lapin's I/O
                    // thread is woken once for the lot.
                    let results =
                        futures::future::join_all(signals.iter().map(|s| publish(&ch, &queue, s)))
                            .await;
                    drop(sent);
                    let mut confirms = Vec::with_capacity(results.len());
                    for r in results {
                        match r {
                            Ok(c) => confirms.push(Some(c)),
                            Err(e) => {
                                debug!(error = %e, "publish failed; to the fallback buffer");
                                confirms.push(None);
                            }
                        }
                    }
                    let mut ok = Vec::with_capacity(confirms.len());
                    for c in confirms {
                        ok.push(match c {
                            Some(c) => confirmed(&c.await),
                            None => false,
                        });
                    }
                    let answers = settle_batch(store, max, true, signals, replies, ok).await;
                    let _ = me.send_message(event(Event::Published(answers)));
                });
            }
            _ => {
                let none = vec![false; signals.len()];
                tokio::spawn(async move {
                    let answers = settle_batch(store, max, false, signals, replies, none).await;
                    let _ = me.send_message(event(Event::Published(answers)));
                });
            }
        }
    }

    fn on_delivery(
        &mut self,
        myself: &ActorRef<KanbanMsg>,
        gen: u64,
        consumer: u32,
        d: lapin::message::Delivery,
    ) {
        if self.current_gen() != Some(gen) {
            // From a connection that is gone: the broker sends it again.
            return;
        }
        self.delivered += 1;
        let tag = Tag {
            gen,
            consumer,
            tag: d.delivery_tag,
        };
        let signal = match read_signal(&d.data) {
            Ok(s) => s,
            Err(e) => {
                self.malformed(myself, tag, d, e);
                return;
            }
        };
        let key = (signal.tenant_id.clone(), signal.id.clone());
        if self.poisoning.contains(&key) {
            // Being dead-lettered from an earlier copy: this one goes with it.
            let _ = self.acks.send(AckOp::Settle(tag, true));
            return;
        }
        let held = self
            .by_key
            .get(&key)
            .copied()
            .filter(|seq| self.entries.contains_key(seq));
        let seq = held.unwrap_or(self.next_seq);
        self.by_consumer
            .entry((gen, consumer))
            .or_default()
            .insert(seq);
        if let Some(entry) = held.and_then(|seq| self.entries.get_mut(&seq)) {
            debug!(tenant = %key.0, signal = %key.1, seq, "another copy of a signal held here: acknowledged with it");
            entry.ackers.push(tag);
            return;
        }
        self.next_seq += 1;
        self.by_key.insert(key.clone(), seq);
        self.entries.insert(
            seq,
            Entry {
                key,
                ackers: vec![tag],
            },
        );
        self.dispatch.push(Delivery {
            seq,
            signal: std::sync::Arc::new(signal),
            // Possibly decided already (a copy republished or redelivered):
            // the engine checks the store before deciding.
            redelivered: true,
        });
        self.dispatch();
    }

    /// A message that is not a signal: requeued once, then dead-lettered.
    fn malformed(
        &mut self,
        myself: &ActorRef<KanbanMsg>,
        tag: Tag,
        d: lapin::message::Delivery,
        error: String,
    ) {
        let mut h = DefaultHasher::new();
        d.data.hash(&mut h);
        let key = (String::new(), format!("{:016x}", h.finish()));
        let header = |name: &str| {
            d.properties
                .headers()
                .as_ref()
                .and_then(|t| t.inner().get(name))
                .and_then(|v| match v {
                    AMQPValue::LongString(s) => Some(s.to_string()),
                    AMQPValue::ShortString(s) => Some(s.to_string()),
                    _ => None,
                })
        };
        let p = Poisoned {
            tenant_id: header("tai-tenant").unwrap_or_else(|| "unknown".into()),
            sku_id: header("tai-sku").unwrap_or_else(|| "unknown".into()),
            signal_id: d.properties.message_id().as_ref().map(|m| m.to_string()),
            trace_id: None,
            letter: None,
            reason: format!("poison: malformed message: {error}"),
        };
        warn!(error = %error, "malformed message from the broker");
        self.fail(myself, key, vec![tag], Some((d.data, d.properties)), p);
    }

    /// A message failed: the first time it is requeued at the broker; the
    /// second, it is published to the dead-letter exchange with the reason
    /// and a receipt, then acknowledged, so a poison message never loops.
    fn fail(
        &mut self,
        myself: &ActorRef<KanbanMsg>,
        key: (String, String),
        ackers: Vec<Tag>,
        raw: Option<(Vec<u8>, BasicProperties)>,
        p: Poisoned,
    ) {
        let failures = self.failures.entry(key.clone()).or_insert(0);
        *failures += 1;
        if *failures < 2 {
            warn!(tenant = %p.tenant_id, signal = ?p.signal_id, "message failed; requeued once");
            for a in ackers {
                let _ = self.acks.send(AckOp::Settle(a, false));
            }
            return;
        }
        let Some(link) = &self.link else {
            // The broker has it back already (the channel is gone).
            return;
        };
        self.failures.remove(&key);
        self.poisoning.insert(key.clone());
        let (body, props) = match raw {
            Some(m) => m,
            None => match &p.letter {
                Some(l) => message(&l.signal),
                None => (Vec::new(), BasicProperties::default()),
            },
        };
        let mut headers = props.headers().clone().unwrap_or_default();
        headers.insert(
            REASON_HEADER.into(),
            AMQPValue::LongString(LongString::from(p.reason.as_str())),
        );
        let props = props.with_headers(headers);
        let (ch, exchange, routing, store, acks, me) = (
            link.publish.clone(),
            self.topology.deadletter.clone(),
            self.topology.queue.clone(),
            self.store.clone(),
            self.acks.clone(),
            myself.clone(),
        );
        tokio::spawn(async move {
            let result = async {
                let confirm = publish_raw(&ch, &exchange, &routing, &body, props)
                    .await
                    .map_err(|e| e.to_string())?
                    .await;
                if !confirmed(&confirm) {
                    return Err(format!("dead-letter exchange did not confirm: {confirm:?}"));
                }
                let reason = p.reason.clone();
                if poison::commit(&store, p).await? {
                    metrics::counter!(tai_core::telemetry::DEADLETTER, "reason" => "poison")
                        .increment(1);
                    warn!(reason = %reason, "poison message dead-lettered");
                } else {
                    info!(reason = %reason, "a poison message's signal was decided meanwhile; not dead-lettered");
                }
                Ok(())
            }
            .await;
            // Dead-lettered: gone from the work queue. If not, back to the
            // queue to be tried again.
            for a in ackers {
                let _ = acks.send(AckOp::Settle(a, result.is_ok()));
            }
            let _ = me.send_message(event(Event::PoisonDone { key, result }));
        });
    }

    /// A delivery that failed in an engine (it crashed on it, or never answered).
    fn failed_delivery(&mut self, myself: &ActorRef<KanbanMsg>, d: Delivery) {
        self.dispatch.ack(d.seq);
        let Some(entry) = self.drop_entry(d.seq) else {
            return;
        };
        self.by_key.remove(&entry.key);
        let s = &d.signal;
        let reason = "poison".to_string();
        let p = Poisoned {
            tenant_id: s.tenant_id.clone(),
            sku_id: s.sku_id.clone(),
            signal_id: Some(s.id.clone()),
            trace_id: s.trace_id.clone(),
            letter: Some(DeadLetter {
                signal: (*d.signal).clone(),
                reason: reason.clone(),
                at_ms: now_ms(),
            }),
            reason,
        };
        self.fail(myself, entry.key, entry.ackers, None, p);
    }

    fn resend(&mut self, myself: &ActorRef<KanbanMsg>, again: Vec<(Delivery, u32)>) {
        for (d, attempts) in again {
            if attempts > 1 {
                self.failed_delivery(myself, d);
            } else {
                send_to_router(d);
            }
        }
    }

    fn ack(&mut self, seq: u64) {
        if !self.dispatch.ack(seq) {
            return;
        }
        if let Some(entry) = self.drop_entry(seq) {
            self.by_key.remove(&entry.key);
            self.failures.remove(&entry.key);
            for a in entry.ackers {
                let _ = self.acks.send(AckOp::Settle(a, true));
            }
        }
    }

    fn lost(&mut self, myself: &ActorRef<KanbanMsg>, gen: u64, reason: String) {
        // Reported once per connection (its consumer and its watcher may both tell).
        if gen != self.gen || self.lost_gen == gen {
            return;
        }
        if self.quiescing {
            // Our own consumer cancel, or the end: the channel stays for the acks.
            debug!(reason = %reason, "broker consumer ended while quiescing");
            return;
        }
        self.lost_gen = gen;
        let was_up = self.link.is_some();
        if let Some(link) = self.link.take() {
            for t in &link.tasks {
                t.abort();
            }
        }
        self.connecting = false;
        if self.sending.take().is_some() && !self.batch.is_empty() {
            // Held behind a batch of the lost connection: to the buffer now.
            let _ = myself.send_message(KanbanMsg::FlushEnqueues);
        }
        // Not yet sent to an engine: the broker has them back. What engines
        // hold stays in flight and is matched with its redelivered copy.
        for d in self.dispatch.clear_ready() {
            if let Some(e) = self.drop_entry(d.seq) {
                self.by_key.remove(&e.key);
            }
        }
        self.broker_depth = None;
        if was_up && consumer_timed_out(&reason) {
            // The broker is up: it closed the consume channel, and with it
            // the link, because a delivery stayed unacknowledged longer
            // than its consumer_timeout. Not an outage: no broker_down.
            warn!(
                reason = %reason,
                parked = self.dispatch.parked_len(),
                "RabbitMQ's consumer_timeout closed the consume channel: a signal waited \
                 unacknowledged longer than the broker allows (parked for an entitlement, or \
                 behind a long action); what the node holds comes back and is matched again. \
                 Raise the broker's consumer_timeout above the SKUs' entitlement_timeout_secs, \
                 or lower those"
            );
            tai_core::alert::raise(Alert::new(
                Severity::Warning,
                "consumer_timeout",
                "consumer_timeout",
                KANBAN_SOURCE,
                format!(
                    "RabbitMQ closed the consume channel of {}: a delivery stayed unacknowledged \
                     past its consumer_timeout; raise it above the SKUs' entitlement_timeout_secs",
                    self.topology.queue
                ),
            ));
        } else {
            if self.down_since.is_none() {
                self.down_since = Some(Instant::now());
            }
            if was_up || self.last_error.as_deref() != Some(reason.as_str()) {
                error!(reason = %reason, "broker unreachable; accepting into the fallback buffer");
                tai_core::alert::raise(Alert::new(
                    Severity::Critical,
                    "broker_down",
                    "broker_down",
                    KANBAN_SOURCE,
                    format!("RabbitMQ unreachable: {reason}"),
                ));
            }
        }
        self.last_error = Some(reason);
        if self.quiescing {
            return;
        }
        let delay = self.backoff.next().unwrap_or(Duration::from_secs(5));
        myself.send_after(delay, || event(Event::Reconnect));
    }

    fn connected_link(&mut self, myself: &ActorRef<KanbanMsg>, mut link: Box<Link>) {
        self.connecting = false;
        if link.gen != self.gen || self.quiescing {
            for t in &link.tasks {
                t.abort();
            }
            tokio::spawn(async move {
                let _ = link.conn.close(200, "superseded".into()).await;
            });
            return;
        }
        if self.down_since.take().is_some() && self.reconnects > 0 {
            tai_core::alert::raise(
                Alert::new(
                    Severity::Critical,
                    "broker_down",
                    "broker_down",
                    KANBAN_SOURCE,
                    "RabbitMQ is reachable again",
                )
                .resolved(),
            );
        }
        self.reconnects += 1;
        self.backoff = backoff();
        self.broker_depth = Some(link.depth);
        info!(
            queue = %self.topology.queue,
            consumer = %link.consumer_tag,
            buffered = self.store.buffered_count(),
            broker_depth = link.depth,
            "connected to the broker"
        );
        let _ = self.acks.send(AckOp::Link(link.gen, link.consume.clone()));
        if let Some(consumer) = link.consumer.take() {
            let (control, rx) = mpsc::unbounded_channel();
            link.control = Some(control);
            link.tasks.push(forward(
                myself.clone(),
                link.gen,
                consumer,
                (link.consume.clone(), link.probe.clone()),
                self.topology.queue.clone(),
                rx,
            ));
        }
        if let Some(ch) = link.watch.take() {
            link.tasks.push(tokio::spawn(crate::broker_letters::watch(
                ch,
                self.topology.queue.clone(),
                self.store.clone(),
                myself.clone(),
                link.gen,
            )));
        }
        (self.consumer_no, self.turning) = (0, false);
        self.link = Some(link);
        self.maybe_drain(myself);
    }

    fn depth(&self) -> u64 {
        self.broker_depth.unwrap_or(0)
            + self.dispatch.ready_len()
            + self.dispatch.in_flight_len()
            + self.store.buffered_count()
    }

    fn stats(&self) -> QueueStats {
        let broker = BrokerStats {
            connection: match (&self.link, self.quiescing) {
                (Some(_), _) => "connected",
                (None, true) => "closed",
                (None, false) => "connecting",
            }
            .into(),
            queue: self.topology.queue.clone(),
            queue_type: match self.topology.queue_type {
                AmqpQueueType::Classic => "classic",
                AmqpQueueType::Quorum => "quorum",
            }
            .into(),
            broker_depth: self.broker_depth,
            buffered: self.store.buffered_count(),
            buffer_max: self.config.buffer_max,
            consumer_tag: self.link.as_ref().map(|l| l.consumer_tag.clone()),
            consumer_turns: self.turns,
            delivered: self.delivered,
            reconnects: self.reconnects.saturating_sub(1),
            last_error: self.last_error.clone(),
        };
        QueueStats {
            backend: "amqp".into(),
            depth: self.depth(),
            in_flight: self.dispatch.in_flight_len(),
            parked: self.dispatch.parked_len(),
            wip_limit: self.config.wip_limit,
            prefetch: self.config.prefetch,
            deadletter: self.store.dead_letter_count(),
            max_depth: self.config.max_depth,
            not_ready: match &self.link {
                Some(_) => None,
                None => Some(format!(
                    "broker unreachable ({}): signals go to the fallback buffer",
                    self.last_error.as_deref().unwrap_or("connecting")
                )),
            },
            broker: Some(broker),
        }
    }

    /// Turns the consumer (see [`forward`]) once parked deliveries hold half
    /// its prefetch slots, so signals keep coming while engines wait.
    fn maybe_turn(&mut self) {
        let Some(link) = &self.link else {
            return;
        };
        if self.turning || self.quiescing {
            return;
        }
        let held = self
            .by_consumer
            .get(&(link.gen, self.consumer_no))
            .map_or(0, |seqs| {
                seqs.iter()
                    .filter(|seq| self.dispatch.is_parked(**seq))
                    .count()
            });
        let half = usize::from(self.topology.prefetch / 2).max(1);
        if held < half {
            // The next time they do is logged again if it cannot turn.
            self.turn_held = false;
            return;
        }
        if self.topology.queue_type == AmqpQueueType::Quorum {
            // Seen on RabbitMQ 3.10, two reasons: across a quorum queue's
            // cancel and new consume, messages reached the node out of the
            // queue's order (in a test; likely a delivery under way at the
            // cancel, returned and sent again after later ones); and its
            // consumer count leaves out a single-active-consumer queue's
            // waiting consumers, so a standby cannot be seen, and a turn
            // hands it the queue.
            if !self.turn_held {
                self.turn_held = true;
                warn!(
                    parked = held,
                    prefetch = self.topology.prefetch,
                    "parked signals hold half the consumer's prefetch, but on a quorum queue the \
                     consumer is not turned (a cancel would reorder deliveries under way, and \
                     could hand the queue to a standby): the rest of the prefetch waits for the \
                     entitlements"
                );
            }
            return;
        }
        info!(
            parked = held,
            prefetch = self.topology.prefetch,
            consumer = %link.consumer_tag,
            "parked signals hold half the consumer's prefetch: consuming anew for fresh slots"
        );
        if let Some(control) = &link.control {
            self.turning = control.send(Control::Turn).is_ok();
        }
    }

    /// Takes entry `seq` out, and out of its consumers' holdings.
    fn drop_entry(&mut self, seq: u64) -> Option<Entry> {
        let entry = self.entries.remove(&seq)?;
        for a in &entry.ackers {
            if let Some(held) = self.by_consumer.get_mut(&(a.gen, a.consumer)) {
                held.remove(&seq);
                if held.is_empty() {
                    self.by_consumer.remove(&(a.gen, a.consumer));
                }
            }
        }
        Some(entry)
    }

    /// Whether a copy of signal `key` is held here or being dead-lettered.
    fn holds(&self, key: &(String, String)) -> bool {
        self.poisoning.contains(key)
            || self
                .by_key
                .get(key)
                .is_some_and(|seq| self.entries.contains_key(seq))
    }

    /// Ends the waits of broker dead letters whose signal is no longer held.
    fn wake_letters(&mut self) {
        let free: Vec<(String, String)> = self
            .letter_waits
            .keys()
            .filter(|k| !self.holds(k))
            .cloned()
            .collect();
        for key in free {
            for done in self.letter_waits.remove(&key).unwrap_or_default() {
                let _ = done.send(());
            }
        }
    }

    fn answer_quiesce(&mut self) {
        if self.quiescing && self.dispatch.working_len() == 0 {
            // Only parked signals left: they are delivered again at the next start.
            for w in self.quiesce_waiters.drain(..) {
                let _ = w.send(self.dispatch.parked_len());
            }
        }
    }
}

const KANBAN_SOURCE: &str = "kanban_queue";

/// What the acker knows of one consume channel: every tag up to `upto` is
/// settled; `settled` holds the settled tags above it.
struct AckWindow {
    ch: Channel,
    upto: u64,
    settled: std::collections::BTreeSet<u64>,
}

/// Sends acks and requeues in the order they come. Acks waiting together
/// are coalesced: the settled prefix of the channel's tags goes as one
/// `multiple` ack, the rest one by one (never held back: an unacked message
/// holds a prefetch slot). One on a channel that is gone fails harmlessly
/// (the broker has requeued that message).
async fn acker(mut rx: mpsc::UnboundedReceiver<AckOp>) {
    let mut windows: HashMap<u64, AckWindow> = HashMap::new();
    while let Some(first) = rx.recv().await {
        let mut ops = vec![first];
        while ops.len() < 4096 {
            match rx.try_recv() {
                Ok(op) => ops.push(op),
                Err(_) => break,
            }
        }
        let mut fresh: HashMap<u64, Vec<u64>> = HashMap::new();
        for op in ops {
            match op {
                AckOp::Link(gen, ch) => {
                    windows.retain(|g, _| *g + 2 > gen);
                    windows.insert(
                        gen,
                        AckWindow {
                            ch,
                            upto: 0,
                            settled: Default::default(),
                        },
                    );
                }
                AckOp::Settle(t, ack) => {
                    let Some(w) = windows.get_mut(&t.gen) else {
                        continue;
                    };
                    if t.tag <= w.upto || !w.settled.insert(t.tag) {
                        continue;
                    }
                    if ack {
                        fresh.entry(t.gen).or_default().push(t.tag);
                    } else {
                        let requeue = BasicNackOptions {
                            requeue: true,
                            ..Default::default()
                        };
                        if let Err(e) = w.ch.basic_nack(t.tag, requeue).await {
                            debug!(error = %e, "requeue on a closed channel");
                        }
                    }
                }
            }
        }
        for (gen, mut tags) in fresh {
            let Some(w) = windows.get_mut(&gen) else {
                continue;
            };
            while w.settled.remove(&(w.upto + 1)) {
                w.upto += 1;
            }
            tags.sort_unstable();
            let split = tags.partition_point(|t| *t <= w.upto);
            let mut sends = Vec::with_capacity(tags.len() - split + 1);
            if let Some(&last) = tags[..split].last() {
                sends.push((last, true));
            }
            sends.extend(tags[split..].iter().map(|t| (*t, false)));
            for (tag, multiple) in sends {
                if let Err(e) = w.ch.basic_ack(tag, BasicAckOptions { multiple }).await {
                    debug!(error = %e, "ack on a closed channel");
                    break;
                }
            }
        }
    }
}

/// Delivery seqs must not repeat across starts (an engine's checkpoint may
/// name the seq of an action in flight): each start takes a range past the
/// last one's ([`SeqBase::next`]), recorded before its first delivery. A
/// record that does not read is logged, and the range begins at the clock.
fn seq_base(store: &Store) -> Result<u64, ActorProcessingErr> {
    let last = match store.meta(meta::AMQP_SEQ_BASE)? {
        None => None,
        Some(bytes) => SeqBase::decode(&bytes)
            .map_err(|e| {
                warn!(error = %e, "the amqp delivery seq base (m/{}) does not read: numbering from the clock", meta::AMQP_SEQ_BASE)
            })
            .ok(),
    };
    let next = SeqBase::next(last, now_ms())?;
    store.put_meta(meta::AMQP_SEQ_BASE, &next.encode())?;
    store.flush()?;
    Ok(next.base)
}

impl Actor for AmqpQueue {
    type Msg = KanbanMsg;
    type State = AmqpState;
    type Arguments = AmqpArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<KanbanMsg>,
        args: AmqpArgs,
    ) -> Result<AmqpState, ActorProcessingErr> {
        let next_seq = seq_base(&args.store)?;
        let (acks, ack_rx) = mpsc::unbounded_channel::<AckOp>();
        let acker = tokio::spawn(acker(ack_rx));
        let ticker = myself.send_interval(Duration::from_secs(1), || KanbanMsg::Tick);
        let topology = Topology::new(&args.config);
        info!(
            queue = %topology.queue,
            buffered = args.store.buffered_count(),
            "amqp queue starting"
        );
        Ok(AmqpState {
            topology,
            visibility: args.visibility,
            gen: 0,
            link: None,
            connecting: false,
            backoff: backoff(),
            last_error: None,
            reconnects: 0,
            lost_gen: 0,
            down_since: None,
            consumer_no: 0,
            turning: false,
            turns: 0,
            dispatch: Dispatch::default(),
            next_seq,
            entries: HashMap::new(),
            by_key: HashMap::new(),
            by_consumer: HashMap::new(),
            batch: Vec::new(),
            publishing: HashMap::new(),
            buffered_here: RecentKeys::new(RECENT_BUFFERED),
            sending: None,
            batches: 0,
            draining_buffer: false,
            failures: HashMap::new(),
            poisoning: Default::default(),
            letter_waits: HashMap::new(),
            broker_depth: None,
            turn_held: false,
            delivered: 0,
            acks,
            acker,
            ticker,
            quiescing: false,
            quiesce_waiters: Vec::new(),
            gauges: QueueGauges::new(),
            store: args.store,
            config: args.config,
        })
    }

    async fn post_start(
        &self,
        myself: ActorRef<KanbanMsg>,
        st: &mut AmqpState,
    ) -> Result<(), ActorProcessingErr> {
        st.start_connect(&myself);
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<KanbanMsg>,
        st: &mut AmqpState,
    ) -> Result<(), ActorProcessingErr> {
        st.ticker.abort();
        if let Some(link) = st.link.take() {
            // Unacked messages go back to the queue when the channel closes.
            let close = async {
                let _ = link
                    .consume
                    .basic_cancel(
                        link.consumer_tag.as_str().into(),
                        BasicCancelOptions::default(),
                    )
                    .await;
                let _ = link.conn.close(200, "node stopping".into()).await;
            };
            if tokio::time::timeout(Duration::from_secs(3), close)
                .await
                .is_err()
            {
                warn!("the broker connection did not close in time");
            }
            for t in &link.tasks {
                t.abort();
            }
        }
        st.acker.abort();
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<KanbanMsg>,
        msg: KanbanMsg,
        st: &mut AmqpState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            KanbanMsg::Enqueue(signal, origin, reply) => {
                st.enqueue(&myself, signal, origin, reply)?
            }
            KanbanMsg::FlushEnqueues => st.flush_batch(&myself),
            KanbanMsg::Ready(_) => {}
            KanbanMsg::Ack { seqs } => {
                for seq in seqs {
                    st.ack(seq);
                }
                st.dispatch();
                st.answer_quiesce();
            }
            KanbanMsg::Park { seqs } => {
                // Their WIP slots are free for other engines' signals.
                st.dispatch.park(&seqs);
                st.maybe_turn();
                st.dispatch();
                st.answer_quiesce();
            }
            KanbanMsg::Unpark { seqs } => st.dispatch.unpark(&seqs, Instant::now()),
            KanbanMsg::Redeliver {
                tenant_id,
                sku_id,
                after_crash,
            } => {
                let again =
                    st.dispatch
                        .redeliver_engine(&tenant_id, &sku_id, after_crash, Instant::now());
                st.resend(&myself, again);
                st.dispatch();
            }
            KanbanMsg::RedeliverAll => {
                for d in st.dispatch.redeliver_all(Instant::now()) {
                    send_to_router(d);
                }
            }
            KanbanMsg::Tick => {
                let again = st
                    .dispatch
                    .expired(st.visibility, Instant::now(), crate::engine_runs);
                if !again.is_empty() {
                    warn!(
                        count = again.len(),
                        "redelivering signals in flight too long"
                    );
                }
                st.resend(&myself, again);
                st.dispatch();
                if let Some(link) = &st.link {
                    let (ch, queue, gen, me) = (
                        link.probe.clone(),
                        st.topology.queue.clone(),
                        link.gen,
                        myself.clone(),
                    );
                    tokio::spawn(async move {
                        let passive = QueueDeclareOptions {
                            passive: true,
                            ..Default::default()
                        };
                        if let Ok(Ok(q)) = tokio::time::timeout(
                            Duration::from_secs(1),
                            ch.queue_declare(queue.as_str().into(), passive, FieldTable::default()),
                        )
                        .await
                        {
                            let _ = me.send_message(event(Event::Depth {
                                gen,
                                depth: u64::from(q.message_count()),
                            }));
                        }
                    });
                }
                st.maybe_drain(&myself);
            }
            KanbanMsg::Stats(reply) => {
                let _ = reply.send(st.stats());
            }
            KanbanMsg::Replay {
                tenant_id,
                signal_id,
                reply,
            } => match st
                .store
                .replay_dead_letter_to_buffer(&tenant_id, &signal_id)
            {
                Ok(Some(_)) => {
                    let store = st.store.clone();
                    tokio::spawn(async move {
                        let _ = reply.send(match store.durable().await {
                            Ok(()) => ReplayOutcome::Queued,
                            Err(e) => ReplayOutcome::Failed(e.to_string()),
                        });
                    });
                    st.maybe_drain(&myself);
                }
                Ok(None) => {
                    let _ = reply.send(ReplayOutcome::NotFound(format!(
                        "no dead letter {signal_id:?} for tenant {tenant_id:?}"
                    )));
                }
                Err(e) => {
                    let _ = reply.send(ReplayOutcome::Failed(e.to_string()));
                }
            },
            KanbanMsg::Quiesce(reply) => {
                if !st.quiescing {
                    st.quiescing = true;
                    info!(
                        in_flight = st.dispatch.in_flight_len(),
                        "amqp queue quiescing: no more deliveries"
                    );
                    if let Some(control) = st.link.as_ref().and_then(|l| l.control.as_ref()) {
                        let _ = control.send(Control::Stop);
                    }
                }
                st.quiesce_waiters.push(reply);
                st.answer_quiesce();
            }
            KanbanMsg::Backend(any) => {
                let Ok(ev) = any.downcast::<Event>() else {
                    return Ok(());
                };
                match *ev {
                    Event::Connected(link) => st.connected_link(&myself, link),
                    Event::Lost { gen, reason } => st.lost(&myself, gen, reason),
                    Event::Reconnect => st.start_connect(&myself),
                    Event::Delivered {
                        gen,
                        consumer,
                        delivery,
                    } => st.on_delivery(&myself, gen, consumer, *delivery),
                    Event::Turned { gen, consumer, tag } => {
                        if let Some(link) = st.link.as_mut().filter(|l| l.gen == gen) {
                            info!(consumer = %tag, "consuming anew");
                            link.consumer_tag = tag;
                            st.consumer_no = consumer;
                            st.turning = false;
                            st.turn_held = false;
                            st.turns += 1;
                        }
                    }
                    Event::Sent(n) => {
                        if st.sending == Some(n) {
                            st.sending = None;
                            st.flush_batch(&myself);
                        }
                    }
                    Event::Published(answers) => {
                        for Answered {
                            key,
                            record,
                            buffered,
                        } in answers
                        {
                            let waiting = st.publishing.remove(&key).unwrap_or_default();
                            if buffered {
                                st.buffered_here.insert(key);
                            }
                            for w in waiting {
                                let _ = w.send(match &record {
                                    Some(r) => EnqueueOutcome::Duplicate(r.clone()),
                                    None => EnqueueOutcome::Failed(
                                        "the first copy of this signal was not accepted".into(),
                                    ),
                                });
                            }
                        }
                        st.maybe_drain(&myself);
                    }
                    Event::Drained { gen, result } => {
                        st.draining_buffer = false;
                        match result {
                            Ok(n) => {
                                info!(published = n, "fallback buffer drained");
                                if st.current_gen() == Some(gen) {
                                    st.maybe_drain(&myself);
                                }
                            }
                            Err(e) => warn!(error = %e, "fallback buffer drain stopped"),
                        }
                    }
                    Event::Depth { gen, depth } => {
                        if st.current_gen() == Some(gen) {
                            st.broker_depth = Some(depth);
                            // Parked signals may have waited for a standby to go.
                            st.maybe_turn();
                        }
                    }
                    Event::TurnHeld { gen, consumers } => {
                        if st.current_gen() == Some(gen) {
                            st.turning = false;
                            if !st.turn_held {
                                st.turn_held = true;
                                warn!(
                                    consumers,
                                    "parked signals hold half the consumer's prefetch, but another \
                                     node consumes from the queue too: not turning the consumer, \
                                     which would hand the queue to it"
                                );
                            }
                        }
                    }
                    Event::LetterClaim { key, reply } => {
                        if st.holds(&key) {
                            let (done, wait) = tokio::sync::oneshot::channel();
                            st.letter_waits.entry(key).or_default().push(done);
                            let _ = reply.send(Claim::Held(wait));
                        } else {
                            st.poisoning.insert(key);
                            let _ = reply.send(Claim::Granted);
                        }
                    }
                    Event::LetterDone(key) => {
                        st.poisoning.remove(&key);
                    }
                    Event::PoisonDone { key, result } => {
                        st.poisoning.remove(&key);
                        if let Err(e) = result {
                            error!(error = %e, "could not dead-letter a poison message; the broker keeps it");
                        }
                    }
                }
            }
        }
        if !st.letter_waits.is_empty() {
            st.wake_letters();
        }
        st.gauges.set(st.depth(), &st.dispatch);
        Ok(())
    }
}

/// Asks the queue whether the broker's dead letter of `key` may be
/// recorded (see [`Event::LetterClaim`]); `None` if the queue is gone.
pub(crate) async fn claim_letter(
    queue: &ActorRef<KanbanMsg>,
    key: (String, String),
) -> Option<Claim> {
    let (reply, answer) = tokio::sync::oneshot::channel();
    queue
        .send_message(event(Event::LetterClaim { key, reply }))
        .ok()?;
    answer.await.ok()
}

/// The watch queue's consumer of connection `gen` ended: the connection is
/// taken as lost (see [`crate::broker_letters::watch`]).
pub(crate) fn watch_lost(queue: &ActorRef<KanbanMsg>, gen: u64, reason: String) {
    let _ = queue.send_message(event(Event::Lost { gen, reason }));
}

/// Ends a claim [`claim_letter`] granted.
pub(crate) fn letter_done(queue: &ActorRef<KanbanMsg>, key: (String, String)) {
    let _ = queue.send_message(event(Event::LetterDone(key)));
}

/// What the bare broker loop of `tai bench` measured.
#[derive(Debug, Clone, Copy)]
pub struct BareLoop {
    pub published: u64,
    pub consumed: u64,
    pub secs: f64,
}

/// The broker alone, for `tai bench`: for `duration`, publish persistent
/// `payload`s to a durable classic queue of its own with pipelined publisher
/// confirms (`window` outstanding) while a consumer at `prefetch` acks each
/// delivery by hand; the rate is what went through both ends. The queue is
/// deleted afterwards.
pub async fn bare_loop(
    url: &str,
    queue: &str,
    prefetch: u16,
    window: usize,
    duration: Duration,
    payload: &[u8],
) -> Result<BareLoop, String> {
    let e = |e: lapin::Error| e.to_string();
    let conn = Connection::connect(url, ConnectionProperties::default())
        .await
        .map_err(e)?;
    let publish_ch = conn.create_channel().await.map_err(e)?;
    let consume_ch = conn.create_channel().await.map_err(e)?;
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    publish_ch
        .queue_declare(queue.into(), durable, FieldTable::default())
        .await
        .map_err(e)?;
    publish_ch
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(e)?;
    consume_ch
        .basic_qos(prefetch, BasicQosOptions::default())
        .await
        .map_err(e)?;
    let mut consumer = consume_ch
        .basic_consume(
            queue.into(),
            "tai-bench-bare".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(e)?;
    let published = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let started = std::time::Instant::now();
    let consuming = {
        let (published, done) = (published.clone(), done.clone());
        tokio::spawn(async move {
            let mut consumed = 0u64;
            // Silence is an error only once everything is published: a
            // publisher held back by the broker's flow control is not one.
            let mut quiet_since = std::time::Instant::now();
            while !(done.load(std::sync::atomic::Ordering::SeqCst)
                && consumed >= published.load(std::sync::atomic::Ordering::SeqCst))
            {
                match tokio::time::timeout(Duration::from_secs(1), consumer.next()).await {
                    Ok(Some(Ok(d))) => {
                        d.ack(BasicAckOptions::default()).await.map_err(e)?;
                        consumed += 1;
                        quiet_since = std::time::Instant::now();
                    }
                    Ok(Some(Err(err))) => return Err(err.to_string()),
                    Ok(None) => return Err("the consumer was cancelled".to_string()),
                    Err(_) if !done.load(std::sync::atomic::Ordering::SeqCst) => {
                        quiet_since = std::time::Instant::now();
                    }
                    Err(_) if quiet_since.elapsed() < Duration::from_secs(10) => {}
                    Err(_) => {
                        return Err(format!(
                        "no delivery for 10 s after publishing ended ({consumed} of {} consumed)",
                        published.load(std::sync::atomic::Ordering::SeqCst)
                    ))
                    }
                }
            }
            Ok::<_, String>((consumed, started.elapsed().as_secs_f64()))
        })
    };
    let props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into());
    let publishing = async {
        let mut outstanding = std::collections::VecDeque::with_capacity(window);
        let mut sent = 0u64;
        while started.elapsed() < duration {
            sent += 1;
            if sent.is_multiple_of(64) {
                // Publishing and confirms can complete without ever waiting;
                // let the consumer (maybe on this same worker) run.
                tokio::task::yield_now().await;
            }
            let confirm = publish_ch
                .basic_publish(
                    "".into(),
                    queue.into(),
                    BasicPublishOptions::default(),
                    payload,
                    props.clone(),
                )
                .await
                .map_err(e)?;
            outstanding.push_back(confirm);
            if outstanding.len() >= window {
                let c = outstanding.pop_front().expect("outstanding").await;
                if !confirmed(&c) {
                    return Err(format!("the broker did not confirm: {c:?}"));
                }
                published.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        }
        while let Some(c) = outstanding.pop_front() {
            if !confirmed(&c.await) {
                return Err("the broker did not confirm".to_string());
            }
            published.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        Ok(())
    };
    let result = match publishing.await {
        Ok(()) => {
            done.store(true, std::sync::atomic::Ordering::SeqCst);
            consuming.await.map_err(|e| e.to_string()).and_then(|r| r)
        }
        Err(err) => {
            consuming.abort();
            Err(err)
        }
    };
    // Success or not, the loop's queue goes with it (through a new channel
    // if the broker closed the publishing one over the failure).
    if publish_ch
        .queue_delete(queue.into(), Default::default())
        .await
        .is_err()
    {
        if let Ok(ch) = conn.create_channel().await {
            let _ = ch.queue_delete(queue.into(), Default::default()).await;
        }
    }
    let _ = conn.close(200, "bench done".into()).await;
    let (consumed, secs) = result?;
    Ok(BareLoop {
        published: published.load(std::sync::atomic::Ordering::SeqCst),
        consumed,
        secs,
    })
}

/// Deletes a work queue with its dead-letter and watch queues and its
/// dead-letter exchange (`tai bench` cleans up the queues it made).
pub async fn delete_topology(url: &str, queue: &str) -> Result<(), String> {
    let e = |e: lapin::Error| e.to_string();
    let conn = Connection::connect(url, ConnectionProperties::default())
        .await
        .map_err(e)?;
    let ch = conn.create_channel().await.map_err(e)?;
    let dl = format!("{queue}.deadletter");
    let watch = crate::broker_letters::watch_queue(queue);
    for q in [queue, dl.as_str(), watch.as_str()] {
        ch.queue_delete(q.into(), Default::default())
            .await
            .map_err(e)?;
    }
    ch.exchange_delete(dl.as_str().into(), Default::default())
        .await
        .map_err(e)?;
    let _ = conn.close(200, "done".into()).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use tai_store::meta::{self, SeqBase};
    use tai_store::Store;

    use super::{seq_base, RecentKeys};

    #[test]
    fn each_start_numbers_past_the_last_and_a_damaged_record_falls_back_to_the_clock() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path()).unwrap();
        let recorded = |store: &Store| {
            SeqBase::decode(&store.meta(meta::AMQP_SEQ_BASE).unwrap().unwrap()).unwrap()
        };
        let clock = |at: u64| at * SeqBase::PER_MS;
        let before = tai_core::signal::now_ms();
        let first = seq_base(&store).unwrap();
        assert!(first >= clock(before), "{first}: from the clock");
        assert_eq!(recorded(&store).base, first);
        let second = seq_base(&store).unwrap();
        assert!(second >= first + SeqBase::FLOOR, "{second} after {first}");

        // A damaged record (an old node wrote 0 in its place): the clock.
        store
            .put_meta(meta::AMQP_SEQ_BASE, b"\x01\x02\x03")
            .unwrap();
        let before = tai_core::signal::now_ms();
        let third = seq_base(&store).unwrap();
        assert!(third >= clock(before), "{third}");
        assert_eq!(recorded(&store).base, third, "written again whole");
    }

    fn key(i: usize) -> (String, String) {
        ("t".to_string(), format!("s-{i}"))
    }

    #[test]
    fn recent_keys_forget_the_oldest_past_their_bound() {
        let mut keys = RecentKeys::new(3);
        for i in 0..3 {
            keys.insert(key(i));
        }
        // Inserting a held key again does not make room twice.
        keys.insert(key(0));
        assert!((0..3).all(|i| keys.contains(&key(i))));
        keys.insert(key(3));
        assert!(!keys.contains(&key(0)), "the oldest goes first");
        assert!((1..4).all(|i| keys.contains(&key(i))));
        assert_eq!((keys.set.len(), keys.order.len()), (3, 3));
    }
}

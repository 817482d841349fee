//! Delivering events to subscriptions (see the module doc of `broker` for the model).
//!
//! Ordering: a shared subscription's events are handed out in log order, up to `max_in_flight`
//! per consumer instance at a time, so with more than one in flight they may *complete* out of
//! order; an event that fails is retried after a backoff while later events go ahead, so
//! redelivery reorders. An every-instance subscription is delivered strictly in log order on each
//! node (an event is retried, blocking the ones after it, until it succeeds or is dead-lettered);
//! its position is committed after each pass (and at least every `INSTANCE_FLUSH`), not after
//! each event, which would cost a commit round per event.
//! The loops wake when events are applied and when a delivery is answered (paced to one pass per
//! `MIN_PASS`), and tick every `TICK` for retries and leadership changes: polling alone put a
//! `TICK` into every delivery's latency and capped a subscription at `max_in_flight × consumers`
//! events per tick. A consumer's slot frees when it answers, not when its ack is committed
//! (which waits for the next event entry): the position is kept from being handed out again
//! until then. A pass hands a consumer on another node everything it gets in one
//! `DeliverBatch` frame when that peer announced the feature (one request, one task per pass
//! and consumer instead of per event), and one `Deliver` per event otherwise; this node's own
//! consumer gets its handout as one task too (its handlers run concurrently, each within the
//! ack deadline).
//!
//! Delivery is at least once: an ack lost to a crash means a redelivery, so handlers should be
//! idempotent (the demo's `countOrders` counts each order id, so duplicates are visible). What a
//! leader has handed out is known only to it (leases are not replicated: that would cost an
//! entry per handout), so a new leader hands out again at once whatever was not acked, and an
//! event may then run on two instances at the same time. A node that regains leadership marks
//! its handouts with a new epoch (`Slot`), so the tasks of its earlier term cannot free them.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::marks::AttemptMark;
use super::marks::EventRef;
use super::marks::RunningNotes;
use tracing::debug;
use tracing::warn;

use super::Broker;
use super::event::Event;
use super::event::SubscriptionDecl;
use crate::lock;
use crate::cluster::Cluster;
use crate::peer::PeerNet;
use crate::peer::frame::features;
use crate::peer::message::EventOutcome;
use crate::peer::message::PeerRequest;
use crate::peer::message::PeerResponse;
use crate::peer::message::RemoteError;
use crate::raft::state_machine::Backlog;
use crate::raft::state_machine::SmShared;
use crate::raft::types::NodeId;
use crate::raft::types::SubUpdate;
use crate::sdk::Ctx;
use crate::sdk::HandlerError;
use crate::sdk::MessageMeta;
use crate::sdk::Sender;
use crate::sdk::SubscriptionHandler;

/// Delivery loops also pass this often without a wake-up: retries due after a backoff, a
/// leadership change, a consumer that came or went.
const TICK: Duration = Duration::from_millis(10);
/// Positions of a shared subscription in flight, including those whose outcome is being
/// committed, at most this many times its consumers' slots.
const SETTLING_FACTOR: usize = 8;
/// Events one `DeliverBatch` may carry (a consumer serves them all at once).
const MAX_DELIVER_BATCH: usize = 1024;
/// How long past the ack deadline the leader waits for a consumer's answer. The consumer stops
/// each handler at the deadline counted from the request's arrival and answers every event of
/// the batch at once: without this margin, one handler held to its deadline made the request
/// time out on the leader first, and the batch's acked events failed with it.
const DELIVERY_GRACE: Duration = Duration::from_secs(1);
/// What an event's encoding in a delivery frame adds to `EventBody::full_size` at most
/// (bincode's string lengths, options, position and timestamp), for cutting batches by bytes.
const EVENT_FRAME_OVERHEAD: usize = 192;
/// Bytes of a failed delivery's reason kept at most (it is replicated and kept in the dead
/// letters, up to `MAX_DEAD_LETTERS` per subscription); less with a small `--max-frame`
/// (`reason_cap`), as a delivery batch's failures share one reply frame and one entry.
const MAX_REASON: usize = 1024;

/// A failed delivery's reason at most, for frames of `max_frame` bytes: 1 KiB at the default
/// 16 MiB, 64 bytes from 1 MiB down.
fn reason_cap(max_frame: usize) -> usize {
    (max_frame / 16_384).clamp(64, MAX_REASON)
}
/// Least time between two passes of a delivery loop.
const MIN_PASS: Duration = Duration::from_millis(1);
/// Progress updates the writer gathers into one batch: it stops taking requests once this many
/// are in (a request, one delivery's outcomes, is at most `MAX_DELIVER_BATCH` and never split).
const UPDATE_BATCH: usize = 4096;
/// Update batches being committed at once, at most.
const UPDATE_BATCHES_OUT: usize = 4;
/// An every-instance loop commits its progress at least this often while it works through a
/// pass (and at the end of each), so a crash redelivers at most about this much handling.
const INSTANCE_FLUSH: Duration = Duration::from_millis(100);
/// How long an every-instance loop waits at once to catch up with the cluster's commits
/// before it starts from its replicated position (`instance_loop`); it asks again after.
const SYNC_WAIT: Duration = Duration::from_secs(30);
const BACKOFF_BASE: Duration = Duration::from_millis(100);
/// How long an event that waits for a consumer it has not failed on (`Pick::Wait`) stays out of
/// the passes before it is looked at again.
const WAIT_RECHECK: Duration = Duration::from_millis(20);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// A local subscription handler and the identity of the service it belongs to.
#[derive(Clone)]
pub struct LocalSubscriber {
    pub handler: Arc<dyn SubscriptionHandler>,
    pub service: Sender,
    /// Every-instance subscriptions get a delivery loop on this node.
    pub shared: bool,
    /// The subscription's ack deadline: a handler still running after it is a nack, and is
    /// dropped (the leader has given the event to another consumer by then; a hung handler
    /// would otherwise hold its peer request slot, or an every-instance loop, for good).
    pub ack_deadline: Duration,
    /// Whether the handler can run now (a sidecar's app passes its health check); `None`:
    /// always. While it cannot, deliveries here are refused (not counted as attempts) and an
    /// every-instance subscription waits, rather than spending its attempts and dead-lettering
    /// what the app would have taken a moment later. The sender is the sidecar's pool (set by
    /// its health loop and by refused connections), which the handlers hold: it lives as long
    /// as this subscriber.
    pub available: Option<tokio::sync::watch::Receiver<bool>>,
}

impl LocalSubscriber {
    fn available(&self) -> bool {
        self.available.as_ref().is_none_or(|rx| *rx.borrow())
    }
}

/// The outcomes of one delivery (one handout to one consumer), committed together: one message
/// and one wake-up per handout, not per event. `bool`: lazy (see `Broker::settle`): nothing
/// waits on the outcome but the settling positions.
type UpdateReq = (Vec<SubUpdate>, bool, oneshot::Sender<bool>);
/// subscription → its positions in flight. Keyed by subscription first so that a pass and a
/// delivery task find a position without building a `(String, u64)` key (an allocation and a
/// string hash per event).
type InFlight = Arc<Mutex<HashMap<String, Flight>>>;

/// One shared subscription's positions handed out by this node as leader and not yet settled,
/// with how many each consumer holds, kept in step with them: a pass reads a consumer's load
/// from `handed` rather than walking every position in flight (up to `SETTLING_FACTOR` times
/// the subscription's slots: with batches of 100, thousands, up to a pass a millisecond).
#[derive(Debug, Default)]
struct Flight {
    slots: HashMap<u64, Slot>,
    /// Per consumer, the positions whose `Slot::consumer` it is.
    handed: HashMap<NodeId, u32>,
}

impl Flight {
    /// `position` goes to `consumer` in `epoch`.
    fn hand(&mut self, position: u64, consumer: NodeId, epoch: u64) {
        let slot = Slot { consumer: Some(consumer), epoch };
        if let Some(old) = self.slots.insert(position, slot) {
            self.free(old.consumer);
        }
        *self.handed.entry(consumer).or_default() += 1;
    }

    /// The consumer of `positions` (handed out in `epoch`) answered: their consumer's slots are
    /// free, the positions stay out of handouts until their outcomes are settled.
    fn answered(&mut self, positions: &[u64], epoch: u64) {
        for p in positions {
            let Some(slot) = self.slots.get_mut(p).filter(|s| s.epoch == epoch) else { continue };
            let consumer = slot.consumer.take();
            self.free(consumer);
        }
    }

    /// `position` (handed out in `epoch`) is settled.
    fn release(&mut self, position: u64, epoch: u64) {
        if self.slots.get(&position).is_some_and(|s| s.epoch == epoch) {
            if let Some(old) = self.slots.remove(&position) {
                self.free(old.consumer);
            }
        }
    }

    fn free(&mut self, consumer: Option<NodeId>) {
        let Some(c) = consumer else { return };
        if let Some(n) = self.handed.get_mut(&c) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.handed.remove(&c);
            }
        }
    }

    fn contains(&self, position: u64) -> bool {
        self.slots.contains_key(&position)
    }
}

/// A position handed out by this node as leader.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Slot {
    /// The consumer it was handed to, or `None` once that consumer answered and the outcome is
    /// being committed (or, for a failure, until the pass has recorded its backoff): the
    /// position is not handed out again, but the consumer's slot is free.
    consumer: Option<NodeId>,
    /// The leadership term of this node it was handed out in. A delivery task that outlives a
    /// lost leadership must not touch what the node hands out after regaining it: clearing or
    /// removing another task's position by its number alone freed a slot twice and handed the
    /// event to a third consumer within its ack deadline.
    epoch: u64,
}

/// See `Flight::answered`.
fn mark_answered(inflight: &InFlight, sub: &str, positions: &[u64], epoch: u64) {
    if let Some(flight) = lock(inflight).get_mut(sub) {
        flight.answered(positions, epoch);
    }
}

/// `position` (handed out in `epoch`) is settled: acked and committed, or its failure's backoff
/// recorded. It may be handed out again (the log says whether it is still pending).
fn release(inflight: &InFlight, sub: &str, position: u64, epoch: u64) {
    if let Some(flight) = lock(inflight).get_mut(sub) {
        flight.release(position, epoch);
    }
}

/// When to hand out again an event whose delivery did not ack.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Retry {
    /// It failed (an attempt): after this backoff.
    After(Duration),
    /// Its consumer refused it (no attempt): after a pause that grows with each refusal, so an
    /// event that only refusing consumers are left for does not circle every tick.
    Refused,
    /// Acked, but the ack could not be committed (no leader for a while): the log still lists
    /// it as pending, so it is handed out again, after a short pause rather than on the next
    /// pass (every handler would otherwise run again each millisecond while commits fail).
    Unsettled,
}

/// A failed delivery's note to the pass: which position, when to retry it, the consumer that
/// failed it, and the epoch it was handed out in.
type RetryNote = ((String, u64), Retry, NodeId, u64);

/// Per subscription, per position: the consumers that failed or refused it, in that order.
type FailedOn = HashMap<String, HashMap<u64, Vec<NodeId>>>;

/// Records that `node` failed or refused `key`, and returns when it may be handed out again.
/// `refusals` counts each position's refusals (bounded with `failed_on`).
fn note_retry(
    failed_on: &mut FailedOn,
    refusals: &mut HashMap<(String, u64), u32>,
    key: (String, u64),
    retry: Retry,
    node: NodeId,
) -> Duration {
    let pause = match retry {
        Retry::Unsettled => return BACKOFF_BASE,
        Retry::After(pause) => pause,
        Retry::Refused => {
            let n = refusals.entry(key.clone()).or_insert(0);
            *n = n.saturating_add(1);
            backoff(*n - 1)
        }
    };
    let tried = failed_on.entry(key.0).or_default().entry(key.1).or_default();
    if !tried.contains(&node) {
        tried.push(node);
    }
    pause
}

/// Where a shared subscription's event goes in a pass.
#[derive(Debug, PartialEq, Eq)]
enum Pick {
    Take(NodeId),
    /// Only consumers it failed on have room, while one it has not failed on is live.
    Wait,
    /// No consumer has room: the pass hands out nothing more.
    Full,
}

/// The least loaded consumer with room (`load` below `max`) that the event has not failed on
/// (`avoid`). An event that failed on some consumers waits for one it has not failed on while
/// such a one is live, even if only those it failed on have room: otherwise a consumer that
/// fails fast (and so always has free slots) took every retry while a healthy one was busy, and
/// the event was dead-lettered without another instance ever trying it. Once it has failed on
/// every live consumer, any with room takes it.
fn pick(load: &HashMap<NodeId, u32>, max: u32, avoid: Option<&[NodeId]>) -> Pick {
    // Ties go as the map iterates, which differs from pass to pass (its hasher is seeded per
    // map): at light load, events spread over the consumers instead of all going to one.
    let least = |ok: &dyn Fn(&NodeId) -> bool| load.iter().filter(|(n, l)| **l < max && ok(n)).min_by_key(|(_, l)| **l).map(|(n, _)| *n);
    let Some(any) = least(&|_| true) else { return Pick::Full };
    match avoid {
        None => Pick::Take(any),
        Some(a) => match least(&|n| !a.contains(n)) {
            Some(fresh) => Pick::Take(fresh),
            None if load.keys().any(|n| !a.contains(n)) => Pick::Wait,
            None => Pick::Take(any),
        },
    }
}

pub struct Dispatcher {
    node_id: NodeId,
    sm: Arc<SmShared>,
    net: Arc<PeerNet>,
    broker: Arc<Broker>,
    cluster: Cluster,
    local: HashMap<String, LocalSubscriber>,
    /// `raftbridge_delivery_latency_seconds` per local subscription, registered once (the
    /// macro looks its labels up on every call).
    latency: HashMap<String, metrics::Histogram>,
    /// Feeds the update writer; it ends with the dispatcher.
    updates: mpsc::Sender<UpdateReq>,
    /// Where every-instance subscriptions note their attempts (`marks`); `None`: in memory only.
    marks_dir: Option<std::path::PathBuf>,
    /// Per local shared subscription, the deliveries this node handed itself that are under
    /// way (`marks::RunningNotes`); empty without `marks_dir`. Locked for a few `pwrite`s.
    running: Mutex<HashMap<String, RunningNotes>>,
    /// What handlers call commands through (`Ctx::invoke`): the node's proxy, made after the
    /// dispatcher and set once by the composition root (`set_handler_calls`).
    calls: std::sync::OnceLock<Arc<dyn crate::sdk::Invoker>>,
    /// The broker's stop (the node's drain): deliveries this node serves for the leader that
    /// still run then are answered "not served" (`cut_short`). Cancelled by the node.
    stop: CancellationToken,
    /// Set by `count_unfinished` once the unfinished handlers are counted (or it gave up);
    /// `shared_loop` hands nothing out before.
    unfinished_counted: tokio::sync::watch::Sender<bool>,
    /// Batches served for a leader that were answered while some of their handlers still ran,
    /// by (leader, ticket): the outcomes still to come (`Remaining`; taken out while an
    /// `AwaitDelivery` waits on them, the entry stays). An entry's driver task
    /// (`serve_delivery_batch`) removes it `SETTLED_LINGER` after its last handler ended, and
    /// `serve_await_delivery` once it handed every outcome over; `handed_over` waits for none to
    /// be left. Locked only to look an entry up or move it.
    batches: Mutex<HashMap<(NodeId, u64), Batch>>,
    /// Numbers the entries of `batches` (from a random start, see `start`).
    tickets: std::sync::atomic::AtomicU64,
    /// Every-instance loops still running: counted up before each is spawned, down when it
    /// returns (`InstanceLoop`); the node's drain waits for none (`stop_instances`).
    instance_loops: Arc<std::sync::atomic::AtomicUsize>,
    /// Stops the every-instance loops: cancelled by `stop_instances`, before the broker stops
    /// (its batcher and the progress writer carry the loops' last progress and their handlers'
    /// emits), or with the broker's own stop (a child of it).
    instances_stop: CancellationToken,
}

/// An every-instance loop that runs; its drop counts it out of `Dispatcher::instance_loops`.
struct InstanceLoop(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for InstanceLoop {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}


/// A batch answered before all its handlers ended (`Dispatcher::batches`).
struct Batch {
    /// `None` while an `AwaitDelivery` waits on it.
    remaining: Option<Remaining>,
    /// When it was answered or last asked for: a leader that asks does so again at once.
    asked: Instant,
    /// Stops the batch's handlers (`cut_short`): cancelled when the link an ask of it waits on
    /// closes (the leader's ask failed: it gave up on the batch), or by the batch's driver task
    /// when the leader gave up otherwise (`Dispatcher::leader_gave_up`).
    cut: CancellationToken,
    /// The `closed` token of the link of the batch's last exchange with its leader (the
    /// delivery, or the last ask answered), and how many exchanges there were (the driver task
    /// judges each link's close once).
    exchanged_on: CancellationToken,
    exchanges: u64,
}

/// How long the leader of a batch answered early may go without asking for it, once it no
/// longer leads, before it is taken to have given up on it (it asks again as soon as an answer
/// arrives).
const STOPPED_ASKING: Duration = Duration::from_secs(3);

/// The outcomes a batch's handlers have still to report, and how many.
struct Remaining {
    /// Fed by the batch's driver task, which ends (dropping its sender) with the last handler.
    outcomes: mpsc::Receiver<(u32, EventOutcome)>,
    left: usize,
}

/// How long a consumer waits for a batch's handlers before it answers for those that ended
/// (`DeliveredEach`, the rest `Running`): one slow handler held the acks and the leader's slots
/// of the whole batch up to the ack deadline. A batch whose handlers all end sooner is answered
/// once, as a whole.
const EARLY_ANSWER: Duration = Duration::from_millis(100);

/// How long the outcomes of a batch's last handlers wait for the leader's `AwaitDelivery` after
/// they ended (a leader that went away never asks).
const SETTLED_LINGER: Duration = Duration::from_secs(30);

/// A leader that asked for a batch within this long is taken to ask again (it does so as soon
/// as an answer arrives), so a drain waits for it (`handed_over`).
const ASKS_LIVE: Duration = Duration::from_secs(1);

/// How long the handlers that end after the first of a group are waited for, so that those
/// ending close together are settled together (one answer, one commit of their progress).
const GATHER: Duration = Duration::from_millis(5);

/// Bucket bounds (seconds) of `raftbridge_delivery_latency_seconds`, a histogram so that a
/// benchmark can difference two scrapes (a summary's quantiles cover a rolling window that mixes
/// runs). Event timestamps are whole milliseconds, so a latency is a whole number of ms and the
/// bounds sit half-way between: up to `DELIVERY_EXACT_MS` each bucket holds one value exactly.
pub const DELIVERY_LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.0015, 0.0025, 0.0035, 0.0045, 0.0055, 0.0065, 0.0075, 0.0085, 0.0095, 0.0105, 0.0115,
    0.0125, 0.0135, 0.0145, 0.0155, 0.0165, 0.0175, 0.0185, 0.0195, 0.0205, 0.0255, 0.0305, 0.0405,
    0.0505, 0.0755, 0.1005, 0.1505, 0.2005, 0.3005, 0.5005, 1.0005, 2.0005, 5.0005, 10.0005, 30.0005,
    60.0005,
];
/// Latencies (ms) up to which `DELIVERY_LATENCY_BUCKETS` tell each whole ms apart.
pub const DELIVERY_EXACT_MS: u64 = 20;

/// How long a restarted node tries to have its unfinished handlers counted (while the cluster
/// cannot commit), holding its shared handouts back meanwhile: then they are delivered again
/// uncounted, as before the notes (and their notes stay for the next start).
const UNFINISHED_WAIT: Duration = Duration::from_secs(90);
/// How long one catch-up with the cluster's commits may take before the unfinished handlers'
/// count is sent again (`count_unfinished`); bounded by `UNFINISHED_WAIT` overall.
const UNFINISHED_BARRIER: Duration = Duration::from_secs(5);

fn backoff(attempts: u32) -> Duration {
    BACKOFF_BASE.saturating_mul(1 << attempts.min(10)).min(BACKOFF_MAX)
}

impl Dispatcher {
    pub fn start(
        broker: Arc<Broker>,
        net: Arc<PeerNet>,
        cluster: Cluster,
        local: HashMap<String, LocalSubscriber>,
        marks_dir: Option<std::path::PathBuf>,
        shutdown: CancellationToken,
    ) -> Arc<Dispatcher> {
        let (tx, rx) = mpsc::channel(UPDATE_BATCH * 4);
        let latency = local
            .keys()
            .map(|sub| (sub.clone(), metrics::histogram!("raftbridge_delivery_latency_seconds", "subscription" => sub.clone())))
            .collect();
        let running = match &marks_dir {
            Some(dir) => local.iter().filter(|(_, sub)| sub.shared).map(|(name, _)| (name.clone(), RunningNotes::open(dir, name))).collect(),
            None => HashMap::new(),
        };
        let d = Arc::new(Dispatcher {
            node_id: net.node_id(),
            sm: broker.store().local().clone(),
            net,
            broker,
            cluster,
            local,
            latency,
            updates: tx,
            marks_dir,
            running: Mutex::new(running),
            unfinished_counted: tokio::sync::watch::Sender::new(false),
            stop: shutdown.clone(),
            batches: Mutex::new(HashMap::new()),
            calls: std::sync::OnceLock::new(),
            // From a random start: a leader that asks a restarted node for a batch of the
            // process before must not be handed another batch's outcomes.
            tickets: std::sync::atomic::AtomicU64::new(fastrand::u64(1..u64::MAX / 2)),
            instance_loops: Arc::default(),
            instances_stop: shutdown.child_token(),
        });
        crate::supervise::spawn_until("subscription progress writer", &shutdown, update_writer(d.broker.clone(), rx, shutdown.clone()));
        crate::supervise::spawn_until("running handler notes", &shutdown, d.clone().count_unfinished(shutdown.clone()));
        crate::supervise::spawn_until("shared subscription dispatch", &shutdown, d.clone().shared_loop(shutdown.clone()));
        for (name, sub) in &d.local {
            if !sub.shared {
                d.instance_loops.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
                let running = InstanceLoop(d.instance_loops.clone());
                let run = d.clone().instance_loop(name.clone(), d.instances_stop.clone());
                crate::supervise::spawn_until(format!("dispatch of every-instance subscription {name}"), &d.instances_stop, async move {
                    let _running = running;
                    run.await;
                });
            }
        }
        d
    }

    /// Counts, as failed attempts, the shared deliveries this node's earlier processes handed
    /// themselves and did not finish (`RunningNotes`: the process ended during their handlers),
    /// once the cluster can commit, and only then lets `shared_loop` hand out (else the event
    /// went out again first, and its handler could end the process before the count
    /// committed). At a graceful stop, clears the notes of the handlers it ends.
    async fn count_unfinished(self: Arc<Self>, shutdown: CancellationToken) {
        let left: Vec<(String, EventRef, u64)> = lock(&self.running)
            .iter_mut()
            .flat_map(|(name, notes)| notes.take_left().into_iter().map(move |(e, slot)| (name.clone(), e, slot)))
            .collect();
        // Only events still in the log as they were (a position reused by another log, after
        // the data was lost, is not this event), and not settled since; each with the attempts
        // counted for it now.
        let mut pending: Vec<(SubUpdate, u32)> = left
            .iter()
            .filter(|(_, e, _)| self.sm.event(e.position).is_some_and(|ev| EventRef::new(ev.position, &ev.body.id) == *e))
            .filter_map(|(sub, e, _)| {
                let counted = self.sm.attempts_at(sub, e.position)?;
                warn!(subscription = %sub, position = e.position, "this node ended while its handler ran this event: counted as a failed attempt");
                let reason = format!("node {}: the process ended while the handler ran", self.node_id);
                // `Failed`, not `FailedAt`: `counted` is this replica's count at the restart,
                // not at the hand-out, and another node may have counted a failure since (a new
                // leader's delivery of it), which would make a `FailedAt` count nothing. Sent
                // again only while the count stands still (below), so once.
                Some((SubUpdate::Failed { sub: sub.clone(), position: e.position, reason }, counted))
            })
            .collect();
        let until = Instant::now() + UNFINISHED_WAIT;
        // Whether a send's outcome is unknown: then nothing is sent before this replica has
        // caught up with the cluster's commits.
        let mut unsure = false;
        // Bounded by `UNFINISHED_WAIT`, or the stop.
        let counted = loop {
            if pending.is_empty() {
                break true;
            }
            let mut pause = Duration::from_millis(100);
            if self.cluster.ready() && unsure {
                // A second after a send whose outcome is unknown (an answer lost with its
                // leader): sent again only where the attempts stand unchanged, judged by this
                // replica once it holds what the cluster committed. A replica still catching up
                // after the restart showed the first send's count unchanged though it had
                // committed, and `Failed` counted the crash twice.
                let barrier = tokio::select! {
                    () = shutdown.cancelled() => break false,
                    done = self.broker.store().replica().read_barrier(UNFINISHED_BARRIER) => done,
                };
                match barrier {
                    Ok(_) => {
                        pending.retain(|(u, before)| match u {
                            SubUpdate::Failed { sub, position, .. } | SubUpdate::FailedAt { sub, position, .. } => {
                                self.sm.attempts_at(sub, *position) == Some(*before)
                            }
                            _ => false,
                        });
                        unsure = false;
                        continue;
                    }
                    Err(e) => debug!(cause = %e, "not caught up with the cluster's commits: the unfinished handlers' count waits"),
                }
            } else if self.cluster.ready() {
                if self.update(pending.iter().map(|(u, _)| u.clone()).collect(), false).await {
                    break true;
                }
                unsure = true;
                pause = Duration::from_secs(1);
            }
            if Instant::now() >= until {
                warn!(events = pending.len(), "could not count the handlers this node's last process left unfinished: they are delivered again uncounted");
                break false;
            }
            tokio::select! {
                () = shutdown.cancelled() => break false,
                () = tokio::time::sleep(pause) => {}
            }
        };
        if counted {
            let mut running = lock(&self.running);
            for (sub, _, slot) in left {
                if let Some(notes) = running.get_mut(&sub) {
                    notes.ended(vec![slot]);
                }
            }
        }
        self.unfinished_counted.send_replace(true);
        shutdown.cancelled().await;
        for notes in lock(&self.running).values_mut() {
            notes.clear();
        }
    }

    /// Commit progress updates (batched with others); true once applied. `lazy`: they may wait
    /// a little for an event entry to ride in (`Broker::settle`).
    async fn update(&self, u: Vec<SubUpdate>, lazy: bool) -> bool {
        if u.is_empty() {
            return true;
        }
        let (tx, rx) = oneshot::channel();
        if self.updates.send((u, lazy, tx)).await.is_err() {
            return false;
        }
        rx.await.unwrap_or(false)
    }

    /// Lets subscription handlers call commands (`Ctx::invoke`) through `calls`; a second
    /// call changes nothing.
    pub fn set_handler_calls(&self, calls: Arc<dyn crate::sdk::Invoker>) {
        let _ = self.calls.set(calls);
    }

    /// Run the local handler for one event: emit what it returns, then report success.
    pub async fn run_local(&self, sub: &str, event: Event) -> Result<(), HandlerError> {
        let Some(s) = self.local.get(sub) else {
            return Err(HandlerError::new(503, format!("subscription {sub} is not consumed here")));
        };
        // End to end: from acceptance (the event's timestamp, set by the node that took it) to
        // this handler (same clock on one machine; across machines it includes clock skew).
        let age_ms = super::now_ms().saturating_sub(event.timestamp);
        // The handler takes the event and its context; an event it returns gets its metadata
        // from the source event, kept here by reference (the context is not cloned per event:
        // its strings were a dozen allocations per delivery).
        let source = event.body.clone();
        // An every-instance subscription runs on every node: its writes and emits are tagged per
        // node too, or the first node's would stand for all of them (`tagged` dedups on the key).
        let scope = tag_scope(sub, s.shared, self.node_id);
        // The handler and the publish of an event it returns share the ack deadline: the leader
        // waits for the outcome only that long (plus `DELIVERY_GRACE`), and an emit past it
        // (publish backpressure, a slow commit) made a remote batch's whole answer late, every
        // event in it counted as failed. A returned event whose publish is cut off may still
        // commit; the redelivery's emit has the same key and is deduplicated.
        // The shorter of ours and the replicated one, which the leader redelivers after: nodes
        // may declare a subscription with different deadlines (a rolling change of it, sidecar
        // configs that differ), the last to register sets the replicated one, and a longer one
        // here let the handler run on beside the redelivery to another consumer. Commands the
        // handler calls (`Ctx::invoke`) get no more than what is left of it.
        let ack_deadline = consumer_deadline(s.ack_deadline, self.sm.sub_ack_deadline_ms(sub));
        let deadline = tokio::time::Instant::now() + ack_deadline;
        let ctx = Ctx::new(delivery_meta(&scope, &source), self.node_id, self.broker.store().clone())
            .with_broker(self.broker.clone(), s.service.clone())
            .with_invoker(self.calls.get().cloned(), deadline);
        // Only the status of a failure matters here, and its text goes into the replicated
        // progress and the dead letters: cut to `MAX_REASON`.
        let passed = |what: &str| HandlerError::new(504, format!("ack deadline of {} ms passed {what}", ack_deadline.as_millis()));
        let out = tokio::time::timeout_at(deadline, s.handler.handle(ctx, event)).await;
        // Recorded once the handler had the event: one that refused it did not.
        if !matches!(&out, Ok(Err(e)) if e.is_not_served()) {
            if let Some(h) = self.latency.get(sub) {
                h.record(age_ms as f64 / 1e3);
            }
        }
        let out = match out {
            Ok(out) => out.map_err(|e| e.truncated(reason_cap(self.net.max_frame())))?,
            Err(_) => return Err(passed("in the handler")),
        };
        if let Some(emit) = out {
            // A nack (the handler's fault): retried, then dead-lettered with the reason.
            super::event::check_event_name(&emit.event_name).map_err(|e| HandlerError::unhandled(format!("returned event: {e}")))?;
            let payload = super::event::encode_payload(&emit.payload).map_err(|e| HandlerError::unhandled(format!("returned event: {e}")))?;
            let key = Some(returned_event_key(&scope, &source.id));
            let meta = delivery_meta(&scope, &source);
            let new = super::new_event(&emit.event_name, payload, &meta, Some(s.service.clone()), key);
            // The HTTP API's status for the cause (`api::error`): a publish refused before it
            // was queued is a 503, one whose outcome is unknown a 503 or 502 that says so.
            match tokio::time::timeout_at(deadline, self.broker.publish_one(new)).await {
                Ok(published) => published.map_err(|e| HandlerError::from_api(std::sync::Arc::unwrap_or_clone(e).into()))?,
                Err(_) => return Err(passed("publishing the event the handler returned")),
            };
        }
        Ok(())
    }

    /// Waits while `sub`'s handler cannot run here (`LocalSubscriber::available`); false once
    /// `shutdown` fires or the health check is gone.
    async fn until_available(&self, sub: &str, shutdown: &CancellationToken) -> bool {
        let Some(mut rx) = self.local.get(sub).and_then(|s| s.available.clone()) else { return true };
        loop {
            if *rx.borrow_and_update() {
                return true;
            }
            tokio::select! {
                _ = shutdown.cancelled() => return false,
                // The sender (the sidecar's pool) lives as long as the handler, so this should
                // not happen; if it did, returning now would read as a loop that failed
                // (`supervise`), so wait for the stop.
                changed = rx.changed() => if changed.is_err() { shutdown.cancelled().await; return false },
            }
        }
    }

    /// Why this node would not run a delivery of `sub` (no handler runs): the leader then hands
    /// the events to another consumer without counting an attempt.
    fn refusal(&self, sub: &str) -> Option<PeerResponse> {
        if !self.cluster.serving() {
            return Some(PeerResponse::Error(RemoteError::NotServed("node is not ready".into())));
        }
        match self.local.get(sub) {
            None => Some(PeerResponse::Error(RemoteError::NotServed(format!("subscription {sub} is not consumed here")))),
            Some(s) if !s.available() => Some(PeerResponse::Error(RemoteError::NotServed(format!("subscription {sub}: its app is down here")))),
            Some(_) => None,
        }
    }

    /// Serve `PeerRequest::Deliver` from the leader's dispatcher (`from`).
    pub async fn serve_delivery(&self, from: NodeId, sub: String, event: Event) -> PeerResponse {
        if let Some(refused) = self.refusal(&sub) {
            return refused;
        }
        let gone = crate::peer::served_link_closed().unwrap_or_default();
        let Some(r) = self.cut_short(&gone, self.run_local(&sub, event)).await else { return stopped_during_handler() };
        match r {
            // Nothing ran (the sidecar's app refused the connection): a refusal, not an attempt.
            Err(e) if e.is_not_served() => PeerResponse::Error(RemoteError::NotServed(e.message)),
            // `Delivered` would lose that no retry can mend it (not in the error's encoding);
            // a leader that reads `Rejected` takes `DeliveredEach` for one event too.
            Err(e) if e.is_no_retry() && self.net.features(from) & crate::peer::frame::features::REJECTED != 0 => {
                PeerResponse::DeliveredEach { outcomes: vec![EventOutcome::Rejected(e)], ticket: 0 }
            }
            r => PeerResponse::Delivered(r),
        }
    }

    /// Runs a delivery served for the leader until it ends, or until `CUT_GRACE` after this
    /// node's broker stopped (its drain): `None` then, answered "not served" before the links
    /// close (the node waits `IN_FLIGHT_GRACE` for the answers it owes). The leader saw the link
    /// close instead, and counted an attempt for every event a healthy node being restarted was
    /// still handling. A handler that ends in time keeps its outcome.
    /// Also `None` as soon as `gone` fires (`peer::served_link_closed`: the link the leader's
    /// request came on closed; for a batch answered early, `Batch::cut`): the leader gave up on
    /// the delivery then and hands the event out again, so the handler is stopped rather than
    /// left to run beside the next one, and a pull client's later ack is told the lease is gone
    /// instead of "acked".
    async fn cut_short<T>(&self, gone: &CancellationToken, run: impl std::future::Future<Output = T>) -> Option<T> {
        let cut = async {
            self.stop.cancelled().await;
            tokio::time::sleep(CUT_GRACE).await;
        };
        tokio::select! {
            biased;
            out = run => Some(out),
            () = cut => None,
            () = gone.cancelled() => {
                debug!("a delivery's handler stopped: its leader gave up on it (the link it came on closed, or its asks stopped)");
                None
            }
        }
    }

    /// Serve `PeerRequest::DeliverBatch` from `from`: the events' handlers run concurrently
    /// (the leader sends at most `max_in_flight` of them, the bound here is for anything else).
    /// `frame`: the link's (the smaller of both sides'), which the answer crosses. `each`: the
    /// leader reads `DeliveredEach` (`features::DELIVERED_EACH`): an event whose handler did not
    /// run, or was cut off by this node's drain, is said to be "not served" on its own, and the
    /// batch is answered after `EARLY_ANSWER` for the handlers that ended by then, the others
    /// `Running` (the leader asks for them with `AwaitDelivery`). To an older leader the batch
    /// is answered once all ended, and one with an event cut off is refused as a whole.
    pub async fn serve_delivery_batch(self: &Arc<Self>, from: NodeId, sub: String, events: Vec<Event>, frame: usize, each: bool) -> PeerResponse {
        if let Some(refused) = self.refusal(&sub) {
            return refused;
        }
        let n = events.len();
        if n > MAX_DELIVER_BATCH {
            let e = HandlerError::new(413, format!("{n} events in one delivery, at most {MAX_DELIVER_BATCH}"));
            return PeerResponse::DeliveredBatch(vec![Err(e); n]);
        }
        let gone = crate::peer::served_link_closed().unwrap_or_default();
        if !each {
            // Each event is cut on its own (all at the same moment).
            let runs = events.into_iter().map(|event| self.cut_short(&gone, self.run_local(&sub, event)));
            let results = futures_util::future::join_all(runs).await;
            return batch_answer(results, frame);
        }
        let cap = outcome_cap(frame, n);
        // Whether the leader reads `EventOutcome::Rejected`.
        let rejects = self.net.features(from) & crate::peer::frame::features::REJECTED != 0;
        let sub = Arc::new(sub);
        // The batch's own cut: by the request's link until it is answered, then by the leader's
        // asks (`Batch::cut`), which may come on another link.
        let cut = CancellationToken::new();
        let mut runs: futures_util::stream::FuturesUnordered<_> = events
            .into_iter()
            .enumerate()
            .map(|(i, event)| {
                let (this, sub, cut) = (self.clone(), sub.clone(), cut.clone());
                async move { (i as u32, event_outcome(this.cut_short(&cut, this.run_local(&sub, event)).await, cap, rejects)) }
            })
            .collect();
        let mut outcomes = {
            let first = first_outcomes(&mut runs, n, EARLY_ANSWER);
            tokio::pin!(first);
            tokio::select! {
                biased;
                outcomes = &mut first => outcomes,
                // The leader's request failed with its link: every handler is stopped (each
                // then ends at once, "not served").
                () = gone.cancelled() => {
                    cut.cancel();
                    first.await
                }
            }
        };
        if self.stop.is_cancelled() {
            // This node drains: no batch is left running past the answer (the drain would not
            // wait for it before the links close); every handler ends or is cut by `CUT_GRACE`.
            while let Some((i, o)) = futures_util::StreamExt::next(&mut runs).await {
                if let Some(slot) = outcomes.get_mut(i as usize) {
                    *slot = Some(o);
                }
            }
        }
        let left = outcomes.iter().filter(|o| o.is_none()).count();
        if left == 0 {
            let outcomes: Vec<EventOutcome> = outcomes.into_iter().flatten().collect();
            // None ran: refused as a whole, as to an older leader.
            if outcomes.iter().all(|o| matches!(o, EventOutcome::NotServed(_))) {
                if let Some(EventOutcome::NotServed(why)) = outcomes.into_iter().next() {
                    return PeerResponse::Error(RemoteError::NotServed(why));
                }
                return PeerResponse::DeliveredEach { outcomes: Vec::new(), ticket: 0 };
            }
            return PeerResponse::DeliveredEach { outcomes, ticket: 0 };
        }
        // The rest run on in a task of their own; their outcomes wait for the leader's asks.
        let ticket = self.tickets.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(left);
        // No await since the stop was checked: `handed_over` runs after the stop, so it sees
        // this entry.
        let batch = Batch { remaining: Some(Remaining { outcomes: rx, left }), asked: Instant::now(), cut: cut.clone(), exchanged_on: gone, exchanges: 0 };
        lock(&self.batches).insert((from, ticket), batch);
        let this = self.clone();
        tokio::spawn(async move {
            let mut check = tokio::time::interval(ASKS_LIVE);
            check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            // The exchange whose link's close was judged already.
            let mut judged: Option<u64> = None;
            while !cut.is_cancelled() {
                let last = lock(&this.batches).get(&(from, ticket)).map(|b| (b.exchanges, b.exchanged_on.clone()));
                let watched = last.filter(|(n, _)| judged != Some(*n));
                tokio::select! {
                    outcome = futures_util::StreamExt::next(&mut runs) => match outcome {
                        // Room for every outcome: `left` of them at most.
                        Some(outcome) => {
                            let _ = tx.try_send(outcome);
                            continue;
                        }
                        None => break,
                    },
                    () = async { match &watched { Some((_, t)) => t.cancelled().await, None => std::future::pending().await } } => {
                        judged = watched.map(|(n, _)| n);
                    }
                    _ = check.tick() => {}
                }
                if this.leader_gave_up(from, ticket) {
                    debug!(leader = from, ticket, "a delivery batch's handlers stopped: its leader no longer asks for them");
                    cut.cancel();
                }
            }
            // Cut: each handler ends at once ("not served").
            while let Some(outcome) = futures_util::StreamExt::next(&mut runs).await {
                let _ = tx.try_send(outcome);
            }
            drop(tx);
            // At the node's stop the outcomes wait for the leader's ask (`handed_over`), until
            // the runtime ends.
            if tokio::time::timeout(SETTLED_LINGER, this.stop.cancelled()).await.is_err() {
                lock(&this.batches).remove(&(from, ticket));
            }
        });
        for o in outcomes.iter_mut().filter(|o| o.is_none()) {
            *o = Some(EventOutcome::Running);
        }
        PeerResponse::DeliveredEach { outcomes: outcomes.into_iter().flatten().collect(), ticket }
    }

    /// Whether the leader `from` gave up on its batch `ticket`, answered early (`Batch`): with
    /// no ask of it under way, the link of their last exchange closed and no other link to the
    /// leader is up (its next ask is not sent without one: it fails the batch then), or it no
    /// longer leads and has not asked for `STOPPED_ASKING` (it asks again as soon as an answer
    /// arrives; a leader's asks may wait longer for a slot, here or on its side, under load).
    fn leader_gave_up(&self, from: NodeId, ticket: u64) -> bool {
        let stale = {
            let batches = lock(&self.batches);
            let Some(b) = batches.get(&(from, ticket)) else { return false };
            if b.remaining.is_none() {
                return false;
            }
            if b.exchanged_on.is_cancelled() && !self.net.reachable(from) {
                return true;
            }
            b.asked.elapsed() >= STOPPED_ASKING
        };
        stale && self.broker.store().replica().leader() != Some(from)
    }

    /// Serve `PeerRequest::AwaitDelivery` from `from`: the outcomes of the batch `ticket` that
    /// ended since they were last asked for, once there is at least one, with those that end
    /// within `GATHER` of it (handlers that end close together are answered together, not in a
    /// round each). Bounded: each handler ends by its ack deadline, or this node's drain cuts it
    /// (`cut_short`), or the leader giving up on the batch does (`Batch::cut`). The reasons
    /// were cut to the batch's share of the frame already.
    pub async fn serve_await_delivery(&self, from: NodeId, ticket: u64) -> PeerResponse {
        let taken = lock(&self.batches).get_mut(&(from, ticket)).map(|b| {
            b.asked = Instant::now();
            (b.remaining.take(), b.cut.clone())
        });
        let (mut remaining, cut) = match taken {
            Some((Some(remaining), cut)) => (remaining, cut),
            // The leader asks one at a time; a second ask is answered as busy (asked again).
            Some((None, _)) => return PeerResponse::Error(RemoteError::NotServed(format!("delivery batch {ticket} is being asked for already"))),
            None => return PeerResponse::Error(RemoteError::Invalid(format!("no delivery batch {ticket} runs here (this node restarted, or its outcomes waited longer than {SETTLED_LINGER:?})"))),
        };
        let mut ended = Vec::new();
        // The ask fails if its link closes while it waits: the leader gives up on the batch then.
        let gone = crate::peer::served_link_closed().unwrap_or_default();
        let first = tokio::select! {
            biased;
            first = remaining.outcomes.recv() => first,
            () = gone.cancelled() => {
                cut.cancel();
                // Put back, for the handlers' last outcomes to end in (and the linger to remove).
                if let Some(batch) = lock(&self.batches).get_mut(&(from, ticket)) {
                    batch.remaining = Some(remaining);
                }
                return PeerResponse::Error(RemoteError::NotServed(format!("delivery batch {ticket}: the ask's link closed")));
            }
        };
        if let Some(first) = first {
            ended.push(first);
            let until = Instant::now() + GATHER;
            while ended.len() < remaining.left {
                match tokio::time::timeout_at(until, remaining.outcomes.recv()).await {
                    Ok(Some(more)) => ended.push(more),
                    Ok(None) | Err(_) => break,
                }
            }
        }
        remaining.left = remaining.left.saturating_sub(ended.len());
        {
            let mut batches = lock(&self.batches);
            // Put back while outcomes are to come (unless the entry's linger removed it).
            match batches.get_mut(&(from, ticket)) {
                Some(batch) if remaining.left > 0 && !ended.is_empty() => {
                    batch.remaining = Some(remaining);
                    batch.asked = Instant::now();
                    batch.exchanged_on = gone.clone();
                    batch.exchanges += 1;
                }
                Some(_) => {
                    batches.remove(&(from, ticket));
                }
                None => {}
            }
        }
        if ended.is_empty() {
            return PeerResponse::Error(RemoteError::Internal(format!("delivery batch {ticket} ended without its outcomes")));
        }
        PeerResponse::DeliveredSome(ended)
    }

    /// Stops the every-instance loops and waits up to `grace` for them to return: each lets
    /// its running handler end and commits what it handled (`instance_loop`), so that a
    /// graceful stop does not deliver those events again after the restart. Before the broker
    /// stops: the loops' progress and their handlers' emits go through it.
    pub async fn stop_instances(&self, grace: Duration) -> bool {
        self.instances_stop.cancel();
        let until = Instant::now() + grace;
        // Bounded by `grace`, checked every 10 ms.
        while self.instance_loops.load(std::sync::atomic::Ordering::Acquire) > 0 {
            if Instant::now() >= until {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        true
    }

    /// Waits, at most `grace`, until every batch answered early has handed its outcomes to its
    /// leader (`AwaitDelivery`): at the node's drain, before the links close. Their handlers
    /// run outside the peer requests `PeerNet::quiesce` waits for, and a link closed before
    /// the cut ones were said "not served" cost each an attempt. Only batches whose leader
    /// still asks are waited for: one being asked for, or asked for within `ASKS_LIVE` by a
    /// leader still linked (one that stopped or restarted never asks again). False if some
    /// were left.
    pub async fn handed_over(&self, grace: Duration) -> bool {
        let until = Instant::now() + grace;
        // Bounded by `grace`, checked every 10 ms.
        loop {
            let waited = |(leader, _): &(NodeId, u64), b: &Batch| {
                b.remaining.is_none() || (b.asked.elapsed() < ASKS_LIVE && self.net.features(*leader) & features::DELIVERED_EACH != 0)
            };
            if !lock(&self.batches).iter().any(|(k, b)| waited(k, b)) {
                return true;
            }
            if Instant::now() >= until {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Consumers of a shared subscription: registered, available, and live.
    fn consumers(&self, sub: &str) -> Vec<NodeId> {
        self.sm
            .subscribers_of(sub)
            .into_iter()
            .filter(|n| {
                if *n == self.node_id {
                    self.local.get(sub).is_some_and(LocalSubscriber::available) && self.cluster.serving()
                } else {
                    self.net.reachable(*n) && self.cluster.is_member(*n)
                }
            })
            .collect()
    }

    /// On the leader: hand pending events of every shared subscription to consumers.
    async fn shared_loop(self: Arc<Self>, shutdown: CancellationToken) {
        // What an earlier process of this node left unfinished is counted first (bounded by
        // `UNFINISHED_WAIT`): handed out again before, a poison event could end the process
        // again before its count committed.
        let mut counted = self.unfinished_counted.subscribe();
        tokio::select! {
            _ = counted.wait_for(|done| *done) => {}
            () = shutdown.cancelled() => return,
        }
        // Positions handed out and not yet settled (see `Slot`).
        let inflight: InFlight = Arc::new(Mutex::new(HashMap::new()));
        // This node's leadership terms, counted: a delivery task of an earlier one must leave
        // the positions of this one alone.
        let mut epoch: u64 = 0;
        // Positions backing off after a failure or refusal, per subscription, with when each is
        // due; `due` orders them by that time (an entry whose time no longer matches is stale:
        // its position failed again since). Until due they are parked out of the subscription's
        // backlog, so a pass neither steps over them nor builds a set of them: a consumer that
        // fails everything puts most of the backlog here.
        let mut retry_at: HashMap<String, HashMap<u64, Instant>> = HashMap::new();
        let mut due: BinaryHeap<Reverse<(Instant, String, u64)>> = BinaryHeap::new();
        // Failed deliveries report their backoff here; drained every pass. Bounded by the
        // deliveries in flight (each sends at most one note, and its position stays in flight
        // until the note is drained).
        let (retry_tx, mut retry_rx) = mpsc::unbounded_channel::<RetryNote>();
        // Consumers that failed an event: its retries go to others while any are left.
        let mut failed_on: FailedOn = HashMap::new();
        // How often each position was refused (see `Retry::Refused`).
        let mut refusals: HashMap<(String, u64), u32> = HashMap::new();
        // What each shared subscription's earlier passes saw of its log (`Backlog`).
        let mut backlogs: HashMap<String, Backlog> = HashMap::new();
        // A finished delivery frees a slot: the next pass can hand out another event.
        let freed = Arc::new(tokio::sync::Notify::new());
        let mut appended = self.sm.watch_events();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut was_leader = false;
        let mut last_pass = Instant::now();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
                Ok(()) = appended.changed() => {}
                _ = freed.notified() => {}
            }
            if !pace(&mut last_pass, &shutdown).await {
                return;
            }
            // This pass sees every event appended so far.
            appended.borrow_and_update();
            // Not before this leader applied what its predecessors committed: their acks and
            // dead letters would be handed out again.
            let leader = self.broker.store().replica().leads_caught_up();
            if !leader {
                if was_leader {
                    // Deliveries in flight finish or time out on their own; the next leader
                    // starts from the replicated progress.
                    lock(&inflight).clear();
                    retry_at.clear();
                    due.clear();
                    failed_on.clear();
                    refusals.clear();
                    // A follower's state may be replaced by a snapshot: look afresh next time.
                    backlogs.clear();
                    epoch += 1;
                }
                was_leader = false;
                continue;
            }
            was_leader = true;
            while let Ok((key, retry, node, handed_in)) = retry_rx.try_recv() {
                if handed_in != epoch {
                    // From a lost leadership: its position was cleared then.
                    continue;
                }
                // The backoff is recorded before the position leaves the map: a pass that found
                // it in neither used to hand it out again at once.
                let pause = note_retry(&mut failed_on, &mut refusals, key.clone(), retry, node);
                let at = Instant::now() + pause;
                retry_at.entry(key.0.clone()).or_default().insert(key.1, at);
                if let Some(backlog) = backlogs.get_mut(&key.0) {
                    backlog.park(key.1);
                }
                release(&inflight, &key.0, key.1, epoch);
                due.push(Reverse((at, key.0, key.1)));
            }
            let now = Instant::now();
            while due.peek().is_some_and(|Reverse((at, _, _))| *at <= now) {
                let Some(Reverse((at, sub, position))) = due.pop() else { break };
                let Some(waiting) = retry_at.get_mut(&sub) else { continue };
                if waiting.get(&position) != Some(&at) {
                    continue;
                }
                waiting.remove(&position);
                if waiting.is_empty() {
                    retry_at.remove(&sub);
                }
                if let Some(backlog) = backlogs.get_mut(&sub) {
                    backlog.unpark(position);
                }
            }
            let noted = |f: &FailedOn| f.values().map(HashMap::len).sum::<usize>();
            if noted(&failed_on) > 10_000 || refusals.len() > 10_000 {
                // Nothing says when a failed event is later acked: first forget the positions
                // that are settled (neither backing off, nor in flight, nor open in their
                // subscription's backlog: waiting for a consumer counts as open), and only if
                // that is not enough all of it (a preference, bounded rather than grown).
                let f = lock(&inflight);
                let live = |sub: &str, position: u64| {
                    retry_at.get(sub).is_some_and(|m| m.contains_key(&position))
                        || f.get(sub).is_some_and(|m| m.contains(position))
                        || backlogs.get(sub).is_some_and(|b| b.holds(position))
                };
                for (sub, positions) in failed_on.iter_mut() {
                    positions.retain(|p, _| live(sub, *p));
                }
                failed_on.retain(|_, positions| !positions.is_empty());
                refusals.retain(|(sub, p), _| live(sub, *p));
                drop(f);
                if noted(&failed_on) > 10_000 || refusals.len() > 10_000 {
                    failed_on.clear();
                    refusals.clear();
                }
            }
            let subscriptions = self.sm.shared_subscriptions();
            backlogs.retain(|name, _| subscriptions.iter().any(|(n, _)| n == name));
            for (name, decl) in subscriptions {
                let consumers = self.consumers(&name);
                if consumers.is_empty() {
                    continue;
                }
                let mut load: HashMap<NodeId, u32> = consumers.iter().map(|c| (*c, 0)).collect();
                // Parked, but a backlog looked at afresh (another filter) finds them again.
                let backing_off = retry_at.get(&name);
                let failed = failed_on.get(&name);
                let pending = {
                    // Held while `pending` reads the log, so the positions in flight are read in
                    // place (delivery tasks take this lock only briefly, the log's read lock is
                    // never taken the other way round).
                    let f = lock(&inflight);
                    let busy = f.get(&name);
                    let mut handed = 0;
                    for (node, l) in load.iter_mut() {
                        *l = busy.and_then(|b| b.handed.get(node)).copied().unwrap_or(0);
                        handed += *l as usize;
                    }
                    let settling = busy.map_or(0, |b| b.slots.len());
                    let capacity = consumers.len() * decl.max_in_flight as usize;
                    // Outcomes being committed do not hold a consumer's slot, but are bounded too.
                    let free = capacity.saturating_sub(handed).min((capacity * SETTLING_FACTOR).saturating_sub(settling));
                    if free == 0 {
                        continue;
                    }
                    // Looked up by `&str` first: a new name is copied once, not on every pass.
                    if !backlogs.contains_key(&name) {
                        backlogs.insert(name.clone(), Backlog::default());
                    }
                    let Some(backlog) = backlogs.get_mut(&name) else { continue };
                    self.sm.pending(&name, free, backlog, |p| busy.is_some_and(|m| m.contains(p)) || backing_off.is_some_and(|m| m.contains_key(&p)))
                };
                // What each consumer gets in this pass: one task (and one progress message) for
                // this node's consumer and for each peer that takes `DeliverBatch` (one frame),
                // one request per event for older peers.
                let mut handout: HashMap<NodeId, Vec<(Event, u32)>> = HashMap::new();
                // Events that wait for a consumer they have not failed on (`pick`).
                let mut waiting = Vec::new();
                {
                    let mut f = lock(&inflight);
                    let busy = f.entry(name.clone()).or_default();
                    for (event, attempts) in pending {
                        let avoid = failed.and_then(|m| m.get(&event.position));
                        let target = match pick(&load, decl.max_in_flight, avoid.map(Vec::as_slice)) {
                            Pick::Take(target) => target,
                            Pick::Wait => {
                                waiting.push(event.position);
                                continue;
                            }
                            Pick::Full => break,
                        };
                        *load.entry(target).or_default() += 1;
                        busy.hand(event.position, target, epoch);
                        handout.entry(target).or_default().push((event, attempts));
                    }
                }
                // Out of the walk while in flight: a pass used to step over every position
                // handed out and not yet settled. Each comes back only if it does not ack
                // (its backoff note unparks it when due); an ack settles it for good, and a
                // lost leadership drops the backlogs.
                if let Some(backlog) = backlogs.get_mut(&name) {
                    for events in handout.values() {
                        for (event, _) in events {
                            backlog.park(event.position);
                        }
                    }
                }
                // Parked like a backoff, for `WAIT_RECHECK`: left in the walk, they would take the
                // places of events a consumer with room could take in every pass, and a pass
                // would step over all of them (a consumer failing everything fast makes many).
                if !waiting.is_empty() {
                    let at = Instant::now() + WAIT_RECHECK;
                    let parked = retry_at.entry(name.clone()).or_default();
                    for &p in &waiting {
                        parked.insert(p, at);
                        due.push(Reverse((at, name.clone(), p)));
                    }
                    if let Some(backlog) = backlogs.get_mut(&name) {
                        for p in waiting {
                            backlog.park(p);
                        }
                    }
                }
                for (target, events) in handout {
                    let batched = target == self.node_id || self.net.features(target) & features::DELIVER_BATCH != 0;
                    let per_frame = if batched { MAX_DELIVER_BATCH } else { 1 };
                    for batch in handout_batches(events, per_frame, self.net.max_frame_to(target) / 2) {
                        let (this, inflight, decl, retry_tx, freed) = (self.clone(), inflight.clone(), decl.clone(), retry_tx.clone(), freed.clone());
                        let stop = shutdown.clone();
                        // Ends with the dispatcher: a local handler does not run on for up to its
                        // ack deadline after the node stopped (unacked, the event is delivered
                        // again by the next leader).
                        tokio::spawn(stop.run_until_cancelled_owned(async move {
                            // The consumer answered for these: its slots are free, the outcomes
                            // are being committed.
                            let answered = |positions: &[u64]| {
                                mark_answered(&inflight, &decl.name, positions, epoch);
                                freed.notify_one();
                            };
                            let settled = |p: u64, pause: Option<Retry>| match pause {
                                // Acked and committed: the log no longer lists it as pending.
                                None => release(&inflight, &decl.name, p, epoch),
                                // Failed: it stays in flight until the pass has its backoff.
                                Some(retry) => {
                                    let _ = retry_tx.send(((decl.name.clone(), p), retry, target, epoch));
                                }
                            };
                            this.deliver_shared(&decl, target, batch, &answered, &settled).await;
                        }));
                    }
                }
            }
        }
    }

    /// Hands events of a shared subscription to one consumer (several only to a peer that
    /// takes `DeliverBatch`). As the consumer answers for some of them, `answered` runs for
    /// those (their slots are free from then on), their outcomes are committed, and `settled`
    /// runs for each with when to retry it if it did not ack. Events whose handlers end sooner
    /// are not held behind a slow one: this node's own handlers are settled as they end, a
    /// consumer that reads `DeliveredEach` answers for those that ended within its
    /// `EARLY_ANSWER` and is asked for the rest (`AwaitDelivery`) until they end.
    async fn deliver_shared(&self, decl: &SubscriptionDecl, target: NodeId, batch: Vec<(Event, u32)>, answered: &(impl Fn(&[u64]) + Sync), settled: &(impl Fn(u64, Option<Retry>) + Sync)) {
        use futures_util::FutureExt;
        use futures_util::StreamExt;
        let deadline = Duration::from_millis(decl.ack_deadline_ms.max(1));
        let n = batch.len();
        let (events, attempts): (Vec<Event>, Vec<u32>) = batch.into_iter().unzip();
        let positions: Vec<u64> = events.iter().map(|e| e.position).collect();
        let item = |(i, outcome): (usize, Outcome)| (positions[i], attempts[i], outcome);
        if target == self.node_id {
            // Noted on disk while they run: nobody else would count a handler that ends the
            // process (`count_unfinished`).
            let refs: Vec<EventRef> = events.iter().map(|e| EventRef::new(e.position, &e.body.id)).collect();
            let slots = lock(&self.running).get_mut(&decl.name).map(|notes| notes.start(&refs));
            // `run_local` holds the handler to the ack deadline.
            let mut runs: futures_util::stream::FuturesUnordered<_> =
                events.into_iter().enumerate().map(|(i, event)| async move { (i, Outcome::local(self.run_local(&decl.name, event).await)) }).collect();
            let end = |ended: &[(usize, Outcome)]| {
                if let Some(slots) = &slots {
                    let done: Vec<u64> = ended.iter().filter_map(|(i, _)| slots.get(*i).copied()).collect();
                    if let Some(notes) = lock(&self.running).get_mut(&decl.name) {
                        notes.ended(done);
                    }
                }
            };
            // Handlers that end on their first poll (the common case) are settled at once.
            let mut ready = Vec::with_capacity(n);
            while let Some(Some(done)) = runs.next().now_or_never() {
                ready.push(done);
            }
            end(&ready);
            if runs.is_empty() {
                return self.settle(decl, target, ready.into_iter().map(item).collect(), answered, settled).await;
            }
            let mut settling = futures_util::stream::FuturesUnordered::new();
            settling.push(self.settle(decl, target, ready.into_iter().map(item).collect(), answered, settled));
            loop {
                tokio::select! {
                    Some(first) = runs.next() => {
                        // Those that end together, or within `GATHER`, are settled together
                        // (one commit).
                        let mut ended = vec![first];
                        while let Some(Some(more)) = runs.next().now_or_never() {
                            ended.push(more);
                        }
                        let until = Instant::now() + GATHER;
                        while !runs.is_empty() {
                            match tokio::time::timeout_at(until, runs.next()).await {
                                Ok(Some(more)) => ended.push(more),
                                Ok(None) | Err(_) => break,
                            }
                        }
                        end(&ended);
                        settling.push(self.settle(decl, target, ended.into_iter().map(item).collect(), answered, settled));
                    }
                    Some(()) = settling.next() => {}
                    else => break,
                }
            }
            return;
        }
        // The leader's wait runs from when the request went into the link's queue, as near as
        // it can tell to when the consumer starts its handlers' ack deadline (on arrival): the
        // wait for a place on a congested link used to be taken off it, and the leader gave up
        // on (and handed out again) events the consumer was still within its time for.
        let req = if n == 1 {
            let event = events.into_iter().next().expect("one event"); // n == 1
            PeerRequest::Deliver { sub: decl.name.clone(), event }
        } else {
            PeerRequest::DeliverBatch { sub: decl.name.clone(), events }
        };
        let (answer, sent_at) = match self.net.request_from_queued(target, &req, deadline + DELIVERY_GRACE).await {
            Ok((answer, queued)) => (Ok(answer), queued),
            Err(e) => (Err(e), Instant::now()),
        };
        drop(req);
        let (outcomes, ticket) = match answer {
            Ok(PeerResponse::DeliveredEach { outcomes, ticket }) if outcomes.len() == n => (outcomes, ticket),
            other => {
                let all = remote_outcomes(other, n, deadline).into_iter().enumerate().map(item).collect();
                return self.settle(decl, target, all, answered, settled).await;
            }
        };
        let mut running: Vec<bool> = outcomes.iter().map(|o| matches!(o, EventOutcome::Running)).collect();
        let ended: Vec<_> = outcomes.into_iter().enumerate().filter_map(|(i, o)| each_outcome(o).map(|o| (i, o))).map(item).collect();
        if !running.contains(&true) {
            return self.settle(decl, target, ended, answered, settled).await;
        }
        let mut settling = futures_util::stream::FuturesUnordered::new();
        settling.push(self.settle(decl, target, ended, answered, settled));
        // Asked one at a time, until none runs or the leader's wait for the batch is over.
        let bound = sent_at + deadline + DELIVERY_GRACE;
        let mut asks = futures_util::stream::FuturesUnordered::new();
        asks.push(self.ask(target, ticket, bound, deadline));
        loop {
            tokio::select! {
                Some(asked) = asks.next() => {
                    let ended: Vec<(usize, Outcome)> = match asked {
                        Ok(list) => list
                            .into_iter()
                            .filter_map(|(i, o)| {
                                let i = i as usize;
                                // Each once, and only those still running.
                                let was = running.get_mut(i).filter(|r| **r)?;
                                let o = each_outcome(o)?;
                                *was = false;
                                Some((i, o))
                            })
                            .collect(),
                        // Whatever still runs shares the failure (a lost link, the deadline).
                        Err(failed) => running.iter_mut().enumerate().filter(|(_, r)| **r).map(|(i, r)| {
                            *r = false;
                            (i, failed.clone())
                        }).collect(),
                    };
                    if running.contains(&true) {
                        asks.push(self.ask(target, ticket, bound, deadline));
                    }
                    settling.push(self.settle(decl, target, ended.into_iter().map(item).collect(), answered, settled));
                }
                Some(()) = settling.next() => {}
                else => break,
            }
        }
    }

    /// Asks `target` for the outcomes of its batch `ticket` that ended since it was last asked
    /// (`AwaitDelivery`), until `bound`; `Err`: what became of all that still ran.
    async fn ask(&self, target: NodeId, ticket: u64, bound: Instant, deadline: Duration) -> Result<Vec<(u32, EventOutcome)>, Outcome> {
        let late = || Outcome::Ran(Err(HandlerError::new(504, format!("ack deadline of {} ms passed", deadline.as_millis()))));
        // Bounded by `bound`: each round waits at least `ASK_AGAIN` or until an answer.
        loop {
            let left = bound.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(late());
            }
            // A consumer restarted on an older build (or not yet linked again) cannot decode the
            // ask, and would close the link over it: its handlers may have run.
            if self.net.features(target) & features::DELIVERED_EACH == 0 {
                return Err(Outcome::Ran(Err(HandlerError::new(502, format!("node {target} no longer serves the batch (its link is gone or it runs an older build)")))));
            }
            match self.net.request(target, &PeerRequest::AwaitDelivery { ticket }, left).await {
                Ok(PeerResponse::DeliveredSome(list)) if !list.is_empty() => return Ok(list),
                // Its serving slots were all taken for a moment: asked again.
                Ok(PeerResponse::Error(RemoteError::NotServed(_))) => tokio::time::sleep(ASK_AGAIN.min(left)).await,
                // The consumer no longer knows the batch (it restarted): its handlers may have run.
                Ok(PeerResponse::Error(e)) => return Err(Outcome::Ran(Err(HandlerError::new(502, e.to_string())))),
                Ok(other) => return Err(Outcome::Ran(Err(HandlerError::new(502, format!("unexpected answer {}", crate::raft::response_name(&other)))))),
                Err(crate::peer::PeerError::Timeout { .. }) => return Err(late()),
                // A link lost (or none to send the ask on): the handlers may have run.
                Err(e) => return Err(Outcome::Ran(Err(HandlerError::new(502, e.to_string())))),
            }
        }
    }

    /// A failed delivery of `position`, handed out when it had `attempts` failed attempts:
    /// counted once however often it is sent, where every member applies `FailedAt`; with
    /// `no_retry` (`HandlerError::no_retry`) dead-lettered at once, where every member applies
    /// `Rejected` (a failure like any other until then).
    fn failed(&self, sub: String, position: u64, attempts: u32, reason: String, no_retry: bool) -> SubUpdate {
        let replica = self.broker.store().replica();
        if no_retry && replica.members_have(features::REJECTED) {
            SubUpdate::Rejected { sub, position, attempts, reason }
        } else if replica.members_have(features::FAILED_AT) {
            SubUpdate::FailedAt { sub, position, attempts, reason }
        } else {
            SubUpdate::Failed { sub, position, reason }
        }
    }

    /// Commits the outcomes of `items` (position, attempts before, outcome) handed to `target`:
    /// `answered` first (their slots are free), then `settled` for each with when to retry it.
    async fn settle(&self, decl: &SubscriptionDecl, target: NodeId, items: Vec<(u64, u32, Outcome)>, answered: &impl Fn(&[u64]), settled: &impl Fn(u64, Option<Retry>)) {
        if items.is_empty() {
            return;
        }
        let n = items.len();
        let positions: Vec<u64> = items.iter().map(|(p, _, _)| *p).collect();
        answered(&positions);
        let mut updates = Vec::with_capacity(n);
        let (mut acks, mut refused) = (0, 0);
        let pauses: Vec<Option<Retry>> = items
            .into_iter()
            .map(|(position, attempts, result)| match result {
                Outcome::Ran(Ok(())) => {
                    acks += 1;
                    updates.push(SubUpdate::Ack { sub: decl.name.clone(), position });
                    None
                }
                Outcome::Refused(why) => {
                    // No handler ran: not an attempt. Another consumer gets it after a pause
                    // (this one is avoided while others are left).
                    debug!(sub = %decl.name, position, target, why = %why, "delivery refused");
                    refused += 1;
                    Some(Retry::Refused)
                }
                Outcome::Ran(Err(e)) => {
                    debug!(sub = %decl.name, position, target, cause = %e, no_retry = e.is_no_retry(), "delivery failed");
                    let mut reason = format!("node {target}: {e}");
                    crate::sdk::truncate_utf8(&mut reason, reason_cap(self.net.max_frame()));
                    updates.push(self.failed(decl.name.clone(), position, attempts, reason, e.is_no_retry()));
                    Some(Retry::After(backoff(attempts + 1)))
                }
            })
            .collect();
        // Nothing waits on these but the positions they settle: they may ride in the next
        // event entry rather than make one.
        let committed = self.update(updates, true).await;
        // Counted once the outcomes are committed (an ack is not one before); a refusal commits
        // nothing. Those whose commit failed are handed out again: `unsettled`.
        if committed {
            metrics::counter!("raftbridge_deliveries_total", "outcome" => "ack").increment(acks);
            metrics::counter!("raftbridge_deliveries_total", "outcome" => "nack").increment(n as u64 - acks - refused);
        } else {
            metrics::counter!("raftbridge_deliveries_total", "outcome" => "unsettled").increment(n as u64 - refused);
        }
        metrics::counter!("raftbridge_deliveries_total", "outcome" => "refused").increment(refused);
        for (p, pause) in positions.into_iter().zip(pauses) {
            settled(p, if committed { pause } else { pause.or(Some(Retry::Unsettled)) });
        }
    }

    /// On every node: deliver an every-instance subscription's events to the local handler, in
    /// log order.
    async fn instance_loop(self: Arc<Self>, name: String, shutdown: CancellationToken) {
        let mut next: Option<u64> = None;
        let mut appended = self.sm.watch_events();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_pass = Instant::now();
        // When a position past events that did not match was last committed (see below).
        let mut scan_recorded = Instant::now();
        // Attempts noted on disk before each run: a handler that ends the process counts.
        let mut mark = self.marks_dir.as_deref().map(|dir| AttemptMark::open(dir, &name));
        // Whether this node has applied what the cluster had committed when the loop last
        // started from the replicated position: a restarted node becomes ready before it has
        // applied the entries that committed its last progress (this loop is answered once
        // the leader applied them), and started from the older position it delivered an event
        // it had dead-lettered just before the restart again, with no attempts noted for it.
        let mut synced = false;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
                Ok(()) = appended.changed() => {}
            }
            if !pace(&mut last_pass, &shutdown).await {
                return;
            }
            // This pass sees every event appended so far.
            appended.borrow_and_update();
            let Some((decl, replicated)) = self.sm.instance_position(&name, self.node_id) else { continue };
            // Only while this node's registration declares it: a service that gave the name up
            // (`registry::drop_foreign_subscriptions`) keeps its handler, not the events.
            if decl.shared || !self.cluster.ready() || !self.sm.declares(self.node_id, &name) {
                continue;
            }
            if next.is_none() && !synced {
                let barrier = self.broker.store().replica().read_barrier(SYNC_WAIT);
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    done = barrier => if let Err(e) = done {
                        debug!(subscription = %name, cause = %e, "not caught up with the cluster's commits yet");
                        continue;
                    }
                }
                synced = true;
                // Read again: the barrier may have applied its progress.
                continue;
            }
            let from = next.unwrap_or(replicated).max(replicated);
            let (events, scanned_to, expired) = self.sm.matching_from(&name, from, 256);
            if expired > 0 {
                // Retention dropped positions this node had not reached: said, not silent, as
                // the state machine does for shared subscriptions (reported here, not under its
                // read lock).
                metrics::counter!("raftbridge_subscription_expired_events_total", "subscription" => name.clone()).increment(expired);
                warn!(subscription = %name, expired, from, "retention dropped events before this node delivered them");
            }
            // Progress is committed once per pass (or per `INSTANCE_FLUSH` of handling), not per
            // event: waiting for a commit after each event capped an every-instance
            // subscription at one event per commit round (a few hundred a second per node).
            let mut progress: Vec<SubUpdate> = Vec::new();
            let mut flushed = Instant::now();
            let matched = !events.is_empty();
            // Progress that could not be committed: this pass ends and the next starts from the
            // replicated position again (`next = None`). Going on from memory would let a later
            // position commit past it: a dead letter in it would be neither recorded nor
            // delivered again.
            let mut lost = false;
            // The node drains: no handler starts after the stop.
            let mut stopping = false;
            'events: for event in events {
                if shutdown.is_cancelled() {
                    stopping = true;
                    break 'events;
                }
                let position = event.position;
                let event_ref = EventRef::new(position, &event.body.id);
                // Attempts on it that an earlier process counted and never ended: it ended first
                // (or failed attempts before a restart).
                let mut attempts = mark.as_ref().map_or(0, |m| m.started_before(event_ref));
                let dead = loop {
                    if attempts >= decl.max_attempts {
                        warn!(subscription = %name, position, attempts, "this event's attempts ran out across restarts of the node: dead-lettered");
                        break Some((attempts, format!("its {attempts} attempts ran out across restarts of the node (the process ended during the last)")));
                    }
                    while !self.local.get(&name).is_some_and(LocalSubscriber::available) {
                        // Before a wait that may be long: the previous event's clearing is
                        // written, and what is done committed (a stop meanwhile would otherwise
                        // deliver these again after the restart).
                        settle_mark(&mut mark);
                        if !progress.is_empty() {
                            if !self.record_instance_progress(&name, std::mem::take(&mut progress)).await {
                                lost = true;
                                break 'events;
                            }
                            flushed = Instant::now();
                        }
                        if !self.until_available(&name, &shutdown).await {
                            return;
                        }
                    }
                    let result = match mark.as_mut() {
                        Some(mark) => {
                            let started = Starting::new(mark, event_ref, attempts + 1);
                            let result = self.run_local(&name, event.clone()).await;
                            // A refusal ran nothing: its attempt is taken back. (An ack is
                            // cleared below, with a dead letter.)
                            started.ended(if matches!(&result, Err(e) if e.is_not_served()) { attempts } else { attempts + 1 });
                            result
                        }
                        None => self.run_local(&name, event.clone()).await,
                    };
                    match result {
                        Ok(()) => break None,
                        Err(e) if e.is_not_served() => {
                            // Nothing ran: no attempt. The refusal most often took the app's
                            // availability down, which the next turn waits on; a pause in
                            // case it did not.
                            tokio::select! {
                                _ = shutdown.cancelled() => {
                                    stopping = true;
                                    break 'events;
                                }
                                _ = tokio::time::sleep(BACKOFF_BASE) => {}
                            }
                        }
                        Err(e) => {
                            attempts += 1;
                            // This node's own progress records the dead letter: no member
                            // needs to know `Rejected`.
                            if attempts >= decl.max_attempts || e.is_no_retry() {
                                break Some((attempts, e.to_string()));
                            }
                            // Committed before the backoff too: retries of one event can take
                            // minutes, and `INSTANCE_FLUSH` promises less redelivery than that.
                            if !progress.is_empty() {
                                if !self.record_instance_progress(&name, std::mem::take(&mut progress)).await {
                                    lost = true;
                                    break 'events;
                                }
                                flushed = Instant::now();
                            }
                            tokio::select! {
                                _ = shutdown.cancelled() => {
                                    stopping = true;
                                    break 'events;
                                }
                                _ = tokio::time::sleep(backoff(attempts)) => {}
                            }
                        }
                    }
                };
                let dead_lettered = dead.is_some();
                next = Some(position + 1);
                note_progress(&mut progress, SubUpdate::Instance { sub: name.clone(), node: self.node_id, position, dead });
                if dead_lettered {
                    // Committed before the next event runs, and its note cleared only then:
                    // were the next one to end the process too, this one would otherwise start
                    // over after the restart, and the two take turns for good.
                    settle_mark(&mut mark);
                    if !self.record_instance_progress(&name, std::mem::take(&mut progress)).await {
                        lost = true;
                        break 'events;
                    }
                    flushed = Instant::now();
                }
                if let Some(mark) = mark.as_mut() {
                    // Settled here: a restart before its progress commits delivers it afresh.
                    // Written with the next event's first note (one write per event), or before
                    // anything that waits (`settle_mark`).
                    mark.settled(event_ref);
                }
                // By bytes too: dead letters with their reasons, many to a pass, must fit one
                // entry (one that never fits would be refused, and the pass redone, for good).
                let bytes: usize = progress.iter().map(SubUpdate::approx_size).sum();
                if flushed.elapsed() >= INSTANCE_FLUSH || bytes >= self.broker.progress_budget() {
                    settle_mark(&mut mark);
                    if !self.record_instance_progress(&name, std::mem::take(&mut progress)).await {
                        lost = true;
                        break 'events;
                    }
                    flushed = Instant::now();
                }
            }
            settle_mark(&mut mark);
            if stopping {
                // What was handled is committed before the loop ends (the broker still runs:
                // `stop_instances`); a graceful stop used to drop up to `INSTANCE_FLUSH` of it,
                // delivered again after the restart.
                self.record_instance_progress(&name, progress).await;
                return;
            }
            if lost || !self.record_instance_progress(&name, progress).await {
                next = None;
                // A commit that timed out may still land: caught up again before going back.
                synced = false;
                // Commits fail while there is no leader: not a pass each millisecond meanwhile.
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(BACKOFF_BASE) => {}
                }
                continue;
            }
            if let Some(to) = scanned_to {
                next = Some(next.unwrap_or(to).max(to));
            }
            // Past events that did not match, the replicated position moves too (at most every
            // `INSTANCE_FLUSH`): otherwise a restart of a node with a selective filter went back
            // to its last match, and retention's trims since then were counted as lost.
            if let Some(to) = next.filter(|&to| !matched && to > replicated && scan_recorded.elapsed() >= INSTANCE_FLUSH) {
                let skipped = SubUpdate::Instance { sub: name.clone(), node: self.node_id, position: to - 1, dead: None };
                self.record_instance_progress(&name, vec![skipped]).await;
                scan_recorded = Instant::now();
            }
        }
    }

    /// Commits an every-instance loop's progress (see `note_progress`). False when it could not:
    /// the loop then goes back to the replicated position, and delivers those events again (at
    /// least once).
    async fn record_instance_progress(&self, sub: &str, progress: Vec<SubUpdate>) -> bool {
        if progress.is_empty() {
            return true;
        }
        let last = progress.last().map(|u| match u {
            SubUpdate::Instance { position, .. } => *position,
            _ => 0,
        });
        let ok = self.update(progress, false).await;
        if !ok {
            warn!(sub, position = ?last, "could not record progress; delivering from the recorded position again");
        }
        ok
    }
}

/// Writes what `AttemptMark::settled` left pending (before the loop awaits anything that may
/// take long: between two events it is written with the next one's first note).
fn settle_mark(mark: &mut Option<AttemptMark>) {
    if let Some(mark) = mark {
        mark.flush();
    }
}

/// An attempt noted as started in an every-instance subscription's [`AttemptMark`], to be
/// noted again with what counts once it ended. If the run is dropped unended and not by a
/// panic (the runtime shutting down drops the node's tasks), the attempt is taken back: a stop
/// is not the handler's doing. A panic leaves it counted (it is a crash the next run would meet
/// again), as does a process that ends without unwinding (killed, aborted). A graceful drain
/// does not drop the loop (`supervise` waits for it): the handler ends, and counts as it ends.
struct Starting<'a> {
    mark: &'a mut AttemptMark,
    event: EventRef,
    n: u32,
    ended: bool,
}

impl<'a> Starting<'a> {
    fn new(mark: &'a mut AttemptMark, event: EventRef, n: u32) -> Starting<'a> {
        mark.note(event, n);
        Starting { mark, event, n, ended: false }
    }

    /// The attempt ended with `counted` attempts on the event (rewritten only if that differs).
    fn ended(mut self, counted: u32) {
        self.ended = true;
        if counted != self.n {
            self.mark.note(self.event, counted);
        }
    }
}

impl Drop for Starting<'_> {
    fn drop(&mut self) {
        if !self.ended && !std::thread::panicking() {
            self.mark.note(self.event, self.n - 1);
        }
    }
}

/// What became of one event handed to a consumer.
#[derive(Debug, Clone, PartialEq)]
enum Outcome {
    /// The handler ran, or may have (a lost link, a timeout): `Ok` acks, `Err` is an attempt.
    Ran(Result<(), HandlerError>),
    /// No handler ran: the consumer's node said so (not ready, or not consuming it there), or
    /// the request never left this node (no link to it could be made).
    Refused(String),
}

impl Outcome {
    /// A handler's result on this node: one that did not run ([`HandlerError::not_served`]) is
    /// a refusal.
    fn local(result: Result<(), HandlerError>) -> Outcome {
        match result {
            Err(e) if e.is_not_served() => Outcome::Refused(e.message),
            r => Outcome::Ran(r),
        }
    }
}

/// What the leader makes of one event's outcome in `DeliveredEach` (`None`: still running).
fn each_outcome(outcome: EventOutcome) -> Option<Outcome> {
    match outcome {
        EventOutcome::Ran(r) => Some(Outcome::Ran(r)),
        EventOutcome::NotServed(why) => Some(Outcome::Refused(why)),
        EventOutcome::Running => None,
        EventOutcome::Rejected(e) => Some(Outcome::Ran(Err(e.no_retry()))),
    }
}

/// How soon an `AwaitDelivery` the consumer could not take (its serving slots all taken) is
/// sent again.
const ASK_AGAIN: Duration = Duration::from_millis(50);

/// The outcomes of `n` events sent to another node in one request.
fn remote_outcomes(answer: Result<PeerResponse, crate::peer::PeerError>, n: usize, deadline: Duration) -> Vec<Outcome> {
    match answer {
        Ok(PeerResponse::Delivered(r)) if n == 1 => vec![Outcome::Ran(r)],
        Ok(PeerResponse::DeliveredBatch(r)) if r.len() == n => r.into_iter().map(Outcome::Ran).collect(),
        // (A `DeliveredEach` of the right length is taken apart by `deliver_shared`.)
        Ok(PeerResponse::Error(RemoteError::NotServed(why))) => vec![Outcome::Refused(why); n],
        Ok(other) => vec![Outcome::Ran(Err(HandlerError::new(502, format!("unexpected answer {}", crate::raft::response_name(&other))))); n],
        // One event that no frame can carry: no consumer will ever take it, so it is an attempt
        // (it dead-letters after the subscription's attempts) rather than a refusal, which
        // would hand it out again for good. (Batches are cut to half a frame: `in_frames`.)
        Err(e @ crate::peer::PeerError::TooLarge { .. }) if n == 1 => vec![Outcome::Ran(Err(HandlerError::new(413, e.to_string())))],
        // The request never left (no link could be made): no handler ran, as with a refusal.
        Err(e) if e.not_delivered() => vec![Outcome::Refused(e.to_string()); n],
        // No answer even past the deadline (`DELIVERY_GRACE`): the consumer is stuck or gone.
        Err(crate::peer::PeerError::Timeout { .. }) => {
            let why = format!("ack deadline of {} ms passed", deadline.as_millis());
            vec![Outcome::Ran(Err(HandlerError::new(504, why))); n]
        }
        // A link lost: the handler may have run, so it counts.
        Err(e) => vec![Outcome::Ran(Err(HandlerError::new(502, e.to_string()))); n],
    }
}

/// Adds one handled event of an every-instance subscription to the progress of a pass, in log
/// order: a dead-lettered event keeps its own update (it records the dead letter), a run of
/// handled ones needs only its last (the replicated position is the next one to deliver).
fn note_progress(progress: &mut Vec<SubUpdate>, update: SubUpdate) {
    let plain = |u: &SubUpdate| matches!(u, SubUpdate::Instance { dead: None, .. });
    if plain(&update) && progress.last().is_some_and(plain) {
        progress.pop();
    }
    progress.push(update);
}

/// What a delivery's writes and emits are tagged with: the subscription's name, and for an
/// every-instance subscription also the node (each node's run is its own).
/// Borrowed for a shared subscription: no allocation per delivery on the common path.
fn tag_scope(sub: &str, shared: bool, node_id: u64) -> std::borrow::Cow<'_, str> {
    if shared { sub.into() } else { format!("{sub}@{node_id}").into() }
}

/// The producer key of the event a handler of subscription scope `scope` returns for the event
/// `source_id`: one per delivered event, whatever the event holds, so a redelivery (the first
/// run's publish committed, but its ack did not) emits nothing new, as the README promises, even
/// when its handler returns other content (the demo's `servedBy` names the node that ran it).
/// Until session 37 the key held a fingerprint of the content, and a redelivery on another node
/// emitted a second event. A handler's own `ctx.emit`s keep theirs (`sdk::next_tag`): a handler
/// may emit several events per run, and a command's re-run must emit what its answer says.
fn returned_event_key(scope: &str, source_id: &str) -> String {
    super::internal_key(format_args!("sub:{scope}:{source_id}:returned"))
}

/// The context of a delivery of `event` to subscription `sub` (its tag scope, `tag_scope`).
fn delivery_meta(sub: &str, event: &super::event::EventBody) -> MessageMeta {
    MessageMeta {
        trace_id: event.trace_id.clone().unwrap_or_default(),
        correlation_id: event.correlation_id.clone().unwrap_or_default(),
        principal_id: event.principal_id.clone(),
        tenant_id: event.tenant_id.clone(),
        sender: event.sender.clone(),
        // Writes the handler makes are tagged per (subscription, event): a redelivery does not
        // apply them twice.
        idempotency_key: Some(format!("sub:{sub}:{}", event.id)),
        traceparent: String::new(),
    }
}

/// Spaces a delivery loop's passes at least `MIN_PASS` apart (false on shutdown). The loops wake
/// on appended events and freed slots, which under load come thousands of times a second; one
/// pass takes everything that accumulated, so a short spacing bounds their CPU without a
/// polling delay.
async fn pace(last: &mut Instant, shutdown: &CancellationToken) -> bool {
    let due = *last + MIN_PASS;
    if due > Instant::now() {
        tokio::select! {
            _ = tokio::time::sleep_until(due) => {}
            _ = shutdown.cancelled() => return false,
        }
    }
    *last = Instant::now();
    true
}

/// How long deliveries served for the leader may run on once this node's broker stopped: a
/// little less than the node's wait for the answers it owes its peers (`IN_FLIGHT_GRACE`, 3 s),
/// so that the "not served" of one cut off still goes out.
const CUT_GRACE: Duration = Duration::from_millis(2_500);

/// A delivery whose handler this node's drain cut off: no outcome, not an attempt (the
/// leader hands it to another consumer; its tagged writes apply once).
fn stopped_during_handler() -> PeerResponse {
    PeerResponse::Error(RemoteError::NotServed("this node stopped while the handler ran".into()))
}

/// The answer to an older leader's `DeliverBatch` from its events' results (`None`: cut off
/// by the drain). A batch none of whose events ran, or with an event cut off, is refused as a
/// whole (handed out again, finished events included: at least once); an event whose app
/// refused it counts as an attempt then, as the flag does not cross a link on its own.
fn batch_answer(results: Vec<Option<Result<(), HandlerError>>>, frame: usize) -> PeerResponse {
    let not_run = |r: &Option<Result<(), HandlerError>>| r.as_ref().is_none_or(|r| r.as_ref().is_err_and(HandlerError::is_not_served));
    if results.iter().all(not_run) {
        return match results.into_iter().flatten().find_map(Result::err) {
            Some(e) => PeerResponse::Error(RemoteError::NotServed(e.message)),
            None => stopped_during_handler(),
        };
    }
    let cap = outcome_cap(frame, results.len());
    match results.into_iter().collect::<Option<Vec<_>>>() {
        None => stopped_during_handler(),
        Some(results) => PeerResponse::DeliveredBatch(results.into_iter().map(|r| r.map_err(|e| e.truncated(cap))).collect()),
    }
}

/// How long one of `n` failure reasons in an answer may be: all of them within half the link's
/// `frame` (an answer over it reached the leader as one error, and every event of the batch,
/// acked ones too, counted as failed).
fn outcome_cap(frame: usize, n: usize) -> usize {
    reason_cap(frame).min(frame / 2 / n.max(1)).max(16)
}

/// One event's result as `DeliveredEach` says it (`None`: cut off by the drain), its reason
/// cut to `cap`. `rejects`: the leader reads `EventOutcome::Rejected`.
fn event_outcome(result: Option<Result<(), HandlerError>>, cap: usize, rejects: bool) -> EventOutcome {
    match result {
        None => EventOutcome::NotServed("this node stopped while the handler ran".into()),
        Some(Err(e)) if e.is_not_served() => {
            let mut why = e.message;
            crate::sdk::truncate_utf8(&mut why, cap);
            EventOutcome::NotServed(why)
        }
        Some(Err(e)) if rejects && e.is_no_retry() => EventOutcome::Rejected(e.truncated(cap)),
        Some(r) => EventOutcome::Ran(r.map_err(|e| e.truncated(cap))),
    }
}

/// The outcomes of a batch's `n` runs that ended within `early` (all of them, if they end
/// sooner), or else those that ended with the first after it, by index; `None`: still running.
/// A batch is answered with these; waiting for all held the acks of the others behind one slow
/// handler.
async fn first_outcomes<S>(runs: &mut S, n: usize, early: Duration) -> Vec<Option<EventOutcome>>
where
    S: futures_util::Stream<Item = (u32, EventOutcome)> + Unpin,
{
    use futures_util::FutureExt;
    use futures_util::StreamExt;
    let mut outcomes: Vec<Option<EventOutcome>> = vec![None; n];
    let mut ended = 0;
    let early = tokio::time::sleep(early);
    tokio::pin!(early);
    let mut place = |(i, o): (u32, EventOutcome), ended: &mut usize| {
        if let Some(slot) = outcomes.get_mut(i as usize).filter(|s| s.is_none()) {
            *slot = Some(o);
            *ended += 1;
        }
    };
    loop {
        tokio::select! {
            biased;
            next = runs.next() => match next {
                Some(outcome) => place(outcome, &mut ended),
                None => break,
            },
            () = &mut early, if ended > 0 => break,
        }
        if ended == n {
            break;
        }
    }
    // What else ended by now rides along.
    while let Some(Some(outcome)) = runs.next().now_or_never() {
        place(outcome, &mut ended);
    }
    outcomes
}

/// One consumer's handout as deliveries: events not tried before in batches of at most
/// `per_frame` and `max_bytes`, and each event that failed before alone. A consumer that dies
/// during a batch (a poison event ending its process, a sidecar app crashing) costs every event
/// of the batch an attempt, as the answer that would tell them apart is lost; delivered together
/// again they shared every later attempt, and up to a whole batch of healthy events reached the
/// dead letters beside the one that killed it.
fn handout_batches(events: Vec<(Event, u32)>, per_frame: usize, max_bytes: usize) -> Vec<Vec<(Event, u32)>> {
    let (retried, fresh): (Vec<_>, Vec<_>) = events.into_iter().partition(|(_, attempts)| *attempts > 0);
    let mut out: Vec<Vec<(Event, u32)>> = retried.into_iter().map(|e| vec![e]).collect();
    out.extend(in_frames(fresh, per_frame, max_bytes, |(e, _)| e.full_size() + EVENT_FRAME_OVERHEAD));
    out
}

/// `items` in order, in groups of at most `per_frame` (a `max_in_flight` above
/// `MAX_DELIVER_BATCH` takes several frames: a consumer refuses larger ones) and of at most
/// `max_bytes` by `size` (a frame has a size limit: a batch over it would be refused whole, and
/// handed out again whole, for good); an item larger than that goes alone.
fn in_frames<T>(items: Vec<T>, per_frame: usize, max_bytes: usize, size: impl Fn(&T) -> usize) -> Vec<Vec<T>> {
    let mut frames: Vec<Vec<T>> = Vec::new();
    let mut bytes = 0;
    for item in items {
        let s = size(&item);
        match frames.last_mut() {
            Some(frame) if frame.len() < per_frame.max(1) && bytes + s <= max_bytes => {
                bytes += s;
                frame.push(item);
            }
            _ => {
                bytes = s;
                frames.push(vec![item]);
            }
        }
    }
    frames
}

/// Commits progress updates in batches through the broker, which puts them into its next event
/// entry on the leader (`Broker::settle`). Up to `UPDATE_BATCHES_OUT` batches are outstanding, so
/// the acks that arrive while one entry commits are already queued when the batcher forms the
/// next (updates commute: acks and instance positions are idempotent, failures only count).
async fn update_writer(broker: Arc<Broker>, mut rx: mpsc::Receiver<UpdateReq>, shutdown: CancellationToken) {
    let out = Arc::new(tokio::sync::Semaphore::new(UPDATE_BATCHES_OUT));
    loop {
        let first = tokio::select! {
            // `None` only once the `Dispatcher` (the sender's owner) is gone, after shutdown:
            // the dispatch loops hold it until then.
            f = rx.recv() => match f { Some(f) => f, None => return },
            _ = shutdown.cancelled() => return,
        };
        let Ok(permit) = out.clone().acquire_owned().await else { return };
        let (mut updates, mut lazy, first_tx) = first;
        let mut txs = vec![first_tx];
        // By count and by bytes (`Broker::progress_budget`): a batch must fit one entry.
        let budget = broker.progress_budget();
        let mut bytes: usize = updates.iter().map(SubUpdate::approx_size).sum();
        while updates.len() < UPDATE_BATCH && bytes < budget {
            match rx.try_recv() {
                Ok((more, more_lazy, tx)) => {
                    bytes += more.iter().map(SubUpdate::approx_size).sum::<usize>();
                    updates.extend(more);
                    lazy &= more_lazy;
                    txs.push(tx);
                }
                Err(_) => break,
            }
        }
        let broker = broker.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let ok = broker.settle(updates, lazy, Duration::from_secs(10)).await;
            for tx in txs {
                let _ = tx.send(ok);
            }
        });
    }
}

/// How long a consumer lets a handler run: its own declaration's ack deadline, or the
/// replicated one (which the leader redelivers after) when that is shorter.
fn consumer_deadline(own: Duration, replicated_ms: Option<u64>) -> Duration {
    replicated_ms.map_or(own, |ms| own.min(Duration::from_millis(ms.max(1))))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A consumer whose own declaration gives a longer ack deadline than the replicated one
    /// stops its handler at the replicated one, before the leader hands the event to another.
    #[test]
    fn a_consumer_stops_its_handler_at_the_shorter_of_the_two_deadlines() {
        let s = Duration::from_secs;
        assert_eq!(consumer_deadline(s(60), Some(10_000)), s(10));
        assert_eq!(consumer_deadline(s(10), Some(60_000)), s(10));
        assert_eq!(consumer_deadline(s(10), None), s(10), "not replicated yet");
        assert_eq!(consumer_deadline(s(10), Some(0)), Duration::from_millis(1));
    }

    /// What an every-instance attempt leaves noted for the next process: an attempt that ended
    /// in a failure counts, a refusal does not, an ack or dead letter clears the event, and a
    /// run dropped unended (the runtime stopping) takes its attempt back.
    #[test]
    fn an_attempt_counts_for_the_next_process_only_as_it_ended() {
        let dir = std::env::temp_dir().join(format!("raftbridge-starting-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let reopen = || AttemptMark::open(&dir, "each");
        let e = EventRef::new(3, "id-3");
        let mut mark = reopen();
        Starting::new(&mut mark, e, 1).ended(1);
        assert_eq!(reopen().started_before(e), 1, "a failed attempt counts");
        Starting::new(&mut mark, e, 2).ended(1);
        assert_eq!(reopen().started_before(e), 1, "a refused one does not");
        drop(Starting::new(&mut mark, e, 2));
        assert_eq!(reopen().started_before(e), 1, "a dropped one is taken back");
        let started = Starting::new(&mut mark, e, 2);
        // The process ends here, mid-attempt: nothing after the note runs.
        std::mem::forget(started);
        assert_eq!(reopen().started_before(e), 2, "one the process ended during counts");
        Starting::new(&mut mark, e, 3).ended(3);
        mark.settled(e);
        assert_eq!(reopen().started_before(e), 3, "written with the next note");
        mark.flush();
        assert_eq!(reopen().started_before(e), 0, "an acked event counts no attempts any more");
        mark.settled(e);
        Starting::new(&mut mark, EventRef::new(4, "id-4"), 1).ended(1);
        assert_eq!(reopen().started_before(e), 0, "the next event's note replaces it");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A retry goes to a consumer the event has not failed on, and waits for one while such a
    /// one is live but busy, rather than going back to the one that failed it (which, failing
    /// fast, always has room); once every live consumer failed it, any with room takes it.
    #[test]
    fn a_retry_waits_for_a_consumer_it_has_not_failed_on() {
        let load: HashMap<NodeId, u32> = [(1, 0), (2, 4), (3, 1)].into_iter().collect();
        assert_eq!(pick(&load, 4, None), Pick::Take(1), "the least loaded");
        assert_eq!(pick(&load, 4, Some(&[1])), Pick::Take(3), "not the one it failed on");
        assert_eq!(pick(&load, 4, Some(&[1, 3])), Pick::Wait, "2 has not tried it and is live, but busy");
        assert_eq!(pick(&load, 4, Some(&[1, 2, 3])), Pick::Take(1), "it failed everywhere: any with room");
        assert_eq!(pick(&load, 4, Some(&[9])), Pick::Take(1), "a consumer that left counts for nothing");
        let full: HashMap<NodeId, u32> = [(1, 4), (2, 4)].into_iter().collect();
        assert_eq!(pick(&full, 4, None), Pick::Full);
        assert_eq!(pick(&full, 4, Some(&[1])), Pick::Full);
    }

    #[test]
    fn a_returned_event_is_keyed_by_its_delivery_not_its_content() {
        let key = returned_event_key("answerPings", "0123");
        // The same for every run of that delivery (nothing of the content goes in)...
        assert_eq!(key, returned_event_key("answerPings", "0123"));
        // ...and another for another event, subscription or node's every-instance scope.
        assert_ne!(key, returned_event_key("answerPings", "0124"));
        assert_ne!(key, returned_event_key("otherSub", "0123"));
        assert_ne!(key, returned_event_key(&tag_scope("answerPings", false, 2), "0123"));
        // Internal: no client's idempotency key can name it.
        assert!(crate::api::events::check_key(&key).is_err(), "{key:?}");
    }

    #[test]
    fn every_instance_runs_are_tagged_per_node_and_shared_ones_per_subscription() {
        assert_eq!(tag_scope("countOrders", true, 1), tag_scope("countOrders", true, 2));
        assert_ne!(tag_scope("audit", false, 1), tag_scope("audit", false, 2));
        let event = crate::broker::new_event("e", b"1".to_vec(), &MessageMeta::default(), None, None).body;
        let key = |node| delivery_meta(&tag_scope("audit", false, node), &event).idempotency_key;
        assert_ne!(key(1), key(2));
    }

    #[test]
    fn deliveries_split_into_frames_of_at_most_the_bound_in_order() {
        let one = |_: &u32| 1;
        assert_eq!(in_frames(vec![1, 2, 3, 4, 5], 2, usize::MAX, one), vec![vec![1, 2], vec![3, 4], vec![5]]);
        assert_eq!(in_frames(vec![1, 2], 1, usize::MAX, one), vec![vec![1], vec![2]]);
        assert_eq!(in_frames((0..2500).collect(), MAX_DELIVER_BATCH, usize::MAX, one).iter().map(Vec::len).collect::<Vec<_>>(), vec![1024, 1024, 452]);
        assert!(in_frames(Vec::<u32>::new(), 4, usize::MAX, one).is_empty());
        // By bytes as well: a frame is cut before it would pass the bound, and an item larger
        // than the bound goes alone (the link then refuses it, which counts as an attempt).
        let size = |n: &u32| *n as usize;
        assert_eq!(in_frames(vec![4, 4, 4, 9, 1, 1], 100, 10, size), vec![vec![4, 4], vec![4], vec![9, 1], vec![1]]);
        assert_eq!(in_frames(vec![30, 2, 30], 100, 10, size), vec![vec![30], vec![2], vec![30]]);
    }

    /// Events that failed before go out alone, the others in batches: a poison event that
    /// ended its consumer does not take its batch's healthy events to the dead letters with it.
    #[test]
    fn an_event_that_failed_before_is_delivered_alone() {
        let body = crate::broker::new_event("e", b"1".to_vec(), &MessageMeta::default(), None, None).body;
        let ev = |position, attempts| (Event { position, body: body.clone() }, attempts);
        let batches = handout_batches(vec![ev(1, 0), ev(2, 1), ev(3, 0), ev(4, 3), ev(5, 0)], MAX_DELIVER_BATCH, usize::MAX);
        let shape: Vec<Vec<(u64, u32)>> = batches.iter().map(|b| b.iter().map(|(e, a)| (e.position, *a)).collect()).collect();
        assert_eq!(shape, vec![vec![(2, 1)], vec![(4, 3)], vec![(1, 0), (3, 0), (5, 0)]]);
    }

    /// A delivery task of an earlier leadership term finishing late leaves the positions handed
    /// out since alone: its answer frees no slot and its release removes nothing.
    #[test]
    fn a_late_delivery_task_leaves_positions_of_a_later_term_alone() {
        let inflight: InFlight = Arc::new(Mutex::new(HashMap::new()));
        let slot = |f: &InFlight, p: u64| lock(f).get("sub").and_then(|m| m.slots.get(&p).copied());
        let handed = |f: &InFlight, n: NodeId| lock(f).get("sub").and_then(|m| m.handed.get(&n).copied()).unwrap_or(0);
        // Position 7 was handed to node 2 in term 0; leadership was lost (the map cleared) and
        // regained, and term 1 handed it to node 3.
        lock(&inflight).entry("sub".into()).or_default().hand(7, 3, 1);
        lock(&inflight).entry("sub".into()).or_default().hand(8, 3, 1);
        assert_eq!(handed(&inflight, 3), 2);
        mark_answered(&inflight, "sub", &[7], 0);
        release(&inflight, "sub", 7, 0);
        assert_eq!(slot(&inflight, 7), Some(Slot { consumer: Some(3), epoch: 1 }), "term 0's task changed nothing");
        assert_eq!(handed(&inflight, 3), 2, "nor the consumer's load");
        // Term 1's own task: the answer frees the consumer, the release the position.
        mark_answered(&inflight, "sub", &[7], 1);
        assert_eq!(slot(&inflight, 7), Some(Slot { consumer: None, epoch: 1 }), "answered: out of handouts, slot free");
        assert_eq!(handed(&inflight, 3), 1, "the slot is free");
        mark_answered(&inflight, "sub", &[7], 1);
        assert_eq!(handed(&inflight, 3), 1, "an answer frees a slot once");
        release(&inflight, "sub", 7, 1);
        assert_eq!(slot(&inflight, 7), None);
        // Released without an answer (a failure noted before it): its slot is freed then.
        release(&inflight, "sub", 8, 1);
        assert_eq!(handed(&inflight, 3), 0);
        // Handed again while held (never twice by a pass, but the count stays true).
        lock(&inflight).entry("sub".into()).or_default().hand(9, 2, 1);
        lock(&inflight).entry("sub".into()).or_default().hand(9, 3, 1);
        assert_eq!((handed(&inflight, 2), handed(&inflight, 3)), (0, 1));
        // Unknown subscriptions and positions are no-ops.
        mark_answered(&inflight, "other", &[1], 1);
        release(&inflight, "other", 1, 1);
    }

    /// A node that ran no handler (not ready, not consuming the subscription) refuses, and a
    /// request that could not be sent at all is the same; neither costs the events an attempt.
    /// Anything else that is not the handler's answer (a link lost after sending, a timeout, an
    /// unexpected answer) may have run it and counts.
    #[test]
    fn a_refused_delivery_is_not_an_attempt_and_a_lost_one_is() {
        const D: Duration = Duration::from_millis(1500);
        let refused = remote_outcomes(Ok(PeerResponse::Error(RemoteError::NotServed("node is not ready".into()))), 3, D);
        assert_eq!(refused, vec![Outcome::Refused("node is not ready".into()); 3]);
        let nack = Err(HandlerError::new(500, "boom"));
        let batch = remote_outcomes(Ok(PeerResponse::DeliveredBatch(vec![Ok(()), nack.clone()])), 2, D);
        assert_eq!(batch, vec![Outcome::Ran(Ok(())), Outcome::Ran(nack.clone())]);
        assert_eq!(remote_outcomes(Ok(PeerResponse::Delivered(nack.clone())), 1, D), vec![Outcome::Ran(nack)]);
        let ran_502 = |o: &Outcome| matches!(o, Outcome::Ran(Err(e)) if e.status == 502);
        let short = remote_outcomes(Ok(PeerResponse::DeliveredBatch(vec![Ok(())])), 2, D);
        assert!(short.len() == 2 && short.iter().all(ran_502), "an answer of the wrong length: {short:?}");
        let other = remote_outcomes(Ok(PeerResponse::Error(RemoteError::Unavailable("x".into()))), 2, D);
        assert!(other.len() == 2 && other.iter().all(ran_502), "not a refusal: {other:?}");
        let unsent = crate::peer::PeerError::Handshake { addr: "127.0.0.1:1".into(), reason: "gone".into() };
        let unsent = remote_outcomes(Err(unsent), 2, D);
        assert!(unsent.len() == 2 && unsent.iter().all(|o| matches!(o, Outcome::Refused(_))), "never sent: {unsent:?}");
        let lost = remote_outcomes(Err(crate::peer::PeerError::Closed { peer: 2 }), 2, D);
        assert!(lost.len() == 2 && lost.iter().all(ran_502), "sent, maybe run: {lost:?}");
        // No answer by the ack deadline: a nack that says so.
        let late = remote_outcomes(Err(crate::peer::PeerError::Timeout { peer: 2, timeout: D }), 2, D);
        let said = |o: &Outcome| matches!(o, Outcome::Ran(Err(e)) if e.status == 504 && e.message.contains("ack deadline of 1500 ms"));
        assert!(late.len() == 2 && late.iter().all(said), "sent, maybe run, late: {late:?}");
    }

    /// A batch cut by the consumer's drain keeps the outcomes of the events that finished for a
    /// leader that reads `DeliveredEach`: only the cut ones (and those whose app refused them)
    /// are handed out again, without an attempt. An older leader gets the batch refused whole.
    #[test]
    fn a_batch_cut_at_the_drain_keeps_what_finished() {
        const D: Duration = Duration::from_millis(1500);
        let nack = Err(HandlerError::new(500, "boom"));
        let results = || vec![Some(Ok(())), None, Some(nack.clone()), Some(Err(HandlerError::not_served("app down")))];
        let outcomes: Vec<Outcome> = results().into_iter().map(|r| event_outcome(r, 1 << 10, true)).filter_map(each_outcome).collect();
        assert_eq!(
            outcomes,
            vec![
                Outcome::Ran(Ok(())),
                Outcome::Refused("this node stopped while the handler ran".into()),
                Outcome::Ran(nack.clone()),
                Outcome::Refused("app down".into()),
            ]
        );
        // An older leader: refused whole while one was cut; the app's refusal is an attempt.
        let old = remote_outcomes(Ok(batch_answer(results(), 1 << 20)), 4, D);
        assert!(old.iter().all(|o| matches!(o, Outcome::Refused(_))), "{old:?}");
        let uncut = vec![Some(Ok(())), Some(Err(HandlerError::not_served("app down")))];
        let old = remote_outcomes(Ok(batch_answer(uncut, 1 << 20)), 2, D);
        assert!(matches!(old.as_slice(), [Outcome::Ran(Ok(())), Outcome::Ran(Err(e))] if e.status == 503), "{old:?}");
        // Nothing ran at all: refused as a whole.
        let none = batch_answer(vec![None, Some(Err(HandlerError::not_served("app down")))], 1 << 20);
        assert!(matches!(&none, PeerResponse::Error(RemoteError::NotServed(m)) if m == "app down"), "{none:?}");
        let cut = batch_answer(vec![None, None], 1 << 20);
        assert!(matches!(&cut, PeerResponse::Error(RemoteError::NotServed(m)) if m.contains("stopped")), "{cut:?}");
        // A `Running` outcome is not taken for a settled one, nor is an answer of the wrong
        // length.
        assert_eq!(each_outcome(EventOutcome::Running), None);
        let short = remote_outcomes(Ok(PeerResponse::DeliveredEach { outcomes: vec![EventOutcome::Ran(Ok(()))], ticket: 3 }), 2, D);
        assert!(short.iter().all(|o| matches!(o, Outcome::Ran(Err(e)) if e.status == 502)), "{short:?}");
        // The reasons fit the frame, "not served" ones too.
        let long = "x".repeat(10_000);
        let cap = outcome_cap(4096, 3);
        assert!(cap <= 4096 / 2 / 3);
        for r in [Some(Err(HandlerError::not_served(long.clone()))), Some(Err(HandlerError::new(500, long)))] {
            match event_outcome(r, cap, true) {
                EventOutcome::NotServed(why) => assert!(why.len() <= cap),
                EventOutcome::Ran(Err(e)) => assert!(e.message.len() <= cap),
                other => panic!("{other:?}"),
            }
        }
        // A failure with no retry: `Rejected` to a leader that reads it (still without a retry
        // once read), a plain failure to one that does not.
        let term = || Some(Err(HandlerError::new(500, "never").no_retry()));
        let read = each_outcome(event_outcome(term(), cap, true));
        assert!(matches!(&read, Some(Outcome::Ran(Err(e))) if e.is_no_retry() && e.message == "never"), "{read:?}");
        assert!(matches!(event_outcome(term(), cap, false), EventOutcome::Ran(Err(_))));
        let bytes = bincode::serialize(&EventOutcome::Rejected(HandlerError::new(500, "never"))).unwrap();
        assert_eq!(u32::from_le_bytes(bytes[..4].try_into().unwrap()), 3, "the fourth variant, after every older one");
    }

    /// A batch is answered for the handlers that ended within `EARLY_ANSWER`, the others left
    /// running; at once when all end sooner; and at the first end when none ended in time.
    #[tokio::test(start_paused = true)]
    async fn a_batch_is_answered_early_for_the_handlers_that_ended() {
        use futures_util::stream::FuturesUnordered;
        let after = |i: u32, ms: u64| async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            (i, EventOutcome::Ran(Ok(())))
        };
        let early = Duration::from_millis(100);
        let ok = || Some(EventOutcome::Ran(Ok(())));
        // One slow handler: the two quick ones are answered at 100 ms.
        let mut runs: FuturesUnordered<_> = [(0, 10), (1, 5_000), (2, 30)].into_iter().map(|(i, ms)| after(i, ms)).collect();
        let start = Instant::now();
        let first = first_outcomes(&mut runs, 3, early).await;
        assert_eq!(first, vec![ok(), None, ok()]);
        assert_eq!(start.elapsed(), early);
        // All quick: answered when the last ends.
        let mut runs: FuturesUnordered<_> = [(0, 10), (1, 40)].into_iter().map(|(i, ms)| after(i, ms)).collect();
        let start = Instant::now();
        assert_eq!(first_outcomes(&mut runs, 2, early).await, vec![ok(), ok()]);
        assert_eq!(start.elapsed(), Duration::from_millis(40));
        // All slow: answered at the first end, with those that ended with it.
        let mut runs: FuturesUnordered<_> = [(0, 700), (1, 300), (2, 300)].into_iter().map(|(i, ms)| after(i, ms)).collect();
        let start = Instant::now();
        assert_eq!(first_outcomes(&mut runs, 3, early).await, vec![None, ok(), ok()]);
        assert_eq!(start.elapsed(), Duration::from_millis(300));
    }

    /// Refusals cost no attempt but pause longer each time, and a consumer is listed once per
    /// position however often it fails or refuses it.
    #[test]
    fn refusals_pause_longer_each_time_and_list_a_consumer_once() {
        let (mut failed_on, mut refusals) = (HashMap::new(), HashMap::new());
        let key = || ("sub".to_string(), 7);
        let pauses: Vec<Duration> = (0..4).map(|_| note_retry(&mut failed_on, &mut refusals, key(), Retry::Refused, 2)).collect();
        assert_eq!(pauses, [100, 200, 400, 800].map(Duration::from_millis));
        assert_eq!(note_retry(&mut failed_on, &mut refusals, key(), Retry::After(Duration::from_secs(3)), 3), Duration::from_secs(3));
        assert_eq!(failed_on["sub"][&7], vec![2, 3], "each consumer once, in order");
        assert_eq!(refusals[&key()], 4, "failures are not refusals");
        for _ in 0..100 {
            note_retry(&mut failed_on, &mut refusals, key(), Retry::Refused, 2);
        }
        assert_eq!(note_retry(&mut failed_on, &mut refusals, key(), Retry::Refused, 2), BACKOFF_MAX, "the pause is bounded");
    }

    #[test]
    fn instance_progress_keeps_dead_letters_and_the_last_of_each_run_in_order() {
        let at = |position: u64, dead: bool| SubUpdate::Instance {
            sub: "a".into(),
            node: 2,
            position,
            dead: dead.then(|| (5, "boom".to_string())),
        };
        let mut p = Vec::new();
        for (position, dead) in [(1, false), (2, false), (3, true), (4, false), (5, false), (6, false), (7, true), (8, true)] {
            note_progress(&mut p, at(position, dead));
        }
        assert_eq!(p, vec![at(2, false), at(3, true), at(6, false), at(7, true), at(8, true)]);
        let mut p = Vec::new();
        note_progress(&mut p, at(9, false));
        assert_eq!(p, vec![at(9, false)]);
    }

    #[tokio::test(start_paused = true)]
    async fn passes_are_spaced_but_an_idle_loop_passes_at_once() {
        let shutdown = CancellationToken::new();
        let mut last = Instant::now() - Duration::from_secs(1);
        let start = Instant::now();
        assert!(pace(&mut last, &shutdown).await);
        assert_eq!(Instant::now(), start, "the last pass was long ago: no wait");
        assert!(pace(&mut last, &shutdown).await);
        assert_eq!(Instant::now(), start + MIN_PASS, "right after a pass: waits out the spacing");
        shutdown.cancel();
        assert!(!pace(&mut last, &shutdown).await, "shutdown ends the wait");
    }
}

//! The broker: publishing events into the replicated log and delivering them to subscriptions.
//!
//! Why it is built this way:
//! - *Events are Raft entries.* `Command::Publish` carries a batch of events; the state machine
//!   assigns positions when it applies the entry, so every node has the same log, and a 201 is
//!   sent only after the entry is committed (fsynced on a quorum). Events are kept by the state
//!   machine within the retention limits (count, bytes, age) and persist through the Raft log and
//!   snapshots; positions survive restarts.
//! - *Batching.* Publishers on a node queue their events as groups (one event, or a client's
//!   batch, which commits all or nothing); a batcher turns everything queued into one `Publish`
//!   entry, with at most `MAX_INFLIGHT_BATCHES` entries in flight. While those are being
//!   committed, new events queue up and form the next batch: large batches under load (bounded
//!   by `MAX_BATCH` events and `MAX_BATCH_BYTES`). With fewer than `LINGER_ENOUGH` events queued
//!   the leader lingers for more, never past `--publish-linger-ms` after the oldest was queued:
//!   otherwise the commit loop clocks itself and a light load costs an entry (an fsync on every
//!   node and a replication round) per handful of events.
//! - *One batch for the whole cluster.* A follower's batch is forwarded to the leader, whose
//!   broker merges it into its own next entry (`write_forwarded`) instead of proposing it as an
//!   entry of its own. Every node's concurrent publishers then share one entry, one fsync per
//!   node and one replication round: measured with `raftbridge bench events` against three
//!   nodes, per-node entries cost more CPU than anything else on the publish path. Before it
//!   cuts a batch, a follower's batcher lets the publishers that are ready to run queue first
//!   (`Inbox::let_ready_publishers_queue`): a forwarded batch per event cost ~13% of the CPU.
//! - *Delivery is driven by the leader for shared subscriptions* (`dispatch.rs`): it reads the
//!   replicated progress (cursor, done set, attempts), hands each pending event to one live
//!   consumer instance, and commits acks and failures back through Raft, in the batcher's next
//!   event entry (`Broker::settle`, `Command::PublishAndSettle`): acks then cost no entries of
//!   their own while events flow (25–30% fewer entries with `raftbridge bench events`). A new leader resumes from
//!   the replicated state, so an event is delivered at least once whatever fails; a delivery not
//!   acked within the ack deadline is given to another instance; after `max_attempts` it goes to
//!   the dead letters. Every-instance subscriptions are driven by each node for itself, with its
//!   position replicated.

pub mod dispatch;
pub mod event;
pub mod marks;
pub mod pull;

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::time::Duration;
use std::time::SystemTime;

use tokio::sync::OwnedSemaphorePermit;
use tokio::sync::Semaphore;
use tokio::sync::mpsc;
use tokio::sync::oneshot;
use futures_util::FutureExt;
use tokio_util::sync::CancellationToken;

use self::event::EventBody;
use self::event::NewEvent;
use crate::peer::message::RemoteError;
use crate::raft::types::Command;
use crate::raft::types::CommandResult;
use crate::raft::types::EventLimits;
use crate::raft::types::SubUpdate;
use crate::sdk::MessageMeta;
use crate::sdk::Sender;
use crate::store::StateStore;
use crate::store::StoreError;

/// Events per `Publish` entry at most. A group larger than this (a client's batch is at most
/// 1000) still goes as one entry of its own: a group is never split.
pub const MAX_BATCH: usize = 1_024;
/// Bytes (payload and metadata) per `Publish` entry at most, with the same exception. Keeps an entry well
/// inside a peer frame and bounds what one commit holds in memory.
pub const MAX_BATCH_BYTES: usize = 256 << 10;
/// `Publish` entries the leader has in flight at most. Small on purpose: with 32, a node with ~20
/// concurrent publishers always had a free slot and sent every event as its own entry (median
/// batch 1, measured with `raftbridge bench events`); a second entry is proposed only once
/// `LINGER_ENOUGH` events are queued or the linger passes, so under load entries still grow.
/// One slot (sessions 4–30) made every event queued during a commit wait for it and ride the
/// next: on hosts where 64 closed-loop connections are bound by that latency rather than the
/// CPU, two gained 4% (session 30) and 4–48% (session 31, ahead in 6 of 6 interleaved single-event
/// pairs, the same CPU per event); with the CPU saturated by a busy loop beside the nodes
/// two was ahead in 3 of 3 pairs by 1–5%, and half-rate tails were the same or lower. Three
/// measured the same as two. All in-flight entries go to the same leader, so more slots would
/// not help during a failover either.
const MAX_INFLIGHT_BATCHES: usize = 2;
/// Events queued that make the leader's next entry worth proposing at once; with fewer it
/// lingers (up to `--publish-linger-ms` after the oldest was queued) for more. Below the ~27
/// events per entry that `raftbridge bench events` (64 connections) reaches at saturation, so
/// a saturated leader never waits.
const LINGER_ENOUGH: usize = 16;
/// Batches a follower has forwarded to the leader and not yet heard back about, at most.
const MAX_FORWARDED_BATCHES: usize = 16;
/// Events waiting to be batched at most (publishers wait beyond it: backpressure).
const QUEUE_EVENTS: usize = 65_536;
/// And their bytes (payload and metadata, counted in KiB): 64 MiB. A group larger than this
/// (only with a `--max-frame` over 128 MiB) takes the whole queue.
const QUEUE_KIB: u32 = 64 * 1024;
/// Batches of subscription progress waiting for an entry at most (senders wait beyond it).
const SETTLE_QUEUE: usize = 64;
/// Subscription updates the batcher adds to one entry: it stops taking queued batches of them
/// once this many are in (a batch is never split).
const MAX_SETTLE_UPDATES: usize = 4_096;
/// How long a shared subscription's acks may wait for an event entry to ride in, when they find
/// none queued but events are flowing (a group was taken this recently). Without it, at moderate
/// publish rates the acks of one entry's events were committed in an entry of their own about
/// as often as not: up to twice the entries, fsyncs and replication rounds per event. Nothing
/// waits on these acks but the positions they settle (the consumer's slot is already free).
const SETTLE_LINGER: Duration = Duration::from_millis(5);

#[derive(Debug, Clone, thiserror::Error)]
pub enum BrokerError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the broker is shutting down")]
    Stopped,
    #[error("unexpected result from the state machine")]
    Unexpected,
    /// A group (one event, or a client's batch) larger than one replicated entry may be.
    #[error("events of {bytes} bytes with their metadata, more than the {limit} one entry may hold (half of the smallest member's --max-frame)")]
    TooLarge { bytes: usize, limit: usize },
    /// Waited `--write-timeout-ms` for room in the queue or for an entry and was never put
    /// into one: nothing of it is stored, a retry is safe.
    #[error("the events waited {waited:?} for an entry (the cluster commits slower than events arrive) and were not stored; retry")]
    NotQueued { waited: Duration },
}

/// Ids and positions of a committed group, in the group's order.
pub type Published = Vec<(String, u64)>;
type Reply = oneshot::Sender<Result<Published, Arc<BrokerError>>>;

/// Events that commit together or not at all (one publisher's event, a client's batch, or a
/// follower's batch merged on the leader), waiting for the batcher.
struct Group {
    events: Vec<NewEvent>,
    reply: Reply,
    /// Hold the group's share of `QUEUE_EVENTS` and `QUEUE_KIB` until the batcher takes it.
    _queued: OwnedSemaphorePermit,
    _queued_kib: OwnedSemaphorePermit,
    /// `event_bytes(&events)`, counted once at admission for the entry bound.
    bytes: usize,
    /// When the group was queued: how long it waited for an entry is a metric, and one that
    /// waited `Inbox::max_wait` is answered `NotQueued` instead of going into one.
    since: tokio::time::Instant,
}

/// Subscription progress (acks, failures, instance positions) waiting for the leader's next
/// entry; `reply` says whether it was committed.
struct Settle {
    updates: Vec<SubUpdate>,
    reply: oneshot::Sender<bool>,
    /// May wait up to `SETTLE_LINGER` (from `since`) for an event entry to ride in: only when
    /// nothing waits on it (a shared subscription's acks; not an every-instance loop's next
    /// event, nor a follower's forwarded write, whose frame may carry other writes).
    lazy: bool,
    since: tokio::time::Instant,
}

/// Bytes of events, metadata and idempotency keys included (the entry and queue bounds).
pub(crate) fn event_bytes(events: &[NewEvent]) -> usize {
    events.iter().map(|e| e.body.full_size() + e.idempotency_key.as_ref().map_or(0, String::len)).sum()
}

pub struct Broker {
    store: StateStore,
    /// Feeds the batcher; closed when the broker (every clone of the Arc) is dropped.
    queue: mpsc::Sender<Group>,
    /// Subscription progress for the batcher's next entry (`SETTLE_QUEUE` items; each item is
    /// bounded by its source: the dispatcher's update writer or one forwarded command); closed
    /// with `queue`.
    settles: mpsc::Sender<Settle>,
    /// Bound the events queued for the batcher: a group takes one permit per event from
    /// `admit` and one per KiB of `event_bytes` from `admit_kib`.
    admit: Arc<Semaphore>,
    admit_kib: Arc<Semaphore>,
    /// A group's `event_bytes` at most (half of `--max-frame`, so its entry always fits into a
    /// peer frame with room for the encoding's overhead).
    max_group_bytes: usize,
    /// How long a publisher waits for room in the queue (`--write-timeout-ms`).
    max_wait: Duration,
    /// The batcher's entries in flight (each holds a permit until its groups are answered);
    /// `drained` waits for all of them once the batcher has stopped.
    slots: Slots,
    /// The batcher's task: it ends on the broker's `shutdown`; `drained` takes and awaits it.
    batcher: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// The highest position acknowledged to a publisher on this node (`acked`): a read of the
    /// log here waits for this node to apply it (`caught_up_with_acks`).
    acked: AtomicU64,
}

/// How long a read of the log waits for this node to apply what it has acknowledged.
const READ_OWN_WRITES: Duration = Duration::from_secs(2);

/// How the batcher makes entries (`Broker::start`).
struct Batching {
    limits: EventLimits,
    timeout: Duration,
    linger: Duration,
    dedup_max_keys: usize,
}

/// Entries in flight: as leader (proposed), as follower (forwarded to the leader).
#[derive(Clone)]
struct Slots {
    leading: Arc<Semaphore>,
    following: Arc<Semaphore>,
}

pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// The time an event entry is proposed at: this node's clock, or, when it runs more than
/// `clock::MAX_OFFSET` (1 s) ahead of most members' (as measured), that clock less its lead, so
/// that a leader whose clock jumped ahead does not move the state machine's clock (which never
/// goes back) with it, shortening every dedup window and ageing events out early. Corrected
/// from the warning's bound, not from `FAR_AHEAD` (which refuses keyed commands): correcting
/// costs nothing, and a correction that only started at 30 s would let 29 s through and jump
/// by 30 s as a clock slewed back across it.
/// True with the time when it was corrected: the caller counts it
/// (`raftbridge_clock_corrected_entries_total`) only for an entry it proposes as the leader.
fn entry_clock_ms(store: &StateStore) -> (u64, bool) {
    let now = now_ms();
    match store.replica().net.clock_ahead_of_most(crate::peer::clock::MAX_OFFSET) {
        Some(lead_ms) => (now.saturating_sub(u64::try_from(lead_ms).unwrap_or(0)), true),
        None => (now, false),
    }
}

/// Counts an entry the leader proposes with its clock corrected (`entry_clock_ms`).
fn count_corrected(corrected: bool) {
    if corrected {
        metrics::counter!("raftbridge_clock_corrected_entries_total").increment(1);
    }
}

/// A new random event id (32 hex digits).
pub fn new_id() -> String {
    format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..))
}

/// The dedup key of an event the runtime emits for a handler (`Ctx::emit`, a subscription's
/// returned event, a command's success event). It starts with U+0001, which no producer's key
/// can: a client's is visible ASCII (`api::events::check_key`, header values), and a tenant's
/// scope starts with the tenant id, visible ASCII too. Without it a client that learned an
/// event's id could publish first under the key its handler would use, and the handler's event
/// was deduplicated into the client's and never stored.
pub fn internal_key(key: impl std::fmt::Display) -> String {
    format!("\u{1}{key}")
}

/// Build an event from a handler's or an HTTP producer's context.
pub fn new_event(
    event_name: &str,
    payload: Vec<u8>,
    meta: &MessageMeta,
    sender: Option<Sender>,
    idempotency_key: Option<String>,
) -> NewEvent {
    let body = EventBody {
        id: new_id(),
        event_name: event_name.to_string(),
        timestamp: now_ms(),
        message_type: event::CUSTOM_MESSAGE.into(),
        sender,
        principal_id: meta.principal_id.clone(),
        tenant_id: meta.tenant_id.clone(),
        trace_id: Some(meta.trace_id.clone()).filter(|t| !t.is_empty()),
        correlation_id: Some(meta.correlation_id.clone()).filter(|c| !c.is_empty()),
        payload,
    };
    NewEvent { body: Arc::new(body), idempotency_key }
}

impl Broker {
    /// `linger`: how long, as leader, it may hold fewer than `LINGER_ENOUGH` queued events for
    /// more, counted from when the oldest was queued (`--publish-linger-ms`; zero: never).
    /// `max_group_bytes`: what one group (event or batch, with metadata) may hold at most.
    pub fn start(
        store: StateStore,
        limits: EventLimits,
        timeout: Duration,
        linger: Duration,
        max_group_bytes: usize,
        dedup_max_keys: usize,
        shutdown: CancellationToken,
    ) -> Arc<Broker> {
        let (tx, rx) = mpsc::channel(QUEUE_EVENTS);
        let (settle_tx, settle_rx) = mpsc::channel(SETTLE_QUEUE);
        // An entry holds at most what one group may (or less): it must fit into a peer frame.
        let max_bytes = MAX_BATCH_BYTES.min(max_group_bytes);
        let max_progress_bytes = max_group_bytes / 4;
        let inbox = Inbox {
            groups: rx,
            settles: settle_rx,
            held: VecDeque::new(),
            max_bytes,
            max_progress_bytes,
            frame: usize::MAX,
            max_wait: timeout,
        };
        let slots = Slots {
            leading: Arc::new(Semaphore::new(MAX_INFLIGHT_BATCHES)),
            following: Arc::new(Semaphore::new(MAX_FORWARDED_BATCHES)),
        };
        let settings = Batching { limits, timeout, linger, dedup_max_keys };
        let task = crate::supervise::spawn_until("event batcher", &shutdown, batcher(store.clone(), settings, inbox, slots.clone(), shutdown.clone()));
        // Detached: it ends with `shutdown` and holds nothing that the drain waits for.
        drop(crate::supervise::spawn_until("event expiry", &shutdown, expire_loop(store.clone(), limits, dedup_max_keys, shutdown.clone())));
        Arc::new(Broker {
            slots,
            batcher: Mutex::new(Some(task)),
            store,
            queue: tx,
            settles: settle_tx,
            admit: Arc::new(Semaphore::new(QUEUE_EVENTS)),
            admit_kib: Arc::new(Semaphore::new(QUEUE_KIB as usize)),
            max_group_bytes,
            max_wait: timeout,
            acked: AtomicU64::new(0),
        })
    }

    /// Waits (at most `READ_OWN_WRITES`) until this node has applied every event it has
    /// acknowledged to a publisher. A follower's publish is answered once the leader has
    /// applied it, before this node has learned of the commit, so a client reading the log
    /// here right after its 201 could miss its own event. Returns whether it caught up (a read
    /// goes ahead either way: it is only later).
    pub async fn caught_up_with_acks(&self) -> bool {
        let acked = self.acked.load(Ordering::Acquire);
        let sm = self.store.local();
        let mut next = sm.watch_events();
        let applied = |next: u64| next > acked;
        if applied(*next.borrow_and_update()) {
            return true;
        }
        tokio::time::timeout(READ_OWN_WRITES, next.wait_for(|n| applied(*n))).await.is_ok_and(|r| r.is_ok())
    }

    pub fn store(&self) -> &StateStore {
        &self.store
    }

    /// How much subscription progress (by `SubUpdate::approx_size`) one batch handed to
    /// `settle` should hold at most: an eighth of a frame (see `Inbox::max_progress_bytes`).
    /// `max_group_bytes` is half a frame.
    pub fn progress_budget(&self) -> usize {
        self.group_limit() / 4
    }

    /// What one group may hold: half of the smaller of this node's frame and the smallest
    /// member's (`PeerNet::cluster_frame`), as an entry must reach every member.
    fn group_limit(&self) -> usize {
        self.max_group_bytes.min(self.store.replica().net.cluster_frame() / 2)
    }

    /// After the broker's `shutdown` fired: waits, at most `grace`, until the entries the batcher
    /// had in flight are answered (a drained leader's last entries, forwarded to the new
    /// leader, still need the peer links). Returns whether they all were.
    pub async fn drained(&self, grace: Duration) -> bool {
        let task = self.batcher.lock().unwrap_or_else(|p| p.into_inner()).take();
        let all = async {
            // First the batcher itself, so that it makes no entry after the permits are counted.
            if let Some(task) = task {
                let _ = task.await;
            }
            let leading = self.slots.leading.acquire_many(MAX_INFLIGHT_BATCHES as u32).await;
            let following = self.slots.following.acquire_many(MAX_FORWARDED_BATCHES as u32).await;
            leading.is_ok() && following.is_ok()
        };
        tokio::time::timeout(grace, all).await.unwrap_or(false)
    }

    /// Publish one event through the batcher; (id, position) once committed.
    pub async fn publish_one(&self, event: NewEvent) -> Result<(String, u64), Arc<BrokerError>> {
        let mut out = self.publish_batch(vec![event]).await?;
        out.pop().ok_or_else(|| Arc::new(BrokerError::Unexpected))
    }

    /// Publish a group of events (a client's batch, a follower's forwarded batch), all or
    /// nothing, merged with whatever else is queued into as few entries as the bounds allow;
    /// (id, position) per event once committed. On a follower the batcher forwards its batch to
    /// the leader, where [`Broker::write_forwarded`] merges it into the leader's next entry: the
    /// whole cluster's concurrent publishes share one entry and one fsync per node.
    pub async fn publish_batch(&self, events: Vec<NewEvent>) -> Result<Published, Arc<BrokerError>> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let bytes = event_bytes(&events);
        let limit = self.group_limit();
        if bytes > limit {
            return Err(Arc::new(BrokerError::TooLarge { bytes, limit }));
        }
        let n = events.len().min(QUEUE_EVENTS) as u32;
        let kib = u32::try_from(bytes.div_ceil(1024)).unwrap_or(u32::MAX).min(QUEUE_KIB);
        // Bounded like the entry's own write: while the cluster cannot commit (no quorum), the
        // queue fills and publishers beyond it used to wait for good.
        let since = tokio::time::Instant::now();
        let full = || {
            metrics::counter!("raftbridge_publish_not_queued_total").increment(u64::from(n));
            Arc::new(BrokerError::NotQueued { waited: self.max_wait })
        };
        let admitted = async {
            let queued = self.admit.clone().acquire_many_owned(n).await;
            let queued_kib = self.admit_kib.clone().acquire_many_owned(kib).await;
            queued.and_then(|q| Ok((q, queued_kib?)))
        };
        let (queued, queued_kib) =
            tokio::time::timeout_at(since + self.max_wait, admitted).await.map_err(|_| full())?.map_err(|_| Arc::new(BrokerError::Stopped))?;
        let (reply, rx) = oneshot::channel();
        let group = Group { events, reply, _queued: queued, _queued_kib: queued_kib, bytes, since };
        self.queue.send(group).await.map_err(|_| Arc::new(BrokerError::Stopped))?;
        let published = rx.await.map_err(|_| Arc::new(BrokerError::Stopped))??;
        if let Some(last) = published.iter().map(|(_, position)| *position).max() {
            self.acked.fetch_max(last, Ordering::AcqRel);
        }
        Ok(published)
    }

    /// Commit subscription progress. On the leader it rides in the batcher's next event entry
    /// (or goes alone when no events are queued; `lazy`: after waiting up to `SETTLE_LINGER` for
    /// some while events are flowing); elsewhere it is written like any command (the leader
    /// merges it on arrival, see [`Broker::write_forwarded`]). True once applied.
    pub async fn settle(&self, updates: Vec<SubUpdate>, lazy: bool, timeout: Duration) -> bool {
        if self.must_lead().is_err() {
            return self.store.command(Command::SubUpdate { updates }, timeout).await.is_ok();
        }
        match self.queue_settle(updates, lazy).await {
            Some(committed) => committed.await.unwrap_or(false),
            None => false,
        }
    }

    /// `NotLeader` unless this node leads: forwarded writes merge into its entries only then.
    fn must_lead(&self) -> Result<(), RemoteError> {
        let replica = self.store.replica();
        let leader = replica.leader();
        if leader == Some(replica.id()) { Ok(()) } else { Err(RemoteError::NotLeader { leader }) }
    }

    /// Queues progress for the batcher's next entry; the receiver says whether it committed.
    /// `None` once the broker has stopped.
    async fn queue_settle(&self, updates: Vec<SubUpdate>, lazy: bool) -> Option<oneshot::Receiver<bool>> {
        let (reply, rx) = oneshot::channel();
        self.settles.send(Settle { updates, reply, lazy, since: tokio::time::Instant::now() }).await.ok()?;
        Some(rx)
    }

    /// Leader side of a follower's forwarded writes (`PeerRequest::WriteBatch`): `Publish`
    /// batches and `SubUpdate`s merge into this node's next event entry, everything else is
    /// proposed as it is; answers in order.
    pub async fn write_forwarded(&self, cmds: Vec<Command>) -> Vec<Result<(u64, CommandResult), RemoteError>> {
        let replica = self.store.replica();
        let merged = |c: &Command| matches!(c, Command::Publish { .. } | Command::SubUpdate { .. });
        if !cmds.iter().any(merged) {
            return replica.write_batch_local(cmds).await;
        }
        let (mut publishes, mut others, mut is_publish) = (Vec::new(), Vec::new(), Vec::with_capacity(cmds.len()));
        for cmd in cmds {
            is_publish.push(merged(&cmd));
            match cmd {
                Command::Publish { events, .. } => publishes.push(self.publish_forwarded(Arc::unwrap_or_clone(events)).boxed()),
                Command::SubUpdate { updates } => publishes.push(self.settle_forwarded(updates).boxed()),
                other => others.push(other),
            }
        }
        let written = async {
            if others.is_empty() { Vec::new() } else { replica.write_batch_local(others).await }
        };
        let (published, written) = futures_util::future::join(futures_util::future::join_all(publishes), written).await;
        let (mut published, mut written) = (published.into_iter(), written.into_iter());
        let lost = || Err(RemoteError::Internal("write dropped".into()));
        is_publish
            .into_iter()
            .map(|p| if p { published.next().unwrap_or_else(lost) } else { written.next().unwrap_or_else(lost) })
            .collect()
    }

    /// Leader side of one forwarded `SubUpdate`: merge it into this node's next entry (only
    /// while this node leads, like `publish_forwarded`).
    async fn settle_forwarded(&self, updates: Vec<SubUpdate>) -> Result<(u64, CommandResult), RemoteError> {
        self.must_lead()?;
        let Some(committed) = self.queue_settle(updates, false).await else {
            return Err(RemoteError::Unavailable("the broker is shutting down".into()));
        };
        match committed.await {
            Ok(true) => Ok((0, CommandResult::SubUpdated)),
            // Progress updates apply idempotently enough (an ack twice is one ack; a failure
            // counted twice only brings its dead-lettering forward), but say it as it is.
            _ => Err(RemoteError::Internal("subscription update outcome unknown".into())),
        }
    }

    /// Leader side of one forwarded `Publish`: merge it into this node's next entry.
    /// Only while this node leads; otherwise the follower is told to retry at the leader (the
    /// group was not queued, so nothing of it can commit).
    async fn publish_forwarded(&self, events: Vec<NewEvent>) -> Result<(u64, CommandResult), RemoteError> {
        self.must_lead()?;
        match self.publish_batch(events).await {
            // The entry's log index is not tracked per group; publishers use positions only.
            Ok(ids) => Ok((0, CommandResult::Published(ids))),
            // Refused before it was queued (the nodes' --max-frame differ): nothing committed.
            // Not `Invalid` (a 400 on the follower): the follower merged several clients'
            // groups under its own view of the frames, and none of them sent bad input. A 502
            // says the leader refused it; sending it again would only be refused again.
            Err(e) if matches!(*e, BrokerError::TooLarge { .. }) => {
                Err(RemoteError::Internal(format!("the leader refused the events: {e} (the nodes' --max-frame differ)")))
            }
            // Never taken into an entry (the batcher stopped first: this node is draining), so
            // nothing of it can commit: the follower sends it to the leader again.
            // So is one that waited too long for an entry (`NotQueued`).
            Err(e) if matches!(*e, BrokerError::Stopped | BrokerError::NotQueued { .. }) => Err(RemoteError::Unavailable(e.to_string())),
            // Queued on the leader, the group may have committed even though this failed (a
            // deadline, a lost leadership): the follower must not retry it.
            Err(e) => Err(RemoteError::Internal(format!("publish outcome unknown: {e}"))),
        }
    }
}

/// What the batcher takes its entries from. Owned by the batcher; both channels close when the
/// `Broker` is dropped.
struct Inbox {
    groups: mpsc::Receiver<Group>,
    settles: mpsc::Receiver<Settle>,
    /// Groups taken off `groups` but not yet into an entry, oldest first: one that did not fit
    /// into the previous entry, and those received while lingering (at most `LINGER_ENOUGH`
    /// events' worth plus that one; each still holds its share of `QUEUE_EVENTS`).
    held: VecDeque<Group>,
    /// `event_bytes` per entry at most (`MAX_BATCH_BYTES`, or less with a small `--max-frame`);
    /// a group larger than this still goes alone.
    max_bytes: usize,
    /// Subscription progress per entry, by `SubUpdate::approx_size`: no more batches are taken
    /// once an eighth of a frame is (a batch is not split, and each is about an eighth at most,
    /// `Broker::progress_budget`), so with half a frame of events an entry stays well under
    /// `raft::entry_limit`. The count bound alone let 4,096 updates
    /// with their reasons outgrow a small frame, and such an entry was refused every time.
    max_progress_bytes: usize,
    /// Both bounds above are for this node's own frame; an entry must also fit the smallest
    /// member's (`PeerNet::cluster_frame`), read per batch (`fit_frame`; `entry_bytes`,
    /// `entry_progress`).
    frame: usize,
    /// A group queued longer than this (`--write-timeout-ms`) is answered `NotQueued` when the
    /// batcher comes to it, not put into an entry: its publisher has waited as long as a write
    /// may, and while the cluster cannot commit, each entry ahead of it took that long to fail
    /// (a full queue was answered minutes late, and events committed after their 503).
    max_wait: Duration,
}

fn progress_bytes(s: &Settle) -> usize {
    s.updates.iter().map(SubUpdate::approx_size).sum()
}

/// What woke the batcher: a group of events, or subscription progress with no events queued.
enum Work {
    Group(Group),
    Settle(Settle),
}

impl Inbox {
    /// Bounds the next entries for peer frames of `frame` bytes too.
    fn fit_frame(&mut self, frame: usize) {
        self.frame = frame;
    }

    /// Events per entry at most: this node's bound, and half of the smallest member's frame.
    fn entry_bytes(&self) -> usize {
        self.max_bytes.min(self.frame / 2)
    }

    /// Progress per entry at most: this node's bound, and an eighth of the smallest member's frame.
    fn entry_progress(&self) -> usize {
        self.max_progress_bytes.min(self.frame / 8)
    }

    /// Waits until something is queued (held groups first).
    async fn next(&mut self, shutdown: &CancellationToken) -> Option<Work> {
        // Stopped: take nothing more, also with groups queued (`Broker::drained` then finds
        // every entry this batcher will ever make).
        if shutdown.is_cancelled() {
            return None;
        }
        if let Some(g) = self.held.pop_front() {
            return Some(Work::Group(g));
        }
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => None,
            g = self.groups.recv() => g.map(Work::Group),
            s = self.settles.recv() => s.map(Work::Settle),
        }
    }

    /// The leader's linger: while fewer than `LINGER_ENOUGH` events are queued (`queued` of
    /// them already taken), receive more until `until`. False on shutdown.
    async fn gather(&mut self, mut queued: usize, until: tokio::time::Instant, shutdown: &CancellationToken) -> bool {
        queued += self.held.iter().map(|g| g.events.len()).sum::<usize>();
        while queued < LINGER_ENOUGH {
            let g = match self.groups.try_recv() {
                Ok(g) => g,
                Err(_) => tokio::select! {
                    g = self.groups.recv() => match g {
                        Some(g) => g,
                        None => return true,
                    },
                    _ = tokio::time::sleep_until(until) => return true,
                    _ = shutdown.cancelled() => return false,
                },
            };
            queued += g.events.len();
            self.held.push_back(g);
        }
        !shutdown.is_cancelled()
    }

    /// A follower's batch: let every task that is ready to run go first (one yield), so that
    /// publishers woken by the same I/O poll queue their events before the batch is cut. On the
    /// multi-thread scheduler the first group's send woke the batcher straight away (a task
    /// woken by the running one runs next), so without this a follower forwarded ~1.2 events per
    /// batch at saturation, each batch a request and a response on the peer link and a task on
    /// both nodes; on the current-thread scheduler the yield costs one pass of the run queue.
    /// Measured (single events, 3 nodes, 64 connections): 4.6 events per forwarded batch, node
    /// CPU per event 55 → 48 µs, 23,800 → 26,800 events/s. Costs no waiting when nothing else is
    /// ready.
    async fn let_ready_publishers_queue() {
        tokio::task::yield_now().await;
    }

    /// Lazy progress found no events queued: wait until `until` for a group to ride with (taken
    /// progress goes into `settles`; progress that may not wait, or `MAX_SETTLE_UPDATES` of it,
    /// ends the wait: one entry's bound). `Err` on shutdown.
    async fn await_group(&mut self, settles: &mut Vec<Settle>, until: tokio::time::Instant, shutdown: &CancellationToken) -> Result<Option<Group>, ()> {
        let mut n: usize = settles.iter().map(|s| s.updates.len()).sum();
        let mut bytes: usize = settles.iter().map(progress_bytes).sum();
        while n < MAX_SETTLE_UPDATES && bytes < self.entry_progress() {
            tokio::select! {
                g = self.groups.recv() => return Ok(g),
                s = self.settles.recv() => match s {
                    Some(s) => {
                        let lazy = s.lazy;
                        n += s.updates.len();
                        bytes += progress_bytes(&s);
                        settles.push(s);
                        if !lazy {
                            return Ok(None);
                        }
                    }
                    None => return Ok(None),
                },
                _ = tokio::time::sleep_until(until) => return Ok(None),
                _ = shutdown.cancelled() => return Err(()),
            }
        }
        Ok(None)
    }

    /// Adds whatever else is queued to `first` while it fits in one entry; a group that does not
    /// fit is held for the next batch. Groups past `max_wait` (`first` too) are answered
    /// `NotQueued` and left out, so the events may be none.
    fn fill(&mut self, first: Group) -> (Vec<NewEvent>, Vec<(Reply, usize)>) {
        let (mut count, mut bytes) = (0, 0);
        let mut groups: Vec<Group> = Vec::new();
        // One clock read per batch, not two per group (a group is one event when they come singly).
        let now = tokio::time::Instant::now();
        let mut next = Some(first);
        while let Some(g) = next.take().or_else(|| {
            (count < MAX_BATCH && bytes < self.entry_bytes()).then(|| self.held.pop_front().or_else(|| self.groups.try_recv().ok())).flatten()
        }) {
            let waited = now.saturating_duration_since(g.since);
            if waited >= self.max_wait {
                metrics::counter!("raftbridge_publish_not_queued_total").increment(g.events.len() as u64);
                let _ = g.reply.send(Err(Arc::new(BrokerError::NotQueued { waited })));
                continue;
            }
            // The first group always goes (alone it fits: see `max_bytes`).
            if !groups.is_empty() && (count + g.events.len() > MAX_BATCH || bytes + g.bytes > self.entry_bytes()) {
                self.held.push_front(g);
                break;
            }
            (count, bytes) = (count + g.events.len(), bytes + g.bytes);
            groups.push(g);
        }
        // One allocation of the final size: growing the batch group by group reallocated it
        // log2(n) times, each time into fresh allocator pages (seen in perf on the leader).
        let mut events = Vec::with_capacity(count);
        let mut replies = Vec::with_capacity(groups.len());
        for g in groups {
            metrics::histogram!("raftbridge_publish_queue_seconds").record(now.saturating_duration_since(g.since).as_secs_f64());
            replies.push((g.reply, g.events.len()));
            events.extend(g.events);
        }
        (events, replies)
    }

    /// Queued subscription progress, up to about `MAX_SETTLE_UPDATES` and `max_progress_bytes`
    /// (a batch is not split).
    fn settles(&mut self, mut taken: Vec<Settle>) -> Vec<Settle> {
        let mut n: usize = taken.iter().map(|s| s.updates.len()).sum();
        let mut bytes: usize = taken.iter().map(progress_bytes).sum();
        while n < MAX_SETTLE_UPDATES && bytes < self.entry_progress() {
            let Ok(s) = self.settles.try_recv() else { break };
            n += s.updates.len();
            bytes += progress_bytes(&s);
            taken.push(s);
        }
        taken
    }
}

/// How often the leader looks for events past their age, or producer keys past their window,
/// that no publish has dropped (`expire_loop`).
const EXPIRY_CHECK: Duration = Duration::from_secs(30);

/// On the leader, every `EXPIRY_CHECK`: retention by age and the dedup window are applied by a
/// `Publish` only, so while nothing is published, events older than `--events-max-age-s` (and
/// their memory, disk and snapshot space) and expired keys stayed for good. An empty `Publish`
/// applies both, when something is due. Ends with `shutdown`.
async fn expire_loop(store: StateStore, limits: EventLimits, dedup_max_keys: usize, shutdown: CancellationToken) {
    let mut check = crate::supervise::Ticker::new(EXPIRY_CHECK, &shutdown);
    while check.next().await {
        if !store.replica().raft.is_leader() {
            continue;
        }
        let (now, corrected) = entry_clock_ms(&store);
        if !store.local().events_expiry_due(now, limits.max_age_ms, limits.dedup_window_ms) {
            continue;
        }
        count_corrected(corrected);
        let window_ms = store.local().dedup_window(now, limits.dedup_window_ms, dedup_max_keys);
        let cmd = Command::Publish { now_ms: now, events: Arc::new(Vec::new()), limits: EventLimits { dedup_window_ms: window_ms, ..limits } };
        if let Err(e) = store.command(cmd, EXPIRY_CHECK).await {
            tracing::debug!(cause = %e, "event expiry not applied; next round");
        }
    }
}

/// How far an event's timestamp (the accepting node's clock) may be ahead of, or behind, the
/// entry's clock. Ahead: more than twice what a clock may be off before the leader corrects
/// its own (`clock::MAX_OFFSET`), with room for the measure's uncertainty, so healthy clocks
/// keep theirs. Behind: a group may wait up to `--write-timeout-ms` in queues and be sent again
/// after a leader change; but never more than half of `--events-max-age-s` (below).
const TIMESTAMP_AHEAD_MS: u64 = 5_000;
const TIMESTAMP_BEHIND_MS: u64 = 60_000;

/// Sets the timestamp of every event outside those bounds to the entry's clock (which is
/// corrected, `entry_clock_ms`, and no earlier than the state machine's). Retention by age
/// judges timestamps by the state machine's clock and stops at the first event not yet due:
/// one event from a node whose clock ran a day ahead held every later event past
/// `--events-max-age-s` for that day, and events from a node far behind were dropped as soon
/// as they reached the front. With a short max age, "behind" is half of it: an event stamped
/// by a follower that waited out an election, or whose clock is behind, was acknowledged (201)
/// and trimmed by the apply that stored it. The value travels in the entry, so every node
/// stores the same. A body is copied only when it changes (rarely).
fn keep_timestamps_near(events: &mut [NewEvent], now_ms: u64, max_age_ms: u64) {
    let behind = TIMESTAMP_BEHIND_MS.min(max_age_ms / 2);
    let range = now_ms.saturating_sub(behind)..=now_ms.saturating_add(TIMESTAMP_AHEAD_MS);
    for e in events.iter_mut().filter(|e| !range.contains(&e.body.timestamp)) {
        metrics::counter!("raftbridge_event_timestamps_corrected_total").increment(1);
        Arc::make_mut(&mut e.body).timestamp = now_ms;
    }
}

/// The entry for what the batcher took: events, progress, or both in one.
fn entry(mut events: Vec<NewEvent>, settles: &mut [Settle], now_ms: u64, limits: EventLimits) -> Command {
    keep_timestamps_near(&mut events, now_ms, limits.max_age_ms);
    let updates: Vec<SubUpdate> = settles.iter_mut().flat_map(|s| std::mem::take(&mut s.updates)).collect();
    match (events.is_empty(), updates.is_empty()) {
        (_, true) => Command::Publish { now_ms, events: Arc::new(events), limits },
        (true, false) => Command::SubUpdate { updates },
        (false, false) => Command::PublishAndSettle { now_ms, events: Arc::new(events), limits, updates: Arc::new(updates) },
    }
}

/// The entry for events alone, as the batcher builds it (for the state machine's tests).
#[cfg(test)]
pub(crate) fn events_entry(events: Vec<NewEvent>, now_ms: u64, limits: EventLimits) -> Command {
    entry(events, &mut [], now_ms, limits)
}

/// Until when progress found with no events queued waits for a group to ride with: only when
/// all of it is lazy and events are flowing (the batcher took a group within `SETTLE_LINGER`),
/// and never past `SETTLE_LINGER` after the oldest was queued.
fn lazy_until(settles: &[Settle], last_group: Option<tokio::time::Instant>) -> Option<tokio::time::Instant> {
    let flowing = last_group.is_some_and(|t| t.elapsed() < SETTLE_LINGER);
    let oldest = settles.iter().map(|s| s.since).min()?;
    (flowing && settles.iter().all(|s| s.lazy)).then(|| oldest + SETTLE_LINGER)
}

async fn batcher(store: StateStore, settings: Batching, mut inbox: Inbox, slots: Slots, shutdown: CancellationToken) {
    let Batching { limits, timeout, linger, dedup_max_keys } = settings;
    let (leading, following) = (&slots.leading, &slots.following);
    let replica = store.replica().clone();
    // When the batcher last took a group of events: lazy progress waits for one only while
    // events are flowing.
    let mut last_group: Option<tokio::time::Instant> = None;
    loop {
        let Some(first) = inbox.next(&shutdown).await else { return };
        // Per batch: the smallest member's frame may have changed (a rolling change of
        // `--max-frame`), and an entry must reach every member (`PeerNet::cluster_frame`).
        inbox.fit_frame(replica.net.cluster_frame());
        // The leader waits for a free slot, and meanwhile events accumulate into this batch. A
        // follower forwards at once: its batch merges into the leader's next entry anyway, so
        // waiting here would only add latency, not save an entry.
        let leader = replica.leader() == Some(replica.id());
        let slots = if leader { leading } else { following };
        let Ok(permit) = slots.clone().acquire_owned().await else { return };
        let (mut first, mut settles) = match first {
            Work::Group(g) => (Some(g), Vec::new()),
            // Woken by progress alone: events queued since then still join this entry.
            Work::Settle(s) => (inbox.held.pop_front().or_else(|| inbox.groups.try_recv().ok()), vec![s]),
        };
        if let Some(until) = lazy_until(&settles, last_group).filter(|_| first.is_none() && leader) {
            match inbox.await_group(&mut settles, until, &shutdown).await {
                Ok(g) => first = g,
                Err(()) => return,
            }
        }
        if first.is_some() {
            last_group = Some(tokio::time::Instant::now());
        }
        if !leader && first.is_some() {
            Inbox::let_ready_publishers_queue().await;
        }
        if let Some(first) = first.as_ref().filter(|_| leader && !linger.is_zero()) {
            // A few events only: wait a little for more (never past `linger` after the oldest
            // was queued), so a light load does not cost an entry per handful of events.
            let until = first.since + linger;
            if !inbox.gather(first.events.len(), until, &shutdown).await {
                return;
            }
        }
        let (events, replies) = match first {
            Some(g) => inbox.fill(g),
            None => (Vec::new(), Vec::new()),
        };
        if leader {
            settles = inbox.settles(settles);
            if events.is_empty() && settles.is_empty() {
                // Every group taken had waited too long (answered by `fill`): no entry.
                continue;
            }
        } else {
            // Leadership moved after the progress was queued: write it like any command, so
            // the forwarder takes it to the leader (whose broker merges it there).
            for s in settles.drain(..) {
                let store = store.clone();
                tokio::spawn(async move {
                    let ok = store.command(Command::SubUpdate { updates: s.updates }, timeout).await.is_ok();
                    let _ = s.reply.send(ok);
                });
            }
            if events.is_empty() {
                continue;
            }
        }
        // Events per entry: a follower's batch is merged again into the leader's entries.
        if leader && !events.is_empty() {
            metrics::histogram!("raftbridge_publish_batch_events").record(events.len() as f64);
        }
        let store = store.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let n = events.len();
            // Shorter while more producer keys than their bound are younger than the window.
            // Never behind the state machine's clock (a new leader's may be a little behind
            // the last one's): retention judges this entry's timestamps by that clock.
            let (now, corrected) = entry_clock_ms(&store);
            // A follower's entry is stamped again by the leader's broker.
            count_corrected(corrected && leader);
            let now = now.max(store.local().clock_ms());
            let window_ms = store.local().dedup_window(now, limits.dedup_window_ms, dedup_max_keys);
            if window_ms < limits.dedup_window_ms {
                crate::raft::state_machine::note_shortened_window("events", window_ms, limits.dedup_window_ms);
            }
            let cmd = entry(events, &mut settles, now, EventLimits { dedup_window_ms: window_ms, ..limits });
            let started = std::time::Instant::now();
            let outcome = store.command(cmd, timeout).await;
            // Leader: propose → committed and applied; follower: forwarded → the leader's answer.
            metrics::histogram!("raftbridge_publish_commit_seconds").record(started.elapsed().as_secs_f64());
            let committed = matches!(outcome, Ok(CommandResult::Published(_) | CommandResult::SubUpdated));
            for s in settles {
                let _ = s.reply.send(committed);
            }
            let result = match outcome {
                Ok(CommandResult::Published(ids)) if ids.len() == n => Ok(ids),
                Ok(CommandResult::SubUpdated) if n == 0 => Ok(Vec::new()),
                Ok(_) => Err(Arc::new(BrokerError::Unexpected)),
                Err(e) => Err(Arc::new(BrokerError::Store(e))),
            };
            match result {
                Ok(ids) => {
                    let mut ids = ids.into_iter();
                    for (reply, len) in replies {
                        let _ = reply.send(Ok(ids.by_ref().take(len).collect()));
                    }
                }
                Err(e) => {
                    for (reply, _) in replies {
                        let _ = reply.send(Err(e.clone()));
                    }
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(payload_bytes: usize) -> NewEvent {
        new_event("e", vec![b'1'; payload_bytes], &MessageMeta::default(), None, None)
    }

    /// Queues groups of the given (events, payload bytes each); returns the receivers.
    fn queue(tx: &mpsc::Sender<Group>, admit: &Arc<Semaphore>, groups: &[(usize, usize)]) -> Vec<oneshot::Receiver<Result<Published, Arc<BrokerError>>>> {
        let groups = groups.iter().map(|&(n, bytes)| (0..n).map(|_| event(bytes)).collect()).collect();
        queue_events(tx, admit, groups)
    }

    /// Queues the given groups; returns the receivers.
    fn queue_events(tx: &mpsc::Sender<Group>, admit: &Arc<Semaphore>, groups: Vec<Vec<NewEvent>>) -> Vec<oneshot::Receiver<Result<Published, Arc<BrokerError>>>> {
        groups
            .into_iter()
            .map(|events| {
                let (reply, rx) = oneshot::channel();
                let queued = admit.clone().try_acquire_many_owned(events.len() as u32).expect("room in the queue");
                let queued_kib = Arc::new(Semaphore::new(1)).try_acquire_owned().expect("a fresh permit");
                let bytes = event_bytes(&events);
                let group = Group { events, reply, _queued: queued, _queued_kib: queued_kib, bytes, since: tokio::time::Instant::now() };
                tx.try_send(group).expect("room in the channel");
                rx
            })
            .collect()
    }

    /// An inbox fed by the returned senders.
    fn inbox() -> (mpsc::Sender<Group>, mpsc::Sender<Settle>, Inbox) {
        let (tx, rx) = mpsc::channel(16);
        let (settle_tx, settle_rx) = mpsc::channel(SETTLE_QUEUE);
        let max_wait = Duration::from_secs(5);
        let inbox = Inbox {
            groups: rx,
            settles: settle_rx,
            held: VecDeque::new(),
            max_bytes: MAX_BATCH_BYTES,
            max_progress_bytes: usize::MAX,
            frame: usize::MAX,
            max_wait,
        };
        (tx, settle_tx, inbox)
    }

    fn acks(sub: &str, positions: std::ops::Range<u64>) -> (Settle, oneshot::Receiver<bool>) {
        let (reply, rx) = oneshot::channel();
        let updates = positions.map(|position| SubUpdate::Ack { sub: sub.into(), position }).collect();
        (Settle { updates, reply, lazy: true, since: tokio::time::Instant::now() }, rx)
    }

    #[tokio::test(start_paused = true)]
    async fn a_leader_lingers_only_while_few_events_are_queued_and_never_past_the_linger() {
        let ms = Duration::from_millis;
        let shutdown = CancellationToken::new();
        let admit = Arc::new(Semaphore::new(QUEUE_EVENTS));
        // Enough queued: no wait at all.
        let (tx, _s, mut ib) = inbox();
        let _rxs = queue(&tx, &admit, &[(10, 1), (10, 1)]);
        let start = tokio::time::Instant::now();
        assert!(ib.gather(1, start + ms(2), &shutdown).await);
        assert_eq!(tokio::time::Instant::now(), start, "16 or more events queued: propose at once");
        assert_eq!(ib.held.len(), 2);
        // Few queued and nothing more comes: waits until the deadline, not longer.
        let (_tx, _s, mut ib) = inbox();
        let start = tokio::time::Instant::now();
        assert!(ib.gather(1, start + ms(2), &shutdown).await);
        assert_eq!(tokio::time::Instant::now(), start + ms(2));
        // Few queued, more arrive during the linger: it stops as soon as there are enough.
        let (tx, _s, mut ib) = inbox();
        let start = tokio::time::Instant::now();
        let feeder = tokio::spawn({
            let (tx, admit) = (tx.clone(), admit.clone());
            async move {
                tokio::time::sleep(ms(1)).await;
                let rxs = queue(&tx, &admit, &[(20, 1)]);
                tokio::time::sleep(ms(10)).await;
                drop(rxs);
            }
        });
        assert!(ib.gather(1, start + ms(5), &shutdown).await);
        assert_eq!(tokio::time::Instant::now(), start + ms(1), "the 20 events that came after 1 ms end the wait");
        let first = ib.held.pop_front().expect("held");
        assert_eq!(ib.fill(first).0.len(), 20, "held groups go into the entry");
        feeder.abort();
        // Shutdown ends the wait.
        let (_tx, _s, mut ib) = inbox();
        shutdown.cancel();
        assert!(!ib.gather(0, tokio::time::Instant::now() + ms(1000), &shutdown).await);
    }

    /// An entry's bounds follow the smallest member's frame, never past the node's own.
    #[test]
    fn entries_fit_the_smallest_members_frame() {
        let (_tx, _s, mut ib) = inbox();
        ib.max_progress_bytes = 64 << 10;
        ib.fit_frame(128 << 10);
        assert_eq!((ib.entry_bytes(), ib.entry_progress()), (64 << 10, 16 << 10));
        ib.fit_frame(64 << 20);
        assert_eq!((ib.entry_bytes(), ib.entry_progress()), (MAX_BATCH_BYTES, 64 << 10), "no more than its own");
    }

    /// Timestamps far from the entry's clock are set to it; those near it are kept as they are.
    #[test]
    fn an_entry_keeps_event_timestamps_near_its_clock() {
        let at = |t: u64| {
            let mut e = event(1);
            Arc::make_mut(&mut e.body).timestamp = t;
            e
        };
        let now = 10_000_000;
        let mut events = vec![at(now - 5_000), at(now + 500), at(now + 86_400_000), at(now - 3_600_000), at(now)];
        let shared = events[0].body.clone();
        keep_timestamps_near(&mut events, now, 7 * 86_400_000);
        let times: Vec<u64> = events.iter().map(|e| e.body.timestamp).collect();
        assert_eq!(times, vec![now - 5_000, now + 500, now, now, now]);
        assert!(Arc::ptr_eq(&shared, &events[0].body), "a body left as it was is not copied");
    }

    /// A group that waited `max_wait` for an entry (the cluster could not commit the ones
    /// ahead of it) is answered `NotQueued` when the batcher comes to it and goes into no entry;
    /// younger groups behind it still go.
    #[tokio::test(start_paused = true)]
    async fn groups_that_waited_past_the_write_timeout_are_answered_and_left_out() {
        let admit = Arc::new(Semaphore::new(QUEUE_EVENTS));
        let (tx, _s, mut ib) = inbox();
        let mut old = queue(&tx, &admit, &[(3, 1), (2, 1)]);
        tokio::time::advance(ib.max_wait).await;
        let mut young = queue(&tx, &admit, &[(4, 1)]);
        let first = ib.groups.try_recv().expect("queued");
        let (events, replies) = ib.fill(first);
        assert_eq!((events.len(), replies.len()), (4, 1), "only the young group goes into the entry");
        for rx in &mut old {
            let answer = rx.try_recv().expect("answered at once");
            assert!(matches!(answer.as_ref().map_err(|e| &**e), Err(BrokerError::NotQueued { .. })), "{answer:?}");
        }
        assert!(young[0].try_recv().is_err(), "the young group waits for its entry");
        // Every group too old: nothing to propose.
        let _older = queue(&tx, &admit, &[(1, 1)]);
        tokio::time::advance(ib.max_wait).await;
        let first = ib.groups.try_recv().expect("queued");
        assert_eq!(ib.fill(first).0.len(), 0);
        // The API answers it 503 with Retry-After (never stored, a retry is safe).
        let e = crate::api::error::ApiError::from(BrokerError::NotQueued { waited: ib.max_wait });
        assert_eq!(e.status().as_u16(), 503);
        assert!(matches!(e, crate::api::error::ApiError::Busy(_)));
    }

    #[tokio::test]
    async fn a_follower_batch_takes_what_publishers_that_were_ready_queue() {
        let admit = Arc::new(Semaphore::new(QUEUE_EVENTS));
        let (tx, _s, mut ib) = inbox();
        let shutdown = CancellationToken::new();
        // Publishers ready to run (spawned, not yet polled) while the first group wakes us.
        let publishers: Vec<_> = (0..5)
            .map(|_| {
                let (tx, admit) = (tx.clone(), admit.clone());
                tokio::spawn(async move { queue(&tx, &admit, &[(1, 1)]) })
            })
            .collect();
        let _first_rx = queue(&tx, &admit, &[(1, 1)]);
        let Some(Work::Group(first)) = ib.next(&shutdown).await else { panic!("a group is queued") };
        Inbox::let_ready_publishers_queue().await;
        let (events, replies) = ib.fill(first);
        assert_eq!((events.len(), replies.len()), (6, 6), "the five ready publishers' events join the first");
        for p in publishers {
            drop(p.await.expect("publisher ran"));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn lazy_progress_waits_for_a_group_until_its_deadline_or_progress_that_may_not_wait() {
        let ms = Duration::from_millis;
        let shutdown = CancellationToken::new();
        let admit = Arc::new(Semaphore::new(QUEUE_EVENTS));
        // A group comes after 2 ms: the progress rides with it.
        let (tx, _s, mut ib) = inbox();
        let start = tokio::time::Instant::now();
        let feeder = tokio::spawn({
            let (tx, admit) = (tx.clone(), admit.clone());
            async move {
                tokio::time::sleep(ms(2)).await;
                let rxs = queue(&tx, &admit, &[(3, 1)]);
                tokio::time::sleep(ms(100)).await;
                drop(rxs);
            }
        });
        let mut settles = Vec::new();
        let got = ib.await_group(&mut settles, start + SETTLE_LINGER, &shutdown).await.expect("not shut down");
        assert_eq!(got.map(|g| g.events.len()), Some(3));
        assert_eq!(tokio::time::Instant::now(), start + ms(2), "taken as soon as it came");
        feeder.abort();
        // Nothing comes: the wait ends at the deadline; lazy progress that comes meanwhile joins.
        let (_tx, settle_tx, mut ib) = inbox();
        let start = tokio::time::Instant::now();
        let (more, _r) = acks("s", 0..2);
        settle_tx.try_send(more).expect("room");
        let mut settles = Vec::new();
        assert!(ib.await_group(&mut settles, start + SETTLE_LINGER, &shutdown).await.expect("not shut down").is_none());
        assert_eq!(tokio::time::Instant::now(), start + SETTLE_LINGER);
        assert_eq!(settles.len(), 1, "lazy progress gathered while waiting");
        // Progress that may not wait ends the wait at once.
        let (_tx, settle_tx, mut ib) = inbox();
        let start = tokio::time::Instant::now();
        let (mut eager, _r) = acks("t", 5..6);
        eager.lazy = false;
        settle_tx.try_send(eager).expect("room");
        let mut settles = Vec::new();
        assert!(ib.await_group(&mut settles, start + SETTLE_LINGER, &shutdown).await.expect("not shut down").is_none());
        assert_eq!(tokio::time::Instant::now(), start);
        assert!(settles.len() == 1 && !settles[0].lazy);
        // An entry's worth of progress ends it too.
        let (_tx, settle_tx, mut ib) = inbox();
        let start = tokio::time::Instant::now();
        let (big, _r) = acks("u", 0..MAX_SETTLE_UPDATES as u64);
        settle_tx.try_send(big).expect("room");
        let mut settles = Vec::new();
        assert!(ib.await_group(&mut settles, start + SETTLE_LINGER, &shutdown).await.expect("not shut down").is_none());
        assert_eq!((tokio::time::Instant::now(), settles.len()), (start, 1));
        // Shutdown ends it too.
        let (_tx, _s, mut ib) = inbox();
        shutdown.cancel();
        assert!(ib.await_group(&mut Vec::new(), tokio::time::Instant::now() + ms(1000), &shutdown).await.is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn progress_waits_for_events_only_while_they_flow_and_all_of_it_is_lazy() {
        let now = tokio::time::Instant::now();
        let (lazy, _r) = acks("s", 0..1);
        let recent = Some(now - Duration::from_millis(1));
        assert_eq!(lazy_until(std::slice::from_ref(&lazy), recent), Some(lazy.since + SETTLE_LINGER));
        // No group for a while (a backlog being consumed, an idle publisher): no wait.
        assert_eq!(lazy_until(std::slice::from_ref(&lazy), Some(now - SETTLE_LINGER)), None);
        assert_eq!(lazy_until(std::slice::from_ref(&lazy), None), None);
        // Any progress that may not wait (an every-instance position) means no wait.
        let (mut eager, _r) = acks("t", 1..2);
        eager.lazy = false;
        assert_eq!(lazy_until(&[lazy, eager], recent), None);
        assert_eq!(lazy_until(&[], recent), None);
    }

    #[tokio::test]
    async fn queued_groups_merge_into_one_batch_in_order() {
        let (tx, _settle_tx, mut inbox) = inbox();
        let admit = Arc::new(Semaphore::new(QUEUE_EVENTS));
        let _rxs = queue(&tx, &admit, &[(1, 10), (3, 10), (2, 10)]);
        let shutdown = CancellationToken::new();
        let Some(Work::Group(first)) = inbox.next(&shutdown).await else { panic!("a group") };
        let (events, replies) = inbox.fill(first);
        assert_eq!(events.len(), 6);
        assert_eq!(replies.iter().map(|(_, n)| *n).collect::<Vec<_>>(), vec![1, 3, 2], "one reply per group, in order");
        assert!(inbox.held.is_empty());
        assert_eq!(admit.available_permits(), QUEUE_EVENTS, "taken groups free their queue room");
    }

    /// Batch sizes (in events) the queued groups form, one batch after another.
    async fn batch_sizes(groups: &[(usize, usize)]) -> Vec<usize> {
        let (tx, _settle_tx, mut inbox) = inbox();
        let admit = Arc::new(Semaphore::new(QUEUE_EVENTS));
        let _rxs = queue(&tx, &admit, groups);
        drop(tx); // the batcher's input ends after these, so nothing here can wait forever
        let shutdown = CancellationToken::new();
        let mut sizes = Vec::new();
        while let Some(Work::Group(first)) = inbox.next(&shutdown).await {
            let (events, replies) = inbox.fill(first);
            assert_eq!(events.len(), replies.iter().map(|(_, n)| n).sum::<usize>());
            sizes.push(events.len());
        }
        sizes
    }

    #[tokio::test]
    async fn queued_progress_rides_in_the_event_entry_and_alone_when_no_events_wait() {
        let limits = EventLimits { max_events: 10, max_bytes: 1 << 20, max_age_ms: 60_000, dedup_window_ms: 1_000 };
        let (first, _r1) = acks("s", 0..3);
        let (second, _r2) = acks("t", 3..4);
        let mut settles = vec![first, second];
        match entry(vec![event(4), event(4)], &mut settles, 1, limits) {
            Command::PublishAndSettle { events, updates, .. } => {
                assert_eq!(events.len(), 2);
                assert_eq!(updates.len(), 4, "every queued update, in order");
                assert_eq!(updates[3], SubUpdate::Ack { sub: "t".into(), position: 3 });
            }
            other => panic!("expected one entry with both, got {other}"),
        }
        let (only, _r) = acks("s", 5..6);
        assert!(matches!(entry(Vec::new(), &mut [only], 1, limits), Command::SubUpdate { updates } if updates.len() == 1));
        assert!(matches!(entry(vec![event(4)], &mut [], 1, limits), Command::Publish { events, .. } if events.len() == 1));
    }

    #[tokio::test]
    async fn progress_wakes_the_batcher_and_is_taken_up_to_the_bound() {
        let (_tx, settle_tx, mut inbox) = inbox();
        for i in 0..3u64 {
            let (s, _) = acks("s", i * 3000..(i + 1) * 3000);
            settle_tx.try_send(s).expect("room");
        }
        let shutdown = CancellationToken::new();
        let Some(Work::Settle(first)) = inbox.next(&shutdown).await else { panic!("progress wakes the batcher") };
        let taken = inbox.settles(vec![first]);
        // 3000 < MAX_SETTLE_UPDATES, so the second batch is taken whole; then the bound is met.
        assert_eq!(taken.iter().map(|s| s.updates.len()).sum::<usize>(), 6000);
        assert_eq!(inbox.settles(Vec::new()).len(), 1, "the rest waits for the next entry");
        // By bytes too: with room for about 100 acks, the second batch of 100 waits.
        let (_tx, settle_tx, mut inbox) = super::tests::inbox();
        inbox.max_progress_bytes = 100 * SubUpdate::Ack { sub: "s".into(), position: 0 }.approx_size();
        for i in 0..3u64 {
            let (s, _) = acks("s", i * 100..(i + 1) * 100);
            settle_tx.try_send(s).expect("room");
        }
        assert_eq!(inbox.settles(Vec::new()).len(), 1, "one batch reaches the byte bound");
        assert_eq!(inbox.settles(Vec::new()).len(), 1);
    }

    #[tokio::test]
    async fn a_group_that_does_not_fit_is_carried_whole_into_the_next_batch() {
        // By bytes: two 600 KiB payloads exceed MAX_BATCH_BYTES together.
        assert_eq!(batch_sizes(&[(1, 600 << 10), (1, 600 << 10), (1, 600 << 10)]).await, vec![1, 1, 1]);
        // By count: a group that would take the batch past MAX_BATCH waits for the next one.
        assert_eq!(batch_sizes(&[(MAX_BATCH - 1, 1), (2, 1), (1, 1)]).await, vec![MAX_BATCH - 1, 3]);
        // A group larger than the bounds still goes, alone: groups are never split.
        assert_eq!(batch_sizes(&[(1, 1), (MAX_BATCH + 5, 1), (1, 1)]).await, vec![1, MAX_BATCH + 5, 1]);
    }

    #[tokio::test]
    async fn metadata_counts_toward_an_entrys_bytes() {
        // 1-byte payloads with ~1 KiB of metadata each: ten groups of 100 are ~1 MiB, four
        // entries' worth of MAX_BATCH_BYTES, though their payloads are 1,000 bytes.
        let meta = MessageMeta { principal_id: Some("p".repeat(500)), tenant_id: Some("t".repeat(500)), ..Default::default() };
        let groups: Vec<Vec<NewEvent>> = (0..10).map(|_| (0..100).map(|_| new_event("e", b"1".to_vec(), &meta, None, None)).collect()).collect();
        assert!(event_bytes(&groups[0]) > 100 * 1000);
        let (tx, _settle_tx, mut inbox) = inbox();
        let admit = Arc::new(Semaphore::new(QUEUE_EVENTS));
        let _rxs = queue_events(&tx, &admit, groups);
        drop(tx);
        let shutdown = CancellationToken::new();
        let mut sizes = Vec::new();
        while let Some(Work::Group(first)) = inbox.next(&shutdown).await {
            let (events, _) = inbox.fill(first);
            assert!(events.len() == 100 || event_bytes(&events) <= MAX_BATCH_BYTES, "an entry over the bound: {} bytes", event_bytes(&events));
            sizes.push(events.len());
        }
        assert_eq!(sizes.iter().sum::<usize>(), 1000);
        assert!(sizes.len() >= 4, "entries {sizes:?}");

        // With a small frame the entry bound is smaller too (half a frame): 32 KiB here.
        let (tx, _settle_tx, mut small) = self::tests::inbox();
        small.max_bytes = 32 << 10;
        let groups: Vec<Vec<NewEvent>> = (0..10).map(|_| vec![event(10_000)]).collect();
        let _rxs = queue_events(&tx, &admit, groups);
        drop(tx);
        let mut sizes = Vec::new();
        while let Some(Work::Group(first)) = small.next(&shutdown).await {
            let (events, _) = small.fill(first);
            assert!(event_bytes(&events) <= 32 << 10, "an entry over the small bound: {} bytes", event_bytes(&events));
            sizes.push(events.len());
        }
        assert_eq!(sizes, vec![3, 3, 3, 1], "three 10 KB events per 32 KiB entry");
    }

    #[tokio::test]
    async fn a_stopped_batcher_ends_on_shutdown() {
        let (_tx, _settle_tx, mut inbox) = inbox();
        let shutdown = CancellationToken::new();
        shutdown.cancel();
        assert!(inbox.next(&shutdown).await.is_none());
    }
}

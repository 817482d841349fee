//! Pull consumers: subscriptions whose consumer is a client of the node, which fetches events
//! over HTTP and acks or nacks each, as a JetStream pull consumer's client does, instead of a
//! handler in the node or an app the node POSTs to (a worker, a batch job, a script behind a
//! firewall: anything that can make requests but serves none).
//!
//! Why on top of the push path rather than beside it: a pull subscription is, to the leader and
//! the dispatcher, a subscription this node consumes with a handler, so everything they do for
//! one holds unchanged (competing consumers across nodes, every-instance copies, the ack
//! deadline, attempts, backoff, dead letters, `max_in_flight`, durable positions). The handler
//! (`PullQueue`) holds each event it is handed until a client fetches it, then waits for that
//! client's ack or nack.
//!
//! What counts as an attempt: only an event a client fetched. An event no fetch takes within
//! `HOLD` is handed back as not served (no attempt), and goes to another consumer or waits. The
//! node offers the subscription (its service's registry entry is available) only while a
//! client fetched within `DEMAND_GRACE`, so the leader does not hand events to a node nobody
//! pulls from. The ack deadline runs from when the leader handed the event to this node, as for
//! any consumer: at most `HOLD` of it passes before a fetch takes the event.
//!
//! Ack ids name this node (`<node>-<random>`): a client's answer may reach any node (behind
//! DNS, a new connection may land elsewhere), and that node forwards each id to the node it
//! names over the peer link (`PeerRequest::PullAnswer`), which holds the lease. Every queue is
//! bounded: what the dispatcher hands this node is bounded by `max_in_flight`, and the leases
//! by what was handed (a lease whose delivery ended, by its ack deadline, the node's stop or
//! the close of the link the leader's delivery came on, is forgotten at the next fetch, and
//! `answered` passes over it at the drain). A lease never outlives the leader's wait for its
//! answer: once the leader gave up on the delivery (and hands the event out again), an ack is
//! answered unknown rather than "acked".

use std::collections::HashMap;
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::sync::oneshot;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::event::Event;
use crate::lock;
use crate::sdk::BoxFuture;
use crate::sdk::Ctx;
use crate::sdk::Emit;
use crate::sdk::HandlerError;
use crate::sdk::SubscriptionHandler;

/// How long an event handed to this node waits for a fetch before it is handed back (not
/// served: no attempt).
pub const HOLD: Duration = Duration::from_secs(5);
/// How long after a client's last fetch this node still offers the subscription.
pub const DEMAND_GRACE: Duration = Duration::from_secs(30);
/// Events one fetch takes at most (and ids one answer names).
pub const MAX_FETCH: usize = 1_000;
/// A client's answer to events it fetched.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Verdict {
    /// Handled: each event is settled.
    Ack,
    /// Not handled, with the reason: the attempt fails, and the event comes again after its
    /// backoff (or goes to the dead letters after its attempts).
    Nack(String),
    /// Never to be handled (JetStream's `TERM`), with the reason: the event goes to the dead
    /// letters now (`HandlerError::no_retry`).
    Term(String),
}

impl Verdict {
    /// With its reason cut to `MAX_NACK_REASON`.
    pub fn bounded(mut self) -> Verdict {
        if let Verdict::Nack(reason) | Verdict::Term(reason) = &mut self {
            crate::sdk::truncate_utf8(reason, MAX_NACK_REASON);
        }
        self
    }
}

/// How a node that has no such pull subscription refuses a forwarded answer (its sender
/// tells that apart from a node it could not reach).
pub const NO_SUCH_PULL: &str = "this node consumes no pull subscription";
/// A nack's reason, at most this many bytes (cut at a character boundary).
pub const MAX_NACK_REASON: usize = 1024;
/// How long a fetch after a quiet spell waits at least, whatever its `wait`: the node's
/// registration must say it is offered (a write, a few hundred ms) before events come.
pub const COLD_WAIT: Duration = Duration::from_secs(3);

/// A fetch under way, counted in `fetching` until it ends or is dropped (a client that went
/// away mid-wait): a count left behind would keep the node offered for good.
struct Fetching<'a>(&'a PullQueue);

impl<'a> Fetching<'a> {
    fn start(queue: &'a PullQueue) -> Fetching<'a> {
        queue.fetching.fetch_add(1, Ordering::AcqRel);
        *lock(&queue.last_fetch) = Some(Instant::now());
        Fetching(queue)
    }
}

impl Drop for Fetching<'_> {
    fn drop(&mut self) {
        *lock(&self.0.last_fetch) = Some(Instant::now());
        self.0.fetching.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The `[pull]` section of the config file: subscriptions this node consumes for clients that
/// fetch over HTTP (`POST /v1/subscriptions/{name}/fetch`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PullConfig {
    /// The service the subscriptions belong to (default `pull`, version 1): a subscription's
    /// name is the cluster's, and every node that consumes it must name the same service.
    #[serde(default = "default_service")]
    pub service: String,
    #[serde(default = "default_version")]
    pub version: u32,
    #[serde(default)]
    pub subscriptions: Vec<PullSubscription>,
}

fn default_service() -> String {
    "pull".into()
}
fn default_version() -> u32 {
    1
}
/// A pull subscription's ack deadline unless it sets one: the time a client has to answer
/// what it fetched (with `HOLD` of it at most spent waiting for the fetch).
pub const ACK_DEADLINE_MS: u64 = 30_000;

/// One `[[pull.subscriptions]]` entry: the filter and delivery settings of a sidecar
/// subscription, without what the sidecar does with its events.
pub type PullSubscription = crate::sidecar::SubscriptionEntry;

impl PullConfig {
    /// One service per subscription (each named by the section's `service` and `version`),
    /// with a queue as its handler, checked as any service's declarations are (names, filters,
    /// bounds). One each: a service's registry entry says whether the node is offered for its
    /// subscriptions, and a node is offered a pull subscription only while a client fetches
    /// that one here (one fetched subscription must not bring the others' events here, to be
    /// held and handed back).
    pub fn parts(&self, node: u64) -> Result<(Vec<crate::sdk::ServiceParts>, PullConsumers), crate::sdk::builder::BuildError> {
        let fail = |reason: String| crate::sdk::builder::BuildError::Service { service: self.service.clone(), version: self.version, reason };
        let mut names = std::collections::HashSet::new();
        let mut parts = Vec::with_capacity(self.subscriptions.len());
        for sub in &self.subscriptions {
            let sidecar_only = [("path", sub.path.is_some()), ("emit_event", sub.emit_event.is_some()), ("service", sub.service.is_some()), ("version", sub.version.is_some())];
            if let Some((field, _)) = sidecar_only.iter().find(|(_, given)| *given) {
                return Err(fail(format!("pull subscription {}: `{field}` is a sidecar subscription's setting (a pull subscription's service is the [pull] section's)", sub.name)));
            }
            if !names.insert(sub.name.clone()) {
                return Err(fail(format!("two pull subscriptions are named {}", sub.name)));
            }
            let decl = sub.decl(ACK_DEADLINE_MS);
            // The hold comes out of the ack deadline: below twice it, an event no client took
            // could pass its deadline while held, and fail an attempt nobody made.
            if decl.ack_deadline_ms < MIN_ACK_DEADLINE_MS {
                return Err(fail(format!("pull subscription {}: ack_deadline_ms must be at least {MIN_ACK_DEADLINE_MS} (twice the {} s an event waits for a fetch)", sub.name, HOLD.as_secs())));
            }
            parts.push((sub.name.clone(), decl));
        }
        let consumers = PullConsumers::new(parts.iter().map(|(name, _)| name.clone()), node);
        let mut out = Vec::with_capacity(parts.len());
        for (name, decl) in parts {
            // Just made from these names.
            let Some(queue) = consumers.get(&name) else { continue };
            let handler: Arc<dyn SubscriptionHandler> = Arc::new(queue.clone());
            out.push(crate::sdk::Service::new(&self.service, self.version).subscription((decl, handler)).into_parts()?);
        }
        Ok((out, consumers))
    }
}

/// The shortest ack deadline a pull subscription may have: twice `HOLD`.
pub const MIN_ACK_DEADLINE_MS: u64 = 2 * HOLD.as_millis() as u64;

/// What a client's answer to a fetched event is.
type Outcome = Result<(), HandlerError>;

/// An event handed to this node, waiting for a fetch.
struct Held {
    /// Which handler run it is (to take it back at `HOLD`).
    seq: u64,
    event: Event,
    /// Tells the run that a fetch took it (the run then waits for `outcome`).
    taken: oneshot::Sender<()>,
    outcome: oneshot::Sender<Outcome>,
}

/// One pull subscription on this node: the handler the dispatcher runs, and the queue the
/// HTTP fetches take from.
pub struct PullQueue {
    name: String,
    node: u64,
    /// Events waiting for a fetch, oldest first (at most what the dispatcher hands this node:
    /// `max_in_flight`, or one for an every-instance subscription).
    held: Mutex<VecDeque<Held>>,
    /// Wakes waiting fetches when an event is held.
    arrived: Notify,
    /// Fetched events by ack id, until acked, nacked or their run ended.
    leases: Mutex<HashMap<String, oneshot::Sender<Outcome>>>,
    /// Set once by `hand_back` when the node drains: nothing is held after.
    draining: std::sync::atomic::AtomicBool,
    seq: AtomicU64,
    /// Fetches waiting now.
    fetching: AtomicUsize,
    /// When the last fetch ended (or began).
    last_fetch: Mutex<Option<Instant>>,
    /// Whether a client pulls from this node (`demand_loop` keeps it; the dispatcher and the
    /// registry read it). The queue owns the sender; it lives as long as the queue.
    demand: watch::Sender<bool>,
}

impl PullQueue {
    fn new(name: String, node: u64) -> PullQueue {
        PullQueue {
            name,
            node,
            held: Mutex::new(VecDeque::new()),
            arrived: Notify::new(),
            leases: Mutex::new(HashMap::new()),
            draining: std::sync::atomic::AtomicBool::new(false),
            seq: AtomicU64::new(0),
            fetching: AtomicUsize::new(0),
            last_fetch: Mutex::new(None),
            demand: watch::Sender::new(false),
        }
    }

    /// True while a client pulls from this node (`LocalSubscriber::available`).
    pub fn demand(&self) -> watch::Receiver<bool> {
        self.demand.subscribe()
    }

    /// Never while the node drains (`hand_back`): what is handed to it then is refused.
    fn wanted(&self, now: Instant) -> bool {
        !self.draining.load(Ordering::Acquire)
            && (self.fetching.load(Ordering::Acquire) > 0 || lock(&self.last_fetch).is_some_and(|at| now.saturating_duration_since(at) < DEMAND_GRACE))
    }

    /// Takes up to `max` held events (at most about `max_bytes` of payload, at least one),
    /// waiting up to `wait` for the first (until `stop`); each is leased under an ack id until
    /// the client answers it or its delivery ends. A fetch after a quiet spell (this node was
    /// not offered the subscription) waits at least `COLD_WAIT`: the leader hands this node
    /// events only once its registration says it is offered.
    pub async fn fetch(&self, max: usize, max_bytes: usize, wait: Duration, stop: &CancellationToken) -> Vec<(String, Event)> {
        let _fetching = Fetching::start(self);
        let cold = !*self.demand.borrow();
        if !self.draining.load(Ordering::Acquire) {
            self.demand.send_if_modified(|d| !std::mem::replace(d, true));
        }
        let wait = if cold { wait.max(COLD_WAIT) } else { wait };
        let deadline = Instant::now() + wait;
        let mut out = Vec::new();
        // Bounded by the deadline: each pass takes what is held or waits for an arrival.
        loop {
            // Registered before looking, so that an event held right after the look wakes it.
            let arrived = self.arrived.notified();
            self.take(max, max_bytes, &mut out);
            if !out.is_empty() || Instant::now() >= deadline {
                break;
            }
            tokio::select! {
                () = arrived => {}
                () = tokio::time::sleep_until(deadline) => {}
                () = stop.cancelled() => break,
            }
        }
        if !out.is_empty() {
            metrics::counter!("raftbridge_pull_fetched_total", "subscription" => self.name.clone()).increment(out.len() as u64);
        }
        out
    }

    fn take(&self, max: usize, max_bytes: usize, out: &mut Vec<(String, Event)>) {
        let mut held = lock(&self.held);
        let mut leases = lock(&self.leases);
        // Leases whose delivery ended (its ack deadline, the node's stop): nobody waits on them.
        leases.retain(|_, tx| !tx.is_closed());
        let mut bytes = 0;
        while out.len() < max {
            let Some(h) = held.front() else { break };
            if !out.is_empty() && bytes + h.event.payload.len() > max_bytes {
                break;
            }
            let Some(h) = held.pop_front() else { break };
            // Its run gave up (the ack deadline passed while it waited): not handed out.
            if h.taken.send(()).is_err() || h.outcome.is_closed() {
                continue;
            }
            bytes += h.event.payload.len();
            let id = format!("{}-{:016x}{:016x}", self.node, fastrand::u64(..), fastrand::u64(..));
            leases.insert(id.clone(), h.outcome);
            out.push((id, h.event));
        }
    }

    /// Answers the fetched events `ids` with `verdict`. Returns the
    /// ids this node holds no lease for (unknown, answered already, or past their ack
    /// deadline: the event may go to another consumer).
    pub fn answer(&self, ids: &[String], verdict: &Verdict) -> Vec<String> {
        let mut unknown = Vec::new();
        for id in ids {
            let tx = lock(&self.leases).remove(id);
            let outcome = match verdict {
                Verdict::Ack => Ok(()),
                Verdict::Nack(reason) => Err(HandlerError::new(500, format!("nacked by the client: {reason}"))),
                Verdict::Term(reason) => Err(HandlerError::new(500, format!("terminated by the client: {reason}")).no_retry()),
            };
            if tx.is_none_or(|tx| tx.send(outcome).is_err()) {
                unknown.push(id.clone());
            }
        }
        unknown
    }

    fn drained(&self) -> HandlerError {
        HandlerError::not_served(format!("this node is stopping: it hands pull subscription {}'s events to others", self.name))
    }

    /// The node drains: every held event is handed back unfetched (no attempt; it goes to a
    /// node that is not stopping), and so is each one handed to it from now on. Fetched events
    /// stay leased until their clients answer (`PullConsumers::answered`).
    fn hand_back(&self) {
        let mut held = lock(&self.held);
        self.draining.store(true, Ordering::Release);
        // Dropping each wakes its run, which answers "not served".
        held.clear();
        drop(held);
        // No longer offered: an every-instance subscription's loop waits for the stop rather
        // than handing this node an event every pause only to be refused (two mark writes each).
        self.demand.send_if_modified(|d| std::mem::replace(d, false));
    }

    /// Leases whose client has not answered and whose delivery still waits.
    fn open_leases(&self) -> usize {
        lock(&self.leases).values().filter(|tx| !tx.is_closed()).count()
    }

    /// Whether `id` names this node's lease (`<node>-...`).
    pub fn node_of(id: &str) -> Option<u64> {
        id.split_once('-').and_then(|(n, _)| n.parse().ok())
    }

    /// A delivery: held until a fetch takes it (`HOLD` at most, then handed back unserved),
    /// then the client's answer.
    async fn deliver(&self, event: Event) -> Outcome {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let (taken_tx, taken_rx) = oneshot::channel();
        let (outcome_tx, outcome_rx) = oneshot::channel();
        {
            // Judged under the lock `hand_back` takes: an event comes in before it (and is
            // handed back by it) or is refused here, never held past it.
            let mut held = lock(&self.held);
            if self.draining.load(Ordering::Acquire) {
                return Err(self.drained());
            }
            held.push_back(Held { seq, event, taken: taken_tx, outcome: outcome_tx });
        }
        self.arrived.notify_waiters();
        let mut taken_rx = taken_rx;
        // By reference: the receiver lives until the hold is decided under the lock below, so
        // a fetch that takes the event meanwhile does not find its run gone and drop it.
        match tokio::time::timeout(HOLD, &mut taken_rx).await {
            Ok(Ok(())) => {}
            // `hand_back` dropped it unfetched.
            Ok(Err(_)) => return Err(self.drained()),
            Err(_) => {
                // Not taken in time, unless a fetch took it just now: it is in the queue or leased.
                let mut held = lock(&self.held);
                if let Some(at) = held.iter().position(|h| h.seq == seq) {
                    held.remove(at);
                    return Err(HandlerError::not_served(format!("no client fetched from pull subscription {} on this node within {} s", self.name, HOLD.as_secs())));
                }
            }
        }
        match outcome_rx.await {
            Ok(outcome) => outcome,
            // Dropped unfetched and unanswered: only `hand_back` does that (a lease is kept until
            // answered, and a run gives up only here), in the instant between this run's hold
            // running out and its look under the lock. Not an attempt.
            Err(_) => Err(self.drained()),
        }
    }
}

impl SubscriptionHandler for Arc<PullQueue> {
    fn handle(&self, _ctx: Ctx, event: Event) -> BoxFuture<Result<Option<Emit>, HandlerError>> {
        let queue = Arc::clone(self);
        Box::pin(async move { queue.deliver(event).await.map(|()| None) })
    }
}

/// This node's pull subscriptions, by name.
#[derive(Default)]
pub struct PullConsumers {
    queues: HashMap<String, Arc<PullQueue>>,
}

impl PullConsumers {
    pub fn new(names: impl IntoIterator<Item = String>, node: u64) -> PullConsumers {
        PullConsumers { queues: names.into_iter().map(|n| (n.clone(), Arc::new(PullQueue::new(n, node)))).collect() }
    }

    pub fn get(&self, name: &str) -> Option<&Arc<PullQueue>> {
        self.queues.get(name)
    }

    pub fn is_empty(&self) -> bool {
        self.queues.is_empty()
    }

    /// Answers `ids` of subscription `sub` for a client whose answer reached another node, which
    /// forwarded it here (`PeerRequest::PullAnswer`): the ids this node holds no lease for, or
    /// why it answered none.
    pub fn answer_forwarded(&self, sub: &str, ids: &[String], verdict: Verdict) -> Result<Vec<String>, String> {
        if ids.len() > MAX_FETCH {
            return Err(format!("an answer names at most {MAX_FETCH} ids, not {}", ids.len()));
        }
        let queue = self.get(sub).ok_or_else(|| format!("{NO_SUCH_PULL} {sub}"))?;
        Ok(queue.answer(ids, &verdict.bounded()))
    }

    /// The node drains: held events go back unfetched (to be handed to other nodes), and no
    /// more are held (`PullQueue::hand_back`).
    pub fn hand_back(&self) {
        for q in self.queues.values() {
            q.hand_back();
        }
    }

    /// Waits up to `grace` for the clients of every fetched event to answer (on any node: the
    /// others forward theirs, `answer_forwarded`, as long as the peer links serve). Whether
    /// they all did; what is left is cut off with the node's stop, not counted as an attempt,
    /// and delivered again.
    pub async fn answered(&self, grace: Duration) -> bool {
        let deadline = Instant::now() + grace;
        // Bounded by the deadline; leases are few (`max_in_flight` per subscription).
        loop {
            if self.queues.values().all(|q| q.open_leases() == 0) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep_until(deadline.min(Instant::now() + Duration::from_millis(50))).await;
        }
    }

    /// Per pull subscription, what this node holds now (JetStream's consumer info, per node):
    /// events waiting for a fetch, fetched ones waiting for their client's answer, and fetches
    /// waiting for events. Set when the metrics are scraped.
    pub fn export_gauges(&self) {
        for (name, q) in &self.queues {
            let held = lock(&q.held).len();
            metrics::gauge!("raftbridge_pull_held_events", "subscription" => name.clone()).set(held as f64);
            metrics::gauge!("raftbridge_pull_unanswered_events", "subscription" => name.clone()).set(q.open_leases() as f64);
            metrics::gauge!("raftbridge_pull_waiting_fetches", "subscription" => name.clone()).set(q.fetching.load(Ordering::Acquire) as f64);
        }
    }

    /// Whether a client pulls subscription `name` from this node (its service's availability).
    pub fn demanded(&self, name: &str) -> bool {
        self.queues.get(name).is_some_and(|q| *q.demand.borrow())
    }

    /// Every second until `shutdown`: a subscription no client fetched from for `DEMAND_GRACE`
    /// is no longer offered here.
    pub async fn demand_loop(self: Arc<Self>, shutdown: CancellationToken) {
        let mut tick = crate::supervise::Ticker::new(Duration::from_secs(1), &shutdown);
        while tick.next().await {
            let now = Instant::now();
            for q in self.queues.values() {
                // Judged under the watch's lock: a fetch that starts meanwhile counts itself
                // first and sets it after, so it is never turned off under a fetch.
                q.demand.send_if_modified(|d| {
                    let wanted = q.wanted(now);
                    std::mem::replace(d, wanted) != wanted
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(position: u64) -> Event {
        Event { position, body: crate::broker::new_event("e", b"{}".to_vec(), &crate::sdk::MessageMeta::default(), None, None).body }
    }

    fn pulls_term(q: &PullQueue, id: &str, reason: &str) -> Vec<String> {
        q.answer(&[id.to_string()], &Verdict::Term(reason.to_string()).bounded())
    }

    /// Hands `q` an event at each of `positions`, each in a run of its own (as the dispatcher
    /// does); returns once all are held.
    async fn deliver_each(q: &Arc<PullQueue>, positions: std::ops::RangeInclusive<u64>) -> Vec<tokio::task::JoinHandle<Outcome>> {
        let runs = positions
            .map(|p| {
                let q = q.clone();
                tokio::spawn(async move { q.deliver(event(p)).await })
            })
            .collect();
        tokio::task::yield_now().await;
        runs
    }

    /// A held event goes to the fetch, and the delivery ends with the client's answer; one no
    /// fetch takes within `HOLD` is handed back unserved (no attempt); an answer to an unknown
    /// or answered id says so.
    #[tokio::test(start_paused = true)]
    async fn a_fetched_event_is_answered_by_its_client_and_an_unfetched_one_handed_back() {
        let q = Arc::new(PullQueue::new("s".into(), 7));
        let stop = CancellationToken::new();
        let run = tokio::spawn({
            let q = q.clone();
            async move { q.deliver(event(1)).await }
        });
        let got = q.fetch(10, usize::MAX, Duration::from_secs(1), &stop).await;
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].1.position, 1);
        assert_eq!(PullQueue::node_of(&got[0].0), Some(7));
        assert!(*q.demand().borrow(), "a fetch makes demand");
        assert_eq!(q.answer(&[got[0].0.clone(), "7-nope".into()], &Verdict::Ack), vec!["7-nope".to_string()]);
        assert_eq!(run.await.unwrap(), Ok(()));
        assert_eq!(q.answer(&[got[0].0.clone()], &Verdict::Ack), vec![got[0].0.clone()], "answered once");

        // A nack fails the delivery with the client's reason.
        let run = tokio::spawn({
            let q = q.clone();
            async move { q.deliver(event(2)).await }
        });
        let got = q.fetch(10, usize::MAX, Duration::from_secs(1), &stop).await;
        assert!(q.answer(&[got[0].0.clone()], &Verdict::Nack("bad input".into())).is_empty());
        let e = run.await.unwrap().unwrap_err();
        assert!(e.message.contains("bad input") && !e.is_not_served(), "{e:?}");
        assert!(!e.is_no_retry(), "a nack is retried");

        // A term fails it for good, its reason cut to the bound.
        let run = tokio::spawn({
            let q = q.clone();
            async move { q.deliver(event(3)).await }
        });
        let got = q.fetch(10, usize::MAX, Duration::from_secs(1), &stop).await;
        let long = "x".repeat(MAX_NACK_REASON + 10);
        assert!(pulls_term(&q, &got[0].0, &long).is_empty());
        let e = run.await.unwrap().unwrap_err();
        assert!(e.is_no_retry() && e.message.contains("terminated by the client") && e.message.len() < MAX_NACK_REASON + 40, "{e:?}");

        // Nobody fetches: handed back, not an attempt.
        let e = q.deliver(event(3)).await.unwrap_err();
        assert!(e.is_not_served(), "{e:?}");
        assert!(lock(&q.held).is_empty());
        // A fetch with nothing held waits its time, then answers empty.
        let started = Instant::now();
        assert!(q.fetch(10, usize::MAX, Duration::from_secs(2), &stop).await.is_empty());
        assert!(started.elapsed() >= Duration::from_secs(2));
    }

    /// A fetch that is dropped while it waits (its client went away) stops counting as one; a
    /// fetch takes events up to its byte bound (at least one) and leaves the rest held; a fetch
    /// after a quiet spell waits at least `COLD_WAIT`.
    #[tokio::test(start_paused = true)]
    async fn a_dropped_fetch_ends_its_demand_and_a_fetch_is_bounded_in_bytes() {
        let q = Arc::new(PullQueue::new("s".into(), 1));
        let stop = CancellationToken::new();
        let started = Instant::now();
        assert!(q.fetch(1, usize::MAX, Duration::ZERO, &stop).await.is_empty());
        assert!(started.elapsed() >= COLD_WAIT, "a cold fetch waits for the registration");
        let dropped = tokio::time::timeout(Duration::from_secs(1), q.fetch(1, usize::MAX, Duration::from_secs(60), &stop)).await;
        assert!(dropped.is_err());
        assert_eq!(q.fetching.load(Ordering::Acquire), 0, "the dropped fetch no longer counts");
        tokio::time::sleep(DEMAND_GRACE).await;
        assert!(!q.wanted(Instant::now()));

        let runs = deliver_each(&q, 1..=3).await;
        // Each payload is 2 bytes (`{}`): a bound of 3 takes one, then the next fetch the rest.
        let first = q.fetch(10, 3, Duration::from_secs(1), &stop).await;
        assert_eq!(first.len(), 1);
        let rest = q.fetch(10, usize::MAX, Duration::from_secs(1), &stop).await;
        assert_eq!(rest.iter().map(|(_, e)| e.position).collect::<Vec<_>>(), [2, 3]);
        let ids: Vec<String> = first.iter().chain(&rest).map(|(id, _)| id.clone()).collect();
        assert!(q.answer(&ids, &Verdict::Ack).is_empty());
        for run in runs {
            assert_eq!(run.await.unwrap(), Ok(()));
        }
    }

    /// `[pull]` declares one service's subscriptions with a queue each, defaults as documented;
    /// a sidecar-only setting, a bad name or filter, and a name twice are refused.
    #[test]
    fn the_pull_section_declares_its_subscriptions() {
        let cfg: PullConfig = toml::from_str("[[subscriptions]]\nname = \"jobs\"\nevent_name = \"jobQueued\"\nshared = false\n").unwrap();
        let (parts, consumers) = cfg.parts(3).unwrap();
        assert_eq!(parts.len(), 1, "a service per subscription");
        let parts = &parts[0];
        assert_eq!((parts.decl.name.as_str(), parts.decl.version), ("pull", 1));
        let decl = &parts.decl.subscriptions[0];
        assert_eq!((decl.name.as_str(), decl.filter.event_name.as_deref(), decl.shared, decl.durable), ("jobs", Some("jobQueued"), false, true));
        assert_eq!((decl.ack_deadline_ms, decl.max_attempts, decl.max_in_flight), (ACK_DEADLINE_MS, 5, 64));
        assert!(consumers.get("jobs").is_some() && parts.subscribers.contains_key("jobs"));
        for bad in [
            "[[subscriptions]]\nname = \"j\"\npath = \"/x\"\n",
            "[[subscriptions]]\nname = \"j\"\nemit_event = \"x\"\n",
            "[[subscriptions]]\nname = \"j\"\nservice = \"x\"\n",
            "[[subscriptions]]\nname = \"j k\"\n",
            "[[subscriptions]]\nname = \"j\"\nevent_name = \"\"\n",
            "[[subscriptions]]\nname = \"j\"\n[[subscriptions]]\nname = \"j\"\n",
            "service = \"a b\"\n[[subscriptions]]\nname = \"j\"\n",
            "[[subscriptions]]\nname = \"j\"\nack_deadline_ms = 9999\n",
        ] {
            let cfg: PullConfig = toml::from_str(bad).unwrap();
            assert!(cfg.parts(1).is_err(), "{bad}");
        }
        assert!(toml::from_str::<PullConfig>("[[subscriptions]]\nname = \"j\"\nport = 1\n").is_err(), "unknown settings");
    }

    /// Demand lasts `DEMAND_GRACE` after the last fetch.
    #[tokio::test(start_paused = true)]
    async fn demand_ends_a_while_after_the_last_fetch() {
        let pulls = Arc::new(PullConsumers::new(["s".to_string()], 1));
        let stop = CancellationToken::new();
        tokio::spawn(pulls.clone().demand_loop(stop.clone()));
        assert!(!pulls.demanded("s"));
        let q = pulls.get("s").unwrap().clone();
        q.fetch(1, usize::MAX, Duration::ZERO, &stop).await;
        assert!(pulls.demanded("s"));
        tokio::time::sleep(DEMAND_GRACE - Duration::from_secs(2)).await;
        assert!(pulls.demanded("s"));
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert!(!pulls.demanded("s"), "no fetch for longer than the grace");
        stop.cancel();
    }

    /// At the drain: a held event goes back at once (not served: no attempt), so does one
    /// handed to the node after; a fetched one stays leased until its client answers, here or
    /// forwarded from another node (`answer_forwarded`), which `answered` waits for up to its
    /// grace; one nobody answers leaves `answered` false at the grace's end.
    #[tokio::test(start_paused = true)]
    async fn a_drain_hands_back_what_is_held_and_waits_for_fetched_events_answers() {
        let pulls = Arc::new(PullConsumers::new(["s".to_string()], 4));
        let q = pulls.get("s").unwrap().clone();
        let stop = CancellationToken::new();
        let runs = deliver_each(&q, 1..=3).await;
        let fetched = q.fetch(2, usize::MAX, Duration::from_secs(1), &stop).await;
        assert_eq!(fetched.len(), 2);
        let started = Instant::now();
        pulls.hand_back();
        let mut runs = runs.into_iter();
        let (first, second, held) = (runs.next().unwrap(), runs.next().unwrap(), runs.next().unwrap());
        let e = held.await.unwrap().unwrap_err();
        assert!(e.is_not_served() && started.elapsed() < HOLD, "handed back at once: {e:?}");
        let e = q.deliver(event(4)).await.unwrap_err();
        assert!(e.is_not_served(), "nothing held while draining: {e:?}");
        assert!(!pulls.demanded("s"), "not offered while draining");
        assert!(q.fetch(1, usize::MAX, Duration::from_millis(10), &stop).await.is_empty());
        assert!(!pulls.demanded("s") && !q.wanted(Instant::now()), "a fetch during the drain does not offer it again");

        let waiting = tokio::spawn({
            let pulls = pulls.clone();
            async move { pulls.answered(Duration::from_secs(10)).await }
        });
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(!waiting.is_finished(), "two leases open");
        assert_eq!(pulls.answer_forwarded("s", std::slice::from_ref(&fetched[0].0), Verdict::Ack), Ok(Vec::new()));
        assert_eq!(first.await.unwrap(), Ok(()));
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!waiting.is_finished(), "one lease open");
        assert!(q.answer(std::slice::from_ref(&fetched[1].0), &Verdict::Nack("no".into())).is_empty());
        assert!(waiting.await.unwrap(), "every fetched event answered");
        assert!(second.await.unwrap().is_err());

        // A lease nobody answers: `answered` gives up at its grace.
        assert!(pulls.answer_forwarded("x", &[], Verdict::Ack).is_err(), "no such subscription");
        let pulls = Arc::new(PullConsumers::new(["s".to_string()], 4));
        let q = pulls.get("s").unwrap().clone();
        let run = tokio::spawn({
            let q = q.clone();
            async move { q.deliver(event(5)).await }
        });
        assert_eq!(q.fetch(1, usize::MAX, Duration::from_secs(1), &stop).await.len(), 1);
        pulls.hand_back();
        let started = Instant::now();
        assert!(!pulls.answered(Duration::from_secs(3)).await);
        assert!(started.elapsed() >= Duration::from_secs(3));
        run.abort();
    }
}

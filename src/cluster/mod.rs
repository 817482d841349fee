//! Cluster: bootstrap from a seed list, join, membership changes, and the peer address book.
//!
//! Why it is built this way:
//! - *Bootstrap exactly once.* With `--bootstrap-expect N`, a node that is not in a cluster probes
//!   the seeds. If any seed is already in a cluster, it joins through it. Otherwise, once N
//!   uninitialized nodes (itself included) answer, only the one with the lowest id among them
//!   calls `initialize` with all of them as voters. Every node sees the same lowest id among the
//!   same seeds, so nodes started together or one by one form one cluster; a node that already
//!   has Raft state (a restart) never bootstraps again.
//! - *One membership change at a time.* Join and remove requests are queued to one task that acts
//!   only on the leader and runs each change to completion before the next (concurrent
//!   `change_membership` calls could otherwise interleave joint configurations). The same task
//!   promotes caught-up learners to voters while voters < `--max-voters`.
//! - *Seeds are only a way in.* Join requests reaching a follower are forwarded to the leader.
//!   A new node whose build lacks a log feature every member announces is refused: it could not
//!   decode what it would be sent (`reads_the_log`).
//! - *The leader leaves by handing over.* Removing the leader first transfers its leadership,
//!   and the new leader removes it (Consul's `leave`): a leader that removed itself would step
//!   down with nobody named, and every write would wait for an election timeout.
//! - *A voter that lost its data is a learner until it has it back.* A node whose data directory
//!   was lost comes back under its id with an empty log and no memory of its votes; as a voter
//!   it could elect a leader that lacks entries it had helped commit. The leader notices from the
//!   follower's answers (`raft::network::Reversions`), makes it a learner, and promotes it only
//!   once it holds again everything it had acknowledged.

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::time::Duration;
use std::time::Instant;

use tokio::sync::mpsc;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tracing::debug;
use tracing::info;
use tracing::warn;

use crate::peer::PeerError;
use crate::peer::message::NodeStatus;
use crate::peer::message::PeerRequest;
use crate::peer::message::PeerResponse;
use crate::peer::message::RemoteError;
use crate::raft::Replica;
use crate::raft::log_store::Founding;
use crate::raft::log_store::LogStore;
use crate::raft::network::Outsider;
use crate::raft::network::Reversions;
use crate::raft::types::*;

/// How far behind the leader's last log a learner may be and still be promoted.
const PROMOTE_LAG: u64 = 64;
const CHANGE_TIMEOUT: Duration = Duration::from_secs(10);
/// Rounds a second apart in which a member that restarted at a new address asks to be moved
/// there (`announce_address`).
const ADDRESS_ROUNDS: u32 = 60;
const QUEUE: usize = 64;
/// A voter heard from within this long answers (`keeps_up`): several of the leader's heartbeats
/// and the links' pings arrive in it.
const RESPONSIVE: Duration = Duration::from_millis(1500);
/// Features whose entries builds without them cannot decode (`features` says which command
/// or update each one brings); the rest are link messages, which a node sends only to peers
/// that announced them.
/// A feature that gates any log command or snapshot content is one of these, whatever link
/// message it gates too (`APP_HEADERS`: `InvokeWith` on the links, `IdemCompleteWith` in the log).
const LOG_FEATURES: u64 = {
    use crate::peer::frame::features::*;
    DROP_SUBSCRIPTION | IDEM_FINGERPRINT | HELD_CLAIMS | APP_HEADERS | SUB_REBASE | FORGET_NODES | FAILED_AT | KEY_TTL | TAGGED | TXN | REJECTED | SUB_SEEK | EXPIRE_DUE
};
/// How often a refused join, which its joiner asks again every round, is warned of (on the
/// leader and on the joiner); the rest at debug. Process-wide, as the log is.
const REFUSAL_WARN_EVERY: Duration = Duration::from_secs(10);
static JOIN_REFUSED_WARNED: std::sync::Mutex<Option<Instant>> = std::sync::Mutex::new(None);
/// How often a leader that hands over asks its chosen voter again (`hand_over_leadership`).
const HANDOVER_ASK_EVERY: Duration = Duration::from_millis(300);
/// How much longer a node that forwards a membership change waits than the leader waits for
/// its membership task, so that the leader's own answer (a timeout that says the change may
/// still be applied) comes back rather than a bare peer timeout.
const FORWARD_MARGIN: Duration = Duration::from_secs(5);

/// A new cluster id (`Cluster::name_cluster`, `raftbridge snapshot restore`): 128 random bits,
/// so that no two clusters, nor a restored cluster and the one it was saved from, share one.
pub fn new_cluster_id() -> u128 {
    let mut bytes = [0u8; 16];
    if getrandom::fill(&mut bytes).is_err() {
        // The OS source failing is near impossible; a fast PRNG's id still differs per cluster.
        return fastrand::u128(..);
    }
    u128::from_le_bytes(bytes)
}

/// Whether node `id` was heard from within `RESPONSIVE`: alive, not only linked (a stopped or
/// hung process keeps its link up, silent, until the idle timeout). The rule for promoting,
/// for finishing a change left half done and for handing leadership over at a drain.
pub fn responsive(net: &crate::peer::PeerNet, id: NodeId) -> bool {
    net.heard_ago(id).is_some_and(|ago| ago <= RESPONSIVE)
}

/// How a leader's hand-over went (`hand_over_leadership`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandOver {
    /// This node does not lead.
    NotLeader,
    /// No other voter was heard from lately: nothing was asked of anyone.
    NoVoter,
    /// Another node leads now.
    Moved(NodeId),
    /// Asked, and no other leader seen within the wait (or this node was elected again
    /// meanwhile). openraft's leader proposes nothing more once it has begun a transfer
    /// (membership changes included) and sends no heartbeats, until its vote changes: another
    /// node's election, which its followers' timers start, or its own re-election.
    Pending,
}

/// If this node leads, asks the most up-to-date voter heard from lately to take over, and waits
/// up to `wait` to see another leader: a graceful stop, and the removal of the leader, hand
/// over first, so that writes move on at once instead of after an election timeout. The voter
/// takes over only once its log reaches the leader's last entry at the request (it waits an
/// election timeout for that, then ignores the request), which under load it may not yet; the
/// leader proposes nothing new after the first ask, so the ask is repeated every
/// `HANDOVER_ASK_EVERY` for the whole wait.
pub async fn hand_over_leadership(replica: &Replica, wait: Duration) -> HandOver {
    let m = replica.metrics();
    // By state: a leader that removed itself stepped down and still names itself.
    if m.state != openraft::ServerState::Leader {
        return HandOver::NotLeader;
    }
    let term = m.current_term;
    let matched = m.replication.clone().unwrap_or_default();
    let best = m
        .membership_config
        .membership()
        .voter_ids()
        // Heard from lately, not only linked: a hung voter's link stays up for a while, and a
        // transfer to it would leave the cluster without a leader when this node stops.
        .filter(|id| *id != m.id && responsive(&replica.net, *id))
        .max_by_key(|id| matched.get(id).and_then(|l| l.as_ref()).map(|l| l.index));
    let Some(best) = best else { return HandOver::NoVoter };
    info!(to = best, "transferring leadership");
    let deadline = Instant::now() + wait;
    // Bounded by the deadline: one ask per `HANDOVER_ASK_EVERY`.
    loop {
        // Not asked in a later term: elected again meanwhile, this node would stop leading
        // for nothing (its transfer begun anew) until the others' election timeout.
        let now = replica.metrics();
        if now.current_term > term {
            return moved_or_pending(&now);
        }
        if let Err(e) = replica.raft.trigger().transfer_leader(best).await {
            warn!(cause = %e, "leader transfer failed");
            return HandOver::Pending;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let moved = replica
            .raft
            .wait(Some(left.min(HANDOVER_ASK_EVERY)))
            .metrics(
                |m| {
                    (m.current_leader.is_some() && m.current_leader != Some(m.id))
                        || (m.state == openraft::ServerState::Leader && m.current_term > term)
                },
                "leader moved",
            )
            .await;
        if let Ok(m) = moved {
            return moved_or_pending(&m);
        }
        if Instant::now() >= deadline {
            warn!(to = best, "no other leader within the hand-over's wait");
            return HandOver::Pending;
        }
    }
}

/// `Moved` to the leader `m` names when that is another node, else `Pending`.
fn moved_or_pending(m: &crate::raft::types::RaftMetrics) -> HandOver {
    match m.current_leader {
        Some(l) if l != m.id => HandOver::Moved(l),
        _ => HandOver::Pending,
    }
}

/// Whether more than half of `voters` were heard from (`heard`, this node's own id included
/// when it votes): the side of a partition that can elect and commit. A follower that hears
/// only its leader and a minority is cut off with it, whatever that leader's heartbeats say.
fn hears_quorum(voters: impl Iterator<Item = NodeId>, mut heard: impl FnMut(NodeId) -> bool) -> bool {
    let (mut total, mut ok) = (0usize, 0usize);
    for v in voters {
        total += 1;
        ok += usize::from(heard(v));
    }
    ok * 2 > total
}
/// A voter whose log is within this many entries of the leader's keeps up (`keeps_up`): under
/// load a healthy follower is a few entries in flight behind; one receiving a snapshot or a long
/// backlog is thousands. The same bound holds for the entries a node has still to apply before
/// it is ready (`ready`).
pub const KEEP_UP_LAG: u64 = 1024;

/// Committed entries (up to `committed`, the cluster's commit index as the leader reported
/// it, whether this node has them yet or not) not applied yet (`applied`).
fn apply_backlog(committed: Option<u64>, applied: Option<u64>) -> u64 {
    committed.unwrap_or(0).saturating_sub(applied.unwrap_or(0))
}

/// How long a node stays over `KEEP_UP_LAG` committed entries behind before it is not ready.
const BEHIND_MS: u64 = 1_000;

/// Whether a `backlog` of committed entries to apply over `KEEP_UP_LAG` has lasted `BEHIND_MS`
/// by `now` (ms, never 0), noting in `since` (0: not behind) when it began.
/// A node that was not ready before (`ready_before` false) is behind with any such backlog, at
/// once: the wait is for a ready node that one large commit set back, not for a restarted one
/// replaying its log, whose first check said it was ready and let a rolling update move on.
fn stays_behind(since: &AtomicU64, backlog: u64, now: u64, ready_before: bool) -> bool {
    if backlog <= KEEP_UP_LAG {
        // Read first: `ready` runs per request, and a store on every call would bounce the
        // cache line between threads for nothing.
        if since.load(Ordering::Relaxed) != 0 {
            since.store(0, Ordering::Relaxed);
        }
        return false;
    }
    let began = match since.load(Ordering::Relaxed) {
        0 => {
            since.store(now, Ordering::Relaxed);
            now
        }
        at => at,
    };
    !ready_before || now.saturating_sub(began) >= BEHIND_MS
}

/// What `Cluster::judge` found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Judged {
    Ready,
    /// No leader, or not in touch with it (or with a majority): an election may be under way.
    Leaderless,
    /// Not a member, leaving, removed, behind, or its Raft core stopped.
    Unready,
}

/// How long the leader asks a member's old address whether it still runs there before moving
/// the member to a new address (`apply_join`).
const ADDRESS_PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the bootstrapping node waits for each founder to mark its log (`mark_founders`).
const FOUND_TIMEOUT: Duration = Duration::from_secs(2);
/// A membership request that arrives on a peer link ([`Cluster::admits`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Membership {
    Join,
    Remove,
}

/// How long one bootstrap round waits for a seed's DNS answer.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, Clone)]
pub struct ClusterSettings {
    pub seeds: Vec<String>,
    pub bootstrap_expect: usize,
    pub max_voters: usize,
}

/// What `apply_remove` did.
enum Removal {
    /// The node is out (or was not in).
    Done,
    /// The node to remove is this leader, which handed its leadership to `0`: that one is to
    /// be asked.
    HandedOver(NodeId),
}

/// A membership change queued for the membership task, with where its caller waits.
enum Change {
    Join { id: NodeId, addr: String, reply: oneshot::Sender<Result<(), RemoteError>> },
    Remove { id: NodeId, reply: oneshot::Sender<Result<(), RemoteError>> },
}

impl Change {
    /// Its caller no longer waits for the answer.
    fn abandoned(&self) -> bool {
        match self {
            Change::Join { reply, .. } | Change::Remove { reply, .. } => reply.is_closed(),
        }
    }
}

impl std::fmt::Debug for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Change::Join { id, addr, .. } => write!(f, "join of node {id} at {addr}"),
            Change::Remove { id, .. } => write!(f, "removal of node {id}"),
        }
    }
}

#[derive(Clone)]
pub struct Cluster {
    replica: Replica,
    settings: Arc<ClusterSettings>,
    /// Feeds the membership task; the task ends when every `Cluster` clone is dropped or on shutdown.
    changes: mpsc::Sender<Change>,
    /// When [`Cluster::ready`] was last seen true, in ms after `since` (0: never); see `serving`.
    last_ready_ms: Arc<AtomicU64>,
    since: Instant,
    /// Followers whose log went back, as this node's replication saw them (when it leads).
    reversions: Arc<Reversions>,
    /// Whether a member refused this node's vote as no member's (set by the vote calls, taken
    /// by the membership task).
    outsider: Arc<Outsider>,
    /// Set by the membership task once this node knows it was removed while it ran (more than
    /// half of the other voters it knows said so: `note_outsider`): it no longer campaigns and
    /// is not ready. Cleared if its view of the membership moves (it is sent the log again).
    removed: Arc<AtomicBool>,
    /// The node whose `AppendEntries` (a heartbeat or entries) arrived last, and when, in ms
    /// after `since` + 1 (0: none yet); written by the peer handler (`note_append`) as each
    /// arrives, read by `ready`.
    append_from: Arc<AtomicU64>,
    append_ms: Arc<AtomicU64>,
    /// `hears_majority`'s last judgement: when (ms after `since` + 1), for which membership
    /// (its log id), and what. Locked only to read or replace it.
    quorum_heard: Arc<std::sync::Mutex<Option<QuorumHeard>>>,
    /// Since when (ms after `since` + 1; 0: it is not) this node has had more than
    /// `KEEP_UP_LAG` committed entries left to apply; written and read by `ready`.
    behind_ms: Arc<AtomicU64>,
    /// Set by `ready` the first time it is true in this process.
    ready_once: Arc<AtomicBool>,
    /// Whether this node, a member once in this process, is none now: written by the
    /// membership task's tick, read by `takes_no_work`.
    left: Arc<AtomicBool>,
    /// Set once this process saw itself in its membership (the membership task's tick): a
    /// node that no longer is one was removed while it ran (`was_member`).
    was_member: Arc<AtomicBool>,
    /// This node's Raft log: its bootstrap claims it (`LogStore::claim_founding`) before it
    /// initializes a cluster.
    log: LogStore,
    /// Set by the peer handler once a Raft request (a vote, an append) arrived: a cluster
    /// counts this node as a member (its data dir was lost, say), and its bootstrap claims
    /// nothing then, but waits to be sent that cluster's log.
    raft_seen: Arc<AtomicBool>,
}

/// `hears_majority`'s judgement: when, for which membership, and what.
type QuorumHeard = (u64, Option<LogId>, bool);

/// How long `hears_majority`'s judgement stands (a link's silence is judged in seconds).
const QUORUM_RECHECK_MS: u64 = 100;


/// How long a node that was ready keeps running commands and deliveries while it knows no
/// leader: an election (a leader hand-over during a rolling restart, a leader crash) takes
/// 0.3–1.2 s with the default timeouts, and a command that needs no leader must not fail then.
const LEADERLESS_GRACE: Duration = Duration::from_secs(3);

impl Cluster {
    /// Start the membership task, the address-book watcher and the bootstrap/join loop.
    pub fn start(
        replica: Replica,
        settings: ClusterSettings,
        reversions: Arc<Reversions>,
        outsider: Arc<Outsider>,
        log: LogStore,
        raft_seen: Arc<AtomicBool>,
        shutdown: CancellationToken,
    ) -> Cluster {
        let (tx, rx) = mpsc::channel(QUEUE);
        let last_ready_ms = Arc::new(AtomicU64::new(0));
        let cluster = Cluster {
            replica,
            settings: Arc::new(settings),
            changes: tx,
            last_ready_ms,
            since: Instant::now(),
            reversions,
            outsider,
            removed: Arc::new(AtomicBool::new(false)),
            append_from: Arc::new(AtomicU64::new(0)),
            append_ms: Arc::new(AtomicU64::new(0)),
            quorum_heard: Arc::new(std::sync::Mutex::new(None)),
            behind_ms: Arc::new(AtomicU64::new(0)),
            ready_once: Arc::new(AtomicBool::new(false)),
            left: Arc::new(AtomicBool::new(false)),
            was_member: Arc::new(AtomicBool::new(false)),
            log,
            raft_seen,
        };
        crate::supervise::spawn_until("membership", &shutdown, cluster.clone().membership_task(rx, shutdown.clone()));
        crate::supervise::spawn_until("address book", &shutdown, cluster.clone().address_book(shutdown.clone()));
        let (joining, stop) = (cluster.clone(), shutdown.clone());
        crate::supervise::spawn("bootstrap or join", async move {
            // Ended at the node's stop also in the middle of a round (its requests to seeds took
            // up to 20 s): each is a question to a peer or to the Raft core, which goes on alone.
            tokio::select! {
                () = stop.cancelled() => {}
                () = joining.bootstrap_or_join(shutdown) => {}
            }
        });
        cluster
    }

    pub fn status(&self) -> NodeStatus {
        let m = self.replica.metrics();
        let initialized = m.membership_config.membership().nodes().next().is_some();
        NodeStatus {
            node_id: self.replica.id(),
            addr: self.replica.net.advertise().to_string(),
            initialized,
            leader: m.current_leader,
            term: m.current_term,
        }
    }

    /// Notes that an `AppendEntries` from `from` arrived (the peer handler, as each arrives).
    pub fn note_append(&self, from: NodeId) {
        self.append_from.store(from, Ordering::Relaxed);
        self.append_ms.store(self.since.elapsed().as_millis() as u64 + 1, Ordering::Relaxed);
    }

    /// True when this node is a member of a cluster that has a leader, it is in touch with that
    /// leader, and its Raft core runs (a stopped core's last metrics still name a leader).
    ///
    /// In touch: a follower had an append or heartbeat from the leader and heard from a
    /// majority of the voters (itself included), a leader the acknowledgement of a quorum,
    /// within the peer links' idle timeout (`max(4 × election
    /// timeout, 2 s)`: a leader heartbeats every `--heartbeat-ms`, at most half an election
    /// timeout). A node that has not heard for that long has lost its leader or been cut off from
    /// a majority, and openraft's metrics still name the leader then (a follower's failed
    /// pre-votes change no vote, a leader in a minority never steps down, a removed node never
    /// learns it was removed): `/readyz` must not say it serves.
    pub fn ready(&self) -> bool {
        self.judge() == Judged::Ready
    }

    /// `ready`, and when not, whether only the leader is missing or out of touch (an election
    /// under way: `serving`'s grace), or more (not a member, leaving, removed, behind, a
    /// stopped core), which no grace covers.
    fn judge(&self) -> Judged {
        // Called per proxied request: borrow the metrics instead of cloning them.
        let rx = self.replica.raft.metrics();
        let m = rx.borrow_watched();
        let me = self.replica.id();
        let membership = m.membership_config.membership();
        // A change under way that leaves this voter out of the new voters (its removal, or a
        // demotion) does not say it serves: a removed node never sees the change end. (Learners
        // are in no half: a change of voters leaves them as they are.)
        let joint = membership.get_joint_config();
        let leaving = joint.len() > 1 && joint.iter().any(|c| c.contains(&me)) && joint.last().is_some_and(|new| !new.contains(&me));
        let member = membership.get_node(&me).is_some() && !leaving && !self.removed.load(Ordering::Relaxed);
        if !member || m.running_state.is_err() {
            return Judged::Unready;
        }
        let Some(leader) = m.current_leader else { return Judged::Leaderless };
        let in_touch_for = self.replica.net.idle_timeout();
        let in_touch = if leader == me {
            // A lone voter is its own quorum.
            membership.voter_ids().all(|v| v == me)
                || m.last_quorum_acked.as_ref().is_some_and(|acked| openraft::Instant::elapsed(&**acked) <= in_touch_for)
        } else {
            let at = self.append_ms.load(Ordering::Relaxed);
            let now = self.since.elapsed().as_millis() as u64 + 1;
            self.append_from.load(Ordering::Relaxed) == leader
                && at != 0
                && now.saturating_sub(at) <= in_touch_for.as_millis() as u64
                // A leader cut off in a minority keeps heartbeating the followers on its side:
                // their own majority of voters, heard lately, tells them apart.
                && self.hears_majority(membership.get_joint_config(), *m.membership_config.log_id(), in_touch_for, now)
        };
        if !in_touch {
            return Judged::Leaderless;
        }
        // Far behind in applying what the cluster committed (a follower that fell behind) for
        // `BEHIND_MS`: reads would wait and commands run on old state, so it does not say it
        // serves (one large commit does not count). A node never ready in this process (a
        // restart replaying its log, a joiner taking a snapshot) is not until it caught up.
        let backlog = apply_backlog(m.cluster_committed.as_ref().map(|l| l.index), m.last_applied.as_ref().map(|l| l.index));
        let now = self.since.elapsed().as_millis() as u64 + 1;
        let ready_before = self.ready_once.load(Ordering::Relaxed);
        if stays_behind(&self.behind_ms, backlog, now, ready_before) {
            return Judged::Unready;
        }
        if !ready_before {
            self.ready_once.store(true, Ordering::Relaxed);
        }
        Judged::Ready
    }

    /// How many committed entries this node has still to apply.
    pub fn apply_backlog(&self) -> u64 {
        let rx = self.replica.raft.metrics();
        let m = rx.borrow_watched();
        apply_backlog(m.cluster_committed.as_ref().map(|l| l.index), m.last_applied.as_ref().map(|l| l.index))
    }

    /// Whether this node heard lately from a majority of each voter configuration (both halves
    /// of a joint one, as a commit needs). Judged at most every `QUORUM_RECHECK_MS` (`ready` runs
    /// per request, and each judgement locks the links once per voter); `now` in ms after
    /// `since` + 1.
    fn hears_majority(&self, configs: &[std::collections::BTreeSet<NodeId>], membership: Option<LogId>, in_touch_for: Duration, now: u64) -> bool {
        let mut cached = crate::lock(&self.quorum_heard);
        if let Some((at, of, ok)) = *cached {
            // Judged lately, for this membership.
            if of == membership && now.saturating_sub(at) < QUORUM_RECHECK_MS {
                return ok;
            }
        }
        let heard = |v: NodeId| self.replica.net.heard_ago(v).is_some_and(|ago| ago <= in_touch_for);
        let ok = !configs.is_empty() && configs.iter().all(|voters| hears_quorum(voters.iter().copied(), heard));
        *cached = Some((now, membership, ok));
        ok
    }

    /// True when this node may run commands and take deliveries: [`Cluster::ready`] now, or
    /// within the last [`LEADERLESS_GRACE`] (an election in progress). Readiness probes keep
    /// using `ready`; routing uses this, so that a leader hand-over fails no request.
    pub fn serving(&self) -> bool {
        // +1: 0 means "never ready".
        let now_ms = self.since.elapsed().as_millis() as u64 + 1;
        let last = self.last_ready_ms.load(Ordering::Relaxed);
        let judged = self.judge();
        if judged == Judged::Ready {
            // Called per request: write the shared stamp only when it is 100 ms old.
            if now_ms.saturating_sub(last) >= 100 {
                self.last_ready_ms.store(now_ms, Ordering::Relaxed);
            }
            return true;
        }
        // Only an election is waited out: a node removed, leaving or behind stops at once.
        judged == Judged::Leaderless && last != 0 && now_ms.saturating_sub(last) < LEADERLESS_GRACE.as_millis() as u64
    }

    /// Whether a membership request that arrived on a peer link from `from` may be acted on:
    /// one from a member (which passes on what its clients and joiners asked), or a node outside
    /// the cluster asking to join or leave as itself. Refused: a node outside the cluster asking
    /// to remove another node, or to join (add, or move to a new address) under another node's id. With peer
    /// certificates bound to node ids (`--peer-tls-require-node-id`), `from` is proven, so a
    /// holder of a valid certificate that is not a member cannot move or remove a member.
    pub fn admits(&self, from: NodeId, target: NodeId, what: Membership) -> Result<(), RemoteError> {
        // A node may always ask to join, or to leave, as itself: a node removed while it runs
        // never learns it (no leader replicates to it any more), and its `leave` repeated, or
        // sent after an answer that was lost, asks to remove what is gone (a no-op, 200).
        if target == from {
            return Ok(());
        }
        if self.is_member(from) {
            return Ok(());
        }
        let what = match what {
            Membership::Join => "join",
            Membership::Remove => "remove",
        };
        metrics::counter!("raftbridge_peer_membership_refused_total", "request" => what).increment(1);
        warn!(from, target, request = what, "refused a membership request from a node outside the cluster");
        Err(RemoteError::Invalid(format!(
            "node {from} is not a member: it may only ask to join as itself, not {what} node {target}"
        )))
    }

    pub fn id(&self) -> NodeId {
        self.replica.id()
    }

    /// Whether `id`, a candidate whose log ends at `its_last`, is outside this node's membership
    /// while this node is in it and no change is half done, and its log is behind the entry of
    /// that membership: a node removed while it ran, which never received the entry that
    /// dropped it (`node::refuse_outsider`). A candidate whose log reaches that entry knows
    /// more than this node (a member that lags behind the entry that added it): not refused.
    pub fn is_outsider(&self, id: NodeId, its_last: Option<&LogId>) -> bool {
        let rx = self.replica.raft.metrics();
        let m = rx.borrow_watched();
        let membership = m.membership_config.membership();
        membership.get_joint_config().len() == 1
            && membership.get_node(&self.replica.id()).is_some()
            && membership.get_node(&id).is_none()
            && its_last < m.membership_config.log_id().as_ref()
    }

    /// Whether this node knows it was removed while it ran (`removed`).
    pub fn is_removed(&self) -> bool {
        self.removed.load(Ordering::Relaxed)
    }

    /// The membership task's tick: members told this node that it is no member (`Outsider`).
    /// `told` gathers who said so under this node's view of the membership (its log id), and is
    /// believed once more than half of the other voters of that view's newest configuration
    /// with this node in it did. That view was committed with a majority of its voters holding
    /// it, so fewer than that may lag behind it (at an older membership without this node, if
    /// it joined since); more than half of the others refusing means they hold a newer
    /// membership without it.
    /// Then its elections stop (`elect(false)`), until its view of the membership moves (a
    /// leader sends it the log again; a removed node's machine is brought back by starting a
    /// node there with an empty data dir and a new id, which joins anew).
    fn note_outsider(&self, told: &mut (Option<LogId>, BTreeSet<NodeId>)) {
        let me = self.replica.id();
        let (view, others) = {
            let rx = self.replica.raft.metrics();
            let m = rx.borrow_watched();
            let membership = m.membership_config.membership();
            // The newest configuration that has this node as a voter (the older half of a
            // change that removes it, which it may have seen begin).
            let mine = membership.get_joint_config().iter().rev().find(|c| c.contains(&me));
            let others: BTreeSet<NodeId> = mine.map(|c| c.iter().copied().filter(|&v| v != me).collect()).unwrap_or_default();
            (*m.membership_config.log_id(), others)
        };
        // Taken first: what was said under an older view is not counted under the new one.
        let said = self.outsider.take();
        if told.0 != view {
            *told = (view, BTreeSet::new());
            if self.removed.swap(false, Ordering::Relaxed) {
                self.replica.raft.runtime_config().elect(true);
                metrics::gauge!("raftbridge_node_removed").set(0.0);
                info!("this node's membership moved on: it campaigns again as its membership says");
            }
        } else {
            told.1.extend(said.into_iter().filter(|id| others.contains(id)));
        }
        if !others.is_empty() && told.1.len() * 2 > others.len() && !self.removed.swap(true, Ordering::Relaxed) {
            self.replica.raft.runtime_config().elect(false);
            metrics::gauge!("raftbridge_node_removed").set(1.0);
            warn!(told_by = ?told.1, "this node was removed from the cluster while it ran: it stops campaigning and takes no work; \
                stop it (to bring the machine back, start a node with an empty data dir and a new --id)");
        }
    }

    /// Whether `id` is in this node's view of the membership (voter or learner). Routing and
    /// delivery ask it too: a node removed while it runs keeps its registrations and may link
    /// to its old peers again, but takes no work.
    pub fn is_member(&self, id: NodeId) -> bool {
        let rx = self.replica.raft.metrics();
        let m = rx.borrow_watched();
        m.membership_config.membership().get_node(&id).is_some()
    }

    /// Whether this node was removed from the cluster while it ran: more than half of the other
    /// voters refused it as a non-member (`is_removed`), or it saw itself a member and its view
    /// of the membership no longer holds it. `/readyz` and `/cluster` say so.
    pub fn removed_while_running(&self) -> bool {
        self.is_removed() || (self.was_member() && !self.is_member(self.id()))
    }

    /// `removed_while_running` as the membership task's tick last judged it (500 ms), from
    /// atomics only: the HTTP API asks it of every request (`api::route`).
    pub fn takes_no_work(&self) -> bool {
        self.is_removed() || self.left.load(Ordering::Relaxed)
    }

    /// Whether this process has seen itself a member (within the membership task's tick, 500 ms):
    /// one that is none now was removed while it ran, unlike a joiner still catching up, whose
    /// view of the membership does not hold it yet either.
    pub fn was_member(&self) -> bool {
        self.was_member.load(Ordering::Relaxed)
    }

    /// Serve a join request: on the leader, queue it; elsewhere, forward it to the leader.
    pub async fn join(&self, id: NodeId, addr: String) -> Result<(), RemoteError> {
        self.leader_op(PeerRequest::Join { id, addr: addr.clone() }, |reply| Change::Join { id, addr, reply }).await
    }

    /// Remove a node for good (voter and learner entries).
    pub async fn remove(&self, id: NodeId) -> Result<(), RemoteError> {
        self.leader_op(PeerRequest::Remove { id }, |reply| Change::Remove { id, reply }).await
    }

    async fn leader_op(
        &self,
        forward: PeerRequest,
        change: impl FnOnce(oneshot::Sender<Result<(), RemoteError>>) -> Change,
    ) -> Result<(), RemoteError> {
        // An election under way (a leader handing over, say, when two changes come at once): a
        // leader is waited for within the change's wait, a look per 50 ms, rather than refused
        // at once as "not the leader" with none to name.
        let until = Instant::now() + CHANGE_TIMEOUT;
        while self.replica.leader().is_none() && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        match self.replica.leader() {
            Some(l) if l == self.replica.id() => {
                let (tx, rx) = oneshot::channel();
                self.changes
                    .try_send(change(tx))
                    .map_err(|_| RemoteError::Unavailable("membership queue full".into()))?;
                tokio::time::timeout(CHANGE_TIMEOUT * 2, rx)
                    .await
                    // Queued, it may still run: said, so that an operator looks before asking
                    // again (a removal that follows is refused as a non-member's, a 404).
                    .map_err(|_| RemoteError::Timeout("membership change timed out; it may still be applied: see GET /cluster before asking again".into()))?
                    .map_err(|_| RemoteError::Unavailable("membership task stopped".into()))?
            }
            // A node outside the membership (removed, but still running) is refused by the
            // leader (`admits`): say so here. Its own removal is already done.
            Some(_) if !self.is_member(self.replica.id()) => match forward {
                PeerRequest::Remove { id } if id == self.replica.id() => Ok(()),
                _ => Err(RemoteError::Unavailable("this node is not a member of the cluster: ask a member".into())),
            },
            Some(l) => self.forward(l, &forward).await,
            None => Err(RemoteError::NotLeader { leader: None }),
        }
    }

    /// A membership request passed on to `leader`, answered as it answers.
    async fn forward(&self, leader: NodeId, request: &PeerRequest) -> Result<(), RemoteError> {
        match self.replica.net.request(leader, request, CHANGE_TIMEOUT * 2 + FORWARD_MARGIN).await {
            Ok(PeerResponse::Done) => Ok(()),
            Ok(PeerResponse::Error(e)) => Err(e),
            Ok(other) => Err(RemoteError::Internal(format!("unexpected {other:?}"))),
            Err(e @ PeerError::Timeout { .. }) => Err(RemoteError::Timeout(format!(
                "{e}: the leader did not answer; the change may still be applied: see GET /cluster before asking again"
            ))),
            Err(e) => Err(RemoteError::Unavailable(e.to_string())),
        }
    }

    /// A queued change that this node can no longer make (it no longer leads), asked again as a
    /// node that never led would ask it (`leader_op`, which forwards it to the leader), from a
    /// task of its own so that the queue goes on; its caller gets that answer. Only once another
    /// node is named leader (one elected a moment ago may not be known yet): waited for within
    /// the caller's wait, a look per 50 ms; `failed` answers if none is named by then (a leader
    /// cut off in a minority keeps naming itself, and queueing the change again at once would
    /// spin). Given up as soon as the caller stops waiting, before or during the ask: a change
    /// nobody waits for is not made, as queued changes are not (`Change::abandoned`).
    fn pass_on<F, Fut>(&self, mut reply: oneshot::Sender<Result<(), RemoteError>>, failed: RemoteError, ask: F)
    where
        F: FnOnce(Cluster) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<(), RemoteError>> + Send + 'static,
    {
        if reply.is_closed() {
            warn!("membership change not asked again of the new leader: its caller stopped waiting");
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            let me = this.replica.id();
            let until = Instant::now() + CHANGE_TIMEOUT;
            loop {
                if this.replica.leader().is_some_and(|l| l != me) {
                    break;
                }
                if Instant::now() >= until || reply.is_closed() {
                    let _ = reply.send(Err(failed));
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let answer = tokio::select! {
                answer = ask(this) => Some(answer),
                () = reply.closed() => None,
            };
            if let Some(answer) = answer {
                let _ = reply.send(answer);
            }
        });
    }

    async fn membership_task(self, mut rx: mpsc::Receiver<Change>, shutdown: CancellationToken) {
        // Exported from the start (a dashboard or alert sees 0, not a missing series).
        metrics::gauge!("raftbridge_node_removed").set(0.0);
        metrics::counter!("raftbridge_cluster_removals_handed_over_total").increment(0);
        metrics::counter!("raftbridge_cluster_changes_abandoned_total").increment(0);
        let reversions = self.reversions.clone();
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Nodes whose log went back: the leader term it was seen in and the index each must hold
        // again before it may vote (module doc). One entry per such node (`prune_held_back`).
        let mut held_back: BTreeMap<NodeId, (u64, u64)> = BTreeMap::new();
        // Voters this node, as leader, set out to make learners for their lost data, with the
        // number of voters then: one of two is made a voter again alone once caught up
        // (`promote_learners`). Noted when the change is asked for, since in a cluster of two
        // it commits only once the node has caught up to it, which may take longer than the
        // change's timeout (`finish_joint` then ends it). Kept to the members each tick; a
        // node that is removed or joins anew is forgotten.
        let mut demoted: BTreeMap<NodeId, usize> = BTreeMap::new();
        // Held-back nodes whose demotion this node asked for as leader and whose call failed
        // (it may have timed out after proposing the change): counted in
        // `raftbridge_raft_voters_held_back_total` once seen done, since such a change may
        // commit later (it used to be counted only when the call itself succeeded). Kept to
        // the nodes held back, and cleared while this node does not lead.
        let mut unsure: BTreeSet<NodeId> = BTreeSet::new();
        // Members that refused this node's votes as no member's, under which view of the
        // membership (`note_outsider`).
        let mut told_outsider: (Option<LogId>, BTreeSet<NodeId>) = (None, BTreeSet::new());
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                change = rx.recv() => match change {
                    // Unreachable while this task runs: its own `Cluster` holds a sender.
                    None => return,
                    // A join leaves a demoted voter demoted: a restarted one asks to join at its
                    // address at every start, and a second process started under its id asks to
                    // move it (refused); either made the leader forget the demotion, and with it
                    // the promotion back of the only learner of a two-voter cluster. A node no
                    // longer a member is forgotten at the tick.
                    // A change whose caller stopped waiting (`leader_op`'s timeout, behind a
                    // slow change ahead of it) is dropped unstarted: its caller was told it may
                    // still be applied and to look before asking again, and one that ran minutes
                    // later would undo what the operator did meanwhile. A joiner asks again.
                    Some(change) if change.abandoned() => {
                        warn!(change = ?change, "membership change dropped unstarted: its caller stopped waiting");
                        metrics::counter!("raftbridge_cluster_changes_abandoned_total").increment(1);
                    }
                    Some(Change::Join { id, addr, reply }) => match self.apply_join(id, addr.clone()).await {
                        // As for a removal below.
                        Err(failed @ RemoteError::NotLeader { .. }) => {
                            self.pass_on(reply, failed, move |c| async move { c.join(id, addr).await });
                        }
                        joined => {
                            let _ = reply.send(joined);
                        }
                    },
                    Some(Change::Remove { id, reply }) => match self.apply_remove(id).await {
                        // Leadership moved while the change waited in the queue (behind a
                        // leader's own removal that handed over, say): asked again (`pass_on`).
                        Err(failed @ RemoteError::NotLeader { .. }) => {
                            self.pass_on(reply, failed, move |c| async move { c.remove(id).await });
                        }
                        // This leader handed over: the new one removes it. Asked from a task of
                        // its own, so that this one goes on (and finishes a change left half
                        // done, should this node lead again meanwhile).
                        Ok(Removal::HandedOver(to)) => {
                            info!(to, "removing this node through the leader it handed over to");
                            metrics::counter!("raftbridge_cluster_removals_handed_over_total").increment(1);
                            let failed = RemoteError::Unavailable(format!("this node handed its leadership over to node {to}, which is not known to lead yet: ask again in a moment"));
                            self.pass_on(reply, failed, move |c| async move { c.remove(id).await });
                        }
                        removed => {
                            if removed.is_ok() {
                                demoted.remove(&id);
                            }
                            let _ = reply.send(removed.map(|_| ()));
                        }
                    },
                },
                _ = reversions.found() => {
                    for (id, term, had) in reversions.take() {
                        warn!(id, term, acknowledged = had, "node's log went back below what it acknowledged (its data was lost): \
                            replicating to it from the start, as a learner until it holds that again");
                        metrics::counter!("raftbridge_raft_follower_reversions_total").increment(1);
                        let e = held_back.entry(id).or_insert((term, had));
                        *e = (*e).max((term, had));
                    }
                    self.count_late_demotions(&mut unsure);
                    self.prune_held_back(&mut held_back);
                    unsure.retain(|id| held_back.contains_key(id));
                    self.demote_held_back(&held_back, &mut demoted, &mut unsure).await;
                }
                _ = tick.tick() => {
                    let member = self.is_member(self.replica.id());
                    if member {
                        self.was_member.store(true, Ordering::Relaxed);
                    }
                    self.left.store(!member && self.was_member(), Ordering::Relaxed);
                    self.note_outsider(&mut told_outsider);
                    self.count_late_demotions(&mut unsure);
                    self.prune_held_back(&mut held_back);
                    let members: BTreeSet<NodeId> = self.replica.metrics().membership_config.membership().nodes().map(|(id, _)| *id).collect();
                    let recorded = self.replica.net.recorded_features();
                    metrics::gauge!("raftbridge_cluster_members_recorded").set(members.iter().filter(|id| recorded.by_node.contains_key(id)).count() as f64);
                    demoted.retain(|id, _| members.contains(id));
                    unsure.retain(|id| held_back.contains_key(id));
                    if self.replica.raft.is_leader() {
                        self.name_cluster().await;
                        self.record_features().await;
                        self.finish_joint().await;
                        self.demote_held_back(&held_back, &mut demoted, &mut unsure).await;
                        self.promote_learners(&held_back, &demoted).await;
                    } else {
                        unsure.clear();
                    }
                }
            }
        }
    }

    /// Gives the cluster its id when its state has none (a cluster formed by this build, once
    /// its first leader is elected; one formed by builds before ids, at the first leader of
    /// this build): a put of the reserved key `state_machine::CLUSTER_STORE`/`id` that only
    /// succeeds on an absent key, so the first committed stands and every build, older ones
    /// included, applies and keeps it alike. Links between nodes that hold different ids are
    /// refused (`peer`), so a node of an old history, left running beside a cluster restored
    /// from its backup, cannot follow the new leader with its old state.
    async fn name_cluster(&self) {
        if self.replica.net.cluster_id().is_some() {
            return;
        }
        let id = new_cluster_id();
        match self.replica.write(crate::raft::state_machine::name_cluster(id), CHANGE_TIMEOUT).await {
            Ok((_, CommandResult::Written { .. })) => info!(cluster_id = %format!("{id:032x}"), "cluster named"),
            // Named by an earlier leader, whose entry this node has yet to apply.
            Ok(_) => {}
            Err(e) => warn!(cause = %e, "could not name the cluster; will retry"),
        }
    }

    /// Records in the replicated state the peer features each member announced on its link
    /// to this leader (`state_machine::record_features`), when they differ from the record
    /// (a member upgraded, joined or left): a node restarted while a member is down then
    /// counts that member by its record (`PeerNet::features_known`) instead of as knowing
    /// nothing, which held every gated command back until the member came back. Members this
    /// leader has not linked to keep what the record says of them.
    /// Written again after every membership change even when it holds the same, as the record
    /// counts only when newer than the membership (`PeerNet::features_known`); a member that
    /// was removed keeps no entry.
    async fn record_features(&self) {
        let net = &self.replica.net;
        let recorded = net.recorded_features();
        let metrics = self.replica.metrics();
        let since = metrics.membership_config.log_id().as_ref().map_or(0, |l| l.index);
        let members: Vec<NodeId> = metrics.membership_config.membership().nodes().map(|(id, _)| *id).collect();
        // A member not linked to this leader keeps its entry, whatever its age: a node removed
        // is left out here, and one that joins links to the cluster to do so.
        let now: BTreeMap<NodeId, u64> =
            members.into_iter().filter_map(|id| net.features_seen(id).or_else(|| recorded.by_node.get(&id).copied()).map(|f| (id, f))).collect();
        if now == recorded.by_node && recorded.revision > since {
            return;
        }
        match self.replica.write(crate::raft::state_machine::record_features(&now, recorded.revision), CHANGE_TIMEOUT).await {
            Ok((_, CommandResult::Written { .. })) => info!(members = ?now, "recorded the members' features"),
            // Another leader's record came first: looked at again at the next tick.
            Ok(_) => {}
            Err(e) => warn!(cause = %e, "could not record the members' features; will retry"),
        }
    }

    /// Keeps only the held-back nodes that still need it: seen in this node's current term as
    /// leader (after a change of leader or term another leader decides, which did not see the
    /// reversion: the usual promotion lag applies), still members, and not yet holding again what
    /// they had acknowledged (as they acknowledge it to this leader: `Reversions`, not openraft's
    /// metrics, which may still show the match from before the reversion).
    fn prune_held_back(&self, held_back: &mut BTreeMap<NodeId, (u64, u64)>) {
        if held_back.is_empty() {
            return;
        }
        let m = self.replica.metrics();
        let leading = m.state == ServerState::Leader;
        let membership = m.membership_config.membership();
        held_back.retain(|id, (term, had)| {
            let keep = leading
                && *term == m.current_term
                && membership.get_node(id).is_some()
                && self.reversions.acknowledged(*id, *term).is_none_or(|a| a < *had);
            if !keep {
                info!(id, "node that lost its log is no longer held back");
            }
            keep
        });
    }

    /// Makes each voter that lost its log a learner (retried every tick while a quorum for the
    /// change is not reachable), noting each in `demoted` with the number of voters then.
    /// Counts the demotions whose change committed after the call that asked for it had
    /// failed (`unsure`). Before the held-back nodes are pruned: a node that caught up in the
    /// same tick leaves them, though its demotion did happen.
    fn count_late_demotions(&self, unsure: &mut BTreeSet<NodeId>) {
        if unsure.is_empty() {
            return;
        }
        let m = self.replica.metrics();
        let membership = m.membership_config.membership();
        if membership.get_joint_config().len() > 1 {
            return;
        }
        unsure.retain(|&id| {
            let learner = !membership.voter_ids().any(|v| v == id);
            if learner {
                metrics::counter!("raftbridge_raft_voters_held_back_total").increment(1);
                info!(id, "voter that lost its log is a learner now");
            }
            !learner
        });
    }

    async fn demote_held_back(&self, held_back: &BTreeMap<NodeId, (u64, u64)>, demoted: &mut BTreeMap<NodeId, usize>, unsure: &mut BTreeSet<NodeId>) {
        for &id in held_back.keys() {
            let m = self.replica.metrics();
            let membership = m.membership_config.membership();
            let voter = membership.voter_ids().any(|v| v == id);
            let joint = membership.get_joint_config().len() > 1;
            if joint || !voter {
                continue;
            }
            demoted.insert(id, membership.voter_ids().count());
            let result = match self.removal_has_quorum(membership.voter_ids().collect(), id) {
                Ok(()) => self.change_retaining(ChangeMembers::RemoveVoters(BTreeSet::from([id])), true).await.map_err(|e| (e, true)),
                Err(e) => Err((e, false)),
            };
            match result {
                Ok(()) => {
                    unsure.remove(&id);
                    metrics::counter!("raftbridge_raft_voters_held_back_total").increment(1);
                    info!(id, "voter that lost its log is a learner now");
                }
                Err((e, proposed)) => {
                    if proposed {
                        unsure.insert(id);
                    }
                    warn!(id, cause = %e, "cannot make the voter that lost its log a learner yet");
                }
            }
        }
    }

    fn is_leader_or_err(&self) -> Result<(), RemoteError> {
        if self.replica.raft.is_leader() { Ok(()) } else { Err(RemoteError::NotLeader { leader: self.replica.leader() }) }
    }

    /// A change asked for while one is half done (`finish_joint` ends it within a tick or so)
    /// waits for it: openraft would base it on the newer half alone, dropping the voters of the
    /// older one from the node list (a voter being demoted would be removed for good), and the
    /// quorum checks here judge one set of voters, not two.
    fn not_joint(membership: &crate::raft::types::Membership) -> Result<(), RemoteError> {
        if membership.get_joint_config().len() > 1 {
            return Err(RemoteError::Unavailable("a membership change is still being completed: ask again in a moment".into()));
        }
        Ok(())
    }

    async fn apply_join(&self, id: NodeId, addr: String) -> Result<(), RemoteError> {
        self.is_leader_or_err()?;
        let m = self.replica.metrics();
        let membership = m.membership_config.membership();
        // A member asking again at its address changes nothing: answered at once.
        if membership.get_node(&id).is_some_and(|n| n.addr == addr) {
            return Ok(());
        }
        Self::not_joint(membership)?;
        if let Some(node) = membership.get_node(&id) {
            if node.addr != addr {
                // Same id at a new address: a rescheduled container, or a second process started
                // with a member's `--id` by mistake. Moving the member to the second one would
                // cut the live one off, so the old address is asked first: a node that still
                // answers there as `id` keeps its place.
                // The same process reached through its old address too (it now advertises a
                // name for the same host, say) answers with the new address: that is a move.
                // (This node itself, at an address other than the one it advertises: the
                // leader restarted at a new address asks to be moved like any member.)
                let in_use = (id == self.replica.id() && addr != self.replica.net.advertise())
                    || (id != self.replica.id() && matches!(
                        self.replica.net.request_addr(&node.addr, &PeerRequest::Status, ADDRESS_PROBE_TIMEOUT).await,
                        Ok((peer, PeerResponse::Status(st))) if peer == id && st.addr != addr
                    ));
                if in_use {
                    metrics::counter!("raftbridge_peer_duplicate_id_refused_total").increment(1);
                    warn!(id, old = %node.addr, new = %addr, "refused a join under the id of a running member");
                    return Err(RemoteError::Invalid(format!(
                        "node id {id} is in use by a running member at {}: give the new node an id of its own",
                        node.addr
                    )));
                }
                // Same id at a new address (e.g. a rescheduled container): update it.
                info!(id, %addr, "updating node address");
                let nodes = BTreeMap::from([(id, BasicNode { addr })]);
                return self.change(ChangeMembers::SetNodes(nodes)).await;
            }
            return Ok(());
        }
        self.reads_the_log(id, &addr).await?;
        info!(id, %addr, "adding learner");
        let r = tokio::time::timeout(CHANGE_TIMEOUT, self.replica.raft.add_learner(id, BasicNode { addr }, false)).await;
        match r {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(to_remote(e)),
            Err(_) => Err(RemoteError::Timeout("adding the node as a learner did not commit in time; it may still be applied: see GET /cluster".into())),
        }
    }

    /// Refuses a new node whose build cannot decode entries the members may have written: a
    /// joiner is sent the whole log or a snapshot, and one that cannot read an entry stops its
    /// Raft core there, a learner that never catches up (or worse, a voter later). What the
    /// members may have written is every log-content feature all of them announce
    /// (`LOG_FEATURES`; a gated write waits until every member has its feature, so none with
    /// a feature some member lacks was written since that member joined); a member whose
    /// features are unknown counts as having none. The joiner's features come from a
    /// handshake with it at `addr`; one that cannot be reached now is let in as before (its
    /// address may not resolve from here yet), and a rolling upgrade, whose members share the
    /// older build's features, admits nodes of either build.
    async fn reads_the_log(&self, id: NodeId, addr: &str) -> Result<(), RemoteError> {
        let in_force = LOG_FEATURES & self.replica.members_share();
        if in_force == 0 {
            return Ok(());
        }
        let theirs = match self.replica.net.features_at(addr, ADDRESS_PROBE_TIMEOUT).await {
            Ok((peer, features)) if peer == id => features,
            Ok((peer, _)) => {
                warn!(id, %addr, answered = peer, "a joiner's address answers as another node: its build is not checked");
                return Ok(());
            }
            Err(e) => {
                warn!(id, %addr, cause = %e, "could not reach a joiner to check its build; adding it unchecked");
                return Ok(());
            }
        };
        let missing = in_force & !theirs;
        if missing == 0 {
            return Ok(());
        }
        metrics::counter!("raftbridge_cluster_joins_refused_total", "reason" => "build").increment(1);
        // A refused joiner asks again every round: said at most every `REFUSAL_WARN_EVERY`.
        if crate::peer::now_due(&JOIN_REFUSED_WARNED, REFUSAL_WARN_EVERY) {
            warn!(id, %addr, missing, "refused a join from a build that cannot read what the members write");
        } else {
            debug!(id, %addr, missing, "refused a join from a build that cannot read what the members write");
        }
        Err(RemoteError::Invalid(format!(
            "node {id} runs a build that cannot read the cluster's log: it lacks log feature bits {missing:#x} that every member \
             announces (the members': {in_force:#x}); run the members' build on it"
        )))
    }

    async fn apply_remove(&self, id: NodeId) -> Result<Removal, RemoteError> {
        self.is_leader_or_err()?;
        let m = self.replica.metrics();
        let membership = m.membership_config.membership();
        if membership.get_node(&id).is_some() {
            Self::not_joint(membership)?;
        }
        if membership.voter_ids().any(|v| v == id) {
            if membership.voter_ids().count() <= 1 {
                return Err(RemoteError::Invalid("cannot remove the last voter".into()));
            }
            let voters: Vec<NodeId> = membership.voter_ids().collect();
            // A leader elected a moment ago (the hand-over of a leader being removed, which
            // then asks it for the removal) has matched no follower's log yet, and would count
            // only itself: it looks again for up to `RESPONSIVE`. Bounded: a look per 50 ms.
            let settled = Instant::now() + RESPONSIVE;
            while self.removal_has_quorum(voters.clone(), id).is_err() && Instant::now() < settled {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            self.removal_has_quorum(voters, id)?;
            // This leader itself (Consul's `leave` of its leader): it hands over first and the
            // new leader removes it, so writes move on at once. Removed by itself, it would
            // step down once the change commits, and every write would wait for the others'
            // election timeout. Only when no voter was heard from lately (nothing was asked) does
            // it remove itself, as before.
            if id == self.replica.id() {
                // Within the caller's wait: asked all along, as a leader that began a transfer
                // can no longer change the membership itself.
                match hand_over_leadership(&self.replica, CHANGE_TIMEOUT).await {
                    HandOver::Moved(to) => return Ok(Removal::HandedOver(to)),
                    HandOver::Pending => {
                        return Err(RemoteError::Unavailable(
                            "this leader began handing its leadership over, and no other node took it over in time (or this node was elected again): ask again in a moment".into(),
                        ));
                    }
                    HandOver::NotLeader | HandOver::NoVoter => {}
                }
            }
            info!(id, "removing voter");
            self.change(ChangeMembers::RemoveVoters(BTreeSet::from([id]))).await?;
        }
        let m = self.replica.metrics();
        if m.membership_config.membership().get_node(&id).is_some() {
            info!(id, "removing node");
            self.change(ChangeMembers::RemoveNodes(BTreeSet::from([id]))).await?;
        }
        Ok(Removal::Done)
    }

    /// Whether voter `id` can be removed now. The change commits in a joint configuration that
    /// needs a majority of the old and of the new voters: refuse it unless both have one
    /// reachable now, or every write would stall behind it until enough of the missing nodes
    /// came back.
    fn removal_has_quorum(&self, old: Vec<NodeId>, id: NodeId) -> Result<(), RemoteError> {
        let m = self.replica.metrics();
        let live = |voters: &[NodeId]| voters.iter().filter(|v| self.keeps_up(&m, **v)).count();
        let new: Vec<NodeId> = old.iter().copied().filter(|v| *v != id).collect();
        for (which, voters) in [("current", &old), ("remaining", &new)] {
            let (up, need) = (live(voters), voters.len() / 2 + 1);
            if up < need {
                return Err(RemoteError::Unavailable(format!(
                    "removing node {id} needs {need} of the {which} voters {voters:?} answering and caught up, and only {up} are"
                )));
            }
        }
        Ok(())
    }

    /// Whether voter `id` would acknowledge a membership change now, as this leader sees it: it
    /// is this node, or it was heard from within `RESPONSIVE` and its log is within
    /// `KEEP_UP_LAG` of the leader's. A link alone is not enough: a stopped process keeps its
    /// link up, silent, until the idle timeout, and a voter being caught up (a snapshot, a long
    /// backlog) acknowledges the change only once it reaches it; a change counted on either
    /// held every write behind it.
    fn keeps_up(&self, m: &crate::raft::types::RaftMetrics, id: NodeId) -> bool {
        if id == m.id {
            return true;
        }
        let heard = responsive(&self.replica.net, id);
        let last = m.last_log_index.unwrap_or(0);
        let matched = m.replication.as_ref().and_then(|r| r.get(&id)).and_then(|l| l.as_ref()).map(|l| l.index);
        heard && matched.is_some_and(|i| i + KEEP_UP_LAG >= last)
    }

    async fn change(&self, c: ChangeMembers<NodeId, BasicNode>) -> Result<(), RemoteError> {
        self.change_retaining(c, false).await
    }

    /// A membership change; with `retain`, voters it removes stay on as learners.
    async fn change_retaining(&self, c: ChangeMembers<NodeId, BasicNode>, retain: bool) -> Result<(), RemoteError> {
        match tokio::time::timeout(CHANGE_TIMEOUT, self.replica.raft.change_membership(c, retain)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(to_remote(e)),
            Err(_) => Err(RemoteError::Timeout(format!(
                "the membership change did not commit within {} s; it may still commit (see GET /cluster: \"joint\" true \
                 means half done, which the leader finishes once a majority of both halves answers, keeping a voter it drops \
                 as a learner: ask for a removal again to complete it)",
                CHANGE_TIMEOUT.as_secs()
            ))),
        }
    }

    /// Finishes a membership change left half done. openraft makes a change in two entries, a
    /// joint configuration and then the new one, and proposes the second from the caller's
    /// future: a change whose wait was cut (`CHANGE_TIMEOUT`: its joint entry committed later,
    /// once enough voters were back) or whose leader lost office between the two leaves the
    /// cluster joint, and every later change here (promotions, demotions, joins, removals)
    /// waits for it to end. Changes run one at a time on this task and none runs now, so a
    /// joint configuration that is committed is such a leftover: this moves to its newer half.
    /// Whether the voters it drops were being removed or demoted (a voter that lost its log)
    /// is not written anywhere a new leader could read, so all of them stay on as learners: a
    /// demoted voter removed would run on as a non-member for good (a node with a log never
    /// asks to join again), even one that is silent just now (restarting), while a learner
    /// counts toward no quorum, and a removal whose caller was told 503 is asked again. (Until
    /// session 37 the silent ones were removed.)
    async fn finish_joint(&self) {
        let m = self.replica.metrics();
        let joint = m.membership_config.membership().get_joint_config();
        if joint.len() < 2 || m.membership_config.log_id() != m.committed_membership_config.log_id() {
            return;
        }
        let (Some(old), Some(goal)) = (joint.first(), joint.last().cloned()) else { return };
        let learners: BTreeSet<NodeId> = old.difference(&goal).copied().collect();
        warn!(voters = ?goal, learners = ?learners, "a membership change was left half done (joint configuration): finishing it");
        metrics::counter!("raftbridge_membership_joint_finished_total").increment(1);
        if let Err(e) = self.change_retaining(ChangeMembers::ReplaceAllVoters(goal), true).await {
            warn!(cause = %e, "could not finish the membership change left half done; trying again");
        }
    }

    /// Promote one caught-up learner while voters < max_voters (two at once from a single
    /// voter, but for the second voter of two that this leader made a learner for its lost
    /// data, `demoted`); not one that lost its log and does not hold again what it had
    /// acknowledged (`held_back`, pruned just before).
    async fn promote_learners(&self, held_back: &BTreeMap<NodeId, (u64, u64)>, demoted: &BTreeMap<NodeId, usize>) {
        let m = self.replica.metrics();
        let membership = m.membership_config.membership();
        if membership.get_joint_config().len() > 1 {
            return;
        }
        let voters = membership.voter_ids().count();
        if voters >= self.settings.max_voters {
            return;
        }
        // Not while a voter is down or behind: the change commits in a joint configuration, and
        // one more failure during it stalls every write until it ends. A dead voter is removed
        // by the operator (`leave`, `DELETE /cluster/members/{id}`); promotion resumes then.
        if let Some(down) = membership.voter_ids().find(|v| !self.keeps_up(&m, *v)) {
            debug!(voter = down, "no promotion while a voter is down or behind");
            return;
        }
        let last = m.last_log_index.unwrap_or(0);
        let Some(repl) = m.replication.as_ref() else { return };
        // Caught up, and heard from lately (a hung learner's link stays up for a while).
        let ready: Vec<NodeId> = membership
            .learner_ids()
            .filter(|id| !held_back.contains_key(id))
            .filter(|id| repl.get(id).and_then(|l| l.as_ref()).is_some_and(|l| l.index + PROMOTE_LAG >= last))
            .filter(|id| self.keeps_up(&m, *id))
            .collect();
        // From one voter, two at once: one more would make two voters, and the change (and every
        // write after it) would need both, so a second node that died before it acknowledged,
        // or any time after, stalled the cluster until it came back (a lone voter cannot be
        // re-elected over a log that holds the change). With three, one failure is survived.
        // Except where the one ready is a voter of a cluster of two made a learner for its lost
        // data: the cluster had two, and waiting for a second learner kept it at one for good.
        let restoring = voters == 1 && ready.len() == 1 && demoted.get(&ready[0]) == Some(&2);
        let take = if voters == 1 && self.settings.max_voters >= 3 && !restoring { 2 } else { 1 };
        if ready.len() < take {
            if !ready.is_empty() {
                debug!(ready = ?ready, "one voter: waiting for a second caught-up learner to promote both");
            }
            return;
        }
        let ids: BTreeSet<NodeId> = ready.into_iter().take(take).collect();
        info!(ids = ?ids, last, "promoting learners to voters");
        if let Err(e) = self.change(ChangeMembers::AddVoterIds(ids.clone())).await {
            warn!(ids = ?ids, cause = %e, "promotion failed");
        }
    }

    /// Keep the peer layer's address book equal to the membership's nodes.
    async fn address_book(self, shutdown: CancellationToken) {
        // The server metrics change with the membership, vote and leader only; the full metrics
        // change with every commit and apply, and watching those woke this task per entry
        // (1.7–2.3% of a node's CPU under `bench events`).
        let mut rx = self.replica.raft.server_metrics();
        let mut known: BTreeMap<NodeId, String> = BTreeMap::new();
        loop {
            let current: BTreeMap<NodeId, String> = {
                let m = rx.borrow_and_update();
                m.membership_config.membership().nodes().map(|(id, n)| (*id, n.addr.clone())).collect()
            };
            if current != known {
                for (id, addr) in &current {
                    self.replica.net.set_peer_addr(*id, addr);
                }
                for id in known.keys().filter(|id| !current.contains_key(id)) {
                    self.replica.net.forget_peer(*id);
                    self.reversions.forget(*id);
                }
                known = current;
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                // Closed: the Raft core stopped on its own. `node::run` sees that and drains,
                // which stops this loop too; it is the core's failure, not this loop's.
                r = rx.changed() => if r.is_err() { shutdown.cancelled().await; return },
            }
        }
    }

    /// Before bootstrapping: asks every other node it sees without cluster state to mark its
    /// empty log as one of this node's cluster (`PeerRequest::Found`, served by `node::found`):
    /// the founders (`ids`), so that one of them that misses the first leader's first entries
    /// can still vote once that leader is gone, and the seeds past them, so that none of those
    /// bootstraps a cluster of its own (one whose DNS answers lag, seeing only the seeds above
    /// this node, would otherwise form one beside it: `LogStore::claim_founding` refuses a log
    /// marked by another node). Bootstrapping waits for the founders' answers only. `marked`:
    /// those that answered, not asked again.
    async fn mark_founders(&self, fresh: &BTreeMap<NodeId, String>, ids: &[NodeId], marked: &mut BTreeSet<NodeId>) {
        let me = self.replica.id();
        // The seeds past the founders: asked without waiting for their answers (bootstrapping
        // waits for the founders' only, and the gap between their answers and `initialize`
        // stays short), each ask bounded by `FOUND_TIMEOUT`.
        for (id, addr) in fresh.iter().filter(|(id, _)| **id != me && !ids.contains(id)) {
            let (net, req, addr, id) = (self.replica.net.clone(), PeerRequest::Found { members: ids.to_vec() }, addr.clone(), *id);
            tokio::spawn(async move {
                if let Err(e) = net.request_addr(&addr, &req, FOUND_TIMEOUT).await {
                    debug!(node = id, cause = %e, "seed not marked as deferring to this node");
                }
            });
        }
        let asks = fresh.iter().filter(|(id, _)| **id != me && ids.contains(id) && !marked.contains(*id)).map(|(id, addr)| {
            let net = self.replica.net.clone();
            let req = PeerRequest::Found { members: ids.to_vec() };
            async move { (*id, net.request_addr(addr, &req, FOUND_TIMEOUT).await) }
        });
        for (id, answer) in futures_util::future::join_all(asks).await {
            match answer {
                Ok((_, PeerResponse::Done)) => {
                    debug!(node = id, "founder marked");
                    marked.insert(id);
                }
                Ok((_, other)) => info!(node = id, answer = ?other, "founder not marked"),
                Err(e) => info!(node = id, cause = %e, "founder not marked"),
            }
        }
    }

    /// A member that restarts with its data at a new address (a rescheduled container that kept
    /// its volume, a new `--advertise`) asks the leader to move it there, as a join does: only a
    /// node without cluster state joins, so the membership kept the old address, which peers
    /// dialed in vain. Bounded: `ADDRESS_ROUNDS` attempts a second apart, until a leader knows
    /// the address this node advertises (or this node is not a member any more).
    async fn announce_address(&self, shutdown: &CancellationToken) {
        let (me, addr) = (self.replica.id(), self.replica.net.advertise().to_string());
        for _ in 0..ADDRESS_ROUNDS {
            let known = {
                let rx = self.replica.raft.metrics();
                let m = rx.borrow_watched();
                m.membership_config.membership().get_node(&me).map(|n| n.addr.clone())
            };
            match known {
                None => return,
                Some(known) if known == addr => return,
                Some(known) => {
                    let led = self.replica.raft.metrics().borrow_watched().current_leader.is_some();
                    if led {
                        info!(old = %known, new = %addr, "this member's address changed: asking the leader to move it");
                        match self.join(me, addr.clone()).await {
                            Ok(()) => {}
                            Err(e) => info!(cause = %e, "moving this member's address failed; trying again"),
                        }
                    }
                }
            }
            if tokio::time::timeout(Duration::from_secs(1), shutdown.cancelled()).await.is_ok() {
                return;
            }
        }
        warn!(%addr, "this member's address in the membership is not the one it advertises; peers may not reach it");
    }

    /// Until this node is in a cluster: join one through a seed, or bootstrap one (see module doc).
    async fn bootstrap_or_join(self, shutdown: CancellationToken) {
        let me = self.replica.id();
        let mut round: u64 = 0;
        let mut steady = SteadyPlan::default();
        // Only a node that is one of the seeds may bootstrap (the README's "the first N seeds
        // form the cluster"): it has seen itself among them (a probe that reached itself), kept
        // once seen as DNS answers may lag. A node outside the list sees only itself and the
        // seeds, so as the lowest id it would form a membership the seeds do not agree on: a
        // second cluster beside theirs. With no seeds at all (`--bootstrap-expect 1`) it is alone.
        let mut among_seeds = self.settings.seeds.is_empty();
        let mut told_outside = false;
        let mut told_marked = false;
        let mut told_seen = false;
        // Founders whose logs are marked (`mark_founders`): asked once each.
        let mut marked: BTreeSet<NodeId> = BTreeSet::new();
        // Ends this round early: waits for the next.
        macro_rules! continue_round {
            () => {{
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(300 + fastrand::u64(..200))) => {}
                }
                continue;
            }};
        }
        loop {
            match self.replica.raft.is_initialized().await {
                Ok(true) => {
                    info!("node has cluster state; bootstrap/join done");
                    self.announce_address(&shutdown).await;
                    return;
                }
                Ok(false) => {}
                Err(e) => {
                    warn!(cause = %e, "raft stopped");
                    return;
                }
            }
            round += 1;
            if round == 1 && self.settings.seeds.is_empty() && self.settings.bootstrap_expect == 0 {
                // Said, not refused: a node restarted with its cluster's state needs neither.
                warn!("this node holds no cluster state and was given neither --seeds nor --bootstrap-expect: it cannot join or form a cluster by itself, only be found by nodes that list it as a seed (give --bootstrap-expect 1 for a single node, or --seeds to join)");
            }
            // Re-resolved every round: a DNS name (one alias for all nodes, a headless service)
            // gains addresses as nodes start. Every address is probed, not just the first.
            let resolved = resolve_seeds(&self.settings.seeds, RESOLVE_TIMEOUT).await;
            for (addr, host) in &resolved.names {
                // A seed's name resolves to addresses, and the dialer dials those: TLS must
                // check the name the operator gave, which is what a certificate carries.
                self.replica.net.set_tls_name(addr, host);
            }
            if round % 20 == 1 {
                for (seed, cause) in &resolved.unresolved {
                    info!(%seed, %cause, "seed does not resolve yet");
                }
            }
            let probes = resolved.addrs.iter().map(|seed| {
                let net = self.replica.net.clone();
                async move {
                    let probe = || net.request_addr(seed, &PeerRequest::Status, Duration::from_secs(1));
                    // Once more after a moment: two nodes that dial each other at once keep one
                    // link and close the other (`peer`'s tie-break), and a probe on the closed
                    // one failed. A seed missed so in two rounds in a row left a founder out of
                    // the plan (voters 1, 3, 4 where 1, 2, 3 were meant).
                    let answer = match probe().await {
                        Err(e) if !matches!(e, PeerError::SelfDial { .. }) => {
                            tokio::time::sleep(PROBE_AGAIN).await;
                            probe().await
                        }
                        answer => answer,
                    };
                    (seed.clone(), answer)
                }
            });
            let results = futures_util::future::join_all(probes).await;
            let mut fresh: BTreeMap<NodeId, String> = BTreeMap::from([(me, self.replica.net.advertise().to_string())]);
            let mut members: Vec<(String, NodeStatus)> = Vec::new();
            for (seed, r) in results {
                match r {
                    Ok((_, PeerResponse::Status(st))) if st.initialized => members.push((seed, st)),
                    Ok((_, PeerResponse::Status(st))) => {
                        fresh.insert(st.node_id, st.addr);
                    }
                    Err(PeerError::SelfDial { .. }) => among_seeds = true,
                    Ok(_) => {}
                    Err(e) => {
                        if round % 20 == 1 {
                            info!(%seed, cause = %e, "seed not reachable yet");
                        }
                    }
                }
            }
            let lowest = members.is_empty() && self.settings.bootstrap_expect > 0 && fresh.len() >= self.settings.bootstrap_expect && fresh.keys().next() == Some(&me);
            if lowest && !among_seeds && !told_outside {
                told_outside = true;
                info!("not bootstrapping: this node is not one of the seeds (it joins once they have formed the cluster)");
            }
            // The lowest `--bootstrap-expect` of them: every seed seen used to be a founder, so
            // five seeds with an expect of three formed five voters (past `--max-voters`, and
            // an even count with four). The others see a lower id, and join once it has formed.
            let plan = (lowest && among_seeds).then(|| fresh.keys().copied().take(self.settings.bootstrap_expect).collect::<Vec<_>>());
            // A node gone from the seeds' answers (restarted, maybe with its data lost) is asked
            // again if it comes back.
            marked.retain(|id| fresh.contains_key(id));
            let steady_plan = steady.holds(plan.clone());
            if let Some(ids) = plan.as_ref().filter(|_| members.is_empty()) {
                // In every round that plans (every seed seen without cluster state). In the
                // one that may bootstrap, every founder is asked again: a lower id that does
                // not see this node may have replaced its mark since (a mark counted once
                // went stale, and both nodes formed a cluster holding that founder).
                if steady_plan {
                    marked.clear();
                }
                self.mark_founders(&fresh, ids, &mut marked).await;
            }
            // Only once every other founder took the mark, in this round: a founder marked by
            // a lower id refuses, and that node's cluster forms instead.
            let all_marked = plan.as_ref().is_some_and(|ids| ids.iter().all(|id| *id == me || marked.contains(id)));
            let bootstrap = steady_plan && all_marked;
            if !members.is_empty() {
                // Prefer a seed that knows the leader; it forwards our join there. Rounds go
                // round the seeds in that order: one that cannot help (a removed node still
                // running, which refuses to forward) does not hold the join up for good.
                members.sort_by_key(|(_, st)| st.leader.is_none());
                let (seed, _) = &members[(round % members.len() as u64) as usize];
                let req = PeerRequest::Join { id: me, addr: self.replica.net.advertise().to_string() };
                match self.replica.net.request_addr(seed, &req, CHANGE_TIMEOUT * 2).await {
                    Ok((_, PeerResponse::Done)) => info!(%seed, "join accepted"),
                    // Said loudly: it is refused at every round until an operator acts (a
                    // build that cannot read the log, an id in use by a running member).
                    Ok((_, PeerResponse::Error(RemoteError::Invalid(why)))) => {
                        if crate::peer::now_due(&JOIN_REFUSED_WARNED, REFUSAL_WARN_EVERY) {
                            warn!(%seed, refused = %why, "join refused");
                        } else {
                            debug!(%seed, refused = %why, "join refused");
                        }
                    }
                    Ok((_, other)) => info!(%seed, response = ?other, "join not accepted yet"),
                    Err(e) => info!(%seed, cause = %e, "join request failed"),
                }
            } else if let Some(ids) = plan.as_ref().filter(|_| bootstrap) {
                // A cluster that counts this node already reached it: forming another beside
                // it would split the members' clients between two histories.
                if self.raft_seen.load(Ordering::SeqCst) {
                    if !told_seen {
                        told_seen = true;
                        warn!("not bootstrapping: a cluster that counts this node as a member reached it (its data was lost?); it waits to be sent that cluster's log");
                    }
                    continue_round!();
                }
                // A lone founder (`--bootstrap-expect 1`) waits for a cluster that still counts
                // it to reach it first (its leader redials a lost member within `LONE_WAIT`): a
                // node that grew into a cluster and lost its data dir, restarted with its
                // first flags, formed a second cluster at once.
                if ids.len() == 1 && self.since.elapsed() < LONE_WAIT {
                    continue_round!();
                }
                // This node's log may have been marked for another node's cluster meanwhile;
                // once claimed, no other node's mark is taken.
                let log = self.log.clone();
                let claimed = match tokio::task::spawn_blocking(move || log.claim_founding(me)).await {
                    Ok(Ok(Founding::Marked { .. })) => true,
                    Ok(Ok(Founding::Other(by))) => {
                        if round % 20 == 1 || !told_marked {
                            warn!(founder = by, "not bootstrapping: this node's empty log is marked as a founder of another node's cluster; it joins that one once it forms (if that node is gone for good, only an empty data dir here lets this node form another)");
                        }
                        told_marked = true;
                        false
                    }
                    Ok(Ok(Founding::HoldsEntries)) => false,
                    Ok(Err(e)) => {
                        warn!(cause = %e, "could not claim this node's log for a new cluster");
                        false
                    }
                    Err(e) => {
                        warn!(cause = %e, "could not claim this node's log for a new cluster");
                        false
                    }
                };
                if claimed {
                    let nodes: BTreeMap<NodeId, BasicNode> =
                        fresh.iter().filter(|(id, _)| ids.contains(id)).map(|(id, addr)| (*id, BasicNode { addr: addr.clone() })).collect();
                    info!(members = ?nodes.keys().collect::<Vec<_>>(), "bootstrapping the cluster");
                    if let Err(e) = self.replica.raft.initialize(nodes).await {
                        warn!(cause = %e, "initialize failed");
                    }
                }
            }
            continue_round!();
        }
    }
}

/// How long a lone founder (`--bootstrap-expect 1`) waits after its start before it forms a
/// cluster: a leader that still counts it redials it within the peer links' longest dial
/// backoff (3 s), and its first append tells this node not to. Counted from the cluster's start,
/// which comes before the peer listener is bound (milliseconds), hence the margin.
const LONE_WAIT: Duration = Duration::from_secs(6);

/// How long a bootstrap round waits before it probes a seed that failed once again.
const PROBE_AGAIN: Duration = Duration::from_millis(100);

/// A bootstrap plan (the uninitialized nodes this one, the lowest id among them, would form the
/// cluster with) is carried out only when two rounds in a row made the same one. Two nodes whose
/// views differ could otherwise both bootstrap, and Raft cannot tell their first entries apart
/// (both are the membership at index 0): two clusters. The case: more seeds than
/// `--bootstrap-expect`, and the lowest-id node starting a moment late, seen by the others only
/// after one of them planned without it. Waiting a round (300–500 ms) lets it be seen; a node
/// reachable one way only for that long can still split the start, which only a seed list of
/// exactly the first nodes rules out (README).
#[derive(Debug, Default)]
struct SteadyPlan {
    last: Option<Vec<NodeId>>,
}

impl SteadyPlan {
    /// This round's plan (`None`: no bootstrap from here); true when it is last round's too.
    fn holds(&mut self, plan: Option<Vec<NodeId>>) -> bool {
        let steady = plan.is_some() && plan == self.last;
        self.last = plan;
        steady
    }
}

/// Seeds resolved to the addresses a round probes.
#[derive(Debug, Default)]
struct ResolvedSeeds {
    /// `ip:port` strings (IPv6 as `[ip]:port`), deduplicated, in seed order; an `ip:port` seed
    /// is kept exactly as written.
    addrs: Vec<String>,
    /// Seeds that did not resolve this round, with the cause (unreachable for this round only).
    unresolved: Vec<(String, String)>,
    /// (address, the DNS name it came from) for seeds given by name: TLS checks that name.
    names: Vec<(String, String)>,
}

/// Resolve every seed to *all* of its addresses, each lookup bounded by `timeout`. A name that
/// does not resolve (yet) is reported, never an error: the caller retries next round.
async fn resolve_seeds(seeds: &[String], timeout: Duration) -> ResolvedSeeds {
    let lookups = seeds.iter().map(|seed| async move {
        if seed.parse::<std::net::SocketAddr>().is_ok() {
            return (seed, Ok(vec![seed.clone()]));
        }
        let r = match tokio::time::timeout(timeout, tokio::net::lookup_host(seed.as_str())).await {
            Ok(Ok(addrs)) => Ok(addrs.map(|a| a.to_string()).collect::<Vec<_>>()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no DNS answer within {timeout:?}")),
        };
        (seed, r)
    });
    let mut out = ResolvedSeeds::default();
    let mut seen = BTreeSet::new();
    for (seed, r) in futures_util::future::join_all(lookups).await {
        match r {
            Ok(addrs) if !addrs.is_empty() => {
                let host = seed.parse::<std::net::SocketAddr>().is_err().then(|| seed.rsplit_once(':').map_or(seed.as_str(), |(h, _)| h));
                for a in addrs {
                    if let Some(host) = host {
                        out.names.push((a.clone(), host.to_string()));
                    }
                    if seen.insert(a.clone()) {
                        out.addrs.push(a);
                    }
                }
            }
            Ok(_) => out.unresolved.push((seed.clone(), "no addresses".into())),
            Err(cause) => out.unresolved.push((seed.clone(), cause)),
        }
    }
    out
}

fn to_remote(e: RaftError<ClientWriteError>) -> RemoteError {
    use openraft::error::ChangeMembershipError;
    match e {
        openraft::error::RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => RemoteError::NotLeader { leader: f.leader_id },
        // Transient: another change is still being committed, or leadership moved under it.
        openraft::error::RaftError::APIError(
            e @ (ClientWriteError::ChangeMembershipError(ChangeMembershipError::InProgress(_)) | ClientWriteError::LogEntryDiscarded(_)),
        ) => RemoteError::Unavailable(e.to_string()),
        openraft::error::RaftError::APIError(e) => RemoteError::Invalid(e.to_string()),
        openraft::error::RaftError::Fatal(e) => RemoteError::Internal(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_feature_is_of_the_log_or_of_the_links() {
        use crate::peer::frame::features::*;
        let links = DELIVER_BATCH | ORDERED_APPENDS | DELIVERED_EACH | PULL_FORWARD | REMOTE_TIMEOUT | IDEM_PRINCIPAL;
        assert_eq!(LOG_FEATURES & links, 0);
        assert_eq!(
            LOG_FEATURES | links,
            ALL,
            "a new feature is in LOG_FEATURES (joins check it) if it gates any log command or snapshot content, else a link message's"
        );
    }

    #[test]
    fn a_change_whose_caller_stopped_waiting_is_abandoned() {
        let (reply, rx) = oneshot::channel();
        let change = Change::Remove { id: 2, reply };
        assert!(!change.abandoned(), "its caller waits");
        drop(rx);
        assert!(change.abandoned(), "its caller's wait timed out");
        assert_eq!(format!("{change:?}"), "removal of node 2");
    }

    #[test]
    fn the_apply_backlog_counts_the_entries_not_applied() {
        assert_eq!(apply_backlog(None, None), 0);
        assert_eq!(apply_backlog(Some(5_000), None), 5_000);
        assert_eq!(apply_backlog(Some(5_000), Some(4_990)), 10);
        assert!(apply_backlog(Some(3_000), Some(1_000)) > KEEP_UP_LAG);
    }

    /// A backlog over the bound counts once it lasted a second; one that drops below starts
    /// over.
    #[test]
    fn a_node_is_behind_once_its_backlog_lasted() {
        let since = AtomicU64::new(0);
        assert!(!stays_behind(&since, 5_000, 10, true));
        assert!(!stays_behind(&since, 5_000, 900, true));
        assert!(stays_behind(&since, 5_000, 1_010, true));
        assert!(!stays_behind(&since, 10, 1_020, true), "caught up");
        assert!(!stays_behind(&since, 5_000, 1_030, true), "behind again: counted from now");
        assert!(!stays_behind(&since, 5_000, 2_000, true));
        assert!(stays_behind(&since, 5_000, 2_030, true));
    }

    /// A node never ready in this process (restarted, replaying its log) is behind with such a
    /// backlog from the first check: it used to say ready once, then not.
    #[test]
    fn a_node_never_ready_is_behind_at_once() {
        let since = AtomicU64::new(0);
        assert!(stays_behind(&since, 5_000, 10, false));
        assert!(stays_behind(&since, 5_000, 20, false));
        assert!(!stays_behind(&since, KEEP_UP_LAG, 30, false), "caught up");
    }

    #[test]
    fn a_follower_is_in_touch_only_on_the_side_of_a_majority_of_voters() {
        let heard = |set: &'static [NodeId]| move |v: NodeId| set.contains(&v);
        // Five voters split {1 (leader), 2} | {3, 4, 5}: node 2 hears 1 and itself.
        assert!(!hears_quorum([1, 2, 3, 4, 5].into_iter(), heard(&[1, 2])));
        assert!(hears_quorum([1, 2, 3, 4, 5].into_iter(), heard(&[3, 4, 5])));
        // Three voters with one down: the two left are a majority.
        assert!(hears_quorum([1, 2, 3].into_iter(), heard(&[1, 2])));
        // Even counts need more than half: two of four is a tie, not a majority.
        assert!(!hears_quorum([1, 2, 3, 4].into_iter(), heard(&[1, 2])));
        // A learner (4) does not count itself: it needs a majority of the voters.
        assert!(!hears_quorum([1, 2, 3].into_iter(), heard(&[1, 4])));
        assert!(hears_quorum([1, 2, 3].into_iter(), heard(&[1, 2, 4])));
        assert!(!hears_quorum(std::iter::empty(), heard(&[1])), "no voters, no quorum");
    }

    #[test]
    fn a_bootstrap_plan_is_carried_out_once_two_rounds_agree() {
        let mut steady = SteadyPlan::default();
        assert!(!steady.holds(Some(vec![2, 3, 4])), "the first round only plans");
        assert!(!steady.holds(Some(vec![1, 2, 3, 4])), "node 1 showed up late: another plan");
        assert!(!steady.holds(None), "node 1 is the lowest id now: no bootstrap from here");
        assert!(!steady.holds(Some(vec![2, 3, 4])));
        assert!(steady.holds(Some(vec![2, 3, 4])), "the same plan twice in a row");
    }

    #[tokio::test]
    async fn seeds_resolve_to_every_address() {
        let seeds: Vec<String> =
            ["127.0.0.1:7401", "localhost:7400", "127.0.0.1:7401", "[::1]:7402", "no-such-host.invalid:7400", "no-port"]
                .iter()
                .map(|s| s.to_string())
                .collect();
        let r = resolve_seeds(&seeds, Duration::from_secs(5)).await;
        // IP seeds stay exactly as written (and are deduplicated).
        assert_eq!(r.addrs[0], "127.0.0.1:7401");
        assert_eq!(r.addrs.iter().filter(|a| *a == "127.0.0.1:7401").count(), 1);
        assert!(r.addrs.contains(&"[::1]:7402".to_string()));
        // A name yields at least one ip:port the peer layer can dial as is.
        let local: Vec<&String> = r.addrs.iter().filter(|a| a.ends_with(":7400")).collect();
        assert!(!local.is_empty(), "localhost resolved to nothing: {r:?}");
        assert!(local.iter().all(|a| a.parse::<std::net::SocketAddr>().is_ok()), "{r:?}");
        // Each remembers the name it came from (TLS checks the name); IP seeds have none.
        let named: Vec<(&str, &str)> = r.names.iter().map(|(a, h)| (a.as_str(), h.as_str())).collect();
        assert!(local.iter().all(|a| named.contains(&(a.as_str(), "localhost"))), "{named:?}");
        assert!(r.names.iter().all(|(a, _)| a.ends_with(":7400")), "only the name's addresses: {named:?}");
        // Names that do not resolve are reported for this round, not an error.
        let bad: Vec<&str> = r.unresolved.iter().map(|(s, _)| s.as_str()).collect();
        assert_eq!(bad, ["no-such-host.invalid:7400", "no-port"]);
    }

    #[tokio::test]
    async fn no_seeds_resolve_to_nothing() {
        let r = resolve_seeds(&[], Duration::from_secs(1)).await;
        assert!(r.addrs.is_empty() && r.unresolved.is_empty());
    }
}

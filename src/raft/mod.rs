//! Raft: openraft wired to our log store, state machine and peer network, plus the two operations
//! every other module needs — a write that reaches the leader from any node, and a read barrier
//! that makes a local read linearizable.
//!
//! Why writes are forwarded rather than redirected: a client may talk to any node (DNS points at
//! all of them), so the node that received the request carries it to the leader over the peer link
//! and answers when the entry is committed (fsynced on a quorum) and applied.

pub mod log_store;
pub mod network;
pub mod state_machine;
pub mod types;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing::debug;

use self::types::*;
use crate::peer::PeerError;
use crate::peer::PeerNet;
use crate::peer::message::PeerRequest;
use crate::peer::message::PeerResponse;
use crate::peer::message::RemoteError;

/// Tunables of the Raft layer, from the node's config.
#[derive(Debug, Clone)]
pub struct RaftSettings {
    pub cluster: String,
    pub heartbeat_ms: u64,
    pub election_min_ms: u64,
    pub election_max_ms: u64,
    pub snapshot_threshold: u64,
    /// Whether the node starts elections from the start (off for a node whose empty log is in
    /// doubt: `node::prove` turns them on).
    pub elect: bool,
}

pub fn openraft_config(s: &RaftSettings) -> Result<Arc<RaftConfig>, openraft::ConfigError> {
    let cfg = RaftConfig {
        cluster_name: s.cluster.clone(),
        heartbeat_interval: s.heartbeat_ms,
        election_timeout_min: s.election_min_ms,
        election_timeout_max: s.election_max_ms,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(s.snapshot_threshold),
        // Keep some log after a snapshot so a briefly lagging follower catches up by log, and a
        // long snapshot transfer does not race with purging (openraft #1706).
        max_in_snapshot_log_to_keep: (s.snapshot_threshold / 2).max(10),
        purge_batch_size: 64,
        install_snapshot_timeout: 10_000,
        max_payload_entries: 512,
        enable_pre_vote: Some(true),
        // A restarted leader must win a new election, never resume its old term. The leader
        // replicates entries before its own fsync completes (openraft does, as Raft allows); a
        // power cut can then take entries from the leader's log that a follower already holds.
        // Resuming the same term, it would hand out those same log ids again for new entries,
        // and a follower keeping the old ones (same log id, so no conflict is detected) would
        // diverge. Found by the chaos suite's all-node power cut (deploy/chaos/README.md).
        enable_leader_restore: Some(false),
        // A follower whose log went back below what it acknowledged (its data directory was
        // lost) is replicated to from the start again; without this the leader resent the same
        // append forever and the follower never caught up (a debug build panicked instead).
        // The membership task makes such a voter a learner until it holds what it had
        // (`network::Reversions`).
        allow_log_reversion: Some(true),
        enable_elect: s.elect,
        ..Default::default()
    };
    Ok(Arc::new(cfg.validate()?))
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum ReplicaError {
    #[error("no leader or no quorum within the deadline")]
    Unavailable,
    /// This node's Raft core has stopped (a storage failure, said in its log): it takes no
    /// writes or reads until it is restarted; another node does.
    #[error("this node's raft has stopped (see its log: a storage failure stops it); ask another node")]
    Stopped,
    /// The deadline passed after the write was handed to a leader: it may still commit (a 503
    /// like `Unavailable`, issue 1's contract for no quorum, but the client learns that a plain
    /// retry may apply it twice).
    #[error("no quorum within the deadline; the write reached the leader and may still commit (repeat it with the same Idempotency-Key, or read it back, to learn its outcome)")]
    Undecided,
    /// Delivered to the leader, which did not answer before the link failed: not sent again
    /// (the write is not safe to apply twice), so its outcome is unknown.
    #[error("leader {leader}: {source}; the write reached the leader and its outcome is unknown (it may have committed): repeat it with the same Idempotency-Key, or read it back")]
    Forward { leader: NodeId, source: PeerError },
    #[error("{0}")]
    Remote(RemoteError),
    /// A command bigger than a log entry may be (`entry_limit`): refused before it is proposed,
    /// as an entry no peer frame carries would stall replication behind it.
    #[error("write of about {bytes} bytes is larger than a log entry may be ({limit} bytes)")]
    TooLarge { bytes: usize, limit: usize },
    #[error("raft: {0}")]
    Raft(String),
}

/// The Raft handle plus the peer network: write from anywhere, read linearizably anywhere.
#[derive(Clone)]
pub struct Replica {
    pub raft: Raft,
    pub net: Arc<PeerNet>,
    /// Queue of writes to forward to the leader; the batching task (`forwarder`) owns the
    /// receiver and ends when every `Replica` clone is gone.
    forward: mpsc::Sender<Forward>,
}

/// A write waiting to be forwarded, with where to send its outcome.
/// A write queued for the leader: the command, where its answer goes, and its caller's
/// deadline (past which the caller has given up and the write must not be sent).
type Forward = (Command, oneshot::Sender<Result<(u64, CommandResult), ForwardError>>, Instant);

/// Why a forwarded write has no result.
#[derive(Debug)]
enum ForwardError {
    Remote(RemoteError),
    Peer(PeerError),
}

/// `write_local`'s refusal when the core stopped before the write: nothing was proposed.
const CORE_STOPPED: &str = "this node's raft has stopped";

/// Writes forwarded per frame at most.
const FORWARD_BATCH: usize = 512;
/// Writes waiting to be forwarded at most (callers wait beyond it: backpressure).
const FORWARD_QUEUE: usize = 8192;

impl Replica {
    pub fn new(raft: Raft, net: Arc<PeerNet>) -> Replica {
        let (tx, rx) = mpsc::channel(FORWARD_QUEUE);
        let replica = Replica { raft, net, forward: tx };
        crate::supervise::spawn("write forwarder", forwarder(replica.raft.clone(), replica.net.clone(), rx));
        replica
    }

    pub fn id(&self) -> NodeId {
        self.net.node_id()
    }

    /// Whether every member (voters and learners, this node included) announced `feature` on
    /// its latest link since this node started, or, for one not linked since, as the state
    /// records (`PeerNet::features_known`): a command only newer builds decode may then be
    /// proposed. A member neither linked since nor recorded counts as without it.
    pub fn members_have(&self, feature: u64) -> bool {
        self.members_share() & feature == feature
    }

    /// The features every member announced, as `members_have` knows them (a member whose
    /// features are unknown shares none).
    pub fn members_share(&self) -> u64 {
        let watch = self.raft.metrics();
        let metrics = watch.borrow_watched();
        let since = metrics.membership_config.log_id().as_ref().map_or(0, |l| l.index);
        let shared = metrics.membership_config.membership().nodes().fold(u64::MAX, |acc, (id, _)| acc & self.net.features_known(*id, since).unwrap_or(0));
        shared
    }

    /// The members `members_have` finds without `feature`, for a refusal that names them (an
    /// older build added to the cluster holds every gated write back, and only its own log
    /// said why).
    pub fn members_lacking(&self, feature: u64) -> Vec<NodeId> {
        let watch = self.raft.metrics();
        let metrics = watch.borrow_watched();
        let since = metrics.membership_config.log_id().as_ref().map_or(0, |l| l.index);
        let lacking = metrics
            .membership_config
            .membership()
            .nodes()
            .filter(|(id, _)| self.net.features_known(**id, since).is_none_or(|f| f & feature == 0))
            .map(|(id, _)| *id)
            .collect();
        lacking
    }

    pub fn metrics(&self) -> RaftMetrics {
        self.raft.metrics().borrow_watched().clone()
    }

    /// The leader this node knows of; none once its Raft core has stopped (the core's last
    /// metrics keep naming the leader of that moment, maybe itself).
    pub fn leader(&self) -> Option<NodeId> {
        let rx = self.raft.metrics();
        let m = rx.borrow_watched();
        // A leader that removed itself steps down and still names itself: no leader here.
        let stepped_down = m.current_leader == Some(m.id) && m.state != openraft::ServerState::Leader;
        if m.running_state.is_err() || stepped_down { None } else { m.current_leader }
    }

    /// This node leads and has applied an entry of its own term, so everything committed
    /// before its election too (openraft applies in order). Until then a new leader's state
    /// lags what the cluster committed: a loop that acts on it as leader (the shared dispatch)
    /// would see acked or dead-lettered events as still open, and hand them out again.
    pub fn leads_caught_up(&self) -> bool {
        let rx = self.raft.metrics();
        let m = rx.borrow_watched();
        m.state == openraft::ServerState::Leader && m.running_state.is_ok() && m.last_applied.is_some_and(|l| l.committed_leader_id().term == m.current_term)
    }

    /// The core has stopped on its own (or was shut down): nothing sent to it is taken.
    fn core_is_stopped(&self) -> bool {
        self.raft.metrics().borrow_watched().running_state.is_err()
    }

    /// Wait (bounded by `deadline`) until a leader is known.
    async fn wait_leader(&self, deadline: Instant) -> Result<NodeId, ReplicaError> {
        let mut rx = self.raft.metrics();
        loop {
            let (stopped, leader) = {
                let m = rx.borrow_and_update();
                (m.running_state.is_err(), m.current_leader)
            };
            if stopped {
                return Err(ReplicaError::Stopped);
            }
            if let Some(l) = leader {
                return Ok(l);
            }
            // A closed channel (the core has ended) would answer at once, forever: unavailable.
            if !matches!(tokio::time::timeout_at(deadline, rx.changed()).await, Ok(Ok(()))) {
                return Err(ReplicaError::Unavailable);
            }
        }
    }

    /// Resolves when the Raft core has stopped on its own (a failed log or snapshot write, a
    /// panic in the core): from then on this node can neither vote nor replicate nor apply, and
    /// openraft's last metrics (leader, term) go stale. Returns why. Only for a core that stops
    /// unasked: after `Raft::shutdown` this resolves too.
    pub async fn core_stopped(&self) -> String {
        // The server metrics change rarely (state, leader, vote), unlike the full metrics (every
        // log index): waiting on them wakes this task a few times, not per entry. Their sender
        // lives in the core, so `changed` errs once the core has ended.
        let mut rx = self.raft.server_metrics();
        // Bounded by events: each pass consumes one change, and the core's end ends it.
        while rx.changed().await.is_ok() {}
        match &self.raft.metrics().borrow_watched().running_state {
            Err(fatal) => fatal.to_string(),
            Ok(()) => "the raft core's task ended".into(),
        }
    }

    /// Commit a command through the leader, forwarding from a follower. Returns the log index and
    /// the command's result, only after the entry is committed and applied.
    pub async fn write(&self, cmd: Command, timeout: Duration) -> Result<(u64, CommandResult), ReplicaError> {
        // Every member's frame, not only ours: an entry larger than a member's frame could
        // never be replicated to it.
        let limit = entry_limit(self.net.cluster_frame());
        let bytes = cmd.approx_size();
        if bytes > limit {
            return Err(ReplicaError::TooLarge { bytes, limit });
        }
        let deadline = Instant::now() + timeout;
        // Bounded: each pass either returns or waits (at least 20 ms) for a leader change, and
        // the deadline ends it (at most `--write-timeout-ms`, 5 minutes: about 1,400 passes). It
        // gave up after 64 passes, about 13 s, whatever the deadline.
        // Whether any attempt may have been proposed (handed to this node's core, or delivered
        // to a leader that did not say "not me"): from then on a deadline cannot say that
        // nothing was, and the 503 tells the client so.
        let mut reached = false;
        let gave_up = |reached: bool| if reached { ReplicaError::Undecided } else { ReplicaError::Unavailable };
        for attempt in 0..4_096u32 {
            let leader = self.wait_leader(deadline).await.map_err(|e| match e {
                ReplicaError::Stopped if !reached => ReplicaError::Stopped,
                _ => gave_up(reached),
            })?;
            let outcome = if leader == self.id() {
                let outcome = tokio::time::timeout_at(deadline, self.write_local(cmd.clone())).await.map_err(|_| ReplicaError::Undecided)?;
                // "Not the leader" (openraft refuses before appending) and a stopped core
                // proposed nothing; any other refusal may have come after the proposal.
                reached |= match &outcome {
                    Ok(_) | Err(RemoteError::NotLeader { .. }) | Err(RemoteError::NotServed(_)) => false,
                    Err(RemoteError::Unavailable(m)) => !m.starts_with(CORE_STOPPED),
                    Err(_) => true,
                };
                outcome
            } else {
                let (tx, rx) = oneshot::channel();
                if tokio::time::timeout_at(deadline, self.forward.send((cmd.clone(), tx, deadline))).await.is_err() {
                    return Err(gave_up(reached));
                }
                match tokio::time::timeout_at(deadline, rx).await {
                    // Perhaps still in the forwarder's queue, perhaps proposed: unknown.
                    Err(_) => return Err(ReplicaError::Undecided),
                    Ok(Err(_)) => Err(RemoteError::Unavailable("forwarder stopped".into())),
                    Ok(Ok(Ok(r))) => Ok(r),
                    Ok(Ok(Err(ForwardError::Remote(e)))) => {
                        // A leader that answered "not me" or "not served" proposed nothing;
                        // any other refusal may have come after its proposal.
                        reached |= !matches!(e, RemoteError::NotLeader { .. } | RemoteError::NotServed(_));
                        Err(e)
                    }
                    Ok(Ok(Err(ForwardError::Peer(PeerError::Timeout { .. })))) => return Err(ReplicaError::Undecided),
                    Ok(Ok(Err(ForwardError::Peer(e)))) if e.not_delivered() || cmd.retry_safe() => {
                        reached |= !e.not_delivered();
                        Err(RemoteError::Unavailable(e.to_string()))
                    }
                    Ok(Ok(Err(ForwardError::Peer(source)))) => return Err(ReplicaError::Forward { leader, source }),
                }
            };
            match outcome {
                Ok(r) => return Ok(r),
                Err(RemoteError::NotLeader { .. }) | Err(RemoteError::Unavailable(_)) | Err(RemoteError::NotServed(_)) => {
                    debug!(attempt, leader, "write retry: leader moved or unreachable");
                    // Let the membership/leader view settle; bounded by the deadline.
                    let pause = Duration::from_millis(20 * u64::from(attempt.min(10) + 1));
                    if Instant::now() + pause >= deadline {
                        return Err(gave_up(reached));
                    }
                    tokio::time::sleep(pause).await;
                }
                Err(e) => return Err(ReplicaError::Remote(e)),
            }
        }
        Err(gave_up(reached))
    }

    /// Propose on this node, which must be the leader (serves forwarded writes too).
    pub async fn write_local(&self, cmd: Command) -> Result<(u64, CommandResult), RemoteError> {
        // Stopped before this write: it cannot reach the core, so any node may take it instead.
        if self.core_is_stopped() {
            return Err(RemoteError::Unavailable(CORE_STOPPED.into()));
        }
        let retry_safe = cmd.retry_safe();
        match self.raft.client_write(cmd).await {
            Ok(resp) => Ok((resp.log_id.index, resp.data)),
            Err(openraft::error::RaftError::APIError(e)) => Err(write_error(e, retry_safe)),
            Err(openraft::error::RaftError::Fatal(e)) => Err(stopped_error(&e, retry_safe)),
        }
    }

    /// Leader side of a forwarded batch: propose all in one call, answer in order.
    pub async fn write_batch_local(&self, cmds: Vec<Command>) -> Vec<Result<(u64, CommandResult), RemoteError>> {
        use futures_util::StreamExt;
        let n = cmds.len();
        let retry_safe: Vec<bool> = cmds.iter().map(Command::retry_safe).collect();
        let stream = match self.raft.client_write_many(cmds).await {
            Ok(s) => s,
            // Refused before anything was proposed (the core had stopped): safe to send elsewhere.
            Err(e) => return vec![Err(RemoteError::Unavailable(e.to_string())); n],
        };
        let mut out: Vec<Result<(u64, CommandResult), RemoteError>> = stream
            .enumerate()
            .map(|(i, r)| match r {
                Ok(Ok(resp)) => Ok((resp.log_id.index, resp.response)),
                Ok(Err(e)) => Err(write_error(e, retry_safe.get(i).copied().unwrap_or(false))),
                Err(fatal) => Err(stopped_error(&fatal, retry_safe.get(i).copied().unwrap_or(false))),
            })
            .collect()
            .await;
        // The stream ends at the first stopped one: the rest were handed to the core too.
        for safe in retry_safe.iter().skip(out.len()) {
            out.push(Err(stopped_error(&openraft::error::Fatal::Stopped, *safe)));
        }
        out
    }

    /// Leader side of a read barrier: confirm leadership with a quorum, return the read index.
    pub async fn read_index_local(&self) -> Result<u64, RemoteError> {
        match self.raft.get_read_linearizer(ReadPolicy::ReadIndex).await {
            Ok(lin) => Ok(lin.read_log_id().index()),
            Err(openraft::error::RaftError::APIError(openraft::error::LinearizableReadError::ForwardToLeader(f))) => {
                Err(RemoteError::NotLeader { leader: f.leader_id })
            }
            Err(openraft::error::RaftError::APIError(e)) => Err(RemoteError::Unavailable(e.to_string())),
            // A read barrier changes nothing: always safe to ask another leader.
            Err(openraft::error::RaftError::Fatal(e)) => Err(RemoteError::Unavailable(e.to_string())),
        }
    }

    /// Make the next local read linearizable: get a read index from the leader (this node or a
    /// peer) and wait until this node has applied up to it.
    pub async fn read_barrier(&self, timeout: Duration) -> Result<(), ReplicaError> {
        let deadline = Instant::now() + timeout;
        for attempt in 0..64u32 {
            let leader = self.wait_leader(deadline).await?;
            let outcome = if leader == self.id() {
                tokio::time::timeout_at(deadline, self.read_index_local()).await.map_err(|_| ReplicaError::Unavailable)?
            } else {
                let left = deadline.saturating_duration_since(Instant::now());
                match self.net.request(leader, &PeerRequest::ReadIndex, left).await {
                    Ok(PeerResponse::ReadIndex(i)) => Ok(i),
                    Ok(PeerResponse::Error(e)) => Err(e),
                    Ok(other) => Err(RemoteError::Internal(format!("unexpected {other:?}"))),
                    Err(PeerError::Timeout { .. }) => return Err(ReplicaError::Unavailable),
                    Err(e) => Err(RemoteError::Unavailable(e.to_string())),
                }
            };
            match outcome {
                Ok(index) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    return self
                        .raft
                        .wait(Some(left))
                        .applied_index_at_least(Some(index), "read barrier")
                        .await
                        .map(|_| ())
                        .map_err(|_| ReplicaError::Unavailable);
                }
                Err(RemoteError::NotLeader { .. }) | Err(RemoteError::Unavailable(_)) | Err(RemoteError::NotServed(_)) => {
                    let pause = Duration::from_millis(20 * u64::from(attempt.min(10) + 1));
                    if Instant::now() + pause >= deadline {
                        return Err(ReplicaError::Unavailable);
                    }
                    tokio::time::sleep(pause).await;
                }
                Err(e) => return Err(ReplicaError::Remote(e)),
            }
        }
        Err(ReplicaError::Unavailable)
    }
}

/// Room in a frame for everything of a `WrittenBatch` but its answers: the frame header, the
/// response's tag and the list's length (each answer's own encoding is counted exactly).
const ANSWER_HEADROOM: usize = 1 << 10;

/// Leader side of a forwarded batch's reply: keeps its answers within one frame of `max_frame`.
/// The forwarder cuts a batch by the size of its commands, but a command's answer can be far
/// larger than the command: `IdemBegin` answers a finished request with its stored response (up
/// to half a frame), and several of them would make a reply no frame can carry (the link would
/// close and every write on it fail). Answers are kept in order while they fit; an `IdemBegin`'s
/// replayed response (`replayable[i]`) that no longer fits is withheld as `Unavailable`, which
/// the follower's `Replica::write` retries in a later batch, where it comes first. Asking again
/// is safe and cheap: `IdemBegin` on a finished key changes nothing and answers the same. Every
/// other answer goes: an `IdemComplete`'s answer repeats its command's body, and the forwarder
/// cut the batch's commands at half a frame; the rest are small (revisions, positions). The
/// first answer always goes (alone it fits: a stored response is at most half a frame), so a
/// retried replay, which comes first in its next batch, is never withheld again.
pub fn fit_answers(
    mut results: Vec<Result<(u64, CommandResult), RemoteError>>,
    replayable: &[bool],
    max_frame: usize,
) -> Vec<Result<(u64, CommandResult), RemoteError>> {
    // Nothing to withhold (a forwarded batch of events, the hot path): no answer is measured.
    if !replayable.contains(&true) {
        return results;
    }
    let budget = max_frame.saturating_sub(ANSWER_HEADROOM);
    let mut used = 0usize;
    for (i, r) in results.iter_mut().enumerate() {
        let size = bincode::serialized_size(&*r).map_or(usize::MAX, |n| usize::try_from(n).unwrap_or(usize::MAX));
        let replay = replayable.get(i).copied().unwrap_or(false) && matches!(r, Ok((_, CommandResult::IdemDone(_))));
        if replay && i > 0 && used.saturating_add(size) > budget {
            metrics::counter!("raftbridge_forward_answers_withheld_total").increment(1);
            *r = Err(RemoteError::Unavailable("answer withheld: the batch's answers would not fit a frame; ask again".into()));
            continue;
        }
        used = used.saturating_add(size);
    }
    results
}

/// The largest command (by `Command::approx_size`) that becomes a log entry, for peer frames of
/// `max_frame` bytes: one entry always goes alone in an AppendEntries request, so it must fit a
/// frame with room for the request's own fields (an eighth of it). The size limits of the paths
/// in (`--max-body`, events' `max_group_bytes`, command answers) are half a frame, and an event
/// entry may carry subscription progress besides; this catches what slips past.
pub fn entry_limit(max_frame: usize) -> usize {
    max_frame - max_frame / 8
}

/// Forwards queued writes to the leader, many per frame. Each batch is sent by its own task so
/// the next batch forms while one is in flight; what queues up meanwhile is the next batch.
async fn forwarder(raft: Raft, net: Arc<PeerNet>, mut rx: mpsc::Receiver<Forward>) {
    // A write that did not fit into the previous batch goes first into the next.
    let mut held = None;
    loop {
        // Sized for the leader's link (its `--max-frame` may be smaller than ours).
        let budget = raft.metrics().borrow_watched().current_leader.map_or(net.max_frame(), |l| net.max_frame_to(l)) / 2;
        let Some(items) = next_batch(&mut rx, budget, &mut held).await else { return };
        let leader = raft.metrics().borrow_watched().current_leader;
        let net = net.clone();
        tokio::spawn(async move {
            let Some(leader) = leader else {
                for (_, tx, _) in items {
                    let _ = tx.send(Err(ForwardError::Remote(RemoteError::NotLeader { leader: None })));
                }
                return;
            };
            // Bounded by the latest caller's deadline (and `FORWARD_TIMEOUT`): the send itself
            // may wait for the link (a dial, a free place among the requests outstanding on
            // it), and a batch sent after every caller was told "unavailable" (503: nothing
            // happened, retry) could commit a write its caller then sent again. With the
            // deadline, a batch still waiting for the link when it passes is never sent.
            let timeout = send_within(&items, Instant::now());
            let deadline = Instant::now() + timeout;
            // The link first, within the same bound (a dial takes up to a few seconds).
            let link = match tokio::time::timeout_at(deadline, net.link(leader)).await {
                Ok(Ok(link)) => link,
                failed => {
                    let e = match failed {
                        Ok(Err(e)) => e,
                        _ => PeerError::NoLinkInTime { peer: leader.to_string(), timeout },
                    };
                    for (_, tx, _) in items {
                        let _ = tx.send(Err(ForwardError::Peer(e.clone())));
                    }
                    return;
                }
            };
            // The batch is made once it has its place on the link (`Link::call_made`), of the
            // writes whose callers still wait then: one whose caller heard 503 while the batch
            // waited for the link stays unsent (a place among the outstanding requests, room
            // in the send queue: the frame is written in the queue's order).
            let mut txs = Vec::new();
            let mut unmade = Some(items);
            let make = || {
                let now = Instant::now();
                let (cmds, kept): (Vec<Command>, Vec<_>) = unmade
                    .take()
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|(_, tx, until)| !tx.is_closed() && *until > now)
                    .map(|(cmd, tx, _)| (cmd, tx))
                    .unzip();
                txs = kept;
                (!cmds.is_empty()).then_some(PeerRequest::WriteBatch(cmds))
            };
            let sent = match link.call_made(deadline, make).await {
                // Every caller gave up: nothing sent, and nobody to answer.
                Ok(None) => return,
                Ok(Some(answer)) => Ok(answer),
                Err(e) => Err(e),
            };
            // Not made (no place on the link in time, or it closed): unsent, said as such.
            if let (Some(items), Err(e)) = (unmade, &sent) {
                for (_, tx, _) in items {
                    let _ = tx.send(Err(ForwardError::Peer(e.clone())));
                }
                return;
            }
            let n = txs.len();
            match sent {
                Ok(PeerResponse::WrittenBatch(results)) if results.len() == n => {
                    for (tx, r) in txs.into_iter().zip(results) {
                        let _ = tx.send(r.map_err(ForwardError::Remote));
                    }
                }
                Ok(PeerResponse::Error(e)) => {
                    for tx in txs {
                        let _ = tx.send(Err(ForwardError::Remote(e.clone())));
                    }
                }
                Ok(other) => {
                    let e = RemoteError::Internal(format!("unexpected {}", response_name(&other)));
                    for tx in txs {
                        let _ = tx.send(Err(ForwardError::Remote(e.clone())));
                    }
                }
                Err(e) => {
                    for tx in txs {
                        let _ = tx.send(Err(ForwardError::Peer(e.clone())));
                    }
                }
            }
        });
    }
}

/// Waits for a write, then lets every task that is ready to run go first (one yield) and takes
/// whatever is queued by then, up to `FORWARD_BATCH`: writers woken by the same I/O poll share
/// one forwarded batch. Without the yield, on the multi-thread scheduler the first writer's send
/// woke this task straight away (a task woken by the running one runs next) and most batches
/// held one write; on the current-thread scheduler the yield costs one pass of the run queue. Measured
/// (`raftbridge bench state`, 3 nodes, 64 connections): 22,000 → 23,900 writes/s, node CPU per
/// write 60 → 55 µs. `None` once every sender is gone.
async fn next_batch(rx: &mut mpsc::Receiver<Forward>, budget: usize, held: &mut Option<Forward>) -> Option<Vec<Forward>> {
    // Grows to what the batch holds. Not `with_capacity(FORWARD_BATCH)`: a `Forward` is 128
    // bytes, and reserving 512 of them (64 KiB) per batch of usually a few writes cost ~10% of
    // a follower's CPU in fresh allocator pages (measured with perf).
    // A write whose caller has given up (its deadline passed while it queued) is not sent: it
    // would commit after its caller was told it failed.
    let first = loop {
        let f = match held.take() {
            Some(f) => f,
            None => rx.recv().await?,
        };
        if !f.1.is_closed() {
            break f;
        }
    };
    let mut bytes = first.0.approx_size();
    let mut batch = vec![first];
    tokio::task::yield_now().await;
    while batch.len() < FORWARD_BATCH {
        match rx.try_recv() {
            Ok(f) if f.1.is_closed() => {}
            Ok(f) => {
                // Bytes too: the batch is one frame (the first write always goes; each one is
                // bounded by --max-body or the broker's group bound, both half a frame).
                let size = f.0.approx_size();
                if bytes + size > budget {
                    *held = Some(f);
                    break;
                }
                bytes += size;
                batch.push(f);
            }
            Err(_) => break,
        }
    }
    Some(batch)
}

/// How long one forwarded batch may take at most; its callers' deadlines bound it first
/// (`send_within`). As long as the longest `--write-timeout-ms`: at 30 s, a forwarded write
/// gave up before a longer deadline, which one proposed on the leader waits out.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(300);

/// How long the batch `items` may take from `now`, its send included: until the latest of its
/// callers' deadlines, at most `FORWARD_TIMEOUT`; zero once every caller has given up.
fn send_within(items: &[Forward], now: Instant) -> Duration {
    items.iter().map(|(_, _, d)| d.saturating_duration_since(now)).max().unwrap_or_default().min(FORWARD_TIMEOUT)
}

pub fn response_name(r: &PeerResponse) -> &'static str {
    match r {
        PeerResponse::AppendEntries(_) => "AppendEntries",
        PeerResponse::Vote(_) => "Vote",
        PeerResponse::Snapshot(_) => "Snapshot",
        PeerResponse::TransferLeader => "TransferLeader",
        PeerResponse::Status(_) => "Status",
        PeerResponse::Written { .. } => "Written",
        PeerResponse::ReadIndex(_) => "ReadIndex",
        PeerResponse::Done => "Done",
        PeerResponse::Error(_) => "Error",
        PeerResponse::WrittenBatch(_) => "WrittenBatch",
        PeerResponse::Invoked(_) => "Invoked",
        PeerResponse::Delivered(_) => "Delivered",
        PeerResponse::DeliveredBatch(_) => "DeliveredBatch",
        PeerResponse::DeliveredEach { .. } => "DeliveredEach",
        PeerResponse::DeliveredSome(_) => "DeliveredSome",
        PeerResponse::InvokedWith { .. } => "InvokedWith",
        PeerResponse::PullAnswered { .. } => "PullAnswered",
    }
}

/// A write the Raft core took but could not finish because it stopped (a failed disk, a
/// shutdown): it may have been replicated and may still commit, so like a discarded entry it is
/// sent elsewhere only when running it twice changes nothing; otherwise its outcome is unknown.
fn stopped_error(e: &openraft::error::Fatal<TypeConfig>, retry_safe: bool) -> RemoteError {
    if retry_safe {
        RemoteError::Unavailable(e.to_string())
    } else {
        RemoteError::Internal(format!("{STOPPED}: {e}"))
    }
}

/// A proposal appended on a leader that lost its leadership before the entry committed.
/// How a write whose leader's core stopped under it begins its message (`stopped_error`).
pub(crate) const STOPPED: &str = "outcome unknown";
pub(crate) const DISCARDED: &str = "the write was appended on a leader that lost its leadership before it committed, and its entry was discarded there";

/// What a refused proposal means for its sender. Rejected before its entry was appended: not
/// the leader, send it there. Appended, then discarded when this node took another leader's log:
/// the outcome is unknown (it may still commit), so only a command that may be applied twice is
/// retried (`Unavailable`); any other gets a gateway error, never a 400 (the chaos suite saw a
/// keyed increment answered 400 after a leader change). Anything else is about the request.
fn write_error(e: ClientWriteError, retry_safe: bool) -> RemoteError {
    match e {
        ClientWriteError::ForwardToLeader(f) => RemoteError::NotLeader { leader: f.leader_id },
        // In words: openraft's own text shows its types' debug form (`Some(BasicNode { .. })`).
        ClientWriteError::LogEntryDiscarded(_) if retry_safe => RemoteError::Unavailable(DISCARDED.into()),
        ClientWriteError::LogEntryDiscarded(_) => RemoteError::Internal(format!("{DISCARDED}: its outcome is unknown (it may have committed, or may still commit); repeat it with the same Idempotency-Key, or read it back")),
        other => RemoteError::Invalid(other.to_string()),
    }
}


#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::error::ApiError;

    #[tokio::test]
    async fn a_forwarded_batch_takes_what_writers_that_were_ready_queue() {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<super::Forward>(64);
        // Each writer's receiver stays with it, as a caller waiting for its answer does.
        let write = |tx: tokio::sync::mpsc::Sender<super::Forward>| async move {
            let (reply, rx) = tokio::sync::oneshot::channel();
            let cmd = super::Command::Delete { store: "s".into(), key: "k".into(), if_revision: None };
            tx.send((cmd, reply, Instant::now() + Duration::from_secs(5))).await.expect("forwarder listening");
            // In an Option: a bare receiver is itself a future (clippy's async_yields_async).
            Some(rx)
        };
        // Writers ready to run (spawned, not yet polled) while the first write wakes the forwarder.
        let writers: Vec<_> = (0..5).map(|_| tokio::spawn(write(tx.clone()))).collect();
        let _waiting = write(tx.clone()).await;
        let mut held = None;
        let batch = super::next_batch(&mut rx, usize::MAX, &mut held).await.expect("a batch");
        assert_eq!(batch.len(), 6, "the five ready writers' writes join the first");
        let mut waiting = Vec::new();
        for w in writers {
            waiting.push(w.await.expect("writer ran"));
        }
        // A write whose caller has gone (its deadline passed while it queued) is not sent.
        let gone = write(tx.clone()).await;
        drop(gone);
        let _kept = write(tx.clone()).await;
        let (cmd, reply) = (super::Command::Delete { store: "s".into(), key: "gone".into(), if_revision: None }, tokio::sync::oneshot::channel().0);
        tx.send((cmd, reply, Instant::now() + Duration::from_secs(5))).await.expect("room");
        let batch = super::next_batch(&mut rx, usize::MAX, &mut held).await.expect("a batch");
        assert_eq!(batch.len(), 1, "only the write whose caller waits");
        assert!(!batch[0].1.is_closed());
        drop(tx);
        assert!(super::next_batch(&mut rx, usize::MAX, &mut held).await.is_none(), "no senders left: done");
    }

    /// A forwarded batch may take, its send to the leader included, until the latest of its
    /// callers' deadlines: one still waiting for the link when that passes is never sent (its
    /// callers were told 503, nothing happened).
    #[test]
    fn a_forwarded_batch_is_sent_only_within_its_callers_deadlines() {
        let now = Instant::now();
        let item = |after: Duration| {
            let cmd = super::Command::Delete { store: "s".into(), key: "k".into(), if_revision: None };
            (cmd, tokio::sync::oneshot::channel().0, now + after)
        };
        let ms = Duration::from_millis;
        assert_eq!(send_within(&[item(ms(200)), item(ms(900)), item(ms(50))], now), ms(900));
        assert_eq!(send_within(&[item(ms(200))], now + ms(300)), Duration::ZERO, "every caller gave up: not sent");
        assert_eq!(send_within(&[item(Duration::from_secs(400))], now), FORWARD_TIMEOUT);
    }

    #[tokio::test]
    async fn a_forwarded_batch_stays_within_its_bytes_and_keeps_the_rest_in_order() {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<super::Forward>(64);
        let put = |n: usize| {
            let value = vec![b'1'; n];
            super::Command::Put { store: "s".into(), key: format!("k{n}"), value, if_revision: None, tag: None }
        };
        // 40 KB, 40 KB, 40 KB under a 100 KB budget: two, then the third leads the next batch.
        let mut waiting = Vec::new();
        for n in [40_000, 40_001, 40_002] {
            let (reply, rx) = tokio::sync::oneshot::channel();
            waiting.push(rx);
            tx.send((put(n), reply, Instant::now() + Duration::from_secs(5))).await.expect("room");
        }
        let keys = |b: &[super::Forward]| -> Vec<String> {
            b.iter().map(|(c, _, _)| match c { super::Command::Put { key, .. } => key.clone(), _ => String::new() }).collect()
        };
        let mut held = None;
        let first = super::next_batch(&mut rx, 100_000, &mut held).await.expect("a batch");
        assert_eq!(keys(&first), vec!["k40000", "k40001"]);
        let second = super::next_batch(&mut rx, 100_000, &mut held).await.expect("a batch");
        assert_eq!(keys(&second), vec!["k40002"], "the held write goes first, alone if need be");
        // One write larger than the budget still goes (each is bounded at half a frame).
        let (reply, _waits) = tokio::sync::oneshot::channel();
        tx.send((put(200_000), reply, Instant::now() + Duration::from_secs(5))).await.expect("room");
        assert_eq!(super::next_batch(&mut rx, 100_000, &mut held).await.expect("a batch").len(), 1);
    }

    #[test]
    fn a_discarded_entry_is_retried_only_when_safe_and_is_never_a_400() {
        let to = || openraft::error::ForwardToLeader::new(3, BasicNode { addr: "127.0.0.1:1".into() });
        let status = |e: RemoteError| ApiError::from(e).status().as_u16();

        let e = write_error(ClientWriteError::LogEntryDiscarded(to()), true);
        assert!(matches!(e, RemoteError::Unavailable(_)), "{e:?}: the write loop retries it");
        assert_eq!(status(e), 503);

        let e = write_error(ClientWriteError::LogEntryDiscarded(to()), false);
        assert!(matches!(e, RemoteError::Internal(_)), "{e:?}: outcome unknown, not retried");
        let message = ApiError::from(e.clone()).to_string();
        assert!(message.contains("outcome is unknown") && !message.contains("BasicNode") && !message.contains("Some("), "in words: {message}");
        assert_eq!(status(e), 502);

        let e = write_error(ClientWriteError::ForwardToLeader(to()), false);
        assert!(matches!(e, RemoteError::NotLeader { leader: Some(3) }), "{e:?}");
        assert_eq!(status(e), 503);
    }

    #[test]
    fn a_batch_reply_keeps_its_answers_within_a_frame() {
        let frame = 1 << 20;
        let replay = |kib: usize| Ok((7, CommandResult::IdemDone(StoredResponse { status: 200, body: vec![b'x'; kib << 10], content_type: None, headers: Vec::new() })));
        let small = || Ok((8, CommandResult::Written { revision: 3 }));
        let results = vec![replay(600), small(), replay(450), replay(100), small(), replay(500), Err(RemoteError::Invalid("bad".into()))];
        let begins = [true; 7];
        let fitted = super::fit_answers(results.clone(), &begins, frame);
        let withheld: Vec<usize> = fitted.iter().enumerate().filter(|(_, r)| matches!(r, Err(RemoteError::Unavailable(_)))).map(|(i, _)| i).collect();
        assert_eq!(withheld, vec![2, 5], "replays kept in order while they fit: 600 + 100 KiB kept of a 1023 KiB budget, 450 and 500 withheld");
        let kept_small = fitted.iter().filter(|r| matches!(r, Ok((_, CommandResult::Written { .. })))).count();
        assert_eq!(kept_small, 2, "small answers always go");
        assert!(matches!(fitted[6], Err(RemoteError::Invalid(_))), "errors are passed on as they are");
        let size = bincode::serialized_size(&crate::peer::message::PeerResponse::WrittenBatch(fitted)).unwrap();
        assert!(size <= frame as u64, "{size} bytes fit a frame of {frame}");
        // Two stored responses of half a frame each fit, with the headroom.
        let halves = super::fit_answers(vec![replay(511), replay(511)], &begins, frame);
        assert!(halves.iter().all(Result::is_ok));
        // Withheld answers are asked again by the follower's write loop.
        assert!(matches!(super::fit_answers(vec![replay(600), replay(600)], &begins, frame)[1], Err(RemoteError::Unavailable(_))));
        // An IdemComplete's answer is never withheld (asking again would log its body again).
        let completes = super::fit_answers(vec![replay(600), replay(600)], &[false, false], frame);
        assert!(completes.iter().all(Result::is_ok));
    }
}

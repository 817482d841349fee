//! openraft's network over our peer links.
//!
//! Each Raft RPC is one request on the shared link to the target. Snapshots are sent in chunks of
//! at most `SNAPSHOT_CHUNK` bytes so no frame exceeds the peer frame bound, whatever the state size;
//! the receiver (`node::Node`) reassembles and validates before installing.
//!
//! *Pipelined replication.* A leader keeps up to `PIPELINE` AppendEntries in flight to a follower
//! (`stream_append`) instead of waiting for each response before sending the next. Why: when an
//! entry commits, openraft sends its commit index in an AppendEntries of its own, and the
//! broker's next entry (proposed as soon as the previous one is applied) waited behind that
//! request's round trip. The follower must then take them in order: `AppendLanes` hands each
//! leader's requests to `Raft::stream_append` in arrival order (the peer layer calls the handler
//! in arrival order), which answers them in order as they are flushed. A leader pipelines only to
//! peers that announce `features::ORDERED_APPENDS`; to older builds it sends one at a time.

use std::collections::HashMap;
use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::Weak;
use std::time::Duration;

use futures_util::Stream;
use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;
use tokio::sync::mpsc;
use tokio::sync::oneshot;

use openraft::error::NetworkError;
use openraft::error::ReplicationClosed;
use openraft::error::Timeout;
use openraft::error::Unreachable;
use openraft::network::RPCOption;
use openraft::network::RPCTypes;

use crate::lock;
use crate::peer::Link;
use crate::peer::PeerError;
use crate::peer::PeerNet;
use crate::peer::frame::features;
use crate::peer::message::PeerRequest;
use crate::peer::message::PeerResponse;
use crate::peer::message::RemoteError;
use crate::raft::types::*;

/// Bytes of snapshot per frame at most (well under the default 16 MiB frame bound); less to a
/// peer whose frame is smaller (`snapshot_chunk`).
pub const SNAPSHOT_CHUNK: usize = 1 << 20;

/// Bytes of snapshot per chunk to a peer whose frames are at most `max_frame` bytes: half of
/// it (the rest holds the chunk's vote and meta, whose membership is small), at most
/// `SNAPSHOT_CHUNK`. A fixed 1 MiB chunk did not fit a frame under about 1 MiB (`--max-frame`
/// takes 64 KiB up): the link refused every chunk before it was sent, and a follower that
/// needed a snapshot never caught up.
pub fn snapshot_chunk(max_frame: usize) -> usize {
    (max_frame / 2).clamp(1, SNAPSHOT_CHUNK)
}

/// Deadline of an AppendEntries request that carries entries (see `append_entries`), and of
/// every request of a pipelined stream (it may wait behind the ones before it).
const REPLICATION_TIMEOUT: Duration = Duration::from_secs(2);
/// AppendEntries with entries a leader keeps in flight to one follower at most (a commit-only
/// request, which holds no entries, may go on top). Enough for the commit-only request and the
/// next entries to overlap; each may be up to half a frame, so this also bounds what one stream
/// holds in memory.
const PIPELINE: usize = 4;
/// How long a commit-only AppendEntries (openraft sends one when an entry commits and no later
/// request has carried the new commit index) waits for a request with entries to carry it
/// instead. Under load the broker proposes its next entry right after the previous one applies,
/// so the commit index rides along and the follower serves one request per entry instead of
/// two; when nothing follows, followers learn the commit index this much later.
const COMMIT_HOLD: Duration = Duration::from_millis(1);
/// AppendEntries from one leader waiting for the follower's Raft core at most.
const LANE_QUEUE: usize = 1024;
/// Bytes (`approx_bytes`) of AppendEntries one leader's lane holds at most: queued, or taken by
/// openraft (which buffers up to 64 of a stream) and not yet answered. A live stream has at
/// most `PIPELINE` + 1 requests out, each of at most half a frame; more is a leader's resends
/// from streams it gave up on (every `REPLICATION_TIMEOUT`) while this node's disk stalls,
/// which `LANE_QUEUE` alone let grow to gigabytes. A request into an empty lane is always
/// taken, so no frame size can stall one.
const LANE_BYTES: usize = 128 << 20;

/// About the bytes an AppendEntries takes: its commands' sizes plus an allowance per entry.
fn approx_bytes(rpc: &AppendEntriesRequest) -> usize {
    64 + rpc
        .entries
        .iter()
        .map(|e| match &e.payload {
            openraft::EntryPayload::Normal(cmd) => 64 + cmd.approx_size(),
            _ => 256,
        })
        .sum::<usize>()
}

/// Whether a lane holding `held` bytes takes a request of `bytes` more (`LANE_BYTES`).
fn lane_takes(held: usize, bytes: usize) -> bool {
    held == 0 || held.saturating_add(bytes) <= LANE_BYTES
}

pub struct Network {
    pub net: Arc<PeerNet>,
    pub reversions: Arc<Reversions>,
    pub outsider: Arc<Outsider>,
}

/// How a member refuses a vote or pre-vote from a node outside its membership (`node`): the
/// message starts with this.
pub const NOT_A_MEMBER: &str = "not a member of this cluster";

/// Which members told this node that it is no member: it was removed while it ran. No leader
/// replicates to a removed node, so it may never learn the change from its log (not even its
/// first half), and campaigns in vain every election timeout (openraft would even grant its
/// votes). Noted by this node's vote calls when a member refuses one so; the membership task
/// takes them and believes them once a majority of the other voters it knows said so
/// (`Cluster`), then stops this node's elections.
#[derive(Default)]
pub struct Outsider {
    /// Members that said so since the membership task last looked; one entry per member.
    told_by: Mutex<std::collections::BTreeSet<NodeId>>,
}

impl Outsider {
    /// The members that said so since the last call.
    pub fn take(&self) -> std::collections::BTreeSet<NodeId> {
        std::mem::take(&mut *lock(&self.told_by))
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> PeerClient {
        self.net.set_peer_addr(target, &node.addr);
        PeerClient { target, net: self.net.clone(), reversions: self.reversions.clone(), outsider: self.outsider.clone() }
    }
}

/// Followers whose log went back below what they had acknowledged to this leader: their data
/// directory was lost (wiped, a new disk) and the node came back under the same id.
///
/// Why here: a leader learns it only from a follower's answers, which pass through this module.
/// openraft, with `allow_log_reversion`, then replicates to that follower from the start (without
/// it, the leader resent the same append forever and the follower never caught up); but the
/// follower is still a voter with an empty log and no memory of its votes, so it would vote for
/// a candidate that lacks entries it had helped commit. The cluster's membership task takes what
/// is found here and makes such a voter a learner until it holds again all it had acknowledged
/// (`cluster::Cluster`). Acks count per leader term: an entry acknowledged to an earlier term of
/// this node may have been replaced by another leader's since, which is no reversion.
#[derive(Default)]
pub struct Reversions {
    /// Per follower: (this node's leader term, highest index the follower acknowledged in it).
    /// One entry per member this node replicated to; cleared for a node once it reverts or leaves
    /// the membership (`forget`: an id reused after a removal starts afresh).
    acked: Mutex<HashMap<NodeId, (u64, u64)>>,
    /// Reverted followers, with the leader term and the index each had acknowledged in it, until
    /// the membership task takes them; one entry per node.
    found: Mutex<HashMap<NodeId, (u64, u64)>>,
    /// Wakes the membership task when `found` gains an entry; lives as long as the network.
    notify: tokio::sync::Notify,
}

impl Reversions {
    /// `target` answered Success to an append of `term` that leaves its log at `last`.
    fn acked(&self, target: NodeId, term: u64, last: Option<LogId>) {
        let Some(last) = last else { return };
        let mut acked = lock(&self.acked);
        let e = acked.entry(target).or_insert((term, last.index));
        if term > e.0 || (term == e.0 && last.index > e.1) {
            *e = (term, last.index);
        }
    }

    /// `target` answered Conflict to an append of `term` whose previous entry is `prev`: it
    /// does not hold `prev`. A reversion if it had acknowledged `prev` (or later) in this term.
    fn conflict(&self, target: NodeId, term: u64, prev: Option<LogId>) {
        let Some(prev) = prev else { return };
        let had = {
            let mut acked = lock(&self.acked);
            match acked.get(&target) {
                Some(&(t, had)) if t == term && prev.index <= had => {
                    acked.remove(&target);
                    had
                }
                _ => return,
            }
        };
        let mut found = lock(&self.found);
        let e = found.entry(target).or_insert((term, had));
        *e = (*e).max((term, had));
        self.notify.notify_one();
    }

    /// Takes the reverted followers found so far: (node, leader term, index it had acknowledged).
    pub fn take(&self) -> Vec<(NodeId, u64, u64)> {
        lock(&self.found).drain().map(|(id, (term, had))| (id, term, had)).collect()
    }

    /// The highest index `id` acknowledged in leader term `term` (since it last reverted).
    pub fn acknowledged(&self, id: NodeId, term: u64) -> Option<u64> {
        lock(&self.acked).get(&id).filter(|(t, _)| *t == term).map(|(_, index)| *index)
    }

    /// `id` left the membership: what it acknowledged no longer says anything about a node that
    /// may join under the same id later.
    pub fn forget(&self, id: NodeId) {
        lock(&self.acked).remove(&id);
        lock(&self.found).remove(&id);
    }

    /// Resolves when a reverted follower was found since the last `take` (at once if one was
    /// found while nobody waited).
    pub async fn found(&self) {
        self.notify.notified().await
    }
}

pub struct PeerClient {
    target: NodeId,
    net: Arc<PeerNet>,
    reversions: Arc<Reversions>,
    outsider: Arc<Outsider>,
}

impl PeerClient {
    async fn call(&self, req: PeerRequest, action: RPCTypes, ttl: Duration) -> Result<PeerResponse, RPCError> {
        let resp = self.net.request(self.target, &req, ttl).await;
        self.rpc_result(resp, action)
    }

    fn rpc_result(&self, resp: Result<PeerResponse, PeerError>, action: RPCTypes) -> Result<PeerResponse, RPCError> {
        match resp {
            Ok(PeerResponse::Error(e)) => Err(RPCError::Network(NetworkError::new(&e))),
            Ok(resp) => Ok(resp),
            Err(e) => Err(self.rpc_error(e, action)),
        }
    }

    /// Notes what an append's answer says of the follower's log (see `Reversions`).
    fn track(&self, resp: &AppendEntriesResponse, term: u64, (prev, last): (Option<LogId>, Option<LogId>), trimmed: Option<LogId>) {
        match resp {
            AppendEntriesResponse::Success => self.reversions.acked(self.target, term, trimmed.or(last)),
            AppendEntriesResponse::PartialSuccess(upto) => self.reversions.acked(self.target, term, *upto),
            AppendEntriesResponse::Conflict => self.reversions.conflict(self.target, term, prev),
            AppendEntriesResponse::HigherVote(_) => {}
        }
    }

    fn rpc_error(&self, e: PeerError, action: RPCTypes) -> RPCError {
        match e {
            PeerError::Timeout { timeout, .. } => RPCError::Timeout(Timeout { action, id: self.net.node_id(), target: self.target, timeout }),
            // A link that closed under the request: as before the proxy told it apart from
            // one that closed after sending (replication retries at once, on a new link).
            e @ PeerError::ClosedUnsent { .. } => RPCError::Network(NetworkError::new(&e)),
            e if e.not_delivered() => RPCError::Unreachable(Unreachable::new(&e)),
            e => RPCError::Network(NetworkError::new(&e)),
        }
    }
}

/// Where an AppendEntries request leaves the follower if it succeeds: (prev, last sent).
fn sent_range(rpc: &AppendEntriesRequest) -> (Option<LogId>, Option<LogId>) {
    let last = rpc.entries.last().map(|e| e.log_id).or(rpc.prev_log_id);
    (rpc.prev_log_id, last)
}

/// One AppendEntries of a pipelined stream, sent and waiting for its response.
struct InFlight {
    call: BoxFuture<'static, Result<PeerResponse, PeerError>>,
    range: (Option<LogId>, Option<LogId>),
    /// Set when only a prefix of the entries went (`trim_to_frame`): the last one sent.
    trimmed: Option<LogId>,
    /// The leader term the request was sent in (acks count per term, see `Reversions`).
    term: u64,
    /// A held commit-only request this one stands in for (its range): answered first, from
    /// this one's response (see `COMMIT_HOLD`).
    folded: Option<(Option<LogId>, Option<LogId>)>,
}

/// The state of one pipelined replication stream (`PeerClient::stream_append`).
struct Pipeline<'s, S> {
    client: &'s mut PeerClient,
    /// Every request of the stream goes on this one link: requests on one link arrive in order,
    /// on two links they may not (the follower would refuse the second as a conflict after
    /// accepting the first, and openraft takes a conflict below a match as a log reversion).
    /// When it closes, sending fails and the stream ends; openraft starts a new one.
    link: Arc<Link>,
    input: S,
    inflight: VecDeque<InFlight>,
    /// A commit-only request (no entries) not sent yet, and until when it may wait.
    held: Option<(AppendEntriesRequest, tokio::time::Instant)>,
    /// A request could not be sent: its error is queued as its answer and nothing after it goes.
    failed: bool,
    /// Answers worked out but not yet returned (a folded request's and its stand-in's).
    ready: VecDeque<Result<StreamAppendResult, RPCError>>,
    /// Whether more requests may be taken from `input`: not after it ended, after a trimmed
    /// request (the rest must be sent again from where the follower got to) or after an error.
    open: bool,
}

impl<S> Pipeline<'_, S>
where S: Stream<Item = AppendEntriesRequest> + Unpin
{
    /// The next response, in request order, sending requests while waiting for it. `None` when
    /// the stream is over: the input ended, or the previous response ended it.
    async fn next(&mut self) -> Option<Result<StreamAppendResult, RPCError>> {
        loop {
            if let Some(r) = self.ready.pop_front() {
                return Some(r);
            }
            if self.inflight.is_empty() && self.held.is_none() {
                if !self.open {
                    return None;
                }
                match self.input.next().await {
                    Some(rpc) => self.take(rpc).await,
                    None => self.open = false,
                }
                continue;
            }
            let room = self.open && self.inflight.len() < PIPELINE;
            let hold_until = self.held.as_ref().map(|(_, until)| *until);
            let head = self.inflight.front_mut().map(|f| &mut f.call);
            tokio::select! {
                biased;
                Some(resp) = futures_util::future::OptionFuture::from(head) => self.answer(resp),
                _ = tokio::time::sleep_until(hold_until.unwrap_or_else(tokio::time::Instant::now)), if hold_until.is_some() => {
                    // Nothing came to carry the commit index: it goes on its own.
                    if let Some((rpc, _)) = self.held.take() {
                        self.send(rpc, None).await;
                    }
                }
                rpc = self.input.next(), if room => match rpc {
                    Some(rpc) => self.take(rpc).await,
                    None => {
                        self.open = false;
                        if let Some((rpc, _)) = self.held.take() {
                            self.send(rpc, None).await;
                        }
                    }
                },
            }
        }
    }

    /// A request from openraft: a commit-only one is held for `COMMIT_HOLD`; one with entries
    /// that starts where a held one ends goes in its place (its answer answers both).
    async fn take(&mut self, rpc: AppendEntriesRequest) {
        let held = self.held.take();
        if rpc.entries.is_empty() && self.open {
            if let Some((older, _)) = held {
                self.send(older, None).await;
            }
            self.held = Some((rpc, tokio::time::Instant::now() + COMMIT_HOLD));
            return;
        }
        let folded = match held {
            Some((h, _)) if h.prev_log_id == rpc.prev_log_id && h.leader_commit <= rpc.leader_commit => Some(sent_range(&h)),
            Some((h, _)) => {
                self.send(h, None).await;
                None
            }
            None => None,
        };
        self.send(rpc, folded).await;
    }

    /// Works out the answers of the head request (and of the request it stands in for).
    fn answer(&mut self, resp: Result<PeerResponse, PeerError>) {
        let Some(done) = self.inflight.pop_front() else { return };
        let resp = self.client.rpc_result(resp, RPCTypes::AppendEntries);
        let result = match &resp {
            Ok(PeerResponse::AppendEntries(r)) => {
                self.client.track(r, done.term, done.range, done.trimmed);
                let r = match (r.clone(), done.trimmed) {
                    (AppendEntriesResponse::Success, Some(last)) => AppendEntriesResponse::PartialSuccess(Some(last)),
                    (r, _) => r,
                };
                Ok(r.into_stream_result(done.range.0, done.range.1))
            }
            Ok(other) => Err(unexpected(other)),
            Err(e) => Err(e.clone()),
        };
        let ok = matches!(result, Ok(Ok(_)));
        if let Some((prev, last)) = done.folded {
            // The stand-in started where the held request ended: its success means the follower
            // holds everything up to that point; its failure is the held request's failure.
            match &resp {
                Ok(PeerResponse::AppendEntries(_)) if ok => self.ready.push_back(Ok(Ok(last))),
                Ok(PeerResponse::AppendEntries(r)) => self.ready.push_back(Ok(r.clone().into_stream_result(prev, last))),
                _ => self.ready.push_back(result.clone()),
            }
        }
        if !ok || done.trimmed.is_some() {
            // An error, a conflict or a higher vote ends the stream (openraft starts a new one
            // from what it learned); so does a partial success, once answered.
            self.open = false;
            self.held = None;
            if !ok {
                self.inflight.clear();
                if done.folded.is_some() {
                    return; // the held request's failure ends the stream first
                }
            }
        }
        self.ready.push_back(result);
    }

    /// Queues `rpc` on the stream's link (in order) and adds it to the in-flight requests; if
    /// it cannot be sent, its answer is that error, in order, and the stream ends there.
    async fn send(&mut self, mut rpc: AppendEntriesRequest, folded: Option<(Option<LogId>, Option<LogId>)>) {
        if self.failed {
            return;
        }
        let trimmed = trim_to_frame(&mut rpc.entries, self.link.max_frame() / 2);
        if trimmed.is_some() {
            self.open = false;
        }
        let range = sent_range(&rpc);
        let term = rpc.vote.leader_id().term;
        let call: BoxFuture<'static, Result<PeerResponse, PeerError>> = match self.link.send(&PeerRequest::AppendEntries(rpc), REPLICATION_TIMEOUT).await {
            Ok(call) => Box::pin(call.response()),
            Err(e) => {
                self.open = false;
                self.failed = true;
                self.held = None;
                Box::pin(std::future::ready(Err(e)))
            }
        };
        self.inflight.push_back(InFlight { call, range, trimmed, folded, term });
    }
}

/// Keep the longest prefix of `entries` (at least one) whose encoding fits in `budget` bytes, so
/// an AppendEntries request never exceeds the peer frame bound: openraft sends up to
/// `max_payload_entries` entries, and an entry of merged events may be a megabyte. Returns the
/// log id of the last entry kept if any were dropped.
fn trim_to_frame(entries: &mut Vec<Entry>, budget: usize) -> Option<LogId> {
    // One entry always goes (replication must progress): no need to measure it.
    if entries.len() <= 1 {
        return None;
    }
    let mut total = 0usize;
    let mut keep = entries.len();
    for (i, e) in entries.iter().enumerate() {
        total = total.saturating_add(bincode::serialized_size(e).map_or(usize::MAX, |n| n as usize));
        if total > budget && i > 0 {
            keep = i;
            break;
        }
    }
    if keep == entries.len() {
        return None;
    }
    entries.truncate(keep);
    entries.last().map(|e| e.log_id)
}

impl PeerClient {
    /// A vote's answer; a refusal because this node is no member is noted (`Outsider`).
    fn vote_answer(&self, resp: Result<PeerResponse, PeerError>) -> Result<VoteResponse, RPCError> {
        if let Ok(PeerResponse::Error(RemoteError::NotServed(m))) = &resp {
            if m.starts_with(NOT_A_MEMBER) {
                lock(&self.outsider.told_by).insert(self.target);
            }
        }
        match self.rpc_result(resp, RPCTypes::Vote)? {
            PeerResponse::Vote(r) => Ok(r),
            other => Err(unexpected(&other)),
        }
    }
}

fn unexpected(resp: &PeerResponse) -> RPCError {
    let e = std::io::Error::other(format!("unexpected response {resp:?}"));
    RPCError::Network(NetworkError::new(&e))
}

impl RaftNetworkV2<TypeConfig> for PeerClient {
    type SnapshotData = SnapshotData;

    async fn append_entries(&mut self, mut rpc: AppendEntriesRequest, option: RPCOption) -> Result<AppendEntriesResponse, RPCError> {
        let trimmed = trim_to_frame(&mut rpc.entries, self.net.max_frame_to(self.target) / 2);
        // openraft gives every AppendEntries the heartbeat interval (60 ms) as its deadline. A
        // request carrying entries (up to megabytes, with the follower's fsync) can take longer
        // on a loaded machine, and a timeout only makes openraft back off and send it again:
        // measured, that produced the 100-300 ms stalls in `bench events --batch 100`. A dead
        // peer is noticed by the link itself (closed connection, missed pings) long before this.
        let ttl = if rpc.entries.is_empty() { option.hard_ttl() } else { option.hard_ttl().max(REPLICATION_TIMEOUT) };
        let (term, range) = (rpc.vote.leader_id().term, sent_range(&rpc));
        let resp = self.call(PeerRequest::AppendEntries(rpc), RPCTypes::AppendEntries, ttl).await?;
        if let PeerResponse::AppendEntries(r) = &resp {
            self.track(r, term, range, trimmed);
        }
        match resp {
            // The follower took what was sent: tell openraft how far, and it sends the rest next.
            PeerResponse::AppendEntries(AppendEntriesResponse::Success) if trimmed.is_some() => {
                Ok(AppendEntriesResponse::PartialSuccess(trimmed))
            }
            PeerResponse::AppendEntries(r) => Ok(r),
            other => Err(unexpected(&other)),
        }
    }

    fn stream_append<'s, S>(
        &'s mut self,
        input: S,
        option: RPCOption,
    ) -> BoxFuture<'s, Result<BoxStream<'s, Result<StreamAppendResult, RPCError>>, RPCError>>
    where S: Stream<Item = AppendEntriesRequest> + Send + Unpin + 'static {
        Box::pin(async move {
            let mut input = input;
            let (link, first) = match self.net.link(self.target).await {
                Ok(link) => (link, None),
                Err(e) => {
                    // openraft waits out its replication backoff (`Config::backoff`, enabled
                    // after repeated errors) while it produces the next request, and nowhere
                    // else: failing before taking one made the replication task retry at once,
                    // for as long as the peer was down (measured in a chaos run: ~170,000 tries
                    // a second on the leader, a WARN line each). Take one first, which waits out
                    // the backoff (or until there is something to send), then try once more:
                    // the peer may be back, and the request goes first on the new link.
                    let Some(first) = input.next().await else { return Err(self.rpc_error(e, RPCTypes::AppendEntries)) };
                    match self.net.link(self.target).await {
                        Ok(link) => (link, Some(first)),
                        Err(e) => return Err(self.rpc_error(e, RPCTypes::AppendEntries)),
                    }
                }
            };
            let input = futures_util::stream::iter(first).chain(input);
            if link.features() & features::ORDERED_APPENDS == 0 {
                // An older build may serve requests out of order: one at a time.
                return openraft::network::stream_append_sequential(self, input, option).await;
            }
            let pipeline = Pipeline { client: self, link, input, inflight: VecDeque::new(), held: None, failed: false, ready: VecDeque::new(), open: true };
            let responses = futures_util::stream::unfold(pipeline, |mut p| async move {
                let r = p.next().await?;
                Some((r, p))
            });
            Ok(Box::pin(responses) as BoxStream<'s, _>)
        })
    }

    async fn vote(&mut self, rpc: VoteRequest, option: RPCOption) -> Result<VoteResponse, RPCError> {
        let resp = self.net.request(self.target, &PeerRequest::Vote(rpc), option.hard_ttl()).await;
        self.vote_answer(resp)
    }

    async fn pre_vote(&mut self, rpc: VoteRequest, option: RPCOption) -> Result<VoteResponse, RPCError> {
        let resp = self.net.request(self.target, &PeerRequest::PreVote(rpc), option.hard_ttl()).await;
        self.vote_answer(resp)
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest,
        option: RPCOption,
    ) -> Result<openraft::raft::TransferLeaderResponse<TypeConfig>, RPCError> {
        match self.call(PeerRequest::TransferLeader(req), RPCTypes::TransferLeader, option.hard_ttl()).await? {
            PeerResponse::TransferLeader => Ok(Ok(())),
            other => Err(unexpected(&other)),
        }
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse, StreamingError> {
        let send = async {
            let data = &snapshot.snapshot;
            let mut offset = 0usize;
            // Bounded: each pass sends at least one byte more of the snapshot, or returns.
            loop {
                let chunk = snapshot_chunk(self.net.max_frame_to(self.target));
                let end = (offset + chunk).min(data.len());
                let done = end == data.len();
                let req = PeerRequest::SnapshotChunk {
                    vote,
                    meta: snapshot.meta.clone(),
                    offset: offset as u64,
                    data: data[offset..end].to_vec(),
                    done,
                };
                let resp = self.call(req, RPCTypes::InstallSnapshot, option.hard_ttl()).await.map_err(to_streaming)?;
                match resp {
                    PeerResponse::Snapshot(Some(r)) if done => {
                        if r.vote == vote {
                            // It holds everything up to the snapshot now (as openraft's matching).
                            self.reversions.acked(self.target, vote.leader_id().term, snapshot.meta.last_log_id);
                        }
                        return Ok(r);
                    }
                    PeerResponse::Snapshot(None) if !done => {}
                    other => return Err(to_streaming(unexpected(&other))),
                }
                offset = end;
            }
        };
        tokio::select! {
            r = send => r,
            closed = cancel => Err(StreamingError::Closed(closed)),
        }
    }
}

/// The receiving side of pipelined replication: each leader's AppendEntries go to
/// `Raft::stream_append` in the order `submit` is called (the order they arrived on the link),
/// one lane per leader. openraft ends a stream after a conflict or a higher vote: the lane then
/// ends, requests queued behind get an error (the leader sends them again), and the next
/// request from that leader starts a new lane.
pub struct AppendLanes {
    raft: Raft,
    /// Lane of each leader that sent us AppendEntries. A lane's task removes its entry when the
    /// lane ends (its sender is then closed, and `submit` would replace it anyway). An idle lane
    /// of a former leader stays (a task and an empty channel): at most one per node id that has
    /// led, like the peer layer's links.
    lanes: Mutex<HashMap<NodeId, Lane>>,
    /// Tells lanes apart, so an ended lane removes only its own entry.
    next_lane: std::sync::atomic::AtomicU64,
    /// Set by `close`, and read by `submit`, only under the `lanes` lock: no lane starts after it.
    closed: std::sync::atomic::AtomicBool,
}

struct Lane {
    id: u64,
    /// The lane's only sender: dropping it ends the lane's input, and the lane ends once
    /// openraft has answered what it took.
    tx: mpsc::Sender<LaneItem>,
    task: tokio::task::JoinHandle<()>,
    /// Bytes queued or taken and not answered (`LANE_BYTES`): `submit` adds, the lane's task
    /// subtracts as each is answered.
    held: Arc<std::sync::atomic::AtomicUsize>,
}

/// A request, where its answer goes, and its `approx_bytes`.
type LaneItem = (AppendEntriesRequest, oneshot::Sender<LaneResult>, usize);
/// Where a request taken by openraft is answered, and its `approx_bytes`.
type Slot = (oneshot::Sender<LaneResult>, usize);

type LaneResult = Result<StreamAppendResult, String>;

impl AppendLanes {
    pub fn new(raft: Raft) -> Arc<AppendLanes> {
        Arc::new(AppendLanes { raft, lanes: Mutex::new(HashMap::new()), next_lane: Default::default(), closed: Default::default() })
    }

    /// Ends every lane and refuses new ones; waits (at most `grace`) until the Raft core has
    /// answered every request the lanes gave it. The node calls it after its links closed and
    /// before it stops Raft: openraft logs an append that the core took but never answered as
    /// an error ("stream_append: RaftCore stopped"), which a follower's graceful stop under load
    /// did nearly every time. False if a lane was still busy when `grace` ran out.
    pub async fn close(&self, grace: Duration) -> bool {
        let lanes: Vec<Lane> = {
            let mut lanes = lock(&self.lanes);
            self.closed.store(true, std::sync::atomic::Ordering::Relaxed);
            lanes.drain().map(|(_, lane)| lane).collect()
        };
        let tasks: Vec<_> = lanes.into_iter().map(|Lane { task, .. }| task).collect();
        tokio::time::timeout(grace, futures_util::future::join_all(tasks)).await.is_ok()
    }

    /// Takes `rpc` from `from` now, behind every request submitted before it; the future
    /// resolves with its response (`Err`: the lane ended first, or the Raft core stopped).
    pub fn submit(self: &Arc<Self>, from: NodeId, rpc: AppendEntriesRequest) -> impl Future<Output = Result<AppendEntriesResponse, String>> + Send + 'static {
        let (tx, rx) = oneshot::channel();
        let bytes = approx_bytes(&rpc);
        let mut item = Some((rpc, tx, bytes));
        {
            let mut lanes = lock(&self.lanes);
            // After `close` the request is dropped unserved: its sender gets an error at once.
            let tries = if self.closed.load(std::sync::atomic::Ordering::Relaxed) { 0 } else { 2 };
            // The current lane, or a new one if it has ended: two tries at most.
            for _ in 0..tries {
                let Some(it) = item.take() else { break };
                let lane = lanes.entry(from).or_insert_with(|| self.start_lane(from));
                let held = lane.held.load(std::sync::atomic::Ordering::Relaxed);
                if !lane_takes(held, bytes) {
                    // Refused (the leader sends it again): the lane holds enough already.
                    metrics::counter!("raftbridge_append_lane_refused_total").increment(1);
                    tracing::debug!(from, held, bytes, "append lane full by bytes; refused");
                    break;
                }
                lane.held.fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
                match lane.tx.try_send(it) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Closed(it)) => {
                        lane.held.fetch_sub(bytes, std::sync::atomic::Ordering::Relaxed);
                        lanes.remove(&from);
                        item = Some(it);
                    }
                    // Beyond what the lane holds (`LANE_QUEUE`; a link serves at most
                    // `peer::MAX_APPENDING` at once, so only across links): refused, and retried.
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        lane.held.fetch_sub(bytes, std::sync::atomic::Ordering::Relaxed);
                        metrics::counter!("raftbridge_append_lane_refused_total").increment(1);
                        break;
                    }
                }
            }
        }
        async move {
            match rx.await {
                Ok(Ok(r)) => Ok(AppendEntriesResponse::from(r)),
                Ok(Err(fatal)) => Err(fatal),
                Err(_) => Err("append lane ended before this request was served".to_string()),
            }
        }
    }

    fn start_lane(self: &Arc<Self>, from: NodeId) -> Lane {
        let id = self.next_lane.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(LANE_QUEUE);
        let held = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let task = tokio::spawn(run_lane(self.raft.clone(), rx, held.clone(), Arc::downgrade(self), from, id));
        Lane { id, tx, task, held }
    }
}

/// Feeds one leader's requests to `Raft::stream_append` and answers each in order. Ends when
/// openraft ends the stream (conflict, higher vote, core stopped) or nobody can send any more.
async fn run_lane(
    raft: Raft,
    rx: mpsc::Receiver<LaneItem>,
    held: Arc<std::sync::atomic::AtomicUsize>,
    lanes: Weak<AppendLanes>,
    from: NodeId,
    id: u64,
) {
    // Reply slots in request order: pushed as openraft takes each request, popped as it
    // answers them, in the same order.
    let waiting: Arc<Mutex<VecDeque<Slot>>> = Arc::default();
    let slots = waiting.clone();
    let input = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) })
        .map(move |(rpc, reply, bytes)| {
            lock(&slots).push_back((reply, bytes));
            rpc
        });
    let results = raft.stream_append(input);
    let mut results = std::pin::pin!(results);
    while let Some(result) = results.next().await {
        let Some((reply, bytes)) = lock(&waiting).pop_front() else { break };
        held.fetch_sub(bytes, std::sync::atomic::Ordering::Relaxed);
        let _ = reply.send(result.map_err(|fatal| fatal.to_string()));
    }
    if let Some(lanes) = lanes.upgrade() {
        let mut lanes = lock(&lanes.lanes);
        if lanes.get(&from).is_some_and(|lane| lane.id == id) {
            lanes.remove(&from);
        }
    }
}

fn to_streaming(e: RPCError) -> StreamingError {
    match e {
        RPCError::Timeout(t) => StreamingError::Timeout(t),
        RPCError::Unreachable(u) => StreamingError::Unreachable(u),
        RPCError::Network(n) => StreamingError::Network(n),
        RPCError::RemoteError(r) => StreamingError::Network(NetworkError::new(&r)),
    }
}

#[cfg(test)]
mod tests {
    use openraft::RaftTypeConfig;
    use openraft::vote::RaftLeaderIdExt;

    use super::*;

    fn ent(index: u64, value_bytes: usize) -> Entry {
        let log_id = LogId::new(<TypeConfig as RaftTypeConfig>::LeaderId::new_committed(1, 1), index);
        let cmd = Command::Put { store: "s".into(), key: format!("k{index}"), value: vec![7; value_bytes], if_revision: None, tag: None };
        Entry::new_normal(log_id, cmd)
    }

    fn log_id(index: u64) -> LogId {
        LogId::new(<TypeConfig as RaftTypeConfig>::LeaderId::new_committed(1, 1), index)
    }

    /// What a follower stand-in saw: AppendEntries in arrival order (by prev index), and how
    /// many it served at once at most.
    #[derive(Default)]
    struct Seen {
        arrived: Mutex<Vec<u64>>,
        serving: std::sync::atomic::AtomicUsize,
        max_serving: std::sync::atomic::AtomicUsize,
    }

    /// Answers each AppendEntries after a few ms, with a conflict for the one after `conflict_at`.
    struct FakeFollower {
        seen: Arc<Seen>,
        conflict_at: Option<u64>,
    }

    impl crate::peer::Handler for FakeFollower {
        fn handle(&self, _from: NodeId, req: PeerRequest) -> crate::peer::BoxFuture<PeerResponse> {
            use std::sync::atomic::Ordering::SeqCst;
            let PeerRequest::AppendEntries(rpc) = req else {
                return Box::pin(async { PeerResponse::Error(crate::peer::message::RemoteError::Internal("only appends".into())) });
            };
            let prev = rpc.prev_log_id.map_or(0, |l| l.index);
            self.seen.arrived.lock().unwrap().push(prev);
            let now = self.seen.serving.fetch_add(1, SeqCst) + 1;
            self.seen.max_serving.fetch_max(now, SeqCst);
            let conflict = self.conflict_at == Some(prev);
            let seen = self.seen.clone();
            Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(3)).await;
                seen.serving.fetch_sub(1, SeqCst);
                PeerResponse::AppendEntries(if conflict { AppendEntriesResponse::Conflict } else { AppendEntriesResponse::Success })
            })
        }
    }

    /// A leader's `PeerClient` linked to a `FakeFollower` on loopback.
    async fn linked_to_fake(conflict_at: Option<u64>) -> (PeerClient, Arc<Seen>, tokio_util::sync::CancellationToken) {
        let stop = tokio_util::sync::CancellationToken::new();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let cfg = |id: NodeId, advertise: &str| crate::peer::PeerConfig {
            node_id: id,
            cluster: "t".into(),
            advertise: advertise.into(),
            max_frame: 1 << 20,
            idle_timeout: Duration::from_secs(10),
            secret: None,
            tls: None,
            source_ip: None,
            cluster_id: Default::default(),
            recorded_features: Default::default(),
        };
        let follower = PeerNet::new(cfg(2, &addr), stop.clone());
        let seen = Arc::new(Seen::default());
        follower.set_handler(Arc::new(FakeFollower { seen: seen.clone(), conflict_at }));
        tokio::spawn(follower.run(listener));
        let leader = PeerNet::new(cfg(1, "127.0.0.1:1"), stop.clone());
        leader.set_peer_addr(2, &addr);
        // Any exchange sets the link up, and with it the follower's features.
        let _ = leader.request(2, &PeerRequest::Status, Duration::from_secs(5)).await;
        assert_ne!(leader.features(2) & features::ORDERED_APPENDS, 0, "this build announces ordered appends");
        (PeerClient { target: 2, net: leader, reversions: Default::default(), outsider: Default::default() }, seen, stop)
    }

    fn appends(n: u64) -> Vec<AppendEntriesRequest> {
        (0..n)
            .map(|i| AppendEntriesRequest {
                vote: Vote::new_committed(1, 1),
                prev_log_id: (i > 0).then(|| log_id(i)),
                leader_commit: None,
                entries: vec![ent(i + 1, 10)],
            })
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_leader_keeps_appends_in_flight_and_reads_the_answers_in_order() {
        let (mut client, seen, stop) = linked_to_fake(None).await;
        let results: Vec<_> = {
            let out = client.stream_append(futures_util::stream::iter(appends(40)), RPCOption::new(Duration::from_millis(60))).await.unwrap();
            out.collect().await
        };
        let matched: Vec<Option<u64>> = results.into_iter().map(|r| r.unwrap().unwrap().map(|l| l.index)).collect();
        assert_eq!(matched, (1..=40).map(Some).collect::<Vec<_>>(), "every request answered, in order");
        assert_eq!(*seen.arrived.lock().unwrap(), (0..40).collect::<Vec<_>>(), "the follower got them in the order sent");
        let most = seen.max_serving.load(std::sync::atomic::Ordering::SeqCst);
        assert!(most > 1, "requests overlapped (pipelined): at most {most} at once");
        assert!(most <= PIPELINE, "never more than {PIPELINE} in flight: {most}");
        stop.cancel();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_pipelined_stream_stays_on_its_link_and_ends_when_it_closes() {
        let (mut client, seen, stop) = linked_to_fake(None).await;
        let net = client.net.clone();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let input = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|r| (r, rx)) }).boxed();
        let mut reqs = appends(3).into_iter();
        let mut out = client.stream_append(input, RPCOption::new(Duration::from_millis(60))).await.unwrap();
        for expect in 1..=2 {
            tx.send(reqs.next().unwrap()).unwrap();
            let r = out.next().await.expect("an answer");
            assert_eq!(r.unwrap().unwrap().map(|l| l.index), Some(expect));
        }
        // The link closes (a reconnect would bring a new one): the stream must not move over.
        net.link(2).await.unwrap().close();
        tx.send(reqs.next().unwrap()).unwrap();
        let r = out.next().await.expect("an answer");
        assert!(r.is_err(), "sending on the closed link fails: {r:?}");
        assert!(out.next().await.is_none(), "and the stream ends there");
        assert_eq!(*seen.arrived.lock().unwrap(), vec![0, 1], "the third request never left");
        stop.cancel();
    }

    /// An AppendEntries with no entries after `prev` carrying commit `commit`.
    fn commit_only(prev: u64, commit: u64) -> AppendEntriesRequest {
        AppendEntriesRequest { vote: Vote::new_committed(1, 1), prev_log_id: Some(log_id(prev)), leader_commit: Some(log_id(commit)), entries: vec![] }
    }

    fn with_commit(mut rpc: AppendEntriesRequest, commit: u64) -> AppendEntriesRequest {
        rpc.leader_commit = Some(log_id(commit));
        rpc
    }

    fn matched(results: Vec<Result<StreamAppendResult, RPCError>>) -> Vec<Option<u64>> {
        results.into_iter().map(|r| r.unwrap().unwrap().map(|l| l.index)).collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_commit_only_append_rides_with_the_next_entries_and_is_answered_by_them() {
        let (mut client, seen, stop) = linked_to_fake(None).await;
        let mut reqs = appends(3).into_iter();
        let (first, second, third) = (reqs.next().unwrap(), reqs.next().unwrap(), reqs.next().unwrap());
        // entries 1; commit 1 alone; entries 2 (carrying commit 1); commit 2 alone; entries 3.
        let input = vec![first, commit_only(1, 1), with_commit(second, 1), commit_only(2, 2), with_commit(third, 2)];
        let results: Vec<_> = {
            let out = client.stream_append(futures_util::stream::iter(input), RPCOption::new(Duration::from_millis(60))).await.unwrap();
            out.collect().await
        };
        assert_eq!(matched(results), vec![Some(1), Some(1), Some(2), Some(2), Some(3)], "five answers, in order");
        assert_eq!(*seen.arrived.lock().unwrap(), vec![0, 1, 2], "the commit-only requests never went on their own");
        stop.cancel();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_commit_only_append_goes_alone_when_nothing_follows() {
        let (mut client, seen, stop) = linked_to_fake(None).await;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let input = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|r| (r, rx)) }).boxed();
        let mut out = client.stream_append(input, RPCOption::new(Duration::from_millis(60))).await.unwrap();
        tx.send(appends(1).remove(0)).unwrap();
        assert_eq!(out.next().await.unwrap().unwrap().unwrap().map(|l| l.index), Some(1));
        let sent = tokio::time::Instant::now();
        tx.send(commit_only(1, 1)).unwrap();
        assert_eq!(out.next().await.unwrap().unwrap().unwrap().map(|l| l.index), Some(1), "answered on its own");
        assert!(sent.elapsed() >= COMMIT_HOLD, "after waiting for entries to ride with");
        assert_eq!(*seen.arrived.lock().unwrap(), vec![0, 1]);
        // The input ends while one is held: it goes at once.
        tx.send(commit_only(1, 1)).unwrap();
        drop(tx);
        assert_eq!(out.next().await.unwrap().unwrap().unwrap().map(|l| l.index), Some(1));
        assert!(out.next().await.is_none());
        assert_eq!(*seen.arrived.lock().unwrap(), vec![0, 1, 1]);
        stop.cancel();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_conflict_answers_the_held_commit_and_ends_the_stream() {
        let (mut client, seen, stop) = linked_to_fake(Some(1)).await;
        let mut reqs = appends(3).into_iter();
        let (first, second, third) = (reqs.next().unwrap(), reqs.next().unwrap(), reqs.next().unwrap());
        let input = vec![first, commit_only(1, 1), with_commit(second, 1), third];
        let results: Vec<_> = {
            let out = client.stream_append(futures_util::stream::iter(input), RPCOption::new(Duration::from_millis(60))).await.unwrap();
            out.collect().await
        };
        assert_eq!(results.len(), 2, "the first entries, then the held commit's conflict, then nothing: {results:?}");
        assert_eq!(results[0].as_ref().unwrap().as_ref().unwrap().map(|l| l.index), Some(1));
        match &results[1] {
            Ok(Err(openraft::raft::StreamAppendError::Conflict(at))) => assert_eq!(at.index, 1),
            other => panic!("expected a conflict at 1, got {other:?}"),
        }
        assert_eq!(seen.arrived.lock().unwrap()[..2], [0, 1]);
        stop.cancel();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_conflict_ends_the_pipelined_stream() {
        let (mut client, _seen, stop) = linked_to_fake(Some(5)).await;
        let results: Vec<_> = {
            let out = client.stream_append(futures_util::stream::iter(appends(40)), RPCOption::new(Duration::from_millis(60))).await.unwrap();
            out.collect().await
        };
        assert_eq!(results.len(), 6, "five successes, then the conflict, then nothing");
        for (i, r) in results[..5].iter().enumerate() {
            assert_eq!(r.as_ref().unwrap().as_ref().unwrap().map(|l| l.index), Some(i as u64 + 1));
        }
        match &results[5] {
            Ok(Err(openraft::raft::StreamAppendError::Conflict(at))) => assert_eq!(at.index, 5),
            other => panic!("expected a conflict at 5, got {other:?}"),
        }
        stop.cancel();
    }

    /// `close` returns once the core has answered every append the lanes gave it (node
    /// shutdown then stops Raft with nothing in flight), and a request after it is refused at
    /// once. A real Raft core (node 3, empty membership) takes appends from leader 1.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn closed_lanes_answer_what_the_core_took_and_refuse_the_rest() {
        use crate::raft::log_store::{LogStore, LogStoreOptions};
        use crate::raft::state_machine::StateMachine;
        let dir = std::env::temp_dir().join(format!("rb-lanes-{}", fastrand::u64(..)));
        let log = LogStore::open(&dir.join("log"), LogStoreOptions::default()).unwrap();
        let sm = StateMachine::open(&dir.join("sm")).unwrap();
        let stop = tokio_util::sync::CancellationToken::new();
        let cfg = crate::peer::PeerConfig {
            node_id: 3,
            cluster: "t".into(),
            advertise: "127.0.0.1:1".into(),
            max_frame: 1 << 20,
            idle_timeout: Duration::from_secs(10),
            secret: None,
            tls: None,
            source_ip: None,
            cluster_id: Default::default(),
            recorded_features: Default::default(),
        };
        let net = PeerNet::new(cfg, stop.clone());
        let settings = crate::raft::RaftSettings {
            elect: true,
            cluster: "t".into(),
            heartbeat_ms: 50,
            election_min_ms: 300,
            election_max_ms: 600,
            snapshot_threshold: 10_000,
        };
        let raft = Raft::new(3, crate::raft::openraft_config(&settings).unwrap(), Network { net, reversions: Default::default(), outsider: Default::default() }, log, sm).await.unwrap();
        let lanes = AppendLanes::new(raft.clone());
        let append = |i: u64| AppendEntriesRequest {
            vote: Vote::new_committed(1, 1),
            prev_log_id: i.checked_sub(1).map(log_id),
            leader_commit: None,
            entries: vec![ent(i, 100)],
        };
        // Pipelined, as a leader sends them; none awaited before `close`.
        let answers: Vec<_> = (0..20).map(|i| lanes.submit(1, append(i))).collect();
        assert!(lanes.close(Duration::from_secs(20)).await, "the lanes ended within the grace");
        for (i, answer) in answers.into_iter().enumerate() {
            // Answered already: `close` waited for it.
            let r = futures_util::FutureExt::now_or_never(answer).unwrap_or_else(|| panic!("append {i} unanswered when close returned"));
            let r = r.unwrap_or_else(|e| panic!("append {i}: {e}"));
            assert!(matches!(r, AppendEntriesResponse::Success | AppendEntriesResponse::PartialSuccess(_)), "append {i}: {r:?}");
        }
        let after = tokio::time::timeout(Duration::from_secs(1), lanes.submit(1, append(20))).await.expect("refused at once");
        assert!(after.is_err(), "a lane started after close: {after:?}");
        raft.shutdown().await.unwrap();
        stop.cancel();
        let _ = std::fs::remove_dir_all(dir);
    }

    /// A lane takes any request while empty, and beyond that only up to `LANE_BYTES`; a
    /// request's size counts its entries' commands.
    #[test]
    fn a_lane_is_bounded_by_bytes_but_never_refuses_into_an_empty_lane() {
        assert!(lane_takes(0, LANE_BYTES * 4), "a request larger than the bound still goes alone");
        assert!(lane_takes(LANE_BYTES - 1000, 1000));
        assert!(!lane_takes(LANE_BYTES - 1000, 1001));
        assert!(!lane_takes(usize::MAX, 1), "no overflow");
        let rpc = |sizes: &[usize]| AppendEntriesRequest {
            vote: Vote::new_committed(1, 1),
            prev_log_id: None,
            leader_commit: None,
            entries: sizes.iter().enumerate().map(|(i, n)| ent(i as u64 + 1, *n)).collect(),
        };
        let one_mib = approx_bytes(&rpc(&[1 << 20]));
        assert!((1 << 20..(1 << 20) + 1024).contains(&one_mib), "{one_mib}");
        assert!(approx_bytes(&rpc(&[100; 10])) >= 10 * 100);
        // A leader resending 8 MiB requests to a stalled follower: 15 held (120 MiB), not 1,024.
        let eight = approx_bytes(&rpc(&[8 << 20]));
        let taken = (0..1024).scan(0usize, |held, _| lane_takes(*held, eight).then(|| *held += eight)).count();
        assert_eq!(taken, LANE_BYTES / eight);
    }

    #[test]
    fn a_conflict_below_what_the_follower_acknowledged_in_the_same_term_is_a_reversion() {
        let r = Reversions::default();
        r.acked(2, 5, Some(log_id(10)));
        r.acked(2, 5, Some(log_id(7))); // an older answer arriving late moves nothing back
        r.conflict(2, 5, Some(log_id(11)));
        assert!(r.take().is_empty(), "a conflict past what it acknowledged is the usual search");
        r.conflict(2, 6, Some(log_id(3)));
        assert!(r.take().is_empty(), "acknowledged in another term: those entries may have been replaced");
        r.conflict(3, 5, Some(log_id(3)));
        assert!(r.take().is_empty(), "another follower acknowledged nothing");
        assert_eq!(r.acknowledged(2, 5), Some(10));
        assert_eq!(r.acknowledged(2, 6), None, "acks count per term");
        r.conflict(2, 5, Some(log_id(10)));
        assert_eq!(r.take(), vec![(2, 5, 10)]);
        assert_eq!(r.acknowledged(2, 5), None, "it starts afresh");
        r.conflict(2, 5, Some(log_id(4)));
        assert!(r.take().is_empty(), "the search from the start that follows is not reported again");
        r.acked(2, 5, Some(log_id(3)));
        assert_eq!(r.acknowledged(2, 5), Some(3), "what it holds again");
        r.forget(2);
        r.conflict(2, 5, Some(log_id(1)));
        assert!(r.take().is_empty(), "a node that left (an id joining again) has acknowledged nothing");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_follower_whose_log_went_back_is_reported_from_a_stream_and_a_single_append() {
        // The fake follower takes entries 1..=5, then says it lacks entry 5: its log went back.
        let (mut client, _seen, stop) = linked_to_fake(Some(5)).await;
        let reversions = client.reversions.clone();
        let results: Vec<_> = client.stream_append(futures_util::stream::iter(appends(6)), RPCOption::new(Duration::from_secs(1))).await.unwrap().collect().await;
        assert!(matches!(results.last(), Some(Ok(Err(openraft::raft::StreamAppendError::Conflict(_))))), "{results:?}");
        assert_eq!(reversions.take(), vec![(2, 1, 5)]);
        stop.cancel();

        // The same through one-at-a-time appends (to builds without ordered appends).
        let (mut client, _seen, stop) = linked_to_fake(Some(3)).await;
        let reversions = client.reversions.clone();
        let mut reqs = appends(4).into_iter().skip(2);
        let option = || RPCOption::new(Duration::from_secs(1));
        let first = client.append_entries(reqs.next().unwrap(), option()).await.unwrap();
        assert!(first.is_success(), "{first:?}");
        assert_eq!(reversions.take(), vec![], "nothing went back yet");
        let second = client.append_entries(reqs.next().unwrap(), option()).await.unwrap();
        assert!(matches!(second, AppendEntriesResponse::Conflict), "{second:?}");
        assert_eq!(reversions.take(), vec![(2, 1, 3)]);
        stop.cancel();
    }

    #[test]
    fn append_entries_are_trimmed_to_the_frame_budget() {
        let mut small: Vec<Entry> = (1..=10).map(|i| ent(i, 100)).collect();
        assert_eq!(trim_to_frame(&mut small, 1 << 20), None, "everything fits: nothing dropped");
        assert_eq!(small.len(), 10);

        let mut big: Vec<Entry> = (1..=10).map(|i| ent(i, 1000)).collect();
        let last = trim_to_frame(&mut big, 3500).expect("some entries dropped");
        assert_eq!(big.len(), 3, "three entries of ~1 KiB fit in 3.5 KiB");
        assert_eq!(last.index, 3);

        // One entry larger than the budget still goes alone: replication must make progress.
        let mut huge: Vec<Entry> = (1..=3).map(|i| ent(i, 10_000)).collect();
        assert_eq!(trim_to_frame(&mut huge, 1000).map(|l| l.index), Some(1));
        assert_eq!(huge.len(), 1);
    }
}

//! The request and response messages carried in `Request`/`Response` frames.
//!
//! One enum each way keeps dispatch a single `match` and lets bincode tag variants compactly.
//! Raft RPCs, forwarded client operations and cluster management share the one link.

use serde::Deserialize;
use serde::Serialize;

use crate::raft::types::AppendEntriesRequest;
use crate::raft::types::AppendEntriesResponse;
use crate::raft::types::Command;
use crate::raft::types::CommandResult;
use crate::raft::types::NodeId;
use crate::raft::types::SnapshotMeta;
use crate::raft::types::SnapshotResponse;
use crate::raft::types::TransferLeaderRequest;
use crate::raft::types::Vote;
use crate::raft::types::VoteRequest;
use crate::raft::types::VoteResponse;

#[derive(Debug, Serialize, Deserialize)]
pub enum PeerRequest {
    AppendEntries(AppendEntriesRequest),
    Vote(VoteRequest),
    PreVote(VoteRequest),
    /// A piece of a full snapshot; the receiver assembles pieces in order and installs on `done`.
    SnapshotChunk {
        vote: Vote,
        meta: SnapshotMeta,
        offset: u64,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
        done: bool,
    },
    TransferLeader(TransferLeaderRequest),
    /// Who are you and are you in a cluster (used by bootstrap and join).
    Status,
    /// A client write forwarded to the leader.
    Write(Command),
    /// Ask the leader for a read index (linearizable reads on followers).
    ReadIndex,
    /// Add a node (learner, then voter when caught up). Forwarded to the leader.
    Join { id: NodeId, addr: String },
    /// Remove a node for good. Forwarded to the leader.
    Remove { id: NodeId },
    /// Many client writes forwarded to the leader in one frame (a follower batches what queued
    /// up while its previous batch was in flight). Answered in order.
    WriteBatch(Vec<Command>),
    /// Run a command handler on this node (the proxy forwarding a client request).
    Invoke(crate::sdk::Invocation),
    /// Process an event for a shared subscription (from the leader's dispatcher).
    Deliver { sub: String, event: crate::broker::event::Event },
    /// Process several events for a shared subscription, concurrently; answered with one
    /// outcome per event, in order. Only to peers that announced `features::DELIVER_BATCH`.
    DeliverBatch { sub: String, events: Vec<crate::broker::event::Event> },
    /// From the node about to bootstrap a cluster of `members` (all seen without cluster
    /// state): mark this node's still empty log as a founder's (`LogStore::mark_founder`).
    Found { members: Vec<NodeId> },
    /// To the consumer that answered a `DeliverBatch` with `DeliveredEach { ticket }` and
    /// events still `Running`: answered once at least one of them ended (`DeliveredSome`).
    AwaitDelivery { ticket: u64 },
    /// `Invoke` with the client's request headers for a sidecar's app, answered with
    /// `InvokedWith`. Only to peers that announced `features::APP_HEADERS`.
    InvokeWith { inv: crate::sdk::Invocation, headers: crate::sdk::HeaderList },
    /// A client's answer to events it fetched from this node's pull subscription `sub`, sent
    /// to another node (a client's answer may land on any node): an ack, a nack or a term.
    /// Answered with `PullAnswered`. Only to peers that announced `features::PULL_FORWARD`.
    PullAnswer { sub: String, ids: Vec<String>, verdict: crate::broker::pull::Verdict },
}

impl PeerRequest {
    /// For a Raft RPC, the node it is sent in the name of (the candidate of a vote, the leader
    /// of an append, a snapshot or a leadership transfer): always the sender itself, which the
    /// receiver checks against the link's peer so that a member cannot vote or lead as another.
    pub fn raft_sender(&self) -> Option<NodeId> {
        match self {
            PeerRequest::AppendEntries(r) => Some(r.vote.leader_id().node_id),
            PeerRequest::Vote(r) | PeerRequest::PreVote(r) => Some(r.vote.leader_id().node_id),
            PeerRequest::SnapshotChunk { vote, .. } => Some(vote.leader_id().node_id),
            PeerRequest::TransferLeader(r) => Some(r.from_leader().leader_id().node_id),
            _ => None,
        }
    }

    /// A short name for metrics and logs (never the content).
    pub fn name(&self) -> &'static str {
        match self {
            PeerRequest::AppendEntries(_) => "append_entries",
            PeerRequest::Vote(_) => "vote",
            PeerRequest::PreVote(_) => "pre_vote",
            PeerRequest::SnapshotChunk { .. } => "snapshot_chunk",
            PeerRequest::TransferLeader(_) => "transfer_leader",
            PeerRequest::Status => "status",
            PeerRequest::Write(_) => "write",
            PeerRequest::ReadIndex => "read_index",
            PeerRequest::Join { .. } => "join",
            PeerRequest::Remove { .. } => "remove",
            PeerRequest::WriteBatch(_) => "write_batch",
            PeerRequest::Invoke(_) => "invoke",
            PeerRequest::Deliver { .. } => "deliver",
            PeerRequest::DeliverBatch { .. } => "deliver_batch",
            PeerRequest::Found { .. } => "found",
            PeerRequest::AwaitDelivery { .. } => "await_delivery",
            PeerRequest::InvokeWith { .. } => "invoke",
            PeerRequest::PullAnswer { .. } => "pull_answer",
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub enum PeerResponse {
    AppendEntries(AppendEntriesResponse),
    Vote(VoteResponse),
    /// `None` acknowledges a non-final snapshot chunk.
    Snapshot(Option<SnapshotResponse>),
    TransferLeader,
    Status(NodeStatus),
    Written { index: u64, result: CommandResult },
    ReadIndex(u64),
    Done,
    Error(RemoteError),
    /// One outcome per command of a `WriteBatch`, in order.
    WrittenBatch(Vec<Result<(u64, CommandResult), RemoteError>>),
    /// What the handler answered (it ran).
    Invoked(Result<crate::sdk::Output, crate::sdk::HandlerError>),
    /// The subscription handler's outcome: `Ok` = ack.
    Delivered(Result<(), crate::sdk::HandlerError>),
    /// One outcome per event of a `DeliverBatch`, in order.
    DeliveredBatch(Vec<Result<(), crate::sdk::HandlerError>>),
    /// One outcome per event of a `DeliverBatch`, in order, which may also say of an event
    /// that no handler ran for it, or that its handler still runs: the leader then asks for
    /// those with `AwaitDelivery { ticket }`. Only to peers that announced
    /// `features::DELIVERED_EACH`.
    DeliveredEach { outcomes: Vec<EventOutcome>, ticket: u64 },
    /// The answer to `AwaitDelivery`: outcomes of events of that batch (by their index in it)
    /// that ended since, at least one; never `Running`.
    DeliveredSome(Vec<(u32, EventOutcome)>),
    /// The answer to `InvokeWith`: what the handler answered, and the headers of a sidecar
    /// app's answer (of the `Output` or the `HandlerError`, whichever it is).
    InvokedWith { answer: Result<crate::sdk::Output, crate::sdk::HandlerError>, headers: crate::sdk::HeaderList },
    /// The answer to `PullAnswer`: the ids the node holds no lease for.
    PullAnswered { unknown: Vec<String> },
}

/// What a consumer says of one event of a `DeliverBatch` in `DeliveredEach`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub enum EventOutcome {
    /// The handler ran: `Ok` = ack.
    Ran(Result<(), crate::sdk::HandlerError>),
    /// No handler ran to its end (the consumer's drain cut it off, or its app refused the
    /// connection): not an attempt, the leader hands the event to another consumer.
    NotServed(String),
    /// Its handler still runs (the others of its batch are answered without waiting for it).
    Running,
    /// The handler failed and said no retry can mend it (`HandlerError::no_retry`): an attempt
    /// that dead-letters the event at once. Only to a leader that announced
    /// `features::REJECTED` (to others, `Ran(Err(..))`).
    Rejected(crate::sdk::HandlerError),
}

/// What a node says about itself to a peer or a seed prober.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NodeStatus {
    pub node_id: NodeId,
    pub addr: String,
    /// Has a membership (is, or was, part of a cluster).
    pub initialized: bool,
    pub leader: Option<NodeId>,
    pub term: u64,
}

/// An error the remote side reports; mapped to HTTP status in `api::error`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, thiserror::Error)]
pub enum RemoteError {
    #[error("not the leader (leader: {leader:?})")]
    NotLeader { leader: Option<NodeId> },
    #[error("unavailable: {0}")]
    Unavailable(String),
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("remote failure: {0}")]
    Internal(String),
    /// The request arrived but no handler ran (not offered here, draining, overloaded): safe to
    /// send elsewhere.
    #[error("not served: {0}")]
    NotServed(String),
    /// The request's own deadline passed on the node that served it (a membership change that
    /// did not commit in time): its outcome is unknown. Last, and sent only as a whole
    /// `PeerResponse::Error` to peers that announced `features::REMOTE_TIMEOUT` (others get it
    /// as `Unavailable`: `for_peer`).
    #[error("deadline exceeded: {0}")]
    Timeout(String),
}

impl PeerResponse {
    /// This answer as a peer with `features` can decode it: a `RemoteError::Timeout` is an
    /// `Unavailable` for builds before it.
    pub fn for_peer(self, features: u64) -> PeerResponse {
        match self {
            PeerResponse::Error(RemoteError::Timeout(m)) if features & crate::peer::frame::features::REMOTE_TIMEOUT == 0 => {
                PeerResponse::Error(RemoteError::Unavailable(m))
            }
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deadline's answer reaches a peer of a build before `RemoteError::Timeout` as the
    /// `Unavailable` it decodes; other answers pass as they are. Over HTTP it is a 504.
    #[test]
    fn a_timeout_is_an_unavailable_for_a_peer_that_does_not_decode_it() {
        use crate::peer::frame::features::{ALL, REMOTE_TIMEOUT};
        let timeout = || PeerResponse::Error(RemoteError::Timeout("did not commit in time".into()));
        assert!(matches!(timeout().for_peer(ALL), PeerResponse::Error(RemoteError::Timeout(_))));
        assert!(matches!(timeout().for_peer(ALL & !REMOTE_TIMEOUT), PeerResponse::Error(RemoteError::Unavailable(m)) if m == "did not commit in time"));
        assert!(matches!(PeerResponse::Done.for_peer(0), PeerResponse::Done));
        let http = crate::api::error::ApiError::from(RemoteError::Timeout("may still be applied".into()));
        assert_eq!(http.status(), http::StatusCode::GATEWAY_TIMEOUT);
        assert!(http.to_string().contains("may still be applied"), "{http}");
    }

    /// Every Raft request names its sender (the candidate, or the leader), which the link
    /// reader holds against the link's peer; other requests name none.
    #[test]
    fn raft_requests_name_their_sender() {
        let vote = || Vote::new(3, 7);
        let append = AppendEntriesRequest { vote: vote(), prev_log_id: None, entries: Vec::new(), leader_commit: None };
        let requests = [
            PeerRequest::AppendEntries(append),
            PeerRequest::Vote(VoteRequest::new(vote(), None)),
            PeerRequest::PreVote(VoteRequest::new(vote(), None)),
            PeerRequest::SnapshotChunk { vote: vote(), meta: SnapshotMeta::default(), offset: 0, data: Vec::new(), done: false },
            PeerRequest::TransferLeader(TransferLeaderRequest::new(vote(), 2, None)),
        ];
        for r in &requests {
            assert_eq!(r.raft_sender(), Some(7), "{}", r.name());
        }
        assert_eq!(PeerRequest::Status.raft_sender(), None);
        assert_eq!(PeerRequest::Join { id: 4, addr: "a:1".into() }.raft_sender(), None);
    }
}

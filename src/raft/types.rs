//! Every openraft type we use, behind one module.
//!
//! openraft 0.10 is generic-heavy and still in alpha: its traits change between releases. Keeping
//! the type configuration and the aliases here means an upgrade (the version is pinned with `=` in
//! `Cargo.toml`) touches this file and the three trait implementations next to it, nothing else.

use std::fmt;

use serde::Deserialize;
use serde::Serialize;

pub use openraft::BasicNode;
pub use openraft::ChangeMembers;
pub use openraft::Config as RaftConfig;
pub use openraft::LogIdOptionExt;
pub use openraft::RaftLogReader;
pub use openraft::RaftNetworkFactory;
pub use openraft::RaftNetworkV2;
pub use openraft::RaftSnapshotBuilder;
pub use openraft::ReadPolicy;
pub use openraft::ServerState;
pub use openraft::SnapshotPolicy;
pub use openraft::StoredMembership;
pub use openraft::entry::RaftEntry;
pub use openraft::storage::IOFlushed;
pub use openraft::storage::LogState;
pub use openraft::storage::RaftLogStorage;
pub use openraft::storage::RaftStateMachine;
pub use openraft::async_runtime::watch::WatchReceiver;

/// Cluster-wide node identifier, chosen by the operator (`--id`) and stored in the data dir.
pub type NodeId = u64;

/// The id of the cluster whose history this node's state holds (`state_machine::CLUSTER_STORE`),
/// once known: set once by the state machine, read by the peer handshake
/// (`peer::frame::Hello::cluster_id`).
pub type KnownClusterId = std::sync::Arc<std::sync::OnceLock<u128>>;

/// The peer features each member announced, as the replicated state records them
/// (`state_machine::record_features`): what a node counts a member by while it has not linked
/// to it since it started (`peer::PeerNet::features_known`). Replaced by the state machine
/// after each apply or install that changed the record, read by `Replica::members_have`.
pub type RecordedFeatures = std::sync::Arc<std::sync::RwLock<MemberFeatures>>;

/// The recorded features (`RecordedFeatures`): the reserved key's revision (0: none) and each
/// member's features.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemberFeatures {
    pub revision: u64,
    pub by_node: std::collections::BTreeMap<NodeId, u64>,
}

openraft::declare_raft_types!(
    /// The raftbridge type configuration for openraft.
    pub TypeConfig:
        D = Command,
        R = CommandResult,
        NodeId = NodeId,
        Node = BasicNode,
);

pub type Raft = openraft::Raft<TypeConfig, crate::raft::state_machine::StateMachine>;
pub type Entry = openraft::type_config::alias::EntryOf<TypeConfig>;
pub type LogId = openraft::type_config::alias::LogIdOf<TypeConfig>;
pub type Vote = openraft::type_config::alias::VoteOf<TypeConfig>;
pub type SnapshotMeta = openraft::type_config::alias::SnapshotMetaOf<TypeConfig>;
pub type Snapshot = openraft::type_config::alias::SnapshotOf<TypeConfig, SnapshotData>;
pub type StoredMembershipT = openraft::type_config::alias::StoredMembershipOf<TypeConfig>;
pub type Membership = openraft::Membership<NodeId, BasicNode>;
pub type RaftMetrics = openraft::RaftMetrics<TypeConfig>;
pub type EntryResponder = openraft::storage::EntryResponder<TypeConfig>;
pub type AppendEntriesRequest = openraft::raft::AppendEntriesRequest<TypeConfig>;
pub type AppendEntriesResponse = openraft::raft::AppendEntriesResponse<TypeConfig>;
/// One AppendEntries outcome in a replication stream: how far the follower matches, or why not.
pub type StreamAppendResult = openraft::raft::StreamAppendResult<TypeConfig>;
pub type VoteRequest = openraft::raft::VoteRequest<TypeConfig>;
pub type VoteResponse = openraft::raft::VoteResponse<TypeConfig>;
pub type SnapshotResponse = openraft::raft::SnapshotResponse<TypeConfig>;
pub type TransferLeaderRequest = openraft::raft::TransferLeaderRequest<TypeConfig>;
pub type RPCError = openraft::error::RPCError<TypeConfig>;
pub type StreamingError = openraft::error::StreamingError<TypeConfig>;
pub type RaftError<E = openraft::error::Infallible> = openraft::error::RaftError<TypeConfig, E>;
pub type ClientWriteError = openraft::error::ClientWriteError<TypeConfig>;
pub type ClientWriteResponse = openraft::raft::ClientWriteResponse<TypeConfig>;

/// A snapshot of the state machine is an in-memory serialized image (see `state_machine`).
pub type SnapshotData = Vec<u8>;

/// Tags a state write made by a handler during a request with an idempotency key: (key, the
/// write's sequence number within the request). The state machine applies a tagged write once.
pub type WriteTag = Option<(String, u32)>;

/// An entry in the replicated log: one state-machine command.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub enum Command {
    /// Set `store/key` to `value` (raw JSON bytes). With `if_revision`, only when the key's current
    /// revision equals it (0 = the key must not exist).
    Put {
        store: String,
        key: String,
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
        if_revision: Option<u64>,
        tag: WriteTag,
    },
    /// Remove `store/key`, optionally conditional like `Put`.
    Delete { store: String, key: String, if_revision: Option<u64> },
    /// Add `by` to the integer at `store/key` (absent = 0).
    Increment { store: String, key: String, by: i64, tag: WriteTag },
    /// Replace this node's entry in the service registry (empty = offers nothing).
    Register { node: NodeId, services: Vec<crate::sdk::ServiceDecl> },
    /// Claim the right to run the request with this idempotency key (see `state_machine`).
    IdemBegin { key: String, attempt: u64, now_ms: u64, lease_ms: u64, window_ms: u64 },
    /// Record the finished response for an idempotency key.
    IdemComplete { key: String, attempt: u64, response: StoredResponse },
    /// Append events to the event log (one entry, many events: one fsync serves them all).
    Publish {
        now_ms: u64,
        /// Shared, so that the copies openraft and the forwarding path make of an entry (one
        /// per follower it is sent to, one per write attempt) do not copy every event; the
        /// encoding is that of the plain `Vec`.
        events: std::sync::Arc<Vec<crate::broker::event::NewEvent>>,
        limits: EventLimits,
    },
    /// Subscription progress: acks, failed attempts, dead letters, per-instance positions.
    SubUpdate { updates: Vec<SubUpdate> },
    /// `SubUpdate`'s progress and `Publish`'s events in one entry: the leader's batcher puts
    /// the acks it has queued into its next event entry, so deliveries cost no entries (and
    /// fsyncs, and replication rounds) of their own. Applies the updates, then the events.
    /// Added after the others: logs written before it still decode.
    PublishAndSettle {
        now_ms: u64,
        events: std::sync::Arc<Vec<crate::broker::event::NewEvent>>,
        limits: EventLimits,
        /// Shared like `events`: an entry carries hundreds of acks under load, each with its
        /// subscription's name, and every copy of the entry used to clone them all.
        updates: std::sync::Arc<Vec<SubUpdate>>,
    },
    /// Forget a subscription and its progress (cursor, acks, attempts, dead letters), as
    /// deleting a JetStream consumer does: only while no registered node declares it (a
    /// declaring node would re-create it). Added after the others: older builds cannot decode
    /// it, so the API proposes it only when every member announced `features::DROP_SUBSCRIPTION`.
    DropSubscription { name: String },
    /// `IdemBegin` that also names what the request asked (`fingerprint`: path and query
    /// parameters and body, `proxy::idempotency::fingerprint`). The key's record keeps the first
    /// claim's fingerprint, and a claim with another one is answered `IdemMismatch` (the IETF
    /// idempotency-key draft's 422) instead of replaying an answer to a different request.
    /// Added after the others: older builds cannot decode it, so the proxy proposes it only when
    /// every member announced `features::IDEM_FINGERPRINT`, and `IdemBegin` otherwise.
    IdemClaim { key: String, attempt: u64, now_ms: u64, lease_ms: u64, window_ms: u64, fingerprint: u64 },
    /// `IdemClaim` (a fingerprint when it names one: renewals, releases and the expiry tick do
    /// not) whose clock tick keeps the claims whose lease holds (`SmData::tick`): forgetting one
    /// let a second request with its key run beside the first, and the first's retried writes
    /// apply twice. `IdemBegin` and `IdemClaim` keep the tick they had, so that every build
    /// applies each entry alike. Added after the others: proposed only when every member
    /// announced `features::HELD_CLAIMS`.
    IdemTake { key: String, attempt: u64, now_ms: u64, lease_ms: u64, window_ms: u64, fingerprint: Option<u64> },
    /// `IdemComplete` with the answer's headers (a sidecar app's `Location`, `Set-Cookie`, ...),
    /// which a replay sends again. Added after the others: older builds cannot decode it, so
    /// the proxy proposes it only when every member announced `features::APP_HEADERS`.
    IdemCompleteWith { key: String, attempt: u64, response: StoredResponse, headers: crate::sdk::HeaderList },
    /// Drop what the state keeps for each of `nodes` that is not a member when it is applied:
    /// its registry entry and its every-instance subscription positions (a node killed and
    /// then removed never clears them itself, and each one stayed for good). Added after the
    /// others: older builds cannot decode it, so it is proposed only when every member
    /// announced `features::FORGET_NODES`. Applied alike by every build that decodes it.
    ForgetNodes { nodes: Vec<NodeId> },
    /// `Put` of a key that expires at `expires_ms` (Unix ms: the proposing node's clock plus
    /// the write's TTL), when the leader's `Expire` removes it; a later `Put`, `Delete` or a
    /// `PutExpiring` of its own replaces the expiry (`Increment` keeps it). Added after the
    /// others: proposed only when every member announced `features::KEY_TTL`.
    PutExpiring {
        store: String,
        key: String,
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
        if_revision: Option<u64>,
        expires_ms: u64,
    },
    /// Remove each listed key (store, key, revision) that still has that revision: the keys
    /// whose expiry the leader found passed by its clock (`store::expire_keys`). Named here, not
    /// judged by each node from its own copy of the expiries, so that every node removes the
    /// same keys even where a node's copy lacks some (an older build's snapshot keeps none).
    /// Added with `PutExpiring`.
    Expire { keys: Vec<(String, String, u64)> },
    /// `command` applied at most once per `tag`, as a tagged `Put` or `Increment` is: a
    /// handler's `delete` and its puts that expire, which carry no tag of their own. A re-run
    /// of a handler (a redelivery, a keyed command retried after its node died) that deleted
    /// a key and then put it again used to delete it again and have its put answered from the
    /// record: the key was gone though the first run said it was written. (A handler's `Txn`
    /// is wrapped in it too.) Added after the
    /// others: proposed only when every member announced `features::TAGGED`.
    Tagged {
        tag: (String, u32),
        #[serde(deserialize_with = "tagged_inner")]
        command: Box<Command>,
    },
    /// Several writes to one store's keys, all or none, under one revision (this entry's
    /// index), as etcd's and Consul's transactions and Dapr's state transactions apply: every
    /// op's precondition is judged against the state before any of them, and the first that
    /// fails fails the whole (`CommandResult::TxnFailed`). Plain puts only (no TTL: a put ends
    /// a key's expiry, as `Put` does). Added after the others: proposed only when every member
    /// announced `features::TXN`.
    Txn { store: String, ops: Vec<TxnOp> },
    /// A shared subscription's delivery starts again at `position` (clamped to the retained
    /// log: the oldest retained event at most, the log's end at least), as a Kafka consumer
    /// group's offsets are reset or a Pub/Sub subscription seeks: back, to process retained
    /// events again (after a handler's bug was fixed, say); forward, to skip them. Acks and
    /// attempts are forgotten, dead letters kept. Answered `SubscriptionSought`. Added after
    /// the others: proposed only when every member announced `features::SUB_SEEK`.
    SeekSubscription { name: String, position: u64 },
    /// Remove each listed key (store, key) whose expiry is at or before `now_ms` (the leader's
    /// clock in most members' time, `store::cluster_now_ms`) when it is applied: `Expire`
    /// judged by the expiry rather than the revision. An `Increment` keeps a key's expiry but
    /// changes its revision, and the leader names revisions from the state it has applied,
    /// which trails what it has appended: a key incremented all the time was never removed
    /// by `Expire`, whose rounds went on naming it. A key written again since it was named
    /// (a `Put` ends its expiry, a `PutExpiring` gives it a later one) is kept, as before.
    /// Every node judges from its own copy of the expiries, which every build that applies
    /// `PutExpiring` keeps in its snapshots (`features::KEY_TTL`). Added after the others:
    /// proposed only when every member announced `features::EXPIRE_DUE`.
    ExpireDue { keys: Vec<(String, String)>, now_ms: u64 },
}

/// One write or check of a `Command::Txn`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum TxnOp {
    /// Set the key, with `Put`'s precondition (0: it must be absent).
    Put {
        key: String,
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
        if_revision: Option<u64>,
    },
    /// Remove the key (absent is no failure unless `if_revision` names a revision).
    Delete { key: String, if_revision: Option<u64> },
    /// Write nothing; fail the transaction unless the key's revision is `revision` (0: absent).
    Check { key: String, revision: u64 },
}

impl TxnOp {
    pub fn key(&self) -> &str {
        match self {
            TxnOp::Put { key, .. } | TxnOp::Delete { key, .. } | TxnOp::Check { key, .. } => key,
        }
    }

    /// The revision the op wants the key to have before the transaction, if any.
    pub fn expects(&self) -> Option<u64> {
        match self {
            TxnOp::Put { if_revision, .. } | TxnOp::Delete { if_revision, .. } => *if_revision,
            TxnOp::Check { revision, .. } => Some(*revision),
        }
    }
}

/// Retention of the event log and the producer-dedup window (carried in each `Publish` so every
/// node applies the same limits).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct EventLimits {
    pub max_events: u64,
    pub max_bytes: u64,
    pub max_age_ms: u64,
    pub dedup_window_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum SubUpdate {
    /// A shared subscription's event was processed.
    Ack { sub: String, position: u64 },
    /// A delivery failed; after `max_attempts` the event goes to the dead letters.
    Failed { sub: String, position: u64, reason: String },
    /// An every-instance subscription's consumer on `node` finished `position` (acked, or dead
    /// when `dead` holds the reason).
    Instance { sub: String, node: NodeId, position: u64, dead: Option<(u32, String)> },
    /// A shared subscription's progress starts at `position` if it is behind it (everything
    /// below counts as done): where a node had come as an instance of it when its build made
    /// the subscription shared (`registry::carried_progress`), which would otherwise start
    /// again at the oldest retained event. Older builds cannot decode it: proposed only once
    /// every member announced `features::SUB_REBASE`.
    Rebase { sub: String, position: u64 },
    /// `Failed` for the delivery handed out when the event had `attempts` failed attempts:
    /// counted only while it still has that many, so a failure reported twice (a forwarded
    /// update sent again after its link closed, or an expiry and the late handler's own nack
    /// for one delivery) counts once; ignored on a subscription that is not shared (left over
    /// from before it changed mode). Older builds cannot decode it: proposed only once every
    /// member announced `features::FAILED_AT`.
    FailedAt { sub: String, position: u64, attempts: u32, reason: String },
    /// A failure its handler said no retry can mend (`HandlerError::no_retry`), for the
    /// delivery handed out when the event had `attempts` failed attempts: dead-lettered at once
    /// with `attempts + 1`, under `FailedAt`'s rules (only while it still has that many, only on a
    /// shared subscription). Older builds cannot decode it: proposed only once every member
    /// announced `features::REJECTED`.
    Rejected { sub: String, position: u64, attempts: u32, reason: String },
}

impl SubUpdate {
    /// About the bytes it takes encoded: its strings and a fixed allowance.
    pub fn approx_size(&self) -> usize {
        32 + match self {
            SubUpdate::Ack { sub, .. } => sub.len(),
            SubUpdate::Failed { sub, reason, .. } | SubUpdate::FailedAt { sub, reason, .. } | SubUpdate::Rejected { sub, reason, .. } => sub.len() + reason.len(),
            SubUpdate::Instance { sub, dead, .. } => sub.len() + dead.as_ref().map_or(0, |(_, r)| r.len()),
            SubUpdate::Rebase { sub, .. } => sub.len(),
        }
    }
}

/// A command response kept for idempotent replay.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StoredResponse {
    pub status: u16,
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
    pub content_type: Option<String>,
    /// A sidecar app's answer headers (`proxy::headers`). Not in this struct's encoding, which
    /// the log, snapshots and forwarded answers of older builds share: `IdemCompleteWith`
    /// carries them into the log and the snapshot extension (`SmExt`) keeps them.
    #[serde(skip)]
    pub headers: crate::sdk::HeaderList,
}

impl StoredResponse {
    /// The same answer, whether or not its headers came along (a forwarded `IdemDone` does not
    /// carry them).
    pub fn same_answer(&self, other: &StoredResponse) -> bool {
        (self.status, &self.body, &self.content_type) == (other.status, &other.body, &other.content_type)
    }
}

impl Command {
    /// About the bytes this command takes encoded, cheaply: its variable-size parts plus a
    /// fixed allowance. Bounds how many writes go into one forwarded frame.
    pub fn approx_size(&self) -> usize {
        const FIXED: usize = 128;
        FIXED
            + match self {
                Command::Put { store, key, value, .. } => store.len() + key.len() + value.len(),
                Command::Delete { store, key, .. } | Command::Increment { store, key, .. } => store.len() + key.len(),
                Command::IdemComplete { key, response, .. } => key.len() + response.body.len(),
                Command::IdemCompleteWith { key, response, headers, .. } => key.len() + response.body.len() + crate::proxy::headers::size(headers),
                Command::IdemBegin { key, .. } | Command::IdemClaim { key, .. } | Command::IdemTake { key, .. } => key.len(),
                Command::Publish { events, .. } => crate::broker::event_bytes(events),
                Command::PublishAndSettle { events, updates, .. } => {
                    crate::broker::event_bytes(events) + updates.iter().map(SubUpdate::approx_size).sum::<usize>()
                }
                Command::SubUpdate { updates } => updates.iter().map(SubUpdate::approx_size).sum(),
                Command::Register { services, .. } => services.len() * 4096,
                Command::DropSubscription { name } => name.len(),
                Command::ForgetNodes { nodes } => nodes.len() * 8,
                Command::PutExpiring { store, key, value, .. } => store.len() + key.len() + value.len(),
                Command::Expire { keys } => keys.iter().map(|(store, key, _)| store.len() + key.len() + 8).sum(),
                Command::ExpireDue { keys, .. } => keys.iter().map(|(store, key)| store.len() + key.len() + 8).sum(),
                Command::Tagged { tag, command } => tag.0.len() + command.approx_size(),
                Command::Txn { store, ops } => {
                    store.len()
                        + ops
                            .iter()
                            .map(|op| op.key().len() + 32 + if let TxnOp::Put { value, .. } = op { value.len() } else { 0 })
                            .sum::<usize>()
                }
                Command::SeekSubscription { name, .. } => name.len(),
            }
    }

    /// True when applying the command twice leaves the same history as once (so a write whose
    /// outcome is unknown may be sent again). Not a plain untagged put, though applying it twice
    /// leaves the same value: another client's write may land between the two, and readers
    /// would see the value, the other write, then the value again (one write seen twice),
    /// which no order of the three writes explains. Its caller hears "unknown" instead.
    ///
    /// A publish whose every event carries an idempotency key is one: a repeat inside the dedup
    /// window stores nothing and answers the first ids and positions (a keyed request's emits,
    /// a keyed publish), so a keyed command that emits is not failed with a 502 when the
    /// leader dies under it.
    pub fn retry_safe(&self) -> bool {
        if let Command::Publish { events, .. } = self {
            return !events.is_empty() && events.iter().all(|e| e.idempotency_key.is_some());
        }
        matches!(
            self,
            Command::Put { tag: Some(_), .. }
                | Command::Increment { tag: Some(_), .. }
                | Command::Register { .. }
                | Command::IdemBegin { .. }
                | Command::IdemClaim { .. }
                | Command::IdemTake { .. }
                | Command::IdemComplete { .. }
                | Command::IdemCompleteWith { .. }
                | Command::SubUpdate { .. }
                | Command::ForgetNodes { .. }
                | Command::Tagged { .. }
        )
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print values: they may hold secrets.
        match self {
            Command::Put { store, key, .. } => write!(f, "put {store}/{key}"),
            Command::Delete { store, key, .. } => write!(f, "delete {store}/{key}"),
            Command::Increment { store, key, .. } => write!(f, "increment {store}/{key}"),
            Command::Register { node, .. } => write!(f, "register node {node}"),
            Command::IdemBegin { .. } | Command::IdemClaim { .. } | Command::IdemTake { .. } => write!(f, "idempotency begin"),
            Command::IdemComplete { .. } | Command::IdemCompleteWith { .. } => write!(f, "idempotency complete"),
            Command::Publish { events, .. } => write!(f, "publish {} events", events.len()),
            Command::SubUpdate { updates } => write!(f, "{} subscription updates", updates.len()),
            Command::PublishAndSettle { events, updates, .. } => {
                write!(f, "publish {} events and {} subscription updates", events.len(), updates.len())
            }
            Command::DropSubscription { name } => write!(f, "drop subscription {name}"),
            Command::ForgetNodes { nodes } => write!(f, "forget departed nodes {nodes:?}"),
            Command::PutExpiring { store, key, .. } => write!(f, "put {store}/{key} with an expiry"),
            Command::Expire { keys } => write!(f, "expire {} keys", keys.len()),
            Command::ExpireDue { keys, now_ms } => write!(f, "expire {} keys due at {now_ms}", keys.len()),
            Command::Tagged { command, .. } => write!(f, "{command} (tagged)"),
            Command::Txn { store, ops } => write!(f, "transaction of {} ops on {store}", ops.len()),
            Command::SeekSubscription { name, position } => write!(f, "seek subscription {name} to {position}"),
        }
    }
}

/// How deep `Command::Tagged` may nest in what is decoded. This build makes one level; a
/// little room is left for a later build's wrapping.
const MAX_TAGGED_DEPTH: u32 = 4;

thread_local! {
    /// The `Tagged` levels being decoded on this thread (decoding is synchronous: the count
    /// is back to what it was when `tagged_inner` returns, by `Level`'s drop).
    static TAGGED_DEPTH: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// Decodes a `Tagged` command's inner command, refusing past `MAX_TAGGED_DEPTH` levels. The
/// derived decoder recurses once per level and bincode sets no depth bound: a peer's frame (or
/// a log record) of a few hundred kilobytes nesting `Tagged` tens of thousands of times
/// overflowed the decoding thread's stack, which aborts the process, on every node it reached.
fn tagged_inner<'de, D: serde::Deserializer<'de>>(decoder: D) -> Result<Box<Command>, D::Error> {
    struct Level;
    impl Drop for Level {
        fn drop(&mut self) {
            TAGGED_DEPTH.with(|d| d.set(d.get().saturating_sub(1)));
        }
    }
    let depth = TAGGED_DEPTH.with(|d| {
        d.set(d.get() + 1);
        d.get()
    });
    let _level = Level;
    if depth > MAX_TAGGED_DEPTH {
        return Err(serde::de::Error::custom(format!("a tagged command nested more than {MAX_TAGGED_DEPTH} deep")));
    }
    Command::deserialize(decoder).map(Box::new)
}

/// What applying a `Command` produced.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub enum CommandResult {
    /// Blank and membership entries produce nothing.
    #[default]
    None,
    /// The key now has this revision.
    Written { revision: u64 },
    /// The key was removed (`existed` = it was there).
    Deleted { existed: bool },
    /// `if_revision` did not match; `current` is the key's revision (None = absent).
    PreconditionFailed { current: Option<u64> },
    /// The new value of an incremented key, and its revision.
    Incremented { value: i64, revision: u64 },
    /// The key holds something that is not an integer.
    NotANumber,
    /// Registry updated.
    Registered,
    /// The caller now owns the idempotency key and runs the request.
    IdemBegun,
    /// Another attempt owns the key until `until_ms`.
    IdemPending { until_ms: u64 },
    /// The request already finished: replay this.
    IdemDone(StoredResponse),
    /// (id, position) per published event, in order (a deduplicated one gets its first id/position).
    Published(Vec<(String, u64)>),
    SubUpdated,
    /// `DropSubscription`: `declared_by` lists the registered nodes that still declare it (then
    /// nothing was dropped); otherwise `existed` says whether there was one to drop.
    SubscriptionDropped { existed: bool, declared_by: Vec<NodeId> },
    /// `IdemClaim`: the key was first used for a request with another fingerprint; nothing
    /// changed. Only an `IdemClaim` answers it, so only builds that know it receive it.
    IdemMismatch,
    /// `Txn`: op `op` (its place in the list) found the key at `current` (None = absent),
    /// not the revision it wanted; nothing was written. Only a `Txn` answers it.
    TxnFailed { op: u32, current: Option<u64> },
    /// `SeekSubscription`: `cursor` is where delivery starts now; `None` when there is no such
    /// subscription, or it is not shared (nothing changed). Only a `SeekSubscription` answers it.
    SubscriptionSought { cursor: Option<u64>, shared: bool },
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `Tagged` nested deeper than a build makes is refused when decoded, whatever the
    /// depth: 200,000 levels (3 MiB, under the default frame bound) aborted the process with a
    /// stack overflow. Decoded on a thread with a tokio worker's 2 MiB stack.
    #[test]
    fn a_deeply_nested_tagged_command_is_refused_not_a_stack_overflow() {
        let inner = Command::Delete { store: "s".into(), key: "k".into(), if_revision: None };
        let wrap = |c: Command| Command::Tagged { tag: (String::new(), 0), command: Box::new(c) };
        let inner_bytes = bincode::serialize(&inner).expect("encodes");
        let one = bincode::serialize(&wrap(inner.clone())).expect("encodes");
        let prefix = one[..one.len() - inner_bytes.len()].to_vec();
        let nested = move |levels: usize| -> Vec<u8> {
            let mut bytes = prefix.repeat(levels);
            bytes.extend_from_slice(&inner_bytes);
            bytes
        };
        std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(move || {
                let mut want = inner.clone();
                for _ in 0..MAX_TAGGED_DEPTH {
                    want = wrap(want);
                }
                let decoded: Command = bincode::deserialize(&nested(MAX_TAGGED_DEPTH as usize)).expect("as deep as allowed decodes");
                assert_eq!(decoded, want);
                for levels in [MAX_TAGGED_DEPTH as usize + 1, 200_000] {
                    let e = bincode::deserialize::<Command>(&nested(levels)).expect_err("too deep");
                    assert!(e.to_string().contains("nested more than"), "{e}");
                }
                // In a peer's frame, as the link's reader decodes it.
                let mut write = bincode::serialize(&crate::peer::message::PeerRequest::Write(Command::Delete { store: String::new(), key: String::new(), if_revision: None })).expect("encodes");
                write.truncate(4);
                write.extend_from_slice(&nested(200_000));
                let frame = crate::peer::frame::Frame::new(crate::peer::frame::Kind::Request, 1, write.into());
                assert!(frame.message::<crate::peer::message::PeerRequest>().is_err());
                // The count is back at 0: a shallow command decodes again on this thread.
                assert_eq!(bincode::deserialize::<Command>(&nested(1)).expect("decodes"), wrap(inner));
            })
            .expect("spawns")
            .join()
            .expect("no stack overflow");
    }

    /// Only writes whose second application is invisible are sent again after an unknown
    /// outcome: a tagged put is, a plain one is not (see `retry_safe`).
    #[test]
    fn a_plain_put_is_not_sent_twice_and_a_tagged_one_may_be() {
        let put = |if_revision, tag: WriteTag| Command::Put { store: "s".into(), key: "k".into(), value: b"1".to_vec(), if_revision, tag };
        assert!(!put(None, None).retry_safe());
        assert!(!put(Some(4), None).retry_safe());
        assert!(put(None, Some(("handler-key".into(), 0))).retry_safe());
        assert!(put(Some(4), Some(("handler-key".into(), 1))).retry_safe(), "the tag records its outcome");
        assert!(!Command::Delete { store: "s".into(), key: "k".into(), if_revision: None }.retry_safe());
        assert!(Command::Increment { store: "s".into(), key: "k".into(), by: 1, tag: Some(("k".into(), 1)) }.retry_safe());
        assert!(!Command::Increment { store: "s".into(), key: "k".into(), by: 1, tag: None }.retry_safe());
        // A publish is when every event carries a key (a repeat answers the first positions).
        let event = |key: Option<&str>| crate::broker::new_event("e", b"{}".to_vec(), &Default::default(), None, key.map(str::to_string));
        let publish = |events: Vec<crate::broker::event::NewEvent>| Command::Publish { now_ms: 0, events: std::sync::Arc::new(events), limits: EventLimits { max_events: 1, max_bytes: 1, max_age_ms: 1, dedup_window_ms: 1 } };
        assert!(publish(vec![event(Some("a")), event(Some("b"))]).retry_safe());
        assert!(!publish(vec![event(Some("a")), event(None)]).retry_safe(), "one event without a key");
        assert!(!publish(vec![]).retry_safe());
    }

    /// Byte fields encode as bytes (`serde_bytes`: one copy) where they used to be sequences
    /// of `u8` (a call per byte). bincode lays both out the same, so logs, snapshots and peers
    /// from before read the same.
    #[test]
    fn byte_fields_keep_the_layout_of_a_plain_vec() {
        #[derive(Serialize, Deserialize)]
        enum Before {
            Put { store: String, key: String, value: Vec<u8>, if_revision: Option<u64>, tag: WriteTag },
        }
        #[derive(Serialize, Deserialize)]
        struct ResponseBefore {
            status: u16,
            body: Vec<u8>,
            content_type: Option<String>,
        }
        let value = br#"{"a":[1,2,3]}"#.to_vec();
        let before = Before::Put { store: "s".into(), key: "k".into(), value: value.clone(), if_revision: Some(3), tag: Some(("t".into(), 1)) };
        let now = Command::Put { store: "s".into(), key: "k".into(), value: value.clone(), if_revision: Some(3), tag: Some(("t".into(), 1)) };
        let old_bytes = bincode::serialize(&before).unwrap();
        assert_eq!(bincode::serialize(&now).unwrap(), old_bytes);
        assert!(matches!(bincode::deserialize(&old_bytes).unwrap(), Command::Put { value: v, .. } if v == value));
        let response = ResponseBefore { status: 201, body: value.clone(), content_type: None };
        let old_bytes = bincode::serialize(&response).unwrap();
        let now = StoredResponse { status: 201, body: value, content_type: None, headers: Vec::new() };
        assert_eq!(bincode::serialize(&now).unwrap(), old_bytes);
        assert_eq!(bincode::deserialize::<StoredResponse>(&old_bytes).unwrap(), now);
    }
}

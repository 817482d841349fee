//! openraft's network over our peer links.
//!
//! Each Raft RPC is one request on the shared link to the target. Snapshots are sent in chunks of
//! at most `SNAPSHOT_CHUNK` bytes so no frame exceeds the peer frame bound, whatever the state size;
//! the receiver (`node::Node`) reassembles and validates before installing.
//!
//! Each entry is encoded once for all followers: the leader's replication streams send the same
//! entries to every follower, and encoding them per follower (plus a size walk per follower to
//! keep a request within the frame bound) was ~9% of the leader's CPU under batched publishing.
//! `EncodedEntries` keeps recently encoded entries by log id (a log id names one entry's content
//! for good: Raft's log matching), bounded in bytes and count, and an AppendEntries frame is
//! spliced from the request's other fields and those bytes: the same bytes as encoding the whole
//! request (unit-tested), so the wire format is unchanged.

use std::collections::HashMap;
use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;

use openraft::error::NetworkError;
use openraft::error::ReplicationClosed;
use openraft::error::Timeout;
use openraft::error::Unreachable;
use openraft::network::RPCOption;
use openraft::network::RPCTypes;

use crate::peer::PeerError;
use crate::peer::PeerNet;
use crate::peer::frame::Frame;
use crate::peer::frame::Kind;
use crate::peer::message::PeerRequest;
use crate::peer::message::PeerResponse;
use crate::raft::types::*;

/// Bytes of snapshot per frame (well under the default 16 MiB frame bound).
pub const SNAPSHOT_CHUNK: usize = 1 << 20;

/// Deadline of an AppendEntries request that carries entries (see `append_entries`).
const REPLICATION_TIMEOUT: Duration = Duration::from_secs(2);

/// Encoded entries kept at most: bytes (a follower that lags further gets its entries encoded
/// again) and count.
const ENCODED_CACHE_BYTES: usize = 16 << 20;
const ENCODED_CACHE_ENTRIES: usize = 4096;

pub struct Network {
    pub net: Arc<PeerNet>,
    /// Shared by every `PeerClient` this factory makes.
    pub encoded: Arc<EncodedEntries>,
}

impl Network {
    pub fn new(net: Arc<PeerNet>) -> Network {
        Network { net, encoded: Arc::new(EncodedEntries::default()) }
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> PeerClient {
        self.net.set_peer_addr(target, &node.addr);
        PeerClient { target, net: self.net.clone(), encoded: self.encoded.clone() }
    }
}

pub struct PeerClient {
    target: NodeId,
    net: Arc<PeerNet>,
    encoded: Arc<EncodedEntries>,
}

/// Recently encoded entries by index (with the log id they were encoded for), oldest first out.
#[derive(Default)]
pub struct EncodedEntries {
    inner: Mutex<EncodedInner>,
}

#[derive(Default)]
struct EncodedInner {
    by_index: HashMap<u64, (LogId, Bytes)>,
    order: VecDeque<u64>,
    bytes: usize,
}

impl EncodedEntries {
    /// The bincode of `entry`, from the cache or encoded now (and kept).
    pub fn get_or_encode(&self, entry: &Entry) -> Result<Bytes, bincode::Error> {
        let index = entry.log_id.index;
        if let Some((id, bytes)) = lock(&self.inner).by_index.get(&index) {
            if *id == entry.log_id {
                return Ok(bytes.clone());
            }
        }
        let bytes = Bytes::from(bincode::serialize(entry)?);
        let mut c = lock(&self.inner);
        match c.by_index.insert(index, (entry.log_id, bytes.clone())) {
            // Another leader's entry at this index (replaced after a truncation).
            Some((_, old)) => c.bytes = c.bytes - old.len() + bytes.len(),
            None => {
                c.bytes += bytes.len();
                c.order.push_back(index);
            }
        }
        while c.bytes > ENCODED_CACHE_BYTES || c.order.len() > ENCODED_CACHE_ENTRIES {
            let Some(oldest) = c.order.pop_front() else { break };
            if let Some((_, b)) = c.by_index.remove(&oldest) {
                c.bytes -= b.len();
            }
        }
        Ok(bytes)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding it leaves a consistent cache (every update is one insert or remove).
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The request frame for `PeerRequest::AppendEntries(rpc)` with `entries` (already encoded) as
/// its entries: `rpc`'s own entries are ignored. Encodes `rpc` without entries, whose bincode
/// ends with the entries' length (a u64, zero) and `leader_commit`, and puts the entries'
/// length and bytes in between.
fn append_entries_frame(corr: u64, rpc: &AppendEntriesRequest, entries: &[Bytes]) -> Result<Bytes, bincode::Error> {
    let head = AppendEntriesRequest { vote: rpc.vote.clone(), prev_log_id: rpc.prev_log_id, entries: Vec::new(), leader_commit: rpc.leader_commit };
    let empty = bincode::serialize(&PeerRequest::AppendEntries(head))?;
    let tail = bincode::serialized_size(&rpc.leader_commit)? as usize;
    let split = empty.len().checked_sub(tail + 8).filter(|s| empty[*s..*s + 8] == [0u8; 8]);
    let Some(split) = split else {
        return Err(Box::new(bincode::ErrorKind::Custom("unexpected AppendEntries layout".into())));
    };
    let count = (entries.len() as u64).to_le_bytes();
    let mut parts: Vec<&[u8]> = Vec::with_capacity(entries.len() + 3);
    parts.push(&empty[..split]);
    parts.push(&count);
    parts.extend(entries.iter().map(|b| &b[..]));
    parts.push(&empty[split + 8..]);
    Ok(Frame::encode_parts(Kind::Request, corr, &parts))
}

impl PeerClient {
    async fn call(&self, req: PeerRequest, action: RPCTypes, ttl: Duration) -> Result<PeerResponse, RPCError> {
        let result = self.net.request(self.target, &req, ttl).await;
        self.rpc_result(result, action)
    }

    fn rpc_result(&self, result: Result<PeerResponse, PeerError>, action: RPCTypes) -> Result<PeerResponse, RPCError> {
        match result {
            Ok(PeerResponse::Error(e)) => Err(RPCError::Network(NetworkError::new(&e))),
            Ok(resp) => Ok(resp),
            Err(PeerError::Timeout { timeout, .. }) => Err(RPCError::Timeout(Timeout {
                action,
                id: self.net.node_id(),
                target: self.target,
                timeout,
            })),
            Err(e) if e.not_delivered() => Err(RPCError::Unreachable(Unreachable::new(&e))),
            Err(e) => Err(RPCError::Network(NetworkError::new(&e))),
        }
    }
}

/// How many of the entries (encoded sizes `sizes`) go in one AppendEntries request: the longest
/// prefix (at least one) that fits in `budget` bytes, so a request never exceeds the peer frame
/// bound (openraft sends up to `max_payload_entries` entries, and an entry of merged events may
/// be a megabyte). One entry always goes: replication must progress.
fn fit_to_frame(sizes: impl IntoIterator<Item = usize>, budget: usize) -> usize {
    let mut total = 0usize;
    let mut keep = 0;
    for (i, n) in sizes.into_iter().enumerate() {
        total = total.saturating_add(n);
        if total > budget && i > 0 {
            break;
        }
        keep = i + 1;
    }
    keep
}

fn unexpected(resp: &PeerResponse) -> RPCError {
    let e = std::io::Error::other(format!("unexpected response {resp:?}"));
    RPCError::Network(NetworkError::new(&e))
}

impl RaftNetworkV2<TypeConfig> for PeerClient {
    type SnapshotData = SnapshotData;

    async fn append_entries(&mut self, rpc: AppendEntriesRequest, option: RPCOption) -> Result<AppendEntriesResponse, RPCError> {
        if rpc.entries.is_empty() {
            // A heartbeat: nothing to share between followers.
            return match self.call(PeerRequest::AppendEntries(rpc), RPCTypes::AppendEntries, option.hard_ttl()).await? {
                PeerResponse::AppendEntries(r) => Ok(r),
                other => Err(unexpected(&other)),
            };
        }
        let encoded = rpc.entries.iter().map(|e| self.encoded.get_or_encode(e)).collect::<Result<Vec<Bytes>, _>>();
        let encoded = encoded.map_err(|e| RPCError::Network(NetworkError::new(&std::io::Error::other(format!("encoding entries: {e}")))))?;
        let keep = fit_to_frame(encoded.iter().map(Bytes::len), self.net.max_frame() / 2);
        let trimmed = (keep < encoded.len()).then(|| rpc.entries[keep - 1].log_id);
        // openraft gives every AppendEntries the heartbeat interval (60 ms) as its deadline. A
        // request carrying entries (up to megabytes, with the follower's fsync) can take longer
        // on a loaded machine, and a timeout only makes openraft back off and send it again:
        // measured, that produced the 100-300 ms stalls in `bench events --batch 100`. A dead
        // peer is noticed by the link itself (closed connection, missed pings) long before this.
        let ttl = option.hard_ttl().max(REPLICATION_TIMEOUT);
        let sent = self.net.request_encoded(self.target, |corr| append_entries_frame(corr, &rpc, &encoded[..keep]), ttl).await;
        match self.rpc_result(sent, RPCTypes::AppendEntries)? {
            // The follower took what was sent: tell openraft how far, and it sends the rest next.
            PeerResponse::AppendEntries(AppendEntriesResponse::Success) if trimmed.is_some() => {
                Ok(AppendEntriesResponse::PartialSuccess(trimmed))
            }
            PeerResponse::AppendEntries(r) => Ok(r),
            other => Err(unexpected(&other)),
        }
    }

    async fn vote(&mut self, rpc: VoteRequest, option: RPCOption) -> Result<VoteResponse, RPCError> {
        match self.call(PeerRequest::Vote(rpc), RPCTypes::Vote, option.hard_ttl()).await? {
            PeerResponse::Vote(r) => Ok(r),
            other => Err(unexpected(&other)),
        }
    }

    async fn pre_vote(&mut self, rpc: VoteRequest, option: RPCOption) -> Result<VoteResponse, RPCError> {
        match self.call(PeerRequest::PreVote(rpc), RPCTypes::Vote, option.hard_ttl()).await? {
            PeerResponse::Vote(r) => Ok(r),
            other => Err(unexpected(&other)),
        }
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
            loop {
                let end = (offset + SNAPSHOT_CHUNK).min(data.len());
                let done = end == data.len();
                let req = PeerRequest::SnapshotChunk {
                    vote: vote.clone(),
                    meta: snapshot.meta.clone(),
                    offset: offset as u64,
                    data: data[offset..end].to_vec(),
                    done,
                };
                let resp = self.call(req, RPCTypes::InstallSnapshot, option.hard_ttl()).await.map_err(to_streaming)?;
                match resp {
                    PeerResponse::Snapshot(Some(r)) if done => return Ok(r),
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

    #[test]
    fn append_entries_are_fitted_to_the_frame_budget() {
        assert_eq!(fit_to_frame([100; 10], 1 << 20), 10, "everything fits");
        assert_eq!(fit_to_frame([1000; 10], 3500), 3, "three entries of 1 KiB fit in 3.5 KiB");
        // One entry larger than the budget still goes alone: replication must make progress.
        assert_eq!(fit_to_frame([10_000; 3], 1000), 1);
        assert_eq!(fit_to_frame([], 1000), 0);
    }

    #[test]
    fn a_spliced_append_entries_frame_is_the_plain_encoding() {
        let cache = EncodedEntries::default();
        let vote = Vote::new_committed(3, 2);
        let leader_commit = Some(LogId::new(<TypeConfig as RaftTypeConfig>::LeaderId::new_committed(3, 2), 4));
        for (prev, n) in [(None, 1), (Some(ent(4, 0).log_id), 3)] {
            let entries: Vec<Entry> = (5..5 + n).map(|i| ent(i, 50 * i as usize)).collect();
            let rpc = AppendEntriesRequest { vote: vote.clone(), prev_log_id: prev, entries: entries.clone(), leader_commit };
            let encoded: Vec<Bytes> = entries.iter().map(|e| cache.get_or_encode(e).unwrap()).collect();
            let spliced = append_entries_frame(77, &rpc, &encoded).unwrap();
            let plain = Frame::encode(Kind::Request, 77, &PeerRequest::AppendEntries(rpc)).unwrap();
            assert_eq!(spliced, plain, "prev {prev:?}, {n} entries");
        }
        // The cache answers by log id: another leader's entry at a cached index is encoded anew.
        let first = cache.get_or_encode(&ent(5, 10)).unwrap();
        let other_term = Entry::new_normal(LogId::new(<TypeConfig as RaftTypeConfig>::LeaderId::new_committed(4, 1), 5), Command::Delete { store: "s".into(), key: "k".into(), if_revision: None });
        let second = cache.get_or_encode(&other_term).unwrap();
        assert_ne!(first, second);
        assert_eq!(second, Bytes::from(bincode::serialize(&other_term).unwrap()));
    }

    #[test]
    fn the_encoded_entries_cache_is_bounded() {
        let cache = EncodedEntries::default();
        for i in 1..=(ENCODED_CACHE_ENTRIES as u64 + 10) {
            cache.get_or_encode(&ent(i, 8)).unwrap();
        }
        let c = lock(&cache.inner);
        assert_eq!(c.order.len(), ENCODED_CACHE_ENTRIES);
        assert_eq!(c.by_index.len(), ENCODED_CACHE_ENTRIES);
        assert!(!c.by_index.contains_key(&1), "the oldest went first");
        assert_eq!(c.bytes, c.by_index.values().map(|(_, b)| b.len()).sum::<usize>());
        drop(c);
        let big = EncodedEntries::default();
        for i in 1..=40 {
            big.get_or_encode(&ent(i, 1 << 20)).unwrap();
        }
        assert!(lock(&big.inner).bytes <= ENCODED_CACHE_BYTES);
    }
}

//! openraft's network over our peer links.
//!
//! Each Raft RPC is one request on the shared link to the target. Snapshots are sent in chunks of
//! at most `SNAPSHOT_CHUNK` bytes so no frame exceeds the peer frame bound, whatever the state size;
//! the receiver (`node::Node`) reassembles and validates before installing.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::NetworkError;
use openraft::error::ReplicationClosed;
use openraft::error::Timeout;
use openraft::error::Unreachable;
use openraft::network::RPCOption;
use openraft::network::RPCTypes;

use crate::peer::PeerError;
use crate::peer::PeerNet;
use crate::peer::message::PeerRequest;
use crate::peer::message::PeerResponse;
use crate::raft::types::*;

/// Bytes of snapshot per frame (well under the default 16 MiB frame bound).
pub const SNAPSHOT_CHUNK: usize = 1 << 20;

/// Deadline of an AppendEntries request that carries entries (see `append_entries`).
const REPLICATION_TIMEOUT: Duration = Duration::from_secs(2);

pub struct Network {
    pub net: Arc<PeerNet>,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> PeerClient {
        self.net.set_peer_addr(target, &node.addr);
        PeerClient { target, net: self.net.clone() }
    }
}

pub struct PeerClient {
    target: NodeId,
    net: Arc<PeerNet>,
}

impl PeerClient {
    async fn call(&self, req: PeerRequest, action: RPCTypes, ttl: Duration) -> Result<PeerResponse, RPCError> {
        match self.net.request(self.target, &req, ttl).await {
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

fn unexpected(resp: &PeerResponse) -> RPCError {
    let e = std::io::Error::other(format!("unexpected response {resp:?}"));
    RPCError::Network(NetworkError::new(&e))
}

impl RaftNetworkV2<TypeConfig> for PeerClient {
    type SnapshotData = SnapshotData;

    async fn append_entries(&mut self, mut rpc: AppendEntriesRequest, option: RPCOption) -> Result<AppendEntriesResponse, RPCError> {
        let trimmed = trim_to_frame(&mut rpc.entries, self.net.max_frame() / 2);
        // openraft gives every AppendEntries the heartbeat interval (60 ms) as its deadline. A
        // request carrying entries (up to megabytes, with the follower's fsync) can take longer
        // on a loaded machine, and a timeout only makes openraft back off and send it again:
        // measured, that produced the 100-300 ms stalls in `bench events --batch 100`. A dead
        // peer is noticed by the link itself (closed connection, missed pings) long before this.
        let ttl = if rpc.entries.is_empty() { option.hard_ttl() } else { option.hard_ttl().max(REPLICATION_TIMEOUT) };
        match self.call(PeerRequest::AppendEntries(rpc), RPCTypes::AppendEntries, ttl).await? {
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

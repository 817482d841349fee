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

fn unexpected(resp: &PeerResponse) -> RPCError {
    let e = std::io::Error::other(format!("unexpected response {resp:?}"));
    RPCError::Network(NetworkError::new(&e))
}

impl RaftNetworkV2<TypeConfig> for PeerClient {
    type SnapshotData = SnapshotData;

    async fn append_entries(&mut self, rpc: AppendEntriesRequest, option: RPCOption) -> Result<AppendEntriesResponse, RPCError> {
        match self.call(PeerRequest::AppendEntries(rpc), RPCTypes::AppendEntries, option.hard_ttl()).await? {
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

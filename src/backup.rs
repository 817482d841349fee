//! Backups: a saved snapshot (`GET /cluster/snapshot`, `raftbridge snapshot save`), what it
//! holds (`raftbridge snapshot inspect`), and a new cluster's first data dir made of it
//! (`raftbridge snapshot restore`), for the day every node's data is gone.
//!
//! Why restore makes a cluster of one, as etcd's `snapshot restore` and Consul's recovery do:
//! the saved state names the old members, and a node cannot tell whether they will come back
//! with their own logs. The restored node starts as the only voter of a membership that
//! names it alone, at the log position the backup was taken at (so event positions, key
//! revisions and the dedup windows go on from there); the other nodes join it with empty data
//! dirs, as any new node joins. Key revisions (log indexes) jump by `REVISION_GAP` at the
//! restore, as etcd's `--bump-revision` does: the old cluster may have handed out revisions
//! past the backup for other values, and a client's `If-Match` of one would otherwise match an
//! unrelated value the new cluster wrote at that index. Its vote is in the backup's last term, so its first election
//! is in a later term than every entry it holds. What the state keeps of the old members (their
//! registry entries, every-instance positions) the leader forgets as it forgets any node that
//! left (`proxy::registry`). The restored state gets a new cluster id, so a node of the old
//! cluster still running is refused by the new one (`peer`) instead of following its leader
//! with its old state.

use std::path::Path;

use serde::Serialize;

use crate::raft::log_store::LogStore;
use crate::raft::log_store::LogStoreOptions;
use crate::raft::state_machine::SmData;
use crate::raft::types::NodeId;
use crate::raft::types::RaftLogStorage;
use crate::raft::types::SnapshotMeta;
use crate::raft::types::Vote;

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("{path} is not a raftbridge snapshot, or is damaged: {source}")]
    Invalid { path: String, source: std::io::Error },
    #[error("{path} is not empty: restore into a new, empty data dir (this one holds {entry})")]
    NotEmpty { path: String, entry: String },
    #[error("the snapshot holds no log position (a cluster that never committed an entry): nothing to restore")]
    Empty,
}

/// What a saved snapshot holds, printed by `raftbridge snapshot inspect` and `save`.
#[derive(Debug, Serialize)]
pub struct Summary {
    /// The last log entry the snapshot covers.
    pub index: u64,
    pub term: u64,
    /// The members it names: `{"id","addr","voter"}`.
    pub members: Vec<serde_json::Value>,
    pub state_keys: u64,
    pub config_keys: u64,
    pub secret_keys: u64,
    /// Events retained, and the positions of the first retained and of the next one.
    pub events: u64,
    pub first_position: u64,
    pub next_position: u64,
    pub subscriptions: u64,
    pub dead_letters: u64,
    pub idempotency_records: u64,
    /// The snapshot file's size.
    pub bytes: u64,
    /// The id of the cluster it was saved from (32 hex digits; `null` when that cluster had
    /// none: its builds came before ids). A restore gives the new cluster another.
    pub cluster_id: Option<String>,
}

/// Reads and checks a saved snapshot (`path` names it in errors).
pub fn read(bytes: &[u8], path: &str) -> Result<(SnapshotMeta, SmData), BackupError> {
    crate::raft::state_machine::read_backup(bytes).map_err(|source| BackupError::Invalid { path: path.to_string(), source })
}

pub fn summarize(meta: &SnapshotMeta, data: &SmData, bytes: u64) -> Summary {
    let membership = meta.last_membership.membership();
    let voters: std::collections::BTreeSet<NodeId> = membership.voter_ids().collect();
    let members = membership
        .nodes()
        .map(|(id, node)| serde_json::json!({"id": id, "addr": node.addr, "voter": voters.contains(id)}))
        .collect();
    let (mut state_keys, mut config_keys, mut secret_keys) = (0, 0, 0);
    for (store, map) in &data.stores {
        let n = map.len() as u64;
        if store.starts_with("\u{1}config/") {
            config_keys += n;
        } else if store.starts_with("\u{1}secrets/") {
            secret_keys += n;
        } else if !store.starts_with('\u{1}') {
            // Not the reserved ones (the cluster's id: `state_machine::CLUSTER_STORE`).
            state_keys += n;
        }
    }
    Summary {
        index: meta.last_log_id.map_or(0, |l| l.index),
        term: meta.last_log_id.map_or(0, |l| l.leader_id.term),
        members,
        state_keys,
        config_keys,
        secret_keys,
        events: data.log.events.len() as u64,
        first_position: data.log.first(),
        next_position: data.log.next,
        subscriptions: data.subs.len() as u64,
        dead_letters: data.subs.values().map(|s| s.dead.len() as u64).sum(),
        idempotency_records: data.idem.len() as u64,
        bytes,
        cluster_id: data.cluster_id().map(|id| format!("{id:032x}")),
    }
}

/// Makes `data_dir` (new, or empty) the data dir of node `id` as the one member of a new
/// cluster holding the saved state, peers reaching it at `advertise` (the `--advertise` it
/// will run with, or its `--peer-addr`). Start it with its usual flags; start the other nodes
/// with empty data dirs and it among their seeds, and they join. The new cluster gets a new
/// id, returned: a node of the old one, left running under the same cluster name, is refused
/// by its nodes (`peer`) instead of following its leader with the old state. Also returned: the
/// log index the restored node starts at (the backup's, plus `REVISION_GAP`).
pub async fn restore(mut meta: SnapshotMeta, mut data: SmData, data_dir: &Path, id: NodeId, advertise: &str) -> Result<(u128, u64), BackupError> {
    let path = data_dir.display().to_string();
    let io = |source| BackupError::Io { path: path.clone(), source };
    let Some(mut last) = meta.last_log_id else { return Err(BackupError::Empty) };
    // The log is empty after a restore, so it may start anywhere past the backup's index.
    last.index = last.index.saturating_add(REVISION_GAP);
    meta.last_log_id = Some(last);
    if let Some(entry) = first_entry(data_dir).map_err(io)? {
        return Err(BackupError::NotEmpty { path, entry });
    }
    crate::fsutil::create_private_dir(data_dir).map_err(io)?;
    // The node's own lock (`node::claim_data_dir`), held until the restore is done: a node
    // started on the same dir meanwhile waits for it, and one already running refuses this.
    let mut lock = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(data_dir.join("LOCK")).map_err(io)?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => return Err(BackupError::NotEmpty { path, entry: "LOCK, held by a running node".into() }),
        Err(std::fs::TryLockError::Error(e)) if e.kind() == std::io::ErrorKind::Unsupported || e.raw_os_error() == Some(37) => {}
        Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
    }
    {
        use std::io::Write;
        let me = format!("pid {} (raftbridge snapshot restore of node {id})\n", std::process::id());
        lock.set_len(0).and_then(|()| lock.write_all(me.as_bytes())).map_err(io)?;
    }
    // Until the last step, the marker says the dir is half made: a node refuses to start on it
    // (a crash between the steps left a node that held the state but had no log, and waited
    // for a leader for good), and a second restore refuses it as not empty. A marker rather
    // than a temporary dir renamed into place: the data dir may be a volume's mount point.
    let marker = data_dir.join(RESTORING);
    std::fs::write(&marker, b"a raftbridge snapshot restore into this dir has not finished\n").map_err(io)?;
    crate::fsutil::sync_parent(&marker).map_err(io)?;
    let cluster_id = crate::cluster::new_cluster_id();
    data.rename_cluster(cluster_id);
    // The state machine first: a data dir with a log but no state would start as a node whose
    // log was purged past what it holds.
    crate::raft::state_machine::write_restored(&data_dir.join("sm"), &meta, data, id, advertise).map_err(io)?;
    let mut log = LogStore::open(&data_dir.join("log"), LogStoreOptions::default()).map_err(io)?;
    // In the backup's last term (not committed: the node campaigns in the next one).
    log.save_vote(&Vote::new(last.leader_id.term, id)).await.map_err(io)?;
    // The log starts after the snapshot, as after a compaction.
    log.purge(last).await.map_err(io)?;
    drop(log);
    crate::node::claim_node_id(data_dir, id).map_err(|e| io(std::io::Error::other(e.to_string())))?;
    crate::fsutil::sync_dir(data_dir).map_err(io)?;
    std::fs::remove_file(&marker).map_err(io)?;
    crate::fsutil::sync_dir(data_dir).map_err(io)?;
    crate::fsutil::sync_parent(data_dir).map_err(io)?;
    drop(lock);
    Ok((cluster_id, last.index))
}

/// How far a restore moves the log index (every later key revision) past the backup's.
pub const REVISION_GAP: u64 = 1_000_000_000;

/// The file that marks a data dir a restore is still making (`restore`; `node` refuses it).
pub const RESTORING: &str = "RESTORING";

/// The first entry of `dir` other than `lost+found` (a fresh filesystem's), if any; `None` for
/// a dir that does not exist.
fn first_entry(dir: &Path) -> std::io::Result<Option<String>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if name != "lost+found" {
            return Ok(Some(name));
        }
    }
    Ok(None)
}

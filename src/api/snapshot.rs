//! `GET /cluster/snapshot`: the whole replicated state in one file, for backups (Consul's
//! `snapshot save`, etcd's `snapshot save`); `raftbridge snapshot save` calls it and
//! `raftbridge snapshot restore` makes a new cluster's first data dir of what it saved.
//!
//! Why the node's own snapshot file, not a new format: it is what a node already writes
//! atomically, checksums and reads back at every start, and what a leader sends a follower
//! that lags. The node asks openraft for a new one until it covers every write acknowledged
//! before the request (a read barrier first, as a linearizable read takes), then streams the
//! file from a handle opened on it: a later snapshot replaces the file by rename, which the
//! handle does not see. The file can be as large as the state (512 MiB of keys and values, and
//! the retained events), so it is read in chunks, a few ahead of the client
//! (`super::Streamed`), never whole; one download runs at a time.

use std::io::Read;
use std::io::Seek;
use std::time::Duration;

use bytes::Bytes;
use http::HeaderValue;
use http::StatusCode;
use http_body_util::Full;
use hyper::Response;
use tokio::time::Instant;

use super::App;
use super::Streamed;
use super::error::ApiError;
use crate::raft::types::LogIdOptionExt;

type ApiResult = Result<Response<Full<Bytes>>, ApiError>;

/// How long a download waits for a snapshot that covers what was acknowledged before it.
const SNAPSHOT_WAIT: Duration = Duration::from_secs(60);
/// How often the node asks openraft again for a snapshot while none covers the read index (a
/// trigger while one is being built is ignored).
const TRIGGER_EVERY: Duration = Duration::from_secs(2);
/// Bytes read from the file at a time.
const CHUNK: usize = 256 << 10;

/// Headers naming the log position a snapshot covers (its last entry's index and term).
pub const INDEX_HEADER: &str = "x-raftbridge-snapshot-index";
pub const TERM_HEADER: &str = "x-raftbridge-snapshot-term";

/// `head`: a HEAD, answered with the headers a GET would have and no reader started (the
/// snapshot is made all the same: its length is the file's).
pub(super) async fn download(app: &App, head: bool) -> ApiResult {
    let Ok(permit) = app.snapshot_downloads.clone().try_acquire_owned() else {
        return Err(ApiError::Busy("this node is sending a snapshot already: retry when it is done".into()));
    };
    // Everything acknowledged before this request is applied here once the barrier passes.
    app.store.barrier(crate::store::Consistency::Linearizable).await?;
    let wanted = app.replica.metrics().last_applied.index().unwrap_or(0);
    let deadline = Instant::now() + SNAPSHOT_WAIT;
    let mut next_trigger = Instant::now();
    // Bounded by the deadline: a look every 50 ms.
    loop {
        let covered = app.replica.metrics().snapshot.index();
        if covered.is_some_and(|c| c >= wanted) {
            break;
        }
        if Instant::now() >= deadline {
            return Err(ApiError::Unavailable(format!(
                "no snapshot covering log index {wanted} within {} s (the node's disk or its apply is slow): retry",
                SNAPSHOT_WAIT.as_secs()
            )));
        }
        if Instant::now() >= next_trigger {
            if let Err(e) = app.replica.raft.trigger().snapshot().await {
                return Err(ApiError::Unavailable(format!("this node's raft has stopped: {e}")));
            }
            next_trigger = Instant::now() + TRIGGER_EVERY;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let path = app.sm.snapshot_path();
    let opened = tokio::task::spawn_blocking(move || -> std::io::Result<_> {
        let mut file = std::fs::File::open(&path)?;
        let len = file.metadata()?.len();
        let meta = crate::raft::state_machine::read_snapshot_meta(&mut file)?;
        file.rewind()?;
        Ok((file, len, meta))
    })
    .await
    .map_err(|e| ApiError::Internal(format!("reading the snapshot: {e}")))?;
    let (file, len, meta) = opened.map_err(|e| ApiError::Internal(format!("reading the snapshot file: {e}")))?;
    let Some(last) = meta.last_log_id.filter(|l| l.index >= wanted) else {
        // The file is replaced only by newer ones, and the metrics said one covers `wanted`.
        return Err(ApiError::Internal(format!("the snapshot file ends at {:?}, before log index {wanted}", meta.last_log_id)));
    };
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = StatusCode::OK;
    let headers = resp.headers_mut();
    headers.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    headers.insert(http::header::CONTENT_LENGTH, HeaderValue::from(len));
    headers.insert(INDEX_HEADER, HeaderValue::from(last.index));
    headers.insert(TERM_HEADER, HeaderValue::from(last.leader_id.term));
    let name = format!("attachment; filename=\"raftbridge-{}.snap\"", last.index);
    if let Ok(v) = HeaderValue::from_str(&name) {
        headers.insert(http::header::CONTENT_DISPOSITION, v);
    }
    headers.insert(http::header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if head {
        // `handle` keeps a HEAD's `Content-Length` when it carries a `Streamed` (here none).
        return Ok(resp);
    }
    let (tx, rx) = tokio::sync::mpsc::channel(super::STREAM_CHUNKS);
    // On a blocking thread until the file is read or the client has gone (the send fails);
    // it holds the one download's permit.
    drop(tokio::task::spawn_blocking(move || {
        let _permit = permit;
        let mut file = file;
        let mut left = len;
        while left > 0 {
            let mut chunk = vec![0u8; CHUNK.min(usize::try_from(left).unwrap_or(CHUNK))];
            let read = file.read_exact(&mut chunk).map(|()| Bytes::from(chunk));
            let failed = read.is_err();
            if tx.blocking_send(read).is_err() || failed {
                return;
            }
            left -= CHUNK.min(usize::try_from(left).unwrap_or(CHUNK)) as u64;
        }
    }));
    // Counted as begun: one that ends early is counted in `raftbridge_http_write_stalls_total`
    // or as a reset stream, not here.
    metrics::counter!("raftbridge_snapshots_downloads_started_total").increment(1);
    tracing::info!(index = last.index, bytes = len, "sending a snapshot to a client");
    resp.extensions_mut().insert(Streamed::new(rx));
    Ok(resp)
}

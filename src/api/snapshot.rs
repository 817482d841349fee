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

/// A download's time limit is `SEND_FLOOR` plus its length at `MIN_SEND_RATE`: a client that
/// reads, but slower than that, is cut off (the body ends short of its `Content-Length`), so
/// that it holds the node's one download for a bounded time. A client that stops reading is
/// cut off sooner, by the connection's write stall limit (`stall::WRITE_STALL`).
const SEND_FLOOR: Duration = Duration::from_secs(120);
const MIN_SEND_RATE: u64 = 512 << 10;

/// How long sending `len` bytes may take (`SEND_FLOOR`, `MIN_SEND_RATE`).
fn send_limit(len: u64) -> Duration {
    SEND_FLOOR + Duration::from_secs(len / MIN_SEND_RATE)
}

/// Why a download ended before its last chunk.
#[derive(Debug, PartialEq)]
enum SendEnd {
    /// The client went (its connection dropped the receiver), or a read failed (sent on as an
    /// error, which ends the body).
    Stopped,
    /// The deadline passed with `sent` bytes queued for the client's body.
    TimedOut { sent: u64 },
}

/// Reads `len` bytes of `file` in `CHUNK`s, each on a blocking thread, into `tx` (a few chunks
/// ahead of the client), until all are sent or `deadline` passes.
async fn send_file(file: std::fs::File, len: u64, tx: tokio::sync::mpsc::Sender<std::io::Result<Bytes>>, deadline: Instant) -> Result<(), SendEnd> {
    let mut file = file;
    let mut sent = 0u64;
    while sent < len {
        let want = CHUNK.min(usize::try_from(len - sent).unwrap_or(CHUNK));
        let read = tokio::task::spawn_blocking(move || {
            let mut chunk = vec![0u8; want];
            let read = file.read_exact(&mut chunk).map(|()| Bytes::from(chunk));
            (file, read)
        });
        let (back, read) = match tokio::time::timeout_at(deadline, read).await {
            Ok(Ok(done)) => done,
            Ok(Err(e)) => return Err(send_error(&tx, std::io::Error::other(format!("reading the snapshot: {e}")))),
            Err(_) => return Err(SendEnd::TimedOut { sent }),
        };
        file = back;
        let failed = read.is_err();
        match tokio::time::timeout_at(deadline, tx.send(read)).await {
            Ok(Ok(())) if !failed => sent += want as u64,
            Ok(_) => return Err(SendEnd::Stopped),
            Err(_) => return Err(SendEnd::TimedOut { sent }),
        }
    }
    Ok(())
}

/// Passes `e` to the client's body if there is room (else the body ends short all the same).
fn send_error(tx: &tokio::sync::mpsc::Sender<std::io::Result<Bytes>>, e: std::io::Error) -> SendEnd {
    let _ = tx.try_send(Err(e));
    SendEnd::Stopped
}

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
    // Holds the one download's permit until the file is sent, the client has gone, or the
    // send's deadline passed (`send_limit`).
    let limit = send_limit(len);
    tokio::spawn(async move {
        let _permit = permit;
        if let Err(SendEnd::TimedOut { sent }) = send_file(file, len, tx, Instant::now() + limit).await {
            metrics::counter!("raftbridge_snapshots_downloads_timed_out_total").increment(1);
            tracing::warn!(sent, bytes = len, limit_s = limit.as_secs(), "a snapshot download was cut off: its client read too slowly");
        }
    });
    // Counted as begun: one that ends early is counted in `raftbridge_http_write_stalls_total`
    // or as a reset stream, not here.
    metrics::counter!("raftbridge_snapshots_downloads_started_total").increment(1);
    tracing::info!(index = last.index, bytes = len, "sending a snapshot to a client");
    resp.extensions_mut().insert(Streamed::new(rx));
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An open file of `len` bytes whose path is gone already (the handle reads on).
    fn file_of(len: usize) -> ((), std::fs::File) {
        let path = std::env::temp_dir().join(format!("rb-snapshot-send-{}", fastrand::u64(..)));
        std::fs::write(&path, (0..len).map(|i| (i % 251) as u8).collect::<Vec<u8>>()).expect("write");
        let file = std::fs::File::open(&path).expect("open");
        std::fs::remove_file(&path).expect("remove");
        ((), file)
    }

    #[test]
    fn a_download_may_take_the_floor_plus_its_length_at_the_least_rate() {
        assert_eq!(send_limit(0), SEND_FLOOR);
        assert_eq!(send_limit(512 << 20), SEND_FLOOR + Duration::from_secs(1024));
    }

    #[tokio::test]
    async fn the_whole_file_is_sent_in_chunks_to_a_client_that_reads() {
        let len = 2 * CHUNK + 5;
        let (_dir, file) = file_of(len);
        let (tx, mut rx) = tokio::sync::mpsc::channel(2);
        let sender = tokio::spawn(send_file(file, len as u64, tx, Instant::now() + Duration::from_secs(60)));
        let mut got = Vec::new();
        while let Some(chunk) = rx.recv().await {
            got.extend_from_slice(&chunk.expect("chunk"));
        }
        assert_eq!(sender.await.expect("sender"), Ok(()));
        assert_eq!(got, (0..len).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_reads_too_slowly_is_cut_off_at_the_deadline() {
        let len = 8 * CHUNK;
        let (_dir, file) = file_of(len);
        let (tx, mut rx) = tokio::sync::mpsc::channel(2);
        let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(1));
        let permit = permits.clone().try_acquire_owned().expect("the one permit");
        let deadline = Instant::now() + Duration::from_secs(10);
        let sender = tokio::spawn(async move {
            let _permit = permit;
            send_file(file, len as u64, tx, deadline).await
        });
        // One chunk read; then the client waits past the deadline with the queue full.
        assert!(rx.recv().await.is_some());
        let ended = sender.await.expect("sender");
        assert!(matches!(ended, Err(SendEnd::TimedOut { sent }) if sent < len as u64), "{ended:?}");
        assert!(Instant::now() >= deadline);
        assert_eq!(permits.available_permits(), 1, "the download's permit is free again");
        // What was queued is read, then the body ends short.
        let mut rest = 0;
        while let Some(chunk) = rx.recv().await {
            rest += chunk.expect("chunk").len();
        }
        assert!(CHUNK + rest < len, "{rest} more bytes, of {len}");
    }

    #[tokio::test]
    async fn a_client_that_went_stops_the_reads() {
        let len = 4 * CHUNK;
        let (_dir, file) = file_of(len);
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        drop(rx);
        assert_eq!(send_file(file, len as u64, tx, Instant::now() + Duration::from_secs(60)).await, Err(SendEnd::Stopped));
    }
}

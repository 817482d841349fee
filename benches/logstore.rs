//! Raft log store benchmark (`cargo bench --bench logstore`), fsync on, in a temp dir.
//!
//! (a) one 1-entry append at a time, each awaited until durable: the latency floor, ~ one fsync.
//! (b) group commit: 64 logical writers' appends issued back to back without awaiting, then all
//!     awaited, repeated; batches of 1/16/64/256 entries with 128-byte values. Shows how many
//!     appends share one fsync on the flusher thread. Every ~200k entries the log is purged, as
//!     the snapshot policy would do, to keep memory bounded.
//! (c) the same work on redb (the embedded store the issue suggested), for the decision: one
//!     durable write transaction per entry awaited one at a time, then one transaction per round
//!     of 64 × batch entries (the best redb can do: it has a single writer, so group commit has to
//!     happen above it).

use std::path::PathBuf;
use std::time::Duration;
use std::time::Instant;

use openraft::type_config::TypeConfigExt;
use openraft::vote::RaftLeaderIdExt;
use openraft::RaftTypeConfig;
use raftbridge::raft::log_store::LogStore;
use raftbridge::raft::log_store::LogStoreOptions;
use raftbridge::raft::types::Command;
use raftbridge::raft::types::Entry;
use raftbridge::raft::types::IOFlushed;
use raftbridge::raft::types::LogId;
use raftbridge::raft::types::RaftEntry;
use raftbridge::raft::types::RaftLogStorage;
use raftbridge::raft::types::TypeConfig;

const VALUE: usize = 128;
const WRITERS: usize = 64;

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let name = format!("raftbridge-logstore-bench-{}-{tag}", std::process::id());
        let path = std::env::temp_dir().join(name);
        let _ = std::fs::remove_dir_all(&path);
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn log_id(index: u64) -> LogId {
    LogId::new(<TypeConfig as RaftTypeConfig>::LeaderId::new_committed(1, 1), index)
}

fn entry(index: u64) -> Entry {
    let (store, key, value) = ("bench".into(), format!("key-{index}"), vec![0xab; VALUE]);
    Entry::new_normal(log_id(index), Command::Put { store, key, value, if_revision: None, tag: None })
}

fn open(tag: &str) -> (TempDir, LogStore) {
    let dir = TempDir::new(tag);
    let store = LogStore::open(&dir.0, LogStoreOptions::default()).expect("open log store");
    (dir, store)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// (a): sequential, each append awaited until its callback reports it durable.
async fn sequential(budget: Duration, max_ops: usize) {
    let (_dir, mut store) = open("seq");
    let mut lat = Vec::with_capacity(max_ops);
    let start = Instant::now();
    while lat.len() < max_ops && start.elapsed() < budget {
        let t = Instant::now();
        let (tx, rx) = TypeConfig::oneshot();
        let e = entry(lat.len() as u64 + 1);
        store.append([e], IOFlushed::signal(tx)).await.expect("append");
        rx.await.expect("callback dropped").expect("flush");
        lat.push(t.elapsed());
    }
    let rate = lat.len() as f64 / start.elapsed().as_secs_f64();
    lat.sort();
    println!("(a) sequential 1-entry appends, each awaited until durable");
    println!(
        "    ops {:>6}   p50 {:>6.3} ms   p99 {:>6.3} ms   max {:>6.3} ms   {:>6.0} appends/s",
        lat.len(),
        ms(percentile(&lat, 0.50)),
        ms(percentile(&lat, 0.99)),
        ms(lat[lat.len() - 1]),
        rate
    );
}

/// (b): rounds of `WRITERS` appends of `batch` entries each, issued without awaiting.
async fn group_commit(batch: u64, budget: Duration) {
    let (_dir, mut store) = open(&format!("group-{batch}"));
    let (mut next, mut purged, mut written) = (1u64, 0u64, 0u64);
    let mut rounds = Vec::new();
    let start = Instant::now();
    while start.elapsed() < budget {
        let (t, bytes_before) = (Instant::now(), store.disk_bytes());
        let mut pending = Vec::with_capacity(WRITERS);
        for _ in 0..WRITERS {
            let entries: Vec<Entry> = (next..next + batch).map(entry).collect();
            next += batch;
            let (tx, rx) = TypeConfig::oneshot();
            store.append(entries, IOFlushed::signal(tx)).await.expect("append");
            pending.push(rx);
        }
        for rx in pending {
            rx.await.expect("callback dropped").expect("flush");
        }
        rounds.push(t.elapsed());
        written += store.disk_bytes() - bytes_before;
        if next - 1 - purged > 200_000 {
            purged = next - 1;
            store.purge(log_id(purged)).await.expect("purge");
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let appends = (rounds.len() * WRITERS) as f64;
    rounds.sort();
    println!(
        "    batch {:>3}   rounds {:>5}   {:>7.0} appends/s   {:>7.0} entries/s   {:>6.1} MiB/s   round p50 {:>6.2} ms",
        batch,
        rounds.len(),
        appends / secs,
        (next - 1) as f64 / secs,
        written as f64 / secs / (1 << 20) as f64,
        ms(percentile(&rounds, 0.5))
    );
}

const REDB_LOG: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("log");

/// redb: `per_txn` entries per durable write transaction, for `budget`; entries/s and p50/p99.
fn redb_run(per_txn: u64, budget: Duration) {
    let dir = TempDir::new(&format!("redb-{per_txn}"));
    std::fs::create_dir_all(&dir.0).expect("mkdir");
    let db = redb::Database::create(dir.0.join("log.redb")).expect("redb create");
    let (mut next, mut lat) = (1u64, Vec::new());
    let start = Instant::now();
    while start.elapsed() < budget {
        let t = Instant::now();
        let txn = db.begin_write().expect("begin");
        {
            let mut table = txn.open_table(REDB_LOG).expect("table");
            for i in next..next + per_txn {
                let bytes = bincode::serialize(&entry(i)).expect("encode");
                table.insert(i, bytes.as_slice()).expect("insert");
            }
        }
        txn.commit().expect("commit"); // Durability::Immediate (the default): fsync before return
        next += per_txn;
        lat.push(t.elapsed());
        if next > 200_000 {
            // Keep the table from growing without bound, as purge would.
            let txn = db.begin_write().expect("begin");
            txn.delete_table(REDB_LOG).expect("drop");
            txn.commit().expect("commit");
            next = 1;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    lat.sort();
    println!(
        "    entries/txn {:>5}   txns {:>6}   {:>8.0} entries/s   txn p50 {:>6.2} ms   p99 {:>6.2} ms",
        per_txn,
        lat.len(),
        (lat.len() as u64 * per_txn) as f64 / secs,
        ms(percentile(&lat, 0.5)),
        ms(percentile(&lat, 0.99))
    );
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio runtime");
    rt.block_on(async {
        let tmp = std::env::temp_dir();
        println!("raft log store, fsync on, {VALUE}-byte values, in {}", tmp.display());
        sequential(Duration::from_secs(6), 20_000).await;
        println!("(b) group commit: {WRITERS} appends issued back to back, then all awaited");
        for batch in [1, 16, 64, 256] {
            group_commit(batch, Duration::from_secs(4)).await;
        }
    });
    println!("(c) redb 2, durable commits, same entries");
    redb_run(1, Duration::from_secs(4));
    for batch in [1, 16, 64, 256] {
        redb_run(WRITERS as u64 * batch, Duration::from_secs(4));
    }
}

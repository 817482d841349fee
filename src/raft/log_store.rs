//! The durable Raft log: segmented append-only files with group commit.
//!
//! Crash safety is the product's promise, so this module is built to be easy to reason about:
//!
//! * **Append-only segment files** `log-<20-digit index>.seg`. No record is overwritten in place
//!   (only the zero-fill below is), so a crash can only damage the unsynced tail of the newest file. Truncation is an appended
//!   `Truncate` record; purge deletes whole old files, which bounds disk use without rewriting.
//!   A segment is named after the next index when it is created, bumped to `active + 1` after a
//!   truncation below the active segment: **name order is write order**, which replay relies on.
//! * **Segments are zero-filled ahead of the writer.** After each group commit the flusher
//!   extends the active segment with zeros (`GROW_STEP` at a time, up to `GROW_AHEAD` plus the
//!   node's `grow_phase` beyond the last record) and syncs them, so appends overwrite allocated
//!   blocks of a file whose size does not change. Then `fdatasync` only writes data: no ext4 journal commit for a new size or new
//!   blocks. Measured on the 2-core VM (C loop, 2 KB write + `fdatasync`): 53 µs CPU, 140 µs
//!   and 3 context switches per sync when appending, 33 µs, 85 µs and 2 when overwriting zeros;
//!   on a busier disk 250 µs vs 130 µs. The zeros end the records: replay stops at a tail of
//!   zeros in the last segment without a warning and appends over it; rotation cuts a segment
//!   back to its records before it is synced and closed, so closed segments hold no zeros.
//!   A fill and its sync hold the group commits behind it for 8–13 ms. Peers hold the same log
//!   bytes, so they used to fill at the same offsets, at the same moment, and a commit (which
//!   needs a quorum's fsync) waited the pause out. Each node now fills at its own point in the
//!   step (`grow_phase`, from its node id): while one node fills, the others still make a
//!   quorum. Measured (3 nodes, `bench events --rate 12500`, 8 interleaved pairs): publish p99
//!   4.4–9.7 ms against 5.2–17.3 ms, and saturated single events no slower.
//! * **Every record is framed** `[u32 LE len][u32 LE crc32(payload)][payload]`, the payload being
//!   bincode of [`Record`]. On open each frame is checked. A torn or corrupt frame at the tail of
//!   the last segment (the only place a crash can tear) ends replay and the file is cut back to
//!   the last whole record: nothing is half-applied. (A tail that is all zeros is the zero-fill,
//!   kept as it is; a torn record inside the zero-fill leaves non-zero bytes and is cut.) A
//!   damaged frame there that no power cut can leave is refused instead: a crc mismatch with no
//!   sector of the frame reading as zeros (an unfinished write over the zero-fill leaves its
//!   missing sectors as zeros: etcd's test for a torn entry) *and* a whole frame right after it,
//!   which shows that records were synced past the damage and may have been acknowledged
//!   (`damage_before_a_whole_record`). Damage to the very last frame, or to a frame's length,
//!   leaves no such evidence and is cut like a torn tail, with a warning saying what was dropped. A bad
//!   frame in any *other* segment cannot come from a crash (a segment is fsynced before the next
//!   is created), and neither can a frame whose crc matches but which does not decode: both are
//!   `InvalidData` errors, never skipped.
//! * **Group commit on a dedicated flusher thread.** `append` writes the bytes (page cache), makes
//!   the entries readable in memory and queues its `IOFlushed` callback with the file it wrote;
//!   it never waits for the disk. The flusher takes *every* queued callback, `fdatasync`s the files
//!   they name, then completes them: many appends share one fsync, and no callback fires before its
//!   bytes are synced. After a failed write or fsync the store is failed for good (a later fsync
//!   may "succeed" without the lost pages): callbacks complete with errors and writes are refused
//!   until a restart replays the disk.
//! * **Vote, committed and last-purged** live in `meta`, replaced atomically (`meta.tmp`, fsync,
//!   rename, fsync dir) and framed like a record. Each meta write (and `save_*` that changes
//!   nothing) first syncs the active segment: openraft requires write IO to be serialized, so a
//!   durable vote/purge is never ahead of log bytes written before it.
//! * **Committed is a hint, not a promise.** openraft calls `save_committed` after every apply
//!   batch; fsyncing a file each time cost three fsyncs per batch and halved write throughput
//!   (measured with `raftbridge bench state`). It is written in place to its own framed file
//!   `committed` without fsync. That is safe because a committed index that is lost or stale
//!   only makes a restarted node apply less before the leader tells it more; a torn or unreadable
//!   file reads as `None`, and a value beyond the replayed log (power loss) is dropped at open.
//! * **Live entries are kept in memory** (a `BTreeMap`, purge point to tip) so reads never touch
//!   the disk. Memory is bounded by the snapshot/purge policy: openraft purges what a snapshot
//!   covers (keeping `max_in_snapshot_log_to_keep`), and purge drops it here.
//! * **Test-only power-loss mode** (`RAFTBRIDGE_TEST_POWER_LOSS=1`, used by `raftbridge chaos`):
//!   every segment fsync first notes the length of the segment's records and the end of its
//!   zero-fill, then records `name length fill-end` in the side file `synced` (monotonic, not
//!   fsynced: the test kills the process, which keeps the page cache). On open, every segment is
//!   first reset to what was recorded as synced: unsynced records over synced zero-fill become
//!   zeros again, anything past the synced fill is cut, newer segments are deleted, and the
//!   `committed` hint is removed: exactly what a power cut would leave of the log. `meta` and snapshots are fsynced before use and stay.
//!
//! Concurrency: openraft calls the writing methods one at a time; they serialize on `io` (lock
//! order: `io`, then `mem`). Readers (replication tasks) only take `mem`, briefly. The flush
//! channel's `Sender` lives in `Io`; `Inner::drop` (last `LogStore` clone gone) closes it, the
//! flusher syncs and completes whatever is still queued, exits, and is joined. The directory is
//! owned by one process (the node's data dir); a second opener is not guarded against.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::fs;
use std::fs::File;
use std::fs::OpenOptions;
use std::io;
use std::io::ErrorKind;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::ops::Bound;
use std::ops::RangeBounds;
use std::path::Path;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::MutexGuard;
use std::thread::JoinHandle;

use openraft::OptionalSend;
use serde::Deserialize;
use serde::Serialize;

use crate::raft::types::Entry;
use crate::raft::types::IOFlushed;
use crate::raft::types::LogId;
use crate::raft::types::LogState;
use crate::raft::types::RaftLogReader;
use crate::raft::types::RaftLogStorage;
use crate::raft::types::TypeConfig;
use crate::raft::types::Vote;

/// A record larger than this is refused on write and taken as corrupt on read.
const MAX_RECORD: usize = 64 << 20;
const HEADER: usize = 8;
/// The flusher keeps the active segment zero-filled this far past its records (module doc).
const GROW_AHEAD: u64 = 2 << 20;
/// Zeros written per flusher round at most: a bounded pause for the group commits behind it.
const GROW_STEP: u64 = 1 << 20;
/// How far past `segment_bytes` a segment is zero-filled (the append that crosses it still lands
/// in the same segment).
const GROW_SLACK: u64 = 64 << 10;

/// Tuning knobs of a [`LogStore`].
#[derive(Debug, Clone)]
pub struct LogStoreOptions {
    /// Start a new segment once the active one exceeds this many bytes.
    pub segment_bytes: u64,
    /// fsync for durability. `false` only for benchmarks: acknowledged entries may be lost.
    pub sync: bool,
    /// Test-only power-loss simulation (module doc); the default comes from the env var
    /// [`POWER_LOSS_ENV`] being `1`.
    pub power_loss_test: bool,
    /// Shifts where in the log this store zero-fills, in bytes below `GROW_STEP` (module doc):
    /// peers holding the same log then fill at different offsets, not all at once.
    pub grow_phase: u64,
}

impl LogStoreOptions {
    /// Where node `id` zero-fills (`grow_phase`): the fractional part of `id / φ` of a
    /// `GROW_STEP` (Fibonacci hashing: the top bits of `id · 2^64/φ`, exact as `GROW_STEP` is a
    /// power of two). Consecutive ids land far apart for any cluster size: 1, 2, 3 at 0.62, 0.24
    /// and 0.85 of a step.
    pub fn grow_phase_for(id: u64) -> u64 {
        const _: () = assert!(GROW_STEP.is_power_of_two());
        id.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - GROW_STEP.trailing_zeros())
    }
}

/// Env var that turns on the test-only power-loss mode for the default options.
pub const POWER_LOSS_ENV: &str = "RAFTBRIDGE_TEST_POWER_LOSS";
/// Side file of the power-loss mode: `<segment name> <synced length>`.
const SYNCED_FILE: &str = "synced";
/// Present while this log, made before its cluster formed by one of the nodes that formed it
/// (`LogStore::mark_founder`), has never held an entry: removed, durably, before the first
/// append is acknowledged (and at open if entries are there). It lives with the segments: a
/// log that is lost loses it too.
const FOUNDER_FILE: &str = "founder";
/// Present while the log may lack entries it acknowledged: an open cut a damaged tail off it
/// (`torn_write`), and no leader has brought the node up to date since (`clear_cut_damage`).
/// Made durable before the cut, so that a restart in between still knows.
const DAMAGE_FILE: &str = "damaged";

impl Default for LogStoreOptions {
    fn default() -> Self {
        let power_loss_test = std::env::var(POWER_LOSS_ENV).is_ok_and(|v| v == "1");
        LogStoreOptions { segment_bytes: 64 << 20, sync: true, power_loss_test, grow_phase: 0 }
    }
}

/// One log record, written as `Record<&Entry>` (no clone) and read as `Record<Entry>`: a single
/// definition keeps the bincode layout identical. Never reorder the variants.
#[derive(Serialize, Deserialize)]
enum Record<E> {
    Entry(E),
    /// Removes every entry with index > `after` (all of them when `None`).
    Truncate {
        after: Option<u64>,
    },
}

#[derive(Serialize, Deserialize, Default, Clone, PartialEq)]
struct Meta {
    vote: Option<Vote>,
    committed: Option<LogId>,
    last_purged: Option<LogId>,
}

/// The durable Raft log; cheap to clone (its log reader is a clone).
#[derive(Clone)]
pub struct LogStore {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    /// The `committed` hint file, rewritten in place (see the module doc); its own lock.
    committed: Mutex<File>,
    opts: LogStoreOptions,
    mem: Mutex<Mem>,
    /// Held by appends (on the async runtime's thread) while they write to the page cache:
    /// never across an fsync of a blocking thread (`update_meta`, `purge`, `truncate_after`
    /// copy out the active segment and sync it after letting go), or a disk that stalls froze
    /// the whole runtime behind the lock (a node with one worker thread stopped answering even
    /// `/healthz` while it saved a vote).
    io: Mutex<Io>,
    /// One meta write at a time (`write_meta`'s callers), without holding `io` meanwhile.
    meta_writer: Mutex<()>,
    /// `disk_bytes`, kept up to date under `io` so that reading it never waits for it.
    disk: AtomicU64,
    /// Set by the writer or the flusher after a failed write or fsync; never cleared.
    failed: Arc<AtomicBool>,
    /// The founder mark (`FOUNDER_FILE`), shared with the flusher, which removes it.
    founder: Founder,
    /// The log may lack entries it acknowledged (`DAMAGE_FILE`): cleared once a leader has
    /// brought the node up to date (`clear_cut_damage`).
    cut_damage: AtomicBool,
    /// Joined in `Drop`, after the flush channel is closed.
    flusher: Option<JoinHandle<()>>,
    /// Hands purged entries and segment files to the reaper thread. Closed (set to `None`) by
    /// `Inner::drop`, which then joins the reaper, so every queued reap completes first.
    reap_tx: Mutex<Option<mpsc::SyncSender<Reap>>>,
    reaper: Option<JoinHandle<()>>,
}

/// What a purge leaves for the reaper: entries to free and segment files to unlink.
struct Reap {
    entries: BTreeMap<u64, Entry>,
    paths: Vec<PathBuf>,
    /// Told once this reap (and every one queued before it) is done.
    done: Option<mpsc::Sender<()>>,
}

/// Purges queued for the reaper at most, besides the one it is reaping; a purge waits when this
/// many are queued (the reaper fell behind). One: a purge may hold up to the log's byte bound in
/// entries (128 MiB and up), so this bounds the memory a slow reaper keeps, and purges come
/// seconds apart (after a snapshot each), while reaping one took ~240 ms.
const REAP_QUEUE: usize = 1;

/// What readers see: the live entries and the last durable meta.
struct Mem {
    entries: BTreeMap<u64, Entry>,
    meta: Meta,
}

/// The writer's side. `active` is the segment being appended to; `closed` (fully synced
/// segments, by name) does not include it.
struct Io {
    active: Arc<SegFile>,
    active_seg: SegInfo,
    active_name: u64,
    closed: BTreeMap<u64, SegInfo>,
    /// `None` only once `Inner::drop` has closed the flusher's channel.
    flush_tx: Option<mpsc::Sender<Flush>>,
    /// Where `append` encodes its records, kept between calls: a fresh buffer per append wrote
    /// into newly mapped memory every time, and zeroing those pages was ~10% of a follower's
    /// CPU under batched publishing (`perf`). Shrunk back when one append made it large.
    encode_buf: Vec<u8>,
}

/// `Io::encode_buf` keeps at most this much capacity between appends.
const ENCODE_BUF_KEEP: usize = 4 << 20;

struct SegFile {
    path: PathBuf,
    file: File,
    /// Segment name, for the power-loss record.
    name: u64,
    /// Set in the test-only power-loss mode: where to record what each fsync covered.
    synced: Option<Arc<SyncedRecord>>,
    /// Bytes of records in the file; written only by the writer (under `Io`).
    written: AtomicU64,
    /// Where the zero-fill ends: `written..allocated` holds zeros (the file may be longer only
    /// after a failed zero-fill, which stops growth). Raised by the flusher's zero-fill and by a
    /// write that runs past it, both under `grow`.
    allocated: AtomicU64,
    /// Taken to change `allocated` or the file's length. `true` once the segment must not grow
    /// any more: rotation closed it (cut back to `written`), or a zero-fill failed.
    grow: Mutex<bool>,
    /// Held across each `fdatasync` of the file (`fsync`), and `true` once one failed. Linux
    /// reports a writeback error to one `fsync` per open file description: the flusher's sync
    /// and the writer's (at rotation) at once could have the error go to one of them and a
    /// clean return to the other, whose callbacks would then call pages durable that never
    /// reached the disk. Serialized, with the failure kept, every later sync of the file fails.
    sync: Mutex<bool>,
}

impl SegFile {
    fn new(path: PathBuf, file: File, name: u64, synced: Option<Arc<SyncedRecord>>, written: u64, allocated: u64) -> SegFile {
        let (written, allocated) = (AtomicU64::new(written), AtomicU64::new(allocated.max(written)));
        SegFile { path, file, name, synced, written, allocated, grow: Mutex::new(false), sync: Mutex::new(false) }
    }

    /// Writes `buf` at the end of the records. Only the writer calls this (under `Io`), so
    /// `written` cannot move meanwhile.
    fn write_records(&self, buf: &[u8]) -> io::Result<()> {
        let at = self.written.load(Ordering::SeqCst);
        let end = at + buf.len() as u64;
        if end <= self.allocated.load(Ordering::SeqCst) {
            // Inside the zero-filled part: the flusher only writes at or past `allocated`.
            self.file.write_all_at(buf, at).map_err(ctx("write", &self.path))?;
        } else {
            let _grow = lock(&self.grow)?;
            self.file.write_all_at(buf, at).map_err(ctx("write", &self.path))?;
            self.allocated.fetch_max(end, Ordering::SeqCst);
        }
        self.written.store(end, Ordering::SeqCst);
        Ok(())
    }

    /// Flusher side: once fewer than `GROW_AHEAD - GROW_STEP + phase` zero bytes are left past
    /// the records (`phase` below `GROW_STEP`), zero-fills one more `GROW_STEP` (not past `limit`): a few large fills, not a
    /// small one per group commit. Returns whether the file grew (then it wants a sync). A
    /// failed fill (a full disk) stops growth for this segment: the writer appends past the end
    /// as it would without zero-fill, and the error is reported once.
    fn grow(&self, limit: u64, phase: u64, zeros: &[u8]) -> io::Result<bool> {
        let mut stopped = lock(&self.grow)?;
        let at = self.allocated.load(Ordering::SeqCst);
        let low = self.written.load(Ordering::SeqCst) + (GROW_AHEAD - GROW_STEP) + phase;
        if *stopped || at >= low || at >= limit {
            return Ok(false);
        }
        let n = (limit - at).min(GROW_STEP).min(zeros.len() as u64);
        if let Err(e) = self.file.write_all_at(&zeros[..n as usize], at) {
            *stopped = true;
            // Best effort: a part of the fill may have landed; `close` cuts whatever is left.
            let _ = self.file.set_len(at);
            return Err(ctx("zero-fill", &self.path)(e));
        }
        self.allocated.store(at + n, Ordering::SeqCst);
        Ok(true)
    }

    /// Rotation: cuts the file back to its records (zeros, and what a failed fill may have
    /// left) and stops further growth. The caller syncs.
    fn close(&self) -> io::Result<()> {
        let mut stopped = lock(&self.grow)?;
        *stopped = true;
        let written = self.written.load(Ordering::SeqCst);
        if self.file.metadata().map_err(ctx("stat", &self.path))?.len() > written {
            self.file.set_len(written).map_err(ctx("truncate", &self.path))?;
        }
        self.allocated.store(written, Ordering::SeqCst);
        Ok(())
    }
}

/// The power-loss mode's record of the newest synced segment position, kept monotonic: the
/// flusher and the writer both sync, and a slower one must not move the record back.
struct SyncedRecord {
    path: PathBuf,
    last: Mutex<Synced>,
}

/// What a sync covered: segment name, length of its records, end of its zero-fill.
type Synced = (u64, u64, u64);

impl SyncedRecord {
    /// Records that segment `name` is synced up to `len` bytes of records and `alloc` bytes of
    /// zero-fill (if that is newer).
    fn advance(&self, name: u64, len: u64, alloc: u64) -> io::Result<()> {
        let mut last = lock(&self.last)?;
        if (name, len, alloc) > *last {
            *last = (name, len, alloc);
            // Replaced by rename so that a kill never leaves a half-written record; deliberately
            // no fsync: see the module doc.
            let tmp = self.path.with_extension("tmp");
            fs::write(&tmp, format!("{name} {len} {alloc}\n")).map_err(ctx("write", &tmp))?;
            fs::rename(&tmp, &self.path).map_err(ctx("rename to", &self.path))?;
        }
        Ok(())
    }
}

fn read_synced_record(path: &Path) -> io::Result<Option<Synced>> {
    let text = match fs::read_to_string(path) {
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        read => read.map_err(ctx("read", path))?,
    };
    let mut it = text.split_whitespace().map(str::parse::<u64>);
    // Records written before zero-fill existed have no third number.
    match (it.next(), it.next(), it.next()) {
        (Some(Ok(name)), Some(Ok(len)), None) => Ok(Some((name, len, len))),
        (Some(Ok(name)), Some(Ok(len)), Some(Ok(alloc))) => Ok(Some((name, len, alloc))),
        _ => Err(invalid(format!("corrupt {}: {text:?}", path.display()))),
    }
}

/// Power-loss mode at open: throws away every segment byte that no fsync covered (module doc).
/// Records written over synced zero-fill turn back into zeros (the fill's blocks and the file's
/// size were durable, the records were not); bytes past the synced fill are cut. Returns the sync
/// record it applied, `None` when there was none yet (nothing dropped).
fn drop_unsynced(dir: &Path, names: &[u64]) -> io::Result<Option<Synced>> {
    let record_path = dir.join(SYNCED_FILE);
    let Some((synced_name, synced_len, synced_alloc)) = read_synced_record(&record_path)? else {
        tracing::warn!(dir = %dir.display(), "power-loss test mode: no sync record yet; nothing dropped");
        return Ok(None);
    };
    let mut dropped = 0;
    for &name in names {
        let path = seg_path(dir, name);
        let len = fs::metadata(&path).map_err(ctx("stat", &path))?.len();
        if name > synced_name {
            dropped += bytes_before_zero_fill(&path, 0)?;
            fs::remove_file(&path).map_err(ctx("remove", &path))?;
        } else if name == synced_name && len > synced_len {
            dropped += bytes_before_zero_fill(&path, synced_len)?;
            let keep = synced_alloc.max(synced_len);
            let f = OpenOptions::new().write(true).open(&path).map_err(ctx("open", &path))?;
            if len > keep {
                f.set_len(keep).map_err(ctx("truncate", &path))?;
            }
            let zeros = vec![0u8; (len.min(keep) - synced_len) as usize];
            f.write_all_at(&zeros, synced_len).map_err(ctx("zero", &path))?;
            f.sync_all().map_err(ctx("fsync", &path))?;
        }
    }
    match fs::remove_file(dir.join("committed")) {
        Err(e) if e.kind() != ErrorKind::NotFound => return Err(ctx("remove committed in", dir)(e)),
        _ => {}
    }
    fsync_dir(dir, true)?;
    tracing::warn!(dir = %dir.display(), dropped_bytes = dropped, synced_segment = synced_name, synced_len, synced_alloc,
        "power-loss test mode: dropped every unsynced log byte");
    Ok(Some((synced_name, synced_len, synced_alloc)))
}

/// Bytes of `path` from `from` to its last non-zero byte: what cutting it at `from` drops, the
/// zero-fill not counted (power-loss mode's report).
fn bytes_before_zero_fill(path: &Path, from: u64) -> io::Result<u64> {
    let data = fs::read(path).map_err(ctx("read", path))?;
    let end = data.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1) as u64;
    Ok(end.saturating_sub(from))
}

struct SegInfo {
    path: PathBuf,
    bytes: u64,
    /// Largest entry index physically in the file (stale or purged entries included).
    max_index: Option<u64>,
}

impl SegInfo {
    fn empty(path: PathBuf) -> SegInfo {
        SegInfo { path, bytes: 0, max_index: None }
    }
}

/// A queued append: the file holding its bytes and its callback.
type Flush = (Arc<SegFile>, IOFlushed<TypeConfig>);

/// Adds the operation and path to an io::Error.
fn ctx<'a>(what: &'a str, path: &'a Path) -> impl FnOnce(io::Error) -> io::Error + 'a {
    move |e| io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(ErrorKind::InvalidData, msg)
}

fn lock<T>(m: &Mutex<T>) -> io::Result<MutexGuard<'_, T>> {
    m.lock().map_err(|_| io::Error::other("log store: lock poisoned by an earlier panic"))
}

fn seg_path(dir: &Path, name: u64) -> PathBuf {
    dir.join(format!("log-{name:020}.seg"))
}

fn parse_seg_name(file_name: &str) -> Option<u64> {
    let digits = file_name.strip_prefix("log-")?.strip_suffix(".seg")?;
    let ok = digits.len() == 20 && digits.bytes().all(|b| b.is_ascii_digit());
    ok.then(|| digits.parse().ok()).flatten()
}

fn fsync(f: &SegFile, sync: bool) -> io::Result<()> {
    if !sync {
        return Ok(());
    }
    // Power-loss mode: the records' length and the zero-fill's end *before* the sync are safe
    // lower bounds of what it covers. `written` first: `allocated` is raised before it.
    let mut failed = lock(&f.sync)?;
    if *failed {
        return Err(io::Error::other(format!("fsync {}: an earlier sync of this file failed", f.path.display())));
    }
    let before = f.synced.as_ref().map(|_| (f.written.load(Ordering::SeqCst), f.allocated.load(Ordering::SeqCst)));
    if let Err(e) = f.file.sync_data() {
        *failed = true;
        return Err(ctx("fsync", &f.path)(e));
    }
    if let (Some(record), Some((len, alloc))) = (&f.synced, before) {
        record.advance(f.name, len, alloc)?;
    }
    Ok(())
}

fn fsync_dir(dir: &Path, sync: bool) -> io::Result<()> {
    if sync {
        File::open(dir).and_then(|d| d.sync_all()).map_err(ctx("fsync dir", dir))
    } else {
        Ok(())
    }
}

/// Appends one framed record to `buf`.
fn encode<T: Serialize>(buf: &mut Vec<u8>, value: &T) -> io::Result<()> {
    let start = buf.len();
    buf.extend_from_slice(&[0; HEADER]);
    let len = match bincode::serialize_into(&mut *buf, value) {
        Ok(()) => buf.len() - start - HEADER,
        Err(e) => return Err(io::Error::new(ErrorKind::InvalidInput, format!("encode: {e}"))),
    };
    if len > MAX_RECORD {
        let msg = format!("record of {len} bytes exceeds {MAX_RECORD}");
        return Err(io::Error::new(ErrorKind::InvalidInput, msg));
    }
    let crc = crc32fast::hash(&buf[start + HEADER..]);
    buf[start..start + 4].copy_from_slice(&(len as u32).to_le_bytes());
    buf[start + 4..start + HEADER].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

/// The payload of the frame at `pos` and the position after it, or why it is no whole record.
fn next_frame(data: &[u8], pos: usize) -> Result<(&[u8], usize), String> {
    let rest = &data[pos..];
    let Some(&[l0, l1, l2, l3, c0, c1, c2, c3]) = rest.first_chunk::<HEADER>() else {
        return Err(format!("short header ({} bytes)", rest.len()));
    };
    let len = u32::from_le_bytes([l0, l1, l2, l3]) as usize;
    // No record is empty, and a zero-filled tail (the usual shape of a torn append) would
    // otherwise pass: the crc32 of nothing is 0.
    if len == 0 || len > MAX_RECORD {
        return Err(format!("bad length {len}"));
    }
    let Some(payload) = rest.get(HEADER..HEADER + len) else {
        return Err(format!("length {len} runs past the end of the file"));
    };
    if crc32fast::hash(payload) != u32::from_le_bytes([c0, c1, c2, c3]) {
        return Err("crc mismatch".to_string());
    }
    Ok((payload, pos + HEADER + len))
}

/// The unit in which a disk persists a write whole or not at all (etcd's `minSectorSize`).
const SECTOR: usize = 512;

/// Where a whole record follows the damaged frame at `pos`, if one does and the damage is no
/// torn write. A power cut leaves the sectors of an unsynced write that did not reach the disk
/// as they were: zeros, as records are written over synced zero-fill or past the file's end
/// (module doc). So a frame with a sane length and a crc mismatch of which no sector-aligned
/// piece reads as all zeros (etcd's test for a torn entry) was damaged after it was written,
/// and a whole frame right after it shows that records were synced past it. Without that
/// evidence (the damage is the last frame, or its length is damaged too) the tail is cut as a
/// torn one. Left: a file system that may show stale blocks of a file's crashed extension
/// (ext4's `data=writeback`, not the default) can leave a torn append that outran the zero-fill
/// with stale bytes in one frame and a whole frame after it, a log a power cut made that this
/// refuses (the node then starts again with an empty data dir, as one whose data was lost).
/// The chaos suite's power-loss mode zeroes every unsynced byte, so it does not reach this.
fn damage_before_a_whole_record(data: &[u8], pos: usize) -> Option<usize> {
    if torn_write(data, pos) {
        return None;
    }
    let len = header_len(data, pos).filter(|len| (1..=MAX_RECORD).contains(len))?;
    let end = pos + HEADER + len;
    next_frame(data, end).ok().map(|_| end)
}

/// The length a frame's header at `pos` gives, if the header is whole.
fn header_len(data: &[u8], pos: usize) -> Option<usize> {
    let &[l0, l1, l2, l3, ..] = data.get(pos..)?.first_chunk::<HEADER>()?;
    Some(u32::from_le_bytes([l0, l1, l2, l3]) as usize)
}

/// Splits off and returns the entries with index > `after`.
fn split_after(entries: &mut BTreeMap<u64, Entry>, after: Option<u64>) -> BTreeMap<u64, Entry> {
    match after {
        None => std::mem::take(entries),
        Some(after) => after.checked_add(1).map_or_else(BTreeMap::new, |from| entries.split_off(&from)),
    }
}

/// Index the next appended entry will have.
fn next_index(mem: &Mem) -> u64 {
    match mem.entries.last_key_value() {
        Some((&k, _)) => k + 1,
        None => mem.meta.last_purged.map_or(0, |l| l.index + 1),
    }
}

fn read_meta(path: &Path) -> io::Result<Meta> {
    let data = match fs::read(path) {
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Meta::default()),
        read => read.map_err(ctx("read", path))?,
    };
    let bad = |why: String| invalid(format!("corrupt {}: {why}", path.display()));
    let (payload, _) = next_frame(&data, 0).map_err(bad)?;
    bincode::deserialize(payload).map_err(|e| bad(e.to_string()))
}

/// The committed hint, if the file holds one whole record (a torn or missing one is `None`).
fn read_committed_hint(path: &Path) -> Option<Option<LogId>> {
    let data = fs::read(path).ok()?;
    let (payload, _) = next_frame(&data, 0).ok()?;
    bincode::deserialize(payload).ok()
}

#[cfg(test)]
thread_local! {
    /// Segments `sync_replayed` synced on this thread.
    static REPLAY_SYNCS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Makes what the log will replay durable before it is read and served. A process killed
/// before its flusher's `fdatasync` leaves its last appends in the page cache, not on the disk;
/// the next process reads them back from the cache, and openraft takes a log it opens as
/// flushed: a leader's next append that adds nothing has them acknowledged without a storage
/// call, and a power cut after that lost entries a quorum was counted with. (Closed segments
/// were synced before their successor was made; syncing a clean file costs little.)
///
/// Then each segment's cached pages are dropped (`drop_cached`), so that replay reads what the
/// disk holds. A write-back that failed (EIO; ENOSPC from thin-provisioned storage) is reported
/// to the process whose `fdatasync` it fails (which stops, its appends unacknowledged), and
/// Linux keeps those pages cached and marked clean: a new process's `fdatasync` succeeds, and
/// reading through the cache gave it records the disk never got. It served them as durable,
/// they counted toward quorums, and a later reboot cut the log back at the hole they left (a
/// helper lost 770 acknowledged events that way on an ext4 whose backing store filled).
fn sync_replayed(dir: &Path, names: &[u64], sync: bool) -> io::Result<()> {
    if !sync {
        return Ok(());
    }
    for &name in names {
        let path = seg_path(dir, name);
        // Read-only is enough: `fdatasync` flushes the file's pages whoever wrote them.
        let file = File::open(&path).map_err(ctx("open", &path))?;
        file.sync_data().map_err(ctx("fsync", &path))?;
        drop_cached(&file).map_err(ctx("drop the cached pages of", &path))?;
        #[cfg(test)]
        REPLAY_SYNCS.with(|c| c.set(c.get() + 1));
    }
    Ok(())
}

/// Drops a synced file's pages from the page cache (`POSIX_FADV_DONTNEED`, which on Linux
/// drops the clean pages that are not mapped, locked or in use), so that the next read comes
/// from the disk. Best effort by the call's nature; nothing else maps or locks a segment.
#[cfg(target_os = "linux")]
fn drop_cached(file: &File) -> io::Result<()> {
    rustix::fs::fadvise(file, 0, None, rustix::fs::Advice::DontNeed).map_err(io::Error::from)
}

/// Elsewhere the cache stays (development builds only: the node runs on Linux).
#[cfg(not(target_os = "linux"))]
fn drop_cached(_file: &File) -> io::Result<()> {
    Ok(())
}

/// Whether the damaged frame at `pos` (the last segment's first bad one) can be a write a
/// power cut tore: an append cut short (no whole header, or a sane length that runs past the
/// file's end), or a frame of a sane length with a sector-aligned piece that reads as zeros
/// (`damage_before_a_whole_record`). Anything else (a length out of range, or a checksum
/// mismatch over sectors all written) was damaged after it was written, and may have been
/// synced and acknowledged.
fn torn_write(data: &[u8], pos: usize) -> bool {
    let Some(len) = header_len(data, pos) else { return true };
    // A header of zeros: its sector did not reach the disk (a disk may persist a write's
    // sectors out of order, so later ones may have).
    if len == 0 {
        return true;
    }
    if len > MAX_RECORD {
        return false;
    }
    let end = pos + HEADER + len;
    if end > data.len() {
        return true;
    }
    has_zero_sector(&data[..end], pos)
}

/// Whether a sector-aligned piece of `data[from..]` reads as all zeros: sectors of a write
/// that did not reach the disk before a power cut (`SECTOR`).
fn has_zero_sector(data: &[u8], from: usize) -> bool {
    let mut at = from;
    while at < data.len() {
        let to = ((at / SECTOR + 1) * SECTOR).min(data.len());
        if data[at..to].iter().all(|&b| b == 0) {
            return true;
        }
        at = to;
    }
    false
}

/// Replays one segment into `mem`, cutting a torn tail off the last one; `cut_damage` is set
/// when the tail cut off was not a torn write (`torn_write`).
fn replay_segment(path: &Path, is_last: bool, sync: bool, mem: &mut Mem, cut_damage: &mut bool) -> io::Result<SegInfo> {
    let data = fs::read(path).map_err(ctx("read", path))?;
    let purged = mem.meta.last_purged.map(|l| l.index);
    let (mut pos, mut max_index) = (0, None);
    while pos < data.len() {
        let (payload, next) = match next_frame(&data, pos) {
            Ok(frame) => frame,
            // The zero-fill ahead of the writer (module doc): the records end here.
            Err(_) if is_last && data[pos..].iter().all(|&b| b == 0) => break,
            Err(why) if is_last => {
                if let Some(next) = damage_before_a_whole_record(&data, pos) {
                    return Err(invalid(format!(
                        "{} at offset {pos}: {why}, and a whole record follows it at offset {next}: the disk damaged a record that had been \
                         synced (a power cut leaves an unsynced write's missing sectors as zeros here, and none of this record's are). \
                         The records after it may have been acknowledged, so the node does not start with them cut off. Move the data \
                         dir aside and start the node again with the same --id: it rejoins as a node whose data was lost, votes once a \
                         leader has brought it up to date, and is sent the log",
                        path.display()
                    )));
                }
                let dropped = data.len() - pos;
                if torn_write(&data, pos) {
                    tracing::warn!(path = %path.display(), offset = pos, dropped, %why,
                        "torn raft log tail: cut back to the last whole record");
                } else {
                    // The records cut off may have been synced and acknowledged: the node
                    // starts as one that may have lost entries (`node::withhold_vote`), and
                    // the bytes are kept beside the segment for a look.
                    *cut_damage = true;
                    let aside = path.with_extension("cut");
                    let kept = fs::write(&aside, &data[pos..]).map_err(|e| e.to_string());
                    if let Some(dir) = path.parent() {
                        let mark = dir.join(DAMAGE_FILE);
                        let made = File::create(&mark).and_then(|f| if sync { f.sync_all() } else { Ok(()) });
                        made.map_err(ctx("create", &mark))?;
                        fsync_dir(dir, sync)?;
                    }
                    tracing::error!(path = %path.display(), offset = pos, dropped, %why, aside = %aside.display(), kept = ?kept,
                        "damaged raft log tail (no torn write: it may have been acknowledged) cut back to the last whole record; \
                         this node votes only once a leader has brought it up to date");
                }
                let f = OpenOptions::new().write(true).open(path).map_err(ctx("open", path))?;
                f.set_len(pos as u64).map_err(ctx("truncate", path))?;
                if sync {
                    f.sync_all().map_err(ctx("fsync", path))?;
                }
                break;
            }
            Err(why) => return Err(invalid(format!("{} at offset {pos}: {why}", path.display()))),
        };
        let record: Record<Entry> = bincode::deserialize(payload)
            .map_err(|e| {
                // Its checksum held: whole bytes this build cannot read, most likely a command
                // a newer build wrote (a node rolled back past a feature the cluster used).
                invalid(format!(
                    "undecodable record in {} at offset {pos}: {e} (its checksum is right: written by a newer build? run that build or a later one on this data dir)",
                    path.display()
                ))
            })?;
        match record {
            Record::Entry(entry) => {
                let index = entry.log_id.index;
                max_index = max_index.max(Some(index));
                if purged.is_none_or(|p| index > p) {
                    mem.entries.insert(index, entry);
                }
            }
            Record::Truncate { after } => drop(split_after(&mut mem.entries, after)),
        }
        pos = next;
    }
    Ok(SegInfo { path: path.to_path_buf(), bytes: pos as u64, max_index })
}

/// The reaper thread: frees purged entries and unlinks purged segments, off the purge's path.
/// openraft's core awaits `purge` before it goes on appending and committing, and under batched
/// publishing one purge freed hundreds of thousands of events (~200 ms) and unlinked 128 MiB of
/// segments (~40 ms): a 240 ms stall of every publish (measured, `bench events --batch 100
/// --rate 750`). Neither has to finish first: the purge point is durable in `meta` before
/// anything is queued here, replay skips entries at or below it, and a crash before an unlink
/// leaves a file that replay skips. Unlink errors are logged: such a file is harmless.
fn reaper(rx: mpsc::Receiver<Reap>, dir: PathBuf, sync: bool) {
    crate::process::background_thread();
    while let Ok(reap) = rx.recv() {
        for path in &reap.paths {
            match fs::remove_file(path) {
                Err(e) if e.kind() != ErrorKind::NotFound => {
                    tracing::warn!(path = %path.display(), error = %e, "could not remove a purged raft log segment");
                }
                _ => {}
            }
        }
        if !reap.paths.is_empty() {
            if let Err(e) = fsync_dir(&dir, sync) {
                tracing::warn!(dir = %dir.display(), error = %e, "could not sync the raft log directory after a purge");
            }
        }
        drop(reap.entries);
        if let Some(done) = reap.done {
            let _ = done.send(());
        }
    }
}

/// The founder mark of a log (`FOUNDER_FILE`) and whether it is there.
#[derive(Clone)]
struct Founder {
    path: PathBuf,
    dir: PathBuf,
    /// Whether the mark may be on disk: set by `LogStore::mark_founder` (under the `mem` lock)
    /// before it writes the file, cleared by `unmark` once the file is gone; held across each
    /// one's file operations, so neither sees the other half done.
    marked: Arc<Mutex<bool>>,
    /// This node's id once its own bootstrap claimed the log (`LogStore::claim_founding`),
    /// taken under `marked`'s lock; for the process's life.
    forming: Arc<Mutex<Option<u64>>>,
    /// The founder this node's empty, marked log was asked to vote for and let through
    /// (`LogStore::founder_vote`), taken under `marked`'s lock; for the process's life (after
    /// a restart, the vote the log kept stands for it). Another node's mark is refused from
    /// then on.
    voted: Arc<Mutex<Option<u64>>>,
    /// The marking node's latest ask, and the lowest node that asked to replace its mark
    /// meanwhile (`LogStore::mark_founder`), taken under `marked`'s lock; in memory only.
    asks: Arc<Mutex<MarkAsks>>,
}

/// See `Founder::asks`.
#[derive(Debug, Default)]
struct MarkAsks {
    /// The node whose mark the log holds, when it last asked for it.
    last: Option<(u64, std::time::Instant)>,
    /// A lower node refused while the marking node's ask was recent: the mark is its at that
    /// node's next ask, which shows it has not formed its cluster.
    lower: Option<u64>,
}

/// How long after the marking node's latest ask a lower node's mark does not replace its own
/// (`LogStore::mark_founder`): the marking node may have claimed its log and initialized right
/// after that ask, and its first vote, which holds this log for good, comes a prove tick and an
/// election timeout later (under a second).
const MARK_HOLD: std::time::Duration = std::time::Duration::from_secs(5);

/// What became of a founder mark, or of a claim to found a cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Founding {
    /// Marked (`new`: just now), or claimed.
    Marked { new: bool },
    /// The log holds entries: a cluster exists.
    HoldsEntries,
    /// The log belongs to this node's cluster (0: a mark that names none).
    Other(u64),
}

impl Founder {
    /// The node whose cluster the mark on disk is for, if it is there and names one.
    fn by(&self) -> Option<u64> {
        let text = fs::read_to_string(&self.path).ok()?;
        let rest = text.strip_prefix("marked by node ")?;
        rest.split_whitespace().next()?.parse().ok()
    }

    /// Removes the mark durably, if it is there: on the flusher thread before the first append
    /// it syncs is acknowledged, so that a log that acknowledged an entry never carries it.
    fn unmark(&self, sync: bool) -> io::Result<()> {
        let mut marked = lock(&self.marked)?;
        if !*marked {
            return Ok(());
        }
        match fs::remove_file(&self.path) {
            Err(e) if e.kind() != ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        fsync_dir(&self.dir, sync)?;
        *marked = false;
        Ok(())
    }

    fn is_marked(&self) -> bool {
        lock(&self.marked).is_ok_and(|m| *m)
    }
}

/// The flusher thread (group commit). Exits once the channel is closed and drained.
fn flusher(rx: mpsc::Receiver<Flush>, sync: bool, failed: Arc<AtomicBool>, grow_limit: u64, phase: u64, founder: Founder) {
    let zeros = vec![0u8; GROW_STEP as usize];
    let commit_seconds = metrics::histogram!("raftbridge_log_group_commit_seconds");
    let zero_fill_seconds = metrics::histogram!("raftbridge_log_zero_fill_seconds");
    while let Ok(first) = rx.recv() {
        let started = std::time::Instant::now();
        // Everything queued before the sync starts shares it.
        let mut batch = vec![first];
        batch.extend(rx.try_iter());
        let mut files: Vec<&Arc<SegFile>> = Vec::new();
        for (f, _) in &batch {
            if !files.iter().any(|x| Arc::ptr_eq(x, f)) {
                files.push(f);
            }
        }
        let error = if failed.load(Ordering::SeqCst) {
            Some((ErrorKind::Other, "raft log store failed earlier; restart to recover".into()))
        } else if let Err(e) = files.iter().try_for_each(|f| fsync(f, sync)).and_then(|()| founder.unmark(sync)) {
            tracing::error!(error = %e, "raft log fsync failed; refusing further writes");
            failed.store(true, Ordering::SeqCst);
            Some((e.kind(), e.to_string()))
        } else {
            None
        };
        commit_seconds.record(started.elapsed().as_secs_f64());
        let newest = batch.last().map(|(f, _)| f.clone());
        for (_, callback) in batch {
            callback.io_completed(match &error {
                None => Ok(()),
                Some((kind, msg)) => Err(io::Error::new(*kind, msg.clone())),
            });
        }
        // Zero-fill ahead of the writer once the callbacks are on their way; synced here so
        // that the next group commit's fdatasync finds the new size and blocks already on disk.
        if let (None, Some(f)) = (error, newest) {
            let started = std::time::Instant::now();
            match f.grow(grow_limit, phase, &zeros) {
                Ok(false) => {}
                Ok(true) => match fsync(&f, sync) {
                    Ok(()) => zero_fill_seconds.record(started.elapsed().as_secs_f64()),
                    // This fsync also covers records appended since the group commit: a failure
                    // is as fatal as the group commit's own (a later fsync may "succeed"
                    // without the lost pages).
                    Err(e) => {
                        tracing::error!(error = %e, "raft log fsync failed; refusing further writes");
                        failed.store(true, Ordering::SeqCst);
                    }
                },
                // Not fatal: the segment stops growing and the writer appends past its end.
                Err(e) => tracing::warn!(error = %e, "raft log zero-fill failed; this segment is no longer zero-filled"),
            }
        }
    }
}

impl LogStore {
    /// Opens the log in `dir` (created if missing) and replays it into memory.
    pub fn open(dir: &Path, opts: LogStoreOptions) -> io::Result<LogStore> {
        fs::create_dir_all(dir).map_err(ctx("create", dir))?;
        // The directory's own entry, made above on a first start, is durable before the vote
        // written into it is relied on.
        crate::fsutil::sync_parent(dir).map_err(ctx("sync the parent of", dir))?;
        match fs::remove_file(dir.join("meta.tmp")) {
            Err(e) if e.kind() != ErrorKind::NotFound => return Err(ctx("clean", dir)(e)),
            _ => {}
        }
        let mut mem = Mem { entries: BTreeMap::new(), meta: read_meta(&dir.join("meta"))? };
        let mut names = Vec::new();
        for item in fs::read_dir(dir).map_err(ctx("list", dir))? {
            let item = item.map_err(ctx("list", dir))?;
            names.extend(item.file_name().to_str().and_then(parse_seg_name));
        }
        names.sort_unstable();
        let synced = if opts.power_loss_test {
            let last = drop_unsynced(dir, &names)?;
            if let Some((synced_name, _, _)) = last {
                names.retain(|&n| n <= synced_name);
            }
            let last = Mutex::new(last.unwrap_or((0, 0, 0)));
            Some(Arc::new(SyncedRecord { path: dir.join(SYNCED_FILE), last }))
        } else {
            None
        };
        // Synced, then read from the disk, not the page cache (`sync_replayed`, `drop_cached`).
        sync_replayed(dir, &names, opts.sync)?;
        let mut closed = BTreeMap::new();
        let mut cut_damage = dir.join(DAMAGE_FILE).exists();
        for (i, &name) in names.iter().enumerate() {
            let info = replay_segment(&seg_path(dir, name), i + 1 == names.len(), opts.sync, &mut mem, &mut cut_damage)?;
            closed.insert(name, info);
        }
        // A Raft log has no holes (from the purge point on) and its log ids only grow; anything
        // else means lost or misordered segment files, which must not be served.
        let ids: Vec<&LogId> = mem.meta.last_purged.iter().chain(mem.entries.values().map(|e| &e.log_id)).collect();
        if let Some(w) = ids.windows(2).find(|w| w[1].index != w[0].index + 1 || w[1] <= w[0]) {
            return Err(invalid(format!("log in {} broken at {} -> {}", dir.display(), w[0], w[1])));
        }

        // The committed hint: newer than meta's, never beyond the replayed log.
        let committed_path = dir.join("committed");
        if let Some(hint) = read_committed_hint(&committed_path) {
            mem.meta.committed = hint;
        }
        let last_index = mem.entries.keys().next_back().copied().or(mem.meta.last_purged.map(|l| l.index));
        if mem.meta.committed.is_some_and(|c| Some(c.index) > last_index) {
            tracing::warn!(dir = %dir.display(), "committed hint beyond the log (power loss?); dropped");
            mem.meta.committed = None;
        }
        let committed_file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&committed_path)
            .map_err(ctx("open", &committed_path))?;

        let (active_name, active_seg) = match closed.pop_last() {
            Some(last) => last,
            None => (next_index(&mem), SegInfo::empty(seg_path(dir, next_index(&mem)))),
        };
        let path = active_seg.path.clone();
        let file = OpenOptions::new().create(true).truncate(false).write(true).open(&path).map_err(ctx("open", &path))?;
        let file_len = file.metadata().map_err(ctx("stat", &path))?.len();
        fsync_dir(dir, opts.sync)?;
        let segments = closed.len() + 1;
        tracing::info!(dir = %dir.display(), entries = mem.entries.len(), segments, "raft log opened");

        // A mark beside entries is stale (a mark made as an append raced it): gone before use.
        let mark = dir.join(FOUNDER_FILE);
        let founder = Founder { marked: Arc::new(Mutex::new(mark.exists())), path: mark, dir: dir.to_path_buf(), forming: Arc::new(Mutex::new(None)), voted: Arc::new(Mutex::new(None)), asks: Arc::default() };
        if !mem.entries.is_empty() || mem.meta.last_purged.is_some() {
            founder.unmark(opts.sync)?;
        }
        let failed = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel();
        let (sync, flag, grow_limit, phase) = (opts.sync, failed.clone(), opts.segment_bytes.saturating_add(GROW_SLACK), opts.grow_phase % GROW_STEP);
        let flusher_founder = founder.clone();
        let flusher = std::thread::Builder::new()
            .name("raft-log-flush".into())
            .spawn(move || flusher(rx, sync, flag, grow_limit, phase, flusher_founder))
            .map_err(ctx("spawn flusher for", dir))?;
        let (reap_tx, reap_rx) = mpsc::sync_channel(REAP_QUEUE);
        let reap_dir = dir.to_path_buf();
        let reaper = std::thread::Builder::new()
            .name("raft-log-reap".into())
            .spawn(move || reaper(reap_rx, reap_dir, sync))
            .map_err(ctx("spawn reaper for", dir))?;
        let written = active_seg.bytes;
        let active = Arc::new(SegFile::new(path, file, active_name, synced, written, file_len));
        let io = Io { active, active_seg, active_name, closed, flush_tx: Some(tx), encode_buf: Vec::new() };
        let inner = Inner {
            dir: dir.to_path_buf(),
            committed: Mutex::new(committed_file),
            opts,
            mem: Mutex::new(mem),
            disk: AtomicU64::new(io.active_seg.bytes + io.closed.values().map(|s| s.bytes).sum::<u64>()),
            io: Mutex::new(io),
            meta_writer: Mutex::new(()),
            failed,
            founder,
            cut_damage: AtomicBool::new(cut_damage),
            flusher: Some(flusher),
            reap_tx: Mutex::new(Some(reap_tx)),
            reaper: Some(reaper),
        };
        Ok(LogStore { inner: Arc::new(inner) })
    }

    /// True when the log holds any Raft state (a vote, entries or a purge point): the node has
    /// run before, as opposed to a first start.
    pub fn has_state(&self) -> bool {
        lock(&self.inner.mem).is_ok_and(|m| m.meta.vote.is_some() || !m.entries.is_empty() || m.meta.last_purged.is_some())
    }

    /// True when this log was marked, while still empty, as that of a node forming a new cluster
    /// (`PeerRequest::Found`). As the mark is kept with the segments, a log that has it has not
    /// been lost since before the cluster's first entry: an empty one never acknowledged an
    /// entry, and the node may vote as Raft says (`node::withhold_vote`).
    pub fn founder(&self) -> bool {
        self.inner.founder.is_marked()
    }

    /// Whether this process's own bootstrap claimed this log to found a cluster
    /// (`claim_founding`): it never acknowledged an entry of another.
    pub fn claimed_founding(&self) -> bool {
        lock(&self.inner.founder.forming).is_ok_and(|f| f.is_some())
    }

    /// Marks this log as a founder's (see `founder`), durably, if it has never held an entry:
    /// node `by` (the lowest id among them) forms the cluster of `members`; both are kept with
    /// the mark. Blocking (a file write and fsyncs), under the lock that appends take: an
    /// append either came first (no mark) or finds the mark, which the flusher then removes
    /// before acknowledging it.
    ///
    /// One log founds one node's cluster: a mark by a lower id, or this node's own bootstrap
    /// (`claim_founding`), refuses it (`Founding::Other`); a mark by a higher id is replaced
    /// (that node planned before it saw the lower one, which it now defers to: kept, the mark
    /// stalled every later plan for good). Two nodes whose views of the seeds differed (one's
    /// DNS lagging) could otherwise each bootstrap a membership holding this node, and Raft
    /// cannot tell their first entries apart: two clusters. The same node may mark again with
    /// other members (its view grew; the file keeps the first, for whoever reads the data
    /// dir): it initializes once, with one plan.
    ///
    /// A lower id does not replace the mark of a node that asked for it within `MARK_HOLD`:
    /// that node may have formed its cluster right after its ask, with this log counted (its
    /// first vote, within a second, holds the log for it), and the lower id's mark made this
    /// node refuse that vote: a cluster that never elected a leader, and the lower id waiting
    /// to join it. Refused then, the lower id takes the mark at the marking node's next ask
    /// (refused, that node forms nothing), or at its own next ask once `MARK_HOLD` passed.
    pub fn mark_founder(&self, by: u64, members: &[u64]) -> io::Result<Founding> {
        self.mark_founder_at(by, members, std::time::Instant::now())
    }

    fn mark_founder_at(&self, by: u64, members: &[u64], now: std::time::Instant) -> io::Result<Founding> {
        let mem = lock(&self.inner.mem)?;
        if !mem.entries.is_empty() || mem.meta.last_purged.is_some() {
            return Ok(Founding::HoldsEntries);
        }
        let mut marked = lock(&self.inner.founder.marked)?;
        if let Some(own) = *lock(&self.inner.founder.forming)? {
            if own != by {
                return Ok(Founding::Other(own));
            }
        }
        // A founder this empty log voted for keeps it: another founder's cluster counting it
        // too could then elect a leader of its own (`founder_vote`). The kept vote stands for
        // it after a restart (an empty log's only votes are ones it granted).
        let voted = (*lock(&self.inner.founder.voted)?)
            .or_else(|| mem.meta.vote.as_ref().filter(|v| v.leader_id().term > 0).map(|v| v.leader_id().node_id));
        if let Some(v) = voted.filter(|v| *v != by) {
            return Ok(Founding::Other(v));
        }
        let mut asks = lock(&self.inner.founder.asks)?;
        // Whom the mark is for from now on: `by`, unless a lower node asked while `by`'s ask
        // was recent, and `by` asks again (it has formed nothing).
        let mut to = by;
        if *marked {
            // A mark of an older build names no founder: taken as replaceable.
            match self.inner.founder.by() {
                Some(other) if other < by => return Ok(Founding::Other(other)),
                Some(other) if other == by => match asks.lower.take() {
                    Some(lower) if lower < by => to = lower,
                    // Already this node's: not written again (it asks every round while it
                    // plans, and each write syncs a file and the directory).
                    _ => {
                        asks.last = Some((by, now));
                        return Ok(Founding::Marked { new: false });
                    }
                },
                Some(other) if asks.last.is_some_and(|(at_by, at)| at_by == other && now.saturating_duration_since(at) < MARK_HOLD) => {
                    asks.lower = Some(asks.lower.map_or(by, |l| l.min(by)));
                    return Ok(Founding::Other(other));
                }
                _ => {}
            }
        }
        asks.last = Some((to, now));
        asks.lower = None;
        drop(asks);
        let text = if to == by {
            format!("marked by node {to} to form a cluster with nodes {members:?} while this log was empty\n")
        } else {
            format!("marked by node {to} to form a cluster while this log was empty (node {by} asked after it)\n")
        };
        // Flagged first: a write that fails half way (renamed, the directory not synced) may
        // leave the file, which the flusher must then remove before the first acknowledgement.
        let new = !std::mem::replace(&mut *marked, true);
        crate::fsutil::write_atomic(&self.inner.dir, FOUNDER_FILE, text.as_bytes())?;
        drop(marked);
        drop(mem);
        if to != by {
            // Refused: the mark is the lower node's now.
            return Ok(Founding::Other(to));
        }
        Ok(Founding::Marked { new })
    }

    /// Whether this node may vote for `candidate`, whose log ends at index `candidate_last`:
    /// `Some(founder)` refuses it. While this log is empty and marked as a founder's of node
    /// `founder`'s cluster, it votes only for that node, or for a candidate whose log goes past
    /// a cluster's first entry (index 0: the membership a founder initializes with; its leader
    /// appends the next one before it replicates), as such a log came from an elected leader.
    /// A vote let through while this log is empty, marked or not, keeps it for that candidate
    /// (`mark_founder` refuses other founders from then on).
    /// The price, in the rare race below with five or more founders: a higher founder that got
    /// one vote before a lower one's marks replaced the others' can never be elected, and the
    /// lower one never gets that voter's mark, so neither cluster forms until an operator starts
    /// the stuck nodes again with empty data dirs. A cluster that does not form is preferred to
    /// two that do.
    /// Why: two seeds that cannot see each other may both plan a cluster holding the same
    /// other seeds, and a lower founder's mark replaces a higher one's. Without this rule the
    /// higher founder, initialized already, could get one of them to vote for it, and the lower
    /// one the other: two leaders of two clusters from one seed list. With it, a node votes only
    /// for the founder whose mark it holds, and a founder gets all its marks only from nodes
    /// that have not voted for another.
    pub fn founder_vote(&self, candidate: u64, candidate_last: Option<u64>) -> io::Result<Option<u64>> {
        let mem = lock(&self.inner.mem)?;
        if !mem.entries.is_empty() || mem.meta.last_purged.is_some() {
            return Ok(None);
        }
        let marked = lock(&self.inner.founder.marked)?;
        let mut voted = lock(&self.inner.founder.voted)?;
        if candidate_last.is_none_or(|i| i == 0) {
            // A mark that names no founder (an older build's, or a file that cannot be read)
            // still holds this log to the first candidate it let through.
            let founder = if *marked { self.inner.founder.by().or(*voted) } else { None };
            if let Some(founder) = founder.filter(|f| *f != candidate) {
                return Ok(Some(founder));
            }
        }
        *voted = Some(candidate);
        drop(voted);
        drop(marked);
        drop(mem);
        Ok(None)
    }

    /// Claims this log for node `me`'s own bootstrap, before it initializes the cluster:
    /// refused (`Founding::Other`) if another node marked it as a founder of its cluster (this
    /// one waits for that cluster, and joins it), and from now on another node's mark is
    /// refused. Under the same locks as `mark_founder`, so one of the two comes first and the
    /// other sees it.
    pub fn claim_founding(&self, me: u64) -> io::Result<Founding> {
        let mem = lock(&self.inner.mem)?;
        if !mem.entries.is_empty() || mem.meta.last_purged.is_some() {
            return Ok(Founding::HoldsEntries);
        }
        let marked = lock(&self.inner.founder.marked)?;
        if *marked {
            // A mark that names no founder (an older build's) counts as another node's.
            match self.inner.founder.by() {
                Some(by) if by == me => {}
                other => return Ok(Founding::Other(other.unwrap_or(0))),
            }
        }
        *lock(&self.inner.founder.forming)? = Some(me);
        drop(marked);
        drop(mem);
        Ok(Founding::Marked { new: false })
    }

    /// The index of the last entry this log holds (or purged into a snapshot), if any. Read once
    /// at start: the entries up to it are applied again from the snapshot on, as a replay.
    pub fn last_index(&self) -> Option<u64> {
        let mem = lock(&self.inner.mem).ok()?;
        mem.entries.keys().next_back().copied().or(mem.meta.last_purged.map(|l| l.index))
    }

    /// True when the log holds entries, or held some and purged them into a snapshot: a vote
    /// alone does not count.
    /// Whether this open cut records off the log's tail that may have been acknowledged (a
    /// damaged record, not a torn write): the node may have lost entries, as one whose log is
    /// empty may have (`node::withhold_vote`).
    pub fn cut_damage(&self) -> bool {
        self.inner.cut_damage.load(Ordering::Acquire)
    }

    /// A leader has brought the node up to date since a damaged tail was cut: the log is whole
    /// again (`DAMAGE_FILE` removed, durably). Blocking IO: call it off the runtime.
    pub fn clear_cut_damage(&self) -> io::Result<()> {
        let mark = self.inner.dir.join(DAMAGE_FILE);
        match fs::remove_file(&mark) {
            Err(e) if e.kind() != ErrorKind::NotFound => return Err(ctx("remove", &mark)(e)),
            _ => {}
        }
        fsync_dir(&self.inner.dir, self.inner.opts.sync)?;
        self.inner.cut_damage.store(false, Ordering::Release);
        Ok(())
    }

    pub fn holds_entries(&self) -> bool {
        lock(&self.inner.mem).is_ok_and(|m| !m.entries.is_empty() || m.meta.last_purged.is_some())
    }

    /// Total bytes of records in the segment files (the active one's zero-fill, at most a few
    /// MiB, is not counted).
    pub fn disk_bytes(&self) -> u64 {
        self.inner.disk.load(Ordering::Relaxed)
    }

    /// Waits until every purge so far has been reaped (its segments unlinked).
    #[cfg(test)]
    async fn reaped(&self) {
        let (done, wait) = mpsc::channel();
        self.inner.reap(Reap { entries: BTreeMap::new(), paths: Vec::new(), done: Some(done) });
        tokio::task::spawn_blocking(move || wait.recv_timeout(std::time::Duration::from_secs(10)))
            .await
            .expect("reaper wait task")
            .expect("reaper done within 10 s");
    }

    /// Runs a synchronous, fsyncing write off the async runtime's worker threads.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner) -> io::Result<T> + Send + 'static,
    ) -> io::Result<T> {
        let inner = self.inner.clone();
        let task = tokio::task::spawn_blocking(move || f(&inner));
        task.await.map_err(|e| io::Error::other(format!("raft log store task: {e}")))?
    }

    /// `append`'s writing under `io`, on the caller's thread (page-cache writes): the index
    /// the next segment would start at when the active one has grown past its size.
    fn append_locked<I>(&self, entries: I, callback: IOFlushed<TypeConfig>) -> Result<Option<u64>, io::Error>
    where
        I: IntoIterator<Item = Entry>,
    {
        let inner = &*self.inner;
        inner.writable()?;
        let mut io = lock(&inner.io)?;
        let (mut buf, mut batch) = (std::mem::take(&mut io.encode_buf), Vec::new());
        buf.clear();
        for entry in entries {
            let index = entry.log_id.index;
            encode(&mut buf, &Record::Entry(&entry))
                .map_err(|e| io::Error::new(e.kind(), format!("log entry {index}: {e}")))?;
            batch.push(entry);
        }
        inner.write_active(&mut io, &buf)?;
        buf.clear();
        buf.shrink_to(ENCODE_BUF_KEEP);
        io.encode_buf = buf;
        let max = batch.iter().map(|e| e.log_id.index).max();
        io.active_seg.max_index = io.active_seg.max_index.max(max);
        let next = {
            let mut mem = lock(&inner.mem)?;
            mem.entries.extend(batch.into_iter().map(|e| (e.log_id.index, e)));
            next_index(&mem)
        };
        // Even an empty append goes through the flusher: a completion must imply that every
        // earlier append is durable.
        let item = (io.active.clone(), callback);
        let sent = match &io.flush_tx {
            Some(tx) => tx.send(item).map_err(|e| e.0),
            None => Err(item),
        };
        if let Err((_, callback)) = sent {
            let msg = format!("raft log flusher for {} is gone", inner.dir.display());
            callback.io_completed(Err(io::Error::other(msg.clone())));
            return inner.check(Err(io::Error::other(msg)));
        }
        Ok((io.active_seg.bytes > inner.opts.segment_bytes).then_some(next))
    }
}

impl Inner {
    fn writable(&self) -> io::Result<()> {
        if self.failed.load(Ordering::SeqCst) {
            let msg = format!("raft log in {} failed earlier; restart to recover", self.dir.display());
            return Err(io::Error::other(msg));
        }
        Ok(())
    }

    /// Marks the store failed if `r` is an error: after a failed write or fsync the file's
    /// state is unknown and nothing may be written behind it.
    fn check<T>(&self, r: io::Result<T>) -> io::Result<T> {
        if r.is_err() {
            self.failed.store(true, Ordering::SeqCst);
        }
        r
    }

    fn write_active(&self, io: &mut Io, buf: &[u8]) -> io::Result<()> {
        self.check(io.active.write_records(buf))?;
        io.active_seg.bytes += buf.len() as u64;
        // One add per append; `note_disk` sums the segments where their set changes (a purge).
        self.disk.fetch_add(buf.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Brings `disk_bytes` up to `io` (a rotation moves bytes between segments, no change).
    fn note_disk(&self, io: &Io) {
        self.disk.store(io.active_seg.bytes + io.closed.values().map(|s| s.bytes).sum::<u64>(), Ordering::Relaxed);
    }

    /// Cuts the active segment back to its records and syncs it, then starts the next one.
    /// Syncing first is what makes the last segment the only one that can have a torn tail, and
    /// cutting first keeps zeros out of closed segments.
    fn rotate(&self, io: &mut Io, next: u64) -> io::Result<()> {
        io.active.close()?;
        fsync(&io.active, self.opts.sync)?;
        let name = next.max(io.active_name + 1);
        let path = seg_path(&self.dir, name);
        let mut open = OpenOptions::new();
        let file = open.create_new(true).write(true).open(&path).map_err(ctx("create", &path))?;
        fsync_dir(&self.dir, self.opts.sync)?;
        let synced = io.active.synced.clone();
        io.active = Arc::new(SegFile::new(path.clone(), file, name, synced, 0, 0));
        let seg = std::mem::replace(&mut io.active_seg, SegInfo::empty(path));
        io.closed.insert(std::mem::replace(&mut io.active_name, name), seg);
        Ok(())
    }

    /// Replaces `meta` atomically and durably, after syncing the log bytes written before it.
    /// `active` is the active segment when the caller began (copied out of `io`, which is not
    /// held meanwhile); the caller holds `meta_writer`.
    fn write_meta(&self, active: &SegFile, meta: Meta) -> io::Result<()> {
        let sync = self.opts.sync;
        self.check((|| {
            fsync(active, sync)?;
            let mut buf = Vec::new();
            encode(&mut buf, &meta)?;
            let (tmp, path) = (self.dir.join("meta.tmp"), self.dir.join("meta"));
            let mut f = File::create(&tmp).map_err(ctx("create", &tmp))?;
            f.write_all(&buf).map_err(ctx("write", &tmp))?;
            if sync {
                f.sync_all().map_err(ctx("fsync", &tmp))?;
            }
            fs::rename(&tmp, &path).map_err(ctx("rename to", &path))?;
            fsync_dir(&self.dir, sync)
        })())?;
        lock(&self.mem)?.meta = meta;
        Ok(())
    }

    /// Persists the meta if `f` changed it; otherwise still syncs the active segment, so that
    /// returning always means every earlier write is durable.
    /// Every write before the call is in the segment that is active at its start (a rotation
    /// syncs the one it closes), so syncing that one covers them; appends meanwhile go on.
    fn update_meta(&self, f: impl FnOnce(&mut Meta)) -> io::Result<()> {
        self.writable()?;
        let _writer = lock(&self.meta_writer)?;
        let active = lock(&self.io)?.active.clone();
        let old = lock(&self.mem)?.meta.clone();
        let mut meta = old.clone();
        f(&mut meta);
        if meta != old {
            self.write_meta(&active, meta)
        } else {
            self.check(fsync(&active, self.opts.sync))
        }
    }

    fn truncate_after(&self, after: Option<u64>) -> io::Result<()> {
        self.writable()?;
        let mut buf = Vec::new();
        encode(&mut buf, &Record::<&Entry>::Truncate { after })?;
        let active = {
            let mut io = lock(&self.io)?;
            self.write_active(&mut io, &buf)?;
            io.active.clone()
        };
        self.check(fsync(&active, self.opts.sync))?;
        drop(split_after(&mut lock(&self.mem)?.entries, after));
        Ok(())
    }

    fn purge(&self, log_id: LogId) -> io::Result<()> {
        self.writable()?;
        let writer = lock(&self.meta_writer)?;
        let mut meta = lock(&self.mem)?.meta.clone();
        if meta.last_purged.is_some_and(|p| p.index >= log_id.index) {
            return Ok(());
        }
        let upto = log_id.index;
        meta.last_purged = Some(log_id);
        let active = lock(&self.io)?.active.clone();
        self.write_meta(&active, meta)?; // durable first: replay skips entries <= last_purged
        drop(writer);
        let mut io = lock(&self.io)?;
        // The purged entries go to the reaper: they may hold the last references to hundreds of
        // thousands of events, and freeing them took up to hundreds of ms, first under `mem`
        // (while appends and replication reads waited), then still inside the purge that
        // openraft's core awaits (see `reaper`).
        let purged = {
            let mut mem = lock(&self.mem)?;
            let kept = split_after(&mut mem.entries, Some(upto));
            std::mem::replace(&mut mem.entries, kept)
        };
        // Delete only a *prefix* of the closed segments: a kept older segment may hold stale
        // entries that a Truncate record in a newer one removes, and deleting that newer one
        // would bring them back.
        let mut doomed = Vec::new();
        while let Some(seg) = io.closed.first_entry() {
            if seg.get().max_index.is_some_and(|m| m > upto) {
                break;
            }
            doomed.push(seg.remove().path);
        }
        self.note_disk(&io);
        // Unlinked by the reaper: freeing a 64 MiB segment's blocks takes milliseconds on a busy
        // disk. Nothing reads a segment once it is out of `closed`; a crash before the unlink
        // leaves a file that replay skips (its entries are <= last_purged, made durable above).
        drop(io);
        self.reap(Reap { entries: purged, paths: doomed, done: None });
        Ok(())
    }

    /// Queues `reap` for the reaper (waiting while `REAP_QUEUE` are queued). Without a reaper
    /// (only while the store is being dropped) the entries are freed here and the files stay,
    /// which replay skips.
    fn reap(&self, reap: Reap) {
        let tx = lock(&self.reap_tx).ok().and_then(|tx| tx.clone());
        let Some(tx) = tx else {
            return drop(reap); // closing: the files stay, and replay skips them
        };
        if let Err(mpsc::SendError(reap)) = tx.send(reap) {
            drop(reap);
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Close the flush channel, then wait for the flusher to complete what is queued.
        self.io.get_mut().unwrap_or_else(|p| p.into_inner()).flush_tx = None;
        if let Some(handle) = self.flusher.take() {
            if handle.join().is_err() {
                tracing::error!("raft log flusher thread panicked");
            }
        }
        *self.reap_tx.get_mut().unwrap_or_else(|p| p.into_inner()) = None;
        if let Some(handle) = self.reaper.take() {
            if handle.join().is_err() {
                tracing::error!("raft log reaper thread panicked");
            }
        }
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        let (start, end) = (range.start_bound().cloned(), range.end_bound().cloned());
        // `BTreeMap::range` panics on these empty ranges.
        let empty = match (start, end) {
            (Bound::Excluded(s), Bound::Excluded(e)) => s >= e,
            (Bound::Included(s) | Bound::Excluded(s), Bound::Included(e) | Bound::Excluded(e)) => s > e,
            _ => false,
        };
        if empty {
            return Ok(Vec::new());
        }
        let mem = lock(&self.inner.mem)?;
        Ok(mem.entries.range((start, end)).map(|(_, e)| e.clone()).collect())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        Ok(lock(&self.inner.mem)?.meta.vote)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let mem = lock(&self.inner.mem)?;
        let last_purged_log_id = mem.meta.last_purged;
        let last = mem.entries.last_key_value().map(|(_, e)| e.log_id);
        Ok(LogState { last_purged_log_id, last_log_id: last.or(last_purged_log_id) })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        let vote = *vote;
        self.blocking(move |inner| inner.update_meta(|m| m.vote = Some(vote))).await
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), io::Error> {
        // A page-cache write of a few dozen bytes: no fsync, no blocking thread (module doc).
        let mut buf = Vec::with_capacity(64);
        encode(&mut buf, &committed)?;
        {
            let file = lock(&self.inner.committed)?;
            file.write_all_at(&buf, 0).map_err(ctx("write", &self.inner.dir.join("committed")))?;
        }
        lock(&self.inner.mem)?.meta.committed = committed;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, io::Error> {
        Ok(lock(&self.inner.mem)?.meta.committed)
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<TypeConfig>) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let Some(next) = self.append_locked(entries, callback)? else { return Ok(()) };
        // On a blocking thread: a rotation syncs the segment it closes, and on a disk that
        // stalls that held up the async runtime's thread (with one worker, the whole node).
        // The core waits for it as before; appends are its own, one at a time.
        let segment_bytes = self.inner.opts.segment_bytes;
        self.blocking(move |inner| {
            let mut io = lock(&inner.io)?;
            match io.active_seg.bytes > segment_bytes {
                true => inner.check(inner.rotate(&mut io, next)),
                false => Ok(()),
            }
        })
        .await
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        self.blocking(move |inner| inner.truncate_after(last_log_id.map(|l| l.index))).await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        self.blocking(move |inner| inner.purge(log_id)).await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU64;

    use futures_util::StreamExt;
    use openraft::storage::RaftSnapshotBuilder;
    use openraft::storage::RaftStateMachine;
    use openraft::testing::log::StoreBuilder;
    use openraft::testing::log::Suite;
    use openraft::type_config::TypeConfigExt;
    use openraft::vote::RaftLeaderIdExt;
    use openraft::RaftTypeConfig;
    use openraft::StorageError;

    use super::*;
    use crate::raft::types::Command;
    use crate::raft::types::CommandResult;
    use crate::raft::types::EntryResponder;
    use crate::raft::types::RaftEntry;
    use crate::raft::types::Snapshot;
    use crate::raft::types::SnapshotMeta;
    use crate::raft::types::StoredMembershipT;

    /// A directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> TempDir {
            static N: AtomicU64 = AtomicU64::new(0);
            let name = format!("raftbridge-logstore-{}-{}", std::process::id(), N.fetch_add(1, Ordering::SeqCst));
            let path = std::env::temp_dir().join(name);
            let _ = fs::remove_dir_all(&path);
            TempDir(path)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn log_id(term: u64, index: u64) -> LogId {
        LogId::new(<TypeConfig as RaftTypeConfig>::LeaderId::new_committed(term, 1), index)
    }

    fn ent(term: u64, index: u64) -> Entry {
        let (store, key, value) = ("s".into(), format!("k{index}"), vec![7; 100]);
        Entry::new_normal(log_id(term, index), Command::Put { store, key, value, if_revision: None, tag: None })
    }

    /// About 6 entries a segment.
    fn small() -> LogStoreOptions {
        LogStoreOptions { segment_bytes: 1000, sync: true, power_loss_test: false, grow_phase: 0 }
    }

    async fn append(store: &mut LogStore, entries: Vec<Entry>) {
        let (tx, rx) = TypeConfig::oneshot();
        store.append(entries, IOFlushed::signal(tx)).await.unwrap();
        rx.await.unwrap().unwrap();
    }

    /// Appends `entry`, closes the store and returns the (term, index) ids a reopen replays.
    async fn append_and_reopen(mut store: LogStore, dir: &Path, opts: LogStoreOptions, entry: Entry) -> Vec<(u64, u64)> {
        append(&mut store, vec![entry]).await;
        drop(store);
        ids(&mut LogStore::open(dir, opts).unwrap()).await
    }

    /// (term, index) of every entry.
    async fn ids(store: &mut LogStore) -> Vec<(u64, u64)> {
        let entries = store.try_get_log_entries(..).await.unwrap();
        entries.iter().map(|e| (e.log_id.leader_id.term, e.log_id.index)).collect()
    }

    fn run(term: u64, indexes: std::ops::RangeInclusive<u64>) -> Vec<(u64, u64)> {
        indexes.map(|i| (term, i)).collect()
    }

    /// Where the records of a segment file end (the zero-fill, if any, follows).
    fn records_end(path: &Path) -> u64 {
        frames(path).1 as u64
    }

    /// Offsets of the whole frames of a segment file, in order, and where they end.
    fn frames(path: &Path) -> (Vec<usize>, usize) {
        let data = fs::read(path).unwrap();
        let (mut pos, mut starts) = (0, Vec::new());
        while let Ok((_, next)) = next_frame(&data, pos) {
            starts.push(pos);
            pos = next;
        }
        (starts, pos)
    }

    /// Cuts the zero-fill off a segment, so that a test can damage its last record.
    fn cut_zero_fill(path: &Path) {
        OpenOptions::new().write(true).open(path).unwrap().set_len(records_end(path)).unwrap();
    }

    fn segments(dir: &Path) -> Vec<PathBuf> {
        let mut v: Vec<_> = fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
        v.retain(|p| p.extension().is_some_and(|x| x == "seg"));
        v.sort();
        v
    }

    /// A segment whose sync failed once fails every later sync, whoever asks (the flusher or
    /// the writer): the kernel reports a lost write to one sync only.
    #[test]
    fn a_failed_sync_of_a_segment_fails_every_later_one() {
        let dir = TempDir::new();
        fs::create_dir_all(&dir.0).unwrap();
        let path = dir.0.join("s");
        let file = OpenOptions::new().create(true).truncate(false).write(true).open(&path).unwrap();
        let seg = SegFile::new(path, file, 1, None, 0, 0);
        fsync(&seg, true).expect("a sound file syncs");
        *seg.sync.lock().unwrap() = true; // as a failed `fdatasync` leaves it
        assert!(fsync(&seg, true).is_err());
        assert!(fsync(&seg, true).is_err(), "and stays failed");
        assert!(fsync(&seg, false).is_ok(), "without sync nothing is asked");
    }

    /// What a reopened log replays is synced before the log is served, whoever wrote it: a
    /// process killed before its flusher synced leaves its appends in the page cache, and the
    /// next process must not serve them (openraft takes them as flushed) while a power cut could
    /// still take them.
    #[tokio::test]
    async fn a_reopened_log_syncs_what_it_replays_before_serving_it() {
        let dir = TempDir::new();
        // Written and never synced (as if killed before the flusher's sync), over segments.
        let unsynced = LogStoreOptions { sync: false, ..small() };
        let mut store = LogStore::open(&dir.0, unsynced.clone()).unwrap();
        for i in 1..=40 {
            append(&mut store, vec![ent(1, i)]).await;
        }
        drop(store);
        let n = segments(&dir.0).len();
        assert!(n >= 2, "over several segments: {n}");
        REPLAY_SYNCS.with(|c| c.set(0));
        let mut store = LogStore::open(&dir.0, small()).unwrap();
        assert_eq!(REPLAY_SYNCS.with(std::cell::Cell::get), n, "every replayed segment synced at open");
        assert_eq!(ids(&mut store).await, run(1, 1..=40));
        // Without sync (tests, benchmarks), nothing is.
        drop(store);
        REPLAY_SYNCS.with(|c| c.set(0));
        drop(LogStore::open(&dir.0, unsynced).unwrap());
        assert_eq!(REPLAY_SYNCS.with(std::cell::Cell::get), 0);
    }

    /// The founder mark survives a reopen while the log is empty, goes with the log's
    /// directory, and is gone (durably) once an entry is appended: a log that acknowledged an
    /// entry never carries it, also when its segments are lost later.
    #[tokio::test]
    async fn the_founder_mark_is_kept_only_while_the_log_never_held_an_entry() {
        let dir = TempDir::new();
        let store = LogStore::open(&dir.0, LogStoreOptions::default()).unwrap();
        assert!(!store.founder());
        assert_eq!(store.mark_founder(1, &[1, 2, 3]).unwrap(), Founding::Marked { new: true });
        assert!(store.founder());
        drop(store);
        let mut store = LogStore::open(&dir.0, LogStoreOptions::default()).unwrap();
        assert!(store.founder(), "kept across a restart");
        assert!(!store.holds_entries());
        append(&mut store, vec![ent(1, 1)]).await;
        assert!(!store.founder() && !dir.0.join(FOUNDER_FILE).exists(), "gone once an entry is acknowledged");
        assert_eq!(store.mark_founder(1, &[1, 2, 3]).unwrap(), Founding::HoldsEntries, "a log that holds entries is not marked");
        drop(store);
        for seg in segments(&dir.0) {
            fs::remove_file(seg).unwrap();
        }
        let store = LogStore::open(&dir.0, LogStoreOptions::default()).unwrap();
        assert!(!store.founder(), "segments lost later: no mark to vouch for the empty log");
        drop(store);
        // A mark beside entries (an append that raced the mark) is removed at open.
        let mut store = LogStore::open(&dir.0, LogStoreOptions::default()).unwrap();
        append(&mut store, vec![ent(1, 1)]).await;
        drop(store);
        fs::write(dir.0.join(FOUNDER_FILE), b"stale").unwrap();
        let store = LogStore::open(&dir.0, LogStoreOptions::default()).unwrap();
        assert!(!store.founder() && !dir.0.join(FOUNDER_FILE).exists());
        drop(store);
        fs::remove_dir_all(&dir.0).unwrap();
        let store = LogStore::open(&dir.0, LogStoreOptions::default()).unwrap();
        assert!(!store.founder(), "a lost log loses its mark");
    }

    /// A log founds one node's cluster: marked by node 2, it takes node 1's mark instead (node
    /// 2 defers to the lower id), then node 1's marks again (its view changed) but not node 2's,
    /// also after a restart, and this node's own bootstrap is refused; a log this node claimed
    /// for its own bootstrap refuses every other node's mark.
    /// Two nodes whose views of the seeds differed could each bootstrap a cluster holding the
    /// same node (two clusters).
    #[test]
    fn a_log_founds_one_nodes_cluster() {
        let dir = TempDir::new();
        let store = LogStore::open(&dir.0, LogStoreOptions::default()).unwrap();
        // Node 2 planned before it saw node 1: node 1's mark replaces its own (once node 2's
        // latest ask is `MARK_HOLD` old).
        let t0 = std::time::Instant::now();
        assert_eq!(store.mark_founder_at(2, &[2, 3, 4], t0).unwrap(), Founding::Marked { new: true });
        assert_eq!(store.mark_founder_at(1, &[1, 2, 3], t0 + MARK_HOLD).unwrap(), Founding::Marked { new: false }, "a lower founder's mark replaces it");
        assert_eq!(store.mark_founder(1, &[1, 3, 4]).unwrap(), Founding::Marked { new: false }, "the same founder, another view");
        assert_eq!(store.mark_founder(2, &[2, 3, 4]).unwrap(), Founding::Other(1), "a higher founder's is refused");
        drop(store);
        let store = LogStore::open(&dir.0, LogStoreOptions::default()).unwrap();
        assert_eq!(store.mark_founder(2, &[2, 3, 4]).unwrap(), Founding::Other(1), "kept across a restart");
        assert_eq!(store.claim_founding(3).unwrap(), Founding::Other(1), "no cluster of its own");
        assert_eq!(store.mark_founder(1, &[1, 2, 3]).unwrap(), Founding::Marked { new: false });
        drop(store);
        // An older build's mark names no founder: it may be marked again, but not claimed.
        fs::write(dir.0.join(FOUNDER_FILE), b"formed a cluster with nodes [1, 2, 3] while this log was empty\n").unwrap();
        let store = LogStore::open(&dir.0, LogStoreOptions::default()).unwrap();
        assert_eq!(store.claim_founding(3).unwrap(), Founding::Other(0));
        assert_eq!(store.mark_founder(1, &[1, 2, 3]).unwrap(), Founding::Marked { new: false });
        drop(store);
        fs::remove_dir_all(&dir.0).unwrap();
        let store = LogStore::open(&dir.0, LogStoreOptions::default()).unwrap();
        assert_eq!(store.claim_founding(3).unwrap(), Founding::Marked { new: false }, "an unmarked log is claimed");
        assert_eq!(store.mark_founder(1, &[1, 2, 3]).unwrap(), Founding::Other(3), "claimed: another node's mark is refused");
        assert!(!store.founder());
        assert_eq!(store.claim_founding(3).unwrap(), Founding::Marked { new: false }, "claimed again by the same node");
    }

    /// Node 2 asked for the mark, and may have formed its cluster right after, counting this
    /// log: node 1's mark does not replace its own within `MARK_HOLD` (this node would have
    /// refused node 2's votes, and node 2's cluster never elected a leader). Node 2 asking
    /// again shows it formed nothing: the mark goes to node 1 then. A node 2 that formed never
    /// asks again, and its first vote holds the log for it before the hold is over.
    #[test]
    fn a_lower_founder_does_not_take_a_mark_asked_for_just_now() {
        let secs = std::time::Duration::from_secs;
        let t0 = std::time::Instant::now();
        let dir = TempDir::new();
        let store = LogStore::open(&dir.0, LogStoreOptions::default()).unwrap();
        assert_eq!(store.mark_founder_at(2, &[2, 3, 4], t0).unwrap(), Founding::Marked { new: true });
        assert_eq!(store.mark_founder_at(1, &[1, 2, 3], t0 + secs(1)).unwrap(), Founding::Other(2), "node 2 may have formed");
        assert_eq!(store.mark_founder_at(2, &[2, 3, 4], t0 + secs(2)).unwrap(), Founding::Other(1), "node 2 asks again: it formed nothing");
        assert_eq!(store.mark_founder_at(1, &[1, 2, 3], t0 + secs(3)).unwrap(), Founding::Marked { new: false });
        assert_eq!(store.claim_founding(3).unwrap(), Founding::Other(1));
        drop(store);
        let store = LogStore::open(&dir.0, LogStoreOptions::default()).unwrap();
        assert_eq!(store.mark_founder_at(2, &[2, 3, 4], t0 + secs(4)).unwrap(), Founding::Other(1), "kept across a restart");
        drop(store);

        // Node 2 formed and asks no more: node 1 takes the mark once the hold is over...
        let dir = TempDir::new();
        let store = LogStore::open(&dir.0, LogStoreOptions::default()).unwrap();
        assert_eq!(store.mark_founder_at(2, &[2, 3, 4], t0).unwrap(), Founding::Marked { new: true });
        assert_eq!(store.mark_founder_at(1, &[1, 2, 3], t0 + secs(1)).unwrap(), Founding::Other(2));
        assert_eq!(store.mark_founder_at(1, &[1, 2, 3], t0 + MARK_HOLD).unwrap(), Founding::Marked { new: false });
        drop(store);
        // ...unless node 2's first vote came within it: the log is node 2's for good.
        let dir = TempDir::new();
        let store = LogStore::open(&dir.0, LogStoreOptions::default()).unwrap();
        assert_eq!(store.mark_founder_at(2, &[2, 3, 4], t0).unwrap(), Founding::Marked { new: true });
        assert_eq!(store.founder_vote(2, Some(0)).unwrap(), None);
        assert_eq!(store.mark_founder_at(1, &[1, 2, 3], t0 + MARK_HOLD + secs(1)).unwrap(), Founding::Other(2));
    }

    /// Two seeds that cannot see each other both plan a cluster with nodes 3 and 4: node 2's
    /// mark came first, node 1's replaced it. A marked empty log votes only for its founder (or
    /// a candidate holding a leader's entries), and once it voted keeps that founder's mark,
    /// across a restart too (the vote the log kept).
    #[tokio::test]
    async fn an_empty_marked_log_votes_only_for_its_founder_and_then_keeps_the_mark() {
        let dir = TempDir::new();
        let store = LogStore::open(&dir.0, LogStoreOptions::default()).unwrap();
        let t0 = std::time::Instant::now();
        assert_eq!(store.mark_founder_at(2, &[2, 3, 4], t0).unwrap(), Founding::Marked { new: true });
        assert_eq!(store.mark_founder_at(1, &[1, 3, 4], t0 + MARK_HOLD).unwrap(), Founding::Marked { new: false });
        assert_eq!(store.founder_vote(2, Some(0)).unwrap(), Some(1), "a rival founder, its log at its first entry");
        assert_eq!(store.founder_vote(2, None).unwrap(), Some(1));
        assert_eq!(store.founder_vote(5, Some(7)).unwrap(), None, "a candidate holding an elected leader's entries");
        assert_eq!(store.founder_vote(1, Some(0)).unwrap(), None, "its own founder");
        assert_eq!(store.mark_founder(1, &[1, 3, 4]).unwrap(), Founding::Marked { new: false }, "the founder it voted for");
        drop(store);

        // Node 2's mark, and a vote for node 2 let through: node 1's mark is refused from then on.
        fs::remove_dir_all(&dir.0).unwrap();
        let mut store = LogStore::open(&dir.0, LogStoreOptions::default()).unwrap();
        assert_eq!(store.mark_founder(2, &[2, 3, 4]).unwrap(), Founding::Marked { new: true });
        assert_eq!(store.founder_vote(2, Some(0)).unwrap(), None);
        assert_eq!(store.mark_founder(1, &[1, 3, 4]).unwrap(), Founding::Other(2), "it voted for node 2");
        store.save_vote(&Vote::new(1, 2)).await.unwrap();
        drop(store);
        let store = LogStore::open(&dir.0, LogStoreOptions::default()).unwrap();
        assert_eq!(store.mark_founder(1, &[1, 3, 4]).unwrap(), Founding::Other(2), "the kept vote stands for it after a restart");
        assert_eq!(store.mark_founder(2, &[2, 3, 4]).unwrap(), Founding::Marked { new: false });
        drop(store);

        // Unmarked (its data lost during formation): Raft's rules, but a vote it let through
        // keeps it all the same; a mark that names no founder too.
        fs::remove_dir_all(&dir.0).unwrap();
        let store = LogStore::open(&dir.0, LogStoreOptions::default()).unwrap();
        assert_eq!(store.founder_vote(2, None).unwrap(), None);
        assert_eq!(store.mark_founder(1, &[1, 3, 4]).unwrap(), Founding::Other(2), "it voted for node 2");
        drop(store);
        fs::remove_dir_all(&dir.0).unwrap();
        fs::create_dir_all(&dir.0).unwrap();
        fs::write(dir.0.join(FOUNDER_FILE), b"formed a cluster with nodes [1, 2, 3] while this log was empty\n").unwrap();
        let store = LogStore::open(&dir.0, LogStoreOptions::default()).unwrap();
        assert_eq!(store.founder_vote(2, Some(0)).unwrap(), None, "the first candidate");
        assert_eq!(store.founder_vote(1, Some(0)).unwrap(), Some(2), "then only that one");
    }

    #[tokio::test]
    async fn append_and_read_back() {
        let dir = TempDir::new();
        let mut store = LogStore::open(&dir.0, LogStoreOptions::default()).unwrap();
        append(&mut store, (1..=5).map(|i| ent(1, i)).collect()).await;
        assert_eq!(store.try_get_log_entries(2..4).await.unwrap(), vec![ent(1, 2), ent(1, 3)]);
        assert_eq!(store.try_get_log_entries(4..=9).await.unwrap().len(), 2);
        #[allow(clippy::reversed_empty_ranges)]
        let backwards = store.try_get_log_entries(4..2).await.unwrap();
        assert!(backwards.is_empty());
        let state = store.get_log_state().await.unwrap();
        assert_eq!((state.last_purged_log_id, state.last_log_id), (None, Some(log_id(1, 5))));
        assert!(store.disk_bytes() > 500);
    }

    #[tokio::test]
    async fn committed_hint_is_clamped_and_tolerates_damage() {
        let dir = TempDir::new();
        {
            let mut store = LogStore::open(&dir.0, small()).unwrap();
            append(&mut store, (1..=5).map(|i| ent(1, i)).collect()).await;
            store.save_committed(Some(log_id(1, 4))).await.unwrap();
        }
        let mut store = LogStore::open(&dir.0, small()).unwrap();
        assert_eq!(store.read_committed().await.unwrap(), Some(log_id(1, 4)));
        // A hint beyond the log (the entries were lost with the page cache) is dropped.
        store.save_committed(Some(log_id(1, 9))).await.unwrap();
        drop(store);
        let mut store = LogStore::open(&dir.0, small()).unwrap();
        assert_eq!(store.read_committed().await.unwrap(), None);
        drop(store);
        // A torn hint file reads as nothing, not as an error.
        fs::write(dir.0.join("committed"), [7u8, 0, 0]).unwrap();
        let mut store = LogStore::open(&dir.0, small()).unwrap();
        assert_eq!(store.read_committed().await.unwrap(), None);
        assert_eq!(ids(&mut store).await, run(1, 1..=5));
    }

    /// A vote being saved while its segment's sync stalls (a disk that stops: the flusher sits
    /// in its `fdatasync`) holds no lock that appends or `disk_bytes` take on the async
    /// runtime's thread. It held `io` across the sync, and a node with one worker thread froze
    /// whole (`/healthz` too) until the disk came back. Checked from a thread of their own with
    /// a time limit: blocked on the lock, they would hang rather than fail.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stalled_sync_while_a_vote_is_saved_leaves_appends_and_disk_bytes_free() {
        let dir = TempDir::new();
        let mut store = LogStore::open(&dir.0, LogStoreOptions { segment_bytes: 64 << 20, ..small() }).unwrap();
        append(&mut store, vec![ent(1, 1)]).await;
        let active = store.inner.io.lock().unwrap().active.clone();
        let stall = active.sync.lock().unwrap();
        let mut voter = store.clone();
        let saving = tokio::spawn(async move { voter.save_vote(&Vote::new(2, 1)).await });
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while store.inner.meta_writer.try_lock().is_ok() {
            assert!(std::time::Instant::now() < deadline, "the vote's save never began");
            std::thread::yield_now();
        }
        let (done, answered) = std::sync::mpsc::channel();
        let mut writer = store.clone();
        let (flushed, flush) = TypeConfig::oneshot();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let bytes = writer.disk_bytes();
            rt.block_on(writer.append(vec![ent(1, 2)], IOFlushed::signal(flushed))).unwrap();
            let _ = done.send(bytes);
        });
        let bytes = answered.recv_timeout(std::time::Duration::from_secs(5)).expect("append and disk_bytes do not wait for the stalled sync");
        assert!(bytes > 0);
        assert!(!saving.is_finished(), "the vote waits for its sync");
        drop(stall);
        saving.await.unwrap().expect("saved once the disk is back");
        flush.await.unwrap().expect("and the append flushed");
        assert_eq!(store.read_vote().await.unwrap(), Some(Vote::new(2, 1)));
        assert!(store.disk_bytes() > bytes);
    }

    /// An append that fills its segment rotates it on a blocking thread: the rotation syncs the
    /// segment it closes, and on a stalled disk (here: the segment's sync lock held, as a
    /// flusher inside its `fdatasync` holds it) that held the async runtime's one thread. Run
    /// on a thread of its own, which says when its runtime ran a timer past the stalled
    /// rotation: blocked, it would hang rather than fail.
    #[test]
    // The stall is the point: the test's own runtime must run on while the lock is held.
    #[allow(clippy::await_holding_lock)]
    fn a_rotation_on_a_stalled_disk_leaves_the_runtime_thread_free() {
        let dir = TempDir::new();
        let path = dir.0.clone();
        let (say, heard) = std::sync::mpsc::channel();
        let (release_tx, release) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let mut store = LogStore::open(&path, small()).unwrap();
                append(&mut store, vec![ent(1, 1)]).await;
                let active = store.inner.io.lock().unwrap().active.clone();
                let stall = active.sync.lock().unwrap();
                let mut writer = store.clone();
                let (flushed, flush) = TypeConfig::oneshot();
                let appending = tokio::spawn(async move { writer.append((2..=12).map(|i| ent(1, i)).collect::<Vec<_>>(), IOFlushed::signal(flushed)).await });
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                say.send(appending.is_finished()).unwrap();
                release.recv_timeout(std::time::Duration::from_secs(10)).unwrap();
                drop(stall);
                appending.await.unwrap().expect("rotated once the disk is back");
                flush.await.unwrap().expect("and flushed");
                assert_eq!(ids(&mut store).await, run(1, 1..=12));
            });
        });
        let finished = heard.recv_timeout(std::time::Duration::from_secs(5)).expect("the runtime's thread ran on past the stalled rotation");
        assert!(!finished, "the append waits for its rotation");
        release_tx.send(()).unwrap();
        thread.join().unwrap();
    }

    #[tokio::test]
    async fn reopen_preserves_entries_vote_committed_purge() {
        let dir = TempDir::new();
        let vote = Vote::new(3, 2);
        {
            let mut store = LogStore::open(&dir.0, small()).unwrap();
            append(&mut store, (1..=20).map(|i| ent(1, i)).collect()).await;
            store.save_vote(&vote).await.unwrap();
            store.save_committed(Some(log_id(1, 15))).await.unwrap();
            store.purge(log_id(1, 4)).await.unwrap();
        }
        let mut store = LogStore::open(&dir.0, small()).unwrap();
        assert_eq!(store.read_vote().await.unwrap(), Some(vote));
        assert_eq!(store.read_committed().await.unwrap(), Some(log_id(1, 15)));
        let state = store.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id, Some(log_id(1, 4)));
        assert_eq!(state.last_log_id, Some(log_id(1, 20)));
        assert_eq!(ids(&mut store).await, run(1, 5..=20));
        assert_eq!(store.try_get_log_entries(10..11).await.unwrap(), vec![ent(1, 10)]);
    }

    #[tokio::test]
    async fn truncate_after_is_durable() {
        let dir = TempDir::new();
        let opts = LogStoreOptions::default;
        {
            let mut store = LogStore::open(&dir.0, opts()).unwrap();
            append(&mut store, (1..=10).map(|i| ent(1, i)).collect()).await;
            store.truncate_after(Some(log_id(1, 6))).await.unwrap();
            assert_eq!(store.get_log_state().await.unwrap().last_log_id, Some(log_id(1, 6)));
            append(&mut store, vec![ent(2, 7), ent(2, 8)]).await;
        }
        let mut store = LogStore::open(&dir.0, opts()).unwrap();
        assert_eq!(ids(&mut store).await, [run(1, 1..=6), run(2, 7..=8)].concat());
        store.truncate_after(None).await.unwrap();
        drop(store);
        let mut store = LogStore::open(&dir.0, opts()).unwrap();
        assert_eq!(ids(&mut store).await, vec![]);
        assert_eq!(store.get_log_state().await.unwrap().last_log_id, None);
    }

    #[tokio::test]
    async fn purge_deletes_old_segments_and_survives_reopen() {
        let dir = TempDir::new();
        let mut store = LogStore::open(&dir.0, small()).unwrap();
        for i in 1..=60 {
            append(&mut store, vec![ent(1, i)]).await;
        }
        let before = (segments(&dir.0).len(), store.disk_bytes());
        store.purge(log_id(1, 50)).await.unwrap();
        store.reaped().await;
        let after = (segments(&dir.0).len(), store.disk_bytes());
        assert!(before.0 >= 10 && after.0 <= 3 && after.1 < before.1 / 3, "{before:?} {after:?}");
        let on_disk: u64 = segments(&dir.0).iter().map(|p| records_end(p)).sum();
        assert_eq!(on_disk, store.disk_bytes());
        drop(store);
        let mut store = LogStore::open(&dir.0, small()).unwrap();
        assert_eq!(ids(&mut store).await, run(1, 51..=60));
        // Purging past the tip (as after a snapshot install) empties the log, which goes on after it.
        store.purge(log_id(2, 70)).await.unwrap();
        assert_eq!(store.get_log_state().await.unwrap().last_log_id, Some(log_id(2, 70)));
        assert_eq!(append_and_reopen(store, &dir.0, small(), ent(2, 71)).await, vec![(2, 71)]);
    }

    /// The segment holding a Truncate record falls wholly below the purge point while an older
    /// segment still holds the stale entries it removed: only a prefix of segments may go.
    #[tokio::test]
    async fn purge_keeps_truncate_records_that_hide_stale_entries() {
        let dir = TempDir::new();
        let names = |d: &Path| -> Vec<u64> {
            segments(d).iter().filter_map(|p| parse_seg_name(p.file_name()?.to_str()?)).collect()
        };
        let mut store = LogStore::open(&dir.0, small()).unwrap();
        for i in 1..=18 {
            append(&mut store, vec![ent(1, i)]).await;
        }
        assert_eq!(names(&dir.0), vec![0, 7, 13, 19], "the test assumes 6 entries a segment");
        store.truncate_after(Some(log_id(1, 5))).await.unwrap();
        for i in 6..=11 {
            append(&mut store, vec![ent(2, i)]).await;
        }
        // Rotated before index 12, but named 20 so that name order stays write order.
        assert_eq!(names(&dir.0), vec![0, 7, 13, 19, 20]);
        store.purge(log_id(2, 11)).await.unwrap();
        assert_eq!(append_and_reopen(store, &dir.0, small(), ent(2, 12)).await, vec![(2, 12)]);
    }

    #[tokio::test]
    async fn torn_or_corrupt_tail_is_cut_back() {
        let chop = |p: &Path| {
            let f = OpenOptions::new().write(true).open(p).unwrap();
            f.set_len(f.metadata().unwrap().len() - 7).unwrap();
        };
        let garbage = |bytes: Vec<u8>| {
            move |p: &Path| OpenOptions::new().append(true).open(p).unwrap().write_all(&bytes).unwrap()
        };
        let flip_last_byte = |p: &Path| {
            let mut data = fs::read(p).unwrap();
            *data.last_mut().unwrap() ^= 0x55; // payload byte: crc mismatch
            fs::write(p, data).unwrap();
        };
        type Damage = Box<dyn Fn(&Path)>;
        let cases: Vec<(u64, Damage)> = vec![
            (5, Box::new(chop)),
            (6, Box::new(garbage(vec![0; 3]))),
            (6, Box::new(garbage(vec![0; 4096]))),  // zero-filled, as after a crash
            (6, Box::new(garbage(vec![0xff; 40]))), // length beyond the cap
            (6, Box::new(garbage([&[50, 0, 0, 0, 1, 2, 3, 4][..], &[9; 20]].concat()))), // short
            (5, Box::new(flip_last_byte)),
        ];
        for (keep, damage) in cases {
            let dir = TempDir::new();
            {
                let mut store = LogStore::open(&dir.0, LogStoreOptions::default()).unwrap();
                append(&mut store, (1..=5).map(|i| ent(1, i)).collect()).await;
                append(&mut store, vec![ent(1, 6)]).await;
            }
            let last = segments(&dir.0).pop().unwrap();
            cut_zero_fill(&last);
            let whole = fs::metadata(&last).unwrap().len();
            damage(&last);
            let mut store = LogStore::open(&dir.0, LogStoreOptions::default()).unwrap();
            assert_eq!(ids(&mut store).await, run(1, 1..=keep));
            // Cut back to the last whole record (a zero tail may stay: it reads as zero-fill).
            assert!(records_end(&last) <= whole);
            assert_eq!(append_and_reopen(store, &dir.0, LogStoreOptions::default(), ent(2, keep + 1)).await, [run(1, 1..=keep), vec![(2, keep + 1)]].concat());
        }
    }

    /// Damage inside the last segment's records that no power cut can leave (no sector of the
    /// damaged frame reads as zeros, and a whole frame follows it) refuses the open: the frames
    /// after it may be acknowledged. A damaged frame with a sector of zeros is a torn write, cut
    /// as before, also with whole frames after it (a disk may persist a write's sectors out of
    /// order, and nothing of an unfinished group commit was acknowledged).
    #[tokio::test]
    async fn damage_before_whole_records_refuses_the_open_and_a_torn_frame_is_cut() {
        let big = |index: u64| {
            let (store, key, value) = ("s".into(), format!("k{index}"), vec![7; 3000]);
            Entry::new_normal(log_id(1, index), Command::Put { store, key, value, if_revision: None, tag: None })
        };
        type Damage = Box<dyn Fn(&mut Vec<u8>, usize)>;
        let cases: Vec<(&str, Damage, Option<u64>)> = vec![
            // A payload byte of entry 3: refused.
            ("rot", Box::new(|d: &mut Vec<u8>, at: usize| d[at + HEADER + 1000] ^= 0x55), None),
            // A whole sector inside entry 3 left as zeros: torn, cut back to entry 2.
            ("torn", Box::new(|d: &mut Vec<u8>, at: usize| {
                let from = (at / SECTOR + 2) * SECTOR;
                d[from..from + SECTOR].fill(0);
            }), Some(2)),
            // Entry 3's length damaged too: no evidence of records past it, cut as torn.
            ("length", Box::new(|d: &mut Vec<u8>, at: usize| d[at + 1] ^= 0x01), Some(2)),
        ];
        for (what, damage, keep) in cases {
            let dir = TempDir::new();
            {
                let mut store = LogStore::open(&dir.0, LogStoreOptions::default()).unwrap();
                for i in 1..=5 {
                    append(&mut store, vec![big(i)]).await;
                }
            }
            let last = segments(&dir.0).pop().unwrap();
            let third = frames(&last).0[2];
            let mut data = fs::read(&last).unwrap();
            damage(&mut data, third);
            fs::write(&last, data).unwrap();
            match (keep, LogStore::open(&dir.0, LogStoreOptions::default())) {
                (None, Err(e)) => {
                    assert_eq!(e.kind(), ErrorKind::InvalidData, "{what}");
                    assert!(e.to_string().contains(&format!("at offset {third}")), "{what}: {e}");
                    assert!(e.to_string().contains("Move the data dir aside"), "{what}: {e}");
                    // Refused again, not cut by the first attempt.
                    assert!(LogStore::open(&dir.0, LogStoreOptions::default()).is_err(), "{what}");
                }
                (Some(keep), Ok(mut store)) => {
                    assert_eq!(ids(&mut store).await, run(1, 1..=keep), "{what}");
                    // A length out of range is no torn write: what was cut may have been acked.
                    assert_eq!(store.cut_damage(), what == "length", "{what}");
                }
                (keep, opened) => panic!("{what}: expected {keep:?}, got {:?}", opened.map(|_| ())),
            }
        }
    }

    /// The last record damaged where no power cut can leave it (no sector of it reads as zeros)
    /// is cut, as there is no record after it to show it was synced; but it may have been, and
    /// acknowledged: the store says so (`cut_damage`, the node then withholds its vote until a
    /// leader brings it up), and keeps the bytes beside the segment. A torn last record is cut
    /// and says nothing.
    #[tokio::test]
    async fn a_damaged_last_record_is_cut_and_said_so_and_a_torn_one_is_only_cut() {
        let big = |index: u64| {
            let (store, key, value) = ("s".into(), format!("k{index}"), vec![7; 3000]);
            Entry::new_normal(log_id(1, index), Command::Put { store, key, value, if_revision: None, tag: None })
        };
        for (what, damaged) in [("rot", true), ("torn", false), ("header", false)] {
            let dir = TempDir::new();
            {
                let mut store = LogStore::open(&dir.0, LogStoreOptions::default()).unwrap();
                for i in 1..=5 {
                    append(&mut store, vec![big(i)]).await;
                }
                assert!(!store.cut_damage());
            }
            let last = segments(&dir.0).pop().unwrap();
            let fifth = frames(&last).0[4];
            let mut data = fs::read(&last).unwrap();
            match what {
                "rot" => data[fifth + HEADER + 1000] ^= 0x55,
                // The sector of its header did not reach the disk, later ones did.
                "header" => data[fifth..fifth + HEADER].fill(0),
                _ => {
                    let from = (fifth / SECTOR + 2) * SECTOR;
                    data[from..from + SECTOR].fill(0);
                }
            }
            fs::write(&last, data).unwrap();
            let mut store = LogStore::open(&dir.0, LogStoreOptions::default()).unwrap();
            assert_eq!(ids(&mut store).await, run(1, 1..=4), "{what}");
            assert_eq!(store.cut_damage(), damaged, "{what}");
            assert_eq!(last.with_extension("cut").exists(), damaged, "{what}: the cut bytes kept aside");
            drop(store);
            // Still said after a restart, until a leader has brought the node up.
            let store = LogStore::open(&dir.0, LogStoreOptions::default()).unwrap();
            assert_eq!(store.cut_damage(), damaged, "{what}: after a restart");
            store.clear_cut_damage().unwrap();
            assert!(!store.cut_damage());
            drop(store);
            assert!(!LogStore::open(&dir.0, LogStoreOptions::default()).unwrap().cut_damage(), "{what}: cleared for good");
        }
    }

    /// A store's phase moves where it zero-fills: peers holding the same log do not all fill
    /// (and pause their group commits) at the same offset. Node ids spread over the step.
    #[test]
    fn the_grow_phase_moves_where_a_segment_is_zero_filled() {
        let dir = TempDir::new();
        fs::create_dir_all(&dir.0).unwrap();
        let zeros = vec![0u8; GROW_STEP as usize];
        // Records end 0.9 MiB into a segment zero-filled to 2 MiB: 1.1 MiB of zeros are left.
        let (written, allocated) = (GROW_STEP * 9 / 10, 2 * GROW_STEP);
        let seg = |name: &str| {
            let path = dir.0.join(name);
            let file = OpenOptions::new().create(true).truncate(false).read(true).write(true).open(&path).unwrap();
            file.set_len(allocated).unwrap();
            SegFile::new(path, file, 1, None, written, allocated)
        };
        let (plain, shifted) = (seg("plain"), seg("shifted"));
        assert!(!plain.grow(u64::MAX, 0, &zeros).unwrap(), "more than a step of zeros left: no fill yet");
        assert!(shifted.grow(u64::MAX, GROW_STEP / 2, &zeros).unwrap(), "half a step earlier: filled now");
        assert_eq!(shifted.allocated.load(Ordering::SeqCst), allocated + GROW_STEP);
        assert_eq!(fs::metadata(&shifted.path).unwrap().len(), allocated + GROW_STEP);
        // Filled far enough ahead for its phase: no second fill until the records move on.
        assert!(!shifted.grow(u64::MAX, GROW_STEP / 2, &zeros).unwrap());

        // Ids 1..=5 lie at least a tenth of a step apart (round the step), 1..=3 a fifth.
        let phases: Vec<u64> = (1..=5).map(LogStoreOptions::grow_phase_for).collect();
        assert!(phases.iter().all(|p| *p < GROW_STEP), "{phases:?}");
        let closest = |ps: &[u64]| {
            let pairs = ps.iter().enumerate().flat_map(|(i, a)| ps[..i].iter().map(move |b| a.abs_diff(*b)));
            pairs.map(|d| d.min(GROW_STEP - d)).min().unwrap_or(GROW_STEP)
        };
        assert!(closest(&phases) >= GROW_STEP / 10, "ids 1..=5 fill too close together: {phases:?}");
        assert!(closest(&phases[..3]) >= GROW_STEP / 5, "ids 1..=3 fill too close together: {phases:?}");
    }

    /// The phase reaches the flusher: a store opened with one keeps more zeros ahead of its
    /// records than any store without one can (at most `GROW_AHEAD`).
    #[tokio::test]
    async fn a_store_zero_fills_ahead_by_its_phase() {
        let dir = TempDir::new();
        // The largest phase: a fill is due whenever fewer than `GROW_AHEAD` bytes of zeros (less
        // one) are left, so the third round fills a third step, which no phase 0 ever does.
        let opts = LogStoreOptions { segment_bytes: 64 << 20, sync: true, power_loss_test: false, grow_phase: GROW_STEP - 1 };
        let mut store = LogStore::open(&dir.0, opts).unwrap();
        // One flusher round per append, one fill at most per round.
        for i in 1..=4 {
            append(&mut store, vec![ent(1, i)]).await;
        }
        let last = segments(&dir.0).pop().unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while fs::metadata(&last).unwrap().len() <= records_end(&last) + GROW_AHEAD {
            assert!(std::time::Instant::now() < deadline, "never more than GROW_AHEAD of zeros: the phase was not applied ({} of {})", fs::metadata(&last).unwrap().len(), records_end(&last));
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    /// The flusher zero-fills the active segment ahead of the records; a reopen stops at the
    /// zeros without cutting them, appends over them, and rotation leaves no zeros behind.
    #[tokio::test]
    async fn zero_fill_ahead_is_kept_appended_over_and_cut_at_rotation() {
        let dir = TempDir::new();
        let opts = || LogStoreOptions { segment_bytes: 4 << 20, sync: true, power_loss_test: false, grow_phase: 0 };
        let mut store = LogStore::open(&dir.0, opts()).unwrap();
        append(&mut store, (1..=5).map(|i| ent(1, i)).collect()).await;
        let last = segments(&dir.0).pop().unwrap();
        let records = records_end(&last);
        // The zero-fill follows the group commit on the flusher thread: wait for it (bounded).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while fs::metadata(&last).unwrap().len() < records + GROW_STEP {
            assert!(std::time::Instant::now() < deadline, "no zero-fill after 10 s");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        append(&mut store, vec![ent(1, 6)]).await;
        drop(store);
        let filled = fs::metadata(&last).unwrap().len();
        assert!(filled > records_end(&last), "zeros follow the records");
        let mut store = LogStore::open(&dir.0, opts()).unwrap();
        assert_eq!(ids(&mut store).await, run(1, 1..=6));
        assert_eq!(fs::metadata(&last).unwrap().len(), filled, "a zero tail is not a torn tail: kept");
        assert_eq!(append_and_reopen(store, &dir.0, opts(), ent(2, 7)).await, [run(1, 1..=6), vec![(2, 7)]].concat());

        // A torn last record with zero-fill behind it is torn, not zero-fill: cut back to the
        // record before it, and the next append goes there.
        let end = records_end(&last);
        assert!(fs::metadata(&last).unwrap().len() > end, "zero-fill behind the last record");
        let f = OpenOptions::new().read(true).write(true).open(&last).unwrap();
        let mut byte = [0u8; 1];
        f.read_exact_at(&mut byte, end - 1).unwrap();
        f.write_all_at(&[byte[0] ^ 0x55], end - 1).unwrap();
        drop(f);
        let mut store = LogStore::open(&dir.0, opts()).unwrap();
        assert_eq!(ids(&mut store).await, run(1, 1..=6), "the damaged entry 7 is dropped");
        assert!(records_end(&last) < end);
        assert_eq!(append_and_reopen(store, &dir.0, opts(), ent(3, 7)).await, [run(1, 1..=6), vec![(3, 7)]].concat());

        // Rotation cuts the closed segment back to its records; replay of closed segments
        // stays strict.
        let dir = TempDir::new();
        let mut store = LogStore::open(&dir.0, small()).unwrap();
        for i in 1..=30 {
            append(&mut store, vec![ent(1, i)]).await;
        }
        drop(store);
        let mut segs = segments(&dir.0);
        segs.pop();
        assert!(segs.len() >= 3);
        for seg in segs {
            assert_eq!(fs::metadata(&seg).unwrap().len(), records_end(&seg), "{}", seg.display());
        }
        let mut store = LogStore::open(&dir.0, small()).unwrap();
        assert_eq!(ids(&mut store).await, run(1, 1..=30));
    }

    /// Power-loss mode: bytes that reached the segment files but no fsync (written here behind
    /// the store's back, as a write the flusher had not synced yet would be) vanish on reopen,
    /// as does a newer segment; synced entries stay. Without the mode the same bytes replay.
    #[tokio::test]
    async fn power_loss_mode_drops_unsynced_bytes_only() {
        let power = || LogStoreOptions { segment_bytes: 1000, sync: true, power_loss_test: true, grow_phase: 0 };
        let unsynced = |dir: &Path| {
            let last = segments(dir).pop().unwrap();
            let name = parse_seg_name(last.file_name().unwrap().to_str().unwrap()).unwrap();
            let mut buf = Vec::new();
            encode(&mut buf, &Record::Entry(&ent(1, 9))).unwrap();
            // Where the store's next append would land: over the zero-fill.
            OpenOptions::new().write(true).open(&last).unwrap().write_all_at(&buf, records_end(&last)).unwrap();
            let mut newer = Vec::new();
            encode(&mut newer, &Record::Entry(&ent(1, 10))).unwrap();
            fs::write(seg_path(dir, name + 100), newer).unwrap();
        };
        let dir = TempDir::new();
        {
            let mut store = LogStore::open(&dir.0, power()).unwrap();
            append(&mut store, (1..=8).map(|i| ent(1, i)).collect()).await;
            store.save_committed(Some(log_id(1, 8))).await.unwrap();
        }
        assert!(dir.0.join(SYNCED_FILE).exists());
        unsynced(&dir.0);
        let mut store = LogStore::open(&dir.0, power()).unwrap();
        assert_eq!(ids(&mut store).await, run(1, 1..=8), "unsynced entries 9 and 10 are gone");
        assert_eq!(store.read_committed().await.unwrap(), None, "the unsynced hint is gone");
        // The store goes on normally after the cut, and its synced appends survive the next one.
        assert_eq!(append_and_reopen(store, &dir.0, power(), ent(2, 9)).await, [run(1, 1..=8), vec![(2, 9)]].concat());

        // Control: the same unsynced bytes without the mode are replayed.
        let dir = TempDir::new();
        {
            let mut store = LogStore::open(&dir.0, small()).unwrap();
            append(&mut store, (1..=8).map(|i| ent(1, i)).collect()).await;
        }
        unsynced(&dir.0);
        let mut store = LogStore::open(&dir.0, small()).unwrap();
        assert_eq!(ids(&mut store).await, run(1, 1..=10));
    }

    /// Power-loss mode with zero-fill: an unsynced record written over synced zero-fill turns
    /// back into zeros (the file keeps its synced length), and replay ends at them.
    #[tokio::test]
    async fn power_loss_mode_turns_unsynced_records_over_zero_fill_back_into_zeros() {
        let power = || LogStoreOptions { segment_bytes: 4 << 20, sync: true, power_loss_test: true, grow_phase: 0 };
        let dir = TempDir::new();
        let mut store = LogStore::open(&dir.0, power()).unwrap();
        append(&mut store, (1..=5).map(|i| ent(1, i)).collect()).await;
        let last = segments(&dir.0).pop().unwrap();
        // Wait (bounded) until the flusher's zero-fill is synced and recorded.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let rec = read_synced_record(&dir.0.join(SYNCED_FILE)).unwrap();
            if rec.is_some_and(|(_, len, alloc)| alloc >= len + GROW_STEP) {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "no synced zero-fill after 10 s: {rec:?}");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        drop(store);
        let (filled, end) = (fs::metadata(&last).unwrap().len(), records_end(&last));
        let mut buf = Vec::new();
        encode(&mut buf, &Record::Entry(&ent(1, 6))).unwrap();
        OpenOptions::new().write(true).open(&last).unwrap().write_all_at(&buf, end).unwrap();
        assert_eq!(records_end(&last), end + buf.len() as u64, "entry 6 is on the page cache");
        let mut store = LogStore::open(&dir.0, power()).unwrap();
        assert_eq!(ids(&mut store).await, run(1, 1..=5), "the unsynced entry 6 is gone");
        assert_eq!(fs::metadata(&last).unwrap().len(), filled, "the synced zero-fill stays");
        assert_eq!(records_end(&last), end);
        assert_eq!(append_and_reopen(store, &dir.0, power(), ent(2, 6)).await, [run(1, 1..=5), vec![(2, 6)]].concat());
    }

    #[tokio::test]
    async fn corrupt_older_segment_or_lost_segment_is_an_error() {
        let dir = TempDir::new();
        {
            let mut store = LogStore::open(&dir.0, small()).unwrap();
            for i in 1..=30 {
                append(&mut store, vec![ent(1, i)]).await;
            }
        }
        let first = segments(&dir.0).remove(0);
        let mut data = fs::read(&first).unwrap();
        data[HEADER + 3] ^= 1;
        fs::write(&first, data).unwrap();
        let err = LogStore::open(&dir.0, small()).err().unwrap();
        assert_eq!(err.kind(), ErrorKind::InvalidData);
        assert!(err.to_string().contains(&first.display().to_string()), "{err}");
        // A lost segment file leaves a hole: refused too.
        fs::remove_file(&first).unwrap();
        fs::remove_file(segments(&dir.0).remove(1)).unwrap();
        let err = LogStore::open(&dir.0, small()).err().unwrap();
        assert_eq!(err.kind(), ErrorKind::InvalidData);
        assert!(err.to_string().contains("broken at"), "{err}");
    }

    #[tokio::test]
    async fn group_commit_completes_every_callback() {
        let dir = TempDir::new();
        let opts = LogStoreOptions { segment_bytes: 20_000, sync: true, power_loss_test: false, grow_phase: 0 };
        let mut store = LogStore::open(&dir.0, opts).unwrap();
        let mut pending = Vec::new();
        for i in 1..=500 {
            let (tx, rx) = TypeConfig::oneshot();
            store.append(vec![ent(1, i)], IOFlushed::signal(tx)).await.unwrap();
            // Readable as soon as append returns, flushed or not.
            assert_eq!(store.try_get_log_entries(i..=i).await.unwrap().len(), 1);
            pending.push(rx);
        }
        for rx in pending {
            rx.await.unwrap().unwrap();
        }
        assert!(segments(&dir.0).len() > 2);
        drop(store);
        let mut store = LogStore::open(&dir.0, LogStoreOptions::default()).unwrap();
        assert_eq!(ids(&mut store).await, run(1, 1..=500));
    }

    /// A minimal in-memory state machine, only so that openraft's storage suite can run:
    /// (last applied, membership, current snapshot).
    #[derive(Clone, Default)]
    struct MemSm(Arc<Mutex<SmState>>);
    type SmState = (Option<LogId>, StoredMembershipT, Option<Snapshot>);

    impl RaftSnapshotBuilder<TypeConfig> for MemSm {
        type SnapshotData = Vec<u8>;
        async fn build_snapshot(&mut self) -> Result<Snapshot, io::Error> {
            let mut s = self.0.lock().unwrap();
            let meta = SnapshotMeta { last_log_id: s.0, last_membership: s.1.clone() };
            s.2 = Some(Snapshot { meta: meta.clone(), snapshot: Vec::new() });
            Ok(Snapshot { meta, snapshot: Vec::new() })
        }
    }

    impl RaftStateMachine<TypeConfig> for MemSm {
        type SnapshotData = Vec<u8>;
        type SnapshotBuilder = MemSm;
        async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembershipT), io::Error> {
            let s = self.0.lock().unwrap();
            Ok((s.0, s.1.clone()))
        }
        async fn apply<S>(&mut self, mut entries: S) -> Result<(), io::Error>
        where
            S: futures_util::Stream<Item = Result<EntryResponder, io::Error>> + Unpin + OptionalSend,
        {
            while let Some((entry, responder)) = entries.next().await.transpose()? {
                let mut s = self.0.lock().unwrap();
                if let Some(m) = entry.get_membership() {
                    s.1 = StoredMembershipT::new(Some(entry.log_id), m);
                }
                s.0 = Some(entry.log_id);
                if let Some(r) = responder {
                    r.send(CommandResult::None);
                }
            }
            Ok(())
        }
        async fn get_snapshot_builder(&mut self) -> MemSm {
            self.clone()
        }
        async fn install_snapshot(&mut self, meta: &SnapshotMeta, snapshot: Vec<u8>) -> Result<(), io::Error> {
            let snap = Some(Snapshot { meta: meta.clone(), snapshot });
            *self.0.lock().unwrap() = (meta.last_log_id, meta.last_membership.clone(), snap);
            Ok(())
        }
        async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, io::Error> {
            Ok(self.0.lock().unwrap().2.clone())
        }
    }

    struct Builder;

    impl StoreBuilder<TypeConfig, LogStore, MemSm, TempDir> for Builder {
        async fn build(&self) -> Result<(TempDir, LogStore, MemSm), StorageError<TypeConfig>> {
            let dir = TempDir::new();
            let store =
                LogStore::open(&dir.0, small()).map_err(|e| StorageError::read(TypeConfig::err_from_error(&e)))?;
            Ok((dir, store, MemSm::default()))
        }
    }

    /// openraft's own conformance suite for log storage.
    #[tokio::test]
    async fn openraft_storage_suite() {
        Suite::test_all(Builder).await.unwrap();
    }
}

//! The durable Raft log: segmented append-only files with group commit.
//!
//! Crash safety is the product's promise, so this module is built to be easy to reason about:
//!
//! * **Append-only segment files** (`log-<20-digit index>.seg`). Nothing is ever overwritten in
//!   place, so a crash can only damage the unsynced tail of the newest file. Truncating the log is
//!   itself an appended `Truncate` record, and purging deletes whole old files, which keeps disk
//!   use bounded without rewriting anything. A segment is named after the index that came next
//!   when it was created; after a truncation below the active segment's name the next name is
//!   bumped to `active + 1`, so **name order is always write order**, which replay relies on.
//! * **Every record is framed** `[u32 LE len][u32 LE crc32(payload)][payload]`, the payload being
//!   bincode of [`Record`]. On open each record is checked; a torn or corrupt record at the tail of
//!   the last segment (the only place a crash can tear, see below) ends replay and the file is cut
//!   back to the last whole record: nothing is half-applied. We cannot tell a torn tail from media
//!   rot in that last file, and treat both as torn (as etcd's WAL does), logging what is dropped;
//!   records there were acknowledged only if synced, and a synced record is not torn by a crash. A
//!   bad record in any *other* segment cannot come from a crash (a segment is fsynced before the
//!   next one is created), so it is reported as `InvalidData`, never skipped.
//! * **Group commit on a dedicated flusher thread.** `append` writes the bytes (page cache),
//!   publishes the entries in memory and queues its `IOFlushed` callback with the file it wrote
//!   to; it never waits for the disk. The flusher takes *every* queued callback, `fdatasync`s the
//!   files they name, then completes them: many appends share one fsync, and a callback never fires
//!   before its bytes are synced. After a failed fsync the store is marked failed for good (a later
//!   fsync may "succeed" without the lost pages): callbacks complete with errors and every write is
//!   refused until a restart replays the disk.
//! * **Vote, committed and last-purged** live in `meta`, replaced atomically (`meta.tmp`, fsync,
//!   rename, fsync dir) and framed like a record. Every meta write first syncs the active segment,
//!   so a durable vote/committed/purge is never ahead of log bytes written before it (openraft
//!   requires all write IO to be serialized, and treats a completed IO as covering earlier ones).
//! * **The live entries are kept in memory** (a `BTreeMap` from the purge point to the tip), so
//!   reads never touch the disk. Memory is bounded by the snapshot/purge policy: openraft purges
//!   entries once a snapshot covers them (`max_in_snapshot_log_to_keep`), and purge drops them here.
//!
//! Concurrency: openraft calls the writing methods one at a time; they serialize on `io` (lock
//! order: `io` then `mem`). Readers (replication tasks) only take `mem`, briefly. The flush channel's
//! `Sender` lives in `Io`; it is closed when the last `LogStore` clone is dropped (`Inner::drop`),
//! after which the flusher syncs and completes what is still queued, then exits and is joined.
//! A second process opening the same directory is not guarded against: the node's data-dir owns it.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::fs::{self, File, OpenOptions};
use std::io::{self, ErrorKind, Write};
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use openraft::OptionalSend;
use serde::{Deserialize, Serialize};

use crate::raft::types::{Entry, IOFlushed, LogId, LogState, RaftLogReader, RaftLogStorage, TypeConfig, Vote};

/// A record larger than this is refused on write and treated as corrupt on read.
const MAX_RECORD: usize = 64 << 20;
const HEADER: usize = 8;

/// Tuning knobs of a [`LogStore`].
#[derive(Debug, Clone)]
pub struct LogStoreOptions {
    /// Start a new segment once the active one exceeds this many bytes.
    pub segment_bytes: u64,
    /// fsync for durability. `false` only for benchmarks: acknowledged entries may then be lost.
    pub sync: bool,
}

impl Default for LogStoreOptions {
    fn default() -> Self {
        LogStoreOptions { segment_bytes: 64 << 20, sync: true }
    }
}

/// One log record. Written as `Record<&Entry>` (no clone), read as `Record<Entry>`: one
/// definition, so both have the same bincode layout. Never reorder the variants.
#[derive(Serialize, Deserialize)]
enum Record<E> {
    Entry(E),
    /// Removes every entry with index > `after` (all of them when `None`).
    Truncate { after: Option<u64> },
}

#[derive(Serialize, Deserialize, Default, Clone)]
struct Meta {
    vote: Option<Vote>,
    committed: Option<LogId>,
    last_purged: Option<LogId>,
}

/// The durable Raft log; cheap to clone (the log reader is a clone).
#[derive(Clone)]
pub struct LogStore {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    opts: LogStoreOptions,
    mem: Mutex<Mem>,
    io: Mutex<Io>,
    /// Set after any failed write or fsync, by the writer or the flusher; never cleared.
    failed: Arc<AtomicBool>,
    /// Joined in `Drop` after the flush channel is closed.
    flusher: Option<JoinHandle<()>>,
}

/// What readers see: the live entries and the last durable meta.
struct Mem {
    entries: BTreeMap<u64, Entry>,
    meta: Meta,
}

/// The writer's side, only touched by the (serialized) writing methods.
struct Io {
    active: Arc<SegFile>,
    active_name: u64,
    active_bytes: u64,
    /// Physical max entry index written to the active segment (purge uses it).
    active_max: Option<u64>,
    /// Closed (fully synced) segments by name.
    closed: BTreeMap<u64, SegInfo>,
    /// `None` only while `Inner` is being dropped (that closes the flusher's channel).
    flush_tx: Option<mpsc::Sender<Flush>>,
}

struct SegFile {
    path: PathBuf,
    file: File,
}

struct SegInfo {
    path: PathBuf,
    bytes: u64,
    max_index: Option<u64>,
}

/// A queued append: the callback and the file holding its bytes.
type Flush = (Arc<SegFile>, IOFlushed<TypeConfig>);

fn seg_path(dir: &Path, name: u64) -> PathBuf {
    dir.join(format!("log-{name:020}.seg"))
}

fn parse_seg_name(file_name: &str) -> Option<u64> {
    let digits = file_name.strip_prefix("log-")?.strip_suffix(".seg")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

fn lock<T>(m: &Mutex<T>) -> io::Result<MutexGuard<'_, T>> {
    m.lock().map_err(|_| io::Error::other("log store: lock poisoned by an earlier panic"))
}

fn fsync(f: &SegFile, sync: bool) -> io::Result<()> {
    if !sync {
        return Ok(());
    }
    f.file.sync_data().map_err(|e| io::Error::new(e.kind(), format!("fsync {}: {e}", f.path.display())))
}

fn fsync_dir(dir: &Path, sync: bool) -> io::Result<()> {
    if !sync {
        return Ok(());
    }
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io::Error::new(e.kind(), format!("fsync dir {}: {e}", dir.display())))
}

/// Appends one framed record to `buf`.
fn encode<T: Serialize>(buf: &mut Vec<u8>, value: &T) -> io::Result<()> {
    let start = buf.len();
    buf.extend_from_slice(&[0; HEADER]);
    if let Err(e) = bincode::serialize_into(&mut *buf, value) {
        buf.truncate(start);
        return Err(io::Error::new(ErrorKind::InvalidInput, format!("encode log record: {e}")));
    }
    let len = buf.len() - start - HEADER;
    if len > MAX_RECORD {
        buf.truncate(start);
        return Err(io::Error::new(ErrorKind::InvalidInput, format!("log record of {len} bytes exceeds {MAX_RECORD}")));
    }
    let crc = crc32fast::hash(&buf[start + HEADER..]);
    buf[start..start + 4].copy_from_slice(&(len as u32).to_le_bytes());
    buf[start + 4..start + HEADER].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

/// The payload of the frame at `pos` and the position after it, or why it is not a whole record.
fn next_frame(data: &[u8], pos: usize) -> Result<(&[u8], usize), String> {
    let rest = &data[pos..];
    let Some(&[l0, l1, l2, l3, c0, c1, c2, c3]) = rest.first_chunk::<HEADER>() else {
        return Err(format!("short header ({} bytes)", rest.len()));
    };
    let len = u32::from_le_bytes([l0, l1, l2, l3]) as usize;
    let crc = u32::from_le_bytes([c0, c1, c2, c3]);
    if len > MAX_RECORD {
        return Err(format!("length {len} over the {MAX_RECORD} cap"));
    }
    let Some(payload) = rest.get(HEADER..HEADER + len) else {
        return Err(format!("length {len} runs past the end of the file"));
    };
    if crc32fast::hash(payload) != crc {
        return Err("crc mismatch".to_string());
    }
    Ok((payload, pos + HEADER + len))
}

fn apply_truncate(entries: &mut BTreeMap<u64, Entry>, after: Option<u64>) {
    match after {
        None => entries.clear(),
        Some(after) => {
            if let Some(from) = after.checked_add(1) {
                entries.split_off(&from);
            }
        }
    }
}

fn read_meta(path: &Path) -> io::Result<Meta> {
    let data = match fs::read(path) {
        Ok(d) => d,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Meta::default()),
        Err(e) => return Err(io::Error::new(e.kind(), format!("read {}: {e}", path.display()))),
    };
    let bad = |why: String| io::Error::new(ErrorKind::InvalidData, format!("corrupt {}: {why}", path.display()));
    let (payload, _) = next_frame(&data, 0).map_err(bad)?;
    bincode::deserialize(payload).map_err(|e| bad(e.to_string()))
}

/// Replays one segment into `mem`. Returns (bytes kept, physical max entry index).
fn replay_segment(path: &Path, is_last: bool, sync: bool, mem: &mut Mem) -> io::Result<(u64, Option<u64>)> {
    let data = fs::read(path).map_err(|e| io::Error::new(e.kind(), format!("read {}: {e}", path.display())))?;
    let purged = mem.meta.last_purged.as_ref().map(|l| l.index);
    let (mut pos, mut max_index) = (0usize, None::<u64>);
    while pos < data.len() {
        let (payload, next) = match next_frame(&data, pos) {
            Ok(frame) => frame,
            Err(why) if is_last => {
                tracing::warn!(path = %path.display(), offset = pos, dropped = data.len() - pos, %why,
                    "torn log tail: truncating to the last whole record");
                let f = OpenOptions::new().write(true).open(path)?;
                f.set_len(pos as u64)?;
                if sync {
                    f.sync_all()?;
                }
                break;
            }
            Err(why) => {
                let msg = format!("corrupt log record in {} at offset {pos}: {why}", path.display());
                return Err(io::Error::new(ErrorKind::InvalidData, msg));
            }
        };
        // A record whose CRC matches but does not decode was not torn: it is from an
        // incompatible version or a bug, and must not be silently cut away.
        let record: Record<Entry> = bincode::deserialize(payload).map_err(|e| {
            let msg = format!("undecodable log record in {} at offset {pos}: {e}", path.display());
            io::Error::new(ErrorKind::InvalidData, msg)
        })?;
        match record {
            Record::Entry(entry) => {
                let index = entry.log_id.index;
                max_index = max_index.max(Some(index));
                if purged.is_none_or(|p| index > p) {
                    mem.entries.insert(index, entry);
                }
            }
            Record::Truncate { after } => apply_truncate(&mut mem.entries, after),
        }
        pos = next;
    }
    Ok((pos as u64, max_index))
}

/// The flusher thread: group commit. Exits when the channel closes and is drained.
fn flusher(rx: mpsc::Receiver<Flush>, sync: bool, failed: Arc<AtomicBool>) {
    while let Ok(first) = rx.recv() {
        // Everything queued before the sync starts shares it.
        let mut batch = vec![first];
        batch.extend(rx.try_iter());
        let mut files: Vec<&Arc<SegFile>> = Vec::new();
        for (f, _) in &batch {
            if !files.iter().any(|x| Arc::ptr_eq(x, f)) {
                files.push(f);
            }
        }
        let mut error = None;
        if failed.load(Ordering::SeqCst) {
            error = Some((ErrorKind::Other, "log store failed earlier; restart to recover".to_string()));
        } else if let Err(e) = files.iter().try_for_each(|f| fsync(f, sync)) {
            tracing::error!(error = %e, "log fsync failed; the log store refuses further writes");
            failed.store(true, Ordering::SeqCst);
            error = Some((e.kind(), e.to_string()));
        }
        for (_, callback) in batch {
            callback.io_completed(match &error {
                None => Ok(()),
                Some((kind, msg)) => Err(io::Error::new(*kind, msg.clone())),
            });
        }
    }
}

impl LogStore {
    /// Opens (creating if missing) the log in `dir` and replays it.
    pub fn open(dir: &Path, opts: LogStoreOptions) -> io::Result<LogStore> {
        let ctx = |what: &str, e: io::Error| io::Error::new(e.kind(), format!("{what} {}: {e}", dir.display()));
        fs::create_dir_all(dir).map_err(|e| ctx("create", e))?;
        match fs::remove_file(dir.join("meta.tmp")) {
            Err(e) if e.kind() != ErrorKind::NotFound => return Err(ctx("remove meta.tmp in", e)),
            _ => {}
        }
        let mut mem = Mem { entries: BTreeMap::new(), meta: read_meta(&dir.join("meta"))? };
        let mut names = Vec::new();
        for item in fs::read_dir(dir).map_err(|e| ctx("list", e))? {
            let item = item.map_err(|e| ctx("list", e))?;
            if let Some(name) = item.file_name().to_str().and_then(parse_seg_name) {
                names.push(name);
            }
        }
        names.sort_unstable();

        let mut closed = BTreeMap::new();
        for (i, &name) in names.iter().enumerate() {
            let path = seg_path(dir, name);
            let (bytes, max_index) = replay_segment(&path, i + 1 == names.len(), opts.sync, &mut mem)?;
            closed.insert(name, SegInfo { path, bytes, max_index });
        }
        // Openraft requires a log without holes.
        let mut keys = mem.entries.keys();
        if let Some(mut prev) = keys.next().copied() {
            for &k in keys {
                if k != prev + 1 {
                    let msg = format!("log in {} has a hole between {prev} and {k}", dir.display());
                    return Err(io::Error::new(ErrorKind::InvalidData, msg));
                }
                prev = k;
            }
        }

        let (active_name, active_bytes, active_max) = match closed.pop_last() {
            Some((name, info)) => (name, info.bytes, info.max_index),
            None => (next_index(&mem), 0, None),
        };
        let path = seg_path(dir, active_name);
        let file = OpenOptions::new().create(true).append(true).open(&path).map_err(|e| ctx("open segment in", e))?;
        fsync_dir(dir, opts.sync)?;
        tracing::info!(dir = %dir.display(), entries = mem.entries.len(), segments = closed.len() + 1, "raft log opened");

        let failed = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel();
        let (sync, flag) = (opts.sync, failed.clone());
        let flusher = std::thread::Builder::new()
            .name("raft-log-flush".into())
            .spawn(move || flusher(rx, sync, flag))
            .map_err(|e| ctx("spawn flusher for", e))?;
        let io = Io {
            active: Arc::new(SegFile { path, file }),
            active_name,
            active_bytes,
            active_max,
            closed,
            flush_tx: Some(tx),
        };
        let inner = Inner {
            dir: dir.to_path_buf(),
            opts,
            mem: Mutex::new(mem),
            io: Mutex::new(io),
            failed,
            flusher: Some(flusher),
        };
        Ok(LogStore { inner: Arc::new(inner) })
    }

    /// Total bytes of the segment files.
    pub fn disk_bytes(&self) -> u64 {
        let io = self.inner.io.lock().unwrap_or_else(|p| p.into_inner()); // read-only: poison is harmless
        io.active_bytes + io.closed.values().map(|s| s.bytes).sum::<u64>()
    }

    /// Runs a synchronous (fsyncing) write off the async runtime's worker threads.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner) -> io::Result<T> + Send + 'static,
    ) -> io::Result<T> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| io::Error::other(format!("log store task failed: {e}")))?
    }
}

/// Index the next appended entry will have.
fn next_index(mem: &Mem) -> u64 {
    match mem.entries.last_key_value() {
        Some((&k, _)) => k + 1,
        None => mem.meta.last_purged.as_ref().map_or(0, |l| l.index + 1),
    }
}

impl Inner {
    fn writable(&self) -> io::Result<()> {
        if self.failed.load(Ordering::SeqCst) {
            return Err(io::Error::other(format!("log store {} failed earlier; restart to recover", self.dir.display())));
        }
        Ok(())
    }

    /// Writes `buf` to the active segment. A failed write may leave a partial record, after which
    /// nothing may be appended behind it: the store is marked failed.
    fn write_active(&self, io: &mut Io, buf: &[u8]) -> io::Result<()> {
        if let Err(e) = (&io.active.file).write_all(buf) {
            self.failed.store(true, Ordering::SeqCst);
            return Err(io::Error::new(e.kind(), format!("write {}: {e}", io.active.path.display())));
        }
        io.active_bytes += buf.len() as u64;
        Ok(())
    }

    /// Syncs the full active segment and starts the next one. Syncing first means only the
    /// last segment can ever have a torn tail.
    fn rotate(&self, io: &mut Io, next: u64) -> io::Result<()> {
        fsync(&io.active, self.opts.sync)?;
        let name = next.max(io.active_name + 1);
        let path = seg_path(&self.dir, name);
        let file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)
            .map_err(|e| io::Error::new(e.kind(), format!("create {}: {e}", path.display())))?;
        fsync_dir(&self.dir, self.opts.sync)?;
        let old = std::mem::replace(&mut io.active, Arc::new(SegFile { path, file }));
        let info = SegInfo { path: old.path.clone(), bytes: io.active_bytes, max_index: io.active_max };
        io.closed.insert(io.active_name, info);
        (io.active_name, io.active_bytes, io.active_max) = (name, 0, None);
        Ok(())
    }

    /// Replaces `meta` atomically and durably, after syncing the log bytes written before it.
    fn write_meta(&self, io: &Io, meta: Meta) -> io::Result<()> {
        let sync = self.opts.sync;
        let ctx = |what: &str, p: &Path, e: io::Error| io::Error::new(e.kind(), format!("{what} {}: {e}", p.display()));
        let result = (|| {
            fsync(&io.active, sync)?;
            let mut buf = Vec::new();
            encode(&mut buf, &meta)?;
            let (tmp, path) = (self.dir.join("meta.tmp"), self.dir.join("meta"));
            let mut f = File::create(&tmp).map_err(|e| ctx("create", &tmp, e))?;
            f.write_all(&buf).map_err(|e| ctx("write", &tmp, e))?;
            if sync {
                f.sync_all().map_err(|e| ctx("fsync", &tmp, e))?;
            }
            fs::rename(&tmp, &path).map_err(|e| ctx("rename to", &path, e))?;
            fsync_dir(&self.dir, sync)
        })();
        if result.is_err() {
            self.failed.store(true, Ordering::SeqCst);
        }
        result?;
        lock(&self.mem)?.meta = meta;
        Ok(())
    }

    /// Applies `f` to the meta and persists it if `f` says it changed. Unchanged, it still syncs
    /// the active segment: returning means every earlier write is durable.
    fn update_meta(&self, f: impl FnOnce(&mut Meta) -> bool) -> io::Result<()> {
        self.writable()?;
        let io = lock(&self.io)?;
        let mut meta = lock(&self.mem)?.meta.clone();
        if f(&mut meta) {
            self.write_meta(&io, meta)
        } else {
            fsync(&io.active, self.opts.sync).inspect_err(|_| self.failed.store(true, Ordering::SeqCst))
        }
    }

    fn truncate_after(&self, after: Option<u64>) -> io::Result<()> {
        self.writable()?;
        let mut io = lock(&self.io)?;
        let mut buf = Vec::new();
        encode(&mut buf, &Record::<&Entry>::Truncate { after })?;
        self.write_active(&mut io, &buf)?;
        if let Err(e) = fsync(&io.active, self.opts.sync) {
            self.failed.store(true, Ordering::SeqCst);
            return Err(e);
        }
        apply_truncate(&mut lock(&self.mem)?.entries, after);
        Ok(())
    }

    fn purge(&self, log_id: LogId) -> io::Result<()> {
        self.writable()?;
        let mut io = lock(&self.io)?;
        let mut meta = lock(&self.mem)?.meta.clone();
        if meta.last_purged.as_ref().is_some_and(|p| p.index >= log_id.index) {
            return Ok(());
        }
        let upto = log_id.index;
        meta.last_purged = Some(log_id);
        self.write_meta(&io, meta)?; // durable first: replay ignores entries <= last_purged
        {
            let mut mem = lock(&self.mem)?;
            mem.entries = mem.entries.split_off(&upto.saturating_add(1));
        }
        // Delete only a *prefix* of the closed segments. A kept older segment may hold stale
        // entries that a Truncate record in a newer segment removes; deleting that newer segment
        // while keeping the older one could resurrect them.
        let mut deleted = false;
        while let Some(seg) = io.closed.first_entry() {
            if seg.get().max_index.is_some_and(|m| m > upto) {
                break;
            }
            match fs::remove_file(&seg.get().path) {
                Err(e) if e.kind() != ErrorKind::NotFound => {
                    return Err(io::Error::new(e.kind(), format!("remove {}: {e}", seg.get().path.display())));
                }
                _ => drop(seg.remove()),
            }
            deleted = true;
        }
        if deleted {
            fsync_dir(&self.dir, self.opts.sync)?;
        }
        Ok(())
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Close the flush channel, then wait for the flusher to complete what is queued.
        self.io.get_mut().unwrap_or_else(|poisoned| poisoned.into_inner()).flush_tx = None;
        if let Some(handle) = self.flusher.take() {
            if handle.join().is_err() {
                tracing::error!("raft log flusher thread panicked");
            }
        }
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        let start = match range.start_bound() {
            Bound::Included(&s) => s,
            Bound::Excluded(&s) => match s.checked_add(1) {
                Some(s) => s,
                None => return Ok(Vec::new()),
            },
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(&e) => e.checked_add(1),
            Bound::Excluded(&e) => Some(e),
            Bound::Unbounded => None,
        };
        let mem = lock(&self.inner.mem)?;
        Ok(match end {
            Some(end) if start >= end => Vec::new(),
            Some(end) => mem.entries.range(start..end).map(|(_, e)| e.clone()).collect(),
            None => mem.entries.range(start..).map(|(_, e)| e.clone()).collect(),
        })
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        Ok(lock(&self.inner.mem)?.meta.vote)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let mem = lock(&self.inner.mem)?;
        let last_purged_log_id = mem.meta.last_purged.clone();
        let last_log_id = mem.entries.last_key_value().map(|(_, e)| e.log_id.clone()).or(last_purged_log_id.clone());
        Ok(LogState { last_purged_log_id, last_log_id })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        let vote = vote.clone();
        self.blocking(move |inner| inner.update_meta(|m| m.vote.replace(vote.clone()) != Some(vote))).await
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), io::Error> {
        self.blocking(move |inner| {
            inner.update_meta(|m| std::mem::replace(&mut m.committed, committed.clone()) != committed)
        })
        .await
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, io::Error> {
        Ok(lock(&self.inner.mem)?.meta.committed.clone())
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<TypeConfig>) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let inner = &*self.inner;
        inner.writable()?;
        let mut io = lock(&inner.io)?;
        let (mut buf, mut batch) = (Vec::new(), Vec::new());
        for entry in entries {
            encode(&mut buf, &Record::Entry(&entry))
                .map_err(|e| io::Error::new(e.kind(), format!("log entry {}: {e}", entry.log_id.index)))?;
            batch.push(entry);
        }
        inner.write_active(&mut io, &buf)?;
        io.active_max = io.active_max.max(batch.iter().map(|e| e.log_id.index).max());
        let next = {
            let mut mem = lock(&inner.mem)?;
            mem.entries.extend(batch.into_iter().map(|e| (e.log_id.index, e)));
            next_index(&mem)
        };
        // Even an empty append goes through the flusher: its completion must imply that every
        // earlier append is durable.
        let item = (io.active.clone(), callback);
        let sent = match &io.flush_tx {
            Some(tx) => tx.send(item).map_err(|e| e.0),
            None => Err(item),
        };
        if let Err((_, callback)) = sent {
            inner.failed.store(true, Ordering::SeqCst);
            let err = || io::Error::other(format!("log flusher for {} is gone", inner.dir.display()));
            callback.io_completed(Err(err()));
            return Err(err());
        }
        if io.active_bytes > inner.opts.segment_bytes {
            if let Err(e) = inner.rotate(&mut io, next) {
                inner.failed.store(true, Ordering::SeqCst);
                return Err(e);
            }
        }
        Ok(())
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
    use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};
    use openraft::testing::log::{StoreBuilder, Suite};
    use openraft::type_config::TypeConfigExt;
    use openraft::vote::RaftLeaderIdExt;
    use openraft::{RaftTypeConfig, StorageError};

    use super::*;
    use crate::raft::types::{Command, CommandResult, RaftEntry, Snapshot, SnapshotMeta, StoredMembershipT};

    /// A directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> TempDir {
            static N: AtomicU64 = AtomicU64::new(0);
            let n = N.fetch_add(1, Ordering::SeqCst);
            let path = std::env::temp_dir().join(format!("raftbridge-logstore-{}-{n}", std::process::id()));
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
        let cmd = Command::Put { store: "s".into(), key: format!("k{index}"), value: vec![7; 100], if_revision: None };
        Entry::new_normal(log_id(term, index), cmd)
    }

    fn small() -> LogStoreOptions {
        LogStoreOptions { segment_bytes: 1000, sync: true }
    }

    async fn append(store: &mut LogStore, entries: Vec<Entry>) {
        let (tx, rx) = TypeConfig::oneshot();
        store.append(entries, IOFlushed::signal(tx)).await.unwrap();
        rx.await.unwrap().unwrap();
    }

    async fn indexes(store: &mut LogStore) -> Vec<(u64, u64)> {
        let entries = store.try_get_log_entries(..).await.unwrap();
        entries.iter().map(|e| (e.log_id.leader_id.term, e.log_id.index)).collect()
    }

    fn segments(dir: &Path) -> Vec<PathBuf> {
        let mut v: Vec<_> = fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|x| x == "seg")).collect();
        v.sort();
        v
    }

    #[tokio::test]
    async fn append_and_read_back() {
        let dir = TempDir::new();
        let mut store = LogStore::open(&dir.0, LogStoreOptions::default()).unwrap();
        append(&mut store, (1..=5).map(|i| ent(1, i)).collect()).await;
        let got = store.try_get_log_entries(2..4).await.unwrap();
        assert_eq!(got, vec![ent(1, 2), ent(1, 3)]);
        assert_eq!(store.try_get_log_entries(4..=9).await.unwrap().len(), 2);
        assert!(store.try_get_log_entries(4..2).await.unwrap().is_empty());
        let state = store.get_log_state().await.unwrap();
        assert_eq!((state.last_purged_log_id, state.last_log_id), (None, Some(log_id(1, 5))));
        assert!(store.disk_bytes() > 500);
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
        assert_eq!((state.last_purged_log_id, state.last_log_id), (Some(log_id(1, 4)), Some(log_id(1, 20))));
        assert_eq!(indexes(&mut store).await, (5..=20).map(|i| (1, i)).collect::<Vec<_>>());
        assert_eq!(store.try_get_log_entries(10..11).await.unwrap(), vec![ent(1, 10)]);
    }

    #[tokio::test]
    async fn truncate_after_is_durable() {
        let dir = TempDir::new();
        {
            let mut store = LogStore::open(&dir.0, LogStoreOptions::default()).unwrap();
            append(&mut store, (1..=10).map(|i| ent(1, i)).collect()).await;
            store.truncate_after(Some(log_id(1, 6))).await.unwrap();
            assert_eq!(store.get_log_state().await.unwrap().last_log_id, Some(log_id(1, 6)));
            append(&mut store, vec![ent(2, 7), ent(2, 8)]).await;
        }
        let mut store = LogStore::open(&dir.0, LogStoreOptions::default()).unwrap();
        let want: Vec<_> = (1..=6).map(|i| (1, i)).chain([(2, 7), (2, 8)]).collect();
        assert_eq!(indexes(&mut store).await, want);
        store.truncate_after(None).await.unwrap();
        drop(store);
        let mut store = LogStore::open(&dir.0, LogStoreOptions::default()).unwrap();
        assert!(indexes(&mut store).await.is_empty());
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
        assert!(before.0 > 5, "{before:?}");
        store.purge(log_id(1, 50)).await.unwrap();
        let after = (segments(&dir.0).len(), store.disk_bytes());
        assert!(after.0 <= 3 && after.1 < before.1 / 3, "{before:?} -> {after:?}");
        let on_disk: u64 = segments(&dir.0).iter().map(|p| fs::metadata(p).unwrap().len()).sum();
        assert_eq!(on_disk, store.disk_bytes());
        drop(store);
        let mut store = LogStore::open(&dir.0, small()).unwrap();
        assert_eq!(indexes(&mut store).await, (51..=60).map(|i| (1, i)).collect::<Vec<_>>());
        // Purging past the tip (snapshot install) leaves an empty log that continues after it.
        store.purge(log_id(2, 70)).await.unwrap();
        assert_eq!(store.get_log_state().await.unwrap().last_log_id, Some(log_id(2, 70)));
        append(&mut store, vec![ent(2, 71)]).await;
        drop(store);
        let mut store = LogStore::open(&dir.0, small()).unwrap();
        assert_eq!(indexes(&mut store).await, vec![(2, 71)]);
    }

    /// Stale entries of an old term in an old segment, removed by a Truncate record in a newer
    /// one, must stay removed across rotation, purge and reopen.
    #[tokio::test]
    async fn truncation_across_segments_then_purge() {
        let dir = TempDir::new();
        let mut store = LogStore::open(&dir.0, small()).unwrap();
        for i in 1..=20 {
            append(&mut store, vec![ent(1, i)]).await;
        }
        store.truncate_after(Some(log_id(1, 5))).await.unwrap();
        for i in 6..=17 {
            append(&mut store, vec![ent(2, i)]).await;
        }
        store.purge(log_id(2, 16)).await.unwrap();
        drop(store);
        let names: Vec<u64> = segments(&dir.0).iter().filter_map(|p| parse_seg_name(p.file_name()?.to_str()?)).collect();
        assert!(names.windows(2).all(|w| w[0] < w[1]), "{names:?}");
        let mut store = LogStore::open(&dir.0, small()).unwrap();
        assert_eq!(indexes(&mut store).await, vec![(2, 17)]);
    }

    async fn torn_tail_case(damage: impl FnOnce(&Path)) {
        let dir = TempDir::new();
        {
            let mut store = LogStore::open(&dir.0, LogStoreOptions::default()).unwrap();
            append(&mut store, (1..=5).map(|i| ent(1, i)).collect()).await;
            append(&mut store, vec![ent(1, 6)]).await;
        }
        let last = segments(&dir.0).pop().unwrap();
        let whole = fs::metadata(&last).unwrap().len();
        damage(&last);
        let mut store = LogStore::open(&dir.0, LogStoreOptions::default()).unwrap();
        let got = indexes(&mut store).await;
        assert!(got == (1..=5).map(|i| (1, i)).collect::<Vec<_>>() || got.len() == 6, "{got:?}");
        assert!(fs::metadata(&last).unwrap().len() <= whole);
        let next = got.len() as u64 + 1;
        append(&mut store, vec![ent(2, next)]).await;
        drop(store);
        let mut store = LogStore::open(&dir.0, LogStoreOptions::default()).unwrap();
        assert_eq!(indexes(&mut store).await.last(), Some(&(2, next)));
    }

    #[tokio::test]
    async fn torn_tail_chopped() {
        torn_tail_case(|p| {
            let len = fs::metadata(p).unwrap().len();
            OpenOptions::new().write(true).open(p).unwrap().set_len(len - 7).unwrap();
        })
        .await;
    }

    #[tokio::test]
    async fn garbage_tail_dropped() {
        for garbage in [vec![0u8; 3], vec![0xff; 40], vec![0; 4096]] {
            torn_tail_case(|p| OpenOptions::new().append(true).open(p).unwrap().write_all(&garbage).unwrap()).await;
        }
    }

    #[tokio::test]
    async fn bad_crc_at_tail_dropped() {
        torn_tail_case(|p| {
            let mut data = fs::read(p).unwrap();
            let n = data.len();
            data[n - 1] ^= 0x55;
            fs::write(p, data).unwrap();
        })
        .await;
    }

    #[tokio::test]
    async fn corruption_in_older_segment_is_an_error() {
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
    }

    #[tokio::test]
    async fn group_commit_completes_every_callback() {
        let dir = TempDir::new();
        let mut store = LogStore::open(&dir.0, LogStoreOptions { segment_bytes: 20_000, sync: true }).unwrap();
        let mut pending = Vec::new();
        for i in 1..=500 {
            let (tx, rx) = TypeConfig::oneshot();
            store.append(vec![ent(1, i)], IOFlushed::signal(tx)).await.unwrap();
            pending.push(rx);
        }
        store.append(Vec::new(), IOFlushed::noop()).await.unwrap();
        for rx in pending {
            rx.await.unwrap().unwrap();
        }
        assert!(segments(&dir.0).len() > 2);
        drop(store);
        let mut store = LogStore::open(&dir.0, LogStoreOptions::default()).unwrap();
        assert_eq!(indexes(&mut store).await.len(), 500);
    }

    /// A minimal in-memory state machine, only so openraft's storage suite can run.
    #[derive(Clone, Default)]
    struct MemSm(Arc<Mutex<(Option<LogId>, StoredMembershipT, Option<Snapshot>)>>);

    impl RaftSnapshotBuilder<TypeConfig> for MemSm {
        type SnapshotData = Vec<u8>;
        async fn build_snapshot(&mut self) -> Result<Snapshot, io::Error> {
            let mut s = self.0.lock().unwrap();
            let meta = SnapshotMeta { last_log_id: s.0.clone(), last_membership: s.1.clone() };
            s.2 = Some(Snapshot { meta: meta.clone(), snapshot: Vec::new() });
            Ok(Snapshot { meta, snapshot: Vec::new() })
        }
    }

    impl RaftStateMachine<TypeConfig> for MemSm {
        type SnapshotData = Vec<u8>;
        type SnapshotBuilder = MemSm;
        async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembershipT), io::Error> {
            let s = self.0.lock().unwrap();
            Ok((s.0.clone(), s.1.clone()))
        }
        async fn apply<S>(&mut self, mut entries: S) -> Result<(), io::Error>
        where S: futures_util::Stream<Item = Result<crate::raft::types::EntryResponder, io::Error>> + Unpin + OptionalSend {
            while let Some(item) = entries.next().await {
                let (entry, responder) = item?;
                {
                    let mut s = self.0.lock().unwrap();
                    if let Some(m) = entry.get_membership() {
                        s.1 = StoredMembershipT::new(Some(entry.log_id.clone()), m);
                    }
                    s.0 = Some(entry.log_id.clone());
                }
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
            let mut s = self.0.lock().unwrap();
            *s = (meta.last_log_id.clone(), meta.last_membership.clone(), Some(Snapshot { meta: meta.clone(), snapshot }));
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
            let store = LogStore::open(&dir.0, small()).map_err(|e| StorageError::read(TypeConfig::err_from_error(&e)))?;
            Ok((dir, store, MemSm::default()))
        }
    }

    #[tokio::test]
    async fn openraft_storage_suite() {
        Suite::test_all(Builder).await.unwrap();
    }
}

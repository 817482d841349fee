//! Attempts started on an every-instance subscription's current event, kept on this node's disk.
//!
//! An every-instance subscription runs on each node by itself: no leader counts its attempts,
//! the node's own loop does, in memory. An event whose handler ends the process (an abort, the
//! kernel's OOM killer, a crash in native code) therefore started again from zero attempts
//! after every restart, and the node crashed on it for good: one poison event took every node
//! down in turn. So the loop notes each attempt here before it runs the handler, and after a
//! restart starts counting from what the note says for that event (JetStream's
//! `num_delivered` does the same for a consumer, on the server).
//!
//! Why a file per subscription written in place, without fsync: the note must outlive the
//! process, not the machine. A `pwrite` of a few bytes lands in the page cache, which a process
//! that dies keeps (a lost note after a power cut only costs the count of one event's crashes).
//! One syscall per event, no allocation after the first; a record is fixed-size, so a write
//! never leaves a tail of an older one. A note that cannot be read or written is a warning, not
//! a stop: delivery goes on as it did before this existed.

use std::fs::File;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::path::PathBuf;

/// `v1 <position:20> <event:8> <started:10>\n`: fixed-size text, readable by an operator
/// (`event`: the CRC-32 of the event's id, in hex, so a record left from another log that
/// reused the position does not count for this event).
const RECORD_LEN: usize = 3 + 20 + 1 + 8 + 1 + 10 + 1;

/// Which event a record is about: its position and a fingerprint of its id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventRef {
    pub position: u64,
    id_crc: u32,
}

impl EventRef {
    pub fn new(position: u64, id: &str) -> EventRef {
        EventRef { position, id_crc: crc32fast::hash(id.as_bytes()) }
    }
}

/// The attempts note of one every-instance subscription on this node.
pub struct AttemptMark {
    path: PathBuf,
    /// `None` when the file could not be opened (warned once): nothing is kept.
    file: Option<File>,
    /// What the file said when opened: the event the last run was on, and how many attempts
    /// it had started on it that did not end.
    previous: Option<(EventRef, u32)>,
    /// Whether a failed write was warned about already.
    warned: bool,
    /// A settled event whose record is not written yet (`settled`).
    pending: Option<EventRef>,
}

impl Drop for AttemptMark {
    fn drop(&mut self) {
        self.flush();
    }
}

impl AttemptMark {
    /// Opens (creating) `dir/sub-<name>.attempts`. `name` is a checked subscription name
    /// (`A-Z a-z 0-9 - _ .`, so a file name once prefixed).
    pub fn open(dir: &Path, name: &str) -> AttemptMark {
        let path = dir.join(format!("sub-{name}.attempts"));
        let opened = crate::fsutil::create_private_dir(dir).and_then(|_| OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path));
        let (file, previous) = match opened {
            Ok(file) => {
                let previous = read_record(&file);
                (Some(file), previous)
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), cause = %e, "cannot keep every-instance attempts across restarts");
                (None, None)
            }
        };
        AttemptMark { path, file, previous, warned: false, pending: None }
    }

    /// Attempts on `event` that an earlier process started and did not end (0 unless the
    /// last note was for it).
    pub fn started_before(&self, event: EventRef) -> u32 {
        match self.previous {
            Some((e, started)) if e == event => started,
            _ => 0,
        }
    }

    /// `event` is settled (acked or dead-lettered): no attempt on it counts any more, also for
    /// a later process that meets it again before its progress was committed. Written by the
    /// next `note` (which replaces the record anyway) or by `flush`, whichever comes first, so
    /// that an event costs one write: the caller flushes before it waits on anything.
    pub fn settled(&mut self, event: EventRef) {
        if self.previous.is_some_and(|(e, _)| e == event) {
            self.previous = None;
        }
        self.pending = Some(event);
    }

    /// Writes a settled event's record now, if one waits.
    pub fn flush(&mut self) {
        if let Some(event) = self.pending.take() {
            self.note(event, 0);
        }
    }

    /// Notes that `n` attempts on `event` count: before attempt `n` runs, and again once it
    /// ended (with what then counts).
    pub fn note(&mut self, event: EventRef, n: u32) {
        self.pending = None;
        let Some(file) = &self.file else { return };
        if let Err(e) = file.write_all_at(&encode(event, n), 0) {
            if !std::mem::replace(&mut self.warned, true) {
                tracing::warn!(path = %self.path.display(), cause = %e, "cannot note an every-instance attempt");
            }
        }
    }
}

/// `event`'s record with `n` attempts: the one fixed-size format of both kinds of note.
fn encode(event: EventRef, n: u32) -> [u8; RECORD_LEN] {
    let mut record = [0u8; RECORD_LEN];
    let mut w = &mut record[..];
    // Fits: every field is at most its width (u64 in 20 digits, u32 in 8 hex and 10 digits).
    let _ = writeln!(w, "v1 {:020} {:08x} {n:010}", event.position, event.id_crc);
    debug_assert!(w.is_empty(), "the record fills its {RECORD_LEN} bytes");
    record
}

/// The record in `file`, if it holds one.
fn read_record(file: &File) -> Option<(EventRef, u32)> {
    let mut buf = [0u8; RECORD_LEN];
    file.read_exact_at(&mut buf, 0).ok()?;
    parse(&buf)
}

fn parse(buf: &[u8]) -> Option<(EventRef, u32)> {
    let text = std::str::from_utf8(buf).ok()?;
    let mut fields = text.strip_prefix("v1 ")?.strip_suffix('\n')?.split(' ');
    let position = fields.next()?.parse().ok()?;
    let id_crc = u32::from_str_radix(fields.next()?, 16).ok()?;
    let started = fields.next()?.parse().ok()?;
    fields.next().is_none().then_some((EventRef { position, id_crc }, started))
}

/// The events of one shared subscription that this node's own handler is running because this
/// node, as the leader, handed them to itself: `dir/sub-<name>.running`, one fixed-size slot per
/// event under way (the record `AttemptMark` writes, with one attempt; a free slot blank).
///
/// A shared delivery's failure is counted by the leader when the consumer's answer (or its
/// link) says so. The leader's own consumer has no link to lose: when its handler ended the
/// process (an abort, the OOM killer), nothing counted the attempt, the next leader handed the
/// event out again as new, and a lone node crashed on it for good. A node that restarts finds
/// the slots its last process left filled and has each of those events counted as a failed
/// attempt (`Dispatcher::count_unfinished`). Written in place without fsync, as `AttemptMark`:
/// the note must outlive the process, not the machine. Cleared at a graceful stop, which ends
/// the handlers and costs no attempt.
pub struct RunningNotes {
    path: PathBuf,
    /// `None` when the file could not be opened (warned once): nothing is kept.
    file: Option<File>,
    /// Slots free for reuse; `next` is the first never used. At most the events under way at
    /// once (bounded by the subscription's `max_in_flight`), so the file stays small.
    free: Vec<u64>,
    next: u64,
    /// Slots this process filled and has not ended: what a graceful stop blanks.
    live: std::collections::BTreeSet<u64>,
    /// Set by `clear` (a graceful stop): nothing more is noted.
    stopped: bool,
    /// Events the previous processes left under way and their slots, read at open: the
    /// slots stay filled until `ended` (once their attempts are counted), so that a process
    /// that dies before it could count them leaves them to the next.
    left: Vec<(EventRef, u64)>,
    warned: bool,
}

impl RunningNotes {
    /// Opens `dir/sub-<name>.running` and reads what earlier processes left in it.
    pub fn open(dir: &Path, name: &str) -> RunningNotes {
        let path = dir.join(format!("sub-{name}.running"));
        let opened = crate::fsutil::create_private_dir(dir).and_then(|_| OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path));
        let mut notes = RunningNotes { path, file: None, free: Vec::new(), next: 0, live: Default::default(), stopped: false, left: Vec::new(), warned: false };
        match opened {
            Ok(file) => {
                let Some(slots) = read_running(&file) else {
                    // Left as it is for a later start: this process notes nothing.
                    tracing::warn!(path = %notes.path.display(), "cannot read the notes of running handlers");
                    return notes;
                };
                notes.next = slots.len() as u64;
                // Past what is read, nothing counts: cut, so that slots handed out later are
                // the ones the next process reads.
                if let Err(e) = file.set_len(notes.next * RECORD_LEN as u64) {
                    tracing::warn!(path = %notes.path.display(), cause = %e, "cannot trim the notes of running handlers");
                }
                for (slot, record) in slots.into_iter().enumerate() {
                    match record {
                        Some(event) => notes.left.push((event, slot as u64)),
                        None => notes.free.push(slot as u64),
                    }
                }
                notes.file = Some(file);
            }
            Err(e) => tracing::warn!(path = %notes.path.display(), cause = %e, "cannot note the shared deliveries this node runs for itself"),
        }
        notes
    }

    /// The events earlier processes left under way, with their slots (once: later calls get
    /// none); `ended` once they are counted.
    pub fn take_left(&mut self) -> Vec<(EventRef, u64)> {
        std::mem::take(&mut self.left)
    }

    /// Notes `events` as under way; the slots are given back to `ended`.
    pub fn start(&mut self, events: &[EventRef]) -> Vec<u64> {
        let mut slots = Vec::with_capacity(events.len());
        if self.stopped {
            // A task that raced the stop: its handler is ended with the node, not counted.
            return slots;
        }
        let mut records = Vec::with_capacity(events.len());
        for event in events {
            let slot = self.free.pop().unwrap_or_else(|| {
                self.next += 1;
                self.next - 1
            });
            records.push((slot, encode(*event, 1)));
            self.live.insert(slot);
            slots.push(slot);
        }
        self.write_runs(records);
        slots
    }

    /// The events in `slots` are no longer under way (settled, or their outcome known).
    pub fn ended(&mut self, slots: Vec<u64>) {
        let mut blank = [b' '; RECORD_LEN];
        blank[RECORD_LEN - 1] = b'\n';
        let mut records = Vec::with_capacity(slots.len());
        for slot in slots {
            records.push((slot, blank));
            self.live.remove(&slot);
            self.free.push(slot);
        }
        self.write_runs(records);
    }

    /// Writes `records` with one `pwrite` per run of consecutive slots: the slots a handout
    /// takes are mostly those the last one freed, so a batch of events costs a syscall or a
    /// few rather than one per event.
    fn write_runs(&mut self, mut records: Vec<(u64, [u8; RECORD_LEN])>) {
        // Stable: were a slot ever twice in one call, the later record wins, as written apart.
        records.sort_by_key(|(slot, _)| *slot);
        let mut run: Vec<u8> = Vec::new();
        let mut first = 0;
        for (i, (slot, record)) in records.iter().enumerate() {
            if i > 0 && *slot != records[i - 1].0 + 1 {
                self.write(first, &run);
                run.clear();
            }
            if run.is_empty() {
                first = *slot;
            }
            run.extend_from_slice(record);
        }
        if !run.is_empty() {
            self.write(first, &run);
        }
    }

    /// A graceful stop: the handlers this process runs are ended by it, not by a crash, so
    /// their slots are blanked and nothing more is noted. What earlier processes left and was
    /// not counted stays for the next start.
    pub fn clear(&mut self) {
        self.stopped = true;
        let live = std::mem::take(&mut self.live);
        self.ended(live.into_iter().collect());
    }

    /// Writes `records` (whole records) from `slot` on.
    fn write(&mut self, slot: u64, records: &[u8]) {
        let Some(file) = &self.file else { return };
        if let Err(e) = file.write_all_at(records, slot * RECORD_LEN as u64) {
            if !std::mem::replace(&mut self.warned, true) {
                tracing::warn!(path = %self.path.display(), cause = %e, "cannot note a shared delivery this node runs for itself");
            }
        }
    }
}

/// The slots of a running-notes file, each with the event it holds (`None`: free or damaged);
/// a bounded read, at most `MAX_RUNNING_READ` slots.
fn read_running(file: &File) -> Option<Vec<Option<EventRef>>> {
    let len = file.metadata().ok()?.len().min((MAX_RUNNING_READ * RECORD_LEN) as u64) as usize;
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, 0).ok()?;
    Some(buf.chunks_exact(RECORD_LEN).map(|record| parse(record).map(|(event, _)| event)).collect())
}

/// Slots read back at most: far more than events under way at once (`max_in_flight` is at most
/// a few thousand).
const MAX_RUNNING_READ: usize = 1 << 16;

impl std::fmt::Debug for RunningNotes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningNotes").field("path", &self.path).field("left", &self.left).finish()
    }
}

impl std::fmt::Debug for AttemptMark {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AttemptMark").field("path", &self.path).field("previous", &self.previous).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh directory under the system temp dir, removed on drop.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(tag: &str) -> Scratch {
            let path = std::env::temp_dir().join(format!("raftbridge-marks-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&path);
            Scratch(path)
        }
        fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn a_note_outlives_its_writer_and_counts_only_for_its_event() {
        let dir = Scratch::new("outlives");
        let (e7, e8) = (EventRef::new(7, "id-7"), EventRef::new(8, "id-8"));
        let mut mark = AttemptMark::open(dir.path(), "audit.v1");
        assert_eq!(mark.started_before(e7), 0, "nothing noted yet");
        mark.note(e7, 1);
        mark.note(e7, 2);
        // What the previous process noted is what a new one reads; the one that wrote it
        // still answers from what it found at its own start.
        assert_eq!(mark.started_before(e7), 0);
        drop(mark);
        let mut again = AttemptMark::open(dir.path(), "audit.v1");
        assert_eq!((again.started_before(e7), again.started_before(e8)), (2, 0));
        assert_eq!(again.started_before(EventRef::new(7, "another log's id-7")), 0, "same position, another event");
        let far = EventRef::new(12_345_678_901, "far");
        again.note(far, 1);
        assert_eq!(AttemptMark::open(dir.path(), "audit.v1").started_before(far), 1);
        assert_eq!(AttemptMark::open(dir.path(), "other").started_before(e7), 0, "one note per subscription");
        // Settled: neither this process nor the next counts attempts on it any more.
        let mut third = AttemptMark::open(dir.path(), "audit.v1");
        assert_eq!(third.started_before(far), 1);
        third.settled(far);
        assert_eq!(third.started_before(far), 0);
        drop(third);
        assert_eq!(AttemptMark::open(dir.path(), "audit.v1").started_before(far), 0, "written when dropped");
    }

    /// A handout's notes are written in runs of consecutive slots; slots freed out of order
    /// and taken again land where they belong.
    #[test]
    fn running_notes_are_written_in_runs_and_read_back_slot_by_slot() {
        let dir = Scratch::new("runs");
        let refs: Vec<EventRef> = (1..=9).map(|p| EventRef::new(p, &format!("id-{p}"))).collect();
        let mut notes = RunningNotes::open(dir.path(), "runs");
        let slots = notes.start(&refs[..6]);
        assert_eq!(slots, vec![0, 1, 2, 3, 4, 5]);
        notes.ended(vec![slots[4], slots[0], slots[2]]);
        let again = notes.start(&refs[6..]);
        let mut sorted = again.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, vec![0, 2, 4], "freed slots taken again");
        drop(notes);
        let mut left: Vec<(u64, u64)> = RunningNotes::open(dir.path(), "runs").take_left().into_iter().map(|(e, slot)| (slot, e.position)).collect();
        left.sort_unstable();
        let mut expected: Vec<(u64, u64)> = vec![(1, 2), (3, 4), (5, 6)];
        expected.extend(again.iter().zip(7..=9).map(|(slot, p)| (*slot, p)));
        expected.sort_unstable();
        assert_eq!(left, expected);
    }

    /// What a process left under way is read by the next one, and stays for the one after
    /// until it is ended (counted); ended slots, a graceful stop's clear and damaged records
    /// count for nothing.
    #[test]
    fn running_notes_outlive_their_writer_until_ended() {
        let dir = Scratch::new("running");
        let refs: Vec<EventRef> = (1..=4).map(|p| EventRef::new(p, &format!("id-{p}"))).collect();
        let events = |left: Vec<(EventRef, u64)>| {
            let mut e: Vec<EventRef> = left.into_iter().map(|(e, _)| e).collect();
            e.sort_by_key(|e| e.position);
            e
        };
        let mut notes = RunningNotes::open(dir.path(), "orders");
        assert!(notes.take_left().is_empty());
        let first = notes.start(&refs[..3]);
        notes.ended(vec![first[1]]);
        // A freed slot is used again.
        let again = notes.start(&refs[3..]);
        assert_eq!(again, vec![first[1]]);
        drop(notes);
        let mut next = RunningNotes::open(dir.path(), "orders");
        assert_eq!(events(next.take_left()), vec![refs[0], refs[2], refs[3]]);
        assert!(next.take_left().is_empty(), "taken once");
        // This process dies before it counted them, and ran event 2 meanwhile: the next one
        // finds all of it.
        next.start(&refs[1..2]);
        drop(next);
        let mut third = RunningNotes::open(dir.path(), "orders");
        let left = third.take_left();
        assert_eq!(events(left.clone()), vec![refs[0], refs[1], refs[2], refs[3]]);
        third.ended(left.into_iter().map(|(_, slot)| slot).collect());
        drop(third);
        assert!(RunningNotes::open(dir.path(), "orders").take_left().is_empty(), "counted and ended");
        let mut stopping = RunningNotes::open(dir.path(), "orders");
        stopping.start(&refs[..2]);
        stopping.clear();
        drop(stopping);
        assert!(RunningNotes::open(dir.path(), "orders").take_left().is_empty(), "a graceful stop leaves nothing");
        std::fs::write(dir.path().join("sub-bad.running"), b"v1 00000000000000000007 000000ab 0000000001\ngarbage\n").unwrap();
        assert_eq!(events(RunningNotes::open(dir.path(), "bad").take_left()), vec![EventRef { position: 7, id_crc: 0xab }]);
    }

    #[test]
    fn a_damaged_note_reads_as_none() {
        let e = EventRef { position: 7, id_crc: 0xab };
        assert_eq!(parse(b"v1 00000000000000000007 000000ab 0000000002\n"), Some((e, 2)));
        for bad in [&b"v2 00000000000000000007 000000ab 0000000002\n"[..], b"v1 0000000000000000000x 000000ab 0000000002\n", b"v1 00000000000000000007 0000000002\n", b""] {
            assert_eq!(parse(bad), None);
        }
        let dir = Scratch::new("damaged");
        std::fs::create_dir_all(dir.path()).unwrap();
        std::fs::write(dir.path().join("sub-x.attempts"), b"garbage").unwrap();
        assert_eq!(AttemptMark::open(dir.path(), "x").started_before(EventRef::new(0, "")), 0);
    }
}

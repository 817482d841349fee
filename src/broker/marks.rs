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
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::path::PathBuf;

/// `v1 <position:20> <started:10>\n`: fixed-size text, readable by an operator.
const RECORD_LEN: usize = 3 + 20 + 1 + 10 + 1;

/// The attempts note of one every-instance subscription on this node.
pub struct AttemptMark {
    path: PathBuf,
    /// `None` when the file could not be opened (warned once): nothing is kept.
    file: Option<File>,
    /// What the file said when opened: the event the last run was on, and how many attempts
    /// it had started on it.
    previous: Option<(u64, u32)>,
    /// Whether a failed write was warned about already.
    warned: bool,
}

impl AttemptMark {
    /// Opens (creating) `dir/sub-<name>.attempts`. `name` is a checked subscription name
    /// (`A-Z a-z 0-9 - _ .`, so a file name once prefixed).
    pub fn open(dir: &Path, name: &str) -> AttemptMark {
        let path = dir.join(format!("sub-{name}.attempts"));
        let opened = std::fs::create_dir_all(dir).and_then(|()| OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path));
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
        AttemptMark { path, file, previous, warned: false }
    }

    /// Attempts started on `position` before this process (0 unless the last note was for it).
    pub fn started_before(&self, position: u64) -> u32 {
        match self.previous {
            Some((p, started)) if p == position => started,
            _ => 0,
        }
    }

    /// Notes that attempt `n` (1-based) on `position` is starting.
    pub fn starting(&mut self, position: u64, n: u32) {
        let Some(file) = &self.file else { return };
        let record = format!("v1 {position:020} {n:010}\n");
        debug_assert_eq!(record.len(), RECORD_LEN);
        if let Err(e) = file.write_all_at(record.as_bytes(), 0) {
            if !std::mem::replace(&mut self.warned, true) {
                tracing::warn!(path = %self.path.display(), cause = %e, "cannot note an every-instance attempt");
            }
        }
    }
}

/// The record in `file`, if it holds one.
fn read_record(file: &File) -> Option<(u64, u32)> {
    let mut buf = [0u8; RECORD_LEN];
    file.read_exact_at(&mut buf, 0).ok()?;
    parse(&buf)
}

fn parse(buf: &[u8]) -> Option<(u64, u32)> {
    let text = std::str::from_utf8(buf).ok()?;
    let rest = text.strip_prefix("v1 ")?.strip_suffix('\n')?;
    let (position, started) = rest.split_once(' ')?;
    Some((position.parse().ok()?, started.parse().ok()?))
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
        let mut mark = AttemptMark::open(dir.path(), "audit.v1");
        assert_eq!(mark.started_before(7), 0, "nothing noted yet");
        mark.starting(7, 1);
        mark.starting(7, 2);
        // What the previous process noted is what a new one reads; the one that wrote it
        // still answers from what it found at its own start.
        assert_eq!(mark.started_before(7), 0);
        drop(mark);
        let mut again = AttemptMark::open(dir.path(), "audit.v1");
        assert_eq!((again.started_before(7), again.started_before(8)), (2, 0));
        again.starting(12_345_678_901, 1);
        assert_eq!(AttemptMark::open(dir.path(), "audit.v1").started_before(12_345_678_901), 1);
        assert_eq!(AttemptMark::open(dir.path(), "other").started_before(7), 0, "one note per subscription");
    }

    #[test]
    fn a_damaged_note_reads_as_none() {
        assert_eq!(parse(b"v1 00000000000000000007 0000000002\n"), Some((7, 2)));
        for bad in [&b"v2 00000000000000000007 0000000002\n"[..], b"v1 0000000000000000000x 0000000002\n", b""] {
            assert_eq!(parse(bad), None);
        }
        let dir = Scratch::new("damaged");
        std::fs::create_dir_all(dir.path()).unwrap();
        std::fs::write(dir.path().join("sub-x.attempts"), b"garbage").unwrap();
        assert_eq!(AttemptMark::open(dir.path(), "x").started_before(0), 0);
    }
}

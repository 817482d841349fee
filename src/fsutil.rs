//! Small durable-file helpers shared by the storage modules.
//!
//! Replacing a file crash-safely needs four steps (write a temp file, fsync it, rename over the
//! target, fsync the directory); doing them in one place keeps every caller correct.

use std::fs::File;
use std::io;
use std::io::Write;
use std::path::Path;

/// Atomically replace `dir/name` with `bytes`, durable when this returns.
pub fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    write_atomic_parts(dir, name, &[bytes])
}

/// Bytes written between syncs of a large file (see `write_atomic_parts`).
const SYNC_EVERY: usize = 1 << 20;

/// `write_atomic` with the content given in parts (no copy into one buffer).
///
/// A large file (a snapshot of tens of megabytes) is synced every `SYNC_EVERY` bytes instead of
/// once at the end: one fsync of the whole file puts it all on the device queue at once, and every
/// Raft log fsync on the same disk (this node's and, on a shared disk, its peers') waited behind
/// it — measured as 100-300 ms commit stalls cluster-wide whenever a node wrote a snapshot.
pub fn write_atomic_parts(dir: &Path, name: &str, parts: &[&[u8]]) -> io::Result<()> {
    let ctx = |e: io::Error, what: &str| io::Error::new(e.kind(), format!("{what} {}/{name}: {e}", dir.display()));
    let tmp = dir.join(format!("{name}.tmp"));
    let mut f = File::create(&tmp).map_err(|e| ctx(e, "create"))?;
    let mut unsynced = 0;
    for part in parts {
        for chunk in part.chunks(SYNC_EVERY) {
            f.write_all(chunk).map_err(|e| ctx(e, "write"))?;
            unsynced += chunk.len();
            if unsynced >= SYNC_EVERY {
                f.sync_data().map_err(|e| ctx(e, "fsync"))?;
                unsynced = 0;
            }
        }
    }
    f.sync_all().map_err(|e| ctx(e, "fsync"))?;
    drop(f);
    std::fs::rename(&tmp, dir.join(name)).map_err(|e| ctx(e, "rename"))?;
    sync_dir(dir)
}

/// fsync the directory holding `dir`, so that `dir`'s own entry (just made by
/// `create_dir_all` on a first start) is durable. Nothing for a path without a parent.
pub fn sync_parent(dir: &Path) -> io::Result<()> {
    match dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(parent) => sync_dir(parent),
        None => Ok(()),
    }
}

/// fsync a directory so a rename or a new file in it is durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

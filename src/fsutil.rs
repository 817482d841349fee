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

/// `write_atomic` with the content given in parts (no copy into one buffer).
pub fn write_atomic_parts(dir: &Path, name: &str, parts: &[&[u8]]) -> io::Result<()> {
    let ctx = |e: io::Error, what: &str| io::Error::new(e.kind(), format!("{what} {}/{name}: {e}", dir.display()));
    let tmp = dir.join(format!("{name}.tmp"));
    let mut f = File::create(&tmp).map_err(|e| ctx(e, "create"))?;
    for part in parts {
        f.write_all(part).map_err(|e| ctx(e, "write"))?;
    }
    f.sync_all().map_err(|e| ctx(e, "fsync"))?;
    drop(f);
    std::fs::rename(&tmp, dir.join(name)).map_err(|e| ctx(e, "rename"))?;
    sync_dir(dir)
}

/// fsync a directory so a rename or a new file in it is durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

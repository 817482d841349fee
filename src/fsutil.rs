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

/// Makes `dir` (and any missing parent) readable by this user only, or warns when it exists
/// and is open to others: a node's data dir holds every stored value in clear (etcd warns
/// alike). Returns whether it had to be made.
pub fn create_private_dir(dir: &Path) -> io::Result<bool> {
    use std::os::unix::fs::DirBuilderExt;
    use std::os::unix::fs::PermissionsExt;
    match std::fs::metadata(dir) {
        Ok(meta) => {
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                tracing::warn!(path = %dir.display(), mode = %format!("{mode:o}"),
                    "the data dir is open to other users, and it holds every stored value in clear: chmod 700 it");
            }
            Ok(false)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
            Ok(true)
        }
        Err(e) => Err(e),
    }
}

/// fsync the directory holding `dir`, so that `dir`'s own entry (just made by
/// `create_dir_all` on a first start) is durable: `.` for a relative path of one component.
/// The levels above it, which `create_dir_all` may have made too, are synced as well, best
/// effort (an ancestor this user cannot open holds no entry of ours). Nothing for a root.
pub fn sync_parent(dir: &Path) -> io::Result<()> {
    let Some(parent) = dir.parent() else { return Ok(()) };
    let here = Path::new(".");
    if parent.as_os_str().is_empty() {
        // The working directory: best effort too (one that cannot be opened for reading
        // did not stop a first start before this was synced at all).
        let _ = sync_dir(here);
        return Ok(());
    }
    sync_dir(parent)?;
    for up in parent.ancestors().skip(1) {
        let _ = sync_dir(if up.as_os_str().is_empty() { here } else { up });
    }
    Ok(())
}

/// fsync a directory so a rename or a new file in it is durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_parent_of_a_one_component_relative_path_is_the_working_directory() {
        // `Path::new("data").parent()` is the empty path, which no `open` takes.
        assert!(sync_dir(Path::new("")).is_err());
        sync_parent(Path::new("data")).expect("syncs `.`");
        sync_parent(Path::new("a/b/data")).map(drop).unwrap_or_else(|e| assert_eq!(e.kind(), io::ErrorKind::NotFound));
        let base = std::env::temp_dir().join(format!("rb-fsutil-{}", std::process::id()));
        let deep = base.join("x/y/z");
        std::fs::create_dir_all(&deep).unwrap();
        sync_parent(&deep).expect("every level up to the root");
        std::fs::remove_dir_all(&base).unwrap();
        sync_parent(Path::new("/")).expect("a root has no parent");
    }

    /// A data dir a node makes is its user's only, whatever the umask; one that exists is left
    /// as it is (the node warns when it is open to others).
    #[test]
    fn a_data_dir_made_here_is_private_and_an_existing_one_is_kept() {
        use std::os::unix::fs::PermissionsExt;
        let base = std::env::temp_dir().join(format!("rb-private-{}-{}", std::process::id(), fastrand::u64(..)));
        let dir = base.join("a/node1");
        assert!(create_private_dir(&dir).unwrap(), "made");
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert!(!create_private_dir(&dir).unwrap(), "there already");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(!create_private_dir(&dir).unwrap());
        assert_eq!(mode(&dir), 0o755, "an existing dir's mode is the operator's");
        std::fs::remove_dir_all(&base).unwrap();
    }
}

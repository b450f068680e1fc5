//! Where a QEMU process (a VM or a `qemu-storage-daemon`) keeps its
//! monitor sockets, their locks and its log: one directory per process,
//! chosen by the driver that starts it.

use std::fs::OpenOptions;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use strata_core::{Error, Result};

/// How many QMP monitors each QEMU gets: one `strata` process can hold one
/// for a long call (a block job's `--wait`) while others use the rest.
pub const MONITORS: usize = 4;

/// A QEMU process's runtime directory and the files in it.
#[derive(Debug, Clone)]
pub struct RuntimePaths {
    pub dir: PathBuf,
}

impl RuntimePaths {
    pub fn monitor_socket(&self, n: usize) -> PathBuf {
        self.dir.join(format!("qmp-{n}.sock"))
    }
    pub fn monitor_lock(&self, n: usize) -> PathBuf {
        self.dir.join(format!("qmp-{n}.lock"))
    }
    pub fn log(&self) -> PathBuf {
        self.dir.join("qemu.log")
    }
    /// The throwaway overlay a transient disk's guest writes go to; it
    /// lives and dies with the runtime directory.
    pub fn transient_overlay(&self, target: &str) -> PathBuf {
        self.dir.join(format!("transient-{target}.qcow2"))
    }
    /// The next number free for a live snapshot's node names.
    fn snapshot_numbers(&self) -> PathBuf {
        self.dir.join("snapshot-nodes")
    }

    /// Reserves `count` numbers for a live snapshot's node names in this
    /// process, from at least `floor`; returns the first. The caller holds
    /// the unattached-nodes lock (`jobs::lock_unattached_nodes`), which
    /// orders every reservation.
    ///
    /// The numbers only have to be unique among the nodes of this one
    /// process: they must outlive a `strata` that dies (the file is
    /// rewritten in place, which every later reader sees), but not the
    /// machine, which a crash takes the process down with. So the file is
    /// neither synced nor replaced by a rename, and a snapshot spends no
    /// sync on it before QEMU adds its nodes. A file that does not read as
    /// a number (a crash while it was written) counts as `floor`.
    pub fn reserve_snapshot_numbers(&self, floor: u64, count: u64) -> Result<u64> {
        let path = self.snapshot_numbers();
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| Error::io("open", &path, e))?;
        let mut text = String::new();
        file.read_to_string(&mut text).map_err(|e| Error::io("read", &path, e))?;
        let first = text.trim().parse::<u64>().unwrap_or(0).max(floor);
        let next = format!("{:<20}\n", first.saturating_add(count));
        file.write_all_at(next.as_bytes(), 0).map_err(|e| Error::io("write", &path, e))?;
        Ok(first)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_numbers_are_reserved_once_from_the_floor_up() {
        let dir = tempfile::tempdir().expect("tempdir");
        let paths = RuntimePaths { dir: dir.path().to_path_buf() };
        assert_eq!(paths.reserve_snapshot_numbers(5, 2).expect("first"), 5);
        assert_eq!(paths.reserve_snapshot_numbers(1, 1).expect("second"), 7);
        // A floor above what the file says wins (nodes numbered before it).
        assert_eq!(paths.reserve_snapshot_numbers(100, 3).expect("third"), 100);
        assert_eq!(paths.reserve_snapshot_numbers(0, 1).expect("fourth"), 103);
        // A damaged file counts as the floor.
        std::fs::write(paths.snapshot_numbers(), "garbage").expect("damage");
        assert_eq!(paths.reserve_snapshot_numbers(9, 1).expect("after damage"), 9);
        assert_eq!(paths.reserve_snapshot_numbers(0, 1).expect("after that"), 10);
    }
}

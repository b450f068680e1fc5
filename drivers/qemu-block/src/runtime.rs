//! Where a QEMU process (a VM or a `qemu-storage-daemon`) keeps its
//! monitor sockets, their locks and its log: one directory per process,
//! chosen by the driver that starts it.

use std::path::PathBuf;

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
}

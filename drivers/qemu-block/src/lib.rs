//! strata-qemu-block: QEMU's block layer over QMP, for every Strata
//! driver that serves images through QEMU (the QEMU driver's VMs, a
//! container's qcow2 root served by `qemu-storage-daemon`). It knows
//! QEMU's block layer, not VMs or containers:
//!
//! - [`nodes`]: node names and `-blockdev` JSON for a storage device's
//!   chain (a disk or a `<filesystem>`), one format node over one
//!   protocol node per layer with explicit `backing` links;
//! - [`daemon`]: the `qemu-storage-daemon` command line serving devices'
//!   chains, and the wait for a started QEMU's monitor;
//! - [`runtime`] and [`monitor`]: a QEMU process's runtime directory, its
//!   QMP monitors and QMP errors as Strata errors;
//! - [`graph`]: the chain of each device as QEMU has it open;
//! - [`jobs`]: [`jobs::QemuJobServer`], strata-engine's `BlockJobBackend`
//!   over a monitor, its records kept by the driver ([`jobs::JobRecords`]);
//! - [`offline`]: a storage daemon started for block jobs on storage
//!   nothing else serves, its [`offline::ServerRecord`] embedded in the
//!   driver's status;
//! - [`snapshot`]: overlays added and switched in one `transaction`;
//! - [`fuse`]: a chain served by a storage daemon as a FUSE-exported file
//!   (for a loop device, which the caller attaches).
//!
//! Processes are started through `strata_engine::process`, recorded
//! before they open an image.

pub mod daemon;
pub mod fuse;
pub mod graph;
pub mod jobs;
pub mod monitor;
pub mod nodes;
pub mod offline;
pub mod runtime;
pub mod snapshot;

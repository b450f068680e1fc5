//! strata-engine: what a snapshot or a block job means, whatever runs the
//! domain. Drivers keep only what their hypervisor alone can do.
//!
//! - `blocking`: lock waits and tool runs off the async runtime.
//! - `definitions`: persistent domain definitions in the store.
//! - `records`: snapshot records and the current snapshot.
//! - `graph`: which images a domain and its snapshots read or froze.
//! - `image_work`: offline image work through `qemu-img`.
//! - `intent`: the intent record that lets the next command finish or
//!   undo a snapshot operation a crash interrupted.
//! - `job`: block jobs: records and outcomes, layer resolution,
//!   refusals, reconciliation decisions, what a job's end changes, and
//!   the `BlockJobEngine` a driver's `BlockJobHost` gets `BlockJobOps` from.
//! - `process`: core's `process`, re-exported: processes a driver
//!   starts, recorded before they run.
//! - `snapshot`: snapshot create, revert, delete and recovery over a
//!   driver's `SnapshotBackend`.
//! - `storage`: a disk or filesystem by the name records give it.
//! - `view`: an engine viewed over the driver it borrows.
pub mod blocking;
pub mod definitions;
pub mod graph;
pub mod image_work;
pub mod intent;
pub mod job;
pub mod records;
pub mod snapshot;
pub mod storage;
pub mod view;

/// Processes a driver starts: core's, which networks use too.
pub use strata_core::process;

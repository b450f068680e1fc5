//! strata-core: everything in Strata that knows no particular hypervisor —
//! libvirt XML models, the backing-chain model and image probing, the driver
//! traits and registry (built-in drivers and plugins), typed options with their validation, the state
//! store, and the error type.
pub mod capabilities;
pub mod chain;
pub mod define;
pub mod diskset;
pub mod driver;
pub mod error;
pub mod hostcpu;
pub mod ifaddr;
pub mod image;
pub mod network;
pub mod options;
pub mod plugin;
pub mod pool;
pub mod process;
pub mod registry;
pub mod remote;
pub mod store;
pub mod tool;
pub mod uri;
pub mod wire;
mod wire_client;
pub mod xml;

pub use error::{Error, ErrorKind, Result};

/// Ends the process at once, as SIGKILL would, when `STRATA_CRASH_AT` names
/// this step. Multi-step operations mark their steps with it so tests can
/// show that the next command finishes or undoes an interrupted one.
pub fn crash_point(step: &str) {
    signal_self_at("STRATA_CRASH_AT", step, libc::SIGKILL);
}

/// Stops the process (SIGSTOP, until a SIGCONT) when `STRATA_PAUSE_AT`
/// names this step, so a test can run other commands inside a window that
/// is otherwise too short to hit on purpose.
pub fn pause_point(step: &str) {
    signal_self_at("STRATA_PAUSE_AT", step, libc::SIGSTOP);
}

fn signal_self_at(variable: &str, step: &str, signal: libc::c_int) {
    if std::env::var(variable).is_ok_and(|v| v == step) {
        // SAFETY: kill(2) on this process's own pid; no preconditions.
        unsafe {
            libc::kill(libc::getpid(), signal);
        }
    }
}

/// Re-exported so driver crates register with the same `inventory` version.
pub use inventory;

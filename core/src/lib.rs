//! strata-core: everything in Strata that knows no particular hypervisor —
//! libvirt XML models, the backing-chain model and image probing, the driver
//! traits and registry, typed options with their validation, the state
//! store, and the error type.
pub mod chain;
pub mod define;
pub mod diskset;
pub mod driver;
pub mod error;
pub mod image;
pub mod options;
pub mod registry;
pub mod store;
pub mod uri;
pub mod xml;

pub use error::{Error, ErrorKind, Result};

/// Re-exported so driver crates register with the same `inventory` version.
pub use inventory;

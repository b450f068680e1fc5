//! strata-core: everything in Strata that knows no particular hypervisor.
pub mod error;
pub mod image;

pub use error::{Error, ErrorKind, Result};

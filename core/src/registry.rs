//! Built-in drivers register themselves by URI scheme; the CLI opens a
//! connection by URI without naming any driver crate's types.

use crate::driver::Connection;
use crate::error::{Error, ErrorKind, Result};
use crate::uri::ConnectUri;

/// A driver's entry in the registry (`inventory::submit!` it from the driver crate).
pub struct DriverRegistration {
    /// URI scheme without transport: `qemu`, `lxc`, `vbox`.
    pub scheme: &'static str,
    pub description: &'static str,
    pub open: fn(&ConnectUri) -> Result<Box<dyn Connection>>,
}

inventory::collect!(DriverRegistration);

/// Schemes of every linked-in driver, sorted.
pub fn known_schemes() -> Vec<&'static str> {
    let mut v: Vec<&'static str> = inventory::iter::<DriverRegistration>.into_iter().map(|d| d.scheme).collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// Opens a connection to the driver named by `uri`.
pub fn open(uri: &str) -> Result<Box<dyn Connection>> {
    let parsed = ConnectUri::parse(uri)?;
    let reg =
        inventory::iter::<DriverRegistration>.into_iter().find(|d| d.scheme == parsed.driver).ok_or_else(|| {
            Error::new(
                ErrorKind::NoConnect,
                format!(
                    "no driver for '{}' in URI '{uri}'; known drivers: {}",
                    parsed.driver,
                    known_schemes().join(", ")
                ),
            )
        })?;
    (reg.open)(&parsed)
}

//! Drivers by URI scheme: built-in drivers register themselves
//! (`inventory`), and plugins are found on disk ([`crate::plugin`]); the
//! CLI opens a connection by URI without naming any driver crate's types.

use serde::Serialize;

use crate::driver::Connection;
use crate::error::{Error, ErrorKind, Result};
use crate::plugin;
use crate::uri::ConnectUri;
use crate::wire::ABI_VERSION;

/// A driver's entry in the registry (`inventory::submit!` it from the driver crate).
pub struct DriverRegistration {
    /// URI scheme without transport: `qemu`, `lxc`, `vbox`.
    pub scheme: &'static str,
    pub description: &'static str,
    pub open: fn(&ConnectUri) -> Result<Box<dyn Connection>>,
}

inventory::collect!(DriverRegistration);

/// Schemes of every linked-in driver and loaded plugin, sorted.
pub fn known_schemes() -> Vec<String> {
    let mut v: Vec<String> = drivers().into_iter().flat_map(|d| d.schemes).collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// One driver `capabilities --all` lists.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DriverListing {
    pub name: String,
    pub schemes: Vec<String>,
    /// `built-in` or `plugin`.
    pub origin: &'static str,
    /// The ABI version it speaks (a built-in driver speaks the host's).
    pub abi_version: u32,
    /// A plugin's library.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub library: Option<String>,
}

fn builtin_schemes() -> Vec<&'static str> {
    inventory::iter::<DriverRegistration>.into_iter().map(|d| d.scheme).collect()
}

/// The plugins found, none of them taking a built-in driver's scheme.
pub fn plugins() -> &'static plugin::Discovery {
    plugin::discovered(&builtin_schemes())
}

/// Every driver: the built-in ones, then the plugins loaded.
pub fn drivers() -> Vec<DriverListing> {
    let mut builtin: Vec<DriverListing> = inventory::iter::<DriverRegistration>
        .into_iter()
        .map(|d| DriverListing {
            name: d.scheme.to_string(),
            schemes: vec![d.scheme.to_string()],
            origin: "built-in",
            abi_version: ABI_VERSION,
            library: None,
        })
        .collect();
    builtin.sort_by(|a, b| a.name.cmp(&b.name));
    builtin.dedup();
    let plugins = plugins().plugins.iter().map(|p| DriverListing {
        name: p.name.clone(),
        schemes: p.schemes.clone(),
        origin: "plugin",
        abi_version: p.abi_version,
        library: Some(p.path.display().to_string()),
    });
    builtin.into_iter().chain(plugins).collect()
}

/// Opens a connection to the driver named by `uri`: a built-in one, else
/// a plugin's.
pub fn open(uri: &str) -> Result<Box<dyn Connection>> {
    let parsed = ConnectUri::parse(uri)?;
    if parsed.transport.as_deref() == Some(crate::remote::TRANSPORT) {
        return crate::remote::open(&parsed);
    }
    if let Some(reg) = inventory::iter::<DriverRegistration>.into_iter().find(|d| d.scheme == parsed.driver) {
        return (reg.open)(&parsed);
    }
    let discovery = plugins();
    if let Some(plugin) = discovery.find(&parsed.driver) {
        return plugin.open(&parsed);
    }
    let mut message =
        format!("no driver for '{}' in URI '{uri}'; known drivers: {}", parsed.driver, known_schemes().join(", "));
    for refused in &discovery.refused {
        message.push_str("; ");
        message.push_str(refused.message());
    }
    Err(Error::new(ErrorKind::NoConnect, message))
}

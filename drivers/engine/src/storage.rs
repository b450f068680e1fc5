//! A domain's storage devices by the name the engine's records give them:
//! a filesystem by its target dir (`/`), a disk by its target (`vda`), as
//! [`Domain::find_storage_device`] resolves them.

use strata_core::chain::Chain;
use strata_core::xml::{Domain, StorageAddress};
use strata_core::Result;

/// The device a recorded `name` names: the filesystem with that target
/// dir, else the disk with that target. Only the filesystems are read, so
/// a disk whose other elements are still being written (a job's
/// `<mirror>`) is addressed as before.
fn address_of(dom: &Domain, name: &str) -> Result<StorageAddress> {
    Ok(match dom.filesystems()?.iter().any(|f| f.target == name) {
        true => StorageAddress::Filesystem(name.to_string()),
        false => StorageAddress::Disk(name.to_string()),
    })
}

/// Records `chain` for the device `name` names in `dom`.
pub fn set_chain(dom: &mut Domain, name: &str, chain: &Chain) -> Result<()> {
    let address = address_of(dom, name)?;
    dom.set_storage_chain(&address, chain)
}

/// The recorded chain of the device `name` names in `dom`; `None` when it
/// holds no image.
pub fn chain_of(dom: &Domain, name: &str) -> Result<Option<Chain>> {
    Ok(dom.find_storage_device(name)?.chain().cloned())
}

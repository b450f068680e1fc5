//! The persistent side of QEMU domains: definitions in the store.

use strata_core::define;
use strata_core::driver::{DefineFlags, DefineOutcome, DiskChainCheck, DumpXmlFlags};
use strata_core::store::{no_such_domain, Store};
use strata_core::xml::Domain;
use strata_core::{Error, ErrorKind, Result};

/// Reads a domain's persistent definition.
pub fn load(store: &Store, name: &str) -> Result<Domain> {
    strata_core::store::validate_name("domain", name)?;
    let xml = store.read_domain(name)?.ok_or_else(|| no_such_domain(name))?;
    Domain::parse(&xml).map_err(|e| e.context(format!("stored definition of domain '{name}'")))
}

/// Runs `change` on the definition under the domain lock and saves it only
/// if `change` succeeds, so a failed edit leaves the stored XML untouched.
pub fn edit<T>(store: &Store, name: &str, change: impl FnOnce(&mut Domain) -> Result<T>) -> Result<T> {
    let _lock = store.lock_domain(name)?;
    let mut dom = load(store, name)?;
    let out = change(&mut dom)?;
    store.write_domain(name, &dom.to_xml())?;
    Ok(out)
}

pub fn define(store: &Store, xml: &str, flags: DefineFlags) -> Result<DefineOutcome> {
    let mut dom = Domain::parse(xml)?;
    match dom.domain_type() {
        Some("kvm") | Some("qemu") => {}
        Some(other) => {
            return Err(Error::config_unsupported(format!(
                "domain type '{other}' is not supported by the qemu driver (expected 'kvm' or 'qemu')"
            )))
        }
        None => return Err(Error::xml("the <domain> has no 'type' attribute")),
    }
    for disk in dom.disks()? {
        crate::transient::check_disk(&disk)?;
    }
    let name = dom.name();
    let _lock = store.lock_domain_to_define(&name)?;
    if let Some(existing) = store.read_domain(&name)? {
        let existing = Domain::parse(&existing)?;
        match (existing.uuid(), dom.uuid()) {
            (Some(old), Some(new)) if old != new => {
                return Err(Error::new(
                    ErrorKind::DomainExists,
                    format!("domain '{name}' is already defined with uuid {old}"),
                ))
            }
            (Some(old), None) => dom.set_uuid(&old),
            _ => {}
        }
    }
    let uuid = dom.ensure_uuid();
    for other in store.list_domains()? {
        if other == name {
            continue;
        }
        if let Some(xml) = store.read_domain(&other)? {
            if Domain::parse(&xml).ok().and_then(|d| d.uuid()).as_deref() == Some(uuid.as_str()) {
                return Err(Error::new(
                    ErrorKind::DomainExists,
                    format!("domain '{other}' already exists with uuid {uuid}"),
                ));
            }
        }
    }
    let warnings = define::prepare_disks(&mut dom, flags.validate)?;
    let out = dom.to_xml();
    // Recorded chains make a definition larger than its input: it must stay
    // within what the store reads back.
    Domain::parse(&out).map_err(|e| e.context("the definition with its backing chains recorded"))?;
    store.write_domain(&name, &out)?;
    Ok(DefineOutcome { name, warnings })
}

/// Removes the definition, and with `snapshots_metadata` the snapshot
/// records (never an image); the caller holds the domain lock.
pub fn undefine(store: &Store, name: &str, snapshots_metadata: bool) -> Result<()> {
    load(store, name)?;
    let snapshots = store.list_snapshots(name)?;
    if !snapshots.is_empty() && !snapshots_metadata {
        return Err(Error::operation_invalid(format!(
            "cannot undefine domain '{name}' with {} snapshots; --snapshots-metadata removes their records too (their images stay)",
            snapshots.len()
        )));
    }
    store.remove_domain(name)?;
    store.purge_domain_dir(name)
}

pub fn dump_xml(store: &Store, name: &str, flags: DumpXmlFlags) -> Result<String> {
    if flags.refresh_chain {
        return edit(store, name, |dom| {
            define::refresh_chains(dom)?;
            Ok(dom.to_xml())
        });
    }
    Ok(load(store, name)?.to_xml())
}

pub fn check_chains(store: &Store, name: &str, disk: Option<&str>, fix: bool) -> Result<Vec<DiskChainCheck>> {
    edit(store, name, |dom| define::check_chains(dom, disk, fix))
}

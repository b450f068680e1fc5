//! Persistent domain definitions in the store, for every driver.

use std::path::PathBuf;

use async_trait::async_trait;
use strata_core::define;
use strata_core::diskset;
use strata_core::driver::{
    DefineFlags, DefineOutcome, DiskChainCheck, DiskSetOps, DiskSetOutcome, DomainState, DomainSummary, DumpXmlFlags,
};
use strata_core::pool::PoolManager;
use strata_core::store::{no_such_domain, ReadMark, Store};
use strata_core::xml::{Disk, Domain};
use strata_core::{Error, ErrorKind, Result};

use crate::view::TransparentOver;

/// What the store holds as a domain's persistent definition.
enum Stored {
    Missing,
    /// A file that cannot be read or parsed, or that names another domain
    /// (written by hand, or by a Strata without today's limits).
    Damaged {
        path: PathBuf,
        reason: String,
    },
    Defined(Domain, ReadMark),
}

fn read(store: &Store, name: &str) -> Result<Stored> {
    let path = store.domain_dir(name)?.join("domain.xml");
    let damaged = |reason: String| Stored::Damaged { path: path.clone(), reason };
    let (xml, mark) = match store.read_domain_marked(name) {
        Ok(Some(read)) => read,
        Ok(None) => return Ok(Stored::Missing),
        Err(e) => return Ok(damaged(e.report())),
    };
    Ok(match Domain::parse(&xml) {
        Ok(dom) if dom.name() == name => Stored::Defined(dom, mark),
        Ok(dom) => damaged(format!("it defines domain '{}'", dom.name())),
        Err(e) => damaged(e.report()),
    })
}

/// Reads a domain's persistent definition. A damaged one is a store error
/// naming the file and why, which `list` shows for that domain alone.
pub fn load(store: &Store, name: &str) -> Result<Domain> {
    Ok(load_marked(store, name)?.0)
}

/// [`load`], with the mark of the file read (see [`reload_if_replaced`]).
pub fn load_marked(store: &Store, name: &str) -> Result<(Domain, ReadMark)> {
    match read(store, name)? {
        Stored::Defined(dom, mark) => Ok((dom, mark)),
        Stored::Missing => Err(no_such_domain(name)),
        Stored::Damaged { path, reason } => Err(Error::new(
            ErrorKind::StoreFormat,
            format!(
                "the definition of domain '{name}' in '{}' is damaged: {reason}; undefine the domain or define it again",
                path.display()
            ),
        )),
    }
}

/// `dom`, read by [`load_marked`] with `mark`, if the store still holds
/// that file, else the definition read again: for a caller that takes the
/// domain lock after reading and must not overwrite a change made before it
/// (parsing a definition on a deep chain costs milliseconds).
pub fn reload_if_replaced(store: &Store, name: &str, dom: Domain, mark: &ReadMark) -> Result<Domain> {
    if mark.unchanged()? {
        Ok(dom)
    } else {
        load(store, name)
    }
}

/// Refuses a domain the store does not have, without reading its
/// definition: for a caller that reads a running domain from its status
/// and needs only libvirt's no-domain error for an unknown name (parsing a
/// definition on a deep chain costs milliseconds, and a snapshot asked for
/// the running domain several times).
pub fn require_known(store: &Store, name: &str) -> Result<()> {
    if store.is_defined(name)? {
        Ok(())
    } else {
        Err(no_such_domain(name))
    }
}

/// Every domain the store defines, for `list`: its definition, or the
/// row of one whose definition is damaged (which must not hide the
/// others). A domain undefined while the names were read is left out.
pub fn list(store: &Store) -> Result<Vec<std::result::Result<Domain, DomainSummary>>> {
    list_named(store, store.list_domains()?)
}

/// [`list`] of the domains `names` ([`Store::list_domains`], read by the
/// caller).
pub fn list_named(store: &Store, names: Vec<String>) -> Result<Vec<std::result::Result<Domain, DomainSummary>>> {
    let mut out = Vec::new();
    for name in names {
        match load(store, &name) {
            Ok(dom) => out.push(Ok(dom)),
            Err(e) if e.kind() == ErrorKind::StoreFormat => out.push(Err(DomainSummary {
                id: None,
                name,
                uuid: String::new(),
                state: DomainState::Damaged,
                reason: None,
                persistent: true,
                damaged: Some(e.message().to_string()),
            })),
            Err(e) if e.kind() == ErrorKind::NoDomain => {}
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// Runs `change` on the definition under the domain lock and saves it only
/// if `change` succeeds, so a failed edit leaves the stored XML untouched,
/// and only if it changed anything, so a check that finds nothing to fix
/// writes nothing (and works on a read-only store).
pub fn edit<T>(store: &Store, name: &str, change: impl FnOnce(&mut Domain) -> Result<T>) -> Result<T> {
    let _lock = store.lock_domain(name)?;
    let mut dom = load(store, name)?;
    let before = dom.to_xml();
    let out = change(&mut dom)?;
    let after = dom.to_xml();
    if after != before {
        store.write_domain(name, &after)?;
    }
    Ok(out)
}

/// Defines or redefines a domain. A new definition replaces a damaged one
/// (with a warning): the snapshot records of the domain stay, where
/// undefining it first would need `--snapshots-metadata` and drop them.
pub fn define(store: &Store, xml: &str, flags: DefineFlags) -> Result<DefineOutcome> {
    define_for(store, xml, flags, "qemu", &["kvm", "qemu"], |_| Ok(()))
}

/// [`define()`] for the driver named `driver`, which runs domains of the
/// `types` given and checks what else it needs of a definition with
/// `validate` before anything is written.
pub fn define_for(
    store: &Store,
    xml: &str,
    flags: DefineFlags,
    driver: &str,
    types: &[&str],
    validate: impl FnOnce(&Domain) -> Result<()>,
) -> Result<DefineOutcome> {
    let mut dom = Domain::parse(xml)?;
    match dom.domain_type() {
        Some(t) if types.contains(&t) => {}
        Some(other) => {
            let expected: Vec<String> = types.iter().map(|t| format!("'{t}'")).collect();
            return Err(Error::config_unsupported(format!(
                "domain type '{other}' is not supported by the {driver} driver (expected {})",
                expected.join(" or ")
            )));
        }
        None => return Err(Error::xml("the <domain> has no 'type' attribute")),
    }
    validate(&dom)?;
    for disk in dom.disks()? {
        check_transient_disk(&disk)?;
    }
    define::assign_macs(&mut dom)?;
    let name = dom.name();
    // Probing reads every image of every chain: done before any lock.
    let mut warnings = define::prepare_volume_disks(&mut dom, &PoolManager::new(store.clone()), flags.validate)?;
    warnings.extend(define::prepare_disks(&mut dom, flags.validate)?);
    // The store-wide lock makes the checks below and the write one step,
    // so concurrent defines cannot give one UUID to two names.
    let _definitions = store.lock_definitions()?;
    let _lock = store.lock_domain_to_define(&name)?;
    match read(store, &name)? {
        Stored::Defined(existing, _) => match (existing.uuid(), dom.uuid()) {
            (Some(old), Some(new)) if old != new => {
                return Err(Error::new(
                    ErrorKind::DomainExists,
                    format!("domain '{name}' is already defined with uuid {old}"),
                ))
            }
            (Some(old), None) => dom.set_uuid(&old),
            _ => {}
        },
        Stored::Damaged { path, reason } => {
            warnings.push(format!("replacing the damaged definition in '{}': {reason}", path.display()))
        }
        Stored::Missing => {}
    }
    let uuid = dom.ensure_uuid();
    for other in store.list_domains()? {
        if other == name {
            continue;
        }
        // A damaged definition's UUID cannot be known; it is not checked.
        if let Stored::Defined(d, _) = read(store, &other)? {
            if d.uuid().as_deref() == Some(uuid.as_str()) {
                return Err(Error::new(
                    ErrorKind::DomainExists,
                    format!("domain '{other}' already exists with uuid {uuid}"),
                ));
            }
        }
    }
    let out = dom.to_xml();
    // Recorded chains make a definition larger than its input: it must stay
    // within what the store reads back.
    dom.check_readable(&out).map_err(|e| e.context("the definition with its backing chains recorded"))?;
    store.write_domain(&name, &out)?;
    Ok(DefineOutcome { name, warnings })
}

/// Removes the definition, damaged or not, and with `snapshots_metadata`
/// the snapshot records (never an image); the caller holds the domain lock.
pub fn undefine(store: &Store, name: &str, snapshots_metadata: bool) -> Result<()> {
    if let Stored::Missing = read(store, name)? {
        return Err(no_such_domain(name));
    }
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
    edit(store, name, |dom| define::check_chains_in_pools(dom, disk, fix, &PoolManager::new(store.clone())))
}

/// Checks that a transient disk is one an overlay can be put on: a
/// writable, unshared local file behind a `disk` device.
pub fn check_transient_disk(disk: &Disk) -> Result<()> {
    if !disk.transient {
        return Ok(());
    }
    let t = &disk.target;
    let refuse = |why: &str| Err(Error::config_unsupported(format!("transient disk '{t}' {why}")));
    if disk.device != "disk" {
        return refuse(&format!("must be a 'disk' device, not '{}'", disk.device));
    }
    if disk.readonly {
        return refuse("must not be read-only (<readonly/>): it is writable and its writes are thrown away");
    }
    if disk.shareable {
        return refuse("must not be shareable: its writes go to an overlay private to this domain");
    }
    match disk.source() {
        None => refuse("has no image"),
        Some(s) if disk.disk_type != "file" || s.local_path().is_none() => {
            refuse(&format!("must be a local file (type 'file'), not '{}'", disk.disk_type))
        }
        Some(_) => Ok(()),
    }
}

/// Seed 004's disk sets, kept in the persistent definitions of a store:
/// a driver with a state store hands out core's `DiskSetOps` as this view
/// of its store ([`StoredDiskSets::over`]). A set holds disks by target
/// and filesystems by target dir.
#[repr(transparent)]
pub struct StoredDiskSets {
    store: Store,
}

// SAFETY: StoredDiskSets is repr(transparent) over its one field, a Store.
unsafe impl TransparentOver for StoredDiskSets {
    type Inner = Store;
}

impl StoredDiskSets {
    /// The disk sets of the domains in `store`, borrowed for as long as the view.
    pub fn over(store: &Store) -> &StoredDiskSets {
        crate::view::over(store)
    }
}

#[async_trait]
impl DiskSetOps for StoredDiskSets {
    async fn diskset_add(&self, domain: &str, disk: &str) -> Result<DiskSetOutcome> {
        edit(&self.store, domain, |dom| diskset::set_selected(dom, disk, true))
    }

    async fn diskset_remove(&self, domain: &str, disk: &str) -> Result<DiskSetOutcome> {
        edit(&self.store, domain, |dom| diskset::set_selected(dom, disk, false))
    }

    async fn diskset_add_all(&self, domain: &str) -> Result<usize> {
        edit(&self.store, domain, |dom| {
            diskset::set_all(dom, true)?;
            Ok(diskset::selected(dom)?.len())
        })
    }

    async fn diskset_remove_all(&self, domain: &str) -> Result<usize> {
        edit(&self.store, domain, |dom| diskset::set_all(dom, false))
    }

    async fn diskset_list(&self, domain: &str) -> Result<Vec<String>> {
        diskset::selected(&load(&self.store, domain)?)
    }
}

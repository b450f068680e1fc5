//! Seed 000's rules for backing chains when a domain is defined, refreshed
//! or checked, shared by every driver that keeps domain XML.
//!
//! A `<backingStore>` given in the XML is trusted; an absent one is probed
//! and filled in; validation probes anyway and reports every mismatch.

use std::path::PathBuf;

use crate::chain::{self, Backing, Chain, MissingBacking, StorageSource};
use crate::driver::DiskChainCheck;
use crate::error::{Error, ErrorKind, Result};
use crate::pool::PoolManager;
use crate::xml::{Disk, Domain};

/// The format the active layer is opened with: the XML's, else raw. The
/// top image is never probed, as a guest controls its content.
fn top_format(disk: &Disk) -> String {
    disk.format.clone().unwrap_or_else(|| "raw".to_string())
}

/// What the images say the disk's chain is.
pub fn probe_disk(disk: &Disk) -> Result<Option<Chain>> {
    probe_disk_with(disk, chain::probe_chain)
}

/// What the images say the disk's chain is, down to a local backing file
/// that does not exist, if one does not.
fn probe_disk_to_missing(disk: &Disk) -> Result<Option<(Chain, Option<MissingBacking>)>> {
    probe_disk_with(disk, chain::probe_chain_to_missing)
}

fn probe_disk_with<T>(disk: &Disk, probe: impl Fn(&StorageSource, &str) -> Result<T>) -> Result<Option<T>> {
    let Some(source) = disk.source() else { return Ok(None) };
    if source.local_path().is_none() {
        return Ok(None);
    }
    probe(source, &top_format(disk)).map(Some).map_err(|e| e.context(format!("disk '{}'", disk.target)))
}

/// `disk 'vda': backing file '/b' of '/t' does not exist`.
fn missing_backing(disk: &Disk, missing: &MissingBacking) -> String {
    format!(
        "disk '{}': backing file '{}' of '{}' does not exist",
        disk.target,
        missing.backing.display(),
        missing.image.display()
    )
}

/// Fills in and checks the chains of a domain about to be defined.
/// Returns warnings for the user.
pub fn prepare_disks(dom: &mut Domain, validate: bool) -> Result<Vec<String>> {
    let mut warnings = Vec::new();
    for disk in dom.disks()? {
        let Some(chain) = &disk.chain else { continue };
        let Some(top) = chain.top() else { continue };
        let Some(path) = top.source.local_path() else { continue };
        if !path.is_absolute() {
            return Err(Error::invalid_arg(format!(
                "disk '{}' has a relative source path '{}'; give an absolute path",
                disk.target,
                path.display()
            )));
        }
        if disk.format.is_none() && disk.device == "disk" {
            warnings.push(format!(
                "disk '{}' has no <driver type>; it is treated as raw (the top image is never probed)",
                disk.target
            ));
        }
        let recorded = top.backing != Backing::Unknown;
        if !path.exists() {
            if validate && recorded {
                return Err(Error::new(
                    ErrorKind::ChainMismatch,
                    format!(
                        "disk '{}': image '{}' does not exist, so its chain cannot be validated",
                        disk.target,
                        path.display()
                    ),
                ));
            }
            let mut fixed = chain.clone();
            if top_format(&disk) == "raw" {
                fixed.end_at(0);
            } else if !recorded {
                warnings.push(format!(
                    "disk '{}': image '{}' does not exist yet; its chain will be probed when the domain starts or on dumpxml --refresh-chain",
                    disk.target,
                    path.display()
                ));
            }
            fixed.layers[0].format = Some(top_format(&disk));
            fixed.renumber();
            dom.set_disk_chain(&disk.target, &fixed)?;
            continue;
        }
        if recorded && !validate {
            let mut trusted = chain.clone();
            trusted.layers[0].format = Some(top_format(&disk));
            trusted.renumber();
            dom.set_disk_chain(&disk.target, &trusted)?;
            continue;
        }
        let found = if validate {
            probe_disk(&disk)?
        } else {
            // A missing backing file does not refuse the definition: the
            // chain is recorded down to it, and start refuses until it exists.
            probe_disk_to_missing(&disk)?.map(|(found, missing)| {
                if let Some(missing) = missing {
                    warnings.push(format!(
                        "{}; the chain is recorded down to it, and the domain cannot start until it exists",
                        missing_backing(&disk, &missing)
                    ));
                }
                found
            })
        };
        let Some(found) = found else { continue };
        if recorded {
            refuse_mismatch(&disk.target, chain, &found)?;
        }
        dom.set_disk_chain(&disk.target, &found)?;
    }
    Ok(warnings)
}

/// Refuses a chain given in the XML that differs from what the images say.
fn refuse_mismatch(target: &str, recorded: &Chain, found: &Chain) -> Result<()> {
    let diffs = recorded.differences(found);
    if diffs.is_empty() {
        return Ok(());
    }
    Err(Error::new(
        ErrorKind::ChainMismatch,
        format!(
            "disk '{target}': the backing chain in the XML does not match the images: {}",
            diffs.iter().map(|d| d.what.as_str()).collect::<Vec<_>>().join("; ")
        ),
    ))
}

/// Re-reads every disk's chain from the images and records it
/// (`dumpxml --refresh-chain`). Disks whose images are missing keep theirs.
pub fn refresh_chains(dom: &mut Domain) -> Result<()> {
    for disk in dom.disks()? {
        let exists = disk.source().and_then(|s| s.local_path()).is_some_and(|p| p.exists());
        if !exists {
            continue;
        }
        if let Some(found) = probe_disk(&disk)? {
            dom.set_disk_chain(&disk.target, &found)?;
        }
    }
    Ok(())
}

/// Probes the disks whose chain is not known yet (an image created after
/// the domain was defined), failing if an image is still missing.
pub fn probe_missing_chains(dom: &mut Domain) -> Result<()> {
    for disk in dom.disks()? {
        let Some(chain) = &disk.chain else { continue };
        if chain.is_complete() {
            continue;
        }
        if let Some(path) = disk.source().and_then(|s| s.local_path()) {
            if !path.exists() {
                return Err(Error::operation_invalid(format!(
                    "disk '{}': image '{}' does not exist",
                    disk.target,
                    path.display()
                )));
            }
        }
        if let Some((found, missing)) = probe_disk_to_missing(&disk)? {
            if let Some(missing) = missing {
                return Err(Error::operation_invalid(format!(
                    "{}; create it, or point the image at an existing one with qemu-img rebase -u",
                    missing_backing(&disk, &missing)
                )));
            }
            dom.set_disk_chain(&disk.target, &found)?;
        }
    }
    Ok(())
}

/// `domblkcheck`: compares each recorded chain with the images; with `fix`,
/// records what the images say.
pub fn check_chains(dom: &mut Domain, only: Option<&str>, fix: bool) -> Result<Vec<DiskChainCheck>> {
    let disks = match only {
        Some(name) => vec![dom.find_disk(name)?],
        None => dom.disks()?,
    };
    let mut out = Vec::new();
    for disk in disks {
        let Some(recorded) = &disk.chain else { continue };
        let mut check =
            DiskChainCheck { disk: disk.target.clone(), differences: Vec::new(), error: None, fixed: false };
        match probe_disk(&disk) {
            Ok(Some(found)) => {
                check.differences = recorded.differences(&found);
                if recorded.top().is_some_and(|t| t.backing == Backing::Unknown) {
                    check
                        .differences
                        .push(chain::ChainDifference { index: 0, what: "no backing chain is recorded".to_string() });
                }
                if fix && !check.differences.is_empty() {
                    dom.set_disk_chain(&disk.target, &found)?;
                    check.fixed = true;
                }
            }
            Ok(None) => {}
            Err(e) => check.error = Some(e.report()),
        }
        out.push(check);
    }
    Ok(out)
}

/// The pool and volume a `<disk type='volume'>` names, if it is one.
fn volume_of(disk: &Disk) -> Option<(&str, &str)> {
    match disk.source()? {
        StorageSource::Volume { pool, volume } => Some((pool, volume)),
        _ => None,
    }
}

/// The file a volume disk's volume is, through its pool; a missing pool or
/// volume (or one whose pool is not running) is an error naming the disk.
fn volume_disk_path(disk: &Disk, pools: &PoolManager) -> Result<Option<PathBuf>> {
    let Some((pool, volume)) = volume_of(disk) else { return Ok(None) };
    pools.volume_path(pool, volume).map(Some).map_err(|e| e.context(format!("disk '{}'", disk.target)))
}

/// Records the chain of each `<disk type='volume'>` of a domain about to be
/// defined, probed below the volume's file; the disk keeps naming its pool
/// and volume. A chain the XML gives is trusted unless `validate`. A volume
/// that cannot be found now (no such pool or volume, a pool not running)
/// does not refuse the definition, as in libvirt: it is a warning, and
/// `start` refuses until the volume can be found; `validate` refuses it.
/// Returns the warnings.
pub fn prepare_volume_disks(dom: &mut Domain, pools: &PoolManager, validate: bool) -> Result<Vec<String>> {
    let mut warnings = Vec::new();
    for disk in dom.disks()? {
        let path = match volume_disk_path(&disk, pools) {
            Ok(Some(path)) => path,
            Ok(None) => continue,
            Err(e) if !validate && volume_not_found(&e) => {
                warnings.push(format!("{}; the domain cannot start until it can be found", e.detail()));
                continue;
            }
            Err(e) => return Err(e),
        };
        let Some(recorded) = &disk.chain else { continue };
        let known = recorded.top().is_some_and(|t| t.backing != Backing::Unknown);
        if known && !validate {
            continue;
        }
        let mut found = chain::probe_chain(&StorageSource::File { path }, &top_format(&disk))
            .map_err(|e| e.context(format!("disk '{}'", disk.target)))?;
        found.layers[0].source = recorded.layers[0].source.clone();
        if known {
            refuse_mismatch(&disk.target, recorded, &found)?;
        }
        dom.set_disk_chain(&disk.target, &found)?;
    }
    Ok(warnings)
}

/// Whether looking a volume up failed because its pool or volume is not
/// there (or not running) now, rather than for a reason that stays.
fn volume_not_found(e: &Error) -> bool {
    matches!(e.kind(), ErrorKind::NoStoragePool | ErrorKind::NoStorageVol | ErrorKind::OperationInvalid)
}

/// The domain with each volume disk's active layer as the volume's file,
/// for a driver that opens files (the definition keeps the volume).
pub fn resolve_volume_disks(dom: &Domain, pools: &PoolManager) -> Result<Domain> {
    let mut resolved = dom.clone();
    for disk in dom.disks()? {
        let Some(path) = volume_disk_path(&disk, pools)? else { continue };
        let Some(mut chain) = disk.chain.clone() else { continue };
        chain.layers[0].source = StorageSource::local(path);
        resolved.set_disk_chain(&disk.target, &chain)?;
    }
    Ok(resolved)
}

/// A chain read from the hypervisor, with its active layer named as the
/// recorded disk names it: a volume disk's file is shown as its volume.
pub fn live_chain_as_recorded(disk: &Disk, live: &Chain, pools: &PoolManager) -> Chain {
    let mut chain = live.clone();
    let volume_file = volume_disk_path(disk, pools).ok().flatten();
    let same_file = |p: &std::path::Path| volume_file.as_deref().is_some_and(|v| p == v);
    if chain.top().and_then(|t| t.source.local_path()).is_some_and(same_file) {
        if let Some(source) = disk.source() {
            chain.layers[0].source = source.clone();
        }
    }
    chain
}

/// `domblkcheck` for a domain that may have volume disks: each is checked
/// below its volume's file, and a fixed chain keeps naming the volume.
pub fn check_chains_in_pools(
    dom: &mut Domain,
    only: Option<&str>,
    fix: bool,
    pools: &PoolManager,
) -> Result<Vec<DiskChainCheck>> {
    let mut resolved = resolve_volume_disks(dom, pools)?;
    let checks = check_chains(&mut resolved, only, fix)?;
    for check in checks.iter().filter(|c| c.fixed) {
        let recorded = dom.find_disk(&check.disk)?;
        if let Some(found) = resolved.find_disk(&check.disk)?.chain {
            dom.set_disk_chain(&check.disk, &live_chain_as_recorded(&recorded, &found, pools))?;
        }
    }
    Ok(checks)
}

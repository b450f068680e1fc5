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
use crate::xml::{Disk, Domain, StorageAddress, StorageDevice};

/// The format the active layer is opened with: the XML's, else raw. The
/// top image is never probed, as a guest controls its content.
fn top_format(format: Option<&str>) -> String {
    format.unwrap_or("raw").to_string()
}

/// What the images say the chain of a disk or filesystem is; `None` when
/// it holds no local image.
pub fn probe_device(device: &StorageDevice) -> Result<Option<Chain>> {
    probe_device_with(device, chain::probe_chain)
}

/// What the images say the device's chain is, down to a local backing file
/// that does not exist, if one does not.
fn probe_device_to_missing(device: &StorageDevice) -> Result<Option<(Chain, Option<MissingBacking>)>> {
    probe_device_with(device, chain::probe_chain_to_missing)
}

fn probe_device_with<T>(
    device: &StorageDevice,
    probe: impl Fn(&StorageSource, &str) -> Result<T>,
) -> Result<Option<T>> {
    let Some(source) = device.source() else { return Ok(None) };
    if source.local_path().is_none() {
        return Ok(None);
    }
    probe(source, &top_format(device.format())).map(Some).map_err(|e| e.context(device.to_string()))
}

/// `disk 'vda': backing file '/b' of '/t' does not exist`.
fn missing_backing(device: &StorageDevice, missing: &MissingBacking) -> String {
    format!("{device}: backing file '{}' of '{}' does not exist", missing.backing.display(), missing.image.display())
}

/// The warning for a device whose XML gives no format for its image.
fn no_format_warning(device: &StorageDevice) -> Option<String> {
    let element = match device {
        StorageDevice::Disk(d) if d.format.is_none() && d.device == "disk" => "<driver type>",
        StorageDevice::Filesystem(f) if f.driver.format.is_none() => "<driver format>",
        _ => return None,
    };
    Some(format!("{device} has no {element}; it is treated as raw (the top image is never probed)"))
}

/// Fills in and checks the chains of a domain about to be defined: those
/// of its disks and of its filesystems that hold an image (`file`,
/// `block`), by the same rules. Returns warnings for the user.
pub fn prepare_disks(dom: &mut Domain, validate: bool) -> Result<Vec<String>> {
    let mut warnings = Vec::new();
    for device in dom.storage_devices()? {
        let Some(chain) = device.chain() else { continue };
        let Some(top) = chain.top() else { continue };
        let Some(path) = top.source.local_path() else { continue };
        if !path.is_absolute() {
            return Err(Error::invalid_arg(format!(
                "{device} has a relative source path '{}'; give an absolute path",
                path.display()
            )));
        }
        warnings.extend(no_format_warning(&device));
        let address = device.address();
        let format = top_format(device.format());
        let recorded = top.backing != Backing::Unknown;
        if !path.exists() {
            if validate && recorded {
                return Err(Error::new(
                    ErrorKind::ChainMismatch,
                    format!("{device}: image '{}' does not exist, so its chain cannot be validated", path.display()),
                ));
            }
            let mut fixed = chain.clone();
            if format == "raw" {
                fixed.end_at(0);
            } else if !recorded {
                warnings.push(format!(
                    "{device}: image '{}' does not exist yet; its chain will be probed when the domain starts or on dumpxml --refresh-chain",
                    path.display()
                ));
            }
            fixed.layers[0].format = Some(format);
            fixed.renumber();
            dom.set_storage_chain(&address, &fixed)?;
            continue;
        }
        if recorded && !validate {
            let mut trusted = chain.clone();
            trusted.layers[0].format = Some(format);
            trusted.renumber();
            dom.set_storage_chain(&address, &trusted)?;
            continue;
        }
        let found = if validate {
            probe_device(&device)?
        } else {
            // A missing backing file does not refuse the definition: the
            // chain is recorded down to it, and start refuses until it exists.
            probe_device_to_missing(&device)?.map(|(found, missing)| {
                if let Some(missing) = missing {
                    warnings.push(format!(
                        "{}; the chain is recorded down to it, and the domain cannot start until it exists",
                        missing_backing(&device, &missing)
                    ));
                }
                found
            })
        };
        let Some(found) = found else { continue };
        if recorded {
            refuse_mismatch(&address, chain, &found)?;
        }
        dom.set_storage_chain(&address, &found)?;
    }
    Ok(warnings)
}

/// Gives each interface without a `<mac>` one in libvirt's range for
/// QEMU guests (`52:54:00:xx:xx:xx`), recorded in the definition so the
/// guest sees the same NIC at every start; a MAC another interface of the
/// domain has is not given twice.
pub fn assign_macs(dom: &mut Domain) -> Result<()> {
    let interfaces = dom.interfaces()?;
    let mut taken: Vec<String> = interfaces.iter().filter_map(|i| i.mac.as_ref().map(|m| m.to_lowercase())).collect();
    for (index, iface) in interfaces.iter().enumerate() {
        if iface.mac.is_some() {
            continue;
        }
        let mac = loop {
            let random = uuid::Uuid::new_v4();
            let bytes = random.as_bytes();
            let mac = crate::xml::generated_mac([bytes[0], bytes[1], bytes[2]]);
            if !taken.contains(&mac) {
                break mac;
            }
        };
        dom.set_interface_mac(index, &mac)?;
        taken.push(mac);
    }
    Ok(())
}

/// Refuses a chain given in the XML that differs from what the images say.
fn refuse_mismatch(device: &StorageAddress, recorded: &Chain, found: &Chain) -> Result<()> {
    let diffs = recorded.differences(found);
    if diffs.is_empty() {
        return Ok(());
    }
    Err(Error::new(
        ErrorKind::ChainMismatch,
        format!(
            "{device}: the backing chain in the XML does not match the images: {}",
            diffs.iter().map(|d| d.what.as_str()).collect::<Vec<_>>().join("; ")
        ),
    ))
}

/// Re-reads the chain of every disk and image filesystem from the images
/// and records it (`dumpxml --refresh-chain`). Devices whose images are
/// missing keep theirs.
pub fn refresh_chains(dom: &mut Domain) -> Result<()> {
    for device in dom.storage_devices()? {
        let exists = device.source().and_then(|s| s.local_path()).is_some_and(|p| p.exists());
        if !exists {
            continue;
        }
        if let Some(found) = probe_device(&device)? {
            dom.set_storage_chain(&device.address(), &found)?;
        }
    }
    Ok(())
}

/// Probes the disks and filesystems whose chain is not known yet (an
/// image created after the domain was defined), failing if an image is
/// still missing.
pub fn probe_missing_chains(dom: &mut Domain) -> Result<()> {
    for device in dom.storage_devices()? {
        let Some(chain) = device.chain() else { continue };
        if chain.is_complete() {
            continue;
        }
        if let Some(path) = device.source().and_then(|s| s.local_path()) {
            if !path.exists() {
                return Err(Error::operation_invalid(format!("{device}: image '{}' does not exist", path.display())));
            }
        }
        if let Some((found, missing)) = probe_device_to_missing(&device)? {
            if let Some(missing) = missing {
                return Err(Error::operation_invalid(format!(
                    "{}; create it, or point the image at an existing one with qemu-img rebase -u",
                    missing_backing(&device, &missing)
                )));
            }
            dom.set_storage_chain(&device.address(), &found)?;
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
    for device in disks.into_iter().map(StorageDevice::Disk) {
        let Some(recorded) = device.chain() else { continue };
        let mut check =
            DiskChainCheck { disk: device.name().to_string(), differences: Vec::new(), error: None, fixed: false };
        match probe_device(&device) {
            Ok(Some(found)) => {
                check.differences = recorded.differences(&found);
                if recorded.top().is_some_and(|t| t.backing == Backing::Unknown) {
                    check
                        .differences
                        .push(chain::ChainDifference { index: 0, what: "no backing chain is recorded".to_string() });
                }
                if fix && !check.differences.is_empty() {
                    dom.set_storage_chain(&device.address(), &found)?;
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
        let address = StorageAddress::Disk(disk.target.clone());
        let mut found = chain::probe_chain(&StorageSource::File { path }, &top_format(disk.format.as_deref()))
            .map_err(|e| e.context(address.to_string()))?;
        found.layers[0].source = recorded.layers[0].source.clone();
        if known {
            refuse_mismatch(&address, recorded, &found)?;
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

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::{assign_macs, prepare_disks, refresh_chains};
    use crate::error::ErrorKind;
    use crate::tool::run_tool;
    use crate::xml::{Domain, Filesystem};

    fn qemu_img(args: &[&str]) -> String {
        run_tool("qemu-img", args).unwrap_or_else(|e| panic!("{e}"))
    }

    fn path_str(path: &Path) -> &str {
        path.to_str().expect("temporary paths are UTF-8")
    }

    /// `base.qcow2` ← `root.qcow2` (a relative backing name, as users
    /// make them) and a raw `home.img`, in `dir`.
    fn images(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
        let (base, root, home) = (dir.join("base.qcow2"), dir.join("root.qcow2"), dir.join("home.img"));
        qemu_img(&["create", "-q", "-f", "qcow2", path_str(&base), "16M"]);
        qemu_img(&["create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", path_str(&root)]);
        qemu_img(&["create", "-q", "-f", "raw", path_str(&home), "16M"]);
        (base, root, home)
    }

    /// A container whose root is `root` (qcow2), with `home` (raw) at
    /// `/home` and a host directory at `/srv`; `extra` goes inside the
    /// root's `<filesystem>`.
    fn container(root: &Path, home: &Path, extra: &str) -> Domain {
        let xml = format!(
            "<domain type='lxc'><name>ct</name><devices>\
             <filesystem type='file' accessmode='passthrough'><driver type='nbd' format='qcow2'/>\
             <source file='{}'/>{extra}<target dir='/'/></filesystem>\
             <filesystem type='file'><driver type='loop' format='raw'/><source file='{}'/><target dir='/home'/></filesystem>\
             <filesystem type='mount'><source dir='/srv'/><target dir='/srv'/></filesystem>\
             </devices></domain>",
            root.display(),
            home.display()
        );
        Domain::parse(&xml).expect("parses")
    }

    fn filesystem(dom: &Domain, dir: &str) -> Filesystem {
        dom.filesystems().expect("parse").into_iter().find(|f| f.target == dir).expect("mounted there")
    }

    /// The image paths of `qemu-img info --backing-chain`, top first.
    fn chain_on_disk(image: &Path) -> Vec<PathBuf> {
        let json = qemu_img(&["info", "--backing-chain", "--output=json", "-f", "qcow2", path_str(image)]);
        let layers: serde_json::Value = serde_json::from_str(&json).expect("qemu-img prints JSON");
        let layers = layers.as_array().expect("one entry per layer");
        layers.iter().map(|l| PathBuf::from(l["filename"].as_str().expect("a filename"))).collect()
    }

    /// The image paths of a filesystem's recorded chain, top first.
    fn recorded_paths(fs: &Filesystem) -> Vec<PathBuf> {
        let chain = fs.chain.as_ref().expect("a chain");
        chain.main_line().iter().filter_map(|l| l.source.local_path().map(Path::to_path_buf)).collect()
    }

    #[test]
    fn define_records_the_chain_of_an_image_filesystem_as_the_images_have_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (base, root, home) = images(dir.path());
        let mut dom = container(&root, &home, "");
        assert_eq!(filesystem(&dom, "/").chain.expect("a chain").layers.len(), 1, "not probed yet");

        let warnings = prepare_disks(&mut dom, false).expect("prepared");
        assert!(warnings.is_empty(), "{warnings:?}");
        let fs = filesystem(&dom, "/");
        assert_eq!(recorded_paths(&fs), [root.clone(), base.clone()]);
        assert_eq!(recorded_paths(&fs), chain_on_disk(&root), "the chain qemu-img reads");
        let chain = fs.chain.as_ref().expect("a chain");
        assert!(chain.is_complete(), "down to an empty <backingStore/>");
        assert_eq!(chain.layers[1].format.as_deref(), Some("qcow2"));
        let home_chain = filesystem(&dom, "/home").chain.expect("a chain");
        assert_eq!((home_chain.layers.len(), home_chain.is_complete()), (1, true), "raw: <backingStore/>");
        assert_eq!(filesystem(&dom, "/srv").chain, None, "a directory has no chain");

        let xml = dom.to_xml();
        let backing = format!("<backingStore type='file' index='1'>\n        <format type='qcow2'/>\n        <source file='{}'/>\n        <backingStore/>", base.display());
        assert!(xml.contains(&backing), "{xml}");
        assert!(xml.contains("<driver type='nbd' format='qcow2'/>"), "the driver is kept: {xml}");
        assert!(xml.contains("<filesystem type='file' accessmode='passthrough'>"), "{xml}");
    }

    #[test]
    fn a_filesystem_chain_that_differs_from_the_images_is_refused_on_validate() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_, root, home) = images(dir.path());
        let wrong = "<backingStore type='file'><format type='qcow2'/><source file='/elsewhere.qcow2'/><backingStore/></backingStore>";
        let mut dom = container(&root, &home, wrong);
        let err = prepare_disks(&mut dom.clone(), true).expect_err("a mismatch");
        assert_eq!(err.kind(), ErrorKind::ChainMismatch);
        assert!(
            err.to_string().contains("filesystem '/': the backing chain in the XML does not match the images"),
            "{err}"
        );
        prepare_disks(&mut dom, false).expect("a recorded chain is trusted without validate");
        assert_eq!(recorded_paths(&filesystem(&dom, "/"))[1], PathBuf::from("/elsewhere.qcow2"));
    }

    #[test]
    fn a_filesystem_gets_the_warnings_a_disk_gets() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (base, root, home) = images(dir.path());
        std::fs::remove_file(&base).expect("remove the base");
        let xml = container(&root, &home, "").to_xml().replace("<driver type='loop' format='raw'/>", "");
        let mut dom = Domain::parse(&xml).expect("parses");
        let warnings = prepare_disks(&mut dom, false).expect("a missing backing file does not refuse");
        assert_eq!(
            warnings,
            [
                format!(
                    "filesystem '/': backing file '{}' of '{}' does not exist; the chain is recorded down to it, \
                     and the domain cannot start until it exists",
                    base.display(),
                    root.display()
                ),
                "filesystem '/home' has no <driver format>; it is treated as raw (the top image is never probed)"
                    .to_string(),
            ]
        );
        assert_eq!(recorded_paths(&filesystem(&dom, "/")), [root, base]);
    }

    #[test]
    fn a_refreshed_filesystem_chain_is_the_one_on_disk() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (base, root, home) = images(dir.path());
        let mut dom = container(&root, &home, "");
        prepare_disks(&mut dom, false).expect("prepared");
        let other = dir.path().join("other.qcow2");
        qemu_img(&["create", "-q", "-f", "qcow2", path_str(&other), "16M"]);
        qemu_img(&["rebase", "-u", "-f", "qcow2", "-b", path_str(&other), "-F", "qcow2", path_str(&root)]);
        assert_eq!(chain_on_disk(&root), [root.clone(), other.clone()], "the image now reads through other");
        assert_eq!(recorded_paths(&filesystem(&dom, "/")), [root.clone(), base]);
        refresh_chains(&mut dom).expect("refreshed");
        assert_eq!(recorded_paths(&filesystem(&dom, "/")), chain_on_disk(&root));
    }

    #[test]
    fn interfaces_without_a_mac_get_distinct_ones_in_libvirts_range() {
        let xml = "<domain type='qemu'><name>vm</name><devices>\
                   <interface type='user'/><interface type='user'><mac address='52:54:00:00:00:01'/></interface>\
                   <interface type='network'><source network='default'/></interface></devices></domain>";
        let mut dom = Domain::parse(xml).expect("parses");
        assign_macs(&mut dom).expect("assigned");
        let macs: Vec<String> = dom.interfaces().expect("read").into_iter().filter_map(|i| i.mac).collect();
        assert_eq!(macs.len(), 3, "{macs:?}");
        assert_eq!(macs[1], "52:54:00:00:00:01", "a given MAC stays");
        for mac in [&macs[0], &macs[2]] {
            assert!(mac.starts_with("52:54:00:") && crate::xml::check_mac(mac).is_ok(), "{mac}");
        }
        assert!(macs[0] != macs[2] && macs[0] != macs[1] && macs[2] != macs[1], "{macs:?}");
        let again = dom.to_xml();
        assign_macs(&mut dom).expect("assigned");
        assert_eq!(dom.to_xml(), again, "a MAC once given is kept");
    }
}

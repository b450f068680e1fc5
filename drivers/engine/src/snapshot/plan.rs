//! What `snapshot-create` asks of each disk, resolved against the domain:
//! a pure decision over the definition, the snapshot XML and the disk set.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use strata_core::chain::StorageSource;
use strata_core::options::SnapshotCreateFlags;
use strata_core::xml::{Domain, SnapshotDef, SnapshotDisk};
use strata_core::{Error, Result};

/// What `snapshot-create` asked of each disk, resolved against the domain.
#[derive(Debug, Clone, PartialEq)]
pub struct DiskPlan {
    pub target: String,
    pub mode: String,
    /// The image the disk uses now (the one the snapshot freezes).
    pub image: PathBuf,
    pub format: String,
    /// For external: the new overlay.
    pub overlay: Option<PathBuf>,
}

pub fn default_overlay(image: &Path, snap: &str) -> PathBuf {
    let stem = image.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    image.with_file_name(format!("{stem}.{snap}"))
}

/// `selected`: the disk set, from the persistent definition (it changes
/// while the domain runs; the live definition keeps the start's copy).
pub fn plan_disks(
    dom: &Domain,
    def: &SnapshotDef,
    flags: &SnapshotCreateFlags,
    name: &str,
    selected: &HashSet<String>,
) -> Result<Vec<DiskPlan>> {
    let devices = dom.storage_devices()?;
    let mut asked: HashMap<String, &SnapshotDisk> = HashMap::new();
    for d in &def.disks {
        let device = dom
            .find_storage_device(&d.name)
            .map_err(|_| Error::config_unsupported(format!("no disk named '{}'", d.name)))?;
        if asked.insert(device.name().to_string(), d).is_some() {
            return Err(Error::config_unsupported("too many disk snapshot requests for domain"));
        }
    }
    let default_mode = if flags.disk_only { "external" } else { "internal" };
    let mut plans = Vec::new();
    for device in &devices {
        let device_name = device.name();
        let spec = asked.get(device_name);
        let mut mode = spec.and_then(|s| s.snapshot.clone()).unwrap_or_else(|| default_mode.to_string());
        if flags.disk_set && !selected.contains(device_name) && spec.is_none() {
            mode = "no".into();
        }
        let Some(image) = device.source().and_then(|s| s.local_path()).map(Path::to_path_buf) else {
            if let Some(StorageSource::Volume { pool, volume }) = device.source().filter(|_| mode != "no") {
                return Err(Error::config_unsupported(format!(
                    "{device} is volume '{volume}' of storage pool '{pool}', which snapshots do not support yet; \
                     leave it out with --diskspec {device_name},snapshot=no"
                )));
            }
            if mode != "no" && spec.is_some() {
                return Err(Error::config_unsupported(match device.as_filesystem() {
                    Some(fs) if !fs.fs_type.holds_image() => {
                        format!("{device} is a '{}' filesystem, which holds no image to snapshot", fs.fs_type)
                    }
                    _ => format!("{device} has no local image to snapshot"),
                }));
            }
            continue;
        };
        let not_a_disk = device.as_disk().is_some_and(|d| d.device != "disk");
        if not_a_disk || device.readonly() {
            if spec.is_some_and(|s| s.snapshot.as_deref().is_some_and(|m| m != "no")) {
                return Err(Error::config_unsupported(format!("{device} is read-only and cannot be snapshotted")));
            }
            mode = "no".into();
        }
        if mode != "no" && mode != "manual" {
            device.refuse_if_transient("snapshots").map_err(|e| {
                Error::config_unsupported(format!(
                    "{}; leave it out with --diskspec {device_name},snapshot=no",
                    e.message()
                ))
            })?;
        }
        let format = device.format().unwrap_or("raw").to_string();
        let overlay = if mode == "external" {
            if let Some(t) = spec.and_then(|s| s.driver_type.as_deref()) {
                if t != "qcow2" {
                    return Err(Error::config_unsupported(format!(
                        "external snapshot format for disk {device_name} is unsupported: {t}"
                    )));
                }
            }
            let path = spec
                .and_then(|s| s.source.as_ref())
                .and_then(|s| s.local_path())
                .map(Path::to_path_buf)
                .unwrap_or_else(|| default_overlay(&image, name));
            if !path.is_absolute() {
                return Err(Error::invalid_arg(format!(
                    "external snapshot file for disk {device_name} must be an absolute path: {}",
                    path.display()
                )));
            }
            Some(path)
        } else {
            None
        };
        if mode == "internal" && format != "qcow2" {
            return Err(Error::config_unsupported(format!(
                "internal snapshot for disk {device_name} unsupported for storage type {format}; \
                 use --diskspec {device_name},snapshot=no or an external snapshot"
            )));
        }
        if mode == "manual" {
            mode = "no".into();
        }
        plans.push(DiskPlan { target: device_name.to_string(), mode, image, format, overlay });
    }
    if plans.iter().all(|p| p.mode == "no") {
        return Err(Error::config_unsupported("nothing selected for snapshot"));
    }
    Ok(plans)
}

#[cfg(test)]
// A failed unwrap is how these tests report an unexpected error.
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use strata_core::ErrorKind;

    /// A domain with a qcow2 disk vda, a raw disk vdb, a read-only cdrom
    /// hdc and a volume disk vdc.
    fn domain() -> Domain {
        Domain::parse(
            "<domain type='kvm'><name>vm</name><devices>
               <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
                 <source file='/i/a.qcow2'/><target dev='vda'/></disk>
               <disk type='file' device='disk'><driver name='qemu' type='raw'/>
                 <source file='/i/b.raw'/><target dev='vdb'/></disk>
               <disk type='file' device='cdrom'><driver name='qemu' type='raw'/>
                 <source file='/i/c.iso'/><target dev='hdc'/><readonly/></disk>
               <disk type='volume' device='disk'><driver name='qemu' type='qcow2'/>
                 <source pool='p' volume='v'/><target dev='vdc'/></disk>
             </devices></domain>",
        )
        .unwrap()
    }

    fn snapshot(disks: &str) -> SnapshotDef {
        SnapshotDef::parse(&format!("<domainsnapshot><name>s1</name><disks>{disks}</disks></domainsnapshot>")).unwrap()
    }

    /// vdb and vdc left out, so that the rest can be planned.
    const LEAVE_OUT: &str = "<disk name='vdb' snapshot='no'/><disk name='vdc' snapshot='no'/>";

    fn plan(disks: &str, flags: SnapshotCreateFlags, selected: &[&str]) -> Result<Vec<DiskPlan>> {
        let selected = selected.iter().map(|s| s.to_string()).collect();
        plan_disks(&domain(), &snapshot(disks), &flags, "s1", &selected)
    }

    fn modes(plans: &[DiskPlan]) -> Vec<(&str, &str)> {
        plans.iter().map(|p| (p.target.as_str(), p.mode.as_str())).collect()
    }

    #[test]
    fn by_default_every_writable_disk_gets_an_internal_snapshot() {
        let plans = plan(LEAVE_OUT, SnapshotCreateFlags::default(), &[]).unwrap();
        // The read-only cdrom is left out without being asked.
        assert_eq!(modes(&plans), [("vda", "internal"), ("vdb", "no"), ("hdc", "no")]);
        assert_eq!(plans[0].image, PathBuf::from("/i/a.qcow2"));
        assert_eq!(plans[0].format, "qcow2");
        assert_eq!(plans[0].overlay, None);
    }

    #[test]
    fn disk_only_makes_external_overlays_named_after_the_snapshot() {
        let flags = SnapshotCreateFlags { disk_only: true, ..Default::default() };
        let plans = plan("<disk name='vdc' snapshot='no'/>", flags, &[]).unwrap();
        assert_eq!(modes(&plans), [("vda", "external"), ("vdb", "external"), ("hdc", "no")]);
        assert_eq!(plans[0].overlay.as_deref(), Some(Path::new("/i/a.s1")));
        assert_eq!(plans[1].overlay.as_deref(), Some(Path::new("/i/b.s1")));
    }

    #[test]
    fn a_given_overlay_file_is_kept_and_must_be_absolute() {
        let flags = SnapshotCreateFlags { disk_only: true, ..Default::default() };
        let given = format!("<disk name='vda' snapshot='external'><source file='/o/top.qcow2'/></disk>{LEAVE_OUT}");
        let plans = plan(&given, flags, &[]).unwrap();
        assert_eq!(plans[0].overlay.as_deref(), Some(Path::new("/o/top.qcow2")));

        let relative = format!("<disk name='vda' snapshot='external'><source file='top.qcow2'/></disk>{LEAVE_OUT}");
        let err = plan(&relative, flags, &[]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArg, "{err}");
        assert!(err.message().contains("must be an absolute path: top.qcow2"), "{err}");
    }

    #[test]
    fn the_disk_set_selects_disks_not_named_in_the_request() {
        let flags = SnapshotCreateFlags { disk_only: true, disk_set: true, ..Default::default() };
        let plans = plan("", flags, &["vdb"]).unwrap();
        assert_eq!(modes(&plans), [("vda", "no"), ("vdb", "external"), ("hdc", "no")]);
        // A disk named in the request is planned whether selected or not.
        let plans = plan("<disk name='vda' snapshot='external'/>", flags, &["vdb"]).unwrap();
        assert_eq!(modes(&plans), [("vda", "external"), ("vdb", "external"), ("hdc", "no")]);
    }

    #[test]
    fn a_disk_named_twice_or_unknown_is_refused() {
        let twice = format!("<disk name='vda' snapshot='no'/><disk name='/i/a.qcow2' snapshot='no'/>{LEAVE_OUT}");
        let err = plan(&twice, SnapshotCreateFlags::default(), &[]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ConfigUnsupported);
        assert_eq!(err.message(), "too many disk snapshot requests for domain");

        let err = plan("<disk name='vdz' snapshot='no'/>", SnapshotCreateFlags::default(), &[]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ConfigUnsupported);
        assert_eq!(err.message(), "no disk named 'vdz'");
    }

    #[test]
    fn a_volume_disk_is_refused_unless_left_out() {
        let flags = SnapshotCreateFlags { disk_only: true, ..Default::default() };
        let err = plan("", flags, &[]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ConfigUnsupported);
        assert!(err.message().contains("disk 'vdc' is volume 'v' of storage pool 'p'"), "{err}");
        assert!(err.message().contains("--diskspec vdc,snapshot=no"), "{err}");
    }

    #[test]
    fn internal_snapshots_need_qcow2_and_something_must_be_selected() {
        let err = plan("<disk name='vdc' snapshot='no'/>", SnapshotCreateFlags::default(), &[]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ConfigUnsupported);
        assert!(err.message().starts_with("internal snapshot for disk vdb unsupported for storage type raw"), "{err}");

        let none = format!("<disk name='vda' snapshot='no'/>{LEAVE_OUT}");
        let err = plan(&none, SnapshotCreateFlags::default(), &[]).unwrap_err();
        assert_eq!(err.message(), "nothing selected for snapshot");
    }

    #[test]
    fn a_read_only_disk_asked_for_is_refused() {
        let asked = format!("<disk name='hdc' snapshot='external'/>{LEAVE_OUT}");
        let err = plan(&asked, SnapshotCreateFlags::default(), &[]).unwrap_err();
        assert_eq!(err.message(), "disk 'hdc' is read-only and cannot be snapshotted");
    }

    /// A container-like domain: its root `/` a qcow2 image filesystem, a
    /// disk vda, and `/data` a directory mounted from the host.
    fn with_filesystems() -> Domain {
        Domain::parse(
            "<domain type='kvm'><name>ct</name><devices>
               <filesystem type='file' accessmode='passthrough'><driver type='loop' format='qcow2'/>
                 <source file='/i/root.qcow2'/><target dir='/'/></filesystem>
               <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
                 <source file='/i/a.qcow2'/><target dev='vda'/></disk>
               <filesystem type='mount'><source dir='/srv/data'/><target dir='/data'/></filesystem>
             </devices></domain>",
        )
        .unwrap()
    }

    #[test]
    fn an_image_filesystem_is_planned_like_a_disk_and_named_by_its_target_dir() {
        let flags = SnapshotCreateFlags { disk_only: true, ..Default::default() };
        let plans = plan_disks(&with_filesystems(), &snapshot(""), &flags, "s1", &HashSet::new()).unwrap();
        // The mount filesystem holds no image: it is not planned at all.
        assert_eq!(modes(&plans), [("/", "external"), ("vda", "external")]);
        assert_eq!(plans[0].image, PathBuf::from("/i/root.qcow2"));
        assert_eq!(plans[0].format, "qcow2");
        assert_eq!(plans[0].overlay.as_deref(), Some(Path::new("/i/root.s1")));

        // Named by its target dir or its image, it is the same device.
        let asked = snapshot("<disk name='/' snapshot='no'/>");
        let plans = plan_disks(&with_filesystems(), &asked, &flags, "s1", &HashSet::new()).unwrap();
        assert_eq!(modes(&plans), [("/", "no"), ("vda", "external")]);
        let twice = snapshot("<disk name='/' snapshot='no'/><disk name='/i/root.qcow2' snapshot='no'/>");
        let err = plan_disks(&with_filesystems(), &twice, &flags, "s1", &HashSet::new()).unwrap_err();
        assert_eq!(err.message(), "too many disk snapshot requests for domain");

        // The disk set selects a filesystem by its target dir.
        let flags = SnapshotCreateFlags { disk_only: true, disk_set: true, ..Default::default() };
        let selected = HashSet::from(["/".to_string()]);
        let plans = plan_disks(&with_filesystems(), &snapshot(""), &flags, "s1", &selected).unwrap();
        assert_eq!(modes(&plans), [("/", "external"), ("vda", "no")]);
    }

    #[test]
    fn a_filesystem_without_an_image_asked_for_is_refused() {
        let flags = SnapshotCreateFlags { disk_only: true, ..Default::default() };
        let asked = snapshot("<disk name='/data' snapshot='external'/>");
        let err = plan_disks(&with_filesystems(), &asked, &flags, "s1", &HashSet::new()).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ConfigUnsupported);
        assert_eq!(err.message(), "filesystem '/data' is a 'mount' filesystem, which holds no image to snapshot");
    }

    #[test]
    fn default_overlay_replaces_the_extension_with_the_snapshot_name() {
        assert_eq!(default_overlay(Path::new("/i/disk.qcow2"), "s1"), PathBuf::from("/i/disk.s1"));
        assert_eq!(default_overlay(Path::new("/i/disk"), "s1"), PathBuf::from("/i/disk.s1"));
        assert_eq!(default_overlay(Path::new("/i/disk.s1"), "s2"), PathBuf::from("/i/disk.s2"));
    }
}

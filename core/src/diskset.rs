//! Seed 004's disk sets, kept as `selected='yes'` on each `<disk>` and
//! `<filesystem>` of the persistent definition. A set holds storage
//! devices: disks by target (`vda`), filesystems by target dir (`/data`).

use crate::driver::DiskSetOutcome;
use crate::error::Result;
use crate::xml::Domain;

/// Adds or removes one storage device, named as
/// [`Domain::find_storage_device`] reads it (a disk target, a filesystem
/// target dir, or an active image's path). A transient disk cannot be
/// added (removing one is allowed, so a set can be repaired).
pub fn set_selected(dom: &mut Domain, device: &str, selected: bool) -> Result<DiskSetOutcome> {
    let d = dom.find_storage_device(device)?;
    if selected {
        d.refuse_if_transient("disk sets")?;
    }
    let outcome = match (d.selected(), selected) {
        (true, true) => DiskSetOutcome::AlreadyPresent,
        (false, true) => DiskSetOutcome::Added,
        (true, false) => DiskSetOutcome::Removed,
        (false, false) => DiskSetOutcome::AlreadyAbsent,
    };
    dom.set_storage_selected(&d.address(), selected)?;
    Ok(outcome)
}

/// Selects or deselects every disk and filesystem; returns how many
/// changed. Selecting refuses a domain with a transient disk before
/// changing any.
pub fn set_all(dom: &mut Domain, selected: bool) -> Result<usize> {
    let devices = dom.storage_devices()?;
    if selected {
        for d in &devices {
            d.refuse_if_transient("disk sets")?;
        }
    }
    let mut changed = 0;
    for d in devices.iter().filter(|d| d.selected() != selected) {
        dom.set_storage_selected(&d.address(), selected)?;
        changed += 1;
    }
    Ok(changed)
}

/// The selected devices' names (disk targets, filesystem target dirs), in
/// device order.
pub fn selected(dom: &Domain) -> Result<Vec<String>> {
    Ok(dom.storage_devices()?.into_iter().filter(|d| d.selected()).map(|d| d.name().to_string()).collect())
}

#[cfg(test)]
mod tests {
    use super::{selected, set_all, set_selected};
    use crate::driver::DiskSetOutcome;
    use crate::xml::Domain;

    /// A container with a disk `vda`, a root filesystem `/`
    /// (image `/img/root.qcow2`) and a data directory `/data`.
    fn container() -> Domain {
        let xml = "<domain type='lxc'><name>ct</name><devices>\
                   <filesystem type='file'><driver type='nbd' format='qcow2'/><source file='/img/root.qcow2'/>\
                   <target dir='/'/></filesystem>\
                   <disk type='file'><source file='/img/a.raw'/><target dev='vda'/></disk>\
                   <filesystem type='mount'><source dir='/srv/data'/><target dir='/data'/></filesystem>\
                   </devices></domain>";
        Domain::parse(xml).expect("parses")
    }

    #[test]
    fn a_filesystem_joins_and_leaves_the_set_by_its_target_dir() {
        let mut dom = container();
        assert_eq!(set_selected(&mut dom, "/data", true).expect("add"), DiskSetOutcome::Added);
        assert_eq!(selected(&dom).expect("list"), ["/data"]);
        assert!(dom.to_xml().contains("<filesystem type='mount' selected='yes'>"), "{}", dom.to_xml());
        assert_eq!(set_selected(&mut dom, "/data", true).expect("again"), DiskSetOutcome::AlreadyPresent);
        assert_eq!(set_selected(&mut dom, "/img/root.qcow2", true).expect("by image"), DiskSetOutcome::Added);
        assert_eq!(set_selected(&mut dom, "vda", true).expect("a disk"), DiskSetOutcome::Added);
        assert_eq!(selected(&dom).expect("list"), ["/", "vda", "/data"], "in device order");
        assert_eq!(set_selected(&mut dom, "/", false).expect("remove"), DiskSetOutcome::Removed);
        assert_eq!(set_selected(&mut dom, "/", false).expect("again"), DiskSetOutcome::AlreadyAbsent);
        assert_eq!(selected(&dom).expect("list"), ["vda", "/data"]);
        let err = set_selected(&mut dom, "/srv", true).expect_err("no such device");
        assert!(err.to_string().contains("no disk or filesystem '/srv' in domain 'ct'"), "{err}");
        assert_eq!(selected(&dom).expect("list"), ["vda", "/data"], "a failed add changes nothing");
    }

    #[test]
    fn the_whole_set_holds_every_disk_and_filesystem() {
        let mut dom = container();
        set_selected(&mut dom, "vda", true).expect("add");
        assert_eq!(set_all(&mut dom, true).expect("all"), 2, "the two filesystems changed");
        assert_eq!(selected(&dom).expect("list"), ["/", "vda", "/data"]);
        assert_eq!(set_all(&mut dom, false).expect("none"), 3);
        assert!(selected(&dom).expect("list").is_empty());
        assert_eq!(dom, container(), "the document is as written again");
    }

    #[test]
    fn selecting_all_refuses_a_transient_disk_before_changing_a_filesystem() {
        let xml = "<domain><name>t</name><devices>\
                   <filesystem type='bind'><source dir='/a'/><target dir='/a'/></filesystem>\
                   <disk type='file'><driver name='qemu' type='qcow2'/><source file='/img/t.qcow2'/>\
                   <target dev='vdb'/><transient/></disk></devices></domain>";
        let mut dom = Domain::parse(xml).expect("parses");
        let err = set_all(&mut dom, true).expect_err("transient");
        assert!(err.to_string().contains("transient disk 'vdb' does not support disk sets"), "{err}");
        assert!(selected(&dom).expect("list").is_empty());
    }
}

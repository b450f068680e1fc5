//! Seed 004's disk sets, kept as `selected='yes'` on each `<disk>` of the
//! persistent definition.

use crate::driver::DiskSetOutcome;
use crate::error::Result;
use crate::xml::Domain;

/// Adds or removes one disk (by target or source path). A transient disk
/// cannot be added (removing one is allowed, so a set can be repaired).
pub fn set_selected(dom: &mut Domain, disk: &str, selected: bool) -> Result<DiskSetOutcome> {
    let d = dom.find_disk(disk)?;
    if selected {
        d.refuse_if_transient("disk sets")?;
    }
    let outcome = match (d.selected, selected) {
        (true, true) => DiskSetOutcome::AlreadyPresent,
        (false, true) => DiskSetOutcome::Added,
        (true, false) => DiskSetOutcome::Removed,
        (false, false) => DiskSetOutcome::AlreadyAbsent,
    };
    dom.set_disk_selected(&d.target, selected)?;
    Ok(outcome)
}

/// Selects or deselects every disk; returns how many changed. Selecting
/// refuses a domain with a transient disk before changing any.
pub fn set_all(dom: &mut Domain, selected: bool) -> Result<usize> {
    if selected {
        for d in dom.disks()? {
            d.refuse_if_transient("disk sets")?;
        }
    }
    let mut changed = 0;
    for d in dom.disks()? {
        if d.selected != selected {
            dom.set_disk_selected(&d.target, selected)?;
            changed += 1;
        }
    }
    Ok(changed)
}

/// Targets of the selected disks, in device order.
pub fn selected(dom: &Domain) -> Result<Vec<String>> {
    Ok(dom.disks()?.into_iter().filter(|d| d.selected).map(|d| d.target).collect())
}

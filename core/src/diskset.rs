//! Seed 004's disk sets, kept as `selected='yes'` on each `<disk>` of the
//! persistent definition.

use crate::driver::DiskSetOutcome;
use crate::error::Result;
use crate::xml::Domain;

/// Adds or removes one disk (by target or source path).
pub fn set_selected(dom: &mut Domain, disk: &str, selected: bool) -> Result<DiskSetOutcome> {
    let d = dom.find_disk(disk)?;
    let outcome = match (d.selected, selected) {
        (true, true) => DiskSetOutcome::AlreadyPresent,
        (false, true) => DiskSetOutcome::Added,
        (true, false) => DiskSetOutcome::Removed,
        (false, false) => DiskSetOutcome::AlreadyAbsent,
    };
    dom.set_disk_selected(&d.target, selected)?;
    Ok(outcome)
}

/// Selects or deselects every disk; returns how many changed.
pub fn set_all(dom: &mut Domain, selected: bool) -> Result<usize> {
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

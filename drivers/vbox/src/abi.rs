//! The ABI check: vtables as a side (this driver, or the simulator that
//! stands in for VirtualBox) declares them, compared slot by slot with
//! the 4.2 ABI description (`fixtures/vbox/vbox42-abi.json`), so that
//! neither side can drift from VirtualBox, nor both together.

use serde_json::Value;

use crate::ffi::VtableLayout;

/// How many slots a side must declare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotCount {
    /// Up to the last slot it calls (a caller).
    AtMost,
    /// Every slot of the interface (an implementation).
    Exactly,
}

/// Every disagreement between `layouts` (declared by `side`) and `abi`,
/// each naming the interface and slot; empty when they agree.
pub fn compare(abi: &Value, side: &str, layouts: &[VtableLayout], count: SlotCount) -> Vec<String> {
    let mut problems = Vec::new();
    for layout in layouts {
        let iface = layout.interface;
        let Some(described) = abi.get("interfaces").and_then(|i| i.get(iface)) else {
            problems.push(format!("{side}: interface {iface} is not described by the ABI"));
            continue;
        };
        let slots = described.get("slots").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
        let total = described.get("slot_count_total").and_then(Value::as_u64).map_or(slots.len(), |n| n as usize);
        for (position, slot) in slots.iter().enumerate() {
            let index = slot.get("index").and_then(Value::as_u64).map(|i| i as usize);
            if index != Some(position) {
                problems.push(format!("{side}: the ABI's {iface} slot at position {position} says index {index:?}"));
            }
        }
        for &(index, name) in &layout.slots {
            let expected = slots.get(index).and_then(|s| s.get("name")).and_then(Value::as_str);
            match expected {
                Some(expected) if expected == name => {}
                Some(expected) => problems
                    .push(format!("{side}: {iface} slot {index} is declared as {name}, the ABI has {expected} there")),
                None => problems
                    .push(format!("{side}: {iface} slot {index} is declared as {name}, past the ABI's {total} slots")),
            }
            if index >= layout.slot_count {
                problems.push(format!("{side}: {iface} slot {index} ({name}) lies outside its struct"));
            }
        }
        let count_ok = match count {
            SlotCount::AtMost => layout.slot_count <= total,
            SlotCount::Exactly => layout.slot_count == total,
        };
        if !count_ok {
            problems.push(format!("{side}: {iface} declares {} slots, the ABI has {total}", layout.slot_count));
        }
        if slots.len() != total {
            problems.push(format!("{side}: the ABI lists {} slots of {iface} but counts {total}", slots.len()));
        }
    }
    problems
}

/// Every disagreement between a side's `VBOXXPCOMC` function table
/// (fields as (name, byte offset), and its size) and `abi`'s.
pub fn compare_function_table(abi: &Value, side: &str, fields: &[(&str, usize)], size: usize) -> Vec<String> {
    let table = &abi["loading"]["function_table"];
    let described: Vec<(&str, Option<u64>)> = table["fields"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|f| (f["name"].as_str().unwrap_or("?"), f["offset_lp64"].as_u64()))
        .collect();
    let mut problems = Vec::new();
    if described.len() != fields.len() {
        problems.push(format!("{side}: VBOXXPCOMC has {} fields, the ABI {}", fields.len(), described.len()));
    }
    for (i, (&(name, offset), (abi_name, abi_offset))) in fields.iter().zip(&described).enumerate() {
        if name != *abi_name || Some(offset as u64) != *abi_offset {
            problems.push(format!(
                "{side}: VBOXXPCOMC field {i} is {name} at byte {offset}, the ABI has {abi_name} at {abi_offset:?}"
            ));
        }
    }
    if table["sizeof_lp64"].as_u64() != Some(size as u64) {
        problems.push(format!("{side}: VBOXXPCOMC is {size} bytes, the ABI says {}", table["sizeof_lp64"]));
    }
    problems
}

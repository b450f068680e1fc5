//! The ABI check: every vtable the driver declares and every vtable the
//! simulator declares, compared slot by slot (index, name, count) with
//! VirtualBox 4.2's ABI as `fixtures/vbox/vbox42-abi.json` describes it,
//! so that neither side can drift from VirtualBox, nor both together.

use std::path::{Path, PathBuf};

use serde_json::Value;
use strata_vbox::abi::{compare, compare_function_table, SlotCount};
use strata_vbox::ffi::{function_table_layout, vtable_layouts, VtableLayout};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/vbox/vbox42-abi.json")
}

fn read_abi(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parse {}: {e}", path.display()))
}

fn simulator_layouts() -> Vec<VtableLayout> {
    strata_vbox_simulator::vtable_layouts()
        .into_iter()
        .map(|(interface, slots, slot_count)| VtableLayout { interface, slots, slot_count })
        .collect()
}

/// Both sides against `abi`, function table and vtables: every disagreement found.
fn check_both(abi: &Value) -> Vec<String> {
    let (driver_fields, driver_size) = function_table_layout();
    let (sim_fields, sim_size) = strata_vbox_simulator::function_table_layout();
    let mut problems = compare_function_table(abi, "driver", &driver_fields, driver_size);
    problems.extend(compare_function_table(abi, "simulator", &sim_fields, sim_size));
    problems.extend(compare(abi, "driver", &vtable_layouts(), SlotCount::AtMost));
    problems.extend(compare(abi, "simulator", &simulator_layouts(), SlotCount::Exactly));
    problems
}

#[test]
fn driver_and_simulator_vtables_match_the_4_2_abi() {
    let abi = read_abi(&fixture());
    let (driver, simulator) = (vtable_layouts(), simulator_layouts());
    // Every interface either side uses is checked, and both declare the same ones.
    let names = |l: &[VtableLayout]| l.iter().map(|v| v.interface).collect::<Vec<_>>();
    assert_eq!(names(&driver), names(&simulator));
    assert!(driver.iter().map(|l| l.slots.len()).sum::<usize>() > 80, "too few slots checked: {driver:?}");
    // The simulator spans each interface in full: 194 slots of IMachine.
    let machine = simulator.iter().find(|l| l.interface == "IMachine").expect("IMachine");
    assert_eq!(machine.slot_count, 194);
    let problems = check_both(&abi);
    assert!(problems.is_empty(), "ABI mismatches:\n{}", problems.join("\n"));
}

#[test]
fn a_moved_function_table_field_in_the_abi_is_found() {
    let mut abi = read_abi(&fixture());
    let fields = abi["loading"]["function_table"]["fields"].as_array_mut().expect("fields");
    fields.swap(5, 6);
    let problems = check_both(&abi);
    for side in ["driver", "simulator"] {
        let expected =
            format!("{side}: VBOXXPCOMC field 5 is pfnComUnallocMem at byte 32, the ABI has pfnUtf16Free at Some(40)");
        assert!(problems.contains(&expected), "{problems:#?}");
    }
}

#[test]
fn a_shifted_slot_in_the_abi_is_found_naming_interface_and_slot() {
    let dir = tempfile::tempdir().expect("scratch dir");
    let scratch = dir.path().join("vbox42-abi.json");
    let mut abi = read_abi(&fixture());
    // Shift IMachine's slots from LockMachine (126) on by one, as a header
    // with one method inserted before it would.
    let slots = abi["interfaces"]["IMachine"]["slots"].as_array_mut().expect("IMachine slots");
    let inserted = serde_json::json!({"index": 126, "name": "InsertedMethod", "kind": "method"});
    slots.insert(126, inserted);
    for (i, slot) in slots.iter_mut().enumerate() {
        slot["index"] = Value::from(i);
    }
    abi["interfaces"]["IMachine"]["slot_count_total"] = Value::from(195);
    std::fs::write(&scratch, serde_json::to_string_pretty(&abi).expect("serialise")).expect("write scratch copy");

    let problems = check_both(&read_abi(&scratch));
    assert!(
        problems
            .iter()
            .any(|p| p == "driver: IMachine slot 126 is declared as LockMachine, the ABI has InsertedMethod there"),
        "{problems:#?}"
    );
    assert!(
        problems
            .iter()
            .any(|p| p == "simulator: IMachine slot 127 is declared as LaunchVMProcess, the ABI has LockMachine there"),
        "{problems:#?}"
    );
    assert!(problems.iter().any(|p| p == "simulator: IMachine declares 194 slots, the ABI has 195"), "{problems:#?}");
    // Only IMachine moved: no other interface is reported.
    assert!(problems.iter().all(|p| p.contains("IMachine")), "{problems:#?}");
}

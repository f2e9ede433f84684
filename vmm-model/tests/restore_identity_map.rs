//! The identity-map address a snapshot records is applied on restore
//! (vmm/src/snapshot/mod.rs `apply_identity_map`, called at `Start` before
//! the vcpus exist), on the model VM: set when the plugin set none, kept
//! when the plugin set the same, refused (naming both) when it set
//! another; a malformed record is refused by name; after the vcpus exist
//! KVM's refusal is reported.

use vmm::snapshot::{self as snap, HostTables};
use vmm::vm::Vm;
use vmm_model::ModelVm;

fn vm_part(identity_map: Option<u64>) -> snap::VmPart {
    let vm = ModelVm::new(8);
    let tables = HostTables {
        identity_map,
        ..Default::default()
    };
    snap::parse_vm(snap::capture_vm(&vm, &tables).expect("capture")).expect("parse")
}

#[test]
fn the_recorded_identity_map_is_set_before_the_vcpus_exist() {
    let part = vm_part(Some(0xfeff_c000));
    assert_eq!(part.identity_map, Some(0xfeff_c000));

    let vm = ModelVm::new(8);
    assert_eq!(
        snap::apply_identity_map(&vm, &part, None).unwrap(),
        Some(0xfeff_c000)
    );
    assert_eq!(vm.identity_map(), Some(0xfeff_c000));

    // The plugin set the same address itself: nothing more to do.
    let vm = ModelVm::new(8);
    vm.set_identity_map_addr(0xfeff_c000).unwrap();
    vm.set_vcpus_created(); // any second set would now fail
    assert_eq!(
        snap::apply_identity_map(&vm, &part, Some(0xfeff_c000)).unwrap(),
        Some(0xfeff_c000)
    );

    // Another address: refused, naming both.
    let vm = ModelVm::new(8);
    vm.set_identity_map_addr(0xfffb_c000).unwrap();
    let e = snap::apply_identity_map(&vm, &part, Some(0xfffb_c000))
        .unwrap_err()
        .to_string();
    assert!(e.contains("0xfffbc000") && e.contains("0xfeffc000"), "{e}");
    assert_eq!(vm.identity_map(), Some(0xfffb_c000));

    // Too late (the vcpus exist): KVM's refusal names the record.
    let vm = ModelVm::new(8);
    vm.set_vcpus_created();
    let e = snap::apply_identity_map(&vm, &part, None).unwrap_err();
    assert!(e.to_string().contains("identity-map"), "{e}");
    assert_eq!(vm.identity_map(), None);
}

#[test]
fn a_snapshot_without_an_identity_map_leaves_the_plugins() {
    let part = vm_part(None);
    assert_eq!(part.identity_map, None);
    let vm = ModelVm::new(8);
    assert_eq!(snap::apply_identity_map(&vm, &part, None).unwrap(), None);
    assert_eq!(vm.identity_map(), None);
    vm.set_identity_map_addr(0x1000).unwrap();
    assert_eq!(
        snap::apply_identity_map(&vm, &part, Some(0x1000)).unwrap(),
        Some(0x1000)
    );
}

#[test]
fn a_malformed_identity_map_record_is_refused_by_name() {
    let vm = ModelVm::new(8);
    let good = snap::capture_vm(&vm, &HostTables::default()).expect("capture");
    for (bytes, why) in [
        (vec![0u8; 7], "7 bytes"),
        (0x1234u64.to_le_bytes().to_vec(), "page-aligned"),
        ((1u64 << 32).to_le_bytes().to_vec(), "below 4 GiB"),
    ] {
        let mut r = vmm_snapshot::Records::new();
        for (name, data) in good.iter() {
            r.push(name, data.to_vec()).unwrap();
        }
        r.push("identity-map", bytes).unwrap();
        let e = snap::parse_vm(r).err().expect("refused").to_string();
        assert!(e.contains("identity-map") && e.contains(why), "{e}");
    }
}

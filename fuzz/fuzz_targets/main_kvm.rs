//! The main request handler on real KVM (`/dev/kvm`): a fresh VM per input
//! (so every crash reproduces), every object destroyed exactly once at the
//! end, descriptors counted around each input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmm_model::main_harness::MainHarness;
use vmm_model::open_fd_count;
use vmm::vm::KvmVm;

fuzz_target!(|data: &[u8]| {
    let before = open_fd_count();
    {
        let vm = KvmVm::new("/dev/kvm").expect("this target needs /dev/kvm");
        let mut h = MainHarness::new(vm, 2).expect("harness");
        if let Err(e) = h.run_session(data) {
            panic!("{e}");
        }
        if let Err(e) = h.finish() {
            panic!("{e}");
        }
    }
    let after = open_fd_count();
    assert_eq!(before, after, "descriptor leak");
});

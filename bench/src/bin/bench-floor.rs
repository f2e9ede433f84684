//! The start-up floor: a bare program that creates the same VM as `vmm`
//! (in-kernel irqchip and PIT, 64 KiB of sealed memfd memory at guest
//! physical 0, one vcpu), runs the benchmark's trivial guest (one port
//! exit, then the done port) and exits. No plugin, no jail, no protocol:
//! what any VMM must pay on this kernel.
//!
//! Prints one line, like the benchmark plugins:
//! `RESULT exits=1 main_ns=T exit_ns=T done_ns=T kvm_ns=D mem_ns=D vcpu_ns=D close_ns=D`
//! (`*_ns` timestamps are CLOCK_MONOTONIC; `kvm_ns` is opening /dev/kvm and
//! creating the VM with its irqchip and PIT, `mem_ns` the memfd and the
//! memory slot, `vcpu_ns` creating the vcpu and setting its registers,
//! `close_ns` closing the vcpu and the VM after the done exit).
//! `bench-floor hold [MS]` waits 500 ms (or MS) after that line before it exits, so that
//! the benchmark can read its memory.

use std::os::fd::AsRawFd;

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VcpuExit};
use nix::sys::memfd::{memfd_create, MFdFlags};
use vmm_bench::guest::{loop_code, Access, CODE, DONE_PORT, LOOP_PORT, RAM_SIZE};

fn monotonic_ns() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("clock_gettime");
    t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
}

fn fail(what: &str, e: impl std::fmt::Display) -> ! {
    eprintln!("bench-floor: {what}: {e}");
    std::process::exit(1);
}

fn main() {
    let main_ns = monotonic_ns();
    let kvm = Kvm::new().unwrap_or_else(|e| fail("open /dev/kvm", e));
    let vm = kvm.create_vm().unwrap_or_else(|e| fail("KVM_CREATE_VM", e));
    vm.create_irq_chip()
        .unwrap_or_else(|e| fail("KVM_CREATE_IRQCHIP", e));
    vm.create_pit2(kvm_pit_config::default())
        .unwrap_or_else(|e| fail("KVM_CREATE_PIT2", e));
    let vm_ns = monotonic_ns();

    let fd = memfd_create(
        c"floor-ram",
        MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
    )
    .unwrap_or_else(|e| fail("memfd_create", e));
    nix::unistd::ftruncate(&fd, RAM_SIZE as i64).unwrap_or_else(|e| fail("ftruncate", e));
    // SAFETY: F_ADD_SEALS on the memfd just created; no memory is involved.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) } < 0 {
        fail("F_ADD_SEALS", std::io::Error::last_os_error());
    }
    // SAFETY: a fresh shared mapping of the whole memfd (RAM_SIZE bytes),
    // checked below; it is never unmapped (the process exits with it).
    let ram = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            RAM_SIZE as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            0,
        )
    };
    if ram == libc::MAP_FAILED {
        fail("mmap", std::io::Error::last_os_error());
    }
    let code = loop_code(Access::PortOut, 1);
    assert!(CODE as usize + code.len() <= RAM_SIZE as usize);
    // SAFETY: the code fits in the mapping at CODE (checked above) and
    // nothing else accesses the mapping yet.
    unsafe {
        std::ptr::copy_nonoverlapping(
            code.as_ptr(),
            ram.cast::<u8>().add(CODE as usize),
            code.len(),
        )
    };
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: RAM_SIZE,
        userspace_addr: ram as u64,
    };
    // SAFETY: `ram` stays mapped for the life of the process, hence of the VM.
    unsafe { vm.set_user_memory_region(region) }
        .unwrap_or_else(|e| fail("KVM_SET_USER_MEMORY_REGION", e));
    let mem_ns = monotonic_ns();

    let mut vcpu = vm
        .create_vcpu(0)
        .unwrap_or_else(|e| fail("KVM_CREATE_VCPU", e));
    let mut sregs = vcpu.get_sregs().unwrap_or_else(|e| fail("get sregs", e));
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs)
        .unwrap_or_else(|e| fail("set sregs", e));
    vcpu.set_regs(&kvm_bindings::kvm_regs {
        rip: CODE,
        rsp: 0x8000,
        rflags: 2,
        ..Default::default()
    })
    .unwrap_or_else(|e| fail("set regs", e));
    let vcpu_ns = monotonic_ns();

    let mut exit_ns = 0;
    let mut exits = 0u64;
    loop {
        match vcpu.run().unwrap_or_else(|e| fail("KVM_RUN", e)) {
            VcpuExit::IoOut(port, _) if port == LOOP_PORT => {
                exit_ns = monotonic_ns();
                exits += 1;
            }
            VcpuExit::IoOut(port, _) if port == DONE_PORT => break,
            other => fail("unexpected exit", format!("{other:?}")),
        }
    }
    let done_ns = monotonic_ns();
    // Closed explicitly so that the kernel's VM destruction is a phase of
    // its own (it is slow and bimodal on this nested hypervisor).
    drop(vcpu);
    drop(vm);
    let closed_ns = monotonic_ns();
    println!(
        "RESULT exits={exits} main_ns={main_ns} exit_ns={exit_ns} done_ns={done_ns} kvm_ns={} mem_ns={} vcpu_ns={} close_ns={}",
        vm_ns - main_ns,
        mem_ns - vm_ns,
        vcpu_ns - mem_ns,
        closed_ns - done_ns
    );
    if std::env::args().nth(1).as_deref() == Some("hold") {
        use std::io::Write;
        let _ = std::io::stdout().flush();
        let ms = std::env::args()
            .nth(2)
            .and_then(|v| v.parse().ok())
            .unwrap_or(500);
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
}

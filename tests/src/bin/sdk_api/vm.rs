//! `sdk_api vm [tap]`: VM-level functions (one vcpu). Mirrors
//! `tests/c/capi_vm.c`; ends with a guest triple fault, after which the VMM
//! signals the shutdown eventfd.

use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd};

use crosvm_plugin::kvm_bindings::{kvm_clock_data, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};
use crosvm_plugin::{
    AddressSpace, CallHint, Connection, Datamatch, HintDetail, IrqRoute, IrqRouteKind,
    MAX_HINT_DETAIL_COUNT,
};
use kvm_ioctls::Kvm;
use plugin_examples::{enter_real_mode, GuestRam};

use crate::guest::{expect_io, next, resume};

const CODE: u64 = 0x1000;
const KILL_PORT: u64 = 0x3f9;
const IO: AddressSpace = AddressSpace::IoPort;
const MMIO: AddressSpace = AddressSpace::Mmio;

// KVM capability numbers (linux/kvm.h).
const CAP_IRQCHIP: u32 = 0;
const CAP_NR_MEMSLOTS: u32 = 10;
const CAP_ADJUST_CLOCK: u32 = 39;
const CAP_MAX_VCPUS: u32 = 66;
const CAP_HYPERV_SYNIC: u32 = 123;

fn queries(conn: &Connection, kvm: &Kvm) {
    let vm = require!(kvm.create_vm());
    for cap in [
        CAP_IRQCHIP,
        CAP_NR_MEMSLOTS,
        CAP_MAX_VCPUS,
        CAP_ADJUST_CLOCK,
        CAP_HYPERV_SYNIC,
        0x7fff_ffff,
    ] {
        let raw = vm.check_extension_raw(libc::c_ulong::from(cap));
        if let Some(has) = ok!(conn.check_extension(cap)) {
            // True only when KVM answers exactly 1.
            check_eq!((cap, has), (cap, raw == 1));
        }
    }
    check!(vm.check_extension_raw(libc::c_ulong::from(CAP_NR_MEMSLOTS)) > 1);
    check_eq!(ok!(conn.check_extension(CAP_IRQCHIP)), Some(true));

    let strip = |mut e: crosvm_plugin::kvm_bindings::kvm_cpuid_entry2| {
        e.flags &= KVM_CPUID_FLAG_SIGNIFCANT_INDEX;
        e.padding = [0; 3];
        // Fields that report the APIC id of the CPU that ran the ioctl
        // differ between the host's query and ours.
        match e.function {
            1 => e.ebx &= 0x00ff_ffff,
            0xb | 0x1f => e.edx = 0,
            0x8000_001e => e.eax = 0,
            _ => {}
        }
        e
    };
    let strip_list = |v: Vec<crosvm_plugin::kvm_bindings::kvm_cpuid_entry2>| -> Vec<_> {
        v.into_iter().map(strip).collect()
    };
    let want: Vec<_> = require!(kvm.get_supported_cpuid(256))
        .as_slice()
        .iter()
        .copied()
        .map(strip)
        .collect();
    check!(want.len() > 1);
    check_eq!(ok!(conn.get_supported_cpuid()).map(strip_list), Some(want));
    let want: Vec<_> = require!(kvm.get_emulated_cpuid(256))
        .as_slice()
        .iter()
        .copied()
        .map(strip)
        .collect();
    check_eq!(ok!(conn.get_emulated_cpuid()).map(strip_list), Some(want));
    let want = require!(kvm.get_msr_index_list()).as_slice().to_vec();
    check!(want.len() > 1);
    check_eq!(ok!(conn.get_msr_index_list()), Some(want));
}

fn net(conn: &Connection, tap: bool) {
    if !tap {
        check_errno!(conn.get_net_config(), libc::ENODATA);
        return;
    }
    let Some(cfg) = ok!(conn.get_net_config()) else {
        return;
    };
    check_eq!(cfg.host_ip, Ipv4Addr::new(100, 115, 92, 5));
    check_eq!(cfg.netmask, Ipv4Addr::new(255, 255, 255, 252));
    check_eq!(cfg.host_mac, [0xde, 0x21, 0xe8, 0x47, 0x6b, 0x6a]);
    let mut ifr = [0u8; 40];
    // SAFETY: TUNGETIFF writes one struct ifreq (40 bytes) into `ifr`.
    let r = unsafe { libc::ioctl(cfg.tap.as_raw_fd(), libc::TUNGETIFF as _, ifr.as_mut_ptr()) };
    check_eq!(r, 0); // really a tap device
}

fn vm_state(conn: &Connection) {
    for primary in [true, false] {
        let Some(mut pic) = ok!(conn.get_pic_state(primary)) else {
            continue;
        };
        pic.imr = if primary { 0xa5 } else { 0x3c };
        pic.irq_base = if primary { 0x20 } else { 0x70 };
        pic.elcr = if primary { 0x28 } else { 0x04 };
        pic.special_fully_nested_mode = 1;
        ok!(conn.set_pic_state(primary, &pic));
        check_eq!(ok!(conn.get_pic_state(primary)), Some(pic));
    }

    if let Some(mut io) = ok!(conn.get_ioapic_state()) {
        check_eq!(io.base_address, 0xfec0_0000);
        io.id = 5;
        io.ioregsel = 0x10;
        // Entry 7: vector 0x47, level-triggered, masked; entry 20: dest 3.
        // SAFETY: both union views are plain u64 bit fields.
        unsafe {
            io.redirtbl[7].bits = 0x47 | (1 << 15) | (1 << 16);
            io.redirtbl[20].bits |= 3 << 56;
        }
        ok!(conn.set_ioapic_state(&io));
        if let Some(back) = ok!(conn.get_ioapic_state()) {
            check!(
                crosvm_plugin::StateImage::as_image(&back)
                    == crosvm_plugin::StateImage::as_image(&io)
            );
        }
    }

    // PIT channels 1 and 2 (channel 0 would start the timer); KVM stamps a
    // new count_load_time when a count is loaded.
    if let Some(mut pit) = ok!(conn.get_pit_state()) {
        pit.channels[1].count = 0x100;
        let c2 = &mut pit.channels[2];
        c2.count = 0x4321;
        c2.mode = 3;
        c2.rw_mode = 3;
        c2.read_state = 3;
        c2.write_state = 3;
        c2.gate = 1;
        ok!(conn.set_pit_state(&pit));
        if let Some(mut back) = ok!(conn.get_pit_state()) {
            for i in 0..3 {
                back.channels[i].count_load_time = pit.channels[i].count_load_time;
            }
            check_eq!(back, pit);
        }
    }

    // Clock: a jump of ~11.6 days must show when read back.
    if let Some(clock) = ok!(conn.get_clock()) {
        let target = clock.clock + 1_000_000_000_000_000;
        ok!(conn.set_clock(&kvm_clock_data {
            clock: target,
            ..Default::default()
        }));
        if let Some(later) = ok!(conn.get_clock()) {
            check!(later.clock >= target);
        }
        check_errno!(
            conn.set_clock(&kvm_clock_data {
                clock: target,
                flags: 0x8000_0000,
                ..Default::default()
            }),
            libc::EINVAL
        );
    }
    ok!(conn.set_identity_map_addr(0xfffb_c000));
}

fn pc_routes() -> Vec<IrqRoute> {
    plugin_examples::pc_irq_routes()
}

fn irqs(conn: &Connection) {
    let mut routes = pc_routes();
    routes.push(IrqRoute {
        irq_id: 24,
        kind: IrqRouteKind::Msi {
            address: 0xfee0_0000,
            data: 0x41,
        },
    });
    ok!(conn.set_irq_routing(&routes));
    ok!(conn.set_irq_routing(&[])); // clears
    ok!(conn.set_irq_routing(&routes));
    ok!(conn.set_irq(3, true));
    ok!(conn.set_irq(3, false));
    ok!(conn.set_irq(24, true));
    if let Some(irq) = ok!(conn.create_irq_event(4)) {
        check!(irq.fd().as_raw_fd() != irq.resample_fd().as_raw_fd());
        ok!(irq.destroy().map_err(|(_, e)| e));
    }
}

fn reservations_and_hints(conn: &Connection) {
    check_errno!(AddressSpace::from_raw(2), libc::EINVAL);
    ok!(conn.reserve_range(IO, 0x100, 0x10));
    check_errno!(conn.reserve_range(IO, 0x108, 1), libc::EPERM);
    check_errno!(conn.reserve_async_write_range(IO, 0xf8, 0x10), libc::EPERM);
    ok!(conn.reserve_async_write_range(IO, 0x110, 4)); // adjacent: fine
    check_errno!(conn.unreserve_range(IO, 0x300), libc::ENOENT);
    // Length 0 removes a range of either kind.
    ok!(conn.reserve_async_write_range(IO, 0x100, 0));
    ok!(conn.unreserve_range(IO, 0x110));
    check_errno!(conn.unreserve_range(IO, 0x100), libc::ENOENT);
    ok!(conn.reserve_range(MMIO, 0x100, 0x10)); // spaces are independent
    ok!(conn.reserve_range(IO, 0x100, 0x10));
    ok!(conn.unreserve_range(MMIO, 0x100));
    ok!(conn.unreserve_range(IO, 0x100));

    let detail = HintDetail {
        match_rax: true,
        rax: 7,
        send_sregs: true,
        ..Default::default()
    };
    let good = CallHint {
        space: IO,
        address: 0x500,
        on_write: true,
        details: vec![detail],
    };
    check_errno!(
        conn.set_call_hint(&CallHint {
            address: 0,
            ..good.clone()
        }),
        libc::EINVAL
    );
    check_errno!(
        conn.set_call_hint(&CallHint {
            details: vec![detail; MAX_HINT_DETAIL_COUNT + 1],
            ..good.clone()
        }),
        libc::EINVAL
    );
    ok!(conn.set_call_hint(&CallHint {
        details: vec![detail; MAX_HINT_DETAIL_COUNT],
        ..good.clone()
    }));
    ok!(conn.set_call_hint(&good));
    ok!(conn.clear_call_hint());
}

fn object_arguments(conn: &Connection, ram: &GuestRam) {
    check_errno!(Datamatch::from_raw(3, 1), libc::EINVAL);
    let any = ok!(conn.create_io_event(IO, 0x600, Datamatch::Any));
    // The identical registration again: KVM says EEXIST.
    check_errno!(
        conn.create_io_event(IO, 0x600, Datamatch::Any),
        libc::EEXIST
    );
    let mmio = ok!(conn.create_io_event(MMIO, 0xd000_0000, Datamatch::U32(0xdead_beef)));
    for obj in [any, mmio].into_iter().flatten() {
        ok!(obj.destroy().map_err(|(_, e)| e));
    }

    let fd = ram.fd();
    check_errno!(
        conn.create_memory(fd, 0x800, 0x1000, 0x10_0000, false, false),
        libc::EINVAL
    );
    check_errno!(
        conn.create_memory(fd, 0, 0x1800, 0x10_0000, false, false),
        libc::EINVAL
    );
    check_errno!(
        conn.create_memory(fd, ram.size(), 0x1000, 0x10_0000, false, false),
        libc::EINVAL
    );
    // Overlapping the RAM slot at 0: KVM says EEXIST.
    check_errno!(
        conn.create_memory(fd, 0, 0x1000, 0x2000, false, false),
        libc::EEXIST
    );
    let unsealed = require!(nix::sys::memfd::memfd_create(
        c"unsealed",
        nix::sys::memfd::MFdFlags::MFD_CLOEXEC
    ));
    require!(nix::unistd::ftruncate(&unsealed, 0x1000));
    check_errno!(
        conn.create_memory(unsealed.as_fd(), 0, 0x1000, 0x10_0000, false, false),
        libc::EPERM
    );
    // Dirty log of a region without dirty logging: KVM says ENOENT.
    if let Some(mem) = ok!(conn.create_memory(fd, 0, 0x2000, 0x10_0000, false, false)) {
        check_eq!(mem.dirty_log_len(), 1);
        check_errno!(conn.get_dirty_log(&mem), libc::ENOENT);
        ok!(mem.destroy().map_err(|(_, e)| e));
    }
}

/// Two connections used at once from two threads; object ids come from one
/// allocator shared by all connections derived from the first.
fn connections(conn: &Connection, ram: &GuestRam) {
    let b = require!(conn.new_connection());
    let c = require!(b.new_connection()); // derived from a derived one
    check_eq!(b.vcpu_count(), 1);
    check_eq!(c.vcpu_count(), 1);

    // Shutdown eventfds: distinct descriptors, one counter.
    let s1 = require!(conn.get_shutdown_eventfd());
    let s2 = require!(b.get_shutdown_eventfd());
    check!(s1.as_raw_fd() != s2.as_raw_fd());
    check_eq!(nix::unistd::write(&s1, &5u64.to_ne_bytes()).ok(), Some(8));
    let mut buf = [0u8; 8];
    check_eq!(nix::unistd::read(&s2, &mut buf).ok(), Some(8));
    check_eq!(u64::from_ne_bytes(buf), 5);

    let worker = |conn: &Connection, port_base: u64| {
        let mut errors = 0;
        for i in 0..100u64 {
            // Object creation is slow in KVM (SRCU grace periods): only every
            // 10th round creates one.
            let io = if i % 10 == 0 {
                let r = conn.create_io_event(IO, port_base + i, Datamatch::U8(1));
                errors += usize::from(r.is_err());
                r.ok()
            } else {
                None
            };
            errors += usize::from(conn.reserve_range(IO, 0x1_0000 + port_base + i, 1).is_err());
            errors += usize::from(conn.get_clock().is_err());
            errors += usize::from(conn.get_pic_state(true).is_err());
            errors += usize::from(conn.check_extension(CAP_IRQCHIP).ok() != Some(true));
            if let Some(io) = io {
                errors += usize::from(io.destroy().is_err());
            }
            errors += usize::from(conn.unreserve_range(IO, 0x1_0000 + port_base + i).is_err());
        }
        errors
    };
    let (ea, eb) = std::thread::scope(|s| {
        let t = s.spawn(|| worker(&b, 0x7400));
        let ea = worker(conn, 0x7000);
        (ea, t.join().unwrap_or(usize::MAX))
    });
    check_eq!(ea, 0);
    check_eq!(eb, 0);

    // Consecutive ids across connections; destroyed through another
    // connection, also after the creating one was dropped.
    let io = require!(conn.create_io_event(IO, 0x6f0, Datamatch::Any));
    let mem = require!(c.create_memory(ram.fd(), 0, 0x1000, 0x30_0000, true, false));
    let irq = require!(b.create_irq_event(9));
    check_eq!(mem.id(), io.id() + 1);
    check_eq!(irq.id(), io.id() + 2);
    drop(c);
    ok!(io.destroy_via(&b).map_err(|(_, e)| e));
    ok!(mem.destroy_via(&b).map_err(|(_, e)| e));
    ok!(irq.destroy_via(conn).map_err(|(_, e)| e));
    drop(b);
    check_eq!(ok!(conn.check_extension(CAP_IRQCHIP)), Some(true)); // still usable
}

pub fn run(tap: bool) -> ! {
    let kvm = require!(Kvm::new());
    let conn = require!(Connection::from_env());
    let shutdown = require!(conn.get_shutdown_eventfd());
    let ram = require!(GuestRam::new(0x10000));
    // out dx, al (dx = KILL_PORT, set by the plugin); ud2
    require!(ram.write(CODE, &[0xee, 0x0f, 0x0b]));
    let _ram = require!(ram.map(&conn));
    ok!(conn.reserve_range(IO, KILL_PORT, 1));

    queries(&conn, &kvm);
    net(&conn, tap);
    vm_state(&conn);
    irqs(&conn);
    reservations_and_hints(&conn);
    object_arguments(&conn, &ram);
    connections(&conn, &ram);

    check_errno!(conn.vcpu(1), libc::ENOENT);
    let vcpu = require!(conn.vcpu(0));
    let t = std::thread::spawn(move || {
        let mut v = vcpu.lock();
        check!(matches!(next(&mut v), crosvm_plugin::VcpuEvent::Init));
        require!(enter_real_mode(&mut v, CODE as u16, 0x8000));
        // 16-bit protected mode with an empty interrupt table: the ud2 after
        // the kill port triple-faults (#UD -> #GP -> #DF). (KVM may emulate
        // real-mode interrupt delivery without checking the table limit.)
        let mut sregs = require!(v.get_sregs());
        sregs.cr0 |= 1;
        for (i, seg) in [
            &mut sregs.cs,
            &mut sregs.ds,
            &mut sregs.es,
            &mut sregs.fs,
            &mut sregs.gs,
            &mut sregs.ss,
        ]
        .into_iter()
        .enumerate()
        {
            seg.base = 0;
            seg.limit = 0xffff;
            seg.selector = 0;
            seg.type_ = if i == 0 { 0xb } else { 0x3 };
            seg.present = 1;
            seg.dpl = 0;
            seg.db = 0;
            seg.s = 1;
            seg.l = 0;
            seg.g = 0;
            seg.unusable = 0;
        }
        sregs.idt.limit = 0;
        v.set_sregs(&sregs);
        let mut regs = require!(v.get_regs());
        regs.rdx = KILL_PORT;
        v.set_regs(&regs);
        resume(&mut v);
        expect_io(&mut v, IO, KILL_PORT, true);
        resume(&mut v);
        // The VMM now shuts the VM down; nothing more will come.
    });
    ok!(conn.start());
    check_errno!(conn.start(), libc::EINVAL);
    check!(conn.set_identity_map_addr(0xfffb_c000).is_err());

    // The guest triple-faults after the kill port; the VMM signals it.
    let mut buf = [0u8; 8];
    check_eq!(nix::unistd::read(&shutdown, &mut buf).ok(), Some(8));
    check!(u64::from_ne_bytes(buf) >= 1);
    check!(t.join().is_ok());
    crate::finish("sdk_api vm")
}

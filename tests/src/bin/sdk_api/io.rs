//! `sdk_api io`: objects, reservations and interrupts on a real guest (one
//! vcpu). Mirrors `tests/c/capi_io.c`:
//! io events (the addresses are also reserved, so a write the kernel does
//! not match shows up as an event), dirty log and read-only memory, async
//! write ranges with several events queued, sync reads, unreserve, an irq
//! event on a level-triggered PIC line with resample on EOI, set_irq, and an
//! irq event on an MSI route.

use std::os::fd::BorrowedFd;

use crosvm_plugin::{
    AddressSpace, Connection, Datamatch, IrqRoute, IrqRouteKind, VcpuEvent, VcpuGuard,
};
use iced_x86::code_asm::*;
use plugin_examples::{assemble16, enter_real_mode, exit_on_host_shutdown, GuestRam};

use crate::guest::{expect_io, guest_byte, le, next, resume, set_ivt, wait_guest_byte};

const CODE: u64 = 0x1000;
const H_IRQ5: u64 = 0x1c00;
const H_IRQ6: u64 = 0x1d00;
const H_MSI: u64 = 0x1e00;
const IRQ5_COUNT: u64 = 0x3010;
const IRQ6_COUNT: u64 = 0x3011;
const MSI_COUNT: u64 = 0x3012;
const ASYNC_DONE: u64 = 0x3021;

const CHK: u64 = 0x690;
const VAL: u64 = 0x691;
const IOE_ANY: u64 = 0x6a0;
const IOE_MATCH: u64 = 0x6a2;
const IRQ_READY: u64 = 0x6b0;
const IRQ5_ENTRY: u64 = 0x6b5;
const IRQ6_ENTRY: u64 = 0x6b6;
const IRQ5_EOID: u64 = 0x6b7;
const MSI_ENTRY: u64 = 0x6b8;
const ASYNC_PORT: u64 = 0x6c0;
const SYNC_PORT: u64 = 0x6d0;
const DONE_PORT: u64 = 0x6ff;

const DIRTY_GPA: u64 = 0x10_0000; // ES base
const RO_GPA: u64 = 0x20_0000; // FS base
const MMIO_GPA: u64 = 0xd000_0000; // GS base
const ASYNC_MMIO: u64 = MMIO_GPA + 0x1000;
const MSI_GSI: u32 = 24;
const MSI_VECTOR: u64 = 0x41;
const IO: AddressSpace = AddressSpace::IoPort;
const MMIO: AddressSpace = AddressSpace::Mmio;

/// Sleeps with interrupts enabled until byte [flag] >= value; sti's
/// one-instruction interrupt shadow makes `sti; hlt` unable to miss one.
fn wait_flag_irq(a: &mut CodeAssembler, flag: u64, value: u32) -> Result<(), IcedError> {
    let mut top = a.create_label();
    let mut done = a.create_label();
    a.set_label(&mut top)?;
    a.cli()?;
    a.cmp(byte_ptr(flag), value)?;
    a.jae(done)?;
    a.sti()?;
    a.hlt()?;
    a.jmp(top)?;
    a.set_label(&mut done)?;
    a.sti()?;
    Ok(())
}

fn checkpoint(a: &mut CodeAssembler, n: u32) -> Result<(), IcedError> {
    a.mov(dx, CHK as u32)?;
    a.mov(al, n)?;
    a.out(dx, al)
}

fn guest_main() -> plugin_examples::Result<Vec<u8>> {
    assemble16(CODE, |a| {
        // 1. io events
        a.mov(dx, IOE_ANY as u32)?;
        a.out(dx, al)?;
        a.out(dx, ax)?;
        a.out(dx, eax)?; // three matches of any width
        a.mov(dx, IOE_MATCH as u32)?;
        a.mov(al, 0x42u32)?;
        a.out(dx, al)?;
        a.out(dx, al)?; // two matches
        a.mov(al, 0x43u32)?;
        a.out(dx, al)?; // E1: no match
        a.mov(dword_ptr(0).gs(), 0xdead_beefu32)?; // match
        a.mov(dword_ptr(0).gs(), 0x1234_5678u32)?; // E2: wrong value
        a.mov(word_ptr(0).gs(), 0xbeefu32)?; // E3: wrong width
        checkpoint(a, 1)?; // the plugin destroys the any-length io event
        a.mov(dx, IOE_ANY as u32)?;
        a.out(dx, al)?; // E4: exits now
                        // 2. memory
        a.mov(byte_ptr(0x1000).es(), 1u32)?;
        a.mov(byte_ptr(0x3000).es(), 2u32)?;
        a.mov(byte_ptr(0xa000).es(), 3u32)?;
        a.mov(al, byte_ptr(0).fs())?; // read-only memory reads
        a.mov(byte_ptr(4).fs(), al)?; // E5: its writes exit as MMIO
        checkpoint(a, 2)?; // dirty pages 1, 3, 10
        a.mov(byte_ptr(0x3008).es(), 4u32)?;
        checkpoint(a, 3)?; // dirty page 3
                           // 3. async writes
        a.mov(dx, ASYNC_PORT as u32)?;
        for v in 1..=5u32 {
            a.mov(al, v)?;
            a.out(dx, al)?;
        }
        a.mov(byte_ptr(0x1000).gs(), 0x11u32)?;
        a.mov(byte_ptr(0x1001).gs(), 0x22u32)?;
        a.in_(al, dx)?; // not reported: 0
        a.mov(byte_ptr(ASYNC_DONE), 1u32)?;
        a.mov(dx, VAL as u32)?;
        a.out(dx, al)?;
        a.mov(dx, SYNC_PORT as u32)?;
        a.in_(al, dx)?; // the plugin answers 0x99
        a.mov(dx, VAL as u32)?;
        a.out(dx, al)?;
        checkpoint(a, 4)?; // the plugin unreserves
        a.mov(dx, SYNC_PORT as u32)?;
        a.out(dx, al)?;
        a.in_(al, dx)?; // unreserved: 0, no event
        a.mov(dx, ASYNC_PORT as u32)?;
        a.out(dx, al)?;
        a.mov(byte_ptr(0x1000).gs(), 0x33u32)?;
        a.mov(dx, VAL as u32)?;
        a.out(dx, al)?;
        // 4. interrupts: PICs at vectors 8 and 0x70, IRQ5 and IRQ6 unmasked
        for (port, value) in [
            (0x20u32, 0x11u32),
            (0x21, 0x08),
            (0x21, 0x04),
            (0x21, 0x01),
            (0x21, 0x9f),
            (0xa0, 0x11),
            (0xa1, 0x70),
            (0xa1, 0x02),
            (0xa1, 0x01),
            (0xa1, 0xff),
        ] {
            a.mov(al, value)?;
            a.out(port, al)?;
        }
        a.sti()?;
        a.mov(dx, IRQ_READY as u32)?;
        a.out(dx, al)?; // the plugin triggers IRQ5
        wait_flag_irq(a, IRQ5_COUNT, 2)?;
        checkpoint(a, 5)?; // the plugin raises IRQ6
        wait_flag_irq(a, IRQ6_COUNT, 1)?;
        checkpoint(a, 6)?; // the plugin triggers the MSI
        wait_flag_irq(a, MSI_COUNT, 1)?;
        a.mov(dx, DONE_PORT as u32)?;
        a.out(dx, al)?;
        a.hlt()?;
        Ok(())
    })
}

/// An interrupt handler: report at `entry`, optionally EOI the primary PIC
/// and report again at `after_eoi`, count in `counter`.
fn handler(
    base: u64,
    entry: u64,
    eoi: bool,
    after_eoi: Option<u64>,
    counter: u64,
) -> plugin_examples::Result<Vec<u8>> {
    assemble16(base, |a| {
        a.push(ax)?;
        a.push(dx)?;
        a.mov(dx, entry as u32)?;
        a.out(dx, al)?;
        if eoi {
            a.mov(al, 0x20u32)?;
            a.out(0x20u32, al)?;
        }
        if let Some(port) = after_eoi {
            a.mov(dx, port as u32)?;
            a.out(dx, al)?;
        }
        a.inc(byte_ptr(counter))?;
        a.pop(dx)?;
        a.pop(ax)?;
        a.iret()?;
        Ok(())
    })
}

struct Objects {
    ioe_any: Option<crosvm_plugin::IoEvent>,
    ioe_match: crosvm_plugin::IoEvent,
    ioe_mmio: crosvm_plugin::IoEvent,
    dirty: crosvm_plugin::Memory,
    irq5: crosvm_plugin::IrqEvent,
    irq_msi: crosvm_plugin::IrqEvent,
}

/// Non-blocking read of an eventfd counter (0 when not signalled).
fn take(fd: BorrowedFd<'_>) -> u64 {
    let mut pfd = [nix::poll::PollFd::new(fd, nix::poll::PollFlags::POLLIN)];
    if nix::poll::poll(&mut pfd, nix::poll::PollTimeout::ZERO).unwrap_or(0) != 1 {
        return 0;
    }
    let mut buf = [0u8; 8];
    match nix::unistd::read(fd, &mut buf) {
        Ok(8) => u64::from_ne_bytes(buf),
        _ => u64::MAX,
    }
}

fn signal(fd: BorrowedFd<'_>) {
    check_eq!(nix::unistd::write(fd, &1u64.to_ne_bytes()).ok(), Some(8));
}

fn expect_chk(v: &mut VcpuGuard<'_>, n: u64) {
    let data = expect_io(v, IO, CHK, true);
    check_eq!(le(&data), n);
}

fn expect_val(v: &mut VcpuGuard<'_>, value: u8) {
    check_eq!(expect_io(v, IO, VAL, true), vec![value]);
    resume(v);
}

fn expect_write(v: &mut VcpuGuard<'_>, space: AddressSpace, addr: u64, data: &[u8]) {
    check_eq!(expect_io(v, space, addr, true), data.to_vec());
    resume(v);
}

fn io_and_memory(v: &mut VcpuGuard<'_>, conn: &Connection, ram: &GuestRam, o: &mut Objects) {
    expect_write(v, IO, IOE_MATCH, &[0x43]); // E1
    expect_write(v, MMIO, MMIO_GPA, &0x1234_5678u32.to_le_bytes()); // E2
    expect_write(v, MMIO, MMIO_GPA, &0xbeefu16.to_le_bytes()); // E3
    expect_chk(v, 1);
    if let Some(any) = o.ioe_any.take() {
        check_eq!(take(any.fd()), 3);
        ok!(any.destroy().map_err(|(_, e)| e));
    }
    check_eq!(take(o.ioe_match.fd()), 2);
    check_eq!(take(o.ioe_mmio.fd()), 1);
    resume(v);
    expect_write(v, IO, IOE_ANY, &[1]); // E4 (al = 1)

    expect_write(v, MMIO, RO_GPA + 4, &[0x5a]); // E5
    expect_chk(v, 2);
    check_eq!(ok!(o.dirty.dirty_log()), Some(vec![0x0a, 0x04])); // pages 1, 3, 10
    check_eq!(ok!(conn.get_dirty_log(&o.dirty)), Some(vec![0, 0])); // reset
    resume(v);
    expect_chk(v, 3);
    check_eq!(ok!(o.dirty.dirty_log()), Some(vec![0x08, 0])); // page 3
    for (addr, value) in [
        (0x11000, 1),
        (0x13000, 2),
        (0x1a000, 3),
        (0x13008, 4),
        (0x20004, 0),
    ] {
        check_eq!((addr, guest_byte(ram, addr)), (addr, value));
    }
    resume(v);

    // Async writes: wait until the guest made them all, so several events
    // are queued in the pipe at once, then read them (no resume).
    require!(wait_guest_byte(ram, ASYNC_DONE, 1)
        .then_some(())
        .ok_or("the guest did not finish its async writes"));
    for value in 1..=5u8 {
        match next(v) {
            VcpuEvent::Io {
                space: IO,
                address: ASYNC_PORT,
                is_write: true,
                no_resume: true,
                data,
            } => check_eq!(data, [value]),
            other => {
                eprintln!("expected an async port write, got {other:x?}");
                std::process::exit(1);
            }
        }
    }
    for (i, value) in [0x11u8, 0x22].into_iter().enumerate() {
        match next(v) {
            VcpuEvent::Io {
                space: MMIO,
                address,
                is_write: true,
                no_resume: true,
                data,
            } => check_eq!((address, data), (ASYNC_MMIO + i as u64, &[value][..])),
            other => {
                eprintln!("expected an async MMIO write, got {other:x?}");
                std::process::exit(1);
            }
        }
    }
    expect_val(v, 0); // the read of the async port was not reported
    check_eq!(expect_io(v, IO, SYNC_PORT, false), vec![0]);
    ok!(v.resume_io_read(&[0x99]));
    expect_val(v, 0x99);
    expect_chk(v, 4);
    ok!(conn.unreserve_range(IO, SYNC_PORT));
    ok!(conn.reserve_range(IO, ASYNC_PORT, 0)); // length 0 unreserves
    ok!(conn.reserve_async_write_range(MMIO, ASYNC_MMIO, 0));
    resume(v);
    expect_val(v, 0); // and nothing in between
}

fn interrupts(v: &mut VcpuGuard<'_>, conn: &Connection, ram: &GuestRam, o: &Objects) {
    expect_io(v, IO, IRQ_READY, true);
    signal(o.irq5.fd());
    resume(v);
    for round in 0..2 {
        expect_io(v, IO, IRQ5_ENTRY, true);
        check_eq!(take(o.irq5.resample_fd()), 0); // not acknowledged yet
        resume(v);
        expect_io(v, IO, IRQ5_EOID, true);
        check_eq!(take(o.irq5.resample_fd()), 1); // the EOI resampled the line
        if round == 0 {
            signal(o.irq5.fd());
        }
        resume(v);
    }
    expect_chk(v, 5);
    check_eq!(guest_byte(ram, IRQ5_COUNT), 2);
    ok!(conn.set_irq(6, true));
    resume(v);
    expect_io(v, IO, IRQ6_ENTRY, true);
    ok!(conn.set_irq(6, false));
    resume(v);
    expect_chk(v, 6);
    signal(o.irq_msi.fd());
    resume(v);
    expect_io(v, IO, MSI_ENTRY, true);
    resume(v);
    expect_io(v, IO, DONE_PORT, true);
    check_eq!(guest_byte(ram, IRQ6_COUNT), 1);
    check_eq!(guest_byte(ram, MSI_COUNT), 1);
}

pub fn run() -> ! {
    let conn = require!(Connection::from_env());
    require!(exit_on_host_shutdown(&conn));
    // memfd layout: RAM | dirty-logged region | read-only page
    let ram = require!(GuestRam::new(0x21000));
    require!(ram.write(CODE, &require!(guest_main())));
    require!(ram.write(
        H_IRQ5,
        &require!(handler(
            H_IRQ5,
            IRQ5_ENTRY,
            true,
            Some(IRQ5_EOID),
            IRQ5_COUNT
        ))
    ));
    require!(ram.write(
        H_IRQ6,
        &require!(handler(H_IRQ6, IRQ6_ENTRY, true, None, IRQ6_COUNT))
    ));
    require!(ram.write(
        H_MSI,
        &require!(handler(H_MSI, MSI_ENTRY, false, None, MSI_COUNT))
    ));
    set_ivt(&ram, 8 + 5, H_IRQ5 as u16);
    set_ivt(&ram, 8 + 6, H_IRQ6 as u16);
    set_ivt(&ram, MSI_VECTOR, H_MSI as u16);
    require!(ram.write(0x20000, &[0x5a]));
    let fd = ram.fd();
    let _main_ram = require!(conn.create_memory(fd, 0, 0x10000, 0, false, false));
    let dirty = require!(conn.create_memory(fd, 0x10000, 0x10000, DIRTY_GPA, false, true));
    check_eq!(dirty.dirty_log_len(), 2);
    let ro = require!(conn.create_memory(fd, 0x20000, 0x1000, RO_GPA, true, false));

    let ioe_any = require!(conn.create_io_event(IO, IOE_ANY, Datamatch::Any));
    let ioe_match = require!(conn.create_io_event(IO, IOE_MATCH, Datamatch::U8(0x42)));
    let ioe_mmio = require!(conn.create_io_event(MMIO, MMIO_GPA, Datamatch::U32(0xdead_beef)));
    ok!(conn.reserve_range(IO, CHK, 2));
    ok!(conn.reserve_range(IO, IOE_ANY, 4));
    ok!(conn.reserve_range(IO, IRQ_READY, 0x10));
    ok!(conn.reserve_range(IO, SYNC_PORT, 1));
    ok!(conn.reserve_range(IO, DONE_PORT, 1));
    ok!(conn.reserve_async_write_range(IO, ASYNC_PORT, 1));
    ok!(conn.reserve_range(MMIO, MMIO_GPA, 0x10));
    ok!(conn.reserve_async_write_range(MMIO, ASYNC_MMIO, 8));
    ok!(conn.reserve_range(MMIO, RO_GPA, 0x1000));

    let mut routes = plugin_examples::pc_irq_routes();
    routes.push(IrqRoute {
        irq_id: MSI_GSI,
        kind: IrqRouteKind::Msi {
            address: 0xfee0_0000,
            data: MSI_VECTOR as u32,
        },
    });
    ok!(conn.set_irq_routing(&routes));
    let irq5 = require!(conn.create_irq_event(5));
    let irq_msi = require!(conn.create_irq_event(MSI_GSI));
    // IRQ5 level-triggered: ELCR bit 5 of the primary PIC.
    if let Some(mut pic) = ok!(conn.get_pic_state(true)) {
        pic.elcr |= 1 << 5;
        ok!(conn.set_pic_state(true, &pic));
    }

    let mut objects = Objects {
        ioe_any: Some(ioe_any),
        ioe_match,
        ioe_mmio,
        dirty,
        irq5,
        irq_msi,
    };
    let vcpu = require!(conn.vcpu(0));
    let conn2 = conn.clone();
    let objects = std::thread::scope(|s| {
        let t = s.spawn(|| {
            let mut v = vcpu.lock();
            check!(matches!(next(&mut v), VcpuEvent::Init));
            require!(enter_real_mode(&mut v, CODE as u16, 0x8000));
            if let Some(mut sregs) = ok!(v.get_sregs()) {
                sregs.es.base = DIRTY_GPA;
                sregs.fs.base = RO_GPA;
                sregs.gs.base = MMIO_GPA;
                v.set_sregs(&sregs);
            }
            // PIC interrupts reach the CPU through LINT0 in ExtINT mode; MSIs
            // need the APIC software-enabled.
            if let Some(mut lapic) = ok!(v.get_lapic_state()) {
                for (offset, value) in [(0x350usize, 0x700u32), (0xf0, 0x1ff)] {
                    for (i, b) in value.to_le_bytes().into_iter().enumerate() {
                        lapic.regs[offset + i] = b as _;
                    }
                }
                ok!(v.set_lapic_state(&lapic));
            }
            resume(&mut v);
            io_and_memory(&mut v, &conn2, &ram, &mut objects);
            interrupts(&mut v, &conn2, &ram, &objects);
            // The vcpu stays parked in the done event.
            objects
        });
        ok!(conn.start());
        match t.join() {
            Ok(o) => o,
            Err(_) => {
                eprintln!("the vcpu thread panicked");
                std::process::exit(1);
            }
        }
    });

    // The vcpu is stopped in its last event: tear the objects down.
    let Objects {
        ioe_match,
        ioe_mmio,
        dirty,
        irq5,
        irq_msi,
        ..
    } = objects;
    ok!(ioe_match.destroy().map_err(|(_, e)| e));
    ok!(ioe_mmio.destroy().map_err(|(_, e)| e));
    ok!(irq5.destroy().map_err(|(_, e)| e));
    ok!(irq_msi.destroy().map_err(|(_, e)| e));
    ok!(dirty.destroy().map_err(|(_, e)| e));
    ok!(ro.destroy_via(&conn).map_err(|(_, e)| e));
    crate::finish("sdk_api io")
}

//! Test plugin for coalesced write ranges (docs/protocol-extensions.md §4):
//! the guest writes the numbers 0, 1, 2, ... to a coalesced port (`pio`) or
//! MMIO dword (`mmio`) `WRITES` times; after every `SYNC_EVERY` writes it
//! makes a synchronous `OUT` of the count so far, and at the end it makes
//! `TAIL` more coalesced writes and spins, without exits, until the plugin
//! has seen them (only the host's timer drain can deliver those) and sets a
//! flag in guest RAM. The plugin checks that every write arrives, once, in
//! order, and before each synchronous exit that follows it.
//! `coalesced pio|mmio WRITES`; `coalesced errors` checks the errnos of bad
//! coalesced reservations instead and prints `errors: ok`.

use crosvm_plugin::{AddressSpace, Connection, Datamatch, VcpuEvent};
use iced_x86::code_asm::*;
use plugin_examples::{
    assemble16, enter_real_mode, exit_on_host_shutdown, exit_with, usage_error, GuestRam, Result,
};

const DATA_PORT: u64 = 0x710;
const SYNC_PORT: u64 = 0x720;
const DONE_PORT: u64 = 0x721;
/// Segment 0xd000: the dword at guest-physical 0xd0000 (outside RAM).
const DATA_MMIO: u64 = 0xd0000;
const CODE: u64 = 0x1000;
const FLAG: u64 = 0x3000;
const SYNC_EVERY: u32 = 997;
const TAIL: u32 = 5;

fn guest_code(mmio: bool, writes: u32) -> Result<Vec<u8>> {
    assemble16(CODE, |a| {
        let mut again = a.create_label();
        let mut no_sync = a.create_label();
        let mut tail = a.create_label();
        let mut spin = a.create_label();
        let write = |a: &mut CodeAssembler| {
            if mmio {
                a.mov(dword_ptr(bx), eax)
            } else {
                a.out(dx, eax)
            }
        };
        a.mov(ax, (DATA_MMIO >> 4) as u32)?;
        a.mov(ds, ax)?;
        a.xor(ax, ax)?;
        a.mov(es, ax)?;
        a.xor(eax, eax)?;
        a.xor(ebx, ebx)?;
        a.xor(esi, esi)?;
        a.mov(ecx, writes)?;
        a.mov(dx, DATA_PORT as u32)?;
        a.set_label(&mut again)?;
        write(a)?;
        a.inc(eax)?;
        a.inc(esi)?;
        a.cmp(esi, SYNC_EVERY)?;
        a.jne(no_sync)?;
        a.xor(esi, esi)?;
        a.mov(dx, SYNC_PORT as u32)?;
        a.out(dx, eax)?;
        a.mov(dx, DATA_PORT as u32)?;
        a.set_label(&mut no_sync)?;
        a.dec(ecx)?;
        a.jnz(again)?;
        a.mov(ecx, TAIL)?;
        a.set_label(&mut tail)?;
        write(a)?;
        a.inc(eax)?;
        a.dec(ecx)?;
        a.jnz(tail)?;
        a.set_label(&mut spin)?;
        a.pause()?;
        a.cmp(byte_ptr(FLAG as u32).es(), 1)?;
        a.jne(spin)?;
        a.mov(dx, DONE_PORT as u32)?;
        a.out(dx, eax)?;
        a.hlt()?;
        Ok(())
    })
}

const USAGE: &str = "pio|mmio WRITES | errors";

/// Bad coalesced reservations, each refused with its errno, and the good
/// ones around them still working.
fn errors() -> Result<bool> {
    use AddressSpace::{IoPort, Mmio};
    let conn = Connection::from_env()?;
    let mut ok = true;
    let mut expect = |what: &str, r: crosvm_plugin::Result<()>, errno: i32| {
        let got = r.as_ref().err().map_or(0, |e| e.errno());
        if got != errno {
            eprintln!("errors: {what}: got errno {got} ({r:?}), expected {errno}");
            ok = false;
        }
    };
    expect("first", conn.reserve_coalesced_range(IoPort, 0x700, 4), 0);
    expect(
        "overlapping a coalesced range",
        conn.reserve_coalesced_range(IoPort, 0x702, 4),
        libc::EPERM,
    );
    expect("plain range", conn.reserve_range(IoPort, 0x710, 4), 0);
    expect(
        "overlapping a plain range",
        conn.reserve_coalesced_range(IoPort, 0x70e, 4),
        libc::EPERM,
    );
    expect(
        "plain range overlapping it",
        conn.reserve_range(IoPort, 0x703, 1),
        libc::EPERM,
    );
    let evt = conn.create_io_event(Mmio, 0xe0000, Datamatch::Any)?;
    expect(
        "over an ioeventfd",
        conn.reserve_coalesced_range(Mmio, 0xdf000, 0x2000),
        libc::EPERM,
    );
    drop(evt);
    expect(
        "ioeventfd inside it",
        conn.create_io_event(IoPort, 0x701, Datamatch::Any)
            .map(drop),
        libc::EPERM,
    );
    // Length 0 is the unreserve of the base protocol: nothing starts here.
    expect(
        "zero length",
        conn.reserve_coalesced_range(Mmio, 0xc0000, 0),
        libc::ENOENT,
    );
    expect(
        "longer than KVM's 32-bit zone",
        conn.reserve_coalesced_range(Mmio, 0x1_0000_0000, 1 << 32),
        libc::EINVAL,
    );
    expect(
        "past port 0xffff",
        conn.reserve_coalesced_range(IoPort, 0xfff0, 0x20),
        libc::EINVAL,
    );
    expect(
        "wrapping",
        conn.reserve_coalesced_range(Mmio, u64::MAX - 1, 4),
        libc::EINVAL,
    );
    // Too many: the first range plus 63 more fit, the 65th is refused.
    for i in 0..63u64 {
        expect(
            "within the limit",
            conn.reserve_coalesced_range(Mmio, 0x1000_0000 + i * 0x1000, 0x100),
            0,
        );
    }
    expect(
        "too many",
        conn.reserve_coalesced_range(Mmio, 0x2000_0000, 0x100),
        libc::ENOSPC,
    );
    // Unreserving one makes room again, and the range can be reused.
    expect("unreserve", conn.unreserve_range(Mmio, 0x1000_0000), 0);
    expect(
        "after unreserve",
        conn.reserve_coalesced_range(Mmio, 0x2000_0000, 0x100),
        0,
    );
    expect(
        "unreserve the first",
        conn.unreserve_range(IoPort, 0x700),
        0,
    );
    expect(
        "ioeventfd where it was",
        conn.create_io_event(IoPort, 0x701, Datamatch::Any)
            .map(drop),
        0,
    );
    println!("errors: {}", if ok { "ok" } else { "FAILED" });
    Ok(ok)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() == 1 && args[0] == "errors" {
        match errors() {
            Ok(true) => return,
            Ok(false) => std::process::exit(1),
            Err(e) => exit_with(&e),
        }
    }
    let mmio = match args.first().map(String::as_str) {
        Some("pio") => false,
        Some("mmio") => true,
        _ => usage_error("coalesced", USAGE, "the first argument is pio or mmio"),
    };
    let Some(writes) = args.get(1).and_then(|a| a.parse::<u32>().ok()) else {
        usage_error("coalesced", USAGE, "WRITES must be a number");
    };
    if writes == 0 || args.len() != 2 {
        usage_error("coalesced", USAGE, "WRITES must be at least 1");
    }
    match run(mmio, writes) {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => exit_with(&e),
    }
}

fn run(mmio: bool, writes: u32) -> Result<bool> {
    let conn = Connection::from_env()?;
    exit_on_host_shutdown(&conn)?;
    let ram = GuestRam::new(0x10000)?;
    ram.write(CODE, &guest_code(mmio, writes)?)?;
    let _mem = ram.map(&conn)?;
    let (space, address) = if mmio {
        (AddressSpace::Mmio, DATA_MMIO)
    } else {
        (AddressSpace::IoPort, DATA_PORT)
    };
    conn.reserve_coalesced_range(space, address, 4)?;
    conn.reserve_range(AddressSpace::IoPort, SYNC_PORT, 2)?;

    let vcpu = conn.vcpu(0)?;
    let mut v = vcpu.lock();
    let total = u64::from(writes) + u64::from(TAIL);
    let (mut next, mut batches, mut syncs, mut largest) = (0u64, 0u64, 0u64, 0usize);
    let mut problems: Vec<String> = Vec::new();
    let note = |p: String, problems: &mut Vec<String>| {
        if problems.len() < 10 {
            problems.push(p);
        }
    };
    conn.start()?;
    loop {
        match v.wait()? {
            VcpuEvent::Init => enter_real_mode(&mut v, CODE as u16, 0x8000)?,
            VcpuEvent::CoalescedWrites(ws) => {
                batches += 1;
                largest = largest.max(ws.len());
                for w in ws {
                    if w.space() != space || w.address != address || w.len != 4 {
                        note(format!("unexpected write {w:?}"), &mut problems);
                    } else if w.value() != next & 0xffff_ffff {
                        note(
                            format!("write {} arrived where {next} was due", w.value()),
                            &mut problems,
                        );
                        next = w.value();
                    }
                    next += 1;
                }
                if next == total {
                    // Everything arrived, the tail through the timer drain:
                    // release the spinning guest.
                    ram.write(FLAG, &[1])?;
                }
                continue;
            }
            VcpuEvent::Io {
                address: SYNC_PORT,
                data,
                ..
            } => {
                syncs += 1;
                let count = u64::from(u32::from_le_bytes(data.try_into().unwrap_or([0; 4])));
                if count != next {
                    note(
                        format!(
                            "synchronous exit after {count} writes, {next} delivered before it"
                        ),
                        &mut problems,
                    );
                }
            }
            VcpuEvent::Io {
                address: DONE_PORT, ..
            } => break,
            VcpuEvent::Io { .. } => {}
            other => note(format!("unexpected event {other:?}"), &mut problems),
        }
        v.resume()?;
    }
    println!(
        "coalesced: writes={next} expected={total} sync_exits={syncs} batches={batches} \
         largest_batch={largest} problems={}",
        problems.len()
    );
    for p in &problems {
        eprintln!("coalesced: {p}");
    }
    Ok(problems.is_empty() && next == total && syncs == u64::from(writes / SYNC_EVERY))
}

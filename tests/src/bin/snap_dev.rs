//! Test plugin for snapshots (tests/tests/snapshot.rs): a machine with a
//! tiny device state that takes part in snapshots through the raw control
//! channel (SAVE_STATE answered with a hand-encoded `ControlReply.state`)
//! and, on restore, gets its state back with a raw `GetRestoreState` —
//! without the SDK helpers, which another change brings.
//!
//! `snap_dev MODE ROUNDS [EXTRA_MIB]`. With EXTRA_MIB, a second region of
//! that many MiB at 1 MiB, every page of it non-zero, is part of the
//! machine (for timing snapshots of real memory sizes). The guest runs ROUNDS rounds of STEPS reads of
//! the device port; the device answers the low dword of a 64-bit LCG state
//! `acc` and advances it; the guest mixes every answer into `ebx`, reports
//! each finished round (`progress K`) and at the end `ebx`
//! (`result=0x...`). The result depends on the device state, so a restore
//! that loses it gives another result.
//!
//! MODE says how SAVE_STATE is answered: `good` (the 8 bytes of `acc`),
//! `big` (`acc` and 200 KiB of padding: more than any other control
//! packet), `garbage` (an undecodable packet), `refuse` (an errno),
//! `never` (no answer); `noask`: answers like `good` but never asks for
//! its state on restore (an older plugin).

use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

use crosvm_plugin::{AddressSpace, Connection, ControlKind, Error, GuestRam, VcpuEvent};
use iced_x86::code_asm::*;
use std::io::IoSlice;

use nix::sys::socket::{sendmsg, MsgFlags};
use plugin_examples::assemble16;
use plugin_proto::framing;
use plugin_proto::protobuf::Message;
use plugin_proto::{MainRequest, MainResponse};

const NAME: &str = "snap_dev";
const CODE: u64 = 0x1000;
const DEV_PORT: u16 = 0x700;
const PROGRESS_PORT: u16 = 0x704;
const RESULT_PORT: u16 = 0x708;
const STEPS: u32 = 400;

fn fail(msg: String) -> ! {
    eprintln!("{NAME}: FAILED: {msg}");
    std::process::exit(1);
}

fn ok<T>(what: &str, r: Result<T, Error>) -> T {
    r.unwrap_or_else(|e| fail(format!("{what}: {e}")))
}

fn step(acc: u64) -> u64 {
    acc.wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407)
}

fn varint(v: &mut Vec<u8>, mut x: u64) {
    while x >= 0x80 {
        v.push((x as u8) | 0x80);
        x >>= 7;
    }
    v.push(x as u8);
}

/// `ControlReply { id, state }` (fields 1 and 5), encoded by hand.
fn state_reply(id: u64, state: &[u8]) -> Vec<u8> {
    let mut v = vec![0x08];
    varint(&mut v, id);
    v.push(0x2a);
    varint(&mut v, state.len() as u64);
    v.extend_from_slice(state);
    v
}

/// `ControlReply { id, errno }` (field 2, zigzag).
fn errno_reply(id: u64, errno: i32) -> Vec<u8> {
    let mut v = vec![0x08];
    varint(&mut v, id);
    v.push(0x10);
    varint(&mut v, (errno as u64) << 1);
    v
}

/// `GetRestoreState` on the raw main socket, before the SDK owns it.
fn restore_state(sock: &OwnedFd) -> Option<Vec<u8>> {
    let mut req = MainRequest::new();
    req.set_get_restore_state(Default::default());
    let mut scratch = Vec::new();
    framing::send_message(sock.as_fd(), &req, &[], &mut scratch)
        .unwrap_or_else(|e| fail(format!("sending GetRestoreState: {e}")));
    let mut buf = vec![0; framing::MAX_MESSAGE_SIZE];
    let p = framing::recv_packet(sock.as_fd(), &mut buf, 1)
        .unwrap_or_else(|e| fail(format!("GetRestoreState reply: {e}")));
    let r = MainResponse::parse_from_bytes(&buf[..p.len])
        .unwrap_or_else(|e| fail(format!("GetRestoreState reply: {e}")));
    if r.errno != 0 {
        fail(format!("GetRestoreState refused: errno {}", r.errno));
    }
    let g = r.get_restore_state();
    g.restoring.then(|| g.state.clone())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let number = |what: &str, s: &str| {
        s.parse::<u32>()
            .unwrap_or_else(|_| fail(format!("{what} {s:?} is not a number")))
    };
    let (mode, rounds, extra_mib) = match args.as_slice() {
        [m, r] => (m.clone(), number("ROUNDS", r), 0),
        [m, r, x] => (m.clone(), number("ROUNDS", r), number("EXTRA_MIB", x)),
        _ => fail("usage: snap_dev MODE ROUNDS [EXTRA_MIB]".into()),
    };
    let fd: i32 = std::env::var("CROSVM_SOCKET")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fail("no CROSVM_SOCKET".into()));
    // SAFETY: the host passed this descriptor; it is ours from now on.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut acc: u64 = 0x1234_5678_9abc_def0;
    if mode != "noask" {
        if let Some(state) = restore_state(&sock) {
            match <[u8; 8]>::try_from(&state[..state.len().min(8)]) {
                Ok(b) => acc = u64::from_le_bytes(b),
                Err(_) if state.is_empty() => {}
                Err(_) => fail(format!("a {}-byte device state", state.len())),
            }
            println!("{NAME}: restoring (device state {} bytes)", state.len());
        }
    }
    let device = Arc::new(Mutex::new(acc));
    let conn = ok("connect", Connection::from_fd(sock));
    let control = ok("control channel", conn.control_channel());
    let shared = Arc::clone(&device);
    std::thread::spawn(move || loop {
        let cmd = match control.recv() {
            Ok(Some(c)) => c,
            Ok(None) => return,
            Err(e) => {
                eprintln!("{NAME}: control channel: {e}");
                return;
            }
        };
        let fd = control.fd();
        let bytes = match cmd.kind {
            ControlKind::SaveState => {
                let acc = *shared.lock().unwrap_or_else(|p| p.into_inner());
                match mode.as_str() {
                    "good" | "noask" => state_reply(cmd.id, &acc.to_le_bytes()),
                    "big" => {
                        let mut s = acc.to_le_bytes().to_vec();
                        s.resize(200 * 1024, 0x5a);
                        state_reply(cmd.id, &s)
                    }
                    "garbage" => vec![0xff; 40],
                    "refuse" => errno_reply(cmd.id, libc::EIO),
                    _ => continue,
                }
            }
            ControlKind::Resumed => {
                println!("{NAME}: resumed");
                let _ = std::io::stdout().flush();
                continue;
            }
            _ => errno_reply(cmd.id, libc::ENOTSUP),
        };
        // sendmsg, as the SDK: what the jail's policy allows.
        let iov = [IoSlice::new(&bytes)];
        if let Err(e) = sendmsg::<()>(fd.as_raw_fd(), &iov, &[], MsgFlags::MSG_NOSIGNAL, None) {
            eprintln!("{NAME}: sending the reply: {e}");
        }
    });

    let code = assemble16(CODE, |a| {
        let mut round = a.create_label();
        let mut inner = a.create_label();
        a.xor(ebx, ebx)?;
        a.xor(esi, esi)?;
        a.set_label(&mut round)?;
        a.mov(edi, STEPS)?;
        a.set_label(&mut inner)?;
        a.mov(dx, u32::from(DEV_PORT))?;
        a.in_(eax, dx)?;
        a.imul_3(ebx, ebx, 33)?;
        a.xor(ebx, eax)?;
        a.dec(edi)?;
        a.jnz(inner)?;
        a.inc(esi)?;
        a.mov(eax, esi)?;
        a.mov(dx, u32::from(PROGRESS_PORT))?;
        a.out(dx, eax)?;
        a.cmp(esi, rounds)?;
        a.jne(round)?;
        a.mov(eax, ebx)?;
        a.mov(dx, u32::from(RESULT_PORT))?;
        a.out(dx, eax)?;
        a.hlt()
    })
    .unwrap_or_else(|e| fail(format!("assembling: {e}")));
    let ram = ok("guest RAM", GuestRam::new(0x10000));
    ok("loading code", ram.write(CODE, &code));
    let mem = ok("registering RAM", ram.register(&conn, 0));
    let extra = (extra_mib > 0).then(|| {
        let size = u64::from(extra_mib) << 20;
        let big = ok("extra RAM", GuestRam::new(size));
        let chunk: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8 | 1).collect();
        for off in (0..size).step_by(chunk.len()) {
            ok("filling extra RAM", big.write(off, &chunk));
        }
        let m = ok("registering extra RAM", big.register(&conn, 0x10_0000));
        (big, m)
    });
    for port in [DEV_PORT, PROGRESS_PORT, RESULT_PORT] {
        ok(
            "reserve",
            conn.reserve_range(AddressSpace::IoPort, u64::from(port), 4),
        );
    }
    let vcpu = ok("vcpu 0", conn.vcpu(0));
    ok("start", conn.start());
    let mut v = vcpu.lock();
    match ok("first wait", v.wait()) {
        VcpuEvent::Init => {}
        other => fail(format!("first event is {other:?}")),
    }
    ok(
        "real mode",
        crosvm_plugin::machine::enter_real_mode(&mut v, CODE as u16, 0x8000),
    );
    ok("resume", v.resume());
    loop {
        let event = ok("wait", v.wait());
        let dword = |d: &[u8]| {
            let mut b = [0u8; 4];
            b[..d.len().min(4)].copy_from_slice(&d[..d.len().min(4)]);
            u32::from_le_bytes(b)
        };
        match event {
            VcpuEvent::Io {
                address,
                is_write: false,
                ..
            } if address == u64::from(DEV_PORT) => {
                let mut d = device.lock().unwrap_or_else(|p| p.into_inner());
                let answer = (*d as u32).to_le_bytes();
                *d = step(*d);
                drop(d);
                ok("resume", v.resume_io_read(&answer));
                continue;
            }
            VcpuEvent::Io { address, data, .. } if address == u64::from(PROGRESS_PORT) => {
                println!("progress {}", dword(data));
                let _ = std::io::stdout().flush();
            }
            VcpuEvent::Io { address, data, .. } if address == u64::from(RESULT_PORT) => {
                println!("result={:#010x}", dword(data));
                let _ = std::io::stdout().flush();
                // Leave without destructors (see tests/src/plugin_boot.rs):
                // `exit` runs none, so the memory slot stays while the
                // guest goes on to `hlt`.
                let _ = (&mem, &ram, &extra);
                std::process::exit(0);
            }
            other => fail(format!("unexpected event {other:?}")),
        }
        ok("resume", v.resume());
    }
}

//! Test plugin that abuses its control channel (docs/protocol-extensions.md
//! §5) and then checks the host still serves it:
//!
//! * asks for the channel (must get a descriptor), asks again (`EEXIST`);
//! * sends on the channel what no host expects: undecodable packets, an
//!   empty packet, replies to commands never sent, a reply with a
//!   descriptor attached, an oversize packet, then a flood of replies until
//!   the socket buffer is full;
//! * makes main requests (they must still be answered), closes the channel
//!   and opens a new one (allowed once the old one is closed);
//! * runs a guest that writes the done port, and exits 0.
//!
//! Prints `control_hostile: ...` lines the test checks; exits 1 on any
//! surprise.

use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd};

use crosvm_plugin::{AddressSpace, Connection, Error, GuestRam, VcpuEvent};
use iced_x86::code_asm::*;
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use plugin_examples::assemble16;

const NAME: &str = "control_hostile";
const CODE: u64 = 0x1000;
const DONE_PORT: u16 = 0x501;

fn fail(msg: String) -> ! {
    eprintln!("{NAME}: FAILED: {msg}");
    std::process::exit(1);
}

fn ok<T>(what: &str, r: Result<T, Error>) -> T {
    r.unwrap_or_else(|e| fail(format!("{what}: {e}")))
}

/// Sends one packet (with descriptors, if any); `Err` instead of blocking.
fn send(fd: std::os::fd::BorrowedFd<'_>, bytes: &[u8], fds: &[i32]) -> nix::Result<usize> {
    let iov = [IoSlice::new(bytes)];
    let cmsg = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &cmsg };
    sendmsg::<()>(
        fd.as_raw_fd(),
        &iov,
        cmsgs,
        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
        None,
    )
}

/// A ControlReply for `id` with `json`, encoded by hand (field 1 varint,
/// field 3 bytes) so the test does not trust the SDK's encoder.
fn reply(id: u64, json: &[u8]) -> Vec<u8> {
    let mut v = vec![0x08];
    let mut x = id;
    while x >= 0x80 {
        v.push((x as u8) | 0x80);
        x >>= 7;
    }
    v.push(x as u8);
    v.push(0x1a);
    v.push(json.len() as u8);
    v.extend_from_slice(json);
    v
}

fn main() {
    let conn = ok("connect", Connection::from_env());
    let control = ok("first control_channel", conn.control_channel());
    println!("{NAME}: control channel open");
    match conn.control_channel() {
        Err(e) if e.is_host_errno(libc::EEXIST) => {
            println!("{NAME}: second control_channel refused: {e}")
        }
        Err(e) => fail(format!("second control_channel: {e}")),
        Ok(_) => fail("a second control channel was granted".into()),
    }

    let fd = control.fd();
    let garbage: [&[u8]; 4] = [&[0x0a, 0x7f, 1, 2], &[0xff; 40], &[0x08], &[]];
    for g in garbage {
        if let Err(e) = send(fd, g, &[]) {
            fail(format!("sending garbage: {e}"));
        }
    }
    for id in [0u64, 1, 2, 77, u64::MAX] {
        if let Err(e) = send(fd, &reply(id, b"{\"stolen\": true}"), &[]) {
            fail(format!("sending a reply to {id}: {e}"));
        }
    }
    // A reply with a descriptor attached (the host must not keep it).
    let extra = ok("extra descriptor", conn.get_shutdown_eventfd());
    if let Err(e) = send(fd, &reply(3, b"1"), &[extra.as_fd().as_raw_fd()]) {
        fail(format!("sending a descriptor: {e}"));
    }
    // Bigger than any reply may be.
    if let Err(e) = send(fd, &vec![0x55; 128 * 1024], &[]) {
        println!("{NAME}: oversize packet not sent ({e})");
    }
    let mut flood = 0u32;
    while flood < 100_000 && send(fd, &reply(u64::from(flood) + 1000, b"0"), &[]).is_ok() {
        flood += 1;
    }
    println!("{NAME}: flooded {flood} replies");
    // The host still answers main requests.
    ok("check_extension", conn.check_extension(0));
    ok(
        "reserve",
        conn.reserve_range(AddressSpace::IoPort, u64::from(DONE_PORT), 1),
    );
    drop(control);
    // Give the host a moment to see the hang-up, then reopen.
    let mut reopened = None;
    for _ in 0..200 {
        match conn.control_channel() {
            Ok(c) => {
                reopened = Some(c);
                break;
            }
            Err(e) if e.is_host_errno(libc::EEXIST) => {
                std::thread::sleep(std::time::Duration::from_millis(5))
            }
            Err(e) => fail(format!("reopening the control channel: {e}")),
        }
    }
    let _control = reopened.unwrap_or_else(|| fail("the closed channel never went away".into()));
    println!("{NAME}: control channel reopened");

    let code = assemble16(CODE, |a| {
        a.mov(dx, u32::from(DONE_PORT))?;
        a.out(dx, al)?;
        a.hlt()
    })
    .unwrap_or_else(|e| fail(format!("assembling: {e}")));
    let ram = ok("guest RAM", GuestRam::new(0x10000));
    ok("loading code", ram.write(CODE, &code));
    let mem = ok("registering RAM", ram.register(&conn, 0));
    let vcpu = ok("vcpu 0", conn.vcpu(0));
    ok("start", conn.start());
    let mut v = vcpu.lock();
    loop {
        match ok("wait", v.wait()) {
            VcpuEvent::Init => ok(
                "real mode",
                crosvm_plugin::machine::enter_real_mode(&mut v, CODE as u16, 0x8000),
            ),
            VcpuEvent::Io { address, .. } if address == u64::from(DONE_PORT) => {
                println!("{NAME}: the guest ran to its end");
                // Leave without removing the memory under the guest.
                std::mem::forget((mem, ram));
                std::process::exit(0);
            }
            VcpuEvent::Shutdown => fail("the host stopped the VM".into()),
            other => fail(format!("unexpected event {other:?}")),
        }
        ok("resume", v.resume());
    }
}

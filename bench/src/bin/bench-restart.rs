//! The hot-restart benchmark's plugin (`vmm-bench --only restart`): a
//! restartable machine with `MIB` MiB of guest memory (every page written,
//! so it is real memory) whose guest spins (`jmp $`). A replacing plugin
//! takes the memory over and waits. `bench-restart MIB quit`: the guest
//! writes port 0x80 at once and the plugin exits (the trivial plugin the
//! restart is compared with).

use crosvm_plugin::{machine, Connection, GuestRam, VcpuEvent};

fn main() {
    let mut args = std::env::args().skip(1);
    let mib: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(1);
    let quit = args.next().is_some_and(|a| a == "quit");
    let conn = Connection::from_env().expect("connect");
    let mut attached = conn.attach().expect("attach");
    let _ram = if attached.is_restart() {
        let id = attached.object_ids().first().copied().expect("kept memory");
        let (mem, fd) = attached.take_memory(id).expect("take memory");
        (GuestRam::from_memfd(fd).expect("map kept memory"), mem)
    } else {
        let ram = GuestRam::new(mib.max(1) << 20).expect("guest memory");
        let page = [1u8];
        for p in (0..mib.max(1) << 20).step_by(4096) {
            ram.write(p, &page).expect("touch guest memory");
        }
        // `out 0x80, al` ends the trivial plugin's VM; `jmp $` spins.
        let code: &[u8] = if quit {
            &[0xe6, 0x80, 0xeb, 0xfe]
        } else {
            &[0xeb, 0xfe]
        };
        ram.write(0x1000, code).expect("guest code");
        let mem = ram.register(&conn, 0).expect("register guest memory");
        conn.reserve_range(crosvm_plugin::AddressSpace::IoPort, 0x80, 1)
            .expect("reserve the exit port");
        (ram, mem)
    };
    if !quit {
        conn.declare_restartable(None).expect("declare_restartable");
    }
    let vcpu = conn.vcpu(0).expect("vcpu 0");
    conn.start().expect("start");
    let mut v = vcpu.lock();
    if !attached.is_restart() {
        match v.wait().expect("wait") {
            VcpuEvent::Init => machine::enter_real_mode(&mut v, 0x1000, 0x8000).expect("real mode"),
            other => panic!("expected Init, got {other:?}"),
        }
        v.resume().expect("resume");
    }
    // Only the trivial plugin's guest exits (to end the VM); the other
    // waits for the end of the VM.
    while !matches!(
        v.wait(),
        Ok(VcpuEvent::Shutdown | VcpuEvent::Io { .. }) | Err(_)
    ) {}
}

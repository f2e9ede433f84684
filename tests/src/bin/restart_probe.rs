//! Test plugin for hot restart (tests/tests/restart.rs): a restartable
//! machine whose guest spins (`jmp $`) and which misbehaves on purpose.
//!
//! `restart_probe MODE`:
//! - `crash`: declares it can be restarted, starts the VM and, 50 ms after
//!   the vcpu runs, aborts (SIGABRT); the plugin started after it does the
//!   same (a restart loop).
//! - `two-vcpus`: needs a 2-vcpu VM and exits 2 with a message before
//!   anything else otherwise (a replacing plugin that attaches to a VM of
//!   the wrong vcpu count).

use crosvm_plugin::{machine, Connection, GuestRam, VcpuEvent};

fn main() {
    let mode = std::env::args().nth(1).unwrap_or_default();
    let conn = Connection::from_env().expect("connect");
    let mut attached = conn.attach().expect("attach");
    eprintln!(
        "restart_probe {mode}: generation {}, {:?}, {} vcpus",
        attached.generation(),
        attached.kind(),
        conn.vcpu_count()
    );
    match mode.as_str() {
        "crash" => {}
        "two-vcpus" => {
            if conn.vcpu_count() != 2 {
                eprintln!(
                    "restart_probe: this machine needs 2 vcpus, the VM has {}",
                    conn.vcpu_count()
                );
                std::process::exit(2);
            }
        }
        other => {
            eprintln!("restart_probe: unknown mode {other:?} (crash, two-vcpus)");
            std::process::exit(2);
        }
    }
    let _ram = if attached.is_restart() {
        let id = attached.object_ids().first().copied().expect("kept memory");
        let (mem, fd) = attached.take_memory(id).expect("take memory");
        (GuestRam::from_memfd(fd).expect("map kept memory"), mem)
    } else {
        let ram = GuestRam::new(0x10000).expect("ram");
        ram.write(0x1000, &[0xeb, 0xfe]).expect("code");
        let mem = ram.register(&conn, 0).expect("register");
        (ram, mem)
    };
    conn.declare_restartable(None).expect("declare_restartable");
    let vcpu = conn.vcpu(0).expect("vcpu");
    conn.start().expect("start");
    if !attached.is_restart() {
        let mut v = vcpu.lock();
        match v.wait().expect("wait") {
            VcpuEvent::Init => machine::enter_real_mode(&mut v, 0x1000, 0x8000).expect("mode"),
            other => panic!("expected Init, got {other:?}"),
        }
        v.resume().expect("resume");
    }
    std::thread::sleep(std::time::Duration::from_millis(50));
    std::process::abort();
}

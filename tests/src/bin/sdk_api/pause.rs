//! `sdk_api pause` (run with `--cpus 3`): pause_vcpus before start and while
//! the guests run. Mirrors `tests/c/capi_pause.c`: vcpu 1, paused before
//! start, reports Paused before running any guest code; vcpus 0 and 2,
//! paused while spinning, report Paused inside the spin loop; no other vcpu
//! reports anything. The application processors start uninitialized.

use std::sync::{Arc, Condvar, Mutex};

use crosvm_plugin::kvm_bindings::{KVM_MP_STATE_RUNNABLE, KVM_MP_STATE_UNINITIALIZED};
use crosvm_plugin::{AddressSpace, Connection, VcpuEvent};
use iced_x86::code_asm::*;
use plugin_examples::{assemble16, enter_real_mode, exit_on_host_shutdown, GuestRam};

use crate::guest::{next, resume};

const NCPUS: usize = 3;
const CODE: u64 = 0x1000;
const GO_FLAG: u64 = 0x3000;
const READY_PORT: u64 = 0x680;
const DONE_PORT: u64 = 0x681;
const USER_BEFORE: u64 = 0xbef0_0001;
const USER_RUNNING: u64 = 0x5eed_0002;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    Init,
    Ready,
    Paused {
        user: u64,
        in_spin_loop: bool,
        at_start: bool,
    },
    Done,
    Other,
}

#[derive(Default)]
struct Log {
    events: Mutex<Vec<Vec<Seen>>>,
    cv: Condvar,
}

impl Log {
    fn note(&self, id: usize, s: Seen) {
        let mut e = self.events.lock().unwrap_or_else(|p| p.into_inner());
        e[id].push(s);
        self.cv.notify_all();
    }

    /// Blocks until `n` recorded events satisfy `f`.
    fn await_count(&self, n: usize, f: impl Fn(&Seen) -> bool) {
        let mut e = self.events.lock().unwrap_or_else(|p| p.into_inner());
        while e.iter().flatten().filter(|s| f(s)).count() < n {
            e = self.cv.wait(e).unwrap_or_else(|p| p.into_inner());
        }
    }
}

pub fn run() -> ! {
    let conn = require!(Connection::from_env());
    require!(exit_on_host_shutdown(&conn));
    let ram = require!(GuestRam::new(0x10000));
    let mut spin = (0u64, 0u64);
    let code = require!(assemble16(CODE, |a| {
        let mut top = a.create_label();
        a.mov(dx, READY_PORT as u32)?;
        a.out(dx, al)?;
        a.set_label(&mut top)?;
        a.cmp(byte_ptr(GO_FLAG), 0)?;
        a.je(top)?;
        a.mov(dx, DONE_PORT as u32)?;
        a.out(dx, al)?;
        a.hlt()?;
        Ok(())
    }));
    // The spin loop is `cmp byte [GO_FLAG], 0` (5 bytes) + `je` (2 bytes),
    // right after `mov dx, imm16` (3) and `out dx, al` (1).
    check_eq!((code[4], code[9]), (0x80, 0x74)); // cmp, je
    spin.0 = CODE + 4;
    spin.1 = spin.0 + 7;
    require!(ram.write(CODE, &code));
    let _mem = require!(ram.map(&conn));
    ok!(conn.reserve_range(AddressSpace::IoPort, READY_PORT, 2));
    check_eq!(conn.vcpu_count(), NCPUS);
    check_errno!(conn.vcpu(NCPUS as u32), libc::ENOENT);

    // Before start: kept for vcpu 1 (bits of absent vcpus are ignored).
    ok!(conn.pause_vcpus((1 << 1) | (1 << 40), USER_BEFORE));

    let log = Arc::new(Log::default());
    *log.events.lock().unwrap_or_else(|p| p.into_inner()) = vec![Vec::new(); NCPUS];
    let mut threads = Vec::new();
    for id in 0..NCPUS {
        let vcpu = require!(conn.vcpu(id as u32));
        let log = Arc::clone(&log);
        threads.push(std::thread::spawn(move || {
            let mut v = vcpu.lock();
            loop {
                let seen = match next(&mut v) {
                    VcpuEvent::Init => Seen::Init,
                    VcpuEvent::Paused { user } => Seen::Paused {
                        user,
                        in_spin_loop: false,
                        at_start: false,
                    },
                    VcpuEvent::Io {
                        address: READY_PORT,
                        ..
                    } => Seen::Ready,
                    VcpuEvent::Io {
                        address: DONE_PORT, ..
                    } => Seen::Done,
                    _ => Seen::Other,
                };
                let seen = match seen {
                    Seen::Init => {
                        let mp = ok!(v.get_mp_state()).map(|m| m.mp_state);
                        let want = if id == 0 {
                            KVM_MP_STATE_RUNNABLE
                        } else {
                            KVM_MP_STATE_UNINITIALIZED
                        };
                        check_eq!((id, mp), (id, Some(want)));
                        require!(enter_real_mode(
                            &mut v,
                            CODE as u16,
                            0x8000 - 0x100 * id as u16
                        ));
                        let mp = ok!(v.get_mp_state()).map(|m| m.mp_state);
                        check_eq!((id, mp), (id, Some(KVM_MP_STATE_RUNNABLE)));
                        seen
                    }
                    Seen::Paused { user, .. } => {
                        let rip = ok!(v.get_regs()).map_or(0, |r| r.rip);
                        Seen::Paused {
                            user,
                            in_spin_loop: (spin.0..spin.1).contains(&rip),
                            at_start: rip == CODE,
                        }
                    }
                    other => other,
                };
                log.note(id, seen);
                if seen == Seen::Done {
                    return; // parked in this event while the plugin exits
                }
                resume(&mut v);
            }
        }));
    }
    ok!(conn.start());

    log.await_count(NCPUS, |s| *s == Seen::Ready);
    ok!(conn.pause_vcpus(0b101, USER_RUNNING));
    log.await_count(
        2,
        |s| matches!(s, Seen::Paused { user, .. } if *user == USER_RUNNING),
    );
    require!(ram.write(GO_FLAG, &[1]));
    for t in threads {
        check!(t.join().is_ok());
    }

    // Exactly the expected sequence on every vcpu.
    let events = log.events.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let paused = |user, before: bool| Seen::Paused {
        user,
        in_spin_loop: !before,
        at_start: before,
    };
    check_eq!(
        events[0],
        vec![
            Seen::Init,
            Seen::Ready,
            paused(USER_RUNNING, false),
            Seen::Done
        ]
    );
    check_eq!(
        events[1],
        vec![
            Seen::Init,
            paused(USER_BEFORE, true),
            Seen::Ready,
            Seen::Done
        ]
    );
    check_eq!(
        events[2],
        vec![
            Seen::Init,
            Seen::Ready,
            paused(USER_RUNNING, false),
            Seen::Done
        ]
    );
    crate::finish("sdk_api pause")
}

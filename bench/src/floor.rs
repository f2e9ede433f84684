//! The floors: the benchmark guest run by a vcpu thread of this process with
//! no plugin, where each exit is either handled inline or answered by a bare
//! second process with no protocol at all.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Instant;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VcpuExit};
use nix::sys::socket::{recv, send, socketpair, AddressFamily, MsgFlags, SockFlag, SockType};
use nix::unistd::{fork, pipe, read, write, ForkResult, Pid};

use crate::guest::{loop_code, Access, CODE, DONE_PORT, RAM_SIZE};

/// How each exit is answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Floor {
    /// Handled inline in the vcpu thread.
    InProcess,
    /// One byte each way over a pair of pipes.
    Pipes,
    /// One byte each way over a seqpacket socket pair.
    Seqpacket,
    /// Shared-memory sequence words, waiting with futexes.
    Futex,
    /// Shared-memory sequence words, both sides spinning.
    Spin,
}

impl Floor {
    pub fn label(self) -> &'static str {
        match self {
            Floor::InProcess => "in-process (no plugin)",
            Floor::Pipes => "bare process: pipe pair",
            Floor::Seqpacket => "bare process: seqpacket",
            Floor::Futex => "bare process: shm + futex",
            Floor::Spin => "bare process: shm + spin",
        }
    }
}

/// A one-page shared anonymous mapping holding two sequence words.
struct SharedWords {
    ptr: *mut AtomicU32,
}

impl SharedWords {
    fn new() -> SharedWords {
        // SAFETY: a fresh shared anonymous mapping of one page; checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert!(p != libc::MAP_FAILED, "mmap of the shared page failed");
        SharedWords { ptr: p.cast() }
    }

    /// Word 0: requests (parent → child); word 1: replies.
    fn word(&self, i: usize) -> &AtomicU32 {
        assert!(i < 2);
        // SAFETY: the page is mapped for the life of `self`, zero-initialized
        // (a valid AtomicU32), aligned, and only accessed atomically.
        unsafe { &*self.ptr.add(i) }
    }
}

fn futex_wait(word: &AtomicU32, expected: u32) {
    // SAFETY: FUTEX_WAIT on a valid, aligned u32 in a shared mapping; no
    // timeout. Spurious returns are handled by the callers' loops.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            std::ptr::null::<libc::timespec>(),
        );
    }
}

fn futex_wake(word: &AtomicU32) {
    // SAFETY: FUTEX_WAKE on a valid, aligned u32 in a shared mapping.
    unsafe {
        libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, i32::MAX);
    }
}

const STOP: u32 = u32::MAX;

/// The parent's end of a bare second process.
enum Peer {
    None,
    Pipes {
        to: OwnedFd,
        from: OwnedFd,
        child: Pid,
    },
    Socket {
        sock: OwnedFd,
        child: Pid,
    },
    Shared {
        words: SharedWords,
        spin: bool,
        child: Pid,
        seq: u32,
    },
}

impl Peer {
    /// Forks the answering process (before any thread exists).
    fn start(floor: Floor) -> Peer {
        match floor {
            Floor::InProcess => Peer::None,
            Floor::Pipes => {
                let (c_rx, p_tx) = pipe().expect("pipe");
                let (p_rx, c_tx) = pipe().expect("pipe");
                // SAFETY: the benchmark is single-threaded here; the child only
                // makes raw system calls and exits.
                match unsafe { fork() }.expect("fork") {
                    ForkResult::Child => {
                        // Close the parent's ends, so the parent's close is
                        // seen as EOF here.
                        drop((p_tx, p_rx));
                        let mut b = [0u8; 1];
                        while read(&c_rx, &mut b) == Ok(1) {
                            let _ = write(&c_tx, &b);
                        }
                        // SAFETY: leave the forked child without running
                        // the parent's destructors.
                        unsafe { libc::_exit(0) }
                    }
                    ForkResult::Parent { child } => {
                        drop((c_rx, c_tx));
                        Peer::Pipes {
                            to: p_tx,
                            from: p_rx,
                            child,
                        }
                    }
                }
            }
            Floor::Seqpacket => {
                let (a, b) = socketpair(
                    AddressFamily::Unix,
                    SockType::SeqPacket,
                    None,
                    SockFlag::empty(),
                )
                .expect("socketpair");
                // SAFETY: as above.
                match unsafe { fork() }.expect("fork") {
                    ForkResult::Child => {
                        drop(a);
                        let mut buf = [0u8; 1];
                        while let Ok(1) = recv(b.as_raw_fd(), &mut buf, MsgFlags::empty()) {
                            let _ = send(b.as_raw_fd(), &buf, MsgFlags::empty());
                        }
                        // SAFETY: as above.
                        unsafe { libc::_exit(0) }
                    }
                    ForkResult::Parent { child } => {
                        drop(b);
                        Peer::Socket { sock: a, child }
                    }
                }
            }
            Floor::Futex | Floor::Spin => {
                let spin = floor == Floor::Spin;
                let words = SharedWords::new();
                // SAFETY: as above.
                match unsafe { fork() }.expect("fork") {
                    ForkResult::Child => {
                        let (req, resp) = (words.word(0), words.word(1));
                        let mut seen = 0;
                        loop {
                            let mut v = req.load(Ordering::Acquire);
                            while v == seen {
                                if spin {
                                    std::hint::spin_loop();
                                } else {
                                    futex_wait(req, seen);
                                }
                                v = req.load(Ordering::Acquire);
                            }
                            if v == STOP {
                                // SAFETY: as above.
                                unsafe { libc::_exit(0) }
                            }
                            seen = v;
                            resp.store(v, Ordering::Release);
                            if !spin {
                                futex_wake(resp);
                            }
                        }
                    }
                    ForkResult::Parent { child } => Peer::Shared {
                        words,
                        spin,
                        child,
                        seq: 0,
                    },
                }
            }
        }
    }

    /// One round trip with the peer.
    fn round_trip(&mut self) {
        match self {
            Peer::None => {}
            Peer::Pipes { to, from, .. } => {
                let mut b = [1u8; 1];
                write(&*to, &b).expect("pipe write");
                read(&*from, &mut b).expect("pipe read");
            }
            Peer::Socket { sock, .. } => {
                let mut b = [1u8; 1];
                send(sock.as_raw_fd(), &b, MsgFlags::empty()).expect("send");
                recv(sock.as_raw_fd(), &mut b, MsgFlags::empty()).expect("recv");
            }
            Peer::Shared {
                words, spin, seq, ..
            } => {
                *seq = seq.wrapping_add(1) % (STOP - 1);
                let (req, resp) = (words.word(0), words.word(1));
                req.store(*seq, Ordering::Release);
                if !*spin {
                    futex_wake(req);
                }
                loop {
                    let v = resp.load(Ordering::Acquire);
                    if v == *seq {
                        break;
                    }
                    if *spin {
                        std::hint::spin_loop();
                    } else {
                        futex_wait(resp, v);
                    }
                }
            }
        }
    }

    fn stop(self) {
        let child = match self {
            Peer::None => return,
            Peer::Pipes { child, .. } | Peer::Socket { child, .. } => child,
            Peer::Shared {
                ref words, child, ..
            } => {
                words.word(0).store(STOP, Ordering::Release);
                futex_wake(words.word(0));
                child
            }
        };
        drop(self);
        let _ = nix::sys::wait::waitpid(child, None);
    }
}

/// Runs `iterations` guest accesses on a fresh VM in this process, each
/// answered per `floor`; returns exits per second.
pub fn run(floor: Floor, access: Access, iterations: u32) -> f64 {
    let mut peer = Peer::start(floor);
    let kvm = Kvm::new().expect("open /dev/kvm");
    let vm = kvm.create_vm().expect("create VM");
    vm.create_irq_chip().expect("irqchip");
    // SAFETY: a fresh private anonymous mapping of RAM_SIZE bytes, checked.
    let ram = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            RAM_SIZE as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert!(ram != libc::MAP_FAILED, "guest RAM mmap failed");
    let code = loop_code(access, iterations);
    // SAFETY: the code fits in RAM at CODE (a few dozen bytes at 4 KiB).
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
    // SAFETY: `ram` stays mapped until after the VM is dropped (never unmapped
    // in this short-lived benchmark process).
    unsafe { vm.set_user_memory_region(region) }.expect("memory slot");
    let mut vcpu = vm.create_vcpu(0).expect("vcpu");
    let mut sregs = vcpu.get_sregs().expect("sregs");
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs).expect("sregs");
    vcpu.set_regs(&kvm_bindings::kvm_regs {
        rip: CODE,
        rflags: 2,
        ..Default::default()
    })
    .expect("regs");

    let mut exits = 0u64;
    let mut start = None;
    loop {
        let done = match vcpu.run().expect("KVM_RUN") {
            VcpuExit::IoOut(port, _) => port == DONE_PORT,
            VcpuExit::MmioWrite(..) | VcpuExit::MmioRead(..) => false,
            other => panic!("unexpected exit {other:?}"),
        };
        if done {
            break;
        }
        start.get_or_insert_with(Instant::now);
        peer.round_trip();
        exits += 1;
    }
    let secs = start.map_or(0.0, |s| s.elapsed().as_secs_f64());
    peer.stop();
    exits as f64 / secs
}

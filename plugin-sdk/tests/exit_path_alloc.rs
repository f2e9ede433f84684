//! The vcpu exit path (wait → state from eager images → resume) performs no
//! heap allocation once warmed up. Allocations are counted per thread by a
//! wrapping global allocator, so the fake host's threads do not interfere.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use common::*;
use crosvm_plugin::kvm_bindings::kvm_regs;
use crosvm_plugin::{StateImage, VcpuEvent};
use plugin_proto::vcpu_request;
use plugin_proto::vcpu_response::wait;
use plugin_proto::VcpuResponse;

struct Counting;

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static COUNT: Cell<usize> = const { Cell::new(0) };
}

fn note() {
    // `try_with`: the allocator may run while thread locals are torn down.
    let on = COUNTING.try_with(Cell::get).unwrap_or(false);
    if on {
        let _ = COUNT.try_with(|c| c.set(c.get() + 1));
    }
}

// SAFETY: every method forwards to the system allocator unchanged; the
// bookkeeping touches only `const`-initialized thread locals (no allocation).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note();
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note();
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note();
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

#[test]
fn exit_path_does_not_allocate() {
    const EXITS: u64 = 200;
    let (conn, mut host) = connect(1, Delivery::Single, default_handler());
    let regs = kvm_regs {
        rax: 0x1234,
        ..Default::default()
    };
    let mut n = 0u64;
    let vcpu_host = serve_vcpu(host.vcpus.remove(0), move |req| match &req.message {
        Some(vcpu_request::Message::Wait(_)) | Some(vcpu_request::Message::Resume(_))
            if n < EXITS =>
        {
            n += 1;
            let mut r = VcpuResponse::new();
            r.mut_wait().exit = Some(wait::Exit::Io(wait::Io {
                address: n,
                data: vec![0; 4],
                regs: regs.as_image().to_vec(),
                ..Default::default()
            }));
            vec![Reply::Msg(r)]
        }
        _ => vec![],
    });

    let vcpu = conn.vcpu(0).unwrap();
    let mut v = vcpu.lock();
    let mut counted = None;
    for i in 1..=EXITS {
        if i == 20 {
            COUNTING.with(|c| c.set(true));
        }
        match v.wait().unwrap() {
            VcpuEvent::Io { address, data, .. } => {
                assert_eq!(address, i);
                assert_eq!(data.len(), 4);
            }
            other => panic!("{other:?}"),
        }
        let got = v.get_regs().unwrap();
        assert_eq!(got.rax, 0x1234);
        v.resume_io_read(&(i as u32).to_le_bytes()).unwrap();
        if i == EXITS - 1 {
            COUNTING.with(|c| c.set(false));
            counted = Some(COUNT.with(Cell::get));
        }
    }
    assert_eq!(counted, Some(0), "allocations on the exit path");
    // The counter does see allocations.
    COUNTING.with(|c| c.set(true));
    drop(std::hint::black_box(Vec::<u8>::with_capacity(8)));
    COUNTING.with(|c| c.set(false));
    assert_eq!(COUNT.with(Cell::get), 1);
    drop(v);
    drop((vcpu, conn));
    assert_eq!(vcpu_host.join().unwrap().len() as u64, EXITS + 1);
}

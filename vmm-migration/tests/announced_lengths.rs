//! A hostile source announces a frame as long as its kind allows and then
//! sends a few bytes: the target's memory grows with what arrives, not with
//! what is announced (found by the migration_stream fuzz target with
//! `-malloc_limit_mb=64`: a 5-byte frame head made the target allocate and
//! zero 64 MiB). This test binary counts every allocation's size.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use vmm_migration::{kind, Header, Reader, Region, StreamError, Writer, MAX_STATE};
use vmm_snapshot::Records;

/// The system allocator, noting the largest single request.
struct Largest;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator; the
// only addition is an atomic maximum.
unsafe impl GlobalAlloc for Largest {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller's contract is System's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Largest = Largest;

/// A valid stream's Header, then the head of a State frame announcing
/// `MAX_STATE` bytes, then `sent` bytes of it.
fn announced_state(sent: usize) -> Vec<u8> {
    let mut w = Writer::new(Vec::new()).unwrap();
    w.header(&Header {
        vcpus: 1,
        regions: vec![Region {
            gpa: 0,
            size: 0x10000,
        }],
        facts: Records::new(),
    })
    .unwrap();
    let mut bytes = w.get_mut().clone();
    bytes.push(kind::STATE);
    bytes.extend_from_slice(&(MAX_STATE as u32).to_le_bytes());
    bytes.extend(std::iter::repeat_n(0x55, sent));
    bytes
}

#[test]
fn a_frame_announced_long_and_sent_short_costs_what_was_sent() {
    for sent in [0, 10, 3 << 20] {
        let bytes = announced_state(sent);
        let mut r = Reader::new(&bytes[..]).unwrap();
        r.next_frame().expect("the header");
        LARGEST.store(0, Ordering::Relaxed);
        let e = r
            .next_frame()
            .expect_err("the stream ends inside the State frame");
        let largest = LARGEST.load(Ordering::Relaxed);
        assert!(matches!(e, StreamError::Closed { .. }), "sent {sent}: {e}");
        // At most one read step (1 MiB) ahead of what arrived, and the
        // buffer's doubling: never the 64 MiB announced.
        assert!(
            largest <= 2 * (sent + (1 << 20)),
            "sent {sent} of an announced {MAX_STATE}: an allocation of {largest} bytes"
        );
    }
}

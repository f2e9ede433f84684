//! The plugin's own guest-memory writes in C (`crosvm_ext.h`,
//! docs/protocol-extensions.md §8): thin shims over [`crate::WriteTracker`]
//! and [`crate::ControlChannel::reply_dirty_pages`]. Every function checks
//! its pointers (NULL: `-EINVAL`).

use std::ffi::{c_int, c_void};

use super::{crosvm_control, fail, ffi};
use crate::WriteTracker;

/// `struct crosvm_write_tracker`: the pages the plugin wrote since the
/// host last asked. Shared by the plugin's threads (the tracker locks).
pub struct crosvm_write_tracker(pub(super) WriteTracker);

/// A new tracker with no pages.
#[no_mangle]
pub unsafe extern "C" fn crosvm_write_tracker_new(out: *mut *mut crosvm_write_tracker) -> c_int {
    if out.is_null() {
        return -libc::EINVAL;
    }
    let t = Box::into_raw(Box::new(crosvm_write_tracker(WriteTracker::new())));
    // SAFETY: `out` is non-NULL and writable (C API contract).
    unsafe { out.write(t) };
    0
}

/// Frees the tracker (its pages are forgotten) and sets `*self_` to NULL.
#[no_mangle]
pub unsafe extern "C" fn crosvm_write_tracker_destroy(
    self_: *mut *mut crosvm_write_tracker,
) -> c_int {
    // SAFETY: the handle pointer per the C API contract (see free_handle).
    unsafe { super::free_handle(self_) }
}

/// Notes a write of `len` bytes at guest-physical `gpa` made some other way
/// (every page it touches; `len` 0 notes none).
#[no_mangle]
pub unsafe extern "C" fn crosvm_write_tracker_mark(
    self_: *const crosvm_write_tracker,
    gpa: u64,
    len: usize,
) -> c_int {
    if self_.is_null() {
        return -libc::EINVAL;
    }
    // SAFETY: non-NULL live handle (C API contract).
    ffi(|| unsafe {
        (*self_).0.mark(gpa, len);
        0
    })
}

/// Copies `len` bytes from `bytes` to `dst`, the plugin's own mapping of
/// guest-physical `gpa`, and notes the pages. The copy is a volatile one:
/// the guest may access the same memory at the same time.
#[no_mangle]
pub unsafe extern "C" fn crosvm_write_tracker_write(
    self_: *const crosvm_write_tracker,
    dst: *mut c_void,
    gpa: u64,
    bytes: *const c_void,
    len: usize,
) -> c_int {
    if self_.is_null() || (len > 0 && (dst.is_null() || bytes.is_null())) {
        return -libc::EINVAL;
    }
    if gpa.checked_add(len as u64).is_none() {
        return -libc::EINVAL;
    }
    // SAFETY: non-NULL live handle; `dst` writable and `bytes` readable for
    // `len` bytes (C API contract; the caller's mapping of guest memory).
    ffi(|| unsafe {
        let guard = (*self_).0.hold();
        let (dst, src) = (dst.cast::<u8>(), bytes.cast::<u8>());
        for i in 0..len {
            // SAFETY: `i < len`, inside both buffers; a volatile byte store
            // is sound while the guest accesses the same memory.
            dst.add(i).write_volatile(src.add(i).read());
        }
        guard.mark(gpa, len);
        0
    })
}

/// Answers `CROSVM_CONTROL_DIRTY_PAGES` command `id` with the tracker's
/// pages and forgets them. When the reply cannot be sent the pages stay in
/// the tracker (nothing is lost) and the `-errno` is returned: `-EINVAL`
/// for more than `DIRTY_PAGES_MAX` pages (refuse the command with
/// `crosvm_control_reply_error`).
#[no_mangle]
pub unsafe extern "C" fn crosvm_control_reply_tracked_pages(
    self_: *mut crosvm_control,
    id: u64,
    tracker: *const crosvm_write_tracker,
) -> c_int {
    if self_.is_null() || tracker.is_null() {
        return -libc::EINVAL;
    }
    // SAFETY: non-NULL live handles (C API contract).
    ffi(|| unsafe {
        let t = &(*tracker).0;
        let pages = t.take();
        match (*self_).chan.reply_dirty_pages(id, &pages) {
            Ok(()) => 0,
            Err(e) => {
                for &p in &pages {
                    t.mark(p, 1);
                }
                fail(&e)
            }
        }
    })
}

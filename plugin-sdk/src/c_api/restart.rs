//! Hot restart in C (`crosvm_ext.h`, docs/protocol-extensions.md §9): thin
//! shims over [`crate::Attached`], [`crate::Checkpoint`] and
//! [`crate::Connection::declare_restartable`]. Every function checks its
//! pointers (a NULL handle or out-pointer: `-EINVAL`).

use std::ffi::c_int;
use std::os::fd::IntoRawFd;

use super::{conn, crosvm, crosvm_io, crosvm_irq, crosvm_memory, crosvm_vcpu, fail, ffi, vcpu};
use crate::{Attached, Checkpoint, RestartKind};

/// `struct crosvm_attached`.
pub struct crosvm_attached(Attached);

/// `struct crosvm_checkpoint`.
pub struct crosvm_checkpoint(Checkpoint);

/// `Attach`: `*out` gets the answer (kind FRESH on a fresh boot or an old
/// host). 0 or `-errno`.
#[no_mangle]
pub unsafe extern "C" fn crosvm_attach(
    self_: *mut crosvm,
    out: *mut *mut crosvm_attached,
) -> c_int {
    if self_.is_null() || out.is_null() {
        return -libc::EINVAL;
    }
    // SAFETY: live handle, `out` writable (C API contract).
    ffi(|| unsafe {
        match conn(self_).attach() {
            Ok(a) => {
                out.write(Box::into_raw(Box::new(crosvm_attached(a))));
                0
            }
            Err(e) => fail(&e),
        }
    })
}

/// The kind: `CROSVM_RESTART_FRESH` 0, `_UPGRADE` 1, `_CRASH` 2.
#[no_mangle]
pub unsafe extern "C" fn crosvm_attached_kind(self_: *const crosvm_attached) -> c_int {
    if self_.is_null() {
        return -libc::EINVAL;
    }
    // SAFETY: live handle from crosvm_attach (C API contract).
    ffi(|| match unsafe { &(*self_).0 }.kind() {
        RestartKind::Fresh => 0,
        RestartKind::Upgrade => 1,
        RestartKind::Crash => 2,
    })
}

/// The old plugin's state (UPGRADE): `*state` and `*len` stay valid until
/// `crosvm_attached_destroy`.
#[no_mangle]
pub unsafe extern "C" fn crosvm_attached_state(
    self_: *const crosvm_attached,
    state: *mut *const u8,
    len: *mut usize,
) -> c_int {
    if self_.is_null() || state.is_null() || len.is_null() {
        return -libc::EINVAL;
    }
    // SAFETY: live handle, `state` and `len` writable (C API contract).
    ffi(|| unsafe {
        let s = (*self_).0.state();
        state.write(s.as_ptr());
        len.write(s.len());
        0
    })
}

/// Takes the kept memory object `id`: `*out` a handle (destroy it with
/// `crosvm_destroy_memory`), `*out_fd` its memfd (the caller's). 0 or
/// `-errno` (`-EINVAL`: no memory object with that id).
#[no_mangle]
pub unsafe extern "C" fn crosvm_attached_take_memory(
    self_: *mut crosvm_attached,
    id: u32,
    out: *mut *mut crosvm_memory,
    out_fd: *mut c_int,
) -> c_int {
    if self_.is_null() || out.is_null() || out_fd.is_null() {
        return -libc::EINVAL;
    }
    // SAFETY: live handle, `out` and `out_fd` writable (C API contract).
    ffi(|| unsafe {
        match (*self_).0.take_memory(id) {
            Ok((mem, fd)) => {
                out.write(Box::into_raw(Box::new(crosvm_memory { mem: mem.detach() })));
                out_fd.write(fd.into_raw_fd());
                0
            }
            Err(e) => fail(&e),
        }
    })
}

/// Takes the kept io event `id`: `*out` a handle as from
/// `crosvm_create_io_event` (its eventfd stays the handle's; destroy it
/// with `crosvm_destroy_io_event`). 0 or `-errno` (`-EINVAL`: a NULL
/// argument, or no io event with that id; the object stays kept).
#[no_mangle]
pub unsafe extern "C" fn crosvm_attached_take_io_event(
    self_: *mut crosvm_attached,
    id: u32,
    out: *mut *mut crosvm_io,
) -> c_int {
    if self_.is_null() || out.is_null() {
        return -libc::EINVAL;
    }
    // SAFETY: non-NULL, a live handle and a writable `out` (C API contract).
    ffi(|| unsafe {
        match (*self_).0.take_io_event(id) {
            Ok(io) => {
                out.write(Box::into_raw(Box::new(crosvm_io { io: io.detach() })));
                0
            }
            Err(e) => fail(&e),
        }
    })
}

/// Takes the kept irq event `id`: `*out` a handle as from
/// `crosvm_create_irq_event`. The host keeps only the trigger eventfd: the
/// handle's resample eventfd is a new one that is never signalled. 0 or
/// `-errno` (`-EINVAL` as for io events).
#[no_mangle]
pub unsafe extern "C" fn crosvm_attached_take_irq_event(
    self_: *mut crosvm_attached,
    id: u32,
    out: *mut *mut crosvm_irq,
) -> c_int {
    if self_.is_null() || out.is_null() {
        return -libc::EINVAL;
    }
    // SAFETY: non-NULL, a live handle and a writable `out` (C API contract).
    ffi(|| unsafe {
        match (*self_).0.take_irq_event(id) {
            Ok(irq) => {
                out.write(Box::into_raw(Box::new(crosvm_irq { irq: irq.detach() })));
                0
            }
            Err(e) => fail(&e),
        }
    })
}

/// Takes the kept checkpoint: 1 with `*out`, 0 (and `*out` NULL) when
/// there is none, or `-errno` (`-EBADMSG`: its header is corrupted).
#[no_mangle]
pub unsafe extern "C" fn crosvm_attached_take_checkpoint(
    self_: *mut crosvm_attached,
    out: *mut *mut crosvm_checkpoint,
) -> c_int {
    if self_.is_null() || out.is_null() {
        return -libc::EINVAL;
    }
    // SAFETY: live handle, `out` writable (C API contract).
    ffi(|| unsafe {
        match (*self_).0.take_checkpoint() {
            Ok(Some(c)) => {
                out.write(Box::into_raw(Box::new(crosvm_checkpoint(c))));
                1
            }
            Ok(None) => {
                out.write(std::ptr::null_mut());
                0
            }
            Err(e) => fail(&e),
        }
    })
}

/// Frees the answer (objects not taken stay in the host) and sets `*self_`
/// to NULL.
#[no_mangle]
pub unsafe extern "C" fn crosvm_attached_destroy(self_: *mut *mut crosvm_attached) -> c_int {
    // SAFETY: the handle pointer per the C API contract (see free_handle).
    unsafe { super::free_handle(self_) }
}

/// A new checkpoint for blobs of at most `capacity` bytes.
#[no_mangle]
pub unsafe extern "C" fn crosvm_checkpoint_new(
    capacity: usize,
    out: *mut *mut crosvm_checkpoint,
) -> c_int {
    if out.is_null() {
        return -libc::EINVAL;
    }
    // SAFETY: `out` writable (C API contract).
    ffi(|| unsafe {
        match Checkpoint::new(capacity) {
            Ok(c) => {
                out.write(Box::into_raw(Box::new(crosvm_checkpoint(c))));
                0
            }
            Err(e) => fail(&e),
        }
    })
}

/// Commits `len` bytes at `blob` as the state covering exits up to
/// `serial` (commit before resuming the exit).
#[no_mangle]
pub unsafe extern "C" fn crosvm_checkpoint_commit(
    self_: *mut crosvm_checkpoint,
    serial: u64,
    blob: *const u8,
    len: usize,
) -> c_int {
    if self_.is_null() || (len > 0 && blob.is_null()) {
        return -libc::EINVAL;
    }
    // SAFETY: live handle, `blob` readable for `len` bytes (NULL with 0).
    ffi(|| unsafe {
        let data = if len == 0 {
            &[][..]
        } else {
            std::slice::from_raw_parts(blob, len)
        };
        match (*self_).0.commit(serial, data) {
            Ok(()) => 0,
            Err(e) => fail(&e),
        }
    })
}

/// The newest intact checkpoint: 1 with `*serial`, the blob in `buf` and
/// its size in `*out_len`; 0 when nothing was committed; `-E2BIG` when
/// `len` is too small (`*out_len`: the size); `-EBADMSG` when corrupted.
#[no_mangle]
pub unsafe extern "C" fn crosvm_checkpoint_load(
    self_: *const crosvm_checkpoint,
    serial: *mut u64,
    buf: *mut u8,
    len: usize,
    out_len: *mut usize,
) -> c_int {
    if self_.is_null() || serial.is_null() || out_len.is_null() || (len > 0 && buf.is_null()) {
        return -libc::EINVAL;
    }
    // SAFETY: live handle, `serial`/`out_len` writable, `buf` writable for
    // `len` bytes (C API contract).
    ffi(|| unsafe {
        out_len.write(0);
        match (*self_).0.load() {
            Ok(None) => 0,
            Ok(Some((s, blob))) => {
                out_len.write(blob.len());
                serial.write(s);
                if blob.len() > len {
                    return -libc::E2BIG;
                }
                if !blob.is_empty() {
                    // SAFETY: `buf` has room for `len` >= `blob.len()` bytes.
                    std::ptr::copy_nonoverlapping(blob.as_ptr(), buf, blob.len());
                }
                1
            }
            Err(e) => fail(&e),
        }
    })
}

/// Frees the checkpoint (the host keeps its copy) and sets `*self_` NULL.
#[no_mangle]
pub unsafe extern "C" fn crosvm_checkpoint_destroy(self_: *mut *mut crosvm_checkpoint) -> c_int {
    // SAFETY: the handle pointer per the C API contract (see free_handle).
    unsafe { super::free_handle(self_) }
}

/// `DeclareRestartable`, with the checkpoint (NULL: none).
#[no_mangle]
pub unsafe extern "C" fn crosvm_declare_restartable(
    self_: *mut crosvm,
    checkpoint: *const crosvm_checkpoint,
) -> c_int {
    if self_.is_null() {
        return -libc::EINVAL;
    }
    // SAFETY: live handles (checkpoint NULL or from crosvm_checkpoint_*).
    ffi(|| unsafe {
        let c = if checkpoint.is_null() {
            None
        } else {
            Some(&(*checkpoint).0)
        };
        match conn(self_).declare_restartable(c) {
            Ok(()) => 0,
            Err(e) => fail(&e),
        }
    })
}

/// The serial of the vcpu's last exit that needed a resume.
#[no_mangle]
pub unsafe extern "C" fn crosvm_vcpu_serial(self_: *mut crosvm_vcpu, out: *mut u64) -> c_int {
    if self_.is_null() || out.is_null() {
        return -libc::EINVAL;
    }
    // SAFETY: live vcpu handle, `out` writable (C API contract).
    ffi(|| unsafe {
        out.write(vcpu(self_).serial());
        0
    })
}

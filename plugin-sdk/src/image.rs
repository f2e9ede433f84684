//! Conversion between KVM uapi structs and the raw "state images" that cross
//! the wire. This is the only place where struct bytes are reinterpreted.

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_ioapic_state, kvm_lapic_state,
    kvm_mp_state, kvm_msr_entry, kvm_pic_state, kvm_pit_state2, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs,
};

use crate::error::{Error, Result};

mod sealed {
    pub trait Sealed {}
}

/// A KVM uapi struct whose raw bytes form a state image.
///
/// # Safety
///
/// Implementors must be `#[repr(C)]` plain-old-data: no implicit padding
/// (every byte belongs to a field, so reading all bytes reads initialized
/// memory) and every bit pattern is a valid value.
pub unsafe trait StateImage: Copy + Default + sealed::Sealed {
    /// Name used in error messages.
    const NAME: &'static str;

    /// The image bytes of `self`.
    fn as_image(&self) -> &[u8] {
        // SAFETY: `Self` is plain old data without implicit padding (trait
        // contract), so its `size_of` bytes are initialized and may be viewed
        // as `u8` for the lifetime of the borrow.
        unsafe {
            std::slice::from_raw_parts(
                (self as *const Self).cast::<u8>(),
                std::mem::size_of::<Self>(),
            )
        }
    }

    /// Builds a value from an image that must be exactly `size_of::<Self>()`
    /// bytes long (else `EPROTO`).
    fn from_image(bytes: &[u8]) -> Result<Self> {
        let expected = std::mem::size_of::<Self>();
        if bytes.len() != expected {
            return Err(Error::BadLength {
                what: Self::NAME,
                expected,
                got: bytes.len(),
            });
        }
        let mut value = Self::default();
        // SAFETY: `value` is a valid, exclusively borrowed `Self` of exactly
        // `expected` bytes, `bytes` has the same length and cannot overlap a
        // local, and any bit pattern is a valid `Self` (trait contract).
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                (&mut value as *mut Self).cast::<u8>(),
                expected,
            );
        }
        Ok(value)
    }
}

macro_rules! state_images {
    ($($ty:ident = $size:expr),* $(,)?) => {$(
        impl sealed::Sealed for $ty {}
        // SAFETY: the KVM uapi headers declare these structs with explicit
        // padding members (the kernel copies them to user space verbatim and
        // must not leak bytes), kvm-bindings mirrors them with `#[repr(C)]`
        // and only integer / integer-array / union-of-integer fields, so every
        // bit pattern is valid and there is no implicit padding. The size
        // assertion below pins the layout to the x86-64 ABI of the protocol.
        unsafe impl StateImage for $ty {
            const NAME: &'static str = stringify!($ty);
        }
        const _: () = assert!(std::mem::size_of::<$ty>() == $size);
    )*};
}

state_images! {
    kvm_regs = 144,
    kvm_sregs = 312,
    kvm_fpu = 416,
    kvm_debugregs = 128,
    kvm_xcrs = 392,
    kvm_lapic_state = 1024,
    kvm_mp_state = 4,
    kvm_vcpu_events = 64,
    kvm_pic_state = 16,
    kvm_ioapic_state = 216,
    kvm_pit_state2 = 112,
    kvm_clock_data = 48,
    kvm_msr_entry = 16,
    kvm_cpuid_entry2 = 40,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let regs = kvm_regs {
            rax: 0x1122_3344_5566_7788,
            rip: 0xfff0,
            rflags: 2,
            ..Default::default()
        };
        let bytes = regs.as_image().to_vec();
        assert_eq!(bytes.len(), 144);
        assert_eq!(&bytes[..8], &0x1122_3344_5566_7788u64.to_le_bytes());
        assert_eq!(kvm_regs::from_image(&bytes).unwrap(), regs);
    }

    #[test]
    fn wrong_length_is_eproto() {
        let err = kvm_sregs::from_image(&[0u8; 311]).unwrap_err();
        assert_eq!(err.errno(), libc::EPROTO);
        let err = kvm_mp_state::from_image(&[]).unwrap_err();
        assert_eq!(err.errno(), libc::EPROTO);
    }
}

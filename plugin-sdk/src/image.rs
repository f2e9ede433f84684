//! Conversion between KVM uapi structs and the raw "state images" that cross
//! the wire: the struct's bytes, through kvm-bindings' zerocopy derives (and,
//! for `kvm_fpu`, which has none, [`plugin_proto::image`]).

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_ioapic_state, kvm_lapic_state,
    kvm_mp_state, kvm_msr_entry, kvm_pic_state, kvm_pit_state2, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs,
};
use zerocopy::{FromBytes, IntoBytes};

use crate::error::{Error, Result};

mod sealed {
    pub trait Sealed {}
}

/// A KVM uapi struct whose raw bytes form a state image.
pub trait StateImage: Copy + Default + sealed::Sealed {
    /// Name used in error messages.
    const NAME: &'static str;

    /// The image bytes of `self`.
    fn as_image(&self) -> &[u8];

    /// Builds a value from an image that must be exactly `size_of::<Self>()`
    /// bytes long (else `EPROTO`).
    fn from_image(bytes: &[u8]) -> Result<Self>;
}

fn bad_length<T>(what: &'static str, got: usize) -> Error {
    Error::BadLength {
        what,
        expected: std::mem::size_of::<T>(),
        got,
    }
}

macro_rules! state_images {
    ($($ty:ident = $size:expr),* $(,)?) => {$(
        impl sealed::Sealed for $ty {}
        impl StateImage for $ty {
            const NAME: &'static str = stringify!($ty);

            fn as_image(&self) -> &[u8] {
                self.as_bytes()
            }

            fn from_image(bytes: &[u8]) -> Result<Self> {
                $ty::read_from_bytes(bytes).map_err(|_| bad_length::<Self>(Self::NAME, bytes.len()))
            }
        }
        // The layout of the protocol is the x86-64 ABI's.
        const _: () = assert!(std::mem::size_of::<$ty>() == $size);
    )*};
}

state_images! {
    kvm_regs = 144,
    kvm_sregs = 312,
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

impl sealed::Sealed for kvm_fpu {}
impl StateImage for kvm_fpu {
    const NAME: &'static str = "kvm_fpu";

    fn as_image(&self) -> &[u8] {
        const _: () =
            assert!(std::mem::size_of::<kvm_fpu>() == plugin_proto::image::FPU_IMAGE_SIZE);
        // SAFETY: kvm_fpu is `#[repr(C)]` with integer and integer-array
        // fields only, and they tile its 416 bytes without a gap (the field
        // offsets are pinned by plugin_proto::image's tests), so every byte is
        // initialized and may be viewed as `u8` for the borrow's lifetime.
        // (This view is the one unsafe block left for images: kvm-bindings
        // derives no zerocopy traits for kvm_fpu, and the API returns a
        // borrowed image; `fpu_view_is_the_field_by_field_image` checks it.)
        unsafe {
            std::slice::from_raw_parts(
                (self as *const kvm_fpu).cast::<u8>(),
                std::mem::size_of::<kvm_fpu>(),
            )
        }
    }

    fn from_image(bytes: &[u8]) -> Result<Self> {
        plugin_proto::image::fpu_from_image(bytes)
            .ok_or_else(|| bad_length::<Self>(Self::NAME, bytes.len()))
    }
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
    fn fpu_round_trip() {
        let fpu = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            xmm: [[0xab; 16]; 16],
            ..Default::default()
        };
        let bytes = fpu.as_image().to_vec();
        assert_eq!(bytes.len(), 416);
        assert_eq!(&bytes[128..130], &0x37fu16.to_le_bytes());
        assert_eq!(kvm_fpu::from_image(&bytes).unwrap(), fpu);
    }

    #[test]
    fn fpu_view_is_the_field_by_field_image() {
        let image: Vec<u8> = (0..416).map(|i| (i * 13 + 1) as u8).collect();
        let fpu = kvm_fpu::from_image(&image).unwrap();
        assert_eq!(fpu.as_image(), &plugin_proto::image::fpu_to_image(&fpu)[..]);
        assert_eq!(fpu.as_image(), &image[..]);
    }

    #[test]
    fn wrong_length_is_eproto() {
        let err = kvm_sregs::from_image(&[0u8; 311]).unwrap_err();
        assert_eq!(err.errno(), libc::EPROTO);
        let err = kvm_mp_state::from_image(&[]).unwrap_err();
        assert_eq!(err.errno(), libc::EPROTO);
        let err = kvm_fpu::from_image(&[0u8; 417]).unwrap_err();
        assert_eq!(err.errno(), libc::EPROTO);
    }
}

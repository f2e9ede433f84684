//! The state image of `kvm_fpu`, the one state struct kvm-bindings derives no
//! zerocopy traits for (every other image is its struct's bytes, read and
//! written with those derives). Written field by field, in the x86-64 layout
//! of the struct, so neither side needs `unsafe` for it; the tests pin the
//! offsets to the struct's.

use kvm_bindings::kvm_fpu;

/// Size of the image (and of the struct).
pub const FPU_IMAGE_SIZE: usize = 416;
const _: () = assert!(std::mem::size_of::<kvm_fpu>() == FPU_IMAGE_SIZE);

const FCW: usize = 128;
const FSW: usize = 130;
const FTWX: usize = 132;
const PAD1: usize = 133;
const LAST_OPCODE: usize = 134;
const LAST_IP: usize = 136;
const LAST_DP: usize = 144;
const XMM: usize = 152;
const MXCSR: usize = 408;
const PAD2: usize = 412;

/// The image of `fpu`: its bytes as the struct lays them out.
pub fn fpu_to_image(fpu: &kvm_fpu) -> [u8; FPU_IMAGE_SIZE] {
    let mut b = [0u8; FPU_IMAGE_SIZE];
    for (i, r) in fpu.fpr.iter().enumerate() {
        b[i * 16..i * 16 + 16].copy_from_slice(r);
    }
    b[FCW..FCW + 2].copy_from_slice(&fpu.fcw.to_le_bytes());
    b[FSW..FSW + 2].copy_from_slice(&fpu.fsw.to_le_bytes());
    b[FTWX] = fpu.ftwx;
    b[PAD1] = fpu.pad1;
    b[LAST_OPCODE..LAST_OPCODE + 2].copy_from_slice(&fpu.last_opcode.to_le_bytes());
    b[LAST_IP..LAST_IP + 8].copy_from_slice(&fpu.last_ip.to_le_bytes());
    b[LAST_DP..LAST_DP + 8].copy_from_slice(&fpu.last_dp.to_le_bytes());
    for (i, r) in fpu.xmm.iter().enumerate() {
        b[XMM + i * 16..XMM + i * 16 + 16].copy_from_slice(r);
    }
    b[MXCSR..MXCSR + 4].copy_from_slice(&fpu.mxcsr.to_le_bytes());
    b[PAD2..PAD2 + 4].copy_from_slice(&fpu.pad2.to_le_bytes());
    b
}

/// The `kvm_fpu` of an image; `None` unless it is exactly
/// [`FPU_IMAGE_SIZE`] bytes.
pub fn fpu_from_image(image: &[u8]) -> Option<kvm_fpu> {
    let b: &[u8; FPU_IMAGE_SIZE] = image.try_into().ok()?;
    let arr = |at: usize| -> [u8; 16] { b[at..at + 16].try_into().expect("16 bytes") };
    let u16_at = |at: usize| u16::from_le_bytes([b[at], b[at + 1]]);
    let u32_at = |at: usize| u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"));
    let u64_at = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"));
    Some(kvm_fpu {
        fpr: std::array::from_fn(|i| arr(i * 16)),
        fcw: u16_at(FCW),
        fsw: u16_at(FSW),
        ftwx: b[FTWX],
        pad1: b[PAD1],
        last_opcode: u16_at(LAST_OPCODE),
        last_ip: u64_at(LAST_IP),
        last_dp: u64_at(LAST_DP),
        xmm: std::array::from_fn(|i| arr(XMM + i * 16)),
        mxcsr: u32_at(MXCSR),
        pad2: u32_at(PAD2),
    })
}

#[cfg(test)]
mod tests {
    use std::mem::offset_of;

    use super::*;

    #[test]
    fn offsets_are_the_structs() {
        assert_eq!(offset_of!(kvm_fpu, fpr), 0);
        assert_eq!(offset_of!(kvm_fpu, fcw), FCW);
        assert_eq!(offset_of!(kvm_fpu, fsw), FSW);
        assert_eq!(offset_of!(kvm_fpu, ftwx), FTWX);
        assert_eq!(offset_of!(kvm_fpu, pad1), PAD1);
        assert_eq!(offset_of!(kvm_fpu, last_opcode), LAST_OPCODE);
        assert_eq!(offset_of!(kvm_fpu, last_ip), LAST_IP);
        assert_eq!(offset_of!(kvm_fpu, last_dp), LAST_DP);
        assert_eq!(offset_of!(kvm_fpu, xmm), XMM);
        assert_eq!(offset_of!(kvm_fpu, mxcsr), MXCSR);
        assert_eq!(offset_of!(kvm_fpu, pad2), PAD2);
    }

    #[test]
    fn round_trip_keeps_every_byte() {
        let image: Vec<u8> = (0..FPU_IMAGE_SIZE).map(|i| (i * 7 + 3) as u8).collect();
        let fpu = fpu_from_image(&image).unwrap();
        assert_eq!(fpu.fcw, u16::from_le_bytes([image[128], image[129]]));
        assert_eq!(fpu.xmm[15][15], image[407]);
        assert_eq!(fpu_to_image(&fpu).to_vec(), image);
        assert!(fpu_from_image(&image[..415]).is_none());
        assert!(fpu_from_image(&[image.clone(), vec![0]].concat()).is_none());
    }
}

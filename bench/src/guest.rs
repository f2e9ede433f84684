//! The benchmark guest: the same tiny 16-bit loop for every row.

use iced_x86::code_asm::*;

/// Port the guest loop writes to (sync or async range, or an ioeventfd).
pub const LOOP_PORT: u16 = 0x700;
/// Port written once when the loop is done.
pub const DONE_PORT: u16 = 0x701;
/// Segment whose base (0xF0000) is the MMIO address, outside the 64 KiB RAM.
pub const MMIO_SEGMENT: u16 = 0xf000;
pub const MMIO_ADDR: u64 = 0xf0000;
/// Guest code load address.
pub const CODE: u64 = 0x1000;
pub const RAM_SIZE: u64 = 0x10000;

/// What the loop body does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    PortOut,
    MmioWrite,
    MmioRead,
}

/// `iterations` accesses, then a write to `DONE_PORT`, then `hlt`.
pub fn loop_code(access: Access, iterations: u32) -> Vec<u8> {
    let mut a = CodeAssembler::new(16).expect("16-bit assembler");
    let build = |a: &mut CodeAssembler| -> Result<(), iced_x86::IcedError> {
        let mut again = a.create_label();
        a.mov(ax, u32::from(MMIO_SEGMENT))?;
        a.mov(ds, ax)?;
        a.mov(ecx, iterations)?;
        a.mov(dx, u32::from(LOOP_PORT))?;
        a.set_label(&mut again)?;
        match access {
            Access::PortOut => a.out(dx, al)?,
            Access::MmioWrite => a.mov(byte_ptr(0), al)?,
            Access::MmioRead => a.mov(al, byte_ptr(0))?,
        }
        a.dec(ecx)?;
        a.jnz(again)?;
        a.mov(dx, u32::from(DONE_PORT))?;
        a.out(dx, al)?;
        a.hlt()?;
        Ok(())
    };
    build(&mut a).expect("assemble the benchmark loop");
    a.assemble(CODE).expect("assemble the benchmark loop")
}

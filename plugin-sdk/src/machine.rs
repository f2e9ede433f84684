//! Machine helpers: guest RAM from a sealed memfd, and vcpu set-up for real,
//! protected and long mode.
//!
//! # The initial vcpu state
//!
//! At its [`Init`](crate::VcpuEvent::Init) event a vcpu is in the x86 reset
//! state KVM gives a new vcpu: 16-bit real mode, `CS.selector = 0xf000`,
//! `CS.base = 0xffff0000`, `RIP = 0xfff0` (the first instruction is fetched
//! at `0xfffffff0`), the other segments at base 0 with limit `0xffff`,
//! `RFLAGS = 2`, `CR0 = 0x60000010` (caches disabled, protection and paging
//! off), no GDT/IDT beyond the real-mode defaults. Vcpu 0 is runnable;
//! every other vcpu is an application processor waiting for a startup IPI
//! (`KVM_MP_STATE_UNINITIALIZED`): it does not run until the guest sends one
//! or the plugin makes it runnable (the `enter_*` helpers below do).
//!
//! Setting only `rip` at `Init` therefore runs code at `0xffff0000 + rip`,
//! which is normally unmapped: use [`enter_real_mode`],
//! [`enter_protected_mode`] or [`enter_long_mode`], which set every register
//! the mode needs.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;

use kvm_bindings::{kvm_mp_state, kvm_segment, KVM_MP_STATE_RUNNABLE};
use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, SealFlag};
use nix::sys::memfd::{memfd_create, MFdFlags};
use nix::sys::mman::{mmap, munmap, MapFlags, ProtFlags};

use crate::error::{Error, Result};
use crate::objects::{Memory, PAGE_SIZE};
use crate::vcpu::VcpuGuard;
use crate::Connection;

fn sys(op: &'static str) -> impl FnOnce(Errno) -> Error {
    move |source| Error::Sys { op, source }
}

/// Guest RAM: a memfd sealed against shrinking and growing (as the host
/// requires of guest memory), mapped into the plugin so it can load images
/// and inspect what the guest wrote.
///
/// The guest writes this memory concurrently, so the plugin only reaches it
/// through copies ([`write`](Self::write), [`read`](Self::read)) made with
/// volatile accesses, never through references.
///
/// ```
/// use crosvm_plugin::GuestRam;
///
/// let ram = GuestRam::new(0x10000)?;
/// ram.write(0x1000, &[0xf4])?; // hlt
/// assert_eq!(ram.read(0x1000, 2)?, [0xf4, 0]);
/// assert!(ram.write(0xffff, &[1, 2]).is_err()); // past the end
/// # Ok::<(), crosvm_plugin::Error>(())
/// ```
///
/// Register it as guest memory with [`GuestRam::register`]:
///
/// ```no_run
/// # use crosvm_plugin::{Connection, GuestRam};
/// let conn = Connection::from_env()?; // needs a running vmm
/// let ram = GuestRam::new(0x10000)?;
/// let _slot = ram.register(&conn, 0)?; // guest-physical 0..0x10000
/// # Ok::<(), crosvm_plugin::Error>(())
/// ```
pub struct GuestRam {
    fd: OwnedFd,
    base: NonNull<u8>,
    size: usize,
}

// SAFETY: the mapping is owned by this value and only accessed through
// volatile copies, which are sound from any thread (the guest writes it
// concurrently anyway).
unsafe impl Send for GuestRam {}
// SAFETY: as above: no method hands out references into the mapping.
unsafe impl Sync for GuestRam {}

impl std::fmt::Debug for GuestRam {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestRam")
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

impl GuestRam {
    /// Creates `size` bytes (a non-zero multiple of [`PAGE_SIZE`]) of
    /// zeroed RAM.
    pub fn new(size: u64) -> Result<GuestRam> {
        if size == 0 || size & (PAGE_SIZE - 1) != 0 {
            return Err(Error::InvalidArgument(
                "guest RAM size must be a non-zero multiple of 4096",
            ));
        }
        let len = usize::try_from(size)
            .ok()
            .and_then(std::num::NonZeroUsize::new)
            .ok_or(Error::InvalidArgument("guest RAM size does not fit"))?;
        let fd = memfd_create(
            c"guest-ram",
            MFdFlags::MFD_ALLOW_SEALING | MFdFlags::MFD_CLOEXEC,
        )
        .map_err(sys("creating the guest RAM memfd"))?;
        let off = i64::try_from(size).map_err(|_| Error::InvalidArgument("guest RAM too large"))?;
        nix::unistd::ftruncate(&fd, off).map_err(sys("sizing the guest RAM memfd"))?;
        fcntl(
            &fd,
            FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW),
        )
        .map_err(sys("sealing the guest RAM memfd"))?;
        GuestRam::map_sealed(fd, len)
    }

    /// Maps `len` bytes of `fd`, a memfd sealed against shrinking (the
    /// callers check or set the seal), shared and writable.
    fn map_sealed(fd: OwnedFd, len: std::num::NonZeroUsize) -> Result<GuestRam> {
        // SAFETY: a fresh shared mapping of a memfd at an address the kernel
        // picks; it aliases no Rust object, and the memfd is sealed against
        // shrinking (both callers make sure), so the mapping never loses
        // its backing.
        let base = unsafe {
            mmap(
                None,
                len,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                &fd,
                0,
            )
        }
        .map_err(sys("mapping guest RAM"))?;
        Ok(GuestRam {
            fd,
            base: base.cast(),
            size: len.get(),
        })
    }

    /// Maps a guest memory memfd handed over by the host (hot restart,
    /// [`crate::Attached::take_memory`]): its whole size, shared.
    pub fn from_memfd(fd: OwnedFd) -> Result<GuestRam> {
        let st = nix::sys::stat::fstat(&fd).map_err(sys("sizing a guest RAM memfd"))?;
        let size = u64::try_from(st.st_size).unwrap_or(0);
        let len = usize::try_from(size)
            .ok()
            .and_then(std::num::NonZeroUsize::new)
            .ok_or(Error::InvalidArgument("guest RAM memfd is empty"))?;
        // The host sealed nothing for us: insist on the seal against
        // shrinking (the VMM refuses memory without it), so the mapping
        // keeps its backing.
        let seals = fcntl(&fd, FcntlArg::F_GET_SEALS).map_err(sys("reading guest RAM seals"))?;
        if seals & libc::F_SEAL_SHRINK == 0 {
            return Err(Error::InvalidArgument(
                "guest RAM memfd is not sealed against shrinking",
            ));
        }
        GuestRam::map_sealed(fd, len)
    }

    /// The memfd (to register it yourself with [`Connection::create_memory`]).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size as u64
    }

    /// Registers the whole RAM as guest memory at guest-physical `guest_addr`
    /// (page aligned). The returned [`Memory`] removes it when dropped.
    pub fn register(&self, conn: &Connection, guest_addr: u64) -> Result<Memory> {
        conn.create_memory(self.fd(), 0, self.size(), guest_addr, false, false)
    }

    fn range(&self, offset: u64, len: usize) -> Result<usize> {
        let start = usize::try_from(offset).map_err(|_| Error::InvalidArgument("offset"))?;
        match start.checked_add(len) {
            Some(end) if end <= self.size => Ok(start),
            _ => Err(Error::InvalidArgument(
                "range lies outside guest RAM (offset + length > size)",
            )),
        }
    }

    /// Copies `bytes` to RAM offset `offset` (the guest-physical address
    /// minus the registered base).
    pub fn write(&self, offset: u64, bytes: &[u8]) -> Result<()> {
        let start = self.range(offset, bytes.len())?;
        for (i, &b) in bytes.iter().enumerate() {
            // SAFETY: `start + i < size` (checked above), inside the live
            // mapping; a volatile byte store is sound while the guest
            // accesses the same memory.
            unsafe { self.base.as_ptr().add(start + i).write_volatile(b) };
        }
        Ok(())
    }

    /// Reads `len` bytes at RAM offset `offset`.
    pub fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        let start = self.range(offset, len)?;
        Ok((0..len)
            // SAFETY: in bounds as above; volatile because the guest may be
            // writing the same bytes.
            .map(|i| unsafe { self.base.as_ptr().add(start + i).read_volatile() })
            .collect())
    }

    /// Reads the little-endian `u32` at RAM offset `offset` (4-byte aligned)
    /// in one access, so a value the guest is updating is never torn
    /// (byte-wise [`Self::read`] may mix old and new bytes).
    pub fn read_u32(&self, offset: u64) -> Result<u32> {
        if offset & 3 != 0 {
            return Err(Error::InvalidArgument(
                "read_u32 needs a 4-byte aligned offset",
            ));
        }
        let start = self.range(offset, 4)?;
        // SAFETY: in bounds (checked above) of the live mapping, which is
        // page aligned, so `start` aligned to 4 makes the pointer aligned;
        // volatile because the guest may be writing the same word.
        let v = unsafe { self.base.as_ptr().add(start).cast::<u32>().read_volatile() };
        Ok(u32::from_le(v))
    }

    /// Writes a little-endian `u64` (page-table entries, descriptors).
    pub fn write_u64(&self, offset: u64, value: u64) -> Result<()> {
        self.write(offset, &value.to_le_bytes())
    }
}

impl Drop for GuestRam {
    fn drop(&mut self) {
        // SAFETY: `base`/`size` describe the mapping made in `new`, which
        // nothing references any more.
        let _ = unsafe { munmap(self.base.cast(), self.size) };
    }
}

/// Bytes of RAM the protected- and long-mode helpers use for their tables
/// at `tables` (GDT, then PML4, PDPT and one page directory).
pub const SYSTEM_TABLES_SIZE: u64 = 0x4000;

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Makes the vcpu runnable (application processors start out waiting for a
/// startup IPI).
fn make_runnable(v: &mut VcpuGuard<'_>) -> Result<()> {
    v.set_mp_state(&kvm_mp_state {
        mp_state: KVM_MP_STATE_RUNNABLE,
    })
}

fn set_entry(v: &mut VcpuGuard<'_>, entry: u64, stack: u64) -> Result<()> {
    let mut regs = v.get_regs()?;
    regs.rip = entry;
    regs.rsp = stack;
    regs.rflags = 2;
    v.set_regs(&regs);
    Ok(())
}

/// Puts a vcpu (stopped in `Init`) into 16-bit real mode at `0:ip` with the
/// stack at `0:sp` (every segment base 0), and makes it runnable.
///
/// ```no_run
/// # use crosvm_plugin::{machine, Connection, VcpuEvent};
/// # let conn = Connection::from_env()?;
/// let vcpu = conn.vcpu(0)?;
/// conn.start()?;
/// let mut v = vcpu.lock();
/// if let VcpuEvent::Init = v.wait()? {
///     machine::enter_real_mode(&mut v, 0x1000, 0x8000)?;
/// }
/// v.resume()?;
/// # Ok::<(), crosvm_plugin::Error>(())
/// ```
pub fn enter_real_mode(v: &mut VcpuGuard<'_>, ip: u16, sp: u16) -> Result<()> {
    make_runnable(v)?;
    let mut sregs = v.get_sregs()?;
    for seg in [
        &mut sregs.cs,
        &mut sregs.ds,
        &mut sregs.es,
        &mut sregs.ss,
        &mut sregs.fs,
        &mut sregs.gs,
    ] {
        seg.base = 0;
        seg.selector = 0;
    }
    v.set_sregs(&sregs);
    set_entry(v, ip.into(), sp.into())
}

/// A flat segment descriptor and its KVM form.
fn flat_segment(selector: u16, code: bool, long: bool) -> (u64, kvm_segment) {
    let type_: u8 = if code { 0xb } else { 0x3 }; // accessed; code: exec/read, data: read/write
    let db = u8::from(!long || !code);
    let l = u8::from(long && code);
    let seg = kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db,
        s: 1,
        l,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    // Descriptor: limit 0xfffff, base 0, access = P | S | type, flags = G | D/B | L.
    let access = 0x80 | 0x10 | u64::from(type_);
    let flags = 0x8 | (u64::from(db) << 2) | (u64::from(l) << 1);
    let desc = 0xffff | (access << 40) | (0xf << 48) | (flags << 52);
    (desc, seg)
}

/// Writes a GDT (null, code at selector 0x8, data at 0x10) at RAM offset
/// `tables`, loads it and the flat segments.
fn load_flat_segments(
    v: &mut VcpuGuard<'_>,
    ram: &GuestRam,
    ram_base: u64,
    tables: u64,
    long: bool,
) -> Result<kvm_bindings::kvm_sregs> {
    let (code_desc, code) = flat_segment(0x8, true, long);
    let (data_desc, data) = flat_segment(0x10, false, long);
    ram.write_u64(tables, 0)?;
    ram.write_u64(tables + 8, code_desc)?;
    ram.write_u64(tables + 16, data_desc)?;
    let mut sregs = v.get_sregs()?;
    sregs.gdt.base = ram_base + tables;
    sregs.gdt.limit = 3 * 8 - 1;
    sregs.cs = code;
    for seg in [
        &mut sregs.ds,
        &mut sregs.es,
        &mut sregs.ss,
        &mut sregs.fs,
        &mut sregs.gs,
    ] {
        *seg = data;
    }
    sregs.cr0 = CR0_PE | CR0_ET;
    Ok(sregs)
}

fn check_tables(ram: &GuestRam, tables: u64) -> Result<()> {
    let fits = tables
        .checked_add(SYSTEM_TABLES_SIZE)
        .is_some_and(|end| end <= ram.size());
    if tables & (PAGE_SIZE - 1) != 0 || !fits {
        return Err(Error::InvalidArgument(
            "system tables need SYSTEM_TABLES_SIZE page-aligned bytes inside guest RAM",
        ));
    }
    Ok(())
}

/// Puts a vcpu (stopped in `Init`) into 32-bit protected mode with flat
/// 4 GiB code (selector 0x8) and data (0x10) segments, paging off, at
/// `entry` with the stack at `stack`; makes it runnable. The GDT is written
/// at RAM offset `tables` ([`SYSTEM_TABLES_SIZE`] bytes, page aligned) of
/// `ram`, which is registered at guest-physical `ram_base`.
pub fn enter_protected_mode(
    v: &mut VcpuGuard<'_>,
    ram: &GuestRam,
    ram_base: u64,
    tables: u64,
    entry: u32,
    stack: u32,
) -> Result<()> {
    check_tables(ram, tables)?;
    make_runnable(v)?;
    let sregs = load_flat_segments(v, ram, ram_base, tables, false)?;
    v.set_sregs(&sregs);
    set_entry(v, entry.into(), stack.into())
}

/// Puts a vcpu (stopped in `Init`) into 64-bit long mode at `entry` with the
/// stack at `stack`, and makes it runnable. Writes at RAM offset `tables`
/// ([`SYSTEM_TABLES_SIZE`] bytes, page aligned) a GDT (64-bit code at 0x8,
/// data at 0x10) and page tables identity-mapping the first 1 GiB of
/// guest-physical space with 2 MiB pages (read/write, supervisor).
pub fn enter_long_mode(
    v: &mut VcpuGuard<'_>,
    ram: &GuestRam,
    ram_base: u64,
    tables: u64,
    entry: u64,
    stack: u64,
) -> Result<()> {
    check_tables(ram, tables)?;
    let pml4 = tables + 0x1000;
    let pdpt = tables + 0x2000;
    let pd = tables + 0x3000;
    const PRESENT_RW: u64 = 0x3;
    const PAGE_2M: u64 = 0x80;
    ram.write_u64(pml4, (ram_base + pdpt) | PRESENT_RW)?;
    ram.write_u64(pdpt, (ram_base + pd) | PRESENT_RW)?;
    for i in 0..512u64 {
        ram.write_u64(pd + 8 * i, (i << 21) | PRESENT_RW | PAGE_2M)?;
    }
    make_runnable(v)?;
    let mut sregs = load_flat_segments(v, ram, ram_base, tables, true)?;
    sregs.cr3 = ram_base + pml4;
    sregs.cr4 |= CR4_PAE;
    sregs.cr0 |= CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
    v.set_sregs(&sregs);
    set_entry(v, entry, stack)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_match_the_usual_flat_values() {
        // The values every OS tutorial uses: 0x00cf9b000000ffff (32-bit
        // code), 0x00cf93000000ffff (data), 0x00af9b000000ffff (64-bit code).
        assert_eq!(flat_segment(8, true, false).0, 0x00cf_9b00_0000_ffff);
        assert_eq!(flat_segment(16, false, false).0, 0x00cf_9300_0000_ffff);
        assert_eq!(flat_segment(8, true, true).0, 0x00af_9b00_0000_ffff);
    }

    #[test]
    fn guest_ram_is_sealed_and_bounded() {
        let ram = GuestRam::new(2 * PAGE_SIZE).unwrap();
        let seals = fcntl(ram.fd(), FcntlArg::F_GET_SEALS).unwrap();
        let want = (SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW).bits();
        assert_eq!(seals & want, want);
        ram.write_u64(8, 0x1122_3344_5566_7788).unwrap();
        assert_eq!(ram.read(8, 2).unwrap(), [0x88, 0x77]);
        assert!(ram.read(2 * PAGE_SIZE, 1).is_err());
        assert_eq!(ram.read_u32(8).unwrap(), 0x5566_7788);
        assert!(ram.read_u32(9).is_err());
        assert!(ram.read_u32(2 * PAGE_SIZE - 2).is_err());
        assert!(ram.write(u64::MAX, &[1]).is_err());
        assert!(GuestRam::new(100).is_err());
    }
}

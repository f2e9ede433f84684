//! Typed arguments and results of SDK calls, and their wire conversions.

use std::net::Ipv4Addr;
use std::os::fd::OwnedFd;

use kvm_bindings::kvm_cpuid_entry2;
#[cfg(test)]
use kvm_bindings::KVM_CPUID_FLAG_SIGNIFCANT_INDEX;
use plugin_proto::main_request::set_call_hint::RegHint;
use plugin_proto::main_request::set_irq_routing::{route, Route};
use plugin_proto::protobuf::EnumOrUnknown;
use plugin_proto::{cpuid, CpuidEntry};

use crate::error::{Error, Result};

/// Maximum number of register-match details in one call hint.
pub const MAX_HINT_DETAIL_COUNT: usize = 32;

/// One guest write to a coalesced range (see
/// [`Connection::reserve_coalesced_range`](crate::Connection::reserve_coalesced_range)),
/// as [`VcpuEvent::CoalescedWrites`](crate::VcpuEvent::CoalescedWrites)
/// delivers it. The layout is `struct crosvm_coalesced_write` of
/// `crosvm_ext.h`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CoalescedWrite {
    /// Port number or guest-physical address.
    pub address: u64,
    /// The raw address space (0 = ioport, 1 = mmio).
    pub space: u32,
    /// Bytes written, 1 to 8: the first `len` bytes of `data`.
    pub len: u32,
    pub data: [u8; 8],
}

impl CoalescedWrite {
    /// The address space of the write.
    pub fn space(&self) -> AddressSpace {
        if self.space == 0 {
            AddressSpace::IoPort
        } else {
            AddressSpace::Mmio
        }
    }

    /// The written bytes.
    pub fn data(&self) -> &[u8] {
        &self.data[..(self.len as usize).min(8)]
    }

    /// The written value, little-endian, zero-extended.
    pub fn value(&self) -> u64 {
        u64::from_le_bytes(self.data) & (u64::MAX >> (64 - 8 * (self.len as usize).clamp(1, 8)))
    }

    /// Decodes one 24-byte wire record (docs/protocol-extensions.md §4.3);
    /// `None` for a length outside 1..=8 or a space flag other than 0/1.
    pub(crate) fn from_record(r: &[u8; 24]) -> Option<CoalescedWrite> {
        let word = |i: usize| u32::from_le_bytes([r[i], r[i + 1], r[i + 2], r[i + 3]]);
        let mut address = [0u8; 8];
        address.copy_from_slice(&r[..8]);
        let len = word(8);
        let is_port = word(12);
        if !(1..=8).contains(&len) || is_port > 1 {
            return None;
        }
        let mut data = [0u8; 8];
        data.copy_from_slice(&r[16..]);
        Some(CoalescedWrite {
            address: u64::from_le_bytes(address),
            space: if is_port == 1 { 0 } else { 1 },
            len,
            data,
        })
    }
}

/// The two address spaces a guest access can target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AddressSpace {
    /// x86 port I/O (addresses are port numbers).
    IoPort,
    /// Guest-physical memory space.
    Mmio,
}

impl AddressSpace {
    /// Converts the C / wire numbering (0 = ioport, 1 = mmio).
    pub fn from_raw(value: u32) -> Result<AddressSpace> {
        match value {
            0 => Ok(AddressSpace::IoPort),
            1 => Ok(AddressSpace::Mmio),
            _ => Err(Error::InvalidArgument("address space must be 0 or 1")),
        }
    }

    /// The C / wire number of this space.
    pub fn to_raw(self) -> u32 {
        match self {
            AddressSpace::IoPort => 0,
            AddressSpace::Mmio => 1,
        }
    }

    pub(crate) fn to_proto(self) -> EnumOrUnknown<plugin_proto::AddressSpace> {
        EnumOrUnknown::new(match self {
            AddressSpace::IoPort => plugin_proto::AddressSpace::IOPORT,
            AddressSpace::Mmio => plugin_proto::AddressSpace::MMIO,
        })
    }
}

/// Which guest writes signal an [`IoEvent`](crate::IoEvent).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Datamatch {
    /// Any write of any width.
    Any,
    /// One-byte writes of this value.
    U8(u8),
    /// Two-byte writes of this value.
    U16(u16),
    /// Four-byte writes of this value.
    U32(u32),
    /// Eight-byte writes of this value.
    U64(u64),
}

impl Datamatch {
    /// Builds a datamatch from an access width (0, 1, 2, 4 or 8; 0 = any)
    /// and a value whose low `length` bytes are used.
    pub fn from_raw(length: u32, value: u64) -> Result<Datamatch> {
        // Truncation to the access width is the point of these casts.
        #[allow(clippy::cast_possible_truncation)]
        match length {
            0 => Ok(Datamatch::Any),
            1 => Ok(Datamatch::U8(value as u8)),
            2 => Ok(Datamatch::U16(value as u16)),
            4 => Ok(Datamatch::U32(value as u32)),
            8 => Ok(Datamatch::U64(value)),
            _ => Err(Error::InvalidArgument(
                "io event length must be 0, 1, 2, 4 or 8",
            )),
        }
    }

    /// `(length, datamatch)` as sent on the wire.
    pub fn to_raw(self) -> (u32, u64) {
        match self {
            Datamatch::Any => (0, 0),
            Datamatch::U8(v) => (1, v.into()),
            Datamatch::U16(v) => (2, v.into()),
            Datamatch::U32(v) => (4, v.into()),
            Datamatch::U64(v) => (8, v),
        }
    }
}

/// One register-match entry of a [`CallHint`]. Each `match_X` that is true
/// requires register X to equal `X`; on a match the VMM also sends the
/// requested extra state with the io event.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HintDetail {
    pub match_rax: bool,
    pub match_rbx: bool,
    pub match_rcx: bool,
    pub match_rdx: bool,
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub send_sregs: bool,
    pub send_debugregs: bool,
}

impl HintDetail {
    pub(crate) fn to_proto(self) -> RegHint {
        RegHint {
            match_rax: self.match_rax,
            match_rbx: self.match_rbx,
            match_rcx: self.match_rcx,
            match_rdx: self.match_rdx,
            rax: self.rax,
            rbx: self.rbx,
            rcx: self.rcx,
            rdx: self.rdx,
            send_sregs: self.send_sregs,
            send_debugregs: self.send_debugregs,
            ..Default::default()
        }
    }
}

/// The "hypercall hint": io events at exactly this address and direction
/// carry the vcpu's registers (and, per the first matching detail, sregs
/// and debugregs), so the matching getters need no round trip.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallHint {
    pub space: AddressSpace,
    /// Must be non-zero.
    pub address: u64,
    /// True for writes / OUT, false for reads / IN.
    pub on_write: bool,
    /// At most [`MAX_HINT_DETAIL_COUNT`] entries, consulted in order.
    pub details: Vec<HintDetail>,
}

/// Target of one GSI route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IrqRouteKind {
    /// A pin of an in-kernel irqchip (`KVM_IRQCHIP_*`).
    Irqchip { irqchip: u32, pin: u32 },
    /// An MSI message.
    Msi { address: u64, data: u32 },
}

/// One entry of the GSI routing table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IrqRoute {
    pub irq_id: u32,
    pub kind: IrqRouteKind,
}

impl IrqRoute {
    pub(crate) fn to_proto(self) -> Route {
        let mut r = Route {
            irq_id: self.irq_id,
            ..Default::default()
        };
        r.route = Some(match self.kind {
            IrqRouteKind::Irqchip { irqchip, pin } => route::Route::Irqchip(route::Irqchip {
                irqchip,
                pin,
                ..Default::default()
            }),
            IrqRouteKind::Msi { address, data } => route::Route::Msi(route::Msi {
                address,
                data,
                ..Default::default()
            }),
        });
        r
    }
}

/// Configuration of the VMM's first tap device.
#[derive(Debug)]
pub struct NetConfig {
    /// The tap device; owned by the caller.
    pub tap: OwnedFd,
    /// Host-side IPv4 address.
    pub host_ip: Ipv4Addr,
    /// Subnet mask.
    pub netmask: Ipv4Addr,
    /// Host-side MAC address.
    pub host_mac: [u8; 6],
}

/// Converts a wire `fixed32` IPv4 value (its little-endian bytes are the
/// octets in network order) to an address.
pub(crate) fn ipv4_from_wire(value: u32) -> Ipv4Addr {
    Ipv4Addr::from(value.to_le_bytes())
}

/// Inverse of [`ipv4_from_wire`]: the `u32` whose memory bytes on x86-64 are
/// the octets in network order (what the C struct holds).
pub fn ipv4_to_wire(addr: Ipv4Addr) -> u32 {
    u32::from_le_bytes(addr.octets())
}

/// Wire entry → `kvm_cpuid_entry2` (client rule: index always copied).
pub(crate) fn cpuid_from_proto(e: &CpuidEntry) -> kvm_cpuid_entry2 {
    cpuid::from_wire(e, cpuid::Side::Plugin)
}

/// `kvm_cpuid_entry2` → wire entry (other flag bits are dropped).
pub(crate) fn cpuid_to_proto(e: &kvm_cpuid_entry2) -> CpuidEntry {
    cpuid::to_wire(e, cpuid::Side::Plugin)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datamatch_raw() {
        assert_eq!(Datamatch::from_raw(0, 7).unwrap(), Datamatch::Any);
        assert_eq!(
            Datamatch::from_raw(2, 0x1_2345).unwrap(),
            Datamatch::U16(0x2345)
        );
        assert_eq!(Datamatch::U32(9).to_raw(), (4, 9));
        assert_eq!(Datamatch::from_raw(3, 0).unwrap_err().errno(), libc::EINVAL);
    }

    #[test]
    fn ipv4_wire_encoding() {
        let ip = Ipv4Addr::new(100, 115, 92, 5);
        assert_eq!(ipv4_to_wire(ip), 0x055C_7364);
        assert_eq!(ipv4_from_wire(0x055C_7364), ip);
        assert_eq!(
            ipv4_from_wire(0xFCFF_FFFF),
            Ipv4Addr::new(255, 255, 255, 252)
        );
    }

    #[test]
    fn cpuid_conversion() {
        let k = kvm_cpuid_entry2 {
            function: 7,
            index: 1,
            flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX | 4,
            eax: 1,
            ebx: 2,
            ecx: 3,
            edx: 4,
            padding: [9; 3],
        };
        let p = cpuid_to_proto(&k);
        assert!(p.has_index);
        let back = cpuid_from_proto(&p);
        assert_eq!(back.flags, KVM_CPUID_FLAG_SIGNIFCANT_INDEX);
        assert_eq!(back.padding, [0; 3]);
        assert_eq!((back.function, back.index, back.edx), (7, 1, 4));
        let p2 = CpuidEntry {
            function: 1,
            index: 5,
            ..Default::default()
        };
        let k2 = cpuid_from_proto(&p2);
        assert_eq!((k2.index, k2.flags), (5, 0));
    }
}

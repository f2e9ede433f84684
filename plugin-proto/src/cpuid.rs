//! The one conversion between the wire's `CpuidEntry` and KVM's
//! `kvm_cpuid_entry2`, used by the host and the SDK.
//!
//! The two sides treat the index of an entry whose index is not significant
//! differently (docs/wire-protocol.md §4.2): the host sends and installs it as 0,
//! the client library copies it as it is. The significant-index flag is the
//! only flag that crosses the wire; padding is zeroed.

use kvm_bindings::{kvm_cpuid_entry2, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

use crate::CpuidEntry;

/// Which side converts (the index rule differs, see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The host: the index only when it is significant.
    Host,
    /// The client library: the index always.
    Plugin,
}

impl Side {
    fn index(self, significant: bool, index: u32) -> u32 {
        match self {
            Side::Host if !significant => 0,
            _ => index,
        }
    }
}

/// `kvm_cpuid_entry2` → wire entry.
pub fn to_wire(e: &kvm_cpuid_entry2, side: Side) -> CpuidEntry {
    let significant = e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX != 0;
    CpuidEntry {
        function: e.function,
        has_index: significant,
        index: side.index(significant, e.index),
        eax: e.eax,
        ebx: e.ebx,
        ecx: e.ecx,
        edx: e.edx,
        ..Default::default()
    }
}

/// Wire entry → `kvm_cpuid_entry2`.
pub fn from_wire(e: &CpuidEntry, side: Side) -> kvm_cpuid_entry2 {
    kvm_cpuid_entry2 {
        function: e.function,
        index: side.index(e.has_index, e.index),
        flags: if e.has_index {
            KVM_CPUID_FLAG_SIGNIFCANT_INDEX
        } else {
            0
        },
        eax: e.eax,
        ebx: e.ebx,
        ecx: e.ecx,
        edx: e.edx,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kvm(index: u32, flags: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function: 7,
            index,
            flags,
            eax: 1,
            ebx: 2,
            ecx: 3,
            edx: 4,
            padding: [9; 3],
        }
    }

    #[test]
    fn significant_index_crosses_both_ways_on_both_sides() {
        for side in [Side::Host, Side::Plugin] {
            // Other flag bits (here STATEFUL_FUNC) stay behind.
            let p = to_wire(&kvm(1, KVM_CPUID_FLAG_SIGNIFCANT_INDEX | 2), side);
            assert!(p.has_index);
            assert_eq!((p.function, p.index, p.eax, p.edx), (7, 1, 1, 4));
            let back = from_wire(&p, side);
            assert_eq!(back.flags, KVM_CPUID_FLAG_SIGNIFCANT_INDEX);
            assert_eq!(back.padding, [0; 3]);
            assert_eq!(
                (back.function, back.index, back.ebx, back.ecx),
                (7, 1, 2, 3)
            );
        }
    }

    #[test]
    fn insignificant_index_is_zero_on_the_host_and_kept_by_the_plugin() {
        let k = kvm(5, 0);
        assert_eq!(to_wire(&k, Side::Host).index, 0);
        assert_eq!(to_wire(&k, Side::Plugin).index, 5);
        let p = CpuidEntry {
            function: 1,
            index: 5,
            ..Default::default()
        };
        assert_eq!(
            (
                from_wire(&p, Side::Host).index,
                from_wire(&p, Side::Host).flags
            ),
            (0, 0)
        );
        assert_eq!(
            (
                from_wire(&p, Side::Plugin).index,
                from_wire(&p, Side::Plugin).flags
            ),
            (5, 0)
        );
    }
}

//! Dropping capabilities: every set (effective, permitted, inheritable,
//! ambient, bounding), for the jail and for the host once the jail is built.
//! Neither nix nor libc wraps capget/capset, so the two structs the kernel
//! takes are declared here.

use nix::errno::Errno;

/// Errors dropping capabilities.
#[derive(Debug, thiserror::Error)]
pub enum CapsError {
    #[error("cannot read the capability sets")]
    Get(#[source] Errno),
    #[error("cannot drop capability {cap} from the bounding set")]
    Bounding {
        cap: u32,
        #[source]
        source: Errno,
    },
    #[error("cannot clear the ambient capabilities")]
    Ambient(#[source] Errno),
    #[error("cannot clear the capability sets")]
    Set(#[source] Errno),
    #[error("cannot set the secure bits")]
    SecureBits(#[source] Errno),
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
const CAP_SETPCAP: u32 = 8;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

fn capget() -> Result<[CapData; 2], CapsError> {
    let mut header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: capget reads the header and writes two CapData (version 3) into
    // the valid, exclusively borrowed array.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_capget,
            &mut header as *mut CapHeader,
            data.as_mut_ptr(),
        )
    };
    if rc != 0 {
        return Err(CapsError::Get(Errno::last()));
    }
    Ok(data)
}

/// Drops every capability of the calling thread (new threads and exec'd
/// programs inherit the empty sets). Makes no allocation, so the jail's
/// processes can call it.
pub fn drop_all() -> Result<(), CapsError> {
    let data = capget()?;
    if data[0].effective & (1 << CAP_SETPCAP) != 0 {
        // The bounding set: up to the last capability the kernel knows
        // (PR_CAPBSET_DROP fails with EINVAL past it).
        for cap in 0..64u32 {
            // SAFETY: prctl with integer arguments only.
            let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
            if rc != 0 {
                match Errno::last() {
                    Errno::EINVAL => break,
                    e => return Err(CapsError::Bounding { cap, source: e }),
                }
            }
        }
    }
    // SAFETY: prctl with integer arguments only.
    let rc = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        )
    };
    // EINVAL: a kernel without ambient capabilities.
    if rc != 0 && Errno::last() != Errno::EINVAL {
        return Err(CapsError::Ambient(Errno::last()));
    }
    let mut header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [CapData::default(); 2];
    // SAFETY: capset reads the header and two CapData from valid memory.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_capset,
            &mut header as *mut CapHeader,
            data.as_ptr(),
        )
    };
    if rc != 0 {
        return Err(CapsError::Set(Errno::last()));
    }
    Ok(())
}

/// In the jail, before dropping: uid 0 never regains capabilities, not even
/// through exec or setuid, and the bits cannot be changed back.
pub fn lock_secure_bits() -> Result<(), CapsError> {
    let bits = libc::SECBIT_NOROOT
        | libc::SECBIT_NOROOT_LOCKED
        | libc::SECBIT_NO_SETUID_FIXUP
        | libc::SECBIT_NO_SETUID_FIXUP_LOCKED
        | libc::SECBIT_KEEP_CAPS_LOCKED
        | libc::SECBIT_NO_CAP_AMBIENT_RAISE
        | libc::SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED;
    // SAFETY: prctl with integer arguments only.
    let rc = unsafe { libc::prctl(libc::PR_SET_SECUREBITS, bits as libc::c_ulong, 0, 0, 0) };
    if rc != 0 {
        return Err(CapsError::SecureBits(Errno::last()));
    }
    Ok(())
}

/// The host's step 7: no capabilities from now on. What the host still
/// needs works without them: its KVM descriptors are open, the plugin runs
/// under the host's own uid (so it can be signalled and reaped), and the
/// seccomp listener needs none. Capabilities belong to threads: call this
/// before creating any (vcpu threads inherit the empty sets).
pub fn drop_host_capabilities() -> Result<(), CapsError> {
    drop_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capget_works() {
        capget().unwrap();
    }
}

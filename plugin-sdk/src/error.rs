//! The single error type of the SDK and its mapping to C errno values.

use nix::errno::Errno;
use plugin_proto::framing::FramingError;

/// Everything that can go wrong when talking to the VMM.
///
/// [`Error::errno`] gives the positive errno value the C API negates.
///
/// ```
/// use crosvm_plugin::Error;
///
/// let e = Error::Host { op: "reserve_range(IoPort, 0x3f8, 8)".into(), errno: libc::EPERM };
/// assert_eq!(e.to_string(), "reserve_range(IoPort, 0x3f8, 8): EPERM: Operation not permitted");
/// assert_eq!(e.errno(), libc::EPERM);
/// assert!(e.is_host_errno(libc::EPERM));
/// ```
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `CROSVM_SOCKET` is not set in the environment.
    #[error("the CROSVM_SOCKET environment variable is not set")]
    NoSocketEnv,
    /// `CROSVM_SOCKET` is set but is not a non-negative decimal number.
    #[error("CROSVM_SOCKET does not hold a descriptor number: {0:?}")]
    BadSocketEnv(String),
    /// The descriptor named by `CROSVM_SOCKET` was already adopted by this
    /// process (only one connection may own it).
    #[error("the CROSVM_SOCKET descriptor was already adopted by this process")]
    AlreadyAdopted,
    /// The VMM answered with a non-zero errno (positive value as sent).
    /// `op` names the request and its key arguments, e.g.
    /// `reserve_range(IoPort, 0x3f8, 8)`.
    #[error("{op}: {}", errno_text(*.errno))]
    Host { op: String, errno: i32 },
    /// The host is stopping the VM (its shutdown eventfd is signalled) and
    /// the vcpu channel has nothing more to deliver. [`crate::VcpuGuard::wait`]
    /// reports it as [`crate::VcpuEvent::Shutdown`]; other vcpu calls fail
    /// with this error (`ESHUTDOWN` in the C API).
    #[error("{op}: the VMM is shutting the VM down")]
    Shutdown { op: &'static str },
    /// `wait()` was called while the previous event still needs a resume:
    /// the vcpu is stopped and would never report another event.
    #[error(
        "wait() on vcpu {vcpu} while a resume is still owed for its {pending} event: \
         call resume() (or resume_io_read / resume_hypercall) first"
    )]
    ResumeOwed { vcpu: u32, pending: String },
    /// Sending or receiving on a main connection or vcpu channel failed.
    #[error("transport failure during {op}")]
    Transport {
        op: &'static str,
        #[source]
        source: FramingError,
    },
    /// A reply could not be decoded as a protobuf message.
    #[error("the VMM's reply to {op} does not decode")]
    Decode {
        op: &'static str,
        #[source]
        source: plugin_proto::protobuf::Error,
    },
    /// A request could not be encoded (should never happen).
    #[error("encoding the {op} request failed")]
    Encode {
        op: &'static str,
        #[source]
        source: plugin_proto::protobuf::Error,
    },
    /// The reply was well formed but not what the protocol prescribes
    /// (missing oneof member, missing descriptors, ...).
    #[error("the fast vcpu channel failed while {0}")]
    FastChannel(&'static str, #[source] plugin_proto::shm::ShmError),
    #[error("protocol violation by the VMM: {0}")]
    Protocol(&'static str),
    /// A state image or bitmap had the wrong size.
    #[error("{what} has {got} bytes, expected {expected}")]
    BadLength {
        what: &'static str,
        expected: usize,
        got: usize,
    },
    /// A device-state blob (from a snapshot) that
    /// [`crate::DeviceState::restore`] cannot use, and why.
    #[error("the saved device state cannot be restored: {0}")]
    BadDeviceState(String),
    /// The checkpoint a crashed plugin left cannot be used, and why (hot
    /// restart, docs/protocol-extensions.md §9).
    #[error("the checkpoint is corrupted: {0}")]
    BadCheckpoint(String),
    /// An argument was rejected before anything was sent.
    #[error("invalid argument: {0}")]
    InvalidArgument(&'static str),
    /// No vcpu with this index exists.
    #[error("there is no vcpu {0}")]
    NoSuchVcpu(u32),
    /// The object-id space is exhausted.
    #[error("no object id is left")]
    IdsExhausted,
    /// More entries were returned than the caller has room for.
    #[error("the VMM returned {count} entries, room for {capacity}")]
    TooMany { count: usize, capacity: usize },
    /// A system call made by the library itself failed.
    #[error("{op} failed")]
    Sys {
        op: &'static str,
        #[source]
        source: Errno,
    },
}

impl Error {
    /// The positive errno value corresponding to this error.
    pub fn errno(&self) -> i32 {
        match self {
            Error::NoSocketEnv => libc::ENOTCONN,
            Error::BadSocketEnv(_) => libc::EINVAL,
            Error::AlreadyAdopted => libc::EBUSY,
            // A host sending a non-positive errno still must yield an error.
            Error::Host { errno, .. } if *errno > 0 => *errno,
            Error::Host { .. } => libc::EPROTO,
            Error::Shutdown { .. } => libc::ESHUTDOWN,
            Error::ResumeOwed { .. } => libc::EBUSY,
            Error::Transport { source, .. } => source.errno() as i32,
            Error::Decode { .. } | Error::Encode { .. } => libc::EINVAL,
            Error::Protocol(_) | Error::BadLength { .. } => libc::EPROTO,
            Error::InvalidArgument(_) | Error::BadDeviceState(_) => libc::EINVAL,
            Error::BadCheckpoint(_) => libc::EBADMSG,
            Error::NoSuchVcpu(_) => libc::ENOENT,
            Error::IdsExhausted => libc::ENOSPC,
            Error::TooMany { .. } => libc::E2BIG,
            Error::Sys { source, .. } => *source as i32,
            Error::FastChannel(_, e) => match e {
                plugin_proto::shm::ShmError::Create(e) | plugin_proto::shm::ShmError::Map(e) => {
                    *e as i32
                }
                plugin_proto::shm::ShmError::TooLarge(_) => libc::EMSGSIZE,
                plugin_proto::shm::ShmError::Aborted => libc::EINVAL,
                _ => libc::EPROTO,
            },
        }
    }

    /// True when the VMM refused the request with `errno`.
    pub fn is_host_errno(&self, errno: i32) -> bool {
        matches!(self, Error::Host { errno: e, .. } if *e == errno)
    }

    /// The errno the VMM answered with, if this is a refusal by the VMM.
    pub fn host_errno(&self) -> Option<i32> {
        match self {
            Error::Host { errno, .. } => Some(*errno),
            _ => None,
        }
    }

    /// A refusal by the VMM of the request `op` (the request name).
    pub(crate) fn host(op: &str, errno: i32) -> Error {
        Error::Host {
            op: op.to_owned(),
            errno,
        }
    }

    pub(crate) fn transport(op: &'static str) -> impl FnOnce(FramingError) -> Error {
        move |source| Error::Transport { op, source }
    }

    pub(crate) fn decode(op: &'static str) -> impl FnOnce(plugin_proto::protobuf::Error) -> Error {
        move |source| Error::Decode { op, source }
    }
}

/// `EPERM: Operation not permitted` for a positive errno, else the number.
fn errno_text(errno: i32) -> String {
    let e = Errno::from_raw(errno);
    if errno > 0 && e != Errno::UnknownErrno {
        format!("{e:?}: {}", e.desc())
    } else {
        format!("the VMM answered with errno {errno}")
    }
}

/// Result alias of the SDK.
pub type Result<T> = std::result::Result<T, Error>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_mapping() {
        assert_eq!(Error::NoSocketEnv.errno(), libc::ENOTCONN);
        assert_eq!(Error::BadSocketEnv("x".into()).errno(), libc::EINVAL);
        assert_eq!(Error::host("x", libc::EEXIST).errno(), libc::EEXIST);
        assert_eq!(Error::host("x", -3).errno(), libc::EPROTO);
        let e = Error::host("reserve_range(IoPort, 0x3f8, 8)", libc::EPERM);
        assert_eq!(
            e.to_string(),
            "reserve_range(IoPort, 0x3f8, 8): EPERM: Operation not permitted"
        );
        assert_eq!(e.host_errno(), Some(libc::EPERM));
        assert_eq!(Error::Shutdown { op: "wait" }.errno(), libc::ESHUTDOWN);
        assert_eq!(Error::Protocol("x").errno(), libc::EPROTO);
        assert_eq!(
            Error::Transport {
                op: "x",
                source: FramingError::Closed
            }
            .errno(),
            libc::EINVAL
        );
        assert_eq!(
            Error::Sys {
                op: "x",
                source: Errno::EBADF
            }
            .errno(),
            libc::EBADF
        );
        assert_eq!(
            Error::TooMany {
                count: 2,
                capacity: 1
            }
            .errno(),
            libc::E2BIG
        );
    }
}

//! The single error type of the SDK and its mapping to C errno values.

use nix::errno::Errno;
use plugin_proto::framing::FramingError;

/// Everything that can go wrong when talking to the VMM.
///
/// [`Error::errno`] gives the positive errno value the C API negates.
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
    #[error("the VMM refused the request: {}", std::io::Error::from_raw_os_error(*.0))]
    Host(i32),
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
            Error::Host(e) if *e > 0 => *e,
            Error::Host(_) => libc::EPROTO,
            Error::Transport { source, .. } => source.errno() as i32,
            Error::Decode { .. } | Error::Encode { .. } => libc::EINVAL,
            Error::Protocol(_) | Error::BadLength { .. } => libc::EPROTO,
            Error::InvalidArgument(_) => libc::EINVAL,
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
        matches!(self, Error::Host(e) if *e == errno)
    }

    pub(crate) fn transport(op: &'static str) -> impl FnOnce(FramingError) -> Error {
        move |source| Error::Transport { op, source }
    }

    pub(crate) fn decode(op: &'static str) -> impl FnOnce(plugin_proto::protobuf::Error) -> Error {
        move |source| Error::Decode { op, source }
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
        assert_eq!(Error::Host(libc::EEXIST).errno(), libc::EEXIST);
        assert_eq!(Error::Host(-3).errno(), libc::EPROTO);
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

//! The plugin protocol: generated protobuf messages plus the framing used on
//! main connections (seqpacket + `SCM_RIGHTS`) and vcpu channels (bare
//! requests, varint-delimited responses).

mod generated {
    include!(concat!(env!("OUT_DIR"), "/generated/mod.rs"));
}

pub mod cpuid;
pub mod describe;
pub mod framing;
pub mod image;
pub mod shm;

pub use generated::plugin::*;
pub use protobuf;

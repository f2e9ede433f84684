//! `vmm`: a plugin-hosted virtual machine monitor for Linux/KVM on x86-64,
//! wire-compatible with crosvm's plugin mode (plugin API 0.22).
//!
//! The host owns `/dev/kvm`, creates the VM (in-kernel irqchip and PIT, no
//! memory of its own) and runs the plugin, which is the machine: it maps guest
//! memory, reserves IO ranges, and drives every vcpu over the protocol of
//! `plugin_proto`.

pub mod cli;
pub mod config;
pub mod control;
pub mod ctl;
pub mod decode;
pub mod exit_codec;
pub mod jail;
pub mod launch;
pub mod limits;
pub mod migrate;
pub mod net;
pub mod record;
pub mod replay;
pub mod runtime;
pub mod snapshot;
pub mod stats;
pub mod trace;
pub mod vm;

/// Formats an error with its whole `source()` chain: `a: b: c` (one
/// definition, shared with the control client).
pub use vmm_client::error_chain;

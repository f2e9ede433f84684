//! Client side of the plugin protocol: a safe Rust SDK for writing VMM
//! plugins, plus the crosvm-compatible C API (`crosvm.h`, API 0.22) built on
//! top of it as `libcrosvm_plugin`.
//!
//! # Overview
//!
//! ```no_run
//! use std::os::fd::AsFd;
//! use crosvm_plugin::{AddressSpace, Connection, VcpuEvent};
//!
//! # fn main() -> crosvm_plugin::Result<()> {
//! let conn = Connection::from_env()?;
//! let shutdown = conn.get_shutdown_eventfd()?;
//! # let memfd: std::os::fd::OwnedFd = unimplemented!();
//! // Guest RAM comes from a sealed memfd owned by the plugin.
//! let _ram = conn.create_memory(memfd.as_fd(), 0, 0x10000, 0, false, false)?;
//! conn.reserve_range(AddressSpace::IoPort, 0x3f8, 1)?;
//!
//! let vcpu = conn.vcpu(0)?;
//! let worker = std::thread::spawn(move || -> crosvm_plugin::Result<()> {
//!     let mut v = vcpu.lock();
//!     loop {
//!         match v.wait()? {
//!             VcpuEvent::Init => {
//!                 let mut regs = v.get_regs()?;
//!                 regs.rip = 0x1000;
//!                 v.set_regs(&regs); // sent with the resume below
//!             }
//!             VcpuEvent::Io { is_write: false, .. } => {
//!                 v.resume_io_read(&[0x42])?;
//!                 continue;
//!             }
//!             VcpuEvent::Io { no_resume: true, .. } => continue,
//!             _ => {}
//!         }
//!         v.resume()?;
//!     }
//! });
//! conn.start()?;
//! # let _ = (shutdown, worker);
//! # Ok(())
//! # }
//! ```
//!
//! Errors are [`Error`] values; [`Error::errno`] gives the errno the C API
//! reports (negated).

mod connection;
mod decode;
mod describe;
mod error;
mod image;
pub mod machine;
mod objects;
mod transport;
mod types;
mod vcpu;

pub mod c_api;

pub use connection::{Connection, SOCKET_ENV};
pub use error::{Error, Result};
pub use image::StateImage;
pub use machine::GuestRam;
pub use objects::{IoEvent, IrqEvent, Memory, PAGE_SIZE};
pub use types::{
    ipv4_to_wire, AddressSpace, CallHint, Datamatch, HintDetail, IrqRoute, IrqRouteKind, NetConfig,
    MAX_HINT_DETAIL_COUNT,
};
pub use vcpu::{Vcpu, VcpuEvent, VcpuGuard};

/// Re-export of the KVM uapi structs used in the API.
pub use kvm_bindings;

// Handles are meant to be shared with and moved to other threads.
const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    send_sync::<Connection>();
    send_sync::<Vcpu>();
    send_sync::<IoEvent>();
    send_sync::<Memory>();
    send_sync::<IrqEvent>();
    send_sync::<Error>();
};

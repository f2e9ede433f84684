//! Client side of the plugin protocol: a safe Rust SDK for writing VMM
//! plugins, plus the crosvm-compatible C API (`crosvm.h`, API 0.22) built on
//! top of it as `libcrosvm_plugin`.
//!
//! # Overview
//!
//! A plugin connects, gives the VM its RAM, reserves the addresses its
//! devices serve, starts the VM and then drives every vcpu: [`VcpuGuard::wait`]
//! for the next event, handle it, [`VcpuGuard::resume`]. `docs/tutorial.md`
//! walks through a complete machine.
//!
//! ```no_run
//! use crosvm_plugin::{machine, AddressSpace, Connection, GuestRam, VcpuEvent};
//!
//! # fn main() -> crosvm_plugin::Result<()> {
//! let conn = Connection::from_env()?; // the socket vmm passed in CROSVM_SOCKET
//! // Guest RAM: a sealed memfd the plugin maps too, at guest address 0.
//! let ram = GuestRam::new(0x10000)?;
//! ram.write(0x1000, &[0xe4, 0x80, 0xf4])?; // in al, 0x80; hlt
//! let _slot = ram.register(&conn, 0)?;
//! conn.reserve_range(AddressSpace::IoPort, 0x80, 1)?;
//!
//! let vcpu = conn.vcpu(0)?;
//! conn.start()?;
//! let mut v = vcpu.lock();
//! loop {
//!     match v.wait()? {
//!         // The vcpu starts in reset state (CS base 0xffff0000): setting
//!         // only rip is not enough. The helper sets every segment.
//!         VcpuEvent::Init => machine::enter_real_mode(&mut v, 0x1000, 0x8000)?,
//!         VcpuEvent::Io { is_write: false, .. } => {
//!             v.resume_io_read(&[0x42])?;
//!             continue;
//!         }
//!         VcpuEvent::Io { no_resume: true, .. } => continue,
//!         VcpuEvent::Shutdown => return Ok(()), // the host stopped the VM
//!         _ => {}
//!     }
//!     v.resume()?;
//! }
//! # }
//! ```
//!
//! Examples that need a running `vmm` are `no_run`; the rest run as doc
//! tests.
//!
//! Errors are [`Error`] values; [`Error::errno`] gives the errno the C API
//! reports (negated).

mod connection;
mod control;
mod decode;
mod error;
mod image;
pub mod machine;
mod migrate;
mod objects;
mod reset;
mod restart;
mod state;
mod transport;
mod types;
mod vcpu;

pub mod c_api;

pub use connection::{Connection, SOCKET_ENV};
pub use control::{ControlChannel, ControlCommand, ControlKind, CONTROL_MAX_JSON, DIRTY_PAGES_MAX};
pub use error::{Error, Result};
pub use image::StateImage;
pub use machine::GuestRam;
pub use migrate::{WriteGuard, WriteTracker};
pub use objects::{IoEvent, IrqEvent, Memory, PAGE_SIZE};
pub use reset::{DirtyPages, RESET_MAX_PAGES};
pub use restart::{Attached, Checkpoint, RestartKind, CHECKPOINT_MAX};
pub use state::{DeviceState, DEVICE_STATE_MAX};
pub use types::{
    ipv4_to_wire, AddressSpace, CallHint, CoalescedWrite, Datamatch, HintDetail, IrqRoute,
    IrqRouteKind, NetConfig, MAX_HINT_DETAIL_COUNT,
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
    send_sync::<ControlChannel>();
};

//! Snapshots and restore from the plugin's side (protocol extension,
//! docs/protocol-extensions.md §6). The host saves and restores everything
//! it holds (guest memory, VM and vcpu state, objects); the plugin hands
//! over only its own device state, an opaque blob:
//!
//! * taking a snapshot, the host sends the control command `SAVE_STATE`
//!   (the vcpus are paused) and the plugin replies with its blob
//!   ([`ControlChannel::reply_state`], or [`ControlChannel::serve_save_state`]
//!   from a [`DeviceState`] behind a mutex); `RESUMED` follows when the
//!   vcpus run again. In between the plugin must not write guest memory;
//! * restoring (`vmm --restore DIR`), the plugin sets its machine up as on
//!   a fresh boot, asks [`Connection::restore_state`] before `Start`, and
//!   loads its devices from the blob; at `Start` the host puts memory and
//!   vcpu state back.
//!
//! ```no_run
//! use std::sync::{Arc, Mutex};
//! use crosvm_plugin::{Connection, DeviceState};
//!
//! #[derive(Default)]
//! struct Counter(u64);
//!
//! impl DeviceState for Counter {
//!     fn save(&self) -> Vec<u8> {
//!         self.0.to_le_bytes().to_vec()
//!     }
//!     fn restore(&mut self, blob: &[u8]) -> crosvm_plugin::Result<()> {
//!         let bytes = blob.try_into().map_err(|_| {
//!             crosvm_plugin::Error::BadDeviceState(format!("{} bytes, not 8", blob.len()))
//!         })?;
//!         self.0 = u64::from_le_bytes(bytes);
//!         Ok(())
//!     }
//! }
//!
//! let conn = Connection::from_env()?;
//! let device = Arc::new(Mutex::new(Counter::default()));
//! if let Some(blob) = conn.restore_state()? {
//!     device.lock().unwrap().restore(&blob)?;
//! }
//! let control = conn.control_channel()?;
//! let _thread = control.spawn_handler_with_state(device.clone(), |_cmd| {
//!     Err((libc::ENOTSUP, "no commands".into()))
//! })?;
//! conn.start()?;
//! # Ok::<(), crosvm_plugin::Error>(())
//! ```
//!
//! [`ControlChannel::reply_state`]: crate::ControlChannel::reply_state
//! [`ControlChannel::serve_save_state`]: crate::ControlChannel::serve_save_state

use plugin_proto::{main_request, main_response, MainRequest};

use crate::error::{Error, Result};
use crate::Connection;

/// Largest device-state blob the host takes (phase 1 of snapshots: bigger
/// device state is out of scope).
pub const DEVICE_STATE_MAX: usize = 16 << 20;

/// A machine's device state: what the plugin keeps outside guest memory
/// and must get back to continue a restored guest.
pub trait DeviceState {
    /// The state as an opaque blob (at most [`DEVICE_STATE_MAX`] bytes).
    /// Called while the vcpus are paused.
    fn save(&self) -> Vec<u8>;

    /// Loads a blob [`DeviceState::save`] made (possibly by an older
    /// version of the plugin). A blob it cannot use is an error
    /// ([`Error::BadDeviceState`] names why), never a panic: it comes from
    /// a snapshot on disk.
    fn restore(&mut self, blob: &[u8]) -> Result<()>;
}

impl Connection {
    /// `GetRestoreState`: `Some(blob)` when vmm runs with `--restore` (the
    /// blob the plugin gave for `SAVE_STATE`; empty if the snapshot was
    /// taken without device state), `None` on a fresh boot. A host without
    /// the extension refuses the request (`ENOTTY`; `ENOTSUP` or `ENOSYS`
    /// are taken the same way): that is a fresh boot too, since such a
    /// host cannot restore. Ask before [`Connection::start`]: a host
    /// restoring a snapshot with device state refuses to start a plugin
    /// that did not.
    pub fn restore_state(&self) -> Result<Option<Vec<u8>>> {
        const OP: &str = "get_restore_state";
        let mut req = MainRequest::new();
        req.set_get_restore_state(main_request::GetRestoreState::new());
        let resp = match self.transact(OP, &req, &[]) {
            Ok((resp, _)) => resp,
            Err(e)
                if e.host_errno()
                    .is_some_and(|n| [libc::ENOTTY, libc::ENOTSUP, libc::ENOSYS].contains(&n)) =>
            {
                return Ok(None)
            }
            Err(e) => return Err(e),
        };
        match resp.message {
            Some(main_response::Message::GetRestoreState(r)) => {
                if !r.restoring {
                    if !r.state.is_empty() {
                        return Err(Error::Protocol(
                            "get_restore_state reply carries device state but is not restoring",
                        ));
                    }
                    return Ok(None);
                }
                if r.state.len() > DEVICE_STATE_MAX {
                    return Err(Error::Protocol(
                        "get_restore_state reply's device state exceeds DEVICE_STATE_MAX",
                    ));
                }
                Ok(Some(r.state))
            }
            _ => Err(Error::Protocol("get_restore_state reply lacks its member")),
        }
    }
}

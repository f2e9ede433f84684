//! What a plugin process is started with, jailed (`jail::spawn`) or not
//! (`runtime::process::spawn_unjailed`): a leaf module both take, so the jail
//! does not depend on the runtime that uses it.

use std::os::fd::OwnedFd;
use std::path::Path;

/// What the plugin is started with.
pub struct Launch<'a> {
    pub path: &'a Path,
    /// argv[1..]; argv[0] is the path as given, in both modes (quirk 3 of
    /// docs/differences-from-crosvm.md).
    pub args: &'a [String],
    /// The environment besides CROSVM_SOCKET, in both modes.
    pub env: &'a [(String, std::ffi::OsString)],
    /// The plugin end of the main socket; passed at the same number.
    pub socket: &'a OwnedFd,
    /// Write end of the host's stdout pipe (the plugin's fd 1).
    pub stdout: OwnedFd,
    /// Write end of the host's stderr pipe.
    pub stderr: OwnedFd,
}

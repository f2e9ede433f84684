//! `Connection::from_env`. One test only: the environment and the adopted
//! descriptor are process-wide.

mod common;

use std::os::fd::IntoRawFd;

use common::*;
use crosvm_plugin::Connection;

#[test]
fn from_env() {
    std::env::remove_var("CROSVM_SOCKET");
    assert_eq!(Connection::from_env().unwrap_err().errno(), libc::ENOTCONN);
    for bad in ["", "abc", "-1", "3x", "99999999999"] {
        std::env::set_var("CROSVM_SOCKET", bad);
        let err = Connection::from_env().unwrap_err();
        assert_eq!(err.errno(), libc::EINVAL, "{bad:?}: {err}");
    }
    // A number that is not an open descriptor.
    std::env::set_var("CROSVM_SOCKET", "987654");
    assert_eq!(Connection::from_env().unwrap_err().errno(), libc::EBADF);

    let (plugin, _host) = start_host(2, Delivery::Single, default_handler());
    let fd = plugin.into_raw_fd();
    std::env::set_var("CROSVM_SOCKET", fd.to_string());
    let conn = Connection::from_env().unwrap();
    assert_eq!(conn.vcpu_count(), 2);
    // The descriptor has an owner now.
    assert_eq!(Connection::from_env().unwrap_err().errno(), libc::EBUSY);
}

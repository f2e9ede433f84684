//! `GetControlSocket` (docs/protocol-extensions.md §5) through the main
//! handler, on the model VM: one descriptor (the plugin's blocking end of a
//! seqpacket pair), `EEXIST` while the channel is open, a new channel once
//! the plugin closed the old one and the host saw it.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::sys::socket::{getsockopt, sockopt};
use plugin_proto::MainRequest;
use vmm::runtime::main_handler::{handle_request, MainState, Reply};
use vmm_model::{FakeServices, ModelVm};

fn get_control_socket(services: &FakeServices) -> Reply {
    let mut state = MainState::new(Arc::default());
    let mut req = MainRequest::new();
    req.set_get_control_socket(Default::default());
    handle_request(
        &mut state,
        &ModelVm::new(32),
        services,
        req,
        Vec::new(),
        false,
    )
}

fn blocking(fd: &OwnedFd) -> bool {
    !OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL).unwrap()).contains(OFlag::O_NONBLOCK)
}

#[test]
fn get_control_socket_gives_one_descriptor_then_eexist_until_closed() {
    let services = FakeServices::new(1, false).unwrap();
    let first = get_control_socket(&services);
    assert_eq!(first.response.errno, 0);
    assert!(first.response.has_get_control_socket());
    assert_eq!(first.fds.len(), 1);
    let plugin = &first.fds[0];
    assert!(blocking(plugin));
    assert_eq!(
        getsockopt(&plugin.as_fd(), sockopt::SockType).unwrap(),
        nix::sys::socket::SockType::SeqPacket
    );

    let second = get_control_socket(&services);
    assert_eq!(second.response.errno, libc::EEXIST);
    assert!(second.fds.is_empty());

    // The plugin closes its end; once the host has read the hang-up, a new
    // channel may be opened.
    drop(first);
    assert!(services.control.borrow_mut().on_readable().is_empty());
    assert!(!services.control.borrow().is_open());
    let third = get_control_socket(&services);
    assert_eq!(third.response.errno, 0);
    assert_eq!(third.fds.len(), 1);
}

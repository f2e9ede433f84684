//! Tap devices for the plugin (docs/host-behaviour.md §4.2): created by name or
//! from an address triple, or adopted from an open descriptor. The first one is
//! what `GetNetConfig` describes and hands to the plugin.

use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};

use crate::config::NetSpec;

/// Errors creating or querying a tap device.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("cannot open /dev/net/tun")]
    OpenTun(#[source] std::io::Error),
    #[error("cannot create tap device {name}")]
    CreateTap {
        name: String,
        #[source]
        source: Errno,
    },
    #[error("tap descriptor {0} is not open")]
    BadFd(i32),
    #[error("descriptor {fd} is not a tap device")]
    NotTap {
        fd: i32,
        #[source]
        source: Errno,
    },
    #[error("cannot configure {what} of tap device {name}")]
    Configure {
        what: &'static str,
        name: String,
        #[source]
        source: Errno,
    },
    #[error("tap device name `{0}` is too long")]
    NameTooLong(String),
}

/// An open tap device.
pub struct Tap {
    fd: OwnedFd,
    name: String,
}

/// The addresses `GetNetConfig` reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TapAddresses {
    pub ip: [u8; 4],
    pub netmask: [u8; 4],
    pub mac: [u8; 6],
}

fn ifreq_for(name: &str) -> Result<libc::ifreq, NetError> {
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    let bytes = name.as_bytes();
    if bytes.len() >= req.ifr_name.len() {
        return Err(NetError::NameTooLong(name.to_string()));
    }
    for (dst, &b) in req.ifr_name.iter_mut().zip(bytes) {
        *dst = b as libc::c_char;
    }
    Ok(req)
}

fn ifreq_name(req: &libc::ifreq) -> String {
    let bytes: Vec<u8> = req
        .ifr_name
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// One `ioctl` on `fd` with an `ifreq` argument.
fn ifreq_ioctl(
    fd: BorrowedFd<'_>,
    request: libc::c_ulong,
    req: &mut libc::ifreq,
) -> Result<(), Errno> {
    // SAFETY: every request used here reads or writes one `struct ifreq`,
    // which `req` points to and which outlives the call.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), request as _, req as *mut libc::ifreq) };
    Errno::result(r).map(drop)
}

/// A datagram socket for interface configuration ioctls.
fn control_socket() -> Result<OwnedFd, Errno> {
    socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
}

fn sockaddr_in(ip: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(ip.octets()),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size (16 bytes) and
    // sockaddr accepts any bit pattern.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn sockaddr_ipv4(sa: &libc::sockaddr) -> [u8; 4] {
    // sin_addr sits at bytes 2..6 of sa_data (after the port).
    let d = &sa.sa_data;
    [d[2] as u8, d[3] as u8, d[4] as u8, d[5] as u8]
}

impl Tap {
    /// Opens `/dev/net/tun` and attaches to (or creates) interface `name`,
    /// which may be a template such as `vmtap%d`.
    fn create(name: &str, vnet_hdr: bool) -> Result<Tap, NetError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(NetError::OpenTun)?;
        let mut req = ifreq_for(name)?;
        let mut flags = libc::IFF_TAP | libc::IFF_NO_PI;
        if vnet_hdr {
            flags |= libc::IFF_VNET_HDR;
        }
        req.ifr_ifru.ifru_flags = flags as libc::c_short;
        let fd = OwnedFd::from(file);
        ifreq_ioctl(fd.as_fd(), libc::TUNSETIFF as libc::c_ulong, &mut req).map_err(|source| {
            NetError::CreateTap {
                name: name.to_string(),
                source,
            }
        })?;
        Ok(Tap {
            fd,
            name: ifreq_name(&req),
        })
    }

    /// Adopts an open tap descriptor (validated with `TUNGETIFF`).
    fn adopt(raw: i32) -> Result<Tap, NetError> {
        // SAFETY: fcntl(F_GETFD) only queries the descriptor table.
        if unsafe { libc::fcntl(raw, libc::F_GETFD) } < 0 {
            return Err(NetError::BadFd(raw));
        }
        // SAFETY: the user handed this open descriptor to vmm (`--tap-fd`);
        // from here on vmm owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut req = ifreq_for("")?;
        ifreq_ioctl(fd.as_fd(), libc::TUNGETIFF as libc::c_ulong, &mut req)
            .map_err(|source| NetError::NotTap { fd: raw, source })?;
        let fl =
            fcntl(&fd, FcntlArg::F_GETFL).map_err(|source| NetError::NotTap { fd: raw, source })?;
        fcntl(
            &fd,
            FcntlArg::F_SETFL(OFlag::from_bits_truncate(fl) | OFlag::O_NONBLOCK),
        )
        .map_err(|source| NetError::NotTap { fd: raw, source })?;
        let _ = fcntl(&fd, FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC));
        Ok(Tap {
            fd,
            name: ifreq_name(&req),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    fn configure(
        &self,
        what: &'static str,
        request: libc::c_ulong,
        req: &mut libc::ifreq,
    ) -> Result<(), NetError> {
        let sock = control_socket().map_err(|source| NetError::Configure {
            what,
            name: self.name.clone(),
            source,
        })?;
        ifreq_ioctl(sock.as_fd(), request, req).map_err(|source| NetError::Configure {
            what,
            name: self.name.clone(),
            source,
        })
    }

    fn set_ip(&self, ip: Ipv4Addr, netmask: Ipv4Addr) -> Result<(), NetError> {
        let mut req = ifreq_for(&self.name)?;
        req.ifr_ifru.ifru_addr = sockaddr_in(ip);
        self.configure("the address", libc::SIOCSIFADDR, &mut req)?;
        let mut req = ifreq_for(&self.name)?;
        req.ifr_ifru.ifru_netmask = sockaddr_in(netmask);
        self.configure("the netmask", libc::SIOCSIFNETMASK, &mut req)
    }

    fn set_mac(&self, mac: [u8; 6]) -> Result<(), NetError> {
        let mut req = ifreq_for(&self.name)?;
        // SAFETY: sockaddr is plain old data; all-zero is valid.
        let mut sa: libc::sockaddr = unsafe { std::mem::zeroed() };
        sa.sa_family = libc::ARPHRD_ETHER;
        for (d, b) in sa.sa_data.iter_mut().zip(mac) {
            *d = b as libc::c_char;
        }
        req.ifr_ifru.ifru_hwaddr = sa;
        self.configure("the MAC address", libc::SIOCSIFHWADDR, &mut req)
    }

    fn bring_up(&self) -> Result<(), NetError> {
        let mut req = ifreq_for(&self.name)?;
        self.configure("the flags", libc::SIOCGIFFLAGS, &mut req)?;
        // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
        let flags = unsafe { req.ifr_ifru.ifru_flags };
        req.ifr_ifru.ifru_flags = flags | (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        self.configure("the flags", libc::SIOCSIFFLAGS, &mut req)
    }

    /// Reads the interface's IPv4 address, netmask and MAC.
    pub fn addresses(&self) -> Result<TapAddresses, Errno> {
        let sock = control_socket()?;
        let mut req = ifreq_for(&self.name).map_err(|_| Errno::EINVAL)?;
        ifreq_ioctl(sock.as_fd(), libc::SIOCGIFADDR, &mut req)?;
        // SAFETY: SIOCGIFADDR filled the address member of the union.
        let ip = sockaddr_ipv4(unsafe { &req.ifr_ifru.ifru_addr });
        ifreq_ioctl(sock.as_fd(), libc::SIOCGIFNETMASK, &mut req)?;
        // SAFETY: SIOCGIFNETMASK filled the netmask member.
        let netmask = sockaddr_ipv4(unsafe { &req.ifr_ifru.ifru_netmask });
        ifreq_ioctl(sock.as_fd(), libc::SIOCGIFHWADDR, &mut req)?;
        // SAFETY: SIOCGIFHWADDR filled the hardware address member.
        let hw = unsafe { req.ifr_ifru.ifru_hwaddr };
        let mut mac = [0u8; 6];
        for (m, &b) in mac.iter_mut().zip(hw.sa_data.iter()) {
            *m = b as u8;
        }
        Ok(TapAddresses { ip, netmask, mac })
    }
}

/// Creates or adopts one tap per spec, in order.
pub fn open_taps(specs: &[NetSpec]) -> Result<Vec<Tap>, NetError> {
    specs
        .iter()
        .map(|spec| match spec {
            NetSpec::HostIp { ip, netmask, mac } => {
                let tap = Tap::create("vmtap%d", false)?;
                tap.set_ip(*ip, *netmask)?;
                tap.set_mac(*mac)?;
                tap.bring_up()?;
                Ok(tap)
            }
            NetSpec::TapName { name, mac } => {
                let tap = Tap::create(name, true)?;
                if let Some(mac) = mac {
                    tap.set_mac(*mac)?;
                }
                Ok(tap)
            }
            NetSpec::TapFd { fd, mac } => {
                let tap = Tap::adopt(*fd)?;
                if let Some(mac) = mac {
                    tap.set_mac(*mac)?;
                }
                Ok(tap)
            }
        })
        .collect()
}

/// Whether this machine lets vmm create tap devices (root and /dev/net/tun).
pub fn taps_available() -> bool {
    Tap::create("vmprobe%d", false).is_ok()
}

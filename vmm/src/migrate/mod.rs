//! Live migration's transport (docs/migration-stream.md): the addresses
//! (`unix:PATH`, `tcp:HOST:PORT`), the source's bounded connect, the
//! target's listener (a unix socket file of mode 0600, removed when it is
//! dropped) and the stream both sides read and write with timeouts.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// How long the source tries to reach the target.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest silence either side accepts from the other mid-migration.
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a migration's connection failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("\"{0}\" is not a migration address (unix:PATH or tcp:HOST:PORT)")]
    BadAddress(String),
    #[error("cannot resolve {0}")]
    Resolve(String, #[source] std::io::Error),
    #[error("cannot connect to {addr}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("no migration source connected to {addr} within {after:?}")]
    AcceptTimeout { addr: String, after: Duration },
    #[error("cannot accept a migration connection on {addr}")]
    Accept {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot set the connection's timeouts")]
    Timeouts(#[source] std::io::Error),
}

/// A migration address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Addr {
    Unix(PathBuf),
    Tcp(String),
}

impl Addr {
    pub fn parse(s: &str) -> Result<Addr, MigrateError> {
        if let Some(p) = s.strip_prefix("unix:") {
            if !p.is_empty() {
                return Ok(Addr::Unix(PathBuf::from(p)));
            }
        }
        if let Some(hp) = s.strip_prefix("tcp:") {
            if hp
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
            {
                return Ok(Addr::Tcp(hp.to_string()));
            }
        }
        Err(MigrateError::BadAddress(s.to_string()))
    }
}

impl std::fmt::Display for Addr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Addr::Unix(p) => write!(f, "unix:{}", p.display()),
            Addr::Tcp(hp) => write!(f, "tcp:{hp}"),
        }
    }
}

/// One migration connection.
pub enum Conn {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Conn {
    /// Connects within [`CONNECT_TIMEOUT`]; reads and writes then time out
    /// after [`IO_TIMEOUT`].
    pub fn connect(addr: &Addr) -> Result<Conn, MigrateError> {
        let fail = |source| MigrateError::Connect {
            addr: addr.to_string(),
            source,
        };
        let c = match addr {
            // A unix connect does not wait: no listener is ECONNREFUSED
            // or ENOENT at once.
            Addr::Unix(p) => Conn::Unix(UnixStream::connect(p).map_err(fail)?),
            Addr::Tcp(hp) => {
                let deadline = Instant::now() + CONNECT_TIMEOUT;
                let addrs: Vec<_> = hp
                    .to_socket_addrs()
                    .map_err(|e| MigrateError::Resolve(hp.clone(), e))?
                    .collect();
                let mut last = std::io::Error::from(std::io::ErrorKind::NotFound);
                let mut conn = None;
                for a in addrs {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        last = std::io::ErrorKind::TimedOut.into();
                        break;
                    }
                    match TcpStream::connect_timeout(&a, left) {
                        Ok(s) => {
                            conn = Some(s);
                            break;
                        }
                        Err(e) => last = e,
                    }
                }
                let s = conn.ok_or_else(|| fail(last))?;
                let _ = s.set_nodelay(true);
                Conn::Tcp(s)
            }
        };
        c.set_timeouts(Some(IO_TIMEOUT))?;
        Ok(c)
    }

    pub fn set_timeouts(&self, t: Option<Duration>) -> Result<(), MigrateError> {
        match self {
            Conn::Unix(s) => s.set_read_timeout(t).and_then(|()| s.set_write_timeout(t)),
            Conn::Tcp(s) => s.set_read_timeout(t).and_then(|()| s.set_write_timeout(t)),
        }
        .map_err(MigrateError::Timeouts)
    }

    /// A second handle on the same connection.
    pub fn try_clone(&self) -> std::io::Result<Conn> {
        Ok(match self {
            Conn::Unix(s) => Conn::Unix(s.try_clone()?),
            Conn::Tcp(s) => Conn::Tcp(s.try_clone()?),
        })
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Conn::Unix(s) => s.read(buf),
            Conn::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Conn::Unix(s) => s.write(buf),
            Conn::Tcp(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Conn::Unix(s) => s.flush(),
            Conn::Tcp(s) => s.flush(),
        }
    }
}

/// The target's listener; a unix socket file is removed when it drops.
pub struct Listener {
    addr: Addr,
    inner: Inner,
}

enum Inner {
    Unix(UnixListener),
    Tcp(TcpListener),
}

impl Listener {
    /// Binds `addr` (a unix socket file gets mode 0600: only vmm's user
    /// may send it a machine).
    pub fn bind(addr: &Addr) -> Result<Listener, MigrateError> {
        let fail = |source| MigrateError::Listen {
            addr: addr.to_string(),
            source,
        };
        let inner = match addr {
            Addr::Unix(p) => {
                let l = UnixListener::bind(p).map_err(fail)?;
                std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600)).map_err(
                    |e| {
                        let _ = std::fs::remove_file(p);
                        fail(e)
                    },
                )?;
                Inner::Unix(l)
            }
            Addr::Tcp(hp) => Inner::Tcp(TcpListener::bind(hp.as_str()).map_err(fail)?),
        };
        Ok(Listener {
            addr: addr.clone(),
            inner,
        })
    }

    /// The bound TCP port (for `tcp:HOST:0`).
    pub fn local_port(&self) -> Option<u16> {
        match &self.inner {
            Inner::Tcp(l) => l.local_addr().ok().map(|a| a.port()),
            Inner::Unix(_) => None,
        }
    }

    /// Waits for one source (`None`: for ever).
    pub fn accept(&self, timeout: Option<Duration>) -> Result<Conn, MigrateError> {
        use std::os::fd::AsFd;
        let fd = match &self.inner {
            Inner::Unix(l) => l.as_fd(),
            Inner::Tcp(l) => l.as_fd(),
        };
        let mut fds = [nix::poll::PollFd::new(fd, nix::poll::PollFlags::POLLIN)];
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            let wait = match deadline {
                None => nix::poll::PollTimeout::NONE,
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(MigrateError::AcceptTimeout {
                            addr: self.addr.to_string(),
                            after: timeout.unwrap_or_default(),
                        });
                    }
                    nix::poll::PollTimeout::try_from(left.as_millis().min(60_000) as u32 + 1)
                        .unwrap_or(nix::poll::PollTimeout::MAX)
                }
            };
            match nix::poll::poll(&mut fds, wait) {
                Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
                Ok(_) => break,
                Err(e) => {
                    return Err(MigrateError::Accept {
                        addr: self.addr.to_string(),
                        source: e.into(),
                    })
                }
            }
        }
        let fail = |source| MigrateError::Accept {
            addr: self.addr.to_string(),
            source,
        };
        let c = match &self.inner {
            Inner::Unix(l) => Conn::Unix(l.accept().map_err(fail)?.0),
            Inner::Tcp(l) => {
                let s = l.accept().map_err(fail)?.0;
                let _ = s.set_nodelay(true);
                Conn::Tcp(s)
            }
        };
        c.set_timeouts(Some(IO_TIMEOUT))?;
        Ok(c)
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Addr::Unix(p) = &self.addr {
            let _ = std::fs::remove_file(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_and_bad_ones_are_named() {
        assert_eq!(
            Addr::parse("unix:/tmp/m.sock").unwrap(),
            Addr::Unix("/tmp/m.sock".into())
        );
        assert_eq!(
            Addr::parse("tcp:127.0.0.1:4444").unwrap(),
            Addr::Tcp("127.0.0.1:4444".into())
        );
        for bad in [
            "unix:",
            "tcp:127.0.0.1",
            "tcp::5",
            "tcp:h:99999",
            "/tmp/x",
            "",
        ] {
            let e = Addr::parse(bad).unwrap_err().to_string();
            assert!(e.contains("unix:PATH or tcp:HOST:PORT"), "{bad}: {e}");
        }
    }

    #[test]
    fn a_unix_listener_is_private_and_removed() {
        let dir = std::env::temp_dir().join(format!("vmm-mig-{}", std::process::id()));
        let _ = std::fs::remove_file(&dir);
        let addr = Addr::Unix(dir.clone());
        let l = Listener::bind(&addr).unwrap();
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let e = l
            .accept(Some(Duration::from_millis(20)))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("no migration source connected"), "{e}");
        let mut c = Conn::connect(&addr).unwrap();
        let mut s = l.accept(Some(Duration::from_secs(5))).unwrap();
        c.write_all(b"hi").unwrap();
        let mut b = [0u8; 2];
        s.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"hi");
        drop(l);
        assert!(!dir.exists());
        let e = Conn::connect(&addr).err().unwrap().to_string();
        assert!(e.contains("cannot connect to unix:"), "{e}");
    }
}

//! VMM-side objects bound to client-chosen ids: io events, memory regions
//! and irq events. Each handle destroys its object when dropped.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use plugin_proto::main_request::{self, create};
use plugin_proto::main_response;
use plugin_proto::MainRequest;

use crate::connection::{Connection, Shared};
use crate::error::{Error, Result};
use crate::types::{AddressSpace, Datamatch};

/// Guest page size used for memory offsets, lengths and the dirty bitmap.
pub const PAGE_SIZE: u64 = 4096;

/// The common part of every object handle.
struct ObjectCore {
    /// The creating connection, used by `Drop` and the methods without a
    /// connection argument. `None` for handles owned by the C API, which
    /// always names the connection to use (so a destroyed C connection's
    /// socket is really closed).
    conn: Option<Connection>,
    /// Where the id came from.
    shared: Arc<Shared>,
    id: u32,
    /// False once destroyed (so `Drop` does nothing).
    live: bool,
}

impl std::fmt::Debug for ObjectCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Object")
            .field("id", &self.id)
            .field("live", &self.live)
            .finish()
    }
}

impl ObjectCore {
    /// Sends `Destroy{id}` on `conn`; on success the id may be given back.
    fn destroy_via(&mut self, conn: &Connection) -> Result<()> {
        let mut req = MainRequest::new();
        req.mut_destroy().id = self.id;
        conn.transact("destroy", &req, &[])?;
        self.live = false;
        self.shared.release_id(self.id);
        Ok(())
    }

    /// The creating connection (`EBADF` for detached C API handles, which
    /// never call this).
    fn conn(&self) -> Result<&Connection> {
        self.conn.as_ref().ok_or(Error::Sys {
            op: "using a detached object handle",
            source: nix::errno::Errno::EBADF,
        })
    }
}

impl Drop for ObjectCore {
    fn drop(&mut self) {
        if self.live {
            if let Some(conn) = self.conn.take() {
                // Errors cannot be reported from a destructor; use `destroy`
                // to see them.
                let _ = self.destroy_via(&conn);
            }
        }
    }
}

/// Allocates an id, sends `Create{id, constructor}` and returns the id and
/// the reply's descriptors. On failure the id is given back.
fn create_object(
    conn: &Connection,
    constructor: create::Constructor,
    fds: &[BorrowedFd<'_>],
) -> Result<(ObjectCore, Vec<OwnedFd>)> {
    let shared = conn.shared();
    let id = shared.alloc_id()?;
    let mut req = MainRequest::new();
    let c = req.mut_create();
    c.id = id;
    c.constructor = Some(constructor);
    match conn.transact("create", &req, fds) {
        Ok((_, fds)) => Ok((
            ObjectCore {
                conn: Some(conn.clone()),
                shared: shared.clone(),
                id,
                live: true,
            },
            fds,
        )),
        Err(e) => {
            shared.release_id(id);
            Err(e)
        }
    }
}

/// Hot restart: handles on objects the previous plugin created (the host
/// kept them); dropped, they destroy the object as usual.
impl Memory {
    pub(crate) fn adopt(conn: &Connection, id: u32, length: u64) -> Memory {
        Memory {
            core: adopted(conn, id),
            length,
        }
    }
}

impl IoEvent {
    pub(crate) fn adopt(conn: &Connection, id: u32, fd: OwnedFd) -> IoEvent {
        IoEvent {
            core: adopted(conn, id),
            fd,
        }
    }
}

impl IrqEvent {
    pub(crate) fn adopt(
        conn: &Connection,
        id: u32,
        trigger: OwnedFd,
        resample: OwnedFd,
    ) -> IrqEvent {
        IrqEvent {
            core: adopted(conn, id),
            trigger,
            resample,
        }
    }
}

fn adopted(conn: &Connection, id: u32) -> ObjectCore {
    ObjectCore {
        conn: Some(conn.clone()),
        shared: conn.shared().clone(),
        id,
        live: true,
    }
}

/// Creation succeeded on the VMM but the reply lacked descriptors: destroy
/// the object again so it does not linger, and report `EPROTO`.
fn missing_fds<T>(mut core: ObjectCore, what: &'static str) -> Result<T> {
    if let Some(conn) = core.conn.take() {
        // If this fails too, the object is left to the VMM (nothing sent on
        // drop, since the connection was taken).
        let _ = core.destroy_via(&conn);
    }
    Err(Error::Protocol(what))
}

macro_rules! destroy_methods {
    ($ty:ident) => {
        impl $ty {
            /// The object id.
            pub fn id(&self) -> u32 {
                self.core.id
            }

            /// Destroys the object through its creating connection. On
            /// failure the handle is returned intact together with the error.
            pub fn destroy(self) -> std::result::Result<(), ($ty, Error)> {
                let conn = match self.core.conn() {
                    Ok(c) => c.clone(),
                    Err(e) => return Err((self, e)),
                };
                self.destroy_via(&conn)
            }

            /// Destroys the object through `conn` (any connection of the same
            /// VM). On failure the handle is returned intact.
            pub fn destroy_via(
                mut self,
                conn: &Connection,
            ) -> std::result::Result<(), ($ty, Error)> {
                match self.core.destroy_via(conn) {
                    Ok(()) => Ok(()),
                    Err(e) => Err((self, e)),
                }
            }

            /// For the C API: forget the creating connection, so the handle
            /// does not keep its socket open. A detached handle is destroyed
            /// only explicitly.
            pub(crate) fn detach(mut self) -> Self {
                self.core.conn = None;
                self
            }
        }

        impl DestroyInPlace for $ty {
            fn destroy_in_place(&mut self, conn: &Connection) -> Result<()> {
                self.core.destroy_via(conn)
            }
        }
    };
}

/// Destroy for the C API: on success the handle is inert (its drop sends
/// nothing) and only has to be freed; on failure it stays usable.
pub(crate) trait DestroyInPlace {
    fn destroy_in_place(&mut self, conn: &Connection) -> Result<()>;
}

/// An ioeventfd: matching guest writes signal [`IoEvent::fd`] in the kernel,
/// without a vcpu exit.
///
/// ```no_run
/// # use crosvm_plugin::{AddressSpace, Connection, Datamatch};
/// let conn = Connection::from_env()?; // needs a running vmm
/// let doorbell = conn.create_io_event(AddressSpace::Mmio, 0xd000_0000, Datamatch::U32(1))?;
/// let mut count = [0u8; 8];
/// nix::unistd::read(doorbell.fd(), &mut count).ok(); // blocks until the guest rings
/// drop(doorbell); // sends Destroy
/// # Ok::<(), crosvm_plugin::Error>(())
/// ```
#[derive(Debug)]
pub struct IoEvent {
    core: ObjectCore,
    fd: OwnedFd,
}

destroy_methods!(IoEvent);

impl IoEvent {
    /// The eventfd (owned by the handle).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// A guest memory region backed by part of a memfd (see also
/// [`GuestRam::register`](crate::GuestRam::register)).
///
/// ```no_run
/// # use crosvm_plugin::{Connection, GuestRam};
/// let conn = Connection::from_env()?; // needs a running vmm
/// let ram = GuestRam::new(0x20000)?;
/// // memfd offset 0, 0x20000 bytes at guest 0x100000, writable, dirty-logged.
/// let region = conn.create_memory(ram.fd(), 0, 0x20000, 0x10_0000, false, true)?;
/// let dirty = conn.get_dirty_log(&region)?; // one bit per page
/// assert_eq!(dirty.len(), 4);
/// # Ok::<(), crosvm_plugin::Error>(())
/// ```
#[derive(Debug)]
pub struct Memory {
    core: ObjectCore,
    length: u64,
}

destroy_methods!(Memory);

impl Memory {
    /// Region length in bytes.
    pub fn length(&self) -> u64 {
        self.length
    }

    /// Size in bytes of this region's dirty bitmap: one bit per page.
    pub fn dirty_log_len(&self) -> usize {
        let pages = self.length.div_ceil(PAGE_SIZE);
        usize::try_from(pages.div_ceil(8)).unwrap_or(usize::MAX)
    }

    /// Fetches (and resets) the dirty-page bitmap through the creating
    /// connection. The region needs `dirty_log` enabled.
    pub fn dirty_log(&self) -> Result<Vec<u8>> {
        self.core.conn()?.get_dirty_log(self)
    }
}

/// An irqfd: writing to [`IrqEvent::fd`] raises the GSI; the resample
/// eventfd is signalled when the guest acknowledges the level interrupt.
///
/// ```no_run
/// # use crosvm_plugin::Connection;
/// let conn = Connection::from_env()?; // needs a running vmm
/// let irq4 = conn.create_irq_event(4)?;
/// nix::unistd::write(irq4.fd(), &1u64.to_ne_bytes()).ok(); // raise GSI 4
/// # Ok::<(), crosvm_plugin::Error>(())
/// ```
#[derive(Debug)]
pub struct IrqEvent {
    core: ObjectCore,
    trigger: OwnedFd,
    resample: OwnedFd,
}

destroy_methods!(IrqEvent);

impl IrqEvent {
    /// The trigger eventfd (owned by the handle).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.trigger.as_fd()
    }

    /// The resample eventfd (owned by the handle).
    pub fn resample_fd(&self) -> BorrowedFd<'_> {
        self.resample.as_fd()
    }
}

impl Connection {
    /// Registers an ioeventfd at `address`.
    pub fn create_io_event(
        &self,
        space: AddressSpace,
        address: u64,
        datamatch: Datamatch,
    ) -> Result<IoEvent> {
        let (length, value) = datamatch.to_raw();
        let ctor = create::Constructor::IoEvent(create::IoEvent {
            space: space.to_proto(),
            address,
            length,
            datamatch: value,
            ..Default::default()
        });
        let (core, fds) = create_object(self, ctor, &[])?;
        match fds.into_iter().next() {
            Some(fd) => Ok(IoEvent { core, fd }),
            None => missing_fds(core, "io event reply carries no descriptor"),
        }
    }

    /// Maps `[offset, offset + length)` of `memfd` at guest-physical `start`.
    /// `offset` and `length` must be multiples of 4096 (else `EINVAL`,
    /// nothing sent); the memfd needs the `F_SEAL_SHRINK` seal. The caller
    /// keeps its descriptor.
    pub fn create_memory(
        &self,
        memfd: BorrowedFd<'_>,
        offset: u64,
        length: u64,
        start: u64,
        read_only: bool,
        dirty_log: bool,
    ) -> Result<Memory> {
        if !offset.is_multiple_of(PAGE_SIZE) || !length.is_multiple_of(PAGE_SIZE) {
            return Err(Error::InvalidArgument(
                "memory offset and length must be multiples of 4096",
            ));
        }
        let ctor = create::Constructor::Memory(create::Memory {
            offset,
            start,
            length,
            read_only,
            dirty_log,
            ..Default::default()
        });
        let (core, _) = create_object(self, ctor, &[memfd])?;
        Ok(Memory { core, length })
    }

    /// Registers an irqfd with resample for GSI `irq_id`.
    pub fn create_irq_event(&self, irq_id: u32) -> Result<IrqEvent> {
        let ctor = create::Constructor::IrqEvent(create::IrqEvent {
            irq_id,
            resample: true,
            ..Default::default()
        });
        let (core, fds) = create_object(self, ctor, &[])?;
        let mut fds = fds.into_iter();
        match (fds.next(), fds.next()) {
            (Some(trigger), Some(resample)) => Ok(IrqEvent {
                core,
                trigger,
                resample,
            }),
            _ => missing_fds(core, "irq event reply carries fewer than two descriptors"),
        }
    }

    /// Fetches (and resets) the dirty bitmap of `memory` over this
    /// connection: one bit per 4 KiB page, LSB first.
    pub fn get_dirty_log(&self, memory: &Memory) -> Result<Vec<u8>> {
        let mut req = MainRequest::new();
        req.set_dirty_log(main_request::MemoryDirtyLog {
            id: memory.id(),
            ..Default::default()
        });
        let bitmap = match self.transact("dirty_log", &req, &[])?.0.message {
            Some(main_response::Message::DirtyLog(d)) => d.bitmap,
            _ => return Err(Error::Protocol("dirty_log reply lacks its member")),
        };
        let expected = memory.dirty_log_len();
        if bitmap.len() != expected {
            return Err(Error::BadLength {
                what: "dirty bitmap",
                expected,
                got: bitmap.len(),
            });
        }
        Ok(bitmap)
    }
}

//! Structure-aware generators: `arbitrary` picks a request shape whose fields
//! lean towards the interesting values (small colliding ids, page-aligned and
//! overflowing addresses, images of the right and wrong sizes, lists just
//! under and over the limits), which is then serialized, optionally damaged,
//! and fed to the handlers as bytes.

use arbitrary::{Arbitrary, Unstructured};
use plugin_proto::protobuf::{EnumOrUnknown, Message};
use plugin_proto::{main_request, vcpu_request, vcpu_response, MainRequest, VcpuRequest};

use vmm::limits;
use vmm::record::FdKind;
use vmm::vm::{VcpuStateKind, VmStateKind};

/// An object id: mostly from a small set, so creations and destroys collide.
#[derive(Debug, Clone, Copy)]
pub struct Id(pub u32);

impl<'a> Arbitrary<'a> for Id {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        Ok(Id(if u.ratio(7, 8)? {
            u.int_in_range(0..=11)?
        } else {
            u.arbitrary()?
        }))
    }
}

/// An address: small page multiples, IO ports, or anything (near the top).
#[derive(Debug, Clone, Copy)]
pub struct Addr(pub u64);

impl<'a> Arbitrary<'a> for Addr {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        Ok(Addr(match u.int_in_range(0..=5)? {
            0 => u64::from(u.int_in_range::<u8>(0..=31)?) * 0x1000,
            1 => u64::from(u.int_in_range::<u16>(0..=0x3ff)?),
            2 => u64::MAX - u64::from(u.int_in_range::<u16>(0..=0x2000)?),
            3 => {
                u64::from(u.int_in_range::<u8>(0..=31)?) * 0x1000
                    + u64::from(u.int_in_range::<u8>(1..=0xff)?)
            }
            4 => 0,
            _ => u.arbitrary()?,
        }))
    }
}

/// A length: zero, small, page multiples, odd, or anything.
#[derive(Debug, Clone, Copy)]
pub struct Len(pub u64);

impl<'a> Arbitrary<'a> for Len {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        Ok(Len(match u.int_in_range(0..=5)? {
            0 => 0,
            1 => u64::from(u.int_in_range::<u8>(1..=16)?),
            2 => u64::from(u.int_in_range::<u8>(1..=20)?) * 0x1000,
            3 => u64::from(u.int_in_range::<u16>(1..=0x2fff)?),
            4 => u64::MAX - u64::from(u.int_in_range::<u8>(0..=255)?),
            _ => u.arbitrary()?,
        }))
    }
}

/// An image for a state set: right size, empty, or a wrong size.
#[derive(Debug, Clone, Copy)]
pub enum Image {
    Correct(u8),
    Empty,
    Wrong(u16),
}

impl<'a> Arbitrary<'a> for Image {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        Ok(match u.int_in_range(0..=5)? {
            0..=2 => Image::Correct(u.arbitrary()?),
            3 => Image::Empty,
            _ => Image::Wrong(u.int_in_range(0..=1100)?),
        })
    }
}

impl Image {
    pub fn bytes(self, size: usize) -> Vec<u8> {
        match self {
            // Fill bytes, with the first 16 zero so flags-like fields stay
            // acceptable half of the time.
            Image::Correct(fill) => {
                let mut v = vec![fill; size];
                if fill % 2 == 0 {
                    v[..size.min(16)].fill(0);
                }
                v
            }
            Image::Empty => Vec::new(),
            Image::Wrong(n) if n as usize == size => vec![0; size + 1],
            Image::Wrong(n) => vec![0x5a; n as usize],
        }
    }
}

/// A list length around a limit.
#[derive(Debug, Clone, Copy)]
pub struct Count(pub usize);

impl Count {
    fn gen(u: &mut Unstructured<'_>, limit: usize) -> arbitrary::Result<Count> {
        // Long lists are rare: they are slow to build and one of each kind
        // per session is enough to hit the limits.
        Ok(Count(match u.int_in_range(0..=31)? {
            0..=3 => 0,
            28 => limit,
            29 => limit + 1,
            30 => u.int_in_range(0..=limit + 64)?,
            _ => u.int_in_range(1..=8)?,
        }))
    }
}

/// The descriptors attached to a generated request.
#[derive(Debug, Clone, Copy)]
pub struct Fds(pub FdKind, pub u16);

impl<'a> Arbitrary<'a> for Fds {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        let kind = FdKind::from_byte(u.arbitrary()?);
        let arg = match u.int_in_range(0..=3)? {
            0 => 16,
            1 => u.int_in_range(0..=64)?,
            _ => u.int_in_range(1..=32)?,
        };
        Ok(Fds(kind, arg))
    }
}

/// How a serialized request is damaged before it is sent (mostly not).
#[derive(Debug, Clone, Copy)]
pub enum Damage {
    None,
    Truncate(u16),
    Flip(u16, u8),
    AppendGarbage(u8, u8),
}

impl<'a> Arbitrary<'a> for Damage {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        Ok(match u.int_in_range(0..=15)? {
            0 => Damage::Truncate(u.arbitrary()?),
            1 => Damage::Flip(u.arbitrary()?, u.arbitrary()?),
            2 => Damage::AppendGarbage(u.arbitrary()?, u.arbitrary()?),
            _ => Damage::None,
        })
    }
}

impl Damage {
    pub fn apply(self, bytes: &mut Vec<u8>) {
        match self {
            Damage::None => {}
            Damage::Truncate(n) => {
                if !bytes.is_empty() {
                    bytes.truncate(usize::from(n) % bytes.len());
                }
            }
            Damage::Flip(at, mask) => {
                if !bytes.is_empty() {
                    let i = usize::from(at) % bytes.len();
                    bytes[i] ^= mask.max(1);
                }
            }
            Damage::AppendGarbage(n, b) => bytes.extend(std::iter::repeat_n(b, usize::from(n))),
        }
    }
}

/// A generated main request (before serialization).
#[derive(Debug, Clone)]
pub enum MainShape {
    CreateIoEvent {
        id: Id,
        space: i32,
        addr: Addr,
        length: u32,
        datamatch: u64,
    },
    CreateMemory {
        id: Id,
        offset: Addr,
        start: Addr,
        length: Len,
        read_only: bool,
        dirty_log: bool,
    },
    CreateIrqEvent {
        id: Id,
        gsi: u32,
    },
    CreateEmpty {
        id: Id,
    },
    Destroy {
        id: Id,
    },
    NewConnection,
    GetShutdownEventfd,
    CheckExtension(u32),
    GetSupportedCpuid,
    GetEmulatedCpuid,
    GetMsrIndexList,
    GetNetConfig,
    Reserve {
        space: i32,
        start: Addr,
        length: Len,
        async_write: bool,
    },
    SetIrq {
        irq: u32,
        active: bool,
    },
    SetIrqRouting {
        routes: Count,
        chip: u32,
        pin: u32,
        msi: bool,
    },
    GetState {
        set: i32,
    },
    SetState {
        set: i32,
        image: Image,
    },
    SetIdentityMapAddr(u32),
    PauseVcpus {
        mask: u64,
        user: u64,
    },
    GetVcpus {
        chunked: bool,
    },
    Start,
    SetCallHint {
        space: i32,
        address: Addr,
        on_write: bool,
        hints: Count,
    },
    DirtyLog {
        id: Id,
    },
    GetControlSocket,
    Empty,
    Unknown(u32),
}

fn space(u: &mut Unstructured<'_>) -> arbitrary::Result<i32> {
    Ok(if u.ratio(15, 16)? {
        u.int_in_range(0..=1)?
    } else {
        u.arbitrary()?
    })
}

fn set_value(u: &mut Unstructured<'_>, n: i32) -> arbitrary::Result<i32> {
    Ok(if u.ratio(15, 16)? {
        u.int_in_range(0..=n - 1)?
    } else {
        u.arbitrary()?
    })
}

impl<'a> Arbitrary<'a> for MainShape {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        use MainShape as S;
        Ok(match u.int_in_range(0..=25)? {
            0 => S::CreateIoEvent {
                id: u.arbitrary()?,
                space: space(u)?,
                addr: u.arbitrary()?,
                length: *u.choose(&[0, 1, 2, 3, 4, 8, 16])?,
                datamatch: u.arbitrary()?,
            },
            1 | 2 => S::CreateMemory {
                id: u.arbitrary()?,
                offset: if u.ratio(3, 4)? {
                    Addr(0)
                } else {
                    u.arbitrary()?
                },
                start: u.arbitrary()?,
                length: u.arbitrary()?,
                read_only: u.arbitrary()?,
                dirty_log: u.arbitrary()?,
            },
            3 => S::CreateIrqEvent {
                id: u.arbitrary()?,
                gsi: if u.ratio(7, 8)? {
                    u.int_in_range(0..=40)?
                } else {
                    u.arbitrary()?
                },
            },
            4 => S::CreateEmpty { id: u.arbitrary()? },
            5 | 6 => S::Destroy { id: u.arbitrary()? },
            7 => S::NewConnection,
            8 => S::GetShutdownEventfd,
            9 => S::CheckExtension(u.arbitrary()?),
            10 => u
                .choose(&[
                    S::GetSupportedCpuid,
                    S::GetEmulatedCpuid,
                    S::GetMsrIndexList,
                    S::GetNetConfig,
                ])?
                .clone(),
            11 | 12 => S::Reserve {
                space: space(u)?,
                start: u.arbitrary()?,
                length: u.arbitrary()?,
                async_write: u.arbitrary()?,
            },
            13 => S::SetIrq {
                irq: u.int_in_range(0..=5000)?,
                active: u.arbitrary()?,
            },
            14 => S::SetIrqRouting {
                routes: Count::gen(u, limits::MAX_IRQ_ROUTES)?,
                chip: u.int_in_range(0..=3)?,
                pin: u.int_in_range(0..=25)?,
                msi: u.arbitrary()?,
            },
            15 => S::GetState {
                set: set_value(u, 5)?,
            },
            16 => S::SetState {
                set: set_value(u, 5)?,
                image: u.arbitrary()?,
            },
            17 => S::SetIdentityMapAddr(u.arbitrary()?),
            18 => S::PauseVcpus {
                mask: u.arbitrary()?,
                user: u.arbitrary()?,
            },
            19 => S::GetVcpus {
                chunked: u.arbitrary()?,
            },
            20 => S::Start,
            21 => S::SetCallHint {
                space: space(u)?,
                address: u.arbitrary()?,
                on_write: u.arbitrary()?,
                hints: Count::gen(u, limits::MAX_CALL_HINT_DETAILS)?,
            },
            22 => S::DirtyLog { id: u.arbitrary()? },
            23 => S::Empty,
            24 => S::GetControlSocket,
            _ => S::Unknown(u.int_in_range(20..=200)?),
        })
    }
}

impl MainShape {
    /// Serializes the request.
    pub fn to_bytes(&self) -> Vec<u8> {
        use MainShape as S;
        if let S::Unknown(field) = self {
            // An unknown oneof member: tag (LEN), empty body.
            let mut v = Vec::new();
            let key = u64::from(*field) << 3 | 2;
            let mut k = key;
            while k >= 0x80 {
                v.push((k as u8) | 0x80);
                k >>= 7;
            }
            v.push(k as u8);
            v.push(0);
            return v;
        }
        let mut r = MainRequest::new();
        match self {
            S::CreateIoEvent {
                id,
                space,
                addr,
                length,
                datamatch,
            } => {
                let c = r.mut_create();
                c.id = id.0;
                let io = c.mut_io_event();
                io.space = EnumOrUnknown::from_i32(*space);
                io.address = addr.0;
                io.length = *length;
                io.datamatch = *datamatch;
            }
            S::CreateMemory {
                id,
                offset,
                start,
                length,
                read_only,
                dirty_log,
            } => {
                let c = r.mut_create();
                c.id = id.0;
                let m = c.mut_memory();
                m.offset = offset.0;
                m.start = start.0;
                m.length = length.0;
                m.read_only = *read_only;
                m.dirty_log = *dirty_log;
            }
            S::CreateIrqEvent { id, gsi } => {
                let c = r.mut_create();
                c.id = id.0;
                let i = c.mut_irq_event();
                i.irq_id = *gsi;
                i.resample = true;
            }
            S::CreateEmpty { id } => r.mut_create().id = id.0,
            S::Destroy { id } => r.mut_destroy().id = id.0,
            S::NewConnection => r.set_new_connection(Default::default()),
            S::GetShutdownEventfd => r.set_get_shutdown_eventfd(Default::default()),
            S::CheckExtension(e) => r.mut_check_extension().extension = *e,
            S::GetSupportedCpuid => r.set_get_supported_cpuid(Default::default()),
            S::GetEmulatedCpuid => r.set_get_emulated_cpuid(Default::default()),
            S::GetMsrIndexList => r.set_get_msr_index_list(Default::default()),
            S::GetNetConfig => r.set_get_net_config(Default::default()),
            S::Reserve {
                space,
                start,
                length,
                async_write,
            } => {
                let rr = r.mut_reserve_range();
                rr.space = EnumOrUnknown::from_i32(*space);
                rr.start = start.0;
                rr.length = length.0;
                rr.async_write = *async_write;
            }
            S::SetIrq { irq, active } => {
                let s = r.mut_set_irq();
                s.irq_id = *irq;
                s.active = *active;
            }
            S::SetIrqRouting {
                routes,
                chip,
                pin,
                msi,
            } => {
                let s = r.mut_set_irq_routing();
                for i in 0..routes.0 {
                    let mut route = main_request::set_irq_routing::Route::new();
                    route.irq_id = i as u32;
                    if *msi && i % 2 == 1 {
                        let m = route.mut_msi();
                        m.address = 0xfee0_0000;
                        m.data = i as u32;
                    } else if i == 3 && *chip == 3 {
                        // A route with neither member.
                    } else {
                        let c = route.mut_irqchip();
                        c.irqchip = *chip % 3;
                        c.pin = (*pin + i as u32) % 24;
                    }
                    s.routes.push(route);
                }
            }
            S::GetState { set } => r.mut_get_state().set = EnumOrUnknown::from_i32(*set),
            S::SetState { set, image } => {
                let size = VmStateKind::from_wire(*set).map_or(16, VmStateKind::size);
                let s = r.mut_set_state();
                s.set = EnumOrUnknown::from_i32(*set);
                s.state = image.bytes(size);
            }
            S::SetIdentityMapAddr(a) => r.mut_set_identity_map_addr().address = *a,
            S::PauseVcpus { mask, user } => {
                let p = r.mut_pause_vcpus();
                p.cpu_mask = *mask;
                p.user = *user;
            }
            S::GetVcpus { chunked } => r.mut_get_vcpus().accept_chunked_fds = *chunked,
            S::Start => r.set_start(Default::default()),
            S::GetControlSocket => r.set_get_control_socket(Default::default()),
            S::SetCallHint {
                space,
                address,
                on_write,
                hints,
            } => {
                let h = r.mut_set_call_hint();
                h.space = EnumOrUnknown::from_i32(*space);
                h.address = address.0;
                h.on_write = *on_write;
                for i in 0..hints.0 {
                    let mut d = main_request::set_call_hint::RegHint::new();
                    d.match_rax = i % 2 == 0;
                    d.rax = i as u64;
                    d.send_sregs = i % 3 == 0;
                    h.hints.push(d);
                }
            }
            S::DirtyLog { id } => r.mut_dirty_log().id = id.0,
            S::Empty | S::Unknown(_) => {}
        }
        r.write_to_bytes().unwrap_or_default()
    }
}

/// A generated main request with its descriptors and damage.
#[derive(Debug, Clone, Arbitrary)]
pub struct MainInput {
    pub shape: MainShape,
    pub fds: Fds,
    pub damage: Damage,
}

impl MainInput {
    /// Requests that take a memfd usually get one, sized to fit.
    pub fn fds(&self) -> (FdKind, u16) {
        let Fds(kind, arg) = self.fds;
        if let MainShape::CreateMemory { length, offset, .. } = &self.shape {
            if kind == FdKind::None || arg % 4 != 0 {
                let pages = offset.0.saturating_add(length.0).div_ceil(4096);
                let pages = u16::try_from(pages).unwrap_or(u16::MAX);
                // Mostly exactly enough, sometimes one page short.
                let pages = if arg % 5 == 1 {
                    pages.saturating_sub(1)
                } else {
                    pages
                };
                return (FdKind::SealedMemfd, pages);
            }
        }
        (kind, arg)
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = self.shape.to_bytes();
        self.damage.apply(&mut b);
        b
    }
}

/// A generated vcpu request.
#[derive(Debug, Clone)]
pub enum VcpuShape {
    Wait,
    Resume {
        data: Option<u16>,
        regs: Image,
        sregs: Image,
        debugregs: Image,
    },
    GetState {
        set: i32,
    },
    SetState {
        set: i32,
        image: Image,
    },
    GetMsrs {
        count: Count,
        base: u32,
    },
    SetMsrs {
        count: Count,
        base: u32,
    },
    SetCpuid {
        count: Count,
    },
    Shutdown,
    GetHypervCpuid,
    EnableCapability(u32),
    Empty,
    Garbage(Vec<u8>),
}

impl<'a> Arbitrary<'a> for VcpuShape {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        use VcpuShape as S;
        Ok(match u.int_in_range(0..=13)? {
            0 | 1 => S::Wait,
            2..=4 => S::Resume {
                data: if u.arbitrary()? {
                    Some(u.int_in_range(0..=300)?)
                } else {
                    None
                },
                regs: if u.ratio(1, 2)? {
                    Image::Empty
                } else {
                    u.arbitrary()?
                },
                sregs: if u.ratio(2, 3)? {
                    Image::Empty
                } else {
                    u.arbitrary()?
                },
                debugregs: if u.ratio(3, 4)? {
                    Image::Empty
                } else {
                    u.arbitrary()?
                },
            },
            5 => S::GetState {
                set: set_value(u, 8)?,
            },
            6 => S::SetState {
                set: set_value(u, 8)?,
                image: u.arbitrary()?,
            },
            7 => S::GetMsrs {
                count: Count::gen(u, limits::MAX_MSR_ENTRIES)?,
                base: *u.choose(&[0x10, 0xc000_0080, 0x4000_0000, 0x1ff0])?,
            },
            8 => S::SetMsrs {
                count: Count::gen(u, limits::MAX_MSR_ENTRIES)?,
                base: *u.choose(&[0x10, 0xc000_0080, 0x4000_0000, 0x1ff0])?,
            },
            9 => S::SetCpuid {
                count: Count::gen(u, limits::MAX_CPUID_ENTRIES)?,
            },
            10 => u
                .choose(&[S::Shutdown, S::GetHypervCpuid, S::Empty])?
                .clone(),
            11 => S::EnableCapability(*u.choose(&[123, 148, 0, 1, 999])?),
            _ => S::Garbage(u.arbitrary()?),
        })
    }
}

impl VcpuShape {
    pub fn to_bytes(&self) -> Vec<u8> {
        use VcpuShape as S;
        let mut r = VcpuRequest::new();
        match self {
            S::Wait => r.set_wait(Default::default()),
            S::Resume {
                data,
                regs,
                sregs,
                debugregs,
            } => {
                let res = r.mut_resume();
                if let Some(n) = data {
                    res.data = (0..*n).map(|i| i as u8 ^ 0xa5).collect();
                }
                res.regs = regs.bytes(VcpuStateKind::Regs.size());
                res.sregs = sregs.bytes(VcpuStateKind::Sregs.size());
                res.debugregs = debugregs.bytes(VcpuStateKind::Debugregs.size());
            }
            S::GetState { set } => r.mut_get_state().set = EnumOrUnknown::from_i32(*set),
            S::SetState { set, image } => {
                let size = VcpuStateKind::from_wire(*set).map_or(64, VcpuStateKind::size);
                let s = r.mut_set_state();
                s.set = EnumOrUnknown::from_i32(*set);
                s.state = image.bytes(size);
            }
            S::GetMsrs { count, base } => {
                r.mut_get_msrs().entry_indices = (0..count.0 as u32).map(|i| base + i).collect()
            }
            S::SetMsrs { count, base } => {
                let s = r.mut_set_msrs();
                for i in 0..count.0 as u32 {
                    let mut e = vcpu_request::MsrEntry::new();
                    e.index = base + i;
                    e.data = u64::from(i) * 3;
                    s.entries.push(e);
                }
            }
            S::SetCpuid { count } => {
                let s = r.mut_set_cpuid();
                for i in 0..count.0 as u32 {
                    let mut e = plugin_proto::CpuidEntry::new();
                    e.function = i;
                    e.has_index = i % 2 == 0;
                    e.index = i;
                    s.entries.push(e);
                }
            }
            S::Shutdown => r.set_shutdown(Default::default()),
            S::GetHypervCpuid => r.set_get_hyperv_cpuid(Default::default()),
            S::EnableCapability(c) => r.mut_enable_capability().capability = *c,
            S::Empty => {}
            S::Garbage(g) => return g.clone(),
        }
        r.write_to_bytes().unwrap_or_default()
    }
}

/// A generated vcpu request with damage.
#[derive(Debug, Clone, Arbitrary)]
pub struct VcpuInput {
    pub shape: VcpuShape,
    pub damage: Damage,
}

impl VcpuInput {
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = self.shape.to_bytes();
        self.damage.apply(&mut b);
        b
    }
}

/// A generated exit (the wait reason a vcpu delivers).
#[derive(Debug, Clone, Copy, Arbitrary)]
pub enum ExitShape {
    IoRead {
        mmio: bool,
        addr: u16,
        size: u16,
    },
    IoWrite {
        mmio: bool,
        addr: u16,
        size: u8,
        value: u64,
    },
    AsyncWrite {
        mmio: bool,
        addr: u16,
        size: u8,
        value: u64,
    },
    User(u64),
    HypervCall {
        input: u64,
        p0: u64,
        p1: u64,
    },
    HypervSynic {
        msr: u32,
        control: u64,
    },
}

impl ExitShape {
    /// The wait reason as the host builds it.
    pub fn to_wait(self) -> vcpu_response::Wait {
        use vmm::runtime::vcpu::io_wait;
        use vmm::vm::Space;
        let sp = |mmio: bool| if mmio { Space::Mmio } else { Space::Ioport };
        let mut w = vcpu_response::Wait::new();
        match self {
            ExitShape::IoRead { mmio, addr, size } => {
                let len = if mmio {
                    usize::from(size % 8) + 1
                } else {
                    usize::from(size % 300) + 1
                };
                w.set_io(io_wait(
                    sp(mmio),
                    u64::from(addr),
                    false,
                    &vec![0; len],
                    false,
                ));
            }
            ExitShape::IoWrite {
                mmio,
                addr,
                size,
                value,
            }
            | ExitShape::AsyncWrite {
                mmio,
                addr,
                size,
                value,
            } => {
                let len = usize::from(size % 16) + 1;
                let bytes: Vec<u8> = value
                    .to_le_bytes()
                    .iter()
                    .cycle()
                    .take(len)
                    .copied()
                    .collect();
                let no_resume = matches!(self, ExitShape::AsyncWrite { .. });
                w.set_io(io_wait(sp(mmio), u64::from(addr), true, &bytes, no_resume));
            }
            ExitShape::User(user) => w.mut_user().user = user,
            ExitShape::HypervCall { input, p0, p1 } => {
                let c = w.mut_hyperv_call();
                c.input = input;
                c.params0 = p0;
                c.params1 = p1;
            }
            ExitShape::HypervSynic { msr, control } => {
                let s = w.mut_hyperv_synic();
                s.msr = msr;
                s.control = control;
            }
        }
        w
    }
}

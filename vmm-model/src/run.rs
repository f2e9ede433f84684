//! A scripted vcpu run handle ([`ScriptedRun`], implementing
//! [`vmm::vm::VcpuRun`]) and a scripted plugin end of a vcpu channel
//! ([`ScriptedIo`], implementing [`vmm::runtime::vcpu::VcpuIo`]), so the real
//! exit routing and run loop run without KVM.
//!
//! The run handle behaves as KVM does where the loop depends on it: while
//! `immediate_exit` is set it returns `Interrupted` without entering the
//! guest, and the data a guest read is completed with (and a hypercall's
//! result) is taken when the guest is entered again.

use std::collections::VecDeque;

use nix::errno::Errno;
use plugin_proto::protobuf::Message;
use plugin_proto::{vcpu_request, VcpuRequest, VcpuResponse};
use vmm::runtime::vcpu::{ServiceError, VcpuIo};
use vmm::vm::{VcpuRun, VmExit};

/// One exit of the script, with owned data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    IoOut(u16, Vec<u8>),
    /// A read of `len` bytes.
    IoIn(u16, usize),
    MmioWrite(u64, Vec<u8>),
    MmioRead(u64, usize),
    HypervHcall {
        input: u64,
        params: [u64; 2],
    },
    HypervSynic {
        msr: u32,
        control: u64,
        evt_page: u64,
        msg_page: u64,
    },
    HypervUnknown(u32),
    Hlt,
    Shutdown,
    InternalError {
        suberror: u32,
        data: Vec<u64>,
    },
    FailEntry {
        hardware_reason: u64,
        cpu: u32,
    },
    Interrupted,
    Spurious,
    Unknown(u32),
    /// `KVM_RUN` itself fails with this errno.
    Fails(Errno),
}

/// What the guest got from an exit that returns a value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Completed {
    /// The bytes of a port or MMIO read.
    Read(Vec<u8>),
    /// The result of a hypercall.
    Hypercall(u64),
}

/// Byte the read buffers hold before the host completes them, so a read the
/// host forgot to fill shows.
pub const UNFILLED: u8 = 0xa5;

/// A vcpu run handle that plays a script of exits.
#[derive(Default)]
pub struct ScriptedRun {
    script: VecDeque<Exit>,
    immediate_exit: bool,
    /// The run area of the current exit.
    buffer: Vec<u8>,
    hcall_result: u64,
    pending: Option<fn(&ScriptedRun) -> Completed>,
    /// What the guest got, in order.
    pub completed: Vec<Completed>,
    /// `run` calls that entered the guest (not those `immediate_exit` cut).
    pub entries: usize,
    /// `run` calls cut short by `immediate_exit`.
    pub interrupted: usize,
}

impl ScriptedRun {
    pub fn new(script: impl IntoIterator<Item = Exit>) -> Self {
        ScriptedRun {
            script: script.into_iter().collect(),
            ..Default::default()
        }
    }

    /// Exits not played yet.
    pub fn remaining(&self) -> usize {
        self.script.len()
    }
}

impl VcpuRun for ScriptedRun {
    fn run(&mut self) -> vmm::vm::Result<VmExit<'_>> {
        if let Some(take) = self.pending.take() {
            let c = take(self);
            self.completed.push(c);
        }
        if self.immediate_exit {
            self.interrupted += 1;
            return Ok(VmExit::Interrupted);
        }
        self.entries += 1;
        // An exhausted script: the guest is gone.
        let exit = self
            .script
            .pop_front()
            .unwrap_or(Exit::Fails(Errno::ENODEV));
        Ok(match exit {
            Exit::IoOut(port, data) => {
                self.buffer = data;
                VmExit::IoOut {
                    port,
                    data: &self.buffer,
                }
            }
            Exit::IoIn(port, len) => {
                self.buffer = vec![UNFILLED; len];
                self.pending = Some(|r| Completed::Read(r.buffer.clone()));
                VmExit::IoIn {
                    port,
                    data: &mut self.buffer,
                }
            }
            Exit::MmioWrite(address, data) => {
                self.buffer = data;
                VmExit::MmioWrite {
                    address,
                    data: &self.buffer,
                }
            }
            Exit::MmioRead(address, len) => {
                self.buffer = vec![UNFILLED; len];
                self.pending = Some(|r| Completed::Read(r.buffer.clone()));
                VmExit::MmioRead {
                    address,
                    data: &mut self.buffer,
                }
            }
            Exit::HypervHcall { input, params } => {
                self.hcall_result = u64::MAX;
                self.pending = Some(|r| Completed::Hypercall(r.hcall_result));
                VmExit::HypervHcall {
                    input,
                    params,
                    result: &mut self.hcall_result,
                }
            }
            Exit::HypervSynic {
                msr,
                control,
                evt_page,
                msg_page,
            } => VmExit::HypervSynic {
                msr,
                control,
                evt_page,
                msg_page,
            },
            Exit::HypervUnknown(t) => VmExit::HypervUnknown(t),
            Exit::Hlt => VmExit::Hlt,
            Exit::Shutdown => VmExit::Shutdown,
            Exit::InternalError { suberror, data } => {
                let mut words = [0u64; 16];
                let n = data.len().min(16);
                words[..n].copy_from_slice(&data[..n]);
                VmExit::InternalError {
                    suberror,
                    ndata: n as u32,
                    data: words,
                }
            }
            Exit::FailEntry {
                hardware_reason,
                cpu,
            } => VmExit::FailEntry {
                hardware_reason,
                cpu,
            },
            Exit::Interrupted => VmExit::Interrupted,
            Exit::Spurious => VmExit::Spurious,
            Exit::Unknown(r) => VmExit::Unknown(r),
            Exit::Fails(e) => return Err(e),
        })
    }

    fn set_immediate_exit(&mut self, on: bool) {
        self.immediate_exit = on;
    }
}

/// The plugin end of a vcpu channel: hands out scripted requests in order,
/// keeps every response the host sent. An exhausted script reads as a
/// closed channel.
#[derive(Default)]
pub struct ScriptedIo {
    requests: VecDeque<Vec<u8>>,
    current: Vec<u8>,
    /// Every response, decoded, in order.
    pub responses: Vec<VcpuResponse>,
    /// Once the script is used up, reads fail as a corrupted fast channel
    /// does (instead of as a closed channel).
    pub corrupt_when_empty: bool,
}

impl ScriptedIo {
    pub fn new(requests: impl IntoIterator<Item = VcpuRequest>) -> Self {
        ScriptedIo {
            requests: requests
                .into_iter()
                .map(|r| r.write_to_bytes().expect("encode a request"))
                .collect(),
            ..Default::default()
        }
    }

    /// Requests not read yet.
    pub fn remaining(&self) -> usize {
        self.requests.len()
    }
}

impl VcpuIo for ScriptedIo {
    fn read_request(&mut self) -> Result<&[u8], ServiceError> {
        self.current = match self.requests.pop_front() {
            Some(r) => r,
            None if self.corrupt_when_empty => {
                return Err(ServiceError::FastChannel(
                    plugin_proto::shm::ShmError::Corrupt,
                ))
            }
            None => return Err(ServiceError::Closed),
        };
        Ok(&self.current)
    }

    fn write_response(&mut self, body: &[u8]) -> Result<(), ServiceError> {
        let r = VcpuResponse::parse_from_bytes(body).map_err(ServiceError::Decode)?;
        self.responses.push(r);
        Ok(())
    }
}

/// `Wait`, as a plugin asks for the next event.
pub fn wait() -> VcpuRequest {
    let mut r = VcpuRequest::new();
    r.set_wait(Default::default());
    r
}

/// `Resume` with read or hypercall data.
pub fn resume(data: &[u8]) -> VcpuRequest {
    let mut res = vcpu_request::Resume::new();
    res.data = data.to_vec();
    let mut r = VcpuRequest::new();
    r.set_resume(res);
    r
}

/// `Resume` that also sets the general registers (deferred set).
pub fn resume_with_regs(regs: &[u8]) -> VcpuRequest {
    let mut res = vcpu_request::Resume::new();
    res.regs = regs.to_vec();
    let mut r = VcpuRequest::new();
    r.set_resume(res);
    r
}

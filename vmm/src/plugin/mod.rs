//! Running a VM driven by a plugin: startup, the main loop (plugin exit,
//! stderr, main connections, vcpu thread exits), and teardown.

pub mod fastpath;
pub mod inflight;
pub mod main_handler;
pub mod objects;
pub mod output;
pub mod panic;
pub mod process;
pub mod vcpu;

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::{debug, error, info, warn};
use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{pipe2, Pid};
use plugin_proto::framing::{self, FramingError};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::Killable;

use self::inflight::InFlight;
use self::main_handler::{HostServices, MainState, NetConfig};
use self::objects::SharedExitConfig;
use self::process::{Launch, Plugin};
use self::vcpu::{HostChannel, Servicer, StartBarrier, VcpuControl, VcpuShared};
use crate::jail::{self, JailConfig};
use crate::limits;
use crate::net::Tap;
use crate::vm::{borrow_fd, KvmVm, VmError};

/// How long the plugin may take to exit once the VM is shutting down.
pub const DYING_GRACE: Duration = Duration::from_millis(1000);

/// Pipe capacity requested for vcpu channels.
const PIPE_CAPACITY: i32 = 0x40000;

const TOKEN_SIGNAL: u64 = 0;
const TOKEN_STDERR: u64 = 1;
const TOKEN_VCPU_EXIT: u64 = 2;
const TOKEN_SECCOMP: u64 = 3;
const FIRST_CONNECTION_TOKEN: u64 = 16;

/// What `run` needs to know.
pub struct RunConfig {
    pub plugin: PathBuf,
    pub args: Vec<String>,
    /// The plugin's environment besides CROSVM_SOCKET (nothing else of the
    /// host's is passed).
    pub env: Vec<(String, std::ffi::OsString)>,
    pub vcpus: usize,
    pub kvm_path: PathBuf,
    pub vcpu_cgroup_path: Option<PathBuf>,
    /// Tap devices, in creation order; the first is the plugin's.
    pub nets: Vec<crate::cli::NetSpec>,
    /// Offer the shared-memory vcpu channel to plugins that ask for it.
    pub fast_channel: bool,
    /// Bounds on the guest memory the plugin registers.
    pub memory_limits: limits::GuestMemoryLimits,
    /// `None`: `--disable-sandbox`.
    pub jail: Option<JailConfig>,
}

/// Why a run failed. `Display` of each names the cause for the user.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot set up signal handling")]
    Signals(#[source] Errno),
    #[error("cannot create {what}")]
    Resource {
        what: &'static str,
        #[source]
        source: Errno,
    },
    #[error("cannot set up the VM")]
    Vm(#[source] VmError),
    #[error("cannot set up the network")]
    Net(#[source] crate::net::NetError),
    #[error("{requested} vcpus requested but KVM allows at most {max}")]
    TooManyVcpus { requested: usize, max: usize },
    #[error("cannot start the plugin")]
    Spawn(#[source] process::ProcessError),
    #[error("cannot drop the host's capabilities")]
    Caps(#[source] jail::caps::CapsError),
    #[error("the plugin was stopped by the seccomp filter: it called {0}")]
    Seccomp(String),
    #[error("cannot add vcpu threads to the cgroup {path}")]
    Cgroup {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("waiting for events failed")]
    Wait(#[source] Errno),
    #[error("the plugin exited with status {0}")]
    PluginExit(i32),
    #[error("the plugin panicked: {message}; it {end}")]
    PluginPanicked { message: String, end: String },
    #[error("the plugin was killed by signal {signal}{detail}")]
    PluginSignaled {
        signal: String,
        detail: &'static str,
    },
    #[error("the plugin did not exit within {0:?} of the VM shutting down; it was killed")]
    PluginTimeout(Duration),
    #[error(
        "the plugin closed every connection before starting the VM and did not exit; it was killed"
    )]
    PluginAbandoned,
    #[error("an unexpected child process {pid} ended ({status})")]
    OtherChild { pid: i32, status: String },
    #[error("vmm was asked to stop by signal {0}")]
    Interrupted(String),
    #[error("vcpu {id} stopped the VM: {message}")]
    VcpuFailed { id: u32, message: String },
}

fn resource(what: &'static str) -> impl FnOnce(Errno) -> RunError {
    move |source| RunError::Resource { what, source }
}

/// One vcpu's channel: the host's ends and the plugin's ends.
struct Channel {
    host: Arc<HostChannel>,
    /// [request-pipe write end, response-pipe read end].
    plugin: [OwnedFd; 2],
    /// The shared-memory channel's memfd, when it is offered.
    fast: Option<OwnedFd>,
}

fn new_channel(fast: bool) -> Result<Channel, RunError> {
    let fast = if fast {
        Some(
            plugin_proto::shm::create_memfd().map_err(|e| RunError::Resource {
                what: "a fast vcpu channel",
                source: match e {
                    plugin_proto::shm::ShmError::Create(e)
                    | plugin_proto::shm::ShmError::Map(e) => e,
                    _ => Errno::EINVAL,
                },
            })?,
        )
    } else {
        None
    };
    let (req_r, req_w) = pipe2(OFlag::O_CLOEXEC).map_err(resource("a vcpu pipe"))?;
    let (resp_r, resp_w) = pipe2(OFlag::O_CLOEXEC).map_err(resource("a vcpu pipe"))?;
    for fd in [&req_w, &resp_w] {
        if let Err(e) = fcntl(fd, FcntlArg::F_SETPIPE_SZ(PIPE_CAPACITY)) {
            debug!("cannot raise the vcpu pipe capacity: {e}");
        }
    }
    Ok(Channel {
        host: Arc::new(HostChannel {
            request_read: req_r,
            response_write: resp_w,
        }),
        plugin: [req_w, resp_r],
        fast,
    })
}

/// The host resources the main request handler sees.
struct Services<'a> {
    channels: &'a [Channel],
    taps: &'a [Tap],
    controls: &'a [Arc<VcpuControl>],
    threads: &'a [JoinHandle<()>],
    shutdown: &'a EventFd,
    connections: usize,
    in_flight: &'a InFlight,
}

impl HostServices for Services<'_> {
    fn vcpu_count(&self) -> usize {
        self.channels.len()
    }

    fn vcpu_fds(&self, i: usize) -> [BorrowedFd<'_>; 2] {
        let [a, b] = &self.channels[i].plugin;
        [a.as_fd(), b.as_fd()]
    }

    fn fast_channel_fd(&self, i: usize) -> Option<BorrowedFd<'_>> {
        self.channels[i].fast.as_ref().map(|f| f.as_fd())
    }

    fn shutdown_eventfd(&self) -> BorrowedFd<'_> {
        borrow_fd(self.shutdown)
    }

    fn net_config(&self) -> Result<Option<NetConfig<'_>>, Errno> {
        let Some(tap) = self.taps.first() else {
            return Ok(None);
        };
        let a = tap.addresses()?;
        Ok(Some(NetConfig {
            mac: a.mac,
            ip: a.ip,
            netmask: a.netmask,
            fd: tap.fd(),
        }))
    }

    fn pause_vcpus(&self, mask: u64, user: u64) {
        for (i, control) in self.controls.iter().enumerate().take(64) {
            if mask & (1u64 << i) == 0 {
                continue;
            }
            control.request_pause(user);
            if let Some(t) = self.threads.get(i) {
                if let Err(e) = t.kill(vcpu::kick_signal()) {
                    warn!("cannot kick vcpu {i}: {e}");
                }
            }
        }
    }

    fn connection_count(&self) -> usize {
        self.connections
    }

    fn may_send_fds(&self, n: usize) -> bool {
        self.in_flight.fits(n)
    }
}

/// Forwards the plugin's stderr into the log, line by line.
struct StderrForwarder {
    fd: OwnedFd,
    carry: Vec<u8>,
    open: bool,
    panic: panic::PanicWatch,
}

impl StderrForwarder {
    fn emit(line: &[u8]) {
        // Control characters (a `\r` that would rewrite the prefix, escape
        // sequences) are shown escaped, never sent to the terminal.
        error!("plugin: {}", output::escape(line));
    }

    /// Reads what is available; returns false once the pipe hung up.
    fn drain(&mut self) -> bool {
        let mut buf = [0u8; 4096];
        loop {
            match nix::unistd::read(self.fd.as_fd(), &mut buf) {
                Ok(0) => {
                    self.flush();
                    self.open = false;
                    return false;
                }
                Ok(n) => {
                    self.carry.extend_from_slice(&buf[..n]);
                    while let Some(pos) = self.carry.iter().position(|&b| b == b'\n') {
                        self.panic.line(&output::escape(&self.carry[..pos]));
                        Self::emit(&self.carry[..pos]);
                        self.carry.drain(..=pos);
                    }
                    if self.carry.len() >= limits::MAX_STDERR_LINE {
                        self.flush();
                    }
                }
                Err(Errno::EINTR) => continue,
                Err(_) => return true,
            }
        }
    }

    fn flush(&mut self) {
        if !self.carry.is_empty() {
            self.panic.line(&output::escape(&self.carry));
            Self::emit(&self.carry);
            self.carry.clear();
        }
    }
}

/// How the plugin process ended.
enum PluginEnd {
    Exited(i32),
    Signaled(Signal),
}

struct Host {
    config: RunConfig,
    vm: KvmVm,
    state: MainState,
    epoll: Epoll,
    signals: SignalFd,
    stderr: StderrForwarder,
    plugin: Plugin,
    plugin_end: Option<PluginEnd>,
    channels: Vec<Channel>,
    taps: Vec<Tap>,
    controls: Vec<Arc<VcpuControl>>,
    shared: Arc<VcpuShared>,
    threads: Vec<JoinHandle<()>>,
    vcpus_failed: bool,
    shutdown: EventFd,
    connections: HashMap<u64, OwnedFd>,
    in_flight: InFlight,
    stdout_thread: Option<JoinHandle<()>>,
    next_token: u64,
    abandoned: bool,
    dying_since: Option<Instant>,
    errors: Vec<RunError>,
    recv_buf: Vec<u8>,
    cmsg_buf: Vec<u8>,
    send_buf: Vec<u8>,
}

/// Runs the VM until the plugin exits; `Ok` only for a clean run with plugin
/// exit status 0.
pub fn run(config: RunConfig) -> Result<(), RunError> {
    crate::record::init_from_env();
    // 1. Signals: SIGCHLD (plugin exit) and SIGINT/SIGTERM (user stop) are
    // read from a signalfd; blocking them here also keeps them off the vcpu
    // threads created later.
    let mut mask = SigSet::empty();
    mask.add(Signal::SIGCHLD);
    mask.add(Signal::SIGINT);
    mask.add(Signal::SIGTERM);
    mask.thread_block().map_err(RunError::Signals)?;
    let signals = SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
        .map_err(RunError::Signals)?;

    // 2. The plugin's stderr.
    let (stderr_r, stderr_w) = pipe2(OFlag::O_CLOEXEC).map_err(resource("the stderr pipe"))?;
    fcntl(&stderr_r, FcntlArg::F_SETFL(OFlag::O_NONBLOCK)).map_err(resource("the stderr pipe"))?;
    // The plugin's stdout: a pipe the host copies to its own stdout, so the
    // plugin never holds vmm's stdout (a terminal it could read, a file it
    // could reopen and truncate, flags shared with the shell).
    let (stdout_r, stdout_w) = pipe2(OFlag::O_CLOEXEC).map_err(resource("the stdout pipe"))?;

    // 3. Taps, then the VM: irqchip and PIT, no memory, no vcpus yet.
    let taps = crate::net::open_taps(&config.nets).map_err(RunError::Net)?;
    for t in &taps {
        info!("tap device {}", t.name());
    }
    let kvm_path = config.kvm_path.to_string_lossy().into_owned();
    let vm = KvmVm::new(&kvm_path).map_err(RunError::Vm)?;
    let max = vm.max_vcpus();
    if config.vcpus > max {
        return Err(RunError::TooManyVcpus {
            requested: config.vcpus,
            max,
        });
    }

    // 4. Channels.
    let (host_sock, plugin_sock) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(resource("the plugin socket"))?;
    fcntl(&host_sock, FcntlArg::F_SETFL(OFlag::O_NONBLOCK))
        .map_err(resource("the plugin socket"))?;
    let channels = (0..config.vcpus)
        .map(|_| new_channel(config.fast_channel))
        .collect::<Result<Vec<_>, _>>()?;

    // 5. The plugin, then the shutdown eventfd (so the plugin cannot inherit it).
    let launch = Launch {
        path: &config.plugin,
        args: &config.args,
        env: &config.env,
        socket: &plugin_sock,
        stdout: stdout_w,
        stderr: stderr_w,
    };
    let plugin = match &config.jail {
        Some(j) => process::spawn_jailed(launch, j),
        None => process::spawn_unjailed(launch),
    }
    .map_err(RunError::Spawn)?;
    drop(plugin_sock);
    info!(
        "started plugin {} (pid {})",
        config.plugin.display(),
        plugin.pid
    );
    let shutdown = main_handler::new_eventfd().map_err(resource("the shutdown eventfd"))?;
    let stdout_thread = output::forward_stdout(stdout_r).map_err(|e| RunError::Resource {
        what: "the stdout forwarding thread",
        source: Errno::from_raw(e.raw_os_error().unwrap_or(libc::EAGAIN)),
    })?;
    // 6. The jail is built: the host needs no capabilities any more.
    jail::caps::drop_host_capabilities().map_err(RunError::Caps)?;

    let exit_config = Arc::new(SharedExitConfig::default());
    let shared = Arc::new(VcpuShared {
        kill: Default::default(),
        barrier: StartBarrier::new(config.vcpus),
        exit_config: Arc::clone(&exit_config),
        exited: EventFd::new(libc::EFD_CLOEXEC | libc::EFD_NONBLOCK).map_err(|e| {
            RunError::Resource {
                what: "the vcpu exit event",
                source: Errno::from_raw(e.raw_os_error().unwrap_or(libc::EINVAL)),
            }
        })?,
        failure: Default::default(),
    });

    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(resource("the epoll set"))?;
    let mut state = MainState::new(exit_config);
    state.memory_limits = config.memory_limits;
    let in_flight = InFlight::new(limits::fds_in_flight_budget(config.vcpus));
    let mut host = Host {
        controls: (0..config.vcpus).map(|_| Arc::default()).collect(),
        config,
        vm,
        state,
        epoll,
        signals,
        stderr: StderrForwarder {
            fd: stderr_r,
            carry: Vec::new(),
            open: true,
            panic: Default::default(),
        },
        plugin,
        plugin_end: None,
        channels,
        taps,
        shared,
        threads: Vec::new(),
        vcpus_failed: false,
        shutdown,
        connections: HashMap::new(),
        in_flight,
        stdout_thread: Some(stdout_thread),
        next_token: FIRST_CONNECTION_TOKEN,
        abandoned: false,
        dying_since: None,
        errors: Vec::new(),
        recv_buf: vec![0; limits::MAX_MAIN_REQUEST],
        cmsg_buf: vec![0; framing::full_cmsg_space()],
        send_buf: Vec::with_capacity(4096),
    };
    host.watch(host.signals.as_fd(), TOKEN_SIGNAL)?;
    host.watch(host.stderr.fd.as_fd(), TOKEN_STDERR)?;
    host.watch(borrow_fd(&host.shared.exited), TOKEN_VCPU_EXIT)?;
    if let Some(j) = &host.plugin.jail {
        host.watch(j.seccomp_fd(), TOKEN_SECCOMP)?;
    }
    host.add_connection(host_sock)?;

    host.main_loop();
    host.teardown()
}

impl Host {
    fn watch(&self, fd: BorrowedFd<'_>, token: u64) -> Result<(), RunError> {
        self.epoll
            .add(fd, EpollEvent::new(EpollFlags::EPOLLIN, token))
            .map_err(resource("an epoll registration"))
    }

    fn add_connection(&mut self, fd: OwnedFd) -> Result<(), RunError> {
        let token = self.next_token;
        self.next_token += 1;
        self.watch(fd.as_fd(), token)?;
        self.connections.insert(token, fd);
        Ok(())
    }

    fn drop_connection(&mut self, token: u64) {
        if let Some(fd) = self.connections.remove(&token) {
            let _ = self.epoll.delete(&fd);
            self.in_flight.dropped(token, fd);
        }
        if self.connections.is_empty() && !self.state.started && self.dying_since.is_none() {
            // Nothing can start the VM any more. If the plugin exits now, its
            // exit status tells how the run went; if it lingers, this is why
            // it gets killed.
            self.abandoned = true;
            self.enter_dying("the plugin closed its last connection before starting the VM");
        }
    }

    /// Starts the shutdown: tells the plugin through the shutdown eventfd,
    /// stops the vcpus, and gives the plugin `DYING_GRACE` to exit.
    fn enter_dying(&mut self, why: &str) {
        if self.dying_since.is_some() {
            return;
        }
        info!("shutting down: {why}");
        self.dying_since = Some(Instant::now());
        self.signal_shutdown_eventfd();
        self.stop_vcpus();
    }

    /// Adds 1 to the shutdown eventfd without ever blocking the main loop.
    /// The plugin shares the eventfd's open file description (it received
    /// it by `SCM_RIGHTS`): it can set the counter to its maximum, so that
    /// a write blocks until someone reads, and it can clear `O_NONBLOCK` on
    /// the description at any time. So the write is made on a thread of its
    /// own: if it blocks, only that thread waits (until the plugin reads or
    /// vmm exits), and the main loop goes on handling signals and the
    /// shutdown.
    fn signal_shutdown_eventfd(&self) {
        let evt = match self.shutdown.try_clone() {
            Ok(e) => e,
            Err(e) => {
                error!("cannot signal the shutdown eventfd: {e}");
                return;
            }
        };
        let spawned = std::thread::Builder::new()
            .name("vmm_shutdown".into())
            .spawn(move || {
                if let Err(e) = evt.write(1) {
                    error!("cannot signal the shutdown eventfd: {e}");
                }
            });
        if let Err(e) = spawned {
            error!("cannot signal the shutdown eventfd: {e}");
        }
    }

    fn stop_vcpus(&self) {
        self.shared.kill.store(true, Ordering::Release);
        self.shared.barrier.cancel();
        for t in &self.threads {
            if !t.is_finished() {
                let _ = t.kill(vcpu::kick_signal());
            }
        }
    }

    fn main_loop(&mut self) {
        let mut events = vec![EpollEvent::empty(); 64];
        while self.plugin_end.is_none() {
            let timeout = match self.dying_since {
                None => EpollTimeout::NONE,
                Some(t) => {
                    let left = DYING_GRACE.saturating_sub(t.elapsed());
                    if left.is_zero() {
                        return;
                    }
                    EpollTimeout::try_from(left.as_millis().max(1) as u64)
                        .unwrap_or(EpollTimeout::NONE)
                }
            };
            let n = match self.epoll.wait(&mut events, timeout) {
                Ok(n) => n,
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    self.errors.push(RunError::Wait(e));
                    return;
                }
            };
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_SIGNAL => self.on_signals(),
                    TOKEN_STDERR => {
                        if !self.stderr.drain() {
                            let _ = self.epoll.delete(&self.stderr.fd);
                        }
                    }
                    TOKEN_VCPU_EXIT => {
                        let _ = self.shared.exited.read();
                        self.take_vcpu_failure();
                        self.enter_dying("a vcpu stopped");
                    }
                    TOKEN_SECCOMP => self.on_seccomp(ev.events()),
                    token => self.serve(token),
                }
                if self.plugin_end.is_some() {
                    return;
                }
            }
            if self.state.started
                && self.threads.is_empty()
                && !self.vcpus_failed
                && self.dying_since.is_none()
            {
                if let Err(e) = self.start_vcpus() {
                    error!("cannot start the vcpus: {}", crate::error_chain(&e));
                    self.vcpus_failed = true;
                    self.errors.push(e);
                    self.enter_dying("the vcpus could not be started");
                }
            }
        }
    }

    /// A vcpu that stopped the VM for a reason that makes the run fail
    /// (e.g. a corrupted fast channel) left it in the shared state; it
    /// becomes the run's error, reported once.
    fn take_vcpu_failure(&mut self) {
        let failure = self
            .shared
            .failure
            .lock()
            .map(|mut f| f.take())
            .unwrap_or(None);
        if let Some((id, message)) = failure {
            if !self
                .errors
                .iter()
                .any(|e| matches!(e, RunError::VcpuFailed { .. }))
            {
                self.errors.push(RunError::VcpuFailed { id, message });
            }
        }
    }

    fn on_signals(&mut self) {
        while let Ok(Some(info)) = self.signals.read_signal() {
            let signo = info.ssi_signo as i32;
            if signo == libc::SIGINT || signo == libc::SIGTERM {
                let name =
                    Signal::try_from(signo).map_or_else(|_| signo.to_string(), |s| s.to_string());
                if !self
                    .errors
                    .iter()
                    .any(|e| matches!(e, RunError::Interrupted(_)))
                {
                    self.errors.push(RunError::Interrupted(name));
                }
                self.enter_dying("interrupted");
            }
        }
        self.reap();
    }

    /// A system call stopped by the jail's filter: record it and kill the
    /// plugin (unless `--seccomp-log-failures` let it through).
    fn on_seccomp(&mut self, events: EpollFlags) {
        let Some(j) = &mut self.plugin.jail else {
            return;
        };
        if !events.contains(EpollFlags::EPOLLIN) {
            // Hang-up: nobody uses the filter any more.
            let _ = self.epoll.delete(j.seccomp_fd());
            return;
        }
        if let Some(what) = j.on_seccomp() {
            info!("seccomp: the plugin called {what}; killing it");
            if !self
                .errors
                .iter()
                .any(|e| matches!(e, RunError::Seccomp(_)))
            {
                self.errors.insert(0, RunError::Seccomp(what));
            }
            if let Err(e) = self.plugin.kill() {
                error!("cannot kill the plugin: {e}");
            }
        }
    }

    /// Collects every ended child; the plugin's end leaves the main loop.
    fn reap(&mut self) {
        loop {
            let status = waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG));
            let status = match status {
                Ok(s) if s.pid() == Some(self.plugin.pid) => Ok(self.plugin.end_status(s)),
                other => other,
            };
            match status {
                Ok(WaitStatus::Exited(pid, code)) if pid == self.plugin.pid => {
                    info!("plugin exited with status {code}");
                    self.plugin_end = Some(PluginEnd::Exited(code));
                }
                Ok(WaitStatus::Signaled(pid, sig, _)) if pid == self.plugin.pid => {
                    info!("plugin killed by {sig}");
                    self.plugin_end = Some(PluginEnd::Signaled(sig));
                }
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
                Ok(status) => {
                    if let Some(pid) = status.pid() {
                        self.errors.push(RunError::OtherChild {
                            pid: pid.as_raw(),
                            status: format!("{status:?}"),
                        });
                        self.enter_dying("an unexpected child process ended");
                    }
                }
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    self.errors.push(RunError::Wait(e));
                    return;
                }
            }
        }
    }

    /// Reads and answers one packet of connection `token`.
    fn serve(&mut self, token: u64) {
        // The plugin's main runs: drop the jail's start-up allowances.
        if let Some(j) = &mut self.plugin.jail {
            j.end_startup();
        }
        let Some(fd) = self.connections.get(&token) else {
            return;
        };
        self.in_flight.refresh(&self.connections);
        let packet = match framing::recv_packet_with(
            fd.as_fd(),
            &mut self.recv_buf,
            &mut self.cmsg_buf,
            1,
        ) {
            Ok(p) => p,
            Err(FramingError::Recv(Errno::EAGAIN)) => return,
            Err(FramingError::Closed) => {
                debug!("plugin closed a connection");
                if let Some(r) = crate::record::recorder() {
                    r.connection_closed();
                }
                self.drop_connection(token);
                return;
            }
            Err(e) => {
                warn!("dropping a plugin connection: {}", crate::error_chain(&e));
                self.drop_connection(token);
                return;
            }
        };
        if let Some(r) = crate::record::recorder() {
            r.main_request(
                &self.recv_buf[..packet.len],
                &packet.fds,
                packet.fds_truncated,
            );
        }
        let services = Services {
            channels: &self.channels,
            taps: &self.taps,
            controls: &self.controls,
            threads: &self.threads,
            shutdown: &self.shutdown,
            connections: self.connections.len(),
            in_flight: &self.in_flight,
        };
        let (conn, traced) = (token - FIRST_CONNECTION_TOKEN, crate::trace::main_begin());
        let reply = match main_handler::handle(
            &mut self.state,
            &self.vm,
            &services,
            &self.recv_buf[..packet.len],
            packet.fds,
            packet.fds_truncated,
        ) {
            Ok(r) => r,
            Err(e) => {
                crate::trace::main_refused(conn, traced, &self.recv_buf[..packet.len], &e);
                warn!("dropping a plugin connection: {}", crate::error_chain(&e));
                self.drop_connection(token);
                return;
            }
        };
        if reply.response.errno != 0 {
            debug!(
                "request failed: {}",
                Errno::from_raw(reply.response.errno).desc()
            );
        }
        let Some(fd) = self.connections.get(&token) else {
            return;
        };
        let n_fds = reply.fds.len() + reply.follow_ups.iter().map(|(_, f)| f.len()).sum::<usize>();
        crate::trace::main_end(
            conn,
            traced,
            &self.recv_buf[..packet.len],
            &reply.response,
            n_fds,
        );
        self.in_flight.sent(token, n_fds);
        let mut sent = send(fd.as_fd(), &reply.response, &reply.fds, &mut self.send_buf);
        for (msg, fds) in &reply.follow_ups {
            if sent.is_ok() {
                sent = send(fd.as_fd(), msg, fds, &mut self.send_buf);
            }
        }
        if let Err(e) = sent {
            // A non-blocking send that would block means the plugin is not
            // reading its replies: drop the connection rather than stall.
            warn!("dropping a plugin connection: {}", crate::error_chain(&e));
            self.drop_connection(token);
            return;
        }
        if let Some(conn) = reply.new_connection {
            if let Err(e) = self.add_connection(conn) {
                warn!("cannot serve a new connection: {}", crate::error_chain(&e));
            }
        }
    }

    fn start_vcpus(&mut self) -> Result<(), RunError> {
        vcpu::install_kick_handler().map_err(RunError::Signals)?;
        if let Some(path) = &self.config.vcpu_cgroup_path {
            write_cgroup_task(path, std::process::id()).map_err(|source| RunError::Cgroup {
                path: path.clone(),
                source,
            })?;
        }
        let mut pairs = Vec::with_capacity(self.channels.len());
        for id in 0..self.channels.len() as u32 {
            pairs.push(self.vm.create_vcpu_pair(id).map_err(RunError::Vm)?);
        }
        let mut transports = Vec::with_capacity(pairs.len());
        for channel in &self.channels {
            transports.push(match (&channel.fast, self.state.fast_channel) {
                (Some(memfd), true) => vcpu::Transport::Shm(
                    plugin_proto::shm::ShmChannel::map(
                        memfd.as_fd(),
                        plugin_proto::shm::Side::Host,
                    )
                    .map_err(|e| RunError::Resource {
                        what: "the fast vcpu channel mapping",
                        source: match e {
                            plugin_proto::shm::ShmError::Map(e) => e,
                            _ => Errno::EINVAL,
                        },
                    })?,
                ),
                _ => vcpu::Transport::Pipe(Arc::clone(&channel.host)),
            });
        }
        for (id, ((run, control_fd), transport)) in pairs.into_iter().zip(transports).enumerate() {
            let servicer = Servicer::new(
                id as u32,
                control_fd,
                transport,
                Arc::clone(&self.controls[id]),
                Arc::clone(&self.shared),
            );
            let cgroup = self.config.vcpu_cgroup_path.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("vmm_vcpu{id}"))
                .spawn(move || {
                    if let Some(path) = cgroup {
                        if let Err(e) =
                            write_cgroup_task(&path, nix::unistd::gettid().as_raw() as u32)
                        {
                            warn!("vcpu {id}: cannot join cgroup {}: {e}", path.display());
                        }
                    }
                    vcpu::run_vcpu(run, servicer)
                });
            match spawned {
                Ok(t) => self.threads.push(t),
                Err(e) => {
                    self.shared.barrier.cancel();
                    return Err(RunError::Resource {
                        what: "a vcpu thread",
                        source: Errno::from_raw(e.raw_os_error().unwrap_or(libc::EAGAIN)),
                    });
                }
            }
        }
        info!(
            "started {} vcpu(s) on {} channels",
            self.threads.len(),
            if self.state.fast_channel {
                "shared-memory"
            } else {
                "pipe"
            }
        );
        Ok(())
    }

    /// Stops everything and turns what happened into the result.
    fn teardown(mut self) -> Result<(), RunError> {
        self.stop_vcpus();
        let deadline = Instant::now() + Duration::from_secs(5);
        // Kicked threads leave within microseconds; a kick that raced with a
        // thread entering a blocking call is repeated.
        while self.threads.iter().any(|t| !t.is_finished()) && Instant::now() < deadline {
            self.stop_vcpus();
            std::thread::sleep(Duration::from_micros(100));
        }
        for t in std::mem::take(&mut self.threads) {
            if t.is_finished() {
                let _ = t.join();
            } else {
                error!("a vcpu thread did not stop; leaving it behind");
            }
        }

        let timed_out = self.plugin_end.is_none();
        if timed_out {
            // Grace period over (or the loop failed): the plugin must go.
            if let Err(e) = self.plugin.kill() {
                error!("cannot kill the plugin: {e}");
            }
            let deadline = Instant::now() + Duration::from_secs(2);
            while self.plugin_end.is_none() && Instant::now() < deadline {
                self.reap();
                std::thread::sleep(Duration::from_millis(2));
            }
            if self.plugin_end.is_none() {
                error!("the plugin (pid {}) could not be reaped", self.plugin.pid);
            }
            if self.abandoned {
                self.errors.insert(0, RunError::PluginAbandoned);
            } else if !self.errors.iter().any(|e| matches!(e, RunError::Wait(_))) {
                self.errors.insert(0, RunError::PluginTimeout(DYING_GRACE));
            }
        }
        // Anything the plugin forked dies with it.
        let _ = self.plugin.kill();
        if self.stderr.open {
            self.stderr.drain();
            self.stderr.flush();
        }
        // Everything that could write the plugin's stdout is gone: the
        // forwarder sees EOF and ends. A stdout that does not drain (a
        // full pipe nobody reads) must not hold up the exit.
        if let Some(t) = self.stdout_thread.take() {
            let deadline = Instant::now() + Duration::from_secs(1);
            while !t.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
            if t.is_finished() {
                let _ = t.join();
            }
        }
        self.take_vcpu_failure();

        let panicked = self.stderr.panic.panic().map(str::to_string);
        match (self.plugin_end.as_ref(), panicked) {
            (_, _) if timed_out => {}
            (Some(PluginEnd::Exited(code)), Some(message)) if *code != 0 => self.errors.insert(
                0,
                RunError::PluginPanicked {
                    message,
                    end: format!("exited with status {code}"),
                },
            ),
            (Some(PluginEnd::Signaled(sig)), Some(message))
                if !matches!(self.errors.first(), Some(RunError::Seccomp(_))) =>
            {
                self.errors.insert(
                    0,
                    RunError::PluginPanicked {
                        message,
                        end: format!("was killed by signal {sig}"),
                    },
                )
            }
            _ => {}
        }
        match self.plugin_end {
            // Killed by us: the timeout is the cause.
            _ if timed_out => {}
            _ if matches!(self.errors.first(), Some(RunError::PluginPanicked { .. })) => {}
            Some(PluginEnd::Exited(code)) if code != 0 => {
                self.errors.insert(0, RunError::PluginExit(code))
            }
            // Killed by us after a seccomp violation: that is the cause.
            Some(PluginEnd::Signaled(_))
                if matches!(self.errors.first(), Some(RunError::Seccomp(_))) => {}
            Some(PluginEnd::Signaled(sig)) => self.errors.insert(
                0,
                RunError::PluginSignaled {
                    signal: sig.to_string(),
                    detail: signal_detail(sig),
                },
            ),
            _ => {}
        }
        match self.errors.into_iter().next() {
            None => Ok(()),
            Some(e) => Err(e),
        }
    }
}

fn signal_detail(sig: Signal) -> &'static str {
    match sig {
        Signal::SIGSEGV => " (segmentation fault)",
        Signal::SIGBUS => " (bus error)",
        Signal::SIGABRT => " (aborted)",
        Signal::SIGILL => " (illegal instruction)",
        Signal::SIGFPE => " (arithmetic exception)",
        Signal::SIGKILL => " (killed)",
        Signal::SIGSYS => " (bad system call: stopped by the seccomp filter)",
        _ => "",
    }
}

fn write_cgroup_task(path: &std::path::Path, id: u32) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(path.join("tasks"))?;
    writeln!(f, "{id}")
}

fn send(
    fd: BorrowedFd<'_>,
    msg: &plugin_proto::MainResponse,
    fds: &[OwnedFd],
    scratch: &mut Vec<u8>,
) -> Result<(), FramingError> {
    let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(|f| f.as_fd()).collect();
    framing::send_message(fd, msg, &borrowed, scratch)
}

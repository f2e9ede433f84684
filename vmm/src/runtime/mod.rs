//! Running a VM driven by a plugin: startup, the `Host` and its main loop
//! (plugin exit, stderr, main connections, vcpu thread exits). The shutdown
//! sequence and teardown are in `teardown.rs`, the services the main
//! handler sees in `services.rs`, the forwarding of the plugin's output in
//! `output.rs`.

mod control;
pub mod inflight;
pub mod main_handler;
mod migrate;
pub mod objects;
pub mod output;
pub mod panic;
pub mod plugin_control;
pub mod process;
pub mod reset;
pub mod restart;
mod services;
mod snapshot;
mod teardown;
pub mod vcpu;

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
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

use self::inflight::InFlight;
use self::main_handler::MainState;
use self::objects::SharedExitConfig;
use self::output::StderrForwarder;
use self::process::Plugin;
use self::services::Services;
use self::vcpu::diag::{StuckDetector, WATCH_TICK};
use self::vcpu::{HostChannel, Servicer, StartBarrier, VcpuControl, VcpuShared};
use crate::config::VmConfig;
use crate::jail;
use crate::launch::Launch;
use crate::limits;
use crate::net::Tap;
use crate::vm::{borrow_fd, KvmVm, VmError};

/// How long the plugin may take to exit once the VM is shutting down.
pub const DYING_GRACE: Duration = Duration::from_millis(1000);

/// Pipe capacity requested for vcpu channels.
/// How often the vcpus are kicked to drain the coalesced ring while any
/// coalesced range was reserved: the longest a write can wait in the ring
/// when the guest makes no other exit (docs/protocol-extensions.md §4.4).
/// The main loop's 500 ms watch tick would be too slow for a device; a kick
/// costs one `KVM_RUN` return per vcpu, about 0.05% of a core at 10 ms.
pub const COALESCED_TICK: Duration = Duration::from_millis(10);

const PIPE_CAPACITY: i32 = 0x40000;

const TOKEN_SIGNAL: u64 = 0;
const TOKEN_STDERR: u64 = 1;
const TOKEN_VCPU_EXIT: u64 = 2;
const TOKEN_SECCOMP: u64 = 3;
const TOKEN_CONTROL: u64 = 4;
const TOKEN_PLUGIN_CONTROL: u64 = 5;
const FIRST_CONNECTION_TOKEN: u64 = 16;

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
    /// The user stopped vmm: "interrupted by SIGINT", "stopped by SIGTERM",
    /// and what followed.
    #[error("{0}")]
    Interrupted(String),
    #[error("vcpu {id} stopped the VM: {message}")]
    VcpuFailed { id: u32, message: String },
    #[error("cannot serve the control socket")]
    Control(#[source] crate::control::ControlError),
    #[error("cannot restore the snapshot")]
    Restore(#[source] crate::snapshot::SnapError),
    /// An incoming migration failed (the source was told why).
    #[error("incoming migration: {0}")]
    Migration(String),
    #[error("the plugin crashed {crashes} times within {window:?} (the last time it {last}); not restarting it again")]
    RestartLoop {
        crashes: usize,
        window: Duration,
        last: String,
    },
    #[error("hot restart failed: {0}")]
    AttachFailed(String),
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

/// How the plugin process ended.
enum PluginEnd {
    Exited(i32),
    Signaled(Signal),
}

struct Host {
    config: VmConfig,
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
    stuck: StuckDetector,
    last_watch: Instant,
    /// Last kick of the vcpus to drain the coalesced ring.
    last_coalesced_kick: Instant,
    errors: Vec<RunError>,
    recv_buf: Vec<u8>,
    cmsg_buf: Vec<u8>,
    send_buf: Vec<u8>,
    /// The control socket's side of the main loop (`control.rs`).
    api: control::Api,
    /// A third handle on each vcpu, for a snapshot's state reads.
    snap_vcpus: Vec<kvm_ioctls::VcpuFd>,
    /// The in-memory snapshot of fast reset (`reset.rs`).
    reset_point: Option<reset::ResetPoint>,
    /// The snapshot being written (`snapshot.rs`).
    snapshot_writer: Option<snapshot::Writer>,
    /// `--restore`: the opened, verified snapshot.
    restore: Option<crate::snapshot::Restore>,
    /// The outgoing migration (`migrate.rs`).
    outgoing: Option<migrate::Outgoing>,
    /// The machine migrated there: the run ends well.
    migrated_to: Option<String>,
    /// `--incoming`: the source's stream.
    incoming: Option<migrate::Incoming>,
    /// Hot restart (`restart.rs`).
    restart: restart::HostRestart,
}

/// Runs the VM until the plugin exits; `Ok` only for a clean run with plugin
/// exit status 0.
pub fn run(config: VmConfig) -> Result<(), RunError> {
    let started_at = Instant::now();
    // The control socket first: a live one at the path fails the run
    // before anything starts, and from here on every way out of `run`
    // removes it (the guard's drop, after the last events went out).
    let mut socket = match &config.api_socket {
        Some(path) => Some(crate::control::ControlSocket::start(path).map_err(RunError::Control)?),
        None => None,
    };
    let link = socket.as_mut().and_then(|s| s.take_link());
    let result = run_vm(config, control::Api::new(link, started_at));
    drop(socket);
    result
}

fn run_vm(mut config: VmConfig, api: control::Api) -> Result<(), RunError> {
    crate::record::init_from_env();
    // A snapshot to restore is opened and verified before anything starts.
    let restore = match &config.restore {
        Some(dir) => {
            let r = crate::snapshot::Restore::open(dir, config.vcpus_given.then_some(config.vcpus))
                .map_err(RunError::Restore)?;
            config.vcpus = r.vcpu_count();
            info!("restoring {} ({} vcpus)", dir.display(), config.vcpus);
            Some(r)
        }
        None => None,
    };
    // An incoming migration: one source, its header checked, before
    // anything starts.
    let incoming = match &config.incoming {
        Some(addr) => {
            let i = migrate::accept(
                addr,
                config.incoming_timeout,
                config.vcpus_given.then_some(config.vcpus),
            )?;
            config.vcpus = i.vcpus();
            Some(i)
        }
        None => None,
    };
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
    if let Some(r) = &restore {
        r.check_cpu(&vm).map_err(RunError::Restore)?;
    }
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

    // Hot restart starts later plugins on the same output pipes.
    let restart_pipes = match (stdout_w.try_clone(), stderr_w.try_clone()) {
        (Ok(o), Ok(e)) => Some((o, e)),
        _ => None,
    };
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
    // A jailed plugin runs inside the jail's pid namespace as the child of
    // the jail's init (the host's child, the process vmm waits for and
    // kills); its host pid is what the user sees in `ps`.
    match &plugin.jail {
        Some(j) => info!(
            "started plugin {} (pid {}, jailed; jail init pid {})",
            config.plugin.display(),
            j.plugin_pid,
            plugin.pid
        ),
        None => info!(
            "started plugin {} (pid {})",
            config.plugin.display(),
            plugin.pid
        ),
    }
    let shutdown = main_handler::new_eventfd().map_err(resource("the shutdown eventfd"))?;
    let stdout_thread = output::forward_stdout(stdout_r).map_err(|e| RunError::Resource {
        what: "the stdout forwarding thread",
        source: Errno::from_raw(e.raw_os_error().unwrap_or(libc::EAGAIN)),
    })?;
    // 6. The jail is built: the host needs no capabilities any more.
    // Hot restart builds jails for later plugins and keeps what that needs
    // (docs/protocol-extensions.md §9.6).
    if config.hot_restart() {
        info!("hot restart enabled: the host keeps its capabilities to jail later plugins");
    } else {
        jail::caps::drop_host_capabilities().map_err(RunError::Caps)?;
    }

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
        unreserved: Default::default(),
        coalesced: Default::default(),
    });

    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(resource("the epoll set"))?;
    let mut state = MainState::new(exit_config);
    state.memory_limits = config.memory_limits;
    state.restore = restore.as_ref().map(|r| main_handler::RestoreOffer {
        device: r.device.clone(),
        asked: false,
    });
    let in_flight = InFlight::new(limits::fds_in_flight_budget(config.vcpus));
    let stderr_level = config.plugin_stderr_level;
    let crash_policy = config.on_plugin_crash;
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
            level: stderr_level,
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
        stuck: StuckDetector::default(),
        last_watch: Instant::now(),
        last_coalesced_kick: Instant::now(),
        errors: Vec::new(),
        recv_buf: vec![0; limits::MAX_MAIN_REQUEST],
        cmsg_buf: vec![0; framing::full_cmsg_space()],
        send_buf: Vec::with_capacity(4096),
        api,
        snap_vcpus: Vec::new(),
        reset_point: None,
        snapshot_writer: None,
        restore,
        outgoing: None,
        migrated_to: None,
        incoming,
        restart: restart::HostRestart::new(crash_policy, restart_pipes),
    };
    host.watch(host.signals.as_fd(), TOKEN_SIGNAL)?;
    host.watch(host.stderr.fd.as_fd(), TOKEN_STDERR)?;
    host.watch(borrow_fd(&host.shared.exited), TOKEN_VCPU_EXIT)?;
    if let Some(j) = &host.plugin.jail {
        host.watch(j.seccomp_fd(), TOKEN_SECCOMP)?;
    }
    if let Some(fd) = host.api.fd() {
        host.watch(fd, TOKEN_CONTROL)?;
    }
    host.api.pause_kicks = vec![0; host.config.vcpus];
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

    fn main_loop(&mut self) {
        let mut events = vec![EpollEvent::empty(); 64];
        while self.plugin_end.is_none() {
            let timeout = match self.dying_since {
                // Running vcpus are watched for stuck exits, and kicked to
                // drain the coalesced ring.
                None if !self.threads.is_empty() => {
                    let tick = if self.state.exit_config.coalesced {
                        COALESCED_TICK
                    } else {
                        WATCH_TICK
                    };
                    EpollTimeout::try_from(tick.as_millis() as u64).unwrap_or(EpollTimeout::NONE)
                }
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
            let timeout = self.api.shorten(timeout);
            let timeout = match self.restart_timeout() {
                Some(t) => EpollTimeout::try_from(t.as_millis().max(1) as u64).unwrap_or(timeout),
                None => timeout,
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
                        self.report_stopped_vcpus();
                        self.enter_dying("a vcpu stopped");
                    }
                    TOKEN_SECCOMP => self.on_seccomp(ev.events()),
                    TOKEN_CONTROL => self.on_control(),
                    TOKEN_PLUGIN_CONTROL => self.on_plugin_control(),
                    token => self.serve(token),
                }
                if self.plugin_end.is_some() {
                    return;
                }
            }
            let restarting = self.restart.busy();
            self.control_round();
            self.restart_round();
            if restarting {
                // What the restart's step queued (its events, the
                // upgrade's answer) goes out now, not at the next wake-up.
                self.control_round();
            }
            if !self.threads.is_empty()
                && self.dying_since.is_none()
                && self.state.exit_config.coalesced
                && self.last_coalesced_kick.elapsed() >= COALESCED_TICK
            {
                self.last_coalesced_kick = Instant::now();
                self.kick_vcpus();
            }
            if !self.threads.is_empty()
                && self.dying_since.is_none()
                && self.last_watch.elapsed() >= WATCH_TICK
            {
                self.last_watch = Instant::now();
                let watches = self.controls.iter().map(|c| &c.watch);
                for warning in self.stuck.tick(watches, self.last_watch) {
                    warn!("{warning}");
                }
                if self.api.enabled() && crate::trace::enabled() & crate::trace::STATS != 0 {
                    // A moment for the vcpus to publish their live
                    // statistics (`stats`).
                    self.kick_vcpus();
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
                self.emit(
                    "error",
                    serde_json::json!({ "message": format!("vcpu {id}: {message}") }),
                );
                self.errors.push(RunError::VcpuFailed { id, message });
            }
        }
    }

    fn on_signals(&mut self) {
        while let Ok(Some(info)) = self.signals.read_signal() {
            let signo = info.ssi_signo as i32;
            if signo == libc::SIGINT || signo == libc::SIGTERM {
                let name = if signo == libc::SIGINT {
                    "interrupted by SIGINT".to_string()
                } else {
                    "stopped by SIGTERM".to_string()
                };
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
            let message = format!("the plugin was stopped by the seccomp filter: it called {what}");
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
            self.emit("error", serde_json::json!({ "message": message }));
        }
    }

    /// Collects every ended child; the plugin's end leaves the main loop.
    fn reap(&mut self) {
        loop {
            let status = waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG));
            if let Ok(s) = &status {
                if s.pid().is_some_and(|p| self.restart.retired_reaped(p)) {
                    continue;
                }
            }
            let status = match status {
                Ok(s) if s.pid() == Some(self.plugin.pid) => Ok(self.plugin.end_status(s)),
                other => other,
            };
            // Hot restart: a restartable plugin that died is replaced.
            match &status {
                Ok(WaitStatus::Exited(pid, code))
                    if *pid == self.plugin.pid && self.restart_on_crash(None, *code) =>
                {
                    continue
                }
                Ok(WaitStatus::Signaled(pid, sig, _))
                    if *pid == self.plugin.pid && self.restart_on_crash(Some(sig.as_str()), 0) =>
                {
                    continue
                }
                _ => {}
            }
            match status {
                Ok(WaitStatus::Exited(pid, code)) if pid == self.plugin.pid => {
                    info!("plugin exited with status {code}");
                    self.plugin_end = Some(PluginEnd::Exited(code));
                    let pid = self.plugin_host_pid();
                    self.emit(
                        "plugin-exited",
                        serde_json::json!({ "pid": pid, "status": code }),
                    );
                }
                Ok(WaitStatus::Signaled(pid, sig, _)) if pid == self.plugin.pid => {
                    info!("plugin killed by {sig}");
                    self.plugin_end = Some(PluginEnd::Signaled(sig));
                    let pid = self.plugin_host_pid();
                    self.emit(
                        "plugin-exited",
                        serde_json::json!({ "pid": pid, "signal": sig.as_str() }),
                    );
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
        if self.incoming.as_ref().is_some_and(|i| !i.received)
            && main_handler::waits_for_incoming(&self.recv_buf[..packet.len])
        {
            // The machine arrives before the plugin hears it is restoring
            // or starts; a failure leaves the request unanswered and ends
            // the run.
            if let Err(e) = self.receive_incoming() {
                error!("{}", crate::error_chain(&e));
                self.errors.insert(0, e);
                self.drop_connection(token);
                self.enter_dying("the incoming migration failed");
                return;
            }
        }
        let services = Services {
            channels: &self.channels,
            taps: &self.taps,
            controls: &self.controls,
            threads: &self.threads,
            shutdown: &self.shutdown,
            connections: self.connections.len(),
            in_flight: &self.in_flight,
            control: std::cell::RefCell::new(&mut self.api.plugin_control),
            vm: &self.vm,
            vcpus: &self.snap_vcpus,
            reset_point: std::cell::RefCell::new(&mut self.reset_point),
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
        if let Some(refused) = &reply.refused {
            debug!("main[{}]: {refused}", token - FIRST_CONNECTION_TOKEN);
        }
        // A control channel opened by this request joins the epoll set
        // (before the reply goes out, so a failed send cannot leave it
        // unwatched).
        if let Some(fd) = self.api.plugin_control.newly_opened() {
            if let Err(e) = self.epoll.add(
                fd,
                EpollEvent::new(EpollFlags::EPOLLIN, TOKEN_PLUGIN_CONTROL),
            ) {
                warn!("cannot watch the plugin's control channel: {e}");
            }
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

    /// Kicks every vcpu thread: each leaves `KVM_RUN` (or a channel wait)
    /// once, drains the coalesced ring and goes on.
    fn kick_vcpus(&self) {
        use vmm_sys_util::signal::Killable;
        for (i, t) in self.threads.iter().enumerate() {
            if let Err(e) = t.kill(vcpu::kick_signal()) {
                debug!("cannot kick vcpu {i}: {e}");
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
        if let Err(e) = self.restore_machine().and_then(|()| self.incoming_commit()) {
            self.incoming_failed(&e);
            return Err(e);
        }
        let mut pairs = Vec::with_capacity(self.channels.len());
        for id in 0..self.channels.len() as u32 {
            let pair = self.vm.create_vcpu_pair(id).map_err(RunError::Vm)?;
            self.snap_vcpus
                .push(self.vm.vcpu_handle(id, &pair.0).map_err(RunError::Vm)?);
            pairs.push(pair);
        }
        let mut restore_parts = self
            .restore
            .as_mut()
            .map(|r| std::mem::take(&mut r.vcpus))
            .unwrap_or_default()
            .into_iter();
        if let Some((run, _)) = pairs.first() {
            let ring = self.vm.coalesced_ring(0, run).map_err(RunError::Vm)?;
            *self
                .shared
                .coalesced
                .lock()
                .unwrap_or_else(|p| p.into_inner()) =
                ring.map(|r| Box::new(r) as Box<dyn crate::vm::CoalescedRing>);
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
            let mut servicer = Servicer::new(
                id as u32,
                control_fd,
                transport,
                Arc::clone(&self.controls[id]),
                Arc::clone(&self.shared),
            );
            servicer.restore = restore_parts.next();
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
        self.incoming_done();
        self.stuck.started(Instant::now());
        self.emit(
            "running",
            serde_json::json!({ "vcpus": self.threads.len() }),
        );
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

//! The one event loop: turns syscalls into [`Event`]s for the supervisor and its [`Action`]s back
//! into syscalls.
//!
//! It owns what lives as long as sockhold: the held listeners, the signal self-pipe, the notify
//! socket of every live generation, the control socket and the clients waiting for a reload, the
//! runtime directory, the pid file, the fd store (`--fd-store`), and the link to sockhold's own
//! service manager. One thread, one `poll` over the signal pipe, the control socket and its
//! clients, the notify sockets, and the stored fds watched for a hang-up, with the nearest
//! deadline as the timeout: while nothing happens, sockhold sleeps without waking. The
//! listeners are polled only while `--lazy` waits for the first connection, and with
//! `--accept`; otherwise only children accept on them. Every polled fd carries what it
//! belongs to ([`Source`]), and the child's environment is assembled by [`crate::plan`].
//!
//! It must not make lifecycle decisions: those belong to [`Supervisor::step`].

mod acceptor;
pub mod handover;
mod runtime_dir;

use std::collections::{BTreeMap, VecDeque};
use std::ffi::OsString;
use std::net::SocketAddr;
use std::os::fd::BorrowedFd;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};
use log::{debug, info, warn};
use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::wait::waitpid;
use nix::unistd::Pid;

use self::acceptor::Acceptor;
use self::runtime_dir::{make_runtime_dir, make_service_dirs};
use crate::accept::AcceptSupervisor;
use crate::cli::{CompatEnv, Config};
use crate::control::{ClientId, ControlServer, Request, Token, error_answer};
use crate::exit::ExitCode;
use crate::fd_store::FdStore;
use crate::listen::Listener;
use crate::metrics::{self, endpoint::MetricsServer};
use crate::notify::{Manager, NotifySocket};
use crate::paths::PidFile;
use crate::plan;
use crate::probe::Probe;
use crate::protocol::{self, Answer, LastReload, Reloaded, Signalled};
use crate::signals::{Signal, Signals, is_forwarded, signal_name};
use crate::spawn::spawn;
use crate::supervisor::{Action, Event, GenerationInfo, ReadyMode, Supervisor};
use crate::sys::{kill, killpg, peek_ended_child, reap};

/// What decides: the generation supervisor, or the per-connection one with `--accept`.
enum Brain {
    Generations(Supervisor),
    PerConnection(AcceptSupervisor),
}

impl Brain {
    fn step(&mut self, event: Event, now: Instant) -> Vec<Action> {
        match self {
            Brain::Generations(s) => s.step(event, now),
            Brain::PerConnection(a) => a.step(event, now),
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        match self {
            Brain::Generations(s) => s.next_deadline(),
            Brain::PerConnection(a) => a.next_deadline(),
        }
    }

    fn live_pids(&self) -> Vec<(u64, Pid)> {
        match self {
            Brain::Generations(s) => s.live_pids(),
            Brain::PerConnection(a) => a.live_pids(),
        }
    }

    fn generations(&self) -> Vec<GenerationInfo> {
        match self {
            Brain::Generations(s) => s.generations(),
            Brain::PerConnection(a) => a.generations(),
        }
    }

    /// The processes a forwarded signal reaches: the serving generation's, or every
    /// connection's.
    fn serving_pids(&self) -> Vec<Pid> {
        match self {
            Brain::Generations(s) => s.serving_pids(),
            Brain::PerConnection(a) => a.live_pids().into_iter().map(|(_, pid)| pid).collect(),
        }
    }

    fn restarts(&self) -> u64 {
        match self {
            Brain::Generations(s) => s.restarts(),
            Brain::PerConnection(_) => 0,
        }
    }

    /// `--lazy` before the first connection: the listeners are polled for it.
    fn wants_first_connection(&self) -> bool {
        match self {
            Brain::Generations(s) => s.wants_first_connection(),
            Brain::PerConnection(_) => false,
        }
    }
}

/// What the loop holds for one live unit; [`Action::Release`] drops it.
struct UnitIo {
    /// Its private notify socket.
    notify: NotifySocket,
    /// With `--ready http:`: the address of its private health listener.
    health: Option<SocketAddr>,
    /// Its readiness probe in flight.
    probe: Option<Probe>,
    /// Its own sockets of the `steer=flow` listeners, each in its steering slot.
    steered: Vec<UnitSocket>,
}

/// A unit's own socket of a `steer=flow` listener.
struct UnitSocket {
    /// The listener's index (its fd is 3 + index).
    listener: usize,
    /// sockhold's copy, kept while the unit lives (for a self-upgrade).
    fd: std::os::fd::OwnedFd,
    /// Its slot in the listener's steering.
    slot: u32,
}

/// A replaced unit kept for its steered flows ([`Action::WatchFlows`]).
struct Watch {
    generation: u64,
    pid: Pid,
    /// When to look at its flows next.
    at: Instant,
    /// Whether the log said it is kept.
    announced: bool,
}

/// What a polled fd belongs to: a readable one is dispatched by it.
#[derive(Clone, Copy, Debug)]
enum Source {
    /// The signal self-pipe.
    Signals,
    /// The control socket or one of its clients.
    Control(Token),
    /// A unit's notify socket.
    Notify(u64),
    /// A held listener, while `--lazy` waits for the first connection.
    LazyListener,
    /// With `--accept`: the acceptor at this index.
    Acceptor(usize),
    /// A unit's HTTP probe, waiting on its connection.
    Probe(u64),
    /// A stored fd (`--fd-store`), polled for nothing: only a hang-up or an error wakes it.
    Stored(std::os::fd::RawFd),
    /// The metrics endpoint or one of its scrapes.
    Metrics(metrics::endpoint::Token),
}

/// What one poll found, by source.
#[derive(Default)]
struct Woken {
    signals: bool,
    control: Vec<Token>,
    notify: Vec<u64>,
    first_connection: bool,
    connections: Vec<usize>,
    probes: Vec<u64>,
    /// Stored fds that hung up or failed.
    hung: Vec<std::os::fd::RawFd>,
    metrics: Vec<metrics::endpoint::Token>,
    /// Nothing was ready: a deadline is due.
    timed_out: bool,
}

/// sockhold at work: the resources it holds and what decides.
pub struct EventLoop {
    config: Config,
    held: Held,
    signals: Signals,
    brain: Brain,
    /// What the loop holds for every live unit, by unit key.
    units: BTreeMap<u64, UnitIo>,
    /// Exec probes killed (timed out, or their unit gone) and not reaped yet: no orphans.
    killed_probes: Vec<Pid>,
    manager: Option<Manager>,
    base_env: Vec<(OsString, OsString)>,
    control: Option<ControlServer>,
    /// Control clients waiting for a reload: the reload that started for them, once one has.
    reload_waiters: Vec<(ClientId, Option<u64>)>,
    /// The outcome of the last reload, for `status`.
    last_reload: Option<LastReload>,
    /// `--metrics`: the endpoint.
    metrics: Option<MetricsServer>,
    /// What the metrics count (kept with or without the endpoint, and across upgrades).
    counters: metrics::Counters,
    /// The oldest reload request no reload has started for yet: a reload's duration runs from
    /// its request, also when it was coalesced behind another.
    reload_requested: Option<Instant>,
    /// The reloads in progress (by generation) and when they were requested.
    reloads_started: BTreeMap<u64, Instant>,
    started: SystemTime,
    /// With `--accept`: the listeners sockhold accepts on itself.
    acceptors: Vec<Acceptor>,
    /// With `--accept`: accept() ran out of fds or memory. The listeners are left out of the
    /// poll until another event, which may have freed one (polling them would spin: the
    /// connection stays queued), and the episode is logged once.
    accept_exhausted: bool,
    accept_episode: bool,
    /// Self-upgrade: who asked, where from, how the last one went.
    upgrade: handover::Upgrades,
    /// With `steer=flow`: the units kept for their flows, watched until these are idle.
    watched: BTreeMap<u64, Watch>,
    /// With `steer=flow`: the units new flows go to ([`Action::NewFlowsTo`]).
    new_flow_units: Vec<u64>,
    /// `--fd-store`: the fds children stored, for every later generation.
    store: FdStore,
}

/// What sockhold created and removes when it ends, however it ends: the listeners (and the Unix
/// socket files it bound), the runtime directory, the pid file.
#[derive(Default)]
struct Held {
    listeners: Vec<Listener>,
    runtime_dir: Option<PathBuf>,
    pid_file: Option<PidFile>,
    /// The `--runtime-directory` directories to remove at the end.
    service_dirs: Vec<PathBuf>,
}

impl Drop for Held {
    fn drop(&mut self) {
        for listener in &self.listeners {
            listener.remove_socket_file();
        }
        if let Some(dir) = &self.runtime_dir
            && let Err(e) = std::fs::remove_dir_all(dir)
        {
            warn!("failed to remove {}: {e}", dir.display());
        }
        if let Some(pid_file) = &self.pid_file {
            pid_file.remove();
        }
        for dir in &self.service_dirs {
            if let Err(e) = std::fs::remove_dir_all(dir)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                warn!("failed to remove {}: {e}", dir.display());
            }
        }
    }
}

impl EventLoop {
    /// Binds every socket, installs the signal handlers, creates the runtime directory and the
    /// pid file. Nothing is spawned yet.
    pub fn new(config: Config) -> Result<EventLoop> {
        let manager = match std::env::var("NOTIFY_SOCKET") {
            Ok(path) if !path.is_empty() => Some(Manager::new(&path)?),
            _ => None,
        };
        let base_env = plan::base_env(std::env::vars_os());
        // Whatever is created from here on is removed again if a later step fails.
        let mut held = Held::default();
        for spec in &config.listen {
            let listener = Listener::bind(spec, &config.name)?;
            info!(
                "listening on {} (fd {}, name {})",
                listener.local_description(),
                3 + held.listeners.len(),
                listener.name()
            );
            held.listeners.push(listener);
        }
        if config.compat_env.contains(&CompatEnv::Nginx) {
            info!(
                "--compat-env nginx: every listener is handed over non-blocking (O_NONBLOCK), as nginx expects of the sockets it inherits"
            );
        }
        let signals = Signals::install()?;
        held.runtime_dir = Some(make_runtime_dir(&config.name, config.world.user.is_some())?);
        held.service_dirs = make_service_dirs(&config)?;
        if let Some(path) = &config.pid_file {
            held.pid_file = Some(PidFile::create(path, std::process::id())?);
        }
        let control = match &config.control {
            Some(path) => Some(ControlServer::bind(path)?),
            None => None,
        };
        let metrics = match &config.metrics {
            Some(addr) => Some(MetricsServer::bind(addr)?),
            None => None,
        };
        let (brain, acceptors) = match &config.accept {
            None => (Brain::Generations(Supervisor::new(config.policy.clone())), Vec::new()),
            Some(accept) => {
                // Only sockhold accepts on them in this mode (children get connections, never
                // the listeners), so nothing else holds them and the flag is sockhold's to set:
                // non-blocking, so that a connection that vanished between poll and accept
                // never blocks the loop.
                for listener in &held.listeners {
                    listener.set_nonblocking(true)?;
                }
                let acceptors =
                    held.listeners.iter().map(Acceptor::new).collect::<Result<Vec<_>>>()?;
                let brain = AcceptSupervisor::new(config.policy.clone(), accept.max_connections);
                (Brain::PerConnection(brain), acceptors)
            }
        };
        let store = FdStore::new(config.fd_store);
        Ok(EventLoop {
            control,
            reload_waiters: Vec::new(),
            last_reload: None,
            metrics,
            counters: metrics::Counters::default(),
            reload_requested: None,
            reloads_started: BTreeMap::new(),
            started: SystemTime::now(),
            acceptors,
            accept_exhausted: false,
            accept_episode: false,
            config,
            held,
            signals,
            brain,
            units: BTreeMap::new(),
            killed_probes: Vec::new(),
            manager,
            base_env,
            upgrade: handover::Upgrades::at_start(),
            watched: BTreeMap::new(),
            new_flow_units: Vec::new(),
            store,
        })
    }

    /// Runs until the supervisor says to exit; returns the exit code.
    pub fn run(mut self) -> Result<ExitCode> {
        let result = self.serve();
        if result.is_err() {
            // sockhold cannot go on: never leave children behind without their supervisor.
            for (generation, pid) in self.brain.live_pids() {
                warn!("killing generation {generation} (pid {pid}) because sockhold is failing");
                let _ = killpg(pid, Signal::SIGKILL);
                let _ = waitpid(pid, None);
            }
        }
        self.answer_upgrade_askers();
        for (client, _) in std::mem::take(&mut self.reload_waiters) {
            self.answer_client(client, &error_answer("sockhold stopped before the reload ended"));
        }
        // The store closes with sockhold (it survives reloads, restarts and upgrades, not a stop).
        self.store.close_all();
        // The notify sockets go first; `held` then removes the runtime directory and the rest.
        self.units.clear();
        self.control = None;
        self.metrics = None;
        result
    }

    fn serve(&mut self) -> Result<ExitCode> {
        let mut pending = VecDeque::new();
        if self.upgrade.resumed {
            // Taken over from the previous program: the children run. Reap the ones that ended
            // during the change (their SIGCHLD may have been merged into one already read).
            self.reap(&mut pending);
        } else {
            // The brain decides what starting means: generation 1, or (--lazy, --accept)
            // waiting for a connection.
            pending.push_back(Event::Start);
        }
        loop {
            while let Some(event) = pending.pop_front() {
                let actions = self.brain.step(event, Instant::now());
                for action in actions {
                    if acts_on_a_child(&action) {
                        self.end_probation("the new program acts on a child");
                    }
                    if let Some(code) = self.perform(action, &mut pending) {
                        return Ok(code);
                    }
                }
            }
            self.after_turn();
            self.upgrade_if_asked();
            self.wait(&mut pending)?;
        }
    }

    /// Blocks in poll until a signal, a notify datagram or the next deadline, and queues what
    /// happened.
    fn wait(&mut self, pending: &mut VecDeque<Event>) -> Result<()> {
        let timeout = self.poll_timeout();
        let woken = self.poll(timeout)?;
        self.dispatch(woken, pending);
        Ok(())
    }

    /// Until the nearest deadline: the brain's, the control clients', the probes', probation's.
    fn poll_timeout(&self) -> PollTimeout {
        let deadline = [
            self.brain.next_deadline(),
            self.control.as_ref().and_then(|c| c.next_deadline()),
            // Only while a scrape is in progress.
            self.metrics.as_ref().and_then(MetricsServer::next_deadline),
            self.units.values().filter_map(|u| u.probe.as_ref()).map(|p| p.deadline).min(),
            // One wakeup at the end of probation, to close the state and the old binary.
            self.upgrade.probation_deadline(),
            // Only while a unit is kept for its flows: an idle sockhold never wakes.
            self.watched.values().map(|w| w.at).min(),
        ]
        .into_iter()
        .flatten()
        .min();
        match deadline {
            None => PollTimeout::NONE,
            Some(deadline) => {
                // Round up: waking a hair early would only mean a second, useless wakeup.
                let left = deadline.saturating_duration_since(Instant::now());
                let ms = left.as_micros().div_ceil(1000);
                PollTimeout::try_from(ms.min(i32::MAX as u128) as i32).unwrap_or(PollTimeout::MAX)
            }
        }
    }

    /// Every fd to poll, each with what it belongs to.
    fn poll_set(&self) -> (Vec<PollFd<'_>>, Vec<Source>) {
        let mut set: Vec<(BorrowedFd<'_>, PollFlags, Source)> = Vec::new();
        set.push((self.signals.fd(), PollFlags::POLLIN, Source::Signals));
        if let Some(control) = &self.control {
            set.extend(
                control.poll_set().into_iter().map(|(fd, f, t)| (fd, f, Source::Control(t))),
            );
        }
        if let Some(metrics) = &self.metrics {
            set.extend(
                metrics.poll_set().into_iter().map(|(fd, f, t)| (fd, f, Source::Metrics(t))),
            );
        }
        for (&unit, io) in &self.units {
            set.push((io.notify.fd(), PollFlags::POLLIN, Source::Notify(unit)));
        }
        // Only while --lazy waits for its first connection are the listeners watched: a
        // holder that wakes on every connection would cost CPU under load.
        if self.brain.wants_first_connection() {
            for listener in &self.held.listeners {
                set.push((listener.fd(), PollFlags::POLLIN, Source::LazyListener));
            }
        }
        // With --accept, sockhold accepts itself, unless --max-connections children run:
        // then the connections wait in the backlog.
        let accepting = matches!(&self.brain, Brain::PerConnection(a) if a.accepting())
            && !self.accept_exhausted;
        if accepting {
            for (i, acceptor) in self.acceptors.iter().enumerate() {
                set.push((acceptor.fd(), PollFlags::POLLIN, Source::Acceptor(i)));
            }
        }
        // HTTP probes waiting on their connection.
        for (&unit, io) in &self.units {
            if let Some((fd, flags)) = io.probe.as_ref().and_then(Probe::poll_fd) {
                set.push((fd, flags, Source::Probe(unit)));
            }
        }
        // Stored fds, asking for no event: the kernel reports POLLHUP and POLLERR regardless,
        // so a stored connection that is merely readable never wakes an idle sockhold.
        for fd in self.store.polled() {
            let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
            set.push((fd, PollFlags::empty(), Source::Stored(raw)));
        }
        set.into_iter().map(|(fd, flags, source)| (PollFd::new(fd, flags), source)).unzip()
    }

    /// Polls the set until something is ready or `timeout`, and sorts what is by source.
    fn poll(&self, timeout: PollTimeout) -> Result<Woken> {
        let (mut fds, sources) = self.poll_set();
        let timed_out = match poll(&mut fds, timeout) {
            Ok(n) => n == 0,
            Err(Errno::EINTR) => false,
            Err(e) => return Err(e).context("poll failed"),
        };
        let mut woken = Woken { timed_out, ..Woken::default() };
        let readable = |fd: &PollFd| fd.revents().is_some_and(|r| !r.is_empty());
        for (source, _) in sources.into_iter().zip(&fds).filter(|(_, fd)| readable(fd)) {
            match source {
                Source::Signals => woken.signals = true,
                Source::Control(token) => woken.control.push(token),
                Source::Notify(unit) => woken.notify.push(unit),
                Source::LazyListener => woken.first_connection = true,
                Source::Acceptor(i) => woken.connections.push(i),
                Source::Probe(unit) => woken.probes.push(unit),
                Source::Stored(raw) => woken.hung.push(raw),
                Source::Metrics(token) => woken.metrics.push(token),
            }
        }
        Ok(woken)
    }

    /// Turns what the poll found into events, always in the same order: probes, connections,
    /// the first connection, signals, notify datagrams, control requests; and a timer event
    /// when none of the last three brought one.
    fn dispatch(&mut self, woken: Woken, pending: &mut VecDeque<Event>) {
        let probes_done = !woken.probes.is_empty();
        self.advance_probes(&woken.probes, pending);
        let now = Instant::now();
        self.expire_probes(now, pending);
        // An event that may free an fd (a signal such as SIGCHLD, a client, a notify socket, a
        // probe, a deadline) puts the sockets left out for want of fds back in the poll. A
        // listener that is merely readable again does not: two exhausted listeners would wake
        // each other forever. So a sockhold out of fds sleeps instead of spinning.
        for &raw in &woken.hung {
            self.store.hung_up(raw);
        }
        let may_have_freed = woken.signals
            || woken.timed_out
            || !woken.hung.is_empty()
            || !woken.notify.is_empty()
            || probes_done
            || woken.control.iter().any(|t| matches!(t, Token::Client(_)))
            || woken.metrics.iter().any(|t| matches!(t, metrics::endpoint::Token::Client(_)));
        if may_have_freed {
            self.accept_exhausted = false;
            if let Some(control) = &mut self.control {
                control.resume_accepting();
            }
            if let Some(metrics) = &mut self.metrics {
                metrics.resume_accepting();
            }
        }
        for i in woken.connections {
            self.accept_one(i, pending);
        }
        if woken.first_connection {
            pending.push_back(Event::FirstConnection);
        }
        let before = pending.len();
        self.check_flows(now, pending);
        if woken.signals {
            self.read_signals(pending);
        }
        self.read_notify(&woken.notify, pending);
        self.serve_control(&woken.control, now, pending);
        self.serve_metrics(&woken.metrics, now);
        if pending.len() == before {
            pending.push_back(Event::Timer);
        }
    }

    /// Moves on the HTTP probes whose connection was ready; queues the outcome of those done.
    fn advance_probes(&mut self, units: &[u64], pending: &mut VecDeque<Event>) {
        for &unit in units {
            let Some(io) = self.units.get_mut(&unit) else { continue };
            if let Some(result) = io.probe.as_mut().and_then(Probe::on_ready) {
                io.probe = None;
                pending.push_back(Event::ProbeDone { unit, result });
            }
        }
    }

    /// Fails the probes whose time is up (an exec probe is killed, and reaped later).
    fn expire_probes(&mut self, now: Instant, pending: &mut VecDeque<Event>) {
        for (&unit, io) in &mut self.units {
            if let Some(probe) = io.probe.take_if(|p| p.deadline <= now) {
                pending.push_back(Event::ProbeDone { unit, result: Err(probe.time_out()) });
                self.killed_probes.extend(probe.pid());
            }
        }
    }

    /// With `--accept`: accepts one waiting connection on acceptor `i` and starts its child.
    fn accept_one(&mut self, i: usize, pending: &mut VecDeque<Event>) {
        // One connection per listener and wake-up: the supervisor counts the child before
        // the next poll decides whether to accept more.
        match self.acceptors[i].accept() {
            Ok(Some((conn, peer))) => {
                if self.accept_episode {
                    info!("--accept: accepting connections again");
                    self.accept_episode = false;
                }
                pending.push_back(self.spawn_connection(conn, peer));
            }
            Ok(None) => {}
            Err(e) => {
                if !self.accept_episode {
                    warn!(
                        "--accept: accept failed: {e}; connections wait in the backlog until sockhold has a file descriptor free"
                    );
                }
                self.accept_episode = true;
                self.accept_exhausted = true;
            }
        }
    }

    /// Turns the signals that arrived into events (SIGCHLD: the children that ended).
    fn read_signals(&mut self, pending: &mut VecDeque<Event>) {
        for signal in self.signals.pending() {
            match signal {
                Signal::SIGCHLD => self.reap(pending),
                Signal::SIGHUP => self.reload_requested(pending),
                Signal::SIGTERM | Signal::SIGINT => {
                    pending.push_back(Event::Stop(format!("received SIG{}", signal_name(signal))))
                }
                Signal::SIGUSR2 => {
                    info!("received SIGUSR2: upgrading in place");
                    pending.push_back(Event::Upgrade { asker: None });
                }
                s if is_forwarded(s) => pending.push_back(Event::Forward(s)),
                s => debug!("ignoring SIG{}", signal_name(s)),
            }
        }
    }

    /// Queues every datagram waiting on the ready notify sockets. The fd store's requests
    /// (`FDSTOREREMOVE=1`, then `FDSTORE=1` with its fds, as systemd orders them) are carried
    /// out here, for senders `--notify-access` allows; the fds of any other message were
    /// closed on arrival.
    fn read_notify(&mut self, units: &[u64], pending: &mut VecDeque<Event>) {
        for &unit in units {
            let Some(io) = self.units.get(&unit) else { continue };
            for mut received in io.notify.receive_all() {
                let message = &received.message;
                if message.fd_store || message.fd_store_remove {
                    let allowed = match &self.brain {
                        Brain::Generations(s) => {
                            s.notify_allowed(unit, received.sender, received.sender_pgid)
                        }
                        Brain::PerConnection(_) => None,
                    };
                    // A sender not allowed is warned about when the machine sees the message;
                    // its fds close here.
                    if let Some(generation) = allowed {
                        let name = message.fd_name.as_deref();
                        if message.fd_store_remove {
                            self.store.remove(generation, name);
                        }
                        let fds = std::mem::take(&mut received.fds);
                        self.store.store(generation, name, !message.fd_no_poll, fds);
                    }
                }
                pending.push_back(Event::Notify {
                    unit,
                    sender: received.sender,
                    sender_pgid: received.sender_pgid,
                    message: received.message,
                });
            }
        }
    }

    /// Reads the ready control clients (and accepts new ones), drops the idle ones, and
    /// handles every complete request.
    fn serve_control(&mut self, ready: &[Token], now: Instant, pending: &mut VecDeque<Event>) {
        let Some(control) = &mut self.control else { return };
        let mut requests = Vec::new();
        for &token in ready {
            requests.extend(control.on_ready(token, now));
        }
        control.expire(now);
        for (client, request) in requests {
            self.handle_request(client, request, pending);
        }
    }

    /// Queues a reload request (SIGHUP, `ctl reload`), noting when the first one not yet
    /// served arrived.
    fn reload_requested(&mut self, pending: &mut VecDeque<Event>) {
        self.reload_requested.get_or_insert_with(Instant::now);
        pending.push_back(Event::Reload);
    }

    /// Reads the ready scrapes (and accepts new ones), drops the late ones, and answers every
    /// complete request for the exposition, rendered once for all of them.
    fn serve_metrics(&mut self, ready: &[metrics::endpoint::Token], now: Instant) {
        let Some(server) = &mut self.metrics else { return };
        let mut due = Vec::new();
        for &token in ready {
            due.extend(server.on_ready(token, now));
        }
        server.expire(now);
        if due.is_empty() {
            return;
        }
        let body = self.render_metrics();
        if let Some(server) = &mut self.metrics {
            for (client, head) in due {
                server.answer(client, head, &body);
            }
        }
    }

    /// The exposition, as of now.
    fn render_metrics(&self) -> String {
        let now = Instant::now();
        let wall = SystemTime::now();
        let seconds = |t: SystemTime| {
            t.duration_since(SystemTime::UNIX_EPOCH).map_or(0.0, |d| d.as_millis() as f64 / 1e3)
        };
        let at = |t: Instant| wall.checked_sub(now.saturating_duration_since(t)).unwrap_or(wall);
        let units = self.brain.generations();
        let mut children = metrics::Children::default();
        for unit in &units {
            match unit.state {
                "starting" => children.starting += 1,
                "serving" => children.serving += 1,
                _ => children.stopping += 1,
            }
        }
        // The newest serving generation, ready since its first process was.
        let serving = units.iter().filter(|u| u.state == "serving").map(|u| u.id).max().map(|id| {
            let since = units.iter().filter(|u| u.id == id && u.state == "serving");
            (id, seconds(at(since.map(|u| u.since).min().unwrap_or(now))))
        });
        let flows = self.flows_by_generation();
        metrics::render(&metrics::Sample {
            version: env!("CARGO_PKG_VERSION"),
            start_time: seconds(self.started),
            counters: &self.counters,
            upgrades_succeeded: self.upgrade.status().count,
            restarts: self.brain.restarts(),
            serving,
            children,
            flows: flows.as_ref(),
            fd_store: (self.store.max() > 0).then(|| self.store.names().len()),
        })
    }

    /// Answers a control request at once, or turns it into an event (a reload is answered when
    /// it ends).
    fn handle_request(
        &mut self,
        client: ClientId,
        request: Request,
        pending: &mut VecDeque<Event>,
    ) {
        debug!("control client {client}: {request:?}");
        let answer = match request {
            Request::Status => self.status(),
            Request::Reload => {
                self.reload_waiters.push((client, None));
                self.reload_requested(pending);
                return;
            }
            Request::Stop => {
                pending.push_back(Event::Stop("ctl stop".into()));
                Answer::Done
            }
            Request::Signal { signal } => match self.brain.serving_pids().as_slice() {
                [] => error_answer("no child is serving: nothing to send the signal to"),
                pids => {
                    pending.push_back(Event::Forward(signal));
                    let pids: Vec<i32> = pids.iter().map(|p| p.as_raw()).collect();
                    Answer::Signalled(Signalled { pid: pids[0], pids })
                }
            },
            Request::Upgrade => {
                // Answered by the new program, or here if the upgrade fails.
                pending.push_back(Event::Upgrade { asker: Some(client) });
                return;
            }
        };
        if let Some(control) = &mut self.control {
            control.answer(client, &answer);
        }
    }

    fn answer_client(&mut self, client: ClientId, answer: &Answer) {
        if let Some(control) = &mut self.control {
            control.answer(client, answer);
        }
    }

    /// The `status` answer.
    fn status(&self) -> Answer {
        let now = Instant::now();
        let wall = SystemTime::now();
        let at = |t: Instant| {
            let when = wall.checked_sub(now.saturating_duration_since(t)).unwrap_or(wall);
            humantime::format_rfc3339_seconds(when).to_string()
        };
        let listeners: Vec<protocol::Listener> = self
            .held
            .listeners
            .iter()
            .enumerate()
            .map(|(i, l)| protocol::Listener {
                fd: 3 + i,
                name: l.name().to_owned(),
                address: l.local_description().to_owned(),
            })
            .collect();
        // One entry per generation, its processes (workers) listed in it; the generation's
        // state is the most alive of theirs, so a half-replaced generation still shows serving.
        let units = self.brain.generations();
        let flows = self.flows_by_generation();
        let mut ids: Vec<u64> = units.iter().map(|u| u.id).collect();
        ids.sort_unstable();
        ids.dedup();
        let rank = |state: &str| {
            ["serving", "starting", "stopping", "killed"].iter().position(|s| *s == state)
        };
        let generations: Vec<protocol::Generation> = ids
            .into_iter()
            .map(|id| {
                let of: Vec<&GenerationInfo> = units.iter().filter(|u| u.id == id).collect();
                let state = of.iter().map(|u| u.state).min_by_key(|s| rank(s)).unwrap_or("?");
                let since = of.iter().map(|u| u.since).min().unwrap_or(now);
                let workers = of
                    .iter()
                    .map(|u| protocol::Worker {
                        pid: u.pid.map(|p| p.as_raw()),
                        state: u.state.to_owned(),
                        since: at(u.since),
                    })
                    .collect();
                protocol::Generation {
                    id,
                    pids: of.iter().filter_map(|u| u.pid).map(|p| p.as_raw()).collect(),
                    state: state.to_owned(),
                    since: at(since),
                    status: of.iter().find_map(|u| u.status.clone()),
                    workers,
                    flows: flows.as_ref().map(|f| f.get(&id).copied().unwrap_or(0)),
                }
            })
            .collect();
        Answer::Status(Box::new(protocol::Status {
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            name: self.config.name.clone(),
            started: humantime::format_rfc3339_seconds(self.started).to_string(),
            listeners,
            generations,
            fd_store: (self.store.max() > 0).then(|| protocol::FdStoreStatus {
                max: self.store.max(),
                names: self.store.names().into_iter().map(str::to_owned).collect(),
            }),
            restarts: self.brain.restarts(),
            last_reload: self.last_reload.clone(),
            upgrades: self.upgrade.status(),
        }))
    }

    /// Reaps every child that has ended. A generation's leftover processes (workers, daemons it
    /// forked) go with it: its process group is SIGKILLed while the leader is still a zombie, so
    /// the group id cannot have been reused by an unrelated process. With `--kill-mode process`
    /// they are left to run.
    fn reap(&mut self, pending: &mut VecDeque<Event>) {
        let leaders: Vec<Pid> = self.brain.live_pids().into_iter().map(|(_, pid)| pid).collect();
        loop {
            let pid = match peek_ended_child() {
                Ok(None) => break,
                Ok(Some(pid)) => pid,
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    warn!("waitid failed: {e}");
                    break;
                }
            };
            if let Some((unit, probe)) = self.take_exec_probe(pid) {
                let result = match reap(pid) {
                    Ok(Some(status)) => probe.exited(&status),
                    Ok(None) => continue,
                    Err(e) => Err(format!("cannot collect the probe command: {e}")),
                };
                pending.push_back(Event::ProbeDone { unit, result });
                continue;
            }
            if let Some(i) = self.killed_probes.iter().position(|p| *p == pid) {
                self.killed_probes.swap_remove(i);
                let _ = reap(pid);
                debug!("reaped the killed probe command (pid {pid})");
                continue;
            }
            let leader = leaders.contains(&pid);
            if leader {
                // Once a child of the handed-over state is reaped, that state no longer
                // describes the children: a crash from here on cannot go back to it.
                self.end_probation("the new program reaps a child");
                if self.config.policy.kill_mode.group_ends_with_main() {
                    match killpg(pid, Signal::SIGKILL) {
                        Ok(()) | Err(Errno::ESRCH) => {}
                        Err(e) => warn!("failed to kill what is left of process group {pid}: {e}"),
                    }
                }
            }
            match reap(pid) {
                Ok(status) => {
                    if let Some(status) = status {
                        if !leader {
                            // Re-parented to sockhold (PID 1, --subreaper): reaped, never a zombie.
                            info!("reaped orphan pid {pid}: {status}");
                        }
                        pending.push_back(Event::Exited { pid, status });
                    }
                }
                Err(e) => {
                    warn!("waitpid({pid}) failed: {e}");
                    break;
                }
            }
        }
    }

    /// Carries out one action; returns the exit code when it is `Exit`.
    fn perform(&mut self, action: Action, pending: &mut VecDeque<Event>) -> Option<ExitCode> {
        match action {
            Action::Spawn { unit, generation } => {
                // Answered at once, ahead of anything else queued: the supervisor counts on
                // knowing the pid before the next event.
                let event = self.spawn_unit(unit, generation);
                pending.push_front(event);
            }
            Action::Probe { unit, pid, generation } => {
                if let Err(error) = self.start_probe(unit, pid, generation) {
                    pending.push_back(Event::ProbeDone { unit, result: Err(error) });
                }
            }
            Action::Signal { pid, signal } => {
                debug!("sending SIG{} to pid {pid}", signal_name(signal));
                match kill(pid, signal) {
                    Ok(()) | Err(Errno::ESRCH) => {}
                    Err(e) => warn!("failed to send SIG{} to pid {pid}: {e}", signal_name(signal)),
                }
            }
            Action::SignalGroup { pgid, signal } => match killpg(pgid, signal) {
                Ok(()) | Err(Errno::ESRCH) => {}
                Err(e) => {
                    warn!("failed to send SIG{} to process group {pgid}: {e}", signal_name(signal))
                }
            },
            Action::Release { unit } => {
                self.watched.remove(&unit);
                if let Some(mut io) = self.units.remove(&unit) {
                    if let Some(probe) = io.probe.take() {
                        probe.kill();
                        self.killed_probes.extend(probe.pid());
                    }
                    self.release_steered(std::mem::take(&mut io.steered));
                }
                self.repair_listeners();
            }
            Action::NewFlowsTo { units } => {
                self.new_flow_units = units;
                self.steer_new_flows();
            }
            Action::WatchFlows { unit, generation, pid } => {
                let at = Instant::now();
                self.watched.insert(unit, Watch { generation, pid, at, announced: false });
                self.check_flows(at, pending);
            }
            Action::Manager(message) => {
                if let Some(manager) = &self.manager {
                    manager.send(&message);
                }
            }
            Action::ReloadStarted { generation } => {
                for (_, started) in &mut self.reload_waiters {
                    started.get_or_insert(generation);
                }
                let requested = self.reload_requested.take().unwrap_or_else(Instant::now);
                self.reloads_started.insert(generation, requested);
            }
            Action::ReloadDone { generation, result } => self.reload_done(generation, result),
            Action::Upgrade { asker } => self.upgrade.ask(asker),
            Action::Exit(code) => return Some(code),
        }
        None
    }

    /// Records a reload's outcome and answers the clients that waited for it.
    fn reload_done(&mut self, generation: Option<u64>, result: Result<(), String>) {
        let answer = match &result {
            // No child serves in per-connection mode (each one serves its connection): say
            // what the reload changed instead of naming no pid.
            Ok(()) if matches!(self.brain, Brain::PerConnection(_)) => {
                Answer::Reloaded(Reloaded::explained(
                    generation,
                    format!(
                        "--accept: each connection starts a new child, which reads the command, --env-file and --user afresh; new connections now run as generation {}, running ones finish as they are",
                        generation.unwrap_or_default()
                    ),
                ))
            }
            // Nothing to replace, and nothing went wrong: the first connection starts the
            // command as it is then, which is what the reload asks for.
            Ok(()) if generation.is_none() => Answer::Reloaded(Reloaded::explained(
                None,
                "no child started yet (--lazy): the first connection will start generation 1",
            )),
            Ok(()) => {
                let pid = self.brain.serving_pids().first().map(|p| p.as_raw());
                Answer::Reloaded(Reloaded::serving(generation, pid))
            }
            Err(reason) => error_answer(&format!("reload failed: {reason}")),
        };
        match generation {
            Some(generation) => {
                let wall = SystemTime::now();
                let at = humantime::format_rfc3339_seconds(wall).to_string();
                self.last_reload = Some(LastReload::new(generation, &result, at));
                // A reload that was in progress across a self-upgrade has no start here: it is
                // counted, but its duration is not observed.
                let took = self.reloads_started.remove(&generation).map(|requested| {
                    u64::try_from(requested.elapsed().as_nanos()).unwrap_or(u64::MAX)
                });
                self.counters.reload_ended(result.is_ok(), epoch_ms(wall), took);
            }
            // Answered without starting a generation (stopping, or --lazy before the first
            // connection): no reload was done for the requests so far.
            None => self.reload_requested = None,
        }
        let (done, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.reload_waiters)
            .into_iter()
            .partition(|(_, g)| *g == generation);
        self.reload_waiters = waiting;
        for (client, _) in done {
            self.answer_client(client, &answer);
        }
    }

    /// Takes the exec probe whose process has this pid, with its unit.
    fn take_exec_probe(&mut self, pid: Pid) -> Option<(u64, Probe)> {
        self.units.iter_mut().find_map(|(&unit, io)| {
            io.probe.take_if(|p| p.pid() == Some(pid)).map(|probe| (unit, probe))
        })
    }

    /// Starts one readiness probe of a unit.
    fn start_probe(&mut self, unit: u64, pid: Pid, generation: u64) -> Result<(), String> {
        let now = Instant::now();
        let timeout = self.config.probe_timeout;
        let io = self.units.get_mut(&unit).ok_or("the unit is gone")?;
        let probe = match &self.config.policy.ready {
            ReadyMode::Http(path) => {
                let addr = io.health.ok_or("no health listener")?;
                Probe::http(addr, path, timeout, now)?
            }
            ReadyMode::Exec(argv) => {
                let env = [
                    ("SOCKHOLD_CHILD_PID".to_string(), pid.to_string()),
                    ("SOCKHOLD_GENERATION".to_string(), generation.to_string()),
                ];
                Probe::exec(argv, &env, timeout, now)?
            }
            ReadyMode::Notify | ReadyMode::Delay(_) => return Err("nothing to probe".into()),
        };
        debug!("probing generation {generation} (pid {pid})");
        io.probe = Some(probe);
        Ok(())
    }

    fn spawn_unit(&mut self, unit: u64, generation: u64) -> Event {
        let failed = |error: String| Event::SpawnFailed { unit, error, code: ExitCode::FAILURE };
        let runtime_dir = self.held.runtime_dir.as_ref().expect("created in new");
        let socket_path = runtime_dir.join(format!("notify-{unit}.sock"));
        let socket = match NotifySocket::bind(&socket_path) {
            Ok(s) => s,
            Err(e) => return failed(format!("{e:#}")),
        };
        // --ready http: the child's own health listener, the fd after the held ones. sockhold
        // keeps only its address: once the child has it, a probe there reaches that child alone.
        let health = match self.config.policy.ready {
            ReadyMode::Http(_) => match std::net::TcpListener::bind(("127.0.0.1", 0))
                .and_then(|l| l.local_addr().map(|a| (l, a)))
            {
                Ok(pair) => Some(pair),
                Err(e) => return failed(format!("failed to bind a health listener: {e}")),
            },
            _ => None,
        };
        self.repair_listeners();
        // steer=flow: the unit's own socket of each steered listener, in a slot of its own.
        let mut steered = Vec::new();
        for listener in 0..self.held.listeners.len() {
            if self.held.listeners[listener].steering().is_none() {
                continue;
            }
            match self.held.listeners[listener].unit_socket() {
                Ok((fd, slot)) => steered.push(UnitSocket { listener, fd, slot }),
                Err(e) => {
                    self.release_steered(steered);
                    return failed(format!("{e:#}"));
                }
            }
        }
        // O_NONBLOCK lives on the open file description that sockhold and every generation
        // share, and a server that set it relies on it: clearing it under HAProxy leaves its
        // workers blocked in accept() through their soft stop, under lighttpd it stops
        // answering after a failed reload. So the spec's mode (blocking, or `nonblock`) is
        // given only while no child of any generation holds the socket: at the first start,
        // and when a restart finds nothing alive. Otherwise the new child inherits what the
        // serving one set.
        if self.brain.live_pids().is_empty() {
            for listener in &self.held.listeners {
                if let Err(e) = listener.set_spec_mode() {
                    warn!("{e:#}");
                }
            }
        }
        let sockets: Vec<plan::Socket<'_>> = self
            .held
            .listeners
            .iter()
            .zip(&self.config.listen)
            .map(|(listener, spec)| plan::Socket {
                name: listener.name(),
                given: spec.text.split(',').next().unwrap_or_default(),
                bound: listener.local_description(),
            })
            .collect();
        let stored_names = self.store.names();
        let stored_fds = self.store.fds();
        let (mut spec, plan_fds) = plan::generation(
            self.command(),
            plan::Generation {
                sockets: &sockets,
                generation,
                notify_path: socket.path(),
                health: health.is_some(),
                watchdog: self.config.policy.watchdog,
                compat: &self.config.compat_env,
                supervisor_pid: std::process::id(),
                fd_store_max: self.store.max(),
                stored: &stored_names,
            },
        );
        if let Err(error) = self.config.world.apply(&mut spec, Some(socket.path())) {
            return failed(error);
        }
        let fds: Vec<BorrowedFd<'_>> = plan_fds
            .iter()
            .filter_map(|fd| match fd {
                plan::Fd::Listener(i) => Some(match steered.iter().find(|s| s.listener == *i) {
                    Some(own) => std::os::fd::AsFd::as_fd(&own.fd),
                    None => self.held.listeners[*i].fd(),
                }),
                plan::Fd::Health => health.as_ref().map(|(l, _)| std::os::fd::AsFd::as_fd(l)),
                plan::Fd::Stored(i) => Some(stored_fds[*i]),
            })
            .collect();
        let result = spawn(&spec, &fds, None);
        drop(fds);
        drop(stored_fds);
        drop(stored_names);
        match result {
            Ok(pid) => {
                let health = health.map(|(_, addr)| addr);
                self.units.insert(unit, UnitIo { notify: socket, health, probe: None, steered });
                Event::Spawned { unit, pid }
            }
            Err(e) => {
                self.release_steered(steered);
                Event::SpawnFailed { unit, error: e.message, code: e.code }
            }
        }
    }

    /// Starts the child for one accepted connection (`--accept`).
    fn spawn_connection(&self, conn: std::os::fd::OwnedFd, peer: Option<SocketAddr>) -> Event {
        use std::os::fd::AsFd;
        let Brain::PerConnection(accept) = &self.brain else {
            unreachable!("connections are accepted only in --accept mode")
        };
        let generation = accept.generation();
        let inetd = self.config.accept.as_ref().is_some_and(|a| a.inetd);
        let (mut spec, fd) = plan::connection(self.command(), generation, peer, inetd);
        if let Err(error) = self.config.world.apply(&mut spec, None) {
            return Event::SpawnFailed { unit: generation, error, code: ExitCode::FAILURE };
        }
        let result = match fd {
            plan::ConnectionFd::Stdio => spawn(&spec, &[], Some(conn.as_fd())),
            plan::ConnectionFd::Listen => spawn(&spec, &[conn.as_fd()], None),
        };
        // sockhold's copy of the connection closes here: the child has its own.
        match result {
            Ok(pid) => Event::Spawned { unit: generation, pid },
            Err(e) => Event::SpawnFailed { unit: generation, error: e.message, code: e.code },
        }
    }

    /// COMMAND and the environment every child inherits.
    fn command(&self) -> plan::Command<'_> {
        plan::Command {
            argv: &self.config.command,
            base_env: &self.base_env,
            argv0: self.config.argv0.as_ref(),
        }
    }
}

/// `steer=flow`: the units' own sockets, where new flows go, and the flows of kept units.
impl EventLoop {
    /// The units the machine keeps for their flows: `(unit, generation, pid)`.
    fn brain_kept_units(&self) -> Vec<(u64, u64, Pid)> {
        match &self.brain {
            Brain::Generations(s) => s.kept_units(),
            Brain::PerConnection(_) => Vec::new(),
        }
    }

    /// Empties the slots of a unit's own sockets (forgetting their flows) and closes them.
    fn release_steered(&mut self, steered: Vec<UnitSocket>) {
        for own in steered {
            self.held.listeners[own.listener].release_slot(own.fd, own.slot);
        }
    }

    /// Points each steered listener's new flows at the slots of [`Self::new_flow_units`].
    fn steer_new_flows(&self) {
        for (i, listener) in self.held.listeners.iter().enumerate() {
            let Some(steering) = listener.steering() else { continue };
            let slots: Vec<u32> = (self.new_flow_units.iter())
                .filter_map(|unit| self.units.get(unit))
                .flat_map(|io| io.steered.iter().filter(|s| s.listener == i).map(|s| s.slot))
                .take(crate::steer::MAX_NEW_FLOW_SLOTS as usize)
                .collect();
            // No unit: the spare socket queues them for the next one.
            let slots = match listener.spare_slot() {
                Some(spare) if slots.is_empty() => vec![spare],
                _ => slots,
            };
            debug!(
                "steer=flow on {}: new flows go to slots {slots:?}",
                listener.local_description()
            );
            if let Err(e) = steering.set_new_flow_slots(&slots) {
                warn!("steer=flow on {}: {e:#}", listener.local_description());
            }
        }
    }

    /// Per steered listener, the flows of each slot and the steering clock's now; `None` where
    /// the table could not be read (logged).
    fn flow_tables(&self) -> Vec<Option<(BTreeMap<u32, crate::steer::SlotFlows>, Duration)>> {
        (self.held.listeners.iter())
            .map(|listener| {
                let steering = listener.steering()?;
                match steering.flows_by_slot() {
                    Ok(table) => Some((table, steering.now())),
                    Err(e) => {
                        warn!("steer=flow on {}: {e:#}", listener.local_description());
                        None
                    }
                }
            })
            .collect()
    }

    /// How many flows a unit owns, and how long since the last datagram of any of them.
    fn unit_flows(
        io: &UnitIo,
        tables: &[Option<(BTreeMap<u32, crate::steer::SlotFlows>, Duration)>],
    ) -> (usize, Duration) {
        let mut count = 0;
        let mut quiet = Duration::MAX;
        for own in &io.steered {
            let Some((table, now)) = &tables[own.listener] else { continue };
            if let Some(flows) = table.get(&own.slot) {
                count += flows.count;
                quiet = quiet.min(now.saturating_sub(flows.last_seen));
            }
        }
        (count, quiet)
    }

    /// Looks at the flows of the kept units that are due: one that owns none, or whose flows
    /// have been quiet for `--flow-idle`, is reported idle; the others are looked at again when
    /// they would be.
    fn check_flows(&mut self, now: Instant, pending: &mut VecDeque<Event>) {
        if !self.watched.values().any(|w| w.at <= now) {
            return;
        }
        let idle_after = self.config.policy.flow_steering.unwrap_or_default();
        let tables = self.flow_tables();
        let mut idle = Vec::new();
        for (&unit, watch) in &mut self.watched {
            if watch.at > now {
                continue;
            }
            let (count, quiet) = self
                .units
                .get(&unit)
                .map_or((0, Duration::MAX), |io| Self::unit_flows(io, &tables));
            if count == 0 || quiet >= idle_after {
                idle.push((unit, count));
                continue;
            }
            if !watch.announced {
                info!(
                    "generation {} (pid {}) is kept for its {count} flow(s) until they are idle for {}",
                    watch.generation,
                    watch.pid,
                    humantime::format_duration(idle_after)
                );
                watch.announced = true;
            }
            watch.at = now + (idle_after - quiet);
        }
        for (unit, flows) in idle {
            self.watched.remove(&unit);
            pending.push_back(Event::FlowsIdle { unit, flows });
        }
    }

    /// With `steer=flow`: how many flows each generation owns, over every steered listener;
    /// `None` without a steered listener.
    fn flows_by_generation(&self) -> Option<BTreeMap<u64, usize>> {
        if !self.held.listeners.iter().any(|l| l.steering().is_some()) {
            return None;
        }
        let tables = self.flow_tables();
        let mut out = BTreeMap::new();
        for info in self.brain.generations() {
            let count = self.units.get(&info.unit).map_or(0, |io| Self::unit_flows(io, &tables).0);
            *out.entry(info.id).or_insert(0) += count;
        }
        Some(out)
    }
}

impl EventLoop {
    /// Repairs every listener a child has shut down ([`Listener::ensure_listening`]): before a
    /// generation starts, so that it gets sockets that listen, and when one has ended (often
    /// the one that broke it), so that the generations still running accept again. With
    /// `--accept`, children never get the listeners, and sockhold's acceptors hold copies that
    /// a replaced socket would leave behind.
    fn repair_listeners(&mut self) {
        if !self.acceptors.is_empty() {
            return;
        }
        for listener in &mut self.held.listeners {
            if let Err(e) = listener.ensure_listening() {
                log::error!("{e:#}");
            }
        }
    }
}

/// Milliseconds since the epoch.
fn epoch_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Whether carrying out `action` acts on a child, which ends an upgraded program's probation
/// before it is carried out (the state a crash would hand back would no longer describe the
/// children). Telling the manager,
/// probing, recording a request for an upgrade, or answering a reload before the first
/// connection does not.
fn acts_on_a_child(action: &Action) -> bool {
    !matches!(
        action,
        Action::Manager(_)
            | Action::Probe { .. }
            | Action::Upgrade { .. }
            | Action::ReloadDone { generation: None, result: Ok(()) }
    )
}

//! The one event loop: turns syscalls into [`Event`]s for the supervisor and its [`Action`]s back
//! into syscalls.
//!
//! It owns what lives as long as sockhold: the held listeners, the signal self-pipe, the notify
//! socket of every live generation, the control socket and the clients waiting for a reload, the
//! runtime directory, the pid file, and the link to sockhold's own service manager. One thread,
//! one `poll` over the signal pipe, the control socket and its clients, and the notify sockets,
//! with the nearest deadline as the timeout: while nothing happens, sockhold sleeps without
//! waking. The listeners are never polled: only children accept on them.
//!
//! It must not make lifecycle decisions: those belong to [`Supervisor::step`].

pub mod handover;

use std::collections::{BTreeMap, VecDeque};
use std::ffi::OsString;
use std::os::fd::BorrowedFd;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime};

use anyhow::{Context, Result};
use log::{debug, info, warn};
use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::wait::waitpid;
use nix::unistd::Pid;

use crate::accept::AcceptSupervisor;
use crate::cli::{CompatEnv, Config};
use crate::control::{ClientId, ControlServer, Request, Token, error_answer, is_exhaustion};
use crate::exit::ExitCode;
use crate::listen::Listener;
use crate::notify::{Manager, ManagerMessage, NotifySocket};
use crate::paths::PidFile;
use crate::probe::Probe;
use crate::protocol::{self, Answer, LastReload, Reloaded, Signalled};
use crate::signals::{Signal, Signals, is_forwarded, signal_name};
use crate::spawn::{ChildSpec, spawn};
use crate::supervisor::{Action, Event, GenerationInfo, ReadyMode, Supervisor};
use crate::sys::{kill, killpg, peek_ended_child, reap};

/// Environment variables of sockhold's own that must not reach a child: they describe sockhold's
/// sockets and manager, not the child's (a stale `LISTEN_PIDFDID` makes libsystemd ignore every
/// socket; a stale `NOTIFY_SOCKET` would let the child speak for sockhold).
/// The same goes for the variables of other socket-passing tools, which would name fds the child
/// does not have.
fn is_stripped(name: &str) -> bool {
    name.starts_with("LISTEN_")
        || name == "NOTIFY_SOCKET"
        || name.starts_with("WATCHDOG_")
        || name.starts_with("EINHORN_")
        || name.starts_with("SERVER_STARTER_")
        || name == "NGINX"
        || name.starts_with("SOCKHOLD_UPGRADE_")
}

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
}

/// sockhold at work: the resources it holds and what decides.
pub struct EventLoop {
    config: Config,
    held: Held,
    signals: Signals,
    brain: Brain,
    /// The notify socket of every live unit, by unit key.
    notify: BTreeMap<u64, NotifySocket>,
    /// With `--ready http:`: the address of each starting unit's private health listener.
    health: BTreeMap<u64, std::net::SocketAddr>,
    /// Readiness probes in flight, by unit key.
    probes: BTreeMap<u64, Probe>,
    /// Exec probes killed (timed out, or their unit gone) and not reaped yet: no orphans.
    killed_probes: Vec<Pid>,
    manager: Option<Manager>,
    base_env: Vec<(OsString, OsString)>,
    control: Option<ControlServer>,
    /// Control clients waiting for a reload: the reload that started for them, once one has.
    reload_waiters: Vec<(ClientId, Option<u64>)>,
    /// The outcome of the last reload, for `status`.
    last_reload: Option<LastReload>,
    started: SystemTime,
    /// `--lazy` and no child started yet: the listeners are polled for the first connection.
    lazy_waiting: bool,
    /// With `--accept`: the listeners sockhold accepts on itself.
    acceptors: Vec<Acceptor>,
    /// With `--accept`: accept() ran out of fds or memory. The listeners are left out of the
    /// poll until another event, which may have freed one (polling them would spin: the
    /// connection stays queued), and the episode is logged once.
    accept_exhausted: bool,
    accept_episode: bool,
    /// Self-upgrade: who asked, where from, how the last one went.
    upgrade: handover::Upgrades,
}

/// A listener sockhold accepts on itself (`--accept`): a copy of the held fd, as std's type.
enum Acceptor {
    Tcp(std::net::TcpListener),
    Unix(std::os::unix::net::UnixListener),
}

impl Acceptor {
    /// Wraps a copy of a held stream listener; any other kind is refused.
    fn new(listener: &Listener) -> Result<Acceptor> {
        use nix::sys::socket::{
            AddressFamily, SockType, SockaddrLike, SockaddrStorage, getsockname, getsockopt,
            sockopt,
        };
        let what = listener.local_description();
        let kind = getsockopt(&listener.fd(), sockopt::SockType)
            .with_context(|| format!("cannot inspect {what}"))?;
        if kind != SockType::Stream {
            anyhow::bail!("--accept takes stream sockets only, and {what} is not one");
        }
        let fd = nix::unistd::dup(listener.fd()).with_context(|| format!("cannot copy {what}"))?;
        let family = getsockname::<SockaddrStorage>(std::os::fd::AsRawFd::as_raw_fd(&fd))
            .ok()
            .and_then(|a| a.family());
        Ok(match family {
            Some(AddressFamily::Unix) => Acceptor::Unix(fd.into()),
            _ => Acceptor::Tcp(fd.into()),
        })
    }

    fn fd(&self) -> BorrowedFd<'_> {
        use std::os::fd::AsFd;
        match self {
            Acceptor::Tcp(l) => l.as_fd(),
            Acceptor::Unix(l) => l.as_fd(),
        }
    }

    /// The next waiting connection and its peer (for TCP), or `None` when none waits. The error
    /// is an exhaustion ([`is_exhaustion`]): the connection still waits.
    fn accept(
        &self,
    ) -> std::io::Result<Option<(std::os::fd::OwnedFd, Option<std::net::SocketAddr>)>> {
        let result = match self {
            Acceptor::Tcp(l) => l.accept().map(|(c, peer)| (c.into(), Some(peer))),
            Acceptor::Unix(l) => l.accept().map(|(c, _)| (c.into(), None)),
        };
        match result {
            Ok(conn) => Ok(Some(conn)),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
            Err(e) if is_exhaustion(&e) => Err(e),
            Err(e) => {
                // ECONNABORTED and the like: that connection is gone, the listener is fine.
                debug!("accept: {e}");
                Ok(None)
            }
        }
    }
}

/// What sockhold created and removes when it ends, however it ends: the listeners (and the Unix
/// socket files it bound), the runtime directory, the pid file.
#[derive(Default)]
struct Held {
    listeners: Vec<Listener>,
    runtime_dir: Option<PathBuf>,
    pid_file: Option<PidFile>,
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
        let base_env: Vec<_> =
            std::env::vars_os().filter(|(k, _)| !is_stripped(&k.to_string_lossy())).collect();
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
        if let Some(path) = &config.pid_file {
            held.pid_file = Some(PidFile::create(path, std::process::id())?);
        }
        let control = match &config.control {
            Some(path) => Some(ControlServer::bind(path)?),
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
        Ok(EventLoop {
            control,
            reload_waiters: Vec::new(),
            last_reload: None,
            started: SystemTime::now(),
            lazy_waiting: config.lazy,
            acceptors,
            accept_exhausted: false,
            accept_episode: false,
            config,
            held,
            signals,
            brain,
            notify: BTreeMap::new(),
            health: BTreeMap::new(),
            probes: BTreeMap::new(),
            killed_probes: Vec::new(),
            manager,
            base_env,
            upgrade: handover::Upgrades::at_start(),
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
        // The notify sockets go first; `held` then removes the runtime directory and the rest.
        self.notify.clear();
        self.control = None;
        result
    }

    fn serve(&mut self) -> Result<ExitCode> {
        let mut pending = VecDeque::new();
        if self.upgrade.resumed {
            // Taken over from the previous program: the children run. Reap the ones that ended
            // during the change (their SIGCHLD may have been merged into one already read).
            self.reap(&mut pending);
        } else if self.lazy_waiting {
            info!("--lazy: the first connection or datagram starts generation 1");
            if let Some(manager) = &self.manager {
                manager.send(&ManagerMessage::Ready(
                    "listening; waiting for the first connection".into(),
                ));
            }
        } else if self.acceptors.is_empty() {
            pending.push_back(Event::Start);
        } else {
            info!("--accept: one child per connection");
            if let Some(manager) = &self.manager {
                manager
                    .send(&ManagerMessage::Ready("accepting connections for generation 1".into()));
            }
        }
        loop {
            let mut acted = false;
            while let Some(event) = pending.pop_front() {
                let actions = self.brain.step(event, Instant::now());
                for action in actions {
                    acted |= !matches!(action, Action::Manager(_) | Action::Probe { .. });
                    if let Some(code) = self.perform(action, &mut pending) {
                        return Ok(code);
                    }
                }
            }
            self.after_turn(acted);
            self.upgrade_if_asked();
            self.wait(&mut pending)?;
        }
    }

    /// Blocks in poll until a signal, a notify datagram or the next deadline, and queues what
    /// happened.
    fn wait(&mut self, pending: &mut VecDeque<Event>) -> Result<()> {
        let deadline = [
            self.brain.next_deadline(),
            self.control.as_ref().and_then(|c| c.next_deadline()),
            self.probes.values().map(|p| p.deadline).min(),
            // One wakeup at the end of probation, to close the state and the old binary.
            self.upgrade.probation_deadline(),
        ]
        .into_iter()
        .flatten()
        .min();
        let timeout = match deadline {
            None => PollTimeout::NONE,
            Some(deadline) => {
                // Round up: waking a hair early would only mean a second, useless wakeup.
                let left = deadline.saturating_duration_since(Instant::now());
                let ms = left.as_micros().div_ceil(1000);
                PollTimeout::try_from(ms.min(i32::MAX as u128) as i32).unwrap_or(PollTimeout::MAX)
            }
        };
        let (
            signal_ready,
            control_ready,
            notify_ready,
            first_connection,
            connections,
            probed,
            poll_timed_out,
        ) = {
            let ids: Vec<u64> = self.notify.keys().copied().collect();
            let control_set =
                self.control.as_ref().map(ControlServer::poll_set).unwrap_or_default();
            let mut fds = Vec::with_capacity(1 + control_set.len() + ids.len());
            fds.push(PollFd::new(self.signals.fd(), PollFlags::POLLIN));
            fds.extend(control_set.iter().map(|(fd, flags, _)| PollFd::new(*fd, *flags)));
            fds.extend(self.notify.values().map(|s| PollFd::new(s.fd(), PollFlags::POLLIN)));
            // Only while --lazy waits for its first connection are the listeners watched: a
            // holder that wakes on every connection would cost CPU under load.
            let lazy: &[Listener] = if self.lazy_waiting { &self.held.listeners } else { &[] };
            fds.extend(lazy.iter().map(|l| PollFd::new(l.fd(), PollFlags::POLLIN)));
            // With --accept, sockhold accepts itself, unless --max-connections children run:
            // then the connections wait in the backlog.
            let accepting = matches!(&self.brain, Brain::PerConnection(a) if a.accepting())
                && !self.accept_exhausted;
            let acceptors: &[Acceptor] = if accepting { &self.acceptors } else { &[] };
            let first_acceptor = fds.len();
            fds.extend(acceptors.iter().map(|a| PollFd::new(a.fd(), PollFlags::POLLIN)));
            // HTTP probes waiting on their connection.
            let first_probe = fds.len();
            let probe_set: Vec<(u64, PollFd<'_>)> = self
                .probes
                .iter()
                .filter_map(|(&unit, p)| {
                    p.poll_fd().map(|(fd, flags)| (unit, PollFd::new(fd, flags)))
                })
                .collect();
            let probe_units: Vec<u64> = probe_set.iter().map(|(unit, _)| *unit).collect();
            fds.extend(probe_set.into_iter().map(|(_, fd)| fd));
            let poll_timed_out = match poll(&mut fds, timeout) {
                Ok(n) => n == 0,
                Err(Errno::EINTR) => false,
                Err(e) => return Err(e).context("poll failed"),
            };
            let readable = |fd: &PollFd| fd.revents().is_some_and(|r| !r.is_empty());
            let control_fds = &fds[1..1 + control_set.len()];
            let control_ready: Vec<Token> = control_set
                .iter()
                .zip(control_fds)
                .filter(|(_, fd)| readable(fd))
                .map(|((_, _, token), _)| *token)
                .collect();
            let notify_ready: Vec<u64> = ids
                .iter()
                .zip(&fds[1 + control_set.len()..])
                .filter(|(_, fd)| readable(fd))
                .map(|(id, _)| *id)
                .collect();
            let first_connection =
                fds[1 + control_set.len() + ids.len()..first_acceptor].iter().any(readable);
            let connections: Vec<usize> =
                (0..acceptors.len()).filter(|i| readable(&fds[first_acceptor + i])).collect();
            let probed: Vec<u64> = probe_units
                .iter()
                .zip(&fds[first_probe..])
                .filter(|(_, fd)| readable(fd))
                .map(|(unit, _)| *unit)
                .collect();
            let signal_ready = readable(&fds[0]);
            (
                signal_ready,
                control_ready,
                notify_ready,
                first_connection,
                connections,
                probed,
                poll_timed_out,
            )
        };
        let probes_done = !probed.is_empty();
        for unit in probed {
            let outcome = self.probes.get_mut(&unit).and_then(Probe::on_ready);
            if let Some(result) = outcome {
                self.probes.remove(&unit);
                pending.push_back(Event::ProbeDone { unit, result });
            }
        }
        let now = Instant::now();
        let timed_out: Vec<u64> =
            self.probes.iter().filter(|(_, p)| p.deadline <= now).map(|(&unit, _)| unit).collect();
        for unit in timed_out {
            if let Some(probe) = self.probes.remove(&unit) {
                pending.push_back(Event::ProbeDone { unit, result: Err(probe.time_out()) });
                self.killed_probes.extend(probe.pid());
            }
        }
        // An event that may free an fd (a signal such as SIGCHLD, a client, a notify socket, a
        // probe, a deadline) puts the sockets left out for want of fds back in the poll. A
        // listener that is merely readable again does not: two exhausted listeners would wake
        // each other forever. So a sockhold out of fds sleeps instead of spinning.
        let may_have_freed = signal_ready
            || poll_timed_out
            || !notify_ready.is_empty()
            || probes_done
            || control_ready.iter().any(|t| matches!(t, Token::Client(_)));
        if may_have_freed {
            self.accept_exhausted = false;
            if let Some(control) = &mut self.control {
                control.resume_accepting();
            }
        }
        for i in connections {
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
        if first_connection {
            info!("--lazy: the first connection arrived; starting generation 1");
            self.lazy_waiting = false;
            pending.push_back(Event::Start);
        }
        let before = pending.len();
        if signal_ready {
            for signal in self.signals.pending() {
                match signal {
                    Signal::SIGCHLD => self.reap(pending),
                    Signal::SIGHUP if self.lazy_waiting => {
                        info!("received SIGHUP before the first connection: nothing to reload")
                    }
                    Signal::SIGHUP => pending.push_back(Event::Reload),
                    Signal::SIGTERM | Signal::SIGINT => pending
                        .push_back(Event::Stop(format!("received SIG{}", signal_name(signal)))),
                    Signal::SIGUSR2 => {
                        info!("received SIGUSR2: upgrading in place");
                        self.upgrade.ask(None);
                    }
                    s if is_forwarded(s) => pending.push_back(Event::Forward(s)),
                    s => debug!("ignoring SIG{}", signal_name(s)),
                }
            }
        }
        for unit in notify_ready {
            let Some(socket) = self.notify.get(&unit) else {
                continue;
            };
            for received in socket.receive_all() {
                pending.push_back(Event::Notify {
                    unit,
                    sender: received.sender,
                    sender_pgid: received.sender_pgid,
                    message: received.message,
                });
            }
        }
        if let Some(control) = &mut self.control {
            let mut requests = Vec::new();
            for token in control_ready {
                requests.extend(control.on_ready(token, now));
            }
            control.expire(now);
            for (client, request) in requests {
                self.handle_request(client, request, pending);
            }
        }
        if pending.len() == before {
            pending.push_back(Event::Timer);
        }
        Ok(())
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
            // Nothing to replace, and nothing went wrong: the first connection starts the
            // command as it is then, which is what the reload asks for.
            Request::Reload if self.lazy_waiting => Answer::Reloaded(Reloaded::explained(
                None,
                "no child started yet (--lazy): the first connection will start generation 1",
            )),
            Request::Reload => {
                self.reload_waiters.push((client, None));
                pending.push_back(Event::Reload);
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
                self.upgrade.ask(Some(client));
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
            restarts: self.brain.restarts(),
            last_reload: self.last_reload.clone(),
            upgrades: self.upgrade.status(),
        }))
    }

    /// Reaps every child that has ended. A generation's leftover processes (workers, daemons it
    /// forked) go with it: its process group is SIGKILLed while the leader is still a zombie, so
    /// the group id cannot have been reused by an unrelated process.
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
            if let Some(unit) = self.probe_of(pid) {
                let probe = self.probes.remove(&unit).expect("probe_of found it");
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
                match killpg(pid, Signal::SIGKILL) {
                    Ok(()) | Err(Errno::ESRCH) => {}
                    Err(e) => warn!("failed to kill what is left of process group {pid}: {e}"),
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
                self.notify.remove(&unit);
                self.health.remove(&unit);
                if let Some(probe) = self.probes.remove(&unit) {
                    probe.kill();
                    self.killed_probes.extend(probe.pid());
                }
                self.repair_listeners();
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
            }
            Action::ReloadDone { generation, result } => self.reload_done(generation, result),
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
            Ok(()) => {
                let pid = self.brain.serving_pids().first().map(|p| p.as_raw());
                Answer::Reloaded(Reloaded::serving(generation, pid))
            }
            Err(reason) => error_answer(&format!("reload failed: {reason}")),
        };
        if let Some(generation) = generation {
            let at = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
            self.last_reload = Some(LastReload::new(generation, &result, at));
        }
        let (done, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.reload_waiters)
            .into_iter()
            .partition(|(_, g)| *g == generation);
        self.reload_waiters = waiting;
        for (client, _) in done {
            self.answer_client(client, &answer);
        }
    }

    /// The unit whose exec probe has this pid.
    fn probe_of(&self, pid: Pid) -> Option<u64> {
        self.probes.iter().find(|(_, p)| p.pid() == Some(pid)).map(|(&unit, _)| unit)
    }

    /// Starts one readiness probe of a unit.
    fn start_probe(&mut self, unit: u64, pid: Pid, generation: u64) -> Result<(), String> {
        let now = Instant::now();
        let timeout = self.config.probe_timeout;
        let probe = match &self.config.policy.ready {
            ReadyMode::Http(path) => {
                let addr = self.health.get(&unit).ok_or("no health listener")?;
                Probe::http(*addr, path, timeout, now)?
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
        self.probes.insert(unit, probe);
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
        let mut spec = self.child_spec(generation, socket.path(), health.is_some());
        if let Err(error) = self.config.world.apply(&mut spec, Some(socket.path())) {
            return failed(error);
        }
        let mut fds: Vec<BorrowedFd<'_>> = self.held.listeners.iter().map(Listener::fd).collect();
        if let Some((listener, _)) = &health {
            use std::os::fd::AsFd;
            fds.push(listener.as_fd());
        }
        match spawn(&spec, &fds, None) {
            Ok(pid) => {
                self.notify.insert(unit, socket);
                if let Some((_, addr)) = health {
                    self.health.insert(unit, addr);
                }
                Event::Spawned { unit, pid }
            }
            Err(e) => Event::SpawnFailed { unit, error: e.message, code: e.code },
        }
    }

    /// Starts the child for one accepted connection (`--accept`).
    fn spawn_connection(
        &self,
        conn: std::os::fd::OwnedFd,
        peer: Option<std::net::SocketAddr>,
    ) -> Event {
        use std::os::fd::AsFd;
        let Brain::PerConnection(accept) = &self.brain else {
            unreachable!("connections are accepted only in --accept mode")
        };
        let generation = accept.generation();
        let inetd = self.config.accept.as_ref().is_some_and(|a| a.inetd);
        let mut env = self.base_env.clone();
        if !inetd {
            env.push(("LISTEN_FDS".into(), "1".into()));
            env.push(("LISTEN_FDNAMES".into(), "connection".into()));
        }
        env.push(("SOCKHOLD_GENERATION".into(), generation.to_string().into()));
        // As systemd sets them for Accept=yes services.
        if let Some(peer) = peer {
            env.push(("REMOTE_ADDR".into(), peer.ip().to_string().into()));
            env.push(("REMOTE_PORT".into(), peer.port().to_string().into()));
        }
        let mut spec = self.command_spec(env, !inetd, false);
        if let Err(error) = self.config.world.apply(&mut spec, None) {
            return Event::SpawnFailed { unit: generation, error, code: ExitCode::FAILURE };
        }
        let result = if inetd {
            spawn(&spec, &[], Some(conn.as_fd()))
        } else {
            spawn(&spec, &[conn.as_fd()], None)
        };
        // sockhold's copy of the connection closes here: the child has its own.
        match result {
            Ok(pid) => Event::Spawned { unit: generation, pid },
            Err(e) => Event::SpawnFailed { unit: generation, error: e.message, code: e.code },
        }
    }

    fn child_spec(&self, generation: u64, notify_path: &Path, health: bool) -> ChildSpec {
        let mut env = self.base_env.clone();
        let mut names: Vec<&str> = self.held.listeners.iter().map(Listener::name).collect();
        if health {
            names.push("health");
        }
        if !names.is_empty() {
            env.push(("LISTEN_FDS".into(), names.len().to_string().into()));
            env.push(("LISTEN_FDNAMES".into(), names.join(":").into()));
        }
        env.push(("NOTIFY_SOCKET".into(), notify_path.into()));
        env.push(("SOCKHOLD_GENERATION".into(), generation.to_string().into()));
        if let Some(period) = self.config.policy.watchdog {
            env.push(("WATCHDOG_USEC".into(), period.as_micros().to_string().into()));
        }
        env.extend(self.compat_env(generation));
        self.command_spec(env, !names.is_empty(), self.config.policy.watchdog.is_some())
    }

    /// COMMAND with `env`; `--user` and `--chdir` are added by [`ChildWorld::apply`].
    ///
    /// [`ChildWorld::apply`]: crate::child_env::ChildWorld::apply
    fn command_spec(
        &self,
        env: Vec<(OsString, OsString)>,
        listen_pid: bool,
        watchdog_pid: bool,
    ) -> ChildSpec {
        ChildSpec {
            program: self.config.command[0].clone(),
            args: self.config.command.clone(),
            env,
            listen_pid,
            watchdog_pid,
            user: None,
            chdir: None,
        }
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

    /// The variables of `--compat-env`: the same fds, described as other tools describe them.
    fn compat_env(&self, generation: u64) -> Vec<(OsString, OsString)> {
        let mut env: Vec<(OsString, OsString)> = Vec::new();
        let fds: Vec<usize> = (3..3 + self.held.listeners.len()).collect();
        for compat in &self.config.compat_env {
            match compat {
                CompatEnv::Einhorn => {
                    // socketmaster sets EINHORN_FDS ("3", or "3 4 ..."); einhorn's own client
                    // libraries also read EINHORN_FD_COUNT and EINHORN_FD_<i>, and check that
                    // EINHORN_MASTER_PID is their parent, which sockhold is.
                    let list: Vec<String> = fds.iter().map(usize::to_string).collect();
                    env.push(("EINHORN_FDS".into(), list.join(" ").into()));
                    env.push(("EINHORN_FD_COUNT".into(), fds.len().to_string().into()));
                    for (i, fd) in fds.iter().enumerate() {
                        env.push((format!("EINHORN_FD_{i}").into(), fd.to_string().into()));
                    }
                    env.push(("EINHORN_MASTER_PID".into(), std::process::id().to_string().into()));
                }
                CompatEnv::ServerStarter => {
                    // Server::Starter: "PORT=FD;HOST:PORT=FD;/path=FD", each key the address as
                    // its --port gave it (a bare port stays bare), with the port really bound.
                    let ports: Vec<String> = self
                        .held
                        .listeners
                        .iter()
                        .zip(&self.config.listen)
                        .zip(&fds)
                        .map(|((listener, spec), fd)| {
                            let bound = listener.local_description();
                            let address = spec.text.split(',').next().unwrap_or_default();
                            let key = if address.chars().all(|c| c.is_ascii_digit()) {
                                bound.rsplit(':').next().unwrap_or(bound)
                            } else {
                                bound
                            };
                            format!("{key}={fd}")
                        })
                        .collect();
                    env.push(("SERVER_STARTER_PORT".into(), ports.join(";").into()));
                    env.push(("SERVER_STARTER_GENERATION".into(), generation.to_string().into()));
                }
                CompatEnv::Nginx => {
                    env.push(("NGINX".into(), crate::child_env::nginx_var(&fds).into()));
                }
            }
        }
        env
    }
}

/// Creates a private directory for the notify sockets: under `$RUNTIME_DIRECTORY` (set by
/// systemd), `$XDG_RUNTIME_DIR`, `/run` for root, else `$TMPDIR` or `/tmp`. Its name is
/// random, so two instances never collide and nobody can plant a socket there first.
/// `$XDG_RUNTIME_DIR` belongs to sockhold's user alone (0700): not for children run as another.
/// It records its owner in [`OWNER_FILE`]; the directories of this name that a sockhold killed
/// with SIGKILL left behind are removed first (see [`remove_stale_runtime_dirs`]).
fn make_runtime_dir(name: &str, other_user: bool) -> Result<PathBuf> {
    let from_env = |var: &str| std::env::var_os(var).filter(|v| !v.is_empty()).map(PathBuf::from);
    // systemd sets RUNTIME_DIRECTORY to a ':'-separated list when a unit has several.
    let first = |p: PathBuf| p.to_str().and_then(|s| s.split(':').next()).map(PathBuf::from);
    let base = from_env("RUNTIME_DIRECTORY")
        .and_then(first)
        .or_else(|| from_env("XDG_RUNTIME_DIR").filter(|_| !other_user))
        .or_else(|| {
            nix::unistd::geteuid().is_root().then(|| PathBuf::from("/run")).filter(|p| p.is_dir())
        })
        .or_else(|| from_env("TMPDIR"))
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    // Keep the path short: a Unix socket path must fit in 108 bytes.
    let short: String =
        name.chars().filter(|c| c.is_ascii_alphanumeric() || "-_.".contains(*c)).take(24).collect();
    let prefix = format!("sockhold-{short}.");
    remove_stale_runtime_dirs(&base, &prefix);
    let template = base.join(format!("{prefix}XXXXXX"));
    let dir = nix::unistd::mkdtemp(&template)
        .with_context(|| format!("failed to create a runtime directory in {}", base.display()))?;
    let me = std::process::id();
    let owner = format!("{me} {}\n", process_start_time(me).unwrap_or_default());
    std::fs::write(dir.join(OWNER_FILE), owner)
        .with_context(|| format!("failed to write {}", dir.join(OWNER_FILE).display()))?;
    Ok(dir)
}

/// The file in a runtime directory that names the sockhold owning it: `PID STARTTIME`, the
/// start time as field 22 of `/proc/PID/stat`, so that a reused pid is not taken for the owner.
const OWNER_FILE: &str = "owner";

/// When process `pid` started, in clock ticks since boot (`/proc/PID/stat`), if it exists.
fn process_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name, in parentheses, may contain spaces: count fields after its end.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(19)?.parse().ok()
}

/// Removes the runtime directories in `base` named `PREFIX*` that a sockhold killed without
/// cleaning up (SIGKILL, the OOM killer) left behind. One is stale only if it is a real directory
/// of sockhold's own uid, its owner file names a process that is gone (or a pid now used by a
/// process started at another time), and no socket in it is still bound (connecting to it is
/// refused). A directory without an owner file is left alone: an older sockhold's, or one that
/// another sockhold is creating right now.
fn remove_stale_runtime_dirs(base: &Path, prefix: &str) {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(base) else { return };
    let uid = nix::unistd::geteuid().as_raw();
    for entry in entries.flatten() {
        let path = entry.path();
        if !entry.file_name().to_str().is_some_and(|n| n.starts_with(prefix)) {
            continue;
        }
        let Ok(meta) = std::fs::symlink_metadata(&path) else { continue };
        if !meta.is_dir() || meta.uid() != uid {
            continue;
        }
        let Ok(owner) = std::fs::read_to_string(path.join(OWNER_FILE)) else { continue };
        let mut fields = owner.split_whitespace().map(|f| f.parse::<u64>().ok());
        let (Some(Some(pid)), Some(started)) = (fields.next(), fields.next()) else { continue };
        let Ok(pid) = u32::try_from(pid) else { continue };
        let alive = match process_start_time(pid) {
            Some(now) => started.is_none_or(|then| then == 0 || then == now),
            None => std::path::Path::new(&format!("/proc/{pid}")).exists(),
        };
        if alive || holds_a_bound_socket(&path) {
            continue;
        }
        match std::fs::remove_dir_all(&path) {
            Ok(()) => info!(
                "removed {}, left behind by sockhold pid {pid}, which is gone",
                path.display()
            ),
            Err(e) => warn!("failed to remove the stale {}: {e}", path.display()),
        }
    }
}

/// Whether a Unix datagram socket in `dir` is still bound by some process (another pid
/// namespace's sockhold sharing the directory, say): a connect to it succeeds.
fn holds_a_bound_socket(dir: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else { return true };
    entries.flatten().any(|entry| {
        use std::os::unix::fs::FileTypeExt;
        entry.file_type().is_ok_and(|t| t.is_socket())
            && std::os::unix::net::UnixDatagram::unbound()
                .and_then(|s| s.connect(entry.path()))
                .is_ok()
    })
}

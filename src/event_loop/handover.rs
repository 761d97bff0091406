//! Self-upgrade, the event loop's side: composing the [`crate::upgrade::State`] from each
//! module's own part (the supervisor's snapshot, the listeners', the control socket's, the pid
//! file's, the fd store's) and its own entries, which this module owns ([`NotifyHandover`],
//! [`HealthHandover`], [`ClientHandover`], [`LastReloadHandover`], and the runtime paths and the
//! history `ctl status` shows), writing it before the exec, and taking it over in the new program (or only reading it
//! all, in a dry run). A state the new program does not understand was refused when it was
//! read; nothing here reads a field with a default. After a takeover
//! it answers the askers after the loop's first turn and ends probation before the loop first
//! acts on a child or reaps one.
//!
//! An upgrade asked for (SIGUSR2, `ctl upgrade`) is carried out between two turns of the loop,
//! when every event already read has been handled, so nothing read is lost in the exec. The
//! mechanics (checks, memfd, exec, rolling back) are in [`crate::upgrade`]. It must not make
//! lifecycle decisions: the supervisor's snapshot carries them over as they were.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use log::{error, info};
use serde::{Deserialize, Serialize};

use super::{Brain, EventLoop, Held, UnitIo, UnitSocket, Watch};
use crate::cli::Config;
use crate::control::{ClientId, ControlServer, error_answer};
use crate::listen::Listener;
use crate::notify::{Manager, NotifySocket};
use crate::paths::PidFile;
use crate::protocol::{self, Answer, LastReload, LastUpgrade, Upgraded};
use crate::signals::Signals;
use crate::supervisor::Supervisor;
use crate::upgrade::{self, Incoming, OnProbation, State};

/// A unit's notify socket in the [`State`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotifyHandover {
    /// The unit it belongs to.
    pub unit: u64,
    /// The fd number the next program inherits it at.
    pub fd: RawFd,
    /// Its path.
    pub path: PathBuf,
}

/// A unit's health listener in the [`State`]: it stays with its child; only its address moves
/// on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthHandover {
    /// The unit it belongs to.
    pub unit: u64,
    /// Its address.
    pub addr: std::net::SocketAddr,
}

/// A unit's own socket of a `steer=flow` listener in the [`State`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnitSocketHandover {
    /// The unit it belongs to.
    pub unit: u64,
    /// The listener's index.
    pub listener: usize,
    /// The fd number the next program inherits it at.
    pub fd: RawFd,
    /// Its steering slot.
    pub slot: u32,
}

/// A control client waiting for answers, in the [`State`], once with every answer it waits for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientHandover {
    /// The fd number the next program inherits it at.
    pub fd: RawFd,
    /// How many upgrade answers it waits for.
    pub upgrade: u64,
    /// The reloads it waits for: the generation each waits for, if known.
    pub reloads: Vec<Option<u64>>,
}

/// The last reload's outcome in the [`State`]: [`LastReload`] with every field required.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LastReloadHandover {
    /// Whether it succeeded.
    pub ok: bool,
    /// The generation it started.
    pub generation: u64,
    /// Why it failed.
    #[serde(deserialize_with = "Option::deserialize")]
    pub error: Option<String>,
    /// When it ended (RFC 3339, seconds).
    pub at: String,
}

impl From<&LastReload> for LastReloadHandover {
    fn from(r: &LastReload) -> Self {
        LastReloadHandover {
            ok: r.ok,
            generation: r.generation,
            error: r.error.clone(),
            at: r.at.clone(),
        }
    }
}

impl From<&LastReloadHandover> for LastReload {
    fn from(r: &LastReloadHandover) -> Self {
        LastReload { ok: r.ok, generation: r.generation, error: r.error.clone(), at: r.at.clone() }
    }
}

/// What the event loop keeps about upgrades, across upgrades.
pub(super) struct Upgrades {
    /// What to execute without `--upgrade-binary`: the path sockhold was first started from.
    exe: Option<PathBuf>,
    /// Who asked for an upgrade since the last turn: a control client, or `None` for SIGUSR2.
    asked: Vec<Option<ClientId>>,
    /// This program took over from another: generation 1 is not to be started.
    pub(super) resumed: bool,
    /// Upgrades that succeeded, for `status`.
    count: u64,
    /// This program took over and is on probation since then: a crash goes back.
    pub(super) probation: Option<(OnProbation, Instant)>,
    /// The answer for the clients that asked for the upgrade this program took over from.
    answer: Option<(Vec<ClientId>, Answer)>,
    /// Test-only ([`upgrade::TEST_CRASH_VAR`]): how to crash after taking over.
    crash_test: Option<String>,
    /// The last upgrade's outcome, for `status`.
    last: Option<LastUpgrade>,
}

impl Upgrades {
    /// Nothing upgraded yet.
    pub(super) fn at_start() -> Upgrades {
        Upgrades {
            exe: std::env::current_exe().ok(),
            asked: Vec::new(),
            resumed: false,
            count: 0,
            last: None,
            probation: None,
            answer: None,
            crash_test: None,
        }
    }

    /// Records a request; it is carried out at the end of the loop's turn.
    pub(super) fn ask(&mut self, who: Option<ClientId>) {
        self.asked.push(who);
    }

    /// When probation ends, if this program is on it.
    pub(super) fn probation_deadline(&self) -> Option<Instant> {
        self.probation.as_ref().map(|(_, since)| *since + upgrade::PROBATION)
    }

    /// For `status`.
    pub(super) fn status(&self) -> protocol::Upgrades {
        protocol::Upgrades { count: self.count, last: self.last.clone() }
    }
}

fn now_text() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

/// `CLOCK_MONOTONIC` in nanoseconds: the same clock on both sides of an execve (an `i64` holds
/// 292 years of it).
fn monotonic_ns() -> i64 {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC) {
        Ok(t) => t.tv_sec() * 1_000_000_000 + t.tv_nsec(),
        Err(_) => 0,
    }
}

/// Test-only ([`upgrade::TEST_CRASH_VAR`]): crashes as a broken new program would.
fn crash_for_a_test(how: &str) {
    error!("{} asks for a crash: {how}", upgrade::TEST_CRASH_VAR);
    /// Recurses until the stack overflows (the guard page's SIGSEGV). Each frame lends its
    /// array to the next, so no optimiser can turn the recursion into a loop.
    fn overflow(depth: u64, below: &[u64; 64]) -> u64 {
        if depth == u64::MAX {
            return below[0];
        }
        let frame = std::hint::black_box([depth ^ below[1]; 64]);
        overflow(depth + 1, &frame) + frame[2]
    }
    match how {
        "panic" => panic!("crashing for a test, as {} asks", upgrade::TEST_CRASH_VAR),
        "stack" => {
            overflow(0, &[0; 64]);
        }
        _ => {
            let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGSEGV);
        }
    }
}

impl EventLoop {
    /// After the first turn of the loop in a program that took over: answers the clients that
    /// asked for the upgrade. On probation, ends it once its time is up (the loop ends it
    /// earlier, before it first acts on a child or reaps one: the state a crash would hand back
    /// would no longer describe the children).
    pub(super) fn after_turn(&mut self) {
        // `-later`: on the turn after the askers have their answer.
        if let Some(how) = self.upgrade.crash_test.take() {
            match how.strip_suffix("-later") {
                Some(_) if self.upgrade.answer.is_some() => self.upgrade.crash_test = Some(how),
                Some(now) => crash_for_a_test(now),
                None => crash_for_a_test(&how),
            }
        }
        self.answer_upgrade_askers();
        if let Some((probation, since)) = &self.upgrade.probation
            && probation.expired(*since)
        {
            self.end_probation("its time is up");
        }
    }

    /// Answers the clients that asked for the upgrade this program took over from, if not yet
    /// done (also when sockhold exits in its first turn).
    pub(super) fn answer_upgrade_askers(&mut self) {
        if let Some((askers, answer)) = self.upgrade.answer.take() {
            for id in askers {
                self.answer_client(id, &answer);
            }
            if let Some((probation, _)) = &mut self.upgrade.probation
                && let Err(e) = probation.answered_upgrade()
            {
                error!("{e}; a crash cannot go back to the old program");
                self.end_probation("the state cannot be kept up to date");
            }
        }
    }

    pub(super) fn end_probation(&mut self, why: &str) {
        if let Some((probation, _)) = self.upgrade.probation.take() {
            probation.end(why);
        }
    }

    /// Carries out the upgrade asked for since the last turn, if any. Returns only when there
    /// was none or it failed (then the askers have their answer).
    pub(super) fn upgrade_if_asked(&mut self) {
        if self.upgrade.asked.is_empty() {
            return;
        }
        let asked = std::mem::take(&mut self.upgrade.asked);
        let target = self.config.upgrade_binary.clone().or_else(|| self.upgrade.exe.clone());
        let result = match &target {
            Some(target) => self.hand_over(target, &asked),
            None => Err("cannot tell which program to execute: give --upgrade-binary".into()),
        };
        let Err(reason) = result;
        error!("upgrade failed: {reason}; version {} goes on", env!("CARGO_PKG_VERSION"));
        self.counters.upgrades_failed += 1;
        self.upgrade.last = Some(LastUpgrade::failed(&reason, now_text()));
        for client in asked.into_iter().flatten() {
            self.answer_client(client, &error_answer(&format!("upgrade failed: {reason}")));
        }
    }

    /// Checks `target`, writes the state and execs it; returns only if that failed.
    ///
    /// Every signal is blocked from the start: one that arrives during the check (which may take
    /// seconds) stays pending in the kernel, and pending signals survive execve, where the
    /// self-pipe would not. Those already on their way through the pipe are raised again, so
    /// they are pending too. If the upgrade fails, unblocking delivers them here as usual.
    fn hand_over(
        &mut self,
        target: &Path,
        asked: &[Option<ClientId>],
    ) -> Result<Infallible, String> {
        use nix::sys::signal::{SigSet, SigmaskHow, pthread_sigmask};
        let mut old_mask = SigSet::empty();
        pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::all()), Some(&mut old_mask))
            .map_err(|e| format!("cannot block signals: {e}"))?;
        for signal in self.signals.pending() {
            let _ = crate::sys::kill(nix::unistd::getpid(), signal);
        }
        let result = self.check_and_exec(target, asked);
        let _ = pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&old_mask), None);
        result
    }

    fn check_and_exec(
        &mut self,
        target: &Path,
        asked: &[Option<ClientId>],
    ) -> Result<Infallible, String> {
        let Brain::Generations(supervisor) = &self.brain else {
            return Err("self-upgrade is not supported with --accept".into());
        };
        // Ask the supervisor first: nothing is worth checking while it is stopping.
        supervisor.snapshot(Instant::now())?;
        let version = upgrade::check_target(target)?;
        // Taken now, after the check, with the clock reading that goes with it: the deadlines
        // the new program restores are then exactly as far away as they are here.
        let (supervisor_state, taken_at) = (supervisor.snapshot(Instant::now())?, monotonic_ns());
        info!(
            "upgrading in place to {} (version {version}); pid {} and every child stay",
            target.display(),
            std::process::id()
        );
        let mut fds = Vec::new();
        let listeners: Vec<crate::listen::Handover> = self
            .held
            .listeners
            .iter()
            .map(|l| {
                fds.extend(l.handover_fds());
                l.handover()
            })
            .collect();
        let unit_sockets: Vec<UnitSocketHandover> = (self.units.iter())
            .flat_map(|(&unit, io)| {
                io.steered.iter().map(move |own| UnitSocketHandover {
                    unit,
                    listener: own.listener,
                    fd: own.fd.as_raw_fd(),
                    slot: own.slot,
                })
            })
            .collect();
        fds.extend(unit_sockets.iter().map(|u| u.fd));
        let fd_store = self.store.handover();
        fds.extend(fd_store.iter().map(|s| s.fd));
        let notify: Vec<NotifyHandover> = self
            .units
            .iter()
            .map(|(unit, io)| {
                let socket = &io.notify;
                fds.push(socket.fd().as_raw_fd());
                NotifyHandover {
                    unit: *unit,
                    fd: socket.fd().as_raw_fd(),
                    path: socket.path().to_path_buf(),
                }
            })
            .collect();
        // The health listeners stay with their children; only their addresses move on. A probe
        // in flight does not: the supervisor's state asks for a new one at once.
        let health: Vec<HealthHandover> = self
            .units
            .iter()
            .filter_map(|(unit, io)| io.health.map(|addr| HealthHandover { unit: *unit, addr }))
            .collect();
        let control = self.control.as_ref().map(ControlServer::handover);
        fds.extend(control.as_ref().map(|c| c.fd));
        // Each waiting client once, with every answer it waits for.
        let mut clients: BTreeMap<RawFd, ClientHandover> = BTreeMap::new();
        let client_fd = |id: ClientId| self.control.as_ref().and_then(|c| c.client_fd(id));
        let new = |fd: RawFd| ClientHandover { fd, upgrade: 0, reloads: Vec::new() };
        for id in asked.iter().flatten() {
            if let Some(fd) = client_fd(*id) {
                clients.entry(fd).or_insert_with(|| new(fd)).upgrade += 1;
            }
        }
        for (id, generation) in &self.reload_waiters {
            if let Some(fd) = client_fd(*id) {
                clients.entry(fd).or_insert_with(|| new(fd)).reloads.push(*generation);
            }
        }
        fds.extend(clients.keys());
        let metrics_endpoint = self.metrics.as_ref().map(|m| m.handover());
        fds.extend(metrics_endpoint.as_ref().map(|m| m.fd));
        let started_ms =
            self.started.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
        let state = State {
            // The envelope is `upgrade::exec`'s to fill in.
            format: upgrade::STATE_FORMAT,
            old_exe_fd: -1,
            argv: Vec::new(),
            monotonic_ns: taken_at,
            supervisor: supervisor_state,
            listeners,
            notify,
            health,
            unit_sockets,
            fd_store,
            control,
            clients: clients.into_values().collect(),
            runtime_dir: self.held.runtime_dir.clone(),
            pid_file: self.held.pid_file.as_ref().map(PidFile::handover),
            started_ms,
            last_reload: self.last_reload.as_ref().map(LastReloadHandover::from),
            exe: self.upgrade.exe.clone(),
            upgrades: self.upgrade.count,
            from_version: env!("CARGO_PKG_VERSION").to_owned(),
            target: target.to_path_buf(),
            metrics: self.counters.handover(metrics_endpoint),
        };
        upgrade::exec(target, state, &fds)
    }

    /// Takes over from the sockhold that exec'd this program. If that cannot be done, goes back
    /// to the old program (see [`Incoming::roll_back`]): this returns only with a running loop.
    pub fn resume(config: Config, incoming: Incoming) -> EventLoop {
        match Self::take_over(config, &incoming, false) {
            Ok(Some((mut event_loop, adopted))) => {
                event_loop.upgrade.probation =
                    incoming.finish(&adopted).map(|probation| (probation, Instant::now()));
                if event_loop.upgrade.probation.is_none() {
                    // The test crash is only ever for a program that can go back.
                    event_loop.upgrade.crash_test = None;
                }
                event_loop
            }
            Ok(None) => unreachable!("only a dry run stops before taking over"),
            Err(reason) => incoming.roll_back(&reason),
        }
    }

    /// A dry run: reads the state as [`EventLoop::resume`] does, without its fds (they are not
    /// passed; only their numbers are checked), and takes nothing over.
    pub fn dry_run(config: Config, incoming: &Incoming) -> Result<(), String> {
        Self::take_over(config, incoming, true).map(|_| ())
    }

    /// Reads the state and takes it over; with `dry`, stops once it is read and checked.
    fn take_over(
        config: Config,
        incoming: &Incoming,
        dry: bool,
    ) -> Result<Option<(EventLoop, Vec<RawFd>)>, String> {
        let state = incoming.state()?;
        if config.accept.is_some() {
            return Err("self-upgrade is not supported with --accept".into());
        }
        // First check everything, taking nothing: if anything is wrong, the old program gets
        // every fd back as it was.
        // The monotonic clock survives execve and never goes back: a state taken "later" than
        // now was not written by the program that exec'd this one.
        let elapsed = u64::try_from(monotonic_ns() - state.monotonic_ns).map_err(|_| {
            format!("the state was taken at monotonic time {} ns, after now", state.monotonic_ns)
        })?;
        let elapsed = Duration::from_nanos(elapsed);
        let supervisor =
            Supervisor::restore(config.policy.clone(), &state.supervisor, Instant::now(), elapsed)?;
        let mut adopted = Vec::new();
        for listener in &state.listeners {
            adopted.push(if dry {
                Listener::check_handover_dry(listener)?
            } else {
                Listener::check_handover(listener)?
            });
            adopted.extend(Listener::check_steering_handover(listener, dry)?);
        }
        let fd_of = |fd: RawFd, what: &str| -> Result<RawFd, String> {
            let fd = Incoming::check_fd_number(fd, what)?;
            if !dry {
                crate::sys::borrow_inherited_fd(fd).map_err(|e| format!("{what} fd {fd}: {e}"))?;
            }
            Ok(fd)
        };
        let mut notify = Vec::new();
        for entry in &state.notify {
            let fd = fd_of(entry.fd, "a notify socket")?;
            notify.push((entry.unit, fd, entry.path.clone()));
            adopted.push(fd);
        }
        let mut unit_sockets: BTreeMap<u64, Vec<(usize, RawFd, u32)>> = BTreeMap::new();
        for entry in &state.unit_sockets {
            let steered = state.listeners.get(entry.listener).and_then(|l| l.steering.as_ref());
            if !steered.is_some_and(|s| s.slots.contains(&entry.slot)) {
                return Err(format!(
                    "unit {}'s socket is in slot {} of listener {}, which holds no such slot",
                    entry.unit, entry.slot, entry.listener
                ));
            }
            let fd = fd_of(entry.fd, "a unit's steered socket")?;
            unit_sockets.entry(entry.unit).or_default().push((entry.listener, fd, entry.slot));
            adopted.push(fd);
        }
        let mut stored = Vec::new();
        for entry in &state.fd_store {
            let fd = fd_of(entry.fd, "a stored fd")?;
            stored.push((entry.clone(), fd));
            adopted.push(fd);
        }
        let mut health: BTreeMap<u64, std::net::SocketAddr> =
            state.health.iter().map(|h| (h.unit, h.addr)).collect();
        let control_fd = match &state.control {
            None => None,
            Some(control) => Some(fd_of(control.fd, "the control socket")?),
        };
        let mut clients = Vec::new();
        for client in &state.clients {
            // A client that went away during the change is simply not answered.
            if let Ok(fd) = fd_of(client.fd, "a control client") {
                clients.push((fd, client));
            }
        }
        let runtime_dir = state.runtime_dir.as_ref().ok_or("the state has no runtime directory")?;
        let mut counters = crate::metrics::Counters::take_handover(&state.metrics)?;
        let metrics_fd = match &state.metrics.endpoint {
            None => None,
            Some(endpoint) => Some(fd_of(endpoint.fd, "the metrics socket")?),
        };
        if dry {
            return Ok(None);
        }
        let manager = match std::env::var("NOTIFY_SOCKET") {
            Ok(path) if !path.is_empty() => {
                Some(Manager::new(&path).map_err(|e| format!("{e:#}"))?)
            }
            _ => None,
        };
        let signals = Signals::install().map_err(|e| format!("{e:#}"))?;

        // Everything checked: take the fds over. Nothing below fails.
        let held = Held {
            listeners: state.listeners.iter().map(Listener::take_handover).collect(),
            runtime_dir: Some(runtime_dir.clone()),
            pid_file: state.pid_file.as_ref().map(PidFile::take_handover),
            // The directories the first program made; the command line is the same.
            service_dirs: if config.runtime_directory_preserve {
                Vec::new()
            } else {
                config.runtime_directories.clone()
            },
        };
        let mut control = match (&state.control, control_fd) {
            (Some(control), Some(fd)) => {
                adopted.push(fd);
                match ControlServer::take_handover(control) {
                    Ok(server) => Some(server),
                    Err(e) => {
                        error!("after the upgrade, the control socket is lost: {e:#}");
                        None
                    }
                }
            }
            _ => None,
        };
        // The endpoint goes on with the same socket; without --metrics now (the command line
        // is the old program's, but a wrapper script may change it), it is closed.
        let metrics = match (&state.metrics.endpoint, metrics_fd) {
            (Some(endpoint), Some(fd)) => {
                adopted.push(fd);
                match crate::metrics::endpoint::MetricsServer::take_handover(endpoint) {
                    Ok(server) if config.metrics.is_some() => Some(server),
                    Ok(_) => None,
                    Err(e) => {
                        error!("after the upgrade, the metrics socket is lost: {e:#}");
                        None
                    }
                }
            }
            // The old program served no metrics: bind the endpoint now, as a start would.
            _ => config.metrics.as_ref().and_then(|addr| {
                crate::metrics::endpoint::MetricsServer::bind(addr)
                    .map_err(|e| error!("after the upgrade, no metrics are served: {e:#}"))
                    .ok()
            }),
        };
        let mut reload_waiters = Vec::new();
        let mut upgrade_askers = Vec::new();
        if let Some(control) = &mut control {
            for (fd, client) in clients {
                let upgrades = client.upgrade as usize;
                let id = control.take_client(fd, upgrades + client.reloads.len());
                adopted.push(fd);
                upgrade_askers.extend(std::iter::repeat_n(id, upgrades));
                reload_waiters.extend(client.reloads.iter().map(|g| (id, *g)));
            }
        }
        let base_env = crate::plan::base_env(std::env::vars_os());
        let started = UNIX_EPOCH + Duration::from_millis(state.started_ms);
        let mut upgrades = Upgrades::at_start();
        upgrades.resumed = true;
        upgrades.exe = state.exe.clone().or(upgrades.exe);
        upgrades.count = state.upgrades;
        let target = state.target.display().to_string();
        let version = env!("CARGO_PKG_VERSION");
        let answer = match &incoming.failed {
            None => {
                upgrades.count += 1;
                upgrades.last = Some(LastUpgrade::succeeded(&target, version, now_text()));
                info!(
                    "upgraded in place: version {version} from {target} took over from version {} (pid {} unchanged)",
                    state.from_version,
                    std::process::id()
                );
                Answer::Upgraded(Upgraded {
                    pid: std::process::id(),
                    version: version.to_owned(),
                    binary: target.clone(),
                })
            }
            Some(reason) => {
                error!("upgrade to {target} failed: {reason}; version {version} goes on");
                counters.upgrades_failed += 1;
                upgrades.last = Some(LastUpgrade::failed(reason, now_text()));
                error_answer(&format!("upgrade failed: {reason}"))
            }
        };
        let units: BTreeMap<u64, UnitIo> = notify
            .into_iter()
            .map(|(unit, fd, path)| {
                let notify = NotifySocket::take_handover(fd, path);
                let steered = (unit_sockets.remove(&unit).unwrap_or_default().into_iter())
                    .map(|(listener, fd, slot)| UnitSocket {
                        listener,
                        fd: crate::sys::adopt_inherited_fd(fd),
                        slot,
                    })
                    .collect();
                (unit, UnitIo { notify, health: health.remove(&unit), probe: None, steered })
            })
            .collect();
        let stored = stored
            .into_iter()
            .map(|(entry, fd)| (entry, crate::sys::adopt_inherited_fd(fd)))
            .collect();
        let store = crate::fd_store::FdStore::take_handover(config.fd_store, stored);
        let mut event_loop = EventLoop {
            control,
            reload_waiters,
            last_reload: state.last_reload.as_ref().map(LastReload::from),
            metrics,
            counters,
            reload_requested: None,
            reloads_started: BTreeMap::new(),
            started,
            acceptors: Vec::new(),
            accept_exhausted: false,
            accept_episode: false,
            config,
            held,
            signals,
            brain: Brain::Generations(supervisor),
            units,
            killed_probes: Vec::new(),
            manager,
            base_env,
            upgrade: upgrades,
            watched: BTreeMap::new(),
            new_flow_units: Vec::new(),
            store,
        };
        // The units kept for their flows are watched again; the first turn tells the steering
        // where new flows go (the restored machine has not said it yet).
        for (unit, generation, pid) in event_loop.brain_kept_units() {
            let watch = Watch { generation, pid, at: Instant::now(), announced: true };
            event_loop.watched.insert(unit, watch);
        }
        // Answered after the first turn of the loop: a crash before then goes back to the old
        // program, which answers them.
        event_loop.upgrade.answer = Some((upgrade_askers, answer));
        if incoming.failed.is_none() {
            event_loop.upgrade.crash_test = std::env::var(upgrade::TEST_CRASH_VAR).ok();
        }
        // Nothing for the service manager: the main pid and the readiness it knows are unchanged,
        // and a send to a manager whose queue is full would block here, signals still blocked.
        Ok(Some((event_loop, adopted)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn config() -> Config {
        let cli = crate::cli::Cli::try_parse_from(["sockhold", "-l", "127.0.0.1:0", "--", "true"])
            .expect("a command line");
        cli.into_config().expect("a config")
    }

    /// The takeover reads nothing with a default: a state with a field this program does not
    /// know is refused, naming it, before anything is looked at (the dry run and the real one
    /// alike).
    #[test]
    fn take_over_refuses_a_state_it_does_not_understand() {
        let mut value = serde_json::to_value(upgrade::tests::sample()).expect("serialises");
        value["supervisor"]["units"][0]["new_bookkeeping"] = 1.into();
        let incoming = Incoming::from_bytes(value.to_string().as_bytes()).expect("read");
        let err = EventLoop::dry_run(config(), &incoming).unwrap_err();
        assert!(err.contains("unknown field `new_bookkeeping`"), "{err}");
        let err = EventLoop::take_over(config(), &incoming, false).err().expect("refused");
        assert!(err.contains("unknown field `new_bookkeeping`"), "{err}");

        // A state from no clock this one shares is refused, not read as "no time passed".
        let future = State { monotonic_ns: i64::MAX, ..upgrade::tests::sample() };
        let incoming = Incoming::from_bytes(&future.to_json().expect("json")).expect("read");
        let err = EventLoop::dry_run(config(), &incoming).unwrap_err();
        assert!(err.contains("after now"), "{err}");

        // What it understands gets past the state to the fds, which this test does not have.
        let incoming =
            Incoming::from_bytes(&upgrade::tests::sample().to_json().expect("json")).expect("read");
        EventLoop::dry_run(config(), &incoming).expect("a dry run checks no fd");
    }
}

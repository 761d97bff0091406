//! The supervisor's decisions, as a pure state machine.
//!
//! [`Supervisor::step`] takes one [`Event`] (a signal, a child that started or exited, a notify
//! message, a probe's answer, the passing of time) and returns the [`Action`]s to carry out. It
//! owns every decision of the lifecycle: when to spawn, when a new child counts as ready, which
//! child to stop, when to SIGKILL, when the watchdog fires, when to restart and with what
//! backoff, when to give up, and the exit code. It must not make a syscall, read the clock or
//! touch a file: the event loop turns syscalls into events and actions back into syscalls, so
//! every rule here is unit-tested as a table of events and expected actions.
//!
//! A *generation* is what one start or reload runs: `--workers` processes (units) of the same
//! command, all numbered with the generation's number. Each unit has a key of its own, which the
//! event loop uses for the unit's notify socket, health listener and probes.

use std::time::{Duration, Instant};

use log::{debug, error, info, warn};
use nix::unistd::Pid;

use crate::exit::{ChildStatus, ExitCode};
use crate::notify::NotifyMessage;
use crate::signals::Signal;

/// First delay before restarting a child that exited by itself.
pub const BACKOFF_START: Duration = Duration::from_millis(100);
/// The backoff doubles up to this delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A child that served this long before it crashed resets the backoff to its start.
pub const STABLE_AFTER: Duration = Duration::from_secs(10);
/// This many starts in a row that never became ready, with nothing serving, end sockhold.
pub const START_LIMIT: u32 = 5;
/// The default of `--max-draining`: old generations allowed to drain at once.
pub const MAX_DRAINING: usize = 8;

/// How a new child proves it is ready.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReadyMode {
    /// sd_notify `READY=1` on the child's private notify socket.
    Notify,
    /// Alive for this long.
    Delay(Duration),
    /// `GET PATH` on the child's private `health` listener answers 2xx.
    Http(String),
    /// The command (argv) exits 0.
    Exec(Vec<String>),
}

impl ReadyMode {
    /// Whether readiness is found out by probing (`http:` and `exec:`).
    pub fn probes(&self) -> bool {
        matches!(self, ReadyMode::Http(_) | ReadyMode::Exec(_))
    }
}

/// Whose notify messages count.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum NotifyAccess {
    /// Only the child's main process.
    Main,
    /// Any process in the child's process group.
    Group,
    /// Any process that can reach the socket.
    All,
}

/// What to do when a serving child exits by itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum RestartPolicy {
    /// Restart unless it exited with status 0.
    OnFailure,
    /// Always restart.
    Always,
    /// Never restart: sockhold ends with the child's status.
    Never,
}

/// How a reload replaces the workers of a generation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ReloadStrategy {
    /// One new worker, ready, then one old worker stopped and gone, then the next: never more
    /// than N+1 workers of this reload alive.
    Rolling,
    /// N new workers; when all are ready, the N old ones are stopped.
    AllAtOnce,
}

/// The part of the configuration the decisions depend on.
#[derive(Clone, Debug)]
pub struct Policy {
    /// How readiness is proven.
    pub ready: ReadyMode,
    /// How long a new child has to become ready.
    pub ready_timeout: Duration,
    /// With a probing ready mode: the wait before the first probe.
    pub probe_delay: Duration,
    /// With a probing ready mode: the wait between the end of one probe and the next.
    pub probe_interval: Duration,
    /// The signal that asks a child to stop.
    pub stop_signal: Signal,
    /// How long a stopping child has before its process group is SIGKILLed.
    pub stop_timeout: Duration,
    /// What to do when a serving child exits by itself.
    pub restart: RestartPolicy,
    /// Whose notify messages count.
    pub notify_access: NotifyAccess,
    /// A serving child must send `WATCHDOG=1` at least this often.
    pub watchdog: Option<Duration>,
    /// Children per generation.
    pub workers: usize,
    /// How a reload replaces them.
    pub reload_strategy: ReloadStrategy,
    /// At most this many old generations drain (stopping) at once; a promotion that would leave
    /// more SIGKILLs the oldest.
    pub max_draining: usize,
}

/// Something that happened, as the event loop saw it.
#[derive(Clone, Debug)]
pub enum Event {
    /// sockhold has bound its sockets and starts supervising.
    Start,
    /// A reload was asked for (SIGHUP).
    Reload,
    /// A stop was asked for: by whom, for the log ("received SIGTERM", "ctl stop").
    Stop(String),
    /// A signal to pass on to the serving children.
    Forward(Signal),
    /// A unit's process was started.
    Spawned { unit: u64, pid: Pid },
    /// A unit's process could not be started (command not found, not executable, ...).
    SpawnFailed { unit: u64, error: String, code: ExitCode },
    /// A child process ended and was reaped.
    Exited { pid: Pid, status: ChildStatus },
    /// A datagram arrived on a unit's notify socket.
    Notify {
        unit: u64,
        /// The sender's pid, from `SCM_CREDENTIALS`.
        sender: Pid,
        /// The sender's process group, if it could be read.
        sender_pgid: Option<Pid>,
        message: NotifyMessage,
    },
    /// A readiness probe of a unit ended: `Ok` if it found the child ready, else why not.
    ProbeDone { unit: u64, result: Result<(), String> },
    /// Time passed; deadlines that are due fire on every step, this event only wakes them.
    Timer,
}

/// Messages for sockhold's own service manager (when sockhold has `NOTIFY_SOCKET`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ManagerMessage {
    /// `READY=1` and a status line.
    Ready(String),
    /// `RELOADING=1`, `MONOTONIC_USEC=` and a status line.
    Reloading(String),
    /// `STOPPING=1` and a status line.
    Stopping(String),
    /// Only a status line.
    Status(String),
}

/// Something for the event loop to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Start the process of a new unit of `generation`; answer with `Spawned` or `SpawnFailed`.
    Spawn { unit: u64, generation: u64 },
    /// Send a signal to a unit's main process.
    Signal { pid: Pid, signal: Signal },
    /// Send a signal to a unit's whole process group.
    SignalGroup { pgid: Pid, signal: Signal },
    /// Probe whether unit `unit` (main process `pid`) is ready; answer with `ProbeDone`.
    Probe { unit: u64, pid: Pid, generation: u64 },
    /// A unit is gone: release what the loop holds for it (its notify socket, its probe).
    Release { unit: u64 },
    /// Tell sockhold's own service manager.
    Manager(ManagerMessage),
    /// A reload began by starting this generation: every reload request not yet started is
    /// answered by this one.
    ReloadStarted { generation: u64 },
    /// A reload ended: the one that started `generation`, or (`None`) every request not yet
    /// started, which will now never start.
    ReloadDone { generation: Option<u64>, result: Result<(), String> },
    /// Exit sockhold with this code.
    Exit(ExitCode),
}

/// Why a unit was started.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Purpose {
    Initial,
    Reload,
    Restart,
}

/// Where a unit is in its life.
#[derive(Clone, Debug, PartialEq, Eq)]
enum UnitState {
    /// Asked for, not yet forked (only between an `Action::Spawn` and its answer).
    Spawning,
    /// Running, not yet ready.
    Starting {
        ready_deadline: Instant,
        /// With `delay:`: when it counts as ready.
        ready_at: Option<Instant>,
        /// With a probe: when to send the next one (`None` while one runs).
        probe_at: Option<Instant>,
        /// Why the last probe failed, for the message if it never succeeds.
        last_probe: Option<String>,
    },
    /// Ready: it serves. `watchdog_at` is when its watchdog fires unless fed.
    Serving { watchdog_at: Option<Instant> },
    /// Asked to stop; SIGKILL at the deadline.
    Stopping { kill_at: Instant, signal: Signal },
    /// SIGKILLed; waiting to reap it.
    Killed,
}

/// One unit: a child process of a generation, started on the held sockets.
#[derive(Clone, Debug)]
struct Unit {
    key: u64,
    generation: u64,
    pid: Option<Pid>,
    purpose: Purpose,
    state: UnitState,
    /// When it entered its current state.
    since: Instant,
    /// The last `STATUS=` it sent.
    status_text: Option<String>,
    /// Its watchdog period: `--watchdog`, or what it asked for with `WATCHDOG_USEC=`.
    watchdog: Option<Duration>,
    /// Its watchdog fired: its end is a crash, whatever it was sent.
    crashed: bool,
}

/// What the outside may know of one unit (for `ctl status`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GenerationInfo {
    /// The number of its generation.
    pub id: u64,
    /// Its main process, once forked.
    pub pid: Option<Pid>,
    /// `starting`, `serving`, `stopping` or `killed`.
    pub state: &'static str,
    /// When it entered that state.
    pub since: Instant,
    /// The last `STATUS=` it sent.
    pub status: Option<String>,
}

/// Whether sockhold is serving or on its way out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Running,
    /// Stopping every child; exit with `code` when none is left, or with the status of a unit
    /// of generation `final_generation` that ends uncleanly.
    ShuttingDown {
        code: ExitCode,
        final_generation: Option<u64>,
    },
}

/// A reload in progress.
#[derive(Clone, Copy, Debug)]
struct Reload {
    generation: u64,
    /// Rolling: the old unit the last step stopped; the next step waits until it is gone.
    waiting_for: Option<u64>,
}

/// The supervisor's whole state.
#[derive(Debug)]
pub struct Supervisor {
    policy: Policy,
    mode: Mode,
    units: Vec<Unit>,
    next_unit: u64,
    next_generation: u64,
    reload: Option<Reload>,
    /// A reload asked for while another was in progress.
    reload_pending: bool,
    /// When to start units to replace ones that crashed or failed to start.
    restart_at: Option<Instant>,
    backoff: Duration,
    failed_starts: u32,
    /// Units started to replace one that crashed or failed to start.
    restarts: u64,
    /// Workers that exited and are not to be replaced (`--restart never`, or `on-failure` and
    /// status 0).
    retired: usize,
}

impl Supervisor {
    /// A supervisor with nothing running yet; feed it [`Event::Start`].
    pub fn new(policy: Policy) -> Self {
        Supervisor {
            policy,
            mode: Mode::Running,
            units: Vec::new(),
            next_unit: 1,
            next_generation: 1,
            reload: None,
            reload_pending: false,
            restart_at: None,
            backoff: BACKOFF_START,
            failed_starts: 0,
            restarts: 0,
            retired: 0,
        }
    }

    /// The earliest deadline the event loop must wake up for, if any.
    pub fn next_deadline(&self) -> Option<Instant> {
        let unit_deadlines = self.units.iter().flat_map(|u| match u.state {
            UnitState::Starting { ready_deadline, ready_at, probe_at, .. } => {
                [Some(ready_deadline), ready_at, probe_at]
            }
            UnitState::Stopping { kill_at, .. } => [Some(kill_at), None, None],
            UnitState::Serving { watchdog_at } => [watchdog_at, None, None],
            _ => [None, None, None],
        });
        unit_deadlines.flatten().chain(self.restart_at).min()
    }

    /// Every live process: `(generation, pid)`.
    pub fn live_pids(&self) -> Vec<(u64, Pid)> {
        self.units.iter().filter_map(|u| u.pid.map(|p| (u.generation, p))).collect()
    }

    /// Handles one event at time `now` and returns what to do, in order.
    pub fn step(&mut self, event: Event, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        self.handle(event, now, &mut out);
        self.fire_deadlines(now, &mut out);
        self.exit_if_done(&mut out);
        out
    }

    fn is_serving(u: &Unit) -> bool {
        matches!(u.state, UnitState::Serving { .. })
    }

    fn is_starting(u: &Unit) -> bool {
        matches!(u.state, UnitState::Spawning | UnitState::Starting { .. })
    }

    fn serving(&self) -> impl Iterator<Item = &Unit> {
        self.units.iter().filter(|u| Self::is_serving(u))
    }

    /// Units that serve or are on their way to it: the workers that count towards `wanted`.
    fn running(&self) -> impl Iterator<Item = &Unit> {
        self.units.iter().filter(|u| Self::is_serving(u) || Self::is_starting(u))
    }

    fn starting(&self) -> Option<&Unit> {
        self.units.iter().find(|u| Self::is_starting(u))
    }

    fn count(&self, generation: u64, pred: fn(&Unit) -> bool) -> usize {
        self.units.iter().filter(|u| u.generation == generation && pred(u)).count()
    }

    fn index_of(&self, key: u64) -> Option<usize> {
        self.units.iter().position(|u| u.key == key)
    }

    /// How many workers should be serving.
    fn wanted(&self) -> usize {
        self.policy.workers.saturating_sub(self.retired)
    }

    fn handle(&mut self, event: Event, now: Instant, out: &mut Vec<Action>) {
        match event {
            Event::Start => {
                let generation = self.new_generation();
                info!("starting generation {generation}");
                for _ in 0..self.policy.workers {
                    self.spawn_unit(generation, Purpose::Initial, now, out);
                }
            }
            Event::Reload => self.reload(now, out),
            Event::Stop(why) => self.shut_down(ExitCode::SUCCESS, &why, now, out),
            Event::Forward(signal) => {
                let serving: Vec<(u64, Pid)> =
                    self.serving().filter_map(|u| u.pid.map(|p| (u.generation, p))).collect();
                if serving.is_empty() {
                    warn!("no serving child to forward SIG{} to; dropped", signal_name(signal));
                }
                for (generation, pid) in serving {
                    info!(
                        "forwarding SIG{} to generation {generation} (pid {pid})",
                        signal_name(signal)
                    );
                    out.push(Action::Signal { pid, signal });
                }
            }
            Event::Spawned { unit, pid } => self.spawned(unit, pid, now, out),
            Event::SpawnFailed { unit, error, code } => {
                let Some(i) = self.index_of(unit) else {
                    return;
                };
                let u = self.units.remove(i);
                error!("generation {} could not be started: {error}", u.generation);
                if u.purpose == Purpose::Initial {
                    // The command itself is wrong: nothing to retry, say so and exit 126/127.
                    self.shut_down(code, "the command could not be started", now, out);
                } else {
                    self.start_failed(&u, error, None, code, now, out);
                }
            }
            Event::Exited { pid, status } => self.exited(pid, status, now, out),
            Event::Notify { unit, sender, sender_pgid, message } => {
                self.notified(unit, sender, sender_pgid, message, now, out)
            }
            Event::ProbeDone { unit, result } => self.probed(unit, result, now, out),
            Event::Timer => {}
        }
    }

    fn new_generation(&mut self) -> u64 {
        let generation = self.next_generation;
        self.next_generation += 1;
        generation
    }

    fn spawn_unit(
        &mut self,
        generation: u64,
        purpose: Purpose,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        let key = self.next_unit;
        self.next_unit += 1;
        if purpose == Purpose::Restart {
            self.restarts += 1;
        }
        self.units.push(Unit {
            key,
            generation,
            pid: None,
            purpose,
            state: UnitState::Spawning,
            since: now,
            status_text: None,
            watchdog: self.policy.watchdog,
            crashed: false,
        });
        out.push(Action::Spawn { unit: key, generation });
    }

    fn reload(&mut self, now: Instant, out: &mut Vec<Action>) {
        if self.mode != Mode::Running {
            info!("reload requested while stopping; ignored");
            out.push(Action::ReloadDone {
                generation: None,
                result: Err("sockhold is stopping".into()),
            });
            return;
        }
        let busy = self.reload.map(|r| r.generation).or(self.starting().map(|u| u.generation));
        if let Some(generation) = busy {
            if !self.reload_pending {
                info!(
                    "reload requested while generation {generation} is starting; one more reload will follow"
                );
            }
            self.reload_pending = true;
            return;
        }
        self.start_reload(now, out);
    }

    fn start_reload(&mut self, now: Instant, out: &mut Vec<Action>) {
        let generation = self.new_generation();
        info!("reload: starting generation {generation}");
        out.push(Action::ReloadStarted { generation });
        out.push(Action::Manager(ManagerMessage::Reloading(format!(
            "reloading: starting generation {generation}"
        ))));
        // The reload brings every worker up to date: it replaces any that crashed, too.
        self.restart_at = None;
        self.retired = 0;
        self.reload = Some(Reload { generation, waiting_for: None });
        let first = match self.policy.reload_strategy {
            ReloadStrategy::Rolling => 1,
            ReloadStrategy::AllAtOnce => self.policy.workers,
        };
        for _ in 0..first {
            self.spawn_unit(generation, Purpose::Reload, now, out);
        }
    }

    /// Moves the reload in progress on: the next rolling step, or its end once the new
    /// generation has all its workers serving.
    fn advance_reload(&mut self, now: Instant, out: &mut Vec<Action>) {
        let Some(reload) = self.reload else { return };
        if self.mode != Mode::Running {
            return;
        }
        let generation = reload.generation;
        // A rolling reload of several workers ends when the last old worker it stopped is gone,
        // so that a reload right after it cannot have N+2 alive.
        if self.count(generation, Self::is_serving) >= self.policy.workers
            && reload.waiting_for.is_none()
        {
            // Whatever old worker still serves (one the strategy did not reach) stops now.
            let old: Vec<usize> = (0..self.units.len())
                .filter(|&i| {
                    Self::is_serving(&self.units[i]) && self.units[i].generation != generation
                })
                .collect();
            for i in old {
                self.stop_unit(i, self.policy.stop_signal, now, out);
            }
            self.cap_draining(now, out);
            self.reload = None;
            out.push(Action::ReloadDone { generation: Some(generation), result: Ok(()) });
            self.announce_serving(generation, out);
            self.follow_pending_reload(now, out);
            return;
        }
        if self.policy.reload_strategy == ReloadStrategy::Rolling
            && reload.waiting_for.is_none()
            && self.count(generation, Self::is_starting) == 0
        {
            info!(
                "reload: starting worker {} of {} of generation {generation}",
                self.count(generation, Self::is_serving) + 1,
                self.policy.workers
            );
            self.spawn_unit(generation, Purpose::Reload, now, out);
        }
    }

    fn spawned(&mut self, key: u64, pid: Pid, now: Instant, out: &mut Vec<Action>) {
        let Some(i) = self.index_of(key) else { return };
        let ready_at = match self.policy.ready {
            ReadyMode::Delay(d) => Some(now + d),
            _ => None,
        };
        let probe_at = self.policy.ready.probes().then(|| now + self.policy.probe_delay);
        let ready_deadline = now + self.policy.ready_timeout;
        self.units[i].pid = Some(pid);
        let starting = UnitState::Starting { ready_deadline, ready_at, probe_at, last_probe: None };
        self.set_state(i, starting, now);
        info!("generation {} started (pid {pid})", self.units[i].generation);
        if let Mode::ShuttingDown { .. } = self.mode {
            // A stop arrived between the decision to spawn and the fork: stop it too.
            self.stop_unit(i, self.policy.stop_signal, now, out);
        }
    }

    fn notified(
        &mut self,
        key: u64,
        sender: Pid,
        sender_pgid: Option<Pid>,
        message: NotifyMessage,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        let Some(i) = self.index_of(key) else { return };
        let u = &mut self.units[i];
        let (generation, Some(pid)) = (u.generation, u.pid) else { return };
        let allowed = match self.policy.notify_access {
            NotifyAccess::Main => sender == pid,
            NotifyAccess::Group => sender == pid || sender_pgid == Some(pid),
            NotifyAccess::All => true,
        };
        if !allowed {
            warn!(
                "generation {generation}: ignoring notify message from pid {sender}, which --notify-access {} does not allow",
                match self.policy.notify_access {
                    NotifyAccess::Main => "main",
                    NotifyAccess::Group => "group",
                    NotifyAccess::All => "all",
                }
            );
            return;
        }
        if let Some(text) = &message.status {
            info!("generation {generation} (pid {pid}): status: {text}");
            u.status_text = Some(text.clone());
            if matches!(u.state, UnitState::Serving { .. }) {
                out.push(Action::Manager(ManagerMessage::Status(format!(
                    "generation {generation}: {text}"
                ))));
            }
        }
        if let Some(usec) = message.extend_timeout_usec {
            let until = now + Duration::from_micros(usec);
            match &mut u.state {
                UnitState::Starting { ready_deadline, .. } => {
                    *ready_deadline = (*ready_deadline).max(until);
                    debug!("generation {generation} (pid {pid}) extended its start timeout");
                }
                UnitState::Stopping { kill_at, .. } => {
                    *kill_at = (*kill_at).max(until);
                    debug!("generation {generation} (pid {pid}) extended its stop timeout");
                }
                _ => {}
            }
        }
        if let Some(usec) = message.watchdog_usec {
            u.watchdog = (usec > 0).then(|| Duration::from_micros(usec));
            info!(
                "generation {generation} (pid {pid}) set its watchdog to {}",
                u.watchdog.map_or("off".to_string(), |d| humantime::format_duration(d).to_string())
            );
            if let UnitState::Serving { watchdog_at } = &mut u.state {
                *watchdog_at = u.watchdog.map(|d| now + d);
            }
        }
        if let UnitState::Serving { watchdog_at } = &mut u.state {
            if message.watchdog_trigger {
                warn!("generation {generation} (pid {pid}) triggered its watchdog");
                *watchdog_at = Some(now);
            } else if message.watchdog && watchdog_at.is_some() {
                *watchdog_at = u.watchdog.map(|d| now + d);
            }
        }
        if message.ready {
            if !matches!(u.state, UnitState::Starting { .. }) {
                debug!("generation {generation} (pid {pid}) sent READY=1 again; nothing to do");
            } else if self.policy.ready != ReadyMode::Notify {
                debug!(
                    "generation {generation} sent READY=1, but --ready is not notify; waiting for its own test"
                );
            } else if self.mode == Mode::Running {
                self.promote(i, now, out);
            }
        }
    }

    fn probed(
        &mut self,
        key: u64,
        result: Result<(), String>,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        let Some(i) = self.index_of(key) else { return };
        let interval = self.policy.probe_interval;
        let u = &mut self.units[i];
        let UnitState::Starting { probe_at, last_probe, .. } = &mut u.state else { return };
        match result {
            Ok(()) if self.mode == Mode::Running => self.promote(i, now, out),
            Ok(()) => {}
            Err(why) => {
                debug!("generation {} (pid {:?}): not ready yet: {why}", u.generation, u.pid);
                *last_probe = Some(why);
                *probe_at = Some(now + interval);
            }
        }
    }

    /// Unit `i` is ready: it serves, and the reload it belongs to moves on.
    fn promote(&mut self, i: usize, now: Instant, out: &mut Vec<Action>) {
        let u = &self.units[i];
        let (generation, pid) = (u.generation, u.pid.expect("a starting unit has a pid"));
        let watchdog_at = u.watchdog.map(|d| now + d);
        self.set_state(i, UnitState::Serving { watchdog_at }, now);
        self.failed_starts = 0;
        match self.reload {
            Some(reload) if reload.generation == generation => {
                let old = self
                    .units
                    .iter()
                    .enumerate()
                    .filter(|(_, u)| Self::is_serving(u) && u.generation != generation)
                    .min_by_key(|(_, u)| u.generation)
                    .map(|(j, u)| (j, u.key, u.generation));
                match (self.policy.reload_strategy, old) {
                    (ReloadStrategy::Rolling, Some((j, old_key, old_generation))) => {
                        let old = if self.policy.workers == 1 { "" } else { "a worker of " };
                        info!(
                            "generation {generation} (pid {pid}) is ready; stopping {old}generation {old_generation}"
                        );
                        self.stop_unit(j, self.policy.stop_signal, now, out);
                        self.cap_draining(now, out);
                        if self.policy.workers > 1 {
                            self.reload = Some(Reload { generation, waiting_for: Some(old_key) });
                        }
                    }
                    _ => info!("generation {generation} (pid {pid}) is ready"),
                }
                self.advance_reload(now, out);
            }
            _ => {
                info!("generation {generation} (pid {pid}) is ready");
                if self.count(generation, Self::is_serving) >= self.wanted() {
                    self.announce_serving(generation, out);
                }
                self.follow_pending_reload(now, out);
            }
        }
    }

    /// Tells the manager that `generation` serves.
    fn announce_serving(&self, generation: u64, out: &mut Vec<Action>) {
        let units: Vec<&Unit> = self.serving().filter(|u| u.generation == generation).collect();
        let pids: Vec<String> = units.iter().filter_map(|u| u.pid).map(|p| p.to_string()).collect();
        let what = match pids.as_slice() {
            [one] => format!("pid {one}"),
            many => format!("pids {}", many.join(",")),
        };
        let status = match units.iter().find_map(|u| u.status_text.as_ref()) {
            Some(text) => format!("serving: generation {generation} ({what}): {text}"),
            None => format!("serving: generation {generation} ({what})"),
        };
        out.push(Action::Manager(ManagerMessage::Ready(status)));
    }

    fn follow_pending_reload(&mut self, now: Instant, out: &mut Vec<Action>) {
        if self.reload_pending
            && self.mode == Mode::Running
            && self.reload.is_none()
            && self.starting().is_none()
        {
            self.reload_pending = false;
            info!("starting the reload that was requested during the last one");
            self.start_reload(now, out);
        }
    }

    /// Sends `signal` to unit `i` and arms its SIGKILL deadline.
    fn stop_unit(&mut self, i: usize, signal: Signal, now: Instant, out: &mut Vec<Action>) {
        let u = &self.units[i];
        let Some(pid) = u.pid else { return };
        if matches!(u.state, UnitState::Stopping { .. } | UnitState::Killed) {
            return;
        }
        out.push(Action::Signal { pid, signal });
        let stopping = UnitState::Stopping { kill_at: now + self.policy.stop_timeout, signal };
        self.set_state(i, stopping, now);
    }

    /// Old generations that hold long-lived connections (keep-alive, websockets, streams) can
    /// drain for all of `--stop-timeout`; reloads in quick succession would pile them up, each
    /// with its memory and fds. Past `--max-draining` generations, every draining unit of the
    /// oldest one is SIGKILLed with its process group, its connections reset.
    fn cap_draining(&mut self, now: Instant, out: &mut Vec<Action>) {
        let max = self.policy.max_draining;
        loop {
            let mut draining: Vec<u64> = self
                .units
                .iter()
                .filter(|u| matches!(u.state, UnitState::Stopping { .. }) && !u.crashed)
                .map(|u| u.generation)
                .collect();
            draining.sort_unstable();
            draining.dedup();
            if draining.len() <= max {
                break;
            }
            let oldest = draining[0];
            for i in 0..self.units.len() {
                let u = &self.units[i];
                if u.generation != oldest || !matches!(u.state, UnitState::Stopping { .. }) {
                    continue;
                }
                let Some(pid) = u.pid else { continue };
                warn!(
                    "generation {oldest} (pid {pid}) is still draining with {max} newer generations \
                     draining too (--max-draining {max}); sending SIGKILL to its process group"
                );
                self.set_state(i, UnitState::Killed, now);
                out.push(Action::SignalGroup { pgid: pid, signal: Signal::SIGKILL });
            }
        }
    }

    fn set_state(&mut self, i: usize, state: UnitState, now: Instant) {
        let u = &mut self.units[i];
        u.state = state;
        u.since = now;
    }

    /// Unit `failed` did not become ready. `status` is the child's own exit status if it
    /// exited; `code` is what sockhold exits with if it gives up.
    fn start_failed(
        &mut self,
        failed: &Unit,
        reason: String,
        status: Option<ChildStatus>,
        code: ExitCode,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        let generation = failed.generation;
        let of_reload = self.reload.is_some_and(|r| r.generation == generation);
        if of_reload {
            self.reload = None;
            self.abandon_reload(generation, now, out);
            out.push(Action::ReloadDone {
                generation: Some(generation),
                result: Err(reason.clone()),
            });
        }
        if self.mode != Mode::Running {
            return;
        }
        let mut serving: Vec<u64> = self.serving().map(|u| u.generation).collect();
        serving.sort_unstable();
        serving.dedup();
        if of_reload && !serving.is_empty() {
            let list = serving.iter().map(u64::to_string).collect::<Vec<_>>().join(", ");
            let which = if serving.len() == 1 { "generation" } else { "generations" };
            warn!("reload failed: {reason}; {which} {list} keeps serving");
            out.push(Action::Manager(ManagerMessage::Ready(format!(
                "serving: {which} {list}; last reload failed: {reason}"
            ))));
            self.follow_pending_reload(now, out);
            return;
        }
        if !serving.is_empty() {
            // A replacement worker failed while the others serve: try again later.
            warn!("{reason}; trying again");
            self.schedule_restart(now, out);
            return;
        }
        if of_reload {
            // The manager heard RELOADING=1 for this start: end its reload, even though
            // nothing serves until the restart below succeeds.
            out.push(Action::Manager(ManagerMessage::Ready(format!(
                "reload failed: {reason}; no child is serving"
            ))));
        }
        // Nothing serves: the restart policy applies to this failure as to a crash.
        if let Some(code) = status.and_then(|s| self.ends_service(s)) {
            self.shut_down(code, "the child exited and is not to be restarted", now, out);
            return;
        }
        if self.policy.restart == RestartPolicy::Never {
            self.shut_down(code, "--restart never: no second start", now, out);
            return;
        }
        self.failed_starts += 1;
        if self.failed_starts >= START_LIMIT {
            error!("giving up after {} failed starts in a row; last: {reason}", self.failed_starts);
            self.shut_down(code, "too many failed starts", now, out);
            return;
        }
        if self.reload_pending && self.starting().is_none() {
            // Someone asked for a new version since this one started: try it now.
            self.reload_pending = false;
            self.start_reload(now, out);
            return;
        }
        self.schedule_restart(now, out);
    }

    /// A reload failed: its units that are not ready are killed; with all-at-once, the ready
    /// ones stop too, so that the old generation is whole again. A rolling reload keeps the
    /// workers it already replaced.
    fn abandon_reload(&mut self, generation: u64, now: Instant, out: &mut Vec<Action>) {
        for i in 0..self.units.len() {
            let u = &self.units[i];
            if u.generation != generation {
                continue;
            }
            match (&u.state, u.pid) {
                (UnitState::Starting { .. }, Some(pid)) => {
                    self.set_state(i, UnitState::Killed, now);
                    out.push(Action::SignalGroup { pgid: pid, signal: Signal::SIGKILL });
                }
                (UnitState::Serving { .. }, Some(_))
                    if self.policy.reload_strategy == ReloadStrategy::AllAtOnce =>
                {
                    self.stop_unit(i, self.policy.stop_signal, now, out);
                }
                _ => {}
            }
        }
        let replaced = self.count(generation, Self::is_serving);
        if replaced > 0 {
            warn!(
                "generation {generation} keeps the {replaced} of {} workers it already replaced",
                self.policy.workers
            );
        }
    }

    fn schedule_restart(&mut self, now: Instant, out: &mut Vec<Action>) {
        if self.restart_at.is_some() {
            return;
        }
        let delay = self.backoff;
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
        self.restart_at = Some(now + delay);
        info!("restarting in {}", humantime::format_duration(delay));
        out.push(Action::Manager(ManagerMessage::Status(format!(
            "{} serving; restarting in {}",
            if self.serving().next().is_some() { "not every worker" } else { "no child" },
            humantime::format_duration(delay)
        ))));
    }

    /// Starts the units that are missing: as workers of the newest generation that still runs,
    /// or as a new generation when none does.
    fn restart_missing(&mut self, now: Instant, out: &mut Vec<Action>) {
        self.restart_at = None;
        let missing = self.wanted().saturating_sub(self.running().count());
        if missing == 0 {
            return;
        }
        let generation = match self.running().map(|u| u.generation).max() {
            Some(g) => g,
            None => self.new_generation(),
        };
        info!("restarting: starting generation {generation}");
        for _ in 0..missing {
            self.spawn_unit(generation, Purpose::Restart, now, out);
        }
    }

    fn exited(&mut self, pid: Pid, status: ChildStatus, now: Instant, out: &mut Vec<Action>) {
        let Some(i) = self.units.iter().position(|u| u.pid == Some(pid)) else {
            debug!("reaped pid {pid}, which is no child's main process: {status}");
            return;
        };
        let u = self.units.remove(i);
        out.push(Action::Release { unit: u.key });
        let generation = u.generation;
        let mut waited_for = false;
        if let Some(reload) = &mut self.reload
            && reload.waiting_for == Some(u.key)
        {
            reload.waiting_for = None;
            waited_for = true;
        }
        match u.state {
            UnitState::Spawning => {}
            UnitState::Starting { .. } => {
                let reason = format!(
                    "generation {generation} (pid {pid}) exited before it was ready: {status}"
                );
                warn!("{reason}");
                self.start_failed(&u, reason, Some(status), status.exit_code(), now, out);
            }
            UnitState::Serving { .. } => {
                warn!("generation {generation} (pid {pid}) exited by itself: {status}");
                self.crashed(&u, status, now, out);
            }
            UnitState::Stopping { .. } | UnitState::Killed if u.crashed => {
                warn!(
                    "generation {generation} (pid {pid}) ended after its watchdog fired: {status}"
                );
                self.crashed(&u, status, now, out);
            }
            UnitState::Stopping { signal, .. } => {
                info!("generation {generation} (pid {pid}) stopped: {status}");
                self.record_final_status(generation, status, Some(signal));
            }
            UnitState::Killed => {
                info!("generation {generation} (pid {pid}) was killed: {status}");
                self.record_final_status(generation, status, None);
            }
        }
        if waited_for {
            self.advance_reload(now, out);
        }
    }

    /// A serving unit ended by itself (or by its watchdog): replace it, or end sockhold.
    fn crashed(&mut self, u: &Unit, status: ChildStatus, now: Instant, out: &mut Vec<Action>) {
        if self.mode != Mode::Running {
            self.record_final_status(u.generation, status, None);
            return;
        }
        if let Some(reload) = self.reload {
            // The reload in progress brings up a full generation; it replaces this one too.
            info!("generation {} is starting and will take over", reload.generation);
            self.advance_reload(now, out);
            return;
        }
        if let Some(code) = self.ends_service(status) {
            self.retired += 1;
            if self.wanted() == 0 || self.serving().next().is_none() {
                self.shut_down(code, "the child exited and is not to be restarted", now, out);
            } else {
                info!("not replacing it; {} workers remain", self.wanted());
            }
            return;
        }
        if self.running().count() >= self.wanted() {
            if let Some(next) = self.starting() {
                info!("generation {} is starting and will take over", next.generation);
            }
            return;
        }
        if now.duration_since(u.since) >= STABLE_AFTER && !u.crashed {
            self.backoff = BACKOFF_START;
        }
        self.schedule_restart(now, out);
    }

    /// Whether a serving child's own exit ends its worker under the restart policy, and how.
    fn ends_service(&self, status: ChildStatus) -> Option<ExitCode> {
        match self.policy.restart {
            RestartPolicy::Never => {
                info!("--restart never: not restarted; its status is sockhold's");
                Some(status.exit_code())
            }
            RestartPolicy::OnFailure if status.success() => {
                info!("the child exited with status 0 and --restart is on-failure: not restarted");
                Some(ExitCode::SUCCESS)
            }
            _ => None,
        }
    }

    /// At shutdown, the generation that served decides the exit code: 0 if its units exited 0
    /// or died of the stop signal they were sent, else the first unclean status.
    fn record_final_status(
        &mut self,
        generation: u64,
        status: ChildStatus,
        stop_signal: Option<Signal>,
    ) {
        if let Mode::ShuttingDown { final_generation: Some(f), .. } = self.mode
            && f == generation
        {
            let clean =
                status.success() || (stop_signal.is_some() && status.signal() == stop_signal);
            if !clean {
                let code = status.exit_code();
                self.mode = Mode::ShuttingDown { code, final_generation: None };
            }
        }
    }

    /// Stops every child; exits with `code` once all are gone.
    fn shut_down(&mut self, code: ExitCode, why: &str, now: Instant, out: &mut Vec<Action>) {
        if let Mode::ShuttingDown { .. } = self.mode {
            info!("already stopping");
            return;
        }
        let final_generation =
            self.serving().map(|u| u.generation).max().or(self.starting().map(|u| u.generation));
        self.mode = Mode::ShuttingDown { code, final_generation };
        self.restart_at = None;
        let stopping = || Err("sockhold is stopping".to_string());
        if let Some(reload) = self.reload.take() {
            out.push(Action::ReloadDone {
                generation: Some(reload.generation),
                result: stopping(),
            });
        }
        if self.reload_pending {
            out.push(Action::ReloadDone { generation: None, result: stopping() });
        }
        self.reload_pending = false;
        if self.units.is_empty() {
            info!("stopping ({why})");
        } else {
            let stop = signal_name(self.policy.stop_signal);
            info!("stopping ({why}): sending SIG{stop} to every child");
        }
        out.push(Action::Manager(ManagerMessage::Stopping("stopping".into())));
        for i in 0..self.units.len() {
            self.stop_unit(i, self.policy.stop_signal, now, out);
        }
    }

    fn exit_if_done(&mut self, out: &mut Vec<Action>) {
        if let Mode::ShuttingDown { code, .. } = self.mode
            && self.units.is_empty()
        {
            out.push(Action::Exit(code));
        }
    }

    fn fire_deadlines(&mut self, now: Instant, out: &mut Vec<Action>) {
        let mut i = 0;
        while i < self.units.len() {
            let u = &self.units[i];
            let (key, generation, Some(pid)) = (u.key, u.generation, u.pid) else {
                i += 1;
                continue;
            };
            let running = self.mode == Mode::Running;
            match &u.state {
                UnitState::Starting { ready_at: Some(at), .. } if *at <= now && running => {
                    self.promote(i, now, out);
                }
                UnitState::Starting { ready_deadline, last_probe, .. }
                    if *ready_deadline <= now =>
                {
                    let waited = humantime::format_duration(ready_deadline.duration_since(u.since));
                    let mut reason = format!(
                        "generation {generation} (pid {pid}) was not ready within {waited}"
                    );
                    if let Some(why) = last_probe {
                        reason.push_str(&format!(" (last probe: {why})"));
                    }
                    warn!("{reason}; killing its process group");
                    let failed = u.clone();
                    self.set_state(i, UnitState::Killed, now);
                    out.push(Action::SignalGroup { pgid: pid, signal: Signal::SIGKILL });
                    self.start_failed(&failed, reason, None, ExitCode::FAILURE, now, out);
                }
                UnitState::Starting { probe_at: Some(at), .. } if *at <= now && running => {
                    if let UnitState::Starting { probe_at, .. } = &mut self.units[i].state {
                        *probe_at = None;
                    }
                    out.push(Action::Probe { unit: key, pid, generation });
                }
                UnitState::Serving { watchdog_at: Some(at) } if *at <= now && running => {
                    let period = u
                        .watchdog
                        .map_or("0s".into(), |d| humantime::format_duration(d).to_string());
                    error!(
                        "generation {generation} (pid {pid}) missed its watchdog (no WATCHDOG=1 within {period}); sending SIGABRT"
                    );
                    out.push(Action::Manager(ManagerMessage::Status(format!(
                        "generation {generation} (pid {pid}) missed its watchdog"
                    ))));
                    self.units[i].crashed = true;
                    self.stop_unit(i, Signal::SIGABRT, now, out);
                }
                UnitState::Stopping { kill_at, .. } if *kill_at <= now => {
                    warn!(
                        "generation {generation} (pid {pid}) did not stop within {}; sending SIGKILL to its process group",
                        humantime::format_duration(self.policy.stop_timeout)
                    );
                    self.set_state(i, UnitState::Killed, now);
                    out.push(Action::SignalGroup { pgid: pid, signal: Signal::SIGKILL });
                }
                _ => {}
            }
            i += 1;
        }
        if let Some(at) = self.restart_at
            && at <= now
            && self.mode == Mode::Running
        {
            self.restart_missing(now, out);
        }
    }

    /// Every unit, oldest first, for `ctl status`.
    pub fn generations(&self) -> Vec<GenerationInfo> {
        self.units
            .iter()
            .map(|u| GenerationInfo {
                id: u.generation,
                pid: u.pid,
                state: match u.state {
                    UnitState::Spawning | UnitState::Starting { .. } => "starting",
                    UnitState::Serving { .. } => "serving",
                    UnitState::Stopping { .. } => "stopping",
                    UnitState::Killed => "killed",
                },
                since: u.since,
                status: u.status_text.clone(),
            })
            .collect()
    }

    /// How many units were started to replace one that crashed or failed to start.
    pub fn restarts(&self) -> u64 {
        self.restarts
    }

    /// The main processes of the serving units.
    pub fn serving_pids(&self) -> Vec<Pid> {
        self.serving().filter_map(|u| u.pid).collect()
    }
}

/// `TERM` for `SIGTERM`, `RTMIN+3` for the fourth realtime signal: the name without its prefix,
/// as operators write it.
pub fn signal_name(signal: Signal) -> String {
    signal.name()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIGKILL: Signal = Signal::SIGKILL;
    const SIGTERM: Signal = Signal::SIGTERM;
    const SIGUSR1: Signal = Signal::SIGUSR1;

    fn policy(ready: ReadyMode) -> Policy {
        Policy {
            ready,
            ready_timeout: Duration::from_secs(60),
            stop_signal: SIGTERM,
            stop_timeout: Duration::from_secs(30),
            restart: RestartPolicy::OnFailure,
            notify_access: NotifyAccess::Group,
            probe_delay: Duration::ZERO,
            probe_interval: Duration::from_millis(100),
            watchdog: None,
            workers: 1,
            reload_strategy: ReloadStrategy::Rolling,
            max_draining: MAX_DRAINING,
        }
    }

    fn pid(n: i32) -> Pid {
        Pid::from_raw(n)
    }

    fn ready_from(generation: u64, sender: i32) -> Event {
        Event::Notify {
            unit: generation,
            sender: pid(sender),
            sender_pgid: Some(pid(sender)),
            message: NotifyMessage { ready: true, ..Default::default() },
        }
    }

    fn exited(p: i32, status: ChildStatus) -> Event {
        Event::Exited { pid: pid(p), status }
    }

    fn sig(p: i32, signal: Signal) -> Action {
        Action::Signal { pid: pid(p), signal }
    }

    fn group_kill(p: i32) -> Action {
        Action::SignalGroup { pgid: pid(p), signal: SIGKILL }
    }

    fn spawn(generation: u64) -> Action {
        // With one worker, every unit is a generation of its own: their numbers match.
        Action::Spawn { unit: generation, generation }
    }

    fn reload_started(generation: u64) -> Action {
        Action::ReloadStarted { generation }
    }

    fn done_ok(generation: u64) -> Action {
        Action::ReloadDone { generation: Some(generation), result: Ok(()) }
    }

    fn done_err(generation: u64, reason: &str) -> Action {
        Action::ReloadDone { generation: Some(generation), result: Err(reason.into()) }
    }

    /// Runs `steps` of (seconds since start, event, expected actions, ignoring manager messages
    /// unless the row lists one) and checks every row.
    fn run(policy: Policy, steps: &[(u64, Event, Vec<Action>)]) -> Supervisor {
        let t0 = Instant::now();
        let mut sup = Supervisor::new(policy);
        for (i, (at, event, want)) in steps.iter().enumerate() {
            let got = sup.step(event.clone(), t0 + Duration::from_millis(*at));
            let keep_manager = want.iter().any(|a| matches!(a, Action::Manager(_)));
            let got: Vec<_> = got
                .into_iter()
                .filter(|a| keep_manager || !matches!(a, Action::Manager(_)))
                .collect();
            assert_eq!(&got, want, "row {i}: {event:?} at {at}ms");
        }
        sup
    }

    /// Start generation 1 (pid 100) and make it ready at 10ms.
    fn started() -> Vec<(u64, Event, Vec<Action>)> {
        vec![
            (0, Event::Start, vec![spawn(1)]),
            (0, Event::Spawned { unit: 1, pid: pid(100) }, vec![]),
            (10, ready_from(1, 100), vec![]),
        ]
    }

    fn with(
        mut rows: Vec<(u64, Event, Vec<Action>)>,
        more: Vec<(u64, Event, Vec<Action>)>,
    ) -> Vec<(u64, Event, Vec<Action>)> {
        rows.extend(more);
        rows
    }

    #[test]
    fn reload_promotes_new_and_stops_old() {
        let rows = with(
            started(),
            vec![
                (20, Event::Reload, vec![reload_started(2), spawn(2)]),
                (20, Event::Spawned { unit: 2, pid: pid(200) }, vec![]),
                (30, ready_from(2, 200), vec![sig(100, SIGTERM), done_ok(2)]),
                (
                    40,
                    exited(100, ChildStatus::Signaled(SIGTERM)),
                    vec![Action::Release { unit: 1 }],
                ),
            ],
        );
        run(policy(ReadyMode::Notify), &rows);
    }

    #[test]
    fn ready_from_the_old_generation_never_promotes_the_new_one() {
        let rows = with(
            started(),
            vec![
                (20, Event::Reload, vec![reload_started(2), spawn(2)]),
                (20, Event::Spawned { unit: 2, pid: pid(200) }, vec![]),
                (25, ready_from(1, 100), vec![]),
                // The old generation still serves: a forwarded signal goes to it.
                (26, Event::Forward(SIGUSR1), vec![sig(100, SIGUSR1)]),
            ],
        );
        run(policy(ReadyMode::Notify), &rows);
    }

    #[test]
    fn notify_access_rules() {
        for (access, sender, sender_pgid, promoted) in [
            (NotifyAccess::Main, 100, Some(100), true),
            (NotifyAccess::Main, 101, Some(100), false),
            (NotifyAccess::Group, 101, Some(100), true),
            (NotifyAccess::Group, 101, Some(999), false),
            (NotifyAccess::Group, 101, None, false),
            (NotifyAccess::All, 555, None, true),
        ] {
            let mut p = policy(ReadyMode::Notify);
            p.notify_access = access;
            let t0 = Instant::now();
            let mut sup = Supervisor::new(p);
            sup.step(Event::Start, t0);
            sup.step(Event::Spawned { unit: 1, pid: pid(100) }, t0);
            let message = NotifyMessage { ready: true, ..Default::default() };
            let event = Event::Notify {
                unit: 1,
                sender: pid(sender),
                sender_pgid: sender_pgid.map(pid),
                message,
            };
            let actions = sup.step(event, t0);
            let got =
                actions.iter().any(|a| matches!(a, Action::Manager(ManagerMessage::Ready(_))));
            assert_eq!(got, promoted, "{access:?} sender {sender} pgid {sender_pgid:?}");
        }
    }

    #[test]
    fn reloads_during_a_reload_coalesce_into_one() {
        let rows = with(
            started(),
            vec![
                (20, Event::Reload, vec![reload_started(2), spawn(2)]),
                (20, Event::Spawned { unit: 2, pid: pid(200) }, vec![]),
                (21, Event::Reload, vec![]),
                (22, Event::Reload, vec![]),
                (23, Event::Reload, vec![]),
                (
                    30,
                    ready_from(2, 200),
                    vec![sig(100, SIGTERM), done_ok(2), reload_started(3), spawn(3)],
                ),
                (30, Event::Spawned { unit: 3, pid: pid(300) }, vec![]),
                (40, ready_from(3, 300), vec![sig(200, SIGTERM), done_ok(3)]),
            ],
        );
        run(policy(ReadyMode::Notify), &rows);
    }

    #[test]
    fn a_new_generation_that_dies_before_ready_leaves_the_old_one_serving() {
        let reason = "generation 2 (pid 200) exited before it was ready: exit status 3".to_string();
        let rows = with(
            started(),
            vec![
                (20, Event::Reload, vec![reload_started(2), spawn(2)]),
                (20, Event::Spawned { unit: 2, pid: pid(200) }, vec![]),
                (
                    25,
                    exited(200, ChildStatus::Exited(3)),
                    vec![
                        Action::Release { unit: 2 },
                        done_err(2, &reason),
                        Action::Manager(ManagerMessage::Ready(format!(
                            "serving: generation 1; last reload failed: {reason}"
                        ))),
                    ],
                ),
                (26, Event::Forward(SIGUSR1), vec![sig(100, SIGUSR1)]),
            ],
        );
        run(policy(ReadyMode::Notify), &rows);
    }

    #[test]
    fn a_new_generation_never_ready_is_killed_at_the_timeout() {
        let reason = "generation 2 (pid 200) was not ready within 1m".to_string();
        let rows = with(
            started(),
            vec![
                (20, Event::Reload, vec![reload_started(2), spawn(2)]),
                (20, Event::Spawned { unit: 2, pid: pid(200) }, vec![]),
                (60_019, Event::Timer, vec![]),
                (60_020, Event::Timer, vec![group_kill(200), done_err(2, &reason)]),
                (
                    60_030,
                    exited(200, ChildStatus::Signaled(SIGKILL)),
                    vec![Action::Release { unit: 2 }],
                ),
                (60_040, Event::Forward(SIGUSR1), vec![sig(100, SIGUSR1)]),
            ],
        );
        run(policy(ReadyMode::Notify), &rows);
    }

    #[test]
    fn an_old_generation_that_ignores_the_stop_signal_is_killed_at_the_deadline() {
        let rows = with(
            started(),
            vec![
                (20, Event::Reload, vec![reload_started(2), spawn(2)]),
                (20, Event::Spawned { unit: 2, pid: pid(200) }, vec![]),
                (30, ready_from(2, 200), vec![sig(100, SIGTERM), done_ok(2)]),
                (30_029, Event::Timer, vec![]),
                (30_030, Event::Timer, vec![group_kill(100)]),
                (
                    30_040,
                    exited(100, ChildStatus::Signaled(SIGKILL)),
                    vec![Action::Release { unit: 1 }],
                ),
            ],
        );
        run(policy(ReadyMode::Notify), &rows);
    }

    #[test]
    fn stop_during_a_reload_stops_both_and_exits_clean() {
        let rows = with(
            started(),
            vec![
                (20, Event::Reload, vec![reload_started(2), spawn(2)]),
                (20, Event::Spawned { unit: 2, pid: pid(200) }, vec![]),
                (
                    25,
                    Event::Stop("received SIGTERM".into()),
                    vec![done_err(2, "sockhold is stopping"), sig(100, SIGTERM), sig(200, SIGTERM)],
                ),
                (26, ready_from(2, 200), vec![]),
                (27, exited(200, ChildStatus::Exited(0)), vec![Action::Release { unit: 2 }]),
                (
                    28,
                    exited(100, ChildStatus::Signaled(SIGTERM)),
                    vec![Action::Release { unit: 1 }, Action::Exit(ExitCode::SUCCESS)],
                ),
            ],
        );
        run(policy(ReadyMode::Notify), &rows);
    }

    #[test]
    fn exit_code_after_stop_is_the_serving_childs_unless_clean() {
        for (status, want) in [
            (ChildStatus::Exited(0), 0),
            (ChildStatus::Signaled(SIGTERM), 0),
            (ChildStatus::Exited(3), 3),
            (ChildStatus::Signaled(SIGKILL), 137),
        ] {
            let rows = with(
                started(),
                vec![
                    (20, Event::Stop("received SIGTERM".into()), vec![sig(100, SIGTERM)]),
                    (
                        30,
                        exited(100, status),
                        vec![Action::Release { unit: 1 }, Action::Exit(ExitCode(want))],
                    ),
                ],
            );
            run(policy(ReadyMode::Notify), &rows);
        }
    }

    #[test]
    fn crash_restarts_with_doubling_backoff_and_gives_up_on_repeated_failed_starts() {
        let mut rows = with(
            started(),
            vec![
                (20, exited(100, ChildStatus::Exited(1)), vec![Action::Release { unit: 1 }]),
                (119, Event::Timer, vec![]),
                (120, Event::Timer, vec![spawn(2)]),
            ],
        );
        // Each start fails before ready; the delay doubles: 200ms, 400ms, 800ms, 1600ms.
        let mut t = 120;
        let mut delay = 200;
        for generation in 2..=5u64 {
            let p = generation as i32 * 100;
            rows.push((t, Event::Spawned { unit: generation, pid: pid(p) }, vec![]));
            rows.push((
                t + 1,
                exited(p, ChildStatus::Exited(1)),
                vec![Action::Release { unit: generation }],
            ));
            t += 1 + delay;
            rows.push((t - 1, Event::Timer, vec![]));
            rows.push((t, Event::Timer, vec![spawn(generation + 1)]));
            delay *= 2;
        }
        rows.push((t, Event::Spawned { unit: 6, pid: pid(600) }, vec![]));
        // The fifth failed start in a row ends sockhold with the child's status.
        rows.push((
            t + 1,
            exited(600, ChildStatus::Exited(4)),
            vec![Action::Release { unit: 6 }, Action::Exit(ExitCode(4))],
        ));
        run(policy(ReadyMode::Notify), &rows);
    }

    #[test]
    fn backoff_resets_after_a_long_stable_run() {
        let mut sup = run(policy(ReadyMode::Notify), &started());
        sup.backoff = Duration::from_secs(8);
        let t0 = Instant::now();
        sup.step(exited(100, ChildStatus::Exited(1)), t0 + STABLE_AFTER + Duration::from_secs(1));
        assert_eq!(sup.backoff, BACKOFF_START * 2, "reset to 100ms, then doubled for the next");
    }

    #[test]
    fn restart_policies() {
        for (restart, status, want) in [
            (RestartPolicy::OnFailure, ChildStatus::Exited(0), Some(0)),
            (RestartPolicy::OnFailure, ChildStatus::Exited(2), None),
            (RestartPolicy::OnFailure, ChildStatus::Signaled(SIGKILL), None),
            (RestartPolicy::Always, ChildStatus::Exited(0), None),
            (RestartPolicy::Never, ChildStatus::Exited(2), Some(2)),
            (RestartPolicy::Never, ChildStatus::Signaled(SIGKILL), Some(137)),
        ] {
            let mut p = policy(ReadyMode::Notify);
            p.restart = restart;
            let mut sup = run(p, &started());
            let actions = sup.step(exited(100, status), Instant::now());
            let exit = actions.iter().find_map(|a| match a {
                Action::Exit(code) => Some(code.0),
                _ => None,
            });
            assert_eq!(exit, want, "{restart:?} {status}");
            assert_eq!(
                sup.restart_at.is_some(),
                want.is_none(),
                "{restart:?} {status}: restart scheduled"
            );
        }
    }

    #[test]
    fn spawn_failure_at_start_exits_with_its_code_and_later_fails_the_reload() {
        run(
            policy(ReadyMode::Notify),
            &[
                (0, Event::Start, vec![spawn(1)]),
                (
                    0,
                    Event::SpawnFailed {
                        unit: 1,
                        error: "not found".into(),
                        code: ExitCode::NOT_FOUND,
                    },
                    vec![Action::Exit(ExitCode::NOT_FOUND)],
                ),
            ],
        );
        let rows = with(
            started(),
            vec![
                (20, Event::Reload, vec![reload_started(2), spawn(2)]),
                (
                    20,
                    Event::SpawnFailed {
                        unit: 2,
                        error: "not found".into(),
                        code: ExitCode::NOT_FOUND,
                    },
                    vec![done_err(2, "not found")],
                ),
                (21, Event::Forward(SIGUSR1), vec![sig(100, SIGUSR1)]),
            ],
        );
        run(policy(ReadyMode::Notify), &rows);
    }

    #[test]
    fn delay_readiness_promotes_after_the_delay_only() {
        run(
            policy(ReadyMode::Delay(Duration::from_millis(500))),
            &[
                (0, Event::Start, vec![spawn(1)]),
                (0, Event::Spawned { unit: 1, pid: pid(100) }, vec![]),
                (100, ready_from(1, 100), vec![]),
                (499, Event::Timer, vec![]),
                (
                    500,
                    Event::Timer,
                    vec![Action::Manager(ManagerMessage::Ready(
                        "serving: generation 1 (pid 100)".into(),
                    ))],
                ),
            ],
        );
    }

    #[test]
    fn manager_hears_reloading_then_ready() {
        let rows = with(
            started(),
            vec![
                (
                    20,
                    Event::Reload,
                    vec![
                        reload_started(2),
                        Action::Manager(ManagerMessage::Reloading(
                            "reloading: starting generation 2".into(),
                        )),
                        spawn(2),
                    ],
                ),
                (20, Event::Spawned { unit: 2, pid: pid(200) }, vec![]),
                (
                    30,
                    ready_from(2, 200),
                    vec![
                        sig(100, SIGTERM),
                        done_ok(2),
                        Action::Manager(ManagerMessage::Ready(
                            "serving: generation 2 (pid 200)".into(),
                        )),
                    ],
                ),
                (
                    40,
                    Event::Stop("received SIGTERM".into()),
                    vec![
                        Action::Manager(ManagerMessage::Stopping("stopping".into())),
                        sig(200, SIGTERM),
                    ],
                ),
            ],
        );
        run(policy(ReadyMode::Notify), &rows);
    }

    /// A reload at `at` ms that starts generation `id` (pid `id * 100`) and makes it ready,
    /// stopping generation `id - 1`: the rows, with `more` actions expected on its promotion.
    fn reload_rows(at: u64, id: u64, more: Vec<Action>) -> Vec<(u64, Event, Vec<Action>)> {
        let p = id as i32 * 100;
        let mut promoted = vec![sig(p - 100, SIGTERM)];
        promoted.extend(more);
        promoted.push(done_ok(id));
        vec![
            (at, Event::Reload, vec![reload_started(id), spawn(id)]),
            (at, Event::Spawned { unit: id, pid: pid(p) }, vec![]),
            (at + 1, ready_from(id, p), promoted),
        ]
    }

    fn capped(max_draining: usize) -> Policy {
        let mut p = policy(ReadyMode::Notify);
        p.max_draining = max_draining;
        p
    }

    #[test]
    fn max_draining_kills_the_oldest_draining_generation_early() {
        let mut rows = started();
        // Generations 1 and 2 ignore the stop signal and drain: two may.
        rows.extend(reload_rows(20, 2, vec![]));
        rows.extend(reload_rows(30, 3, vec![]));
        // A third would drain: the oldest, generation 1, is killed with its group.
        rows.extend(reload_rows(40, 4, vec![group_kill(100)]));
        rows.push((
            45,
            exited(100, ChildStatus::Signaled(SIGKILL)),
            vec![Action::Release { unit: 1 }],
        ));
        // Generation 2 finishes draining by itself: room for one more without a kill.
        rows.push((50, exited(200, ChildStatus::Exited(0)), vec![Action::Release { unit: 2 }]));
        rows.extend(reload_rows(60, 5, vec![]));
        rows.extend(reload_rows(70, 6, vec![group_kill(300)]));
        let sup = run(capped(2), &rows);
        let states: Vec<_> = sup.generations().iter().map(|g| (g.id, g.state)).collect();
        assert_eq!(
            states,
            [(3, "killed"), (4, "stopping"), (5, "stopping"), (6, "serving")],
            "at most two draining"
        );
    }

    #[test]
    fn max_draining_one_keeps_only_the_last_generation_draining() {
        let mut rows = started();
        rows.extend(reload_rows(20, 2, vec![]));
        rows.extend(reload_rows(30, 3, vec![group_kill(100)]));
        rows.extend(reload_rows(40, 4, vec![group_kill(200)]));
        // A killed generation that is slow to be reaped does not count as draining.
        rows.extend(reload_rows(50, 5, vec![group_kill(300)]));
        run(capped(1), &rows);
    }

    #[test]
    fn max_draining_does_not_apply_at_shutdown() {
        let mut rows = started();
        rows.extend(reload_rows(20, 2, vec![]));
        // Generation 3 is starting when the stop comes: all three stop, none is killed early.
        rows.push((30, Event::Reload, vec![reload_started(3), spawn(3)]));
        rows.push((30, Event::Spawned { unit: 3, pid: pid(300) }, vec![]));
        rows.push((
            40,
            Event::Stop("received SIGTERM".into()),
            vec![done_err(3, "sockhold is stopping"), sig(200, SIGTERM), sig(300, SIGTERM)],
        ));
        let sup = run(capped(1), &rows);
        let stopping = sup.generations().iter().filter(|g| g.state == "stopping").count();
        assert_eq!(stopping, 3, "{:?}", sup.generations());
    }

    #[test]
    fn deadlines_are_the_nearest_pending_one() {
        let t0 = Instant::now();
        let mut sup = Supervisor::new(policy(ReadyMode::Delay(Duration::from_secs(2))));
        assert_eq!(sup.next_deadline(), None, "nothing running: no wakeup");
        sup.step(Event::Start, t0);
        sup.step(Event::Spawned { unit: 1, pid: pid(100) }, t0);
        assert_eq!(sup.next_deadline(), Some(t0 + Duration::from_secs(2)));
        sup.step(Event::Timer, t0 + Duration::from_secs(2));
        assert_eq!(sup.next_deadline(), None, "serving and idle: no wakeup");
    }

    fn notify(unit: u64, sender: i32, message: NotifyMessage) -> Event {
        Event::Notify { unit, sender: pid(sender), sender_pgid: Some(pid(sender)), message }
    }

    fn workers(n: usize, strategy: ReloadStrategy) -> Policy {
        let mut p = policy(ReadyMode::Notify);
        p.workers = n;
        p.reload_strategy = strategy;
        p
    }

    /// Drives a supervisor as the event loop would, with children that start at once, get
    /// ready when told, and exit as soon as they are signalled; counts the children alive.
    struct Sim {
        sup: Supervisor,
        t0: Instant,
        ms: u64,
        /// Live pid -> (unit, generation).
        alive: std::collections::BTreeMap<i32, (u64, u64)>,
        max_alive: usize,
        done: Vec<Result<(), String>>,
        /// Children that got the stop signal and exit at the next `settle`.
        signalled: Vec<i32>,
    }

    impl Sim {
        fn new(policy: Policy) -> Sim {
            let mut sim = Sim {
                sup: Supervisor::new(policy),
                t0: Instant::now(),
                ms: 0,
                alive: Default::default(),
                max_alive: 0,
                done: Vec::new(),
                signalled: Vec::new(),
            };
            sim.feed(Event::Start);
            sim
        }

        fn feed(&mut self, event: Event) {
            let mut queue = std::collections::VecDeque::from([event]);
            while let Some(event) = queue.pop_front() {
                let now = self.t0 + Duration::from_millis(self.ms);
                for action in self.sup.step(event, now) {
                    match action {
                        Action::Spawn { unit, generation } => {
                            let p = 1000 + unit as i32;
                            self.alive.insert(p, (unit, generation));
                            self.max_alive = self.max_alive.max(self.alive.len());
                            queue.push_front(Event::Spawned { unit, pid: pid(p) });
                        }
                        Action::Signal { pid: p, .. } | Action::SignalGroup { pgid: p, .. } => {
                            self.signalled.push(p.as_raw())
                        }
                        Action::ReloadDone { result, .. } => self.done.push(result),
                        _ => {}
                    }
                }
            }
        }

        /// Every starting child of `generation` sends READY=1, one at a time, and every
        /// signalled child exits, until nothing changes.
        fn settle(&mut self, generation: u64) {
            loop {
                self.ms += 1;
                if let Some(p) = self.signalled.pop() {
                    if self.alive.remove(&p).is_some() {
                        self.feed(exited(p, ChildStatus::Signaled(SIGTERM)));
                    }
                    continue;
                }
                let starting = self.sup.units.iter().find(|u| {
                    u.generation == generation && matches!(u.state, UnitState::Starting { .. })
                });
                let Some(u) = starting.map(|u| (u.key, u.pid.expect("forked").as_raw())) else {
                    break;
                };
                self.feed(ready_from(u.0, u.1));
            }
        }

        fn serving_generations(&self) -> Vec<u64> {
            self.sup.serving().map(|u| u.generation).collect()
        }
    }

    #[test]
    fn workers_start_together_and_the_manager_hears_ready_once_all_serve() {
        let mut sup = Supervisor::new(workers(3, ReloadStrategy::Rolling));
        let t0 = Instant::now();
        let spawns = sup.step(Event::Start, t0);
        assert_eq!(
            spawns,
            (1..=3).map(|u| Action::Spawn { unit: u, generation: 1 }).collect::<Vec<_>>()
        );
        for u in 1..=3 {
            sup.step(Event::Spawned { unit: u, pid: pid(100 + u as i32) }, t0);
        }
        let ready = |a: &Vec<Action>| {
            a.iter().any(|a| matches!(a, Action::Manager(ManagerMessage::Ready(_))))
        };
        assert!(!ready(&sup.step(ready_from(1, 101), t0)));
        assert!(!ready(&sup.step(ready_from(2, 102), t0)));
        let last = sup.step(ready_from(3, 103), t0);
        assert!(ready(&last), "{last:?}");
        assert!(last.contains(&Action::Manager(ManagerMessage::Ready(
            "serving: generation 1 (pids 101,102,103)".into()
        ))));
        assert_eq!(sup.serving_pids(), vec![pid(101), pid(102), pid(103)]);
    }

    #[test]
    fn a_rolling_reload_replaces_one_worker_at_a_time_with_at_most_n_plus_one_alive() {
        for n in [1, 2, 4] {
            let mut sim = Sim::new(workers(n, ReloadStrategy::Rolling));
            sim.settle(1);
            assert_eq!(sim.serving_generations(), vec![1; n]);
            for round in 0..3u64 {
                sim.max_alive = sim.alive.len();
                sim.feed(Event::Reload);
                sim.settle(2 + round);
                assert_eq!(sim.serving_generations(), vec![2 + round; n], "n={n}");
                assert_eq!(sim.alive.len(), n, "every old worker is gone");
                assert!(sim.max_alive <= n + 1, "n={n}: {} alive at once", sim.max_alive);
            }
            assert_eq!(sim.done, vec![Ok(()); 3]);
        }
    }

    #[test]
    fn an_all_at_once_reload_stops_the_old_workers_only_when_every_new_one_is_ready() {
        let mut sim = Sim::new(workers(3, ReloadStrategy::AllAtOnce));
        sim.settle(1);
        sim.feed(Event::Reload);
        assert_eq!(sim.alive.len(), 6, "three new workers start together");
        for key in [4, 5] {
            sim.feed(ready_from(key, 1000 + key as i32));
            assert!(sim.signalled.is_empty(), "no old worker stops before all new are ready");
        }
        sim.feed(ready_from(6, 1006));
        let mut stopped = sim.signalled.clone();
        stopped.sort();
        assert_eq!(stopped, vec![1001, 1002, 1003]);
        assert_eq!(sim.done, vec![Ok(())]);
    }

    #[test]
    fn a_failed_rolling_reload_keeps_what_it_replaced_and_the_old_workers_serve_on() {
        let mut sim = Sim::new(workers(3, ReloadStrategy::Rolling));
        sim.settle(1);
        sim.feed(Event::Reload);
        // The first new worker (unit 4) gets ready and replaces an old one.
        sim.feed(ready_from(4, 1004));
        let p = sim.signalled.pop().expect("one old worker stopped");
        sim.alive.remove(&p);
        sim.feed(exited(p, ChildStatus::Signaled(SIGTERM)));
        // The second new worker (unit 5) dies before it is ready.
        sim.alive.remove(&1005);
        sim.feed(exited(1005, ChildStatus::Exited(3)));
        assert_eq!(
            sim.done,
            vec![Err("generation 2 (pid 1005) exited before it was ready: exit status 3".into())]
        );
        let mut serving = sim.serving_generations();
        serving.sort();
        assert_eq!(serving, vec![1, 1, 2], "two old workers and the replaced one serve");
        assert!(sim.signalled.is_empty(), "nothing else is stopped");
        // The next reload replaces them all.
        sim.feed(Event::Reload);
        sim.settle(3);
        assert_eq!(sim.serving_generations(), vec![3, 3, 3]);
    }

    #[test]
    fn a_failed_all_at_once_reload_kills_and_stops_every_new_worker() {
        let mut sim = Sim::new(workers(2, ReloadStrategy::AllAtOnce));
        sim.settle(1);
        sim.feed(Event::Reload);
        sim.feed(ready_from(3, 1003));
        sim.alive.remove(&1004);
        sim.feed(exited(1004, ChildStatus::Exited(1)));
        assert_eq!(sim.signalled, vec![1003], "the new worker that was ready stops too");
        assert!(matches!(sim.done.as_slice(), [Err(_)]));
        sim.settle(2);
        assert_eq!(sim.serving_generations(), vec![1, 1]);
    }

    #[test]
    fn a_crashed_worker_is_replaced_alone_in_its_generation_after_the_backoff() {
        let rows = vec![
            (
                0,
                Event::Start,
                vec![
                    Action::Spawn { unit: 1, generation: 1 },
                    Action::Spawn { unit: 2, generation: 1 },
                ],
            ),
            (0, Event::Spawned { unit: 1, pid: pid(100) }, vec![]),
            (0, Event::Spawned { unit: 2, pid: pid(200) }, vec![]),
            (10, ready_from(1, 100), vec![]),
            (10, ready_from(2, 200), vec![]),
            (20, exited(200, ChildStatus::Exited(1)), vec![Action::Release { unit: 2 }]),
            (119, Event::Timer, vec![]),
            (120, Event::Timer, vec![Action::Spawn { unit: 3, generation: 1 }]),
            (120, Event::Spawned { unit: 3, pid: pid(300) }, vec![]),
            (130, ready_from(3, 300), vec![]),
            // A reload now replaces both, as generation 2.
            (140, Event::Reload, vec![reload_started(2), Action::Spawn { unit: 4, generation: 2 }]),
        ];
        let sup = run(workers(2, ReloadStrategy::Rolling), &rows);
        assert_eq!(sup.restarts(), 1);
    }

    #[test]
    fn http_and_exec_readiness_probe_until_one_succeeds() {
        let mut p = policy(ReadyMode::Http("/healthz".into()));
        p.probe_delay = Duration::from_millis(5);
        let probe =
            |unit: u64, p: i32, generation: u64| Action::Probe { unit, pid: pid(p), generation };
        let failed =
            |unit| Event::ProbeDone { unit, result: Err("the health check answered 500".into()) };
        let ok = |unit| Event::ProbeDone { unit, result: Ok(()) };
        let rows = vec![
            (0, Event::Start, vec![spawn(1)]),
            (0, Event::Spawned { unit: 1, pid: pid(100) }, vec![]),
            (4, Event::Timer, vec![]),
            (5, Event::Timer, vec![probe(1, 100, 1)]),
            // READY=1 does not count with http: readiness.
            (6, ready_from(1, 100), vec![]),
            (7, ok(1), vec![]),
            (20, Event::Reload, vec![reload_started(2), spawn(2)]),
            (20, Event::Spawned { unit: 2, pid: pid(200) }, vec![]),
            (25, Event::Timer, vec![probe(2, 200, 2)]),
            (26, failed(2), vec![]),
            (125, Event::Timer, vec![]),
            (126, Event::Timer, vec![probe(2, 200, 2)]),
            (127, ok(2), vec![sig(100, SIGTERM), done_ok(2)]),
        ];
        run(p.clone(), &rows);

        p.ready_timeout = Duration::from_secs(1);
        let rows = vec![
            (0, Event::Start, vec![spawn(1)]),
            (0, Event::Spawned { unit: 1, pid: pid(100) }, vec![]),
            (5, Event::Timer, vec![probe(1, 100, 1)]),
            (6, ok(1), vec![]),
            (20, Event::Reload, vec![reload_started(2), spawn(2)]),
            (20, Event::Spawned { unit: 2, pid: pid(200) }, vec![]),
            (25, Event::Timer, vec![probe(2, 200, 2)]),
            (26, failed(2), vec![]),
            (
                1020,
                Event::Timer,
                vec![
                    group_kill(200),
                    done_err(
                        2,
                        "generation 2 (pid 200) was not ready within 1s (last probe: the health check answered 500)",
                    ),
                ],
            ),
        ];
        run(p, &rows);
    }

    #[test]
    fn a_missed_watchdog_aborts_the_child_and_restarts_it_as_after_a_crash() {
        let mut p = policy(ReadyMode::Notify);
        p.watchdog = Some(Duration::from_secs(1));
        let fed = NotifyMessage { watchdog: true, ..Default::default() };
        let rows = with(
            started(),
            vec![
                (500, notify(1, 100, fed.clone()), vec![]),
                (1499, Event::Timer, vec![]),
                (1500, Event::Timer, vec![sig(100, Signal::SIGABRT)]),
                // Stopped (SIGSTOP) children do not die of SIGABRT: SIGKILL at --stop-timeout.
                (31_500, Event::Timer, vec![group_kill(100)]),
                (
                    31_510,
                    exited(100, ChildStatus::Signaled(SIGKILL)),
                    vec![Action::Release { unit: 1 }],
                ),
                (31_610, Event::Timer, vec![spawn(2)]),
            ],
        );
        let sup = run(p.clone(), &rows);
        assert_eq!(sup.restarts(), 1);

        // WATCHDOG=trigger fires at once; WATCHDOG_USEC= changes the period.
        let rows = with(
            started(),
            vec![
                (
                    20,
                    notify(
                        1,
                        100,
                        NotifyMessage { watchdog_usec: Some(5_000_000), ..Default::default() },
                    ),
                    vec![],
                ),
                (1100, Event::Timer, vec![]),
                (5019, Event::Timer, vec![]),
                (5020, Event::Timer, vec![sig(100, Signal::SIGABRT)]),
            ],
        );
        run(p.clone(), &rows);
        let rows = with(
            started(),
            vec![(
                20,
                notify(1, 100, NotifyMessage { watchdog_trigger: true, ..Default::default() }),
                vec![sig(100, Signal::SIGABRT)],
            )],
        );
        run(p.clone(), &rows);
        // Before it is ready, a child has no watchdog: its ready timeout covers it.
        let rows = vec![
            (0, Event::Start, vec![spawn(1)]),
            (0, Event::Spawned { unit: 1, pid: pid(100) }, vec![]),
            (5000, Event::Timer, vec![]),
        ];
        run(p, &rows);
    }

    #[test]
    fn extend_timeout_usec_pushes_the_ready_and_stop_deadlines() {
        let mut p = policy(ReadyMode::Notify);
        p.ready_timeout = Duration::from_secs(1);
        p.stop_timeout = Duration::from_secs(1);
        let extend = |usec| NotifyMessage { extend_timeout_usec: Some(usec), ..Default::default() };
        let rows = vec![
            (0, Event::Start, vec![spawn(1)]),
            (0, Event::Spawned { unit: 1, pid: pid(100) }, vec![]),
            (900, notify(1, 100, extend(3_000_000)), vec![]),
            (1000, Event::Timer, vec![]),
            (3899, Event::Timer, vec![]),
            (3900, ready_from(1, 100), vec![]),
            (4000, Event::Stop("test".into()), vec![sig(100, SIGTERM)]),
            (4500, notify(1, 100, extend(2_000_000)), vec![]),
            (5000, Event::Timer, vec![]),
            (6500, Event::Timer, vec![group_kill(100)]),
        ];
        run(p, &rows);
    }
}

/// Self-upgrade: the supervisor's whole state as JSON, and back. Every instant is written as
/// signed nanoseconds from the moment of the snapshot (negative: in the past), because an
/// `Instant` means nothing outside the process; the monotonic clock itself survives execve, so
/// the deadlines that run keep running.
impl Supervisor {
    /// The state to hand over, or why there is nothing safe to hand over now.
    pub fn snapshot(&self, now: Instant) -> Result<serde_json::Value, String> {
        use serde_json::json;
        if self.mode != Mode::Running {
            return Err("sockhold is stopping".into());
        }
        let ns = |t: Instant| nanos_from(t, now);
        let mut units = Vec::new();
        for u in &self.units {
            let state = match &u.state {
                UnitState::Spawning => {
                    return Err(format!("generation {} is being spawned", u.generation));
                }
                UnitState::Starting { ready_deadline, ready_at, probe_at, last_probe } => json!({
                    "name": "starting",
                    "ready_deadline_ns": ns(*ready_deadline),
                    "ready_at_ns": ready_at.map(ns),
                    // A probe in flight is not handed over: the new program probes again now.
                    "probe_at_ns": match probe_at {
                        Some(t) => Some(ns(*t)),
                        None if self.policy.ready.probes() => Some(0),
                        None => None,
                    },
                    "last_probe": last_probe,
                }),
                UnitState::Serving { watchdog_at } => json!({
                    "name": "serving",
                    "watchdog_at_ns": watchdog_at.map(ns),
                }),
                UnitState::Stopping { kill_at, signal } => json!({
                    "name": "stopping",
                    "kill_at_ns": ns(*kill_at),
                    "signal": signal.raw(),
                }),
                UnitState::Killed => json!({ "name": "killed" }),
            };
            units.push(json!({
                "key": u.key,
                "generation": u.generation,
                "pid": u.pid.map(Pid::as_raw),
                "purpose": match u.purpose {
                    Purpose::Initial => "initial",
                    Purpose::Reload => "reload",
                    Purpose::Restart => "restart",
                },
                "state": state,
                "since_ns": ns(u.since),
                "status": u.status_text,
                "watchdog_ns": u.watchdog.map(|d| d.as_nanos() as u64),
                "crashed": u.crashed,
            }));
        }
        Ok(json!({
            "units": units,
            "next_unit": self.next_unit,
            "next_generation": self.next_generation,
            "reload": self.reload.map(|r| json!({
                "generation": r.generation,
                "waiting_for": r.waiting_for,
            })),
            "reload_pending": self.reload_pending,
            "restart_at_ns": self.restart_at.map(ns),
            "backoff_ns": self.backoff.as_nanos() as u64,
            "failed_starts": self.failed_starts,
            "restarts": self.restarts,
            "retired": self.retired,
        }))
    }

    /// A supervisor that goes on from `state`, a [`Supervisor::snapshot`] taken `elapsed` ago.
    pub fn restore(
        policy: Policy,
        state: &serde_json::Value,
        now: Instant,
        elapsed: Duration,
    ) -> Result<Supervisor, String> {
        use serde_json::Value;
        let bad = |what: &str| format!("the supervisor state has no valid {what}");
        let at = |v: &Value, what: &str| {
            v.as_i64().map(|ns| instant_at(ns, now, elapsed)).ok_or_else(|| bad(what))
        };
        let maybe_at = |v: &Value, what: &str| match v {
            Value::Null => Ok(None),
            v => at(v, what).map(Some),
        };
        let u64_of = |v: &Value, what: &str| v.as_u64().ok_or_else(|| bad(what));
        let mut units = Vec::new();
        for u in state["units"].as_array().ok_or_else(|| bad("units"))? {
            let s = &u["state"];
            let unit_state = match s["name"].as_str() {
                Some("starting") => UnitState::Starting {
                    ready_deadline: at(&s["ready_deadline_ns"], "ready deadline")?,
                    ready_at: maybe_at(&s["ready_at_ns"], "ready time")?,
                    probe_at: maybe_at(&s["probe_at_ns"], "probe time")?,
                    last_probe: s["last_probe"].as_str().map(str::to_string),
                },
                Some("serving") => UnitState::Serving {
                    watchdog_at: maybe_at(&s["watchdog_at_ns"], "watchdog deadline")?,
                },
                Some("stopping") => UnitState::Stopping {
                    kill_at: at(&s["kill_at_ns"], "kill deadline")?,
                    signal: s["signal"]
                        .as_i64()
                        .and_then(|n| Signal::try_from(n as i32).ok())
                        .ok_or_else(|| bad("stop signal"))?,
                },
                Some("killed") => UnitState::Killed,
                _ => return Err(bad("unit state")),
            };
            let pid =
                u["pid"].as_i64().and_then(|p| i32::try_from(p).ok()).ok_or_else(|| bad("pid"))?;
            units.push(Unit {
                key: u64_of(&u["key"], "unit key")?,
                generation: u64_of(&u["generation"], "generation")?,
                pid: Some(Pid::from_raw(pid)),
                purpose: match u["purpose"].as_str() {
                    Some("initial") => Purpose::Initial,
                    Some("reload") => Purpose::Reload,
                    Some("restart") => Purpose::Restart,
                    _ => return Err(bad("purpose")),
                },
                state: unit_state,
                since: at(&u["since_ns"], "since")?,
                status_text: u["status"].as_str().map(str::to_string),
                watchdog: u["watchdog_ns"].as_u64().map(Duration::from_nanos),
                crashed: u["crashed"].as_bool().ok_or_else(|| bad("crashed flag"))?,
            });
        }
        let reload = match &state["reload"] {
            Value::Null => None,
            r => Some(Reload {
                generation: u64_of(&r["generation"], "reload generation")?,
                waiting_for: r["waiting_for"].as_u64(),
            }),
        };
        Ok(Supervisor {
            policy,
            mode: Mode::Running,
            units,
            next_unit: u64_of(&state["next_unit"], "next unit")?,
            next_generation: u64_of(&state["next_generation"], "next generation")?,
            reload,
            reload_pending: state["reload_pending"]
                .as_bool()
                .ok_or_else(|| bad("reload_pending"))?,
            restart_at: maybe_at(&state["restart_at_ns"], "restart time")?,
            backoff: Duration::from_nanos(u64_of(&state["backoff_ns"], "backoff")?),
            failed_starts: u64_of(&state["failed_starts"], "failed starts")? as u32,
            restarts: u64_of(&state["restarts"], "restarts")?,
            retired: u64_of(&state["retired"], "retired workers")? as usize,
        })
    }
}

/// `t` as signed nanoseconds from `now`.
fn nanos_from(t: Instant, now: Instant) -> i64 {
    match t.checked_duration_since(now) {
        Some(ahead) => ahead.as_nanos() as i64,
        None => -(now.duration_since(t).as_nanos() as i64),
    }
}

/// The instant `ns` nanoseconds from a moment `elapsed` before `now`.
fn instant_at(ns: i64, now: Instant, elapsed: Duration) -> Instant {
    let then = now.checked_sub(elapsed).unwrap_or(now);
    let offset = Duration::from_nanos(ns.unsigned_abs());
    if ns >= 0 { then + offset } else { then.checked_sub(offset).unwrap_or(then) }
}

#[cfg(test)]
mod snapshot_tests {
    use super::*;

    const SIGTERM: Signal = Signal::SIGTERM;

    #[test]
    fn snapshot_and_restore_keep_every_generation_and_deadline() {
        let policy = Policy {
            ready: ReadyMode::Notify,
            ready_timeout: Duration::from_secs(60),
            stop_signal: SIGTERM,
            stop_timeout: Duration::from_secs(30),
            restart: RestartPolicy::OnFailure,
            notify_access: NotifyAccess::Group,
            probe_delay: Duration::ZERO,
            probe_interval: Duration::from_millis(100),
            watchdog: Some(Duration::from_secs(20)),
            workers: 1,
            reload_strategy: ReloadStrategy::Rolling,
            max_draining: MAX_DRAINING,
        };
        let t0 = Instant::now();
        let mut s = Supervisor::new(policy.clone());
        s.step(Event::Start, t0);
        s.step(Event::Spawned { unit: 1, pid: Pid::from_raw(101) }, t0);
        let ready = NotifyMessage { ready: true, status: Some("up".into()), ..Default::default() };
        let notify = |unit, pid| Event::Notify {
            unit,
            sender: Pid::from_raw(pid),
            sender_pgid: None,
            message: ready.clone(),
        };
        s.step(notify(1, 101), t0);
        let t1 = t0 + Duration::from_secs(1);
        s.step(Event::Reload, t1);
        s.step(Event::Spawned { unit: 2, pid: Pid::from_raw(102) }, t1);
        s.step(notify(2, 102), t1);
        // Generation 1 is stopping (SIGKILL due at t1+30s); a third generation is starting.
        let t2 = t1 + Duration::from_secs(2);
        s.step(Event::Reload, t2);
        s.step(Event::Spawned { unit: 3, pid: Pid::from_raw(103) }, t2);
        s.step(Event::Reload, t2);
        let t3 = t2 + Duration::from_secs(1);
        let state = s.snapshot(t3).expect("snapshot");
        // What a failed upgrade kills when nothing can supervise the children any more.
        let pids = crate::upgrade::state_pids(&serde_json::json!({ "supervisor": state }));
        assert_eq!(pids, [101, 102, 103].map(Pid::from_raw));
        // Restored 100ms later, by a clock that went on.
        let t4 = t3 + Duration::from_millis(100);
        let r =
            Supervisor::restore(policy, &state, t4, Duration::from_millis(100)).expect("restore");
        assert_eq!(r.generations(), s.generations());
        assert_eq!(r.next_deadline(), s.next_deadline());
        assert_eq!((r.next_unit, r.next_generation), (4, 4));
        assert!(r.reload_pending);
        assert_eq!(r.snapshot(t3).expect("again"), state, "a round trip changes nothing");
        // The restored one goes on deciding: generation 1's SIGKILL comes at its deadline.
        let mut r = r;
        let actions = r.step(Event::Timer, t1 + Duration::from_secs(30));
        assert!(
            actions.contains(&Action::SignalGroup {
                pgid: Pid::from_raw(101),
                signal: Signal::SIGKILL
            })
        );
        // A stopping supervisor hands nothing over.
        r.step(Event::Stop("test".into()), t4);
        assert_eq!(r.snapshot(t4).unwrap_err(), "sockhold is stopping");
    }
}

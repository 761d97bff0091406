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
use crate::notify::{ManagerMessage, NotifyMessage};
use crate::signals::{Signal, signal_name};

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
    /// Replaced while it may own steered flows: not signalled until the loop says they are idle
    /// ([`Event::FlowsIdle`]); counts as draining.
    Kept,
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
    /// The unit's key.
    pub unit: u64,
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
    /// With steered listeners: the units new flows were last sent to ([`Action::NewFlowsTo`]).
    new_flows: Option<Vec<u64>>,
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
            new_flows: None,
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

    /// With `--lazy`, until the first connection: no generation was ever started, and the event
    /// loop watches the listeners for [`Event::FirstConnection`]. Derived from the state a
    /// self-upgrade carries over (the policy and the generations' numbering), so it survives one.
    pub fn wants_first_connection(&self) -> bool {
        self.policy.lazy && self.next_generation == 1 && self.mode == Mode::Running
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
        self.steer_new_flows(&mut out);
        out
    }

    /// With steered listeners: tells the loop where new flows go when that changed.
    fn steer_new_flows(&mut self, out: &mut Vec<Action>) {
        if self.policy.flow_steering.is_none() {
            return;
        }
        let units = self.new_flow_units();
        if self.new_flows.as_ref() != Some(&units) {
            // Before anything that reports the change (a reload's answer, READY=1 to the
            // manager): whoever hears "reloaded" and opens a flow must reach the new generation.
            // After every spawn, though: the units must exist for their slots to be named.
            let reported = out
                .iter()
                .position(|a| matches!(a, Action::ReloadDone { .. } | Action::Manager(_)));
            let spawned = out.iter().rposition(|a| matches!(a, Action::Spawn { .. }));
            let at = reported.unwrap_or(out.len()).max(spawned.map_or(0, |i| i + 1));
            out.insert(at, Action::NewFlowsTo { units: units.clone() });
            self.new_flows = Some(units);
        }
    }

    /// The units new flows go to: the newest ready generation's, else the newest started
    /// generation's (its sockets queue them until it reads), else the newest live one's.
    fn new_flow_units(&self) -> Vec<u64> {
        let tiers: [fn(&Unit) -> bool; 3] =
            [Self::is_serving, Self::is_starting, |u| !matches!(u.state, UnitState::Killed)];
        for tier in tiers {
            if let Some(newest) = self.units.iter().filter(|u| tier(u)).map(|u| u.generation).max()
            {
                return self
                    .units
                    .iter()
                    .filter(|u| u.generation == newest && tier(u))
                    .map(|u| u.key)
                    .collect();
            }
        }
        Vec::new()
    }

    /// The units kept for their flows, for the loop to watch again after a self-upgrade:
    /// `(unit, generation, pid)`.
    pub fn kept_units(&self) -> Vec<(u64, u64, Pid)> {
        self.units
            .iter()
            .filter(|u| u.state == UnitState::Kept)
            .filter_map(|u| u.pid.map(|pid| (u.key, u.generation, pid)))
            .collect()
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
            Event::Start if self.wants_first_connection() => {
                info!("--lazy: the first connection or datagram starts generation 1");
                out.push(Action::Manager(ManagerMessage::Ready(
                    "listening; waiting for the first connection".into(),
                )));
            }
            Event::Start => self.start(now, out),
            Event::FirstConnection if self.wants_first_connection() => {
                info!("--lazy: the first connection arrived; starting generation 1");
                self.start(now, out);
            }
            Event::FirstConnection => {}
            Event::Reload => self.reload(now, out),
            // Whether there is a state to hand over is the snapshot's answer, at the end of the
            // turn: a stop that comes later in the same turn fails the upgrade too.
            Event::Upgrade { asker } => out.push(Action::Upgrade { asker }),
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
            Event::FlowsIdle { unit, flows } => {
                let Some(i) = self.index_of(unit) else { return };
                let u = &self.units[i];
                let (UnitState::Kept, Some(pid)) = (&u.state, u.pid) else { return };
                if flows > 0 {
                    info!(
                        "generation {} (pid {pid}): its flows are idle; stopping it",
                        u.generation
                    );
                }
                self.signal_stop(i, self.policy.stop_signal, now, out);
            }
            Event::Timer => {}
        }
    }

    /// Starts generation 1, all its workers.
    fn start(&mut self, now: Instant, out: &mut Vec<Action>) {
        let generation = self.new_generation();
        info!("starting generation {generation}");
        for _ in 0..self.policy.workers {
            self.spawn_unit(generation, Purpose::Initial, now, out);
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
        if self.wants_first_connection() {
            info!(
                "reload asked for before the first connection (--lazy): nothing to reload; the first connection will start generation 1"
            );
            out.push(Action::ReloadDone { generation: None, result: Ok(()) });
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

    /// Whether a notify message that `sender` (of process group `sender_pgid`) sent to unit
    /// `key`'s socket counts under `--notify-access`; if so, the unit's generation. The event
    /// loop asks before it stores the fds of an `FDSTORE=1` message, which this machine never
    /// sees; [`Event::Notify`] is decided by the same rule.
    pub fn notify_allowed(&self, key: u64, sender: Pid, sender_pgid: Option<Pid>) -> Option<u64> {
        let u = &self.units[self.index_of(key)?];
        let pid = u.pid?;
        let allowed = match self.policy.notify_access {
            NotifyAccess::Main => sender == pid,
            NotifyAccess::Group => sender == pid || sender_pgid == Some(pid),
            NotifyAccess::All => true,
        };
        allowed.then_some(u.generation)
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
        let allowed = self.notify_allowed(key, sender, sender_pgid).is_some();
        let u = &mut self.units[i];
        let (generation, Some(pid)) = (u.generation, u.pid) else { return };
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
        for note in message.notes() {
            debug!("generation {generation} (pid {sender}) {note}");
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
                        // A worker kept for its flows is not waited for: the next step goes on.
                        if self.policy.workers > 1 && self.units[j].state != UnitState::Kept {
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

    /// Sends `signal` to unit `i` and arms its SIGKILL deadline. With steered listeners, a
    /// serving unit replaced while sockhold runs is kept for its flows instead: the loop is
    /// asked to watch them ([`Action::WatchFlows`]) and the signal waits for
    /// [`Event::FlowsIdle`].
    fn stop_unit(&mut self, i: usize, signal: Signal, now: Instant, out: &mut Vec<Action>) {
        let u = &self.units[i];
        let Some(pid) = u.pid else { return };
        if matches!(u.state, UnitState::Stopping { .. } | UnitState::Killed) {
            return;
        }
        if self.policy.flow_steering.is_some()
            && self.mode == Mode::Running
            && signal == self.policy.stop_signal
            && matches!(u.state, UnitState::Serving { .. })
            && !u.crashed
        {
            out.push(Action::WatchFlows { unit: u.key, generation: u.generation, pid });
            self.set_state(i, UnitState::Kept, now);
            return;
        }
        self.signal_stop(i, signal, now, out);
    }

    /// Sends `signal` to unit `i` and arms its SIGKILL deadline, now.
    fn signal_stop(&mut self, i: usize, signal: Signal, now: Instant, out: &mut Vec<Action>) {
        let Some(pid) = self.units[i].pid else { return };
        out.push(self.policy.kill_mode.stop(pid, signal));
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
                .filter(|u| {
                    matches!(u.state, UnitState::Stopping { .. } | UnitState::Kept) && !u.crashed
                })
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
                if u.generation != oldest
                    || !matches!(u.state, UnitState::Stopping { .. } | UnitState::Kept)
                {
                    continue;
                }
                let Some(pid) = u.pid else { continue };
                warn!(
                    "generation {oldest} (pid {pid}) is still draining with {max} newer generations \
                     draining too (--max-draining {max}); sending SIGKILL to {}",
                    self.policy.kill_mode.killed()
                );
                self.set_state(i, UnitState::Killed, now);
                out.push(self.policy.kill_mode.kill(pid));
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
                    out.push(self.policy.kill_mode.kill(pid));
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
            UnitState::Kept => {
                info!(
                    "generation {generation} (pid {pid}) exited while kept for its flows: {status}"
                );
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
                    warn!("{reason}; killing {}", self.policy.kill_mode.killed());
                    let failed = u.clone();
                    self.set_state(i, UnitState::Killed, now);
                    out.push(self.policy.kill_mode.kill(pid));
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
                        "generation {generation} (pid {pid}) did not stop within {}; sending SIGKILL to {}",
                        humantime::format_duration(self.policy.stop_timeout),
                        self.policy.kill_mode.killed()
                    );
                    self.set_state(i, UnitState::Killed, now);
                    out.push(self.policy.kill_mode.kill(pid));
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
                unit: u.key,
                pid: u.pid,
                state: match u.state {
                    UnitState::Spawning | UnitState::Starting { .. } => "starting",
                    UnitState::Serving { .. } => "serving",
                    UnitState::Stopping { .. } | UnitState::Kept => "stopping",
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

mod messages;
mod policy;
pub mod snapshot;

pub use messages::{Action, Event};
pub use policy::*;

#[cfg(test)]
pub(crate) mod tests;

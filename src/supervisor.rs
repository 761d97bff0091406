//! The supervisor's decisions, as a pure state machine.
//!
//! [`Supervisor::step`] takes one [`Event`] (a signal, a child that started or exited, a notify
//! message, the passing of time) and returns the [`Action`]s to carry out. It owns every decision
//! of the lifecycle: when to spawn a generation, when a new generation counts as ready, which
//! generation to stop, when to SIGKILL, when to restart and with what backoff, when to give up,
//! and the exit code. It must not make a syscall, read the clock or touch a file: the event loop
//! turns syscalls into events and actions back into syscalls, so every rule here is unit-tested
//! as a table of events and expected actions.

use std::time::{Duration, Instant};

use log::{debug, error, info, warn};
use nix::sys::signal::Signal;
use nix::unistd::Pid;

use crate::exit::{ChildStatus, ExitCode};
use crate::notify::NotifyMessage;

/// First delay before restarting a child that exited by itself.
pub const BACKOFF_START: Duration = Duration::from_millis(100);
/// The backoff doubles up to this delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A child that served this long before it crashed resets the backoff to its start.
pub const STABLE_AFTER: Duration = Duration::from_secs(10);
/// This many starts in a row that never became ready, with nothing serving, end sockhold.
pub const START_LIMIT: u32 = 5;

/// How a new generation proves it is ready.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReadyMode {
    /// sd_notify `READY=1` on the generation's private notify socket.
    Notify,
    /// Alive for this long.
    Delay(Duration),
}

/// Whose notify messages count.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum NotifyAccess {
    /// Only the generation's main process.
    Main,
    /// Any process in the generation's process group.
    Group,
    /// Any process that can reach the socket.
    All,
}

/// What to do when the serving child exits by itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum RestartPolicy {
    /// Restart unless it exited with status 0.
    OnFailure,
    /// Always restart.
    Always,
    /// Never restart: sockhold ends with the child's status.
    Never,
}

/// The part of the configuration the decisions depend on.
#[derive(Clone, Debug)]
pub struct Policy {
    /// How readiness is proven.
    pub ready: ReadyMode,
    /// How long a new generation has to become ready.
    pub ready_timeout: Duration,
    /// The signal that asks a child to stop.
    pub stop_signal: Signal,
    /// How long a stopping child has before its process group is SIGKILLed.
    pub stop_timeout: Duration,
    /// What to do when the serving child exits by itself.
    pub restart: RestartPolicy,
    /// Whose notify messages count.
    pub notify_access: NotifyAccess,
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
    /// A signal to pass on to the serving child.
    Forward(Signal),
    /// A generation's process was started.
    Spawned { generation: u64, pid: Pid },
    /// A generation's process could not be started (command not found, not executable, ...).
    SpawnFailed { generation: u64, error: String, code: ExitCode },
    /// A child process ended and was reaped.
    Exited { pid: Pid, status: ChildStatus },
    /// A datagram arrived on a generation's notify socket.
    Notify {
        generation: u64,
        /// The sender's pid, from `SCM_CREDENTIALS`.
        sender: Pid,
        /// The sender's process group, if it could be read.
        sender_pgid: Option<Pid>,
        message: NotifyMessage,
    },
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
    /// Start the process of a new generation; answer with `Spawned` or `SpawnFailed`.
    Spawn { generation: u64 },
    /// Send a signal to a generation's main process.
    Signal { pid: Pid, signal: Signal },
    /// Send a signal to a generation's whole process group.
    SignalGroup { pgid: Pid, signal: Signal },
    /// A generation is gone: release what the loop holds for it (its notify socket).
    Release { generation: u64 },
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

/// Why a generation was started.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Purpose {
    Initial,
    Reload,
    Restart,
}

/// Where a generation is in its life.
#[derive(Clone, Debug, PartialEq, Eq)]
enum GenState {
    /// Asked for, not yet forked (only between an `Action::Spawn` and its answer).
    Spawning,
    /// Running, not yet ready.
    Starting { ready_deadline: Instant, ready_at: Option<Instant> },
    /// Ready: the generation that serves.
    Serving,
    /// Asked to stop; SIGKILL at the deadline.
    Stopping { kill_at: Instant, signal: Signal },
    /// SIGKILLed; waiting to reap it.
    Killed,
}

/// One generation: a child process started on the held sockets.
#[derive(Clone, Debug)]
struct Generation {
    id: u64,
    pid: Option<Pid>,
    purpose: Purpose,
    state: GenState,
    /// When it entered its current state.
    since: Instant,
    /// The last `STATUS=` it sent.
    status_text: Option<String>,
}

/// What the outside may know of one generation (for `ctl status`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GenerationInfo {
    /// Its number.
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
    /// Stopping every child; exit with `code` when none is left, or with the status of
    /// generation `final_generation` if that one ends uncleanly.
    ShuttingDown {
        code: ExitCode,
        final_generation: Option<u64>,
    },
}

/// The supervisor's whole state.
#[derive(Debug)]
pub struct Supervisor {
    policy: Policy,
    mode: Mode,
    generations: Vec<Generation>,
    next_id: u64,
    /// A reload asked for while another was in progress.
    reload_pending: bool,
    /// When to start a new generation after a crash or failed start.
    restart_at: Option<Instant>,
    backoff: Duration,
    failed_starts: u32,
    /// Generations started to replace one that crashed or failed to start.
    restarts: u64,
}

impl Supervisor {
    /// A supervisor with nothing running yet; feed it [`Event::Start`].
    pub fn new(policy: Policy) -> Self {
        Supervisor {
            policy,
            mode: Mode::Running,
            generations: Vec::new(),
            next_id: 1,
            reload_pending: false,
            restart_at: None,
            backoff: BACKOFF_START,
            failed_starts: 0,
            restarts: 0,
        }
    }

    /// The earliest deadline the event loop must wake up for, if any.
    pub fn next_deadline(&self) -> Option<Instant> {
        let generation_deadlines = self.generations.iter().filter_map(|g| match g.state {
            GenState::Starting { ready_deadline, ready_at, .. } => {
                Some(ready_at.map_or(ready_deadline, |at| at.min(ready_deadline)))
            }
            GenState::Stopping { kill_at, .. } => Some(kill_at),
            _ => None,
        });
        generation_deadlines.chain(self.restart_at).min()
    }

    /// Every live process, by generation: `(generation, pid)`.
    pub fn live_pids(&self) -> Vec<(u64, Pid)> {
        self.generations.iter().filter_map(|g| g.pid.map(|p| (g.id, p))).collect()
    }

    /// Handles one event at time `now` and returns what to do, in order.
    pub fn step(&mut self, event: Event, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        self.handle(event, now, &mut out);
        self.fire_deadlines(now, &mut out);
        self.exit_if_done(&mut out);
        out
    }

    fn serving(&self) -> Option<&Generation> {
        self.generations.iter().find(|g| matches!(g.state, GenState::Serving))
    }

    fn starting(&self) -> Option<&Generation> {
        self.generations
            .iter()
            .find(|g| matches!(g.state, GenState::Spawning | GenState::Starting { .. }))
    }

    fn index_of(&self, id: u64) -> Option<usize> {
        self.generations.iter().position(|g| g.id == id)
    }

    fn handle(&mut self, event: Event, now: Instant, out: &mut Vec<Action>) {
        match event {
            Event::Start => self.start_generation(Purpose::Initial, now, out),
            Event::Reload => self.reload(now, out),
            Event::Stop(why) => self.shut_down(ExitCode::SUCCESS, &why, now, out),
            Event::Forward(signal) => match self.serving() {
                Some(g) => {
                    let pid = g.pid.expect("a serving generation has a pid");
                    info!(
                        "forwarding SIG{} to generation {} (pid {pid})",
                        signal_name(signal),
                        g.id
                    );
                    out.push(Action::Signal { pid, signal });
                }
                None => warn!("no serving child to forward SIG{} to; dropped", signal_name(signal)),
            },
            Event::Spawned { generation, pid } => self.spawned(generation, pid, now, out),
            Event::SpawnFailed { generation, error, code } => {
                let Some(i) = self.index_of(generation) else {
                    return;
                };
                let g = self.generations.remove(i);
                error!("generation {generation} could not be started: {error}");
                if g.purpose == Purpose::Initial {
                    // The command itself is wrong: nothing to retry, say so and exit 126/127.
                    self.shut_down(code, "the command could not be started", now, out);
                } else {
                    self.start_failed(&g, error, None, code, now, out);
                }
            }
            Event::Exited { pid, status } => self.exited(pid, status, now, out),
            Event::Notify { generation, sender, sender_pgid, message } => {
                self.notified(generation, sender, sender_pgid, message, now, out)
            }
            Event::Timer => {}
        }
    }

    fn start_generation(&mut self, purpose: Purpose, now: Instant, out: &mut Vec<Action>) {
        let id = self.next_id;
        self.next_id += 1;
        self.restart_at = None;
        match purpose {
            Purpose::Initial => info!("starting generation {id}"),
            Purpose::Reload => {
                info!("reload: starting generation {id}");
                out.push(Action::ReloadStarted { generation: id });
                out.push(Action::Manager(ManagerMessage::Reloading(format!(
                    "reloading: starting generation {id}"
                ))));
            }
            Purpose::Restart => {
                info!("restarting: starting generation {id}");
                self.restarts += 1;
            }
        }
        self.generations.push(Generation {
            id,
            pid: None,
            purpose,
            state: GenState::Spawning,
            since: now,
            status_text: None,
        });
        out.push(Action::Spawn { generation: id });
    }

    fn reload(&mut self, now: Instant, out: &mut Vec<Action>) {
        if self.mode != Mode::Running {
            info!("reload requested while stopping; ignored");
            out.push(Action::ReloadDone {
                generation: None,
                result: Err("sockhold is stopping".into()),
            });
        } else if let Some(g) = self.starting() {
            if !self.reload_pending {
                info!(
                    "reload requested while generation {} is starting; one more reload will follow",
                    g.id
                );
            }
            self.reload_pending = true;
        } else {
            self.start_generation(Purpose::Reload, now, out);
        }
    }

    fn spawned(&mut self, id: u64, pid: Pid, now: Instant, out: &mut Vec<Action>) {
        let Some(i) = self.index_of(id) else { return };
        let ready_at = match self.policy.ready {
            ReadyMode::Notify => None,
            ReadyMode::Delay(d) => Some(now + d),
        };
        let ready_deadline = now + self.policy.ready_timeout;
        self.generations[i].pid = Some(pid);
        self.set_state(i, GenState::Starting { ready_deadline, ready_at }, now);
        info!("generation {id} started (pid {pid})");
        if let Mode::ShuttingDown { .. } = self.mode {
            // A stop arrived between the decision to spawn and the fork: stop it too.
            self.stop_generation(i, self.policy.stop_signal, now, out);
        }
    }

    fn notified(
        &mut self,
        id: u64,
        sender: Pid,
        sender_pgid: Option<Pid>,
        message: NotifyMessage,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        let Some(i) = self.index_of(id) else { return };
        let g = &mut self.generations[i];
        let Some(pid) = g.pid else { return };
        let allowed = match self.policy.notify_access {
            NotifyAccess::Main => sender == pid,
            NotifyAccess::Group => sender == pid || sender_pgid == Some(pid),
            NotifyAccess::All => true,
        };
        if !allowed {
            warn!(
                "generation {id}: ignoring notify message from pid {sender}, which --notify-access {} does not allow",
                match self.policy.notify_access {
                    NotifyAccess::Main => "main",
                    NotifyAccess::Group => "group",
                    NotifyAccess::All => "all",
                }
            );
            return;
        }
        if let Some(text) = &message.status {
            info!("generation {id} (pid {pid}): status: {text}");
            g.status_text = Some(text.clone());
            if matches!(g.state, GenState::Serving) {
                out.push(Action::Manager(ManagerMessage::Status(format!(
                    "generation {id}: {text}"
                ))));
            }
        }
        if message.ready {
            if !matches!(g.state, GenState::Starting { .. }) {
                debug!("generation {id} (pid {pid}) sent READY=1 again; nothing to do");
            } else if self.policy.ready != ReadyMode::Notify {
                debug!(
                    "generation {id} sent READY=1, but --ready is not notify; waiting for the delay"
                );
            } else if self.mode == Mode::Running {
                self.promote(i, now, out);
            }
        }
    }

    /// Generation `i` is ready: it serves, the one before it stops.
    fn promote(&mut self, i: usize, now: Instant, out: &mut Vec<Action>) {
        let g = &self.generations[i];
        let (id, pid, purpose) = (g.id, g.pid.expect("a starting generation has a pid"), g.purpose);
        self.set_state(i, GenState::Serving, now);
        self.failed_starts = 0;
        let old = self
            .generations
            .iter()
            .position(|g| matches!(g.state, GenState::Serving) && g.id != id);
        match old {
            Some(j) => {
                let old_id = self.generations[j].id;
                info!("generation {id} (pid {pid}) is ready; stopping generation {old_id}");
                self.stop_generation(j, self.policy.stop_signal, now, out);
            }
            None => info!("generation {id} (pid {pid}) is ready"),
        }
        if purpose == Purpose::Reload {
            out.push(Action::ReloadDone { generation: Some(id), result: Ok(()) });
        }
        let status =
            match &self.generations.iter().find(|g| g.id == id).and_then(|g| g.status_text.clone())
            {
                Some(text) => format!("serving: generation {id} (pid {pid}): {text}"),
                None => format!("serving: generation {id} (pid {pid})"),
            };
        out.push(Action::Manager(ManagerMessage::Ready(status)));
        self.follow_pending_reload(now, out);
    }

    fn follow_pending_reload(&mut self, now: Instant, out: &mut Vec<Action>) {
        if self.reload_pending && self.mode == Mode::Running && self.starting().is_none() {
            self.reload_pending = false;
            info!("starting the reload that was requested during the last one");
            self.start_generation(Purpose::Reload, now, out);
        }
    }

    /// Sends the stop signal to generation `i` and arms its SIGKILL deadline.
    fn stop_generation(&mut self, i: usize, signal: Signal, now: Instant, out: &mut Vec<Action>) {
        let g = &self.generations[i];
        let Some(pid) = g.pid else { return };
        match g.state {
            GenState::Stopping { .. } | GenState::Killed => return,
            _ => {}
        }
        out.push(Action::Signal { pid, signal });
        self.set_state(
            i,
            GenState::Stopping { kill_at: now + self.policy.stop_timeout, signal },
            now,
        );
    }

    fn set_state(&mut self, i: usize, state: GenState, now: Instant) {
        let g = &mut self.generations[i];
        g.state = state;
        g.since = now;
    }

    /// Generation `failed` did not become ready. `status` is the child's own exit status if it
    /// exited; `code` is what sockhold exits with if it gives up.
    fn start_failed(
        &mut self,
        failed: &Generation,
        reason: String,
        status: Option<ChildStatus>,
        code: ExitCode,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        let purpose = failed.purpose;
        if purpose == Purpose::Reload {
            let result = Err(reason.clone());
            out.push(Action::ReloadDone { generation: Some(failed.id), result });
        }
        if self.mode != Mode::Running {
            return;
        }
        if let Some(serving) = self.serving() {
            warn!("reload failed: {reason}; generation {} keeps serving", serving.id);
            out.push(Action::Manager(ManagerMessage::Ready(format!(
                "serving: generation {}; last reload failed: {reason}",
                serving.id
            ))));
            self.follow_pending_reload(now, out);
            return;
        }
        if purpose == Purpose::Reload {
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
        if self.reload_pending {
            // Someone asked for a new version since this one started: try it now.
            self.reload_pending = false;
            self.start_generation(Purpose::Reload, now, out);
            return;
        }
        self.schedule_restart(now, out);
    }

    fn schedule_restart(&mut self, now: Instant, out: &mut Vec<Action>) {
        let delay = self.backoff;
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
        self.restart_at = Some(now + delay);
        info!("restarting in {}", humantime::format_duration(delay));
        out.push(Action::Manager(ManagerMessage::Status(format!(
            "no child serving; restarting in {}",
            humantime::format_duration(delay)
        ))));
    }

    fn exited(&mut self, pid: Pid, status: ChildStatus, now: Instant, out: &mut Vec<Action>) {
        let Some(i) = self.generations.iter().position(|g| g.pid == Some(pid)) else {
            debug!("reaped pid {pid}, which is no generation's main process: {status}");
            return;
        };
        let g = self.generations.remove(i);
        out.push(Action::Release { generation: g.id });
        let id = g.id;
        match g.state {
            GenState::Spawning => {}
            GenState::Starting { .. } => {
                let reason =
                    format!("generation {id} (pid {pid}) exited before it was ready: {status}");
                warn!("{reason}");
                self.start_failed(&g, reason, Some(status), status.exit_code(), now, out);
            }
            GenState::Serving => {
                let since = g.since;
                warn!("generation {id} (pid {pid}) exited by itself: {status}");
                if self.mode != Mode::Running {
                } else if let Some(next) = self.starting() {
                    info!("generation {} is starting and will take over", next.id);
                } else if let Some(code) = self.ends_service(status) {
                    self.shut_down(code, "the child exited and is not to be restarted", now, out);
                } else {
                    if now.duration_since(since) >= STABLE_AFTER {
                        self.backoff = BACKOFF_START;
                    }
                    self.schedule_restart(now, out);
                }
            }
            GenState::Stopping { signal, .. } => {
                info!("generation {id} (pid {pid}) stopped: {status}");
                self.record_final_status(id, status, Some(signal));
            }
            GenState::Killed => {
                info!("generation {id} (pid {pid}) was killed: {status}");
                self.record_final_status(id, status, None);
            }
        }
    }

    /// Whether the serving child's own exit ends sockhold under the restart policy, and how.
    fn ends_service(&self, status: ChildStatus) -> Option<ExitCode> {
        match self.policy.restart {
            RestartPolicy::Never => {
                info!("--restart never: sockhold ends with the child's status");
                Some(status.exit_code())
            }
            RestartPolicy::OnFailure if status.success() => {
                info!("the child exited with status 0 and --restart is on-failure: sockhold ends");
                Some(ExitCode::SUCCESS)
            }
            _ => None,
        }
    }

    /// At shutdown, the generation that served decides the exit code: 0 if it exited 0 or died of
    /// the stop signal it was sent, else its own status.
    fn record_final_status(&mut self, id: u64, status: ChildStatus, stop_signal: Option<Signal>) {
        if let Mode::ShuttingDown { final_generation: Some(f), .. } = self.mode
            && f == id
        {
            let clean =
                status.success() || (stop_signal.is_some() && status.signal() == stop_signal);
            let code = if clean { ExitCode::SUCCESS } else { status.exit_code() };
            self.mode = Mode::ShuttingDown { code, final_generation: None };
        }
    }

    /// Stops every child; exits with `code` once all are gone.
    fn shut_down(&mut self, code: ExitCode, why: &str, now: Instant, out: &mut Vec<Action>) {
        if let Mode::ShuttingDown { .. } = self.mode {
            info!("already stopping");
            return;
        }
        let final_generation = self.serving().or(self.starting()).map(|g| g.id);
        self.mode = Mode::ShuttingDown { code, final_generation };
        self.restart_at = None;
        let stopping = || Err("sockhold is stopping".to_string());
        if let Some(g) = self.starting().filter(|g| g.purpose == Purpose::Reload) {
            out.push(Action::ReloadDone { generation: Some(g.id), result: stopping() });
        }
        if self.reload_pending {
            out.push(Action::ReloadDone { generation: None, result: stopping() });
        }
        self.reload_pending = false;
        if self.generations.is_empty() {
            info!("stopping ({why})");
        } else {
            let stop = signal_name(self.policy.stop_signal);
            info!("stopping ({why}): sending SIG{stop} to every child");
        }
        out.push(Action::Manager(ManagerMessage::Stopping("stopping".into())));
        for i in 0..self.generations.len() {
            self.stop_generation(i, self.policy.stop_signal, now, out);
        }
    }

    fn exit_if_done(&mut self, out: &mut Vec<Action>) {
        if let Mode::ShuttingDown { code, .. } = self.mode
            && self.generations.is_empty()
        {
            out.push(Action::Exit(code));
        }
    }

    fn fire_deadlines(&mut self, now: Instant, out: &mut Vec<Action>) {
        for i in 0..self.generations.len() {
            let g = &self.generations[i];
            let (id, Some(pid)) = (g.id, g.pid) else {
                continue;
            };
            match g.state {
                GenState::Starting { ready_at: Some(at), .. }
                    if at <= now && self.mode == Mode::Running =>
                {
                    self.promote(i, now, out);
                }
                GenState::Starting { ready_deadline, .. } if ready_deadline <= now => {
                    let waited = humantime::format_duration(ready_deadline.duration_since(g.since));
                    let reason =
                        format!("generation {id} (pid {pid}) was not ready within {waited}");
                    warn!("{reason}; killing its process group");
                    let failed = g.clone();
                    self.set_state(i, GenState::Killed, now);
                    out.push(Action::SignalGroup { pgid: pid, signal: Signal::SIGKILL });
                    self.start_failed(&failed, reason, None, ExitCode::FAILURE, now, out);
                }
                GenState::Stopping { kill_at, .. } if kill_at <= now => {
                    warn!(
                        "generation {id} (pid {pid}) did not stop within {}; sending SIGKILL to its process group",
                        humantime::format_duration(self.policy.stop_timeout)
                    );
                    self.set_state(i, GenState::Killed, now);
                    out.push(Action::SignalGroup { pgid: pid, signal: Signal::SIGKILL });
                }
                _ => {}
            }
        }
        if let Some(at) = self.restart_at
            && at <= now
            && self.mode == Mode::Running
        {
            self.start_generation(Purpose::Restart, now, out);
        }
    }

    /// Every generation, oldest first, for `ctl status`.
    pub fn generations(&self) -> Vec<GenerationInfo> {
        self.generations
            .iter()
            .map(|g| GenerationInfo {
                id: g.id,
                pid: g.pid,
                state: match g.state {
                    GenState::Spawning | GenState::Starting { .. } => "starting",
                    GenState::Serving => "serving",
                    GenState::Stopping { .. } => "stopping",
                    GenState::Killed => "killed",
                },
                since: g.since,
                status: g.status_text.clone(),
            })
            .collect()
    }

    /// How many generations were started to replace one that crashed or failed to start.
    pub fn restarts(&self) -> u64 {
        self.restarts
    }

    /// The main process of the serving generation, if one serves.
    pub fn serving_pid(&self) -> Option<Pid> {
        self.serving().and_then(|g| g.pid)
    }
}

/// `TERM` for `SIGTERM`: the name without its prefix, as operators write it.
pub fn signal_name(signal: Signal) -> &'static str {
    let name = signal.as_str();
    name.strip_prefix("SIG").unwrap_or(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    use Signal::{SIGKILL, SIGTERM, SIGUSR1};

    fn policy(ready: ReadyMode) -> Policy {
        Policy {
            ready,
            ready_timeout: Duration::from_secs(60),
            stop_signal: SIGTERM,
            stop_timeout: Duration::from_secs(30),
            restart: RestartPolicy::OnFailure,
            notify_access: NotifyAccess::Group,
        }
    }

    fn pid(n: i32) -> Pid {
        Pid::from_raw(n)
    }

    fn ready_from(generation: u64, sender: i32) -> Event {
        Event::Notify {
            generation,
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
        Action::Spawn { generation }
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
            (0, Event::Spawned { generation: 1, pid: pid(100) }, vec![]),
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
                (20, Event::Spawned { generation: 2, pid: pid(200) }, vec![]),
                (30, ready_from(2, 200), vec![sig(100, SIGTERM), done_ok(2)]),
                (
                    40,
                    exited(100, ChildStatus::Signaled(SIGTERM)),
                    vec![Action::Release { generation: 1 }],
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
                (20, Event::Spawned { generation: 2, pid: pid(200) }, vec![]),
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
            sup.step(Event::Spawned { generation: 1, pid: pid(100) }, t0);
            let message = NotifyMessage { ready: true, ..Default::default() };
            let event = Event::Notify {
                generation: 1,
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
                (20, Event::Spawned { generation: 2, pid: pid(200) }, vec![]),
                (21, Event::Reload, vec![]),
                (22, Event::Reload, vec![]),
                (23, Event::Reload, vec![]),
                (
                    30,
                    ready_from(2, 200),
                    vec![sig(100, SIGTERM), done_ok(2), reload_started(3), spawn(3)],
                ),
                (30, Event::Spawned { generation: 3, pid: pid(300) }, vec![]),
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
                (20, Event::Spawned { generation: 2, pid: pid(200) }, vec![]),
                (
                    25,
                    exited(200, ChildStatus::Exited(3)),
                    vec![
                        Action::Release { generation: 2 },
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
                (20, Event::Spawned { generation: 2, pid: pid(200) }, vec![]),
                (60_019, Event::Timer, vec![]),
                (60_020, Event::Timer, vec![group_kill(200), done_err(2, &reason)]),
                (
                    60_030,
                    exited(200, ChildStatus::Signaled(SIGKILL)),
                    vec![Action::Release { generation: 2 }],
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
                (20, Event::Spawned { generation: 2, pid: pid(200) }, vec![]),
                (30, ready_from(2, 200), vec![sig(100, SIGTERM), done_ok(2)]),
                (30_029, Event::Timer, vec![]),
                (30_030, Event::Timer, vec![group_kill(100)]),
                (
                    30_040,
                    exited(100, ChildStatus::Signaled(SIGKILL)),
                    vec![Action::Release { generation: 1 }],
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
                (20, Event::Spawned { generation: 2, pid: pid(200) }, vec![]),
                (
                    25,
                    Event::Stop("received SIGTERM".into()),
                    vec![done_err(2, "sockhold is stopping"), sig(100, SIGTERM), sig(200, SIGTERM)],
                ),
                (26, ready_from(2, 200), vec![]),
                (27, exited(200, ChildStatus::Exited(0)), vec![Action::Release { generation: 2 }]),
                (
                    28,
                    exited(100, ChildStatus::Signaled(SIGTERM)),
                    vec![Action::Release { generation: 1 }, Action::Exit(ExitCode::SUCCESS)],
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
                        vec![Action::Release { generation: 1 }, Action::Exit(ExitCode(want))],
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
                (20, exited(100, ChildStatus::Exited(1)), vec![Action::Release { generation: 1 }]),
                (119, Event::Timer, vec![]),
                (120, Event::Timer, vec![spawn(2)]),
            ],
        );
        // Each start fails before ready; the delay doubles: 200ms, 400ms, 800ms, 1600ms.
        let mut t = 120;
        let mut delay = 200;
        for generation in 2..=5u64 {
            let p = generation as i32 * 100;
            rows.push((t, Event::Spawned { generation, pid: pid(p) }, vec![]));
            rows.push((
                t + 1,
                exited(p, ChildStatus::Exited(1)),
                vec![Action::Release { generation }],
            ));
            t += 1 + delay;
            rows.push((t - 1, Event::Timer, vec![]));
            rows.push((t, Event::Timer, vec![spawn(generation + 1)]));
            delay *= 2;
        }
        rows.push((t, Event::Spawned { generation: 6, pid: pid(600) }, vec![]));
        // The fifth failed start in a row ends sockhold with the child's status.
        rows.push((
            t + 1,
            exited(600, ChildStatus::Exited(4)),
            vec![Action::Release { generation: 6 }, Action::Exit(ExitCode(4))],
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
                        generation: 1,
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
                        generation: 2,
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
                (0, Event::Spawned { generation: 1, pid: pid(100) }, vec![]),
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
                (20, Event::Spawned { generation: 2, pid: pid(200) }, vec![]),
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

    #[test]
    fn deadlines_are_the_nearest_pending_one() {
        let t0 = Instant::now();
        let mut sup = Supervisor::new(policy(ReadyMode::Delay(Duration::from_secs(2))));
        assert_eq!(sup.next_deadline(), None, "nothing running: no wakeup");
        sup.step(Event::Start, t0);
        sup.step(Event::Spawned { generation: 1, pid: pid(100) }, t0);
        assert_eq!(sup.next_deadline(), Some(t0 + Duration::from_secs(2)));
        sup.step(Event::Timer, t0 + Duration::from_secs(2));
        assert_eq!(sup.next_deadline(), None, "serving and idle: no wakeup");
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
        let mut generations = Vec::new();
        for g in &self.generations {
            let state = match &g.state {
                GenState::Spawning => return Err(format!("generation {} is being spawned", g.id)),
                GenState::Starting { ready_deadline, ready_at } => json!({
                    "name": "starting",
                    "ready_deadline_ns": ns(*ready_deadline),
                    "ready_at_ns": ready_at.map(ns),
                }),
                GenState::Serving => json!({ "name": "serving" }),
                GenState::Stopping { kill_at, signal } => json!({
                    "name": "stopping",
                    "kill_at_ns": ns(*kill_at),
                    "signal": *signal as i32,
                }),
                GenState::Killed => json!({ "name": "killed" }),
            };
            generations.push(json!({
                "id": g.id,
                "pid": g.pid.map(Pid::as_raw),
                "purpose": match g.purpose {
                    Purpose::Initial => "initial",
                    Purpose::Reload => "reload",
                    Purpose::Restart => "restart",
                },
                "state": state,
                "since_ns": ns(g.since),
                "status": g.status_text,
            }));
        }
        Ok(json!({
            "generations": generations,
            "next_id": self.next_id,
            "reload_pending": self.reload_pending,
            "restart_at_ns": self.restart_at.map(ns),
            "backoff_ns": self.backoff.as_nanos() as u64,
            "failed_starts": self.failed_starts,
            "restarts": self.restarts,
        }))
    }

    /// A supervisor that goes on from `state`, a [`Supervisor::snapshot`] taken `elapsed` ago.
    pub fn restore(
        policy: Policy,
        state: &serde_json::Value,
        now: Instant,
        elapsed: Duration,
    ) -> Result<Supervisor, String> {
        let bad = |what: &str| format!("the supervisor state has no valid {what}");
        let at = |v: &serde_json::Value, what: &str| {
            v.as_i64().map(|ns| instant_at(ns, now, elapsed)).ok_or_else(|| bad(what))
        };
        let u64_of = |v: &serde_json::Value, what: &str| v.as_u64().ok_or_else(|| bad(what));
        let mut generations = Vec::new();
        for g in state["generations"].as_array().ok_or_else(|| bad("generations"))? {
            let s = &g["state"];
            let gen_state = match s["name"].as_str() {
                Some("starting") => GenState::Starting {
                    ready_deadline: at(&s["ready_deadline_ns"], "ready deadline")?,
                    ready_at: match &s["ready_at_ns"] {
                        serde_json::Value::Null => None,
                        v => Some(at(v, "ready time")?),
                    },
                },
                Some("serving") => GenState::Serving,
                Some("stopping") => GenState::Stopping {
                    kill_at: at(&s["kill_at_ns"], "kill deadline")?,
                    signal: s["signal"]
                        .as_i64()
                        .and_then(|n| Signal::try_from(n as i32).ok())
                        .ok_or_else(|| bad("stop signal"))?,
                },
                Some("killed") => GenState::Killed,
                _ => return Err(bad("generation state")),
            };
            let pid =
                g["pid"].as_i64().and_then(|p| i32::try_from(p).ok()).ok_or_else(|| bad("pid"))?;
            generations.push(Generation {
                id: u64_of(&g["id"], "generation id")?,
                pid: Some(Pid::from_raw(pid)),
                purpose: match g["purpose"].as_str() {
                    Some("initial") => Purpose::Initial,
                    Some("reload") => Purpose::Reload,
                    Some("restart") => Purpose::Restart,
                    _ => return Err(bad("purpose")),
                },
                state: gen_state,
                since: at(&g["since_ns"], "since")?,
                status_text: g["status"].as_str().map(str::to_string),
            });
        }
        Ok(Supervisor {
            policy,
            mode: Mode::Running,
            generations,
            next_id: u64_of(&state["next_id"], "next id")?,
            reload_pending: state["reload_pending"]
                .as_bool()
                .ok_or_else(|| bad("reload_pending"))?,
            restart_at: match &state["restart_at_ns"] {
                serde_json::Value::Null => None,
                v => Some(at(v, "restart time")?),
            },
            backoff: Duration::from_nanos(u64_of(&state["backoff_ns"], "backoff")?),
            failed_starts: u64_of(&state["failed_starts"], "failed starts")? as u32,
            restarts: u64_of(&state["restarts"], "restarts")?,
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

    use Signal::SIGTERM;

    #[test]
    fn snapshot_and_restore_keep_every_generation_and_deadline() {
        let policy = Policy {
            ready: ReadyMode::Notify,
            ready_timeout: Duration::from_secs(60),
            stop_signal: SIGTERM,
            stop_timeout: Duration::from_secs(30),
            restart: RestartPolicy::OnFailure,
            notify_access: NotifyAccess::Group,
        };
        let t0 = Instant::now();
        let mut s = Supervisor::new(policy.clone());
        s.step(Event::Start, t0);
        s.step(Event::Spawned { generation: 1, pid: Pid::from_raw(101) }, t0);
        let ready = NotifyMessage { ready: true, status: Some("up".into()), ..Default::default() };
        let notify = |generation, pid| Event::Notify {
            generation,
            sender: Pid::from_raw(pid),
            sender_pgid: None,
            message: ready.clone(),
        };
        s.step(notify(1, 101), t0);
        let t1 = t0 + Duration::from_secs(1);
        s.step(Event::Reload, t1);
        s.step(Event::Spawned { generation: 2, pid: Pid::from_raw(102) }, t1);
        s.step(notify(2, 102), t1);
        // Generation 1 is stopping (SIGKILL due at t1+30s); a third generation is starting.
        let t2 = t1 + Duration::from_secs(2);
        s.step(Event::Reload, t2);
        s.step(Event::Spawned { generation: 3, pid: Pid::from_raw(103) }, t2);
        s.step(Event::Reload, t2);
        let t3 = t2 + Duration::from_secs(1);
        let state = s.snapshot(t3).expect("snapshot");
        // Restored 100ms later, by a clock that went on.
        let t4 = t3 + Duration::from_millis(100);
        let r =
            Supervisor::restore(policy, &state, t4, Duration::from_millis(100)).expect("restore");
        assert_eq!(r.generations(), s.generations());
        assert_eq!(r.next_deadline(), s.next_deadline());
        assert_eq!(r.next_id, 4);
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

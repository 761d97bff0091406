//! The supervisor's policy: what the command line says about readiness, stopping, restarting,
//! workers and steering, and the fixed limits of backoff and draining. Plain data: the machine
//! reads it and never changes it.

use std::time::Duration;

use nix::unistd::Pid;

use super::Action;
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

/// What a stop signals, and what goes with a child's main process (systemd's `KillMode=`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum KillMode {
    /// The stop signal to the child's whole process group; SIGKILL to the group at the stop
    /// timeout, and to what is left of it once the main process has ended.
    ControlGroup,
    /// The stop signal to the main process; SIGKILL to the process group at the stop timeout,
    /// and to what is left of it once the main process has ended.
    Mixed,
    /// Only the main process is ever signalled: what it forked (an sshd's sessions, say) runs
    /// on after it ends, re-parented (to sockhold with `--subreaper` or as PID 1).
    Process,
}

impl KillMode {
    /// The action that sends the stop signal `signal` to a child whose main process is `pid`.
    pub fn stop(self, pid: Pid, signal: Signal) -> Action {
        match self {
            KillMode::ControlGroup => Action::SignalGroup { pgid: pid, signal },
            KillMode::Mixed | KillMode::Process => Action::Signal { pid, signal },
        }
    }

    /// The action that SIGKILLs a child whose main process is `pid`.
    pub fn kill(self, pid: Pid) -> Action {
        match self {
            KillMode::ControlGroup | KillMode::Mixed => {
                Action::SignalGroup { pgid: pid, signal: Signal::SIGKILL }
            }
            KillMode::Process => Action::Signal { pid, signal: Signal::SIGKILL },
        }
    }

    /// What [`KillMode::kill`] hits, for the log.
    pub fn killed(self) -> &'static str {
        match self {
            KillMode::ControlGroup | KillMode::Mixed => "its process group",
            KillMode::Process => "its main process (--kill-mode process)",
        }
    }

    /// Whether what is left of a child's process group is SIGKILLed when its main process ends.
    pub fn group_ends_with_main(self) -> bool {
        self != KillMode::Process
    }
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
    /// How long a stopping child has before it is SIGKILLed.
    pub stop_timeout: Duration,
    /// Whom the stop signal and SIGKILL reach: the main process or its process group.
    pub kill_mode: KillMode,
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
    /// `--lazy`: generation 1 starts on the first connection, not at [`Event::Start`].
    pub lazy: bool,
    /// With a `steer=flow` listener: `--flow-idle`, how long a replaced unit's flows must be
    /// quiet before it gets its stop signal. `None`: no listener is steered.
    pub flow_steering: Option<Duration>,
}

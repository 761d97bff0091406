//! What goes into the machine ([`Event`]: what the event loop saw) and what comes out of it
//! ([`Action`]: what the event loop is to do). Plain data, matched on by both sides.

use nix::unistd::Pid;

use crate::exit::{ChildStatus, ExitCode};
use crate::notify::{ManagerMessage, NotifyMessage};
use crate::signals::Signal;

/// Something that happened, as the event loop saw it.
#[derive(Clone, Debug)]
pub enum Event {
    /// sockhold has bound its sockets and starts supervising.
    Start,
    /// With `--lazy`: a connection or datagram arrived on a listener while
    /// [`Supervisor::wants_first_connection`].
    FirstConnection,
    /// A reload was asked for (SIGHUP).
    Reload,
    /// A self-upgrade was asked for: by a control client (its id), or by SIGUSR2 (`None`).
    Upgrade { asker: Option<u64> },
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
    /// A unit kept for its steered flows ([`Action::WatchFlows`]) owns none now (`flows` is 0),
    /// or none of its `flows` has had a datagram for `--flow-idle`.
    FlowsIdle { unit: u64, flows: usize },
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
    /// started, which will now never start. `Ok` with no generation: there was nothing to
    /// replace (`--lazy` before the first connection), and the first connection starts the
    /// command as it is then, which is what the reload asks for.
    ReloadDone { generation: Option<u64>, result: Result<(), String> },
    /// Upgrade sockhold in place at the end of the loop's turn, when every event already read
    /// has been handled; `asker` is answered by the new program, or here if it fails. Every
    /// request of a turn ends in the same one upgrade.
    Upgrade { asker: Option<u64> },
    /// Exit sockhold with this code.
    Exit(ExitCode),
    /// With steered listeners: new flows go to these units (by flow hash), from now on. Sent
    /// whenever the set changes: the newest ready generation's units, else the newest started
    /// generation's, else the newest that lives.
    NewFlowsTo { units: Vec<u64> },
    /// With steered listeners: a replaced unit is kept until its flows are idle; answer with
    /// [`Event::FlowsIdle`] once it owns none or they have been quiet for `--flow-idle`.
    WatchFlows { unit: u64, generation: u64, pid: Pid },
}

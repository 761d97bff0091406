//! Per-connection mode (`--accept`, systemd's `Accept=yes`, inetd's `nowait`), as a pure state
//! machine beside [`crate::supervisor`].
//!
//! sockhold accepts each connection itself and runs one child per connection. This module
//! decides how many may run at once (the event loop stops accepting at `--max-connections`, so
//! further connections wait in the backlog), which generation a new child belongs to (a reload
//! changes what new connections run; running ones finish), and how a stop ends every child
//! (`--stop-signal`, SIGKILL of its process group after `--stop-timeout`). It takes the same
//! [`Event`]s and returns the same [`Action`]s as the supervisor; it makes no syscall.

use std::collections::BTreeMap;
use std::time::Instant;

use log::{info, warn};
use nix::unistd::Pid;

use crate::exit::ExitCode;
use crate::notify::ManagerMessage;
use crate::signals::signal_name;
use crate::supervisor::{Action, Event, GenerationInfo, Policy};

#[derive(Clone, Debug)]
struct Child {
    generation: u64,
    since: Instant,
    /// Set once it was asked to stop: when it gets SIGKILL.
    kill_at: Option<Instant>,
    killed: bool,
}

/// The per-connection supervisor's state.
#[derive(Debug)]
pub struct AcceptSupervisor {
    policy: Policy,
    max_connections: Option<usize>,
    generation: u64,
    children: BTreeMap<Pid, Child>,
    stopping: bool,
}

impl AcceptSupervisor {
    /// A supervisor with no connection yet.
    pub fn new(policy: Policy, max_connections: Option<usize>) -> Self {
        AcceptSupervisor {
            policy,
            max_connections,
            generation: 1,
            children: BTreeMap::new(),
            stopping: false,
        }
    }

    /// Whether the event loop should accept another connection now.
    pub fn accepting(&self) -> bool {
        !self.stopping && self.max_connections.is_none_or(|max| self.children.len() < max)
    }

    /// The generation a connection accepted now runs as.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The earliest SIGKILL deadline.
    pub fn next_deadline(&self) -> Option<Instant> {
        // Only a stop arms deadlines: while serving, nothing to scan on every loop turn.
        if !self.stopping {
            return None;
        }
        self.children.values().filter(|c| !c.killed).filter_map(|c| c.kill_at).min()
    }

    /// Every running child, as `(generation, pid)`.
    pub fn live_pids(&self) -> Vec<(u64, Pid)> {
        self.children.iter().map(|(&pid, c)| (c.generation, pid)).collect()
    }

    /// Every running child, for `ctl status`.
    pub fn generations(&self) -> Vec<GenerationInfo> {
        self.children
            .iter()
            .map(|(&pid, c)| GenerationInfo {
                id: c.generation,
                unit: c.generation,
                pid: Some(pid),
                state: match (c.killed, c.kill_at) {
                    (true, _) => "killed",
                    (false, Some(_)) => "stopping",
                    (false, None) => "serving",
                },
                since: c.since,
                status: None,
            })
            .collect()
    }

    /// Handles one event at `now`.
    pub fn step(&mut self, event: Event, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        match event {
            Event::Start => {
                info!("--accept: one child per connection");
                out.push(Action::Manager(ManagerMessage::Ready(format!(
                    "accepting connections for generation {}",
                    self.generation
                ))));
            }
            // --lazy does not go with --accept, which watches the listeners all the time.
            Event::FirstConnection
            | Event::Notify { .. }
            | Event::ProbeDone { .. }
            | Event::FlowsIdle { .. }
            | Event::Timer => {}
            // Refused at the end of the turn: the handover cannot carry connections' children.
            Event::Upgrade { asker } => out.push(Action::Upgrade { asker }),
            Event::Spawned { unit: generation, pid } => {
                info!("connection child started (pid {pid}, generation {generation})");
                let child = Child { generation, since: now, kill_at: None, killed: false };
                self.children.insert(pid, child);
                if self.stopping {
                    self.stop(pid, now, &mut out);
                }
            }
            Event::SpawnFailed { error, .. } => {
                warn!("a connection could not be served: {error}; it is closed");
            }
            Event::Exited { pid, status } => {
                if let Some(child) = self.children.remove(&pid) {
                    info!(
                        "connection child (pid {pid}, generation {}) ended: {status}",
                        child.generation
                    );
                }
            }
            Event::Reload => {
                if self.stopping {
                    let result = Err("sockhold is stopping".to_string());
                    out.push(Action::ReloadDone { generation: None, result });
                } else {
                    self.generation += 1;
                    let generation = self.generation;
                    info!(
                        "reload: new connections run generation {generation}; running ones finish"
                    );
                    out.push(Action::ReloadStarted { generation });
                    out.push(Action::Manager(ManagerMessage::Reloading(format!(
                        "reloading: generation {generation}"
                    ))));
                    out.push(Action::ReloadDone { generation: Some(generation), result: Ok(()) });
                    out.push(Action::Manager(ManagerMessage::Ready(format!(
                        "accepting connections for generation {generation}"
                    ))));
                }
            }
            Event::Stop(why) => {
                if !self.stopping {
                    self.stopping = true;
                    let stop = signal_name(self.policy.stop_signal);
                    info!(
                        "stopping ({why}): no more connections; SIG{stop} to {} child(ren)",
                        self.children.len()
                    );
                    out.push(Action::Manager(ManagerMessage::Stopping("stopping".into())));
                    let pids: Vec<Pid> = self.children.keys().copied().collect();
                    for pid in pids {
                        self.stop(pid, now, &mut out);
                    }
                }
            }
            Event::Forward(signal) => {
                if self.children.is_empty() {
                    warn!("no connection child to forward SIG{} to; dropped", signal_name(signal));
                }
                for &pid in self.children.keys() {
                    out.push(Action::Signal { pid, signal });
                }
            }
        }
        // Only a stop arms SIGKILL deadlines.
        if self.stopping {
            for (&pid, child) in &mut self.children {
                if !child.killed && child.kill_at.is_some_and(|at| at <= now) {
                    warn!(
                        "connection child (pid {pid}) did not stop in time; sending SIGKILL to {}",
                        self.policy.kill_mode.killed()
                    );
                    child.killed = true;
                    out.push(self.policy.kill_mode.kill(pid));
                }
            }
        }
        if self.stopping && self.children.is_empty() {
            out.push(Action::Exit(ExitCode::SUCCESS));
        }
        out
    }

    fn stop(&mut self, pid: Pid, now: Instant, out: &mut Vec<Action>) {
        if let Some(child) = self.children.get_mut(&pid)
            && child.kill_at.is_none()
        {
            child.kill_at = Some(now + self.policy.stop_timeout);
            out.push(self.policy.kill_mode.stop(pid, self.policy.stop_signal));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::exit::ChildStatus;
    use crate::signals::Signal;
    use crate::supervisor::ReadyMode;

    fn policy() -> Policy {
        Policy {
            stop_timeout: Duration::from_secs(5),
            ..crate::supervisor::tests::policy(ReadyMode::Notify)
        }
    }

    #[test]
    fn max_connections_reload_and_stop() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let pid = Pid::from_raw;
        let mut a = AcceptSupervisor::new(policy(), Some(2));
        assert!(a.accepting());
        a.step(Event::Spawned { unit: 1, pid: pid(10) }, at(0));
        a.step(Event::Spawned { unit: 1, pid: pid(11) }, at(0));
        assert!(!a.accepting(), "at --max-connections: the rest wait in the backlog");
        a.step(Event::Exited { pid: pid(10), status: ChildStatus::Exited(0) }, at(1));
        assert!(a.accepting());

        let reload = a.step(Event::Reload, at(2));
        assert!(reload.contains(&Action::ReloadDone { generation: Some(2), result: Ok(()) }));
        assert_eq!(a.generation(), 2, "new connections run the new generation");
        assert_eq!(a.live_pids(), vec![(1, pid(11))], "the running one finishes as it is");

        let stop = a.step(Event::Stop("test".into()), at(3));
        assert!(stop.contains(&Action::Signal { pid: pid(11), signal: Signal::SIGTERM }));
        assert!(!a.accepting());
        assert_eq!(a.next_deadline(), Some(at(5003)));
        let kill = a.step(Event::Timer, at(5003));
        assert_eq!(kill, vec![Action::SignalGroup { pgid: pid(11), signal: Signal::SIGKILL }]);
        let done = a.step(
            Event::Exited { pid: pid(11), status: ChildStatus::Signaled(Signal::SIGKILL) },
            at(5004),
        );
        assert_eq!(done, vec![Action::Exit(ExitCode::SUCCESS)]);
    }
}

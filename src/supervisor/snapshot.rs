//! Self-upgrade's half of the state machine: the supervisor's whole state as a typed
//! [`Snapshot`] ([`Supervisor::snapshot`]) and a supervisor that goes on from it
//! ([`Supervisor::restore`]).
//!
//! This module owns the handover format of the units, the reload in progress and the restart
//! bookkeeping (the `supervisor` part of [`crate::upgrade::State`]), and the conversion of every
//! deadline to signed nanoseconds from the snapshot and back. Every field is required and no
//! other is accepted: a snapshot this program does not understand is refused, never read with a
//! default. Like the rest of the machine it must not make a syscall, read the clock or touch a
//! file: the caller gives it the time and carries the snapshot across execve.

use std::time::{Duration, Instant};

use crate::signals::Signal;
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use super::{Mode, Policy, Purpose, Reload, Supervisor, Unit, UnitState};

/// The supervisor's state as the next program reads it. Every instant is signed nanoseconds
/// from the moment of the snapshot (negative: in the past).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Snapshot {
    /// Every unit, in the supervisor's order.
    pub units: Vec<UnitSnapshot>,
    /// The key the next unit gets.
    pub next_unit: u64,
    /// The generation the next reload starts.
    pub next_generation: u64,
    /// The reload in progress.
    #[serde(deserialize_with = "Option::deserialize")]
    pub reload: Option<ReloadSnapshot>,
    /// A reload asked for during the one in progress.
    pub reload_pending: bool,
    /// When the next restart is due.
    #[serde(deserialize_with = "Option::deserialize")]
    pub restart_at_ns: Option<i64>,
    /// The restart backoff now.
    pub backoff_ns: u64,
    /// Starts that failed in a row.
    pub failed_starts: u32,
    /// Restarts so far.
    pub restarts: u64,
    /// Workers retired so far.
    pub retired: u64,
}

/// One unit (a generation's worker) in a [`Snapshot`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnitSnapshot {
    /// The unit's key.
    pub key: u64,
    /// Its generation.
    pub generation: u64,
    /// Its main pid (also its process group).
    pub pid: i32,
    /// Why it was started.
    pub purpose: PurposeSnapshot,
    /// Where it is in its life.
    pub state: UnitStateSnapshot,
    /// Since when it is in that state.
    pub since_ns: i64,
    /// Its last `STATUS=`.
    #[serde(deserialize_with = "Option::deserialize")]
    pub status: Option<String>,
    /// Its `WATCHDOG_USEC=` interval.
    #[serde(deserialize_with = "Option::deserialize")]
    pub watchdog_ns: Option<u64>,
    /// Whether it crashed.
    pub crashed: bool,
}

/// Why a unit was started.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PurposeSnapshot {
    /// The first generation.
    Initial,
    /// A reload.
    Reload,
    /// A restart after a crash.
    Restart,
}

/// Where a unit is in its life (a unit being spawned is never handed over).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "name", rename_all = "lowercase", deny_unknown_fields)]
pub enum UnitStateSnapshot {
    /// Running, not yet ready.
    Starting {
        /// When it must be ready.
        ready_deadline_ns: i64,
        /// With `delay:`: when it counts as ready.
        #[serde(deserialize_with = "Option::deserialize")]
        ready_at_ns: Option<i64>,
        /// With a probe: when to send the next one.
        #[serde(deserialize_with = "Option::deserialize")]
        probe_at_ns: Option<i64>,
        /// Why the last probe failed.
        #[serde(deserialize_with = "Option::deserialize")]
        last_probe: Option<String>,
    },
    /// Ready.
    Serving {
        /// When the next watchdog ping is due.
        #[serde(deserialize_with = "Option::deserialize")]
        watchdog_at_ns: Option<i64>,
    },
    /// Asked to stop.
    Stopping {
        /// When it gets SIGKILL.
        kill_at_ns: i64,
        /// The signal it was sent.
        signal: i32,
    },
    /// Replaced, kept for its steered flows until they are idle; not yet signalled.
    Kept {},
    /// Sent SIGKILL. (A struct variant: serde lets a unit variant of a tagged enum through with
    /// any other field beside its tag.)
    Killed {},
}

/// The reload in progress in a [`Snapshot`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReloadSnapshot {
    /// The generation it starts.
    pub generation: u64,
    /// Rolling: the old unit the last step stopped.
    #[serde(deserialize_with = "Option::deserialize")]
    pub waiting_for: Option<u64>,
}

/// Self-upgrade: the supervisor's whole state as a [`Snapshot`], and back. An `Instant` means
/// nothing outside the process, so every one is written relative to the snapshot; the monotonic
/// clock itself survives execve, so the deadlines that run keep running.
impl Supervisor {
    /// The state to hand over, or why there is nothing safe to hand over now.
    pub fn snapshot(&self, now: Instant) -> Result<Snapshot, String> {
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
                UnitState::Starting { ready_deadline, ready_at, probe_at, last_probe } => {
                    UnitStateSnapshot::Starting {
                        ready_deadline_ns: ns(*ready_deadline),
                        ready_at_ns: ready_at.map(ns),
                        // A probe in flight is not handed over: the new program probes again now.
                        probe_at_ns: match probe_at {
                            Some(t) => Some(ns(*t)),
                            None if self.policy.ready.probes() => Some(0),
                            None => None,
                        },
                        last_probe: last_probe.clone(),
                    }
                }
                UnitState::Serving { watchdog_at } => {
                    UnitStateSnapshot::Serving { watchdog_at_ns: watchdog_at.map(ns) }
                }
                UnitState::Stopping { kill_at, signal } => {
                    UnitStateSnapshot::Stopping { kill_at_ns: ns(*kill_at), signal: signal.raw() }
                }
                UnitState::Killed => UnitStateSnapshot::Killed {},
                UnitState::Kept => UnitStateSnapshot::Kept {},
            };
            let Some(pid) = u.pid else {
                return Err(format!("generation {} has no process", u.generation));
            };
            units.push(UnitSnapshot {
                key: u.key,
                generation: u.generation,
                pid: pid.as_raw(),
                purpose: match u.purpose {
                    Purpose::Initial => PurposeSnapshot::Initial,
                    Purpose::Reload => PurposeSnapshot::Reload,
                    Purpose::Restart => PurposeSnapshot::Restart,
                },
                state,
                since_ns: ns(u.since),
                status: u.status_text.clone(),
                watchdog_ns: u.watchdog.map(|d| d.as_nanos() as u64),
                crashed: u.crashed,
            });
        }
        Ok(Snapshot {
            units,
            next_unit: self.next_unit,
            next_generation: self.next_generation,
            reload: self
                .reload
                .map(|r| ReloadSnapshot { generation: r.generation, waiting_for: r.waiting_for }),
            reload_pending: self.reload_pending,
            restart_at_ns: self.restart_at.map(ns),
            backoff_ns: self.backoff.as_nanos() as u64,
            failed_starts: self.failed_starts,
            restarts: self.restarts,
            retired: self.retired as u64,
        })
    }

    /// A supervisor that goes on from `state`, a [`Supervisor::snapshot`] taken `elapsed` ago.
    /// Refuses a snapshot whose values cannot stand (a pid or a signal that is none).
    pub fn restore(
        policy: Policy,
        state: &Snapshot,
        now: Instant,
        elapsed: Duration,
    ) -> Result<Supervisor, String> {
        let at = |ns: i64| instant_at(ns, now, elapsed);
        let mut units = Vec::new();
        for u in &state.units {
            let unit_state = match &u.state {
                UnitStateSnapshot::Starting {
                    ready_deadline_ns,
                    ready_at_ns,
                    probe_at_ns,
                    last_probe,
                } => UnitState::Starting {
                    ready_deadline: at(*ready_deadline_ns),
                    ready_at: ready_at_ns.map(at),
                    probe_at: probe_at_ns.map(at),
                    last_probe: last_probe.clone(),
                },
                UnitStateSnapshot::Serving { watchdog_at_ns } => {
                    UnitState::Serving { watchdog_at: watchdog_at_ns.map(at) }
                }
                UnitStateSnapshot::Stopping { kill_at_ns, signal } => UnitState::Stopping {
                    kill_at: at(*kill_at_ns),
                    signal: Signal::try_from(*signal).map_err(|_| {
                        format!(
                            "generation {} has stop signal {signal}, which is none",
                            u.generation
                        )
                    })?,
                },
                UnitStateSnapshot::Killed {} => UnitState::Killed,
                UnitStateSnapshot::Kept {} => UnitState::Kept,
            };
            if u.pid <= 1 {
                return Err(format!(
                    "generation {} has pid {}, which is none",
                    u.generation, u.pid
                ));
            }
            units.push(Unit {
                key: u.key,
                generation: u.generation,
                pid: Some(Pid::from_raw(u.pid)),
                purpose: match u.purpose {
                    PurposeSnapshot::Initial => Purpose::Initial,
                    PurposeSnapshot::Reload => Purpose::Reload,
                    PurposeSnapshot::Restart => Purpose::Restart,
                },
                state: unit_state,
                since: at(u.since_ns),
                status_text: u.status.clone(),
                watchdog: u.watchdog_ns.map(Duration::from_nanos),
                crashed: u.crashed,
            });
        }
        Ok(Supervisor {
            policy,
            mode: Mode::Running,
            units,
            next_unit: state.next_unit,
            next_generation: state.next_generation,
            reload: state
                .reload
                .map(|r| Reload { generation: r.generation, waiting_for: r.waiting_for }),
            reload_pending: state.reload_pending,
            restart_at: state.restart_at_ns.map(at),
            backoff: Duration::from_nanos(state.backoff_ns),
            failed_starts: state.failed_starts,
            restarts: state.restarts,
            retired: usize::try_from(state.retired)
                .map_err(|_| format!("{} retired workers cannot be counted", state.retired))?,
            new_flows: None,
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
mod tests {
    use crate::supervisor::*;

    #[test]
    fn snapshot_and_restore_keep_every_generation_and_deadline() {
        let policy = Policy {
            watchdog: Some(Duration::from_secs(20)),
            ..crate::supervisor::tests::policy(ReadyMode::Notify)
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
        let pids: Vec<Pid> = state.units.iter().map(|u| Pid::from_raw(u.pid)).collect();
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

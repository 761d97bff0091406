//! Self-upgrade's half of the state machine: the supervisor's whole state as JSON
//! ([`Supervisor::snapshot`]) and a supervisor that goes on from it ([`Supervisor::restore`]).
//!
//! This module owns the handover format of the units, the reload in progress and the restart
//! bookkeeping, and the conversion of every deadline to nanoseconds from the snapshot and back.
//! Like the rest of the machine it must not make a syscall, read the clock or touch a file: the
//! caller gives it the time and carries the JSON across execve.

use std::time::{Duration, Instant};

use crate::signals::Signal;
use nix::unistd::Pid;

use super::{Mode, Policy, Purpose, Reload, Supervisor, Unit, UnitState};

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
mod tests {
    use crate::supervisor::*;

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
            lazy: false,
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

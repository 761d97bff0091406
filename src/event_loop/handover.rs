//! Self-upgrade, the event loop's side: what the state holds (listeners, notify sockets per
//! generation, the control socket and the clients waiting for an answer, the runtime paths, the
//! history `ctl status` shows, and the supervisor's snapshot), writing it before the exec, and
//! taking it over in the new program (or only reading it all, in a dry run). After a takeover
//! it answers the askers after the loop's first turn and ends probation once the loop acts on a
//! child.
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
use serde_json::{Value, json};

use super::{Brain, EventLoop, Held, UnitIo};
use crate::cli::Config;
use crate::control::{ClientId, ControlServer, error_answer};
use crate::listen::Listener;
use crate::notify::{Manager, NotifySocket};
use crate::paths::PidFile;
use crate::protocol::{self, Answer, LastUpgrade, Upgraded};
use crate::signals::Signals;
use crate::supervisor::Supervisor;
use crate::upgrade::{self, Incoming, OnProbation};

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

/// `CLOCK_MONOTONIC` in nanoseconds: the same clock on both sides of an execve.
fn monotonic_ns() -> i128 {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC) {
        Ok(t) => i128::from(t.tv_sec()) * 1_000_000_000 + i128::from(t.tv_nsec()),
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
    /// asked for the upgrade. On probation, ends it once the loop acted on a child (`acted`: the
    /// state a crash would hand back no longer describes the children) or its time is up.
    pub(super) fn after_turn(&mut self, acted: bool) {
        // `-later`: on the turn after the askers have their answer.
        if let Some(how) = self.upgrade.crash_test.take() {
            match how.strip_suffix("-later") {
                Some(_) if self.upgrade.answer.is_some() => self.upgrade.crash_test = Some(how),
                Some(now) => crash_for_a_test(now),
                None => crash_for_a_test(&how),
            }
        }
        self.answer_upgrade_askers();
        match &self.upgrade.probation {
            Some(_) if acted => self.end_probation("the new program acted on a child"),
            Some((probation, since)) if probation.expired(*since) => {
                self.end_probation("its time is up")
            }
            _ => {}
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

    fn end_probation(&mut self, why: &str) {
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
            let _ = crate::spawn::kill(nix::unistd::getpid(), signal);
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
        let listeners: Vec<Value> = self
            .held
            .listeners
            .iter()
            .map(|l| {
                fds.push(l.fd().as_raw_fd());
                l.handover()
            })
            .collect();
        let notify: Vec<Value> = self
            .units
            .iter()
            .map(|(unit, io)| {
                let socket = &io.notify;
                fds.push(socket.fd().as_raw_fd());
                json!({ "unit": unit, "fd": socket.fd().as_raw_fd(), "path": socket.path() })
            })
            .collect();
        // The health listeners stay with their children; only their addresses move on. A probe
        // in flight does not: the supervisor's state asks for a new one at once.
        let health: Vec<Value> = self
            .units
            .iter()
            .filter_map(|(unit, io)| io.health.map(|addr| (unit, addr)))
            .map(|(unit, addr)| json!({ "unit": unit, "addr": addr.to_string() }))
            .collect();
        let control = self.control.as_ref().map(|c| {
            fds.push(c.handover()["fd"].as_i64().unwrap_or(-1) as RawFd);
            c.handover()
        });
        // Each waiting client once, with every answer it waits for.
        let mut clients: BTreeMap<RawFd, Value> = BTreeMap::new();
        let client_fd = |id: ClientId| self.control.as_ref().and_then(|c| c.client_fd(id));
        for id in asked.iter().flatten() {
            if let Some(fd) = client_fd(*id) {
                let entry = clients
                    .entry(fd)
                    .or_insert_with(|| json!({ "fd": fd, "upgrade": 0, "reloads": [] }));
                entry["upgrade"] = json!(entry["upgrade"].as_u64().unwrap_or(0) + 1);
            }
        }
        for (id, generation) in &self.reload_waiters {
            if let Some(fd) = client_fd(*id) {
                let entry = clients
                    .entry(fd)
                    .or_insert_with(|| json!({ "fd": fd, "upgrade": 0, "reloads": [] }));
                if let Some(list) = entry["reloads"].as_array_mut() {
                    list.push(json!(generation));
                }
            }
        }
        fds.extend(clients.keys());
        let started_ms =
            self.started.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
        let state = json!({
            "monotonic_ns": taken_at.to_string(),
            "supervisor": supervisor_state,
            "listeners": listeners,
            "notify": notify,
            "health": health,
            "control": control,
            "clients": clients.into_values().collect::<Vec<_>>(),
            "runtime_dir": self.held.runtime_dir,
            "pid_file": self.held.pid_file.as_ref().map(PidFile::handover),
            "started_ms": started_ms,
            "last_reload": self.last_reload,
            // Derived again from the policy and the supervisor's state by the new program;
            // written for one that reads it.
            "lazy_waiting": self.brain.wants_first_connection(),
            "exe": self.upgrade.exe,
            "upgrades": self.upgrade.count,
            "from_version": env!("CARGO_PKG_VERSION"),
            "target": target,
        });
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
        incoming.check_format()?;
        let state = &incoming.state;
        if config.accept.is_some() {
            return Err("self-upgrade is not supported with --accept".into());
        }
        // First check everything, taking nothing: if anything is wrong, the old program gets
        // every fd back as it was.
        let then: i128 = state["monotonic_ns"]
            .as_str()
            .and_then(|t| t.parse().ok())
            .ok_or("the state has no valid monotonic_ns")?;
        let elapsed = Duration::from_nanos(u64::try_from(monotonic_ns() - then).unwrap_or(0));
        let supervisor = Supervisor::restore(
            config.policy.clone(),
            &state["supervisor"],
            Instant::now(),
            elapsed,
        )?;
        let list = |key: &str| state[key].as_array().cloned().unwrap_or_default();
        let mut adopted = Vec::new();
        for listener in list("listeners") {
            adopted.push(if dry {
                let text = listener["spec"].as_str().ok_or("a listener without a spec")?;
                text.parse::<crate::listen::ListenSpec>().map_err(|e| e.to_string())?;
                Incoming::check_fd_number(&listener["fd"], "a listener")?
            } else {
                Listener::check_handover(&listener)?
            });
        }
        let fd_of = |v: &Value, what: &str| -> Result<RawFd, String> {
            let fd = Incoming::check_fd_number(&v["fd"], what)?;
            if !dry {
                crate::spawn::borrow_inherited_fd(fd)
                    .map_err(|e| format!("{what} fd {fd}: {e}"))?;
            }
            Ok(fd)
        };
        let mut notify = Vec::new();
        for entry in list("notify") {
            let fd = fd_of(&entry, "a notify socket")?;
            let unit = entry["unit"].as_u64().ok_or("a notify socket without a unit")?;
            let path = entry["path"].as_str().ok_or("a notify socket without a path")?;
            notify.push((unit, fd, PathBuf::from(path)));
            adopted.push(fd);
        }
        let mut health = BTreeMap::new();
        for entry in list("health") {
            let unit = entry["unit"].as_u64().ok_or("a health listener without a unit")?;
            let addr = entry["addr"].as_str().and_then(|a| a.parse().ok());
            health.insert(unit, addr.ok_or("a health listener without an address")?);
        }
        let control_fd = match &state["control"] {
            Value::Null => None,
            control => Some(fd_of(control, "the control socket")?),
        };
        let mut clients = Vec::new();
        for client in list("clients") {
            // A client that went away during the change is simply not answered.
            if let Ok(fd) = fd_of(&client, "a control client") {
                clients.push((fd, client));
            }
        }
        let runtime_dir =
            state["runtime_dir"].as_str().ok_or("the state has no runtime directory")?;
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
            listeners: list("listeners").iter().map(Listener::take_handover).collect(),
            runtime_dir: Some(PathBuf::from(runtime_dir)),
            pid_file: PidFile::take_handover(&state["pid_file"]),
        };
        let mut control = match (&state["control"], control_fd) {
            (control, Some(fd)) => {
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
        let mut reload_waiters = Vec::new();
        let mut upgrade_askers = Vec::new();
        if let Some(control) = &mut control {
            for (fd, client) in clients {
                let upgrades = client["upgrade"].as_u64().unwrap_or(0) as usize;
                let reloads = client["reloads"].as_array().cloned().unwrap_or_default();
                let id = control.take_client(fd, upgrades + reloads.len());
                adopted.push(fd);
                upgrade_askers.extend(std::iter::repeat_n(id, upgrades));
                reload_waiters.extend(reloads.iter().map(|g| (id, g.as_u64())));
            }
        }
        let base_env = crate::plan::base_env(std::env::vars_os());
        let started = UNIX_EPOCH + Duration::from_millis(state["started_ms"].as_u64().unwrap_or(0));
        let mut upgrades = Upgrades::at_start();
        upgrades.resumed = true;
        upgrades.exe = state["exe"].as_str().map(PathBuf::from).or(upgrades.exe);
        upgrades.count = state["upgrades"].as_u64().unwrap_or(0);
        let target = state["target"].as_str().unwrap_or("?").to_string();
        let version = env!("CARGO_PKG_VERSION");
        let answer = match &incoming.failed {
            None => {
                upgrades.count += 1;
                upgrades.last = Some(LastUpgrade::succeeded(&target, version, now_text()));
                info!(
                    "upgraded in place: version {version} from {target} took over from version {} (pid {} unchanged)",
                    state["from_version"].as_str().unwrap_or("?"),
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
                upgrades.last = Some(LastUpgrade::failed(reason, now_text()));
                error_answer(&format!("upgrade failed: {reason}"))
            }
        };
        let units: BTreeMap<u64, UnitIo> = notify
            .into_iter()
            .map(|(unit, fd, path)| {
                let notify = NotifySocket::take_handover(fd, path);
                (unit, UnitIo { notify, health: health.remove(&unit), probe: None })
            })
            .collect();
        let mut event_loop = EventLoop {
            control,
            reload_waiters,
            last_reload: serde_json::from_value(state["last_reload"].clone()).unwrap_or_default(),
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
        };
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

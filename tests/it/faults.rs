//! The fault suite: children and clients that misbehave, and reloads in numbers, each ending with
//! sockhold still serving, nothing left behind in /proc, and its own fd table as it was.
//!
//! Faults tested elsewhere, not repeated here:
//! - a new child that exits before it is ready: lifecycle.rs,
//!   `a_new_child_that_crashes_leaves_the_old_one_serving`;
//! - a new child that is never ready: lifecycle.rs,
//!   `readiness_from_the_old_generation_never_promotes_the_new_one` (and
//!   `a_burst_of_50_sighups_leads_to_at_most_two_more_generations`);
//! - an old child that ignores SIGTERM: lifecycle.rs,
//!   `an_old_child_that_ignores_sigterm_is_killed_at_the_deadline_and_reaped`;
//! - a child that sets O_NONBLOCK on a shared socket: child.rs,
//!   `a_child_that_sets_o_nonblock_keeps_it_through_reloads_and_a_failed_one`, and sockets.rs,
//!   `option_nonblock`.
//!
//! A daemon a generation double-forks stays in the generation's process group unless it calls
//! setsid(2) or setpgid(2), and sockhold kills it with that group; one that leaves its group is
//! not tracked (documented under "Leftover processes"). Orphans are re-parented to PID 1, which
//! reaps them or not: a killed daemon counts as gone once it is no longer alive, zombie or not.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal::{SIGHUP, SIGKILL, SIGTERM, SIGUSR1};
use nix::unistd::Pid;
use serde_json::Value;

use crate::support::*;

/// One process as /proc shows it.
#[derive(Debug)]
struct Proc {
    pid: i64,
    state: char,
    ppid: i64,
    pgrp: i64,
}

/// Every process in /proc: pid, state, parent and process group (from `/proc/PID/stat`).
fn processes() -> Vec<Proc> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.filter_map(|entry| process(entry.ok()?.file_name().to_str()?.parse().ok()?)).collect()
}

/// One process from `/proc/PID/stat`, if it exists.
fn process(pid: i64) -> Option<Proc> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: the fields start after the last ')'.
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    let pgrp = fields.next()?.parse().ok()?;
    Some(Proc { pid, state, ppid, pgrp })
}

/// Whether `pid` runs: any of its threads has not exited.
fn alive(pid: i64) -> bool {
    !process_dead(pid)
}

/// sockhold's children that have ended and were not reaped.
fn zombies_of(parent: i64) -> Vec<i64> {
    processes().iter().filter(|p| p.ppid == parent && p.state == 'Z').map(|p| p.pid).collect()
}

/// Live processes in any of these process groups.
fn alive_in_groups(groups: &BTreeSet<i64>) -> Vec<Proc> {
    processes().into_iter().filter(|p| groups.contains(&p.pgrp) && alive(p.pid)).collect()
}

/// What sockhold's open fds point at, sorted, socket and pipe inodes left out: a generation's
/// notify socket is a new one each time, and may take another fd number.
fn fd_table(pid: i64) -> Vec<String> {
    let mut table: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("sockhold's fd table")
        .filter_map(|entry| {
            let target = std::fs::read_link(entry.ok()?.path()).ok()?;
            let target = target.to_string_lossy();
            Some(target.split_once(":[").map_or(target.to_string(), |(kind, _)| kind.into()))
        })
        .collect();
    table.sort();
    table
}

/// One request on the control socket, its answer.
fn control(path: &Path, request: &str) -> Value {
    let mut stream = UnixStream::connect(path).expect("connect to the control socket");
    stream.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    stream.write_all(format!("{request}\n").as_bytes()).expect("send the request");
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line).expect("read the answer");
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"))
}

/// The states of the generations in a status answer, oldest first.
fn states(status: &Value) -> Vec<(u64, String)> {
    status["generations"]
        .as_array()
        .expect("generations")
        .iter()
        .map(|g| (g["id"].as_u64().expect("id"), g["state"].as_str().expect("state").into()))
        .collect()
}

/// A private directory and the path of a control socket in it.
fn control_path() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("control.sock").to_string_lossy().into_owned();
    (dir, path)
}

/// Waits for the manager's READY=1 naming `generation`.
fn expect_serving(s: &mut Sockhold, generation: u64) {
    let needle = format!("generation {generation} ");
    s.expect_manager(&format!("generation {generation} ready"), |m| {
        m.starts_with("READY=1") && m.contains(&needle)
    });
}

#[test]
fn a_double_forked_daemon_goes_with_its_generations_process_group() {
    let mut s = start_fixture(&[], &["--ready", "--daemon"]);
    let first = pid_of(&s.expect_event("start", 1));
    let daemon1 = s.expect_event("daemon", 1);
    assert_eq!(daemon1["pgid"].as_i64(), Some(first), "the daemon kept the generation's group");
    assert_ne!(daemon1["ppid"].as_i64(), Some(first), "and is not the main process's child");
    let daemon1 = pid_of(&daemon1);
    expect_serving(&mut s, 1);
    assert!(alive(daemon1), "generation 1's daemon runs");

    s.signal(SIGHUP);
    let second = pid_of(&s.expect_event("start", 2));
    let daemon2 = pid_of(&s.expect_event("daemon", 2));
    expect_serving(&mut s, 2);
    s.expect_event("exit", 1);
    wait_until("generation 1's daemon is killed with its group", || !alive(daemon1));
    assert!(alive_in_groups(&BTreeSet::from([first])).is_empty(), "generation 1 left nothing");
    assert!(alive(daemon2), "generation 2's daemon is untouched");

    s.signal(SIGTERM);
    assert_eq!(s.exit_code(), 0);
    wait_until("generation 2's daemon is killed at stop", || !alive(daemon2));
    let groups = BTreeSet::from([first, second]);
    assert!(alive_in_groups(&groups).is_empty(), "{:?}", alive_in_groups(&groups));
}

/// `--kill-mode process` (systemd's KillMode=process, as Debian's ssh.service has it): a
/// generation's stop reaches its main process only, and what it forked (an sshd's sessions)
/// runs on after it, through later reloads and sockhold's own stop.
#[test]
fn with_kill_mode_process_what_a_generation_forked_outlives_it() {
    let mut s = start_fixture(&["--kill-mode", "process"], &["--ready", "--daemon"]);
    let first = pid_of(&s.expect_event("start", 1));
    let daemon1 = pid_of(&s.expect_event("daemon", 1));
    expect_serving(&mut s, 1);

    s.signal(SIGHUP);
    let second = pid_of(&s.expect_event("start", 2));
    let daemon2 = pid_of(&s.expect_event("daemon", 2));
    expect_serving(&mut s, 2);
    s.expect_log(&format!("generation 1 (pid {first}) stopped"));
    // One more reload: any SIGKILL that reaping generation 1 sent has long landed.
    s.signal(SIGHUP);
    s.expect_event("start", 3);
    expect_serving(&mut s, 3);
    s.expect_log(&format!("generation 2 (pid {second}) stopped"));
    assert!(!alive(first) && !alive(second), "the main processes stopped");
    assert!(alive(daemon1), "generation 1's daemon runs on");
    assert!(alive(daemon2), "generation 2's daemon runs on");

    s.signal(SIGTERM);
    assert_eq!(s.exit_code(), 0);
    assert!(alive(daemon1) && alive(daemon2), "the daemons outlive sockhold's stop too");
    for daemon in [daemon1, daemon2] {
        let _ = nix::sys::signal::kill(Pid::from_raw(daemon as i32), SIGKILL);
    }
    wait_until("the test's cleanup of the daemons", || !alive(daemon1) && !alive(daemon2));
}

/// `--kill-mode control-group`: the stop signal reaches the whole process group at once, so a
/// daemon the generation forked gets it while the main process (which ignores it) still runs.
/// With the default (`mixed`) it would wait for the main process or the 30s stop timeout.
#[test]
fn with_kill_mode_control_group_the_stop_signal_reaches_the_whole_group() {
    let mut s = start_fixture(
        &["--kill-mode", "control-group", "--stop-timeout", "30s"],
        &["--ready", "--daemon", "--ignore-term-gen", "1"],
    );
    let first = pid_of(&s.expect_event("start", 1));
    let daemon1 = pid_of(&s.expect_event("daemon", 1));
    expect_serving(&mut s, 1);

    s.signal(SIGHUP);
    s.expect_event("start", 2);
    expect_serving(&mut s, 2);
    s.expect_signal(1, "TERM");
    wait_until("generation 1's daemon dies of the stop signal", || !alive(daemon1));
    assert!(alive(first), "the main process ignores SIGTERM and runs on");
    // Out of the stop timeout's way: the test ends generation 1 itself.
    let _ = nix::sys::signal::kill(Pid::from_raw(first as i32), SIGKILL);
    s.expect_log(&format!("generation 1 (pid {first}) stopped: killed by SIGKILL"));

    s.signal(SIGTERM);
    assert_eq!(s.exit_code(), 0);
}

#[test]
fn sighups_at_100_per_second_for_2_seconds_under_load() {
    let httpd = example("httpd").to_string_lossy().into_owned();
    let (_dir, ctl) = control_path();
    // At 100 reloads a second, several generations may drain at once (each finishes the requests
    // it took); the --max-draining cap would SIGKILL the oldest while it may still be serving one.
    // The cap is tested on its own below: out of this test's way.
    #[rustfmt::skip]
    let mut s = start(&[
        "-l", "127.0.0.1:0", "--ready", "notify", "--stop-timeout", "10s", "--control", &ctl,
        "--max-draining", "100", "--", &httpd,
    ]);
    let port = s.listening_port("127.0.0.1:");
    s.expect_ready();
    let sockhold = s.pid().as_raw() as i64;
    let fds_before = fd_table(sockhold);

    let load = Load::start(port, 2);

    // The load shape, not a synchronisation: one SIGHUP every 10ms for 2s, on a fixed schedule.
    let begin = Instant::now();
    for i in 1..=200u32 {
        s.signal(SIGHUP);
        let next = begin + Duration::from_millis(10) * i;
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    let storm = begin.elapsed();
    // A reload asked for after every SIGHUP was sent: when it answers, the newest version serves.
    let reload = control(Path::new(&ctl), r#"{"cmd":"reload"}"#);
    assert_eq!(reload["ok"], true, "{reload}");
    let (ok, failures, _) = load.finish();

    wait_until("only the serving generation is left", || {
        let status = control(Path::new(&ctl), r#"{"cmd":"status"}"#);
        matches!(states(&status).as_slice(), [(_, state)] if state == "serving")
    });
    // Read sockhold's log up to the promotion of the newest generation.
    let newest = reload["generation"].as_u64().expect("generation");
    s.expect_log(&format!("generation {newest} (pid {}) is ready", reload["pid"]));
    let started = s.log().iter().filter(|l| l.contains(" started (pid ")).count();
    assert_eq!(started as u64, newest, "every generation started once");
    eprintln!(
        "200 SIGHUPs in {storm:?}: {started} generations started, {ok} requests served, {} failed",
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} requests failed: {:?}",
        failures.len(),
        &failures[..5.min(failures.len())]
    );
    assert!(ok >= 100, "the load ran ({ok} requests)");
    // Each SIGHUP starts a generation, or joins the one reload that follows the one starting.
    assert!((3..=202).contains(&started), "{started} generations for 201 reload requests");
    assert!(!s.log().iter().any(|l| l.contains("reload failed")), "no reload failed");
    assert!(zombies_of(sockhold).is_empty(), "zombies: {:?}", zombies_of(sockhold));
    // The last control client may still be closing: its fd goes on sockhold's next wakeup.
    wait_until("sockhold's fd count is back to its start", || {
        fd_table(sockhold).len() == fds_before.len()
    });
    assert_eq!(fd_table(sockhold), fds_before, "sockhold's fd table");
    s.signal(SIGTERM);
    assert_eq!(s.exit_code(), 0);
}

/// A connection held open to the fixture's `--hold` server: sends a line, expects "PID GEN".
struct Held {
    generation: u64,
    pid: i64,
    stream: TcpStream,
}

impl Held {
    fn open(port: u16, generation: u64, pid: i64) -> Held {
        let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        stream.set_read_timeout(Some(TIMEOUT)).expect("timeout");
        let mut held = Held { generation, pid, stream };
        assert_eq!(
            held.ping(),
            Ok(format!("{pid} {generation}")),
            "served by generation {generation}"
        );
        held
    }

    /// One request and its answer on the held connection.
    fn ping(&mut self) -> Result<String, String> {
        self.stream.write_all(b"ping\n").map_err(|e| format!("write: {e}"))?;
        let mut line = String::new();
        match BufReader::new(&self.stream).read_line(&mut line) {
            Ok(0) => Err("closed".into()),
            Ok(_) => Ok(line.trim_end().to_string()),
            Err(e) => Err(format!("read: {e}")),
        }
    }
}

#[test]
fn long_lived_connections_across_50_reloads_keep_at_most_max_draining_generations() {
    const MAX: usize = 4;
    const RELOADS: u64 = 50;
    let (_dir, ctl) = control_path();
    let max = MAX.to_string();
    let mut s = start_fixture(
        &["--max-draining", &max, "--stop-timeout", "60s", "--control", &ctl],
        &["--ready", "--hold"],
    );
    let first = s.expect_event("start", 1);
    let port = port_of(&first);
    expect_serving(&mut s, 1);
    let mut held = vec![Held::open(port, 1, pid_of(&first))];
    let mut most_draining = 0;
    for generation in 2..=RELOADS + 1 {
        s.signal(SIGHUP);
        let pid = pid_of(&s.expect_event("start", generation));
        expect_serving(&mut s, generation);
        // The old generation drains: it accepts no more, so the next connection is the new one's.
        s.expect_event("stopped-accepting", generation - 1);
        held.push(Held::open(port, generation, pid));
        let status = control(Path::new(&ctl), r#"{"cmd":"status"}"#);
        let draining = states(&status).iter().filter(|(_, state)| state == "stopping").count();
        assert!(draining <= MAX, "{draining} generations draining: {status}");
        most_draining = most_draining.max(draining);
    }
    assert_eq!(most_draining, MAX, "the connections kept old generations draining");

    // The cap SIGKILLed every generation but the MAX newest draining ones, oldest first.
    let killed = RELOADS as usize + 1 - (MAX + 1);
    let last_killed = &held[killed - 1];
    s.expect_log(&format!(
        "generation {} (pid {}) is still draining",
        last_killed.generation, last_killed.pid
    ));
    let cap = format!("--max-draining {MAX}");
    let capped: Vec<&String> = s.log().iter().filter(|l| l.contains(&cap)).collect();
    assert_eq!(capped.len(), killed, "{capped:#?}");
    assert!(capped[0].contains("generation 1 (pid"), "{}", capped[0]);
    let pid = last_killed.pid;
    wait_until("the last generation the cap killed is gone", || !alive(pid));
    for conn in &mut held {
        let answer = conn.ping();
        if conn.generation as usize <= killed {
            assert!(answer.is_err(), "generation {} was killed: {answer:?}", conn.generation);
        } else {
            let want = format!("{} {}", conn.pid, conn.generation);
            assert_eq!(
                answer,
                Ok(want),
                "generation {} still serves its connection",
                conn.generation
            );
        }
    }

    // At stop every generation drains; closing the connections lets them exit cleanly.
    s.signal(SIGTERM);
    s.expect_event("draining", RELOADS + 1);
    drop(held);
    assert_eq!(s.exit_code(), 0);
    let sockhold = s.pid().as_raw() as i64;
    assert!(zombies_of(sockhold).is_empty());
}

#[test]
fn a_listener_shut_down_by_a_crashing_new_child_listens_again_for_the_old_one() {
    #[rustfmt::skip]
    let mut s = start_fixture(&[], &[
        "--ready-gen", "1", "--ready-gen", "3", "--serve",
        "--shutdown-listener-gen", "2", "--exit-gen", "2:1",
    ]);
    let first = s.expect_event("start", 1);
    let port = port_of(&first);
    s.expect_ready();
    assert_eq!(http_get(port), Ok(pid_of(&first) as i32));

    // Generation 2 shuts the shared socket down and crashes before it is ready.
    s.signal(SIGHUP);
    let shut = s.expect_event("shutdown-listener", 2);
    assert_eq!(shut["listening"], false, "the shutdown stopped the listener for every holder");
    s.expect_log("reload failed: generation 2");
    let warning = s.expect_log("no longer listens");
    assert!(warning.contains(&format!("127.0.0.1:{port}")), "names the listener: {warning}");
    s.expect_log(&format!("127.0.0.1:{port} listens again"));
    // Generation 1, which still serves, accepts on the repaired socket, on the same port.
    for _ in 0..10 {
        assert_eq!(http_get(port), Ok(pid_of(&first) as i32), "generation 1 answers");
    }

    // The next reload works, on the same port.
    s.signal(SIGHUP);
    let third = s.expect_event("start", 3);
    assert_eq!(port_of(&third), port);
    assert_eq!(third["fds"][3]["socket"]["listening"], true);
    expect_serving(&mut s, 3);
    // Until it is gone, generation 1 may still take a connection and die with it.
    let old = pid_of(&first);
    wait_until("generation 1 is gone", || !alive(old));
    assert_eq!(http_get(port), Ok(pid_of(&third) as i32), "generation 3 answers");
}

#[test]
fn a_listener_shut_down_by_the_serving_child_is_repaired_before_the_next_generation() {
    let mut s = start_fixture(&[], &["--ready", "--serve", "--shutdown-listener-on-usr1"]);
    let first = s.expect_event("start", 1);
    let port = port_of(&first);
    s.expect_ready();
    s.signal(SIGUSR1);
    let shut = s.expect_event("shutdown-listener", 1);
    assert_eq!(shut["listening"], false);
    assert!(http_get(port).is_err(), "refused while nobody listens");
    // Nothing ended: sockhold repairs it when the next generation starts.
    s.signal(SIGHUP);
    let second = s.expect_event("start", 2);
    let warning = s.expect_log("no longer listens");
    assert!(warning.contains(&format!("127.0.0.1:{port}")), "{warning}");
    assert_eq!(second["fds"][3]["socket"]["listening"], true, "{second}");
    assert_eq!(port_of(&second), port, "the same port");
    expect_serving(&mut s, 2);
    let old = pid_of(&first);
    wait_until("generation 1 is gone", || !alive(old));
    assert_eq!(http_get(port), Ok(pid_of(&second) as i32), "generation 2 serves the socket");
}

#[test]
fn a_thousand_reloads_leave_the_fd_table_as_it_was_and_nothing_behind() {
    const RELOADS: u64 = 1000;
    let mut s = start_fixture(&[], &["--ready"]);
    let first = pid_of(&s.expect_event("start", 1));
    expect_serving(&mut s, 1);
    let sockhold = s.pid().as_raw() as i64;
    let fds_before = fd_table(sockhold);

    let begin = Instant::now();
    for generation in 2..=RELOADS + 1 {
        s.signal(SIGHUP);
        expect_serving(&mut s, generation);
    }
    let took = begin.elapsed();
    eprintln!("{RELOADS} reloads in {took:?} ({:?} each)", took / RELOADS as u32);
    assert!(took < Duration::from_secs(300), "{RELOADS} reloads took {took:?}");

    let last = pid_of(&s.expect_event("start", RELOADS + 1));
    let mut old: BTreeSet<i64> = BTreeSet::from([first]);
    for generation in 2..=RELOADS {
        old.insert(pid_of(&s.expect_event("start", generation)));
    }
    s.expect_event("exit", RELOADS);
    wait_until("every old generation is gone", || alive_in_groups(&old).is_empty());
    assert!(zombies_of(sockhold).is_empty(), "zombies: {:?}", zombies_of(sockhold));
    assert!(alive(last), "the newest generation serves");
    // The old generation's notify socket goes right after it is reaped.
    wait_until("sockhold's fd count is back to its start", || {
        fd_table(sockhold).len() == fds_before.len()
    });
    assert_eq!(fd_table(sockhold), fds_before, "sockhold's fd table after {RELOADS} reloads");
    s.signal(SIGTERM);
    assert_eq!(s.exit_code(), 0);
}

/// The runtime directories named after instance `name` in `base`.
fn runtime_dirs(base: &Path, name: &str) -> BTreeSet<std::path::PathBuf> {
    let prefix = format!("sockhold-{name}.");
    std::fs::read_dir(base)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .map(|e| e.path())
        .collect()
}

/// A sockhold killed with SIGKILL leaves its runtime directory behind; the next one of the same
/// name removes it, while the directory of another live one of that name stays.
#[test]
fn a_runtime_directory_left_by_a_killed_sockhold_is_removed_at_the_next_start() {
    let base = tempfile::tempdir().unwrap();
    let start_named = || {
        start_with(
            &[
                "--name",
                "web",
                "-l",
                "127.0.0.1:0",
                "--ready",
                "notify",
                "--",
                &fixture(),
                "--ready",
            ],
            |cmd| {
                cmd.env("RUNTIME_DIRECTORY", base.path());
            },
        )
    };
    let mut killed = start_named();
    killed.expect_ready();
    let left = runtime_dirs(base.path(), "web");
    assert_eq!(left.len(), 1, "{left:?}");
    killed.signal(nix::sys::signal::Signal::SIGKILL);
    killed.wait_exit();
    assert_eq!(runtime_dirs(base.path(), "web"), left, "SIGKILL left it behind");

    let mut live = start_named();
    live.expect_ready();
    live.expect_log("left behind by sockhold pid");
    let mine = runtime_dirs(base.path(), "web");
    assert_eq!(mine.len(), 1, "{mine:?}");
    assert!(mine.is_disjoint(&left), "the stale one is gone: {mine:?}");

    // A second instance of the same name, while the first runs: nothing of the first is touched.
    let mut second = start_named();
    second.expect_ready();
    let both = runtime_dirs(base.path(), "web");
    assert_eq!(both.len(), 2, "{both:?}");
    assert!(both.is_superset(&mine));
    for mut s in [live, second] {
        s.signal(SIGTERM);
        assert_eq!(s.exit_code(), 0);
    }
    assert!(runtime_dirs(base.path(), "web").is_empty(), "each removed its own at exit");
}

/// A left-behind directory is judged only by a sockhold of the pid namespace that wrote it: one
/// whose owner file names another namespace (a container sharing the directory, whose pids mean
/// nothing here) is kept, while one of this namespace whose owner is gone is removed.
#[test]
fn a_runtime_directory_owned_from_another_pid_namespace_is_kept() {
    use std::os::unix::fs::MetadataExt;
    let base = tempfile::tempdir().unwrap();
    let gone = {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        child.wait().unwrap();
        child.id()
    };
    let here = std::fs::metadata("/proc/self/ns/pid").unwrap().ino();
    let plant = |name: &str, namespace: u64| {
        let dir = base.path().join(name);
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("owner"), format!("{gone} 5 {namespace}\n")).unwrap();
        dir
    };
    let elsewhere = plant("sockhold-web.other1", here + 1);
    let left_here = plant("sockhold-web.here01", here);

    let mut s = start_with(
        &["--name", "web", "-l", "127.0.0.1:0", "--ready", "notify", "--", &fixture(), "--ready"],
        |cmd| {
            cmd.env("RUNTIME_DIRECTORY", base.path());
        },
    );
    s.expect_ready();
    s.expect_log(&format!("removed {}, left behind by sockhold pid {gone}", left_here.display()));
    assert!(!left_here.exists(), "this namespace's stale directory is removed");
    assert!(elsewhere.join("owner").exists(), "another namespace's directory is kept");
    let mine: Vec<_> =
        runtime_dirs(base.path(), "web").into_iter().filter(|d| *d != elsewhere).collect();
    assert_eq!(mine.len(), 1, "{mine:?}");
    let owner = std::fs::read_to_string(mine[0].join("owner")).unwrap();
    let fields: Vec<&str> = owner.split_whitespace().collect();
    assert_eq!(fields.len(), 3, "PID STARTTIME PIDNS: {owner:?}");
    assert_eq!(fields[0], s.pid().to_string(), "{owner:?}");
    assert_eq!(fields[2], here.to_string(), "{owner:?}");
    s.signal(SIGTERM);
    assert_eq!(s.exit_code(), 0);
    assert!(elsewhere.exists(), "still there after sockhold's exit");
}

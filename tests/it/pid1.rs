//! sockhold as an init: a subreaper that reaps orphans, PID 1 of a pid namespace, and what its
//! children do when sockhold itself is killed (`--on-supervisor-death`).

use std::path::PathBuf;
use std::process::{Command, Stdio};

use nix::sys::signal::Signal::{SIGHUP, SIGKILL, SIGTERM};
use nix::sys::signal::kill;
use nix::unistd::Pid;
use serde_json::Value;

use crate::support::*;

/// Waits for the `orphan` line of `kind` from `generation`.
fn expect_orphan(s: &mut Sockhold, generation: &str, kind: &str) -> Value {
    s.expect(&format!("{kind} orphan from generation {generation}"), |v| {
        v["event"] == "orphan" && v["kind"] == kind && v["generation"] == generation
    })
}

#[test]
fn a_subreaper_reaps_orphans_and_a_stopped_generation_takes_its_daemon_along() {
    let mut s =
        start_fixture(&["--subreaper"], &["--ready", "--orphans", "2", "--lingering-orphan"]);
    let sockhold = i64::from(s.pid().as_raw());
    let first = s.expect_event("start", 1);
    for _ in 0..2 {
        let orphan = expect_orphan(&mut s, "1", "exit");
        assert_eq!(orphan["ppid"], sockhold, "re-parented to sockhold: {orphan}");
        let pid = pid_of(&orphan);
        s.expect_log(&format!("reaped orphan pid {pid}: exit status 0"));
        wait_until("the orphan is reaped", || !process_exists(pid));
    }
    let daemon = expect_orphan(&mut s, "1", "linger");
    assert_eq!(daemon["ppid"], sockhold, "{daemon}");
    assert_eq!(daemon["pgid"], first["pid"], "the daemon stays in its generation's group");
    s.expect_ready();

    // The generation that leaves takes its daemon with it, and sockhold reaps that too.
    s.signal(SIGHUP);
    s.expect_event("start", 2);
    s.expect_signal(1, "TERM");
    let pid = pid_of(&daemon);
    s.expect_log(&format!("reaped orphan pid {pid}: killed by SIGKILL"));
    wait_until("the daemon of generation 1 is gone", || !process_exists(pid));

    s.signal(SIGTERM);
    assert_eq!(s.exit_code(), 0);
}

/// Runs `unshare --pid --fork --mount-proc sockhold ARGS`, or returns `None` (after saying why)
/// where unshare is missing or not permitted.
fn start_as_pid_1(args: &[&str]) -> Option<Sockhold> {
    let unshare = require_tool("unshare", "util-linux")?;
    let probe = Command::new(&unshare)
        .args(["--pid", "--fork", "--mount-proc", "true"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output();
    match probe {
        Ok(out) if out.status.success() => {}
        Ok(out) => {
            skipped(&format!(
                "unshare --pid is not permitted here: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
            return None;
        }
        Err(e) => {
            skipped(&format!("unshare cannot run: {e}"));
            return None;
        }
    }
    let bin = sockhold_bin();
    let mut s = start_with(&[], |cmd| {
        let mut outer = Command::new(unshare);
        outer.args(["--pid", "--fork", "--mount-proc"]).arg(&bin).args(args);
        for (k, v) in cmd.get_envs() {
            if let Some(v) = v {
                outer.env(k, v);
            }
        }
        outer.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        std::os::unix::process::CommandExt::process_group(&mut outer, 0);
        *cmd = outer;
    });
    // Inside the namespace pids start at 1: they must never be signalled from out here. The
    // whole namespace dies with its PID 1, which is in the harness's process group.
    s.pids_are_foreign();
    Some(s)
}

/// sockhold's pid as seen from outside: the child of `unshare`.
fn outer_pid_of_child(parent: i32) -> i32 {
    wait_until("unshare has started sockhold", || find_child(parent).is_some());
    find_child(parent).expect("found just now")
}

fn find_child(parent: i32) -> Option<i32> {
    std::fs::read_dir("/proc").ok()?.find_map(|entry| {
        let pid: i32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let ppid: i32 = stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()?;
        (ppid == parent).then_some(pid)
    })
}

/// The pid namespace process `outer` lives in.
fn namespace_of(outer: i32) -> PathBuf {
    std::fs::read_link(format!("/proc/{outer}/ns/pid")).expect("sockhold's pid namespace")
}

/// Every process of pid namespace `ns`: (its pid in there, its state letter).
fn namespace_processes(ns: &PathBuf) -> Vec<(i64, char)> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.filter_map(|entry| {
        let pid: i32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
        if std::fs::read_link(format!("/proc/{pid}/ns/pid")).ok().as_ref() != Some(ns) {
            return None;
        }
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let field = |name: &str| status.lines().find_map(|l| l.strip_prefix(name)).map(str::trim);
        let inner = field("NSpid:")?.split_whitespace().last()?.parse().ok()?;
        let state = field("State:")?.chars().next()?;
        Some((inner, state))
    })
    .collect()
}

#[test]
fn as_pid_1_of_a_pid_namespace_it_reaps_orphans_takes_signals_and_exits_cleanly() {
    let fixture = fixture();
    let args = ["-l", "127.0.0.1:0", "--ready", "notify", "--", &fixture];
    let orphans = ["--ready", "--orphans", "3", "--lingering-orphan"];
    let all: Vec<&str> = args.iter().chain(&orphans).copied().collect();
    let Some(mut s) = start_as_pid_1(&all) else { return };
    let outer = outer_pid_of_child(s.pid().as_raw());
    let ns = namespace_of(outer);
    s.expect_log("running as PID 1");
    let first = s.expect_event("start", 1);
    assert_eq!(first["ppid"], 1, "sockhold is PID 1 in there: {first}");
    let mut reaped = Vec::new();
    for _ in 0..3 {
        let orphan = expect_orphan(&mut s, "1", "exit");
        assert_eq!(orphan["ppid"], 1, "{orphan}");
        reaped.push(pid_of(&orphan));
    }
    let daemon = expect_orphan(&mut s, "1", "linger");
    assert_eq!(daemon["ppid"], 1, "{daemon}");
    for pid in &reaped {
        s.expect_log(&format!("reaped orphan pid {pid}: exit status 0"));
    }
    wait_until("the orphans are reaped and no zombie is left", || {
        let procs = namespace_processes(&ns);
        procs.iter().all(|(pid, state)| *state != 'Z' && !reaped.contains(pid))
    });
    s.expect_ready();

    // A handled signal from outside reaches PID 1 (the kernel drops those it has no handler
    // for): HUP reloads, and the old generation's daemon goes with its process group.
    kill(Pid::from_raw(outer), SIGHUP).expect("signal sockhold");
    s.expect_event("start", 2);
    s.expect_signal(1, "TERM");
    let daemon_pid = pid_of(&daemon);
    s.expect_log(&format!("reaped orphan pid {daemon_pid}: killed by SIGKILL"));
    wait_until("generation 1's daemon is gone", || {
        namespace_processes(&ns).iter().all(|(pid, state)| *pid != daemon_pid && *state != 'Z')
    });

    kill(Pid::from_raw(outer), SIGTERM).expect("signal sockhold");
    s.expect_signal(2, "TERM");
    assert_eq!(s.exit_code(), 0, "unshare passes on sockhold's clean exit");
    wait_until("the namespace is empty", || namespace_processes(&ns).is_empty());
}

#[test]
fn as_pid_1_it_exits_with_the_childs_status() {
    let fixture = fixture();
    let args = [
        "-l",
        "127.0.0.1:0",
        "--ready",
        "notify",
        "--restart",
        "never",
        "--",
        &fixture,
        "--exit",
        "3",
    ];
    let Some(mut s) = start_as_pid_1(&args) else { return };
    s.expect_event("exit", 1);
    assert_eq!(s.exit_code(), 3);
}

/// Starts a serving fixture with `--on-supervisor-death WHAT`, its runtime directory in `dir`
/// (a SIGKILLed sockhold cannot remove it).
fn start_for_death(what: &str, dir: &PathBuf) -> Sockhold {
    let fixture = fixture();
    let args = [
        "-l",
        "127.0.0.1:0",
        "--ready",
        "notify",
        "--on-supervisor-death",
        what,
        "--",
        &fixture,
        "--ready",
        "--serve",
    ];
    start_with(&args, |cmd| {
        cmd.env("RUNTIME_DIRECTORY", dir);
    })
}

#[test]
fn when_sockhold_is_killed_the_children_keep_serving_by_default() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = start_for_death("keep", &dir.path().to_path_buf());
    let start = s.expect_event("start", 1);
    let (child, port) = (pid_of(&start), port_of(&start));
    s.expect_ready();
    s.signal(SIGKILL);
    s.wait_exit();
    // The child holds its own copy of the listening socket: it answers as before.
    for _ in 0..5 {
        assert_eq!(http_get(port).map(i64::from), Ok(child));
    }
    assert!(!process_dead(child), "the child runs on");
    assert!(!s.seen(|v| v["event"] == "signal"), "the child got no signal");
}

#[test]
fn when_sockhold_is_killed_the_children_follow_it_with_stop_or_kill() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = start_for_death("stop", &dir.path().to_path_buf());
    let child = pid_of(&s.expect_event("start", 1));
    s.expect_ready();
    s.signal(SIGKILL);
    s.expect_signal(1, "TERM");
    s.expect_event("exit", 1);
    wait_until("the child has ended", || process_dead(child));

    let mut s = start_for_death("kill", &dir.path().to_path_buf());
    let child = pid_of(&s.expect_event("start", 1));
    s.expect_ready();
    assert!(!process_dead(child));
    s.signal(SIGKILL);
    wait_until("the child is killed", || process_dead(child));
}

/// `--on-supervisor-death stop` with a realtime `--stop-signal`: the kernel sends that signal
/// (the fixture has no handler for it, so it ends the child).
#[test]
fn when_sockhold_is_killed_the_children_get_a_realtime_stop_signal() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = fixture();
    #[rustfmt::skip]
    let args = [
        "-l", "127.0.0.1:0", "--ready", "notify", "--on-supervisor-death", "stop",
        "--stop-signal", "RTMIN+2", "--", &fixture, "--ready", "--serve",
    ];
    let mut s = start_with(&args, |cmd| {
        cmd.env("RUNTIME_DIRECTORY", dir.path());
    });
    let child = pid_of(&s.expect_event("start", 1));
    s.expect_ready();
    assert!(!process_dead(child));
    s.signal(SIGKILL);
    wait_until("the child has ended", || process_dead(child));
    // Not TERM, which the fixture would have reported before exiting.
    assert!(!s.seen(|v| v["event"] == "signal"), "the child got a signal it handles");
}

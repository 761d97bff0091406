//! Reloads, readiness, stops and restarts, driven through signals and observed through the
//! fixture's lines, sockhold's log and the manager's notify socket.

use nix::sys::signal::Signal::{SIGHUP, SIGINT, SIGTERM, SIGUSR1};

use crate::support::*;

#[test]
fn reload_starts_a_new_generation_then_stops_the_old_one() {
    let mut s = start_fixture(&[], &["--ready"]);
    let first = s.expect_event("start", 1);
    s.expect_ready();
    s.signal(SIGHUP);
    let reloading = s.expect_manager("RELOADING=1", |m| m.starts_with("RELOADING=1"));
    assert!(reloading.contains("MONOTONIC_USEC="), "{reloading}");
    let second = s.expect_event("start", 2);
    assert_eq!(port_of(&first), port_of(&second), "the same socket");
    s.expect_signal(1, "TERM");
    let ready = s.expect_manager("READY=1 after the reload", |m| m.starts_with("READY=1"));
    assert!(ready.contains("generation 2"), "{ready}");
    let old = pid_of(&first);
    wait_until("the old generation is reaped", || !process_exists(old));
    s.signal(SIGTERM);
    s.expect_manager("STOPPING=1", |m| m.starts_with("STOPPING=1"));
    s.expect_signal(2, "TERM");
    assert_eq!(s.exit_code(), 0);
}

#[test]
fn readiness_from_the_old_generation_never_promotes_the_new_one() {
    let mut s = start_fixture(
        &["--ready-timeout", "2s"],
        &["--ready-gen", "1", "--notify-on-usr1", "READY=1"],
    );
    s.expect_event("start", 1);
    s.expect_ready();
    s.signal(SIGHUP);
    s.expect_event("start", 2);
    // USR1 is forwarded to the serving generation, 1, which answers with READY=1 on its own
    // socket and waits until sockhold has read it (a notify barrier).
    s.signal(SIGUSR1);
    s.expect_signal(1, "USR1");
    let notified = s.expect_event("notified", 1);
    assert_eq!(notified["barrier"], "ok", "sockhold closed the barrier fd");
    // Generation 1 still serves: the next forwarded signal reaches it, and it was never stopped.
    s.signal(SIGUSR1);
    s.expect_signal(1, "USR1");
    // Generation 2 never became ready: killed at the ready timeout, generation 1 keeps serving.
    s.expect_log("generation 2 (pid");
    s.expect_log("was not ready within 2s");
    s.expect_log("reload failed");
    s.signal(SIGUSR1);
    s.expect_signal(1, "USR1");
    assert!(
        !s.seen(|v| v["event"] == "signal" && v["signal"] == "TERM"),
        "nobody was asked to stop"
    );
    assert!(
        !s.seen(|v| v["event"] == "signal" && v["generation"] == "2"),
        "generation 2 got no forwarded signal"
    );
}

#[test]
fn a_new_child_that_crashes_leaves_the_old_one_serving() {
    let mut s = start_fixture(
        &[],
        &["--ready-gen", "1", "--ready-gen", "3", "--serve", "--exit-gen", "2:3"],
    );
    let first = s.expect_event("start", 1);
    s.expect_ready();
    let port = port_of(&first);
    s.signal(SIGHUP);
    s.expect_event("start", 2);
    let ready = s.expect_manager("READY=1 after the failed reload", |m| m.starts_with("READY=1"));
    assert!(ready.contains("last reload failed"), "{ready}");
    assert!(ready.contains("exit status 3"), "{ready}");
    s.expect_log("reload failed: generation 2");
    assert_eq!(http_get(port), Ok(pid_of(&first) as i32), "generation 1 still answers");
    s.signal(SIGUSR1);
    s.expect_signal(1, "USR1");
    // The next reload works.
    s.signal(SIGHUP);
    s.expect_event("start", 3);
    s.expect_signal(1, "TERM");
}

#[test]
fn an_old_child_that_ignores_sigterm_is_killed_at_the_deadline_and_reaped() {
    let mut s = start_fixture(&["--stop-timeout", "1s"], &["--ready", "--ignore-term-gen", "1"]);
    let first = s.expect_event("start", 1);
    s.expect_ready();
    s.signal(SIGHUP);
    s.expect_event("start", 2);
    s.expect_signal(1, "TERM");
    let old = pid_of(&first);
    s.expect_log(&format!(
        "generation 1 (pid {old}) did not stop within 1s; sending SIGKILL to its process group"
    ));
    s.expect_log(&format!("generation 1 (pid {old}) was killed: killed by SIGKILL"));
    wait_until("the killed child is reaped (no zombie left)", || !process_exists(old));
    s.signal(SIGUSR1);
    s.expect_signal(2, "USR1");
}

#[test]
fn sigterm_during_a_reload_stops_both_generations() {
    let mut s = start_fixture(&[], &["--ready-gen", "1"]);
    s.expect_event("start", 1);
    s.expect_ready();
    s.signal(SIGHUP);
    s.expect_event("start", 2);
    s.signal(SIGTERM);
    s.expect_signal(1, "TERM");
    s.expect_signal(2, "TERM");
    assert_eq!(s.exit_code(), 0);
}

#[test]
fn sigint_stops_like_sigterm() {
    let fixture = fixture();
    let mut s = start(&["-l", "127.0.0.1:0", "--ready", "delay:10ms", "--", &fixture]);
    s.expect_event("start", 1);
    s.expect_ready();
    s.signal(SIGINT);
    s.expect_signal(1, "TERM");
    assert_eq!(s.exit_code(), 0);
}

#[test]
fn a_burst_of_50_sighups_leads_to_at_most_two_more_generations() {
    // Generation 2 never becomes ready (it fails at the 2s timeout); generation 3 is the one
    // reload that every HUP sent while generation 2 was starting coalesced into.
    let mut s =
        start_fixture(&["--ready-timeout", "2s"], &["--ready-gen", "1", "--ready-gen", "3"]);
    s.expect_event("start", 1);
    s.expect_ready();
    s.signal(SIGHUP);
    s.expect_event("start", 2);
    for _ in 0..49 {
        s.signal(SIGHUP);
    }
    s.expect_event("start", 3);
    s.expect_manager("generation 3 ready", |m| {
        m.starts_with("READY=1") && m.contains("generation 3")
    });
    s.signal(SIGTERM);
    assert_eq!(s.exit_code(), 0);
    let started = s.log().iter().filter(|l| l.contains(" started (pid ")).count();
    assert_eq!(started, 3, "generation 1 and at most two more: {:#?}", s.log());
}

#[test]
fn a_crashed_child_is_restarted_with_backoff_on_the_same_sockets() {
    let mut s = start_fixture(&[], &["--ready", "--exit-gen", "1:9"]);
    let first = s.expect_event("start", 1);
    s.expect_log(&format!("generation 1 (pid {}) exited by itself: exit status 9", pid_of(&first)));
    s.expect_log("restarting in 100ms");
    let second = s.expect_event("start", 2);
    assert_eq!(port_of(&first), port_of(&second));
    s.expect_manager("generation 2 ready", |m| {
        m.starts_with("READY=1") && m.contains("generation 2")
    });
}

#[test]
fn forwarded_signals_reach_the_serving_child() {
    let mut s = start_fixture(&[], &["--ready"]);
    s.expect_event("start", 1);
    s.expect_ready();
    for (signal, name) in [
        (nix::sys::signal::Signal::SIGUSR1, "USR1"),
        (nix::sys::signal::Signal::SIGWINCH, "WINCH"),
        (nix::sys::signal::Signal::SIGQUIT, "QUIT"),
        (nix::sys::signal::Signal::SIGTTIN, "TTIN"),
    ] {
        s.signal(signal);
        s.expect_signal(1, name);
    }
}

#[test]
fn unix_socket_files_and_pid_file_are_managed() {
    let fixture = fixture();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("app.sock");
    let pid_file = dir.path().join("sockhold.pid");
    // A stale socket file (nobody answers) is replaced.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let sock_arg = sock.to_str().unwrap().to_string();
    let pid_arg = pid_file.to_str().unwrap().to_string();
    let mut s = start(&[
        "-l",
        &sock_arg,
        "--pid-file",
        &pid_arg,
        "--ready",
        "notify",
        "--",
        &fixture,
        "--ready",
    ]);
    s.expect_event("start", 1);
    s.expect_log("removing stale socket file");
    s.expect_ready();
    let written = std::fs::read_to_string(&pid_file).unwrap();
    assert_eq!(written.trim(), s.pid().to_string());
    // A live socket file is refused by a second sockhold.
    let mut second = start(&["-l", &sock_arg, "--", &fixture]);
    assert_eq!(second.exit_code(), 1);
    assert!(second.log().iter().any(|l| l.contains("is in use")), "{:#?}", second.log());
    assert!(sock.exists(), "the refused instance left the live socket alone");
    s.signal(SIGTERM);
    assert_eq!(s.exit_code(), 0);
    assert!(!sock.exists(), "socket file removed at exit");
    assert!(!pid_file.exists(), "pid file removed at exit");
}

#[test]
fn idle_sockhold_does_not_wake_up() {
    let mut s = start_fixture(&[], &["--ready"]);
    s.expect_event("start", 1);
    s.expect_ready();
    // The fixture follows READY=1 with a BARRIER=1 and reports once sockhold has answered it:
    // after that, nothing more is on its way to sockhold.
    s.expect_event("ready-sent", 1);
    let pid = s.pid();
    // Every wakeup from poll ends in a voluntary context switch when sockhold sleeps again;
    // preemption while it runs (nonvoluntary) is the machine's business, not a wakeup.
    let wakeups = || -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let line = status.lines().find(|l| l.starts_with("voluntary_ctxt_switches")).unwrap();
        line.split_whitespace().last().unwrap().parse().unwrap()
    };
    let in_poll = || {
        let wchan = std::fs::read_to_string(format!("/proc/{pid}/wchan")).unwrap_or_default();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let sleeping =
            stat.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('S'));
        // Where the kernel hides symbol names, wchan reads "0": then sleeping is all we see.
        wchan.contains("poll") || (sleeping && !wchan.chars().any(|c| c.is_alphabetic()))
    };
    // No event says "back in poll": wait for the kernel to show it sleeping there.
    wait_until("sockhold sleeps in poll", in_poll);
    let before = wakeups();
    // A measurement window, not a synchronisation: nothing is expected to happen in it.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let after = wakeups();
    assert_eq!(after, before, "sockhold woke up {} times while idle", after - before);
    assert!(in_poll(), "still asleep in poll");
}

#[test]
fn json_logs_are_one_object_per_line() {
    let mut s = start_fixture(&["--log-format", "json"], &["--ready"]);
    s.expect_log("\"msg\":\"generation 1 (pid");
    s.expect_ready();
    s.signal(SIGTERM);
    assert_eq!(s.exit_code(), 0);
    for line in s.log() {
        let value: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        for field in ["ts", "level", "pid", "name", "msg"] {
            assert!(!value[field].is_null(), "{field} missing in {line}");
        }
        assert_eq!(value["name"], "fixture");
    }
    assert!(s.log().iter().any(|l| l.contains("stopped: exit status 0")));
}

#[test]
fn lazy_starts_the_first_child_on_the_first_connection_which_it_serves() {
    let dir = tempfile::tempdir().unwrap();
    let control = dir.path().join("control.sock");
    let control_arg = control.to_str().unwrap().to_string();
    let mut s = start_fixture(&["--lazy", "--control", &control_arg], &["--ready", "--serve"]);
    let port = s.listening_port("127.0.0.1:");
    let waiting = s.expect_manager("READY=1 while waiting", |m| m.starts_with("READY=1"));
    assert!(waiting.contains("waiting for the first connection"), "{waiting}");
    let status = ctl_status(&control);
    assert_eq!(
        status["generations"].as_array().map(Vec::len),
        Some(0),
        "nothing started: {status}"
    );
    // The connection that wakes sockhold is the one the first child answers.
    let pid = http_get(port).expect("the first connection is served");
    let start = s.expect_event("start", 1);
    assert_eq!(pid as i64, pid_of(&start));
    s.signal(SIGTERM);
    assert_eq!(s.exit_code(), 0);
}

#[test]
fn lazy_starts_on_the_first_datagram_and_leaves_it_for_the_child() {
    let Some(ss) = require_tool("ss", "iproute2") else {
        return;
    };
    let fixture = fixture();
    #[rustfmt::skip]
    let mut s = start(&["--lazy", "-l", "udp://127.0.0.1:0", "--ready", "notify", "--", &fixture, "--ready"]);
    let port = s.listening_port("udp://127.0.0.1:");
    s.expect_manager("READY=1 while waiting", |m| m.contains("waiting for the first connection"));
    let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    client.send_to(b"wake up", ("127.0.0.1", port)).unwrap();
    let start = s.expect_event("start", 1);
    assert_eq!(start["fds"][3]["socket"]["type"], "dgram");
    // sockhold never reads from the socket: the datagram still waits in its queue for the child.
    let queued = std::process::Command::new(ss)
        .args(["-u", "-a", "-n", "-H", &format!("sport = :{port}")])
        .output()
        .expect("ss");
    let queued = String::from_utf8_lossy(&queued.stdout);
    let recv_q: u64 = queued.split_whitespace().nth(1).and_then(|q| q.parse().ok()).unwrap_or(0);
    assert!(recv_q > 0, "the waking datagram is still queued: {queued}");
    s.signal(SIGTERM);
    assert_eq!(s.exit_code(), 0);
}

/// A realtime stop signal is sent, and the child it kills (the fixture has no handler for it)
/// counts as stopped cleanly: nix's wait could not even decode such a death.
#[test]
fn a_realtime_stop_signal_stops_the_child_cleanly() {
    let mut s = start_fixture(&["--stop-signal", "RTMIN+1"], &["--ready"]);
    let first = s.expect_event("start", 1);
    s.expect_ready();
    s.signal(SIGTERM);
    s.expect_log(&format!("pid {}", pid_of(&first)));
    s.expect_log("killed by SIGRTMIN+1");
    assert_eq!(s.exit_code(), 0);
}

/// `ctl signal RTMIN+3` and a realtime signal sent to sockhold both reach the serving child;
/// sockhold reaps it, names the signal, and restarts it.
#[test]
fn realtime_signals_reach_the_serving_child_by_ctl_and_by_forwarding() {
    let dir = tempfile::tempdir().unwrap();
    let control = dir.path().join("control.sock");
    let mut s = start_fixture(&["--control", control.to_str().unwrap()], &["--ready"]);
    let first = s.expect_event("start", 1);
    s.expect_ready();
    let sent = ctl(&control, &["signal", "SIGRTMIN+3"]);
    assert!(sent.status.success(), "{}", String::from_utf8_lossy(&sent.stderr));
    let out = String::from_utf8_lossy(&sent.stdout);
    assert!(out.contains(&format!("sent SIGRTMIN+3 to pid {}", pid_of(&first))), "{out}");
    s.expect_log("killed by SIGRTMIN+3");
    let second = s.expect("the restarted child", |v| v["event"] == "start");
    s.expect_ready();

    // SIGRTMAX-2 to sockhold itself, which forwards it. (nix's kill cannot send a realtime
    // signal; the kill command can.)
    let kill = std::process::Command::new("kill")
        .args(["-s", &(nix::libc::SIGRTMAX() - 2).to_string(), &s.pid().to_string()])
        .status()
        .expect("kill");
    assert!(kill.success());
    s.expect_log(&format!("pid {}", pid_of(&second)));
    s.expect_log("killed by SIGRTMAX-2");
    s.expect("the child restarted again", |v| v["event"] == "start");
    s.expect_ready();
    s.signal(SIGTERM);
    assert_eq!(s.exit_code(), 0);
}

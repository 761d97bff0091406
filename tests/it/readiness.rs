//! Readiness for servers that never send READY=1 (`--ready http:` and `exec:`), the watchdog, and
//! several workers per generation.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use nix::sys::signal::Signal::{SIGHUP, SIGKILL, SIGSTOP, SIGTERM};
use nix::sys::signal::kill;
use nix::unistd::Pid;
use serde_json::Value;

use crate::support::*;

#[test]
fn http_readiness_reloads_a_server_without_notify_support_under_load_with_zero_failures() {
    let httpd = example("httpd").to_string_lossy().into_owned();
    let mut s = start(&[
        "-l",
        "127.0.0.1:0",
        "--ready",
        "http:/healthz",
        "--probe-interval",
        "50ms",
        "--stop-timeout",
        "10s",
        "--",
        &httpd,
        "--no-notify",
    ]);
    let port = s.listening_port("127.0.0.1:");
    s.expect_ready();
    let load = Load::start(port, 4);
    for generation in 2..=11 {
        s.signal(SIGHUP);
        let ready = s.expect_ready();
        assert!(ready.contains(&format!("generation {generation} ")), "{ready}");
    }
    let (ok, failures, pids) = load.finish();
    eprintln!("{ok} requests succeeded across 10 reloads, answered by {} pids", pids.len());
    assert!(
        failures.is_empty(),
        "{} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(10)]
    );
    assert!(ok >= 100 && pids.len() >= 2, "the load ran: {ok} requests, pids {pids:?}");
    // The server never spoke sd_notify: every promotion came from a probe.
    s.signal(SIGTERM);
    assert_eq!(s.exit_code(), 0);
    // Everything it logged is in by now.
    assert!(!s.log().iter().any(|l| l.contains("sent READY=1")), "httpd --no-notify sent READY=1");
}

#[test]
fn a_new_child_whose_health_check_answers_500_is_never_promoted() {
    let dir = tempfile::tempdir().expect("temp dir");
    let control = dir.path().join("ctl.sock");
    let health = dir.path().join("health");
    std::fs::write(&health, "200").expect("write");
    let httpd = example("httpd").to_string_lossy().into_owned();
    // The health status each new child answers with is read from a file at its start.
    let script = r#"exec "$0" --no-notify --health-status "$(cat "$1")""#;
    let mut s = start(&[
        "-l",
        "127.0.0.1:0",
        "--ready",
        "http:/healthz",
        "--ready-timeout",
        "2s",
        "--probe-interval",
        "100ms",
        "--control",
        control.to_str().expect("utf-8"),
        "--",
        "sh",
        "-c",
        script,
        &httpd,
        health.to_str().expect("utf-8"),
    ]);
    let port = s.listening_port("127.0.0.1:");
    s.expect_ready();
    let first = http_get(port).expect("generation 1 serves");

    std::fs::write(&health, "500").expect("write");
    let reload = ctl(&control, &["reload"]);
    let stderr = String::from_utf8_lossy(&reload.stderr);
    assert_eq!(reload.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("was not ready within 2s (last probe: the health check answered 500 Internal Server Error)"),
        "{stderr}"
    );
    // The answer comes when generation 2 is killed; status lists it until it is reaped.
    let killed = s.expect_log(") was killed");
    assert!(killed.contains("generation 2 (pid"), "{killed}");
    assert!(s.log().iter().all(|l| !l.contains("generation 2") || !l.contains("is ready")));
    let st = ctl_status(&control);
    let generations = st["generations"].as_array().expect("generations");
    assert_eq!(generations.len(), 1, "only generation 1 is left: {st}");
    assert_eq!(generations[0]["id"], 1);
    assert_eq!(generations[0]["state"], "serving");
    assert_eq!(generations[0]["pids"][0], first);
    assert_eq!(http_get(port), Ok(first), "generation 1 still serves");

    std::fs::write(&health, "200").expect("write");
    let reload = ctl(&control, &["reload"]);
    assert!(reload.status.success(), "{}", String::from_utf8_lossy(&reload.stderr));
    s.signal(SIGTERM);
    assert_eq!(s.exit_code(), 0);
}

#[test]
fn exec_readiness_retries_the_command_with_the_childs_pid_until_it_exits_0() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (log, flag) = (dir.path().join("probes"), dir.path().join("ready"));
    let probe = format!(
        r#"exec:sh -c "echo $SOCKHOLD_CHILD_PID $SOCKHOLD_GENERATION >> '{}'; test -e '{}'""#,
        log.display(),
        flag.display()
    );
    let fixture = fixture();
    let mut s = start(&[
        "-l",
        "127.0.0.1:0",
        "--ready",
        &probe,
        "--probe-interval",
        "20ms",
        "--",
        &fixture,
    ]);
    let child = pid_of(&s.expect_event("start", 1));
    let lines = || std::fs::read_to_string(&log).unwrap_or_default().lines().count();
    wait_until("the probe has run three times", || lines() >= 3);
    assert!(!s.log().iter().any(|l| l.contains("is ready")), "promoted before the probe passed");
    std::fs::write(&flag, "").expect("write flag");
    s.expect_log(&format!("generation 1 (pid {child}) is ready"));
    let seen = std::fs::read_to_string(&log).expect("probe log");
    for line in seen.lines() {
        assert_eq!(
            line,
            format!("{child} 1"),
            "every probe was told the child's pid and generation"
        );
    }
    s.signal(SIGTERM);
    assert_eq!(s.exit_code(), 0);
}

#[test]
fn the_watchdog_is_handed_to_the_child_with_its_own_pid() {
    let mut s = start_fixture(&["--watchdog", "10s"], &["--ready"]);
    let start = s.expect_event("start", 1);
    assert_eq!(start["env"]["WATCHDOG_USEC"], "10000000", "{start}");
    assert_eq!(start["env"]["WATCHDOG_PID"], pid_of(&start).to_string(), "{start}");
    s.signal(SIGTERM);
    assert_eq!(s.exit_code(), 0);
}

#[test]
fn a_stopped_child_misses_its_watchdog_and_is_replaced() {
    let httpd = example("httpd").to_string_lossy().into_owned();
    let mut s = start(&[
        "-l",
        "127.0.0.1:0",
        "--ready",
        "notify",
        "--watchdog",
        "500ms",
        "--stop-timeout",
        "1s",
        "--",
        &httpd,
    ]);
    let port = s.listening_port("127.0.0.1:");
    s.expect_ready();
    let first = http_get(port).expect("serves");
    kill(Pid::from_raw(first), SIGSTOP).expect("SIGSTOP the child");
    s.expect_log(&format!("generation 1 (pid {first}) missed its watchdog"));
    // A stopped process does not die of SIGABRT: SIGKILL follows at --stop-timeout.
    s.expect_log(&format!("generation 1 (pid {first}) did not stop within 1s"));
    s.expect_log(&format!("generation 1 (pid {first}) ended after its watchdog fired"));
    let ready = s.expect_ready();
    assert!(ready.contains("generation 2 "), "{ready}");
    let second = http_get(port).expect("the replacement serves");
    assert_ne!(second, first);
    s.signal(SIGTERM);
    assert_eq!(s.exit_code(), 0);
}

/// The most children alive at once, from sockhold's own log of starts and ends.
fn max_alive(log: &[String]) -> usize {
    let (mut alive, mut max) = (0usize, 0usize);
    for line in log {
        let ended = [") stopped: ", ") was killed: ", ") exited ", ") ended after"];
        if line.contains("generation") && line.contains(" started (pid ") {
            alive += 1;
        } else if ended.iter().any(|e| line.contains(e)) {
            alive = alive.saturating_sub(1);
        }
        max = max.max(alive);
    }
    max
}

#[test]
fn a_rolling_reload_of_4_workers_never_runs_more_than_5_and_drops_nothing() {
    let dir = tempfile::tempdir().expect("temp dir");
    let control = dir.path().join("ctl.sock");
    let httpd = example("httpd").to_string_lossy().into_owned();
    let mut s = start(&[
        "-l",
        "127.0.0.1:0",
        "--ready",
        "notify",
        "--workers",
        "4",
        "--control",
        control.to_str().expect("utf-8"),
        "--",
        &httpd,
    ]);
    let port = s.listening_port("127.0.0.1:");
    let ready = s.expect_ready();
    assert_eq!(ready.matches(',').count(), 3, "four pids: {ready}");
    let sockhold = s.pid().as_raw();
    // Also count from outside: the children /proc lists for sockhold, sampled throughout.
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut max = 0;
            while !stop.load(Ordering::Relaxed) {
                let path = format!("/proc/{sockhold}/task/{sockhold}/children");
                let n =
                    std::fs::read_to_string(path).unwrap_or_default().split_whitespace().count();
                max = max.max(n);
            }
            max
        })
    };
    let load = Load::start(port, 4);
    for generation in 2..=4 {
        let reload = ctl(&control, &["reload"]);
        assert!(reload.status.success(), "{}", String::from_utf8_lossy(&reload.stderr));
        let st = ctl_status(&control);
        let serving: Vec<&Value> = st["generations"]
            .as_array()
            .expect("generations")
            .iter()
            .filter(|g| g["state"] == "serving")
            .collect();
        assert_eq!(serving.len(), 1, "{st}");
        assert_eq!(serving[0]["id"], generation);
        assert_eq!(serving[0]["pids"].as_array().map(Vec::len), Some(4), "{st}");
    }
    let (ok, failures, _) = load.finish();
    stop.store(true, Ordering::Relaxed);
    let sampled = sampler.join().expect("sampler");
    assert!(
        failures.is_empty(),
        "{} of {ok} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(10)]
    );
    assert!(sampled <= 5, "more than N+1 alive: {sampled} sampled");

    // One crashed worker is replaced alone, in its generation; the others are untouched.
    let pids = |st: Value| -> BTreeSet<i64> {
        st["generations"][0]["pids"]
            .as_array()
            .expect("pids")
            .iter()
            .filter_map(Value::as_i64)
            .collect()
    };
    let before = pids(ctl_status(&control));
    let victim = *before.iter().next().expect("a worker");
    kill(Pid::from_raw(victim as i32), SIGKILL).expect("kill a worker");
    s.expect_log("restarting: starting generation 4");
    wait_until("the replacement is serving", || {
        let st = ctl_status(&control);
        st["generations"].as_array().map(Vec::len) == Some(1)
            && st["generations"][0]["workers"]
                .as_array()
                .is_some_and(|w| w.len() == 4 && w.iter().all(|w| w["state"] == "serving"))
    });
    let after = pids(ctl_status(&control));
    assert_eq!(
        before.intersection(&after).count(),
        3,
        "the other three kept running: {before:?} {after:?}"
    );
    assert!(!after.contains(&victim));
    s.signal(SIGTERM);
    assert_eq!(s.exit_code(), 0);
    // With every line in, the count of children alive by sockhold's own log, over the whole run.
    let logged = max_alive(s.log());
    eprintln!("{ok} requests; at most {logged} children alive by the log, {sampled} sampled");
    assert!(logged <= 5, "more than N+1 alive: {logged} by the log");
    assert!(logged >= 5, "the log count works: it saw the 5th child of each step ({logged})");
}

#[test]
fn an_all_at_once_reload_starts_every_new_worker_before_stopping_the_old_ones() {
    let mut s =
        start_fixture(&["--workers", "3", "--reload-strategy", "all-at-once"], &["--ready"]);
    s.expect_ready();
    s.signal(SIGHUP);
    for _ in 0..3 {
        s.expect_event("start", 2);
    }
    s.expect_ready();
    for _ in 0..3 {
        s.expect_signal(1, "TERM");
    }
    s.expect_log("stopped: ");
    let log = s.log().to_vec();
    let third_ready = log
        .iter()
        .rposition(|l| l.contains("generation 2 (pid") && l.contains("is ready"))
        .expect("ready");
    let first_stop = log
        .iter()
        .position(|l| l.contains("generation 1 (pid") && l.contains("stopped"))
        .unwrap_or(usize::MAX);
    assert!(third_ready < first_stop, "no old worker stopped before all new ones were ready");
    s.signal(SIGTERM);
    assert_eq!(s.exit_code(), 0);
}

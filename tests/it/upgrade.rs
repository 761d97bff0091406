//! Self-upgrade: sockhold re-executes a new binary in place (SIGUSR2, `ctl upgrade`) without a
//! failed request, with the same pid, the same children and the same history; a target that
//! is missing, broken or of another state format is refused and everything keeps running.

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use nix::sys::signal::Signal::{SIGTERM, SIGUSR2};
use serde_json::Value;

use crate::support::*;

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `ctl upgrade`, which must succeed; checks its answer names sockhold's pid.
fn upgrade_ok(control: &Path, pid: i32) {
    let out = ctl(control, &["upgrade"]);
    assert!(out.status.success(), "ctl upgrade failed: {}", stderr(&out));
    assert!(
        stdout(&out).contains(&format!("pid {pid} unchanged")),
        "ctl upgrade: {}",
        stdout(&out)
    );
}

/// `ctl upgrade`, which must fail naming `reason`.
fn upgrade_refused(control: &Path, reason: &str) {
    let out = ctl(control, &["upgrade"]);
    assert_eq!(out.status.code(), Some(1), "ctl upgrade: {}", stdout(&out));
    assert!(stderr(&out).contains(reason), "expected {reason:?} in: {}", stderr(&out));
}

/// The program sockhold's pid runs now.
fn exe_of(pid: i32) -> PathBuf {
    std::fs::read_link(format!("/proc/{pid}/exe")).expect("/proc/PID/exe")
}

/// A copy of the sockhold binary under test, to upgrade to: a different file, so a test can
/// tell which one runs.
fn copy_of_sockhold(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::copy(sockhold_bin(), &path).expect("copy sockhold");
    path
}

fn write_script(path: &Path, body: &str) {
    // Write under another name and rename: the path may be a program that ran a moment ago.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("#!/bin/sh\n{body}\n")).expect("script");
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::fs::rename(&tmp, path).expect("rename");
}

/// The generations as status lists them: (id, pids, state).
fn generations(status: &Value) -> Vec<(u64, Value, String)> {
    status["generations"]
        .as_array()
        .expect("generations")
        .iter()
        .map(|g| {
            (g["id"].as_u64().unwrap(), g["pids"].clone(), g["state"].as_str().unwrap().into())
        })
        .collect()
}

#[test]
fn upgrades_under_load_lose_no_request_and_keep_the_pid_the_children_and_the_history() {
    let dir = tempfile::tempdir().unwrap();
    let control = dir.path().join("ctl.sock");
    let next = copy_of_sockhold(dir.path(), "sockhold-next");
    let (mut s, pid, port, _) = under_load(&control, &next);
    // Some history for the new program to keep: a reload.
    assert!(ctl(&control, &["reload"]).status.success());
    wait_until("generation 1 is gone", || {
        ctl_status(&control)["generations"].as_array().map(Vec::len) == Some(1)
    });
    let before = ctl_status(&control);

    let load = Load::start(port, 4);
    for _ in 0..3 {
        upgrade_ok(&control, pid);
    }
    assert_eq!(exe_of(pid), next, "the new binary runs");
    // SIGUSR2 does the same.
    s.signal(SIGUSR2);
    s.expect_log("received SIGUSR2");
    let after = ctl_status(&control);
    assert_eq!(after["upgrades"]["count"], 4, "{after}");
    let (ok, failures, pids) = load.finish();
    eprintln!("{ok} requests across 4 upgrades, answered by {pids:?}");
    assert!(
        failures.is_empty(),
        "{} requests failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(ok >= 50, "the load ran ({ok} requests)");

    // Same pid, same children, same history.
    assert_eq!(after["pid"], pid);
    assert_eq!(generations(&after), generations(&before), "the children are untouched");
    let serving = before["generations"][0]["pids"][0].as_i64().unwrap() as i32;
    assert_eq!(pids, BTreeSet::from([serving]), "only the child from before answered");
    for key in ["started", "last_reload", "restarts", "listeners", "name"] {
        assert_eq!(after[key], before[key], "{key} is kept");
    }

    // The new program supervises: a reload and a stop work.
    let out = ctl(&control, &["reload"]);
    assert!(out.status.success(), "reload after the upgrade: {}", stderr(&out));
    assert!(stdout(&out).contains("generation 3 serves"), "{}", stdout(&out));
    s.signal(SIGTERM);
    assert_eq!(s.exit_code(), 0);
    assert!(!control.exists(), "the new program removed the control socket");
}

#[test]
fn an_upgrade_to_a_missing_or_broken_binary_leaves_everything_running() {
    let dir = tempfile::tempdir().unwrap();
    let control = dir.path().join("ctl.sock");
    let next = dir.path().join("sockhold-next");
    let fixture = fixture();
    let mut s = start(&[
        "-l",
        "127.0.0.1:0",
        "--ready",
        "notify",
        "--control",
        control.to_str().unwrap(),
        "--upgrade-binary",
        next.to_str().unwrap(),
        "--",
        &fixture,
        "--ready",
    ]);
    let pid = s.pid().as_raw();
    let exe = exe_of(pid);
    let child = pid_of(&s.expect_event("start", 1));
    s.expect_ready();
    let before = ctl_status(&control);

    upgrade_refused(&control, "No such file or directory");
    std::fs::write(&next, "not a program").unwrap();
    upgrade_refused(&control, "it is not executable");
    write_script(&next, "exit 1");
    upgrade_refused(&control, "--upgrade-check` failed (exit status: 1)");
    write_script(&next, r#"echo '{"sockhold_state_format":999,"version":"9.0.0"}'"#);
    let check = Command::new(sockhold_bin()).arg("--upgrade-check").output().unwrap();
    let answer: Value = serde_json::from_slice(&check.stdout).expect("--upgrade-check's answer");
    let format = &answer["sockhold_state_format"];
    upgrade_refused(
        &control,
        &format!("it reads upgrade state format 999, and this sockhold writes format {format}"),
    );
    // Passes the check, then would not take the command line: the dry run says so.
    let real = sockhold_bin();
    write_script(
        &next,
        &format!(
            "[ \"$1\" = --upgrade-check ] && exec {0} --upgrade-check\nexec {0} --no-such-flag \"$@\"",
            real.display()
        ),
    );
    upgrade_refused(&control, "failed its dry run: exit status 1: the command line: ");
    // Passes the check and the dry run, then cannot take over: it goes back to the old program.
    write_script(
        &next,
        &format!(
            "[ \"$1\" = --upgrade-check ] && exec {0} --upgrade-check\n[ -n \"$SOCKHOLD_UPGRADE_DRY_RUN\" ] && exec {0} \"$@\"\nexec {0} --no-such-flag \"$@\"",
            real.display()
        ),
    );
    upgrade_refused(&control, "the new program refuses the command line");
    s.expect_log("going back to the old program");
    // SIGUSR2 is refused the same way, in the log.
    std::fs::remove_file(&next).unwrap();
    std::fs::create_dir(&next).unwrap();
    s.signal(SIGUSR2);
    s.expect_log("it is not a regular file");

    let after = ctl_status(&control);
    assert_eq!(after["pid"], pid);
    assert_eq!(exe_of(pid), exe, "the old binary still runs");
    assert_eq!(generations(&after), generations(&before));
    assert_eq!(after["upgrades"]["last"]["ok"], false, "{after}");
    assert!(!s.seen(|v| v["event"] == "signal"), "the child got no signal");
    assert!(!process_dead(child));

    // A good binary at last: the upgrade works after all those failures.
    std::fs::remove_dir(&next).unwrap();
    std::fs::copy(sockhold_bin(), &next).unwrap();
    upgrade_ok(&control, pid);
    assert_eq!(exe_of(pid), next);
    s.signal(SIGTERM);
    s.expect_signal(1, "TERM");
    assert_eq!(s.exit_code(), 0);
}

#[test]
fn deadlines_and_waiting_clients_carry_over_an_upgrade() {
    let dir = tempfile::tempdir().unwrap();
    let control = dir.path().join("ctl.sock");
    let fixture = fixture();
    // Generation 1 ignores TERM (its SIGKILL deadline runs across the upgrade); generation 2
    // is ready, generation 3 never is (its ready deadline, and the `ctl reload` waiting for
    // it, carry over).
    let mut s = start(&[
        "-l",
        "127.0.0.1:0",
        "--ready",
        "notify",
        "--control",
        control.to_str().unwrap(),
        "--stop-timeout",
        "3s",
        "--ready-timeout",
        "3s",
        "--",
        &fixture,
        "--ready-gen",
        "1",
        "--ready-gen",
        "2",
        "--ignore-term-gen",
        "1",
    ]);
    let pid = s.pid().as_raw();
    let first = pid_of(&s.expect_event("start", 1));
    s.expect_ready();
    assert!(ctl(&control, &["reload"]).status.success());
    s.expect_signal(1, "TERM");
    let reload = Command::new(sockhold_bin())
        .args(["ctl", "--control", control.to_str().unwrap(), "reload"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("ctl reload");
    let third = pid_of(&s.expect_event("start", 3));
    let before = ctl_status(&control);
    let states: Vec<String> = generations(&before).into_iter().map(|g| g.2).collect();
    assert_eq!(states, ["stopping", "serving", "starting"], "{before}");

    upgrade_ok(&control, pid);
    s.expect_log("did not stop within 3s; sending SIGKILL");
    let log = s.log();
    let position = |needle: &str| {
        log.iter().position(|l| l.contains(needle)).unwrap_or_else(|| panic!("no {needle:?}"))
    };
    assert!(
        position("upgraded in place") < position("did not stop within"),
        "the new program kept the deadline and fired it"
    );
    let out = reload.wait_with_output().expect("ctl reload");
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("generation 3"), "{}", stderr(&out));
    assert!(stderr(&out).contains("was not ready within 3s"), "{}", stderr(&out));
    // The reload is answered when generation 3's deadline fires; it and generation 1 leave the
    // status once they are reaped.
    s.expect_log(&format!("generation 1 (pid {first}) was killed"));
    s.expect_log(&format!("generation 3 (pid {third}) was killed"));
    let after = ctl_status(&control);
    assert_eq!(generations(&after).len(), 1, "{after}");
    assert_eq!(after["generations"][0]["id"], 2);
    s.signal(SIGTERM);
    assert_eq!(s.exit_code(), 0);
}

#[test]
fn twenty_upgrades_leave_sockhold_with_the_same_fds() {
    let dir = tempfile::tempdir().unwrap();
    let control = dir.path().join("ctl.sock");
    let fixture = fixture();
    let mut s = start(&[
        "-l",
        "127.0.0.1:0",
        "-l",
        "127.0.0.1:0",
        "--ready",
        "notify",
        "--control",
        control.to_str().unwrap(),
        "--on-supervisor-death",
        "kill",
        "--",
        &fixture,
        "--ready",
    ]);
    let pid = s.pid().as_raw();
    let child = pid_of(&s.expect_event("start", 1));
    s.expect_ready();
    let fds = || -> Vec<String> {
        let mut kinds: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .expect("/proc/PID/fd")
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .map(|target| {
                // socket:[123] and pipe:[456]: the kind, not the inode.
                let text = target.to_string_lossy().into_owned();
                text.split(':').next().unwrap_or_default().to_string()
            })
            .collect();
        kinds.sort();
        kinds
    };
    let rss = || -> String {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        status.lines().find(|l| l.starts_with("VmRSS")).unwrap_or_default().to_string()
    };
    let before = fds();
    let rss_before = rss();
    for _ in 0..20 {
        upgrade_ok(&control, pid);
    }
    // The last program keeps the state and the old binary open while it is on probation.
    s.expect_log("probation over (its time is up)");
    // The last ctl's connection closes on sockhold's side when it sees the end of it.
    wait_until("sockhold holds the fds it held before", || fds() == before);
    eprintln!("fds: {before:?}; {rss_before} before 20 upgrades, {} after", rss());
    assert_eq!(ctl_status(&control)["upgrades"]["count"], 20);
    // An execve of sockhold is not its death: the death signal never fired.
    assert!(!process_dead(child), "the child outlived 20 upgrades");
    assert!(!s.seen(|v| v["event"] == "exit"), "the child did not exit");
    s.signal(SIGTERM);
    assert_eq!(s.exit_code(), 0);
}

/// A sockhold under load (the example httpd, ready by notify) with a control socket and
/// `--upgrade-binary next`: (sockhold, its pid, the port, the status before).
fn under_load(control: &Path, next: &Path) -> (Sockhold, i32, u16, Value) {
    let httpd = example("httpd").to_string_lossy().into_owned();
    let mut s = start(&[
        "-l",
        "127.0.0.1:0",
        "--ready",
        "notify",
        "--control",
        control.to_str().unwrap(),
        "--upgrade-binary",
        next.to_str().unwrap(),
        "--",
        &httpd,
    ]);
    let pid = s.pid().as_raw();
    let port = s.listening_port("127.0.0.1:");
    s.expect_ready();
    let before = ctl_status(control);
    (s, pid, port, before)
}

/// After a refused or failed upgrade: the same pid runs the same binary with the same children,
/// the load lost nothing, and the old program still answers and reloads.
fn everything_runs_on(s: &mut Sockhold, control: &Path, pid: i32, before: &Value, load: Load) {
    let after = ctl_status(control);
    assert_eq!(after["pid"], pid);
    assert_eq!(exe_of(pid), sockhold_bin().canonicalize().unwrap(), "the old binary runs");
    assert_eq!(generations(&after), generations(before), "the children are untouched");
    assert_eq!(after["upgrades"]["last"]["ok"], false, "{after}");
    let (ok, failures, pids) = load.finish();
    eprintln!("{ok} requests, answered by {pids:?}");
    assert!(
        failures.is_empty(),
        "{} requests failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(ok >= 20, "the load ran ({ok} requests)");
    let serving = before["generations"][0]["pids"][0].as_i64().unwrap() as i32;
    assert_eq!(pids, BTreeSet::from([serving]), "only the child from before answered");
    let out = ctl(control, &["reload"]);
    assert!(out.status.success(), "reload after the failed upgrade: {}", stderr(&out));
    assert!(stdout(&out).contains("generation 2 serves"), "{}", stdout(&out));
    s.signal(SIGTERM);
    assert_eq!(s.exit_code(), 0);
}

#[test]
fn a_target_that_crashes_or_hangs_in_its_dry_run_is_refused_and_nothing_is_touched() {
    let dir = tempfile::tempdir().unwrap();
    let control = dir.path().join("ctl.sock");
    let next = dir.path().join("sockhold-next");
    let pids = dir.path().join("pids");
    let real = sockhold_bin();
    // Answers --upgrade-check as sockhold does, and crashes on anything else.
    write_script(
        &next,
        &format!(
            "case \"$1\" in --upgrade-check) exec {} --upgrade-check;; *) kill -SEGV $$;; esac",
            real.display()
        ),
    );
    let (mut s, pid, port, before) = under_load(&control, &next);
    let load = Load::start(port, 4);
    // SIGUSR2 first: its refusal is then the first such line in the log.
    s.signal(SIGUSR2);
    s.expect_log("failed its dry run: killed by signal 11 (SIGSEGV)");
    upgrade_refused(
        &control,
        &format!(
            "upgrade failed: {} failed its dry run: killed by signal 11 (SIGSEGV)",
            next.display()
        ),
    );

    // Hangs in its dry run, with a process of its own: both are killed at the deadline.
    write_script(
        &next,
        &format!(
            "case \"$1\" in --upgrade-check) exec {0} --upgrade-check;; esac\nsleep 1000 &\necho $$ $! > {1}.tmp && mv {1}.tmp {1}\nwait",
            real.display(),
            pids.display()
        ),
    );
    let asked = std::time::Instant::now();
    upgrade_refused(&control, "failed its dry run: it did not finish within 5s");
    let took = asked.elapsed();
    assert!(took < std::time::Duration::from_secs(8), "refused after {took:?}");
    let text = std::fs::read_to_string(&pids).expect("the dry run ran");
    for hung in text.split_whitespace() {
        let hung: i64 = hung.parse().unwrap();
        wait_until("the hanging dry run is gone", || process_dead(hung));
    }
    everything_runs_on(&mut s, &control, pid, &before, load);
}

/// `DIR/sockhold-next`: the real sockhold, made to crash (`how`, see
/// `SOCKHOLD_TEST_CRASH_AFTER_TAKEOVER`) once it has taken over; its `--upgrade-check` and dry
/// run pass.
fn crashing_target(dir: &Path, how: &str) -> PathBuf {
    let next = dir.join("sockhold-next");
    write_script(
        &next,
        &format!(
            "[ \"$1\" = --upgrade-check ] && exec {0} --upgrade-check\nSOCKHOLD_TEST_CRASH_AFTER_TAKEOVER={how} exec {0} \"$@\"",
            sockhold_bin().display()
        ),
    );
    next
}

/// Upgrades to a real sockhold that crashes (`how`: `segv` or `panic`) a moment after it took
/// over: the old program comes back in place and says why.
fn crash_after_takeover(how: &str, reason: &str) {
    let dir = tempfile::tempdir().unwrap();
    let control = dir.path().join("ctl.sock");
    let next = crashing_target(dir.path(), how);
    let (mut s, pid, port, before) = under_load(&control, &next);
    let load = Load::start(port, 4);
    upgrade_refused(&control, &format!("upgrade failed: {reason}"));
    s.expect_log("on probation for 10s");
    s.expect_log(&format!("upgrade to {} failed: {reason}", next.display()));
    // SIGUSR2 the same way, in the log: the same report a second time.
    s.signal(SIGUSR2);
    s.expect_log_times(&format!("upgrade to {} failed: {reason}", next.display()), 2);
    everything_runs_on(&mut s, &control, pid, &before, load);
}

#[test]
fn a_new_program_killed_by_sigsegv_after_taking_over_goes_back_to_the_old_one() {
    crash_after_takeover("segv", "new program crashed: killed by signal 11 (SIGSEGV)");
}

#[test]
fn a_new_program_that_panics_after_taking_over_goes_back_to_the_old_one() {
    crash_after_takeover("panic", "new program panicked: crashing for a test");
}

#[test]
fn a_new_program_whose_stack_overflows_after_taking_over_goes_back_to_the_old_one() {
    // The handler runs on a stack of its own: the overflowed one has no room left.
    crash_after_takeover("stack", "new program crashed: killed by signal 11 (SIGSEGV)");
}

#[test]
fn a_crash_after_the_upgrade_was_answered_still_goes_back_to_the_old_one() {
    let dir = tempfile::tempdir().unwrap();
    let control = dir.path().join("ctl.sock");
    let next = crashing_target(dir.path(), "segv-later");
    let (mut s, pid, port, before) = under_load(&control, &next);
    let load = Load::start(port, 4);
    // The new program answers, then crashes on its next turn (the ctl connection closing wakes
    // it): the state it hands back no longer names the answered client.
    upgrade_ok(&control, pid);
    s.expect_log(&format!(
        "upgrade to {} failed: new program crashed: killed by signal 11 (SIGSEGV)",
        next.display()
    ));
    everything_runs_on(&mut s, &control, pid, &before, load);
}

/// The state is typed and exact: a target that passes `--upgrade-check` but whose dry run finds
/// a field it does not know is refused before the handover, with serde's reason naming the field,
/// and the old program goes on as if nothing had been asked.
#[test]
fn a_target_that_does_not_understand_the_state_is_refused_before_the_handover() {
    let dir = tempfile::tempdir().unwrap();
    let control = dir.path().join("ctl.sock");
    let next = dir.path().join("sockhold-next");
    let rewritten = dir.path().join("state.json");
    let ran = dir.path().join("ran");
    let real = sockhold_bin();
    // A real sockhold, handed the state with one field its format does not have: the state as
    // a newer program's could look.
    write_script(
        &next,
        &format!(
            r#"[ "$1" = --upgrade-check ] && exec {real} --upgrade-check
echo "dry run: ${{SOCKHOLD_UPGRADE_DRY_RUN:-no}}" >> {ran}
sed 's/"supervisor":{{/"supervisor":{{"new_bookkeeping":1,/' /proc/self/fd/$SOCKHOLD_UPGRADE_FD > {rewritten}
exec 9< {rewritten}
SOCKHOLD_UPGRADE_FD=9 exec {real} "$@""#,
            real = real.display(),
            ran = ran.display(),
            rewritten = rewritten.display(),
        ),
    );
    let (mut s, pid, port, before) = under_load(&control, &next);
    let load = Load::start(port, 4);
    upgrade_refused(
        &control,
        &format!(
            "upgrade failed: {} failed its dry run: exit status 1: the state is not one this sockhold understands: unknown field `new_bookkeeping`",
            next.display()
        ),
    );
    let text = std::fs::read_to_string(&rewritten).expect("the dry run rewrote the state");
    assert!(text.contains(r#""supervisor":{"new_bookkeeping":1,"units":["#), "{text}");
    let runs = std::fs::read_to_string(&ran).expect("the target ran");
    assert_eq!(runs, "dry run: 1\n", "only the dry run ran: nothing was handed over");
    everything_runs_on(&mut s, &control, pid, &before, load);
}

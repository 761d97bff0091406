//! Every exit code sockhold promises, and the messages that go with the usage errors.

use nix::sys::signal::Signal::{SIGKILL, SIGTERM};

use crate::support::*;

#[test]
fn usage_errors_exit_2_and_name_the_input() {
    let fixture = fixture();
    for (args, needle) in [
        (vec!["-l", "127.0.0.1:99999", "--", &fixture], "invalid listen spec '127.0.0.1:99999'"),
        (vec!["-l", "tcp://", "--", &fixture], "invalid listen spec 'tcp://'"),
        (vec!["-l", "unix://relative", "--", &fixture], "must be absolute"),
        (vec!["-l", "8080,backlog=abc", "--", &fixture], "backlog"),
        (vec!["-l", "8080,bogus=1", "--", &fixture], "unknown option 'bogus'"),
        (vec!["-l", "8080,name=a:b", "--", &fixture], "name"),
        (vec!["--", &fixture], "--listen"),
        (vec!["-l", "8080"], "COMMAND"),
        (
            vec!["-l", "8080", "--ready", "sometime", "--", &fixture],
            "'sometime' is not a ready mode",
        ),
        (vec!["-l", "8080", "--stop-signal", "NOPE", "--", &fixture], "'NOPE' is not a signal"),
        (vec!["-l", "8080", "--stop-timeout", "soon", "--", &fixture], "'soon' is not a duration"),
        (
            vec!["-l", "8080", "--stop-timeout", "18446744073709551615", "--", &fixture],
            "'18446744073709551615' is too long a duration",
        ),
        (vec!["-l", "8080", "--restart", "sometimes", "--", &fixture], "sometimes"),
        (vec!["-l", "8080", "--name", "a:b", "--", &fixture], "invalid --name 'a:b'"),
        // Taken as the command, it used to bind the socket, then fail with 127.
        (vec!["-l", "127.0.0.1:0", "--bogus", "1", "--", &fixture], "'--bogus'"),
        (vec!["-l", "127.0.0.1:0", "--bogus", &fixture], "'--bogus'"),
        (
            vec!["-l", "8080", "--ready", "delay:5s", "--ready-timeout", "5s", "--", &fixture],
            "--ready delay:5s is not shorter than --ready-timeout 5s",
        ),
    ] {
        let (code, stderr) = run_to_end(&args);
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {needle:?} not in {stderr}");
    }
}

/// Without `--`, the words after COMMAND are still the server's, even one that is also a
/// sockhold option: the fixture gets `--ready` and so reports readiness.
#[test]
fn the_options_after_the_command_are_the_servers_without_a_double_dash() {
    let fixture = fixture();
    let mut s = start(&["-l", "127.0.0.1:0", "--ready", "notify", &fixture, "--ready"]);
    s.expect_ready();
    s.signal(SIGTERM);
    assert_eq!(s.exit_code(), 0);
}

#[test]
fn command_not_found_exits_127_and_not_executable_126() {
    let (code, stderr) = run_to_end(&["-l", "127.0.0.1:0", "--", "no-such-command-sockhold-test"]);
    assert_eq!(code, 127, "{stderr}");
    assert!(
        stderr.contains("no-such-command-sockhold-test") && stderr.contains("not found"),
        "{stderr}"
    );

    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("server");
    std::fs::write(&script, "#!/bin/sh\nexit 0\n").unwrap();
    let (code, stderr) = run_to_end(&["-l", "127.0.0.1:0", "--", script.to_str().unwrap()]);
    assert_eq!(code, 126, "{stderr}");
    assert!(stderr.contains("Permission denied"), "{stderr}");
}

/// execve says ENOENT for a script that exists when its interpreter is missing: the error
/// names the interpreter rather than blaming the script.
#[test]
fn a_script_whose_interpreter_is_missing_exits_127_naming_the_interpreter() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("x.sh");
    std::fs::write(&script, "#! /nonexistent/python -u\nprint('hi')\n").unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (code, stderr) = run_to_end(&["-l", "127.0.0.1:0", "--", script.to_str().unwrap()]);
    assert_eq!(code, 127, "{stderr}");
    let want = format!(
        "cannot execute {}: its interpreter /nonexistent/python was not found",
        script.display()
    );
    assert!(stderr.contains(&want), "{want:?} not in {stderr}");

    // Relative to --chdir, as the child finds it.
    #[rustfmt::skip]
    let (code, stderr) = run_to_end(&[
        "-l", "127.0.0.1:0", "--chdir", dir.path().to_str().unwrap(), "--", "./x.sh",
    ]);
    assert_eq!(code, 127, "{stderr}");
    assert!(
        stderr.contains("cannot execute ./x.sh: its interpreter /nonexistent/python"),
        "{stderr}"
    );
}

#[test]
fn a_failed_bind_exits_1_and_names_the_address() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (code, stderr) = run_to_end(&["-l", &addr, "--", &fixture()]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains(&format!("failed to bind {addr}")), "{stderr}");
    assert!(stderr.contains("Address already in use"), "{stderr}");
}

#[test]
fn a_clean_stop_exits_0() {
    let mut s = start_fixture(&[], &["--ready"]);
    s.expect_ready();
    s.signal(SIGTERM);
    assert_eq!(s.exit_code(), 0);
}

#[test]
fn with_restart_never_sockhold_ends_with_the_childs_code() {
    let mut s = start_fixture(&["--restart", "never"], &["--ready", "--exit", "3"]);
    assert_eq!(s.exit_code(), 3);
}

#[test]
fn with_restart_never_a_child_killed_by_a_signal_gives_128_plus_n() {
    let mut s = start_fixture(&["--restart", "never"], &["--ready"]);
    let start = s.expect_event("start", 1);
    s.expect_ready();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid_of(&start) as i32), SIGKILL).unwrap();
    assert_eq!(s.exit_code(), 128 + 9);
}

#[test]
fn a_child_that_exits_0_ends_sockhold_with_0_under_on_failure() {
    let mut s = start_fixture(&[], &["--ready", "--exit", "0"]);
    assert_eq!(s.exit_code(), 0);
}

#[test]
fn repeated_failed_starts_end_sockhold_with_the_childs_code() {
    let mut s = start_fixture(&[], &["--exit", "4"]);
    assert_eq!(s.exit_code(), 4);
    let started = s.log().iter().filter(|l| l.contains(" started (pid ")).count();
    assert_eq!(started, 5, "five tries, then give up: {:#?}", s.log());
    assert!(
        s.log().iter().any(|l| l.contains("giving up after 5 failed starts")),
        "{:#?}",
        s.log()
    );
}

#[test]
fn a_child_that_does_not_stop_is_killed_and_gives_137() {
    let mut s = start_fixture(&["--stop-timeout", "500ms"], &["--ready", "--ignore-term"]);
    s.expect_ready();
    s.signal(SIGTERM);
    s.expect_signal(1, "TERM");
    assert_eq!(s.exit_code(), 137);
}

#[test]
fn a_reload_to_a_command_that_vanished_fails_and_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("server");
    std::os::unix::fs::symlink(example("fixture"), &link).unwrap();
    let link_arg = link.to_str().unwrap().to_string();
    let mut s = start(&["-l", "127.0.0.1:0", "--ready", "notify", "--", &link_arg, "--ready"]);
    s.expect_event("start", 1);
    s.expect_ready();
    std::fs::remove_file(&link).unwrap();
    s.signal(nix::sys::signal::Signal::SIGHUP);
    s.expect_log("generation 2 could not be started");
    let ready = s.expect_manager("READY=1 after the failed reload", |m| m.starts_with("READY=1"));
    assert!(ready.contains("last reload failed"), "{ready}");
    s.signal(nix::sys::signal::Signal::SIGUSR1);
    s.expect_signal(1, "USR1");
    s.signal(SIGTERM);
    assert_eq!(s.exit_code(), 0);
}

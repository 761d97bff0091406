//! The control socket and `sockhold ctl`: every request, the failure of a reload reported to
//! whoever asked, and clients that are malformed, oversized, half-written, slow, not allowed or
//! many, while a load runs without a failed request.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::*;

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Sends raw bytes on a new connection and returns every answer line until sockhold closes.
fn raw(control: &Path, bytes: &[u8], close_write: bool) -> Vec<Value> {
    let mut stream = UnixStream::connect(control).expect("connect");
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    stream.write_all(bytes).unwrap();
    if close_write {
        stream.shutdown(std::net::Shutdown::Write).unwrap();
    }
    let mut out = String::new();
    let _ = stream.read_to_string(&mut out);
    out.lines().map(|l| serde_json::from_str(l).expect("a JSON answer")).collect()
}

#[test]
fn status_reload_signal_and_stop_through_ctl() {
    let dir = tempfile::tempdir().unwrap();
    let control = dir.path().join("run").join("control.sock");
    let control_arg = control.to_str().unwrap().to_string();
    let mut s = start_fixture(&["--control", &control_arg], &["--ready", "--status", "warm"]);
    s.expect_ready();
    let mode = std::fs::metadata(&control).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the control socket is private");

    let status = ctl(&control, &["status"]);
    assert!(status.status.success(), "{}", text(&status.stderr));
    let out = text(&status.stdout);
    assert!(out.contains(&format!("(pid {})", s.pid())), "{out}");
    assert!(out.contains("generation 1: serving"), "{out}");
    assert!(out.contains("status: warm"), "{out}");
    assert!(out.contains("listener fd 3: 127.0.0.1:"), "{out}");

    let reload = ctl(&control, &["reload"]);
    assert!(reload.status.success(), "{}", text(&reload.stderr));
    let second = s.expect_event("start", 2);
    assert!(
        text(&reload.stdout).contains(&format!("generation 2 serves (pid {})", pid_of(&second)))
    );

    let status = ctl_status(&control);
    assert_eq!(status["last_reload"]["ok"], true);
    assert_eq!(status["last_reload"]["generation"], 2);
    assert_eq!(status["version"], env!("CARGO_PKG_VERSION"));
    let serving: Vec<&Value> = status["generations"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|g| g["state"] == "serving")
        .collect();
    assert_eq!(serving.len(), 1);
    assert_eq!(serving[0]["pids"][0].as_i64(), Some(pid_of(&second)));

    let signal = ctl(&control, &["signal", "USR1"]);
    assert!(signal.status.success(), "{}", text(&signal.stderr));
    s.expect_signal(2, "USR1");

    // Upgrading to the same binary: the same pid answers, and then stops as before.
    let upgrade = ctl(&control, &["upgrade"]);
    assert!(upgrade.status.success(), "{}", text(&upgrade.stderr));
    let unchanged = format!("pid {} unchanged", s.pid());
    assert!(text(&upgrade.stdout).contains(&unchanged), "{}", text(&upgrade.stdout));

    let stop = ctl(&control, &["stop"]);
    assert!(stop.status.success(), "{}", text(&stop.stderr));
    assert_eq!(s.exit_code(), 0);
    assert!(!control.exists(), "the control socket is removed at exit");
}

#[test]
fn a_failed_reload_fails_ctl_reload_with_the_reason_and_the_old_child_serves_on() {
    let dir = tempfile::tempdir().unwrap();
    let control = dir.path().join("control.sock");
    let control_arg = control.to_str().unwrap().to_string();
    let mut s = start_fixture(
        &["--control", &control_arg],
        &["--ready-gen", "1", "--ready-gen", "3", "--exit-gen", "2:3"],
    );
    s.expect_ready();
    let reload = ctl(&control, &["reload"]);
    assert_eq!(reload.status.code(), Some(1), "{}", text(&reload.stdout));
    let stderr = text(&reload.stderr);
    assert!(stderr.contains("reload failed: generation 2 (pid"), "{stderr}");
    assert!(stderr.contains("exited before it was ready: exit status 3"), "{stderr}");
    let status = ctl_status(&control);
    assert_eq!(status["last_reload"]["ok"], false);
    assert!(status["last_reload"]["error"].as_str().unwrap().contains("exit status 3"));
    assert_eq!(status["generations"][0]["id"], 1);
    assert_eq!(status["generations"][0]["state"], "serving");
    // The next reload works, and its answer comes only once generation 3 is ready.
    let reload = ctl(&control, &["reload"]);
    assert!(reload.status.success(), "{}", text(&reload.stderr));
    assert!(text(&reload.stdout).contains("generation 3"));
}

#[test]
fn ctl_without_a_sockhold_or_in_an_open_directory_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let missing = ctl(&dir.path().join("nobody.sock"), &["status"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(
        text(&missing.stderr).contains("cannot reach sockhold at"),
        "{}",
        text(&missing.stderr)
    );

    let open = dir.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let path = open.join("c.sock");
    let out = Command::new(sockhold_bin())
        .args(["--control", path.to_str().unwrap(), "-l", "127.0.0.1:0", "--", &fixture()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("is writable by every user"), "{}", text(&out.stderr));
}

/// ctl against a server of its own user that speaks the protocol badly: every request goes out
/// as the protocol writes it, and an answer that is not what was asked for fails ctl, naming the
/// socket, instead of being printed as something else.
#[test]
fn ctl_refuses_an_answer_that_does_not_parse() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let cases: [(&[&str], &str, &str); 5] = [
        (&["status"], r#"{"cmd":"status"}"#, "not json"),
        (&["reload"], r#"{"cmd":"reload"}"#, r#"{"ok":true,"generation":"three"}"#),
        (&["signal", "SIGHUP"], r#"{"cmd":"signal","signal":"HUP"}"#, r#"{"ok":true}"#),
        (&["upgrade"], r#"{"cmd":"upgrade"}"#, r#"{"error":"no ok"}"#),
        (&["reload"], r#"{"cmd":"reload"}"#, r#"{"ok":true,"generation":9,"pid":1}"#),
    ];
    let answers: Vec<&'static str> = cases.iter().map(|c| c.2).collect();
    // The server: one connection per case, each answered with its line; it hands back what it
    // was sent.
    let server = std::thread::spawn(move || {
        let mut got = Vec::new();
        for answer in answers {
            let (stream, _) = listener.accept().unwrap();
            stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut line = String::new();
            BufReader::new(&stream).read_line(&mut line).unwrap();
            got.push(line);
            (&stream).write_all(format!("{answer}\n").as_bytes()).unwrap();
        }
        got
    });
    let mut sent = Vec::new();
    for (args, request, answer) in &cases {
        let out = ctl(&path, args);
        let stderr = text(&out.stderr);
        sent.push(format!("{request}\n"));
        if answer.contains("\"pid\":1") {
            assert_eq!(out.status.code(), Some(0), "{stderr}");
            assert_eq!(text(&out.stdout), "reloaded: generation 9 serves (pid 1)\n");
            continue;
        }
        assert_eq!(out.status.code(), Some(1), "{args:?} answered {answer}: {stderr}");
        assert!(text(&out.stdout).is_empty(), "{}", text(&out.stdout));
        for want in ["sent an answer that does not parse", path.to_str().unwrap(), answer] {
            let want = want.replace('"', "\\\"");
            assert!(stderr.contains(&want), "{want:?} not in {stderr}");
        }
    }
    assert_eq!(server.join().unwrap(), sent);
}

#[test]
fn bad_clients_get_an_error_or_are_dropped_and_nothing_else_is_disturbed() {
    let dir = tempfile::tempdir().unwrap();
    let control = dir.path().join("control.sock");
    let control_arg = control.to_str().unwrap().to_string();
    let httpd = example("httpd").to_string_lossy().into_owned();
    #[rustfmt::skip]
    let mut s = start(&[
        "-l", "127.0.0.1:0", "--ready", "notify", "--control", &control_arg, "--", &httpd,
    ]);
    let port = s.listening_port("127.0.0.1:");
    s.expect_ready();

    // A load runs throughout; none of what follows may fail one of its requests.
    let load = Load::start(port, 1);

    // Garbage is answered with an error, and the connection still serves a good request.
    let answers = raw(&control, b"garbage\n{\"cmd\":\"nope\"}\n{\"cmd\":\"status\"}\n", true);
    assert_eq!(answers.len(), 3, "{answers:?}");
    assert!(answers[0]["error"].as_str().unwrap().contains("invalid JSON"));
    assert!(answers[1]["error"].as_str().unwrap().contains("unknown command"));
    assert_eq!(answers[2]["ok"], true);

    // Oversized: an error, then the connection is closed.
    let big = vec![b'x'; 10_000];
    let answers = raw(&control, &big, false);
    assert_eq!(answers.len(), 1, "{answers:?}");
    assert!(answers[0]["error"].as_str().unwrap().contains("request over 4096 bytes"));

    // Half-written, then closed: told so.
    let answers = raw(&control, b"{\"cmd\":\"sta", true);
    assert_eq!(answers.len(), 1, "{answers:?}");
    assert!(answers[0]["error"].as_str().unwrap().contains("incomplete request"));

    // A slow client holds a half line; meanwhile 50 clients at once are served.
    let mut slow = UnixStream::connect(&control).unwrap();
    slow.write_all(b"{\"cmd\":").unwrap();
    let clients: Vec<_> = (0..50)
        .map(|_| {
            let control = control.clone();
            std::thread::spawn(move || raw(&control, b"{\"cmd\":\"status\"}\n", true))
        })
        .collect();
    for client in clients {
        let answers = client.join().unwrap();
        assert_eq!(answers.len(), 1);
        assert_eq!(answers[0]["ok"], true);
    }
    // Reloads through ctl work meanwhile.
    for _ in 0..3 {
        let reload = ctl(&control, &["reload"]);
        assert!(reload.status.success(), "{}", text(&reload.stderr));
    }
    // The slow client is dropped at the request timeout (10 s) with an error.
    let started = Instant::now();
    slow.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut line = String::new();
    BufReader::new(&slow).read_line(&mut line).unwrap();
    assert!(line.contains("request timed out"), "{line}");
    assert!(started.elapsed() < Duration::from_secs(15));

    // A client of another uid is refused, even when the file's mode would let it in.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&control, std::fs::Permissions::from_mode(0o666)).unwrap();
    let other = Command::new(sockhold_bin())
        .args(["ctl", "--control", &control_arg, "status"])
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    assert_eq!(other.status.code(), Some(1));
    assert!(
        text(&other.stderr).contains("permission denied: uid 65534"),
        "{}",
        text(&other.stderr)
    );

    let (ok, failed, _) = load.finish();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {:?}",
        failed.len(),
        ok,
        &failed[..failed.len().min(5)]
    );
    assert!(ok > 0);
    s.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(s.exit_code(), 0);
    // Every line sockhold logged is in now.
    assert_eq!(
        s.log().iter().filter(|l| l.contains("exited by itself")).count(),
        0,
        "no child disturbed"
    );
}

/// `--control` before or after the request, or from SOCKHOLD_CONTROL; without any, a usage
/// error that says how to give it.
#[test]
fn ctl_takes_the_control_socket_before_or_after_the_request_or_from_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let control = dir.path().join("control.sock");
    let mut s = start_fixture(&["--control", control.to_str().unwrap()], &["--ready"]);
    s.expect_ready();
    let run = |args: &[&str], env: Option<&Path>| {
        let mut cmd = Command::new(sockhold_bin());
        cmd.args(args).env_remove("SOCKHOLD_CONTROL");
        if let Some(path) = env {
            cmd.env("SOCKHOLD_CONTROL", path);
        }
        cmd.output().expect("run sockhold ctl")
    };
    let path = control.to_str().unwrap();
    for (args, env) in [
        (&["ctl", "--control", path, "status", "--json"][..], None),
        (&["ctl", "status", "--control", path, "--json"], None),
        (&["ctl", "status", "--json"], Some(control.as_path())),
    ] {
        let out = run(args, env);
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
        let status: Value = serde_json::from_slice(&out.stdout).expect("a JSON status");
        assert_eq!(status["pid"], s.pid().as_raw(), "{args:?}");
    }
    let out = run(&["ctl", "status"], None);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("give --control PATH"), "{}", text(&out.stderr));
    let help = run(&["ctl", "--help"], None);
    let usage = text(&help.stdout);
    assert!(usage.contains("Usage: sockhold ctl [OPTIONS] <COMMAND>"), "{usage}");
    s.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(s.exit_code(), 0);
}

/// With --accept no child serves: a reload changes what new connections run, and ctl says so
/// instead of "pid null".
#[test]
fn ctl_reload_in_accept_mode_says_what_it_changed() {
    let dir = tempfile::tempdir().unwrap();
    let control = dir.path().join("control.sock");
    #[rustfmt::skip]
    let mut s = start(&[
        "--accept", "-l", "127.0.0.1:0", "--control", control.to_str().unwrap(), "--", &fixture(),
    ]);
    s.expect_manager("READY=1", |m| m.starts_with("READY=1"));
    let reload = ctl(&control, &["reload"]);
    assert!(reload.status.success(), "{}", text(&reload.stderr));
    let out = text(&reload.stdout);
    assert!(out.contains("each connection starts a new child"), "{out}");
    assert!(out.contains("new connections now run as generation 2"), "{out}");
    assert!(!out.contains("null"), "{out}");
    assert_eq!(ctl_status(&control)["last_reload"]["generation"], 2);
    s.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(s.exit_code(), 0);
}

/// With --lazy before the first connection there is nothing to replace, and nothing failed:
/// ctl reload succeeds and says what will happen; the first connection then starts generation 1.
#[test]
fn ctl_reload_before_the_first_lazy_connection_succeeds_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let control = dir.path().join("control.sock");
    #[rustfmt::skip]
    let mut s = start(&[
        "--lazy", "-l", "127.0.0.1:0", "--ready", "notify", "--control", control.to_str().unwrap(),
        "--", &fixture(), "--ready", "--serve",
    ]);
    let port = s.listening_port("127.0.0.1:");
    s.expect_manager("READY=1 while waiting", |m| m.contains("waiting for the first connection"));
    let reload = ctl(&control, &["reload"]);
    assert!(reload.status.success(), "{}", text(&reload.stderr));
    let out = text(&reload.stdout);
    assert!(
        out.contains("no child started yet (--lazy): the first connection will start generation 1"),
        "{out}"
    );
    let served = http_get(port).expect("the first connection is served");
    assert_eq!(i64::from(served), pid_of(&s.expect_event("start", 1)));
    s.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(s.exit_code(), 0);
}

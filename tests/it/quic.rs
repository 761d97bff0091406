//! A real QUIC server nobody here wrote: aioquic's HTTP/3 (`tests/quic/h3_server.py`, on the
//! inherited UDP fd 3) under sockhold, with long-lived QUIC connections (`tests/quic/h3_client.py`,
//! a request on each every 100 ms) across reloads. With `steer=flow` no connection breaks and each
//! stays with its process; on today's shared socket the first reload breaks them (so the steered
//! test can fail). aioquic comes from PyPI into the venv `.ci/run` makes (`target/venv`); without
//! it the tests say SKIPPED, and fail under CI.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::Instant;

use serde_json::Value;

use crate::support::*;

/// How many QUIC connections the client holds.
const CONNECTIONS: usize = 4;

/// The venv's python with aioquic, or `None` after "SKIPPED" (a failure under CI).
fn aioquic_python() -> Option<PathBuf> {
    let python = std::env::var_os("SOCKHOLD_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/venv/bin/python"));
    let works = Command::new(&python)
        .args(["-c", "import aioquic, cryptography"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !works {
        let why = format!(
            "{} cannot import aioquic (.ci/run installs it: python3 -m venv target/venv && \
             target/venv/bin/pip install aioquic==1.7.2)",
            python.display()
        );
        assert!(!under_ci(), "{why}, and CI=true");
        skipped(&why);
        return None;
    }
    Some(python)
}

fn script(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/quic").join(name).to_string_lossy().into()
}

/// The client's lines as they come, and its exit status at the end.
struct Client {
    child: std::process::Child,
    lines: Receiver<Value>,
    seen: Vec<Value>,
}

impl Client {
    /// Takes in every line that has arrived, so that what is counted next is only what comes
    /// after this moment.
    fn take_in(&mut self) {
        while let Ok(v) = self.lines.try_recv() {
            self.seen.push(v);
        }
    }

    /// Waits for lines until `done` holds over everything seen; fails after [`TIMEOUT`].
    fn until(&mut self, what: &str, done: impl Fn(&[Value]) -> bool) {
        let deadline = Instant::now() + TIMEOUT;
        while !done(&self.seen) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(v) => self.seen.push(v),
                Err(_) => {
                    panic!("timed out waiting for the client: {what}; lines: {:?}", self.seen)
                }
            }
        }
    }

    /// Closes its stdin (the signal to stop) and waits for its summary and exit.
    fn finish(mut self) -> (ExitStatus, Value) {
        drop(self.child.stdin.take());
        self.until("its summary", |seen| seen.iter().any(|v| v["event"] == "summary"));
        let deadline = Instant::now() + TIMEOUT;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                break status;
            }
            assert!(Instant::now() < deadline, "the client did not exit after its summary");
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        let summary = self.seen.iter().find(|v| v["event"] == "summary").cloned().unwrap();
        (status, summary)
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Successful requests per connection so far, and the broken connections.
fn counts(seen: &[Value]) -> (BTreeMap<i64, usize>, usize) {
    let mut ok = BTreeMap::new();
    let mut broken = 0;
    for v in seen.iter().filter(|v| v["event"] == "request") {
        if v["ok"] == true {
            *ok.entry(v["conn"].as_i64().unwrap()).or_default() += 1;
        } else {
            broken += 1;
        }
    }
    (ok, broken)
}

/// Runs aioquic's HTTP/3 server under sockhold on `spec`, the client's long-lived connections,
/// and `reloads` reloads (each done when the new generation is ready), waiting after each until
/// every connection has done 3 more requests or broken. Returns the client's exit status and
/// summary, and the pid of generation 1.
fn quic_under_reloads(spec: &str, reloads: usize) -> Option<(ExitStatus, Value, i64)> {
    let python = aioquic_python()?;
    let python = python.to_string_lossy().into_owned();
    let dir = tempfile::tempdir().unwrap();
    let made = Command::new(&python).arg(script("make_cert.py")).arg(dir.path()).status();
    assert!(made.is_ok_and(|s| s.success()), "make_cert.py failed");
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let control = dir.path().join("ctl.sock");
    let server = script("h3_server.py");
    let mut s = start(&[
        "-l",
        spec,
        "--ready",
        "notify",
        "--control",
        control.to_str().unwrap(),
        "--",
        &python,
        &server,
        "--cert",
        cert.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
    ]);
    let port = s.listening_port("udp://127.0.0.1:");
    s.expect_ready();
    let gen1 = pid_of(&s.expect_event("ready", 1));

    let mut child = Command::new(&python)
        .arg(script("h3_client.py"))
        .args(["--port", &port.to_string(), "--ca", cert.to_str().unwrap()])
        .args(["--connections", &CONNECTIONS.to_string(), "--interval", "0.1"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start h3_client.py");
    let (tx, rx) = channel();
    let out = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            match serde_json::from_str(&line) {
                Ok(v) => {
                    let _ = tx.send(v);
                }
                Err(_) => eprintln!("[h3_client] {line}"),
            }
        }
    });
    let mut client = Client { child, lines: rx, seen: Vec::new() };
    client.until("every connection's first request", |seen| counts(seen).0.len() == CONNECTIONS);

    let mut serving = gen1;
    for reload in 0..reloads {
        let out = ctl(&control, &["reload"]);
        assert!(out.status.success(), "reload: {}", String::from_utf8_lossy(&out.stderr));
        let new = pid_of(&s.expect_event("ready", reload as u64 + 2));
        if !spec.contains("steer=flow") {
            // On a shared socket the old generation reads the connections' datagrams until it
            // exits: count from then on, or its last requests would be taken for survival.
            s.expect_log(&format!("(pid {serving}) stopped"));
        }
        serving = new;
        client.take_in();
        let (before, _) = counts(&client.seen);
        client.until("3 more requests or a break on every connection", |seen| {
            let (now, broken) = counts(seen);
            broken > 0
                || before.iter().all(|(conn, n)| now.get(conn).copied().unwrap_or(0) >= n + 3)
        });
    }
    let (status, summary) = client.finish();
    eprintln!("h3_client summary: {summary}");
    Some((status, summary, gen1))
}

#[test]
fn quic_connections_to_aioquic_survive_reloads_with_steer_flow() {
    if !crate::steer::may_steer() {
        return;
    }
    let Some((status, summary, gen1)) = quic_under_reloads("udp://127.0.0.1:0,steer=flow", 5)
    else {
        return;
    };
    assert_eq!(summary["broken"], serde_json::json!([]), "{summary}");
    assert!(status.success(), "{summary}");
    let pids = summary["pids"].as_object().expect("pids");
    assert_eq!(pids.len(), CONNECTIONS, "{summary}");
    for (conn, answered) in pids {
        assert_eq!(answered, &serde_json::json!([gen1]), "connection {conn} moved: {summary}");
    }
    assert!(summary["requests"].as_u64().unwrap() >= (CONNECTIONS * (1 + 5 * 3)) as u64);
}

#[test]
fn quic_connections_break_at_a_reload_on_a_shared_socket() {
    let Some((status, summary, _)) = quic_under_reloads("udp://127.0.0.1:0", 1) else {
        return;
    };
    assert!(!status.success(), "no connection broke on a shared socket: {summary}");
    assert_eq!(
        summary["broken"].as_array().map(Vec::len),
        Some(CONNECTIONS),
        "every connection of the old generation breaks: {summary}"
    );
}

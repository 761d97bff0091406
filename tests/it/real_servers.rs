//! Real servers nobody here wrote, run exactly as `contrib/` documents them: its run script
//! and its configuration, copied into a temp dir with the test's address. HAProxy, lighttpd
//! and nginx from Debian are each reloaded 10 times under load with every request counted,
//! with a reload of a broken configuration in the middle that must fail while the old
//! generation keeps serving; no request may fail, and the listener must still be non-blocking
//! at the end (each of these servers relies on O_NONBLOCK, which sockhold must never clear
//! under it). A server that is not installed is a visible SKIP, and a failure under CI=true.
//!
//! The test binds the port itself (port 0) and hands it to sockhold as `fd://N`: nginx's and
//! lighttpd's configurations must name the address they inherit, and a port known before
//! sockhold starts, still bound, leaves no window for another process to take it.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use nix::fcntl::{FcntlArg, FdFlag, OFlag, fcntl};
use nix::sys::signal::Signal;
use nix::sys::signal::Signal::{SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGUSR1};

use crate::support::*;

/// Successful reloads per server.
const RELOADS: u64 = 10;

/// Whether `program` is installed. When it is not: "SKIPPED" on stderr, or a failure under
/// CI=true, where `.ci/run` installs it.
fn installed(program: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(program))
        .any(|p| p.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0));
    if !found {
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "{program} is not installed (CI=true: .ci/run installs it)"
        );
        eprintln!("SKIPPED: {program} not installed");
    }
    found
}

fn contrib(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib").join(path)
}

/// One GET on a new connection: the answer must be 200 with the body "ok"; returns its
/// `X-Pid` header (any case: HAProxy writes header names in lower case), or 0 when it has none.
fn get(port: u16) -> Result<i32, String> {
    let mut stream =
        TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("connect: {e}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(10))).map_err(|e| e.to_string())?;
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        .map_err(|e| format!("write: {e}"))?;
    let mut response = String::new();
    stream.read_to_string(&mut response).map_err(|e| format!("read: {e}"))?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    if !head.starts_with("HTTP/1.1 200") || body.trim() != "ok" {
        return Err(format!("bad response: {response:?}"));
    }
    Ok(head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(name, _)| name.eq_ignore_ascii_case("x-pid"))
        .and_then(|(_, pid)| pid.trim().parse().ok())
        .unwrap_or(0))
}

/// The process groups of the generations a test saw (each generation leads its own): SIGKILLed
/// when the test ends, also when it fails, so that no server outlives it (the harness's
/// cleanup knows only the fixture's pids).
#[derive(Default)]
struct Groups(Vec<i32>);

impl Groups {
    /// Records the generation a `READY=1 ... (pid N)` message names; returns its pid.
    fn record(&mut self, ready: &str) -> Option<i32> {
        let pid = ready.split("(pid ").nth(1)?.split(')').next()?.parse().ok()?;
        self.0.push(pid);
        Some(pid)
    }
}

impl Drop for Groups {
    fn drop(&mut self) {
        for &pid in &self.0 {
            let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

/// Adds what a load saw to the total.
fn add(total: &mut Tally, (ok, failures, pids): Tally) {
    total.0 += ok;
    total.1.extend(failures);
    total.2.extend(pids);
}

/// Whether `pid` has a handler for `signal` and does not block it (`/proc/PID/status`).
fn handles(pid: i32, signal: Signal) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return false;
    };
    let mask = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .unwrap_or(0)
    };
    let bit = 1u64 << (signal as i32 - 1);
    mask("SigCgt:") & bit != 0 && mask("SigBlk:") & bit == 0
}

/// A server as contrib/NAME documents it.
struct Server {
    /// The program, and contrib's directory for it.
    name: &'static str,
    /// Its configuration in that directory.
    config: &'static str,
    /// The configuration for this test: contrib's, with the test's port and paths.
    adapt: fn(String, u16, &Path) -> String,
    /// The run script's --stop-signal.
    stop_signal: Signal,
    /// A configuration the server refuses at start.
    broken: &'static str,
    /// More of the run script's settings, from the temp dir.
    env: fn(&Path) -> Vec<(&'static str, String)>,
}

/// Runs the server with contrib's run script, reloads it [`RELOADS`] times (plus one reload
/// of a broken configuration) under load, and stops it; every request must succeed.
fn reload_under_load(server: Server) {
    if !installed(server.name) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    // Inherited at its number by the run script, then sockhold (fd://N).
    fcntl(&listener, FcntlArg::F_SETFD(FdFlag::empty())).unwrap();
    let config = dir.path().join(server.config);
    let text = std::fs::read_to_string(contrib(&format!("{}/{}", server.name, server.config)))
        .expect("contrib configuration");
    let good = (server.adapt)(text, port, dir.path());
    assert!(good.contains(&port.to_string()) || good.contains("fd@3"), "{good}");
    std::fs::write(&config, &good).unwrap();

    let script = contrib(&format!("{}/run", server.name));
    let bin_dir = sockhold_bin().parent().unwrap().to_path_buf();
    let path = std::env::var_os("PATH").unwrap_or_default();
    let path =
        std::env::join_paths(std::iter::once(bin_dir).chain(std::env::split_paths(&path))).unwrap();
    let mut env = (server.env)(dir.path());
    env.push(("LISTEN", format!("fd://{},name={}", listener.as_raw_fd(), server.name)));
    env.push(("CONFIG", config.display().to_string()));
    let mut s = start_with(&[], |cmd| {
        // The harness's command, as contrib's run script: it execs sockhold (same pid).
        let mut outer = Command::new("/bin/sh");
        outer.arg(&script).env("PATH", &path).envs(env);
        for (k, v) in cmd.get_envs() {
            if let Some(v) = v {
                outer.env(k, v);
            }
        }
        outer.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0);
        *cmd = outer;
    });
    let mut groups = Groups::default();
    groups.record(&s.expect_ready());

    let mut load = Load::start_with(port, 4, get);
    let mut tally: Tally = Default::default();
    let mut generation = 1;
    let mut ready = String::new();
    for reload in 1..=RELOADS {
        if reload == RELOADS / 2 {
            // A broken configuration: the new generation exits, the reload fails, the old one
            // keeps serving, with O_NONBLOCK as it set it. The server is idle meanwhile, so
            // that one request at a time then finds an empty accept queue behind it: a
            // listener made blocking under the server would leave it asleep in accept().
            add(&mut tally, load.finish());
            std::fs::write(&config, server.broken).unwrap();
            s.signal(SIGHUP);
            generation += 1;
            s.expect_manager("RELOADING=1", |m| m.starts_with("RELOADING=1"));
            let ready = s.expect_ready();
            assert!(ready.contains("reload failed"), "{ready}");
            std::fs::write(&config, &good).unwrap();
            for _ in 0..5 {
                match get(port) {
                    Ok(pid) => add(&mut tally, (1, Vec::new(), [pid].into())),
                    Err(e) => add(&mut tally, (0, vec![e], Default::default())),
                }
            }
            load = Load::start_with(port, 4, get);
        }
        s.signal(SIGHUP);
        generation += 1;
        s.expect_manager("RELOADING=1", |m| m.starts_with("RELOADING=1"));
        ready = s.expect_ready();
        assert!(ready.contains(&format!("generation {generation} ")), "{ready}");
        groups.record(&ready);
    }
    add(&mut tally, load.finish());
    let (ok, failures, pids) = tally;
    let flags = OFlag::from_bits_retain(fcntl(&listener, FcntlArg::F_GETFL).unwrap());
    eprintln!(
        "{}: {RELOADS} reloads and 1 failed reload, {} requests, {} failed, answered by {} pids",
        server.name,
        ok + failures.len() as u64,
        failures.len(),
        pids.len()
    );
    assert!(
        failures.is_empty(),
        "{}: {} of {} requests failed: {:?}",
        server.name,
        failures.len(),
        ok + failures.len() as u64,
        &failures[..failures.len().min(10)]
    );
    assert!(ok >= 100, "the load ran ({ok} requests)");
    assert!(flags.contains(OFlag::O_NONBLOCK), "the listener is non-blocking still: {flags:?}");
    // HAProxy's master sends READY=1 a moment before it installs its handler for the stop
    // signal; a stop in that moment is lost (sockhold would SIGKILL it after --stop-timeout).
    // No event says when the handler is in place: poll /proc for it.
    let serving = groups.record(&ready).unwrap_or_else(|| panic!("no pid in {ready}"));
    wait_until("the serving generation handles its stop signal", || {
        handles(serving, server.stop_signal)
    });
    s.signal(SIGTERM);
    assert_eq!(s.exit_code(), 0);
    // Every generation has stopped: nothing is left to kill, and the pids may be reused.
    groups.0.clear();
}

#[test]
fn haproxy_reloads_under_load() {
    reload_under_load(Server {
        name: "haproxy",
        config: "haproxy-sockhold.cfg",
        stop_signal: SIGUSR1,
        adapt: |text, _, _| text,
        broken: "frontend web\n    bind fd@3\n    no-such-keyword\n",
        env: |_| Vec::new(),
    });
}

#[test]
fn lighttpd_reloads_under_load() {
    reload_under_load(Server {
        name: "lighttpd",
        config: "lighttpd-sockhold.conf",
        stop_signal: SIGINT,
        adapt: |text, port, dir| {
            let root = dir.join("htdocs");
            std::fs::create_dir_all(&root).unwrap();
            std::fs::write(root.join("index.html"), "ok\n").unwrap();
            text.replace("server.port = 8080", &format!("server.port = {port}"))
                .replace("/var/www/html", &root.display().to_string())
        },
        broken: "server.no-such-option = 1\n",
        env: |_| Vec::new(),
    });
}

#[test]
fn nginx_reloads_under_load() {
    reload_under_load(Server {
        name: "nginx",
        config: "nginx.conf",
        stop_signal: SIGQUIT,
        adapt: |text, port, _| text.replace("127.0.0.1:8080", &format!("127.0.0.1:{port}")),
        broken: "events {}\nhttp { no_such_directive; }\n",
        env: |dir| vec![("PREFIX", dir.display().to_string())],
    });
}

//! Reload-under-load benchmark (issue 7): `cargo bench --bench reload`.
//!
//! It runs the release `sockhold` on loopback with the example server `httpd` and with the
//! timing child `bench_child` (`examples/bench_child.rs`), and prints ONE JSON line (every figure
//! and every parameter) followed by a readable table. Progress goes to stderr. The phases:
//!
//! 1. **load**: sockhold + httpd (`--ready notify`), `--clients` closed-loop client threads for
//!    `--seconds` per mode, while `--reloads` reloads (spread evenly over the run, each through
//!    the control socket, whose answer comes when the reload is done) replace the generation. Two
//!    modes: `new` (a new connection per request, `Connection: close`) and `keepalive` (HTTP/1.1
//!    persistent connections). Every request is sent / succeeded / failed, and failures are
//!    counted by kind: `refused`, `reset`, `timeout`, `bad_response` (not a complete 200, or
//!    truncated), `closed` (closed before any byte of the response, on a new connection), `other`.
//!    A keep-alive client retries, once and on a new connection, a request whose reused
//!    connection was closed or reset before any byte of the response came back: httpd closes idle
//!    keep-alive connections when it drains, and every real HTTP client (RFC 9110 9.2.2, for
//!    idempotent requests) retries then. Those count as `keepalive_retried`, not as failed; a
//!    retry that fails again is a failure.
//! 2. **latency**: sockhold + bench_child, `--latency-samples` reloads by SIGHUP, one at a time
//!    and without load. (a) `ready_to_term`: the old child's `term_received_ns` minus the new
//!    child's `ready_sent_ns`, both `CLOCK_MONOTONIC`: an upper bound on sockhold's part, since it
//!    also holds the datagram's delivery, the scheduling of sockhold, the signal's delivery and
//!    bench_child's signal-hook thread waking up. That last part is measured on its own
//!    (`signal_hook`: the bench sends SIGTERM to a bench_child itself and compares, over
//!    `--calibration-samples` fresh sockholds). (b) `sighup_to_first_response`: SIGHUP at t0, then
//!    new connections every `--poll-us` until one is answered by a pid that is not the old one.
//! 3. **memory**: sockhold + bench_child with `--control`: VmRSS, RssAnon, RssFile
//!    (/proc/PID/status), Pss (/proc/PID/smaps_rollup: shared pages divided among their users) and
//!    open fds (/proc/PID/fd) before, after 1, 10, 100 and 500 reloads and after all
//!    `--mem-reloads` of them, each done through the control socket (so each has ended before the
//!    next), and read once only one generation is left; the figure is the last minus the first.
//! 4. **idle**: sockhold's wakeups per second, the sum over its threads of voluntary and
//!    nonvoluntary context switches in /proc/PID/task/*/status over `--idle-seconds`, once before
//!    and once after phase 3's reloads. The sockhold of phases 3 and 4 serves `--metrics` on a
//!    Unix socket, scraped once before each memory reading and idle window: the endpoint must
//!    not add a wakeup.
//! 5. **throughput**: requests per second through sockhold's socket (A: sockhold + httpd) against
//!    httpd binding the port itself (B: `httpd --bind 127.0.0.1:0`), with the same clients. Both
//!    run at once (the one not under load sleeps) and the clients switch between them every
//!    `--tput-slice-ms`, in the order A B B A A B B A ..., `--tput-slices` slices each after one
//!    warm-up pair: on a noisy machine this spreads the noise over A and B alike, which runs of
//!    several seconds in turn do not. Reported: the median of each, `ratio` = median(A) /
//!    median(B) (the target), the median of the per-pair ratios, and sockhold's context switches
//!    while under load (it never touches the traffic, so 0).
//!
//! Parameters (flag, or the environment variable `SOCKHOLD_BENCH_<FLAG>`, e.g.
//! `SOCKHOLD_BENCH_RELOADS=500`; a flag wins), with the defaults, which keep the run under about
//! 3 minutes on 2 cores:
//!
//! | flag | default | meaning |
//! |---|---|---|
//! | `--reloads N` | 200 | reloads during each load mode |
//! | `--seconds S` | 20 | load duration per mode (longer if the reloads take longer) |
//! | `--clients N` | 4 | client threads |
//! | `--modes LIST` | `new,keepalive` | load modes, for phases 1 and 5 |
//! | `--timeout-ms MS` | 5000 | connect, read and write timeout of a request |
//! | `--latency-samples N` | 200 | reloads timed in phase 2 |
//! | `--calibration-samples N` | 30 | signal-hook latency samples |
//! | `--poll-us US` | 250 | pause between the probes of (b) |
//! | `--mem-reloads N` | 1000 | reloads in phase 3 |
//! | `--idle-seconds S` | 5 | each idle window |
//! | `--tput-slices N` | 12 | measured slices of A and of B each, per mode (after one warm-up pair) |
//! | `--tput-slice-ms MS` | 1000 | length of one slice |
//! | `--phases LIST` | `load,latency,memory,idle,throughput` | what to run |
//! | `--env E` | `service` | the environment of sockhold and httpd: `service` is PATH, HOME and LANG only, as a service manager would give; `inherit` is the bench's own (with cargo's dozens of `CARGO_*` variables, which sockhold copies into every child) |
//! | `--max-seconds S` | see below | the watchdog's bound |
//!
//! The issue's targets take `cargo bench --bench reload -- --reloads 500 --seconds 60` (0
//! failed of at least 200,000 requests across at least 500 reloads, per mode).
//!
//! Binaries: `sockhold` is `CARGO_BIN_EXE_sockhold` (cargo bench builds it, release). cargo bench
//! does not build examples, so the bench runs `$CARGO build --release --example httpd --example
//! bench_child` first (a no-op when they are fresh; cargo decides), and uses them from the
//! `examples/` directory next to sockhold. Set `SOCKHOLD_BENCH_NO_BUILD=1` to skip that step, for
//! example when the examples were built beforehand with `cargo build --release --examples`.
//!
//! Every process it starts is stopped when its guard is dropped, on success, error or panic:
//! SIGTERM, and after 10 s SIGKILL to it and to the process groups of its children (sockhold's
//! children lead their own groups). A watchdog thread does the same and exits 1 if the whole
//! run exceeds its time bound (`--max-seconds`, default: twice the estimate plus 2 minutes). A
//! Ctrl-C reaches sockhold too (same process group), which stops its children itself. Loopback
//! only; logs go to a temporary directory, and a failing phase prints the end of its log.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::fs::File;
use std::io::{self, BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use nix::sys::signal::{Signal, kill, killpg};
use nix::time::{ClockId, clock_gettime};
use nix::unistd::Pid;
use serde_json::{Value, json};

// ---------------------------------------------------------------------------------------------
// Parameters

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    New,
    KeepAlive,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::New => "new",
            Mode::KeepAlive => "keepalive",
        }
    }
}

struct Params {
    reloads: u64,
    seconds: f64,
    clients: usize,
    modes: Vec<Mode>,
    timeout: Duration,
    latency_samples: u64,
    calibration_samples: u64,
    poll: Duration,
    mem_reloads: u64,
    idle_seconds: f64,
    tput_slices: u64,
    tput_slice: Duration,
    phases: BTreeSet<String>,
    max_seconds: f64,
    /// `service`: a clean environment, as a service manager gives; `inherit`: the bench's own.
    inherit_env: bool,
}

const PHASES: [&str; 5] = ["load", "latency", "memory", "idle", "throughput"];

const USAGE: &str = "usage: cargo bench --bench reload -- [--reloads N] [--seconds S] \
[--clients N] [--modes new,keepalive] [--timeout-ms MS] [--latency-samples N] \
[--calibration-samples N] [--poll-us US] [--mem-reloads N] [--idle-seconds S] [--tput-slices N] \
[--tput-slice-ms MS] [--phases load,latency,memory,idle,throughput] \
[--max-seconds S] [--env service|inherit]   (or SOCKHOLD_BENCH_<FLAG> variables; see the header of benches/reload.rs)";

impl Params {
    fn parse() -> Result<Params> {
        let mut given: BTreeMap<String, String> = BTreeMap::new();
        for (key, value) in std::env::vars() {
            if let Some(flag) = key.strip_prefix("SOCKHOLD_BENCH_")
                && flag != "NO_BUILD"
            {
                given.insert(flag.to_ascii_lowercase().replace('_', "-"), value);
            }
        }
        let mut args = std::env::args().skip(1);
        while let Some(arg) = args.next() {
            if arg == "--bench" {
                continue; // cargo bench passes it to every bench
            }
            if arg == "-h" || arg == "--help" {
                println!("{USAGE}");
                std::process::exit(0);
            }
            let Some(flag) = arg.strip_prefix("--") else {
                bail!("unexpected argument {arg:?}\n{USAGE}");
            };
            let (flag, value) = match flag.split_once('=') {
                Some((f, v)) => (f.to_string(), v.to_string()),
                None => (
                    flag.to_string(),
                    args.next().ok_or_else(|| anyhow!("--{flag} needs a value"))?,
                ),
            };
            given.insert(flag, value);
        }
        let mut take = |name: &str, default: &str| given.remove(name).unwrap_or(default.into());
        let num = |name: &str, v: String| -> Result<f64> {
            v.parse::<f64>()
                .ok()
                .filter(|n| n.is_finite() && *n >= 0.0)
                .ok_or_else(|| anyhow!("--{name}: {v:?} is not a number"))
        };
        let reloads = num("reloads", take("reloads", "200"))? as u64;
        let seconds = num("seconds", take("seconds", "20"))?;
        let clients = (num("clients", take("clients", "4"))? as usize).max(1);
        let modes = take("modes", "new,keepalive")
            .split(',')
            .map(|m| match m.trim() {
                "new" => Ok(Mode::New),
                "keepalive" | "keep-alive" => Ok(Mode::KeepAlive),
                other => Err(anyhow!("--modes: unknown mode {other:?} (new, keepalive)")),
            })
            .collect::<Result<Vec<_>>>()?;
        let timeout = Duration::from_millis(num("timeout-ms", take("timeout-ms", "5000"))? as u64);
        let latency_samples = num("latency-samples", take("latency-samples", "200"))? as u64;
        let calibration_samples =
            num("calibration-samples", take("calibration-samples", "30"))? as u64;
        let poll = Duration::from_micros(num("poll-us", take("poll-us", "250"))? as u64);
        let mem_reloads = num("mem-reloads", take("mem-reloads", "1000"))? as u64;
        let idle_seconds = num("idle-seconds", take("idle-seconds", "5"))?;
        let tput_slices = (num("tput-slices", take("tput-slices", "12"))? as u64).max(1);
        let tput_slice =
            Duration::from_millis(num("tput-slice-ms", take("tput-slice-ms", "1000"))? as u64);
        let phases: BTreeSet<String> =
            take("phases", &PHASES.join(",")).split(',').map(|p| p.trim().to_string()).collect();
        if let Some(p) = phases.iter().find(|p| !PHASES.contains(&p.as_str())) {
            bail!("--phases: unknown phase {p:?} ({})", PHASES.join(", "));
        }
        let max_seconds = take("max-seconds", "0");
        let inherit_env = match take("env", "service").as_str() {
            "service" => false,
            "inherit" => true,
            other => bail!("--env: {other:?} is neither service nor inherit"),
        };
        if let Some((flag, _)) = given.into_iter().next() {
            bail!("unknown parameter --{flag}\n{USAGE}");
        }
        let mut params = Params {
            reloads,
            seconds,
            clients,
            modes,
            timeout,
            latency_samples,
            calibration_samples,
            poll,
            mem_reloads,
            idle_seconds,
            tput_slices,
            tput_slice,
            phases,
            max_seconds: 0.0,
            inherit_env,
        };
        params.max_seconds = match num("max-seconds", max_seconds)? {
            0.0 => 2.0 * params.estimate() + 120.0,
            s => s,
        };
        Ok(params)
    }

    fn has(&self, phase: &str) -> bool {
        self.phases.contains(phase)
    }

    /// A rough estimate of the run's length, in seconds, for the watchdog.
    fn estimate(&self) -> f64 {
        let modes = self.modes.len() as f64;
        let mut s = 10.0;
        if self.has("load") {
            s += modes * (self.seconds.max(self.reloads as f64 * 0.05) + 5.0);
        }
        if self.has("latency") {
            s += self.latency_samples as f64 * 0.05 + self.calibration_samples as f64 * 0.1;
        }
        if self.has("memory") {
            s += self.mem_reloads as f64 * 0.02 + 5.0;
        }
        if self.has("idle") {
            s += 2.0 * (self.idle_seconds + 1.0);
        }
        if self.has("throughput") {
            let pairs = self.tput_slices as f64 + 1.0;
            s += modes * (pairs * 2.0 * self.tput_slice.as_secs_f64() + 3.0);
        }
        s
    }

    fn json(&self) -> Value {
        json!({
            "reloads": self.reloads,
            "seconds": self.seconds,
            "clients": self.clients,
            "modes": self.modes.iter().map(|m| m.name()).collect::<Vec<_>>(),
            "timeout_ms": self.timeout.as_millis() as u64,
            "latency_samples": self.latency_samples,
            "calibration_samples": self.calibration_samples,
            "poll_us": self.poll.as_micros() as u64,
            "mem_reloads": self.mem_reloads,
            "idle_seconds": self.idle_seconds,
            "tput_slices": self.tput_slices,
            "tput_slice_ms": self.tput_slice.as_millis() as u64,
            "phases": self.phases.iter().collect::<Vec<_>>(),
            "max_seconds": self.max_seconds,
            "env": if self.inherit_env { "inherit" } else { "service" },
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Processes: guards, the watchdog, logs

/// Top-level processes the bench started and has not seen end, for the watchdog.
static LIVE: Mutex<Vec<i32>> = Mutex::new(Vec::new());
/// The directory of the logs, which the watchdog removes (it exits without running destructors).
static LOG_DIR: Mutex<Option<PathBuf>> = Mutex::new(None);

fn now_ns() -> u64 {
    let t = clock_gettime(ClockId::CLOCK_MONOTONIC).expect("CLOCK_MONOTONIC");
    t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
}

/// The pids whose parent is `parent`, from /proc/*/stat.
fn children_of(parent: i32) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // pid (comm) state ppid ...: comm may hold anything, so split after the last ')'.
            let ppid = stat.rsplit_once(')').and_then(|(_, r)| r.split_whitespace().nth(1));
            ppid.and_then(|p| p.parse::<i32>().ok()) == Some(parent)
        })
        .collect()
}

/// SIGKILL to `pid` and to the process groups its children lead (sockhold's children each
/// lead one; a group that does not exist is skipped).
fn kill_hard(pid: i32) {
    let children = children_of(pid);
    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    for child in children {
        let _ = killpg(Pid::from_raw(child), Signal::SIGKILL);
        let _ = kill(Pid::from_raw(child), Signal::SIGKILL);
    }
}

fn start_watchdog(limit: Duration) {
    thread::spawn(move || {
        thread::sleep(limit);
        eprintln!("reload bench: exceeded its time bound of {limit:?}; killing what it started");
        for pid in LIVE.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            kill_hard(*pid);
        }
        if let Some(dir) = LOG_DIR.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            let _ = std::fs::remove_dir_all(dir);
        }
        std::process::exit(1);
    });
}

/// A process the bench started, stopped when dropped.
struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: &str, mut cmd: Command, log: PathBuf, stdout: Stdio) -> Result<Proc> {
        let err = File::create(&log).with_context(|| format!("create {}", log.display()))?;
        cmd.stdin(Stdio::null()).stdout(stdout).stderr(err);
        let child = cmd.spawn().with_context(|| format!("cannot start {name}: {cmd:?}"))?;
        LIVE.lock().unwrap().push(child.id() as i32);
        Ok(Proc { name: name.into(), child, log })
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn signal(&self, signal: Signal) -> Result<()> {
        kill(Pid::from_raw(self.pid()), signal).with_context(|| format!("kill {}", self.name))
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        format!(
            "--- last lines of {} ({}) ---\n{}",
            self.name,
            self.log.display(),
            lines[lines.len().saturating_sub(20)..].join("\n")
        )
    }

    /// Waits for the first log line that holds `needle`, and parses the address after it.
    fn address_after(&self, needle: &str) -> Result<SocketAddr> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            if let Some(rest) = text.lines().find_map(|l| l.split_once(needle).map(|(_, r)| r)) {
                let word = rest.split_whitespace().next().unwrap_or_default();
                return word.parse().with_context(|| format!("no address in {rest:?}"));
            }
            if let Ok(Some(())) = self.child.try_wait_ref() {
                bail!("{} exited before {needle:?}\n{}", self.name, self.log_tail());
            }
            if Instant::now() > deadline {
                bail!("{} did not log {needle:?} within 10 s\n{}", self.name, self.log_tail());
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// SIGTERM, and waits (up to 10 s, then SIGKILL) for it to end; returns its exit code.
    fn stop(mut self) -> Result<Option<i32>> {
        let status = self.terminate();
        let code = status.and_then(|s| s.code());
        Ok(code)
    }

    fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        if let Ok(Some(status)) = self.child.try_wait() {
            self.forget();
            return Some(status);
        }
        let _ = self.signal(Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                self.forget();
                return Some(status);
            }
            thread::sleep(Duration::from_millis(5));
        }
        eprintln!("reload bench: {} did not stop within 10 s of SIGTERM: SIGKILL", self.name);
        kill_hard(self.pid());
        let status = self.child.wait().ok();
        self.forget();
        status
    }

    fn forget(&self) {
        LIVE.lock().unwrap_or_else(|e| e.into_inner()).retain(|p| *p != self.pid());
    }
}

trait TryWaitRef {
    fn try_wait_ref(&self) -> io::Result<Option<()>>;
}

impl TryWaitRef for Child {
    /// Whether the process has ended, without reaping it (so `try_wait` still can).
    fn try_wait_ref(&self) -> io::Result<Option<()>> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.id()))?;
        let state = stat.rsplit_once(')').and_then(|(_, r)| r.split_whitespace().next());
        Ok(matches!(state, Some("Z" | "X")).then_some(()))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if LIVE.lock().unwrap_or_else(|e| e.into_inner()).contains(&self.pid()) {
            self.terminate();
        }
    }
}

/// Paths of the binaries, built if needed.
struct Bins {
    sockhold: PathBuf,
    httpd: PathBuf,
    bench_child: PathBuf,
}

impl Bins {
    fn locate_and_build() -> Result<Bins> {
        let sockhold = PathBuf::from(env!("CARGO_BIN_EXE_sockhold"));
        let examples = sockhold.parent().context("sockhold's directory")?.join("examples");
        let bins = Bins {
            httpd: examples.join("httpd"),
            bench_child: examples.join("bench_child"),
            sockhold,
        };
        if std::env::var_os("SOCKHOLD_BENCH_NO_BUILD").is_none() {
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| env!("CARGO").into());
            eprintln!("reload bench: building the examples (release) ...");
            let status = Command::new(cargo)
                .args(["build", "--release", "--example", "httpd", "--example", "bench_child"])
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .stdout(Stdio::null())
                .status()
                .context("cannot run cargo build")?;
            ensure!(status.success(), "cargo build --release --example ... failed: {status}");
        }
        for path in [&bins.sockhold, &bins.httpd, &bins.bench_child] {
            ensure!(path.is_file(), "{} is missing", path.display());
        }
        Ok(bins)
    }
}

struct Ctx {
    bins: Bins,
    dir: tempfile::TempDir,
    params: Params,
    serial: AtomicU64,
}

impl Ctx {
    fn log(&self, name: &str) -> PathBuf {
        let n = self.serial.fetch_add(1, Relaxed);
        self.dir.path().join(format!("{n:03}-{name}.log"))
    }

    fn control_path(&self) -> PathBuf {
        let n = self.serial.fetch_add(1, Relaxed);
        self.dir.path().join(format!("ctl-{n}.sock"))
    }

    /// A command for a program under test, with the environment `--env` asks for.
    fn command(&self, program: &Path) -> Command {
        let mut cmd = Command::new(program);
        if !self.params.inherit_env {
            cmd.env_clear();
            for (name, default) in
                [("PATH", Some("/usr/local/bin:/usr/bin:/bin")), ("HOME", None), ("LANG", None)]
            {
                if let Some(value) = std::env::var_os(name).or(default.map(Into::into)) {
                    cmd.env(name, value);
                }
            }
        }
        cmd
    }

    /// `sockhold -l 127.0.0.1:0 --ready notify --stop-timeout 10s OPTIONS -- CHILD`.
    fn sockhold(
        &self,
        options: &[&str],
        child: &Path,
        stdout: Stdio,
    ) -> Result<(Proc, SocketAddr)> {
        let mut cmd = self.command(&self.bins.sockhold);
        cmd.args(["-l", "127.0.0.1:0", "--ready", "notify", "--stop-timeout", "10s"])
            .args(options)
            .arg("--")
            .arg(child);
        let name = child.file_name().unwrap_or_default().to_string_lossy();
        let proc = Proc::spawn("sockhold", cmd, self.log(&format!("sockhold-{name}")), stdout)?;
        let addr = proc.address_after("listening on ")?;
        Ok((proc, addr))
    }

    /// `httpd --bind 127.0.0.1:0`.
    fn httpd_direct(&self) -> Result<(Proc, SocketAddr)> {
        let mut cmd = self.command(&self.bins.httpd);
        cmd.args(["--bind", "127.0.0.1:0"]);
        let proc = Proc::spawn("httpd --bind", cmd, self.log("httpd-direct"), Stdio::null())?;
        let addr = proc.address_after("serving on ")?;
        Ok((proc, addr))
    }
}

// ---------------------------------------------------------------------------------------------
// Control socket

fn control(path: &Path, request: &str, timeout: Duration) -> Result<Value> {
    let mut stream =
        UnixStream::connect(path).with_context(|| format!("connect {}", path.display()))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.write_all(format!("{request}\n").as_bytes())?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).context("read the control answer")?;
    serde_json::from_str(&line).with_context(|| format!("bad control answer {line:?}"))
}

/// A reload through the control socket; Ok(Err(reason)) when sockhold says it failed.
fn reload(path: &Path) -> Result<Result<(), String>> {
    let answer = control(path, r#"{"cmd":"reload"}"#, Duration::from_secs(90))?;
    Ok(match answer["ok"].as_bool() {
        Some(true) => Ok(()),
        _ => Err(answer["error"].as_str().unwrap_or("?").to_string()),
    })
}

/// Waits until sockhold has exactly one generation left.
fn wait_one_generation(path: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = control(path, r#"{"cmd":"status"}"#, Duration::from_secs(10))?;
        let n = status["generations"].as_array().map(Vec::len);
        if n == Some(1) {
            return Ok(());
        }
        ensure!(Instant::now() < deadline, "still {n:?} generations after 20 s: {status}");
        thread::sleep(Duration::from_millis(10));
    }
}

// ---------------------------------------------------------------------------------------------
// bench_child's stdout: the timestamps of every child

#[derive(Default)]
struct Stamps {
    ready: HashMap<u32, u64>,
    term: HashMap<u32, u64>,
    exit: HashMap<u32, u64>,
    /// Pids in the order their READY=1 was reported.
    order: Vec<u32>,
}

#[derive(Default)]
struct Events {
    stamps: Mutex<Stamps>,
    changed: Condvar,
}

impl Events {
    /// Reads JSON lines from `out` (the pipe of sockhold's stdout) until it closes.
    fn reader(out: impl Read + Send + 'static) -> Arc<Events> {
        let events = Arc::new(Events::default());
        let shared = Arc::clone(&events);
        thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                let Ok(v) = serde_json::from_str::<Value>(&line) else {
                    eprintln!("reload bench: unexpected child output {line:?}");
                    continue;
                };
                let Some(pid) = v["pid"].as_u64().map(|p| p as u32) else { continue };
                let mut s = shared.stamps.lock().unwrap();
                if let Some(t) = v["ready_sent_ns"].as_u64() {
                    s.ready.insert(pid, t);
                    s.order.push(pid);
                }
                if let Some(t) = v["term_received_ns"].as_u64() {
                    s.term.insert(pid, t);
                }
                if let Some(t) = v["exit_ns"].as_u64() {
                    s.exit.insert(pid, t);
                }
                shared.changed.notify_all();
            }
        });
        events
    }

    fn wait<T>(&self, what: &str, mut found: impl FnMut(&Stamps) -> Option<T>) -> Result<T> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut s = self.stamps.lock().unwrap();
        loop {
            if let Some(t) = found(&s) {
                return Ok(t);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            ensure!(!left.is_zero(), "timed out after 10 s waiting for {what}");
            s = self.changed.wait_timeout(s, left).unwrap().0;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP clients

const KINDS: [&str; 6] = ["refused", "reset", "timeout", "bad_response", "closed", "other"];
#[derive(Clone, Copy, Debug)]
enum Fail {
    Refused = 0,
    Reset = 1,
    Timeout = 2,
    BadResponse = 3,
    Closed = 4,
    Other = 5,
}

fn classify(e: &io::Error) -> Fail {
    match e.kind() {
        ErrorKind::ConnectionRefused => Fail::Refused,
        ErrorKind::ConnectionReset | ErrorKind::BrokenPipe | ErrorKind::ConnectionAborted => {
            Fail::Reset
        }
        ErrorKind::WouldBlock | ErrorKind::TimedOut => Fail::Timeout,
        ErrorKind::UnexpectedEof => Fail::BadResponse,
        _ => Fail::Other,
    }
}

/// A failed request: its kind, whether any byte of the response had come, and what happened.
struct Failure {
    kind: Fail,
    any_byte: bool,
    what: String,
}

impl Failure {
    fn io(step: &str, e: &io::Error, any_byte: bool) -> Failure {
        Failure { kind: classify(e), any_byte, what: format!("{step}: {e}") }
    }
}

struct Response {
    pid: u32,
    close: bool,
}

const REQUEST_CLOSE: &[u8] = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
const REQUEST_KEEP: &[u8] = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";

fn connect(addr: SocketAddr, timeout: Duration) -> Result<BufReader<TcpStream>, Failure> {
    let stream = TcpStream::connect_timeout(&addr, timeout)
        .map_err(|e| Failure::io("connect", &e, false))?;
    let setup = || -> io::Result<()> {
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        stream.set_nodelay(true)
    };
    setup().map_err(|e| Failure::io("setsockopt", &e, false))?;
    Ok(BufReader::with_capacity(4096, stream))
}

/// Sends one request on `conn` and reads its response (status 200, `Content-Length` body).
fn exchange(conn: &mut BufReader<TcpStream>, request: &[u8]) -> Result<Response, Failure> {
    conn.get_mut().write_all(request).map_err(|e| Failure::io("write", &e, false))?;
    match conn.fill_buf() {
        Ok([]) => {
            let what = "closed before any byte of the response".into();
            return Err(Failure { kind: Fail::Closed, any_byte: false, what });
        }
        Ok(_) => {}
        Err(e) => return Err(Failure::io("read", &e, false)),
    }
    let bad = |what: String| Failure { kind: Fail::BadResponse, any_byte: true, what };
    let mut line = String::new();
    let read_line = |conn: &mut BufReader<TcpStream>, line: &mut String| {
        line.clear();
        match conn.read_line(line) {
            Ok(0) => Err(bad("truncated head".into())),
            Ok(_) => Ok(()),
            Err(e) => Err(Failure::io("read", &e, true)),
        }
    };
    read_line(conn, &mut line)?;
    if !line.starts_with("HTTP/1.1 200 ") {
        return Err(bad(format!("status line {line:?}")));
    }
    let (mut length, mut pid, mut close) = (None, None, false);
    loop {
        read_line(conn, &mut line)?;
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        let Some((name, value)) = header.split_once(':') else {
            return Err(bad(format!("header {header:?}")));
        };
        let value = value.trim();
        match name.to_ascii_lowercase().as_str() {
            "content-length" => length = value.parse::<usize>().ok(),
            "x-pid" => pid = value.parse::<u32>().ok(),
            "connection" => close |= value.eq_ignore_ascii_case("close"),
            _ => {}
        }
    }
    let (Some(length), Some(pid)) = (length, pid) else {
        return Err(bad("no Content-Length or X-Pid".into()));
    };
    let mut body = vec![0; length];
    conn.read_exact(&mut body).map_err(|e| Failure::io("read body", &e, true))?;
    Ok(Response { pid, close })
}

/// One request on a new connection.
fn get_new(addr: SocketAddr, timeout: Duration) -> Result<Response, Failure> {
    let mut conn = connect(addr, timeout)?;
    exchange(&mut conn, REQUEST_CLOSE)
}

/// A keep-alive client's connection and whether a response has come on it.
struct KeepAlive {
    conn: Option<(BufReader<TcpStream>, bool)>,
    retried: u64,
}

impl KeepAlive {
    fn get(&mut self, addr: SocketAddr, timeout: Duration) -> Result<Response, Failure> {
        loop {
            let (conn, reused) = match &mut self.conn {
                Some(c) => c,
                None => self.conn.insert((connect(addr, timeout)?, false)),
            };
            let reused = *reused;
            match exchange(conn, REQUEST_KEEP) {
                Ok(response) => {
                    self.conn = if response.close {
                        None
                    } else {
                        self.conn.take().map(|(c, _)| (c, true))
                    };
                    return Ok(response);
                }
                Err(f) => {
                    self.conn = None;
                    // The server closed an idle persistent connection as our request crossed it:
                    // retry on a new connection (the retry of a new connection is never retried).
                    if reused && !f.any_byte && matches!(f.kind, Fail::Closed | Fail::Reset) {
                        self.retried += 1;
                        continue;
                    }
                    return Err(f);
                }
            }
        }
    }
}

#[derive(Default)]
struct LoadStats {
    sent: u64,
    ok: u64,
    failed: [u64; 6],
    retried: u64,
    latency_us: Vec<u32>,
    pids: BTreeSet<u32>,
    examples: Vec<String>,
}

impl LoadStats {
    fn merge(&mut self, other: LoadStats) {
        self.sent += other.sent;
        self.ok += other.ok;
        for (a, b) in self.failed.iter_mut().zip(other.failed) {
            *a += b;
        }
        self.retried += other.retried;
        self.latency_us.extend(other.latency_us);
        self.pids.extend(other.pids);
        for e in other.examples {
            if self.examples.len() < 10 {
                self.examples.push(e);
            }
        }
    }

    fn failed_total(&self) -> u64 {
        self.failed.iter().sum()
    }

    fn json(&mut self, elapsed: f64) -> Value {
        self.latency_us.sort_unstable();
        let kinds: serde_json::Map<String, Value> =
            KINDS.iter().zip(self.failed).map(|(k, n)| (k.to_string(), json!(n))).collect();
        let lat = |p: f64| percentile(&self.latency_us, p).map(u64::from);
        json!({
            "sent": self.sent,
            "succeeded": self.ok,
            "failed": self.failed_total(),
            "failed_by_kind": kinds,
            "keepalive_retried": self.retried,
            "elapsed_s": round(elapsed, 3),
            "rps": round(self.ok as f64 / elapsed.max(1e-9), 1),
            "request_latency_us": {"p50": lat(0.5), "p99": lat(0.99), "max": self.latency_us.last()},
            "pids_answering": self.pids.len(),
            "failure_examples": self.examples,
        })
    }
}

/// Closed-loop clients until `stop`, each request to `targets[target]`; `ok[i]` counts the
/// successes of target i as they happen.
struct Load {
    stop: Arc<AtomicBool>,
    target: Arc<AtomicUsize>,
    ok: Arc<Vec<AtomicU64>>,
    threads: Vec<JoinHandle<LoadStats>>,
    started: Instant,
}

impl Load {
    fn start(targets: &[SocketAddr], mode: Mode, clients: usize, timeout: Duration) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let target = Arc::new(AtomicUsize::new(0));
        let ok = Arc::new(targets.iter().map(|_| AtomicU64::new(0)).collect::<Vec<_>>());
        let threads = (0..clients)
            .map(|_| {
                let (stop, target, ok) = (Arc::clone(&stop), Arc::clone(&target), Arc::clone(&ok));
                let targets = targets.to_vec();
                thread::spawn(move || client(&targets, mode, timeout, &stop, &target, &ok))
            })
            .collect();
        Load { stop, target, ok, threads, started: Instant::now() }
    }

    fn finish(self) -> Result<(LoadStats, f64)> {
        self.stop.store(true, Relaxed);
        let elapsed = self.started.elapsed().as_secs_f64();
        let mut total = LoadStats::default();
        for t in self.threads {
            total.merge(t.join().map_err(|_| anyhow!("a client thread panicked"))?);
        }
        Ok((total, elapsed))
    }
}

fn client(
    targets: &[SocketAddr],
    mode: Mode,
    timeout: Duration,
    stop: &AtomicBool,
    target: &AtomicUsize,
    ok: &[AtomicU64],
) -> LoadStats {
    let mut stats = LoadStats { latency_us: Vec::with_capacity(1 << 16), ..LoadStats::default() };
    // One persistent connection per target, so that switching targets costs nothing.
    let mut keepalive: Vec<KeepAlive> =
        targets.iter().map(|_| KeepAlive { conn: None, retried: 0 }).collect();
    while !stop.load(Relaxed) {
        let i = target.load(Relaxed);
        let t = Instant::now();
        stats.sent += 1;
        let result = match mode {
            Mode::New => get_new(targets[i], timeout),
            Mode::KeepAlive => keepalive[i].get(targets[i], timeout),
        };
        match result {
            Ok(response) => {
                stats.ok += 1;
                ok[i].fetch_add(1, Relaxed);
                stats.latency_us.push(t.elapsed().as_micros().min(u32::MAX as u128) as u32);
                stats.pids.insert(response.pid);
            }
            Err(f) => {
                stats.failed[f.kind as usize] += 1;
                if stats.examples.len() < 10 {
                    stats.examples.push(format!("{}: {}", KINDS[f.kind as usize], f.what));
                }
            }
        }
    }
    stats.retried = keepalive.iter().map(|k| k.retried).sum();
    stats
}

/// Waits until `addr` answers a request, and returns the pid that answered.
fn wait_serving(addr: SocketAddr, proc: &Proc) -> Result<u32> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match get_new(addr, Duration::from_secs(2)) {
            Ok(r) => return Ok(r.pid),
            Err(f) if Instant::now() > deadline => {
                bail!("{addr} does not answer: {}\n{}", f.what, proc.log_tail())
            }
            Err(_) => thread::sleep(Duration::from_millis(5)),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Statistics and /proc

fn percentile<T: Copy>(sorted: &[T], p: f64) -> Option<T> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

/// Median, p99 and max of nanosecond samples, in microseconds.
fn summary_us(samples_ns: &[u64]) -> Value {
    let mut v = samples_ns.to_vec();
    v.sort_unstable();
    let us = |x: Option<u64>| x.map(|ns| round(ns as f64 / 1000.0, 1));
    json!({
        "n": v.len(),
        "median_us": us((!v.is_empty()).then(|| median_u64(&v))),
        "p99_us": us(percentile(&v, 0.99)),
        "min_us": us(v.first().copied()),
        "max_us": us(v.last().copied()),
    })
}

fn median_u64(sorted: &[u64]) -> u64 {
    let n = sorted.len();
    if n % 2 == 1 { sorted[n / 2] } else { (sorted[n / 2 - 1] + sorted[n / 2]) / 2 }
}

/// A process's memory (KiB) and open fds.
#[derive(Clone, Copy)]
struct Mem {
    /// VmRSS, RssAnon and RssFile of /proc/PID/status.
    rss: u64,
    anon: u64,
    file: u64,
    /// Pss of /proc/PID/smaps_rollup: shared pages (libc, the binary's page cache) divided among
    /// the processes that map them.
    pss: u64,
    fds: usize,
}

fn memory(pid: i32) -> Result<Mem> {
    let field = |file: &str, name: &str| -> Result<u64> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/{file}"))?;
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .ok_or_else(|| anyhow!("no {name} in /proc/{pid}/{file}"))
    };
    Ok(Mem {
        rss: field("status", "VmRSS")?,
        anon: field("status", "RssAnon")?,
        file: field("status", "RssFile")?,
        pss: field("smaps_rollup", "Pss")?,
        fds: std::fs::read_dir(format!("/proc/{pid}/fd"))?.count(),
    })
}

/// Voluntary plus nonvoluntary context switches, summed over every thread of `pid`.
fn context_switches(pid: i32) -> Result<u64> {
    let mut total = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let status = std::fs::read_to_string(task?.path().join("status")).unwrap_or_default();
        for line in status.lines() {
            if let Some(v) = line
                .strip_prefix("voluntary_ctxt_switches:")
                .or_else(|| line.strip_prefix("nonvoluntary_ctxt_switches:"))
            {
                total += v.trim().parse::<u64>().unwrap_or(0);
            }
        }
    }
    Ok(total)
}

/// One `GET /metrics` on sockhold's metrics socket, which must answer 200 and close.
fn scrape_metrics(path: &Path) -> Result<()> {
    let mut stream = UnixStream::connect(path)
        .with_context(|| format!("failed to connect to {}", path.display()))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    ensure!(answer.starts_with("HTTP/1.1 200 "), "metrics scrape: {answer:?}");
    Ok(())
}

fn idle_wakeups(pid: i32, window: f64) -> Result<Value> {
    let before = context_switches(pid)?;
    thread::sleep(Duration::from_secs_f64(window));
    let after = context_switches(pid)?;
    let n = after - before;
    Ok(json!({"window_s": window, "switches": n, "per_s": round(n as f64 / window, 2)}))
}

fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|r| r.trim_start_matches([' ', '\t', ':']).to_string())
            })
        })
        .unwrap_or_else(|| "?".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    json!({
        "nproc": thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "kernel": kernel.trim(),
        "cpu": cpu,
    })
}

// ---------------------------------------------------------------------------------------------
// Phases

/// Phase 1: load in `mode` while reloads replace httpd.
fn phase_load(ctx: &Ctx, mode: Mode) -> Result<Value> {
    let p = &ctx.params;
    eprintln!(
        "reload bench: load, {} mode: {} clients, {} reloads over {} s ...",
        mode.name(),
        p.clients,
        p.reloads,
        p.seconds
    );
    let ctl = ctx.control_path();
    let ctl_arg = ctl.to_string_lossy().into_owned();
    let (sockhold, addr) =
        ctx.sockhold(&["--control", &ctl_arg], &ctx.bins.httpd, Stdio::null())?;
    let first = wait_serving(addr, &sockhold)?;
    let load = Load::start(&[addr], mode, p.clients, p.timeout);
    let interval = Duration::from_secs_f64(p.seconds / p.reloads.max(1) as f64);
    let (mut done, mut failed, mut took_ns, mut reasons) = (0u64, 0u64, Vec::new(), Vec::new());
    for i in 0..p.reloads {
        let at = load.started + interval * i as u32 + interval / 2;
        thread::sleep(at.saturating_duration_since(Instant::now()));
        let t = Instant::now();
        match reload(&ctl).with_context(|| sockhold.log_tail())? {
            Ok(()) => done += 1,
            Err(reason) => {
                failed += 1;
                if reasons.len() < 5 {
                    reasons.push(reason);
                }
            }
        }
        took_ns.push(t.elapsed().as_nanos() as u64);
    }
    let end = load.started + Duration::from_secs_f64(p.seconds);
    thread::sleep(end.saturating_duration_since(Instant::now()));
    let (mut stats, elapsed) = load.finish()?;
    stats.pids.insert(first);
    let code = sockhold.stop()?;
    let mut v = stats.json(elapsed);
    v["reloads_done"] = json!(done);
    v["reloads_failed"] = json!(failed);
    v["reload_failures"] = json!(reasons);
    v["reload_round_trip"] = summary_us(&took_ns);
    v["sockhold_exit_code"] = json!(code);
    Ok(v)
}

/// Phase 2: (a) READY=1 to SIGTERM and (b) SIGHUP to the first response of the new child.
fn phase_latency(ctx: &Ctx) -> Result<Value> {
    let p = &ctx.params;
    eprintln!("reload bench: latency, {} reloads of bench_child ...", p.latency_samples);
    let (mut sockhold, addr) = ctx.sockhold(&[], &ctx.bins.bench_child, Stdio::piped())?;
    let events = Events::reader(sockhold.child.stdout.take().context("stdout")?);
    let mut old = events.wait("generation 1's READY=1", |s| s.order.first().copied())?;
    ensure!(wait_serving(addr, &sockhold)? == old, "generation 1 does not answer");
    let (mut a, mut b, mut to_ready, mut probes, mut probe_failures) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), 0u64);
    for _ in 0..p.latency_samples {
        thread::sleep(Duration::from_millis(5));
        let t0 = now_ns();
        sockhold.signal(Signal::SIGHUP)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        let (new, t1, n) = {
            let mut n = 0u64;
            loop {
                n += 1;
                match get_new(addr, p.timeout) {
                    Ok(r) if r.pid != old => break (r.pid, now_ns(), n),
                    Ok(_) => {}
                    Err(_) => probe_failures += 1,
                }
                ensure!(Instant::now() < deadline, "no new child answered within 10 s");
                thread::sleep(p.poll);
            }
        };
        let ready = events.wait("the new child's READY=1", |s| s.ready.get(&new).copied())?;
        let term = events.wait("the old child's SIGTERM", |s| s.term.get(&old).copied())?;
        events.wait("the old child's exit", |s| s.exit.get(&old).copied())?;
        a.push(term.saturating_sub(ready));
        b.push(t1 - t0);
        to_ready.push(ready.saturating_sub(t0));
        probes.push(n);
        old = new;
    }
    sockhold.stop()?;

    eprintln!("reload bench: signal-hook latency, {} samples ...", p.calibration_samples);
    let mut hook = Vec::new();
    for _ in 0..p.calibration_samples {
        let (mut sockhold, _) = ctx.sockhold(&[], &ctx.bins.bench_child, Stdio::piped())?;
        let events = Events::reader(sockhold.child.stdout.take().context("stdout")?);
        let pid = events.wait("READY=1", |s| s.order.first().copied())?;
        thread::sleep(Duration::from_millis(5));
        let t0 = now_ns();
        kill(Pid::from_raw(pid as i32), Signal::SIGTERM)?;
        let term = events.wait("SIGTERM", |s| s.term.get(&pid).copied())?;
        hook.push(term.saturating_sub(t0));
        sockhold.stop()?;
    }
    probes.sort_unstable();
    Ok(json!({
        "reloads": b.len(),
        "ready_to_term": summary_us(&a),
        "sighup_to_first_response": summary_us(&b),
        "sighup_to_ready_sent": summary_us(&to_ready),
        "signal_hook": summary_us(&hook),
        "probes_per_reload_median": percentile(&probes, 0.5),
        "probe_failures": probe_failures,
    }))
}

fn mem_json(m: Mem) -> Value {
    json!({"rss_kib": m.rss, "rss_anon_kib": m.anon, "rss_file_kib": m.file, "pss_kib": m.pss, "fds": m.fds})
}

/// Phases 3 and 4: memory and fds across reloads, idle wakeups before and after.
fn phase_memory_idle(ctx: &Ctx) -> Result<(Option<Value>, Option<Value>)> {
    let p = &ctx.params;
    let ctl = ctx.control_path();
    let ctl_arg = ctl.to_string_lossy().into_owned();
    let metrics = ctl.with_extension("metrics.sock");
    let metrics_arg = metrics.to_string_lossy().into_owned();
    let (mut sockhold, _) = ctx.sockhold(
        &["--control", &ctl_arg, "--metrics", &metrics_arg],
        &ctx.bins.bench_child,
        Stdio::piped(),
    )?;
    let events = Events::reader(sockhold.child.stdout.take().context("stdout")?);
    events.wait("generation 1's READY=1", |s| s.order.first().copied())?;
    wait_one_generation(&ctl)?;
    // A scrape before each idle window (and the memory read after it): the endpoint it leaves
    // behind must not wake sockhold.
    scrape_metrics(&metrics)?;
    thread::sleep(Duration::from_secs(1));
    let pid = sockhold.pid();
    let idle_before = if p.has("idle") {
        eprintln!("reload bench: idle window of {} s ...", p.idle_seconds);
        Some(idle_wakeups(pid, p.idle_seconds)?)
    } else {
        None
    };
    if !p.has("memory") {
        sockhold.stop()?;
        return Ok((None, idle_before.map(|i| json!({ "fresh": i }))));
    }
    eprintln!("reload bench: memory, {} reloads of bench_child ...", p.mem_reloads);
    // Read once only one generation is left and sockhold has closed our status connection.
    let settled = |wait: Duration| -> Result<Mem> {
        wait_one_generation(&ctl)?;
        thread::sleep(wait);
        memory(pid)
    };
    let before = memory(pid)?;
    let checkpoints: Vec<u64> =
        [1, 10, 100, 500].into_iter().filter(|n| *n < p.mem_reloads).collect();
    let (mut trace, mut failed, mut paused) = (Vec::new(), 0u64, Duration::ZERO);
    let started = Instant::now();
    for i in 1..=p.mem_reloads {
        if reload(&ctl).with_context(|| sockhold.log_tail())?.is_err() {
            failed += 1;
        }
        if checkpoints.contains(&i) {
            let t = Instant::now();
            trace.push(
                json!({"reloads": i, "memory": mem_json(settled(Duration::from_millis(200))?)}),
            );
            paused += t.elapsed();
        }
    }
    let took = (started.elapsed() - paused).as_secs_f64();
    scrape_metrics(&metrics)?;
    let after = settled(Duration::from_secs(1))?;
    trace.push(json!({"reloads": p.mem_reloads, "memory": mem_json(after)}));
    let idle_after = if p.has("idle") {
        eprintln!("reload bench: idle window of {} s ...", p.idle_seconds);
        Some(idle_wakeups(pid, p.idle_seconds)?)
    } else {
        None
    };
    let generations = events.stamps.lock().unwrap().order.len();
    sockhold.stop()?;
    let memory = json!({
        "reloads": p.mem_reloads,
        "reloads_failed": failed,
        "children_started": generations,
        "reloads_per_s": round(p.mem_reloads as f64 / took, 1),
        "before": mem_json(before),
        "after": mem_json(after),
        "trace": trace,
        "delta_rss_kib": after.rss as i64 - before.rss as i64,
        "delta_rss_anon_kib": after.anon as i64 - before.anon as i64,
        "delta_fds": after.fds as i64 - before.fds as i64,
    });
    let idle = idle_before.map(|b| json!({ "fresh": b, "after_reloads": idle_after }));
    Ok((Some(memory), idle))
}

/// Phase 5: sockhold + httpd (A) against httpd binding the port itself (B), both running, the
/// clients switching between them every `--tput-slice-ms`, in the order A B B A A B B A ..., so that
/// the machine's changing speed (other work, frequency, caches) falls on both alike. The first pair
/// of slices is a warm-up and is not counted.
fn phase_throughput(ctx: &Ctx, mode: Mode) -> Result<Value> {
    let p = &ctx.params;
    eprintln!(
        "reload bench: throughput, {} mode: {} slices of {} ms through sockhold, as many direct ...",
        mode.name(),
        p.tput_slices,
        p.tput_slice.as_millis()
    );
    let (sockhold, through) = ctx.sockhold(&[], &ctx.bins.httpd, Stdio::null())?;
    let (direct, alone) = ctx.httpd_direct()?;
    wait_serving(through, &sockhold)?;
    wait_serving(alone, &direct)?;
    let load = Load::start(&[through, alone], mode, p.clients, p.timeout);
    let (mut a, mut b, mut pairs) = (Vec::new(), Vec::new(), Vec::new());
    let mut switches = 0;
    for pair in 0..=p.tput_slices {
        let mut rates = [0.0; 2];
        let order = if pair % 2 == 0 { [0, 1] } else { [1, 0] };
        for target in order {
            load.target.store(target, Relaxed);
            let (n0, t0) = (load.ok[target].load(Relaxed), Instant::now());
            let s0 = (target == 0).then(|| context_switches(sockhold.pid()).ok()).flatten();
            thread::sleep(p.tput_slice);
            let (n1, t1) = (load.ok[target].load(Relaxed), Instant::now());
            let s1 = (target == 0).then(|| context_switches(sockhold.pid()).ok()).flatten();
            rates[target] = (n1 - n0) as f64 / (t1 - t0).as_secs_f64();
            if pair > 0 {
                switches += s0.zip(s1).map_or(0, |(x, y)| y - x);
            }
        }
        if pair > 0 {
            a.push(round(rates[0], 1));
            b.push(round(rates[1], 1));
            pairs.push(rates[0] / rates[1]);
        }
    }
    let (stats, _) = load.finish()?;
    sockhold.stop()?;
    direct.stop()?;
    let (ma, mb) = (median(&a), median(&b));
    Ok(json!({
        "sockhold_rps": a,
        "direct_rps": b,
        "median_sockhold_rps": round(ma, 1),
        "median_direct_rps": round(mb, 1),
        "ratio": round(ma / mb, 4),
        "median_pair_ratio": round(median(&pairs), 4),
        "failed": stats.failed_total(),
        "sockhold_context_switches_under_load": switches,
    }))
}

// ---------------------------------------------------------------------------------------------
// Report

fn targets(r: &Value, p: &Params) -> Value {
    let mut t = serde_json::Map::new();
    // `pass`: true, false, or null when the run was too small to tell (the load target at the
    // default scale, with no failure).
    let mut put = |name: &str, value: Value, goal: &str, pass: Value| {
        t.insert(name.into(), json!({"value": value, "target": goal, "pass": pass}));
    };
    for mode in &p.modes {
        let l = &r["load"][mode.name()];
        if l.is_null() {
            continue;
        }
        let (ok, failed, reloads) = (
            l["succeeded"].as_u64().unwrap_or(0),
            l["failed"].as_u64().unwrap_or(1),
            l["reloads_done"].as_u64().unwrap_or(0),
        );
        put(
            &format!("load_{}", mode.name()),
            json!(format!("{failed} failed of {} requests across {reloads} reloads", l["sent"])),
            "0 failed of >= 200000 requests across >= 500 reloads",
            match (failed, ok >= 200_000 && reloads >= 500) {
                (0, true) => json!(true),
                (0, false) => Value::Null,
                _ => json!(false),
            },
        );
    }
    let lat = &r["latency"];
    if !lat.is_null() {
        let a = lat["ready_to_term"]["median_us"].as_f64().unwrap_or(f64::INFINITY);
        put("ready_to_term_median_us", json!(a), "< 1000", json!(a < 1000.0));
        let b = lat["sighup_to_first_response"]["median_us"].as_f64().unwrap_or(f64::INFINITY);
        put("sighup_to_first_response_median_us", json!(b), "< 20000", json!(b < 20000.0));
    }
    let m = &r["memory"];
    if !m.is_null() {
        let after = &m["after"];
        let rss = after["rss_kib"].as_i64().unwrap_or(i64::MAX);
        let anon = after["rss_anon_kib"].as_i64().unwrap_or(i64::MAX);
        put("rss_kib", json!(rss), "< 3072", json!(rss < 3072));
        put("rss_anon_kib", json!(anon), "< 1024", json!(anon < 1024));
        let d = m["delta_rss_kib"].as_i64().unwrap_or(i64::MAX);
        put("delta_rss_kib", json!(d), "within +-64", json!(d.abs() <= 64));
        let d = m["delta_rss_anon_kib"].as_i64().unwrap_or(i64::MAX);
        put("delta_rss_anon_kib", json!(d), "within +-64", json!(d.abs() <= 64));
        let d = m["delta_fds"].as_i64().unwrap_or(i64::MAX);
        put("delta_fds", json!(d), "0", json!(d == 0));
    }
    let idle = &r["idle"];
    if !idle.is_null() {
        let worst = ["fresh", "after_reloads"]
            .iter()
            .filter_map(|k| idle[k]["per_s"].as_f64())
            .fold(0.0, f64::max);
        put("idle_wakeups_per_s", json!(worst), "0", json!(worst == 0.0));
    }
    for mode in &p.modes {
        let tp = &r["throughput"][mode.name()];
        if let Some(ratio) = tp["ratio"].as_f64() {
            put(
                &format!("throughput_ratio_{}", mode.name()),
                json!(ratio),
                ">= 0.99",
                json!(ratio >= 0.99),
            );
        }
    }
    Value::Object(t)
}

fn table(r: &Value, p: &Params) -> String {
    let mut out = String::new();
    let m = &r["machine"];
    let _ = writeln!(
        out,
        "\nsockhold reload benchmark  (sockhold {})",
        r["sockhold_version"].as_str().unwrap_or("?")
    );
    let _ = writeln!(
        out,
        "machine: {} CPUs, {}, Linux {}",
        m["nproc"],
        m["cpu"].as_str().unwrap_or("?"),
        m["kernel"].as_str().unwrap_or("?")
    );
    let _ = writeln!(out, "parameters: {}", r["params"]);
    let us = |v: &Value| match v.as_f64() {
        Some(x) if x >= 1000.0 => format!("{:.2} ms", x / 1000.0),
        Some(x) => format!("{x:.1} µs"),
        None => "-".into(),
    };
    if let Some(load) = r["load"].as_object() {
        let _ = writeln!(out, "\n1. requests under reloads ({} clients, closed loop)\n", p.clients);
        let _ = writeln!(
            out,
            "| mode | reloads ok/failed | sent | succeeded | failed | refused | reset | timeout | bad | closed | other | keepalive_retried | req/s | p50 | p99 | max | pids |"
        );
        let _ =
            writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
        for (mode, l) in p.modes.iter().filter_map(|m| Some((m.name(), load.get(m.name())?))) {
            let k = &l["failed_by_kind"];
            let lat = &l["request_latency_us"];
            let _ = writeln!(
                out,
                "| {mode} | {}/{} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                l["reloads_done"],
                l["reloads_failed"],
                l["sent"],
                l["succeeded"],
                l["failed"],
                k["refused"],
                k["reset"],
                k["timeout"],
                k["bad_response"],
                k["closed"],
                k["other"],
                l["keepalive_retried"],
                l["rps"],
                us(&lat["p50"]),
                us(&lat["p99"]),
                us(&lat["max"]),
                l["pids_answering"],
            );
        }
    }
    let lat = &r["latency"];
    if !lat.is_null() {
        let _ = writeln!(
            out,
            "\n2. handover latency, instantly ready child ({} reloads)\n",
            lat["reloads"]
        );
        let _ = writeln!(out, "| measure | median | p99 | min | max |");
        let _ = writeln!(out, "|---|---|---|---|---|");
        for (key, label) in [
            ("ready_to_term", "(a) new child's READY=1 sent -> old child's SIGTERM received"),
            ("sighup_to_first_response", "(b) SIGHUP -> first response from the new child"),
            ("sighup_to_ready_sent", "SIGHUP -> new child sends READY=1 (fork+exec+start)"),
            ("signal_hook", "kill(SIGTERM) -> signal-hook thread (part of (a))"),
        ] {
            let s = &lat[key];
            let _ = writeln!(
                out,
                "| {label} | {} | {} | {} | {} |",
                us(&s["median_us"]),
                us(&s["p99_us"]),
                us(&s["min_us"]),
                us(&s["max_us"])
            );
        }
    }
    let mem = &r["memory"];
    if !mem.is_null() {
        let _ = writeln!(
            out,
            "\n3. sockhold's memory and fds ({} reloads, {}/s)\n",
            mem["reloads"], mem["reloads_per_s"]
        );
        let _ = writeln!(out, "| when | VmRSS KiB | RssAnon KiB | RssFile KiB | Pss KiB | fds |");
        let _ = writeln!(out, "|---|---|---|---|---|---|");
        let row = |label: String, s: &Value| {
            format!(
                "| {label} | {} | {} | {} | {} | {} |",
                s["rss_kib"], s["rss_anon_kib"], s["rss_file_kib"], s["pss_kib"], s["fds"]
            )
        };
        let _ = writeln!(out, "{}", row("before".into(), &mem["before"]));
        for point in mem["trace"].as_array().into_iter().flatten() {
            let label = format!("after {} reloads", point["reloads"]);
            let _ = writeln!(out, "{}", row(label, &point["memory"]));
        }
        let _ = writeln!(
            out,
            "| change | {:+} | {:+} | | | {:+} |",
            mem["delta_rss_kib"].as_i64().unwrap_or(0),
            mem["delta_rss_anon_kib"].as_i64().unwrap_or(0),
            mem["delta_fds"].as_i64().unwrap_or(0)
        );
    }
    let idle = &r["idle"];
    if !idle.is_null() {
        let _ = writeln!(out, "\n4. sockhold's wakeups while idle\n");
        let _ = writeln!(out, "| when | window | context switches | per second |");
        let _ = writeln!(out, "|---|---|---|---|");
        for key in ["fresh", "after_reloads"] {
            let s = &idle[key];
            if !s.is_null() {
                let _ = writeln!(
                    out,
                    "| {key} | {} s | {} | {} |",
                    s["window_s"], s["switches"], s["per_s"]
                );
            }
        }
    }
    if let Some(tp) = r["throughput"].as_object() {
        let _ = writeln!(
            out,
            "\n5. requests/s through sockhold (A) vs httpd binding the port itself (B): {} slices of {} ms each, alternating A B B A ...\n",
            p.tput_slices,
            p.tput_slice.as_millis()
        );
        let _ = writeln!(
            out,
            "| mode | A median | A range | B median | B range | ratio of medians | median of pair ratios | failed | sockhold's context switches under load |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|");
        let range = |v: &Value| {
            let v: Vec<f64> =
                v.as_array().into_iter().flatten().filter_map(Value::as_f64).collect();
            let (lo, hi) =
                v.iter().fold((f64::INFINITY, 0.0f64), |(lo, hi), x| (lo.min(*x), hi.max(*x)));
            format!("{lo:.0}-{hi:.0}")
        };
        for (mode, t) in p.modes.iter().filter_map(|m| Some((m.name(), tp.get(m.name())?))) {
            let _ = writeln!(
                out,
                "| {mode} | {:.0} | {} | {:.0} | {} | {} | {} | {} | {} |",
                t["median_sockhold_rps"].as_f64().unwrap_or(0.0),
                range(&t["sockhold_rps"]),
                t["median_direct_rps"].as_f64().unwrap_or(0.0),
                range(&t["direct_rps"]),
                t["ratio"],
                t["median_pair_ratio"],
                t["failed"],
                t["sockhold_context_switches_under_load"]
            );
        }
    }
    if let Some(t) = r["targets"].as_object() {
        let _ = writeln!(out, "\ntargets\n");
        let _ = writeln!(out, "| target | value | goal | |");
        let _ = writeln!(out, "|---|---|---|---|");
        for (name, v) in t {
            let pass = match v["pass"].as_bool() {
                Some(true) => "pass",
                Some(false) => "MISS",
                None => "0 failed, but a run too small for the target: --reloads 500 --seconds 60",
            };
            let value =
                v["value"].as_str().map(str::to_string).unwrap_or_else(|| v["value"].to_string());
            let _ = writeln!(
                out,
                "| {name} | {value} | {} | {pass} |",
                v["target"].as_str().unwrap_or("")
            );
        }
    }
    out
}

fn run() -> Result<()> {
    let params = Params::parse()?;
    start_watchdog(Duration::from_secs_f64(params.max_seconds));
    let bins = Bins::locate_and_build()?;
    let dir = tempfile::Builder::new().prefix("sockhold-bench.").tempdir()?;
    *LOG_DIR.lock().unwrap() = Some(dir.path().to_path_buf());
    let ctx = Ctx { bins, dir, params, serial: AtomicU64::new(0) };
    let p = &ctx.params;
    let started = Instant::now();
    let version = Command::new(&ctx.bins.sockhold).arg("--version").output()?;
    let version = String::from_utf8_lossy(&version.stdout).trim().to_string();
    eprintln!(
        "reload bench: {version}, parameters {}, logs in {}",
        p.json(),
        ctx.dir.path().display()
    );

    let mut report = json!({
        "bench": "reload",
        "sockhold_version": version.rsplit(' ').next().unwrap_or(""),
        "machine": machine(),
        "params": p.json(),
    });
    if p.has("load") {
        for mode in &p.modes {
            report["load"][mode.name()] = phase_load(&ctx, *mode)?;
        }
    }
    if p.has("latency") {
        report["latency"] = phase_latency(&ctx)?;
    }
    if p.has("memory") || p.has("idle") {
        let (memory, idle) = phase_memory_idle(&ctx)?;
        if let Some(m) = memory {
            report["memory"] = m;
        }
        if let Some(i) = idle {
            report["idle"] = i;
        }
    }
    if p.has("throughput") {
        for mode in &p.modes {
            report["throughput"][mode.name()] = phase_throughput(&ctx, *mode)?;
        }
    }
    report["elapsed_s"] = json!(round(started.elapsed().as_secs_f64(), 1));
    report["targets"] = targets(&report, p);
    println!("{report}");
    print!("{}", table(&report, p));
    Ok(())
}

fn main() {
    if let Err(e) = run() {
        eprintln!("reload bench failed: {e:#}");
        std::process::exit(1);
    }
}

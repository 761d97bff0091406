//! Flow-steering benchmark (issue 13): `cargo bench --bench steer`. Not a timed test: it prints
//! figures, and asserts nothing about them.
//!
//! What it measures: the cost per datagram of `steer=flow` (the reuseport program runs for every
//! datagram the group receives), as UDP request/response throughput through a steered listener
//! (A: `-l udp://127.0.0.1:0,steer=flow`) against a plain one (B: `-l udp://127.0.0.1:0`), with
//! the same child (`examples/udp_session.rs --quiet`, which answers every `ping` with one
//! datagram) and the same clients. Both sockholds run at once; `--clients` client threads, each
//! on a UDP socket of its own (a flow) with `--window` pings in flight, load one of them for
//! `--slice-ms`, then the other, in the order A B B A A B B A ..., `--slices` slices each after
//! one warm-up pair: on a noisy machine this spreads the noise over A and B alike. A slice's
//! figure is answers per second. Reported: the median of each, `ratio` = median(A) / median(B)
//! (the goal is ≥ 0.98), and the median of the per-pair ratios.
//!
//! Then the flow table at its size limit: `--fill-flows` one-datagram flows (each from its own
//! source address and port, over 127.0.0.2 and up) go to A, more than the table holds
//! (`steer::MAX_FLOWS`, 65536, an LRU: the least recently seen flows are forgotten), A's `ctl
//! status` shows how many flows it owns, and the A/B rounds run again with the table full.
//!
//! Flags: `--slices N` (12), `--slice-ms MS` (500), `--clients N` (2), `--window N` (16),
//! `--fill-flows N` (70000; 0 skips the second phase), `--pin CLIENT_CPU,SERVER_CPU` (`0,1` on
//! two CPUs or more, else `none`: the clients run on one CPU, both sockholds and their children
//! on the other, so that A and B get the same placement; unpinned, the scheduler's choice of
//! one CPU or two for a client and its server swings a slice by ±30%), `--a-spec SPEC` and
//! `--b-spec SPEC`
//! (the two listeners, `udp://127.0.0.1:0,steer=flow` and `udp://127.0.0.1:0`; the bench's
//! harness is checked by running it with plain against plain: `--a-spec udp://127.0.0.1:0
//! --fill-flows 0`, where the ratio must come out near 1). It prints one JSON line with every
//! figure and parameter, then a table. It runs the release `sockhold` (cargo bench builds it)
//! and builds the release example `udp_session` first, unless `SOCKHOLD_BENCH_NO_BUILD=1`.

use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};

struct Params {
    slices: usize,
    slice_ms: u64,
    clients: usize,
    window: usize,
    fill_flows: usize,
    a_spec: String,
    b_spec: String,
    /// CPUs for the clients and for the servers, or none.
    pin: Option<(usize, usize)>,
}

fn params() -> Result<Params> {
    let mut p = Params {
        slices: 12,
        slice_ms: 500,
        clients: 2,
        window: 16,
        fill_flows: 70_000,
        a_spec: "udp://127.0.0.1:0,steer=flow".into(),
        b_spec: "udp://127.0.0.1:0".into(),
        pin: (std::thread::available_parallelism().map_or(1, |n| n.get()) >= 2).then_some((0, 1)),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        // cargo bench passes --bench to every bench target.
        if flag == "--bench" {
            continue;
        }
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        let num = || value.parse::<usize>().with_context(|| format!("bad {flag} '{value}'"));
        match flag.as_str() {
            "--slices" => p.slices = num()?,
            "--slice-ms" => p.slice_ms = num()? as u64,
            "--clients" => p.clients = num()?,
            "--window" => p.window = num()?,
            "--fill-flows" => p.fill_flows = num()?,
            "--a-spec" => p.a_spec = value,
            "--b-spec" => p.b_spec = value,
            "--pin" if value == "none" => p.pin = None,
            "--pin" => {
                let (c, s) = value.split_once(',').context("--pin takes CLIENT_CPU,SERVER_CPU")?;
                p.pin = Some((c.parse()?, s.parse()?));
            }
            other => bail!("unknown flag {other} (see the header of benches/steer.rs)"),
        }
    }
    ensure!(p.slices > 0 && p.clients > 0 && p.window > 0, "--slices, --clients, --window > 0");
    Ok(p)
}

/// A sockhold under test: its process, its port, its control socket.
struct Server {
    child: Child,
    port: u16,
    control: PathBuf,
}

impl Server {
    fn start(
        p: &Params,
        dir: &Path,
        bins: (&Path, &Path),
        spec: &str,
        name: &str,
    ) -> Result<Server> {
        let (sockhold, child) = bins;
        let control = dir.join(format!("{name}.sock"));
        // Pinned, sockhold and its child run on the server CPU (the child inherits it).
        let mut cmd = match p.pin {
            Some((_, cpu)) => {
                let mut c = Command::new("taskset");
                c.args(["-c", &cpu.to_string()]).arg(sockhold);
                c
            }
            None => Command::new(sockhold),
        };
        let mut proc = cmd
            .args(["-l", spec, "--ready", "notify", "--control"])
            .arg(&control)
            .arg("--")
            .arg(child)
            .arg("--quiet")
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot start sockhold")?;
        // The port from "listening on udp://127.0.0.1:PORT", then readiness, from the log.
        let mut lines = BufReader::new(proc.stderr.take().context("stderr")?).lines();
        let mut port = None;
        for line in lines.by_ref() {
            let line = line?;
            if let Some(rest) = line.split("listening on udp://127.0.0.1:").nth(1) {
                port = rest.split_whitespace().next().and_then(|p| p.parse().ok());
            }
            if line.contains("is ready") {
                break;
            }
            if line.contains("error:") {
                bail!("sockhold {spec}: {line}");
            }
        }
        // Keep reading its log so that it never blocks on a full pipe.
        std::thread::spawn(move || lines.for_each(drop));
        let port = port.with_context(|| format!("sockhold {spec} said no port"))?;
        Ok(Server { child: proc, port, control })
    }

    fn status(&self, sockhold: &Path) -> Result<Value> {
        let out = Command::new(sockhold)
            .args(["ctl", "--control"])
            .arg(&self.control)
            .args(["status", "--json"])
            .output()?;
        ensure!(out.status.success(), "ctl status: {}", String::from_utf8_lossy(&out.stderr));
        Ok(serde_json::from_slice(&out.stdout)?)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let _ = self.child.wait();
    }
}

/// Client sockets, one per client thread, connected to `port`.
fn clients(port: u16, n: usize) -> Result<Vec<UdpSocket>> {
    (0..n)
        .map(|_| {
            let s = UdpSocket::bind("127.0.0.1:0")?;
            s.connect(("127.0.0.1", port))?;
            s.set_read_timeout(Some(Duration::from_millis(50)))?;
            Ok(s)
        })
        .collect()
}

/// Loads `sockets` for `ms`: each thread keeps `window` pings in flight; answers per second.
fn slice(sockets: &[UdpSocket], window: usize, ms: u64) -> f64 {
    let start = Instant::now();
    let end = start + Duration::from_millis(ms);
    let answers: u64 = std::thread::scope(|scope| {
        let threads: Vec<_> = sockets
            .iter()
            .map(|sock| {
                scope.spawn(move || {
                    let mut buf = [0u8; 256];
                    let mut got = 0u64;
                    let fill = || (0..window).for_each(|_| drop(sock.send(b"ping b")));
                    fill();
                    while Instant::now() < end {
                        match sock.recv(&mut buf) {
                            Ok(_) => {
                                got += 1;
                                let _ = sock.send(b"ping b");
                            }
                            // Lost datagrams (a full queue): put the window back.
                            Err(_) => fill(),
                        }
                    }
                    // Take in what is still in flight, so the next slice starts clean.
                    while sock.recv(&mut buf).is_ok() {}
                    got
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap_or(0)).sum()
    });
    answers as f64 / start.elapsed().as_secs_f64()
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
}

/// The A/B rounds: (A's slices, B's slices).
fn rounds(p: &Params, a: &[UdpSocket], b: &[UdpSocket]) -> (Vec<f64>, Vec<f64>) {
    // Warm-up pair, not counted.
    slice(a, p.window, p.slice_ms);
    slice(b, p.window, p.slice_ms);
    let (mut ra, mut rb) = (Vec::new(), Vec::new());
    for i in 0..p.slices {
        if i % 2 == 0 {
            ra.push(slice(a, p.window, p.slice_ms));
            rb.push(slice(b, p.window, p.slice_ms));
        } else {
            rb.push(slice(b, p.window, p.slice_ms));
            ra.push(slice(a, p.window, p.slice_ms));
        }
    }
    (ra, rb)
}

fn summary(ra: &[f64], rb: &[f64]) -> Value {
    let pairs: Vec<f64> = ra.iter().zip(rb).map(|(a, b)| a / b).collect();
    json!({
        "a_median": median(ra).round(),
        "b_median": median(rb).round(),
        "ratio": (median(ra) / median(rb) * 10_000.0).round() / 10_000.0,
        "pair_ratio_median": (median(&pairs) * 10_000.0).round() / 10_000.0,
        "a": ra.iter().map(|x| x.round()).collect::<Vec<_>>(),
        "b": rb.iter().map(|x| x.round()).collect::<Vec<_>>(),
    })
}

/// Sends one datagram from each of `n` distinct (address, port) pairs, 127.0.0.2 and up: `n`
/// new flows. Returns how many were sent.
fn fill_flows(port: u16, n: usize) -> usize {
    let mut sent = 0;
    'outer: for host in 2u8..=250 {
        for src in 10_000u16..=60_000 {
            if sent == n {
                break 'outer;
            }
            let from = SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, host), src);
            // A port in use here is skipped: another flow takes its place.
            if let Ok(sock) = UdpSocket::bind(from)
                && sock.send_to(b"ping f", ("127.0.0.1", port)).is_ok()
            {
                sent += 1;
            }
        }
    }
    sent
}

fn flows_of(status: &Value) -> Value {
    status["generations"].as_array().map_or(Value::Null, |g| {
        g.iter().map(|g| json!({ "generation": g["id"], "flows": g["flows"] })).collect()
    })
}

fn main() -> Result<()> {
    let p = params()?;
    let sockhold = PathBuf::from(env!("CARGO_BIN_EXE_sockhold"));
    let child = sockhold.parent().context("sockhold's directory")?.join("examples/udp_session");
    if std::env::var_os("SOCKHOLD_BENCH_NO_BUILD").is_none() {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| env!("CARGO").into());
        eprintln!("steer bench: building the example udp_session (release) ...");
        let status = Command::new(cargo)
            .args(["build", "--release", "--example", "udp_session"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .stdout(Stdio::null())
            .status()
            .context("cannot run cargo build")?;
        ensure!(status.success(), "cargo build --release --example udp_session: {status}");
    }
    ensure!(child.is_file(), "{} is missing", child.display());
    let dir = tempfile::tempdir()?;
    let a = Server::start(&p, dir.path(), (&sockhold, &child), &p.a_spec, "a")?;
    let b = Server::start(&p, dir.path(), (&sockhold, &child), &p.b_spec, "b")?;
    if let Some((cpu, _)) = p.pin {
        // The client threads, started later, inherit the main thread's CPU.
        let status = Command::new("taskset")
            .args(["-p", "-c", &cpu.to_string(), &std::process::id().to_string()])
            .stdout(Stdio::null())
            .status()?;
        ensure!(status.success(), "taskset -p -c {cpu} failed: {status}");
    }
    let (ca, cb) = (clients(a.port, p.clients)?, clients(b.port, p.clients)?);

    eprintln!("steer bench: {} slices of {} ms each for A and B ...", p.slices, p.slice_ms);
    let (ra, rb) = rounds(&p, &ca, &cb);
    let mut out = json!({
        "params": {
            "slices": p.slices, "slice_ms": p.slice_ms, "clients": p.clients,
            "window": p.window, "fill_flows": p.fill_flows, "a_spec": p.a_spec, "b_spec": p.b_spec,
            "pin": p.pin.map(|(c, s)| json!({ "clients": c, "servers": s })),
        },
        "throughput": summary(&ra, &rb),
        "a_flows": flows_of(&a.status(&sockhold)?),
    });
    if p.fill_flows > 0 {
        eprintln!("steer bench: {} new flows to A ...", p.fill_flows);
        let started = Instant::now();
        let sent = fill_flows(a.port, p.fill_flows);
        let fill_s = started.elapsed().as_secs_f64();
        let flows = flows_of(&a.status(&sockhold)?);
        let (fa, fb) = rounds(&p, &ca, &cb);
        out["full_table"] = json!({
            "flows_sent": sent,
            "fill_seconds": (fill_s * 100.0).round() / 100.0,
            "a_flows_after_fill": flows,
            "throughput": summary(&fa, &fb),
            "a_flows_after_rounds": flows_of(&a.status(&sockhold)?),
        });
    }
    println!("{out}");
    let row = |name: &str, t: &Value| {
        println!(
            "| {name} | {} | {} | {} | {} |",
            t["a_median"], t["b_median"], t["ratio"], t["pair_ratio_median"]
        )
    };
    println!(
        "\n| phase | A answers/s (median) | B answers/s (median) | ratio A/B | median of pair ratios |"
    );
    println!("|---|---|---|---|---|");
    row("throughput", &out["throughput"]);
    if p.fill_flows > 0 {
        row("flow table full", &out["full_table"]["throughput"]);
        println!("\nA's flows after the fill: {}", out["full_table"]["a_flows_after_fill"]);
    }
    Ok(())
}

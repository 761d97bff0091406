//! `udp_session`: a UDP server with sessions, the fixture of sockhold's flow-steering tests
//! (`steer=flow`) and benchmark. A session exists only in the process that saw its first
//! datagram, as a QUIC connection or a DTLS association does, so a test can tell when a flow
//! lands on a process that does not know it.
//!
//! It takes the UDP socket on fd 3 (`LISTEN_FDS`, `LISTEN_PID`), sends `READY=1` to
//! `$NOTIFY_SOCKET` (unless `--no-notify`), and answers datagrams, each with one datagram:
//!
//! - `open ID` creates session ID, keyed by (peer address, ID), answered `opened ID PID GEN`;
//! - `ping ID` answers `pong ID PID GEN` if this process has the session, else `unknown ID PID GEN`;
//! - anything else answers `error PID GEN`.
//!
//! PID is the process's and GEN its `SOCKHOLD_GENERATION`. It prints JSON lines on stdout, each
//! with `event`, `pid` and `generation` (the same shape as `fixture`'s, so the test harness reads
//! both): `start` (with `local`, fd 3's address), `ready` (READY=1 sent), `signal` (with
//! `signal`), `exit` (with `sessions`, `datagrams` and `code`). Options:
//!
//! - `--no-notify`: never send READY=1 (for `--ready delay:`);
//! - `--ready-on-usr1-gen G` (repeatable): generation G sends READY=1 only on SIGUSR1, so a test
//!   can hold it in "starting" as long as it likes;
//! - `--exit-gen G:CODE` (repeatable): generation G exits with CODE at start, before it is ready;
//! - `--drain DUR` (e.g. `500ms`): on SIGTERM, keep answering for DUR before exiting, instead of
//!   exiting at once as most UDP servers do;
//! - `--quiet`: no `opened` lines (for the benchmark).
//!
//! SIGTERM and SIGINT end it (exit 0, after `--drain`).

use std::collections::HashSet;
use std::io::Write;
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use signal_hook::consts::{SIGINT, SIGTERM, SIGUSR1};
use signal_hook::iterator::Signals;

fn generation() -> String {
    std::env::var("SOCKHOLD_GENERATION").unwrap_or_default()
}

/// Prints one JSON line with the event, pid and generation, in a single write.
fn report(event: &str, mut fields: Value) {
    fields["event"] = json!(event);
    fields["pid"] = json!(std::process::id());
    fields["generation"] = json!(generation());
    let mut line = fields.to_string();
    line.push('\n');
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(line.as_bytes());
    let _ = out.flush();
}

fn usage(message: &str) -> ! {
    eprintln!("udp_session: {message}");
    std::process::exit(2)
}

#[derive(Default)]
struct Args {
    notify: bool,
    ready_on_usr1_gens: Vec<String>,
    exit_gens: Vec<(String, i32)>,
    drain: Option<Duration>,
    quiet: bool,
}

fn parse_args() -> Args {
    let mut args = Args { notify: true, ..Args::default() };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value =
            |name: &str| it.next().unwrap_or_else(|| usage(&format!("{name} needs a value")));
        match arg.as_str() {
            "--no-notify" => args.notify = false,
            "--ready-on-usr1-gen" => args.ready_on_usr1_gens.push(value("--ready-on-usr1-gen")),
            "--exit-gen" => {
                let v = value("--exit-gen");
                let (g, c) = v.split_once(':').unwrap_or_else(|| usage("--exit-gen takes G:CODE"));
                let code = c.parse().unwrap_or_else(|_| usage(&format!("bad exit code '{c}'")));
                args.exit_gens.push((g.to_string(), code));
            }
            "--drain" => {
                let v = value("--drain");
                let d = humantime::parse_duration(&v)
                    .unwrap_or_else(|e| usage(&format!("bad --drain '{v}': {e}")));
                args.drain = Some(d);
            }
            "--quiet" => args.quiet = true,
            other => usage(&format!("unknown argument '{other}'")),
        }
    }
    args
}

/// The only unsafe code here: taking over the socket the parent handed us.
#[allow(unsafe_code)]
fn inherited_socket() -> UdpSocket {
    use std::os::fd::FromRawFd;
    let pid_ok = std::env::var("LISTEN_PID").ok() == Some(std::process::id().to_string());
    let fds: u32 = std::env::var("LISTEN_FDS").ok().and_then(|n| n.parse().ok()).unwrap_or(0);
    if !pid_ok || fds < 1 {
        usage("needs a socket on fd 3 (LISTEN_FDS >= 1, LISTEN_PID = this process)");
    }
    if std::fs::read_link("/proc/self/fd/3").is_err() {
        usage("LISTEN_FDS says fd 3 but it is not open");
    }
    // SAFETY: LISTEN_PID names this process, so the parent opened fd 3 for it; it is open
    // (checked above) and this is the only place that takes it, so the socket is its only owner.
    let socket = unsafe { UdpSocket::from_raw_fd(3) };
    // A non-UDP fd 3 fails here with a clear message rather than misbehaving later.
    if let Err(e) = socket.local_addr() {
        usage(&format!("fd 3 is not a bound socket: {e}"));
    }
    socket
}

/// Sends one datagram to `$NOTIFY_SOCKET`, like sd_notify(3); reports `ready`.
fn notify_ready() {
    use std::os::unix::net::UnixDatagram;
    let Ok(path) = std::env::var("NOTIFY_SOCKET") else {
        report("ready", json!({ "notify": "no-socket" }));
        return;
    };
    let sent = UnixDatagram::unbound().and_then(|sock| match path.strip_prefix('@') {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
            sock.send_to_addr(b"READY=1", &addr)
        }
        None => sock.send_to(b"READY=1", &path),
    });
    report("ready", json!({ "notify": if sent.is_ok() { "ok" } else { "failed" } }));
}

fn main() {
    let args = parse_args();
    let socket = inherited_socket();
    let local = socket.local_addr().map(|a| a.to_string()).unwrap_or_default();
    let gen_ = generation();
    // The handlers are in place before "start" is reported: a test that signals this process
    // once it has seen the line must not kill it with the default action.
    let mut signals = Signals::new([SIGTERM, SIGINT, SIGUSR1]).expect("signal handlers");
    report("start", json!({ "local": local }));
    if let Some((_, code)) = args.exit_gens.iter().find(|(g, _)| *g == gen_) {
        report("exit", json!({ "sessions": 0, "datagrams": 0, "code": code }));
        std::process::exit(*code);
    }

    let datagrams = Arc::new(AtomicU64::new(0));
    let sessions = Arc::new(AtomicU64::new(0));
    let wait_usr1 = args.ready_on_usr1_gens.contains(&gen_);
    {
        let (datagrams, sessions) = (Arc::clone(&datagrams), Arc::clone(&sessions));
        let (notify, drain) = (args.notify, args.drain);
        std::thread::spawn(move || {
            for signal in signals.forever() {
                let name = match signal {
                    SIGTERM => "TERM",
                    SIGINT => "INT",
                    _ => "USR1",
                };
                report("signal", json!({ "signal": name }));
                if signal == SIGUSR1 {
                    if wait_usr1 && notify {
                        notify_ready();
                    }
                    continue;
                }
                if let Some(drain) = drain {
                    // Go on answering on the main thread meanwhile.
                    std::thread::sleep(drain);
                }
                report(
                    "exit",
                    json!({
                        "sessions": sessions.load(Ordering::Relaxed),
                        "datagrams": datagrams.load(Ordering::Relaxed),
                        "code": 0,
                    }),
                );
                std::process::exit(0);
            }
        });
    }
    if args.notify && !wait_usr1 {
        notify_ready();
    }

    let pid = std::process::id();
    let mut known: HashSet<(SocketAddr, String)> = HashSet::new();
    let mut buf = [0u8; 2048];
    loop {
        let (n, peer) = match socket.recv_from(&mut buf) {
            Ok(got) => got,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                report("error", json!({ "recv": e.to_string() }));
                std::process::exit(1);
            }
        };
        datagrams.fetch_add(1, Ordering::Relaxed);
        let text = String::from_utf8_lossy(&buf[..n]);
        let mut words = text.split_whitespace();
        let answer = match (words.next(), words.next()) {
            (Some("open"), Some(id)) => {
                if known.insert((peer, id.to_string())) {
                    sessions.fetch_add(1, Ordering::Relaxed);
                }
                if !args.quiet {
                    report("opened", json!({ "id": id, "peer": peer.to_string() }));
                }
                format!("opened {id} {pid} {gen_}")
            }
            (Some("ping"), Some(id)) => {
                let word = if known.contains(&(peer, id.to_string())) { "pong" } else { "unknown" };
                format!("{word} {id} {pid} {gen_}")
            }
            _ => format!("error {pid} {gen_}"),
        };
        // A full send buffer or a peer gone: the answer is lost as a datagram may be.
        let _ = socket.send_to(answer.as_bytes(), peer);
    }
}

//! The test fixture child: run by sockhold's integration tests as the supervised COMMAND, it
//! reports what it sees as JSON lines on stdout (its fds, environment, signal state, ids, groups
//! and working directory at start, then every signal it receives) and behaves as its arguments
//! say (send READY=1, ignore SIGTERM, exit with a code, serve HTTP, send notify messages on
//! demand, try to get root back, hold connections open and drain them, double-fork a daemon, shut
//! the shared listener down, leave orphans behind). Every line carries its pid and its `SOCKHOLD_GENERATION`, so a
//! test can tell the generations apart.

use std::io::{IoSlice, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::time::Duration;

use nix::fcntl::{FcntlArg, FdFlag, OFlag, fcntl};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{
    self, AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType, SockaddrLike,
    SockaddrStorage, UnixAddr, sockopt,
};
use serde_json::{Value, json};
use signal_hook::consts::*;
use signal_hook::iterator::Signals;

#[derive(Default)]
struct Args {
    ready: bool,
    ready_gens: Vec<String>,
    status: Option<String>,
    exit: Option<i32>,
    exit_gens: Vec<(String, i32)>,
    ignore_term: bool,
    ignore_term_gens: Vec<String>,
    serve: bool,
    notify_on_usr1: Option<String>,
    fork_notify_ready: bool,
    set_nonblock: bool,
    set_nonblock_gens: Vec<String>,
    try_regain_root: bool,
    daemon: bool,
    hold: bool,
    shutdown_listener_gens: Vec<String>,
    shutdown_listener_on_usr1: bool,
    orphans: u32,
    lingering_orphan: bool,
}

fn generation() -> Option<String> {
    std::env::var("SOCKHOLD_GENERATION").ok()
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
    eprintln!("fixture: {message}");
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut args = Args::default();
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value =
            |name: &str| it.next().unwrap_or_else(|| usage(&format!("{name} needs a value")));
        match arg.as_str() {
            "--ready" => args.ready = true,
            "--ready-gen" => args.ready_gens.push(value("--ready-gen")),
            "--status" => args.status = Some(value("--status")),
            "--exit" => {
                args.exit = Some(value("--exit").parse().unwrap_or_else(|_| usage("bad --exit")))
            }
            "--exit-gen" => {
                let v = value("--exit-gen");
                let (g, c) = v.split_once(':').unwrap_or_else(|| usage("--exit-gen takes N:CODE"));
                args.exit_gens
                    .push((g.to_string(), c.parse().unwrap_or_else(|_| usage("bad code"))));
            }
            "--ignore-term" => args.ignore_term = true,
            "--ignore-term-gen" => args.ignore_term_gens.push(value("--ignore-term-gen")),
            "--serve" => args.serve = true,
            "--notify-on-usr1" => {
                args.notify_on_usr1 = Some(value("--notify-on-usr1").replace("\\n", "\n"))
            }
            "--fork-notify-ready" => args.fork_notify_ready = true,
            "--set-nonblock" => args.set_nonblock = true,
            "--set-nonblock-gen" => args.set_nonblock_gens.push(value("--set-nonblock-gen")),
            "--try-regain-root" => args.try_regain_root = true,
            "--daemon" => args.daemon = true,
            "--hold" => args.hold = true,
            "--shutdown-listener-gen" => {
                args.shutdown_listener_gens.push(value("--shutdown-listener-gen"))
            }
            "--shutdown-listener-on-usr1" => args.shutdown_listener_on_usr1 = true,
            "--send-notify" => {
                // Helper mode: send one message from this (other) process, then exit.
                let text = value("--send-notify");
                let barrier = notify(&text);
                report("helper-notified", json!({ "barrier": barrier }));
                std::process::exit(0);
            }
            "--orphans" => {
                args.orphans = value("--orphans").parse().unwrap_or_else(|_| usage("bad --orphans"))
            }
            "--lingering-orphan" => args.lingering_orphan = true,
            "--spawn-orphan" => {
                // Helper mode: start a grandchild and exit at once without waiting for it, so
                // that it is orphaned, as a double-forking daemon's first child does.
                let kind = value("--spawn-orphan");
                let exe = std::env::current_exe().expect("own path");
                let spawned = std::process::Command::new(exe)
                    .args(["--be-orphan", &kind, "--orphan-of", &std::process::id().to_string()])
                    .spawn();
                std::process::exit(if spawned.is_ok() { 0 } else { 1 });
            }
            "--be-orphan" => {
                let kind = value("--be-orphan");
                let _ = it.next();
                let parent = it.next().and_then(|p| p.parse().ok()).unwrap_or(0);
                be_orphan(&kind, nix::unistd::Pid::from_raw(parent))
            }
            other => usage(&format!("unknown argument '{other}'")),
        }
    }
    args
}

/// The orphaned grandchild: waits until its parent is gone and it has been re-parented, says
/// who adopted it, then exits (`exit`: a zombie for the adopter to reap) or stays (`linger`, or
/// `daemon`, reported as a `daemon` line: a daemon left in the generation's process group).
fn be_orphan(kind: &str, parent: nix::unistd::Pid) -> ! {
    // `parent` is the helper's pid as it said, not getppid(): the helper may be gone already.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    // No event tells a process that it was re-parented: poll, bounded.
    while nix::unistd::getppid() == parent && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
    let ppid = nix::unistd::getppid().as_raw();
    let pgid = nix::unistd::getpgrp().as_raw();
    match kind {
        // `--daemon`: the fault suite's double-forked daemon.
        "daemon" => report("daemon", json!({ "ppid": ppid, "pgid": pgid })),
        _ => report("orphan", json!({ "kind": kind, "ppid": ppid, "pgid": pgid })),
    }
    if kind != "exit" {
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    std::process::exit(0)
}

/// Runs `--spawn-orphan KIND` and waits for it: its child is left an orphan.
fn make_orphan(kind: &str) {
    let exe = std::env::current_exe().expect("own path");
    let status = std::process::Command::new(exe).args(["--spawn-orphan", kind]).status();
    if !status.is_ok_and(|s| s.success()) {
        report("orphan-failed", json!({ "kind": kind }));
    }
}

fn notify_socket() -> Option<(OwnedFd, UnixAddr)> {
    let path = std::env::var("NOTIFY_SOCKET").ok()?;
    let addr = match path.strip_prefix('@') {
        Some(name) => UnixAddr::new_abstract(name.as_bytes()).ok()?,
        None => UnixAddr::new(path.as_str()).ok()?,
    };
    let fd = socket::socket(AddressFamily::Unix, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None)
        .ok()?;
    Some((fd, addr))
}

/// Sends `text` as one datagram, then waits for the receiver as sd_notify_barrier(3) does.
/// Returns "ok", "timeout", or "no-socket".
fn notify(text: &str) -> &'static str {
    let Some((fd, addr)) = notify_socket() else {
        return "no-socket";
    };
    let send = |iov: &[IoSlice<'_>], cmsgs: &[ControlMessage<'_>]| {
        socket::sendmsg(fd.as_raw_fd(), iov, cmsgs, MsgFlags::empty(), Some(&addr))
    };
    if send(&[IoSlice::new(text.as_bytes())], &[]).is_err() {
        return "send-failed";
    }
    let Ok((read, write)) = nix::unistd::pipe2(OFlag::O_CLOEXEC) else {
        return "pipe-failed";
    };
    let fds = [write.as_raw_fd()];
    if send(&[IoSlice::new(b"BARRIER=1")], &[ControlMessage::ScmRights(&fds)]).is_err() {
        return "send-failed";
    }
    drop(write);
    let mut pfd = [PollFd::new(read.as_fd(), PollFlags::POLLIN)];
    match poll(&mut pfd, PollTimeout::from(5000u16)) {
        Ok(n) if n > 0 => "ok",
        _ => "timeout",
    }
}

fn proc_status_field(name: &str) -> String {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
        .unwrap_or_default()
}

fn describe_socket(fd: BorrowedFd<'_>) -> Value {
    let Ok(kind) = socket::getsockopt(&fd, sockopt::SockType) else {
        return Value::Null;
    };
    let kind = match kind {
        SockType::Stream => "stream",
        SockType::Datagram => "dgram",
        SockType::SeqPacket => "seqpacket",
        _ => "other",
    };
    let listening = socket::getsockopt(&fd, sockopt::AcceptConn).unwrap_or(false);
    let (family, local) = match socket::getsockname::<SockaddrStorage>(fd.as_raw_fd()) {
        Ok(addr) => match addr.family() {
            Some(AddressFamily::Inet) => {
                ("inet", addr.as_sockaddr_in().map(|a| a.to_string()).unwrap_or_default())
            }
            Some(AddressFamily::Inet6) => {
                ("inet6", addr.as_sockaddr_in6().map(|a| a.to_string()).unwrap_or_default())
            }
            Some(AddressFamily::Unix) => {
                let unix = addr.as_unix_addr();
                let local = match (unix.and_then(|u| u.path()), unix.and_then(|u| u.as_abstract()))
                {
                    (Some(path), _) => path.display().to_string(),
                    (None, Some(name)) => format!("@{}", String::from_utf8_lossy(name)),
                    _ => String::new(),
                };
                ("unix", local)
            }
            _ => ("other", String::new()),
        },
        Err(_) => ("unknown", String::new()),
    };
    // The options a listen spec can set, as the kernel reports them (null where one does not
    // apply to this kind of socket). rcvbuf/sndbuf are the kernel's doubled figures.
    let device = socket::getsockopt(&fd, sockopt::BindToDevice).ok();
    let device = device.map(|d| d.to_string_lossy().into_owned()).filter(|d| !d.is_empty());
    json!({
        "family": family,
        "type": kind,
        "listening": listening,
        "local": local,
        "reuseport": socket::getsockopt(&fd, sockopt::ReusePort).ok(),
        "v6only": socket::getsockopt(&fd, sockopt::Ipv6V6Only).ok(),
        "freebind": socket::getsockopt(&fd, sockopt::IpFreebind).ok(),
        "nodelay": socket::getsockopt(&fd, sockopt::TcpNoDelay).ok(),
        "keepalive": socket::getsockopt(&fd, sockopt::KeepAlive).ok(),
        "rcvbuf": socket::getsockopt(&fd, sockopt::RcvBuf).ok(),
        "sndbuf": socket::getsockopt(&fd, sockopt::SndBuf).ok(),
        "bound_device": device,
    })
}

fn describe_fds() -> Vec<Value> {
    let mut numbers: Vec<i32> = match std::fs::read_dir("/proc/self/fd") {
        Ok(dir) => dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect(),
        Err(_) => Vec::new(),
    };
    numbers.sort();
    let mut out = Vec::new();
    for raw in numbers {
        // The directory listing's own fd is closed by now: `borrow` finds it gone and skips it.
        let Some(fd) = borrow(raw) else { continue };
        let Ok(fd_flags) = fcntl(fd, FcntlArg::F_GETFD) else {
            continue;
        };
        let fl_flags = fcntl(fd, FcntlArg::F_GETFL).unwrap_or(0);
        out.push(json!({
            "fd": raw,
            "cloexec": FdFlag::from_bits_truncate(fd_flags).contains(FdFlag::FD_CLOEXEC),
            "nonblock": OFlag::from_bits_truncate(fl_flags).contains(OFlag::O_NONBLOCK),
            "socket": describe_socket(fd),
        }));
    }
    out
}

/// Borrows an inherited fd by number, if it is open.
#[allow(unsafe_code)]
fn borrow(raw: i32) -> Option<BorrowedFd<'static>> {
    // SAFETY: the fixture never closes fds it inherited, so an fd that is open now stays open
    // for the life of the process; the F_GETFD probe below checks that it is open at all.
    let fd = unsafe { BorrowedFd::borrow_raw(raw) };
    fcntl(fd, FcntlArg::F_GETFD).ok().map(|_| fd)
}

/// Takes ownership of a connection fd that `accept` just returned.
#[allow(unsafe_code)]
fn own(raw: i32) -> OwnedFd {
    // SAFETY: `raw` was just returned by accept(2) and nothing else refers to it.
    unsafe { std::os::fd::FromRawFd::from_raw_fd(raw) }
}

fn serve() {
    let Some(listener) = borrow(3) else { return };
    std::thread::spawn(move || {
        loop {
            let mut pfd = [PollFd::new(listener, PollFlags::POLLIN)];
            if poll(&mut pfd, PollTimeout::NONE).is_err() {
                continue;
            }
            let Ok(conn) = socket::accept(listener.as_raw_fd()) else {
                continue;
            };
            let mut stream = std::net::TcpStream::from(own(conn));
            let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            let pid = std::process::id();
            let body = format!("{pid}\n");
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\nX-Pid: {pid}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
}

/// Shuts the inherited listener down for every holder, as Gazelle did under Server::Starter,
/// and reports whether it still listens.
fn shutdown_listener() {
    let Some(fd) = borrow(3) else { return };
    let result = socket::shutdown(fd.as_raw_fd(), socket::Shutdown::Both);
    let listening = socket::getsockopt(&fd, sockopt::AcceptConn).unwrap_or(false);
    let error = result.err().map(|e| e.to_string());
    report("shutdown-listener", json!({ "listening": listening, "error": error }));
}

/// `--hold`: connections held open, as a server with keep-alive or websocket clients.
struct Hold {
    /// Connections accepted and not yet closed by their peer.
    open: std::sync::Mutex<usize>,
    /// Set by SIGTERM: stop accepting, exit when the last connection closes.
    draining: std::sync::atomic::AtomicBool,
    /// Written on SIGTERM, to wake the accepting thread out of poll.
    wake: OwnedFd,
}

impl Hold {
    /// Accepts on fd 3 until draining; each connection answers every line it gets with
    /// "PID GENERATION" until its peer closes it.
    fn start() -> std::sync::Arc<Hold> {
        let (wake_read, wake) = nix::unistd::pipe2(OFlag::O_CLOEXEC).expect("pipe");
        let hold = std::sync::Arc::new(Hold {
            open: std::sync::Mutex::new(0),
            draining: std::sync::atomic::AtomicBool::new(false),
            wake,
        });
        let listener = borrow(3).expect("fd 3");
        let accepting = std::sync::Arc::clone(&hold);
        std::thread::spawn(move || {
            loop {
                let mut pfd = [
                    PollFd::new(listener, PollFlags::POLLIN),
                    PollFd::new(wake_read.as_fd(), PollFlags::POLLIN),
                ];
                if poll(&mut pfd, PollTimeout::NONE).is_err() {
                    continue;
                }
                if pfd[1].any().unwrap_or(false) {
                    report("stopped-accepting", json!({}));
                    return;
                }
                let Ok(conn) = socket::accept(listener.as_raw_fd()) else {
                    continue;
                };
                *accepting.open.lock().expect("lock") += 1;
                let stream = std::net::TcpStream::from(own(conn));
                let serving = std::sync::Arc::clone(&accepting);
                std::thread::spawn(move || serving.serve(stream));
            }
        });
        hold
    }

    fn serve(&self, stream: std::net::TcpStream) {
        use std::io::BufRead;
        let answer = format!("{} {}\n", std::process::id(), generation().unwrap_or_default());
        let mut writer = &stream;
        for line in std::io::BufReader::new(&stream).lines() {
            if line.is_err() || writer.write_all(answer.as_bytes()).is_err() {
                break;
            }
        }
        let mut open = self.open.lock().expect("lock");
        *open -= 1;
        self.exit_if_drained(*open);
    }

    /// SIGTERM: stop accepting; exit once no connection is left.
    fn drain(&self) {
        self.draining.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = nix::unistd::write(&self.wake, b"x");
        let open = self.open.lock().expect("lock");
        report("draining", json!({ "open": *open }));
        self.exit_if_drained(*open);
    }

    fn exit_if_drained(&self, open: usize) {
        if open == 0 && self.draining.load(std::sync::atomic::Ordering::SeqCst) {
            report("exit", json!({ "code": 0 }));
            std::process::exit(0);
        }
    }
}

fn main() {
    // 1. Signal state and fds first, before this process changes anything.
    let sigblk = proc_status_field("SigBlk:");
    let sigign = proc_status_field("SigIgn:");
    let fds = describe_fds();
    let args = parse_args();
    let generation = generation();
    let in_gen = |list: &[String]| generation.as_ref().is_some_and(|g| list.contains(g));

    // 2. Handlers before the start line, so a test that signals after reading it never kills us.
    let mut signals = Signals::new([
        SIGHUP, SIGINT, SIGQUIT, SIGUSR1, SIGUSR2, SIGTERM, SIGWINCH, SIGALRM, SIGTTIN, SIGTTOU,
        SIGCONT,
    ])
    .expect("install signal handlers");

    // 3. The start line.
    let env: serde_json::Map<String, Value> = std::env::vars()
        .filter(|(k, _)| {
            k.starts_with("LISTEN_")
                || k == "NOTIFY_SOCKET"
                || k.starts_with("WATCHDOG_")
                || k.starts_with("SOCKHOLD_")
                || k.starts_with("FIXTURE_")
                || k.starts_with("EINHORN_")
                || k.starts_with("SERVER_STARTER_")
                || k == "NGINX"
                || k.starts_with("REMOTE_")
                || k.starts_with("WORLD_")
                || k == "RUNTIME_DIRECTORY"
        })
        .map(|(k, v)| (k, json!(v)))
        .collect();
    report(
        "start",
        json!({
            "ppid": nix::unistd::getppid().as_raw(),
            "pgid": nix::unistd::getpgrp().as_raw(),
            "sid": nix::unistd::getsid(None).map(|p| p.as_raw()).unwrap_or(-1),
            "argv": std::env::args().collect::<Vec<_>>(),
            "env": env,
            "sigblk": sigblk,
            "sigign": sigign,
            "fds": fds,
            // Real, effective, saved and filesystem ids, and the supplementary groups, as the
            // kernel reports them.
            "uid": proc_status_field("Uid:"),
            "gid": proc_status_field("Gid:"),
            "groups": proc_status_field("Groups:"),
            "cwd": std::env::current_dir().map(|d| d.display().to_string()).unwrap_or_default(),
        }),
    );

    // 4. What the arguments ask for.
    if args.set_nonblock || in_gen(&args.set_nonblock_gens) {
        // As Go, gunicorn and uWSGI do: the flag lands on the description every holder shares.
        let fd = borrow(3).expect("fd 3");
        let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL).expect("F_GETFL"));
        fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK)).expect("F_SETFL");
        report("set-nonblock", json!({}));
    }
    if args.try_regain_root {
        // A child that dropped its privileges must not get them back.
        let describe = |r: nix::Result<()>| match r {
            Ok(()) => "ok".to_string(),
            Err(e) => format!("{e}"),
        };
        let setgid = describe(nix::unistd::setgid(nix::unistd::Gid::from_raw(0)));
        let setuid = describe(nix::unistd::setuid(nix::unistd::Uid::from_raw(0)));
        let setgroups = describe(nix::unistd::setgroups(&[nix::unistd::Gid::from_raw(0)]));
        report(
            "regain-root",
            json!({
                "setuid": setuid,
                "setgid": setgid,
                "setgroups": setgroups,
                "uid": proc_status_field("Uid:"),
            }),
        );
    }
    if args.serve {
        serve();
    }
    let hold = args.hold.then(Hold::start);
    if args.daemon {
        make_orphan("daemon");
    }
    if in_gen(&args.shutdown_listener_gens) {
        shutdown_listener();
    }
    for _ in 0..args.orphans {
        make_orphan("exit");
    }
    if args.lingering_orphan {
        make_orphan("linger");
    }
    if let Some(status) = &args.status {
        notify(&format!("STATUS={status}"));
    }
    if args.ready || in_gen(&args.ready_gens) {
        let barrier = notify("READY=1");
        report("ready-sent", json!({ "barrier": barrier }));
    }
    if args.fork_notify_ready {
        let exe = std::env::current_exe().expect("own path");
        let helper = std::process::Command::new(exe).args(["--send-notify", "READY=1"]).spawn();
        match helper.and_then(|mut child| child.wait().map(|_| child.id())) {
            Ok(helper_pid) => report("ready-sent-by-helper", json!({ "helper_pid": helper_pid })),
            Err(e) => report("helper-failed", json!({ "error": e.to_string() })),
        }
    }
    let exit = args
        .exit_gens
        .iter()
        .find(|(g, _)| generation.as_deref() == Some(g.as_str()))
        .map(|(_, code)| *code)
        .or(args.exit);
    if let Some(code) = exit {
        report("exit", json!({ "code": code }));
        std::process::exit(code);
    }

    // 5. Report every signal; stop on TERM/INT unless told not to.
    let ignore_term = args.ignore_term || in_gen(&args.ignore_term_gens);
    for signal in signals.forever() {
        let name = signal_hook::low_level::signal_name(signal).unwrap_or("?");
        let name = name.strip_prefix("SIG").unwrap_or(name);
        report("signal", json!({ "signal": name }));
        match signal {
            SIGTERM | SIGINT if hold.is_some() => {
                if let Some(hold) = &hold {
                    hold.drain();
                }
            }
            SIGTERM | SIGINT if !ignore_term => {
                report("exit", json!({ "code": 0 }));
                std::process::exit(0);
            }
            SIGUSR1 => {
                if args.shutdown_listener_on_usr1 {
                    shutdown_listener();
                }
                if let Some(text) = &args.notify_on_usr1 {
                    let barrier = notify(text);
                    report("notified", json!({ "text": text, "barrier": barrier }));
                }
            }
            _ => {}
        }
    }
}

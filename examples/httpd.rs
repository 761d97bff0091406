//! `httpd`: the example server for sockhold, a small but careful HTTP/1.1
//! server written the way a program run under sockhold should be written.
//!
//! It takes its listening sockets from the systemd socket-activation protocol
//! (`LISTEN_FDS`/`LISTEN_PID`, fds 3 and up), says `READY=1` on
//! `$NOTIFY_SOCKET` once it accepts connections, and on SIGTERM or SIGINT
//! drains: it stops accepting, finishes every connection it has accepted, and
//! exits 0. Each response names the process and sockhold generation that
//! served it, so a reload can be watched with `curl -i`. Outside sockhold it
//! runs under `systemd-socket-activate -l 127.0.0.1:8080 httpd`, or with
//! `--bind 127.0.0.1:8080` it binds the port itself.
//!
//! It serves every socket it is given, so it answers sockhold's `health`
//! listener (`--ready http:/healthz`) like any other: `GET /healthz` answers
//! 200, or the status given with `--health-status`. With a watchdog
//! (`WATCHDOG_USEC` and `WATCHDOG_PID` set to its pid) it sends `WATCHDOG=1`
//! twice per period. `--no-notify` makes it a server that knows nothing of
//! sd_notify: it never writes to `$NOTIFY_SOCKET`.

/// Logs one line to stderr. Unlike `eprintln!`, it never panics: a server must keep serving when
/// whoever reads its stderr (a log pipe, `logger`) has gone away.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

use std::ffi::OsString;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;
use std::{env, process, thread};

use anyhow::{Context, Result, anyhow, bail};
use nix::errno::Errno;
use nix::fcntl::{FcntlArg, FdFlag, OFlag, fcntl};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{self, AddressFamily as Af, MsgFlags, SockFlag, SockType, SockaddrLike};
use nix::sys::socket::{Shutdown, SockaddrStorage, UnixAddr, sockopt};
use nix::sys::time::{TimeVal, TimeValLike};
use signal_hook::{consts::SIGINT, consts::SIGTERM, iterator::Signals};

/// Request line plus headers may not exceed this.
const MAX_HEAD: usize = 16 * 1024;
/// How long an idle keep-alive connection, or a stalled read or write, may last.
const IDLE_SECS: i64 = 30;

/// The socket-activation variables, read once at startup.
#[derive(Clone)]
struct Activation {
    listen_fds: Option<OsString>,
    listen_pid: Option<OsString>,
    notify_socket: Option<OsString>,
}

/// The only unsafe code in this program: taking over what the parent handed us.
#[allow(unsafe_code)]
mod inherited {
    use std::os::fd::{FromRawFd, OwnedFd, RawFd};
    use std::sync::atomic::{AtomicBool, Ordering::SeqCst};

    /// Reads and removes the activation variables, as `sd_listen_fds(1)` does,
    /// so that a program we start never takes the sockets for its own.
    pub fn take_env() -> super::Activation {
        let take = |name| {
            let value = std::env::var_os(name);
            // SAFETY: called first thing in `main`, before this program starts
            // any thread, so nothing can be reading the environment meanwhile.
            unsafe { std::env::remove_var(name) };
            value
        };
        take("LISTEN_FDNAMES"); // every socket is served alike: names don't matter
        let (listen_fds, listen_pid) = (take("LISTEN_FDS"), take("LISTEN_PID"));
        super::Activation { listen_fds, listen_pid, notify_socket: take("NOTIFY_SOCKET") }
    }

    /// Takes ownership of fds 3..3+count (once; a second call panics).
    pub fn adopt_listen_fds(count: RawFd) -> anyhow::Result<Vec<OwnedFd>> {
        static ADOPTED: AtomicBool = AtomicBool::new(false);
        assert!(!ADOPTED.swap(true, SeqCst), "listen fds adopted twice");
        let have_proc = std::path::Path::new("/proc/self/fd").is_dir();
        let adopt = |fd| {
            // readlink opens no fd, so it checks `fd` without disturbing the table.
            if have_proc && std::fs::read_link(format!("/proc/self/fd/{fd}")).is_err() {
                anyhow::bail!("LISTEN_FDS is {count} but fd {fd} is not open");
            }
            // SAFETY: LISTEN_PID names this process, so the parent opened fds
            // 3..3+LISTEN_FDS for it; `fd` is open (checked above when /proc
            // allows) and nothing else in this program uses these numbers
            // (adoption happens once), so this OwnedFd is its only owner.
            Ok(unsafe { OwnedFd::from_raw_fd(fd) })
        };
        (3..3 + count).map(adopt).collect()
    }
}

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Listener {
    /// Checks that `fd` is a listening stream socket and wraps it.
    fn new(fd: OwnedFd) -> Result<Listener> {
        let raw = fd.as_raw_fd();
        let ty = socket::getsockopt(&fd, sockopt::SockType)
            .map_err(|e| anyhow!("fd {raw} is not a socket ({e})"))?;
        if ty != SockType::Stream {
            bail!("fd {raw} is a {} socket, not a stream socket", format!("{ty:?}").to_lowercase());
        }
        if !socket::getsockopt(&fd, sockopt::AcceptConn)? {
            bail!("fd {raw} is a stream socket but is not listening");
        }
        match socket::getsockname::<SockaddrStorage>(raw)?.family() {
            Some(Af::Inet | Af::Inet6) => Ok(Listener::Tcp(fd.into())),
            Some(Af::Unix) => Ok(Listener::Unix(fd.into())),
            other => bail!("fd {raw} has unsupported address family {other:?}"),
        }
    }

    fn fd(&self) -> BorrowedFd<'_> {
        match self {
            Listener::Tcp(l) => l.as_fd(),
            Listener::Unix(l) => l.as_fd(),
        }
    }

    /// Returns a function that connects to this listener and hangs up at
    /// once: see `run` for why.
    fn waker(&self) -> Box<dyn Fn()> {
        match self {
            Listener::Tcp(l) => match l.local_addr() {
                Ok(mut addr) => {
                    if addr.ip().is_unspecified() {
                        addr.set_ip(match addr {
                            SocketAddr::V4(_) => Ipv4Addr::LOCALHOST.into(),
                            SocketAddr::V6(_) => Ipv6Addr::LOCALHOST.into(),
                        });
                    }
                    Box::new(move || {
                        drop(TcpStream::connect_timeout(&addr, Duration::from_secs(1)))
                    })
                }
                Err(_) => Box::new(|| {}),
            },
            Listener::Unix(l) => match l.local_addr() {
                Ok(addr) => Box::new(move || drop(UnixStream::connect_addr(&addr))),
                Err(_) => Box::new(|| {}),
            },
        }
    }

    /// Accepts one connection and serves it on a thread of its own.
    fn accept_and_serve(&self, server: &Arc<Server>) -> io::Result<()> {
        match self {
            Listener::Tcp(l) => spawn_connection(server, l.accept()?.0),
            Listener::Unix(l) => spawn_connection(server, l.accept()?.0),
        }
        Ok(())
    }
}

/// State shared by the main thread, the acceptors and the connections.
struct Server {
    pid: u32,
    generation: String,
    /// What `GET /healthz` answers.
    health_status: u16,
    /// Read end of the stop pipe: written once and never drained, so it stays
    /// readable and every thread that polls it sees the stop.
    stop: OwnedFd,
    stopping: AtomicBool,
    /// Connections being served, connections finished since the stop, and
    /// acceptor threads still running.
    conns: Mutex<(usize, usize, usize)>,
    conns_changed: Condvar,
}

fn main() {
    let activation = inherited::take_env(); // before anything else, see there
    let pid = process::id();
    if let Err(e) = run(activation, pid) {
        say!("httpd[{pid}]: {e:#}");
        process::exit(1);
    }
}

fn run(activation: Activation, pid: u32) -> Result<()> {
    let usage = || -> ! {
        say!(
            "usage: httpd [--bind ADDR] [--no-notify] [--health-status CODE]  \
             (without --bind: sockets from LISTEN_FDS)"
        );
        process::exit(2);
    };
    let (mut bind, mut use_notify, mut health_status) = (None, true, 200u16);
    let mut args = env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--bind" => bind = Some(args.next().unwrap_or_else(|| usage())),
            "--no-notify" => use_notify = false,
            "--health-status" => {
                let code = args.next().and_then(|c| c.parse().ok());
                health_status = code.filter(|c| (100..600).contains(c)).unwrap_or_else(|| usage());
            }
            _ => usage(),
        }
    }
    let activation =
        if use_notify { activation } else { Activation { notify_socket: None, ..activation } };
    let listeners = match bind {
        None => listeners_from_env(&activation, pid)?,
        Some(addr) => vec![Listener::Tcp(
            TcpListener::bind(&addr).with_context(|| format!("cannot bind {addr}"))?,
        )],
    };
    // Registered before READY=1, so that a SIGTERM right after it starts a
    // drain instead of killing us with connections in flight.
    let mut signals = Signals::new([SIGTERM, SIGINT])?;
    let (stop, stop_writer) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    let server = Arc::new(Server {
        pid,
        generation: env::var("SOCKHOLD_GENERATION").unwrap_or_else(|_| "-".into()),
        health_status,
        stop,
        stopping: AtomicBool::new(false),
        conns: Mutex::new((0, 0, 0)),
        conns_changed: Condvar::new(),
    });

    let describe = |l: &Listener| match socket::getsockname::<SockaddrStorage>(l.fd().as_raw_fd()) {
        Ok(addr) => format!("{addr} (fd {})", l.fd().as_raw_fd()),
        Err(e) => format!("<{e}> (fd {})", l.fd().as_raw_fd()),
    };
    let names: Vec<String> = listeners.iter().map(describe).collect();
    say!("httpd[{pid}]: serving on {}", names.join(", "));
    let wakers: Vec<_> = listeners.iter().map(Listener::waker).collect();
    server.conns.lock().unwrap().2 = listeners.len();
    let acceptors: Vec<_> = (listeners.into_iter())
        .map(|l| {
            let server = Arc::clone(&server);
            thread::spawn(move || {
                accept_loop(&server, l);
                server.conns.lock().unwrap().2 -= 1;
                server.conns_changed.notify_all();
            })
        })
        .collect();
    // The sockets were listening before we started: connections that came
    // meanwhile wait in the kernel's queue, so we are ready now.
    let status = format!("READY=1\nSTATUS=serving on {} socket(s)", acceptors.len());
    notify(&activation, &status);
    // sd_watchdog_enabled(): only if the watchdog is meant for this process.
    let watchdog_usec = env::var("WATCHDOG_USEC").ok().and_then(|v| v.parse::<u64>().ok());
    let watchdog_pid = env::var("WATCHDOG_PID").ok().and_then(|v| v.parse::<u32>().ok());
    if let (Some(usec), Some(p), Some(_)) = (watchdog_usec, watchdog_pid, &activation.notify_socket)
        && p == pid
        && usec > 0
    {
        let activation = activation.clone();
        thread::spawn(move || {
            loop {
                notify(&activation, "WATCHDOG=1");
                thread::sleep(Duration::from_micros(usec / 2));
            }
        });
    }

    signals.forever().next();
    notify(&activation, "STOPPING=1");
    server.stopping.store(true, SeqCst);
    nix::unistd::write(&stop_writer, b"x")?;
    // An acceptor that lost the race for a connection to another process is
    // blocked in accept() and cannot see the stop pipe. Rather than wait for
    // the next client, or exit while it may be taking one, we wake it with a
    // connection of our own, which it serves (end of file at once) before
    // leaving. If another process takes that instead, it gets the same
    // harmless empty connection, and we try again. Acceptors that saw the
    // stop say so at once; only the ones still running after 100ms are woken.
    let mut conns = server.conns.lock().unwrap();
    while conns.2 > 0 {
        let (guard, wait) =
            server.conns_changed.wait_timeout(conns, Duration::from_millis(100)).unwrap();
        conns = guard;
        if wait.timed_out() && conns.2 > 0 {
            drop(conns);
            for (acceptor, wake) in acceptors.iter().zip(&wakers) {
                if !acceptor.is_finished() {
                    wake();
                }
            }
            conns = server.conns.lock().unwrap();
        }
    }
    while conns.0 > 0 {
        conns = server.conns_changed.wait(conns).unwrap();
    }
    say!("httpd[{pid}]: drained {} connection(s), exiting", conns.1);
    Ok(())
}

fn listeners_from_env(activation: &Activation, pid: u32) -> Result<Vec<Listener>> {
    let text = |v: &Option<OsString>| v.as_ref().map(|v| v.to_string_lossy().into_owned());
    let fds = text(&activation.listen_fds)
        .ok_or_else(|| anyhow!("LISTEN_FDS not set (run me under sockhold, or use --bind ADDR)"))?;
    match text(&activation.listen_pid) {
        Some(p) if p.parse() == Ok(pid) => {}
        Some(p) => bail!("LISTEN_PID is {p} but my pid is {pid}"),
        None => bail!("LISTEN_PID not set (and my pid is {pid})"),
    }
    let count: RawFd = (fds.parse().ok().filter(|n| (1..1024).contains(n)))
        .ok_or_else(|| anyhow!("LISTEN_FDS is {fds:?}; expected a number of sockets"))?;
    let mut listeners = Vec::new();
    for fd in inherited::adopt_listen_fds(count)? {
        // Like sd_listen_fds(): close-on-exec is a flag of our descriptor, not
        // of the shared open file description (as O_NONBLOCK is, which we
        // never touch), so it is ours to set.
        fcntl(&fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))?;
        listeners.push(Listener::new(fd)?);
    }
    Ok(listeners)
}

/// Sends one datagram to `$NOTIFY_SOCKET`, like sd_notify(3). Failure is
/// logged, not fatal: serving matters more than telling the supervisor.
fn notify(activation: &Activation, message: &str) {
    let Some(path) = &activation.notify_socket else {
        return;
    };
    let send = || -> nix::Result<usize> {
        let addr = match path.as_bytes().strip_prefix(b"@") {
            Some(name) => UnixAddr::new_abstract(name)?,
            None => UnixAddr::new(path.as_os_str())?,
        };
        let sock = socket::socket(Af::Unix, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None)?;
        socket::sendto(sock.as_raw_fd(), message.as_bytes(), &addr, MsgFlags::empty())
    };
    if let Err(e) = send() {
        say!("httpd[{}]: cannot notify {path:?}: {e}", process::id());
    }
}

/// Polls `fd` and the stop pipe; returns which of the two have events.
fn poll_with_stop(server: &Server, fd: BorrowedFd, timeout: PollTimeout) -> (bool, bool) {
    let mut fds =
        [PollFd::new(fd, PollFlags::POLLIN), PollFd::new(server.stop.as_fd(), PollFlags::POLLIN)];
    match poll(&mut fds, timeout) {
        Ok(_) => {}
        // A signal landed on this thread; the main thread deals with it.
        Err(Errno::EINTR) => return poll_with_stop(server, fd, timeout),
        Err(e) => {
            // ENOMEM and the like: nothing sensible to do but leave as if stopped.
            say!("httpd[{}]: poll: {e}", server.pid);
            return (false, true);
        }
    }
    let fired = |p: &PollFd| p.revents().is_some_and(|r| !r.is_empty());
    (fired(&fds[0]), fired(&fds[1]))
}

fn accept_loop(server: &Arc<Server>, listener: Listener) {
    loop {
        let (readable, stopped) = poll_with_stop(server, listener.fd(), PollTimeout::NONE);
        // Stop wins: a connection still queued stays in the shared listener,
        // for the next generation. We never shutdown() or otherwise touch it.
        if stopped {
            return;
        }
        // The listener may be blocking (O_NONBLOCK is shared, so we leave it
        // alone): if another process takes this connection first, accept waits
        // for the next one, which we then serve even if we are stopping.
        if !readable {
            continue;
        }
        if let Err(e) = listener.accept_and_serve(server) {
            // E.g. EMFILE: back off instead of spinning on a readable listener.
            say!("httpd[{}]: accept: {e}", server.pid);
            thread::sleep(Duration::from_millis(100));
        }
    }
}

fn spawn_connection<S: Read + Write + AsFd + Send + 'static>(server: &Arc<Server>, conn: S) {
    server.conns.lock().unwrap().0 += 1;
    let server = Arc::clone(server);
    thread::spawn(move || {
        serve(&server, conn);
        let mut conns = server.conns.lock().unwrap();
        conns.0 -= 1;
        if server.stopping.load(SeqCst) {
            conns.1 += 1;
        }
        server.conns_changed.notify_all();
    });
}

/// SO_RCVTIMEO and SO_SNDTIMEO, set on a connection, never on the listener,
/// whose socket options every process sharing it would see.
fn set_timeouts(conn: &impl AsFd, secs: i64) -> nix::Result<()> {
    socket::setsockopt(conn, sockopt::ReceiveTimeout, &TimeVal::seconds(secs))?;
    socket::setsockopt(conn, sockopt::SendTimeout, &TimeVal::seconds(secs))
}

/// Serves requests on one connection until it closes, fails or idles out.
fn serve<S: Read + Write + AsFd>(server: &Server, conn: S) {
    let _ = set_timeouts(&conn, IDLE_SECS);
    let mut reader = BufReader::new(conn);
    let idle = PollTimeout::try_from(Duration::from_secs(IDLE_SECS as u64)).unwrap();
    for served in 0u64.. {
        // The first request is always awaited, even when stopping: an accepted
        // connection is never dropped. Between requests, a stop closes it
        // unless the client's next request has begun to arrive.
        if served > 0 && reader.buffer().is_empty() {
            let (readable, _) = poll_with_stop(server, reader.get_ref().as_fd(), idle);
            if !readable {
                return;
            }
        }
        if !matches!(handle_request(server, &mut reader), Ok(true)) {
            return;
        }
    }
}

enum HeadError {
    TooLarge,
    Malformed,
    Io,
}

/// Reads the request line and headers. `Ok(None)`: the client closed cleanly.
fn read_head(reader: &mut impl BufRead) -> Result<Option<Vec<String>>, HeadError> {
    let (mut lines, mut used) = (Vec::new(), 0);
    loop {
        let mut line = Vec::new();
        let limit = (MAX_HEAD - used + 1) as u64;
        used += (reader.take(limit).read_until(b'\n', &mut line)).map_err(|_| HeadError::Io)?;
        if used > MAX_HEAD {
            return Err(HeadError::TooLarge);
        }
        let Some(line) = line.strip_suffix(b"\n") else {
            return if used == 0 { Ok(None) } else { Err(HeadError::Malformed) };
        };
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        match (line.is_empty(), lines.is_empty()) {
            (true, true) => {} // RFC 9112 2.2: ignore empty lines before the request
            (true, false) => return Ok(Some(lines)),
            (false, _) => lines.push(String::from_utf8_lossy(line).into_owned()),
        }
    }
}

struct Request {
    target: String,
    http10: bool,
    head_only: bool,
    body_length: u64,
    keep_alive: bool,
    expect_continue: bool,
}

fn is_token(s: &str) -> bool {
    let tchar = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    !s.is_empty() && s.bytes().all(tchar)
}

/// Parses a request head, or says which error status to answer with.
fn parse_request(lines: &[String]) -> Result<Request, u16> {
    let [method, target, version] = lines[0].split(' ').collect::<Vec<_>>()[..] else {
        return Err(400);
    };
    let http10 = match version {
        "HTTP/1.1" => false,
        "HTTP/1.0" => true,
        v if v.starts_with("HTTP/") => return Err(505),
        _ => return Err(400),
    };
    if !is_token(method) || target.is_empty() {
        return Err(400);
    }
    let head_only = method == "HEAD";
    let mut req = Request {
        target: target.to_string(),
        http10,
        head_only,
        body_length: 0,
        keep_alive: !http10,
        expect_continue: false,
    };
    let (mut has_host, mut length) = (false, None);
    for line in &lines[1..] {
        let (name, value) = line.split_once(':').ok_or(400u16)?;
        if !is_token(name) {
            return Err(400); // this also rejects obsolete line folding
        }
        let value = value.trim_matches([' ', '\t']);
        match name.to_ascii_lowercase().as_str() {
            "host" => has_host = true,
            "content-length" => {
                let digits = !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit());
                let n = value.parse().ok().filter(|_| digits).ok_or(400u16)?;
                if length.is_some_and(|l| l != n) {
                    return Err(400);
                }
                length = Some(n);
            }
            // Chunked request bodies are not supported; RFC 9112 6.1 says 501.
            "transfer-encoding" => return Err(501),
            "expect" => req.expect_continue = value.eq_ignore_ascii_case("100-continue"),
            "connection" => {
                for option in value.split(',').map(str::trim) {
                    if option.eq_ignore_ascii_case("close") {
                        req.keep_alive = false;
                    } else if option.eq_ignore_ascii_case("keep-alive") && http10 {
                        req.keep_alive = true;
                    }
                }
            }
            _ => {}
        }
    }
    if !http10 && !has_host {
        return Err(400); // RFC 9112 3.2
    }
    req.body_length = length.unwrap_or(0);
    Ok(req)
}

/// Reads and answers one request. `Ok(true)`: keep the connection open.
fn handle_request<S: Read + Write + AsFd>(
    server: &Server,
    reader: &mut BufReader<S>,
) -> io::Result<bool> {
    let parsed = match read_head(reader) {
        Ok(None) | Err(HeadError::Io) => return Ok(false),
        Err(HeadError::TooLarge) => Err(431),
        Err(HeadError::Malformed) => Err(400),
        Ok(Some(lines)) => parse_request(&lines),
    };
    let req = match parsed {
        Ok(req) => req,
        Err(code) => {
            respond(server, reader.get_mut(), code, "Connection: close\r\n", false)?;
            // Closing with unread input makes the kernel send a reset, which
            // can destroy the response before the client reads it: half-close,
            // and read (a bounded amount of) what the client is still sending.
            let conn = reader.get_ref();
            if socket::shutdown(conn.as_fd().as_raw_fd(), Shutdown::Write).is_ok() {
                let _ = set_timeouts(conn, 1);
                let _ = io::copy(&mut reader.take(64 * 1024), &mut io::sink());
            }
            return Ok(false);
        }
    };
    if req.expect_continue && req.body_length > 0 && !req.http10 {
        reader.get_mut().write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
    }
    if io::copy(&mut reader.take(req.body_length), &mut io::sink())? < req.body_length {
        return Ok(false); // the client went away mid-body
    }
    // Checked only now that the request is in: a request in progress when the
    // stop came is still answered, with `Connection: close`.
    let keep_alive = req.keep_alive && !server.stopping.load(SeqCst);
    let connection = match (keep_alive, req.http10) {
        (false, _) => "Connection: close\r\n",
        (true, true) => "Connection: keep-alive\r\n",
        (true, false) => "",
    };
    let code = if req.target == "/healthz" { server.health_status } else { 200 };
    respond(server, reader.get_mut(), code, connection, req.head_only)?;
    Ok(keep_alive)
}

fn respond(
    server: &Server,
    conn: &mut impl Write,
    code: u16,
    connection: &str,
    head_only: bool,
) -> io::Result<()> {
    let (pid, generation) = (server.pid, &server.generation);
    let (reason, body) = match code {
        200 => ("OK", format!("hello from pid {pid} (generation {generation})\n")),
        400 => ("Bad Request", "bad request\n".into()),
        431 => ("Request Header Fields Too Large", "request head too large\n".into()),
        501 => ("Not Implemented", "transfer-encoding is not supported\n".into()),
        505 => ("HTTP Version Not Supported", "HTTP version not supported\n".into()),
        500 => ("Internal Server Error", "unhealthy\n".into()),
        503 => ("Service Unavailable", "unhealthy\n".into()),
        _ => ("Status", format!("status {code}\n")),
    };
    let mut response = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
         X-Pid: {pid}\r\nX-Generation: {generation}\r\n{connection}\r\n",
        body.len()
    );
    if !head_only {
        response.push_str(&body);
    }
    conn.write_all(response.as_bytes())
}

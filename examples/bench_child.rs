//! `bench_child`: the instantly ready child of `benches/reload.rs`, which times the handover with
//! `CLOCK_MONOTONIC` (the same clock in every process on the machine).
//!
//! Run under sockhold (`--ready notify`), it takes the listener on fd 3 (`LISTEN_FDS`,
//! `LISTEN_PID`), answers every connection with a tiny HTTP/1.1 response that carries `X-Pid`, and
//! prints JSON lines on stdout (sockhold's stdout, which the bench reads):
//!
//! - `{"pid":P,"ready_sent_ns":T}` at start, T taken right before the `READY=1` datagram is sent
//!   to `$NOTIFY_SOCKET` (nothing else is done first: it is ready at once);
//! - `{"pid":P,"term_received_ns":T}` when SIGTERM arrives, T taken by a signal-hook iterator
//!   thread (so T includes the handler's self-pipe write and that thread's wakeup, which the bench
//!   measures separately and reports);
//! - `{"pid":P,"exit_ns":T}` once it has drained, right before it exits 0.
//!
//! Accepting is a blocking `accept(2)` on fd 3, not poll-then-accept: the crate forbids `unsafe`,
//! and nix's safe calls reach a raw fd only through `accept`, `recv`, `send` and `getsockname`
//! (poll needs a `BorrowedFd`). The listener is never shut down, and its `O_NONBLOCK` flag is never
//! touched. To stop, the acceptor is woken the way `httpd` wakes one that lost a race: by
//! connecting to our own address until it has taken a connection after the stop (a connection it
//! takes serves as usual; one the next generation takes is an empty connection it closes). A
//! connection has no read timeout (no `setsockopt` on a raw fd): fine for the bench's own clients,
//! which send the whole request at once.

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::RawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::time::Duration;
use std::{env, process, thread};

use nix::errno::Errno;
use nix::sys::socket::{self, AddressFamily, MsgFlags, SockFlag, SockType, SockaddrStorage};
use nix::sys::socket::{SockaddrLike, UnixAddr};
use nix::time::{ClockId, clock_gettime};
use signal_hook::consts::SIGTERM;
use signal_hook::iterator::Signals;

const LISTENER: RawFd = 3;

fn now_ns() -> u64 {
    let t = clock_gettime(ClockId::CLOCK_MONOTONIC).expect("CLOCK_MONOTONIC");
    t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
}

/// One JSON line on stdout, in one write (stdout is a pipe shared with every generation).
fn emit(pid: u32, key: &str, ns: u64) {
    let line = format!("{{\"pid\":{pid},\"{key}\":{ns}}}\n");
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(line.as_bytes());
    let _ = out.flush();
}

fn main() {
    let pid = process::id();
    let fail = |msg: String| -> ! {
        eprintln!("bench_child[{pid}]: {msg}");
        process::exit(1)
    };
    match (env::var("LISTEN_PID"), env::var("LISTEN_FDS")) {
        (Ok(p), Ok(n)) if p == pid.to_string() && n != "0" => {}
        (p, n) => fail(format!("no socket for me: LISTEN_PID={p:?} LISTEN_FDS={n:?}")),
    }
    let addr = match socket::getsockname::<SockaddrStorage>(LISTENER) {
        Ok(a) => match (a.as_sockaddr_in(), a.as_sockaddr_in6()) {
            (Some(v4), _) => SocketAddr::from((v4.ip(), v4.port())),
            (_, Some(v6)) => SocketAddr::from((v6.ip(), v6.port())),
            _ => fail(format!("fd 3 is not a TCP socket ({:?})", a.family())),
        },
        Err(e) => fail(format!("fd 3: {e}")),
    };
    // Registered before READY=1, so that a SIGTERM right after it is timed, not fatal.
    let mut signals = Signals::new([SIGTERM]).unwrap_or_else(|e| fail(format!("signals: {e}")));
    let stopping = Arc::new(AtomicBool::new(false));
    let acceptor = {
        let stopping = Arc::clone(&stopping);
        thread::spawn(move || accept_loop(pid, &stopping))
    };

    let notify = env::var_os("NOTIFY_SOCKET").unwrap_or_else(|| fail("no NOTIFY_SOCKET".into()));
    let dest = UnixAddr::new(notify.as_os_str()).unwrap_or_else(|e| fail(format!("{e}")));
    let sock =
        socket::socket(AddressFamily::Unix, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None)
            .unwrap_or_else(|e| fail(format!("socket: {e}")));
    let ready_sent = now_ns();
    if let Err(e) =
        socket::sendto(std::os::fd::AsRawFd::as_raw_fd(&sock), b"READY=1", &dest, MsgFlags::empty())
    {
        fail(format!("cannot notify: {e}"));
    }
    emit(pid, "ready_sent_ns", ready_sent);

    if signals.forever().next().is_some() {
        emit(pid, "term_received_ns", now_ns());
    }
    stopping.store(true, SeqCst);
    while !acceptor.is_finished() {
        drop(TcpStream::connect_timeout(&addr, Duration::from_secs(1)));
        thread::sleep(Duration::from_millis(1));
    }
    emit(pid, "exit_ns", now_ns());
}

/// Accepts and answers connections one at a time until a connection arrives after the stop.
fn accept_loop(pid: u32, stopping: &AtomicBool) {
    loop {
        let conn = match socket::accept(LISTENER) {
            Ok(fd) => fd,
            Err(Errno::EINTR | Errno::ECONNABORTED) => continue,
            Err(e) => {
                eprintln!("bench_child[{pid}]: accept: {e}");
                thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        serve(pid, conn);
        let _ = nix::unistd::close(conn);
        if stopping.load(SeqCst) {
            return;
        }
    }
}

/// Reads the request head (an empty connection is just closed) and answers it.
fn serve(pid: u32, conn: RawFd) {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match socket::recv(conn, &mut buf, MsgFlags::empty()) {
            Ok(0) => return,
            Ok(n) if head.len() + n <= 64 * 1024 => head.extend_from_slice(&buf[..n]),
            Err(Errno::EINTR) => {}
            _ => return,
        }
    }
    let response = format!(
        "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nX-Pid: {pid}\r\nConnection: close\r\n\r\nok\n"
    );
    let mut sent = 0;
    while sent < response.len() {
        match socket::send(conn, &response.as_bytes()[sent..], MsgFlags::MSG_NOSIGNAL) {
            Ok(n) => sent += n,
            Err(Errno::EINTR) => {}
            Err(_) => return,
        }
    }
}

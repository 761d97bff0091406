//! Readiness probes for servers that never send `READY=1`: `--ready http:PATH` and
//! `--ready exec:CMD`.
//!
//! A probe is one attempt, run inside the one event loop without blocking it. An HTTP probe is a
//! non-blocking connect to the child's private `health` listener, a `GET PATH`, and the status
//! line of the answer: 2xx is ready, anything else (or a closed connection) is not. Because the
//! listener belongs to one child only, the answer can only come from that child: a probe of the
//! shared port could be answered by the old generation. An exec probe is a process of its own
//! (in its own process group, so a timed-out one is killed with whatever it started) that is
//! ready when it exits 0.
//!
//! An attempt's outcome is `Result<(), String>`: the reason a child is not ready yet, carried by
//! the supervisor's event and named when the child is given up on, not an error of sockhold's.
//!
//! This module must not decide anything: when to probe, how often, and what a failure means are
//! the supervisor's decisions. It only runs one attempt and says how it went.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::PollFlags;
use nix::sys::signal::{Signal, killpg};
use nix::sys::socket::{
    AddressFamily, SockFlag, SockType, SockaddrIn, connect, getsockopt, socket, sockopt,
};
use nix::unistd::Pid;

/// The longest status line an HTTP probe reads before it gives up on the answer.
const MAX_STATUS_LINE: usize = 1024;

/// One probe attempt in flight.
#[derive(Debug)]
pub struct Probe {
    /// When the attempt counts as failed.
    pub deadline: Instant,
    /// How long it was allowed, for the message.
    timeout: Duration,
    kind: Kind,
}

#[derive(Debug)]
enum Kind {
    Http(HttpProbe),
    /// The probe command's process; it is reaped by the event loop's reaper.
    Exec {
        pid: Pid,
    },
}

#[derive(Debug)]
struct HttpProbe {
    stream: TcpStream,
    state: HttpState,
    request: Vec<u8>,
    sent: usize,
    answer: Vec<u8>,
}

#[derive(Debug, PartialEq, Eq)]
enum HttpState {
    Connecting,
    Sending,
    Reading,
}

impl Probe {
    /// Starts `GET path` to the child's health listener at `addr`.
    pub fn http(
        addr: SocketAddr,
        path: &str,
        timeout: Duration,
        now: Instant,
    ) -> Result<Probe, String> {
        let SocketAddr::V4(v4) = addr else {
            return Err(format!("the health listener {addr} is not IPv4 loopback"));
        };
        let fd = socket(
            AddressFamily::Inet,
            SockType::Stream,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(|e| format!("cannot create a socket for the probe: {e}"))?;
        let state = match connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &SockaddrIn::from(v4)) {
            Ok(()) => HttpState::Sending,
            Err(Errno::EINPROGRESS) => HttpState::Connecting,
            Err(e) => return Err(format!("cannot connect to the health listener {addr}: {e}")),
        };
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: sockhold/{}\r\nConnection: close\r\n\r\n",
            env!("CARGO_PKG_VERSION")
        );
        let probe = HttpProbe {
            stream: TcpStream::from(fd),
            state,
            request: request.into_bytes(),
            sent: 0,
            answer: Vec::new(),
        };
        Ok(Probe { deadline: now + timeout, timeout, kind: Kind::Http(probe) })
    }

    /// Starts `argv` with `env` added to sockhold's environment, in a process group of its own.
    pub fn exec(
        argv: &[String],
        env: &[(String, String)],
        timeout: Duration,
        now: Instant,
    ) -> Result<Probe, String> {
        let (program, args) = argv.split_first().ok_or("the probe command is empty")?;
        let child = Command::new(program)
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .process_group(0)
            .spawn()
            .map_err(|e| format!("cannot run the probe command '{program}': {e}"))?;
        // std's Child neither waits nor kills on drop: the event loop's reaper collects it.
        let pid = Pid::from_raw(child.id() as i32);
        Ok(Probe { deadline: now + timeout, timeout, kind: Kind::Exec { pid } })
    }

    /// The probe command's pid, for an exec probe.
    pub fn pid(&self) -> Option<Pid> {
        match self.kind {
            Kind::Exec { pid } => Some(pid),
            Kind::Http(_) => None,
        }
    }

    /// The fd to poll and for what, while an HTTP probe waits on its connection.
    pub fn poll_fd(&self) -> Option<(BorrowedFd<'_>, PollFlags)> {
        match &self.kind {
            Kind::Http(h) => {
                let flags = match h.state {
                    HttpState::Connecting | HttpState::Sending => PollFlags::POLLOUT,
                    HttpState::Reading => PollFlags::POLLIN,
                };
                Some((h.stream.as_fd(), flags))
            }
            Kind::Exec { .. } => None,
        }
    }

    /// Moves an HTTP probe on after its fd was ready: `Some` once it has an outcome.
    pub fn on_ready(&mut self) -> Option<Result<(), String>> {
        let Kind::Http(h) = &mut self.kind else { return None };
        h.advance()
    }

    /// The outcome of an exec probe whose process ended with `status`.
    pub fn exited(&self, status: &crate::exit::ChildStatus) -> Result<(), String> {
        if status.success() { Ok(()) } else { Err(format!("the probe command {status}")) }
    }

    /// The attempt took too long: an exec probe's process group is killed.
    pub fn time_out(&self) -> String {
        self.kill();
        format!("the probe did not answer within {}", humantime::format_duration(self.timeout))
    }

    /// Abandons the attempt (its unit is gone): an exec probe's process group is killed.
    pub fn kill(&self) {
        if let Kind::Exec { pid } = self.kind {
            // Its own group, so a probe script's children go too; ESRCH if it already ended.
            let _ = killpg(pid, Signal::SIGKILL);
        }
    }
}

impl HttpProbe {
    fn advance(&mut self) -> Option<Result<(), String>> {
        loop {
            match self.state {
                HttpState::Connecting => match getsockopt(&self.stream, sockopt::SocketError) {
                    Ok(0) => self.state = HttpState::Sending,
                    Ok(errno) => {
                        let e = Errno::from_raw(errno);
                        return Some(Err(format!("cannot connect to the health listener: {e}")));
                    }
                    Err(e) => {
                        return Some(Err(format!("cannot connect to the health listener: {e}")));
                    }
                },
                HttpState::Sending => match self.stream.write(&self.request[self.sent..]) {
                    Ok(n) => {
                        self.sent += n;
                        if self.sent == self.request.len() {
                            self.state = HttpState::Reading;
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => return None,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => return Some(Err(format!("cannot send the health request: {e}"))),
                },
                HttpState::Reading => {
                    let mut buf = [0u8; 512];
                    match self.stream.read(&mut buf) {
                        Ok(0) => {
                            return Some(parse_status(&self.answer).unwrap_or_else(|| {
                                Err("the health listener closed the connection without an answer"
                                    .into())
                            }));
                        }
                        Ok(n) => {
                            self.answer.extend_from_slice(&buf[..n]);
                            if let Some(result) = parse_status(&self.answer) {
                                return Some(result);
                            }
                            if self.answer.len() > MAX_STATUS_LINE {
                                return Some(Err("the health answer is not HTTP".into()));
                            }
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => return None,
                        Err(e) if e.kind() == ErrorKind::Interrupted => {}
                        Err(e) => return Some(Err(format!("cannot read the health answer: {e}"))),
                    }
                }
            }
        }
    }
}

/// The outcome of an HTTP answer, once its status line is complete: 2xx is ready.
fn parse_status(answer: &[u8]) -> Option<Result<(), String>> {
    let end = answer.windows(2).position(|w| w == b"\r\n")?;
    let line = String::from_utf8_lossy(&answer[..end]);
    let mut parts = line.splitn(3, ' ');
    let (version, code) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let code: u16 = match (version.starts_with("HTTP/"), code.parse::<u16>()) {
        (true, Ok(code)) if code.to_string().len() == 3 => code,
        _ => return Some(Err(format!("the health answer is not HTTP: {:?}", line.as_ref()))),
    };
    Some(if (200..300).contains(&code) {
        Ok(())
    } else {
        Err(format!("the health check answered {}", line.trim_start_matches(version).trim()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines() {
        type Outcome = Option<Result<(), &'static str>>;
        let cases: &[(&[u8], Outcome)] = &[
            (b"HTTP/1.1 200 OK\r\n", Some(Ok(()))),
            (b"HTTP/1.0 204 No Content\r\nX: y\r\n\r\n", Some(Ok(()))),
            (
                b"HTTP/1.1 500 Internal Server Error\r\n",
                Some(Err("the health check answered 500 Internal Server Error")),
            ),
            (b"HTTP/1.1 301 Moved\r\n", Some(Err("the health check answered 301 Moved"))),
            (b"HTTP/1.1 200", None),
            (b"SSH-2.0-x\r\n", Some(Err("the health answer is not HTTP: \"SSH-2.0-x\""))),
            (
                b"HTTP/1.1 2000 x\r\n",
                Some(Err("the health answer is not HTTP: \"HTTP/1.1 2000 x\"")),
            ),
        ];
        for (answer, want) in cases {
            let got = parse_status(answer);
            let want = (*want).map(|r| r.map_err(str::to_string));
            assert_eq!(got, want, "{:?}", String::from_utf8_lossy(answer));
        }
    }

    /// A real listener that answers 200 after the probe has sent its whole request, then one
    /// that answers 503, then one that closes without answering.
    #[test]
    fn http_probe_against_a_real_listener() {
        use std::net::TcpListener;
        for (answer, want) in [
            (&b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"[..], Ok(())),
            (
                b"HTTP/1.1 503 Service Unavailable\r\n\r\n",
                Err("the health check answered 503 Service Unavailable".to_string()),
            ),
            (b"", Err("the health listener closed the connection without an answer".to_string())),
        ] {
            let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
            let addr = listener.local_addr().expect("addr");
            let server = std::thread::spawn(move || {
                let (mut conn, _) = listener.accept().expect("accept");
                let mut request = Vec::new();
                let mut buf = [0u8; 256];
                while !request.ends_with(b"\r\n\r\n") {
                    let n = conn.read(&mut buf).expect("read");
                    assert!(n > 0, "the probe closed before its request ended");
                    request.extend_from_slice(&buf[..n]);
                }
                conn.write_all(answer).expect("write");
                String::from_utf8(request).expect("utf-8")
            });
            let mut probe = Probe::http(addr, "/healthz", Duration::from_secs(5), Instant::now())
                .expect("probe starts");
            let outcome = loop {
                let (fd, flags) = probe.poll_fd().expect("an http probe polls");
                let mut fds = [nix::poll::PollFd::new(fd, flags)];
                nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(5000u16)).expect("poll");
                if let Some(outcome) = probe.on_ready() {
                    break outcome;
                }
            };
            let request = server.join().expect("server thread");
            assert!(request.starts_with("GET /healthz HTTP/1.1\r\n"), "{request}");
            assert_eq!(outcome, want);
        }
    }
}

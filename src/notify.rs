//! The sd_notify protocol, both ways.
//!
//! Children: each generation gets a notify socket of its own (a datagram socket at a path in
//! sockhold's runtime directory), so a message can only ever speak for the generation whose socket
//! it reached: readiness of an old generation can never promote a new one. [`NotifySocket`] reads
//! datagrams with the sender's credentials, drops the ones over 4096 bytes, and closes every fd a
//! message carries (which is how `BARRIER=1` is answered), except those of an `FDSTORE=1`
//! message, which it hands on for the fd store to keep or close. [`NotifyMessage::parse`] is the
//! pure parser.
//!
//! sockhold's own service manager: [`Manager`] sends `READY=1`, `RELOADING=1`, `STOPPING=1` and
//! `STATUS=` to the `NOTIFY_SOCKET` sockhold itself was given.
//!
//! This module must not decide anything: whether a sender is allowed and what readiness means are
//! the supervisor's decisions.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use log::{debug, warn};
use nix::errno::Errno;
use nix::sys::socket::{
    self, AddressFamily, ControlMessageOwned, MsgFlags, SockFlag, SockType, UnixAddr, sockopt,
};
use nix::time::{ClockId, clock_gettime};
use nix::unistd::{Pid, getpgid};

/// The largest datagram the protocol allows; longer ones are ignored, as systemd does.
pub const MAX_DATAGRAM: usize = 4096;

/// The most fds the kernel passes in one `SCM_RIGHTS` message (`SCM_MAX_FD`): room for all of
/// them, so an `FDSTORE=1` message never loses fds to a truncated control buffer.
const SCM_MAX_FD: usize = 253;

/// What one notify datagram says. Unknown assignments are ignored, as systemd ignores them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NotifyMessage {
    /// `READY=1`.
    pub ready: bool,
    /// `STATUS=...`, the last one in the datagram.
    pub status: Option<String>,
    /// `STOPPING=1`.
    pub stopping: bool,
    /// `RELOADING=1`.
    pub reloading: bool,
    /// `BARRIER=1` (answered by closing the fd it carries, which the socket does for every fd).
    pub barrier: bool,
    /// `ERRNO=N`.
    pub errno: Option<i32>,
    /// `WATCHDOG=1`: the watchdog is fed.
    pub watchdog: bool,
    /// `WATCHDOG=trigger`: the child asks for its watchdog to fire now.
    pub watchdog_trigger: bool,
    /// `WATCHDOG_USEC=N`: the child's new watchdog period (0 turns it off).
    pub watchdog_usec: Option<u64>,
    /// `EXTEND_TIMEOUT_USEC=N`: the current start or stop deadline is at least N µs away.
    pub extend_timeout_usec: Option<u64>,
    /// `FDSTORE=1`: keep the fds this message carries in the fd store.
    pub fd_store: bool,
    /// `FDSTOREREMOVE=1`: close every stored fd named by `FDNAME=`.
    pub fd_store_remove: bool,
    /// `FDNAME=`, the first one in the datagram (as systemd reads it), not validated yet.
    pub fd_name: Option<String>,
    /// `FDPOLL=0`: the stored fds are kept even when they report a hang-up.
    pub fd_no_poll: bool,
}

impl NotifyMessage {
    /// Parses newline-separated `KEY=VALUE` assignments. A trailing newline is optional
    /// (libsystemd sends `READY=1` without one); invalid UTF-8 is replaced, not rejected.
    pub fn parse(datagram: &[u8]) -> NotifyMessage {
        let text = String::from_utf8_lossy(datagram);
        let mut message = NotifyMessage::default();
        for line in text.split('\n') {
            let Some((key, value)) = line.split_once('=') else {
                continue;
            };
            match key {
                "READY" => message.ready |= value == "1",
                "STOPPING" => message.stopping |= value == "1",
                "RELOADING" => message.reloading |= value == "1",
                "BARRIER" => message.barrier |= value == "1",
                "STATUS" => message.status = Some(value.to_string()),
                "ERRNO" => message.errno = value.parse().ok(),
                "WATCHDOG" => match value {
                    "1" => message.watchdog = true,
                    "trigger" => message.watchdog_trigger = true,
                    _ => {}
                },
                "WATCHDOG_USEC" => message.watchdog_usec = value.parse().ok(),
                "EXTEND_TIMEOUT_USEC" => message.extend_timeout_usec = value.parse().ok(),
                "FDSTORE" => message.fd_store |= value == "1",
                "FDSTOREREMOVE" => message.fd_store_remove |= value == "1",
                "FDNAME" if message.fd_name.is_none() => message.fd_name = Some(value.to_string()),
                "FDPOLL" => message.fd_no_poll |= value == "0",
                _ => {}
            }
        }
        message
    }

    /// What the message says that sockhold takes no action on but a reader of its log wants to
    /// know, as systemd logs it: `STOPPING=1`, `RELOADING=1`, and `ERRNO=` with the error's
    /// name. The child's own reload and stop are sockhold's to run, so these change nothing.
    pub fn notes(&self) -> Vec<String> {
        let mut notes = Vec::new();
        if self.stopping {
            notes.push("is stopping (STOPPING=1)".to_string());
        }
        if self.reloading {
            notes.push("is reloading (RELOADING=1)".to_string());
        }
        if let Some(errno) = self.errno {
            let error = Errno::from_raw(errno);
            notes.push(match error {
                Errno::UnknownErrno => format!("reports error {errno} (ERRNO={errno})"),
                error => format!("reports error {error:?}: {} (ERRNO={errno})", error.desc()),
            });
        }
        notes
    }
}

/// A datagram as it arrived: who sent it and what it says.
#[derive(Debug)]
pub struct Received {
    /// The sender's pid, from `SCM_CREDENTIALS`.
    pub sender: Pid,
    /// The sender's process group, read as the datagram arrived, if the sender still existed.
    pub sender_pgid: Option<Pid>,
    /// The parsed message.
    pub message: NotifyMessage,
    /// The fds an `FDSTORE=1` message carried (every other message's fds are closed on
    /// arrival).
    pub fds: Vec<OwnedFd>,
}

/// A generation's private notify socket. Removes its file when dropped.
#[derive(Debug)]
pub struct NotifySocket {
    fd: OwnedFd,
    path: PathBuf,
}

impl NotifySocket {
    /// Binds a non-blocking, close-on-exec datagram socket at `path` that receives credentials.
    pub fn bind(path: &Path) -> Result<NotifySocket> {
        let fd = socket::socket(
            AddressFamily::Unix,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )
        .context("failed to create a notify socket")?;
        let addr = UnixAddr::new(path)
            .with_context(|| format!("invalid notify socket path {}", path.display()))?;
        // A leftover from a crashed run at the same path would make bind fail with EADDRINUSE.
        let _ = std::fs::remove_file(path);
        socket::bind(fd.as_raw_fd(), &addr)
            .with_context(|| format!("failed to bind notify socket {}", path.display()))?;
        socket::setsockopt(&fd, sockopt::PassCred, &true)
            .context("failed to set SO_PASSCRED on the notify socket")?;
        Ok(NotifySocket { fd, path: path.to_path_buf() })
    }

    /// Takes over the notify socket a self-upgrade handed over (fd `raw`, bound at `path`).
    /// The caller has checked that `raw` is open.
    pub fn take_handover(raw: std::os::fd::RawFd, path: PathBuf) -> NotifySocket {
        NotifySocket { fd: crate::sys::adopt_inherited_fd(raw), path }
    }

    /// The path children get as `NOTIFY_SOCKET`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The fd to poll.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Reads every datagram waiting, without blocking. Oversized datagrams and datagrams without
    /// credentials are logged and skipped. Every fd that arrives is closed, except those of a
    /// datagram that says `FDSTORE=1`, which come with it.
    pub fn receive_all(&self) -> Vec<Received> {
        let mut out = Vec::new();
        // One byte more than the limit, so an over-long datagram is seen as such even when the
        // kernel does not flag the truncation.
        let mut buf = [0u8; MAX_DATAGRAM + 1];
        loop {
            let mut cmsg = nix::cmsg_space!(
                nix::sys::socket::UnixCredentials,
                [std::os::fd::RawFd; SCM_MAX_FD]
            );
            let mut iov = [IoSliceMut::new(&mut buf)];
            let (len, truncated, sender, fds) = match socket::recvmsg::<()>(
                self.fd.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_CMSG_CLOEXEC,
            ) {
                Ok(msg) => {
                    let mut sender = None;
                    let mut fds = Vec::new();
                    if let Ok(cmsgs) = msg.cmsgs() {
                        for c in cmsgs {
                            match c {
                                ControlMessageOwned::ScmCredentials(cred) => {
                                    sender = Some(Pid::from_raw(cred.pid()))
                                }
                                ControlMessageOwned::ScmRights(raw) => fds.extend(raw),
                                _ => {}
                            }
                        }
                    }
                    (msg.bytes, msg.flags.contains(MsgFlags::MSG_TRUNC), sender, fds)
                }
                Err(Errno::EAGAIN) => break,
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    warn!("failed to read from notify socket {}: {e}", self.path.display());
                    break;
                }
            };
            // Look the sender's group up before any fd is closed: closing the fd of a later
            // BARRIER=1 releases a sender such as systemd-notify, which then exits, and a gone
            // process has no group to check against --notify-access group.
            let sender_pgid = sender.and_then(|pid| getpgid(Some(pid)).ok());
            // Owned at once, so that every path below closes them. Closing what arrived answers
            // BARRIER=1 (the sender waits for the fd to close) and keeps any other stray fd
            // from leaking into sockhold; only FDSTORE=1 keeps them, for the store to decide.
            let fds: Vec<OwnedFd> = fds.into_iter().map(crate::sys::adopt_received_fd).collect();
            if truncated || len > MAX_DATAGRAM {
                warn!(
                    "ignoring a notify datagram over {MAX_DATAGRAM} bytes on {}",
                    self.path.display()
                );
                continue;
            }
            let Some(sender) = sender else {
                warn!("ignoring a notify datagram without sender credentials");
                continue;
            };
            let message = NotifyMessage::parse(&buf[..len]);
            debug!("notify from pid {sender}: {:?}", String::from_utf8_lossy(&buf[..len]));
            let fds = if message.fd_store { fds } else { Vec::new() };
            out.push(Received { sender, sender_pgid, message, fds });
        }
        out
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// sockhold's own service manager, reached through the `NOTIFY_SOCKET` sockhold was started with.
#[derive(Debug)]
pub struct Manager {
    fd: OwnedFd,
    addr: UnixAddr,
    target: String,
}

impl Manager {
    /// Connects to the manager named by a `NOTIFY_SOCKET` value (a path, or `@name` for an
    /// abstract socket).
    pub fn new(notify_socket: &str) -> Result<Manager> {
        let addr = match notify_socket.strip_prefix('@') {
            Some(name) => UnixAddr::new_abstract(name.as_bytes()),
            None => UnixAddr::new(notify_socket),
        }
        .with_context(|| format!("invalid NOTIFY_SOCKET '{notify_socket}'"))?;
        let fd =
            socket::socket(AddressFamily::Unix, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None)
                .context("failed to create a socket for NOTIFY_SOCKET")?;
        Ok(Manager { fd, addr, target: notify_socket.to_string() })
    }

    /// Sends one message; a failure is logged, never fatal (the manager may be gone). Never
    /// blocks: a manager that stops reading fills its queue after a few datagrams (the kernel
    /// queues `net.unix.max_dgram_qlen`, 10 by default), and a blocking send would then freeze
    /// the one loop that reaps, stops and kills children. The message is dropped instead.
    pub fn send(&self, message: &ManagerMessage) {
        let text = format_manager_message(message, monotonic_usec());
        let iov = [IoSlice::new(text.as_bytes())];
        let flags = MsgFlags::MSG_DONTWAIT;
        match socket::sendmsg(self.fd.as_raw_fd(), &iov, &[], flags, Some(&self.addr)) {
            Ok(_) => {}
            Err(Errno::EAGAIN) => warn!(
                "the service manager at {} is not reading its notify socket; dropped {:?}",
                self.target,
                text.trim_end()
            ),
            Err(e) => warn!("failed to notify the service manager at {}: {e}", self.target),
        }
    }
}

/// The datagram for `message`; `now_usec` is `CLOCK_MONOTONIC` in microseconds, which systemd
/// needs with `RELOADING=1` to order the reload against its own clock.
pub fn format_manager_message(message: &ManagerMessage, now_usec: u64) -> String {
    let one_line = |s: &str| s.replace('\n', " ");
    match message {
        ManagerMessage::Ready(status) => format!("READY=1\nSTATUS={}\n", one_line(status)),
        ManagerMessage::Reloading(status) => {
            format!("RELOADING=1\nMONOTONIC_USEC={now_usec}\nSTATUS={}\n", one_line(status))
        }
        ManagerMessage::Stopping(status) => format!("STOPPING=1\nSTATUS={}\n", one_line(status)),
        ManagerMessage::Status(status) => format!("STATUS={}\n", one_line(status)),
    }
}

fn monotonic_usec() -> u64 {
    match clock_gettime(ClockId::CLOCK_MONOTONIC) {
        Ok(ts) => ts.tv_sec() as u64 * 1_000_000 + ts.tv_nsec() as u64 / 1_000,
        Err(_) => 0,
    }
}

/// Messages for sockhold's own service manager (when sockhold has `NOTIFY_SOCKET`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ManagerMessage {
    /// `READY=1` and a status line.
    Ready(String),
    /// `RELOADING=1`, `MONOTONIC_USEC=` and a status line.
    Reloading(String),
    /// `STOPPING=1` and a status line.
    Stopping(String),
    /// Only a status line.
    Status(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_name_what_systemd_logs() {
        let message = NotifyMessage::parse(b"STOPPING=1\nRELOADING=1\nERRNO=5");
        assert_eq!(
            message.notes(),
            [
                "is stopping (STOPPING=1)",
                "is reloading (RELOADING=1)",
                "reports error EIO: I/O error (ERRNO=5)",
            ]
        );
        assert_eq!(
            NotifyMessage::parse(b"ERRNO=100000").notes(),
            ["reports error 100000 (ERRNO=100000)"]
        );
        assert!(NotifyMessage::parse(b"READY=1\nSTATUS=up").notes().is_empty());
    }

    #[test]
    fn parse_table() {
        let ready = NotifyMessage { ready: true, ..Default::default() };
        let cases: &[(&[u8], NotifyMessage)] = &[
            (b"READY=1", ready.clone()),
            (b"READY=1\n", ready.clone()),
            (
                b"STATUS=warming up\nREADY=1",
                NotifyMessage { status: Some("warming up".into()), ..ready.clone() },
            ),
            (b"MAINPID=4\nREADY=1\nX_UNKNOWN=2\n", ready.clone()),
            (b"READY=0", NotifyMessage::default()),
            (b"READY=11", NotifyMessage::default()),
            (b"READY", NotifyMessage::default()),
            (b"", NotifyMessage::default()),
            (b"BARRIER=1", NotifyMessage { barrier: true, ..Default::default() }),
            (
                b"STOPPING=1\nERRNO=5",
                NotifyMessage { stopping: true, errno: Some(5), ..Default::default() },
            ),
            (
                b"RELOADING=1\nMONOTONIC_USEC=1",
                NotifyMessage { reloading: true, ..Default::default() },
            ),
            (
                b"STATUS=a=b\nSTATUS=last",
                NotifyMessage { status: Some("last".into()), ..Default::default() },
            ),
            (b"\xff\xfeREADY=1\nREADY=1", ready.clone()),
            (b"WATCHDOG=1", NotifyMessage { watchdog: true, ..Default::default() }),
            (b"WATCHDOG=trigger", NotifyMessage { watchdog_trigger: true, ..Default::default() }),
            (b"WATCHDOG=2", NotifyMessage::default()),
            (
                b"WATCHDOG_USEC=2000000\nEXTEND_TIMEOUT_USEC=5000000",
                NotifyMessage {
                    watchdog_usec: Some(2_000_000),
                    extend_timeout_usec: Some(5_000_000),
                    ..Default::default()
                },
            ),
            (b"WATCHDOG_USEC=-1\nEXTEND_TIMEOUT_USEC=x", NotifyMessage::default()),
            (
                b"FDSTORE=1\nFDNAME=conn-1",
                NotifyMessage {
                    fd_store: true,
                    fd_name: Some("conn-1".into()),
                    ..Default::default()
                },
            ),
            (
                b"FDNAME=first\nFDSTOREREMOVE=1\nFDNAME=second",
                NotifyMessage {
                    fd_store_remove: true,
                    fd_name: Some("first".into()),
                    ..Default::default()
                },
            ),
            (
                b"FDSTORE=1\nFDPOLL=0\nFDNAME=",
                NotifyMessage {
                    fd_store: true,
                    fd_no_poll: true,
                    fd_name: Some(String::new()),
                    ..Default::default()
                },
            ),
            (b"FDSTORE=0\nFDSTOREREMOVE=yes\nFDPOLL=1", NotifyMessage::default()),
        ];
        for (input, want) in cases {
            assert_eq!(
                &NotifyMessage::parse(input),
                want,
                "input {:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn manager_messages() {
        let cases = [
            (ManagerMessage::Ready("serving".into()), "READY=1\nSTATUS=serving\n"),
            (ManagerMessage::Reloading("x".into()), "RELOADING=1\nMONOTONIC_USEC=42\nSTATUS=x\n"),
            (ManagerMessage::Stopping("bye".into()), "STOPPING=1\nSTATUS=bye\n"),
            (ManagerMessage::Status("a\nb".into()), "STATUS=a b\n"),
        ];
        for (message, want) in cases {
            assert_eq!(format_manager_message(&message, 42), want);
        }
    }

    #[test]
    fn a_manager_that_does_not_read_never_blocks_the_sender() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("manager.sock");
        let receiver = std::os::unix::net::UnixDatagram::bind(&path).expect("bind");
        let manager = Manager::new(path.to_str().expect("utf-8")).expect("manager");
        // Far more than the kernel queues for a receiver that never reads.
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for _ in 0..100 {
                manager.send(&ManagerMessage::Status("busy".into()));
            }
            let _ = done.send(());
        });
        let waited = finished.recv_timeout(std::time::Duration::from_secs(10));
        assert!(waited.is_ok(), "send blocked on a manager that does not read");
        let mut buf = [0u8; 64];
        let n = receiver.recv(&mut buf).expect("the first messages were queued");
        assert_eq!(&buf[..n], b"STATUS=busy\n");
    }

    #[test]
    fn socket_reads_credentials_skips_oversized_and_closes_fds() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("n.sock");
        let sock = NotifySocket::bind(&path).expect("bind");
        let client =
            socket::socket(AddressFamily::Unix, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None)
                .unwrap();
        let addr = UnixAddr::new(&path).unwrap();
        let big = vec![b'x'; MAX_DATAGRAM + 1];
        socket::sendto(client.as_raw_fd(), &big, &addr, MsgFlags::empty()).unwrap();
        // A barrier: the fd we attach must be closed by the receiver, so our read end sees EOF.
        let (r, w) = nix::unistd::pipe().unwrap();
        let iov = [IoSlice::new(b"BARRIER=1")];
        let fds = [w.as_raw_fd()];
        socket::sendmsg(
            client.as_raw_fd(),
            &iov,
            &[socket::ControlMessage::ScmRights(&fds)],
            MsgFlags::empty(),
            Some(&addr),
        )
        .unwrap();
        drop(w);
        socket::sendto(client.as_raw_fd(), b"READY=1", &addr, MsgFlags::empty()).unwrap();
        let got = sock.receive_all();
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(got[0].message.barrier);
        assert!(got[1].message.ready);
        assert_eq!(got[1].sender, nix::unistd::getpid());
        let mut byte = [0u8; 1];
        assert_eq!(nix::unistd::read(&r, &mut byte).unwrap(), 0, "the barrier fd was closed");
        assert!(got.iter().all(|g| g.fds.is_empty()));
        // FDSTORE=1 hands its fds on, open.
        let (r, w) = nix::unistd::pipe().unwrap();
        let iov = [IoSlice::new(b"FDSTORE=1\nFDNAME=pipe")];
        let fds = [w.as_raw_fd()];
        socket::sendmsg(
            client.as_raw_fd(),
            &iov,
            &[socket::ControlMessage::ScmRights(&fds)],
            MsgFlags::empty(),
            Some(&addr),
        )
        .unwrap();
        drop(w);
        let mut got = sock.receive_all();
        assert_eq!(got.len(), 1, "{got:?}");
        let kept = got.remove(0).fds;
        assert_eq!(kept.len(), 1);
        nix::unistd::write(&kept[0], b"!").unwrap();
        assert_eq!(nix::unistd::read(&r, &mut byte).unwrap(), 1, "the stored fd is open");
        drop(sock);
        assert!(!path.exists(), "the socket file is removed on drop");
    }
}

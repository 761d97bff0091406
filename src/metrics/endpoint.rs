//! The metrics endpoint (`--metrics ADDR`): its listening socket (TCP, or a Unix socket in a
//! trusted directory as `--control`'s) and every scrape in progress, with its buffers and
//! deadline.
//!
//! Each scrape is one connection: the request head is read (at most [`MAX_REQUEST`] bytes),
//! answered once, and the connection closed. A scrape must be over [`SCRAPE_TIMEOUT`] after it
//! connected, reading and writing included, and at most [`MAX_CLIENTS`] run at once (more wait
//! in the listen queue: a refusal written and closed at once would be lost to the reset its
//! unread request causes); every read and write is non-blocking. So a client that never sends, sends too much, or never reads
//! costs a buffer until its deadline and cannot stall the event loop. The deadline joins the
//! loop's only while a scrape is in progress: an idle sockhold does not wake.
//!
//! It must not read sockhold's state: the event loop renders the exposition for the scrapes this
//! module says are due ([`MetricsServer::on_ready`]) and hands it back.

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use log::{debug, info, warn};
use nix::poll::PollFlags;
use serde::{Deserialize, Serialize};

use super::{Addr, Request, Status, parse_request, refusal_body, response};
use crate::control::is_exhaustion;
use crate::paths::{Sticky, open_trusted_dir};

/// The longest request head read; a longer one is answered 431.
pub const MAX_REQUEST: usize = 8192;
/// A scrape must be answered and gone this long after it connected.
pub const SCRAPE_TIMEOUT: Duration = Duration::from_secs(10);
/// Scrapes served at once; more wait in the listen queue until one is done.
pub const MAX_CLIENTS: usize = 16;

/// Identifies a scrape's connection.
pub type ClientId = u64;

/// Which fd a poll entry stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Token {
    /// The listening socket.
    Listener,
    /// A scrape.
    Client(ClientId),
}

enum Listening {
    Tcp(TcpListener),
    /// The socket file's path and (dev, ino), so that only our own file is removed at exit.
    Unix(UnixListener, PathBuf, (u64, u64)),
}

enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }

    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }

    fn fd(&self) -> BorrowedFd<'_> {
        match self {
            Stream::Tcp(s) => s.as_fd(),
            Stream::Unix(s) => s.as_fd(),
        }
    }

    fn set_nonblocking(&self) -> std::io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_nonblocking(true),
            Stream::Unix(s) => s.set_nonblocking(true),
        }
    }
}

struct Client {
    stream: Stream,
    input: Vec<u8>,
    /// The answer, once the request is complete; then nothing more is read.
    output: Option<Vec<u8>>,
    /// Dropped, answered or not, at this time.
    deadline: Instant,
}

/// Self-upgrade: the endpoint's listening socket as the next program reads it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Handover {
    /// The fd number the next program inherits it at.
    pub fd: RawFd,
    /// The Unix socket file's path, device and inode (`None` for TCP).
    #[serde(deserialize_with = "Option::deserialize")]
    pub unix_file: Option<(PathBuf, u64, u64)>,
}

/// The metrics endpoint and its scrapes in progress.
pub struct MetricsServer {
    listener: Listening,
    clients: BTreeMap<ClientId, Client>,
    next_id: ClientId,
    /// accept() ran out of fds or memory: the listener is left out of the poll until another
    /// event (which may have freed one) calls [`MetricsServer::resume_accepting`].
    exhausted: bool,
    /// Since the last successful accept, an exhaustion was logged: say so once, not per retry.
    episode: bool,
}

impl MetricsServer {
    /// Binds `addr`. A Unix socket goes through the checks of `--control`'s: its directory (and
    /// every one above) must pass [`open_trusted_dir`], a stale socket file is replaced only
    /// when nothing answers on it, and the file gets mode 0600.
    pub fn bind(addr: &Addr) -> Result<MetricsServer> {
        let listener = match addr {
            Addr::Tcp(addr) => {
                let listener = TcpListener::bind(addr)
                    .with_context(|| format!("failed to bind --metrics {addr}"))?;
                Listening::Tcp(listener)
            }
            Addr::Unix(path) => bind_unix(path)?,
        };
        let server = MetricsServer::with(listener);
        server.set_nonblocking()?;
        info!("serving metrics on {}", server.local_description());
        Ok(server)
    }

    fn with(listener: Listening) -> MetricsServer {
        MetricsServer {
            listener,
            clients: BTreeMap::new(),
            next_id: 1,
            exhausted: false,
            episode: false,
        }
    }

    fn set_nonblocking(&self) -> Result<()> {
        match &self.listener {
            Listening::Tcp(l) => l.set_nonblocking(true),
            Listening::Unix(l, ..) => l.set_nonblocking(true),
        }
        .context("failed to make the metrics socket non-blocking")
    }

    /// Where it listens, for the log (a TCP port 0 shows the port bound).
    pub fn local_description(&self) -> String {
        match &self.listener {
            Listening::Tcp(l) => match l.local_addr() {
                Ok(addr) => format!("http://{addr}/metrics"),
                Err(_) => "a TCP socket".into(),
            },
            Listening::Unix(_, path, _) => format!("{} (GET /metrics)", path.display()),
        }
    }

    fn listener_fd(&self) -> BorrowedFd<'_> {
        match &self.listener {
            Listening::Tcp(l) => l.as_fd(),
            Listening::Unix(l, ..) => l.as_fd(),
        }
    }

    /// Self-upgrade: the listening socket as the state names it. Scrapes in progress are not
    /// handed over: they are closed, and Prometheus scrapes again.
    pub fn handover(&self) -> Handover {
        Handover {
            fd: self.listener_fd().as_raw_fd(),
            unix_file: match &self.listener {
                Listening::Tcp(_) => None,
                Listening::Unix(_, path, (dev, ino)) => Some((path.clone(), *dev, *ino)),
            },
        }
    }

    /// Takes over the listening socket of a [`MetricsServer::handover`] entry. The fd must
    /// have been checked open.
    pub fn take_handover(state: &Handover) -> Result<MetricsServer> {
        let fd = crate::sys::adopt_inherited_fd(state.fd);
        let listener = match &state.unix_file {
            None => Listening::Tcp(TcpListener::from(fd)),
            Some((path, dev, ino)) => {
                Listening::Unix(UnixListener::from(fd), path.clone(), (*dev, *ino))
            }
        };
        let server = MetricsServer::with(listener);
        server.set_nonblocking()?;
        Ok(server)
    }

    /// The fds to poll, with what each stands for and the events wanted.
    pub fn poll_set(&self) -> Vec<(BorrowedFd<'_>, PollFlags, Token)> {
        let mut set = Vec::with_capacity(1 + self.clients.len());
        if !self.exhausted && self.clients.len() < MAX_CLIENTS {
            set.push((self.listener_fd(), PollFlags::POLLIN, Token::Listener));
        }
        for (&id, client) in &self.clients {
            let flags =
                if client.output.is_some() { PollFlags::POLLOUT } else { PollFlags::POLLIN };
            set.push((client.stream.fd(), flags, Token::Client(id)));
        }
        set
    }

    /// Something happened that may have freed an fd: poll the listener again.
    pub fn resume_accepting(&mut self) {
        self.exhausted = false;
    }

    /// The earliest scrape deadline; `None` while no scrape is in progress.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.clients.values().map(|c| c.deadline).min()
    }

    /// Handles readiness of one polled fd; returns the scrapes whose request for the exposition
    /// is complete, with whether each is a HEAD. The loop answers them with
    /// [`MetricsServer::answer`].
    pub fn on_ready(&mut self, token: Token, now: Instant) -> Vec<(ClientId, bool)> {
        match token {
            Token::Listener => {
                self.accept_all(now);
                Vec::new()
            }
            Token::Client(id) => {
                if self.clients.get(&id).is_some_and(|c| c.output.is_some()) {
                    self.flush(id);
                    return Vec::new();
                }
                self.read(id).map(|head| vec![(id, head)]).unwrap_or_default()
            }
        }
    }

    /// Answers a scrape with the exposition `body`.
    pub fn answer(&mut self, id: ClientId, head: bool, body: &str) {
        self.reply(id, response(Status::Ok, body, head));
    }

    /// Drops the scrapes whose time is up (a request that never came is answered 408 if the
    /// socket takes it; an answer never read is simply dropped).
    pub fn expire(&mut self, now: Instant) {
        let late: Vec<ClientId> =
            self.clients.iter().filter(|(_, c)| c.deadline <= now).map(|(&id, _)| id).collect();
        for id in late {
            let Some(mut client) = self.clients.remove(&id) else { continue };
            debug!("metrics client {id}: not done within {SCRAPE_TIMEOUT:?}; dropped");
            if client.output.is_none() {
                let status = Status::RequestTimeout;
                let _ = client.stream.write(&response(status, &refusal_body(status), false));
            }
        }
    }

    fn reply(&mut self, id: ClientId, bytes: Vec<u8>) {
        if let Some(client) = self.clients.get_mut(&id) {
            client.output = Some(bytes);
            self.flush(id);
        }
    }

    fn accept_all(&mut self, now: Instant) {
        while self.clients.len() < MAX_CLIENTS {
            let accepted = match &self.listener {
                Listening::Tcp(l) => l.accept().map(|(s, _)| Stream::Tcp(s)),
                Listening::Unix(l, ..) => l.accept().map(|(s, _)| Stream::Unix(s)),
            };
            let stream = match accepted {
                Ok(stream) => stream,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if is_exhaustion(&e) => {
                    if !self.episode {
                        warn!(
                            "metrics socket: accept failed: {e}; scrapes wait until sockhold has a file descriptor free"
                        );
                    }
                    self.episode = true;
                    self.exhausted = true;
                    return;
                }
                Err(e) => {
                    warn!("metrics socket: accept failed: {e}");
                    return;
                }
            };
            if self.episode {
                info!("metrics socket: accepting scrapes again");
                self.episode = false;
            }
            if let Err(e) = stream.set_nonblocking() {
                warn!("metrics socket: {e}");
                continue;
            }
            let id = self.next_id;
            self.next_id += 1;
            let client =
                Client { stream, input: Vec::new(), output: None, deadline: now + SCRAPE_TIMEOUT };
            self.clients.insert(id, client);
        }
    }

    /// Reads what the client sent; returns `Some(head)` once it asked for the exposition. Any
    /// other complete request is answered here.
    fn read(&mut self, id: ClientId) -> Option<bool> {
        let client = self.clients.get_mut(&id)?;
        let mut buf = [0u8; 4096];
        let mut closed = false;
        loop {
            match client.stream.read(&mut buf) {
                Ok(0) => {
                    closed = true;
                    break;
                }
                Ok(n) => {
                    client.input.extend_from_slice(&buf[..n]);
                    if client.input.len() > MAX_REQUEST {
                        break;
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => {
                    closed = true;
                    break;
                }
            }
        }
        let request = parse_request(&client.input[..client.input.len().min(MAX_REQUEST)]);
        let refusal = match request {
            Some(Request::Metrics { head }) => return Some(head),
            Some(Request::Refused { status, head }) => Some((status, head)),
            None if client.input.len() > MAX_REQUEST => Some((Status::TooLarge, false)),
            None => None,
        };
        match refusal {
            Some((status, head)) => {
                debug!("metrics client {id}: answered {status:?}");
                self.reply(id, response(status, &refusal_body(status), head));
            }
            // Gone before its request was complete: nobody to answer.
            None if closed => {
                self.clients.remove(&id);
            }
            None => {}
        }
        None
    }

    fn flush(&mut self, id: ClientId) {
        let Some(client) = self.clients.get_mut(&id) else { return };
        let Some(output) = &mut client.output else { return };
        while !output.is_empty() {
            match client.stream.write(output) {
                Ok(0) => break,
                Ok(n) => {
                    output.drain(..n);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
        // Answered (or gone): the connection closes.
        self.clients.remove(&id);
    }
}

/// Binds the Unix socket form, with `--control`'s checks.
fn bind_unix(path: &Path) -> Result<Listening> {
    let shown = path.display();
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    // Whoever can write to the directory could put a socket of theirs at the path and answer
    // every scrape with numbers of their own. Held open until the bind.
    let _dir = open_trusted_dir(parent, Sticky::Refuse).map_err(|reason| {
        anyhow::anyhow!(
            "invalid --metrics {shown}: {reason}; put the metrics socket in a directory only root or sockhold's user can write to (for example /run/NAME/)"
        )
    })?;
    if let Ok(existing) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if !existing.file_type().is_socket() {
            bail!("invalid --metrics {shown}: it exists and is not a socket");
        }
        if UnixStream::connect(path).is_ok() {
            bail!("invalid --metrics {shown}: another process answers on it");
        }
        std::fs::remove_file(path)
            .with_context(|| format!("failed to remove the stale metrics socket {shown}"))?;
    }
    let listener = UnixListener::bind(path)
        .with_context(|| format!("failed to bind the metrics socket {shown}"))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("failed to set mode 0600 on {shown}"))?;
    let meta = std::fs::metadata(path).with_context(|| format!("failed to stat {shown}"))?;
    Ok(Listening::Unix(listener, path.to_path_buf(), (meta.dev(), meta.ino())))
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        if let Listening::Unix(_, path, identity) = &self.listener {
            match std::fs::metadata(path) {
                Ok(meta) if (meta.dev(), meta.ino()) == *identity => {
                    if let Err(e) = std::fs::remove_file(path) {
                        warn!("failed to remove the metrics socket {}: {e}", path.display());
                    }
                }
                _ => {}
            }
        }
    }
}

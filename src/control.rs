//! The control socket (`--control PATH`): one JSON object per line each way.
//!
//! It owns the listening socket, every client connection with its buffers and deadline, the
//! call to the request parser ([`parse_request`]; the wire types are [`crate::protocol`]'s) and
//! the security checks: the socket file is created with mode 0600 in a directory that is not
//! world-writable, every client's uid is checked with
//! `SO_PEERCRED` (root and sockhold's own uid only), requests are limited to [`MAX_REQUEST`]
//! bytes, and a client that is slow, malformed or gone is answered with an error or dropped.
//! Nothing a client does can block the event loop or reach a child. For a self-upgrade it owns
//! the control socket's part of the state ([`Handover`]) and taking it over.
//!
//! It must not act on a request: it hands [`Request`]s to the event loop and writes the answers
//! it is given.

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use log::{debug, info, warn};
use nix::poll::PollFlags;
use nix::sys::socket::{getsockopt, sockopt};

use crate::paths::{Sticky, open_trusted_dir};
use crate::protocol::Answer;
pub use crate::protocol::Request;

/// The longest request line accepted, newline included.
pub const MAX_REQUEST: usize = 4096;
/// A client must finish a request line this long after it began it (or after connecting).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Clients served at once; more are answered with an error and closed.
pub const MAX_CLIENTS: usize = 64;
/// Unsent answer bytes allowed to pile up for a client that does not read.
const MAX_PENDING_OUTPUT: usize = 1 << 20;

/// Parses one request line (without its newline). The error is the answer's `error` text.
pub fn parse_request(line: &[u8]) -> Result<Request, String> {
    Request::parse(line)
}

/// An error answer.
pub fn error_answer(message: &str) -> Answer {
    Answer::error(message)
}

/// Identifies a client connection.
pub type ClientId = u64;

struct Client {
    stream: UnixStream,
    input: Vec<u8>,
    output: Vec<u8>,
    /// Drop the client if its current request line is not complete by then.
    deadline: Option<Instant>,
    /// Requests handed to the event loop and not answered yet (a reload waits for its end).
    outstanding: usize,
    /// The client closed its side: answer what it asked, then close.
    read_closed: bool,
    /// Close as soon as the output is flushed.
    closing: bool,
}

/// The control socket and its clients.
pub struct ControlServer {
    listener: UnixListener,
    path: PathBuf,
    /// The socket file's (dev, ino), so that only our own file is removed at exit.
    identity: (u64, u64),
    /// The directory sockhold created for the socket, removed again at exit if empty.
    created_dir: Option<PathBuf>,
    clients: BTreeMap<ClientId, Client>,
    next_id: ClientId,
    /// accept() ran out of fds or memory: the listener is left out of the poll until another
    /// event (which may have freed one) calls [`ControlServer::resume_accepting`].
    exhausted: bool,
    /// Since the last successful accept, an exhaustion was logged: say so once, not per retry.
    episode: bool,
}

/// Self-upgrade: the control socket as the next program reads it (the `control` part of
/// [`crate::upgrade::State`]). Every field is required and no other is accepted.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Handover {
    /// The fd number the next program inherits it at.
    pub fd: std::os::fd::RawFd,
    /// The socket file's path.
    pub path: PathBuf,
    /// The socket file's device, so that only our own file is removed at exit.
    pub dev: u64,
    /// The socket file's inode.
    pub ino: u64,
    /// The directory sockhold created for the socket.
    #[serde(deserialize_with = "Option::deserialize")]
    pub created_dir: Option<PathBuf>,
}

/// Whether a failed accept() means "no fd or memory left": the connection stays queued and the
/// listener stays readable, so polling it again at once would spin.
pub fn is_exhaustion(e: &std::io::Error) -> bool {
    use nix::libc;
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM))
}

/// Which fd a poll entry stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Token {
    /// The listening socket.
    Listener,
    /// A client.
    Client(ClientId),
}

impl ControlServer {
    /// Creates the socket at `path` with mode 0600. The parent directory is created (0700) if
    /// missing, and it and every directory above it must pass [`open_trusted_dir`] (a sticky
    /// world-writable one such as /tmp is refused too): elsewhere anyone could replace the socket.
    pub fn bind(path: &Path) -> Result<ControlServer> {
        let shown = path.display();
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let created_dir = (!parent.exists()).then(|| parent.to_path_buf());
        if created_dir.is_some() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent)
                .with_context(|| format!("failed to create {}", parent.display()))?;
        }
        // Whoever can write to the directory (or one above it) could put a socket of theirs at
        // the path, and every `sockhold ctl` would talk to it. Held open until the bind so the
        // directory checked is the one bound in.
        let _dir = open_trusted_dir(parent, Sticky::Refuse).map_err(|reason| {
            anyhow::anyhow!(
                "invalid --control {shown}: {reason}; put the control socket in a directory only root or sockhold's user can write to (for example /run/NAME/)"
            )
        })?;
        if let Ok(existing) = std::fs::symlink_metadata(path) {
            use std::os::unix::fs::FileTypeExt;
            if !existing.file_type().is_socket() {
                bail!("invalid --control {shown}: it exists and is not a socket");
            }
            if UnixStream::connect(path).is_ok() {
                bail!("invalid --control {shown}: another sockhold answers on it");
            }
            std::fs::remove_file(path)
                .with_context(|| format!("failed to remove the stale control socket {shown}"))?;
        }
        // Bind under a umask-independent mode: create, then restrict before anyone can use it.
        // The directory check above keeps others from reaching it in between.
        let listener = UnixListener::bind(path)
            .with_context(|| format!("failed to bind the control socket {shown}"))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("failed to set mode 0600 on {shown}"))?;
        listener.set_nonblocking(true).context("failed to make the control socket non-blocking")?;
        let meta = std::fs::metadata(path).with_context(|| format!("failed to stat {shown}"))?;
        Ok(ControlServer {
            listener,
            path: path.to_path_buf(),
            identity: (meta.dev(), meta.ino()),
            created_dir,
            clients: BTreeMap::new(),
            next_id: 1,
            exhausted: false,
            episode: false,
        })
    }

    /// Self-upgrade: the listening socket as the state names it.
    pub fn handover(&self) -> Handover {
        use std::os::fd::AsRawFd;
        Handover {
            fd: self.listener.as_raw_fd(),
            path: self.path.clone(),
            dev: self.identity.0,
            ino: self.identity.1,
            created_dir: self.created_dir.clone(),
        }
    }

    /// The fd of a client, to hand it over to the new program with its pending request.
    pub fn client_fd(&self, id: ClientId) -> Option<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        self.clients.get(&id).map(|c| c.stream.as_raw_fd())
    }

    /// Takes over a control socket from a [`ControlServer::handover`] entry. The fd must have
    /// been checked open.
    pub fn take_handover(state: &Handover) -> Result<ControlServer> {
        let listener = UnixListener::from(crate::sys::adopt_inherited_fd(state.fd));
        listener.set_nonblocking(true).context("failed to make the control socket non-blocking")?;
        Ok(ControlServer {
            listener,
            path: state.path.clone(),
            identity: (state.dev, state.ino),
            created_dir: state.created_dir.clone(),
            clients: BTreeMap::new(),
            next_id: 1,
            exhausted: false,
            episode: false,
        })
    }

    /// Takes over a client (fd `raw`, checked open) that waits for the answer to `outstanding`
    /// requests the old program accepted.
    pub fn take_client(&mut self, raw: std::os::fd::RawFd, outstanding: usize) -> ClientId {
        let stream = UnixStream::from(crate::sys::adopt_inherited_fd(raw));
        let _ = stream.set_nonblocking(true);
        let id = self.next_id;
        self.next_id += 1;
        let client = Client {
            stream,
            input: Vec::new(),
            output: Vec::new(),
            deadline: None,
            outstanding,
            read_closed: false,
            closing: false,
        };
        self.clients.insert(id, client);
        id
    }

    /// The fds to poll, with what each stands for and the events wanted.
    pub fn poll_set(&self) -> Vec<(BorrowedFd<'_>, PollFlags, Token)> {
        let mut set = Vec::with_capacity(1 + self.clients.len());
        if !self.exhausted {
            set.push((self.listener.as_fd(), PollFlags::POLLIN, Token::Listener));
        }
        for (&id, client) in &self.clients {
            let mut flags = PollFlags::empty();
            if !client.read_closed && !client.closing {
                flags |= PollFlags::POLLIN;
            }
            if !client.output.is_empty() {
                flags |= PollFlags::POLLOUT;
            }
            set.push((client.stream.as_fd(), flags, Token::Client(id)));
        }
        set
    }

    /// Something happened that may have freed an fd (a client left, a child was reaped): poll
    /// the listener again. No timer does this: an idle sockhold stays asleep.
    pub fn resume_accepting(&mut self) {
        self.exhausted = false;
    }

    /// The earliest client deadline.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.clients.values().filter_map(|c| c.deadline).min()
    }

    /// Handles readiness of one polled fd; returns the complete requests that arrived.
    pub fn on_ready(&mut self, token: Token, now: Instant) -> Vec<(ClientId, Request)> {
        match token {
            Token::Listener => {
                self.accept_all(now);
                Vec::new()
            }
            Token::Client(id) => {
                self.flush(id);
                self.read(id, now)
            }
        }
    }

    /// Drops clients whose request did not arrive in time.
    pub fn expire(&mut self, now: Instant) {
        let late: Vec<ClientId> = self
            .clients
            .iter()
            .filter(|(_, c)| c.deadline.is_some_and(|d| d <= now))
            .map(|(&id, _)| id)
            .collect();
        for id in late {
            debug!("control client {id}: no complete request within {REQUEST_TIMEOUT:?}; dropped");
            self.send(id, &error_answer("request timed out"));
            if let Some(client) = self.clients.get_mut(&id) {
                client.closing = true;
                client.deadline = None;
            }
            self.flush(id);
        }
    }

    /// Answers one request this server handed out (at once, or when a reload ended).
    pub fn answer(&mut self, id: ClientId, answer: &Answer) {
        if let Some(client) = self.clients.get_mut(&id) {
            client.outstanding = client.outstanding.saturating_sub(1);
            if client.outstanding == 0 {
                // Answered: the next request must come within the timeout, or the client goes.
                client.deadline = Some(Instant::now() + REQUEST_TIMEOUT);
            }
        }
        self.send(id, answer);
    }

    /// Queues a line for a client (if it is still there) and tries to send it.
    fn send(&mut self, id: ClientId, answer: &Answer) {
        let Some(client) = self.clients.get_mut(&id) else { return };
        let line = answer.line();
        client.output.extend_from_slice(line.as_bytes());
        if client.output.len() > MAX_PENDING_OUTPUT {
            debug!("control client {id} does not read its answers; dropped");
            self.clients.remove(&id);
            return;
        }
        self.flush(id);
    }

    fn accept_all(&mut self, now: Instant) {
        loop {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if is_exhaustion(&e) => {
                    if !self.episode {
                        warn!(
                            "control socket: accept failed: {e}; new control clients wait until sockhold has a file descriptor free"
                        );
                    }
                    self.episode = true;
                    self.exhausted = true;
                    return;
                }
                Err(e) => {
                    warn!("control socket: accept failed: {e}");
                    return;
                }
            };
            if self.episode {
                info!("control socket: accepting clients again");
                self.episode = false;
            }
            if let Err(e) = stream.set_nonblocking(true) {
                warn!("control socket: {e}");
                continue;
            }
            let id = self.next_id;
            self.next_id += 1;
            let allowed = match getsockopt(&stream, sockopt::PeerCredentials) {
                Ok(cred) => {
                    let uid = cred.uid();
                    let ours = nix::unistd::geteuid().as_raw();
                    if uid == 0 || uid == ours {
                        Ok(())
                    } else {
                        Err(format!("permission denied: uid {uid} may not control this sockhold"))
                    }
                }
                Err(e) => Err(format!("cannot identify the peer: {e}")),
            };
            let mut client = Client {
                stream,
                input: Vec::new(),
                output: Vec::new(),
                deadline: Some(now + REQUEST_TIMEOUT),
                outstanding: 0,
                read_closed: false,
                closing: false,
            };
            let refusal = match allowed {
                Err(e) => Some(e),
                Ok(()) if self.clients.len() >= MAX_CLIENTS => {
                    Some(format!("too many control clients (at most {MAX_CLIENTS})"))
                }
                Ok(()) => None,
            };
            if let Some(reason) = refusal {
                warn!("control socket: refused a client: {reason}");
                // Best effort: the answer fits in the socket buffer of a fresh connection.
                let _ = client.stream.write_all(error_answer(&reason).line().as_bytes());
                continue;
            }
            self.clients.insert(id, client);
        }
    }

    fn read(&mut self, id: ClientId, now: Instant) -> Vec<(ClientId, Request)> {
        let mut requests = Vec::new();
        let Some(client) = self.clients.get_mut(&id) else { return requests };
        let mut buf = [0u8; 4096];
        let mut oversized = false;
        while !client.read_closed && !client.closing {
            match client.stream.read(&mut buf) {
                Ok(0) => client.read_closed = true,
                Ok(n) => {
                    client.input.extend_from_slice(&buf[..n]);
                    if client.input.len() > MAX_REQUEST && !client.input.contains(&b'\n') {
                        oversized = true;
                        break;
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => {
                    client.read_closed = true;
                    client.input.clear();
                }
            }
        }
        let mut answers = Vec::new();
        while let Some(end) = client.input.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = client.input.drain(..=end).collect();
            let line = &line[..line.len() - 1];
            if line.len() >= MAX_REQUEST {
                answers.push(error_answer(&format!("request over {MAX_REQUEST} bytes")));
                client.closing = true;
                break;
            }
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            match parse_request(line) {
                Ok(request) => requests.push((id, request)),
                Err(e) => answers.push(error_answer(&e)),
            }
        }
        if oversized {
            answers.push(error_answer(&format!("request over {MAX_REQUEST} bytes")));
            client.closing = true;
        }
        if client.read_closed && !client.input.is_empty() && !client.closing {
            answers
                .push(error_answer("incomplete request: the connection closed before its newline"));
            client.input.clear();
        }
        client.outstanding += requests.len();
        // No deadline while the client waits for an answer; a request in progress keeps the
        // deadline it started with; an idle client must send its next one within the timeout.
        client.deadline = if client.outstanding > 0 {
            None
        } else if client.input.is_empty() {
            Some(now + REQUEST_TIMEOUT)
        } else {
            client.deadline.or(Some(now + REQUEST_TIMEOUT))
        };
        for answer in answers {
            self.send(id, &answer);
        }
        self.close_if_done(id);
        requests
    }

    fn flush(&mut self, id: ClientId) {
        let Some(client) = self.clients.get_mut(&id) else { return };
        while !client.output.is_empty() {
            match client.stream.write(&client.output) {
                Ok(0) => break,
                Ok(n) => {
                    client.output.drain(..n);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => {
                    // The client is gone: nobody to answer.
                    self.clients.remove(&id);
                    return;
                }
            }
        }
        self.close_if_done(id);
    }

    /// Closes a client that has nothing more to send or receive.
    fn close_if_done(&mut self, id: ClientId) {
        let Some(client) = self.clients.get(&id) else { return };
        let finished = client.closing || (client.read_closed && client.outstanding == 0);
        if finished && client.output.is_empty() {
            self.clients.remove(&id);
        }
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        match std::fs::metadata(&self.path) {
            Ok(meta) if (meta.dev(), meta.ino()) == self.identity => {
                if let Err(e) = std::fs::remove_file(&self.path) {
                    warn!("failed to remove the control socket {}: {e}", self.path.display());
                }
            }
            _ => {}
        }
        if let Some(dir) = &self.created_dir {
            // Only if empty: anything else in it is not sockhold's to remove.
            let _ = std::fs::remove_dir(dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signals::Signal;

    #[test]
    fn requests_table() {
        let ok = [
            (r#"{"cmd":"status"}"#, Request::Status),
            (r#"{"cmd":"reload"}"#, Request::Reload),
            (r#" {"cmd" : "stop"} "#, Request::Stop),
            (r#"{"cmd":"upgrade"}"#, Request::Upgrade),
            (r#"{"cmd":"signal","signal":"USR1"}"#, Request::Signal { signal: Signal::SIGUSR1 }),
            (
                r#"{"cmd":"signal","signal":"SIGWINCH"}"#,
                Request::Signal { signal: Signal::SIGWINCH },
            ),
            (r#"{"signal":10,"cmd":"signal"}"#, Request::Signal { signal: Signal::SIGUSR1 }),
            // Equal keys at another level are not the request's.
            (r#"{"cmd":"signal","signal":"USR1"}"#, Request::Signal { signal: Signal::SIGUSR1 }),
        ];
        for (line, want) in ok {
            assert_eq!(parse_request(line.as_bytes()), Ok(want), "{line}");
        }
        let bad = [
            ("", "invalid JSON"),
            ("{", "invalid JSON"),
            ("[]", "must be a JSON object"),
            ("\"status\"", "must be a JSON object"),
            ("{}", "needs \"cmd\""),
            (r#"{"cmd":1}"#, "must be a string"),
            (r#"{"cmd":"restart"}"#, "unknown command \"restart\""),
            (r#"{"cmd":"status","x":1}"#, "unexpected field \"x\""),
            (r#"{"cmd":"signal"}"#, "needs a \"signal\" field"),
            (r#"{"cmd":"signal","signal":"NOPE"}"#, "'NOPE' is not a signal"),
            (r#"{"cmd":"signal","signal":[1]}"#, "must be a name"),
            ("\u{0}\u{1}\u{2}", "invalid JSON"),
            (r#"{"cmd":"status","cmd":"stop"}"#, "duplicate key \"cmd\" in request"),
            (r#"{"cmd":"stop","cmd":"stop"}"#, "duplicate key \"cmd\""),
            (r#"{"cmd":"signal","signal":"USR1","signal":"KILL"}"#, "duplicate key \"signal\""),
            (r#"{"cmd":"status","x":{"a":1},"x":[]}"#, "duplicate key \"x\""),
        ];
        for (line, want) in bad {
            let err = parse_request(line.as_bytes()).unwrap_err();
            assert!(err.contains(want), "{line:?}: {err}");
        }
    }

    #[test]
    fn refuses_a_world_writable_directory_and_a_live_socket() {
        let dir = tempfile::tempdir().unwrap();
        let open = dir.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = ControlServer::bind(&open.join("c.sock")).err().expect("refused");
        assert!(format!("{err:#}").contains("writable by every user"), "{err:#}");
        assert!(format!("{err:#}").contains("mode 0777"), "{err:#}");
        // Sticky (like /tmp) does not help a socket: anyone can take a free name there first.
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o1777)).unwrap();
        let err = ControlServer::bind(&open.join("c.sock")).err().expect("refused");
        assert!(format!("{err:#}").contains("mode 1777"), "{err:#}");

        let path = dir.path().join("private").join("c.sock");
        let server = ControlServer::bind(&path).expect("bind");
        let mode = std::fs::metadata(&path).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let parent_mode = std::fs::metadata(path.parent().unwrap()).unwrap().mode() & 0o777;
        assert_eq!(parent_mode, 0o700, "created private");
        let err = ControlServer::bind(&path).err().expect("a live socket is refused");
        assert!(format!("{err:#}").contains("another sockhold answers"), "{err:#}");
        drop(server);
        assert!(!path.exists(), "removed on drop");
        assert!(!path.parent().unwrap().exists(), "the directory it created goes too");
    }
}

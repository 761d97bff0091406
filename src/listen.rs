//! The listening sockets sockhold holds for its children.
//!
//! The `--listen` spec grammar lives in [`spec`], which is pure; this module owns binding and
//! holding the sockets a [`ListenSpec`] names ([`Listener`]): socket options, the Unix socket
//! file (its directory, owner and mode), `listen` for the kinds that listen, the `O_NONBLOCK`
//! mode its spec asks for, adopting inherited sockets, removing the socket files it created,
//! repairing a listener a child has shut down, and handing listeners over to a new program
//! (their part of the self-upgrade state, [`Handover`], and taking them over). It
//! must never accept, read or wait on a listener: sockhold only keeps the sockets open and
//! passes them on; only children serve them.

use std::fmt;
use std::fs;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use std::collections::BTreeSet;

use anyhow::{Context, bail};
use nix::errno::Errno;
use nix::fcntl::FcntlArg::{F_GETFL, F_SETFL};
use nix::fcntl::{OFlag, fcntl};
use nix::sys::socket::{
    self, AddressFamily, Backlog, GetSockOpt, SetSockOpt, SockFlag, SockType, SockaddrStorage,
    UnixAddr, sockopt,
};
use nix::sys::stat::Mode;
use nix::unistd::{Gid, Uid};

mod spec;

use crate::steer::{FlowSteering, MAX_FLOWS, MAX_SLOTS, SteeringFds};

use spec::check_options_apply;
pub use spec::{
    Address, Adopt, Family, Host, ListenOptions, ListenSpec, Scope, SocketKind, UnixName,
    fd_name_is_valid, sanitize_fd_name,
};

/// A bound socket that sockhold holds for its whole life.
#[derive(Debug)]
pub struct Listener {
    fd: OwnedFd,
    spec: ListenSpec,
    name: String,
    local: String,
    /// The socket file this listener created, with its (dev, ino).
    unix_file: Option<(PathBuf, u64, u64)>,
    /// Its type (for an adopted socket, as the kernel reports it).
    kind: SocketKind,
    /// For an internet socket, the address it was bound to, port included: a `shutdown(2)` can
    /// release a port the kernel chose, and repairing the socket binds it there again.
    inet_addr: Option<SockaddrStorage>,
    /// With `steer=flow`: the steering of the reuseport group this socket anchors.
    steer: Option<Steered>,
}

/// A `steer=flow` listener's steering: the program and maps, and which slots units hold.
#[derive(Debug)]
pub struct Steered {
    steering: FlowSteering,
    /// Slots given to a unit's socket and not cleared since.
    in_use: BTreeSet<u32>,
    /// The socket of the last unit that was released while no other unit held one, kept in
    /// its slot as the target of every flow: it queues their datagrams for the next unit,
    /// which gets it (as the shared socket of a plain listener would), instead of letting them
    /// fall on the group's held socket, which nobody reads. Not handed over by a self-upgrade:
    /// closed by the exec, it leaves its slot, and the held socket takes its place until the
    /// next unit starts.
    spare: Option<(OwnedFd, u32)>,
}

/// A bound socket, what it is bound to, and the socket file it created.
type Bound = (OwnedFd, String, Option<(PathBuf, u64, u64)>);

impl Listener {
    /// Binds the socket (CLOEXEC inside sockhold, `SO_REUSEADDR` for TCP only), applies the
    /// spec's options, and listens (except datagram sockets) with the spec's backlog, or the
    /// kernel maximum (`somaxconn`) when unset or above `SOMAXCONN`. `default_name` is used for
    /// `LISTEN_FDNAMES` when the spec has no `name=`.
    pub fn bind(spec: &ListenSpec, default_name: &str) -> anyhow::Result<Listener> {
        let options = &spec.options;
        let mut default_name = sanitize_fd_name(default_name);
        let mut kind = spec.address.kind();
        let (fd, local, unix_file) = match &spec.address {
            Address::Inet { kind, host, port, family, scope } => {
                bind_inet(*kind, host, *port, *family, scope.as_ref(), options)?
            }
            Address::Unix { name, kind } => bind_unix(name, *kind, options)?,
            Address::Adopted(from) => {
                if let Adopt::Systemd(name) = from {
                    // The child sees the name the socket had: what a systemd unit would give it.
                    default_name = name.clone();
                }
                let (fd, local, adopted_kind) = adopt(from, spec)?;
                kind = adopted_kind;
                (fd, local, None)
            }
        };
        let name = (spec.options.name.clone()).unwrap_or(default_name);
        let spec = spec.clone();
        let mut listener =
            Listener { fd, spec, name, local, unix_file, kind, inet_addr: None, steer: None };
        if let Err(e) = listener.set_up() {
            listener.remove_socket_file();
            return Err(e);
        }
        if listener.spec.options.steer_flow {
            let steer = Steered::start(listener.fd.as_fd())
                .with_context(|| format!("steer=flow on {}", listener.local))?;
            log::info!(
                "steer=flow on {}: each unit gets its own socket; flows are kept by a {}-instruction eBPF program (flow table of {} flows)",
                listener.local,
                FlowSteering::program_len(),
                steer.steering.max_flows()
            );
            listener.steer = Some(steer);
        }
        listener.inet_addr =
            socket::getsockname::<SockaddrStorage>(listener.fd.as_raw_fd()).ok().filter(|a| {
                matches!(
                    socket::SockaddrLike::family(a),
                    Some(AddressFamily::Inet | AddressFamily::Inet6)
                )
            });
        Ok(listener)
    }

    /// What follows the bind: the socket file's owner and mode, the options any bound socket
    /// takes (an adopted one too), and `listen` for the kinds that listen.
    fn set_up(&self) -> anyhow::Result<()> {
        let options = &self.spec.options;
        if let Some((path, dev, ino)) = &self.unix_file {
            set_file_attributes(path, (*dev, *ino), options)?;
        }
        let (fd, local) = (&self.fd, &self.local);
        let set = |what: &str, result: nix::Result<()>| {
            os(result).with_context(|| format!("failed to set {what} on {local}"))
        };
        if options.nodelay {
            set("TCP_NODELAY", socket::setsockopt(fd, sockopt::TcpNoDelay, &true))?;
        }
        if options.keepalive {
            set("SO_KEEPALIVE", socket::setsockopt(fd, sockopt::KeepAlive, &true))?;
        }
        if let Some(size) = options.rcvbuf {
            let force = sockopt::RcvBufForce;
            set_buffer_size(fd, ("rcvbuf", "rmem_max"), size, sockopt::RcvBuf, force, local)?;
        }
        if let Some(size) = options.sndbuf {
            let force = sockopt::SndBufForce;
            set_buffer_size(fd, ("sndbuf", "wmem_max"), size, sockopt::SndBuf, force, local)?;
        }
        // An adopted socket that already listens keeps the backlog it was given, unless the
        // spec sets one.
        let listening = socket::getsockopt(fd, sockopt::AcceptConn).unwrap_or(false);
        if self.kind != SocketKind::Datagram && (!listening || options.backlog.is_some()) {
            os(socket::listen(fd, self.backlog()))
                .with_context(|| format!("failed to listen on {local}"))?;
        }
        Ok(())
    }

    /// The spec's backlog, or the kernel maximum.
    fn backlog(&self) -> Backlog {
        (self.spec.options.backlog)
            .and_then(|n| Backlog::new(i32::try_from(n).ok()?).ok())
            .unwrap_or(Backlog::MAXALLOWABLE)
    }

    /// Checks that a listener of a kind that listens still does, and repairs it if not; returns
    /// whether it had to. A child can break the one socket every generation shares:
    /// `shutdown(2)` with `SHUT_RD` on a TCP listener stops it listening (and releases a port the
    /// kernel chose), and on a Unix listener refuses every connection from then on (how
    /// Server::Starter and Gazelle lost their port). Until someone notices, every client is
    /// refused. A TCP socket is repaired in place: bound again to its address if the port was
    /// released, then `listen(2)` again, so every generation that holds it, an old one still
    /// serving too, accepts again. A shut-down Unix socket cannot listen again: a new one is
    /// bound in its place, and the generations started from then on get it. Logs a warning
    /// that names the listener.
    pub fn ensure_listening(&mut self) -> anyhow::Result<bool> {
        if self.kind == SocketKind::Datagram || (self.accepts_connections() && !self.shut_down()) {
            return Ok(false);
        }
        let local = self.local.clone();
        log::warn!("{local} no longer listens (did a child shut it down?); repairing it");
        match self.inet_addr {
            Some(addr) => self.listen_again(&addr)?,
            None => self.replace()?,
        }
        if !self.accepts_connections() {
            bail!("{local} still does not listen after the repair");
        }
        log::warn!("{local} listens again");
        Ok(true)
    }

    /// `SO_ACCEPTCONN`: whether the socket is in the listening state.
    fn accepts_connections(&self) -> bool {
        socket::getsockopt(&self.fd, sockopt::AcceptConn).unwrap_or(false)
    }

    /// Whether a Unix listener was shut down: it still says it listens, but its poll state shows
    /// the shutdown (`POLLHUP` after `SHUT_RDWR`, `POLLRDHUP` after `SHUT_RD`). A zero-timeout
    /// look at the state, never a wait for connections.
    fn shut_down(&self) -> bool {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        let rdhup = PollFlags::from_bits_retain(nix::libc::POLLRDHUP);
        let mut fds = [PollFd::new(self.fd.as_fd(), rdhup)];
        match poll(&mut fds, PollTimeout::ZERO) {
            // nix knows no POLLRDHUP, and gives no flags at all when the kernel set a bit it
            // does not know: here, that can only be the POLLRDHUP asked for.
            Ok(n) if n > 0 => fds[0].revents().is_none_or(|r| r.contains(PollFlags::POLLHUP)),
            _ => false,
        }
    }

    /// Makes a TCP socket listen again on the same open file description, on its port.
    fn listen_again(&self, addr: &SockaddrStorage) -> anyhow::Result<()> {
        let local = &self.local;
        // The shutdown released the port if the kernel had chosen it (bound to port 0): bind it
        // again, or listen(2) would pick another. EINVAL: the socket is still bound.
        match socket::bind(self.fd.as_raw_fd(), addr) {
            Ok(()) | Err(Errno::EINVAL) => {}
            Err(e) => return os(Err(e)).with_context(|| format!("failed to bind {local} again")),
        }
        os(socket::listen(&self.fd, self.backlog()))
            .with_context(|| format!("failed to listen on {local} again"))?;
        let now = socket::getsockname::<SockaddrStorage>(self.fd.as_raw_fd()).ok();
        if now.as_ref() != Some(addr) {
            bail!("{local} listens again, but on {}", now.map_or("?".into(), |a| a.to_string()));
        }
        Ok(())
    }

    /// Binds a new socket from the spec in place of this one (for the same Unix path, after
    /// checking that nothing answers on it any more).
    fn replace(&mut self) -> anyhow::Result<()> {
        if matches!(self.spec.address, Address::Adopted(_)) {
            bail!(
                "cannot re-create {}: it was inherited ({}), not bound by sockhold",
                self.local,
                self.spec.text
            );
        }
        let fresh = Listener::bind(&self.spec, &self.name)
            .with_context(|| format!("failed to re-create {}", self.local))?;
        // A new open file description that no child holds yet: it gets the spec's mode.
        fresh.set_spec_mode()?;
        *self = fresh;
        Ok(())
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// With `steer=flow`: its steering.
    pub fn steering(&self) -> Option<&FlowSteering> {
        self.steer.as_ref().map(|s| &s.steering)
    }

    /// With `steer=flow`: a socket of its own for one unit, bound with the spec's options to
    /// the address this socket is bound to (its real port) in the same reuseport group, and put
    /// in a free steering slot. Returns the socket and its slot.
    pub fn unit_socket(&mut self) -> anyhow::Result<(OwnedFd, u32)> {
        let local = self.local.clone();
        let context = || format!("steer=flow on {local}: a socket for a new unit");
        let Some(steer) = &mut self.steer else { bail!("{local} is not steered") };
        if let Some((fd, slot)) = steer.spare.take() {
            steer.in_use.insert(slot);
            return Ok((fd, slot));
        }
        let slot = (0..MAX_SLOTS)
            .find(|slot| !steer.in_use.contains(slot))
            .with_context(|| format!("{}: all {MAX_SLOTS} steering slots are taken", context()))?;
        let fd = bind_member(self.fd.as_fd(), &self.spec.options, &local).with_context(context)?;
        steer.steering.set_slot(slot, fd.as_fd()).with_context(context)?;
        steer.in_use.insert(slot);
        Ok((fd, slot))
    }

    /// With `steer=flow`: a unit is gone. Its slot is emptied, its flows forgotten and the
    /// slot free again; but when no other unit holds a socket of this listener, its socket
    /// stays in its slot as the spare (see [`Steered::spare`]) and every flow goes there.
    pub fn release_slot(&mut self, fd: OwnedFd, slot: u32) {
        let Some(steer) = &mut self.steer else { return };
        steer.in_use.remove(&slot);
        if steer.in_use.is_empty() && steer.spare.is_none() {
            if let Err(e) = steer.steering.set_new_flow_slots(&[slot]) {
                log::warn!("steer=flow on {}: {e:#}", self.local);
            }
            steer.spare = Some((fd, slot));
            return;
        }
        if let Err(e) = steer.steering.clear_slot(slot) {
            log::warn!("steer=flow on {}: {e:#}", self.local);
        }
    }

    /// With `steer=flow`: the spare socket's slot, while no unit holds one (new flows go
    /// there).
    pub fn spare_slot(&self) -> Option<u32> {
        self.steer.as_ref().and_then(|s| s.spare.as_ref()).map(|(_, slot)| *slot)
    }

    /// The socket's name for `LISTEN_FDNAMES`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// What was actually bound, for logs: "127.0.0.1:41234" (the real port after port 0),
    /// "[::]:8080", "/run/app.sock", "@app"; other kinds than stream in URL form:
    /// "udp://127.0.0.1:53", "unixgram:///run/log.sock", "unixpacket://@app".
    pub fn local_description(&self) -> &str {
        &self.local
    }

    /// Sets or clears `O_NONBLOCK` on the socket's open file description,
    /// which every child shares.
    pub fn set_nonblocking(&self, on: bool) -> anyhow::Result<()> {
        let context = || format!("failed to set O_NONBLOCK={on} on {}", self.local);
        let mut flags =
            OFlag::from_bits_retain(os(fcntl(&self.fd, F_GETFL)).with_context(context)?);
        flags.set(OFlag::O_NONBLOCK, on);
        os(fcntl(&self.fd, F_SETFL(flags))).with_context(context)?;
        Ok(())
    }

    /// Gives the socket the mode its spec asks for: `O_NONBLOCK` with `nonblock`, blocking
    /// without. The flag lives on the open file description that sockhold and every generation
    /// share, and a server that set it relies on it (HAProxy's workers hang in accept() without
    /// it): call this only while no child holds the socket, never under a running one.
    pub fn set_spec_mode(&self) -> anyhow::Result<()> {
        self.set_nonblocking(self.spec.options.nonblock)
    }

    /// Removes the Unix socket file if sockhold created it and it is still the
    /// same inode, never a file that replaced it. Idempotent; logs failures.
    pub fn remove_socket_file(&self) {
        let Some((path, dev, ino)) = &self.unix_file else {
            return;
        };
        let shown = path.display();
        let result = match fs::symlink_metadata(path) {
            Ok(meta) if (meta.dev(), meta.ino()) != (*dev, *ino) => {
                log::warn!("not removing {shown}: another file has replaced our socket");
                Ok(())
            }
            Ok(_) => fs::remove_file(path),
            Err(e) => Err(e),
        };
        match result {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                log::warn!("failed to remove socket file {shown}: {e}");
            }
            _ => {}
        }
    }
}

/// Self-upgrade: a held listener as the next program reads it (one entry of
/// [`crate::upgrade::State`]'s `listeners`). Every field is required and no other is accepted.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Handover {
    /// The fd number the next program inherits it at.
    pub fd: RawFd,
    /// Its `--listen` spec, as given.
    pub spec: String,
    /// Its name in `LISTEN_FDNAMES`.
    pub name: String,
    /// The local address, for messages.
    pub local: String,
    /// The socket file it created, to remove at exit.
    #[serde(deserialize_with = "Option::deserialize")]
    pub unix_file: Option<UnixFileHandover>,
    /// Its socket type.
    pub kind: KindHandover,
    /// With `steer=flow`: the steering's program and maps, and the slots units hold.
    #[serde(deserialize_with = "Option::deserialize")]
    pub steering: Option<SteeringHandover>,
}

/// A `steer=flow` listener's steering in a [`Handover`]: the fd numbers of its program and maps
/// (the socket itself is the listener's fd, the anchor of the group), and the slots in use.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SteeringHandover {
    /// The `SK_REUSEPORT` program.
    pub program: RawFd,
    /// The slot → socket map.
    pub sockets: RawFd,
    /// The flow table.
    pub flows: RawFd,
    /// The new-flow slots.
    pub config: RawFd,
    /// The slots a unit's socket holds.
    pub slots: Vec<u32>,
}

impl SteeringHandover {
    fn fds(&self) -> [RawFd; 4] {
        [self.program, self.sockets, self.flows, self.config]
    }
}

/// The socket file a listener created, with its identity.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnixFileHandover {
    /// Its path.
    pub path: PathBuf,
    /// Its device.
    pub dev: u64,
    /// Its inode.
    pub ino: u64,
}

/// A listener's socket type in a [`Handover`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KindHandover {
    /// Stream.
    Stream,
    /// Datagram.
    Datagram,
    /// Sequential packet.
    SeqPacket,
}

/// Self-upgrade: a held listener as the state names it, and back in the new program.
impl Listener {
    /// What the new program needs to hold this listener as it is: its fd number and the rest.
    pub fn handover(&self) -> Handover {
        Handover {
            fd: self.fd.as_raw_fd(),
            spec: self.spec.text.clone(),
            name: self.name.clone(),
            local: self.local.clone(),
            unix_file: self.unix_file.as_ref().map(|(path, dev, ino)| UnixFileHandover {
                path: path.clone(),
                dev: *dev,
                ino: *ino,
            }),
            kind: match self.kind {
                SocketKind::Stream => KindHandover::Stream,
                SocketKind::Datagram => KindHandover::Datagram,
                SocketKind::SeqPacket => KindHandover::SeqPacket,
            },
            steering: self.steer.as_ref().map(|steer| {
                let fds = steer.steering.fds();
                SteeringHandover {
                    program: fds.program.as_raw_fd(),
                    sockets: fds.sockets.as_raw_fd(),
                    flows: fds.flows.as_raw_fd(),
                    config: fds.config.as_raw_fd(),
                    slots: steer.in_use.iter().copied().collect(),
                }
            }),
        }
    }

    /// Every fd a [`Handover`] of this listener names: its socket, and its steering's.
    pub fn handover_fds(&self) -> Vec<RawFd> {
        let mut fds = vec![self.fd.as_raw_fd()];
        if let Some(steer) = &self.steer {
            let s = steer.steering.fds();
            fds.extend([&s.program, &s.sockets, &s.flows, &s.config].map(|fd| fd.as_raw_fd()));
        }
        fds
    }

    /// Checks the steering of a [`Handover`]: with `dry`, only that its fd numbers can be fds;
    /// else that they are the program and maps a steering needs (on copies, taking nothing).
    /// Returns the fd numbers.
    pub fn check_steering_handover(state: &Handover, dry: bool) -> Result<Vec<RawFd>, String> {
        let Some(steering) = &state.steering else { return Ok(Vec::new()) };
        let text = &state.spec;
        if !state.spec.parse::<ListenSpec>().is_ok_and(|spec| spec.options.steer_flow) {
            return Err(format!("listener {text} has a steering, but its spec does not steer"));
        }
        let fds = steering.fds();
        if let Some(fd) = fds.iter().find(|fd| **fd < 0) {
            return Err(format!("the steering of {text} has fd {fd}, which cannot be handed over"));
        }
        if let Some(slot) = steering.slots.iter().find(|slot| **slot >= MAX_SLOTS) {
            return Err(format!("the steering of {text} has slot {slot}, beyond {MAX_SLOTS}"));
        }
        if dry {
            return Ok(fds.to_vec());
        }
        let copy = |fd: RawFd| -> Result<OwnedFd, String> {
            let borrowed = crate::sys::borrow_inherited_fd(fd)
                .map_err(|e| format!("steering fd {fd} of {text} is not open: {e}"))?;
            borrowed.try_clone_to_owned().map_err(|e| format!("steering fd {fd} of {text}: {e}"))
        };
        let [program, sockets, flows, config] = fds;
        FlowSteering::from_fds(SteeringFds {
            program: copy(program)?,
            sockets: copy(sockets)?,
            flows: copy(flows)?,
            config: copy(config)?,
        })
        .map_err(|e| format!("the steering of {text}: {e:#}"))?;
        Ok(fds.to_vec())
    }

    /// Checks a [`Handover`] without its fd (a dry run has none): its spec parses and its fd
    /// number is one an fd can have.
    pub fn check_handover_dry(state: &Handover) -> Result<RawFd, String> {
        state.spec.parse::<ListenSpec>().map_err(|e| e.to_string())?;
        if state.fd < 0 {
            return Err(format!(
                "listener {} has fd {}, which cannot be handed over",
                state.spec, state.fd
            ));
        }
        Ok(state.fd)
    }

    /// Checks a [`Handover`]: its spec parses and its fd is an open socket. Returns the fd
    /// number; nothing is taken over yet.
    pub fn check_handover(state: &Handover) -> Result<RawFd, String> {
        let fd = Self::check_handover_dry(state)?;
        let text = &state.spec;
        let borrowed = crate::sys::borrow_inherited_fd(fd)
            .map_err(|e| format!("listener fd {fd} ({text}) is not open: {e}"))?;
        socket::getsockopt(&borrowed, sockopt::SockType)
            .map_err(|e| format!("listener fd {fd} ({text}) is not a socket: {e}"))?;
        Ok(fd)
    }

    /// Takes over a listener checked by [`Listener::check_handover`].
    pub fn take_handover(state: &Handover) -> Listener {
        let fd = state.fd;
        let spec = state.spec.parse::<ListenSpec>().expect("checked by check_handover");
        let unix_file = state.unix_file.as_ref().map(|f| (f.path.clone(), f.dev, f.ino));
        let kind = match state.kind {
            KindHandover::Stream => SocketKind::Stream,
            KindHandover::Datagram => SocketKind::Datagram,
            KindHandover::SeqPacket => SocketKind::SeqPacket,
        };
        let fd = crate::sys::adopt_inherited_fd(fd);
        let inet_addr = socket::getsockname::<SockaddrStorage>(fd.as_raw_fd()).ok().filter(|a| {
            matches!(
                socket::SockaddrLike::family(a),
                Some(AddressFamily::Inet | AddressFamily::Inet6)
            )
        });
        let steer = state.steering.as_ref().and_then(|steering| {
            let [program, sockets, flows, config] =
                steering.fds().map(crate::sys::adopt_inherited_fd);
            match FlowSteering::from_fds(SteeringFds { program, sockets, flows, config }) {
                Ok(steering_now) => Some(Steered {
                    steering: steering_now,
                    in_use: steering.slots.iter().copied().collect(),
                    spare: None,
                }),
                // Checked on copies by check_steering_handover: only a kernel that changed its
                // mind in between gets here. The program stays attached to the group.
                Err(e) => {
                    log::error!("after the upgrade, the steering of {} is lost: {e:#}", state.spec);
                    None
                }
            }
        });
        Listener {
            fd,
            spec,
            name: state.name.clone(),
            local: state.local.clone(),
            unix_file,
            kind,
            inet_addr,
            steer,
        }
    }
}

impl Steered {
    /// Creates the steering and attaches its program to the group `anchor` belongs to.
    fn start(anchor: BorrowedFd<'_>) -> anyhow::Result<Steered> {
        let steering = FlowSteering::new(MAX_FLOWS)?;
        steering.attach(anchor)?;
        Ok(Steered { steering, in_use: BTreeSet::new(), spare: None })
    }
}

/// A new member of the reuseport group of `anchor`: a UDP socket with the spec's options, bound
/// to the anchor's own address (port included, so a port the kernel chose is shared too).
fn bind_member(
    anchor: BorrowedFd<'_>,
    options: &ListenOptions,
    local: &str,
) -> anyhow::Result<OwnedFd> {
    let addr = os(socket::getsockname::<SockaddrStorage>(anchor.as_raw_fd()))
        .context("getsockname on the held socket")?;
    let family = socket::SockaddrLike::family(&addr).context("the held socket has no family")?;
    let fd = os(new_socket(family, SocketKind::Datagram, SockFlag::empty()))
        .context("failed to create a socket")?;
    let set = |what: &str, result: nix::Result<()>| {
        os(result).with_context(|| format!("failed to set {what}"))
    };
    if family == AddressFamily::Inet6 {
        let v6only = os(socket::getsockopt(&anchor, sockopt::Ipv6V6Only))
            .context("failed to read IPV6_V6ONLY of the held socket")?;
        set("IPV6_V6ONLY", socket::setsockopt(&fd, sockopt::Ipv6V6Only, &v6only))?;
    }
    set("SO_REUSEPORT", socket::setsockopt(&fd, sockopt::ReusePort, &true))?;
    if options.freebind {
        set("IP_FREEBIND", socket::setsockopt(&fd, sockopt::IpFreebind, &true))?;
    }
    if let Some(device) = &options.device {
        let name = std::ffi::OsString::from(device);
        set("SO_BINDTODEVICE", socket::setsockopt(&fd, sockopt::BindToDevice, &name))?;
    }
    os(socket::bind(fd.as_raw_fd(), &addr)).context("failed to bind it")?;
    if let Some(size) = options.rcvbuf {
        let force = sockopt::RcvBufForce;
        set_buffer_size(&fd, ("rcvbuf", "rmem_max"), size, sockopt::RcvBuf, force, local)?;
    }
    if let Some(size) = options.sndbuf {
        let force = sockopt::SndBufForce;
        set_buffer_size(&fd, ("sndbuf", "wmem_max"), size, sockopt::SndBuf, force, local)?;
    }
    if options.nonblock {
        let flags = OFlag::from_bits_retain(os(fcntl(&fd, F_GETFL))?) | OFlag::O_NONBLOCK;
        os(fcntl(&fd, F_SETFL(flags))).context("failed to set O_NONBLOCK")?;
    }
    Ok(fd)
}

/// Converts nix's errors to std's, whose message anyhow shows as
/// "Permission denied (os error 13)".
fn os<T>(result: nix::Result<T>) -> io::Result<T> {
    result.map_err(io::Error::from)
}

fn new_socket(family: AddressFamily, kind: SocketKind, flags: SockFlag) -> nix::Result<OwnedFd> {
    let ty = match kind {
        SocketKind::Stream => SockType::Stream,
        SocketKind::Datagram => SockType::Datagram,
        SocketKind::SeqPacket => SockType::SeqPacket,
    };
    socket::socket(family, ty, flags | SockFlag::SOCK_CLOEXEC, None)
}

/// Takes the inherited socket of an `fd://` or `systemd://` spec, checks the spec's options
/// against what it really is, and describes it.
fn adopt(from: &Adopt, spec: &ListenSpec) -> anyhow::Result<(OwnedFd, String, SocketKind)> {
    let raw = match from {
        Adopt::Fd(fd) => *fd,
        Adopt::Systemd(name) => {
            let inherited = crate::adopt::Inherited::from_env().map_err(anyhow::Error::msg)?;
            inherited.by_name(name).map_err(anyhow::Error::msg)?
        }
    };
    let (fd, sock_type) =
        crate::adopt::take(raw).with_context(|| format!("cannot adopt {}", spec.text))?;
    let kind = match sock_type {
        SockType::Stream => SocketKind::Stream,
        SockType::Datagram => SocketKind::Datagram,
        SockType::SeqPacket => SocketKind::SeqPacket,
        other => {
            anyhow::bail!("cannot adopt {}: fd {raw} is a socket of type {other:?}", spec.text)
        }
    };
    let addr = socket::getsockname::<SockaddrStorage>(fd.as_raw_fd())
        .with_context(|| format!("cannot adopt {}: getsockname on fd {raw}", spec.text))?;
    let real = if let Some(v4) = addr.as_sockaddr_in() {
        let ip = IpAddr::V4(v4.ip());
        Address::Inet {
            kind,
            host: Host::Ip(ip),
            port: v4.port(),
            family: Family::Any,
            scope: None,
        }
    } else if let Some(v6) = addr.as_sockaddr_in6() {
        let ip = IpAddr::V6(v6.ip());
        Address::Inet {
            kind,
            host: Host::Ip(ip),
            port: v6.port(),
            family: Family::Any,
            scope: None,
        }
    } else if let Some(unix) = addr.as_unix_addr() {
        let name = match (unix.path(), unix.as_abstract()) {
            (Some(path), _) => UnixName::Path(path.to_path_buf()),
            (None, Some(name)) => UnixName::Abstract(String::from_utf8_lossy(name).into_owned()),
            _ => UnixName::Abstract(String::new()),
        };
        Address::Unix { name, kind }
    } else {
        anyhow::bail!(
            "cannot adopt {}: fd {raw} is neither an internet nor a Unix socket",
            spec.text
        );
    };
    if let Some((_, options)) = spec.text.split_once(',') {
        let (_, given) = ListenOptions::parse(options).map_err(anyhow::Error::msg)?;
        check_options_apply(&real, &given)
            .map_err(|e| anyhow::anyhow!("cannot adopt {}: {e}", spec.text))?;
    }
    let local = match &real {
        Address::Inet { host: Host::Ip(ip), port, .. } => {
            describe_inet(kind, &SocketAddr::new(*ip, *port))
        }
        Address::Unix { name, .. } => describe_unix(name, kind),
        _ => unreachable!("built above"),
    };
    log::info!("adopted {} (inherited fd {raw}): {local}", spec.text);
    Ok((fd, local, kind))
}

/// An internet address as logs show it: TCP as it is, UDP as a URL.
fn describe_inet(kind: SocketKind, addr: &impl fmt::Display) -> String {
    match kind {
        SocketKind::Datagram => format!("udp://{addr}"),
        _ => addr.to_string(),
    }
}

/// Creates and binds a TCP or UDP socket with the options that must precede `bind`. A bare
/// port binds `[::]` dual-stack, or `0.0.0.0` when the kernel has no IPv6.
fn bind_inet(
    kind: SocketKind,
    host: &Host,
    port: u16,
    family: Family,
    scope: Option<&Scope>,
    options: &ListenOptions,
) -> anyhow::Result<Bound> {
    let mut addr = match host {
        Host::Any => SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)),
        Host::Ip(ip) => SocketAddr::new(*ip, port),
        Host::Name(name) => resolve(name, port, family)?,
    };
    if let (Some(scope), SocketAddr::V6(v6)) = (scope, &mut addr) {
        let index = match scope {
            Scope::Index(index) => *index,
            Scope::Name(name) => {
                os(nix::net::if_::if_nametoindex(name.as_str())).with_context(|| {
                    format!("failed to bind {}: no interface '{name}'", describe_inet(kind, v6))
                })?
            }
        };
        v6.set_scope_id(index);
    }
    let create = |addr: &SocketAddr| {
        let family = if addr.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
        new_socket(family, kind, SockFlag::empty())
    };
    let (fd, addr) = match create(&addr) {
        // Without IPv6, a bare port means IPv4 only; unless IPv6 was asked for with v6only.
        Err(Errno::EAFNOSUPPORT) if *host == Host::Any && options.v6only.is_none() => {
            let any4 = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
            (create(&any4), any4)
        }
        fd => (fd, addr),
    };
    let shown = describe_inet(kind, &addr);
    let fd = os(fd).with_context(|| format!("failed to create a socket for {shown}"))?;
    let set = |what: &str, result: nix::Result<()>| {
        os(result).with_context(|| format!("failed to set {what} on {shown}"))
    };
    match (addr.is_ipv6(), options.v6only) {
        (true, Some(v6only)) => {
            set("IPV6_V6ONLY", socket::setsockopt(&fd, sockopt::Ipv6V6Only, &v6only))?;
        }
        (true, None) if *host == Host::Any => {
            set("IPV6_V6ONLY=0", socket::setsockopt(&fd, sockopt::Ipv6V6Only, &false))?;
        }
        (false, Some(_)) => bail!("option 'v6only' needs an IPv6 socket, and {shown} is IPv4"),
        _ => {}
    }
    // TCP: SO_REUSEADDR lets sockhold bind again while connections of a previous holder are in
    // TIME_WAIT. UDP has no TIME_WAIT, and there SO_REUSEADDR would let any process of any uid
    // that sets it too bind the same address and port, and take every unicast datagram.
    if kind == SocketKind::Stream {
        set("SO_REUSEADDR", socket::setsockopt(&fd, sockopt::ReuseAddr, &true))?;
    }
    // steer=flow: this socket anchors the reuseport group the units' sockets join.
    if options.reuseport || options.steer_flow {
        set("SO_REUSEPORT", socket::setsockopt(&fd, sockopt::ReusePort, &true))?;
    }
    if options.freebind {
        // IPV6_FREEBIND (Linux 4.15) sets the same flag as IP_FREEBIND, which the kernel takes
        // on IPv6 sockets too (nix has only the latter).
        set("IP_FREEBIND", socket::setsockopt(&fd, sockopt::IpFreebind, &true))?;
    }
    if let Some(device) = &options.device {
        let name = std::ffi::OsString::from(device);
        set(
            &format!("SO_BINDTODEVICE={device}"),
            socket::setsockopt(&fd, sockopt::BindToDevice, &name),
        )?;
    }
    os(socket::bind(fd.as_raw_fd(), &SockaddrStorage::from(addr)))
        .with_context(|| format!("failed to bind {shown}"))?;
    let local = socket::getsockname::<SockaddrStorage>(fd.as_raw_fd());
    let local = local.map_or(shown, |local| describe_inet(kind, &local));
    Ok((fd, local, None))
}

/// Resolves a hostname to its first address of the wanted family.
fn resolve(name: &str, port: u16, family: Family) -> anyhow::Result<SocketAddr> {
    let context = || format!("failed to resolve host '{name}'");
    let mut addrs = (name, port).to_socket_addrs().with_context(context)?;
    let (wanted, found) = match family {
        Family::Any => ("", addrs.next()),
        Family::V4 => ("IPv4 ", addrs.find(SocketAddr::is_ipv4)),
        Family::V6 => ("IPv6 ", addrs.find(SocketAddr::is_ipv6)),
    };
    found.with_context(|| format!("{}: it has no {wanted}address", context()))
}

/// A Unix socket as logs show it: a stream socket as its path or `@name`, other kinds as URLs.
fn describe_unix(name: &UnixName, kind: SocketKind) -> String {
    let scheme = match kind {
        SocketKind::Stream => "",
        SocketKind::Datagram => "unixgram://",
        SocketKind::SeqPacket => "unixpacket://",
    };
    match name {
        UnixName::Path(path) => format!("{scheme}{}", path.display()),
        UnixName::Abstract(name) => format!("{scheme}@{name}"),
    }
}

/// Creates and binds a Unix socket. For a path: first refuses a live socket and removes a stale
/// one, creates missing parent directories (0755, or `dirmode=`), makes the file no more permissive than
/// `mode=` from its birth, and records the (dev, ino) of the file it creates.
fn bind_unix(name: &UnixName, kind: SocketKind, options: &ListenOptions) -> anyhow::Result<Bound> {
    let shown = describe_unix(name, kind);
    let path = match name {
        UnixName::Abstract(abstract_name) => {
            let fd = os(new_socket(AddressFamily::Unix, kind, SockFlag::empty()))
                .context("failed to create a Unix socket")?;
            let addr = os(UnixAddr::new_abstract(abstract_name.as_bytes()))
                .with_context(|| format!("bad abstract name {shown}"))?;
            os(socket::bind(fd.as_raw_fd(), &addr))
                .with_context(|| format!("failed to bind {shown}"))?;
            return Ok((fd, shown, None));
        }
        UnixName::Path(path) => path,
    };
    remove_stale_socket(path, kind)?;
    if let Some(dir) = path.parent()
        && !dir.exists()
    {
        let mode = options.dirmode.unwrap_or(0o755);
        fs::DirBuilder::new().recursive(true).mode(mode).create(dir).with_context(|| {
            format!("failed to create directory '{}' for {shown}", dir.display())
        })?;
        log::info!("created directory {} for {shown}", dir.display());
    }
    let fd = os(new_socket(AddressFamily::Unix, kind, SockFlag::empty()))
        .context("failed to create a Unix socket")?;
    if let Some(mode) = options.mode {
        // bind(2) creates the file with the socket inode's mode less the umask: set it first,
        // so the file never allows more than asked, even before the chmod that follows bind.
        os(nix::sys::stat::fchmod(&fd, Mode::from_bits_truncate(mode)))
            .with_context(|| format!("failed to set mode {mode:04o} on a socket for {shown}"))?;
    }
    let addr = os(UnixAddr::new(path)).with_context(|| format!("bad path {shown}"))?;
    os(socket::bind(fd.as_raw_fd(), &addr)).with_context(|| format!("failed to bind {shown}"))?;
    let meta =
        fs::symlink_metadata(path).with_context(|| format!("failed to stat {}", path.display()))?;
    Ok((fd, shown, Some((path.to_owned(), meta.dev(), meta.ino()))))
}

/// Sets the owner, group and mode of the socket file sockhold just created, through an
/// `O_PATH` handle on the file itself, after checking that it is still that inode: a file
/// swapped in meanwhile (in a directory others can write to) is never changed.
fn set_file_attributes(
    path: &Path,
    (dev, ino): (u64, u64),
    options: &ListenOptions,
) -> anyhow::Result<()> {
    if options.owner.is_none() && options.group.is_none() && options.mode.is_none() {
        return Ok(());
    }
    let shown = path.display();
    let flags = OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let file = os(nix::fcntl::open(path, flags, Mode::empty()))
        .with_context(|| format!("failed to open {shown}"))?;
    // An O_PATH fd takes neither fchown nor fchmod; its /proc link reaches the inode itself.
    let inode = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
    let meta = fs::metadata(&inode).with_context(|| format!("failed to stat {shown}"))?;
    if (meta.dev(), meta.ino()) != (dev, ino) {
        bail!("'{shown}' was replaced by another file while sockhold set it up");
    }
    if options.owner.is_some() || options.group.is_some() {
        let (uid, gid) = (options.owner.map(Uid::as_raw), options.group.map(Gid::as_raw));
        std::os::unix::fs::chown(&inode, uid, gid)
            .with_context(|| format!("failed to change the owner of {shown}"))?;
    }
    if let Some(mode) = options.mode {
        fs::set_permissions(&inode, fs::Permissions::from_mode(mode))
            .with_context(|| format!("failed to set mode {mode:04o} on {shown}"))?;
    }
    Ok(())
}

/// Sets `SO_RCVBUF` or `SO_SNDBUF` as systemd does. The kernel stores twice the value (room
/// for its bookkeeping; getsockopt reports the doubled figure), and caps it at
/// `net.core.rmem_max`/`wmem_max`; past the cap, `SO_*BUFFORCE` needs `CAP_NET_ADMIN`. Without
/// it, the capped size stays and a warning says so.
fn set_buffer_size<O, F>(
    fd: &OwnedFd,
    (what, sysctl): (&str, &str),
    size: usize,
    opt: O,
    force: F,
    local: &str,
) -> anyhow::Result<()>
where
    O: SetSockOpt<Val = usize> + GetSockOpt<Val = usize> + Copy,
    F: SetSockOpt<Val = usize>,
{
    let context = || format!("failed to set {what}={size} on {local}");
    os(socket::setsockopt(fd, opt, &size)).with_context(context)?;
    let mut got = os(socket::getsockopt(fd, opt)).with_context(context)?;
    if got < 2 * size && socket::setsockopt(fd, force, &size).is_ok() {
        got = os(socket::getsockopt(fd, opt)).with_context(context)?;
    }
    if got < 2 * size {
        log::warn!(
            "{what}={size} on {local}: the kernel allows {} bytes; raise net.core.{sysctl}, \
             or give sockhold CAP_NET_ADMIN",
            got / 2
        );
    }
    Ok(())
}

/// Refuses a path that is not a socket or that a server answers on, and
/// removes a socket file nobody listens on any more.
fn remove_stale_socket(path: &Path, kind: SocketKind) -> anyhow::Result<()> {
    let shown = path.display();
    match fs::symlink_metadata(path) {
        // ENOTDIR: a file where a directory should be, which creating the directory reports.
        Err(e)
            if e.kind() == io::ErrorKind::NotFound
                || e.raw_os_error() == Some(Errno::ENOTDIR as i32) =>
        {
            return Ok(());
        }
        Err(e) => return Err(e).with_context(|| format!("failed to stat '{shown}'")),
        Ok(meta) if !meta.file_type().is_socket() => bail!("'{shown}' exists and is not a socket"),
        Ok(_) => {}
    }
    // Non-blocking, so that a live server with a full backlog (EAGAIN) cannot hang us. A probe
    // of the spec's own kind: a datagram socket "connects" to a live one at once, and a live
    // socket of another kind answers EPROTOTYPE. Only a file nobody holds refuses.
    let probe = new_socket(AddressFamily::Unix, kind, SockFlag::SOCK_NONBLOCK);
    let probe = os(probe).context("failed to create a Unix socket")?;
    let addr = os(UnixAddr::new(path)).with_context(|| format!("bad path {shown}"))?;
    match socket::connect(probe.as_raw_fd(), &addr) {
        Ok(()) | Err(Errno::EAGAIN | Errno::EPROTOTYPE) => {
            bail!("'{shown}' is in use: a server answers on it")
        }
        Err(Errno::ECONNREFUSED | Errno::ENOENT) => {
            log::info!("removing stale socket file {shown}");
            match fs::remove_file(path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    Err(e).with_context(|| format!("failed to remove stale socket file '{shown}'"))
                }
                _ => Ok(()),
            }
        }
        Err(errno) => Err(io::Error::from(errno))
            .with_context(|| format!("failed to check whether '{shown}' is in use")),
    }
}

#[cfg(test)]
mod tests;

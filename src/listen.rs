//! Listen specs and the listening sockets sockhold holds for its children.
//!
//! This module owns parsing `--listen` specs (systemd `ListenStream=` forms and
//! URL forms, with `,option=value` suffixes) into [`ListenSpec`], binding and
//! holding the listening sockets ([`Listener`]), and removing the Unix socket
//! files it created. It must never accept, read or poll on a listener: sockhold
//! only keeps the sockets open and passes them on; only children serve them.

use std::fmt;
use std::fs;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{Context, bail};
use nix::errno::Errno;
use nix::fcntl::FcntlArg::{F_GETFL, F_SETFL};
use nix::fcntl::{OFlag, fcntl};
use nix::sys::socket::{
    self, AddressFamily, Backlog, SockFlag, SockType, SockaddrStorage, UnixAddr, sockopt,
};

/// Longest Unix socket path: `sun_path` holds 108 bytes including the NUL.
const UNIX_PATH_MAX: usize = 107;
/// Longest name systemd accepts in `LISTEN_FDNAMES`.
const FD_NAME_MAX: usize = 255;

/// The socket type a spec asks for (datagram and seqpacket come later).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SocketKind {
    Stream,
}

/// Which IP family an internet spec may bind (`tcp4://`, `tcp6://`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    Any,
    V4,
    V6,
}

/// The host part of an internet spec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Host {
    /// A bare port: `[::]` dual-stack, or `0.0.0.0` when the kernel has no IPv6.
    Any,
    Ip(IpAddr),
    /// A hostname, resolved when binding.
    Name(String),
}

/// Where a spec listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Address {
    Tcp { host: Host, port: u16, family: Family },
    Unix { path: PathBuf, kind: SocketKind },
}

/// The `,option=value` part of a spec.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ListenOptions {
    /// `name=NAME`: the socket's entry in `LISTEN_FDNAMES`.
    pub name: Option<String>,
    /// `backlog=N`: the listen queue length (default: the kernel maximum).
    pub backlog: Option<u32>,
}

type OptionParser = fn(&mut ListenOptions, Option<&str>) -> Result<(), String>;

/// Options this version understands, each with its parser.
const KNOWN_OPTIONS: &[(&str, OptionParser)] = &[("name", parse_name), ("backlog", parse_backlog)];

/// Options of the spec that later versions implement, separated by spaces.
const LATER_OPTIONS: &str =
    "v6only reuseport freebind device nodelay keepalive rcvbuf sndbuf mode owner group nonblock";

fn parse_name(options: &mut ListenOptions, value: Option<&str>) -> Result<(), String> {
    let name = value.ok_or("option 'name' needs a value: name=NAME")?;
    check_fd_name(name).map_err(|e| format!("name {e}"))?;
    options.name = Some(name.to_owned());
    Ok(())
}

fn parse_backlog(options: &mut ListenOptions, value: Option<&str>) -> Result<(), String> {
    let text = value.ok_or("option 'backlog' needs a value: backlog=N")?;
    match text.parse::<u32>() {
        Ok(n) if n > 0 && !text.starts_with('+') => options.backlog = Some(n),
        _ => return Err(format!("backlog must be a positive integer, got '{text}'")),
    }
    Ok(())
}

impl ListenOptions {
    /// Parses the comma-separated options that follow the address.
    fn parse(text: &str) -> Result<Self, String> {
        let mut options = Self::default();
        let mut seen = Vec::new();
        for item in text.split(',') {
            let (key, value) = match item.split_once('=') {
                Some((key, value)) => (key, Some(value)),
                None => (item, None),
            };
            if key.is_empty() {
                return Err(format!("empty option name in ',{item}'"));
            }
            if seen.contains(&key) {
                return Err(format!("duplicate option '{key}'"));
            }
            seen.push(key);
            match KNOWN_OPTIONS.iter().find(|(name, _)| *name == key) {
                Some((_, parse)) => parse(&mut options, value)?,
                None if LATER_OPTIONS.split(' ').any(|later| later == key) => {
                    return Err(format!("option '{key}' is not supported yet"));
                }
                None => {
                    let known: Vec<_> = KNOWN_OPTIONS.iter().map(|(name, _)| *name).collect();
                    return Err(format!("unknown option '{key}' (known: {})", known.join(", ")));
                }
            }
        }
        Ok(options)
    }
}

/// systemd's fdname rules; the error completes "name ...".
fn check_fd_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        Err("must not be empty".into())
    } else if !name.bytes().all(|b| b == b' ' || b.is_ascii_graphic()) {
        Err(format!("must be printable ASCII, got {name:?}"))
    } else if name.contains(':') {
        Err(format!("must not contain ':', got '{name}'"))
    } else if name.len() > FD_NAME_MAX {
        Err(format!("is {} characters long (at most {FD_NAME_MAX})", name.len()))
    } else {
        Ok(())
    }
}

/// Whether systemd accepts `name` in `LISTEN_FDNAMES`: 1 to 255 printable
/// ASCII characters, no ':'.
pub fn fd_name_is_valid(name: &str) -> bool {
    check_fd_name(name).is_ok()
}

/// Turns any string into a valid fd name: invalid characters become '_', the
/// result is cut to 255 characters, and an empty string becomes "unknown".
pub fn sanitize_fd_name(s: &str) -> String {
    if fd_name_is_valid(s) {
        return s.to_owned();
    }
    let mut name: String = s
        .chars()
        .map(|c| if c == ' ' || (c.is_ascii_graphic() && c != ':') { c } else { '_' })
        .take(FD_NAME_MAX)
        .collect();
    if name.is_empty() {
        name.push_str("unknown");
    }
    name
}

/// A parsed `--listen` spec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenSpec {
    /// The spec as given on the command line.
    pub text: String,
    pub address: Address,
    pub options: ListenOptions,
}

/// Why a spec is invalid: a usage error.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenSpecError {
    pub spec: String,
    pub reason: String,
}

impl fmt::Display for ListenSpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid listen spec '{}': {}", self.spec, self.reason)
    }
}

impl std::error::Error for ListenSpecError {}

impl fmt::Display for ListenSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl FromStr for ListenSpec {
    type Err = ListenSpecError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let error = |reason: String| ListenSpecError { spec: text.to_owned(), reason };
        if text.is_empty() {
            return Err(error("the spec is empty".into()));
        }
        let (address, options) = match text.split_once(',') {
            Some((address, options)) => (address, ListenOptions::parse(options).map_err(error)?),
            None => (text, ListenOptions::default()),
        };
        let address = parse_address(address).map_err(error)?;
        Ok(Self { text: text.to_owned(), address, options })
    }
}

fn parse_address(s: &str) -> Result<Address, String> {
    if s.starts_with('/') || s.starts_with('@') {
        return parse_unix_path(s);
    }
    if let Some((scheme, rest)) = s.split_once("://") {
        return match scheme {
            "tcp" => parse_host_port(rest, Family::Any),
            "tcp4" => parse_host_port(rest, Family::V4),
            "tcp6" => parse_host_port(rest, Family::V6),
            "unix" if rest.is_empty() => Err("missing path".into()),
            "unix" => parse_unix_path(rest),
            "udp" | "udp4" | "udp6" | "unixgram" | "unixpacket" => {
                Err(format!("'{scheme}' sockets are not supported yet"))
            }
            "fd" | "systemd" => Err(format!("'{scheme}://' specs are not supported yet")),
            _ => Err(format!("unknown scheme '{scheme}' (known: tcp, tcp4, tcp6, unix)")),
        };
    }
    if s.is_empty() {
        Err("missing address".into())
    } else if s.bytes().all(|b| b.is_ascii_digit()) {
        Ok(Address::Tcp { host: Host::Any, port: parse_port(s)?, family: Family::Any })
    } else if s.contains('/') {
        Err("a Unix socket path must be absolute".into())
    } else {
        parse_host_port(s, Family::Any)
    }
}

fn parse_unix_path(path: &str) -> Result<Address, String> {
    if path.starts_with('@') {
        Err("abstract Unix sockets ('@name') are not supported yet".into())
    } else if !path.starts_with('/') {
        Err("a Unix socket path must be absolute".into())
    } else if path.len() > UNIX_PATH_MAX {
        let len = path.len();
        Err(format!("the path is {len} bytes long, more than sun_path holds ({UNIX_PATH_MAX})"))
    } else {
        Ok(Address::Unix { path: path.into(), kind: SocketKind::Stream })
    }
}

/// Parses `HOST:PORT` or `[IPV6]:PORT`.
fn parse_host_port(s: &str, family: Family) -> Result<Address, String> {
    if s.is_empty() {
        return Err("missing host and port".into());
    }
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (inside, after) = rest.split_once(']').ok_or("unterminated '[' in IPv6 address")?;
        if inside.contains('%') {
            return Err("scoped IPv6 addresses ('[addr%dev]') are not supported yet".into());
        }
        let ip: Ipv6Addr =
            inside.parse().map_err(|_| format!("invalid IPv6 address '{inside}'"))?;
        let port = match after.strip_prefix(':') {
            Some(port) => port,
            None if after.is_empty() => return Err("missing port".into()),
            None => return Err(format!("expected ':PORT' after ']', got '{after}'")),
        };
        (Host::Ip(ip.into()), port)
    } else {
        let (host, port) = s.rsplit_once(':').ok_or("missing port")?;
        if host.contains(':') {
            return Err("an IPv6 address must be in brackets, e.g. [::1]:8080".into());
        }
        let valid_name = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_');
        let host = match host.parse() {
            Ok(ip) => Host::Ip(ip),
            Err(_) if host.is_empty() => return Err("missing host".into()),
            Err(_) if host.chars().all(valid_name) => Host::Name(host.to_owned()),
            Err(_) => return Err(format!("invalid host '{host}'")),
        };
        (host, port)
    };
    let port = parse_port(port)?;
    match (family, &host) {
        (Family::V4, Host::Ip(ip @ IpAddr::V6(_))) => {
            Err(format!("tcp4 needs an IPv4 address, got {ip}"))
        }
        (Family::V6, Host::Ip(ip @ IpAddr::V4(_))) => {
            Err(format!("tcp6 needs an IPv6 address, got {ip}"))
        }
        _ => Ok(Address::Tcp { host, port, family }),
    }
}

fn parse_port(s: &str) -> Result<u16, String> {
    if s.is_empty() {
        Err("missing port".into())
    } else if !s.bytes().all(|b| b.is_ascii_digit()) {
        Err(format!("invalid port '{s}'"))
    } else {
        s.parse().map_err(|_| format!("port {s} is out of range (0-65535)"))
    }
}

/// A bound, listening socket that sockhold holds for its whole life.
#[derive(Debug)]
pub struct Listener {
    fd: OwnedFd,
    spec: ListenSpec,
    name: String,
    local: String,
    /// The socket file this listener created, with its (dev, ino).
    unix_file: Option<(PathBuf, u64, u64)>,
}

/// A bound socket, what it is bound to, and the socket file it created.
type Bound = (OwnedFd, String, Option<(PathBuf, u64, u64)>);

impl Listener {
    /// Binds the socket (CLOEXEC inside sockhold, `SO_REUSEADDR` for TCP) and
    /// listens with the spec's backlog, or the kernel maximum (`somaxconn`)
    /// when unset or above `SOMAXCONN`. `default_name` is used for
    /// `LISTEN_FDNAMES` when the spec has no `name=`.
    pub fn bind(spec: &ListenSpec, default_name: &str) -> anyhow::Result<Listener> {
        let (fd, local, unix_file) = match &spec.address {
            Address::Tcp { host, port, family } => bind_tcp(host, *port, *family)?,
            Address::Unix { path, kind } => bind_unix(path, *kind)?,
        };
        let name = (spec.options.name.clone()).unwrap_or_else(|| sanitize_fd_name(default_name));
        let spec = spec.clone();
        let listener = Listener { fd, spec, name, local, unix_file };
        let backlog = (listener.spec.options.backlog)
            .and_then(|n| Backlog::new(i32::try_from(n).ok()?).ok())
            .unwrap_or(Backlog::MAXALLOWABLE);
        if let Err(errno) = socket::listen(&listener.fd, backlog) {
            listener.remove_socket_file();
            return Err(io::Error::from(errno))
                .with_context(|| format!("failed to listen on {}", listener.local));
        }
        Ok(listener)
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// The socket's name for `LISTEN_FDNAMES`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// What was actually bound, for logs: "127.0.0.1:41234" (the real port
    /// after port 0), "[::]:8080", "/run/app.sock".
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

/// Converts nix's errors to std's, whose message anyhow shows as
/// "Permission denied (os error 13)".
fn os<T>(result: nix::Result<T>) -> io::Result<T> {
    result.map_err(io::Error::from)
}

fn new_socket(family: AddressFamily, kind: SocketKind, flags: SockFlag) -> nix::Result<OwnedFd> {
    let ty = match kind {
        SocketKind::Stream => SockType::Stream,
    };
    socket::socket(family, ty, flags | SockFlag::SOCK_CLOEXEC, None)
}

/// Creates and binds a TCP socket. A bare port binds `[::]` dual-stack, or
/// `0.0.0.0` when the kernel has no IPv6.
fn bind_tcp(host: &Host, port: u16, family: Family) -> anyhow::Result<Bound> {
    let addr = match host {
        Host::Any => SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)),
        Host::Ip(ip) => SocketAddr::new(*ip, port),
        Host::Name(name) => resolve(name, port, family)?,
    };
    let create = |addr: &SocketAddr| {
        let family = if addr.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
        new_socket(family, SocketKind::Stream, SockFlag::empty())
    };
    let (fd, addr) = match create(&addr) {
        Err(Errno::EAFNOSUPPORT) if *host == Host::Any => {
            let any4 = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
            (create(&any4), any4)
        }
        fd => (fd, addr),
    };
    let fd = os(fd).with_context(|| format!("failed to create a socket for {addr}"))?;
    if *host == Host::Any && addr.is_ipv6() {
        os(socket::setsockopt(&fd, sockopt::Ipv6V6Only, &false))
            .with_context(|| format!("failed to clear IPV6_V6ONLY on {addr}"))?;
    }
    os(socket::setsockopt(&fd, sockopt::ReuseAddr, &true))
        .with_context(|| format!("failed to set SO_REUSEADDR on {addr}"))?;
    os(socket::bind(fd.as_raw_fd(), &SockaddrStorage::from(addr)))
        .with_context(|| format!("failed to bind {addr}"))?;
    let local = socket::getsockname::<SockaddrStorage>(fd.as_raw_fd());
    let local = local.map_or_else(|_| addr.to_string(), |local| local.to_string());
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

/// Creates and binds a Unix socket at `path`, first removing a stale socket
/// file, and records the (dev, ino) of the file it creates.
fn bind_unix(path: &Path, kind: SocketKind) -> anyhow::Result<Bound> {
    let shown = path.display();
    remove_stale_socket(path)?;
    let fd = os(new_socket(AddressFamily::Unix, kind, SockFlag::empty()))
        .context("failed to create a Unix socket")?;
    let addr = os(UnixAddr::new(path)).with_context(|| format!("bad path {shown}"))?;
    if let Err(errno) = socket::bind(fd.as_raw_fd(), &addr) {
        let context = match path.parent() {
            Some(dir) if errno == Errno::ENOENT && !dir.is_dir() => {
                format!("failed to bind {shown}: directory '{}' does not exist", dir.display())
            }
            _ => format!("failed to bind {shown}"),
        };
        return Err(io::Error::from(errno)).context(context);
    }
    let meta = fs::symlink_metadata(path).with_context(|| format!("failed to stat {shown}"))?;
    Ok((fd, shown.to_string(), Some((path.to_owned(), meta.dev(), meta.ino()))))
}

/// Refuses a path that is not a socket or that a server answers on, and
/// removes a socket file nobody listens on any more.
fn remove_stale_socket(path: &Path) -> anyhow::Result<()> {
    let shown = path.display();
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("failed to stat '{shown}'")),
        Ok(meta) if !meta.file_type().is_socket() => bail!("'{shown}' exists and is not a socket"),
        Ok(_) => {}
    }
    // Non-blocking, so that a live server with a full backlog (EAGAIN) cannot hang us.
    let probe = new_socket(AddressFamily::Unix, SocketKind::Stream, SockFlag::SOCK_NONBLOCK);
    let probe = os(probe).context("failed to create a Unix socket")?;
    let addr = os(UnixAddr::new(path)).with_context(|| format!("bad path {shown}"))?;
    match socket::connect(probe.as_raw_fd(), &addr) {
        Ok(()) | Err(Errno::EAGAIN) => bail!("'{shown}' is in use: a server answers on it"),
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
mod tests {
    use super::*;
    use nix::fcntl::FdFlag;
    use std::os::unix::net::UnixListener;

    fn parse(text: &str) -> ListenSpec {
        text.parse().unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    fn tcp(host: &str, port: u16, family: Family) -> Address {
        let host = match host {
            "*" => Host::Any,
            _ => host.parse().map_or_else(|_| Host::Name(host.into()), Host::Ip),
        };
        Address::Tcp { host, port, family }
    }

    fn unix(path: &str) -> Address {
        Address::Unix { path: path.into(), kind: SocketKind::Stream }
    }

    #[test]
    fn accepted_forms() {
        use Family::{Any, V4, V6};
        let long_path = format!("/{}", "a".repeat(UNIX_PATH_MAX - 1));
        let cases = [
            ("8080", tcp("*", 8080, Any)),
            ("0", tcp("*", 0, Any)),
            ("127.0.0.1:8080", tcp("127.0.0.1", 8080, Any)),
            ("0.0.0.0:65535", tcp("0.0.0.0", 65535, Any)),
            ("[::1]:8080", tcp("::1", 8080, Any)),
            ("[::]:80", tcp("::", 80, Any)),
            ("localhost:80", tcp("localhost", 80, Any)),
            ("tcp://127.0.0.1:1", tcp("127.0.0.1", 1, Any)),
            ("tcp://[::1]:1", tcp("::1", 1, Any)),
            ("tcp://example.com:443", tcp("example.com", 443, Any)),
            ("tcp4://0.0.0.0:0", tcp("0.0.0.0", 0, V4)),
            ("tcp4://localhost:80", tcp("localhost", 80, V4)),
            ("tcp6://[::]:8080", tcp("::", 8080, V6)),
            ("tcp6://my-host.example:0", tcp("my-host.example", 0, V6)),
            ("/run/app.sock", unix("/run/app.sock")),
            ("unix:///run/app.sock", unix("/run/app.sock")),
            (&long_path, unix(&long_path)),
        ];
        for (text, address) in cases {
            let spec = parse(text);
            assert_eq!(spec.address, address, "{text}");
            assert_eq!(spec.options, ListenOptions::default(), "{text}");
            assert_eq!(spec.to_string(), text);
        }
    }

    #[test]
    fn accepted_options() {
        let long_name = "n".repeat(FD_NAME_MAX);
        let cases = [
            ("8080,name=web", Some("web"), None),
            ("/run/a.sock,backlog=16", None, Some(16)),
            ("0,backlog=4294967295,name=a b", Some("a b"), Some(u32::MAX)),
            (&format!("8080,name={long_name}"), Some(&long_name), None),
        ];
        for (text, name, backlog) in cases {
            let options = parse(text).options;
            assert_eq!(options.name.as_deref(), name, "{text}");
            assert_eq!(options.backlog, backlog, "{text}");
        }
    }

    #[test]
    fn rejected_specs() {
        let long_path = format!("unix:///{}", "a".repeat(UNIX_PATH_MAX));
        let long_name = format!("8080,name={}", "n".repeat(FD_NAME_MAX + 1));
        let cases = [
            ("", "the spec is empty"),
            (",name=x", "missing address"),
            ("127.0.0.1:99999", "port 99999 is out of range (0-65535)"),
            ("99999999999999999999", "is out of range"),
            ("tcp://", "missing host and port"),
            ("tcp://:80", "missing host"),
            ("127.0.0.1", "missing port"),
            ("127.0.0.1:", "missing port"),
            ("localhost:http", "invalid port 'http'"),
            ("[::1", "unterminated '['"),
            ("[::1]", "missing port"),
            ("[::1]x80", "expected ':PORT' after ']'"),
            ("[nope]:80", "invalid IPv6 address 'nope'"),
            ("::1:80", "must be in brackets"),
            ("bad host:80", "invalid host 'bad host'"),
            ("tcp4://[::1]:80", "tcp4 needs an IPv4 address, got ::1"),
            ("tcp6://127.0.0.1:80", "tcp6 needs an IPv6 address"),
            ("unix://relative", "a Unix socket path must be absolute"),
            ("run/app.sock", "a Unix socket path must be absolute"),
            ("unix://", "missing path"),
            (&long_path, "108 bytes long, more than sun_path holds (107)"),
            ("x,backlog=abc", "positive integer, got 'abc'"),
            ("8080,backlog=0", "must be a positive integer, got '0'"),
            ("8080,backlog=-1", "backlog must be a positive integer"),
            ("8080,backlog", "option 'backlog' needs a value"),
            ("8080,name=a,name=b", "duplicate option 'name'"),
            ("8080,name=", "name must not be empty"),
            ("8080,name=a:b", "name must not contain ':'"),
            ("8080,name=caf\u{e9}", "name must be printable ASCII"),
            ("8080,name=a\tb", "name must be printable ASCII"),
            (&long_name, "name is 256 characters long"),
            ("8080,", "empty option name"),
            ("8080,=x", "empty option name"),
            ("8080,reuseport", "option 'reuseport' is not supported yet"),
            ("8080,mode=0600", "option 'mode' is not supported yet"),
            ("8080,foo", "unknown option 'foo' (known: name, backlog)"),
            ("udp://0.0.0.0:53", "'udp' sockets are not supported yet"),
            ("udp6://[::]:53", "'udp6' sockets are not supported yet"),
            ("unixgram:///a", "'unixgram' sockets are not supported yet"),
            ("unixpacket:///a", "'unixpacket' sockets are not supported"),
            ("@name", "abstract Unix sockets ('@name') are not"),
            ("unix://@name", "abstract Unix sockets"),
            ("fd://3", "'fd://' specs are not supported yet"),
            ("systemd://web", "'systemd://' specs are not supported yet"),
            ("[fe80::1%eth0]:80", "scoped IPv6 addresses"),
            ("http://x:80", "unknown scheme 'http'"),
        ];
        for (text, expected) in cases {
            let error = text.parse::<ListenSpec>().expect_err(text).to_string();
            let prefix = format!("invalid listen spec '{text}': ");
            assert!(error.starts_with(&prefix), "{text}: {error}");
            assert!(error.contains(expected), "{text}: {error}");
        }
    }

    #[test]
    fn fd_names() {
        assert!(fd_name_is_valid("web") && fd_name_is_valid("a b~"));
        assert!(!fd_name_is_valid("") && !fd_name_is_valid("a:b") && !fd_name_is_valid("\u{e9}"));
        assert!(!fd_name_is_valid(&"x".repeat(256)));
        assert_eq!(sanitize_fd_name("my:app\n\u{e9}"), "my_app__");
        assert_eq!(sanitize_fd_name(""), "unknown");
        assert_eq!(sanitize_fd_name(&"x".repeat(300)), "x".repeat(255));
    }

    fn bind(text: &str) -> anyhow::Result<Listener> {
        Listener::bind(&parse(text), "app")
    }

    fn is_cloexec(listener: &Listener) -> bool {
        let bits = fcntl(listener.fd(), nix::fcntl::FcntlArg::F_GETFD).unwrap();
        FdFlag::from_bits_retain(bits).contains(FdFlag::FD_CLOEXEC)
    }

    fn is_nonblocking(listener: &Listener) -> bool {
        let bits = fcntl(listener.fd(), F_GETFL).unwrap();
        OFlag::from_bits_retain(bits).contains(OFlag::O_NONBLOCK)
    }

    #[test]
    fn tcp_port_zero_gets_a_real_port() {
        let listener = bind("127.0.0.1:0,backlog=8").unwrap();
        let port = listener.local_description().strip_prefix("127.0.0.1:").unwrap();
        assert_ne!(port.parse::<u16>().unwrap(), 0);
        assert_eq!(listener.name(), "app");
        assert_eq!(listener.spec.text, "127.0.0.1:0,backlog=8");
        assert!(is_cloexec(&listener));
        // It listens: the connection waits in the backlog, nobody accepts.
        std::net::TcpStream::connect(listener.local_description()).unwrap();
        assert!(!is_nonblocking(&listener));
        listener.set_nonblocking(true).unwrap();
        assert!(is_nonblocking(&listener));
        listener.set_nonblocking(false).unwrap();
        assert!(!is_nonblocking(&listener));
        listener.remove_socket_file(); // no-op for TCP
    }

    #[test]
    fn huge_backlog_means_the_kernel_maximum() {
        bind("127.0.0.1:0,backlog=4000000000,name=big").unwrap();
    }

    #[test]
    fn ipv6_loopback() {
        match bind("[::1]:0") {
            Ok(listener) => assert!(listener.local_description().starts_with("[::1]:")),
            Err(e) => {
                let errno =
                    e.root_cause().downcast_ref::<io::Error>().and_then(|e| e.raw_os_error());
                let unavailable = [Errno::EAFNOSUPPORT, Errno::EADDRNOTAVAIL].map(|e| e as i32);
                assert!(unavailable.contains(&errno.unwrap_or(0)), "{e:#}");
                eprintln!("skipping: no IPv6 loopback: {e:#}");
            }
        }
    }

    #[test]
    fn bare_port_is_dual_stack() {
        let listener = bind("0,name=web").unwrap();
        assert_eq!(listener.name(), "web");
        let local: SockaddrStorage = socket::getsockname(listener.fd().as_raw_fd()).unwrap();
        if local.as_sockaddr_in6().is_some() {
            assert!(listener.local_description().starts_with("[::]:"));
            assert!(!socket::getsockopt(&listener.fd(), sockopt::Ipv6V6Only).unwrap());
        } else {
            assert!(listener.local_description().starts_with("0.0.0.0:"));
        }
    }

    #[test]
    fn tcp_bind_error_names_the_address() {
        let first = bind("127.0.0.1:0").unwrap();
        // SO_REUSEADDR does not allow two listeners on one port.
        let error = bind(first.local_description()).unwrap_err();
        let expected = format!("failed to bind {}: ", first.local_description());
        assert!(format!("{error:#}").starts_with(&expected), "{error:#}");
    }

    #[test]
    fn unix_socket_lifecycle() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app.sock");
        let text = format!("unix://{},name=web", path.display());
        let listener = bind(&text).unwrap();
        assert_eq!(listener.local_description(), path.display().to_string());
        assert_eq!(listener.name(), "web");
        assert!(is_cloexec(&listener));
        assert!(fs::symlink_metadata(&path).unwrap().file_type().is_socket());
        std::os::unix::net::UnixStream::connect(&path).unwrap();

        let error = bind(&text).unwrap_err();
        let expected = format!("'{}' is in use: a server answers on it", path.display());
        assert_eq!(format!("{error:#}"), expected);

        listener.remove_socket_file();
        assert!(!path.exists());
        listener.remove_socket_file(); // idempotent
    }

    #[test]
    fn stale_socket_file_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stale.sock");
        drop(UnixListener::bind(&path).unwrap()); // leaves the file behind
        let listener = bind(path.to_str().unwrap()).unwrap();
        std::os::unix::net::UnixStream::connect(&path).unwrap();
        listener.remove_socket_file();
        assert!(!path.exists());
    }

    #[test]
    fn non_socket_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("file");
        fs::write(&path, "data").unwrap();
        let error = bind(path.to_str().unwrap()).unwrap_err();
        assert_eq!(
            format!("{error:#}"),
            format!("'{}' exists and is not a socket", path.display())
        );
        assert_eq!(fs::read_to_string(&path).unwrap(), "data");
    }

    #[test]
    fn missing_directory_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing");
        let error = bind(missing.join("a.sock").to_str().unwrap()).unwrap_err();
        let expected = format!("directory '{}' does not exist", missing.display());
        assert!(format!("{error:#}").contains(&expected), "{error:#}");
    }

    #[test]
    fn replaced_socket_file_is_not_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app.sock");
        let listener = bind(path.to_str().unwrap()).unwrap();
        fs::remove_file(&path).unwrap();
        fs::write(&path, "someone else's").unwrap();
        listener.remove_socket_file();
        assert_eq!(fs::read_to_string(&path).unwrap(), "someone else's");
    }
}

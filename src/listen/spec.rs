//! The `--listen` spec grammar: parsing a spec into [`ListenSpec`] and checking it.
//!
//! This module owns the systemd forms of `ListenStream=` (a bare port, `ADDR:PORT`,
//! `[ADDR]:PORT`, `[ADDR]:PORT%IF`, `/path`, `@abstract`), the URL forms (`tcp://`, `udp://`,
//! `unix://`, `unixgram://`, `unixpacket://`, with `4`/`6` variants for IP, `fd://`,
//! `systemd://`), the comma-separated options after the address, each checked against the kind
//! of socket it is given to, and systemd's rules for fd names. It is pure: it must not create,
//! bind or inspect a socket, nor make any other syscall; the sockets are [`super::Listener`]'s.
//! The one lookup outside the process is `owner=`/`group=`, whose names resolve through the
//! user and group database as `--user` does ([`crate::child_env`]).

use std::fmt;
use std::net::{IpAddr, Ipv6Addr};
use std::os::fd::RawFd;
use std::path::PathBuf;
use std::str::FromStr;

use nix::unistd::{Gid, Uid};

/// Longest Unix socket path: `sun_path` holds 108 bytes including the NUL.
const UNIX_PATH_MAX: usize = 107;
/// Longest abstract socket name: `sun_path` less its leading NUL.
const ABSTRACT_NAME_MAX: usize = 107;
/// Longest name systemd accepts in `LISTEN_FDNAMES`.
const FD_NAME_MAX: usize = 255;
/// Longest network interface name (`IFNAMSIZ` less the NUL).
const IFNAME_MAX: usize = 15;
/// Largest `rcvbuf=`/`sndbuf=`: setsockopt takes an int.
const BUFFER_MAX: u64 = i32::MAX as u64;

/// The socket type a spec asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SocketKind {
    /// TCP, Unix stream (`ListenStream=`).
    Stream,
    /// UDP, Unix datagram (`ListenDatagram=`): bound, never `listen()`ed.
    Datagram,
    /// Unix seqpacket (`ListenSequentialPacket=`).
    SeqPacket,
}

/// Which IP family an internet spec may bind (`tcp4://`, `udp6://`).
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

/// The interface scope of a link-local IPv6 address: `[fe80::1%eth0]` or `[fe80::1%2]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    /// An interface index, used as it is (as systemd does).
    Index(u32),
    /// An interface name, turned into its index when binding.
    Name(String),
}

/// Where a Unix socket lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UnixName {
    /// A file in the file system, created at bind and removed at exit.
    Path(PathBuf),
    /// A name in the abstract namespace (`@name`, Linux): no file, gone with the last holder.
    Abstract(String),
}

/// An inherited socket to adopt instead of binding one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Adopt {
    /// `fd://N`: the fd sockhold inherited at that number.
    Fd(RawFd),
    /// `systemd://NAME`: the socket of that name in sockhold's own `LISTEN_FDS`/`LISTEN_FDNAMES`.
    Systemd(String),
}

/// The options that can still be applied to a socket that is already bound (adopted); the
/// others (`reuseport`, `v6only`, `device`, `mode`, ...) only mean something before or at bind.
const ADOPTABLE_OPTIONS: &[&str] =
    &["name", "backlog", "nodelay", "keepalive", "rcvbuf", "sndbuf", "nonblock"];

/// Where a spec listens. An adopted socket's kind is known only once it is adopted; the options
/// given for it are checked against the real socket then.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Address {
    /// A socket sockhold inherited.
    Adopted(Adopt),
    /// TCP (`Stream`) or UDP (`Datagram`).
    Inet {
        kind: SocketKind,
        host: Host,
        port: u16,
        family: Family,
        scope: Option<Scope>,
    },
    Unix {
        name: UnixName,
        kind: SocketKind,
    },
}

impl Address {
    /// The socket type.
    pub fn kind(&self) -> SocketKind {
        match self {
            Address::Inet { kind, .. } | Address::Unix { kind, .. } => *kind,
            // Unknown until adopted; the adopted listener carries the real one.
            Address::Adopted(_) => SocketKind::Stream,
        }
    }

    fn is_inet(&self) -> bool {
        matches!(self, Address::Inet { .. })
    }

    fn is_udp(&self) -> bool {
        matches!(self, Address::Inet { kind: SocketKind::Datagram, .. })
    }

    fn is_tcp(&self) -> bool {
        matches!(self, Address::Inet { kind: SocketKind::Stream, .. })
    }

    /// Known to be IPv4 before binding: an IPv4 address, or `tcp4://`/`udp4://`.
    fn is_ipv4(&self) -> bool {
        match self {
            Address::Inet { host: Host::Ip(ip), .. } => ip.is_ipv4(),
            Address::Inet { family, .. } => *family == Family::V4,
            Address::Unix { .. } | Address::Adopted(_) => false,
        }
    }

    /// A Unix socket with a file (not abstract).
    fn has_file(&self) -> bool {
        matches!(self, Address::Unix { name: UnixName::Path(_), .. })
    }

    /// What kind of socket this is, for messages: "TCP", "IPv4 UDP", "abstract Unix datagram".
    fn kind_name(&self) -> String {
        match self {
            Address::Inet { kind, .. } => {
                let ipv6 = matches!(
                    self,
                    Address::Inet { host: Host::Ip(IpAddr::V6(_)), .. }
                        | Address::Inet { family: Family::V6, .. }
                );
                let family = match () {
                    _ if self.is_ipv4() => "IPv4 ",
                    _ if ipv6 => "IPv6 ",
                    _ => "",
                };
                let transport = if *kind == SocketKind::Datagram { "UDP" } else { "TCP" };
                format!("{family}{transport}")
            }
            Address::Unix { name, kind } => {
                let prefix = if matches!(name, UnixName::Abstract(_)) { "abstract " } else { "" };
                let kind = match kind {
                    SocketKind::Stream => "stream",
                    SocketKind::Datagram => "datagram",
                    SocketKind::SeqPacket => "seqpacket",
                };
                format!("{prefix}Unix {kind}")
            }
            Address::Adopted(_) => "adopted".into(),
        }
    }
}

/// The `,option=value` part of a spec.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ListenOptions {
    /// `name=NAME`: the socket's entry in `LISTEN_FDNAMES`.
    pub name: Option<String>,
    /// `backlog=N`: the listen queue length (default: the kernel maximum).
    pub backlog: Option<u32>,
    /// `v6only=BOOL`: `IPV6_V6ONLY`; unset leaves the kernel's default, except for a bare port,
    /// which is dual-stack.
    pub v6only: Option<bool>,
    /// `reuseport`: `SO_REUSEPORT`, which lets other sockets of the same uid bind the port.
    pub reuseport: bool,
    /// `freebind`: `IP_FREEBIND`/`IPV6_FREEBIND`, to bind an address the host does not have (yet).
    pub freebind: bool,
    /// `device=IF`: `SO_BINDTODEVICE`.
    pub device: Option<String>,
    /// `nodelay`: `TCP_NODELAY`, inherited by accepted connections.
    pub nodelay: bool,
    /// `keepalive`: `SO_KEEPALIVE`, inherited by accepted connections.
    pub keepalive: bool,
    /// `rcvbuf=SIZE`: `SO_RCVBUF` in bytes (the kernel reports twice as much).
    pub rcvbuf: Option<usize>,
    /// `sndbuf=SIZE`: `SO_SNDBUF` in bytes (the kernel reports twice as much).
    pub sndbuf: Option<usize>,
    /// `mode=OCTAL`: the Unix socket file's permissions.
    pub mode: Option<u32>,
    /// `dirmode=OCTAL`: the permissions of the directories created for the socket file
    /// (default 0755; systemd's `DirectoryMode=`).
    pub dirmode: Option<u32>,
    /// `owner=USER`: the Unix socket file's owner, resolved when parsing.
    pub owner: Option<Uid>,
    /// `group=GROUP`: the Unix socket file's group, resolved when parsing.
    pub group: Option<Gid>,
    /// `nonblock`: children get the socket with `O_NONBLOCK` set.
    pub nonblock: bool,
    /// `steer=flow`: each unit gets its own socket in a reuseport group that sockhold steers
    /// by flow (UDP only; see [`crate::steer`]).
    pub steer_flow: bool,
}

type OptionParser = fn(&mut ListenOptions, Option<&str>) -> Result<(), String>;

/// One option: how its value is parsed, and which sockets it applies to.
struct OptionDef {
    name: &'static str,
    parse: OptionParser,
    /// Whether the option makes sense for the socket of this address. A socket adopted rather
    /// than bound can only be checked once its kind is known.
    applies: fn(&Address) -> bool,
    /// The sockets it applies to, for the error message when it does not.
    applies_to: &'static str,
}

/// Every option, in the order `--help` and the README list them.
const OPTIONS: &[OptionDef] = &[
    OptionDef {
        name: "name",
        parse: |o, v| {
            o.name = Some(parse_name(v)?);
            Ok(())
        },
        applies: |_| true,
        applies_to: "every socket",
    },
    OptionDef {
        name: "backlog",
        parse: |o, v| {
            o.backlog = Some(parse_backlog(v)?);
            Ok(())
        },
        applies: |a| a.kind() != SocketKind::Datagram,
        applies_to: "TCP, Unix stream and Unix seqpacket sockets",
    },
    OptionDef {
        name: "v6only",
        parse: |o, v| {
            o.v6only = Some(parse_bool("v6only", v)?);
            Ok(())
        },
        applies: |a| a.is_inet() && !a.is_ipv4(),
        applies_to: "IPv6 sockets",
    },
    OptionDef {
        name: "reuseport",
        parse: |o, v| {
            o.reuseport = parse_bool("reuseport", v)?;
            Ok(())
        },
        applies: Address::is_inet,
        applies_to: "TCP and UDP sockets",
    },
    OptionDef {
        name: "freebind",
        parse: |o, v| {
            o.freebind = parse_bool("freebind", v)?;
            Ok(())
        },
        applies: Address::is_inet,
        applies_to: "TCP and UDP sockets",
    },
    OptionDef {
        name: "device",
        parse: |o, v| {
            o.device = Some(parse_device(v)?);
            Ok(())
        },
        applies: Address::is_inet,
        applies_to: "TCP and UDP sockets",
    },
    OptionDef {
        name: "nodelay",
        parse: |o, v| {
            o.nodelay = parse_bool("nodelay", v)?;
            Ok(())
        },
        applies: Address::is_tcp,
        applies_to: "TCP sockets",
    },
    OptionDef {
        name: "keepalive",
        parse: |o, v| {
            o.keepalive = parse_bool("keepalive", v)?;
            Ok(())
        },
        applies: Address::is_tcp,
        applies_to: "TCP sockets",
    },
    OptionDef {
        name: "rcvbuf",
        parse: |o, v| {
            o.rcvbuf = Some(parse_size("rcvbuf", v)?);
            Ok(())
        },
        applies: |_| true,
        applies_to: "every socket",
    },
    OptionDef {
        name: "sndbuf",
        parse: |o, v| {
            o.sndbuf = Some(parse_size("sndbuf", v)?);
            Ok(())
        },
        applies: |_| true,
        applies_to: "every socket",
    },
    OptionDef {
        name: "mode",
        parse: |o, v| {
            o.mode = Some(parse_mode("mode", v)?);
            Ok(())
        },
        applies: Address::has_file,
        applies_to: "Unix sockets with a path; an abstract socket has no file",
    },
    OptionDef {
        name: "dirmode",
        parse: |o, v| {
            o.dirmode = Some(parse_mode("dirmode", v)?);
            Ok(())
        },
        applies: Address::has_file,
        applies_to: "Unix sockets with a path; an abstract socket has no file",
    },
    OptionDef {
        name: "owner",
        parse: |o, v| {
            o.owner = Some(parse_owner(v)?);
            Ok(())
        },
        applies: Address::has_file,
        applies_to: "Unix sockets with a path; an abstract socket has no file",
    },
    OptionDef {
        name: "group",
        parse: |o, v| {
            o.group = Some(parse_group(v)?);
            Ok(())
        },
        applies: Address::has_file,
        applies_to: "Unix sockets with a path; an abstract socket has no file",
    },
    OptionDef {
        name: "nonblock",
        parse: |o, v| {
            o.nonblock = parse_bool("nonblock", v)?;
            Ok(())
        },
        applies: |_| true,
        applies_to: "every socket",
    },
    OptionDef {
        name: "steer",
        parse: |o, v| {
            o.steer_flow = parse_steer(v)?;
            Ok(())
        },
        applies: Address::is_udp,
        applies_to: "UDP sockets",
    },
];

/// The value of an option that needs one; `form` shows how it is written.
fn value_of<'a>(value: Option<&'a str>, key: &str, form: &str) -> Result<&'a str, String> {
    value.ok_or_else(|| format!("option '{key}' needs a value: {key}={form}"))
}

fn parse_name(value: Option<&str>) -> Result<String, String> {
    let name = value_of(value, "name", "NAME")?;
    check_fd_name(name).map_err(|e| format!("name {e}"))?;
    Ok(name.to_owned())
}

fn parse_backlog(value: Option<&str>) -> Result<u32, String> {
    let text = value_of(value, "backlog", "N")?;
    match text.parse::<u32>() {
        Ok(n) if n > 0 && !text.starts_with('+') => Ok(n),
        _ => Err(format!("backlog must be a positive integer, got '{text}'")),
    }
}

/// systemd's booleans; a flag without a value means yes.
fn parse_bool(key: &str, value: Option<&str>) -> Result<bool, String> {
    let Some(text) = value else { return Ok(true) };
    match text.to_ascii_lowercase().as_str() {
        "1" | "yes" | "y" | "true" | "t" | "on" => Ok(true),
        "0" | "no" | "n" | "false" | "f" | "off" => Ok(false),
        _ => {
            Err(format!("{key} must be a boolean (yes/no, true/false, on/off, 1/0), got '{text}'"))
        }
    }
}

/// `steer=flow`, the one steering there is.
fn parse_steer(value: Option<&str>) -> Result<bool, String> {
    match value_of(value, "steer", "flow")? {
        "flow" => Ok(true),
        other => Err(format!("steer must be 'flow', got '{other}'")),
    }
}

fn parse_device(value: Option<&str>) -> Result<String, String> {
    let name = value_of(value, "device", "IF")?;
    check_ifname(name)?;
    Ok(name.to_owned())
}

/// A size in bytes, with an optional K, M or G suffix (powers of 1024, as systemd's
/// `ReceiveBuffer=`).
fn parse_size(key: &str, value: Option<&str>) -> Result<usize, String> {
    let text = value_of(value, key, "SIZE")?;
    let (digits, unit) = match text.char_indices().last() {
        Some((i, 'K')) => (&text[..i], 1 << 10),
        Some((i, 'M')) => (&text[..i], 1 << 20),
        Some((i, 'G')) => (&text[..i], 1 << 30),
        _ => (text, 1),
    };
    let bad = || format!("{key} must be a positive size in bytes (65536, 64K, 4M), got '{text}'");
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    match digits.parse::<u64>().ok().and_then(|n| n.checked_mul(unit)) {
        Some(0) => Err(bad()),
        Some(n) if n <= BUFFER_MAX => Ok(n as usize),
        _ => Err(format!("{key} is too large: at most {BUFFER_MAX} bytes, got '{text}'")),
    }
}

fn parse_mode(key: &str, value: Option<&str>) -> Result<u32, String> {
    let text = value_of(value, key, "OCTAL")?;
    let digits_ok = !text.is_empty() && text.len() <= 5 && text.bytes().all(|b| b.is_ascii_digit());
    match u32::from_str_radix(text, 8) {
        Ok(mode) if digits_ok && mode <= 0o7777 => Ok(mode),
        _ => Err(format!("{key} must be an octal number from 0 to 7777, got '{text}'")),
    }
}

/// A user name or a numeric uid, as systemd's `SocketUser=`.
fn parse_owner(value: Option<&str>) -> Result<Uid, String> {
    crate::child_env::resolve_uid(value_of(value, "owner", "USER")?)
}

/// A group name or a numeric gid, as systemd's `SocketGroup=`.
fn parse_group(value: Option<&str>) -> Result<Gid, String> {
    crate::child_env::resolve_group(value_of(value, "group", "GROUP")?)
}

/// The kernel's rules for an interface name, as systemd checks them.
fn check_ifname(name: &str) -> Result<(), String> {
    let valid_char = |b: u8| b.is_ascii_graphic() && !matches!(b, b':' | b'/' | b'%');
    if name.is_empty() {
        Err("missing interface name".into())
    } else if name.len() > IFNAME_MAX
        || name == "."
        || name == ".."
        || !name.bytes().all(valid_char)
    {
        Err(format!(
            "invalid interface name '{name}': at most {IFNAME_MAX} printable characters, no ':', '/' or '%'"
        ))
    } else {
        Ok(())
    }
}

impl ListenOptions {
    /// Parses the comma-separated options that follow the address; returns them with the
    /// option names in the order given.
    pub(super) fn parse(text: &str) -> Result<(Self, Vec<&'static str>), String> {
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
            let Some(def) = OPTIONS.iter().find(|def| def.name == key) else {
                let known: Vec<_> = OPTIONS.iter().map(|def| def.name).collect();
                return Err(format!("unknown option '{key}' (known: {})", known.join(", ")));
            };
            if seen.contains(&def.name) {
                return Err(format!("duplicate option '{key}'"));
            }
            seen.push(def.name);
            (def.parse)(&mut options, value)?;
        }
        Ok((options, seen))
    }
}

/// Refuses the first option that makes no sense for the socket of `address`.
pub(super) fn check_options_apply(address: &Address, given: &[&str]) -> Result<(), String> {
    if let Address::Adopted(_) = address {
        // The rest is checked against the real socket when it is adopted.
        return match given.iter().find(|name| !ADOPTABLE_OPTIONS.contains(name)) {
            Some(name) => Err(format!(
                "option '{name}' cannot be applied to an adopted socket, which is already bound (these can: {})",
                ADOPTABLE_OPTIONS.join(", ")
            )),
            None => Ok(()),
        };
    }
    for def in OPTIONS.iter().filter(|def| given.contains(&def.name)) {
        if def.name == "steer" && !(def.applies)(address) {
            return Err("steer=flow is for UDP sockets only".into());
        }
        if !(def.applies)(address) {
            let kind = address.kind_name();
            let article = if kind.starts_with(['I', 'a']) { "an" } else { "a" };
            return Err(format!(
                "option '{}' does not apply to {article} {kind} socket (only to {})",
                def.name, def.applies_to
            ));
        }
    }
    Ok(())
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
        let (address, (options, given)) = match text.split_once(',') {
            Some((address, options)) => (address, ListenOptions::parse(options).map_err(error)?),
            None => (text, (ListenOptions::default(), Vec::new())),
        };
        let address = parse_address(address).map_err(error)?;
        check_options_apply(&address, &given).map_err(error)?;
        Ok(Self { text: text.to_owned(), address, options })
    }
}

const SCHEMES: &str = "tcp, tcp4, tcp6, udp, udp4, udp6, unix, unixgram, unixpacket, fd, systemd";

fn parse_address(s: &str) -> Result<Address, String> {
    if s.starts_with('/') || s.starts_with('@') {
        return parse_unix(s, SocketKind::Stream);
    }
    if let Some((scheme, rest)) = s.split_once("://") {
        return match scheme {
            "tcp" | "tcp4" | "tcp6" | "udp" | "udp4" | "udp6" => parse_inet(rest, scheme),
            "unix" => parse_unix(rest, SocketKind::Stream),
            "unixgram" => parse_unix(rest, SocketKind::Datagram),
            "unixpacket" => parse_unix(rest, SocketKind::SeqPacket),
            "fd" => match rest.parse::<RawFd>() {
                Ok(fd) if fd >= 3 => Ok(Address::Adopted(Adopt::Fd(fd))),
                Ok(fd) => Err(format!("fd {fd} is standard input, output or error, not a socket")),
                Err(_) => Err(format!("'{rest}' is not an fd number")),
            },
            "systemd" => match check_fd_name(rest) {
                Ok(()) => Ok(Address::Adopted(Adopt::Systemd(rest.to_owned()))),
                Err(e) => Err(format!("the socket name {e}")),
            },
            _ => Err(format!("unknown scheme '{scheme}' (known: {SCHEMES})")),
        };
    }
    if s.is_empty() {
        Err("missing address".into())
    } else if s.starts_with("vsock:") {
        Err("AF_VSOCK sockets are not supported".into())
    } else if s.contains('/') && !s.starts_with('[') {
        Err("a Unix socket path must be absolute".into())
    } else {
        parse_inet(s, "")
    }
}

/// Parses `/path` or `@name` (a Unix socket of `kind`).
fn parse_unix(s: &str, kind: SocketKind) -> Result<Address, String> {
    let name = if let Some(name) = s.strip_prefix('@') {
        if name.is_empty() {
            return Err("missing abstract socket name after '@'".into());
        } else if name.len() > ABSTRACT_NAME_MAX {
            let len = name.len();
            return Err(format!(
                "the abstract name is {len} bytes long, more than sun_path holds ({ABSTRACT_NAME_MAX})"
            ));
        }
        UnixName::Abstract(name.to_owned())
    } else if s.is_empty() {
        return Err("missing path".into());
    } else if !s.starts_with('/') {
        return Err("a Unix socket path must be absolute".into());
    } else if s.len() > UNIX_PATH_MAX {
        let len = s.len();
        return Err(format!(
            "the path is {len} bytes long, more than sun_path holds ({UNIX_PATH_MAX})"
        ));
    } else {
        UnixName::Path(s.into())
    };
    Ok(Address::Unix { name, kind })
}

/// Parses an internet address after `scheme://` (or with no scheme: TCP): a bare port,
/// `HOST:PORT`, `[IPV6]:PORT`, with an interface scope either inside the brackets
/// (`[fe80::1%eth0]:80`, RFC 4007) or after the port (`[fe80::1]:80%eth0`, systemd's form).
fn parse_inet(s: &str, scheme: &str) -> Result<Address, String> {
    let (kind, family) = match scheme {
        "udp" => (SocketKind::Datagram, Family::Any),
        "udp4" => (SocketKind::Datagram, Family::V4),
        "udp6" => (SocketKind::Datagram, Family::V6),
        "tcp4" => (SocketKind::Stream, Family::V4),
        "tcp6" => (SocketKind::Stream, Family::V6),
        _ => (SocketKind::Stream, Family::Any),
    };
    if s.is_empty() {
        return Err("missing host and port".into());
    }
    let is_port = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if is_port(s) {
        if family != Family::Any {
            let any = if family == Family::V4 { "0.0.0.0" } else { "[::]" };
            return Err(format!("{scheme} needs HOST:PORT, e.g. {scheme}://{any}:{s}"));
        }
        return Ok(Address::Inet {
            kind,
            host: Host::Any,
            port: parse_port(s)?,
            family,
            scope: None,
        });
    }
    let (s, mut scope) = match s.rsplit_once('%') {
        Some((head, dev)) if !dev.contains(']') => (head, Some(parse_scope(dev)?)),
        _ => (s, None),
    };
    let scope_error = |scope: &Scope| {
        let dev = match scope {
            Scope::Index(i) => i.to_string(),
            Scope::Name(name) => name.clone(),
        };
        format!(
            "an interface scope ('%{dev}') needs an IPv6 address, as in [fe80::1%{dev}]:80; \
             use device={dev} to bind to an interface"
        )
    };
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (inside, after) = rest.split_once(']').ok_or("unterminated '[' in IPv6 address")?;
        let inside = match inside.split_once('%') {
            Some(_) if scope.is_some() => return Err("more than one interface scope".into()),
            Some((ip, dev)) => {
                scope = Some(parse_scope(dev)?);
                ip
            }
            None => inside,
        };
        let ip: Ipv6Addr =
            inside.parse().map_err(|_| format!("invalid IPv6 address '{inside}'"))?;
        let port = match after.strip_prefix(':') {
            Some(port) => port,
            None if after.is_empty() => return Err("missing port".into()),
            None => return Err(format!("expected ':PORT' after ']', got '{after}'")),
        };
        (Host::Ip(ip.into()), port)
    } else {
        if let Some(scope) = &scope
            && is_port(s)
        {
            return Err(scope_error(scope));
        }
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
    if let Some(scope) = &scope
        && !matches!(host, Host::Ip(IpAddr::V6(_)))
    {
        return Err(scope_error(scope));
    }
    match (family, &host) {
        (Family::V4, Host::Ip(ip @ IpAddr::V6(_))) => {
            Err(format!("{scheme} needs an IPv4 address, got {ip}"))
        }
        (Family::V6, Host::Ip(ip @ IpAddr::V4(_))) => {
            Err(format!("{scheme} needs an IPv6 address, got {ip}"))
        }
        _ => Ok(Address::Inet { kind, host, port, family, scope }),
    }
}

/// The interface after `%`: an index (digits) or a name.
fn parse_scope(dev: &str) -> Result<Scope, String> {
    if dev.is_empty() {
        return Err("missing interface after '%'".into());
    }
    if dev.bytes().all(|b| b.is_ascii_digit()) {
        return match dev.parse::<u32>() {
            Ok(index) if index > 0 => Ok(Scope::Index(index)),
            _ => Err(format!("invalid interface index '{dev}'")),
        };
    }
    check_ifname(dev)?;
    Ok(Scope::Name(dev.to_owned()))
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

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    pub(in crate::listen) fn parse(text: &str) -> ListenSpec {
        text.parse().unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    fn host(host: &str) -> Host {
        match host {
            "*" => Host::Any,
            _ => host.parse().map_or_else(|_| Host::Name(host.into()), Host::Ip),
        }
    }

    pub(in crate::listen) fn tcp(h: &str, port: u16, family: Family) -> Address {
        Address::Inet { kind: SocketKind::Stream, host: host(h), port, family, scope: None }
    }

    fn udp(h: &str, port: u16, family: Family) -> Address {
        Address::Inet { kind: SocketKind::Datagram, host: host(h), port, family, scope: None }
    }

    fn scoped(h: &str, port: u16, scope: Scope) -> Address {
        let kind = SocketKind::Stream;
        Address::Inet { kind, host: host(h), port, family: Family::Any, scope: Some(scope) }
    }

    fn unix(path: &str, kind: SocketKind) -> Address {
        Address::Unix { name: UnixName::Path(path.into()), kind }
    }

    fn abstract_(name: &str, kind: SocketKind) -> Address {
        Address::Unix { name: UnixName::Abstract(name.into()), kind }
    }

    #[test]
    fn accepted_forms() {
        use Family::{Any, V4, V6};
        use SocketKind::{Datagram, SeqPacket, Stream};
        let long_path = format!("/{}", "a".repeat(UNIX_PATH_MAX - 1));
        let long_abstract = format!("@{}", "a".repeat(ABSTRACT_NAME_MAX));
        let cases = [
            // adoption
            ("fd://3", Address::Adopted(Adopt::Fd(3))),
            ("fd://17", Address::Adopted(Adopt::Fd(17))),
            ("systemd://web", Address::Adopted(Adopt::Systemd("web".into()))),
            // systemd's ListenStream= forms
            ("8080", tcp("*", 8080, Any)),
            ("0", tcp("*", 0, Any)),
            ("127.0.0.1:8080", tcp("127.0.0.1", 8080, Any)),
            ("0.0.0.0:65535", tcp("0.0.0.0", 65535, Any)),
            ("[::1]:8080", tcp("::1", 8080, Any)),
            ("[::]:80", tcp("::", 80, Any)),
            ("[fe80::1]:80%eth0", scoped("fe80::1", 80, Scope::Name("eth0".into()))),
            ("[fe80::1]:80%2", scoped("fe80::1", 80, Scope::Index(2))),
            ("/run/app.sock", unix("/run/app.sock", Stream)),
            (&long_path, unix(&long_path, Stream)),
            ("@app", abstract_("app", Stream)),
            ("@a/b c", abstract_("a/b c", Stream)),
            (&long_abstract, abstract_(&long_abstract[1..], Stream)),
            // scope inside the brackets (RFC 4007, Go)
            ("[fe80::1%eth0]:80", scoped("fe80::1", 80, Scope::Name("eth0".into()))),
            ("[fe80::1%12]:0", scoped("fe80::1", 0, Scope::Index(12))),
            ("[::1%lo]:80", scoped("::1", 80, Scope::Name("lo".into()))),
            // hostnames
            ("localhost:80", tcp("localhost", 80, Any)),
            // URL forms
            ("tcp://127.0.0.1:1", tcp("127.0.0.1", 1, Any)),
            ("tcp://[::1]:1", tcp("::1", 1, Any)),
            ("tcp://8080", tcp("*", 8080, Any)),
            ("tcp://example.com:443", tcp("example.com", 443, Any)),
            ("tcp4://0.0.0.0:0", tcp("0.0.0.0", 0, V4)),
            ("tcp4://localhost:80", tcp("localhost", 80, V4)),
            ("tcp6://[::]:8080", tcp("::", 8080, V6)),
            ("tcp6://my-host.example:0", tcp("my-host.example", 0, V6)),
            ("udp://127.0.0.1:53", udp("127.0.0.1", 53, Any)),
            ("udp://53", udp("*", 53, Any)),
            ("udp://[::1]:53", udp("::1", 53, Any)),
            ("udp4://0.0.0.0:5353", udp("0.0.0.0", 5353, V4)),
            ("udp4://localhost:0", udp("localhost", 0, V4)),
            ("udp6://[::]:0", udp("::", 0, V6)),
            ("unix:///run/app.sock", unix("/run/app.sock", Stream)),
            ("unix://@app", abstract_("app", Stream)),
            ("unixgram:///run/log.sock", unix("/run/log.sock", Datagram)),
            ("unixgram://@log", abstract_("log", Datagram)),
            ("unixpacket:///run/p.sock", unix("/run/p.sock", SeqPacket)),
            ("unixpacket://@p", abstract_("p", SeqPacket)),
        ];
        for (text, address) in cases {
            let spec = parse(text);
            assert_eq!(spec.address, address, "{text}");
            assert_eq!(spec.options, ListenOptions::default(), "{text}");
            assert_eq!(spec.to_string(), text);
        }
        let udp_scoped = parse("udp://[fe80::1%eth0]:53").address;
        let scope = Some(Scope::Name("eth0".into()));
        let host = host("fe80::1");
        let (kind, family) = (Datagram, Any);
        assert_eq!(udp_scoped, Address::Inet { kind, host, port: 53, family, scope });
    }

    #[test]
    fn accepted_options() {
        let long_name = "n".repeat(FD_NAME_MAX);
        let default = ListenOptions::default;
        let cases = [
            ("8080,name=web", ListenOptions { name: Some("web".into()), ..default() }),
            ("/run/a.sock,backlog=16", ListenOptions { backlog: Some(16), ..default() }),
            (
                "0,backlog=4294967295,name=a b",
                ListenOptions { name: Some("a b".into()), backlog: Some(u32::MAX), ..default() },
            ),
            (
                &format!("8080,name={long_name}"),
                ListenOptions { name: Some(long_name.clone()), ..default() },
            ),
            ("[::]:80,v6only=1", ListenOptions { v6only: Some(true), ..default() }),
            ("[::]:80,v6only=no", ListenOptions { v6only: Some(false), ..default() }),
            ("80,v6only", ListenOptions { v6only: Some(true), ..default() }),
            ("udp6://[::]:53,v6only=On", ListenOptions { v6only: Some(true), ..default() }),
            ("tcp://host.example:80,v6only=t", ListenOptions { v6only: Some(true), ..default() }),
            ("80,reuseport", ListenOptions { reuseport: true, ..default() }),
            ("80,reuseport=yes", ListenOptions { reuseport: true, ..default() }),
            ("80,reuseport=false", default()),
            ("udp://[::1]:53,reuseport=TRUE", ListenOptions { reuseport: true, ..default() }),
            ("192.0.2.1:80,freebind", ListenOptions { freebind: true, ..default() }),
            ("80,device=eth0", ListenOptions { device: Some("eth0".into()), ..default() }),
            (
                "udp://53,device=br-lan.10",
                ListenOptions { device: Some("br-lan.10".into()), ..default() },
            ),
            ("80,nodelay", ListenOptions { nodelay: true, ..default() }),
            ("80,nodelay=0", default()),
            ("80,keepalive=y", ListenOptions { keepalive: true, ..default() }),
            ("80,rcvbuf=65536", ListenOptions { rcvbuf: Some(65536), ..default() }),
            (
                "80,rcvbuf=64K,sndbuf=4M",
                ListenOptions { rcvbuf: Some(65536), sndbuf: Some(4 << 20), ..default() },
            ),
            ("udp://53,sndbuf=1G", ListenOptions { sndbuf: Some(1 << 30), ..default() }),
            (
                "@a,rcvbuf=2147483647",
                ListenOptions { rcvbuf: Some(i32::MAX as usize), ..default() },
            ),
            ("/a.sock,mode=0600", ListenOptions { mode: Some(0o600), ..default() }),
            ("/a.sock,mode=660", ListenOptions { mode: Some(0o660), ..default() }),
            ("unixgram:///a,mode=7777", ListenOptions { mode: Some(0o7777), ..default() }),
            ("unixpacket:///a,mode=0", ListenOptions { mode: Some(0), ..default() }),
            (
                "/a.sock,owner=root,group=root",
                ListenOptions {
                    owner: Some(Uid::from_raw(0)),
                    group: Some(Gid::from_raw(0)),
                    ..default()
                },
            ),
            (
                "/a.sock,owner=4242,group=4343",
                ListenOptions {
                    owner: Some(Uid::from_raw(4242)),
                    group: Some(Gid::from_raw(4343)),
                    ..default()
                },
            ),
            ("/a.sock,nonblock", ListenOptions { nonblock: true, ..default() }),
            ("udp://53,nonblock=1", ListenOptions { nonblock: true, ..default() }),
            ("udp://127.0.0.1:0,steer=flow", ListenOptions { steer_flow: true, ..default() }),
            ("udp6://[::]:443,steer=flow", ListenOptions { steer_flow: true, ..default() }),
            ("udp4://0.0.0.0:53,steer=flow", ListenOptions { steer_flow: true, ..default() }),
            (
                "@a,nonblock,name=x",
                ListenOptions { nonblock: true, name: Some("x".into()), ..default() },
            ),
        ];
        for (text, options) in cases {
            assert_eq!(parse(text).options, options, "{text}");
        }
    }

    #[test]
    fn rejected_specs() {
        let long_path = format!("unix:///{}", "a".repeat(UNIX_PATH_MAX));
        let long_abstract = format!("@{}", "a".repeat(ABSTRACT_NAME_MAX + 1));
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
            ("udp4://[::]:53", "udp4 needs an IPv4 address, got ::"),
            ("udp6://0.0.0.0:53", "udp6 needs an IPv6 address, got 0.0.0.0"),
            ("tcp4://80", "tcp4 needs HOST:PORT, e.g. tcp4://0.0.0.0:80"),
            ("udp6://53", "udp6 needs HOST:PORT, e.g. udp6://[::]:53"),
            ("udp://", "missing host and port"),
            ("udp://127.0.0.1", "missing port"),
            // interface scopes
            ("[fe80::1%]:80", "missing interface after '%'"),
            ("[fe80::1]:80%", "missing interface after '%'"),
            ("[fe80::1%0]:80", "invalid interface index '0'"),
            ("[fe80::1%99999999999]:80", "invalid interface index"),
            ("[fe80::1%a/b]:80", "invalid interface name 'a/b'"),
            ("[fe80::1%a b]:80", "invalid interface name"),
            ("[fe80::1%sixteen-chars-long]:80", "at most 15 printable characters"),
            ("[fe80::1%eth0]:80%eth1", "more than one interface scope"),
            ("127.0.0.1:80%eth0", "an interface scope ('%eth0') needs an IPv6 address"),
            ("localhost:80%2", "use device=2 to bind to an interface"),
            ("8080%eth0", "needs an IPv6 address"),
            ("[fe80::1%eth0]", "missing port"),
            // Unix
            ("unix://relative", "a Unix socket path must be absolute"),
            ("run/app.sock", "a Unix socket path must be absolute"),
            ("unix://", "missing path"),
            ("unixgram://", "missing path"),
            ("unixpacket://rel", "a Unix socket path must be absolute"),
            (&long_path, "108 bytes long, more than sun_path holds (107)"),
            ("@", "missing abstract socket name after '@'"),
            ("unix://@", "missing abstract socket name"),
            (&long_abstract, "the abstract name is 108 bytes long"),
            // options: values
            ("x,backlog=abc", "positive integer, got 'abc'"),
            ("8080,backlog=0", "must be a positive integer, got '0'"),
            ("8080,backlog=-1", "backlog must be a positive integer"),
            ("8080,backlog", "option 'backlog' needs a value: backlog=N"),
            ("8080,name=a,name=b", "duplicate option 'name'"),
            ("8080,nodelay,nodelay=0", "duplicate option 'nodelay'"),
            ("8080,name=", "name must not be empty"),
            ("8080,name=a:b", "name must not contain ':'"),
            ("8080,name=caf\u{e9}", "name must be printable ASCII"),
            ("8080,name=a\tb", "name must be printable ASCII"),
            (&long_name, "name is 256 characters long"),
            ("8080,", "empty option name"),
            ("8080,=x", "empty option name"),
            ("8080,foo", "unknown option 'foo' (known: name, backlog, v6only, reuseport,"),
            (
                "8080,reuseport=maybe",
                "reuseport must be a boolean (yes/no, true/false, on/off, 1/0), got 'maybe'",
            ),
            ("8080,v6only=", "v6only must be a boolean"),
            ("8080,nonblock=2", "nonblock must be a boolean"),
            ("8080,device", "option 'device' needs a value: device=IF"),
            ("8080,device=", "missing interface name"),
            ("8080,device=a:b", "invalid interface name 'a:b'"),
            ("8080,rcvbuf", "option 'rcvbuf' needs a value: rcvbuf=SIZE"),
            ("8080,rcvbuf=0", "rcvbuf must be a positive size in bytes (65536, 64K, 4M), got '0'"),
            ("8080,rcvbuf=K", "rcvbuf must be a positive size"),
            ("8080,sndbuf=-5", "sndbuf must be a positive size"),
            ("8080,sndbuf=1.5M", "sndbuf must be a positive size"),
            ("8080,sndbuf=64k", "sndbuf must be a positive size"),
            ("8080,rcvbuf=2G", "rcvbuf is too large: at most 2147483647 bytes, got '2G'"),
            ("8080,rcvbuf=2147483648", "rcvbuf is too large"),
            ("/a,mode=8", "mode must be an octal number from 0 to 7777, got '8'"),
            ("/a,mode=10000", "mode must be an octal number"),
            ("/a,mode=0o600", "mode must be an octal number"),
            ("/a,mode=", "mode must be an octal number"),
            ("/a,mode", "option 'mode' needs a value: mode=OCTAL"),
            ("/a,owner=no-such-user-sockhold", "unknown user 'no-such-user-sockhold'"),
            ("/a,group=no-such-group-sockhold", "unknown group 'no-such-group-sockhold'"),
            ("/a,owner=4294967295", "'4294967295' is not a valid user id"),
            ("/a,group=99999999999", "'99999999999' is not a valid group id"),
            ("/a,owner", "option 'owner' needs a value: owner=USER"),
            // options that do not apply to the kind of socket
            (
                "udp://53,backlog=5",
                "option 'backlog' does not apply to a UDP socket (only to TCP, Unix stream and Unix seqpacket sockets)",
            ),
            ("unixgram:///a,backlog=5", "'backlog' does not apply to a Unix datagram socket"),
            (
                "127.0.0.1:80,v6only",
                "option 'v6only' does not apply to an IPv4 TCP socket (only to IPv6 sockets)",
            ),
            ("tcp4://localhost:80,v6only=0", "does not apply to an IPv4 TCP socket"),
            ("udp4://0.0.0.0:53,v6only", "does not apply to an IPv4 UDP socket"),
            ("/a,v6only", "'v6only' does not apply to a Unix stream socket"),
            (
                "/a,reuseport",
                "option 'reuseport' does not apply to a Unix stream socket (only to TCP and UDP sockets)",
            ),
            ("@a,freebind", "'freebind' does not apply to an abstract Unix stream socket"),
            ("unixgram:///a,device=lo", "'device' does not apply to a Unix datagram socket"),
            (
                "/a,nodelay",
                "option 'nodelay' does not apply to a Unix stream socket (only to TCP sockets)",
            ),
            ("udp://53,nodelay", "'nodelay' does not apply to a UDP socket"),
            ("udp://[::1]:53,keepalive", "'keepalive' does not apply to an IPv6 UDP socket"),
            ("unixpacket:///a,keepalive", "'keepalive' does not apply to a Unix seqpacket socket"),
            (
                "8080,mode=0600",
                "option 'mode' does not apply to a TCP socket (only to Unix sockets with a path; an abstract socket has no file)",
            ),
            ("@a,mode=0600", "'mode' does not apply to an abstract Unix stream socket"),
            (
                "unixgram://@a,owner=root",
                "'owner' does not apply to an abstract Unix datagram socket",
            ),
            ("udp://53,group=root", "'group' does not apply to a UDP socket"),
            ("127.0.0.1:8080,steer=flow", "steer=flow is for UDP sockets only"),
            ("unixgram:///a,steer=flow", "steer=flow is for UDP sockets only"),
            ("@a,steer=flow", "steer=flow is for UDP sockets only"),
            ("udp://53,steer", "option 'steer' needs a value: steer=flow"),
            ("udp://53,steer=hash", "steer must be 'flow', got 'hash'"),
            ("fd://3,steer=flow", "option 'steer' cannot be applied to an adopted socket"),
            // not (yet) supported
            ("fd://2", "fd 2 is standard input, output or error"),
            ("fd://x", "'x' is not an fd number"),
            ("fd://", "'' is not an fd number"),
            ("systemd://", "the socket name must not be empty"),
            ("systemd://a:b", "must not contain ':'"),
            ("fd://3,mode=600", "option 'mode' cannot be applied to an adopted socket"),
            (
                "systemd://web,reuseport",
                "option 'reuseport' cannot be applied to an adopted socket",
            ),
            ("vsock:2:1234", "AF_VSOCK sockets are not supported"),
            (
                "http://x:80",
                "unknown scheme 'http' (known: tcp, tcp4, tcp6, udp, udp4, udp6, unix, unixgram, unixpacket, fd, systemd)",
            ),
        ];
        for (text, expected) in cases {
            let error = text.parse::<ListenSpec>().expect_err(text).to_string();
            let prefix = format!("invalid listen spec '{text}': ");
            assert!(error.starts_with(&prefix), "{text}: {error}");
            assert!(error.contains(expected), "{text}: {error}");
        }
    }

    #[test]
    fn every_option_is_known_to_the_unknown_option_message() {
        let error = "8080,bogus".parse::<ListenSpec>().unwrap_err().to_string();
        for def in OPTIONS {
            assert!(error.contains(def.name), "{}: {error}", def.name);
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
}

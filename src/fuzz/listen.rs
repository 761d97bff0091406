//! `--listen` specs: arbitrary text and a soup of the grammar's pieces never panic, and
//! generated specs with known meaning parse to exactly that address and those options.

use std::net::{Ipv4Addr, Ipv6Addr};

use nix::unistd::{Gid, Uid};
use proptest::prelude::*;

use super::{edgy, soup, truncate};
use crate::listen::{
    Address, Adopt, Family, Host, ListenOptions, ListenSpec, Scope, SocketKind, UnixName,
};

#[rustfmt::skip]
const PIECES: &[&str] = &[
    "tcp://", "tcp4://", "tcp6://", "udp://", "udp4://", "udp6://", "unix://", "unixgram://",
    "unixpacket://", "fd://", "systemd://", "vsock:", "http://", "://", "@", "/", "/run/", "[",
    "]", ":", "%", ",", "=", ".", "-", "+", " ", "\0", "é", "\u{feff}", "0", "1", "3", "80",
    "65535", "65536", "2147483648", "4294967295", "4294967296", "18446744073709551616", "-1",
    "127.0.0.1", "0.0.0.0", "::", "::1", "fe80::1", "::ffff:1.2.3.4", "localhost",
    "example.com", "eth0", "lo", "K", "M", "G", "0777", "7777", "yes", "no", "on", "name",
    "backlog", "v6only", "reuseport", "freebind", "device", "nodelay", "keepalive", "rcvbuf",
    "sndbuf", "mode", "owner", "group", "nonblock", "steer", "flow", "root",
];

/// Every option, as the README lists them.
#[rustfmt::skip]
const OPTION_NAMES: &[&str] = &[
    "name", "backlog", "v6only", "reuseport", "freebind", "device", "nodelay", "keepalive",
    "rcvbuf", "sndbuf", "mode", "owner", "group", "nonblock", "steer",
];

#[rustfmt::skip]
const VALUE_PIECES: &[&str] = &[
    "1", "0", "yes", "No", "TRUE", "off", "-1", "+1", "00", "0777", "7777", "10000", "64", "K",
    "M", "G", "KK", "2147483647", "2147483648", "4294967295", "4294967296",
    "99999999999999999999", "eth0", "root", "nobody", "a:b", ".", "..", "%", "/", " ", "=",
    "\0", "é",
];

/// What every spec, accepted or not, must satisfy.
fn check(text: &str) -> Result<(), TestCaseError> {
    match text.parse::<ListenSpec>() {
        Ok(spec) => {
            prop_assert_eq!(&spec.text, text);
            // The display form is the text given; parsed again, it means the same.
            let again = spec.to_string().parse::<ListenSpec>();
            prop_assert_eq!(again.as_ref(), Ok(&spec));
            check_options_fit(&spec)?;
            // Without a scheme an internet address is TCP: `tcp://` in front changes nothing.
            if matches!(spec.address, Address::Inet { .. }) && !text.contains("://") {
                let tcp = format!("tcp://{text}").parse::<ListenSpec>();
                prop_assert_eq!(
                    tcp.map(|t| (t.address, t.options)),
                    Ok((spec.address.clone(), spec.options.clone()))
                );
            }
        }
        Err(e) => {
            prop_assert_eq!(&e.spec, text);
            prop_assert!(!e.reason.trim().is_empty(), "no reason given for {:?}", text);
            let shown = e.to_string();
            prop_assert!(shown.contains(&format!("'{text}'")), "{} does not name the spec", shown);
        }
    }
    Ok(())
}

/// Options that mean something only for some sockets are only accepted for those.
fn check_options_fit(spec: &ListenSpec) -> Result<(), TestCaseError> {
    let (o, a) = (&spec.options, &spec.address);
    let adopted = matches!(a, Address::Adopted(_));
    if o.mode.is_some() || o.owner.is_some() || o.group.is_some() {
        prop_assert!(has_file(a), "file options for {:?}", spec);
    }
    if o.device.is_some() || o.reuseport || o.freebind {
        prop_assert!(is_inet(a), "IP options for {:?}", spec);
    }
    if o.v6only.is_some() {
        prop_assert!(is_inet(a) && !is_ipv4(a), "v6only for {:?}", spec);
    }
    if o.nodelay || o.keepalive {
        prop_assert!(adopted || is_tcp(a), "TCP options for {:?}", spec);
    }
    if o.backlog.is_some() {
        prop_assert!(adopted || !is_datagram(a), "backlog for {:?}", spec);
    }
    if o.steer_flow {
        prop_assert!(is_udp(a), "steer=flow for {:?}", spec);
    }
    Ok(())
}

fn is_inet(a: &Address) -> bool {
    matches!(a, Address::Inet { .. })
}

fn is_tcp(a: &Address) -> bool {
    matches!(a, Address::Inet { kind: SocketKind::Stream, .. })
}

fn is_udp(a: &Address) -> bool {
    matches!(a, Address::Inet { kind: SocketKind::Datagram, .. })
}

fn is_datagram(a: &Address) -> bool {
    matches!(
        a,
        Address::Inet { kind: SocketKind::Datagram, .. }
            | Address::Unix { kind: SocketKind::Datagram, .. }
    )
}

fn is_ipv4(a: &Address) -> bool {
    matches!(a, Address::Inet { host: Host::Ip(ip), .. } if ip.is_ipv4())
        || matches!(a, Address::Inet { family: Family::V4, .. })
}

fn has_file(a: &Address) -> bool {
    matches!(a, Address::Unix { name: UnixName::Path(_), .. })
}

/// Whether option `name` makes sense for `address`, as the README and the man page say.
fn fits(name: &str, address: &Address) -> bool {
    if let Address::Adopted(_) = address {
        // Already bound: only what can still be set on a bound socket.
        return matches!(
            name,
            "name" | "backlog" | "nodelay" | "keepalive" | "rcvbuf" | "sndbuf" | "nonblock"
        );
    }
    match name {
        "name" | "rcvbuf" | "sndbuf" | "nonblock" => true,
        "backlog" => !is_datagram(address),
        "v6only" => is_inet(address) && !is_ipv4(address),
        "reuseport" | "freebind" | "device" => is_inet(address),
        "nodelay" | "keepalive" => is_tcp(address),
        "mode" | "owner" | "group" => has_file(address),
        "steer" => is_udp(address),
        other => panic!("no such option {other}"),
    }
}

/// A valid `LISTEN_FDNAMES` entry that can stand in a spec: printable ASCII, no ':', no ','.
fn fd_name() -> &'static str {
    "[ -+.-9;-~-]{1,255}"
}

fn ifname() -> &'static str {
    "[a-zA-Z][a-zA-Z0-9._-]{0,14}"
}

fn ipv6() -> impl Strategy<Value = Ipv6Addr> {
    prop_oneof![
        any::<u128>().prop_map(Ipv6Addr::from),
        // Mostly zero groups, so that the compressed forms (`::`, `fe80::1`) come up.
        prop::array::uniform8(prop_oneof![3 => Just(0u16), 1 => any::<u16>()])
            .prop_map(Ipv6Addr::from),
        any::<u32>().prop_map(|v4| Ipv4Addr::from(v4).to_ipv6_mapped()),
    ]
}

/// A host to write into a spec; `Bare` is a bare port, which binds every address.
#[derive(Clone, Debug)]
enum HostGen {
    Bare,
    V4(Ipv4Addr),
    /// The scope, and whether it is written inside the brackets.
    V6(Ipv6Addr, Option<(Scope, bool)>),
    Name(String),
}

const INET_SCHEMES: &[(&str, SocketKind, Family)] = &[
    ("", SocketKind::Stream, Family::Any),
    ("tcp://", SocketKind::Stream, Family::Any),
    ("tcp4://", SocketKind::Stream, Family::V4),
    ("tcp6://", SocketKind::Stream, Family::V6),
    ("udp://", SocketKind::Datagram, Family::Any),
    ("udp4://", SocketKind::Datagram, Family::V4),
    ("udp6://", SocketKind::Datagram, Family::V6),
];

/// A valid TCP or UDP address: text and meaning.
fn inet() -> impl Strategy<Value = (String, Address)> {
    (prop::sample::select(INET_SCHEMES), edgy(0, u16::MAX))
        .prop_flat_map(|(scheme, port)| {
            let scope = prop_oneof![
                edgy(1, u32::MAX).prop_map(Scope::Index),
                ifname().prop_map(Scope::Name),
            ];
            let v4 = any::<u32>().prop_map(|ip| HostGen::V4(ip.into()));
            let v6 = (ipv6(), prop::option::of((scope, any::<bool>())))
                .prop_map(|(ip, scope)| HostGen::V6(ip, scope));
            let name =
                "[a-zA-Z][a-zA-Z0-9_-]{0,10}(\\.[a-zA-Z0-9_-]{1,10}){0,3}".prop_map(HostGen::Name);
            // Only the hosts the scheme's family allows.
            let host = match scheme.2 {
                Family::Any => prop_oneof![Just(HostGen::Bare), v4, v6, name].boxed(),
                Family::V4 => prop_oneof![v4, name].boxed(),
                Family::V6 => prop_oneof![v6, name].boxed(),
            };
            (Just((scheme, port)), host)
        })
        .prop_map(|(((scheme, kind, family), port), host)| {
            let (text, host, scope) = match host {
                HostGen::Bare => (format!("{scheme}{port}"), Host::Any, None),
                HostGen::V4(ip) => (format!("{scheme}{ip}:{port}"), Host::Ip(ip.into()), None),
                HostGen::Name(name) => (format!("{scheme}{name}:{port}"), Host::Name(name), None),
                HostGen::V6(ip, None) => {
                    (format!("{scheme}[{ip}]:{port}"), Host::Ip(ip.into()), None)
                }
                HostGen::V6(ip, Some((scope, inside))) => {
                    let dev = match &scope {
                        Scope::Index(i) => i.to_string(),
                        Scope::Name(name) => name.clone(),
                    };
                    let text = if inside {
                        format!("{scheme}[{ip}%{dev}]:{port}")
                    } else {
                        format!("{scheme}[{ip}]:{port}%{dev}")
                    };
                    (text, Host::Ip(ip.into()), Some(scope))
                }
            };
            (text, Address::Inet { kind, host, port, family, scope })
        })
}

const UNIX_SCHEMES: &[(&str, SocketKind)] = &[
    ("", SocketKind::Stream),
    ("unix://", SocketKind::Stream),
    ("unixgram://", SocketKind::Datagram),
    ("unixpacket://", SocketKind::SeqPacket),
];

/// A valid Unix socket address, a path or an abstract name, of any characters but ','.
fn unix() -> impl Strategy<Value = (String, Address)> {
    (prop::sample::select(UNIX_SCHEMES), any::<bool>(), "[^,]{1,120}").prop_map(
        |((scheme, kind), abstract_, name)| {
            if abstract_ {
                let name = truncate(name, 107);
                let text = format!("{scheme}@{name}");
                (text, Address::Unix { name: UnixName::Abstract(name), kind })
            } else {
                let path = truncate(format!("/{name}"), 107);
                let text = format!("{scheme}{path}");
                (text, Address::Unix { name: UnixName::Path(path.into()), kind })
            }
        },
    )
}

/// A valid inherited socket to adopt.
fn adopted() -> impl Strategy<Value = (String, Address)> {
    prop_oneof![
        edgy(3, i32::MAX).prop_map(|fd| (format!("fd://{fd}"), Address::Adopted(Adopt::Fd(fd)))),
        fd_name().prop_map(|name| {
            (format!("systemd://{name}"), Address::Adopted(Adopt::Systemd(name)))
        }),
    ]
}

fn address() -> impl Strategy<Value = (String, Address)> {
    prop_oneof![3 => inet(), 2 => unix(), 1 => adopted()]
}

/// systemd's booleans in any case, or none (a flag alone means yes).
fn boolean() -> impl Strategy<Value = (Option<String>, bool)> {
    const WORDS: &[(&str, bool)] = &[
        ("1", true),
        ("yes", true),
        ("y", true),
        ("true", true),
        ("t", true),
        ("on", true),
        ("0", false),
        ("no", false),
        ("n", false),
        ("false", false),
        ("f", false),
        ("off", false),
    ];
    let word = (prop::sample::select(WORDS), prop::collection::vec(any::<bool>(), 5)).prop_map(
        |((word, on), upper)| {
            let text = word
                .chars()
                .zip(upper)
                .map(|(c, up)| if up { c.to_ascii_uppercase() } else { c })
                .collect();
            (Some(text), on)
        },
    );
    prop_oneof![Just((None, true)), word]
}

/// A valid `rcvbuf=`/`sndbuf=` value and its bytes: at most `i32::MAX`, with K, M or G.
fn size() -> impl Strategy<Value = (String, usize)> {
    const UNITS: &[(&str, u64)] = &[("", 1), ("K", 1 << 10), ("M", 1 << 20), ("G", 1 << 30)];
    (prop::sample::select(UNITS), "0{0,3}").prop_flat_map(|((suffix, unit), zeros)| {
        edgy(1, i32::MAX as u64 / unit)
            .prop_map(move |n| (format!("{zeros}{n}{suffix}"), (n * unit) as usize))
    })
}

/// A valid `owner=`/`group=` value: a numeric id (never -1 as u32) or root.
fn id() -> impl Strategy<Value = (String, u32)> {
    prop_oneof![edgy(0, u32::MAX - 1).prop_map(|id| (id.to_string(), id)), Just(("root".into(), 0)),]
}

/// A valid value for option `name`: the item as written, and the options it alone sets.
fn option(name: &'static str) -> BoxedStrategy<(String, ListenOptions)> {
    let with = |set: &dyn Fn(&mut ListenOptions)| {
        let mut options = ListenOptions::default();
        set(&mut options);
        options
    };
    match name {
        "name" => fd_name()
            .prop_map(move |n| (format!("name={n}"), with(&|o| o.name = Some(n.clone()))))
            .boxed(),
        "backlog" => edgy(1, u32::MAX)
            .prop_map(move |n| (format!("backlog={n}"), with(&|o| o.backlog = Some(n))))
            .boxed(),
        "device" => ifname()
            .prop_map(move |d| (format!("device={d}"), with(&|o| o.device = Some(d.clone()))))
            .boxed(),
        "rcvbuf" => size()
            .prop_map(move |(t, n)| (format!("rcvbuf={t}"), with(&|o| o.rcvbuf = Some(n))))
            .boxed(),
        "sndbuf" => size()
            .prop_map(move |(t, n)| (format!("sndbuf={t}"), with(&|o| o.sndbuf = Some(n))))
            .boxed(),
        "steer" => Just(("steer=flow".to_owned(), with(&|o| o.steer_flow = true))).boxed(),
        "mode" => (edgy(0, 0o7777u32), prop::option::of(Just("0")))
            .prop_map(move |(m, zero)| {
                let zero = zero.unwrap_or_default();
                (format!("mode={zero}{m:o}"), with(&|o| o.mode = Some(m)))
            })
            .boxed(),
        "owner" => id()
            .prop_map(move |(t, id)| {
                (format!("owner={t}"), with(&|o| o.owner = Some(Uid::from_raw(id))))
            })
            .boxed(),
        "group" => id()
            .prop_map(move |(t, id)| {
                (format!("group={t}"), with(&|o| o.group = Some(Gid::from_raw(id))))
            })
            .boxed(),
        flag => boolean()
            .prop_map(move |(text, on)| {
                let item = match text {
                    Some(text) => format!("{flag}={text}"),
                    None => flag.to_owned(),
                };
                let options = with(&|o| match flag {
                    "v6only" => o.v6only = Some(on),
                    "reuseport" => o.reuseport = on,
                    "freebind" => o.freebind = on,
                    "nodelay" => o.nodelay = on,
                    "keepalive" => o.keepalive = on,
                    "nonblock" => o.nonblock = on,
                    other => panic!("no such option {other}"),
                });
                (item, options)
            })
            .boxed(),
    }
}

/// Adds what one option sets to the options set so far (each option is given once).
fn merge(into: &mut ListenOptions, from: ListenOptions) {
    into.name = into.name.take().or(from.name);
    into.backlog = into.backlog.or(from.backlog);
    into.v6only = into.v6only.or(from.v6only);
    into.reuseport |= from.reuseport;
    into.freebind |= from.freebind;
    into.device = into.device.take().or(from.device);
    into.nodelay |= from.nodelay;
    into.keepalive |= from.keepalive;
    into.rcvbuf = into.rcvbuf.or(from.rcvbuf);
    into.sndbuf = into.sndbuf.or(from.sndbuf);
    into.mode = into.mode.or(from.mode);
    into.owner = into.owner.or(from.owner);
    into.group = into.group.or(from.group);
    into.nonblock |= from.nonblock;
    into.steer_flow |= from.steer_flow;
}

/// A valid spec: an address, then any of the options that fit it, in any order, with valid
/// values; with the address and options it must parse to.
fn valid_spec() -> impl Strategy<Value = (String, Address, ListenOptions)> {
    address()
        .prop_flat_map(|(text, address)| {
            let names: Vec<&'static str> =
                OPTION_NAMES.iter().copied().filter(|name| fits(name, &address)).collect();
            let count = names.len();
            let options = prop::sample::subsequence(names, 0..=count)
                .prop_shuffle()
                .prop_flat_map(|names| names.into_iter().map(option).collect::<Vec<_>>());
            (Just((text, address)), options)
        })
        .prop_map(|((mut text, address), options)| {
            let mut want = ListenOptions::default();
            for (item, set) in options {
                text.push(',');
                text.push_str(&item);
                merge(&mut want, set);
            }
            (text, address, want)
        })
}

/// A valid address with one valid option that does not fit it.
fn misfit_spec() -> impl Strategy<Value = (String, &'static str)> {
    address().prop_flat_map(|(text, address)| {
        // Never empty: every kind of socket has an option that does not fit it.
        let names: Vec<&'static str> =
            OPTION_NAMES.iter().copied().filter(|name| !fits(name, &address)).collect();
        (Just(text), prop::sample::select(names)).prop_flat_map(|(text, name)| {
            option(name).prop_map(move |(item, _)| (format!("{text},{item}"), name))
        })
    })
}

/// An address made of the grammar's pieces, then options with names from the table and
/// values made of value pieces (or none).
fn shaped() -> impl Strategy<Value = String> {
    let value = prop_oneof![soup(VALUE_PIECES, 4), "[^,]{0,8}"];
    let option =
        (prop::sample::select(OPTION_NAMES), prop::option::of(value)).prop_map(|(name, value)| {
            match value {
                Some(value) => format!("{name}={value}"),
                None => name.to_owned(),
            }
        });
    (soup(PIECES, 8), prop::collection::vec(option, 0..5))
        .prop_map(|(address, options)| [vec![address], options].concat().join(","))
}

proptest! {
    #[test]
    fn arbitrary_strings(text in any::<String>()) {
        check(&text)?;
    }

    #[test]
    fn arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        check(&String::from_utf8_lossy(&bytes))?;
    }

    #[test]
    fn soups_of_spec_pieces(text in soup(PIECES, 16)) {
        check(&text)?;
    }

    #[test]
    fn addresses_with_options_from_the_table(text in shaped()) {
        check(&text)?;
    }

    #[test]
    fn valid_specs_mean_what_they_say((text, address, options) in valid_spec()) {
        let spec = match text.parse::<ListenSpec>() {
            Ok(spec) => spec,
            Err(e) => return Err(TestCaseError::fail(format!("refused: {e}"))),
        };
        prop_assert_eq!(&spec.address, &address, "{}", text);
        prop_assert_eq!(&spec.options, &options, "{}", text);
        check(&text)?;
    }

    #[test]
    fn an_option_that_does_not_fit_is_refused((text, name) in misfit_spec()) {
        let err = text.parse::<ListenSpec>().expect_err(&text);
        if name == "steer" && !text.starts_with("fd://") && !text.starts_with("systemd://") {
            // Its own message, which says what it is for.
            prop_assert_eq!(&err.reason, "steer=flow is for UDP sockets only", "{}", text);
            return Ok(());
        }
        prop_assert!(err.reason.contains(&format!("option '{name}'")), "{}: {}", text, err);
        prop_assert!(
            err.reason.contains("does not apply") || err.reason.contains("cannot be applied"),
            "{}: {}", text, err
        );
        check(&text)?;
    }
}

//! Fuzzing of every parser that reads input from outside sockhold: `--listen` specs
//! ([`crate::listen::ListenSpec`]), notify datagrams ([`crate::notify::NotifyMessage::parse`]),
//! control requests ([`crate::protocol::Request::parse`]) and the `DUR`, `SIG` and `--ready`
//! arguments ([`crate::cli`]), and the self-upgrade state ([`crate::upgrade::State`]), which a
//! program must read back exactly as it was written and refuse with one field more or less.
//!
//! The toolchain is stable and the crate has no library target, so these are proptest
//! properties rather than cargo-fuzz targets. Each parser gets three kinds of input: arbitrary
//! bytes and strings; a "soup" of the pieces its grammar is made of (prefixes, separators,
//! option names, huge numbers), so that random input gets past the first check; and generated
//! valid input whose meaning is known, with what the parser must make of it.
//!
//! Every property runs proptest's default 256 cases, or `PROPTEST_CASES`, so that `cargo test`
//! stays quick; the README shows a long session. A failure found here becomes a plain regression
//! test next to the parser's own tests; proptest's record of failing seeds
//! (`proptest-regressions/`) stays out of the repository.

use proptest::prelude::*;

/// A string of `pieces` (mostly) and arbitrary characters, so that random input is made of the
/// grammar's own words and reaches the parser's later checks.
fn soup(pieces: &'static [&'static str], max_pieces: usize) -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        6 => prop::sample::select(pieces).prop_map(str::to_owned),
        1 => any::<char>().prop_map(String::from),
        1 => "[ -~]{1,4}",
        1 => "[0-9]{1,30}",
    ];
    prop::collection::vec(piece, 0..max_pieces).prop_map(|pieces| pieces.concat())
}

/// A number from `lo` to `hi`, its two ends far more often than chance would pick them.
fn edgy<T>(lo: T, hi: T) -> impl Strategy<Value = T>
where
    T: Copy + std::fmt::Debug + 'static,
    std::ops::RangeInclusive<T>: Strategy<Value = T>,
{
    prop_oneof![1 => Just(lo), 1 => Just(hi), 6 => lo..=hi]
}

/// Bytes without a newline: one line's worth.
fn line_bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>().prop_map(|b| if b == b'\n' { b' ' } else { b }), 0..max)
}

/// `s` cut to at most `max` bytes, on a character boundary.
fn truncate(mut s: String, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
    s
}

mod listen {
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
        "sndbuf", "mode", "owner", "group", "nonblock", "root",
    ];

    /// Every option, as the README lists them.
    #[rustfmt::skip]
    const OPTION_NAMES: &[&str] = &[
        "name", "backlog", "v6only", "reuseport", "freebind", "device", "nodelay", "keepalive",
        "rcvbuf", "sndbuf", "mode", "owner", "group", "nonblock",
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
                prop_assert!(
                    shown.contains(&format!("'{text}'")),
                    "{} does not name the spec",
                    shown
                );
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
        Ok(())
    }

    fn is_inet(a: &Address) -> bool {
        matches!(a, Address::Inet { .. })
    }

    fn is_tcp(a: &Address) -> bool {
        matches!(a, Address::Inet { kind: SocketKind::Stream, .. })
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
                let name = "[a-zA-Z][a-zA-Z0-9_-]{0,10}(\\.[a-zA-Z0-9_-]{1,10}){0,3}"
                    .prop_map(HostGen::Name);
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
                    HostGen::Name(name) => {
                        (format!("{scheme}{name}:{port}"), Host::Name(name), None)
                    }
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
            edgy(3, i32::MAX)
                .prop_map(|fd| (format!("fd://{fd}"), Address::Adopted(Adopt::Fd(fd)))),
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
        prop_oneof![
            edgy(0, u32::MAX - 1).prop_map(|id| (id.to_string(), id)),
            Just(("root".into(), 0)),
        ]
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
        let option = (prop::sample::select(OPTION_NAMES), prop::option::of(value)).prop_map(
            |(name, value)| match value {
                Some(value) => format!("{name}={value}"),
                None => name.to_owned(),
            },
        );
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
            prop_assert!(err.reason.contains(&format!("option '{name}'")), "{}: {}", text, err);
            prop_assert!(
                err.reason.contains("does not apply") || err.reason.contains("cannot be applied"),
                "{}: {}", text, err
            );
            check(&text)?;
        }
    }
}

mod notify {
    use proptest::prelude::*;

    use super::line_bytes;
    use crate::notify::NotifyMessage;

    /// What one line must do to the parsed message.
    #[derive(Clone, Debug)]
    enum Effect {
        Nothing,
        Ready,
        Stopping,
        Reloading,
        Barrier,
        Status(String),
        Errno(Option<i32>),
        Watchdog,
        WatchdogTrigger,
        WatchdogUsec(Option<u64>),
        ExtendTimeout(Option<u64>),
    }

    /// Numbers of every size, and things that are not numbers, for the numeric assignments.
    fn number() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<u64>().prop_map(|n| n.to_string()),
            any::<i64>().prop_map(|n| n.to_string()),
            "[0-9]{19,80}",
            "-[0-9]{19,80}",
            Just(String::new()),
            "[ -~]{0,8}",
        ]
    }

    /// A line sockhold ignores: an sd_notify assignment it does not act on (with any number),
    /// an unknown key, a key in the wrong case or with spaces, no `=` at all, an empty line.
    fn ignored_line() -> impl Strategy<Value = Vec<u8>> {
        const UNUSED: &[&str] = &[
            "MAINPID",
            "MONOTONIC_USEC",
            "FDSTORE",
            "FDSTOREREMOVE",
            "FDNAME",
            "FDPOLL",
            "NOTIFYACCESS",
            "BUSERROR",
            "EXIT_STATUS",
            "X_SOCKHOLD",
        ];
        prop_oneof![
            (prop::sample::select(UNUSED), number())
                .prop_map(|(key, n)| format!("{key}={n}").into_bytes()),
            unknown_line(),
        ]
    }

    /// A line no sd_notify implementation knows: never a known key followed by `=`.
    fn unknown_line() -> impl Strategy<Value = Vec<u8>> {
        #[rustfmt::skip]
        const PREFIXES: &[&str] = &[
            "", "X_", "ready=1", " READY=1", "READY =1", "READY=1\r", "\0READY=1", "=1", "=",
            "READY", "STATUS", "Status=x", "ERRNO", "errno=1",
        ];
        // The rest has no '=', so a prefix without one stays a key no one knows.
        let rest = line_bytes(24).prop_map(|mut b| {
            b.retain(|&c| c != b'=');
            b
        });
        (prop::sample::select(PREFIXES), rest).prop_map(|(prefix, rest)| {
            let mut line = prefix.as_bytes().to_vec();
            line.extend(rest);
            line
        })
    }

    /// A line of any kind, with its effect.
    fn line() -> impl Strategy<Value = (Vec<u8>, Effect)> {
        const FLAGS: &[&str] = &["READY", "STOPPING", "RELOADING", "BARRIER"];
        let flag_value = prop_oneof![3 => Just(b"1".to_vec()), 1 => line_bytes(5)];
        prop_oneof![
            (prop::sample::select(FLAGS), flag_value).prop_map(|(key, value)| {
                let effect = match (key, value == b"1") {
                    (_, false) => Effect::Nothing,
                    ("READY", true) => Effect::Ready,
                    ("STOPPING", true) => Effect::Stopping,
                    ("RELOADING", true) => Effect::Reloading,
                    _ => Effect::Barrier,
                };
                ([key.as_bytes(), b"=", &value[..]].concat(), effect)
            }),
            line_bytes(40).prop_map(|value| {
                let status = String::from_utf8_lossy(&value).into_owned();
                ([&b"STATUS="[..], &value[..]].concat(), Effect::Status(status))
            }),
            number()
                .prop_map(|n| (format!("ERRNO={n}").into_bytes(), Effect::Errno(n.parse().ok()))),
            prop_oneof![Just("1"), Just("trigger"), Just("0"), Just("TRIGGER"), Just("")].prop_map(
                |v| {
                    let effect = match v {
                        "1" => Effect::Watchdog,
                        "trigger" => Effect::WatchdogTrigger,
                        _ => Effect::Nothing,
                    };
                    (format!("WATCHDOG={v}").into_bytes(), effect)
                }
            ),
            number().prop_map(|n| {
                (format!("WATCHDOG_USEC={n}").into_bytes(), Effect::WatchdogUsec(n.parse().ok()))
            }),
            number().prop_map(|n| {
                let effect = Effect::ExtendTimeout(n.parse().ok());
                (format!("EXTEND_TIMEOUT_USEC={n}").into_bytes(), effect)
            }),
            ignored_line().prop_map(|line| (line, Effect::Nothing)),
        ]
    }

    /// A datagram of such lines, with or without a final newline.
    fn datagram() -> impl Strategy<Value = (Vec<u8>, Vec<Effect>)> {
        (prop::collection::vec(line(), 0..20), any::<bool>()).prop_map(|(lines, newline)| {
            let (lines, effects): (Vec<_>, Vec<_>) = lines.into_iter().unzip();
            let mut bytes = lines.join(&b'\n');
            if newline {
                bytes.push(b'\n');
            }
            (bytes, effects)
        })
    }

    /// What must hold for any datagram, compared with a reading of the raw bytes.
    fn check(datagram: &[u8]) -> Result<NotifyMessage, TestCaseError> {
        let message = NotifyMessage::parse(datagram);
        let has_line = |line: &[u8]| datagram.split(|&b| b == b'\n').any(|l| l == line);
        prop_assert_eq!(message.ready, has_line(b"READY=1"));
        prop_assert_eq!(message.stopping, has_line(b"STOPPING=1"));
        prop_assert_eq!(message.reloading, has_line(b"RELOADING=1"));
        prop_assert_eq!(message.barrier, has_line(b"BARRIER=1"));
        if let Some(status) = &message.status {
            prop_assert!(!status.contains('\n'));
        }
        Ok(message)
    }

    #[rustfmt::skip]
    const NOTIFY_PIECES: &[&[u8]] = &[
        b"READY=1", b"READY", b"=", b"1", b"\n", b"\n\n", b"STATUS=", b"ERRNO=", b"MAINPID=",
        b"WATCHDOG_USEC=", b"EXTEND_TIMEOUT_USEC=", b"BARRIER=1", b"STOPPING=1", b"RELOADING=1",
        b"18446744073709551616", b"-9223372036854775809", b"\0", b"\xff", b"\xe2\x82", b"\xf0\x9f",
        b" ", b"\r",
    ];

    proptest! {
        #[test]
        fn arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..=4097)) {
            check(&bytes)?;
        }

        #[test]
        fn soups_of_assignments(
            bytes in prop::collection::vec(prop::sample::select(NOTIFY_PIECES), 0..40)
                .prop_map(|pieces| pieces.concat())
        ) {
            check(&bytes)?;
        }

        /// Each line does what it says: a flag is set by its `=1` anywhere in the datagram,
        /// STATUS and ERRNO are the last ones given, everything else changes nothing.
        #[test]
        fn every_line_does_what_it_says((bytes, effects) in datagram()) {
            let message = check(&bytes)?;
            let notes = message.notes();
            let mut want = NotifyMessage::default();
            for effect in effects {
                match effect {
                    Effect::Nothing => {}
                    Effect::Ready => want.ready = true,
                    Effect::Stopping => want.stopping = true,
                    Effect::Reloading => want.reloading = true,
                    Effect::Barrier => want.barrier = true,
                    Effect::Status(status) => want.status = Some(status),
                    Effect::Errno(errno) => want.errno = errno,
                    Effect::Watchdog => want.watchdog = true,
                    Effect::WatchdogTrigger => want.watchdog_trigger = true,
                    Effect::WatchdogUsec(usec) => want.watchdog_usec = usec,
                    Effect::ExtendTimeout(usec) => want.extend_timeout_usec = usec,
                }
            }
            prop_assert_eq!(message.ready, want.ready);
            prop_assert_eq!(message.stopping, want.stopping);
            prop_assert_eq!(message.reloading, want.reloading);
            prop_assert_eq!(message.barrier, want.barrier);
            prop_assert_eq!(message.status, want.status);
            prop_assert_eq!(message.errno, want.errno);
            prop_assert_eq!(message.watchdog, want.watchdog);
            prop_assert_eq!(message.watchdog_trigger, want.watchdog_trigger);
            prop_assert_eq!(message.watchdog_usec, want.watchdog_usec);
            prop_assert_eq!(message.extend_timeout_usec, want.extend_timeout_usec);
            // The log notes one line for each of STOPPING, RELOADING and ERRNO, in that order.
            let wanted = [want.stopping, want.reloading, want.errno.is_some()];
            prop_assert_eq!(notes.len(), wanted.iter().filter(|&&w| w).count());
            let mut notes = notes.iter();
            if want.stopping {
                prop_assert!(notes.next().is_some_and(|n| n.contains("STOPPING=1")));
            }
            if want.reloading {
                prop_assert!(notes.next().is_some_and(|n| n.contains("RELOADING=1")));
            }
            if let Some(errno) = want.errno {
                let errno_note = format!("(ERRNO={errno})");
                prop_assert!(notes.next().is_some_and(|n| n.ends_with(&errno_note)));
            }
        }

        /// Unknown lines anywhere in a datagram change nothing in it.
        #[test]
        fn unknown_lines_are_ignored(
            (bytes, _) in datagram(),
            unknown in prop::collection::vec((unknown_line(), any::<prop::sample::Index>()), 1..8),
        ) {
            let mut lines: Vec<Vec<u8>> =
                bytes.split(|&b| b == b'\n').map(<[u8]>::to_vec).collect();
            for (line, at) in unknown {
                let at = at.index(lines.len() + 1);
                lines.insert(at, line);
            }
            let mixed = lines.join(&b'\n');
            prop_assert_eq!(check(&mixed)?, NotifyMessage::parse(&bytes));
        }
    }
}

mod control {
    use crate::signals::Signal;
    use proptest::prelude::*;
    use serde_json::{Value, json};

    use crate::protocol::{Answer, Request};
    use crate::signals::parse_signal;
    use crate::signals::signal_name;

    /// What a request means, decided from the JSON value: the protocol in the README.
    fn meaning(value: &Value) -> Option<Request> {
        let object = value.as_object()?;
        let only = |allowed: &[&str]| object.keys().all(|k| allowed.contains(&k.as_str()));
        match object.get("cmd")?.as_str()? {
            "status" if only(&["cmd"]) => Some(Request::Status),
            "reload" if only(&["cmd"]) => Some(Request::Reload),
            "stop" if only(&["cmd"]) => Some(Request::Stop),
            "upgrade" if only(&["cmd"]) => Some(Request::Upgrade),
            "signal" if only(&["cmd", "signal"]) => {
                let text = match object.get("signal")? {
                    Value::String(name) => name.clone(),
                    Value::Number(n) => n.to_string(),
                    _ => return None,
                };
                parse_signal(&text).ok().map(|signal| Request::Signal { signal })
            }
            _ => None,
        }
    }

    /// What must hold for any line: a request exactly when the line is JSON meaning one, and
    /// otherwise an error that makes a well-formed one-line `{"ok":false,"error":...}` answer.
    fn check(line: &[u8]) -> Result<(), TestCaseError> {
        let parsed = Request::parse(line);
        let json = serde_json::from_slice::<Value>(line).ok();
        let meant = json.as_ref().and_then(meaning);
        prop_assert_eq!(parsed.as_ref().ok(), meant.as_ref());
        if let Err(error) = parsed {
            prop_assert!(!error.trim().is_empty(), "empty error for {:?}", line);
            let line = Answer::error(error.clone()).line();
            let answer = line.strip_suffix('\n').expect("an answer ends its line");
            prop_assert!(!answer.contains('\n'), "an answer is one line: {}", answer);
            let back: Value = serde_json::from_str(answer).expect("serde_json reads its own");
            prop_assert_eq!(back.as_object().map(|o| o.len()), Some(2), "{}", answer);
            prop_assert_eq!(&back["ok"], &Value::Bool(false));
            prop_assert_eq!(back["error"].as_str(), Some(error.as_str()));
            prop_assert_eq!(
                Answer::read(answer, &Request::Status).ok(),
                Some(Answer::Failed(error))
            );
        }
        Ok(())
    }

    #[rustfmt::skip]
    const WORDS: &[&str] = &[
        "status", "reload", "stop", "signal", "upgrade", "restart", "STATUS", "", " status",
        "status\n", "\0", "cmd", "USR1", "SIGUSR1", "usr1", "TERM", "KILL", "SIG", "9", "0", "65",
        "-1", "10.0", "1e3", "2147483648",
    ];

    fn word() -> impl Strategy<Value = String> {
        prop_oneof![3 => prop::sample::select(WORDS).prop_map(str::to_owned), 1 => any::<String>()]
    }

    fn key() -> impl Strategy<Value = String> {
        prop_oneof![
            3 => prop::sample::select(vec!["cmd", "signal", "x", "CMD", ""])
                .prop_map(str::to_owned),
            1 => any::<String>(),
        ]
    }

    fn leaf() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            (-70i64..70).prop_map(Value::from),
            any::<f64>()
                .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
            word().prop_map(Value::String),
        ]
    }

    /// Any JSON value, nested a few levels.
    fn json_value() -> impl Strategy<Value = Value> {
        leaf().prop_recursive(4, 64, 8, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
                prop::collection::vec((key(), inner), 0..8)
                    .prop_map(|fields| Value::Object(fields.into_iter().collect())),
            ]
        })
    }

    /// Objects shaped like requests: a `cmd`, perhaps a `signal`, perhaps more.
    fn request_like() -> impl Strategy<Value = Value> {
        (
            prop_oneof![3 => word().prop_map(Value::String), 1 => leaf()],
            prop::option::of(leaf()),
            prop::collection::vec((key(), leaf()), 0..2),
        )
            .prop_map(|(cmd, signal, extra)| {
                let mut object = serde_json::Map::new();
                for (key, value) in extra {
                    object.insert(key, value);
                }
                object.insert("cmd".into(), cmd);
                if let Some(signal) = signal {
                    object.insert("signal".into(), signal);
                }
                Value::Object(object)
            })
    }

    fn every_signal() -> Vec<Signal> {
        Signal::all()
    }

    /// A valid request, and how it is written: as `sockhold ctl` writes it, or by hand (signal
    /// as `SIGNAME`, lower case or a number; fields in either order; JSON whitespace around).
    fn written_request() -> impl Strategy<Value = (Request, String)> {
        let request = prop_oneof![
            Just(Request::Status),
            Just(Request::Reload),
            Just(Request::Stop),
            Just(Request::Upgrade),
            prop::sample::select(every_signal()).prop_map(|signal| Request::Signal { signal }),
        ];
        (request, 0..5u8, any::<bool>(), "[ \t\r]{0,2}").prop_map(|(request, form, swap, ws)| {
            let cmd = match request {
                Request::Status => "status",
                Request::Reload => "reload",
                Request::Stop => "stop",
                Request::Upgrade => "upgrade",
                Request::Signal { .. } => "signal",
            };
            let line = match (&request, form) {
                (Request::Signal { signal: s }, 0) => {
                    json!({ "cmd": "signal", "signal": signal_name(*s) }).to_string()
                }
                (Request::Signal { signal: s }, _) => {
                    let signal = match form {
                        1 => format!("\"SIG{s}\""),
                        2 => format!("\"{}\"", signal_name(*s).to_lowercase()),
                        3 => format!("\"{}\"", s.raw()),
                        _ => s.raw().to_string(),
                    };
                    let cmd = format!("{ws}\"cmd\"{ws}:{ws}\"signal\"{ws}");
                    let signal = format!("{ws}\"signal\"{ws}:{ws}{signal}{ws}");
                    let (first, second) = if swap { (signal, cmd) } else { (cmd, signal) };
                    format!("{ws}{{{first},{second}}}{ws}")
                }
                (_, 0) => json!({ "cmd": cmd }).to_string(),
                _ => format!("{ws}{{{ws}\"cmd\"{ws}:{ws}\"{cmd}\"{ws}}}{ws}"),
            };
            (request, line)
        })
    }

    #[rustfmt::skip]
    const JSON_PIECES: &[&str] = &[
        "{", "}", "[", "]", ":", ",", "\"", "\"cmd\"", "\"signal\"", "\"status\"", "\"reload\"",
        "\"stop\"", "\"upgrade\"", "\"signal\"", "\"USR1\"", "\"SIGTERM\"", "\"x\"", "10", "-0",
        "1e999", "1.5", "18446744073709551616", "null", "true", " ", "\t", "\n", "\\", "\\u0000",
        "\\ud800", "\0", "\u{feff}",
    ];

    proptest! {
        #[test]
        fn arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..=4096)) {
            check(&bytes)?;
        }

        #[test]
        fn arbitrary_strings(text in any::<String>()) {
            check(text.as_bytes())?;
        }

        #[test]
        fn soups_of_json_pieces(text in super::soup(JSON_PIECES, 24)) {
            check(text.as_bytes())?;
        }

        #[test]
        fn arbitrary_json_values(value in prop_oneof![json_value(), request_like()]) {
            check(value.to_string().as_bytes())?;
            check(serde_json::to_string_pretty(&value).expect("a Value serialises").as_bytes())?;
        }

        #[test]
        fn valid_requests_round_trip((request, line) in written_request()) {
            prop_assert_eq!(Request::parse(line.as_bytes()), Ok(request.clone()), "{}", line);
            // As `sockhold ctl` writes it: one line, read back as the same request.
            let written = request.line();
            prop_assert_eq!(written.matches('\n').count(), 1, "{}", written);
            prop_assert_eq!(Request::parse(written.trim_end().as_bytes()), Ok(request), "{}", written);
        }

        /// Nesting far deeper than serde_json's recursion limit is an error, not a stack overflow.
        #[test]
        fn deep_nesting(
            depth in 1usize..20_000,
            open in prop::sample::select(vec!["[", "{\"cmd\":", "{\"a\":["]),
        ) {
            check(open.repeat(depth).as_bytes())?;
        }
    }
}

mod cli {
    use std::time::Instant;

    use crate::signals::Signal;
    use proptest::prelude::*;

    use super::soup;
    use crate::cli::{MAX_DURATION, parse_duration, parse_ready};
    use crate::signals::{parse_signal, signal_name};
    use crate::supervisor::ReadyMode;

    #[rustfmt::skip]
    const DURATION_PIECES: &[&str] = &[
        "0", "1", "9", "10", "500", "100", "101", "3155760000", "3155760001", "584542046090",
        "9223372036854775807", "18446744073709551615", "18446744073709551616",
        "99999999999999999999999", "ns", "us", "µs", "ms", "s", "sec", "m", "min", "h", "hr", "d",
        "days", "w", "M", "month", "y", "years", " ", "\t", ".", "-", "+", "e", "_", "\0",
    ];

    /// Any duration accepted can be added to a deadline; a refused one is named in the error.
    fn check_duration(text: &str) -> Result<(), TestCaseError> {
        match parse_duration(text) {
            Ok(d) => {
                prop_assert!(
                    Instant::now().checked_add(d).is_some(),
                    "{:?} overflows a deadline",
                    d
                );
                prop_assert!(d <= MAX_DURATION, "{:?}", d);
            }
            Err(e) => prop_assert!(e.contains(&format!("'{}'", text.trim())), "{}", e),
        }
        Ok(())
    }

    /// Any signal accepted is a real one whose name reads back; a refused one is named.
    fn check_signal(text: &str) -> Result<(), TestCaseError> {
        match parse_signal(text) {
            Ok(signal) => prop_assert_eq!(parse_signal(&signal_name(signal)), Ok(signal)),
            Err(e) => {
                prop_assert!(e.contains(&format!("'{text}' is not a signal")), "{}", e);
            }
        }
        Ok(())
    }

    /// `notify` is only `notify`, a delay only `delay:DUR`, a probe keeps its path or words, and a
    /// refusal says why.
    fn check_ready(text: &str) -> Result<(), TestCaseError> {
        match parse_ready(text) {
            Ok(ReadyMode::Notify) => prop_assert_eq!(text, "notify"),
            Ok(ReadyMode::Delay(d)) => {
                let dur = text.strip_prefix("delay:");
                prop_assert!(dur.is_some(), "{} is not delay:", text);
                prop_assert_eq!(parse_duration(dur.expect("checked")), Ok(d));
                prop_assert!(d <= MAX_DURATION);
            }
            Ok(ReadyMode::Http(path)) => {
                prop_assert_eq!(text, format!("http:{path}"));
                prop_assert!(path.starts_with('/'), "{}", path);
                prop_assert!(
                    !path.chars().any(|c| c.is_ascii_whitespace() || c.is_ascii_control())
                );
            }
            Ok(ReadyMode::Exec(argv)) => {
                prop_assert!(text.starts_with("exec:"), "{}", text);
                prop_assert!(!argv.is_empty(), "{} gave no command", text);
            }
            Err(e) => prop_assert!(!e.trim().is_empty()),
        }
        Ok(())
    }

    proptest! {
        #[test]
        fn durations_from_arbitrary_strings(text in any::<String>()) {
            check_duration(&text)?;
        }

        #[test]
        fn durations_from_numbers_of_every_size(
            secs in any::<u64>(),
            unit in prop::sample::select(vec!["", "s", "ms", "m", "h", "d", "y"]),
        ) {
            check_duration(&format!("{secs}{unit}"))?;
        }

        #[test]
        fn durations_from_soups(text in soup(DURATION_PIECES, 8)) {
            check_duration(&text)?;
        }

        #[test]
        fn signals_from_arbitrary_strings(text in any::<String>()) {
            check_signal(&text)?;
        }

        #[test]
        fn signals_from_soups(text in soup(&[
            "SIG", "sig", "TERM", "term", "KILL", "USR1", "Usr2", "RTMIN", "+", "-", "0", "15",
            "64", "65", "2147483648", "4294967311", " ",
        ], 4)) {
            check_signal(&text)?;
        }

        #[test]
        fn every_signal_reads_in_every_spelling(
            signal in prop::sample::select(Signal::all()),
            upper in prop::collection::vec(any::<bool>(), 12),
        ) {
            let name = signal_name(signal);
            let mixed: String = name
                .chars()
                .zip(upper.iter().cycle())
                .map(|(c, &up)| if up { c } else { c.to_ascii_lowercase() })
                .collect();
            let number = signal.raw().to_string();
            let spellings =
                [name.clone(), format!("SIG{name}"), format!("sig{mixed}"), mixed, number];
            for text in spellings {
                prop_assert_eq!(parse_signal(&text), Ok(signal), "{}", text);
            }
        }

        #[test]
        fn ready_modes_from_soups(text in soup(&[
            "notify", "NOTIFY", "delay", "http", "exec", ":", "1s", "500ms", "18446744073709551615",
            "584542046090y", "/health", "true", " ",
        ], 5)) {
            check_ready(&text)?;
        }

        #[test]
        fn ready_modes_from_arbitrary_strings(text in any::<String>()) {
            check_ready(&text)?;
        }
    }
}

mod state {
    //! The self-upgrade state: arbitrary supervisor snapshots go through JSON unchanged, and a
    //! state with one field more or one field less, anywhere, is refused.

    use super::*;
    use crate::signals::Signal;
    use crate::supervisor::snapshot::{
        PurposeSnapshot, ReloadSnapshot, Snapshot, UnitSnapshot, UnitStateSnapshot,
    };
    use crate::upgrade::State;
    use serde_json::Value;

    fn unit_state() -> impl Strategy<Value = UnitStateSnapshot> {
        prop_oneof![
            (any::<i64>(), any::<Option<i64>>(), any::<Option<i64>>(), any::<Option<String>>())
                .prop_map(|(d, r, p, l)| UnitStateSnapshot::Starting {
                    ready_deadline_ns: d,
                    ready_at_ns: r,
                    probe_at_ns: p,
                    last_probe: l,
                }),
            any::<Option<i64>>().prop_map(|w| UnitStateSnapshot::Serving { watchdog_at_ns: w }),
            (any::<i64>(), prop::sample::select(Signal::all())).prop_map(|(k, signal)| {
                UnitStateSnapshot::Stopping { kill_at_ns: k, signal: signal.raw() }
            }),
            Just(UnitStateSnapshot::Killed {}),
        ]
    }

    fn unit() -> impl Strategy<Value = UnitSnapshot> {
        let purpose = prop::sample::select(vec![
            PurposeSnapshot::Initial,
            PurposeSnapshot::Reload,
            PurposeSnapshot::Restart,
        ]);
        (
            (any::<u64>(), any::<u64>(), 2..i32::MAX, purpose),
            (unit_state(), any::<i64>(), any::<Option<String>>()),
            (any::<Option<u64>>(), any::<bool>()),
        )
            .prop_map(
                |(
                    (key, generation, pid, purpose),
                    (state, since_ns, status),
                    (watchdog_ns, crashed),
                )| {
                    UnitSnapshot {
                        key,
                        generation,
                        pid,
                        purpose,
                        state,
                        since_ns,
                        status,
                        watchdog_ns,
                        crashed,
                    }
                },
            )
    }

    /// Any supervisor snapshot: any units, any bookkeeping.
    fn snapshot() -> impl Strategy<Value = Snapshot> {
        let reload = any::<Option<(u64, Option<u64>)>>().prop_map(|r| {
            r.map(|(generation, waiting_for)| ReloadSnapshot { generation, waiting_for })
        });
        (
            prop::collection::vec(unit(), 0..6),
            (any::<u64>(), any::<u64>(), reload, any::<bool>()),
            (any::<Option<i64>>(), any::<u64>(), any::<u32>(), any::<u64>(), any::<u64>()),
        )
            .prop_map(
                |(
                    units,
                    (next_unit, next_generation, reload, reload_pending),
                    (restart_at_ns, backoff_ns, failed_starts, restarts, retired),
                )| Snapshot {
                    units,
                    next_unit,
                    next_generation,
                    reload,
                    reload_pending,
                    restart_at_ns,
                    backoff_ns,
                    failed_starts,
                    restarts,
                    retired,
                },
            )
    }

    /// A whole state around an arbitrary snapshot.
    fn state() -> impl Strategy<Value = State> {
        (snapshot(), any::<i64>(), prop::collection::vec(any::<Vec<u8>>(), 0..4)).prop_map(
            |(supervisor, monotonic_ns, argv)| State {
                supervisor,
                monotonic_ns,
                argv,
                ..crate::upgrade::tests::sample()
            },
        )
    }

    /// The JSON pointer of every object in `value`, with its keys.
    fn objects(value: &Value, at: String, out: &mut Vec<(String, Vec<String>)>) {
        match value {
            Value::Object(map) => {
                out.push((at.clone(), map.keys().cloned().collect()));
                for (k, v) in map {
                    objects(v, format!("{at}/{k}"), out);
                }
            }
            Value::Array(items) => {
                for (i, v) in items.iter().enumerate() {
                    objects(v, format!("{at}/{i}"), out);
                }
            }
            _ => {}
        }
    }

    proptest! {
        #[test]
        fn every_state_reads_back_as_written(state in state()) {
            let json = state.to_json().map_err(TestCaseError::fail)?;
            prop_assert_eq!(State::parse(&json), Ok(state));
        }

        #[test]
        fn a_field_more_anywhere_is_refused(
            state in state(),
            pick in any::<prop::sample::Index>(),
            name in "[a-z_]{1,12}",
        ) {
            let mut value = serde_json::to_value(&state).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let mut found = Vec::new();
            objects(&value, String::new(), &mut found);
            let (at, keys) = pick.get(&found).clone();
            prop_assume!(!keys.contains(&name));
            value.pointer_mut(&at).and_then(Value::as_object_mut).expect("an object")
                .insert(name.clone(), Value::Null);
            let err = State::parse(value.to_string().as_bytes()).err().unwrap_or_default();
            let want = format!("unknown field `{name}`");
            prop_assert!(err.contains(&want), "{} at {:?}: {}", name, at, err);
        }

        #[test]
        fn a_field_less_anywhere_is_refused(
            state in state(),
            pick in any::<prop::sample::Index>(),
            key in any::<prop::sample::Index>(),
        ) {
            let mut value = serde_json::to_value(&state).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let mut found = Vec::new();
            objects(&value, String::new(), &mut found);
            let (at, keys) = pick.get(&found).clone();
            prop_assume!(!keys.is_empty());
            let name = key.get(&keys).clone();
            value.pointer_mut(&at).and_then(Value::as_object_mut).expect("an object").remove(&name);
            let err = State::parse(value.to_string().as_bytes()).err().unwrap_or_default();
            let want = format!("missing field `{name}`");
            prop_assert!(err.contains(&want), "{} at {:?}: {}", name, at, err);
        }
    }
}

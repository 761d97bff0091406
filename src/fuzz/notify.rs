//! Notify datagrams: arbitrary bytes never panic, and generated messages parse to the fields
//! a model of sd_notify's grammar says they carry (the fd store's `FDSTORE=1`,
//! `FDSTOREREMOVE=1`, `FDNAME=` and `FDPOLL=0` among them).

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
    FdStore,
    FdStoreRemove,
    FdName(String),
    FdNoPoll,
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
    const UNUSED: &[&str] =
        &["MAINPID", "MONOTONIC_USEC", "NOTIFYACCESS", "BUSERROR", "EXIT_STATUS", "X_SOCKHOLD"];
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
    const FLAGS: &[&str] =
        &["READY", "STOPPING", "RELOADING", "BARRIER", "FDSTORE", "FDSTOREREMOVE"];
    let flag_value = prop_oneof![3 => Just(b"1".to_vec()), 1 => line_bytes(5)];
    prop_oneof![
        (prop::sample::select(FLAGS), flag_value).prop_map(|(key, value)| {
            let effect = match (key, value == b"1") {
                (_, false) => Effect::Nothing,
                ("READY", true) => Effect::Ready,
                ("STOPPING", true) => Effect::Stopping,
                ("RELOADING", true) => Effect::Reloading,
                ("FDSTORE", true) => Effect::FdStore,
                ("FDSTOREREMOVE", true) => Effect::FdStoreRemove,
                _ => Effect::Barrier,
            };
            ([key.as_bytes(), b"=", &value[..]].concat(), effect)
        }),
        line_bytes(40).prop_map(|value| {
            let status = String::from_utf8_lossy(&value).into_owned();
            ([&b"STATUS="[..], &value[..]].concat(), Effect::Status(status))
        }),
        number().prop_map(|n| (format!("ERRNO={n}").into_bytes(), Effect::Errno(n.parse().ok()))),
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
        line_bytes(40).prop_map(|value| {
            let name = String::from_utf8_lossy(&value).into_owned();
            ([&b"FDNAME="[..], &value[..]].concat(), Effect::FdName(name))
        }),
        prop_oneof![Just("0"), Just("1"), Just(""), Just("00"), Just("no")].prop_map(|v| {
            let effect = if v == "0" { Effect::FdNoPoll } else { Effect::Nothing };
            (format!("FDPOLL={v}").into_bytes(), effect)
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
    prop_assert_eq!(message.fd_store, has_line(b"FDSTORE=1"));
    prop_assert_eq!(message.fd_store_remove, has_line(b"FDSTOREREMOVE=1"));
    prop_assert_eq!(message.fd_no_poll, has_line(b"FDPOLL=0"));
    // The first FDNAME= counts, as systemd reads it.
    let first_name = datagram
        .split(|&b| b == b'\n')
        .find_map(|l| l.strip_prefix(b"FDNAME="))
        .map(|v| String::from_utf8_lossy(v).into_owned());
    prop_assert_eq!(&message.fd_name, &first_name);
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
    b" ", b"\r", b"FDSTORE=1", b"FDSTOREREMOVE=1", b"FDNAME=", b"FDPOLL=0", b"conn-1", b":",
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
                Effect::FdStore => want.fd_store = true,
                Effect::FdStoreRemove => want.fd_store_remove = true,
                Effect::FdName(name) => {
                    want.fd_name.get_or_insert(name);
                }
                Effect::FdNoPoll => want.fd_no_poll = true,
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
        prop_assert_eq!(message.fd_store, want.fd_store);
        prop_assert_eq!(message.fd_store_remove, want.fd_store_remove);
        prop_assert_eq!(&message.fd_name, &want.fd_name);
        prop_assert_eq!(message.fd_no_poll, want.fd_no_poll);
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

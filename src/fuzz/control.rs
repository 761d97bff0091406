//! Control requests: arbitrary lines never panic, [`crate::protocol::Request::parse`] agrees
//! with an independent model of what a request means, and every request survives a round trip
//! through its wire form.

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
        prop_assert_eq!(Answer::read(answer, &Request::Status).ok(), Some(Answer::Failed(error)));
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

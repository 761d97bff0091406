//! The control protocol's wire types, both sides: the [`Request`] a client sends and the
//! [`Answer`] it gets back (with the [`Status`] it describes), as serde types whose JSON is the
//! protocol in the README and the man page, one object per line each way.
//!
//! The server ([`crate::control`]) reads requests with [`Request::parse`], which refuses a
//! duplicate key, an unknown command, a missing or unexpected field, and words each refusal as
//! the error answer a person reads. `sockhold ctl` ([`crate::ctl`]) writes requests with
//! [`Request::line`] and reads the answer to what it asked with [`Answer::read`]. This module
//! does no I/O and holds no state: it only says what a line means and how a value is written.

use serde::de::{self, Deserializer, IntoDeserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};
use serde_json::Value;

use crate::signals::Signal;
use crate::signals::parse_signal;

/// A request, one line from a client.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase", deny_unknown_fields)]
pub enum Request {
    /// `{"cmd":"status"}`
    #[serde(deserialize_with = "no_fields")]
    Status,
    /// `{"cmd":"reload"}`: answered when the reload succeeded or failed.
    #[serde(deserialize_with = "no_fields")]
    Reload,
    /// `{"cmd":"stop"}`
    #[serde(deserialize_with = "no_fields")]
    Stop,
    /// `{"cmd":"signal","signal":"USR1"}`: forwarded to the serving child. The signal is a name
    /// (`USR1`, `SIGUSR1`, `usr1`, `RTMIN+1`) or a number, as a string or a JSON number.
    Signal {
        /// The signal to send.
        #[serde(serialize_with = "write_signal", deserialize_with = "read_signal")]
        signal: Signal,
    },
    /// `{"cmd":"upgrade"}`
    #[serde(deserialize_with = "no_fields")]
    Upgrade,
}

/// The commands, in the order the refusal of an unknown one lists them.
const COMMANDS: &[&str] = &["status", "reload", "stop", "signal", "upgrade"];

/// What the `signal` field must look like.
const SIGNAL_SHAPE: &str = "\"signal\" must be a name like \"USR1\" or a number";

/// The rest of a request whose command takes no field: nothing. serde's derived code would let
/// any field through here (`deny_unknown_fields` does not reach a unit variant of an internally
/// tagged enum), and `{"cmd":"stop","signal":"TERM"}` is a mistake to report, not to act on.
fn no_fields<'de, D: Deserializer<'de>>(d: D) -> Result<(), D::Error> {
    struct Empty;
    impl<'de> Visitor<'de> for Empty {
        type Value = ();
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("no field but \"cmd\"")
        }
        fn visit_unit<E: de::Error>(self) -> Result<(), E> {
            Ok(())
        }
        fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
            match map.next_key::<String>()? {
                Some(field) => Err(de::Error::unknown_field(&field, &[])),
                None => Ok(()),
            }
        }
    }
    d.deserialize_any(Empty)
}

fn write_signal<S: Serializer>(signal: &Signal, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&signal.name())
}

fn read_signal<'de, D: Deserializer<'de>>(d: D) -> Result<Signal, D::Error> {
    struct SignalField;
    impl<'de> Visitor<'de> for SignalField {
        type Value = Signal;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a signal name or number")
        }
        fn visit_str<E: de::Error>(self, text: &str) -> Result<Signal, E> {
            parse_signal(text).map_err(E::custom)
        }
        fn visit_u64<E: de::Error>(self, n: u64) -> Result<Signal, E> {
            self.visit_str(&n.to_string())
        }
        fn visit_i64<E: de::Error>(self, n: i64) -> Result<Signal, E> {
            self.visit_str(&n.to_string())
        }
        fn visit_f64<E: de::Error>(self, n: f64) -> Result<Signal, E> {
            // As JSON writes it (`10.0`, `1000.0`): not a signal number, and the error says so.
            let text =
                serde_json::Number::from_f64(n).map_or_else(|| n.to_string(), |n| n.to_string());
            self.visit_str(&text)
        }
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<Signal, E> {
            Err(E::custom(SIGNAL_SHAPE))
        }
        fn visit_unit<E: de::Error>(self) -> Result<Signal, E> {
            Err(E::custom(SIGNAL_SHAPE))
        }
        fn visit_seq<A: de::SeqAccess<'de>>(self, _: A) -> Result<Signal, A::Error> {
            Err(de::Error::custom(SIGNAL_SHAPE))
        }
        fn visit_map<A: de::MapAccess<'de>>(self, _: A) -> Result<Signal, A::Error> {
            Err(de::Error::custom(SIGNAL_SHAPE))
        }
    }
    d.deserialize_any(SignalField)
}

impl Request {
    /// Parses one request line (without its newline). The error is the answer's `error` text.
    pub fn parse(line: &[u8]) -> Result<Request, String> {
        let value: Value =
            serde_json::from_slice(line).map_err(|e| format!("invalid JSON: {e}"))?;
        let Value::Object(object) = value else {
            return Err("a request must be a JSON object".into());
        };
        // serde_json keeps the last of two equal keys: `{"cmd":"status","cmd":"stop"}` would
        // read as a stop to sockhold and as a status to whatever filtered it on the way.
        if let Ok(FirstDuplicate(Some(key))) = serde_json::from_slice(line) {
            return Err(format!("duplicate key \"{key}\" in request"));
        }
        let cmd = object.get("cmd").and_then(Value::as_str).unwrap_or_default().to_owned();
        let fields = de::value::MapDeserializer::new(object.into_iter().map(|(k, v)| (k, Json(v))));
        Request::deserialize(fields).map_err(|refusal| match refusal {
            Refusal::MissingField("cmd") => "a request needs \"cmd\"".to_owned(),
            Refusal::MissingField(field) => format!("\"{cmd}\" needs a \"{field}\" field"),
            Refusal::UnknownCommand(other) => {
                format!("unknown command \"{other}\" (known: {})", COMMANDS.join(", "))
            }
            Refusal::UnknownField(field) => format!("unexpected field \"{field}\" for \"{cmd}\""),
            Refusal::CommandNotText => "\"cmd\" must be a string".to_owned(),
            Refusal::Other(message) => message,
        })
    }

    /// The request as `sockhold ctl` sends it, newline included.
    pub fn line(&self) -> String {
        let mut line = serde_json::to_string(self).expect("a request serialises");
        line.push('\n');
        line
    }
}

/// Why a request was refused, as serde's derived code reports it; [`Request::parse`] words it
/// for the person who sent it (it knows which command the request named).
#[derive(Debug)]
enum Refusal {
    MissingField(&'static str),
    UnknownCommand(String),
    UnknownField(String),
    CommandNotText,
    Other(String),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "{self:?}")
    }
}

impl std::error::Error for Refusal {}

impl de::Error for Refusal {
    fn custom<T: std::fmt::Display>(message: T) -> Self {
        Refusal::Other(message.to_string())
    }
    fn missing_field(field: &'static str) -> Self {
        Refusal::MissingField(field)
    }
    fn unknown_variant(variant: &str, _expected: &'static [&'static str]) -> Self {
        Refusal::UnknownCommand(variant.to_owned())
    }
    fn unknown_field(field: &str, _expected: &'static [&'static str]) -> Self {
        Refusal::UnknownField(field.to_owned())
    }
}

/// A parsed JSON value read by serde's derived code with [`Refusal`] as its error, so that a
/// refusal keeps its kind (serde_json's own deserializer would turn it into text).
struct Json(Value);

impl<'de> IntoDeserializer<'de, Refusal> for Json {
    type Deserializer = Json;
    fn into_deserializer(self) -> Json {
        self
    }
}

impl<'de> Deserializer<'de> for Json {
    type Error = Refusal;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Refusal> {
        match self.0 {
            Value::Null => visitor.visit_unit(),
            Value::Bool(b) => visitor.visit_bool(b),
            Value::Number(n) => match (n.as_u64(), n.as_i64(), n.as_f64()) {
                (Some(u), _, _) => visitor.visit_u64(u),
                (None, Some(i), _) => visitor.visit_i64(i),
                (None, None, f) => visitor.visit_f64(f.unwrap_or(f64::NAN)),
            },
            Value::String(s) => visitor.visit_string(s),
            Value::Array(items) => {
                let mut seq = de::value::SeqDeserializer::new(items.into_iter().map(Json));
                let value = visitor.visit_seq(&mut seq)?;
                seq.end()?;
                Ok(value)
            }
            Value::Object(fields) => {
                let mut map =
                    de::value::MapDeserializer::new(fields.into_iter().map(|(k, v)| (k, Json(v))));
                let value = visitor.visit_map(&mut map)?;
                map.end()?;
                Ok(value)
            }
        }
    }

    /// Only the `cmd` value is read as an identifier (the other keys are object keys): a
    /// command is named by its string, never by a variant's number or bytes.
    fn deserialize_identifier<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Refusal> {
        match self.0 {
            Value::String(s) => visitor.visit_string(s),
            _ => Err(Refusal::CommandNotText),
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Refusal> {
        match self.0 {
            Value::Null => visitor.visit_none(),
            _ => visitor.visit_some(self),
        }
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        unit unit_struct newtype_struct seq tuple tuple_struct map struct enum ignored_any
    }
}

/// The first key a JSON object repeats, if any (its values are skipped, not kept).
struct FirstDuplicate(Option<String>);

impl<'de> Deserialize<'de> for FirstDuplicate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Keys;
        impl<'de> Visitor<'de> for Keys {
            type Value = FirstDuplicate;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut seen = std::collections::BTreeSet::new();
                let mut duplicate = None;
                while let Some(key) = map.next_key::<String>()? {
                    map.next_value::<de::IgnoredAny>()?;
                    if !seen.insert(key.clone()) && duplicate.is_none() {
                        duplicate = Some(key);
                    }
                }
                Ok(FirstDuplicate(duplicate))
            }
        }
        d.deserialize_map(Keys)
    }
}

/// An answer, one line to a client: `{"ok":false,"error":"..."}`, or `{"ok":true,...}` with
/// what the request asked for.
#[derive(Clone, Debug, PartialEq)]
pub enum Answer {
    /// `{"ok":false,"error":"..."}`: the request was refused or what it asked for failed.
    Failed(String),
    /// `{"ok":true}`: the answer to `stop`.
    Done,
    /// The answer to `status`.
    Status(Box<Status>),
    /// The answer to `reload`, once the reload succeeded.
    Reloaded(Reloaded),
    /// The answer to `signal`.
    Signalled(Signalled),
    /// The answer to `upgrade`, written by the new program.
    Upgraded(Upgraded),
}

/// An answer on the wire: `ok` first, then the fields of what it carries.
#[derive(Serialize)]
struct Wire<'a, T: Serialize> {
    ok: bool,
    #[serde(flatten)]
    body: &'a T,
}

/// The body of a failure.
#[derive(Serialize, Deserialize)]
struct Failure<'a> {
    error: &'a str,
}

/// The body of `{"ok":true}`.
#[derive(Serialize)]
struct Nothing {}

impl Serialize for Answer {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Answer::Failed(error) => Wire { ok: false, body: &Failure { error } }.serialize(s),
            Answer::Done => Wire { ok: true, body: &Nothing {} }.serialize(s),
            Answer::Status(status) => Wire { ok: true, body: status.as_ref() }.serialize(s),
            Answer::Reloaded(reloaded) => Wire { ok: true, body: reloaded }.serialize(s),
            Answer::Signalled(signalled) => Wire { ok: true, body: signalled }.serialize(s),
            Answer::Upgraded(upgraded) => Wire { ok: true, body: upgraded }.serialize(s),
        }
    }
}

/// What every answer says first.
#[derive(Deserialize)]
struct Outcome {
    ok: bool,
    #[serde(default)]
    error: Option<String>,
}

impl Answer {
    /// A failure answer.
    pub fn error(message: impl Into<String>) -> Answer {
        Answer::Failed(message.into())
    }

    /// The answer as sent, newline included.
    pub fn line(&self) -> String {
        let mut line = serde_json::to_string(self).expect("an answer serialises");
        line.push('\n');
        line
    }

    /// Reads the answer to `request` from one line. A failure needs no more than `"ok":false`
    /// (its `error` may be missing); a success must carry what `request` asked for.
    pub fn read(line: &str, request: &Request) -> Result<Answer, serde_json::Error> {
        let outcome: Outcome = serde_json::from_str(line)?;
        if !outcome.ok {
            let error =
                outcome.error.unwrap_or_else(|| "sockhold answered without a reason".into());
            return Ok(Answer::Failed(error));
        }
        Ok(match request {
            Request::Status => Answer::Status(Box::new(serde_json::from_str(line)?)),
            Request::Reload => Answer::Reloaded(serde_json::from_str(line)?),
            Request::Stop => Answer::Done,
            Request::Signal { .. } => Answer::Signalled(serde_json::from_str(line)?),
            Request::Upgrade => Answer::Upgraded(serde_json::from_str(line)?),
        })
    }
}

/// A reload's answer: the generation that now serves, and its pid, or what the reload meant
/// when there is no child to name.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Reloaded {
    /// The generation the reload started (`null` with `--lazy` before the first connection).
    pub generation: Option<u64>,
    /// The serving child's pid (`null` if none serves by the time of the answer); absent when
    /// `message` explains instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<Option<i32>>,
    /// What the reload meant, when there is no serving child to name (`--lazy` before the first
    /// connection, `--accept`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl Reloaded {
    /// Generation `generation` serves, with `pid` as its child.
    pub fn serving(generation: Option<u64>, pid: Option<i32>) -> Reloaded {
        Reloaded { generation, pid: Some(pid), message: None }
    }

    /// No child to name: `message` says what the reload meant.
    pub fn explained(generation: Option<u64>, message: impl Into<String>) -> Reloaded {
        Reloaded { generation, pid: None, message: Some(message.into()) }
    }
}

/// The answer to `signal`: the serving children it was sent to, `pid` the first of them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signalled {
    /// The first serving child.
    pub pid: i32,
    /// Every serving child.
    pub pids: Vec<i32>,
}

/// The answer to `upgrade`: the program that now runs, in the same process.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Upgraded {
    /// sockhold's pid, unchanged.
    pub pid: u32,
    /// The new program's version.
    pub version: String,
    /// The file it was executed from.
    pub binary: String,
}

/// The answer to `status`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// sockhold's pid.
    pub pid: u32,
    /// sockhold's version.
    pub version: String,
    /// The instance name (`--name`).
    pub name: String,
    /// When sockhold started (RFC 3339, seconds).
    pub started: String,
    /// The listening sockets, in the order the child gets them.
    pub listeners: Vec<Listener>,
    /// Every generation alive, oldest first.
    pub generations: Vec<Generation>,
    /// Restarts after a crash so far.
    pub restarts: u64,
    /// The last reload's outcome, `null` before the first.
    pub last_reload: Option<LastReload>,
    /// Self-upgrades (missing from an older sockhold's answer).
    #[serde(default)]
    pub upgrades: Upgrades,
    /// With `--fd-store`: the fd store; absent when it is off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fd_store: Option<FdStoreStatus>,
}

/// The fd store (`--fd-store`) in [`Status`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FdStoreStatus {
    /// The most it holds.
    pub max: usize,
    /// The stored fds' names, newest first: their order after the listeners in the next
    /// generation.
    pub names: Vec<String>,
}

/// One listening socket in [`Status`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listener {
    /// Its fd in the child (3 and up).
    pub fd: usize,
    /// Its name in `LISTEN_FDNAMES`.
    pub name: String,
    /// Its address as bound.
    pub address: String,
}

/// One generation in [`Status`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Generation {
    /// Its number.
    pub id: u64,
    /// Its processes' pids (those forked).
    pub pids: Vec<i32>,
    /// The most alive of its workers' states: `serving`, `starting`, `stopping` or `killed`.
    pub state: String,
    /// When its first worker entered its state (RFC 3339, seconds).
    pub since: String,
    /// The last `STATUS=` it sent, `null` if none.
    pub status: Option<String>,
    /// Its processes, one per worker (missing from an older sockhold's answer).
    #[serde(default)]
    pub workers: Vec<Worker>,
    /// With a `steer=flow` listener: the flows it owns over every steered listener; `null`
    /// without one (and missing from an older sockhold's answer).
    #[serde(default)]
    pub flows: Option<usize>,
}

/// One process of a [`Generation`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Worker {
    /// Its pid, `null` before it is forked.
    pub pid: Option<i32>,
    /// Its state.
    pub state: String,
    /// When it entered that state (RFC 3339, seconds).
    pub since: String,
}

/// The last reload's outcome in [`Status`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastReload {
    /// Whether it succeeded.
    pub ok: bool,
    /// The generation it started.
    pub generation: u64,
    /// Why it failed; absent when it succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// When it ended (RFC 3339, seconds).
    pub at: String,
}

impl LastReload {
    /// The outcome `result` of the reload that started `generation`, ended at `at`.
    pub fn new(generation: u64, result: &Result<(), String>, at: String) -> LastReload {
        LastReload { ok: result.is_ok(), generation, error: result.clone().err(), at }
    }
}

/// Self-upgrades in [`Status`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Upgrades {
    /// Upgrades that succeeded.
    pub count: u64,
    /// The last upgrade's outcome, `null` before the first.
    pub last: Option<LastUpgrade>,
}

/// The last upgrade's outcome in [`Upgrades`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastUpgrade {
    /// Whether it succeeded.
    pub ok: bool,
    /// The file executed; absent when it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub binary: Option<String>,
    /// The version that took over; absent when it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Why it failed; absent when it succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// When it ended (RFC 3339, seconds).
    pub at: String,
}

impl LastUpgrade {
    /// `version` from `binary` took over at `at`.
    pub fn succeeded(binary: &str, version: &str, at: String) -> LastUpgrade {
        LastUpgrade {
            ok: true,
            binary: Some(binary.to_owned()),
            version: Some(version.to_owned()),
            error: None,
            at,
        }
    }

    /// The upgrade failed at `at` because of `reason`.
    pub fn failed(reason: &str, at: String) -> LastUpgrade {
        LastUpgrade { ok: false, binary: None, version: None, error: Some(reason.to_owned()), at }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_request_round_trips_as_ctl_writes_it() {
        let requests = [
            (Request::Status, r#"{"cmd":"status"}"#),
            (Request::Reload, r#"{"cmd":"reload"}"#),
            (Request::Stop, r#"{"cmd":"stop"}"#),
            (Request::Upgrade, r#"{"cmd":"upgrade"}"#),
            (Request::Signal { signal: Signal::SIGUSR1 }, r#"{"cmd":"signal","signal":"USR1"}"#),
            (Request::Signal { signal: Signal::SIGHUP }, r#"{"cmd":"signal","signal":"HUP"}"#),
        ];
        for (request, wire) in requests {
            assert_eq!(request.line(), format!("{wire}\n"));
            assert_eq!(Request::parse(wire.as_bytes()), Ok(request));
        }
        for signal in Signal::all() {
            let request = Request::Signal { signal };
            let line = request.line();
            assert_eq!(Request::parse(line.trim_end().as_bytes()), Ok(request), "{line}");
        }
    }

    #[test]
    fn signals_are_names_or_numbers() {
        for (line, signal) in [
            (r#"{"cmd":"signal","signal":"SIGTERM"}"#, Signal::SIGTERM),
            (r#"{"cmd":"signal","signal":"term"}"#, Signal::SIGTERM),
            (r#"{"cmd":"signal","signal":"15"}"#, Signal::SIGTERM),
            (r#"{"cmd":"signal","signal":15}"#, Signal::SIGTERM),
        ] {
            assert_eq!(Request::parse(line.as_bytes()), Ok(Request::Signal { signal }), "{line}");
        }
    }

    #[test]
    fn refusals_name_what_is_wrong() {
        let bad = [
            ("{", "invalid JSON: EOF while parsing an object at line 1 column 1"),
            ("[]", "a request must be a JSON object"),
            ("{}", "a request needs \"cmd\""),
            (r#"{"signal":"USR1"}"#, "a request needs \"cmd\""),
            (r#"{"cmd":null}"#, "\"cmd\" must be a string"),
            (r#"{"cmd":0}"#, "\"cmd\" must be a string"),
            (r#"{"cmd":["status"]}"#, "\"cmd\" must be a string"),
            (
                r#"{"cmd":"Status"}"#,
                "unknown command \"Status\" (known: status, reload, stop, signal, upgrade)",
            ),
            (r#"{"cmd":"status","x":1}"#, "unexpected field \"x\" for \"status\""),
            (r#"{"cmd":"stop","signal":"TERM"}"#, "unexpected field \"signal\" for \"stop\""),
            (
                r#"{"cmd":"upgrade","binary":"/bin/sh"}"#,
                "unexpected field \"binary\" for \"upgrade\"",
            ),
            (r#"{"cmd":"signal","signal":"USR1","x":1}"#, "unexpected field \"x\" for \"signal\""),
            (r#"{"cmd":"signal"}"#, "\"signal\" needs a \"signal\" field"),
            (r#"{"cmd":"signal","signal":null}"#, SIGNAL_SHAPE),
            (r#"{"cmd":"signal","signal":true}"#, SIGNAL_SHAPE),
            (r#"{"cmd":"signal","signal":{"name":"USR1"}}"#, SIGNAL_SHAPE),
            (r#"{"cmd":"signal","signal":"NOPE"}"#, "'NOPE' is not a signal"),
            (r#"{"cmd":"signal","signal":10.0}"#, "'10.0' is not a signal"),
            (r#"{"cmd":"signal","signal":-1}"#, "'-1' is not a signal"),
            (r#"{"cmd":"status","cmd":"stop"}"#, "duplicate key \"cmd\" in request"),
            (r#"{"cmd":"signal","signal":"HUP","signal":"KILL"}"#, "duplicate key \"signal\""),
        ];
        for (line, want) in bad {
            let err = Request::parse(line.as_bytes()).unwrap_err();
            assert!(err.contains(want), "{line}: {err:?} does not say {want:?}");
        }
    }

    /// The exact text of every kind of answer: what the README and the man page show, and what
    /// scripts reading the socket rely on.
    #[test]
    fn answers_on_the_wire() {
        let status = Status {
            pid: 10,
            version: "0.1.0".into(),
            name: "web".into(),
            started: "T0".into(),
            listeners: vec![Listener { fd: 3, name: "web".into(), address: "127.0.0.1:80".into() }],
            generations: vec![Generation {
                id: 2,
                pids: vec![22],
                state: "serving".into(),
                since: "T1".into(),
                status: None,
                workers: vec![Worker {
                    pid: Some(22),
                    state: "serving".into(),
                    since: "T1".into(),
                }],
                flows: None,
            }],
            restarts: 0,
            last_reload: None,
            upgrades: Upgrades::default(),
            fd_store: None,
        };
        let mut reloaded = status.clone();
        reloaded.last_reload = Some(LastReload::new(2, &Ok(()), "T2".into()));
        reloaded.upgrades = Upgrades {
            count: 1,
            last: Some(LastUpgrade::succeeded("/usr/bin/sockhold", "0.2.0", "T3".into())),
        };
        let mut steered = status.clone();
        steered.generations[0].flows = Some(7);
        let mut stored = status.clone();
        stored.fd_store =
            Some(FdStoreStatus { max: 4, names: vec!["conn-2".into(), "conn-1".into()] });
        let mut failed = status.clone();
        failed.generations.clear();
        failed.last_reload = Some(LastReload::new(3, &Err("exit status 3".into()), "T4".into()));
        failed.upgrades.last = Some(LastUpgrade::failed("no such file", "T5".into()));
        let answers = [
            (Answer::error("request timed out"), r#"{"ok":false,"error":"request timed out"}"#),
            (Answer::Done, r#"{"ok":true}"#),
            (
                Answer::Reloaded(Reloaded::serving(Some(3), Some(33))),
                r#"{"ok":true,"generation":3,"pid":33}"#,
            ),
            (
                Answer::Reloaded(Reloaded::serving(Some(3), None)),
                r#"{"ok":true,"generation":3,"pid":null}"#,
            ),
            (
                Answer::Reloaded(Reloaded::explained(None, "no child started yet")),
                r#"{"ok":true,"generation":null,"message":"no child started yet"}"#,
            ),
            (
                Answer::Reloaded(Reloaded::explained(Some(4), "--accept: ...")),
                r#"{"ok":true,"generation":4,"message":"--accept: ..."}"#,
            ),
            (
                Answer::Signalled(Signalled { pid: 5, pids: vec![5, 6] }),
                r#"{"ok":true,"pid":5,"pids":[5,6]}"#,
            ),
            (
                Answer::Upgraded(Upgraded { pid: 1, version: "0.2.0".into(), binary: "/b".into() }),
                r#"{"ok":true,"pid":1,"version":"0.2.0","binary":"/b"}"#,
            ),
            (
                Answer::Status(Box::new(status)),
                concat!(
                    r#"{"ok":true,"pid":10,"version":"0.1.0","name":"web","started":"T0","#,
                    r#""listeners":[{"fd":3,"name":"web","address":"127.0.0.1:80"}],"#,
                    r#""generations":[{"id":2,"pids":[22],"state":"serving","since":"T1","#,
                    r#""status":null,"workers":[{"pid":22,"state":"serving","since":"T1"}],"flows":null}],"#,
                    r#""restarts":0,"last_reload":null,"upgrades":{"count":0,"last":null}}"#
                ),
            ),
            (
                Answer::Status(Box::new(steered)),
                concat!(
                    r#"{"ok":true,"pid":10,"version":"0.1.0","name":"web","started":"T0","#,
                    r#""listeners":[{"fd":3,"name":"web","address":"127.0.0.1:80"}],"#,
                    r#""generations":[{"id":2,"pids":[22],"state":"serving","since":"T1","#,
                    r#""status":null,"workers":[{"pid":22,"state":"serving","since":"T1"}],"flows":7}],"#,
                    r#""restarts":0,"last_reload":null,"upgrades":{"count":0,"last":null}}"#
                ),
            ),
            (
                Answer::Status(Box::new(stored)),
                concat!(
                    r#"{"ok":true,"pid":10,"version":"0.1.0","name":"web","started":"T0","#,
                    r#""listeners":[{"fd":3,"name":"web","address":"127.0.0.1:80"}],"#,
                    r#""generations":[{"id":2,"pids":[22],"state":"serving","since":"T1","#,
                    r#""status":null,"workers":[{"pid":22,"state":"serving","since":"T1"}],"flows":null}],"#,
                    r#""restarts":0,"last_reload":null,"upgrades":{"count":0,"last":null},"#,
                    r#""fd_store":{"max":4,"names":["conn-2","conn-1"]}}"#
                ),
            ),
            (
                Answer::Status(Box::new(reloaded)),
                concat!(
                    r#"{"ok":true,"pid":10,"version":"0.1.0","name":"web","started":"T0","#,
                    r#""listeners":[{"fd":3,"name":"web","address":"127.0.0.1:80"}],"#,
                    r#""generations":[{"id":2,"pids":[22],"state":"serving","since":"T1","#,
                    r#""status":null,"workers":[{"pid":22,"state":"serving","since":"T1"}],"flows":null}],"#,
                    r#""restarts":0,"last_reload":{"ok":true,"generation":2,"at":"T2"},"#,
                    r#""upgrades":{"count":1,"last":{"ok":true,"binary":"/usr/bin/sockhold","#,
                    r#""version":"0.2.0","at":"T3"}}}"#
                ),
            ),
            (
                Answer::Status(Box::new(failed)),
                concat!(
                    r#"{"ok":true,"pid":10,"version":"0.1.0","name":"web","started":"T0","#,
                    r#""listeners":[{"fd":3,"name":"web","address":"127.0.0.1:80"}],"#,
                    r#""generations":[],"restarts":0,"#,
                    r#""last_reload":{"ok":false,"generation":3,"error":"exit status 3","at":"T4"},"#,
                    r#""upgrades":{"count":0,"last":{"ok":false,"error":"no such file","at":"T5"}}}"#
                ),
            ),
        ];
        for (answer, wire) in answers {
            assert_eq!(answer.line(), format!("{wire}\n"));
            // And ctl reads it back as it was (a request of the kind that gets this answer).
            let asked = match &answer {
                Answer::Failed(_) | Answer::Status(_) => Request::Status,
                Answer::Done => Request::Stop,
                Answer::Reloaded(_) => Request::Reload,
                Answer::Signalled(_) => Request::Signal { signal: Signal::SIGHUP },
                Answer::Upgraded(_) => Request::Upgrade,
            };
            let back = Answer::read(wire, &asked).unwrap_or_else(|e| panic!("{wire}: {e}"));
            // `"pid":null` reads as no pid: the same for ctl, which names none either way.
            match (&answer, &back) {
                (Answer::Reloaded(sent), Answer::Reloaded(read)) if sent.pid == Some(None) => {
                    assert_eq!(read.pid, None);
                    assert_eq!(read.generation, sent.generation);
                }
                _ => assert_eq!(back, answer, "{wire}"),
            }
        }
    }

    #[test]
    fn answers_that_do_not_fit_the_request_are_refused() {
        // A failure needs only "ok": false; its reason may be missing.
        assert_eq!(
            Answer::read(r#"{"ok":false}"#, &Request::Reload).unwrap(),
            Answer::Failed("sockhold answered without a reason".into())
        );
        for (line, asked) in [
            ("", Request::Status),
            ("[]", Request::Status),
            (r#"{"error":"x"}"#, Request::Stop),
            (r#"{"ok":"yes"}"#, Request::Stop),
            (r#"{"ok":true}"#, Request::Status),
            (r#"{"ok":true,"generation":"3"}"#, Request::Reload),
            (r#"{"ok":true,"pid":5}"#, Request::Signal { signal: Signal::SIGHUP }),
            (r#"{"ok":true,"pid":1,"version":"0.2.0"}"#, Request::Upgrade),
        ] {
            assert!(Answer::read(line, &asked).is_err(), "{line} read as an answer to {asked:?}");
        }
    }
}

//! Metrics (`--metrics ADDR`): what sockhold counts, the Prometheus text exposition format
//! (version 0.0.4) it renders them in, and the small part of HTTP/1.x a scrape needs.
//!
//! It owns the counters that outlive a reload and a self-upgrade ([`Counters`], handed over as
//! [`Handover`]), the text renderer ([`render`]), the parser of a scrape's request head
//! ([`parse_request`]) and the answers ([`response`]). All of it is pure: no syscalls, no clock
//! reads; the event loop passes the times in. The socket, its clients and their deadlines are
//! [`endpoint`]'s.
//!
//! It must not decide anything: the event loop feeds it outcomes it already learned.

pub mod endpoint;

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

/// Upper bounds (seconds) of the reload duration histogram's buckets, `+Inf` aside: from a
/// `--ready notify` child that is ready at once to the default `--ready-timeout` (60 s) and
/// beyond.
pub const RELOAD_BUCKETS: [f64; 12] =
    [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0];

/// Where `--metrics` serves: a TCP address, or a Unix socket path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Addr {
    /// `IP:PORT` (`127.0.0.1:9101`, `[::1]:9101`).
    Tcp(std::net::SocketAddr),
    /// A path with a `/` in it (`/run/app/metrics.sock`).
    Unix(std::path::PathBuf),
}

impl std::str::FromStr for Addr {
    type Err = String;

    fn from_str(text: &str) -> Result<Addr, String> {
        if let Ok(addr) = text.parse() {
            return Ok(Addr::Tcp(addr));
        }
        if text.contains('/') {
            if text.bytes().any(|b| b == 0) {
                return Err(format!("invalid metrics address {text:?}: a path cannot hold NUL"));
            }
            return Ok(Addr::Unix(text.into()));
        }
        Err(format!(
            "invalid metrics address '{text}': expected IP:PORT (such as 127.0.0.1:9101 or [::1]:9101) or the path of a Unix socket (such as /run/app/metrics.sock)"
        ))
    }
}

impl std::fmt::Display for Addr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Addr::Tcp(addr) => write!(f, "{addr}"),
            Addr::Unix(path) => write!(f, "{}", path.display()),
        }
    }
}

/// The Content-Type of the exposition.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The reload duration histogram: per-bucket counts (not cumulative; the last is `+Inf`), the
/// sum in nanoseconds and the count.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Histogram {
    /// One count per bucket of [`RELOAD_BUCKETS`], then one for `+Inf`.
    buckets: [u64; RELOAD_BUCKETS.len() + 1],
    sum_ns: u64,
    count: u64,
}

impl Histogram {
    /// Records one observation of `ns` nanoseconds.
    pub fn observe(&mut self, ns: u64) {
        let seconds = ns as f64 / 1e9;
        let i = RELOAD_BUCKETS.iter().position(|&le| seconds <= le).unwrap_or(RELOAD_BUCKETS.len());
        self.buckets[i] += 1;
        self.sum_ns = self.sum_ns.saturating_add(ns);
        self.count += 1;
    }
}

/// What sockhold counts that nothing else remembers: reloads and their outcomes, the reload
/// durations, failed upgrades. Kept across a self-upgrade ([`Handover`]): a counter that went
/// back to zero would read as a restart of sockhold to Prometheus.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Reloads that promoted their generation.
    pub reloads_succeeded: u64,
    /// Reloads whose generation failed (exited, not ready in time, could not start).
    pub reloads_failed: u64,
    /// The last reload: whether it succeeded, and when it ended (ms since the epoch).
    pub last_reload: Option<(bool, u64)>,
    /// Successful reloads, from the request to the promotion.
    pub reload_duration: Histogram,
    /// Upgrades that failed (refused before the exec, or gone back to the old program).
    pub upgrades_failed: u64,
}

impl Counters {
    /// Records a reload's outcome at `at_ms` (ms since the epoch); `took_ns` is how long a
    /// successful one took from its request, when known.
    pub fn reload_ended(&mut self, ok: bool, at_ms: u64, took_ns: Option<u64>) {
        if ok {
            self.reloads_succeeded += 1;
            if let Some(ns) = took_ns {
                self.reload_duration.observe(ns);
            }
        } else {
            self.reloads_failed += 1;
        }
        self.last_reload = Some((ok, at_ms));
    }

    /// For the self-upgrade's state.
    pub fn handover(&self, endpoint: Option<endpoint::Handover>) -> Handover {
        Handover {
            reloads_succeeded: self.reloads_succeeded,
            reloads_failed: self.reloads_failed,
            last_reload_ok: self.last_reload.map(|(ok, _)| ok),
            last_reload_ms: self.last_reload.map(|(_, at)| at),
            reload_buckets: self.reload_duration.buckets.to_vec(),
            reload_sum_ns: self.reload_duration.sum_ns,
            reload_count: self.reload_duration.count,
            upgrades_failed: self.upgrades_failed,
            endpoint,
        }
    }

    /// Reads the counters back from the self-upgrade's state.
    pub fn take_handover(state: &Handover) -> Result<Counters, String> {
        let buckets = <[u64; RELOAD_BUCKETS.len() + 1]>::try_from(state.reload_buckets.as_slice())
            .map_err(|_| {
                format!(
                    "the reload duration histogram has {} buckets, and this sockhold's has {}",
                    state.reload_buckets.len(),
                    RELOAD_BUCKETS.len() + 1
                )
            })?;
        let last_reload = match (state.last_reload_ok, state.last_reload_ms) {
            (Some(ok), Some(at)) => Some((ok, at)),
            (None, None) => None,
            _ => return Err("the last reload's outcome and time must be given together".into()),
        };
        Ok(Counters {
            reloads_succeeded: state.reloads_succeeded,
            reloads_failed: state.reloads_failed,
            last_reload,
            reload_duration: Histogram {
                buckets,
                sum_ns: state.reload_sum_ns,
                count: state.reload_count,
            },
            upgrades_failed: state.upgrades_failed,
        })
    }
}

/// Self-upgrade: the counters and the metrics endpoint as the next program reads them (the
/// `metrics` part of [`crate::upgrade::State`]). Every field is required and no other is
/// accepted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Handover {
    /// Reloads that succeeded.
    pub reloads_succeeded: u64,
    /// Reloads that failed.
    pub reloads_failed: u64,
    /// Whether the last reload succeeded.
    #[serde(deserialize_with = "Option::deserialize")]
    pub last_reload_ok: Option<bool>,
    /// When the last reload ended, in ms since the epoch.
    #[serde(deserialize_with = "Option::deserialize")]
    pub last_reload_ms: Option<u64>,
    /// The reload duration histogram's per-bucket counts, `+Inf` last.
    pub reload_buckets: Vec<u64>,
    /// Its sum, in nanoseconds.
    pub reload_sum_ns: u64,
    /// Its count.
    pub reload_count: u64,
    /// Upgrades that failed.
    pub upgrades_failed: u64,
    /// The endpoint's listening socket.
    #[serde(deserialize_with = "Option::deserialize")]
    pub endpoint: Option<endpoint::Handover>,
}

/// Everything one scrape shows, read by the event loop at the time of the scrape. Times are
/// seconds since the epoch.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample<'a> {
    /// sockhold's version.
    pub version: &'a str,
    /// When sockhold was first started (it stays across a self-upgrade, as the pid does).
    pub start_time: f64,
    /// The counters.
    pub counters: &'a Counters,
    /// Upgrades that succeeded.
    pub upgrades_succeeded: u64,
    /// Children started again after one crashed or failed to start.
    pub restarts: u64,
    /// The serving generation and when it became ready, if one serves.
    pub serving: Option<(u64, f64)>,
    /// Child processes starting, serving and stopping.
    pub children: Children,
    /// With `steer=flow`: the flows each generation owns.
    pub flows: Option<&'a BTreeMap<u64, usize>>,
    /// With `--fd-store`: how many fds the store holds.
    pub fd_store: Option<usize>,
}

/// Child processes by state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Children {
    /// Started, not ready yet.
    pub starting: usize,
    /// Ready and serving.
    pub serving: usize,
    /// Asked to stop (or killed), not reaped yet.
    pub stopping: usize,
}

/// Escapes a label value: backslash, double quote and newline.
fn label(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// A float as the exposition format writes it.
fn float(v: f64) -> String {
    if v.is_infinite() {
        if v > 0.0 { "+Inf".into() } else { "-Inf".into() }
    } else if v.is_nan() {
        "NaN".into()
    } else {
        format!("{v}")
    }
}

/// Appends a family's `# HELP` and `# TYPE` lines.
fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Every family, its type and help text, in the order [`render`] writes them (the man page and
/// the README list them from here).
pub const FAMILIES: [(&str, &str, &str); 13] = [
    ("sockhold_build_info", "gauge", "sockhold's version, as a label; the value is always 1."),
    (
        "sockhold_start_time_seconds",
        "gauge",
        "When sockhold started, in seconds since the epoch (unchanged by a self-upgrade).",
    ),
    (
        "sockhold_reloads_total",
        "counter",
        "Reloads that ended, by result (success: the new generation was promoted).",
    ),
    (
        "sockhold_last_reload_success",
        "gauge",
        "Whether the last reload succeeded (1) or failed (0); absent before the first.",
    ),
    (
        "sockhold_last_reload_timestamp_seconds",
        "gauge",
        "When the last reload ended, in seconds since the epoch; absent before the first.",
    ),
    (
        "sockhold_reload_duration_seconds",
        "histogram",
        "Time from a reload's request to the promotion of its generation, for successful reloads.",
    ),
    (
        "sockhold_restarts_total",
        "counter",
        "Children started again after the serving one exited by itself or failed to start.",
    ),
    (
        "sockhold_upgrades_total",
        "counter",
        "Self-upgrades (SIGUSR2, ctl upgrade) that ended, by result.",
    ),
    ("sockhold_generation", "gauge", "The serving generation; absent while none serves."),
    (
        "sockhold_generation_ready_time_seconds",
        "gauge",
        "When the serving generation became ready, in seconds since the epoch.",
    ),
    ("sockhold_children", "gauge", "Child processes, by state."),
    (
        "sockhold_flows",
        "gauge",
        "With steer=flow listeners: the UDP flows each live generation owns.",
    ),
    (
        "sockhold_fd_store_fds",
        "gauge",
        "With --fd-store: the fds children keep in sockhold's fd store (FDSTORE=1).",
    ),
];

/// Renders one scrape in the text exposition format 0.0.4.
pub fn render(s: &Sample<'_>) -> String {
    let mut out = String::with_capacity(4096);
    let c = s.counters;
    for &(name, kind, help) in &FAMILIES {
        let sample = |out: &mut String, labels: &str, value: String| {
            let _ = writeln!(out, "{name}{labels} {value}");
        };
        // sockhold_flows only with steer=flow, sockhold_fd_store_fds only with --fd-store:
        // elsewhere they would only ever be empty.
        let shown = match name {
            "sockhold_flows" => s.flows.is_some(),
            "sockhold_fd_store_fds" => s.fd_store.is_some(),
            _ => true,
        };
        if !shown {
            continue;
        }
        family(&mut out, name, kind, help);
        match name {
            "sockhold_build_info" => {
                sample(&mut out, &format!("{{version=\"{}\"}}", label(s.version)), "1".into());
            }
            "sockhold_start_time_seconds" => {
                sample(&mut out, "", float(s.start_time));
            }
            "sockhold_reloads_total" => {
                sample(&mut out, "{result=\"success\"}", c.reloads_succeeded.to_string());
                sample(&mut out, "{result=\"failure\"}", c.reloads_failed.to_string());
            }
            "sockhold_last_reload_success" => {
                if let Some((ok, _)) = c.last_reload {
                    sample(&mut out, "", u8::from(ok).to_string());
                }
            }
            "sockhold_last_reload_timestamp_seconds" => {
                if let Some((_, at)) = c.last_reload {
                    sample(&mut out, "", float(at as f64 / 1e3));
                }
            }
            "sockhold_reload_duration_seconds" => {
                let h = &c.reload_duration;
                let mut cumulative = 0;
                let bounds = RELOAD_BUCKETS.iter().copied().chain([f64::INFINITY]);
                for (le, n) in bounds.zip(h.buckets) {
                    cumulative += n;
                    let _ = writeln!(out, "{name}_bucket{{le=\"{}\"}} {cumulative}", float(le));
                }
                let _ = writeln!(out, "{name}_sum {}", float(h.sum_ns as f64 / 1e9));
                let _ = writeln!(out, "{name}_count {}", h.count);
            }
            "sockhold_restarts_total" => {
                sample(&mut out, "", s.restarts.to_string());
            }
            "sockhold_upgrades_total" => {
                sample(&mut out, "{result=\"success\"}", s.upgrades_succeeded.to_string());
                sample(&mut out, "{result=\"failure\"}", c.upgrades_failed.to_string());
            }
            "sockhold_generation" => {
                if let Some((id, _)) = s.serving {
                    sample(&mut out, "", id.to_string());
                }
            }
            "sockhold_generation_ready_time_seconds" => {
                if let Some((_, at)) = s.serving {
                    sample(&mut out, "", float(at));
                }
            }
            "sockhold_children" => {
                let ch = s.children;
                for (state, n) in
                    [("starting", ch.starting), ("serving", ch.serving), ("stopping", ch.stopping)]
                {
                    sample(&mut out, &format!("{{state=\"{state}\"}}"), n.to_string());
                }
            }
            "sockhold_flows" => {
                for (generation, n) in s.flows.into_iter().flatten() {
                    sample(&mut out, &format!("{{generation=\"{generation}\"}}"), n.to_string());
                }
            }
            "sockhold_fd_store_fds" => {
                if let Some(n) = s.fd_store {
                    sample(&mut out, "", n.to_string());
                }
            }
            _ => unreachable!("every family in FAMILIES is rendered"),
        }
    }
    out
}

/// What a scrape's request asks for, once its head is complete.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    /// `GET /metrics` (`head`: `HEAD /metrics`, answered without a body).
    Metrics {
        /// A HEAD request.
        head: bool,
    },
    /// Anything else, answered with this status and no exposition.
    Refused {
        /// The HTTP status.
        status: Status,
        /// A HEAD request.
        head: bool,
    },
}

/// The HTTP statuses the endpoint answers with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// 200.
    Ok,
    /// 400: not an HTTP/1.x request line.
    BadRequest,
    /// 404: a path other than `/metrics`.
    NotFound,
    /// 405: a method other than GET and HEAD.
    MethodNotAllowed,
    /// 408: the request did not arrive in time.
    RequestTimeout,
    /// 431: the request head is over [`endpoint::MAX_REQUEST`] bytes.
    TooLarge,
    /// 505: not HTTP/1.0 or 1.1.
    VersionNotSupported,
}

impl Status {
    fn line(self) -> &'static str {
        match self {
            Status::Ok => "200 OK",
            Status::BadRequest => "400 Bad Request",
            Status::NotFound => "404 Not Found",
            Status::MethodNotAllowed => "405 Method Not Allowed",
            Status::RequestTimeout => "408 Request Timeout",
            Status::TooLarge => "431 Request Header Fields Too Large",
            Status::VersionNotSupported => "505 HTTP Version Not Supported",
        }
    }
}

/// Reads a request head from the bytes received so far: `None` until the blank line that ends
/// it has arrived. Headers are not needed (every answer closes the connection) and a body is
/// never read.
pub fn parse_request(buf: &[u8]) -> Option<Request> {
    let end = find(buf, b"\r\n\r\n").or_else(|| find(buf, b"\n\n"))?;
    let head = &buf[..end];
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let refused = |status, head| Some(Request::Refused { status, head });
    let parts: Vec<&[u8]> = line.split(|&b| b == b' ').collect();
    let [method, target, version] = parts.as_slice() else {
        return refused(Status::BadRequest, false);
    };
    let head = *method == b"HEAD";
    if !version.starts_with(b"HTTP/") {
        return refused(Status::BadRequest, head);
    }
    if *version != b"HTTP/1.1" && *version != b"HTTP/1.0" {
        return refused(Status::VersionNotSupported, head);
    }
    let path = target.split(|&b| b == b'?').next().unwrap_or_default();
    if path != b"/metrics" {
        return refused(Status::NotFound, head);
    }
    match *method {
        b"GET" | b"HEAD" => Some(Request::Metrics { head }),
        _ => refused(Status::MethodNotAllowed, false),
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// A complete answer: the status line, the headers (the connection closes after it) and, unless
/// `head`, the body. Refusals carry a one-line text body saying why.
pub fn response(status: Status, body: &str, head: bool) -> Vec<u8> {
    let mut out = format!("HTTP/1.1 {}\r\n", status.line());
    let content_type =
        if status == Status::Ok { CONTENT_TYPE } else { "text/plain; charset=utf-8" };
    let _ = write!(out, "Content-Type: {content_type}\r\nContent-Length: {}\r\n", body.len());
    if status == Status::MethodNotAllowed {
        out.push_str("Allow: GET, HEAD\r\n");
    }
    out.push_str("Connection: close\r\n\r\n");
    let mut out = out.into_bytes();
    if !head {
        out.extend_from_slice(body.as_bytes());
    }
    out
}

/// The body of a refusal.
pub fn refusal_body(status: Status) -> String {
    let why = match status {
        Status::Ok => "",
        Status::BadRequest => "not an HTTP/1.x request",
        Status::NotFound => "not found: the metrics are at /metrics",
        Status::MethodNotAllowed => "only GET and HEAD are allowed",
        Status::RequestTimeout => "the request did not arrive in time",
        Status::TooLarge => "the request head is too large",
        Status::VersionNotSupported => "only HTTP/1.0 and HTTP/1.1 are supported",
    };
    format!("{why}\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_exact_exposition() {
        let mut counters = Counters::default();
        counters.reload_ended(true, 1_700_000_000_500, Some(300_000_000));
        counters.reload_ended(true, 1_700_000_001_000, Some(1_500_000_000));
        counters.reload_ended(false, 1_700_000_002_250, None);
        counters.reload_ended(true, 1_700_000_003_000, Some(400_000_000_000));
        counters.upgrades_failed = 1;
        let flows = BTreeMap::from([(3, 2), (4, 0)]);
        let sample = Sample {
            version: "1.2\"3",
            start_time: 1_699_999_999.25,
            counters: &counters,
            upgrades_succeeded: 2,
            restarts: 5,
            serving: Some((4, 1_700_000_003.0)),
            children: Children { starting: 0, serving: 2, stopping: 1 },
            flows: Some(&flows),
            fd_store: Some(2),
        };
        let want = r#"# HELP sockhold_build_info sockhold's version, as a label; the value is always 1.
# TYPE sockhold_build_info gauge
sockhold_build_info{version="1.2\"3"} 1
# HELP sockhold_start_time_seconds When sockhold started, in seconds since the epoch (unchanged by a self-upgrade).
# TYPE sockhold_start_time_seconds gauge
sockhold_start_time_seconds 1699999999.25
# HELP sockhold_reloads_total Reloads that ended, by result (success: the new generation was promoted).
# TYPE sockhold_reloads_total counter
sockhold_reloads_total{result="success"} 3
sockhold_reloads_total{result="failure"} 1
# HELP sockhold_last_reload_success Whether the last reload succeeded (1) or failed (0); absent before the first.
# TYPE sockhold_last_reload_success gauge
sockhold_last_reload_success 1
# HELP sockhold_last_reload_timestamp_seconds When the last reload ended, in seconds since the epoch; absent before the first.
# TYPE sockhold_last_reload_timestamp_seconds gauge
sockhold_last_reload_timestamp_seconds 1700000003
# HELP sockhold_reload_duration_seconds Time from a reload's request to the promotion of its generation, for successful reloads.
# TYPE sockhold_reload_duration_seconds histogram
sockhold_reload_duration_seconds_bucket{le="0.05"} 0
sockhold_reload_duration_seconds_bucket{le="0.1"} 0
sockhold_reload_duration_seconds_bucket{le="0.25"} 0
sockhold_reload_duration_seconds_bucket{le="0.5"} 1
sockhold_reload_duration_seconds_bucket{le="1"} 1
sockhold_reload_duration_seconds_bucket{le="2.5"} 2
sockhold_reload_duration_seconds_bucket{le="5"} 2
sockhold_reload_duration_seconds_bucket{le="10"} 2
sockhold_reload_duration_seconds_bucket{le="30"} 2
sockhold_reload_duration_seconds_bucket{le="60"} 2
sockhold_reload_duration_seconds_bucket{le="120"} 2
sockhold_reload_duration_seconds_bucket{le="300"} 2
sockhold_reload_duration_seconds_bucket{le="+Inf"} 3
sockhold_reload_duration_seconds_sum 401.8
sockhold_reload_duration_seconds_count 3
# HELP sockhold_restarts_total Children started again after the serving one exited by itself or failed to start.
# TYPE sockhold_restarts_total counter
sockhold_restarts_total 5
# HELP sockhold_upgrades_total Self-upgrades (SIGUSR2, ctl upgrade) that ended, by result.
# TYPE sockhold_upgrades_total counter
sockhold_upgrades_total{result="success"} 2
sockhold_upgrades_total{result="failure"} 1
# HELP sockhold_generation The serving generation; absent while none serves.
# TYPE sockhold_generation gauge
sockhold_generation 4
# HELP sockhold_generation_ready_time_seconds When the serving generation became ready, in seconds since the epoch.
# TYPE sockhold_generation_ready_time_seconds gauge
sockhold_generation_ready_time_seconds 1700000003
# HELP sockhold_children Child processes, by state.
# TYPE sockhold_children gauge
sockhold_children{state="starting"} 0
sockhold_children{state="serving"} 2
sockhold_children{state="stopping"} 1
# HELP sockhold_flows With steer=flow listeners: the UDP flows each live generation owns.
# TYPE sockhold_flows gauge
sockhold_flows{generation="3"} 2
sockhold_flows{generation="4"} 0
# HELP sockhold_fd_store_fds With --fd-store: the fds children keep in sockhold's fd store (FDSTORE=1).
# TYPE sockhold_fd_store_fds gauge
sockhold_fd_store_fds 2
"#;
        assert_eq!(render(&sample), want);

        // Before any reload, with nothing serving and no steering: the families are declared,
        // the samples that would mean something false are absent.
        let fresh = Counters::default();
        let text = render(&Sample {
            counters: &fresh,
            serving: None,
            flows: None,
            fd_store: None,
            children: Children::default(),
            ..sample
        });
        assert!(text.contains("# TYPE sockhold_last_reload_success gauge\n# HELP"), "{text}");
        assert!(!text.contains("\nsockhold_generation "), "{text}");
        assert!(!text.contains("sockhold_flows"), "{text}");
        assert!(!text.contains("sockhold_fd_store_fds"), "{text}");
        assert!(text.contains("sockhold_reload_duration_seconds_bucket{le=\"+Inf\"} 0\n"));
    }

    #[test]
    fn counters_survive_the_handover() {
        let mut counters = Counters::default();
        counters.reload_ended(true, 5, Some(7));
        counters.reload_ended(false, 9, None);
        counters.upgrades_failed = 3;
        let state = counters.handover(None);
        let json = serde_json::to_string(&state).expect("serialises");
        let back: Handover = serde_json::from_str(&json).expect("parses");
        assert_eq!(Counters::take_handover(&back), Ok(counters));

        let mut short = state.clone();
        short.reload_buckets.pop();
        let err = Counters::take_handover(&short).unwrap_err();
        assert!(err.contains("has 12 buckets, and this sockhold's has 13"), "{err}");
        let half = Handover { last_reload_ms: None, ..state };
        assert!(Counters::take_handover(&half).is_err());
        let unknown = json.replace("\"upgrades_failed\"", "\"extra\":1,\"upgrades_failed\"");
        let err = serde_json::from_str::<Handover>(&unknown).unwrap_err().to_string();
        assert!(err.contains("unknown field `extra`"), "{err}");
    }

    #[test]
    fn addresses() {
        assert_eq!("127.0.0.1:9101".parse(), Ok(Addr::Tcp("127.0.0.1:9101".parse().unwrap())));
        assert_eq!("[::1]:0".parse(), Ok(Addr::Tcp("[::1]:0".parse().unwrap())));
        assert_eq!("/run/m.sock".parse(), Ok(Addr::Unix("/run/m.sock".into())));
        assert_eq!("./m.sock".parse(), Ok(Addr::Unix("./m.sock".into())));
        for bad in ["9101", "localhost:9101", "127.0.0.1", "m.sock", ""] {
            let err = bad.parse::<Addr>().unwrap_err();
            assert!(err.contains(&format!("'{bad}'")) && err.contains("IP:PORT"), "{err}");
        }
    }

    #[test]
    fn requests_table() {
        use Status::*;
        let metrics = |head| Some(Request::Metrics { head });
        let refused = |status, head| Some(Request::Refused { status, head });
        let table: &[(&str, Option<Request>)] = &[
            ("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", metrics(false)),
            ("GET /metrics HTTP/1.0\r\n\r\n", metrics(false)),
            ("GET /metrics?x=1 HTTP/1.1\r\n\r\n", metrics(false)),
            ("GET /metrics HTTP/1.1\n\n", metrics(false)),
            ("HEAD /metrics HTTP/1.1\r\n\r\n", metrics(true)),
            ("GET /metrics HTTP/1.1\r\nHost: x\r\n", None),
            ("GET /metr", None),
            ("", None),
            ("GET / HTTP/1.1\r\n\r\n", refused(NotFound, false)),
            ("HEAD /metricsx HTTP/1.1\r\n\r\n", refused(NotFound, true)),
            ("POST /metrics HTTP/1.1\r\n\r\n", refused(MethodNotAllowed, false)),
            ("DELETE /metrics HTTP/1.1\r\n\r\n", refused(MethodNotAllowed, false)),
            ("GET /metrics HTTP/2.0\r\n\r\n", refused(VersionNotSupported, false)),
            ("GET /metrics\r\n\r\n", refused(BadRequest, false)),
            ("GET  /metrics HTTP/1.1\r\n\r\n", refused(BadRequest, false)),
            ("GET /metrics FTP/1.1\r\n\r\n", refused(BadRequest, false)),
            ("\u{0}\u{1}\r\n\r\n", refused(BadRequest, false)),
        ];
        for (text, want) in table {
            assert_eq!(parse_request(text.as_bytes()), *want, "{text:?}");
        }
    }

    #[test]
    fn answers_are_exact() {
        let ok = response(Status::Ok, "a 1\n", false);
        let want = "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: 4\r\nConnection: close\r\n\r\na 1\n";
        assert_eq!(String::from_utf8(ok).unwrap(), want);
        let head = response(Status::Ok, "a 1\n", true);
        assert_eq!(String::from_utf8(head).unwrap(), want.strip_suffix("a 1\n").unwrap());
        let body = refusal_body(Status::MethodNotAllowed);
        let refused = String::from_utf8(response(Status::MethodNotAllowed, &body, false)).unwrap();
        assert_eq!(
            refused,
            "HTTP/1.1 405 Method Not Allowed\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 30\r\nAllow: GET, HEAD\r\nConnection: close\r\n\r\nonly GET and HEAD are allowed\n"
        );
    }
}

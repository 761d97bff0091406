//! `--metrics`: the exposition read by Prometheus's own parsers (the official Python client's
//! and `promtool check metrics`), a real Prometheus server scraping sockhold through reloads, a
//! failed reload, a restart and an upgrade with its query API agreeing with `ctl status`,
//! hostile and wrong requests, the Unix socket form, and an idle sockhold with the endpoint on
//! that does not wake. The Python client comes from PyPI into the venv `.ci/run` makes
//! (`target/venv`); Prometheus and promtool from Debian's `prometheus`. Without them the tests
//! say SKIPPED, and fail under CI.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal::{SIGKILL, SIGTERM};
use serde_json::Value;

use crate::support::*;

/// An HTTP answer: status code, header block, body.
struct Answer {
    status: u16,
    headers: String,
    body: String,
}

/// Sends `request` on `stream` and reads the answer until sockhold closes the connection.
fn exchange(mut stream: impl Read + Write, request: &[u8]) -> Answer {
    stream.write_all(request).expect("send the request");
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).expect("read the answer");
    let text = String::from_utf8(raw).expect("a UTF-8 answer");
    let (headers, body) = text.split_once("\r\n\r\n").expect("a header block");
    let status = headers.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("a status code");
    Answer { status, headers: headers.to_string(), body: body.to_string() }
}

fn tcp(addr: &str) -> TcpStream {
    let stream = TcpStream::connect(addr).expect("connect to the metrics endpoint");
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    stream
}

/// `GET /metrics` over HTTP/1.0, which must be answered 200; the exposition.
pub(crate) fn scrape(addr: &str) -> String {
    let answer = exchange(tcp(addr), b"GET /metrics HTTP/1.0\r\n\r\n");
    assert_eq!(answer.status, 200, "{}\n{}", answer.headers, answer.body);
    answer.body
}

/// The endpoint's address, from sockhold's log (it was given port 0).
pub(crate) fn metrics_addr(s: &mut Sockhold) -> String {
    let line = s.expect_log("serving metrics on http://");
    let rest = line.split("http://").nth(1).expect("an address");
    rest.split("/metrics").next().expect("an address").to_string()
}

/// The samples of a text exposition: `name{labels}` to value (labels as written).
pub(crate) fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (key, value) = l.rsplit_once(' ').expect("name and value");
            (key.to_string(), value.parse().unwrap_or_else(|_| panic!("a number in {l:?}")))
        })
        .collect()
}

/// The venv's python with prometheus_client, or `None` after "SKIPPED" (a failure under CI).
fn client_python() -> Option<PathBuf> {
    let python = std::env::var_os("SOCKHOLD_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/venv/bin/python"));
    let works = Command::new(&python)
        .args(["-c", "import prometheus_client.parser"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !works {
        let why = format!(
            "{} cannot import prometheus_client (.ci/run installs it: target/venv/bin/pip install prometheus-client==0.26.0)",
            python.display()
        );
        assert!(!under_ci(), "{why}, and CI=true");
        skipped(&why);
        return None;
    }
    Some(python)
}

/// The families the official Python client reads from `text`: name (as the client names it,
/// without a counter's `_total`) to (type, number of samples).
fn parse_with_the_official_client(python: &Path, text: &str) -> BTreeMap<String, (String, usize)> {
    let script = "import json, sys\n\
                  from prometheus_client.parser import text_string_to_metric_families\n\
                  out = {f.name: [f.type, len(f.samples)] for f in text_string_to_metric_families(sys.stdin.read())}\n\
                  print(json.dumps(out))";
    let mut child = Command::new(python)
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run python");
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().expect("python's answer");
    assert!(out.status.success(), "the parser refused:\n{}", String::from_utf8_lossy(&out.stderr));
    let parsed: BTreeMap<String, (String, usize)> =
        serde_json::from_slice(&out.stdout).expect("JSON from the script");
    parsed
}

/// The serving generation in `ctl status --json`.
fn serving_generation(status: &Value) -> Option<u64> {
    (status["generations"].as_array().unwrap().iter())
        .filter(|g| g["state"] == "serving")
        .filter_map(|g| g["id"].as_u64())
        .max()
}

/// Checks that the exposition says what `ctl status --json` says.
fn agrees_with_status(samples: &BTreeMap<String, f64>, status: &Value) {
    let get = |k: &str| samples.get(k).copied();
    assert_eq!(get("sockhold_restarts_total"), status["restarts"].as_f64(), "{samples:#?}");
    assert_eq!(
        get("sockhold_upgrades_total{result=\"success\"}"),
        status["upgrades"]["count"].as_f64()
    );
    assert_eq!(get("sockhold_generation"), serving_generation(status).map(|g| g as f64));
    let last_ok = status["last_reload"]["ok"].as_bool().map(|ok| f64::from(u8::from(ok)));
    assert_eq!(get("sockhold_last_reload_success"), last_ok, "{status}");
    let started = humantime::parse_rfc3339(status["started"].as_str().unwrap()).unwrap();
    let started = started.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    let start_time = get("sockhold_start_time_seconds").expect("a start time");
    assert!((start_time - started).abs() < 1.0, "{start_time} vs {started}");
    let workers = |state: &str| {
        let generations = status["generations"].as_array().unwrap();
        let of = generations.iter().flat_map(|g| g["workers"].as_array().unwrap().iter());
        of.filter(|w| w["state"] == state || (state == "stopping" && w["state"] == "killed"))
            .count() as f64
    };
    for state in ["starting", "serving", "stopping"] {
        let key = format!("sockhold_children{{state=\"{state}\"}}");
        assert_eq!(get(&key), Some(workers(state)), "{key}: {status}");
    }
}

/// The fixture's arguments: every generation up to 9 but `failing` is ready; that one exits
/// with status 1 before it is.
fn ready_but(failing: u32) -> Vec<&'static str> {
    let names = ["1", "2", "3", "4", "5", "6", "7", "8", "9"];
    let mut args = Vec::new();
    for (i, name) in names.iter().enumerate() {
        if i as u32 + 1 != failing {
            args.extend(["--ready-gen", *name]);
        }
    }
    args.extend(["--exit-gen", ["", "1:1", "2:1", "3:1", "4:1", "5:1"][failing as usize]]);
    args
}

/// Kills the serving child and waits for its restart to be ready; returns the killed pid.
fn crash_and_restart(s: &mut Sockhold, control: &Path) -> i64 {
    let before = ctl_status(control);
    let pid = before["generations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["state"] == "serving")
        .and_then(|g| g["pids"][0].as_i64())
        .expect("a serving pid");
    let restarts = before["restarts"].as_u64().unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), SIGKILL).unwrap();
    s.expect_log(&format!("(pid {pid}) exited by itself"));
    let line = s.expect_log("restarting: starting generation ");
    let generation: u64 = line.rsplit(' ').next().and_then(|g| g.parse().ok()).expect("a number");
    let restarted = pid_of(&s.expect_event("start", generation));
    s.expect_log(&format!("generation {generation} (pid {restarted}) is ready"));
    let status = ctl_status(control);
    assert_eq!(status["restarts"].as_u64(), Some(restarts + 1), "{status}");
    assert_eq!(serving_generation(&status), Some(generation), "{status}");
    pid
}

#[test]
fn every_family_parses_with_the_official_parser_and_promtool_and_agrees_with_status() {
    let Some(python) = client_python() else { return };
    let Some(promtool) = require_tool("promtool", "prometheus") else { return };
    let dir = tempfile::tempdir().unwrap();
    let control = dir.path().join("ctl.sock");
    let mut s = start_fixture(
        &[
            "-l",
            "udp://127.0.0.1:0,steer=flow",
            "--metrics",
            "127.0.0.1:0",
            "--control",
            control.to_str().unwrap(),
            "--upgrade-binary",
            "/nonexistent/sockhold",
        ],
        &ready_but(3),
    );
    let addr = metrics_addr(&mut s);
    let udp_port = s.listening_port("udp://127.0.0.1:");
    s.expect_ready();

    // Reload (generation 2), a failed reload (generation 3 exits), a crash and its restart.
    assert!(ctl(&control, &["reload"]).status.success());
    assert_eq!(ctl(&control, &["reload"]).status.code(), Some(1), "generation 3 fails");
    crash_and_restart(&mut s, &control);
    assert_eq!(ctl(&control, &["upgrade"]).status.code(), Some(1), "no such program");
    // A flow for the serving generation.
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    client.send_to(b"ping", ("127.0.0.1", udp_port)).unwrap();
    wait_until("the flow is counted", || {
        let status = ctl_status(&control);
        status["generations"].as_array().unwrap().iter().any(|g| g["flows"] == 1)
    });

    let text = scrape(&addr);
    let families = parse_with_the_official_client(&python, &text);
    let want = [
        ("sockhold_build_info", "gauge", 1),
        ("sockhold_start_time_seconds", "gauge", 1),
        ("sockhold_reloads", "counter", 2),
        ("sockhold_last_reload_success", "gauge", 1),
        ("sockhold_last_reload_timestamp_seconds", "gauge", 1),
        // Twelve buckets and +Inf, the sum and the count.
        ("sockhold_reload_duration_seconds", "histogram", 15),
        ("sockhold_restarts", "counter", 1),
        ("sockhold_upgrades", "counter", 2),
        ("sockhold_generation", "gauge", 1),
        ("sockhold_generation_ready_time_seconds", "gauge", 1),
        ("sockhold_children", "gauge", 3),
    ];
    for (name, kind, n) in want {
        let got = families.get(name).unwrap_or_else(|| panic!("no {name} in {families:?}"));
        assert_eq!((got.0.as_str(), got.1), (kind, n), "{name}");
    }
    let (kind, _) = &families["sockhold_flows"];
    assert_eq!(kind, "gauge");
    assert_eq!(families.len(), want.len() + 1, "{families:?}");

    let mut check = Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    check.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = check.wait_with_output().unwrap();
    let said =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && said.trim().is_empty(), "promtool check metrics: {said}");

    // The man page and the README list every family with its type.
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let man = std::fs::read_to_string(root.join("man/sockhold.1")).unwrap();
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    for line in text.lines().filter_map(|l| l.strip_prefix("# TYPE ")) {
        let (name, kind) = line.split_once(' ').unwrap();
        let at =
            man.find(&format!("\n.B {name}\n")).or_else(|| man.find(&format!("\n.BR {name} ")));
        let item = at.map(|i| &man[i..man.len().min(i + 120)]).unwrap_or_default();
        assert!(item.contains(&format!("\n({kind})\n")), "man/sockhold.1 lacks {name} ({kind})");
        let row = readme.lines().find(|l| l.starts_with(&format!("| `{name}")));
        assert!(row.is_some_and(|r| r.contains(&format!("| {kind} |"))), "README lacks {name}");
    }

    let values = samples(&text);
    let status = ctl_status(&control);
    agrees_with_status(&values, &status);
    assert_eq!(values["sockhold_reloads_total{result=\"success\"}"], 1.0);
    assert_eq!(values["sockhold_reloads_total{result=\"failure\"}"], 1.0);
    assert_eq!(values["sockhold_reload_duration_seconds_count"], 1.0);
    assert_eq!(values["sockhold_last_reload_success"], 0.0);
    assert_eq!(values["sockhold_restarts_total"], 1.0);
    assert_eq!(values["sockhold_upgrades_total{result=\"failure\"}"], 1.0);
    assert_eq!(values["sockhold_upgrades_total{result=\"success\"}"], 0.0);
    assert_eq!(
        values[&format!("sockhold_build_info{{version=\"{}\"}}", env!("CARGO_PKG_VERSION"))],
        1.0
    );
    for g in status["generations"].as_array().unwrap() {
        let key = format!("sockhold_flows{{generation=\"{}\"}}", g["id"]);
        assert_eq!(values.get(&key).copied(), g["flows"].as_f64(), "{key}");
    }
    s.signal(SIGTERM);
    assert_eq!(s.exit_code(), 0);
}

/// A Prometheus server of its own: config, storage, a free port; killed when dropped.
struct Prometheus {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP port free now (Prometheus takes its listen address only as a number).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A plain HTTP/1.0 GET to 127.0.0.1:port; the answer, or why there is none.
fn http_get_path(port: u16, path: &str) -> Result<Answer, String> {
    let stream = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    stream.set_read_timeout(Some(TIMEOUT)).map_err(|e| e.to_string())?;
    Ok(exchange(stream, format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes()))
}

impl Prometheus {
    fn start(target: &str) -> Option<Prometheus> {
        let bin = require_tool("prometheus", "prometheus")?;
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 200ms\n  scrape_timeout: 200ms\nscrape_configs:\n  - job_name: sockhold\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new(bin)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start prometheus");
        let prometheus = Prometheus { child, port, dir };
        // No event says "ready": its readiness endpoint, polled within the bound.
        let deadline = Instant::now() + TIMEOUT;
        while !http_get_path(port, "/-/ready").is_ok_and(|a| a.status == 200) {
            assert!(Instant::now() < deadline, "prometheus not ready:\n{}", prometheus.log());
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(prometheus)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// The value of an instant query with one result, if it has one.
    fn query(&self, query: &str) -> Option<f64> {
        let encoded: String = query
            .bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'_' => (b as char).to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect();
        let answer = http_get_path(self.port, &format!("/api/v1/query?query={encoded}")).ok()?;
        let json: Value = serde_json::from_str(&answer.body).ok()?;
        let result = json["data"]["result"].as_array()?;
        match result.as_slice() {
            [one] => one["value"][1].as_str()?.parse().ok(),
            _ => None,
        }
    }

    /// Waits until every query answers its value. Prometheus ingests a scrape on its own
    /// schedule and says nothing when it has: this is a bounded retry on its query API.
    fn expect(&self, want: &[(String, Option<f64>)]) {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let got: Vec<Option<f64>> = want.iter().map(|(q, _)| self.query(q)).collect();
            if want.iter().zip(&got).all(|((_, w), g)| w == g) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "prometheus answers {got:?}, expected {want:?}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until Prometheus's answers agree with `ctl status --json`.
    fn expect_status(&self, status: &Value, reloads: (u64, u64)) {
        let last = status["last_reload"]["ok"].as_bool().map(|ok| f64::from(u8::from(ok)));
        let serving = (status["generations"].as_array().unwrap().iter())
            .filter(|g| g["state"] == "serving")
            .map(|g| g["pids"].as_array().unwrap().len())
            .sum::<usize>();
        self.expect(&[
            ("up{job=\"sockhold\"}".into(), Some(1.0)),
            ("sockhold_generation".into(), serving_generation(status).map(|g| g as f64)),
            ("sockhold_restarts_total".into(), status["restarts"].as_f64()),
            (
                "sockhold_upgrades_total{result=\"success\"}".into(),
                status["upgrades"]["count"].as_f64(),
            ),
            ("sockhold_last_reload_success".into(), last),
            ("sockhold_reloads_total{result=\"success\"}".into(), Some(reloads.0 as f64)),
            ("sockhold_reloads_total{result=\"failure\"}".into(), Some(reloads.1 as f64)),
            ("sockhold_children{state=\"serving\"}".into(), Some(serving as f64)),
        ]);
    }
}

#[test]
fn prometheus_scrapes_through_reloads_a_failed_reload_a_restart_and_an_upgrade() {
    let dir = tempfile::tempdir().unwrap();
    let control = dir.path().join("ctl.sock");
    let mut s = start_fixture(
        &["--metrics", "127.0.0.1:0", "--control", control.to_str().unwrap()],
        &ready_but(4),
    );
    let addr = metrics_addr(&mut s);
    s.expect_ready();
    let Some(prometheus) = Prometheus::start(&addr) else { return };
    prometheus.expect_status(&ctl_status(&control), (0, 0));

    for _ in 0..2 {
        assert!(ctl(&control, &["reload"]).status.success());
    }
    prometheus.expect_status(&ctl_status(&control), (2, 0));
    prometheus.expect(&[("sockhold_reload_duration_seconds_count".into(), Some(2.0))]);

    assert_eq!(ctl(&control, &["reload"]).status.code(), Some(1), "generation 4 fails");
    let status = ctl_status(&control);
    assert_eq!(status["last_reload"]["ok"], false);
    prometheus.expect_status(&status, (2, 1));

    crash_and_restart(&mut s, &control);
    prometheus.expect_status(&ctl_status(&control), (2, 1));

    // The counters and the start time go on across an upgrade, on the same socket.
    let start_time = prometheus.query("sockhold_start_time_seconds").expect("a start time");
    let upgrade = ctl(&control, &["upgrade"]);
    assert!(upgrade.status.success(), "{}", String::from_utf8_lossy(&upgrade.stderr));
    let status = ctl_status(&control);
    assert_eq!(status["upgrades"]["count"], 1);
    prometheus.expect_status(&status, (2, 1));
    prometheus.expect(&[
        ("sockhold_start_time_seconds".into(), Some(start_time)),
        ("sockhold_reload_duration_seconds_count".into(), Some(2.0)),
        // Prometheus saw no counter go back: no reset between two of its scrapes.
        ("resets(sockhold_reloads_total{result=\"success\"}[1m])".into(), Some(0.0)),
    ]);
    s.signal(SIGTERM);
    assert_eq!(s.exit_code(), 0);
}

#[test]
fn wrong_requests_are_refused_and_hostile_clients_do_not_stall_the_loop() {
    let dir = tempfile::tempdir().unwrap();
    let control = dir.path().join("ctl.sock");
    let mut s = start_fixture(
        &["--metrics", "127.0.0.1:0", "--control", control.to_str().unwrap()],
        &["--ready"],
    );
    let addr = metrics_addr(&mut s);
    s.expect_ready();

    let table: &[(&[u8], u16)] = &[
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 404),
        (b"GET /metrics/ HTTP/1.1\r\n\r\n", 404),
        (b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 405),
        (b"PUT /metrics HTTP/1.0\r\n\r\n", 405),
        (b"GET /metrics HTTP/2.0\r\n\r\n", 505),
        (b"hello\r\n\r\n", 400),
        (b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", 200),
        (b"GET /metrics?name[]=x HTTP/1.1\r\n\r\n", 200),
    ];
    for (request, want) in table {
        let answer = exchange(tcp(&addr), request);
        assert_eq!(answer.status, *want, "{}", String::from_utf8_lossy(request));
        assert!(answer.headers.contains("Connection: close"), "{}", answer.headers);
        if *want == 405 {
            assert!(answer.headers.contains("Allow: GET, HEAD"), "{}", answer.headers);
        }
    }
    let get = exchange(tcp(&addr), b"GET /metrics HTTP/1.1\r\n\r\n");
    assert!(get.headers.contains("Content-Type: text/plain; version=0.0.4; charset=utf-8"));
    let head = exchange(tcp(&addr), b"HEAD /metrics HTTP/1.1\r\n\r\n");
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty(), "HEAD has no body: {:?}", head.body);
    let length = |a: &Answer| {
        a.headers.lines().find_map(|l| l.strip_prefix("Content-Length: ")).map(str::to_owned)
    };
    assert_eq!(length(&head), length(&get), "HEAD says the length GET would");

    // One that never sends, one that sends 1 MiB without an end to its head, one that asks
    // and never reads: sockhold answers ctl and other scrapes meanwhile.
    let silent = tcp(&addr);
    let mut flood = tcp(&addr);
    let flooder = std::thread::spawn(move || {
        let chunk = vec![b'a'; 64 * 1024];
        let mut sent = 0;
        while sent < (1 << 20) {
            match flood.write(&chunk) {
                Ok(n) => sent += n,
                Err(_) => break, // sockhold answered and closed: the rest is refused
            }
        }
        let mut answer = Vec::new();
        let _ = flood.read_to_end(&mut answer);
        String::from_utf8_lossy(&answer).into_owned()
    });
    let mut deaf = tcp(&addr);
    deaf.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").unwrap();
    let flooded = flooder.join().unwrap();
    // The answer may be lost to the reset of the unread rest; the connection must end either
    // way, which the join above shows.
    assert!(flooded.is_empty() || flooded.starts_with("HTTP/1.1 431"), "{flooded}");
    let started = Instant::now();
    let status = ctl_status(&control);
    assert_eq!(serving_generation(&status), Some(1));
    assert!(scrape(&addr).contains("sockhold_generation 1\n"));
    assert!(started.elapsed() < Duration::from_secs(2), "answered in {:?}", started.elapsed());

    // At most 16 scrapes at once: the 17th waits in the listen queue, and the loop goes on.
    drop(deaf);
    let mut idle: Vec<TcpStream> = (0..15).map(|_| tcp(&addr)).collect();
    let mut waiting = tcp(&addr);
    waiting.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    assert!(ctl(&control, &["status"]).status.success());
    // A measurement window, not a synchronisation: no answer may come while 16 are connected.
    waiting.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    let mut byte = [0u8; 1];
    let early = waiting.read(&mut byte);
    assert!(early.is_err(), "answered while 16 scrapes were in progress: {early:?}");
    // One leaves: the one waiting is served.
    drop(idle.pop());
    drop(silent);
    waiting.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut rest = Vec::new();
    waiting.read_to_end(&mut rest).unwrap();
    assert!(String::from_utf8_lossy(&rest).starts_with("HTTP/1.1 200 "), "{rest:?}");
    drop(idle);
    s.signal(SIGTERM);
    assert_eq!(s.exit_code(), 0);
}

#[test]
fn a_silent_scrape_is_dropped_at_its_deadline() {
    let mut s = start_fixture(&["--metrics", "127.0.0.1:0"], &["--ready"]);
    let addr = metrics_addr(&mut s);
    s.expect_ready();
    let mut silent = tcp(&addr);
    let connected = Instant::now();
    let mut answer = String::new();
    silent.read_to_string(&mut answer).expect("sockhold closes the connection");
    let waited = connected.elapsed();
    assert!(answer.starts_with("HTTP/1.1 408 "), "{answer}");
    assert!(waited >= Duration::from_millis(9900) && waited < TIMEOUT, "after {waited:?}");
    s.signal(SIGTERM);
    assert_eq!(s.exit_code(), 0);
}

#[test]
fn a_unix_socket_endpoint_is_private_and_checked_like_the_control_socket() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("metrics.sock");
    let mut s = start_fixture(&["--metrics", path.to_str().unwrap()], &["--ready"]);
    s.expect_log("serving metrics on ");
    s.expect_ready();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let stream = UnixStream::connect(&path).unwrap();
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    let answer = exchange(stream, b"GET /metrics HTTP/1.0\r\n\r\n");
    assert_eq!(answer.status, 200);
    assert!(answer.body.contains("sockhold_generation 1\n"), "{}", answer.body);
    s.signal(SIGTERM);
    assert_eq!(s.exit_code(), 0);
    assert!(!path.exists(), "the socket file is removed at exit");

    let open = dir.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let sock = open.join("m.sock");
    let (code, err) =
        run_to_end(&["-l", "127.0.0.1:0", "--metrics", sock.to_str().unwrap(), "--", "true"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("invalid --metrics") && err.contains("writable by every user"), "{err}");

    let (code, err) =
        run_to_end(&["-l", "127.0.0.1:0", "--metrics", "localhost:9101", "--", "true"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("'localhost:9101'") && err.contains("IP:PORT"), "{err}");
}

#[test]
fn idle_with_the_endpoint_on_sockhold_does_not_wake_up() {
    let mut s = start_fixture(&["--metrics", "127.0.0.1:0"], &["--ready"]);
    let addr = metrics_addr(&mut s);
    s.expect_event("start", 1);
    s.expect_ready();
    s.expect_event("ready-sent", 1);
    // A scrape came and went: its deadline must leave the poll with it.
    assert!(scrape(&addr).contains("sockhold_generation 1\n"));
    let pid = s.pid();
    wait_until("sockhold sleeps in poll", || sleeps_in_poll(pid));
    let before = voluntary_switches(pid);
    // A measurement window, not a synchronisation: nothing is expected to happen in it.
    std::thread::sleep(Duration::from_millis(1500));
    let after = voluntary_switches(pid);
    assert_eq!(after, before, "sockhold woke up {} times while idle", after - before);
    assert!(sleeps_in_poll(pid), "still asleep in poll");
    s.signal(SIGTERM);
    assert_eq!(s.exit_code(), 0);
}

#[test]
fn the_contrib_prometheus_files_pass_promtool() {
    let Some(promtool) = require_tool("promtool", "prometheus") else { return };
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/prometheus");
    for args in [
        &["check", "config", "prometheus.yml"][..],
        &["check", "rules", "sockhold.rules.yml"],
        &["test", "rules", "sockhold.rules.test.yml"],
    ] {
        let out = Command::new(&promtool).args(args).current_dir(&dir).output().unwrap();
        assert!(
            out.status.success(),
            "promtool {args:?}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The rules name only metrics sockhold exports.
    let rules = std::fs::read_to_string(dir.join("sockhold.rules.yml")).unwrap();
    for name in ["sockhold_last_reload_success", "sockhold_restarts_total", "sockhold_children"] {
        assert!(rules.contains(name), "{name}");
    }
}

/// A new program that crashes after taking over goes back to the old one: the old one counts
/// the failed upgrade, keeps its counters, and serves on the same socket.
#[test]
fn an_upgrade_that_goes_back_counts_as_failed_and_keeps_the_counters_and_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let control = dir.path().join("ctl.sock");
    let next = dir.path().join("sockhold-next");
    let script = format!(
        "#!/bin/sh\n[ \"$1\" = --upgrade-check ] && exec {0} --upgrade-check\nSOCKHOLD_TEST_CRASH_AFTER_TAKEOVER=panic exec {0} \"$@\"\n",
        sockhold_bin().display()
    );
    std::fs::write(&next, script).unwrap();
    std::fs::set_permissions(&next, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut s = start_fixture(
        &[
            "--metrics",
            "127.0.0.1:0",
            "--control",
            control.to_str().unwrap(),
            "--upgrade-binary",
            next.to_str().unwrap(),
        ],
        &["--ready"],
    );
    let addr = metrics_addr(&mut s);
    s.expect_ready();
    assert!(ctl(&control, &["reload"]).status.success());
    // Generation 1 reaped before the upgrade: the new program then has no child to act on, so
    // its crash is still on probation and goes back.
    s.expect_log("generation 1 (pid");
    s.expect_log(") stopped: ");
    let before = samples(&scrape(&addr));

    let out = ctl(&control, &["upgrade"]);
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stdout));
    s.expect_log(&format!("upgrade to {} failed: new program panicked", next.display()));
    let after = samples(&scrape(&addr));
    assert_eq!(after["sockhold_upgrades_total{result=\"failure\"}"], 1.0);
    assert_eq!(after["sockhold_upgrades_total{result=\"success\"}"], 0.0);
    for key in [
        "sockhold_reloads_total{result=\"success\"}",
        "sockhold_reload_duration_seconds_count",
        "sockhold_last_reload_timestamp_seconds",
        "sockhold_start_time_seconds",
        "sockhold_generation",
    ] {
        assert_eq!(after[key], before[key], "{key}");
    }
    agrees_with_status(&after, &ctl_status(&control));
    s.signal(SIGTERM);
    assert_eq!(s.exit_code(), 0);
}

//! `steer=flow` from the engine's side: each unit's own socket, new flows to the newest ready
//! generation, a replaced generation kept until its flows are idle, the flow counts in `ctl
//! status`, and all of it across `ctl upgrade`. The UDP session server is this test binary run
//! again as a child ([`udp_session_fixture`]): a session exists only in the process that saw its
//! first datagram, and a datagram of a session it does not know is answered "unknown".

use std::net::UdpSocket;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use crate::support::{Sockhold, ctl, ctl_status, skipped, under_ci};

/// Set for the child run of [`udp_session_fixture`].
const FIXTURE_VAR: &str = "SOCKHOLD_TEST_UDP_SESSION";

/// Not a test: the UDP session server sockhold runs (`--ignored`, with [`FIXTURE_VAR`] set). It
/// serves the socket at fd 3: "open" starts a session for the sender's address, any other
/// datagram is answered "ok PID" in a session it knows, "unknown PID" otherwise.
#[test]
#[ignore = "the UDP session server the steer_engine tests run as their child"]
fn udp_session_fixture() {
    use nix::sys::socket::{MsgFlags, SockaddrStorage, recvfrom, sendto};
    if std::env::var_os(FIXTURE_VAR).is_none() {
        return;
    }
    if let Some(path) = std::env::var_os("NOTIFY_SOCKET") {
        let notify = std::os::unix::net::UnixDatagram::unbound().expect("a notify socket");
        notify.send_to(b"READY=1", path).expect("READY=1");
    }
    let pid = std::process::id();
    let mut sessions = std::collections::HashSet::new();
    let mut buf = [0u8; 512];
    loop {
        let (n, peer) = recvfrom::<SockaddrStorage>(3, &mut buf).expect("recvfrom fd 3");
        let Some(peer) = peer else { continue };
        let known = if &buf[..n] == b"open" {
            sessions.insert(peer.to_string());
            true
        } else {
            sessions.contains(&peer.to_string())
        };
        let reply = format!("{} {pid}", if known { "ok" } else { "unknown" });
        let _ = sendto(3, reply.as_bytes(), &peer, MsgFlags::empty());
    }
}

/// Whether eBPF can be loaded here; says SKIPPED (and fails under CI) when not.
fn privileged() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert!(!under_ci(), "steer=flow needs root (CAP_BPF and CAP_NET_ADMIN), and CI=true");
    skipped("steer=flow needs root (CAP_BPF and CAP_NET_ADMIN)");
    false
}

/// A client with its own source port: one flow.
struct Session {
    socket: UdpSocket,
    port: u16,
}

impl Session {
    fn new(port: u16) -> Session {
        let socket = UdpSocket::bind("127.0.0.1:0").expect("client socket");
        socket.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        Session { socket, port }
    }

    /// Sends `what` and returns the answer: ("ok" or "unknown", pid).
    fn ask(&self, what: &str) -> (String, u32) {
        self.socket.send_to(what.as_bytes(), ("127.0.0.1", self.port)).expect("send");
        let mut buf = [0u8; 128];
        let n = self.socket.recv(&mut buf).expect("an answer within 10s");
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        let (word, pid) = text.split_once(' ').unwrap_or_else(|| panic!("answer {text:?}"));
        (word.to_owned(), pid.parse().unwrap_or_else(|_| panic!("answer {text:?}")))
    }
}

fn start_steered(control: &Path, extra: &[&str]) -> (Sockhold, u16) {
    let exe = std::env::current_exe().expect("the test binary");
    let exe = exe.to_string_lossy().into_owned();
    let control = control.to_string_lossy().into_owned();
    let mut args =
        vec!["-l", "udp://127.0.0.1:0,steer=flow", "--ready", "notify", "--control", &control];
    args.extend_from_slice(extra);
    args.extend([
        "--",
        &exe,
        "--exact",
        "steer_engine::udp_session_fixture",
        "--ignored",
        "--nocapture",
        "--test-threads",
        "1",
    ]);
    let mut sockhold = crate::support::start_with(&args, |cmd| {
        cmd.env(FIXTURE_VAR, "1");
    });
    let port = sockhold.listening_port("udp://127.0.0.1:");
    sockhold.expect_log("generation 1 (pid");
    sockhold.expect_log("is ready");
    (sockhold, port)
}

/// The flows of each generation in `ctl status --json`.
fn flows(status: &Value) -> Vec<(u64, i64)> {
    status["generations"]
        .as_array()
        .expect("generations")
        .iter()
        .map(|g| (g["id"].as_u64().unwrap(), g["flows"].as_i64().expect("flows is a number")))
        .collect()
}

fn reload(control: &Path) {
    let out = ctl(control, &["reload"]);
    assert!(out.status.success(), "reload: {}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn a_session_stays_with_its_generation_across_a_reload_until_it_goes_quiet() {
    if !privileged() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let control = dir.path().join("ctl.sock");
    let (mut sockhold, port) = start_steered(&control, &["--flow-idle", "4s"]);
    let old = Session::new(port);
    let (word, first) = old.ask("open");
    assert_eq!(word, "ok");
    assert_eq!(flows(&ctl_status(&control)), vec![(1, 1)]);

    // The old session stays busy through the reload, however long the new generation takes.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let keeper = {
        let session = Session { socket: old.socket.try_clone().expect("clone"), port };
        let stop = stop.clone();
        let (asked, first_answer) = std::sync::mpsc::channel();
        let keeper = std::thread::spawn(move || {
            let mut answers = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                answers.push(session.ask("ping"));
                let _ = asked.send(());
                // The pace of a client's keepalives, not a synchronisation.
                std::thread::sleep(Duration::from_millis(100));
            }
            answers
        });
        first_answer.recv_timeout(Duration::from_secs(10)).expect("the keeper's first answer");
        keeper
    };
    reload(&control);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let answers = keeper.join().expect("the keeper");
    assert!(!answers.is_empty());
    assert!(answers.iter().all(|a| *a == ("ok".to_owned(), first)), "{answers:?}");
    // The old session still reaches the process that knows it.
    assert_eq!(old.ask("ping"), ("ok".to_owned(), first));
    // A new session goes to the new, ready generation.
    let new = Session::new(port);
    let (word, second) = new.ask("open");
    assert_eq!(word, "ok");
    assert_ne!(second, first, "a new flow went to the replaced generation");
    assert_eq!(new.ask("ping"), ("ok".to_owned(), second));
    assert_eq!(flows(&ctl_status(&control)), vec![(1, 1), (2, 1)]);
    sockhold.expect_log(&format!(
        "generation 1 (pid {first}) is kept for its 1 flow(s) until they are idle for 4s"
    ));
    // Quiet now: generation 1 is stopped once its flow has been idle for --flow-idle.
    sockhold.expect_log(&format!("generation 1 (pid {first}): its flows are idle; stopping it"));
    sockhold.expect_log(&format!("generation 1 (pid {first}) stopped"));
    // Until sockhold has released generation 1's socket (in the turn that reaps it), a datagram
    // of its flow still lands there: wait until the flow table no longer names it.
    crate::support::wait_until("generation 1's socket is released", || {
        flows(&ctl_status(&control)) == vec![(2, 1)]
    });
    // Its flow is taken over by the generation that serves, which does not know the session.
    assert_eq!(old.ask("ping"), ("unknown".to_owned(), second));
    assert_eq!(flows(&ctl_status(&control)), vec![(2, 2)]);
}

#[test]
fn sessions_keep_their_owners_across_a_self_upgrade() {
    if !privileged() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let control = dir.path().join("ctl.sock");
    let (mut sockhold, port) = start_steered(&control, &["--flow-idle", "30s"]);
    let one = Session::new(port);
    let (_, first) = one.ask("open");
    reload(&control);
    let two = Session::new(port);
    let (_, second) = two.ask("open");
    assert_ne!(first, second);

    let out = ctl(&control, &["upgrade"]);
    assert!(out.status.success(), "upgrade: {}", String::from_utf8_lossy(&out.stderr));
    // Both generations keep their flows, and generation 1 is still kept for its own.
    assert_eq!(one.ask("ping"), ("ok".to_owned(), first));
    assert_eq!(two.ask("ping"), ("ok".to_owned(), second));
    assert_eq!(flows(&ctl_status(&control)), vec![(1, 1), (2, 1)]);

    // After the upgrade, a reload still steers: new flows to generation 3, old ones stay.
    reload(&control);
    let three = Session::new(port);
    let (_, third) = three.ask("open");
    assert!(third != first && third != second, "a new flow went to a replaced generation");
    assert_eq!(one.ask("ping"), ("ok".to_owned(), first));
    assert_eq!(two.ask("ping"), ("ok".to_owned(), second));

    // At shutdown --flow-idle does not apply: everyone is stopped at once.
    let out = ctl(&control, &["stop"]);
    assert!(out.status.success());
    assert_eq!(sockhold.wait_exit().code(), Some(0));
}

#[test]
fn steer_flow_is_refused_on_tcp_naming_the_spec() {
    let (code, stderr) = crate::support::run_to_end(&["-l", "127.0.0.1:0,steer=flow", "--", "x"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("'127.0.0.1:0,steer=flow': steer=flow is for UDP sockets only"),
        "{stderr}"
    );
}

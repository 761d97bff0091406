//! The fd store (`--fd-store N`): a child stores the connections it accepts with libsystemd's
//! own `sd_pid_notify_with_fds`, and later generations, started by a reload, a restart after a
//! crash or after a self-upgrade, find them after their listeners and go on talking on them;
//! the client's one connection is never reset. Also `FDSTOREREMOVE=1`, the limit, `FDPOLL=0`,
//! and the store off (`--fd-store 0`: fds closed, none kept).
//!
//! The server is `contrib/fd-store/echo-server.c`, compiled here against libsystemd
//! (`pkg-config libsystemd`); without a compiler, pkg-config or libsystemd's header the tests
//! say SKIPPED, and fail under CI.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use nix::sys::signal::Signal::SIGTERM;
use serde_json::Value;

use crate::support::*;

/// The echo server, compiled once per test run, or `None` after saying SKIPPED.
fn echo_server() -> Option<PathBuf> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let built = BUILT.get_or_init(|| {
        let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/fd-store/echo-server.c");
        let Some(cc) = which("cc") else {
            return Err("cc not installed (Debian package gcc)".into());
        };
        let Some(pkg_config) = which("pkg-config") else {
            return Err("pkg-config not installed (Debian package pkg-config)".into());
        };
        let flags = Command::new(pkg_config)
            .args(["--cflags", "--libs", "libsystemd"])
            .output()
            .map_err(|e| format!("pkg-config: {e}"))?;
        if !flags.status.success() {
            return Err("libsystemd is not installed (Debian package libsystemd-dev)".into());
        }
        let flags = String::from_utf8_lossy(&flags.stdout).into_owned();
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        let out = dir.join("fd-store-echo-server");
        // Built under a name of its own and renamed: another test binary may run the last one.
        let tmp = dir.join(format!("fd-store-echo-server.{}", std::process::id()));
        let built = Command::new(cc)
            .args(["-O2", "-Wall", "-Werror", "-o"])
            .arg(&tmp)
            .arg(&source)
            .args(flags.split_whitespace())
            .output()
            .map_err(|e| format!("cc: {e}"))?;
        if !built.status.success() {
            let stderr = String::from_utf8_lossy(&built.stderr);
            if stderr.contains("systemd/sd-daemon.h") {
                return Err("libsystemd's header is missing (Debian package libsystemd-dev)".into());
            }
            panic!("{} does not compile:\n{stderr}", source.display());
        }
        std::fs::rename(&tmp, &out).expect("rename the echo server");
        Ok(out)
    });
    match built {
        Ok(path) => Some(path.clone()),
        Err(why) => {
            assert!(!under_ci(), "{why}, and CI=true: CI must install it (.ci/run)");
            skipped(why);
            None
        }
    }
}

fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).map(|dir| dir.join(tool)).find(|p| p.is_file())
}

/// sockhold with `--fd-store store` and `options` running the echo server, its control socket,
/// and the port it listens on.
struct Run {
    sockhold: Sockhold,
    control: PathBuf,
    port: u16,
    _dir: tempfile::TempDir,
}

fn start_echo(server: &Path, store: &str, options: &[&str]) -> Run {
    let dir = tempfile::tempdir().expect("temp dir");
    let control = dir.path().join("ctl.sock");
    let control_arg = control.to_str().expect("utf-8").to_owned();
    let server = server.to_str().expect("utf-8");
    let mut args = vec!["-l", "127.0.0.1:0", "--name", "echo", "--ready", "notify"];
    args.extend(["--fd-store", store, "--control", &control_arg]);
    args.extend(options);
    args.extend(["--", server]);
    let mut sockhold = start(&args);
    let port = sockhold.listening_port("127.0.0.1:");
    Run { sockhold, control, port, _dir: dir }
}

/// A client's one connection, read line by line.
struct Client {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Client {
    /// Connects and reads the server's hello: the name it stored the connection under, and
    /// which generation accepted it.
    fn connect(port: u16) -> (Client, String) {
        let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        stream.set_read_timeout(Some(TIMEOUT)).expect("timeout");
        let writer = stream.try_clone().expect("clone");
        let mut client = Client { reader: BufReader::new(stream), writer };
        let hello = client.line();
        let name = hello.strip_prefix("hello ").and_then(|r| r.split(' ').next());
        let name = name.unwrap_or_else(|| panic!("not a hello: {hello:?}")).to_owned();
        (client, name)
    }

    /// The next line; a reset or a timeout fails the test.
    fn line(&mut self) -> String {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => panic!("the server closed the connection"),
            Ok(_) => line.trim_end().to_owned(),
            Err(e) => panic!("the connection failed: {e}"),
        }
    }

    fn send(&mut self, line: &str) {
        self.writer.write_all(format!("{line}\n").as_bytes()).expect("send");
    }

    /// Sends `ping text` and returns the generation that answered.
    fn ping(&mut self, text: &str) -> u64 {
        self.send(&format!("ping {text}"));
        let answer = self.line();
        let generation = answer.strip_prefix(&format!("pong {text} from generation "));
        generation
            .and_then(|g| g.parse().ok())
            .unwrap_or_else(|| panic!("not the answer to ping {text}: {answer:?}"))
    }

    /// Waits for the server's end of the connection to close cleanly (EOF, not a reset).
    fn expect_eof(&mut self) {
        let mut rest = Vec::new();
        match self.reader.read_to_end(&mut rest) {
            Ok(_) => {
                assert!(rest.is_empty(), "unexpected data: {:?}", String::from_utf8_lossy(&rest))
            }
            Err(e) => panic!("expected a clean close, got {e}"),
        }
    }

    /// Resets the connection (SO_LINGER 0, then close): the server's end reports POLLHUP and
    /// POLLERR.
    fn reset(self) {
        let linger = nix::sys::socket::sockopt::Linger;
        let off = nix::libc::linger { l_onoff: 1, l_linger: 0 };
        nix::sys::socket::setsockopt(&self.writer, linger, &off).expect("SO_LINGER");
    }
}

/// The stored fds' names `ctl status --json` lists (newest first), and the store's size.
fn stored(control: &Path) -> (Vec<String>, u64) {
    let status = ctl_status(control);
    let store = &status["fd_store"];
    let names = (store["names"].as_array().expect("fd_store.names").iter())
        .map(|n| n.as_str().expect("a name").to_owned())
        .collect();
    (names, store["max"].as_u64().expect("fd_store.max"))
}

fn names_of(start: &Value) -> Vec<String> {
    (start["names"].as_array().expect("names").iter())
        .map(|n| n.as_str().expect("a name").to_owned())
        .collect()
}

fn reload(control: &Path) {
    let out = ctl(control, &["reload"]);
    assert!(out.status.success(), "ctl reload: {}", String::from_utf8_lossy(&out.stderr));
}

/// Waits until sockhold logs that `generation` (the process of its start line) has stopped.
fn expect_stopped(run: &mut Run, generation: u64, start: &Value) {
    let line = format!("generation {generation} (pid {}) stopped", pid_of(start));
    run.sockhold.expect_log(&line);
}

/// The point of the store: one client connection, accepted by generation 1 and stored at once,
/// is answered by generations 2, 3 and 4 in turn across three reloads (each old generation dies
/// at once on SIGTERM), and is never reset; at the stop it closes cleanly.
#[test]
fn a_connection_outlives_three_reloads() {
    let Some(server) = echo_server() else { return };
    let mut run = start_echo(&server, "4", &[]);
    let mut start = run.sockhold.expect_event("start", 1);
    assert_eq!(start["fdstore"], "4", "FDSTORE= is the store's size");
    assert_eq!(names_of(&start), ["echo"]);
    let (mut client, name) = Client::connect(run.port);
    assert_eq!(name, "conn-1");
    assert_eq!(client.ping("a"), 1);
    assert_eq!(stored(&run.control), (vec!["conn-1".to_owned()], 4));
    for generation in 2..=4 {
        reload(&run.control);
        let next = run.sockhold.expect_event("start", generation);
        assert_eq!(names_of(&next), ["echo", "conn-1"], "after the listener, as systemd numbers");
        run.sockhold.expect_event("resumed", generation);
        // Through the overlap, whichever generation reads the line answers it.
        let answered = client.ping(&format!("overlap-{generation}"));
        assert!([generation - 1, generation].contains(&answered), "answered by {answered}");
        expect_stopped(&mut run, generation - 1, &start);
        assert_eq!(client.ping(&format!("after-{generation}")), generation);
        start = next;
    }
    // Each generation stored conn-1 again; the store kept one copy.
    assert_eq!(stored(&run.control).0, ["conn-1"]);
    let text = ctl(&run.control, &["status"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("fd store: 1 of 4 (conn-1)"), "{text}");
    run.sockhold.signal(SIGTERM);
    assert!(run.sockhold.wait_exit().success());
    client.expect_eof();
}

/// `FDSTOREREMOVE=1` closes sockhold's copy: once the server closes its own, the client reads
/// EOF.
#[test]
fn fdstoreremove_closes_the_stored_copy() {
    let Some(server) = echo_server() else { return };
    let mut run = start_echo(&server, "4", &[]);
    run.sockhold.expect_event("start", 1);
    let (mut client, _) = Client::connect(run.port);
    let (mut other, _) = Client::connect(run.port);
    assert_eq!(stored(&run.control).0, ["conn-2", "conn-1"]);
    client.send("bye");
    assert_eq!(client.line(), "bye conn-1");
    client.expect_eof();
    assert_eq!(stored(&run.control).0, ["conn-2"]);
    assert_eq!(other.ping("still here"), 1);
}

/// Beyond `--fd-store N`, an fd is closed with a warning naming the generation and the name;
/// the next generation gets the N stored, newest first. `sockhold_fd_store_fds` counts them.
#[test]
fn the_limit_closes_what_is_beyond_it() {
    let Some(server) = echo_server() else { return };
    let mut run = start_echo(&server, "2", &["--metrics", "127.0.0.1:0"]);
    let metrics = crate::metrics::metrics_addr(&mut run.sockhold);
    let stored_fds = |addr: &str| crate::metrics::samples(&crate::metrics::scrape(addr))["sockhold_fd_store_fds"];
    let start = run.sockhold.expect_event("start", 1);
    assert_eq!(stored_fds(&metrics), 0.0);
    let mut clients: Vec<Client> = (1..=3)
        .map(|n| {
            let (client, name) = Client::connect(run.port);
            assert_eq!(name, format!("conn-{n}"));
            client
        })
        .collect();
    run.sockhold.expect_log("generation 1: the fd store is full (--fd-store 2); closing fd conn-3");
    assert_eq!(stored(&run.control), (vec!["conn-2".to_owned(), "conn-1".to_owned()], 2));
    assert_eq!(stored_fds(&metrics), 2.0);
    reload(&run.control);
    let next = run.sockhold.expect_event("start", 2);
    assert_eq!(names_of(&next), ["echo", "conn-2", "conn-1"]);
    expect_stopped(&mut run, 1, &start);
    // conn-3 was held by generation 1 alone.
    clients[2].expect_eof();
    assert_eq!(clients[0].ping("one"), 2);
    assert_eq!(clients[1].ping("two"), 2);
}

/// A stored connection that reports a hang-up (the client reset it) is closed, unless it was
/// stored with `FDPOLL=0`; the store's poll never wakes an idle sockhold otherwise.
#[test]
fn a_reset_connection_is_dropped_unless_stored_with_fdpoll_0() {
    let Some(server) = echo_server() else { return };
    let mut run = start_echo(&server, "4", &[]);
    run.sockhold.expect_event("start", 1);
    let (polled, _) = Client::connect(run.port);
    let (mut kept, _) = Client::connect(run.port);
    kept.send("keep");
    assert_eq!(kept.line(), "kept conn-2");
    assert_eq!(stored(&run.control).0, ["conn-2", "conn-1"]);
    // The kept one first: when sockhold reports the other, it has seen both resets.
    kept.reset();
    polled.reset();
    run.sockhold.expect_log("stored fd conn-1 reported a hang-up or an error; closing it");
    assert_eq!(stored(&run.control).0, ["conn-2"]);
    assert!(
        !run.sockhold.log().iter().any(|l| l.contains("stored fd conn-2 reported")),
        "FDPOLL=0 keeps it"
    );
}

/// A generation that crashes is restarted with everything stored so far; the store also
/// survives a self-upgrade (`ctl upgrade`), and the next reload gets it from the new program.
#[test]
fn the_store_survives_a_crash_and_an_upgrade() {
    let Some(server) = echo_server() else { return };
    let mut run = start_echo(&server, "4", &[]);
    run.sockhold.expect_event("start", 1);
    let (mut client, _) = Client::connect(run.port);
    let (mut crasher, _) = Client::connect(run.port);
    crasher.send("crash");
    let restarted = run.sockhold.expect_event("start", 2);
    assert_eq!(names_of(&restarted), ["echo", "conn-2", "conn-1"]);
    assert_eq!(client.ping("after the crash"), 2);
    assert_eq!(crasher.ping("me too"), 2);

    let pid = run.sockhold.pid().as_raw();
    let out = ctl(&run.control, &["upgrade"]);
    assert!(out.status.success(), "ctl upgrade: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(stored(&run.control).0, ["conn-2", "conn-1"]);
    assert_eq!(run.sockhold.pid().as_raw(), pid);
    reload(&run.control);
    let next = run.sockhold.expect_event("start", 3);
    assert_eq!(names_of(&next), ["echo", "conn-2", "conn-1"]);
    expect_stopped(&mut run, 2, &restarted);
    assert_eq!(client.ping("after the upgrade"), 3);
}

/// `--fd-store 0` (the default): the fds a child sends with `FDSTORE=1` are closed at once, so
/// sockhold's own fd count does not change, no `FDSTORE=` is set, and a reload passes no stored
/// fd: the connection ends with the generation that held it.
#[test]
fn off_closes_what_is_sent() {
    let Some(server) = echo_server() else { return };
    let mut run = start_echo(&server, "0", &[]);
    let start = run.sockhold.expect_event("start", 1);
    assert_eq!(start["fdstore"], "", "no FDSTORE= while the store is off");
    let pid = run.sockhold.pid();
    let fds = || -> Vec<String> {
        let dir = std::fs::read_dir(format!("/proc/{pid}/fd")).expect("/proc/PID/fd");
        let links = dir.map(|e| std::fs::read_link(e.expect("an fd").path()));
        links.filter_map(|l| l.ok()).map(|l| l.display().to_string()).collect()
    };
    // Counted once sockhold has told its own manager READY=1: the datagram socket it sends that
    // on lives only for the send, and is gone (or going) by then, never to come back.
    run.sockhold.expect_ready();
    let before = fds().len();
    let (mut client, name) = Client::connect(run.port);
    // The hello comes after sockhold has read the FDSTORE=1 message (sd_notify_barrier).
    run.sockhold.expect_log(&format!(
        "generation 1: closing 1 fd(s) sent with FDSTORE=1 (FDNAME={name}): the fd store is off"
    ));
    let after = fds();
    assert!(after.len() <= before, "sockhold kept an fd: {before} before, now {after:?}");
    // And none of them is the connection: the server's end of it, found in /proc/net/tcp by
    // its two ports, is a socket inode sockhold does not hold.
    let inode = connection_inode(run.port, client.writer.local_addr().expect("local").port());
    assert!(!after.contains(&format!("socket:[{inode}]")), "sockhold holds the connection");
    assert!(ctl_status(&run.control).get("fd_store").is_none(), "status shows no store");
    reload(&run.control);
    let next = run.sockhold.expect_event("start", 2);
    assert_eq!(names_of(&next), ["echo"]);
    expect_stopped(&mut run, 1, &start);
    client.expect_eof();
}

/// The socket inode of the server's end of the loopback connection from `client_port` to
/// `server_port`, from /proc/net/tcp.
fn connection_inode(server_port: u16, client_port: u16) -> String {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    let local = format!("0100007F:{server_port:04X}");
    let remote = format!("0100007F:{client_port:04X}");
    table
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.len() > 9 && f[1] == local && f[2] == remote)
        .map(|f| f[9].to_owned())
        .unwrap_or_else(|| panic!("no {local} -> {remote} in /proc/net/tcp:\n{table}"))
}

/// Messages count per `--notify-access`: fds that a process outside the generation's group
/// sends with `FDSTORE=1` are closed under `group`, and stored under `all`.
#[test]
fn only_allowed_senders_store() {
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixDatagram;
    let Some(server) = echo_server() else { return };
    for (access, kept) in [("group", false), ("all", true)] {
        let mut run = start_echo(&server, "4", &["--notify-access", access]);
        let start = run.sockhold.expect_event("start", 1);
        // The generation's notify socket, as its environment names it.
        let environ = std::fs::read(format!("/proc/{}/environ", pid_of(&start))).expect("environ");
        let socket = (environ.split(|&b| b == 0))
            .find_map(|v| v.strip_prefix(b"NOTIFY_SOCKET="))
            .map(|v| PathBuf::from(String::from_utf8_lossy(v).into_owned()))
            .expect("NOTIFY_SOCKET");
        let (read_end, write_end) = nix::unistd::pipe().expect("pipe");
        let sender = UnixDatagram::unbound().expect("socket");
        let iov = [std::io::IoSlice::new(b"FDSTORE=1\nFDNAME=intruder")];
        let fds = [write_end.as_raw_fd()];
        let addr = nix::sys::socket::UnixAddr::new(&socket).expect("address");
        nix::sys::socket::sendmsg(
            sender.as_raw_fd(),
            &iov,
            &[nix::sys::socket::ControlMessage::ScmRights(&fds)],
            nix::sys::socket::MsgFlags::empty(),
            Some(&addr),
        )
        .expect("sendmsg");
        drop(write_end);
        if kept {
            wait_until("the fd is stored", || stored(&run.control).0 == ["intruder"]);
        } else {
            run.sockhold.expect_log("which --notify-access group does not allow");
            // The write end's last copy was sockhold's: closed, so the read end sees EOF.
            let mut byte = [0u8; 1];
            assert_eq!(nix::unistd::read(&read_end, &mut byte).expect("read"), 0);
            assert!(stored(&run.control).0.is_empty());
        }
    }
}

/// Traffic on a stored connection never wakes sockhold: the store polls for hang-ups only.
#[test]
fn traffic_on_a_stored_connection_does_not_wake_sockhold() {
    let Some(server) = echo_server() else { return };
    let mut run = start_echo(&server, "4", &[]);
    run.sockhold.expect_event("start", 1);
    let (mut client, _) = Client::connect(run.port);
    // The hello followed the store's barrier: nothing more is on its way to sockhold.
    let pid = run.sockhold.pid();
    let wakeups = || -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let line = status.lines().find(|l| l.starts_with("voluntary_ctxt_switches")).unwrap();
        line.split_whitespace().last().unwrap().parse().unwrap()
    };
    let in_poll = || {
        let wchan = std::fs::read_to_string(format!("/proc/{pid}/wchan")).unwrap_or_default();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let sleeping =
            stat.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('S'));
        wchan.contains("poll") || (sleeping && !wchan.chars().any(|c| c.is_alphabetic()))
    };
    wait_until("sockhold sleeps in poll", in_poll);
    let before = wakeups();
    for i in 0..20 {
        assert_eq!(client.ping(&i.to_string()), 1);
    }
    let after = wakeups();
    assert_eq!(after, before, "sockhold woke up {} times", after - before);
}

/// With `--unit`, a service's `FileDescriptorStoreMax=` turns the store on, as under systemd:
/// the connection that generation 1 stored is answered by generation 2 after a reload.
#[test]
fn file_descriptor_store_max_in_a_unit_turns_the_store_on() {
    let Some(server) = echo_server() else { return };
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(
        dir.path().join("echo.socket"),
        "[Socket]\nListenStream=127.0.0.1:0\nFileDescriptorName=echo\n",
    )
    .expect("write echo.socket");
    std::fs::write(
        dir.path().join("echo.service"),
        format!(
            "[Service]\nType=notify\nExecStart={}\nFileDescriptorStoreMax=3\n",
            server.display()
        ),
    )
    .expect("write echo.service");
    let control = dir.path().join("ctl.sock");
    let unit = dir.path().join("echo.socket");
    let mut sockhold =
        start(&["--unit", unit.to_str().unwrap(), "--control", control.to_str().unwrap()]);
    let port = sockhold.listening_port("127.0.0.1:");
    let mut run = Run { sockhold, control, port, _dir: dir };
    let start = run.sockhold.expect_event("start", 1);
    assert_eq!(start["fdstore"], "3", "FDSTORE= is FileDescriptorStoreMax=");
    let (mut client, name) = Client::connect(run.port);
    assert_eq!(stored(&run.control), (vec![name], 3));
    reload(&run.control);
    run.sockhold.expect_event("resumed", 2);
    expect_stopped(&mut run, 1, &start);
    assert_eq!(client.ping("after"), 2);
}

//! Per-connection mode: one child per connection, on fd 3 or on stdin/stdout, capped by
//! --max-connections, with reloads that change only what new connections run.

use std::io::{Read, Write};
use std::net::TcpStream;

use nix::sys::signal::Signal::{SIGHUP, SIGTERM};

use crate::support::*;

#[test]
fn each_connection_gets_a_child_with_the_connection_as_fd_3() {
    let mut s =
        start(&["--accept", "--max-connections", "2", "-l", "127.0.0.1:0", "--", &fixture()]);
    let port = s.listening_port("127.0.0.1:");
    s.expect_manager("READY=1", |m| m.starts_with("READY=1"));
    let first = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let start = s.expect("a connection child", |v| v["event"] == "start");
    assert_eq!(start["env"]["LISTEN_FDS"], "1");
    assert_eq!(start["env"]["LISTEN_FDNAMES"], "connection");
    assert_eq!(start["env"]["LISTEN_PID"], pid_of(&start).to_string().as_str());
    assert_eq!(start["env"]["REMOTE_ADDR"], "127.0.0.1");
    assert_eq!(
        start["env"]["REMOTE_PORT"],
        first.local_addr().unwrap().port().to_string().as_str()
    );
    assert!(start["env"].get("NOTIFY_SOCKET").is_none(), "no readiness in this mode");
    let fds = start["fds"].as_array().unwrap();
    assert_eq!(fds.len(), 4, "stdio and the connection only: {fds:?}");
    assert_eq!(fds[3]["socket"]["listening"], false, "fd 3 is the connection, not the listener");
    assert_eq!(fds[3]["socket"]["local"], format!("127.0.0.1:{port}").as_str());

    // At --max-connections 2, a third connection waits in the backlog until one child ends.
    let _second = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let second = s.expect("the second child", |v| v["event"] == "start");
    let _third = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.signal(SIGHUP);
    s.expect_log("new connections run generation 2");
    assert!(!s.seen(|v| v["event"] == "start" && v["generation"] == "2"), "the third waits");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid_of(&second) as i32), SIGTERM).unwrap();
    let third = s.expect("the third child", |v| v["event"] == "start");
    assert_eq!(
        third["generation"], "2",
        "a connection accepted after the reload runs generation 2"
    );
    assert_eq!(start["generation"], "1");

    s.signal(SIGTERM);
    s.expect_signal(1, "TERM");
    s.expect_signal(2, "TERM");
    assert_eq!(s.exit_code(), 0);
}

#[test]
fn inetd_puts_the_connection_on_stdin_and_stdout() {
    let script = "read line; echo \"got $line from $REMOTE_ADDR, LISTEN_FDS=${LISTEN_FDS:-unset}\"";
    let mut s = start(&["--accept", "--inetd", "-l", "127.0.0.1:0", "--", "/bin/sh", "-c", script]);
    let port = s.listening_port("127.0.0.1:");
    for round in 0..3 {
        let mut conn = TcpStream::connect(("127.0.0.1", port)).unwrap();
        conn.set_read_timeout(Some(TIMEOUT)).unwrap();
        conn.write_all(format!("ping{round}\n").as_bytes()).unwrap();
        let mut answer = String::new();
        conn.read_to_string(&mut answer).unwrap();
        assert_eq!(answer, format!("got ping{round} from 127.0.0.1, LISTEN_FDS=unset\n"));
    }
    s.signal(SIGTERM);
    assert_eq!(s.exit_code(), 0);
}

#[test]
fn accept_refuses_what_does_not_fit() {
    let fixture = fixture();
    for (args, needle) in [
        (vec!["--inetd", "-l", "127.0.0.1:0", "--", &fixture], "--accept"),
        (vec!["--max-connections", "3", "-l", "127.0.0.1:0", "--", &fixture], "--accept"),
        (vec!["--accept", "--max-connections", "0", "-l", "127.0.0.1:0", "--", &fixture], "0"),
        (vec!["--accept", "--lazy", "-l", "127.0.0.1:0", "--", &fixture], "--lazy"),
    ] {
        let (code, stderr) = run_to_end(&args);
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
}

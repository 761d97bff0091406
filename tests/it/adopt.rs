//! Adoption: sockets sockhold inherited (`fd://N`, `systemd://NAME`), under
//! systemd-socket-activate and under sockhold itself, with the child still seeing a `LISTEN_PID`
//! of its own.

use std::os::fd::AsRawFd;

use nix::fcntl::{FcntlArg, FdFlag, fcntl};
use nix::sys::signal::Signal::SIGTERM;

use crate::support::*;

#[test]
fn fd_n_adopts_an_inherited_socket() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    // Let it be inherited at its number, as a parent that passes a socket does.
    fcntl(&listener, FcntlArg::F_SETFD(FdFlag::empty())).unwrap();
    let spec = format!("fd://{},name=adopted", listener.as_raw_fd());
    let fixture = fixture();
    let mut s = start(&["-l", &spec, "--ready", "notify", "--", &fixture, "--ready", "--serve"]);
    drop(listener);
    let start = s.expect_event("start", 1);
    assert_eq!(start["env"]["LISTEN_FDNAMES"], "adopted");
    assert_eq!(start["env"]["LISTEN_PID"], pid_of(&start).to_string().as_str());
    assert_eq!(start["fds"][3]["socket"]["local"], format!("127.0.0.1:{port}").as_str());
    assert_eq!(start["fds"].as_array().unwrap().len(), 4, "the inherited copy is not passed twice");
    s.expect_ready();
    assert_eq!(http_get(port), Ok(pid_of(&start) as i32));
    s.signal(SIGTERM);
    assert_eq!(s.exit_code(), 0);
}

#[test]
fn adopting_what_is_not_a_socket_or_not_there_fails_clearly() {
    let fixture = fixture();
    for (spec, needle) in [
        ("fd://97", "fd 97 is not open in sockhold"),
        ("fd://0,name=x", "fd 0 is standard input"),
        ("systemd://web", "no socket named 'web': sockhold was given no sockets"),
    ] {
        let out = std::process::Command::new(sockhold_bin())
            .args(["-l", spec, "--", &fixture])
            .env_remove("LISTEN_FDS")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_ne!(out.status.code(), Some(0), "{spec}: {stderr}");
        assert!(stderr.contains(needle), "{spec}: {needle:?} not in {stderr}");
    }
}

#[test]
fn under_systemd_socket_activate_by_name() {
    // systemd-socket-activate takes no port 0: borrow a free port for a moment.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr = format!("127.0.0.1:{port}");
    let fixture = fixture();
    #[rustfmt::skip]
    let Some(mut s) = start_under_socket_activate(
        &["-l", &addr, "--fdname=web"],
        &["-l", "systemd://web", "--ready", "notify", "--", &fixture, "--ready", "--serve"],
    ) else {
        return;
    };
    // It waits for a first connection before it execs sockhold; that connection is served.
    s.expect_log(&format!("Listening on {addr}"));
    let first = std::thread::spawn(move || http_get(port));
    let start = s.expect_event("start", 1);
    assert_eq!(start["env"]["LISTEN_FDNAMES"], "web", "the name it had");
    assert_eq!(
        start["env"]["LISTEN_PID"],
        pid_of(&start).to_string().as_str(),
        "its own LISTEN_PID"
    );
    assert_eq!(start["fds"][3]["socket"]["local"], addr.as_str());
    assert_eq!(start["fds"][3]["socket"]["listening"], true);
    assert_eq!(first.join().unwrap(), Ok(pid_of(&start) as i32));
    s.expect_ready();
    s.signal(SIGTERM);
    assert_eq!(s.exit_code(), 0);
}

#[test]
fn under_another_sockhold() {
    let bin = sockhold_bin().to_string_lossy().into_owned();
    let fixture = fixture();
    #[rustfmt::skip]
    let mut s = start(&[
        "-l", "127.0.0.1:0,name=outer", "--ready", "notify", "--",
        &bin, "-l", "systemd://outer", "--ready", "notify", "--", &fixture, "--ready", "--serve",
    ]);
    let port = s.listening_port("127.0.0.1:");
    let start = s.expect_event("start", 1);
    assert_eq!(start["env"]["LISTEN_FDNAMES"], "outer");
    assert_eq!(start["env"]["LISTEN_PID"], pid_of(&start).to_string().as_str());
    assert_ne!(
        start["ppid"].as_i64(),
        Some(s.pid().as_raw() as i64),
        "its parent is the inner sockhold"
    );
    // The inner sockhold passes READY=1 up: the outer one sees its generation ready.
    s.expect_ready();
    assert_eq!(http_get(port), Ok(pid_of(&start) as i32));
    s.signal(SIGTERM);
    assert_eq!(s.exit_code(), 0);
}

#[test]
fn without_listen_it_adopts_every_socket_it_was_given() {
    let free = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let (web, admin) = (format!("127.0.0.1:{}", free()), format!("127.0.0.1:{}", free()));
    let fixture = fixture();
    let Some(mut s) = start_under_socket_activate(
        &["-l", &web, "-l", &admin, "--fdname=web:admin"],
        &["--ready", "notify", "--", &fixture, "--ready"],
    ) else {
        return;
    };
    s.expect_log(&format!("Listening on {admin}"));
    let port: u16 = web.rsplit(':').next().unwrap().parse().unwrap();
    let _wake = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let start = s.expect_event("start", 1);
    assert_eq!(start["env"]["LISTEN_FDS"], "2");
    assert_eq!(start["env"]["LISTEN_FDNAMES"], "web:admin");
    assert_eq!(start["fds"][3]["socket"]["local"], web.as_str());
    assert_eq!(start["fds"][4]["socket"]["local"], admin.as_str());
    s.expect_ready();
    s.signal(SIGTERM);
    assert_eq!(s.exit_code(), 0);
}

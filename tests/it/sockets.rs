//! Every kind of listen spec and every option, checked on what the child actually receives (the
//! fixture's getsockopt/getsockname report of each fd, and stat of the socket file), the usage
//! errors of malformed specs, and a comparison with systemd-socket-activate on the same specs.

use std::io::{BufRead, BufReader};
use std::net::{Ipv6Addr, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc::channel;

use nix::sys::signal::Signal::{SIGHUP, SIGTERM};
use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, UnixAddr};
use serde_json::Value;

use crate::support::*;

/// Starts `sockhold --ready notify -l SPEC... OPTIONS -- fixture --ready ARGS`; returns it with
/// generation 1's start line.
fn run(specs: &[&str], options: &[&str], args: &[&str]) -> (Sockhold, Value) {
    let fixture = fixture();
    let mut all = Vec::new();
    for spec in specs {
        all.extend(["-l", spec]);
    }
    all.extend(["--ready", "notify"]);
    all.extend_from_slice(options);
    all.extend(["--", &fixture, "--ready"]);
    all.extend_from_slice(args);
    let mut s = start(&all);
    let start = s.expect_event("start", 1);
    (s, start)
}

/// The fixture's report of fd `fd` (its flags and its "socket" object).
fn fd(start: &Value, fd: i64) -> &Value {
    let fds = start["fds"].as_array().expect("fds");
    fds.iter().find(|f| f["fd"] == fd).unwrap_or_else(|| panic!("no fd {fd} in {start}"))
}

/// The socket the child got as fd `n`.
fn sock(start: &Value, n: i64) -> &Value {
    &fd(start, n)["socket"]
}

/// The child's fds from 3 on.
fn passed(start: &Value) -> Vec<&Value> {
    let fds = start["fds"].as_array().expect("fds");
    fds.iter().filter(|f| f["fd"].as_i64() >= Some(3)).collect()
}

fn local(start: &Value, n: i64) -> String {
    sock(start, n)["local"].as_str().expect("local").to_owned()
}

fn port(local: &str) -> u16 {
    local.rsplit(':').next().and_then(|p| p.parse().ok()).unwrap_or_else(|| panic!("{local}"))
}

/// Stops sockhold cleanly.
fn stop(mut s: Sockhold) {
    s.expect_ready();
    s.signal(SIGTERM);
    assert_eq!(s.exit_code(), 0);
}

fn has_ipv6() -> bool {
    let ok = std::net::TcpListener::bind("[::1]:0").is_ok();
    if !ok {
        skipped("no IPv6 loopback");
    }
    ok
}

/// A name no other test or run uses.
fn abstract_name(tag: &str) -> String {
    format!("sockhold-it-{}-{tag}", std::process::id())
}

/// An interface with a link-local IPv6 address, and its index, from /proc/net/if_inet6.
fn link_local_interface() -> Option<(Ipv6Addr, String, u32)> {
    let table = std::fs::read_to_string("/proc/net/if_inet6").ok()?;
    table.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [hex, index, _, "20", _, name] = fields[..] else { return None };
        let ip = Ipv6Addr::from(u128::from_str_radix(hex, 16).ok()?);
        Some((ip, name.to_owned(), u32::from_str_radix(index, 16).ok()?))
    })
}

fn assert_socket(start: &Value, n: i64, family: &str, kind: &str, listening: bool) {
    let s = sock(start, n);
    assert_eq!(
        (s["family"].as_str(), s["type"].as_str(), s["listening"].as_bool()),
        (Some(family), Some(kind), Some(listening)),
        "fd {n}: {s}"
    );
    assert_eq!(fd(start, n)["cloexec"], false, "fd {n}");
    assert_eq!(fd(start, n)["nonblock"], false, "fd {n}: blocking by default");
    assert_eq!(s["reuseport"], false, "fd {n}: never SO_REUSEPORT unless asked");
}

// ---- one test per socket kind ----

#[test]
fn tcp_ipv4() {
    let (s, start) = run(&["127.0.0.1:0", "tcp://127.0.0.1:0", "tcp4://127.0.0.1:0"], &[], &[]);
    for n in 3..=5 {
        assert_socket(&start, n, "inet", "stream", true);
        assert!(local(&start, n).starts_with("127.0.0.1:"), "{start}");
        assert_ne!(port(&local(&start, n)), 0);
    }
    TcpStream::connect(local(&start, 3)).expect("it listens");
    stop(s);
}

#[test]
fn tcp_ipv6() {
    if !has_ipv6() {
        return;
    }
    let (s, start) = run(&["[::1]:0", "tcp6://[::1]:0"], &[], &[]);
    for n in 3..=4 {
        assert_socket(&start, n, "inet6", "stream", true);
        assert!(local(&start, n).starts_with("[::1]:"), "{start}");
    }
    stop(s);
}

#[test]
fn bare_port_is_tcp_dual_stack() {
    let (s, start) = run(&["0", "tcp://0"], &[], &[]);
    for n in 3..=4 {
        assert_socket(&start, n, "inet6", "stream", true);
        assert!(local(&start, n).starts_with("[::]:"), "{start}");
        assert_eq!(sock(&start, n)["v6only"], false, "dual-stack");
        // IPv4 clients reach it too.
        TcpStream::connect(("127.0.0.1", port(&local(&start, n)))).expect("IPv4 connect");
    }
    stop(s);
}

#[test]
fn udp() {
    let mut specs = vec!["udp://127.0.0.1:0", "udp4://127.0.0.1:0", "udp://0"];
    if has_ipv6() {
        specs.extend(["udp://[::1]:0", "udp6://[::1]:0"]);
    }
    let (s, start) = run(&specs, &[], &[]);
    for (n, spec) in (3..).zip(&specs) {
        let family = if spec.contains("127.0.0.1") { "inet" } else { "inet6" };
        assert_socket(&start, n, family, "dgram", false);
        let local = local(&start, n);
        assert_ne!(port(&local), 0, "{spec}");
        let expected = match *spec {
            "udp://0" => "[::]:",
            s if s.contains("::1") => "[::1]:",
            _ => "127.0.0.1:",
        };
        assert!(local.starts_with(expected), "{spec}: {local}");
    }
    assert_eq!(sock(&start, 5)["v6only"], false, "a bare UDP port is dual-stack too");
    // A datagram sent before any child reads waits in the socket's queue.
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    client.send_to(b"ping", local(&start, 3)).unwrap();
    stop(s);
}

#[test]
fn unix_stream_datagram_and_seqpacket_files() {
    let dir = tempfile::tempdir().unwrap();
    let paths: Vec<_> = ["s", "d", "p"].map(|n| dir.path().join(format!("{n}.sock"))).into();
    let specs = [
        paths[0].display().to_string(),
        format!("unixgram://{}", paths[1].display()),
        format!("unixpacket://{}", paths[2].display()),
    ];
    let specs: Vec<&str> = specs.iter().map(String::as_str).collect();
    let (s, start) = run(&specs, &[], &[]);
    let kinds = [("stream", true), ("dgram", false), ("seqpacket", true)];
    for ((n, (kind, listening)), path) in (3..).zip(kinds).zip(&paths) {
        assert_socket(&start, n, "unix", kind, listening);
        assert_eq!(local(&start, n), path.display().to_string());
        let meta = std::fs::symlink_metadata(path).unwrap();
        assert!(std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()));
    }
    std::os::unix::net::UnixDatagram::unbound().unwrap().send_to(b"x", &paths[1]).unwrap();
    stop(s);
    for path in &paths {
        assert!(!path.exists(), "{} removed at stop", path.display());
    }
}

#[test]
fn abstract_unix_sockets() {
    let names = ["s", "u", "d", "p"].map(abstract_name);
    let specs = [
        format!("@{}", names[0]),
        format!("unix://@{}", names[1]),
        format!("unixgram://@{}", names[2]),
        format!("unixpacket://@{}", names[3]),
    ];
    let specs: Vec<&str> = specs.iter().map(String::as_str).collect();
    let (s, start) = run(&specs, &[], &[]);
    let kinds = [("stream", true), ("stream", true), ("dgram", false), ("seqpacket", true)];
    for ((n, (kind, listening)), name) in (3..).zip(kinds).zip(&names) {
        assert_socket(&start, n, "unix", kind, listening);
        assert_eq!(local(&start, n), format!("@{name}"));
    }
    let client = socket::socket(AddressFamily::Unix, SockType::Stream, SockFlag::empty(), None);
    let addr = UnixAddr::new_abstract(names[0].as_bytes()).unwrap();
    socket::connect(client.unwrap().as_raw_fd(), &addr).expect("it listens");
    stop(s);
}

#[test]
fn scoped_link_local_ipv6() {
    let Some((ip, name, index)) = link_local_interface() else {
        skipped("no interface with a link-local IPv6 address");
        return;
    };
    let specs = [
        format!("[{ip}%{name}]:0"),
        format!("[{ip}%{index}]:0"),
        format!("[{ip}]:0%{name}"),
        format!("udp://[{ip}%{name}]:0"),
    ];
    let specs: Vec<&str> = specs.iter().map(String::as_str).collect();
    let (s, start) = run(&specs, &[], &[]);
    for (n, spec) in (3..).zip(&specs) {
        let kind = if spec.starts_with("udp") { "dgram" } else { "stream" };
        assert_socket(&start, n, "inet6", kind, kind == "stream");
        let local = local(&start, n);
        assert!(local.starts_with(&format!("[{ip}%{index}]:")), "{spec}: {local}");
    }
    stop(s);
}

// ---- one test per option ----

#[test]
fn option_name() {
    let named = format!("@{},name=a b", abstract_name("name"));
    let (s, start) = run(&["127.0.0.1:0,name=web", "udp://127.0.0.1:0", &named], &[], &[]);
    assert_eq!(start["env"]["LISTEN_FDNAMES"], "web:fixture:a b");
    stop(s);
}

/// The listen queue length of a listening socket, as `ss` shows it (Send-Q); None without ss.
fn backlog_of(filter: &[&str]) -> Option<u64> {
    let out =
        Command::new(require_tool("ss", "iproute2")?).args(["-lnH"]).args(filter).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().next().unwrap_or_else(|| panic!("ss {filter:?} found nothing"));
    // Netid State Recv-Q Send-Q ... for -x; State Recv-Q Send-Q ... for -t.
    let fields: Vec<&str> = line.split_whitespace().collect();
    let send_q = if fields[0] == "LISTEN" { fields[2] } else { fields[3] };
    Some(send_q.parse().unwrap())
}

#[test]
fn option_backlog() {
    let dir = tempfile::tempdir().unwrap();
    let unix = dir.path().join("b.sock");
    let packet = dir.path().join("p.sock");
    let specs = [
        "127.0.0.1:0,backlog=7".to_string(),
        "127.0.0.1:0".to_string(),
        format!("{},backlog=9", unix.display()),
        format!("unixpacket://{},backlog=11", packet.display()),
    ];
    let specs: Vec<&str> = specs.iter().map(String::as_str).collect();
    let (s, start) = run(&specs, &[], &[]);
    let tcp = |n| backlog_of(&["-t", &format!("sport = :{}", port(&local(&start, n)))]);
    let Some(seven) = tcp(3) else {
        return;
    };
    assert_eq!(seven, 7);
    let somaxconn: u64 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .map_or(4096, |v| v.trim().parse().unwrap());
    assert_eq!(tcp(4), Some(somaxconn), "the default is the kernel maximum");
    let unix_backlog = |path: &Path| backlog_of(&["-x", "src", path.to_str().unwrap()]);
    assert_eq!(unix_backlog(&unix), Some(9));
    assert_eq!(unix_backlog(&packet), Some(11));
    stop(s);
}

#[test]
fn option_v6only() {
    if !has_ipv6() {
        return;
    }
    let specs = ["[::]:0,v6only=1", "[::]:0,v6only=no", "0,v6only", "udp://[::]:0,v6only=on"];
    let (s, start) = run(&specs, &[], &[]);
    for (n, expected) in (3..).zip([true, false, true, true]) {
        assert_eq!(sock(&start, n)["v6only"], expected, "{}", specs[n as usize - 3]);
    }
    let v4 = |n| TcpStream::connect(("127.0.0.1", port(&local(&start, n))));
    assert!(v4(3).is_err(), "IPv6 only: an IPv4 client is refused");
    v4(4).expect("dual-stack: an IPv4 client connects");
    stop(s);
}

#[test]
fn option_reuseport() {
    let (s, start) = run(&["127.0.0.1:0,reuseport", "udp://127.0.0.1:0,reuseport=yes"], &[], &[]);
    assert_eq!(sock(&start, 3)["reuseport"], true);
    assert_eq!(sock(&start, 4)["reuseport"], true);
    // The risk the option brings: another socket of the same uid may bind the same port.
    let other = run(&[&format!("{},reuseport", local(&start, 3))], &[], &[]);
    assert_eq!(local(&other.1, 3), local(&start, 3));
    stop(other.0);
    stop(s);
}

#[test]
fn option_freebind() {
    let mut specs = vec!["203.0.113.7:0,freebind", "udp://203.0.113.7:0,freebind=1"];
    if has_ipv6() {
        specs.push("[2001:db8::7]:0,freebind");
    }
    let (s, start) = run(&specs, &[], &[]);
    for (n, spec) in (3..).zip(&specs) {
        assert_eq!(sock(&start, n)["freebind"], true, "{spec}");
        let host = spec.trim_start_matches("udp://").rsplit_once(':').unwrap().0;
        assert!(local(&start, n).starts_with(host), "{spec}: {}", local(&start, n));
    }
    stop(s);
}

#[test]
fn option_device() {
    let (s, start) = run(&["127.0.0.1:0,device=lo", "udp://127.0.0.1:0,device=lo"], &[], &[]);
    assert_eq!(sock(&start, 3)["bound_device"], "lo");
    assert_eq!(sock(&start, 4)["bound_device"], "lo");
    stop(s);
    // An interface that does not exist is a runtime error (exit 1) that names it.
    let (code, stderr) = run_to_end(&["-l", "127.0.0.1:0,device=nosuchdev0", "--", &fixture()]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("failed to set SO_BINDTODEVICE=nosuchdev0 on 127.0.0.1:0"), "{stderr}");
}

#[test]
fn options_nodelay_and_keepalive() {
    let (s, start) =
        run(&["127.0.0.1:0,nodelay", "127.0.0.1:0,keepalive", "127.0.0.1:0"], &[], &[]);
    let flags = |n| (sock(&start, n)["nodelay"].clone(), sock(&start, n)["keepalive"].clone());
    assert_eq!(flags(3), (Value::Bool(true), Value::Bool(false)));
    assert_eq!(flags(4), (Value::Bool(false), Value::Bool(true)));
    assert_eq!(flags(5), (Value::Bool(false), Value::Bool(false)));
    stop(s);
}

#[test]
fn options_rcvbuf_and_sndbuf() {
    let dir = tempfile::tempdir().unwrap();
    let specs = [
        "127.0.0.1:0,rcvbuf=64K,sndbuf=100000".to_string(),
        "udp://127.0.0.1:0,rcvbuf=50000".to_string(),
        format!("unixgram://{},sndbuf=32K", dir.path().join("g.sock").display()),
    ];
    let specs: Vec<&str> = specs.iter().map(String::as_str).collect();
    let (s, start) = run(&specs, &[], &[]);
    // The kernel stores, and getsockopt reports, twice the size asked for.
    assert_eq!(sock(&start, 3)["rcvbuf"], 2 * 65536);
    assert_eq!(sock(&start, 3)["sndbuf"], 2 * 100000);
    assert_eq!(sock(&start, 4)["rcvbuf"], 2 * 50000);
    assert_eq!(sock(&start, 5)["sndbuf"], 2 * 32768);
    stop(s);
}

#[test]
fn options_mode_owner_and_group() {
    let dir = tempfile::tempdir().unwrap();
    let root = nix::unistd::Uid::effective().is_root();
    // As root, hand the files to another user; else to ourselves (only root may give away).
    let (uid, gid) = if root {
        (4242, 4343)
    } else {
        (nix::unistd::Uid::effective().as_raw(), nix::unistd::Gid::effective().as_raw())
    };
    let paths: Vec<_> = ["s", "d", "p"].map(|n| dir.path().join(format!("{n}.sock"))).into();
    let specs = [
        format!("{},mode=0660,owner={uid},group={gid}", paths[0].display()),
        format!("unixgram://{},mode=666,group={gid}", paths[1].display()),
        format!("unixpacket://{},mode=0600", paths[2].display()),
    ];
    let specs: Vec<&str> = specs.iter().map(String::as_str).collect();
    let (s, start) = run(&specs, &[], &[]);
    let me = nix::unistd::Uid::effective().as_raw();
    for ((path, mode), (owner, group)) in
        paths.iter().zip([0o660, 0o666, 0o600]).zip([(uid, gid), (me, gid), (me, 0)])
    {
        let meta = std::fs::symlink_metadata(path).unwrap();
        assert_eq!(meta.mode() & 0o7777, mode, "{}", path.display());
        assert_eq!(meta.uid(), owner, "{}", path.display());
        if path != &paths[2] {
            assert_eq!(meta.gid(), group, "{}", path.display());
        }
    }
    // The child got the sockets bound to those files.
    for (n, path) in (3..).zip(&paths) {
        assert_eq!(local(&start, n), path.display().to_string());
    }
    stop(s);
    // Names resolve too; an unknown one is a usage error naming it.
    let path = dir.path().join("named.sock");
    let (s, _) = run(&[&format!("{},owner=root,group=root", path.display())], &[], &[]);
    let meta = std::fs::symlink_metadata(&path).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (0, 0));
    stop(s);
}

#[test]
fn option_nonblock() {
    // fd 3 blocking, fd 4 non-blocking: each spec's mode is what the first generation gets.
    // Generation 1 sets O_NONBLOCK on fd 3 (on the description every generation shares): a
    // reload inherits it, since sockhold never changes the flag under a running server; once
    // nothing is alive (generation 2 killed), the restart gets each spec's mode again.
    #[rustfmt::skip]
    let (mut s, first) = run(&["127.0.0.1:0", "127.0.0.1:0,nonblock"], &[], &["--set-nonblock-gen", "1"]);
    assert_eq!(
        (fd(&first, 3)["nonblock"].clone(), fd(&first, 4)["nonblock"].clone()),
        (false.into(), true.into())
    );
    s.expect_event("set-nonblock", 1);
    s.expect_ready();
    s.signal(SIGHUP);
    let second = s.expect_event("start", 2);
    assert_eq!(fd(&second, 3)["nonblock"], true, "inherited from generation 1: {second}");
    assert_eq!(fd(&second, 4)["nonblock"], true, "{second}");
    s.expect_ready();
    s.expect_event("exit", 1);
    let pid = nix::unistd::Pid::from_raw(pid_of(&second) as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).unwrap();
    let third = s.expect_event("start", 3);
    assert_eq!(fd(&third, 3)["nonblock"], false, "nothing alive: the spec's mode: {third}");
    assert_eq!(fd(&third, 4)["nonblock"], true, "{third}");
    s.expect_event("ready-sent", 3);
    s.signal(SIGTERM);
    assert_eq!(s.exit_code(), 0);
    let unix = format!("@{},nonblock", abstract_name("nonblock"));
    let (s, start) = run(&["udp://127.0.0.1:0,nonblock", &unix], &[], &[]);
    assert_eq!(fd(&start, 3)["nonblock"], true);
    assert_eq!(fd(&start, 4)["nonblock"], true);
    stop(s);
}

// ---- the Unix socket file ----

#[test]
fn missing_parent_directories_are_created_0755() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run/app/api.sock");
    let (s, start) = run(&[&path.display().to_string()], &[], &[]);
    assert_eq!(local(&start, 3), path.display().to_string());
    for sub in ["run", "run/app"] {
        let meta = std::fs::metadata(dir.path().join(sub)).unwrap();
        // 0755 less sockhold's umask, which the test inherits (022 or stricter, usually).
        assert_eq!(meta.mode() & 0o7777 & !0o755, 0, "{sub}: {:o}", meta.mode());
        assert_eq!(meta.mode() & 0o700, 0o700, "{sub}: {:o}", meta.mode());
    }
    stop(s);
    assert!(!path.exists());
}

#[test]
fn socket_files_keep_inode_and_mode_across_a_reload() {
    let dir = tempfile::tempdir().unwrap();
    let paths: Vec<_> = ["s", "d", "p"].map(|n| dir.path().join(format!("{n}.sock"))).into();
    let specs = [
        format!("{},mode=0640", paths[0].display()),
        format!("unixgram://{}", paths[1].display()),
        format!("unixpacket://{},mode=0606", paths[2].display()),
    ];
    let specs: Vec<&str> = specs.iter().map(String::as_str).collect();
    let (mut s, _) = run(&specs, &[], &[]);
    let stat = || -> Vec<(u64, u64, u32)> {
        paths
            .iter()
            .map(|p| std::fs::symlink_metadata(p).unwrap())
            .map(|m| (m.dev(), m.ino(), m.mode()))
            .collect()
    };
    s.expect_ready();
    let before = stat();
    s.signal(SIGHUP);
    s.expect_event("start", 2);
    s.expect_signal(1, "TERM");
    s.expect_manager("READY=1 after the reload", |m| m.starts_with("READY=1"));
    assert_eq!(stat(), before, "bound once: the same files, the same modes");
    s.signal(SIGTERM);
    assert_eq!(s.exit_code(), 0);
    for path in &paths {
        assert!(!path.exists(), "{} removed at stop", path.display());
    }
}

// ---- malformed specs ----

#[test]
fn malformed_specs_exit_2_and_name_the_spec() {
    let fixture = fixture();
    for (spec, needle) in [
        ("udp://", "missing host and port"),
        ("udp4://[::1]:53", "udp4 needs an IPv4 address"),
        ("tcp6://8080", "tcp6 needs HOST:PORT"),
        ("unixgram://relative", "a Unix socket path must be absolute"),
        ("unixpacket://", "missing path"),
        ("@", "missing abstract socket name"),
        ("[fe80::1%]:80", "missing interface after '%'"),
        ("[fe80::1%bad/name]:80", "invalid interface name 'bad/name'"),
        ("127.0.0.1:80%eth0", "needs an IPv6 address"),
        ("8080,v6only=maybe", "v6only must be a boolean"),
        ("127.0.0.1:80,v6only", "option 'v6only' does not apply to an IPv4 TCP socket"),
        ("/run/a.sock,nodelay", "option 'nodelay' does not apply to a Unix stream socket"),
        ("/run/a.sock,reuseport", "option 'reuseport' does not apply to a Unix stream socket"),
        ("udp://53,backlog=5", "option 'backlog' does not apply to a UDP socket"),
        ("udp://53,keepalive", "option 'keepalive' does not apply to a UDP socket"),
        ("8080,mode=0600", "option 'mode' does not apply to a TCP socket"),
        ("@a,owner=root", "option 'owner' does not apply to an abstract Unix stream socket"),
        ("unixgram:///a,device=lo", "option 'device' does not apply to a Unix datagram socket"),
        ("8080,rcvbuf=lots", "rcvbuf must be a positive size"),
        ("8080,sndbuf=3G", "sndbuf is too large"),
        ("/a.sock,mode=999", "mode must be an octal number"),
        ("/a.sock,owner=no-such-user-sockhold", "unknown user 'no-such-user-sockhold'"),
        ("/a.sock,group=no-such-group-sockhold", "unknown group 'no-such-group-sockhold'"),
        ("8080,device=a:b", "invalid interface name 'a:b'"),
        ("8080,nonblock=2", "nonblock must be a boolean"),
        ("vsock:2:80", "AF_VSOCK sockets are not supported"),
        ("fd://2", "fd 2 is standard input, output or error"),
        ("fd://three", "'three' is not an fd number"),
        ("systemd://a:b", "must not contain ':'"),
        ("fd://3,mode=600", "cannot be applied to an adopted socket"),
    ] {
        let (code, stderr) = run_to_end(&["-l", spec, "--", &fixture]);
        assert_eq!(code, 2, "{spec}: {stderr}");
        let named = format!("invalid listen spec '{spec}': ");
        assert!(stderr.contains(&named), "{spec}: {named:?} not in {stderr}");
        assert!(stderr.contains(needle), "{spec}: {needle:?} not in {stderr}");
    }
}

// ---- parity with systemd-socket-activate ----

/// Runs the fixture under systemd-socket-activate with `flags` and `-l` for each address; once
/// every socket is bound, `trigger` makes it start the fixture (it waits for a first connection
/// or datagram even without --accept). Returns the fixture's start line.
fn under_systemd(flags: &[&str], addresses: &[String], trigger: impl FnOnce()) -> Value {
    let mut cmd = Command::new("systemd-socket-activate");
    cmd.args(flags);
    for address in addresses {
        cmd.args(["-l", address]);
    }
    let mut child = cmd
        .args([&fixture(), "--exit", "0"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run systemd-socket-activate");
    let (tx, rx) = channel();
    let (out, err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let tx2 = tx.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            let _ = tx2.send((false, line));
        }
    });
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send((true, line));
        }
    });
    let mut log = Vec::new();
    let mut bound = 0;
    let mut trigger = Some(trigger);
    let start = loop {
        let Ok((stdout, line)) = rx.recv_timeout(TIMEOUT) else {
            let _ = child.kill();
            panic!("systemd-socket-activate: no start line; it said:\n{}", log.join("\n"));
        };
        if stdout {
            match serde_json::from_str::<Value>(&line) {
                Ok(v) if v["event"] == "start" => break v,
                _ => continue,
            }
        }
        bound += usize::from(line.starts_with("Listening on "));
        log.push(line);
        if bound == addresses.len()
            && let Some(trigger) = trigger.take()
        {
            trigger();
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    start
}

/// What must match: family, type, listening and local address of every fd from 3 on.
fn shape(start: &Value) -> Vec<Value> {
    passed(start)
        .into_iter()
        .map(|f| {
            let s = &f["socket"];
            serde_json::json!([f["fd"], s["family"], s["type"], s["listening"], s["local"]])
        })
        .collect()
}

fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Runs both tools on the same sockets; asserts the child saw the same fds 3.. and names.
fn compare(flags: &[&str], systemd: &[String], ours: &[String], trigger: impl FnOnce()) {
    let names: Vec<String> = (0..systemd.len()).map(|i| format!("n{i}")).collect();
    let fdname = format!("--fdname={}", names.join(":"));
    let mut all_flags = flags.to_vec();
    all_flags.push(&fdname);
    let theirs = under_systemd(&all_flags, systemd, trigger);
    let ours: Vec<String> =
        ours.iter().zip(&names).map(|(spec, name)| format!("{spec},name={name}")).collect();
    let ours: Vec<&str> = ours.iter().map(String::as_str).collect();
    let (s, mine) = run(&ours, &[], &[]);
    assert_eq!(shape(&mine), shape(&theirs), "\nsockhold: {mine}\nsystemd: {theirs}");
    assert_eq!(mine["env"]["LISTEN_FDS"], theirs["env"]["LISTEN_FDS"]);
    assert_eq!(mine["env"]["LISTEN_FDNAMES"], theirs["env"]["LISTEN_FDNAMES"]);
    assert_eq!(theirs["env"]["LISTEN_PID"], theirs["pid"].to_string().as_str());
    stop(s);
}

fn have_systemd_socket_activate() -> bool {
    require_tool("systemd-socket-activate", "systemd").is_some()
}

#[test]
fn same_stream_sockets_as_systemd_socket_activate() {
    if !have_systemd_socket_activate() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (p1, p3) = (free_tcp_port(), free_tcp_port());
    let path = dir.path().join("sub/stream.sock");
    let mut specs = vec![
        format!("127.0.0.1:{p1}"),
        format!("{p3}"),
        path.display().to_string(),
        format!("@{}", abstract_name("parity-s")),
    ];
    if has_ipv6() {
        specs.push(format!("[::1]:{}", free_tcp_port()));
    }
    let mut ours = specs.clone();
    if let Some((ip, name, _)) = link_local_interface() {
        let port = free_tcp_port();
        specs.push(format!("[{ip}]:{port}%{name}")); // systemd's form
        ours.push(format!("[{ip}%{name}]:{port}"));
        specs.push(format!("[{ip}]:{}%{name}", port + 1)); // both forms are ours too
        ours.push(format!("[{ip}]:{}%{name}", port + 1));
    }
    compare(&[], &specs, &ours, || {
        TcpStream::connect(("127.0.0.1", p1)).expect("connect to wake systemd-socket-activate");
    });
}

#[test]
fn same_datagram_sockets_as_systemd_socket_activate() {
    if !have_systemd_socket_activate() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let port = free_udp_port();
    let path = dir.path().join("dgram.sock");
    let name = abstract_name("parity-d");
    let mut specs =
        vec![format!("127.0.0.1:{port}"), path.display().to_string(), format!("@{name}")];
    let mut ours = vec![
        format!("udp://127.0.0.1:{port}"),
        format!("unixgram://{}", path.display()),
        format!("unixgram://@{name}"),
    ];
    let bare = free_udp_port();
    specs.push(bare.to_string());
    ours.push(format!("udp://{bare}"));
    compare(&["--datagram"], &specs, &ours, || {
        UdpSocket::bind("127.0.0.1:0").unwrap().send_to(b"wake", ("127.0.0.1", port)).unwrap();
    });
}

#[test]
fn same_seqpacket_sockets_as_systemd_socket_activate() {
    if !have_systemd_socket_activate() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("packet.sock");
    let name = abstract_name("parity-p");
    let specs = vec![path.display().to_string(), format!("@{name}")];
    let ours = vec![format!("unixpacket://{}", path.display()), format!("unixpacket://@{name}")];
    let wake = path.clone();
    compare(&["--seqpacket"], &specs, &ours, move || {
        let fd = socket::socket(AddressFamily::Unix, SockType::SeqPacket, SockFlag::empty(), None);
        let addr = UnixAddr::new(&wake).unwrap();
        socket::connect(fd.unwrap().as_raw_fd(), &addr).expect("connect to wake it");
    });
}

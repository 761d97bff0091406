//! The socket side's tests: binding, options, Unix socket files, adoption, repair and
//! handover, against the real kernel.

use super::*;
use nix::fcntl::FdFlag;
use std::os::unix::net::{UnixDatagram, UnixListener};

use super::spec::tests::{parse, tcp};

fn bind(text: &str) -> anyhow::Result<Listener> {
    Listener::bind(&parse(text), "app")
}

fn is_cloexec(listener: &Listener) -> bool {
    let bits = fcntl(listener.fd(), nix::fcntl::FcntlArg::F_GETFD).unwrap();
    FdFlag::from_bits_retain(bits).contains(FdFlag::FD_CLOEXEC)
}

fn is_nonblocking(listener: &Listener) -> bool {
    let bits = fcntl(listener.fd(), F_GETFL).unwrap();
    OFlag::from_bits_retain(bits).contains(OFlag::O_NONBLOCK)
}

fn get<O: GetSockOpt>(listener: &Listener, opt: O) -> O::Val {
    socket::getsockopt(&listener.fd(), opt).unwrap()
}

fn errno_of(error: &anyhow::Error) -> Option<i32> {
    error.root_cause().downcast_ref::<io::Error>().and_then(io::Error::raw_os_error)
}

/// Binds `text` if the host has IPv6; `None` (and a note) if it has not.
fn bind_ipv6(text: &str) -> Option<Listener> {
    match bind(text) {
        Ok(listener) => Some(listener),
        Err(e) => {
            let unavailable = [Errno::EAFNOSUPPORT, Errno::EADDRNOTAVAIL].map(|e| e as i32);
            assert!(unavailable.contains(&errno_of(&e).unwrap_or(0)), "{e:#}");
            eprintln!("skipping: no IPv6: {e:#}");
            None
        }
    }
}

fn is_root() -> bool {
    Uid::effective().is_root()
}

/// A unique abstract socket name for this test process.
fn abstract_name(tag: &str) -> String {
    format!("sockhold-unit-{}-{tag}", std::process::id())
}

#[test]
fn tcp_port_zero_gets_a_real_port() {
    let listener = bind("127.0.0.1:0,backlog=8").unwrap();
    let port = listener.local_description().strip_prefix("127.0.0.1:").unwrap();
    assert_ne!(port.parse::<u16>().unwrap(), 0);
    assert_eq!(listener.name(), "app");
    assert_eq!(listener.spec.text, "127.0.0.1:0,backlog=8");
    assert!(is_cloexec(&listener));
    assert!(get(&listener, sockopt::ReuseAddr));
    assert!(!get(&listener, sockopt::ReusePort), "never SO_REUSEPORT unless asked");
    // It listens: the connection waits in the backlog, nobody accepts.
    std::net::TcpStream::connect(listener.local_description()).unwrap();
    assert!(!is_nonblocking(&listener));
    listener.set_nonblocking(true).unwrap();
    assert!(is_nonblocking(&listener));
    listener.set_nonblocking(false).unwrap();
    assert!(!is_nonblocking(&listener));
    listener.remove_socket_file(); // no-op for TCP
}

#[test]
fn set_spec_mode_gives_the_mode_the_spec_asks_for() {
    for (text, nonblock) in [("127.0.0.1:0", false), ("127.0.0.1:0,nonblock", true)] {
        let listener = bind(text).unwrap();
        for previous in [true, false] {
            listener.set_nonblocking(previous).unwrap(); // what a previous child left
            listener.set_spec_mode().unwrap();
            assert_eq!(is_nonblocking(&listener), nonblock, "{text} after {previous}");
        }
    }
}

#[test]
fn huge_backlog_means_the_kernel_maximum() {
    let listener = bind("127.0.0.1:0,backlog=4000000000,name=big").unwrap();
    assert_eq!(listener.backlog(), Backlog::MAXALLOWABLE);
}

#[test]
fn ipv6_loopback() {
    if let Some(listener) = bind_ipv6("[::1]:0") {
        assert!(listener.local_description().starts_with("[::1]:"));
    }
}

#[test]
fn bare_port_is_dual_stack() {
    let listener = bind("0,name=web").unwrap();
    assert_eq!(listener.name(), "web");
    let local: SockaddrStorage = socket::getsockname(listener.fd().as_raw_fd()).unwrap();
    if local.as_sockaddr_in6().is_some() {
        assert!(listener.local_description().starts_with("[::]:"));
        assert!(!get(&listener, sockopt::Ipv6V6Only));
    } else {
        assert!(listener.local_description().starts_with("0.0.0.0:"));
    }
}

#[test]
fn v6only_sets_ipv6_v6only_both_ways() {
    for (text, expected) in [
        ("0,v6only", true),
        ("0,v6only=0", false),
        ("[::]:0,v6only=yes", true),
        ("[::]:0,v6only=off", false),
        ("udp://[::]:0,v6only=true", true),
    ] {
        if let Some(listener) = bind_ipv6(text) {
            assert_eq!(get(&listener, sockopt::Ipv6V6Only), expected, "{text}");
        }
    }
}

#[test]
fn v6only_on_a_name_that_resolves_to_ipv4_is_an_error() {
    // A literal is refused when parsing; a name only once it is resolved.
    let spec = ListenSpec {
        text: "name-of-127.0.0.1:0,v6only".into(),
        address: tcp("127.0.0.1", 0, Family::Any),
        options: ListenOptions { v6only: Some(true), ..ListenOptions::default() },
    };
    let error = Listener::bind(&spec, "app").unwrap_err();
    assert_eq!(
        format!("{error:#}"),
        "option 'v6only' needs an IPv6 socket, and 127.0.0.1:0 is IPv4"
    );
}

#[test]
fn tcp_bind_error_names_the_address() {
    let first = bind("127.0.0.1:0").unwrap();
    // SO_REUSEADDR does not allow two listeners on one port.
    let error = bind(first.local_description()).unwrap_err();
    let expected = format!("failed to bind {}: ", first.local_description());
    assert!(format!("{error:#}").starts_with(&expected), "{error:#}");
}

#[test]
fn udp_is_bound_without_so_reuseaddr_and_not_listening() {
    let listener = bind("udp://127.0.0.1:0,name=dns").unwrap();
    let local = listener.local_description().to_owned();
    let addr = local.strip_prefix("udp://").unwrap_or_else(|| panic!("{local}"));
    assert_ne!(addr, "127.0.0.1:0");
    assert_eq!(get(&listener, sockopt::SockType), SockType::Datagram);
    assert!(!get(&listener, sockopt::AcceptConn));
    assert!(!get(&listener, sockopt::ReuseAddr), "it would let any uid share the port");
    assert!(is_cloexec(&listener));
    // A datagram waits in the receive queue for a child.
    let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    client.send_to(b"hello", addr).unwrap();
    let mut buf = [0u8; 16];
    let (n, _) = socket::recvfrom::<SockaddrStorage>(listener.fd().as_raw_fd(), &mut buf).unwrap();
    assert_eq!(&buf[..n], b"hello");
    // Nobody else can bind the port, not even with SO_REUSEADDR (on UDP, two sockets that
    // both set it share the port, and the newest one gets every datagram).
    let error = bind(&format!("udp://{addr}")).unwrap_err();
    assert!(format!("{error:#}").starts_with(&format!("failed to bind udp://{addr}: ")));
    let intruder = new_socket(AddressFamily::Inet, SocketKind::Datagram, SockFlag::empty());
    let intruder = intruder.unwrap();
    socket::setsockopt(&intruder, sockopt::ReuseAddr, &true).unwrap();
    let target = SockaddrStorage::from(addr.parse::<SocketAddr>().unwrap());
    assert_eq!(socket::bind(intruder.as_raw_fd(), &target), Err(Errno::EADDRINUSE));
    if let Some(v6) = bind_ipv6("udp6://[::1]:0") {
        assert!(v6.local_description().starts_with("udp://[::1]:"), "{}", v6.local_description());
    }
}

#[test]
fn every_unix_kind_binds_a_file_and_removes_it() {
    let dir = tempfile::tempdir().unwrap();
    for (scheme, ty, listening) in [
        ("unix", SockType::Stream, true),
        ("unixgram", SockType::Datagram, false),
        ("unixpacket", SockType::SeqPacket, true),
    ] {
        let path = dir.path().join(format!("{scheme}.sock"));
        let listener = bind(&format!("{scheme}://{},name=web", path.display())).unwrap();
        let prefix = if scheme == "unix" { String::new() } else { format!("{scheme}://") };
        assert_eq!(listener.local_description(), format!("{prefix}{}", path.display()));
        assert_eq!(get(&listener, sockopt::SockType), ty, "{scheme}");
        assert_eq!(get(&listener, sockopt::AcceptConn), listening, "{scheme}");
        assert!(is_cloexec(&listener));
        assert!(fs::symlink_metadata(&path).unwrap().file_type().is_socket());
        listener.remove_socket_file();
        assert!(!path.exists(), "{scheme}");
    }
}

#[test]
fn abstract_sockets_have_no_file_and_refuse_a_second_holder() {
    for (scheme, ty, listening) in [
        ("unix", SockType::Stream, true),
        ("unixgram", SockType::Datagram, false),
        ("unixpacket", SockType::SeqPacket, true),
    ] {
        let name = abstract_name(scheme);
        let listener = bind(&format!("{scheme}://@{name}")).unwrap();
        let prefix = if scheme == "unix" { String::new() } else { format!("{scheme}://") };
        assert_eq!(listener.local_description(), format!("{prefix}@{name}"));
        assert_eq!(get(&listener, sockopt::SockType), ty, "{scheme}");
        assert_eq!(get(&listener, sockopt::AcceptConn), listening, "{scheme}");
        let local: UnixAddr = socket::getsockname(listener.fd().as_raw_fd()).unwrap();
        assert_eq!(local.as_abstract(), Some(name.as_bytes()), "no trailing NUL in the name");
        let error = bind(&format!("{scheme}://@{name}")).unwrap_err();
        let expected = format!("failed to bind {prefix}@{name}: Address already in use");
        assert!(format!("{error:#}").starts_with(&expected), "{error:#}");
        listener.remove_socket_file(); // no file: nothing to do
    }
    let listener = bind(&format!("@{}", abstract_name("bare"))).unwrap();
    let addr = UnixAddr::new_abstract(abstract_name("bare").as_bytes()).unwrap();
    let client = new_socket(AddressFamily::Unix, SocketKind::Stream, SockFlag::empty()).unwrap();
    socket::connect(client.as_raw_fd(), &addr).unwrap();
    drop(listener);
}

#[test]
fn unix_socket_lifecycle() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.sock");
    let text = format!("unix://{},name=web", path.display());
    let listener = bind(&text).unwrap();
    assert_eq!(listener.local_description(), path.display().to_string());
    assert_eq!(listener.name(), "web");
    assert!(is_cloexec(&listener));
    assert!(fs::symlink_metadata(&path).unwrap().file_type().is_socket());
    std::os::unix::net::UnixStream::connect(&path).unwrap();

    let error = bind(&text).unwrap_err();
    let expected = format!("'{}' is in use: a server answers on it", path.display());
    assert_eq!(format!("{error:#}"), expected);

    listener.remove_socket_file();
    assert!(!path.exists());
    listener.remove_socket_file(); // idempotent
}

#[test]
fn stale_socket_file_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stale.sock");
    drop(UnixListener::bind(&path).unwrap()); // leaves the file behind
    let listener = bind(path.to_str().unwrap()).unwrap();
    std::os::unix::net::UnixStream::connect(&path).unwrap();
    listener.remove_socket_file();
    assert!(!path.exists());
    // The same for a datagram socket's file.
    drop(UnixDatagram::bind(&path).unwrap());
    let listener = bind(&format!("unixgram://{}", path.display())).unwrap();
    assert_eq!(get(&listener, sockopt::SockType), SockType::Datagram);
    listener.remove_socket_file();
}

#[test]
fn a_live_socket_of_any_kind_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("live.sock");
    let expected = format!("'{}' is in use: a server answers on it", path.display());
    let live = UnixDatagram::bind(&path).unwrap();
    for scheme in ["unix", "unixgram", "unixpacket"] {
        let error = bind(&format!("{scheme}://{}", path.display())).unwrap_err();
        assert_eq!(format!("{error:#}"), expected, "{scheme} on a live datagram socket");
    }
    drop(live);
    fs::remove_file(&path).unwrap();
    let _live = UnixListener::bind(&path).unwrap();
    for scheme in ["unixgram", "unixpacket"] {
        let error = bind(&format!("{scheme}://{}", path.display())).unwrap_err();
        assert_eq!(format!("{error:#}"), expected, "{scheme} on a live stream socket");
    }
}

#[test]
fn non_socket_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("file");
    fs::write(&path, "data").unwrap();
    let error = bind(path.to_str().unwrap()).unwrap_err();
    assert_eq!(format!("{error:#}"), format!("'{}' exists and is not a socket", path.display()));
    assert_eq!(fs::read_to_string(&path).unwrap(), "data");
}

/// The process umask, from /proc (reading it with umask(2) would change it meanwhile).
fn umask() -> u32 {
    let status = fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find_map(|l| l.strip_prefix("Umask:")).unwrap();
    u32::from_str_radix(line.trim(), 8).unwrap()
}

#[test]
fn missing_directories_are_created_0755() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a/b/app.sock");
    let listener = bind(&format!("unixgram://{}", path.display())).unwrap();
    for sub in ["a", "a/b"] {
        let meta = fs::metadata(dir.path().join(sub)).unwrap();
        assert!(meta.is_dir());
        assert_eq!(meta.mode() & 0o7777, 0o755 & !umask(), "{sub}");
    }
    listener.remove_socket_file();
    assert!(!path.exists());
    assert!(dir.path().join("a/b").is_dir(), "directories stay, as systemd leaves them");
}

#[test]
fn a_directory_that_cannot_be_created_is_named() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("file"), "").unwrap();
    let path = dir.path().join("file/sub/a.sock");
    let error = bind(path.to_str().unwrap()).unwrap_err();
    let expected = format!(
        "failed to create directory '{}' for {}",
        dir.path().join("file/sub").display(),
        path.display()
    );
    assert!(format!("{error:#}").starts_with(&expected), "{error:#}");
}

#[test]
fn mode_owner_and_group_of_the_socket_file() {
    let dir = tempfile::tempdir().unwrap();
    let (uid, gid) = (Uid::effective().as_raw(), Gid::effective().as_raw());
    // mode= more open than the umask allows, and one less open than the default.
    for (scheme, mode) in [("unix", 0o666), ("unixgram", 0o600), ("unixpacket", 0o640)] {
        let path = dir.path().join(format!("{scheme}.sock"));
        let text = format!("{scheme}://{},mode={mode:o},owner={uid},group={gid}", path.display());
        let listener = bind(&text).unwrap();
        let meta = fs::symlink_metadata(&path).unwrap();
        assert_eq!(meta.mode() & 0o7777, mode, "{text}");
        assert_eq!((meta.uid(), meta.gid()), (uid, gid), "{text}");
        listener.remove_socket_file();
    }
    if !is_root() {
        eprintln!("skipping chown to another user: not root");
        return;
    }
    let path = dir.path().join("other.sock");
    let listener = bind(&format!("{},owner=4242,group=4343,mode=0660", path.display())).unwrap();
    let meta = fs::symlink_metadata(&path).unwrap();
    assert_eq!((meta.uid(), meta.gid(), meta.mode() & 0o7777), (4242, 4343, 0o660));
    listener.remove_socket_file();
    let path = dir.path().join("group-only.sock");
    let listener = bind(&format!("{},group=4343", path.display())).unwrap();
    let meta = fs::symlink_metadata(&path).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (uid, 4343), "owner= unset leaves the owner");
    listener.remove_socket_file();
}

#[test]
fn replaced_socket_file_is_not_removed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.sock");
    let listener = bind(path.to_str().unwrap()).unwrap();
    fs::remove_file(&path).unwrap();
    fs::write(&path, "someone else's").unwrap();
    listener.remove_socket_file();
    assert_eq!(fs::read_to_string(&path).unwrap(), "someone else's");
}

#[test]
fn nodelay_and_keepalive_reach_accepted_connections() {
    let listener = bind("127.0.0.1:0,nodelay,keepalive").unwrap();
    assert!(get(&listener, sockopt::TcpNoDelay));
    assert!(get(&listener, sockopt::KeepAlive));
    let _client = std::net::TcpStream::connect(listener.local_description()).unwrap();
    let std_listener = std::net::TcpListener::from(listener.fd().try_clone_to_owned().unwrap());
    let (conn, _) = std_listener.accept().unwrap();
    assert!(socket::getsockopt(&conn, sockopt::TcpNoDelay).unwrap(), "inherited by accept");
    assert!(socket::getsockopt(&conn, sockopt::KeepAlive).unwrap(), "inherited by accept");
    let plain = bind("127.0.0.1:0").unwrap();
    assert!(!get(&plain, sockopt::TcpNoDelay) && !get(&plain, sockopt::KeepAlive));
}

#[test]
fn reuseport_lets_a_second_socket_share_the_port() {
    let first = bind("127.0.0.1:0,reuseport").unwrap();
    assert!(get(&first, sockopt::ReusePort));
    let second = bind(&format!("{},reuseport", first.local_description())).unwrap();
    assert_eq!(first.local_description(), second.local_description());
    let first = bind("udp://127.0.0.1:0,reuseport").unwrap();
    bind(&format!("{},reuseport", first.local_description())).unwrap();
}

/// Whether the kernel lets anyone bind addresses the host does not have.
fn nonlocal_bind_allowed(version: &str) -> bool {
    let path = format!("/proc/sys/net/{version}/ip_nonlocal_bind");
    fs::read_to_string(path).is_ok_and(|v| v.trim() != "0")
}

#[test]
fn freebind_binds_an_address_the_host_does_not_have() {
    // TEST-NET-3 and the IPv6 documentation prefix: never a local address.
    let listener = bind("203.0.113.7:0,freebind").unwrap();
    assert!(get(&listener, sockopt::IpFreebind));
    assert!(listener.local_description().starts_with("203.0.113.7:"));
    if !nonlocal_bind_allowed("ipv4") {
        let error = bind("203.0.113.7:0").unwrap_err();
        assert_eq!(errno_of(&error), Some(Errno::EADDRNOTAVAIL as i32), "{error:#}");
    }
    if let Some(v6) = bind_ipv6("udp://[2001:db8::7]:0,freebind") {
        assert!(get(&v6, sockopt::IpFreebind));
        if !nonlocal_bind_allowed("ipv6") {
            let error = bind("udp://[2001:db8::7]:0").unwrap_err();
            assert_eq!(errno_of(&error), Some(Errno::EADDRNOTAVAIL as i32), "{error:#}");
        }
    }
}

#[test]
fn device_binds_to_the_interface() {
    match bind("127.0.0.1:0,device=lo") {
        Ok(listener) => {
            let device = get(&listener, sockopt::BindToDevice);
            assert_eq!(device.to_str(), Some("lo"));
        }
        // Before Linux 5.7, SO_BINDTODEVICE needs CAP_NET_RAW.
        Err(e) if errno_of(&e) == Some(Errno::EPERM as i32) => eprintln!("skipping: {e:#}"),
        Err(e) => panic!("{e:#}"),
    }
    let error = bind("udp://127.0.0.1:0,device=nosuchdev0").unwrap_err();
    let message = format!("{error:#}");
    assert!(
        message.starts_with("failed to set SO_BINDTODEVICE=nosuchdev0 on udp://127.0.0.1:0: "),
        "{message}"
    );
}

#[test]
fn buffer_sizes_are_what_the_kernel_reports_doubled() {
    let listener = bind("udp://127.0.0.1:0,rcvbuf=64K,sndbuf=100000").unwrap();
    assert_eq!(get(&listener, sockopt::RcvBuf), 2 * 65536);
    assert_eq!(get(&listener, sockopt::SndBuf), 2 * 100000);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b.sock");
    let listener = bind(&format!("{},rcvbuf=50000,sndbuf=60000", path.display())).unwrap();
    assert_eq!(get(&listener, sockopt::RcvBuf), 100000);
    assert_eq!(get(&listener, sockopt::SndBuf), 120000);
    listener.remove_socket_file();
    // Past net.core.rmem_max: SO_RCVBUFFORCE when privileged, else the cap and a warning.
    let max: usize = fs::read_to_string("/proc/sys/net/core/rmem_max")
        .map_or(212992, |v| v.trim().parse().unwrap());
    let size = max + 4096;
    let listener = bind(&format!("127.0.0.1:0,rcvbuf={size}")).unwrap();
    let got = get(&listener, sockopt::RcvBuf);
    assert!(got == 2 * size || got == 2 * max, "{got} for {size}, max {max}");
}

/// An interface with a link-local IPv6 address, and its index, from /proc/net/if_inet6.
fn link_local_interface() -> Option<(Ipv6Addr, String, u32)> {
    let table = fs::read_to_string("/proc/net/if_inet6").ok()?;
    table.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [hex, index, _, scope, _, name] = fields[..] else { return None };
        if scope != "20" {
            return None; // not link-local
        }
        let bits = u128::from_str_radix(hex, 16).ok()?;
        Some((Ipv6Addr::from(bits), name.to_owned(), u32::from_str_radix(index, 16).ok()?))
    })
}

#[test]
fn scoped_ipv6_by_name_and_by_index() {
    let Some((ip, name, index)) = link_local_interface() else {
        eprintln!("skipping: no interface with a link-local IPv6 address");
        return;
    };
    for text in [
        format!("[{ip}%{name}]:0"),
        format!("[{ip}%{index}]:0"),
        format!("[{ip}]:0%{name}"),
        format!("udp://[{ip}%{name}]:0"),
    ] {
        let listener = bind(&text).unwrap_or_else(|e| panic!("{text}: {e:#}"));
        let local: SockaddrStorage = socket::getsockname(listener.fd().as_raw_fd()).unwrap();
        let local = local.as_sockaddr_in6().unwrap();
        assert_eq!((local.ip(), local.scope_id()), (ip, index), "{text}");
        assert!(listener.local_description().contains(&format!("%{index}]:")), "{text}");
    }
    // A link-local address needs its scope: without it the kernel refuses.
    let error = bind(&format!("[{ip}]:0")).unwrap_err();
    assert_eq!(errno_of(&error), Some(Errno::EINVAL as i32), "{error:#}");
    let error = bind(&format!("[{ip}%nosuchdev0]:0")).unwrap_err();
    assert!(format!("{error:#}").contains("no interface 'nosuchdev0'"), "{error:#}");
}

/// A copy of the listener, as a child holds it, shut down as Server::Starter's Gazelle did.
fn shut_down_a_copy(listener: &Listener) -> OwnedFd {
    let copy = nix::unistd::dup(listener.fd()).unwrap();
    socket::shutdown(copy.as_raw_fd(), socket::Shutdown::Both).unwrap();
    copy
}

#[test]
fn a_shut_down_tcp_listener_listens_again_on_the_same_socket_and_port() {
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    // Port 0: the shutdown releases the port the kernel chose. A fixed port stays bound.
    for text in ["127.0.0.1:0".to_string(), format!("127.0.0.1:{}", free.port())] {
        let mut listener = bind(&text).unwrap();
        let addr: SocketAddr = listener.local_description().parse().unwrap();
        let raw = listener.fd().as_raw_fd();
        assert!(!listener.ensure_listening().unwrap(), "{text}: nothing to repair");
        let copy = shut_down_a_copy(&listener);
        assert!(!get(&listener, sockopt::AcceptConn), "{text}: the shutdown stopped it");
        assert!(std::net::TcpStream::connect(addr).is_err(), "{text}: refused meanwhile");
        assert!(listener.ensure_listening().unwrap(), "{text}: repaired");
        assert_eq!(listener.fd().as_raw_fd(), raw, "{text}: the same socket");
        let local: SockaddrStorage = socket::getsockname(raw).unwrap();
        assert_eq!(local.as_sockaddr_in().map(|a| a.port()), Some(addr.port()), "{text}");
        let _client = std::net::TcpStream::connect(addr).unwrap();
        // The child's copy is the same socket: it accepts the connection.
        let copy = std::net::TcpListener::from(copy);
        copy.accept().unwrap_or_else(|e| panic!("{text}: the child's copy accepts: {e}"));
        assert!(!listener.ensure_listening().unwrap(), "{text}: repaired once");
    }
}

#[test]
fn a_shut_down_unix_listener_is_replaced_by_a_new_socket_on_the_same_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.sock");
    let mut listener = bind(&format!("unix://{}", path.display())).unwrap();
    let copy = shut_down_a_copy(&listener);
    let refused = std::os::unix::net::UnixStream::connect(&path).unwrap_err();
    assert_eq!(refused.raw_os_error(), Some(Errno::ECONNREFUSED as i32));
    assert!(listener.ensure_listening().unwrap(), "repaired");
    let _client = std::os::unix::net::UnixStream::connect(&path).unwrap();
    assert!(!listener.ensure_listening().unwrap(), "repaired once");
    drop(copy);
    listener.remove_socket_file();
    assert!(!path.exists(), "the new socket file is the one sockhold removes");
}

#[test]
fn datagram_sockets_are_never_repaired() {
    let mut listener = bind("udp://127.0.0.1:0").unwrap();
    let _ = socket::shutdown(listener.fd().as_raw_fd(), socket::Shutdown::Both);
    assert!(!listener.ensure_listening().unwrap());
}

/// Whether this process may load eBPF; says SKIPPED (and fails under CI) when not.
fn may_steer(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert!(std::env::var("CI").as_deref() != Ok("true"), "{test}: needs root (CAP_BPF)");
    eprintln!("SKIPPED: {test}: steer=flow needs root");
    false
}

#[test]
fn a_steered_listener_gives_each_unit_a_socket_of_its_own_in_a_free_slot() {
    if !may_steer("a_steered_listener_gives_each_unit_a_socket_of_its_own_in_a_free_slot") {
        return;
    }
    for text in ["udp://127.0.0.1:0,steer=flow,rcvbuf=64K,nonblock", "udp://[::]:0,steer=flow"] {
        let mut listener = bind(text).unwrap();
        assert!(listener.steering().is_some(), "{text}");
        let anchor = socket::getsockname::<SockaddrStorage>(listener.fd().as_raw_fd()).unwrap();
        let (a, slot_a) = listener.unit_socket().unwrap();
        let (b, slot_b) = listener.unit_socket().unwrap();
        assert_eq!((slot_a, slot_b), (0, 1), "{text}");
        for own in [&a, &b] {
            // The anchor's own address and port (the kernel chose it), and the same v6only.
            assert_eq!(socket::getsockname::<SockaddrStorage>(own.as_raw_fd()).unwrap(), anchor);
            assert!(socket::getsockopt(own, sockopt::ReusePort).unwrap());
            if text.contains("[::]") {
                assert!(!socket::getsockopt(own, sockopt::Ipv6V6Only).unwrap(), "{text}");
            }
            let flags = OFlag::from_bits_retain(fcntl(own, F_GETFL).unwrap());
            assert_eq!(flags.contains(OFlag::O_NONBLOCK), text.contains("nonblock"), "{text}");
        }
        // A slot is free again only once it is released.
        listener.release_slot(a, slot_a);
        assert_eq!(listener.spare_slot(), None, "unit b still holds a socket");
        let (a, again) = listener.unit_socket().unwrap();
        assert_eq!(again, slot_a);
        let (_, next) = listener.unit_socket().unwrap();
        assert_eq!(next, 2);
        drop((a, b));
        // The handover names the steering's fds and the slots in use.
        let state = listener.handover();
        let steering = state.steering.as_ref().expect("a steering");
        assert_eq!(steering.slots, vec![0, 1, 2]);
        assert_eq!(listener.handover_fds().len(), 5);
        assert_eq!(Listener::check_steering_handover(&state, false).unwrap().len(), 4);
    }
}

#[test]
fn a_steering_handover_is_checked() {
    let state = |spec: &str, program: RawFd, slots: Vec<u32>| Handover {
        fd: 3,
        spec: spec.into(),
        name: "app".into(),
        local: "udp://127.0.0.1:53".into(),
        unix_file: None,
        kind: KindHandover::Datagram,
        steering: Some(SteeringHandover { program, sockets: 5, flows: 6, config: 7, slots }),
    };
    let steered = "udp://127.0.0.1:53,steer=flow";
    assert_eq!(
        Listener::check_steering_handover(&state(steered, 4, vec![0]), true),
        Ok(vec![4, 5, 6, 7])
    );
    for (bad, want) in [
        (state("udp://127.0.0.1:53", 4, vec![]), "its spec does not steer"),
        (state(steered, -1, vec![]), "has fd -1"),
        (state(steered, 4, vec![MAX_SLOTS]), "has slot 256"),
    ] {
        let err = Listener::check_steering_handover(&bad, true).unwrap_err();
        assert!(err.contains(want), "{err}");
    }
    // Not a program at all: refused before anything is taken over.
    let (a, _b) = UnixDatagram::pair().unwrap();
    let fd = a.as_raw_fd();
    let fake = Handover {
        steering: Some(SteeringHandover {
            program: fd,
            sockets: fd,
            flows: fd,
            config: fd,
            slots: vec![],
        }),
        ..state(steered, 4, vec![])
    };
    let err = Listener::check_steering_handover(&fake, false).unwrap_err();
    assert!(err.contains("the steering of udp://127.0.0.1:53,steer=flow"), "{err}");
}

#[test]
fn the_last_units_socket_is_kept_and_queues_datagrams_for_the_next_unit() {
    if !may_steer("the_last_units_socket_is_kept_and_queues_datagrams_for_the_next_unit") {
        return;
    }
    let mut listener = bind("udp://127.0.0.1:0,steer=flow").unwrap();
    let addr = socket::getsockname::<SockaddrStorage>(listener.fd().as_raw_fd()).unwrap();
    let addr = addr.as_sockaddr_in().map(|a| std::net::SocketAddr::from((a.ip(), a.port())));
    let addr = addr.expect("an IPv4 address");
    let (own, slot) = listener.unit_socket().unwrap();
    // The only unit is gone (a crash, say): its socket stays in its slot, the target of every flow.
    listener.release_slot(own, slot);
    assert_eq!(listener.spare_slot(), Some(slot));
    let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    client.send_to(b"while nobody runs", addr).unwrap();
    // The next unit gets that very socket, with the datagram waiting in it.
    let (next, again) = listener.unit_socket().unwrap();
    assert_eq!(again, slot);
    assert_eq!(listener.spare_slot(), None);
    let next = std::net::UdpSocket::from(next);
    next.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 64];
    let n = next.recv(&mut buf).expect("the datagram sent while no unit ran");
    assert_eq!(&buf[..n], b"while nobody runs");
}

//! The steering against the real kernel: sockets of one reuseport group on loopback, the
//! program attached, datagrams from distinct client ports; and the instruction encoding.

use std::net::Ipv4Addr;

use super::*;

/// Whether this process may load eBPF; says SKIPPED (and fails under CI) when not.
fn privileged(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{test}: needs root (CAP_BPF and CAP_NET_ADMIN)"
    );
    eprintln!("SKIPPED: {test}: loading eBPF needs root");
    false
}

use std::net::UdpSocket;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, SockaddrStorage, sockopt};

/// A member of a reuseport group, bound to `addr` with SO_REUSEPORT as sockhold binds.
fn member(addr: SocketAddr) -> UdpSocket {
    let family = if addr.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
    let fd = socket::socket(family, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None).unwrap();
    socket::setsockopt(&fd, sockopt::ReusePort, &true).unwrap();
    socket::bind(fd.as_raw_fd(), &SockaddrStorage::from(addr)).unwrap();
    UdpSocket::from(fd)
}

/// `n` members of one group on `ip` (the first bound to port 0, the others to its port),
/// and the steering attached to it.
fn group(ip: IpAddr, n: usize, max_flows: u32) -> (FlowSteering, Vec<UdpSocket>, SocketAddr) {
    let first = member(SocketAddr::new(ip, 0));
    let addr = first.local_addr().unwrap();
    let mut members = vec![first];
    members.extend((1..n).map(|_| member(addr)));
    let steering = FlowSteering::new(max_flows).unwrap();
    steering.attach(members[0].as_fd()).unwrap();
    for (slot, m) in members.iter().enumerate() {
        steering.set_slot(slot as u32, m.as_fd()).unwrap();
    }
    (steering, members, addr)
}

/// A client on its own port of `ip`.
fn client(ip: IpAddr) -> UdpSocket {
    UdpSocket::bind(SocketAddr::new(ip, 0)).unwrap()
}

/// Sends `payload` from `from` to `to` and says which of `members` (None: closed) got it.
fn deliver(from: &UdpSocket, to: SocketAddr, members: &[Option<&UdpSocket>]) -> usize {
    let payload = format!("from {}", from.local_addr().unwrap());
    from.send_to(payload.as_bytes(), to).unwrap();
    let open: Vec<(usize, &UdpSocket)> =
        members.iter().enumerate().filter_map(|(i, m)| m.map(|m| (i, m))).collect();
    let mut fds: Vec<PollFd<'_>> =
        open.iter().map(|(_, m)| PollFd::new(m.as_fd(), PollFlags::POLLIN)).collect();
    let n = poll(&mut fds, PollTimeout::from(5000u16)).unwrap();
    assert!(n > 0, "{payload}: no member got it within 5 s");
    let ready: Vec<usize> = fds
        .iter()
        .enumerate()
        .filter(|(_, f)| f.revents().is_some_and(|r| r.contains(PollFlags::POLLIN)))
        .map(|(i, _)| i)
        .collect();
    assert_eq!(ready.len(), 1, "{payload}: more than one member has data");
    let (index, sock) = open[ready[0]];
    let mut buf = [0u8; 64];
    let (len, peer) = sock.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..len], payload.as_bytes());
    // A dual-stack socket sees an IPv4 client v4-mapped.
    let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
    assert_eq!(peer, from.local_addr().unwrap());
    index
}

fn flow_of(steering: &FlowSteering, c: &UdpSocket) -> Option<FlowInfo> {
    let remote = c.local_addr().unwrap();
    steering.flows().unwrap().into_iter().find(|f| f.remote == remote)
}

/// A flow stays on its socket when new flows go elsewhere, and is re-owned once its
/// socket's slot is cleared.
fn pinned_then_reowned(ip: IpAddr, test: &str) {
    if !privileged(test) {
        return;
    }
    let (steering, mut members, addr) = group(ip, 2, MAX_FLOWS);
    steering.set_new_flow_slots(&[0]).unwrap();
    let (x, y) = (client(ip), client(ip));
    fn both(m: &[UdpSocket]) -> [Option<&UdpSocket>; 2] {
        [Some(&m[0]), Some(&m[1])]
    }
    assert_eq!(deliver(&x, addr, &both(&members)), 0);
    steering.set_new_flow_slots(&[1]).unwrap();
    for _ in 0..3 {
        assert_eq!(deliver(&x, addr, &both(&members)), 0, "the flow moved");
    }
    assert_eq!(deliver(&y, addr, &both(&members)), 1, "a new flow went to the old slot");
    assert_eq!(flow_of(&steering, &x).unwrap().slot, 0);
    assert_eq!(flow_of(&steering, &y).unwrap().slot, 1);
    // The unit of slot 0 ends: its flows are forgotten, then re-owned by the new slot.
    steering.clear_slot(0).unwrap();
    assert_eq!(flow_of(&steering, &x), None);
    let a = members.remove(0);
    drop(a);
    assert_eq!(deliver(&x, addr, &[None, Some(&members[0])]), 1);
    assert_eq!(flow_of(&steering, &x).unwrap().slot, 1);
    assert_eq!(deliver(&y, addr, &[None, Some(&members[0])]), 1);
}

#[test]
fn a_flow_stays_with_its_socket_v4() {
    pinned_then_reowned(IpAddr::V4(Ipv4Addr::LOCALHOST), "a_flow_stays_with_its_socket_v4");
}

#[test]
fn a_flow_stays_with_its_socket_v6() {
    pinned_then_reowned(IpAddr::V6(Ipv6Addr::LOCALHOST), "a_flow_stays_with_its_socket_v6");
}

#[test]
fn a_closed_socket_leaves_its_slot_and_its_flows_are_reowned() {
    if !privileged("a_closed_socket_leaves_its_slot_and_its_flows_are_reowned") {
        return;
    }
    let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let (steering, mut members, addr) = group(ip, 2, MAX_FLOWS);
    steering.set_new_flow_slots(&[0]).unwrap();
    let x = client(ip);
    assert_eq!(deliver(&x, addr, &[Some(&members[0]), Some(&members[1])]), 0);
    steering.set_new_flow_slots(&[1]).unwrap();
    // No clear_slot: closing the socket is enough, the kernel empties its slot.
    drop(members.remove(0));
    assert_eq!(deliver(&x, addr, &[None, Some(&members[0])]), 1);
    assert_eq!(flow_of(&steering, &x).unwrap().slot, 1);
}

#[test]
fn new_flows_are_spread_over_the_new_flow_slots() {
    if !privileged("new_flows_are_spread_over_the_new_flow_slots") {
        return;
    }
    let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let (steering, members, addr) = group(ip, 3, MAX_FLOWS);
    steering.set_new_flow_slots(&[1, 2]).unwrap();
    let all = [Some(&members[0]), Some(&members[1]), Some(&members[2])];
    let clients: Vec<UdpSocket> = (0..32).map(|_| client(ip)).collect();
    let mut got = [0usize; 3];
    for c in &clients {
        let first = deliver(c, addr, &all);
        got[first] += 1;
        assert_eq!(deliver(c, addr, &all), first, "a flow changed sockets");
        assert_eq!(flow_of(&steering, c).unwrap().slot, first as u32);
    }
    assert_eq!(got[0], 0, "a flow went to a slot that takes no new flows: {got:?}");
    assert!(got[1] > 0 && got[2] > 0, "not spread: {got:?}");
    let by_slot = steering.flows_by_slot().unwrap();
    assert_eq!(by_slot.get(&1).map(|s| s.count), Some(got[1]));
    assert_eq!(by_slot.get(&2).map(|s| s.count), Some(got[2]));
}

#[test]
fn the_flow_table_is_bounded() {
    if !privileged("the_flow_table_is_bounded") {
        return;
    }
    let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let (steering, members, addr) = group(ip, 1, 8);
    steering.set_new_flow_slots(&[0]).unwrap();
    let clients: Vec<UdpSocket> = (0..40).map(|_| client(ip)).collect();
    for c in &clients {
        assert_eq!(deliver(c, addr, &[Some(&members[0])]), 0);
    }
    let flows = steering.flows().unwrap();
    assert!(!flows.is_empty() && flows.len() <= 8, "{} flows", flows.len());
    assert!(flow_of(&steering, clients.last().unwrap()).is_some(), "the newest was evicted");
}

#[test]
fn counts_and_last_seen_follow_the_datagrams() {
    if !privileged("counts_and_last_seen_follow_the_datagrams") {
        return;
    }
    let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let (steering, members, addr) = group(ip, 2, MAX_FLOWS);
    let both = [Some(&members[0]), Some(&members[1])];
    steering.set_new_flow_slots(&[1]).unwrap();
    assert!(steering.flows_by_slot().unwrap().is_empty());
    let (x, y) = (client(ip), client(ip));
    let before = steering.now();
    assert_eq!(deliver(&x, addr, &both), 1);
    let first = flow_of(&steering, &x).unwrap();
    assert_eq!(first.local, None, "a socket bound to one address has no local part");
    assert!(first.last_seen >= before && first.last_seen <= steering.now());
    // The coarse clock moves by ticks: wait for the next one (at most 10 ms).
    while steering.now() == first.last_seen {
        std::hint::spin_loop();
    }
    assert_eq!(deliver(&x, addr, &both), 1);
    let second = flow_of(&steering, &x).unwrap();
    assert!(second.last_seen > first.last_seen);
    assert_eq!(deliver(&y, addr, &both), 1);
    let by_slot = steering.flows_by_slot().unwrap();
    assert_eq!(by_slot.len(), 1);
    let slot = by_slot[&1];
    assert_eq!(slot.count, 2);
    assert_eq!(slot.last_seen, flow_of(&steering, &y).unwrap().last_seen);
    assert!(slot.last_seen >= second.last_seen);
}

#[test]
fn a_wildcard_socket_keys_flows_by_local_address_too() {
    if !privileged("a_wildcard_socket_keys_flows_by_local_address_too") {
        return;
    }
    let (steering, members, addr) = group(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 1, MAX_FLOWS);
    steering.set_new_flow_slots(&[0]).unwrap();
    let to = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), addr.port());
    let x = client(IpAddr::V4(Ipv4Addr::LOCALHOST));
    assert_eq!(deliver(&x, to, &[Some(&members[0])]), 0);
    let flow = flow_of(&steering, &x).unwrap();
    assert_eq!(flow.local, Some(IpAddr::V4(Ipv4Addr::LOCALHOST)));
}

#[test]
fn the_fds_carry_the_steering_over() {
    if !privileged("the_fds_carry_the_steering_over") {
        return;
    }
    let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let (steering, members, addr) = group(ip, 2, MAX_FLOWS);
    let both = [Some(&members[0]), Some(&members[1])];
    steering.set_new_flow_slots(&[0]).unwrap();
    let x = client(ip);
    assert_eq!(deliver(&x, addr, &both), 0);
    let taken = FlowSteering::from_fds(steering.into_fds()).unwrap();
    assert_eq!(taken.max_flows(), MAX_FLOWS);
    taken.set_new_flow_slots(&[1]).unwrap();
    assert_eq!(deliver(&x, addr, &both), 0);
    assert_eq!(deliver(&client(ip), addr, &both), 1);
    assert_eq!(taken.flows().unwrap().len(), 2);
    // The wrong fds are refused, naming what is wrong.
    let SteeringFds { program, sockets, flows, config } = taken.into_fds();
    let swapped = SteeringFds { program, sockets, flows: config, config: flows };
    let err = format!("{:#}", FlowSteering::from_fds(swapped).unwrap_err());
    assert!(err.contains("the handed-over new-flow map has type"), "{err}");
}

#[test]
fn with_no_new_flow_slot_the_kernel_picks_and_nothing_is_recorded() {
    if !privileged("with_no_new_flow_slot_the_kernel_picks_and_nothing_is_recorded") {
        return;
    }
    let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let (steering, members, addr) = group(ip, 2, MAX_FLOWS);
    deliver(&client(ip), addr, &[Some(&members[0]), Some(&members[1])]);
    assert!(steering.flows().unwrap().is_empty());
}

#[test]
fn a_dual_stack_socket_steers_ipv4_flows_too() {
    if !privileged("a_dual_stack_socket_steers_ipv4_flows_too") {
        return;
    }
    let (steering, members, addr) = group(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 2, MAX_FLOWS);
    let both = [Some(&members[0]), Some(&members[1])];
    steering.set_new_flow_slots(&[1]).unwrap();
    let to = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), addr.port());
    let x = client(IpAddr::V4(Ipv4Addr::LOCALHOST));
    assert_eq!(deliver(&x, to, &both), 1);
    steering.set_new_flow_slots(&[0]).unwrap();
    assert_eq!(deliver(&x, to, &both), 1);
    let flow = flow_of(&steering, &x).unwrap();
    assert_eq!((flow.slot, flow.local), (1, Some(IpAddr::V4(Ipv4Addr::LOCALHOST))));
}

/// What `bpf_sk_select_reuseport` returns for an empty slot, which the program takes for
/// "this flow's unit is gone": -ENOENT.
#[test]
fn selecting_an_empty_slot_fails_with_enoent() {
    if !privileged("selecting_an_empty_slot_fails_with_enoent") {
        return;
    }
    let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let (steering, members, addr) = group(ip, 1, MAX_FLOWS);
    let out = bpf::map_create(&MapSpec {
        map_type: BPF_MAP_TYPE_ARRAY,
        key_size: 4,
        value_size: 8,
        max_entries: 1,
        flags: 0,
        name: "test_out",
    })
    .unwrap();
    // out[0] = bpf_sk_select_reuseport(ctx, sockets, &7, 0); return SK_PASS.
    let mut a = Asm::default();
    a.mov(R6, R1).st(Size::W, R10, -4, 7);
    a.ld_map(R2, steering.fds().sockets.as_raw_fd()).stack_ptr(R3, -4).mov_imm(R4, 0);
    a.call(helper::SK_SELECT_REUSEPORT).stx(Size::DW, R10, -16, R0);
    a.st(Size::W, R10, -20, 0).ld_map(R1, out.as_raw_fd()).stack_ptr(R2, -20);
    a.stack_ptr(R3, -16).mov_imm(R4, BPF_ANY as i32).call(helper::MAP_UPDATE_ELEM);
    a.mov_imm(R0, SK_PASS).exit();
    let prog = load_program(&a.finish().unwrap()).unwrap();
    bpf::attach_reuseport(members[0].as_fd(), prog.as_fd()).unwrap();
    assert_eq!(deliver(&client(ip), addr, &[Some(&members[0])]), 0);
    let mut value = [0u8; 8];
    assert!(bpf::map_lookup(out.as_fd(), &0u32.to_ne_bytes(), &mut value).unwrap());
    assert_eq!(i64::from_ne_bytes(value), -i64::from(Errno::ENOENT as i32));
}

#[test]
fn the_program_is_small() {
    let n = FlowSteering::program_len();
    assert!((40..=120).contains(&n), "{n} instructions");
}

#[test]
fn a_refused_program_comes_with_the_verifier_log() {
    if !privileged("a_refused_program_comes_with_the_verifier_log") {
        return;
    }
    // Returns without setting r0.
    let mut a = Asm::default();
    a.exit();
    let err = load_program(&a.finish().unwrap()).unwrap_err();
    let text = format!("{err:#}");
    assert!(text.contains("loading the BPF program sockhold_steer failed"), "{text}");
    assert!(text.contains("R0 !read_ok"), "{text}");
}

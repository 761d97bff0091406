//! Flow steering for UDP (`steer=flow`): an eBPF `SK_REUSEPORT` program and its maps that keep
//! each UDP flow on the socket that received its first datagram, while new flows go where
//! sockhold says.
//!
//! A flow is the remote address and port, plus the local address when the receiving socket is
//! bound to a wildcard (the program reads `bind_inany` from its context, so one program serves
//! both kinds of binding and both IP versions; IPv4 addresses are stored v4-mapped). Every
//! socket of the reuseport group that serves a unit sits in a slot of a `REUSEPORT_SOCKARRAY`;
//! the flow table, an `LRU_HASH` of at most [`MAX_FLOWS`] flows, maps a flow to its slot and the
//! time of its last datagram (on the [`Clock`]). For each datagram the program looks the flow
//! up and selects its slot; when the flow is new or its slot is empty (the unit's socket was
//! closed or cleared: `bpf_sk_select_reuseport` then fails with `-ENOENT`), it picks one of the
//! "new flow" slots (a one-element `ARRAY`: K slots, chosen by the kernel's 4-tuple hash modulo
//! K), selects it and records the flow there.
//!
//! When there is no new-flow slot (K = 0) or the chosen one cannot be selected, the program
//! returns `SK_PASS` without a selection and the kernel falls back to its own hash over the
//! whole group: that delivers the datagram somewhere rather than dropping it, and the flow is
//! not recorded, so its next datagram is steered again. A caller that keeps a member no unit
//! reads must therefore always name at least one new-flow slot while a unit lives. The
//! new-flow slots are rewritten in place: a program running during the rewrite may read a mix
//! of the old and new lists, so a new flow arriving in those nanoseconds can land on a slot of
//! the previous list (which stays live until its unit is gone).
//!
//! This module owns the program and the maps and answers questions about flows; it must not
//! decide which generation is ready or which slot a unit gets (the supervisor does), and it
//! holds no unsafe code: the raw calls live in `sys::bpf`.

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::time::Duration;

use anyhow::{Context, bail};
use nix::errno::Errno;

use crate::sys::bpf::{self, BPF_ANY, MapSpec, ProgSpec};

/// The default capacity of the flow table: 65,536 flows (72 bytes of kernel memory each with
/// the LRU's bookkeeping, about 5 MiB). Beyond it the least recently seen flow is forgotten; its
/// next datagram is then a new flow.
pub const MAX_FLOWS: u32 = 65_536;

/// How many sockets (one per unit of a generation that lives) the group can steer to at once.
pub const MAX_SLOTS: u32 = 256;

/// How many slots new flows can be spread over (the units of one generation).
pub const MAX_NEW_FLOW_SLOTS: u32 = 64;

/// `BPF_MAP_TYPE_ARRAY` (include/uapi/linux/bpf.h, `enum bpf_map_type`).
const BPF_MAP_TYPE_ARRAY: u32 = 2;
/// `BPF_MAP_TYPE_LRU_HASH`.
const BPF_MAP_TYPE_LRU_HASH: u32 = 9;
/// `BPF_MAP_TYPE_REUSEPORT_SOCKARRAY`.
const BPF_MAP_TYPE_REUSEPORT_SOCKARRAY: u32 = 20;
/// `BPF_PROG_TYPE_SK_REUSEPORT` (`enum bpf_prog_type`).
const BPF_PROG_TYPE_SK_REUSEPORT: u32 = 21;
/// `BPF_SK_REUSEPORT_SELECT` (`enum bpf_attach_type`).
const BPF_SK_REUSEPORT_SELECT: u32 = 39;

/// Helper function ids (`enum bpf_func_id`, from `__BPF_FUNC_MAPPER`).
mod helper {
    pub const MAP_LOOKUP_ELEM: i32 = 1;
    pub const MAP_UPDATE_ELEM: i32 = 2;
    pub const KTIME_GET_NS: i32 = 5;
    pub const KTIME_GET_COARSE_NS: i32 = 160;
    pub const SKB_LOAD_BYTES_RELATIVE: i32 = 68;
    pub const SK_SELECT_REUSEPORT: i32 = 82;
}

/// `BPF_HDR_START_NET`: offsets of `bpf_skb_load_bytes_relative` count from the IP header.
const BPF_HDR_START_NET: i32 = 1;
/// `SK_PASS`: deliver (to the selected socket if one was selected).
const SK_PASS: i32 = 1;

/// Offsets in `struct sk_reuseport_md`.
mod ctx {
    pub const DATA: i16 = 0;
    pub const DATA_END: i16 = 8;
    pub const ETH_PROTOCOL: i16 = 20;
    pub const BIND_INANY: i16 = 28;
    pub const HASH: i16 = 32;
}

/// The flow table's key: remote address (16 bytes, v4-mapped), local address (16 bytes, zero
/// unless the socket is bound to a wildcard), remote port (network order), 6 bytes of zero.
const KEY_SIZE: usize = 40;
/// The flow table's value: slot (u32), 4 bytes of zero, last datagram in ns of the [`Clock`].
const VALUE_SIZE: usize = 16;
/// The config value: K (u32), then `MAX_NEW_FLOW_SLOTS` slots (u32).
const CONFIG_SIZE: usize = 4 + 4 * MAX_NEW_FLOW_SLOTS as usize;

pub mod asm;

use asm::{Alu, Asm, Cond, R0, R1, R2, R3, R4, R5, R6, R7, R8, R9, R10, Size};

// Stack layout of the program (offsets from r10).
/// The flow key, `KEY_SIZE` bytes.
const FP_KEY: i16 = -40;
/// The slot handed to `bpf_sk_select_reuseport`.
const FP_SLOT: i16 = -48;
/// The config map's key (0).
const FP_CONFIG_KEY: i16 = -44;
/// A new flow's value, `VALUE_SIZE` bytes.
const FP_VALUE: i16 = -64;

/// `::ffff:` in bytes 8..12 of an address, as the immediate of a 4-byte store.
fn v4_mapped_word() -> i32 {
    i32::from_ne_bytes([0, 0, 0xff, 0xff])
}

/// Copies `len` bytes at `off` from the IP header to the stack at `fp`; leaves for `fail` on
/// error.
fn load_net(a: &mut Asm, off: i32, fp: i16, len: i32, fail: &'static str) {
    a.mov(R1, R6).mov_imm(R2, off).stack_ptr(R3, fp).mov_imm(R4, len);
    a.mov_imm(R5, BPF_HDR_START_NET).call(helper::SKB_LOAD_BYTES_RELATIVE);
    a.jmp_imm(Cond::Ne, R0, 0, fail);
}

/// The steering program, referring to the three maps by fd.
fn program(flows: i32, sockets: i32, config: i32, clock: Clock) -> anyhow::Result<Vec<u64>> {
    let eth_p_ip = i32::from(0x0800u16.to_be());
    let eth_p_ipv6 = i32::from(0x86ddu16.to_be());
    let mut a = Asm::default();
    a.mov(R6, R1);
    // The key must be initialised in full: the verifier refuses to read uninitialised stack.
    for i in 0..(KEY_SIZE as i16 / 8) {
        a.st(Size::DW, R10, FP_KEY + 8 * i, 0);
    }
    // The remote port: the UDP header starts at ctx->data. Read directly (cheaper than
    // bpf_skb_load_bytes), after the bounds check the verifier demands.
    a.ldx(Size::DW, R2, R6, ctx::DATA).ldx(Size::DW, R3, R6, ctx::DATA_END);
    a.mov(R1, R2).alu_imm(Alu::Add, R1, 2).jmp_reg(Cond::Gt, R1, R3, "pass");
    a.ldx(Size::H, R1, R2, 0).stx(Size::H, R10, FP_KEY + 32, R1);
    a.ldx(Size::W, R9, R6, ctx::ETH_PROTOCOL).ldx(Size::W, R8, R6, ctx::BIND_INANY);
    a.jmp_imm(Cond::Eq, R9, eth_p_ipv6, "v6").jmp_imm(Cond::Ne, R9, eth_p_ip, "pass");
    // IPv4: source at 12, destination at 16, stored v4-mapped.
    a.st(Size::W, R10, FP_KEY + 8, v4_mapped_word());
    load_net(&mut a, 12, FP_KEY + 12, 4, "pass");
    a.jmp_imm(Cond::Eq, R8, 0, "lookup");
    a.st(Size::W, R10, FP_KEY + 24, v4_mapped_word());
    load_net(&mut a, 16, FP_KEY + 28, 4, "pass");
    a.ja("lookup");
    // IPv6: source at 8, destination at 24.
    a.label("v6");
    load_net(&mut a, 8, FP_KEY, 16, "pass");
    a.jmp_imm(Cond::Eq, R8, 0, "lookup");
    load_net(&mut a, 24, FP_KEY + 16, 16, "pass");
    // A known flow goes to its slot while that slot holds a socket.
    a.label("lookup");
    a.ld_map(R1, flows).stack_ptr(R2, FP_KEY).call(helper::MAP_LOOKUP_ELEM);
    a.jmp_imm(Cond::Eq, R0, 0, "new_flow");
    a.mov(R7, R0).ldx(Size::W, R1, R7, 0).stx(Size::W, R10, FP_SLOT, R1);
    a.mov(R1, R6).ld_map(R2, sockets).stack_ptr(R3, FP_SLOT).mov_imm(R4, 0);
    a.call(helper::SK_SELECT_REUSEPORT).jmp_imm(Cond::Ne, R0, 0, "new_flow");
    a.call(clock.helper()).stx(Size::DW, R7, 8, R0).ja("pass");
    // A new flow (or one whose socket is gone) goes to slots[hash % K].
    a.label("new_flow");
    a.st(Size::W, R10, FP_CONFIG_KEY, 0);
    a.ld_map(R1, config).stack_ptr(R2, FP_CONFIG_KEY).call(helper::MAP_LOOKUP_ELEM);
    a.jmp_imm(Cond::Eq, R0, 0, "pass");
    a.mov(R7, R0).ldx(Size::W, R1, R7, 0);
    a.jmp_imm(Cond::Eq, R1, 0, "pass");
    a.jmp_imm(Cond::Gt, R1, MAX_NEW_FLOW_SLOTS as i32, "pass");
    a.ldx(Size::W, R2, R6, ctx::HASH).alu32(Alu::Mod, R2, R1);
    // Redundant for the logic, needed by a verifier that does not track the bounds of a modulo.
    a.jmp_imm(Cond::Ge, R2, MAX_NEW_FLOW_SLOTS as i32, "pass");
    a.alu_imm(Alu::Lsh, R2, 2).alu(Alu::Add, R7, R2);
    a.ldx(Size::W, R1, R7, 4).stx(Size::W, R10, FP_SLOT, R1);
    a.mov(R1, R6).ld_map(R2, sockets).stack_ptr(R3, FP_SLOT).mov_imm(R4, 0);
    a.call(helper::SK_SELECT_REUSEPORT).jmp_imm(Cond::Ne, R0, 0, "pass");
    a.call(clock.helper()).stx(Size::DW, R10, FP_VALUE + 8, R0);
    a.ldx(Size::W, R1, R10, FP_SLOT).stx(Size::W, R10, FP_VALUE, R1);
    a.st(Size::W, R10, FP_VALUE + 4, 0);
    a.ld_map(R1, flows).stack_ptr(R2, FP_KEY).stack_ptr(R3, FP_VALUE);
    // A failed insert (memory pressure) only means the next datagram is a new flow again.
    a.mov_imm(R4, BPF_ANY as i32).call(helper::MAP_UPDATE_ELEM);
    a.label("pass");
    a.mov_imm(R0, SK_PASS).exit();
    a.finish()
}

/// The clock of the flows' last datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Clock {
    /// `CLOCK_MONOTONIC_COARSE` (`bpf_ktime_get_coarse_ns`, Linux 5.11): a tick's precision
    /// (1 to 10 ms), plenty for `--flow-idle`, and much cheaper per datagram than reading the
    /// hardware clock (about 45 ns less per run, measured in a KVM guest).
    Coarse,
    /// `CLOCK_MONOTONIC` (`bpf_ktime_get_ns`), for kernels without the coarse helper.
    Fine,
}

impl Clock {
    fn helper(self) -> i32 {
        match self {
            Clock::Coarse => helper::KTIME_GET_COARSE_NS,
            Clock::Fine => helper::KTIME_GET_NS,
        }
    }

    /// The clock this kernel offers: coarse when a program may call its helper.
    pub fn probe() -> Clock {
        let mut a = Asm::default();
        a.call(helper::KTIME_GET_COARSE_NS).mov_imm(R0, SK_PASS).exit();
        match a.finish().and_then(|insns| load_program(&insns)) {
            Ok(_) => Clock::Coarse,
            Err(_) => Clock::Fine,
        }
    }

    /// Now, on this clock.
    pub fn now(self) -> Duration {
        let id = match self {
            Clock::Coarse => nix::time::ClockId::CLOCK_MONOTONIC_COARSE,
            Clock::Fine => nix::time::ClockId::CLOCK_MONOTONIC,
        };
        nix::time::clock_gettime(id).map_or(Duration::ZERO, Duration::from)
    }
}

/// Loads instructions as an `SK_REUSEPORT` program. The license is GPL-compatible, as the
/// kernel asks of programs calling its helpers, and matches sockhold's own MIT license.
pub fn load_program(insns: &[u64]) -> anyhow::Result<OwnedFd> {
    bpf::prog_load(&ProgSpec {
        prog_type: BPF_PROG_TYPE_SK_REUSEPORT,
        expected_attach_type: BPF_SK_REUSEPORT_SELECT,
        insns,
        license: "Dual MIT/GPL",
        name: "sockhold_steer",
    })
}

/// One flow of the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowInfo {
    /// The client's address and port.
    pub remote: SocketAddr,
    /// The address the client sent to, when the socket is bound to a wildcard.
    pub local: Option<IpAddr>,
    /// The slot (unit socket) that owns it.
    pub slot: u32,
    /// Its last datagram, on the steering's [`Clock`] ([`FlowSteering::now`]).
    pub last_seen: Duration,
}

/// The flows one slot owns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SlotFlows {
    /// How many flows it owns.
    pub count: usize,
    /// The last datagram of any of them, on the steering's [`Clock`].
    pub last_seen: Duration,
}

/// The fds that make up a [`FlowSteering`], to hand over across a self-upgrade.
#[derive(Debug)]
pub struct SteeringFds {
    /// The `SK_REUSEPORT` program.
    pub program: OwnedFd,
    /// The `REUSEPORT_SOCKARRAY`: slot → socket.
    pub sockets: OwnedFd,
    /// The `LRU_HASH` flow table.
    pub flows: OwnedFd,
    /// The one-element `ARRAY` of new-flow slots.
    pub config: OwnedFd,
}

/// The program and maps that steer the flows of one reuseport group.
#[derive(Debug)]
pub struct FlowSteering {
    fds: SteeringFds,
    max_flows: u32,
    clock: Clock,
}

fn ip_from_key(bytes: &[u8]) -> IpAddr {
    let octets: [u8; 16] = bytes.try_into().expect("16 bytes of address");
    let v6 = Ipv6Addr::from(octets);
    v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
}

fn ctx_err(e: Errno, what: &str) -> anyhow::Error {
    anyhow::Error::new(e).context(what.to_owned())
}

impl FlowSteering {
    /// Creates the maps (a flow table of `max_flows` flows) and loads the program.
    pub fn new(max_flows: u32) -> anyhow::Result<FlowSteering> {
        if max_flows == 0 {
            bail!("the flow table needs room for at least one flow");
        }
        let sockets = bpf::map_create(&MapSpec {
            map_type: BPF_MAP_TYPE_REUSEPORT_SOCKARRAY,
            key_size: 4,
            value_size: 8,
            max_entries: MAX_SLOTS,
            flags: 0,
            name: "sockhold_socks",
        })?;
        let flows = bpf::map_create(&MapSpec {
            map_type: BPF_MAP_TYPE_LRU_HASH,
            key_size: KEY_SIZE as u32,
            value_size: VALUE_SIZE as u32,
            max_entries: max_flows,
            flags: 0,
            name: "sockhold_flows",
        })?;
        let config = bpf::map_create(&MapSpec {
            map_type: BPF_MAP_TYPE_ARRAY,
            key_size: 4,
            value_size: CONFIG_SIZE as u32,
            max_entries: 1,
            flags: 0,
            name: "sockhold_new",
        })?;
        let clock = Clock::probe();
        let insns = program(flows.as_raw_fd(), sockets.as_raw_fd(), config.as_raw_fd(), clock)?;
        let program = load_program(&insns)?;
        Ok(FlowSteering { fds: SteeringFds { program, sockets, flows, config }, max_flows, clock })
    }

    /// Takes over the fds of a [`FlowSteering`] handed over by a self-upgrade, after checking
    /// with the kernel that they are the program and maps it needs. The program keeps the
    /// clock it was built with; the upgrade runs on the same kernel, so [`Clock::probe`] finds
    /// the same one.
    pub fn from_fds(fds: SteeringFds) -> anyhow::Result<FlowSteering> {
        let prog = bpf::prog_info(fds.program.as_fd())
            .map_err(|e| ctx_err(e, "the handed-over steering program"))?;
        if prog.prog_type != BPF_PROG_TYPE_SK_REUSEPORT {
            bail!("the handed-over steering program is of type {}", prog.prog_type);
        }
        let check = |fd: &OwnedFd, name: &str, want: (u32, u32, u32)| {
            let info = bpf::map_info(fd.as_fd())
                .map_err(|e| ctx_err(e, &format!("the handed-over {name} map")))?;
            let got = (info.map_type, info.key_size, info.value_size);
            if got != want {
                bail!(
                    "the handed-over {name} map has type, key and value sizes {got:?}, not {want:?}"
                );
            }
            Ok(info.max_entries)
        };
        check(&fds.sockets, "socket", (BPF_MAP_TYPE_REUSEPORT_SOCKARRAY, 4, 8))?;
        check(&fds.config, "new-flow", (BPF_MAP_TYPE_ARRAY, 4, CONFIG_SIZE as u32))?;
        let max_flows =
            check(&fds.flows, "flow", (BPF_MAP_TYPE_LRU_HASH, KEY_SIZE as u32, VALUE_SIZE as u32))?;
        Ok(FlowSteering { fds, max_flows, clock: Clock::probe() })
    }

    /// The flow table's capacity.
    pub fn max_flows(&self) -> u32 {
        self.max_flows
    }

    /// Now, on the clock of [`FlowInfo::last_seen`].
    pub fn now(&self) -> Duration {
        self.clock.now()
    }

    /// The program and maps, to hand over.
    pub fn fds(&self) -> &SteeringFds {
        &self.fds
    }

    /// Gives the fds up (to a self-upgrade).
    #[cfg(test)]
    pub fn into_fds(self) -> SteeringFds {
        self.fds
    }

    /// How many instructions the program has.
    pub fn program_len() -> usize {
        program(-1, -1, -1, Clock::Coarse).map_or(0, |p| p.len())
    }

    /// Attaches the program to the reuseport group of `sock` (any bound member: the program
    /// belongs to the group).
    pub fn attach(&self, sock: BorrowedFd<'_>) -> anyhow::Result<()> {
        bpf::attach_reuseport(sock, self.fds.program.as_fd())
    }

    /// Puts a bound member of the group in `slot`. The kernel empties the slot by itself when
    /// the socket is closed (by every process that holds it).
    pub fn set_slot(&self, slot: u32, sock: BorrowedFd<'_>) -> anyhow::Result<()> {
        if slot >= MAX_SLOTS {
            bail!("slot {slot} is beyond the {MAX_SLOTS} the group can steer to");
        }
        let fd = u64::try_from(sock.as_raw_fd()).context("a socket with a negative fd")?;
        bpf::map_update(self.fds.sockets.as_fd(), &slot.to_ne_bytes(), &fd.to_ne_bytes(), BPF_ANY)
            .map_err(|e| ctx_err(e, &format!("putting a socket in steering slot {slot}")))
    }

    /// Empties `slot` and forgets the flows it owned: their next datagram is a new flow. Done
    /// before a slot is used again, so a new socket never inherits an old unit's flows.
    pub fn clear_slot(&self, slot: u32) -> anyhow::Result<()> {
        bpf::map_delete(self.fds.sockets.as_fd(), &slot.to_ne_bytes())
            .map_err(|e| ctx_err(e, &format!("emptying steering slot {slot}")))?;
        for (key, value) in self.entries()? {
            if slot_of(&value) == slot {
                bpf::map_delete(self.fds.flows.as_fd(), &key)
                    .map_err(|e| ctx_err(e, "forgetting a flow"))?;
            }
        }
        Ok(())
    }

    /// Where new flows go: the kernel's hash of each new flow picks one of `slots`. With none,
    /// the kernel's own hash over the whole group decides and no flow is recorded.
    pub fn set_new_flow_slots(&self, slots: &[u32]) -> anyhow::Result<()> {
        if slots.len() > MAX_NEW_FLOW_SLOTS as usize {
            bail!("{} new-flow slots, at most {MAX_NEW_FLOW_SLOTS}", slots.len());
        }
        let mut value = [0u8; CONFIG_SIZE];
        value[..4].copy_from_slice(&(slots.len() as u32).to_ne_bytes());
        for (i, slot) in slots.iter().enumerate() {
            value[4 + 4 * i..8 + 4 * i].copy_from_slice(&slot.to_ne_bytes());
        }
        bpf::map_update(self.fds.config.as_fd(), &0u32.to_ne_bytes(), &value, BPF_ANY)
            .map_err(|e| ctx_err(e, "setting the new-flow slots"))
    }

    /// The raw entries of the flow table. The program changes it meanwhile: a flow may be
    /// missed or seen with two states, never twice.
    fn entries(&self) -> anyhow::Result<Vec<([u8; KEY_SIZE], [u8; VALUE_SIZE])>> {
        let map = self.fds.flows.as_fd();
        let mut out = Vec::new();
        let mut seen = HashSet::new();
        let mut key = [0u8; KEY_SIZE];
        let mut have = false;
        loop {
            let mut next = [0u8; KEY_SIZE];
            let found = bpf::map_next_key(map, have.then_some(&key[..]), &mut next)
                .map_err(|e| ctx_err(e, "walking the flow table"))?;
            // A key deleted under us restarts the walk from the first key: stop there.
            if !found || !seen.insert(next) || seen.len() > self.max_flows as usize * 2 {
                break;
            }
            let mut value = [0u8; VALUE_SIZE];
            if bpf::map_lookup(map, &next, &mut value)
                .map_err(|e| ctx_err(e, "reading the flow table"))?
            {
                out.push((next, value));
            }
            key = next;
            have = true;
        }
        Ok(out)
    }

    /// Every flow of the table.
    pub fn flows(&self) -> anyhow::Result<Vec<FlowInfo>> {
        Ok(self
            .entries()?
            .into_iter()
            .map(|(key, value)| {
                let port = u16::from_be_bytes([key[32], key[33]]);
                let local = key[16..32].iter().any(|&b| b != 0).then(|| ip_from_key(&key[16..32]));
                FlowInfo {
                    remote: SocketAddr::new(ip_from_key(&key[..16]), port),
                    local,
                    slot: slot_of(&value),
                    last_seen: Duration::from_nanos(u64::from_ne_bytes(
                        value[8..16].try_into().expect("8 bytes"),
                    )),
                }
            })
            .collect())
    }

    /// Per slot, how many flows it owns and their last datagram.
    pub fn flows_by_slot(&self) -> anyhow::Result<BTreeMap<u32, SlotFlows>> {
        let mut out: BTreeMap<u32, SlotFlows> = BTreeMap::new();
        for flow in self.flows()? {
            let entry = out.entry(flow.slot).or_default();
            entry.count += 1;
            entry.last_seen = entry.last_seen.max(flow.last_seen);
        }
        Ok(out)
    }
}

fn slot_of(value: &[u8; VALUE_SIZE]) -> u32 {
    u32::from_ne_bytes(value[..4].try_into().expect("4 bytes"))
}

#[cfg(test)]
mod tests;

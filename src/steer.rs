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

/// A tiny eBPF assembler: 8-byte instructions and jumps to named labels, resolved by
/// [`Asm::finish`]. Only what the steering program needs.
pub mod asm {
    use std::collections::HashMap;

    use anyhow::{Context, bail};

    /// Registers: r0 return value, r1-r5 arguments (clobbered by calls), r6-r9 callee-saved,
    /// r10 the read-only frame pointer.
    pub type Reg = u8;
    pub const R0: Reg = 0;
    pub const R1: Reg = 1;
    pub const R2: Reg = 2;
    pub const R3: Reg = 3;
    pub const R4: Reg = 4;
    pub const R5: Reg = 5;
    pub const R6: Reg = 6;
    pub const R7: Reg = 7;
    pub const R8: Reg = 8;
    pub const R9: Reg = 9;
    pub const R10: Reg = 10;

    // Instruction classes, sizes, modes, operations and sources (include/uapi/linux/bpf.h and
    // bpf_common.h).
    const LD: u8 = 0x00;
    const LDX: u8 = 0x01;
    const ST: u8 = 0x02;
    const STX: u8 = 0x03;
    const ALU: u8 = 0x04;
    const JMP: u8 = 0x05;
    const ALU64: u8 = 0x07;
    const IMM: u8 = 0x00;
    const MEM: u8 = 0x60;
    const K: u8 = 0x00;
    const X: u8 = 0x08;
    const CALL: u8 = 0x80;
    const EXIT: u8 = 0x90;
    const JA: u8 = 0x00;
    /// `BPF_PSEUDO_MAP_FD`: the immediate of an `ld_imm64` is a map fd.
    const PSEUDO_MAP_FD: u8 = 1;

    /// Access sizes.
    #[derive(Debug, Clone, Copy)]
    pub enum Size {
        /// 4 bytes.
        W = 0x00,
        /// 2 bytes.
        H = 0x08,
        /// 8 bytes.
        DW = 0x18,
    }

    /// ALU operations.
    #[derive(Debug, Clone, Copy)]
    pub enum Alu {
        Add = 0x00,
        Lsh = 0x60,
        Mod = 0x90,
        Mov = 0xb0,
    }

    /// Conditional jumps (unsigned comparisons).
    #[derive(Debug, Clone, Copy)]
    pub enum Cond {
        Eq = 0x10,
        Gt = 0x20,
        Ge = 0x30,
        Ne = 0x50,
    }

    /// One `struct bpf_insn`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Insn {
        pub code: u8,
        pub dst: Reg,
        pub src: Reg,
        pub off: i16,
        pub imm: i32,
    }

    impl Insn {
        /// The kernel's layout: opcode, then `dst_reg:4` in the low and `src_reg:4` in the high
        /// nibble (the bitfield order of a little-endian build; big-endian swaps them), the
        /// offset and the immediate in host order.
        pub fn encode(self) -> u64 {
            let regs = if cfg!(target_endian = "little") {
                (self.src << 4) | (self.dst & 0xf)
            } else {
                (self.dst << 4) | (self.src & 0xf)
            };
            let mut b = [0u8; 8];
            b[0] = self.code;
            b[1] = regs;
            b[2..4].copy_from_slice(&self.off.to_ne_bytes());
            b[4..8].copy_from_slice(&self.imm.to_ne_bytes());
            u64::from_ne_bytes(b)
        }
    }

    /// A program being written: instructions, labels, and jumps waiting for their target.
    #[derive(Default)]
    pub struct Asm {
        insns: Vec<Insn>,
        labels: HashMap<&'static str, usize>,
        jumps: Vec<(usize, &'static str)>,
    }

    impl Asm {
        fn push(&mut self, code: u8, dst: Reg, src: Reg, off: i16, imm: i32) -> &mut Self {
            self.insns.push(Insn { code, dst, src, off, imm });
            self
        }

        /// `dst = imm` (64-bit, sign-extended).
        pub fn mov_imm(&mut self, dst: Reg, imm: i32) -> &mut Self {
            self.push(ALU64 | Alu::Mov as u8 | K, dst, 0, 0, imm)
        }

        /// `dst = src` (64-bit).
        pub fn mov(&mut self, dst: Reg, src: Reg) -> &mut Self {
            self.push(ALU64 | Alu::Mov as u8 | X, dst, src, 0, 0)
        }

        /// `dst op= imm` (64-bit).
        pub fn alu_imm(&mut self, op: Alu, dst: Reg, imm: i32) -> &mut Self {
            self.push(ALU64 | op as u8 | K, dst, 0, 0, imm)
        }

        /// `dst op= src` (64-bit).
        pub fn alu(&mut self, op: Alu, dst: Reg, src: Reg) -> &mut Self {
            self.push(ALU64 | op as u8 | X, dst, src, 0, 0)
        }

        /// `dst = (u32)dst op (u32)src`, zero-extended (32-bit).
        pub fn alu32(&mut self, op: Alu, dst: Reg, src: Reg) -> &mut Self {
            self.push(ALU | op as u8 | X, dst, src, 0, 0)
        }

        /// `dst = *(size *)(src + off)`.
        pub fn ldx(&mut self, size: Size, dst: Reg, src: Reg, off: i16) -> &mut Self {
            self.push(LDX | MEM | size as u8, dst, src, off, 0)
        }

        /// `*(size *)(dst + off) = src`.
        pub fn stx(&mut self, size: Size, dst: Reg, off: i16, src: Reg) -> &mut Self {
            self.push(STX | MEM | size as u8, dst, src, off, 0)
        }

        /// `*(size *)(dst + off) = imm`.
        pub fn st(&mut self, size: Size, dst: Reg, off: i16, imm: i32) -> &mut Self {
            self.push(ST | MEM | size as u8, dst, 0, off, imm)
        }

        /// `dst = map` (an `ld_imm64` of two slots that the kernel rewrites to the map's
        /// address).
        pub fn ld_map(&mut self, dst: Reg, map_fd: i32) -> &mut Self {
            self.push(LD | IMM | Size::DW as u8, dst, PSEUDO_MAP_FD, 0, map_fd);
            self.push(0, 0, 0, 0, 0)
        }

        /// `r1 = r10 + off`-style frame pointers: `dst = r10; dst += off`.
        pub fn stack_ptr(&mut self, dst: Reg, off: i16) -> &mut Self {
            self.mov(dst, R10).alu_imm(Alu::Add, dst, i32::from(off))
        }

        /// `if dst cond imm goto label`.
        pub fn jmp_imm(
            &mut self,
            cond: Cond,
            dst: Reg,
            imm: i32,
            label: &'static str,
        ) -> &mut Self {
            self.jumps.push((self.insns.len(), label));
            self.push(JMP | cond as u8 | K, dst, 0, 0, imm)
        }

        /// `if dst cond src goto label`.
        pub fn jmp_reg(
            &mut self,
            cond: Cond,
            dst: Reg,
            src: Reg,
            label: &'static str,
        ) -> &mut Self {
            self.jumps.push((self.insns.len(), label));
            self.push(JMP | cond as u8 | X, dst, src, 0, 0)
        }

        /// `goto label`.
        pub fn ja(&mut self, label: &'static str) -> &mut Self {
            self.jumps.push((self.insns.len(), label));
            self.push(JMP | JA, 0, 0, 0, 0)
        }

        /// `r0 = helper(r1, ..., r5)`.
        pub fn call(&mut self, helper: i32) -> &mut Self {
            self.push(JMP | CALL, 0, 0, 0, helper)
        }

        /// `return r0`.
        pub fn exit(&mut self) -> &mut Self {
            self.push(JMP | EXIT, 0, 0, 0, 0)
        }

        /// Names the next instruction.
        pub fn label(&mut self, name: &'static str) -> &mut Self {
            self.labels.insert(name, self.insns.len());
            self
        }

        /// Resolves the jumps (offsets count from the instruction after the jump) and encodes.
        pub fn finish(mut self) -> anyhow::Result<Vec<u64>> {
            for &(at, label) in &self.jumps {
                let target =
                    *self.labels.get(label).with_context(|| format!("no label {label}"))?;
                let off = target as i64 - (at as i64 + 1);
                let Ok(off) = i16::try_from(off) else {
                    bail!("jump to {label} out of range");
                };
                self.insns[at].off = off;
            }
            Ok(self.insns.iter().map(|i| i.encode()).collect())
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        fn bytes(insn: u64) -> [u8; 8] {
            insn.to_ne_bytes()
        }

        #[test]
        fn encodes_as_the_kernel_does() {
            let mut a = Asm::default();
            a.mov_imm(R0, 1).exit();
            a.ld_map(R1, 5);
            a.ldx(Size::W, R2, R6, 32).stx(Size::DW, R10, -8, R0).st(Size::W, R10, -44, 0);
            a.alu32(Alu::Mod, R2, R1).call(82);
            a.ldx(Size::H, R1, R2, 0).label("l").jmp_reg(Cond::Gt, R1, R3, "l");
            let got: Vec<[u8; 8]> = a.finish().unwrap().into_iter().map(bytes).collect();
            // As clang and bpftool print them (little-endian).
            let want: [[u8; 8]; 11] = [
                [0xb7, 0x00, 0, 0, 1, 0, 0, 0],       // r0 = 1
                [0x95, 0x00, 0, 0, 0, 0, 0, 0],       // exit
                [0x18, 0x11, 0, 0, 5, 0, 0, 0],       // r1 = map fd 5
                [0x00, 0x00, 0, 0, 0, 0, 0, 0],       // (second half)
                [0x61, 0x62, 32, 0, 0, 0, 0, 0],      // r2 = *(u32 *)(r6 + 32)
                [0x7b, 0x0a, 0xf8, 0xff, 0, 0, 0, 0], // *(u64 *)(r10 - 8) = r0
                [0x62, 0x0a, 0xd4, 0xff, 0, 0, 0, 0], // *(u32 *)(r10 - 44) = 0
                [0x9c, 0x12, 0, 0, 0, 0, 0, 0],       // w2 %= w1
                [0x85, 0x00, 0, 0, 82, 0, 0, 0],      // call 82
                [0x69, 0x21, 0, 0, 0, 0, 0, 0],       // r1 = *(u16 *)(r2 + 0)
                [0x2d, 0x31, 0xff, 0xff, 0, 0, 0, 0], // if r1 > r3 goto -1
            ];
            if cfg!(target_endian = "little") {
                assert_eq!(got, want);
            }
            assert_eq!(got.len(), 11);
        }

        #[test]
        fn jumps_count_from_the_next_instruction() {
            let mut a = Asm::default();
            a.label("top").jmp_imm(Cond::Eq, R1, 0, "end").ld_map(R1, 3).ja("top");
            a.jmp_imm(Cond::Ne, R0, 7, "end").label("end").exit();
            let insns = a.finish().unwrap();
            let off = |i: usize| i16::from_ne_bytes([bytes(insns[i])[2], bytes(insns[i])[3]]);
            // 0: if r1 == 0 goto 5 (skips the two-slot ld_imm64 and the ja and the jne).
            assert_eq!(off(0), 4);
            // 3: goto 0.
            assert_eq!(off(3), -4);
            // 4: jne to the very next instruction.
            assert_eq!(off(4), 0);
            assert_eq!(bytes(insns[4])[0], 0x55);
            assert_eq!(i32::from_ne_bytes(bytes(insns[4])[4..8].try_into().unwrap()), 7);
        }

        #[test]
        fn an_unknown_label_is_an_error() {
            let mut a = Asm::default();
            a.ja("nowhere");
            assert!(format!("{:#}", a.finish().unwrap_err()).contains("nowhere"));
        }
    }
}

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
    #[cfg_attr(not(test), allow(dead_code))]
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
mod tests {
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

    /// Run by `without_privileges_the_cause_is_named` as an unprivileged user.
    #[test]
    #[ignore = "run as nobody by without_privileges_the_cause_is_named"]
    fn unprivileged_load() {
        let err = FlowSteering::new(16).unwrap_err();
        println!("error: {err:#}");
    }

    #[test]
    fn without_privileges_the_cause_is_named() {
        use std::os::unix::process::CommandExt;
        if !privileged("without_privileges_the_cause_is_named") {
            return;
        }
        use std::os::unix::fs::PermissionsExt;
        // A copy that user nobody can run, wherever the build directory lies.
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let exe = dir.path().join("steer-test");
        std::fs::copy(std::env::current_exe().unwrap(), &exe).unwrap();
        let out = std::process::Command::new(&exe)
            .args(["--exact", "steer::tests::unprivileged_load", "--ignored", "--nocapture"])
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
        assert!(
            stdout.contains("error: creating the BPF map sockhold_socks failed: Operation not permitted (needs CAP_BPF and CAP_NET_ADMIN, or root)"),
            "{stdout}"
        );
    }

    /// Sends `n` datagrams round-robin from `clients` to `to` while a thread drains `receiver`;
    /// returns datagrams per second as the sender saw them. On loopback, `sendto` runs the
    /// receive path (the socket lookup and so the steering program) before it returns.
    fn send_rate(clients: &[UdpSocket], to: SocketAddr, receiver: &UdpSocket, n: usize) -> f64 {
        use std::sync::atomic::{AtomicBool, Ordering};
        let stop = AtomicBool::new(false);
        let receiver = receiver.try_clone().unwrap();
        receiver.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        std::thread::scope(|scope| {
            scope.spawn(|| {
                let mut buf = [0u8; 64];
                while receiver.recv(&mut buf).is_ok() || !stop.load(Ordering::Relaxed) {}
            });
            let start = std::time::Instant::now();
            for i in 0..n {
                // A full receive queue drops the datagram after the lookup: the cost is paid.
                let _ = clients[i % clients.len()].send_to(b"datagram", to);
            }
            let rate = n as f64 / start.elapsed().as_secs_f64();
            stop.store(true, Ordering::Relaxed);
            rate
        })
    }

    /// The steering cost per datagram: `cargo test --release --bin sockhold
    /// steer::tests::steering_cost -- --ignored --nocapture`.
    #[test]
    #[ignore = "a measurement, not a test"]
    fn steering_cost() {
        if !privileged("steering_cost") {
            return;
        }
        let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let plain = UdpSocket::bind(SocketAddr::new(ip, 0)).unwrap();
        let (steering, members, addr) = group(ip, 2, MAX_FLOWS);
        steering.set_new_flow_slots(&[0]).unwrap();
        let clients: Vec<UdpSocket> = (0..64).map(|_| client(ip)).collect();
        // A reuseport group of one without a program: what the group itself costs.
        let bare = member(SocketAddr::new(ip, 0));
        // A flow table at its size limit: 64 flows through a table of 32, each datagram a new
        // flow that evicts the least recently seen one.
        let (full, full_members, full_addr) = group(ip, 1, 32);
        full.set_new_flow_slots(&[0]).unwrap();
        let stats = bpf::enable_stats().unwrap();
        let n = 100_000;
        let (mut plain_rates, mut steered_rates, mut bare_rates) = (vec![], vec![], vec![]);
        let mut full_rates = vec![];
        for _ in 0..11 {
            plain_rates.push(send_rate(&clients, plain.local_addr().unwrap(), &plain, n));
            steered_rates.push(send_rate(&clients, addr, &members[0], n));
            bare_rates.push(send_rate(&clients, bare.local_addr().unwrap(), &bare, n));
            full_rates.push(send_rate(&clients, full_addr, &full_members[0], n));
        }
        assert_eq!(steering.flows_by_slot().unwrap()[&0].count, clients.len());
        let median = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let (p, s) = (median(&mut plain_rates), median(&mut steered_rates));
        let b = median(&mut bare_rates);
        let f = median(&mut full_rates);
        println!("plain {p:.0}/s, reuseport group without a program {b:.0}/s, steered {s:.0}/s");
        println!("steered/plain {:.3}, steered/group {:.3}", s / p, s / b);
        println!("flow table full, a new flow per datagram: {f:.0}/s, {:.3} of plain", f / p);
        let info = bpf::prog_info(steering.fds().program.as_fd()).unwrap();
        let full_info = bpf::prog_info(full.fds().program.as_fd()).unwrap();
        drop(stats);
        println!(
            "program with the table full: {:.1} ns per run",
            full_info.run_time_ns as f64 / full_info.run_count.max(1) as f64
        );
        println!(
            "program: {} insns, {} bytes jited, {:.1} ns per run over {} runs",
            FlowSteering::program_len(),
            info.jited_len,
            info.run_time_ns as f64 / info.run_count.max(1) as f64,
            info.run_count
        );
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
}

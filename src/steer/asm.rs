//! A tiny eBPF assembler: 8-byte instructions and jumps to named labels, resolved by
//! [`Asm::finish`]. Only what the steering program needs.

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
    pub fn jmp_imm(&mut self, cond: Cond, dst: Reg, imm: i32, label: &'static str) -> &mut Self {
        self.jumps.push((self.insns.len(), label));
        self.push(JMP | cond as u8 | K, dst, 0, 0, imm)
    }

    /// `if dst cond src goto label`.
    pub fn jmp_reg(&mut self, cond: Cond, dst: Reg, src: Reg, label: &'static str) -> &mut Self {
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
            let target = *self.labels.get(label).with_context(|| format!("no label {label}"))?;
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

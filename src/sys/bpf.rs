//! Raw `bpf(2)` calls and the reuseport attach: creating maps, reading and writing their
//! elements, loading a program (with the verifier's log when it is refused) and attaching it to
//! a reuseport group with `SO_ATTACH_REUSEPORT_EBPF`.
//!
//! Each command fills its own zeroed `#[repr(C)]` prefix of the kernel's `union bpf_attr`
//! (include/uapi/linux/bpf.h) and passes that prefix's size; the kernel treats the bytes it
//! knows beyond that size as zero. This module knows nothing of what the maps and the program
//! are for: that is `steer`'s business. The safety inherited from `sys` (`allow(unsafe_code)`)
//! covers this file; every unsafe block says why it is sound.

use std::ffi::c_void;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use anyhow::{Context, anyhow};
use nix::errno::Errno;
use nix::libc;

/// `enum bpf_cmd` values (include/uapi/linux/bpf.h).
const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;

/// `SO_ATTACH_REUSEPORT_EBPF` (include/uapi/asm-generic/socket.h).
const SO_ATTACH_REUSEPORT_EBPF: libc::c_int = 52;

/// `BPF_ANY` for map updates: create the element or overwrite it (include/uapi/linux/bpf.h).
pub const BPF_ANY: u64 = 0;

/// The verifier's log buffer: the programs loaded here are a few dozen instructions, whose
/// log at level 1 fits many times over.
const LOG_SIZE: usize = 64 * 1024;

/// The `BPF_MAP_CREATE` prefix of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    inner_map_fd: u32,
    numa_node: u32,
    map_name: [u8; 16],
}

/// The `BPF_MAP_*_ELEM` and `BPF_MAP_GET_NEXT_KEY` prefix of `union bpf_attr` (`value` is
/// `next_key` for the latter).
#[repr(C)]
#[derive(Default)]
struct MapElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// The `BPF_PROG_LOAD` prefix of `union bpf_attr`, up to `expected_attach_type`.
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// What a map is made of, for [`map_create`].
#[derive(Debug, Clone, Copy)]
pub struct MapSpec {
    /// `enum bpf_map_type`.
    pub map_type: u32,
    /// Key size in bytes.
    pub key_size: u32,
    /// Value size in bytes.
    pub value_size: u32,
    /// Capacity.
    pub max_entries: u32,
    /// `BPF_F_*` creation flags.
    pub flags: u32,
    /// A name for `bpftool` (at most 15 bytes are kept).
    pub name: &'static str,
}

/// Copies a name into the kernel's 16-byte, NUL-terminated name field.
fn object_name(name: &str) -> [u8; 16] {
    let mut out = [0u8; 16];
    for (o, b) in out.iter_mut().take(15).zip(name.bytes()) {
        *o = if b.is_ascii_alphanumeric() || b == b'_' { b } else { b'_' };
    }
    out
}

/// Turns `bpf(2)`'s return into a result, keeping errno.
fn check(ret: libc::c_long) -> nix::Result<libc::c_long> {
    if ret < 0 { Err(Errno::last()) } else { Ok(ret) }
}

/// The hint that goes with an error of `bpf(2)` or the attach.
fn hint(errno: Errno) -> &'static str {
    match errno {
        Errno::EPERM | Errno::EACCES => " (needs CAP_BPF and CAP_NET_ADMIN, or root)",
        Errno::ENOSYS => " (this kernel has no bpf(2), or a seccomp filter forbids it)",
        Errno::EINVAL => " (this kernel may be too old: Linux 4.19 or later is needed)",
        _ => "",
    }
}

/// Wraps an errno with the operation it failed and its likely cause.
fn named(errno: Errno, what: &str) -> anyhow::Error {
    anyhow!("{what} failed: {}{}", errno.desc(), hint(errno))
}

/// Calls `bpf(cmd, attr, size_of::<T>())`.
fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> nix::Result<libc::c_long> {
    let ptr: *mut T = attr;
    // SAFETY: `attr` is a live, exclusively borrowed #[repr(C)] prefix of `union bpf_attr` of
    // exactly the size passed; every pointer stored in it points to memory that outlives the
    // call (the callers keep the buffers borrowed across it).
    let ret = unsafe { libc::syscall(libc::SYS_bpf, cmd, ptr, size_of::<T>()) };
    check(ret)
}

/// Takes ownership of an fd a `bpf(2)` call returned.
fn owned(fd: libc::c_long) -> OwnedFd {
    let fd = libc::c_int::try_from(fd).expect("bpf(2) returns an fd that fits a c_int");
    // SAFETY: the kernel just returned this fd to us and nothing else owns it.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Creates a map (`BPF_MAP_CREATE`); the fd is close-on-exec (the kernel's default for bpf fds).
pub fn map_create(spec: &MapSpec) -> anyhow::Result<OwnedFd> {
    let mut attr = MapCreateAttr {
        map_type: spec.map_type,
        key_size: spec.key_size,
        value_size: spec.value_size,
        max_entries: spec.max_entries,
        map_flags: spec.flags,
        map_name: object_name(spec.name),
        ..Default::default()
    };
    let fd = bpf(BPF_MAP_CREATE, &mut attr)
        .map_err(|e| named(e, &format!("creating the BPF map {}", spec.name)))?;
    Ok(owned(fd))
}

/// Fills a `MapElemAttr` with pointers to `key` and `value`.
fn elem_attr(map: BorrowedFd<'_>, key: *const u8, value: *const u8, flags: u64) -> MapElemAttr {
    MapElemAttr {
        map_fd: map.as_raw_fd() as u32,
        key: key as u64,
        value: value as u64,
        flags,
        ..Default::default()
    }
}

/// Writes `value` at `key` (`BPF_MAP_UPDATE_ELEM`). The slices must have the map's key and
/// value sizes; the kernel reads exactly that many bytes.
pub fn map_update(map: BorrowedFd<'_>, key: &[u8], value: &[u8], flags: u64) -> nix::Result<()> {
    let mut attr = elem_attr(map, key.as_ptr(), value.as_ptr(), flags);
    bpf(BPF_MAP_UPDATE_ELEM, &mut attr).map(drop)
}

/// Reads the value at `key` into `value` (`BPF_MAP_LOOKUP_ELEM`); `Ok(false)` when there is
/// none. `value` must be the map's value size: the kernel writes that many bytes.
pub fn map_lookup(map: BorrowedFd<'_>, key: &[u8], value: &mut [u8]) -> nix::Result<bool> {
    let mut attr = elem_attr(map, key.as_ptr(), value.as_mut_ptr(), 0);
    match bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) {
        Ok(_) => Ok(true),
        Err(Errno::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Deletes the element at `key` (`BPF_MAP_DELETE_ELEM`); `Ok(false)` when there was none.
pub fn map_delete(map: BorrowedFd<'_>, key: &[u8]) -> nix::Result<bool> {
    let mut attr = elem_attr(map, key.as_ptr(), std::ptr::null(), 0);
    match bpf(BPF_MAP_DELETE_ELEM, &mut attr) {
        Ok(_) => Ok(true),
        Err(Errno::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Writes the key after `key` (the first key when `key` is `None`) into `next`
/// (`BPF_MAP_GET_NEXT_KEY`); `Ok(false)` at the end of the map.
pub fn map_next_key(map: BorrowedFd<'_>, key: Option<&[u8]>, next: &mut [u8]) -> nix::Result<bool> {
    let key = key.map_or(std::ptr::null(), <[u8]>::as_ptr);
    let mut attr = elem_attr(map, key, next.as_mut_ptr(), 0);
    match bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) {
        Ok(_) => Ok(true),
        Err(Errno::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

/// What a program is, for [`prog_load`].
#[derive(Debug, Clone, Copy)]
pub struct ProgSpec<'a> {
    /// `enum bpf_prog_type`.
    pub prog_type: u32,
    /// `enum bpf_attach_type`, or 0.
    pub expected_attach_type: u32,
    /// The instructions, 8 bytes each, in the kernel's `struct bpf_insn` layout.
    pub insns: &'a [u64],
    /// The license string the helpers it calls require.
    pub license: &'static str,
    /// A name for `bpftool` (at most 15 bytes are kept).
    pub name: &'static str,
}

/// Loads a program (`BPF_PROG_LOAD`). When the verifier refuses it, the error carries its log.
pub fn prog_load(spec: &ProgSpec<'_>) -> anyhow::Result<OwnedFd> {
    let license = std::ffi::CString::new(spec.license).context("a license without NUL")?;
    let mut log = vec![0u8; LOG_SIZE];
    let mut attr = ProgLoadAttr {
        prog_type: spec.prog_type,
        insn_cnt: u32::try_from(spec.insns.len()).context("too many instructions")?,
        insns: spec.insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 1,
        log_size: LOG_SIZE as u32,
        log_buf: log.as_mut_ptr() as u64,
        prog_name: object_name(spec.name),
        expected_attach_type: spec.expected_attach_type,
        ..Default::default()
    };
    match bpf(BPF_PROG_LOAD, &mut attr) {
        Ok(fd) => Ok(owned(fd)),
        Err(e) => {
            let what = format!("loading the BPF program {}", spec.name);
            let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
            let text = String::from_utf8_lossy(&log[..end]);
            let text = text.trim();
            if text.is_empty() {
                Err(named(e, &what))
            } else {
                Err(anyhow!("{:#}; the verifier said:\n{text}", named(e, &what)))
            }
        }
    }
}

/// The `BPF_OBJ_GET_INFO_BY_FD` prefix of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// What the kernel says of a loaded program (from `struct bpf_prog_info`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProgInfo {
    /// `enum bpf_prog_type`.
    pub prog_type: u32,
    /// Instructions after the verifier's rewriting, in bytes.
    pub xlated_len: u32,
    /// Machine code, in bytes (0 without the JIT).
    pub jited_len: u32,
    /// Time spent running it while statistics were on ([`enable_stats`]), in ns.
    pub run_time_ns: u64,
    /// Runs counted while statistics were on.
    pub run_count: u64,
}

/// Fills `info` with the `struct bpf_*_info` of a bpf object (`BPF_OBJ_GET_INFO_BY_FD`).
fn obj_info(fd: BorrowedFd<'_>, info: &mut [u8]) -> nix::Result<()> {
    let mut attr = InfoAttr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: info.len() as u32,
        info: info.as_mut_ptr() as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr).map(drop)
}

/// What the kernel says of a map (from `struct bpf_map_info`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapInfo {
    /// `enum bpf_map_type`.
    pub map_type: u32,
    /// Key size in bytes.
    pub key_size: u32,
    /// Value size in bytes.
    pub value_size: u32,
    /// Capacity.
    pub max_entries: u32,
}

/// Reads a map's info (`BPF_OBJ_GET_INFO_BY_FD`); fails with EINVAL for an fd that is not a
/// bpf object.
pub fn map_info(map: BorrowedFd<'_>) -> nix::Result<MapInfo> {
    // struct bpf_map_info up to max_entries (include/uapi/linux/bpf.h).
    let mut info = [0u8; 20];
    obj_info(map, &mut info)?;
    let u32_at = |o: usize| u32::from_ne_bytes(info[o..o + 4].try_into().expect("4 bytes"));
    Ok(MapInfo {
        map_type: u32_at(0),
        key_size: u32_at(8),
        value_size: u32_at(12),
        max_entries: u32_at(16),
    })
}

/// Reads a program's info (`BPF_OBJ_GET_INFO_BY_FD`).
pub fn prog_info(prog: BorrowedFd<'_>) -> nix::Result<ProgInfo> {
    // struct bpf_prog_info up to run_cnt (include/uapi/linux/bpf.h); the kernel fills what
    // fits in the length passed.
    let mut info = [0u8; 208];
    obj_info(prog, &mut info)?;
    let u32_at = |o: usize| u32::from_ne_bytes(info[o..o + 4].try_into().expect("4 bytes"));
    let u64_at = |o: usize| u64::from_ne_bytes(info[o..o + 8].try_into().expect("8 bytes"));
    Ok(ProgInfo {
        prog_type: u32_at(0),
        xlated_len: u32_at(20),
        jited_len: u32_at(16),
        run_time_ns: u64_at(192),
        run_count: u64_at(200),
    })
}

/// Attaches a `BPF_PROG_TYPE_SK_REUSEPORT` program to the reuseport group `sock` belongs to
/// (`SO_ATTACH_REUSEPORT_EBPF`); it replaces the group's previous program.
pub fn attach_reuseport(sock: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> anyhow::Result<()> {
    let fd: libc::c_int = prog.as_raw_fd();
    let ptr: *const libc::c_int = &fd;
    // SAFETY: `ptr` points to a live c_int and the length passed is its size.
    let ret = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_ATTACH_REUSEPORT_EBPF,
            ptr.cast::<c_void>(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if ret < 0 {
        return Err(named(Errno::last(), "attaching the reuseport program"));
    }
    Ok(())
}

//! Taking hold of fds that sockhold did not open itself: the ones it inherited (`fd://N`,
//! `systemd://NAME`, the notify and control sockets and the state of a self-upgrade) and the ones
//! the kernel installs for an `SCM_RIGHTS` message. Turning a number into an `OwnedFd` is where
//! ownership is asserted, so it happens here and only here.
//!
//! This module must not decide which fds to adopt; callers adopt each fd once.

use std::os::fd::{BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// Takes ownership of an fd the kernel just installed in sockhold's table through `SCM_RIGHTS`,
/// so that dropping it closes it.
pub fn adopt_received_fd(raw: RawFd) -> OwnedFd {
    // SAFETY: `raw` was returned by recvmsg as an SCM_RIGHTS fd: the kernel created it in this
    // process for this message, and nothing else holds or closes it.
    unsafe { OwnedFd::from_raw_fd(raw) }
}

/// Borrows fd `raw`, which sockhold inherited, if it is open.
pub fn borrow_inherited_fd(raw: RawFd) -> nix::Result<BorrowedFd<'static>> {
    nix::fcntl::fcntl(
        // SAFETY: F_GETFD on any number is harmless; it only tells whether the fd is open.
        unsafe { BorrowedFd::borrow_raw(raw) },
        nix::fcntl::FcntlArg::F_GETFD,
    )?;
    // SAFETY: the fd is open (checked above) and sockhold never closes an inherited fd it has
    // not adopted, so it stays valid for as long as sockhold runs.
    Ok(unsafe { BorrowedFd::borrow_raw(raw) })
}

/// Takes ownership of fd `raw`, which sockhold inherited and adopts as a listener (`fd://N`,
/// `systemd://NAME`), so that it is closed with the listener.
pub fn adopt_inherited_fd(raw: RawFd) -> OwnedFd {
    // SAFETY: `raw` was checked open by `borrow_inherited_fd`; it was handed to sockhold by its
    // parent, and each fd is adopted once (the caller takes each spec's fd once).
    unsafe { OwnedFd::from_raw_fd(raw) }
}

/// Whether `a` and `b` are the same open file description (one fd dup'd or passed twice), as
/// systemd's `same_fd` tells them apart: `kcmp(KCMP_FILE)` where the kernel allows it, else the
/// same inode on the same device (right for sockets and pipes, each of which has an inode of its
/// own).
pub fn same_file(a: BorrowedFd<'_>, b: BorrowedFd<'_>) -> bool {
    use std::os::fd::AsRawFd;
    const KCMP_FILE: nix::libc::c_long = 0;
    let pid = nix::libc::c_long::from(nix::unistd::getpid().as_raw());
    // SAFETY: kcmp only compares two fds of this process; it reads no memory of ours and has no
    // effect. Both fds are borrowed, so they are open for the duration of the call.
    let r = unsafe {
        nix::libc::syscall(
            nix::libc::SYS_kcmp,
            pid,
            pid,
            KCMP_FILE,
            nix::libc::c_long::from(a.as_raw_fd()),
            nix::libc::c_long::from(b.as_raw_fd()),
        )
    };
    match r {
        0 => true,
        1..=3 => false,
        // No kcmp (ENOSYS, or EPERM under a restrictive seccomp/Yama policy): the inode decides.
        _ => match (nix::sys::stat::fstat(a), nix::sys::stat::fstat(b)) {
            (Ok(x), Ok(y)) => x.st_dev == y.st_dev && x.st_ino == y.st_ino,
            _ => false,
        },
    }
}

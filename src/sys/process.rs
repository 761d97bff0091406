//! Signalling and waiting for processes through libc directly: nix's `kill` cannot send a
//! realtime signal, and its `waitid`/`waitpid` fail on a child killed by one (after reaping it, or
//! leaving a zombie nobody noticed). Exit statuses are decoded by `exit::ChildStatus`.
//!
//! This module must not decide whom to signal or when; it only makes the calls.

use nix::errno::Errno;
use nix::libc;
use nix::unistd::Pid;

use crate::exit::ChildStatus;
use crate::signals::Signal;

/// Sends `signal` to process `pid`. Here rather than through nix, whose `kill` cannot send a
/// realtime signal.
pub fn kill(pid: Pid, signal: Signal) -> nix::Result<()> {
    // SAFETY: kill(2) takes two integers and touches no memory of this process.
    let rc = unsafe { libc::kill(pid.as_raw(), signal.raw()) };
    Errno::result(rc).map(drop)
}

/// Sends `signal` to every process of process group `pgid`, as [`kill`] does to one.
pub fn killpg(pgid: Pid, signal: Signal) -> nix::Result<()> {
    // SAFETY: killpg(3) takes two integers and touches no memory of this process.
    let rc = unsafe { libc::killpg(pgid.as_raw(), signal.raw()) };
    Errno::result(rc).map(drop)
}

/// The pid of a child that has ended and waits to be reaped, left unreaped (`waitid` with
/// `WNOWAIT`), or `None` when none has (or there are no children). nix's `waitid` fails on a
/// child killed by a realtime signal, which then stayed a zombie nobody noticed.
pub fn peek_ended_child() -> nix::Result<Option<Pid>> {
    // SAFETY: an all-zero siginfo_t is a valid value of this plain C struct.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    let flags = libc::WEXITED | libc::WNOHANG | libc::WNOWAIT;
    // SAFETY: `info` is a valid, writable siginfo_t for the kernel to fill.
    let rc = unsafe { libc::waitid(libc::P_ALL, 0, &mut info, flags) };
    match Errno::result(rc) {
        Err(Errno::ECHILD) => Ok(None),
        Err(e) => Err(e),
        // SAFETY: waitid succeeded, so `info` is a SIGCHLD siginfo (or still all zero when
        // no child has ended), whose si_pid field is the one to read.
        Ok(_) => match unsafe { info.si_pid() } {
            0 => Ok(None),
            pid => Ok(Some(Pid::from_raw(pid))),
        },
    }
}

/// Reaps child `pid` if it has ended, without blocking: how it ended, or `None` while it runs.
pub fn reap(pid: Pid) -> nix::Result<Option<ChildStatus>> {
    let mut status = 0;
    // SAFETY: `status` is a valid, writable int for the kernel to fill.
    let rc = unsafe { libc::waitpid(pid.as_raw(), &mut status, libc::WNOHANG) };
    match Errno::result(rc)? {
        0 => Ok(None),
        _ => Ok(ChildStatus::from_raw(status)),
    }
}

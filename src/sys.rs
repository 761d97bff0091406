//! Raw syscalls that are not spawning a child: for now, the probation after a self-upgrade.
//!
//! For its first seconds after taking over, a new program keeps a handle on the old binary and
//! the state it received. A panic (the hook runs before the abort of the release profile) or a
//! fatal signal (SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT) then re-executes the old binary with
//! that state and the reason in `SOCKHOLD_UPGRADE_FAILED`, so the old version goes on
//! supervising the same children under the same pid. A signal handler may only make
//! async-signal-safe calls, so everything is built at takeover: argv, and one envp per fatal
//! signal with its message; the handler reads the monotonic clock (probation ends by itself at
//! its deadline, without a wakeup), clears close-on-exec on the fds the state names, blocks every
//! signal (the old program's takeover expects them pending, not delivered) and calls `fexecve`.
//! It runs on an alternate stack, so a stack overflow is caught too. If going back is not
//! possible, the signal kills sockhold as it would have without the handler.
//!
//! This module must not decide when probation starts or ends, nor what the state says.

#![allow(unsafe_code)]

use std::ffi::{CString, c_char, c_int};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicPtr, Ordering};

use nix::libc;

pub mod bpf;

/// The fatal signals that end a new program on probation in a return to the old one.
const FATAL: [c_int; 5] = [libc::SIGSEGV, libc::SIGBUS, libc::SIGILL, libc::SIGFPE, libc::SIGABRT];

/// Room for the signal handler on a stack of its own (a stack overflow leaves none).
const ALT_STACK_SIZE: usize = 64 * 1024;

/// Everything the way back needs, built before any handler can run. Leaked: it must outlive
/// every handler, and a process image holds at most one (an exec ends it).
struct WayBack {
    /// The handle on the old binary.
    exe: RawFd,
    /// The old program's command line, NUL-terminated pointers into `_argv`.
    argv: Vec<*const c_char>,
    _argv: Vec<CString>,
    /// The environment (with the state's fd) without the reason.
    env: Vec<CString>,
    /// One envp per entry of [`FATAL`], each with its reason.
    envps: Vec<Vec<*const c_char>>,
    _envs: Vec<CString>,
    /// The fds the old program takes back: they must survive the exec. -1: one forgotten.
    fds: Vec<AtomicI32>,
    /// The end of probation, in `CLOCK_MONOTONIC` nanoseconds.
    deadline_ns: i128,
    /// The variable that carries the reason, `NAME=`.
    reason_prefix: String,
}

static WAY_BACK: AtomicPtr<WayBack> = AtomicPtr::new(std::ptr::null_mut());
/// Whether a crash now goes back; cleared by the first crash and at the end of probation.
static ARMED: AtomicBool = AtomicBool::new(false);

/// What [`arm`] needs.
pub struct Probation {
    /// The handle on the old binary (an fd open on it).
    pub exe: RawFd,
    /// The old program's command line.
    pub argv: Vec<CString>,
    /// The environment to go back with, which names the state's fd.
    pub env: Vec<CString>,
    /// The name of the variable that carries the reason.
    pub reason_var: &'static str,
    /// The fds the state names and the state's own: close-on-exec is cleared on them.
    pub fds: Vec<RawFd>,
    /// The end of probation, in `CLOCK_MONOTONIC` nanoseconds.
    pub deadline_ns: i128,
}

/// `CLOCK_MONOTONIC` in nanoseconds (async-signal-safe).
pub fn monotonic_ns() -> i128 {
    let mut t = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into `t`, a valid timespec; it is async-signal-safe.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) };
    if rc != 0 {
        return 0;
    }
    i128::from(t.tv_sec) * 1_000_000_000 + i128::from(t.tv_nsec)
}

fn signal_name(signal: c_int) -> &'static str {
    match signal {
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGBUS => "SIGBUS",
        libc::SIGILL => "SIGILL",
        libc::SIGFPE => "SIGFPE",
        libc::SIGABRT => "SIGABRT",
        _ => "?",
    }
}

/// Starts probation: from now until `deadline_ns` (or [`disarm`]), a panic or a fatal signal
/// re-executes the old binary. Call once per process image.
pub fn arm(p: Probation) -> Result<(), String> {
    let nul = |s: String| CString::new(s).map_err(|_| "a NUL byte in a message".to_string());
    let mut envs = Vec::new();
    for signal in FATAL {
        let reason = format!(
            "{}=new program crashed: killed by signal {signal} ({})",
            p.reason_var,
            signal_name(signal)
        );
        envs.push(nul(reason)?);
    }
    let argv = pointers(&p.argv, None);
    let envps = envs.iter().map(|reason| pointers(&p.env, Some(reason))).collect();
    let way_back = Box::new(WayBack {
        exe: p.exe,
        argv,
        _argv: p.argv,
        env: p.env,
        envps,
        _envs: envs,
        fds: p.fds.into_iter().map(AtomicI32::new).collect(),
        deadline_ns: p.deadline_ns,
        reason_prefix: format!("{}=", p.reason_var),
    });
    // A way back set earlier (there is none: one per process image) is leaked, never freed: a
    // handler might hold it.
    WAY_BACK.store(Box::into_raw(way_back), Ordering::Release);
    alternate_stack()?;
    for signal in FATAL {
        // SAFETY: a zeroed sigaction is valid; the handler is an extern "C" fn of the right
        // type, and sa_mask is filled by sigfillset before use.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_fatal as *const () as libc::sighandler_t;
            action.sa_flags = libc::SA_ONSTACK | libc::SA_RESETHAND;
            libc::sigfillset(&mut action.sa_mask);
            if libc::sigaction(signal, &action, std::ptr::null_mut()) != 0 {
                return Err(format!(
                    "cannot install the {} handler: {}",
                    signal_name(signal),
                    std::io::Error::last_os_error()
                ));
            }
        }
    }
    ARMED.store(true, Ordering::Release);
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        let message = if let Some(s) = info.payload().downcast_ref::<&str>() {
            (*s).to_string()
        } else if let Some(s) = info.payload().downcast_ref::<String>() {
            s.clone()
        } else {
            "(no message)".to_string()
        };
        let location = info.location().map(|l| format!(" at {l}")).unwrap_or_default();
        on_panic(&format!("new program panicked: {message}{location}"));
    }));
    Ok(())
}

/// Ends probation: a crash from now on is only a crash. Restores the default dispositions.
pub fn disarm() {
    ARMED.store(false, Ordering::Release);
    for signal in FATAL {
        // SAFETY: resetting a disposition to SIG_DFL is always valid.
        unsafe { libc::signal(signal, libc::SIG_DFL) };
    }
}

/// The state no longer names `fds` (the clients answered): a crash must not pass them on, as
/// their numbers may belong to other files by then.
pub fn forget_fds(fds: &[RawFd]) {
    let p = WAY_BACK.load(Ordering::Acquire);
    if p.is_null() {
        return;
    }
    // SAFETY: a non-null WAY_BACK points to a leaked WayBack, never freed; its fds are atomics,
    // shared safely with a handler.
    let way_back = unsafe { &*p };
    for slot in &way_back.fds {
        if fds.contains(&slot.load(Ordering::Acquire)) {
            slot.store(-1, Ordering::Release);
        }
    }
}

/// NUL-terminated pointers to `strings`, and `extra`.
fn pointers(strings: &[CString], extra: Option<&CString>) -> Vec<*const c_char> {
    strings.iter().chain(extra).map(|s| s.as_ptr()).chain([std::ptr::null()]).collect()
}

/// Gives the main thread a stack for the handler of its own: a stack overflow's SIGSEGV finds
/// the ordinary stack full.
fn alternate_stack() -> Result<(), String> {
    let memory: &'static mut [u8] = Box::leak(vec![0u8; ALT_STACK_SIZE].into_boxed_slice());
    let stack =
        libc::stack_t { ss_sp: memory.as_mut_ptr().cast(), ss_flags: 0, ss_size: memory.len() };
    // SAFETY: `stack` describes leaked memory that lives for the rest of the process.
    if unsafe { libc::sigaltstack(&stack, std::ptr::null_mut()) } != 0 {
        return Err(format!(
            "cannot set an alternate signal stack: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// The way back, if probation is armed and not over; disarms it (one try only).
fn take_way_back() -> Option<&'static WayBack> {
    let p = WAY_BACK.load(Ordering::Acquire);
    if p.is_null() || !ARMED.swap(false, Ordering::AcqRel) {
        return None;
    }
    // SAFETY: a non-null WAY_BACK points to a leaked WayBack, never freed.
    let way_back = unsafe { &*p };
    (monotonic_ns() < way_back.deadline_ns).then_some(way_back)
}

/// Re-executes the old binary with `envp`. Async-signal-safe; returns only if that failed.
fn go_back(way_back: &WayBack, envp: &[*const c_char]) {
    // SAFETY: fcntl, sigfillset, sigprocmask and fexecve are async-signal-safe; every pointer
    // was built before probation started and lives as long as the process (leaked).
    unsafe {
        for fd in &way_back.fds {
            let fd = fd.load(Ordering::Acquire);
            if fd >= 0 {
                libc::fcntl(fd, libc::F_SETFD, 0);
            }
        }
        // Signals stay blocked through the exec: the old program's takeover lets them in once
        // its handlers are installed.
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::sigprocmask(libc::SIG_SETMASK, &all, std::ptr::null_mut());
        libc::fexecve(way_back.exe, way_back.argv.as_ptr(), envp.as_ptr());
        let message = b"sockhold: error: cannot re-execute the old program after a crash\n";
        libc::write(2, message.as_ptr().cast(), message.len());
    }
}

extern "C" fn on_fatal(signal: c_int) {
    if let Some(way_back) = take_way_back()
        && let Some(i) = FATAL.iter().position(|&s| s == signal)
    {
        go_back(way_back, &way_back.envps[i]);
    }
    // SAFETY: signal, sigemptyset, sigaddset, sigprocmask and raise are async-signal-safe.
    // Die of the signal as without a handler: the default disposition (SA_RESETHAND already
    // restored it), the signal unblocked, and raised again (a fault would recur on return;
    // a raised signal would not).
    unsafe {
        libc::signal(signal, libc::SIG_DFL);
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, signal);
        libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
        libc::raise(signal);
    }
}

/// The panic hook's part: goes back with `reason` if probation is on. Not in a signal handler,
/// so it may allocate.
fn on_panic(reason: &str) {
    let Some(way_back) = take_way_back() else {
        return;
    };
    let oneline: String =
        reason.chars().map(|c| if c == '\n' || c == '\0' { ' ' } else { c }).collect();
    let Ok(entry) = CString::new(format!("{}{oneline}", way_back.reason_prefix)) else {
        return;
    };
    let envp = pointers(&way_back.env, Some(&entry));
    go_back(way_back, &envp);
}

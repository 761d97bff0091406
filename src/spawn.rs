//! Starting a child: fork, set up exactly what a child gets, exec. One of the two rooms with
//! `unsafe` (the other is `sys`, for every raw syscall that is not fork/exec and the child's side).
//!
//! Everything is prepared before `fork` (argv, envp with fixed-width `LISTEN_PID` and
//! `WATCHDOG_PID` slots, the fd plan, the signal set), because between `fork` and `execve` the child may only make
//! async-signal-safe calls: no allocation, no locks, no Rust I/O. The child then:
//! resets every signal disposition and empties its signal mask (sockhold's handlers and blocked
//! signals must not leak into the service), becomes its own process group, moves the listeners to
//! fds 3..3+N-1 with close-on-exec cleared, marks every other fd close-on-exec, writes its own pid
//! into `LISTEN_PID`, drops to `--user`'s groups, gid and uid (in that order: setuid first would
//! leave it unable to drop root's groups), enters `--chdir` (after the drop, so the directory is
//! checked with the user's rights), and execs. A failed exec (or failed setup) is reported to the
//! parent through a close-on-exec pipe, as std's `Command` does, so the parent can say "command
//! not found" or "cannot chdir to DIR" instead of seeing a child exit 127.
//!
//! This module must not decide anything about the lifecycle; it starts one process and says how
//! that went.

#![allow(unsafe_code)]

use std::ffi::{CString, OsStr, OsString};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::libc;
use nix::sys::signal::{SigSet, SigmaskHow, pthread_sigmask};
use nix::sys::wait::waitpid;
use nix::unistd::{AccessFlags, ForkResult, Gid, Pid, Uid, access, fork, pipe2, setpgid};

use crate::exit::ExitCode;
use crate::signals::Signal;

/// Room for the decimal digits of any pid (pid_t is 32-bit; 20 digits fit even a 64-bit one).
const PID_DIGITS: usize = 20;
const LISTEN_PID_PREFIX: &[u8] = b"LISTEN_PID=";
const WATCHDOG_PID_PREFIX: &[u8] = b"WATCHDOG_PID=";

/// The signal the kernel sends every child when sockhold dies (`--on-supervisor-death`), or 0.
/// A process-wide choice made once at start, like the subreaper bit.
static DEATH_SIGNAL: AtomicI32 = AtomicI32::new(0);

/// Sets the signal every child started from now on gets when sockhold dies; `None`: none.
pub fn set_death_signal(signal: Option<Signal>) {
    DEATH_SIGNAL.store(signal.map_or(0, Signal::raw), Ordering::Relaxed);
}

/// What one child is started with.
#[derive(Clone, Debug)]
pub struct ChildSpec {
    /// The command as the user wrote it (looked up in `PATH` if it has no `/`).
    pub program: OsString,
    /// The full argv, argv[0] included.
    pub args: Vec<OsString>,
    /// The complete environment, except `LISTEN_PID`, which only the child can know.
    pub env: Vec<(OsString, OsString)>,
    /// Whether to set `LISTEN_PID` (only when there are sockets to hand over).
    pub listen_pid: bool,
    /// Whether to set `WATCHDOG_PID` (with `--watchdog`), which, like `LISTEN_PID`, only the
    /// child can know.
    pub watchdog_pid: bool,
    /// The user to run as (`--user`), resolved before the spawn.
    pub user: Option<Credentials>,
    /// The working directory to enter (`--chdir`).
    pub chdir: Option<PathBuf>,
}

/// Who a child runs as: looked up in the parent, taken on by the child alone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Credentials {
    /// The user's name (or the uid as given, for a uid without a name), for messages.
    pub user: String,
    /// The uid.
    pub uid: Uid,
    /// The primary gid.
    pub gid: Gid,
    /// Every supplementary group, as `getgrouplist(3)` gives them.
    pub groups: Vec<Gid>,
}

/// Why a child could not be started.
#[derive(Debug)]
pub struct SpawnError {
    /// 127 for a command that is not found, 126 for one that cannot be executed.
    pub code: ExitCode,
    /// What went wrong, naming the command.
    pub message: String,
}

impl std::fmt::Display for SpawnError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// Finds `program` as execvp would: as a path if it contains `/`, else in `path_var`.
pub fn resolve_program(program: &OsStr, path_var: Option<&OsStr>) -> Result<PathBuf, SpawnError> {
    let shown = program.to_string_lossy();
    if program.is_empty() {
        return Err(SpawnError {
            code: ExitCode::NOT_FOUND,
            message: "the command is empty".into(),
        });
    }
    if program.as_bytes().contains(&b'/') {
        return Ok(PathBuf::from(program));
    }
    let path_var = path_var
        .unwrap_or(OsStr::new("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"));
    let mut not_executable = None;
    for dir in std::env::split_paths(path_var) {
        let dir = if dir.as_os_str().is_empty() { PathBuf::from(".") } else { dir };
        let candidate = dir.join(program);
        if !candidate.is_file() {
            continue;
        }
        if access(&candidate, AccessFlags::X_OK).is_ok() {
            return Ok(candidate);
        }
        not_executable.get_or_insert(candidate);
    }
    Err(match not_executable {
        Some(path) => SpawnError {
            code: ExitCode::NOT_EXECUTABLE,
            message: format!("failed to execute '{shown}': {} is not executable", path.display()),
        },
        None => SpawnError {
            code: ExitCode::NOT_FOUND,
            message: format!("failed to execute '{shown}': command not found in PATH"),
        },
    })
}

/// Why execve said ENOENT for `file` although it exists: the program it names to run it is
/// missing. For a script, the `#!` interpreter ("its interpreter /usr/bin/python9 was not
/// found"); for an ELF binary, its dynamic loader. `None` when the file is not there (then
/// ENOENT means what it says) or names nothing to blame.
pub fn missing_interpreter(file: &Path) -> Option<String> {
    use std::io::Read;
    let mut head = Vec::with_capacity(256);
    std::fs::File::open(file).ok()?.take(256).read_to_end(&mut head).ok()?;
    if let Some(line) = head.strip_prefix(b"#!") {
        // As the kernel reads it: blanks, then the interpreter up to a blank or the line's end.
        let line = line.split(|&b| b == b'\n').next().unwrap_or_default();
        let interpreter = line
            .split(|&b| b == b' ' || b == b'\t')
            .find(|word| !word.is_empty())
            .map(|word| String::from_utf8_lossy(word).into_owned());
        return Some(match interpreter {
            Some(interpreter) => format!("its interpreter {interpreter} was not found"),
            None => "its #! line names no interpreter".to_string(),
        });
    }
    head.starts_with(b"\x7fELF").then(|| {
        "its dynamic loader (the ELF interpreter it names) was not found: it was built for another system or libc".to_string()
    })
}

/// Everything the child needs, laid out before `fork` so the child only reads and writes it.
struct Prepared {
    program: CString,
    _argv: Vec<CString>,
    argv_ptrs: Vec<*const libc::c_char>,
    _envp: Vec<CString>,
    /// `LISTEN_PID=` followed by room for the digits and a NUL; the child fills it in.
    listen_pid: Vec<u8>,
    /// `WATCHDOG_PID=` and its room, the same way.
    watchdog_pid: Vec<u8>,
    envp_ptrs: Vec<*const libc::c_char>,
    sources: Vec<RawFd>,
    /// Scratch space for the child's temporary copies of the listeners.
    moved: Vec<RawFd>,
    /// A connection to put on fds 0 and 1 (`--inetd`).
    stdio: Option<RawFd>,
    /// Fds to mark close-on-exec by hand if the kernel has no `close_range`.
    open_fds: Vec<RawFd>,
    empty_set: libc::sigset_t,
    /// `--user`: groups, gid, uid; and whether to call setgroups. A sockhold that is not root
    /// and runs children as itself skips it (it needs CAP_SETGID, and the child keeps
    /// sockhold's groups); for any other user it is called, and fails loudly without rights.
    ids: Option<(Vec<libc::gid_t>, libc::gid_t, libc::uid_t, bool)>,
    /// `--chdir`.
    chdir: Option<CString>,
    /// `PR_SET_PDEATHSIG`'s signal, or 0.
    death_signal: libc::c_int,
    /// sockhold's pid, to tell whether it died before the death signal was armed.
    parent: libc::pid_t,
}

fn cstring(bytes: &[u8], what: &str) -> Result<CString, SpawnError> {
    CString::new(bytes).map_err(|_| SpawnError {
        code: ExitCode::NOT_EXECUTABLE,
        message: format!("{what} contains a NUL byte"),
    })
}

fn prepare(
    spec: &ChildSpec,
    program: &Path,
    listeners: &[BorrowedFd<'_>],
    stdio: Option<BorrowedFd<'_>>,
) -> Result<Prepared, SpawnError> {
    let program = cstring(program.as_os_str().as_bytes(), "the command")?;
    let argv = spec
        .args
        .iter()
        .map(|a| cstring(a.as_bytes(), "an argument"))
        .collect::<Result<Vec<_>, _>>()?;
    let mut argv_ptrs: Vec<_> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());
    let envp = spec
        .env
        .iter()
        .map(|(k, v)| {
            let mut entry = k.clone().into_vec();
            entry.push(b'=');
            entry.extend_from_slice(v.as_bytes());
            cstring(&entry, "an environment variable")
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut listen_pid = LISTEN_PID_PREFIX.to_vec();
    listen_pid.resize(LISTEN_PID_PREFIX.len() + PID_DIGITS + 1, 0);
    let mut watchdog_pid = WATCHDOG_PID_PREFIX.to_vec();
    watchdog_pid.resize(WATCHDOG_PID_PREFIX.len() + PID_DIGITS + 1, 0);
    let mut envp_ptrs: Vec<_> = envp.iter().map(|e| e.as_ptr()).collect();
    if spec.listen_pid {
        envp_ptrs.push(listen_pid.as_ptr().cast());
    }
    if spec.watchdog_pid {
        envp_ptrs.push(watchdog_pid.as_ptr().cast());
    }
    envp_ptrs.push(std::ptr::null());
    let open_fds = std::fs::read_dir("/proc/self/fd")
        .map(|dir| dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect())
        .unwrap_or_default();
    // SAFETY: sigset_t is a plain C struct for which all-zero bytes are valid.
    let mut empty_set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: empty_set is a valid sigset_t to initialise.
    unsafe { libc::sigemptyset(&mut empty_set) };
    let ids = spec.user.as_ref().map(|u| {
        let groups = u.groups.iter().map(|g| g.as_raw()).collect();
        let euid = nix::unistd::geteuid();
        (groups, u.gid.as_raw(), u.uid.as_raw(), euid.is_root() || u.uid != euid)
    });
    let chdir = match &spec.chdir {
        Some(dir) => Some(cstring(dir.as_os_str().as_bytes(), "the --chdir directory")?),
        None => None,
    };
    Ok(Prepared {
        ids,
        chdir,
        program,
        _argv: argv,
        argv_ptrs,
        _envp: envp,
        listen_pid,
        watchdog_pid,
        envp_ptrs,
        sources: listeners.iter().map(|fd| fd.as_raw_fd()).collect(),
        moved: vec![-1; listeners.len()],
        stdio: stdio.map(|fd| fd.as_raw_fd()),
        open_fds,
        empty_set,
        death_signal: DEATH_SIGNAL.load(Ordering::Relaxed),
        parent: std::process::id() as libc::pid_t,
    })
}

/// Starts `spec` with `listeners` as fds 3.. (and `stdio`, a connection, as fds 0 and 1 for
/// `--inetd`), and returns its pid once it has exec'd.
pub fn spawn(
    spec: &ChildSpec,
    listeners: &[BorrowedFd<'_>],
    stdio: Option<BorrowedFd<'_>>,
) -> Result<Pid, SpawnError> {
    let path_var = spec.env.iter().find(|(k, _)| k == "PATH").map(|(_, v)| v.as_os_str());
    let program = resolve_program(&spec.program, path_var)?;
    let mut prepared = prepare(spec, &program, listeners, stdio)?;
    let shown = spec.program.to_string_lossy();
    let other = |what: &str, e: Errno| SpawnError {
        code: ExitCode::NOT_EXECUTABLE,
        message: format!("failed to start '{shown}': {what}: {e}"),
    };
    let (report_r, report_w) = pipe2(OFlag::O_CLOEXEC).map_err(|e| other("pipe", e))?;

    // Block every signal around fork: a signal for the new child that arrived before it reset
    // its dispositions would otherwise run sockhold's handler in the child and be lost. Blocked,
    // it stays pending and is delivered to the child with its default action after the reset.
    let old_mask = pthread_sigmask_swap(SigSet::all()).map_err(|e| other("sigprocmask", e))?;
    // SAFETY: sockhold is single-threaded; the child branch below only makes async-signal-safe
    // libc calls on memory prepared before the fork, and always ends in execve or _exit.
    let forked = unsafe { fork() };
    match forked {
        Ok(ForkResult::Child) => {
            // SAFETY: see `child`: async-signal-safe calls only, ends in execve or _exit.
            unsafe { child(&mut prepared, report_w.as_raw_fd()) }
        }
        Ok(ForkResult::Parent { child }) => {
            let _ = pthread_sigmask_swap(old_mask);
            drop(report_w);
            // Also set the group from this side, so that a signal to the group sent right after
            // spawn returns cannot miss it (the child may not have run yet).
            let _ = setpgid(child, child);
            match read_report(&report_r) {
                None => Ok(child),
                Some((step, errno)) => {
                    let _ = waitpid(child, None);
                    let code = match (step, errno) {
                        (Step::Groups | Step::SetGid | Step::SetUid | Step::Chdir, _) => {
                            ExitCode::FAILURE
                        }
                        (_, Errno::ENOENT | Errno::ENOTDIR) => ExitCode::NOT_FOUND,
                        _ => ExitCode::NOT_EXECUTABLE,
                    };
                    let message = match step {
                        Step::Exec if errno == Errno::ENOENT => {
                            let file = match &spec.chdir {
                                Some(dir) => dir.join(&program),
                                None => program.clone(),
                            };
                            match missing_interpreter(&file) {
                                Some(what) => {
                                    format!("cannot execute {}: {what}", program.display())
                                }
                                None => format!(
                                    "failed to execute '{}': {}",
                                    program.display(),
                                    errno.desc()
                                ),
                            }
                        }
                        Step::Exec => {
                            format!("failed to execute '{}': {}", program.display(), errno.desc())
                        }
                        Step::Groups | Step::SetGid | Step::SetUid | Step::Chdir => {
                            format!(
                                "failed to start '{shown}': {}",
                                world_failure(spec, step, errno)
                            )
                        }
                        step => format!(
                            "failed to start '{shown}': {} in the child: {}",
                            step.name(),
                            errno.desc()
                        ),
                    };
                    Err(SpawnError { code, message })
                }
            }
        }
        Err(e) => {
            let _ = pthread_sigmask_swap(old_mask);
            Err(other("fork", e))
        }
    }
}

fn pthread_sigmask_swap(mask: SigSet) -> nix::Result<SigSet> {
    let mut old = SigSet::empty();
    pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&mask), Some(&mut old))?;
    Ok(old)
}

/// The setup step that failed in the child, as sent through the report pipe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
enum Step {
    Signals = 1,
    ProcessGroup = 2,
    Fds = 3,
    Exec = 4,
    Groups = 5,
    SetGid = 6,
    SetUid = 7,
    Chdir = 8,
    DeathSignal = 9,
}

impl Step {
    fn name(self) -> &'static str {
        match self {
            Step::Signals => "resetting signals",
            Step::ProcessGroup => "setpgid",
            Step::Fds => "setting up the listening fds",
            Step::Exec => "execve",
            Step::Groups => "setgroups",
            Step::SetGid => "setgid",
            Step::SetUid => "setuid",
            Step::Chdir => "chdir",
            Step::DeathSignal => "PR_SET_PDEATHSIG",
        }
    }
}

/// Says which `--user` or `--chdir` step failed, naming the value it was given.
fn world_failure(spec: &ChildSpec, step: Step, errno: Errno) -> String {
    let user = spec.user.as_ref();
    let name = user.map(|u| u.user.as_str()).unwrap_or_default();
    let why = errno.desc();
    match step {
        Step::Groups => format!("cannot set the supplementary groups of user {name}: {why}"),
        Step::SetGid => format!(
            "cannot setgid({}) for user {name}: {why}",
            user.map(|u| u.gid.as_raw()).unwrap_or_default()
        ),
        Step::SetUid => format!(
            "cannot setuid({}) to user {name}: {why}",
            user.map(|u| u.uid.as_raw()).unwrap_or_default()
        ),
        _ => {
            let dir = spec.chdir.as_deref().unwrap_or(Path::new("")).display();
            match user {
                Some(_) => format!("cannot chdir to {dir} as user {name}: {why}"),
                None => format!("cannot chdir to {dir}: {why}"),
            }
        }
    }
}

/// Reads the child's report: nothing (EOF: the exec succeeded) or the failed step and errno.
fn read_report(report: &OwnedFd) -> Option<(Step, Errno)> {
    let mut buf = [0u8; 8];
    let mut got = 0;
    while got < buf.len() {
        match nix::unistd::read(report, &mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(Errno::EINTR) => continue,
            Err(_) => break,
        }
    }
    if got < buf.len() {
        return None;
    }
    let step = match u32::from_ne_bytes(buf[..4].try_into().expect("4 bytes")) {
        1 => Step::Signals,
        2 => Step::ProcessGroup,
        3 => Step::Fds,
        5 => Step::Groups,
        6 => Step::SetGid,
        7 => Step::SetUid,
        8 => Step::Chdir,
        9 => Step::DeathSignal,
        _ => Step::Exec,
    };
    Some((step, Errno::from_raw(i32::from_ne_bytes(buf[4..].try_into().expect("4 bytes")))))
}

/// The child between fork and exec.
///
/// # Safety
/// Must only run in a freshly forked child of a single-threaded process. It makes only
/// async-signal-safe calls, allocates nothing, and never returns.
unsafe fn child(p: &mut Prepared, report: RawFd) -> ! {
    let n = p.sources.len() as RawFd;
    let first_free = 3 + n;
    // SAFETY: every call in this block is an async-signal-safe libc function on fds and memory
    // prepared before the fork; on failure we report and _exit without unwinding.
    unsafe {
        // The report pipe could sit on one of the target numbers 3..3+N: move it above them.
        let report = match libc::fcntl(report, libc::F_DUPFD_CLOEXEC, first_free) {
            -1 => fail(report, Step::Fds),
            fd => fd,
        };
        // Default dispositions: ignored signals (SIGPIPE, which Rust ignores, and whatever
        // sockhold's own parent ignored) and sockhold's handlers must not carry over. The raw
        // syscall, because glibc's sigaction refuses 32 and 33, which an ignoring parent may
        // also have passed down. All-zero is SIG_DFL with no flags and an empty mask.
        let default_action = [0u64; 4];
        for sig in 1..=libc::SIGRTMAX() {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::syscall(libc::SYS_rt_sigaction, sig, default_action.as_ptr(), 0usize, 8usize);
            }
        }
        if libc::sigprocmask(libc::SIG_SETMASK, &p.empty_set, std::ptr::null_mut()) != 0 {
            fail(report, Step::Signals);
        }
        if libc::setpgid(0, 0) != 0 {
            fail(report, Step::ProcessGroup);
        }
        // --on-supervisor-death: armed after the dispositions are reset, so the signal takes
        // its default action. It fires when the thread that forked ends: sockhold forks from
        // its only thread, and an execve of sockhold itself (a self-upgrade) does not end it.
        if p.death_signal != 0 {
            if libc::prctl(libc::PR_SET_PDEATHSIG, p.death_signal as libc::c_ulong) != 0 {
                fail(report, Step::DeathSignal);
            }
            // sockhold may have died before the signal was armed: then it never comes, and
            // this child would be re-parented to whoever reaps orphans. Follow it down now.
            if libc::getppid() != p.parent {
                libc::kill(libc::getpid(), p.death_signal);
            }
        }
        // --inetd: the connection becomes stdin and stdout. It is copied above 2 first, in case
        // sockhold was started with a closed stdin and accept handed out fd 0 or 1.
        if let Some(conn) = p.stdio {
            let conn = libc::fcntl(conn, libc::F_DUPFD_CLOEXEC, first_free);
            if conn < 0 || libc::dup2(conn, 0) < 0 || libc::dup2(conn, 1) < 0 {
                fail(report, Step::Fds);
            }
        }
        // First move every listener above the target range, so that no dup2 below overwrites a
        // listener that happens to sit at a later target number.
        for (i, &src) in p.sources.iter().enumerate() {
            let fd = libc::fcntl(src, libc::F_DUPFD_CLOEXEC, first_free);
            if fd < 0 {
                fail(report, Step::Fds);
            }
            p.moved[i] = fd;
        }
        // dup2 to a different number always clears close-on-exec on the new fd; the moved copies
        // are never already at their target, so the dup2(fd, fd) trap cannot happen.
        for (i, &fd) in p.moved.iter().enumerate() {
            if libc::dup2(fd, 3 + i as RawFd) < 0 {
                fail(report, Step::Fds);
            }
        }
        // Everything else (sockhold's own fds, fds sockhold inherited, the moved copies) must
        // not reach the service: mark rather than close, so the report pipe keeps working.
        let marked = libc::syscall(
            libc::SYS_close_range,
            first_free as libc::c_uint,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        );
        if marked != 0 {
            for &fd in &p.open_fds {
                if fd >= first_free {
                    libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
                }
            }
            for &fd in &p.moved {
                libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
            }
        }
        // --user: groups, then gid, then uid. The reverse fails (no rights left to change the
        // gid) or leaves root's supplementary groups, which would let the service read what
        // group root can. setuid as root sets the real, effective and saved uid, so the child
        // cannot get root back.
        if let Some((groups, gid, uid, set_groups)) = &p.ids {
            if *set_groups && libc::setgroups(groups.len(), groups.as_ptr()) != 0 {
                fail(report, Step::Groups);
            }
            if libc::setgid(*gid) != 0 {
                fail(report, Step::SetGid);
            }
            if libc::setuid(*uid) != 0 {
                fail(report, Step::SetUid);
            }
        }
        // After the drop, so a directory the user may not enter fails here and not in the
        // service.
        if let Some(dir) = &p.chdir
            && libc::chdir(dir.as_ptr()) != 0
        {
            fail(report, Step::Chdir);
        }
        let pid = libc::getpid();
        write_pid(&mut p.listen_pid[LISTEN_PID_PREFIX.len()..], pid);
        write_pid(&mut p.watchdog_pid[WATCHDOG_PID_PREFIX.len()..], pid);
        libc::execve(p.program.as_ptr(), p.argv_ptrs.as_ptr(), p.envp_ptrs.as_ptr());
        fail(report, Step::Exec)
    }
}

/// Writes `pid` in decimal followed by a NUL into `slot`, without allocating.
fn write_pid(slot: &mut [u8], pid: libc::pid_t) {
    let mut digits = [0u8; PID_DIGITS];
    let mut n = pid.unsigned_abs();
    let mut len = 0;
    loop {
        digits[len] = b'0' + (n % 10) as u8;
        len += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for i in 0..len {
        slot[i] = digits[len - 1 - i];
    }
    slot[len] = 0;
}

/// Reports the failed step and errno to the parent and exits 127.
///
/// # Safety
/// Only for the forked child: it uses raw write and _exit.
unsafe fn fail(report: RawFd, step: Step) -> ! {
    // SAFETY: errno location, write and _exit are async-signal-safe; buf lives on our stack.
    unsafe {
        let errno = *libc::__errno_location();
        let mut buf = [0u8; 8];
        buf[..4].copy_from_slice(&(step as u32).to_ne_bytes());
        buf[4..].copy_from_slice(&errno.to_ne_bytes());
        libc::write(report, buf.as_ptr().cast(), buf.len());
        libc::_exit(127)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pid_digits() {
        for (pid, want) in [(1, "1"), (42, "42"), (4194304, "4194304"), (i32::MAX, "2147483647")] {
            let mut slot = [b'x'; PID_DIGITS + 1];
            write_pid(&mut slot, pid);
            let end = slot.iter().position(|&b| b == 0).expect("NUL written");
            assert_eq!(std::str::from_utf8(&slot[..end]).unwrap(), want);
        }
    }

    #[test]
    fn a_missing_interpreter_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let file = |name: &str, bytes: &[u8]| {
            let path = dir.path().join(name);
            std::fs::write(&path, bytes).unwrap();
            path
        };
        let script = file("s", b"#!/no/such/sh\necho\n");
        assert_eq!(
            missing_interpreter(&script).as_deref(),
            Some("its interpreter /no/such/sh was not found")
        );
        let spaced = file("t", b"#!\t /no/perl -w\n");
        assert_eq!(
            missing_interpreter(&spaced).as_deref(),
            Some("its interpreter /no/perl was not found")
        );
        let elf = file("e", b"\x7fELF\x02\x01\x01");
        assert!(missing_interpreter(&elf).unwrap().contains("dynamic loader"));
        assert_eq!(missing_interpreter(&file("x", b"plain")), None);
        assert_eq!(missing_interpreter(&dir.path().join("absent")), None);
    }

    #[test]
    fn resolve_finds_in_path_and_reports_missing() {
        let found =
            resolve_program(OsStr::new("sh"), Some(OsStr::new("/nonexistent:/bin"))).unwrap();
        assert_eq!(found, PathBuf::from("/bin/sh"));
        let missing =
            resolve_program(OsStr::new("no-such-command-x"), Some(OsStr::new("/bin"))).unwrap_err();
        assert_eq!(missing.code, ExitCode::NOT_FOUND);
        assert!(missing.message.contains("no-such-command-x"), "{}", missing.message);
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("script"), "#!/bin/sh\n").unwrap();
        let not_exec =
            resolve_program(OsStr::new("script"), Some(dir.path().as_os_str())).unwrap_err();
        assert_eq!(not_exec.code, ExitCode::NOT_EXECUTABLE);
        let with_slash = resolve_program(OsStr::new("./x/y"), None).unwrap();
        assert_eq!(with_slash, PathBuf::from("./x/y"));
    }
}

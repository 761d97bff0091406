//! Self-upgrade: the mechanics of re-executing sockhold in place (same pid, so every child stays
//! its child) and of taking over on the other side.
//!
//! The old program checks the target first (a regular, executable file that answers
//! `--upgrade-check` with the state format it reads), then writes its state as one JSON object
//! into a sealed memfd and gives the target a dry run: started as a child with that memfd as
//! fd 3, `SOCKHOLD_UPGRADE_DRY_RUN` and none of the sockets, it reads the command line and the
//! whole state as a takeover would, touches nothing and must answer
//! `{"sockhold_dry_run":"ok",...}` within the deadline; one that fails, dies of a signal or
//! hangs is refused, since an exec into it could not be undone. Then the old program clears
//! close-on-exec on exactly the fds it hands over (listeners, notify and control sockets,
//! waiting control clients, the memfd, and a handle on its own binary), blocks every signal and
//! calls execve. The signal mask survives execve, so a signal that arrives during the change
//! stays pending until the new program has installed its handlers: none is lost. The new program finds the memfd through `SOCKHOLD_UPGRADE_FD`. If it cannot take over,
//! it re-executes the old binary through the handle with the same state and the reason in
//! `SOCKHOLD_UPGRADE_FAILED`, so the old version goes on supervising and reports the failure;
//! a program restored that way never rolls back again. A new program that took over is on
//! probation for [`PROBATION`], or until it acts on a child: it keeps the memfd and the handle,
//! and a panic or a fatal signal goes back the same way (the handler is in [`crate::sys`]). The
//! clients that asked for the upgrade are answered after its first turn of the loop, so a crash
//! before then is reported to them by the old program.
//!
//! This module owns the typed [`State`] and its envelope (format version, the handle on the old
//! binary, the command line) and the syscalls of the change. Each part of the state is owned by
//! the module it describes, next to its code: the supervisor's snapshot
//! (`supervisor::snapshot`), the listeners' (`listen`), the control socket's (`control`), the pid
//! file's (`paths`) and the event loop's own entries (`event_loop::handover`, which composes the
//! whole). Every part is `deny_unknown_fields` with every field required: a state of another
//! format, or with a field unknown, missing or of the wrong type, is refused with serde's reason
//! before anything is taken over, and the dry run reports it to whoever asked. Only the way back
//! reads a state it does not understand, and only its envelope. It must not decide when to
//! upgrade.

use std::convert::Infallible;
use std::ffi::CString;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use log::{info, warn};
use nix::fcntl::{FcntlArg, FdFlag, fcntl};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{SigSet, SigmaskHow, Signal, killpg, pthread_sigmask};
use nix::unistd::{AccessFlags, Pid, access};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// The version of the state's format. A program only takes over a state of its own format; a
/// change that an older or newer program could misread must bump it.
pub const STATE_FORMAT: u64 = 3;
/// The hidden first argument that makes sockhold print the state format it reads and exit.
pub const CHECK_FLAG: &str = "--upgrade-check";
/// Names the fd of the memfd that holds the state, for the new program.
pub const FD_VAR: &str = "SOCKHOLD_UPGRADE_FD";
/// Set when the new program gave up and re-executed the old one: why.
pub const FAILED_VAR: &str = "SOCKHOLD_UPGRADE_FAILED";
/// Set, with `SOCKHOLD_UPGRADE_FD`, for the dry run: the target reads the state and the command
/// line as it would to take over, and only says whether it could.
pub const DRY_RUN_VAR: &str = "SOCKHOLD_UPGRADE_DRY_RUN";
/// Test-only: makes a new program crash just after it took over (`segv`, `panic`, or `stack`
/// for a stack overflow; with `-later`, once the upgrade's askers have their answer), to test
/// the way back. It only ever crashes sockhold itself, and only
/// a program on probation, which then goes back to the old one; it is never passed on.
pub const TEST_CRASH_VAR: &str = "SOCKHOLD_TEST_CRASH_AFTER_TAKEOVER";
/// How long the target has to answer `--upgrade-check`, and then the dry run.
const CHECK_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a new program is on probation after it took over, at most (it ends earlier once it
/// acts on a child: the state it would hand back would no longer describe them).
pub const PROBATION: Duration = Duration::from_secs(10);

/// Everything a program hands over to the next one, as one JSON object in the memfd. Each
/// module owns its part next to its code ([`crate::supervisor::snapshot::Snapshot`],
/// [`crate::listen::Handover`], [`crate::control::Handover`],
/// [`crate::paths::PidFileHandover`], the event loop's entries in `event_loop::handover`); this
/// module owns the envelope (`format`, `old_exe_fd`, `argv`). Every field is required and no
/// other is accepted: a state this program does not understand (an unknown or a missing field, a
/// wrong type, another format) is refused with the reason, before anything is taken over.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct State {
    /// [`STATE_FORMAT`] of the program that wrote it.
    pub format: u64,
    /// The handle on the old program's binary, for the way back.
    pub old_exe_fd: RawFd,
    /// The command line as sockhold was started, as bytes (an argument need not be UTF-8):
    /// going back must not use the new program's, which a wrapper script may have changed.
    pub argv: Vec<Vec<u8>>,
    /// `CLOCK_MONOTONIC` in nanoseconds when the supervisor's snapshot was taken.
    pub monotonic_ns: i64,
    /// The supervisor's units, reload and restart bookkeeping.
    pub supervisor: crate::supervisor::snapshot::Snapshot,
    /// The listeners held.
    pub listeners: Vec<crate::listen::Handover>,
    /// The notify socket of each unit.
    pub notify: Vec<crate::event_loop::handover::NotifyHandover>,
    /// The health listener address of each unit.
    pub health: Vec<crate::event_loop::handover::HealthHandover>,
    /// Each unit's own socket of each `steer=flow` listener, with its slot.
    pub unit_sockets: Vec<crate::event_loop::handover::UnitSocketHandover>,
    /// The fd store (`--fd-store`), newest first.
    pub fd_store: Vec<crate::fd_store::StoredHandover>,
    /// The control socket.
    #[serde(deserialize_with = "Option::deserialize")]
    pub control: Option<crate::control::Handover>,
    /// The control clients waiting for an answer.
    pub clients: Vec<crate::event_loop::handover::ClientHandover>,
    /// The runtime directory (notify sockets).
    #[serde(deserialize_with = "Option::deserialize")]
    pub runtime_dir: Option<std::path::PathBuf>,
    /// The pid file, to remove at exit.
    #[serde(deserialize_with = "Option::deserialize")]
    pub pid_file: Option<crate::paths::PidFileHandover>,
    /// When sockhold was first started, in milliseconds since the epoch.
    pub started_ms: u64,
    /// The last reload's outcome.
    #[serde(deserialize_with = "Option::deserialize")]
    pub last_reload: Option<crate::event_loop::handover::LastReloadHandover>,
    /// What to execute without `--upgrade-binary`.
    #[serde(deserialize_with = "Option::deserialize")]
    pub exe: Option<std::path::PathBuf>,
    /// Upgrades that succeeded so far.
    pub upgrades: u64,
    /// The version of the program that wrote the state.
    pub from_version: String,
    /// The program it is handed to.
    pub target: std::path::PathBuf,
    /// What the metrics count, and the `--metrics` endpoint's socket.
    pub metrics: crate::metrics::Handover,
}

impl State {
    /// Reads a state, refusing one of another format first (its shape may be anything), then
    /// anything this program does not understand, with serde's reason (which names the field).
    pub fn parse(bytes: &[u8]) -> Result<State, String> {
        let envelope: Envelope = serde_json::from_slice(bytes)
            .map_err(|e| format!("the state is not an upgrade state: {e}"))?;
        if envelope.format != STATE_FORMAT {
            return Err(format!(
                "the state is in format {}, and this sockhold reads format {STATE_FORMAT}",
                envelope.format
            ));
        }
        serde_json::from_slice(bytes)
            .map_err(|e| format!("the state is not one this sockhold understands: {e}"))
    }

    /// The state as it goes into the memfd.
    pub fn to_json(&self) -> Result<Vec<u8>, String> {
        serde_json::to_vec(self).map_err(|e| format!("cannot write the state: {e}"))
    }
}

/// What any state of any format has, and what the way back needs even from a state this
/// program does not understand: its format, the handle on the old binary, the old command line,
/// and the pids to kill if nothing can supervise them. Other fields are not looked at here.
#[derive(Deserialize)]
struct Envelope {
    format: u64,
    old_exe_fd: RawFd,
    argv: Vec<Vec<u8>>,
    supervisor: EnvelopeSupervisor,
}

#[derive(Deserialize)]
struct EnvelopeSupervisor {
    units: Vec<EnvelopeUnit>,
}

#[derive(Deserialize)]
struct EnvelopeUnit {
    pid: i32,
}

/// Answers `--upgrade-check`: the state format this program reads, and its version.
pub fn answer_check() -> ! {
    println!(
        "{}",
        json!({ "sockhold_state_format": STATE_FORMAT, "version": env!("CARGO_PKG_VERSION") })
    );
    std::process::exit(0)
}

/// Checks that `target` can take over: a regular, executable file that answers
/// `--upgrade-check` within [`CHECK_TIMEOUT`] with this program's state format. Returns the
/// version it reports; the error names the target and the reason.
pub fn check_target(target: &Path) -> Result<String, String> {
    let shown = target.display();
    let refuse = |why: String| Err(format!("cannot upgrade to {shown}: {why}"));
    match std::fs::metadata(target) {
        Ok(meta) if meta.is_file() => {}
        Ok(_) => return refuse("it is not a regular file".into()),
        Err(e) => return refuse(e.to_string()),
    }
    if access(target, AccessFlags::X_OK).is_err() {
        return refuse("it is not executable".into());
    }
    let mut child = match Command::new(target)
        .arg(CHECK_FLAG)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
    {
        Ok(child) => child,
        Err(e) => return refuse(format!("it cannot be executed: {e}")),
    };
    let deadline = Instant::now() + CHECK_TIMEOUT;
    let output = read_until_eof(child.stdout.take().expect("piped"), deadline);
    // It closed its output (or ran out of time): give it until the deadline to exit.
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
        }
    };
    let Some(status) = status else {
        return refuse(format!("`{shown} {CHECK_FLAG}` did not answer within {CHECK_TIMEOUT:?}"));
    };
    if !status.success() {
        return refuse(format!(
            "`{shown} {CHECK_FLAG}` failed ({status}): it is not a sockhold that can take over"
        ));
    }
    let text = String::from_utf8_lossy(&output);
    let answer: Value = serde_json::from_str(text.trim()).unwrap_or(Value::Null);
    match answer["sockhold_state_format"].as_u64() {
        Some(STATE_FORMAT) => Ok(answer["version"].as_str().unwrap_or("?").to_string()),
        Some(other) => refuse(format!(
            "it reads upgrade state format {other}, and this sockhold writes format {STATE_FORMAT}"
        )),
        None => {
            refuse(format!("its answer to {CHECK_FLAG} is not a state format: {:?}", text.trim()))
        }
    }
}

/// Reads `pipe` until end of file or `deadline`, at most 64 KiB.
fn read_until_eof(pipe: impl Read + AsFd, deadline: Instant) -> Vec<u8> {
    let mut pipe = pipe;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while out.len() < 1 << 16 {
        let left = deadline.saturating_duration_since(Instant::now());
        let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
        let mut fds = [PollFd::new(pipe.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(0) => break,
            Ok(_) => match pipe.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            },
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => break,
        }
    }
    out
}

/// Hands `state` over to `target` by execve. `fds` are the fds the state names, which the new
/// program inherits. Returns only if the exec failed, with every fd and the signal mask as they
/// were.
/// The envelope's fields (`format`, `old_exe_fd`, `argv`) are filled in here.
pub fn exec(target: &Path, mut state: State, fds: &[RawFd]) -> Result<Infallible, String> {
    let old_exe = std::fs::File::open("/proc/self/exe")
        .map_err(|e| format!("cannot keep a handle on the running binary: {e}"))?;
    state.format = STATE_FORMAT;
    state.old_exe_fd = old_exe.as_raw_fd();
    let args: Vec<Vec<u8>> = std::env::args_os().map(OsStringExt::into_vec).collect();
    state.argv = args.clone();
    let file = sealed_state(&state)?;
    dry_run(target, &file, &args)?;
    let path = cstring(target.as_os_str().as_bytes())?;
    let argv = args.iter().map(|a| cstring(a)).collect::<Result<Vec<_>, _>>()?;
    let env = environment(&[(FD_VAR, file.as_raw_fd().to_string())])?;

    let mut passed: Vec<RawFd> = fds.to_vec();
    passed.extend([file.as_raw_fd(), old_exe.as_raw_fd()]);
    let mut old_mask = SigSet::empty();
    pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::all()), Some(&mut old_mask))
        .map_err(|e| format!("cannot block signals: {e}"))?;
    let result = set_cloexec(&passed, false).and_then(|()| {
        nix::unistd::execve(&path, &argv, &env).map_err(|e| format!("execve failed: {e}"))
    });
    // Still here: the exec failed. Put everything back as it was.
    let _ = set_cloexec(&passed, true);
    let _ = pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&old_mask), None);
    result.map_err(|e| format!("cannot upgrade to {}: {e}", target.display()))
}

/// `state` in a new memfd, sealed: no program it is handed to (the dry run, the new program)
/// can change what the old one would get back.
fn sealed_state(state: &State) -> Result<std::fs::File, String> {
    use nix::fcntl::SealFlag;
    use nix::sys::memfd::{MFdFlags, memfd_create};
    let memfd =
        memfd_create(c"sockhold-upgrade", MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING)
            .map_err(|e| format!("cannot create a memfd for the state: {e}"))?;
    let mut file = std::fs::File::from(memfd);
    file.write_all(&state.to_json()?).map_err(|e| format!("cannot write the state: {e}"))?;
    let seals = SealFlag::F_SEAL_WRITE
        | SealFlag::F_SEAL_SHRINK
        | SealFlag::F_SEAL_GROW
        | SealFlag::F_SEAL_SEAL;
    fcntl(&file, FcntlArg::F_ADD_SEALS(seals))
        .map_err(|e| format!("cannot seal the state: {e}"))?;
    Ok(file)
}

/// Runs `target` once as a child on the state (`memfd`, sealed), with sockhold's command
/// line and [`DRY_RUN_VAR`]: it must read all of it as it would to take over and answer
/// `{"sockhold_dry_run":"ok",...}` within [`CHECK_TIMEOUT`], touching nothing. A target that
/// fails, is killed by a signal, hangs (its process group is killed) or answers anything else is
/// refused: an exec into it could not be undone.
fn dry_run(target: &Path, memfd: &std::fs::File, args: &[Vec<u8>]) -> Result<(), String> {
    use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
    use std::ffi::OsString;
    let shown = target.display();
    let refuse = |why: String| Err(format!("{shown} failed its dry run: {why}"));
    // Started as a child is (`spawn`): signals reset and unblocked (sockhold has them all
    // blocked now), a process group of its own, every fd closed but the state, as fd 3, and its
    // output, a pipe, as fds 0 and 1. None of the sockets goes to it: it cannot touch them,
    // whatever it is.
    let mut env: Vec<(OsString, OsString)> = std::env::vars_os()
        .filter(|(k, _)| ![FD_VAR, FAILED_VAR, DRY_RUN_VAR, TEST_CRASH_VAR].iter().any(|v| k == v))
        .collect();
    env.push((FD_VAR.into(), "3".into()));
    env.push((DRY_RUN_VAR.into(), "1".into()));
    let mut program = target.as_os_str().to_owned();
    if !program.as_bytes().contains(&b'/') {
        program = Path::new(".").join(target).into_os_string();
    }
    let mut argv: Vec<OsString> = args.iter().map(|a| OsString::from_vec(a.clone())).collect();
    if argv.is_empty() {
        argv.push(program.clone());
    }
    let spec = crate::spawn::ChildSpec {
        program,
        args: argv,
        env,
        listen_pid: false,
        watchdog_pid: false,
        user: None,
        chdir: None,
    };
    let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| format!("cannot create a pipe for the dry run: {e}"))?;
    let spawned = crate::spawn::spawn(&spec, &[memfd.as_fd()], Some(write.as_fd()));
    drop(write);
    let pid = match spawned {
        Ok(pid) => pid,
        Err(e) => return refuse(e.message),
    };
    let deadline = Instant::now() + CHECK_TIMEOUT;
    let output = read_until_eof(std::fs::File::from(read), deadline);
    let status = loop {
        match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Ok(WaitStatus::StillAlive) => break None,
            Ok(status) => break Some(status),
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return refuse(format!("cannot wait for it: {e}")),
        }
    };
    let Some(status) = status else {
        // Not reaped yet, so the group is still its own: everything it started goes with it.
        let _ = killpg(pid, Signal::SIGKILL);
        let _ = waitpid(pid, None);
        return refuse(format!("it did not finish within {CHECK_TIMEOUT:?}"));
    };
    let text = String::from_utf8_lossy(&output);
    let answer: Value = serde_json::from_str(text.trim()).unwrap_or(Value::Null);
    match status {
        WaitStatus::Exited(_, 0) => {}
        WaitStatus::Exited(_, code) => {
            return match answer["error"].as_str() {
                Some(error) => refuse(format!("exit status {code}: {error}")),
                None => refuse(format!("exit status {code}")),
            };
        }
        WaitStatus::Signaled(_, signal, _) => {
            return refuse(format!("killed by signal {} ({})", signal as i32, signal.as_str()));
        }
        other => return refuse(format!("{other:?}")),
    }
    if answer["sockhold_dry_run"] != "ok" || answer["state_format"] != STATE_FORMAT {
        return refuse(format!("its answer is not a dry run's: {:?}", text.trim()));
    }
    Ok(())
}

/// Answers a dry run: the state and the command line were read in full (exit 0), or why not
/// (exit 1).
pub fn answer_dry_run(result: Result<(), String>) -> ! {
    let (answer, code) = match result {
        Ok(()) => (json!({ "sockhold_dry_run": "ok", "state_format": STATE_FORMAT }), 0),
        Err(why) => (json!({ "sockhold_dry_run": "failed", "error": why }), 1),
    };
    println!("{answer}");
    std::process::exit(code)
}

/// sockhold's environment without the upgrade variables, plus `extra`.
fn environment(extra: &[(&str, String)]) -> Result<Vec<CString>, String> {
    let mut env: Vec<CString> = std::env::vars_os()
        .filter(|(k, _)| ![FD_VAR, FAILED_VAR, DRY_RUN_VAR, TEST_CRASH_VAR].iter().any(|v| k == v))
        .map(|(k, v)| {
            let mut entry = k.into_vec();
            entry.push(b'=');
            entry.extend_from_slice(v.as_bytes());
            cstring(&entry)
        })
        .collect::<Result<_, _>>()?;
    for (k, v) in extra {
        env.push(cstring(format!("{k}={v}").as_bytes())?);
    }
    Ok(env)
}

fn cstring(bytes: &[u8]) -> Result<CString, String> {
    CString::new(bytes).map_err(|_| "an argument or variable contains a NUL byte".to_string())
}

/// Sets or clears close-on-exec on every fd of `fds`.
pub fn set_cloexec(fds: &[RawFd], on: bool) -> Result<(), String> {
    let flag = if on { FdFlag::FD_CLOEXEC } else { FdFlag::empty() };
    for &raw in fds {
        let fd = crate::sys::borrow_inherited_fd(raw).map_err(|e| format!("fd {raw}: {e}"))?;
        fcntl(fd, FcntlArg::F_SETFD(flag)).map_err(|e| format!("fd {raw}: {e}"))?;
    }
    Ok(())
}

/// The state handed over by the program that exec'd this one.
pub struct Incoming {
    /// The state, or why this program does not understand it.
    state: Result<State, String>,
    /// What the way back needs, read from any state.
    envelope: Envelope,
    memfd: OwnedFd,
    /// Why the new program gave up, if this program is the old one, restored.
    pub failed: Option<String>,
}

impl Incoming {
    /// The state named by `SOCKHOLD_UPGRADE_FD`, if sockhold was exec'd by a self-upgrade.
    pub fn from_env() -> Option<Result<Incoming, String>> {
        let text = std::env::var_os(FD_VAR)?;
        Some(Self::read(&text))
    }

    fn read(text: &std::ffi::OsStr) -> Result<Incoming, String> {
        let bad = |why: String| format!("{FD_VAR}={}: {why}", text.to_string_lossy());
        let raw: RawFd =
            text.to_str().and_then(|t| t.parse().ok()).ok_or_else(|| bad("not an fd".into()))?;
        crate::sys::borrow_inherited_fd(raw).map_err(|e| bad(format!("not open: {e}")))?;
        let memfd = crate::sys::adopt_inherited_fd(raw);
        let mut bytes = Vec::new();
        let mut offset = 0;
        let mut buf = vec![0u8; 1 << 16];
        loop {
            match nix::sys::uio::pread(&memfd, &mut buf, offset) {
                Ok(0) => break,
                Ok(n) => {
                    bytes.extend_from_slice(&buf[..n]);
                    offset += n as i64;
                }
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    // Not ours to close: leave the fd as it was.
                    std::mem::forget(memfd);
                    return Err(bad(format!("cannot read it: {e}")));
                }
            }
        }
        // Without the envelope there is no way back: that is the only state refused here.
        let envelope: Envelope = match serde_json::from_slice(&bytes) {
            Ok(envelope) => envelope,
            Err(e) => {
                std::mem::forget(memfd);
                return Err(bad(format!("not an upgrade state: {e}")));
            }
        };
        let state = State::parse(&bytes);
        let failed = std::env::var(FAILED_VAR).ok();
        Ok(Incoming { state, envelope, memfd, failed })
    }

    /// The state, or why this program does not understand it (its format, or a field unknown,
    /// missing or of the wrong type, named).
    pub fn state(&self) -> Result<&State, String> {
        self.state.as_ref().map_err(Clone::clone)
    }

    /// The state could not be taken over: re-execute the old binary with it, which goes on
    /// supervising and reports `reason`. If this program is that old one already, or the exec
    /// fails, the children cannot be supervised any more: kill them and exit 1.
    pub fn roll_back(self, reason: &str) -> ! {
        if let Some(first) = &self.failed {
            self.give_up(&format!("the upgrade failed ({first}), and so did going back: {reason}"));
        }
        // Logging may not be set up yet (the command line may be what failed): plain stderr.
        eprintln!(
            "sockhold[{}]: error: cannot take over from the running sockhold: {reason}; going back to the old program",
            std::process::id()
        );
        let old = self.envelope.old_exe_fd;
        let attempt = (|| -> Result<Infallible, String> {
            let fd = crate::sys::borrow_inherited_fd(old).map_err(|e| e.to_string())?;
            let argv = self.old_argv()?;
            let oneline: String = reason.chars().map(|c| if c == '\n' { ' ' } else { c }).collect();
            let env = environment(&[
                (FD_VAR, self.memfd.as_raw_fd().to_string()),
                (FAILED_VAR, oneline.replace('\0', "")),
            ])?;
            nix::unistd::fexecve(fd, &argv, &env).map_err(|e| e.to_string())
        })();
        let why = attempt.err().unwrap_or_default();
        self.give_up(&format!("{reason}; and the old program could not be re-executed: {why}"))
    }

    /// The old program's command line, as the state has it.
    fn old_argv(&self) -> Result<Vec<CString>, String> {
        self.envelope.argv.iter().map(|arg| cstring(arg)).collect()
    }

    /// Test-only: `bytes` as a state handed over in a new memfd.
    #[cfg(test)]
    pub(crate) fn from_bytes(bytes: &[u8]) -> Result<Incoming, String> {
        use nix::sys::memfd::{MFdFlags, memfd_create};
        use std::os::fd::IntoRawFd;
        let memfd = memfd_create(c"sockhold-test-state", MFdFlags::MFD_CLOEXEC)
            .map_err(|e| e.to_string())?;
        let mut file = std::fs::File::from(memfd);
        file.write_all(bytes).map_err(|e| e.to_string())?;
        Self::read(std::ffi::OsStr::new(&file.into_raw_fd().to_string()))
    }

    /// Whether this program runs only to check that it could take over (see [`DRY_RUN_VAR`]).
    pub fn is_dry_run() -> bool {
        std::env::var_os(DRY_RUN_VAR).is_some()
    }

    /// Checks that an fd number the state names is one an fd can have, without looking at the
    /// fd (a dry run has none of them).
    pub fn check_fd_number(fd: RawFd, what: &str) -> Result<RawFd, String> {
        if fd < 0 {
            return Err(format!("{what} has fd {fd}, which cannot be handed over"));
        }
        Ok(fd)
    }

    /// Kills the process group of every generation the state names and exits 1: children
    /// without a supervisor must not be left behind.
    fn give_up(&self, reason: &str) -> ! {
        let me = std::process::id();
        eprintln!("sockhold[{me}]: error: {reason}");
        let pids = self.envelope.supervisor.units.iter().map(|u| u.pid).filter(|&p| p > 1);
        for pid in pids.map(Pid::from_raw) {
            eprintln!(
                "sockhold[{me}]: error: killing process group {pid}: nothing can supervise it any more"
            );
            let _ = killpg(pid, Signal::SIGKILL);
        }
        std::process::exit(crate::exit::ExitCode::FAILURE.0)
    }

    /// The takeover succeeded: make the adopted fds close-on-exec again, start probation (unless
    /// this program is the old one, restored), and let the signals that waited through the
    /// change in. On probation, the memfd and the handle on the old binary stay open in the
    /// returned [`OnProbation`]; otherwise they are closed.
    pub fn finish(self, adopted: &[RawFd]) -> Option<OnProbation> {
        if let Err(e) = set_cloexec(adopted, true) {
            warn!("after the upgrade: {e}");
        }
        let handle = Some(self.envelope.old_exe_fd)
            .filter(|&fd| crate::sys::borrow_inherited_fd(fd).is_ok())
            .map(crate::sys::adopt_inherited_fd);
        let on_probation = match (&self.failed, handle) {
            (None, Some(handle)) => match self.arm(&handle, adopted) {
                Ok(()) => match self.state {
                    Ok(state) => Some(OnProbation { memfd: self.memfd, _handle: handle, state }),
                    Err(_) => None,
                },
                Err(e) => {
                    warn!("after the upgrade, a crash cannot go back to the old program: {e}");
                    None
                }
            },
            _ => None,
        };
        let _ = pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
        on_probation
    }

    fn arm(&self, handle: &OwnedFd, adopted: &[RawFd]) -> Result<(), String> {
        // Both came without close-on-exec: an upgrade from this program must not pass them on.
        // The way back clears it again.
        let memfd = self.memfd.as_raw_fd();
        set_cloexec(&[memfd, handle.as_raw_fd()], true)?;
        let mut fds = adopted.to_vec();
        fds.extend([memfd, handle.as_raw_fd()]);
        let deadline = crate::sys::monotonic_ns() + PROBATION.as_nanos() as i128;
        crate::sys::arm(crate::sys::Probation {
            exe: handle.as_raw_fd(),
            argv: self.old_argv()?,
            env: environment(&[(FD_VAR, memfd.to_string())])?,
            reason_var: FAILED_VAR,
            fds,
            deadline_ns: deadline,
        })
        .map_err(|e| format!("{e:#}"))?;
        let state = self.state()?;
        info!(
            "on probation for {PROBATION:?}: a crash goes back to version {}",
            state.from_version
        );
        Ok(())
    }
}

/// A new program's first seconds: a crash goes back to the old program with the state this one
/// received (see [`crate::sys`]). Ending it (dropping it, or [`OnProbation::end`]) closes the
/// state and the handle on the old binary.
pub struct OnProbation {
    memfd: OwnedFd,
    _handle: OwnedFd,
    state: State,
}

impl OnProbation {
    /// Whether probation is over by the clock.
    pub fn expired(&self, taken_over: Instant) -> bool {
        Instant::now() >= taken_over + PROBATION
    }

    /// The control clients waiting for the upgrade's answer have it: a crash from now on must
    /// not answer them again (their fds may be someone else's by then). Rewrites the state
    /// without them, in a new memfd put in place of the old one in one step.
    pub fn answered_upgrade(&mut self) -> Result<(), String> {
        let clients = &mut self.state.clients;
        let answered: Vec<RawFd> =
            clients.iter().filter(|c| c.reloads.is_empty()).map(|c| c.fd).collect();
        crate::sys::forget_fds(&answered);
        clients.retain(|c| !c.reloads.is_empty());
        for client in clients.iter_mut() {
            client.upgrade = 0;
        }
        let file = sealed_state(&self.state)?;
        nix::unistd::dup3(&file, &mut self.memfd, nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| format!("cannot replace the state: {e}"))
    }

    /// Ends probation: a crash from now on is only a crash.
    pub fn end(self, why: &str) {
        crate::sys::disarm();
        info!("probation over ({why}): the old program is let go");
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::supervisor::snapshot::{
        PurposeSnapshot, ReloadSnapshot, Snapshot, UnitSnapshot, UnitStateSnapshot,
    };
    use serde_json::Value;

    /// A state with one of everything: every unit state, a listener with a socket file, a
    /// control socket, a waiting client, a pid file, the last reload.
    pub(crate) fn sample() -> State {
        let unit = |key: u64, state: UnitStateSnapshot| UnitSnapshot {
            key,
            generation: key,
            pid: 100 + key as i32,
            purpose: PurposeSnapshot::Reload,
            state,
            since_ns: -5,
            status: Some("up".into()),
            watchdog_ns: None,
            crashed: false,
        };
        State {
            format: STATE_FORMAT,
            old_exe_fd: 7,
            argv: vec![b"sockhold".to_vec(), vec![0xff, b'x']],
            monotonic_ns: 123_456_789,
            supervisor: Snapshot {
                units: vec![
                    unit(1, UnitStateSnapshot::Killed {}),
                    unit(2, UnitStateSnapshot::Stopping { kill_at_ns: 30, signal: 15 }),
                    unit(3, UnitStateSnapshot::Serving { watchdog_at_ns: Some(-2) }),
                    unit(
                        4,
                        UnitStateSnapshot::Starting {
                            ready_deadline_ns: 60,
                            ready_at_ns: None,
                            probe_at_ns: Some(0),
                            last_probe: None,
                        },
                    ),
                ],
                next_unit: 5,
                next_generation: 5,
                reload: Some(ReloadSnapshot { generation: 4, waiting_for: None }),
                reload_pending: true,
                restart_at_ns: None,
                backoff_ns: 100,
                failed_starts: 0,
                restarts: 2,
                retired: 0,
            },
            listeners: vec![crate::listen::Handover {
                fd: 3,
                spec: "/run/app.sock".into(),
                name: "app".into(),
                local: "/run/app.sock".into(),
                unix_file: Some(crate::listen::UnixFileHandover {
                    path: "/run/app.sock".into(),
                    dev: 1,
                    ino: 2,
                }),
                kind: crate::listen::KindHandover::Stream,
                steering: None,
            }],
            unit_sockets: vec![],
            fd_store: vec![crate::fd_store::StoredHandover {
                fd: 9,
                name: "conn-1".into(),
                poll: true,
            }],
            notify: vec![crate::event_loop::handover::NotifyHandover {
                unit: 4,
                fd: 5,
                path: "/run/sockhold/notify-4".into(),
            }],
            health: vec![crate::event_loop::handover::HealthHandover {
                unit: 4,
                addr: "127.0.0.1:8080".parse().expect("an address"),
            }],
            control: Some(crate::control::Handover {
                fd: 4,
                path: "/run/sockhold/ctl".into(),
                dev: 1,
                ino: 3,
                created_dir: None,
            }),
            clients: vec![crate::event_loop::handover::ClientHandover {
                fd: 6,
                upgrade: 1,
                reloads: vec![Some(4), None],
            }],
            runtime_dir: Some("/run/sockhold".into()),
            pid_file: Some(crate::paths::PidFileHandover {
                path: "/run/app.pid".into(),
                dir: "/run".into(),
                name: "app.pid".into(),
                dev: Some(1),
                ino: Some(4),
                pid: 42,
            }),
            started_ms: 1_700_000_000_000,
            last_reload: Some(crate::event_loop::handover::LastReloadHandover {
                ok: false,
                generation: 3,
                error: Some("it died".into()),
                at: "2026-01-01T00:00:00Z".into(),
            }),
            exe: Some("/usr/bin/sockhold".into()),
            upgrades: 1,
            from_version: "0.1.0".into(),
            target: "/usr/bin/sockhold".into(),
            metrics: crate::metrics::Handover {
                reloads_succeeded: 4,
                reloads_failed: 1,
                last_reload_ok: Some(false),
                last_reload_ms: Some(1_767_225_600_000),
                reload_buckets: vec![0, 1, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
                reload_sum_ns: 900_000_000_000,
                reload_count: 4,
                upgrades_failed: 2,
                endpoint: Some(crate::metrics::endpoint::Handover {
                    fd: 8,
                    unix_file: Some(("/run/sockhold/metrics.sock".into(), 1, 5)),
                }),
            },
        }
    }

    /// `sample()` as JSON, changed by `edit`, read back.
    fn parse_edited(edit: impl FnOnce(&mut Value)) -> Result<State, String> {
        let mut value = serde_json::to_value(sample()).expect("a state serialises");
        edit(&mut value);
        State::parse(value.to_string().as_bytes())
    }

    #[test]
    fn a_state_reads_back_as_written() {
        let state = sample();
        assert_eq!(State::parse(&state.to_json().expect("written")), Ok(state));
    }

    #[test]
    fn an_unknown_field_is_refused_naming_it() {
        let err = parse_edited(|v| v["brand_new"] = true.into()).unwrap_err();
        assert!(err.contains("unknown field `brand_new`"), "{err}");
        let err =
            parse_edited(|v| v["supervisor"]["units"][2]["state"]["extra"] = 1.into()).unwrap_err();
        assert!(err.contains("unknown field `extra`"), "{err}");
        // Found by the fuzz properties: serde lets a unit variant of a tagged enum through with
        // any other field beside its tag, so a killed unit's state is an empty struct variant.
        let err = parse_edited(|v| v["supervisor"]["units"][0]["state"]["kill_at_ns"] = 1.into())
            .unwrap_err();
        assert!(err.contains("unknown field `kill_at_ns`"), "{err}");
        let err = parse_edited(|v| v["listeners"][0]["unix_file"]["mode"] = 1.into()).unwrap_err();
        assert!(err.contains("unknown field `mode`"), "{err}");
    }

    #[test]
    fn a_missing_field_is_refused_naming_it() {
        let remove = |path: &'static [&'static str]| {
            parse_edited(move |v| {
                let (last, parents) = path.split_last().expect("a path");
                let mut at = v;
                for key in parents {
                    at = match key.parse::<usize>() {
                        Ok(i) => &mut at[i],
                        Err(_) => &mut at[*key],
                    };
                }
                at.as_object_mut().expect("an object").remove(*last);
            })
            .unwrap_err()
        };
        let err = remove(&["upgrades"]);
        assert!(err.contains("missing field `upgrades`"), "{err}");
        // An optional value is written as null, never left out: no field means "not understood".
        let err = remove(&["supervisor", "units", "0", "status"]);
        assert!(err.contains("missing field `status`"), "{err}");
        let err = remove(&["pid_file", "dev"]);
        assert!(err.contains("missing field `dev`"), "{err}");
        let err = remove(&["control"]);
        assert!(err.contains("missing field `control`"), "{err}");
    }

    #[test]
    fn a_wrong_type_is_refused() {
        let err = parse_edited(|v| v["upgrades"] = "3".into()).unwrap_err();
        assert!(err.contains("invalid type: string \"3\", expected u64"), "{err}");
        let err = parse_edited(|v| v["supervisor"]["units"][0]["state"]["name"] = "asleep".into())
            .unwrap_err();
        assert!(err.contains("unknown variant `asleep`"), "{err}");
    }

    #[test]
    fn another_format_is_refused_before_its_shape_is_read() {
        let err = parse_edited(|v| {
            v["format"] = 1.into();
            v["something_only_format_1_has"] = 0.into();
        })
        .unwrap_err();
        let want =
            format!("the state is in format 1, and this sockhold reads format {STATE_FORMAT}");
        assert_eq!(err, want);
    }
}

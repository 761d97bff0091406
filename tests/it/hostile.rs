//! A hostile local user (uid 65534 here) against the files sockhold creates and the sockets it
//! talks over: planted symlinks at the pid file, a pid file swapped before stop, directories that
//! user owns, an impostor control server, a request with a duplicate key; and resource
//! exhaustion, where accept() fails for want of fds and sockhold must sleep, not spin.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal::SIGTERM;

use crate::support::*;

const NOBODY: u32 = 65534;

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A temp dir others can traverse (the hostile user must reach what it owns inside).
fn open_tempdir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// A directory `name` in `top` with `mode`, owned by `owner`.
fn subdir(top: &Path, name: &str, mode: u32, owner: u32) -> PathBuf {
    let dir = top.join(name);
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode)).unwrap();
    std::os::unix::fs::chown(&dir, Some(owner), Some(owner)).unwrap();
    dir
}

/// Runs `program ARGS` as the hostile user and requires it to succeed.
fn as_nobody(program: &str, args: &[&str]) {
    let out = Command::new(program).args(args).uid(NOBODY).gid(NOBODY).output().unwrap();
    assert!(out.status.success(), "{program} {args:?} as nobody: {}", text(&out.stderr));
}

/// A root-owned file the hostile user would like sockhold to overwrite.
fn precious(top: &Path) -> PathBuf {
    let target = top.join("precious");
    std::fs::write(&target, "precious\n").unwrap();
    target
}

#[test]
fn a_pid_file_directory_another_user_owns_is_refused_and_nothing_is_written() {
    let top = open_tempdir();
    let target = precious(top.path());
    let theirs = subdir(top.path(), "theirs", 0o755, NOBODY);
    let pid_file = theirs.join("app.pid");
    // The attack the old code fell for: a symlink at the fixed temporary name.
    let planted = format!("{}.tmp", pid_file.display());
    as_nobody("ln", &["-s", target.to_str().unwrap(), &planted]);
    let (code, stderr) = run_to_end(&[
        "--pid-file",
        pid_file.to_str().unwrap(),
        "-l",
        "127.0.0.1:0",
        "--",
        &fixture(),
    ]);
    assert_eq!(code, 1, "{stderr}");
    let want = format!("invalid --pid-file {}", pid_file.display());
    assert!(stderr.contains(&want), "{stderr}");
    assert!(stderr.contains(&format!("the directory {}", theirs.display())), "{stderr}");
    assert!(stderr.contains("uid 65534 (nobody)"), "{stderr}");
    assert!(stderr.contains("mode 0755"), "{stderr}");
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "precious\n");
    assert!(!pid_file.exists());
}

#[test]
fn planted_symlinks_never_redirect_the_pid_file() {
    let top = open_tempdir();
    let target = precious(top.path());
    // Root's own 0755 directory with symlinks left at the names a pid file could use, and a
    // sticky world-writable one (like /tmp) where the hostile user plants them itself.
    let ours = subdir(top.path(), "ours", 0o755, 0);
    let sticky = subdir(top.path(), "sticky", 0o1777, 0);
    for dir in [&ours, &sticky] {
        let pid_file = dir.join("app.pid");
        let names = ["app.pid", "app.pid.tmp", ".app.pid.tmp", ".app.pid"];
        for name in names {
            let link = dir.join(name);
            if dir == &sticky {
                as_nobody("ln", &["-s", target.to_str().unwrap(), link.to_str().unwrap()]);
            } else {
                std::os::unix::fs::symlink(&target, &link).unwrap();
            }
        }
        let pid_arg = pid_file.to_str().unwrap().to_string();
        let mut s = start_fixture(&["--pid-file", &pid_arg], &["--ready"]);
        s.expect_ready();
        let meta = std::fs::symlink_metadata(&pid_file).unwrap();
        assert!(meta.file_type().is_file(), "the symlink at the path was replaced, not followed");
        assert_eq!(meta.uid(), 0);
        assert_eq!(meta.mode() & 0o7777, 0o644);
        assert_eq!(std::fs::read_to_string(&pid_file).unwrap().trim(), s.pid().to_string());
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "precious\n", "in {dir:?}");
        s.signal(SIGTERM);
        assert_eq!(s.exit_code(), 0);
        assert!(!pid_file.exists(), "removed at exit");
        // Only the pid file went; the other links are still there, pointing where they did.
        for name in &names[1..] {
            assert_eq!(std::fs::read_link(dir.join(name)).unwrap(), target);
        }
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "precious\n");
    }
}

#[test]
fn a_pid_file_replaced_before_stop_is_left_alone() {
    let top = open_tempdir();
    let dir = subdir(top.path(), "run", 0o755, 0);
    let pid_file = dir.join("app.pid");
    let pid_arg = pid_file.to_str().unwrap().to_string();
    let mut s = start_fixture(&["--pid-file", &pid_arg], &["--ready"]);
    s.expect_ready();
    // Another program (another sockhold started by mistake, an admin) put its own file there,
    // even with the same content: it is not sockhold's to delete.
    let other = dir.join("other");
    std::fs::write(&other, format!("{}\n", s.pid())).unwrap();
    std::fs::rename(&other, &pid_file).unwrap();
    s.signal(SIGTERM);
    assert_eq!(s.exit_code(), 0);
    assert!(pid_file.exists(), "a file sockhold did not write stays");
    let line = s.expect_log("left the pid file");
    assert!(line.contains(&pid_arg), "{line}");
}

#[test]
fn the_pid_file_stays_ours_across_a_self_upgrade() {
    let top = open_tempdir();
    let dir = subdir(top.path(), "run", 0o755, 0);
    let pid_file = dir.join("app.pid");
    let control = dir.join("ctl.sock");
    let (pid_arg, control_arg) =
        (pid_file.to_str().unwrap().to_string(), control.to_str().unwrap().to_string());
    let mut s = start_fixture(&["--pid-file", &pid_arg, "--control", &control_arg], &["--ready"]);
    s.expect_ready();
    let inode = std::fs::metadata(&pid_file).unwrap().ino();
    let upgrade = ctl(&control, &["upgrade"]);
    assert!(upgrade.status.success(), "{}", text(&upgrade.stderr));
    assert_eq!(std::fs::metadata(&pid_file).unwrap().ino(), inode, "not rewritten");
    // The new program knows the file is its own: it removes it at stop.
    s.signal(SIGTERM);
    assert_eq!(s.exit_code(), 0);
    assert!(!pid_file.exists(), "removed at exit after the upgrade");
    assert!(!s.log().iter().any(|l| l.contains("left the pid file")), "{:#?}", s.log());
}

#[test]
fn a_control_directory_another_user_owns_is_refused() {
    let top = open_tempdir();
    let theirs = subdir(top.path(), "theirs", 0o755, NOBODY);
    let control = theirs.join("ctl.sock");
    let (code, stderr) = run_to_end(&[
        "--control",
        control.to_str().unwrap(),
        "-l",
        "127.0.0.1:0",
        "--",
        &fixture(),
    ]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains(&format!("invalid --control {}", control.display())), "{stderr}");
    assert!(stderr.contains(&format!("the directory {}", theirs.display())), "{stderr}");
    assert!(stderr.contains("uid 65534 (nobody)") && stderr.contains("mode 0755"), "{stderr}");
    assert!(!control.exists());
    // A group-writable directory of root's is refused too.
    let shared = subdir(top.path(), "shared", 0o775, 0);
    let (code, stderr) = run_to_end(&[
        "--control",
        shared.join("ctl.sock").to_str().unwrap(),
        "-l",
        "127.0.0.1:0",
        "--",
        &fixture(),
    ]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("writable by its group") && stderr.contains("mode 0775"), "{stderr}");
}

#[test]
fn ctl_refuses_a_control_server_of_another_user() {
    if Command::new("python3").arg("-c").arg("").status().is_err() {
        eprintln!("SKIPPED: python3 is not installed (it plays the impostor)");
        assert!(std::env::var("CI").as_deref() != Ok("true"), "CI must have python3");
        return;
    }
    let top = open_tempdir();
    let theirs = subdir(top.path(), "theirs", 0o755, NOBODY);
    let path = theirs.join("ctl.sock");
    // An impostor that says every reload worked and reports what it was sent.
    let script = r#"
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.bind(sys.argv[1])
s.listen()
print("listening", flush=True)
while True:
    c, _ = s.accept()
    c.settimeout(5)
    try:
        data = c.recv(4096)
    except OSError:
        data = b""
    print("got", repr(data), flush=True)
    try:
        c.sendall(b'{"ok":true,"generation":9,"pid":1}\n')
    except OSError:
        pass
    c.close()
"#;
    let mut impostor = Command::new("python3")
        .args(["-c", script, path.to_str().unwrap()])
        .uid(NOBODY)
        .gid(NOBODY)
        .stdout(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(impostor.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "listening");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777)).unwrap();

    let out = ctl(&path, &["reload"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(!text(&out.stdout).contains("reloaded"), "{}", text(&out.stdout));
    assert!(stderr.contains("uid 65534 (nobody)"), "{stderr}");
    assert!(stderr.contains(&path.display().to_string()), "{stderr}");
    // Nothing was sent: the impostor saw a connection close without a request.
    let seen = lines.next().unwrap().unwrap();
    let _ = nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(impostor.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
    let _ = impostor.wait();
    assert_eq!(seen, "got b''");
}

#[test]
fn a_request_with_a_duplicate_key_is_an_error_and_sockhold_runs_on() {
    let dir = tempfile::tempdir().unwrap();
    let control = dir.path().join("ctl.sock");
    let control_arg = control.to_str().unwrap().to_string();
    let mut s = start_fixture(&["--control", &control_arg], &["--ready"]);
    s.expect_ready();
    let mut stream = UnixStream::connect(&control).unwrap();
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    stream.write_all(b"{\"cmd\":\"status\",\"cmd\":\"stop\"}\n").unwrap();
    let mut answer = String::new();
    BufReader::new(&stream).read_line(&mut answer).unwrap();
    let answer: serde_json::Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(answer["ok"], false);
    assert_eq!(answer["error"], "duplicate key \"cmd\" in request");
    drop(stream);
    let status = ctl_status(&control);
    assert_eq!(status["pid"].as_i64(), Some(i64::from(s.pid().as_raw())));
    assert!(!s.seen(|v| v["event"] == "signal"), "nothing was stopped");
}

/// CPU seconds (user + system) `pid` has used.
fn cpu_seconds(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = stat.rsplit_once(')').unwrap().1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the command: state is field 3, utime 14 and stime 15 (so indexes 11 and 12 here).
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).unwrap().unwrap_or(100);
    ticks as f64 / hz as f64
}

/// Starts sockhold under `prlimit --nofile=N:N`, or `None` (after saying SKIPPED) without it.
fn start_limited(nofile: u32, args: &[&str]) -> Option<Sockhold> {
    if Command::new("prlimit").arg("--version").output().is_err() {
        eprintln!("SKIPPED: prlimit (util-linux) is not installed");
        assert!(std::env::var("CI").as_deref() != Ok("true"), "CI must have prlimit");
        return None;
    }
    let bin = sockhold_bin();
    Some(start_with(args, |cmd| {
        let mut outer = Command::new("prlimit");
        outer.arg(format!("--nofile={nofile}:{nofile}")).arg("--").arg(&bin).args(cmd.get_args());
        for (k, v) in cmd.get_envs() {
            if let Some(v) = v {
                outer.env(k, v);
            }
        }
        outer.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0);
        *cmd = outer;
    }))
}

/// Opens idle control clients until sockhold logs that accept() failed; returns them.
fn exhaust(s: &mut Sockhold, control: &Path) -> Vec<UnixStream> {
    // Each accepted client costs sockhold an fd; once none is left, the rest wait in the
    // backlog. Stop soon after the warning, so few are left there.
    let needle = "control socket: accept failed: Too many open files";
    let mut clients = Vec::new();
    while clients.len() < 64 && !s.log().iter().any(|l| l.contains(needle)) {
        clients.push(UnixStream::connect(control).unwrap());
        std::thread::yield_now();
    }
    s.expect_log(needle);
    clients
}

/// Watches sockhold for a while in a state with no event: it must not burn CPU.
fn assert_quiet(s: &mut Sockhold, needle: &str) {
    let pid = s.pid().as_raw();
    let before = cpu_seconds(pid);
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_seconds(pid) - before;
    eprintln!("sockhold used {used:.2}s of CPU in {:?} out of fds", started.elapsed());
    assert!(used < 0.5, "sockhold spins when out of fds: {used:.2}s CPU in 2s");
    let warnings = s.log().iter().filter(|l| l.contains(needle)).count();
    assert_eq!(warnings, 1, "one warning per episode: {:#?}", s.log());
}

#[test]
fn out_of_fds_the_control_socket_waits_instead_of_spinning() {
    let dir = tempfile::tempdir().unwrap();
    let control = dir.path().join("ctl.sock");
    let control_arg = control.to_str().unwrap().to_string();
    let fixture = fixture();
    let args = [
        "-l",
        "127.0.0.1:0",
        "--control",
        &control_arg,
        "--ready",
        "notify",
        "--",
        &fixture,
        "--ready",
    ];
    let Some(mut s) = start_limited(16, &args) else { return };
    s.expect_ready();
    let clients = exhaust(&mut s, &control);
    assert_quiet(&mut s, "accept failed");
    drop(clients);
    let status = ctl_status(&control);
    assert_eq!(status["generations"][0]["state"], "serving");
    s.expect_log("control socket: accepting clients again");
    s.signal(SIGTERM);
    assert_eq!(s.exit_code(), 0);
}

#[test]
fn out_of_fds_accept_mode_waits_instead_of_spinning() {
    let dir = tempfile::tempdir().unwrap();
    let control = dir.path().join("ctl.sock");
    let control_arg = control.to_str().unwrap().to_string();
    let fixture = fixture();
    let args = ["--accept", "-l", "127.0.0.1:0", "--control", &control_arg, "--", &fixture];
    let Some(mut s) = start_limited(16, &args) else { return };
    let port = s.listening_port("127.0.0.1:");
    s.expect_manager("READY=1", |m| m.starts_with("READY=1"));
    let clients = exhaust(&mut s, &control);
    // A connection now finds sockhold without an fd to accept it: it waits in the backlog.
    let conn = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.expect_log("--accept: accept failed: Too many open files");
    assert_quiet(&mut s, "--accept: accept failed");
    assert!(!s.seen(|v| v["event"] == "start"), "nothing was accepted yet");
    drop(clients);
    // Once fds are free, the waiting connection is accepted (its child may still find too few
    // fds to start, and then the connection is closed), ctl is answered, and a new connection
    // gets its child.
    s.expect_log("--accept: accepting connections again");
    assert_eq!(ctl_status(&control)["ok"], true);
    drop(conn);
    let _next = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let start = s.expect("a connection's child", |v| v["event"] == "start");
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid_of(&start) as i32), SIGTERM);
    s.signal(SIGTERM);
    s.wait_exit();
}

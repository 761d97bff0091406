//! What a child gets: its fds, environment, signal state and process group.

use std::os::unix::process::CommandExt;

use crate::support::*;

/// A shell command that writes its signal mask and ignored set to the file `$0`, then execs the
/// rest of its arguments in place (same pid, so LISTEN_PID still matches).
const RECORD_SIGNALS: &str = "grep -E '^Sig(Blk|Ign)' /proc/self/status > \"$0\" && exec \"$@\"";

#[test]
fn child_gets_exactly_its_fds_environment_and_signal_state() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let sock_spec = format!("unix://{},name=api", sock.display());
    let fixture = fixture();
    // The fixture is a Rust program, and Rust's runtime ignores SIGPIPE before main: so the
    // signal dispositions are read by a shell that sockhold starts and that then execs it.
    let signal_state = dir.path().join("signals");
    let signal_state_arg = signal_state.to_str().unwrap().to_string();
    #[rustfmt::skip]
    let args = [
        "--ready", "notify", "-l", "127.0.0.1:0", "-l", &sock_spec, "--name", "fixture", "--",
        "/bin/sh", "-c", RECORD_SIGNALS, &signal_state_arg, &fixture, "--ready",
    ];
    let mut s = start_with(&args, |cmd| {
        // What sockhold itself inherits must not reach the child.
        cmd.env("LISTEN_FDS", "7")
            .env("LISTEN_PID", "1")
            .env("LISTEN_FDNAMES", "stale")
            .env("LISTEN_PIDFDID", "12345")
            .env("WATCHDOG_USEC", "1000000")
            .env("WATCHDOG_PID", "1")
            .env("FIXTURE_KEEP", "kept");
    });
    let start = s.expect_event("start", 1);
    let pid = pid_of(&start);
    assert_eq!(start["ppid"].as_i64(), Some(s.pid().as_raw() as i64), "sockhold is the parent");
    assert_eq!(start["pgid"].as_i64(), Some(pid), "the child leads its own process group");

    let env = &start["env"];
    assert_eq!(env["LISTEN_FDS"], "2");
    assert_eq!(env["LISTEN_PID"], pid.to_string().as_str(), "LISTEN_PID is the child's own pid");
    assert_eq!(env["LISTEN_FDNAMES"], "fixture:api", "default name is the command's basename");
    assert_eq!(env["SOCKHOLD_GENERATION"], "1");
    assert_eq!(env["FIXTURE_KEEP"], "kept");
    assert!(env.get("LISTEN_PIDFDID").is_none(), "inherited LISTEN_PIDFDID removed: {env}");
    assert!(
        env.get("WATCHDOG_USEC").is_none() && env.get("WATCHDOG_PID").is_none(),
        "WATCHDOG_* removed: {env}"
    );
    let notify = env["NOTIFY_SOCKET"].as_str().expect("NOTIFY_SOCKET set");
    assert!(notify.starts_with('/'), "an absolute path: {notify}");
    assert!(
        !notify.ends_with("manager.sock"),
        "the child gets its own notify socket, not sockhold's"
    );

    assert_eq!(start["sigblk"], "0000000000000000", "empty signal mask");
    let signals = std::fs::read_to_string(&signal_state).unwrap();
    assert_eq!(
        signals, "SigBlk:\t0000000000000000\nSigIgn:\t0000000000000000\n",
        "no blocked or ignored signal (not even SIGPIPE, which sockhold itself ignores)"
    );

    let fds = start["fds"].as_array().expect("fds");
    let numbers: Vec<i64> = fds.iter().map(|f| f["fd"].as_i64().unwrap()).collect();
    assert_eq!(numbers, vec![0, 1, 2, 3, 4], "exactly stdio and the two listeners: {fds:?}");
    let tcp = &fds[3];
    assert_eq!(tcp["cloexec"], false);
    assert_eq!(tcp["nonblock"], false, "blocking by default");
    assert_eq!(tcp["socket"]["family"], "inet");
    assert_eq!(tcp["socket"]["type"], "stream");
    assert_eq!(tcp["socket"]["listening"], true);
    assert!(tcp["socket"]["local"].as_str().unwrap().starts_with("127.0.0.1:"));
    let unix = &fds[4];
    assert_eq!(unix["cloexec"], false);
    assert_eq!(unix["nonblock"], false);
    assert_eq!(unix["socket"]["family"], "unix");
    assert_eq!(unix["socket"]["listening"], true);
    assert_eq!(unix["socket"]["local"], sock.to_str().unwrap());
    s.expect_ready();

    s.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(s.exit_code(), 0);
    assert!(!sock.exists(), "the Unix socket file sockhold created is removed at exit");
}

#[test]
fn signals_ignored_by_sockholds_own_parent_do_not_reach_the_child() {
    // A shell with SIGXFSZ and SIGPIPE ignored execs sockhold, as nohup-style wrappers do.
    let fixture = fixture();
    let bin = sockhold_bin();
    let dir = tempfile::tempdir().unwrap();
    let signal_state = dir.path().join("signals");
    let mut s = start_with(&[], |cmd| {
        let mut sh = std::process::Command::new("/bin/sh");
        sh.arg("-c").arg("trap '' XFSZ PIPE; exec \"$@\"").arg("sh").arg(&bin);
        sh.args(["-l", "127.0.0.1:0", "--ready", "notify", "--", "/bin/sh", "-c", RECORD_SIGNALS]);
        sh.arg(&signal_state).args([&fixture, "--ready"]);
        // Keep the harness's environment, stdio and process group on the wrapper.
        for (k, v) in cmd.get_envs() {
            match v {
                Some(v) => sh.env(k, v),
                None => sh.env_remove(k),
            };
        }
        sh.stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .process_group(0);
        *cmd = sh;
    });
    let start = s.expect_event("start", 1);
    let fds = start["fds"].as_array().expect("fds");
    let numbers: Vec<i64> = fds.iter().map(|f| f["fd"].as_i64().unwrap()).collect();
    assert_eq!(numbers, vec![0, 1, 2, 3], "sockhold's inherited fds stay out: {fds:?}");
    assert_eq!(fds[3]["socket"]["listening"], true, "fd 3 is the listener, moved down from 5");
    let signals = std::fs::read_to_string(&signal_state).unwrap();
    assert!(signals.contains("SigIgn:\t0000000000000000"), "{signals}");
    assert!(signals.contains("SigBlk:\t0000000000000000"), "{signals}");
}

#[test]
fn notify_from_a_helper_process_counts_with_group_access_only() {
    // group (the default): a helper forked by the child may say READY=1.
    let mut s = start_fixture(&[], &["--fork-notify-ready"]);
    s.expect_event("ready-sent-by-helper", 1);
    s.expect_ready();
    s.expect_log("generation 1 (pid");
    assert!(s.log().iter().any(|l| l.ends_with(") is ready")), "promoted by the helper's READY=1");
    // main: the same helper is refused, so generation 1 is never ready and sockhold gives up.
    let mut s = start_fixture(
        &["--notify-access", "main", "--ready-timeout", "1s", "--restart", "never"],
        &["--fork-notify-ready"],
    );
    s.expect_event("ready-sent-by-helper", 1);
    s.expect_log("which --notify-access main does not allow");
    s.expect_log("was not ready within 1s");
}

#[test]
fn status_lines_reach_the_log_and_the_manager() {
    let mut s = start_fixture(&[], &["--status", "warming up", "--ready"]);
    s.expect_log("status: warming up");
    let ready = s.expect_ready();
    assert!(ready.contains("STATUS=serving: generation 1"), "{ready}");
    assert!(ready.contains("warming up"), "{ready}");
}

/// STOPPING=1, RELOADING=1 and ERRNO= from a child change nothing, but `-v` logs them with
/// the generation and the pid, ERRNO= with the error's name, as systemd does.
#[test]
fn a_childs_stopping_reloading_and_errno_are_logged_at_debug() {
    let status = "failing\nSTOPPING=1\nRELOADING=1\nERRNO=5";
    let mut s = start_fixture(&["-v"], &["--status", status, "--ready"]);
    s.expect_log("status: failing");
    let stopping = s.expect_log("is stopping (STOPPING=1)");
    assert!(stopping.contains("generation 1 (pid "), "{stopping}");
    s.expect_log("is reloading (RELOADING=1)");
    s.expect_log("reports error EIO: I/O error (ERRNO=5)");
    // Nothing changed: the child still becomes ready and serves.
    s.expect_ready();
    s.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(s.exit_code(), 0);
}

/// The file status flags of fd 3 of a live process, from `/proc/PID/fdinfo/3` (octal).
fn fd3_flags(pid: i64) -> u32 {
    let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/3")).expect("fdinfo");
    let flags = info.lines().find_map(|l| l.strip_prefix("flags:")).expect("flags line");
    u32::from_str_radix(flags.trim(), 8).expect("octal flags")
}

const O_NONBLOCK: u32 = 0o4000;

#[test]
fn a_child_that_sets_o_nonblock_keeps_it_through_reloads_and_a_failed_one() {
    // Generation 1 sets O_NONBLOCK on the shared listener, as HAProxy and lighttpd do; no later
    // generation sets it. sockhold must never clear it under a running server: every later
    // generation inherits it, and the one serving still has it after 5 reloads and after a
    // reload whose new child (generation 7) exits before it is ready.
    #[rustfmt::skip]
    let mut s = start_fixture(&[], &[
        "--set-nonblock-gen", "1", "--exit-gen", "7:3",
        "--ready-gen", "1", "--ready-gen", "2", "--ready-gen", "3",
        "--ready-gen", "4", "--ready-gen", "5", "--ready-gen", "6",
    ]);
    let first = s.expect_event("start", 1);
    assert_eq!(first["fds"][3]["nonblock"], false, "blocking at start: {first}");
    s.expect_event("set-nonblock", 1);
    s.expect_ready();
    assert_ne!(fd3_flags(pid_of(&first)) & O_NONBLOCK, 0);
    let mut serving = first;
    for generation in 2..=6 {
        s.signal(nix::sys::signal::Signal::SIGHUP);
        let start = s.expect_event("start", generation);
        assert_eq!(start["fds"][3]["nonblock"], true, "inherited, not cleared: {start}");
        let ready = s.expect_ready();
        assert!(ready.contains(&format!("generation {generation} ")), "{ready}");
        serving = start;
    }
    assert_ne!(fd3_flags(pid_of(&serving)) & O_NONBLOCK, 0, "after 5 reloads");
    s.signal(nix::sys::signal::Signal::SIGHUP);
    let failing = s.expect_event("start", 7);
    assert_eq!(failing["fds"][3]["nonblock"], true, "{failing}");
    s.expect_event("exit", 7);
    s.expect_log("reload failed");
    assert!(process_exists(pid_of(&serving)), "generation 6 still serves");
    assert_ne!(fd3_flags(pid_of(&serving)) & O_NONBLOCK, 0, "after a failed reload");
}

#[test]
fn libsystemds_own_systemd_notify_makes_a_generation_ready() {
    // systemd-notify sends READY=1 with libsystemd's code, from its own pid, then waits on a
    // barrier: it needs --notify-access group (the default), and a barrier that is answered.
    let script = "systemd-notify --ready --status='up via libsystemd' && echo notified >&2 && exec sleep 600";
    #[rustfmt::skip]
    let mut s = start(&["-l", "127.0.0.1:0", "--ready", "notify", "--ready-timeout", "10s", "--", "/bin/sh", "-c", script]);
    let ready = s.expect_ready();
    assert!(ready.contains("up via libsystemd"), "{ready}");
    s.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(s.exit_code(), 0);
}

#[test]
fn compat_env_describes_the_fds_as_einhorn_and_server_starter_do() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("app.sock");
    let sock_arg = sock.to_str().unwrap().to_string();
    let mut s = start_with(
        &[
            "--compat-env",
            "einhorn,server-starter",
            "-l",
            "127.0.0.1:0",
            "-l",
            "0",
            "-l",
            &sock_arg,
            "--ready",
            "notify",
            "--",
            &fixture(),
            "--ready",
        ],
        // Stale variables from a tool sockhold itself runs under must not reach the child.
        |cmd| {
            cmd.env("EINHORN_FD_7", "9").env("SERVER_STARTER_PORT", "1=9");
        },
    );
    let start = s.expect_event("start", 1);
    let env = &start["env"];
    let local = |fd: usize| start["fds"][fd]["socket"]["local"].as_str().unwrap().to_string();
    let bare_port = local(4).rsplit(':').next().unwrap().to_string();
    assert_eq!(env["EINHORN_FDS"], "3 4 5");
    assert_eq!(env["EINHORN_FD_COUNT"], "3");
    assert_eq!(env["EINHORN_FD_0"], "3");
    assert_eq!(env["EINHORN_FD_2"], "5");
    assert!(env.get("EINHORN_FD_7").is_none(), "stale EINHORN_* removed: {env}");
    assert_eq!(env["EINHORN_MASTER_PID"], s.pid().to_string().as_str());
    assert_eq!(
        env["SERVER_STARTER_PORT"],
        format!("{}=3;{bare_port}=4;{sock_arg}=5", local(3)).as_str(),
        "a bare port stays bare, as Server::Starter writes it"
    );
    assert_eq!(env["SERVER_STARTER_GENERATION"], "1");
}

#[test]
fn compat_env_nginx_sets_nginx_and_hands_the_sockets_over_non_blocking() {
    let fixture = fixture();
    #[rustfmt::skip]
    let mut s = start_with(
        &["--compat-env", "nginx", "-l", "127.0.0.1:0", "-l", "127.0.0.1:0",
          "--ready", "notify", "--", &fixture, "--ready"],
        // A stale NGINX from sockhold's own environment must not reach the child.
        |cmd| {
            cmd.env("NGINX", "7;8;");
        },
    );
    s.expect_log("--compat-env nginx: every listener is handed over non-blocking");
    let start = s.expect_event("start", 1);
    assert_eq!(start["env"]["NGINX"], "3;4;", "a ';' after every fd, as nginx needs: {start}");
    assert_eq!(start["fds"][3]["nonblock"], true, "{start}");
    assert_eq!(start["fds"][4]["nonblock"], true, "{start}");
    s.expect_ready();
    s.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(s.exit_code(), 0);
}

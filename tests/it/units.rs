//! `--unit`: systemd units run by sockhold. Hand-written pairs drive the fixture, which reports
//! what each mapped directive gave it; a malformed unit must be a usage error that runs
//! nothing; `--print-config` shows the equivalent command line. Then real units nobody here
//! wrote (`tests/units/`, copied unchanged, with a drop-in moving them to loopback): Debian's
//! `ssh.socket` + `ssh.service` (sshd takes the socket and sends READY=1) across reloads, the
//! per-connection `ssh@.service` running `sshd -i`, fcgiwrap's pair reloaded under load, and the
//! runit service in `contrib/runit/ssh-unit` running Debian's ssh units.

use std::io::{BufRead, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::Signal::{SIGHUP, SIGTERM};

use crate::support::*;

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().expect("a parent")).expect("mkdir");
    std::fs::write(path, text).expect("write unit file");
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Copies the real units `names` from `tests/units/FROM/` into `dir`, unchanged.
fn copy_units(from: &str, names: &[&str], dir: &Path) {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/units").join(from);
    for name in names {
        std::fs::copy(source.join(name), dir.join(name)).expect("copy a unit");
    }
}

/// A hand-written pair covering the mapped directives, run with the fixture: each reaches the
/// child as systemd would give it, the unsupported one is in the one warning, the runtime
/// directory exists while it runs and is gone after, KillSignal= stops it.
#[test]
fn a_hand_written_pair_reaches_the_child() {
    if !is_root() {
        return skipped("RuntimeDirectory= is created in /run, which needs root");
    }
    let dir = tempfile::tempdir().unwrap();
    let runtime = format!("sockhold-test-unit-{}", std::process::id());
    write(
        &dir.path().join("app.socket"),
        &format!(
            "[Unit]\nDescription=a test\n\n[Socket]\nListenStream=127.0.0.1:0\nListenStream={}/sock/app.sock\nFileDescriptorName=web\nSocketMode=0600\nDirectoryMode=0700\nNoDelay=yes\nKeepAlive=yes\nReceiveBuffer=64K\nPassCredentials=yes\n",
            dir.path().display()
        ),
    );
    write(
        &dir.path().join("app.service"),
        &format!(
            "[Service]\nType=notify\nExecStart=@{} fixture-argv0 --ready \\\n  $OPTS\nEnvironment=\"FIXTURE_A=a b\" \"OPTS=--status %N-up\"\nWorkingDirectory={}\nRuntimeDirectory={runtime}\nRuntimeDirectoryMode=0710\nKillSignal=SIGINT\nProtectSystem=strict\n",
            fixture(),
            dir.path().display()
        ),
    );
    let unit = dir.path().join("app.socket");
    let mut sh = start(&["--unit", unit.to_str().unwrap()]);
    let warning = sh.expect_log("--unit: 2 directive(s) of the units are not applied");
    assert!(warning.contains("warning:"), "{warning}");
    sh.expect_log("app.socket:13: PassCredentials=yes: not applied by sockhold");
    sh.expect_log("app.service:10: ProtectSystem=strict: not applied by sockhold");
    let start = sh.expect_event("start", 1);
    assert_eq!(
        start["argv"],
        serde_json::json!(["fixture-argv0", "--ready", "--status", "app-up"])
    );
    let env = &start["env"];
    assert_eq!(env["LISTEN_FDNAMES"], "web:web");
    assert_eq!(env["FIXTURE_A"], "a b");
    let run_dir = PathBuf::from("/run").join(&runtime);
    assert_eq!(env["RUNTIME_DIRECTORY"], run_dir.to_str().unwrap());
    assert_eq!(start["cwd"], dir.path().to_str().unwrap());
    let tcp = &start["fds"][3]["socket"];
    assert_eq!(
        (&tcp["nodelay"], &tcp["keepalive"]),
        (&serde_json::json!(true), &serde_json::json!(true))
    );
    assert_eq!(tcp["rcvbuf"], 2 * 64 * 1024, "the kernel reports twice the size asked");
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode(&dir.path().join("sock/app.sock")), 0o600);
    assert_eq!(mode(&dir.path().join("sock")), 0o700);
    assert_eq!(mode(&run_dir), 0o710);
    sh.expect_ready();
    sh.signal(SIGTERM);
    sh.expect_signal(1, "INT");
    assert_eq!(sh.wait_exit().code(), Some(0));
    assert!(!run_dir.exists(), "{} outlived sockhold", run_dir.display());
}

/// Options on the command line win: -l replaces the unit's listeners, COMMAND its ExecStart=,
/// --env overrides a key of Environment=, --ready replaces what Type= gave.
#[test]
fn the_command_line_overrides_the_unit() {
    let dir = tempfile::tempdir().unwrap();
    write(
        &dir.path().join("app.socket"),
        "[Socket]\nListenStream=127.0.0.1:0\nListenStream=127.0.0.1:0\n",
    );
    write(
        &dir.path().join("app.service"),
        "[Service]\nType=simple\nExecStart=/nonexistent/server\nEnvironment=FIXTURE_A=unit FIXTURE_B=unit\n",
    );
    let unit = dir.path().join("app.socket");
    let fixture = fixture();
    let mut sh = start(&[
        "--unit",
        unit.to_str().unwrap(),
        "-l",
        "127.0.0.1:0,name=mine",
        "--env",
        "FIXTURE_B=mine",
        "--ready",
        "notify",
        "--",
        &fixture,
        "--ready",
    ]);
    let start = sh.expect_event("start", 1);
    assert_eq!(start["argv"], serde_json::json!([fixture, "--ready"]));
    assert_eq!(start["env"]["LISTEN_FDNAMES"], "mine");
    assert_eq!(
        (&start["env"]["FIXTURE_A"], &start["env"]["FIXTURE_B"]),
        (&"unit".into(), &"mine".into())
    );
    sh.expect_ready();
}

/// Each malformed form is a usage error (exit 2) naming file:line, and nothing runs: the
/// service would create a marker file.
#[test]
fn a_malformed_unit_is_a_usage_error_and_nothing_runs() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("ran");
    let service = format!("[Service]\nExecStart=/usr/bin/touch {}\n", marker.display());
    for (socket_body, service_extra, want) in [
        (
            "ListenStream 127.0.0.1:0",
            "",
            "app.socket:2: 'ListenStream 127.0.0.1:0' is neither KEY=VALUE",
        ),
        (
            "ListenStream=127.0.0.1:0\n[Timer]\nOnBoot=1",
            "",
            "app.socket:3: unknown section [Timer]",
        ),
        ("ListenStream=127.0.0.1:0\nAccept=perhaps", "", "app.socket:3: Accept= takes a boolean"),
        (
            "ListenStream=127.0.0.1:0",
            "Type=forking\n",
            "app.service:3: Type=forking is not supported",
        ),
        (
            "ListenStream=127.0.0.1:0",
            "Environment=\"A=1\n",
            "app.service:3: Environment=: a double quote is not closed",
        ),
        (
            "ListenStream=127.0.0.1:0",
            "ExecStart=\nExecStart=/bin/x %q\n",
            "app.service:4: ExecStart=: unknown specifier '%q'",
        ),
    ] {
        write(&dir.path().join("app.socket"), &format!("[Socket]\n{socket_body}\n"));
        write(&dir.path().join("app.service"), &format!("{service}{service_extra}"));
        let unit = dir.path().join("app.socket");
        let (code, stderr) = run_to_end(&["--unit", unit.to_str().unwrap()]);
        assert_eq!(code, 2, "{want}: {stderr}");
        assert!(
            stderr.starts_with("sockhold: error: ") && stderr.contains(want),
            "{want}: {stderr}"
        );
        assert!(!stderr.contains("starting generation"), "{stderr}");
        assert!(!marker.exists(), "{want}: the service ran");
    }
    let (code, stderr) = run_to_end(&["--unit", dir.path().join("none.socket").to_str().unwrap()]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("unit none.socket found in neither"), "{stderr}");
}

/// `--print-config` prints the equivalent command line and exits 0 without binding or
/// running anything; `FileDescriptorStoreMax=` becomes `--fd-store N`.
#[test]
fn print_config_shows_the_equivalent_command_line() {
    let dir = tempfile::tempdir().unwrap();
    write(
        &dir.path().join("web.socket"),
        "[Socket]\nListenStream=127.0.0.1:1\nListenDatagram=/run/x/web.dgram\nBacklog=10\n",
    );
    write(
        &dir.path().join("web.service"),
        "[Service]\nType=notify\nExecStart=/usr/bin/web --flag 'two words'\nFileDescriptorStoreMax=4\nTimeoutStartSec=30\nExecReload=/bin/kill -HUP $MAINPID\n",
    );
    let unit = dir.path().join("web.socket");
    let out = std::process::Command::new(sockhold_bin())
        .args(["--unit", unit.to_str().unwrap(), "--print-config", "--stop-timeout", "3s"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert_eq!(
        stdout.trim(),
        "sockhold -l 127.0.0.1:1,name=web.socket,backlog=10 -l unixgram:///run/x/web.dgram,name=web.socket,mode=0666 --name web --ready notify --ready-timeout 30s --kill-mode control-group --restart never --fd-store 4 --stop-timeout 3s -- /usr/bin/web --flag 'two words'"
    );
    assert!(
        stderr.contains("web.service:6: ExecReload=/bin/kill -HUP $MAINPID: not applied"),
        "{stderr}"
    );
    assert!(!Path::new("/run/x/web.dgram").exists(), "--print-config bound a socket");
}

/// Writes a host key and an sshd_config of the test's own (sshd must not touch /etc/ssh).
fn sshd_files(dir: &Path) -> Option<String> {
    let keygen = require_tool("ssh-keygen", "openssh-client")?;
    let key = dir.join("host_key");
    let out = std::process::Command::new(keygen)
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(out.status.success(), "ssh-keygen: {}", String::from_utf8_lossy(&out.stderr));
    let config = dir.join("sshd_config");
    write(&config, &format!("HostKey {}\nPidFile none\nUsePAM no\n", key.display()));
    Some(format!("-f {} -h {}", config.display(), key.display()))
}

/// The SSH banner on a new connection to `port`.
fn ssh_banner(port: u16) -> String {
    let stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect to sshd");
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    // read_until goes on after EINTR, which a read on a socket with a timeout can return even
    // without a signal handler (after a stop and SIGCONT, signal(7)).
    let mut banner = Vec::new();
    std::io::BufReader::new(stream).read_until(b'\n', &mut banner).expect("read the banner");
    String::from_utf8_lossy(&banner).trim().to_string()
}

/// Debian 12's ssh.socket + ssh.service, unchanged, with a drop-in for loopback and the test's
/// own config: sshd takes the socket (Accept=no), sends READY=1, serves, and serves again after
/// each reload (a new sshd on the same socket, the old one stopped).
#[test]
fn debian_ssh_socket_and_service_serve_across_reloads() {
    if !is_root() {
        return skipped("sshd needs root");
    }
    let Some(_) = require_tool("sshd", "openssh-server") else { return };
    let dir = tempfile::tempdir().unwrap();
    let Some(opts) = sshd_files(dir.path()) else { return };
    copy_units("debian12", &["ssh.socket", "ssh.service"], dir.path());
    write(
        &dir.path().join("ssh.socket.d/test.conf"),
        "[Socket]\nListenStream=\nListenStream=127.0.0.1:0\n",
    );
    // The test's sshd options instead of /etc/default/ssh's; /run/sshd is shared with any
    // other sshd test running at once, so it stays.
    write(
        &dir.path().join("ssh.service.d/test.conf"),
        &format!(
            "[Service]\nEnvironmentFile=\nEnvironment=\"SSHD_OPTS={opts}\"\nRuntimeDirectoryPreserve=yes\n"
        ),
    );
    let unit = dir.path().join("ssh.socket");
    let mut sh = start(&["--unit", unit.to_str().unwrap()]);
    sh.expect_log("ssh.service:9: ExecStartPre=/usr/sbin/sshd -t: not applied by sockhold");
    assert!(
        !sh.log().iter().any(|l| l.contains("KillMode=")),
        "KillMode=process is applied, not warned about"
    );
    let port = sh.listening_port("127.0.0.1:");
    sh.expect_ready();
    // A session on generation 1's sshd outlives it: sshd gives each connection a session of its
    // own (setsid), which no stop of a generation reaches.
    let mut session = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    session.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut banner = String::new();
    std::io::BufReader::new(&session).read_line(&mut banner).unwrap();
    assert!(banner.starts_with("SSH-2.0-OpenSSH"), "{banner}");
    for generation in 2..=4 {
        sh.signal(SIGHUP);
        sh.expect_log(&format!("is ready; stopping generation {}", generation - 1));
        sh.expect_log_times(") stopped: ", (generation - 1) as usize);
        let banner = ssh_banner(port);
        assert!(banner.starts_with("SSH-2.0-OpenSSH"), "after reload {}: {banner}", generation - 1);
    }
    // The session's sshd is still there: given the client's version, it goes on with the key
    // exchange (its KEXINIT packet), where a killed one would have reset the connection.
    session.write_all(b"SSH-2.0-sockhold_test\r\n").unwrap();
    let mut packet = [0u8; 6];
    session.read_exact(&mut packet).expect("the session's sshd answers after 3 reloads");
    assert_eq!(packet[5], 20, "SSH_MSG_KEXINIT, got {packet:?}");
    drop(session);
    sh.signal(SIGTERM);
    assert_eq!(sh.wait_exit().code(), Some(0));
}

/// The per-connection style: Debian's ssh.socket with Accept=yes and ssh@.service running
/// `sshd -i` on the connection (StandardInput=socket): two connections at once, two sshds.
#[test]
fn debian_ssh_per_connection_runs_sshd_inetd_style() {
    if !is_root() {
        return skipped("sshd needs root");
    }
    let Some(_) = require_tool("sshd", "openssh-server") else { return };
    let dir = tempfile::tempdir().unwrap();
    let Some(opts) = sshd_files(dir.path()) else { return };
    copy_units("debian11", &["ssh.socket", "ssh@.service"], dir.path());
    write(
        &dir.path().join("ssh.socket.d/test.conf"),
        "[Socket]\nListenStream=\nListenStream=127.0.0.1:0\n",
    );
    write(
        &dir.path().join("ssh@.service.d/test.conf"),
        &format!("[Service]\nEnvironmentFile=\nEnvironment=\"SSHD_OPTS={opts}\"\n"),
    );
    let unit = dir.path().join("ssh.socket");
    let mut sh = start(&["--unit", unit.to_str().unwrap()]);
    let port = sh.listening_port("127.0.0.1:");
    let first = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    assert!(ssh_banner(port).starts_with("SSH-2.0-OpenSSH"));
    let mut first = std::io::BufReader::new(first);
    let mut banner = String::new();
    first.get_mut().set_read_timeout(Some(TIMEOUT)).unwrap();
    std::io::BufRead::read_line(&mut first, &mut banner).unwrap();
    assert!(banner.starts_with("SSH-2.0-OpenSSH"), "{banner}");
    drop(first);
    sh.signal(SIGTERM);
    assert_eq!(sh.wait_exit().code(), Some(0));
}

/// The FastCGI socket of the fcgiwrap test (the load's requests take only a port).
static FCGI_SOCKET: std::sync::OnceLock<(PathBuf, PathBuf)> = std::sync::OnceLock::new();

/// One FastCGI request (responder role) for the test's CGI script on a new connection to
/// fcgiwrap; the answer must be the script's "ok".
fn fcgi_get(_port: u16) -> Result<i32, String> {
    let (socket, script) = FCGI_SOCKET.get().expect("set by the test");
    let mut stream = UnixStream::connect(socket).map_err(|e| format!("connect: {e}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(10))).map_err(|e| e.to_string())?;
    let record = |kind: u8, body: &[u8]| {
        let mut r = vec![1, kind, 0, 1];
        r.extend((body.len() as u16).to_be_bytes());
        r.extend([0, 0]);
        r.extend(body);
        r
    };
    let mut params = Vec::new();
    for (k, v) in [
        ("SCRIPT_FILENAME", script.to_str().unwrap()),
        ("SCRIPT_NAME", "/ok.cgi"),
        ("REQUEST_METHOD", "GET"),
        ("GATEWAY_INTERFACE", "CGI/1.1"),
        ("SERVER_PROTOCOL", "HTTP/1.1"),
        ("QUERY_STRING", ""),
    ] {
        params.extend([k.len() as u8, v.len() as u8]);
        params.extend(k.as_bytes());
        params.extend(v.as_bytes());
    }
    let mut request = record(1, &[0, 1, 0, 0, 0, 0, 0, 0]);
    request.extend(record(4, &params));
    request.extend(record(4, &[]));
    request.extend(record(5, &[]));
    stream.write_all(&request).map_err(|e| format!("write: {e}"))?;
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply).map_err(|e| format!("read: {e}"))?;
    let (mut out, mut ended, mut at) = (Vec::new(), false, 0);
    while at + 8 <= reply.len() {
        let (kind, len, pad) = (
            reply[at + 1],
            u16::from_be_bytes([reply[at + 4], reply[at + 5]]) as usize,
            reply[at + 6] as usize,
        );
        let body = reply.get(at + 8..at + 8 + len).ok_or("a short record")?;
        match kind {
            6 => out.extend_from_slice(body),
            3 => ended = true,
            _ => {}
        }
        at += 8 + len + pad;
    }
    let out = String::from_utf8_lossy(&out);
    if !ended || !out.ends_with("\r\n\r\nok\n") {
        return Err(format!("bad answer (ended: {ended}): {out:?}"));
    }
    Ok(0)
}

/// fcgiwrap's own pair from Debian 12, unchanged but for a drop-in moving the socket into the
/// test's directory: a Unix socket owned by www-data (0660) and fcgiwrap run as www-data,
/// reloaded 5 times under load; every request must reach a server and be answered.
#[test]
fn debian_fcgiwrap_reloads_under_load() {
    if !is_root() {
        return skipped("the units run fcgiwrap as www-data");
    }
    let Some(_) = require_tool("fcgiwrap", "fcgiwrap") else { return };
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let script = dir.path().join("ok.cgi");
    write(&script, "#!/bin/sh\nprintf 'Content-Type: text/plain\\r\\n\\r\\nok\\n'\n");
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    copy_units("debian12", &["fcgiwrap.socket", "fcgiwrap.service"], dir.path());
    let socket = dir.path().join("fcgiwrap.socket.sock");
    write(
        &dir.path().join("fcgiwrap.socket.d/test.conf"),
        &format!("[Socket]\nListenStream=\nListenStream={}\n", socket.display()),
    );
    FCGI_SOCKET.set((socket.clone(), script)).expect("one fcgiwrap test");
    let unit = dir.path().join("fcgiwrap.socket");
    let mut sh = start(&["--unit", unit.to_str().unwrap()]);
    sh.expect_log("generation 1 (pid");
    sh.expect_log(") is ready");
    let meta = std::fs::metadata(&socket).unwrap();
    let www = nix::unistd::User::from_name("www-data").unwrap().expect("user www-data");
    assert_eq!((meta.mode() & 0o7777, meta.uid()), (0o660, www.uid.as_raw()));
    let load = Load::start_with(0, 4, fcgi_get);
    load.wait_for(50);
    for generation in 2..=6u64 {
        sh.signal(SIGHUP);
        sh.expect_log(&format!("is ready; stopping generation {}", generation - 1));
        sh.expect_log_times(") stopped: ", (generation - 1) as usize);
        load.wait_for(50);
    }
    let (ok, failures, _) = load.finish();
    eprintln!(
        "fcgiwrap: {ok} requests over 5 reloads, {} answered 502 by fcgiwrap",
        failures.len()
    );
    // Every request reached a server and got an answer: no connection was refused or reset.
    // fcgiwrap itself answers 502 to a request whose CGI read its stop signal interrupts (as
    // under systemd, which sends the same SIGTERM): at most one per client per reload.
    let lost: Vec<&String> =
        failures.iter().filter(|f| !f.contains("Status: 502 Bad Gateway")).collect();
    assert!(
        lost.is_empty(),
        "{} of {} requests lost: {:?}",
        lost.len(),
        ok + failures.len() as u64,
        &lost[..lost.len().min(5)]
    );
    assert!(
        failures.len() <= 4 * 5,
        "{} requests cut off by 5 stops of 4 clients' server",
        failures.len()
    );
    sh.signal(SIGTERM);
    sh.wait_exit();
}

/// contrib/runit/ssh-unit/run, run as runsv would run it (from its directory, its output on
/// stdout), with a conf pointing at a copy of Debian 12's ssh units: sshd serves, a reload
/// through the control socket succeeds, sshd serves again.
#[test]
fn contrib_runit_service_runs_debian_ssh_units() {
    if !is_root() {
        return skipped("sshd needs root");
    }
    let Some(_) = require_tool("sshd", "openssh-server") else { return };
    let dir = tempfile::tempdir().unwrap();
    let Some(opts) = sshd_files(dir.path()) else { return };
    let units = dir.path().join("units");
    std::fs::create_dir(&units).unwrap();
    copy_units("debian12", &["ssh.socket", "ssh.service"], &units);
    write(
        &units.join("ssh.socket.d/test.conf"),
        "[Socket]\nListenStream=\nListenStream=127.0.0.1:0\n",
    );
    write(
        &units.join("ssh.service.d/test.conf"),
        &format!(
            "[Service]\nEnvironmentFile=\nEnvironment=\"SSHD_OPTS={opts}\"\nRuntimeDirectoryPreserve=yes\n"
        ),
    );
    let service = dir.path().join("ssh-unit");
    std::fs::create_dir(&service).unwrap();
    let contrib = Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/runit/ssh-unit");
    std::fs::copy(contrib.join("run"), service.join("run")).unwrap();
    let conf = std::fs::read_to_string(contrib.join("conf")).unwrap();
    let rundir = dir.path().join("rundir");
    let control = rundir.join("control.sock");
    write(
        &service.join("conf"),
        &format!(
            "{conf}\nSOCKHOLD={}\nUNIT={}\nRUNDIR={}\nCONTROL=$RUNDIR/control.sock\n",
            sockhold_bin().display(),
            units.join("ssh.socket").display(),
            rundir.display()
        ),
    );
    let mut sh = start_with(&[], |cmd| {
        // runsv reads both streams from stdout; the harness reads sockhold's log from stderr.
        let mut outer = std::process::Command::new("sh");
        outer.args(["-c", "exec ./run >&2"]).current_dir(&service);
        for (k, v) in cmd.get_envs() {
            if let Some(v) = v {
                outer.env(k, v);
            }
        }
        outer
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        std::os::unix::process::CommandExt::process_group(&mut outer, 0);
        *cmd = outer;
    });
    sh.expect_log("ExecStartPre=/usr/sbin/sshd -t: not applied by sockhold");
    let port = sh.listening_port("127.0.0.1:");
    sh.expect_log(") is ready");
    assert!(ssh_banner(port).starts_with("SSH-2.0-OpenSSH"));
    let out = ctl(&control, &["reload"]);
    assert!(out.status.success(), "ctl reload: {}", String::from_utf8_lossy(&out.stderr));
    assert!(ssh_banner(port).starts_with("SSH-2.0-OpenSSH"));
    sh.signal(SIGTERM);
    assert_eq!(sh.wait_exit().code(), Some(0));
}

/// `--unit NAME.service` alone: a service with no socket unit, its sockets from `-l`; the
/// service's instance is read from its template, and `%i` is the instance.
#[test]
fn a_service_alone_takes_its_sockets_from_listen() {
    let dir = tempfile::tempdir().unwrap();
    write(
        &dir.path().join("app@.service"),
        &format!(
            "[Service]\nType=notify\nExecStart={} --ready --status %i\nRestart=always\n",
            fixture()
        ),
    );
    let unit = dir.path().join("app@blue.service");
    let mut sh = start(&["--unit", unit.to_str().unwrap(), "-l", "127.0.0.1:0,name=http"]);
    let start = sh.expect_event("start", 1);
    assert_eq!(start["argv"][3], "blue");
    assert_eq!(start["env"]["LISTEN_FDNAMES"], "http");
    sh.expect_ready();
    // Without -l there is nothing to listen on: the usual usage error.
    let (code, stderr) = run_to_end(&["--unit", unit.to_str().unwrap()]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("at least one --listen is required"), "{stderr}");
}

/// A self-upgrade re-reads the units (the new program gets the same command line) and takes
/// over the runtime directory, which is still removed at the end.
#[test]
fn an_upgrade_keeps_the_unit_and_its_runtime_directory() {
    if !is_root() {
        return skipped("RuntimeDirectory= is created in /run, which needs root");
    }
    let dir = tempfile::tempdir().unwrap();
    let runtime = format!("sockhold-test-upgrade-{}", std::process::id());
    write(&dir.path().join("app.socket"), "[Socket]\nListenStream=127.0.0.1:0\n");
    write(
        &dir.path().join("app.service"),
        &format!(
            "[Service]\nType=notify\nExecStart={} --ready\nRuntimeDirectory={runtime}\n",
            fixture()
        ),
    );
    let control = dir.path().join("ctl.sock");
    let unit = dir.path().join("app.socket");
    let mut sh = start(&["--unit", unit.to_str().unwrap(), "--control", control.to_str().unwrap()]);
    sh.expect_event("start", 1);
    sh.expect_ready();
    let run_dir = PathBuf::from("/run").join(&runtime);
    assert!(run_dir.is_dir());
    let out = ctl(&control, &["upgrade"]);
    assert!(out.status.success(), "ctl upgrade: {}", String::from_utf8_lossy(&out.stderr));
    let out = ctl(&control, &["reload"]);
    assert!(out.status.success(), "ctl reload: {}", String::from_utf8_lossy(&out.stderr));
    sh.expect_event("start", 2);
    assert!(run_dir.is_dir());
    sh.signal(SIGTERM);
    assert_eq!(sh.wait_exit().code(), Some(0));
    assert!(!run_dir.exists(), "{} outlived sockhold", run_dir.display());
}

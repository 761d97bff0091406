//! The child's world: `--user` (ids, groups, no way back to root, notify readiness still works),
//! `--chdir`, `--env` and `--env-file` (precedence, re-read at every reload), and failures of any
//! of them: a usage error at start, a failed reload with the old generation still serving later.
//! The `--user` tests need root; run as another user they say so and check nothing.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use nix::sys::signal::Signal::SIGHUP;
use nix::unistd::{Group, User};
use serde_json::Value;

use crate::support::*;

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn is_root() -> bool {
    let root = nix::unistd::geteuid().is_root();
    if !root {
        skipped("only root can run children as another user");
    }
    root
}

/// The ids of a `/proc/PID/status` `Uid:`/`Gid:`/`Groups:` value, as reported.
fn ids(value: &Value) -> Vec<u32> {
    let text = value.as_str().unwrap_or_else(|| panic!("not a string: {value}"));
    text.split_whitespace().map(|id| id.parse().expect("a numeric id")).collect()
}

fn nobody() -> User {
    User::from_name("nobody").unwrap().expect("a user named nobody")
}

fn generation_of(v: &Value) -> u64 {
    v["generation"].as_str().and_then(|g| g.parse().ok()).expect("a generation")
}

#[test]
fn a_user_child_has_the_users_ids_cannot_regain_root_and_still_notifies_readiness() {
    if !is_root() {
        return;
    }
    let user = nobody();
    let (uid, gid) = (user.uid.as_raw(), user.gid.as_raw());
    let mut s = start_fixture(&["--user", "nobody"], &["--ready", "--try-regain-root", "--serve"]);
    let start = s.expect_event("start", 1);
    assert_eq!(ids(&start["uid"]), [uid; 4], "real, effective, saved and fs uid");
    assert_eq!(ids(&start["gid"]), [gid; 4], "real, effective, saved and fs gid");
    assert_eq!(ids(&start["groups"]), [gid], "root's groups are gone, nobody's are set");
    let regain = s.expect_event("regain-root", 1);
    for call in ["setuid", "setgid", "setgroups"] {
        let result = regain[call].as_str().unwrap();
        assert!(result.contains("EPERM"), "{call}(0) must fail: {regain}");
    }
    assert_eq!(ids(&regain["uid"]), [uid; 4]);
    // READY=1 came through the generation's notify socket, which only that user can reach.
    s.expect_ready();
    let notify = Path::new(start["env"]["NOTIFY_SOCKET"].as_str().unwrap());
    let meta = std::fs::metadata(notify).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o777), (uid, 0o600), "the socket is the user's alone");
    let dir = std::fs::metadata(notify.parent().unwrap()).unwrap();
    assert_eq!(dir.mode() & 0o777, 0o711, "the runtime directory can be crossed, not listed");
    // The sockets stay bound by sockhold, which stays root; the child serves on them.
    let status = std::fs::read_to_string(format!("/proc/{}/status", s.pid())).unwrap();
    let own = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert_eq!(own.split_whitespace().skip(1).collect::<Vec<_>>(), ["0"; 4], "{own}");
    assert_eq!(http_get(port_of(&start)), Ok(pid_of(&start) as i32));
}

/// A user that /etc/group lists as a member of some group, with its primary gid.
fn user_with_supplementary_groups() -> Option<User> {
    let groups = std::fs::read_to_string("/etc/group").ok()?;
    groups
        .lines()
        .filter_map(|l| l.rsplit(':').next())
        .flat_map(|members| members.split(','))
        .filter(|m| !m.is_empty())
        .find_map(|m| User::from_name(m).ok().flatten())
}

#[test]
fn user_and_group_sets_that_gid_and_keeps_the_users_supplementary_groups() {
    if !is_root() {
        return;
    }
    let nogroup = Group::from_gid(nobody().gid).unwrap().expect("nobody's group");
    let user = user_with_supplementary_groups().unwrap_or_else(nobody);
    let spec = format!("{}:{}", user.name, nogroup.name);
    let mut s = start_fixture(&["--user", &spec], &["--ready"]);
    let start = s.expect_event("start", 1);
    assert_eq!(ids(&start["uid"]), [user.uid.as_raw(); 4]);
    assert_eq!(ids(&start["gid"]), [nogroup.gid.as_raw(); 4], "GROUP wins over the user's");
    let name = std::ffi::CString::new(user.name.as_str()).unwrap();
    let mut want: Vec<u32> =
        nix::unistd::getgrouplist(&name, nogroup.gid).unwrap().iter().map(|g| g.as_raw()).collect();
    want.sort();
    want.dedup();
    let mut got = ids(&start["groups"]);
    got.sort();
    assert_eq!(got, want, "initgroups({}, {})", user.name, nogroup.name);
    s.expect_ready();
}

#[test]
fn an_unknown_user_or_group_is_a_usage_error_naming_it() {
    let fixture = fixture();
    for (user, needle) in [
        ("no-such-user-sockhold", "unknown user 'no-such-user-sockhold'"),
        ("nobody:no-such-group-sockhold", "unknown group 'no-such-group-sockhold'"),
        ("4000000", "uid 4000000 has no entry in the user database"),
        (":x", "':x' is not USER or USER:GROUP"),
    ] {
        let (code, stderr) =
            run_to_end(&["--user", user, "-l", "127.0.0.1:0", "--", &fixture, "--ready"]);
        assert_eq!(code, 2, "{user}: {stderr}");
        assert!(stderr.contains(needle), "{user}: {stderr}");
    }
}

#[test]
fn chdir_sets_the_working_directory_and_a_missing_one_fails_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().canonicalize().unwrap();
    let mut s = start_fixture(&["--chdir", work.to_str().unwrap()], &["--ready"]);
    assert_eq!(s.expect_event("start", 1)["cwd"], work.to_str().unwrap());
    s.expect_ready();

    let (code, stderr) = run_to_end(&[
        "--chdir",
        "/nonexistent/sockhold-dir",
        "-l",
        "127.0.0.1:0",
        "--ready",
        "notify",
        "--",
        &fixture(),
        "--ready",
    ]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("cannot chdir to /nonexistent/sockhold-dir: No such file or directory"),
        "{stderr}"
    );
}

#[test]
fn chdir_is_checked_with_the_users_rights() {
    if !is_root() {
        return;
    }
    // Root could enter this 0700 directory; nobody cannot.
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let shown = dir.path().display().to_string();
    let (code, stderr) = run_to_end(&[
        "--user",
        "nobody",
        "--chdir",
        &shown,
        "-l",
        "127.0.0.1:0",
        "--",
        &fixture(),
        "--ready",
    ]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains(&format!("cannot chdir to {shown} as user nobody: Permission denied")),
        "{stderr}"
    );
}

#[test]
fn a_directory_removed_before_a_reload_fails_that_reload_and_the_old_child_serves_on() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let control = dir.path().join("control.sock");
    let mut s = start_fixture(
        &["--chdir", work.to_str().unwrap(), "--control", control.to_str().unwrap()],
        &["--ready", "--serve"],
    );
    let first = s.expect_event("start", 1);
    s.expect_ready();
    std::fs::remove_dir(&work).unwrap();
    let reload = ctl(&control, &["reload"]);
    assert_eq!(reload.status.code(), Some(1), "{}", text(&reload.stdout));
    let stderr = text(&reload.stderr);
    assert!(stderr.contains("reload failed: "), "{stderr}");
    assert!(
        stderr.contains(&format!("cannot chdir to {}: No such file or directory", work.display())),
        "{stderr}"
    );
    assert_eq!(http_get(port_of(&first)), Ok(pid_of(&first) as i32), "generation 1 serves");
    // Back in place, the next reload works.
    std::fs::create_dir(&work).unwrap();
    let reload = ctl(&control, &["reload"]);
    assert!(reload.status.success(), "{}", text(&reload.stderr));
    let next = s
        .expect("the next generation's start", |v| v["event"] == "start" && v["generation"] != "1");
    assert_eq!(next["cwd"], work.to_str().unwrap());
    s.expect_signal(1, "TERM");
}

#[test]
fn env_files_in_order_then_env_override_sockholds_environment() {
    let dir = tempfile::tempdir().unwrap();
    let one = dir.path().join("one.env");
    let two = dir.path().join("two.env");
    std::fs::write(
        &one,
        "# sockhold test\nWORLD_A=file1\nWORLD_B=file1\nWORLD_C=file1\n\nWORLD_Q=\"two words \\\"q\\\"\"\n",
    )
    .unwrap();
    std::fs::write(
        &two,
        "; second\nexport WORLD_B=file2\nWORLD_C='file2'\nWORLD_S = 'a $HOME \\n'\n",
    )
    .unwrap();
    let missing = format!("-{}", dir.path().join("missing.env").display());
    let fixture = fixture();
    let args = [
        "-l",
        "127.0.0.1:0",
        "--ready",
        "notify",
        "--env-file",
        one.to_str().unwrap(),
        "--env-file",
        two.to_str().unwrap(),
        "--env-file",
        &missing,
        "--env",
        "WORLD_C=flag",
        "--env",
        "WORLD_EMPTY=",
        "--",
        &fixture,
        "--ready",
    ];
    let mut s = start_with(&args, |cmd| {
        cmd.env("WORLD_A", "base").env("WORLD_BASE", "base");
    });
    let env = s.expect_event("start", 1)["env"].clone();
    assert_eq!(env["WORLD_BASE"], "base", "sockhold's own environment is passed on");
    assert_eq!(env["WORLD_A"], "file1", "an env file wins over sockhold's environment");
    assert_eq!(env["WORLD_B"], "file2", "a later env file wins");
    assert_eq!(env["WORLD_C"], "flag", "--env wins over every env file");
    assert_eq!(env["WORLD_Q"], "two words \"q\"");
    assert_eq!(env["WORLD_S"], "a $HOME \\n", "single quotes are literal");
    assert_eq!(env["WORLD_EMPTY"], "");
    s.expect_ready();
}

#[test]
fn an_env_file_is_read_again_at_every_reload() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("app.env");
    std::fs::write(&file, "WORLD_VERSION=1\n").unwrap();
    let mut s = start_fixture(&["--env-file", file.to_str().unwrap()], &["--ready"]);
    assert_eq!(s.expect_event("start", 1)["env"]["WORLD_VERSION"], "1");
    s.expect_ready();
    std::fs::write(&file, "WORLD_VERSION=2\nWORLD_NEW=yes\n").unwrap();
    s.signal(SIGHUP);
    let second = s.expect_event("start", 2);
    assert_eq!(second["env"]["WORLD_VERSION"], "2");
    assert_eq!(second["env"]["WORLD_NEW"], "yes");
    s.expect_signal(1, "TERM");
}

#[test]
fn a_bad_env_file_fails_the_reload_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("app.env");
    std::fs::write(&file, "WORLD_VERSION=1\n").unwrap();
    let control = dir.path().join("control.sock");
    let mut s = start_fixture(
        &["--env-file", file.to_str().unwrap(), "--control", control.to_str().unwrap()],
        &["--ready", "--serve"],
    );
    let first = s.expect_event("start", 1);
    s.expect_ready();

    std::fs::write(&file, "WORLD_VERSION=2\nthis line is wrong\n").unwrap();
    let reload = ctl(&control, &["reload"]);
    assert_eq!(reload.status.code(), Some(1), "{}", text(&reload.stdout));
    let stderr = text(&reload.stderr);
    assert!(stderr.contains("reload failed: "), "{stderr}");
    assert!(stderr.contains(&format!("env file {} line 2", file.display())), "{stderr}");
    // Nothing else happened: no child was started, the old one was not asked to stop, and it
    // still serves.
    assert_eq!(http_get(port_of(&first)), Ok(pid_of(&first) as i32));
    let status = ctl_status(&control);
    assert_eq!(status["last_reload"]["ok"], false);
    let generations = status["generations"].as_array().unwrap();
    assert_eq!(generations.len(), 1, "{status}");
    assert_eq!(generations[0]["id"], 1);
    assert_eq!(generations[0]["state"], "serving");
    assert!(!s.seen(|v| v["event"] == "start" && v["generation"] != "1"), "no new child");
    assert!(!s.seen(|v| v["event"] == "signal"), "generation 1 got no signal");

    // Fixed, the next reload works and sees the new value.
    std::fs::write(&file, "WORLD_VERSION=3\n").unwrap();
    let reload = ctl(&control, &["reload"]);
    assert!(reload.status.success(), "{}", text(&reload.stderr));
    let next = s
        .expect("the next generation's start", |v| v["event"] == "start" && v["generation"] != "1");
    assert!(generation_of(&next) > 1);
    assert_eq!(next["env"]["WORLD_VERSION"], "3");
    s.expect_signal(1, "TERM");
}

#[test]
fn bad_env_options_and_files_are_usage_errors_naming_them() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.env");
    std::fs::write(&bad, "# fine\nWORLD_OK=1\nWORLD_OPEN=\"unterminated\n").unwrap();
    let bad_line = format!("env file {} line 3: unterminated", bad.display());
    let missing = dir.path().join("missing.env");
    let missing_text = format!("cannot read env file {}", missing.display());
    for (option, value, needle) in [
        ("--env", "LISTEN_FDS=3", "LISTEN_FDS is set by sockhold itself"),
        ("--env", "SOCKHOLD_GENERATION=9", "SOCKHOLD_GENERATION is set by sockhold itself"),
        ("--env", "1WORLD=x", "'1WORLD' is not a valid variable name"),
        ("--env", "WORLD", "'WORLD' is not K=V"),
        ("--env-file", bad.to_str().unwrap(), &bad_line),
        ("--env-file", missing.to_str().unwrap(), &missing_text),
    ] {
        let (code, stderr) =
            run_to_end(&[option, value, "-l", "127.0.0.1:0", "--", &fixture(), "--ready"]);
        assert_eq!(code, 2, "{option} {value}: {stderr}");
        assert!(stderr.contains(needle), "{option} {value}: {stderr}");
    }
}

#[test]
fn connection_children_get_the_same_world() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let work = dir.path().canonicalize().unwrap();
    let file = dir.path().join("app.env");
    std::fs::write(&file, "WORLD_FROM_FILE=1\n").unwrap();
    let fixture = fixture();
    let mut args = vec![
        "--accept",
        "-l",
        "127.0.0.1:0",
        "--chdir",
        work.to_str().unwrap(),
        "--env",
        "WORLD_FLAG=x",
        "--env-file",
        file.to_str().unwrap(),
    ];
    let root = nix::unistd::geteuid().is_root();
    if root {
        args.extend(["--user", "nobody"]);
    }
    args.extend(["--", &fixture]);
    let mut s = start(&args);
    let port = s.listening_port("127.0.0.1:");
    s.expect_ready();
    let _conn = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let start = s.expect("a connection child", |v| v["event"] == "start");
    assert_eq!(start["cwd"], work.to_str().unwrap());
    assert_eq!(start["env"]["WORLD_FLAG"], "x");
    assert_eq!(start["env"]["WORLD_FROM_FILE"], "1");
    if root {
        assert_eq!(ids(&start["uid"]), [nobody().uid.as_raw(); 4]);
    }
}

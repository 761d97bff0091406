//! The unit parser and its translation, table-tested: systemd's syntax, each mapped directive
//! and the option it becomes, each unsupported one in the warning, each malformed form an
//! error naming file:line; and the files found (drop-ins, the search path, templates).

use std::collections::BTreeMap;

use super::syntax::{Entry, Location, Names, parse, specifiers, split_words};
use super::translate::{ExecStart, Translation, UnitEntries, exec_start, translate};

const SOCKET: &[&str] = &["Unit", "Socket", "Install"];
const SERVICE: &[&str] = &["Unit", "Service", "Install"];

fn names(full: &str) -> Names {
    let instance = full
        .split_once('@')
        .map(|(_, r)| r.rsplit_once('.').map_or(r, |(i, _)| i).to_owned())
        .unwrap_or_default();
    Names { full: full.into(), instance }
}

fn unit(full: &str, text: &str) -> Result<UnitEntries, String> {
    let sections = if full.ends_with(".socket") { SOCKET } else { SERVICE };
    Ok(UnitEntries { names: names(full), entries: parse(text, full, sections)? })
}

/// A socket unit `app.socket` (if given) and its service `app.service`, translated.
fn pair(socket: Option<&str>, service: &str) -> Result<Translation, String> {
    let socket = socket.map(|s| unit("app.socket", s)).transpose()?;
    translate(socket.as_ref(), &unit("app.service", service)?)
}

/// The options as one command line, for comparing.
fn line(t: &Translation) -> String {
    let mut words: Vec<String> = t.options.iter().flat_map(|(_, w)| w.clone()).collect();
    words.push("--".into());
    words.extend(t.command.iter().cloned());
    words.join(" ")
}

const SIMPLE: &str = "[Service]\nExecStart=/bin/srv\n";

#[test]
fn sections_comments_continuation_and_blanks() {
    let text = "# a comment\n; another\n\n[Unit]\nDescription=x \\\n  y\n[Service]\n  ExecStart = /bin/a \\\n# skipped inside\n  b\\\n  c\n";
    let entries = parse(text, "f", SERVICE).unwrap();
    let got: Vec<(&str, &str, &str, usize)> = entries
        .iter()
        .map(|e| (e.section.as_str(), e.key.as_str(), e.value.as_str(), e.at.line))
        .collect();
    assert_eq!(
        got,
        [("Unit", "Description", "x  y", 5), ("Service", "ExecStart", "/bin/a   b c", 8)]
    );
}

#[test]
fn x_sections_and_x_keys_are_dropped() {
    let entries =
        parse("[X-Vendor]\nAnything=1\n[Service]\nX-Mine=2\nType=simple\n", "f", SERVICE).unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].key, "Type");
}

#[test]
fn malformed_lines_are_errors_naming_file_and_line() {
    for (text, want) in [
        ("[Service]\nExecStart /bin/x\n", "f:2: 'ExecStart /bin/x' is neither KEY=VALUE"),
        ("Type=simple\n", "f:1: 'Type=simple' comes before any [Section] header"),
        ("[Service]\n[Mount]\nWhat=x\n", "f:2: unknown section [Mount]"),
        ("[Socket]\n", "f:1: unknown section [Socket]"),
        ("[Service\n", "f:1: malformed section header '[Service'"),
        ("[Service]\n=value\n", "f:2: '' is not a directive name"),
        ("[Service]\nExec Start=x\n", "f:2: 'Exec Start' is not a directive name"),
    ] {
        let err = parse(text, "f", SERVICE).unwrap_err();
        assert!(err.contains(want), "{text:?}: {err}");
    }
}

#[test]
fn words_quoting_and_escapes() {
    let ok: &[(&str, &[&str])] = &[
        ("a  b\tc", &["a", "b", "c"]),
        ("\"a b\" 'c d'", &["a b", "c d"]),
        ("a\"b c\"d", &["ab cd"]),
        ("\"\" x", &["", "x"]),
        ("\\x41\\101\\n\\s\\;", &["AA\n ;"]),
        ("'\"' \"'\"", &["\"", "'"]),
        ("", &[]),
    ];
    for (text, want) in ok {
        assert_eq!(split_words(text).unwrap(), *want, "{text:?}");
    }
    for (bad, want) in [
        ("\"open", "double quote is not closed"),
        ("'open", "single quote is not closed"),
        ("end\\", "lone backslash"),
        ("\\q", "'\\q' is not an escape"),
        ("\\x4", "short escape"),
        ("\\x00", "cannot hold"),
    ] {
        let err = split_words(bad).unwrap_err();
        assert!(err.contains(want), "{bad:?}: {err}");
    }
}

#[test]
fn specifiers_outside_systemd() {
    let n = names("web@a-b.service");
    let run =
        if nix::unistd::geteuid().is_root() { "/run".to_string() } else { super::runtime_base() };
    for (text, want) in [
        ("%n %N %p %i %I %%", "web@a-b.service web@a-b web a-b a/b %".to_string()),
        ("%t/x", format!("{run}/x")),
        ("%f", "/a/b".into()),
        ("%T %V %S %C %L %E", "/tmp /var/tmp /var/lib /var/cache /var/log /etc".into()),
        ("no specifier", "no specifier".into()),
    ] {
        assert_eq!(specifiers(text, &n).unwrap(), want, "{text}");
    }
    let plain = names("ssh.service");
    assert_eq!(specifiers("%p-%i-%N", &plain).unwrap(), "ssh--ssh");
    assert!(specifiers("%Z", &n).unwrap_err().contains("unknown specifier '%Z'"));
    assert!(specifiers("50%", &n).unwrap_err().contains("lone '%'"));
}

fn exec(value: &str, vars: &[(&str, &str)]) -> Result<ExecStart, String> {
    let entry = Entry {
        section: "Service".into(),
        key: "ExecStart".into(),
        value: value.into(),
        at: Location { file: "s".into(), line: 3 },
    };
    let vars: BTreeMap<String, String> =
        vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    exec_start(&entry, &names("ssh@x.service"), &vars)
}

#[test]
fn exec_start_variables() {
    let vars = [("OPTS", "-a  -b"), ("ONE", "x y"), ("EMPTY", "")];
    for (value, want) in [
        ("/bin/srv $OPTS", &["/bin/srv", "-a", "-b"][..]),
        ("/bin/srv ${ONE}", &["/bin/srv", "x y"]),
        ("/bin/srv pre${ONE}post", &["/bin/srv", "prex ypost"]),
        ("/bin/srv \"$ONE\"", &["/bin/srv", "x", "y"]),
        ("/bin/srv $EMPTY $UNSET ${UNSET}", &["/bin/srv", ""]),
        ("/bin/srv $$OPTS a$b", &["/bin/srv", "$OPTS", "a$b"]),
        ("/bin/srv %i %%", &["/bin/srv", "x", "%"]),
        (":/bin/srv $OPTS ${ONE}", &["/bin/srv", "$OPTS", "${ONE}"]),
    ] {
        assert_eq!(exec(value, &vars).unwrap().argv, want, "{value}");
    }
}

#[test]
fn exec_start_prefixes() {
    let e = exec("-@/usr/sbin/sshd sshd-session -i", &[]).unwrap();
    assert_eq!(e.argv, ["/usr/sbin/sshd", "-i"]);
    assert_eq!(e.argv0.as_deref(), Some("sshd-session"));
    assert!(e.ignore_failure && !e.full_privileges && !e.ambient);
    let e = exec("+!!/bin/x", &[]).unwrap();
    assert!(e.full_privileges && e.ambient && e.argv0.is_none());
    for (bad, want) in [
        ("", "s:3: ExecStart= has no command"),
        ("@/bin/x", "the '@' prefix needs a program and then its argv[0]"),
        ("|/bin/x", "the '|' prefix"),
        ("/bin/a ; /bin/b", "';' separates several commands"),
        ("bin/x", "'bin/x' must be an absolute path or a plain name"),
        ("/bin/x \"open", "s:3: ExecStart=: a double quote is not closed"),
        ("/bin/x %q", "unknown specifier '%q'"),
    ] {
        let err = exec(bad, &[]).unwrap_err();
        assert!(err.contains(want), "{bad:?}: {err}");
    }
}

/// Every mapped directive of [Socket], and the -l it becomes.
#[test]
fn socket_directives_map_onto_listen_options() {
    let socket = "[Socket]\nListenStream=127.0.0.1:8080\nListenStream=[::1]:8080\nListenStream=/run/app/app.sock\nListenDatagram=127.0.0.1:5353\nListenDatagram=@logs\nListenSequentialPacket=/run/app/p.sock\nFileDescriptorName=web\nBacklog=64\nSocketMode=0660\nDirectoryMode=0750\nSocketUser=root\nSocketGroup=root\nNoDelay=yes\nKeepAlive=true\nReusePort=on\nFreeBind=1\nBindToDevice=lo\nBindIPv6Only=both\nReceiveBuffer=1M\nSendBuffer=64K\n";
    let t = pair(Some(socket), SIMPLE).unwrap();
    let common = "name=web,backlog=64,rcvbuf=1M,sndbuf=64K";
    let dgram = "name=web,rcvbuf=1M,sndbuf=64K";
    let file = "mode=0660,dirmode=0750,owner=root,group=root";
    let want = format!(
        "-l 127.0.0.1:8080,{common},reuseport,freebind,device=lo,nodelay,keepalive -l [::1]:8080,{common},reuseport,freebind,device=lo,v6only=no,nodelay,keepalive -l /run/app/app.sock,{common},{file} -l udp://127.0.0.1:5353,{dgram},reuseport,freebind,device=lo -l unixgram://@logs,{dgram} -l unixpacket:///run/app/p.sock,{common},{file}"
    );
    let listens: Vec<String> =
        t.options.iter().filter(|(id, _)| *id == "listen").flat_map(|(_, w)| w.clone()).collect();
    assert_eq!(listens.join(" "), want);
    assert!(t.warnings.is_empty(), "{:?}", t.warnings);
}

/// Without FileDescriptorName=, a socket is named after its unit, as systemd names it; a path
/// socket is 0666 unless SocketMode= says otherwise; an empty assignment resets the list.
#[test]
fn socket_defaults_and_resets() {
    let socket = "[Socket]\nListenStream=22\nListenStream=/run/a.sock\n";
    let dropin = "[Socket]\nListenStream=\nListenStream=127.0.0.1:8022\nListenStream=/run/b.sock\n";
    let mut s = unit("app.socket", socket).unwrap();
    s.entries.extend(parse(dropin, "app.socket.d/x.conf", SOCKET).unwrap());
    let t = translate(Some(&s), &unit("app.service", SIMPLE).unwrap()).unwrap();
    assert_eq!(
        line(&t),
        "-l 127.0.0.1:8022,name=app.socket -l /run/b.sock,name=app.socket,mode=0666 --name app --ready delay:100ms --kill-mode control-group --restart never -- /bin/srv"
    );
}

#[test]
fn accept_yes_and_inetd() {
    let socket = "[Socket]\nListenStream=127.0.0.1:0\nAccept=yes\nMaxConnections=8\n";
    let service =
        "[Service]\nExecStart=-/usr/sbin/sshd -i\nStandardInput=socket\nStandardOutput=socket\n";
    let t = pair(Some(socket), service).unwrap();
    assert_eq!(
        line(&t),
        "-l 127.0.0.1:0,name=app.socket --accept --max-connections 8 --name app --ready delay:100ms --kill-mode control-group --restart never --inetd -- /usr/sbin/sshd -i"
    );
    assert!(t.warnings.is_empty(), "{:?}", t.warnings);
    // Without Accept=yes, MaxConnections= means nothing and StandardInput=socket is refused.
    let t = pair(Some("[Socket]\nListenStream=1\nMaxConnections=3\n"), SIMPLE).unwrap();
    assert!(t.warnings[0].contains("app.socket:3: MaxConnections=3: applies only with Accept=yes"));
    let t =
        pair(Some("[Socket]\nListenStream=1\nAccept=yes\n"), &format!("{SIMPLE}WatchdogSec=5\n"))
            .unwrap();
    assert!(!line(&t).contains("--watchdog"), "{}", line(&t));
    assert!(t.warnings[0].contains("app.service:3: WatchdogSec=5: not applied with Accept=yes"));
    let err = pair(Some("[Socket]\nListenStream=1\n"), &format!("{SIMPLE}StandardInput=socket\n"))
        .unwrap_err();
    assert!(err.contains("app.service:3: StandardInput=socket needs Accept=yes"), "{err}");
}

/// Every mapped directive of [Service], and the option it becomes.
#[test]
fn service_directives_map_onto_options() {
    let service = "[Service]\nType=notify\nExecStart=@/bin/srv srv-main --port ${PORT} $FLAGS\nUser=nobody\nGroup=nogroup\nWorkingDirectory=-/srv\nEnvironment=\"PORT=80\" FLAGS=-v\nEnvironment=NAME=%N\nEnvironmentFile=-/nonexistent/env\nKillSignal=SIGINT\nTimeoutStopSec=5min 20s\nKillMode=process\nTimeoutStartSec=infinity\nRestart=always\nWatchdogSec=30\nNotifyAccess=all\nFileDescriptorStoreMax=4\nRuntimeDirectory=app app/sub\nRuntimeDirectoryMode=0750\nRuntimeDirectoryPreserve=yes\n";
    let t = pair(None, service).unwrap();
    assert_eq!(
        line(&t),
        "--name app --ready notify --env PORT=80 --env FLAGS=-v --env NAME=app --env-file -/nonexistent/env --argv0 srv-main --user nobody:nogroup --chdir /srv --stop-signal SIGINT --ready-timeout 100years --stop-timeout 5m20s --kill-mode process --restart always --watchdog 30s --notify-access all --fd-store 4 --runtime-directory app --runtime-directory app/sub --runtime-directory-mode 0750 --runtime-directory-preserve -- /bin/srv --port 80 -v"
    );
    assert!(t.warnings.is_empty(), "{:?}", t.warnings);
}

#[test]
fn service_values_and_their_approximations() {
    let opts =
        |extra: &str| pair(None, &format!("{SIMPLE}{extra}\n")).map(|t| (line(&t), t.warnings));
    for (extra, want) in [
        ("Type=exec", "--ready delay:100ms"),
        ("Type=notify-reload", "--ready notify"),
        ("Restart=no", "--restart never"),
        ("Restart=on-failure", "--restart on-failure"),
        ("NotifyAccess=exec", "--notify-access main"),
        ("Group=adm", "--user root:adm"),
        ("TimeoutSec=7", "--ready-timeout 7s --stop-timeout 7s"),
        ("TimeoutStopSec=0", "--stop-timeout 100years"),
        ("KillMode=mixed", "--kill-mode mixed"),
        ("KillMode=control-group", "--kill-mode control-group"),
        ("KillMode=process\nKillMode=", "--kill-mode control-group"),
        ("RuntimeDirectory=x\nRuntimeDirectoryPreserve=restart", "--runtime-directory x --"),
        ("EnvironmentFile=-/a\nEnvironmentFile=\nEnvironmentFile=-/b", "--env-file -/b --"),
    ] {
        let (got, warnings) = opts(extra).unwrap();
        assert!(got.contains(want), "{extra}: {want} not in {got}");
        assert!(warnings.is_empty(), "{extra}: {warnings:?}");
    }
    for (extra, want_opt, want_warning) in [
        ("Restart=on-abort", "--restart on-failure", "approximated by --restart on-failure"),
        ("Restart=on-success", "--restart always", "approximated by --restart always"),
        ("Type=dbus", "--ready delay:100ms", "no D-Bus here"),
        ("NotifyAccess=none", "--notify-access main", "NotifyAccess=none: not applied"),
        ("KillMode=none", "--kill-mode process", "approximated by --kill-mode process"),
        ("WorkingDirectory=~", "--restart never --", "'~' is not applied"),
        ("StandardInput=tty", "--restart never --", "StandardInput=tty: not applied"),
        ("StandardError=file:/x", "--restart never --", "StandardError=file:/x: not applied"),
    ] {
        let (got, warnings) = opts(extra).unwrap();
        assert!(got.contains(want_opt), "{extra}: {want_opt} not in {got}");
        assert!(
            warnings.len() == 1
                && warnings[0].starts_with("app.service:3: ")
                && warnings[0].contains(want_warning),
            "{extra}: {warnings:?}"
        );
    }
    // ExecStart's prefixes that are not applied are named; '+' drops User=.
    let t = pair(None, "[Service]\nExecStart=+/bin/srv\nUser=nobody\n").unwrap();
    assert!(!line(&t).contains("--user"), "{}", line(&t));
    assert!(t.warnings[0].contains("'+' prefix"), "{:?}", t.warnings);
    let t = pair(None, "[Service]\nExecStart=-!/bin/srv\n").unwrap();
    assert_eq!(t.warnings.len(), 2, "{:?}", t.warnings);
}

/// Every directive of [Socket] and [Service] that sockhold does not apply is named with its
/// file:line; [Unit] and [Install] are read quietly but for Condition*= and Assert*=.
#[test]
fn unsupported_directives_are_named_in_the_warning() {
    let socket = "[Unit]\nDescription=d\nConditionPathExists=/x\nBefore=sockets.target\n[Socket]\nListenStream=1\nTransparent=yes\nPassCredentials=yes\n[Install]\nWantedBy=sockets.target\n";
    let service = "[Unit]\nAssertPathExists=/y\nAfter=network.target\n[Service]\nExecStart=/bin/srv\nExecStartPre=/bin/check\nExecReload=/bin/kill -HUP $MAINPID\nProtectSystem=strict\nLimitNOFILE=65536\nPrivateTmp=yes\n[Install]\nAlias=x.service\n";
    let t = pair(Some(socket), service).unwrap();
    let want = [
        "app.socket:3: ConditionPathExists=/x: not checked",
        "app.socket:7: Transparent=yes: not applied",
        "app.socket:8: PassCredentials=yes: not applied",
        "app.service:2: AssertPathExists=/y: not checked",
        "app.service:6: ExecStartPre=/bin/check: not applied",
        "app.service:7: ExecReload=/bin/kill -HUP $MAINPID: not applied",
        "app.service:8: ProtectSystem=strict: not applied",
        "app.service:9: LimitNOFILE=65536: not applied",
        "app.service:10: PrivateTmp=yes: not applied",
    ];
    assert_eq!(t.warnings.len(), want.len(), "{:#?}", t.warnings);
    for (got, want) in t.warnings.iter().zip(want) {
        assert!(got.starts_with(want), "{got} does not start with {want}");
    }
}

/// Each malformed value is an error naming file:line and the directive.
#[test]
fn malformed_values_are_errors_naming_file_and_line() {
    let socket_err = |body: &str| pair(Some(&format!("[Socket]\n{body}\n")), SIMPLE).unwrap_err();
    for (body, want) in [
        ("ListenStream=127.0.0.1:99999", "app.socket:2: ListenStream=127.0.0.1:99999:"),
        ("ListenStream=1\nAccept=maybe", "app.socket:3: Accept= takes a boolean"),
        ("ListenStream=1\nNoDelay=2", "app.socket:3: NoDelay= takes a boolean"),
        ("ListenStream=/a.sock\nSocketMode=999", "app.socket:3: SocketMode= takes an octal mode"),
        ("ListenStream=1\nBindIPv6Only=sometimes", "app.socket:3: BindIPv6Only= takes"),
        ("ListenStream=1\nBacklog=-1", "app.socket:2: ListenStream=1: "),
        (
            "ListenStream=/a.sock\nSocketUser=no-such-user-here",
            "app.socket:2: ListenStream=/a.sock",
        ),
        ("ListenSequentialPacket=127.0.0.1:1", "app.socket:2: ListenSequentialPacket= takes"),
        (
            "ListenStream=1,backlog=3",
            "app.socket:2: ListenStream= '1,backlog=3' is not one address",
        ),
        (
            "ListenStream=1\nAccept=yes\nMaxConnections=0",
            "app.socket:4: MaxConnections= takes a positive number",
        ),
        ("ListenStream=%Q", "app.socket:2: ListenStream=: unknown specifier '%Q'"),
    ] {
        let err = socket_err(body);
        assert!(err.contains(want), "{body:?}: {err}");
    }
    let service_err =
        |body: &str| pair(None, &format!("[Service]\nExecStart=/bin/srv\n{body}\n")).unwrap_err();
    for (body, want) in [
        ("Type=forking", "app.service:3: Type=forking is not supported"),
        ("Type=oneshot", "app.service:3: Type=oneshot is not supported"),
        (
            "ExecStart=/bin/other",
            "app.service:3: a second ExecStart= (the first is at app.service:2)",
        ),
        ("KillSignal=SIGNOPE", "app.service:3: KillSignal=:"),
        ("TimeoutStopSec=soon", "app.service:3: TimeoutStopSec= takes a time span"),
        ("Restart=sometimes", "app.service:3: Restart= takes"),
        ("NotifyAccess=some", "app.service:3: NotifyAccess= takes"),
        ("KillMode=group", "app.service:3: KillMode= takes control-group, mixed, process or none"),
        ("FileDescriptorStoreMax=many", "app.service:3: FileDescriptorStoreMax= takes a number"),
        ("Environment=NOEQUALS", "app.service:3: Environment= takes KEY=VALUE"),
        ("Environment=\"A=1", "app.service:3: Environment=: a double quote is not closed"),
        ("EnvironmentFile=/nonexistent/env", "app.service:3: EnvironmentFile=:"),
        ("WorkingDirectory=relative", "app.service:3: WorkingDirectory= takes an absolute path"),
        ("RuntimeDirectory=/abs", "app.service:3: RuntimeDirectory= takes relative paths"),
        ("RuntimeDirectory=../up", "app.service:3: RuntimeDirectory= takes relative paths"),
        (
            "RuntimeDirectory=x\nRuntimeDirectoryMode=rw",
            "app.service:4: RuntimeDirectoryMode= takes an octal mode",
        ),
        (
            "RuntimeDirectory=x\nRuntimeDirectoryPreserve=perhaps",
            "app.service:4: RuntimeDirectoryPreserve= takes a boolean",
        ),
    ] {
        let err = service_err(body);
        assert!(err.contains(want), "{body:?}: {err}");
    }
}

/// The files: drop-ins in lexical order (one in the unit's own directory shadowing one of the
/// same name further down the search path), the service a socket activates (Service=,
/// NAME.service, NAME@.service with Accept=yes), an instance read from its template.
#[test]
fn files_drop_ins_and_the_service_found() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    };
    write("web.socket", "[Socket]\nListenStream=127.0.0.1:1\n");
    write("web.socket.d/20-b.conf", "[Socket]\nListenStream=127.0.0.1:3\n");
    write("web.socket.d/10-a.conf", "[Socket]\nListenStream=\nListenStream=127.0.0.1:2\n");
    write("web.socket.d/ignored.txt", "[Socket]\nListenStream=127.0.0.1:9\n");
    write("web.service", "[Service]\nExecStart=/bin/web\n");
    write("web.service.d/env.conf", "[Service]\nEnvironment=A=1\n");
    let t = super::load(&dir.path().join("web.socket")).unwrap();
    let text = line(&t);
    assert!(
        text.starts_with(
            "-l 127.0.0.1:2,name=web.socket -l 127.0.0.1:3,name=web.socket --name web"
        ),
        "{text}"
    );
    assert!(text.contains("--env A=1") && text.ends_with("-- /bin/web"), "{text}");

    write("other.socket", "[Socket]\nListenStream=127.0.0.1:1\nService=web.service\n");
    assert!(line(&super::load(&dir.path().join("other.socket")).unwrap()).ends_with("-- /bin/web"));
    write("conn.socket", "[Socket]\nListenStream=127.0.0.1:1\nAccept=yes\n");
    write("conn@.service", "[Service]\nExecStart=/bin/conn %p\n");
    assert!(
        line(&super::load(&dir.path().join("conn.socket")).unwrap()).ends_with("-- /bin/conn conn")
    );
    let t = super::load(&dir.path().join("conn@one.service")).unwrap();
    assert!(line(&t).ends_with("-- /bin/conn conn"), "{}", line(&t));

    write("lonely.socket", "[Socket]\nListenStream=127.0.0.1:1\n");
    let err = super::load(&dir.path().join("lonely.socket")).unwrap_err();
    assert!(
        err.contains("unit lonely.service found in neither") && err.contains("/lib/systemd/system"),
        "{err}"
    );
    write("bad.socket", "[Socket]\nListenStream=1\nAccept=yes\nService=web.service\n");
    let err = super::load(&dir.path().join("bad.socket")).unwrap_err();
    assert!(err.ends_with("bad.socket:4: Service= does not go with Accept=yes"), "{err}");
    write("web.socket.d/30-broken.conf", "[Socket]\nnonsense\n");
    let err = super::load(&dir.path().join("web.socket")).unwrap_err();
    assert!(err.contains("web.socket.d/30-broken.conf:2: 'nonsense' is neither"), "{err}");
    let err = super::load(&dir.path().join("web.target")).unwrap_err();
    assert!(err.contains("name a systemd .socket or .service unit"), "{err}");
}

/// The user's options win over the units': a single-valued option replaces the unit's, -l
/// replaces every listener, COMMAND replaces ExecStart=, --env adds (after the unit's, so a key
/// given twice takes the user's value).
#[test]
fn the_command_line_overrides_the_units() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("web.socket");
    std::fs::write(&socket, "[Socket]\nListenStream=127.0.0.1:1\nListenStream=127.0.0.1:2\n")
        .unwrap();
    std::fs::write(
        dir.path().join("web.service"),
        "[Service]\nType=notify\nExecStart=/bin/web\nEnvironment=A=1 B=2\nTimeoutStopSec=9\n",
    )
    .unwrap();
    let unit = socket.to_str().unwrap();
    let expand = |args: &[&str]| {
        let argv =
            std::iter::once("sockhold").chain(args.iter().copied()).map(Into::into).collect();
        let e = super::expand(argv).unwrap_or_else(|e| panic!("{args:?}: {e:?}"));
        let show = |w: &[std::ffi::OsString]| super::shell_line(w);
        (show(&e.argv), show(&e.equivalent.unwrap()))
    };
    let (argv, equivalent) = expand(&["--unit", unit]);
    assert_eq!(
        equivalent,
        "sockhold -l 127.0.0.1:1,name=web.socket -l 127.0.0.1:2,name=web.socket --name web --ready notify --env A=1 --env B=2 --stop-timeout 9s --kill-mode control-group --restart never -- /bin/web"
    );
    assert!(argv.contains(&format!("--unit {unit}")), "{argv}");
    let (_, equivalent) = expand(&[
        "--unit",
        unit,
        "-l",
        "127.0.0.1:5",
        "--ready",
        "delay:1s",
        "--env",
        "B=3",
        "--print-config",
        "--",
        "/bin/other",
        "--unit",
        "x",
    ]);
    assert_eq!(
        equivalent,
        "sockhold --name web --env A=1 --env B=2 --stop-timeout 9s --kill-mode control-group --restart never -l 127.0.0.1:5 --ready delay:1s --env B=3 -- /bin/other --unit x"
    );
    let (_, equivalent) = expand(&[&format!("--unit={unit}"), "--stop-timeout", "1s", "/bin/x"]);
    assert!(equivalent.ends_with("--restart never --stop-timeout 1s /bin/x"), "{equivalent}");
    let (_, equivalent) =
        expand(&[&format!("--unit={unit}"), "--print-config", "-q", "--", "/bin/x", "-q"]);
    assert!(equivalent.ends_with("--restart never -q -- /bin/x -q"), "{equivalent}");
    // Without --unit, nothing changes.
    let (argv, _) = {
        let args: Vec<std::ffi::OsString> = ["sockhold", "-l", "1", "x"].map(Into::into).to_vec();
        let e = super::expand(args).unwrap();
        assert!(e.equivalent.is_none() && !e.print);
        (super::shell_line(&e.argv), ())
    };
    assert_eq!(argv, "sockhold -l 1 x");
}

#[test]
fn shell_line_quotes_what_a_shell_would_split() {
    let words: Vec<std::ffi::OsString> =
        ["a", "b c", "", "it's", "-l", "x=1,y"].map(Into::into).to_vec();
    assert_eq!(super::shell_line(&words), r"a 'b c' '' 'it'\''s' -l x=1,y");
}

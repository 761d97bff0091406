//! What the directives of a `.socket` and a `.service` mean to sockhold: each mapped one
//! becomes the sockhold option that does the same (`ListenStream=` → `-l`, `Type=notify` →
//! `--ready notify`, ...), every other one of [Socket] and [Service] (and `Condition*=`/`Assert*=`)
//! is named in the warning, and a value sockhold cannot take is an error naming `file:line`.
//! Pure except for reading `EnvironmentFile=`s to expand `$VAR` in `ExecStart=`.

use std::collections::BTreeMap;

use super::syntax::{Entry, Names, specifiers, split_words};
use crate::child_env::EnvFile;
use crate::cli::{MAX_DURATION, parse_duration};
use crate::listen::ListenSpec;

/// How long a `Type=simple` (or `exec`, `idle`, `dbus`) service must stay up before it counts
/// as ready: systemd counts it ready at once; a short delay still catches a server that dies
/// at start (a bad config) before the old generation is stopped.
pub const SIMPLE_READY_DELAY: &str = "delay:100ms";

/// The sockhold options a unit pair stands for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Translation {
    /// Options in command-line order, each with the clap id of the option it sets (for the
    /// command line to override it).
    pub options: Vec<(&'static str, Vec<String>)>,
    /// `ExecStart=`'s command, expanded; empty if the units have none.
    pub command: Vec<String>,
    /// Directives sockhold does not apply, and approximations: `file:line: Directive=...: why`.
    pub warnings: Vec<String>,
}

impl Translation {
    fn push(&mut self, id: &'static str, words: &[&str]) {
        self.options.push((id, words.iter().map(|w| w.to_string()).collect()));
    }

    fn warn(&mut self, entry: &Entry, why: &str) {
        let shown = if entry.value.chars().count() > 60 {
            format!("{}=...", entry.key)
        } else {
            format!("{}={}", entry.key, entry.value)
        };
        self.warnings.push(format!("{}: {shown}: {why}", entry.at));
    }
}

/// One unit file's directives after drop-ins, with its names for the specifiers.
#[derive(Clone, Debug)]
pub struct UnitEntries {
    /// `%n`, `%i`, ...
    pub names: Names,
    /// Every directive of the unit and its drop-ins, in the order systemd reads them.
    pub entries: Vec<Entry>,
}

/// The [Socket] directives sockhold maps.
const SOCKET_KEYS: &[&str] = &[
    "ListenStream",
    "ListenDatagram",
    "ListenSequentialPacket",
    "FileDescriptorName",
    "Backlog",
    "SocketMode",
    "DirectoryMode",
    "SocketUser",
    "SocketGroup",
    "Accept",
    "MaxConnections",
    "NoDelay",
    "KeepAlive",
    "ReusePort",
    "FreeBind",
    "BindToDevice",
    "BindIPv6Only",
    "ReceiveBuffer",
    "SendBuffer",
    "Service",
];

/// The [Service] directives sockhold maps.
const SERVICE_KEYS: &[&str] = &[
    "Type",
    "ExecStart",
    "User",
    "Group",
    "WorkingDirectory",
    "Environment",
    "EnvironmentFile",
    "KillSignal",
    "TimeoutStopSec",
    "KillMode",
    "TimeoutStartSec",
    "TimeoutSec",
    "Restart",
    "WatchdogSec",
    "NotifyAccess",
    "FileDescriptorStoreMax",
    "StandardInput",
    "StandardOutput",
    "StandardError",
    "RuntimeDirectory",
    "RuntimeDirectoryMode",
    "RuntimeDirectoryPreserve",
];

/// The last value of a single-valued directive (an empty one resets it to the default).
fn last<'a>(entries: &'a [Entry], section: &str, key: &str) -> Option<&'a Entry> {
    let found = entries.iter().rev().find(|e| e.section == section && e.key == key)?;
    (!found.value.is_empty()).then_some(found)
}

/// Every value of a list directive, an empty assignment dropping those before it.
fn list<'a>(entries: &'a [Entry], section: &str, keys: &[&str]) -> Vec<&'a Entry> {
    let mut out = Vec::new();
    for e in entries.iter().filter(|e| e.section == section && keys.contains(&e.key.as_str())) {
        if e.value.is_empty() {
            out.retain(|o: &&Entry| o.key != e.key);
        } else {
            out.push(e);
        }
    }
    out
}

/// systemd's booleans.
pub fn boolean(entry: &Entry) -> Result<bool, String> {
    match entry.value.to_ascii_lowercase().as_str() {
        "1" | "yes" | "y" | "true" | "t" | "on" => Ok(true),
        "0" | "no" | "n" | "false" | "f" | "off" => Ok(false),
        _ => Err(format!(
            "{}: {}= takes a boolean (yes/no), not '{}'",
            entry.at, entry.key, entry.value
        )),
    }
}

/// A systemd time span (`90`, `5min 20s`, `infinity`) as sockhold writes durations; `infinity`
/// (and 0 where systemd reads it as "no limit") is the longest duration sockhold takes.
fn time_span(entry: &Entry, zero_is_infinity: bool) -> Result<String, String> {
    let value = entry.value.trim();
    if value == "infinity" {
        return Ok(compact(MAX_DURATION));
    }
    let duration = parse_duration(value)
        .map_err(|e| format!("{}: {}= takes a time span: {e}", entry.at, entry.key))?;
    if duration.is_zero() && zero_is_infinity {
        return Ok(compact(MAX_DURATION));
    }
    Ok(compact(duration))
}

fn compact(duration: std::time::Duration) -> String {
    humantime::format_duration(duration).to_string().replace(' ', "")
}

/// An octal file mode such as `0660`.
fn mode(entry: &Entry) -> Result<String, String> {
    let v = &entry.value;
    match u32::from_str_radix(v, 8) {
        Ok(m) if m <= 0o7777 => Ok(format!("{m:04o}")),
        _ => {
            Err(format!("{}: {}= takes an octal mode such as 0755, not '{v}'", entry.at, entry.key))
        }
    }
}

/// A value with the unit's specifiers replaced.
fn expand(entry: &Entry, names: &Names) -> Result<String, String> {
    specifiers(&entry.value, names).map_err(|e| format!("{}: {}=: {e}", entry.at, entry.key))
}

/// Translates a socket unit (if any) and its service into sockhold options. `socket` is `None`
/// for `--unit NAME.service` alone.
pub fn translate(
    socket: Option<&UnitEntries>,
    service: &UnitEntries,
) -> Result<Translation, String> {
    let mut t = Translation::default();
    let mut accept = false;
    if let Some(socket) = socket {
        accept = socket_options(socket, &mut t)?;
    }
    service_options(service, accept, &mut t)?;
    for unit in socket.into_iter().chain([service]) {
        for e in &unit.entries {
            let mapped = match e.section.as_str() {
                "Socket" => SOCKET_KEYS.contains(&e.key.as_str()),
                "Service" => SERVICE_KEYS.contains(&e.key.as_str()),
                _ => !(e.key.starts_with("Condition") || e.key.starts_with("Assert")),
            };
            if !mapped {
                let why = if e.section == "Unit" {
                    "not checked: sockhold starts the service whatever it says"
                } else {
                    "not applied by sockhold"
                };
                t.warn(e, why);
            }
        }
    }
    Ok(t)
}

/// The [Socket] section: one `-l` per `Listen*=`, with its options; `--accept` and
/// `--max-connections`. Returns whether `Accept=yes`.
fn socket_options(unit: &UnitEntries, t: &mut Translation) -> Result<bool, String> {
    let e = &unit.entries;
    let get = |key| last(e, "Socket", key);
    let accept = get("Accept").map(boolean).transpose()?.unwrap_or(false);
    let name = match get("FileDescriptorName") {
        Some(entry) => expand(entry, &unit.names)?,
        None => unit.names.full.clone(),
    };
    let mut common = vec![format!("name={name}")];
    let bool_option = |key, option: &str, common: &mut Vec<String>| -> Result<(), String> {
        if let Some(entry) = get(key)
            && boolean(entry)?
        {
            common.push(option.to_owned());
        }
        Ok(())
    };
    for (key, option) in [("ReceiveBuffer", "rcvbuf"), ("SendBuffer", "sndbuf")] {
        if let Some(entry) = get(key) {
            common.push(format!("{option}={}", entry.value));
        }
    }
    let mut inet = Vec::new();
    bool_option("ReusePort", "reuseport", &mut inet)?;
    bool_option("FreeBind", "freebind", &mut inet)?;
    if let Some(entry) = get("BindToDevice") {
        inet.push(format!("device={}", expand(entry, &unit.names)?));
    }
    match get("BindIPv6Only").map(|e| (e, e.value.as_str())) {
        Some((_, "ipv6-only")) => inet.push("v6only=yes".into()),
        Some((_, "both")) => inet.push("v6only=no".into()),
        Some((_, "default")) | None => {}
        Some((entry, other)) => {
            return Err(format!(
                "{}: BindIPv6Only= takes default, both or ipv6-only, not '{other}'",
                entry.at
            ));
        }
    }
    let mut tcp = Vec::new();
    bool_option("NoDelay", "nodelay", &mut tcp)?;
    bool_option("KeepAlive", "keepalive", &mut tcp)?;
    // systemd creates socket files 0666 and their directories 0755 unless told otherwise.
    let mut file = Vec::new();
    file.push(format!(
        "mode={}",
        get("SocketMode").map(mode).transpose()?.unwrap_or("0666".into())
    ));
    if let Some(entry) = get("DirectoryMode") {
        file.push(format!("dirmode={}", mode(entry)?));
    }
    if let Some(entry) = get("SocketUser") {
        file.push(format!("owner={}", expand(entry, &unit.names)?));
    }
    if let Some(entry) = get("SocketGroup") {
        file.push(format!("group={}", expand(entry, &unit.names)?));
    }
    let listens = list(e, "Socket", &["ListenStream", "ListenDatagram", "ListenSequentialPacket"]);
    for entry in listens {
        let address = expand(entry, &unit.names)?;
        if address.contains(',') || address.chars().any(char::is_whitespace) {
            return Err(format!("{}: {}= '{address}' is not one address", entry.at, entry.key));
        }
        let path = address.starts_with('/');
        let unix = path || address.starts_with('@');
        let (spec, tcp_socket) = match (entry.key.as_str(), unix) {
            ("ListenStream", _) => (address.clone(), !unix),
            ("ListenDatagram", true) => (format!("unixgram://{address}"), false),
            ("ListenDatagram", false) => (format!("udp://{address}"), false),
            ("ListenSequentialPacket", true) => (format!("unixpacket://{address}"), false),
            _ => {
                return Err(format!(
                    "{}: ListenSequentialPacket= takes a Unix socket path or @name, not '{address}'",
                    entry.at
                ));
            }
        };
        let mut options = common.clone();
        // A datagram socket has no listen queue: systemd applies Backlog= to the others.
        if let Some(backlog) = get("Backlog").filter(|_| entry.key != "ListenDatagram") {
            options.insert(1, format!("backlog={}", backlog.value));
        }
        if !unix {
            // IPV6_V6ONLY means nothing to (and is refused for) an IPv4 address.
            let v4 = address
                .rsplit_once(':')
                .is_some_and(|(host, _)| host.parse::<std::net::Ipv4Addr>().is_ok());
            options.extend(inet.iter().filter(|o| !(v4 && o.starts_with("v6only="))).cloned());
        }
        if tcp_socket {
            options.extend(tcp.iter().cloned());
        }
        if path {
            options.extend(file.iter().cloned());
        }
        let full = format!("{spec},{}", options.join(","));
        full.parse::<ListenSpec>()
            .map_err(|e| format!("{}: {}={}: {e}", entry.at, entry.key, entry.value))?;
        t.push("listen", &["-l", &full]);
    }
    if accept {
        t.push("accept", &["--accept"]);
        if let Some(entry) = get("MaxConnections") {
            match entry.value.parse::<u32>() {
                Ok(n) if n > 0 => t.push("max_connections", &["--max-connections", &entry.value]),
                _ => {
                    return Err(format!(
                        "{}: MaxConnections= takes a positive number, not '{}'",
                        entry.at, entry.value
                    ));
                }
            }
        }
    } else if let Some(entry) = get("MaxConnections") {
        t.warn(entry, "applies only with Accept=yes");
    }
    Ok(accept)
}

/// The [Service] section.
fn service_options(unit: &UnitEntries, accept: bool, t: &mut Translation) -> Result<(), String> {
    let e = &unit.entries;
    let get = |key| last(e, "Service", key);
    let name = unit.names.full.rsplit_once('.').map_or(&unit.names.full[..], |(n, _)| n);
    let name: String = name.split('@').next().unwrap_or(name).into();
    t.push("name", &["--name", &name]);

    match get("Type").map(|e| (e, e.value.as_str())) {
        Some((_, "notify" | "notify-reload")) => t.push("ready", &["--ready", "notify"]),
        None | Some((_, "simple" | "exec" | "idle")) => {
            t.push("ready", &["--ready", SIMPLE_READY_DELAY]);
        }
        Some((entry, "dbus")) => {
            t.warn(entry, &format!("no D-Bus here: ready like Type=simple ({SIMPLE_READY_DELAY})"));
            t.push("ready", &["--ready", SIMPLE_READY_DELAY]);
        }
        Some((entry, other)) => {
            return Err(format!(
                "{}: Type={other} is not supported: sockhold runs the server as its child and needs it to stay (use simple, exec, notify or notify-reload)",
                entry.at
            ));
        }
    }

    // ExecStart=: one command; its environment comes first, for $VAR.
    let mut env: Vec<(String, String)> = Vec::new();
    for entry in list(e, "Service", &["Environment"]) {
        let words = split_words(&entry.value)
            .map_err(|err| format!("{}: Environment=: {err}", entry.at))?;
        for word in words {
            let word = specifiers(&word, &unit.names)
                .map_err(|err| format!("{}: Environment=: {err}", entry.at))?;
            let Some((key, _)) = word.split_once('=').filter(|(k, _)| valid_env_name(k)) else {
                return Err(format!(
                    "{}: Environment= takes KEY=VALUE assignments, not '{word}'",
                    entry.at
                ));
            };
            env.retain(|(k, _)| k != key);
            let (k, v) = word.split_once('=').expect("checked above");
            env.push((k.to_owned(), v.to_owned()));
            t.push("env", &["--env", &word]);
        }
    }
    let mut file_env: Vec<(String, String)> = Vec::new();
    for entry in list(e, "Service", &["EnvironmentFile"]) {
        let value = expand(entry, &unit.names)?;
        let file: EnvFile =
            value.parse().map_err(|err| format!("{}: EnvironmentFile=: {err}", entry.at))?;
        let vars = file.read().map_err(|err| format!("{}: EnvironmentFile=: {err}", entry.at))?;
        file_env.extend(vars);
        t.push("env_file", &["--env-file", &value]);
    }
    // systemd: EnvironmentFile= overrides Environment=.
    let mut vars: BTreeMap<String, String> = env.into_iter().collect();
    vars.extend(file_env);

    let starts = list(e, "Service", &["ExecStart"]);
    if starts.len() > 1 {
        return Err(format!(
            "{}: a second ExecStart= (the first is at {}): only Type=oneshot takes several, and sockhold runs one server",
            starts[1].at, starts[0].at
        ));
    }
    let mut full_privileges = false;
    if let Some(entry) = starts.first() {
        let exec = exec_start(entry, &unit.names, &vars)?;
        if exec.ignore_failure && !accept {
            t.warn(entry, "the '-' prefix is not applied: a failure exit counts as a failure (with Accept=yes, statuses are only logged)");
        }
        if exec.ambient {
            t.warn(
                entry,
                "the '!' prefix is not applied: the command runs as User= like any other",
            );
        }
        full_privileges = exec.full_privileges;
        if let Some(argv0) = exec.argv0 {
            t.push("argv0", &["--argv0", &argv0]);
        }
        t.command = exec.argv;
    }

    let user = get("User").map(|e| expand(e, &unit.names)).transpose()?;
    let group = get("Group").map(|e| expand(e, &unit.names)).transpose()?;
    let user = match (user, group) {
        (Some(u), Some(g)) => Some(format!("{u}:{g}")),
        (Some(u), None) => Some(u),
        (None, Some(g)) => Some(format!("root:{g}")),
        (None, None) => None,
    };
    if let Some(user) = user {
        if full_privileges {
            let entry = starts[0];
            t.warn(
                entry,
                "the '+' prefix: the command runs with sockhold's own rights, not as User=/Group=",
            );
        } else {
            t.push("user", &["--user", &user]);
        }
    }
    if let Some(entry) = get("WorkingDirectory") {
        let dir = expand(entry, &unit.names)?;
        let dir = dir.strip_prefix('-').unwrap_or(&dir).to_owned();
        if dir == "~" {
            t.warn(entry, "'~' is not applied: the children start in sockhold's directory");
        } else if !dir.starts_with('/') {
            return Err(format!(
                "{}: WorkingDirectory= takes an absolute path, not '{dir}'",
                entry.at
            ));
        } else {
            t.push("chdir", &["--chdir", &dir]);
        }
    }
    if let Some(entry) = get("KillSignal") {
        crate::signals::parse_signal(&entry.value)
            .map_err(|err| format!("{}: KillSignal=: {err}", entry.at))?;
        t.push("stop_signal", &["--stop-signal", &entry.value]);
    }
    let timeout = get("TimeoutSec");
    if let Some(entry) = get("TimeoutStartSec").or(timeout) {
        t.push("ready_timeout", &["--ready-timeout", &time_span(entry, true)?]);
    }
    if let Some(entry) = get("TimeoutStopSec").or(timeout) {
        t.push("stop_timeout", &["--stop-timeout", &time_span(entry, true)?]);
    }
    // systemd's default is KillMode=control-group.
    let kill_mode = match get("KillMode").map(|e| (e, e.value.as_str())) {
        None | Some((_, "control-group")) => "control-group",
        Some((_, "mixed")) => "mixed",
        Some((_, "process")) => "process",
        Some((entry, "none")) => {
            t.warn(
                entry,
                "approximated by --kill-mode process (the main process still gets the stop signal)",
            );
            "process"
        }
        Some((entry, other)) => {
            return Err(format!(
                "{}: KillMode= takes control-group, mixed, process or none, not '{other}'",
                entry.at
            ));
        }
    };
    t.push("kill_mode", &["--kill-mode", kill_mode]);
    // systemd's default is Restart=no.
    let restart = match get("Restart").map(|e| (e, e.value.as_str())) {
        None | Some((_, "no")) => "never",
        Some((_, "always")) => "always",
        Some((_, "on-failure")) => "on-failure",
        Some((entry, "on-abnormal" | "on-watchdog" | "on-abort")) => {
            t.warn(
                entry,
                "approximated by --restart on-failure (also after an exit with a failure status)",
            );
            "on-failure"
        }
        Some((entry, "on-success")) => {
            t.warn(entry, "approximated by --restart always (also after a failure)");
            "always"
        }
        Some((entry, other)) => {
            return Err(format!(
                "{}: Restart= takes no, always, on-success, on-failure, on-abnormal, on-watchdog or on-abort, not '{other}'",
                entry.at
            ));
        }
    };
    t.push("restart", &["--restart", restart]);
    if let Some(entry) = get("WatchdogSec") {
        let span = time_span(entry, false)?;
        if accept && span != "0s" {
            // sockhold watches no per-connection child (--watchdog does not go with --accept).
            t.warn(entry, "not applied with Accept=yes");
        } else if span != "0s" {
            t.push("watchdog", &["--watchdog", &span]);
        }
    }
    match get("NotifyAccess").map(|e| (e, e.value.as_str())) {
        None => {}
        Some((_, "main" | "exec")) => t.push("notify_access", &["--notify-access", "main"]),
        Some((_, "all")) => t.push("notify_access", &["--notify-access", "all"]),
        Some((entry, "none")) => {
            t.warn(
                entry,
                "not applied: sockhold reads the main process's messages (--notify-access main)",
            );
            t.push("notify_access", &["--notify-access", "main"]);
        }
        Some((entry, other)) => {
            return Err(format!(
                "{}: NotifyAccess= takes none, main, exec or all, not '{other}'",
                entry.at
            ));
        }
    }
    if let Some(entry) = get("FileDescriptorStoreMax") {
        match entry.value.parse::<u32>() {
            Ok(0) => {}
            Ok(n) => t.push("fd_store", &["--fd-store", &n.to_string()]),
            Err(_) => {
                return Err(format!(
                    "{}: FileDescriptorStoreMax= takes a number, not '{}'",
                    entry.at, entry.value
                ));
            }
        }
    }
    let stdin = get("StandardInput");
    match stdin.map(|e| (e, e.value.as_str())) {
        Some((_, "socket")) if accept => t.push("inetd", &["--inetd"]),
        Some((entry, "socket")) => {
            return Err(format!(
                "{}: StandardInput=socket needs Accept=yes in the socket unit (sockhold hands listening sockets over as fds 3, 4, ...)",
                entry.at
            ));
        }
        Some((_, "null")) | None => {}
        Some((entry, _)) => t.warn(entry, "not applied: the children inherit sockhold's stdin"),
    }
    for key in ["StandardOutput", "StandardError"] {
        let Some(entry) = get(key) else { continue };
        match entry.value.as_str() {
            "socket" if stdin.is_some_and(|s| s.value == "socket") => {}
            "inherit" | "journal" | "journal+console" => {}
            _ => t.warn(entry, "not applied: the children write where sockhold writes"),
        }
    }
    let dirs = list(e, "Service", &["RuntimeDirectory"]);
    for entry in &dirs {
        for dir in split_words(&entry.value)
            .map_err(|err| format!("{}: RuntimeDirectory=: {err}", entry.at))?
        {
            let dir = specifiers(&dir, &unit.names)
                .map_err(|err| format!("{}: RuntimeDirectory=: {err}", entry.at))?;
            if dir.starts_with('/') || dir.split('/').any(|p| p.is_empty() || p == "..") {
                return Err(format!(
                    "{}: RuntimeDirectory= takes relative paths below /run, not '{dir}'",
                    entry.at
                ));
            }
            t.push("runtime_directory", &["--runtime-directory", &dir]);
        }
    }
    if !dirs.is_empty() {
        if let Some(entry) = get("RuntimeDirectoryMode") {
            t.push("runtime_directory_mode", &["--runtime-directory-mode", &mode(entry)?]);
        }
        if let Some(entry) = get("RuntimeDirectoryPreserve") {
            // "restart" keeps it across restarts and removes it at stop: sockhold never removes
            // it between restarts, so that is "no" here.
            let preserve = match entry.value.as_str() {
                "restart" => false,
                _ => boolean(entry)?,
            };
            if preserve {
                t.push("runtime_directory_preserve", &["--runtime-directory-preserve"]);
            }
        }
    }
    Ok(())
}

fn valid_env_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// `ExecStart=` read: its prefixes and its argv.
#[derive(Debug, PartialEq, Eq)]
pub struct ExecStart {
    /// argv, specifiers and variables expanded; `argv[0]` is the program to run.
    pub argv: Vec<String>,
    /// `@`: the argv[0] the program sees.
    pub argv0: Option<String>,
    /// `-`: a failure status is not a failure.
    pub ignore_failure: bool,
    /// `+`: run with full privileges (no User=).
    pub full_privileges: bool,
    /// `!` or `!!`: ambient capabilities instead of a full user change.
    pub ambient: bool,
}

/// Reads `ExecStart=`: the prefixes `-@:+!`, the words, specifiers in each word, then (unless
/// `:`) `$VAR` as a word of its own split at blanks, `${VAR}` anywhere as one piece, `$$` as `$`.
pub fn exec_start(
    entry: &Entry,
    names: &Names,
    vars: &BTreeMap<String, String>,
) -> Result<ExecStart, String> {
    let at = &entry.at;
    let mut rest = entry.value.as_str();
    let (mut argv0_prefix, mut ignore_failure, mut no_env, mut full_privileges, mut ambient) =
        (false, false, false, false, false);
    loop {
        match rest.chars().next() {
            Some('@') => argv0_prefix = true,
            Some('-') => ignore_failure = true,
            Some(':') => no_env = true,
            Some('+') => full_privileges = true,
            Some('!') => ambient = true,
            Some('|') => {
                return Err(format!(
                    "{at}: ExecStart=: the '|' prefix (run through a shell) is not supported"
                ));
            }
            _ => break,
        }
        rest = &rest[1..];
    }
    let words = split_words(rest).map_err(|e| format!("{at}: ExecStart=: {e}"))?;
    if words.iter().any(|w| w == ";") {
        return Err(format!(
            "{at}: ExecStart=: ';' separates several commands; sockhold runs one server"
        ));
    }
    let mut argv = Vec::new();
    for word in &words {
        let word = specifiers(word, names).map_err(|e| format!("{at}: ExecStart=: {e}"))?;
        if no_env {
            argv.push(word);
            continue;
        }
        match word.strip_prefix('$').filter(|n| valid_env_name(n)) {
            Some(name) => {
                argv.extend(
                    vars.get(name).into_iter().flat_map(|v| v.split_whitespace()).map(String::from),
                );
            }
            None => argv.push(replace_braced(&word, vars)),
        }
    }
    let argv0 = if argv0_prefix {
        if argv.len() < 2 {
            return Err(format!(
                "{at}: ExecStart=: the '@' prefix needs a program and then its argv[0]"
            ));
        }
        Some(argv.remove(1))
    } else {
        None
    };
    match argv.first() {
        None => return Err(format!("{at}: ExecStart= has no command")),
        Some(program) if !program.starts_with('/') && program.contains('/') => {
            return Err(format!(
                "{at}: ExecStart=: '{program}' must be an absolute path or a plain name"
            ));
        }
        Some(_) => {}
    }
    Ok(ExecStart { argv, argv0, ignore_failure, full_privileges, ambient })
}

/// `${VAR}` replaced by its value (nothing when unset), `$$` by `$`; any other `$` kept.
fn replace_braced(word: &str, vars: &BTreeMap<String, String>) -> String {
    let mut out = String::with_capacity(word.len());
    let mut rest = word;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some((name, tail)) = after
            .strip_prefix('{')
            .and_then(|a| a.split_once('}'))
            .filter(|(n, _)| valid_env_name(n))
        {
            out.push_str(vars.get(name).map_or("", String::as_str));
            rest = tail;
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

//! The command line: clap definitions (the source of `--help`) and their conversion into a
//! validated [`Config`]. Parsing durations, signals and readiness modes lives here too. This
//! module must not bind, spawn or log: a bad value is a usage error (exit 2) that names it.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgAction, Args, Parser, Subcommand};
use nix::sys::signal::Signal;

use crate::listen::{ListenSpec, fd_name_is_valid, sanitize_fd_name};
use crate::supervisor::{NotifyAccess, Policy, ReadyMode, RestartPolicy};

/// Hold a service's listening sockets and run its server as a child that inherits them, under
/// the systemd socket-activation protocol (LISTEN_FDS, LISTEN_PID, LISTEN_FDNAMES).
///
/// sockhold binds every --listen socket once and keeps it open for its whole life. It starts
/// COMMAND with the sockets as fds 3, 4, ... On SIGHUP it starts a new generation of COMMAND on
/// the same sockets, waits until it is ready, then asks the old one to stop: no connection is
/// refused or reset during the change, and sockhold stays the parent of every child.
#[derive(Debug, Parser)]
#[command(
    name = "sockhold",
    version,
    override_usage = "sockhold [OPTIONS] -l SPEC [-l SPEC ...] [--] COMMAND [ARG ...]\n       sockhold ctl [--control PATH] status [--json] | reload | stop | signal SIG | upgrade",
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true,
    after_help = "Signals: HUP reloads; TERM and INT stop; USR2 upgrades sockhold in place; USR1, WINCH, QUIT, ALRM, TTIN and TTOU are forwarded to the serving child.\nExit status: 0 clean stop, 1 runtime failure, 2 usage error, 126/127 command not executable/found, else the child's code or 128+N.\nSee sockhold(1) for listen specs and the full lifecycle."
)]
pub struct Cli {
    /// Talk to a running sockhold (see `sockhold ctl --help`).
    #[command(subcommand)]
    pub ctl: Option<Sub>,

    /// A socket to bind and hand over: a port (8080), ADDR:PORT (127.0.0.1:8080, [::1]:8080),
    /// tcp://, tcp4://, tcp6://, udp://, udp4://, udp6://HOST:PORT, a Unix socket (/run/app.sock,
    /// unix://, unixgram://, unixpacket:// with /PATH or @ABSTRACT), or an inherited one to adopt
    /// (fd://N, systemd://NAME). Options follow after commas: name=, backlog=, v6only=,
    /// reuseport, freebind, device=, nodelay, keepalive, rcvbuf=, sndbuf=, mode=, owner=, group=,
    /// nonblock. Repeatable: the order is the fd order (3, 4, ...).
    /// Without any, sockhold adopts every socket it was itself given under socket activation.
    #[arg(short = 'l', long = "listen", value_name = "SPEC")]
    pub listen: Vec<ListenSpec>,

    /// How a new child proves it is ready: `notify` (it sends READY=1 to $NOTIFY_SOCKET) or
    /// `delay:DUR` (it is still running after DUR).
    #[arg(long, value_name = "MODE", default_value = "delay:1s", value_parser = parse_ready)]
    pub ready: ReadyMode,

    /// A new child that is not ready by then is killed; the old one keeps serving.
    #[arg(long, value_name = "DUR", default_value = "60s", value_parser = parse_duration)]
    pub ready_timeout: Duration,

    /// The signal that asks a child to stop (TERM, SIGTERM or 15).
    #[arg(long, value_name = "SIG", default_value = "TERM", value_parser = parse_signal)]
    pub stop_signal: Signal,

    /// A child that has not exited this long after the stop signal gets SIGKILL, with its whole
    /// process group.
    #[arg(long, value_name = "DUR", default_value = "30s", value_parser = parse_duration)]
    pub stop_timeout: Duration,

    /// What to do when the serving child exits by itself: restart it (with backoff from 100ms
    /// to 30s) unless it exited 0, always restart it, or never (sockhold ends with its status).
    #[arg(long, value_name = "POLICY", value_enum, default_value_t = RestartPolicy::OnFailure)]
    pub restart: RestartPolicy,

    /// Whose notify messages count: the child's main process, any process in its process group,
    /// or anyone who can reach the socket.
    #[arg(long, value_name = "WHO", value_enum, default_value_t = NotifyAccess::Group)]
    pub notify_access: NotifyAccess,

    /// The instance name, used in logs, as the default LISTEN_FDNAMES entry and in runtime
    /// paths [default: the basename of COMMAND].
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,

    /// One child per connection (systemd's Accept=yes, inetd's nowait): sockhold accepts on the
    /// stream sockets itself and runs COMMAND with the connection as fd 3 (LISTEN_FDS=1,
    /// LISTEN_FDNAMES=connection). A reload changes what new connections run; running ones
    /// finish.
    #[arg(long, conflicts_with_all = ["lazy", "compat_env"])]
    pub accept: bool,

    /// With --accept: the connection is the child's stdin and stdout instead of fd 3.
    #[arg(long, requires = "accept")]
    pub inetd: bool,

    /// With --accept: at most N children at once; further connections wait in the backlog.
    #[arg(long, value_name = "N", requires = "accept", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: Option<u32>,

    /// Start the first child only when the first connection or datagram arrives on any socket,
    /// as a systemd socket unit does; that connection waits in the backlog and is served.
    #[arg(long)]
    pub lazy: bool,

    /// Also hand the sockets over the way other tools do, so servers written for them move over
    /// unchanged: `einhorn` (EINHORN_FDS as socketmaster sets it, plus EINHORN_FD_COUNT,
    /// EINHORN_FD_<i> and EINHORN_MASTER_PID as einhorn does) and/or `server-starter`
    /// (SERVER_STARTER_PORT and SERVER_STARTER_GENERATION as Server::Starter sets them).
    #[arg(long, value_name = "LIST", value_enum, value_delimiter = ',')]
    pub compat_env: Vec<CompatEnv>,

    /// Serve the JSON-lines control protocol on a Unix socket at PATH (mode 0600, in a
    /// directory others cannot write to; only root and sockhold's own user may use it), for
    /// `sockhold ctl`.
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,

    /// Write sockhold's own pid to PATH; removed at exit.
    #[arg(long, value_name = "PATH")]
    pub pid_file: Option<PathBuf>,

    /// Adopt and reap every orphaned descendant (a daemon that double-forked, a worker whose
    /// parent died), as an init does. Automatic when sockhold runs as PID 1.
    #[arg(long)]
    pub subreaper: bool,

    /// What the children do if sockhold itself dies without stopping them (SIGKILL, the OOM
    /// killer): `keep` serving on the sockets they hold until someone stops them, `stop` (they
    /// get --stop-signal) or `kill` (they get SIGKILL). A self-upgrade is not a death.
    #[arg(long, value_name = "WHAT", value_enum, default_value_t = OnSupervisorDeath::Keep)]
    pub on_supervisor_death: OnSupervisorDeath,

    /// The program SIGUSR2 and `ctl upgrade` re-execute in place (same pid, sockets and
    /// children kept) [default: the path sockhold was started from].
    #[arg(long, value_name = "PATH")]
    pub upgrade_binary: Option<PathBuf>,

    /// Log more (repeat for even more); RUST_LOG also works.
    #[arg(short, long, action = ArgAction::Count, conflicts_with = "quiet")]
    pub verbose: u8,

    /// Log less: warnings only, or errors only when repeated.
    #[arg(short, long, action = ArgAction::Count)]
    pub quiet: u8,

    /// How log lines look: `text` (`sockhold[PID]: message`) or `json` (one object per line
    /// with ts, level, pid, name and msg, for log shippers).
    #[arg(long, value_name = "F", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// The server to run, and its arguments.
    #[arg(
        value_name = "COMMAND",
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true
    )]
    pub command: Vec<OsString>,
}

/// Another tool's way of handing sockets over, set alongside LISTEN_FDS.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum CompatEnv {
    /// socketmaster's and einhorn's EINHORN_FDS.
    Einhorn,
    /// Server::Starter's SERVER_STARTER_PORT.
    ServerStarter,
}

/// What the children do when sockhold dies without stopping them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OnSupervisorDeath {
    /// Keep serving on the sockets they hold (they have their own copies).
    Keep,
    /// Get the --stop-signal from the kernel (PR_SET_PDEATHSIG).
    Stop,
    /// Get SIGKILL from the kernel (PR_SET_PDEATHSIG).
    Kill,
}

/// The shape of log lines.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// `sockhold[PID]: message`, warnings and errors marked.
    Text,
    /// One JSON object per line: ts, level, pid, name, msg.
    Json,
}

/// sockhold's subcommands.
#[derive(Debug, Subcommand)]
pub enum Sub {
    /// Ask a running sockhold through its control socket: status, reload (waits for the outcome),
    /// stop, signal, upgrade. Exits 0 on success, 1 with the reason otherwise.
    Ctl(CtlArgs),
}

/// `sockhold ctl`'s arguments.
#[derive(Debug, Args)]
pub struct CtlArgs {
    /// The control socket of the sockhold to talk to (its --control).
    #[arg(long, value_name = "PATH", env = "SOCKHOLD_CONTROL")]
    pub control: PathBuf,

    /// Give up waiting for the answer after DUR (a reload waits for the new child's readiness).
    #[arg(long, value_name = "DUR", default_value = "2m", value_parser = parse_duration)]
    pub timeout: Duration,

    /// What to ask.
    #[command(subcommand)]
    pub request: CtlRequest,
}

/// A request of `sockhold ctl`.
#[derive(Clone, Debug, Subcommand)]
pub enum CtlRequest {
    /// Show sockhold's pid and version, the listeners, every generation and the last reload.
    Status {
        /// Print the answer as sockhold sent it: one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Start a new generation and wait until it serves (exit 0) or the reload failed (exit 1).
    Reload,
    /// Stop every child and sockhold itself.
    Stop,
    /// Send a signal (USR1, SIGWINCH, 28, ...) to the serving child.
    Signal {
        /// The signal to send.
        #[arg(value_name = "SIG", value_parser = parse_signal)]
        signal: Signal,
    },
    /// Re-execute sockhold's binary (or its --upgrade-binary) in place: same pid, same sockets,
    /// same children. Exits 1 with the reason if the new program is refused.
    Upgrade,
}

/// Everything sockhold runs with, validated.
#[derive(Clone, Debug)]
pub struct Config {
    /// The sockets, in fd order.
    pub listen: Vec<ListenSpec>,
    /// The decisions' parameters.
    pub policy: Policy,
    /// The instance name.
    pub name: String,
    /// Where to write sockhold's pid.
    pub pid_file: Option<PathBuf>,
    /// Where to serve the control protocol.
    pub control: Option<PathBuf>,
    /// Wait for the first connection before starting the first child.
    pub lazy: bool,
    /// Other tools' environment variables to set too.
    pub compat_env: Vec<CompatEnv>,
    /// Per-connection mode, if chosen.
    pub accept: Option<AcceptConfig>,
    /// argv of the child; never empty.
    pub command: Vec<OsString>,
    /// Become a child subreaper (`--subreaper`, or sockhold is PID 1).
    pub subreaper: bool,
    /// The signal the kernel sends each child when sockhold dies, if any.
    pub death_signal: Option<Signal>,
    /// What SIGUSR2 and `ctl upgrade` execute, if not sockhold's own path.
    pub upgrade_binary: Option<PathBuf>,
}

/// `--accept` and its companions.
#[derive(Clone, Debug)]
pub struct AcceptConfig {
    /// The connection on stdin and stdout rather than fd 3.
    pub inetd: bool,
    /// At most this many children at once.
    pub max_connections: Option<usize>,
}

impl Cli {
    /// `--name`, or the basename of COMMAND made a valid fd name.
    pub fn instance_name(&self) -> String {
        if let Some(name) = &self.name {
            return name.clone();
        }
        let base = self.command.first().map(std::path::Path::new).and_then(|p| p.file_name());
        sanitize_fd_name(&base.map(|b| b.to_string_lossy().into_owned()).unwrap_or_default())
    }

    /// Checks what clap cannot and builds the [`Config`]. The error is a usage error.
    pub fn into_config(self) -> Result<Config, String> {
        if let Some(name) = &self.name
            && !fd_name_is_valid(name)
        {
            return Err(format!(
                "invalid --name '{name}': use 1 to 255 printable ASCII characters without ':'"
            ));
        }
        let name = self.instance_name();
        let mut listen = self.listen;
        if listen.is_empty() {
            // As a drop-in under systemd: adopt every socket sockhold was given, in order,
            // under the names they had.
            let inherited = crate::adopt::Inherited::from_env()?;
            if inherited.fds.is_empty() {
                return Err("at least one --listen is required, unless sockhold is started with sockets of its own (LISTEN_FDS)".into());
            }
            for (fd, fd_name) in inherited.fds {
                let spec = format!("fd://{fd},name={}", sanitize_fd_name(&fd_name));
                listen.push(spec.parse().map_err(|e| format!("{e}"))?);
            }
        }
        if self.ready_timeout.is_zero() {
            return Err("invalid --ready-timeout: it must be longer than 0".into());
        }
        Ok(Config {
            listen,
            policy: Policy {
                ready: self.ready,
                ready_timeout: self.ready_timeout,
                stop_signal: self.stop_signal,
                stop_timeout: self.stop_timeout,
                restart: self.restart,
                notify_access: self.notify_access,
            },
            name,
            pid_file: self.pid_file,
            control: self.control,
            lazy: self.lazy,
            compat_env: self.compat_env,
            accept: self.accept.then(|| AcceptConfig {
                inetd: self.inetd,
                max_connections: self.max_connections.map(|n| n as usize),
            }),
            command: self.command,
            subreaper: self.subreaper || nix::unistd::getpid().as_raw() == 1,
            death_signal: match self.on_supervisor_death {
                OnSupervisorDeath::Keep => None,
                OnSupervisorDeath::Stop => Some(self.stop_signal),
                OnSupervisorDeath::Kill => Some(Signal::SIGKILL),
            },
            upgrade_binary: self.upgrade_binary,
        })
    }
}

/// Parses `500ms`, `2s`, `1m30s`, `1h`; a bare number is seconds, as in systemd.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if let Ok(secs) = text.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(text)
        .map_err(|e| format!("'{text}' is not a duration ({e}); use e.g. 500ms, 2s, 1m30s"))
}

/// Parses `TERM`, `SIGTERM`, `term` or `15`.
pub fn parse_signal(text: &str) -> Result<Signal, String> {
    let bad = || {
        format!("'{text}' is not a signal; use a name like TERM or SIGTERM, or a number like 15")
    };
    if let Ok(number) = text.parse::<i32>() {
        return Signal::try_from(number).map_err(|_| bad());
    }
    let upper = text.to_ascii_uppercase();
    let name = if upper.starts_with("SIG") { upper } else { format!("SIG{upper}") };
    name.parse::<Signal>().map_err(|_| bad())
}

/// Parses `notify` or `delay:DUR`.
pub fn parse_ready(text: &str) -> Result<ReadyMode, String> {
    match text.split_once(':') {
        None if text == "notify" => Ok(ReadyMode::Notify),
        Some(("delay", dur)) => parse_duration(dur).map(ReadyMode::Delay),
        Some((mode @ ("http" | "exec"), _)) => {
            Err(format!("ready mode '{mode}:' is not supported yet; use notify or delay:DUR"))
        }
        _ => Err(format!("'{text}' is not a ready mode; use notify or delay:DUR")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The completions in contrib/completions/ are generated from this command line; this test
    /// fails when they are out of step. `SOCKHOLD_BLESS=1 cargo test completions` rewrites them.
    #[test]
    fn shell_completions_are_in_step_with_the_command_line() {
        use clap::CommandFactory;
        use clap_complete::Shell;
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/completions");
        for (shell, file) in [
            (Shell::Bash, "sockhold.bash"),
            (Shell::Zsh, "_sockhold"),
            (Shell::Fish, "sockhold.fish"),
        ] {
            let mut generated = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "sockhold", &mut generated);
            let path = dir.join(file);
            if std::env::var_os("SOCKHOLD_BLESS").is_some() {
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::write(&path, &generated).unwrap();
            }
            let committed = std::fs::read(&path).unwrap_or_default();
            assert!(
                committed == generated,
                "contrib/completions/{file} is out of step with the command line: run SOCKHOLD_BLESS=1 cargo test completions"
            );
        }
    }

    #[test]
    fn durations() {
        let ok = [
            ("500ms", Duration::from_millis(500)),
            ("2s", Duration::from_secs(2)),
            ("1m30s", Duration::from_secs(90)),
            ("1m 30s", Duration::from_secs(90)),
            ("5", Duration::from_secs(5)),
            ("0", Duration::ZERO),
            ("1h", Duration::from_secs(3600)),
        ];
        for (text, want) in ok {
            assert_eq!(parse_duration(text), Ok(want), "{text}");
        }
        for bad in ["", "abc", "5x", "-1s", "1.5.s"] {
            let err = parse_duration(bad).unwrap_err();
            assert!(err.contains(&format!("'{}'", bad.trim())), "{bad}: {err}");
        }
    }

    #[test]
    fn signals() {
        for (text, want) in [
            ("TERM", Signal::SIGTERM),
            ("SIGTERM", Signal::SIGTERM),
            ("term", Signal::SIGTERM),
            ("15", Signal::SIGTERM),
            ("QUIT", Signal::SIGQUIT),
            ("9", Signal::SIGKILL),
            ("sigusr2", Signal::SIGUSR2),
        ] {
            assert_eq!(parse_signal(text), Ok(want), "{text}");
        }
        for bad in ["", "NOPE", "0", "999", "SIG"] {
            assert!(parse_signal(bad).unwrap_err().contains("is not a signal"), "{bad}");
        }
    }

    #[test]
    fn ready_modes() {
        assert_eq!(parse_ready("notify"), Ok(ReadyMode::Notify));
        assert_eq!(parse_ready("delay:250ms"), Ok(ReadyMode::Delay(Duration::from_millis(250))));
        assert!(parse_ready("delay:x").unwrap_err().contains("'x' is not a duration"));
        assert!(parse_ready("http:/health").unwrap_err().contains("not supported yet"));
        assert!(parse_ready("sleep").unwrap_err().contains("'sleep' is not a ready mode"));
    }
}

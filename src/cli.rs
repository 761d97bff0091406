//! The command line: clap definitions (the source of `--help`) and their conversion into a
//! validated [`Config`]. Parsing durations, signals and readiness modes lives here too. This
//! module must not bind, spawn or log: a bad value is a usage error (exit 2) that names it.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgAction, Args, Parser, Subcommand};

use crate::child_env::{ChildWorld, EnvFile, UserSpec, parse_env_assignment};
use crate::listen::{ListenSpec, fd_name_is_valid, sanitize_fd_name};
use crate::signals::{Signal, parse_signal};
use crate::supervisor::{
    KillMode, MAX_DRAINING, NotifyAccess, Policy, ReadyMode, ReloadStrategy, RestartPolicy,
};

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
    after_help = "Signals: HUP reloads; TERM and INT stop; USR2 upgrades sockhold in place; USR1, WINCH, QUIT, ALRM, TTIN, TTOU and the realtime signals (RTMIN..RTMAX) are forwarded to the serving child.\nExit status: 0 clean stop, 1 runtime failure, 2 usage error, 126/127 command not executable/found, else the child's code or 128+N.\nSee sockhold(1) for listen specs and the full lifecycle."
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
    /// nonblock, steer=flow (UDP: each unit its own socket, flows kept on it across reloads).
    /// Repeatable: the order is the fd order (3, 4, ...).
    /// Without any, sockhold adopts every socket it was itself given under socket activation.
    #[arg(short = 'l', long = "listen", value_name = "SPEC")]
    pub listen: Vec<ListenSpec>,

    /// How a new child proves it is ready: `notify` (it sends READY=1 to $NOTIFY_SOCKET),
    /// `delay:DUR` (it is still running after DUR), `http:PATH` (GET PATH on its private
    /// `health` listener, the fd after the --listen ones, answers 2xx) or `exec:CMD` (CMD, split
    /// into words as a shell would but run without one, exits 0; it gets SOCKHOLD_CHILD_PID and
    /// SOCKHOLD_GENERATION). Probes are retried per --probe-delay, --probe-interval and
    /// --probe-timeout until --ready-timeout.
    #[arg(long, value_name = "MODE", default_value = "delay:1s", value_parser = parse_ready)]
    pub ready: ReadyMode,

    /// A new child that is not ready by then is killed; the old one keeps serving.
    #[arg(long, value_name = "DUR", default_value = "60s", value_parser = parse_duration)]
    pub ready_timeout: Duration,

    /// With --ready http: or exec:, the wait between a child's start and its first probe.
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    pub probe_delay: Option<Duration>,

    /// With --ready http: or exec:, the wait between the end of a failed probe and the next.
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    pub probe_interval: Option<Duration>,

    /// With --ready http: or exec:, how long one probe may take before it counts as failed
    /// (an exec: probe is then killed).
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    pub probe_timeout: Option<Duration>,

    /// A serving child must send WATCHDOG=1 at least this often (it gets WATCHDOG_USEC and
    /// WATCHDOG_PID); on a miss it gets SIGABRT, then SIGKILL after --stop-timeout, and is
    /// restarted as after a crash. WATCHDOG=trigger fires it, WATCHDOG_USEC= changes it.
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    pub watchdog: Option<Duration>,

    /// Run N children per generation, all on the same sockets. A worker that crashes is
    /// replaced alone.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub workers: u32,

    /// How a reload replaces the workers: `rolling` (one new worker ready, then one old one
    /// stopped and gone, then the next: never more than N+1 alive) or `all-at-once` (N new
    /// ready, then the N old stopped).
    #[arg(long, value_name = "S", value_enum, default_value_t = ReloadStrategy::Rolling)]
    pub reload_strategy: ReloadStrategy,

    /// The signal that asks a child to stop (TERM, SIGTERM or 15; realtime ones as RTMIN+N,
    /// RTMAX-N or their numbers).
    #[arg(long, value_name = "SIG", default_value = "TERM", value_parser = parse_signal)]
    pub stop_signal: Signal,

    /// A child that has not exited this long after the stop signal gets SIGKILL, with its whole
    /// process group (see --kill-mode).
    #[arg(long, value_name = "DUR", default_value = "30s", value_parser = parse_duration)]
    pub stop_timeout: Duration,

    /// Whom a stop reaches (systemd's KillMode=): with mixed, the stop signal goes to the
    /// child's main process and SIGKILL to its process group, at --stop-timeout and to what is
    /// left of the group once the main process ends; with control-group, the stop signal goes
    /// to the whole group too; with process, only ever to the main process, so what it forked
    /// (an sshd's sessions) runs on after it.
    #[arg(long, value_name = "MODE", value_enum, default_value_t = KillMode::Mixed)]
    pub kill_mode: KillMode,

    /// At most N old generations drain at once (stopped but still finishing their
    /// connections): when a reload would leave more, the oldest is SIGKILLed early with its
    /// process group. Bounds what quick successive reloads leave behind when clients hold
    /// connections open.
    #[arg(long, value_name = "N", default_value_t = MAX_DRAINING, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub max_draining: usize,

    /// With a `steer=flow` listener: a replaced generation that still owns flows gets its stop
    /// signal only once none of them has had a datagram for DUR (one that owns none is stopped
    /// at once; at shutdown every generation is stopped at once).
    #[arg(long, value_name = "DUR", default_value = "10s", value_parser = parse_duration)]
    pub flow_idle: Duration,

    /// What to do when the serving child exits by itself: restart it (with backoff from 100ms
    /// to 30s) unless it exited 0, always restart it, or never (sockhold ends with its status).
    #[arg(long, value_name = "POLICY", value_enum, default_value_t = RestartPolicy::OnFailure)]
    pub restart: RestartPolicy,

    /// Whose notify messages count: the child's main process, any process in its process group,
    /// or anyone who can reach the socket.
    #[arg(long, value_name = "WHO", value_enum, default_value_t = NotifyAccess::Group)]
    pub notify_access: NotifyAccess,

    /// Keep up to N fds that children hand over with sd_notify FDSTORE=1 (systemd's fd store,
    /// FileDescriptorStoreMax=), named by FDNAME=, and pass them to every later generation
    /// after its sockets (in LISTEN_FDS and LISTEN_FDNAMES, newest first), with FDSTORE=N in
    /// its environment. FDSTOREREMOVE=1 closes a name's fds; a stored fd that hangs up is
    /// closed unless stored with FDPOLL=0. The store survives reloads, restarts and upgrades and
    /// closes when sockhold stops. 0: off, fds sent are closed.
    #[arg(long, value_name = "N", default_value_t = 0, conflicts_with = "accept")]
    pub fd_store: usize,

    /// The instance name, used in logs, as the default LISTEN_FDNAMES entry and in runtime
    /// paths [default: the basename of COMMAND].
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,

    /// One child per connection (systemd's Accept=yes, inetd's nowait): sockhold accepts on the
    /// stream sockets itself and runs COMMAND with the connection as fd 3 (LISTEN_FDS=1,
    /// LISTEN_FDNAMES=connection). A reload changes what new connections run; running ones
    /// finish.
    #[arg(long, conflicts_with_all = ["lazy", "compat_env", "watchdog", "workers", "reload_strategy"])]
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
    /// EINHORN_FD_<i> and EINHORN_MASTER_PID as einhorn does), `server-starter`
    /// (SERVER_STARTER_PORT and SERVER_STARTER_GENERATION as Server::Starter sets them) and/or
    /// `nginx` (NGINX=3;4;...; as nginx's binary upgrade sets it, so a new nginx master serves
    /// the inherited sockets). `nginx` also makes every listener non-blocking (as if each had
    /// `nonblock`): nginx never sets O_NONBLOCK on an inherited socket itself.
    #[arg(long, value_name = "LIST", value_enum, value_delimiter = ',')]
    pub compat_env: Vec<CompatEnv>,

    /// Serve the JSON-lines control protocol on a Unix socket at PATH (mode 0600, in a
    /// directory owned by root or sockhold's user that no one else can write to, /tmp
    /// included; only root and sockhold's own user may use it), for `sockhold ctl`.
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,

    /// Serve `GET /metrics` in the Prometheus text format on ADDR: IP:PORT (such as
    /// 127.0.0.1:9101), or the path of a Unix socket (mode 0600, in a directory checked as
    /// --control's is). Answered from the event loop: an idle sockhold still never wakes.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<crate::metrics::Addr>,

    /// Write sockhold's own pid to PATH (in a directory owned by root or sockhold's user that no
    /// one else can write to, or a sticky one such as /tmp); removed at exit if still ours.
    #[arg(long, value_name = "PATH")]
    pub pid_file: Option<PathBuf>,

    /// Run the children as USER (a name or uid) with its primary group, or GROUP (a name or gid),
    /// and its supplementary groups: setgroups, setgid, setuid in that order, in the child only.
    /// sockhold keeps its own rights and binds the sockets itself. Looked up again at every
    /// spawn.
    #[arg(long, value_name = "USER[:GROUP]")]
    pub user: Option<UserSpec>,

    /// The children's working directory, entered after the --user change (so with the user's
    /// rights). A relative COMMAND path is then found from DIR.
    #[arg(long, value_name = "DIR")]
    pub chdir: Option<PathBuf>,

    /// Set K=V in the children's environment; repeatable. Wins over --env-file and sockhold's
    /// own environment. LISTEN_*, NOTIFY_SOCKET, FDSTORE, SOCKHOLD_* and WATCHDOG_* are
    /// sockhold's.
    #[arg(long, value_name = "K=V", value_parser = parse_env_assignment)]
    pub env: Vec<(String, String)>,

    /// Add the KEY=VALUE lines of PATH to the children's environment (systemd's
    /// EnvironmentFile= syntax: # and ; comments, optional `export`, quoted values); repeatable,
    /// later files win. Read again at every reload; a bad file fails that reload. -PATH: a
    /// missing file is no error.
    #[arg(long, value_name = "PATH", allow_hyphen_values = true)]
    pub env_file: Vec<EnvFile>,

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

    /// Read the listeners and the service from a systemd unit: a `.socket` (with the service
    /// it activates: Service=, else NAME.service, or NAME@.service with Accept=yes) or a
    /// `.service` alone, each with its drop-ins (NAME.d/*.conf), from PATH's directory or
    /// /etc/systemd/system, /run/systemd/system, /lib/systemd/system, /usr/lib/systemd/system.
    /// Options given here override the unit's (a -l replaces all its listeners, a COMMAND its
    /// ExecStart=). Directives sockhold does not apply are named in one warning at start.
    #[arg(long, value_name = "PATH")]
    pub unit: Option<PathBuf>,

    /// With --unit: print the equivalent sockhold command line (and the warning) and exit.
    #[arg(long, requires = "unit")]
    pub print_config: bool,

    /// Create /run/NAME (for root; else under $XDG_RUNTIME_DIR) before the first child, owned
    /// by --user, and remove it when sockhold stops (systemd's RuntimeDirectory=); repeatable.
    /// The children get RUNTIME_DIRECTORY (the paths, ':'-separated).
    #[arg(long, value_name = "NAME", value_parser = parse_runtime_directory)]
    pub runtime_directory: Vec<PathBuf>,

    /// The mode of the --runtime-directory directories (octal).
    #[arg(long, value_name = "OCTAL", default_value = "0755", value_parser = parse_octal_mode, requires = "runtime_directory")]
    pub runtime_directory_mode: u32,

    /// Keep the --runtime-directory directories when sockhold stops.
    #[arg(long, requires = "runtime_directory")]
    pub runtime_directory_preserve: bool,

    /// The argv[0] COMMAND sees, instead of COMMAND itself (systemd's `@` prefix of
    /// ExecStart=).
    #[arg(long, value_name = "NAME")]
    pub argv0: Option<OsString>,

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

    /// The server to run, and its arguments. Every word from COMMAND on is the server's (so
    /// `srv --flag` passes --flag to srv); a word that looks like an option before it is
    /// sockhold's, and an error if sockhold has no such option. Put `--` first to run a
    /// COMMAND whose name starts with '-'.
    #[arg(value_name = "COMMAND", required_unless_present = "unit", trailing_var_arg = true)]
    pub command: Vec<OsString>,
}

/// Another tool's way of handing sockets over, set alongside LISTEN_FDS.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum CompatEnv {
    /// socketmaster's and einhorn's EINHORN_FDS.
    Einhorn,
    /// Server::Starter's SERVER_STARTER_PORT.
    ServerStarter,
    /// nginx's NGINX (the listeners nginx's master inherits at a binary upgrade).
    Nginx,
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
    /// The control socket of the sockhold to talk to (its --control); needed, from this option
    /// or the environment. Before or after the request.
    #[arg(long = "control", value_name = "PATH", env = "SOCKHOLD_CONTROL", global = true)]
    pub control_given: Option<PathBuf>,

    /// The control socket, once [`CtlArgs::resolve`] has checked that one was given.
    #[arg(skip)]
    pub control: PathBuf,

    /// Give up waiting for the answer after DUR (a reload waits for the new child's readiness).
    #[arg(long, value_name = "DUR", default_value = "2m", value_parser = parse_duration, global = true)]
    pub timeout: Duration,

    /// What to ask.
    #[command(subcommand)]
    pub request: CtlRequest,
}

impl CtlArgs {
    /// Takes the control socket from `--control` or SOCKHOLD_CONTROL; the error, a usage
    /// error, says how to give it. (clap cannot require an option that may also follow the
    /// request.)
    pub fn resolve(&mut self) -> Result<(), String> {
        self.control = self.control_given.take().ok_or(
            "sockhold ctl needs the control socket of the sockhold to talk to: give --control PATH (the path of its --control) or set SOCKHOLD_CONTROL",
        )?;
        Ok(())
    }
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
    /// Send a signal (USR1, SIGWINCH, 28, RTMIN+3, ...) to the serving child.
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
    /// Where to serve the metrics.
    pub metrics: Option<crate::metrics::Addr>,
    /// Other tools' environment variables to set too.
    pub compat_env: Vec<CompatEnv>,
    /// Per-connection mode, if chosen.
    pub accept: Option<AcceptConfig>,
    /// With a probing ready mode: how long one probe may take.
    pub probe_timeout: Duration,
    /// The child's user, directory and extra environment.
    pub world: ChildWorld,
    /// argv of the child; never empty.
    pub command: Vec<OsString>,
    /// Become a child subreaper (`--subreaper`, or sockhold is PID 1).
    pub subreaper: bool,
    /// The signal the kernel sends each child when sockhold dies, if any.
    pub death_signal: Option<Signal>,
    /// What SIGUSR2 and `ctl upgrade` execute, if not sockhold's own path.
    pub upgrade_binary: Option<PathBuf>,
    /// `--fd-store`: the most fds the fd store keeps (0: off).
    pub fd_store: usize,
    /// `--runtime-directory`: the directories to create, absolute.
    pub runtime_directories: Vec<PathBuf>,
    /// `--runtime-directory-mode`.
    pub runtime_directory_mode: u32,
    /// `--runtime-directory-preserve`.
    pub runtime_directory_preserve: bool,
    /// `--argv0`: the argv[0] the child sees, if not COMMAND.
    pub argv0: Option<OsString>,
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
        let runtime_base = PathBuf::from(crate::unit::runtime_base());
        let runtime_directories: Vec<PathBuf> =
            self.runtime_directory.iter().map(|d| runtime_base.join(d)).collect();
        let mut env = self.env;
        if !runtime_directories.is_empty() && !env.iter().any(|(k, _)| k == "RUNTIME_DIRECTORY") {
            let joined: Vec<String> =
                runtime_directories.iter().map(|d| d.display().to_string()).collect();
            env.insert(0, ("RUNTIME_DIRECTORY".into(), joined.join(":")));
        }
        let world =
            ChildWorld { user: self.user, chdir: self.chdir, env, env_files: self.env_file };
        world.check()?;
        if self.ready_timeout.is_zero() {
            return Err("invalid --ready-timeout: it must be longer than 0".into());
        }
        if let ReadyMode::Delay(delay) = self.ready
            && delay >= self.ready_timeout
        {
            // Every new child would be killed as not ready before the delay made it ready:
            // sockhold would start, then fail every start and every reload.
            return Err(format!(
                "--ready delay:{} is not shorter than --ready-timeout {}: no child could ever be ready; shorten the delay or lengthen the timeout",
                compact(delay),
                compact(self.ready_timeout)
            ));
        }
        let probe_flags = [
            ("--probe-delay", self.probe_delay),
            ("--probe-interval", self.probe_interval),
            ("--probe-timeout", self.probe_timeout),
        ];
        if !self.ready.probes()
            && let Some((flag, _)) = probe_flags.iter().find(|(_, v)| v.is_some())
        {
            return Err(format!("{flag} applies only to --ready http:PATH or --ready exec:CMD"));
        }
        if self.probe_timeout.is_some_and(|d| d.is_zero()) {
            return Err("invalid --probe-timeout: it must be longer than 0".into());
        }
        if self.watchdog.is_some_and(|d| d.is_zero()) {
            return Err(
                "invalid --watchdog: it must be longer than 0 (leave it out to turn it off)".into(),
            );
        }
        if let Some(spec) = listen.iter().find(|spec| spec.options.steer_flow)
            && (self.accept || self.lazy)
        {
            let flag = if self.accept { "--accept" } else { "--lazy" };
            return Err(format!(
                "invalid --listen '{}': steer=flow does not apply with {flag} (each unit gets its own socket, and sockhold's own is never read)",
                spec.text
            ));
        }
        if self.accept && self.ready.probes() {
            return Err("--ready http: and exec: do not apply to --accept, whose children serve one connection each".into());
        }
        if self.compat_env.contains(&CompatEnv::Nginx) {
            // nginx never sets O_NONBLOCK on a socket it inherits, and a worker asleep in a
            // blocking accept() can miss its master's QUIT: its listeners must come
            // non-blocking, as nginx's own binary upgrade hands them over.
            for spec in &mut listen {
                spec.options.nonblock = true;
            }
        }
        let flow_steering = listen.iter().any(|spec| spec.options.steer_flow);
        Ok(Config {
            listen,
            policy: Policy {
                ready: self.ready,
                ready_timeout: self.ready_timeout,
                stop_signal: self.stop_signal,
                stop_timeout: self.stop_timeout,
                kill_mode: self.kill_mode,
                restart: self.restart,
                notify_access: self.notify_access,
                probe_delay: self.probe_delay.unwrap_or(Duration::ZERO),
                probe_interval: self.probe_interval.unwrap_or(DEFAULT_PROBE_INTERVAL),
                watchdog: self.watchdog,
                workers: self.workers as usize,
                reload_strategy: self.reload_strategy,
                max_draining: self.max_draining,
                lazy: self.lazy,
                flow_steering: flow_steering.then_some(self.flow_idle),
            },
            probe_timeout: self.probe_timeout.unwrap_or(DEFAULT_PROBE_TIMEOUT),
            name,
            pid_file: self.pid_file,
            control: self.control,
            metrics: self.metrics,
            compat_env: self.compat_env,
            accept: self.accept.then(|| AcceptConfig {
                inetd: self.inetd,
                max_connections: self.max_connections.map(|n| n as usize),
            }),
            world,
            command: self.command,
            subreaper: self.subreaper || nix::unistd::getpid().as_raw() == 1,
            death_signal: match self.on_supervisor_death {
                OnSupervisorDeath::Keep => None,
                OnSupervisorDeath::Stop => Some(self.stop_signal),
                OnSupervisorDeath::Kill => Some(Signal::SIGKILL),
            },
            upgrade_binary: self.upgrade_binary,
            fd_store: self.fd_store,
            runtime_directories,
            runtime_directory_mode: self.runtime_directory_mode,
            runtime_directory_preserve: self.runtime_directory_preserve,
            argv0: self.argv0,
        })
    }
}

/// The longest duration accepted, `100y` as humantime counts years (365.25 days). Far longer
/// than any timeout anyone means, and far shorter than what overflows a deadline: sockhold adds
/// durations to `Instant::now()`, which panicked on `--stop-timeout 18446744073709551615`.
pub const MAX_DURATION: Duration = Duration::from_secs(100 * 31_557_600);

/// A duration as a user writes it: `1m30s`, `500ms`.
fn compact(duration: Duration) -> String {
    humantime::format_duration(duration).to_string().replace(' ', "")
}

/// Parses `500ms`, `2s`, `1m30s`, `1h`; a bare number is seconds, as in systemd. At most
/// [`MAX_DURATION`].
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let duration = match text.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => humantime::parse_duration(text)
            .map_err(|e| format!("'{text}' is not a duration ({e}); use e.g. 500ms, 2s, 1m30s"))?,
    };
    if duration > MAX_DURATION {
        return Err(format!("'{text}' is too long a duration: at most 100y"));
    }
    Ok(duration)
}

/// A `--runtime-directory`: a relative path below /run, without `..`.
fn parse_runtime_directory(text: &str) -> Result<PathBuf, String> {
    if text.is_empty()
        || text.starts_with('/')
        || text.split('/').any(|p| p.is_empty() || p == "." || p == "..")
    {
        return Err(format!(
            "'{text}' must be a relative path below /run, such as 'app' or 'app/sub'"
        ));
    }
    Ok(PathBuf::from(text))
}

/// An octal mode such as `0755`.
fn parse_octal_mode(text: &str) -> Result<u32, String> {
    match u32::from_str_radix(text, 8) {
        Ok(mode) if mode <= 0o7777 => Ok(mode),
        _ => Err(format!("'{text}' is not an octal mode such as 0755")),
    }
}

/// The wait between probes unless --probe-interval says otherwise.
pub const DEFAULT_PROBE_INTERVAL: Duration = Duration::from_millis(200);
/// How long one probe may take unless --probe-timeout says otherwise.
pub const DEFAULT_PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Parses `notify`, `delay:DUR`, `http:PATH` or `exec:CMD`.
pub fn parse_ready(text: &str) -> Result<ReadyMode, String> {
    const MODES: &str = "use notify, delay:DUR, http:PATH or exec:CMD";
    match text.split_once(':') {
        None if text == "notify" => Ok(ReadyMode::Notify),
        Some(("delay", dur)) => parse_duration(dur).map(ReadyMode::Delay),
        Some(("http", path)) => {
            if !path.starts_with('/') {
                return Err(format!("invalid ready mode '{text}': the path must start with '/'"));
            }
            if path.chars().any(|c| c.is_ascii_whitespace() || c.is_ascii_control()) {
                return Err(format!(
                    "invalid ready mode '{text}': the path must not contain spaces or control characters"
                ));
            }
            Ok(ReadyMode::Http(path.to_string()))
        }
        Some(("exec", command)) => match split_command(command) {
            Ok(argv) if argv.is_empty() => {
                Err(format!("invalid ready mode '{text}': the command is empty"))
            }
            Ok(argv) => Ok(ReadyMode::Exec(argv)),
            Err(e) => Err(format!("invalid ready mode '{text}': {e}")),
        },
        _ => Err(format!("'{text}' is not a ready mode; {MODES}")),
    }
}

/// Splits a command line into words as a POSIX shell would, without expanding anything:
/// blanks separate words, `'...'` is literal, `"..."` keeps blanks and takes `\"`, `\\`, `\$`
/// and `` \` `` as escapes, and `\` outside quotes escapes the next character.
pub fn split_command(text: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut word: Option<String> = None;
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            ' ' | '\t' | '\n' => {
                if let Some(w) = word.take() {
                    words.push(w);
                }
            }
            '\'' => {
                let w = word.get_or_insert_with(String::new);
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => w.push(c),
                        None => return Err("a single quote is not closed".into()),
                    }
                }
            }
            '"' => {
                let w = word.get_or_insert_with(String::new);
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c @ ('"' | '\\' | '$' | '`')) => w.push(c),
                            Some(c) => {
                                w.push('\\');
                                w.push(c);
                            }
                            None => return Err("a double quote is not closed".into()),
                        },
                        Some(c) => w.push(c),
                        None => return Err("a double quote is not closed".into()),
                    }
                }
            }
            '\\' => match chars.next() {
                Some(c) => word.get_or_insert_with(String::new).push(c),
                None => return Err("the command ends with a lone backslash".into()),
            },
            c => word.get_or_insert_with(String::new).push(c),
        }
    }
    words.extend(word);
    Ok(words)
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

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("sockhold").chain(args.iter().copied()))
    }

    fn command_of(args: &[&str]) -> Vec<String> {
        let cli = parse(args).unwrap_or_else(|e| panic!("{args:?}: {}", e.render()));
        cli.command.iter().map(|w| w.to_string_lossy().into_owned()).collect()
    }

    /// An unknown option before COMMAND was taken as the command itself: sockhold bound the
    /// sockets, then failed to run `--bogus` with 127. It is a usage error naming it.
    #[test]
    fn an_unknown_option_before_the_command_is_a_usage_error() {
        for args in [
            &["-l", "127.0.0.1:80", "--bogus", "1", "--", "srv"][..],
            &["-l", "127.0.0.1:80", "--bogus", "srv"],
            &["-l", "127.0.0.1:80", "-Z", "srv"],
        ] {
            let err = parse(args).expect_err("an unknown option");
            assert_eq!(err.kind(), clap::error::ErrorKind::UnknownArgument, "{args:?}");
            let shown = if args.contains(&"-Z") { "'-Z'" } else { "'--bogus'" };
            assert!(err.render().to_string().contains(shown), "{args:?}: {}", err.render());
        }
    }

    /// Everything from COMMAND on is the server's, with or without `--`.
    #[test]
    fn the_words_after_the_command_are_the_servers() {
        for (args, want) in [
            (&["-l", "80", "--", "srv", "--flag"][..], &["srv", "--flag"][..]),
            (&["-l", "80", "srv", "--flag", "-l", "x"], &["srv", "--flag", "-l", "x"]),
            (&["-l", "80", "srv", "--", "x"], &["srv", "--", "x"]),
            (&["-l", "80", "--", "-weird", "-v"], &["-weird", "-v"]),
            (&["-l", "80", "--name", "x", "srv", "--name", "y"], &["srv", "--name", "y"]),
        ] {
            assert_eq!(command_of(args), want, "{args:?}");
        }
    }

    /// `--control` and `--timeout` are taken before or after the request.
    #[test]
    fn ctl_options_go_before_or_after_the_request() {
        for args in [
            &["ctl", "--control", "/c", "status", "--json"][..],
            &["ctl", "status", "--control", "/c", "--json"],
            &["ctl", "status", "--json", "--control", "/c"],
        ] {
            let cli = parse(args).unwrap_or_else(|e| panic!("{args:?}: {}", e.render()));
            let Some(Sub::Ctl(mut ctl)) = cli.ctl else { panic!("{args:?}: not ctl") };
            ctl.resolve().unwrap();
            assert_eq!(ctl.control, PathBuf::from("/c"), "{args:?}");
            assert!(matches!(ctl.request, CtlRequest::Status { json: true }), "{args:?}");
        }
        let cli = parse(&["ctl", "reload", "--timeout", "5s", "--control", "/c"]).unwrap();
        let Some(Sub::Ctl(ctl)) = cli.ctl else { panic!("not ctl") };
        assert_eq!(ctl.timeout, Duration::from_secs(5));
    }

    /// `ctl --help` shows --control as an option (it may come from SOCKHOLD_CONTROL), and
    /// leaving it out altogether says how to give it.
    #[test]
    fn ctl_without_a_control_socket_says_how_to_give_one() {
        use clap::CommandFactory;
        let mut command = Cli::command();
        let help = command.find_subcommand_mut("ctl").unwrap().render_help().to_string();
        assert!(help.contains("SOCKHOLD_CONTROL"), "{help}");
        let usage = help.lines().find(|l| l.starts_with("Usage:")).unwrap();
        assert!(!usage.contains("--control <PATH>"), "shown as required: {usage}");
        if std::env::var_os("SOCKHOLD_CONTROL").is_none() {
            let Some(Sub::Ctl(mut ctl)) = parse(&["ctl", "status"]).unwrap().ctl else { panic!() };
            let err = ctl.resolve().unwrap_err();
            assert!(err.contains("--control PATH") && err.contains("SOCKHOLD_CONTROL"), "{err}");
        }
    }

    /// A delay the ready timeout always cuts short makes every start and reload fail.
    #[test]
    fn a_ready_delay_not_shorter_than_the_ready_timeout_is_refused() {
        let config = |args: &[&str]| {
            let mut all = vec!["-l", "127.0.0.1:0"];
            all.extend_from_slice(args);
            all.push("srv");
            parse(&all).unwrap().into_config()
        };
        for (args, names) in [
            (&["--ready", "delay:60s"][..], ["delay:1m", "--ready-timeout 1m"]),
            (&["--ready", "delay:90s", "--ready-timeout", "1m30s"], ["delay:1m30s ", "1m30s:"]),
            (&["--ready", "delay:5s", "--ready-timeout", "2s"], ["delay:5s", "--ready-timeout 2s"]),
        ] {
            let err = config(args).unwrap_err();
            for name in names {
                assert!(err.contains(name), "{args:?}: {name} not in {err}");
            }
        }
        assert!(config(&["--ready", "delay:59s"]).is_ok());
        assert!(config(&["--ready", "notify", "--ready-timeout", "1s"]).is_ok());
    }

    /// `--flow-idle` reaches the machine only when a listener is steered; `steer=flow` does not go
    /// with `--lazy` or `--accept`.
    #[test]
    fn flow_idle_and_steer_flow() {
        let config = |args: &[&str]| {
            let mut all = args.to_vec();
            all.push("srv");
            parse(&all).map_err(|e| e.to_string()).and_then(Cli::into_config)
        };
        let steering = |args: &[&str]| config(args).unwrap().policy.flow_steering;
        assert_eq!(steering(&["-l", "udp://127.0.0.1:0"]), None);
        assert_eq!(steering(&["-l", "udp://127.0.0.1:0", "--flow-idle", "1s"]), None);
        let steered = ["-l", "127.0.0.1:0", "-l", "udp://127.0.0.1:0,steer=flow"];
        assert_eq!(steering(&steered), Some(Duration::from_secs(10)));
        let args = [&steered[..], &["--flow-idle", "250ms"]].concat();
        assert_eq!(steering(&args), Some(Duration::from_millis(250)));
        for flag in ["--lazy", "--accept"] {
            let err = config(&["-l", "udp://127.0.0.1:0,steer=flow", flag]).unwrap_err();
            assert!(err.contains("'udp://127.0.0.1:0,steer=flow'") && err.contains(flag), "{err}");
        }
        let err = config(&["-l", "127.0.0.1:8080,steer=flow"]).unwrap_err();
        assert!(
            err.contains("'127.0.0.1:8080,steer=flow': steer=flow is for UDP sockets only"),
            "{err}"
        );
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

    /// Found by src/fuzz.rs (its first failing input was 9223372036854769541): these parsed,
    /// and sockhold then panicked adding them to `Instant::now()` for a deadline.
    #[test]
    fn durations_too_long_for_a_deadline_are_refused() {
        for huge in
            ["9223372036854769541", "18446744073709551615", "584542046090y", "213503982334601d"]
        {
            let err = parse_duration(huge).unwrap_err();
            assert!(err.contains(&format!("'{huge}' is too long a duration")), "{huge}: {err}");
        }
        assert_eq!(parse_duration("100y"), Ok(MAX_DURATION));
        assert_eq!(parse_duration("3155760000"), Ok(MAX_DURATION));
        assert!(parse_duration("3155760001").unwrap_err().contains("at most 100y"));
        assert!(parse_ready("delay:18446744073709551615").unwrap_err().contains("at most 100y"));
    }

    #[test]
    fn ready_modes() {
        assert_eq!(parse_ready("notify"), Ok(ReadyMode::Notify));
        assert_eq!(parse_ready("http:/healthz"), Ok(ReadyMode::Http("/healthz".into())));
        assert_eq!(parse_ready("http:/h?x=1"), Ok(ReadyMode::Http("/h?x=1".into())));
        assert!(parse_ready("http:healthz").unwrap_err().contains("must start with '/'"));
        assert!(parse_ready("http:/a b").unwrap_err().contains("spaces"));
        assert_eq!(
            parse_ready("exec:curl -fs 'http://x/ a'"),
            Ok(ReadyMode::Exec(vec!["curl".into(), "-fs".into(), "http://x/ a".into()]))
        );
        assert!(parse_ready("exec:").unwrap_err().contains("the command is empty"));
        assert!(parse_ready("exec:sh -c 'x").unwrap_err().contains("single quote is not closed"));
        assert!(parse_ready("probe:x").unwrap_err().contains("is not a ready mode"));
        assert_eq!(parse_ready("delay:250ms"), Ok(ReadyMode::Delay(Duration::from_millis(250))));
        assert!(parse_ready("delay:x").unwrap_err().contains("'x' is not a duration"));
        assert!(parse_ready("sleep").unwrap_err().contains("'sleep' is not a ready mode"));
    }

    #[test]
    fn split_command_table() {
        let ok: &[(&str, &[&str])] = &[
            ("a b  c", &["a", "b", "c"]),
            ("  lead trail  ", &["lead", "trail"]),
            ("sh -c 'test -e \"$X\"'", &["sh", "-c", "test -e \"$X\""]),
            ("a\\ b", &["a b"]),
            ("\"x \\\"y\\\" \\n\"", &["x \"y\" \\n"]),
            ("''", &[""]),
            ("a''b", &["ab"]),
            ("", &[]),
        ];
        for (input, want) in ok {
            let want: Vec<String> = want.iter().map(|w| w.to_string()).collect();
            assert_eq!(split_command(input), Ok(want), "{input:?}");
        }
        for bad in ["'open", "\"open", "trailing\\", "\"esc\\"] {
            assert!(split_command(bad).is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn compat_env_nginx_makes_every_listener_non_blocking() {
        use clap::Parser;
        let config = |extra: &[&str]| {
            let mut argv = vec!["sockhold", "-l", "127.0.0.1:0", "-l", "/tmp/x.sock"];
            argv.extend_from_slice(extra);
            argv.extend(["--", "nginx"]);
            Cli::try_parse_from(argv).unwrap().into_config().unwrap()
        };
        let modes = |c: &Config| c.listen.iter().map(|l| l.options.nonblock).collect::<Vec<_>>();
        assert_eq!(modes(&config(&[])), [false, false]);
        assert_eq!(modes(&config(&["--compat-env", "einhorn"])), [false, false]);
        let nginx = config(&["--compat-env", "einhorn,nginx"]);
        assert_eq!(modes(&nginx), [true, true]);
        assert_eq!(nginx.compat_env, [CompatEnv::Einhorn, CompatEnv::Nginx]);
    }
}

//! What a child is started with: its argv, its environment and which fds it gets, assembled
//! from plain inputs. Pure: no syscalls, no clock, no files; everything it needs (the inherited
//! environment, the listeners' names and bound addresses, the generation, the notify socket's
//! path, sockhold's pid) is handed in, so every variable is unit-tested here.
//!
//! It owns the socket-activation protocol as the child sees it (`LISTEN_FDS`, `LISTEN_FDNAMES`,
//! `NOTIFY_SOCKET`, `WATCHDOG_USEC`, `FDSTORE`, `SOCKHOLD_GENERATION`, and the fd store's fds
//! after the sockets), the variables of `--compat-env`,
//! those of a connection's child with `--accept`, and which inherited variables never reach a
//! child. `--user`, `--chdir`, `--env` and `--env-file` are applied afterwards, by
//! [`crate::child_env::ChildWorld::apply`], which reads files and the user database.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use crate::cli::CompatEnv;
use crate::spawn::ChildSpec;

/// Environment variables of sockhold's own that must not reach a child: they describe sockhold's
/// sockets and manager, not the child's (a stale `LISTEN_PIDFDID` makes libsystemd ignore every
/// socket; a stale `NOTIFY_SOCKET` would let the child speak for sockhold).
/// The same goes for the variables of other socket-passing tools, which would name fds the child
/// does not have, and for the size of sockhold's own manager's fd store (`FDSTORE`): the child's
/// store is sockhold's, whose size `--fd-store` sets.
pub fn is_stripped(name: &str) -> bool {
    name.starts_with("LISTEN_")
        || name == "NOTIFY_SOCKET"
        || name == "FDSTORE"
        || name.starts_with("WATCHDOG_")
        || name.starts_with("EINHORN_")
        || name.starts_with("SERVER_STARTER_")
        || name == "NGINX"
        || name.starts_with("SOCKHOLD_UPGRADE_")
}

/// The part of sockhold's own environment every child inherits: `vars` without what
/// [`is_stripped`] names.
pub fn base_env(vars: impl IntoIterator<Item = (OsString, OsString)>) -> Vec<(OsString, OsString)> {
    vars.into_iter().filter(|(k, _)| !is_stripped(&k.to_string_lossy())).collect()
}

/// What the child's environment says of one held listener.
#[derive(Clone, Copy, Debug)]
pub struct Socket<'a> {
    /// Its name, for `LISTEN_FDNAMES`.
    pub name: &'a str,
    /// The address as `--listen` gave it (options left out), for `SERVER_STARTER_PORT`.
    pub given: &'a str,
    /// The address it is bound to, as `status` shows it.
    pub bound: &'a str,
}

/// What an fd from 3 on is, in a generation's child.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fd {
    /// The held listener at this index.
    Listener(usize),
    /// The child's private health listener (`--ready http:`).
    Health,
    /// The fd store's fd at this index (newest first).
    Stored(usize),
}

/// The command and what sockhold adds to the environment of every child.
#[derive(Clone, Copy, Debug)]
pub struct Command<'a> {
    /// argv; never empty.
    pub argv: &'a [OsString],
    /// sockhold's environment, stripped ([`base_env`]).
    pub base_env: &'a [(OsString, OsString)],
    /// The argv[0] the child sees, if not `argv[0]` (`--argv0`).
    pub argv0: Option<&'a OsString>,
}

impl Command<'_> {
    /// COMMAND with `env` added to the base environment; `--user` and `--chdir` are added by
    /// [`crate::child_env::ChildWorld::apply`].
    fn spec(&self, env: Vec<(OsString, OsString)>, listen_pid: bool, watchdog: bool) -> ChildSpec {
        let mut all = self.base_env.to_vec();
        all.extend(env);
        let mut args = self.argv.to_vec();
        if let Some(argv0) = self.argv0 {
            args[0] = argv0.clone();
        }
        ChildSpec {
            program: self.argv[0].clone(),
            args,
            env: all,
            listen_pid,
            watchdog_pid: watchdog,
            user: None,
            chdir: None,
        }
    }
}

/// What a unit of a generation is started with.
#[derive(Clone, Copy, Debug)]
pub struct Generation<'a> {
    /// The held listeners, in fd order from 3.
    pub sockets: &'a [Socket<'a>],
    /// The generation's number.
    pub generation: u64,
    /// The unit's private notify socket.
    pub notify_path: &'a Path,
    /// Whether it gets a private health listener, after the held ones.
    pub health: bool,
    /// `--watchdog`.
    pub watchdog: Option<Duration>,
    /// `--compat-env`.
    pub compat: &'a [CompatEnv],
    /// sockhold's pid (`EINHORN_MASTER_PID`).
    pub supervisor_pid: u32,
    /// `--fd-store`: the most the store holds (0: off).
    pub fd_store_max: usize,
    /// The fd store's names, newest first.
    pub stored: &'a [&'a str],
}

/// A generation's child: its spec, and the fds it gets from 3 on, in order: the listeners, the
/// health listener, then the fd store's fds (counted in `LISTEN_FDS` and named in
/// `LISTEN_FDNAMES` as systemd passes its store after the sockets).
pub fn generation(command: Command<'_>, g: Generation<'_>) -> (ChildSpec, Vec<Fd>) {
    let mut fds: Vec<Fd> = (0..g.sockets.len()).map(Fd::Listener).collect();
    let mut names: Vec<&str> = g.sockets.iter().map(|s| s.name).collect();
    if g.health {
        fds.push(Fd::Health);
        names.push("health");
    }
    fds.extend((0..g.stored.len()).map(Fd::Stored));
    names.extend(g.stored);
    let mut env: Vec<(OsString, OsString)> = Vec::new();
    if !names.is_empty() {
        env.push(("LISTEN_FDS".into(), names.len().to_string().into()));
        env.push(("LISTEN_FDNAMES".into(), names.join(":").into()));
    }
    env.push(("NOTIFY_SOCKET".into(), g.notify_path.into()));
    env.push(("SOCKHOLD_GENERATION".into(), g.generation.to_string().into()));
    // As systemd says it: the store's size, so a server knows whether storing is worth it.
    if g.fd_store_max > 0 {
        env.push(("FDSTORE".into(), g.fd_store_max.to_string().into()));
    }
    if let Some(period) = g.watchdog {
        env.push(("WATCHDOG_USEC".into(), period.as_micros().to_string().into()));
    }
    env.extend(compat_env(g.compat, g.sockets, g.generation, g.supervisor_pid));
    (command.spec(env, !names.is_empty(), g.watchdog.is_some()), fds)
}

/// Where a connection's child (`--accept`) gets its connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectionFd {
    /// On fd 3, as `LISTEN_FDS=1` says (systemd's `Accept=yes`).
    Listen,
    /// On stdin and stdout (`--inetd`).
    Stdio,
}

/// The child of one accepted connection (`--accept`), of `generation`, from `peer` (TCP only).
pub fn connection(
    command: Command<'_>,
    generation: u64,
    peer: Option<SocketAddr>,
    inetd: bool,
) -> (ChildSpec, ConnectionFd) {
    let mut env: Vec<(OsString, OsString)> = Vec::new();
    if !inetd {
        env.push(("LISTEN_FDS".into(), "1".into()));
        env.push(("LISTEN_FDNAMES".into(), "connection".into()));
    }
    env.push(("SOCKHOLD_GENERATION".into(), generation.to_string().into()));
    // As systemd sets them for Accept=yes services.
    if let Some(peer) = peer {
        env.push(("REMOTE_ADDR".into(), peer.ip().to_string().into()));
        env.push(("REMOTE_PORT".into(), peer.port().to_string().into()));
    }
    let fd = if inetd { ConnectionFd::Stdio } else { ConnectionFd::Listen };
    (command.spec(env, !inetd, false), fd)
}

/// The variables of `--compat-env`: the same fds, described as other tools describe them.
pub fn compat_env(
    compat: &[CompatEnv],
    sockets: &[Socket<'_>],
    generation: u64,
    supervisor_pid: u32,
) -> Vec<(OsString, OsString)> {
    let mut env: Vec<(OsString, OsString)> = Vec::new();
    let fds: Vec<usize> = (3..3 + sockets.len()).collect();
    for compat in compat {
        match compat {
            CompatEnv::Einhorn => {
                // socketmaster sets EINHORN_FDS ("3", or "3 4 ..."); einhorn's own client
                // libraries also read EINHORN_FD_COUNT and EINHORN_FD_<i>, and check that
                // EINHORN_MASTER_PID is their parent, which sockhold is.
                let list: Vec<String> = fds.iter().map(usize::to_string).collect();
                env.push(("EINHORN_FDS".into(), list.join(" ").into()));
                env.push(("EINHORN_FD_COUNT".into(), fds.len().to_string().into()));
                for (i, fd) in fds.iter().enumerate() {
                    env.push((format!("EINHORN_FD_{i}").into(), fd.to_string().into()));
                }
                env.push(("EINHORN_MASTER_PID".into(), supervisor_pid.to_string().into()));
            }
            CompatEnv::ServerStarter => {
                // Server::Starter: "PORT=FD;HOST:PORT=FD;/path=FD", each key the address as
                // its --port gave it (a bare port stays bare), with the port really bound.
                let ports: Vec<String> = sockets
                    .iter()
                    .zip(&fds)
                    .map(|(socket, fd)| {
                        let bound = socket.bound;
                        let key = if socket.given.chars().all(|c| c.is_ascii_digit()) {
                            bound.rsplit(':').next().unwrap_or(bound)
                        } else {
                            bound
                        };
                        format!("{key}={fd}")
                    })
                    .collect();
                env.push(("SERVER_STARTER_PORT".into(), ports.join(";").into()));
                env.push(("SERVER_STARTER_GENERATION".into(), generation.to_string().into()));
            }
            CompatEnv::Nginx => env.push(("NGINX".into(), nginx_var(&fds).into())),
        }
    }
    env
}

/// The value of `NGINX` for listeners at `fds`: "3;4;", each fd followed by a `;`. nginx's
/// master splits the variable at `;` and takes only the numbers a `;` ends, so without the last
/// one it would silently leave the last socket out.
pub fn nginx_var(fds: &[usize]) -> String {
    fds.iter().map(|fd| format!("{fd};")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(list: &[(&str, &str)]) -> Vec<(OsString, OsString)> {
        list.iter().map(|(k, v)| (OsString::from(k), OsString::from(v))).collect()
    }

    /// The value of `name` in `env`, if set once; set twice is a failure.
    fn var(env: &[(OsString, OsString)], name: &str) -> Option<String> {
        let found: Vec<_> = env.iter().filter(|(k, _)| k == name).collect();
        assert!(found.len() <= 1, "{name} set {} times", found.len());
        found.first().map(|(_, v)| v.to_string_lossy().into_owned())
    }

    fn argv() -> Vec<OsString> {
        vec!["server".into(), "--flag".into()]
    }

    const HTTP: Socket<'static> = Socket { name: "http", given: "0", bound: "0.0.0.0:8080" };
    const ADMIN: Socket<'static> =
        Socket { name: "admin", given: "127.0.0.1:0", bound: "127.0.0.1:9000" };
    const UNIX: Socket<'static> =
        Socket { name: "sock", given: "/run/app.sock", bound: "/run/app.sock" };

    fn generation_of<'a>(
        sockets: &'a [Socket<'a>],
        health: bool,
        compat: &'a [CompatEnv],
    ) -> Generation<'a> {
        Generation {
            sockets,
            generation: 7,
            notify_path: Path::new("/run/sockhold-x/notify-3.sock"),
            health,
            watchdog: None,
            compat,
            supervisor_pid: 42,
            fd_store_max: 0,
            stored: &[],
        }
    }

    #[test]
    fn inherited_variables_of_socket_passing_tools_are_stripped() {
        let inherited = os(&[
            ("PATH", "/bin"),
            ("LISTEN_FDS", "2"),
            ("LISTEN_PID", "1"),
            ("LISTEN_PIDFDID", "9"),
            ("LISTEN_FDNAMES", "a:b"),
            ("NOTIFY_SOCKET", "/run/systemd/notify"),
            ("FDSTORE", "16"),
            ("WATCHDOG_USEC", "1000"),
            ("WATCHDOG_PID", "1"),
            ("EINHORN_FDS", "3"),
            ("SERVER_STARTER_PORT", "80=3"),
            ("SOCKHOLD_UPGRADE_STATE", "5"),
            ("NGINX", "3;"),
            ("NGINX_CONF", "/etc/nginx.conf"),
            ("SOCKHOLD_NAME", "kept"),
        ]);
        let kept: Vec<String> =
            base_env(inherited).iter().map(|(k, _)| k.to_string_lossy().into_owned()).collect();
        assert_eq!(kept, ["PATH", "NGINX_CONF", "SOCKHOLD_NAME"]);
    }

    #[test]
    fn a_generation_gets_its_listeners_then_its_health_listener() {
        let base = os(&[("PATH", "/bin")]);
        let argv = argv();
        let command = Command { argv: &argv, base_env: &base, argv0: None };
        let sockets = [HTTP, ADMIN];
        let (spec, fds) = generation(command, generation_of(&sockets, true, &[]));
        assert_eq!(fds, [Fd::Listener(0), Fd::Listener(1), Fd::Health]);
        assert_eq!(var(&spec.env, "LISTEN_FDS").as_deref(), Some("3"));
        assert_eq!(var(&spec.env, "LISTEN_FDNAMES").as_deref(), Some("http:admin:health"));
        assert_eq!(
            var(&spec.env, "NOTIFY_SOCKET").as_deref(),
            Some("/run/sockhold-x/notify-3.sock")
        );
        assert_eq!(var(&spec.env, "SOCKHOLD_GENERATION").as_deref(), Some("7"));
        assert_eq!(var(&spec.env, "PATH").as_deref(), Some("/bin"), "the base comes first");
        assert_eq!(var(&spec.env, "WATCHDOG_USEC"), None);
        assert!(spec.listen_pid && !spec.watchdog_pid);
        assert_eq!(
            (spec.program.as_os_str(), spec.args.as_slice()),
            (argv[0].as_os_str(), &argv[..])
        );
    }

    #[test]
    fn stored_fds_follow_the_sockets_newest_first_as_systemd_numbers_them() {
        let argv = argv();
        let command = Command { argv: &argv, argv0: None, base_env: &[] };
        let sockets = [HTTP, ADMIN];
        let stored = ["conn-2", "conn-1"];
        let mut g = generation_of(&sockets, true, &[CompatEnv::Einhorn]);
        g.fd_store_max = 4;
        g.stored = &stored;
        let (spec, fds) = generation(command, g);
        assert_eq!(
            fds,
            [Fd::Listener(0), Fd::Listener(1), Fd::Health, Fd::Stored(0), Fd::Stored(1)]
        );
        assert_eq!(var(&spec.env, "LISTEN_FDS").as_deref(), Some("5"));
        assert_eq!(
            var(&spec.env, "LISTEN_FDNAMES").as_deref(),
            Some("http:admin:health:conn-2:conn-1")
        );
        assert_eq!(var(&spec.env, "FDSTORE").as_deref(), Some("4"));
        // Other tools' variables describe the listeners only.
        assert_eq!(var(&spec.env, "EINHORN_FDS").as_deref(), Some("3 4"));

        // A store alone is still fds to hand over; an empty one on is only FDSTORE=.
        let mut g = generation_of(&[], false, &[]);
        g.fd_store_max = 1;
        g.stored = &stored[..1];
        let (spec, fds) = generation(command, g);
        assert_eq!(fds, [Fd::Stored(0)]);
        assert_eq!(var(&spec.env, "LISTEN_FDNAMES").as_deref(), Some("conn-2"));
        assert!(spec.listen_pid);
        g.stored = &[];
        let (spec, fds) = generation(command, g);
        assert!(fds.is_empty() && !spec.listen_pid);
        assert_eq!(var(&spec.env, "FDSTORE").as_deref(), Some("1"));
        assert_eq!(var(&spec.env, "LISTEN_FDS"), None);
        // Off: no FDSTORE at all.
        let (spec, _) = generation(command, generation_of(&sockets, false, &[]));
        assert_eq!(var(&spec.env, "FDSTORE"), None);
    }

    #[test]
    fn no_listen_variables_without_listeners() {
        let argv = argv();
        let command = Command { argv: &argv, base_env: &[], argv0: None };
        let mut g = generation_of(&[], false, &[]);
        g.watchdog = Some(Duration::from_millis(1500));
        let (spec, fds) = generation(command, g);
        assert!(fds.is_empty());
        assert!(spec.env.iter().all(|(k, _)| !k.to_string_lossy().starts_with("LISTEN_")));
        assert!(!spec.listen_pid, "no LISTEN_PID when there is nothing to hand over");
        assert!(var(&spec.env, "NOTIFY_SOCKET").is_some());
        assert_eq!(var(&spec.env, "WATCHDOG_USEC").as_deref(), Some("1500000"));
        assert!(spec.watchdog_pid);
        // A health listener alone is still a socket to hand over.
        let (spec, fds) = generation(command, generation_of(&[], true, &[]));
        assert_eq!(fds, [Fd::Health]);
        assert_eq!(var(&spec.env, "LISTEN_FDNAMES").as_deref(), Some("health"));
        assert!(spec.listen_pid);
    }

    #[test]
    fn compat_env_formats() {
        let sockets = [HTTP, ADMIN, UNIX];
        let all = [CompatEnv::Einhorn, CompatEnv::ServerStarter, CompatEnv::Nginx];
        let env = compat_env(&all, &sockets, 4, 42);
        let expected = os(&[
            ("EINHORN_FDS", "3 4 5"),
            ("EINHORN_FD_COUNT", "3"),
            ("EINHORN_FD_0", "3"),
            ("EINHORN_FD_1", "4"),
            ("EINHORN_FD_2", "5"),
            ("EINHORN_MASTER_PID", "42"),
            // A bare port stays bare; an address is the bound one.
            ("SERVER_STARTER_PORT", "8080=3;127.0.0.1:9000=4;/run/app.sock=5"),
            ("SERVER_STARTER_GENERATION", "4"),
            ("NGINX", "3;4;5;"),
        ]);
        assert_eq!(env, expected);
        assert!(compat_env(&[], &sockets, 4, 42).is_empty());
        // They follow sockhold's own variables in a generation's environment.
        let argv = argv();
        let command = Command { argv: &argv, base_env: &[], argv0: None };
        let (spec, _) = generation(command, generation_of(&sockets, false, &[CompatEnv::Nginx]));
        assert_eq!(var(&spec.env, "NGINX").as_deref(), Some("3;4;5;"));
    }

    #[test]
    fn nginx_var_ends_every_fd_with_a_semicolon() {
        assert_eq!(nginx_var(&[3]), "3;");
        assert_eq!(nginx_var(&[3, 4, 5]), "3;4;5;");
        assert_eq!(nginx_var(&[]), "");
    }

    #[test]
    fn a_connection_child_on_fd_3_or_on_stdio() {
        let base = os(&[("PATH", "/bin")]);
        let argv = argv();
        let command = Command { argv: &argv, base_env: &base, argv0: None };
        let peer: SocketAddr = "192.0.2.1:5555".parse().unwrap();
        let (spec, fd) = connection(command, 3, Some(peer), false);
        assert_eq!(fd, ConnectionFd::Listen);
        assert_eq!(var(&spec.env, "LISTEN_FDS").as_deref(), Some("1"));
        assert_eq!(var(&spec.env, "LISTEN_FDNAMES").as_deref(), Some("connection"));
        assert_eq!(var(&spec.env, "SOCKHOLD_GENERATION").as_deref(), Some("3"));
        assert_eq!(var(&spec.env, "REMOTE_ADDR").as_deref(), Some("192.0.2.1"));
        assert_eq!(var(&spec.env, "REMOTE_PORT").as_deref(), Some("5555"));
        assert!(spec.listen_pid && !spec.watchdog_pid);
        assert_eq!(
            var(&spec.env, "NOTIFY_SOCKET"),
            None,
            "a connection's child has no notify socket"
        );

        let (spec, fd) = connection(command, 3, None, true);
        assert_eq!(fd, ConnectionFd::Stdio);
        assert!(spec.env.iter().all(|(k, _)| !k.to_string_lossy().starts_with("LISTEN_")));
        assert!(!spec.listen_pid);
        assert_eq!(var(&spec.env, "REMOTE_ADDR"), None, "a Unix peer has no address");
        assert_eq!(var(&spec.env, "SOCKHOLD_GENERATION").as_deref(), Some("3"));
    }
}

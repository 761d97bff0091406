# Print an optspec for argparse to handle cmd's options that are independent of any subcommand.
function __fish_sockhold_global_optspecs
    string join \n l/listen= ready= ready-timeout= probe-delay= probe-interval= probe-timeout= watchdog= workers= reload-strategy= stop-signal= stop-timeout= kill-mode= max-draining= flow-idle= restart= notify-access= fd-store= name= accept inetd max-connections= lazy compat-env= control= metrics= pid-file= user= chdir= env= env-file= subreaper on-supervisor-death= upgrade-binary= unit= print-config runtime-directory= runtime-directory-mode= runtime-directory-preserve argv0= v/verbose q/quiet log-format= h/help V/version
end

function __fish_sockhold_needs_command
    # Figure out if the current invocation already has a command.
    set -l cmd (commandline -opc)
    set -e cmd[1]
    argparse -s (__fish_sockhold_global_optspecs) -- $cmd 2>/dev/null
    or return
    if set -q argv[1]
        # Also print the command, so this can be used to figure out what it is.
        echo $argv[1]
        return 1
    end
    return 0
end

function __fish_sockhold_using_subcommand
    set -l cmd (__fish_sockhold_needs_command)
    test -z "$cmd"
    and return 1
    contains -- $cmd[1] $argv
end

complete -c sockhold -n "__fish_sockhold_needs_command" -s l -l listen -d 'A socket to bind and hand over: a port (8080), ADDR:PORT (127.0.0.1:8080, [::1]:8080), tcp://, tcp4://, tcp6://, udp://, udp4://, udp6://HOST:PORT, a Unix socket (/run/app.sock, unix://, unixgram://, unixpacket:// with /PATH or @ABSTRACT), or an inherited one to adopt (fd://N, systemd://NAME). Options follow after commas: name=, backlog=, v6only=, reuseport, freebind, device=, nodelay, keepalive, rcvbuf=, sndbuf=, mode=, owner=, group=, nonblock, steer=flow (UDP: each unit its own socket, flows kept on it across reloads). Repeatable: the order is the fd order (3, 4, ...). Without any, sockhold adopts every socket it was itself given under socket activation' -r
complete -c sockhold -n "__fish_sockhold_needs_command" -l ready -d 'How a new child proves it is ready: `notify` (it sends READY=1 to $NOTIFY_SOCKET), `delay:DUR` (it is still running after DUR), `http:PATH` (GET PATH on its private `health` listener, the fd after the --listen ones, answers 2xx) or `exec:CMD` (CMD, split into words as a shell would but run without one, exits 0; it gets SOCKHOLD_CHILD_PID and SOCKHOLD_GENERATION). Probes are retried per --probe-delay, --probe-interval and --probe-timeout until --ready-timeout' -r
complete -c sockhold -n "__fish_sockhold_needs_command" -l ready-timeout -d 'A new child that is not ready by then is killed; the old one keeps serving' -r
complete -c sockhold -n "__fish_sockhold_needs_command" -l probe-delay -d 'With --ready http: or exec:, the wait between a child\'s start and its first probe' -r
complete -c sockhold -n "__fish_sockhold_needs_command" -l probe-interval -d 'With --ready http: or exec:, the wait between the end of a failed probe and the next' -r
complete -c sockhold -n "__fish_sockhold_needs_command" -l probe-timeout -d 'With --ready http: or exec:, how long one probe may take before it counts as failed (an exec: probe is then killed)' -r
complete -c sockhold -n "__fish_sockhold_needs_command" -l watchdog -d 'A serving child must send WATCHDOG=1 at least this often (it gets WATCHDOG_USEC and WATCHDOG_PID); on a miss it gets SIGABRT, then SIGKILL after --stop-timeout, and is restarted as after a crash. WATCHDOG=trigger fires it, WATCHDOG_USEC= changes it' -r
complete -c sockhold -n "__fish_sockhold_needs_command" -l workers -d 'Run N children per generation, all on the same sockets. A worker that crashes is replaced alone' -r
complete -c sockhold -n "__fish_sockhold_needs_command" -l reload-strategy -d 'How a reload replaces the workers: `rolling` (one new worker ready, then one old one stopped and gone, then the next: never more than N+1 alive) or `all-at-once` (N new ready, then the N old stopped)' -r -f -a "rolling\t'One new worker, ready, then one old worker stopped and gone, then the next: never more than N+1 workers of this reload alive'
all-at-once\t'N new workers; when all are ready, the N old ones are stopped'"
complete -c sockhold -n "__fish_sockhold_needs_command" -l stop-signal -d 'The signal that asks a child to stop (TERM, SIGTERM or 15; realtime ones as RTMIN+N, RTMAX-N or their numbers)' -r
complete -c sockhold -n "__fish_sockhold_needs_command" -l stop-timeout -d 'A child that has not exited this long after the stop signal gets SIGKILL, with its whole process group (see --kill-mode)' -r
complete -c sockhold -n "__fish_sockhold_needs_command" -l kill-mode -d 'Whom a stop reaches (systemd\'s KillMode=): with mixed, the stop signal goes to the child\'s main process and SIGKILL to its process group, at --stop-timeout and to what is left of the group once the main process ends; with control-group, the stop signal goes to the whole group too; with process, only ever to the main process, so what it forked (an sshd\'s sessions) runs on after it' -r -f -a "control-group\t'The stop signal to the child\'s whole process group; SIGKILL to the group at the stop timeout, and to what is left of it once the main process has ended'
mixed\t'The stop signal to the main process; SIGKILL to the process group at the stop timeout, and to what is left of it once the main process has ended'
process\t'Only the main process is ever signalled: what it forked (an sshd\'s sessions, say) runs on after it ends, re-parented (to sockhold with `--subreaper` or as PID 1)'"
complete -c sockhold -n "__fish_sockhold_needs_command" -l max-draining -d 'At most N old generations drain at once (stopped but still finishing their connections): when a reload would leave more, the oldest is SIGKILLed early with its process group. Bounds what quick successive reloads leave behind when clients hold connections open' -r
complete -c sockhold -n "__fish_sockhold_needs_command" -l flow-idle -d 'With a `steer=flow` listener: a replaced generation that still owns flows gets its stop signal only once none of them has had a datagram for DUR (one that owns none is stopped at once; at shutdown every generation is stopped at once)' -r
complete -c sockhold -n "__fish_sockhold_needs_command" -l restart -d 'What to do when the serving child exits by itself: restart it (with backoff from 100ms to 30s) unless it exited 0, always restart it, or never (sockhold ends with its status)' -r -f -a "on-failure\t'Restart unless it exited with status 0'
always\t'Always restart'
never\t'Never restart: sockhold ends with the child\'s status'"
complete -c sockhold -n "__fish_sockhold_needs_command" -l notify-access -d 'Whose notify messages count: the child\'s main process, any process in its process group, or anyone who can reach the socket' -r -f -a "main\t'Only the child\'s main process'
group\t'Any process in the child\'s process group'
all\t'Any process that can reach the socket'"
complete -c sockhold -n "__fish_sockhold_needs_command" -l fd-store -d 'Keep up to N fds that children hand over with sd_notify FDSTORE=1 (systemd\'s fd store, FileDescriptorStoreMax=), named by FDNAME=, and pass them to every later generation after its sockets (in LISTEN_FDS and LISTEN_FDNAMES, newest first), with FDSTORE=N in its environment. FDSTOREREMOVE=1 closes a name\'s fds; a stored fd that hangs up is closed unless stored with FDPOLL=0. The store survives reloads, restarts and upgrades and closes when sockhold stops. 0: off, fds sent are closed' -r
complete -c sockhold -n "__fish_sockhold_needs_command" -l name -d 'The instance name, used in logs, as the default LISTEN_FDNAMES entry and in runtime paths [default: the basename of COMMAND]' -r
complete -c sockhold -n "__fish_sockhold_needs_command" -l max-connections -d 'With --accept: at most N children at once; further connections wait in the backlog' -r
complete -c sockhold -n "__fish_sockhold_needs_command" -l compat-env -d 'Also hand the sockets over the way other tools do, so servers written for them move over unchanged: `einhorn` (EINHORN_FDS as socketmaster sets it, plus EINHORN_FD_COUNT, EINHORN_FD_<i> and EINHORN_MASTER_PID as einhorn does), `server-starter` (SERVER_STARTER_PORT and SERVER_STARTER_GENERATION as Server::Starter sets them) and/or `nginx` (NGINX=3;4;...; as nginx\'s binary upgrade sets it, so a new nginx master serves the inherited sockets). `nginx` also makes every listener non-blocking (as if each had `nonblock`): nginx never sets O_NONBLOCK on an inherited socket itself' -r -f -a "einhorn\t'socketmaster\'s and einhorn\'s EINHORN_FDS'
server-starter\t'Server::Starter\'s SERVER_STARTER_PORT'
nginx\t'nginx\'s NGINX (the listeners nginx\'s master inherits at a binary upgrade)'"
complete -c sockhold -n "__fish_sockhold_needs_command" -l control -d 'Serve the JSON-lines control protocol on a Unix socket at PATH (mode 0600, in a directory owned by root or sockhold\'s user that no one else can write to, /tmp included; only root and sockhold\'s own user may use it), for `sockhold ctl`' -r -F
complete -c sockhold -n "__fish_sockhold_needs_command" -l metrics -d 'Serve `GET /metrics` in the Prometheus text format on ADDR: IP:PORT (such as 127.0.0.1:9101), or the path of a Unix socket (mode 0600, in a directory checked as --control\'s is). Answered from the event loop: an idle sockhold still never wakes' -r
complete -c sockhold -n "__fish_sockhold_needs_command" -l pid-file -d 'Write sockhold\'s own pid to PATH (in a directory owned by root or sockhold\'s user that no one else can write to, or a sticky one such as /tmp); removed at exit if still ours' -r -F
complete -c sockhold -n "__fish_sockhold_needs_command" -l user -d 'Run the children as USER (a name or uid) with its primary group, or GROUP (a name or gid), and its supplementary groups: setgroups, setgid, setuid in that order, in the child only. sockhold keeps its own rights and binds the sockets itself. Looked up again at every spawn' -r
complete -c sockhold -n "__fish_sockhold_needs_command" -l chdir -d 'The children\'s working directory, entered after the --user change (so with the user\'s rights). A relative COMMAND path is then found from DIR' -r -F
complete -c sockhold -n "__fish_sockhold_needs_command" -l env -d 'Set K=V in the children\'s environment; repeatable. Wins over --env-file and sockhold\'s own environment. LISTEN_*, NOTIFY_SOCKET, FDSTORE, SOCKHOLD_* and WATCHDOG_* are sockhold\'s' -r
complete -c sockhold -n "__fish_sockhold_needs_command" -l env-file -d 'Add the KEY=VALUE lines of PATH to the children\'s environment (systemd\'s EnvironmentFile= syntax: # and ; comments, optional `export`, quoted values); repeatable, later files win. Read again at every reload; a bad file fails that reload. -PATH: a missing file is no error' -r
complete -c sockhold -n "__fish_sockhold_needs_command" -l on-supervisor-death -d 'What the children do if sockhold itself dies without stopping them (SIGKILL, the OOM killer): `keep` serving on the sockets they hold until someone stops them, `stop` (they get --stop-signal) or `kill` (they get SIGKILL). A self-upgrade is not a death' -r -f -a "keep\t'Keep serving on the sockets they hold (they have their own copies)'
stop\t'Get the --stop-signal from the kernel (PR_SET_PDEATHSIG)'
kill\t'Get SIGKILL from the kernel (PR_SET_PDEATHSIG)'"
complete -c sockhold -n "__fish_sockhold_needs_command" -l upgrade-binary -d 'The program SIGUSR2 and `ctl upgrade` re-execute in place (same pid, sockets and children kept) [default: the path sockhold was started from]' -r -F
complete -c sockhold -n "__fish_sockhold_needs_command" -l unit -d 'Read the listeners and the service from a systemd unit: a `.socket` (with the service it activates: Service=, else NAME.service, or NAME@.service with Accept=yes) or a `.service` alone, each with its drop-ins (NAME.d/*.conf), from PATH\'s directory or /etc/systemd/system, /run/systemd/system, /lib/systemd/system, /usr/lib/systemd/system. Options given here override the unit\'s (a -l replaces all its listeners, a COMMAND its ExecStart=). Directives sockhold does not apply are named in one warning at start' -r -F
complete -c sockhold -n "__fish_sockhold_needs_command" -l runtime-directory -d 'Create /run/NAME (for root; else under $XDG_RUNTIME_DIR) before the first child, owned by --user, and remove it when sockhold stops (systemd\'s RuntimeDirectory=); repeatable. The children get RUNTIME_DIRECTORY (the paths, \':\'-separated)' -r -F
complete -c sockhold -n "__fish_sockhold_needs_command" -l runtime-directory-mode -d 'The mode of the --runtime-directory directories (octal)' -r
complete -c sockhold -n "__fish_sockhold_needs_command" -l argv0 -d 'The argv[0] COMMAND sees, instead of COMMAND itself (systemd\'s `@` prefix of ExecStart=)' -r
complete -c sockhold -n "__fish_sockhold_needs_command" -l log-format -d 'How log lines look: `text` (`sockhold[PID]: message`) or `json` (one object per line with ts, level, pid, name and msg, for log shippers)' -r -f -a "text\t'`sockhold[PID]: message`, warnings and errors marked'
json\t'One JSON object per line: ts, level, pid, name, msg'"
complete -c sockhold -n "__fish_sockhold_needs_command" -l accept -d 'One child per connection (systemd\'s Accept=yes, inetd\'s nowait): sockhold accepts on the stream sockets itself and runs COMMAND with the connection as fd 3 (LISTEN_FDS=1, LISTEN_FDNAMES=connection). A reload changes what new connections run; running ones finish'
complete -c sockhold -n "__fish_sockhold_needs_command" -l inetd -d 'With --accept: the connection is the child\'s stdin and stdout instead of fd 3'
complete -c sockhold -n "__fish_sockhold_needs_command" -l lazy -d 'Start the first child only when the first connection or datagram arrives on any socket, as a systemd socket unit does; that connection waits in the backlog and is served'
complete -c sockhold -n "__fish_sockhold_needs_command" -l subreaper -d 'Adopt and reap every orphaned descendant (a daemon that double-forked, a worker whose parent died), as an init does. Automatic when sockhold runs as PID 1'
complete -c sockhold -n "__fish_sockhold_needs_command" -l print-config -d 'With --unit: print the equivalent sockhold command line (and the warning) and exit'
complete -c sockhold -n "__fish_sockhold_needs_command" -l runtime-directory-preserve -d 'Keep the --runtime-directory directories when sockhold stops'
complete -c sockhold -n "__fish_sockhold_needs_command" -s v -l verbose -d 'Log more (repeat for even more); RUST_LOG also works'
complete -c sockhold -n "__fish_sockhold_needs_command" -s q -l quiet -d 'Log less: warnings only, or errors only when repeated'
complete -c sockhold -n "__fish_sockhold_needs_command" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c sockhold -n "__fish_sockhold_needs_command" -s V -l version -d 'Print version'
complete -c sockhold -n "__fish_sockhold_needs_command" -a "ctl" -d 'Ask a running sockhold through its control socket: status, reload (waits for the outcome), stop, signal, upgrade. Exits 0 on success, 1 with the reason otherwise'
complete -c sockhold -n "__fish_sockhold_needs_command" -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c sockhold -n "__fish_sockhold_using_subcommand ctl; and not __fish_seen_subcommand_from status reload stop signal upgrade help" -l control -d 'The control socket of the sockhold to talk to (its --control); needed, from this option or the environment. Before or after the request' -r -F
complete -c sockhold -n "__fish_sockhold_using_subcommand ctl; and not __fish_seen_subcommand_from status reload stop signal upgrade help" -l timeout -d 'Give up waiting for the answer after DUR (a reload waits for the new child\'s readiness)' -r
complete -c sockhold -n "__fish_sockhold_using_subcommand ctl; and not __fish_seen_subcommand_from status reload stop signal upgrade help" -s h -l help -d 'Print help'
complete -c sockhold -n "__fish_sockhold_using_subcommand ctl; and not __fish_seen_subcommand_from status reload stop signal upgrade help" -f -a "status" -d 'Show sockhold\'s pid and version, the listeners, every generation and the last reload'
complete -c sockhold -n "__fish_sockhold_using_subcommand ctl; and not __fish_seen_subcommand_from status reload stop signal upgrade help" -f -a "reload" -d 'Start a new generation and wait until it serves (exit 0) or the reload failed (exit 1)'
complete -c sockhold -n "__fish_sockhold_using_subcommand ctl; and not __fish_seen_subcommand_from status reload stop signal upgrade help" -f -a "stop" -d 'Stop every child and sockhold itself'
complete -c sockhold -n "__fish_sockhold_using_subcommand ctl; and not __fish_seen_subcommand_from status reload stop signal upgrade help" -f -a "signal" -d 'Send a signal (USR1, SIGWINCH, 28, RTMIN+3, ...) to the serving child'
complete -c sockhold -n "__fish_sockhold_using_subcommand ctl; and not __fish_seen_subcommand_from status reload stop signal upgrade help" -f -a "upgrade" -d 'Re-execute sockhold\'s binary (or its --upgrade-binary) in place: same pid, same sockets, same children. Exits 1 with the reason if the new program is refused'
complete -c sockhold -n "__fish_sockhold_using_subcommand ctl; and not __fish_seen_subcommand_from status reload stop signal upgrade help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c sockhold -n "__fish_sockhold_using_subcommand ctl; and __fish_seen_subcommand_from status" -l control -d 'The control socket of the sockhold to talk to (its --control); needed, from this option or the environment. Before or after the request' -r -F
complete -c sockhold -n "__fish_sockhold_using_subcommand ctl; and __fish_seen_subcommand_from status" -l timeout -d 'Give up waiting for the answer after DUR (a reload waits for the new child\'s readiness)' -r
complete -c sockhold -n "__fish_sockhold_using_subcommand ctl; and __fish_seen_subcommand_from status" -l json -d 'Print the answer as sockhold sent it: one JSON object'
complete -c sockhold -n "__fish_sockhold_using_subcommand ctl; and __fish_seen_subcommand_from status" -s h -l help -d 'Print help'
complete -c sockhold -n "__fish_sockhold_using_subcommand ctl; and __fish_seen_subcommand_from reload" -l control -d 'The control socket of the sockhold to talk to (its --control); needed, from this option or the environment. Before or after the request' -r -F
complete -c sockhold -n "__fish_sockhold_using_subcommand ctl; and __fish_seen_subcommand_from reload" -l timeout -d 'Give up waiting for the answer after DUR (a reload waits for the new child\'s readiness)' -r
complete -c sockhold -n "__fish_sockhold_using_subcommand ctl; and __fish_seen_subcommand_from reload" -s h -l help -d 'Print help'
complete -c sockhold -n "__fish_sockhold_using_subcommand ctl; and __fish_seen_subcommand_from stop" -l control -d 'The control socket of the sockhold to talk to (its --control); needed, from this option or the environment. Before or after the request' -r -F
complete -c sockhold -n "__fish_sockhold_using_subcommand ctl; and __fish_seen_subcommand_from stop" -l timeout -d 'Give up waiting for the answer after DUR (a reload waits for the new child\'s readiness)' -r
complete -c sockhold -n "__fish_sockhold_using_subcommand ctl; and __fish_seen_subcommand_from stop" -s h -l help -d 'Print help'
complete -c sockhold -n "__fish_sockhold_using_subcommand ctl; and __fish_seen_subcommand_from signal" -l control -d 'The control socket of the sockhold to talk to (its --control); needed, from this option or the environment. Before or after the request' -r -F
complete -c sockhold -n "__fish_sockhold_using_subcommand ctl; and __fish_seen_subcommand_from signal" -l timeout -d 'Give up waiting for the answer after DUR (a reload waits for the new child\'s readiness)' -r
complete -c sockhold -n "__fish_sockhold_using_subcommand ctl; and __fish_seen_subcommand_from signal" -s h -l help -d 'Print help'
complete -c sockhold -n "__fish_sockhold_using_subcommand ctl; and __fish_seen_subcommand_from upgrade" -l control -d 'The control socket of the sockhold to talk to (its --control); needed, from this option or the environment. Before or after the request' -r -F
complete -c sockhold -n "__fish_sockhold_using_subcommand ctl; and __fish_seen_subcommand_from upgrade" -l timeout -d 'Give up waiting for the answer after DUR (a reload waits for the new child\'s readiness)' -r
complete -c sockhold -n "__fish_sockhold_using_subcommand ctl; and __fish_seen_subcommand_from upgrade" -s h -l help -d 'Print help'
complete -c sockhold -n "__fish_sockhold_using_subcommand ctl; and __fish_seen_subcommand_from help" -f -a "status" -d 'Show sockhold\'s pid and version, the listeners, every generation and the last reload'
complete -c sockhold -n "__fish_sockhold_using_subcommand ctl; and __fish_seen_subcommand_from help" -f -a "reload" -d 'Start a new generation and wait until it serves (exit 0) or the reload failed (exit 1)'
complete -c sockhold -n "__fish_sockhold_using_subcommand ctl; and __fish_seen_subcommand_from help" -f -a "stop" -d 'Stop every child and sockhold itself'
complete -c sockhold -n "__fish_sockhold_using_subcommand ctl; and __fish_seen_subcommand_from help" -f -a "signal" -d 'Send a signal (USR1, SIGWINCH, 28, RTMIN+3, ...) to the serving child'
complete -c sockhold -n "__fish_sockhold_using_subcommand ctl; and __fish_seen_subcommand_from help" -f -a "upgrade" -d 'Re-execute sockhold\'s binary (or its --upgrade-binary) in place: same pid, same sockets, same children. Exits 1 with the reason if the new program is refused'
complete -c sockhold -n "__fish_sockhold_using_subcommand ctl; and __fish_seen_subcommand_from help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c sockhold -n "__fish_sockhold_using_subcommand help; and not __fish_seen_subcommand_from ctl help" -f -a "ctl" -d 'Ask a running sockhold through its control socket: status, reload (waits for the outcome), stop, signal, upgrade. Exits 0 on success, 1 with the reason otherwise'
complete -c sockhold -n "__fish_sockhold_using_subcommand help; and not __fish_seen_subcommand_from ctl help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c sockhold -n "__fish_sockhold_using_subcommand help; and __fish_seen_subcommand_from ctl" -f -a "status" -d 'Show sockhold\'s pid and version, the listeners, every generation and the last reload'
complete -c sockhold -n "__fish_sockhold_using_subcommand help; and __fish_seen_subcommand_from ctl" -f -a "reload" -d 'Start a new generation and wait until it serves (exit 0) or the reload failed (exit 1)'
complete -c sockhold -n "__fish_sockhold_using_subcommand help; and __fish_seen_subcommand_from ctl" -f -a "stop" -d 'Stop every child and sockhold itself'
complete -c sockhold -n "__fish_sockhold_using_subcommand help; and __fish_seen_subcommand_from ctl" -f -a "signal" -d 'Send a signal (USR1, SIGWINCH, 28, RTMIN+3, ...) to the serving child'
complete -c sockhold -n "__fish_sockhold_using_subcommand help; and __fish_seen_subcommand_from ctl" -f -a "upgrade" -d 'Re-execute sockhold\'s binary (or its --upgrade-binary) in place: same pid, same sockets, same children. Exits 1 with the reason if the new program is refused'

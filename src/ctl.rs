//! `sockhold ctl`: the client side of the control protocol.
//!
//! It sends one request line to a running sockhold's `--control` socket, waits (up to
//! `--timeout`) for the one answer line, prints it for a person (or as JSON with `status
//! --json`), and turns `"ok"` into the exit code: 0 on success, 1 with the reason on stderr, so
//! that an init script's `reload` fails when the reload failed. Before sending, it checks with
//! `SO_PEERCRED` that the server is root or its own user, so that a socket another user put at
//! the path is refused. It must not know anything of the supervisor beyond the protocol.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use nix::sys::socket::{getsockopt, sockopt};

use crate::cli::{CtlArgs, CtlRequest};
use crate::paths::describe_uid;
use crate::protocol::{Answer, Reloaded, Request, Status};
use crate::signals::signal_name;

/// Runs one `sockhold ctl` request; the error is what to print before exiting 1.
pub fn run(args: &CtlArgs) -> Result<()> {
    let request = match &args.request {
        CtlRequest::Status { .. } => Request::Status,
        CtlRequest::Reload => Request::Reload,
        CtlRequest::Stop => Request::Stop,
        CtlRequest::Signal { signal } => Request::Signal { signal: *signal },
        CtlRequest::Upgrade => Request::Upgrade,
    };
    let line = ask(args, &request)?;
    let answer = Answer::read(&line, &request).with_context(|| {
        format!(
            "sockhold at {} sent an answer that does not parse: {:?}",
            args.control.display(),
            line.trim_end()
        )
    })?;
    let mut out = std::io::stdout().lock();
    match (&args.request, answer) {
        (_, Answer::Failed(error)) => bail!("{error}"),
        // As sent, once it is known to be a status answer.
        (CtlRequest::Status { json: true }, Answer::Status(_)) => {
            writeln!(out, "{}", line.trim_end())?
        }
        (CtlRequest::Status { json: false }, Answer::Status(status)) => {
            out.write_all(format_status(&status).as_bytes())?
        }
        // --lazy before the first connection and --accept have no serving child to name:
        // sockhold says what the reload meant instead.
        (CtlRequest::Reload, Answer::Reloaded(Reloaded { message: Some(message), .. })) => {
            writeln!(out, "{message}")?
        }
        (CtlRequest::Reload, Answer::Reloaded(Reloaded { generation, pid, .. })) => {
            let generation = generation.map_or("-".to_string(), |g| g.to_string());
            match pid.flatten() {
                Some(pid) => writeln!(out, "reloaded: generation {generation} serves (pid {pid})")?,
                None => {
                    writeln!(out, "reloaded: generation {generation} started; no child serves now")?
                }
            }
        }
        (CtlRequest::Stop, _) => writeln!(out, "stopping")?,
        (CtlRequest::Signal { signal }, Answer::Signalled(signalled)) => {
            writeln!(out, "sent SIG{} to pid {}", signal_name(*signal), signalled.pid)?
        }
        (CtlRequest::Upgrade, Answer::Upgraded(upgraded)) => writeln!(
            out,
            "upgraded in place: sockhold {} from {} runs, pid {} unchanged",
            upgraded.version, upgraded.binary, upgraded.pid
        )?,
        (_, answer) => unreachable!("Answer::read gave {answer:?} to {request:?}"),
    }
    Ok(())
}

/// Sends `request` and returns the answer line, once the server is known to be root or this
/// user.
fn ask(args: &CtlArgs, request: &Request) -> Result<String> {
    let shown = args.control.display();
    let stream = UnixStream::connect(&args.control)
        .with_context(|| format!("cannot reach sockhold at {shown}"))?;
    // Whoever bound the path answers: before a word is sent or an answer believed, it must be
    // root or this user (another user's process could stand there and say "reloaded").
    let server = getsockopt(&stream, sockopt::PeerCredentials)
        .with_context(|| format!("cannot identify the server at {shown}"))?
        .uid();
    let euid = nix::unistd::geteuid().as_raw();
    if server != 0 && server != euid {
        bail!(
            "refusing to talk to {shown}: the server there runs as {}, not as root or {}; it is not a sockhold you started",
            describe_uid(server),
            describe_uid(euid)
        );
    }
    let timeout = if args.timeout.is_zero() { None } else { Some(args.timeout) };
    stream.set_read_timeout(timeout)?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    let line = request.line();
    // A refused client (another uid, too many clients) is answered and closed at once: then
    // the write fails, but the reason is waiting to be read, and it is what the user needs.
    let sent = (&stream).write_all(line.as_bytes());
    let mut answer = String::new();
    match BufReader::new(&stream).read_line(&mut answer) {
        Ok(0) => {
            sent.with_context(|| format!("failed to send to {shown}"))?;
            bail!("sockhold at {shown} closed the connection without an answer")
        }
        Ok(_) => {}
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            bail!(
                "no answer from {shown} within {} (it may still be working: see `sockhold ctl status`)",
                humantime::format_duration(args.timeout)
            )
        }
        Err(e) => {
            sent.with_context(|| format!("failed to send to {shown}"))?;
            return Err(e).with_context(|| format!("failed to read from {shown}"));
        }
    }
    Ok(answer)
}

/// The status answer as a person reads it.
pub fn format_status(status: &Status) -> String {
    let mut out = format!(
        "sockhold {} (pid {}), instance {}, up since {}\n",
        status.version, status.pid, status.name, status.started,
    );
    for l in &status.listeners {
        out += &format!("listener fd {}: {} (name {})\n", l.fd, l.address, l.name);
    }
    if status.generations.is_empty() {
        out += "no generation is running\n";
    }
    for g in &status.generations {
        let pids: Vec<String> = g.pids.iter().map(|p| p.to_string()).collect();
        out += &format!(
            "generation {}: {}, pid {}, since {}",
            g.id,
            g.state,
            if pids.is_empty() { "-".to_string() } else { pids.join(",") },
            g.since
        );
        if let Some(flows) = g.flows {
            out += &format!(", flows {flows}");
        }
        if let Some(text) = &g.status {
            out += &format!(", status: {text}");
        }
        out.push('\n');
    }
    if let Some(store) = &status.fd_store {
        out += &format!("fd store: {} of {}", store.names.len(), store.max);
        if !store.names.is_empty() {
            out += &format!(" ({})", store.names.join(", "));
        }
        out.push('\n');
    }
    out += &format!("restarts: {}\n", status.restarts);
    out += &match &status.last_reload {
        None => "last reload: none\n".to_string(),
        Some(last) if last.ok => {
            format!("last reload: ok at {}, generation {}\n", last.at, last.generation)
        }
        Some(last) => format!(
            "last reload: failed at {}: {}\n",
            last.at,
            last.error.as_deref().unwrap_or("no reason given")
        ),
    };
    let upgrades = &status.upgrades;
    if let Some(last) = &upgrades.last {
        out += &match (last.ok, &last.version, &last.binary) {
            (true, Some(version), Some(binary)) => format!(
                "upgrades: {}, last at {} to version {version} from {binary}\n",
                upgrades.count, last.at
            ),
            (true, _, _) => format!("upgrades: {}, last at {}\n", upgrades.count, last.at),
            (false, _, _) => format!(
                "upgrades: {}, last failed at {}: {}\n",
                upgrades.count,
                last.at,
                last.error.as_deref().unwrap_or("no reason given")
            ),
        };
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn status_summary() {
        let status = json!({
            "ok": true, "pid": 10, "version": "0.1.0", "name": "web", "started": "2026-01-01T00:00:00Z",
            "listeners": [{"fd": 3, "name": "web", "address": "127.0.0.1:8080"}],
            "generations": [
                {"id": 2, "pids": [22], "state": "stopping", "since": "T2", "status": null},
                {"id": 3, "pids": [33], "state": "serving", "since": "T3", "status": "ok", "flows": 4}
            ],
            "restarts": 1,
            "last_reload": {"ok": false, "generation": 4, "error": "boom", "at": "T4"},
            "fd_store": {"max": 8, "names": ["conn-2", "conn-1"]}
        });
        let Ok(Answer::Status(status)) = Answer::read(&status.to_string(), &Request::Status) else {
            panic!("not read as a status answer: {status}");
        };
        let text = format_status(&status);
        for want in [
            "sockhold 0.1.0 (pid 10), instance web, up since 2026-01-01T00:00:00Z",
            "listener fd 3: 127.0.0.1:8080 (name web)",
            "generation 2: stopping, pid 22, since T2\n",
            "generation 3: serving, pid 33, since T3, flows 4, status: ok",
            "restarts: 1",
            "fd store: 2 of 8 (conn-2, conn-1)\n",
            "last reload: failed at T4: boom",
        ] {
            assert!(text.contains(want), "{want:?} not in:\n{text}");
        }
    }
}

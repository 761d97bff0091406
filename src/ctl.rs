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
use serde_json::{Value, json};

use crate::cli::{CtlArgs, CtlRequest};
use crate::paths::describe_uid;
use crate::supervisor::signal_name;

/// Runs one `sockhold ctl` request; the error is what to print before exiting 1.
pub fn run(args: &CtlArgs) -> Result<()> {
    let request = match &args.request {
        CtlRequest::Status { .. } => json!({ "cmd": "status" }),
        CtlRequest::Reload => json!({ "cmd": "reload" }),
        CtlRequest::Stop => json!({ "cmd": "stop" }),
        CtlRequest::Signal { signal } => json!({ "cmd": "signal", "signal": signal_name(*signal) }),
        CtlRequest::Upgrade => json!({ "cmd": "upgrade" }),
    };
    let answer = ask(args, &request)?;
    if answer["ok"] != true {
        let error = answer["error"].as_str().unwrap_or("sockhold answered without a reason");
        bail!("{error}");
    }
    let mut out = std::io::stdout().lock();
    match &args.request {
        CtlRequest::Status { json: true } => writeln!(out, "{answer}")?,
        CtlRequest::Status { json: false } => out.write_all(format_status(&answer).as_bytes())?,
        // --lazy before the first connection and --accept have no serving child to name:
        // sockhold says what the reload meant instead.
        CtlRequest::Reload => match answer["message"].as_str() {
            Some(message) => writeln!(out, "{message}")?,
            None => writeln!(
                out,
                "reloaded: generation {} serves (pid {})",
                answer["generation"], answer["pid"]
            )?,
        },
        CtlRequest::Stop => writeln!(out, "stopping")?,
        CtlRequest::Signal { signal } => {
            writeln!(out, "sent SIG{} to pid {}", signal_name(*signal), answer["pid"])?
        }
        CtlRequest::Upgrade => writeln!(
            out,
            "upgraded in place: sockhold {} from {} runs, pid {} unchanged",
            answer["version"].as_str().unwrap_or("?"),
            answer["binary"].as_str().unwrap_or("?"),
            answer["pid"]
        )?,
    }
    Ok(())
}

fn ask(args: &CtlArgs, request: &Value) -> Result<Value> {
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
    let mut line = request.to_string();
    line.push('\n');
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
    serde_json::from_str(&answer)
        .with_context(|| format!("sockhold sent a malformed answer: {answer:?}"))
}

/// The status answer as a person reads it.
pub fn format_status(status: &Value) -> String {
    let mut out = format!(
        "sockhold {} (pid {}), instance {}, up since {}\n",
        status["version"].as_str().unwrap_or("?"),
        status["pid"],
        status["name"].as_str().unwrap_or("?"),
        status["started"].as_str().unwrap_or("?"),
    );
    for l in status["listeners"].as_array().into_iter().flatten() {
        out += &format!(
            "listener fd {}: {} (name {})\n",
            l["fd"],
            l["address"].as_str().unwrap_or("?"),
            l["name"].as_str().unwrap_or("?")
        );
    }
    let generations = status["generations"].as_array().map(Vec::as_slice).unwrap_or_default();
    if generations.is_empty() {
        out += "no generation is running\n";
    }
    for g in generations {
        let pids: Vec<String> =
            g["pids"].as_array().into_iter().flatten().map(|p| p.to_string()).collect();
        out += &format!(
            "generation {}: {}, pid {}, since {}",
            g["id"],
            g["state"].as_str().unwrap_or("?"),
            if pids.is_empty() { "-".to_string() } else { pids.join(",") },
            g["since"].as_str().unwrap_or("?")
        );
        if let Some(text) = g["status"].as_str() {
            out += &format!(", status: {text}");
        }
        out.push('\n');
    }
    out += &format!("restarts: {}\n", status["restarts"]);
    let last = &status["last_reload"];
    out += &if last.is_null() {
        "last reload: none\n".to_string()
    } else if last["ok"] == true {
        format!(
            "last reload: ok at {}, generation {}\n",
            last["at"].as_str().unwrap_or("?"),
            last["generation"]
        )
    } else {
        format!(
            "last reload: failed at {}: {}\n",
            last["at"].as_str().unwrap_or("?"),
            last["error"].as_str().unwrap_or("?")
        )
    };
    let upgrades = &status["upgrades"];
    let last = &upgrades["last"];
    if last.is_object() {
        out += &if last["ok"] == true {
            format!(
                "upgrades: {}, last at {} to version {} from {}\n",
                upgrades["count"],
                last["at"].as_str().unwrap_or("?"),
                last["version"].as_str().unwrap_or("?"),
                last["binary"].as_str().unwrap_or("?")
            )
        } else {
            format!(
                "upgrades: {}, last failed at {}: {}\n",
                upgrades["count"],
                last["at"].as_str().unwrap_or("?"),
                last["error"].as_str().unwrap_or("?")
            )
        };
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_summary() {
        let status = json!({
            "ok": true, "pid": 10, "version": "0.1.0", "name": "web", "started": "2026-01-01T00:00:00Z",
            "listeners": [{"fd": 3, "name": "web", "address": "127.0.0.1:8080"}],
            "generations": [
                {"id": 2, "pids": [22], "state": "stopping", "since": "T2", "status": null},
                {"id": 3, "pids": [33], "state": "serving", "since": "T3", "status": "ok"}
            ],
            "restarts": 1,
            "last_reload": {"ok": false, "generation": 4, "error": "boom", "at": "T4"}
        });
        let text = format_status(&status);
        for want in [
            "sockhold 0.1.0 (pid 10), instance web, up since 2026-01-01T00:00:00Z",
            "listener fd 3: 127.0.0.1:8080 (name web)",
            "generation 2: stopping, pid 22, since T2\n",
            "generation 3: serving, pid 33, since T3, status: ok",
            "restarts: 1",
            "last reload: failed at T4: boom",
        ] {
            assert!(text.contains(want), "{want:?} not in:\n{text}");
        }
    }
}

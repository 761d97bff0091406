//! sockhold: holds a service's listening sockets and runs its server as a child that inherits
//! them under the systemd socket-activation protocol, reloading it without dropping a connection.
//!
//! `main` only parses the command line, starts logging, builds the config, runs the event loop
//! and exits with one code (`exit` decides which, and prints a failure once); see `supervisor`
//! for the decisions and `event_loop` for the machinery.

#![deny(unsafe_code)]

mod accept;
mod adopt;
mod child_env;
mod cli;
mod control;
mod ctl;
mod event_loop;
mod exit;
mod fd_store;
#[cfg(test)]
mod fuzz;
mod init;
mod listen;
mod metrics;
mod notify;
mod paths;
mod plan;
mod probe;
mod protocol;
mod signals;
mod spawn;
mod steer;
mod supervisor;
mod sys;
mod unit;
mod upgrade;

use std::io::Write;

use anyhow::anyhow;
use clap::Parser;

use crate::exit::{ExitCode, Failure};
use crate::upgrade::Incoming;

fn main() {
    if std::env::args_os().nth(1).is_some_and(|a| a == upgrade::CHECK_FLAG) {
        upgrade::answer_check();
    }
    let mut incoming = None;
    let code = run(&mut incoming).unwrap_or_else(|failure| match incoming.take() {
        // Exec'd by a self-upgrade and not taken over yet: the old program goes on instead.
        Some(incoming) => incoming.roll_back(&failure.reason()),
        None => failure.report(),
    });
    std::process::exit(code.0);
}

/// Parses the command line, starts logging, builds the config and runs the supervisor (or
/// `sockhold ctl`). `incoming` holds the state of the self-upgrade that exec'd this program, if
/// one did, until the event loop takes it over: a failure while it is held goes back to the
/// old program.
fn run(incoming: &mut Option<Incoming>) -> Result<ExitCode, Failure> {
    *incoming = Incoming::from_env().transpose().map_err(|e| Failure::Error(anyhow!(e)))?;
    if let Some(incoming) = incoming.as_ref().filter(|_| Incoming::is_dry_run()) {
        dry_run(incoming);
    }
    let (mut cli, warnings) = parse_command_line()?;
    init_logging(&cli);
    if !warnings.is_empty() {
        log::warn!("{}", unit_warning(&warnings));
    }
    if let Some(cli::Sub::Ctl(mut args)) = cli.ctl.take() {
        args.resolve().map_err(Failure::Usage)?;
        return ctl::run(&args).map(|()| ExitCode::SUCCESS).map_err(Failure::Error);
    }
    let config = cli.into_config().map_err(Failure::Usage)?;
    init::apply(&config).map_err(Failure::Logged)?;
    let event_loop = match incoming.take() {
        Some(incoming) => event_loop::EventLoop::resume(config, incoming),
        None => event_loop::EventLoop::new(config).map_err(Failure::Logged)?,
    };
    event_loop.run().map_err(Failure::Logged)
}

/// A dry run before a self-upgrade: reads the command line and the state as a takeover would,
/// touches nothing, answers and exits; any failure is an error and exit status 1.
fn dry_run(incoming: &upgrade::Incoming) -> ! {
    let fail = |why: String| -> ! {
        eprintln!("sockhold[{}]: error: dry run: {why}", std::process::id());
        upgrade::answer_dry_run(Err(why))
    };
    let (cli, _) = parse_command_line().unwrap_or_else(|e| match e {
        Failure::CommandLine(e) => {
            fail(format!("the command line: {}", e.render().to_string().trim()))
        }
        Failure::Usage(e) => fail(format!("the command line: {e}")),
        other => fail(other.reason()),
    });
    let config = cli.into_config().unwrap_or_else(|e| fail(format!("the command line: {e}")));
    match event_loop::EventLoop::dry_run(config, incoming) {
        Ok(()) => upgrade::answer_dry_run(Ok(())),
        Err(e) => fail(e),
    }
}

/// Parses the command line, with the units of `--unit` read into it (their warnings are
/// returned). `--print-config` prints the equivalent command line and exits here.
fn parse_command_line() -> Result<(cli::Cli, Vec<String>), Failure> {
    let expanded = unit::expand(std::env::args_os().collect()).map_err(|e| match e {
        unit::Error::CommandLine(e) => Failure::CommandLine(e),
        unit::Error::Unit(e) => Failure::Usage(e),
    })?;
    if let Some(equivalent) = expanded.equivalent.as_ref().filter(|_| expanded.print) {
        // Printed before the merged command line is parsed: what it shows is what would be
        // parsed, even where that would be refused.
        if !expanded.warnings.is_empty() {
            eprintln!("sockhold: warning: {}", unit_warning(&expanded.warnings));
        }
        println!("{}", unit::shell_line(equivalent));
        std::process::exit(0);
    }
    let cli = cli::Cli::try_parse_from(&expanded.argv).map_err(Failure::CommandLine)?;
    Ok((cli, expanded.warnings))
}

/// The one warning about what the units say and sockhold does not do.
fn unit_warning(warnings: &[String]) -> String {
    format!(
        "--unit: {} directive(s) of the units are not applied as systemd would:\n  {}",
        warnings.len(),
        warnings.join("\n  ")
    )
}

/// Logs to stderr as `sockhold[PID]: message` (warnings and errors marked) or as JSON lines;
/// `-v`/`-q` move the level from info, `RUST_LOG` overrides both.
fn init_logging(cli: &cli::Cli) {
    let level = match i32::from(cli.verbose) - i32::from(cli.quiet) {
        i32::MIN..=-2 => log::LevelFilter::Error,
        -1 => log::LevelFilter::Warn,
        0 => log::LevelFilter::Info,
        1 => log::LevelFilter::Debug,
        _ => log::LevelFilter::Trace,
    };
    let pid = std::process::id();
    let format = cli.log_format;
    let name = cli.instance_name();
    env_logger::Builder::new()
        .filter_level(level)
        .parse_env("RUST_LOG")
        .format(move |f, record| match format {
            cli::LogFormat::Text => {
                let marker = match record.level() {
                    log::Level::Error => "error: ",
                    log::Level::Warn => "warning: ",
                    _ => "",
                };
                writeln!(f, "sockhold[{pid}]: {marker}{}", record.args())
            }
            cli::LogFormat::Json => {
                let line = serde_json::json!({
                    "ts": humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
                    "level": record.level().as_str().to_ascii_lowercase(),
                    "pid": pid,
                    "name": name,
                    "msg": record.args().to_string(),
                });
                writeln!(f, "{line}")
            }
        })
        .init();
}

//! sockhold: holds a service's listening sockets and runs its server as a child that inherits
//! them under the systemd socket-activation protocol, reloading it without dropping a connection.
//!
//! `main` only parses the command line, starts logging, runs the event loop and maps the outcome
//! to an exit code; see `supervisor` for the decisions and `event_loop` for the machinery.

#![deny(unsafe_code)]

mod accept;
mod adopt;
mod child_env;
mod cli;
mod control;
mod ctl;
mod event_loop;
mod exit;
#[cfg(test)]
mod fuzz;
mod init;
mod listen;
mod notify;
mod paths;
mod probe;
mod protocol;
mod signals;
mod spawn;
mod steer;
mod supervisor;
mod sys;
mod upgrade;

use std::io::Write;

use clap::Parser;

use crate::exit::ExitCode;

fn main() {
    if std::env::args_os().nth(1).is_some_and(|a| a == upgrade::CHECK_FLAG) {
        upgrade::answer_check();
    }
    // Exec'd by a self-upgrade: from here on, every failure goes back to the old program.
    let incoming = match upgrade::Incoming::from_env() {
        None => None,
        Some(Ok(incoming)) => Some(incoming),
        Some(Err(e)) => {
            eprintln!("sockhold: error: {e}");
            std::process::exit(ExitCode::FAILURE.0);
        }
    };
    if let Some(incoming) = incoming.as_ref().filter(|_| upgrade::Incoming::is_dry_run()) {
        dry_run(incoming);
    }
    let cli = match (cli::Cli::try_parse(), incoming) {
        (Ok(cli), incoming) => (cli, incoming),
        (Err(e), Some(incoming)) => {
            incoming.roll_back(&format!("the new program refuses the command line: {}", e.render()))
        }
        // --help and --version go to stdout and exit 0, as clap prints them.
        (Err(e), None) if !e.use_stderr() => e.exit(),
        (Err(e), None) => {
            eprint!("sockhold: {}", e.render());
            std::process::exit(ExitCode::USAGE.0);
        }
    };
    let (mut cli, incoming) = cli;
    init_logging(&cli);
    if let Some(cli::Sub::Ctl(mut args)) = cli.ctl.take() {
        if let Err(message) = args.resolve() {
            eprintln!("sockhold: error: {message}");
            std::process::exit(ExitCode::USAGE.0);
        }
        let code = match ctl::run(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("sockhold: error: {err:#}");
                ExitCode::FAILURE
            }
        };
        std::process::exit(code.0);
    }
    let config = match (cli.into_config(), incoming) {
        (Ok(config), incoming) => (config, incoming),
        (Err(message), Some(incoming)) => {
            incoming.roll_back(&format!("the new program refuses the command line: {message}"))
        }
        (Err(message), None) => {
            eprintln!("sockhold: error: {message}");
            std::process::exit(ExitCode::USAGE.0);
        }
    };
    let started = match config {
        (config, None) => init::apply(&config).and_then(|()| event_loop::EventLoop::new(config)),
        (config, Some(incoming)) => match init::apply(&config) {
            Ok(()) => Ok(event_loop::EventLoop::resume(config, incoming)),
            Err(e) => incoming.roll_back(&format!("{e:#}")),
        },
    };
    let code = match started.and_then(event_loop::EventLoop::run) {
        Ok(code) => code,
        Err(err) => {
            log::error!("{err:#}");
            ExitCode::FAILURE
        }
    };
    std::process::exit(code.0);
}

/// A dry run before a self-upgrade: reads the command line and the state as a takeover would,
/// touches nothing, answers and exits; any failure is an error and exit status 1.
fn dry_run(incoming: &upgrade::Incoming) -> ! {
    let fail = |why: String| -> ! {
        eprintln!("sockhold[{}]: error: dry run: {why}", std::process::id());
        upgrade::answer_dry_run(Err(why))
    };
    let cli = cli::Cli::try_parse()
        .unwrap_or_else(|e| fail(format!("the command line: {}", e.render().to_string().trim())));
    let config = cli.into_config().unwrap_or_else(|e| fail(format!("the command line: {e}")));
    match event_loop::EventLoop::dry_run(config, incoming) {
        Ok(()) => upgrade::answer_dry_run(Ok(())),
        Err(e) => fail(e),
    }
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

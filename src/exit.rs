//! Exit codes, decided in one place.
//!
//! sockhold exits 0 after a clean stop, 1 on a runtime failure, 2 on a usage error, 126 when the
//! command is not executable, 127 when it is not found, and with the child's own code (or 128+N
//! for death by signal N) when the child's end is sockhold's end. The man page's EXIT STATUS
//! section lists the same codes; keep them in step. A [`Failure`] that ends sockhold early gets
//! its code here too, and is printed here, once.

use std::fmt;

use crate::signals::Signal;

/// A process exit code as sockhold reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExitCode(pub i32);

impl ExitCode {
    /// A clean stop.
    pub const SUCCESS: ExitCode = ExitCode(0);
    /// A runtime failure of sockhold itself (a failed bind, a broken event loop, a child that was
    /// never ready).
    pub const FAILURE: ExitCode = ExitCode(1);
    /// A usage error: a bad option or listen spec.
    pub const USAGE: ExitCode = ExitCode(2);
    /// The command exists but cannot be executed.
    pub const NOT_EXECUTABLE: ExitCode = ExitCode(126);
    /// The command was not found.
    pub const NOT_FOUND: ExitCode = ExitCode(127);
}

/// How a child process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChildStatus {
    /// It called `exit(code)`.
    Exited(i32),
    /// A signal killed it.
    Signaled(Signal),
}

impl ChildStatus {
    /// The status `waitpid` stored for a reaped process, or `None` for one that is not an end
    /// (stopped, continued). Decoded here rather than by nix, whose `WaitStatus` cannot hold a
    /// realtime signal: it reaped such a child, then failed.
    pub fn from_raw(status: i32) -> Option<ChildStatus> {
        use nix::libc::{WEXITSTATUS, WIFEXITED, WIFSIGNALED, WTERMSIG};
        if WIFEXITED(status) {
            Some(ChildStatus::Exited(WEXITSTATUS(status)))
        } else if WIFSIGNALED(status) {
            Signal::try_from(WTERMSIG(status)).ok().map(ChildStatus::Signaled)
        } else {
            None
        }
    }

    /// Exited with status 0.
    pub fn success(self) -> bool {
        self == ChildStatus::Exited(0)
    }

    /// The signal that killed it, if one did.
    pub fn signal(self) -> Option<Signal> {
        match self {
            ChildStatus::Signaled(signal) => Some(signal),
            ChildStatus::Exited(_) => None,
        }
    }

    /// The code sockhold exits with when this status ends it: the code, or 128+N.
    pub fn exit_code(self) -> ExitCode {
        match self {
            ChildStatus::Exited(code) => ExitCode(code),
            ChildStatus::Signaled(signal) => ExitCode(128 + signal.raw()),
        }
    }
}

impl fmt::Display for ChildStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChildStatus::Exited(code) => write!(f, "exit status {code}"),
            ChildStatus::Signaled(signal) => {
                write!(f, "killed by SIG{}", crate::signals::signal_name(*signal))
            }
        }
    }
}

/// Why sockhold ends before it could run to the end, and so how it says so and which code it
/// exits with. Each failure is printed once, by [`Failure::report`].
#[derive(Debug)]
pub enum Failure {
    /// The command line as clap read it: a usage error (exit 2), or `--help`/`--version`
    /// (printed to stdout, exit 0).
    CommandLine(clap::Error),
    /// A usage error found after parsing (exit 2): the message names the input.
    Usage(String),
    /// A failure before the supervisor runs, or of `sockhold ctl` (exit 1): printed as
    /// `sockhold: error: {err:#}`.
    Error(anyhow::Error),
    /// A failure of the supervisor (exit 1): logged, so that `--log-format json` gets it as a
    /// JSON line like every other message.
    Logged(anyhow::Error),
}

impl Failure {
    /// The code sockhold exits with.
    pub fn code(&self) -> ExitCode {
        match self {
            Failure::CommandLine(e) if !e.use_stderr() => ExitCode::SUCCESS,
            Failure::CommandLine(_) | Failure::Usage(_) => ExitCode::USAGE,
            Failure::Error(_) | Failure::Logged(_) => ExitCode::FAILURE,
        }
    }

    /// The failure in one line, for the old program to report after a failed self-upgrade.
    pub fn reason(&self) -> String {
        match self {
            Failure::CommandLine(e) => {
                format!("the new program refuses the command line: {}", e.render())
            }
            Failure::Usage(message) => {
                format!("the new program refuses the command line: {message}")
            }
            Failure::Error(err) | Failure::Logged(err) => format!("{err:#}"),
        }
    }

    /// Prints the failure, once, and says which code to exit with.
    pub fn report(self) -> ExitCode {
        let code = self.code();
        match self {
            // --help and --version go to stdout, as clap prints them.
            Failure::CommandLine(e) if !e.use_stderr() => {
                let _ = e.print();
            }
            Failure::CommandLine(e) => eprint!("sockhold: {}", e.render()),
            Failure::Usage(message) => eprintln!("sockhold: error: {message}"),
            Failure::Error(err) => eprintln!("sockhold: error: {err:#}"),
            Failure::Logged(err) => log::error!("{err:#}"),
        }
        code
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::error::ErrorKind;

    #[test]
    fn failures_exit_with_their_code() {
        let clap = |kind| Failure::CommandLine(clap::Error::new(kind));
        assert_eq!(clap(ErrorKind::DisplayHelp).code(), ExitCode::SUCCESS);
        assert_eq!(clap(ErrorKind::DisplayVersion).code(), ExitCode::SUCCESS);
        assert_eq!(clap(ErrorKind::UnknownArgument).code(), ExitCode::USAGE);
        assert_eq!(Failure::Usage("bad".into()).code(), ExitCode::USAGE);
        assert_eq!(Failure::Error(anyhow::anyhow!("bad")).code(), ExitCode::FAILURE);
        assert_eq!(Failure::Logged(anyhow::anyhow!("bad")).code(), ExitCode::FAILURE);
    }

    #[test]
    fn a_failure_as_the_old_program_reports_it_after_a_failed_upgrade() {
        let usage = Failure::Usage("invalid --name 'a:b'".into());
        assert_eq!(
            usage.reason(),
            "the new program refuses the command line: invalid --name 'a:b'"
        );
        let chain =
            anyhow::anyhow!("Address already in use").context("failed to bind 127.0.0.1:80");
        assert_eq!(
            Failure::Logged(chain).reason(),
            "failed to bind 127.0.0.1:80: Address already in use"
        );
    }
}

//! Signals sockhold reacts to, delivered through signal-hook's self-pipe, and [`Signal`], the
//! signal type the rest of sockhold uses.
//!
//! The handlers only set a flag and write a byte to a socket pair; the event loop polls the read
//! end and then drains the flags with [`Signals::pending`]. A signal that arrives at any moment,
//! during a reload, a spawn or a stop, either is already flagged when the loop drains or wakes
//! the next poll: none is lost. Signals of one kind that arrive before a drain collapse into one,
//! which is what every consumer wants (reloads coalesce; SIGCHLD means "reap until nothing is
//! left"). This module must not act on a signal; it only says which arrived.

use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;

use anyhow::{Context, Result};
use nix::libc;
use signal_hook::iterator::backend::SignalDelivery;
use signal_hook::iterator::exfiltrator::SignalOnly;

/// A signal, by number: a standard one or a realtime one (`SIGRTMIN..=SIGRTMAX`). nix's
/// `Signal` has no realtime signals, which servers use too (`--stop-signal RTMIN+1`, `ctl
/// signal RTMIN+3`), and a child they killed made nix's `waitpid` fail after reaping it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Signal(i32);

#[allow(missing_docs)]
impl Signal {
    pub const SIGHUP: Signal = Signal(libc::SIGHUP);
    pub const SIGINT: Signal = Signal(libc::SIGINT);
    pub const SIGQUIT: Signal = Signal(libc::SIGQUIT);
    pub const SIGABRT: Signal = Signal(libc::SIGABRT);
    pub const SIGKILL: Signal = Signal(libc::SIGKILL);
    pub const SIGUSR1: Signal = Signal(libc::SIGUSR1);
    pub const SIGUSR2: Signal = Signal(libc::SIGUSR2);
    pub const SIGALRM: Signal = Signal(libc::SIGALRM);
    pub const SIGTERM: Signal = Signal(libc::SIGTERM);
    pub const SIGCHLD: Signal = Signal(libc::SIGCHLD);
    pub const SIGTTIN: Signal = Signal(libc::SIGTTIN);
    pub const SIGTTOU: Signal = Signal(libc::SIGTTOU);
    pub const SIGWINCH: Signal = Signal(libc::SIGWINCH);
}

impl Signal {
    /// The number as the kernel knows it.
    pub fn raw(self) -> i32 {
        self.0
    }

    /// The realtime signals this libc leaves to programs (glibc keeps 32 and 33 for itself).
    pub fn realtime() -> std::ops::RangeInclusive<i32> {
        libc::SIGRTMIN()..=libc::SIGRTMAX()
    }

    /// Every signal: the standard ones, then the realtime ones.
    #[cfg(test)]
    pub fn all() -> Vec<Signal> {
        let standard = nix::sys::signal::Signal::iterator().map(Signal::from);
        standard.chain(Self::realtime().map(Signal)).collect()
    }

    /// Whether it is a realtime signal.
    pub fn is_realtime(self) -> bool {
        Self::realtime().contains(&self.0)
    }

    /// Its name without `SIG`, as `kill -l` prints it: `TERM`, `RTMIN`, `RTMIN+3`, `RTMAX-2`.
    pub fn name(self) -> String {
        if let Ok(standard) = nix::sys::signal::Signal::try_from(self.0) {
            return standard.as_str().trim_start_matches("SIG").to_string();
        }
        let (min, max) = (libc::SIGRTMIN(), libc::SIGRTMAX());
        // The lower half counts up from RTMIN, the upper half down from RTMAX, as bash does.
        match (self.0 - min, max - self.0) {
            (0, _) => "RTMIN".into(),
            (_, 0) => "RTMAX".into(),
            (up, _) if up <= (max - min) / 2 + 1 => format!("RTMIN+{up}"),
            (_, down) => format!("RTMAX-{down}"),
        }
    }

    /// Parses a name without `SIG`, in capitals: `TERM`, `RTMIN+3`, `RTMAX-1`, `RTMIN`.
    pub fn from_name(name: &str) -> Option<Signal> {
        let offset = |text: &str| text.parse::<u8>().ok().map(i32::from);
        let number = match name {
            "RTMIN" => libc::SIGRTMIN(),
            "RTMAX" => libc::SIGRTMAX(),
            _ => match (name.strip_prefix("RTMIN+"), name.strip_prefix("RTMAX-")) {
                (Some(up), _) => libc::SIGRTMIN() + offset(up)?,
                (_, Some(down)) => libc::SIGRTMAX() - offset(down)?,
                _ => {
                    return format!("SIG{name}")
                        .parse::<nix::sys::signal::Signal>()
                        .ok()
                        .map(Signal::from);
                }
            },
        };
        Signal::try_from(number).ok()
    }
}

impl From<nix::sys::signal::Signal> for Signal {
    fn from(signal: nix::sys::signal::Signal) -> Self {
        Signal(signal as i32)
    }
}

impl TryFrom<i32> for Signal {
    type Error = String;

    /// A standard or realtime signal number; anything else (0, 32, 65) is refused.
    fn try_from(number: i32) -> Result<Self, String> {
        let signal = Signal(number);
        if nix::sys::signal::Signal::try_from(number).is_ok() || signal.is_realtime() {
            Ok(signal)
        } else {
            Err(format!("{number} is not a signal number"))
        }
    }
}

impl std::fmt::Display for Signal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}

/// Signals passed on to the serving child as they are, besides every realtime signal.
pub const FORWARDED: [Signal; 6] = [
    Signal::SIGUSR1,
    Signal::SIGWINCH,
    Signal::SIGQUIT,
    Signal::SIGALRM,
    Signal::SIGTTIN,
    Signal::SIGTTOU,
];

/// The signals sockhold handles itself.
const OWN: [Signal; 5] =
    [Signal::SIGHUP, Signal::SIGTERM, Signal::SIGINT, Signal::SIGCHLD, Signal::SIGUSR2];

/// The installed handlers and the read end of their self-pipe.
pub struct Signals {
    delivery: SignalDelivery<UnixStream, SignalOnly>,
}

impl Signals {
    /// Installs the handlers. Call before the first child is spawned, so that nothing sent to
    /// sockhold from then on takes its default action.
    pub fn install() -> Result<Signals> {
        let (read, write) = UnixStream::pair().context("failed to create the signal pipe")?;
        read.set_nonblocking(true).context("failed to make the signal pipe non-blocking")?;
        write.set_nonblocking(true).context("failed to make the signal pipe non-blocking")?;
        // The realtime signals too: a server may use them (for log rotation, say), and their
        // default action would kill sockhold.
        let signals = OWN.iter().chain(FORWARDED.iter()).map(|s| s.raw()).chain(Signal::realtime());
        let delivery = SignalDelivery::with_pipe(read, write, SignalOnly, signals)
            .context("failed to install signal handlers")?;
        Ok(Signals { delivery })
    }

    /// The fd that becomes readable when a signal arrived.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.delivery.get_read().as_fd()
    }

    /// Every signal that arrived since the last call, each kind once, without blocking.
    pub fn pending(&mut self) -> Vec<Signal> {
        self.delivery.pending().filter_map(|s| Signal::try_from(s).ok()).collect()
    }
}

/// Whether sockhold passes `signal` on to the serving children when it gets it.
pub fn is_forwarded(signal: Signal) -> bool {
    FORWARDED.contains(&signal) || signal.is_realtime()
}

/// Parses `TERM`, `SIGTERM`, `term` or `15`, and the realtime signals: `RTMIN+3`,
/// `SIGRTMAX-1`, `rtmin`, or their numbers (34 to 64 with glibc).
pub fn parse_signal(text: &str) -> Result<Signal, String> {
    let bad = || {
        format!(
            "'{text}' is not a signal; use a name like TERM, SIGTERM or RTMIN+1, or a number like 15"
        )
    };
    if let Ok(number) = text.parse::<i32>() {
        return Signal::try_from(number).map_err(|_| bad());
    }
    let upper = text.to_ascii_uppercase();
    Signal::from_name(upper.strip_prefix("SIG").unwrap_or(&upper)).ok_or_else(bad)
}

/// `TERM` for `SIGTERM`, `RTMIN+3` for the fourth realtime signal: the name without its prefix,
/// as operators write it.
pub fn signal_name(signal: Signal) -> String {
    signal.name()
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn realtime_signals_are_named_and_read_as_kill_l_does() {
        let (min, max) = (libc::SIGRTMIN(), libc::SIGRTMAX());
        for number in 1..=max {
            let Ok(signal) = Signal::try_from(number) else { continue };
            assert_eq!(Signal::from_name(&signal.name()), Some(signal), "{number}");
        }
        assert_eq!(Signal::try_from(min).unwrap().name(), "RTMIN");
        assert_eq!(Signal::try_from(min + 3).unwrap().name(), "RTMIN+3");
        assert_eq!(Signal::try_from(max - 2).unwrap().name(), "RTMAX-2");
        assert_eq!(Signal::try_from(max).unwrap().name(), "RTMAX");
        assert_eq!(Signal::SIGTERM.name(), "TERM");
        assert_eq!(Signal::from_name("RTMAX-0"), Signal::try_from(max).ok());
        for bad in ["RTMIN+99", "RTMAX-99", "RTMIN+", "RTMIN-1", "RTMAX+1", "NOPE"] {
            assert_eq!(Signal::from_name(bad), None, "{bad}");
        }
        assert!(Signal::try_from(0).is_err());
        assert!(Signal::try_from(max + 1).is_err());
    }
}

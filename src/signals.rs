//! Signals sockhold reacts to, delivered through signal-hook's self-pipe.
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
use nix::sys::signal::Signal;
use signal_hook::iterator::backend::SignalDelivery;
use signal_hook::iterator::exfiltrator::SignalOnly;

/// Signals passed on to the serving child as they are.
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
        let signals = OWN.iter().chain(FORWARDED.iter()).map(|s| *s as i32);
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

//! With `--accept`: the listeners sockhold accepts on itself, each a copy of a held listener's
//! fd as std's type, and one `accept` that tells a connection that vanished (skipped) from a
//! sockhold out of fds or memory (the connection still waits). It decides nothing: when to
//! accept is the accept supervisor's decision.

use std::os::fd::BorrowedFd;

use anyhow::{Context, Result};
use log::debug;

use crate::control::is_exhaustion;
use crate::listen::Listener;

/// A listener sockhold accepts on itself (`--accept`): a copy of the held fd, as std's type.
pub(super) enum Acceptor {
    Tcp(std::net::TcpListener),
    Unix(std::os::unix::net::UnixListener),
}

impl Acceptor {
    /// Wraps a copy of a held stream listener; any other kind is refused.
    pub(super) fn new(listener: &Listener) -> Result<Acceptor> {
        use nix::sys::socket::{
            AddressFamily, SockType, SockaddrLike, SockaddrStorage, getsockname, getsockopt,
            sockopt,
        };
        let what = listener.local_description();
        let kind = getsockopt(&listener.fd(), sockopt::SockType)
            .with_context(|| format!("cannot inspect {what}"))?;
        if kind != SockType::Stream {
            anyhow::bail!("--accept takes stream sockets only, and {what} is not one");
        }
        let fd = nix::unistd::dup(listener.fd()).with_context(|| format!("cannot copy {what}"))?;
        let family = getsockname::<SockaddrStorage>(std::os::fd::AsRawFd::as_raw_fd(&fd))
            .ok()
            .and_then(|a| a.family());
        Ok(match family {
            Some(AddressFamily::Unix) => Acceptor::Unix(fd.into()),
            _ => Acceptor::Tcp(fd.into()),
        })
    }

    pub(super) fn fd(&self) -> BorrowedFd<'_> {
        use std::os::fd::AsFd;
        match self {
            Acceptor::Tcp(l) => l.as_fd(),
            Acceptor::Unix(l) => l.as_fd(),
        }
    }

    /// The next waiting connection and its peer (for TCP), or `None` when none waits. The error
    /// is an exhaustion ([`is_exhaustion`]): the connection still waits.
    pub(super) fn accept(
        &self,
    ) -> std::io::Result<Option<(std::os::fd::OwnedFd, Option<std::net::SocketAddr>)>> {
        let result = match self {
            Acceptor::Tcp(l) => l.accept().map(|(c, peer)| (c.into(), Some(peer))),
            Acceptor::Unix(l) => l.accept().map(|(c, _)| (c.into(), None)),
        };
        match result {
            Ok(conn) => Ok(Some(conn)),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
            Err(e) if is_exhaustion(&e) => Err(e),
            Err(e) => {
                // ECONNABORTED and the like: that connection is gone, the listener is fine.
                debug!("accept: {e}");
                Ok(None)
            }
        }
    }
}

//! systemd's file descriptor store (`--fd-store N`): the fds that children hand to sockhold with
//! `FDSTORE=1`, kept under their `FDNAME=` while sockhold runs and given to every later
//! generation after its listening sockets.
//!
//! It owns the stored fds and the rules systemd applies to them: at most N in all (one more is
//! closed with a warning), an fd already stored is not stored twice, a missing or invalid name
//! is `stored`, `FDSTOREREMOVE=1` closes every fd of a name, and a stored fd that reports
//! `POLLHUP` or `POLLERR` is closed unless it was stored with `FDPOLL=0`. The newest fd comes
//! first, as systemd numbers its store. The store lives in the event loop, survives reloads,
//! restarts and self-upgrades, and closes with sockhold.
//!
//! It must not decide whose messages count (the supervisor's `--notify-access` does) nor touch
//! the poll loop: it says which fds want polling and is told which reported a hang-up.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

use log::{debug, info, warn};
use serde::{Deserialize, Serialize};

/// The name of a stored fd whose message gave none (or an invalid one), as systemd names it.
pub const DEFAULT_NAME: &str = "stored";

/// The longest name `LISTEN_FDNAMES` allows.
pub const MAX_NAME: usize = 255;

/// Whether `name` may be an `FDNAME=`: 1 to 255 printable ASCII characters, no `:` (the
/// separator of `LISTEN_FDNAMES`).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && name.bytes().all(|b| (b' '..=b'~').contains(&b) && b != b':')
}

/// One stored fd.
#[derive(Debug)]
struct Entry {
    name: String,
    fd: OwnedFd,
    /// Closed on `POLLHUP`/`POLLERR` (not stored with `FDPOLL=0`).
    poll: bool,
}

/// The store: up to `max` fds, newest first.
#[derive(Debug)]
pub struct FdStore {
    max: usize,
    entries: Vec<Entry>,
}

/// A stored fd in the self-upgrade's state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredHandover {
    /// The fd number the next program inherits it at.
    pub fd: RawFd,
    /// Its `FDNAME=`.
    pub name: String,
    /// Whether a hang-up closes it (`FDPOLL=0` was not given).
    pub poll: bool,
}

impl FdStore {
    /// An empty store of at most `max` fds; 0 turns the store off.
    pub fn new(max: usize) -> FdStore {
        FdStore { max, entries: Vec::new() }
    }

    /// The most it holds (`--fd-store`).
    pub fn max(&self) -> usize {
        self.max
    }

    /// The stored fds' names, newest first: their order in `LISTEN_FDNAMES`.
    pub fn names(&self) -> Vec<&str> {
        self.entries.iter().map(|e| e.name.as_str()).collect()
    }

    /// The stored fds, newest first: their order after the listeners.
    pub fn fds(&self) -> Vec<BorrowedFd<'_>> {
        self.entries.iter().map(|e| e.fd.as_fd()).collect()
    }

    /// The stored fds watched for a hang-up, to poll with no event asked for (the kernel always
    /// reports `POLLHUP` and `POLLERR`, so an idle store never wakes sockhold).
    pub fn polled(&self) -> Vec<BorrowedFd<'_>> {
        self.entries.iter().filter(|e| e.poll).map(|e| e.fd.as_fd()).collect()
    }

    /// Stores `fds`, sent by `generation` with `FDSTORE=1` and `FDNAME=name`. Each fd is closed
    /// instead when it is already stored, or when the store is full (with a warning naming the
    /// generation and the name) or off.
    pub fn store(&mut self, generation: u64, name: Option<&str>, poll: bool, fds: Vec<OwnedFd>) {
        if fds.is_empty() {
            return;
        }
        let name = match name {
            Some(name) if valid_name(name) => name,
            Some(name) => {
                warn!(
                    "generation {generation}: invalid FDNAME={name:?} (1 to {MAX_NAME} printable ASCII characters, no ':'); storing its fds as {DEFAULT_NAME:?}"
                );
                DEFAULT_NAME
            }
            None => DEFAULT_NAME,
        };
        if self.max == 0 {
            // Closed before the log line says so.
            let count = fds.len();
            drop(fds);
            info!(
                "generation {generation}: closing {count} fd(s) sent with FDSTORE=1 (FDNAME={name}): the fd store is off (--fd-store 0)"
            );
            return;
        }
        let mut fds = fds.into_iter();
        for fd in fds.by_ref() {
            if self.entries.iter().any(|e| crate::sys::same_file(e.fd.as_fd(), fd.as_fd())) {
                debug!("generation {generation}: fd {name} is already stored; closing the copy");
                continue;
            }
            if self.entries.len() >= self.max {
                drop(fd);
                drop(fds);
                warn!(
                    "generation {generation}: the fd store is full (--fd-store {}); closing fd {name} and any other of its message",
                    self.max
                );
                return;
            }
            debug!("generation {generation}: stored fd {} as {name}", fd.as_raw_fd());
            self.entries.insert(0, Entry { name: name.to_string(), fd, poll });
        }
    }

    /// Closes every stored fd named `name` (`FDSTOREREMOVE=1`); returns how many.
    pub fn remove(&mut self, generation: u64, name: Option<&str>) -> usize {
        let Some(name) = name.filter(|n| valid_name(n)) else {
            warn!(
                "generation {generation}: FDSTOREREMOVE=1 without a valid FDNAME= removes nothing"
            );
            return 0;
        };
        let before = self.entries.len();
        self.entries.retain(|e| e.name != name);
        let removed = before - self.entries.len();
        debug!("generation {generation}: removed {removed} stored fd(s) named {name}");
        removed
    }

    /// Closes the stored fd `raw`, which reported a hang-up or an error.
    pub fn hung_up(&mut self, raw: RawFd) {
        if let Some(i) = self.entries.iter().position(|e| e.fd.as_raw_fd() == raw) {
            let Entry { name, fd, .. } = self.entries.remove(i);
            drop(fd);
            info!("stored fd {name} reported a hang-up or an error; closing it");
        }
    }

    /// Closes every stored fd (sockhold is stopping).
    pub fn close_all(&mut self) {
        if !self.entries.is_empty() {
            info!("closing the {} fd(s) of the fd store", self.entries.len());
        }
        self.entries.clear();
    }

    /// What the self-upgrade's state says of the store; the fds themselves cross the exec at
    /// these numbers.
    pub fn handover(&self) -> Vec<StoredHandover> {
        (self.entries.iter())
            .map(|e| StoredHandover { fd: e.fd.as_raw_fd(), name: e.name.clone(), poll: e.poll })
            .collect()
    }

    /// The store a self-upgrade handed over, each fd already checked open and adopted; the
    /// order is kept (newest first). Entries beyond a smaller `max` are closed.
    pub fn take_handover(max: usize, entries: Vec<(StoredHandover, OwnedFd)>) -> FdStore {
        let mut store = FdStore::new(max);
        for (entry, fd) in entries {
            if store.entries.len() >= max {
                warn!(
                    "after the upgrade, the fd store holds at most {max}: closing stored fd {}",
                    entry.name
                );
                continue;
            }
            store.entries.push(Entry { name: entry.name, fd, poll: entry.poll });
        }
        store
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pipe() -> (OwnedFd, OwnedFd) {
        nix::unistd::pipe().expect("pipe")
    }

    #[test]
    fn names_follow_systemd_rules() {
        assert!(valid_name("conn-1"));
        assert!(valid_name("a b~"));
        assert!(valid_name(&"x".repeat(MAX_NAME)));
        for bad in ["", "a:b", "tab\there", "é", "\u{7f}"] {
            assert!(!valid_name(bad), "{bad:?}");
        }
        assert!(!valid_name(&"x".repeat(MAX_NAME + 1)));
    }

    #[test]
    fn newest_first_with_default_names_up_to_the_limit() {
        let mut store = FdStore::new(3);
        let (a, _a) = pipe();
        let (b, _b) = pipe();
        store.store(1, Some("first"), true, vec![a]);
        store.store(2, None, true, vec![b]);
        assert_eq!(store.names(), ["stored", "first"]);
        let (c, _c) = pipe();
        let (d, _d) = pipe();
        store.store(2, Some("bad:name"), false, vec![c, d]);
        assert_eq!(store.names().len(), 3, "the second fd of the message is beyond the limit");
        assert_eq!(store.names(), ["stored", "stored", "first"]);
        assert_eq!(store.polled().len(), 2, "FDPOLL=0 is not polled");
    }

    #[test]
    fn the_same_file_is_stored_once() {
        let mut store = FdStore::new(4);
        let (r, _w) = pipe();
        let copy = r.try_clone().expect("dup");
        store.store(1, Some("r"), true, vec![r]);
        store.store(1, Some("again"), true, vec![copy]);
        assert_eq!(store.names(), ["r"]);
        // A different pipe end of the same pipe is another file.
        let (r2, w2) = pipe();
        store.store(1, Some("pair"), true, vec![r2, w2]);
        assert_eq!(store.names().len(), 3);
    }

    #[test]
    fn off_closes_what_arrives() {
        let mut store = FdStore::new(0);
        let (r, w) = pipe();
        store.store(1, Some("x"), true, vec![w]);
        assert_eq!(store.names().len(), 0);
        let mut byte = [0u8; 1];
        assert_eq!(nix::unistd::read(&r, &mut byte).expect("read"), 0, "the write end was closed");
    }

    #[test]
    fn remove_closes_every_fd_of_the_name() {
        let mut store = FdStore::new(8);
        let (a, _a) = pipe();
        let (b, _b) = pipe();
        let (c, _c) = pipe();
        store.store(1, Some("x"), true, vec![a]);
        store.store(1, Some("y"), true, vec![b]);
        store.store(2, Some("x"), true, vec![c]);
        assert_eq!(store.remove(2, Some("x")), 2);
        assert_eq!(store.names(), ["y"]);
        assert_eq!(store.remove(2, None), 0);
        assert_eq!(store.remove(2, Some("a:b")), 0);
        assert_eq!(store.remove(2, Some("nothing")), 0);
    }

    #[test]
    fn a_hang_up_closes_the_fd_and_a_handover_keeps_the_order() {
        let mut store = FdStore::new(8);
        let (a, _a) = pipe();
        let (b, _b) = pipe();
        let hung = a.as_raw_fd();
        store.store(1, Some("a"), true, vec![a]);
        store.store(1, Some("b"), false, vec![b]);
        let state = store.handover();
        assert_eq!(state.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(), ["b", "a"]);
        assert!(!state[0].poll && state[1].poll);
        store.hung_up(hung);
        assert_eq!(store.names(), ["b"]);
        let (x, _x) = pipe();
        let (y, _y) = pipe();
        let again = FdStore::take_handover(
            1,
            vec![
                (StoredHandover { fd: 0, name: "new".into(), poll: true }, x),
                (StoredHandover { fd: 0, name: "old".into(), poll: true }, y),
            ],
        );
        assert_eq!(again.names(), ["new"], "beyond a smaller limit, closed");
    }
}

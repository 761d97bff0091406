//! Adopting sockets sockhold inherited instead of binding them (`fd://N`, `systemd://NAME`).
//!
//! It owns reading sockhold's own socket-activation environment (`LISTEN_FDS`, `LISTEN_PID`,
//! `LISTEN_FDNAMES`, as a systemd socket unit, `systemd-socket-activate` or another sockhold
//! sets it), and taking an inherited fd: checking that it is an open socket of the expected
//! type, and making it close-on-exec inside sockhold like every socket it binds. It must not
//! bind anything, and it never trusts `LISTEN_FDS` that name another process in `LISTEN_PID`.
//!
//! Its errors are plain messages naming the variable or the name at fault: without `--listen`
//! they are usage errors (exit 2).

use std::collections::BTreeMap;
use std::os::fd::{AsFd, OwnedFd, RawFd};

use anyhow::{Context, Result, bail};
use nix::fcntl::{FcntlArg, FdFlag, fcntl};
use nix::sys::socket::{SockType, getsockopt, sockopt};

/// The fds sockhold itself was handed under the socket-activation protocol, by name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Inherited {
    /// `(fd, name)` in order; names are "unknown" where `LISTEN_FDNAMES` gave none.
    pub fds: Vec<(RawFd, String)>,
}

impl Inherited {
    /// Parses the three variables as sd_listen_fds_with_names(3) does, for the process `pid`.
    /// No `LISTEN_FDS` is no sockets; a `LISTEN_PID` that is not `pid` is an error, because the
    /// variables were meant for another process (a parent that leaked them).
    pub fn parse(
        listen_fds: Option<&str>,
        listen_pid: Option<&str>,
        listen_fdnames: Option<&str>,
        pid: u32,
    ) -> Result<Inherited, String> {
        let Some(count) = listen_fds else { return Ok(Inherited::default()) };
        let count: usize =
            count.parse().map_err(|_| format!("LISTEN_FDS='{count}' is not a number"))?;
        match listen_pid {
            Some(p) if p.parse() == Ok(pid) => {}
            Some(p) => {
                return Err(format!(
                    "LISTEN_PID={p} is not sockhold's pid ({pid}): those sockets were meant for another process"
                ));
            }
            None => return Err("LISTEN_FDS is set without LISTEN_PID".into()),
        }
        let names: Vec<&str> = listen_fdnames.map(|n| n.split(':').collect()).unwrap_or_default();
        if listen_fdnames.is_some() && names.len() != count {
            return Err(format!(
                "LISTEN_FDNAMES has {} names for LISTEN_FDS={count} sockets",
                names.len()
            ));
        }
        let fds = (0..count)
            .map(|i| {
                let name = names.get(i).copied().filter(|n| !n.is_empty()).unwrap_or("unknown");
                (3 + i as RawFd, name.to_string())
            })
            .collect();
        Ok(Inherited { fds })
    }

    /// Reads sockhold's own environment.
    pub fn from_env() -> Result<Inherited, String> {
        let var = |name: &str| std::env::var(name).ok();
        Inherited::parse(
            var("LISTEN_FDS").as_deref(),
            var("LISTEN_PID").as_deref(),
            var("LISTEN_FDNAMES").as_deref(),
            std::process::id(),
        )
    }

    /// The fd named `name`, if exactly one has that name.
    pub fn by_name(&self, name: &str) -> Result<RawFd, String> {
        let matching: Vec<RawFd> =
            self.fds.iter().filter(|(_, n)| n == name).map(|(fd, _)| *fd).collect();
        match matching.as_slice() {
            [fd] => Ok(*fd),
            [] => {
                let have: BTreeMap<&str, ()> =
                    self.fds.iter().map(|(_, n)| (n.as_str(), ())).collect();
                let have: Vec<&str> = have.into_keys().collect();
                Err(if have.is_empty() {
                    format!("no socket named '{name}': sockhold was given no sockets (LISTEN_FDS)")
                } else {
                    format!(
                        "no socket named '{name}' in LISTEN_FDNAMES (there are: {})",
                        have.join(", ")
                    )
                })
            }
            _ => Err(format!("more than one socket is named '{name}' in LISTEN_FDNAMES")),
        }
    }
}

/// Takes ownership of inherited fd `raw` after checking it is an open socket; marks it
/// close-on-exec. Returns it with its type.
pub fn take(raw: RawFd) -> Result<(OwnedFd, SockType)> {
    if raw < 3 {
        bail!("fd {raw} is standard input, output or error, not a socket to hand over");
    }
    // Each fd is adopted once: two specs naming the same fd would close it twice.
    static TAKEN: std::sync::Mutex<Vec<RawFd>> = std::sync::Mutex::new(Vec::new());
    let mut taken = TAKEN.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if taken.contains(&raw) {
        bail!("fd {raw} is already adopted by another --listen");
    }
    let borrowed = crate::sys::borrow_inherited_fd(raw)
        .with_context(|| format!("fd {raw} is not open in sockhold"))?;
    let kind = getsockopt(&borrowed, sockopt::SockType)
        .map_err(|e| anyhow::anyhow!("fd {raw} is not a socket ({e})"))?;
    let owned = crate::sys::adopt_inherited_fd(raw);
    taken.push(raw);
    fcntl(owned.as_fd(), FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))
        .with_context(|| format!("failed to make fd {raw} close-on-exec"))?;
    Ok((owned, kind))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_table() {
        let ok = [
            ((None, None, None), vec![]),
            ((Some("2"), Some("7"), Some("web:admin")), vec![(3, "web"), (4, "admin")]),
            ((Some("2"), Some("7"), None), vec![(3, "unknown"), (4, "unknown")]),
            ((Some("1"), Some("7"), Some("")), vec![(3, "unknown")]),
            ((Some("0"), Some("7"), None), vec![]),
        ];
        for ((fds, pid, names), want) in ok {
            let got = Inherited::parse(fds, pid, names, 7).unwrap();
            let want: Vec<(RawFd, String)> =
                want.into_iter().map(|(f, n)| (f, n.to_string())).collect();
            assert_eq!(got.fds, want, "{fds:?} {pid:?} {names:?}");
        }
        let bad = [
            ((Some("x"), Some("7"), None), "is not a number"),
            ((Some("1"), Some("8"), None), "meant for another process"),
            ((Some("1"), None, None), "without LISTEN_PID"),
            ((Some("2"), Some("7"), Some("one")), "1 names for LISTEN_FDS=2"),
        ];
        for ((fds, pid, names), want) in bad {
            let err = Inherited::parse(fds, pid, names, 7).unwrap_err();
            assert!(err.contains(want), "{err}");
        }
    }

    #[test]
    fn by_name() {
        let inherited = Inherited::parse(Some("3"), Some("1"), Some("a:b:b"), 1).unwrap();
        assert_eq!(inherited.by_name("a"), Ok(3));
        assert!(inherited.by_name("b").unwrap_err().contains("more than one"));
        assert!(inherited.by_name("c").unwrap_err().contains("there are: a, b"));
        assert!(Inherited::default().by_name("c").unwrap_err().contains("given no sockets"));
    }
}

//! Files sockhold creates in directories named on its command line (`--pid-file`, `--control`),
//! and the checks that keep another local user from redirecting them.
//!
//! It owns [`open_trusted_dir`], the one directory check (sshd's StrictModes): every directory
//! from `/` down to the one named must be owned by root or sockhold's euid and writable by no one
//! else (a sticky directory such as `/tmp` is allowed above it, where others cannot rename what
//! they do not own). The walk opens each component with `O_NOFOLLOW` below the one before, so the
//! directory checked is the directory used: a symlink swapped in afterwards is refused, not
//! followed. It also owns [`PidFile`], created under a random name with
//! `O_CREAT|O_EXCL|O_NOFOLLOW` and renamed into place through that directory fd, and removed at
//! exit only while it is still the file sockhold wrote, and the pid file's part of the
//! self-upgrade state ([`PidFileHandover`]).
//!
//! It must not create directories or decide what to do about a refusal: callers name the option
//! in the error and stop.

use std::ffi::{OsStr, OsString};
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Component, Path, PathBuf};

use anyhow::{Context, Result, bail};
use log::{debug, warn};
use nix::errno::Errno;
use nix::fcntl::{OFlag, openat};
use nix::sys::stat::{FileStat, Mode, SFlag, fchmod, fstat};
use nix::unistd::{Uid, UnlinkatFlags, User, fsync, geteuid, unlinkat};
use serde::{Deserialize, Serialize};

/// Whether a sticky directory writable by others (such as `/tmp`) may hold the file itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sticky {
    /// Allowed: the file is created with `O_EXCL|O_NOFOLLOW` and nobody else can rename or
    /// remove it there (the pid file).
    Allow,
    /// Refused: a name in it can be taken by anyone first (the control socket).
    Refuse,
}

/// "uid 65534 (nobody)", or just the uid when it has no name.
pub fn describe_uid(uid: u32) -> String {
    match User::from_uid(Uid::from_raw(uid)) {
        Ok(Some(user)) => format!("uid {uid} ({})", user.name),
        _ => format!("uid {uid}"),
    }
}

/// Why a directory with this owner and mode cannot be trusted, if it cannot. `last` is the
/// directory that holds the file; the ones above it may be sticky and writable by others.
fn distrust(stat: &FileStat, last: bool, sticky: Sticky) -> Option<String> {
    let euid = geteuid().as_raw();
    let mode = stat.st_mode & 0o7777;
    let owner = describe_uid(stat.st_uid);
    let shown = format!("owner {owner}, mode {mode:04o}");
    if stat.st_uid != 0 && stat.st_uid != euid {
        let who =
            if euid == 0 { "root".to_string() } else { format!("root or {}", describe_uid(euid)) };
        return Some(format!("is owned by another user ({shown}); it must belong to {who}"));
    }
    let others_write = mode & 0o022 != 0;
    let is_sticky = mode & 0o1000 != 0;
    let allowed = !others_write || (is_sticky && (!last || sticky == Sticky::Allow));
    if allowed {
        return None;
    }
    let writers = if mode & 0o002 != 0 { "every user" } else { "its group" };
    Some(format!("is writable by {writers} ({shown}), who could replace what sockhold puts there"))
}

/// Opens `dir` for use with `*at` calls after checking it and every directory above it (see the
/// module doc). The error names the directory, its owner and its mode.
pub fn open_trusted_dir(dir: &Path, sticky: Sticky) -> Result<OwnedFd, String> {
    let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
    // Resolve the symlinks the user wrote (/var/run -> /run) once; the walk below then follows
    // none, so what it checks is what it returns.
    let real = dir
        .canonicalize()
        .map_err(|e| format!("cannot open the directory {}: {e}", dir.display()))?;
    let flags = OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_RDONLY | OFlag::O_CLOEXEC;
    let mut current = nix::fcntl::open("/", flags, Mode::empty())
        .map_err(|e| format!("cannot open the directory /: {e}"))?;
    let mut walked = PathBuf::from("/");
    let components: Vec<&OsStr> = real
        .components()
        .filter_map(|c| match c {
            Component::Normal(name) => Some(name),
            _ => None,
        })
        .collect();
    for i in 0..=components.len() {
        let stat = fstat(&current).map_err(|e| format!("cannot stat {}: {e}", walked.display()))?;
        if let Some(reason) = distrust(&stat, i == components.len(), sticky) {
            return Err(format!("the directory {} {reason}", walked.display()));
        }
        let Some(name) = components.get(i) else { break };
        walked.push(name);
        current = openat(&current, *name, flags, Mode::empty()).map_err(|e| match e {
            Errno::ELOOP | Errno::ENOTDIR => {
                format!("{} was replaced while sockhold checked it", walked.display())
            }
            e => format!("cannot open the directory {}: {e}", walked.display()),
        })?;
    }
    Ok(current)
}

/// Where a file named on the command line lives: its directory and its own name.
fn split(path: &Path) -> Result<(PathBuf, OsString)> {
    let name = match path.components().next_back() {
        Some(Component::Normal(name)) => name.to_os_string(),
        _ => bail!("{} does not name a file", path.display()),
    };
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Ok((dir, name))
}

/// A fresh name nobody can guess in advance, for the temporary file.
fn random_suffix() -> Result<String> {
    let mut bytes = [0u8; 8];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("failed to read /dev/urandom")?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// sockhold's pid file: what was written where, to remove it at exit only if it is still ours.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PidFile {
    /// The path as given on the command line (for messages).
    path: PathBuf,
    /// Its directory, and the file's name in it.
    dir: PathBuf,
    name: OsString,
    /// The file's identity when it was created; `None` after taking over from a program that
    /// did not record it, when only the content is compared.
    identity: Option<(u64, u64)>,
    /// The pid written in it.
    pid: u32,
}

impl PidFile {
    /// Writes `pid` to `path`: checks the directory, creates a file with a random name there
    /// (`O_CREAT|O_EXCL|O_NOFOLLOW`, mode 0644), writes and syncs it, and renames it over the
    /// path through the directory fd. The error names the option and the path.
    pub fn create(path: &Path, pid: u32) -> Result<PidFile> {
        let shown = path.display();
        let (dir, name) = split(path).with_context(|| format!("invalid --pid-file {shown}"))?;
        let dir_fd = open_trusted_dir(&dir, Sticky::Allow)
            .map_err(|reason| anyhow::anyhow!("invalid --pid-file {shown}: {reason}"))?;
        let mut tries = 0;
        let (tmp, file) = loop {
            let mut tmp = OsString::from(".");
            tmp.push(&name);
            tmp.push(format!(".{}", random_suffix()?));
            let flags = OFlag::O_CREAT
                | OFlag::O_EXCL
                | OFlag::O_NOFOLLOW
                | OFlag::O_WRONLY
                | OFlag::O_CLOEXEC;
            match openat(&dir_fd, tmp.as_os_str(), flags, Mode::from_bits_truncate(0o644)) {
                Ok(fd) => break (tmp, fd),
                // Someone planted this name: another random one cannot have been guessed.
                Err(Errno::EEXIST) if tries < 8 => tries += 1,
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!(
                            "failed to write the pid file {shown}: cannot create a temporary file in {}",
                            dir.display()
                        )
                    });
                }
            }
        };
        let written = (|| -> Result<(u64, u64)> {
            // The umask must not decide who can read it.
            fchmod(&file, Mode::from_bits_truncate(0o644))?;
            let mut f = std::fs::File::from(file);
            f.write_all(format!("{pid}\n").as_bytes())?;
            fsync(&f)?;
            let stat = fstat(&f)?;
            nix::fcntl::renameat(&dir_fd, tmp.as_os_str(), &dir_fd, name.as_os_str())?;
            // The rename itself is durable once the directory is synced; a failure here is not
            // worth refusing to start over.
            let _ = fsync(&dir_fd);
            Ok((stat.st_dev, stat.st_ino))
        })();
        let identity = match written {
            Ok(identity) => identity,
            Err(e) => {
                let _ = unlinkat(&dir_fd, tmp.as_os_str(), UnlinkatFlags::NoRemoveDir);
                return Err(e).with_context(|| format!("failed to write the pid file {shown}"));
            }
        };
        Ok(PidFile { path: path.to_path_buf(), dir, name, identity: Some(identity), pid })
    }

    /// Removes the file if it is still the one written: same inode and still our pid. Anything
    /// else at the path (a file someone put there, a symlink) is left alone with a warning.
    pub fn remove(&self) {
        let shown = self.path.display();
        let dir_fd = match open_trusted_dir(&self.dir, Sticky::Allow) {
            Ok(fd) => fd,
            Err(reason) => {
                warn!("left the pid file {shown} in place: {reason}");
                return;
            }
        };
        let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC;
        let file = match openat(&dir_fd, self.name.as_os_str(), flags, Mode::empty()) {
            Ok(fd) => std::fs::File::from(fd),
            Err(Errno::ENOENT) => {
                debug!("the pid file {shown} is already gone");
                return;
            }
            Err(e) => {
                warn!("left the pid file {shown} in place: it is no longer sockhold's ({e})");
                return;
            }
        };
        let ours = fstat(&file).ok().is_some_and(|stat| {
            let same = self.identity.is_none_or(|id| id == (stat.st_dev, stat.st_ino));
            same && stat.st_mode & SFlag::S_IFMT.bits() == SFlag::S_IFREG.bits()
        }) && {
            let mut content = String::new();
            (&file).take(64).read_to_string(&mut content).is_ok()
                && content.trim() == self.pid.to_string()
        };
        if !ours {
            warn!("left the pid file {shown} in place: it was replaced, so it is not sockhold's");
            return;
        }
        if let Err(e) = unlinkat(&dir_fd, self.name.as_os_str(), UnlinkatFlags::NoRemoveDir) {
            warn!("failed to remove the pid file {shown}: {e}");
        }
    }

    /// Self-upgrade: what the next program needs to remove the file at exit.
    pub fn handover(&self) -> PidFileHandover {
        PidFileHandover {
            path: self.path.clone(),
            dir: self.dir.clone(),
            name: PathBuf::from(&self.name),
            dev: self.identity.map(|i| i.0),
            ino: self.identity.map(|i| i.1),
            pid: self.pid,
        }
    }

    /// Takes over a [`PidFile::handover`] entry.
    pub fn take_handover(state: &PidFileHandover) -> PidFile {
        PidFile {
            path: state.path.clone(),
            dir: state.dir.clone(),
            name: state.name.clone().into_os_string(),
            identity: state.dev.zip(state.ino),
            pid: state.pid,
        }
    }
}

/// Self-upgrade: the pid file as the next program reads it (the `pid_file` part of
/// [`crate::upgrade::State`]). Every field is required and no other is accepted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PidFileHandover {
    /// The path as given on the command line.
    pub path: PathBuf,
    /// Its directory.
    pub dir: PathBuf,
    /// The file's name in it.
    pub name: PathBuf,
    /// The file's device when it was created.
    #[serde(deserialize_with = "Option::deserialize")]
    pub dev: Option<u64>,
    /// The file's inode when it was created.
    #[serde(deserialize_with = "Option::deserialize")]
    pub ino: Option<u64>,
    /// The pid written in it.
    pub pid: u32,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn dir_with(mode: u32, owner: Option<u32>) -> (tempfile::TempDir, PathBuf) {
        let top = tempfile::tempdir().unwrap();
        let dir = top.path().join("d");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode)).unwrap();
        if let Some(uid) = owner {
            std::os::unix::fs::chown(&dir, Some(uid), None).unwrap();
        }
        (top, dir)
    }

    #[test]
    fn trusted_directories() {
        let (_t, private) = dir_with(0o700, None);
        assert!(open_trusted_dir(&private, Sticky::Refuse).is_ok());
        let (_t, shared) = dir_with(0o755, None);
        assert!(open_trusted_dir(&shared, Sticky::Refuse).is_ok());

        let (_t, group) = dir_with(0o775, None);
        let err = open_trusted_dir(&group, Sticky::Allow).unwrap_err();
        assert!(err.contains("writable by its group") && err.contains("mode 0775"), "{err}");
        assert!(err.contains(&group.display().to_string()), "{err}");

        let (_t, open) = dir_with(0o777, None);
        let err = open_trusted_dir(&open, Sticky::Allow).unwrap_err();
        assert!(err.contains("writable by every user") && err.contains("mode 0777"), "{err}");

        // Sticky and world-writable (like /tmp): the pid file may go there, a socket may not.
        let (_t, tmp) = dir_with(0o1777, None);
        assert!(open_trusted_dir(&tmp, Sticky::Allow).is_ok());
        let err = open_trusted_dir(&tmp, Sticky::Refuse).unwrap_err();
        assert!(err.contains("mode 1777"), "{err}");
        // Below a sticky directory, a private one is fine either way.
        let below = tmp.join("mine");
        std::fs::create_dir(&below).unwrap();
        std::fs::set_permissions(&below, std::fs::Permissions::from_mode(0o700)).unwrap();
        assert!(open_trusted_dir(&below, Sticky::Refuse).is_ok());
        // Below a group-writable one, nothing is.
        let under = group.join("x");
        std::fs::create_dir(&under).unwrap();
        let err = open_trusted_dir(&under, Sticky::Allow).unwrap_err();
        assert!(err.contains(&format!("{} is writable", group.display())), "{err}");

        let err = open_trusted_dir(&private.join("missing"), Sticky::Allow).unwrap_err();
        assert!(err.contains("cannot open the directory"), "{err}");
    }

    #[test]
    fn another_users_directory_is_refused() {
        if !geteuid().is_root() {
            eprintln!("SKIPPED: changing a directory's owner needs root");
            assert!(std::env::var("CI").as_deref() != Ok("true"), "CI runs these tests as root");
            return;
        }
        let (_t, theirs) = dir_with(0o755, Some(65534));
        let err = open_trusted_dir(&theirs, Sticky::Allow).unwrap_err();
        assert!(err.contains("owned by another user"), "{err}");
        assert!(err.contains("uid 65534"), "{err}");
        assert!(err.contains("mode 0755"), "{err}");
        // A directory a trusted one links to is judged as itself, not by the link.
        let (_t2, ours) = dir_with(0o700, None);
        let link = ours.join("link");
        std::os::unix::fs::symlink(&theirs, &link).unwrap();
        let err = open_trusted_dir(&link, Sticky::Allow).unwrap_err();
        assert!(err.contains("owned by another user"), "{err}");
    }

    #[test]
    fn pid_file_written_checked_and_removed_only_while_ours() {
        let (_t, dir) = dir_with(0o755, None);
        let path = dir.join("app.pid");
        let pid_file = PidFile::create(&path, 4242).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "4242\n");
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o7777, 0o644);
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1, "no temporary file is left");
        // Through a self-upgrade and back.
        let again = PidFile::take_handover(&pid_file.handover());
        assert_eq!(again, pid_file);
        again.remove();
        assert!(!path.exists());

        // Replaced by another file with the same content: not ours, left alone.
        let pid_file = PidFile::create(&path, 4242).unwrap();
        // (Written beside it first: a file made after ours is gone could reuse its inode number.)
        let other = dir.join("other");
        std::fs::write(&other, "4242\n").unwrap();
        std::fs::rename(&other, &path).unwrap();
        pid_file.remove();
        assert!(path.exists(), "someone else's file stays");
        // Same inode, another pid written in it: not ours either.
        std::fs::remove_file(&path).unwrap();
        let pid_file = PidFile::create(&path, 4242).unwrap();
        std::fs::write(&path, "1\n").unwrap();
        pid_file.remove();
        assert!(path.exists(), "a file holding another pid stays");
    }
}

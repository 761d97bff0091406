//! sockhold's private runtime directory, where the notify sockets live: where it is created,
//! the owner file that names the sockhold it belongs to, and the removal of the ones a killed
//! sockhold left behind; and the service's own `--runtime-directory` directories (systemd's
//! `RuntimeDirectory=`). Removing them at the end is [`super::Held`]'s.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use log::{info, warn};

/// Creates the `--runtime-directory` directories as systemd creates a `RuntimeDirectory=`:
/// missing parents 0755, the directory itself with `--runtime-directory-mode`, owned by
/// `--user` (an existing one is kept, and given that mode and owner). Returns the ones to
/// remove when sockhold ends: all of them, unless `--runtime-directory-preserve`.
pub(super) fn make_service_dirs(config: &crate::cli::Config) -> Result<Vec<PathBuf>> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let owner = match &config.world.user {
        Some(user) => Some(user.resolve().map_err(anyhow::Error::msg)?),
        None => None,
    };
    for dir in &config.runtime_directories {
        if let Some(parent) = dir.parent() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(parent)
                .with_context(|| format!("failed to create {}", parent.display()))?;
        }
        match std::fs::DirBuilder::new().mode(config.runtime_directory_mode).create(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => {}
            Err(e) => {
                return Err(e).with_context(|| format!("failed to create {}", dir.display()));
            }
        }
        // The umask narrowed the mode at mkdir; systemd's mode is the mode.
        let mode = std::fs::Permissions::from_mode(config.runtime_directory_mode);
        std::fs::set_permissions(dir, mode)
            .with_context(|| format!("failed to set the mode of {}", dir.display()))?;
        if let Some(owner) = &owner {
            std::os::unix::fs::lchown(dir, Some(owner.uid.as_raw()), Some(owner.gid.as_raw()))
                .with_context(|| format!("failed to give {} to the --user", dir.display()))?;
        }
        info!(
            "runtime directory {} ready (mode {:04o})",
            dir.display(),
            config.runtime_directory_mode
        );
    }
    Ok(if config.runtime_directory_preserve {
        Vec::new()
    } else {
        config.runtime_directories.clone()
    })
}

/// Creates a private directory for the notify sockets: under `$RUNTIME_DIRECTORY` (set by
/// systemd), `$XDG_RUNTIME_DIR`, `/run` for root, else `$TMPDIR` or `/tmp`. Its name is
/// random, so two instances never collide and nobody can plant a socket there first.
/// `$XDG_RUNTIME_DIR` belongs to sockhold's user alone (0700): not for children run as another.
/// It records its owner in [`OWNER_FILE`]; the directories of this name that a sockhold killed
/// with SIGKILL left behind are removed first (see [`remove_stale_runtime_dirs`]).
pub(super) fn make_runtime_dir(name: &str, other_user: bool) -> Result<PathBuf> {
    let from_env = |var: &str| std::env::var_os(var).filter(|v| !v.is_empty()).map(PathBuf::from);
    // systemd sets RUNTIME_DIRECTORY to a ':'-separated list when a unit has several.
    let first = |p: PathBuf| p.to_str().and_then(|s| s.split(':').next()).map(PathBuf::from);
    let base = from_env("RUNTIME_DIRECTORY")
        .and_then(first)
        .or_else(|| from_env("XDG_RUNTIME_DIR").filter(|_| !other_user))
        .or_else(|| {
            nix::unistd::geteuid().is_root().then(|| PathBuf::from("/run")).filter(|p| p.is_dir())
        })
        .or_else(|| from_env("TMPDIR"))
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    // Keep the path short: a Unix socket path must fit in 108 bytes.
    let short: String =
        name.chars().filter(|c| c.is_ascii_alphanumeric() || "-_.".contains(*c)).take(24).collect();
    let prefix = format!("sockhold-{short}.");
    remove_stale_runtime_dirs(&base, &prefix);
    let template = base.join(format!("{prefix}XXXXXX"));
    let dir = nix::unistd::mkdtemp(&template)
        .with_context(|| format!("failed to create a runtime directory in {}", base.display()))?;
    let me = std::process::id();
    let started = process_start_time(me).unwrap_or_default();
    let owner = format!("{me} {started} {}\n", pid_namespace().unwrap_or_default());
    std::fs::write(dir.join(OWNER_FILE), owner)
        .with_context(|| format!("failed to write {}", dir.join(OWNER_FILE).display()))?;
    Ok(dir)
}

/// The file in a runtime directory that names the sockhold owning it: `PID STARTTIME PIDNS`,
/// the start time as field 22 of `/proc/PID/stat`, so that a reused pid is not taken for the
/// owner, and the inode of its pid namespace, since a pid means something only in its own.
const OWNER_FILE: &str = "owner";

/// The inode of this process's pid namespace (`/proc/self/ns/pid`), if /proc shows it.
fn pid_namespace() -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self/ns/pid").ok().map(|m| m.ino())
}

/// When process `pid` started, in clock ticks since boot (`/proc/PID/stat`), if it exists.
fn process_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name, in parentheses, may contain spaces: count fields after its end.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(19)?.parse().ok()
}

/// Removes the runtime directories in `base` named `PREFIX*` that a sockhold killed without
/// cleaning up (SIGKILL, the OOM killer) left behind. One is stale only if it is a real directory
/// of sockhold's own uid, its owner file names a process of this pid namespace that is gone (or a
/// pid now used by a process started at another time), and no socket in it is still bound
/// (connecting to it is refused). A directory without an owner file is left alone: an older
/// sockhold's, or one that another sockhold is creating right now; so is one owned from another
/// pid namespace (a container sharing the directory), whose pids cannot be looked up here.
fn remove_stale_runtime_dirs(base: &Path, prefix: &str) {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(base) else { return };
    let uid = nix::unistd::geteuid().as_raw();
    for entry in entries.flatten() {
        let path = entry.path();
        if !entry.file_name().to_str().is_some_and(|n| n.starts_with(prefix)) {
            continue;
        }
        let Ok(meta) = std::fs::symlink_metadata(&path) else { continue };
        if !meta.is_dir() || meta.uid() != uid {
            continue;
        }
        let Ok(owner) = std::fs::read_to_string(path.join(OWNER_FILE)) else { continue };
        let mut fields = owner.split_whitespace().map(|f| f.parse::<u64>().ok());
        let (Some(Some(pid)), Some(started)) = (fields.next(), fields.next()) else { continue };
        let Ok(pid) = u32::try_from(pid) else { continue };
        // Written by a sockhold before the namespace was recorded: judged as before.
        if let Some(namespace) = fields.next() {
            if namespace.is_none() || namespace != pid_namespace() {
                continue;
            }
        }
        let alive = match process_start_time(pid) {
            Some(now) => started.is_none_or(|then| then == 0 || then == now),
            None => std::path::Path::new(&format!("/proc/{pid}")).exists(),
        };
        if alive || holds_a_bound_socket(&path) {
            continue;
        }
        match std::fs::remove_dir_all(&path) {
            Ok(()) => info!(
                "removed {}, left behind by sockhold pid {pid}, which is gone",
                path.display()
            ),
            Err(e) => warn!("failed to remove the stale {}: {e}", path.display()),
        }
    }
}

/// Whether a Unix datagram socket in `dir` is still bound by some process (another pid
/// namespace's sockhold sharing the directory, say): a connect to it succeeds.
fn holds_a_bound_socket(dir: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else { return true };
    entries.flatten().any(|entry| {
        use std::os::unix::fs::FileTypeExt;
        entry.file_type().is_ok_and(|t| t.is_socket())
            && std::os::unix::net::UnixDatagram::unbound()
                .and_then(|s| s.connect(entry.path()))
                .is_ok()
    })
}

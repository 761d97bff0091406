//! The child's world: `--user`, `--chdir`, `--env` and `--env-file`.
//!
//! It owns parsing those options, resolving the user (its uid, its gid or the named group's, its
//! supplementary groups) and reading the env files, and applying the result to a [`ChildSpec`].
//! Everything is resolved again before every spawn, so a reload picks up a changed env file, and a
//! user deleted since the start or a malformed env file fails that reload (the old generation keeps
//! serving) instead of starting a child with a half-right world. It also opens a generation's
//! notify socket to the child's user.
//!
//! Its errors are plain messages naming the input, not `anyhow` chains: at startup they are usage
//! errors (exit 2), and before a spawn they become the reason a generation failed to start.
//!
//! It must not fork, change sockhold's own credentials or decide anything about the lifecycle: the
//! credentials are changed in the child only, by `spawn`.

use std::ffi::CString;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use nix::unistd::{Gid, Group, Uid, User, getgrouplist};

use crate::spawn::{ChildSpec, Credentials};

/// What `--user USER[:GROUP]` names, not yet looked up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserSpec {
    /// A user name or a numeric uid.
    pub user: String,
    /// A group name or a numeric gid, if given; else the user's primary group.
    pub group: Option<String>,
}

impl FromStr for UserSpec {
    type Err = String;

    fn from_str(text: &str) -> Result<UserSpec, String> {
        let (user, group) = match text.split_once(':') {
            Some((user, group)) => (user, Some(group)),
            None => (text, None),
        };
        if user.is_empty() || group.is_some_and(str::is_empty) {
            return Err(format!("'{text}' is not USER or USER:GROUP"));
        }
        Ok(UserSpec { user: user.to_string(), group: group.map(str::to_string) })
    }
}

/// A numeric id, or `None` for a name. `-1` (4294967295) means "no change" to the kernel.
fn numeric_id(text: &str, what: &str) -> Result<Option<u32>, String> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Ok(None);
    }
    match text.parse::<u32>() {
        Ok(id) if id != u32::MAX => Ok(Some(id)),
        _ => Err(format!("'{text}' is not a valid {what} id")),
    }
}

impl UserSpec {
    /// Looks up the user, the group and the supplementary groups as `initgroups(3)` would.
    pub fn resolve(&self) -> Result<Credentials, String> {
        let name = &self.user;
        let uid = numeric_id(name, "user")?;
        let lookup = match uid {
            Some(uid) => User::from_uid(Uid::from_raw(uid)),
            None => User::from_name(name),
        };
        let user = lookup.map_err(|e| format!("failed to look up user '{name}': {e}"))?;
        let gid = match &self.group {
            Some(group) => Some(resolve_group(group)?),
            None => user.as_ref().map(|u| u.gid),
        };
        match (user, gid) {
            (Some(user), Some(gid)) => {
                let cname = CString::new(user.name.as_bytes())
                    .map_err(|_| format!("user name '{}' contains a NUL byte", user.name))?;
                let groups = getgrouplist(&cname, gid).map_err(|e| {
                    format!("failed to look up the groups of user '{}': {e}", user.name)
                })?;
                Ok(Credentials { user: user.name, uid: user.uid, gid, groups })
            }
            // A uid without an entry in the user database, as systemd allows: no name, so no
            // supplementary groups but the one given.
            (None, Some(gid)) if let Some(uid) = uid => Ok(Credentials {
                user: name.clone(),
                uid: Uid::from_raw(uid),
                gid,
                groups: vec![gid],
            }),
            (None, None) if uid.is_some() => Err(format!(
                "uid {name} has no entry in the user database: name its group too (--user {name}:GROUP)"
            )),
            (None, _) => Err(format!("unknown user '{name}'")),
            (Some(_), None) => unreachable!("a found user always has a primary group"),
        }
    }
}

/// A user name or a numeric uid (for `--user` and a socket's `owner=`).
pub fn resolve_uid(text: &str) -> Result<Uid, String> {
    if let Some(uid) = numeric_id(text, "user")? {
        return Ok(Uid::from_raw(uid));
    }
    match User::from_name(text) {
        Ok(Some(user)) => Ok(user.uid),
        Ok(None) => Err(format!("unknown user '{text}'")),
        Err(e) => Err(format!("failed to look up user '{text}': {e}")),
    }
}

/// A group name or a numeric gid (for `--user USER:GROUP` and a socket's `group=`).
pub fn resolve_group(text: &str) -> Result<Gid, String> {
    if let Some(gid) = numeric_id(text, "group")? {
        return Ok(Gid::from_raw(gid));
    }
    match Group::from_name(text) {
        Ok(Some(group)) => Ok(group.gid),
        Ok(None) => Err(format!("unknown group '{text}'")),
        Err(e) => Err(format!("failed to look up group '{text}': {e}")),
    }
}

/// One `--env-file PATH`; `-PATH` means a missing file is no error, as in systemd.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnvFile {
    /// The file to read.
    pub path: PathBuf,
    /// A missing file is skipped.
    pub optional: bool,
}

impl FromStr for EnvFile {
    type Err = String;

    fn from_str(text: &str) -> Result<EnvFile, String> {
        let (optional, path) = match text.strip_prefix('-') {
            Some(path) => (true, path),
            None => (false, text),
        };
        if path.is_empty() {
            return Err("an env file path cannot be empty".into());
        }
        Ok(EnvFile { path: PathBuf::from(path), optional })
    }
}

impl EnvFile {
    /// Reads and parses the file; a missing optional file gives nothing.
    pub fn read(&self) -> Result<Vec<(String, String)>, String> {
        let shown = self.path.display();
        match std::fs::read(&self.path) {
            Ok(bytes) => {
                let text = String::from_utf8(bytes)
                    .map_err(|_| format!("env file {shown} is not valid UTF-8"))?;
                parse_env_file(&text)
                    .map_err(|(line, why)| format!("env file {shown} line {line}: {why}"))
            }
            Err(e) if self.optional && e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(format!("cannot read env file {shown}: {e}")),
        }
    }
}

/// Variables sockhold sets itself (or strips), which `--env` and env files may not set.
fn is_reserved(name: &str) -> bool {
    name.starts_with("LISTEN_")
        || name == "NOTIFY_SOCKET"
        || name == "FDSTORE"
        || name.starts_with("SOCKHOLD_")
        || name.starts_with("WATCHDOG_")
}

/// Checks an environment variable name: a letter or `_`, then letters, digits and `_`, and not
/// one of sockhold's own.
fn check_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let valid = chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid {
        return Err(format!(
            "'{name}' is not a valid variable name (letters, digits and '_', not starting with a digit)"
        ));
    }
    if is_reserved(name) {
        return Err(format!(
            "{name} is set by sockhold itself (LISTEN_*, NOTIFY_SOCKET, FDSTORE, SOCKHOLD_*, WATCHDOG_*)"
        ));
    }
    Ok(())
}

/// Parses `--env K=V`.
pub fn parse_env_assignment(text: &str) -> Result<(String, String), String> {
    let Some((name, value)) = text.split_once('=') else {
        return Err(format!("'{text}' is not K=V"));
    };
    check_name(name)?;
    Ok((name.to_string(), value.to_string()))
}

/// Parses an env file as systemd's `EnvironmentFile=` reads the common cases: one `KEY=VALUE` per
/// line; blank lines and lines starting with `#` or `;` ignored; an optional `export ` prefix;
/// whitespace around the key and the value stripped; a value in single quotes taken literally, in
/// double quotes with `\"`, `\\`, `\$`, `` \` `` and `\n` (newline) unescaped. Not accepted:
/// continuation lines, a quoted value spanning lines, text after a closing quote. Errors carry
/// the 1-based line number.
pub fn parse_env_file(text: &str) -> Result<Vec<(String, String)>, (usize, String)> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let number = i + 1;
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        let line = line.strip_prefix("export ").map(str::trim_start).unwrap_or(line);
        let Some((key, value)) = line.split_once('=') else {
            return Err((number, format!("'{line}' is not KEY=VALUE")));
        };
        let key = key.trim();
        check_name(key).map_err(|e| (number, e))?;
        let value = unquote(value.trim()).map_err(|e| (number, e))?;
        out.push((key.to_string(), value));
    }
    Ok(out)
}

fn unquote(value: &str) -> Result<String, String> {
    let mut chars = value.chars();
    let quote = match chars.next() {
        Some(q @ ('"' | '\'')) => q,
        _ => return Ok(value.to_string()),
    };
    let mut out = String::new();
    let mut closed = false;
    while let Some(c) = chars.next() {
        match c {
            c if c == quote => {
                closed = true;
                break;
            }
            '\\' if quote == '"' => match chars.next() {
                Some('n') => out.push('\n'),
                Some(c @ ('"' | '\\' | '$' | '`')) => out.push(c),
                Some(c) => {
                    out.push('\\');
                    out.push(c);
                }
                None => break,
            },
            c => out.push(c),
        }
    }
    if !closed {
        return Err(format!("unterminated {quote} quote in {value}"));
    }
    let rest = chars.as_str().trim();
    if !rest.is_empty() {
        return Err(format!("unexpected '{rest}' after the closing quote"));
    }
    Ok(out)
}

/// `--user`, `--chdir`, `--env` and `--env-file` together.
#[derive(Clone, Debug, Default)]
pub struct ChildWorld {
    /// Run children as this user.
    pub user: Option<UserSpec>,
    /// The children's working directory.
    pub chdir: Option<PathBuf>,
    /// `--env`, in order.
    pub env: Vec<(String, String)>,
    /// `--env-file`, in order.
    pub env_files: Vec<EnvFile>,
}

impl ChildWorld {
    /// The variables to add, later ones winning: every env file in order, then every `--env`.
    pub fn environment(&self) -> Result<Vec<(String, String)>, String> {
        let mut out = Vec::new();
        for file in &self.env_files {
            out.extend(file.read()?);
        }
        out.extend(self.env.iter().cloned());
        Ok(out)
    }

    /// Resolves everything once, for a usage error at startup.
    pub fn check(&self) -> Result<(), String> {
        if let Some(user) = &self.user {
            user.resolve().map_err(|e| format!("invalid --user: {e}"))?;
        }
        self.environment().map(|_| ())
    }

    /// Resolves the user and reads the env files now, and puts the result into `spec`: the
    /// variables over sockhold's (sockhold's own, such as `LISTEN_FDS`, cannot be named), the
    /// credentials and the directory for the child to take on. With a user, the generation's
    /// notify socket (if any) is opened to it.
    pub fn apply(&self, spec: &mut ChildSpec, notify_socket: Option<&Path>) -> Result<(), String> {
        for (name, value) in self.environment()? {
            spec.env.retain(|(k, _)| k.as_os_str() != name.as_str());
            spec.env.push((name.into(), value.into()));
        }
        spec.user = self.user.as_ref().map(UserSpec::resolve).transpose()?;
        spec.chdir = self.chdir.clone();
        if let (Some(user), Some(path)) = (&spec.user, notify_socket) {
            open_notify_socket(path, user)?;
        }
        Ok(())
    }
}

/// Lets the child's user reach a generation's notify socket at `path`, and only that user.
///
/// sockhold's runtime directory is created 0700, so a child running as another user could not
/// reach the socket and notify readiness would never arrive. The narrowest change that works: the
/// directory becomes 0711 (others may traverse it but not list it), and the socket itself belongs
/// to the child's user with mode 0600 (sending needs write permission on it), so no third user can
/// speak for the generation. Every ancestor must be searchable by the user too; when one is not
/// (a 0700 `$RUNTIME_DIRECTORY`, say), the spawn fails here with the reason rather than timing out
/// later.
pub fn open_notify_socket(path: &Path, user: &Credentials) -> Result<(), String> {
    let shown = path.display();
    let dir = path.parent().ok_or_else(|| format!("{shown} has no directory"))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711))
        .map_err(|e| format!("cannot open {} to user {}: {e}", dir.display(), user.user))?;
    nix::unistd::chown(path, Some(user.uid), Some(user.gid))
        .map_err(|e| format!("cannot give {shown} to user {}: {e}", user.user))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("cannot set the mode of {shown}: {e}"))?;
    for ancestor in dir.ancestors() {
        let meta = std::fs::metadata(ancestor)
            .map_err(|e| format!("cannot inspect {}: {e}", ancestor.display()))?;
        if !searchable(&meta, user) {
            return Err(format!(
                "user {} cannot reach the notify socket {shown}: {} (mode {:o}, owner {}) is not searchable by it; make it so, or point RUNTIME_DIRECTORY or TMPDIR elsewhere",
                user.user,
                ancestor.display(),
                meta.mode() & 0o7777,
                meta.uid()
            ));
        }
    }
    Ok(())
}

/// Whether the directory's search bit applies to `user`, as the kernel checks it (ACLs aside).
fn searchable(meta: &std::fs::Metadata, user: &Credentials) -> bool {
    let mode = meta.mode();
    if user.uid.is_root() {
        return true;
    }
    if meta.uid() == user.uid.as_raw() {
        return mode & 0o100 != 0;
    }
    let in_group =
        user.gid.as_raw() == meta.gid() || user.groups.iter().any(|g| g.as_raw() == meta.gid());
    if in_group {
        return mode & 0o010 != 0;
    }
    mode & 0o001 != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn env_file_syntax() {
        let text = "\n# comment\n; also a comment\n  A=1\nexport B = two words \nC='single $x \\n'\nD=\"dq \\\" \\\\ \\n \\$ \\q\"\nE=\nF=a=b\n";
        assert_eq!(
            parse_env_file(text).unwrap(),
            pairs(&[
                ("A", "1"),
                ("B", "two words"),
                ("C", "single $x \\n"),
                ("D", "dq \" \\ \n $ \\q"),
                ("E", ""),
                ("F", "a=b"),
            ])
        );
    }

    #[test]
    fn env_file_errors_name_the_line() {
        for (text, line, needle) in [
            ("A=1\nno equals sign\n", 2, "is not KEY=VALUE"),
            ("1A=x", 1, "not a valid variable name"),
            ("A B=x", 1, "not a valid variable name"),
            ("\n\nX=\"open", 3, "unterminated"),
            ("X='a' b", 1, "after the closing quote"),
            ("LISTEN_FDS=3", 1, "set by sockhold itself"),
            ("#\nNOTIFY_SOCKET=/x", 2, "set by sockhold itself"),
        ] {
            let (got, why) = parse_env_file(text).unwrap_err();
            assert_eq!(got, line, "{text:?}");
            assert!(why.contains(needle), "{text:?}: {why}");
        }
    }

    #[test]
    fn env_assignments() {
        assert_eq!(parse_env_assignment("K=v=w"), Ok(("K".into(), "v=w".into())));
        assert_eq!(parse_env_assignment("_K="), Ok(("_K".into(), String::new())));
        assert!(parse_env_assignment("K").unwrap_err().contains("'K' is not K=V"));
        assert!(parse_env_assignment("=v").unwrap_err().contains("not a valid variable name"));
        for reserved in [
            "LISTEN_PID=1",
            "NOTIFY_SOCKET=x",
            "SOCKHOLD_GENERATION=1",
            "WATCHDOG_USEC=1",
            "FDSTORE=2",
        ] {
            let err = parse_env_assignment(reserved).unwrap_err();
            assert!(err.contains(reserved.split('=').next().unwrap()), "{err}");
        }
    }

    #[test]
    fn env_file_paths() {
        let f: EnvFile = "-/etc/x".parse().unwrap();
        assert_eq!(f, EnvFile { path: "/etc/x".into(), optional: true });
        assert!(!"/etc/x".parse::<EnvFile>().unwrap().optional);
        assert!("-".parse::<EnvFile>().is_err());
        let missing = EnvFile { path: "/nonexistent/sockhold-env".into(), optional: false };
        assert!(
            missing.read().unwrap_err().contains("cannot read env file /nonexistent/sockhold-env")
        );
        let optional = EnvFile { optional: true, ..missing };
        assert_eq!(optional.read(), Ok(Vec::new()));
    }

    #[test]
    fn precedence_files_in_order_then_env() {
        let dir = tempfile::tempdir().unwrap();
        let one = dir.path().join("one");
        let two = dir.path().join("two");
        std::fs::write(&one, "A=1\nB=1\nC=1\n").unwrap();
        std::fs::write(&two, "B=2\nC=2\n").unwrap();
        let world = ChildWorld {
            env: pairs(&[("C", "3")]),
            env_files: vec![
                EnvFile { path: one, optional: false },
                EnvFile { path: two, optional: false },
            ],
            ..ChildWorld::default()
        };
        let mut spec = ChildSpec {
            program: "x".into(),
            args: vec!["x".into()],
            env: vec![("A".into(), "0".into()), ("Z".into(), "0".into())],
            listen_pid: false,
            watchdog_pid: false,
            user: None,
            chdir: None,
        };
        world.apply(&mut spec, None).unwrap();
        let get = |k: &str| {
            let found: Vec<_> = spec.env.iter().filter(|(n, _)| n == k).collect();
            assert_eq!(found.len(), 1, "{k} set once");
            found[0].1.to_string_lossy().into_owned()
        };
        assert_eq!(
            (get("A"), get("B"), get("C"), get("Z")),
            ("1".into(), "2".into(), "3".into(), "0".into())
        );
    }

    #[test]
    fn user_specs() {
        assert_eq!(
            "www:web".parse(),
            Ok(UserSpec { user: "www".into(), group: Some("web".into()) })
        );
        assert_eq!("www".parse(), Ok(UserSpec { user: "www".into(), group: None }));
        for bad in ["", ":g", "u:"] {
            assert!(bad.parse::<UserSpec>().is_err(), "{bad}");
        }
        let root = UserSpec { user: "0".into(), group: None }.resolve().unwrap();
        assert_eq!((root.user.as_str(), root.uid.as_raw(), root.gid.as_raw()), ("root", 0, 0));
        let unknown = UserSpec { user: "no-such-user-x".into(), group: None }.resolve();
        assert_eq!(unknown.unwrap_err(), "unknown user 'no-such-user-x'");
        let bad_group = UserSpec { user: "root".into(), group: Some("no-such-group-x".into()) };
        assert_eq!(bad_group.resolve().unwrap_err(), "unknown group 'no-such-group-x'");
        let bare =
            UserSpec { user: "4000000".into(), group: Some("4000001".into()) }.resolve().unwrap();
        assert_eq!((bare.uid.as_raw(), bare.gid.as_raw()), (4000000, 4000001));
        assert_eq!(bare.groups, vec![Gid::from_raw(4000001)]);
        let no_group = UserSpec { user: "4000000".into(), group: None }.resolve();
        assert!(no_group.unwrap_err().contains("has no entry in the user database"));
    }
}

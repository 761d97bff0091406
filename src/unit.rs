//! `--unit PATH`: runs a service's own systemd `.socket`/`.service` units. The units (and
//! their drop-ins) are read here and translated into the sockhold command line they stand for;
//! the user's own options are merged over it, and the result is parsed by `cli.rs` like any
//! other command line, so every check of a hand-written one applies. Reading files is all the
//! I/O this module does: it must not bind, spawn or log (its warnings are returned).
//!
//! The syntax is `unit/syntax.rs`; what each directive means is `unit/translate.rs`.

pub(crate) mod syntax;
#[cfg(test)]
mod tests;
pub(crate) mod translate;

use std::collections::HashSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::CommandFactory;
use clap::parser::ValueSource;

pub use self::syntax::runtime_base;
use self::syntax::{Entry, Names, parse, specifiers};
use self::translate::{Translation, UnitEntries, translate};

/// Where systemd's system manager looks for units after the unit's own directory, highest
/// priority first.
pub const SEARCH_PATH: &[&str] = &[
    "/etc/systemd/system",
    "/run/systemd/system",
    "/lib/systemd/system",
    "/usr/lib/systemd/system",
];

/// A command line with its units read.
#[derive(Debug)]
pub struct Expanded {
    /// The full argv to parse (the user's own if there was no `--unit`).
    pub argv: Vec<OsString>,
    /// What the units say that sockhold does not do, one line each.
    pub warnings: Vec<String>,
    /// The equivalent sockhold command line, without `--unit` and `--print-config`, if
    /// `--unit` was given.
    pub equivalent: Option<Vec<OsString>>,
    /// `--print-config` was given: print `equivalent` rather than run.
    pub print: bool,
}

/// Why a command line with `--unit` could not be expanded.
#[derive(Debug)]
pub enum Error {
    /// The user's own arguments are not a valid command line.
    CommandLine(clap::Error),
    /// A unit could not be found, read or understood (a usage error).
    Unit(String),
}

/// Reads the units `--unit` names, if it is given, and returns the argv to parse: the units'
/// options first, then the user's, whose single-valued options win; a `-l` of the user's
/// replaces all the units' listeners, a COMMAND replaces `ExecStart=`, and `--env` adds to
/// `Environment=` (a key given twice takes the user's value).
pub fn expand(args: Vec<OsString>) -> Result<Expanded, Error> {
    let matches =
        crate::cli::Cli::command().try_get_matches_from(&args).map_err(Error::CommandLine)?;
    let unit = match matches.get_one::<PathBuf>("unit") {
        Some(unit) if matches.subcommand().is_none() => unit.clone(),
        _ => {
            return Ok(Expanded {
                argv: args,
                warnings: Vec::new(),
                equivalent: None,
                print: false,
            });
        }
    };
    let translation = load(&unit).map_err(Error::Unit)?;
    let given: HashSet<&str> = matches
        .ids()
        .map(|id| id.as_str())
        .filter(|id| matches.value_source(id) == Some(ValueSource::CommandLine))
        .collect();
    // COMMAND takes every word to the end (clap's indices count `--opt=value` as two words, so
    // they cannot place it in argv).
    let command_words = matches.get_raw("command").map_or(0, |words| words.len());
    let command_at = args.len() - command_words;
    // The user's words up to COMMAND, without --unit and --print-config (for the equivalent
    // command line; the argv to parse keeps them).
    let mut own = Vec::new();
    let mut words = args.iter().enumerate().skip(1);
    while let Some((i, word)) = words.next() {
        if i >= command_at {
            break;
        }
        let text = word.to_string_lossy();
        if text == "--unit" {
            words.next();
        } else if !(text.starts_with("--unit=") || text == "--print-config") {
            own.push(word.clone());
        }
    }
    let mut from_units: Vec<OsString> = Vec::new();
    for (id, words) in &translation.options {
        if !given.contains(id) || matches!(*id, "env" | "env_file") {
            from_units.extend(words.iter().map(OsString::from));
        }
    }
    // COMMAND: the user's (with the `--` before it, if any), else ExecStart='s after `--`.
    let command: Vec<OsString> = if given.contains("command") {
        let from = if command_at > 1 && args[command_at - 1] == "--" {
            command_at - 1
        } else {
            command_at
        };
        own.truncate(own.len() - usize::from(from < command_at));
        args[from..].to_vec()
    } else if translation.command.is_empty() {
        return Err(Error::Unit(format!(
            "{} has no ExecStart=, and no COMMAND was given after the options",
            unit.display()
        )));
    } else {
        std::iter::once(OsString::from("--"))
            .chain(translation.command.iter().map(OsString::from))
            .collect()
    };
    let mut argv = vec![args[0].clone()];
    argv.extend(from_units.iter().cloned());
    argv.extend(args[1..].iter().cloned());
    if !given.contains("command") {
        argv.extend(command.iter().cloned());
    }
    let mut equivalent = vec![OsString::from("sockhold")];
    equivalent.extend(from_units);
    equivalent.extend(own);
    equivalent.extend(command);
    let print = matches.get_flag("print_config");
    Ok(Expanded { argv, warnings: translation.warnings, equivalent: Some(equivalent), print })
}

/// Writes a command line so that a POSIX shell reads back the same words.
pub fn shell_line(words: &[OsString]) -> String {
    let quote = |w: &OsString| {
        let w = w.to_string_lossy();
        let plain = !w.is_empty()
            && w.chars().all(|c| c.is_ascii_alphanumeric() || "-_./:=,@%+".contains(c));
        if plain { w.into_owned() } else { format!("'{}'", w.replace('\'', r"'\''")) }
    };
    words.iter().map(quote).collect::<Vec<_>>().join(" ")
}

/// Reads the unit at `path` (a `.socket` with the service it activates, or a `.service`), with
/// drop-ins, and translates it.
pub fn load(path: &Path) -> Result<Translation, String> {
    let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if file_name.ends_with(".socket") {
        let socket = read_unit(dir, &file_name, "Socket")?;
        let service_name = service_of(&socket)?;
        let service = read_unit(dir, &service_name, "Service")
            .map_err(|e| format!("{e} (the service that {} activates)", socket.names.full))?;
        translate(Some(&socket), &service)
    } else if file_name.ends_with(".service") {
        translate(None, &read_unit(dir, &file_name, "Service")?)
    } else {
        Err(format!("--unit '{}': name a systemd .socket or .service unit", path.display()))
    }
}

/// The service a socket unit activates: `Service=`, else `NAME@.service` with `Accept=yes`,
/// else `NAME.service`.
fn service_of(socket: &UnitEntries) -> Result<String, String> {
    let last =
        |key: &str| socket.entries.iter().rev().find(|e| e.section == "Socket" && e.key == key);
    let accept =
        last("Accept").filter(|e| !e.value.is_empty()).map(translate::boolean).transpose()?;
    let prefix = socket.names.full.trim_end_matches(".socket");
    match last("Service").filter(|e| !e.value.is_empty()) {
        Some(entry) if accept == Some(true) => {
            Err(format!("{}: Service= does not go with Accept=yes", entry.at))
        }
        Some(entry) if !entry.value.ends_with(".service") => {
            Err(format!("{}: Service= must name a .service unit, not '{}'", entry.at, entry.value))
        }
        Some(entry) => specifiers(&entry.value, &socket.names)
            .map_err(|e| format!("{}: Service=: {e}", entry.at)),
        None if accept == Some(true) => Ok(format!("{prefix}@.service")),
        None => Ok(format!("{prefix}.service")),
    }
}

/// Finds a unit by name in `dir`, then in [`SEARCH_PATH`]; an instance `foo@bar.service` falls
/// back to its template `foo@.service`. Reads it and its drop-ins (`NAME.d/*.conf` in the same
/// directories, and the template's; a file name found twice is read from the first directory,
/// and all are read in lexical order of their names, as systemd does).
fn read_unit(dir: &Path, name: &str, section: &str) -> Result<UnitEntries, String> {
    let dirs: Vec<PathBuf> =
        std::iter::once(dir.to_path_buf()).chain(SEARCH_PATH.iter().map(PathBuf::from)).collect();
    let template = template_of(name);
    let candidates: Vec<&str> = std::iter::once(name).chain(template.as_deref()).collect();
    let found = candidates
        .iter()
        .find_map(|n| dirs.iter().map(|d| d.join(n)).find(|p| p.is_file()))
        .ok_or_else(|| {
            format!("unit {name} found in neither {} nor {}", dir.display(), SEARCH_PATH.join(", "))
        })?;
    let sections = ["Unit", section, "Install"];
    let mut entries = read_file(&found, &sections)?;
    let mut dropins: Vec<(String, PathBuf)> = Vec::new();
    for d in &dirs {
        for n in candidates.iter().rev() {
            let Ok(read) = std::fs::read_dir(d.join(format!("{n}.d"))) else { continue };
            for f in read.flatten() {
                let fname = f.file_name().to_string_lossy().into_owned();
                if fname.ends_with(".conf") && !dropins.iter().any(|(seen, _)| *seen == fname) {
                    dropins.push((fname, f.path()));
                }
            }
        }
    }
    dropins.sort();
    for (_, path) in dropins {
        entries.extend(read_file(&path, &sections)?);
    }
    let instance = name
        .split_once('@')
        .map(|(_, rest)| rest.rsplit_once('.').map_or(rest, |(i, _)| i).to_owned())
        .unwrap_or_default();
    Ok(UnitEntries { names: Names { full: name.to_owned(), instance }, entries })
}

/// `foo@.service` for `foo@bar.service`.
fn template_of(name: &str) -> Option<String> {
    let (prefix, rest) = name.split_once('@')?;
    let (instance, suffix) = rest.rsplit_once('.')?;
    (!instance.is_empty()).then(|| format!("{prefix}@.{suffix}"))
}

fn read_file(path: &Path, sections: &[&str]) -> Result<Vec<Entry>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("failed to read unit file {}: {e}", path.display()))?;
    parse(&text, &path.display().to_string(), sections)
}

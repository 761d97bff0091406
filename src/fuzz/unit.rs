//! systemd unit files (`--unit`): arbitrary text and soups of the grammar's pieces never panic
//! the parser or the translation, and every error names `file:line` of a line the file has;
//! quoted words split back into what they were made from; specifiers leave text without `%`
//! alone.

use proptest::prelude::*;

use super::soup;
use crate::unit::syntax::{Names, parse, specifiers, split_words};
use crate::unit::translate::{UnitEntries, translate};

#[rustfmt::skip]
const UNIT_PIECES: &[&str] = &[
    "\n", "\n", "\n", "[Socket]\n", "[Service]\n", "[Unit]\n", "[Install]\n", "[X-Own]\n", "[Mount]\n",
    "[", "]", "=", " ", "\\\n", "\\", "#", ";", "\"", "'", "%", "%n", "%i", "%t", "%%", "$", "${",
    "}", "$$", "@", "-", ":", "+", "!", "ListenStream=", "ListenDatagram=", "Accept=",
    "Accept=yes\n", "ExecStart=", "ExecStart=/bin/srv ", "Environment=", "EnvironmentFile=",
    "Type=", "notify", "simple", "forking", "Restart=", "always", "User=", "Group=", "root",
    "TimeoutStopSec=", "infinity", "5min", "KillSignal=", "SIGTERM", "RuntimeDirectory=",
    "SocketMode=", "0660", "Backlog=", "BindIPv6Only=", "both", "127.0.0.1:", "8080", "[::1]:",
    "/run/x.sock", "@abs", "StandardInput=", "socket", "MaxConnections=", "WatchdogSec=",
    "NotifyAccess=", "FileDescriptorStoreMax=", "ProtectSystem=strict\n", "ConditionPathExists=/x\n",
];

/// Parses `text` as both kinds of unit, translates what parses, and checks every error's
/// `file:line` prefix names a line of the text.
fn check(text: &str) -> Result<(), TestCaseError> {
    let lines = text.lines().count();
    let names = |full: &str| Names { full: full.into(), instance: String::new() };
    let check_error = |e: &str, file: &str| -> Result<(), TestCaseError> {
        let rest = e.strip_prefix(&format!("{file}:"));
        prop_assert!(rest.is_some(), "{} does not name {}", e, file);
        let line: usize = rest.unwrap().split(':').next().unwrap_or("").parse().unwrap_or(0);
        prop_assert!(line >= 1 && line <= lines.max(1), "{}: line {} of {}", e, line, lines);
        Ok(())
    };
    let socket = parse(text, "s.socket", &["Unit", "Socket", "Install"]);
    let service = parse(text, "s.service", &["Unit", "Service", "Install"]);
    if let Err(e) = &socket {
        check_error(e, "s.socket")?;
    }
    if let Err(e) = &service {
        check_error(e, "s.service")?;
    }
    if let Ok(service) = service {
        let service = UnitEntries { names: names("s.service"), entries: service };
        let socket = socket.ok().map(|entries| UnitEntries { names: names("s.socket"), entries });
        for with_socket in [socket.as_ref(), None] {
            match translate(with_socket, &service) {
                Ok(t) => {
                    for warning in &t.warnings {
                        prop_assert!(warning.starts_with("s."), "{}", warning);
                    }
                }
                Err(e) => {
                    let file = if e.starts_with("s.socket") { "s.socket" } else { "s.service" };
                    check_error(&e, file)?;
                }
            }
        }
    }
    Ok(())
}

/// A word as systemd would read it back: in double quotes, with `\` and `"` escaped.
fn quoted(word: &str) -> String {
    format!("\"{}\"", word.replace('\\', "\\\\").replace('"', "\\\""))
}

proptest! {
    #[test]
    fn arbitrary_text(text in any::<String>()) {
        check(&text)?;
    }

    #[test]
    fn soups_of_unit_pieces(text in soup(UNIT_PIECES, 60)) {
        check(&text)?;
    }

    #[test]
    fn quoted_words_split_back(words in prop::collection::vec("[^\0]{0,12}", 0..6)) {
        let line = words.iter().map(|w| quoted(w)).collect::<Vec<_>>().join(" ");
        prop_assert_eq!(split_words(&line).unwrap(), words);
    }

    #[test]
    fn specifiers_leave_plain_text_alone(text in "[^%]{0,40}", n in "[a-z]{1,8}") {
        let names = Names { full: format!("{n}.service"), instance: String::new() };
        prop_assert_eq!(specifiers(&text, &names).unwrap(), text.clone());
        prop_assert_eq!(specifiers(&format!("{text}%%%n"), &names).unwrap(), format!("{text}%{n}.service"));
    }
}

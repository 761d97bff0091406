//! systemd's unit file syntax as `systemd.syntax(7)` defines it, and nothing of what the
//! directives mean: `[Section]` headers, `KEY=VALUE` lines, `#` and `;` comments, a trailing
//! backslash continuing a line, the quoting of words (`"..."`, `'...'`, C escapes) and the `%`
//! specifiers. Pure: no file is read here, and every error names `file:line`.

use std::fmt;

/// Where a directive was written: the file as the user gave it, and its line (from 1).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Location {
    /// The file, as shown in messages.
    pub file: String,
    /// The line the directive starts on (continuation lines follow it).
    pub line: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file, self.line)
    }
}

/// One `KEY=VALUE` line of a section, continuation lines joined.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The section it is in, without brackets: `Socket`, `Service`, `Unit`, `Install`.
    pub section: String,
    /// The directive's name, as written.
    pub key: String,
    /// Its value, with the blanks around it removed.
    pub value: String,
    /// Where it was written.
    pub at: Location,
}

/// Parses one unit file (or drop-in). `sections` lists the sections this kind of unit may have;
/// `X-` sections are read and dropped, as systemd does. A line that is neither a comment, a
/// header nor an assignment, an unknown section, or an assignment before any section is an
/// error naming `file:line`.
pub fn parse(text: &str, file: &str, sections: &[&str]) -> Result<Vec<Entry>, String> {
    let mut entries = Vec::new();
    let mut section: Option<String> = None;
    let mut lines = text.lines().enumerate();
    while let Some((index, raw)) = lines.next() {
        let at = Location { file: file.to_owned(), line: index + 1 };
        let first = raw.trim();
        if first.is_empty() || first.starts_with('#') || first.starts_with(';') {
            continue;
        }
        // A backslash at the end continues the line; it becomes a blank, and comment lines
        // inside the continuation are skipped (systemd.syntax(7)).
        let mut line = String::from(first);
        while line.ends_with('\\') {
            line.pop();
            line.push(' ');
            let Some((_, next)) = lines.next() else { break };
            let next = next.trim();
            if next.starts_with('#') || next.starts_with(';') {
                line.push('\\');
                continue;
            }
            line.push_str(next);
        }
        let line = line.trim();
        if let Some(header) = line.strip_prefix('[') {
            let name = header
                .strip_suffix(']')
                .filter(|n| !n.is_empty() && !n.contains(['[', ']']))
                .ok_or_else(|| format!("{at}: malformed section header '{line}'"))?;
            if !name.starts_with("X-") && !sections.contains(&name) {
                return Err(format!(
                    "{at}: unknown section [{name}]: this unit may have [{}]",
                    sections.join("], [")
                ));
            }
            section = Some(name.to_owned());
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            return Err(format!(
                "{at}: '{line}' is neither KEY=VALUE, a [Section] header nor a comment"
            ));
        };
        let key = key.trim();
        if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || "-_".contains(c)) {
            return Err(format!("{at}: '{key}' is not a directive name in '{line}'"));
        }
        let Some(section) = &section else {
            return Err(format!("{at}: '{line}' comes before any [Section] header"));
        };
        if section.starts_with("X-") || key.starts_with("X-") {
            continue;
        }
        entries.push(Entry {
            section: section.clone(),
            key: key.to_owned(),
            value: value.trim().to_owned(),
            at,
        });
    }
    Ok(entries)
}

/// Splits a value into words as systemd's `extract_first_word` does with unquoting and C
/// escapes: blanks separate words, `"..."` and `'...'` keep them (`a"b c"` is one word, `""`
/// an empty one), and `\n`, `\t`, `\\`, `\"`, `\'`, `\;`, `\$`, `\xNN`, `\NNN` (octal) and `\s`
/// (a space) are escapes.
pub fn split_words(value: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut word: Option<String> = None;
    let mut quote: Option<char> = None;
    let mut chars = value.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, quote) {
            ('\\', _) => unescape(&mut chars, word.get_or_insert_with(String::new))?,
            (q @ ('"' | '\''), None) => {
                word.get_or_insert_with(String::new);
                quote = Some(q);
            }
            (q, Some(open)) if q == open => quote = None,
            (c, None) if c.is_whitespace() => words.extend(word.take()),
            (c, _) => word.get_or_insert_with(String::new).push(c),
        }
    }
    if let Some(q) = quote {
        return Err(format!("a {} quote is not closed", quote_name(q)));
    }
    words.extend(word);
    Ok(words)
}

fn quote_name(q: char) -> &'static str {
    if q == '"' { "double" } else { "single" }
}

/// One C escape after a backslash, as systemd's `cunescape` reads it.
fn unescape(
    chars: &mut std::iter::Peekable<std::str::Chars<'_>>,
    word: &mut String,
) -> Result<(), String> {
    let Some(c) = chars.next() else {
        return Err("the value ends with a lone backslash".into());
    };
    let simple = match c {
        'a' => Some('\x07'),
        'b' => Some('\x08'),
        'f' => Some('\x0c'),
        'n' => Some('\n'),
        'r' => Some('\r'),
        't' => Some('\t'),
        'v' => Some('\x0b'),
        's' => Some(' '),
        '\\' | '"' | '\'' | ';' | '$' => Some(c),
        _ => None,
    };
    if let Some(s) = simple {
        word.push(s);
        return Ok(());
    }
    let (radix, len) = match c {
        'x' => (16, 2),
        '0'..='7' => (8, 3),
        _ => return Err(format!("'\\{c}' is not an escape systemd knows")),
    };
    let mut digits = String::new();
    if radix == 8 {
        digits.push(c);
    }
    while digits.len() < len {
        match chars.next() {
            Some(d) if d.is_digit(radix) => digits.push(d),
            _ => return Err(format!("'\\{c}{digits}' is a short escape")),
        }
    }
    let code = u32::from_str_radix(&digits, radix).map_err(|e| e.to_string())?;
    match char::from_u32(code).filter(|&c| c != '\0') {
        Some(ch) => word.push(ch),
        None => {
            return Err(format!("the escape gives the character {code}, which a word cannot hold"));
        }
    }
    Ok(())
}

/// What the `%` specifiers of one unit stand for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Names {
    /// `%n`: the full unit name, `ssh@.service`.
    pub full: String,
    /// `%i`: the instance, between `@` and the suffix (empty for a template or a plain unit).
    pub instance: String,
}

impl Names {
    /// `%N`: the name without its type suffix.
    fn without_suffix(&self) -> &str {
        self.full.rsplit_once('.').map_or(&self.full, |(n, _)| n)
    }

    /// `%p`: the prefix, before `@` (or the whole name without suffix).
    fn prefix(&self) -> &str {
        let n = self.without_suffix();
        n.split_once('@').map_or(n, |(p, _)| p)
    }
}

/// Replaces the specifiers that mean something outside systemd: `%n %N %p %P %i %I %f %t %T %V
/// %S %C %L %E %%`. `%t` is /run for root, else `$XDG_RUNTIME_DIR`. Any other specifier is an
/// error, as in systemd (which refuses what it cannot resolve).
pub fn specifiers(text: &str, names: &Names) -> Result<String, String> {
    if !text.contains('%') {
        return Ok(text.to_owned());
    }
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('%') => out.push('%'),
            Some('n') => out.push_str(&names.full),
            Some('N') => out.push_str(names.without_suffix()),
            Some('p') => out.push_str(names.prefix()),
            Some('P') => out.push_str(&unescape_name(names.prefix())),
            Some('i') => out.push_str(&names.instance),
            Some('I') => out.push_str(&unescape_name(&names.instance)),
            Some('f') => {
                let base = if names.instance.is_empty() { names.prefix() } else { &names.instance };
                let path = unescape_name(base);
                if !path.starts_with('/') {
                    out.push('/');
                }
                out.push_str(&path);
            }
            Some('t') => out.push_str(&runtime_base()),
            Some('T') => out.push_str("/tmp"),
            Some('V') => out.push_str("/var/tmp"),
            Some('S') => out.push_str("/var/lib"),
            Some('C') => out.push_str("/var/cache"),
            Some('L') => out.push_str("/var/log"),
            Some('E') => out.push_str("/etc"),
            Some(other) => {
                return Err(format!(
                    "unknown specifier '%{other}' (sockhold knows %n %N %p %P %i %I %f %t %T %V %S %C %L %E %%)"
                ));
            }
            None => return Err("a lone '%' at the end (write '%%' for a percent sign)".into()),
        }
    }
    Ok(out)
}

/// `%t`: /run for root, `$XDG_RUNTIME_DIR` for anyone else (as systemd's user manager), else /run.
pub fn runtime_base() -> String {
    if nix::unistd::geteuid().is_root() {
        return "/run".into();
    }
    std::env::var("XDG_RUNTIME_DIR").ok().filter(|d| !d.is_empty()).unwrap_or_else(|| "/run".into())
}

/// systemd's unit name unescaping (`systemd-escape -u`): `-` is `/`, `\xNN` is that byte.
pub fn unescape_name(text: &str) -> String {
    let mut bytes = Vec::with_capacity(text.len());
    let raw = text.as_bytes();
    let mut i = 0;
    while i < raw.len() {
        match raw[i] {
            b'-' => bytes.push(b'/'),
            b'\\' if raw.get(i + 1) == Some(&b'x') => {
                match raw
                    .get(i + 2..i + 4)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    Some(b) => {
                        bytes.push(b);
                        i += 3;
                    }
                    None => bytes.push(b'\\'),
                }
            }
            b => bytes.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

//! The docs move with the code: every option `--help` prints is in the man page and in the
//! README's option table.

use std::process::Command;

use crate::support::sockhold_bin;

#[test]
fn man_page_covers_every_help_flag() {
    let man = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/man/sockhold.1"))
        .expect("man page");
    let mut total = 0;
    for args in [&["--help"][..], &["ctl", "--help"], &["ctl", "status", "--help"]] {
        let flags = help_options(args);
        total += flags.len();
        for flag in flags {
            let roff = flag.replace('-', "\\-");
            assert!(
                man.contains(&roff) || man.contains(&flag),
                "{flag} is in `sockhold {}` but not in man/sockhold.1",
                args.join(" ")
            );
        }
    }
    assert!(total >= 15, "found the flags in --help: {total}");
}

#[test]
fn bash_completion_completes_ctl_requests_and_flags() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/contrib/completions/sockhold.bash");
    let complete = |words: &str| {
        let snippet = format!(
            "source {script}; COMP_WORDS=({words}); COMP_CWORD=$((${{#COMP_WORDS[@]}} - 1)); _sockhold sockhold \"${{COMP_WORDS[COMP_CWORD]}}\" x; echo \"${{COMPREPLY[*]}}\""
        );
        let out = Command::new("bash").arg("-c").arg(snippet).output().expect("bash");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let ctl = complete("sockhold ctl ''");
    for request in ["status", "reload", "stop", "signal", "upgrade", "--control", "--timeout"] {
        assert!(ctl.split_whitespace().any(|w| w == request), "{request} not offered: {ctl}");
    }
    assert_eq!(complete("sockhold --ready-t").trim(), "--ready-timeout");
}

/// The long options of `sockhold --help`'s option lines (indented by at most 6 spaces; wrapped
/// descriptions are indented further).
fn help_options(args: &[&str]) -> std::collections::BTreeSet<String> {
    let help = Command::new(sockhold_bin()).args(args).output().expect("--help");
    assert!(help.status.success(), "{args:?}");
    String::from_utf8_lossy(&help.stdout)
        .lines()
        .filter(|line| {
            let indent = line.len() - line.trim_start().len();
            (2..=6).contains(&indent) && line.trim_start().starts_with('-')
        })
        .filter_map(|line| long_options(line).into_iter().next())
        .collect()
}

/// Every `--word` in `text`.
fn long_options(text: &str) -> Vec<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
        .filter(|w| w.len() > 2 && w.starts_with("--") && !w[2..].starts_with('-'))
        .map(str::to_string)
        .collect()
}

/// README.md's option table lists every option `--help` prints, and none it does not.
#[test]
fn readme_option_table_lists_every_help_option() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let section = readme.split("\n## Options\n").nth(1).expect("an Options section");
    let section = section.split("\n## ").next().unwrap_or_default();
    let table: std::collections::BTreeSet<String> = section
        .lines()
        .filter(|l| l.starts_with("| `-"))
        .flat_map(|l| long_options(l.split(" | ").next().unwrap_or_default()))
        .collect();
    let help = help_options(&["--help"]);
    assert!(help.len() >= 30, "found the options in --help: {help:?}");
    let missing: Vec<_> = help.difference(&table).collect();
    assert!(missing.is_empty(), "in --help but not in README.md's option table: {missing:?}");
    let stale: Vec<_> = table.difference(&help).collect();
    assert!(stale.is_empty(), "in README.md's option table but not in --help: {stale:?}");
}

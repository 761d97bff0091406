//! The docs move with the code: every flag `--help` prints is in the man page.

use std::process::Command;

use crate::support::sockhold_bin;

#[test]
fn man_page_covers_every_help_flag() {
    let help = Command::new(sockhold_bin()).arg("--help").output().expect("--help");
    assert!(help.status.success());
    let help = String::from_utf8_lossy(&help.stdout);
    let man = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/man/sockhold.1"))
        .expect("man page");
    let flags: Vec<&str> = help
        .split(|c: char| c.is_whitespace() || c == ',' || c == '[' || c == ']')
        .filter(|w| {
            w.starts_with("--")
                && w.len() > 2
                && w[2..].chars().all(|c| c.is_ascii_lowercase() || c == '-')
        })
        .collect();
    assert!(flags.len() >= 10, "found the flags in --help: {flags:?}");
    for flag in flags {
        let roff = flag.replace('-', "\\-");
        assert!(
            man.contains(&roff) || man.contains(flag),
            "{flag} is in --help but not in man/sockhold.1"
        );
    }
}

//! The docs move with the code: every flag `--help` prints is in the man page.

use std::process::Command;

use crate::support::sockhold_bin;

#[test]
fn man_page_covers_every_help_flag() {
    let man = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/man/sockhold.1"))
        .expect("man page");
    let mut total = 0;
    for args in [&["--help"][..], &["ctl", "--help"], &["ctl", "status", "--help"]] {
        let help = Command::new(sockhold_bin()).args(args).output().expect("--help");
        assert!(help.status.success(), "{args:?}");
        let help = String::from_utf8_lossy(&help.stdout);
        let flags: Vec<&str> = help
            .split(|c: char| c.is_whitespace() || c == ',' || c == '[' || c == ']')
            .filter(|w| {
                w.starts_with("--")
                    && w.len() > 2
                    && w[2..].chars().all(|c| c.is_ascii_lowercase() || c == '-')
            })
            .collect();
        total += flags.len();
        for flag in flags {
            let roff = flag.replace('-', "\\-");
            assert!(
                man.contains(&roff) || man.contains(flag),
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

//! The `DUR`, `SIG` and `--ready` arguments: arbitrary text never panics, and generated
//! durations, signals and ready modes read back as what they were made from.

use std::time::Instant;

use crate::signals::Signal;
use proptest::prelude::*;

use super::soup;
use crate::cli::{MAX_DURATION, parse_duration, parse_ready};
use crate::signals::{parse_signal, signal_name};
use crate::supervisor::ReadyMode;

#[rustfmt::skip]
const DURATION_PIECES: &[&str] = &[
    "0", "1", "9", "10", "500", "100", "101", "3155760000", "3155760001", "584542046090",
    "9223372036854775807", "18446744073709551615", "18446744073709551616",
    "99999999999999999999999", "ns", "us", "µs", "ms", "s", "sec", "m", "min", "h", "hr", "d",
    "days", "w", "M", "month", "y", "years", " ", "\t", ".", "-", "+", "e", "_", "\0",
];

/// Any duration accepted can be added to a deadline; a refused one is named in the error.
fn check_duration(text: &str) -> Result<(), TestCaseError> {
    match parse_duration(text) {
        Ok(d) => {
            prop_assert!(Instant::now().checked_add(d).is_some(), "{:?} overflows a deadline", d);
            prop_assert!(d <= MAX_DURATION, "{:?}", d);
        }
        Err(e) => prop_assert!(e.contains(&format!("'{}'", text.trim())), "{}", e),
    }
    Ok(())
}

/// Any signal accepted is a real one whose name reads back; a refused one is named.
fn check_signal(text: &str) -> Result<(), TestCaseError> {
    match parse_signal(text) {
        Ok(signal) => prop_assert_eq!(parse_signal(&signal_name(signal)), Ok(signal)),
        Err(e) => {
            prop_assert!(e.contains(&format!("'{text}' is not a signal")), "{}", e);
        }
    }
    Ok(())
}

/// `notify` is only `notify`, a delay only `delay:DUR`, a probe keeps its path or words, and a
/// refusal says why.
fn check_ready(text: &str) -> Result<(), TestCaseError> {
    match parse_ready(text) {
        Ok(ReadyMode::Notify) => prop_assert_eq!(text, "notify"),
        Ok(ReadyMode::Delay(d)) => {
            let dur = text.strip_prefix("delay:");
            prop_assert!(dur.is_some(), "{} is not delay:", text);
            prop_assert_eq!(parse_duration(dur.expect("checked")), Ok(d));
            prop_assert!(d <= MAX_DURATION);
        }
        Ok(ReadyMode::Http(path)) => {
            prop_assert_eq!(text, format!("http:{path}"));
            prop_assert!(path.starts_with('/'), "{}", path);
            prop_assert!(!path.chars().any(|c| c.is_ascii_whitespace() || c.is_ascii_control()));
        }
        Ok(ReadyMode::Exec(argv)) => {
            prop_assert!(text.starts_with("exec:"), "{}", text);
            prop_assert!(!argv.is_empty(), "{} gave no command", text);
        }
        Err(e) => prop_assert!(!e.trim().is_empty()),
    }
    Ok(())
}

proptest! {
    #[test]
    fn durations_from_arbitrary_strings(text in any::<String>()) {
        check_duration(&text)?;
    }

    #[test]
    fn durations_from_numbers_of_every_size(
        secs in any::<u64>(),
        unit in prop::sample::select(vec!["", "s", "ms", "m", "h", "d", "y"]),
    ) {
        check_duration(&format!("{secs}{unit}"))?;
    }

    #[test]
    fn durations_from_soups(text in soup(DURATION_PIECES, 8)) {
        check_duration(&text)?;
    }

    #[test]
    fn signals_from_arbitrary_strings(text in any::<String>()) {
        check_signal(&text)?;
    }

    #[test]
    fn signals_from_soups(text in soup(&[
        "SIG", "sig", "TERM", "term", "KILL", "USR1", "Usr2", "RTMIN", "+", "-", "0", "15",
        "64", "65", "2147483648", "4294967311", " ",
    ], 4)) {
        check_signal(&text)?;
    }

    #[test]
    fn every_signal_reads_in_every_spelling(
        signal in prop::sample::select(Signal::all()),
        upper in prop::collection::vec(any::<bool>(), 12),
    ) {
        let name = signal_name(signal);
        let mixed: String = name
            .chars()
            .zip(upper.iter().cycle())
            .map(|(c, &up)| if up { c } else { c.to_ascii_lowercase() })
            .collect();
        let number = signal.raw().to_string();
        let spellings =
            [name.clone(), format!("SIG{name}"), format!("sig{mixed}"), mixed, number];
        for text in spellings {
            prop_assert_eq!(parse_signal(&text), Ok(signal), "{}", text);
        }
    }

    #[test]
    fn ready_modes_from_soups(text in soup(&[
        "notify", "NOTIFY", "delay", "http", "exec", ":", "1s", "500ms", "18446744073709551615",
        "584542046090y", "/health", "true", " ",
    ], 5)) {
        check_ready(&text)?;
    }

    #[test]
    fn ready_modes_from_arbitrary_strings(text in any::<String>()) {
        check_ready(&text)?;
    }
}

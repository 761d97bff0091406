//! Fuzzing of every parser that reads input from outside sockhold: `--listen` specs
//! ([`crate::listen::ListenSpec`]), notify datagrams ([`crate::notify::NotifyMessage::parse`]),
//! control requests ([`crate::protocol::Request::parse`]) and the `DUR`, `SIG` and `--ready`
//! arguments ([`crate::cli`]), systemd unit files ([`crate::unit`]), and the self-upgrade state ([`crate::upgrade::State`]), which a
//! program must read back exactly as it was written and refuse with one field more or less.
//!
//! The toolchain is stable and the crate has no library target, so these are proptest
//! properties rather than cargo-fuzz targets. Each parser gets three kinds of input: arbitrary
//! bytes and strings; a "soup" of the pieces its grammar is made of (prefixes, separators,
//! option names, huge numbers), so that random input gets past the first check; and generated
//! valid input whose meaning is known, with what the parser must make of it.
//!
//! Every property runs proptest's default 256 cases, or `PROPTEST_CASES`, so that `cargo test`
//! stays quick; the README shows a long session. A failure found here becomes a plain regression
//! test next to the parser's own tests; proptest's record of failing seeds
//! (`proptest-regressions/`) stays out of the repository.

use proptest::prelude::*;

/// A string of `pieces` (mostly) and arbitrary characters, so that random input is made of the
/// grammar's own words and reaches the parser's later checks.
fn soup(pieces: &'static [&'static str], max_pieces: usize) -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        6 => prop::sample::select(pieces).prop_map(str::to_owned),
        1 => any::<char>().prop_map(String::from),
        1 => "[ -~]{1,4}",
        1 => "[0-9]{1,30}",
    ];
    prop::collection::vec(piece, 0..max_pieces).prop_map(|pieces| pieces.concat())
}

/// A number from `lo` to `hi`, its two ends far more often than chance would pick them.
fn edgy<T>(lo: T, hi: T) -> impl Strategy<Value = T>
where
    T: Copy + std::fmt::Debug + 'static,
    std::ops::RangeInclusive<T>: Strategy<Value = T>,
{
    prop_oneof![1 => Just(lo), 1 => Just(hi), 6 => lo..=hi]
}

/// Bytes without a newline: one line's worth.
fn line_bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>().prop_map(|b| if b == b'\n' { b' ' } else { b }), 0..max)
}

/// `s` cut to at most `max` bytes, on a character boundary.
fn truncate(mut s: String, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
    s
}

mod cli;
mod control;
mod listen;
mod notify;
mod state;
mod unit;

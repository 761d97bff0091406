//! Raw syscalls that are not spawning a child: one of the two rooms with `unsafe` (the other is
//! `spawn`, for fork/exec and what the child does between them).
//!
//! Whatever sockhold needs from the kernel that neither std nor nix offers safely comes through
//! here, each call behind a safe function with a `// SAFETY:` line on every block: adopting fds
//! ([`fd`]: inherited ones and `SCM_RIGHTS` ones, and whether two are one file), signalling and
//! waiting for processes ([`process`]: realtime signals, which nix cannot send or decode), and
//! the signal and panic handlers of the probation after a self-upgrade ([`probation`]), and
//! `bpf(2)` with the reuseport attachment for flow steering ([`bpf`]).
//!
//! This module must not decide anything: it makes calls that others decided on.

#![allow(unsafe_code)]

pub mod bpf;
pub mod fd;
pub mod probation;
pub mod process;

pub use fd::{adopt_inherited_fd, adopt_received_fd, borrow_inherited_fd, same_file};
pub use probation::{Probation, arm, disarm, forget_fds, monotonic_ns};
pub use process::{kill, killpg, peek_ended_child, reap};

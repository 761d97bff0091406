//! What sockhold does as an init: becoming a child subreaper (with `--subreaper`, and always as
//! PID 1, where the kernel re-parents every orphan of the pid namespace to it anyway) and arming
//! the death signal children get when sockhold dies (`--on-supervisor-death`).
//!
//! Reaping itself is the event loop's: it waits for every child, orphans included. As PID 1,
//! sockhold gets only the signals it has handlers for; `signals` installs them for every signal
//! it acts on, so TERM, INT, HUP, USR2 and the forwarded ones work as they do elsewhere. This
//! module must not decide anything about the lifecycle.

use anyhow::{Context, Result};
use log::info;

use crate::cli::Config;

/// Applies the process-wide settings of `config` before anything is spawned.
pub fn apply(config: &Config) -> Result<()> {
    if config.subreaper {
        nix::sys::prctl::set_child_subreaper(true)
            .context("failed to become a child subreaper (PR_SET_CHILD_SUBREAPER)")?;
        if std::process::id() == 1 {
            info!("running as PID 1: reaping every orphan of this pid namespace");
        } else {
            info!("--subreaper: orphaned descendants are re-parented to sockhold and reaped");
        }
    }
    crate::spawn::set_death_signal(config.death_signal);
    Ok(())
}

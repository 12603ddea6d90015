//! INT, TERM and HUP turned into an orderly unwind.
//!
//! The handler records the signal and sends SIGTERM to the process group of every external
//! command running at that moment (each runs in a group of its own, see [`crate::cmd`]), so a
//! long apt-get or debootstrap ends at once and the build unwinds through its guards. Code
//! between steps calls [`check`].

use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering};

use anyhow::{Result, bail};

/// The signal that interrupted the build (0 = none).
pub static INTERRUPTED: AtomicUsize = AtomicUsize::new(0);

/// Process groups of the external commands running now (0 = free slot).
static CHILD_GROUPS: [AtomicI32; 8] = [const { AtomicI32::new(0) }; 8];

/// Installs the handlers for SIGINT, SIGTERM and SIGHUP.
pub fn install() -> Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    for sig in [SIGINT, SIGTERM, SIGHUP] {
        // SAFETY: the handler only touches atomics and calls kill(2), both async-signal-safe.
        unsafe {
            signal_hook::low_level::register(sig, move || {
                INTERRUPTED.store(sig as usize, Ordering::SeqCst);
                terminate_children();
            })
        }
        .map_err(|e| anyhow::anyhow!("installing a handler for signal {sig}: {e}"))?;
    }
    Ok(())
}

fn terminate_children() {
    for slot in &CHILD_GROUPS {
        let pgid = slot.load(Ordering::SeqCst);
        if pgid > 0 {
            // SAFETY: kill(2) is async-signal-safe; a negative pid addresses the group.
            unsafe {
                libc::kill(-pgid, libc::SIGTERM);
            }
        }
    }
}

/// The signal number that interrupted the build, if any.
pub fn interrupted() -> Option<i32> {
    match INTERRUPTED.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s as i32),
    }
}

/// Forgets a recorded signal: for a SIGINT meant for an interactive program the build ran in
/// the foreground (the `--shell`), not for the build.
pub fn forget() {
    INTERRUPTED.store(0, Ordering::SeqCst);
}

/// Fails when a signal asked the build to stop.
pub fn check() -> Result<()> {
    if let Some(sig) = interrupted() {
        let name = nix::sys::signal::Signal::try_from(sig)
            .map(|s| s.as_str())
            .unwrap_or("a signal");
        bail!("interrupted by {name}");
    }
    Ok(())
}

/// Registers a running child's process group so that a signal ends it; unregisters on drop.
pub struct ChildGroup {
    slot: Option<usize>,
}

impl ChildGroup {
    /// Registers `pgid`; when a signal already arrived, the group is terminated right away.
    pub fn register(pgid: i32) -> ChildGroup {
        let slot = CHILD_GROUPS.iter().position(|s| {
            s.compare_exchange(0, pgid, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
        });
        if slot.is_none() {
            tracing::warn!(
                "more than {} commands at once: process group {pgid} is not tracked",
                CHILD_GROUPS.len()
            );
        }
        if interrupted().is_some() {
            // SAFETY: plain kill(2) on a group we created.
            unsafe {
                libc::kill(-pgid, libc::SIGTERM);
            }
        }
        ChildGroup { slot }
    }
}

impl Drop for ChildGroup {
    fn drop(&mut self) {
        if let Some(i) = self.slot {
            CHILD_GROUPS[i].store(0, Ordering::SeqCst);
        }
    }
}

/// Sends SIGKILL to a process group that outlived SIGTERM.
pub fn kill_group(pgid: i32) {
    // SAFETY: plain kill(2) on a group we created.
    unsafe {
        libc::kill(-pgid, libc::SIGKILL);
    }
}

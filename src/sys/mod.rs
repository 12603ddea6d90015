//! Kernel-facing pieces of a build: loop devices, mounts, the private mount namespace and the
//! processes left behind in a chroot.
//!
//! Every resource acquired here is a `#[must_use]` guard with an explicit `close()` for the success
//! path and a best-effort `Drop` that logs instead of panicking.

pub mod loopdev;
pub mod mkfs;
pub mod mount;
pub mod namespace;
pub mod procs;

/// A token unique across processes, PID namespaces and hosts sharing a directory, for the names
/// of temporary files (every build process is PID 2 of its own namespace, so a PID is not).
pub fn unique_token() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/uuid")
        .map(|u| u.trim().replace('-', ""))
        .unwrap_or_else(|_| {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            format!("{t:x}")
        })
}

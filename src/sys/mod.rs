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

//! The Debian side of a build: debootstrap, apt (sources, pins, build-only settings) and the
//! system configuration written into the image.

pub mod apt;
pub mod bootstrap;
pub mod configure;
pub mod debootstrap;
pub mod fetch;
pub mod index;
pub mod initramfs;
pub mod install;
pub mod lock;
pub mod mirror;
pub mod mmdebstrap;
pub mod release;
pub mod settings;
pub mod trees;

/// The clean environment of programs run in the chroot (see [`crate::root::Root::command`]);
/// host post scripts get it too.
pub use crate::root::CHROOT_ENV;

//! The Debian side of a build: debootstrap, apt (sources, pins, build-only settings) and the
//! system configuration written into the image.

pub mod apt;
pub mod configure;
pub mod debootstrap;
pub mod index;
pub mod mmdebstrap;
pub mod settings;

use std::path::Path;
use std::process::Command;

/// The environment every program run inside the chroot gets: nothing from the caller's
/// environment leaks in (no locale, proxy or terminal settings debconf could trip on).
pub const CHROOT_ENV: &[(&str, &str)] = &[
    (
        "PATH",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    ),
    ("DEBIAN_FRONTEND", "noninteractive"),
    ("DEBCONF_NONINTERACTIVE_SEEN", "true"),
    ("LC_ALL", "C"),
    ("LANG", "C"),
    ("HOME", "/root"),
];

/// A command that runs `program` inside `root` with the clean chroot environment.
pub fn chroot_command(root: &Path, program: &str) -> Command {
    let mut cmd = Command::new("chroot");
    cmd.arg(root)
        .arg(program)
        .env_clear()
        .envs(CHROOT_ENV.iter().copied());
    cmd
}

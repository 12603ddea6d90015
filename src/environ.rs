//! The environment debimg's builds and the programs it starts hold: an allowlist, never what
//! the caller had.
//!
//! A build runs code its spec and its packages bring as root (post scripts, maintainer
//! scripts), and every process of the build's PID namespace can read `/proc/1/environ`: a
//! token, a password in a URL or a cloud key in the caller's environment would be theirs to
//! print. So a build process re-executes itself with [`KEPT`] alone before anything else runs
//! ([`reexec_clean`]), and the service starts its builds and hooks with [`clean`].

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::process::Command;

/// The variables a build (and whatever the service starts) keeps: the search path, the
/// locale and time zone, the terminal, where temporary files go, the reproducible builds'
/// epoch, debimg's own log filter and its test fault hook.
pub const KEPT: &[&str] = &[
    "PATH",
    "HOME",
    "LANG",
    "LANGUAGE",
    "TZ",
    "TERM",
    "TMPDIR",
    "NO_COLOR",
    "SOURCE_DATE_EPOCH",
    "RUST_BACKTRACE",
    "DEBIMG_LOG",
    crate::stage::FAULT_ENV,
];

/// Whether the variable `name` is kept (the `LC_*` locale categories are).
pub fn is_kept(name: &OsStr) -> bool {
    let b = name.as_bytes();
    KEPT.iter().any(|k| k.as_bytes() == b)
        || (b.len() > 3
            && b.starts_with(b"LC_")
            && b[3..].iter().all(|c| c.is_ascii_uppercase() || *c == b'_'))
}

/// The kept part of `vars`.
pub fn kept(vars: impl IntoIterator<Item = (OsString, OsString)>) -> Vec<(OsString, OsString)> {
    vars.into_iter().filter(|(k, _)| is_kept(k)).collect()
}

/// Gives `cmd` the kept part of this process's environment and nothing else (what it sets
/// with `env` afterwards is added).
pub fn clean(cmd: &mut Command) -> &mut Command {
    cmd.env_clear().envs(kept(std::env::vars_os()))
}

/// Re-executes this program with the kept part of its environment when it holds anything
/// else: the bytes of the first environment stay readable in `/proc/PID/environ` for as long
/// as the process lives, whatever it unsets, so only a new program image forgets them.
/// Returns when there is nothing to forget; call it before any thread starts.
pub fn reexec_clean() -> anyhow::Result<()> {
    use anyhow::Context;
    use std::ffi::CString;
    if std::env::vars_os().all(|(k, _)| is_kept(&k)) {
        return Ok(());
    }
    let cstr = |b: &[u8]| CString::new(b).context("an argument or variable holds a NUL byte");
    let args: Vec<CString> = std::env::args_os()
        .map(|a| cstr(a.as_bytes()))
        .collect::<anyhow::Result<_>>()?;
    let env: Vec<CString> = kept(std::env::vars_os())
        .into_iter()
        .map(|(k, v)| cstr(&[k.as_bytes(), b"=", v.as_bytes()].concat()))
        .collect::<anyhow::Result<_>>()?;
    let exe = cstr(b"/proc/self/exe")?;
    let e = nix::unistd::execve(&exe, &args, &env).unwrap_err();
    Err(anyhow::anyhow!(
        "re-executing debimg with a clean environment: {e}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_allowlist_is_kept() {
        for k in [
            "PATH",
            "LC_ALL",
            "LC_CTYPE",
            "TZ",
            "SOURCE_DATE_EPOCH",
            "DEBIMG_LOG",
        ] {
            assert!(is_kept(OsStr::new(k)), "{k}");
        }
        for k in [
            "DEBIMG_TOKEN",
            "DEBIMG_AMQP",
            "AWS_SECRET_ACCESS_KEY",
            "http_proxy",
            "LC_",
            "LC_all",
            "PATHX",
            "LD_PRELOAD",
        ] {
            assert!(!is_kept(OsStr::new(k)), "{k}");
        }
    }

    #[test]
    fn a_clean_command_sees_none_of_ours() {
        let mut cmd = Command::new("/usr/bin/env");
        // SAFETY: the test sets a variable no other test reads.
        unsafe { std::env::set_var("DEBIMG_TEST_SECRET_ENV", "s3cret") };
        let out = clean(&mut cmd).env("ADDED", "1").output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(!text.contains("s3cret"), "{text}");
        assert!(text.contains("ADDED=1"), "{text}");
        assert!(text.lines().all(|l| {
            let k = l.split('=').next().unwrap();
            k == "ADDED" || is_kept(OsStr::new(k))
        }));
    }
}

//! The private mount namespace a build runs in.
//!
//! Every mount of a build happens in a namespace of its own whose `/` is recursively private, so
//! nothing propagates to the host (kiwi once unmounted a host's /dev/pts through a shared bind
//! mount), and the mounts die with the last process in the namespace even when no cleanup runs.

use std::fs;

use anyhow::{Context, Result, bail};
use nix::mount::MsFlags;
use nix::sched::CloneFlags;

/// Moves this process into a new mount namespace and makes every mount in it private.
///
/// Must run before the process starts any thread: `unshare(CLONE_NEWNS)` is refused (`EINVAL`) in a
/// multi-threaded process, so this checks first and says so. There is no way back and nothing to
/// close: the namespace lives as long as a process in it does.
pub fn enter_private_mount_namespace() -> Result<()> {
    let threads = thread_count().context("counting this process's threads")?;
    if threads != 1 {
        bail!(
            "entering a private mount namespace: the process already runs {threads} threads; \
             unshare(CLONE_NEWNS) only works before any thread is started"
        );
    }
    unshare_private(CloneFlags::CLONE_NEWNS)?;
    tracing::debug!("entered a private mount namespace");
    Ok(())
}

/// Unshares `flags` (which include CLONE_NEWNS) and makes `/` recursively private in the new
/// mount namespace: it copies the host's propagation, and a shared `/` would still send our
/// mounts back to the host.
pub fn unshare_private(flags: CloneFlags) -> Result<()> {
    nix::sched::unshare(flags).context("unsharing the mount (and PID) namespace")?;
    nix::mount::mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .context("making / recursively private in the new mount namespace")
}

/// Where the isolation processes forward INT, TERM and HUP (0 = nowhere yet).
static FORWARD_TO: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

fn forward_signals() -> Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    for sig in [SIGINT, SIGTERM, SIGHUP] {
        // SAFETY: the handler reads an atomic and calls kill(2), both async-signal-safe.
        unsafe {
            signal_hook::low_level::register(sig, move || {
                let pid = FORWARD_TO.load(std::sync::atomic::Ordering::SeqCst);
                if pid > 0 {
                    libc::kill(pid, sig);
                }
            })
        }
        .with_context(|| format!("installing a forwarder for signal {sig}"))?;
    }
    Ok(())
}

/// Runs a build (`body`) the way `debimg build` does: in PID and mount namespaces of its own
/// (see [`run_isolated`]), with INT, TERM and HUP turned into an orderly unwind. An error is
/// printed on stderr (credentials masked) unless it was already; the result is the exit code.
/// Call it before any thread starts.
pub fn isolated(
    body: impl FnOnce() -> std::result::Result<(), crate::error::Error>,
) -> std::result::Result<u8, crate::error::Error> {
    use crate::error::Error;
    run_isolated(|| {
        let res = crate::signals::install()
            .map_err(|e| Error::classify(e, None))
            .and_then(|()| body());
        match res {
            Ok(()) => 0,
            Err(e) => {
                if !e.is_reported() {
                    eprintln!("error: {}", crate::redact::text(&e.to_string()));
                }
                e.exit_code()
            }
        }
    })
    .map_err(|e| Error::classify(e, None))
}

/// [`isolated`] for a command: `body` in PID and mount namespaces of its own, so that no mount
/// reaches the host and nothing of it outlives this process, even killed with SIGKILL; `Ok`
/// when it succeeded, else the error of its exit code (already printed). Call it before any
/// thread starts.
pub fn in_namespaces(
    body: impl FnOnce() -> std::result::Result<(), crate::error::Error>,
) -> std::result::Result<(), crate::error::Error> {
    match isolated(body)? {
        0 => Ok(()),
        c => Err(crate::error::Error::exited(c)),
    }
}

/// Runs `body` in a new PID and mount namespace that cannot outlive this process.
///
/// Three processes: this one (the supervisor) stays in the host's PID namespace, forwards INT,
/// TERM and HUP and returns the exit code; its child is PID 1 of the new namespace, dies with
/// the supervisor (`PR_SET_PDEATHSIG`), reaps orphans and forwards signals; its child runs
/// `body`. When the supervisor is killed, even with SIGKILL, the kernel kills PID 1 and with it
/// every process of the namespace (apt, dpkg, daemons from maintainer scripts); the mount
/// namespace then has no process left, so its mounts go and autoclear loop devices detach.
///
/// Must be called before any thread starts. Returns in the supervisor only.
pub fn run_isolated(body: impl FnOnce() -> u8) -> Result<u8> {
    use nix::sys::wait::{WaitStatus, waitpid};
    use nix::unistd::{ForkResult, fork};

    let threads = thread_count().context("counting this process's threads")?;
    if threads != 1 {
        bail!("isolating the build: the process already runs {threads} threads");
    }
    unshare_private(CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWPID)?;
    // The init learns of the supervisor's death before PDEATHSIG is armed through this pipe.
    let (alive_r, alive_w) = nix::unistd::pipe().context("creating a pipe")?;
    forward_signals()?;
    // SAFETY: single-threaded (checked above), so the child may run arbitrary code.
    match unsafe { fork() }.context("forking the namespace's init")? {
        ForkResult::Parent { child } => {
            drop(alive_r);
            FORWARD_TO.store(child.as_raw(), std::sync::atomic::Ordering::SeqCst);
            let code = loop {
                match waitpid(child, None) {
                    Ok(WaitStatus::Exited(_, code)) => break code as u8,
                    Ok(WaitStatus::Signaled(_, sig, _)) => break 128 + sig as u8,
                    Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
                    Err(e) => return Err(e).context("waiting for the build's namespace"),
                }
            };
            drop(alive_w);
            Ok(code)
        }
        ForkResult::Child => {
            drop(alive_w);
            // SAFETY: prctl with an integer argument.
            unsafe {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            }
            if supervisor_gone(&alive_r) {
                std::process::exit(1);
            }
            // SAFETY: still single-threaded.
            match unsafe { fork() } {
                Ok(ForkResult::Parent { child }) => {
                    FORWARD_TO.store(child.as_raw(), std::sync::atomic::Ordering::SeqCst);
                    let code = loop {
                        match waitpid(None, None) {
                            Ok(WaitStatus::Exited(pid, code)) if pid == child => break code,
                            Ok(WaitStatus::Signaled(pid, sig, _)) if pid == child => {
                                break 128 + sig as i32;
                            }
                            Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
                            Err(_) => break 1,
                        }
                    };
                    // Leaving kills whatever is still in the namespace.
                    std::process::exit(code)
                }
                Ok(ForkResult::Child) => {
                    drop(alive_r);
                    let code = body();
                    std::process::exit(i32::from(code))
                }
                Err(e) => {
                    eprintln!("error: forking the build process: {e}");
                    std::process::exit(1)
                }
            }
        }
    }
}

/// True when the read end of the liveness pipe shows its writer (the supervisor) is gone.
fn supervisor_gone(r: &std::os::fd::OwnedFd) -> bool {
    use std::os::fd::AsRawFd;
    let mut pfd = libc::pollfd {
        fd: r.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, no timeout.
    let n = unsafe { libc::poll(&mut pfd, 1, 0) };
    n > 0 && pfd.revents & libc::POLLHUP != 0
}

/// The `Threads:` count from /proc/self/status.
fn thread_count() -> Result<u64> {
    let status = fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    parse_threads(&status).context("no Threads: line in /proc/self/status")
}

fn parse_threads(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    use std::sync::{Arc, Barrier};
    use std::thread;

    use nix::fcntl::OFlag;
    use nix::sys::wait::{WaitStatus, waitpid};
    use nix::unistd::{ForkResult, fork, pipe2, read, write};

    #[test]
    fn parses_thread_count() {
        assert_eq!(
            parse_threads("Name:\tx\nThreads:\t7\nSigQ:\t0/1\n"),
            Some(7)
        );
        assert_eq!(parse_threads("Name:\tx\n"), None);
    }

    #[test]
    fn refuses_in_a_multi_threaded_process() {
        // Keep a second thread alive for the check, even under --test-threads=1.
        let barrier = Arc::new(Barrier::new(2));
        let other = {
            let barrier = Arc::clone(&barrier);
            thread::spawn(move || barrier.wait())
        };
        let err = enter_private_mount_namespace().unwrap_err();
        barrier.wait();
        other.join().unwrap();
        assert!(format!("{err:#}").contains("threads"), "{err:#}");
    }

    fn is_mount_point(dir: &std::path::Path) -> bool {
        let text = fs::read("/proc/self/mountinfo").unwrap();
        crate::sys::mount::parse_mountinfo(&text)
            .unwrap()
            .iter()
            .any(|e| e.mount_point == dir)
    }

    /// A forked child (single-threaded, as the real builder is when it calls this) enters the
    /// namespace, mounts a tmpfs and waits; meanwhile the parent must not see that mount.
    ///
    /// The test harness is multi-threaded, so the child keeps to little more than system calls:
    /// glibc makes malloc safe after fork, no lock of ours is held, and the child always leaves
    /// through `_exit` without running the harness's code.
    #[test]
    fn mounts_in_the_namespace_stay_out_of_the_host() {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("skipping: needs root to unshare and mount");
            return;
        }
        let dir = tempfile::Builder::new()
            .prefix("debimg-ns-test-")
            .tempdir_in("/var/tmp")
            .unwrap();
        let target = dir.path().canonicalize().unwrap();
        let target_c = CString::new(target.as_os_str().as_bytes()).unwrap();
        // CLOEXEC: programs other test threads start must not hold these pipes open.
        let (report_rx, report_tx) = pipe2(OFlag::O_CLOEXEC).unwrap();
        let (release_rx, release_tx) = pipe2(OFlag::O_CLOEXEC).unwrap();

        // SAFETY: the child only runs the code below and leaves through _exit.
        match unsafe { fork() }.unwrap() {
            ForkResult::Child => {
                drop(report_rx);
                drop(release_tx);
                let code = std::panic::catch_unwind(|| {
                    if enter_private_mount_namespace().is_err() {
                        return 2;
                    }
                    // SAFETY: plain mount(2) with NUL-terminated strings.
                    let rc = unsafe {
                        libc::mount(
                            c"tmpfs".as_ptr(),
                            target_c.as_ptr(),
                            c"tmpfs".as_ptr(),
                            0,
                            std::ptr::null(),
                        )
                    };
                    if rc != 0 {
                        return 3;
                    }
                    if !is_mount_point(&target) {
                        return 4;
                    }
                    0
                })
                .unwrap_or(5);
                let _ = write(&report_tx, &[code as u8]);
                // Keep the namespace alive until the parent has looked (EOF when it lets go).
                let _ = read(&release_rx, &mut [0u8; 1]);
                // SAFETY: leaves the child without running the parent's destructors or harness.
                unsafe { libc::_exit(code) }
            }
            ForkResult::Parent { child } => {
                drop(report_tx);
                drop(release_rx);
                let mut code = [9u8; 1];
                let n = read(&report_rx, &mut code).unwrap();
                let seen_from_host = is_mount_point(&target);
                drop(release_tx);
                let status = waitpid(child, None).unwrap();
                assert_eq!(n, 1, "child reported nothing");
                assert_eq!(code[0], 0, "child failed at step {}", code[0]);
                assert_eq!(status, WaitStatus::Exited(child, 0));
                assert!(
                    !seen_from_host,
                    "the child's mount leaked into the parent's namespace"
                );
            }
        }
    }
}

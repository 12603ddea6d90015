//! Processes left running inside a build root: finding them and ending them.
//!
//! Maintainer scripts start daemons (gpg-agent, dirmngr, udevd) that outlive the install and keep
//! the root's mounts busy. They are found by their `/proc/PID/root`, sent SIGTERM, given a grace
//! period, then SIGKILLed. Signals go through pidfds, so a pid reused by an unrelated process in
//! the meantime is never signalled.

use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::errno::Errno;
use nix::sys::signal::Signal;

/// How long SIGKILLed processes get to disappear before we give up on them.
const KILL_WAIT: Duration = Duration::from_secs(5);
/// How far up from a process's root we walk looking for the build root.
const MAX_ROOT_DEPTH: usize = 256;

/// Ends every process (other than this one) whose root directory is `root` or inside it; returns
/// the pids found.
///
/// A process matches when `readlink /proc/PID/root` is at or below `root`, or when `root`'s device
/// and inode appear on the way up from that process's root directory: that catches a chroot
/// entered through a bind-mount alias of the tree, which a path compare misses. Matching
/// processes get SIGTERM, up to `grace` to exit, then SIGKILL; the call waits (bounded) until they
/// are gone and fails naming any that are not. Processes that exit while being examined are
/// skipped.
pub fn kill_processes_in_root(root: &Path, grace: Duration) -> Result<Vec<i32>> {
    let root = root
        .canonicalize()
        .with_context(|| format!("resolving build root {}", root.display()))?;
    if root == Path::new("/") {
        bail!("refusing to kill the processes in /: that is every process on the host");
    }
    let meta = fs::metadata(&root).with_context(|| format!("inspecting {}", root.display()))?;
    let wanted = (meta.dev(), meta.ino());
    let top = fs::metadata("/").context("inspecting /")?;
    let top = (top.dev(), top.ino());
    // Our PID as the mounted /proc numbers it: inside a PID namespace std::process::id() is the
    // namespace's number, while /proc may be the host's.
    let me = std::fs::read_link("/proc/self")
        .ok()
        .and_then(|p| p.to_str().and_then(|s| s.parse::<i32>().ok()))
        .unwrap_or(std::process::id() as i32);

    // How deep our PID namespace is below the one /proc shows.
    let level = ns_pids("self")
        .map(|p| p.len().saturating_sub(1))
        .unwrap_or(0);

    let mut victims: Vec<Victim> = Vec::new();
    for pid in list_pids()? {
        if pid == me {
            continue;
        }
        match is_inside(pid, &root, wanted, top) {
            Ok(true) => {}
            Ok(false) => continue,
            Err(e) if out_of_reach(&e) => continue,
            Err(e) => {
                return Err(e).with_context(|| format!("inspecting the root of process {pid}"));
            }
        }
        // pidfd_open takes the pid as our PID namespace numbers it, which need not be the
        // number the mounted /proc shows (a build runs in a PID namespace of its own while
        // /proc may be the host's).
        let Some(local) = pid_in_our_namespace(pid, level) else {
            continue;
        };
        let pidfd = match pidfd_open(local) {
            Ok(fd) => fd,
            Err(Errno::ESRCH) => continue,
            Err(e) => return Err(e).with_context(|| format!("opening a pidfd for process {pid}")),
        };
        // The pid may have been reused between the check and pidfd_open: check again, now about
        // the process the pidfd pins.
        match is_inside(pid, &root, wanted, top) {
            Ok(true) => victims.push(Victim { pid, pidfd }),
            Ok(false) => continue,
            Err(e) if out_of_reach(&e) => continue,
            Err(e) => {
                return Err(e).with_context(|| format!("inspecting the root of process {pid}"));
            }
        }
    }
    let pids: Vec<i32> = victims.iter().map(|v| v.pid).collect();
    if victims.is_empty() {
        return Ok(pids);
    }
    tracing::info!(
        "terminating {} process(es) left in {}: {pids:?}",
        victims.len(),
        root.display()
    );

    signal_all(&victims, Signal::SIGTERM)?;
    let survivors = wait_for_exit(victims, grace);
    if survivors.is_empty() {
        return Ok(pids);
    }
    let survivor_pids: Vec<i32> = survivors.iter().map(|v| v.pid).collect();
    tracing::warn!(
        "process(es) {survivor_pids:?} in {} ignored SIGTERM for {:?}; killing",
        root.display(),
        grace
    );
    signal_all(&survivors, Signal::SIGKILL)?;
    let left = wait_for_exit(survivors, KILL_WAIT);
    if !left.is_empty() {
        let left: Vec<i32> = left.iter().map(|v| v.pid).collect();
        bail!(
            "killing the processes in {}: {left:?} still running {} s after SIGKILL \
             (stuck in the kernel?)",
            root.display(),
            KILL_WAIT.as_secs()
        );
    }
    Ok(pids)
}

/// A process to end, pinned by a pidfd.
struct Victim {
    pid: i32,
    pidfd: OwnedFd,
}

/// The `NSpid` line of `/proc/<pid>/status`: the process's pid in every PID namespace from the
/// one /proc belongs to down to its own.
fn ns_pids(pid: &str) -> Option<Vec<i32>> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix("NSpid:"))?;
    line.split_whitespace().map(|p| p.parse().ok()).collect()
}

/// The number our PID namespace (`level` below /proc's) gives the process /proc calls `pid`;
/// `None` when it is not in our namespace or below it (we could not signal it).
fn pid_in_our_namespace(pid: i32, level: usize) -> Option<i32> {
    if level == 0 {
        return Some(pid);
    }
    ns_pids(&pid.to_string())?.get(level).copied()
}

fn list_pids() -> Result<Vec<i32>> {
    let mut pids = Vec::new();
    for entry in fs::read_dir("/proc").context("listing /proc")? {
        let entry = entry.context("listing /proc")?;
        if let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) {
            pids.push(pid);
        }
    }
    Ok(pids)
}

/// Whether the error means the process is out of our reach: it exited (or is a zombie, which has
/// no root any more), or the kernel will not show us its root (`EACCES`, e.g. a process of the
/// sandbox we run in). A process we cannot inspect we could not signal either; if it does hold the
/// build root, unmounting reports that mount as busy.
fn out_of_reach(e: &io::Error) -> bool {
    match e.raw_os_error() {
        Some(libc::ESRCH | libc::ENOENT) => true,
        Some(libc::EACCES | libc::EPERM) => {
            tracing::debug!("skipping a process whose root cannot be read: {e}");
            true
        }
        _ => false,
    }
}

/// Whether process `pid` has its root at or below `root`.
fn is_inside(pid: i32, root: &Path, wanted: (u64, u64), top: (u64, u64)) -> io::Result<bool> {
    let link = PathBuf::from(format!("/proc/{pid}/root"));
    if fs::read_link(&link)?.starts_with(root) {
        return Ok(true);
    }
    // Walk up from the process's root through "..": through a bind-mount alias this reaches the
    // very directory `root` is, whatever path it was entered by.
    let mut dir = link;
    let mut last = None;
    for _ in 0..MAX_ROOT_DEPTH {
        let meta = fs::metadata(&dir)?;
        let here = (meta.dev(), meta.ino());
        if here == wanted {
            return Ok(true);
        }
        if here == top || last == Some(here) {
            return Ok(false);
        }
        last = Some(here);
        dir.push("..");
    }
    Ok(false)
}

fn pidfd_open(pid: i32) -> nix::Result<OwnedFd> {
    // SAFETY: pidfd_open(2) takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(Errno::last());
    }
    // SAFETY: the descriptor was just created and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn signal_all(victims: &[Victim], signal: Signal) -> Result<()> {
    for v in victims {
        // SAFETY: pidfd_send_signal(2) with a valid pidfd, no siginfo and no flags.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                v.pidfd.as_raw_fd(),
                signal as libc::c_int,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        // ESRCH: it already exited.
        if rc < 0 && Errno::last() != Errno::ESRCH {
            return Err(Errno::last())
                .with_context(|| format!("sending {signal} to process {}", v.pid));
        }
    }
    Ok(())
}

/// Waits up to `timeout` for the victims to exit; returns those still running.
///
/// A pidfd turns readable when its process has exited (a zombie counts: it holds no mounts).
fn wait_for_exit(mut victims: Vec<Victim>, timeout: Duration) -> Vec<Victim> {
    let deadline = Instant::now() + timeout;
    loop {
        let mut fds: Vec<libc::pollfd> = victims
            .iter()
            .map(|v| libc::pollfd {
                fd: v.pidfd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        let remaining = deadline.saturating_duration_since(Instant::now());
        // SAFETY: `fds` is a valid array of `fds.len()` pollfd structs.
        let rc = unsafe {
            libc::poll(
                fds.as_mut_ptr(),
                fds.len() as libc::nfds_t,
                remaining.as_millis().min(i32::MAX as u128) as i32,
            )
        };
        if rc < 0 && Errno::last() != Errno::EINTR {
            tracing::warn!("polling pidfds: {}", Errno::last());
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut exited = fds.iter().map(|f| f.revents != 0);
        victims.retain(|_| !exited.next().unwrap_or(false));
        if victims.is_empty() || Instant::now() >= deadline {
            return victims;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cmd::CommandRunExt;
    use crate::sys::mount::{self, MsFlags};
    use std::process::{Child, Command};

    fn is_root() -> bool {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("skipping: needs root to chroot");
            return false;
        }
        true
    }

    /// Copies a program and the libraries `ldd` names into `root`, at the same paths.
    fn install(root: &Path, program: &str) {
        let out = Command::new("ldd").arg(program).run_stdout().unwrap();
        let libs = out
            .split_whitespace()
            .filter(|w| w.starts_with('/'))
            .map(str::to_string);
        for file in std::iter::once(program.to_string()).chain(libs) {
            let dest = root.join(file.trim_start_matches('/'));
            fs::create_dir_all(dest.parent().unwrap()).unwrap();
            fs::copy(&file, &dest).unwrap();
        }
    }

    /// Kills and reaps the children on the way out, whatever the test did.
    struct Children(Vec<Child>);

    impl Drop for Children {
        fn drop(&mut self) {
            for c in &mut self.0 {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }

    fn spawn(args: &[&str]) -> Child {
        Command::new(args[0]).args(&args[1..]).spawn().unwrap()
    }

    /// Waits until `pid`'s root has become `expected` (chroot has run).
    fn wait_for_root(pid: u32, expected: &Path) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while fs::read_link(format!("/proc/{pid}/root")).ok().as_deref() != Some(expected) {
            assert!(
                Instant::now() < deadline,
                "process {pid} never entered {}",
                expected.display()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn alive(child: &mut Child) -> bool {
        child.try_wait().unwrap().is_none()
    }

    #[test]
    fn terminates_then_kills_processes_inside_the_root() {
        if !is_root() {
            return;
        }
        let tmp = tempfile::Builder::new()
            .prefix("debimg-procs-test-")
            .tempdir_in("/var/tmp")
            .unwrap();
        let build = tmp.path().canonicalize().unwrap().join("build");
        let inner = build.join("inner");
        install(&inner, "/bin/sleep");
        install(&inner, "/bin/dash");
        let inner_s = inner.to_str().unwrap();

        let mut children = Children(Vec::new());
        // Exits on SIGTERM.
        children
            .0
            .push(spawn(&["chroot", inner_s, "/bin/sleep", "1000"]));
        // Ignores SIGTERM (an ignored signal stays ignored across exec), so it needs SIGKILL.
        children.0.push(spawn(&[
            "chroot",
            inner_s,
            "/bin/dash",
            "-c",
            "trap '' TERM; exec /bin/sleep 1000",
        ]));
        // Outside the root: must survive.
        children.0.push(spawn(&["sleep", "1000"]));
        for c in &children.0[..2] {
            wait_for_root(c.id(), &inner);
        }
        // Let dash install its trap and exec.
        let dash = children.0[1].id();
        let deadline = Instant::now() + Duration::from_secs(5);
        while fs::read_link(format!("/proc/{dash}/exe")).unwrap() != inner.join("bin/sleep") {
            assert!(Instant::now() < deadline, "dash never exec'd sleep");
            std::thread::sleep(Duration::from_millis(10));
        }

        let started = Instant::now();
        let mut pids = kill_processes_in_root(&build, Duration::from_millis(300)).unwrap();
        pids.sort();
        let mut expected = vec![children.0[0].id() as i32, children.0[1].id() as i32];
        expected.sort();
        assert_eq!(pids, expected);
        // The TERM-ignoring one held on through the grace period.
        assert!(started.elapsed() >= Duration::from_millis(300));
        assert!(!alive(&mut children.0[0]));
        assert!(!alive(&mut children.0[1]));
        assert!(alive(&mut children.0[2]));
        let status = children.0[1].wait().unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGKILL)
        );

        assert!(
            kill_processes_in_root(&build, Duration::from_millis(300))
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn finds_a_process_that_entered_through_a_bind_mount_alias() {
        if !is_root() {
            return;
        }
        let tmp = tempfile::Builder::new()
            .prefix("debimg-procs-alias-test-")
            .tempdir_in("/var/tmp")
            .unwrap();
        let base = tmp.path().canonicalize().unwrap();
        let build = base.join("build");
        install(&build.join("inner"), "/bin/sleep");
        let alias = base.join("alias");
        fs::create_dir(&alias).unwrap();
        let bind = mount::mount(
            build.to_str().unwrap(),
            &alias,
            None,
            MsFlags::MS_BIND,
            None,
        )
        .unwrap();

        let mut children = Children(Vec::new());
        let alias_inner = alias.join("inner");
        children.0.push(spawn(&[
            "chroot",
            alias_inner.to_str().unwrap(),
            "/bin/sleep",
            "1000",
        ]));
        wait_for_root(children.0[0].id(), &alias_inner);

        // Neither the path nor the inode of its root is `build`'s: only walking up finds it.
        let pids = kill_processes_in_root(&build, Duration::from_secs(2)).unwrap();
        assert_eq!(pids, [children.0[0].id() as i32]);
        assert!(!alive(&mut children.0[0]));
        drop(children);
        bind.close().unwrap();
    }

    #[test]
    fn refuses_the_host_root() {
        let err = kill_processes_in_root(Path::new("/"), Duration::ZERO).unwrap_err();
        assert!(format!("{err:#}").contains("refusing"), "{err:#}");
    }
}

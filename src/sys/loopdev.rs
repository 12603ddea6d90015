//! Loop devices: attaching a backing file and detaching it again.
//!
//! Attaching uses `LOOP_CTL_GET_FREE` + `LOOP_CONFIGURE`, which binds the file and sets its flags in
//! one step, and retries with a fresh free device when another process grabbed the same one first.
//! Every device is attached with autoclear, and the guard owns the open fd of the device rather
//! than a name looked up later: when the last opener closes (our fd, then any mount), the kernel
//! detaches the device by itself, so even a builder killed with `kill -9` leaks no loop device once
//! nothing is mounted from it.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::errno::Errno;

const LOOP_CONTROL: &str = "/dev/loop-control";

/// How many times a free device is requested when other processes keep taking it first.
const ATTACH_ATTEMPTS: u32 = 20;
/// How long `close` waits for the kernel to finish detaching.
const DETACH_TIMEOUT: Duration = Duration::from_secs(2);
const DETACH_POLL: Duration = Duration::from_millis(20);

// From <linux/loop.h>.
const LOOP_SET_FD: u32 = 0x4C00;
const LOOP_CLR_FD: u32 = 0x4C01;
const LOOP_SET_STATUS64: u32 = 0x4C04;
const LOOP_CONFIGURE: u32 = 0x4C0A;
const LOOP_CTL_GET_FREE: u32 = 0x4C82;
const LO_FLAGS_READ_ONLY: u32 = 1;
const LO_FLAGS_AUTOCLEAR: u32 = 4;
const LO_FLAGS_PARTSCAN: u32 = 8;
const LO_NAME_SIZE: usize = 64;
const LO_KEY_SIZE: usize = 32;

/// `struct loop_info64` from <linux/loop.h>.
#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; LO_NAME_SIZE],
    lo_crypt_name: [u8; LO_NAME_SIZE],
    lo_encrypt_key: [u8; LO_KEY_SIZE],
    lo_init: [u64; 2],
}

/// `struct loop_config` from <linux/loop.h> (Linux 5.8+).
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

// The kernel checks nothing but the size it copies: a layout mistake would configure garbage.
const _: () = assert!(size_of::<LoopInfo64>() == 232);
const _: () = assert!(size_of::<LoopConfig>() == 304);

nix::ioctl_none_bad!(loop_ctl_get_free, LOOP_CTL_GET_FREE);
nix::ioctl_write_ptr_bad!(loop_configure, LOOP_CONFIGURE, LoopConfig);
nix::ioctl_write_int_bad!(loop_set_fd, LOOP_SET_FD);
nix::ioctl_write_ptr_bad!(loop_set_status64, LOOP_SET_STATUS64, LoopInfo64);
nix::ioctl_none_bad!(loop_clr_fd, LOOP_CLR_FD);

/// A loop device bound to a backing file, held open by this guard.
///
/// Detach it with [`LoopDevice::close`]; dropping it detaches best-effort and logs.
#[must_use = "dropping a LoopDevice detaches it"]
#[derive(Debug)]
pub struct LoopDevice {
    /// The open device; `None` once detached.
    dev: Option<File>,
    path: PathBuf,
    number: u32,
    backing: PathBuf,
}

/// Attaches `backing` to a free loop device with autoclear set (and read-only when asked).
///
/// Another process may take the free device between `LOOP_CTL_GET_FREE` and `LOOP_CONFIGURE`; the
/// kernel then answers `EBUSY` and a fresh free device is requested, a bounded number of times.
/// The two-step `LOOP_SET_FD` + `LOOP_SET_STATUS64` is used only on kernels without
/// `LOOP_CONFIGURE` (before 5.8).
pub fn attach(backing: &Path, read_only: bool) -> Result<LoopDevice> {
    attach_with(backing, read_only, false)
}

/// Attaches a whole-disk image with partition scanning: its partitions appear as
/// `/dev/loopNp1`, ... (see [`LoopDevice::partition`]).
pub fn attach_partitioned(backing: &Path) -> Result<LoopDevice> {
    let dev = attach_with(backing, false, true)?;
    // Some kernels set the flag but find no partitions (seen on a Firecracker guest kernel);
    // partx reads the table itself and adds them with BLKPG. Detaching removes them either way.
    let first = PathBuf::from(format!("/sys/class/block/loop{0}/loop{0}p1", dev.number));
    for _ in 0..10 {
        if first.exists() {
            return Ok(dev);
        }
        thread::sleep(Duration::from_millis(20));
    }
    tracing::debug!(
        "{}: no partitions from the kernel's scan, adding them with partx",
        dev.path.display()
    );
    use crate::cmd::CommandRunExt;
    std::process::Command::new("partx")
        .arg("--add")
        .arg(&dev.path)
        .run()
        .with_context(|| format!("adding the partitions of {}", dev.path.display()))?;
    Ok(dev)
}

fn attach_with(backing: &Path, read_only: bool, partscan: bool) -> Result<LoopDevice> {
    let backing = backing
        .canonicalize()
        .with_context(|| format!("resolving loop backing file {}", backing.display()))?;
    let file = OpenOptions::new()
        .read(true)
        .write(!read_only)
        .open(&backing)
        .with_context(|| format!("opening loop backing file {}", backing.display()))?;
    let control = OpenOptions::new()
        .read(true)
        .write(true)
        .open(LOOP_CONTROL)
        .with_context(|| format!("opening {LOOP_CONTROL}"))?;

    for attempt in 1..=ATTACH_ATTEMPTS {
        // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns the device number.
        let number = unsafe { loop_ctl_get_free(control.as_raw_fd()) }
            .with_context(|| format!("asking {LOOP_CONTROL} for a free loop device"))?;
        let number =
            u32::try_from(number).context("LOOP_CTL_GET_FREE returned a negative number")?;
        let path = PathBuf::from(format!("/dev/loop{number}"));
        let dev = match OpenOptions::new().read(true).write(true).open(&path) {
            Ok(dev) => dev,
            // The device was removed (e.g. `losetup -D` or LOOP_CTL_REMOVE) between the two calls.
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENXIO)) => {
                tracing::debug!(
                    "{} vanished before it could be opened, retrying",
                    path.display()
                );
                backoff(attempt);
                continue;
            }
            Err(e) => return Err(e).with_context(|| format!("opening {}", path.display())),
        };
        match configure(&dev, &file, &backing, read_only, partscan) {
            Ok(()) => {
                tracing::debug!(
                    "attached {} to {}{}",
                    backing.display(),
                    path.display(),
                    if read_only { " read-only" } else { "" }
                );
                return Ok(LoopDevice {
                    dev: Some(dev),
                    path,
                    number,
                    backing,
                });
            }
            Err(Errno::EBUSY) => {
                tracing::debug!(
                    "{} was taken by another process first (attempt {attempt}), retrying",
                    path.display()
                );
                backoff(attempt);
            }
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("attaching {} to {}", backing.display(), path.display())
                });
            }
        }
    }
    bail!(
        "attaching {}: another process took every free loop device first ({ATTACH_ATTEMPTS} tries)",
        backing.display()
    )
}

/// Grows the pause between attempts so that racing builders stop colliding.
fn backoff(attempt: u32) {
    thread::sleep(Duration::from_millis(5 * u64::from(attempt)));
}

fn loop_info(backing: &Path, flags: u32) -> LoopInfo64 {
    let mut info = LoopInfo64 {
        lo_device: 0,
        lo_inode: 0,
        lo_rdevice: 0,
        lo_offset: 0,
        lo_sizelimit: 0,
        lo_number: 0,
        lo_encrypt_type: 0,
        lo_encrypt_key_size: 0,
        lo_flags: flags,
        lo_file_name: [0; LO_NAME_SIZE],
        lo_crypt_name: [0; LO_NAME_SIZE],
        lo_encrypt_key: [0; LO_KEY_SIZE],
        lo_init: [0; 2],
    };
    // Only what old tools show when sysfs is missing; the kernel keeps the real path itself. The
    // name stays NUL-terminated, so long paths are cut at 63 bytes.
    let name = backing.as_os_str().as_bytes();
    let len = name.len().min(LO_NAME_SIZE - 1);
    info.lo_file_name[..len].copy_from_slice(&name[..len]);
    info
}

/// Binds `file` to the loop device `dev`; `EBUSY` means someone else bound it first.
fn configure(
    dev: &File,
    file: &File,
    backing: &Path,
    read_only: bool,
    partscan: bool,
) -> nix::Result<()> {
    let mut flags = LO_FLAGS_AUTOCLEAR;
    if read_only {
        flags |= LO_FLAGS_READ_ONLY;
    }
    if partscan {
        flags |= LO_FLAGS_PARTSCAN;
    }
    let config = LoopConfig {
        fd: file.as_raw_fd() as u32,
        block_size: 0,
        info: loop_info(backing, flags),
        reserved: [0; 8],
    };
    // SAFETY: `config` is a valid `struct loop_config` that outlives the call.
    match unsafe { loop_configure(dev.as_raw_fd(), &config) } {
        Ok(_) => Ok(()),
        Err(Errno::ENOTTY | Errno::EINVAL) => {
            tracing::debug!("LOOP_CONFIGURE unsupported, falling back to LOOP_SET_FD");
            configure_legacy(dev, file, backing, flags)
        }
        Err(e) => Err(e),
    }
}

/// The pre-5.8 two-step attach. Read-only then follows from how `file` was opened.
fn configure_legacy(dev: &File, file: &File, backing: &Path, flags: u32) -> nix::Result<()> {
    // SAFETY: LOOP_SET_FD takes the backing file's descriptor as its integer argument.
    unsafe { loop_set_fd(dev.as_raw_fd(), file.as_raw_fd()) }?;
    let info = loop_info(backing, flags & (LO_FLAGS_AUTOCLEAR | LO_FLAGS_PARTSCAN));
    // SAFETY: `info` is a valid `struct loop_info64` that outlives the call.
    if let Err(e) = unsafe { loop_set_status64(dev.as_raw_fd(), &info) } {
        // Without autoclear the device would outlive a crash: undo the bind.
        // SAFETY: LOOP_CLR_FD takes no argument.
        let _ = unsafe { loop_clr_fd(dev.as_raw_fd()) };
        return Err(e);
    }
    Ok(())
}

impl LoopDevice {
    /// The node of partition `n` (from 1), e.g. `/dev/loop3p2`, once the kernel made it (it
    /// appears shortly after a partitioned attach; waited for up to 10 s).
    pub fn partition(&self, n: u32) -> Result<PathBuf> {
        let path = PathBuf::from(format!("{}p{n}", self.path.display()));
        for _ in 0..500 {
            if path.exists() {
                return Ok(path);
            }
            thread::sleep(Duration::from_millis(20));
        }
        bail!(
            "partition {n} of {} did not appear as {}",
            self.path.display(),
            path.display()
        )
    }

    /// The device node, e.g. `/dev/loop3`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The device number N of `/dev/loopN`.
    pub fn number(&self) -> u32 {
        self.number
    }

    /// The backing file, canonicalized.
    pub fn backing(&self) -> &Path {
        &self.backing
    }

    /// Detaches the device and waits until the kernel has let go of it.
    ///
    /// Guarantees: on `Ok`, the device is no longer bound to the backing file (it may already be
    /// bound to another file by another process). If something else still holds the device open
    /// (a mount, another opener), the kernel only keeps autoclear set and detaches on that last
    /// close; `close` then returns an error after waiting 2 s, and the device goes away by itself
    /// once that holder lets go.
    pub fn close(mut self) -> Result<()> {
        self.detach()
    }

    fn detach(&mut self) -> Result<()> {
        let Some(dev) = self.dev.take() else {
            return Ok(());
        };
        // SAFETY: LOOP_CLR_FD takes no argument.
        match unsafe { loop_clr_fd(dev.as_raw_fd()) } {
            // ENXIO: the device is no longer bound at all.
            Ok(_) | Err(Errno::ENXIO) => {}
            // Autoclear was set at attach time, so closing our fd below still detaches when we are
            // the last opener; the wait below tells.
            Err(e) => tracing::debug!("LOOP_CLR_FD on {}: {e}", self.path.display()),
        }
        drop(dev);
        self.wait_detached()
    }

    /// Polls sysfs until the device no longer names our backing file.
    fn wait_detached(&self) -> Result<()> {
        let sys_block = Path::new("/sys/block");
        if !sys_block.is_dir() {
            tracing::debug!(
                "no /sys/block: cannot confirm that {} detached",
                self.path.display()
            );
            return Ok(());
        }
        let deadline = Instant::now() + DETACH_TIMEOUT;
        loop {
            match self.bound_to_our_backing() {
                Ok(false) => return Ok(()),
                Ok(true) if Instant::now() >= deadline => bail!(
                    "detaching {} from {}: still attached after {} s, so something else still holds \
                     it open (a mount?); autoclear detaches it when that last user closes it",
                    self.path.display(),
                    self.backing.display(),
                    DETACH_TIMEOUT.as_secs()
                ),
                Ok(true) => thread::sleep(DETACH_POLL),
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!("checking that {} detached", self.path.display())
                    });
                }
            }
        }
    }

    /// Whether sysfs shows the device still bound to our backing file.
    ///
    /// A device rebound by another process to another file counts as detached; one rebound to the
    /// very same file within the poll window would look still attached.
    fn bound_to_our_backing(&self) -> io::Result<bool> {
        let attr = format!("/sys/block/loop{}/loop/backing_file", self.number);
        match std::fs::read(&attr) {
            Ok(content) => {
                let content = content.strip_suffix(b"\n").unwrap_or(&content);
                Ok(content == self.backing.as_os_str().as_bytes())
            }
            // The `loop` attribute group only exists while the device is bound.
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        if self.dev.is_none() {
            return;
        }
        tracing::warn!(
            "loop device {} for {} dropped without close; detaching",
            self.path.display(),
            self.backing.display()
        );
        if let Err(e) = self.detach() {
            tracing::warn!("{e:#}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cmd::CommandRunExt;
    use std::process::Command;
    use std::sync::{Arc, Barrier};

    fn loop_available() -> bool {
        if !nix::unistd::Uid::effective().is_root() || !Path::new(LOOP_CONTROL).exists() {
            eprintln!("skipping: needs root and {LOOP_CONTROL}");
            return false;
        }
        true
    }

    fn sparse_file(size: u64) -> tempfile::NamedTempFile {
        let file = tempfile::Builder::new()
            .prefix("debimg-loop-test-")
            .tempfile_in("/var/tmp")
            .unwrap();
        file.as_file().set_len(size).unwrap();
        file
    }

    fn sys_attr(dev: &LoopDevice, attr: &str) -> String {
        let path = format!("/sys/block/loop{}/{attr}", dev.number());
        std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("reading {path}: {e}"))
            .trim_end()
            .to_string()
    }

    /// Whether `losetup -a` lists a device backed by `backing`.
    fn listed_by_losetup(backing: &Path) -> bool {
        let out = Command::new("losetup").arg("-a").run_stdout().unwrap();
        let backing = backing.canonicalize().unwrap();
        out.contains(&*backing.to_string_lossy())
    }

    #[test]
    fn attach_sets_backing_file_and_autoclear_and_close_detaches() {
        if !loop_available() {
            return;
        }
        let file = sparse_file(64 << 20);
        let dev = attach(file.path(), false).unwrap();
        assert!(dev.path().starts_with("/dev"), "{}", dev.path().display());
        assert_eq!(
            sys_attr(&dev, "loop/backing_file"),
            file.path().canonicalize().unwrap().to_string_lossy()
        );
        assert_eq!(sys_attr(&dev, "loop/autoclear"), "1");
        assert_eq!(sys_attr(&dev, "ro"), "0");
        assert!(listed_by_losetup(file.path()));
        dev.close().unwrap();
        assert!(!listed_by_losetup(file.path()));
    }

    #[test]
    fn read_only_attach_is_read_only() {
        if !loop_available() {
            return;
        }
        let file = sparse_file(1 << 20);
        let dev = attach(file.path(), true).unwrap();
        assert_eq!(sys_attr(&dev, "ro"), "1");
        dev.close().unwrap();
        assert!(!listed_by_losetup(file.path()));
    }

    #[test]
    fn concurrent_attaches_get_distinct_devices() {
        if !loop_available() {
            return;
        }
        const THREADS: usize = 8;
        let files: Vec<_> = (0..THREADS).map(|_| sparse_file(1 << 20)).collect();
        let barrier = Arc::new(Barrier::new(THREADS));
        let devices: Vec<LoopDevice> = thread::scope(|s| {
            let handles: Vec<_> = files
                .iter()
                .map(|f| {
                    let barrier = Arc::clone(&barrier);
                    s.spawn(move || {
                        barrier.wait();
                        attach(f.path(), false)
                    })
                })
                .collect();
            // Join every thread before unwrapping, so that all attached devices get guards.
            let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
            results.into_iter().map(|r| r.unwrap()).collect()
        });
        let mut paths: Vec<_> = devices.iter().map(|d| d.path().to_path_buf()).collect();
        paths.sort();
        paths.dedup();
        assert_eq!(paths.len(), THREADS, "{paths:?}");
        for (dev, file) in devices.iter().zip(&files) {
            assert_eq!(
                sys_attr(dev, "loop/backing_file"),
                file.path().canonicalize().unwrap().to_string_lossy()
            );
        }
        for dev in devices {
            dev.close().unwrap();
        }
        for file in &files {
            assert!(!listed_by_losetup(file.path()));
        }
    }

    #[test]
    fn drop_without_close_detaches() {
        if !loop_available() {
            return;
        }
        let file = sparse_file(1 << 20);
        let dev = attach(file.path(), false).unwrap();
        assert!(listed_by_losetup(file.path()));
        drop(dev);
        assert!(!listed_by_losetup(file.path()));
    }

    /// The kernel behaviour `close` documents: with another opener, LOOP_CLR_FD only leaves
    /// autoclear set, and the device detaches when that opener closes.
    #[test]
    fn device_held_elsewhere_detaches_when_released() {
        if !loop_available() {
            return;
        }
        let file = sparse_file(1 << 20);
        let dev = attach(file.path(), false).unwrap();
        let other = File::open(dev.path()).unwrap();
        let err = dev.close().unwrap_err();
        assert!(format!("{err:#}").contains("still attached"), "{err:#}");
        assert!(listed_by_losetup(file.path()));
        drop(other);
        let deadline = Instant::now() + DETACH_TIMEOUT;
        while listed_by_losetup(file.path()) && Instant::now() < deadline {
            thread::sleep(DETACH_POLL);
        }
        assert!(!listed_by_losetup(file.path()));
    }

    #[test]
    fn missing_backing_file_is_named_in_the_error() {
        let err = attach(Path::new("/nonexistent/debimg-image.raw"), false).unwrap_err();
        assert!(
            format!("{err:#}").contains("/nonexistent/debimg-image.raw"),
            "{err:#}"
        );
    }
}

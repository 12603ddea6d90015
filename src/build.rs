//! What every build shares around its stages: options and outcome, the output directory's lock,
//! the workspace (with stale-workspace cleanup, `--tmpfs` and `--keep-on-failure`), outputs
//! published atomically, the preflight, the reuse check and the stage announcer with its
//! test-only fault hook. The stages themselves are [`crate::creator::Creator`]'s.
//!
//! Stage names, in order: mount, bootstrap, install, configure, unmount, finish (checks,
//! shrinks or archives the result), package, publish. The creator's `install` runs bootstrap
//! and install, its `package` runs finish, package and publish.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::mount::MsFlags;

use crate::creator::Creator;
use crate::metadata::Metadata;
use crate::output::{EntryKind, OutputDir};
use crate::plan::Plan;
use crate::signals;
use crate::sys::mkfs;
use crate::sys::mount::{self, Mount};

/// Where workspaces go unless `--build-dir` says otherwise: on disk, unlike /tmp on some hosts.
pub const DEFAULT_BUILD_DIR: &str = "/var/tmp";

/// Where the package, base-tree and apt-list caches live unless `--cache-dir` says otherwise.
pub const DEFAULT_CACHE_DIR: &str = "/var/cache/debimg";

/// Options of one build that are not part of the spec.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// Where the images and metadata go.
    pub output_dir: PathBuf,
    /// Under which directory the temporary workspace is made.
    pub build_dir: PathBuf,
    /// Rebuild even when the output matches the spec.
    pub force: bool,
    /// Wait for another build holding the output directory instead of failing.
    pub wait: bool,
    /// Show the output of debootstrap and apt on stderr.
    pub show_progress: bool,
    /// Package and base-tree caches shared by builds; `None` builds without them.
    pub cache_dir: Option<PathBuf>,
    /// Open an interactive shell in the chroot just before unmounting.
    pub shell: bool,
    /// After a failure, keep the workspace (unmounted, devices detached) for inspection.
    pub keep_on_failure: bool,
    /// Build in a tmpfs of this many bytes instead of on the build directory's disk.
    pub tmpfs: Option<u64>,
}

impl BuildOptions {
    /// The defaults of `debimg build`, writing into `output_dir`.
    pub fn new(output_dir: impl Into<PathBuf>) -> BuildOptions {
        BuildOptions {
            output_dir: output_dir.into(),
            build_dir: PathBuf::from(DEFAULT_BUILD_DIR),
            force: false,
            wait: false,
            show_progress: true,
            cache_dir: Some(PathBuf::from(DEFAULT_CACHE_DIR)),
            shell: false,
            keep_on_failure: false,
            tmpfs: None,
        }
    }
}

/// What a build produced.
#[derive(Debug)]
pub struct Outcome {
    /// True when existing images matched the spec and nothing was built.
    pub reused: bool,
    /// Path of the metadata file.
    pub metadata_path: PathBuf,
    pub metadata: Metadata,
}

impl Outcome {
    /// Paths of the shipped image files.
    pub fn image_paths(&self) -> Vec<PathBuf> {
        let dir = self.metadata_path.parent().unwrap_or(Path::new("."));
        self.metadata
            .images
            .iter()
            .map(|i| dir.join(&i.container_name))
            .collect()
    }

    /// Paths of every output: images, records, kernel and initrd, then the metadata file.
    pub fn output_paths(&self) -> Vec<PathBuf> {
        let dir = self.metadata_path.parent().unwrap_or(Path::new("."));
        let mut out = self.image_paths();
        out.extend(self.metadata.files.iter().map(|f| dir.join(&f.name)));
        out.push(self.metadata_path.clone());
        out
    }
}

/// Runs one named stage, announcing it and its duration on stderr.
pub(crate) fn stage<T>(name: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    signals::check().with_context(|| format!("before stage {name}"))?;
    tracing::info!("stage {name}: started");
    let t = Instant::now();
    let out = f()
        .and_then(|out| injected_fault(name).map(|()| out))
        .with_context(|| format!("stage {name} failed"))?;
    tracing::info!("stage {name}: done in {:.1}s", t.elapsed().as_secs_f64());
    Ok(out)
}

/// The test-only fault hook: `DEBIMG_TEST_FAULT=<stage>:fail` fails the build at the end of that
/// stage (its resources held), `<stage>:pause` announces `debimg-test: paused in stage <stage>`
/// on stderr and waits there for a signal. The fault-injection tests drive every stage with it.
pub const FAULT_ENV: &str = "DEBIMG_TEST_FAULT";

fn injected_fault(stage: &str) -> Result<()> {
    let Ok(spec) = std::env::var(FAULT_ENV) else {
        return Ok(());
    };
    match spec.split_once(':') {
        Some((s, "fail")) if s == stage => bail!("injected fault ({FAULT_ENV}={spec})"),
        Some((s, "pause")) if s == stage => {
            eprintln!("debimg-test: paused in stage {stage}");
            loop {
                signals::check()?;
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        _ => Ok(()),
    }
}

/// Host tools a plan needs, with the Debian package that provides each.
pub fn required_tools(plan: &Plan) -> Vec<(&'static str, &'static str)> {
    let backend = plan.backend.name();
    let mut tools = vec![(backend, backend), ("chroot", "coreutils"), ("tar", "tar")];

    for img in &plan.images {
        tools.push(mkfs::tool(img.fs));
        if img.fs.is_ext() {
            tools.push(("resize2fs", "e2fsprogs"));
            tools.push(("e2fsck", "e2fsprogs"));
            tools.push(("tune2fs", "e2fsprogs"));
            tools.push(("dumpe2fs", "e2fsprogs"));
        }
    }
    if let Some(disk) = &plan.disk {
        tools.push(("sfdisk", "fdisk"));
        for p in &disk.partitions {
            if let Some(fs) = p.fs {
                tools.push(mkfs::tool(fs));
                if fs.is_ext() {
                    tools.push(("tune2fs", "e2fsprogs"));
                    tools.push(("e2fsck", "e2fsprogs"));
                }
            }
            if p.flags.contains(&crate::spec::PartitionFlag::Esp) {
                tools.extend([
                    ("mkfs.vfat", "dosfstools"),
                    ("fsck.vfat", "dosfstools"),
                    ("mmd", "mtools"),
                    ("mcopy", "mtools"),
                ]);
            }
        }
        if disk.formats.iter().any(|f| {
            matches!(
                f,
                crate::spec::DiskFormat::Qcow2 | crate::spec::DiskFormat::Qcow2Compressed
            )
        }) {
            tools.push(("qemu-img", "qemu-utils"));
        }
    }
    tools.sort();
    tools.dedup();
    tools
}

/// Names every missing host tool and how to install it, before anything is created.
pub fn preflight(plan: &Plan) -> Result<()> {
    check_tools(plan, &crate::plan::program_dirs())
}

/// The preflight against an explicit list of directories.
pub fn check_tools(plan: &Plan, dirs: &[PathBuf]) -> Result<()> {
    let missing: Vec<_> = required_tools(plan)
        .into_iter()
        .filter(|(tool, _)| !dirs.iter().any(|d| d.join(tool).is_file()))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let mut pkgs: Vec<&str> = missing.iter().map(|(_, p)| *p).collect();
    pkgs.sort();
    pkgs.dedup();
    bail!(
        "missing host tools: {} (install them with `apt-get install {}`)",
        missing
            .iter()
            .map(|(t, p)| format!("{t} (package {p})"))
            .collect::<Vec<_>>()
            .join(", "),
        pkgs.join(" ")
    )
}

/// Name of the output directory's lock file. It persists between builds; a release removes it
/// when done.
pub const OUTPUT_LOCK: &str = ".debimg.lock";

/// An exclusive lock on the output directory, held for the whole build.
#[must_use]
pub struct OutputLock {
    dir: OutputDir,
    _lock: nix::fcntl::Flock<File>,
}

impl OutputLock {
    /// Takes the lock of the directory `dir`, waiting for it when `wait` is set.
    pub fn acquire(dir: &Path, wait: bool) -> Result<OutputLock> {
        OutputLock::acquire_in(&OutputDir::open(dir)?, wait)
    }

    /// Takes the lock of a directory already open.
    ///
    /// The lock file is opened without following a link and only when it is a regular file:
    /// others who may write to the directory could have planted a link to a host file, or a
    /// FIFO, under its name.
    pub fn acquire_in(dir: &OutputDir, wait: bool) -> Result<OutputLock> {
        use nix::fcntl::{Flock, FlockArg};
        let file = dir
            .open_or_create(OUTPUT_LOCK, 0o600)
            .with_context(|| format!("locking the output directory {}", dir.path().display()))?;
        let arg = if wait {
            FlockArg::LockExclusive
        } else {
            FlockArg::LockExclusiveNonblock
        };
        match Flock::lock(file, arg) {
            Ok(lock) => Ok(OutputLock {
                dir: dir.try_clone()?,
                _lock: lock,
            }),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => bail!(
                "another debimg build is writing to {}; wait for it (or pass --wait)",
                dir.path().display()
            ),
            Err((_, e)) => {
                Err(e).with_context(|| format!("locking {}", dir.join(OUTPUT_LOCK).display()))
            }
        }
    }

    /// The locked directory, open: write into it through this, not through its path.
    pub fn dir(&self) -> &OutputDir {
        &self.dir
    }
}

/// Returns the existing metadata when every output matches the plan. Only regular files count:
/// a link in the output directory is not followed.
pub fn reusable(plan: &Plan, output_dir: &Path) -> Option<Metadata> {
    let dir = OutputDir::open(output_dir).ok()?;
    let size = |name: &str| match dir.stat(name) {
        Ok(Some(st)) if EntryKind::of(&st) == EntryKind::File => Some(st.st_size as u64),
        _ => None,
    };
    let mut text = String::new();
    std::io::Read::read_to_string(&mut dir.open_regular(plan.metadata_name()).ok()?, &mut text)
        .ok()?;
    let meta: Metadata = serde_saphyr::from_str(&text).ok()?;
    let names = plan.container_names();
    if meta.spec_digest != plan.digest || meta.images.len() != names.len() {
        return None;
    }
    for (name, m) in names.iter().zip(&meta.images) {
        if *name != m.container_name || size(&m.container_name)? != m.container_size {
            return None;
        }
    }
    let extra = plan.extra_output_names();
    if extra.len() != meta.files.len() {
        return None;
    }
    for (name, f) in extra.iter().zip(&meta.files) {
        if *name != f.name || size(name)? != f.size {
            return None;
        }
    }
    Some(meta)
}

/// Builds the plan's images into the output directory, or reuses them: every stage of a
/// [`Creator`] of the plan's kind.
pub fn build(plan: &Plan, opts: &BuildOptions) -> Result<Outcome> {
    Creator::new(plan.clone(), opts.clone())?.create()
}

/// Below this much free space in the build directory a failure is blamed on a full disk.
const LOW_SPACE: u64 = 32 << 20;

/// Adds "no space left" to an error when the filesystem holding `dir` is (nearly) full: a
/// full disk under a loop device shows up as I/O errors that do not say so. `what` names `dir`
/// for the user.
pub(crate) fn explain_no_space(err: anyhow::Error, dir: &Path, what: &str) -> anyhow::Error {
    match nix::sys::statvfs::statvfs(dir) {
        Ok(st) => {
            let free = st.blocks_available() * st.fragment_size();
            if free < LOW_SPACE {
                let hint = if what.contains("tmpfs") {
                    "give --tmpfs a larger size or build on disk"
                } else {
                    "free some or choose another with --build-dir"
                };
                return err.context(format!(
                    "no space left in {what} {} ({} KiB free): {hint}",
                    dir.display(),
                    free >> 10
                ));
            }
            err
        }
        Err(_) => err,
    }
}

/// Name of the lock file a live build holds in its workspace.
const WORKSPACE_LOCK: &str = ".debimg-workspace.lock";

/// Marks a workspace kept for inspection (`--keep-on-failure`): never removed as stale.
pub const KEPT_MARKER: &str = ".debimg-kept";

/// Removes workspaces of builds that died without cleaning up (SIGKILL, power loss): their lock
/// is free. Their mounts and loop devices went with their namespaces; only files remain.
/// Workspaces kept on purpose stay.
///
/// The build directory may be world-writable (/var/tmp): an entry named like a workspace may be
/// anyone's and anything. Only a real directory owned by this user is considered, nothing in it
/// is followed, and its lock is opened only when it is a regular file (a FIFO would hang the
/// open).
pub(crate) fn clean_stale_workspaces(build_dir: &Path) {
    let Ok(dir) = OutputDir::open(build_dir) else {
        return;
    };
    let Ok(names) = dir.entries() else {
        return;
    };
    for name in names {
        if !name.to_string_lossy().starts_with("debimg-") {
            continue;
        }
        let Some(ws) = stale_workspace(&dir, &name) else {
            continue;
        };
        use nix::fcntl::{Flock, FlockArg};
        let Ok(lock) = ws
            .open_regular(WORKSPACE_LOCK)
            .map_err(|e| tracing::debug!("{e:#}"))
            .and_then(|f| Flock::lock(f, FlockArg::LockExclusiveNonblock).map_err(|_| ()))
        else {
            continue;
        };
        let path = ws.path().to_path_buf();
        drop(ws);
        tracing::warn!(
            "removing stale workspace {} of a build that died",
            path.display()
        );
        // By path, which another user could only have swapped for a link (removed, not
        // followed) if the build directory lets them rename entries; the deletion follows no
        // link and crosses no mount.
        let res = mount::unmount_all_under(&path).and_then(|()| mount::remove_dir_all_safe(&path));
        if let Err(e) = res {
            tracing::warn!("could not remove stale workspace {}: {e:#}", path.display());
        }
        drop(lock);
    }
}

/// The entry `name` of the build directory, open, when it may be a workspace a build of this
/// user left: a directory (not a link to one) owned by this user and not kept.
fn stale_workspace(build_dir: &OutputDir, name: &std::ffi::OsStr) -> Option<OutputDir> {
    let me = nix::unistd::geteuid().as_raw();
    let st = build_dir.stat(name).ok()??;
    if EntryKind::of(&st) != EntryKind::Dir || st.st_uid != me {
        return None;
    }
    let ws = build_dir.open_subdir(name).ok()?;
    // The entry may have changed between the look and the open.
    let opened = ws.stat_self().ok()?;
    if (opened.st_dev, opened.st_ino) != (st.st_dev, st.st_ino) {
        return None;
    }
    // Anything under the marker's name keeps the workspace; only a clear "nothing" does not.
    if !matches!(ws.stat(KEPT_MARKER), Ok(None)) {
        return None;
    }
    Some(ws)
}

/// The build's private working directory under `--build-dir`, locked while the build lives.
#[must_use]
pub(crate) struct Workspace {
    /// The directory under the build directory; holds the lock.
    pub dir: PathBuf,
    /// Where the build writes: `dir` itself, or a tmpfs mounted below it.
    pub work: PathBuf,
    tmpfs: Option<Mount>,
    closed: bool,
    _lock: nix::fcntl::Flock<File>,
}

impl Workspace {
    /// Creates a workspace in `build_dir`, private to this user (0700): the images in it hold
    /// password hashes and files of mode 0600, readable by anyone were the directory open. What
    /// debimg writes directly here is 0600; the image tree inside keeps the modes the image
    /// needs (a 0755 /usr, setuid binaries, device nodes), unreachable through this directory.
    pub fn create(build_dir: &Path, name: &str, tmpfs: Option<u64>) -> Result<Workspace> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("debimg-{name}-"))
            .permissions(std::fs::Permissions::from_mode(0o700))
            .tempdir_in(build_dir)
            .with_context(|| format!("creating a workspace in {}", build_dir.display()))?
            .keep();
        let lock_path = dir.join(WORKSPACE_LOCK);
        // Should locking fail, the directory is left with a free lock: the next run removes it.
        let file = File::options()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&lock_path)
            .with_context(|| format!("creating {}", lock_path.display()))?;
        let lock = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
            .map_err(|(_, e)| e)
            .with_context(|| format!("locking {}", lock_path.display()))?;
        let mut ws = Workspace {
            work: dir.clone(),
            dir,
            tmpfs: None,
            closed: false,
            _lock: lock,
        };
        if let Some(size) = tmpfs {
            // Below the locked directory, so that a build killed with SIGKILL leaves a
            // directory the next run recognizes and removes (the tmpfs goes with the
            // namespace).
            let work = ws.dir.join("tmpfs");
            std::fs::create_dir(&work).with_context(|| format!("creating {}", work.display()))?;
            let (flags, options) = tmpfs_mount_options(size);
            let m = mount::mount("debimg-tmpfs", &work, Some("tmpfs"), flags, Some(&options))
                .with_context(|| format!("mounting a {} MiB tmpfs", size >> 20))?;
            tracing::info!(
                "workspace on a tmpfs of {} MiB at {}",
                size >> 20,
                work.display()
            );
            ws.tmpfs = Some(m);
            ws.work = work;
        }
        tracing::debug!("workspace {}", ws.dir.display());
        Ok(ws)
    }

    /// Unmounts everything in the workspace, the tmpfs last.
    fn unmount_all(&mut self) -> Result<()> {
        if let Some(m) = self.tmpfs.take() {
            mount::unmount_all_under(&self.work)
                .and_then(|()| m.close())
                .map_err(|e| {
                    e.context(format!("unmounting the tmpfs at {}", self.work.display()))
                })?;
        }
        mount::unmount_all_under(&self.dir)
    }

    /// True when the build writes into a tmpfs.
    pub fn on_tmpfs(&self) -> bool {
        self.tmpfs.is_some()
    }

    /// Unmounts anything left and deletes the workspace, never across a mount point.
    pub fn close(mut self) -> Result<()> {
        self.closed = true;
        self.unmount_all()?;
        mount::remove_dir_all_safe(&self.dir)
            .with_context(|| format!("removing workspace {}", self.dir.display()))
    }

    /// Keeps the workspace for inspection after a failure: unmounts everything in it, marks it
    /// so that no later build removes it, and says where it is.
    pub fn keep(mut self) -> Result<()> {
        self.closed = true;
        self.unmount_all()?;
        let marker = self.dir.join(KEPT_MARKER);
        File::options()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&marker)
            .and_then(|mut f| f.write_all(b"kept by --keep-on-failure\n"))
            .with_context(|| format!("writing {}", marker.display()))?;
        let mut files: Vec<String> = std::fs::read_dir(&self.dir)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| !n.starts_with('.'))
                    .collect()
            })
            .unwrap_or_default();
        files.sort();
        tracing::error!(
            "the failed build's workspace is kept at {} (holds: {}); image files can be examined with `mount -o loop,ro`; remove it with `rm -rf {}`",
            self.dir.display(),
            files.join(", "),
            self.dir.display()
        );
        Ok(())
    }
}

/// Mount flags and options of a `--tmpfs` workspace of `size` bytes.
///
/// Neither `nodev` nor `nosuid`: the image tree built on it holds device nodes (a tarball's
/// chroot keeps its /dev on it; with `nodev` dpkg fails on `/dev/null`) and setuid binaries,
/// exactly as a build on disk does. `mode=0700` keeps other users out of the tmpfs, as the
/// 0700 workspace does on disk: that, not `nodev`, is what keeps them away from those files.
fn tmpfs_mount_options(size: u64) -> (MsFlags, String) {
    (MsFlags::empty(), format!("size={size},mode=0700"))
}

impl Drop for Workspace {
    fn drop(&mut self) {
        if self.closed {
            return;
        }
        let res = self
            .unmount_all()
            .and_then(|()| mount::remove_dir_all_safe(&self.dir));
        if let Err(e) = res {
            tracing::warn!("cleaning workspace {}: {e:#}", self.dir.display());
        }
    }
}

/// Files being written into the output directory under temporary names; removed unless
/// published. Every name is looked up in the directory opened once, never followed.
pub(crate) struct PendingOutputs {
    path: PathBuf,
    /// Opened at first use (`new` cannot fail).
    dir: Option<OutputDir>,
    /// (temporary name, final name)
    temps: Vec<(String, String)>,
}

impl PendingOutputs {
    /// Pending outputs in a directory already open (the one [`OutputLock::dir`] holds), so
    /// that no later swap of its path redirects them.
    pub fn in_dir(dir: OutputDir) -> PendingOutputs {
        PendingOutputs {
            path: dir.path().to_path_buf(),
            dir: Some(dir),
            temps: Vec::new(),
        }
    }

    /// Creates the temporary file for `final_name` (0644, as the output will be; `O_EXCL`, no
    /// link followed) and returns it open for writing, with its path.
    pub fn create_temp(&mut self, final_name: &str) -> Result<(File, PathBuf)> {
        let (file, temp) = open_dir(&mut self.dir, &self.path)?.create_temp(final_name, 0o644)?;
        let p = self.path.join(&temp);
        self.temps.push((temp, final_name.to_string()));
        Ok((file, p))
    }

    /// Renames the images into place, then writes the metadata last. The old metadata goes
    /// first, so that no moment shows new images described by old metadata.
    pub fn publish(&mut self, images: &[&str], metadata_name: &str, yaml: &str) -> Result<()> {
        let dir = open_dir(&mut self.dir, &self.path)?;
        dir.remove(metadata_name)?;
        dir.sync()?;
        for name in images {
            let (temp, _) = self
                .temps
                .iter()
                .find(|(_, n)| n == name)
                .with_context(|| format!("{name} was not packaged"))?;
            dir.commit(temp, name)?;
        }
        // Whatever was not published goes on drop.
        self.temps.retain(|(_, n)| !images.contains(&n.as_str()));
        dir.write_file(metadata_name, yaml.as_bytes(), 0o644)
    }
}

/// The directory `slot` holds, opened from `path` at first use.
fn open_dir<'a>(slot: &'a mut Option<OutputDir>, path: &Path) -> Result<&'a OutputDir> {
    match slot {
        Some(dir) => Ok(dir),
        None => Ok(slot.insert(OutputDir::open(path)?)),
    }
}

impl Drop for PendingOutputs {
    fn drop(&mut self) {
        if self.temps.is_empty() {
            return;
        }
        let dir = match open_dir(&mut self.dir, &self.path) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!("removing temporary outputs: {e:#}");
                return;
            }
        };
        let temps = self.temps.drain(..);
        for (temp, _) in temps {
            if let Err(e) = dir.remove(&temp) {
                tracing::warn!("{e:#}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::parse_sources_list;
    use crate::spec::Spec;

    fn plan() -> Plan {
        let spec = Spec::from_yaml(
            "version: 1\nname: t\nsuite: bookworm\nimages:\n  - {mount: /, fs: ext4, size: 1GiB}\n  - {mount: /var, fs: xfs, size: 1GiB}\n",
            "t",
        )
        .unwrap();
        Plan::new(
            &spec,
            &parse_sources_list("deb http://m.example/debian bookworm main"),
            false,
        )
        .unwrap()
    }

    #[test]
    fn preflight_names_every_missing_tool_and_its_package() {
        let empty = tempfile::tempdir().unwrap();
        let err = check_tools(&plan(), &[empty.path().to_path_buf()])
            .unwrap_err()
            .to_string();
        for needle in [
            "debootstrap (package debootstrap)",
            "mkfs.xfs (package xfsprogs)",
            "resize2fs (package e2fsprogs)",
            "apt-get install coreutils debootstrap e2fsprogs tar xfsprogs",
        ] {
            assert!(err.contains(needle), "`{needle}` missing in: {err}");
        }
    }

    #[test]
    fn a_tarball_with_records_is_reused_only_while_complete() {
        let spec = Spec::from_yaml(
            "version: 1\nname: tb\nsuite: bookworm\nkind: tarball\nrecords: [packages]\n",
            "t",
        )
        .unwrap();
        let plan = Plan::new(
            &spec,
            &parse_sources_list("deb http://m.example/debian bookworm main"),
            false,
        )
        .unwrap();
        let out = tempfile::tempdir().unwrap();
        std::fs::write(out.path().join("tb.tar.gz"), b"archive").unwrap();
        std::fs::write(out.path().join("tb.packages"), b"a 1\n").unwrap();
        let image = crate::metadata::ImageMeta {
            container: "gzip".into(),
            container_name: "tb.tar.gz".into(),
            container_size: 7,
            container_md5: String::new(),
            container_sha256: String::new(),
            format: "tar".into(),
            raw_md5: String::new(),
            raw_name: "tb.tar".into(),
            raw_size: 0,
            raw_sha256: String::new(),
            mount: "/".into(),
            label: None,
            uuid: String::new(),
        };
        let meta = Metadata {
            name: "tb".into(),
            debimg_version: String::new(),
            spec_digest: plan.digest.clone(),
            bootstrap: String::new(),
            build_start: String::new(),
            build_end: String::new(),
            images: vec![image],
            repos: vec![],
            packages: vec![],
            installed: Default::default(),
            kind: "tarball".into(),
            files: vec![crate::metadata::FileMeta {
                name: "tb.packages".into(),
                size: 4,
                sha256: String::new(),
            }],
        };
        std::fs::write(out.path().join("tb.yaml"), meta.to_yaml().unwrap()).unwrap();
        assert!(reusable(&plan, out.path()).is_some());
        std::fs::write(out.path().join("tb.packages"), b"a 1\nb 2\n").unwrap();
        assert!(reusable(&plan, out.path()).is_none(), "a changed record");
        std::fs::write(out.path().join("tb.packages"), b"a 1\n").unwrap();
        std::fs::remove_file(out.path().join("tb.tar.gz")).unwrap();
        assert!(reusable(&plan, out.path()).is_none(), "a missing archive");
        std::fs::write(out.path().join("elsewhere"), b"archive").unwrap();
        std::os::unix::fs::symlink("elsewhere", out.path().join("tb.tar.gz")).unwrap();
        assert!(
            reusable(&plan, out.path()).is_none(),
            "a link is not an output"
        );
    }

    fn is_root() -> bool {
        nix::unistd::geteuid().is_root()
    }

    fn mode(path: &Path) -> u32 {
        use std::os::unix::fs::MetadataExt;
        std::fs::symlink_metadata(path).unwrap().mode() & 0o7777
    }

    fn victim(dir: &Path) -> PathBuf {
        let v = dir.join("victim");
        std::fs::write(&v, b"a host file\n").unwrap();
        v
    }

    #[test]
    fn output_lock_refuses_a_link_and_leaves_its_target_alone() {
        let out = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let v = victim(outside.path());
        let before = crate::output::fingerprint(&v);
        std::os::unix::fs::symlink(&v, out.path().join(OUTPUT_LOCK)).unwrap();
        let err = format!(
            "{:#}",
            OutputLock::acquire(out.path(), false).err().unwrap()
        );
        assert!(
            err.contains(".debimg.lock is a symbolic link: refusing to follow it"),
            "{err}"
        );
        assert_eq!(crate::output::fingerprint(&v), before);
    }

    #[test]
    fn output_lock_refuses_a_fifo_without_hanging() {
        let out = tempfile::tempdir().unwrap();
        let lock = out.path().join(OUTPUT_LOCK);
        nix::unistd::mkfifo(&lock, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let path = out.path().to_path_buf();
        let (tx, rx) = std::sync::mpsc::channel();
        // A blocking open of the FIFO would never return: judge by a deadline.
        std::thread::spawn(move || {
            let _ = tx.send(
                OutputLock::acquire(&path, false)
                    .err()
                    .map(|e| format!("{e:#}")),
            );
        });
        let err = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("taking the lock hung on a FIFO")
            .expect("a FIFO was taken as the lock");
        assert!(err.contains("not a regular file"), "{err}");
    }

    #[test]
    fn output_lock_persists_and_excludes_a_second_build() {
        let out = tempfile::tempdir().unwrap();
        let first = OutputLock::acquire(out.path(), false).unwrap();
        let err = format!(
            "{:#}",
            OutputLock::acquire(out.path(), false).err().unwrap()
        );
        assert!(err.contains("another debimg build is writing"), "{err}");
        drop(first);
        let again = OutputLock::acquire(out.path(), false).unwrap();
        assert!(out.path().join(OUTPUT_LOCK).is_file());
        assert_eq!(mode(&out.path().join(OUTPUT_LOCK)), 0o600);
        assert_eq!(again.dir().path(), out.path());
    }

    /// Every kind of entry stale-workspace cleanup must leave alone, next to one it must remove
    /// (without which the test could pass by removing nothing).
    #[test]
    fn stale_cleanup_follows_no_link_opens_no_fifo_and_spares_others() {
        let build_dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let b = build_dir.path();
        let v = victim(outside.path());
        let before = crate::output::fingerprint(&v);
        let make_ws = |name: &str| {
            let d = b.join(name);
            std::fs::create_dir(&d).unwrap();
            std::fs::write(d.join(WORKSPACE_LOCK), b"").unwrap();
            std::fs::write(d.join("root.img"), b"image").unwrap();
            d
        };
        // A link to a directory that looks like a free workspace.
        let target = outside.path().join("looks-stale");
        std::fs::create_dir(&target).unwrap();
        std::fs::write(target.join(WORKSPACE_LOCK), b"").unwrap();
        std::fs::write(target.join("keep.txt"), b"keep").unwrap();
        std::os::unix::fs::symlink(&target, b.join("debimg-link")).unwrap();
        // A workspace whose lock is a FIFO (a blocking open would hang), or a link to a host
        // file.
        let fifo_ws = b.join("debimg-fifo");
        std::fs::create_dir(&fifo_ws).unwrap();
        let fifo = fifo_ws.join(WORKSPACE_LOCK);
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let link_lock_ws = b.join("debimg-linklock");
        std::fs::create_dir(&link_lock_ws).unwrap();
        std::os::unix::fs::symlink(&v, link_lock_ws.join(WORKSPACE_LOCK)).unwrap();
        // Kept: even a dangling link under the marker's name keeps it.
        let kept = make_ws("debimg-kept");
        std::os::unix::fs::symlink("/nonexistent", kept.join(KEPT_MARKER)).unwrap();
        // Another user's.
        let others = make_ws("debimg-others");
        if is_root() {
            nix::unistd::chown(&others, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
        }
        let stale = make_ws("debimg-stale");

        let path = b.to_path_buf();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            clean_stale_workspaces(&path);
            let _ = tx.send(());
        });
        rx.recv_timeout(Duration::from_secs(20))
            .expect("stale-workspace cleanup hung");

        assert!(!stale.exists(), "a stale workspace of this user is removed");
        assert!(
            std::fs::symlink_metadata(b.join("debimg-link"))
                .unwrap()
                .is_symlink(),
            "the link is left"
        );
        assert_eq!(std::fs::read(target.join("keep.txt")).unwrap(), b"keep");
        assert!(target.join(WORKSPACE_LOCK).is_file());
        assert!(fifo.exists(), "the workspace with a FIFO lock is left");
        assert!(link_lock_ws.join(WORKSPACE_LOCK).is_symlink());
        assert_eq!(crate::output::fingerprint(&v), before);
        assert!(kept.join("root.img").exists(), "a kept workspace is left");
        if is_root() {
            assert!(others.join("root.img").exists(), "another user's is left");
        }
    }

    #[test]
    fn workspace_is_private() {
        let build_dir = tempfile::tempdir().unwrap();
        let ws = Workspace::create(build_dir.path(), "t", None).unwrap();
        assert_eq!(mode(&ws.dir), 0o700);
        assert_eq!(mode(&ws.dir.join(WORKSPACE_LOCK)), 0o600);
        let dir = ws.dir.clone();
        ws.keep().unwrap();
        assert_eq!(mode(&dir.join(KEPT_MARKER)), 0o600);
        mount::remove_dir_all_safe(&dir).unwrap();
    }

    #[test]
    fn tmpfs_workspace_allows_devices_and_setuid_and_is_private() {
        let (flags, options) = tmpfs_mount_options(64 << 20);
        assert!(!flags.contains(MsFlags::MS_NODEV), "{flags:?}");
        assert!(!flags.contains(MsFlags::MS_NOSUID), "{flags:?}");
        assert!(options.split(',').any(|o| o == "mode=0700"), "{options}");
    }

    /// The real thing: a `--tmpfs` workspace, in a forked child's private mount namespace, holds
    /// a usable device node (dpkg's /dev/null in a tarball's chroot) and is 0700.
    #[test]
    fn tmpfs_workspace_holds_a_working_dev_null() {
        use nix::sys::wait::{WaitStatus, waitpid};
        use nix::unistd::{ForkResult, fork};
        if !is_root() {
            eprintln!("skipping: needs root to unshare and mount");
            return;
        }
        let build_dir = tempfile::Builder::new()
            .prefix("debimg-tmpfs-test-")
            .tempdir_in("/var/tmp")
            .unwrap();
        let bdir = build_dir.path().to_path_buf();
        // SAFETY: the child only runs the code below and leaves through _exit; glibc makes
        // malloc safe after fork, and no lock of ours is held.
        match unsafe { fork() }.unwrap() {
            ForkResult::Child => {
                let code = std::panic::catch_unwind(|| {
                    if crate::sys::namespace::enter_private_mount_namespace().is_err() {
                        return 2;
                    }
                    let Ok(ws) = Workspace::create(&bdir, "t", Some(16 << 20)) else {
                        return 3;
                    };
                    if mode(&ws.work) != 0o700 {
                        return 4;
                    }
                    let null = ws.work.join("null");
                    let made = nix::sys::stat::mknod(
                        &null,
                        nix::sys::stat::SFlag::S_IFCHR,
                        nix::sys::stat::Mode::from_bits_truncate(0o666),
                        nix::sys::stat::makedev(1, 3),
                    );
                    if made.is_err() {
                        return 5;
                    }
                    if std::fs::write(&null, b"discarded").is_err() {
                        return 6;
                    }
                    if ws.close().is_err() {
                        return 7;
                    }
                    0
                })
                .unwrap_or(8);
                // SAFETY: leaves the child without running the harness's code.
                unsafe { libc::_exit(code) }
            }
            ForkResult::Parent { child } => {
                let status = waitpid(child, None).unwrap();
                assert_eq!(
                    status,
                    WaitStatus::Exited(child, 0),
                    "2: unshare, 3: workspace, 4: tmpfs not 0700, 5: mknod, 6: opening the \
                     device (nodev?), 7: close"
                );
            }
        }
    }

    #[test]
    fn publish_replaces_a_link_and_drop_removes_temporaries() {
        let out = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let v = victim(outside.path());
        let before = crate::output::fingerprint(&v);
        std::os::unix::fs::symlink(&v, out.path().join("x.yaml")).unwrap();
        std::os::unix::fs::symlink(&v, out.path().join("x.img.gz")).unwrap();
        let mut pending = PendingOutputs::in_dir(OutputDir::open(out.path()).unwrap());
        let (mut f, tmp) = pending.create_temp("x.img.gz").unwrap();
        f.write_all(b"image").unwrap();
        let (mut u, unused) = pending.create_temp("x.raw").unwrap();
        u.write_all(b"partial").unwrap();
        pending
            .publish(&["x.img.gz"], "x.yaml", "name: x\n")
            .unwrap();
        drop(pending);
        assert!(!tmp.exists());
        assert!(!unused.exists(), "what was not published is removed");
        assert_eq!(
            std::fs::read(out.path().join("x.img.gz")).unwrap(),
            b"image"
        );
        assert_eq!(
            std::fs::read(out.path().join("x.yaml")).unwrap(),
            b"name: x\n"
        );
        assert_eq!(crate::output::fingerprint(&v), before);

        let mut pending = PendingOutputs::in_dir(OutputDir::open(out.path()).unwrap());
        let (_, tmp) = pending.create_temp("y.img.gz").unwrap();
        drop(pending);
        assert!(!tmp.exists(), "an unpublished temporary is removed");
        let mut left: Vec<_> = std::fs::read_dir(out.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, ["x.img.gz", "x.yaml"]);
    }

    #[test]
    fn preflight_passes_when_tools_exist() {
        let bin = tempfile::tempdir().unwrap();
        for (tool, _) in required_tools(&plan()) {
            std::fs::write(bin.path().join(tool), "").unwrap();
        }
        check_tools(&plan(), &[bin.path().to_path_buf()]).unwrap();
    }
}

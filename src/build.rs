//! What every build shares around its stages: options and outcome, the output directory's lock,
//! the workspace (with stale-workspace cleanup, `--tmpfs` and `--keep-on-failure`), outputs
//! published atomically, the preflight, the reuse check and the stage announcer with its
//! test-only fault hook. The stages themselves are [`crate::creator::Creator`]'s.
//!
//! Stage names, in order: mount, bootstrap, install, configure, unmount, finish (checks,
//! shrinks or archives the result), package, publish. The creator's `install` runs bootstrap
//! and install, its `package` runs finish, package and publish.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::mount::MsFlags;

use crate::creator::Creator;
use crate::metadata::Metadata;
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

/// An exclusive lock on the output directory, held for the whole build.
#[must_use]
pub struct OutputLock {
    _lock: nix::fcntl::Flock<File>,
}

impl OutputLock {
    /// Takes the lock, waiting for it when `wait` is set.
    pub fn acquire(dir: &Path, wait: bool) -> Result<OutputLock> {
        use nix::fcntl::{Flock, FlockArg};
        let path = dir.join(".debimg.lock");
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        let arg = if wait {
            FlockArg::LockExclusive
        } else {
            FlockArg::LockExclusiveNonblock
        };
        match Flock::lock(file, arg) {
            Ok(lock) => Ok(OutputLock { _lock: lock }),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => bail!(
                "another debimg build is writing to {}; wait for it (or pass --wait)",
                dir.display()
            ),
            Err((_, e)) => Err(e).with_context(|| format!("locking {}", path.display())),
        }
    }
}

/// Returns the existing metadata when every output matches the plan.
pub fn reusable(plan: &Plan, output_dir: &Path) -> Option<Metadata> {
    let meta = Metadata::read(&output_dir.join(plan.metadata_name())).ok()?;
    let names = plan.container_names();
    if meta.spec_digest != plan.digest || meta.images.len() != names.len() {
        return None;
    }
    for (name, m) in names.iter().zip(&meta.images) {
        if *name != m.container_name {
            return None;
        }
        let len = std::fs::metadata(output_dir.join(&m.container_name))
            .ok()?
            .len();
        if len != m.container_size {
            return None;
        }
    }
    let extra = plan.extra_output_names();
    if extra.len() != meta.files.len() {
        return None;
    }
    for (name, f) in extra.iter().zip(&meta.files) {
        let len = std::fs::metadata(output_dir.join(name)).ok()?.len();
        if *name != f.name || len != f.size {
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
pub(crate) fn clean_stale_workspaces(build_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(build_dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().starts_with("debimg-") {
            continue;
        }
        let dir = entry.path();
        if dir.join(KEPT_MARKER).exists() {
            continue;
        }
        let Ok(file) = File::options().write(true).open(dir.join(WORKSPACE_LOCK)) else {
            continue;
        };
        use nix::fcntl::{Flock, FlockArg};
        let Ok(lock) = Flock::lock(file, FlockArg::LockExclusiveNonblock) else {
            continue;
        };
        tracing::warn!(
            "removing stale workspace {} of a build that died",
            dir.display()
        );
        let res = mount::unmount_all_under(&dir).and_then(|()| mount::remove_dir_all_safe(&dir));
        if let Err(e) = res {
            tracing::warn!("could not remove stale workspace {}: {e:#}", dir.display());
        }
        drop(lock);
    }
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
    pub fn create(build_dir: &Path, name: &str, tmpfs: Option<u64>) -> Result<Workspace> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("debimg-{name}-"))
            .tempdir_in(build_dir)
            .with_context(|| format!("creating a workspace in {}", build_dir.display()))?
            .keep();
        let lock_path = dir.join(WORKSPACE_LOCK);
        // Should locking fail, the directory is left with a free lock: the next run removes it.
        let file = File::create_new(&lock_path)
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
            let m = mount::mount(
                "debimg-tmpfs",
                &work,
                Some("tmpfs"),
                MsFlags::MS_NODEV | MsFlags::MS_NOSUID,
                Some(&format!("size={size},mode=0755")),
            )
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
        std::fs::write(&marker, "kept by --keep-on-failure\n")
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
/// published.
pub(crate) struct PendingOutputs {
    dir: PathBuf,
    temps: Vec<(PathBuf, String)>,
}

impl PendingOutputs {
    pub fn new(dir: &Path) -> PendingOutputs {
        PendingOutputs {
            dir: dir.to_path_buf(),
            temps: Vec::new(),
        }
    }

    pub fn temp_path(&mut self, final_name: &str) -> PathBuf {
        let p = self
            .dir
            .join(format!(".{final_name}.tmp-{}", crate::sys::unique_token()));
        self.temps.push((p.clone(), final_name.to_string()));
        p
    }

    /// Renames the images into place, then writes the metadata last. The old metadata goes
    /// first, so that no moment shows new images described by old metadata.
    pub fn publish(&mut self, images: &[&str], metadata_name: &str, yaml: &str) -> Result<()> {
        let meta_path = self.dir.join(metadata_name);
        match std::fs::remove_file(&meta_path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("removing old {}", meta_path.display()));
            }
            _ => {}
        }
        sync_dir(&self.dir)?;
        for name in images {
            let (tmp, _) = self
                .temps
                .iter()
                .find(|(_, n)| n == name)
                .with_context(|| format!("{name} was not packaged"))?;
            std::fs::rename(tmp, self.dir.join(name))
                .with_context(|| format!("moving {name} into {}", self.dir.display()))?;
        }
        self.temps.clear();
        let tmp = self.dir.join(format!(
            ".{metadata_name}.tmp-{}",
            crate::sys::unique_token()
        ));
        let res = (|| {
            let mut f =
                File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
            std::io::Write::write_all(&mut f, yaml.as_bytes())
                .with_context(|| format!("writing {}", tmp.display()))?;
            f.sync_all()
                .with_context(|| format!("syncing {}", tmp.display()))?;
            std::fs::rename(&tmp, &meta_path)
                .with_context(|| format!("moving {} into place", meta_path.display()))?;
            sync_dir(&self.dir)
        })();
        if res.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        res
    }
}

impl Drop for PendingOutputs {
    fn drop(&mut self) {
        for (tmp, _) in self.temps.drain(..) {
            if let Err(e) = std::fs::remove_file(&tmp)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!("removing {}: {e}", tmp.display());
            }
        }
    }
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("syncing {}", dir.display()))
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

//! The orchestrator: runs the stages of a build in order, each kernel resource held by a guard,
//! and unwinds everything on failure or interruption.
//!
//! Stages: reuse check, disks (sparse files, loop devices, mkfs, depth-sorted mounts), bootstrap,
//! install (apt sources, pins, packages), configure, release (kill leftover processes, unmount,
//! detach), shrink, package (digests + gzip into the output dir, renamed into place, metadata
//! last).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::mount::MsFlags;

use crate::cache::{self, Cache};
use crate::debian::apt::Apt;
use crate::debian::configure::{self, BuildOnlyFiles, FstabEntry};
use crate::debian::{debootstrap, mmdebstrap};
use crate::metadata::{ImageMeta, Metadata, RepoMeta, now_rfc3339};
use crate::pack::compress::{self, Packed};
use crate::pack::shrink;
use crate::plan::{Backend, Plan};
use crate::signals;
use crate::spec::Fs;
use crate::sys::loopdev::{self, LoopDevice};
use crate::sys::mkfs::{self, MkfsRequest};
use crate::sys::mount::{self, Mount};
use crate::sys::procs;

/// How long processes left in the chroot get between SIGTERM and SIGKILL.
const KILL_GRACE: Duration = Duration::from_secs(5);

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
}

/// Runs one named stage, announcing it and its duration on stderr.
fn stage<T>(name: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
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
    if meta.spec_digest != plan.digest || meta.images.len() != plan.images.len() {
        return None;
    }
    for (img, m) in plan.images.iter().zip(&meta.images) {
        if img.container_name != m.container_name {
            return None;
        }
        let len = std::fs::metadata(output_dir.join(&m.container_name))
            .ok()?
            .len();
        if len != m.container_size {
            return None;
        }
    }
    Some(meta)
}

/// Builds the plan's images into the output directory, or reuses them.
pub fn build(plan: &Plan, opts: &BuildOptions) -> Result<Outcome> {
    std::fs::create_dir_all(&opts.output_dir)
        .with_context(|| format!("creating output directory {}", opts.output_dir.display()))?;
    let output_dir = opts
        .output_dir
        .canonicalize()
        .with_context(|| format!("resolving {}", opts.output_dir.display()))?;
    let _lock = OutputLock::acquire(&output_dir, opts.wait)?;
    // Also on a reuse: a killed build's workspace (and its sparse images) goes at the next run.
    clean_stale_workspaces(&opts.build_dir);
    let metadata_path = output_dir.join(plan.metadata_name());
    if !opts.force
        && let Some(metadata) = reusable(plan, &output_dir)
    {
        return Ok(Outcome {
            reused: true,
            metadata_path,
            metadata,
        });
    }
    preflight(plan)?;
    std::fs::create_dir_all(&opts.build_dir)
        .with_context(|| format!("creating build directory {}", opts.build_dir.display()))?;
    let build_start = now_rfc3339();
    let ws = Workspace::create(&opts.build_dir, &plan.name)?;
    let result = run_stages(plan, opts, &ws, &output_dir, build_start)
        .map_err(|e| explain_no_space(e, &opts.build_dir));
    let closed = ws.close();
    let metadata = result?;
    closed?;
    Ok(Outcome {
        reused: false,
        metadata_path,
        metadata,
    })
}

/// What the stages before packaging leave for it.
struct Built {
    images: Vec<(PathBuf, String)>,
    installed: std::collections::BTreeMap<String, String>,
    release_metas: Vec<crate::debian::apt::ReleaseMeta>,
}

fn run_stages(
    plan: &Plan,
    opts: &BuildOptions,
    ws: &Workspace,
    output_dir: &Path,
    build_start: String,
) -> Result<Metadata> {
    let built = build_tree(plan, opts, ws)?;
    stage("shrink", || {
        for (img, (file, _)) in plan.images.iter().zip(&built.images) {
            mkfs::check(img.fs, file)?;
            if matches!(img.fs, Fs::Ext3 | Fs::Ext4) {
                shrink::set_ext_journal(file, true)?;
            }
            if img.fs.is_ext() {
                shrink::shrink_ext(file)?;
            }
        }
        Ok(())
    })?;
    let mut pending = PendingOutputs::new(output_dir);
    let packed = stage("package", || {
        let mut out = Vec::new();
        for (img, (file, _)) in plan.images.iter().zip(&built.images) {
            signals::check()?;
            let tmp = pending.temp_path(&img.container_name);
            let t = Instant::now();
            let p = compress::pack(file, img.container, &tmp)
                .with_context(|| format!("packaging {}", img.container_name))?;
            tracing::info!(
                "{}: {:.1} MiB raw -> {:.1} MiB {} in {:.1}s",
                img.container_name,
                p.raw.size as f64 / 1048576.0,
                p.container.size as f64 / 1048576.0,
                img.container.name(),
                t.elapsed().as_secs_f64()
            );
            out.push(p);
        }
        Ok(out)
    })?;
    let metadata = Metadata {
        name: plan.name.clone(),
        debimg_version: env!("CARGO_PKG_VERSION").to_string(),
        spec_digest: plan.digest.clone(),
        bootstrap: plan.backend.name().to_string(),
        build_start,
        build_end: now_rfc3339(),
        images: plan
            .images
            .iter()
            .zip(&packed)
            .zip(&built.images)
            .map(|((img, p), (_, uuid))| image_meta(img, p, uuid))
            .collect(),
        repos: plan
            .repos
            .iter()
            .zip(&built.release_metas)
            .map(|(r, m)| RepoMeta {
                name: r.name.clone(),
                uri: r.uri.clone(),
                suite: r.suite.clone(),
                section: r.section.clone(),
                priority: r.priority,
                meta: m.clone(),
            })
            .collect(),
        packages: plan.packages.clone(),
        installed: built.installed,
    };
    stage("publish", || {
        let names: Vec<&str> = plan
            .images
            .iter()
            .map(|i| i.container_name.as_str())
            .collect();
        pending.publish(&names, &plan.metadata_name(), &metadata.to_yaml()?)
    })?;
    Ok(metadata)
}

fn image_meta(img: &crate::plan::PlannedImage, p: &Packed, uuid: &str) -> ImageMeta {
    ImageMeta {
        container: img.container.name().to_string(),
        container_name: img.container_name.clone(),
        container_size: p.container.size,
        container_md5: p.container.md5.clone(),
        container_sha256: p.container.sha256.clone(),
        format: img.fs.name().to_string(),
        raw_md5: p.raw.md5.clone(),
        raw_name: img.raw_name.clone(),
        raw_size: p.raw.size,
        raw_sha256: p.raw.sha256.clone(),
        mount: img.mount.clone(),
        label: img.label.clone(),
        uuid: uuid.to_string(),
    }
}

/// Disks, bootstrap, install, configure and release: everything that needs the mounted tree.
fn build_tree(plan: &Plan, opts: &BuildOptions, ws: &Workspace) -> Result<Built> {
    let root = ws.dir.join("root");
    let mut tree = stage("disks", || Tree::create(plan, ws, &root))?;
    let cache = opts.cache_dir.as_deref().map(Cache::open).transpose()?;
    let mut build_only = BuildOnlyFiles::new(&root);
    stage("bootstrap", || {
        build_only.install_policy()?;
        // dpkg reads dpkg.cfg.d as soon as debootstrap installed it: no fsyncs from there on.
        build_only.install_dpkg_unsafe_io()?;
        bootstrap(plan, opts, ws, &root, cache.as_ref())?;
        build_only.install_policy()
    })?;
    let apt = Apt {
        root: &root,
        show: opts.show_progress,
    };
    let release_metas = stage("install", || {
        tree.mount_api_filesystems()?;
        build_only.install_resolv_conf()?;
        build_only.install_dpkg_unsafe_io()?;
        // apt downloads into the workspace, seeded from and returned to the package cache:
        // the image's filesystem never holds the archives.
        let archives = ws.dir.join("archives");
        match &cache {
            Some(c) => {
                let n = c.link_packages_into(&archives)?;
                tracing::debug!("{n} cached packages offered to apt");
            }
            None => std::fs::create_dir_all(&archives)
                .with_context(|| format!("creating {}", archives.display()))?,
        }
        std::fs::create_dir_all(archives.join("partial"))
            .with_context(|| format!("creating {}/partial", archives.display()))?;
        let archives_target = root.join("var/cache/apt/archives");
        tree.bind(&archives, &archives_target)?;
        apt.configure_and_update(plan, cache.as_ref())?;
        let metas = apt.pin(plan)?;
        apt.install(&plan.packages)?;
        if let Some(c) = &cache {
            let n = c.store_packages_from(&archives)?;
            tracing::debug!("{n} new packages added to the cache");
        }
        tree.unmount_last(&archives_target)?;
        Ok(metas)
    })?;
    let installed = stage("configure", || {
        if let Some(hash) = &plan.root_password_hash {
            configure::set_root_password(&root, hash)?;
        }
        let fstab: Vec<FstabEntry> = plan
            .mount_order
            .iter()
            .map(|&i| FstabEntry {
                uuid: tree.uuids[i].clone(),
                mount: plan.images[i].mount.clone(),
                fs: plan.images[i].fs,
            })
            .collect();
        configure::write_system_files(&root, &plan.hostname, &fstab)?;
        configure::scrub_host_identity(&root)?;
        apt.clean()?;
        let installed = apt.installed()?;
        build_only.remove()?;
        if !plan.keep_apt_sources {
            configure::drop_apt_sources(&root)?;
        }
        Ok(installed)
    })?;
    let images = tree
        .files
        .iter()
        .cloned()
        .zip(tree.uuids.iter().cloned())
        .collect();
    stage("release", || tree.release())?;
    Ok(Built {
        images,
        installed,
        release_metas,
    })
}

/// Fills `root` with the base system: from the base-tree cache when it holds this bootstrap,
/// else by debootstrap (its downloads pooled in the package cache), storing the result.
fn bootstrap(
    plan: &Plan,
    opts: &BuildOptions,
    ws: &Workspace,
    root: &Path,
    cache: Option<&Cache>,
) -> Result<()> {
    let Some(cache) = cache else {
        return run_backend(plan, root, None, opts.show_progress);
    };
    let key = match cache::release_digest(plan, &ws.dir) {
        Ok(d) => Some(cache::base_key(plan, &d)),
        Err(e) => {
            tracing::warn!("not using the base-tree cache: {e:#}");
            None
        }
    };
    if let Some(tar) = key.as_deref().and_then(|k| cache.base(k)) {
        tracing::info!("base tree from the cache ({})", tar.display());
        return Cache::restore_base(&tar, root);
    }
    let debs = ws.dir.join("debs");
    cache.link_packages_into(&debs)?;
    run_backend(plan, root, Some(&debs), opts.show_progress)?;
    cache.store_packages_from(&debs)?;
    if let Some(k) = key {
        let tar = cache.store_base(&k, root)?;
        tracing::info!("base tree cached as {}", tar.display());
    }
    Ok(())
}

fn run_backend(plan: &Plan, root: &Path, debs: Option<&Path>, show: bool) -> Result<()> {
    match plan.backend {
        Backend::Debootstrap => debootstrap::run(plan, root, debs, show),
        Backend::Mmdebstrap => mmdebstrap::run(plan, root, debs, show),
    }
}

/// The mounted image tree: loop devices and mounts, released in reverse order.
#[must_use]
struct Tree {
    root: PathBuf,
    files: Vec<PathBuf>,
    uuids: Vec<String>,
    loops: Vec<LoopDevice>,
    /// In mount order; unmounted from the end.
    mounts: Vec<Mount>,
}

impl Tree {
    fn create(plan: &Plan, ws: &Workspace, root: &Path) -> Result<Tree> {
        let mut tree = Tree {
            root: root.to_path_buf(),
            files: Vec::new(),
            uuids: Vec::new(),
            loops: Vec::new(),
            mounts: Vec::new(),
        };
        for img in &plan.images {
            let file = ws.dir.join(&img.raw_name);
            let f = File::create_new(&file)
                .with_context(|| format!("creating image file {}", file.display()))?;
            f.set_len(img.size)
                .with_context(|| format!("sizing {} to {} bytes", file.display(), img.size))?;
            drop(f);
            let dev = loopdev::attach(&file, false)?;
            let uuid = mkfs::new_uuid()?;
            mkfs::make(
                &MkfsRequest {
                    fs: img.fs,
                    label: img.label.as_deref(),
                    uuid: &uuid,
                    no_journal: true,
                    options: &img.mkfs_options,
                },
                dev.path(),
            )?;
            tree.files.push(file);
            tree.uuids.push(uuid);
            tree.loops.push(dev);
        }
        for &i in &plan.mount_order {
            let img = &plan.images[i];
            let target = root.join(img.mount.trim_start_matches('/'));
            std::fs::create_dir_all(&target)
                .with_context(|| format!("creating mount point {}", target.display()))?;
            let dev = tree.loops[i].path().to_string_lossy().into_owned();
            let m = mount::mount(&dev, &target, Some(img.fs.name()), MsFlags::empty(), None)?;
            tree.mounts.push(m);
        }
        Ok(tree)
    }

    /// Fresh proc, sysfs and devpts for the chroot: never bind mounts of the host's.
    fn mount_api_filesystems(&mut self) -> Result<()> {
        let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
        let specs: [(&str, &str, MsFlags, Option<&str>); 3] = [
            ("proc", "proc", nosuid, None),
            ("sys", "sysfs", nosuid | MsFlags::MS_RDONLY, None),
            (
                "dev/pts",
                "devpts",
                MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
                Some("newinstance,ptmxmode=0666,mode=620,gid=5"),
            ),
        ];
        for (rel, fstype, flags, data) in specs {
            let target = self.root.join(rel);
            std::fs::create_dir_all(&target)
                .with_context(|| format!("creating {}", target.display()))?;
            let m = mount::mount(fstype, &target, Some(fstype), flags, data)?;
            self.mounts.push(m);
        }
        Ok(())
    }

    /// Bind-mounts a workspace directory into the tree.
    fn bind(&mut self, source: &Path, target: &Path) -> Result<()> {
        std::fs::create_dir_all(target)
            .with_context(|| format!("creating {}", target.display()))?;
        let m = mount::mount(
            &source.to_string_lossy(),
            target,
            None,
            MsFlags::MS_BIND,
            None,
        )?;
        self.mounts.push(m);
        Ok(())
    }

    /// Unmounts the most recent mount, which must be the one at `target`.
    fn unmount_last(&mut self, target: &Path) -> Result<()> {
        let canonical = target
            .canonicalize()
            .with_context(|| format!("resolving {}", target.display()))?;
        match self.mounts.last() {
            Some(m) if m.target() == canonical => {
                let m = self.mounts.pop().expect("checked above");
                m.close()
            }
            _ => bail!("{} is not the last mount of the tree", target.display()),
        }
    }

    /// Ends leftover processes, unmounts deepest first, detaches the loop devices.
    fn release(mut self) -> Result<()> {
        let killed = procs::kill_processes_in_root(&self.root, KILL_GRACE)?;
        if !killed.is_empty() {
            tracing::warn!("ended processes left in the chroot: {killed:?}");
        }
        // One sync for the whole build (dpkg skipped its own); syncfs also reports writes the
        // kernel failed to store, which unmount would swallow.
        for m in self.mounts.iter().rev() {
            syncfs(m.target())?;
        }
        while let Some(m) = self.mounts.pop() {
            m.close()?;
        }
        // Anything a tool mounted on its own (debootstrap's proc) goes too, deepest first.
        mount::unmount_all_under(&self.root)?;
        while let Some(l) = self.loops.pop() {
            l.close()?;
        }
        Ok(())
    }
}

impl Drop for Tree {
    fn drop(&mut self) {
        if self.mounts.is_empty() && self.loops.is_empty() {
            return;
        }
        if let Err(e) = procs::kill_processes_in_root(&self.root, KILL_GRACE) {
            tracing::warn!("ending processes in {}: {e:#}", self.root.display());
        }
        while let Some(m) = self.mounts.pop() {
            if let Err(e) = m.close() {
                tracing::warn!("{e:#}");
            }
        }
        if let Err(e) = mount::unmount_all_under(&self.root) {
            tracing::warn!("{e:#}");
        }
        while let Some(l) = self.loops.pop() {
            if let Err(e) = l.close() {
                tracing::warn!("{e:#}");
            }
        }
    }
}

/// Below this much free space in the build directory a failure is blamed on a full disk.
const LOW_SPACE: u64 = 32 << 20;

/// Adds "no space left" to an error when the build directory's filesystem is (nearly) full:
/// a full disk under a loop device shows up as I/O errors that do not say so.
fn explain_no_space(err: anyhow::Error, build_dir: &Path) -> anyhow::Error {
    match nix::sys::statvfs::statvfs(build_dir) {
        Ok(st) => {
            let free = st.blocks_available() * st.fragment_size();
            if free < LOW_SPACE {
                return err.context(format!(
                    "no space left in the build directory {} ({} KiB free): free some or choose another with --build-dir",
                    build_dir.display(),
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

/// Removes workspaces of builds that died without cleaning up (SIGKILL, power loss): their lock
/// is free. Their mounts and loop devices went with their namespaces; only files remain.
fn clean_stale_workspaces(build_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(build_dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().starts_with("debimg-") {
            continue;
        }
        let dir = entry.path();
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
struct Workspace {
    dir: PathBuf,
    closed: bool,
    _lock: nix::fcntl::Flock<File>,
}

impl Workspace {
    fn create(build_dir: &Path, name: &str) -> Result<Workspace> {
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
        tracing::debug!("workspace {}", dir.display());
        Ok(Workspace {
            dir,
            closed: false,
            _lock: lock,
        })
    }

    /// Unmounts anything left and deletes the workspace, never across a mount point.
    fn close(mut self) -> Result<()> {
        self.closed = true;
        mount::unmount_all_under(&self.dir)?;
        mount::remove_dir_all_safe(&self.dir)
            .with_context(|| format!("removing workspace {}", self.dir.display()))
    }
}

impl Drop for Workspace {
    fn drop(&mut self) {
        if self.closed {
            return;
        }
        let res = mount::unmount_all_under(&self.dir)
            .and_then(|()| mount::remove_dir_all_safe(&self.dir));
        if let Err(e) = res {
            tracing::warn!("cleaning workspace {}: {e:#}", self.dir.display());
        }
    }
}

/// Files being written into the output directory under temporary names; removed unless
/// published.
struct PendingOutputs {
    dir: PathBuf,
    temps: Vec<(PathBuf, String)>,
}

impl PendingOutputs {
    fn new(dir: &Path) -> PendingOutputs {
        PendingOutputs {
            dir: dir.to_path_buf(),
            temps: Vec::new(),
        }
    }

    fn temp_path(&mut self, final_name: &str) -> PathBuf {
        let p = self
            .dir
            .join(format!(".{final_name}.tmp-{}", crate::sys::unique_token()));
        self.temps.push((p.clone(), final_name.to_string()));
        p
    }

    /// Renames the images into place, then writes the metadata last. The old metadata goes
    /// first, so that no moment shows new images described by old metadata.
    fn publish(&mut self, images: &[&str], metadata_name: &str, yaml: &str) -> Result<()> {
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

/// Flushes the filesystem holding `path` and reports any write it lost.
fn syncfs(path: &Path) -> Result<()> {
    let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    nix::unistd::syncfs(&f).with_context(|| {
        format!(
            "flushing the filesystem at {}: writes were lost",
            path.display()
        )
    })
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
    fn preflight_passes_when_tools_exist() {
        let bin = tempfile::tempdir().unwrap();
        for (tool, _) in required_tools(&plan()) {
            std::fs::write(bin.path().join(tool), "").unwrap();
        }
        check_tools(&plan(), &[bin.path().to_path_buf()]).unwrap();
    }
}

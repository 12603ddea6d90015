//! The creator API: a build as stages a program calls one by one or all at once.
//!
//! [`Creator::mount`], [`Creator::install`], [`Creator::configure`], [`Creator::unmount`] and
//! [`Creator::package`] run in this order; [`Creator::create`] runs them all (after a reuse
//! check). [`Creator::cleanup`] is always safe to call, at any point and more than once, and
//! runs on drop too. What kind of image comes out is an [`ImageKind`]: per-filesystem images
//! ([`crate::kind::fs_images`]) or a root filesystem tarball ([`crate::kind::tarball`]).
//!
//! A program of its own can put a step between two stages; here one writes a file into the
//! image after `configure` and before `unmount`:
//!
//! ```no_run
//! use std::path::Path;
//! use debimg::{BuildOptions, Creator, Plan, Spec};
//!
//! fn main() -> anyhow::Result<()> {
//!     let spec = Spec::from_file(Path::new("data/examples/minimal.yaml"))?;
//!     let sources = debimg::plan::read_host_sources(Path::new("/"))?;
//!     let plan = Plan::new(&spec, &sources, debimg::plan::host_has("mmdebstrap"))?;
//!     // Run the build in namespaces of its own, as `debimg build` does: nothing it mounts
//!     // reaches the host, and nothing of it outlives this process.
//!     let code = debimg::sys::namespace::run_isolated(|| {
//!         let staged = || -> anyhow::Result<()> {
//!             debimg::signals::install()?;
//!             let mut creator = Creator::new(plan, BuildOptions::new("out"))?;
//!             creator.mount()?;
//!             creator.install()?;
//!             creator.configure()?;
//!             // Our own step, in the finished tree before it is unmounted: through the
//!             // in-root file API, so a link the image holds cannot lead the write outside it.
//!             let owner = debimg::root::Owner::ROOT;
//!             creator.root()?.write("/etc/motd", b"Built by my pipeline.\n", 0o644, owner)?;
//!             creator.unmount()?;
//!             let outcome = creator.package()?;
//!             creator.cleanup()?;
//!             println!("{}", outcome.metadata_path.display());
//!             Ok(())
//!         };
//!         match staged() {
//!             Ok(()) => 0,
//!             Err(e) => {
//!                 eprintln!("error: {e:#}");
//!                 1
//!             }
//!         }
//!     })?;
//!     std::process::exit(code.into());
//! }
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use nix::mount::MsFlags;

use crate::build::{
    BuildOptions, Outcome, OutputLock, PendingOutputs, Workspace, clean_stale_workspaces,
    explain_no_space, preflight, reusable, stage,
};
use crate::cache::{self, Cache};
use crate::debian::apt::{Apt, ReleaseMeta};
use crate::debian::configure::{self, BuildOnlyFiles, FstabEntry};
use crate::debian::{debootstrap, mmdebstrap, settings};
use crate::kind::{self, ImageKind, Ship, Staged};
use crate::metadata::{FileMeta, ImageMeta, Metadata, RepoMeta, now_rfc3339};
use crate::pack::compress;
use crate::plan::{Backend, Plan};
use crate::root::Root;
use crate::spec::Record;
use crate::sys::mount::{self, Mount};
use crate::sys::procs;
use crate::{post, records, signals};

/// How long processes left in the chroot get between SIGTERM and SIGKILL.
const KILL_GRACE: Duration = Duration::from_secs(5);

/// Where a build stands; each stage needs the one before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Progress {
    New,
    Mounted,
    Installed,
    Configured,
    Unmounted,
    Packaged,
}

/// A build in stages. See the module documentation for an example.
pub struct Creator {
    plan: Plan,
    opts: BuildOptions,
    kind: Box<dyn ImageKind>,
    output_dir: PathBuf,
    _lock: OutputLock,
    ws: Option<Workspace>,
    /// Where the tree is on the host (empty before `mount`).
    root_path: PathBuf,
    /// The tree, held from `mount` to `unmount`.
    tree: Option<Root>,
    /// API filesystems and bind mounts of the chroot, unmounted from the end.
    mounts: Vec<Mount>,
    build_only: Option<BuildOnlyFiles>,
    cache: Option<Cache>,
    progress: Progress,
    failed: bool,
    build_start: String,
    release_metas: Vec<ReleaseMeta>,
    installed: BTreeMap<String, String>,
    /// Files for the output directory besides the images: (file name, path in the workspace).
    extra: Vec<(String, PathBuf)>,
    staged: Vec<Staged>,
}

impl Creator {
    /// A creator for the kind of image the plan asks for. Takes the output directory's lock
    /// and removes workspaces of builds that died; creates nothing else yet.
    pub fn new(plan: Plan, opts: BuildOptions) -> Result<Creator> {
        let kind = kind::for_plan(&plan);
        Creator::with_kind(plan, opts, kind)
    }

    /// A creator for a kind of image of the caller's.
    pub fn with_kind(plan: Plan, opts: BuildOptions, kind: Box<dyn ImageKind>) -> Result<Creator> {
        std::fs::create_dir_all(&opts.output_dir)
            .with_context(|| format!("creating output directory {}", opts.output_dir.display()))?;
        let output_dir = opts
            .output_dir
            .canonicalize()
            .with_context(|| format!("resolving {}", opts.output_dir.display()))?;
        let lock = OutputLock::acquire(&output_dir, opts.wait)?;
        // Also on a reuse: a killed build's workspace (and its sparse images) goes at the next
        // run.
        clean_stale_workspaces(&opts.build_dir);
        Ok(Creator {
            plan,
            opts,
            kind,
            output_dir,
            _lock: lock,
            ws: None,
            root_path: PathBuf::new(),
            tree: None,
            mounts: Vec::new(),
            build_only: None,
            cache: None,
            progress: Progress::New,
            failed: false,
            build_start: now_rfc3339(),
            release_metas: Vec::new(),
            installed: BTreeMap::new(),
            extra: Vec::new(),
            staged: Vec::new(),
        })
    }

    /// The plan being built.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// The install root: the image's `/`, for reading and writing files in it through the
    /// in-root file API (from `mount` to `unmount`). Its [`Root::path`] is for programs that
    /// work inside the tree themselves.
    pub fn root(&self) -> Result<&Root> {
        self.tree
            .as_ref()
            .context("the image tree is not mounted (call it between mount and unmount)")
    }

    /// The filesystems of the image as mounted now (empty for a tarball).
    pub fn filesystems(&self) -> Vec<kind::FsInfo> {
        self.kind.filesystems()
    }

    /// The existing output when it matches the plan (and `force` is off).
    pub fn reusable(&self) -> Option<Outcome> {
        if self.opts.force {
            return None;
        }
        reusable(&self.plan, &self.output_dir).map(|metadata| Outcome {
            reused: true,
            metadata_path: self.output_dir.join(self.plan.metadata_name()),
            metadata,
        })
    }

    /// Every stage: reuses a matching output, else mounts, installs, configures, unmounts and
    /// packages. Cleans up whatever happens.
    pub fn create(&mut self) -> Result<Outcome> {
        if let Some(outcome) = self.reusable() {
            return Ok(outcome);
        }
        let res = (|| {
            self.mount()?;
            self.install()?;
            self.configure()?;
            self.unmount()?;
            self.package()
        })();
        let cleaned = self.cleanup();
        let outcome = res?;
        cleaned?;
        Ok(outcome)
    }

    /// Creates the workspace, prepares the storage and mounts the install root.
    pub fn mount(&mut self) -> Result<()> {
        self.expect(Progress::New, "mount")?;
        let res = (|| {
            preflight(&self.plan)?;
            std::fs::create_dir_all(&self.opts.build_dir).with_context(|| {
                format!("creating build directory {}", self.opts.build_dir.display())
            })?;
            check_free_space(&self.plan, &self.opts.build_dir, self.opts.tmpfs)?;
            // Before anything is made: a cache another user could write is refused.
            self.cache = self
                .opts
                .cache_dir
                .as_deref()
                .map(Cache::open)
                .transpose()?;
            let ws = Workspace::create(&self.opts.build_dir, &self.plan.name, self.opts.tmpfs)?;
            self.root_path = ws.work.join("root");
            self.ws = Some(ws);
            let (plan, root, work) = (&self.plan, &self.root_path, self.work()?.to_path_buf());
            let kind = &mut self.kind;
            stage("mount", || kind.mount_root(plan, &work, root))?;
            // Opened once the filesystems are mounted: a descriptor taken before would hold the
            // directory underneath them.
            self.tree = Some(Root::open(&self.root_path)?);
            self.build_only = Some(BuildOnlyFiles::new());
            Ok(())
        })();
        self.advance(res, Progress::Mounted)
    }

    /// Bootstraps the base system and installs the packages.
    pub fn install(&mut self) -> Result<()> {
        self.expect(Progress::Mounted, "install")?;
        let res = self.install_inner();
        self.advance(res, Progress::Installed)
    }

    fn install_inner(&mut self) -> Result<()> {
        let work = self.work()?.to_path_buf();
        let root = self.tree.as_ref().context("mount first")?;
        let build_only = self.build_only.as_mut().context("mount first")?;
        stage("bootstrap", || {
            build_only.install_policy(root)?;
            // dpkg reads dpkg.cfg.d as soon as the bootstrap installed it: no fsyncs from then.
            build_only.install_dpkg_unsafe_io(root)?;
            bootstrap(&self.plan, &self.opts, &work, root, self.cache.as_ref())?;
            root.end_processes("the bootstrap")?;
            build_only.install_policy(root)
        })?;
        let apt = Apt {
            root,
            show: self.opts.show_progress,
        };
        let plan = &self.plan;
        let cache = self.cache.as_ref();
        let mounts = &mut self.mounts;
        self.release_metas = stage("install", || {
            mount_api_filesystems(root, mounts)?;
            build_only.install_resolv_conf(root)?;
            build_only.install_dpkg_unsafe_io(root)?;
            // apt downloads into the workspace, seeded from and returned to the package cache:
            // the image's filesystem never holds the archives.
            let archives = work.join("archives");
            std::fs::create_dir_all(archives.join("partial"))
                .with_context(|| format!("creating {}/partial", archives.display()))?;
            mounts.push(root.bind(&archives, "/var/cache/apt/archives")?);
            apt.configure_and_update(plan, cache)?;
            // The repositories' indexes as apt just verified them, before any code from the
            // packages runs: what the pool offers and takes is checked against them.
            let index = match cache {
                Some(_) => apt.package_index()?,
                None => Default::default(),
            };
            if let Some(c) = cache {
                let o = c.offer_packages(&archives, &index)?;
                tracing::debug!(
                    "{} cached packages ({} MiB) offered to apt, {} rejected",
                    o.files,
                    o.bytes >> 20,
                    o.rejected
                );
            }
            let metas = apt.pin(plan)?;
            apt.exclude(&plan.exclude)?;
            let packages = if plan.skip_missing {
                apt.drop_missing(&plan.packages)?
            } else {
                plan.packages.clone()
            };
            let downgrades = crate::debian::apt::allows_downgrades(&plan.repos);
            apt.install(&packages, downgrades)?;
            apt.install_local(&plan.local_debs, downgrades)?;
            let purged = apt.purge_excluded(&plan.exclude)?;
            if !purged.is_empty() {
                tracing::info!("purged excluded packages: {}", purged.join(" "));
            }
            if let Some(c) = cache {
                let mut stored = c.store_packages(&archives, &index)?;
                let debs = work.join("debs");
                if debs.is_dir() {
                    let b = c.store_packages(&debs, &index)?;
                    stored.files += b.files;
                    stored.rejected += b.rejected;
                }
                tracing::debug!(
                    "{} new packages added to the cache ({} not matching an index)",
                    stored.files,
                    stored.rejected
                );
            }
            let m = mounts.pop().context("the archives bind mount is gone")?;
            m.close()?;
            Ok(metas)
        })?;
        Ok(())
    }

    /// Writes the system settings, copies files, runs the post scripts, makes the tree
    /// bootable, collects the package records and removes every build-only file.
    pub fn configure(&mut self) -> Result<()> {
        self.expect(Progress::Installed, "configure")?;
        let res = self.configure_inner();
        self.advance(res, Progress::Configured)
    }

    fn configure_inner(&mut self) -> Result<()> {
        let work = self.work()?.to_path_buf();
        let root = self.tree.as_ref().context("mount first")?;
        let plan = &self.plan;
        let kind = &mut self.kind;
        let build_only = self.build_only.as_mut().context("mount first")?;
        let show = self.opts.show_progress;
        let (installed, extra) = stage("configure", || {
            if let Some(hash) = &plan.root_password_hash {
                configure::set_root_password(root, hash)?;
            }
            let filesystems = kind.filesystems();
            let fstab: Vec<FstabEntry> = filesystems
                .iter()
                .map(|f| FstabEntry {
                    uuid: f.uuid.clone(),
                    mount: f.mount.clone(),
                    fs: f.fs.clone(),
                })
                .collect();
            configure::write_system_files(root, &plan.hostname, &fstab)?;
            if let Some(tz) = &plan.timezone {
                settings::set_timezone(root, tz)?;
            }
            if let Some(locale) = &plan.locale {
                settings::set_locale(root, locale)?;
            }
            settings::create_users(root, &plan.users)?;
            settings::copy_files(root, &plan.files)?;
            settings::set_services(root, &plan.services)?;
            root.end_processes("the system settings")?;
            post::run_all(&plan.post, root, &work, &plan.name, &filesystems, show)?;
            // After the scripts, so that the bootloader sees the kernels and settings they left.
            kind.make_bootable(plan, root, &work)?;
            root.end_processes("the bootloader")?;
            configure::scrub_host_identity(root)?;
            let apt = Apt { root, show };
            apt.clean()?;
            let installed = apt.installed()?;
            let extra = collect_extra_outputs(plan, root, &work, &installed)?;
            build_only.remove(root)?;
            if !plan.keep_apt_sources {
                configure::drop_apt_sources(root)?;
            }
            Ok((installed, extra))
        })?;
        self.installed = installed;
        self.extra = extra;
        Ok(())
    }

    /// Opens an interactive shell in the chroot (for `--shell`): the tree as configured, before
    /// it is unmounted. Ctrl-C belongs to the shell here, not to the build.
    pub fn shell(&mut self) -> Result<()> {
        if self.progress < Progress::Mounted || self.progress >= Progress::Unmounted {
            bail!("a shell needs the mounted tree: call it between mount and unmount");
        }
        let root = self.root()?;
        let shell = ["/bin/bash", "/bin/sh"]
            .into_iter()
            .find(|s| root.is_file(s))
            .context("the image has no /bin/sh")?;
        eprintln!(
            "debimg: shell in {} ({}); the build goes on when it exits",
            self.plan.name,
            root.path().display()
        );
        let mut cmd = root.command(shell);
        cmd.env("PS1", format!("(debimg {}) \\w# ", self.plan.name))
            .env(
                "TERM",
                std::env::var("TERM").unwrap_or_else(|_| "dumb".into()),
            )
            .envs(post::environment(
                "/",
                &self.plan.name,
                true,
                &self.kind.filesystems(),
            ));
        let before = signals::interrupted();
        let status = cmd
            .status()
            .with_context(|| format!("starting a shell in {}", root.path().display()))?;
        if before.is_none() && signals::interrupted() == Some(libc::SIGINT) {
            signals::forget();
        }
        if !status.success() {
            tracing::warn!("the shell exited with {status}; going on");
        }
        Ok(())
    }

    /// Ends processes left in the chroot, unmounts everything deepest first and detaches the
    /// devices.
    pub fn unmount(&mut self) -> Result<()> {
        self.expect(Progress::Configured, "unmount")?;
        if self.opts.shell {
            self.shell()?;
        }
        let res = stage("unmount", || self.release());
        self.advance(res, Progress::Unmounted)
    }

    fn release(&mut self) -> Result<()> {
        let killed = procs::kill_processes_in_root(&self.root_path, KILL_GRACE)?;
        if !killed.is_empty() {
            tracing::warn!("ended processes left in the chroot: {killed:?}");
        }
        while let Some(m) = self.mounts.pop() {
            m.close()?;
        }
        // Anything a tool mounted on its own (debootstrap's proc) goes too, deepest first.
        unmount_strays(&self.root_path, &self.kind.mount_points())?;
        // The descriptor holds the root filesystem busy.
        self.tree = None;
        self.kind.unmount_root()
    }

    /// Checks and shrinks (or archives) the result, packages it into the output directory and
    /// writes the metadata last.
    pub fn package(&mut self) -> Result<Outcome> {
        self.expect(Progress::Unmounted, "package")?;
        match self.package_inner() {
            Ok(o) => {
                self.progress = Progress::Packaged;
                Ok(o)
            }
            Err(e) => {
                self.failed = true;
                Err(self.explain(e))
            }
        }
    }

    fn package_inner(&mut self) -> Result<Outcome> {
        let work = self.work()?.to_path_buf();
        let (plan, root, kind) = (&self.plan, &self.root_path, &mut self.kind);
        self.staged = stage("finish", || kind.stage_final(plan, &work, root))?;
        // Through the directory the lock holds open: a swap of its path redirects nothing.
        let mut pending = PendingOutputs::in_dir(self._lock.dir().try_clone()?);
        let staged = &self.staged;
        let (packed, files) = stage("package", || {
            let mut out = Vec::new();
            for s in staged {
                signals::check()?;
                let (out_file, tmp) = pending.create_temp(&s.container_name)?;
                let t = std::time::Instant::now();
                // A disk shipped in several formats is read for its digests once.
                let known = staged
                    .iter()
                    .zip(&out)
                    .find(|(o, _): &(&Staged, &compress::Packed)| o.raw == s.raw)
                    .map(|(_, p)| p.raw.clone());
                let p = match s.ship {
                    Ship::Packed(container) => {
                        compress::pack_into(&s.raw, container, out_file, &tmp)
                    }
                    Ship::Qcow2 { compressed } => {
                        pack_qcow2(&s.raw, compressed, &out_file, &tmp, known)
                    }
                }
                .with_context(|| format!("packaging {}", s.container_name))?;
                tracing::info!(
                    "{}: {:.1} MiB raw -> {:.1} MiB {} in {:.1}s",
                    s.container_name,
                    p.raw.size as f64 / 1048576.0,
                    p.container.size as f64 / 1048576.0,
                    s.ship.name(),
                    t.elapsed().as_secs_f64()
                );
                out.push(p);
            }
            let mut files = Vec::new();
            for (name, path) in &self.extra {
                let (mut f, tmp) = pending.create_temp(name)?;
                std::fs::File::open(path)
                    .and_then(|mut from| std::io::copy(&mut from, &mut f))
                    .and_then(|_| f.sync_all())
                    .with_context(|| format!("copying {name} to {}", tmp.display()))?;
                let d = crate::pack::digest::digest_file(&crate::output::fd_path(&f))
                    .with_context(|| format!("digesting {}", tmp.display()))?;
                files.push(FileMeta {
                    name: name.clone(),
                    size: d.size,
                    sha256: d.sha256,
                });
            }
            Ok((out, files))
        })?;
        let metadata = Metadata {
            name: plan.name.clone(),
            debimg_version: env!("CARGO_PKG_VERSION").to_string(),
            spec_digest: plan.digest.clone(),
            bootstrap: plan.backend.name().to_string(),
            build_start: self.build_start.clone(),
            build_end: now_rfc3339(),
            images: staged
                .iter()
                .zip(&packed)
                .map(|(s, p)| ImageMeta {
                    container: s.ship.name().to_string(),
                    container_name: s.container_name.clone(),
                    container_size: p.container.size,
                    container_md5: p.container.md5.clone(),
                    container_sha256: p.container.sha256.clone(),
                    format: s.format.clone(),
                    raw_md5: p.raw.md5.clone(),
                    raw_name: s.raw_name.clone(),
                    raw_size: p.raw.size,
                    raw_sha256: p.raw.sha256.clone(),
                    mount: s.mount.clone(),
                    label: s.label.clone(),
                    uuid: s.uuid.clone(),
                })
                .collect(),
            repos: plan
                .repos
                .iter()
                .zip(&self.release_metas)
                .map(|(r, m)| RepoMeta {
                    name: r.name.clone(),
                    uri: crate::redact::owned(&r.uri),
                    suite: r.suite.clone(),
                    section: r.section.clone(),
                    priority: r.priority,
                    meta: m.clone(),
                    trusted: r.trusted,
                })
                .collect(),
            packages: plan.packages.clone(),
            installed: self.installed.clone(),
            kind: self.kind.name().to_string(),
            files,
        };
        stage("publish", || {
            let mut names: Vec<&str> = staged.iter().map(|s| s.container_name.as_str()).collect();
            names.extend(self.extra.iter().map(|(n, _)| n.as_str()));
            pending.publish(&names, &plan.metadata_name(), &metadata.to_yaml()?)
        })?;
        Ok(Outcome {
            reused: false,
            metadata_path: self.output_dir.join(plan.metadata_name()),
            metadata,
        })
    }

    /// Releases everything the build holds: processes in the chroot, mounts, devices, and the
    /// workspace (kept after a failure with `keep_on_failure`). Safe to call at any point and
    /// more than once; also runs on drop.
    pub fn cleanup(&mut self) -> Result<()> {
        let mut first_err: Option<anyhow::Error> = None;
        if !self.root_path.as_os_str().is_empty()
            && self.root_path.exists()
            && let Err(e) = procs::kill_processes_in_root(&self.root_path, KILL_GRACE)
        {
            tracing::warn!("ending processes in {}: {e:#}", self.root_path.display());
        }
        while let Some(m) = self.mounts.pop() {
            if let Err(e) = m.close() {
                tracing::warn!("{e:#}");
            }
        }
        self.tree = None;
        if !self.root_path.as_os_str().is_empty()
            && self.root_path.exists()
            && let Err(e) = unmount_strays(&self.root_path, &self.kind.mount_points())
        {
            tracing::warn!("{e:#}");
        }
        self.kind.cleanup();
        if let Some(ws) = self.ws.take() {
            let keep = self.failed && self.opts.keep_on_failure;
            let res = if keep { ws.keep() } else { ws.close() };
            if let Err(e) = res {
                first_err.get_or_insert(e);
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn work(&self) -> Result<&Path> {
        self.ws
            .as_ref()
            .map(|w| w.work.as_path())
            .context("no workspace: call mount first")
    }

    fn expect(&self, want: Progress, what: &str) -> Result<()> {
        if self.failed {
            bail!("{what}: an earlier stage failed; call cleanup");
        }
        if self.progress != want {
            bail!(
                "{what} cannot run now: the build is at {:?}, {what} needs {want:?}",
                self.progress
            );
        }
        Ok(())
    }

    fn advance(&mut self, res: Result<()>, to: Progress) -> Result<()> {
        match res {
            Ok(()) => {
                self.progress = to;
                Ok(())
            }
            Err(e) => {
                self.failed = true;
                Err(self.explain(e))
            }
        }
    }

    fn explain(&self, e: anyhow::Error) -> anyhow::Error {
        match &self.ws {
            Some(ws) if ws.on_tmpfs() => explain_no_space(e, &ws.work, "the --tmpfs workspace"),
            _ => explain_no_space(e, &self.opts.build_dir, "the build directory"),
        }
    }
}

impl Drop for Creator {
    fn drop(&mut self) {
        if let Err(e) = self.cleanup() {
            tracing::warn!("cleaning up: {e:#}");
        }
    }
}

/// The least a Debian tree takes (a minbase tree is about 180 MB with its package lists).
const MIN_TREE: u64 = 160 << 20;

/// What a build of `plan` needs in its workspace at the least: the tree (up to the images'
/// capacity, as they are sparse), and a second copy of it for a tarball's archive.
pub fn space_needed(plan: &Plan) -> u64 {
    match plan.kind {
        crate::spec::Kind::Tarball => 2 * MIN_TREE,
        crate::spec::Kind::Disk => plan
            .disk
            .as_ref()
            .map_or(MIN_TREE, |d| d.size.0.min(MIN_TREE)),
        crate::spec::Kind::FsImages => plan
            .images
            .iter()
            .map(|i| i.size)
            .sum::<u64>()
            .min(MIN_TREE),
    }
}

/// Fails, naming the shortfall, when the build directory (or the `--tmpfs` to be made) has
/// less room than the build needs at the least: before anything is created, rather than with
/// an I/O error half way through.
fn check_free_space(plan: &Plan, build_dir: &Path, tmpfs: Option<u64>) -> Result<()> {
    let need = space_needed(plan);
    let (free, what, hint) = match tmpfs {
        Some(size) => (
            size,
            "the --tmpfs workspace".to_string(),
            "give --tmpfs a larger size or build on disk",
        ),
        None => {
            let st = nix::sys::statvfs::statvfs(build_dir)
                .with_context(|| format!("inspecting {}", build_dir.display()))?;
            (
                st.blocks_available() * st.fragment_size(),
                format!("the build directory {}", build_dir.display()),
                "free some or choose another with --build-dir",
            )
        }
    };
    if free < need {
        bail!(
            "no space left in {what}: {} MiB free, a build of {} needs at least {} MiB (short by \
             {} MiB): {hint}",
            free >> 20,
            plan.name,
            need >> 20,
            (need - free).div_ceil(1 << 20)
        );
    }
    Ok(())
}

/// Fresh proc, sysfs and devpts for the chroot: never bind mounts of the host's.
fn mount_api_filesystems(root: &Root, mounts: &mut Vec<Mount>) -> Result<()> {
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    let specs: [(&str, &str, MsFlags, Option<&str>); 3] = [
        ("/proc", "proc", nosuid, None),
        ("/sys", "sysfs", nosuid | MsFlags::MS_RDONLY, None),
        (
            "/dev/pts",
            "devpts",
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            Some("newinstance,ptmxmode=0666,mode=620,gid=5"),
        ),
    ];
    for (path, fstype, flags, data) in specs {
        mounts.push(root.mount(fstype, path, Some(fstype), flags, data)?);
    }
    Ok(())
}

/// Unmounts, deepest first, every mount under `root` that is not one of `keep`.
fn unmount_strays(root: &Path, keep: &[PathBuf]) -> Result<()> {
    for point in mount::mount_points_under(root)? {
        if keep.iter().any(|k| k == &point) {
            continue;
        }
        mount::unmount_all_under(&point)?;
    }
    Ok(())
}

/// Fills `root` with the base system: from the base-tree cache when it holds this bootstrap,
/// else by the backend, storing the result. What the backend downloads stays in the
/// workspace's `debs/` for the package cache, which takes it after checking it against the
/// repository's index (the bootstrap itself takes nothing from the cache).
fn bootstrap(
    plan: &Plan,
    opts: &BuildOptions,
    work: &Path,
    root: &Root,
    cache: Option<&Cache>,
) -> Result<()> {
    let Some(cache) = cache else {
        return run_backend(plan, root, None, opts.show_progress);
    };
    let key = match cache::release_digest(plan, work) {
        Ok(d) => Some(cache::base_key(plan, &d)),
        Err(e) => {
            tracing::warn!("not using the base-tree cache: {e:#}");
            None
        }
    };
    if let Some(base) = key.as_deref().and_then(|k| cache.verified_base(k)) {
        tracing::info!("base tree from the cache ({})", base.path().display());
        return base.restore(root.path());
    }
    let debs = work.join("debs");
    std::fs::create_dir_all(&debs).with_context(|| format!("creating {}", debs.display()))?;
    run_backend(plan, root, Some(&debs), opts.show_progress)?;
    if let Some(k) = key {
        let tar = cache.store_base(&k, root.path())?;
        tracing::info!("base tree cached as {}", tar.display());
    }
    Ok(())
}

fn run_backend(plan: &Plan, root: &Root, debs: Option<&Path>, show: bool) -> Result<()> {
    match plan.backend {
        Backend::Debootstrap => debootstrap::run(plan, root, debs, show),
        Backend::Mmdebstrap => mmdebstrap::run(plan, root, debs, show),
    }
}

/// Converts a raw disk to qcow2 with qemu-img into `out` (the temporary output, created by
/// debimg; qemu-img reaches it through its descriptor, never by a name a link could replace;
/// `dest` names it in messages), then digests both files.
fn pack_qcow2(
    raw: &Path,
    compressed: bool,
    out: &std::fs::File,
    dest: &Path,
    raw_digests: Option<crate::pack::digest::Digests>,
) -> Result<compress::Packed> {
    use std::os::fd::AsFd;
    let target = crate::output::fd_path(out);
    let mut cmd = std::process::Command::new("qemu-img");
    cmd.args(["convert", "-q", "-f", "raw", "-O", "qcow2"]);
    if compressed {
        cmd.arg("-c");
    }
    crate::output::inherit_fds(&mut cmd, &[out.as_fd()]);
    crate::cmd::CommandRunExt::run(cmd.arg(raw).arg(&target))
        .with_context(|| format!("converting {} to {}", raw.display(), dest.display()))?;
    let mut check = std::process::Command::new("qemu-img");
    check.args(["check", "-q", "-f", "qcow2"]);
    crate::output::inherit_fds(&mut check, &[out.as_fd()]);
    crate::cmd::CommandRunExt::run(check.arg(&target))
        .with_context(|| format!("checking {}", dest.display()))?;
    out.sync_all()
        .with_context(|| format!("syncing {}", dest.display()))?;
    Ok(compress::Packed {
        raw: match raw_digests {
            Some(d) => d,
            None => crate::pack::digest::digest_file(raw)?,
        },
        container: crate::pack::digest::digest_file(&target)?,
    })
}

/// Writes the package records and copies the kernel and initrd into the workspace, as the
/// spec asks; returns (output file name, workspace path) for each. The kernel and initrd must
/// be regular files inside the image.
fn collect_extra_outputs(
    plan: &Plan,
    root: &Root,
    work: &Path,
    installed: &BTreeMap<String, String>,
) -> Result<Vec<(String, PathBuf)>> {
    let mut out = Vec::new();
    for r in &plan.records {
        let text = match r {
            Record::Packages => records::packages_record(installed),
            Record::Files => records::files_record(root, installed)?,
            Record::Licenses => records::licenses_record(root, installed)?,
        };
        let name = format!("{}.{}", plan.name, r.extension());
        let path = work.join(&name);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        out.push((name, path));
    }
    if plan.copy_kernel {
        let (kernel, initrd) = kind::find_kernel(root)?;
        for (src, ext) in [(kernel, "vmlinuz"), (initrd, "initrd")] {
            let name = format!("{}.{ext}", plan.name);
            let path = work.join(&name);
            root.copy_out(&src, &path)
                .with_context(|| format!("copy_kernel: copying {src} out of the image"))?;
            out.push((name, path));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn space_preflight_names_the_shortfall() {
        let spec = crate::spec::Spec::from_yaml(
            "version: 1\nname: t\nsuite: bookworm\nimages:\n  - {mount: /, fs: ext4, size: 1GiB}\n",
            "t",
        )
        .unwrap();
        let plan = Plan::new(
            &spec,
            &crate::plan::parse_sources_list("deb http://m.example/debian bookworm main"),
            false,
        )
        .unwrap();
        assert_eq!(space_needed(&plan), MIN_TREE);
        let dir = tempfile::tempdir().unwrap();
        let e = check_free_space(&plan, dir.path(), Some(64 << 20))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("no space left in the --tmpfs workspace: 64 MiB free")
                && e.contains("needs at least 160 MiB (short by 96 MiB)"),
            "{e}"
        );
        check_free_space(&plan, dir.path(), Some(1 << 30)).unwrap();
    }

    #[test]
    fn stages_keep_their_order_and_cleanup_is_always_safe() {
        let spec = crate::spec::Spec::from_yaml(
            "version: 1\nname: t\nsuite: bookworm\nkind: tarball\n",
            "t",
        )
        .unwrap();
        let plan = Plan::new(
            &spec,
            &crate::plan::parse_sources_list("deb http://m.example/debian bookworm main"),
            false,
        )
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut opts = BuildOptions::new(dir.path().join("out"));
        opts.build_dir = dir.path().join("build");
        let mut c = Creator::new(plan, opts).unwrap();
        c.cleanup().unwrap();
        let err = c.install().unwrap_err().to_string();
        assert!(err.contains("install cannot run now"), "{err}");
        assert!(c.package().is_err());
        c.cleanup().unwrap();
        c.cleanup().unwrap();
        drop(c);
        // Nothing was created but the output directory and its lock.
        assert!(!dir.path().join("build").exists());
        let names: Vec<_> = std::fs::read_dir(dir.path().join("out"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names, [std::ffi::OsString::from(".debimg.lock")]);
    }
}

//! The creator API, the one orchestrator: a build as its stages ([`Stage`]) over one build
//! context, called one by one or all at once.
//!
//! [`Creator::mount`] ([`Stage::Mount`]), [`Creator::install`] (bootstrap and install),
//! [`Creator::configure`], [`Creator::unmount`] and [`Creator::package`] (finish, package and
//! publish) run in this order, as [`Creator::run`] runs a single stage; [`Creator::create`] runs
//! them all after a reuse check. [`Creator::cleanup`] is always safe to call, at any point and
//! more than once, and runs on drop too. What kind of image comes out is an [`ImageKind`]. Each
//! stage's body lives in the module that owns its subject; this one only sequences them.
//!
//! A program of its own can put a step between two stages; here one writes a file into the
//! image after `configure` and before `unmount`:
//!
//! ```no_run
//! use std::path::Path;
//! use debimg::{BuildOptions, Creator, Spec};
//!
//! fn main() -> anyhow::Result<()> {
//!     let spec = Spec::from_file(Path::new("data/examples/minimal.yaml"))?;
//!     let plan = debimg::host::plan(&spec)?;
//!     // The build runs in namespaces of its own, as `debimg build` does: nothing it mounts
//!     // reaches the host, and nothing of it outlives this process. Errors are printed and
//!     // give the exit code.
//!     let code = debimg::isolated(|| {
//!         let mut creator = Creator::new(plan, BuildOptions::new("out"))?;
//!         creator.mount()?;
//!         creator.install()?;
//!         creator.configure()?;
//!         // Our own step, in the finished tree before it is unmounted: through the in-root
//!         // file API, so a link the image holds cannot lead the write outside it.
//!         let owner = debimg::root::Owner::ROOT;
//!         creator.root()?.write("/etc/motd", b"Built by my pipeline.\n", 0o644, owner)?;
//!         creator.unmount()?;
//!         let outcome = creator.package()?;
//!         creator.cleanup()?;
//!         println!("{}", outcome.metadata_path.display());
//!         Ok(())
//!     })?;
//!     std::process::exit(code.into());
//! }
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::attachments::{self, Attached};
use crate::cache::Cache;
use crate::debian::bootstrap::Bootstrapped;
use crate::debian::configure::{self, BuildOnlyFiles};
use crate::debian::lock::Lock;
use crate::debian::release::ReleaseMeta;
use crate::debian::{bootstrap, install};
use crate::error::{Error, ErrorKind};
use crate::event::{self, Event};
use crate::kind::{self, ImageKind, Staged};
use crate::metadata::{Metadata, now_rfc3339};
use crate::output::OutputLock;
use crate::output::publish::{PendingOutputs, reusable};
use crate::pack::package::Written;
use crate::pack::{self, Packed};
use crate::plan::Plan;
use crate::preflight::{check_free_space, no_space_note, preflight};
use crate::root::Root;
use crate::sbom::SbomPackage;
pub use crate::stage::FAULT_ENV;
use crate::stage::Stage;
use crate::sys::mount::{self, MountStack};
use crate::sys::procs;
use crate::workspace::{Workspace, clean_stale_workspaces};
use crate::{post, records, signals};

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
    /// Start from (and store) installed trees in the cache ([`crate::debian::trees`]).
    pub tree_cache: bool,
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
            tree_cache: true,
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

    /// Paths of every output: images, records, kernel and initrd, attachments, then the
    /// metadata file.
    pub fn output_paths(&self) -> Vec<PathBuf> {
        let dir = self.metadata_path.parent().unwrap_or(Path::new("."));
        let mut out = self.image_paths();
        out.extend(self.metadata.files.iter().map(|f| dir.join(&f.name)));
        out.extend(
            self.metadata
                .attachments
                .iter()
                .filter(|a| !self.metadata.files.iter().any(|f| f.name == a.file))
                .map(|a| dir.join(&a.file)),
        );
        out.push(self.metadata_path.clone());
        out
    }
}

/// Everything a build made up to its finish stage, handed to another host that packages and
/// publishes it (`build --vm`: the machine builds, this host packs at its own speed). Paths are
/// relative to the handoff directory, each `files/<name>`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Handoff {
    pub build_start: String,
    /// The kind's name (`fs-images`, `tarball`, `disk`).
    pub kind: String,
    pub staged: Vec<Staged>,
    /// The records the spec asks for, in its order, then the lock: (output name, file).
    pub extra: Vec<(String, PathBuf)>,
    pub attached: Vec<Attached>,
    pub release_metas: Vec<ReleaseMeta>,
    pub installed: BTreeMap<String, String>,
    /// The installed packages as the SBOMs describe them.
    #[serde(default)]
    pub sbom: Vec<SbomPackage>,
}

/// The name of the handoff's description in its directory.
pub const HANDOFF_FILE: &str = "handoff.json";

/// How long processes left in the chroot get between SIGTERM and SIGKILL.
const KILL_GRACE: Duration = Duration::from_secs(5);

/// A build in stages. See the module documentation for an example.
pub struct Creator {
    plan: Plan,
    opts: BuildOptions,
    kind: Box<dyn ImageKind>,
    output_dir: PathBuf,
    lock: OutputLock,
    cache: Option<Cache>,
    ws: Option<Workspace>,
    /// Where the tree is on the host (empty before `mount`).
    root_path: PathBuf,
    /// The tree, held from `mount` to `unmount`.
    tree: Option<Root>,
    /// The chroot's API filesystems and bind mounts, unmounted from the end.
    mounts: MountStack,
    build_only: BuildOnlyFiles,
    /// Where the bootstrap stage's tree came from (a base, a cached installed tree), and
    /// whether its lists are fresh.
    bootstrapped: Bootstrapped,
    /// The last stage that finished.
    done: Option<Stage>,
    failed: bool,
    build_start: String,
    release_metas: Vec<ReleaseMeta>,
    installed: BTreeMap<String, String>,
    /// The lock of what the tree holds (after `configure`).
    locked: Option<Lock>,
    /// The installed packages as the SBOMs describe them (after `configure`).
    sbom: Vec<SbomPackage>,
    /// Records for the output directory: (file name, path in the workspace).
    extra: Vec<(String, PathBuf)>,
    /// Files copied out of the image (attachments, kernel and initrd), in the workspace.
    attached: Vec<Attached>,
    staged: Vec<Staged>,
    pending: Option<PendingOutputs>,
    packed: Vec<Packed>,
    written: Written,
    outcome: Option<Outcome>,
}

impl Creator {
    /// A creator for the kind of image the plan asks for. Checks the cache directory, takes the
    /// output directory's lock and removes workspaces of builds that died; creates nothing else
    /// yet.
    pub fn new(plan: Plan, opts: BuildOptions) -> Result<Creator, Error> {
        let kind = kind::for_plan(&plan);
        Creator::with_kind(plan, opts, kind)
    }

    /// A creator for a kind of image of the caller's.
    pub fn with_kind(
        plan: Plan,
        opts: BuildOptions,
        kind: Box<dyn ImageKind>,
    ) -> Result<Creator, Error> {
        let boundary = |e| Error::classify(e, None);
        // First: a cache another user could write is refused before anything is made.
        let cache = opts
            .cache_dir
            .as_deref()
            .map(Cache::open)
            .transpose()
            .map_err(boundary)?;
        std::fs::create_dir_all(&opts.output_dir)
            .with_context(|| format!("creating output directory {}", opts.output_dir.display()))
            .map_err(boundary)?;
        let output_dir = opts
            .output_dir
            .canonicalize()
            .with_context(|| format!("resolving {}", opts.output_dir.display()))
            .map_err(boundary)?;
        let lock = OutputLock::acquire(&output_dir, opts.wait).map_err(boundary)?;
        // Also on a reuse: a killed build's workspace (and its sparse images) goes at the next
        // run.
        clean_stale_workspaces(&opts.build_dir);
        Ok(Creator {
            plan,
            opts,
            kind,
            output_dir,
            lock,
            cache,
            ws: None,
            root_path: PathBuf::new(),
            tree: None,
            mounts: MountStack::default(),
            bootstrapped: Bootstrapped::default(),
            build_only: BuildOnlyFiles::new(),
            done: None,
            failed: false,
            build_start: now_rfc3339(),
            release_metas: Vec::new(),
            installed: BTreeMap::new(),
            locked: None,
            sbom: Vec::new(),
            extra: Vec::new(),
            attached: Vec::new(),
            staged: Vec::new(),
            pending: None,
            packed: Vec::new(),
            written: Written::default(),
            outcome: None,
        })
    }

    /// The plan being built.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// The lock of every package the tree holds, once `configure` has run.
    pub fn locked(&self) -> Option<&Lock> {
        self.locked.as_ref()
    }

    /// The install root: the image's `/`, for reading and writing files in it through the
    /// in-root file API (from `mount` to `unmount`). Its [`Root::path`] is for programs that
    /// work inside the tree themselves.
    pub fn root(&self) -> Result<&Root, Error> {
        self.tree.as_ref().ok_or_else(|| {
            Error::classify(
                anyhow::anyhow!(
                    "the image tree is not mounted (call it between mount and unmount)"
                ),
                None,
            )
        })
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

    /// Every stage: reuses a matching output, else runs every stage in order. Cleans up
    /// whatever happens.
    pub fn create(&mut self) -> Result<Outcome, Error> {
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

    /// Every stage up to `finish`, then the staged images, records and attachments moved into
    /// `dir/files/` and described in `dir/handoff.json` instead of packaged. Cleans up
    /// whatever happens.
    pub fn hand_off(&mut self, dir: &Path) -> Result<Handoff, Error> {
        let res = (|| {
            self.mount()?;
            self.install()?;
            self.configure()?;
            self.unmount()?;
            self.run(Stage::Finish)?;
            self.write_handoff(dir)
                .map_err(|e| Error::classify(e, Some(Stage::Finish)))
        })();
        let cleaned = self.cleanup();
        let handoff = res?;
        cleaned?;
        Ok(handoff)
    }

    /// The finished build as packaging and publishing take it, its files where they are.
    fn finished(&self) -> Handoff {
        Handoff {
            build_start: self.build_start.clone(),
            kind: self.kind.name().to_string(),
            staged: self.staged.clone(),
            extra: self.extra.clone(),
            attached: self.attached.clone(),
            release_metas: self.release_metas.clone(),
            installed: self.installed.clone(),
            sbom: self.sbom.clone(),
        }
    }

    fn write_handoff(&mut self, dir: &Path) -> Result<Handoff> {
        let files = dir.join("files");
        std::fs::create_dir_all(&files).with_context(|| format!("creating {}", files.display()))?;
        let mut n = 0;
        let mut take = |from: &Path| -> Result<PathBuf> {
            n += 1;
            let rel = PathBuf::from(format!("files/{n}"));
            std::fs::rename(from, dir.join(&rel)).with_context(|| {
                format!("moving {} to {}", from.display(), dir.join(&rel).display())
            })?;
            Ok(rel)
        };
        // A disk shipped in several formats stages one raw file several times: moved once.
        let mut moved: Vec<(PathBuf, PathBuf)> = Vec::new();
        let mut staged = self.staged.clone();
        for s in &mut staged {
            s.raw = match moved.iter().find(|(from, _)| *from == s.raw) {
                Some((_, to)) => to.clone(),
                None => {
                    let to = take(&s.raw)?;
                    moved.push((s.raw.clone(), to.clone()));
                    to
                }
            };
        }
        let mut extra = Vec::new();
        for (name, path) in &self.extra {
            extra.push((name.clone(), take(path)?));
        }
        let mut attached = Vec::new();
        for a in &self.attached {
            let mut a = a.clone();
            a.copy = take(&a.copy)?;
            attached.push(a);
        }
        let handoff = Handoff {
            staged,
            extra,
            attached,
            ..self.finished()
        };
        let json = serde_json::to_vec_pretty(&handoff)?;
        std::fs::write(dir.join(HANDOFF_FILE), json)
            .with_context(|| format!("writing {}", dir.join(HANDOFF_FILE).display()))?;
        Ok(handoff)
    }

    /// Creates the workspace, prepares the storage and mounts the install root.
    pub fn mount(&mut self) -> Result<(), Error> {
        self.run(Stage::Mount)
    }

    /// Bootstraps the base system and installs the packages.
    pub fn install(&mut self) -> Result<(), Error> {
        self.run(Stage::Bootstrap)?;
        self.run(Stage::Install)
    }

    /// Writes the system settings, copies files, runs the post scripts, makes the tree
    /// bootable, collects the package records and removes every build-only file.
    pub fn configure(&mut self) -> Result<(), Error> {
        self.run(Stage::Configure)
    }

    /// Ends processes left in the chroot, unmounts its mounts, copies the attachments (and
    /// `copy_kernel`'s kernel and initrd) out of the image, unmounts the image's filesystems
    /// deepest first and detaches the devices (with `shell`, after an interactive shell in the
    /// chroot).
    pub fn unmount(&mut self) -> Result<(), Error> {
        if self.opts.shell && self.done == Some(Stage::Configure) {
            self.shell()?;
        }
        self.run(Stage::Unmount)
    }

    /// Checks and shrinks (or archives) the result, packages it into the output directory and
    /// publishes it, the metadata last.
    pub fn package(&mut self) -> Result<Outcome, Error> {
        self.run(Stage::Finish)?;
        self.run(Stage::Package)?;
        self.run(Stage::Publish)?;
        self.outcome
            .take()
            .ok_or_else(|| Error::classify(anyhow::anyhow!("publish left no outcome"), None))
    }

    /// Runs the next stage, `stage`: each stage needs the one before it to have finished.
    pub fn run(&mut self, stage: Stage) -> Result<(), Error> {
        // A stage called out of order changes nothing: not even a failure to clean up after.
        self.expect(stage)?;
        let res = if stage == Stage::Mount {
            self.before_mount()
        } else {
            Ok(())
        }
        .and_then(|()| run_stage(stage, || self.body(stage)));
        match res {
            Ok(()) => {
                self.done = Some(stage);
                Ok(())
            }
            Err(e) => {
                self.failed = true;
                Err(self.explain(e))
            }
        }
    }

    /// The table of contents: what each stage does, in the module that owns it.
    fn body(&mut self, stage: Stage) -> Result<()> {
        let show = self.opts.show_progress;
        match stage {
            Stage::Mount => {
                let ws = Workspace::create(&self.opts.build_dir, &self.plan.name, self.opts.tmpfs)?;
                self.root_path = ws.work.join("root");
                let work = ws.work.clone();
                self.ws = Some(ws);
                self.kind.mount_root(&self.plan, &work, &self.root_path)?;
                // Opened once the filesystems are mounted: a descriptor taken before would hold
                // the directory underneath them.
                let mut tree = Root::open(&self.root_path)?;
                tree.set_source_date_epoch(self.plan.source_date_epoch);
                self.tree = Some(tree);
                Ok(())
            }
            Stage::Bootstrap => {
                let (root, work) = (self.tree()?, self.work()?);
                let cache = self.cache.as_ref();
                // A lock's versions are not part of an installed tree's key, and a reproducible
                // build installs in the order a cold build does (a tree grown from a smaller
                // one may hold files in another order): from the base.
                let trees = self.opts.tree_cache
                    && self.plan.lock.is_none()
                    && self.plan.source_date_epoch.is_none();
                self.bootstrapped =
                    bootstrap::run(&self.plan, root, work, cache, trees, &self.build_only, show)?;
                Ok(())
            }
            Stage::Install => {
                let work = self.work()?.to_path_buf();
                let root = self.tree.as_ref().context("mount first")?;
                // A fallback to the base empties the tree as the image kind knows it: its own
                // filesystems (a disk's partitions, fs-images' images) stay mounted, its
                // mount-time directories (a disk's ESP mount point) are made again.
                let kind = &*self.kind;
                let empty_tree = |tree: &Root| kind.empty_tree(tree);
                self.release_metas = install::run(
                    &self.plan,
                    root,
                    &work,
                    self.cache.as_ref(),
                    &mut self.bootstrapped,
                    &mut self.build_only,
                    &mut self.mounts,
                    &empty_tree,
                    show,
                )?;
                Ok(())
            }
            Stage::Configure => {
                let work = self.work()?.to_path_buf();
                let root = self.tree.as_ref().context("mount first")?;
                let (plan, filesystems) = (&self.plan, self.kind.filesystems());
                configure::system(plan, root, &filesystems)?;
                post::run_all(&plan.post, root, &work, &plan.name, &filesystems, show)?;
                // After the scripts, so that the bootloader sees the kernels and settings they
                // left.
                self.kind.make_bootable(plan, root, &work)?;
                root.end_processes("the bootloader")?;
                let (installed, lock) = configure::finish(plan, root, &mut self.build_only, show)?;
                self.extra = records::extra_outputs(plan, root, &work, &installed)?;
                let lock_file = work.join(plan.lock_name());
                std::fs::write(&lock_file, lock.render(&plan.name)?)
                    .with_context(|| format!("writing {}", lock_file.display()))?;
                self.extra.push((plan.lock_name(), lock_file));
                self.sbom = crate::sbom::collect(root, &lock)?;
                self.locked = Some(lock);
                self.installed = installed;
                Ok(())
            }
            Stage::Unmount => self.unmount_tree(),
            Stage::Finish => {
                let work = self.work()?.to_path_buf();
                self.staged = self.kind.finish(&self.plan, &work, &self.root_path)?;
                Ok(())
            }
            Stage::Package => {
                let (pending, packed, written) =
                    package_finished(&self.plan, &self.lock, &self.finished())?;
                (self.pending, self.packed, self.written) = (Some(pending), packed, written);
                Ok(())
            }
            Stage::Publish => {
                let (written, done) = (std::mem::take(&mut self.written), self.finished());
                let pending = self.pending.as_mut().context("package first")?;
                let metadata = publish_packed(&self.plan, done, &self.packed, written, pending)?;
                self.outcome = Some(Outcome {
                    reused: false,
                    metadata_path: self.output_dir.join(self.plan.metadata_name()),
                    metadata,
                });
                Ok(())
            }
        }
    }

    /// What the mount stage needs before it makes anything: the host tools, the build
    /// directory and room in it.
    fn before_mount(&self) -> Result<()> {
        preflight(&self.plan)?;
        if let Some(epoch) = self.plan.source_date_epoch {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            if epoch >= now {
                tracing::warn!(
                    "source_date_epoch {epoch} is not before this build: times are clamped to \
                     it, so what the build writes keeps its own times and the output will not \
                     be reproducible"
                );
            }
        }
        std::fs::create_dir_all(&self.opts.build_dir).with_context(|| {
            format!("creating build directory {}", self.opts.build_dir.display())
        })?;
        check_free_space(&self.plan, &self.opts.build_dir, self.opts.tmpfs)
    }

    /// Opens an interactive shell in the chroot (for `--shell`): the tree as configured, before
    /// it is unmounted. Ctrl-C belongs to the shell here, not to the build.
    pub fn shell(&mut self) -> Result<(), Error> {
        self.open_shell().map_err(|e| Error::classify(e, None))
    }

    fn open_shell(&mut self) -> Result<()> {
        if self.done.is_none() || self.done >= Some(Stage::Unmount) {
            bail!("a shell needs the mounted tree: call it between mount and unmount");
        }
        let root = self.tree()?;
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

    /// The unmount stage's body: processes left in the chroot ended, the chroot's mounts and
    /// any a tool made on its own unmounted deepest first, the attachments copied out, then the
    /// kind's filesystems and devices.
    fn unmount_tree(&mut self) -> Result<()> {
        let killed = procs::kill_processes_in_root(&self.root_path, KILL_GRACE)?;
        if !killed.is_empty() {
            tracing::warn!("ended processes left in the chroot: {killed:?}");
        }
        self.mounts.unmount()?;
        mount::unmount_all_under_except(&self.root_path, &self.kind.mount_points())?;
        // Only now, with nothing but the image's own filesystems mounted: a link in the image to
        // /proc/1/environ or /sys/... then finds the image's empty directory, not the kernel's
        // view of this build. (After --shell too: what it changed is part of the image.)
        let work = self.work()?.to_path_buf();
        self.attached = attachments::collect(&self.plan, self.tree()?, &work)?;
        if let Some(epoch) = self.plan.source_date_epoch {
            let epoch = i64::try_from(epoch).context("source_date_epoch is out of range")?;
            let n = self.tree()?.clamp_times(epoch)?;
            tracing::debug!("clamped the times of {n} files to the epoch {epoch}");
        }
        // The descriptor holds the root filesystem busy.
        self.tree = None;
        self.kind.unmount_root()
    }

    /// Releases everything the build holds: processes in the chroot, mounts, devices, and the
    /// workspace (kept after a failure with `keep_on_failure`). Safe to call at any point and
    /// more than once; also runs on drop.
    pub fn cleanup(&mut self) -> Result<(), Error> {
        let mut first_err: Option<anyhow::Error> = None;
        let tree_left = !self.root_path.as_os_str().is_empty() && self.root_path.exists();
        if tree_left && let Err(e) = procs::kill_processes_in_root(&self.root_path, KILL_GRACE) {
            tracing::warn!("ending processes in {}: {e:#}", self.root_path.display());
        }
        self.mounts.unmount_logging();
        self.tree = None;
        if tree_left
            && let Err(e) =
                mount::unmount_all_under_except(&self.root_path, &self.kind.mount_points())
        {
            tracing::warn!("{e:#}");
        }
        self.kind.cleanup();
        // Temporary outputs not published go now.
        self.pending = None;
        if let Some(ws) = self.ws.take() {
            let keep = self.failed && self.opts.keep_on_failure;
            let res = if keep { ws.keep() } else { ws.close() };
            if let Err(e) = res {
                first_err.get_or_insert(e);
            }
        }
        match first_err {
            Some(e) => Err(Error::classify(e, None)),
            None => Ok(()),
        }
    }

    fn tree(&self) -> Result<&Root> {
        self.tree
            .as_ref()
            .context("no image tree: call mount first")
    }

    fn work(&self) -> Result<&Path> {
        self.ws
            .as_ref()
            .map(|w| w.work.as_path())
            .context("no workspace: call mount first")
    }

    /// Checks that `stage` is the next one to run.
    fn expect(&self, stage: Stage) -> Result<()> {
        if self.failed {
            bail!("{stage}: an earlier stage failed; call cleanup");
        }
        let next = match self.done {
            None => Some(Stage::Mount),
            Some(d) => Stage::ALL.into_iter().find(|s| *s > d),
        };
        if next != Some(stage) {
            bail!(
                "{stage} cannot run now: {}",
                match (self.done, next) {
                    (None, _) => "no stage has run yet, mount comes first".to_string(),
                    (Some(d), Some(n)) => format!("the build finished {d}, {n} comes next"),
                    (Some(_), None) => "the build is complete".to_string(),
                }
            );
        }
        Ok(())
    }

    /// The boundary's error for a failure: classified, and blamed on a full disk when the
    /// workspace's filesystem is (nearly) full.
    fn explain(&self, e: anyhow::Error) -> Error {
        let e = Error::classify(e, None);
        let note = match &self.ws {
            Some(ws) if ws.on_tmpfs() => no_space_note(&ws.work, "the --tmpfs workspace"),
            _ => no_space_note(&self.opts.build_dir, "the build directory"),
        };
        match note {
            Some(n) if e.kind() == ErrorKind::Failed => e.found_to_be(ErrorKind::NoSpace, n),
            _ => e,
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

/// The package stage, of a build here and of a build machine's handoff alike: every image,
/// record and attachment of `done` packed into the output directory under a temporary name.
pub(crate) fn package_finished(
    plan: &Plan,
    lock: &OutputLock,
    done: &Handoff,
) -> Result<(PendingOutputs, Vec<Packed>, Written)> {
    // Through the directory the lock holds open: a swap of its path redirects nothing.
    let mut pending = PendingOutputs::in_dir(lock.dir().try_clone()?);
    let (packed, mut written) = pack::package::run(
        &done.staged,
        &done.extra,
        &done.attached,
        &plan.attachments_dir_name(),
        &mut pending,
    )?;
    // The SBOMs last: they name the images with their checksums. Dated with the epoch in a
    // reproducible build.
    let created = plan
        .source_date_epoch
        .map(crate::metadata::rfc3339)
        .unwrap_or_else(|| done.build_start.clone());
    let images: Vec<crate::sbom::SbomImage> = done
        .staged
        .iter()
        .zip(&packed)
        .map(|(s, p)| crate::sbom::SbomImage {
            name: &s.container_name,
            digests: &p.container,
        })
        .collect();
    let (spdx_name, cdx_name) = plan.sbom_names();
    for (file, doc) in [
        (
            spdx_name,
            crate::sbom::spdx(&plan.name, &plan.seed, &created, &done.sbom, &images),
        ),
        (
            cdx_name,
            crate::sbom::cyclonedx(&plan.name, &plan.seed, &created, &done.sbom, &images),
        ),
    ] {
        let mut bytes = serde_json::to_vec_pretty(&doc)?;
        bytes.push(b'\n');
        let meta = pack::package::write_beside(&mut pending, &file, &bytes)?;
        written.files.push(meta);
    }
    Ok((pending, packed, written))
}

/// The publish stage, after `package_finished`: the images and every file beside them (the
/// records, the kernel and initrd) renamed into place, the metadata last.
pub(crate) fn publish_packed(
    plan: &Plan,
    done: Handoff,
    packed: &[Packed],
    written: Written,
    pending: &mut PendingOutputs,
) -> Result<Metadata> {
    let names: Vec<String> = written.files.iter().map(|f| f.name.clone()).collect();
    let metadata = Metadata::assemble(
        plan,
        &done.kind,
        done.build_start,
        &done.staged,
        packed,
        written.files,
        written.attachments,
        &done.release_metas,
        done.installed,
    );
    let mut publish: Vec<&str> = done
        .staged
        .iter()
        .map(|s| s.container_name.as_str())
        .collect();
    publish.extend(names.iter().map(String::as_str));
    pending.publish(
        &publish,
        &plan.attachments_dir_name(),
        &plan.metadata_name(),
        &metadata.to_yaml()?,
    )?;
    Ok(metadata)
}

/// Runs one stage: announces it (log and event), runs `f`, and reports its duration; a failure
/// becomes [`Error::StageFailed`] naming the stage (an interruption stays
/// [`Error::Interrupted`]).
pub(crate) fn run_stage<T>(stage: Stage, f: impl FnOnce() -> Result<T>) -> Result<T> {
    if let Err(e) = signals::check() {
        return Err(
            Error::classify(e.context(format!("before stage {stage}")), Some(stage)).into(),
        );
    }
    tracing::info!("stage {stage}: started");
    event::emit(&Event::StageStarted { stage });
    let t = Instant::now();
    let res = f().and_then(|out| injected_fault(stage).map(|()| out));
    match res {
        Ok(out) => {
            let secs = t.elapsed().as_secs_f64();
            tracing::info!("stage {stage}: done in {secs:.1}s");
            event::emit(&Event::StageFinished {
                stage,
                seconds: secs,
            });
            Ok(out)
        }
        Err(e) => Err(Error::classify(e, Some(stage)).into()),
    }
}

fn injected_fault(stage: Stage) -> Result<()> {
    let Ok(spec) = std::env::var(FAULT_ENV) else {
        return Ok(());
    };
    let Some((name, what)) = spec.split_once(':') else {
        return Ok(());
    };
    if name != stage.name() {
        return Ok(());
    }
    match what {
        "fail" => bail!("injected fault ({FAULT_ENV}={spec})"),
        "pause" => {
            eprintln!("debimg-test: paused in stage {stage}");
            loop {
                signals::check()?;
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_keep_their_order_and_cleanup_is_always_safe() {
        let plan = Plan::for_test("version: 1\nname: t\nsuite: bookworm\nkind: tarball\n");
        let dir = tempfile::tempdir().unwrap();
        let mut opts = BuildOptions::new(dir.path().join("out"));
        opts.build_dir = dir.path().join("build");
        opts.cache_dir = None;
        let mut c = Creator::new(plan, opts).unwrap();
        c.cleanup().unwrap();
        let err = c.install().unwrap_err().to_string();
        assert!(
            err.contains("bootstrap cannot run now") && err.contains("mount comes first"),
            "{err}"
        );
        let err = c.run(Stage::Unmount).unwrap_err().to_string();
        assert!(err.contains("unmount cannot run now"), "{err}");
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

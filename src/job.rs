//! `debimg build` as one library call: a spec (or fuel-agent's input) built into an output
//! directory by a [`Creator`], with what the command adds around it (a release directory with
//! its log and checksums, fuel-agent's metadata, a bundle), reporting [`Event`]s as it goes.
//! [`build`] makes the command's arguments into a [`Job`]; a build service can do the same.
//! The other commands that run a build are here too: [`lock`] (`debimg lock`, a build stopped
//! after `configure` for its lock) and [`vm_image`] (`debimg vm-image`, the builder appliance
//! built as any spec).

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;

use crate::creator::{BuildOptions, Creator, DEFAULT_BUILD_DIR, DEFAULT_CACHE_DIR, Outcome};
use crate::error::Error;
use crate::event::{self, BuildOutcome, Event};
use crate::input::Input;
use crate::output::release::{self, LogTee, parse_release_id};
use crate::output::{OUTPUT_LOCK, OutputDir};
use crate::pack::digest;
use crate::plan::Plan;
use crate::spec::Bootstrap;
use crate::sys::namespace::in_namespaces;

/// `debimg build`: the arguments made into a [`Job`], run in namespaces of its own; the paths
/// of its outputs on stdout, or (`--message-format json`) its events. A build that never
/// started reports `build-finished` too. `show_progress`: the output of the bootstrap and apt.
pub fn build(args: &BuildArgs, show_progress: bool) -> Result<(), Error> {
    let json = args.message_format == MessageFormat::Json;
    if json {
        event::json_lines_to_stdout();
    }
    let job = match job_of(args, show_progress) {
        Ok(j) => j,
        Err(e) => {
            // A consumer of the events learns of a build that never started too.
            event::emit(&Event::BuildFinished {
                outcome: BuildOutcome::Failed,
                seconds: 0.0,
                error: Some(e.report()),
            });
            return Err(e);
        }
    };
    if args.hand_off {
        return hand_off(job);
    }
    job.run_in_namespaces(!json)
}

/// The job `debimg build` runs: its input read, its plan made (an untrusted one without
/// reading any file it names here), its options from the arguments.
fn job_of(args: &BuildArgs, show_progress: bool) -> Result<Job, Error> {
    let cache_dir = &args.cache_dir;
    let vm = &args.vm;
    let default_vm = crate::vm::VmOptions::new(cache_dir.join("vm"));
    let mut input = Input::read(
        args.spec.as_deref(),
        args.fuel.as_deref(),
        args.release.as_deref(),
    )?;
    if let Some(file) = &args.lock {
        let abs = std::path::absolute(file)
            .with_context(|| format!("--lock: resolving {}", file.display()))?;
        input.spec.lock = Some(abs.to_string_lossy().into_owned());
    }
    if let Some(url) = &args.through_proxy {
        input.spec.proxies = Some(crate::spec::Proxies {
            http: Some(url.clone()),
            https: Some(url.clone()),
            direct: Vec::new(),
        });
    }
    if vm.untrusted && input.spec.lock.is_some() {
        return Err(anyhow::anyhow!(
            "a lock (`lock:`, `--lock`) is a file of this host, which an untrusted build \
             may not read"
        )
        .into());
    }
    let plan = if vm.untrusted {
        // Planned without reading any file it names here (see `debimg::vm`).
        let mut i = input.clone();
        i.spec = crate::vm::without_host_files(&input.spec);
        i.plan(args.bootstrap)?
    } else {
        input.plan(args.bootstrap)?
    };
    if !nix::unistd::geteuid().is_root() {
        return Err(anyhow::anyhow!(
            "debimg build needs root (loop devices, mounts, chroot); run it with sudo"
        )
        .into());
    }
    let output_dir = match (&args.output, &input.fuel) {
        (Some(o), _) => o.clone(),
        (None, Some(f)) => f.output_dir.clone(),
        (None, None) => PathBuf::from("out"),
    };
    let opts = BuildOptions {
        output_dir,
        build_dir: args.build_dir.clone(),
        force: args.force,
        wait: args.wait,
        show_progress,
        cache_dir: (!args.no_cache).then(|| cache_dir.clone()),
        tree_cache: !args.no_tree_cache,
        shell: args.shell,
        keep_on_failure: args.keep_on_failure,
        tmpfs: args.tmpfs,
    };
    let vm = vm.vm.then(|| crate::vm::VmOptions {
        memory_mib: (vm.vm_memory >> 20) as u32,
        cpus: vm.vm_cpus.unwrap_or(default_vm.cpus),
        disk_bytes: vm.vm_disk,
        timeout: vm.vm_timeout.map(std::time::Duration::from_secs),
        accel: vm.vm_accel,
        appliance_dir: cache_dir.join("vm"),
        untrusted: vm.untrusted,
    });
    Ok(Job {
        input,
        plan,
        opts,
        release: args.release.clone(),
        bundle: args.bundle.is_some(),
        vm,
    })
}

/// `build --hand-off` (inside a `--vm` machine): the stages up to `finish`, the result left in
/// the output directory for the host to package; events as a build reports them.
fn hand_off(job: Job) -> Result<(), Error> {
    in_namespaces(|| {
        let started = Instant::now();
        event::emit(&Event::BuildStarted {
            name: job.plan.name.clone(),
            spec_digest: job.plan.digest.clone(),
        });
        let dir = job.opts.output_dir.clone();
        let res =
            Creator::new(job.plan.clone(), job.opts.clone()).and_then(|mut c| c.hand_off(&dir));
        event::emit(&Event::BuildFinished {
            outcome: if res.is_ok() {
                BuildOutcome::Built
            } else {
                BuildOutcome::Failed
            },
            seconds: started.elapsed().as_secs_f64(),
            error: res.as_ref().err().map(|e| e.report()),
        });
        res.map(|_| ())
    })
}

/// `debimg lock`: the stages up to `configure` in a scratch tree, then the lock of what it
/// holds written to `--output` (NAME.lock.yaml by default) and its path printed.
pub fn lock(args: &LockArgs, show_progress: bool) -> Result<(), Error> {
    let build_dir = &args.build_dir;
    let input = Input::read(Some(&args.spec), None, None)?;
    let plan = input.plan(None)?;
    if !nix::unistd::geteuid().is_root() {
        return Err(anyhow::anyhow!(
            "debimg lock needs root (it installs the packages in a scratch tree); run it with sudo"
        )
        .into());
    }
    let dest = args
        .output
        .clone()
        .unwrap_or_else(|| PathBuf::from(plan.lock_name()));
    std::fs::create_dir_all(build_dir)
        .with_context(|| format!("creating {}", build_dir.display()))?;
    // The creator's output directory: nothing is published into it.
    let scratch = tempfile::Builder::new()
        .prefix(".lock-output-")
        .tempdir_in(build_dir)
        .with_context(|| format!("creating a directory in {}", build_dir.display()))?;
    let opts = BuildOptions {
        output_dir: scratch.path().to_path_buf(),
        build_dir: build_dir.clone(),
        show_progress,
        cache_dir: (!args.no_cache).then(|| args.cache_dir.clone()),
        ..BuildOptions::new(scratch.path())
    };
    let name = plan.name.clone();
    in_namespaces(|| {
        let mut creator = Creator::new(plan, opts)?;
        let res = (|| {
            creator.mount()?;
            creator.install()?;
            creator.configure()?;
            let lock = creator.locked().cloned();
            lock.ok_or_else(|| Error::from(anyhow::anyhow!("the configure stage left no lock")))
        })();
        let cleaned = creator.cleanup();
        let lock = res?;
        cleaned?;
        let text = lock.render(&name)?;
        std::fs::write(&dest, text).with_context(|| format!("writing {}", dest.display()))?;
        println!("{}", dest.display());
        Ok(())
    })
}

/// `debimg vm-image`: the builder appliance's spec ([`crate::vm::appliance`]) built as any
/// spec, into CACHE_DIR/vm, the paths of its outputs printed. `show_progress`: the output of
/// the bootstrap and apt.
pub fn vm_image(args: &VmImageArgs, show_progress: bool) -> Result<(), Error> {
    if !nix::unistd::geteuid().is_root() {
        return Err(anyhow::anyhow!(
            "debimg vm-image needs root (it is a build); run it with sudo"
        )
        .into());
    }
    let dir = args.cache_dir.join("vm");
    let spec = crate::vm::appliance::write_spec(&dir)?;
    let input = Input::read(Some(&spec), None, None)?;
    let plan = input.plan(None)?;
    let mut opts = BuildOptions::new(&dir);
    opts.build_dir = args.build_dir.clone();
    opts.force = args.force;
    opts.wait = true;
    opts.show_progress = show_progress;
    opts.cache_dir = Some(args.cache_dir.clone());
    let job = Job {
        input,
        plan,
        opts,
        release: None,
        bundle: false,
        vm: None,
    };
    job.run_in_namespaces(true)
}

/// One `debimg build`.
pub struct Job {
    pub input: Input,
    pub plan: Plan,
    /// The build's options; with a release, `output_dir` is where the release directory goes.
    pub opts: BuildOptions,
    /// `--release ID`: a directory `output_dir/ID` with the outputs, the input as built, the
    /// build log and checksum files. Always builds.
    pub release: Option<String>,
    /// `--bundle`: every output packed into `<name>.bundle.tar.gz`.
    pub bundle: bool,
    /// `--vm`: the build runs inside a machine of these options ([`crate::vm`]).
    pub vm: Option<crate::vm::VmOptions>,
}

/// What a job left.
#[derive(Debug)]
pub struct JobOutcome {
    /// True when the outputs matched the spec and nothing was built.
    pub reused: bool,
    /// Every file it published, in order.
    pub outputs: Vec<PathBuf>,
}

impl Job {
    /// Runs the build and everything around it, in this process (run it inside
    /// [`crate::isolated`]). Reports `build-started`, every stage, every artifact and
    /// `build-finished` (also for a failure) as events.
    pub fn run(mut self) -> Result<JobOutcome, Error> {
        let started = Instant::now();
        event::emit(&Event::BuildStarted {
            name: self.plan.name.clone(),
            spec_digest: self.plan.digest.clone(),
        });
        let res = self.run_inner(started);
        let seconds = started.elapsed().as_secs_f64();
        match &res {
            Ok(o) => event::emit(&Event::BuildFinished {
                outcome: if o.reused {
                    BuildOutcome::Reused
                } else {
                    BuildOutcome::Built
                },
                seconds,
                error: None,
            }),
            Err(e) => event::emit(&Event::BuildFinished {
                outcome: BuildOutcome::Failed,
                seconds,
                error: Some(e.report()),
            }),
        }
        res
    }

    /// Runs the job in namespaces of its own ([`in_namespaces`]), with the status line on a
    /// terminal, and prints the paths of its outputs on stdout, one a line, when `print_paths`.
    pub fn run_in_namespaces(self, print_paths: bool) -> Result<(), Error> {
        in_namespaces(|| {
            // On a terminal only: the stage, its time and apt's progress on a line of its own.
            crate::progress::enable();
            let outcome = self.run()?;
            if print_paths {
                let mut out = std::io::stdout().lock();
                for p in &outcome.outputs {
                    let _ = writeln!(out, "{}", p.display());
                }
            }
            Ok(())
        })
    }

    fn run_inner(&mut self, started: Instant) -> Result<JobOutcome, Error> {
        let boundary = |e| Error::classify(e, None);
        let release_dir = match &self.release {
            Some(id) => Some(release::prepare_dir(&self.opts.output_dir, id).map_err(boundary)?),
            None => None,
        };
        let tee = match &release_dir {
            Some(dir) => Some(LogTee::start(dir, "build.log").map_err(boundary)?),
            None => None,
        };
        let mut opts = self.opts.clone();
        if let Some(dir) = &release_dir {
            opts.output_dir = dir.path().to_path_buf();
            opts.force = true;
        }
        let res = self.build(opts, release_dir.as_ref(), started);
        if let Some(t) = tee {
            // Printed while the log is still being written, so that it ends with the error.
            if let Err(e) = &res {
                eprintln!("error: {}", crate::redact::text(&e.to_string()));
            }
            t.finish().map_err(boundary)?;
            if res.is_err() {
                return res.map_err(Error::reported);
            }
        }
        let mut outcome = res?;
        if let Some(dir) = &release_dir {
            let names = release::write_sums(dir).map_err(boundary)?;
            tracing::info!(
                "release {}: {} files with SHA256SUMS and MD5SUMS",
                dir.path().display(),
                names.len()
            );
            for name in ["SHA256SUMS", "MD5SUMS", "build.log"] {
                let p = dir.join(name);
                artifact(name, &p, None).map_err(boundary)?;
                outcome.outputs.push(p);
            }
        }
        Ok(outcome)
    }

    /// The creator's build, then fuel-agent's metadata, the bundle and a release's input copy.
    fn build(
        &self,
        opts: BuildOptions,
        release_dir: Option<&OutputDir>,
        started: Instant,
    ) -> Result<JobOutcome, Error> {
        let boundary = |e| Error::classify(e, None);
        let plan = &self.plan;
        let outcome = match &self.vm {
            Some(vm) => crate::vm::create(
                plan,
                &self.input.spec,
                &self.input.path,
                &self.input.text,
                &opts,
                vm,
            )?,
            None => Creator::new(plan.clone(), opts)?.create()?,
        };
        let dir = outcome
            .metadata_path
            .parent()
            .unwrap_or(Path::new("."))
            .to_path_buf();
        // (path, known size and sha256)
        let mut outputs = known_outputs(&outcome);
        if let Some(f) = &self.input.fuel {
            // Next to the images, wherever -o put them.
            let mut f = f.clone();
            f.output_dir = dir.clone();
            let path = f.write_metadata(&outcome.metadata).map_err(boundary)?;
            tracing::info!("fuel-agent metadata: {}", path.display());
            if !outputs.iter().any(|(p, _)| *p == path) {
                outputs.push((path, None));
            }
        }
        if self.bundle {
            // What sits in the directory itself: an attachment goes with its directory.
            let mut names: Vec<String> = Vec::new();
            for (p, _) in &outputs {
                let name = output_name(&dir, p);
                let top = name.split('/').next().unwrap_or_default().to_string();
                if !names.contains(&top) {
                    names.push(top);
                }
            }
            let out = match release_dir {
                Some(d) => d.try_clone(),
                None => OutputDir::open(&dir),
            }
            .map_err(boundary)?;
            let archive =
                release::pack_outputs(&out, &names, &plan.bundle_name()).map_err(boundary)?;
            tracing::info!("bundled {} outputs into {}", names.len(), archive.display());
            outputs = vec![(archive, None)];
        }
        if let Some(release_dir) = release_dir {
            // The copy ships with the release: credentials in its URLs are masked.
            let name = plan.input_copy_name(self.input.fuel.is_some());
            let copy = crate::redact::text(&self.input.text);
            release_dir
                .write_file(&name, copy.as_bytes(), 0o644)
                .map_err(boundary)?;
            outputs.push((release_dir.join(&name), None));
            // A release is one-off: no later build takes this directory's lock.
            if let Err(e) = release_dir.remove(OUTPUT_LOCK) {
                tracing::warn!("{e:#}");
            }
        }
        if outcome.reused {
            tracing::info!(
                "reused: {} matches the spec (digest {}); nothing to build (--force rebuilds)",
                outcome.metadata_path.display(),
                &plan.digest[..12]
            );
        } else {
            tracing::info!(
                "built {} image(s) in {:.1}s; peak memory of debimg itself {} MiB",
                outcome.metadata.images.len(),
                started.elapsed().as_secs_f64(),
                peak_rss_kib().unwrap_or(0) >> 10
            );
        }
        let mut paths = Vec::new();
        for (p, known) in outputs {
            artifact(&output_name(&dir, &p), &p, known).map_err(boundary)?;
            paths.push(p);
        }
        Ok(JobOutcome {
            reused: outcome.reused,
            outputs: paths,
        })
    }
}

/// Every output of a build with the size and sha256 its metadata knows (none for the metadata
/// file itself): images, records, kernel and initrd, attachments, metadata.
fn known_outputs(outcome: &Outcome) -> Vec<(PathBuf, Option<(u64, String)>)> {
    let dir = outcome.metadata_path.parent().unwrap_or(Path::new("."));
    let m = &outcome.metadata;
    let mut out: Vec<(PathBuf, Option<(u64, String)>)> = m
        .images
        .iter()
        .map(|i| {
            (
                dir.join(&i.container_name),
                Some((i.container_size, i.container_sha256.clone())),
            )
        })
        .collect();
    out.extend(
        m.files
            .iter()
            .map(|f| (dir.join(&f.name), Some((f.size, f.sha256.clone())))),
    );
    // The kernel and initrd are among the files already.
    out.extend(
        m.attachments
            .iter()
            .filter(|a| !m.files.iter().any(|f| f.name == a.file))
            .map(|a| (dir.join(&a.file), Some((a.size, a.sha256.clone())))),
    );
    out.push((outcome.metadata_path.clone(), None));
    out
}

/// The name of the output `path` in the output directory `dir`: a file name, or for an
/// attachment its path from there (`NAME.attachments/etc/os-release`).
fn output_name(dir: &Path, path: &Path) -> String {
    match path.strip_prefix(dir) {
        Ok(rel) if !rel.as_os_str().is_empty() => rel.to_string_lossy().into_owned(),
        _ => path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
    }
}

/// Reports the published file `path`, called `name` in its directory, as an artifact,
/// digesting it unless its size and sha256 are known.
fn artifact(name: &str, path: &Path, known: Option<(u64, String)>) -> anyhow::Result<()> {
    let (size, sha256) = match known {
        Some(k) => k,
        None => {
            let d = digest::digest_file(path)?;
            (d.size, d.sha256)
        }
    };
    event::emit(&Event::Artifact {
        name: name.to_string(),
        path: path.to_path_buf(),
        size,
        sha256,
    });
    Ok(())
}

/// This process's peak resident set (VmHWM), in KiB: the build process's own memory, not the
/// programs it runs.
fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// The arguments of `debimg build`.
#[derive(clap::Args)]
pub struct BuildArgs {
    /// The YAML spec (or give --fuel instead).
    #[arg(required_unless_present = "fuel")]
    pub spec: Option<PathBuf>,
    /// Directory that receives the images and the metadata file [default: out, or the
    /// `output` of a --fuel input].
    #[arg(short, long)]
    pub output: Option<PathBuf>,
    /// Directory under which the temporary workspace is created.
    #[arg(long, default_value = DEFAULT_BUILD_DIR)]
    pub build_dir: PathBuf,
    /// Rebuild even when the output directory already matches the spec.
    #[arg(long)]
    pub force: bool,
    /// Wait for another build writing to the same output directory instead of failing.
    #[arg(long)]
    pub wait: bool,
    /// Package and base-tree caches shared by builds.
    #[arg(long, default_value = DEFAULT_CACHE_DIR)]
    pub cache_dir: PathBuf,
    /// Build without the caches (download everything, run the bootstrap).
    #[arg(long)]
    pub no_cache: bool,
    /// Neither start from nor store installed trees (the tree after apt installed the
    /// packages): apt installs every package on the base tree, as without a cache.
    #[arg(long)]
    pub no_tree_cache: bool,
    /// Bootstrap backend, overriding the spec's `bootstrap` (auto: mmdebstrap when present).
    #[arg(long, value_enum)]
    pub bootstrap: Option<Bootstrap>,
    /// Read fuel-agent's `nailgun_build_image` input (JSON) instead of a spec, and write
    /// the images and metadata fuel-agent would have.
    #[arg(long, value_name = "INPUT.json", conflicts_with = "spec")]
    pub fuel: Option<PathBuf>,
    /// Write a release into OUTPUT/ID: the outputs, the spec with @BUILD_ID@ replaced by
    /// ID, build.log, SHA256SUMS and MD5SUMS. Always builds; an ID whose earlier build
    /// failed is emptied and built again, a complete one is refused.
    #[arg(long, value_name = "ID", value_parser = parse_release_id)]
    pub release: Option<String>,
    /// Bundle all outputs into one archive, `<name>.bundle.tar.gz` (`--pack` is the old
    /// spelling).
    #[arg(long, alias = "pack", value_enum, value_name = "FORMAT")]
    pub bundle: Option<BundleFormat>,
    /// How results are reported on stdout: `human` (the paths of the outputs) or `json`
    /// (one JSON object per line: build-started, stage-started/-finished, artifact,
    /// build-finished; see docs/events.md).
    #[arg(long, value_enum, default_value = "human")]
    pub message_format: MessageFormat,
    /// Open an interactive shell inside the chroot just before unmounting (debugging).
    #[arg(long)]
    pub shell: bool,
    /// After a failure keep the workspace (unmounted) for inspection, and say where.
    #[arg(long)]
    pub keep_on_failure: bool,
    /// Build in a tmpfs of this size (e.g. 6GiB) instead of on the build directory's
    /// disk; the images must fit in it (sparse files count what they hold).
    #[arg(long, value_name = "SIZE", value_parser = parse_size, conflicts_with = "keep_on_failure")]
    pub tmpfs: Option<u64>,
    #[command(flatten)]
    pub vm: VmArgs,
    /// Inside a `--vm` machine: stop after the finish stage and leave the staged images,
    /// records and attachments in the output directory with `handoff.json`, for the host
    /// that started the machine to package and publish.
    #[arg(long, hide = true, conflicts_with_all = ["vm", "release", "bundle", "fuel"])]
    pub hand_off: bool,
    /// Inside a `--vm` machine for an untrusted spec: every download through this proxy
    /// (the host's `vm-proxy`, which reaches only the spec's mirrors and repositories).
    #[arg(long, hide = true, value_name = "URL", requires = "hand_off")]
    pub through_proxy: Option<String>,
    /// Install exactly the package versions of this lock file, the bootstrap's included,
    /// as `lock:` in the spec does (a build writes the lock of what it installed as
    /// NAME.lock.yaml); fails naming each version the repositories no longer have.
    #[arg(long, value_name = "FILE", conflicts_with = "fuel")]
    pub lock: Option<PathBuf>,
}

/// The arguments of `debimg lock`.
#[derive(clap::Args)]
pub struct LockArgs {
    /// The YAML spec.
    pub spec: PathBuf,
    /// Where the lock goes [default: NAME.lock.yaml].
    #[arg(short, long)]
    pub output: Option<PathBuf>,
    /// Directory under which the temporary workspace is created.
    #[arg(long, default_value = DEFAULT_BUILD_DIR)]
    pub build_dir: PathBuf,
    /// Package and base-tree caches shared by builds.
    #[arg(long, default_value = DEFAULT_CACHE_DIR)]
    pub cache_dir: PathBuf,
    /// Resolve without the caches.
    #[arg(long)]
    pub no_cache: bool,
}

/// The arguments of `debimg vm-image`.
#[derive(clap::Args)]
pub struct VmImageArgs {
    /// The cache directory; the appliance goes into its `vm/`.
    #[arg(long, default_value = DEFAULT_CACHE_DIR)]
    pub cache_dir: PathBuf,
    /// Directory under which the temporary workspace is created.
    #[arg(long, default_value = DEFAULT_BUILD_DIR)]
    pub build_dir: PathBuf,
    /// Rebuild it even when it matches its spec (to take the mirror's newest packages).
    #[arg(long)]
    pub force: bool,
}

/// Archive formats for `--bundle`.
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum BundleFormat {
    /// A gzipped tar archive.
    #[value(name = "tar.gz")]
    TarGz,
}

/// What `build` writes on stdout.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum MessageFormat {
    Human,
    Json,
}

/// Parses a size such as `6GiB` for `--tmpfs`.
fn parse_size(text: &str) -> Result<u64, String> {
    let size = crate::spec::Size::parse(text)?;
    if size.0 < 64 << 20 {
        return Err(format!(
            "`{text}` is too small for a build (at least 64MiB)"
        ));
    }
    Ok(size.0)
}

/// `debimg build --vm` and the limits of its machine.
#[derive(clap::Args)]
pub struct VmArgs {
    /// Build inside a throwaway qemu machine that boots the builder appliance (see `vm-image`):
    /// this host attaches no loop device, mounts nothing of the build and runs none of its
    /// code. The machine hands back the raw images as files, which this host checks against
    /// its plan, then packages and publishes.
    #[arg(long, conflicts_with_all = ["fuel", "shell", "keep_on_failure", "tmpfs"])]
    pub vm: bool,
    /// Memory of the machine (e.g. 2GiB); a build that runs out fails with `limit-exceeded`.
    #[arg(long, value_name = "SIZE", value_parser = parse_size, default_value = "2GiB", requires = "vm")]
    pub vm_memory: u64,
    /// Virtual CPUs of the machine [default: this host's, at most 8].
    #[arg(long, value_name = "N", requires = "vm", value_parser = clap::value_parser!(u32).range(1..=64))]
    pub vm_cpus: Option<u32>,
    /// The machine's disk budget: its scratch disk (sparse), which holds the workspace and the
    /// outputs; a build that fills it fails with `no-space`.
    #[arg(long, value_name = "SIZE", value_parser = parse_size, default_value = "32GiB", requires = "vm")]
    pub vm_disk: u64,
    /// Wall-clock limit of the machine in seconds; a build still running then is stopped and
    /// fails with `limit-exceeded`.
    #[arg(long, value_name = "SECONDS", requires = "vm")]
    pub vm_timeout: Option<u64>,
    /// auto: KVM when /dev/kvm works (falling back to software emulation when the machine does
    /// not come up in 30 s); kvm; tcg (software emulation).
    #[arg(long, value_enum, default_value = "auto", requires = "vm")]
    pub vm_accel: crate::boottest::Accel,
    /// The spec comes from someone this host does not trust (a build service's caller): no
    /// file it names on this host is read or sent into the machine (such paths resolve inside
    /// it), and this host's apt sources go in only when it asks for `host`.
    #[arg(long, requires = "vm")]
    pub untrusted: bool,
}

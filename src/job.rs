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

use crate::cli::{BuildArgs, LockArgs, MessageFormat, VmImageArgs};
use crate::creator::{BuildOptions, Creator, Outcome};
use crate::error::Error;
use crate::event::{self, BuildOutcome, Event};
use crate::input::Input;
use crate::output::release::{self, LogTee};
use crate::output::{OUTPUT_LOCK, OutputDir};
use crate::pack::digest;
use crate::plan::Plan;
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

//! `debimg build` as one library call: a spec (or fuel-agent's input) built into an output
//! directory by a [`Creator`], with what the command adds around it (a release directory with
//! its log and checksums, fuel-agent's metadata, a bundle), reporting [`Event`]s as it goes.
//! The CLI parses its arguments into a [`Job`]; a build service can do the same.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::creator::{BuildOptions, Creator, Outcome};
use crate::error::Error;
use crate::event::{self, BuildOutcome, Event};
use crate::input::Input;
use crate::output::release::{self, LogTee};
use crate::output::{OUTPUT_LOCK, OutputDir};
use crate::pack::digest;
use crate::plan::Plan;

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

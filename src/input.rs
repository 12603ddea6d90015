//! What a command reads: a spec file (its text with `@BUILD_ID@` replaced for a release) or
//! fuel-agent's input, and its plan on this host. `debimg validate` and `debimg plan` are this
//! reading alone, their result printed.

use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::error::Error;
use crate::fuel::FuelBuild;
use crate::output::release::{self, parse_release_id};
use crate::plan::Plan;
use crate::spec::{Bootstrap, Kind, Problem, Spec, SpecError};

/// What `debimg build` reads: a spec file (its text with `@BUILD_ID@` replaced for a release)
/// or fuel-agent's input.
#[derive(Debug, Clone)]
pub struct Input {
    pub spec: Spec,
    /// The text as read (after the substitution), for a release's copy.
    pub text: String,
    /// fuel-agent's build, when the input was its JSON.
    pub fuel: Option<FuelBuild>,
    /// Where it was read from.
    pub path: PathBuf,
}

impl Input {
    /// Reads the spec at `spec`, or fuel-agent's input at `fuel`; `release` is the release ID
    /// that replaces `@BUILD_ID@`.
    pub fn read(
        spec: Option<&Path>,
        fuel: Option<&Path>,
        release: Option<&str>,
    ) -> Result<Input, Error> {
        let boundary = |e| Error::classify(e, None);
        if let Some(fuel) = fuel {
            let text = crate::fuel::read_input(fuel).map_err(boundary)?;
            let mut build = crate::fuel::spec_from_fuel(&text, &fuel.display().to_string())
                .map_err(boundary)?;
            // Its repos' key files are next to it, as a spec's are.
            build.spec.base_dir = crate::spec::input_dir(fuel);
            return Ok(Input {
                spec: build.spec.clone(),
                text,
                fuel: Some(build),
                path: fuel.to_path_buf(),
            });
        }
        let path = spec.context("no spec given").map_err(boundary)?;
        let raw = Spec::read_text(path)?;
        let text = match release {
            Some(id) => release::substitute_build_id(&raw, id),
            None => raw,
        };
        let spec = Spec::from_yaml_at(&text, path).map_err(|mut e: SpecError| {
            if release.is_none() && text.contains(release::BUILD_ID_PLACEHOLDER) {
                e.problems.push(Problem {
                    field: String::new(),
                    message: format!(
                        "the spec uses {}: give the ID with --release ID",
                        release::BUILD_ID_PLACEHOLDER
                    ),
                });
            }
            e
        })?;
        Ok(Input {
            spec,
            text,
            fuel: None,
            path: path.to_path_buf(),
        })
    }

    /// The plan of this input on this host (its mirrors, its bootstrap backend), the spec's
    /// backend replaced by `bootstrap` when given.
    pub fn plan(&self, bootstrap: Option<Bootstrap>) -> Result<Plan, Error> {
        let mut spec = self.spec.clone();
        if let Some(b) = bootstrap {
            spec.bootstrap = b;
        }
        crate::host::plan(&spec)
            .with_context(|| format!("planning {}", self.path.display()))
            .map_err(|e| Error::classify(e, None))
    }
}

/// `debimg validate`: the spec read as a build reads it (or, `--untrusted`, as a spec from
/// someone this host does not trust, without looking at any file it names), then a line on
/// stdout saying what it makes.
pub fn validate(args: &ValidateArgs) -> Result<(), Error> {
    let spec = &args.spec;
    let release = args.release.as_deref();
    let s = if args.untrusted {
        // Parsed and checked without looking at any host file it names: whether one exists is
        // not an untrusted party's to learn.
        let raw = Spec::read_text(spec)?;
        let text = match release {
            Some(id) => release::substitute_build_id(&raw, id),
            None => raw,
        };
        let source_name = spec.display().to_string();
        let s = Spec::from_yaml(&text, &source_name)?;
        let problems = s.untrusted_problems();
        if !problems.is_empty() {
            return Err(SpecError {
                source_name: format!("{source_name} (from an untrusted source)"),
                problems,
            }
            .into());
        }
        s
    } else {
        Input::read(Some(spec), None, release)?.spec
    };
    let what = match s.kind {
        Kind::FsImages => format!(
            "{} image{}",
            s.images.len(),
            if s.images.len() == 1 { "" } else { "s" }
        ),
        Kind::Tarball => "a tarball".to_string(),
        Kind::Disk => format!(
            "a disk with {} partitions",
            s.disk.as_ref().map_or(0, |d| d.partitions.len())
        ),
    };
    println!(
        "{}: valid ({what}, {} package{})",
        spec.display(),
        s.packages.len(),
        if s.packages.len() == 1 { "" } else { "s" },
    );
    Ok(())
}

/// `debimg plan`: the plan of the spec on this host, with its digest, as JSON on stdout
/// (credentials in URLs masked).
pub fn print_plan(args: &PlanArgs) -> Result<(), Error> {
    let input = Input::read(Some(&args.spec), None, args.release.as_deref())?;
    let plan = input.plan(None)?;
    let boundary = |e: serde_json::Error| Error::classify(e.into(), None);
    let mut json = serde_json::to_value(&plan).map_err(boundary)?;
    json["digest"] = serde_json::Value::String(plan.digest.clone());
    let text = serde_json::to_string_pretty(&json).map_err(boundary)?;
    println!("{}", crate::redact::text(&text));
    Ok(())
}

/// The arguments of `debimg validate`.
#[derive(clap::Args)]
pub struct ValidateArgs {
    /// The YAML spec.
    pub spec: PathBuf,
    /// Check it as `build --release ID` reads it (@BUILD_ID@ replaced by ID).
    #[arg(long, value_name = "ID", value_parser = parse_release_id)]
    pub release: Option<String>,
    /// Check it as a spec from someone the build host does not trust: it may not read the
    /// host's files (`files[].source`, `local_debs`, `file://` repos, key files) nor run
    /// code on the host (`post` with `chroot: false`). No file it names is looked at.
    #[arg(long)]
    pub untrusted: bool,
}

/// The arguments of `debimg plan`.
#[derive(clap::Args)]
pub struct PlanArgs {
    /// The YAML spec.
    pub spec: PathBuf,
    /// Plan it as `build --release ID` reads it (@BUILD_ID@ replaced by ID).
    #[arg(long, value_name = "ID", value_parser = parse_release_id)]
    pub release: Option<String>,
}

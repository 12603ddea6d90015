//! The builder appliance a `--vm` build boots: a Debian system with a kernel and the tools a
//! build calls (`appliance.yaml`), made by debimg's own pipeline into `<cache-dir>/vm` and
//! reused like any output while its spec's digest (which covers the debimg version) matches.
//! `debimg vm-image` ([`crate::job::vm_image`]) (re)builds it; a `--vm` build builds it first
//! when it is missing.
//!
//! The machine boots the appliance's kernel and initrd directly (no bootloader) with its root
//! filesystem image as a disk that qemu opens copy-on-write, so no build changes it.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::plan::Plan;
use crate::spec::Spec;

/// The appliance's spec.
pub const SPEC: &str = include_str!("appliance.yaml");

/// The name of the spec file written into the appliance directory.
pub const SPEC_FILE: &str = "debimg-vm.spec.yaml";

/// The files a machine boots.
#[derive(Debug, Clone)]
pub struct Appliance {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// The root filesystem image (ext4, raw).
    pub root: PathBuf,
}

/// Writes the appliance's spec into `dir` (made 0755 when missing) and returns its path.
pub fn write_spec(dir: &Path) -> Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    crate::output::write_atomic(dir, SPEC_FILE, SPEC.as_bytes(), 0o644)?;
    Ok(dir.join(SPEC_FILE))
}

/// The plan of the appliance on this host.
pub fn plan(dir: &Path) -> Result<Plan> {
    let spec = Spec::from_yaml_at(SPEC, &dir.join(SPEC_FILE))
        .map_err(|e| anyhow::anyhow!("the appliance's spec: {e}"))?;
    crate::host::plan(&spec).context("planning the builder appliance")
}

/// The appliance in `dir` when it matches its spec.
pub fn current(dir: &Path) -> Result<Option<Appliance>> {
    let plan = plan(dir)?;
    if crate::output::publish::reusable(&plan, dir).is_none() {
        return Ok(None);
    }
    let (kernel, initrd) = plan.kernel_names();
    let root = plan
        .container_names()
        .into_iter()
        .next()
        .context("the appliance's spec makes no image")?;
    Ok(Some(Appliance {
        kernel: dir.join(kernel),
        initrd: dir.join(initrd),
        root: dir.join(root),
    }))
}

/// The appliance in `dir`, built first (by `debimg vm-image`, a process of its own) when it
/// is missing or was made from another spec or debimg version.
pub fn ensure(dir: &Path, build_dir: &Path) -> Result<Appliance> {
    if let Some(a) = current(dir)? {
        return Ok(a);
    }
    let cache_dir = dir
        .parent()
        .context("the appliance directory has no parent")?;
    tracing::info!(
        "building the builder appliance into {} (once; `debimg vm-image` rebuilds it)",
        dir.display()
    );
    let status = Command::new("/proc/self/exe")
        .arg("vm-image")
        .arg("--cache-dir")
        .arg(cache_dir)
        .arg("--build-dir")
        .arg(build_dir)
        .stdin(Stdio::null())
        // Its progress is this build's log; stdout is kept for this build's own report.
        .stdout(std::io::stderr())
        .status()
        .context("running debimg vm-image")?;
    if !status.success() {
        bail!("building the builder appliance failed ({status}); see its log above");
    }
    current(dir)?.context("the builder appliance is still missing after it was built")
}

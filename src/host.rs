//! The build host's part in a plan, gathered before it: what `host` mirrors stand for
//! ([`crate::debian::mirror::resolve_on_host`], the one step before the plan that may ask the
//! network), whether mmdebstrap is installed, `SOURCE_DATE_EPOCH` from the environment.
//! [`plan`] gathers them and hands them to [`Plan::new`], which decides from them alone.

use std::path::PathBuf;

use anyhow::Result;

use crate::plan::Plan;
use crate::spec::Spec;

/// Where host programs are looked for: PATH, then the system directories (a root shell's PATH
/// may lack the sbin ones).
pub fn program_dirs() -> Vec<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/bin", "/sbin", "/bin"].map(PathBuf::from))
        .collect()
}

/// True when `program` is a file in one of [`program_dirs`].
pub fn has(program: &str) -> bool {
    program_dirs().iter().any(|d| d.join(program).is_file())
}

/// The plan of `spec` on this host: `host` mirrors resolved from its apt sources (a suite none
/// of them lists from the first of its URIs that serves it, asked with apt's downloader and the
/// spec's proxies), mmdebstrap when it is installed, the spec's `source_date_epoch` else
/// `SOURCE_DATE_EPOCH` from the environment.
pub fn plan(spec: &Spec) -> Result<Plan> {
    // A spec the plan would refuse asks no mirror.
    crate::plan::check_host_inputs(spec)?;
    let mirrors = crate::debian::mirror::resolve_on_host(spec)?;
    let mut spec = std::borrow::Cow::Borrowed(spec);
    if spec.source_date_epoch.is_none()
        && let Some(epoch) = crate::reproducible::from_env()?
    {
        spec.to_mut().source_date_epoch = Some(epoch);
    }
    Plan::new(&spec, &mirrors, has("mmdebstrap"))
}

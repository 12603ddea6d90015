//! Another program driving debimg's stages itself, with a step of its own between `configure`
//! and `unmount`: it stamps the image with `/etc/motd` and `/etc/staged-by`.
//!
//! Usage (as root): `cargo run --example staged -- SPEC OUTPUT_DIR [CACHE_DIR]`

use std::path::{Path, PathBuf};

use anyhow::Context;
use debimg::{BuildOptions, Creator, Plan, Spec};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, spec, out, rest @ ..] = args.as_slice() else {
        anyhow::bail!("usage: staged SPEC OUTPUT_DIR [CACHE_DIR]");
    };
    let spec = Spec::from_file(Path::new(spec))?;
    let sources = debimg::plan::read_host_sources(Path::new("/"))?;
    let plan = Plan::new(&spec, &sources, debimg::plan::host_has("mmdebstrap"))?;
    let mut opts = BuildOptions::new(out);
    if let Some(cache) = rest.first() {
        opts.cache_dir = Some(PathBuf::from(cache));
    }
    // The build gets namespaces of its own, as under `debimg build`.
    let code = debimg::sys::namespace::run_isolated(|| {
        let staged = || -> anyhow::Result<()> {
            debimg::signals::install()?;
            let mut creator = Creator::new(plan, opts)?;
            creator.mount()?;
            creator.install()?;
            creator.configure()?;
            // Our own step: the tree is configured and still mounted. Files go in through the
            // in-root file API: a link in the image cannot lead a write out of it.
            let root = creator.root()?;
            let owner = debimg::root::Owner::ROOT;
            root.write("/etc/motd", b"Built by the staged example.\n", 0o644, owner)
                .context("writing /etc/motd")?;
            let mounts: Vec<String> = creator.filesystems().into_iter().map(|f| f.mount).collect();
            root.write(
                "/etc/staged-by",
                format!("{}\n", mounts.join(" ")).as_bytes(),
                0o644,
                owner,
            )
            .context("writing /etc/staged-by")?;
            creator.unmount()?;
            let outcome = creator.package()?;
            creator.cleanup()?;
            println!("{}", outcome.metadata_path.display());
            Ok(())
        };
        match staged() {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("error: {e:#}");
                1
            }
        }
    })?;
    std::process::exit(code.into());
}

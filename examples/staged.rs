//! Another program driving debimg's stages itself, with a step of its own between `configure`
//! and `unmount`: it stamps the image with `/etc/motd` and `/etc/staged-by`.
//!
//! Usage (as root): `cargo run --example staged -- SPEC OUTPUT_DIR [CACHE_DIR]`

use std::path::{Path, PathBuf};

use anyhow::Context;
use debimg::{BuildOptions, Creator, Spec};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, spec, out, rest @ ..] = args.as_slice() else {
        anyhow::bail!("usage: staged SPEC OUTPUT_DIR [CACHE_DIR]");
    };
    let spec = Spec::from_file(Path::new(spec))?;
    let plan = debimg::host::plan(&spec)?;
    let mut opts = BuildOptions::new(out);
    if let Some(cache) = rest.first() {
        opts.cache_dir = Some(PathBuf::from(cache));
    }
    // The build gets namespaces of its own, as under `debimg build`; an error is printed and
    // gives the exit code.
    let code = debimg::isolated(|| {
        let mut creator = Creator::new(plan, opts)?;
        creator.mount()?;
        creator.install()?;
        creator.configure()?;
        // Our own step: the tree is configured and still mounted. Files go in through the
        // in-root file API: a link in the image cannot lead a write out of it.
        let root = creator.root()?;
        let owner = debimg::root::Owner::ROOT;
        let mounts: Vec<String> = creator.filesystems().into_iter().map(|f| f.mount).collect();
        let stamp = format!("{}\n", mounts.join(" "));
        root.write("/etc/motd", b"Built by the staged example.\n", 0o644, owner)
            .context("writing /etc/motd")?;
        root.write("/etc/staged-by", stamp.as_bytes(), 0o644, owner)
            .context("writing /etc/staged-by")?;
        creator.unmount()?;
        let outcome = creator.package()?;
        creator.cleanup()?;
        println!("{}", outcome.metadata_path.display());
        Ok(())
    })?;
    std::process::exit(code.into());
}

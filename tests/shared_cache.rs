//! Builds side by side on one cache, as a build host and the service's workers run them: two
//! builds whose package sets overlap, started at the same moment on a cold cache, several times
//! over. Once, mmdebstrap's copy of the pooled packages failed ("file changed as we read it")
//! because the other build hard-linked the same files at that moment.

mod common;

use std::process::Stdio;

use common::*;
use debimg::metadata::Metadata;

/// How many times the pair is started on a fresh cache.
const ROUNDS: usize = 3;

#[test]
fn two_builds_on_one_cold_cache_at_the_same_moment() {
    if !can_build() {
        return;
    }
    let work = scratch("shared-cache");
    let specs: Vec<(String, std::path::PathBuf)> = [
        ("pair-a", "[curl, less]"),
        ("pair-b", "[curl, openssh-client]"),
    ]
    .iter()
    .map(|(name, packages)| {
        let p = work.path().join(format!("{name}.yaml"));
        std::fs::write(
            &p,
            format!(
                "version: 1\nname: {name}\nsuite: bookworm\nmirror: host\nkind: tarball\npackages: {packages}\n"
            ),
        )
        .unwrap();
        (name.to_string(), p)
    })
    .collect();
    let bdir = work.path().join("build");
    std::fs::create_dir_all(&bdir).unwrap();
    for round in 0..ROUNDS {
        // A cache of this round's own: cold, shared by the two builds only.
        let cache = work.path().join(format!("cache-{round}"));
        let children: Vec<_> = specs
            .iter()
            .map(|(name, spec)| {
                let out = work.path().join(format!("out-{round}-{name}"));
                let mut cmd = build_command(
                    spec,
                    &out,
                    &bdir,
                    &["-q", "--cache-dir", cache.to_str().unwrap()],
                );
                let child = cmd
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap();
                (name.clone(), out, child)
            })
            .collect();
        let mut outs = Vec::new();
        for (name, out, child) in children {
            let res = child.wait_with_output().unwrap();
            assert!(
                res.status.success(),
                "round {round}, {name}: {}",
                String::from_utf8_lossy(&res.stderr)
            );
            let meta = Metadata::read(&out.join(format!("{name}.yaml"))).unwrap();
            for p in ["curl", "less", "openssh-client"] {
                let wanted = meta.packages.iter().any(|x| x == p);
                assert_eq!(
                    meta.installed.contains_key(p),
                    wanted,
                    "round {round}, {name}: {p}"
                );
            }
            assert_consistent_result(&out, &format!("{name}.yaml"));
            outs.push(out);
        }
        // Only now: the build directory is shared, and the other build may still be in it.
        for out in &outs {
            assert_no_leftovers(&bdir, out);
        }
        // Every pooled package is whole: each one the builds stored is a valid archive.
        let pool = cache.join("packages");
        let debs: Vec<_> = std::fs::read_dir(&pool)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".deb"))
            .collect();
        assert!(
            debs.iter()
                .any(|e| e.file_name().to_string_lossy().starts_with("curl_")),
            "round {round}: curl was not pooled"
        );
        for e in &debs {
            tool("dpkg-deb", &["--info", e.path().to_str().unwrap()]);
        }
        if round + 1 == ROUNDS {
            tampered_pool_file_is_never_installed(work.path(), &cache, &specs[0].1, &bdir);
        }
        std::fs::remove_dir_all(&cache).unwrap();
    }
}

/// A pooled package changed after it was stored, its size kept (as a build's chroot once could
/// through a hard link): the next build does not take it, says so, and pools the real one.
fn tampered_pool_file_is_never_installed(
    work: &std::path::Path,
    cache: &std::path::Path,
    spec: &std::path::Path,
    bdir: &std::path::Path,
) {
    let pooled = std::fs::read_dir(cache.join("packages"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("curl_")
        })
        .unwrap();
    let (_, genuine) = sums(&pooled);
    let mut bytes = std::fs::read(&pooled).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&pooled, &bytes).unwrap();
    let out = work.join("out-tampered");
    // Without the installed-tree cache: apt takes its packages from the pool whatever trees
    // the cache holds.
    let run = build(
        spec,
        &out,
        bdir,
        &[
            "-q",
            "--no-tree-cache",
            "--cache-dir",
            cache.to_str().unwrap(),
        ],
    );
    run.assert_ok("the build after the pool was tampered with");
    let name = pooled.file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        run.stderr().contains(&name) && run.stderr().contains("does not match"),
        "no warning about {name}: {}",
        run.stderr()
    );
    assert_eq!(
        sums(&pooled).1,
        genuine,
        "the pool holds the real package again"
    );
    assert_no_leftovers(bdir, &out);
}

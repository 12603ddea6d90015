//! Reproducible builds in the tests: one spec built twice side by side, the first from the
//! shared test cache and the second without any cache (a bootstrap and install of its own), in
//! another time zone; and the check that the two gave the same bytes.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::{assert_no_leftovers, build_command, scratch};

/// The epoch the reproducible tests build with.
pub const EPOCH: u64 = 1_700_000_000;

/// How long after the first build the second starts. The second, without any cache, reaches
/// each stage later than the first does in its own run, so every stage of it runs more than a
/// minute later on the clock: a time that leaks into an output, to the minute, shows (as it did
/// when one build ran after the other), and the two still overlap for most of their time.
const STAGGER: Duration = Duration::from_secs(61);

/// Two builds of `spec` with `env` and `args`, side by side (the second [`STAGGER`] later,
/// without any cache, in another time zone: nothing of the host's clock may show):
/// `(scratch, [first output dir, second output dir])`.
pub fn build_twice(
    spec: &Path,
    tag: &str,
    env: &[(&str, String)],
    args: &[&str],
) -> (tempfile::TempDir, [PathBuf; 2]) {
    build_twice_and(spec, tag, env, args, |_, _, _| {})
}

/// [`build_twice`], calling `first_built(scratch, first output dir, its stderr)` once the
/// first build is done, while the second may still run.
pub fn build_twice_and(
    spec: &Path,
    tag: &str,
    env: &[(&str, String)],
    args: &[&str],
    first_built: impl FnOnce(&Path, &Path, &str),
) -> (tempfile::TempDir, [PathBuf; 2]) {
    let work = scratch(tag);
    let outs = [0, 1].map(|i| work.path().join(format!("out-{i}")));
    let one = |i: usize| -> String {
        let build_dir = work.path().join(format!("build-{i}"));
        std::fs::create_dir_all(&build_dir).unwrap();
        let mut extra = args.to_vec();
        if i == 1 {
            extra.push("--no-cache");
        }
        let mut cmd = build_command(spec, &outs[i], &build_dir, &extra);
        if i == 1 {
            cmd.env("TZ", "Asia/Tokyo");
        }
        cmd.envs(env.iter().map(|(k, v)| (k, v)));
        let output = cmd.output().expect("running debimg");
        assert!(
            output.status.success(),
            "build {i} of {} failed:\n{}",
            spec.display(),
            String::from_utf8_lossy(&output.stderr)
        );
        assert_no_leftovers(&build_dir, &outs[i]);
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    std::thread::scope(|s| {
        let second = s.spawn(|| {
            std::thread::sleep(STAGGER);
            one(1)
        });
        let stderr = one(0);
        first_built(work.path(), &outs[0], &stderr);
        second.join().unwrap();
    });
    (work, outs)
}

/// The files of an output directory (names, sorted), without its lock.
pub fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != ".debimg.lock")
        .collect();
    names.sort();
    names
}

/// Every output of the two builds is the same, byte for byte, but the metadata, whose only
/// differences are `build_start` and `build_end` (which must differ: two runs, not one).
pub fn assert_identical(outs: &[PathBuf; 2], metadata: &str) {
    let names = listing(&outs[0]);
    assert_eq!(
        names,
        listing(&outs[1]),
        "the two builds wrote different files"
    );
    assert!(names.iter().any(|n| n == metadata), "{names:?}");
    for name in &names {
        let (a, b) = (outs[0].join(name), outs[1].join(name));
        if name == metadata {
            continue;
        }
        let st = Command::new("cmp").arg(&a).arg(&b).output().unwrap();
        assert!(
            st.status.success(),
            "{name} differs between the two builds: {}",
            String::from_utf8_lossy(&st.stdout)
        );
    }
    let read = |p: &Path| std::fs::read_to_string(p).unwrap();
    let (ma, mb) = (read(&outs[0].join(metadata)), read(&outs[1].join(metadata)));
    let timed = |l: &&str| l.starts_with("build_start:") || l.starts_with("build_end:");
    let untimed =
        |m: &str| -> Vec<String> { m.lines().filter(|l| !timed(l)).map(String::from).collect() };
    assert_eq!(
        untimed(&ma),
        untimed(&mb),
        "the metadata differs beyond the build times"
    );
    let times = |m: &str| -> Vec<String> { m.lines().filter(timed).map(String::from).collect() };
    assert_eq!(times(&ma).len(), 2, "{ma}");
    assert_ne!(
        times(&ma),
        times(&mb),
        "two builds, but one start and end: the metadata of one run twice?"
    );
}

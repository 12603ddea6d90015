//! What others who may write to the output directory can plant there must not make debimg
//! (root) write, read or delete a host file: the real binary against a planted lock link and
//! release directories it did not make or made and left incomplete.
//!
//! No test here builds: each either fails before the build starts, or is given a build
//! directory that is a regular file, so that a build that got past the defence under test would
//! still stop before creating anything (and the test then fails on its assertions instead of
//! running for minutes).

mod common;

use std::os::unix::fs::{MetadataExt, symlink};
use std::path::{Path, PathBuf};

use common::*;

/// Content, modification time and inode of a file: proof that it was not touched.
fn fingerprint(path: &Path) -> (Vec<u8>, i64, i64, u64) {
    let meta = std::fs::symlink_metadata(path).unwrap();
    (
        std::fs::read(path).unwrap(),
        meta.mtime(),
        meta.mtime_nsec(),
        meta.ino(),
    )
}

fn victim(dir: &Path) -> PathBuf {
    let v = dir.join("victim");
    std::fs::write(&v, b"a host file nobody asked debimg to touch\n").unwrap();
    v
}

fn names(dir: &Path) -> Vec<String> {
    let mut n: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    n.sort();
    n
}

/// A build directory no build can get into: a regular file.
fn blocked_build_dir(scratch: &Path) -> PathBuf {
    let b = scratch.join("build-dir-is-a-file");
    std::fs::write(&b, b"").unwrap();
    b
}

fn build_release(scratch: &Path, out: &Path, id: &str) -> Run {
    build(
        &example("minimal.yaml"),
        out,
        &blocked_build_dir(scratch),
        &["--no-cache", "--release", id],
    )
}

#[test]
fn a_lock_link_planted_in_the_output_dir_stops_the_build_before_it_starts() {
    if !can_build() {
        return;
    }
    let dir = scratch("lock-link");
    let v = victim(dir.path());
    let before = fingerprint(&v);
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    symlink(&v, out.join(".debimg.lock")).unwrap();
    let bdir = blocked_build_dir(dir.path());
    let run = build(&example("minimal.yaml"), &out, &bdir, &["--no-cache"]);
    assert_eq!(run.code(), Some(6), "{}", run.stderr());
    assert!(
        run.stderr()
            .contains(".debimg.lock is a symbolic link: refusing to follow it"),
        "{}",
        run.stderr()
    );
    assert!(
        !run.stderr().contains("creating build directory"),
        "got past the lock: {}",
        run.stderr()
    );
    assert_eq!(fingerprint(&v), before, "the link's target changed");
    assert!(
        std::fs::symlink_metadata(out.join(".debimg.lock"))
            .unwrap()
            .is_symlink()
    );
}

#[test]
fn a_release_id_that_is_a_link_is_refused_and_its_target_left_alone() {
    if !can_build() {
        return;
    }
    let dir = scratch("release-link");
    let elsewhere = dir.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    let v = victim(&elsewhere);
    let before = fingerprint(&v);
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    symlink(&elsewhere, out.join("7")).unwrap();
    let run = build_release(dir.path(), &out, "7");
    assert_eq!(run.code(), Some(6), "{}", run.stderr());
    assert!(
        run.stderr()
            .contains("is a symbolic link: refusing to follow it"),
        "{}",
        run.stderr()
    );
    assert_eq!(fingerprint(&v), before);
    assert_eq!(names(&elsewhere), ["victim"], "nothing added or removed");
}

#[test]
fn a_release_directory_debimg_did_not_make_is_refused_and_left_alone() {
    if !can_build() {
        return;
    }
    let dir = scratch("release-foreign");
    let out = dir.path().join("out");
    let theirs = out.join("7");
    std::fs::create_dir_all(&theirs).unwrap();
    let v = victim(&theirs);
    let before = fingerprint(&v);
    let run = build_release(dir.path(), &out, "7");
    assert_eq!(run.code(), Some(6), "{}", run.stderr());
    assert!(
        run.stderr().contains("not made by debimg") && run.stderr().contains("refusing"),
        "{}",
        run.stderr()
    );
    assert_eq!(fingerprint(&v), before);
    assert_eq!(names(&theirs), ["victim"]);
}

#[test]
fn an_incomplete_release_of_debimg_is_emptied_and_reused() {
    if !can_build() {
        return;
    }
    let dir = scratch("release-incomplete");
    let outside = dir.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    let v = victim(&outside);
    let before = fingerprint(&v);
    let out = dir.path().join("out");
    let release = out.join("7");
    debimg::output::release::prepare_dir(&out, "7").unwrap();
    for f in ["minimal.img.gz", ".minimal.yaml.tmp-0123", "build.log"] {
        std::fs::write(release.join(f), b"left by a failed run").unwrap();
    }
    symlink(&v, release.join("minimal.yaml")).unwrap();
    let run = build_release(dir.path(), &out, "7");
    // Stopped at the blocked build directory: after the release directory was prepared.
    assert_eq!(run.code(), Some(1), "{}", run.stderr());
    assert!(
        run.stderr().contains("creating build directory")
            || run.stderr().contains("missing host tools"),
        "{}",
        run.stderr()
    );
    assert_eq!(
        names(&release),
        [".debimg-release", ".debimg.lock", "build.log"],
        "what the failed run left is gone; this run's log and lock are there"
    );
    let log = std::fs::read_to_string(release.join("build.log")).unwrap();
    assert!(log.contains("error:"), "this run's log: {log}");
    assert_eq!(fingerprint(&v), before);
}

//! The host stays clean whatever happens to a build: a failure, SIGINT or SIGTERM at every stage,
//! `kill -9` in the middle of apt, a full build disk, and four builds at once. Each case is a
//! real build; the fault matrix writes docs/reliability.md from what it observed.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

/// Every stage, by the one list the build runs them from.
const STAGES: [debimg::Stage; 8] = debimg::Stage::ALL;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Fault {
    Fail,
    Signal(i32),
}

impl Fault {
    fn label(self) -> &'static str {
        match self {
            Fault::Fail => "error",
            Fault::Signal(libc::SIGINT) => "SIGINT",
            Fault::Signal(libc::SIGTERM) => "SIGTERM",
            Fault::Signal(_) => "signal",
        }
    }
    fn expected_code(self) -> i32 {
        match self {
            Fault::Fail => 1,
            Fault::Signal(s) => 128 + s,
        }
    }
}

/// A small two-filesystem spec (a nested mount to unwind) with one package for apt to install.
fn write_spec(dir: &Path) -> PathBuf {
    let spec = dir.join("rel.yaml");
    std::fs::write(
        &spec,
        "version: 1\nname: rel\nsuite: bookworm\npackages: [less]\nimages:\n  - {mount: /, fs: ext4, size: 768MiB, label: root}\n  - {mount: /boot, fs: ext2, size: 64MiB, label: boot}\n",
    )
    .unwrap();
    spec
}

/// Spawns a build with piped stderr and collects its lines; `on_line` sees each one.
fn spawn(
    cmd: &mut std::process::Command,
) -> (Child, Arc<Mutex<Vec<String>>>, std::thread::JoinHandle<()>) {
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting debimg");
    let lines = Arc::new(Mutex::new(Vec::new()));
    let stderr = child.stderr.take().unwrap();
    let l2 = lines.clone();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            l2.lock().unwrap().push(line);
        }
    });
    (child, lines, reader)
}

fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let t = Instant::now();
    while !cond() {
        assert!(t.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One cell of the matrix: runs the build with the fault and checks the aftermath.
fn run_case(spec: &Path, good: &Path, stage: debimg::Stage, fault: Fault) -> String {
    let work = scratch(&format!("rel-{stage}-{}", fault.label()));
    let out = work.path().join("out");
    let bdir = work.path().join("build");
    std::fs::create_dir_all(&bdir).unwrap();
    copy_dir(good, &out);
    let before = dir_digest(&out);
    let action = if fault == Fault::Fail {
        "fail"
    } else {
        "pause"
    };
    let mut cmd = build_command(spec, &out, &bdir, &["--force", "-q"]);
    cmd.env("DEBIMG_TEST_FAULT", format!("{stage}:{action}"));
    let (mut child, lines, reader) = spawn(&mut cmd);
    if let Fault::Signal(sig) = fault {
        let marker = format!("debimg-test: paused in stage {stage}");
        wait_for(&marker, Duration::from_secs(600), || {
            lines.lock().unwrap().iter().any(|l| l == &marker)
                || child.try_wait().unwrap().is_some()
        });
        unsafe {
            libc::kill(child.id() as i32, sig);
        }
    }
    let status = child.wait().unwrap();
    reader.join().unwrap();
    let stderr = lines.lock().unwrap().join("\n");
    let ctx = format!("stage {stage}, {}:\n{stderr}", fault.label());
    assert_eq!(status.code(), Some(fault.expected_code()), "{ctx}");
    assert!(
        stderr.contains(&format!("stage {stage} failed")),
        "the error names no stage: {ctx}"
    );
    if let Fault::Signal(_) = fault {
        assert!(
            stderr.contains(&format!("interrupted by {}", fault.label())),
            "{ctx}"
        );
    }
    assert_no_leftovers(&bdir, &out);
    let after = dir_digest(&out);
    let kept = if after == before {
        "previous result untouched"
    } else {
        // Only a fault after the new result was published may change the directory, and then
        // it must hold the complete new result.
        assert_eq!(stage, debimg::Stage::Publish, "output changed: {ctx}");
        assert_consistent_result(&out, "rel.yaml");
        "new result complete (fault came after publishing)"
    };
    format!("exit {} · nothing left · {kept}", status.code().unwrap())
}

/// kill -9 of debimg while apt runs: the namespaces take every process, mount and loop device
/// along; the next run removes the stale workspace.
fn kill9_mid_apt(spec: &Path, good: &Path) -> String {
    let work = scratch("rel-kill9");
    let out = work.path().join("out");
    let bdir = work.path().join("build");
    std::fs::create_dir_all(&bdir).unwrap();
    copy_dir(good, &out);
    let before = dir_digest(&out);
    // Without the installed-tree cache: apt runs whatever the cache holds.
    let mut cmd = build_command(spec, &out, &bdir, &["--force", "-q", "--no-tree-cache"]);
    let (mut child, _lines, reader) = spawn(&mut cmd);
    let apt_running = || {
        processes_rooted_under(&bdir).into_iter().any(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.contains("apt-get") && c.contains("install"))
        })
    };
    wait_for(
        "apt-get install in the chroot",
        Duration::from_secs(600),
        || apt_running() || child.try_wait().unwrap().is_some(),
    );
    assert!(
        child.try_wait().unwrap().is_none(),
        "the build ended before apt ran"
    );
    unsafe {
        libc::kill(child.id() as i32, libc::SIGKILL);
    }
    let status = child.wait().unwrap();
    reader.join().unwrap();
    assert_eq!(status.code(), None, "debimg survived SIGKILL");
    wait_for(
        "the build's processes and loop devices to go",
        Duration::from_secs(20),
        || processes_rooted_under(&bdir).is_empty() && loops_backed_under(&bdir).is_empty(),
    );
    let mounts = debimg::sys::mount::mount_points_under(&bdir).unwrap();
    assert!(mounts.is_empty(), "{mounts:?}");
    assert_eq!(dir_digest(&out), before, "the output changed");
    // Only the workspace's files remain; the next build removes them.
    let stale: Vec<_> = std::fs::read_dir(&bdir).unwrap().flatten().collect();
    assert_eq!(stale.len(), 1, "expected one stale workspace");
    let mut next = build_command(spec, &out, &bdir, &["--force", "-q"]);
    next.env("DEBIMG_TEST_FAULT", "mount:fail");
    let o = next.output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("removing stale workspace"));
    assert_no_leftovers(&bdir, &out);
    "killed · no process, mount or loop device left · previous result untouched · stale workspace removed by the next run".into()
}

#[test]
fn fault_matrix_leaves_nothing_behind() {
    if !can_build() {
        return;
    }
    let base = scratch("rel");
    let spec = write_spec(base.path());
    let good = base.path().join("good");
    let bdir = base.path().join("build");
    std::fs::create_dir_all(&bdir).unwrap();
    build(&spec, &good, &bdir, &["-q"]).assert_ok("the good build");
    let faults = [
        Fault::Fail,
        Fault::Signal(libc::SIGINT),
        Fault::Signal(libc::SIGTERM),
    ];
    let mut cases: Vec<(usize, usize)> = Vec::new();
    for s in 0..STAGES.len() {
        for f in 0..faults.len() {
            cases.push((s, f));
        }
    }
    let queue = Arc::new(Mutex::new(cases));
    let results = Arc::new(Mutex::new(vec![
        vec![String::new(); faults.len()];
        STAGES.len()
    ]));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let workers: Vec<_> = (0..3)
        .map(|_| {
            let (queue, results, failures) = (queue.clone(), results.clone(), failures.clone());
            let (spec, good) = (spec.clone(), good.clone());
            std::thread::spawn(move || {
                loop {
                    let Some((s, f)) = queue.lock().unwrap().pop() else {
                        break;
                    };
                    let r =
                        std::panic::catch_unwind(|| run_case(&spec, &good, STAGES[s], faults[f]));
                    match r {
                        Ok(cell) => results.lock().unwrap()[s][f] = cell,
                        Err(e) => {
                            let msg = e
                                .downcast_ref::<String>()
                                .cloned()
                                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                                .unwrap_or_default();
                            results.lock().unwrap()[s][f] = "**FAILED**".into();
                            failures.lock().unwrap().push(format!(
                                "{} x {}: {msg}",
                                STAGES[s],
                                faults[f].label()
                            ));
                        }
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    let kill9 = std::panic::catch_unwind(|| kill9_mid_apt(&spec, &good)).unwrap_or_else(|e| {
        let msg = e.downcast_ref::<String>().cloned().unwrap_or_default();
        failures
            .lock()
            .unwrap()
            .push(format!("kill -9 mid-apt: {msg}"));
        "**FAILED**".into()
    });
    write_report(&results.lock().unwrap(), &faults, &kill9);
    let failures = failures.lock().unwrap();
    assert!(
        failures.is_empty(),
        "{} case(s) failed:\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

fn write_report(results: &[Vec<String>], faults: &[Fault], kill9: &str) {
    let mut md = String::from(
        "# Reliability: what a fault at each stage leaves behind\n\n\
         Generated by `cargo test --test reliability` (test `fault_matrix_leaves_nothing_behind`);\n\
         do not edit by hand. Each cell is a real build of a two-filesystem spec (`/` ext4 with\n\
         `/boot` ext2 mounted inside) into an output directory that already held a good result,\n\
         with `--force`. The fault fires at the end of the stage, with the stage's resources held:\n\
         an injected error (`DEBIMG_TEST_FAULT=<stage>:fail`), or the build pauses there\n\
         (`<stage>:pause`) and the test sends the signal to the debimg process. After each, the\n\
         test checks: the exit code, the error names the stage, no loop device backed by the build\n\
         directory, no mount under it, no process rooted in it, no workspace or temporary file\n\
         left, and the output directory byte-identical to before (or, after `publish`, holding the\n\
         complete new result).\n\n",
    );
    md.push_str("| stage |");
    for f in faults {
        md.push_str(&format!(" {} |", f.label()));
    }
    md.push_str("\n|---|");
    for _ in faults {
        md.push_str("---|");
    }
    md.push('\n');
    for (s, row) in STAGES.iter().zip(results) {
        md.push_str(&format!("| {s} |"));
        for cell in row {
            md.push_str(&format!(" {cell} |"));
        }
        md.push('\n');
    }
    md.push_str(&format!(
        "\n`kill -9` of debimg while `apt-get install` runs in the chroot: {kill9}.\n\n\
         Generated on {} ({} CPUs).\n",
        std::fs::read_to_string("/etc/debian_version")
            .map(|v| format!("Debian {}", v.trim()))
            .unwrap_or_else(|_| "unknown host".into()),
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    ));
    let docs = repo().join("docs");
    std::fs::create_dir_all(&docs).unwrap();
    std::fs::write(docs.join("reliability.md"), md).unwrap();
}

#[test]
fn full_build_disk_fails_cleanly_with_no_space() {
    if !can_build() {
        return;
    }
    // 96 MiB: the preflight refuses before anything is made, naming the shortfall. 200 MiB:
    // past the preflight's floor, the disk fills up half way through the build.
    for (size, says) in [
        ("96m", "needs at least 160 MiB (short by"),
        ("200m", "no space left in the build directory"),
    ] {
        let work = scratch("nospace");
        let small = work.path().join("small");
        std::fs::create_dir_all(&small).unwrap();
        private_mounts();
        let tmpfs = debimg::sys::mount::mount(
            "tmpfs",
            &small,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some(&format!("size={size}")),
        )
        .unwrap();
        let spec = write_spec(work.path());
        let out = work.path().join("out");
        let bdir = small.join("build");
        let run = build(&spec, &out, &bdir, &["-q"]);
        let err = run.stderr();
        assert_eq!(run.code(), Some(5), "{size}: {err}");
        assert!(err.contains(says), "{size}: {err}");
        assert_no_leftovers(&bdir, &out);
        assert!(!out.join("rel.yaml").exists());
        tmpfs.close().unwrap();
    }
}

#[test]
fn four_builds_at_once_all_end_correctly() {
    if !can_build() {
        return;
    }
    let work = scratch("four");
    let spec = write_spec(work.path());
    let shared = work.path().join("shared");
    let (out2, out3) = (work.path().join("out2"), work.path().join("out3"));
    let bdir = work.path().join("build");
    std::fs::create_dir_all(&bdir).unwrap();
    let mut a = build_command(&spec, &shared, &bdir, &["--wait"]);
    let (mut ca, la, ra) = spawn(&mut a);
    // A holds the output directory's lock once its first stage started.
    wait_for("the first build to start", Duration::from_secs(120), || {
        la.lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("stage mount: started"))
    });
    let refused = build(&spec, &shared, &bdir, &[]);
    assert_eq!(refused.code(), Some(3), "{}", refused.stderr());
    assert!(
        refused.stderr().contains("another debimg build is writing"),
        "{}",
        refused.stderr()
    );
    let mut b = build_command(&spec, &shared, &bdir, &["--wait"]);
    let mut c = build_command(&spec, &out2, &bdir, &[]);
    let mut d = build_command(&spec, &out3, &bdir, &[]);
    let (mut cb, lb, rb) = spawn(&mut b);
    let (mut cc, lc, rc) = spawn(&mut c);
    let (mut cd, ld, rd) = spawn(&mut d);
    for (child, lines, reader, name) in [
        (&mut ca, &la, ra, "A"),
        (&mut cb, &lb, rb, "B"),
        (&mut cc, &lc, rc, "C"),
        (&mut cd, &ld, rd, "D"),
    ] {
        let st = child.wait().unwrap();
        reader.join().unwrap();
        assert!(
            st.success(),
            "build {name}: {}",
            lines.lock().unwrap().join("\n")
        );
    }
    let reused =
        |l: &Arc<Mutex<Vec<String>>>| l.lock().unwrap().iter().any(|x| x.contains("reused"));
    assert!(!reused(&la), "A found something to reuse");
    assert!(
        reused(&lb),
        "B waited for A and should have reused its result"
    );
    for out in [&shared, &out2, &out3] {
        assert_consistent_result(out, "rel.yaml");
        assert_no_leftovers(&bdir, out);
    }
}

/// What a reader that follows the metadata finds in `out`: the hostname the metadata's
/// attachment has, after checking every image, file and attachment it lists against it (no
/// mix of two results); None when there is no metadata.
fn follow_metadata(out: &Path) -> Option<String> {
    let path = out.join("pub.yaml");
    if !path.exists() {
        return None;
    }
    assert_consistent_result(out, "pub.yaml");
    let meta = debimg::metadata::Metadata::read(&path).unwrap();
    for f in &meta.files {
        assert_eq!(sums(&out.join(&f.name)).1, f.sha256, "{}", f.name);
    }
    let mut host = None;
    for a in &meta.attachments {
        assert_eq!(sums(&out.join(&a.file)).1, a.sha256, "{}", a.file);
        if a.path == "/etc/hostname" {
            host = Some(std::fs::read_to_string(out.join(&a.file)).unwrap());
        }
    }
    Some(host.expect("no hostname attachment").trim().to_string())
}

/// `kill -9` of debimg before steps of publish (`DEBIMG_TEST_FAULT=publish:kill-at-N`), over a
/// directory holding the previous result: a reader that follows the metadata sees the previous
/// result whole, none, or the new one whole; and the next run finds the previous complete
/// result (killed before the commit) or the new one, and reuses it. The unit test
/// `a_crash_between_any_two_publish_steps_leaves_the_previous_or_the_new_result` crashes before
/// every step; this one kills the real process at the steps around each kind of rename: the
/// last before the commit (2), the first after it (3, the old metadata still there), between
/// two files (5), before the new metadata and before the journal goes (the last). Those two
/// follow from how many files the result has (steps 4.. rename them, then the attachments
/// directory takes two steps).
#[test]
fn kill9_between_any_two_publish_steps_leaves_a_whole_result() {
    if !can_build() {
        return;
    }
    let work = scratch("pubkill");
    let bdir = work.path().join("build");
    std::fs::create_dir_all(&bdir).unwrap();
    let spec = |host: &str| {
        let p = work.path().join(format!("{host}.yaml"));
        std::fs::write(
            &p,
            format!(
                "version: 1\nname: pub\nsuite: bookworm\nmirror: host\nkind: tarball\n\
                 hostname: {host}\nrecords: [packages]\nattachments: [/etc/hostname]\n"
            ),
        )
        .unwrap();
        p
    };
    let (old, new) = (spec("old"), spec("new"));
    let good = work.path().join("good");
    build(&old, &good, &bdir, &["-q"]).assert_ok("the previous result");
    assert_eq!(follow_metadata(&good).as_deref(), Some("old"));
    let meta = debimg::metadata::Metadata::read(&good.join("pub.yaml")).unwrap();
    let files = meta.images.len() + meta.files.len();
    assert!(files >= 2, "{files}");
    let (new_metadata, last) = (3 + files + 3, 3 + files + 5);
    for step in [2, 3, 5, new_metadata, last] {
        let out = work.path().join(format!("out-{step}"));
        copy_dir(&good, &out);
        let mut cmd = build_command(&new, &out, &bdir, &["-q"]);
        cmd.env("DEBIMG_TEST_FAULT", format!("publish:kill-at-{step}"));
        let run = cmd.output().unwrap();
        let stderr = String::from_utf8_lossy(&run.stderr);
        let ctx = format!("killed before publish step {step}: {stderr}");
        // The build's process (in its own namespaces) died of SIGKILL: debimg says so.
        assert_eq!(run.status.code(), Some(128 + libc::SIGKILL), "{ctx}");
        assert!(
            stderr.contains(&format!("killed before publish step {step}")),
            "{ctx}"
        );
        // The old metadata stays until step 3, the new one comes at its own step.
        let seen = follow_metadata(&out);
        let want = match step {
            0..=3 => Some("old"),
            s if s <= new_metadata => None,
            _ => Some("new"),
        };
        assert_eq!(seen.as_deref(), want, "{ctx}");
        // The next holder of the lock completes the publish or drops it; the build then finds
        // a complete result to reuse.
        let expect = if step <= 2 { "old" } else { "new" };
        let next = build(if step <= 2 { &old } else { &new }, &out, &bdir, &[]);
        next.assert_ok(&ctx);
        assert!(next.stderr().contains("reused"), "{ctx}\n{}", next.stderr());
        assert_eq!(follow_metadata(&out).as_deref(), Some(expect), "{ctx}");
        let hidden: Vec<String> = std::fs::read_dir(&out)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.') && n != ".debimg.lock")
            .collect();
        assert!(hidden.is_empty(), "{ctx}: left {hidden:?}");
        assert_no_leftovers(&bdir, &out);
        std::fs::remove_dir_all(&out).unwrap();
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

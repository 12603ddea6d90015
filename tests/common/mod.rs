//! Shared pieces of the integration tests: running the real binary, checking outputs with
//! independent tools (md5sum, sha256sum, gunzip, e2fsck, xfs_repair), mounting built images
//! read-only, and proving a build left nothing behind.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

pub mod repro;
pub mod service;

use debimg::metadata::Metadata;
use debimg::sys::loopdev::{self, LoopDevice};
use debimg::sys::mount::{self, Mount};
use nix::mount::MsFlags;

/// True when the tests that need root, loop devices and mounts can run; says why otherwise.
pub fn can_build() -> bool {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root");
        return false;
    }
    if !Path::new("/dev/loop-control").exists() {
        eprintln!("skipped: no /dev/loop-control");
        return false;
    }
    true
}

/// The repository's root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// An example spec from data/examples.
pub fn example(name: &str) -> PathBuf {
    repo().join("data/examples").join(name)
}

/// A scratch directory under /var/tmp (the build default's filesystem), removed on drop.
pub fn scratch(tag: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("debimg-test-{tag}-"))
        .tempdir_in("/var/tmp")
        .expect("creating a scratch dir")
}

/// The result of one debimg run.
pub struct Run {
    pub output: Output,
    pub elapsed: Duration,
}

impl Run {
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.output.stdout).into_owned()
    }
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.output.stderr).into_owned()
    }
    pub fn code(&self) -> Option<i32> {
        self.output.status.code()
    }
    /// Panics with the whole stderr unless the run succeeded.
    pub fn assert_ok(&self, what: &str) {
        assert!(
            self.output.status.success(),
            "{what} failed ({:?}):\n{}",
            self.output.status,
            self.stderr()
        );
    }
}

/// Runs the debimg binary with `args`.
pub fn debimg(args: &[&str]) -> Run {
    let t = Instant::now();
    let output = Command::new(env!("CARGO_BIN_EXE_debimg"))
        .args(args)
        .output()
        .expect("running debimg");
    Run {
        output,
        elapsed: t.elapsed(),
    }
}

/// The package and base-tree cache every test build shares (concurrent use is part of the
/// design), kept across runs like a build host's.
pub const TEST_CACHE: &str = "/var/tmp/debimg-test-cache";

/// `debimg build SPEC -o OUT --build-dir BUILD --cache-dir TEST_CACHE [extra...]` (a
/// `--cache-dir` or `--no-cache` in `extra` replaces the shared test cache).
pub fn build(spec: &Path, out: &Path, build_dir: &Path, extra: &[&str]) -> Run {
    let t = Instant::now();
    let output = build_command(spec, out, build_dir, extra)
        .output()
        .expect("running debimg");
    Run {
        output,
        elapsed: t.elapsed(),
    }
}

/// The command `build` runs, for tests that drive the process themselves.
pub fn build_command(spec: &Path, out: &Path, build_dir: &Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_debimg"));
    cmd.arg("build")
        .arg(spec)
        .arg("-o")
        .arg(out)
        .arg("--build-dir")
        .arg(build_dir);
    if !extra.contains(&"--no-cache") && !extra.contains(&"--cache-dir") {
        cmd.args(["--cache-dir", TEST_CACHE]);
    }
    cmd.args(extra);
    cmd
}

/// Pids of processes whose root directory is `dir` or inside it.
pub fn processes_rooted_under(dir: &Path) -> Vec<i32> {
    let mut found = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return found;
    };
    for e in rd.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if let Ok(root) = std::fs::read_link(e.path().join("root"))
            && root.starts_with(dir)
        {
            found.push(pid);
        }
    }
    found
}

/// Name and sha256 of every file in `dir` except the lock, sorted.
pub fn dir_digest(dir: &Path) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != ".debimg.lock")
        .map(|n| {
            let sha = sums(&dir.join(&n)).1;
            (n, sha)
        })
        .collect();
    v.sort();
    v
}

/// Checks that a metadata file and the images it names agree (sizes and md5s), without
/// unpacking: the output directory holds one complete result.
pub fn assert_consistent_result(out: &Path, metadata_name: &str) {
    let meta = Metadata::read(&out.join(metadata_name)).unwrap();
    for img in &meta.images {
        let p = out.join(&img.container_name);
        assert_eq!(
            std::fs::metadata(&p).unwrap().len(),
            img.container_size,
            "{}",
            p.display()
        );
        assert_eq!(sums(&p).0, img.container_md5, "{}", p.display());
    }
}

/// Whether `needle` occurs in `haystack` (a marker in a file's bytes).
pub fn contains_bytes(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Runs a host tool and returns its stdout; panics with its stderr on failure.
pub fn tool(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn first_word(s: &str) -> String {
    s.split_whitespace().next().unwrap_or("").to_string()
}

/// md5 and sha256 of a file by coreutils, independent of debimg's own hashing.
pub fn sums(path: &Path) -> (String, String) {
    let p = path.to_str().unwrap();
    (
        first_word(&tool("md5sum", &[p])),
        first_word(&tool("sha256sum", &[p])),
    )
}

/// Every loop device whose backing file is under `dir`.
pub fn loops_backed_under(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/sys/block") else {
        return found;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("loop") {
            continue;
        }
        if let Ok(b) = std::fs::read_to_string(e.path().join("loop/backing_file"))
            && Path::new(b.trim()).starts_with(dir)
        {
            found.push(format!("/dev/{name} -> {}", b.trim()));
        }
    }
    found
}

/// Asserts that a finished build (pass or fail) left nothing: its build dir is empty, no loop
/// device is backed by a file in it, nothing is mounted under it, no temp file sits in `out`.
pub fn assert_no_leftovers(build_dir: &Path, out: &Path) {
    let left: Vec<_> = std::fs::read_dir(build_dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "the build dir still holds {left:?}");
    let loops = loops_backed_under(build_dir);
    assert!(loops.is_empty(), "loop devices left attached: {loops:?}");
    let procs = processes_rooted_under(build_dir);
    assert!(procs.is_empty(), "processes left in the chroot: {procs:?}");
    let mounts = mount::mount_points_under(build_dir).unwrap();
    assert!(mounts.is_empty(), "mounts left: {mounts:?}");
    if out.exists() {
        let temps: Vec<_> = std::fs::read_dir(out)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| {
                [".tmp-", ".pub-", ".old-", ".publish"]
                    .iter()
                    .any(|k| n.contains(k))
            })
            .collect();
        assert!(
            temps.is_empty(),
            "partial files in the output dir: {temps:?}"
        );
    }
}

/// Checks every image against its metadata with independent tools and returns the raw images
/// (gunzipped where needed) in `scratch`, in metadata order.
pub fn check_outputs(out: &Path, meta: &Metadata, scratch: &Path) -> Vec<PathBuf> {
    let mut raws = Vec::new();
    for img in &meta.images {
        let container = out.join(&img.container_name);
        let len = std::fs::metadata(&container).unwrap().len();
        assert_eq!(
            len, img.container_size,
            "{}: container_size",
            img.container_name
        );
        let (md5, sha) = sums(&container);
        assert_eq!(
            md5, img.container_md5,
            "{}: container_md5",
            img.container_name
        );
        assert_eq!(
            sha, img.container_sha256,
            "{}: container_sha256",
            img.container_name
        );
        let raw = scratch.join(&img.raw_name);
        match img.container.as_str() {
            "gzip" => {
                tool("gzip", &["-t", container.to_str().unwrap()]);
                let f = std::fs::File::create(&raw).unwrap();
                let st = Command::new("gzip")
                    .args(["-dc", container.to_str().unwrap()])
                    .stdout(f)
                    .status()
                    .unwrap();
                assert!(st.success(), "gunzip {}", container.display());
            }
            "raw" => {
                assert_eq!(img.container_md5, img.raw_md5);
                std::fs::copy(&container, &raw).unwrap();
            }
            other => panic!("unknown container {other}"),
        }
        assert_eq!(
            std::fs::metadata(&raw).unwrap().len(),
            img.raw_size,
            "{}: raw_size",
            img.raw_name
        );
        let (md5, sha) = sums(&raw);
        assert_eq!(md5, img.raw_md5, "{}: raw_md5", img.raw_name);
        assert_eq!(sha, img.raw_sha256, "{}: raw_sha256", img.raw_name);
        fsck(&raw, &img.format);
        raws.push(raw);
    }
    raws
}

/// The filesystem checker, read-only: e2fsck -fn or xfs_repair -n.
pub fn fsck(raw: &Path, format: &str) {
    let p = raw.to_str().unwrap();
    match format {
        "ext2" | "ext3" | "ext4" => {
            tool("e2fsck", &["-fn", p]);
        }
        "xfs" => {
            tool("xfs_repair", &["-n", "-f", p]);
        }
        other => panic!("no checker for {other}"),
    }
}

/// Moves the calling thread (once) into a mount namespace of its own in which every mount is
/// private, so that what a test mounts to look into an image is seen by no build another test
/// starts meanwhile. A build unshares its own namespace from the host's and so copies the host's
/// mounts: its copy of a test's mount would hold the test's loop device open after the test
/// unmounted its own, until that build ended. What the thread starts afterwards (debimg, a
/// server) starts in the thread's namespace.
pub fn private_mounts() {
    thread_local!(static PRIVATE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) });
    if PRIVATE.get() {
        return;
    }
    // CLONE_NEWNS takes the calling thread's filesystem information with it (CLONE_FS): the
    // other threads of the test binary stay where they are.
    debimg::sys::namespace::unshare_private(nix::sched::CloneFlags::CLONE_NEWNS)
        .expect("a private mount namespace for the test thread");
    PRIVATE.set(true);
}

/// Built images mounted read-only in mount order, like the target system would see them.
pub struct MountedTree {
    pub root: tempfile::TempDir,
    mounts: Vec<Mount>,
    loops: Vec<LoopDevice>,
}

impl MountedTree {
    /// Mounts `raws` (in metadata order) at their `mount` points below a temp dir.
    pub fn mount(meta: &Metadata, raws: &[PathBuf]) -> MountedTree {
        private_mounts();
        let mut t = MountedTree {
            root: scratch("mnt"),
            mounts: Vec::new(),
            loops: Vec::new(),
        };
        let mut order: Vec<usize> = (0..meta.images.len()).collect();
        order.sort_by_key(|&i| debimg::plan::mount_depth(&meta.images[i].mount));
        for i in order {
            let img = &meta.images[i];
            let dev = loopdev::attach(&raws[i], true).unwrap();
            let target = t.root.path().join(img.mount.trim_start_matches('/'));
            let m = mount::mount(
                dev.path().to_str().unwrap(),
                &target,
                Some(&img.format),
                MsFlags::MS_RDONLY,
                None,
            )
            .unwrap_or_else(|e| panic!("mounting {} at {}: {e:#}", img.raw_name, img.mount));
            t.loops.push(dev);
            t.mounts.push(m);
        }
        t
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.root.path().join(rel.trim_start_matches('/'))
    }

    pub fn read(&self, rel: &str) -> String {
        std::fs::read_to_string(self.path(rel))
            .unwrap_or_else(|e| panic!("reading {rel} in the image: {e}"))
    }
}

impl Drop for MountedTree {
    fn drop(&mut self) {
        while let Some(m) = self.mounts.pop() {
            if let Err(e) = m.close() {
                eprintln!("{e:#}");
            }
        }
        while let Some(l) = self.loops.pop() {
            if let Err(e) = l.close() {
                eprintln!("{e:#}");
            }
        }
    }
}

/// Installed packages and versions from a dpkg status file.
pub fn dpkg_installed(status: &str) -> std::collections::BTreeMap<String, String> {
    let mut out = std::collections::BTreeMap::new();
    for stanza in status.split("\n\n") {
        let field = |name: &str| {
            stanza
                .lines()
                .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
        };
        if let (Some(p), Some(v), Some(s)) =
            (field("Package:"), field("Version:"), field("Status:"))
            && s == "install ok installed"
        {
            out.insert(p, v);
        }
    }
    out
}

/// What a package built by [`build_deb`] holds.
pub enum DebEntry<'a> {
    /// A regular file (path in the image, content, mode).
    File(&'a str, &'a [u8], u32),
    /// A symlink (path in the image, target as written).
    Symlink(&'a str, &'a str),
}

/// Builds `<name>_<version>_all.deb` in `dir` with dpkg-deb from `entries` (owned by root);
/// `control` adds fields to the generated control file. Returns its path.
pub fn build_deb(
    dir: &Path,
    name: &str,
    version: &str,
    control: &str,
    entries: &[DebEntry],
) -> PathBuf {
    let stage = tempfile::Builder::new()
        .prefix("debimg-test-deb-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let tree = stage.path().join("pkg");
    std::fs::create_dir_all(tree.join("DEBIAN")).unwrap();
    std::fs::write(
        tree.join("DEBIAN/control"),
        format!(
            "Package: {name}\nVersion: {version}\nArchitecture: all\nMaintainer: debimg tests <tests@debimg.invalid>\nDescription: debimg test package\n{control}"
        ),
    )
    .unwrap();
    for e in entries {
        match e {
            DebEntry::File(path, content, mode) => {
                let p = tree.join(path.trim_start_matches('/'));
                std::fs::create_dir_all(p.parent().unwrap()).unwrap();
                std::fs::write(&p, content).unwrap();
                std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(*mode))
                    .unwrap();
            }
            DebEntry::Symlink(path, target) => {
                let p = tree.join(path.trim_start_matches('/'));
                std::fs::create_dir_all(p.parent().unwrap()).unwrap();
                std::os::unix::fs::symlink(target, &p).unwrap();
            }
        }
    }
    let deb = dir.join(format!("{name}_{version}_all.deb"));
    tool(
        "dpkg-deb",
        &[
            "--root-owner-group",
            "-Zgzip",
            "--build",
            tree.to_str().unwrap(),
            deb.to_str().unwrap(),
        ],
    );
    deb
}

/// A flat directory of `.deb` files made into an apt repository at `dir`:
/// `dists/<suite>/<component>/binary-all/Packages` and an unsigned `Release` with the origin,
/// label and codename apt pins on (`debimg-test`, `<suite>`).
pub fn make_repo(dir: &Path, suite: &str, component: &str, debs: &[PathBuf]) {
    let pool = dir.join("pool");
    std::fs::create_dir_all(&pool).unwrap();
    let mut packages = String::new();
    for deb in debs {
        let name = deb.file_name().unwrap().to_str().unwrap();
        std::fs::copy(deb, pool.join(name)).unwrap();
        let control = tool("dpkg-deb", &["-f", deb.to_str().unwrap()]);
        let (md5, sha) = sums(deb);
        let size = std::fs::metadata(deb).unwrap().len();
        packages.push_str(control.trim_end());
        packages.push_str(&format!(
            "\nFilename: pool/{name}\nSize: {size}\nMD5sum: {md5}\nSHA256: {sha}\n\n"
        ));
    }
    let rel = format!("{component}/binary-all/Packages");
    let index = dir.join("dists").join(suite).join(&rel);
    std::fs::create_dir_all(index.parent().unwrap()).unwrap();
    std::fs::write(&index, &packages).unwrap();
    let (md5, sha) = sums(&index);
    let size = packages.len();
    std::fs::write(
        dir.join("dists").join(suite).join("Release"),
        format!(
            "Origin: debimg-test\nLabel: debimg-test\nSuite: {suite}\nCodename: {suite}\n\
             Date: Thu, 26 Nov 2026 00:00:00 UTC\nArchitectures: amd64 all\nComponents: {component}\n\
             Description: debimg test repository\nMD5Sum:\n {md5} {size} {rel}\nSHA256:\n {sha} {size} {rel}\n"
        ),
    )
    .unwrap();
}

/// A static file server for a test repository on 127.0.0.1 (a build's chroot shares the host's
/// network): GET and HEAD of the files under a directory, 404 for anything else. Stops on drop.
pub struct StaticServer {
    pub port: u16,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl StaticServer {
    /// Serves `dir`.
    pub fn start(dir: &Path) -> StaticServer {
        use std::sync::atomic::{AtomicBool, Ordering};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let (dir, flag) = (dir.to_path_buf(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let dir = dir.clone();
                        std::thread::spawn(move || serve_one(conn, &dir));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    Err(_) => break,
                }
            }
        });
        StaticServer {
            port,
            stop,
            thread: Some(thread),
        }
    }

    /// The repository's URL.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for StaticServer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `%xx` escapes of a request path decoded (apt writes `~` as `%7e`).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(v);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn serve_one(conn: std::net::TcpStream, dir: &Path) {
    use std::io::{BufRead, Write};
    conn.set_nonblocking(false).ok();
    conn.set_read_timeout(Some(Duration::from_secs(30))).ok();
    let mut reader = std::io::BufReader::new(conn.try_clone().unwrap());
    let mut out = conn;
    // HTTP/1.1 keep-alive: answer requests until the client closes.
    loop {
        let mut request = String::new();
        if reader.read_line(&mut request).unwrap_or(0) == 0 {
            return;
        }
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header).unwrap_or(0) == 0 {
                return;
            }
            if header == "\r\n" || header == "\n" {
                break;
            }
        }
        let mut parts = request.split_whitespace();
        let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or("/"));
        let rel = percent_decode(target.split('?').next().unwrap_or(""));
        let rel = rel.trim_start_matches('/');
        let file = (!rel.split('/').any(|c| c == ".." || c.is_empty()))
            .then(|| dir.join(rel))
            .filter(|p| p.is_file());
        let res = match file {
            Some(p) => {
                let body = std::fs::read(p).unwrap_or_default();
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\n\r\n",
                    body.len()
                );
                out.write_all(head.as_bytes()).and_then(|()| {
                    if method == "HEAD" {
                        Ok(())
                    } else {
                        out.write_all(&body)
                    }
                })
            }
            None => out.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"),
        };
        if res.is_err() {
            return;
        }
    }
}

/// The host mirror's URL for bookworm, as debimg's `mirror: host` finds it.
pub fn host_mirror() -> String {
    let sources = debimg::debian::mirror::read_host_sources(Path::new("/")).unwrap();
    debimg::debian::mirror::resolve_host_uri(&sources, "bookworm").unwrap()
}

/// The SBOM validators' versions, in the name of their environment: another version, another
/// environment.
const SBOM_VALIDATORS: [&str; 2] = [
    "spdx-tools==0.8.5",
    "cyclonedx-python-lib[json-validation]==11.12.0",
];

/// The SBOM validators of the SPDX project (`spdx-tools`) and CycloneDX
/// (`cyclonedx-python-lib` with JSON validation), from PyPI into a virtual environment kept
/// beside the test cache: its directory (`bin/pyspdxtools`, `bin/python`). Made once; the
/// marker file written last tells a finished one from one a killed run left half made.
pub fn sbom_validators() -> PathBuf {
    let venv = PathBuf::from("/var/tmp/debimg-test-sbom-venv-spdx0.8.5-cdx11.12.0");
    let ready = venv.join(".debimg-ready");
    if ready.exists() {
        return venv;
    }
    if venv.exists() {
        std::fs::remove_dir_all(&venv).unwrap();
    }
    tool("/usr/bin/python3", &["-m", "venv", venv.to_str().unwrap()]);
    tool(
        venv.join("bin/pip").to_str().unwrap(),
        &["install", "-q", SBOM_VALIDATORS[0], SBOM_VALIDATORS[1]],
    );
    std::fs::write(&ready, "").unwrap();
    venv
}

/// Validates an SPDX 2.3 and a CycloneDX 1.5 JSON document with the reference tools; panics
/// with their findings.
pub fn validate_sboms(spdx: &Path, cyclonedx: &Path) {
    let venv = sbom_validators();
    tool(
        venv.join("bin/pyspdxtools").to_str().unwrap(),
        &["-i", spdx.to_str().unwrap()],
    );
    let check = "import sys\n\
        from cyclonedx.schema import SchemaVersion\n\
        from cyclonedx.validation.json import JsonStrictValidator\n\
        errors = JsonStrictValidator(SchemaVersion.V1_5).validate_str(open(sys.argv[1]).read())\n\
        sys.exit(str(errors) if errors else 0)\n";
    tool(
        venv.join("bin/python").to_str().unwrap(),
        &["-c", check, cyclonedx.to_str().unwrap()],
    );
}

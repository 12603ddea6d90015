//! Builds inside a throwaway virtual machine: `debimg build --vm`.
//!
//! A chroot is no boundary: the spec's scripts and every package's maintainer scripts run as
//! root. With `--vm` the whole build runs, unchanged, as `debimg build` inside a qemu machine
//! that boots the builder appliance ([`appliance`]); this host attaches no loop device, mounts
//! nothing of the build and runs none of its code. What crosses the boundary:
//!
//! - In, read-only: one tar on a raw disk (serial `debimg-input`) with this debimg binary, the
//!   guest script (`guest.sh`), the arguments, and the files the spec names on this host placed
//!   at the same paths (so that for `files[].source`, `local_debs`, `file://` repos, key files
//!   and `mirror: host` the machine is "the host"); the package cache as a read-only 9p share,
//!   which the guest overlays with a writable layer on its scratch disk. Nothing the machine
//!   writes goes back into the cache.
//! - A scratch disk (serial `debimg-scratch`), sparse, of the disk budget, formatted in the
//!   guest: the build's workspace and its output directory.
//! - Out: one tar on a raw disk (serial `debimg-output`) with `status` (the guest build's exit
//!   code) and `out/`, what the guest build hands off after its finish stage (`--hand-off`:
//!   the staged raw images, records and attachments, described in `out/handoff.json`). This
//!   host reads that tar as data, with its own strict reader (`untar`: files, sparse files
//!   and directories only, nothing held in memory), names checked, the handoff checked against
//!   this host's plan; only then does it package and publish the files, the metadata last, as
//!   a host build does.
//! - The guest's events (JSON lines) and its log arrive on two virtio serial ports; only stage
//!   events are passed on, and the log's control characters are masked.
//!
//! Every disk file is unlinked from the start (`O_TMPFILE`) and reaches qemu as an inherited
//! descriptor; the appliance's root is opened with `snapshot=on` (qemu's own unlinked
//! overlay). qemu runs in its own process group, dies with debimg (`PR_SET_PDEATHSIG`), is
//! killed on INT, TERM or HUP and when the wall-clock limit passes: a killed build leaves no
//! file behind, and nothing reaches the output directory before the result is complete.

pub mod appliance;
pub mod egress;
mod untar;

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::boottest::{Accel, kvm_usable};
use crate::creator::{self, BuildOptions, Handoff, Outcome, run_stage};
use crate::error::{Error, ErrorKind};
use crate::event::{self, Event};
use crate::metadata::Metadata;
use crate::output::OutputLock;
use crate::output::publish::reusable;
use crate::plan::Plan;
use crate::spec::Spec;
use crate::stage::Stage;
use crate::workspace::Workspace;

/// The script the guest runs (see its header).
const GUEST_SCRIPT: &str = include_str!("guest.sh");

/// The console line the guest prints once its init runs: the machine is alive.
const UP_MARKER: &str = "debimg-vm: up";

/// How long a KVM machine may take to print [`UP_MARKER`] before KVM is taken for one that
/// does not work (this project's hosts have a `/dev/kvm` whose guests hang after the
/// firmware) and the machine is started again with software emulation.
const KVM_PROBE: Duration = Duration::from_secs(30);

/// The most files a machine may hand off.
const MAX_FILES: usize = 100_000;

/// The largest metadata file taken from the machine.
const MAX_METADATA_BYTES: u64 = 16 << 20;

/// The longest line of the guest's events or log passed on as one.
const MAX_LINE: usize = 64 << 10;

/// How a `--vm` build's machine is made.
#[derive(Debug, Clone)]
pub struct VmOptions {
    /// Memory of the machine, in MiB.
    pub memory_mib: u32,
    /// Virtual CPUs.
    pub cpus: u32,
    /// Size of the scratch disk: the workspace and the outputs must fit in it.
    pub disk_bytes: u64,
    /// Wall-clock limit of the machine, from its start.
    pub timeout: Option<Duration>,
    pub accel: Accel,
    /// Where the appliance is cached (`<cache-dir>/vm`).
    pub appliance_dir: PathBuf,
    /// The spec comes from someone this host does not trust: no file it names here is read or
    /// sent in (its paths resolve inside the machine), and the host's apt sources go in only
    /// when it asks for `host`.
    pub untrusted: bool,
}

impl VmOptions {
    /// The defaults: 2 GiB, every CPU (at most 8), a 32 GiB sparse scratch disk, no time
    /// limit, KVM when it works.
    pub fn new(appliance_dir: PathBuf) -> VmOptions {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get().min(8) as u32);
        VmOptions {
            memory_mib: 2048,
            cpus,
            disk_bytes: 32 << 30,
            timeout: None,
            accel: Accel::Auto,
            appliance_dir,
            untrusted: false,
        }
    }
}

/// `spec` as this host may plan it when it comes from someone it does not trust: every file
/// it names here left out (inline empty content, no local packages, no key files), so that
/// planning reads nothing of this host. Its digest is not the machine's.
pub fn without_host_files(spec: &Spec) -> Spec {
    let mut s = spec.clone();
    for f in &mut s.files {
        if f.source.take().is_some() {
            f.content = Some(String::new());
        }
    }
    s.local_debs.clear();
    s.lock = None;
    for r in &mut s.repos {
        if r.key.is_some() && !r.key_is_inline() {
            r.key = None;
        }
    }
    s
}

/// Builds `plan` (read from `spec` at `spec_path`, whose text is `spec_text`) inside a
/// machine and publishes its outputs into `opts.output_dir`, as [`crate::creator::Creator`]
/// would have. Reuses a matching output without starting a machine.
pub fn create(
    plan: &Plan,
    spec: &Spec,
    spec_path: &Path,
    spec_text: &str,
    opts: &BuildOptions,
    vm: &VmOptions,
) -> Result<Outcome, Error> {
    let boundary = |e| Error::classify(e, None);
    if plan.lock.is_some() {
        return Err(boundary(anyhow::anyhow!(
            "a build from a lock (`lock:`, `--lock`) does not run in a machine yet: build it \
             without --vm"
        )));
    }
    let metadata_path = opts.output_dir.join(plan.metadata_name());
    if !opts.force
        && let Some(metadata) = reusable(plan, &opts.output_dir)
    {
        return Ok(Outcome {
            reused: true,
            metadata_path,
            metadata,
        });
    }
    std::fs::create_dir_all(&opts.output_dir)
        .with_context(|| format!("creating {}", opts.output_dir.display()))
        .map_err(boundary)?;
    let lock = OutputLock::acquire(&opts.output_dir, opts.wait).map_err(boundary)?;
    // What builds killed in this build directory left, as a host build sweeps it.
    crate::workspace::clean_stale_workspaces(&opts.build_dir);
    let appliance = appliance::ensure(&vm.appliance_dir, &opts.build_dir).map_err(boundary)?;
    let cache = match &opts.cache_dir {
        Some(dir) => Some(
            crate::cache::Cache::open(dir)
                .map_err(boundary)?
                .dir()
                .to_path_buf(),
        ),
        None => None,
    };
    let input = make_input(plan, spec, spec_path, spec_text, opts, vm, cache.is_some())
        .map_err(boundary)?;
    let mut result = run_machine(&appliance, &input, cache.as_deref(), opts, vm)?;
    result.expect_digest = (!vm.untrusted).then(|| plan.digest.clone());
    let metadata = publish(&result, plan, lock, &opts.build_dir, vm.disk_bytes)?;
    Ok(Outcome {
        reused: false,
        metadata_path,
        metadata,
    })
}

/// The files of one machine's input, on an unlinked file; for an untrusted spec, the only
/// endpoints its machine may reach.
struct Input {
    tar: File,
    egress: Option<Vec<egress::Endpoint>>,
}

/// Writes the input tar: the guest script, this binary, the arguments of the guest's build,
/// the working directory, and the host files the spec names, at their paths.
fn make_input(
    plan: &Plan,
    spec: &Spec,
    spec_path: &Path,
    spec_text: &str,
    opts: &BuildOptions,
    vm: &VmOptions,
    with_cache: bool,
) -> Result<Input> {
    let build_dir = &opts.build_dir;
    let file = tempfile::tempfile_in(build_dir)
        .with_context(|| format!("creating the machine's input in {}", build_dir.display()))?;
    let mut tar = tar::Builder::new(file);
    tar.mode(tar::HeaderMode::Deterministic);
    let add = |tar: &mut tar::Builder<File>, name: &str, bytes: &[u8], mode: u32| -> Result<()> {
        let mut h = tar::Header::new_gnu();
        h.set_size(bytes.len() as u64);
        h.set_mode(mode);
        h.set_entry_type(tar::EntryType::Regular);
        tar.append_data(&mut h, name, bytes)
            .with_context(|| format!("adding {name} to the machine's input"))
    };
    add(&mut tar, "guest.sh", GUEST_SCRIPT.as_bytes(), 0o755)?;
    let exe = std::env::current_exe().context("finding the debimg binary")?;
    let mut bin = File::open("/proc/self/exe").context("opening the debimg binary")?;
    let mut h = tar::Header::new_gnu();
    h.set_size(bin.metadata()?.len());
    h.set_mode(0o755);
    tar.append_data(&mut h, "debimg", &mut bin)
        .with_context(|| format!("adding {} to the machine's input", exe.display()))?;
    let cwd = if vm.untrusted {
        PathBuf::from("/")
    } else {
        std::env::current_dir().context("finding the working directory")?
    };
    let spec_abs = if vm.untrusted {
        PathBuf::from("/run/debimg-spec.yaml")
    } else {
        std::path::absolute(spec_path)?
    };
    let mut args: Vec<String> = vec![
        "build".into(),
        text_arg(&spec_abs)?,
        "--output".into(),
        "/scratch/out".into(),
        "--build-dir".into(),
        "/scratch/build".into(),
        "--message-format".into(),
        "json".into(),
        "--hand-off".into(),
        "--bootstrap".into(),
        plan.backend.name().into(),
    ];
    if with_cache {
        // The cache is read-only inside the machine (an overlay takes what it writes): a tree
        // stored there would be lost, and restoring one through 9p costs more than apt.
        args.extend([
            "--cache-dir".into(),
            crate::creator::DEFAULT_CACHE_DIR.into(),
            "--no-tree-cache".into(),
        ]);
    } else {
        args.push("--no-cache".into());
    }
    if !opts.show_progress {
        args.push("--quiet".into());
    }
    // A stranger's machine reaches the spec's mirrors through this host's proxy, and nothing
    // else (see `egress`).
    let egress = if vm.untrusted {
        args.extend([
            "--through-proxy".into(),
            format!("http://{}", egress::PROXY_ADDR),
        ]);
        Some(egress::endpoints(spec)?)
    } else {
        None
    };
    add(&mut tar, "args", (args.join("\n") + "\n").as_bytes(), 0o644)?;
    add(&mut tar, "cwd", (text_arg(&cwd)? + "\n").as_bytes(), 0o644)?;
    let features = if with_cache { "cache\n" } else { "" };
    add(&mut tar, "features", features.as_bytes(), 0o644)?;
    // The spec as read (a release's ID already in it), at its path.
    add(
        &mut tar,
        &format!("root{}", text_arg(&spec_abs)?),
        spec_text.as_bytes(),
        0o644,
    )?;
    let paths = if vm.untrusted {
        host_apt_sources(spec)
    } else {
        host_paths(plan, spec, &cwd)
    };
    for path in paths {
        let name = format!("root{}", text_arg(&path)?);
        let meta =
            std::fs::metadata(&path).with_context(|| format!("reading {}", path.display()))?;
        if meta.is_dir() {
            tar.append_dir_all(&name, &path)
                .with_context(|| format!("adding {} to the machine's input", path.display()))?;
        } else {
            tar.append_path_with_name(&path, &name)
                .with_context(|| format!("adding {} to the machine's input", path.display()))?;
        }
    }
    let mut file = tar.into_inner().context("finishing the machine's input")?;
    file.flush()?;
    file.rewind()?;
    Ok(Input { tar: file, egress })
}

/// A path as one line of text for the guest script.
fn text_arg(path: &Path) -> Result<String> {
    let s = path.to_str().with_context(|| {
        format!(
            "{} is not UTF-8: a --vm build cannot name it",
            path.display()
        )
    })?;
    if s.contains('\n') {
        bail!("{s:?} holds a line break: a --vm build cannot name it");
    }
    Ok(s.to_string())
}

/// The host files and directories the spec reads, as the guest will look for them: sources
/// of `files`, `local_debs`, key files, `file://` mirrors and repositories, and the host's
/// apt sources (for `mirror: host`).
fn host_paths(plan: &Plan, spec: &Spec, cwd: &Path) -> Vec<PathBuf> {
    let base = cwd.join(&spec.base_dir);
    let mut out: Vec<PathBuf> = Vec::new();
    for f in &spec.files {
        if let Some(src) = &f.source {
            out.push(base.join(src));
        }
    }
    for d in &spec.local_debs {
        out.push(base.join(d));
    }
    for r in &spec.repos {
        if let Some(k) = &r.key
            && !r.key_is_inline()
        {
            out.push(base.join(k));
        }
        if let Some(u) = r.uri.as_deref().and_then(|u| u.strip_prefix("file://")) {
            out.push(PathBuf::from(u));
        }
    }
    if let Some(u) = spec.mirror.strip_prefix("file://") {
        out.push(PathBuf::from(u));
    }
    let _ = plan;
    out.extend(apt_sources());
    out.iter()
        .map(|p| std::path::absolute(p).unwrap_or_else(|_| p.clone()))
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect()
}

/// The host's apt sources when `spec` asks for them (`mirror: host`, `uri: host`).
fn host_apt_sources(spec: &Spec) -> Vec<PathBuf> {
    let wants =
        spec.mirror == "host" || spec.repos.iter().any(|r| r.uri.as_deref() == Some("host"));
    if wants { apt_sources() } else { Vec::new() }
}

/// The files of this host's apt sources.
fn apt_sources() -> Vec<PathBuf> {
    let mut out = Vec::new();
    let apt = Path::new("/etc/apt");
    if apt.join("sources.list").is_file() {
        out.push(apt.join("sources.list"));
    }
    if let Ok(entries) = std::fs::read_dir(apt.join("sources.list.d")) {
        for e in entries.flatten() {
            let p = e.path();
            if matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("list" | "sources")
            ) {
                out.push(p);
            }
        }
    }
    out
}

/// What a machine left: its output disk, and what it said.
struct MachineResult {
    output: File,
    /// The guest build's error, from its `build-finished` event.
    guest_error: Option<serde_json::Value>,
    /// The spec digest the guest planned (its `build-started` event), and the one this host
    /// expects it to (none for an untrusted spec, planned here without its files).
    guest_digest: Option<String>,
    expect_digest: Option<String>,
    console: String,
}

/// The disks of one machine.
struct Disks {
    input: File,
    scratch: File,
    output: File,
    /// The endpoints the machine may reach, when it is restricted to them.
    egress: Option<Vec<egress::Endpoint>>,
}

/// Runs the machine (probing KVM when asked) until it powers off; fails when it ends without
/// a result, with the guest build's error, or when a limit or a signal stopped it.
fn run_machine(
    appliance: &appliance::Appliance,
    input: &Input,
    cache: Option<&Path>,
    opts: &BuildOptions,
    vm: &VmOptions,
) -> Result<MachineResult, Error> {
    let boundary = |e| Error::classify(e, None);
    let new_disks = || -> Result<Disks> {
        let scratch = tempfile::tempfile_in(&opts.build_dir)?;
        scratch.set_len(vm.disk_bytes)?;
        let output = tempfile::tempfile_in(&opts.build_dir)?;
        // The outputs fit on the scratch disk; their tar a little more.
        output.set_len(vm.disk_bytes + (64 << 20))?;
        Ok(Disks {
            input: input.tar.try_clone()?,
            scratch,
            output,
            egress: input.egress.clone(),
        })
    };
    let kvm = match vm.accel {
        Accel::Kvm => true,
        Accel::Tcg => false,
        Accel::Auto => kvm_usable() && !kvm_known_broken(&vm.appliance_dir),
    };
    if kvm {
        let disks = new_disks().map_err(boundary)?;
        let probe = (vm.accel == Accel::Auto).then_some(KVM_PROBE);
        match boot(appliance, &disks, cache, opts, vm, true, probe)? {
            Boot::Done(r) => return finish(r, disks, vm),
            Boot::Silent => {
                tracing::warn!(
                    "the KVM machine did not come up in {}s (a nested or restricted KVM); starting it again with software emulation (and so until this host restarts)",
                    KVM_PROBE.as_secs()
                );
                remember_kvm_broken(&vm.appliance_dir);
            }
        }
    }
    let disks = new_disks().map_err(boundary)?;
    match boot(appliance, &disks, cache, opts, vm, false, None)? {
        Boot::Done(r) => finish(r, disks, vm),
        Boot::Silent => unreachable!("only a probed KVM machine gives up on silence"),
    }
}

/// Records, in the appliance directory, that KVM machines do not come up on this host until
/// it restarts: later `auto` builds go straight to software emulation.
const KVM_BROKEN: &str = "kvm-unusable";

fn boot_id() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|s| s.trim().to_string())
}

fn kvm_known_broken(dir: &Path) -> bool {
    let Some(id) = boot_id() else { return false };
    crate::output::OutputDir::open(dir)
        .and_then(|d| d.open_regular(KVM_BROKEN))
        .ok()
        .and_then(|mut f| {
            let mut s = String::new();
            f.read_to_string(&mut s).ok()?;
            Some(s.trim() == id)
        })
        .unwrap_or(false)
}

fn remember_kvm_broken(dir: &Path) {
    if let Some(id) = boot_id()
        && let Err(e) =
            crate::output::write_atomic(dir, KVM_BROKEN, format!("{id}\n").as_bytes(), 0o644)
    {
        tracing::warn!("{e:#}");
    }
}

/// A machine that powered off: its console and the guest's error.
struct Ended {
    console: String,
    report: GuestReport,
}

/// What the guest's events said of its build.
#[derive(Debug, Default)]
struct GuestReport {
    /// Its `build-finished` error.
    error: Option<serde_json::Value>,
    /// Its `build-started` spec digest.
    digest: Option<String>,
}

enum Boot {
    Done(Ended),
    /// A KVM machine that never came up: try software emulation.
    Silent,
}

fn finish(r: Ended, disks: Disks, _vm: &VmOptions) -> Result<MachineResult, Error> {
    Ok(MachineResult {
        output: disks.output,
        guest_error: r.report.error,
        guest_digest: r.report.digest,
        expect_digest: None,
        console: r.console,
    })
}

/// A pipe whose write end a child inherits; the read end stays here.
fn pipe() -> Result<(File, OwnedFd)> {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).context("creating a pipe")?;
    Ok((File::from(r), w))
}

fn boot(
    appliance: &appliance::Appliance,
    disks: &Disks,
    cache: Option<&Path>,
    opts: &BuildOptions,
    vm: &VmOptions,
    kvm: bool,
    probe: Option<Duration>,
) -> Result<Boot, Error> {
    let boundary = |e| Error::classify(e, None);
    let (events_r, events_w) = pipe().map_err(boundary)?;
    let (log_r, log_w) = pipe().map_err(boundary)?;
    let fd = |f: &dyn AsRawFd| format!("/dev/fd/{}", f.as_raw_fd());
    let drive = |path: &str, serial: &str, extra: &str| {
        format!(
            "file={},format=raw,if=none,id={serial},cache=unsafe,aio=threads{extra}",
            path.replace(',', ",,")
        )
    };
    let mut cmd = Command::new("qemu-system-x86_64");
    const CMDLINE: &str = "root=LABEL=debimg-vm rw console=ttyS0 init=/usr/local/sbin/debimg-vm-init panic=-1 quiet loglevel=4";
    cmd.args(["-machine", "q35", "-nodefaults", "-no-user-config"])
        .args([
            "-m",
            &vm.memory_mib.to_string(),
            "-smp",
            &vm.cpus.to_string(),
        ])
        .args(["-accel", if kvm { "kvm" } else { "tcg" }])
        .args(["-display", "none", "-monitor", "none", "-serial", "stdio"])
        .args(["-no-reboot"])
        .arg("-kernel")
        .arg(&appliance.kernel)
        .arg("-initrd")
        .arg(&appliance.initrd)
        .args(["-append", CMDLINE])
        .arg("-drive")
        .arg(format!(
            "file={},format=raw,if=virtio,snapshot=on,cache=unsafe",
            appliance.root.display().to_string().replace(',', ",,")
        ));
    for (file, serial, extra) in [
        (&disks.input, "debimg-input", ",readonly=on"),
        (&disks.scratch, "debimg-scratch", ""),
        (&disks.output, "debimg-output", ""),
    ] {
        cmd.arg("-drive")
            .arg(drive(&fd(file), serial, extra))
            .arg("-device")
            .arg(format!("virtio-blk-pci,drive={serial},serial={serial}"));
    }
    let nic = match &disks.egress {
        Some(allowed) => std::env::current_exe()
            .context("finding the debimg binary")
            .and_then(|exe| egress::nic(&exe, allowed))
            .map_err(boundary)?,
        None => "user,model=virtio-net-pci".to_string(),
    };
    cmd.args(["-nic", &nic])
        .args(["-device", "virtio-serial-pci"])
        .arg("-chardev")
        .arg(format!("file,id=events,path={}", fd(&events_w)))
        .args([
            "-device",
            "virtserialport,chardev=events,name=debimg.events",
        ])
        .arg("-chardev")
        .arg(format!("file,id=log,path={}", fd(&log_w)))
        .args(["-device", "virtserialport,chardev=log,name=debimg.log"]);
    if let Some(dir) = cache {
        cmd.arg("-virtfs").arg(format!(
            "local,path={},mount_tag=debimg.cache,security_model=none,readonly=on",
            dir.display().to_string().replace(',', ",,")
        ));
    }
    // qemu's own temporary files (the root's overlay) go where the build's disks are.
    cmd.env("TMPDIR", &opts.build_dir);
    crate::output::inherit_fds(
        &mut cmd,
        &[
            disks.input.as_fd(),
            disks.scratch.as_fd(),
            disks.output.as_fd(),
            events_w.as_fd(),
            log_w.as_fd(),
        ],
    );
    crate::cmd::die_with_parent(&mut cmd, libc::SIGKILL);
    tracing::info!(
        "starting the build machine ({}, {} MiB, {} CPUs, a {} GiB disk)",
        if kvm { "KVM" } else { "software emulation" },
        vm.memory_mib,
        vm.cpus,
        vm.disk_bytes >> 30
    );
    tracing::debug!("running {}", crate::cmd::command_line(&cmd));
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .context("starting qemu-system-x86_64 (apt-get install qemu-system-x86)")
        .map_err(boundary)?;
    drop(events_w);
    drop(log_w);
    let mut machine = Machine::new(&mut child);
    let console = Arc::new(Mutex::new(String::new()));
    let up = Arc::new(AtomicBool::new(false));
    let report = Arc::new(Mutex::new(GuestReport::default()));
    let stdout = child.stdout.take().expect("piped");
    let stderr = child.stderr.take().expect("piped");
    let readers = [
        {
            let console = console.clone();
            let up = up.clone();
            std::thread::spawn(move || read_console(stdout, &console, &up))
        },
        {
            let console = console.clone();
            std::thread::spawn(move || read_console(stderr, &console, &AtomicBool::new(false)))
        },
        {
            let report = report.clone();
            std::thread::spawn(move || read_events(events_r, &report))
        },
        std::thread::spawn(move || read_log(log_r)),
    ];
    let started = Instant::now();
    let stopped = loop {
        // First: a signal also reaches qemu (this build's process groups get it), which may
        // then end before this loop sees why.
        if let Some(sig) = crate::signals::interrupted() {
            break Stopped::Signal(sig);
        }
        match child.try_wait() {
            Ok(Some(status)) => match crate::signals::interrupted() {
                Some(sig) => break Stopped::Signal(sig),
                None => break Stopped::Exited(status),
            },
            Ok(None) => {}
            Err(e) => break Stopped::Failed(e.into()),
        }
        if let Some(limit) = vm.timeout
            && started.elapsed() > limit
        {
            break Stopped::TimeLimit(limit);
        }
        if let Some(p) = probe
            && !up.load(Ordering::SeqCst)
            && started.elapsed() > p
        {
            break Stopped::Silent;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let exited = matches!(stopped, Stopped::Exited(_));
    if !exited {
        machine.kill();
    }
    // A process not yet reaped keeps its group id: disarmed before the wait, never after.
    machine.disarm();
    let _ = child.wait();
    for r in readers {
        let _ = r.join();
    }
    let console = std::mem::take(&mut *console.lock().unwrap_or_else(|e| e.into_inner()));
    let report = std::mem::take(&mut *report.lock().unwrap_or_else(|e| e.into_inner()));
    match stopped {
        Stopped::Exited(status) if status.success() => Ok(Boot::Done(Ended { console, report })),
        Stopped::Exited(status) => Err(boundary(anyhow::anyhow!(
            "the build machine's qemu failed ({status}): {}",
            tail(&console, 20)
        ))),
        Stopped::Failed(e) => Err(boundary(e.context("waiting for qemu"))),
        Stopped::Signal(sig) => Err(boundary(anyhow::anyhow!(
            "the build machine was stopped (signal {sig})"
        ))),
        Stopped::TimeLimit(limit) => Err(Error::classify(
            Error::tagged(
                ErrorKind::LimitExceeded,
                format!(
                    "the build machine ran longer than its wall-clock limit of {}s (--vm-timeout) and was stopped",
                    limit.as_secs()
                ),
            ),
            None,
        )),
        Stopped::Silent => Ok(Boot::Silent),
    }
}

enum Stopped {
    Exited(std::process::ExitStatus),
    Failed(anyhow::Error),
    Signal(i32),
    TimeLimit(Duration),
    Silent,
}

/// qemu's process group, killed when this goes unless disarmed.
struct Machine {
    pgid: i32,
    group: Option<crate::signals::ChildGroup>,
}

impl Machine {
    fn new(child: &mut Child) -> Machine {
        let pgid = child.id() as i32;
        Machine {
            pgid,
            group: Some(crate::signals::ChildGroup::register(pgid)),
        }
    }

    fn kill(&self) {
        if self.group.is_some() {
            crate::signals::kill_group(self.pgid);
        }
    }

    /// Forgets the group before qemu is reaped: after that its id may be another's.
    fn disarm(&mut self) {
        self.group = None;
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        // A machine still running when its build gives up (a panic, an early return) goes.
        self.kill();
    }
}

/// Keeps the last 256 KiB of the console (and qemu's stderr) for errors; marks the machine up.
fn read_console(src: impl Read, console: &Mutex<String>, up: &AtomicBool) {
    let mut r = BufReader::new(src);
    let mut line = Vec::new();
    loop {
        line.clear();
        match (&mut r).take(MAX_LINE as u64).read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        // A serial console ends its lines with CR LF.
        let text = mask(String::from_utf8_lossy(&line).trim_end_matches(['\r', '\n']));
        let text = text.as_str();
        if text == UP_MARKER {
            up.store(true, Ordering::SeqCst);
        }
        tracing::debug!("vm: {text}");
        let mut c = console.lock().unwrap_or_else(|e| e.into_inner());
        c.push_str(text);
        c.push('\n');
        if c.len() > 256 << 10 {
            let cut = c.len() - (192 << 10);
            let cut = (cut..c.len())
                .find(|&i| c.is_char_boundary(i))
                .unwrap_or(c.len());
            c.drain(..cut);
        }
    }
}

/// Passes the guest's stage events on; keeps its `build-finished` error.
fn read_events(src: File, report: &Mutex<GuestReport>) {
    let mut r = BufReader::new(src);
    let mut line = Vec::new();
    loop {
        line.clear();
        match (&mut r).take(MAX_LINE as u64).read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(&line) else {
            continue;
        };
        let stage = || serde_json::from_value::<Stage>(v.get("stage")?.clone()).ok();
        match v.get("reason").and_then(|r| r.as_str()) {
            Some("stage-started") => {
                if let Some(stage) = stage() {
                    event::emit(&Event::StageStarted { stage });
                }
            }
            Some("stage-finished") => {
                let seconds = v.get("seconds").and_then(|s| s.as_f64()).unwrap_or(0.0);
                if let Some(stage) = stage() {
                    event::emit(&Event::StageFinished { stage, seconds });
                }
            }
            Some("build-started") => {
                report.lock().unwrap_or_else(|e| e.into_inner()).digest = v
                    .get("spec_digest")
                    .and_then(|d| d.as_str())
                    .map(|d| d.chars().take(128).collect());
            }
            Some("build-finished") => {
                if let Some(e) = v.get("error") {
                    report.lock().unwrap_or_else(|e| e.into_inner()).error = Some(e.clone());
                }
            }
            _ => {}
        }
    }
}

/// Copies the guest's log to stderr, control characters masked.
fn read_log(src: File) {
    let mut r = BufReader::new(src);
    let mut line = Vec::new();
    loop {
        line.clear();
        match (&mut r).take(MAX_LINE as u64).read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let text = mask(&String::from_utf8_lossy(&line));
        let mut err = std::io::stderr().lock();
        let _ = writeln!(err, "{}", text.trim_end_matches('\n'));
    }
}

/// `text` with every control character but tab and line feed shown as `?`: what the machine
/// prints must not drive this host's terminal.
fn mask(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_control() && c != '\n' && c != '\t' {
                '?'
            } else {
                c
            }
        })
        .collect()
}

/// The last `n` lines of `text`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Reads the output disk: the guest's status, then what its build handed off (staged images,
/// records, attachments and their description), checked against this host's plan, then
/// packaged and published here as a host build would (the images never mounted, only read).
fn publish(
    result: &MachineResult,
    plan: &Plan,
    lock: OutputLock,
    build_dir: &Path,
    limit: u64,
) -> Result<Metadata, Error> {
    let boundary = |e| Error::classify(e, None);
    // What the files may hold together: what fits on the scratch disk (a sparse entry claims
    // its size without taking room on the output disk).
    let mut budget = limit;
    let mut count = 0usize;
    let mut output = result.output.try_clone().map_err(|e| boundary(e.into()))?;
    output.rewind().map_err(|e| boundary(e.into()))?;
    // A workspace: locked while this build lives, swept by a later build if this one dies
    // (`kill -9` while packaging).
    let workspace = Workspace::create(build_dir, "vm-out", None).map_err(boundary)?;
    let work = workspace.work.as_path();
    std::fs::create_dir(work.join("files"))
        .context("creating the handoff's directory")
        .map_err(boundary)?;
    let mut archive = untar::Untar::new(BufReader::with_capacity(1 << 20, output));
    let mut status: Option<String> = None;
    let mut reason: Option<String> = None;
    let mut handoff_text: Option<String> = None;
    let mut files: std::collections::BTreeSet<String> = Default::default();
    loop {
        let entry = match archive.next_member() {
            Ok(Some(e)) => e,
            Ok(None) => break,
            // A machine that stopped before writing leaves no tar at all.
            Err(_) if status.is_none() => break,
            Err(e) => {
                return Err(boundary(
                    e.context("reading the build machine's output disk"),
                ));
            }
        };
        let name = entry.name.clone();
        if entry.kind == untar::Kind::Directory {
            continue;
        }
        if name == "status" || name == "reason" {
            let text = archive
                .read_small(&entry, 256)
                .context("reading the build machine's status")
                .map_err(boundary)?;
            let text = String::from_utf8_lossy(&text).trim().to_string();
            if name == "status" {
                status = Some(text);
            } else {
                reason = Some(text);
            }
            continue;
        }
        if status.as_deref() != Some("0") {
            break;
        }
        if name == format!("out/{}", crate::creator::HANDOFF_FILE) {
            let text = archive
                .read_small(&entry, MAX_METADATA_BYTES)
                .context("reading the build machine's handoff")
                .map_err(boundary)?;
            handoff_text = Some(
                String::from_utf8(text)
                    .context("reading the build machine's handoff")
                    .map_err(boundary)?,
            );
        } else if let Some(file) = name.strip_prefix("out/files/")
            && is_plain_name(file)
        {
            count += 1;
            if count > MAX_FILES || entry.size > budget {
                return Err(boundary(anyhow::anyhow!(
                    "the build machine's output is larger than its disk budget or holds more than {MAX_FILES} files: refused"
                )));
            }
            budget -= entry.size;
            let mut dest = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(work.join("files").join(file))
                .with_context(|| format!("creating {file} in {}", work.display()))
                .map_err(boundary)?;
            archive
                .copy_to(&entry, &mut dest, crate::signals::check)
                .with_context(|| format!("copying {file} out of the build machine"))
                .map_err(boundary)?;
            files.insert(format!("files/{file}"));
        } else {
            return Err(boundary(anyhow::anyhow!(
                "the build machine's output holds {name:?}, which no build hands off: refused"
            )));
        }
    }
    match status.as_deref() {
        Some("0") => {}
        None => return Err(no_result(result)),
        Some(code) => return Err(guest_failure(result, code, reason.as_deref())),
    }
    if let Some(expected) = &result.expect_digest
        && result.guest_digest.as_ref() != Some(expected)
    {
        return Err(boundary(anyhow::anyhow!(
            "the build machine built another spec (digest {:?}, this host planned {expected}): refused",
            result.guest_digest.as_deref().map(mask)
        )));
    }
    let text = handoff_text
        .context("the build machine handed nothing off")
        .map_err(boundary)?;
    let mut handoff: Handoff = serde_json::from_str(&text)
        .context("reading the build machine's handoff")
        .map_err(boundary)?;
    check_handoff(plan, &handoff, &files).map_err(boundary)?;
    for s in &mut handoff.staged {
        s.raw = work.join(&s.raw);
    }
    for (_, p) in &mut handoff.extra {
        *p = work.join(&*p);
    }
    for a in &mut handoff.attached {
        a.copy = work.join(&a.copy);
    }
    let stage_error = |stage| move |e| Error::classify(e, Some(stage));
    let (mut pending, packed, written) = run_stage(Stage::Package, || {
        creator::package_finished(plan, &lock, &handoff)
    })
    .map_err(stage_error(Stage::Package))?;
    let metadata = run_stage(Stage::Publish, || {
        creator::publish_packed(plan, handoff, &packed, written, &mut pending)
    })
    .map_err(stage_error(Stage::Publish))?;
    Ok(metadata)
}

/// A name of one path component that is not `.`, `..` or hidden.
fn is_plain_name(name: &str) -> bool {
    !name.is_empty() && !name.contains('/') && !name.starts_with('.') && name.len() <= 255
}

/// Whether a handoff is what a build of `plan` hands off: its kind, its images by name in the
/// plan's order, its records, attachments this plan makes, every file among those that came
/// out (`files`, as `files/<name>`) and none other.
fn check_handoff(
    plan: &Plan,
    h: &Handoff,
    files: &std::collections::BTreeSet<String>,
) -> Result<()> {
    if h.kind != plan.kind.name() {
        bail!(
            "the build machine made a {:?} build, this spec a {}: refused",
            h.kind.chars().take(64).collect::<String>(),
            plan.kind.name()
        );
    }
    // Names, order, how each ships, format, mount point and label are this host's plan's;
    // only the files and the UUIDs are the machine's.
    let planned = crate::kind::planned_staged(plan);
    let same = h.staged.len() == planned.len()
        && h.staged.iter().zip(&planned).all(|(got, want)| {
            *want
                == crate::kind::Staged {
                    raw: PathBuf::new(),
                    uuid: String::new(),
                    ..got.clone()
                }
        });
    if !same {
        bail!(
            "the build machine staged other images than this spec makes ({}): refused",
            h.staged
                .iter()
                .map(|s| format!("{} as {}", s.container_name, s.ship.name()))
                .collect::<Vec<_>>()
                .join(", ")
                .chars()
                .take(256)
                .collect::<String>()
        );
    }
    if let Some(s) = h.staged.iter().find(|s| s.uuid.len() > 64) {
        bail!(
            "the build machine names a UUID of {} characters for {}: refused",
            s.uuid.len(),
            s.container_name
        );
    }
    // The records the spec asks for, then the lock of what was installed.
    let mut extra: Vec<String> = plan.records.iter().map(|r| plan.record_name(*r)).collect();
    extra.push(plan.lock_name());
    if h.extra.iter().map(|(n, _)| n).collect::<Vec<_>>() != extra.iter().collect::<Vec<_>>() {
        bail!("the build machine made other records than this spec asks for: refused");
    }
    let (kernel, initrd) = plan.kernel_names();
    for a in &h.attached {
        let asked = if a.file == kernel || a.file == initrd {
            plan.copy_kernel
        } else {
            !plan.attachments.is_empty()
        };
        if !asked || !crate::output::publish::is_attachment_name(plan, &a.path, &a.file) {
            bail!(
                "the build machine copied {:?} out as {:?}, which this spec does not make: refused",
                a.path,
                a.file
            );
        }
    }
    let named: std::collections::BTreeSet<String> = h
        .staged
        .iter()
        .map(|s| &s.raw)
        .chain(h.extra.iter().map(|(_, p)| p))
        .chain(h.attached.iter().map(|a| &a.copy))
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    if named != *files {
        bail!(
            "the build machine's files are not those its handoff names ({} named, {} came out): refused",
            named.len(),
            files.len()
        );
    }
    Ok(())
}

/// The error of a machine that powered off without a result: out of memory, or it died.
fn no_result(result: &MachineResult) -> Error {
    let console = &result.console;
    if console.contains("Out of memory") || console.contains("oom-kill") {
        return Error::classify(
            Error::tagged(
                ErrorKind::LimitExceeded,
                format!(
                    "the build machine ran out of memory (raise --vm-memory); its console:\n{}",
                    tail(console, 15)
                ),
            ),
            None,
        );
    }
    Error::classify(
        anyhow::anyhow!(
            "the build machine stopped without a result; its console:\n{}",
            tail(console, 30)
        ),
        None,
    )
}

/// The error of a guest build that failed: its own kind, stage and message.
fn guest_failure(result: &MachineResult, code: &str, reason: Option<&str>) -> Error {
    if reason == Some("disk-full") {
        return Error::classify(
            Error::tagged(
                ErrorKind::NoSpace,
                "the build machine's disk budget is used up (raise --vm-disk)",
            ),
            None,
        );
    }
    if code == "125" {
        return Error::classify(
            anyhow::anyhow!(
                "the build machine could not start the build: {}; its console:\n{}",
                mask(reason.unwrap_or("unknown")),
                tail(&result.console, 20)
            ),
            None,
        );
    }
    if result.console.contains("Out of memory") {
        return no_result(result);
    }
    let e = result.guest_error.as_ref();
    let message = e
        .and_then(|e| e.get("message"))
        .and_then(|m| m.as_str())
        .map(mask)
        .unwrap_or_else(|| format!("the build in the machine exited with {}", mask(code)));
    let stage = e
        .and_then(|e| e.get("stage"))
        .and_then(|s| serde_json::from_value::<Stage>(s.clone()).ok());
    // The guest's own word on the kind is taken only where it cannot mislead: a full disk is
    // the disk budget; anything else is a failed build.
    let kind = match e.and_then(|e| e.get("kind")).and_then(|k| k.as_str()) {
        Some("no-space") => ErrorKind::NoSpace,
        _ => ErrorKind::Failed,
    };
    Error::classify(
        Error::tagged(kind, format!("in the build machine: {message}")),
        stage,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pack::digest::hex;
    use sha2::{Digest, Sha256};

    const SPEC: &str = "version: 1\nname: tb\nsuite: bookworm\nkind: tarball\n";

    /// The handoff a guest would write for the tarball spec, its archive at `files/1`, its lock
    /// at `files/l`.
    fn handoff() -> Handoff {
        Handoff {
            build_start: "2026-01-01T00:00:00Z".into(),
            kind: "tarball".into(),
            staged: vec![crate::kind::Staged {
                raw: "files/1".into(),
                raw_name: "tb.tar".into(),
                ship: crate::kind::Ship::Packed(crate::spec::Container::Gzip),
                container_name: "tb.tar.gz".into(),
                format: "tar".into(),
                mount: "/".into(),
                label: None,
                uuid: String::new(),
            }],
            extra: vec![("tb.lock.yaml".into(), "files/l".into())],
            attached: vec![],
            release_metas: vec![],
            installed: [("base-files".to_string(), "12.4".to_string())].into(),
            sbom: vec![],
        }
    }

    /// An output disk holding `entries`: (name, kind, bytes or link target).
    fn disk(entries: &[(&str, tar::EntryType, &[u8])]) -> File {
        let mut b = tar::Builder::new(tempfile::tempfile().unwrap());
        for (name, kind, bytes) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*kind);
            h.set_mode(0o644);
            if *kind == tar::EntryType::Symlink {
                h.set_size(0);
                b.append_link(&mut h, name, std::str::from_utf8(bytes).unwrap())
                    .unwrap();
            } else if name.contains("..") {
                // The tar crate writes no `..`; a hostile guest's tar would.
                h.set_size(bytes.len() as u64);
                h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
                h.set_cksum();
                b.append(&h, *bytes).unwrap();
            } else {
                h.set_size(bytes.len() as u64);
                b.append_data(&mut h, name, *bytes).unwrap();
            }
        }
        let f = b.into_inner().unwrap();
        // The rest of the disk: zeros, as a sparse file reads.
        f.set_len(f.metadata().unwrap().len() + (1 << 20)).unwrap();
        f
    }

    fn take(
        entries: &[(&str, tar::EntryType, &[u8])],
        guest_digest: Option<&str>,
    ) -> (Result<Metadata, Error>, tempfile::TempDir) {
        take_within(entries, guest_digest, 1 << 30)
    }

    fn take_within(
        entries: &[(&str, tar::EntryType, &[u8])],
        guest_digest: Option<&str>,
        limit: u64,
    ) -> (Result<Metadata, Error>, tempfile::TempDir) {
        let plan = Plan::for_test(SPEC);
        let out = tempfile::tempdir().unwrap();
        let build = tempfile::tempdir().unwrap();
        let lock = OutputLock::acquire(out.path(), false).unwrap();
        let result = MachineResult {
            output: disk(entries),
            guest_error: None,
            guest_digest: guest_digest.map(str::to_string),
            expect_digest: Some(plan.digest.clone()),
            console: "Out of nothing\n".into(),
        };
        let res = publish(&result, &plan, lock, build.path(), limit);
        let left: Vec<_> = std::fs::read_dir(build.path()).unwrap().collect();
        assert!(left.is_empty(), "left in the build directory: {left:?}");
        (res, out)
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n != crate::output::lock::OUTPUT_LOCK)
            .collect();
        v.sort();
        v
    }

    #[test]
    fn a_complete_handoff_is_packed_and_published_and_anything_else_leaves_nothing() {
        use tar::EntryType::{Directory, Regular, Symlink};
        let plan = Plan::for_test(SPEC);
        let archive: &[u8] = b"the archive as the machine staged it";
        let json = serde_json::to_string(&handoff()).unwrap();
        let good = [
            ("./", Directory, &b""[..]),
            ("./status", Regular, b"0\n"),
            ("out/", Directory, b""),
            ("out/handoff.json", Regular, json.as_bytes()),
            ("out/files/1", Regular, archive),
            ("out/files/l", Regular, b"version: 1\n"),
        ];
        let (res, out) = take(&good, Some(&plan.digest));
        let m = res.unwrap();
        // The SBOMs are made here, from the handoff, once the images are packed.
        assert_eq!(
            names(out.path()),
            [
                "tb.cdx.json",
                "tb.lock.yaml",
                "tb.spdx.json",
                "tb.tar.gz",
                "tb.yaml"
            ]
        );
        assert_eq!(m.spec_digest, plan.digest);
        assert_eq!(m.installed["base-files"], "12.4");
        let gz = std::fs::read(out.path().join("tb.tar.gz")).unwrap();
        assert_eq!(m.images[0].container_sha256, hex(&Sha256::digest(&gz)));
        let mut raw = Vec::new();
        flate2::read::GzDecoder::new(&gz[..])
            .read_to_end(&mut raw)
            .unwrap();
        assert_eq!(raw, archive, "packed here from what the machine staged");

        let refused = |entries: &[(&str, tar::EntryType, &[u8])], digest: &str, why: &str| {
            let (res, out) = take(entries, Some(digest));
            let e = res.expect_err(why);
            assert!(
                names(out.path()).is_empty(),
                "{why}: {:?}",
                names(out.path())
            );
            e.to_string()
        };
        let d = plan.digest.as_str();
        // A link, however named.
        let e = refused(
            &[good[1], good[3], ("out/files/1", Symlink, b"/etc/shadow")],
            d,
            "a link",
        );
        assert!(e.contains("not a file or directory"), "{e}");
        // A name outside the handoff, and `..`.
        for bad in [
            "etc/passwd",
            "out/files/../../x",
            "out/tb.tar.gz",
            "out/files/.x",
        ] {
            let e = refused(
                &[good[1], good[3], good[4], good[5], (bad, Regular, b"x")],
                d,
                bad,
            );
            assert!(e.contains("no build hands off"), "{bad}: {e}");
        }
        // Another image than the plan's.
        let mut h = handoff();
        h.staged[0].container_name = "evil.tar.gz".into();
        let j = serde_json::to_string(&h).unwrap();
        let e = refused(
            &[
                good[1],
                ("out/handoff.json", Regular, j.as_bytes()),
                good[4],
                good[5],
            ],
            d,
            "image",
        );
        assert!(e.contains("other images"), "{e}");
        // No lock, or a record this spec does not ask for.
        let mut h = handoff();
        h.extra.clear();
        let j = serde_json::to_string(&h).unwrap();
        let e = refused(
            &[
                good[1],
                ("out/handoff.json", Regular, j.as_bytes()),
                good[4],
            ],
            d,
            "no lock",
        );
        assert!(e.contains("other records"), "{e}");
        let mut h = handoff();
        h.extra.insert(0, ("tb.packages".into(), "files/2".into()));
        let j = serde_json::to_string(&h).unwrap();
        let e = refused(
            &[
                good[1],
                ("out/handoff.json", Regular, j.as_bytes()),
                good[4],
                good[5],
                ("out/files/2", Regular, b"x"),
            ],
            d,
            "a record",
        );
        assert!(e.contains("other records"), "{e}");
        // An attachment this spec does not make.
        let mut h = handoff();
        h.attached.push(crate::attachments::Attached {
            path: "/etc/shadow".into(),
            file: "../shadow".into(),
            copy: "files/2".into(),
        });
        let j = serde_json::to_string(&h).unwrap();
        let e = refused(
            &[
                good[1],
                ("out/handoff.json", Regular, j.as_bytes()),
                good[4],
                good[5],
                ("out/files/2", Regular, b"x"),
            ],
            d,
            "attachment",
        );
        assert!(e.contains("does not make"), "{e}");
        // A file the handoff names that did not come, and one it does not name.
        let mut h = handoff();
        h.staged[0].raw = "files/7".into();
        let j = serde_json::to_string(&h).unwrap();
        let e = refused(
            &[
                good[1],
                ("out/handoff.json", Regular, j.as_bytes()),
                good[4],
                good[5],
            ],
            d,
            "missing",
        );
        assert!(e.contains("not those its handoff names"), "{e}");
        let e = refused(
            &[
                good[1],
                good[3],
                good[4],
                good[5],
                ("out/files/9", Regular, b"x"),
            ],
            d,
            "extra",
        );
        assert!(e.contains("not those its handoff names"), "{e}");
        // More than the disk budget.
        let (res, out) = take_within(&good, Some(d), archive.len() as u64 - 1);
        let e = res.unwrap_err().to_string();
        assert!(e.contains("larger than its disk budget"), "{e}");
        assert!(names(out.path()).is_empty());
        // The machine planned another spec, or did not say which.
        let e = refused(&good, "0000", "another spec");
        assert!(e.contains("another spec"), "{e}");
        let (res, out) = take(&good, None);
        assert!(res.unwrap_err().to_string().contains("another spec"));
        assert!(names(out.path()).is_empty());
        // An image shipped in another format than its name says.
        let mut h = handoff();
        h.staged[0].ship = crate::kind::Ship::Qcow2 { compressed: false };
        let j = serde_json::to_string(&h).unwrap();
        let e = refused(
            &[
                good[1],
                ("out/handoff.json", Regular, j.as_bytes()),
                good[4],
                good[5],
            ],
            d,
            "ship",
        );
        assert!(e.contains("staged other images"), "{e}");
        // Another format, mount point or label than the plan's; a UUID that is no UUID.
        type Forge = fn(&mut crate::kind::Staged);
        let forgeries: [(Forge, &str); 4] = [
            (|s| s.format = "ext4".into(), "staged other images"),
            (|s| s.mount = "/etc".into(), "staged other images"),
            (|s| s.label = Some("x".into()), "staged other images"),
            (|s| s.uuid = "u".repeat(65), "a UUID of 65"),
        ];
        for (forge, why) in forgeries {
            let mut h = handoff();
            forge(&mut h.staged[0]);
            let j = serde_json::to_string(&h).unwrap();
            let e = refused(
                &[
                    good[1],
                    ("out/handoff.json", Regular, j.as_bytes()),
                    good[4],
                    good[5],
                ],
                d,
                why,
            );
            assert!(e.contains(why), "{e}");
        }
        // A kernel this spec does not copy out.
        let mut h = handoff();
        h.attached.push(crate::attachments::Attached {
            path: "/boot/vmlinuz-6".into(),
            file: "tb.vmlinuz".into(),
            copy: "files/2".into(),
        });
        let j = serde_json::to_string(&h).unwrap();
        let e = refused(
            &[
                good[1],
                ("out/handoff.json", Regular, j.as_bytes()),
                good[4],
                good[5],
                ("out/files/2", Regular, b"k"),
            ],
            d,
            "kernel",
        );
        assert!(e.contains("does not make"), "{e}");
        // No handoff.
        let e = refused(&[good[1], good[4], good[5]], d, "no handoff");
        assert!(e.contains("handed nothing off"), "{e}");
        // A failed build: its files are not even looked at.
        let e = refused(
            &[("./status", Regular, b"1\n"), good[3], good[4], good[5]],
            d,
            "failed",
        );
        assert!(e.contains("exited with 1"), "{e}");
        // No status at all (the disk as qemu left it: zeros).
        let e = refused(&[], d, "empty disk");
        assert!(e.contains("without a result"), "{e}");
    }

    #[test]
    fn masking_keeps_text_and_hides_terminal_controls() {
        assert_eq!(mask("a\tb\n"), "a\tb\n");
        assert_eq!(mask("\x1b]0;owned\x07x"), "?]0;owned?x");
        assert_eq!(mask("\r"), "?");
    }

    #[test]
    fn tail_gives_the_last_lines() {
        assert_eq!(tail("a\nb\nc\n", 2), "b\nc");
        assert_eq!(tail("a", 5), "a");
    }
}

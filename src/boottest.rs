//! `debimg boot-test`: boots a disk image in qemu on a serial console and waits for proof that
//! the system came up (its login prompt, or a marker the image prints). KVM when `/dev/kvm`
//! can be opened, software emulation otherwise; UEFI with Debian's OVMF. The image is never
//! written: qemu runs it in snapshot mode.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::signals;

/// OVMF firmware code and its variable store template (Debian's `ovmf` package).
pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
pub const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";

/// What to boot and what to wait for.
#[derive(Debug, Clone)]
pub struct BootTest {
    pub image: PathBuf,
    /// UEFI (OVMF) instead of BIOS (SeaBIOS).
    pub uefi: bool,
    pub timeout: Duration,
    /// Text on the console that proves the boot; the first one seen wins.
    pub expect: Vec<String>,
    pub memory_mib: u32,
    /// Virtual CPUs.
    pub cpus: u32,
    pub accel: Accel,
}

/// How qemu runs the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Accel {
    /// KVM when /dev/kvm opens and the machine shows signs of life, else software emulation.
    #[default]
    Auto,
    /// KVM only.
    Kvm,
    /// Software emulation (TCG) only.
    Tcg,
}

/// Console text that means the boot failed for good: the test ends at once instead of waiting
/// for its timeout.
pub const FAILURE_MARKERS: &[&str] = &[
    "Kernel panic - not syncing",
    "error: file `/",
    "error: no such device",
    "No bootable device",
    "Gave up waiting for root file system device",
    "grub rescue>",
    "You are in emergency mode",
];

/// A boot that reached its marker.
#[derive(Debug)]
pub struct Booted {
    /// The console line that held the marker.
    pub line: String,
    pub elapsed: Duration,
    /// Everything the console printed.
    pub console: String,
    /// True when KVM ran it.
    pub kvm: bool,
}

/// The disk format qemu is told: qcow2 when the file starts with qcow's magic, else raw.
pub fn image_format(path: &Path) -> &'static str {
    let mut magic = [0u8; 4];
    let is_qcow = std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && magic == *b"QFI\xfb";
    if is_qcow { "qcow2" } else { "raw" }
}

/// Decompresses a gzipped raw image into `dest`, leaving all-zero blocks as holes.
fn gunzip_sparse(src: &Path, dest: &Path) -> Result<()> {
    use std::io::{Seek, SeekFrom, Write};
    let input = std::fs::File::open(src).with_context(|| format!("opening {}", src.display()))?;
    let mut gz =
        flate2::read::MultiGzDecoder::new(std::io::BufReader::with_capacity(1 << 20, input));
    let mut out =
        std::fs::File::create(dest).with_context(|| format!("creating {}", dest.display()))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut len: u64 = 0;
    loop {
        signals::check()?;
        let mut filled = 0;
        while filled < buf.len() {
            let n = gz
                .read(&mut buf[filled..])
                .with_context(|| format!("decompressing {}", src.display()))?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        if filled == 0 {
            break;
        }
        if buf[..filled].iter().all(|&b| b == 0) {
            out.seek(SeekFrom::Current(filled as i64))?;
        } else {
            out.write_all(&buf[..filled])
                .with_context(|| format!("writing {}", dest.display()))?;
        }
        len += filled as u64;
    }
    out.set_len(len)
        .with_context(|| format!("sizing {}", dest.display()))
}

/// True when this process may use KVM.
pub fn kvm_usable() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// The qemu command line for a boot.
pub fn qemu_command(
    disk: &Path,
    format: &str,
    uefi_vars: Option<&Path>,
    kvm: bool,
    memory_mib: u32,
    cpus: u32,
) -> Command {
    let mut cmd = Command::new("qemu-system-x86_64");
    // graphics=off: SeaBIOS prints to the serial port too, so early failures show.
    cmd.args([
        "-machine",
        "q35,graphics=off",
        "-m",
        &memory_mib.to_string(),
        "-smp",
        &cpus.to_string(),
    ])
    .args(["-display", "none", "-monitor", "none", "-serial", "stdio"])
    .args(["-no-reboot", "-nic", "none"])
    .arg("-drive")
    .arg(format!(
        "file={},format={format},if=virtio,snapshot=on",
        disk.display().to_string().replace(',', ",,")
    ));
    if kvm {
        cmd.args(["-accel", "kvm"]);
    } else {
        cmd.args(["-accel", "tcg"]);
    }
    if let Some(vars) = uefi_vars {
        cmd.arg("-drive")
            .arg(format!(
                "if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}"
            ))
            .arg("-drive")
            .arg(format!(
                "if=pflash,format=raw,unit=1,file={}",
                vars.display()
            ));
    }
    cmd
}

/// `debimg boot-test`: boots the image, logs how it booted and prints the console line that
/// proves it on stdout; fails with the whole console log.
pub fn boot_test(args: &BootTestArgs) -> Result<(), crate::error::Error> {
    signals::install()?;
    let expect = if args.expect.is_empty() {
        vec!["login:".to_string()]
    } else {
        args.expect.clone()
    };
    let booted = run(&BootTest {
        image: args.image.clone(),
        uefi: args.uefi,
        timeout: Duration::from_secs(args.timeout),
        expect,
        memory_mib: args.memory,
        cpus: args.cpus,
        accel: args.accel,
    })?;
    tracing::info!(
        "{} booted ({}, {}) in {:.1}s",
        args.image.display(),
        if args.uefi { "UEFI" } else { "BIOS" },
        if booted.kvm {
            "KVM"
        } else {
            "software emulation"
        },
        booted.elapsed.as_secs_f64()
    );
    println!("{}", booted.line);
    Ok(())
}

/// Boots the image and waits for a marker. Fails with the whole console log when the time runs
/// out or qemu ends first.
pub fn run(t: &BootTest) -> Result<Booted> {
    if !t.image.is_file() {
        bail!("{} is not a file", t.image.display());
    }
    // On disk (not a RAM-backed /tmp): a gzipped disk is unpacked here, sparsely.
    let scratch = tempfile::Builder::new()
        .prefix("debimg-boot-test-")
        .tempdir_in("/var/tmp")
        .context("creating a scratch directory in /var/tmp")?;
    let name = t.image.file_name().unwrap_or_default().to_string_lossy();
    let (disk, format) = if let Some(stem) = name.strip_suffix(".gz") {
        let raw = scratch.path().join(stem);
        gunzip_sparse(&t.image, &raw)?;
        (raw, "raw")
    } else {
        (t.image.clone(), image_format(&t.image))
    };
    let vars = if t.uefi {
        for f in [OVMF_CODE, OVMF_VARS] {
            if !Path::new(f).exists() {
                bail!("UEFI boot needs {f} (apt-get install ovmf)");
            }
        }
        let v = scratch.path().join("OVMF_VARS.fd");
        std::fs::copy(OVMF_VARS, &v).context("copying the OVMF variable store")?;
        Some(v)
    } else {
        None
    };
    if t.accel == Accel::Kvm {
        return match attempt(t, &disk, format, vars.as_deref(), true, false)? {
            Attempt::Done(res) => res,
            Attempt::Silent => unreachable!("a forced KVM boot does not give up on silence"),
        };
    }
    if t.accel == Accel::Auto && kvm_usable() {
        match attempt(t, &disk, format, vars.as_deref(), true, true)? {
            Attempt::Done(res) => return res,
            Attempt::Silent => tracing::warn!(
                "the KVM machine stopped printing on its console for {}s before it was up (a nested or restricted KVM); booting again with software emulation",
                KVM_SILENCE.as_secs()
            ),
        }
    }
    match attempt(t, &disk, format, vars.as_deref(), false, false)? {
        Attempt::Done(res) => res,
        Attempt::Silent => unreachable!("only KVM attempts give up on silence"),
    }
}

/// How long a KVM boot may go without new console output before it is taken for a KVM that
/// does not work. A working one prints steadily (firmware, GRUB, kernel, systemd); a broken
/// nested KVM seen on this project's hosts runs the firmware, then hangs in GRUB or the kernel.
const KVM_SILENCE: Duration = Duration::from_secs(15);

enum Attempt {
    Done(Result<Booted>),
    /// The KVM machine went quiet before it was up: try software emulation.
    Silent,
}

fn attempt(
    t: &BootTest,
    disk: &Path,
    format: &str,
    vars: Option<&Path>,
    kvm: bool,
    give_up_on_silence: bool,
) -> Result<Attempt> {
    if let Some(v) = vars {
        std::fs::copy(OVMF_VARS, v).context("copying the OVMF variable store")?;
    }
    let mut cmd = qemu_command(disk, format, vars, kvm, t.memory_mib, t.cpus);
    tracing::debug!("running {}", crate::cmd::command_line(&cmd));
    use std::os::unix::process::CommandExt;
    crate::cmd::die_with_parent(&mut cmd, libc::SIGKILL);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .context("starting qemu-system-x86_64 (apt-get install qemu-system-x86)")?;
    let pgid = child.id() as i32;
    let _registered = signals::ChildGroup::register(pgid);
    // (from the serial console?, bytes): qemu's own warnings on stderr go into the log too.
    let (tx, rx) = mpsc::channel::<(bool, Vec<u8>)>();
    for (serial, pipe) in [
        (
            true,
            Box::new(child.stdout.take().expect("piped")) as Box<dyn Read + Send>,
        ),
        (false, Box::new(child.stderr.take().expect("piped"))),
    ] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut pipe = pipe;
            let mut buf = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 || tx.send((serial, buf[..n].to_vec())).is_err() {
                    break;
                }
            }
        });
    }
    let mut last_output = Instant::now();
    let mut partial_since: Option<Instant> = None;
    drop(tx);
    let start = Instant::now();
    // What the serial console printed (markers are matched here), and the whole log with
    // qemu's own messages, for errors.
    let mut serial: Vec<u8> = Vec::new();
    let mut console: Vec<u8> = Vec::new();
    // Serial bytes before this offset are complete lines already searched.
    let mut scanned = 0usize;
    let outcome = loop {
        let mut ended = false;
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(first) => {
                let mut take = |(from_serial, chunk): (bool, Vec<u8>)| {
                    if from_serial {
                        if chunk.iter().any(|b| !b.is_ascii_whitespace()) {
                            last_output = Instant::now();
                        }
                        serial.extend_from_slice(&chunk);
                    }
                    console.extend_from_slice(&chunk);
                };
                take(first);
                while let Ok(more) = rx.try_recv() {
                    take(more);
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => ended = true,
        }
        if give_up_on_silence && (ended || last_output.elapsed() > KVM_SILENCE) {
            signals::kill_group(pgid);
            let _ = child.wait();
            return Ok(Attempt::Silent);
        }
        if ended {
            break Err(format!(
                "qemu ended after {:.0}s before the system came up",
                start.elapsed().as_secs_f64()
            ));
        }
        // Only what is new: complete lines once, the unfinished last line each time.
        let text = String::from_utf8_lossy(&serial[scanned..]).into_owned();
        match find_marker(&text, &t.expect) {
            Some((line, true)) => break Ok(line),
            // The rest of the line may still come (a prompt never ends its line): wait a little.
            Some((line, false)) => {
                let since = *partial_since.get_or_insert_with(Instant::now);
                if since.elapsed() > Duration::from_secs(1) {
                    break Ok(line);
                }
            }
            None => {}
        }
        if let Some(f) = FAILURE_MARKERS.iter().find(|f| text.contains(*f)) {
            // A moment more, so that the log shows what follows the failure.
            std::thread::sleep(Duration::from_millis(500));
            while let Ok((_, chunk)) = rx.try_recv() {
                console.extend_from_slice(&chunk);
            }
            break Err(format!("the console shows `{f}`"));
        }
        if let Some(nl) = serial[scanned..].iter().rposition(|&b| b == b'\n') {
            // Keep the last complete line in view: a marker split across reads was searched
            // whole above only once its line ended.
            scanned += nl + 1;
        }
        // A guest stuck printing must not fill memory: keep the last 8 MiB.
        const CAP: usize = 8 << 20;
        if console.len() > 2 * CAP {
            console.drain(..console.len() - CAP);
        }
        if scanned > 2 * CAP {
            serial.drain(..scanned);
            scanned = 0;
        }
        if let Some(sig) = signals::interrupted() {
            break Err(format!("interrupted by signal {sig}"));
        }
        if start.elapsed() > t.timeout {
            break Err(format!(
                "no {} on the console within {}s",
                t.expect
                    .iter()
                    .map(|e| format!("`{e}`"))
                    .collect::<Vec<_>>()
                    .join(" or "),
                t.timeout.as_secs()
            ));
        }
    };
    signals::kill_group(pgid);
    let _ = child.wait();
    let console = String::from_utf8_lossy(&console).into_owned();
    Ok(Attempt::Done(match outcome {
        Ok(line) => Ok(Booted {
            line,
            elapsed: start.elapsed(),
            console,
            kvm,
        }),
        Err(why) => Err(anyhow::anyhow!(
            "boot test of {} ({}, {}) failed: {why}\n--- console log ---\n{}\n--- end of console log ---",
            t.image.display(),
            if t.uefi { "UEFI" } else { "BIOS" },
            if kvm { "KVM" } else { "software emulation" },
            console.trim_end()
        )),
    }))
}

/// The first console line holding a marker, and whether that line is complete.
pub fn find_marker(console: &str, expect: &[String]) -> Option<(String, bool)> {
    let mut rest = console;
    while !rest.is_empty() {
        let (line, complete, next) = match rest.find('\n') {
            Some(i) => (&rest[..i], true, &rest[i + 1..]),
            None => (rest, false, ""),
        };
        if expect.iter().any(|e| line.contains(e.as_str())) {
            return Some((line.trim().to_string(), complete));
        }
        rest = next;
    }
    None
}

/// The arguments of `debimg boot-test`.
#[derive(clap::Args)]
pub struct BootTestArgs {
    /// The disk image: raw (`.img`), qcow2 (`.qcow2`) or gzipped raw (`.img.gz`).
    pub image: PathBuf,
    /// Boot with UEFI firmware (OVMF) instead of BIOS.
    #[arg(long)]
    pub uefi: bool,
    /// Seconds to wait for the system to come up.
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
    /// Console text that proves the boot (repeatable) [default: `login:`].
    #[arg(long, value_name = "TEXT")]
    pub expect: Vec<String>,
    /// Memory of the virtual machine in MiB.
    #[arg(long, default_value_t = 1024)]
    pub memory: u32,
    /// Virtual CPUs of the machine. Under software emulation on a busy host, 1 costs the host
    /// least (docs/benchmarks.md: a third less CPU for a build in a machine).
    #[arg(long, value_name = "N", default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub cpus: u32,
    /// auto: KVM when /dev/kvm works (falling back to software emulation when the machine
    /// stays silent for 10 s); kvm; tcg (software emulation).
    #[arg(long, value_enum, default_value = "auto")]
    pub accel: Accel,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cmd::command_line;

    #[test]
    fn markers_wait_for_their_line() {
        let e = vec!["DEBIMG-BOOT-OK".to_string(), "login:".to_string()];
        assert_eq!(
            find_marker("boot\nDEBIMG-BOOT-OK ro", &e),
            Some(("DEBIMG-BOOT-OK ro".into(), false))
        );
        assert_eq!(
            find_marker("boot\r\nDEBIMG-BOOT-OK root-bytes=5\r\nmore", &e),
            Some(("DEBIMG-BOOT-OK root-bytes=5".into(), true))
        );
        assert_eq!(
            find_marker("x\ncloud login: ", &e),
            Some(("cloud login:".into(), false))
        );
        assert_eq!(find_marker("nothing\n", &e), None);
    }

    #[test]
    fn qemu_line_for_uefi_with_kvm() {
        let c = command_line(&qemu_command(
            Path::new("/x/cloud.qcow2"),
            "qcow2",
            Some(Path::new("/t/VARS.fd")),
            true,
            1024,
            2,
        ));
        for part in [
            "-m 1024",
            "-smp 2",
            "-serial stdio",
            "-no-reboot",
            "file=/x/cloud.qcow2,format=qcow2,if=virtio,snapshot=on",
            "-accel kvm",
            "unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd",
            "unit=1,file=/t/VARS.fd",
        ] {
            assert!(c.contains(part), "`{part}` missing in {c}");
        }
        let bios = command_line(&qemu_command(
            Path::new("/x/a,b.img"),
            "raw",
            None,
            false,
            512,
            1,
        ));
        assert!(
            bios.contains("-accel tcg") && !bios.contains("pflash"),
            "{bios}"
        );
        assert!(bios.contains("q35,graphics=off"), "{bios}");
        assert!(bios.contains("-smp 1"), "{bios}");
        assert!(bios.contains("file=/x/a,,b.img,format=raw"), "{bios}");
    }

    #[test]
    fn formats_by_content_and_sparse_gunzip() {
        let dir = tempfile::tempdir().unwrap();
        let q = dir.path().join("disk.img");
        std::fs::write(&q, b"QFI\xfb\0\0\0\x03rest").unwrap();
        assert_eq!(image_format(&q), "qcow2");
        let r = dir.path().join("r.qcow2");
        std::fs::write(&r, vec![0u8; 4096]).unwrap();
        assert_eq!(image_format(&r), "raw");
        // 4 MiB: 1 MiB of data, then zeros.
        let mut data = vec![0u8; 4 << 20];
        data[..1 << 20].fill(7);
        let gz = dir.path().join("d.img.gz");
        let mut enc = flate2::write::GzEncoder::new(
            std::fs::File::create(&gz).unwrap(),
            flate2::Compression::fast(),
        );
        std::io::Write::write_all(&mut enc, &data).unwrap();
        enc.finish().unwrap();
        let out = dir.path().join("d.img");
        gunzip_sparse(&gz, &out).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), data);
        use std::os::unix::fs::MetadataExt;
        let allocated = std::fs::metadata(&out).unwrap().blocks() * 512;
        assert!(
            allocated < 2 << 20,
            "zeros were written: {allocated} bytes allocated"
        );
    }
}

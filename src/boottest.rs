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
    "Boot failed",
    "Gave up waiting for root file system device",
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

/// The disk format qemu is told, from the file name.
pub fn image_format(path: &Path) -> &'static str {
    match path.extension().and_then(|e| e.to_str()) {
        Some("qcow2") => "qcow2",
        _ => "raw",
    }
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
) -> Command {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
        "-machine",
        "q35",
        "-m",
        &memory_mib.to_string(),
        "-smp",
        "2",
    ])
    .args(["-display", "none", "-monitor", "none", "-serial", "stdio"])
    .args(["-no-reboot", "-nic", "none"])
    .arg("-drive")
    .arg(format!(
        "file={},format={format},if=virtio,snapshot=on",
        disk.display()
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

/// Boots the image and waits for a marker. Fails with the whole console log when the time runs
/// out or qemu ends first.
pub fn run(t: &BootTest) -> Result<Booted> {
    if !t.image.is_file() {
        bail!("{} is not a file", t.image.display());
    }
    let scratch = tempfile::Builder::new()
        .prefix("debimg-boot-test-")
        .tempdir_in(std::env::temp_dir())
        .context("creating a scratch directory")?;
    let name = t.image.file_name().unwrap_or_default().to_string_lossy();
    let (disk, format) = if let Some(stem) = name.strip_suffix(".gz") {
        let raw = scratch.path().join(stem);
        let out =
            std::fs::File::create(&raw).with_context(|| format!("creating {}", raw.display()))?;
        let st = Command::new("gzip")
            .arg("-dc")
            .arg(&t.image)
            .stdout(out)
            .status()
            .context("running gzip -dc")?;
        if !st.success() {
            bail!("gzip -dc {} failed with {st}", t.image.display());
        }
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
                "KVM gave no console output in {}s (a nested or restricted KVM); booting again with software emulation",
                KVM_SILENCE.as_secs()
            ),
        }
    }
    match attempt(t, &disk, format, vars.as_deref(), false, false)? {
        Attempt::Done(res) => res,
        Attempt::Silent => unreachable!("only KVM attempts give up on silence"),
    }
}

/// How long a KVM boot may stay silent before it is taken for a KVM that does not work: the
/// firmware and GRUB print within a second or two when it does.
const KVM_SILENCE: Duration = Duration::from_secs(10);

enum Attempt {
    Done(Result<Booted>),
    /// KVM printed nothing at all: try software emulation.
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
    let mut cmd = qemu_command(disk, format, vars, kvm, t.memory_mib);
    tracing::debug!("running {}", crate::cmd::command_line(&cmd));
    use std::os::unix::process::CommandExt;
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
    let mut serial_seen = false;
    let mut partial_since: Option<Instant> = None;
    drop(tx);
    let start = Instant::now();
    let mut console: Vec<u8> = Vec::new();
    let outcome = loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok((serial, chunk)) => {
                serial_seen |= serial && chunk.iter().any(|b| !b.is_ascii_whitespace());
                console.extend_from_slice(&chunk);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                break Err(format!(
                    "qemu ended after {:.0}s before the system came up",
                    start.elapsed().as_secs_f64()
                ));
            }
        }
        if give_up_on_silence && !serial_seen && start.elapsed() > KVM_SILENCE {
            signals::kill_group(pgid);
            let _ = child.wait();
            return Ok(Attempt::Silent);
        }
        let text = String::from_utf8_lossy(&console);
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
        ));
        for part in [
            "-m 1024",
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
            Path::new("/x/a.img"),
            "raw",
            None,
            false,
            512,
        ));
        assert!(
            bios.contains("-accel tcg") && !bios.contains("pflash"),
            "{bios}"
        );
        assert_eq!(image_format(Path::new("a.qcow2")), "qcow2");
        assert_eq!(image_format(Path::new("a.img")), "raw");
    }
}

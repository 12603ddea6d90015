//! The post-creation hook (`serve --post-creation CMD`): what a job's name and email may be
//! (they reach the admin's command and perhaps a mail program), and running the command with
//! them as data, in a clean environment, within a time limit.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

/// The longest job name or email.
pub const MAX_FIELD: usize = 256;

/// Characters that change how text is shown without being seen: bidirectional overrides and
/// isolates, zero-width characters, the line and paragraph separators.
fn invisible(c: char) -> bool {
    matches!(c,
        '\u{061c}' | '\u{180e}' | '\u{200b}'..='\u{200f}' | '\u{2028}'..='\u{202e}'
        | '\u{2060}'..='\u{2064}' | '\u{2066}'..='\u{206f}' | '\u{feff}')
}

/// Why `name` is no job name, if it is not one: 1 to 256 printable characters, not starting
/// with `-`, without `$`, a backquote or a backslash (what a careless hook would expand), and
/// without control or invisible characters (line separators, direction overrides): the name
/// is shown to people and handed to the admin's hook. Markup is text (the page shows it so).
pub fn name_problem(name: &str) -> Option<String> {
    if name.trim().is_empty() || name.chars().count() > MAX_FIELD {
        return Some(format!("`name` is 1 to {MAX_FIELD} characters"));
    }
    if name.starts_with('-') {
        return Some("`name` may not start with `-`".into());
    }
    if let Some(c) = name
        .chars()
        .find(|&c| c.is_control() || invisible(c) || matches!(c, '$' | '`' | '\\'))
    {
        return Some(format!(
            "`name` has {c:?} (U+{:04X}): a name is printable text without $, ` or \\",
            c as u32
        ));
    }
    None
}

/// Why `email` is no email address, if it is not one: `local@domain`, the local part of
/// letters, digits and `. _ % + -` (not starting with `-` or `.`), the domain of dot-separated
/// labels of letters, digits and `-`; at most 254 characters. An empty email is no email.
pub fn email_problem(email: &str) -> Option<String> {
    let bad = || {
        Some(format!(
            "`email` is an address (`someone@example.org`: letters, digits and . _ % + - before \
             the @, a domain after it); `{}` is not",
            email.escape_debug()
        ))
    };
    if email.is_empty() {
        return None;
    }
    if email.len() > 254 {
        return bad();
    }
    let Some((local, domain)) = email.split_once('@') else {
        return bad();
    };
    let local_ok = !local.is_empty()
        && local.len() <= 64
        && !local.starts_with(['-', '.'])
        && local
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._%+-".contains(c));
    let domain_ok = !domain.is_empty()
        && domain.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        });
    if local_ok && domain_ok { None } else { bad() }
}

/// The most bytes of the hook's output kept (stdout and stderr each).
const MAX_OUTPUT: u64 = 64 * 1024;

/// How a hook ran.
#[derive(Debug)]
pub struct HookRun {
    /// Its exit code; `None` when a signal ended it (its own, or ours at the time limit).
    pub exit_code: Option<i32>,
    pub success: bool,
    pub timed_out: bool,
    /// Its stdout, then its stderr (each at most 64 KiB).
    pub output: Vec<u8>,
}

/// Runs `cmd` (through `/bin/sh -c`) with the allowlisted environment and `vars`, in a process
/// group of its own that is killed (TERM, KILL 5 s later) after `timeout`.
pub fn run(cmd: &str, vars: &[(&str, &str)], timeout: Duration) -> std::io::Result<HookRun> {
    let mut c = Command::new("/bin/sh");
    crate::environ::clean(&mut c);
    c.arg("-c")
        .arg(cmd)
        .envs(vars.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = c.spawn()?;
    let pgid = Pid::from_raw(child.id() as i32);
    // Read to the end (a hook must never block on a full pipe), keeping the first 64 KiB.
    fn reader(r: Option<impl Read + Send + 'static>) -> std::thread::JoinHandle<Vec<u8>> {
        std::thread::spawn(move || {
            let mut kept = Vec::new();
            let Some(mut r) = r else { return kept };
            let mut buf = [0u8; 8192];
            while let Ok(n) = r.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let room = (MAX_OUTPUT as usize).saturating_sub(kept.len());
                kept.extend_from_slice(&buf[..n.min(room)]);
            }
            kept
        })
    }
    let out = reader(child.stdout.take());
    let err = reader(child.stderr.take());
    let started = Instant::now();
    let mut timed_out = false;
    let mut killed_at: Option<Instant> = None;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if !timed_out && started.elapsed() >= timeout {
            timed_out = true;
            let _ = killpg(pgid, Signal::SIGTERM);
            killed_at = Some(Instant::now());
        }
        if killed_at.is_some_and(|t| t.elapsed() >= Duration::from_secs(5)) {
            let _ = killpg(pgid, Signal::SIGKILL);
            killed_at = None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // What the hook left behind in its group goes with it.
    if timed_out {
        let _ = killpg(pgid, Signal::SIGKILL);
    }
    let join = |h: std::thread::JoinHandle<Vec<u8>>| {
        // A grandchild that left the group may hold the pipe: do not wait on it for long.
        let until = Instant::now() + Duration::from_secs(2);
        while !h.is_finished() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(20));
        }
        if h.is_finished() {
            h.join().unwrap_or_default()
        } else {
            Vec::new()
        }
    };
    let mut output = join(out);
    output.extend(join(err));
    Ok(HookRun {
        exit_code: status.code(),
        success: status.success() && !timed_out,
        timed_out,
        output,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_plain_text() {
        assert_eq!(name_problem("nightly build #3 (arm)"), None);
        assert_eq!(name_problem("Zoë/ünïcode-1.2"), None);
        assert_eq!(name_problem("<b id=\"x\">markup</b> is text; a|b"), None);
        for bad in [
            "",
            "  ",
            "-oQ/tmp/q",
            "$(id)",
            "`id`",
            "x\u{202e}gpj.exe",
            "line\u{2028}break",
            "tab\there",
            "new\nline",
            "back\\slash",
        ] {
            assert!(name_problem(bad).is_some(), "{bad:?}");
        }
        assert!(name_problem(&"a".repeat(257)).is_some());
    }

    #[test]
    fn emails_are_addresses() {
        for good in [
            "t@example.org",
            "first.last+tag@sub.example.co",
            "root@localhost",
            "",
        ] {
            assert_eq!(email_problem(good), None, "{good}");
        }
        for bad in [
            "-oQ/tmp/q -X/tmp/x",
            "-oQ/tmp/q@example.org",
            "a b@example.org",
            "$(id)@example.org",
            "user@exa mple.org",
            "user@-example.org",
            "user@example..org",
            "noat",
            "@example.org",
            "user@",
            "user@example.org\nBcc: x@y.z",
            "u\u{202e}@example.org",
        ] {
            assert!(email_problem(bad).is_some(), "{bad:?}");
        }
    }

    #[test]
    fn a_hook_gets_its_data_in_a_clean_environment_and_a_time_limit() {
        // SAFETY: the test sets a variable no other test reads.
        unsafe { std::env::set_var("DEBIMG_TEST_HOOK_SECRET", "hook-s3cret") };
        let r = run(
            "env; printf 'name=%s\\n' \"$DEBIMG_JOB_NAME\"",
            &[("DEBIMG_JOB_NAME", "$(id) x")],
            Duration::from_secs(30),
        )
        .unwrap();
        let text = String::from_utf8_lossy(&r.output);
        assert!(r.success, "{text}");
        assert!(text.contains("name=$(id) x"), "{text}");
        assert!(!text.contains("hook-s3cret"), "{text}");

        let t = tempfile::tempdir().unwrap();
        let pid_file = t.path().join("pid");
        let started = Instant::now();
        let r = run(
            &format!(
                "echo before; sleep 60 & echo $! > {}; wait",
                pid_file.display()
            ),
            &[],
            Duration::from_millis(500),
        )
        .unwrap();
        assert!(r.timed_out && !r.success, "{r:?}");
        assert!(started.elapsed() < Duration::from_secs(20));
        assert!(String::from_utf8_lossy(&r.output).contains("before"));
        // The hook's own children went with it.
        let pid = std::fs::read_to_string(&pid_file).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", pid.trim()));
        assert!(
            stat.map_or(true, |s| s.contains(") Z ")),
            "the hook's child {} outlived the time limit",
            pid.trim()
        );
    }
}

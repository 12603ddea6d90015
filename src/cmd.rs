//! The one way debimg runs an external program.
//!
//! Every command is logged at debug level, gets a null stdin unless the caller feeds it, and on
//! failure its error names the command line and carries the tail of its stderr. Arguments are a
//! vector: nothing ever passes through a shell.

use std::collections::VecDeque;
use std::ffi::OsStr;
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::signals;

/// How much of a failing command's stderr goes into the error.
const STDERR_TAIL_LINES: usize = 20;

/// Extension methods on [`Command`] that log, capture and report uniformly.
pub trait CommandRunExt {
    /// Runs the command with stdin null and stdout/stderr captured; fails on non-zero exit.
    fn run(&mut self) -> Result<()>;
    /// Runs the command and returns its stdout as UTF-8 (lossy); fails on non-zero exit.
    fn run_stdout(&mut self) -> Result<String>;
    /// Runs the command with `input` on its stdin; fails on non-zero exit.
    fn run_with_stdin(&mut self, input: &[u8]) -> Result<String>;
    /// Runs the command and accepts any exit code listed in `ok_codes`; returns the code.
    fn run_accepting(&mut self, ok_codes: &[i32]) -> Result<i32>;
    /// Like [`CommandRunExt::run_accepting`], also returning stdout and the last lines of
    /// stderr (for programs whose diagnostics are the answer, such as `apt-get --simulate`).
    fn run_accepting_output(&mut self, ok_codes: &[i32]) -> Result<(i32, String, Vec<String>)>;
    /// Runs a long command: its stdout and stderr lines go to our stderr when `show` is true
    /// (progress for the user; our stdout stays for results), and the last lines go into the
    /// error when it fails either way.
    fn run_streaming(&mut self, show: bool) -> Result<()>;
}

/// Arranges for the command's process to get `signal` when debimg dies, `kill -9` included
/// (`PR_SET_PDEATHSIG`): for children that must not outlive the build, such as qemu.
pub fn die_with_parent(cmd: &mut Command, signal: libc::c_int) {
    // SAFETY: prctl is async-signal-safe; the closure touches nothing else.
    unsafe {
        cmd.pre_exec(move || {
            libc::prctl(libc::PR_SET_PDEATHSIG, signal);
            Ok(())
        });
    }
}

/// Renders a command line for logs and errors, URL credentials masked.
pub fn command_line(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        s.push(' ');
        s.push_str(&quote(arg));
    }
    crate::redact::owned(&s)
}

fn quote(arg: &OsStr) -> String {
    let a = arg.to_string_lossy();
    if a.is_empty() || a.contains(|c: char| c.is_whitespace() || c == '\'' || c == '"') {
        format!("'{}'", a.replace('\'', "'\\''"))
    } else {
        a.into_owned()
    }
}

/// What a finished command left: its status, its whole stdout when captured, and the tail of
/// its output for errors.
struct Finished {
    status: ExitStatus,
    stdout: Vec<u8>,
    tail: Vec<String>,
}

impl Finished {
    fn check(&self, cmd: &Command, ok_codes: &[i32]) -> Result<i32> {
        match self.status.code() {
            Some(c) if ok_codes.contains(&c) => Ok(c),
            code => {
                let status = match code {
                    Some(c) => format!("exit code {c}"),
                    None => format!("{}", self.status),
                };
                if let Some(sig) = signals::interrupted() {
                    let name = nix::sys::signal::Signal::try_from(sig)
                        .map(|s| s.as_str())
                        .unwrap_or("a signal");
                    bail!(
                        "`{}` stopped ({status}): interrupted by {name}",
                        command_line(cmd)
                    );
                }
                if self.tail.is_empty() {
                    bail!("`{}` failed with {status}", command_line(cmd))
                }
                bail!(
                    "`{}` failed with {status}:\n{}",
                    command_line(cmd),
                    self.tail.join("\n")
                )
            }
        }
    }
}

/// How long a command may outlive the SIGTERM a signal sent it before it gets SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(10);

/// How long the output pipes of a finished command get to reach their end: a process it left
/// running (a daemon a script started with `setsid ... &`) can hold them open for ever, and the
/// build must not wait on it. Such a process is ended by the step's cleanup.
const PIPE_DRAIN: Duration = Duration::from_secs(2);

/// Spawns `cmd` in a process group of its own (so an interrupt can end it and everything it
/// started), feeds `input`, collects or forwards its output, and waits for it.
fn execute(cmd: &mut Command, input: Option<&[u8]>, capture: bool, show: bool) -> Result<Finished> {
    signals::check().with_context(|| format!("not starting `{}`", command_line(cmd)))?;
    tracing::debug!("running {}", command_line(cmd));
    cmd.stdin(if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .process_group(0);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting `{}`", command_line(cmd)))?;
    let pgid = child.id() as i32;
    let _registered = signals::ChildGroup::register(pgid);
    let feeder = input.map(|data| {
        let mut stdin = child.stdin.take().expect("stdin was piped");
        let data = data.to_vec();
        // A program that exits without reading its stdin is judged by its exit code.
        std::thread::spawn(move || {
            let _ = stdin.write_all(&data);
        })
    });
    let tail = Arc::new(Mutex::new(VecDeque::new()));
    let captured = Arc::new(Mutex::new(Vec::new()));
    // Each reader says on this channel when its pipe reached its end.
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let stdout_pipe = child.stdout.take().expect("stdout was piped");
    if capture {
        let (buf, done) = (captured.clone(), done_tx.clone());
        std::thread::spawn(move || {
            let mut pipe = stdout_pipe;
            let mut chunk = [0u8; 8192];
            loop {
                match std::io::Read::read(&mut pipe, &mut chunk) {
                    Ok(0) => break,
                    Ok(n) => buf
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .extend_from_slice(&chunk[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
            let _ = done.send(());
        });
    } else {
        pump(stdout_pipe, show, tail.clone(), done_tx.clone());
    }
    pump(
        child.stderr.take().expect("stderr was piped"),
        show,
        tail.clone(),
        done_tx,
    );
    let mut term_seen: Option<Instant> = None;
    let status = loop {
        if let Some(st) = child
            .try_wait()
            .with_context(|| format!("waiting for `{}`", command_line(cmd)))?
        {
            break st;
        }
        if signals::interrupted().is_some() {
            let since = *term_seen.get_or_insert_with(Instant::now);
            if since.elapsed() > TERM_GRACE {
                signals::kill_group(pgid);
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    if signals::interrupted().is_some() {
        // Whatever the command started in its group goes with it.
        signals::kill_group(pgid);
    }
    // Both pipes normally end with the command; one held open by a process it left behind is
    // given up on after PIPE_DRAIN (its reader thread ends when that process does).
    let deadline = Instant::now() + PIPE_DRAIN;
    let mut ended = 0;
    while ended < 2 {
        let left = deadline.saturating_duration_since(Instant::now());
        match done_rx.recv_timeout(left) {
            Ok(()) => ended += 1,
            Err(_) => {
                tracing::warn!(
                    "`{}` exited, but a process it left running still holds its output; not \
                     waiting for it",
                    command_line(cmd)
                );
                break;
            }
        }
    }
    let stdout = std::mem::take(&mut *captured.lock().unwrap_or_else(|e| e.into_inner()));
    if let Some(f) = feeder {
        let _ = f.join();
    }
    let mut tail: Vec<String> = tail
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .cloned()
        .collect();
    if tail.iter().all(|l| l.trim().is_empty()) {
        let text = String::from_utf8_lossy(&stdout);
        let lines: Vec<&str> = text.lines().collect();
        let start = lines.len().saturating_sub(STDERR_TAIL_LINES);
        tail = lines[start..].iter().map(|s| s.to_string()).collect();
    }
    Ok(Finished {
        status,
        stdout,
        tail,
    })
}

impl CommandRunExt for Command {
    fn run(&mut self) -> Result<()> {
        let f = execute(self, None, true, false)?;
        f.check(self, &[0]).map(|_| ())
    }

    fn run_stdout(&mut self) -> Result<String> {
        let f = execute(self, None, true, false)?;
        f.check(self, &[0])?;
        Ok(String::from_utf8_lossy(&f.stdout).into_owned())
    }

    fn run_with_stdin(&mut self, input: &[u8]) -> Result<String> {
        let f = execute(self, Some(input), true, false)?;
        f.check(self, &[0])?;
        Ok(String::from_utf8_lossy(&f.stdout).into_owned())
    }

    fn run_accepting(&mut self, ok_codes: &[i32]) -> Result<i32> {
        let f = execute(self, None, true, false)?;
        f.check(self, ok_codes)
    }

    fn run_accepting_output(&mut self, ok_codes: &[i32]) -> Result<(i32, String, Vec<String>)> {
        let f = execute(self, None, true, false)?;
        let code = f.check(self, ok_codes)?;
        Ok((
            code,
            String::from_utf8_lossy(&f.stdout).into_owned(),
            f.tail,
        ))
    }

    fn run_streaming(&mut self, show: bool) -> Result<()> {
        let f = execute(self, None, false, show)?;
        f.check(self, &[0]).map(|_| ())
    }
}

/// Forwards lines from a child's pipe to our stderr and keeps the last few for errors; says on
/// `done` when the pipe ended.
fn pump(
    pipe: impl std::io::Read + Send + 'static,
    show: bool,
    tail: Arc<Mutex<VecDeque<String>>>,
    done: std::sync::mpsc::Sender<()>,
) {
    std::thread::spawn(move || {
        use std::io::BufRead;
        let reader = std::io::BufReader::new(pipe);
        for line in reader.split(b'\n') {
            let Ok(line) = line else { break };
            // A program may print the URLs it was given, credentials and all.
            let line = crate::redact::owned(&String::from_utf8_lossy(&line));
            crate::progress::observe(&line);
            if show {
                crate::progress::print(&format!("    {line}"));
            }
            let mut t = tail.lock().unwrap_or_else(|e| e.into_inner());
            if t.len() == STDERR_TAIL_LINES {
                t.pop_front();
            }
            t.push_back(line);
        }
        let _ = done.send(());
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failing_command_reports_its_stderr_tail() {
        let err = Command::new("sh")
            .args(["-c", "echo first >&2; echo boom >&2; exit 3"])
            .run()
            .unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("exit code 3"), "{msg}");
        assert!(msg.contains("boom"), "{msg}");
    }

    #[test]
    fn accepted_codes_pass() {
        let code = Command::new("sh")
            .args(["-c", "exit 1"])
            .run_accepting(&[0, 1])
            .unwrap();
        assert_eq!(code, 1);
    }

    #[test]
    fn stdin_is_fed() {
        let out = Command::new("cat").run_with_stdin(b"hello").unwrap();
        assert_eq!(out, "hello");
    }

    #[test]
    fn streaming_keeps_the_tail_for_errors() {
        let err = Command::new("sh")
            .args(["-c", "echo out-line; echo err-line >&2; exit 4"])
            .run_streaming(false)
            .unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("out-line") && msg.contains("err-line"),
            "{msg}"
        );
    }

    #[test]
    fn a_process_left_holding_the_output_does_not_hang_the_step() {
        let t = Instant::now();
        // The child exits at once; the background sleep keeps stdout and stderr open.
        let out = Command::new("sh")
            .args(["-c", "echo before; setsid sleep 30 & echo after"])
            .run_stdout()
            .unwrap();
        assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
        assert!(out.contains("before") && out.contains("after"), "{out}");
        let t = Instant::now();
        Command::new("sh")
            .args(["-c", "setsid sleep 30 >&2 & exit 0"])
            .run_streaming(false)
            .unwrap();
        assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
    }

    #[test]
    fn credentials_never_reach_logs_or_errors() {
        let mut c = Command::new("sh");
        c.args([
            "-c",
            "echo fetching http://user:hunter2@m.example/debian >&2; exit 1",
            "http://user:hunter2@m.example/debian",
        ]);
        assert!(
            !command_line(&c).contains("hunter2"),
            "{}",
            command_line(&c)
        );
        let msg = format!("{:#}", c.run_streaming(false).unwrap_err());
        assert!(!msg.contains("hunter2"), "{msg}");
        assert!(msg.contains("http://user:***@m.example/debian"), "{msg}");
    }

    #[test]
    fn display_quotes_spaces() {
        let mut c = Command::new("echo");
        c.args(["a b", "c"]);
        assert_eq!(command_line(&c), "echo 'a b' c");
    }
}

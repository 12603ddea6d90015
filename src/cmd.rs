//! The one way debimg runs an external program.
//!
//! Every command is logged at debug level, gets a null stdin unless the caller feeds it, and on
//! failure its error names the command line and carries the tail of its stderr. Arguments are a
//! vector: nothing ever passes through a shell.

use std::ffi::OsStr;
use std::io::Write;
use std::process::{Command, Output, Stdio};

use anyhow::{Context, Result, bail};

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
    /// Runs the command with stdout and stderr inherited (interactive use).
    fn run_inherit(&mut self) -> Result<()>;
    /// Runs a long command: its stdout and stderr lines go to our stderr when `show` is true
    /// (progress for the user; our stdout stays for results), and the last lines go into the
    /// error when it fails either way.
    fn run_streaming(&mut self, show: bool) -> Result<()>;
}

/// Renders a command line for logs and errors.
pub fn command_line(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        s.push(' ');
        s.push_str(&quote(arg));
    }
    s
}

fn quote(arg: &OsStr) -> String {
    let a = arg.to_string_lossy();
    if a.is_empty() || a.contains(|c: char| c.is_whitespace() || c == '\'' || c == '"') {
        format!("'{}'", a.replace('\'', "'\\''"))
    } else {
        a.into_owned()
    }
}

fn stderr_tail(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(STDERR_TAIL_LINES);
    lines[start..].join("\n")
}

fn check(cmd: &Command, out: &Output, ok_codes: &[i32]) -> Result<i32> {
    let code = out.status.code();
    match code {
        Some(c) if ok_codes.contains(&c) => Ok(c),
        _ => {
            let status = match code {
                Some(c) => format!("exit code {c}"),
                None => format!("{}", out.status),
            };
            let mut tail = stderr_tail(&out.stderr);
            if tail.trim().is_empty() {
                tail = stderr_tail(&out.stdout);
            }
            if tail.trim().is_empty() {
                bail!("`{}` failed with {status}", command_line(cmd))
            }
            bail!("`{}` failed with {status}:\n{tail}", command_line(cmd))
        }
    }
}

fn output(cmd: &mut Command, input: Option<&[u8]>) -> Result<Output> {
    tracing::debug!("running {}", command_line(cmd));
    cmd.stdin(if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting `{}`", command_line(cmd)))?;
    if let Some(data) = input {
        let mut stdin = child.stdin.take().expect("stdin was piped");
        // A program that exits without reading its stdin is judged by its exit code below.
        let _ = stdin.write_all(data);
    }
    child
        .wait_with_output()
        .with_context(|| format!("waiting for `{}`", command_line(cmd)))
}

impl CommandRunExt for Command {
    fn run(&mut self) -> Result<()> {
        let out = output(self, None)?;
        check(self, &out, &[0]).map(|_| ())
    }

    fn run_stdout(&mut self) -> Result<String> {
        let out = output(self, None)?;
        check(self, &out, &[0])?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn run_with_stdin(&mut self, input: &[u8]) -> Result<String> {
        let out = output(self, Some(input))?;
        check(self, &out, &[0])?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn run_accepting(&mut self, ok_codes: &[i32]) -> Result<i32> {
        let out = output(self, None)?;
        check(self, &out, ok_codes)
    }

    fn run_inherit(&mut self) -> Result<()> {
        tracing::debug!("running {}", command_line(self));
        let status = self
            .stdin(Stdio::null())
            .status()
            .with_context(|| format!("starting `{}`", command_line(self)))?;
        if !status.success() {
            bail!("`{}` failed with {status}", command_line(self));
        }
        Ok(())
    }

    fn run_streaming(&mut self, show: bool) -> Result<()> {
        tracing::debug!("running {}", command_line(self));
        let mut child = self
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting `{}`", command_line(self)))?;
        let tail = std::sync::Arc::new(std::sync::Mutex::new(std::collections::VecDeque::new()));
        let out = pump(child.stdout.take().expect("piped"), show, tail.clone());
        let err = pump(child.stderr.take().expect("piped"), show, tail.clone());
        let status = child
            .wait()
            .with_context(|| format!("waiting for `{}`", command_line(self)))?;
        let _ = out.join();
        let _ = err.join();
        if !status.success() {
            let t = tail.lock().unwrap_or_else(|e| e.into_inner());
            let text: Vec<&str> = t.iter().map(String::as_str).collect();
            bail!(
                "`{}` failed with {status}:\n{}",
                command_line(self),
                text.join("\n")
            );
        }
        Ok(())
    }
}

/// Forwards lines from a child's pipe to our stderr and keeps the last few for errors.
fn pump(
    pipe: impl std::io::Read + Send + 'static,
    show: bool,
    tail: std::sync::Arc<std::sync::Mutex<std::collections::VecDeque<String>>>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        use std::io::BufRead;
        let reader = std::io::BufReader::new(pipe);
        for line in reader.split(b'\n') {
            let Ok(line) = line else { break };
            let line = String::from_utf8_lossy(&line).into_owned();
            if show {
                eprintln!("    {line}");
            }
            let mut t = tail.lock().unwrap_or_else(|e| e.into_inner());
            if t.len() == STDERR_TAIL_LINES {
                t.pop_front();
            }
            t.push_back(line);
        }
    })
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
    fn display_quotes_spaces() {
        let mut c = Command::new("echo");
        c.args(["a b", "c"]);
        assert_eq!(command_line(&c), "echo 'a b' c");
    }
}

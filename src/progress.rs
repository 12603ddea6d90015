//! A live status line on a terminal, as cargo and mmdebstrap show one: the stage, how long it
//! has run and, while apt downloads, unpacks or sets up packages, how many of how many.
//!
//! Only when stderr is a terminal and [`enable`] was called; otherwise nothing here writes
//! anything, and the log on stderr is exactly what it would be without it. The line is drawn
//! below the log: every line written to stderr through [`print`] clears it first and draws it
//! again after.

use std::io::Write;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::event::Event;
use crate::stage::Stage;

/// How often the line is redrawn (its clock moves).
const TICK: Duration = Duration::from_millis(250);

/// What apt has done of the packages it works on, from the lines it prints.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct AptCounts {
    /// Packages apt said it will upgrade or newly install.
    pub total: u32,
    /// The highest `Get:N` seen: items fetched.
    pub fetched: u32,
    pub unpacked: u32,
    pub set_up: u32,
}

impl AptCounts {
    /// Takes one line of apt's output into account.
    pub fn observe(&mut self, line: &str) {
        let line = line.trim_start();
        if let Some(rest) = line.strip_prefix("Get:") {
            if let Some(n) = rest.split_whitespace().next().and_then(|n| n.parse().ok()) {
                self.fetched = self.fetched.max(n);
            }
        } else if line.starts_with("Unpacking ") {
            self.unpacked += 1;
        } else if line.starts_with("Setting up ") {
            self.set_up += 1;
        } else if line.contains(" upgraded, ") && line.contains(" newly installed") {
            // A new apt run says what it will do: count from here.
            let num = |word: &str| {
                line.split(", ")
                    .find(|part| part.contains(word))
                    .and_then(|part| part.split_whitespace().next())
                    .and_then(|n| n.parse::<u32>().ok())
                    .unwrap_or(0)
            };
            *self = AptCounts {
                total: num("upgraded") + num("newly installed"),
                ..AptCounts::default()
            };
        }
    }

    /// `downloading 3/40`, `unpacking 12/40`, `setting up 40/40`, or nothing.
    pub fn describe(&self) -> Option<String> {
        if self.total == 0 {
            return None;
        }
        let (what, n) = if self.set_up > 0 {
            ("setting up", self.set_up)
        } else if self.unpacked > 0 {
            ("unpacking", self.unpacked)
        } else if self.fetched > 0 {
            ("downloading", self.fetched)
        } else {
            return None;
        };
        Some(format!("{what} {}/{}", n.min(self.total), self.total))
    }
}

struct Status {
    stage: Option<(Stage, Instant)>,
    apt: AptCounts,
    /// The line is on the screen now.
    drawn: bool,
}

static STATUS: Mutex<Option<Status>> = Mutex::new(None);

/// Shows the status line from now on, when stderr is a terminal; does nothing otherwise.
pub fn enable() {
    if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return;
    }
    *lock() = Some(Status {
        stage: None,
        apt: AptCounts::default(),
        drawn: false,
    });
    crate::event::add_sink(on_event);
    std::thread::spawn(|| {
        loop {
            std::thread::sleep(TICK);
            let mut guard = lock();
            let Some(status) = guard.as_mut() else {
                return;
            };
            if status.stage.is_some() {
                draw(status);
            }
        }
    });
}

fn lock() -> std::sync::MutexGuard<'static, Option<Status>> {
    STATUS.lock().unwrap_or_else(|e| e.into_inner())
}

fn on_event(event: &Event) {
    let mut guard = lock();
    let Some(status) = guard.as_mut() else {
        return;
    };
    match event {
        Event::StageStarted { stage } => {
            status.stage = Some((*stage, Instant::now()));
            status.apt = AptCounts::default();
            draw(status);
        }
        Event::StageFinished { .. } | Event::BuildFinished { .. } => {
            status.stage = None;
            clear(status);
        }
        _ => {}
    }
}

/// Takes a line of a program's output (apt's, mmdebstrap's) into account for the status line.
pub fn observe(line: &str) {
    if let Some(status) = lock().as_mut() {
        status.apt.observe(line);
    }
}

/// Writes `text` and a newline to stderr, below the log and above the status line.
pub fn print(text: &str) {
    let mut guard = lock();
    match guard.as_mut() {
        Some(status) => {
            clear(status);
            let _ = writeln!(std::io::stderr().lock(), "{text}");
            if status.stage.is_some() {
                draw(status);
            }
        }
        None => {
            let _ = writeln!(std::io::stderr().lock(), "{text}");
        }
    }
}

/// Writes `bytes` (whole lines: a log event) to stderr like [`print`].
pub fn write_log(bytes: &[u8]) {
    let mut guard = lock();
    let mut err = std::io::stderr().lock();
    match guard.as_mut() {
        Some(status) => {
            clear_on(status, &mut err);
            let _ = err.write_all(bytes);
            if status.stage.is_some() {
                draw_on(status, &mut err);
            }
        }
        None => {
            let _ = err.write_all(bytes);
        }
    }
}

/// The status line's text.
fn render(status: &Status) -> Option<String> {
    let (stage, since) = status.stage?;
    let mut s = format!("[{stage} {:.0}s]", since.elapsed().as_secs_f64());
    if let Some(apt) = status.apt.describe() {
        s.push(' ');
        s.push_str(&apt);
    }
    Some(s)
}

fn draw(status: &mut Status) {
    draw_on(status, &mut std::io::stderr().lock());
}

fn draw_on(status: &mut Status, out: &mut impl Write) {
    // stderr may have become a pipe since (a release's build log takes it): no escapes there.
    if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return;
    }
    if let Some(text) = render(status) {
        let width = terminal_width().saturating_sub(1).max(20);
        let text: String = text.chars().take(width).collect();
        // Carriage return and erase the line: the status line is redrawn in place.
        let _ = write!(out, "\r\x1b[2K{text}");
        let _ = out.flush();
        status.drawn = true;
    }
}

fn clear(status: &mut Status) {
    clear_on(status, &mut std::io::stderr().lock());
}

fn clear_on(status: &mut Status, out: &mut impl Write) {
    if status.drawn {
        let _ = write!(out, "\r\x1b[2K");
        let _ = out.flush();
        status.drawn = false;
    }
}

/// The terminal's width in columns (80 when it cannot be asked).
fn terminal_width() -> usize {
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ fills a winsize struct for a terminal descriptor; on failure it is
    // left zeroed.
    let rc = unsafe { libc::ioctl(2, libc::TIOCGWINSZ, &mut ws) };
    if rc == 0 && ws.ws_col > 0 {
        ws.ws_col as usize
    } else {
        80
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apt_lines_count_packages() {
        let mut c = AptCounts::default();
        c.observe("Get:1 http://m.example/debian bookworm InRelease [151 kB]");
        assert_eq!(
            c.describe(),
            None,
            "nothing to count before apt says how many"
        );
        c.observe("0 upgraded, 3 newly installed, 0 to remove and 0 not upgraded.");
        assert_eq!(c.total, 3);
        c.observe("Get:1 http://m.example/debian bookworm/main amd64 less amd64 590-2 [132 kB]");
        c.observe("    Get:2 http://m.example/debian bookworm/main amd64 curl amd64 7.88 [315 kB]");
        assert_eq!(c.describe().as_deref(), Some("downloading 2/3"));
        c.observe("Unpacking less (590-2.1~deb12u2) ...");
        assert_eq!(c.describe().as_deref(), Some("unpacking 1/3"));
        for _ in 0..4 {
            c.observe("Setting up less (590-2.1~deb12u2) ...");
        }
        assert_eq!(c.describe().as_deref(), Some("setting up 3/3"));
        c.observe("2 upgraded, 5 newly installed, 1 to remove and 0 not upgraded.");
        assert_eq!((c.total, c.set_up), (7, 0));
    }

    #[test]
    fn the_line_shows_stage_time_and_counts() {
        let mut s = Status {
            stage: Some((Stage::Install, Instant::now())),
            apt: AptCounts {
                total: 40,
                unpacked: 12,
                ..AptCounts::default()
            },
            drawn: false,
        };
        assert_eq!(render(&s).as_deref(), Some("[install 0s] unpacking 12/40"));
        // Drawn only where stderr is a terminal.
        let mut out = Vec::new();
        draw_on(&mut s, &mut out);
        if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            assert_eq!(out, b"\r\x1b[2K[install 0s] unpacking 12/40");
        } else {
            assert!(out.is_empty());
        }
        s.drawn = true;
        let mut out = Vec::new();
        clear_on(&mut s, &mut out);
        assert_eq!(out, b"\r\x1b[2K");
        s.stage = None;
        assert_eq!(render(&s), None);
    }
}

//! What a build reports to a program that drives it: one event per step, with a `reason` as
//! cargo's `--message-format json` has. `debimg build --message-format json` writes them as JSON
//! lines on stdout; a library caller installs its own sink. The schema is in `docs/events.md`.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Mutex;

use serde::Serialize;

use crate::error::ErrorReport;
use crate::stage::Stage;

/// How a build ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BuildOutcome {
    /// It built and published its outputs.
    Built,
    /// The outputs matched the spec: nothing was built.
    Reused,
    /// It failed (see the error).
    Failed,
}

/// One thing that happened in a build.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(tag = "reason", rename_all = "kebab-case")]
pub enum Event {
    /// The build is about to start (after its spec was read and planned).
    BuildStarted {
        name: String,
        spec_digest: String,
    },
    StageStarted {
        stage: Stage,
    },
    StageFinished {
        stage: Stage,
        seconds: f64,
    },
    /// A file the build published (or reused), with its size and sha256.
    Artifact {
        name: String,
        path: PathBuf,
        size: u64,
        sha256: String,
    },
    BuildFinished {
        outcome: BuildOutcome,
        seconds: f64,
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<ErrorReport>,
    },
}

type Sink = Box<dyn FnMut(&Event) + Send>;

static SINKS: Mutex<Vec<Sink>> = Mutex::new(Vec::new());

fn sinks() -> std::sync::MutexGuard<'static, Vec<Sink>> {
    SINKS.lock().unwrap_or_else(|e| e.into_inner())
}

/// Sends every later event to `sink`, and to it alone.
pub fn set_sink(sink: impl FnMut(&Event) + Send + 'static) {
    let mut s = sinks();
    s.clear();
    s.push(Box::new(sink));
}

/// Sends every later event to `sink` too.
pub fn add_sink(sink: impl FnMut(&Event) + Send + 'static) {
    sinks().push(Box::new(sink));
}

/// Writes every later event to stdout as one JSON line, flushed at once.
pub fn json_lines_to_stdout() {
    add_sink(|e| {
        let mut out = std::io::stdout().lock();
        // A closed stdout (the reader went away) must not stop the build.
        let _ = serde_json::to_writer(&mut out, e);
        let _ = out.write_all(b"\n");
        let _ = out.flush();
    });
}

/// Reports `event` to every sink.
pub fn emit(event: &Event) {
    for sink in sinks().iter_mut() {
        sink(event);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_json_with_a_reason() {
        let lines: Vec<String> = [
            Event::BuildStarted {
                name: "m".into(),
                spec_digest: "ab".into(),
            },
            Event::StageFinished {
                stage: Stage::Install,
                seconds: 1.5,
            },
            Event::BuildFinished {
                outcome: BuildOutcome::Reused,
                seconds: 0.1,
                error: None,
            },
        ]
        .iter()
        .map(|e| serde_json::to_string(e).unwrap())
        .collect();
        assert_eq!(
            lines,
            [
                r#"{"reason":"build-started","name":"m","spec_digest":"ab"}"#,
                r#"{"reason":"stage-finished","stage":"install","seconds":1.5}"#,
                r#"{"reason":"build-finished","outcome":"reused","seconds":0.1}"#,
            ]
        );
    }
}

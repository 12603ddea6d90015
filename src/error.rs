//! The library's error at its boundary: what kind of failure, in which stage, and the whole
//! chain of what was being done. A caller (the CLI, the build service) matches on
//! [`Error::kind`]; each kind has its own exit code.
//!
//! Inside, debimg works with `anyhow` and its contexts. Where a failure of a kind a caller must
//! tell apart arises, it is raised as [`Error::tagged`]; [`Error::classify`] finds that tag in
//! a chain at the boundary (or says `Failed`), and an interrupted build is `Interrupted`
//! whatever its last error was.

use std::fmt;

use serde::Serialize;

use crate::signals;
use crate::spec::SpecError;
use crate::stage::Stage;

/// Exit code of a usage error (a bad argument), as for an invalid spec.
pub const EXIT_USAGE: u8 = 2;

/// What went wrong, as a caller tells failures apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The spec (or fuel input) is invalid: every problem is named with its field.
    InvalidSpec,
    /// Another build holds the output directory (and `--wait` was not given).
    OutputLocked,
    /// Host tools the build needs are missing (named with their packages).
    MissingTools,
    /// The build directory, its `--tmpfs` or the output's disk is (nearly) full.
    NoSpace,
    /// Something on the host debimg refuses to use: a cache other users can write, a link where
    /// a file of debimg's belongs, a release directory it did not make.
    Refused,
    /// A `--vm` build went over its machine's memory or wall-clock limit.
    LimitExceeded,
    /// A signal (INT, TERM, HUP) stopped the build; the number is the signal's.
    Interrupted(i32),
    /// Anything else: a stage failed (the error says which), or the build could not start.
    Failed,
}

impl ErrorKind {
    /// The kind's name in `--message-format json` and the docs.
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::InvalidSpec => "invalid-spec",
            ErrorKind::OutputLocked => "output-locked",
            ErrorKind::MissingTools => "missing-tools",
            ErrorKind::NoSpace => "no-space",
            ErrorKind::Refused => "refused",
            ErrorKind::LimitExceeded => "limit-exceeded",
            ErrorKind::Interrupted(_) => "interrupted",
            ErrorKind::Failed => "failed",
        }
    }

    /// The process exit code of a failure of this kind.
    pub fn exit_code(self) -> u8 {
        match self {
            ErrorKind::Failed => 1,
            ErrorKind::InvalidSpec => 2,
            ErrorKind::OutputLocked => 3,
            ErrorKind::MissingTools => 4,
            ErrorKind::NoSpace => 5,
            ErrorKind::Refused => 6,
            ErrorKind::LimitExceeded => 7,
            ErrorKind::Interrupted(sig) => 128u8.saturating_add(sig as u8),
        }
    }

    /// Every kind with its exit code and meaning, for `--help` and the docs.
    pub const TABLE: &[(&str, &str, &str)] = &[
        ("failed", "1", "a stage failed (the error names it)"),
        (
            "invalid-spec",
            "2",
            "the spec or the command line is invalid",
        ),
        (
            "output-locked",
            "3",
            "another build writes the output directory",
        ),
        (
            "missing-tools",
            "4",
            "host tools are missing (named with their packages)",
        ),
        ("no-space", "5", "the build directory or --tmpfs is full"),
        (
            "refused",
            "6",
            "debimg refuses a host directory or file (a cache others can write, a link)",
        ),
        (
            "limit-exceeded",
            "7",
            "a --vm build went over its memory or wall-clock limit",
        ),
        (
            "interrupted",
            "128+N",
            "signal N (INT 130, TERM 143, HUP 129) stopped the build",
        ),
    ];
}

/// A failure at the library's boundary.
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    stage: Option<Stage>,
    source: anyhow::Error,
    /// Already printed on stderr (into a release's build log): not to be printed again.
    reported: bool,
}

/// The tag a failure of a particular kind carries down an `anyhow` chain.
#[derive(Debug)]
struct Tag {
    kind: ErrorKind,
    message: String,
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Tag {}

impl Error {
    /// An error of `kind` saying `message`, for `anyhow` code to return (`Err(...)?`); the kind
    /// survives the contexts added on the way out.
    pub fn tagged(kind: ErrorKind, message: impl Into<String>) -> anyhow::Error {
        anyhow::Error::new(Tag {
            kind,
            message: message.into(),
        })
    }

    /// `err` with `message` added as its context and `kind` as its kind (for a failure that
    /// turns out to be of a kind only after the fact, as a full disk behind an I/O error).
    pub fn retag(err: anyhow::Error, kind: ErrorKind, message: impl Into<String>) -> anyhow::Error {
        err.context(Tag {
            kind,
            message: message.into(),
        })
    }

    /// The boundary's view of an internal error: its kind (from a tag in its chain; an
    /// interrupted build is `Interrupted` whatever failed last) and the stage it failed in.
    pub fn classify(err: anyhow::Error, stage: Option<Stage>) -> Error {
        let err = match err.downcast::<Error>() {
            Ok(mut e) => {
                if e.stage.is_none() {
                    e.stage = stage;
                }
                return e;
            }
            Err(err) => err,
        };
        // anyhow finds a tag among its contexts; the chain, one among the sources.
        let tagged = err
            .downcast_ref::<Tag>()
            .map(|t| t.kind)
            .or_else(|| {
                err.chain()
                    .find_map(|c| c.downcast_ref::<Tag>().map(|t| t.kind))
            })
            .or_else(|| {
                err.chain().find_map(|c| {
                    c.downcast_ref::<SpecError>()
                        .map(|_| ErrorKind::InvalidSpec)
                })
            });
        let kind = match signals::interrupted() {
            Some(sig) => ErrorKind::Interrupted(sig),
            None => tagged.unwrap_or(ErrorKind::Failed),
        };
        Error {
            kind,
            stage,
            source: err,
            reported: false,
        }
    }

    /// This error, found after the fact to be of `kind` (a full disk behind an I/O error),
    /// with `message` saying so; an interruption stays one.
    pub fn found_to_be(mut self, kind: ErrorKind, message: impl Into<String>) -> Error {
        if !matches!(self.kind, ErrorKind::Interrupted(_)) {
            self.kind = kind;
        }
        let message: String = message.into();
        self.source = self.source.context(message);
        self
    }

    /// The error of a build process that exited with `code` and reported its error itself:
    /// its kind from the code, nothing more to print.
    pub fn exited(code: u8) -> Error {
        let kind = match code {
            2 => ErrorKind::InvalidSpec,
            3 => ErrorKind::OutputLocked,
            4 => ErrorKind::MissingTools,
            5 => ErrorKind::NoSpace,
            6 => ErrorKind::Refused,
            7 => ErrorKind::LimitExceeded,
            c if c > 128 => ErrorKind::Interrupted(i32::from(c - 128)),
            _ => ErrorKind::Failed,
        };
        Error {
            kind,
            stage: None,
            source: anyhow::anyhow!("the build exited with code {code}"),
            reported: true,
        }
    }

    /// Marks the error as printed on stderr already.
    pub fn reported(mut self) -> Error {
        self.reported = true;
        self
    }

    /// True when the error was printed on stderr already.
    pub fn is_reported(&self) -> bool {
        self.reported
    }

    /// What went wrong.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The stage it went wrong in, if the build had started one.
    pub fn stage(&self) -> Option<Stage> {
        self.stage
    }

    /// The process exit code for it.
    pub fn exit_code(&self) -> u8 {
        self.kind.exit_code()
    }

    /// The whole chain of what was being done, without the stage prefix.
    pub fn message(&self) -> String {
        crate::redact::owned(&format!("{:#}", self.source))
    }

    /// What `--message-format json` says of it.
    pub fn report(&self) -> ErrorReport {
        ErrorReport {
            kind: self.kind.name(),
            signal: match self.kind {
                ErrorKind::Interrupted(sig) => Some(sig),
                _ => None,
            },
            stage: self.stage,
            message: self.message(),
            exit_code: self.exit_code(),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.stage {
            Some(stage) => write!(f, "stage {stage} failed: {:#}", self.source),
            None => write!(f, "{:#}", self.source),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(self.source.as_ref())
    }
}

impl From<anyhow::Error> for Error {
    /// [`Error::classify`] without a stage: lets `?` carry a helper's `anyhow` error (a file
    /// written with [`crate::root::Root`]) out of a function that returns [`Error`].
    fn from(e: anyhow::Error) -> Error {
        Error::classify(e, None)
    }
}

impl From<SpecError> for Error {
    fn from(e: SpecError) -> Error {
        Error {
            kind: ErrorKind::InvalidSpec,
            stage: None,
            source: anyhow::Error::new(e),
            reported: false,
        }
    }
}

/// A failure as `--message-format json` reports it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ErrorReport {
    pub kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stage: Option<Stage>,
    pub message: String,
    pub exit_code: u8,
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn a_tag_survives_contexts_and_a_stage_is_kept() {
        let inner: anyhow::Result<()> = Err(Error::tagged(
            ErrorKind::OutputLocked,
            "another debimg build is writing to /out",
        ));
        let err = inner.context("taking the lock").unwrap_err();
        let e = Error::classify(err, Some(Stage::Mount));
        assert_eq!(e.kind(), ErrorKind::OutputLocked);
        assert_eq!(e.exit_code(), 3);
        assert_eq!(e.stage(), Some(Stage::Mount));
        assert_eq!(
            e.to_string(),
            "stage mount failed: taking the lock: another debimg build is writing to /out"
        );
        // Classified twice: the same error, the first stage kept.
        let again = Error::classify(anyhow::Error::new(e), Some(Stage::Publish));
        assert_eq!(again.stage(), Some(Stage::Mount));
        let r = again.report();
        assert_eq!(
            (r.kind, r.stage, r.exit_code),
            ("output-locked", Some(Stage::Mount), 3)
        );
    }

    #[test]
    fn a_kind_found_after_the_fact_is_kept() {
        let err: anyhow::Result<()> = Err(anyhow::anyhow!("writing x: Input/output error"));
        let err = err.context("stage package").unwrap_err();
        let err = Error::retag(
            err,
            ErrorKind::NoSpace,
            "no space left in the build directory",
        );
        let e = Error::classify(err.context("outer"), Some(Stage::Package));
        assert_eq!(e.kind(), ErrorKind::NoSpace);
        assert!(e.message().contains("no space left") && e.message().contains("Input/output"));
    }

    #[test]
    fn untagged_is_failed_and_every_kind_has_its_code() {
        let e = Error::classify(anyhow::anyhow!("boom"), None);
        assert_eq!(e.kind(), ErrorKind::Failed);
        assert_eq!(e.to_string(), "boom");
        let codes: Vec<u8> = [
            ErrorKind::Failed,
            ErrorKind::InvalidSpec,
            ErrorKind::OutputLocked,
            ErrorKind::MissingTools,
            ErrorKind::NoSpace,
            ErrorKind::Refused,
            ErrorKind::Interrupted(2),
        ]
        .iter()
        .map(|k| k.exit_code())
        .collect();
        assert_eq!(codes, [1, 2, 3, 4, 5, 6, 130]);
        for (name, code, _) in ErrorKind::TABLE {
            assert!(!name.is_empty() && !code.is_empty());
        }
    }
}

//! debimg: Debian-family OS images from a YAML spec.
//!
//! The pipeline: [`Spec`] (validated YAML) → the build host's part ([`host`]: its mirrors
//! resolved, the one step before the plan that may ask the network) → [`Plan`] (pure decisions:
//! mirrors, mount order, output names, spec digest) → [`Creator`] (the one orchestrator: the build's [`Stage`]s in
//! order over one build context) → the outputs and their metadata. [`job::Job`] is
//! `debimg build` as one call (releases, bundles, fuel-agent's metadata, [`Event`]s), run in
//! namespaces of its own by [`isolated`]; failures are an [`Error`] whose [`ErrorKind`] a caller
//! matches on. The `debimg` binary is a thin front-end: it parses [`cli`] and calls the command's
//! body in the module of its subject; `docs/architecture.md` maps the modules.

pub mod boottest;
pub mod cache;
pub mod cli;
pub mod creator;
pub mod environ;
pub mod error;
pub mod event;
pub mod fuel;
pub mod host;
pub mod input;
pub mod job;
pub mod kind;
pub mod lockfile;
pub mod metadata;
pub mod openpgp;
pub mod output;
pub mod pack;
pub mod plan;
pub mod progress;
pub mod redact;
pub mod reproducible;
pub mod root;
pub mod sbom;
pub mod service;
pub mod signals;
pub mod spec;
pub mod stage;
pub mod sys;
pub mod verify;
pub mod vm;

// Internals, public only for the tests and fuzz targets that check them against the docs.
#[doc(hidden)]
pub mod debian;
#[doc(hidden)]
pub mod post;

pub(crate) mod attachments;
pub(crate) mod cmd;
pub(crate) mod preflight;
pub(crate) mod records;
pub(crate) mod workspace;

pub use creator::{BuildOptions, Creator, Outcome};
pub use error::{Error, ErrorKind};
pub use event::Event;
pub use plan::Plan;
pub use spec::Spec;
pub use stage::Stage;
pub use sys::namespace::isolated;

//! debimg: Debian-family OS images from a YAML spec.
//!
//! The pipeline: [`spec::Spec`] (validated YAML) → [`plan::Plan`] (pure decisions: mirrors,
//! mount order, output names, spec digest) → [`build::build`] (disks, debootstrap, apt,
//! configure, release, shrink, package, metadata). The `debimg` binary is a thin front-end.

pub mod boottest;
pub mod build;
pub mod cache;
pub mod cmd;
pub mod creator;
pub mod debian;
pub mod fuel;
pub mod kind;
pub mod metadata;
pub mod output;
pub mod pack;
pub mod plan;
pub mod post;
pub mod records;
pub mod redact;
pub mod release;
pub mod root;
pub mod signals;
pub mod spec;
pub mod sys;

pub use build::{BuildOptions, Outcome, build};
pub use creator::Creator;
pub use plan::Plan;
pub use spec::Spec;

//! The one list of a build's stages.
//!
//! [`Stage`] is the only place stage names are written: the orchestrator
//! ([`crate::creator`]) runs stages by it, the log lines, the `--message-format json` events,
//! the fault-injection hook and the reliability matrix take their names from it, and a test
//! checks the README and `docs/architecture.md` against [`Stage::ALL`].

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The test-only fault hook: `DEBIMG_TEST_FAULT=<stage>:fail` fails the build at the end of that
/// stage (its resources held), `<stage>:pause` announces `debimg-test: paused in stage <stage>`
/// on stderr and waits there for a signal. The fault-injection tests drive every stage with it;
/// `publish:kill-at-N` kills the process before step N of publishing, `install:tree-mismatch`
/// takes a warm install from a cached tree back to the base.
pub const FAULT_ENV: &str = "DEBIMG_TEST_FAULT";

/// A stage of a build, in the order a build runs them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    Mount,
    Bootstrap,
    Install,
    Configure,
    Unmount,
    Finish,
    Package,
    Publish,
}

impl Stage {
    /// Every stage, in the order a build runs them.
    pub const ALL: [Stage; 8] = [
        Stage::Mount,
        Stage::Bootstrap,
        Stage::Install,
        Stage::Configure,
        Stage::Unmount,
        Stage::Finish,
        Stage::Package,
        Stage::Publish,
    ];

    /// The stage's name in logs, events, fault injection and docs.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Mount => "mount",
            Stage::Bootstrap => "bootstrap",
            Stage::Install => "install",
            Stage::Configure => "configure",
            Stage::Unmount => "unmount",
            Stage::Finish => "finish",
            Stage::Package => "package",
            Stage::Publish => "publish",
        }
    }

    /// What the stage does, in a line (the docs show it).
    pub fn summary(self) -> &'static str {
        match self {
            Stage::Mount => {
                "the workspace; sparse files on loop devices, mkfs, filesystems mounted depth-sorted"
            }
            Stage::Bootstrap => {
                "policy-rc.d, then mmdebstrap or debootstrap, or the cached base tree, or a cached installed tree (`debian::trees`)"
            }
            Stage::Install => {
                "fresh proc, sysfs and devpts; apt sources, pins, update, dist-upgrade, install (from a cached subset: the difference, checked against a simulated cold install); the installed tree stored"
            }
            Stage::Configure => {
                "system settings, files, users, services, post scripts, bootloader, records; build-only files removed"
            }
            Stage::Unmount => {
                "processes left in the chroot ended, its mounts gone, attachments copied out, filesystems unmounted deepest first, devices detached"
            }
            Stage::Finish => "filesystems checked and shrunk, or the tree archived",
            Stage::Package => "each image read once: digests, gzip or qcow2, under temporary names",
            Stage::Publish => {
                "a journal of the renames as the commit, then the outputs renamed into place (the attachments directory whole), the metadata last"
            }
        }
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Stage {
    type Err = String;

    fn from_str(s: &str) -> Result<Stage, String> {
        Stage::ALL
            .into_iter()
            .find(|st| st.name() == s)
            .ok_or_else(|| {
                format!(
                    "`{s}` is not a stage (stages: {})",
                    Stage::ALL.map(Stage::name).join(", ")
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_in_order() {
        let names: Vec<&str> = Stage::ALL.iter().map(|s| s.name()).collect();
        assert_eq!(
            names,
            [
                "mount",
                "bootstrap",
                "install",
                "configure",
                "unmount",
                "finish",
                "package",
                "publish"
            ]
        );
        for s in Stage::ALL {
            assert_eq!(s.name().parse::<Stage>().unwrap(), s);
            assert_eq!(serde_json::to_value(s).unwrap(), s.name());
        }
        assert!(Stage::ALL.windows(2).all(|w| w[0] < w[1]));
        let e = "disks".parse::<Stage>().unwrap_err();
        assert!(e.contains("mount, bootstrap"), "{e}");
    }
}

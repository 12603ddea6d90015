//! Reproducible builds: what makes two builds of one spec and one package set, at different
//! times and in different directories, give the same bytes. The pure part: the variable, the
//! identifiers and the lists; the steps that carry them out live with their subjects.
//!
//! A build is reproducible when its plan has a `source_date_epoch` (the spec's, or
//! `SOURCE_DATE_EPOCH` from the environment: [`from_env`]). Then: every program run in the image
//! sees `SOURCE_DATE_EPOCH` (shadow's last-change day, initramfs-tools' archive times);
//! identifiers that are random otherwise (filesystem UUIDs, ext hash seeds) are derived from the
//! spec's digest ([`seeded_uuid`], [`fs_uuid`]); files that only record the build ([`RESIDUE`],
//! [`APT_LISTS`]) are removed ([`crate::debian::configure::scrub_residue`]); every file time
//! later than the epoch is clamped to it; and each ext2/3/4 image is written afresh from its
//! finished tree by `mke2fs -d` ([`crate::pack::rewrite`]).

use anyhow::{Result, bail};
use sha2::{Digest, Sha256};

/// The environment variable of reproducible-builds.org.
pub const ENV: &str = "SOURCE_DATE_EPOCH";

/// `SOURCE_DATE_EPOCH` from the environment: none when unset or empty, an error naming the
/// variable when it is not a number of seconds.
pub fn from_env() -> Result<Option<u64>> {
    match std::env::var(ENV) {
        Ok(v) if v.trim().is_empty() => Ok(None),
        Ok(v) => v.trim().parse::<u64>().map(Some).map_err(|_| {
            anyhow::anyhow!("{ENV}={v:?} is not a number of seconds since 1970 (UTC)")
        }),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(e) => bail!("{ENV}: {e}"),
    }
}

/// A UUID that every build of the plan with `digest` gets for `purpose` (`fs:/boot`): a
/// version 8 (custom) UUID from sha256 of both.
pub fn seeded_uuid(digest: &str, purpose: &str) -> String {
    let h = Sha256::digest(format!("debimg uuid\0{digest}\0{purpose}").as_bytes());
    let mut b = [0u8; 16];
    b.copy_from_slice(&h[..16]);
    b[6] = (b[6] & 0x0f) | 0x80;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex = crate::pack::digest::hex(&b);
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

/// The UUID of the filesystem at `mount` in a reproducible build (one with an `epoch`) whose
/// spec has `digest`: derived from it. None otherwise: the filesystem gets a fresh one from
/// the kernel ([`crate::sys::mkfs::new_uuid`]).
pub fn fs_uuid(epoch: Option<u64>, digest: &str, mount: &str) -> Option<String> {
    epoch.map(|_| seeded_uuid(digest, &format!("fs:{mount}")))
}

/// Files that record the build, not the system: its logs, caches made from the clock or from
/// the order the build ran in, and seeds (mmdebstrap's list, and what the packages debimg's
/// tests install leave).
pub const RESIDUE: &[&str] = &[
    "var/log/dpkg.log",
    "var/log/alternatives.log",
    "var/log/bootstrap.log",
    "var/log/apt/history.log",
    "var/log/apt/term.log",
    "var/log/apt/eipp.log.xz",
    "var/cache/ldconfig/aux-cache",
    "var/lib/dbus/machine-id",
    "var/lib/systemd/random-seed",
    "var/cache/man/index.db",
];

/// Where apt keeps the repositories' indexes: they change whenever the mirror does, so an
/// image rebuilt later from the same lock would differ in them. A reproducible image ships
/// without them (`apt-get update` fetches them on the machine).
pub const APT_LISTS: &str = "var/lib/apt/lists";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_uuids_follow_the_digest_and_purpose_only() {
        let a = seeded_uuid("d1", "fs:/");
        assert_eq!(a, seeded_uuid("d1", "fs:/"));
        assert_ne!(a, seeded_uuid("d1", "fs:/boot"));
        assert_ne!(a, seeded_uuid("d2", "fs:/"));
        assert_eq!(a.len(), 36);
        let parts: Vec<&str> = a.split('-').collect();
        assert_eq!(
            parts.iter().map(|p| p.len()).collect::<Vec<_>>(),
            [8, 4, 4, 4, 12]
        );
        assert!(parts[2].starts_with('8'), "version 8: {a}");
        assert!("89ab".contains(&parts[3][..1]), "RFC variant: {a}");
        assert_eq!(fs_uuid(Some(1), "d1", "/").as_deref(), Some(a.as_str()));
        assert_eq!(fs_uuid(None, "d1", "/"), None);
    }
}

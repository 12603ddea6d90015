//! `debimg serve` from the command line: its options made into the service's [`Config`], or one
//! of its token actions on the store.

use std::path::Path;

use anyhow::{Result, anyhow, bail, ensure};

use super::Config;
use super::store::{Limits, Role, Store};
use crate::cli::{ServeAction, ServeArgs, TokenAction};

/// `debimg serve`: the service until INT or TERM; with an action, that action (`token add`
/// prints the new token alone on stdout, `token list` a line per token).
pub fn serve(action: Option<&ServeAction>, args: &ServeArgs) -> Result<(), crate::error::Error> {
    match action {
        Some(ServeAction::Token { action }) => token(action)?,
        None => {
            if args.local_workers > 0 && !nix::unistd::geteuid().is_root() {
                return Err(anyhow!(
                    "local workers build as root: run `debimg serve` as root, or with \
                     --local-workers 0 and workers elsewhere"
                )
                .into());
            }
            super::http::serve(config(args)?)?;
        }
    }
    Ok(())
}

/// The service's configuration from `serve`'s options.
fn config(args: &ServeArgs) -> Result<Config> {
    Ok(Config {
        listen: args.listen.clone(),
        state_dir: args.state_dir.clone(),
        local_workers: args.local_workers,
        post_creation: args.post_creation.clone(),
        cache_dir: args.cache_dir.clone(),
        build_dir: args.build_dir.clone(),
        max_spec_bytes: args.max_spec_bytes,
        limits: Limits {
            queued: Some(args.max_queued),
            running: Some(args.max_running),
            stored_bytes: Some(args.max_stored),
            jobs: Some(args.max_jobs),
        },
        max_attempts: args.max_attempts.max(1),
        debimg: std::env::current_exe()?,
        lease_secs: args.lease_secs,
        amqp: args.amqp.clone(),
        max_streams: args.max_streams,
        isolation: args.isolation,
        post_creation_timeout: std::time::Duration::from_secs(args.post_creation_timeout),
        max_upload_bytes: args.max_upload,
        keep_jobs: (args.keep_jobs > 0)
            .then(|| std::time::Duration::from_secs(args.keep_jobs * 86400)),
    })
}

/// `debimg serve token add|list|remove`.
fn token(action: &TokenAction) -> Result<()> {
    match action {
        TokenAction::Add {
            name,
            role,
            admin,
            state_dir,
        } => {
            let role = if *admin { Role::Admin } else { *role };
            ensure!(
                !name.is_empty() && name.len() <= 64 && !name.chars().any(char::is_control),
                "a token's name is 1 to 64 characters, without control characters"
            );
            let token = open(state_dir)?.add_token(name, role)?;
            println!("{token}");
        }
        TokenAction::List { state_dir } => {
            for t in open(state_dir)?.tokens()? {
                println!("{}\t{}\t{}", t.name, t.role.as_str(), t.created);
            }
        }
        TokenAction::Remove { name, state_dir } => {
            if !open(state_dir)?.remove_token(name)? {
                bail!("there is no token named `{name}`");
            }
        }
    }
    Ok(())
}

/// The store in the state directory `dir`, which is made (or checked) first.
fn open(dir: &Path) -> Result<Store> {
    super::prepare_state_dir(dir)?;
    Store::open(dir)
}

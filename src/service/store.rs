//! The job store: one SQLite file (WAL) under the state directory, the truth about tokens, jobs
//! and builds. A job is what a user submitted; a build is what runs. Jobs whose specs are
//! identical while one is in flight share one build.
//!
//! Every change that decides something (a claim, a finish, a cancel) is one transaction; a claim
//! hands out a lease token that every later report of that worker must carry, so a worker that
//! lost its lease (and the job was given to another) cannot change the job any more.

use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use anyhow::{Context, Result};
use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;
use sha2::{Digest, Sha256};

/// The file name of the database in the state directory.
pub const DB_FILE: &str = "debimg.sqlite";

/// The states a job or a build can be in.
pub const STATES: &[&str] = &["queued", "running", "succeeded", "failed", "cancelled"];

/// A state after which nothing runs any more.
pub fn is_terminal(state: &str) -> bool {
    matches!(state, "succeeded" | "failed" | "cancelled")
}

/// Seconds since the epoch, now.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn rfc3339(secs: Option<i64>) -> Option<String> {
    secs.map(|s| crate::metadata::rfc3339(s.max(0) as u64))
}

/// `n` random bytes from the kernel, as lowercase hex.
pub fn random_hex(n: usize) -> String {
    let mut buf = vec![0u8; n];
    getrandom_fill(&mut buf);
    hex(&buf)
}

fn getrandom_fill(buf: &mut [u8]) {
    let mut filled = 0;
    while filled < buf.len() {
        // SAFETY: the pointer and length describe the unfilled rest of `buf`.
        let r =
            unsafe { libc::getrandom(buf[filled..].as_mut_ptr().cast(), buf.len() - filled, 0) };
        if r > 0 {
            filled += r as usize;
        } else if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            panic!("getrandom failed: {}", std::io::Error::last_os_error());
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The sha256 of a token, as stored (the token itself never is).
pub fn token_hash(token: &str) -> String {
    hex(&Sha256::digest(token.as_bytes()))
}

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Submits jobs and sees its own.
    User,
    /// Sees every job and is not limited; builds nothing.
    Admin,
    /// Claims queued builds and reports the ones it holds; sees no job.
    Worker,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::User => "user",
            Role::Admin => "admin",
            Role::Worker => "worker",
        }
    }
}

/// Who is calling: a token's name and what it may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub name: String,
    pub admin: bool,
    /// A worker's token: the build routes alone.
    pub worker: bool,
}

/// One token as `token list` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct TokenInfo {
    pub name: String,
    pub role: Role,
    pub created: String,
}

/// An artifact of a build.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Artifact {
    pub name: String,
    pub size: u64,
    pub sha256: String,
}

/// A job as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct JobView {
    pub id: String,
    pub name: String,
    pub email: String,
    pub owner: String,
    pub state: String,
    pub stage: Option<String>,
    pub created: String,
    pub started: Option<String>,
    pub finished: Option<String>,
    pub error: Option<serde_json::Value>,
    pub worker: Option<String>,
    pub spec_digest: String,
    pub attempts: i64,
    /// Jobs (this one included) that share its build.
    pub shared_by: i64,
    pub post_creation: Option<serde_json::Value>,
    pub artifacts: Vec<ArtifactView>,
    #[serde(skip)]
    pub build_id: String,
}

impl JobView {
    /// Leaves out what `caller` may not see: the post-creation command's output is the
    /// admin's (its exit is the job's).
    fn show_to(&mut self, caller: &Caller) {
        if !caller.admin
            && let Some(p) = self.post_creation.as_mut().and_then(|p| p.as_object_mut())
        {
            p.remove("output");
        }
    }
}

/// An artifact with the URL it downloads from.
#[derive(Debug, Clone, Serialize)]
pub struct ArtifactView {
    pub name: String,
    pub size: u64,
    pub sha256: String,
    pub url: String,
}

/// A build handed to a worker.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Claim {
    pub build_id: String,
    /// The lease token: every report of this attempt carries it.
    pub lease: String,
    pub spec: String,
    pub attempt: i64,
    /// Whether an admin submitted it (a worker checks other specs as the server does).
    pub trusted: bool,
    /// The isolation the server accepted it under (`host`, `untrusted`, `vm`).
    #[serde(default)]
    pub isolation: String,
}

/// Per-token limits; `None` is no limit.
#[derive(Debug, Clone, Copy, Default)]
pub struct Limits {
    pub queued: Option<u64>,
    pub running: Option<u64>,
    pub stored_bytes: Option<u64>,
    /// Jobs kept per token, in any state (cancelled and failed ones count too).
    pub jobs: Option<u64>,
}

/// The build a job asks for: the spec as submitted, its digest and the isolation it was
/// accepted under.
#[derive(Debug, Clone, Copy)]
pub struct NewBuild<'a> {
    pub spec: &'a str,
    pub digest: &'a str,
    pub isolation: &'a str,
}

/// What a submit came to.
#[derive(Debug)]
pub enum Submitted {
    /// The new job, and whether it joined a build already in flight.
    Job { id: String, joined: bool },
    /// A limit of the token stops it (which, and the numbers).
    OverLimit(String),
}

/// The counts `/metrics` reports.
#[derive(Debug, Default, Serialize)]
pub struct Counts {
    pub queued: u64,
    pub running: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub cancelled: u64,
    pub build_seconds_sum: f64,
    pub build_seconds_count: u64,
}

/// The job store.
pub struct Store {
    conn: Mutex<Connection>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS tokens(
    name TEXT PRIMARY KEY,
    hash TEXT NOT NULL UNIQUE,
    admin INTEGER NOT NULL,
    created INTEGER NOT NULL,
    removed INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS builds(
    id TEXT PRIMARY KEY,
    spec TEXT NOT NULL,
    spec_digest TEXT NOT NULL,
    trusted INTEGER NOT NULL,
    state TEXT NOT NULL,
    stage TEXT,
    worker TEXT,
    lease TEXT,
    lease_until INTEGER,
    attempts INTEGER NOT NULL DEFAULT 0,
    cancel INTEGER NOT NULL DEFAULT 0,
    created INTEGER NOT NULL,
    started INTEGER,
    finished INTEGER,
    seconds REAL,
    error TEXT
);
CREATE INDEX IF NOT EXISTS builds_state ON builds(state);
CREATE INDEX IF NOT EXISTS builds_digest ON builds(spec_digest, trusted, state);
CREATE TABLE IF NOT EXISTS artifacts(
    build_id TEXT NOT NULL REFERENCES builds(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    size INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    PRIMARY KEY(build_id, name)
);
CREATE TABLE IF NOT EXISTS jobs(
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    name TEXT NOT NULL,
    email TEXT NOT NULL,
    build_id TEXT NOT NULL REFERENCES builds(id),
    cancelled INTEGER NOT NULL DEFAULT 0,
    created INTEGER NOT NULL,
    finished INTEGER,
    post_creation TEXT
);
CREATE INDEX IF NOT EXISTS jobs_owner ON jobs(owner);
CREATE INDEX IF NOT EXISTS jobs_build ON jobs(build_id);
";

/// Columns added since the first schema, for stores made before them.
const ADDED_COLUMNS: &[(&str, &str, &str)] = &[
    ("tokens", "worker", "INTEGER NOT NULL DEFAULT 0"),
    ("builds", "isolation", "TEXT NOT NULL DEFAULT 'host'"),
    ("builds", "claimed_by", "TEXT"),
];

fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    for (table, column, decl) in ADDED_COLUMNS {
        let has: bool = conn.query_row(
            &format!("SELECT COUNT(*) FROM pragma_table_info('{table}') WHERE name = ?1"),
            params![column],
            |r| r.get::<_, i64>(0).map(|n| n > 0),
        )?;
        if !has {
            conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {decl}"))?;
        }
    }
    Ok(())
}

impl Store {
    /// Opens (creating) the store in `state_dir`.
    pub fn open(state_dir: &Path) -> Result<Store> {
        let path = state_dir.join(DB_FILE);
        let conn = Connection::open(&path)
            .with_context(|| format!("opening the job store {}", path.display()))?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        let check: String = conn
            .query_row("PRAGMA quick_check", [], |r| r.get(0))
            .with_context(|| format!("checking the job store {}", path.display()))?;
        if check != "ok" {
            anyhow::bail!(
                "the job store {} is damaged ({check}); move it away to start with an empty one",
                path.display()
            );
        }
        conn.execute_batch(SCHEMA)
            .with_context(|| format!("setting up the job store {}", path.display()))?;
        migrate(&conn).with_context(|| format!("updating the job store {}", path.display()))?;
        Ok(Store {
            conn: Mutex::new(conn),
        })
    }

    fn db(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    // ---- tokens ----

    /// Adds a token named `name` with `role`; returns the token (shown once, stored only as
    /// its hash).
    pub fn add_token(&self, name: &str, role: Role) -> Result<String> {
        let token = format!("dbi_{}", random_hex(32));
        let n = self.db().execute(
            "INSERT OR IGNORE INTO tokens(name, hash, admin, worker, created)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                name,
                token_hash(&token),
                role == Role::Admin,
                role == Role::Worker,
                now()
            ],
        )?;
        if n == 0 {
            anyhow::bail!(
                "the name `{name}` has (or had) a token; a name is not given twice, since its \
                 jobs stay its own: choose another"
            );
        }
        Ok(token)
    }

    /// Revokes the token `name` (its name stays taken); false when there was none.
    pub fn remove_token(&self, name: &str) -> Result<bool> {
        Ok(self.db().execute(
            "UPDATE tokens SET removed = 1, hash = 'removed-' || ?2 WHERE name = ?1 AND removed = 0",
            params![name, random_hex(16)],
        )? > 0)
    }

    /// Every token, without its secret.
    pub fn tokens(&self) -> Result<Vec<TokenInfo>> {
        let db = self.db();
        let mut st = db.prepare(
            "SELECT name, admin, worker, created FROM tokens WHERE removed = 0 ORDER BY name",
        )?;
        let rows = st.query_map([], |r| {
            Ok(TokenInfo {
                name: r.get(0)?,
                role: match (r.get(1)?, r.get(2)?) {
                    (true, _) => Role::Admin,
                    (false, true) => Role::Worker,
                    (false, false) => Role::User,
                },
                created: crate::metadata::rfc3339(r.get::<_, i64>(3)?.max(0) as u64),
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Who holds `token`, if anyone.
    pub fn caller(&self, token: &str) -> Result<Option<Caller>> {
        Ok(self
            .db()
            .query_row(
                "SELECT name, admin, worker FROM tokens WHERE hash = ?1 AND removed = 0",
                params![token_hash(token)],
                |r| {
                    Ok(Caller {
                        name: r.get(0)?,
                        admin: r.get(1)?,
                        worker: r.get(2)?,
                    })
                },
            )
            .optional()?)
    }

    /// Whether the token named `name` is still valid (a log stream ends when it is revoked).
    pub fn token_active(&self, name: &str) -> Result<bool> {
        Ok(self
            .db()
            .query_row(
                "SELECT 1 FROM tokens WHERE name = ?1 AND removed = 0",
                params![name],
                |_| Ok(()),
            )
            .optional()?
            .is_some())
    }

    // ---- jobs ----

    /// Records a job for `spec` (already validated), joining a build of the same spec in flight
    /// or queueing a new one, unless a limit of the caller stops it.
    pub fn submit(
        &self,
        caller: &Caller,
        name: &str,
        email: &str,
        build: &NewBuild<'_>,
        limits: &Limits,
    ) -> Result<Submitted> {
        let NewBuild {
            spec,
            digest: spec_digest,
            isolation,
        } = *build;
        let mut db = self.db();
        let tx = db.transaction()?;
        if !caller.admin {
            let count = |state: &str| -> rusqlite::Result<u64> {
                tx.query_row(
                    "SELECT COUNT(*) FROM jobs j JOIN builds b ON b.id = j.build_id
                     WHERE j.owner = ?1 AND j.cancelled = 0 AND b.state = ?2",
                    params![caller.name, state],
                    |r| r.get::<_, i64>(0),
                )
                .map(|n| n as u64)
            };
            // Running builds are limited when claimed: beyond the limit a build waits.
            let queued = count("queued")?;
            if let Some(max) = limits.queued.filter(|&m| queued >= m) {
                return Ok(Submitted::OverLimit(format!(
                    "{queued} queued jobs, the limit is {max}"
                )));
            }
            if let Some(max) = limits.jobs {
                let kept: i64 = tx.query_row(
                    "SELECT COUNT(*) FROM jobs WHERE owner = ?1",
                    params![caller.name],
                    |r| r.get(0),
                )?;
                if kept as u64 >= max {
                    return Ok(Submitted::OverLimit(format!(
                        "{kept} jobs kept, the limit is {max} (delete ended jobs to make room)"
                    )));
                }
            }
            if let Some(max) = limits.stored_bytes {
                let stored: i64 = tx.query_row(
                    "SELECT COALESCE(SUM(a.size), 0) FROM artifacts a
                     WHERE a.build_id IN (SELECT build_id FROM jobs WHERE owner = ?1)",
                    params![caller.name],
                    |r| r.get(0),
                )?;
                if stored as u64 >= max {
                    return Ok(Submitted::OverLimit(format!(
                        "{stored} bytes stored, the limit is {max} (delete jobs to make room)"
                    )));
                }
            }
        }
        let in_flight: Option<String> = tx
            .query_row(
                "SELECT id FROM builds WHERE spec_digest = ?1 AND trusted = ?2
                 AND isolation = ?3 AND state IN ('queued', 'running') AND cancel = 0
                 ORDER BY rowid LIMIT 1",
                params![spec_digest, caller.admin, isolation],
                |r| r.get(0),
            )
            .optional()?;
        let joined = in_flight.is_some();
        let build_id = match in_flight {
            Some(id) => id,
            None => {
                let id = format!("b{}", random_hex(8));
                tx.execute(
                    "INSERT INTO builds(id, spec, spec_digest, trusted, isolation, state, created)
                     VALUES (?1, ?2, ?3, ?4, ?5, 'queued', ?6)",
                    params![id, spec, spec_digest, caller.admin, isolation, now()],
                )?;
                id
            }
        };
        let id = format!("j{}", random_hex(8));
        tx.execute(
            "INSERT INTO jobs(id, owner, name, email, build_id, created)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![id, caller.name, name, email, build_id, now()],
        )?;
        tx.commit()?;
        Ok(Submitted::Job { id, joined })
    }

    fn view_sql(filter: &str) -> String {
        format!(
            "SELECT j.id, j.name, j.email, j.owner, j.cancelled, j.created, j.finished,
                    j.post_creation, b.id, b.state, b.stage, b.started, b.finished, b.error,
                    b.worker, b.spec_digest, b.attempts,
                    (SELECT COUNT(*) FROM jobs k WHERE k.build_id = b.id)
             FROM jobs j JOIN builds b ON b.id = j.build_id {filter}"
        )
    }

    fn view_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<JobView> {
        let cancelled: bool = r.get(4)?;
        let build_state: String = r.get(9)?;
        let state = if cancelled {
            "cancelled".to_string()
        } else {
            build_state
        };
        let finished = if cancelled { r.get(6)? } else { r.get(12)? };
        let json = |s: Option<String>| s.and_then(|s| serde_json::from_str(&s).ok());
        Ok(JobView {
            id: r.get(0)?,
            name: r.get(1)?,
            email: r.get(2)?,
            owner: r.get(3)?,
            created: crate::metadata::rfc3339(r.get::<_, i64>(5)?.max(0) as u64),
            finished: rfc3339(finished),
            post_creation: json(r.get(7)?),
            build_id: r.get(8)?,
            stage: if cancelled { None } else { r.get(10)? },
            started: rfc3339(r.get(11)?),
            error: if cancelled { None } else { json(r.get(13)?) },
            worker: r.get(14)?,
            spec_digest: r.get(15)?,
            attempts: r.get(16)?,
            shared_by: r.get(17)?,
            state,
            artifacts: Vec::new(),
        })
    }

    fn fill_artifacts(db: &Connection, view: &mut JobView) -> rusqlite::Result<()> {
        if view.state != "succeeded" {
            return Ok(());
        }
        let mut st = db.prepare(
            "SELECT name, size, sha256 FROM artifacts WHERE build_id = ?1 ORDER BY name",
        )?;
        let rows = st.query_map(params![view.build_id], |r| {
            Ok(Artifact {
                name: r.get(0)?,
                size: r.get::<_, i64>(1)? as u64,
                sha256: r.get(2)?,
            })
        })?;
        for a in rows {
            let a = a?;
            view.artifacts.push(ArtifactView {
                url: format!(
                    "/api/v1/jobs/{}/artifacts/{}",
                    view.id,
                    super::url::encode_path(&a.name)
                ),
                name: a.name,
                size: a.size,
                sha256: a.sha256,
            });
        }
        Ok(())
    }

    /// The job `id` as `caller` may see it (an admin sees every job, others their own).
    pub fn job(&self, caller: &Caller, id: &str) -> Result<Option<JobView>> {
        let db = self.db();
        let view = db
            .query_row(
                &Self::view_sql("WHERE j.id = ?1 AND (?2 OR j.owner = ?3)"),
                params![id, caller.admin, caller.name],
                Self::view_row,
            )
            .optional()?;
        let Some(mut view) = view else {
            return Ok(None);
        };
        Self::fill_artifacts(&db, &mut view)?;
        view.show_to(caller);
        Ok(Some(view))
    }

    /// The state of job `id` as `caller` may see it (what a log stream asks several times a
    /// second: no artifacts, no counts).
    pub fn job_state(&self, caller: &Caller, id: &str) -> Result<Option<String>> {
        Ok(self
            .db()
            .query_row(
                "SELECT CASE WHEN j.cancelled THEN 'cancelled' ELSE b.state END
                 FROM jobs j JOIN builds b ON b.id = j.build_id
                 WHERE j.id = ?1 AND (?2 OR j.owner = ?3)",
                params![id, caller.admin, caller.name],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// The jobs `caller` may see, newest first, optionally in one state: at most `limit`, those
    /// older than job `before` when it is given. The second value is the id to ask `before`
    /// for the next page, when there may be one.
    pub fn jobs(
        &self,
        caller: &Caller,
        state: Option<&str>,
        limit: u64,
        before: Option<&str>,
    ) -> Result<(Vec<JobView>, Option<String>)> {
        let db = self.db();
        let mut st = db.prepare(&Self::view_sql(
            "WHERE (?1 OR j.owner = ?2)
             AND (?3 IS NULL OR (CASE WHEN j.cancelled THEN 'cancelled' ELSE b.state END) = ?3)
             AND (?4 IS NULL OR j.rowid < COALESCE((SELECT rowid FROM jobs WHERE id = ?4), 0))
             ORDER BY j.rowid DESC LIMIT ?5",
        ))?;
        let rows = st.query_map(
            params![caller.admin, caller.name, state, before, limit as i64],
            Self::view_row,
        )?;
        let mut out = Vec::new();
        for v in rows {
            let mut v = v?;
            Self::fill_artifacts(&db, &mut v)?;
            v.show_to(caller);
            out.push(v);
        }
        let next = (out.len() as u64 == limit)
            .then(|| out.last().map(|v| v.id.clone()))
            .flatten();
        Ok((out, next))
    }

    /// Deletes the ended jobs that ended before `before` (seconds since the epoch); returns
    /// the builds no job refers to any more (their files can go).
    pub fn expire_jobs(&self, before: i64) -> Result<Vec<String>> {
        let mut db = self.db();
        let tx = db.transaction()?;
        let ended: Vec<(String, String)> = {
            let mut st = tx.prepare(
                "SELECT j.id, j.build_id FROM jobs j JOIN builds b ON b.id = j.build_id
                 WHERE (j.cancelled AND j.finished < ?1)
                 OR (NOT j.cancelled AND b.state IN ('succeeded', 'failed', 'cancelled')
                     AND b.finished < ?1)",
            )?;
            st.query_map(params![before], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<Result<_, _>>()?
        };
        let mut orphans = Vec::new();
        for (job, build) in ended {
            tx.execute("DELETE FROM jobs WHERE id = ?1", params![job])?;
            if Self::drop_if_orphan(&tx, &build)? {
                orphans.push(build);
            }
        }
        tx.commit()?;
        Ok(orphans)
    }

    /// Cancels job `id`: the job is cancelled at once; its build is cancelled when no other
    /// job still wants it. Returns the build to stop, when it is running.
    pub fn cancel_job(&self, id: &str) -> Result<CancelOutcome> {
        let mut db = self.db();
        let tx = db.transaction()?;
        let row: Option<(String, bool, String)> = tx
            .query_row(
                "SELECT j.build_id, j.cancelled, b.state FROM jobs j JOIN builds b
                 ON b.id = j.build_id WHERE j.id = ?1",
                params![id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
        let Some((build_id, cancelled, state)) = row else {
            return Ok(CancelOutcome::NoSuchJob);
        };
        if cancelled || is_terminal(&state) {
            return Ok(CancelOutcome::AlreadyFinished);
        }
        tx.execute(
            "UPDATE jobs SET cancelled = 1, finished = ?2 WHERE id = ?1",
            params![id, now()],
        )?;
        let others: i64 = tx.query_row(
            "SELECT COUNT(*) FROM jobs WHERE build_id = ?1 AND cancelled = 0",
            params![build_id],
            |r| r.get(0),
        )?;
        let outcome = if others > 0 {
            CancelOutcome::Cancelled { stop: None }
        } else if state == "queued" {
            tx.execute(
                "UPDATE builds SET state = 'cancelled', cancel = 1, finished = ?2 WHERE id = ?1",
                params![build_id, now()],
            )?;
            CancelOutcome::Cancelled { stop: None }
        } else {
            tx.execute(
                "UPDATE builds SET cancel = 1 WHERE id = ?1",
                params![build_id],
            )?;
            CancelOutcome::Cancelled {
                stop: Some(build_id),
            }
        };
        tx.commit()?;
        Ok(outcome)
    }

    /// Removes job `id`'s record; returns its build when no job refers to it any more and it
    /// is not running (its files can go).
    pub fn delete_job(&self, id: &str) -> Result<Option<String>> {
        let mut db = self.db();
        let tx = db.transaction()?;
        let build_id: Option<String> = tx
            .query_row(
                "SELECT build_id FROM jobs WHERE id = ?1",
                params![id],
                |r| r.get(0),
            )
            .optional()?;
        let Some(build_id) = build_id else {
            return Ok(None);
        };
        tx.execute("DELETE FROM jobs WHERE id = ?1", params![id])?;
        let orphan = Self::drop_if_orphan(&tx, &build_id)?;
        tx.commit()?;
        Ok(orphan.then_some(build_id))
    }

    /// Deletes build `id` when no job refers to it and it is not running.
    fn drop_if_orphan(tx: &Connection, build_id: &str) -> rusqlite::Result<bool> {
        let n = tx.execute(
            "DELETE FROM builds WHERE id = ?1 AND state != 'running'
             AND NOT EXISTS (SELECT 1 FROM jobs WHERE build_id = ?1)",
            params![build_id],
        )?;
        Ok(n > 0)
    }

    /// Builds no job refers to and that no worker runs: their files can go.
    pub fn orphan_builds(&self) -> Result<Vec<String>> {
        let db = self.db();
        let ids = Self::ids(
            &db,
            "SELECT id FROM builds WHERE state != 'running'
             AND NOT EXISTS (SELECT 1 FROM jobs WHERE build_id = builds.id)",
        )?;
        for id in &ids {
            db.execute("DELETE FROM builds WHERE id = ?1", params![id])?;
        }
        Ok(ids)
    }

    /// Every build id the store knows.
    pub fn build_ids(&self) -> Result<Vec<String>> {
        Self::ids(&self.db(), "SELECT id FROM builds")
    }

    /// The first column of every row `sql` selects.
    fn ids(db: &Connection, sql: &str) -> Result<Vec<String>> {
        let mut st = db.prepare(sql)?;
        let ids = st
            .query_map([], |r| r.get::<_, String>(0))?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(ids)
    }

    /// The jobs of build `id` that are finished and have not had post-creation, marked as
    /// having it now (each job gets it once).
    pub fn take_post_creation(&self, build_id: &str) -> Result<Vec<PendingJob>> {
        let mut db = self.db();
        let tx = db.transaction()?;
        let jobs: Vec<PendingJob> = {
            let mut st = tx.prepare(
                "SELECT j.id, CASE WHEN j.cancelled THEN 'cancelled' ELSE b.state END,
                        j.name, j.email
                 FROM jobs j JOIN builds b ON b.id = j.build_id
                 WHERE b.id = ?1 AND j.post_creation IS NULL
                 AND (j.cancelled OR b.state IN ('succeeded', 'failed', 'cancelled'))
                 ORDER BY j.rowid",
            )?;
            st.query_map(params![build_id], |r| {
                Ok(PendingJob {
                    id: r.get(0)?,
                    state: r.get(1)?,
                    name: r.get(2)?,
                    email: r.get(3)?,
                })
            })?
            .collect::<Result<_, _>>()?
        };
        for j in &jobs {
            tx.execute(
                "UPDATE jobs SET post_creation = '{\"running\":true}' WHERE id = ?1",
                params![j.id],
            )?;
        }
        tx.commit()?;
        Ok(jobs)
    }

    /// Builds that ended with jobs still waiting for post-creation.
    pub fn builds_awaiting_post_creation(&self) -> Result<Vec<String>> {
        Self::ids(
            &self.db(),
            "SELECT DISTINCT b.id FROM builds b JOIN jobs j ON j.build_id = b.id
             WHERE j.post_creation IS NULL
             AND (j.cancelled OR b.state IN ('succeeded', 'failed', 'cancelled'))",
        )
    }

    /// Records what post-creation made of job `id`.
    pub fn set_post_creation(&self, id: &str, report: &serde_json::Value) -> Result<()> {
        self.db().execute(
            "UPDATE jobs SET post_creation = ?2 WHERE id = ?1",
            params![id, report.to_string()],
        )?;
        Ok(())
    }

    // ---- builds, for workers ----

    /// Hands the next queued build to `worker` with a lease of `lease_secs`: owners are served
    /// in turn ([`Store::fair_next`]), none beyond its `limits.running`.
    pub fn claim_next(
        &self,
        worker: &str,
        lease_secs: i64,
        limits: &Limits,
    ) -> Result<Option<Claim>> {
        let mut db = self.db();
        let tx = db.transaction()?;
        let claim = match Self::fair_next(&tx, None, limits)? {
            Some(id) => Self::claim_in(&tx, &id, worker, "", lease_secs)?,
            None => None,
        };
        tx.commit()?;
        Ok(claim)
    }

    /// Hands a queued build to `worker`, which calls with the token named `by`: build `id`
    /// when its owner's turn has come, else the build whose turn it is (a message of the
    /// queue says that there is work; which build is the store's to say). `None` when no
    /// queued build may run now.
    pub fn claim(
        &self,
        id: &str,
        worker: &str,
        by: &str,
        lease_secs: i64,
        limits: &Limits,
    ) -> Result<Option<Claim>> {
        let mut db = self.db();
        let tx = db.transaction()?;
        let claim = match Self::fair_next(&tx, Some(id), limits)? {
            Some(next) => Self::claim_in(&tx, &next, worker, by, lease_secs)?,
            None => None,
        };
        tx.commit()?;
        Ok(claim)
    }

    /// The queued build to run next. A build's owner is the owner of its first job still
    /// wanted; an owner with `limits.running` running builds waits (admins' builds are not
    /// limited). Of the others, the owner with the fewest running builds goes first, then the
    /// one served longest ago, then the oldest build: one owner's burst does not starve the
    /// others. `preferred` is taken when it is of the owner whose turn it is.
    fn fair_next(
        tx: &Connection,
        preferred: Option<&str>,
        limits: &Limits,
    ) -> rusqlite::Result<Option<String>> {
        use std::collections::HashMap;
        let mut st = tx.prepare(
            "SELECT b.id, b.state, b.trusted,
                    (SELECT j.owner FROM jobs j WHERE j.build_id = b.id AND j.cancelled = 0
                     ORDER BY j.rowid LIMIT 1)
             FROM builds b WHERE b.state IN ('queued', 'running') ORDER BY b.rowid",
        )?;
        let rows: Vec<(String, String, bool, Option<String>)> = st
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
            .collect::<Result<_, _>>()?;
        let mut running: HashMap<&str, u64> = HashMap::new();
        for (_, state, _, owner) in &rows {
            if let (Some(o), "running") = (owner, state.as_str()) {
                *running.entry(o).or_insert(0) += 1;
            }
        }
        let mut st = tx.prepare(
            "SELECT j.owner, MAX(b.started) FROM jobs j JOIN builds b ON b.id = j.build_id
             WHERE b.started IS NOT NULL GROUP BY j.owner",
        )?;
        let served: HashMap<String, i64> = st
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        let rank = |owner: &str| {
            (
                running.get(owner).copied().unwrap_or(0),
                served.get(owner).copied().unwrap_or(0),
            )
        };
        let candidates =
            rows.iter()
                .enumerate()
                .filter_map(|(age, (id, state, trusted, owner))| {
                    let owner = owner.as_deref()?;
                    let may = state == "queued"
                        && (*trusted || limits.running.is_none_or(|m| rank(owner).0 < m));
                    may.then_some((rank(owner), age, id.as_str(), owner))
                });
        let Some(best) = candidates
            .clone()
            .min_by_key(|(rank, age, _, _)| (*rank, *age))
        else {
            return Ok(None);
        };
        let chosen = preferred
            .and_then(|p| candidates.clone().find(|(_, _, id, _)| *id == p))
            .filter(|(_, _, _, owner)| *owner == best.3)
            .unwrap_or(best);
        Ok(Some(chosen.2.to_string()))
    }

    fn claim_in(
        tx: &Connection,
        id: &str,
        worker: &str,
        by: &str,
        lease_secs: i64,
    ) -> rusqlite::Result<Option<Claim>> {
        let lease = random_hex(16);
        let n = tx.execute(
            "UPDATE builds SET state = 'running', worker = ?2, lease = ?3, lease_until = ?4,
             attempts = attempts + 1, started = ?5, stage = NULL, error = NULL, claimed_by = ?6
             WHERE id = ?1 AND state = 'queued'",
            params![id, worker, lease, now() + lease_secs, now(), by],
        )?;
        if n == 0 {
            return Ok(None);
        }
        tx.query_row(
            "SELECT spec, attempts, trusted, isolation FROM builds WHERE id = ?1",
            params![id],
            |r| {
                Ok(Some(Claim {
                    build_id: id.to_string(),
                    lease,
                    spec: r.get(0)?,
                    attempt: r.get(1)?,
                    trusted: r.get(2)?,
                    isolation: r.get(3)?,
                }))
            },
        )
    }

    /// Renews the lease of build `id`; `Ok(None)` when the lease is not (any more) `lease`,
    /// else whether the build is to be cancelled.
    pub fn renew(&self, id: &str, lease: &str, lease_secs: i64) -> Result<Option<bool>> {
        let db = self.db();
        let n = db.execute(
            "UPDATE builds SET lease_until = ?3 WHERE id = ?1 AND lease = ?2 AND state = 'running'",
            params![id, lease, now() + lease_secs],
        )?;
        if n == 0 {
            return Ok(None);
        }
        Ok(Some(db.query_row(
            "SELECT cancel FROM builds WHERE id = ?1",
            params![id],
            |r| r.get(0),
        )?))
    }

    /// Records the stage build `id` is in; false when `lease` is not its lease.
    pub fn set_stage(&self, id: &str, lease: &str, stage: &str) -> Result<bool> {
        Ok(self.db().execute(
            "UPDATE builds SET stage = ?3 WHERE id = ?1 AND lease = ?2 AND state = 'running'",
            params![id, lease, stage],
        )? > 0)
    }

    /// Whether `lease` is the current lease of running build `id` and the token named `by`
    /// claimed it (a worker reports only the builds it holds).
    pub fn holds_for(&self, id: &str, lease: &str, by: &str) -> Result<bool> {
        Ok(self
            .db()
            .query_row(
                "SELECT 1 FROM builds WHERE id = ?1 AND lease = ?2 AND state = 'running'
                 AND claimed_by = ?3",
                params![id, lease, by],
                |_| Ok(()),
            )
            .optional()?
            .is_some())
    }

    /// Whether `lease` is the current lease of running build `id`.
    pub fn holds(&self, id: &str, lease: &str) -> Result<bool> {
        Ok(self
            .db()
            .query_row(
                "SELECT 1 FROM builds WHERE id = ?1 AND lease = ?2 AND state = 'running'",
                params![id, lease],
                |_| Ok(()),
            )
            .optional()?
            .is_some())
    }

    /// Ends build `id`'s attempt: `succeeded` with its artifacts, `failed` with an error, or
    /// `cancelled`. False when `lease` is not its lease (a stale worker's report).
    pub fn finish(
        &self,
        id: &str,
        lease: &str,
        state: &str,
        error: Option<&serde_json::Value>,
        artifacts: &[Artifact],
    ) -> Result<bool> {
        debug_assert!(is_terminal(state));
        let mut db = self.db();
        let tx = db.transaction()?;
        let n = tx.execute(
            "UPDATE builds SET state = ?3, finished = ?4, error = ?5, lease = NULL,
             lease_until = NULL, seconds = ?4 - started
             WHERE id = ?1 AND lease = ?2 AND state = 'running'",
            params![id, lease, state, now(), error.map(|e| e.to_string())],
        )?;
        if n == 0 {
            return Ok(false);
        }
        tx.execute("DELETE FROM artifacts WHERE build_id = ?1", params![id])?;
        for a in artifacts {
            tx.execute(
                "INSERT INTO artifacts(build_id, name, size, sha256) VALUES (?1, ?2, ?3, ?4)",
                params![id, a.name, a.size as i64, a.sha256],
            )?;
        }
        tx.commit()?;
        Ok(true)
    }

    /// Gives builds whose lease ran out back to the queue, or fails them after `max_attempts`;
    /// with `worker_prefix`, also every running build of workers whose name starts with it
    /// (this server's own, after a restart). Returns (requeued, failed) build ids.
    pub fn requeue_lost(
        &self,
        max_attempts: i64,
        worker_prefix: Option<&str>,
    ) -> Result<(Vec<String>, Vec<String>)> {
        let mut db = self.db();
        let tx = db.transaction()?;
        let lost: Vec<(String, i64, Option<String>)> = {
            let mut st = tx.prepare(
                "SELECT id, attempts, worker FROM builds WHERE state = 'running'
                 AND (lease_until < ?1 OR (?2 IS NOT NULL AND substr(worker, 1, length(?2)) = ?2))",
            )?;
            st.query_map(params![now(), worker_prefix], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })?
            .collect::<Result<_, _>>()?
        };
        let (mut requeued, mut failed) = (Vec::new(), Vec::new());
        for (id, attempts, worker) in lost {
            let cancel: bool = tx.query_row(
                "SELECT cancel FROM builds WHERE id = ?1",
                params![id],
                |r| r.get(0),
            )?;
            let worker = worker.unwrap_or_default();
            if cancel {
                tx.execute(
                    "UPDATE builds SET state = 'cancelled', finished = ?2, lease = NULL
                     WHERE id = ?1",
                    params![id, now()],
                )?;
                failed.push(id);
            } else if attempts >= max_attempts {
                let error = serde_json::json!({
                    "kind": "worker-lost",
                    "message": format!(
                        "the worker `{worker}` stopped answering; the build was tried {attempts} \
                         time{} and is not tried again",
                        if attempts == 1 { "" } else { "s" }
                    ),
                });
                tx.execute(
                    "UPDATE builds SET state = 'failed', finished = ?2, lease = NULL, error = ?3
                     WHERE id = ?1",
                    params![id, now(), error.to_string()],
                )?;
                failed.push(id);
            } else {
                tx.execute(
                    "UPDATE builds SET state = 'queued', lease = NULL, lease_until = NULL,
                     stage = NULL WHERE id = ?1",
                    params![id],
                )?;
                requeued.push(id);
            }
        }
        tx.commit()?;
        Ok((requeued, failed))
    }

    /// The ids of queued builds, oldest first (to publish again after a restart).
    pub fn queued_builds(&self) -> Result<Vec<String>> {
        Self::ids(
            &self.db(),
            "SELECT id FROM builds WHERE state = 'queued' ORDER BY rowid",
        )
    }

    /// The spec of build `id`.
    pub fn build_spec(&self, id: &str) -> Result<Option<String>> {
        Ok(self
            .db()
            .query_row("SELECT spec FROM builds WHERE id = ?1", params![id], |r| {
                r.get(0)
            })
            .optional()?)
    }

    /// The state of build `id`.
    pub fn build_state(&self, id: &str) -> Result<Option<String>> {
        Ok(self
            .db()
            .query_row("SELECT state FROM builds WHERE id = ?1", params![id], |r| {
                r.get(0)
            })
            .optional()?)
    }

    /// Artifact `name` of the build of job `job` when `caller` may see the job and it
    /// succeeded: (build id, artifact).
    pub fn artifact(
        &self,
        caller: &Caller,
        job: &str,
        name: &str,
    ) -> Result<Option<(String, Artifact)>> {
        Ok(self
            .db()
            .query_row(
                "SELECT b.id, a.size, a.sha256 FROM jobs j JOIN builds b ON b.id = j.build_id
                 JOIN artifacts a ON a.build_id = b.id
                 WHERE j.id = ?1 AND (?2 OR j.owner = ?3) AND a.name = ?4
                 AND j.cancelled = 0 AND b.state = 'succeeded'",
                params![job, caller.admin, caller.name, name],
                |r| {
                    Ok((
                        r.get(0)?,
                        Artifact {
                            name: name.to_string(),
                            size: r.get::<_, i64>(1)? as u64,
                            sha256: r.get(2)?,
                        },
                    ))
                },
            )
            .optional()?)
    }

    /// The counts `/metrics` reports.
    pub fn counts(&self) -> Result<Counts> {
        let db = self.db();
        let mut c = Counts::default();
        let mut st = db.prepare("SELECT state, COUNT(*) FROM builds GROUP BY state")?;
        let rows = st.query_map([], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))
        })?;
        for row in rows {
            let (state, n) = row?;
            match state.as_str() {
                "queued" => c.queued = n,
                "running" => c.running = n,
                "succeeded" => c.succeeded = n,
                "failed" => c.failed = n,
                "cancelled" => c.cancelled = n,
                _ => {}
            }
        }
        let (sum, count): (f64, i64) = db.query_row(
            "SELECT COALESCE(SUM(seconds), 0), COUNT(seconds) FROM builds
             WHERE state IN ('succeeded', 'failed')",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        c.build_seconds_sum = sum;
        c.build_seconds_count = count as u64;
        Ok(c)
    }
}

/// A finished job that post-creation is to run for.
#[derive(Debug, Clone)]
pub struct PendingJob {
    pub id: String,
    pub state: String,
    pub name: String,
    pub email: String,
}

/// What cancelling a job came to.
#[derive(Debug, PartialEq, Eq)]
pub enum CancelOutcome {
    NoSuchJob,
    AlreadyFinished,
    /// Cancelled; `stop` is the running build to end, when no other job wants it.
    Cancelled {
        stop: Option<String>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(name: &str, admin: bool) -> Caller {
        Caller {
            name: name.into(),
            admin,
            worker: false,
        }
    }

    fn nb<'a>(spec: &'a str, digest: &'a str) -> NewBuild<'a> {
        NewBuild {
            spec,
            digest,
            isolation: "host",
        }
    }

    fn job_id(s: Submitted) -> String {
        match s {
            Submitted::Job { id, .. } => id,
            Submitted::OverLimit(why) => panic!("over limit: {why}"),
        }
    }

    #[test]
    fn identical_specs_share_a_build_and_a_lost_lease_requeues() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let alice = caller("alice", false);
        let no = Limits::default();
        let a = job_id(store.submit(&alice, "a", "", &nb("s", "d1"), &no).unwrap());
        let b = store.submit(&alice, "b", "", &nb("s", "d1"), &no).unwrap();
        assert!(matches!(b, Submitted::Job { joined: true, .. }));
        let c = store.submit(&alice, "c", "", &nb("t", "d2"), &no).unwrap();
        assert!(matches!(c, Submitted::Job { joined: false, .. }));

        let claim = store
            .claim_next("w1", 0, &Limits::default())
            .unwrap()
            .unwrap();
        assert_eq!(claim.spec, "s");
        // The lease of 0 s has run out: the build goes back to the queue, the stale worker's
        // reports are refused.
        std::thread::sleep(std::time::Duration::from_millis(1100));
        let (requeued, failed) = store.requeue_lost(2, None).unwrap();
        assert_eq!((requeued.len(), failed.len()), (1, 0));
        assert_eq!(
            store.renew(&claim.build_id, &claim.lease, 60).unwrap(),
            None
        );
        assert!(
            !store
                .finish(&claim.build_id, &claim.lease, "succeeded", None, &[])
                .unwrap()
        );
        let again = store
            .claim_next("w2", 60, &Limits::default())
            .unwrap()
            .unwrap();
        assert_eq!(
            (again.build_id.as_str(), again.attempt),
            (claim.build_id.as_str(), 2)
        );
        let art = Artifact {
            name: "x.tar.gz".into(),
            size: 3,
            sha256: "ab".into(),
        };
        assert!(
            store
                .finish(&again.build_id, &again.lease, "succeeded", None, &[art])
                .unwrap()
        );
        for id in [
            &a,
            match &b {
                Submitted::Job { id, .. } => id,
                _ => unreachable!(),
            },
        ] {
            let v = store.job(&alice, id).unwrap().unwrap();
            assert_eq!(v.state, "succeeded");
            assert_eq!(v.artifacts.len(), 1);
            assert_eq!(v.shared_by, 2);
        }
        assert_eq!(
            store.job_state(&alice, &a).unwrap().as_deref(),
            Some("succeeded")
        );
        assert_eq!(store.job_state(&caller("bob", false), &a).unwrap(), None);
        // Others do not see alice's jobs.
        assert!(store.job(&caller("bob", false), &a).unwrap().is_none());
        assert!(store.job(&caller("root", true), &a).unwrap().is_some());
    }

    #[test]
    fn a_build_whose_workers_keep_vanishing_fails_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let alice = caller("alice", false);
        let a = job_id(
            store
                .submit(&alice, "a", "", &nb("s", "d"), &Limits::default())
                .unwrap(),
        );
        for attempt in 1..=2 {
            let claim = store
                .claim_next("w", 0, &Limits::default())
                .unwrap()
                .unwrap();
            assert_eq!(claim.attempt, attempt);
            std::thread::sleep(std::time::Duration::from_millis(1100));
            let (requeued, failed) = store.requeue_lost(2, None).unwrap();
            assert_eq!(
                (requeued.len(), failed.len()),
                if attempt == 1 { (1, 0) } else { (0, 1) }
            );
        }
        let v = store.job(&alice, &a).unwrap().unwrap();
        assert_eq!(v.state, "failed");
        assert_eq!(v.error.as_ref().unwrap()["kind"], "worker-lost");
        assert!(
            v.error.unwrap()["message"]
                .as_str()
                .unwrap()
                .contains("tried 2 times")
        );
        assert!(
            store
                .claim_next("w", 60, &Limits::default())
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn a_build_shared_by_two_jobs_runs_on_when_one_is_cancelled() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let alice = caller("alice", false);
        let no = Limits::default();
        let a = job_id(store.submit(&alice, "a", "", &nb("s", "d"), &no).unwrap());
        let b = job_id(store.submit(&alice, "b", "", &nb("s", "d"), &no).unwrap());
        let claim = store
            .claim_next("w", 60, &Limits::default())
            .unwrap()
            .unwrap();
        assert_eq!(
            store.cancel_job(&a).unwrap(),
            CancelOutcome::Cancelled { stop: None }
        );
        assert_eq!(store.job(&alice, &a).unwrap().unwrap().state, "cancelled");
        assert_eq!(store.job(&alice, &b).unwrap().unwrap().state, "running");
        assert_eq!(
            store.cancel_job(&b).unwrap(),
            CancelOutcome::Cancelled {
                stop: Some(claim.build_id.clone())
            }
        );
        assert_eq!(
            store.renew(&claim.build_id, &claim.lease, 60).unwrap(),
            Some(true)
        );
        assert_eq!(store.delete_job(&a).unwrap(), None, "b still refers to it");
        assert!(
            store
                .finish(&claim.build_id, &claim.lease, "cancelled", None, &[])
                .unwrap()
        );
        assert_eq!(store.delete_job(&b).unwrap(), Some(claim.build_id));
    }

    #[test]
    fn limits_answer_before_anything_is_stored() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let alice = caller("alice", false);
        let one = Limits {
            queued: Some(1),
            ..Limits::default()
        };
        job_id(store.submit(&alice, "a", "", &nb("s", "d"), &one).unwrap());
        assert!(matches!(
            store.submit(&alice, "b", "", &nb("t", "e"), &one).unwrap(),
            Submitted::OverLimit(_)
        ));
        assert_eq!(store.jobs(&alice, None, 100, None).unwrap().0.len(), 1);
        // Admins are not limited.
        job_id(
            store
                .submit(&caller("root", true), "c", "", &nb("t", "e"), &one)
                .unwrap(),
        );
    }

    #[test]
    fn owners_are_served_in_turn_and_limits_hold_at_claim() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (alice, bob) = (caller("alice", false), caller("bob", false));
        let no = Limits::default();
        // Alice's burst of five, then one of Bob's.
        for n in 0..5 {
            let spec = format!("a{n}");
            job_id(
                store
                    .submit(&alice, "a", "", &nb(&spec, &spec), &no)
                    .unwrap(),
            );
        }
        job_id(store.submit(&bob, "b", "", &nb("b0", "b0"), &no).unwrap());
        let two = Limits {
            running: Some(2),
            ..Limits::default()
        };
        let spec_of = |c: Option<Claim>| c.unwrap().spec;
        // Alice's oldest first; then Bob's, who has none running, before Alice's second.
        assert_eq!(spec_of(store.claim_next("w1", 60, &two).unwrap()), "a0");
        assert_eq!(spec_of(store.claim_next("w2", 60, &two).unwrap()), "b0");
        assert_eq!(spec_of(store.claim_next("w3", 60, &two).unwrap()), "a1");
        // Alice runs two, her limit: her next waits, however many workers are free; a claim
        // of one of her builds by id waits too.
        assert!(store.claim_next("w4", 60, &two).unwrap().is_none());
        let a2 = store.queued_builds().unwrap()[0].clone();
        assert!(store.claim(&a2, "w4", "farm", 60, &two).unwrap().is_none());
        // Without the limit, a claim by id is served in turn too: Alice's builds are all
        // hers, so the one asked for.
        let a3 = store.queued_builds().unwrap()[1].clone();
        let c = store.claim(&a3, "w4", "farm", 60, &no).unwrap().unwrap();
        assert_eq!(c.build_id, a3);
        // A claim asks for Bob's next while Alice has three running and Bob one: with a new
        // job of Bob's queued, his goes first whatever id the message named.
        job_id(store.submit(&bob, "b", "", &nb("b1", "b1"), &no).unwrap());
        let c = store.claim(&a2, "w5", "farm", 60, &no).unwrap().unwrap();
        assert_eq!(c.spec, "b1");
    }

    #[test]
    fn the_job_list_pages_and_ended_jobs_expire() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let alice = caller("alice", false);
        let three = Limits {
            jobs: Some(3),
            ..Limits::default()
        };
        let ids: Vec<String> = (0..3)
            .map(|n| {
                let spec = format!("s{n}");
                job_id(
                    store
                        .submit(&alice, "a", "", &nb(&spec, &spec), &three)
                        .unwrap(),
                )
            })
            .collect();
        // Cancelled jobs count against the cap until they are deleted.
        for id in &ids {
            store.cancel_job(id).unwrap();
        }
        assert!(matches!(
            store
                .submit(&alice, "a", "", &nb("s9", "s9"), &three)
                .unwrap(),
            Submitted::OverLimit(_)
        ));
        let (page, next) = store.jobs(&alice, None, 2, None).unwrap();
        assert_eq!(
            page.iter().map(|j| j.id.as_str()).collect::<Vec<_>>(),
            [ids[2].as_str(), ids[1].as_str()]
        );
        let (rest, end) = store.jobs(&alice, None, 2, next.as_deref()).unwrap();
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].id, ids[0]);
        assert_eq!(end, None);
        assert_eq!(
            store
                .jobs(&alice, Some("queued"), 10, None)
                .unwrap()
                .0
                .len(),
            0
        );
        // Nothing ended before a minute ago; everything before a minute from now.
        assert!(store.expire_jobs(now() - 60).unwrap().is_empty());
        assert_eq!(store.expire_jobs(now() + 60).unwrap().len(), 3);
        assert!(store.jobs(&alice, None, 10, None).unwrap().0.is_empty());
        job_id(
            store
                .submit(&alice, "a", "", &nb("s9", "s9"), &three)
                .unwrap(),
        );
    }

    #[test]
    fn tokens_are_stored_as_hashes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let t = store.add_token("ci", Role::User).unwrap();
        assert!(store.add_token("ci", Role::Admin).is_err());
        assert_eq!(store.caller(&t).unwrap().unwrap().name, "ci");
        assert!(store.caller("dbi_nope").unwrap().is_none());
        let db = std::fs::read(dir.path().join(DB_FILE)).unwrap();
        let wal = std::fs::read(dir.path().join(format!("{DB_FILE}-wal"))).unwrap_or_default();
        for bytes in [&db, &wal] {
            assert!(!bytes.windows(t.len()).any(|w| w == t.as_bytes()));
        }
        assert!(store.remove_token("ci").unwrap());
        assert!(store.caller(&t).unwrap().is_none());
        assert!(!store.remove_token("ci").unwrap());
        // The name is not given again: its jobs would pass to the new holder.
        assert!(store.add_token("ci", Role::User).is_err());
        assert!(store.tokens().unwrap().is_empty());
    }
}

//! The HTTP side of `debimg serve`: the REST API under `/api/v1` (described by
//! `openapi.json`), the live log as server-sent events, artifact downloads with `Range` and an
//! `ETag`, `/healthz`, `/metrics` and the web page.

use std::io::{Read, Seek, SeekFrom};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, FromRequestParts, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header, request::Parts};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use super::store::{Caller, CancelOutcome, Submitted, is_terminal};
use super::{Service, check_spec};

/// The OpenAPI document of the API.
pub const OPENAPI: &str = include_str!("openapi.json");

type Shared = Arc<Service>;

/// Runs `f` off the async threads: the store is SQLite behind a mutex and the files are
/// plain reads, and neither may hold up the connections the async threads serve.
async fn blocking<T: Send + 'static>(
    service: &Shared,
    f: impl FnOnce(&Service) -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    let s = Arc::clone(service);
    tokio::task::spawn_blocking(move || f(&s))
        .await
        .map_err(|e| ApiError::from(anyhow::anyhow!("a blocking task: {e}")))?
}

/// An error answer: a status and a JSON body `{"error": ..., "problems": [...]}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    body: serde_json::Value,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            body: json!({ "error": message.into() }),
        }
    }

    fn not_found() -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "no such job")
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> ApiError {
        tracing::error!("{e:#}");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal error (see the server's log)",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, Json(self.body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        r
    }
}

/// The caller, from `Authorization: Bearer <token>`.
pub struct Auth(pub Caller);

impl FromRequestParts<Shared> for Auth {
    type Rejection = ApiError;

    /// The caller [`super::gate`] found (and checked against the route) before the body.
    async fn from_request_parts(parts: &mut Parts, _: &Shared) -> Result<Auth, ApiError> {
        parts
            .extensions
            .get::<Caller>()
            .cloned()
            .map(Auth)
            .ok_or_else(|| ApiError::new(StatusCode::UNAUTHORIZED, "no token"))
    }
}

/// The router of the whole service.
pub fn router(service: Shared) -> Router {
    // JSON may spell every byte of the spec as `\uXXXX`.
    let body_limit = service.config.max_spec_bytes * 6 + 64 * 1024;
    Router::new()
        .route("/", get(page))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .route("/api/v1/openapi.json", get(openapi))
        .route("/api/v1/jobs", post(submit).get(list))
        .route("/api/v1/jobs/{id}", get(show).delete(delete))
        .route("/api/v1/jobs/{id}/log", get(log))
        .route("/api/v1/jobs/{id}/cancel", post(cancel))
        .route("/api/v1/jobs/{id}/artifacts/{*name}", get(artifact))
        .route("/api/v1/builds/{id}/claim", post(claim))
        .route("/api/v1/builds/{id}/renew", post(renew))
        .route("/api/v1/builds/{id}/stage", post(stage))
        .route("/api/v1/builds/{id}/log", post(append_log))
        .route("/api/v1/builds/{id}/finish", post(finish))
        .layer(DefaultBodyLimit::max(body_limit))
        // Images are as large as they are.
        .route(
            "/api/v1/builds/{id}/artifacts/{*name}",
            axum::routing::put(upload).layer(DefaultBodyLimit::disable()),
        )
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&service),
            super::gate::gate,
        ))
        .with_state(service)
}

/// Every route as `METHOD path`, for the test that holds the OpenAPI document to them.
pub const ROUTES: &[&str] = &[
    "GET /",
    "GET /healthz",
    "GET /metrics",
    "GET /api/v1/openapi.json",
    "POST /api/v1/jobs",
    "GET /api/v1/jobs",
    "GET /api/v1/jobs/{id}",
    "DELETE /api/v1/jobs/{id}",
    "GET /api/v1/jobs/{id}/log",
    "POST /api/v1/jobs/{id}/cancel",
    "GET /api/v1/jobs/{id}/artifacts/{name}",
    "POST /api/v1/builds/{id}/claim",
    "POST /api/v1/builds/{id}/renew",
    "POST /api/v1/builds/{id}/stage",
    "POST /api/v1/builds/{id}/log",
    "PUT /api/v1/builds/{id}/artifacts/{name}",
    "POST /api/v1/builds/{id}/finish",
];

/// The header that carries a worker's lease.
pub const LEASE_HEADER: &str = "x-debimg-lease";

fn lease_of(headers: &HeaderMap) -> Result<String, ApiError> {
    headers
        .get(LEASE_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| v.len() == 32 && v.bytes().all(|b| b.is_ascii_hexdigit()))
        .map(str::to_string)
        .ok_or_else(|| ApiError::new(StatusCode::BAD_REQUEST, format!("no {LEASE_HEADER} header")))
}

fn lost() -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "this lease is not the build's (it ran out, and the build went back to the queue)",
    )
}

/// The lease of a worker's call (a worker's token: [`super::gate`] lets no other reach the
/// build routes), checked against the build and the token that claimed it.
fn held_lease(
    service: &Service,
    caller: &Caller,
    id: &str,
    headers: &HeaderMap,
) -> Result<String, ApiError> {
    let lease = lease_of(headers)?;
    if !super::is_build_id(id) || !service.store.holds_for(id, &lease, &caller.name)? {
        return Err(lost());
    }
    Ok(lease)
}

#[derive(Deserialize)]
struct ClaimBody {
    worker: String,
}

async fn claim(
    State(service): State<Shared>,
    auth: Result<Auth, ApiError>,
    Path(id): Path<String>,
    Json(body): Json<ClaimBody>,
) -> Result<Response, ApiError> {
    let Auth(caller) = auth?;
    let worker = body.worker.trim();
    if worker.is_empty() || worker.len() > 128 || worker.chars().any(char::is_control) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "a worker name is 1 to 128 characters",
        ));
    }
    if !super::is_build_id(&id) {
        return Err(ApiError::new(StatusCode::NOT_FOUND, "no such build"));
    }
    let worker = worker.to_string();
    blocking(&service, move |service| {
        let lease_secs = service.config.lease_secs;
        let Some(claim) = service.store.claim(
            &id,
            &worker,
            &caller.name,
            lease_secs,
            &service.config.limits,
        )?
        else {
            return Err(match service.store.build_state(&id)? {
                Some(state) if state == "queued" => ApiError::new(
                    StatusCode::CONFLICT,
                    format!("build {id} waits: its owner runs as many builds as it may"),
                ),
                Some(state) => ApiError::new(
                    StatusCode::CONFLICT,
                    format!("build {id} is not queued ({state})"),
                ),
                None => ApiError::new(StatusCode::NOT_FOUND, "no such build"),
            });
        };
        let built = &claim.build_id;
        if !service.admit(&claim)? {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                format!(
                    "build {built} is refused under this server's isolation; it failed unbuilt"
                ),
            ));
        }
        if let Ok(mut log) = service.open_log(built) {
            super::runner::append(
                &mut log,
                format!(
                    "debimg serve: build {built}, attempt {}, on worker {worker}\n",
                    claim.attempt
                )
                .as_bytes(),
            );
        }
        let mut v = serde_json::to_value(&claim).expect("serializes");
        v["renew_secs"] = super::renew_secs(lease_secs).into();
        Ok(Json(v).into_response())
    })
    .await
}

async fn renew(
    State(service): State<Shared>,
    Auth(caller): Auth,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    blocking(&service, move |service| {
        let lease = held_lease(service, &caller, &id, &headers)?;
        match service
            .store
            .renew(&id, &lease, service.config.lease_secs)?
        {
            Some(cancel) => Ok(Json(json!({ "cancel": cancel })).into_response()),
            None => Err(lost()),
        }
    })
    .await
}

#[derive(Deserialize)]
struct StageBody {
    stage: String,
}

async fn stage(
    State(service): State<Shared>,
    auth: Result<Auth, ApiError>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Json(body): Json<StageBody>,
) -> Result<Response, ApiError> {
    let Auth(caller) = auth?;
    blocking(&service, move |service| {
        let lease = held_lease(service, &caller, &id, &headers)?;
        if crate::stage::Stage::ALL
            .iter()
            .all(|s| s.name() != body.stage)
        {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("no stage `{}`", body.stage),
            ));
        }
        if !service.store.set_stage(&id, &lease, &body.stage)? {
            return Err(lost());
        }
        Ok(StatusCode::NO_CONTENT.into_response())
    })
    .await
}

async fn append_log(
    State(service): State<Shared>,
    Auth(caller): Auth,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    blocking(&service, move |service| {
        held_lease(service, &caller, &id, &headers)?;
        let mut log = service.open_log(&id)?;
        super::runner::append_capped(&mut log, &body);
        Ok(StatusCode::NO_CONTENT.into_response())
    })
    .await
}

/// The directory a lease's uploads go to (the build's `out` once it finishes).
fn upload_dir_name(lease: &str) -> String {
    format!("up-{lease}")
}

async fn upload(
    State(service): State<Shared>,
    Auth(caller): Auth,
    Path((id, name)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    use futures_util::StreamExt;
    use sha2::Digest;
    use std::io::Write;
    let lease = {
        let (id, headers, caller) = (id.clone(), headers.clone(), caller.clone());
        blocking(&service, move |service| {
            held_lease(service, &caller, &id, &headers)
        })
        .await?
    };
    let parts: Vec<&str> = name.split('/').collect();
    if name.len() > 4096
        || parts
            .iter()
            .any(|p| p.is_empty() || *p == "." || *p == ".." || p.len() > 255)
    {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "an artifact's name is a relative path",
        ));
    }
    let (file_name, parents) = parts.split_last().expect("one part at least");
    let build = service.build_files(&id)?;
    let top = upload_dir_name(&lease);
    if build.kind(&top)?.is_none() {
        build.create_subdir(&top, 0o700)?;
    }
    let mut dir = build.open_subdir(&top)?;
    if !parents.is_empty() {
        dir = dir.create_dirs(&parents.join("/"))?;
    }
    let (mut file, temp) = dir.create_temp(file_name, 0o644)?;
    let mut hasher = sha2::Sha256::new();
    let mut size = 0u64;
    let mut stream = body.into_data_stream();
    let written: anyhow::Result<()> = async {
        let idle = Duration::from_secs(super::gate::UPLOAD_IDLE_SECS);
        let max = service.config.max_upload_bytes;
        while let Some(chunk) = tokio::time::timeout(idle, stream.next())
            .await
            .map_err(|_| anyhow::anyhow!("receiving {name}: nothing arrived for {idle:?}"))?
        {
            let chunk = chunk.map_err(|e| anyhow::anyhow!("receiving {name}: {e}"))?;
            hasher.update(&chunk);
            size += chunk.len() as u64;
            anyhow::ensure!(
                size <= max,
                "{name} is larger than this server takes ({max} bytes)"
            );
            file.write_all(&chunk)?;
        }
        file.sync_all()?;
        Ok(())
    }
    .await;
    if let Err(e) = written {
        let _ = dir.remove(&temp);
        return Err(ApiError::new(StatusCode::BAD_REQUEST, format!("{e:#}")));
    }
    // The lease may have run out while the file came.
    if !service.store.holds(&id, &lease)? {
        let _ = dir.remove(&temp);
        return Err(lost());
    }
    dir.commit(&temp, file_name)?;
    let sha256: String = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    service.note_upload(&id, &lease, &name, size, &sha256);
    Ok((
        StatusCode::CREATED,
        Json(json!({ "name": name, "size": size, "sha256": sha256 })),
    )
        .into_response())
}

#[derive(Deserialize)]
struct FinishBody {
    state: String,
    #[serde(default)]
    error: Option<serde_json::Value>,
    #[serde(default)]
    artifacts: Vec<super::store::Artifact>,
}

async fn finish(
    State(service): State<Shared>,
    auth: Result<Auth, ApiError>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Json(body): Json<FinishBody>,
) -> Result<Response, ApiError> {
    let Auth(caller) = auth?;
    let lease = {
        let (id, headers, caller) = (id.clone(), headers.clone(), caller.clone());
        blocking(&service, move |service| {
            held_lease(service, &caller, &id, &headers)
        })
        .await?
    };
    if !matches!(body.state.as_str(), "succeeded" | "failed" | "cancelled") {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "state: succeeded, failed or cancelled",
        ));
    }
    let s = Arc::clone(&service);
    let outcome = tokio::task::spawn_blocking(move || {
        s.finish_remote(&id, &lease, body.state, body.error, body.artifacts)
    })
    .await
    .map_err(|e| anyhow::anyhow!("finishing: {e}"))??;
    match outcome {
        Some((state, problem)) => {
            Ok(Json(json!({ "state": state, "problem": problem })).into_response())
        }
        None => Err(lost()),
    }
}

async fn page() -> impl IntoResponse {
    (
        [(header::CACHE_CONTROL, "no-cache")],
        Html(super::web::PAGE),
    )
}

async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI)
}

async fn metrics(State(service): State<Shared>) -> Result<Response, ApiError> {
    let c = blocking(&service, |service| Ok(service.store.counts()?)).await?;
    let text = format!(
        "# HELP debimg_queue_length Builds waiting for a worker.\n\
         # TYPE debimg_queue_length gauge\n\
         debimg_queue_length {}\n\
         # HELP debimg_running_builds Builds a worker runs now.\n\
         # TYPE debimg_running_builds gauge\n\
         debimg_running_builds {}\n\
         # HELP debimg_builds Finished builds by outcome (those whose jobs are deleted left).\n\
         # TYPE debimg_builds gauge\n\
         debimg_builds{{outcome=\"succeeded\"}} {}\n\
         debimg_builds{{outcome=\"failed\"}} {}\n\
         debimg_builds{{outcome=\"cancelled\"}} {}\n\
         # HELP debimg_build_seconds Seconds of finished builds.\n\
         # TYPE debimg_build_seconds summary\n\
         debimg_build_seconds_sum {}\n\
         debimg_build_seconds_count {}\n",
        c.queued,
        c.running,
        c.succeeded,
        c.failed,
        c.cancelled,
        c.build_seconds_sum,
        c.build_seconds_count
    );
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response())
}

#[derive(Deserialize)]
struct SubmitBody {
    spec: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    email: Option<String>,
}

async fn submit(
    State(service): State<Shared>,
    auth: Result<Auth, ApiError>,
    body: Result<Json<SubmitBody>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    // The gate checked the token (and its role) before a byte of the body was read.
    let Auth(caller) = auth?;
    let Json(body) = body.map_err(|e| {
        let status = e.status();
        ApiError::new(
            status,
            if status == StatusCode::PAYLOAD_TOO_LARGE {
                format!(
                    "the request is larger than this server takes (specs up to {} bytes)",
                    service.config.max_spec_bytes
                )
            } else {
                format!("the body must be JSON {{\"spec\": \"<YAML>\", \"name\": ..., \"email\": ...}}: {}", e.body_text())
            },
        )
    })?;
    let max = service.config.max_spec_bytes;
    if body.spec.len() > max {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the spec has {} bytes; this server takes specs up to {max} bytes",
                body.spec.len()
            ),
        ));
    }
    // Both reach the admin's post-creation command (and perhaps a mail program): text that
    // is only text.
    let problem = body
        .name
        .as_deref()
        .and_then(super::hook::name_problem)
        .or_else(|| body.email.as_deref().and_then(super::hook::email_problem));
    if let Some(problem) = problem {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, problem));
    }
    blocking(&service, move |service| {
        let checked = match check_spec(&body.spec, caller.admin, service.config.isolation) {
            Ok(c) => c,
            Err(refusal) => {
                return Err(ApiError {
                    status: StatusCode::BAD_REQUEST,
                    body: serde_json::to_value(&refusal).expect("serializes"),
                });
            }
        };
        let name = body.name.unwrap_or_else(|| checked.spec.name.clone());
        let email = body.email.unwrap_or_default();
        let submitted = service.store.submit(
            &caller,
            &name,
            &email,
            &super::store::NewBuild {
                spec: &body.spec,
                digest: &checked.digest,
                isolation: service.config.isolation.as_str(),
            },
            &service.config.limits,
        )?;
        let (id, joined) = match submitted {
            Submitted::Job { id, joined } => (id, joined),
            Submitted::OverLimit(why) => {
                return Err(ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    format!("over this token's limit: {why}"),
                ));
            }
        };
        let view = visible_job(service, &caller, &id)?;
        // A job that joined a build in flight queues nothing new.
        if !joined {
            service.queued(&view.build_id);
        }
        let mut r = (StatusCode::CREATED, Json(view)).into_response();
        if let Ok(v) = HeaderValue::from_str(&format!("/api/v1/jobs/{id}")) {
            r.headers_mut().insert(header::LOCATION, v);
        }
        Ok(r)
    })
    .await
}

#[derive(Deserialize)]
struct ListQuery {
    state: Option<String>,
    /// Jobs on a page, newest first (100 by default, 1000 at most).
    limit: Option<u64>,
    /// The page of jobs older than this one (the `next` of the page before).
    before: Option<String>,
}

/// The most jobs on one page of the list.
const MAX_PAGE: u64 = 1000;

async fn list(
    State(service): State<Shared>,
    Auth(caller): Auth,
    Query(q): Query<ListQuery>,
) -> Result<Response, ApiError> {
    if let Some(s) = &q.state
        && !super::store::STATES.contains(&s.as_str())
    {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!(
                "unknown state `{s}`; one of {}",
                super::store::STATES.join(", ")
            ),
        ));
    }
    let limit = q.limit.unwrap_or(100);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("`limit` is 1 to {MAX_PAGE}"),
        ));
    }
    blocking(&service, move |service| {
        let (jobs, next) =
            service
                .store
                .jobs(&caller, q.state.as_deref(), limit, q.before.as_deref())?;
        Ok(Json(json!({ "jobs": jobs, "next": next })).into_response())
    })
    .await
}

/// Job `id` when `caller` may see it; `404` otherwise.
fn visible_job(
    service: &Service,
    caller: &Caller,
    id: &str,
) -> Result<super::store::JobView, ApiError> {
    service
        .store
        .job(caller, id)?
        .ok_or_else(ApiError::not_found)
}

async fn show(
    State(service): State<Shared>,
    Auth(caller): Auth,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    blocking(&service, move |service| {
        Ok(Json(visible_job(service, &caller, &id)?).into_response())
    })
    .await
}

async fn cancel(
    State(service): State<Shared>,
    Auth(caller): Auth,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let (build, view) = blocking(&service, move |service| {
        let view = visible_job(service, &caller, &id)?;
        match service.store.cancel_job(&id)? {
            CancelOutcome::NoSuchJob => return Err(ApiError::not_found()),
            CancelOutcome::AlreadyFinished => {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    format!("the job has finished already ({})", view.state),
                ));
            }
            CancelOutcome::Cancelled { stop } => {
                if let Some(build) = stop {
                    service.stop(&build);
                }
            }
        }
        Ok((view.build_id, visible_job(service, &caller, &id)?))
    })
    .await?;
    let s = Arc::clone(&service);
    tokio::task::spawn_blocking(move || s.after_build(&build));
    Ok(Json(view).into_response())
}

async fn delete(
    State(service): State<Shared>,
    Auth(caller): Auth,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    blocking(&service, move |service| {
        visible_job(service, &caller, &id)?;
        if let CancelOutcome::Cancelled { stop: Some(build) } = service.store.cancel_job(&id)? {
            service.stop(&build);
        }
        if let Some(build) = service.store.delete_job(&id)? {
            service.remove_build_files(&build);
        }
        Ok(StatusCode::NO_CONTENT.into_response())
    })
    .await
}

async fn log(
    State(service): State<Shared>,
    Auth(caller): Auth,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let view = {
        let (caller, id) = (caller.clone(), id.clone());
        blocking(&service, move |service| visible_job(service, &caller, &id)).await?
    };
    let wants_events = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/event-stream"));
    if !wants_events {
        let build = view.build_id.clone();
        let file = blocking(&service, move |service| {
            Ok(match service.existing_build_files(&build)? {
                Some(dir) => dir.open_if_regular("build.log")?,
                None => None,
            })
        })
        .await?;
        let (body, len) = match file {
            Some((f, st)) => (file_body(f, st.st_size as u64), st.st_size as u64),
            None => (Body::empty(), 0),
        };
        return Ok(Response::builder()
            .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
            .header(header::CONTENT_LENGTH, len)
            .body(body)
            .map_err(anyhow::Error::from)?);
    }
    let from = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(0);
    let max = service.config.max_streams;
    let Some(guard) = service.open_stream(&caller.name, max) else {
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            format!("this token follows {max} logs already; close one first"),
        ));
    };
    let stream = log_events(service, caller, id, view.build_id, from, guard);
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}

struct Follow {
    _guard: super::StreamGuard,
    service: Shared,
    caller: Caller,
    job: String,
    build: String,
    offset: u64,
    pending: std::collections::VecDeque<SseEvent>,
    done: bool,
}

/// The most bytes of a log read at once for a stream.
const LOG_CHUNK: usize = 64 * 1024;

/// The log of a build from byte `from` as events, one per line (its id the offset after it),
/// then an `end` event with the job's state once the job has ended and all is sent.
fn log_events(
    service: Shared,
    caller: Caller,
    job: String,
    build: String,
    from: u64,
    guard: super::StreamGuard,
) -> impl futures_util::Stream<Item = Result<SseEvent, std::convert::Infallible>> {
    let state = Follow {
        _guard: guard,
        service,
        caller,
        job,
        build,
        offset: from,
        pending: Default::default(),
        done: false,
    };
    futures_util::stream::unfold(state, |mut f| async move {
        loop {
            if let Some(e) = f.pending.pop_front() {
                return Some((Ok(e), f));
            }
            if f.done {
                return None;
            }
            // The job's state first, then the log: a job that ended has its whole log written.
            // Both off the async threads.
            let (service, caller, job, build, offset) = (
                Arc::clone(&f.service),
                f.caller.clone(),
                f.job.clone(),
                f.build.clone(),
                f.offset,
            );
            let read = tokio::task::spawn_blocking(move || {
                // A token revoked while it follows a log follows it no further.
                if !matches!(service.store.token_active(&caller.name), Ok(true)) {
                    return (None, Vec::new());
                }
                let state = match service.store.job_state(&caller, &job) {
                    Ok(Some(state)) => Some(state),
                    Ok(None) => Some("deleted".to_string()),
                    Err(_) => None,
                };
                (state, service.read_log(&build, offset, LOG_CHUNK))
            })
            .await;
            let Ok((Some(state), chunk)) = read else {
                return None;
            };
            let ended = is_terminal(&state) || state == "deleted";
            // A line longer than a chunk goes out in pieces.
            let whole = chunk.len() == LOG_CHUNK && !chunk.contains(&b'\n');
            let mut used = 0;
            for line in chunk.split_inclusive(|&b| b == b'\n') {
                if !line.ends_with(b"\n") && !ended && !whole {
                    break;
                }
                used += line.len();
                let text = String::from_utf8_lossy(line);
                let text = text.trim_end_matches(['\n', '\r']).replace('\r', "");
                f.pending.push_back(
                    SseEvent::default()
                        .id((f.offset + used as u64).to_string())
                        .data(text),
                );
            }
            f.offset += used as u64;
            if f.pending.is_empty() {
                if ended && chunk.is_empty() {
                    f.done = true;
                    f.pending
                        .push_back(SseEvent::default().event("end").data(state));
                } else {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
            }
        }
    })
}

async fn artifact(
    State(service): State<Shared>,
    Auth(caller): Auth,
    Path((id, name)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let Some((build, art)) = blocking(&service, move |service| {
        Ok(service.store.artifact(&caller, &id, &name)?)
    })
    .await?
    else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "no such job or artifact",
        ));
    };
    let etag = format!("\"{}\"", art.sha256);
    if headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"))
    {
        return Ok((StatusCode::NOT_MODIFIED, [(header::ETAG, etag)]).into_response());
    }
    let opened = {
        let (build, name) = (build.clone(), art.name.clone());
        blocking(&service, move |service| {
            Ok(match service.artifacts_dir(&build)? {
                Some(d) => d.open_regular_at(&name)?,
                None => None,
            })
        })
        .await?
    };
    let Some((mut file, st)) = opened else {
        return Err(ApiError::new(
            StatusCode::GONE,
            "the artifact's file is gone",
        ));
    };
    let size = st.st_size as u64;
    if size != art.size {
        return Err(anyhow::anyhow!("artifact {} of build {build} changed size", art.name).into());
    }
    let range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .map(|v| parse_range(v, size));
    let (status, start, len) = match range {
        None | Some(Range::Ignored) => (StatusCode::OK, 0, size),
        Some(Range::Bytes(a, b)) => (StatusCode::PARTIAL_CONTENT, a, b - a + 1),
        Some(Range::Unsatisfiable) => {
            return Ok((
                StatusCode::RANGE_NOT_SATISFIABLE,
                [(header::CONTENT_RANGE, format!("bytes */{size}"))],
            )
                .into_response());
        }
    };
    file.seek(SeekFrom::Start(start))
        .map_err(anyhow::Error::from)?;
    let body = file_body(file, len);
    let file_name = art.name.rsplit('/').next().unwrap_or(&art.name).to_string();
    let mut r = Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_LENGTH, len)
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::ETAG, etag)
        .header(
            header::CONTENT_DISPOSITION,
            format!(
                "attachment; filename=\"{}\"",
                file_name.replace(['"', '\\'], "_")
            ),
        );
    if status == StatusCode::PARTIAL_CONTENT {
        r = r.header(
            header::CONTENT_RANGE,
            format!("bytes {start}-{}/{size}", start + len - 1),
        );
    }
    Ok(r.body(body).map_err(anyhow::Error::from)?)
}

/// `len` bytes of `file` from where it stands, read off the async threads.
fn file_body(file: std::fs::File, len: u64) -> Body {
    Body::from_stream(futures_util::stream::unfold(
        (Some(file), len),
        |(file, left)| async move {
            let mut file = file?;
            if left == 0 {
                return None;
            }
            let want = left.min(256 * 1024) as usize;
            let read = tokio::task::spawn_blocking(move || {
                let mut buf = vec![0u8; want];
                let r = file.read(&mut buf).map(|n| {
                    buf.truncate(n);
                    buf
                });
                (file, r)
            })
            .await;
            match read {
                Ok((file, Ok(buf))) if !buf.is_empty() => {
                    let n = buf.len() as u64;
                    Some((Ok::<_, std::io::Error>(buf), (Some(file), left - n)))
                }
                Ok((_, Err(e))) => Some((Err(e), (None, 0))),
                _ => None,
            }
        },
    ))
}

/// A `Range` header as this server answers it.
#[derive(Debug, PartialEq, Eq)]
enum Range {
    /// One byte range, both ends included.
    Bytes(u64, u64),
    /// Syntactically a range, but outside the file: 416.
    Unsatisfiable,
    /// Not one `bytes=` range (several ranges too): the whole file, as RFC 9110 allows.
    Ignored,
}

fn parse_range(value: &str, size: u64) -> Range {
    let Some(spec) = value.trim().strip_prefix("bytes=") else {
        return Range::Ignored;
    };
    if spec.contains(',') {
        return Range::Ignored;
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return Range::Ignored;
    };
    let (a, b) = (a.trim(), b.trim());
    if a.is_empty() {
        // The last b bytes.
        let Ok(n) = b.parse::<u64>() else {
            return Range::Ignored;
        };
        if n == 0 || size == 0 {
            return Range::Unsatisfiable;
        }
        return Range::Bytes(size.saturating_sub(n), size - 1);
    }
    let Ok(start) = a.parse::<u64>() else {
        return Range::Ignored;
    };
    let end = if b.is_empty() {
        size.saturating_sub(1)
    } else {
        match b.parse::<u64>() {
            Ok(e) => e.min(size.saturating_sub(1)),
            Err(_) => return Range::Ignored,
        }
    };
    if start >= size || (!b.is_empty() && b.parse::<u64>().is_ok_and(|e| e < start)) {
        return Range::Unsatisfiable;
    }
    Range::Bytes(start, end)
}

/// Serves the API on `config.listen` until INT or TERM; then stops the local builds (the next
/// start queues them again).
pub fn serve(config: super::Config) -> anyhow::Result<()> {
    use anyhow::Context;
    let local_workers = config.local_workers;
    let listen = config.listen.clone();
    let service = Arc::new(Service::open(config)?);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let listener = runtime
        .block_on(super::gate::listen(&listen))
        .with_context(|| format!("listening on {listen}"))?;
    let addr = listener.local_addr()?;
    if let Some(url) = service.config.amqp.clone() {
        let _guard = runtime.enter();
        let publisher = super::amqp::Publisher::start(url, Arc::clone(&service));
        let _ = service.publisher.set(publisher);
    }
    super::runner::start_local_workers(&service, local_workers);
    service.start_reaper();
    tracing::info!(
        "debimg serve: http://{addr}/ ({local_workers} local worker{}, state in {})",
        if local_workers == 1 { "" } else { "s" },
        service.config.state_dir.display()
    );
    let app = router(Arc::clone(&service));
    let served = runtime.block_on(super::gate::serve(listener, app, async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("a TERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("debimg serve: stopping; running builds are queued again");
    }));
    // Streams that follow logs would keep a graceful shutdown waiting: they end with the
    // runtime.
    runtime.shutdown_timeout(Duration::from_secs(1));
    service.shut_down(Duration::from_secs(300));
    served.context("serving HTTP")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9", 100), Range::Bytes(0, 9));
        assert_eq!(parse_range("bytes=90-", 100), Range::Bytes(90, 99));
        assert_eq!(parse_range("bytes=-10", 100), Range::Bytes(90, 99));
        assert_eq!(parse_range("bytes=-500", 100), Range::Bytes(0, 99));
        assert_eq!(parse_range("bytes=50-500", 100), Range::Bytes(50, 99));
        assert_eq!(parse_range("bytes=100-", 100), Range::Unsatisfiable);
        assert_eq!(parse_range("bytes=9-3", 100), Range::Unsatisfiable);
        assert_eq!(parse_range("bytes=0-1,5-6", 100), Range::Ignored);
        assert_eq!(parse_range("items=0-1", 100), Range::Ignored);
    }
}

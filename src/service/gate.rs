//! What stands between a connection and the handlers of `debimg serve`: a cap on open
//! connections, a time limit on headers (and so on idle kept-alive connections), the token
//! looked at before a byte of the body is read, a size and a time limit on every body, and
//! the security headers on every answer.
//!
//! A stranger without a token costs the server one header's worth of memory for at most
//! [`HEADER_SECS`]: a body is read only for a caller the store knows, and never more than
//! its route takes.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

use super::Service;
use super::store::Caller;

/// Seconds a client has to send a request's headers; also how long a kept-alive connection
/// may stay idle (more than a client pool keeps one: ureq's 15 s).
pub const HEADER_SECS: u64 = 30;
/// Seconds a client has to send a whole body, but for artifact uploads.
pub const BODY_SECS: u64 = 30;
/// Seconds an artifact upload may go without a byte arriving.
pub const UPLOAD_IDLE_SECS: u64 = 120;
/// Connections open at once; beyond, new ones are closed at once.
pub const MAX_CONNECTIONS: usize = 1024;

/// Routes that answer without a token.
fn public(path: &str) -> bool {
    matches!(path, "/" | "/healthz" | "/metrics" | "/api/v1/openapi.json")
}

/// Whether `path` is an artifact upload (the one route whose body is as large as an image).
fn is_upload(method: &axum::http::Method, path: &str) -> bool {
    method == axum::http::Method::PUT && path.starts_with("/api/v1/builds/")
}

/// An answer that ends the connection: the client may still be sending a body it is not
/// going to be read.
fn refuse(status: StatusCode, message: &str) -> Response {
    let mut r = (status, axum::Json(serde_json::json!({ "error": message }))).into_response();
    r.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    r
}

/// The caller of a request, or the answer that refuses it: no token, an unknown one, or a
/// token whose role has no business on the route (a worker's token claims and reports builds
/// and does nothing else; no other token reports a build).
async fn caller(
    service: &Arc<Service>,
    token: Option<String>,
    build_route: bool,
) -> Result<Caller, Response> {
    let Some(token) = token else {
        return Err(refuse(
            StatusCode::UNAUTHORIZED,
            "no token: send `Authorization: Bearer <token>` (`debimg serve token add NAME` \
             makes one)",
        ));
    };
    let s = Arc::clone(service);
    let found = tokio::task::spawn_blocking(move || s.store.caller(&token)).await;
    let caller = match found {
        Ok(Ok(Some(c))) => c,
        Ok(Ok(None)) => return Err(refuse(StatusCode::UNAUTHORIZED, "unknown token")),
        Ok(Err(e)) => {
            tracing::error!("the job store: {e:#}");
            return Err(refuse(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal error (see the server's log)",
            ));
        }
        Err(e) => {
            tracing::error!("looking up a token: {e}");
            return Err(refuse(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal error (see the server's log)",
            ));
        }
    };
    if caller.worker && !build_route {
        return Err(refuse(
            StatusCode::FORBIDDEN,
            "a worker's token only claims and reports builds",
        ));
    }
    if !caller.worker && build_route {
        return Err(refuse(
            StatusCode::FORBIDDEN,
            "workers need a worker's token (`debimg serve token add NAME --role worker`)",
        ));
    }
    Ok(caller)
}

/// The largest body a route takes, in bytes.
fn body_limit(service: &Service, req: &Request) -> u64 {
    let path = req.uri().path();
    if is_upload(req.method(), path) {
        service.config.max_upload_bytes
    } else if path.ends_with("/log") && path.starts_with("/api/v1/builds/") {
        // A worker's log chunk.
        4 << 20
    } else {
        // JSON may spell every byte of a spec as `\uXXXX`.
        service.config.max_spec_bytes as u64 * 6 + 64 * 1024
    }
}

/// The middleware: the token first, then the body within its limits, then the handler; the
/// security headers on whatever answers.
pub async fn gate(State(service): State<Arc<Service>>, req: Request, next: Next) -> Response {
    let mut response = admit(&service, req, next).await;
    security_headers(response.headers_mut());
    response
}

async fn admit(service: &Arc<Service>, req: Request, next: Next) -> Response {
    if public(req.uri().path()) {
        return next.run(req).await;
    }
    let token = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(str::to_string);
    let build_route = req.uri().path().starts_with("/api/v1/builds/");
    let caller = match caller(service, token, build_route).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    let limit = body_limit(service, &req);
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return refuse(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("the request is larger than this route takes ({limit} bytes)"),
        );
    }
    let (mut parts, body) = req.into_parts();
    parts.extensions.insert(caller);
    if is_upload(&parts.method, parts.uri.path()) {
        // Streamed to a file by the handler, which counts and times it.
        return next.run(Request::from_parts(parts, body)).await;
    }
    let read = tokio::time::timeout(
        Duration::from_secs(BODY_SECS),
        axum::body::to_bytes(body, limit as usize),
    )
    .await;
    let bytes = match read {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => {
            let too_large = std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>())
                || e.to_string().contains("length limit");
            return if too_large {
                refuse(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    &format!("the request is larger than this route takes ({limit} bytes)"),
                )
            } else {
                refuse(StatusCode::BAD_REQUEST, "the request's body did not arrive")
            };
        }
        Err(_) => {
            return refuse(
                StatusCode::REQUEST_TIMEOUT,
                &format!("the request's body did not arrive within {BODY_SECS} s"),
            );
        }
    };
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}

/// The Content-Security-Policy of every answer: the page's own script and style (by their
/// sha256), its API calls, nothing else; no framing, no base or form target elsewhere.
fn content_security_policy() -> &'static str {
    static CSP: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    CSP.get_or_init(|| {
        let page = super::web::PAGE;
        let hash = |open: &str, close: &str| -> String {
            let Some(start) = page.find(open).map(|i| i + open.len()) else {
                return String::new();
            };
            let end = page[start..].find(close).map_or(page.len(), |i| start + i);
            let d = Sha256::digest(&page.as_bytes()[start..end]);
            format!(" 'sha256-{}'", base64(&d))
        };
        format!(
            "default-src 'none'; script-src{}; style-src{}; connect-src 'self'; img-src 'self'; \
             frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
            hash("<script>", "</script>"),
            hash("<style>", "</style>")
        )
    })
}

fn security_headers(h: &mut axum::http::HeaderMap) {
    if let Ok(v) = HeaderValue::from_str(content_security_policy()) {
        h.insert(header::CONTENT_SECURITY_POLICY, v);
    }
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        "cross-origin-opener-policy",
        HeaderValue::from_static("same-origin"),
    );
    h.insert(
        "cross-origin-resource-policy",
        HeaderValue::from_static("same-origin"),
    );
}

/// Standard base64 with padding.
fn base64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Connections the kernel queues for accepting (tokio's own bind asks for 128, which clients
/// reconnecting by the hundred overflow: each overflow costs an honest client a SYN resent a
/// second later).
const BACKLOG: u32 = 4096;

/// A listening socket on `addr` (the first address it resolves to) with a deep backlog.
pub async fn listen(addr: &str) -> std::io::Result<tokio::net::TcpListener> {
    let addr = tokio::net::lookup_host(addr).await?.next().ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "the address resolves to nothing",
        )
    })?;
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// Serves `app` on `listener` until `shutdown`: each connection HTTP/1.1 with a header (and
/// idle) time limit, at most [`MAX_CONNECTIONS`] at once. Connections still open at the end
/// (log streams) end with the runtime.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let open = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors and the like: wait rather than spin.
                    tracing::warn!("accepting a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = Arc::clone(&open).try_acquire_owned() else {
            tracing::warn!("{MAX_CONNECTIONS} connections are open: closing a new one");
            drop(stream);
            continue;
        };
        let app = app.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: hyper::Request<_>| {
                let mut app = app.clone();
                tower_service::Service::call(&mut app, req.map(Body::new))
            });
            let served = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(HEADER_SECS))
                .max_buf_size(64 * 1024)
                .serve_connection(TokioIo::new(stream), service)
                .await;
            // Every close this server makes is said (a header timeout, a request it could not
            // read); a client going away mid-request is only shown with -v.
            if let Err(e) = served {
                if e.is_incomplete_message() || e.is_closed() {
                    tracing::debug!("the connection from {peer} ended: {e}");
                } else {
                    tracing::info!("closed the connection from {peer}: {e}");
                }
            }
            drop(permit);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_is_standard() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }

    #[test]
    fn the_policy_names_the_page_script_and_style() {
        let csp = content_security_policy();
        assert!(csp.contains("script-src 'sha256-"), "{csp}");
        assert!(csp.contains("style-src 'sha256-"), "{csp}");
        assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
        assert!(!csp.contains("unsafe"), "{csp}");
    }
}

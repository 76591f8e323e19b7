//! Local HTTP endpoints the tests' `http` steps call.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;
use tokio::sync::{Notify, Semaphore};

/// What the endpoints saw.
pub struct Counters {
    /// Requests per path.
    pub hits: Mutex<HashMap<String, usize>>,
    /// Requests in flight right now, and the most seen at once.
    pub in_flight: AtomicUsize,
    /// Most requests in flight at once.
    pub max_in_flight: AtomicUsize,
    /// Idempotency keys whose effect was applied.
    pub applied: Mutex<HashSet<String>>,
    /// The idempotency key of every `/hold` request that carried one, in arrival order
    /// (requests without one are answered 400 and counted as hits of `/hold:no-key`).
    pub hold_keys: Mutex<Vec<String>>,
    /// The bearer token `/auth` expects.
    pub token: Mutex<Option<String>>,
    /// `/hold` requests wait for a permit of this (none until the test releases them).
    pub release: Semaphore,
    /// Signalled when a `/hold` request arrives.
    pub arrived: Notify,
    /// Bodies posted to `/webhook`, in arrival order.
    pub posted: Mutex<Vec<serde_json::Value>>,
}

impl Default for Counters {
    fn default() -> Self {
        Counters {
            hits: Mutex::default(),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
            applied: Mutex::default(),
            hold_keys: Mutex::default(),
            token: Mutex::default(),
            release: Semaphore::new(0),
            arrived: Notify::new(),
            posted: Mutex::default(),
        }
    }
}

impl Counters {
    /// Lets every held `/hold` request (and later ones) go on.
    pub fn release_all(&self) {
        self.release.add_permits(Semaphore::MAX_PERMITS / 2);
    }

    /// Sets the bearer token `/auth` expects.
    pub fn expect_token(&self, token: &str) {
        *self.token.lock().unwrap_or_else(|e| e.into_inner()) = Some(token.to_string());
    }

    /// The idempotency keys `/hold` saw, in arrival order.
    pub fn hold_keys(&self) -> Vec<String> {
        self.hold_keys.lock().map(|k| k.clone()).unwrap_or_default()
    }

    /// Requests seen on a path.
    pub fn hits(&self, path: &str) -> usize {
        self.hits
            .lock()
            .map(|m| m.get(path).copied().unwrap_or(0))
            .unwrap_or(0)
    }
}

fn hit(c: &Counters, path: &str) -> usize {
    let mut m = c.hits.lock().unwrap_or_else(|e| e.into_inner());
    let n = m.entry(path.to_string()).or_default();
    *n += 1;
    *n
}

/// Starts the endpoints on a free local port:
/// - `/flaky/<name>`: 503 for the first two requests, then 200 `{"ok": true, "attempt": n}`;
/// - `/ok`: 200 `{"ok": true}`; `/missing`: 404;
/// - `/slow/<ms>`: 200 after a delay, tracking requests in flight;
/// - `/big/<bytes>`: 200 with a JSON body `{"data": "xxxx…"}` of about that size;
/// - `/hold`: waits for [`Counters::release`], then applies the effect named by the
///   `aob-idempotency-key` header once; a request without that header gets 400 at once;
/// - `/webhook`: `POST` of JSON, kept in [`Counters::posted`], answered 204;
/// - `/auth/<pad>`: 401 unless `authorization` is `Bearer <the token set by
///   Counters::expect_token>`; else 200 echoing the header it got in its body (with `pad`
///   bytes of padding, to make the output large) and in `set-cookie` and `x-echo`, as careless
///   endpoints do.
pub async fn serve() -> (SocketAddr, Arc<Counters>) {
    let counters = Arc::new(Counters::default());
    let app = Router::new()
        .route(
            "/ok",
            get(|State(c): State<Arc<Counters>>| async move {
                hit(&c, "/ok");
                axum::Json(json!({"ok": true}))
            }),
        )
        .route(
            "/missing",
            get(|| async { (StatusCode::NOT_FOUND, "no such thing") }),
        )
        .route("/flaky/{name}", get(flaky))
        .route("/slow/{ms}", get(slow))
        .route("/big/{bytes}", get(big))
        .route("/hold", get(hold))
        .route("/auth/{pad}", get(auth))
        .route(
            "/webhook",
            post(
                |State(c): State<Arc<Counters>>,
                 axum::Json(body): axum::Json<serde_json::Value>| async move {
                    hit(&c, "/webhook");
                    c.posted
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(body);
                    StatusCode::NO_CONTENT
                },
            ),
        )
        .with_state(counters.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("bind: {e}"));
    let addr = listener
        .local_addr()
        .unwrap_or_else(|e| panic!("addr: {e}"));
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (addr, counters)
}

async fn flaky(State(c): State<Arc<Counters>>, Path(name): Path<String>) -> Response {
    let n = hit(&c, &format!("/flaky/{name}"));
    if n <= 2 {
        (StatusCode::SERVICE_UNAVAILABLE, "try again").into_response()
    } else {
        axum::Json(json!({"ok": true, "attempt": n})).into_response()
    }
}

async fn slow(State(c): State<Arc<Counters>>, Path(ms): Path<u64>) -> Response {
    hit(&c, "/slow");
    let now = c.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    c.max_in_flight.fetch_max(now, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(ms)).await;
    c.in_flight.fetch_sub(1, Ordering::SeqCst);
    axum::Json(json!({"slept_ms": ms})).into_response()
}

async fn big(Path(bytes): Path<usize>) -> Response {
    axum::Json(json!({"data": "x".repeat(bytes)})).into_response()
}

async fn hold(State(c): State<Arc<Counters>>, headers: HeaderMap) -> Response {
    let Some(key) = headers
        .get("aob-idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
    else {
        hit(&c, "/hold:no-key");
        c.arrived.notify_one();
        return (StatusCode::BAD_REQUEST, "no aob-idempotency-key header").into_response();
    };
    hit(&c, "/hold");
    if let Ok(mut keys) = c.hold_keys.lock() {
        keys.push(key.clone());
    }
    c.arrived.notify_one();
    if let Ok(p) = c.release.acquire().await {
        p.forget();
    }
    let fresh = c.applied.lock().map(|mut s| s.insert(key)).unwrap_or(false);
    axum::Json(json!({"applied": fresh})).into_response()
}

async fn auth(
    State(c): State<Arc<Counters>>,
    Path(pad): Path<usize>,
    headers: HeaderMap,
) -> Response {
    hit(&c, "/auth");
    let got = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let expected = c
        .token
        .lock()
        .ok()
        .and_then(|t| t.clone())
        .map(|t| format!("Bearer {t}"));
    if expected.as_deref() != Some(got.as_str()) {
        return (StatusCode::UNAUTHORIZED, "wrong or missing token").into_response();
    }
    (
        [
            ("set-cookie", format!("session={got}")),
            ("x-echo", got.clone()),
        ],
        axum::Json(json!({"ok": true, "echo": got, "pad": "x".repeat(pad)})),
    )
        .into_response()
}

//! Health and metrics of a long-running AOB process, served over HTTP when `AOB_HTTP_ADDR`
//! is set (`0.0.0.0:9090`):
//!
//! - `GET /healthz`: 200 while the process runs (liveness);
//! - `GET /readyz`: 200 while its NATS connection is up, 503 otherwise (readiness);
//! - `GET /metrics`: Prometheus text: tasks handled per node type and outcome, handler
//!   latency histograms, and what the process adds (its consumers' pending messages, the
//!   engine's counters).
//!
//! The counters are process-wide: every delivery through [`crate::delivery::deliver`] is
//! counted, whatever the transport.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

/// The variable naming the address to serve on.
pub const ADDR_VAR: &str = "AOB_HTTP_ADDR";

/// Upper bounds of the latency buckets, in seconds.
const BOUNDS: [f64; 12] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0,
];

#[derive(Default)]
struct Histogram {
    buckets: [u64; BOUNDS.len()],
    count: u64,
    sum: f64,
}

#[derive(Default)]
struct Counters {
    tasks: BTreeMap<(String, String), u64>,
    latency: BTreeMap<String, Histogram>,
}

static COUNTERS: LazyLock<Mutex<Counters>> = LazyLock::new(Mutex::default);

/// Counts one delivery of a task of `node_type`: its outcome (`completed`, `failed`,
/// `waiting`, `aborted`, `retried`, `refused`) and how long it took.
pub fn record_task(node_type: &str, outcome: &str, took: Duration) {
    let Ok(mut c) = COUNTERS.lock() else {
        return;
    };
    *c.tasks
        .entry((node_type.to_string(), outcome.to_string()))
        .or_default() += 1;
    let h = c.latency.entry(node_type.to_string()).or_default();
    let secs = took.as_secs_f64();
    for (i, b) in BOUNDS.iter().enumerate() {
        if secs <= *b {
            h.buckets[i] += 1;
        }
    }
    h.count += 1;
    h.sum += secs;
}

/// The process-wide counters as Prometheus text.
pub fn render_counters() -> String {
    let mut out = String::new();
    let Ok(c) = COUNTERS.lock() else {
        return out;
    };
    out.push_str("# HELP aob_tasks_total Task deliveries handled, by node type and outcome.\n# TYPE aob_tasks_total counter\n");
    for ((t, o), n) in &c.tasks {
        let _ = writeln!(
            out,
            "aob_tasks_total{{node_type=\"{t}\",outcome=\"{o}\"}} {n}"
        );
    }
    out.push_str("# HELP aob_task_seconds Time from taking a task to settling its result.\n# TYPE aob_task_seconds histogram\n");
    for (t, h) in &c.latency {
        for (i, b) in BOUNDS.iter().enumerate() {
            let _ = writeln!(
                out,
                "aob_task_seconds_bucket{{node_type=\"{t}\",le=\"{b}\"}} {}",
                h.buckets[i]
            );
        }
        let _ = writeln!(
            out,
            "aob_task_seconds_bucket{{node_type=\"{t}\",le=\"+Inf\"}} {}",
            h.count
        );
        let _ = writeln!(out, "aob_task_seconds_sum{{node_type=\"{t}\"}} {}", h.sum);
        let _ = writeln!(
            out,
            "aob_task_seconds_count{{node_type=\"{t}\"}} {}",
            h.count
        );
    }
    out
}

/// More metrics a process adds at each scrape.
pub type Extra = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = String> + Send>> + Send + Sync>;

/// Pending messages of durable consumers, as a Prometheus gauge (`aob_consumer_pending`):
/// how far behind each one is.
pub async fn consumer_lag(
    js: &async_nats::jetstream::Context,
    consumers: &[(&str, &str)],
) -> String {
    let mut out = String::from(
        "# HELP aob_consumer_pending Messages not yet delivered to a durable consumer.\n# TYPE aob_consumer_pending gauge\n",
    );
    for (stream, name) in consumers {
        let info = async {
            let s = js.get_stream(*stream).await.ok()?;
            let mut c = s
                .get_consumer::<async_nats::jetstream::consumer::pull::Config>(name)
                .await
                .ok()?;
            c.info()
                .await
                .ok()
                .map(|i| (i.num_pending, i.num_ack_pending))
        };
        if let Ok(Some((pending, ack_pending))) =
            tokio::time::timeout(Duration::from_secs(2), info).await
        {
            let _ = writeln!(
                out,
                "aob_consumer_pending{{stream=\"{stream}\",consumer=\"{name}\"}} {pending}\naob_consumer_ack_pending{{stream=\"{stream}\",consumer=\"{name}\"}} {ack_pending}"
            );
        }
    }
    out
}

/// The health and metrics routes; `client` tells readiness.
pub fn router(client: async_nats::Client, extra: Option<Extra>) -> Router {
    let ready = move || client.connection_state() == async_nats::connection::State::Connected;
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || async move {
                if ready() {
                    (StatusCode::OK, "ready\n")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "not connected to NATS\n")
                }
            }),
        )
        .route(
            "/metrics",
            get(move || {
                let extra = extra.clone();
                async move {
                    let mut text = render_counters();
                    if let Some(x) = extra {
                        text.push_str(&x().await);
                    }
                    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
                }
            }),
        )
}

/// Serves health and metrics on `listener` until `shutdown`. `client` tells readiness.
pub async fn serve(
    listener: tokio::net::TcpListener,
    client: async_nats::Client,
    extra: Option<Extra>,
    shutdown: tokio_util::sync::CancellationToken,
) -> crate::Result<()> {
    let addr = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let app = router(client, extra);
    tracing::info!(%addr, "serving /healthz, /readyz and /metrics");
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
        .map_err(|e| crate::Error::Config(format!("serving {addr}: {e}")))
}

/// Starts [`serve`] in the background when `AOB_HTTP_ADDR` is set; an address that cannot
/// be bound is an error now, not a silent absence.
pub async fn serve_from_env(
    client: &async_nats::Client,
    extra: Option<Extra>,
    shutdown: tokio_util::sync::CancellationToken,
) -> crate::Result<()> {
    let Some(addr) = std::env::var(ADDR_VAR)
        .ok()
        .filter(|a| !a.trim().is_empty())
    else {
        return Ok(());
    };
    // Bound now, so that a taken port fails the start.
    let bad = |e: std::io::Error| crate::Error::Config(format!("{ADDR_VAR} `{addr}`: {e}"));
    let listener = tokio::net::TcpListener::bind(&addr).await.map_err(bad)?;
    let client = client.clone();
    tokio::spawn(async move {
        if let Err(e) = serve(listener, client, extra, shutdown).await {
            tracing::error!("{e}");
        }
    });
    Ok(())
}

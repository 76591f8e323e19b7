//! Functions served somewhere else than on a NATS consumer, and the bridges that reach them.
//!
//! **The function side.** The same binary that consumes tasks from NATS serves them over
//! another transport when `AOB_TRANSPORT` says so (see [`Transport`]):
//!
//! - `http`: CloudEvents over HTTP (Knative, Cloud Run, any HTTP platform). `POST /` takes
//!   an event of type [`TASK_EVENT`] whose data is the task, in binary or structured mode,
//!   and answers with a reply event of type [`REPLY_EVENT`] whose data is a [`Reply`].
//!   `/healthz`, `/readyz` and `/metrics` are served on the same port.
//! - `lambda`: AWS Lambda through `lambda_runtime`: the event is the task, the response is
//!   the [`Reply`].
//!
//! Either way the task goes through the same delivery contract as on NATS
//! ([`crate::delivery::deliver`]), with one difference: the result and the audit records are
//! not settled by the function but *returned*, and whoever invoked it settles them.
//!
//! **The bridge side.** A bridge ([`serve_bridge`]) takes the tasks of some node types from
//! their durable consumers, as a function would, and invokes the function for each through
//! an [`Invoke`]: a CloudEvents POST ([`HttpInvoke`]) or a Lambda invocation (the `aob`
//! command's). It then settles the reply exactly as a NATS function settles its own result
//! (the audit records stored, the result handed to the engine), and only then acks. A
//! function that cannot be reached, is throttled or fails is asked again later: the task is
//! never acknowledged without a settled result.

use std::sync::Arc;
use std::time::Duration;

use cloudevents::{AttributesReader, EventBuilder, EventBuilderV10};
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

use aob_model::audit::DecisionRecord;
use aob_model::wire::{StepResult, Task};

use crate::context::Context;
use crate::delivery::{Contract, Delivered, Ran, Runner, deliver, memory};
use crate::{Error, Handler, PayloadStore, Result};

/// CloudEvents type of a task.
pub const TASK_EVENT: &str = "dev.aob.task";
/// CloudEvents type of a function's reply.
pub const REPLY_EVENT: &str = "dev.aob.task.reply";
/// CloudEvents extension attribute naming the node type (for brokers' triggers).
pub const NODE_TYPE_EXT: &str = "aobnodetype";
/// CloudEvents extension attribute vouching that the bridge sent a task: a reply or a
/// dead letter delivered to the bridge must carry it back (see [`serve_replies`]).
pub const TOKEN_EXT: &str = "aobtoken";
/// The variable holding the broker variant's key, shared by the bridge's replicas only.
pub const BRIDGE_KEY_VAR: &str = "AOB_BRIDGE_KEY";

/// The token of the task `run_id`/`attempt` (a [`aob_model::wire::StepRef::token`]):
/// HMAC-SHA256 under the bridge's key, hex.
pub fn task_token(key: &[u8], run_id: &str, attempt: &str) -> String {
    use hmac::Mac as _;
    task_mac(key, run_id, attempt)
        .map(|mac| {
            mac.finalize()
                .into_bytes()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect()
        })
        .unwrap_or_default()
}

/// The MAC of the task `run_id`/`attempt` under `key`, fed and not yet finalized.
fn task_mac(key: &[u8], run_id: &str, attempt: &str) -> Option<hmac::Hmac<sha2::Sha256>> {
    use hmac::Mac as _;
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(key).ok()?;
    mac.update(run_id.as_bytes());
    mac.update(b"\n");
    mac.update(attempt.as_bytes());
    Some(mac)
}

/// Whether `token` is the token of that task (in constant time).
fn token_ok(key: &[u8], run_id: &str, attempt: &str, token: &str) -> bool {
    use hmac::Mac as _;
    let Some(mac) = task_mac(key, run_id, attempt) else {
        return false;
    };
    let Some(bytes) = (0..token.len())
        .step_by(2)
        .map(|i| {
            token
                .get(i..i + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        })
        .collect::<Option<Vec<u8>>>()
    else {
        return false;
    };
    mac.verify_slice(&bytes).is_ok()
}

/// CloudEvents extension attribute (and Lambda client-context key) carrying the W3C trace
/// context.
pub const TRACEPARENT_EXT: &str = crate::trace::HEADER;

/// How a function binary takes its tasks: `AOB_TRANSPORT`, or what the platform says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// Its durable consumer on NATS (the default).
    Nats,
    /// CloudEvents over HTTP on this address (`0.0.0.0:$PORT`; `PORT` defaults to 8080).
    Http(String),
    /// The Lambda Runtime API (`AWS_LAMBDA_RUNTIME_API`).
    Lambda,
}

/// The variable choosing the transport.
pub const TRANSPORT_VAR: &str = "AOB_TRANSPORT";

impl Transport {
    /// `AOB_TRANSPORT` (`nats`, `http`, `lambda`); without it, `lambda` inside Lambda
    /// (`AWS_LAMBDA_RUNTIME_API` set), `http` inside Knative (`K_SERVICE` set), else `nats`.
    pub fn from_env() -> Result<Self> {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        let http = || {
            let port = var("PORT").unwrap_or_else(|| "8080".into());
            Transport::Http(format!("0.0.0.0:{port}"))
        };
        match var(TRANSPORT_VAR).as_deref() {
            Some("nats") => Ok(Transport::Nats),
            Some("http") => Ok(http()),
            Some("lambda") => Ok(Transport::Lambda),
            Some(other) => Err(Error::Config(format!(
                "{TRANSPORT_VAR}=`{other}`: expected `nats`, `http` or `lambda`"
            ))),
            None if var("AWS_LAMBDA_RUNTIME_API").is_some() => Ok(Transport::Lambda),
            None if var("K_SERVICE").is_some() => Ok(http()),
            None => Ok(Transport::Nats),
        }
    }
}

/// What a function answers for one task.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    /// The result, when the task ran (completed, failed or waiting).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<StepResult>,
    /// The attempt's audit records, to be stored with the result.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub records: Vec<DecisionRecord>,
    /// Why the task cannot be used (it is dead-lettered, never run again).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
}

/// Runs one task as it arrived through the delivery contract in this process, keeping the
/// result and records to return them: the function side of every remote transport.
pub async fn answer<H: Handler>(
    handler: &H,
    body: Vec<u8>,
    traceparent: Option<String>,
    contract: &Contract,
) -> Reply {
    #[derive(Deserialize)]
    struct Tenant {
        tenant: String,
    }
    // Remote tasks come without their subject: it is the one their tenant's tasks use.
    let origin = serde_json::from_slice::<Tenant>(&body)
        .map(|t| aob_streams::subjects::task(&t.tenant, handler.node_type()))
        .unwrap_or_default();
    let d = memory::Delivery {
        origin,
        body,
        traceparent,
        ..Default::default()
    };
    let delivered = deliver(handler, &d, contract).await;
    let seen = d.seen();
    match delivered {
        Delivered::Settled(result) => Reply {
            result: Some(result),
            records: seen.audited,
            refused: None,
        },
        Delivered::Refused(reason) => Reply {
            refused: Some(reason),
            ..Reply::default()
        },
        // Nothing cancels or forwards a remote task here, and keeping results in memory
        // cannot fail.
        Delivered::Aborted | Delivered::Retried(_) | Delivered::Forwarded => Reply::default(),
    }
}

/// Serves a handler as CloudEvents over HTTP on `listener` until `shutdown`, with health
/// and metrics on the same port.
pub async fn serve_http<H: Handler>(
    handler: Arc<H>,
    contract: Contract,
    client: async_nats::Client,
    listener: tokio::net::TcpListener,
    shutdown: tokio_util::sync::CancellationToken,
) -> Result<()> {
    use axum::extract::State;
    use axum::http::{HeaderMap, StatusCode};
    use axum::response::{IntoResponse, Response};

    type Shared<H> = Arc<(Arc<H>, Contract)>;
    async fn take<H: Handler>(
        State(state): State<Shared<H>>,
        headers: HeaderMap,
        body: axum::body::Bytes,
    ) -> Response {
        let (handler, contract) = &*state;
        let bad = |m: String| (StatusCode::BAD_REQUEST, m).into_response();
        let event = match event_of(&headers, &body) {
            Ok(e) => e,
            Err(e) => return bad(e),
        };
        if event.ty() != TASK_EVENT {
            return bad(format!(
                "event type `{}` is not a task (`{TASK_EVENT}`)",
                event.ty()
            ));
        }
        let Some(body) = data_of(&event) else {
            return bad("the event has no data: a task was expected".into());
        };
        let traceparent = event.extension(TRACEPARENT_EXT).map(|tp| tp.to_string());
        let reply = answer(&**handler, body, traceparent, contract).await;
        let mut out = EventBuilderV10::new()
            .id(format!("{}.reply", event.id()))
            .subject(event.subject().unwrap_or_default())
            .source(format!("aob-{}", handler.node_type()))
            .ty(REPLY_EVENT)
            .extension(NODE_TYPE_EXT, handler.node_type())
            .data(
                "application/json",
                serde_json::to_value(&reply).unwrap_or_default(),
            );
        for ext in [TRACEPARENT_EXT, TOKEN_EXT] {
            if let Some(v) = event.extension(ext) {
                out = out.extension(ext, v.to_string());
            }
        }
        match out.build() {
            Ok(e) => e.into_response(),
            Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
        }
    }

    let addr = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let node_type = handler.node_type();
    let state: Shared<H> = Arc::new((handler, contract));
    let app = crate::telemetry::router(client, None).merge(
        axum::Router::new()
            .route("/", axum::routing::post(take::<H>))
            .with_state(state),
    );
    tracing::info!(%addr, node_type, "serving tasks as CloudEvents over HTTP");
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
        .map_err(|e| Error::Config(format!("serving {addr}: {e}")))
}

/// Serves a handler as an AWS Lambda function (the Runtime API at
/// `AWS_LAMBDA_RUNTIME_API`): the event is a task, the response its [`Reply`].
pub async fn serve_lambda<H: Handler>(handler: Arc<H>, contract: Contract) -> Result<()> {
    let contract = Arc::new(contract);
    let service = lambda_runtime::service_fn(
        move |event: lambda_runtime::LambdaEvent<serde_json::Value>| {
            let (handler, contract) = (handler.clone(), contract.clone());
            async move {
                let body = serde_json::to_vec(&event.payload)?;
                let traceparent = event
                    .context
                    .client_context
                    .as_ref()
                    .and_then(|c| c.custom.get(TRACEPARENT_EXT).cloned());
                let reply = answer(&*handler, body, traceparent, &contract).await;
                // A Lambda may be frozen right after it answers: send its spans now.
                crate::trace::flush().await;
                Ok::<_, lambda_runtime::Error>(serde_json::to_value(reply)?)
            }
        },
    );
    lambda_runtime::run(service)
        .await
        .map_err(|e| Error::Config(format!("the Lambda runtime stopped: {e}")))
}

/// Why an invocation gave no reply; the task is delivered again.
#[derive(Debug, Clone, PartialEq)]
pub struct Unanswered {
    /// What happened.
    pub reason: String,
    /// How long the function asked to be left alone (throttling), when it said.
    pub retry_after: Option<Duration>,
}

/// How a bridge reaches the function of one node type.
pub trait Invoke: Send + Sync + 'static {
    /// Where it goes, for logs.
    fn target(&self) -> String;
    /// Invokes the function with one task (`body`, as it arrived). `traceparent` is the
    /// trace context to pass on.
    fn invoke<'a>(
        &'a self,
        task: &'a Task,
        body: &'a [u8],
        traceparent: Option<&'a str>,
    ) -> BoxFuture<'a, std::result::Result<Reply, Unanswered>>;
}

/// Delay before asking an unreachable or failing function again.
const UNREACHABLE_DELAY: Duration = Duration::from_secs(5);

/// A function elsewhere, run through an [`Invoke`].
pub struct Remote {
    node_type: String,
    invoke: Arc<dyn Invoke>,
}

impl Remote {
    /// The function of `node_type`, reached by `invoke`.
    pub fn new(node_type: &str, invoke: Arc<dyn Invoke>) -> Self {
        Remote {
            node_type: node_type.to_string(),
            invoke,
        }
    }
}

impl Runner for Remote {
    fn node_type(&self) -> &str {
        &self.node_type
    }
    fn run<'a>(
        &'a self,
        task: Task,
        body: &'a [u8],
        cx: &'a Context,
        _contract: &'a Contract,
    ) -> BoxFuture<'a, Ran> {
        Box::pin(async move {
            let traceparent = cx.traceparent();
            let reply = tokio::select! {
                biased;
                // The run was aborted: stop waiting; the function's late answer is dropped.
                _ = cx.cancelled().cancelled() => return Ran::Aborted,
                r = self.invoke.invoke(&task, body, traceparent.as_deref()) => r,
            };
            match reply {
                Ok(Reply {
                    result: Some(result),
                    records,
                    ..
                }) => {
                    if result.run_id != task.run_id || result.at != task.at {
                        return Ran::Failed {
                            reason: format!(
                                "{} answered for another task ({} {}), not {} {}",
                                self.invoke.target(),
                                result.run_id,
                                result.at.token(),
                                task.run_id,
                                task.at.token()
                            ),
                            delay: UNREACHABLE_DELAY,
                        };
                    }
                    Ran::Done { result, records }
                }
                Ok(Reply {
                    refused: Some(reason),
                    ..
                }) => Ran::Refused(reason),
                Ok(_) => Ran::Failed {
                    reason: format!(
                        "{} answered with neither a result nor a refusal",
                        self.invoke.target()
                    ),
                    delay: UNREACHABLE_DELAY,
                },
                Err(u) => {
                    tracing::warn!(target = %self.invoke.target(), "invocation failed: {}", u.reason);
                    Ran::Failed {
                        reason: u.reason,
                        delay: u.retry_after.unwrap_or(UNREACHABLE_DELAY),
                    }
                }
            }
        })
    }
}

/// Serves the node types of `routes` from their durable consumers, invoking each one's
/// function, until `shutdown`; then drains.
pub async fn serve_bridge(
    client: async_nats::Client,
    payloads: PayloadStore,
    routes: Vec<(String, Arc<dyn Invoke>)>,
    shutdown: tokio_util::sync::CancellationToken,
) -> Result<()> {
    let runners = routes
        .into_iter()
        .map(|(node_type, invoke)| {
            tracing::info!(node_type, target = %invoke.target(), "bridging");
            Arc::new(Remote::new(&node_type, invoke))
        })
        .collect();
    serve_all(
        client,
        payloads,
        runners,
        tokio::task::JoinSet::new(),
        shutdown,
    )
    .await
}

/// Serves each runner from its node type's durable consumer, beside what `all` runs
/// already, until `shutdown`; one that fails (its consumer is missing) stops the others.
async fn serve_all<R: Runner>(
    client: async_nats::Client,
    payloads: PayloadStore,
    runners: Vec<Arc<R>>,
    mut all: tokio::task::JoinSet<Result<()>>,
    shutdown: tokio_util::sync::CancellationToken,
) -> Result<()> {
    for runner in runners {
        all.spawn(crate::nats::serve(
            runner,
            client.clone(),
            payloads.clone(),
            crate::nats::ServeConfig::default(),
            shutdown.clone(),
        ));
    }
    let mut first_error = None;
    while let Some(done) = all.join_next().await {
        let r = done.map_err(|e| Error::Config(format!("a bridge loop stopped: {e}")))?;
        if let Err(e) = r {
            shutdown.cancel();
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// Invokes functions served as CloudEvents over HTTP: one POST per task, in binary mode.
pub struct HttpInvoke {
    url: String,
    node_type: String,
    http: reqwest::Client,
    /// With a key, each task carries its token ([`TOKEN_EXT`]).
    key: Option<Vec<u8>>,
}

impl HttpInvoke {
    /// The function of `node_type` at `url`.
    pub fn new(node_type: &str, url: &str) -> Result<Self> {
        let parsed = url::Url::parse(url)
            .map_err(|e| Error::Config(format!("route `{node_type}={url}`: {e}")))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(Error::Config(format!(
                "route `{node_type}={url}`: expected an http:// or https:// URL"
            )));
        }
        crate::init_tls();
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| Error::Config(format!("HTTP client: {e}")))?;
        Ok(HttpInvoke {
            url: url.to_string(),
            node_type: node_type.to_string(),
            http,
            key: None,
        })
    }
}

/// The `Retry-After` of a response, in seconds.
fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .map(Duration::from_secs)
}

impl HttpInvoke {
    /// POSTs one task as a CloudEvent in binary mode; `Err` when nothing answered or the
    /// answer is not a success.
    async fn post(
        &self,
        task: &Task,
        body: &[u8],
        traceparent: Option<&str>,
    ) -> std::result::Result<reqwest::Response, Unanswered> {
        let mut req = self
            .http
            .post(&self.url)
            .header("ce-specversion", "1.0")
            .header("ce-id", format!("{}.{}", task.run_id, task.at.token()))
            .header("ce-source", format!("aob/{}", task.tenant))
            .header("ce-type", TASK_EVENT)
            .header(
                "ce-subject",
                aob_streams::subjects::task(&task.tenant, &self.node_type),
            )
            .header(format!("ce-{NODE_TYPE_EXT}"), &self.node_type)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.to_vec());
        if let Some(tp) = traceparent {
            req = req.header(format!("ce-{TRACEPARENT_EXT}"), tp);
        }
        if let Some(key) = &self.key {
            let token = task_token(key, &task.run_id, &task.at.token());
            req = req.header(format!("ce-{TOKEN_EXT}"), token);
        }
        if let Some(d) = task.deadline_ms {
            // A little past the step's deadline: the function reports the timeout itself.
            let left = d.saturating_sub(crate::now_ms()) + 5_000;
            req = req.timeout(Duration::from_millis(left));
        }
        let resp = req.send().await.map_err(|e| Unanswered {
            reason: format!("POST {}: {e}", self.url),
            retry_after: None,
        })?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let retry_after = retry_after(resp.headers());
        let bytes = resp.bytes().await.unwrap_or_default();
        let text = String::from_utf8_lossy(&bytes[..bytes.len().min(512)]).into_owned();
        Err(Unanswered {
            reason: format!("{} answered {status}: {}", self.url, text.trim()),
            retry_after,
        })
    }
}

impl Invoke for HttpInvoke {
    fn target(&self) -> String {
        self.url.clone()
    }
    fn invoke<'a>(
        &'a self,
        task: &'a Task,
        body: &'a [u8],
        traceparent: Option<&'a str>,
    ) -> BoxFuture<'a, std::result::Result<Reply, Unanswered>> {
        Box::pin(async move {
            let unanswered = |reason: String| Unanswered {
                reason,
                retry_after: None,
            };
            let resp = self.post(task, body, traceparent).await?;
            let headers = resp.headers().clone();
            let bytes = resp
                .bytes()
                .await
                .map_err(|e| unanswered(format!("reading the reply from {}: {e}", self.url)))?;
            event_of(&headers, &bytes)
                .and_then(|event| reply_of(&event))
                .map_err(|e| unanswered(format!("{}: {e}", self.url)))
        })
    }
}

/// The CloudEvent of an HTTP message (binary or structured mode).
fn event_of(
    headers: &axum::http::HeaderMap,
    body: &[u8],
) -> std::result::Result<cloudevents::Event, String> {
    cloudevents::binding::http::to_event(headers, body.to_vec())
        .map_err(|e| format!("not a CloudEvent: {e}"))
}

/// An event's data as bytes (JSON, a string or binary), if it has any.
fn data_of(event: &cloudevents::Event) -> Option<Vec<u8>> {
    match event.data()? {
        cloudevents::Data::Json(v) => serde_json::to_vec(v).ok(),
        cloudevents::Data::Binary(b) => Some(b.clone()),
        cloudevents::Data::String(s) => Some(s.clone().into_bytes()),
    }
}

/// The [`Reply`] in a reply event.
fn reply_of(event: &cloudevents::Event) -> std::result::Result<Reply, String> {
    if event.ty() != REPLY_EVENT {
        return Err(format!(
            "an event of type `{}`, not `{REPLY_EVENT}`",
            event.ty()
        ));
    }
    let data = data_of(event).ok_or("a reply event without data")?;
    serde_json::from_slice(&data).map_err(|e| format!("unreadable reply: {e}"))
}

/// Hands tasks to a Knative broker (its ingress URL) instead of a function: the broker,
/// backed by JetStream, delivers each to its function through a trigger, and the reply
/// event comes back to [`serve_replies`]. The task is acknowledged once the broker took it.
pub struct Forward {
    node_type: String,
    broker: HttpInvoke,
}

impl Forward {
    /// Tasks of `node_type` to the broker at `url`, each with its token under `key`.
    pub fn new(node_type: &str, url: &str, key: &[u8]) -> Result<Self> {
        let mut broker = HttpInvoke::new(node_type, url)?;
        broker.key = Some(key.to_vec());
        Ok(Forward {
            node_type: node_type.to_string(),
            broker,
        })
    }
}

impl Runner for Forward {
    fn node_type(&self) -> &str {
        &self.node_type
    }
    fn run<'a>(
        &'a self,
        task: Task,
        body: &'a [u8],
        cx: &'a Context,
        _contract: &'a Contract,
    ) -> BoxFuture<'a, Ran> {
        Box::pin(async move {
            let traceparent = cx.traceparent();
            match self.broker.post(&task, body, traceparent.as_deref()).await {
                Ok(_) => Ran::Forwarded,
                Err(u) => {
                    tracing::warn!(broker = %self.broker.url, "the broker did not take a task: {}", u.reason);
                    Ran::Failed {
                        reason: u.reason,
                        delay: u.retry_after.unwrap_or(UNREACHABLE_DELAY),
                    }
                }
            }
        })
    }
}

/// Serves the node types of `types` by handing their tasks to the broker at `broker`
/// ([`Forward`]), and the broker's deliveries back on `listener` ([`serve_replies`]),
/// until `shutdown`. `key` signs the tasks and checks what comes back.
pub async fn serve_broker(
    client: async_nats::Client,
    payloads: PayloadStore,
    types: Vec<String>,
    broker: &str,
    key: &[u8],
    listener: tokio::net::TcpListener,
    shutdown: tokio_util::sync::CancellationToken,
) -> Result<()> {
    if key.len() < 16 {
        return Err(Error::Config(format!(
            "{BRIDGE_KEY_VAR} must hold at least 16 bytes: it vouches for the replies the broker delivers"
        )));
    }
    let mut all = tokio::task::JoinSet::new();
    all.spawn(serve_replies(
        async_nats::jetstream::new(client.clone()),
        key.to_vec(),
        listener,
        shutdown.clone(),
    ));
    let mut runners = Vec::new();
    for node_type in types {
        tracing::info!(node_type, broker, "forwarding to the broker");
        runners.push(Arc::new(Forward::new(&node_type, broker, key)?));
    }
    serve_all(client, payloads, runners, all, shutdown).await
}

/// Takes what a broker's triggers deliver to the bridge, on `listener`, until `shutdown`.
/// Everything must carry the token ([`TOKEN_EXT`]) of the task it is about, made with
/// `key`: anything else is refused with 401, so only what the bridge sent can settle a step.
///
/// - `POST /replies`: a function's reply event. Its audit records are stored and its
///   result handed to the engine, and only then is it answered 200; a failure is a 503, so
///   the broker delivers it again. A refusal is dead-lettered.
/// - `POST /dead-letters`: a task the broker could not deliver to its function. It is
///   dead-lettered on its task subject, from where `aob dlq replay` can send it again.
pub async fn serve_replies(
    js: async_nats::jetstream::Context,
    key: Vec<u8>,
    listener: tokio::net::TcpListener,
    shutdown: tokio_util::sync::CancellationToken,
) -> Result<()> {
    use axum::extract::State;
    use axum::http::{HeaderMap, StatusCode};

    type Answer = (StatusCode, String);
    type Shared = Arc<(async_nats::jetstream::Context, Vec<u8>)>;
    fn unvouched() -> Answer {
        (
            StatusCode::UNAUTHORIZED,
            format!("no valid `{TOKEN_EXT}`: this bridge did not send that task\n"),
        )
    }
    async fn replies(
        State(shared): State<Shared>,
        headers: HeaderMap,
        body: axum::body::Bytes,
    ) -> Answer {
        let event = match event_of(&headers, &body) {
            Ok(e) => e,
            Err(e) => return (StatusCode::BAD_REQUEST, e),
        };
        let reply = match reply_of(&event) {
            Ok(r) => r,
            Err(e) => return (StatusCode::BAD_REQUEST, e),
        };
        let (js, key) = (&shared.0, &shared.1);
        // The reply's id is `<task id>.reply`, the task's id `<run>.<attempt token>`.
        let token = event
            .extension(TOKEN_EXT)
            .map(|t| t.to_string())
            .unwrap_or_default();
        let vouched = match &reply.result {
            Some(r) => token_ok(key, &r.run_id, &r.at.token(), &token),
            None => event
                .id()
                .strip_suffix(".reply")
                .and_then(|id| id.split_once('.'))
                .is_some_and(|(run, attempt)| token_ok(key, run, attempt, &token)),
        };
        if !vouched {
            return unvouched();
        }
        let subject = event.subject().unwrap_or_default().to_string();
        let traceparent = event.extension(TRACEPARENT_EXT).map(|t| t.to_string());
        let component = format!(
            "fn.{}",
            event
                .extension(NODE_TYPE_EXT)
                .map(|t| t.to_string())
                .unwrap_or_else(|| "unknown".into())
        );
        let Some(result) = reply.result else {
            let reason = reply.refused.unwrap_or_else(|| {
                "the function replied with neither a result nor a refusal".into()
            });
            crate::bus::dead_letter(js, &component, &subject, &body, &reason).await;
            return (StatusCode::OK, "dead-lettered\n".into());
        };
        let settle = async {
            for r in &reply.records {
                crate::bus::publish_record(js, r)
                    .await?
                    .await
                    .map_err(|e| Error::Nats(format!("an audit record not acknowledged: {e}")))?;
            }
            crate::nats::deliver_result(js, &result, crate::nats::ServeConfig::default().handoff)
                .await
        };
        match crate::trace::scope(traceparent.as_deref(), settle).await {
            Ok(()) => (StatusCode::OK, "settled\n".into()),
            Err(e) => (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not stored, send it again: {e}\n"),
            ),
        }
    }
    async fn dead_letters(
        State(shared): State<Shared>,
        headers: HeaderMap,
        body: axum::body::Bytes,
    ) -> Answer {
        let event = match event_of(&headers, &body) {
            Ok(e) => e,
            Err(e) => return (StatusCode::BAD_REQUEST, e),
        };
        let (js, key) = (&shared.0, &shared.1);
        let token = event
            .extension(TOKEN_EXT)
            .map(|t| t.to_string())
            .unwrap_or_default();
        let vouched = event
            .id()
            .split_once('.')
            .is_some_and(|(run, attempt)| token_ok(key, run, attempt, &token));
        if !vouched {
            return unvouched();
        }
        let task = data_of(&event).unwrap_or_default();
        let node_type = event
            .extension(NODE_TYPE_EXT)
            .map(|t| t.to_string())
            .unwrap_or_else(|| "unknown".into());
        let ext = |k: &str| event.extension(k).map(|v| v.to_string());
        let mut reason =
            format!("the broker could not deliver this {node_type} task to its function");
        if let Some(code) = ext("knativeerrorcode") {
            reason.push_str(&format!(" (it answered {code})"));
        }
        if let Some(dest) = ext("knativeerrordest") {
            reason.push_str(&format!(" at {dest}"));
        }
        let subject = event.subject().unwrap_or_default().to_string();
        crate::bus::dead_letter(js, &format!("fn.{node_type}"), &subject, &task, &reason).await;
        (StatusCode::OK, "dead-lettered\n".into())
    }

    let addr = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let app = axum::Router::new()
        .route("/replies", axum::routing::post(replies))
        .route("/dead-letters", axum::routing::post(dead_letters))
        .with_state::<()>(Arc::new((js, key)) as Shared);
    tracing::info!(%addr, "taking reply events on /replies and undelivered tasks on /dead-letters");
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
        .map_err(|e| Error::Config(format!("serving {addr}: {e}")))
}

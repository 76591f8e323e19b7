//! `aob-scripted-provider`: a TEST DOUBLE of a model provider. It is not a model: it answers
//! from a [`Script`] of rules, speaking the OpenAI chat-completions protocol
//! (`POST /v1/chat/completions`, `POST /chat/completions`) and Anthropic's Messages protocol
//! (`POST /v1/messages`), streamed (SSE) or not, tool calls included. Tests use it to
//! script answers, errors and latency, and to count what reached the "provider"; `aob dev`
//! uses it when no API key is configured.
//!
//! Besides the two protocols it serves `GET /_double/requests` (counts per model and the
//! last request bodies) and `POST /_double/script` (replace the script).

mod anthropic;
mod openai;
mod script;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use script::{Reply, Rule, Script, ScriptedError, ScriptedToolCall, ScriptedUsage, When};

use script::Inbound;

/// How many request bodies the double keeps for [`Requests::recent`].
pub const RECENT_REQUESTS: usize = 100;

/// What can go wrong starting or scripting the double.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The script is not valid.
    #[error("script {origin}: {message}")]
    Script {
        /// The file, or `script` when given as a value, and the rule.
        origin: String,
        /// What is wrong.
        message: String,
    },
    /// The listening socket could not be opened.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// This crate's result.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// One request the double received.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordedRequest {
    /// The path it was posted to.
    pub path: String,
    /// Its `model`.
    pub model: String,
    /// Its body.
    pub body: Value,
}

/// What the double received so far (protocol requests only, not `/_double/*`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Requests {
    /// All requests.
    pub total: u64,
    /// Requests per model name.
    pub by_model: BTreeMap<String, u64>,
    /// The last [`RECENT_REQUESTS`] requests, oldest first.
    pub recent: Vec<RecordedRequest>,
}

impl Requests {
    /// Requests for `model`.
    pub fn for_model(&self, model: &str) -> u64 {
        self.by_model.get(model).copied().unwrap_or(0)
    }
}

struct Compiled {
    script: Script,
    regexes: Vec<Option<regex::Regex>>,
    /// How many times each rule answered.
    used: Vec<u32>,
}

impl Compiled {
    fn new(script: Script, origin: &str) -> Result<Self> {
        let regexes = script.compile(origin)?;
        let used = vec![0; script.rules.len()];
        Ok(Compiled {
            script,
            regexes,
            used,
        })
    }

    /// The reply and delay for `req`, using up one turn of the rule that answers.
    fn pick(&mut self, req: &Inbound) -> (Reply, Duration) {
        for (i, rule) in self.script.rules.iter().enumerate() {
            let left = rule.times.is_none_or(|n| self.used[i] < n);
            if left && rule.when.matches(self.regexes[i].as_ref(), req) {
                self.used[i] += 1;
                return (
                    rule.reply.clone(),
                    Duration::from_millis(rule.delay_ms.unwrap_or(0)),
                );
            }
        }
        let reply = self
            .script
            .default
            .clone()
            .unwrap_or_else(|| Reply::text(format!("scripted reply to: {}", req.last_text)));
        (reply, Duration::ZERO)
    }
}

struct Shared {
    script: Mutex<Compiled>,
    requests: Mutex<Requests>,
}

// A poisoned lock only means a handler panicked mid-update; the counters stay usable.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A running double; it stops when dropped.
pub struct ScriptedProvider {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl std::fmt::Debug for ScriptedProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScriptedProvider")
            .field("addr", &self.addr)
            .finish()
    }
}

impl ScriptedProvider {
    /// Starts the double on `127.0.0.1` and a free port.
    pub async fn start(script: Script) -> Result<Self> {
        Self::bind(SocketAddr::from(([127, 0, 0, 1], 0)), script).await
    }

    /// Starts the double on `addr`.
    pub async fn bind(addr: SocketAddr, script: Script) -> Result<Self> {
        let shared = Arc::new(Shared {
            script: Mutex::new(Compiled::new(script, "script")?),
            requests: Mutex::new(Requests::default()),
        });
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| Error::Bind { addr, source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| Error::Bind { addr, source })?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let app = router(shared.clone());
        tokio::spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stopped.await;
                })
                .await;
            if let Err(e) = served {
                tracing::error!("scripted provider on {addr} stopped: {e}");
            }
        });
        Ok(ScriptedProvider {
            addr,
            shared,
            stop: Some(stop),
        })
    }

    /// The base URL, `http://127.0.0.1:<port>`: an Anthropic base URL as is, and with `/v1`
    /// appended an OpenAI one (see [`Self::openai_base_url`]).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `http://127.0.0.1:<port>/v1`, what OpenAI clients take as their base URL.
    pub fn openai_base_url(&self) -> String {
        format!("{}/v1", self.url())
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// What it received so far.
    pub fn requests(&self) -> Requests {
        lock(&self.shared.requests).clone()
    }

    /// Replaces the script (and forgets how often its rules were used).
    pub fn set_script(&self, script: Script) -> Result<()> {
        *lock(&self.shared.script) = Compiled::new(script, "script")?;
        Ok(())
    }
}

impl Drop for ScriptedProvider {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// The double's routes.
fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(openai_chat))
        .route("/chat/completions", post(openai_chat))
        .route("/v1/messages", post(anthropic_messages))
        .route("/v1/embeddings", post(openai_embeddings))
        .route("/embeddings", post(openai_embeddings))
        .route("/_double/requests", get(get_requests))
        .route("/_double/script", post(post_script))
        .with_state(shared)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Openai,
    Anthropic,
}

async fn openai_chat(
    State(shared): State<Arc<Shared>>,
    uri: axum::http::Uri,
    body: Bytes,
) -> Response {
    answer(&shared, Protocol::Openai, uri.path(), &body).await
}

async fn anthropic_messages(
    State(shared): State<Arc<Shared>>,
    uri: axum::http::Uri,
    body: Bytes,
) -> Response {
    answer(&shared, Protocol::Anthropic, uri.path(), &body).await
}

/// Dimensions of the double's embeddings.
pub const EMBEDDING_DIMS: usize = 64;

/// The double's embedding of a text: its lower-cased words hashed into
/// [`EMBEDDING_DIMS`] buckets, then scaled to length 1. Texts that share words are close,
/// which is enough to test retrieval through an OpenAI-compatible endpoint; it is no model.
pub fn embedding_of(text: &str) -> Vec<f32> {
    let mut v = vec![0f32; EMBEDDING_DIMS];
    for w in text
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| w.len() > 2)
    {
        let h = w
            .to_lowercase()
            .bytes()
            .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
            });
        v[(h % EMBEDDING_DIMS as u64) as usize] += 1.0;
    }
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if n > 0.0 {
        v.iter_mut().for_each(|x| *x /= n);
    }
    v
}

/// `POST /v1/embeddings` as OpenAI answers it: `data[i].embedding`, `usage.prompt_tokens`.
async fn openai_embeddings(
    State(shared): State<Arc<Shared>>,
    uri: axum::http::Uri,
    body: Bytes,
) -> Response {
    let Ok(req) = serde_json::from_slice::<Value>(&body) else {
        return error_response(Protocol::Openai, 400, "the request body is not JSON");
    };
    let model = req
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let inputs: Vec<String> = match req.get("input") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_string)
            .collect(),
        _ => {
            return error_response(
                Protocol::Openai,
                400,
                "`input` must be a string or a list of strings",
            );
        }
    };
    {
        let mut log = lock(&shared.requests);
        log.total += 1;
        *log.by_model.entry(model.clone()).or_default() += 1;
        if log.recent.len() == RECENT_REQUESTS {
            log.recent.remove(0);
        }
        log.recent.push(RecordedRequest {
            path: uri.path().to_string(),
            model: model.clone(),
            body: req.clone(),
        });
    }
    let tokens: u64 = inputs.iter().map(|t| words(t).max(1)).sum();
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(i, t)| serde_json::json!({"object": "embedding", "index": i, "embedding": embedding_of(t)}))
        .collect();
    axum::Json(serde_json::json!({
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }))
    .into_response()
}

async fn get_requests(State(shared): State<Arc<Shared>>) -> Response {
    axum::Json(lock(&shared.requests).clone()).into_response()
}

async fn post_script(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let parsed = std::str::from_utf8(&body)
        .map_err(|e| format!("the script is not UTF-8: {e}"))
        .and_then(|text| Script::parse(text, "POST /_double/script").map_err(|e| e.to_string()))
        .and_then(|s| Compiled::new(s, "POST /_double/script").map_err(|e| e.to_string()));
    match parsed {
        Ok(c) => {
            *lock(&shared.script) = c;
            StatusCode::NO_CONTENT.into_response()
        }
        Err(e) => (StatusCode::BAD_REQUEST, e).into_response(),
    }
}

/// The reply in protocol-neutral form, with ids and token counts settled.
pub(crate) struct Answer {
    pub id: u64,
    pub model: String,
    pub text: String,
    /// (name, arguments); ids are derived from `id` and the position.
    pub tool_calls: Vec<(String, Value)>,
    /// In OpenAI's words: `stop`, `tool_calls`, `length`.
    pub finish_reason: String,
    pub usage: ScriptedUsage,
}

static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

fn words(s: &str) -> u64 {
    s.split_whitespace().count() as u64
}

async fn answer(shared: &Shared, protocol: Protocol, path: &str, body: &[u8]) -> Response {
    let parsed: Result<Value, String> =
        serde_json::from_slice(body).map_err(|e| format!("the request body is not JSON: {e}"));
    let inbound = parsed.and_then(|body| {
        let inbound = match protocol {
            Protocol::Openai => openai::inbound(&body),
            Protocol::Anthropic => anthropic::inbound(&body),
        }?;
        Ok((body, inbound))
    });
    let (body, inbound) = match inbound {
        Ok(ok) => ok,
        Err(message) => return error_response(protocol, 400, &message),
    };
    {
        let mut log = lock(&shared.requests);
        log.total += 1;
        *log.by_model.entry(inbound.model.clone()).or_default() += 1;
        if log.recent.len() == RECENT_REQUESTS {
            log.recent.remove(0);
        }
        log.recent.push(RecordedRequest {
            path: path.to_string(),
            model: inbound.model.clone(),
            body,
        });
    }
    let (reply, delay) = lock(&shared.script).pick(&inbound);
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    if let Some(e) = &reply.error {
        return scripted_error(protocol, e);
    }
    let id = NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let text = reply.text.clone().unwrap_or_default();
    let tool_calls: Vec<(String, Value)> = reply
        .tool_calls
        .iter()
        .map(|c| (c.name.clone(), c.arguments.clone()))
        .collect();
    let counted_output = words(&text)
        + tool_calls
            .iter()
            .map(|(n, a)| 1 + words(n) + words(&a.to_string()))
            .sum::<u64>();
    let usage = reply.usage.unwrap_or(ScriptedUsage {
        input: inbound.input_words.max(1),
        output: counted_output.max(1),
        cached_input: 0,
    });
    let finish_reason = reply.finish_reason.clone().unwrap_or_else(|| {
        if tool_calls.is_empty() {
            "stop"
        } else {
            "tool_calls"
        }
        .to_string()
    });
    let answer = Answer {
        id,
        model: inbound.model.clone(),
        text,
        tool_calls,
        finish_reason,
        usage,
    };
    match (protocol, inbound.stream) {
        (Protocol::Openai, false) => axum::Json(openai::response(&answer)).into_response(),
        (Protocol::Anthropic, false) => axum::Json(anthropic::response(&answer)).into_response(),
        (Protocol::Openai, true) => sse(openai::events(&answer, &inbound)),
        (Protocol::Anthropic, true) => sse(anthropic::events(&answer)),
    }
}

/// Splits text into pieces that join back to it, one word (and the space after it) each.
pub(crate) fn pieces(text: &str) -> Vec<String> {
    text.split_inclusive(' ').map(str::to_string).collect()
}

/// A string cut in two at a character boundary near its middle: tool arguments are
/// streamed in pieces, so clients must join them.
pub(crate) fn halves(s: &str) -> [&str; 2] {
    let mid = (0..=s.len() / 2)
        .rev()
        .find(|&i| s.is_char_boundary(i))
        .unwrap_or(0);
    [&s[..mid], &s[mid..]]
}

/// An SSE body of already-framed events, each sent as its own chunk.
fn sse(events: Vec<String>) -> Response {
    let stream = futures::stream::iter(
        events
            .into_iter()
            .map(|e| Ok::<_, std::convert::Infallible>(Bytes::from(e))),
    );
    let mut resp = Response::new(Body::from_stream(stream));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

fn error_response(protocol: Protocol, status: u16, message: &str) -> Response {
    scripted_error(
        protocol,
        &ScriptedError {
            status,
            message: Some(message.to_string()),
            ..ScriptedError::default()
        },
    )
}

fn scripted_error(protocol: Protocol, e: &ScriptedError) -> Response {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let message = e
        .message
        .clone()
        .unwrap_or_else(|| format!("scripted error {}", e.status));
    let mut resp = match &e.body {
        Some(Value::String(s)) => (status, s.clone()).into_response(),
        Some(v) => (status, axum::Json(v.clone())).into_response(),
        None => {
            let body = match protocol {
                Protocol::Openai => openai::error_body(e.status, &message),
                Protocol::Anthropic => anthropic::error_body(e.status, &message),
            };
            (status, axum::Json(body)).into_response()
        }
    };
    if let Some(v) = e
        .retry_after
        .as_deref()
        .and_then(|v| HeaderValue::from_str(v).ok())
    {
        resp.headers_mut().insert(header::RETRY_AFTER, v);
    }
    if let Some(ms) = e.retry_after_ms {
        resp.headers_mut()
            .insert("retry-after-ms", HeaderValue::from(ms));
    }
    resp
}

/// The text of a message's `content`, a string or a list of parts; `tool_result` parts
/// (Anthropic) contribute their own content.
pub(crate) fn content_text(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| match p.get("type").and_then(Value::as_str) {
                Some("text") => p.get("text").and_then(Value::as_str).map(str::to_string),
                Some("tool_result") => p.get("content").map(content_text),
                _ => None,
            })
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

/// Words of every string in `v` but roles, kinds and ids: a plausible prompt token count.
pub(crate) fn count_words(v: &Value) -> u64 {
    match v {
        Value::String(s) => words(s),
        Value::Array(a) => a.iter().map(count_words).sum(),
        Value::Object(o) => o
            .iter()
            .filter(|(k, _)| {
                !matches!(
                    k.as_str(),
                    "role" | "type" | "id" | "tool_call_id" | "tool_use_id"
                )
            })
            .map(|(_, v)| count_words(v))
            .sum(),
        _ => 0,
    }
}

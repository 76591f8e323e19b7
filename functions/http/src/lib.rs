//! `aob-http`: calls a URL and turns the response into a step output.
//!
//! 2xx and 3xx complete the step; 408, 429 and 5xx are retryable; other 4xx are terminal.
//! Connection trouble and timeouts are retryable. Calls to denied addresses ([`guard`]) and
//! missing secrets are terminal.

pub mod guard;

use std::error::Error as _;
use std::sync::Arc;
use std::time::Duration;

use aob_model::nodes::{HttpConfig, secret_refs};
use aob_model::wire::{Outcome, StepError, Task};
use aob_runtime::secrets::{self, Secret, Secrets};
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use reqwest::{Method, StatusCode, Url};
use serde_json::{Map, Value, json};

pub use guard::Policy;

/// Largest response body read, in bytes (10 MiB).
pub const MAX_BODY_BYTES: usize = 10 * 1024 * 1024;

/// Time limit of a request when the step sets none.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Most bytes of an error response's body kept in the error details.
const MAX_ERROR_BODY_BYTES: usize = 64 * 1024;

/// What can go wrong building the function.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// `AOB_HTTP_ALLOW` or `AOB_HTTP_DENY` does not parse.
    #[error("configuration: {0}")]
    Config(String),
    /// The HTTP client could not be built.
    #[error("building the HTTP client: {0}")]
    Client(#[from] reqwest::Error),
}

/// The `http` function. Holds one connection-pooling client for all tasks, the address
/// policy it enforces and where its secrets come from.
#[derive(Debug, Clone)]
pub struct HttpHandler {
    client: reqwest::Client,
    policy: Arc<Policy>,
    secrets: Secrets,
}

/// Header carrying `<run_id>.<attempt token>`, the same on every delivery of one attempt.
pub const IDEMPOTENCY_HEADER: &str = "aob-idempotency-key";

impl HttpHandler {
    /// A handler configured from the environment: `AOB_HTTP_ALLOW`, `AOB_HTTP_DENY`,
    /// `AOB_SECRETS_DIR` and `AOB_SECRET_<NAME>`.
    pub fn new() -> Result<Self, Error> {
        let policy = Policy::from_env().map_err(Error::Config)?;
        HttpHandler::with(policy, Secrets::from_env())
    }

    /// A handler with the given address policy and secrets, resolving names with the system
    /// resolver.
    pub fn with(policy: Policy, secrets: Secrets) -> Result<Self, Error> {
        HttpHandler::with_lookup(policy, secrets, Arc::new(guard::SystemLookup))
    }

    /// Like [`HttpHandler::with`], resolving names with `lookup`.
    pub fn with_lookup(
        policy: Policy,
        secrets: Secrets,
        lookup: Arc<dyn guard::Lookup>,
    ) -> Result<Self, Error> {
        let policy = Arc::new(policy);
        let client = reqwest::Client::builder()
            .user_agent(concat!("aob-http/", env!("CARGO_PKG_VERSION")))
            .dns_resolver(Arc::new(guard::GuardedResolver {
                policy: policy.clone(),
                lookup,
            }))
            .redirect(guard::redirect_policy(policy.clone()))
            .build()?;
        Ok(HttpHandler {
            client,
            policy,
            secrets,
        })
    }

    /// Makes the call one task asks for and returns the step output. Secret references in
    /// header values are substituted here, and any secret value the endpoint echoes is
    /// replaced by `***` in the output and the error.
    pub async fn call(&self, config: &HttpConfig) -> Result<Value, StepError> {
        let mut used = Vec::new();
        let result = self.call_with(config, &mut used).await;
        match result {
            Ok(mut output) => {
                secrets::scrub(&mut output, &used);
                Ok(output)
            }
            Err(mut e) => {
                e.message = secrets::scrub_str(&e.message, &used);
                if let Some(d) = e.details.as_mut() {
                    secrets::scrub(d, &used);
                }
                Err(e)
            }
        }
    }

    async fn call_with(
        &self,
        config: &HttpConfig,
        used: &mut Vec<Secret>,
    ) -> Result<Value, StepError> {
        let method = parse_method(&config.method)?;
        let url = parse_url(&config.url)?;
        let shown = display_url(&url);
        let what = format!("{method} {shown}");
        self.policy
            .check_url(&url)
            .map_err(|d| StepError::terminal(format!("{what}: {d}")))?;
        let headers = parse_headers(&config.headers, &self.secrets, used)?;
        let timeout = config.timeout.map_or(DEFAULT_TIMEOUT, |d| d.0);

        let has_content_type = headers.contains_key(CONTENT_TYPE);
        let mut req = self
            .client
            .request(method, url)
            .headers(headers)
            .timeout(timeout);
        match &config.body {
            None | Some(Value::Null) => {}
            Some(Value::String(text)) => {
                if !has_content_type {
                    req = req.header(CONTENT_TYPE, "text/plain; charset=utf-8");
                }
                req = req.body(text.clone());
            }
            Some(other) => req = req.json(other),
        }

        let mut resp = req
            .send()
            .await
            .map_err(|e| transport_error(&e, &what, timeout))?;
        let status = resp.status();
        let out_headers = headers_json(resp.headers());
        let ok = status.is_success() || status.is_redirection();
        let too_big = |len: u64| {
            StepError::terminal(format!(
                "response body of {what} is larger than the limit of {MAX_BODY_BYTES} bytes ({len} bytes announced)"
            ))
        };
        if ok && let Some(len) = resp.content_length().filter(|l| *l > MAX_BODY_BYTES as u64) {
            return Err(too_big(len));
        }
        let (bytes, truncated) = read_capped(&mut resp, MAX_BODY_BYTES)
            .await
            .map_err(|e| transport_error(&e, &what, timeout))?;

        if ok {
            if truncated {
                return Err(StepError::terminal(format!(
                    "response body of {what} is larger than the limit of {MAX_BODY_BYTES} bytes"
                )));
            }
            return Ok(json!({
                "status": status.as_u16(),
                "headers": out_headers,
                "body": parse_body(&bytes),
            }));
        }

        let message = format!("HTTP {} from {what}", status.as_u16());
        let details = json!({"status": status.as_u16(), "body": error_body(&bytes, truncated)});
        let error = if is_retryable_status(status) {
            StepError::retryable(message)
        } else {
            StepError::terminal(message)
        };
        Err(error.with_details(details))
    }
}

/// Refuses header values whose secret references came from the step's inputs rather than
/// from the workflow: a value a template copied from run input or a previous output must
/// not be able to ask for a secret.
fn check_injected_refs(config: &HttpConfig, context: &Value) -> Result<(), StepError> {
    let mut in_context = std::collections::BTreeSet::new();
    aob_model::expr::each_string(context, "", &mut |_, s| {
        if s.contains("${") {
            for r in secret_refs(s).unwrap_or_default() {
                in_context.insert(r.name.to_string());
            }
        }
    });
    if in_context.is_empty() {
        return Ok(());
    }
    for (name, value) in &config.headers {
        for r in secret_refs(value).unwrap_or_default() {
            if in_context.contains(r.name) {
                return Err(StepError::terminal(format!(
                    "field `headers.{name}`: the secret reference `${{secrets.{}}}` also appears in a value this step reads; references are substituted only when written in the workflow, never when they come from input or another step's output",
                    r.name
                )));
            }
        }
    }
    Ok(())
}

impl aob_runtime::Handler for HttpHandler {
    fn node_type(&self) -> &'static str {
        "http"
    }

    fn env_vars(&self) -> &'static [(&'static str, &'static str)] {
        &[
            (
                "AOB_HTTP_ALLOW",
                "CIDRs, addresses or hosts http steps may call even if denied (default none)",
            ),
            (
                "AOB_HTTP_DENY",
                "CIDRs, addresses or hosts denied besides link-local and metadata addresses",
            ),
            (
                "AOB_SECRETS_DIR",
                "directory of secret files, one per name, read at call time",
            ),
            (
                "AOB_SECRET_<NAME>",
                "a secret, when no file of that name exists",
            ),
        ]
    }

    async fn handle(
        &self,
        task: Task,
        _cx: &aob_runtime::context::Context,
    ) -> Result<Outcome, StepError> {
        let mut config: HttpConfig = aob_runtime::parse_config("http", &task.config)?;
        check_injected_refs(&config, &task.context)?;
        // At-least-once delivery: let the endpoint recognise a repeat of the same attempt.
        if !config
            .headers
            .keys()
            .any(|k| k.eq_ignore_ascii_case(IDEMPOTENCY_HEADER))
        {
            config.headers.insert(
                IDEMPOTENCY_HEADER.to_string(),
                format!("{}.{}", task.run_id, task.at.token()),
            );
        }
        self.call(&config)
            .await
            .map(|output| Outcome::Completed { output })
    }
}

/// True for statuses worth retrying: 408, 429 and every 5xx.
pub fn is_retryable_status(status: StatusCode) -> bool {
    status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
        || status.is_server_error()
}

fn parse_method(method: &str) -> Result<Method, StepError> {
    let upper = method.trim().to_ascii_uppercase();
    Method::from_bytes(upper.as_bytes()).map_err(|_| {
        StepError::terminal(format!(
            "invalid http config: field `method`: `{method}` is not an HTTP method"
        ))
    })
}

fn parse_url(url: &str) -> Result<Url, StepError> {
    let parsed = Url::parse(url.trim()).map_err(|e| {
        StepError::terminal(format!(
            "invalid http config: field `url`: `{url}` is not a valid URL: {e}"
        ))
    })?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(StepError::terminal(format!(
            "invalid http config: field `url`: `{url}` is not an http or https URL"
        )));
    }
    Ok(parsed)
}

fn parse_headers(
    headers: &std::collections::BTreeMap<String, String>,
    secrets: &Secrets,
    used: &mut Vec<Secret>,
) -> Result<HeaderMap, StepError> {
    let mut map = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        let bad = |what: &str| {
            StepError::terminal(format!(
                "invalid http config: field `headers.{name}`: {what}"
            ))
        };
        let n = HeaderName::from_bytes(name.trim().as_bytes())
            .map_err(|_| bad("not a valid header name"))?;
        let (text, values) = secrets.substitute(value).map_err(|e| {
            let mut err = StepError::from(e);
            err.message = format!("field `headers.{name}`: {}", err.message);
            err
        })?;
        let has_secret = !values.is_empty();
        used.extend(values);
        // The message must not quote the value: it may hold a secret.
        let mut v = HeaderValue::from_str(&text).map_err(|_| bad("not a valid header value"))?;
        if has_secret || secrets::is_sensitive_header(name) {
            v.set_sensitive(true);
        }
        map.append(n, v);
    }
    Ok(map)
}

/// The URL as shown in messages, with any password hidden.
fn display_url(url: &Url) -> String {
    let mut shown = url.clone();
    if shown.password().is_some() {
        let _ = shown.set_password(Some("***"));
    }
    shown.to_string()
}

/// Classifies a failure to send the request or read the response.
fn transport_error(e: &reqwest::Error, what: &str, timeout: Duration) -> StepError {
    if let Some(denied) = guard::find_denial(e) {
        StepError::terminal(format!("{what}: {denied}"))
    } else if e.is_timeout() {
        StepError::retryable(format!(
            "{what} timed out after {}",
            humantime::format_duration(timeout)
        ))
    } else if e.is_connect() {
        StepError::retryable(format!("cannot connect for {what}: {}", error_chain(e)))
    } else if e.is_builder() {
        StepError::terminal(format!(
            "cannot build the request {what}: {}",
            error_chain(e)
        ))
    } else {
        StepError::retryable(format!("{what} failed: {}", error_chain(e)))
    }
}

/// An error with its sources, on one line.
fn error_chain(e: &reqwest::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// Response headers as JSON, names lowercase, credentials (`set-cookie`, tokens) redacted.
fn headers_json(headers: &HeaderMap) -> Value {
    let mut out = Map::new();
    for name in headers.keys() {
        if secrets::is_sensitive_header(name.as_str()) {
            out.insert(
                name.as_str().to_ascii_lowercase(),
                Value::String(secrets::REDACTED.into()),
            );
            continue;
        }
        let joined = headers
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect::<Vec<_>>()
            .join(", ");
        out.insert(name.as_str().to_ascii_lowercase(), Value::String(joined));
    }
    Value::Object(out)
}

/// Reads the body, stopping at `cap` bytes; the flag says whether there was more.
async fn read_capped(
    resp: &mut reqwest::Response,
    cap: usize,
) -> Result<(Vec<u8>, bool), reqwest::Error> {
    let mut buf = Vec::new();
    while let Some(chunk) = resp.chunk().await? {
        let room = cap.saturating_sub(buf.len());
        if chunk.len() > room {
            buf.extend_from_slice(&chunk[..room]);
            return Ok((buf, true));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok((buf, false))
}

/// The body as JSON when it parses, else as text.
fn parse_body(bytes: &[u8]) -> Value {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(v) => v,
        Err(_) => Value::String(String::from_utf8_lossy(bytes).into_owned()),
    }
}

/// The body of an error response for the details, cut to a size fit for a message.
fn error_body(bytes: &[u8], truncated: bool) -> Value {
    if bytes.len() <= MAX_ERROR_BODY_BYTES && !truncated {
        return parse_body(bytes);
    }
    let cut = &bytes[..bytes.len().min(MAX_ERROR_BODY_BYTES)];
    let mut text = String::from_utf8_lossy(cut).into_owned();
    text.push('…');
    Value::String(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use aob_model::wire::ErrorClass;
    use aob_runtime::Handler;
    use axum::Router;
    use axum::body::Bytes;
    use axum::http::{HeaderMap as AxHeaders, StatusCode as AxStatus};
    use axum::response::{IntoResponse, Redirect};
    use axum::routing::{get, post};
    use std::future::Future;
    use std::net::IpAddr;

    fn task(config: Value) -> Task {
        aob_testkit::task("http", "call", config, json!({}))
    }

    async fn run(config: Value) -> Result<Value, StepError> {
        run_on(&handler(), task(config)).await
    }

    const TOKEN: &str = "s3cr3t-t0k3n";

    fn handler() -> HttpHandler {
        HttpHandler::with(
            Policy::default(),
            Secrets::from_values([("API_TOKEN", TOKEN)]),
        )
        .unwrap()
    }

    async fn run_on(handler: &HttpHandler, task: Task) -> Result<Value, StepError> {
        let cx = aob_runtime::context::Context::detached(&task);
        match handler.handle(task, &cx).await? {
            Outcome::Completed { output } => Ok(output),
            other => panic!("unexpected outcome {other:?}"),
        }
    }

    /// Answers names from a table, as a DNS server pointed at them would.
    struct Table(Vec<(&'static str, IpAddr)>);

    impl guard::Lookup for Table {
        fn lookup(
            &self,
            host: &str,
        ) -> std::pin::Pin<Box<dyn Future<Output = std::io::Result<Vec<IpAddr>>> + Send>> {
            let found: Vec<IpAddr> = self
                .0
                .iter()
                .filter(|(n, _)| *n == host)
                .map(|(_, ip)| *ip)
                .collect();
            Box::pin(async move {
                if found.is_empty() {
                    Err(std::io::Error::other("no such name"))
                } else {
                    Ok(found)
                }
            })
        }
    }

    fn with_names(policy: Policy, names: Vec<(&'static str, &str)>) -> HttpHandler {
        let table = Table(
            names
                .into_iter()
                .map(|(n, a)| (n, a.parse().unwrap()))
                .collect(),
        );
        HttpHandler::with_lookup(policy, Secrets::none(), Arc::new(table)).unwrap()
    }

    /// Checks the credential it was sent, then echoes it back in its body and headers, as
    /// careless endpoints do.
    async fn auth(headers: AxHeaders) -> impl IntoResponse {
        let got = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let ok = got == format!("Bearer {TOKEN}");
        (
            [
                ("set-cookie", format!("session={TOKEN}")),
                ("x-echo", got.clone()),
            ],
            axum::Json(json!({"ok": ok, "echo": got})),
        )
    }

    async fn echo(headers: AxHeaders, body: Bytes) -> impl IntoResponse {
        let h = |n: &str| {
            headers
                .get(n)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string()
        };
        let parsed: Value = serde_json::from_slice(&body)
            .unwrap_or(Value::String(String::from_utf8_lossy(&body).into()));
        axum::Json(json!({
            "body": parsed,
            "content_type": h("content-type"),
            "token": h("x-token"),
            "accept": h("accept"),
        }))
    }

    /// Starts a test server and returns its base URL.
    async fn server() -> String {
        let app = Router::new()
            .route(
                "/json",
                get(|| async {
                    (
                        [("x-demo", "yes")],
                        axum::Json(json!({"hello": "world", "n": 1})),
                    )
                }),
            )
            .route("/text", get(|| async { (AxStatus::CREATED, "made it") }))
            .route("/empty", get(|| async { AxStatus::NO_CONTENT }))
            .route(
                "/missing",
                get(|| async { (AxStatus::NOT_FOUND, "no such thing") }),
            )
            .route(
                "/down",
                get(|| async {
                    (
                        AxStatus::SERVICE_UNAVAILABLE,
                        axum::Json(json!({"error": "down"})),
                    )
                }),
            )
            .route(
                "/busy",
                get(|| async { (AxStatus::TOO_MANY_REQUESTS, "slow down") }),
            )
            .route("/late", get(|| async { (AxStatus::REQUEST_TIMEOUT, "") }))
            .route(
                "/slow",
                get(|| async {
                    tokio::time::sleep(Duration::from_secs(3)).await;
                    "finally"
                }),
            )
            .route("/moved", get(|| async { Redirect::temporary("/json") }))
            .route(
                "/to-metadata",
                get(|| async { Redirect::temporary("http://169.254.169.254/latest/meta-data") }),
            )
            .route("/auth", get(auth))
            .route("/big", get(|| async { vec![b'a'; MAX_BODY_BYTES + 1] }))
            .route("/echo", post(echo).put(echo));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        format!("http://{addr}")
    }

    #[tokio::test]
    async fn json_response_is_parsed() {
        let base = server().await;
        let out = run(json!({"url": format!("{base}/json")})).await.unwrap();
        assert_eq!(out["status"], 200);
        assert_eq!(out["body"], json!({"hello": "world", "n": 1}));
        assert_eq!(out["headers"]["x-demo"], "yes");
        assert_eq!(out["headers"]["content-type"], "application/json");
        let keys: Vec<&String> = out.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["status", "headers", "body"]);
    }

    #[tokio::test]
    async fn text_and_empty_responses_are_text() {
        let base = server().await;
        let out = run(json!({"url": format!("{base}/text"), "method": "get"}))
            .await
            .unwrap();
        assert_eq!(out["status"], 201);
        assert_eq!(out["body"], "made it");

        let out = run(json!({"url": format!("{base}/empty")})).await.unwrap();
        assert_eq!(out["status"], 204);
        assert_eq!(out["body"], "");
    }

    #[tokio::test]
    async fn redirects_are_followed() {
        let base = server().await;
        let out = run(json!({"url": format!("{base}/moved")})).await.unwrap();
        assert_eq!(out["status"], 200);
        assert_eq!(out["body"]["hello"], "world");
    }

    #[tokio::test]
    async fn client_errors_are_terminal() {
        let base = server().await;
        let url = format!("{base}/missing");
        let e = run(json!({"url": url})).await.unwrap_err();
        assert!(matches!(e.class, ErrorClass::Terminal), "{e:?}");
        assert_eq!(e.message, format!("HTTP 404 from GET {url}"));
        assert_eq!(
            e.details,
            Some(json!({"status": 404, "body": "no such thing"}))
        );
    }

    #[tokio::test]
    async fn server_errors_and_throttling_are_retryable() {
        let base = server().await;
        let e = run(json!({"url": format!("{base}/down")}))
            .await
            .unwrap_err();
        assert!(matches!(e.class, ErrorClass::Retryable), "{e:?}");
        assert!(e.message.starts_with("HTTP 503 from GET "), "{}", e.message);
        assert_eq!(
            e.details,
            Some(json!({"status": 503, "body": {"error": "down"}}))
        );

        let e = run(json!({"url": format!("{base}/busy")}))
            .await
            .unwrap_err();
        assert!(matches!(e.class, ErrorClass::Retryable), "{e:?}");
        assert_eq!(e.details.as_ref().unwrap()["status"], 429);

        let e = run(json!({"url": format!("{base}/late")}))
            .await
            .unwrap_err();
        assert!(matches!(e.class, ErrorClass::Retryable), "{e:?}");
        assert_eq!(e.details.as_ref().unwrap()["status"], 408);
    }

    #[tokio::test]
    async fn timeouts_are_retryable() {
        let base = server().await;
        let started = std::time::Instant::now();
        let e = run(json!({"url": format!("{base}/slow"), "timeout": "200ms"}))
            .await
            .unwrap_err();
        assert!(matches!(e.class, ErrorClass::Retryable), "{e:?}");
        assert!(e.message.contains("timed out"), "{}", e.message);
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "took {:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn connection_refused_is_retryable() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let e = run(json!({"url": format!("http://{addr}/x")}))
            .await
            .unwrap_err();
        assert!(matches!(e.class, ErrorClass::Retryable), "{e:?}");
        assert!(e.message.contains("cannot connect"), "{}", e.message);
    }

    #[tokio::test]
    async fn json_body_and_headers_are_sent() {
        let base = server().await;
        let out = run(json!({
            "url": format!("{base}/echo"),
            "method": "post",
            "headers": {"X-Token": "secret-1"},
            "body": {"order": 42, "items": ["a", "b"]}
        }))
        .await
        .unwrap();
        assert_eq!(out["status"], 200);
        assert_eq!(
            out["body"]["body"],
            json!({"order": 42, "items": ["a", "b"]})
        );
        assert_eq!(out["body"]["content_type"], "application/json");
        assert_eq!(out["body"]["token"], "secret-1");
    }

    #[tokio::test]
    async fn string_body_is_sent_as_text() {
        let base = server().await;
        let out = run(json!({
            "url": format!("{base}/echo"),
            "method": "PUT",
            "body": "plain words"
        }))
        .await
        .unwrap();
        assert_eq!(out["body"]["body"], "plain words");
        assert_eq!(out["body"]["content_type"], "text/plain; charset=utf-8");

        // A content type given by the step wins.
        let out = run(json!({
            "url": format!("{base}/echo"),
            "method": "POST",
            "headers": {"content-type": "application/x-custom"},
            "body": "{\"raw\": true}"
        }))
        .await
        .unwrap();
        assert_eq!(out["body"]["body"], json!({"raw": true}));
        assert_eq!(out["body"]["content_type"], "application/x-custom");
    }

    #[tokio::test]
    async fn oversized_bodies_are_terminal() {
        let base = server().await;
        let e = run(json!({"url": format!("{base}/big")}))
            .await
            .unwrap_err();
        assert!(matches!(e.class, ErrorClass::Terminal), "{e:?}");
        assert!(e.message.contains("larger than the limit"), "{}", e.message);
    }

    #[tokio::test]
    async fn bad_config_is_terminal() {
        let e = run(json!({"url": "not a url"})).await.unwrap_err();
        assert!(matches!(e.class, ErrorClass::Terminal), "{e:?}");
        assert!(e.message.contains("field `url`"), "{}", e.message);

        let e = run(json!({"url": "ftp://example.com/x"}))
            .await
            .unwrap_err();
        assert!(matches!(e.class, ErrorClass::Terminal), "{e:?}");

        let e = run(json!({"url": "http://127.0.0.1:1/", "method": "GE T"}))
            .await
            .unwrap_err();
        assert!(matches!(e.class, ErrorClass::Terminal), "{e:?}");
        assert!(e.message.contains("field `method`"), "{}", e.message);

        let e = run(json!({"url": "http://127.0.0.1:1/", "headers": {"x-a": "line\nbreak"}}))
            .await
            .unwrap_err();
        assert!(matches!(e.class, ErrorClass::Terminal), "{e:?}");
        assert!(e.message.contains("field `headers.x-a`"), "{}", e.message);

        let e = run(json!({"url": "http://127.0.0.1:1/", "timeout": "soon"}))
            .await
            .unwrap_err();
        assert!(matches!(e.class, ErrorClass::Terminal), "{e:?}");
        assert!(e.message.contains("field `timeout`"), "{}", e.message);

        let e = run(json!({"method": "GET"})).await.unwrap_err();
        assert!(matches!(e.class, ErrorClass::Terminal), "{e:?}");
        assert!(e.message.contains("field `url`"), "{}", e.message);
    }

    #[tokio::test]
    async fn body_reads_stop_at_the_cap() {
        let resp = || reqwest::Response::from(axum::http::Response::new(vec![b'x'; 100]));
        let (bytes, truncated) = read_capped(&mut resp(), 10).await.unwrap();
        assert_eq!((bytes.len(), truncated), (10, true));
        let (bytes, truncated) = read_capped(&mut resp(), 100).await.unwrap();
        assert_eq!((bytes.len(), truncated), (100, false));
    }

    #[test]
    fn error_bodies_are_cut_for_details() {
        assert_eq!(error_body(br#"{"a":1}"#, false), json!({"a": 1}));
        let long = vec![b'y'; MAX_ERROR_BODY_BYTES + 10];
        let cut = error_body(&long, false);
        assert_eq!(
            cut.as_str().unwrap().chars().count(),
            MAX_ERROR_BODY_BYTES + 1
        );
        assert!(cut.as_str().unwrap().ends_with('…'));
    }

    #[test]
    fn passwords_are_hidden_in_messages() {
        let url = Url::parse("https://user:pw@example.com/a?b=1").unwrap();
        assert_eq!(display_url(&url), "https://user:***@example.com/a?b=1");
    }

    #[test]
    fn retryable_statuses() {
        for (code, retry) in [
            (408, true),
            (429, true),
            (500, true),
            (503, true),
            (400, false),
            (404, false),
            (422, false),
        ] {
            assert_eq!(
                is_retryable_status(StatusCode::from_u16(code).unwrap()),
                retry,
                "{code}"
            );
        }
    }

    #[tokio::test]
    async fn secrets_are_sent_and_never_returned() {
        let base = server().await;
        let out = run(json!({
            "url": format!("{base}/auth"),
            "headers": {"authorization": "Bearer ${secrets.API_TOKEN}"}
        }))
        .await
        .unwrap();
        assert_eq!(out["body"]["ok"], true, "the endpoint got the real token");
        assert_eq!(out["body"]["echo"], "Bearer ***");
        assert_eq!(out["headers"]["set-cookie"], "***");
        assert_eq!(out["headers"]["x-echo"], "Bearer ***");
        assert!(!out.to_string().contains(TOKEN), "{out}");
    }

    #[tokio::test]
    async fn a_missing_secret_is_terminal_and_named() {
        let base = server().await;
        let e = run(json!({
            "url": format!("{base}/auth"),
            "headers": {"x-api-key": "${secrets.NOT_SET}"}
        }))
        .await
        .unwrap_err();
        assert!(matches!(e.class, ErrorClass::Terminal), "{e:?}");
        assert!(
            e.message.contains("field `headers.x-api-key`"),
            "{}",
            e.message
        );
        assert!(
            e.message.contains("secret `NOT_SET` is not set"),
            "{}",
            e.message
        );
    }

    #[tokio::test]
    async fn references_coming_from_step_inputs_are_refused() {
        let base = server().await;
        // What rendering `{{ input.auth }}` with a hostile input would give.
        let t = aob_testkit::task(
            "http",
            "call",
            json!({"url": format!("{base}/auth"), "headers": {"authorization": "${secrets.API_TOKEN}"}}),
            json!({"input": {"auth": "${secrets.API_TOKEN}"}}),
        );
        let e = run_on(&handler(), t).await.unwrap_err();
        assert!(matches!(e.class, ErrorClass::Terminal), "{e:?}");
        assert!(
            e.message
                .contains("also appears in a value this step reads"),
            "{}",
            e.message
        );
    }

    #[tokio::test]
    async fn metadata_addresses_are_refused() {
        let e = run(json!({"url": "http://169.254.169.254/latest/meta-data/"}))
            .await
            .unwrap_err();
        assert!(matches!(e.class, ErrorClass::Terminal), "{e:?}");
        assert!(
            e.message.contains("address 169.254.169.254"),
            "{}",
            e.message
        );
        assert!(e.message.contains("AOB_HTTP_ALLOW"), "{}", e.message);
    }

    #[tokio::test]
    async fn names_resolving_to_link_local_addresses_are_refused() {
        let base = server().await;
        let port = base.rsplit(':').next().unwrap().to_string();
        let h = with_names(
            Policy::default(),
            vec![
                ("rebound.test", "169.254.10.10"),
                ("fine.test", "127.0.0.1"),
            ],
        );
        let e = run_on(
            &h,
            task(json!({"url": format!("http://rebound.test:{port}/json")})),
        )
        .await
        .unwrap_err();
        assert!(matches!(e.class, ErrorClass::Terminal), "{e:?}");
        assert!(
            e.message
                .contains("host `rebound.test` (address 169.254.10.10)"),
            "{}",
            e.message
        );
        assert!(e.message.contains("link-local"), "{}", e.message);
        // The same resolver lets an allowed name through.
        let out = run_on(
            &h,
            task(json!({"url": format!("http://fine.test:{port}/json")})),
        )
        .await
        .unwrap();
        assert_eq!(out["status"], 200);
    }

    #[tokio::test]
    async fn redirects_to_denied_addresses_are_refused() {
        let base = server().await;
        let e = run(json!({"url": format!("{base}/to-metadata")}))
            .await
            .unwrap_err();
        assert!(matches!(e.class, ErrorClass::Terminal), "{e:?}");
        assert!(
            e.message.contains("address 169.254.169.254"),
            "{}",
            e.message
        );
    }

    #[tokio::test]
    async fn configured_denials_and_allowances_apply() {
        let base = server().await;
        let port = base.rsplit(':').next().unwrap().to_string();
        let names = || vec![("local.test", "127.0.0.1")];
        let h = with_names(Policy::parse("", "127.0.0.0/8").unwrap(), names());
        let e = run_on(&h, task(json!({"url": format!("{base}/json")})))
            .await
            .unwrap_err();
        assert!(
            e.message.contains("AOB_HTTP_DENY has `127.0.0.0/8`"),
            "{}",
            e.message
        );
        let e = run_on(
            &h,
            task(json!({"url": format!("http://local.test:{port}/json")})),
        )
        .await
        .unwrap_err();
        assert!(matches!(e.class, ErrorClass::Terminal), "{e:?}");
        let h = with_names(Policy::parse("local.test", "127.0.0.0/8").unwrap(), names());
        let out = run_on(
            &h,
            task(json!({"url": format!("http://local.test:{port}/json")})),
        )
        .await
        .unwrap();
        assert_eq!(out["status"], 200);
    }

    #[test]
    fn node_type_is_http() {
        assert_eq!(handler().node_type(), "http");
    }
}

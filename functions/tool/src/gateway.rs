//! The gateway: every configured tool behind one `list` and one `call`, with argument
//! validation, rate limits and circuit breakers in front of the MCP servers and HTTP tools.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aob_http::HttpHandler;
use aob_model::nodes::{HttpConfig, secret_refs};
use aob_model::wire::{ErrorClass, StepError};
use aob_runtime::secrets::Secrets;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::config::{HttpToolConfig, ToolsConfig, model_name, qualified_name};
use crate::guard::{Admission, Breaker, Bucket, Refusal};
use crate::mcp::{McpServer, content_of};
use crate::{Error, Result};

/// A source of time for limits and breakers.
pub trait Clock: Send + Sync {
    /// Now.
    fn now(&self) -> Instant;
}

/// The system's monotonic clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// A clock that moves only when told, for tests.
#[derive(Debug)]
pub struct ManualClock(Mutex<Instant>);

impl ManualClock {
    /// Stopped at the present.
    pub fn new() -> Self {
        ManualClock(Mutex::new(Instant::now()))
    }
    /// Moves it forward.
    pub fn advance(&self, by: Duration) {
        if let Ok(mut t) = self.0.lock() {
            *t += by;
        }
    }
}

impl Default for ManualClock {
    fn default() -> Self {
        ManualClock::new()
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        self.0.lock().map_or_else(|_| Instant::now(), |t| *t)
    }
}

/// A tool as a model sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolInfo {
    /// Qualified name: `<server>.<tool>` for MCP tools, the plain name for HTTP tools.
    pub name: String,
    /// Name fit for model APIs (`[A-Za-z0-9_-]{1,64}`); [`Gateway::call`] accepts it too.
    pub model_name: String,
    /// What it does.
    pub description: Option<String>,
    /// JSON Schema of its arguments.
    pub input_schema: Value,
}

/// What a call returned.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolOutput {
    /// Qualified name of the tool called.
    pub tool: String,
    /// SHA-256 (hex) of the arguments as canonical JSON (keys sorted).
    pub arguments_digest: String,
    /// Text parts of the answer, joined by newlines (an HTTP tool: its body as text).
    pub content: String,
    /// Structured content (an HTTP tool: its JSON body), else null.
    pub structured: Value,
    /// The tool reported an error (MCP `isError`): the content says what.
    pub is_error: bool,
}

/// One configured HTTP tool.
struct HttpTool {
    config: HttpToolConfig,
    validator: Arc<jsonschema::Validator>,
}

/// Who is behind a qualified name.
enum Target<'a> {
    Mcp {
        server: &'a McpServer,
        tool: &'a str,
    },
    Http {
        name: &'a str,
        tool: &'a HttpTool,
    },
}

impl Target<'_> {
    /// The breaker guarding it: one per MCP server, one per HTTP tool.
    fn breaker_key(&self) -> String {
        match self {
            Target::Mcp { server, .. } => format!("mcp:{}", server.name()),
            Target::Http { name, .. } => format!("http:{name}"),
        }
    }
    fn breaker_name(&self) -> String {
        match self {
            Target::Mcp { server, .. } => format!("MCP server `{}`", server.name()),
            Target::Http { name, .. } => format!("HTTP tool `{name}`"),
        }
    }
}

/// Every tool of a tools file, ready to be listed and called. Cheap to share (`Arc`).
pub struct Gateway {
    servers: BTreeMap<String, McpServer>,
    http_tools: BTreeMap<String, HttpTool>,
    http: HttpHandler,
    config: ToolsConfig,
    clock: Arc<dyn Clock>,
    tool_buckets: Mutex<HashMap<String, Bucket>>,
    tenant_buckets: Mutex<HashMap<String, Bucket>>,
    breakers: Mutex<HashMap<String, Breaker>>,
    validators: Mutex<HashMap<String, Arc<jsonschema::Validator>>>,
    model_names: Mutex<HashMap<String, String>>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("servers", &self.servers.keys().collect::<Vec<_>>())
            .field("http_tools", &self.http_tools.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl Gateway {
    /// The gateway of the tools file named by `AOB_TOOLS` (none: no tools), with the
    /// `http` function's address policy and secrets from the environment.
    pub fn from_env() -> Result<Self> {
        let config = ToolsConfig::from_env()?;
        let http = HttpHandler::new().map_err(|e| Error::Http(e.to_string()))?;
        Gateway::new(config, http, Secrets::from_env())
    }

    /// A gateway over `config`; HTTP tools are called through `http` (its address guard
    /// and secrets); MCP servers' `${secrets.NAME}` references are read from `secrets`.
    /// Nothing is connected until used.
    pub fn new(config: ToolsConfig, http: HttpHandler, secrets: Secrets) -> Result<Self> {
        config.check().map_err(|message| Error::Config {
            file: ToolsConfig::env_path().unwrap_or_default(),
            message,
        })?;
        let mut servers = BTreeMap::new();
        for (name, c) in &config.mcp {
            let server = McpServer::new(name, c.clone(), secrets.clone()).map_err(|message| {
                Error::Config {
                    file: ToolsConfig::env_path().unwrap_or_default(),
                    message,
                }
            })?;
            servers.insert(name.clone(), server);
        }
        let mut http_tools = BTreeMap::new();
        for (name, c) in &config.http {
            let validator =
                jsonschema::validator_for(&c.input_schema).map_err(|e| Error::Config {
                    file: ToolsConfig::env_path().unwrap_or_default(),
                    message: format!("http.{name}.input_schema: not a valid JSON Schema: {e}"),
                })?;
            http_tools.insert(
                name.clone(),
                HttpTool {
                    config: c.clone(),
                    validator: Arc::new(validator),
                },
            );
        }
        Ok(Gateway {
            servers,
            http_tools,
            http,
            config,
            clock: Arc::new(SystemClock),
            tool_buckets: Mutex::default(),
            tenant_buckets: Mutex::default(),
            breakers: Mutex::default(),
            validators: Mutex::default(),
            model_names: Mutex::default(),
        })
    }

    /// The same gateway reading time from `clock` (tests move a [`ManualClock`]).
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Names of the configured MCP servers.
    pub fn servers(&self) -> Vec<String> {
        self.servers.keys().cloned().collect()
    }

    /// Names of the configured HTTP tools.
    pub fn http_tools(&self) -> Vec<String> {
        self.http_tools.keys().cloned().collect()
    }

    /// The tools of one MCP server (connecting to it), or of the HTTP tools when `server`
    /// is `None`.
    pub async fn list_source(&self, server: Option<&str>) -> Result<Vec<ToolInfo>> {
        let out: Vec<ToolInfo> = match server {
            None => self
                .http_tools
                .iter()
                .map(|(name, t)| ToolInfo {
                    name: name.clone(),
                    model_name: model_name(name),
                    description: t.config.description.clone(),
                    input_schema: t.config.input_schema.clone(),
                })
                .collect(),
            Some(s) => {
                let server = self.servers.get(s).ok_or_else(|| Error::UnknownTool {
                    name: format!("{s}.*"),
                    known: self.known_sources(),
                })?;
                let tools = server.tools().await.map_err(|e| Error::Server {
                    server: s.to_string(),
                    message: e.message,
                })?;
                tools
                    .iter()
                    .map(|t| {
                        let name = format!("{s}.{}", t.name);
                        ToolInfo {
                            model_name: model_name(&name),
                            name,
                            description: t.description.as_ref().map(|d| d.to_string()),
                            input_schema: Value::Object((*t.input_schema).clone()),
                        }
                    })
                    .collect()
            }
        };
        if let Ok(mut m) = self.model_names.lock() {
            for t in &out {
                m.insert(t.model_name.clone(), t.name.clone());
            }
        }
        Ok(out)
    }

    /// The tools named (qualified names, model-safe names, or `<server>.*` for all of a
    /// server's), in that order; every tool when `names` is empty. A server that cannot be
    /// reached or a name that matches nothing is an error.
    pub async fn list(&self, names: &[String]) -> Result<Vec<ToolInfo>> {
        if names.is_empty() {
            let mut all = Vec::new();
            for s in self.servers.keys() {
                all.extend(self.list_source(Some(s)).await?);
            }
            all.extend(self.list_source(None).await?);
            return Ok(all);
        }
        let mut out = Vec::new();
        let mut listed: HashMap<Option<String>, Vec<ToolInfo>> = HashMap::new();
        for raw in names {
            let name = self.resolve_name(raw);
            let source = name.split_once('.').map(|(s, _)| s.to_string());
            if !listed.contains_key(&source) {
                let tools = self.list_source(source.as_deref()).await?;
                listed.insert(source.clone(), tools);
            }
            let tools = listed.get(&source).map(Vec::as_slice).unwrap_or_default();
            if let Some(server) = name.strip_suffix(".*") {
                out.extend(
                    tools
                        .iter()
                        .filter(|t| t.name.split_once('.').is_some_and(|(s, _)| s == server))
                        .cloned(),
                );
                continue;
            }
            match tools.iter().find(|t| t.name == name) {
                Some(t) => out.push(t.clone()),
                None => {
                    return Err(Error::UnknownTool {
                        name: raw.clone(),
                        known: tools.iter().map(|t| t.name.clone()).collect(),
                    });
                }
            }
        }
        Ok(out)
    }

    /// Tool sources known without connecting: HTTP tools and `<server>.*`.
    fn known_sources(&self) -> Vec<String> {
        self.http_tools
            .keys()
            .cloned()
            .chain(self.servers.keys().map(|s| format!("{s}.*")))
            .collect()
    }

    /// The qualified name of a qualified or model-safe name.
    fn resolve_name(&self, name: &str) -> String {
        if name.contains('.') || self.http_tools.contains_key(name) {
            return name.to_string();
        }
        if let Some(q) = self
            .model_names
            .lock()
            .ok()
            .and_then(|m| m.get(name).cloned())
        {
            return q;
        }
        qualified_name(name)
    }

    fn target<'a>(&'a self, name: &'a str) -> std::result::Result<Target<'a>, StepError> {
        if let Some(tool) = self.http_tools.get(name) {
            return Ok(Target::Http { name, tool });
        }
        if let Some((s, tool)) = name.split_once('.')
            && let Some(server) = self.servers.get(s)
        {
            return Ok(Target::Mcp { server, tool });
        }
        Err(unknown_tool(name, &self.known_sources()))
    }

    /// Calls a tool for `tenant`: checks the rate limits and the breaker, validates `args`
    /// against the tool's input schema, then calls it. A tool that reports an error
    /// (`isError`) is `Ok` with `is_error` set (an agent hands that back to its model);
    /// everything else that goes wrong is a [`StepError`], retryable or terminal.
    pub async fn call(
        &self,
        tenant: &str,
        name: &str,
        args: Value,
        cancel: &CancellationToken,
    ) -> std::result::Result<ToolOutput, StepError> {
        let name = self.resolve_name(name);
        let target = self.target(&name)?;
        let args = match args {
            Value::Null => json!({}),
            v => v,
        };
        self.take_rate(tenant, &name)?;
        let key = target.breaker_key();
        let admission = self.admit(&key, &name, &target)?;
        let result = tokio::select! {
            r = self.call_target(&target, &name, &args, cancel) => r,
            () = cancel.cancelled() => Err(StepError::retryable(format!("tool `{name}`: the call was cancelled"))),
        };
        let now = self.clock.now();
        if let Ok(mut breakers) = self.breakers.lock()
            && let Some(b) = breakers.get_mut(&key)
        {
            match &result {
                _ if cancel.is_cancelled() => {
                    if admission == Admission::Probe {
                        b.abandon(now);
                    }
                }
                Err(e) if e.class == ErrorClass::Retryable => b.failure(now),
                _ => b.success(),
            }
        }
        let (content, structured, is_error) = result?;
        Ok(ToolOutput {
            tool: name.clone(),
            arguments_digest: digest(&args),
            content,
            structured,
            is_error,
        })
    }

    /// Takes one call from the tool's and the tenant's buckets, or says which is empty and
    /// when it has room again. Both are checked before either is taken from.
    fn take_rate(&self, tenant: &str, name: &str) -> std::result::Result<(), StepError> {
        let now = self.clock.now();
        let tool_rate = self.config.limits.tools.get(name).copied();
        let tenant_rate = self.config.limits.tenants.get(tenant).copied();
        if tool_rate.is_none() && tenant_rate.is_none() {
            return Ok(());
        }
        let (Ok(mut tools), Ok(mut tenants)) =
            (self.tool_buckets.lock(), self.tenant_buckets.lock())
        else {
            return Ok(());
        };
        let mut tool_bucket = tool_rate.map(|r| {
            tools
                .entry(name.to_string())
                .or_insert_with(|| Bucket::per_minute(r.per_minute, now))
        });
        let mut tenant_bucket = tenant_rate.map(|r| {
            tenants
                .entry(tenant.to_string())
                .or_insert_with(|| Bucket::per_minute(r.per_minute, now))
        });
        if let (Some(b), Some(r)) = (tool_bucket.as_deref_mut(), tool_rate)
            && let Err(wait) = b.check(now)
        {
            return Err(retry_later(
                format!(
                    "tool `{name}`: its rate limit of {} calls per minute is used up",
                    r.per_minute
                ),
                wait,
                json!({"limit": "tool", "tool": name, "per_minute": r.per_minute}),
            ));
        }
        if let (Some(b), Some(r)) = (tenant_bucket.as_deref_mut(), tenant_rate)
            && let Err(wait) = b.check(now)
        {
            return Err(retry_later(
                format!(
                    "tool `{name}`: tenant `{tenant}`'s rate limit of {} tool calls per minute is used up",
                    r.per_minute
                ),
                wait,
                json!({"limit": "tenant", "tenant": tenant, "tool": name, "per_minute": r.per_minute}),
            ));
        }
        for b in [tool_bucket, tenant_bucket].into_iter().flatten() {
            b.take(now);
        }
        Ok(())
    }

    fn admit(
        &self,
        key: &str,
        name: &str,
        target: &Target<'_>,
    ) -> std::result::Result<Admission, StepError> {
        let now = self.clock.now();
        let Ok(mut breakers) = self.breakers.lock() else {
            return Ok(Admission::Call);
        };
        let b = breakers.entry(key.to_string()).or_insert_with(|| {
            Breaker::new(
                self.config.breaker.failures,
                self.config.breaker.cool_down.0,
            )
        });
        b.admit(now).map_err(|refusal| {
            let what = target.breaker_name();
            let failures = self.config.breaker.failures;
            match refusal {
                Refusal::Open(wait) => retry_later(
                    format!(
                        "tool `{name}`: the circuit breaker of {what} is open after {failures} consecutive failed calls"
                    ),
                    wait,
                    json!({"breaker": what, "state": "open"}),
                ),
                Refusal::Probing => StepError::retryable(format!(
                    "tool `{name}`: the circuit breaker of {what} is half-open: one trial call is in flight and its outcome decides; try again in a moment"
                ))
                .with_details(json!({"breaker": what, "state": "half_open"})),
            }
        })
    }

    /// Validates and calls; returns (content, structured, is_error).
    async fn call_target(
        &self,
        target: &Target<'_>,
        name: &str,
        args: &Value,
        cancel: &CancellationToken,
    ) -> std::result::Result<(String, Value, bool), StepError> {
        match target {
            Target::Mcp { server, tool } => {
                let tools = server.tools().await?;
                let Some(found) = tools.iter().find(|t| t.name == *tool) else {
                    let known: Vec<String> = tools
                        .iter()
                        .map(|t| format!("{}.{}", server.name(), t.name))
                        .collect();
                    return Err(unknown_tool(name, &known));
                };
                let validator =
                    self.validator(name, &Value::Object((*found.input_schema).clone()))?;
                validate(name, &validator, args)?;
                let result = server.call(tool, args.clone(), cancel).await?;
                Ok(content_of(&result))
            }
            Target::Http { tool, .. } => {
                validate(name, &tool.validator, args)?;
                let config = render_http(name, &tool.config, args)?;
                let out = self.http.call(&config).await.map_err(|mut e| {
                    e.message = format!("tool `{name}`: {}", e.message);
                    e
                })?;
                let body = out.get("body").cloned().unwrap_or(Value::Null);
                Ok(match body {
                    Value::String(text) => (text, Value::Null, false),
                    other => (other.to_string(), other, false),
                })
            }
        }
    }

    fn validator(
        &self,
        name: &str,
        schema: &Value,
    ) -> std::result::Result<Arc<jsonschema::Validator>, StepError> {
        let cache_key = format!("{name}\u{0}{schema}");
        if let Some(v) = self
            .validators
            .lock()
            .ok()
            .and_then(|m| m.get(&cache_key).cloned())
        {
            return Ok(v);
        }
        let v = Arc::new(jsonschema::validator_for(schema).map_err(|e| {
            StepError::terminal(format!(
                "tool `{name}`: its input schema is not a valid JSON Schema: {e}"
            ))
        })?);
        if let Ok(mut m) = self.validators.lock() {
            m.insert(cache_key, v.clone());
        }
        Ok(v)
    }

    /// Ends every MCP server connection (stdio servers' processes exit).
    pub async fn shutdown(&self) {
        for s in self.servers.values() {
            s.shutdown().await;
        }
    }
}

fn unknown_tool(name: &str, known: &[String]) -> StepError {
    StepError::terminal(format!(
        "unknown tool `{name}` (known: {})",
        if known.is_empty() {
            "none".to_string()
        } else {
            known.join(", ")
        }
    ))
    .with_details(json!({"known": known}))
}

fn retry_later(what: String, wait: Duration, mut details: Value) -> StepError {
    // Whole seconds, rounded up, read better than `29s 999ms 12us`.
    let shown = Duration::from_secs(wait.as_secs() + u64::from(wait.subsec_nanos() > 0));
    if let Value::Object(m) = &mut details {
        m.insert(
            "retry_after_ms".into(),
            json!(u64::try_from(wait.as_millis()).unwrap_or(u64::MAX)),
        );
    }
    StepError::retryable(format!(
        "{what}; it may work again in {}",
        humantime::format_duration(shown)
    ))
    .with_details(details)
}

/// Checks arguments against a tool's schema; the error names each argument (its JSON
/// pointer) and what is wrong with it.
fn validate(
    name: &str,
    validator: &jsonschema::Validator,
    args: &Value,
) -> std::result::Result<(), StepError> {
    let problems: Vec<(String, String)> = validator
        .iter_errors(args)
        .map(|e| {
            let mut pointer = e.instance_path().as_str().to_string();
            if let jsonschema::error::ValidationErrorKind::Required { property } = e.kind() {
                let prop = property
                    .as_str()
                    .map_or_else(|| property.to_string(), str::to_string);
                pointer = format!("{pointer}/{}", prop.replace('~', "~0").replace('/', "~1"));
            }
            if pointer.is_empty() {
                pointer = "/".into();
            }
            (pointer, e.to_string())
        })
        .collect();
    if problems.is_empty() {
        return Ok(());
    }
    let text: Vec<String> = problems
        .iter()
        .map(|(p, m)| format!("argument `{p}`: {m}"))
        .collect();
    Err(StepError::terminal(format!(
        "tool `{name}`: invalid arguments: {}",
        text.join("; ")
    ))
    .with_details(json!({
        "errors": problems.iter().map(|(p, m)| json!({"pointer": p, "message": m})).collect::<Vec<_>>()
    })))
}

/// The request of an HTTP tool: its templates rendered with `args` bound. A secret
/// reference may only come from the tools file: one that an argument brought into a
/// header is refused (it would let a caller read any secret).
fn render_http(
    name: &str,
    tool: &HttpToolConfig,
    args: &Value,
) -> std::result::Result<HttpConfig, StepError> {
    let context = json!({"args": args});
    let render = |field: &str, v: &Value| {
        aob_model::expr::render(v, &context)
            .map_err(|e| StepError::terminal(format!("tool `{name}`: field `{field}`: {e}")))
    };
    let as_text = |v: Value| match v {
        Value::String(s) => s,
        other => other.to_string(),
    };
    let url = as_text(render("url", &Value::String(tool.url.clone()))?);
    let mut headers = BTreeMap::new();
    for (k, template) in &tool.headers {
        let value = as_text(render(
            &format!("headers.{k}"),
            &Value::String(template.clone()),
        )?);
        let refs = |s: &str| -> Vec<String> {
            secret_refs(s)
                .unwrap_or_default()
                .into_iter()
                .map(|r| r.name.to_string())
                .collect()
        };
        if refs(&value) != refs(template) {
            return Err(StepError::terminal(format!(
                "tool `{name}`: field `headers.{k}`: the arguments put a secret reference into this header; references are substituted only when written in the tools file"
            )));
        }
        headers.insert(k.clone(), value);
    }
    let body = match &tool.body {
        Some(b) => Some(render("body", b)?),
        None => None,
    };
    Ok(HttpConfig {
        url,
        method: tool.method.clone(),
        headers,
        body,
        timeout: tool.timeout,
    })
}

/// SHA-256 (hex) of a value as canonical JSON: object keys sorted at every level.
pub fn digest(v: &Value) -> String {
    fn canonical(v: &Value) -> Value {
        match v {
            Value::Object(m) => {
                let sorted: BTreeMap<&String, Value> =
                    m.iter().map(|(k, v)| (k, canonical(v))).collect();
                Value::Object(sorted.into_iter().map(|(k, v)| (k.clone(), v)).collect())
            }
            Value::Array(a) => Value::Array(a.iter().map(canonical).collect()),
            other => other.clone(),
        }
    }
    aob_model::audit::sha256_hex(canonical(v).to_string().as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_ignore_key_order() {
        let a: Value =
            serde_json::from_str(r#"{"b": 1, "a": {"y": 2, "x": [1, {"q": 1, "p": 2}]}}"#).unwrap();
        let b: Value =
            serde_json::from_str(r#"{"a": {"x": [1, {"p": 2, "q": 1}], "y": 2}, "b": 1}"#).unwrap();
        assert_eq!(digest(&a), digest(&b));
        assert_ne!(digest(&a), digest(&json!({"b": 2})));
        assert_eq!(digest(&a).len(), 64);
    }

    #[test]
    fn validation_names_the_argument() {
        let v = jsonschema::validator_for(&json!({
            "type": "object",
            "required": ["id"],
            "properties": {"id": {"type": "string"}, "n": {"type": "integer", "minimum": 1}}
        }))
        .unwrap();
        let e = validate("t", &v, &json!({"n": 0})).unwrap_err();
        assert_eq!(e.class, ErrorClass::Terminal);
        assert!(e.message.contains("argument `/id`"), "{}", e.message);
        assert!(e.message.contains("argument `/n`"), "{}", e.message);
        let e = validate("t", &v, &json!({"id": 7})).unwrap_err();
        assert!(
            e.message.contains("argument `/id`: 7 is not of type"),
            "{}",
            e.message
        );
        assert!(validate("t", &v, &json!({"id": "a"})).is_ok());
    }

    #[test]
    fn http_templates_see_args_and_refuse_injected_secrets() {
        let tool: HttpToolConfig = serde_json::from_value(json!({
            "url": "http://h/orders/{{ args.id }}",
            "headers": {"x-a": "{{ args.tag }}", "authorization": "Bearer ${secrets.T}"},
            "body": {"q": "{{ args.id }}"}
        }))
        .unwrap();
        let c = render_http("t", &tool, &json!({"id": "42", "tag": "x"})).unwrap();
        assert_eq!(c.url, "http://h/orders/42");
        assert_eq!(c.headers["x-a"], "x");
        assert_eq!(c.headers["authorization"], "Bearer ${secrets.T}");
        assert_eq!(c.body, Some(json!({"q": "42"})));
        let e =
            render_http("t", &tool, &json!({"id": "1", "tag": "${secrets.OTHER}"})).unwrap_err();
        assert_eq!(e.class, ErrorClass::Terminal);
        assert!(e.message.contains("headers.x-a"), "{}", e.message);
    }
}

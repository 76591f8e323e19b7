//! One MCP server: connected on first use, kept warm, connected again when it has died.
//!
//! A stdio server is a child process; when it exits, its stdout closes and rmcp's service
//! loop ends, which fails the calls in flight and marks the peer's transport closed. The
//! next call finds it closed and spawns a fresh process.

use std::collections::{HashMap, VecDeque};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aob_model::wire::StepError;
use aob_runtime::secrets::{Secret, Secrets};
use rmcp::model::{CallToolRequestParams, CallToolResult, Tool};
use rmcp::service::{RoleClient, RunningService, ServiceError};
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::transport::{StreamableHttpClientTransport, TokioChildProcess};
use rmcp::{ServiceExt, model::JsonObject};
use serde_json::Value;
use tokio::io::AsyncBufReadExt;
use tokio_util::sync::CancellationToken;

use crate::config::{McpServerConfig, Transport};

/// Lines of a server's standard error kept to explain why it died.
const STDERR_LINES: usize = 20;

/// A live connection and what it listed.
struct Connection {
    service: RunningService<RoleClient, ()>,
    tools: Arc<Vec<Tool>>,
    stderr: Arc<Mutex<VecDeque<String>>>,
    /// Becomes true when a stdio server's standard error is closed (its process ended).
    stderr_closed: Option<tokio::sync::watch::Receiver<bool>>,
}

impl Connection {
    fn alive(&self) -> bool {
        !self.service.is_closed() && !self.service.peer().is_transport_closed()
    }

    fn stderr_tail(&self) -> Option<String> {
        let lines = self.stderr.lock().ok()?;
        let last = lines.iter().rev().find(|l| !l.trim().is_empty())?;
        Some(last.trim().to_string())
    }
}

/// One configured MCP server.
pub struct McpServer {
    name: String,
    config: McpServerConfig,
    transport: Transport,
    secrets: Secrets,
    conn: tokio::sync::Mutex<Option<Arc<Connection>>>,
}

impl std::fmt::Debug for McpServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("McpServer")
            .field("name", &self.name)
            .field("transport", &self.transport)
            .finish_non_exhaustive()
    }
}

/// What went wrong talking to a server. `retryable` failures also count against its breaker.
pub type CallError = StepError;

impl McpServer {
    /// A server, not yet connected.
    pub fn new(name: &str, config: McpServerConfig, secrets: Secrets) -> Result<Self, String> {
        let transport = config.transport(name)?;
        Ok(McpServer {
            name: name.to_string(),
            config,
            transport,
            secrets,
            conn: tokio::sync::Mutex::new(None),
        })
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The live connection, made (and its tools listed) if there is none or the last one
    /// died.
    async fn connection(&self) -> Result<Arc<Connection>, CallError> {
        let mut slot = self.conn.lock().await;
        if let Some(c) = slot.as_ref() {
            if c.alive() {
                return Ok(c.clone());
            }
            tracing::info!(server = %self.name, "MCP server connection is closed; connecting again");
        }
        *slot = None;
        let timeout = self.config.call_timeout();
        let made = tokio::time::timeout(timeout, self.connect())
            .await
            .map_err(|_| {
                StepError::retryable(format!(
                    "MCP server `{}`: no answer to the handshake and tool listing within {}",
                    self.name,
                    humantime::format_duration(timeout)
                ))
            })??;
        let c = Arc::new(made);
        *slot = Some(c.clone());
        Ok(c)
    }

    async fn connect(&self) -> Result<Connection, CallError> {
        let stderr = Arc::new(Mutex::new(VecDeque::new()));
        let mut stderr_closed = None;
        let service = match &self.transport {
            Transport::Stdio { command, args } => {
                let mut cmd = tokio::process::Command::new(command);
                cmd.args(args);
                for (k, v) in &self.config.env {
                    let (value, _) = self.substitute(&format!("env.{k}"), v)?;
                    cmd.env(k, value);
                }
                let (proc, err) = TokioChildProcess::builder(cmd)
                    .stderr(Stdio::piped())
                    .spawn()
                    .map_err(|e| {
                        StepError::retryable(format!(
                            "MCP server `{}`: cannot start `{command}`: {e}",
                            self.name
                        ))
                    })?;
                if let Some(err) = err {
                    let (tx, rx) = tokio::sync::watch::channel(false);
                    stderr_closed = Some(rx);
                    tokio::spawn(keep_stderr(self.name.clone(), err, stderr.clone(), tx));
                }
                ().serve(proc).await.map_err(|e| {
                    let tail = stderr
                        .lock()
                        .ok()
                        .and_then(|l| l.back().cloned())
                        .map(|l| format!(" (its last words: {l})"))
                        .unwrap_or_default();
                    StepError::retryable(format!(
                        "MCP server `{}`: the handshake with `{command}` failed: {}{tail}",
                        self.name,
                        tidy(&e.to_string())
                    ))
                })?
            }
            Transport::Http { url } => {
                let mut headers = HashMap::new();
                for (k, v) in &self.config.headers {
                    let field = format!("headers.{k}");
                    let (value, _) = self.substitute(&field, v)?;
                    let bad = |what: &str| {
                        StepError::terminal(format!(
                            "MCP server `{}`: field `{field}`: {what}",
                            self.name
                        ))
                    };
                    let name = reqwest::header::HeaderName::from_bytes(k.as_bytes())
                        .map_err(|_| bad("not a valid header name"))?;
                    let mut value = reqwest::header::HeaderValue::from_str(&value)
                        .map_err(|_| bad("not a valid header value"))?;
                    value.set_sensitive(true);
                    headers.insert(name, value);
                }
                let config = StreamableHttpClientTransportConfig::with_uri(url.as_str())
                    .custom_headers(headers);
                let transport = StreamableHttpClientTransport::from_config(config);
                ().serve(transport).await.map_err(|e| {
                    StepError::retryable(format!(
                        "MCP server `{}`: cannot connect to {url}: {}",
                        self.name,
                        tidy(&e.to_string())
                    ))
                })?
            }
        };
        let tools = service.peer().list_all_tools().await.map_err(|e| {
            StepError::retryable(format!(
                "MCP server `{}`: listing its tools failed: {e}",
                self.name
            ))
        })?;
        tracing::info!(server = %self.name, tools = tools.len(), "MCP server connected");
        Ok(Connection {
            service,
            tools: Arc::new(tools),
            stderr,
            stderr_closed,
        })
    }

    fn substitute(&self, field: &str, value: &str) -> Result<(String, Vec<Secret>), CallError> {
        self.secrets.substitute(value).map_err(|e| {
            let mut err = StepError::from(e);
            err.message = format!(
                "MCP server `{}`: field `{field}`: {}",
                self.name, err.message
            );
            err
        })
    }

    /// Its tools (connecting first if needed).
    pub async fn tools(&self) -> Result<Arc<Vec<Tool>>, CallError> {
        Ok(self.connection().await?.tools.clone())
    }

    /// Calls `tool` with `args`. A server that dies during the call fails it as retryable;
    /// the next call connects again.
    pub async fn call(
        &self,
        tool: &str,
        args: Value,
        cancel: &CancellationToken,
    ) -> Result<CallToolResult, CallError> {
        let conn = self.connection().await?;
        let arguments: Option<JsonObject> = match args {
            Value::Object(m) => Some(m),
            Value::Null => None,
            other => {
                return Err(StepError::terminal(format!(
                    "tool `{}.{tool}`: arguments must be a JSON object, not {other}",
                    self.name
                )));
            }
        };
        let mut params = CallToolRequestParams::new(tool.to_string());
        params.arguments = arguments;
        let timeout = self.config.call_timeout();
        let peer = conn.service.peer().clone();
        let answer = tokio::select! {
            r = tokio::time::timeout(timeout, peer.call_tool(params)) => r,
            () = cancel.cancelled() => {
                return Err(StepError::retryable(format!(
                    "tool `{}.{tool}`: the call was cancelled", self.name
                )));
            }
        };
        match answer {
            Ok(Ok(result)) => Ok(result),
            Err(_) => Err(StepError::retryable(format!(
                "tool `{}.{tool}`: no answer within {} (call_timeout of MCP server `{}`)",
                self.name,
                humantime::format_duration(timeout),
                self.name
            ))),
            Ok(Err(e)) => Err(self.call_failed(tool, &conn, e).await),
        }
    }

    async fn call_failed(&self, tool: &str, conn: &Arc<Connection>, e: ServiceError) -> CallError {
        let what = format!("tool `{}.{tool}`", self.name);
        match e {
            ServiceError::McpError(err) => {
                // The server answered with a protocol error: it is alive, the request was wrong
                // (unknown tool, invalid params) or it failed inside.
                let retryable = err.code == rmcp::model::ErrorCode::INTERNAL_ERROR;
                let msg = format!(
                    "{what}: the MCP server answered with error {}: {}",
                    err.code.0, err.message
                );
                if retryable {
                    StepError::retryable(msg)
                } else {
                    StepError::terminal(msg)
                }
            }
            other => {
                // The transport failed: the server died or the connection broke. The next call
                // connects again. A dying process's last words may still be in the pipe: read
                // them (until its standard error closes, briefly) to say why.
                if let Some(mut rx) = conn.stderr_closed.clone() {
                    let _ = tokio::time::timeout(Duration::from_secs(1), rx.wait_for(|c| *c)).await;
                }
                let mut slot = self.conn.lock().await;
                if slot.as_ref().is_some_and(|c| Arc::ptr_eq(c, conn)) {
                    *slot = None;
                }
                drop(slot);
                let why = match (&self.transport, conn.stderr_tail()) {
                    (Transport::Stdio { command, .. }, Some(tail)) => {
                        format!(
                            "the server process (`{command}`) ended during the call; its last words: {tail}"
                        )
                    }
                    (Transport::Stdio { command, .. }, None) => {
                        format!("the server process (`{command}`) ended during the call")
                    }
                    (Transport::Http { url }, _) => format!("the connection to {url} failed"),
                };
                StepError::retryable(format!(
                    "{what}: {why} ({other}); the next call starts a fresh connection"
                ))
            }
        }
    }

    /// Closes the connection, if any (a stdio server's process is ended).
    pub async fn shutdown(&self) {
        let taken = self.conn.lock().await.take();
        if let Some(c) = taken
            && let Ok(mut c) = Arc::try_unwrap(c)
        {
            let _ = c.service.close_with_timeout(Duration::from_secs(3)).await;
        }
    }
}

/// An rmcp error without the Rust type names it quotes (`Transport [rmcp::...<...>] error`).
fn tidy(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find(" [rmcp::") {
        out.push_str(&rest[..start]);
        // Brackets nest inside the type name; skip to the matching one.
        let mut depth = 0usize;
        let mut end = rest.len();
        for (i, c) in rest[start + 1..].char_indices() {
            match c {
                '[' | '<' => depth += 1,
                ']' | '>' => {
                    depth = depth.saturating_sub(1);
                    if depth == 0 && c == ']' {
                        end = start + 1 + i + 1;
                        break;
                    }
                }
                _ => {}
            }
        }
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

/// Reads a server's standard error into a short tail (and the debug log).
async fn keep_stderr(
    server: String,
    err: tokio::process::ChildStderr,
    tail: Arc<Mutex<VecDeque<String>>>,
    closed: tokio::sync::watch::Sender<bool>,
) {
    let mut lines = tokio::io::BufReader::new(err).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        tracing::debug!(server = %server, "{line}");
        if let Ok(mut t) = tail.lock() {
            if t.len() == STDERR_LINES {
                t.pop_front();
            }
            t.push_back(line);
        }
    }
    let _ = closed.send(true);
}

/// The step output parts of a tool's answer: text parts joined by newlines, structured
/// content as JSON, and the error flag.
pub fn content_of(result: &CallToolResult) -> (String, Value, bool) {
    let mut texts = Vec::new();
    for block in &result.content {
        let v = serde_json::to_value(block).unwrap_or(Value::Null);
        match v.get("type").and_then(Value::as_str) {
            Some("text") => {
                if let Some(t) = v.get("text").and_then(Value::as_str) {
                    texts.push(t.to_string());
                }
            }
            Some(other) => texts.push(format!("[{other} content]")),
            None => {}
        }
    }
    (
        texts.join("\n"),
        result.structured_content.clone().unwrap_or(Value::Null),
        result.is_error.unwrap_or(false),
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn rust_type_names_are_left_out_of_messages() {
        assert_eq!(
            super::tidy(
                "Send message error Transport [rmcp::transport::worker::WorkerTransport<rmcp::X<reqwest::Client>>] error: Client error: refused"
            ),
            "Send message error Transport error: Client error: refused"
        );
        assert_eq!(super::tidy("plain [1] text"), "plain [1] text");
    }
}

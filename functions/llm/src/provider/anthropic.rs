//! Anthropic's Messages API: `POST {base_url}/v1/messages` with `x-api-key` and
//! `anthropic-version: 2023-06-01`.

use std::collections::BTreeMap;

use futures::future::BoxFuture;
use serde_json::{Value, json};
use tokio::sync::mpsc::UnboundedSender;

use super::{Endpoint, Provider, SseStream, emit, endpoint_url, event_json, tokens};
use crate::chat::{ChatRequest, ChatResponse, ProviderError, Role, TokenUsage, ToolCall};

/// The API version the requests and answers here follow.
pub const API_VERSION: &str = "2023-06-01";

/// What the system prompt gains when the caller asks for JSON: the Messages API has no
/// JSON mode.
pub const JSON_INSTRUCTION: &str =
    "Answer with a single JSON object and nothing else: no prose, no code fences.";

/// A client of one Anthropic endpoint.
#[derive(Clone)]
pub struct Anthropic {
    endpoint: Endpoint,
    http: reqwest::Client,
    url: String,
}

// By hand: the endpoint holds the API key, which must not reach logs.
impl std::fmt::Debug for Anthropic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Anthropic")
            .field("url", &self.url)
            .field("timeout", &self.endpoint.timeout)
            .finish_non_exhaustive()
    }
}

impl Anthropic {
    /// A client of `endpoint` (whose base URL ends before `/v1/messages`).
    pub fn new(endpoint: Endpoint, http: reqwest::Client) -> Self {
        let url = endpoint_url(&endpoint.base_url, "/v1/messages");
        Anthropic {
            endpoint,
            http,
            url,
        }
    }

    async fn call(
        &self,
        req: &ChatRequest,
        stream: Option<&UnboundedSender<String>>,
    ) -> Result<ChatResponse, ProviderError> {
        use reqwest::header::{HeaderMap, HeaderValue};
        let mut headers = HeaderMap::new();
        headers.insert("anthropic-version", HeaderValue::from_static(API_VERSION));
        if let Some(key) = &self.endpoint.api_key {
            let value = HeaderValue::from_str(key).map_err(|_| {
                ProviderError::Rejected(format!(
                    "the API key for {} is not a valid header value",
                    self.url
                ))
            })?;
            headers.insert("x-api-key", value);
        }
        let limit = self.endpoint.timeout;
        let resp = super::post(
            &self.http,
            &self.url,
            headers,
            &request_body(req, stream.is_some()),
            limit,
        )
        .await?;
        if stream.is_none() || super::is_json(&resp) {
            let answer = parse_response(&super::read_json(resp, &self.url, limit).await?)?;
            emit(stream, &answer.text);
            return Ok(answer);
        }
        let mut events = SseStream::new(resp, &self.url, limit);
        let mut acc = StreamState::default();
        while let Some(event) = events.next().await? {
            if acc.apply(&event_json(&event)?, stream)? {
                break;
            }
        }
        acc.finish()
    }
}

impl Provider for Anthropic {
    fn chat<'a>(
        &'a self,
        req: &'a ChatRequest,
        stream: Option<&'a UnboundedSender<String>>,
    ) -> BoxFuture<'a, Result<ChatResponse, ProviderError>> {
        Box::pin(super::within(self.endpoint.timeout, self.call(req, stream)))
    }
}

/// The content blocks of one message.
fn blocks(m: &crate::chat::Message) -> Vec<Value> {
    match m.role {
        Role::User => vec![json!({ "type": "text", "text": m.content })],
        Role::Assistant => {
            // The API refuses empty text blocks; a message that only calls tools has none.
            let text =
                (!m.content.is_empty()).then(|| json!({ "type": "text", "text": m.content }));
            text.into_iter()
                .chain(m.tool_calls.iter().map(|c| {
                    json!({ "type": "tool_use", "id": c.id, "name": c.name, "input": c.arguments })
                }))
                .collect()
        }
        Role::Tool => {
            let mut block = json!({
                "type": "tool_result",
                "tool_use_id": m.tool_call_id.clone().unwrap_or_default(),
                "content": m.content,
            });
            if m.is_error {
                block["is_error"] = json!(true);
            }
            vec![block]
        }
    }
}

/// The request body of `req`. Tool results travel in user messages, and the API wants
/// the roles to alternate, so consecutive messages of one side are merged.
pub(crate) fn request_body(req: &ChatRequest, stream: bool) -> Value {
    let mut messages: Vec<(&str, Vec<Value>)> = Vec::new();
    for m in &req.messages {
        let role = match m.role {
            Role::User | Role::Tool => "user",
            Role::Assistant => "assistant",
        };
        let new = blocks(m);
        match messages.last_mut() {
            Some((last, content)) if *last == role => content.extend(new),
            _ => messages.push((role, new)),
        }
    }
    let messages: Vec<Value> = messages
        .into_iter()
        .map(|(role, content)| json!({ "role": role, "content": content }))
        .collect();
    let mut body = json!({
        "model": req.model,
        "max_tokens": req.max_tokens,
        "messages": messages,
    });
    let system = match (&req.system, req.json) {
        (Some(s), true) => Some(format!("{s}\n\n{JSON_INSTRUCTION}")),
        (Some(s), false) => Some(s.clone()),
        (None, true) => Some(JSON_INSTRUCTION.to_string()),
        (None, false) => None,
    };
    if let Some(system) = system {
        body["system"] = json!(system);
    }
    if let Some(t) = req.temperature {
        body["temperature"] = json!(t);
    }
    if !req.tools.is_empty() {
        body["tools"] = req
            .tools
            .iter()
            .map(|t| json!({ "name": t.name, "description": t.description, "input_schema": t.input_schema }))
            .collect();
    }
    if stream {
        body["stream"] = json!(true);
    }
    body
}

/// `stop`, `tool_calls`, `length`, or the provider's word (`refusal`, `pause_turn`, ...).
fn finish_reason(stop_reason: &str) -> String {
    match stop_reason {
        "end_turn" | "stop_sequence" => "stop",
        "tool_use" => "tool_calls",
        "max_tokens" => "length",
        other => other,
    }
    .to_string()
}

/// `input_tokens` leaves out what was read from or written to the prompt cache; the
/// neutral count includes them.
fn usage(u: &Value) -> TokenUsage {
    let read = tokens(u, "/cache_read_input_tokens");
    TokenUsage {
        input: tokens(u, "/input_tokens") + read + tokens(u, "/cache_creation_input_tokens"),
        output: tokens(u, "/output_tokens"),
        cached_input: read,
    }
}

/// Reads a non-streamed `message`.
pub(crate) fn parse_response(v: &Value) -> Result<ChatResponse, ProviderError> {
    let content = v
        .get("content")
        .and_then(Value::as_array)
        .ok_or_else(|| ProviderError::Protocol(format!("the answer has no `content` list: {v}")))?;
    let mut text = String::new();
    let mut tool_calls = Vec::new();
    for block in content {
        match block.get("type").and_then(Value::as_str) {
            Some("text") => text.push_str(block.get("text").and_then(Value::as_str).unwrap_or("")),
            Some("tool_use") => tool_calls.push(ToolCall {
                id: string(block, "id"),
                name: string(block, "name"),
                arguments: block.get("input").cloned().unwrap_or_else(|| json!({})),
            }),
            // Thinking and other blocks are not part of the answer.
            _ => {}
        }
    }
    Ok(ChatResponse {
        text,
        tool_calls,
        finish_reason: finish_reason(
            v.get("stop_reason")
                .and_then(Value::as_str)
                .unwrap_or("end_turn"),
        ),
        usage: v.get("usage").map(usage).unwrap_or_default(),
        model: string(v, "model"),
    })
}

fn string(v: &Value, key: &str) -> String {
    v.get(key)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

/// A content block being put together from its streamed pieces.
#[derive(Debug)]
enum Block {
    Text,
    Tool {
        id: String,
        name: String,
        start: Value,
        json: String,
    },
    Other,
}

/// The answer being put together from the stream's events.
#[derive(Debug, Default)]
pub(crate) struct StreamState {
    text: String,
    blocks: BTreeMap<u64, Block>,
    stop_reason: Option<String>,
    usage: Value,
    model: String,
    stopped: bool,
}

impl StreamState {
    /// Takes in one event, sending its text to `stream`; true once `message_stop` came.
    pub(crate) fn apply(
        &mut self,
        event: &Value,
        stream: Option<&UnboundedSender<String>>,
    ) -> Result<bool, ProviderError> {
        let index = event.get("index").and_then(Value::as_u64).unwrap_or(0);
        match event.get("type").and_then(Value::as_str).unwrap_or("") {
            "message_start" => {
                let message = event.get("message").unwrap_or(&Value::Null);
                self.model = string(message, "model");
                if let Some(u) = message.get("usage") {
                    self.usage = u.clone();
                }
            }
            "content_block_start" => {
                let block = event.get("content_block").unwrap_or(&Value::Null);
                let kind = match block.get("type").and_then(Value::as_str) {
                    Some("text") => {
                        let first = block.get("text").and_then(Value::as_str).unwrap_or("");
                        self.text.push_str(first);
                        emit(stream, first);
                        Block::Text
                    }
                    Some("tool_use") => Block::Tool {
                        id: string(block, "id"),
                        name: string(block, "name"),
                        start: block.get("input").cloned().unwrap_or_else(|| json!({})),
                        json: String::new(),
                    },
                    _ => Block::Other,
                };
                self.blocks.insert(index, kind);
            }
            "content_block_delta" => {
                let delta = event.get("delta").unwrap_or(&Value::Null);
                match (
                    delta.get("type").and_then(Value::as_str),
                    self.blocks.get_mut(&index),
                ) {
                    (Some("text_delta"), Some(Block::Text)) => {
                        let piece = delta.get("text").and_then(Value::as_str).unwrap_or("");
                        self.text.push_str(piece);
                        emit(stream, piece);
                    }
                    (Some("input_json_delta"), Some(Block::Tool { json, .. })) => {
                        json.push_str(
                            delta
                                .get("partial_json")
                                .and_then(Value::as_str)
                                .unwrap_or(""),
                        );
                    }
                    (Some("text_delta" | "input_json_delta"), _) => {
                        return Err(ProviderError::Protocol(format!(
                            "a delta for content block {index}, which was not started as its kind: {event}"
                        )));
                    }
                    // thinking_delta, signature_delta, ...: not part of the answer.
                    _ => {}
                }
            }
            "message_delta" => {
                if let Some(r) = event.pointer("/delta/stop_reason").and_then(Value::as_str) {
                    self.stop_reason = Some(r.to_string());
                }
                // The counts here are cumulative and win over message_start's.
                if let (Some(Value::Object(now)), Value::Object(seen)) =
                    (event.get("usage"), &mut self.usage)
                {
                    for (k, v) in now {
                        if !v.is_null() {
                            seen.insert(k.clone(), v.clone());
                        }
                    }
                } else if let Some(u) = event.get("usage") {
                    self.usage = u.clone();
                }
            }
            "message_stop" => {
                self.stopped = true;
                return Ok(true);
            }
            "error" => return Err(stream_error(event)),
            // ping, content_block_stop, and event types added later.
            _ => {}
        }
        Ok(false)
    }

    /// The answer, once `message_stop` came.
    pub(crate) fn finish(self) -> Result<ChatResponse, ProviderError> {
        if !self.stopped {
            return Err(ProviderError::Unavailable(
                "the stream ended before the answer was complete (no message_stop)".into(),
            ));
        }
        let mut tool_calls = Vec::new();
        for block in self.blocks.into_values() {
            if let Block::Tool {
                id,
                name,
                start,
                json,
            } = block
            {
                let arguments = if json.trim().is_empty() {
                    start
                } else {
                    serde_json::from_str(&json).map_err(|e| {
                        ProviderError::Protocol(format!(
                            "the input of tool call `{name}` is not JSON ({e}): {json}"
                        ))
                    })?
                };
                tool_calls.push(ToolCall {
                    id,
                    name,
                    arguments,
                });
            }
        }
        Ok(ChatResponse {
            text: self.text,
            tool_calls,
            finish_reason: finish_reason(self.stop_reason.as_deref().unwrap_or("end_turn")),
            usage: usage(&self.usage),
            model: self.model,
        })
    }
}

/// An `error` event in the middle of a stream (the HTTP status was already 200).
fn stream_error(event: &Value) -> ProviderError {
    let kind = event
        .pointer("/error/type")
        .and_then(Value::as_str)
        .unwrap_or("");
    let message = event
        .pointer("/error/message")
        .and_then(Value::as_str)
        .unwrap_or("no message");
    let said = format!("the provider failed while streaming ({kind}): {message}");
    match kind {
        "rate_limit_error" => ProviderError::RateLimited { retry_after: None },
        "invalid_request_error"
        | "authentication_error"
        | "permission_error"
        | "not_found_error"
        | "request_too_large" => ProviderError::Rejected(said),
        _ => ProviderError::Unavailable(said),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::{Message, ToolSpec};

    #[test]
    fn request_merges_tool_results_into_one_user_message_and_asks_for_json() {
        let req = ChatRequest {
            model: "claude-sonnet-4-5".into(),
            system: Some("You are terse.".into()),
            messages: vec![
                Message::user("Weather in Oslo and Bergen?"),
                Message::assistant(
                    "",
                    vec![
                        ToolCall {
                            id: "toolu_1".into(),
                            name: "forecast".into(),
                            arguments: json!({ "city": "Oslo" }),
                        },
                        ToolCall {
                            id: "toolu_2".into(),
                            name: "forecast".into(),
                            arguments: json!({ "city": "Bergen" }),
                        },
                    ],
                ),
                Message::tool("toolu_1", "rain", false),
                Message::tool("toolu_2", "no such city", true),
            ],
            tools: vec![ToolSpec {
                name: "forecast".into(),
                description: "Forecast".into(),
                input_schema: json!({ "type": "object" }),
            }],
            max_tokens: 300,
            temperature: None,
            json: true,
        };
        let body = request_body(&req, true);
        assert_eq!(
            body["system"],
            format!("You are terse.\n\n{JSON_INSTRUCTION}")
        );
        let messages = body["messages"].as_array().unwrap();
        assert_eq!(messages.len(), 3, "{body}");
        assert_eq!(
            messages[1]["content"].as_array().unwrap().len(),
            2,
            "no empty text block"
        );
        assert_eq!(
            messages[1]["content"][0],
            json!({ "type": "tool_use", "id": "toolu_1", "name": "forecast", "input": { "city": "Oslo" } })
        );
        assert_eq!(messages[2]["role"], "user");
        assert_eq!(
            messages[2]["content"][0],
            json!({ "type": "tool_result", "tool_use_id": "toolu_1", "content": "rain" })
        );
        assert_eq!(messages[2]["content"][1]["is_error"], true);
        assert_eq!(
            body["tools"][0]["input_schema"],
            json!({ "type": "object" })
        );
        assert_eq!(body["stream"], true);
        assert!(body.get("temperature").is_none());
    }

    #[test]
    fn message_with_text_tool_use_and_cache_usage() {
        let body = json!({
            "id": "msg_01", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5-20250929",
            "content": [
                { "type": "text", "text": "Checking." },
                { "type": "tool_use", "id": "toolu_01", "name": "forecast", "input": { "city": "Oslo" } }
            ],
            "stop_reason": "tool_use", "stop_sequence": null,
            "usage": { "input_tokens": 20, "cache_creation_input_tokens": 5, "cache_read_input_tokens": 100, "output_tokens": 30 }
        });
        let r = parse_response(&body).unwrap();
        assert_eq!(r.text, "Checking.");
        assert_eq!(
            r.tool_calls,
            vec![ToolCall {
                id: "toolu_01".into(),
                name: "forecast".into(),
                arguments: json!({ "city": "Oslo" })
            }]
        );
        assert_eq!(r.finish_reason, "tool_calls");
        assert_eq!(
            r.usage,
            TokenUsage {
                input: 125,
                output: 30,
                cached_input: 100
            }
        );
        assert_eq!(r.model, "claude-sonnet-4-5-20250929");
        let cut = json!({ "content": [{ "type": "text", "text": "Once" }], "stop_reason": "max_tokens", "usage": {} });
        assert_eq!(parse_response(&cut).unwrap().finish_reason, "length");
        assert!(matches!(
            parse_response(&json!({ "type": "message" })),
            Err(ProviderError::Protocol(_))
        ));
    }

    #[test]
    fn events_join_into_text_tool_input_and_usage() {
        let events = [
            json!({ "type": "message_start", "message": { "id": "msg_1", "model": "claude-x", "content": [],
                    "usage": { "input_tokens": 12, "cache_read_input_tokens": 3, "output_tokens": 1 } } }),
            json!({ "type": "content_block_start", "index": 0, "content_block": { "type": "text", "text": "" } }),
            json!({ "type": "ping" }),
            json!({ "type": "content_block_delta", "index": 0, "delta": { "type": "text_delta", "text": "Let me " } }),
            json!({ "type": "content_block_delta", "index": 0, "delta": { "type": "text_delta", "text": "look." } }),
            json!({ "type": "content_block_stop", "index": 0 }),
            json!({ "type": "content_block_start", "index": 1, "content_block": { "type": "tool_use", "id": "toolu_9", "name": "forecast", "input": {} } }),
            json!({ "type": "content_block_delta", "index": 1, "delta": { "type": "input_json_delta", "partial_json": "" } }),
            json!({ "type": "content_block_delta", "index": 1, "delta": { "type": "input_json_delta", "partial_json": "{\"city\": \"Os" } }),
            json!({ "type": "content_block_delta", "index": 1, "delta": { "type": "input_json_delta", "partial_json": "lo\"}" } }),
            json!({ "type": "content_block_stop", "index": 1 }),
            json!({ "type": "message_delta", "delta": { "stop_reason": "tool_use", "stop_sequence": null }, "usage": { "output_tokens": 41 } }),
            json!({ "type": "message_stop" }),
        ];
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut s = StreamState::default();
        let mut stopped = false;
        for e in &events {
            stopped = s.apply(e, Some(&tx)).unwrap();
        }
        assert!(stopped);
        let r = s.finish().unwrap();
        assert_eq!(r.text, "Let me look.");
        assert_eq!(
            r.tool_calls,
            vec![ToolCall {
                id: "toolu_9".into(),
                name: "forecast".into(),
                arguments: json!({ "city": "Oslo" })
            }]
        );
        assert_eq!(r.finish_reason, "tool_calls");
        assert_eq!(
            r.usage,
            TokenUsage {
                input: 15,
                output: 41,
                cached_input: 3
            }
        );
        assert_eq!(r.model, "claude-x");
        let mut sent = Vec::new();
        while let Ok(p) = rx.try_recv() {
            sent.push(p);
        }
        assert_eq!(sent, vec!["Let me ", "look."]);

        let mut cut = StreamState::default();
        cut.apply(&events[0], None).unwrap();
        assert!(matches!(cut.finish(), Err(ProviderError::Unavailable(_))));
        let overloaded = json!({ "type": "error", "error": { "type": "overloaded_error", "message": "Overloaded" } });
        assert!(
            matches!(StreamState::default().apply(&overloaded, None), Err(ProviderError::Unavailable(m)) if m.contains("Overloaded"))
        );
        let limited =
            json!({ "type": "error", "error": { "type": "rate_limit_error", "message": "slow" } });
        assert_eq!(
            StreamState::default().apply(&limited, None),
            Err(ProviderError::RateLimited { retry_after: None })
        );
    }
}

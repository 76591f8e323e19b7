//! OpenAI-compatible chat completions: `POST {base_url}/chat/completions` with a bearer key.

use std::collections::BTreeMap;

use futures::future::BoxFuture;
use serde_json::{Value, json};
use tokio::sync::mpsc::UnboundedSender;

use super::{Endpoint, Provider, SseStream, emit, endpoint_url, event_json, tokens};
use crate::chat::{ChatRequest, ChatResponse, ProviderError, Role, TokenUsage, ToolCall};

/// A client of one OpenAI-compatible endpoint.
#[derive(Clone)]
pub struct OpenAi {
    endpoint: Endpoint,
    http: reqwest::Client,
    url: String,
}

// By hand: the endpoint holds the API key, which must not reach logs.
impl std::fmt::Debug for OpenAi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenAi")
            .field("url", &self.url)
            .field("timeout", &self.endpoint.timeout)
            .finish_non_exhaustive()
    }
}

impl OpenAi {
    /// A client of `endpoint` (whose base URL ends before `/chat/completions`).
    pub fn new(endpoint: Endpoint, http: reqwest::Client) -> Self {
        let url = endpoint_url(&endpoint.base_url, "/chat/completions");
        OpenAi {
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
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(key) = &self.endpoint.api_key {
            let value =
                reqwest::header::HeaderValue::from_str(&format!("Bearer {key}")).map_err(|_| {
                    ProviderError::Rejected(format!(
                        "the API key for {} is not a valid header value",
                        self.url
                    ))
                })?;
            headers.insert(reqwest::header::AUTHORIZATION, value);
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
            if event.data.trim() == "[DONE]" {
                break;
            }
            acc.apply(&event_json(&event)?, stream)?;
        }
        acc.finish()
    }
}

impl Provider for OpenAi {
    fn chat<'a>(
        &'a self,
        req: &'a ChatRequest,
        stream: Option<&'a UnboundedSender<String>>,
    ) -> BoxFuture<'a, Result<ChatResponse, ProviderError>> {
        Box::pin(super::within(self.endpoint.timeout, self.call(req, stream)))
    }
}

/// The request body of `req`.
pub(crate) fn request_body(req: &ChatRequest, stream: bool) -> Value {
    let mut messages = Vec::with_capacity(req.messages.len() + 1);
    if let Some(system) = &req.system {
        messages.push(json!({ "role": "system", "content": system }));
    }
    for m in &req.messages {
        messages.push(match m.role {
            Role::User => json!({ "role": "user", "content": m.content }),
            Role::Assistant => {
                let mut msg = json!({
                    "role": "assistant",
                    "content": if m.content.is_empty() && !m.tool_calls.is_empty() { Value::Null } else { Value::from(m.content.clone()) },
                });
                if !m.tool_calls.is_empty() {
                    msg["tool_calls"] = m
                        .tool_calls
                        .iter()
                        .map(|c| {
                            json!({
                                "id": c.id,
                                "type": "function",
                                "function": { "name": c.name, "arguments": c.arguments.to_string() },
                            })
                        })
                        .collect();
                }
                msg
            }
            // The protocol has no error flag on a tool result; the text says it.
            Role::Tool => json!({
                "role": "tool",
                "tool_call_id": m.tool_call_id.clone().unwrap_or_default(),
                "content": if m.is_error { format!("error: {}", m.content) } else { m.content.clone() },
            }),
        });
    }
    let mut body = json!({
        "model": req.model,
        "messages": messages,
        "max_tokens": req.max_tokens,
    });
    if let Some(t) = req.temperature {
        body["temperature"] = json!(t);
    }
    if !req.tools.is_empty() {
        body["tools"] = req
            .tools
            .iter()
            .map(|t| {
                json!({
                    "type": "function",
                    "function": { "name": t.name, "description": t.description, "parameters": t.input_schema },
                })
            })
            .collect();
    }
    if req.json {
        body["response_format"] = json!({ "type": "json_object" });
    }
    if stream {
        body["stream"] = json!(true);
        body["stream_options"] = json!({ "include_usage": true });
    }
    body
}

/// `stop`, `tool_calls`, `length`, or the provider's word.
fn finish_reason(reason: &str) -> String {
    match reason {
        // The deprecated single-function form means the same.
        "function_call" => "tool_calls",
        other => other,
    }
    .to_string()
}

fn usage(u: &Value) -> TokenUsage {
    TokenUsage {
        input: tokens(u, "/prompt_tokens"),
        output: tokens(u, "/completion_tokens"),
        cached_input: tokens(u, "/prompt_tokens_details/cached_tokens"),
    }
}

/// Tool arguments arrive as a JSON string; an empty one means no arguments.
fn arguments(name: &str, raw: &str) -> Result<Value, ProviderError> {
    if raw.trim().is_empty() {
        return Ok(json!({}));
    }
    serde_json::from_str(raw).map_err(|e| {
        ProviderError::Protocol(format!(
            "the arguments of tool call `{name}` are not JSON ({e}): {raw}"
        ))
    })
}

/// Reads a non-streamed `chat.completion`.
pub(crate) fn parse_response(v: &Value) -> Result<ChatResponse, ProviderError> {
    let choice = v
        .pointer("/choices/0")
        .ok_or_else(|| ProviderError::Protocol(format!("the answer has no `choices[0]`: {v}")))?;
    let message = choice.get("message").unwrap_or(&Value::Null);
    let tool_calls = message
        .get("tool_calls")
        .and_then(Value::as_array)
        .map(|calls| {
            calls
                .iter()
                .map(|c| {
                    let name = c
                        .pointer("/function/name")
                        .and_then(Value::as_str)
                        .ok_or_else(|| {
                            ProviderError::Protocol(format!(
                                "a tool call has no `function.name`: {c}"
                            ))
                        })?;
                    let raw = c
                        .pointer("/function/arguments")
                        .and_then(Value::as_str)
                        .unwrap_or("");
                    Ok(ToolCall {
                        id: c
                            .get("id")
                            .and_then(Value::as_str)
                            .unwrap_or_default()
                            .to_string(),
                        name: name.to_string(),
                        arguments: arguments(name, raw)?,
                    })
                })
                .collect::<Result<Vec<_>, ProviderError>>()
        })
        .transpose()?
        .unwrap_or_default();
    Ok(ChatResponse {
        text: message
            .get("content")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
        tool_calls,
        finish_reason: finish_reason(
            choice
                .get("finish_reason")
                .and_then(Value::as_str)
                .unwrap_or("stop"),
        ),
        usage: v.get("usage").map(usage).unwrap_or_default(),
        model: v
            .get("model")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
    })
}

/// A tool call being put together from its streamed pieces.
#[derive(Debug, Default)]
struct PartialCall {
    id: String,
    name: String,
    arguments: String,
}

/// The answer being put together from `chat.completion.chunk`s.
#[derive(Debug, Default)]
pub(crate) struct StreamState {
    text: String,
    calls: BTreeMap<u64, PartialCall>,
    finish_reason: Option<String>,
    usage: TokenUsage,
    model: String,
}

impl StreamState {
    /// Takes in one chunk, sending its text to `stream`.
    pub(crate) fn apply(
        &mut self,
        chunk: &Value,
        stream: Option<&UnboundedSender<String>>,
    ) -> Result<(), ProviderError> {
        if let Some(e) = chunk.get("error") {
            let message = e
                .get("message")
                .and_then(Value::as_str)
                .map(str::to_string)
                .unwrap_or_else(|| e.to_string());
            return Err(ProviderError::Unavailable(format!(
                "the provider failed while streaming: {message}"
            )));
        }
        if let Some(m) = chunk.get("model").and_then(Value::as_str) {
            self.model = m.to_string();
        }
        if let Some(u) = chunk.get("usage").filter(|u| u.is_object()) {
            self.usage = usage(u);
        }
        let choices = chunk.get("choices").and_then(Value::as_array);
        for choice in choices.into_iter().flatten() {
            let delta = choice.get("delta").unwrap_or(&Value::Null);
            if let Some(piece) = delta.get("content").and_then(Value::as_str) {
                self.text.push_str(piece);
                emit(stream, piece);
            }
            let calls = delta.get("tool_calls").and_then(Value::as_array);
            for (pos, c) in calls.into_iter().flatten().enumerate() {
                let index = c.get("index").and_then(Value::as_u64).unwrap_or(pos as u64);
                let call = self.calls.entry(index).or_default();
                if let Some(id) = c.get("id").and_then(Value::as_str) {
                    call.id = id.to_string();
                }
                if let Some(name) = c.pointer("/function/name").and_then(Value::as_str) {
                    call.name.push_str(name);
                }
                if let Some(args) = c.pointer("/function/arguments").and_then(Value::as_str) {
                    call.arguments.push_str(args);
                }
            }
            if let Some(r) = choice.get("finish_reason").and_then(Value::as_str) {
                self.finish_reason = Some(finish_reason(r));
            }
        }
        Ok(())
    }

    /// The answer, once the stream has ended.
    pub(crate) fn finish(self) -> Result<ChatResponse, ProviderError> {
        // Some compatible servers end without `[DONE]`; a finish reason says the answer is whole.
        let Some(finish_reason) = self.finish_reason else {
            return Err(ProviderError::Unavailable(
                "the stream ended before the answer was complete (no finish_reason)".into(),
            ));
        };
        let tool_calls = self
            .calls
            .into_values()
            .map(|c| {
                Ok(ToolCall {
                    arguments: arguments(&c.name, &c.arguments)?,
                    id: c.id,
                    name: c.name,
                })
            })
            .collect::<Result<Vec<_>, ProviderError>>()?;
        Ok(ChatResponse {
            text: self.text,
            tool_calls,
            finish_reason,
            usage: self.usage,
            model: self.model,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::{Message, ToolSpec};

    fn request() -> ChatRequest {
        ChatRequest {
            model: "gpt-4o-mini".into(),
            system: Some("You are terse.".into()),
            messages: vec![
                Message::user("Weather in Oslo?"),
                Message::assistant(
                    "",
                    vec![ToolCall {
                        id: "call_1".into(),
                        name: "forecast".into(),
                        arguments: json!({ "city": "Oslo" }),
                    }],
                ),
                Message::tool("call_1", "no such city", true),
            ],
            tools: vec![ToolSpec {
                name: "forecast".into(),
                description: "Forecast for a city".into(),
                input_schema: json!({ "type": "object", "properties": { "city": { "type": "string" } } }),
            }],
            max_tokens: 200,
            temperature: Some(0.2),
            json: true,
        }
    }

    #[test]
    fn request_carries_system_tools_tool_results_and_json_mode() {
        let body = request_body(&request(), true);
        assert_eq!(
            body["messages"][0],
            json!({ "role": "system", "content": "You are terse." })
        );
        assert_eq!(
            body["messages"][1],
            json!({ "role": "user", "content": "Weather in Oslo?" })
        );
        assert_eq!(body["messages"][2]["content"], Value::Null);
        assert_eq!(
            body["messages"][2]["tool_calls"][0]["function"]["arguments"],
            r#"{"city":"Oslo"}"#
        );
        assert_eq!(
            body["messages"][3],
            json!({ "role": "tool", "tool_call_id": "call_1", "content": "error: no such city" })
        );
        assert_eq!(body["tools"][0]["function"]["name"], "forecast");
        assert_eq!(body["tools"][0]["function"]["parameters"]["type"], "object");
        assert_eq!(body["response_format"], json!({ "type": "json_object" }));
        assert_eq!(body["stream_options"], json!({ "include_usage": true }));
        assert_eq!(body["max_tokens"], 200);
        assert_eq!(body["temperature"], 0.2);
        let plain = request_body(&request(), false);
        assert!(plain.get("stream").is_none() && plain.get("stream_options").is_none());
    }

    #[test]
    fn completion_with_tool_calls_and_cached_usage() {
        let body = json!({
            "id": "chatcmpl-9", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini-2024-07-18",
            "choices": [{ "index": 0, "finish_reason": "tool_calls", "message": {
                "role": "assistant", "content": null,
                "tool_calls": [
                    { "id": "call_a", "type": "function", "function": { "name": "forecast", "arguments": "{\"city\":\"Oslo\",\"days\":3}" } },
                    { "id": "call_b", "type": "function", "function": { "name": "now", "arguments": "" } }
                ]}}],
            "usage": { "prompt_tokens": 120, "completion_tokens": 17, "total_tokens": 137,
                       "prompt_tokens_details": { "cached_tokens": 64 } }
        });
        let r = parse_response(&body).unwrap();
        assert_eq!(r.text, "");
        assert_eq!(r.finish_reason, "tool_calls");
        assert_eq!(r.model, "gpt-4o-mini-2024-07-18");
        assert_eq!(
            r.usage,
            TokenUsage {
                input: 120,
                output: 17,
                cached_input: 64
            }
        );
        assert_eq!(
            r.tool_calls[0].arguments,
            json!({ "city": "Oslo", "days": 3 })
        );
        assert_eq!(r.tool_calls[1].arguments, json!({}));
        assert_eq!(r.tool_calls[1].id, "call_b");

        let bad = json!({ "choices": [{ "message": { "tool_calls": [
            { "id": "c", "function": { "name": "f", "arguments": "{\"city\": " } }] } }] });
        assert!(
            matches!(parse_response(&bad), Err(ProviderError::Protocol(m)) if m.contains("`f`"))
        );
        assert!(matches!(
            parse_response(&json!({ "choices": [] })),
            Err(ProviderError::Protocol(_))
        ));
    }

    #[test]
    fn chunks_join_into_text_tool_calls_and_usage() {
        let chunks = [
            json!({ "model": "m", "choices": [{ "index": 0, "delta": { "role": "assistant", "content": "" }, "finish_reason": null }] }),
            json!({ "model": "m", "choices": [{ "index": 0, "delta": { "content": "Let me " }, "finish_reason": null }] }),
            json!({ "model": "m", "choices": [{ "index": 0, "delta": { "content": "check." }, "finish_reason": null }] }),
            json!({ "model": "m", "choices": [{ "index": 0, "delta": { "tool_calls": [
                { "index": 0, "id": "call_x", "type": "function", "function": { "name": "forecast", "arguments": "" } }] } }] }),
            json!({ "model": "m", "choices": [{ "index": 0, "delta": { "tool_calls": [
                { "index": 0, "function": { "arguments": "{\"ci" } }] } }] }),
            json!({ "model": "m", "choices": [{ "index": 0, "delta": { "tool_calls": [
                { "index": 0, "function": { "arguments": "ty\":\"Oslo\"}" } }] } }] }),
            json!({ "model": "m", "choices": [{ "index": 0, "delta": {}, "finish_reason": "tool_calls" }] }),
            json!({ "model": "m", "choices": [], "usage": { "prompt_tokens": 9, "completion_tokens": 4,
                    "prompt_tokens_details": { "cached_tokens": 0 } } }),
        ];
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut s = StreamState::default();
        for c in &chunks {
            s.apply(c, Some(&tx)).unwrap();
        }
        let r = s.finish().unwrap();
        assert_eq!(r.text, "Let me check.");
        assert_eq!(
            r.tool_calls,
            vec![ToolCall {
                id: "call_x".into(),
                name: "forecast".into(),
                arguments: json!({ "city": "Oslo" })
            }]
        );
        assert_eq!(r.finish_reason, "tool_calls");
        assert_eq!(
            r.usage,
            TokenUsage {
                input: 9,
                output: 4,
                cached_input: 0
            }
        );
        let mut sent = Vec::new();
        while let Ok(p) = rx.try_recv() {
            sent.push(p);
        }
        assert_eq!(sent, vec!["Let me ", "check."]);

        let mut cut = StreamState::default();
        cut.apply(&chunks[1], None).unwrap();
        assert!(matches!(cut.finish(), Err(ProviderError::Unavailable(_))));
        let mut failed = StreamState::default();
        let e = failed.apply(
            &json!({ "error": { "message": "engine overloaded" } }),
            None,
        );
        assert!(matches!(e, Err(ProviderError::Unavailable(m)) if m.contains("engine overloaded")));
    }
}

//! The Anthropic Messages side of the double.

use serde_json::{Value, json};

use crate::script::Inbound;
use crate::{Answer, content_text, count_words, halves, pieces};

/// Reads what the rules look at; an error is the message of a 400.
pub(crate) fn inbound(body: &Value) -> Result<Inbound, String> {
    let model = body
        .get("model")
        .and_then(Value::as_str)
        .ok_or("model: Field required")?;
    let messages = body
        .get("messages")
        .and_then(Value::as_array)
        .ok_or("messages: Field required")?;
    if messages.is_empty() {
        return Err("messages: at least one message is required".into());
    }
    if body.get("max_tokens").and_then(Value::as_u64).is_none() {
        return Err("max_tokens: Field required".into());
    }
    let last_user = messages
        .iter()
        .rev()
        .find(|m| m.get("role").and_then(Value::as_str) == Some("user"));
    let has_tool_result = messages
        .last()
        .filter(|m| m.get("role").and_then(Value::as_str) == Some("user"))
        .and_then(|m| m.get("content"))
        .and_then(Value::as_array)
        .is_some_and(|parts| {
            parts
                .iter()
                .any(|p| p.get("type").and_then(Value::as_str) == Some("tool_result"))
        });
    Ok(Inbound {
        model: model.to_string(),
        last_text: last_user
            .and_then(|m| m.get("content"))
            .map(content_text)
            .unwrap_or_default(),
        has_tool_result,
        stream: body.get("stream").and_then(Value::as_bool).unwrap_or(false),
        include_usage: true,
        input_words: messages.iter().map(count_words).sum::<u64>()
            + body.get("system").map(count_words).unwrap_or(0)
            + body.get("tools").map(count_words).unwrap_or(0),
    })
}

fn stop_reason(a: &Answer) -> &str {
    match a.finish_reason.as_str() {
        "stop" => "end_turn",
        "tool_calls" => "tool_use",
        "length" => "max_tokens",
        other => other,
    }
}

fn tool_use_id(a: &Answer, i: usize) -> String {
    format!("toolu_{}_{i}", a.id)
}

/// Anthropic counts cache reads apart from `input_tokens`.
fn usage(a: &Answer, output: u64) -> Value {
    json!({
        "input_tokens": a.usage.input.saturating_sub(a.usage.cached_input),
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": a.usage.cached_input,
        "output_tokens": output,
    })
}

/// A non-streamed `message`.
pub(crate) fn response(a: &Answer) -> Value {
    let mut content = Vec::new();
    if !a.text.is_empty() {
        content.push(json!({ "type": "text", "text": a.text }));
    }
    for (i, (name, args)) in a.tool_calls.iter().enumerate() {
        content.push(
            json!({ "type": "tool_use", "id": tool_use_id(a, i), "name": name, "input": args }),
        );
    }
    json!({
        "id": format!("msg_{}", a.id),
        "type": "message",
        "role": "assistant",
        "model": a.model,
        "content": content,
        "stop_reason": stop_reason(a),
        "stop_sequence": null,
        "usage": usage(a, a.usage.output),
    })
}

fn event(kind: &str, data: Value) -> String {
    format!("event: {kind}\ndata: {data}\n\n")
}

/// The events of a streamed answer: message_start, a ping, each content block
/// (start, deltas, stop), message_delta with the stop reason and usage, message_stop.
pub(crate) fn events(a: &Answer) -> Vec<String> {
    let mut out = vec![event(
        "message_start",
        json!({ "type": "message_start", "message": {
            "id": format!("msg_{}", a.id), "type": "message", "role": "assistant", "model": a.model,
            "content": [], "stop_reason": null, "stop_sequence": null, "usage": usage(a, 1),
        }}),
    )];
    out.push(event("ping", json!({ "type": "ping" })));
    let mut index = 0;
    if !a.text.is_empty() {
        out.push(event(
            "content_block_start",
            json!({ "type": "content_block_start", "index": index, "content_block": { "type": "text", "text": "" } }),
        ));
        for p in pieces(&a.text) {
            out.push(event(
                "content_block_delta",
                json!({ "type": "content_block_delta", "index": index, "delta": { "type": "text_delta", "text": p } }),
            ));
        }
        out.push(event(
            "content_block_stop",
            json!({ "type": "content_block_stop", "index": index }),
        ));
        index += 1;
    }
    for (i, (name, args)) in a.tool_calls.iter().enumerate() {
        out.push(event(
            "content_block_start",
            json!({ "type": "content_block_start", "index": index, "content_block":
                { "type": "tool_use", "id": tool_use_id(a, i), "name": name, "input": {} } }),
        ));
        let args = args.to_string();
        for part in halves(&args) {
            out.push(event(
                "content_block_delta",
                json!({ "type": "content_block_delta", "index": index, "delta": { "type": "input_json_delta", "partial_json": part } }),
            ));
        }
        out.push(event(
            "content_block_stop",
            json!({ "type": "content_block_stop", "index": index }),
        ));
        index += 1;
    }
    out.push(event(
        "message_delta",
        json!({ "type": "message_delta", "delta": { "stop_reason": stop_reason(a), "stop_sequence": null },
                "usage": { "output_tokens": a.usage.output } }),
    ));
    out.push(event("message_stop", json!({ "type": "message_stop" })));
    out
}

/// Anthropic's error body.
pub(crate) fn error_body(status: u16, message: &str) -> Value {
    let kind = match status {
        400 | 409 | 422 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        529 => "overloaded_error",
        _ => "api_error",
    };
    json!({ "type": "error", "error": { "type": kind, "message": message } })
}

//! The OpenAI chat-completions side of the double.

use serde_json::{Value, json};

use crate::script::Inbound;
use crate::{Answer, content_text, count_words, halves, pieces};

/// Reads what the rules look at; an error is the message of a 400.
pub(crate) fn inbound(body: &Value) -> Result<Inbound, String> {
    let model = body
        .get("model")
        .and_then(Value::as_str)
        .ok_or("`model` is missing or not a string")?;
    let messages = body
        .get("messages")
        .and_then(Value::as_array)
        .ok_or("`messages` is missing or not an array")?;
    if messages.is_empty() {
        return Err("`messages` is empty".into());
    }
    let last = messages
        .iter()
        .rev()
        .find(|m| matches!(m.get("role").and_then(Value::as_str), Some("user" | "tool")));
    let has_tool_result = messages
        .last()
        .and_then(|m| m.get("role"))
        .and_then(Value::as_str)
        == Some("tool");
    Ok(Inbound {
        model: model.to_string(),
        last_text: last
            .and_then(|m| m.get("content"))
            .map(content_text)
            .unwrap_or_default(),
        has_tool_result,
        stream: body.get("stream").and_then(Value::as_bool).unwrap_or(false),
        include_usage: body
            .pointer("/stream_options/include_usage")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        input_words: messages.iter().map(count_words).sum::<u64>()
            + body.get("tools").map(count_words).unwrap_or(0),
    })
}

fn tool_call_id(a: &Answer, i: usize) -> String {
    format!("call_{}_{i}", a.id)
}

fn usage(a: &Answer) -> Value {
    json!({
        "prompt_tokens": a.usage.input,
        "completion_tokens": a.usage.output,
        "total_tokens": a.usage.input + a.usage.output,
        "prompt_tokens_details": { "cached_tokens": a.usage.cached_input },
    })
}

/// A non-streamed `chat.completion`.
pub(crate) fn response(a: &Answer) -> Value {
    let mut message = json!({
        "role": "assistant",
        "content": if a.text.is_empty() && !a.tool_calls.is_empty() { Value::Null } else { Value::from(a.text.clone()) },
        "refusal": null,
    });
    if !a.tool_calls.is_empty() {
        message["tool_calls"] = a
            .tool_calls
            .iter()
            .enumerate()
            .map(|(i, (name, args))| {
                json!({
                    "id": tool_call_id(a, i),
                    "type": "function",
                    "function": { "name": name, "arguments": args.to_string() },
                })
            })
            .collect();
    }
    json!({
        "id": format!("chatcmpl-{}", a.id),
        "object": "chat.completion",
        "created": created(),
        "model": a.model,
        "choices": [{ "index": 0, "message": message, "logprobs": null, "finish_reason": a.finish_reason }],
        "usage": usage(a),
        "system_fingerprint": "scripted",
    })
}

fn created() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The `chat.completion.chunk` events of a streamed answer, then `[DONE]`.
pub(crate) fn events(a: &Answer, req: &Inbound) -> Vec<String> {
    let created = created();
    let chunk = |delta: Value, finish: Value| {
        let c = json!({
            "id": format!("chatcmpl-{}", a.id),
            "object": "chat.completion.chunk",
            "created": created,
            "model": a.model,
            "system_fingerprint": "scripted",
            "choices": [{ "index": 0, "delta": delta, "logprobs": null, "finish_reason": finish }],
        });
        format!("data: {c}\n\n")
    };
    let mut out = vec![chunk(
        json!({ "role": "assistant", "content": "" }),
        Value::Null,
    )];
    for p in pieces(&a.text) {
        out.push(chunk(json!({ "content": p }), Value::Null));
    }
    for (i, (name, args)) in a.tool_calls.iter().enumerate() {
        out.push(chunk(
            json!({ "tool_calls": [{ "index": i, "id": tool_call_id(a, i), "type": "function",
                     "function": { "name": name, "arguments": "" } }] }),
            Value::Null,
        ));
        // The arguments arrive in pieces, as real providers send them.
        let args = args.to_string();
        for part in halves(&args) {
            out.push(chunk(
                json!({ "tool_calls": [{ "index": i, "function": { "arguments": part } }] }),
                Value::Null,
            ));
        }
    }
    out.push(chunk(json!({}), Value::from(a.finish_reason.clone())));
    // Usage comes in a last chunk with no choices, and only when asked for, as OpenAI does.
    if !req.include_usage {
        out.push("data: [DONE]\n\n".to_string());
        return out;
    }
    let u = json!({
        "id": format!("chatcmpl-{}", a.id),
        "object": "chat.completion.chunk",
        "created": created,
        "model": a.model,
        "system_fingerprint": "scripted",
        "choices": [],
        "usage": usage(a),
    });
    out.push(format!("data: {u}\n\n"));
    out.push("data: [DONE]\n\n".to_string());
    out
}

/// OpenAI's error body.
pub(crate) fn error_body(status: u16, message: &str) -> Value {
    let kind = match status {
        400 | 404 | 409 | 422 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        429 => "rate_limit_exceeded",
        _ => "server_error",
    };
    json!({ "error": { "message": message, "type": kind, "param": null, "code": null } })
}

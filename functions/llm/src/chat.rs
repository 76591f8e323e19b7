//! The provider-neutral shape of one model call: what the gateway asks, what a provider
//! answers. Both protocols (OpenAI-compatible chat completions, Anthropic Messages) are
//! translated to and from these types, and the recorded calls that make model calls durable
//! are stored in this shape.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Who wrote a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// The person or workflow asking.
    User,
    /// The model.
    Assistant,
    /// The result of a tool call the model asked for.
    Tool,
}

/// A tool call the model asked for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolCall {
    /// The provider's id of the call; a tool result names it.
    pub id: String,
    /// The tool's name as the model saw it.
    pub name: String,
    /// The arguments (a JSON object).
    pub arguments: Value,
}

/// One message of a conversation. The system prompt is not a message: it is
/// [`ChatRequest::system`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    /// Who wrote it.
    pub role: Role,
    /// Its text (empty for an assistant message that only calls tools).
    #[serde(default)]
    pub content: String,
    /// Tool calls of an assistant message.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// For a [`Role::Tool`] message: the call it answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// For a [`Role::Tool`] message: whether the tool failed (the text is the error).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub is_error: bool,
}

impl Message {
    /// A user message.
    pub fn user(text: impl Into<String>) -> Self {
        Message {
            role: Role::User,
            content: text.into(),
            tool_calls: Vec::new(),
            tool_call_id: None,
            is_error: false,
        }
    }
    /// An assistant message.
    pub fn assistant(text: impl Into<String>, tool_calls: Vec<ToolCall>) -> Self {
        Message {
            role: Role::Assistant,
            content: text.into(),
            tool_calls,
            tool_call_id: None,
            is_error: false,
        }
    }
    /// A tool result answering `call_id`.
    pub fn tool(call_id: &str, text: impl Into<String>, is_error: bool) -> Self {
        Message {
            role: Role::Tool,
            content: text.into(),
            tool_calls: Vec::new(),
            tool_call_id: Some(call_id.to_string()),
            is_error,
        }
    }
}

/// A tool the model may call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolSpec {
    /// Its name (letters, digits, `_` and `-`, at most 64: what every provider accepts).
    pub name: String,
    /// What it does, for the model.
    #[serde(default)]
    pub description: String,
    /// JSON Schema of its arguments (an object schema).
    pub input_schema: Value,
}

/// One call to a model, in the provider-neutral shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatRequest {
    /// The provider's model id (`gpt-4o-mini`, `claude-sonnet-4-5`, ...).
    pub model: String,
    /// The system prompt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    /// The conversation so far.
    pub messages: Vec<Message>,
    /// Tools the model may call.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tools: Vec<ToolSpec>,
    /// Most tokens the model may write.
    pub max_tokens: u32,
    /// Sampling temperature.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    /// Ask for a JSON object as the answer (OpenAI's `response_format: json_object`; for
    /// Anthropic the system prompt says so).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub json: bool,
}

/// Tokens one call used, as the provider reported them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenUsage {
    /// Prompt tokens (including cached ones).
    pub input: u64,
    /// Completion tokens.
    pub output: u64,
    /// Prompt tokens served from the provider's prompt cache.
    #[serde(default)]
    pub cached_input: u64,
}

/// A model's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatResponse {
    /// The text of the answer (empty when it only calls tools).
    pub text: String,
    /// Tools the model asks to call.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// Why it stopped, normalised: `stop`, `tool_calls`, `length`, or the provider's word.
    pub finish_reason: String,
    /// Tokens used.
    pub usage: TokenUsage,
    /// The model id the provider says answered.
    #[serde(default)]
    pub model: String,
}

/// What can go wrong calling a provider.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ProviderError {
    /// 429: too many requests; `retry_after` is the provider's `Retry-After`, if any.
    #[error("rate limited by the provider{}", .retry_after.map(|d| format!(" (retry after {})", humantime::format_duration(d))).unwrap_or_default())]
    RateLimited {
        /// How long the provider asks to wait.
        retry_after: Option<std::time::Duration>,
    },
    /// No answer within the time limit.
    #[error("no answer within {}", humantime::format_duration(*.0))]
    Timeout(std::time::Duration),
    /// Connection trouble or a 5xx (or 408/409/529): worth trying again or elsewhere.
    #[error("provider unavailable: {0}")]
    Unavailable(String),
    /// A 4xx other than 408/409/429: the request itself is wrong (bad key, unknown model,
    /// too long); trying again will not help.
    #[error("provider refused the request: {0}")]
    Rejected(String),
    /// The answer does not follow the protocol.
    #[error("unreadable answer from the provider: {0}")]
    Protocol(String),
}

impl ProviderError {
    /// Whether another attempt (here or at another provider) may succeed.
    pub fn is_retryable(&self) -> bool {
        !matches!(self, ProviderError::Rejected(_))
    }
}

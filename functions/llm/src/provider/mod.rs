//! Clients of the two provider protocols: OpenAI-compatible chat completions (OpenAI,
//! vLLM, Ollama, Gemini's compatible endpoint, ...) and Anthropic's Messages API, both
//! with and without streaming, both with tool calls.

use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::mpsc::UnboundedSender;

use crate::chat::{ChatRequest, ChatResponse, ProviderError};

/// Which wire protocol an endpoint speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// `POST {base_url}/chat/completions`, bearer key.
    Openai,
    /// `POST {base_url}/v1/messages`, `x-api-key` and `anthropic-version` headers.
    Anthropic,
}

/// Where and how to reach one provider.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// The protocol.
    pub protocol: Protocol,
    /// Base URL: `https://api.openai.com/v1` (OpenAI-compatible: the path before
    /// `/chat/completions`), `https://api.anthropic.com` (Anthropic: the path before `/v1/messages`).
    pub base_url: url::Url,
    /// The API key (already resolved from its secret), if the endpoint needs one.
    pub api_key: Option<String>,
    /// Time limit of one call, streaming included.
    pub timeout: Duration,
}

/// One provider endpoint.
pub trait Provider: Send + Sync {
    /// Calls the model. With `stream`, asks the provider to stream and sends each piece of
    /// the answer's text to `stream` as it arrives; the response is the same either way.
    fn chat<'a>(
        &'a self,
        req: &'a ChatRequest,
        stream: Option<&'a UnboundedSender<String>>,
    ) -> BoxFuture<'a, Result<ChatResponse, ProviderError>>;
}

//! Clients of the two provider protocols: OpenAI-compatible chat completions (OpenAI,
//! vLLM, Ollama, Gemini's compatible endpoint, ...) and Anthropic's Messages API, both
//! with and without streaming, both with tool calls.

pub mod anthropic;
pub mod openai;

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
#[derive(Clone)]
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

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key never reaches a log.
        f.debug_struct("Endpoint")
            .field("protocol", &self.protocol)
            .field("base_url", &self.base_url.as_str())
            .field("api_key", &self.api_key.as_ref().map(|_| "***"))
            .field("timeout", &self.timeout)
            .finish()
    }
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

/// The client of `endpoint`'s protocol.
pub fn connect(endpoint: Endpoint, http: reqwest::Client) -> Box<dyn Provider> {
    match endpoint.protocol {
        Protocol::Openai => Box::new(openai::OpenAi::new(endpoint, http)),
        Protocol::Anthropic => Box::new(anthropic::Anthropic::new(endpoint, http)),
    }
}

/// `base_url` followed by `path`, whether or not the base ends with a slash (`Url::join`
/// would drop the base's last segment, such as OpenAI's `/v1`).
fn endpoint_url(base: &url::Url, path: &str) -> String {
    format!("{}{path}", base.as_str().trim_end_matches('/'))
}

/// Runs one call under the endpoint's time limit, streaming included.
async fn within<T>(
    limit: Duration,
    call: impl std::future::Future<Output = Result<T, ProviderError>>,
) -> Result<T, ProviderError> {
    tokio::time::timeout(limit, call)
        .await
        .unwrap_or(Err(ProviderError::Timeout(limit)))
}

/// Sends `body` to `url`; a response that is not a success becomes its [`ProviderError`].
async fn post(
    http: &reqwest::Client,
    url: &str,
    headers: reqwest::header::HeaderMap,
    body: &serde_json::Value,
    limit: Duration,
) -> Result<reqwest::Response, ProviderError> {
    let resp = http
        .post(url)
        .headers(headers)
        .json(body)
        .send()
        .await
        .map_err(|e| transport_error(url, &e, limit))?;
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let retry = retry_after(resp.headers(), std::time::SystemTime::now());
    let body = resp
        .bytes()
        .await
        .map_err(|e| transport_error(url, &e, limit))?;
    Err(status_error(url, status.as_u16(), retry, &body))
}

/// A reqwest failure: its time limit, or trouble reaching the provider.
fn transport_error(url: &str, e: &reqwest::Error, limit: Duration) -> ProviderError {
    if e.is_timeout() {
        return ProviderError::Timeout(limit);
    }
    // reqwest's own message is terse ("error sending request"); the cause says why.
    let mut message = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        message = format!("{message}: {s}");
        source = s.source();
    }
    ProviderError::Unavailable(format!("{url}: {message}"))
}

/// The error an HTTP status means; `body` supplies the provider's message.
fn status_error(
    url: &str,
    status: u16,
    retry_after: Option<Duration>,
    body: &[u8],
) -> ProviderError {
    let said = format!("{url} answered {status}: {}", error_message(body));
    match status {
        429 => ProviderError::RateLimited { retry_after },
        408 | 409 | 529 | 500..=599 => ProviderError::Unavailable(said),
        400..=499 => ProviderError::Rejected(said),
        _ => ProviderError::Protocol(said),
    }
}

/// The message in an error body: `error.message` (OpenAI and Anthropic), `error` or
/// `message` (other compatible servers), else the body itself, shortened.
fn error_message(body: &[u8]) -> String {
    let json: Option<serde_json::Value> = serde_json::from_slice(body).ok();
    let from_json = json.as_ref().and_then(|v| {
        v.pointer("/error/message")
            .or_else(|| v.get("error").filter(|e| e.is_string()))
            .or_else(|| v.get("message"))
            .and_then(serde_json::Value::as_str)
            .map(str::to_string)
    });
    from_json.unwrap_or_else(|| {
        let text = String::from_utf8_lossy(body);
        let text = text.trim();
        match text.char_indices().nth(300) {
            Some((cut, _)) => format!("{}...", &text[..cut]),
            None if text.is_empty() => "(empty body)".to_string(),
            None => text.to_string(),
        }
    })
}

/// How long the provider asks to wait: `retry-after-ms` (milliseconds, OpenAI), else
/// `Retry-After` in seconds or as an HTTP date (counted from `now`).
fn retry_after(
    headers: &reqwest::header::HeaderMap,
    now: std::time::SystemTime,
) -> Option<Duration> {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    let seconds = |s: &str| {
        s.parse::<f64>()
            .ok()
            .filter(|n| n.is_finite() && *n >= 0.0)
            .map(Duration::from_secs_f64)
    };
    if let Some(ms) = header("retry-after-ms").and_then(seconds) {
        return Some(ms / 1000);
    }
    let value = header("retry-after")?;
    seconds(value).or_else(|| {
        httpdate::parse_http_date(value)
            .ok()
            .map(|at| at.duration_since(now).unwrap_or(Duration::ZERO))
    })
}

/// Reads a whole JSON answer.
async fn read_json(
    resp: reqwest::Response,
    url: &str,
    limit: Duration,
) -> Result<serde_json::Value, ProviderError> {
    let body = resp
        .bytes()
        .await
        .map_err(|e| transport_error(url, &e, limit))?;
    serde_json::from_slice(&body).map_err(|e| {
        ProviderError::Protocol(format!("{url} answered with JSON that does not parse: {e}"))
    })
}

/// Whether a response is JSON rather than the event stream asked for (some compatible
/// servers ignore `stream`).
fn is_json(resp: &reqwest::Response) -> bool {
    resp.headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"))
}

/// One server-sent event.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SseEvent {
    /// The `event:` field, empty when absent (OpenAI sends none).
    event: String,
    /// The `data:` lines, joined with newlines.
    data: String,
}

/// Splits a byte stream into server-sent events; a chunk may end anywhere, even inside a
/// UTF-8 character.
#[derive(Debug, Default)]
struct SseParser {
    buf: Vec<u8>,
    event: String,
    data: String,
    has_data: bool,
}

impl SseParser {
    fn push(&mut self, chunk: &[u8]) -> Result<Vec<SseEvent>, ProviderError> {
        self.buf.extend_from_slice(chunk);
        let mut out = Vec::new();
        let mut start = 0;
        while let Some(n) = self.buf[start..].iter().position(|&b| b == b'\n') {
            let end = start + n;
            let line = self.buf[start..end]
                .strip_suffix(b"\r")
                .unwrap_or(&self.buf[start..end]);
            let line = std::str::from_utf8(line)
                .map_err(|e| ProviderError::Protocol(format!("event stream is not UTF-8: {e}")))?
                .to_string();
            self.line(&line, &mut out);
            start = end + 1;
        }
        self.buf.drain(..start);
        Ok(out)
    }

    /// The last event when the stream ends without a blank line after it.
    fn finish(&mut self) -> Result<Option<SseEvent>, ProviderError> {
        let mut out = Vec::new();
        if !self.buf.is_empty() {
            let rest = std::mem::take(&mut self.buf);
            let line = std::str::from_utf8(&rest)
                .map_err(|e| ProviderError::Protocol(format!("event stream is not UTF-8: {e}")))?
                .to_string();
            self.line(&line, &mut out);
        }
        self.line("", &mut out);
        Ok(out.pop())
    }

    fn line(&mut self, line: &str, out: &mut Vec<SseEvent>) {
        if line.is_empty() {
            if self.has_data {
                out.push(SseEvent {
                    event: std::mem::take(&mut self.event),
                    data: std::mem::take(&mut self.data),
                });
            }
            self.event.clear();
            self.has_data = false;
            return;
        }
        if line.starts_with(':') {
            return;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "event" => self.event = value.to_string(),
            "data" => {
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(value);
                self.has_data = true;
            }
            _ => {}
        }
    }
}

/// The events of a streamed response, read as they arrive.
struct SseStream<'a> {
    resp: reqwest::Response,
    parser: SseParser,
    queue: std::collections::VecDeque<SseEvent>,
    ended: bool,
    url: &'a str,
    limit: Duration,
}

impl<'a> SseStream<'a> {
    fn new(resp: reqwest::Response, url: &'a str, limit: Duration) -> Self {
        SseStream {
            resp,
            parser: SseParser::default(),
            queue: Default::default(),
            ended: false,
            url,
            limit,
        }
    }

    async fn next(&mut self) -> Result<Option<SseEvent>, ProviderError> {
        loop {
            if let Some(e) = self.queue.pop_front() {
                return Ok(Some(e));
            }
            if self.ended {
                return Ok(None);
            }
            match self
                .resp
                .chunk()
                .await
                .map_err(|e| transport_error(self.url, &e, self.limit))?
            {
                Some(bytes) => self.queue.extend(self.parser.push(&bytes)?),
                None => {
                    self.ended = true;
                    self.queue.extend(self.parser.finish()?);
                }
            }
        }
    }
}

/// Parses one event's data as JSON.
fn event_json(e: &SseEvent) -> Result<serde_json::Value, ProviderError> {
    serde_json::from_str(&e.data).map_err(|err| {
        ProviderError::Protocol(format!("stream event `{}` is not JSON: {err}", e.data))
    })
}

/// Sends a piece of text to the stream's listener, if any. A listener that went away
/// does not stop the call: its answer is still recorded.
fn emit(stream: Option<&UnboundedSender<String>>, piece: &str) {
    if let Some(tx) = stream
        && !piece.is_empty()
    {
        let _ = tx.send(piece.to_string());
    }
}

/// Reads a JSON number of tokens; absent means 0.
fn tokens(v: &serde_json::Value, pointer: &str) -> u64 {
    v.pointer(pointer)
        .and_then(serde_json::Value::as_u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_events_survive_any_chunking() {
        let body = "event: a\r\ndata: {\"x\": \"é\"}\r\n\r\n: comment\n\ndata: one\ndata: two\n\ndata: last";
        let whole = {
            let mut p = SseParser::default();
            let mut v = p.push(body.as_bytes()).unwrap();
            v.extend(p.finish().unwrap());
            v
        };
        assert_eq!(
            whole,
            vec![
                SseEvent {
                    event: "a".into(),
                    data: "{\"x\": \"é\"}".into()
                },
                SseEvent {
                    event: String::new(),
                    data: "one\ntwo".into()
                },
                SseEvent {
                    event: String::new(),
                    data: "last".into()
                },
            ]
        );
        // Byte by byte, splitting the two-byte `é` too.
        let mut p = SseParser::default();
        let mut v = Vec::new();
        for b in body.as_bytes() {
            v.extend(p.push(std::slice::from_ref(b)).unwrap());
        }
        v.extend(p.finish().unwrap());
        assert_eq!(v, whole);
    }

    #[test]
    fn retry_after_in_milliseconds_seconds_or_a_date() {
        use reqwest::header::{HeaderMap, HeaderValue};
        let now = std::time::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let h = |pairs: &[(&'static str, &str)]| {
            let mut m = HeaderMap::new();
            for (k, v) in pairs {
                m.insert(*k, HeaderValue::from_str(v).unwrap());
            }
            m
        };
        assert_eq!(
            retry_after(&h(&[("retry-after", "7")]), now),
            Some(Duration::from_secs(7))
        );
        assert_eq!(
            retry_after(&h(&[("retry-after", "1.5")]), now),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(
            retry_after(&h(&[("retry-after", "7"), ("retry-after-ms", "250")]), now),
            Some(Duration::from_millis(250))
        );
        let later = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(
            retry_after(&h(&[("retry-after", &later)]), now),
            Some(Duration::from_secs(30))
        );
        let past = httpdate::fmt_http_date(now - Duration::from_secs(30));
        assert_eq!(
            retry_after(&h(&[("retry-after", &past)]), now),
            Some(Duration::ZERO)
        );
        assert_eq!(retry_after(&h(&[("retry-after", "soon")]), now), None);
        assert_eq!(retry_after(&h(&[]), now), None);
    }

    #[test]
    fn statuses_map_to_errors_with_the_providers_message() {
        let openai = br#"{"error": {"message": "The model `x` does not exist", "type": "invalid_request_error"}}"#;
        assert_eq!(
            status_error("u", 404, None, openai),
            ProviderError::Rejected("u answered 404: The model `x` does not exist".into())
        );
        let anthropic =
            br#"{"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}"#;
        assert_eq!(
            status_error("u", 529, None, anthropic),
            ProviderError::Unavailable("u answered 529: Overloaded".into())
        );
        for s in [408, 409, 500, 502, 503] {
            assert!(
                matches!(
                    status_error("u", s, None, b""),
                    ProviderError::Unavailable(_)
                ),
                "{s}"
            );
        }
        let wait = Some(Duration::from_secs(3));
        assert_eq!(
            status_error("u", 429, wait, b"{}"),
            ProviderError::RateLimited { retry_after: wait }
        );
        assert_eq!(
            status_error("u", 401, None, b"<html>nope</html>"),
            ProviderError::Rejected("u answered 401: <html>nope</html>".into())
        );
        assert_eq!(
            status_error("u", 400, None, br#"{"error": "bad field"}"#),
            ProviderError::Rejected("u answered 400: bad field".into())
        );
    }
}

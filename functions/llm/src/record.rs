//! Durable calls. A model's response is written to the `AOB_CALLS` bucket, keyed by the
//! run and a digest of what was asked (model, messages, tools, parameters, and where in
//! the run it was asked), before the step's result is sent. A retry after a crash, or a
//! replay, finds it there and uses it instead of calling and paying again.

use async_nats::jetstream::kv;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::chat::{ChatRequest, ChatResponse};
use crate::kv::{StoreError, key_part};

/// One recorded call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Recorded {
    /// The configured model name that answered.
    pub model: String,
    /// Its provider.
    pub provider: String,
    /// The answer.
    pub response: ChatResponse,
    /// What it cost, in US dollars.
    pub cost_usd: f64,
    /// How long the call took, in ms.
    pub took_ms: u64,
    /// When it was recorded (ms since the epoch).
    pub at_ms: u64,
}

/// The digest that keys a call: of the request and of `scope` (the step and position in
/// the run that asks), hex.
pub fn digest(scope: &str, req: &ChatRequest) -> String {
    let mut h = Sha256::new();
    h.update(scope.as_bytes());
    h.update([0]);
    // Serializing the neutral request type is canonical: fields in declaration order.
    h.update(serde_json::to_vec(req).unwrap_or_default());
    hex(&h.finalize())
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The recorded calls.
#[derive(Clone)]
pub struct Recorder {
    kv: kv::Store,
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Recorder")
    }
}

impl Recorder {
    /// Records in `kv` (the `AOB_CALLS` bucket).
    pub fn new(kv: kv::Store) -> Self {
        Recorder { kv }
    }

    /// The key of call `digest` of a run.
    pub fn key(tenant: &str, run: &str, digest: &str) -> String {
        format!("{}.{}.{digest}", key_part(tenant), key_part(run))
    }

    /// The recorded call under `key`, if any.
    pub async fn get<T: serde::de::DeserializeOwned>(
        &self,
        key: &str,
    ) -> Result<Option<T>, StoreError> {
        let v = self
            .kv
            .get(key)
            .await
            .map_err(|e| StoreError(format!("reading recorded call {key}: {e}")))?;
        match v {
            None => Ok(None),
            Some(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| StoreError(format!("recorded call {key} is unreadable: {e}"))),
        }
    }

    /// Records a call; `true` if this record is the one kept. The first record of a key
    /// wins: a second writer (a duplicate delivery that called too) must use the first
    /// answer (`false`), so every reader, and every later turn, sees one.
    pub async fn put<T: Serialize>(&self, key: &str, value: &T) -> Result<bool, StoreError> {
        let body = serde_json::to_vec(value)
            .map_err(|e| StoreError(format!("encoding recorded call {key}: {e}")))?;
        match self.kv.create(key, body.into()).await {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(StoreError(format!("recording call {key}: {e}"))),
        }
    }
}

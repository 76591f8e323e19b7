//! Large payloads go to object storage and travel by reference.
//!
//! A value whose JSON is larger than the threshold is written to
//! `<prefix>/payloads/<tenant>/<run>/<key>.<digest>.json` and replaced by
//! `{"$aob_ref": "<path>", "size": <bytes>}`. [`PayloadStore::hydrate`] puts the values back
//! wherever such references appear, so handlers only ever see values. Object names carry
//! the first 128 bits of the value's SHA-256 and are written create-only: a retried write
//! of the same value adds nothing, and a different value under the same key gets another
//! name, so an accepted payload never changes.

use std::sync::Arc;

use object_store::{ObjectStore, ObjectStoreExt, PutPayload, path::Path};
use serde_json::{Value, json};

use crate::{Error, Result};

/// The key marking a reference.
pub const REF_KEY: &str = "$aob_ref";

/// Default offload threshold: 256 KiB, a quarter of nats-server's default 1 MiB max payload.
pub const DEFAULT_THRESHOLD: usize = 256 * 1024;

/// Object storage for large payloads.
#[derive(Clone)]
pub struct PayloadStore {
    store: Arc<dyn ObjectStore>,
    prefix: Path,
    threshold: usize,
}

impl std::fmt::Debug for PayloadStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PayloadStore")
            .field("prefix", &self.prefix)
            .field("threshold", &self.threshold)
            .finish()
    }
}

impl PayloadStore {
    /// Opens a store from a URL (`file:///abs/dir`, `memory:///`); values larger than
    /// `threshold` bytes are offloaded.
    pub fn from_url(url: &str, threshold: usize) -> Result<Self> {
        let parsed = url::Url::parse(url)
            .map_err(|e| Error::Config(format!("payload store URL `{url}`: {e}")))?;
        if parsed.scheme() == "file" {
            std::fs::create_dir_all(parsed.path()).map_err(|e| {
                Error::Config(format!(
                    "payload store `{url}`: cannot create {}: {e}",
                    parsed.path()
                ))
            })?;
        }
        let (store, prefix) = object_store::parse_url(&parsed)
            .map_err(|e| Error::Config(format!("payload store URL `{url}`: {e}")))?;
        Ok(PayloadStore {
            store: Arc::from(store),
            prefix,
            threshold,
        })
    }

    /// The offload threshold in bytes.
    pub fn threshold(&self) -> usize {
        self.threshold
    }

    /// Returns `value` unchanged when small, or a reference after writing it under `key`
    /// (a `/`-separated relative name such as `default/<run>/fetch-a1.output`).
    pub async fn offload(&self, value: Value, key: &str) -> Result<Value> {
        self.offload_with_threshold(value, key, self.threshold)
            .await
    }

    /// Like [`PayloadStore::offload`] with another threshold (0 = always offload).
    pub async fn offload_with_threshold(
        &self,
        value: Value,
        key: &str,
        threshold: usize,
    ) -> Result<Value> {
        if reference(&value).is_some() {
            return Ok(value);
        }
        let bytes = serde_json::to_vec(&value)
            .map_err(|e| Error::Payload(format!("serializing {key}: {e}")))?;
        if bytes.len() <= threshold {
            return Ok(value);
        }
        // Named by its content and written create-only: once a reference is handed out,
        // what it points to never changes, whoever writes under the same key later.
        let digest = aob_model::audit::sha256_hex(&bytes);
        let rel = format!("payloads/{key}.{}.json", &digest[..32]);
        let path = self.path(&rel);
        let size = bytes.len();
        let create = object_store::PutOptions {
            mode: object_store::PutMode::Create,
            ..Default::default()
        };
        match self
            .store
            .put_opts(&path, PutPayload::from(bytes), create)
            .await
        {
            // The same content was written before: the same reference.
            Ok(_) | Err(object_store::Error::AlreadyExists { .. }) => {}
            Err(e) => return Err(Error::Payload(format!("writing {path}: {e}"))),
        }
        Ok(json!({ REF_KEY: rel, "size": size }))
    }

    fn path(&self, rel: &str) -> Path {
        let mut parts: Vec<String> = self
            .prefix
            .parts()
            .map(|p| p.as_ref().to_string())
            .collect();
        parts.extend(rel.split('/').filter(|s| !s.is_empty()).map(str::to_string));
        Path::from_iter(parts)
    }

    /// Replaces every reference inside `value` by the value it points to.
    pub async fn hydrate(&self, value: Value) -> Result<Value> {
        if !contains_ref(&value) {
            return Ok(value);
        }
        Box::pin(self.hydrate_inner(value)).await
    }

    async fn hydrate_inner(&self, value: Value) -> Result<Value> {
        match value {
            Value::Object(map) => {
                if let Some(rel) = reference(&Value::Object(map.clone())) {
                    let path = self.path(&rel);
                    let got = self
                        .store
                        .get(&path)
                        .await
                        .map_err(|e| Error::Payload(format!("reading {path}: {e}")))?;
                    let bytes = got
                        .bytes()
                        .await
                        .map_err(|e| Error::Payload(format!("reading {path}: {e}")))?;
                    return serde_json::from_slice(&bytes)
                        .map_err(|e| Error::Payload(format!("{path} is not JSON: {e}")));
                }
                let mut out = serde_json::Map::with_capacity(map.len());
                for (k, v) in map {
                    let v = if contains_ref(&v) {
                        Box::pin(self.hydrate_inner(v)).await?
                    } else {
                        v
                    };
                    out.insert(k, v);
                }
                Ok(Value::Object(out))
            }
            Value::Array(items) => {
                let mut out = Vec::with_capacity(items.len());
                for v in items {
                    out.push(if contains_ref(&v) {
                        Box::pin(self.hydrate_inner(v)).await?
                    } else {
                        v
                    });
                }
                Ok(Value::Array(out))
            }
            other => Ok(other),
        }
    }
}

/// The path of a reference, if `value` is one.
pub fn reference(value: &Value) -> Option<String> {
    let map = value.as_object()?;
    if map.len() <= 2 {
        map.get(REF_KEY)?.as_str().map(str::to_string)
    } else {
        None
    }
}

/// True when a reference appears anywhere in `value`.
pub fn contains_ref(value: &Value) -> bool {
    match value {
        Value::Object(map) => map.contains_key(REF_KEY) || map.values().any(contains_ref),
        Value::Array(items) => items.iter().any(contains_ref),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn large_values_round_trip_through_files() {
        let dir = tempfile_dir();
        let store = PayloadStore::from_url(&format!("file://{}", dir.display()), 1024).unwrap();
        let small = json!({"a": 1});
        assert_eq!(
            store.offload(small.clone(), "t/r/small").await.unwrap(),
            small
        );
        let big = json!({"blob": "x".repeat(5000)});
        let r = store.offload(big.clone(), "t/r/big").await.unwrap();
        let path = reference(&r).unwrap();
        assert!(path.starts_with("payloads/t/r/big."), "{path}");
        assert!(dir.join(&path).is_file());
        let nested = json!({"steps": {"a": {"output": r}}, "n": [1, 2]});
        let back = store.hydrate(nested).await.unwrap();
        assert_eq!(back["steps"]["a"]["output"], big);
        std::fs::remove_dir_all(dir).ok();
    }

    /// An accepted payload never changes: another value under the same key gets another
    /// name, and writing the same value again gives the same reference.
    #[tokio::test]
    async fn offloaded_payloads_are_immutable() {
        let dir = tempfile_dir();
        let store = PayloadStore::from_url(&format!("file://{}", dir.display()), 0).unwrap();
        let first = store.offload(json!({"v": 1}), "t/r/out").await.unwrap();
        let again = store.offload(json!({"v": 1}), "t/r/out").await.unwrap();
        let other = store.offload(json!({"v": 2}), "t/r/out").await.unwrap();
        assert_eq!(first, again);
        assert_ne!(reference(&first), reference(&other));
        assert_eq!(store.hydrate(first).await.unwrap(), json!({"v": 1}));
        assert_eq!(store.hydrate(other).await.unwrap(), json!({"v": 2}));
        std::fs::remove_dir_all(dir).ok();
    }

    fn tempfile_dir() -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("aob-payload-{}", ulid::Ulid::new()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}

//! Read-modify-write of one JSON value in a NATS KV bucket by compare-and-set: the one
//! primitive the budget ledger and the shared rate limits are built on.
//!
//! A [`Cache`] keeps the value and revision this process last wrote per key, so that the
//! next change of a key it alone is changing (a run's ledger, the limits window of this
//! minute) is one write instead of a read and a write; a key it never wrote is first
//! guessed absent, so a new key (a new run's ledger) is one create. A guess is only a
//! guess: a write on it fails if anyone wrote since, and is then retried from a fresh
//! read; and a decision not to write (a refusal, nothing to change) is never taken on a
//! guess.

use std::collections::HashMap;
use std::sync::Mutex;

use async_nats::jetstream::kv;
use bytes::Bytes;
use serde::{Serialize, de::DeserializeOwned};

/// Trouble with the store (never a lost compare-and-set: that is retried).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct StoreError(pub String);

/// Keys may hold only `[-_=/.A-Za-z0-9]`; anything else becomes `_`.
pub fn key_part(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '=') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Most keys a [`Cache`] remembers; past it, it starts again empty.
const CACHE_KEYS: usize = 10_000;

/// The value and revision last written per key by this process.
#[derive(Debug, Default)]
pub struct Cache(Mutex<HashMap<String, (Bytes, u64)>>);

impl Cache {
    fn get(&self, key: &str) -> Option<(Bytes, u64)> {
        self.0.lock().ok().and_then(|m| m.get(key).cloned())
    }
    fn put(&self, key: &str, value: Bytes, revision: u64) {
        if let Ok(mut m) = self.0.lock() {
            if m.len() >= CACHE_KEYS && !m.contains_key(key) {
                m.clear();
            }
            m.insert(key.to_string(), (value, revision));
        }
    }
    fn forget(&self, key: &str) {
        if let Ok(mut m) = self.0.lock() {
            m.remove(key);
        }
    }
}

async fn read(store: &kv::Store, key: &str) -> Result<Option<(Bytes, u64, bool)>, StoreError> {
    let entry = store
        .entry(key)
        .await
        .map_err(|e| StoreError(format!("reading {key}: {e}")))?;
    Ok(entry.map(|e| {
        let live = e.operation == kv::Operation::Put;
        (e.value, e.revision, live)
    }))
}

/// Reads `key` (or takes it from `cache`), lets `f` decide, writes the new value only if
/// nobody wrote in between, and tries again from a fresh read if somebody did. `f`
/// returns `Ok(Some(new))` to write, `Ok(None)` to leave the value as it is, or `Err` to
/// stop; its second value is handed back either way.
pub async fn update<T, R, E>(
    store: &kv::Store,
    cache: &Cache,
    key: &str,
    mut f: impl FnMut(Option<T>) -> Result<(Option<T>, R), E>,
) -> Result<Result<R, E>, StoreError>
where
    T: Serialize + DeserializeOwned,
{
    // First a guess: what this process last wrote, or nothing at all.
    let mut guess = Some(cache.get(key));
    loop {
        let from_cache = guess.is_some();
        let (current, revision) = match guess.take() {
            Some(Some((bytes, rev))) => (Some(bytes), Some(rev)),
            Some(None) => (None, None),
            None => match read(store, key).await? {
                Some((bytes, rev, true)) => (Some(bytes), Some(rev)),
                Some((_, rev, false)) => (None, Some(rev)),
                None => (None, None),
            },
        };
        let value = match current {
            Some(b) => Some(
                serde_json::from_slice::<T>(&b)
                    .map_err(|err| StoreError(format!("{key} holds unreadable JSON: {err}")))?,
            ),
            None => None,
        };
        let (new, out) = match f(value) {
            Ok((Some(new), out)) => (new, out),
            // Not writing is decided on what the store holds, never on the cache.
            Ok((None, _)) | Err(_) if from_cache => {
                cache.forget(key);
                continue;
            }
            Ok((None, out)) => return Ok(Ok(out)),
            Err(e) => return Ok(Err(e)),
        };
        let body: Bytes = serde_json::to_vec(&new)
            .map_err(|e| StoreError(format!("encoding {key}: {e}")))?
            .into();
        let written = match revision {
            None => match store.create(key, body.clone()).await {
                Ok(rev) => Some(rev),
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => None,
                Err(e) => return Err(StoreError(format!("creating {key}: {e}"))),
            },
            Some(rev) => match store.update(key, body.clone(), rev).await {
                Ok(rev) => Some(rev),
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => None,
                Err(e) => return Err(StoreError(format!("updating {key}: {e}"))),
            },
        };
        match written {
            Some(rev) => {
                cache.put(key, body, rev);
                return Ok(Ok(out));
            }
            None => cache.forget(key),
        }
    }
}

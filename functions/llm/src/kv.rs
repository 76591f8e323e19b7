//! Read-modify-write of one JSON value in a NATS KV bucket by compare-and-set: the one
//! primitive the budget ledger and the shared rate limits are built on.

use async_nats::jetstream::kv;
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

/// Reads `key`, lets `f` decide, writes the new value only if nobody wrote in between,
/// and tries again from the read if somebody did. `f` returns `Ok(Some(new))` to write,
/// `Ok(None)` to leave the value as it is, or `Err` to stop; its second value is handed
/// back either way.
pub async fn update<T, R, E>(
    store: &kv::Store,
    key: &str,
    mut f: impl FnMut(Option<T>) -> Result<(Option<T>, R), E>,
) -> Result<Result<R, E>, StoreError>
where
    T: Serialize + DeserializeOwned,
{
    loop {
        let entry = store
            .entry(key)
            .await
            .map_err(|e| StoreError(format!("reading {key}: {e}")))?;
        let (current, revision) = match entry {
            Some(e) if e.operation == kv::Operation::Put => {
                let v = serde_json::from_slice::<T>(&e.value)
                    .map_err(|err| StoreError(format!("{key} holds unreadable JSON: {err}")))?;
                (Some(v), Some(e.revision))
            }
            Some(e) => (None, Some(e.revision)),
            None => (None, None),
        };
        let (new, out) = match f(current) {
            Ok(x) => x,
            Err(e) => return Ok(Err(e)),
        };
        let Some(new) = new else {
            return Ok(Ok(out));
        };
        let body = serde_json::to_vec(&new)
            .map_err(|e| StoreError(format!("encoding {key}: {e}")))?
            .into();
        let written = match revision {
            None => match store.create(key, body).await {
                Ok(_) => true,
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => false,
                Err(e) => return Err(StoreError(format!("creating {key}: {e}"))),
            },
            Some(rev) => match store.update(key, body, rev).await {
                Ok(_) => true,
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => false,
                Err(e) => return Err(StoreError(format!("updating {key}: {e}"))),
            },
        };
        if written {
            return Ok(Ok(out));
        }
    }
}

//! Run state storage by compare-and-set: the NATS KV bucket in production, a memory twin
//! for tests, and one battery that checks both behave the same.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Mutex;

use async_nats::jetstream::kv;
use bytes::Bytes;

/// A compare-and-set write lost: someone else wrote since the revision read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conflict;

/// What can go wrong talking to the store (besides a [`Conflict`]).
#[derive(Debug, thiserror::Error)]
#[error("run store: {0}")]
pub struct StoreError(pub String);

/// Key → (value, revision), written only by compare-and-set.
pub trait RunStore: Send + Sync + 'static {
    /// The value and its revision.
    fn get(
        &self,
        key: &str,
    ) -> impl Future<Output = Result<Option<(Bytes, u64)>, StoreError>> + Send;
    /// Writes a key that must not exist yet.
    fn create(
        &self,
        key: &str,
        value: Bytes,
    ) -> impl Future<Output = Result<Result<u64, Conflict>, StoreError>> + Send;
    /// Writes a key whose revision must still be `revision`.
    fn update(
        &self,
        key: &str,
        value: Bytes,
        revision: u64,
    ) -> impl Future<Output = Result<Result<u64, Conflict>, StoreError>> + Send;
}

/// The `AOB_RUNS` bucket.
#[derive(Clone)]
pub struct NatsStore(pub kv::Store);

impl RunStore for NatsStore {
    async fn get(&self, key: &str) -> Result<Option<(Bytes, u64)>, StoreError> {
        let e = self
            .0
            .entry(key)
            .await
            .map_err(|e| StoreError(format!("reading {key}: {e}")))?;
        Ok(e.filter(|e| e.operation == kv::Operation::Put)
            .map(|e| (e.value, e.revision)))
    }

    async fn create(&self, key: &str, value: Bytes) -> Result<Result<u64, Conflict>, StoreError> {
        match self.0.create(key, value).await {
            Ok(rev) => Ok(Ok(rev)),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(Err(Conflict)),
            Err(e) => Err(StoreError(format!("creating {key}: {e}"))),
        }
    }

    async fn update(
        &self,
        key: &str,
        value: Bytes,
        revision: u64,
    ) -> Result<Result<u64, Conflict>, StoreError> {
        match self.0.update(key, value, revision).await {
            Ok(rev) => Ok(Ok(rev)),
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(Err(Conflict)),
            Err(e) => Err(StoreError(format!("updating {key}: {e}"))),
        }
    }
}

/// Last revision handed out, and key → (value, revision).
type Entries = (u64, HashMap<String, (Bytes, u64)>);

/// In-memory twin of [`NatsStore`].
#[derive(Default)]
pub struct MemoryStore {
    inner: Mutex<Entries>,
}

impl MemoryStore {
    fn entries(&self) -> Result<std::sync::MutexGuard<'_, Entries>, StoreError> {
        self.inner.lock().map_err(|_| StoreError("poisoned".into()))
    }
}

impl RunStore for MemoryStore {
    async fn get(&self, key: &str) -> Result<Option<(Bytes, u64)>, StoreError> {
        let g = self.entries()?;
        Ok(g.1.get(key).cloned())
    }

    async fn create(&self, key: &str, value: Bytes) -> Result<Result<u64, Conflict>, StoreError> {
        let mut g = self.entries()?;
        if g.1.contains_key(key) {
            return Ok(Err(Conflict));
        }
        g.0 += 1;
        let rev = g.0;
        g.1.insert(key.to_string(), (value, rev));
        Ok(Ok(rev))
    }

    async fn update(
        &self,
        key: &str,
        value: Bytes,
        revision: u64,
    ) -> Result<Result<u64, Conflict>, StoreError> {
        let mut g = self.entries()?;
        match g.1.get(key) {
            Some((_, r)) if *r == revision => {}
            _ => return Ok(Err(Conflict)),
        }
        g.0 += 1;
        let rev = g.0;
        g.1.insert(key.to_string(), (value, rev));
        Ok(Ok(rev))
    }
}

/// The shared battery: run it against every [`RunStore`]; panics on the first difference.
pub async fn battery<S: RunStore>(store: &S, prefix: &str) {
    let k = format!("{prefix}.battery");
    assert_eq!(
        store.get(&k).await.ok().flatten(),
        None,
        "fresh key is absent"
    );
    let r1 = store
        .create(&k, Bytes::from_static(b"one"))
        .await
        .ok()
        .and_then(Result::ok);
    let Some(r1) = r1 else {
        panic!("create of a fresh key failed")
    };
    assert_eq!(
        store.create(&k, Bytes::from_static(b"again")).await.ok(),
        Some(Err(Conflict)),
        "create twice conflicts"
    );
    assert_eq!(
        store.get(&k).await.ok().flatten(),
        Some((Bytes::from_static(b"one"), r1))
    );
    let r2 = store
        .update(&k, Bytes::from_static(b"two"), r1)
        .await
        .ok()
        .and_then(Result::ok);
    let Some(r2) = r2 else {
        panic!("update at the current revision failed")
    };
    assert!(r2 > r1, "revisions grow");
    assert_eq!(
        store
            .update(&k, Bytes::from_static(b"stale"), r1)
            .await
            .ok(),
        Some(Err(Conflict)),
        "stale revision conflicts"
    );
    assert_eq!(
        store.get(&k).await.ok().flatten(),
        Some((Bytes::from_static(b"two"), r2))
    );
    assert_eq!(
        store
            .update(&format!("{k}.none"), Bytes::from_static(b"x"), 1)
            .await
            .ok(),
        Some(Err(Conflict)),
        "update of a missing key conflicts"
    );
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn memory_store_passes_the_battery() {
        super::battery(&super::MemoryStore::default(), "t").await;
    }
}

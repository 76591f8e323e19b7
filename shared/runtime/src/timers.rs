//! Durable timers: a timer is a key in the `AOB_TIMERS` bucket holding a message to publish
//! at a due time. The timer service watches the bucket (existing keys first, so timers
//! survive restarts), publishes each message when due with its deterministic
//! `Nats-Msg-Id`, then deletes the key. No message is held unacknowledged while waiting,
//! and several services may run at once: JetStream drops the duplicate publishes.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::{Error, Result, now_ms};

/// One timer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Timer {
    /// When to fire (ms since the Unix epoch).
    pub due_ms: u64,
    /// Subject to publish to.
    pub subject: String,
    /// `Nats-Msg-Id` of the publish.
    pub msg_id: String,
    /// Body to publish (JSON).
    pub body: serde_json::Value,
}

/// Sets timers.
#[derive(Clone)]
pub struct Timers {
    kv: kv::Store,
}

impl std::fmt::Debug for Timers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Timers")
    }
}

impl Timers {
    /// Binds to the `AOB_TIMERS` bucket.
    pub async fn open(js: &jetstream::Context) -> Result<Self> {
        let kv = js
            .get_key_value(aob_streams::TIMERS)
            .await
            .map_err(|e| Error::Topology(format!("bucket {}: {e}", aob_streams::TIMERS)))?;
        Ok(Timers { kv })
    }

    /// Sets (or replaces) the timer under `key` (`<tenant>.<run>.<name>`).
    pub async fn set(&self, key: &str, timer: &Timer) -> Result<()> {
        let body = serde_json::to_vec(timer).map_err(|e| Error::Payload(e.to_string()))?;
        self.kv
            .put(key, body.into())
            .await
            .map_err(|e| Error::Nats(format!("setting timer {key}: {e}")))?;
        Ok(())
    }

    /// Runs the timer service until `shutdown`.
    pub async fn serve(&self, js: jetstream::Context, shutdown: CancellationToken) -> Result<()> {
        let mut watch = self
            .kv
            .watch_with_history(">")
            .await
            .map_err(|e| Error::Nats(format!("watching {}: {e}", aob_streams::TIMERS)))?;
        let mut due: BTreeSet<(u64, String)> = BTreeSet::new();
        let mut timers: HashMap<String, Timer> = HashMap::new();
        loop {
            let next = due.iter().next().cloned();
            let sleep = match &next {
                Some((at, _)) => Duration::from_millis(at.saturating_sub(now_ms())),
                None => Duration::from_secs(3600),
            };
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                entry = watch.next() => {
                    let Some(entry) = entry else {
                        return Err(Error::Nats("timer watch ended".into()));
                    };
                    let entry = match entry {
                        Ok(e) => e,
                        Err(e) => {
                            tracing::warn!("timer watch: {e}");
                            continue;
                        }
                    };
                    if let Some(old) = timers.remove(&entry.key) {
                        due.remove(&(old.due_ms, entry.key.clone()));
                    }
                    if entry.operation == kv::Operation::Put {
                        match serde_json::from_slice::<Timer>(&entry.value) {
                            Ok(t) => {
                                due.insert((t.due_ms, entry.key.clone()));
                                timers.insert(entry.key, t);
                            }
                            Err(e) => {
                                tracing::warn!(key = %entry.key, "dropping a timer that is not valid: {e}");
                                let _ = self.kv.delete(&entry.key).await;
                            }
                        }
                    }
                }
                _ = tokio::time::sleep(sleep), if next.is_some() => {
                    let Some((at, key)) = next else { continue };
                    let Some(t) = timers.get(&key).cloned() else {
                        due.remove(&(at, key));
                        continue;
                    };
                    match fire(&js, &t).await {
                        Ok(()) => {
                            due.remove(&(at, key.clone()));
                            timers.remove(&key);
                            if let Err(e) = self.kv.delete(&key).await {
                                tracing::warn!(%key, "fired timer not deleted: {e}");
                            }
                        }
                        Err(e) => {
                            tracing::warn!(%key, "timer publish failed, retrying in 1s: {e}");
                            due.remove(&(at, key.clone()));
                            let retry = now_ms() + 1000;
                            due.insert((retry, key.clone()));
                            if let Some(t) = timers.get_mut(&key) {
                                t.due_ms = retry;
                            }
                        }
                    }
                }
            }
        }
    }
}

async fn fire(js: &jetstream::Context, t: &Timer) -> Result<()> {
    let body = serde_json::to_vec(&t.body).map_err(|e| Error::Payload(e.to_string()))?;
    crate::bus::publish(js, t.subject.clone(), &t.msg_id, body.into())
        .await?
        .await
        .map_err(|e| Error::Nats(format!("publishing timer to {}: {e}", t.subject)))?;
    Ok(())
}

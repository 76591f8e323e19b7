//! Durable timers: a timer is a key in the `AOB_TIMERS` bucket holding a message to publish
//! at a due time. The timer service watches the bucket (existing keys first, so timers
//! survive restarts), publishes each message when due with its deterministic
//! `Nats-Msg-Id`, then deletes the key if it still holds what fired. No message is held
//! unacknowledged while waiting. Several services may run (one per engine); one at a time
//! fires, the holder of a lease renewed in the bucket, and another takes over within the
//! lease's lifetime when it dies. A fired message is a duplicate JetStream drops if two
//! overlap for a moment.

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
    /// The trace context to publish it under (its run's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
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

    /// Deletes the timer under `key`, if any: its step or run ended, so it must not fire.
    pub async fn cancel(&self, key: &str) -> Result<()> {
        self.kv
            .delete(key)
            .await
            .map_err(|e| Error::Nats(format!("cancelling timer {key}: {e}")))
    }

    /// The timer under `key`, if set.
    pub async fn get(&self, key: &str) -> Result<Option<Timer>> {
        let entry = self
            .kv
            .entry(key)
            .await
            .map_err(|e| Error::Nats(format!("reading timer {key}: {e}")))?;
        Ok(entry
            .filter(|e| e.operation == kv::Operation::Put)
            .and_then(|e| serde_json::from_slice(&e.value).ok()))
    }

    /// Runs the timer service until `shutdown`: one instance at a time fires timers, the one
    /// holding the lease (key [`LEASE_KEY`]); the others wait to take it over. Returns an
    /// error only when the bucket cannot be used at all.
    pub async fn serve(&self, js: jetstream::Context, shutdown: CancellationToken) -> Result<()> {
        self.serve_with(js, shutdown, LeaseConfig::default()).await
    }

    /// Like [`Timers::serve`] with lease settings (tests shorten them).
    pub async fn serve_with(
        &self,
        js: jetstream::Context,
        shutdown: CancellationToken,
        lease: LeaseConfig,
    ) -> Result<()> {
        let me = ulid::Ulid::new().to_string();
        // Trouble with the bucket is retried (a server restart, a stall); only trouble that
        // lasts longer than `give_up_after` ends the service with an error, which stops the
        // process that runs it (see `aob_engine::run_with`).
        let mut failing_since: Option<std::time::Instant> = None;
        loop {
            let held = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                r = self.acquire(&me, &lease) => r,
            };
            let outcome = match held {
                Ok(None) => Ok(()),
                Ok(Some(rev)) => {
                    tracing::info!(owner = %me, "timer service: this instance fires timers");
                    let r = self
                        .fire_while_owner(&js, &shutdown, &me, rev, &lease)
                        .await;
                    if shutdown.is_cancelled() {
                        self.release(&me).await;
                        return Ok(());
                    }
                    if r.is_ok() {
                        tracing::warn!(owner = %me, "timer service: lease lost, no longer firing timers");
                    }
                    r
                }
                Err(e) => Err(e),
            };
            match outcome {
                Ok(()) => failing_since = None,
                Err(e) => {
                    let since = *failing_since.get_or_insert_with(std::time::Instant::now);
                    if since.elapsed() >= lease.give_up_after {
                        return Err(e);
                    }
                    tracing::warn!("timer service: {e}");
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(lease.renew_every()) => {}
            }
        }
    }

    /// Hands the lease over at once on shutdown, rather than after it expires.
    async fn release(&self, me: &str) {
        if let Ok(Some(e)) = self.kv.entry(LEASE_KEY).await
            && serde_json::from_slice::<Lease>(&e.value).is_ok_and(|l| l.owner == me)
        {
            let _ = self
                .kv
                .delete_expect_revision(LEASE_KEY, Some(e.revision))
                .await;
        }
    }

    /// Takes or renews the lease: `Some(revision)` when this instance holds it.
    async fn acquire(&self, me: &str, cfg: &LeaseConfig) -> Result<Option<u64>> {
        let entry = self
            .kv
            .entry(LEASE_KEY)
            .await
            .map_err(|e| Error::Nats(format!("reading the timer lease: {e}")))?;
        let body = Lease::body(me, cfg)?;
        let written = match entry {
            Some(e) => {
                // Held by another instance whose lease has not run out: not ours to take.
                let taken = e.operation == kv::Operation::Put
                    && serde_json::from_slice::<Lease>(&e.value)
                        .is_ok_and(|l| l.owner != me && l.expires_ms >= now_ms());
                if taken {
                    return Ok(None);
                }
                self.kv.update(LEASE_KEY, body, e.revision).await.ok()
            }
            None => self.kv.create(LEASE_KEY, body).await.ok(),
        };
        // Losing the race to another instance is not an error.
        Ok(written)
    }

    /// Fires due timers while this instance holds the lease; returns when it loses it or on
    /// shutdown.
    async fn fire_while_owner(
        &self,
        js: &jetstream::Context,
        shutdown: &CancellationToken,
        me: &str,
        mut lease_rev: u64,
        cfg: &LeaseConfig,
    ) -> Result<()> {
        let mut watch = self
            .kv
            .watch_with_history(">")
            .await
            .map_err(|e| Error::Nats(format!("watching {}: {e}", aob_streams::TIMERS)))?;
        let mut due: BTreeSet<(u64, String)> = BTreeSet::new();
        let mut timers: HashMap<String, (Timer, u64)> = HashMap::new();
        let mut renew = tokio::time::interval(cfg.renew_every());
        renew.tick().await;
        let mut renewed = std::time::Instant::now();
        loop {
            let next = due.iter().next().cloned();
            let sleep = match &next {
                Some((at, _)) => Duration::from_millis(at.saturating_sub(now_ms())),
                None => Duration::from_secs(3600),
            };
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = renew.tick() => {
                    match self.kv.update(LEASE_KEY, Lease::body(me, cfg)?, lease_rev).await {
                        Ok(rev) => {
                            lease_rev = rev;
                            renewed = std::time::Instant::now();
                        }
                        Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => return Ok(()),
                        // The server may be briefly away: the lease still holds for its
                        // lifetime. Past it, another instance may fire: this one stops.
                        Err(e) if renewed.elapsed() >= cfg.ttl => {
                            return Err(Error::Nats(format!(
                                "the timer lease could not be renewed for {:?}: {e}",
                                renewed.elapsed()
                            )));
                        }
                        Err(e) => tracing::warn!("renewing the timer lease: {e}"),
                    }
                }
                entry = watch.next() => {
                    let Some(entry) = entry else {
                        return Err(Error::Nats("timer watch ended".into()));
                    };
                    let entry = match entry {
                        Ok(e) if e.key == LEASE_KEY => continue,
                        Ok(e) => e,
                        Err(e) => {
                            tracing::warn!("timer watch: {e}");
                            continue;
                        }
                    };
                    if let Some((old, _)) = timers.remove(&entry.key) {
                        due.remove(&(old.due_ms, entry.key.clone()));
                    }
                    if entry.operation == kv::Operation::Put {
                        match serde_json::from_slice::<Timer>(&entry.value) {
                            Ok(t) => {
                                due.insert((t.due_ms, entry.key.clone()));
                                timers.insert(entry.key, (t, entry.revision));
                            }
                            Err(e) => {
                                tracing::warn!(key = %entry.key, "dropping a timer that is not valid: {e}");
                                let _ = self.kv.delete_expect_revision(&entry.key, Some(entry.revision)).await;
                            }
                        }
                    }
                }
                _ = tokio::time::sleep(sleep), if next.is_some() => {
                    let Some((at, key)) = next else { continue };
                    let Some((t, rev)) = timers.get(&key).cloned() else {
                        due.remove(&(at, key));
                        continue;
                    };
                    match fire(js, &t).await {
                        Ok(()) => {
                            due.remove(&(at, key.clone()));
                            timers.remove(&key);
                            // Only the value that fired: a timer set again meanwhile stays.
                            if let Err(e) = self.kv.delete_expect_revision(&key, Some(rev)).await {
                                tracing::debug!(%key, "fired timer not deleted (set again or cancelled): {e}");
                            }
                        }
                        Err(e) => {
                            tracing::warn!(%key, "timer publish failed, retrying in 1s: {e}");
                            due.remove(&(at, key.clone()));
                            let retry = now_ms() + 1000;
                            due.insert((retry, key.clone()));
                            if let Some((t, _)) = timers.get_mut(&key) {
                                t.due_ms = retry;
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Key of the timer service's lease in `AOB_TIMERS`.
pub const LEASE_KEY: &str = "lease";

/// The lease that makes one timer service instance fire timers.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Lease {
    owner: String,
    expires_ms: u64,
}

impl Lease {
    /// The stored value of a lease held by `owner` from now for the lease's lifetime.
    fn body(owner: &str, cfg: &LeaseConfig) -> Result<bytes::Bytes> {
        let lease = Lease {
            owner: owner.to_string(),
            expires_ms: now_ms() + cfg.ttl.as_millis() as u64,
        };
        Ok(serde_json::to_vec(&lease)
            .map_err(|e| Error::Payload(e.to_string()))?
            .into())
    }
}

/// Settings of the timer service's lease.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    /// How long a lease lasts without renewal (default 6 s): after an owner dies, another
    /// instance fires timers within this time. Renewed every third of it.
    pub ttl: Duration,
    /// How long the bucket may keep failing before the service gives up with an error
    /// (default 10 minutes).
    pub give_up_after: Duration,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        LeaseConfig {
            ttl: Duration::from_secs(6),
            give_up_after: Duration::from_secs(600),
        }
    }
}

impl LeaseConfig {
    fn renew_every(&self) -> Duration {
        (self.ttl / 3).max(Duration::from_millis(50))
    }
}

async fn fire(js: &jetstream::Context, t: &Timer) -> Result<()> {
    let body = serde_json::to_vec(&t.body).map_err(|e| Error::Payload(e.to_string()))?;
    // A timer signal stored before internal signals existed names the client subject, on
    // which the engine now refuses timer signals: it goes to the internal one instead.
    let subject = match t.body.get("signal").and_then(|s| s.as_str()) {
        Some("timer") => {
            aob_streams::subjects::internal_for(&t.subject).unwrap_or_else(|| t.subject.clone())
        }
        _ => t.subject.clone(),
    };
    crate::trace::scope(
        t.traceparent.as_deref(),
        crate::bus::publish(js, subject, &t.msg_id, body.into()),
    )
    .await?
    .await
    .map_err(|e| Error::Nats(format!("publishing timer to {}: {e}", t.subject)))?;
    Ok(())
}

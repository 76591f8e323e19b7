//! The NATS transport: a durable pull consumer per function type, behind the delivery
//! contract of [`crate::delivery`].
//!
//! Per message: parse (garbage is dead-lettered and terminated, never retried), run the
//! handler under a concurrency limit while sending in-progress heartbeats, hand the result
//! to the engine (directly when an engine answers that the run's stored state holds it,
//! else published with a deterministic `Nats-Msg-Id`), and only then ack. A task whose run is
//! aborted (`aob.<tenant>.run.<run>.abort`) is stopped and acked without a result. On
//! shutdown the consumer stops pulling and in-flight tasks finish before it returns.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer::PullConsumer};
use futures::StreamExt;
use futures::future::BoxFuture;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use aob_model::audit::DecisionRecord;
use aob_model::wire::{HandoffReply, Outcome, StepResult, Task};

use crate::delivery::Runner;
use crate::{Error, PayloadStore, Result, bus};

/// Settings of the NATS transport.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Most tasks handled at once (`AOB_CONCURRENCY`, default 64).
    pub concurrency: usize,
    /// Interval of in-progress acks while a task runs (default 2 s; below the consumer's ack wait of 6 s).
    pub heartbeat: Duration,
    /// Largest task body accepted, in bytes (default 768 KiB); larger ones are dead-lettered.
    pub max_message_bytes: usize,
    /// How long to wait for an engine to take a result directly (`AOB_HANDOFF_MS`, default
    /// 5000); `None` (`AOB_HANDOFF_MS=0`) publishes every result to `AOB_RESULTS`.
    pub handoff: Option<Duration>,
}

impl Default for ServeConfig {
    fn default() -> Self {
        let concurrency = std::env::var("AOB_CONCURRENCY")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(64);
        let handoff_ms = std::env::var("AOB_HANDOFF_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(5000);
        ServeConfig {
            concurrency,
            heartbeat: Duration::from_secs(2),
            max_message_bytes: 768 * 1024,
            handoff: (handoff_ms > 0).then(|| Duration::from_millis(handoff_ms)),
        }
    }
}

/// How long a pull request of a durable consumer waits for messages. Short, because a
/// pull that failed (the consumer's leader moved: "no responders") is sent again only once
/// the last one expired: with the client's default of 30 s, a function sat idle that long
/// after a node of the cluster died.
pub const PULL_EXPIRES: Duration = Duration::from_secs(5);
/// Idle heartbeat of a pull request, well under [`PULL_EXPIRES`].
pub const PULL_HEARTBEAT: Duration = Duration::from_secs(2);

/// Binds to a durable consumer made by `aob streams apply`.
pub async fn bind(js: &jetstream::Context, stream: &str, consumer: &str) -> Result<PullConsumer> {
    let s = js
        .get_stream(stream)
        .await
        .map_err(|e| Error::Topology(format!("stream {stream}: {e}")))?;
    s.get_consumer(consumer)
        .await
        .map_err(|e| Error::Topology(format!("consumer {stream}/{consumer}: {e}")))
}

type Inflight = Arc<Mutex<HashMap<String, Vec<(u64, CancellationToken)>>>>;

static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Serves `handler` from its durable consumer until `shutdown`, then drains.
pub async fn serve<R: Runner>(
    handler: Arc<R>,
    client: async_nats::Client,
    payloads: PayloadStore,
    cfg: ServeConfig,
    shutdown: CancellationToken,
) -> Result<()> {
    let js = jetstream::new(client.clone());
    let node_type = handler.node_type().to_string();
    let node_type = node_type.as_str();
    let component = format!("fn.{node_type}");
    let consumer = bind(
        &js,
        aob_streams::TASKS,
        &aob_streams::function_consumer(node_type),
    )
    .await?;
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(cfg.concurrency.max(1))
        .expires(PULL_EXPIRES)
        .heartbeat(PULL_HEARTBEAT)
        .messages()
        .await
        .map_err(|e| Error::Nats(format!("consuming tasks of {node_type}: {e}")))?;

    let inflight: Inflight = Arc::default();
    let mut aborts = client
        .subscribe(aob_streams::subjects::ABORTS)
        .await
        .map_err(|e| Error::Nats(format!("subscribing to aborts: {e}")))?;
    let abort_map = inflight.clone();
    let abort_task = tokio::spawn(async move {
        while let Some(msg) = aborts.next().await {
            // aob.<tenant>.run.<run>.abort
            let parts: Vec<&str> = msg.subject.split('.').collect();
            if parts.len() == 5 {
                let key = format!("{}.{}", parts[1], parts[3]);
                if let Ok(map) = abort_map.lock() {
                    for (_, t) in map.get(&key).into_iter().flatten() {
                        t.cancel();
                    }
                }
            }
        }
    });

    let contract = crate::delivery::Contract {
        payloads,
        max_message_bytes: cfg.max_message_bytes,
        heartbeat: cfg.heartbeat,
        emitter: emitter(&client),
        secrets: crate::secrets::Secrets::from_env(),
    };
    let permits = Arc::new(Semaphore::new(cfg.concurrency.max(1)));
    tracing::info!(node_type, "serving tasks");
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
        };
        let msg = tokio::select! {
            _ = shutdown.cancelled() => break,
            m = messages.next() => m,
        };
        let msg = match msg {
            Some(Ok(m)) => m,
            Some(Err(e)) => {
                tracing::warn!(node_type, "consumer error: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            None => break,
        };
        let handler = handler.clone();
        let js = js.clone();
        let contract = contract.clone();
        let inflight = inflight.clone();
        let component = component.clone();
        let cfg = cfg.clone();
        tokio::spawn(async move {
            handle_message(&*handler, &js, &contract, &inflight, &component, &cfg, msg).await;
            drop(permit);
        });
    }
    // Drain: wait until every permit is back.
    let _all = permits.acquire_many(cfg.concurrency.max(1) as u32).await;
    abort_task.abort();
    tracing::info!(node_type, "drained");
    Ok(())
}

/// One task from `fn-<type>`, as the delivery contract sees it.
struct NatsDelivery<'a> {
    msg: jetstream::Message,
    subject: String,
    js: &'a jetstream::Context,
    component: &'a str,
    handoff: Option<Duration>,
    inflight: &'a Inflight,
    /// Where this delivery's cancel token is registered, to take it out when done.
    registered: std::sync::Mutex<Option<(String, u64)>>,
}

impl Drop for NatsDelivery<'_> {
    fn drop(&mut self) {
        let Some((key, id)) = self.registered.lock().ok().and_then(|mut r| r.take()) else {
            return;
        };
        if let Ok(mut map) = self.inflight.lock()
            && let Some(list) = map.get_mut(&key)
        {
            list.retain(|(i, _)| *i != id);
            if list.is_empty() {
                map.remove(&key);
            }
        }
    }
}

impl crate::delivery::Delivery for NatsDelivery<'_> {
    fn origin(&self) -> &str {
        &self.subject
    }
    fn body(&self) -> &[u8] {
        &self.msg.payload
    }
    fn cancel_for(&self, task: &Task) -> CancellationToken {
        // `abort` events of the run cancel it (see `serve`).
        let key = format!("{}.{}", task.tenant, task.run_id);
        let cancel = CancellationToken::new();
        let id = NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Ok(mut map) = self.inflight.lock() {
            map.entry(key.clone())
                .or_default()
                .push((id, cancel.clone()));
        }
        if let Ok(mut r) = self.registered.lock() {
            *r = Some((key, id));
        }
        cancel
    }
    fn in_progress(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {
            let _ = self.msg.ack_with(AckKind::Progress).await;
        })
    }
    fn settle<'b>(&'b self, result: &'b StepResult) -> BoxFuture<'b, Result<()>> {
        Box::pin(deliver_result(self.js, result, self.handoff))
    }
    fn audit<'b>(&'b self, record: &'b DecisionRecord) -> BoxFuture<'b, Result<()>> {
        Box::pin(async move {
            bus::publish_record(self.js, record)
                .await?
                .await
                .map_err(|e| Error::Nats(format!("publishing an audit record: {e}")))?;
            Ok(())
        })
    }
    fn ack(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {
            let _ = self.msg.ack().await;
        })
    }
    fn retry(&self, delay: Duration) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let _ = self.msg.ack_with(AckKind::Nak(Some(delay))).await;
        })
    }
    fn traceparent(&self) -> Option<String> {
        let h = self.msg.headers.as_ref()?.get(crate::trace::HEADER)?;
        Some(h.as_str().to_string())
    }
    fn refuse<'b>(&'b self, reason: &'b str) -> BoxFuture<'b, ()> {
        Box::pin(async move {
            bus::dead_letter(
                self.js,
                self.component,
                &self.subject,
                &self.msg.payload,
                reason,
            )
            .await;
            let _ = self.msg.ack_with(AckKind::Term).await;
        })
    }
}

/// The emitter of every transport: NATS core publishes of what handlers emit, progress
/// reports through the engine.
pub fn emitter(client: &async_nats::Client) -> Arc<dyn crate::context::Emitter> {
    Arc::new(NatsEmitter(client.clone()))
}

/// NATS core publishes of what handlers emit, on `aob.<tenant>.stream.<run>.<step>`.
struct NatsEmitter(async_nats::Client);

impl crate::context::Emitter for NatsEmitter {
    fn emit(&self, e: crate::context::Emitted) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let subject = aob_streams::subjects::stream(&e.tenant, &e.run_id, &e.at.step);
            if let Ok(body) = serde_json::to_vec(&e) {
                let _ = self.0.publish(subject, body.into()).await;
            }
        })
    }

    fn report<'a>(
        &'a self,
        tenant: &'a str,
        run_id: &'a str,
        signal: &'a aob_model::wire::Signal,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let aob_model::wire::Signal::Progress {
                at, seq, message, ..
            } = signal
            else {
                return Err(Error::Config("only progress is reported".into()));
            };
            let body = serde_json::to_vec(signal)
                .map_err(|e| Error::Payload(format!("encoding a progress report: {e}")))?;
            // Watch for the engine's event before sending: the report and the attempt's
            // result travel by different paths, and a report applied after the result is
            // dropped as stale. Waiting for it (a few ms) keeps them in order.
            let mut recorded = self
                .0
                .subscribe(aob_streams::subjects::history(
                    tenant,
                    run_id,
                    aob_model::wire::HistoryKind::StepProgress.token(),
                ))
                .await
                .map_err(|e| Error::Nats(format!("watching for a progress event: {e}")))?;
            let js = jetstream::new(self.0.clone());
            let ack = crate::bus::publish(
                &js,
                aob_streams::subjects::internal_signal(tenant, run_id),
                &format!("progress.{run_id}.{}.{seq}", at.token()),
                body.into(),
            )
            .await?
            .await
            .map_err(|e| Error::Nats(format!("progress report not acknowledged: {e}")))?;
            if ack.duplicate {
                // Sent before (by an earlier delivery of this attempt): recorded then.
                return Ok(());
            }
            let seen = async {
                while let Some(m) = recorded.next().await {
                    if let Ok(ev) =
                        serde_json::from_slice::<aob_model::wire::HistoryEvent>(&m.payload)
                        && ev.step.as_deref() == Some(at.step.as_str())
                        && ev.attempt == Some(at.attempt)
                        && ev.message.as_deref() == Some(message.as_str())
                    {
                        return;
                    }
                }
            };
            // Without an engine the report still waits in its stream; go on after a while.
            let _ = tokio::time::timeout(REPORT_WAIT, seen).await;
            Ok(())
        })
    }
}

/// Longest a progress report waits for the engine to record it.
const REPORT_WAIT: Duration = Duration::from_secs(5);

async fn handle_message<R: Runner>(
    handler: &R,
    js: &jetstream::Context,
    contract: &crate::delivery::Contract,
    inflight: &Inflight,
    component: &str,
    cfg: &ServeConfig,
    msg: jetstream::Message,
) {
    let d = NatsDelivery {
        subject: msg.subject.to_string(),
        msg,
        js,
        component,
        handoff: cfg.handoff,
        inflight,
        registered: std::sync::Mutex::new(None),
    };
    crate::delivery::deliver(handler, &d, contract).await;
}

/// Parses and checks a task body; the error is the reason for the dead letter.
pub fn parse_task(body: &[u8], subject: &str, max: usize) -> std::result::Result<Task, String> {
    if body.len() > max {
        return Err(format!(
            "task of {} bytes is larger than the limit of {max}",
            body.len()
        ));
    }
    let task: Task = serde_json::from_slice(body).map_err(|e| format!("not a task: {e}"))?;
    let tenant = aob_streams::subjects::tenant_of(subject).unwrap_or_default();
    if task.tenant != tenant {
        return Err(format!(
            "task for tenant `{}` arrived on a subject of tenant `{tenant}`",
            task.tenant
        ));
    }
    if !aob_streams::subjects::is_token(&task.run_id)
        || !aob_streams::subjects::is_token(&task.tenant)
    {
        return Err(format!(
            "run id `{}` or tenant `{}` is not a valid subject token",
            task.run_id, task.tenant
        ));
    }
    Ok(task)
}

/// Message id of a result: one per attempt and outcome kind.
pub fn result_msg_id(r: &StepResult) -> String {
    let kind = match r.outcome {
        Outcome::Completed { .. } => "done",
        Outcome::Failed { .. } => "failed",
        Outcome::Waiting { .. } => "waiting",
    };
    format!("res.{}.{}.{kind}", r.run_id, r.at.token())
}

/// Hands a step result to the engine. First directly, when `handoff` is set: a core request
/// on `aob.<tenant>.handoff.<run>` that an engine answers once the run's stored state holds
/// the result. Without that answer (no engine, a timeout, a result the engine cannot apply
/// yet), the result is published to `AOB_RESULTS`, from where the engine takes it as before;
/// if the engine did apply it meanwhile, the stored copy is a duplicate it acknowledges.
pub async fn deliver_result(
    js: &jetstream::Context,
    r: &StepResult,
    handoff: Option<Duration>,
) -> Result<()> {
    let body: bytes::Bytes = serde_json::to_vec(r)
        .map_err(|e| Error::Payload(e.to_string()))?
        .into();
    if let Some(wait) = handoff {
        let mut request = async_nats::Request::new()
            .payload(body.clone())
            .timeout(Some(wait));
        if let Some(tp) = crate::trace::current() {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(crate::trace::HEADER, tp.as_str());
            request = request.headers(headers);
        }
        let subject = aob_streams::subjects::handoff(&r.tenant, &r.run_id);
        match js.client().send_request(subject, request).await {
            Ok(reply) => match serde_json::from_slice::<HandoffReply>(&reply.payload) {
                Ok(HandoffReply { settled: true, .. }) => return Ok(()),
                Ok(HandoffReply { reason, .. }) => tracing::debug!(
                    run = %r.run_id,
                    "engine did not take the result directly: {}",
                    reason.unwrap_or_default()
                ),
                Err(e) => tracing::warn!(run = %r.run_id, "unreadable handoff reply: {e}"),
            },
            Err(e) => tracing::debug!(run = %r.run_id, "result handoff: {e}"),
        }
    }
    publish_result(js, r, body).await
}

/// Publishes a step result (`body`, its JSON) and waits for the server's ack, retrying
/// briefly.
async fn publish_result(js: &jetstream::Context, r: &StepResult, body: bytes::Bytes) -> Result<()> {
    let subject = aob_streams::subjects::result(&r.tenant, &r.run_id);
    let id = result_msg_id(r);
    let mut delay = Duration::from_millis(50);
    let mut last = None;
    for _ in 0..5 {
        match bus::publish_acked(js, subject.clone(), &id, body.clone()).await {
            Ok(()) => return Ok(()),
            Err(e) => {
                last = Some(e);
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
        }
    }
    Err(last.unwrap_or_else(|| Error::Nats("publishing the result".into())))
}

//! Intake: the three ways events reach the engine (stored commands and results from the
//! durable consumers, results read as they are published, results handed over by
//! functions), each routed to the worker of its run so one run's events apply in order;
//! how a message is parsed, and what is acked, retried or dead-lettered.

use super::*;

impl<S: RunStore> Engine<S> {
    /// Consumes `engine-cmd` and `engine-results` until `shutdown`, then drains.
    pub async fn serve(self: Arc<Self>, shutdown: CancellationToken) -> Result<()> {
        let cmd =
            aob_runtime::nats::bind(&self.js, aob_streams::CMD, aob_streams::ENGINE_CMD).await?;
        let res =
            aob_runtime::nats::bind(&self.js, aob_streams::RESULTS, aob_streams::ENGINE_RESULTS)
                .await?;
        let batch = (self.cfg.workers * 4).max(16);
        let cmd_msgs = cmd
            .stream()
            .max_messages_per_batch(batch)
            .expires(aob_runtime::nats::PULL_EXPIRES)
            .heartbeat(aob_runtime::nats::PULL_HEARTBEAT)
            .messages()
            .await
            .map_err(|e| aob_runtime::Error::Nats(format!("consuming commands: {e}")))?;
        let res_msgs = res
            .stream()
            .max_messages_per_batch(batch)
            .expires(aob_runtime::nats::PULL_EXPIRES)
            .heartbeat(aob_runtime::nats::PULL_HEARTBEAT)
            .messages()
            .await
            .map_err(|e| aob_runtime::Error::Nats(format!("consuming results: {e}")))?;
        // Results are also read as they are published, before their stream stores them:
        // applying that copy takes the stream's store-and-deliver off every step, and
        // the stored copy that follows finds itself stale (see `on_early`).
        let early = engine_queue(self.js.client(), subjects::RESULTS_ALL_TENANTS).await?;
        // Functions hand results over directly and wait for the answer; a result handed
        // over never reaches `AOB_RESULTS` unless the engine could not take it (see
        // `on_handoff`).
        let handoffs = engine_queue(self.js.client(), subjects::HANDOFFS_ALL_TENANTS).await?;
        let stored = futures::stream::select(cmd_msgs, res_msgs)
            .map(|m| m.map(|m| Inbound::Stored(Box::new(m))));
        let core = futures::stream::select(
            early.map(|m| Ok(Inbound::Early(m))),
            handoffs.map(|m| Ok(Inbound::Handoff(m))),
        );
        let mut merged = futures::stream::select(stored, core);

        let workers = self.cfg.workers.max(1);
        let mut senders = Vec::with_capacity(workers);
        let mut handles = Vec::with_capacity(workers);
        for _ in 0..workers {
            let (tx, mut rx) = mpsc::channel::<Inbound>(64);
            senders.push(tx);
            let engine = self.clone();
            handles.push(tokio::spawn(async move {
                while let Some(msg) = rx.recv().await {
                    match msg {
                        Inbound::Stored(msg) => engine.on_message(*msg).await,
                        Inbound::Early(msg) => engine.on_early(&msg.subject, &msg.payload).await,
                        Inbound::Handoff(msg) => engine.on_handoff(msg).await,
                    }
                }
            }));
        }
        loop {
            let next = tokio::select! {
                _ = shutdown.cancelled() => break,
                m = merged.next() => m,
            };
            let msg = match next {
                Some(Ok(m)) => m,
                Some(Err(e)) => {
                    tracing::warn!("engine consumer: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
                None => break,
            };
            let shard = match &msg {
                Inbound::Stored(msg) => shard_of(msg, workers),
                Inbound::Early(msg) | Inbound::Handoff(msg) => {
                    shard_of_key(&run_key(&msg.subject), workers)
                }
            };
            if senders[shard].send(msg).await.is_err() {
                break;
            }
        }
        drop(senders);
        for h in handles {
            let _ = h.await;
        }
        tracing::info!("engine drained");
        Ok(())
    }

    /// Applies a start, as a start command would be (admission included); true when it
    /// made a run. For driving the engine directly (tests, other transports).
    pub async fn handle_start(
        &self,
        tenant: &str,
        run_id: &str,
        cmd: aob_model::wire::StartCommand,
    ) -> Result<bool> {
        self.process(
            Parsed::Start {
                tenant: tenant.to_string(),
                run_id: run_id.to_string(),
                cmd,
            },
            None,
        )
        .await
    }

    /// Applies a signal to a run; true when it changed the run.
    pub async fn handle_signal(&self, tenant: &str, run_id: &str, signal: Signal) -> Result<bool> {
        self.process(
            Parsed::Signal {
                tenant: tenant.to_string(),
                run_id: run_id.to_string(),
                signal,
            },
            None,
        )
        .await
    }

    /// Applies a result; true when it changed the run. A result ahead of the stored run
    /// is `Err(Error::Ahead)`: the caller holds it and tries again later.
    pub async fn handle_result(&self, r: StepResult) -> Result<bool> {
        self.process(Parsed::Result(r), None).await
    }

    /// Forgets the cached state of every run, as a restarted engine would have none.
    pub fn forget_runs(&self) {
        if let Ok(mut m) = self.runs.lock() {
            m.clear();
        }
    }

    /// Applies a result seen as it was published, before `AOB_RESULTS` stored it. Nothing
    /// is acked, refused or retried here: the stored copy is the one that counts, and it
    /// follows, finding its attempt already applied (or applying it, if this copy could
    /// not be).
    pub async fn on_early(&self, subject: &str, payload: &[u8]) {
        let Ok(r) = self.parse_result(subject, payload) else {
            return;
        };
        match self.process(Parsed::Result(r), None).await {
            Ok(true) => {
                self.metrics.early.fetch_add(1, Ordering::Relaxed);
            }
            Ok(false) => {}
            Err(e) => tracing::debug!(%subject, "early copy of a result not applied: {e}"),
        }
    }

    /// Takes a result handed over directly and answers once the run's stored state holds it
    /// (applied, or found a duplicate or stale): the function then acks its task, and the
    /// result never needs storing. A result that cannot be applied now (its run is behind,
    /// a store failure) is answered unsettled, and the function publishes it to
    /// `AOB_RESULTS` as usual. A handoff without a reply subject is dead-lettered: nobody
    /// would learn that it was not applied.
    pub async fn on_handoff(&self, msg: async_nats::Message) {
        let subject = msg.subject.as_str();
        let Some(reply) = msg.reply.clone() else {
            self.metrics.dead_letters.fetch_add(1, Ordering::Relaxed);
            let reason = format!(
                "a result handoff needs a reply subject (a request); publish results to {}",
                subjects::result("<tenant>", "<run>")
            );
            bus::dead_letter(&self.js, "engine", subject, &msg.payload, &reason).await;
            return;
        };
        let answer = match self.parse_result(subject, &msg.payload) {
            Err(reason) => HandoffReply {
                settled: false,
                reason: Some(reason),
            },
            Ok(r) => match aob_runtime::trace::scope(
                header(msg.headers.as_ref(), aob_runtime::trace::HEADER).as_deref(),
                self.process(Parsed::Result(r), None),
            )
            .await
            {
                Ok(applied) => {
                    if applied {
                        self.metrics.handoffs.fetch_add(1, Ordering::Relaxed);
                    }
                    HandoffReply {
                        settled: true,
                        reason: None,
                    }
                }
                Err(e) => HandoffReply {
                    settled: false,
                    reason: Some(e.to_string()),
                },
            },
        };
        let body = serde_json::to_vec(&answer).unwrap_or_default();
        if let Err(e) = self.js.client().publish(reply, body.into()).await {
            // The function times out and publishes the result: nothing is lost.
            tracing::debug!(%subject, "could not answer a handoff: {e}");
        }
    }

    /// Handles one message and acks it (or naks it for redelivery on a transient failure).
    pub async fn on_message(&self, msg: Message) {
        let subject = msg.subject.to_string();
        let parsed = match self.parse(&msg) {
            Ok(p) => p,
            Err(reason) => {
                self.refuse(&msg, &subject, &reason).await;
                let _ = msg.ack_with(AckKind::Term).await;
                return;
            }
        };
        let traceparent = header(msg.headers.as_ref(), aob_runtime::trace::HEADER);
        let processed =
            aob_runtime::trace::scope(traceparent.as_deref(), self.process(parsed, Some(&msg)))
                .await;
        match processed {
            Ok(_) => {
                let _ = msg.ack().await;
            }
            Err(e) => {
                let info = msg.info().ok();
                let delivered = info.as_ref().map_or(1, |i| i.delivered);
                let age = info.as_ref().map_or(Duration::ZERO, |i| {
                    let published = i.published.unix_timestamp_nanos() / 1_000_000;
                    Duration::from_millis((now_ms() as i128 - published).max(0) as u64)
                });
                let give_up = rules::give_up(&e, age, self.cfg.hold_limit);
                match (&give_up, &e) {
                    (Some(_), _) => {}
                    (None, Error::Ahead { .. }) => {
                        self.metrics.held.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(%subject, delivered, "held: {e}");
                    }
                    (None, _) => {
                        // A slow or absent store or server: never a reason to drop what
                        // the engine needs. Retried with backoff, however long it takes.
                        self.metrics.retried.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(%subject, delivered, "engine will retry a message: {e}");
                    }
                }
                match give_up {
                    Some(reason) => {
                        self.metrics.dead_letters.fetch_add(1, Ordering::Relaxed);
                        bus::dead_letter_with_id(
                            &self.js,
                            "engine",
                            &subject,
                            &msg.payload,
                            &reason,
                            msg_id(&msg).as_deref(),
                        )
                        .await;
                        let _ = msg.ack_with(AckKind::Term).await;
                    }
                    None => {
                        let _ = msg.ack_with(AckKind::Nak(Some(backoff(delivered)))).await;
                    }
                }
            }
        }
    }

    pub(super) fn parse(&self, msg: &Message) -> std::result::Result<Parsed, String> {
        let subject = msg.subject.as_str();
        if msg.payload.len() > self.cfg.max_message_bytes {
            return Err(format!(
                "message of {} bytes is larger than the limit of {}",
                msg.payload.len(),
                self.cfg.max_message_bytes
            ));
        }
        let parts: Vec<&str> = subject.split('.').collect();
        let tenant = parts.get(1).copied().unwrap_or_default();
        if !subjects::is_token(tenant) {
            return Err(format!("tenant `{tenant}` is not valid"));
        }
        match parts.as_slice() {
            ["aob", _, "cmd", "start"] => {
                let cmd: StartCommand = serde_json::from_slice(&msg.payload)
                    .map_err(|e| format!("not a start command: {e}"))?;
                let run_id = match &cmd.run_id {
                    Some(r) if subjects::is_token(r) => r.clone(),
                    Some(r) => {
                        return Err(format!(
                            "run_id `{r}` is not valid: use 1 to 128 of [A-Za-z0-9_-]"
                        ));
                    }
                    None => derived_run_id(msg),
                };
                Ok(Parsed::Start {
                    tenant: tenant.to_string(),
                    run_id,
                    cmd,
                })
            }
            ["aob", _, "cmd", kind @ ("signal" | "internal"), run] => {
                let signal: Signal = serde_json::from_slice(&msg.payload)
                    .map_err(|e| format!("not a signal: {e}"))?;
                if matches!(signal, Signal::Timer { .. }) && *kind != "internal" {
                    return Err(format!(
                        "timer signals are internal: only the timer service sends them, on {}",
                        subjects::internal_signal(tenant, run)
                    ));
                }
                if matches!(signal, Signal::Progress { .. }) && *kind != "internal" {
                    return Err(format!(
                        "progress signals are internal: only functions send them, on {}",
                        subjects::internal_signal(tenant, run)
                    ));
                }
                Ok(Parsed::Signal {
                    tenant: tenant.to_string(),
                    run_id: run.to_string(),
                    signal,
                })
            }
            ["aob", _, "result", _] => {
                Ok(Parsed::Result(self.parse_result(subject, &msg.payload)?))
            }
            _ => Err("no such command subject".into()),
        }
    }

    /// A step result from `aob.<tenant>.result.<run>`; it must name that tenant and run.
    pub(super) fn parse_result(
        &self,
        subject: &str,
        payload: &[u8],
    ) -> std::result::Result<StepResult, String> {
        if payload.len() > self.cfg.max_message_bytes {
            return Err(format!(
                "message of {} bytes is larger than the limit of {}",
                payload.len(),
                self.cfg.max_message_bytes
            ));
        }
        let r: StepResult =
            serde_json::from_slice(payload).map_err(|e| format!("not a step result: {e}"))?;
        let parts: Vec<&str> = subject.split('.').collect();
        let expected = |kind| ["aob", r.tenant.as_str(), kind, r.run_id.as_str()];
        if parts.as_slice() != expected("result") && parts.as_slice() != expected("handoff") {
            return Err(format!(
                "result for {}/{} arrived on {subject}",
                r.tenant, r.run_id
            ));
        }
        Ok(r)
    }

    /// Applies a parsed message; true when it changed a run. `msg` is the stored message
    /// it came from, if any: a start refused by admission is dead-lettered with it.
    pub(super) async fn process(&self, parsed: Parsed, msg: Option<&Message>) -> Result<bool> {
        match parsed {
            Parsed::Start {
                tenant,
                run_id,
                cmd,
            } => self.start(&tenant, &run_id, cmd, msg).await,
            Parsed::Signal {
                tenant,
                run_id,
                signal,
            } => {
                self.apply(&tenant, &run_id, None, Event::Signal(signal))
                    .await
            }
            Parsed::Result(r) => {
                let (tenant, run_id) = (r.tenant.clone(), r.run_id.clone());
                self.apply(&tenant, &run_id, None, Event::Result(r)).await
            }
        }
    }
}

/// Subscribes to `subject` in the engines' core queue group.
pub(super) async fn engine_queue(
    client: async_nats::Client,
    subject: &str,
) -> Result<async_nats::Subscriber> {
    client
        .queue_subscribe(subject.to_string(), subjects::ENGINE_QUEUE.into())
        .await
        .map_err(|e| aob_runtime::Error::Nats(format!("subscribing to {subject}: {e}")).into())
}

/// The run id a start command will get: its `run_id`, else the one derived from the message.
pub(super) fn start_run_id(msg: &Message) -> String {
    #[derive(serde::Deserialize)]
    struct RunIdOnly {
        run_id: Option<String>,
    }
    match serde_json::from_slice::<RunIdOnly>(&msg.payload) {
        Ok(RunIdOnly { run_id: Some(r) }) => r,
        _ => derived_run_id(msg),
    }
}

/// The message's `Nats-Msg-Id`.
pub(super) fn msg_id(msg: &Message) -> Option<String> {
    header(msg.headers.as_ref(), "Nats-Msg-Id")
}

/// A run id from the message itself, the same on every redelivery: the `Nats-Msg-Id`
/// when it is a valid token, else a ULID from the publish time and stream sequence.
pub(super) fn derived_run_id(msg: &Message) -> String {
    if let Some(id) = msg
        .headers
        .as_ref()
        .and_then(|h| h.get("Nats-Msg-Id"))
        .map(|v| v.as_str().to_string())
        && subjects::is_token(&id)
    {
        return id;
    }
    match msg.info() {
        Ok(info) => {
            let ms = (info.published.unix_timestamp_nanos() / 1_000_000) as u64;
            ulid::Ulid::from_parts(ms, u128::from(info.stream_sequence)).to_string()
        }
        Err(_) => ulid::Ulid::new().to_string(),
    }
}

/// Events of one run always go to the same worker, so they are applied in order; that
/// includes its start (a duplicate start lands on the same worker as its twin), so the
/// first result finds the run's state cached, not still on its way to the store.
pub(super) fn shard_of(msg: &Message, workers: usize) -> usize {
    let parts: Vec<&str> = msg.subject.split('.').collect();
    let key = match parts.as_slice() {
        ["aob", _, "cmd", "signal" | "internal", _] | ["aob", _, "result", _] => {
            run_key(&msg.subject)
        }
        ["aob", t, "cmd", "start"] => format!("{t}.{}", start_run_id(msg)),
        _ => match msg.headers.as_ref().and_then(|h| h.get("Nats-Msg-Id")) {
            Some(id) => id.as_str().to_string(),
            None => msg
                .info()
                .map(|i| i.stream_sequence.to_string())
                .unwrap_or_default(),
        },
    };
    shard_of_key(&key, workers)
}

pub(super) fn shard_of_key(key: &str, workers: usize) -> usize {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut h);
    (h.finish() as usize) % workers
}

/// `<tenant>.<run>` of a signal or result subject (the subject itself for any other).
pub(super) fn run_key(subject: &str) -> String {
    let parts: Vec<&str> = subject.split('.').collect();
    match parts.as_slice() {
        ["aob", t, "cmd", "signal" | "internal", run]
        | ["aob", t, "result", run]
        | ["aob", t, "handoff", run] => format!("{t}.{run}"),
        _ => subject.to_string(),
    }
}

/// A header's value, if the message has it.
pub(super) fn header(headers: Option<&async_nats::HeaderMap>, name: &str) -> Option<String> {
    headers?.get(name).map(|v| v.as_str().to_string())
}

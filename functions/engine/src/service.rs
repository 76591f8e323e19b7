//! The engine's I/O around the pure machine: consume commands and results, keep run state
//! by compare-and-set, publish the effects, then ack.
//!
//! Effects are written into the run state (the outbox) in the same compare-and-set as the
//! state they belong to. If the engine dies after the write but before publishing, the
//! next message for that run, or the redelivery of the same one, finds the outbox and
//! publishes it again; deterministic `Nats-Msg-Id`s make the repeat harmless.
//!
//! Tasks do not wait for that write: they are sent as soon as the transition is known,
//! while the write is in flight, which takes a whole server round trip off every step
//! (see ARCHITECTURE.md). This is safe because a task's message id names the attempt:
//! - if the write loses a compare-and-set, the transition is made again on the newer
//!   state, and the same task sent again is a duplicate the server drops. Tasks are sent
//!   early only from a state known current within [`EARLY_TASKS_WITHIN`], well inside
//!   the streams' duplicate window, so the first copy is still remembered;
//! - if the engine dies before the write lands, the event is redelivered and sends the
//!   same task again; the function's result, if it came first, was held, not dropped:
//!   a result for an attempt the stored state has not started is *ahead* of it and is
//!   redelivered (nak with backoff) until the state catches up.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::context::PublishAckFuture;
use async_nats::jetstream::{self, AckKind, Message};
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use aob_model::audit::DecisionRecord;
use aob_model::state::{Effect, RunState};
use aob_model::wire::{
    HandoffReply, HistoryEvent, HistoryKind, Outcome, Signal, StartCommand, StepResult, Task,
};
use aob_runtime::registry::Registry;
use aob_runtime::timers::{Timer, Timers};
use aob_runtime::{PayloadStore, bus, now_ms};
use aob_streams::subjects;

use crate::machine::{self, Compiled, Event};
use crate::store::{NatsStore, RunStore};

/// What can go wrong in the engine.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Runtime trouble (NATS, payloads, topology).
    #[error(transparent)]
    Runtime(#[from] aob_runtime::Error),
    /// Run store trouble.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// A result for an attempt the stored run has not started yet; redelivered later.
    #[error("result for {at} of run {run} is ahead of the run's stored state")]
    Ahead {
        /// Run key.
        run: String,
        /// The attempt's token.
        at: String,
    },
    /// A run's state would be larger than the engine writes (a start whose first state
    /// is already too large; a running run fails instead).
    #[error("{0}")]
    TooLarge(String),
    /// A stored run state or definition does not parse.
    #[error("corrupt {what}: {message}")]
    Corrupt {
        /// What.
        what: String,
        /// Why.
        message: String,
    },
}

impl Error {
    /// Whether trying again later may succeed: trouble reaching NATS, the run store or the
    /// payload store, or a topology an operator is still applying. A corrupt state or
    /// definition will not get better by waiting.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Runtime(e) => !matches!(
                e,
                aob_runtime::Error::WorkflowNotFound { .. } | aob_runtime::Error::Config(_)
            ),
            Error::Store(_) | Error::Ahead { .. } => true,
            Error::Corrupt { .. } | Error::TooLarge(_) => false,
        }
    }
}

/// The delay before a message the engine could not handle yet comes back: doubling from
/// 200 ms to at most [`MAX_BACKOFF`].
pub fn backoff(delivered: i64) -> Duration {
    let exp = delivered.clamp(1, 16) as u32;
    Duration::from_millis(100u64.saturating_mul(1 << exp)).min(MAX_BACKOFF)
}

/// Longest delay between two tries of a message the engine must not drop.
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Settings of the engine.
#[derive(Debug, Clone)]
pub struct Config {
    /// Runs processed at once; events of one run are always processed in order (default 64).
    pub workers: usize,
    /// Largest command or result accepted, in bytes (default 768 KiB; larger payloads travel by reference).
    pub max_message_bytes: usize,
    /// Outputs larger than this are kept in run state by reference (default 16 KiB); so
    /// are step outputs the engine assembles (a for_each step's list of item outputs).
    pub state_inline_limit: usize,
    /// Outputs of for_each items larger than this are kept by reference (default 128
    /// bytes): a for_each step keeps one per item until it completes.
    pub item_inline_limit: usize,
    /// Largest run record written, in bytes (default 900 KiB, under the server's 1 MiB
    /// value limit). A run whose next state would be larger fails with the reason, rather
    /// than stalling on a write the server refuses.
    pub max_state_bytes: usize,
    /// How long a result may wait for its run to reach its attempt, while the run store
    /// answers, before it is dead-lettered (default 1 hour). An outage of the store does not
    /// count: a result is held for as long as the store cannot be read.
    pub hold_limit: Duration,
}

impl Config {
    /// The environment variables [`Config::from_env`] reads, with their meaning.
    pub const ENV_VARS: [(&'static str, &'static str); 6] = [
        ("AOB_ENGINE_WORKERS", "runs processed at once (default 64)"),
        (
            "AOB_MAX_MESSAGE_BYTES",
            "largest command or result accepted (default 786432)",
        ),
        (
            "AOB_STATE_INLINE_LIMIT",
            "outputs larger than this many bytes are kept in run state by reference (default 16384)",
        ),
        (
            "AOB_ITEM_INLINE_LIMIT",
            "for_each item outputs larger than this many bytes are kept by reference (default 128)",
        ),
        (
            "AOB_MAX_STATE_BYTES",
            "largest run record written; a run that would outgrow it fails (default 921600)",
        ),
        (
            "AOB_HOLD_LIMIT",
            "how long a result may wait for its run to reach its attempt (default 1h)",
        ),
    ];

    /// The defaults, overridden by `AOB_*` environment variables ([`Config::ENV_VARS`]).
    pub fn from_env() -> std::result::Result<Self, aob_runtime::Error> {
        Config::from_vars(|k| std::env::var(k).ok())
    }

    /// Like [`Config::from_env`] with another source of variables.
    pub fn from_vars(
        var: impl Fn(&str) -> Option<String>,
    ) -> std::result::Result<Self, aob_runtime::Error> {
        let mut c = Config::default();
        let bytes = |name: &str, into: &mut usize| -> std::result::Result<(), aob_runtime::Error> {
            if let Some(v) = var(name) {
                *into = v.trim().parse().map_err(|_| {
                    aob_runtime::Error::Config(format!("{name}=`{v}` is not a number of bytes"))
                })?;
            }
            Ok(())
        };
        bytes("AOB_ENGINE_WORKERS", &mut c.workers)?;
        bytes("AOB_MAX_MESSAGE_BYTES", &mut c.max_message_bytes)?;
        bytes("AOB_STATE_INLINE_LIMIT", &mut c.state_inline_limit)?;
        bytes("AOB_ITEM_INLINE_LIMIT", &mut c.item_inline_limit)?;
        bytes("AOB_MAX_STATE_BYTES", &mut c.max_state_bytes)?;
        if let Some(v) = var("AOB_HOLD_LIMIT") {
            c.hold_limit = humantime::parse_duration(v.trim()).map_err(|e| {
                aob_runtime::Error::Config(format!(
                    "AOB_HOLD_LIMIT=`{v}` is not a duration ({e}); write it like `30m` or `2h`"
                ))
            })?;
        }
        if c.workers == 0 {
            return Err(aob_runtime::Error::Config(
                "AOB_ENGINE_WORKERS must be at least 1".into(),
            ));
        }
        Ok(c)
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            workers: 64,
            max_message_bytes: 768 * 1024,
            state_inline_limit: 16 * 1024,
            item_inline_limit: 128,
            max_state_bytes: 900 * 1024,
            hold_limit: Duration::from_secs(3600),
        }
    }
}

/// Counters, for tests and `aob bench`.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Events applied.
    pub events: AtomicU64,
    /// Compare-and-set writes that lost and were retried.
    pub cas_conflicts: AtomicU64,
    /// Start commands rejected.
    pub rejected: AtomicU64,
    /// Messages dead-lettered.
    pub dead_letters: AtomicU64,
    /// Results applied from the copy read as they were published.
    pub early: AtomicU64,
    /// Results applied as a function handed them over directly (`aob.<tenant>.handoff.<run>`).
    pub handoffs: AtomicU64,
    /// Results held (redelivered later) because the stored run had not started their attempt.
    pub held: AtomicU64,
    /// Messages that could not be handled for a transient reason and were retried later.
    pub retried: AtomicU64,
    /// Stored outboxes found older than the duplicate window and not published again.
    pub outbox_skipped: AtomicU64,
}

/// How long a state is trusted as current for sending tasks before its write lands, at
/// most; never more than half the streams' duplicate window (see [`Engine::dedup_within`]).
pub const EARLY_TASKS_WITHIN: Duration = Duration::from_secs(60);

/// The streams an engine publishes to with message ids whose duplicates must be dropped.
const DEDUPLICATED: [&str; 4] = [
    aob_streams::CMD,
    aob_streams::TASKS,
    aob_streams::HISTORY,
    aob_streams::AUDIT,
];

struct Cached {
    state: RunState,
    revision: u64,
    /// When the state was known to be the stored one (written or read).
    known: Instant,
}

/// A loaded run state: value, revision, when it was known current, and whether it came
/// from the cache.
type Loaded = (RunState, u64, Instant, bool);

/// The engine.
pub struct Engine<S: RunStore = NatsStore> {
    js: jetstream::Context,
    store: S,
    registry: Registry,
    timers: Timers,
    payloads: PayloadStore,
    cfg: Config,
    defs: Mutex<HashMap<(String, String, u32), Arc<Compiled>>>,
    runs: Mutex<HashMap<String, Cached>>,
    resolved: Mutex<HashMap<String, Value>>,
    /// Half the shortest duplicate window of the streams the engine publishes to: a
    /// publish repeated within it is certainly dropped by the server.
    dedup_within: Duration,
    /// Counters.
    pub metrics: Arc<Metrics>,
}

impl Engine<NatsStore> {
    /// An engine on the `AOB_RUNS` bucket.
    pub async fn connect(
        client: async_nats::Client,
        payloads: PayloadStore,
        cfg: Config,
    ) -> Result<Self> {
        let js = jetstream::new(client);
        let kv = js.get_key_value(aob_streams::RUNS).await.map_err(|e| {
            aob_runtime::Error::Topology(format!("bucket {}: {e}", aob_streams::RUNS))
        })?;
        Engine::with_store(js, NatsStore(kv), payloads, cfg).await
    }
}

/// A message for a worker: from a stream, a result read as it was published, or a result
/// handed over directly.
enum Inbound {
    Stored(Box<Message>),
    Early(async_nats::Message),
    Handoff(async_nats::Message),
}

/// Where a message came from and what it says.
enum Parsed {
    Start {
        tenant: String,
        run_id: String,
        cmd: StartCommand,
    },
    Signal {
        tenant: String,
        run_id: String,
        signal: Signal,
    },
    Result(StepResult),
}

impl<S: RunStore> Engine<S> {
    /// An engine on any run store (tests wrap the NATS one).
    pub async fn with_store(
        js: jetstream::Context,
        store: S,
        payloads: PayloadStore,
        cfg: Config,
    ) -> Result<Self> {
        let registry = Registry::open(&js).await?;
        let timers = Timers::open(&js).await?;
        let dedup_within = duplicate_window(&js).await? / 2;
        Ok(Engine {
            dedup_within,
            js,
            store,
            registry,
            timers,
            payloads,
            cfg,
            defs: Mutex::default(),
            runs: Mutex::default(),
            resolved: Mutex::default(),
            metrics: Arc::default(),
        })
    }

    /// How long after a state write its outbox may still be published again: half the
    /// shortest duplicate window of the streams it goes to, read from the server at start.
    pub fn dedup_within(&self) -> Duration {
        self.dedup_within
    }

    /// The run store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// The timers handle (the timer service runs beside the engine).
    pub fn timers(&self) -> &Timers {
        &self.timers
    }

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
            .messages()
            .await
            .map_err(|e| aob_runtime::Error::Nats(format!("consuming commands: {e}")))?;
        let res_msgs = res
            .stream()
            .max_messages_per_batch(batch)
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
            Ok(r) => match self.process(Parsed::Result(r), None).await {
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
        match self.process(parsed, Some(&msg)).await {
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
                let give_up = match &e {
                    // The store answered, and after this long the run still has not
                    // started the attempt: it never will (a result from elsewhere).
                    Error::Ahead { .. } if age >= self.cfg.hold_limit => Some(format!(
                        "held {}s and the run never reached this attempt: {e}",
                        age.as_secs()
                    )),
                    Error::Ahead { .. } => {
                        self.metrics.held.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(%subject, delivered, "held: {e}");
                        None
                    }
                    e if e.is_transient() => {
                        // A slow or absent store or server: never a reason to drop what
                        // the engine needs. Retried with backoff, however long it takes.
                        self.metrics.retried.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(%subject, delivered, "engine will retry a message: {e}");
                        None
                    }
                    e => Some(e.to_string()),
                };
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

    /// Records why a message was refused: a rejection event for starts, a dead letter always.
    async fn refuse(&self, msg: &Message, subject: &str, reason: &str) {
        self.metrics.dead_letters.fetch_add(1, Ordering::Relaxed);
        bus::dead_letter_with_id(
            &self.js,
            "engine",
            subject,
            &msg.payload,
            reason,
            msg_id(msg).as_deref(),
        )
        .await;
        if subject.ends_with(".cmd.start")
            && let Some(tenant) = subjects::tenant_of(subject).filter(|t| subjects::is_token(t))
        {
            // What can be read of a refused body: one parse for both fields.
            let body = serde_json::from_slice::<Value>(&msg.payload).ok();
            let field = |name: &str| body.as_ref()?.get(name)?.as_str();
            let run_id = field("run_id")
                .filter(|r| subjects::is_token(r))
                .map_or_else(|| derived_run_id(msg), str::to_string);
            if let Err(e) = self
                .reject(tenant, &run_id, field("workflow"), reason, None)
                .await
            {
                // Whether the run exists is unknown: write nothing into it.
                tracing::warn!(%subject, "refused start not announced on its run: {e}");
            }
        }
    }

    /// Publishes a start's rejection on its run's history subject and in the audit, unless
    /// a run with that id exists: a rejection never lands in a run. Errors only when the
    /// store cannot say whether the run exists.
    async fn reject(
        &self,
        tenant: &str,
        run_id: &str,
        workflow: Option<&str>,
        reason: &str,
        details: Option<Value>,
    ) -> Result<()> {
        self.metrics.rejected.fetch_add(1, Ordering::Relaxed);
        if self
            .store
            .get(&RunState::key(tenant, run_id))
            .await?
            .is_some()
        {
            tracing::warn!(%tenant, %run_id, "a start reusing the id of an existing run was refused: {reason}");
            return Ok(());
        }
        let ev = machine::rejection(tenant, run_id, reason, details, now_ms());
        if let Ok(body) = serde_json::to_vec(&ev) {
            let subject = subjects::history(tenant, run_id, ev.kind.token());
            if let Err(e) = bus::publish_acked(
                &self.js,
                subject,
                &format!("hist.{run_id}.rejected"),
                body.into(),
            )
            .await
            {
                tracing::error!("could not publish a rejection: {e}");
            }
        }
        let mut record = DecisionRecord::of_history(&ev, workflow, None);
        record.record_id = format!("{tenant}.{run_id}.rejected");
        let audited = match bus::publish_record(&self.js, &record).await {
            Ok(ack) => ack.await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = audited {
            tracing::error!("could not audit a rejection: {e}");
        }
        Ok(())
    }

    fn parse(&self, msg: &Message) -> std::result::Result<Parsed, String> {
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
    fn parse_result(
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
    async fn process(&self, parsed: Parsed, msg: Option<&Message>) -> Result<bool> {
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

    /// Admits a start: a run id that is taken is never written to (a repeat of the start
    /// that made the run is dropped, any other start reported); a start that fails
    /// admission is rejected on its run's history subject and dead-lettered.
    async fn start(
        &self,
        tenant: &str,
        run_id: &str,
        cmd: StartCommand,
        msg: Option<&Message>,
    ) -> Result<bool> {
        let key = RunState::key(tenant, run_id);
        if let Some((bytes, _)) = self.store.get(&key).await? {
            let run: RunState = serde_json::from_slice(&bytes).map_err(|e| Error::Corrupt {
                what: format!("run state {key}"),
                message: e.to_string(),
            })?;
            if run.workflow == cmd.workflow
                && cmd.version.is_none_or(|v| v == run.version)
                && self.payloads.hydrate(run.input.clone()).await?
                    == self.payloads.hydrate(cmd.input.clone()).await?
            {
                // The same start again (outside the duplicate window): nothing to do.
                return Ok(false);
            }
            let reason = format!(
                "run id `{run_id}` is taken by a run of `{}` v{} with another input; this start of `{}` was not applied (use another run id)",
                run.workflow, run.version, cmd.workflow
            );
            self.dead_letter_start(msg, &reason).await;
            return Ok(false);
        }
        let (wf, version) = match self.registry.get(tenant, &cmd.workflow, cmd.version).await {
            Ok(x) => x,
            Err(e @ aob_runtime::Error::WorkflowNotFound { .. }) => {
                let reason = e.to_string();
                self.reject(tenant, run_id, Some(&cmd.workflow), &reason, None)
                    .await?;
                self.dead_letter_start(msg, &reason).await;
                return Ok(false);
            }
            Err(e) => return Err(e.into()),
        };
        let def = self.compiled(tenant, wf, version)?;
        if let Some(schema) = &def.wf.input {
            let input = self.payloads.hydrate(cmd.input.clone()).await?;
            let problems = input_problems(schema, &input);
            if !problems.is_empty() {
                let reason = format!(
                    "input does not match the input schema of `{}` v{version}: {}",
                    def.wf.name,
                    problems.join("; ")
                );
                self.reject(
                    tenant,
                    run_id,
                    Some(&cmd.workflow),
                    &reason,
                    Some(json!({"errors": problems})),
                )
                .await?;
                self.dead_letter_start(msg, &reason).await;
                return Ok(false);
            }
        }
        let mut cmd = cmd;
        let workflow = cmd.workflow.clone();
        cmd.input = self
            .payloads
            .offload(cmd.input, &format!("{tenant}/{run_id}/input"))
            .await?;
        let started = self
            .apply(
                tenant,
                run_id,
                Some(def),
                Event::Start {
                    tenant: tenant.to_string(),
                    run_id: run_id.to_string(),
                    cmd,
                },
            )
            .await;
        match started {
            Err(Error::TooLarge(why)) => {
                self.reject(tenant, run_id, Some(&workflow), &why, None)
                    .await?;
                self.dead_letter_start(msg, &why).await;
                Ok(false)
            }
            other => other,
        }
    }

    /// Dead-letters a start the engine will not apply, so `aob dlq ls` shows it and
    /// `aob dlq replay` can publish it again once its cause is fixed.
    async fn dead_letter_start(&self, msg: Option<&Message>, reason: &str) {
        let Some(msg) = msg else { return };
        self.metrics.dead_letters.fetch_add(1, Ordering::Relaxed);
        bus::dead_letter_with_id(
            &self.js,
            "engine",
            &msg.subject,
            &msg.payload,
            reason,
            msg_id(msg).as_deref(),
        )
        .await;
    }

    /// Offloads a result's output too large to keep in run state. Called only for a result
    /// the run will accept, so a stale or duplicate result writes nothing.
    async fn offload_output(&self, event: &mut Event) -> Result<()> {
        if let Event::Result(r) = event
            && let Outcome::Completed { output } = &mut r.outcome
            && aob_runtime::payload::reference(output).is_none()
            && serde_json::to_vec(output).map(|b| b.len()).unwrap_or(0)
                > if r.at.item.is_some() {
                    self.cfg.item_inline_limit
                } else {
                    self.cfg.state_inline_limit
                }
        {
            let key = format!("{}/{}/{}.state", r.tenant, r.run_id, r.at.token());
            let inline = std::mem::take(output);
            *output = self.offload_always(inline, &key).await?;
        }
        Ok(())
    }

    async fn offload_always(&self, value: Value, key: &str) -> Result<Value> {
        if aob_runtime::payload::reference(&value).is_some() {
            return Ok(value);
        }
        Ok(self.payloads.offload_with_threshold(value, key, 0).await?)
    }

    fn compiled(
        &self,
        tenant: &str,
        wf: aob_model::Workflow,
        version: u32,
    ) -> Result<Arc<Compiled>> {
        let key = (tenant.to_string(), wf.name.clone(), version);
        if let Some(c) = self.defs.lock().ok().and_then(|m| m.get(&key).cloned()) {
            return Ok(c);
        }
        let c = Arc::new(
            Compiled::new(wf, version).map_err(|message| Error::Corrupt {
                what: format!("workflow {} v{version}", key.1),
                message,
            })?,
        );
        if let Ok(mut m) = self.defs.lock() {
            m.insert(key, c.clone());
        }
        Ok(c)
    }

    async fn definition_of(&self, state: &RunState) -> Result<Arc<Compiled>> {
        let key = (state.tenant.clone(), state.workflow.clone(), state.version);
        if let Some(c) = self.defs.lock().ok().and_then(|m| m.get(&key).cloned()) {
            return Ok(c);
        }
        let (wf, version) = self
            .registry
            .get(&state.tenant, &state.workflow, Some(state.version))
            .await?;
        self.compiled(&state.tenant, wf, version)
    }

    async fn load(&self, key: &str) -> Result<Option<Loaded>> {
        // Taken out of the cache: only this run's worker touches it, and a successful
        // write puts the next state back.
        if let Some(c) = self.runs.lock().ok().and_then(|mut m| m.remove(key)) {
            return Ok(Some((c.state, c.revision, c.known, true)));
        }
        let known = Instant::now();
        match self.store.get(key).await? {
            None => Ok(None),
            Some((bytes, rev)) => {
                let state: RunState =
                    serde_json::from_slice(&bytes).map_err(|e| Error::Corrupt {
                        what: format!("run state {key}"),
                        message: e.to_string(),
                    })?;
                Ok(Some((state, rev, known, false)))
            }
        }
    }

    /// Applies one event to a run, retrying on compare-and-set conflicts; true when it
    /// changed the run.
    async fn apply(
        &self,
        tenant: &str,
        run_id: &str,
        def: Option<Arc<Compiled>>,
        mut event: Event,
    ) -> Result<bool> {
        let key = RunState::key(tenant, run_id);
        loop {
            let loaded = self.load(&key).await?;
            let (state, rev, known, from_cache) = match loaded {
                Some((state, rev, known, from_cache)) => (Some(state), rev, known, from_cache),
                None => (None, 0, Instant::now(), false),
            };
            let def = match (&def, &state) {
                (Some(d), _) => d.clone(),
                (None, Some(s)) => self.definition_of(s).await?,
                (None, None) if matches!(event, Event::Result(_)) => {
                    return Err(ahead(&key, &event));
                }
                (None, None) => {
                    tracing::debug!(%key, "event for an unknown run ignored");
                    return Ok(false);
                }
            };
            if let Some(s) = &state {
                if let Event::Result(r) = &event
                    && machine::is_current(s, &r.at)
                {
                    self.offload_output(&mut event).await?;
                }
                self.resolve_for_conditions(&def, s, &event).await?;
            }
            let lookup = |p: &str| self.resolved.lock().ok().and_then(|m| m.get(p).cloned());
            // A stored outbox is dealt with once, here, and cleared by the next write.
            let mut recovered = false;
            if let Some(s) = &state
                && !from_cache
                && !s.outbox.is_empty()
            {
                recovered = true;
                self.recover_outbox(&key, s, &event, &def, &lookup).await?;
            }
            let existed = state.is_some();
            let (mut next, effects) =
                match machine::transition(&def, state, event.clone(), now_ms(), &lookup) {
                    machine::Transition::Changed(next, effects) => (next, effects),
                    machine::Transition::Unchanged(unchanged) => {
                        // Stale or duplicate: keep the state cached as it was, its
                        // outbox cleared if this pass dealt with it.
                        let Some(mut state) = unchanged else {
                            return Ok(false);
                        };
                        let mut revision = rev;
                        if recovered {
                            state.outbox.clear();
                            state.outbox_cause = None;
                            match self.write(&key, &state, Some(rev)).await? {
                                Ok(r) => revision = r,
                                // Someone wrote a newer state (with its own outbox).
                                Err(_) => return Ok(false),
                            }
                        }
                        if let Ok(mut m) = self.runs.lock() {
                            m.insert(
                                key.clone(),
                                Cached {
                                    state,
                                    revision,
                                    known,
                                },
                            );
                        }
                        return Ok(false);
                    }
                    // A cached state may be behind the store (another engine wrote): it
                    // stays out of the cache, and the next pass reads the store.
                    machine::Transition::Unresolved(paths) => {
                        return Err(Error::Runtime(aob_runtime::Error::Payload(format!(
                            "could not load {} for a condition of run {key}; retrying",
                            paths.join(", ")
                        ))));
                    }
                    machine::Transition::Ahead(_) if from_cache => continue,
                    machine::Transition::Ahead(_) => return Err(ahead(&key, &event)),
                };
            // Tasks go out now, while the state is written (see the module docs).
            let early = if known.elapsed() < EARLY_TASKS_WITHIN.min(self.dedup_within) {
                Some(self.send_tasks(&effects).await?)
            } else {
                None
            };
            let mut effects = effects;
            self.bound_outputs(&mut next, &mut effects).await?;
            next.outbox = machine::stored_outbox(&effects);
            next.outbox_cause = Some(event.id());
            let body = encode(&key, &next)?;
            if body.len() > self.cfg.max_state_bytes {
                // Written, the state would be refused by the server and the run would stall
                // in silence: it ends instead, with the reason in its history.
                return self.fail_oversized(&key, &def, body.len()).await;
            }
            let written = self.write_bytes(&key, body, existed.then_some(rev)).await?;
            match written {
                Ok(new_rev) => {
                    let known = Instant::now();
                    self.metrics.events.fetch_add(1, Ordering::Relaxed);
                    // Cached only once published: if publishing fails, the redelivered
                    // event loads the stored state and publishes its outbox again.
                    self.publish(&next.workflow, next.version, &effects, early)
                        .await?;
                    if !next.status.is_terminal()
                        && let Ok(mut m) = self.runs.lock()
                    {
                        m.insert(
                            key.clone(),
                            Cached {
                                state: next,
                                revision: new_rev,
                                known,
                            },
                        );
                    }
                    return Ok(true);
                }
                Err(_conflict) => {
                    self.metrics.cas_conflicts.fetch_add(1, Ordering::Relaxed);
                    if !existed {
                        // Someone created this run already: a duplicate start.
                        if matches!(event, Event::Start { .. }) {
                            return Ok(false);
                        }
                    }
                }
            }
        }
    }

    /// Keeps step outputs the engine assembled (a for_each step's list) out of the run
    /// record and the history when large: offloaded once, the same reference in the state,
    /// the step's `step_completed` event and the run's `completed` event.
    async fn bound_outputs(&self, next: &mut RunState, effects: &mut [Effect]) -> Result<()> {
        // Only outputs this transition set can be new: the steps it completed (results
        // were bounded before the transition; what is left is lists the engine assembled).
        let completed: Vec<String> = effects
            .iter()
            .filter_map(|e| match e {
                Effect::History { event }
                    if event.kind == HistoryKind::StepCompleted && event.item.is_none() =>
                {
                    event.step.clone()
                }
                _ => None,
            })
            .collect();
        let mut moved: HashMap<String, Value> = HashMap::new();
        for id in completed {
            let Some(output) = next.steps.get_mut(&id).and_then(|st| st.output.as_mut()) else {
                continue;
            };
            if !output.is_array() {
                continue;
            }
            if aob_runtime::payload::reference(output).is_some()
                || serde_json::to_vec(output).map_or(0, |b| b.len()) <= self.cfg.state_inline_limit
            {
                continue;
            }
            let key = format!("{}/{}/{id}.output", next.tenant, next.run_id);
            let r = self.offload_always(std::mem::take(output), &key).await?;
            *output = r.clone();
            moved.insert(id.clone(), r);
        }
        if moved.is_empty() {
            return Ok(());
        }
        for e in effects.iter_mut() {
            let Effect::History { event } = e else {
                continue;
            };
            let Some(data) = event.data.as_mut() else {
                continue;
            };
            match (event.kind, event.step.as_ref(), event.item) {
                (HistoryKind::StepCompleted, Some(step), None) => {
                    if let Some(r) = moved.get(step) {
                        data["output"] = r.clone();
                    }
                }
                (HistoryKind::Completed, _, _) => {
                    if let Some(outputs) = data.get_mut("outputs").and_then(Value::as_object_mut) {
                        for (id, r) in &moved {
                            if let Some(o) = outputs.get_mut(id) {
                                *o = r.clone();
                            }
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Ends a run whose next state would be larger than `max_state_bytes`, from its stored
    /// state, with the reason.
    async fn fail_oversized(&self, key: &str, def: &Compiled, size: usize) -> Result<bool> {
        let why = format!(
            "the run's state would grow to {size} bytes, over the limit of {} (keep large values in step outputs, which travel by reference, or split the work into smaller runs)",
            self.cfg.max_state_bytes
        );
        tracing::warn!(%key, "{why}");
        let Some((state, rev, _, _)) = self.load(key).await? else {
            return Err(Error::TooLarge(why));
        };
        let machine::Transition::Changed(next, effects) =
            machine::fail_run(def, state, why, now_ms())
        else {
            return Ok(false);
        };
        let mut next = next;
        next.outbox = machine::stored_outbox(&effects);
        next.outbox_cause = Some("oversized".to_string());
        if self.write(key, &next, Some(rev)).await?.is_err() {
            // Someone wrote meanwhile: the event is applied again to the newer state.
            return Err(Error::Store(crate::store::StoreError(format!(
                "{key} changed while failing an oversized run"
            ))));
        }
        self.publish(&next.workflow, next.version, &effects, None)
            .await?;
        Ok(true)
    }

    /// Writes a run state: create-only without a revision, else compare-and-set on it.
    async fn write(
        &self,
        key: &str,
        state: &RunState,
        revision: Option<u64>,
    ) -> Result<std::result::Result<u64, crate::store::Conflict>> {
        self.write_bytes(key, encode(key, state)?, revision).await
    }

    /// [`Self::write`] of a state already encoded.
    async fn write_bytes(
        &self,
        key: &str,
        body: Vec<u8>,
        revision: Option<u64>,
    ) -> Result<std::result::Result<u64, crate::store::Conflict>> {
        Ok(match revision {
            None => self.store.create(key, body.into()).await?,
            Some(rev) => self.store.update(key, body.into(), rev).await?,
        })
    }

    /// Deals with the outbox of a state read from the store. Its writer publishes it and
    /// only then acks the event that produced it, so the outbox may be unpublished only if
    /// that writer died (or failed to publish) before the ack. Publishing it again is
    /// harmless while the streams still drop the repeats as duplicates, and the event that
    /// produced it comes back within the consumer's ack wait; so it is published again
    /// when it was written within [`Self::dedup_within`], or when `event` is a redelivery
    /// of its cause. Anything older was published long ago: publishing it again would
    /// run a task twice or repeat a run's `completed` event. The caller's next write
    /// clears it either way.
    async fn recover_outbox(
        &self,
        key: &str,
        state: &RunState,
        event: &Event,
        def: &Compiled,
        resolve: &(dyn Fn(&str) -> Option<Value> + Sync),
    ) -> Result<()> {
        let age = Duration::from_millis(now_ms().saturating_sub(state.updated_ms));
        let cause = state.outbox_cause.as_deref() == Some(event.id().as_str());
        if age < self.dedup_within || cause {
            let mut effects = Vec::with_capacity(state.outbox.len());
            for e in &state.outbox {
                match e {
                    Effect::Launched { at, deadline_ms } => {
                        let task = machine::task_of(def, state, at, *deadline_ms, resolve)
                            .ok_or_else(|| {
                                Error::Runtime(aob_runtime::Error::Payload(format!(
                                    "the task of {} in the outbox of {key} cannot be rebuilt yet",
                                    at.token()
                                )))
                            })?;
                        effects.push(Effect::Task {
                            task: Box::new(task),
                        });
                    }
                    other => effects.push(other.clone()),
                }
            }
            self.publish(&state.workflow, state.version, &effects, None)
                .await?;
        } else {
            self.metrics.outbox_skipped.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%key, ?age, "stored outbox older than the duplicate window: not published again");
        }
        Ok(())
    }

    /// Loads offloaded outputs (and input) that conditions read, so the machine sees values.
    async fn resolve_for_conditions(
        &self,
        def: &Compiled,
        state: &RunState,
        event: &Event,
    ) -> Result<()> {
        let mut wanted = Vec::new();
        for id in &def.condition_reads {
            if let Some(p) = state
                .steps
                .get(id)
                .and_then(|s| s.output.as_ref())
                .and_then(aob_runtime::payload::reference)
            {
                wanted.push(p);
            }
        }
        if let Event::Result(StepResult {
            outcome: Outcome::Completed { output },
            ..
        }) = event
            && let Some(p) = aob_runtime::payload::reference(output)
        {
            wanted.push(p);
        }
        if let Some(p) = aob_runtime::payload::reference(&state.input) {
            wanted.push(p);
        }
        // Room for this event's values is made first, so none of them is evicted before
        // the machine reads it.
        if let Ok(mut m) = self.resolved.lock()
            && m.len() + wanted.len() > 1024
        {
            m.clear();
        }
        for p in wanted {
            if self
                .resolved
                .lock()
                .map(|m| m.contains_key(&p))
                .unwrap_or(false)
            {
                continue;
            }
            let r = json!({ aob_runtime::payload::REF_KEY: p });
            // A value that cannot be loaded now fails the event (it is retried): a
            // condition must not decide without it.
            let v = self.payloads.hydrate(r).await?;
            if let Ok(mut m) = self.resolved.lock() {
                m.insert(p, v);
            }
        }
        Ok(())
    }

    /// Sends the tasks among `effects`; the returned futures resolve to the server's acks.
    async fn send_tasks(&self, effects: &[Effect]) -> Result<Vec<PublishAckFuture>> {
        let mut acks = Vec::new();
        for e in effects {
            if let Effect::Task { task } = e {
                acks.push(self.send_task(task).await?);
            }
        }
        Ok(acks)
    }

    /// Sends one task, its context and config offloaded when the body is too large.
    async fn send_task(&self, task: &Task) -> Result<PublishAckFuture> {
        let id = format!("task.{}.{}", task.run_id, task.at.token());
        let subject = subjects::task(&task.tenant, &task.node_type);
        let mut body = serde_json::to_vec(task).unwrap_or_default();
        if body.len() > self.payloads.threshold() {
            let mut task = task.clone();
            let base = format!("{}/{}/{}", task.tenant, task.run_id, task.at.token());
            task.context = self
                .payloads
                .offload_with_threshold(task.context, &format!("{base}.context"), 0)
                .await?;
            task.config = self
                .payloads
                .offload(task.config, &format!("{base}.config"))
                .await?;
            body = serde_json::to_vec(&task).unwrap_or_default();
        }
        Ok(bus::publish(&self.js, subject, &id, body.into()).await?)
    }

    /// Publishes effects; all publishes are sent first, then their acks awaited together.
    /// `sent` holds the acks of the tasks when [`Self::send_tasks`] sent them already.
    async fn publish(
        &self,
        workflow: &str,
        version: u32,
        effects: &[Effect],
        sent: Option<Vec<PublishAckFuture>>,
    ) -> Result<()> {
        let tasks_sent = sent.is_some();
        let mut acks = sent.unwrap_or_default();
        for e in effects {
            match e {
                Effect::Task { task } if !tasks_sent => acks.push(self.send_task(task).await?),
                Effect::Task { .. }
                | Effect::Launched { .. }
                | Effect::Timer { .. }
                | Effect::CancelTimer { .. } => {}
                Effect::History { event } => {
                    let (subject, id, body) = history_message(event);
                    acks.push(bus::publish(&self.js, subject, &id, body.into()).await?);
                    let record = DecisionRecord::of_history(event, Some(workflow), Some(version));
                    acks.push(bus::publish_record(&self.js, &record).await?);
                }
            }
        }
        for e in effects {
            match e {
                Effect::Timer { timer, due_ms } => self.set_timer(effects, timer, *due_ms).await?,
                Effect::CancelTimer { timer } => self.cancel_timer(effects, timer).await?,
                _ => {}
            }
        }
        for a in acks {
            a.await
                .map_err(|e| aob_runtime::Error::Nats(format!("publish not acknowledged: {e}")))?;
        }
        Ok(())
    }

    async fn cancel_timer(
        &self,
        effects: &[Effect],
        timer: &aob_model::wire::TimerKind,
    ) -> Result<()> {
        let Some((tenant, run_id)) = run_of(effects) else {
            return Ok(());
        };
        let name = machine::timer_name(timer);
        self.timers
            .cancel(&format!("{tenant}.{run_id}.{name}"))
            .await?;
        Ok(())
    }

    async fn set_timer(
        &self,
        effects: &[Effect],
        timer: &aob_model::wire::TimerKind,
        due_ms: u64,
    ) -> Result<()> {
        let Some((tenant, run_id)) = run_of(effects) else {
            return Ok(());
        };
        let name = machine::timer_name(timer);
        let body = serde_json::to_value(Signal::Timer {
            timer: timer.clone(),
        })
        .unwrap_or_default();
        let t = Timer {
            due_ms,
            subject: subjects::internal_signal(&tenant, &run_id),
            msg_id: format!("timer.{run_id}.{name}"),
            body,
        };
        self.timers
            .set(&format!("{tenant}.{run_id}.{name}"), &t)
            .await?;
        Ok(())
    }
}

/// A run state as stored.
fn encode(key: &str, state: &RunState) -> Result<Vec<u8>> {
    serde_json::to_vec(state).map_err(|e| Error::Corrupt {
        what: format!("run state {key}"),
        message: e.to_string(),
    })
}

/// The run an effect list belongs to: every task and history event carries it, and a
/// transition always records at least one history event with its timers.
fn run_of(effects: &[Effect]) -> Option<(String, String)> {
    effects.iter().find_map(|e| match e {
        Effect::Task { task } => Some((task.tenant.clone(), task.run_id.clone())),
        Effect::History { event } => Some((event.tenant.clone(), event.run_id.clone())),
        Effect::Launched { .. } | Effect::Timer { .. } | Effect::CancelTimer { .. } => None,
    })
}

/// The shortest duplicate window of the streams the engine publishes to.
async fn duplicate_window(js: &jetstream::Context) -> Result<Duration> {
    let mut shortest = Duration::MAX;
    for name in DEDUPLICATED {
        let mut stream = js
            .get_stream(name)
            .await
            .map_err(|e| aob_runtime::Error::Topology(format!("stream {name}: {e}")))?;
        let info = stream
            .info()
            .await
            .map_err(|e| aob_runtime::Error::Nats(format!("stream {name}: {e}")))?;
        shortest = shortest.min(info.config.duplicate_window);
    }
    Ok(shortest)
}

/// Subscribes to `subject` in the engines' core queue group.
async fn engine_queue(client: async_nats::Client, subject: &str) -> Result<async_nats::Subscriber> {
    client
        .queue_subscribe(subject.to_string(), subjects::ENGINE_QUEUE.into())
        .await
        .map_err(|e| aob_runtime::Error::Nats(format!("subscribing to {subject}: {e}")).into())
}

/// The error that holds a result until its run's stored state catches up.
fn ahead(key: &str, event: &Event) -> Error {
    let at = match event {
        Event::Result(r) => r.at.token(),
        _ => String::new(),
    };
    Error::Ahead {
        run: key.to_string(),
        at,
    }
}

/// Subject, message id and body of a history event.
pub fn history_message(event: &HistoryEvent) -> (String, String, Vec<u8>) {
    let subject = subjects::history(&event.tenant, &event.run_id, event.kind.token());
    let id = format!("hist.{}.{}", event.run_id, event.seq);
    (subject, id, serde_json::to_vec(event).unwrap_or_default())
}

/// The run id a start command will get: its `run_id`, else the one derived from the message.
fn start_run_id(msg: &Message) -> String {
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
fn msg_id(msg: &Message) -> Option<String> {
    msg.headers
        .as_ref()
        .and_then(|h| h.get("Nats-Msg-Id"))
        .map(|v| v.as_str().to_string())
}

/// A run id from the message itself, the same on every redelivery: the `Nats-Msg-Id`
/// when it is a valid token, else a ULID from the publish time and stream sequence.
fn derived_run_id(msg: &Message) -> String {
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

fn input_problems(schema: &Value, input: &Value) -> Vec<String> {
    match jsonschema::validator_for(schema) {
        Ok(v) => v
            .iter_errors(input)
            .map(|e| {
                let path = e.instance_path().to_string();
                if path.is_empty() {
                    e.to_string()
                } else {
                    format!("{path}: {e}")
                }
            })
            .collect(),
        Err(e) => vec![format!("the workflow's input schema is not valid: {e}")],
    }
}

/// Events of one run always go to the same worker, so they are applied in order; that
/// includes its start (a duplicate start lands on the same worker as its twin), so the
/// first result finds the run's state cached, not still on its way to the store.
fn shard_of(msg: &Message, workers: usize) -> usize {
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

fn shard_of_key(key: &str, workers: usize) -> usize {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut h);
    (h.finish() as usize) % workers
}

/// `<tenant>.<run>` of a signal or result subject (the subject itself for any other).
fn run_key(subject: &str) -> String {
    let parts: Vec<&str> = subject.split('.').collect();
    match parts.as_slice() {
        ["aob", t, "cmd", "signal" | "internal", run]
        | ["aob", t, "result", run]
        | ["aob", t, "handoff", run] => format!("{t}.{run}"),
        _ => subject.to_string(),
    }
}

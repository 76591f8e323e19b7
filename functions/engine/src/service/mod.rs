//! The engine's I/O around the pure machine: consume commands and results, keep run state
//! by compare-and-set, publish the effects, then ack. In parts:
//! - `intake`: the three ways events come in, routed to one worker per run; parsing;
//!   what is acked, retried or dead-lettered;
//! - `admission`: whether a start becomes a run (and why not);
//! - `runs`: the run loop: load, outbox recovery, apply, bound, write by
//!   compare-and-set;
//! - `effects`: tasks, history, audit records and timers going out;
//! - [`rules`]: the decisions about time and failure, pure and tested without a server.
//!
//! This module holds the engine itself, its settings, counters and errors.
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

mod admission;
mod effects;
mod intake;
pub mod rules;
mod runs;

pub use effects::history_message;
use intake::{derived_run_id, msg_id};

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
            Error::Runtime(e) => e.is_transient(),
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
    /// The timer service's lease: how long it lasts, and how long the timers bucket may
    /// fail before the service, and with it the engine, stops with an error.
    pub timer_lease: aob_runtime::timers::LeaseConfig,
}

impl Config {
    /// The environment variables [`Config::from_env`] reads, with their meaning.
    pub const ENV_VARS: [(&'static str, &'static str); 7] = [
        ("AOB_ENGINE_WORKERS", "runs processed at once (default 64)"),
        (
            "AOB_HTTP_ADDR",
            "address for /healthz, /readyz and /metrics (Prometheus), e.g. 0.0.0.0:9090 (default: not served)",
        ),
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
            timer_lease: aob_runtime::timers::LeaseConfig::default(),
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
    /// The tenants' Rego policies, evaluated before each task is sent.
    policies: aob_policy::Policies,
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
        // The watch task lives as long as the policies' handles: as long as the engine.
        let (policies, _watch) = aob_policy::Policies::from_env(&js)
            .await
            .map_err(|e| aob_runtime::Error::Config(format!("policies: {e}")))?;
        Ok(Engine {
            policies,
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

    /// The engine's settings.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The run store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// The timers handle (the timer service runs beside the engine).
    pub fn timers(&self) -> &Timers {
        &self.timers
    }
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

//! What a handler gets besides its task: a cancellation signal, an emitter for progress
//! and streamed chunks, the fields of its DecisionRecord it may set (model, provider,
//! tokens, cost), and its secrets. The same on every transport.

use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use aob_model::audit::DecisionRecord;
use aob_model::wire::StepRef;

use crate::secrets::Secrets;

/// One thing a handler reports while it runs: published on
/// `aob.<tenant>.stream.<run>.<step>` (see [`aob_streams::subjects::stream`]), outside the
/// history stream, so watchers see it live and nothing stores it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Emitted {
    /// Tenant.
    pub tenant: String,
    /// Run.
    pub run_id: String,
    /// The attempt.
    #[serde(flatten)]
    pub at: StepRef,
    /// Its position among this attempt's emissions (0, 1, 2, ...).
    pub seq: u64,
    /// What it is.
    #[serde(flatten)]
    pub body: Emission,
}

/// What a handler emits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "emit", rename_all = "snake_case")]
pub enum Emission {
    /// How far the work is (`done` of `total`, when known) with a note.
    Progress {
        /// Units done.
        done: u64,
        /// Units in all, when known.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        total: Option<u64>,
        /// A note.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        note: Option<String>,
    },
    /// A piece of the output as it is produced (a model's tokens).
    Chunk {
        /// The text.
        text: String,
    },
    /// Anything else, as JSON.
    Event {
        /// The value.
        data: Value,
    },
}

/// Where emissions go: NATS core publishes on the NATS transport, a list in memory in tests.
pub trait Emitter: Send + Sync {
    /// Sends one emission; best effort (a lost progress note loses nothing the run needs).
    fn emit(&self, e: Emitted) -> BoxFuture<'_, ()>;
    /// Hands a progress report to the engine, which keeps it in the run's history; `Ok`
    /// once it is stored. The default keeps nothing.
    fn report<'a>(
        &'a self,
        _tenant: &'a str,
        _run_id: &'a str,
        _signal: &'a aob_model::wire::Signal,
    ) -> BoxFuture<'a, crate::Result<()>> {
        Box::pin(async { Ok(()) })
    }
}

/// An emitter that drops everything.
#[derive(Debug, Default)]
pub struct Discard;

impl Emitter for Discard {
    fn emit(&self, _: Emitted) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

/// An emitter that keeps emissions (and reports) in memory, for tests.
#[derive(Debug, Default)]
pub struct Collect(
    pub Mutex<Vec<Emitted>>,
    pub Mutex<Vec<aob_model::wire::Signal>>,
);

impl Emitter for Collect {
    fn emit(&self, e: Emitted) -> BoxFuture<'_, ()> {
        if let Ok(mut v) = self.0.lock() {
            v.push(e);
        }
        Box::pin(async {})
    }
    fn report<'a>(
        &'a self,
        _tenant: &'a str,
        _run_id: &'a str,
        signal: &'a aob_model::wire::Signal,
    ) -> BoxFuture<'a, crate::Result<()>> {
        if let Ok(mut v) = self.1.lock() {
            v.push(signal.clone());
        }
        Box::pin(async { Ok(()) })
    }
}

/// The DecisionRecord fields a handler may set: what model answered, and what it cost.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Usage {
    /// Model name.
    pub model: Option<String>,
    /// Provider name.
    pub provider: Option<String>,
    /// Tokens in.
    pub tokens_in: Option<u64>,
    /// Tokens out.
    pub tokens_out: Option<u64>,
    /// Cost in US dollars.
    pub cost_usd: Option<f64>,
    /// The policy that allowed the work (`<module>@<version>`).
    pub policy_id: Option<String>,
    /// Its result (`allow`).
    pub policy_result: Option<String>,
}

impl Usage {
    /// Writes the fields that are set into a record.
    pub fn apply(&self, r: &mut DecisionRecord) {
        if self.model.is_some() {
            r.model.clone_from(&self.model);
        }
        if self.provider.is_some() {
            r.provider.clone_from(&self.provider);
        }
        if self.tokens_in.is_some() {
            r.tokens_in = self.tokens_in;
        }
        if self.tokens_out.is_some() {
            r.tokens_out = self.tokens_out;
        }
        if self.cost_usd.is_some() {
            r.cost_usd = self.cost_usd;
        }
        if self.policy_id.is_some() {
            r.policy_id.clone_from(&self.policy_id);
        }
        if self.policy_result.is_some() {
            r.policy_result.clone_from(&self.policy_result);
        }
    }
}

/// The context of one attempt.
pub struct Context {
    tenant: String,
    run_id: String,
    at: StepRef,
    cancel: CancellationToken,
    emitter: Arc<dyn Emitter>,
    seq: std::sync::atomic::AtomicU64,
    usage: Mutex<Usage>,
    secrets: Secrets,
    records: Mutex<Vec<DecisionRecord>>,
    traceparent: Option<String>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("run_id", &self.run_id)
            .field("at", &self.at)
            .finish_non_exhaustive()
    }
}

impl Context {
    /// A context for the attempt `at` of a run.
    pub fn new(
        tenant: &str,
        run_id: &str,
        at: &StepRef,
        cancel: CancellationToken,
        emitter: Arc<dyn Emitter>,
        secrets: Secrets,
    ) -> Self {
        Context {
            tenant: tenant.to_string(),
            run_id: run_id.to_string(),
            at: at.clone(),
            cancel,
            emitter,
            seq: std::sync::atomic::AtomicU64::new(0),
            usage: Mutex::default(),
            secrets,
            records: Mutex::default(),
            traceparent: None,
        }
    }

    /// The same context under the W3C trace context the task arrived with.
    pub fn with_traceparent(mut self, traceparent: Option<String>) -> Self {
        self.traceparent = traceparent;
        self
    }

    /// The W3C trace context the task arrived with (`traceparent`), to pass on.
    pub fn traceparent(&self) -> Option<String> {
        self.traceparent.clone()
    }

    /// A context for handler tests: nothing emitted, no secrets, never cancelled.
    pub fn detached(task: &aob_model::wire::Task) -> Self {
        Context::new(
            &task.tenant,
            &task.run_id,
            &task.at,
            CancellationToken::new(),
            Arc::new(Discard),
            Secrets::none(),
        )
    }

    /// Cancelled when the run is aborted or the transport gives the attempt up: stop work.
    pub fn cancelled(&self) -> &CancellationToken {
        &self.cancel
    }

    /// Emits progress, a chunk or an event for watchers (best effort).
    pub async fn emit(&self, body: Emission) {
        let seq = self.seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.emitter
            .emit(Emitted {
                tenant: self.tenant.clone(),
                run_id: self.run_id.clone(),
                at: self.at.clone(),
                seq,
                body,
            })
            .await;
    }

    /// Reports a milestone (an agent's turn) for the run's history: the engine records it as
    /// a `step_progress` event while this attempt is current. `seq` numbers the attempt's
    /// reports and must be the same on every delivery of the attempt, so a report sent
    /// again is recorded once. Unlike [`Context::emit`], this is durable: an error means it
    /// may not have been stored.
    pub async fn report(
        &self,
        seq: u64,
        message: impl Into<String>,
        data: Value,
    ) -> crate::Result<()> {
        let signal = aob_model::wire::Signal::Progress {
            at: self.at.clone(),
            seq,
            message: message.into(),
            data,
        };
        self.emitter
            .report(&self.tenant, &self.run_id, &signal)
            .await
    }

    /// Records what model answered and what it cost, on the attempt's DecisionRecord;
    /// fields left `None` keep what an earlier call set.
    pub fn set_usage(&self, usage: Usage) {
        if let Ok(mut u) = self.usage.lock() {
            u.model = usage.model.or(u.model.take());
            u.provider = usage.provider.or(u.provider.take());
            u.tokens_in = usage.tokens_in.or(u.tokens_in);
            u.tokens_out = usage.tokens_out.or(u.tokens_out);
            u.cost_usd = usage.cost_usd.or(u.cost_usd);
            u.policy_id = usage.policy_id.or(u.policy_id.take());
            u.policy_result = usage.policy_result.or(u.policy_result.take());
        }
    }

    /// What [`Context::set_usage`] recorded.
    pub fn usage(&self) -> Usage {
        self.usage.lock().map(|u| u.clone()).unwrap_or_default()
    }

    /// A record of its own for one decision inside the attempt (a model call, a tool call,
    /// a policy evaluation), stored with the attempt's record. `suffix` names the decision
    /// within the attempt (`call.<digest>`, `tool.2`, ...) and must be the same on every
    /// delivery of the attempt: the record id is built from it, so the audit keeps one row.
    pub fn record(
        &self,
        kind: aob_model::audit::AuditKind,
        suffix: &str,
        fill: impl FnOnce(&mut DecisionRecord),
    ) {
        let now = crate::now_us();
        let mut r = DecisionRecord::new(
            format!(
                "{}.{}.{}.{suffix}",
                self.tenant,
                self.run_id,
                self.at.token()
            ),
            &self.tenant,
            &self.run_id,
            kind,
            "fn",
            now,
        );
        r.step_id = Some(self.at.step.clone());
        r.attempt = Some(self.at.attempt);
        r.item = self.at.item;
        r.iteration = self.at.iteration;
        fill(&mut r);
        if let Ok(mut v) = self.records.lock() {
            v.push(r);
        }
    }

    /// The records added with [`Context::record`], taken.
    pub fn take_records(&self) -> Vec<DecisionRecord> {
        self.records
            .lock()
            .map(|mut v| std::mem::take(&mut *v))
            .unwrap_or_default()
    }

    /// The function's secrets (resolved at call time, never written anywhere).
    pub fn secrets(&self) -> &Secrets {
        &self.secrets
    }
}

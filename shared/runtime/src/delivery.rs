//! The delivery contract, written once for every transport: take a task, run it, settle the
//! result with the engine and store the attempt's audit records, and only then acknowledge
//! the task. A transport only says how to do each of those with its own messages: it
//! implements [`Delivery`]. What runs the task is a [`Runner`]: a [`Handler`] in this
//! process, or a function elsewhere that a bridge invokes ([`crate::remote`]).
//! [`memory::Delivery`] drives handler tests without a server.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use aob_model::audit::DecisionRecord;
use aob_model::wire::{StepResult, Task};

use crate::context::{Context, Emitter};
use crate::secrets::Secrets;
use crate::{Handler, PayloadStore, Result, execute_in};

/// One task as a transport delivered it.
pub trait Delivery: Send + Sync {
    /// Where it arrived (a subject), for dead letters and logs.
    fn origin(&self) -> &str;
    /// The task's body.
    fn body(&self) -> &[u8];
    /// The signal that stops this task's handler (its run was aborted).
    fn cancel_for(&self, task: &Task) -> CancellationToken;
    /// Keeps the task from being delivered again while it runs; called every heartbeat.
    fn in_progress(&self) -> BoxFuture<'_, ()>;
    /// Gets the result to the engine: `Ok` once the engine has it or it is stored where
    /// the engine will take it.
    fn settle<'a>(&'a self, result: &'a StepResult) -> BoxFuture<'a, Result<()>>;
    /// Stores the attempt's audit record.
    fn audit<'a>(&'a self, record: &'a DecisionRecord) -> BoxFuture<'a, Result<()>>;
    /// Done: the task is not delivered again.
    fn ack(&self) -> BoxFuture<'_, ()>;
    /// Deliver the task again after `delay`.
    fn retry(&self, delay: Duration) -> BoxFuture<'_, ()>;
    /// The task cannot be used: record why (a dead letter) and never deliver it again.
    fn refuse<'a>(&'a self, reason: &'a str) -> BoxFuture<'a, ()>;
    /// The W3C trace context the task arrived with (a `traceparent` header).
    fn traceparent(&self) -> Option<String> {
        None
    }
}

/// What the contract needs besides the handler: the same for every delivery of a function.
#[derive(Clone)]
pub struct Contract {
    /// Offloaded payloads.
    pub payloads: PayloadStore,
    /// Largest task body accepted, in bytes.
    pub max_message_bytes: usize,
    /// Interval of [`Delivery::in_progress`] while a task runs.
    pub heartbeat: Duration,
    /// Where handlers' emissions go.
    pub emitter: Arc<dyn Emitter>,
    /// The function's secrets.
    pub secrets: Secrets,
}

impl std::fmt::Debug for Contract {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Contract")
            .field("max_message_bytes", &self.max_message_bytes)
            .field("heartbeat", &self.heartbeat)
            .finish_non_exhaustive()
    }
}

/// What became of one delivery.
#[derive(Debug, Clone, PartialEq)]
pub enum Delivered {
    /// The result is settled and its record stored; the task was acknowledged.
    Settled(StepResult),
    /// The run was aborted: the handler stopped, the task was acknowledged without a result.
    Aborted,
    /// The task could not be used; it was refused with this reason.
    Refused(String),
    /// The result or its record could not be stored; the task comes back later.
    Retried(String),
    /// Handed to a store that delivers it on (a Knative broker), whose reply is settled
    /// when it comes; the task was acknowledged.
    Forwarded,
}

/// What running one task came to, wherever it ran.
// Made once per task and taken apart at once: boxing the result would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Ran {
    /// The result, with the attempt's audit records (the attempt's own last).
    Done {
        /// The result.
        result: StepResult,
        /// Its records.
        records: Vec<DecisionRecord>,
    },
    /// The run was aborted: nobody waits for a result.
    Aborted,
    /// The task cannot be used, for this reason.
    Refused(String),
    /// Handed over to something that keeps it and delivers it on (a Knative broker backed
    /// by JetStream); the reply is settled when it comes back, elsewhere.
    Forwarded,
    /// Running it failed before a result existed (a remote function that did not answer,
    /// or was throttled): deliver the task again after `delay`.
    Failed {
        /// Why.
        reason: String,
        /// When to try again.
        delay: Duration,
    },
}

/// What runs a task: a handler in this process ([`Local`]), or a function somewhere else
/// that a bridge invokes. The delivery contract around it is the same.
pub trait Runner: Send + Sync + 'static {
    /// Node type served.
    fn node_type(&self) -> &str;
    /// Runs one parsed task (`body` is the task as it arrived); `cx` carries the
    /// cancellation of its run.
    fn run<'a>(
        &'a self,
        task: Task,
        body: &'a [u8],
        cx: &'a Context,
        contract: &'a Contract,
    ) -> BoxFuture<'a, Ran>;
}

/// A handler runs in this process.
impl<H: Handler> Runner for H {
    fn node_type(&self) -> &str {
        Handler::node_type(self)
    }
    fn run<'a>(
        &'a self,
        task: Task,
        _body: &'a [u8],
        cx: &'a Context,
        contract: &'a Contract,
    ) -> BoxFuture<'a, Ran> {
        Box::pin(async move {
            let Some((result, record)) = execute_in(self, task, &contract.payloads, cx).await
            else {
                return Ran::Aborted;
            };
            let mut records = cx.take_records();
            for r in &mut records {
                r.workflow.clone_from(&record.workflow);
                r.workflow_version = record.workflow_version;
                r.node_type.clone_from(&record.node_type);
                r.actor.clone_from(&record.actor);
            }
            records.push(record);
            Ran::Done { result, records }
        })
    }
}

/// Runs the contract for one delivery, in a span under the trace context the task came
/// with.
pub async fn deliver<R: Runner, D: Delivery>(runner: &R, d: &D, contract: &Contract) -> Delivered {
    let began = std::time::Instant::now();
    let traceparent = d.traceparent();
    let delivered =
        crate::trace::scope(traceparent.as_deref(), deliver_once(runner, d, contract)).await;
    let outcome = match &delivered {
        Delivered::Settled(r) => match r.outcome {
            aob_model::wire::Outcome::Completed { .. } => "completed",
            aob_model::wire::Outcome::Failed { .. } => "failed",
            aob_model::wire::Outcome::Waiting { .. } => "waiting",
        },
        Delivered::Aborted => "aborted",
        Delivered::Refused(_) => "refused",
        Delivered::Retried(_) => "retried",
        Delivered::Forwarded => "forwarded",
    };
    crate::telemetry::record_task(runner.node_type(), outcome, began.elapsed());
    delivered
}

async fn deliver_once<R: Runner, D: Delivery>(runner: &R, d: &D, contract: &Contract) -> Delivered {
    let task = match crate::nats::parse_task(d.body(), d.origin(), contract.max_message_bytes) {
        Ok(t) => t,
        Err(reason) => {
            d.refuse(&reason).await;
            return Delivered::Refused(reason);
        }
    };
    let mut span = crate::trace::start(
        format!("{} {}", runner.node_type(), task.at.step),
        opentelemetry::trace::SpanKind::Consumer,
        vec![
            opentelemetry::KeyValue::new("aob.tenant", task.tenant.clone()),
            opentelemetry::KeyValue::new("aob.run_id", task.run_id.clone()),
            opentelemetry::KeyValue::new("aob.workflow", task.workflow.clone()),
            opentelemetry::KeyValue::new("aob.step", task.at.step.clone()),
            opentelemetry::KeyValue::new("aob.attempt", i64::from(task.at.attempt)),
            opentelemetry::KeyValue::new("aob.node_type", task.node_type.clone()),
        ],
    );
    let cx = Context::new(
        &task.tenant,
        &task.run_id,
        &task.at,
        d.cancel_for(&task),
        contract.emitter.clone(),
        contract.secrets.clone(),
    )
    .with_traceparent(span.traceparent());
    let heartbeat = async {
        let mut tick = tokio::time::interval(contract.heartbeat);
        tick.tick().await;
        loop {
            tick.tick().await;
            d.in_progress().await;
        }
    };
    // Heartbeats go on while the task runs and while the engine takes the result.
    let work = async {
        match runner.run(task, d.body(), &cx, contract).await {
            Ran::Done {
                result,
                mut records,
            } => {
                for r in &mut records {
                    crate::trace::stamp(r);
                }
                let audit_all = async {
                    for r in &records {
                        d.audit(r).await?;
                    }
                    Ok(())
                };
                let (settled, audited) = tokio::join!(d.settle(&result), audit_all);
                match settled.and(audited) {
                    Ok(()) => Delivered::Settled(result),
                    Err(e) => retry(d, e.to_string(), Duration::from_secs(1)).await,
                }
            }
            Ran::Failed { reason, delay } => retry(d, reason, delay).await,
            Ran::Aborted => Delivered::Aborted,
            Ran::Forwarded => Delivered::Forwarded,
            Ran::Refused(reason) => {
                d.refuse(&reason).await;
                Delivered::Refused(reason)
            }
        }
    };
    let delivered = tokio::select! {
        o = work => o,
        // The heartbeat loop never ends on its own.
        _ = heartbeat => Delivered::Aborted,
    };
    match &delivered {
        Delivered::Settled(r) => {
            if let aob_model::wire::Outcome::Failed { error } = &r.outcome {
                span.fail(error.message.clone());
            }
        }
        Delivered::Retried(reason) | Delivered::Refused(reason) => span.fail(reason.clone()),
        Delivered::Aborted => span.set("aob.aborted", true),
        Delivered::Forwarded => span.set("aob.forwarded", true),
    }
    // Settled, forwarded, or aborted (nobody waits for the result): done with the task.
    if matches!(
        delivered,
        Delivered::Settled(_) | Delivered::Aborted | Delivered::Forwarded
    ) {
        d.ack().await;
    }
    delivered
}

/// Asks for the task again after `delay`: no result was stored.
async fn retry<D: Delivery>(d: &D, reason: String, delay: Duration) -> Delivered {
    tracing::warn!(
        origin = d.origin(),
        "no result stored, the task will come back: {reason}"
    );
    d.retry(delay).await;
    Delivered::Retried(reason)
}

/// An in-memory transport: one delivery whose outcomes are kept. The function side of the
/// remote transports replies with them ([`crate::remote::answer`]); handler tests drive the
/// same contract as every transport through it, without a server.
pub mod memory {
    use std::sync::Mutex;

    use super::*;

    /// What the contract did with a [`Delivery`].
    #[derive(Debug, Default, Clone, PartialEq)]
    pub struct Seen {
        /// Results settled.
        pub settled: Vec<StepResult>,
        /// Audit records stored.
        pub audited: Vec<DecisionRecord>,
        /// Acknowledged.
        pub acked: bool,
        /// Retries asked for.
        pub retried: usize,
        /// Refusal reasons.
        pub refused: Vec<String>,
        /// In-progress signals sent.
        pub in_progress: usize,
    }

    /// One task in memory.
    #[derive(Debug, Default)]
    pub struct Delivery {
        /// Subject it came on.
        pub origin: String,
        /// Its body.
        pub body: Vec<u8>,
        /// Cancelled to abort it.
        pub cancel: CancellationToken,
        /// Settling fails while this is true (a store that refuses).
        pub fail_settle: std::sync::atomic::AtomicBool,
        /// The trace context it came with.
        pub traceparent: Option<String>,
        /// What happened.
        pub seen: Mutex<Seen>,
    }

    impl Delivery {
        /// A delivery of `task` on its tenant's task subject.
        pub fn of(task: &Task) -> Self {
            Delivery {
                origin: aob_streams::subjects::task(&task.tenant, &task.node_type),
                body: serde_json::to_vec(task).unwrap_or_default(),
                ..Default::default()
            }
        }

        /// What happened so far.
        pub fn seen(&self) -> Seen {
            self.seen.lock().map(|s| s.clone()).unwrap_or_default()
        }

        fn note(&self, f: impl FnOnce(&mut Seen)) {
            if let Ok(mut s) = self.seen.lock() {
                f(&mut s);
            }
        }
    }

    impl super::Delivery for Delivery {
        fn origin(&self) -> &str {
            &self.origin
        }
        fn body(&self) -> &[u8] {
            &self.body
        }
        fn cancel_for(&self, _: &Task) -> CancellationToken {
            self.cancel.clone()
        }
        fn in_progress(&self) -> BoxFuture<'_, ()> {
            self.note(|s| s.in_progress += 1);
            Box::pin(async {})
        }
        fn settle<'a>(&'a self, result: &'a StepResult) -> BoxFuture<'a, Result<()>> {
            let fail = self.fail_settle.load(std::sync::atomic::Ordering::SeqCst);
            if !fail {
                self.note(|s| s.settled.push(result.clone()));
            }
            Box::pin(async move {
                if fail {
                    Err(crate::Error::Nats("the store refused the result".into()))
                } else {
                    Ok(())
                }
            })
        }
        fn audit<'a>(&'a self, record: &'a DecisionRecord) -> BoxFuture<'a, Result<()>> {
            self.note(|s| s.audited.push(record.clone()));
            Box::pin(async { Ok(()) })
        }
        fn ack(&self) -> BoxFuture<'_, ()> {
            self.note(|s| s.acked = true);
            Box::pin(async {})
        }
        fn retry(&self, _: Duration) -> BoxFuture<'_, ()> {
            self.note(|s| s.retried += 1);
            Box::pin(async {})
        }
        fn refuse<'a>(&'a self, reason: &'a str) -> BoxFuture<'a, ()> {
            self.note(|s| s.refused.push(reason.to_string()));
            Box::pin(async {})
        }
        fn traceparent(&self) -> Option<String> {
            self.traceparent.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::context::{Collect, Emission, Usage};
    use aob_model::wire::{Outcome, StepError};
    use serde_json::json;

    /// Reports progress, says what model it used, and echoes its config.
    struct Echo;

    impl Handler for Echo {
        fn node_type(&self) -> &'static str {
            "echo"
        }
        async fn handle(&self, task: Task, cx: &Context) -> Result<Outcome, StepError> {
            cx.emit(Emission::Progress {
                done: 1,
                total: Some(2),
                note: None,
            })
            .await;
            cx.emit(Emission::Chunk { text: "hi".into() }).await;
            cx.set_usage(Usage {
                model: Some("m-1".into()),
                tokens_in: Some(12),
                tokens_out: Some(3),
                cost_usd: Some(0.25),
                ..Usage::default()
            });
            if task.config.get("wait").is_some() {
                cx.cancelled().cancelled().await;
            }
            Ok(Outcome::Completed {
                output: task.config,
            })
        }
    }

    fn contract(emitted: Arc<Collect>) -> Contract {
        Contract {
            payloads: PayloadStore::from_url("memory:///", 1 << 20).unwrap(),
            max_message_bytes: 1 << 20,
            heartbeat: Duration::from_secs(60),
            emitter: emitted,
            secrets: Secrets::none(),
        }
    }

    fn task(config: serde_json::Value) -> Task {
        aob_testkit::task("echo", "s", config, json!({}))
    }

    #[tokio::test]
    async fn a_task_is_settled_audited_then_acked_with_what_the_handler_reported() {
        let emitted = Arc::new(Collect::default());
        let d = memory::Delivery::of(&task(json!({"x": 1})));
        let out = deliver(&Echo, &d, &contract(emitted.clone())).await;
        let seen = d.seen();
        assert!(matches!(out, Delivered::Settled(_)), "{out:?}");
        assert!(seen.acked);
        assert_eq!(seen.settled.len(), 1);
        assert_eq!(
            seen.settled[0].outcome,
            Outcome::Completed {
                output: json!({"x": 1})
            }
        );
        let record = &seen.audited[0];
        assert_eq!(record.model.as_deref(), Some("m-1"));
        assert_eq!((record.tokens_in, record.tokens_out), (Some(12), Some(3)));
        assert_eq!(record.cost_usd, Some(0.25));
        let emitted = emitted.0.lock().unwrap();
        assert_eq!(emitted.len(), 2);
        assert_eq!(emitted[1].seq, 1);
        assert_eq!(emitted[1].body, Emission::Chunk { text: "hi".into() });
    }

    #[tokio::test]
    async fn garbage_is_refused_a_failed_settle_retried_an_abort_acked() {
        let c = contract(Arc::new(Collect::default()));
        let garbage = memory::Delivery {
            origin: "aob.acme.task.echo".into(),
            body: b"not json".to_vec(),
            ..Default::default()
        };
        assert!(matches!(
            deliver(&Echo, &garbage, &c).await,
            Delivered::Refused(_)
        ));
        assert!(!garbage.seen().acked && garbage.seen().refused.len() == 1);

        let failing = memory::Delivery::of(&task(json!({})));
        failing
            .fail_settle
            .store(true, std::sync::atomic::Ordering::SeqCst);
        assert!(matches!(
            deliver(&Echo, &failing, &c).await,
            Delivered::Retried(_)
        ));
        let seen = failing.seen();
        assert!(!seen.acked, "acked before the result was stored");
        assert_eq!(seen.retried, 1);

        let aborted = memory::Delivery::of(&task(json!({"wait": true})));
        aborted.cancel.cancel();
        assert_eq!(deliver(&Echo, &aborted, &c).await, Delivered::Aborted);
        let seen = aborted.seen();
        assert!(seen.acked && seen.settled.is_empty());
    }
}

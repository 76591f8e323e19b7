//! Messages on the bus. Every type here has a JSON fixture test (parse → serialize → reparse).

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Body of `aob.<tenant>.cmd.start`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartCommand {
    /// Workflow name.
    pub workflow: String,
    /// Version to run; the latest published one when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u32>,
    /// Run input (validated against the workflow's input schema).
    #[serde(default)]
    pub input: Value,
    /// Run id to use (`[A-Za-z0-9_-]`, at most 128 characters); derived from the message when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_id: Option<String>,
    /// Who starts the run (a user id): the run's starter, who may not approve their own
    /// run unless a step allows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
    /// Start as a fork of an earlier run: reuse its recorded outputs before a step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fork: Option<ForkSpec>,
    /// Set by the engine when a `workflow` step starts this run as its child.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<ParentRef>,
}

/// What a forked run takes from its source run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForkSpec {
    /// The run forked from (same tenant).
    pub run: String,
    /// The first step executed live: the outputs of the steps that finished before it
    /// started in the source run are reused.
    pub from: String,
    /// Outputs to use instead of the recorded ones, by step id.
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub set: serde_json::Map<String, Value>,
}

/// The parent of a child run: the attempt of its `workflow` step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParentRef {
    /// The parent's run id (same tenant).
    pub run: String,
    /// The attempt waiting for the child.
    pub at: StepRef,
}

/// Body of `aob.<tenant>.cmd.signal.<run>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "signal", rename_all = "snake_case", deny_unknown_fields)]
pub enum Signal {
    /// Stop the run: nothing new is scheduled and running steps are told to stop.
    Cancel {
        /// Why, shown in the history.
        #[serde(default)]
        reason: Option<String>,
        /// Who asked.
        #[serde(default)]
        by: Option<String>,
        /// Run the compensations of the completed steps before the run ends.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        compensate: bool,
    },
    /// A person's decision on the approval request of a `human` step.
    Decide {
        /// The step.
        step: String,
        /// Who decides (a user id).
        by: String,
        /// Roles the decider holds.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        roles: Vec<String>,
        /// Approve or reject.
        decision: Verdict,
        /// A comment (the reason, for a rejection).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        comment: Option<String>,
        /// New values for the request's editable fields.
        #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
        set: serde_json::Map<String, Value>,
        /// Chosen by the sender to find the engine's answer in the history; a decision
        /// with an id the run has handled is not handled again.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<String>,
        /// The request decided on, as the decider saw it (the waiting attempt's token): a
        /// decision on a request that was since replaced (by a rollback) is refused.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        request: Option<String>,
    },
    /// Start no new step until resumed (steps already running finish).
    Pause {
        /// Who asked.
        #[serde(default)]
        by: Option<String>,
    },
    /// Go on after a pause.
    Resume {
        /// Who asked.
        #[serde(default)]
        by: Option<String>,
    },
    /// Restore the run to the checkpoint before a step and run again from there.
    Rollback {
        /// The step.
        to: String,
        /// Who asked.
        #[serde(default)]
        by: Option<String>,
        /// Why.
        #[serde(default)]
        reason: Option<String>,
        /// Chosen by the sender; a rollback with an id the run has handled is not taken
        /// again (a redelivery).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<String>,
    },
    /// A durable timer of the engine fired.
    Timer {
        /// Which one.
        timer: TimerKind,
    },
    /// A running attempt reports a milestone worth keeping in the run's history (an agent's
    /// turn). Sent by functions on the internal subject; the engine records it as a
    /// `step_progress` event if the attempt is still the current one.
    Progress {
        /// The attempt.
        at: StepRef,
        /// Its position among the attempt's reports (0, 1, 2, ...): with `at`, its identity.
        seq: u64,
        /// A line for people.
        message: String,
        /// Details.
        #[serde(default)]
        data: Value,
    },
}

/// Timers the engine sets for itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum TimerKind {
    /// Start the next attempt of a step after its backoff.
    Retry {
        /// Which attempt.
        at: StepRef,
    },
    /// An attempt ran past the step's timeout.
    StepTimeout {
        /// Which attempt.
        at: StepRef,
    },
    /// The run ran past the workflow's timeout.
    RunTimeout,
    /// The deadline of an approval request (round 0, then one more per escalation).
    Approval {
        /// The waiting attempt.
        at: StepRef,
        /// Which deadline.
        round: u32,
    },
}

/// A decision on an approval request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Approve.
    Approve,
    /// Reject.
    Reject,
}

/// One attempt of one step (one item of a for_each, one iteration of a loop).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct StepRef {
    /// Step id.
    pub step: String,
    /// for_each element index.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub item: Option<u32>,
    /// Loop iteration (0-based).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iteration: Option<u32>,
    /// Attempt (1-based).
    pub attempt: u32,
    /// The run's generation when the attempt was made: a rollback starts a new one, and a
    /// result of an older generation is stale whatever its step and attempt. 0, the first
    /// generation, is left out of the JSON and of the token.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub generation: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl StepRef {
    /// A dot-free token naming this attempt, used in message ids and timer keys.
    pub fn token(&self) -> String {
        let mut t = format!(
            "{}-i{}-l{}-a{}",
            self.step,
            self.item.map_or(-1, i64::from),
            self.iteration.map_or(-1, i64::from),
            self.attempt
        );
        if self.generation > 0 {
            t.push_str(&format!("-g{}", self.generation));
        }
        t
    }
}

/// The actions a person approved for a task's step after a policy asked for approval
/// (`tool payments.refund`): the engine puts them in the task's context as `approved`.
pub fn approved_actions(context: &Value) -> Vec<String> {
    context
        .get("approved")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// Body of `aob.<tenant>.task.<node_type>`: one attempt for a function to run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Task {
    /// Tenant.
    pub tenant: String,
    /// Run id.
    pub run_id: String,
    /// Workflow name.
    pub workflow: String,
    /// Workflow version the run is pinned to.
    pub version: u32,
    /// Node type.
    pub node_type: String,
    /// Which attempt.
    #[serde(flatten)]
    pub at: StepRef,
    /// The step's type-specific fields, templates not yet rendered.
    pub config: Value,
    /// The run context the templates and expressions read (only what the step references).
    pub context: Value,
    /// When the attempt times out (ms since the Unix epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_ms: Option<u64>,
}

/// Whether a failure is worth retrying.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorClass {
    /// Transient: the engine retries per the step's policy.
    Retryable,
    /// Permanent: the step fails now.
    Terminal,
}

/// Why an attempt failed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepError {
    /// Retryable or terminal.
    pub class: ErrorClass,
    /// What went wrong.
    pub message: String,
    /// Structured reasons (validation errors, HTTP status, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<Value>,
    /// For a retryable error: the next attempt must not start sooner than this many
    /// milliseconds from now (a provider's `Retry-After`, a rate limit's next window). The
    /// engine waits the longer of this and the step's backoff.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
}

impl StepError {
    /// A retryable error.
    pub fn retryable(message: impl Into<String>) -> Self {
        StepError {
            class: ErrorClass::Retryable,
            message: message.into(),
            details: None,
            retry_after_ms: None,
        }
    }
    /// A terminal error.
    pub fn terminal(message: impl Into<String>) -> Self {
        StepError {
            class: ErrorClass::Terminal,
            message: message.into(),
            details: None,
            retry_after_ms: None,
        }
    }
    /// Asks for the next attempt to wait at least `after`.
    pub fn retry_after(mut self, after: std::time::Duration) -> Self {
        self.retry_after_ms = Some(after.as_millis() as u64);
        self
    }
    /// Adds structured details.
    pub fn with_details(mut self, details: Value) -> Self {
        self.details = Some(details);
        self
    }
}

/// What an attempt came to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    /// Done, with an output.
    Completed {
        /// The step's output.
        output: Value,
    },
    /// Failed.
    Failed {
        /// Why.
        error: StepError,
    },
    /// Parked: a later result for the same attempt completes it (durable timers, approvals).
    Waiting {
        /// When it is expected to resume (ms since the Unix epoch), if known.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        until_ms: Option<u64>,
        /// What the wait is about: for a `human` step, the rendered request (`summary`,
        /// `values`, `notified`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        detail: Option<Value>,
    },
}

/// Body of `aob.<tenant>.result.<run>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepResult {
    /// Tenant.
    pub tenant: String,
    /// Run id.
    pub run_id: String,
    /// Which attempt this answers.
    #[serde(flatten)]
    pub at: StepRef,
    /// What it came to.
    #[serde(flatten)]
    pub outcome: Outcome,
    /// How long the handler ran (ms).
    #[serde(default)]
    pub duration_ms: u64,
}

/// The engine's reply to a result handed to it on `aob.<tenant>.handoff.<run>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandoffReply {
    /// True when the run's stored state has taken the result into account (applied, or
    /// found a duplicate or stale): the sender has nothing left to do with it. False when
    /// the sender must publish it to `aob.<tenant>.result.<run>` as usual.
    pub settled: bool,
    /// Why the result was not settled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// What a history event reports (its subject's last token).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HistoryKind {
    /// The run was created.
    Started,
    /// A start command was refused (bad body, unknown workflow, invalid input).
    Rejected,
    /// A task was published for an attempt.
    StepScheduled,
    /// An attempt is parked until a later result.
    StepWaiting,
    /// A step completed.
    StepCompleted,
    /// An attempt failed and another will follow after a backoff.
    StepRetrying,
    /// A step failed for good.
    StepFailed,
    /// A step was skipped (its `when` was false, or its trigger rule cannot be met).
    StepSkipped,
    /// A loop step finished one iteration and starts another.
    LoopIteration,
    /// A running step reported a milestone (an agent's turn).
    StepProgress,
    /// Running steps of this run must stop (cancel or run failure).
    Abort,
    /// The run completed.
    Completed,
    /// The run failed.
    Failed,
    /// The run was cancelled.
    Cancelled,
    /// A `human` step asks people to decide.
    ApprovalRequested,
    /// A person decided on an approval request (the decision is recorded).
    ApprovalDecided,
    /// A decision was refused (not allowed, a second vote, an expired request); nothing
    /// else changed.
    DecisionRefused,
    /// An approval request's deadline passed; its action follows.
    ApprovalExpired,
    /// An approval request went to other deciders with a new deadline.
    ApprovalEscalated,
    /// The run was paused.
    Paused,
    /// The run was resumed.
    Resumed,
    /// The run was rolled back to the checkpoint before a step (a new generation).
    RolledBack,
    /// A completed step's compensation started.
    CompensationStarted,
    /// A step was compensated.
    StepCompensated,
    /// A step's compensation failed for good.
    CompensationFailed,
    /// The run ended after compensating its completed steps.
    Compensated,
}

impl HistoryKind {
    /// The subject token.
    pub fn token(self) -> &'static str {
        match self {
            HistoryKind::Started => "started",
            HistoryKind::Rejected => "rejected",
            HistoryKind::StepScheduled => "step_scheduled",
            HistoryKind::StepWaiting => "step_waiting",
            HistoryKind::StepCompleted => "step_completed",
            HistoryKind::StepRetrying => "step_retrying",
            HistoryKind::StepFailed => "step_failed",
            HistoryKind::StepSkipped => "step_skipped",
            HistoryKind::LoopIteration => "loop_iteration",
            HistoryKind::StepProgress => "step_progress",
            HistoryKind::Abort => "abort",
            HistoryKind::Completed => "completed",
            HistoryKind::Failed => "failed",
            HistoryKind::Cancelled => "cancelled",
            HistoryKind::ApprovalRequested => "approval_requested",
            HistoryKind::ApprovalDecided => "approval_decided",
            HistoryKind::DecisionRefused => "decision_refused",
            HistoryKind::ApprovalExpired => "approval_expired",
            HistoryKind::ApprovalEscalated => "approval_escalated",
            HistoryKind::Paused => "paused",
            HistoryKind::Resumed => "resumed",
            HistoryKind::RolledBack => "rolled_back",
            HistoryKind::CompensationStarted => "compensation_started",
            HistoryKind::StepCompensated => "step_compensated",
            HistoryKind::CompensationFailed => "compensation_failed",
            HistoryKind::Compensated => "compensated",
        }
    }

    /// True for the events that end a run.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            HistoryKind::Completed
                | HistoryKind::Failed
                | HistoryKind::Cancelled
                | HistoryKind::Compensated
                | HistoryKind::Rejected
        )
    }
}

/// Body of `aob.<tenant>.run.<run>.<kind>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryEvent {
    /// Run id.
    pub run_id: String,
    /// Tenant.
    pub tenant: String,
    /// Position in the run's history (1-based, no gaps).
    pub seq: u64,
    /// When (ms since the Unix epoch).
    pub ts_ms: u64,
    /// What happened.
    pub kind: HistoryKind,
    /// The step, for step events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    /// for_each element index.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub item: Option<u32>,
    /// Loop iteration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iteration: Option<u32>,
    /// Attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    /// Human-readable reason or summary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Extra data: the output of a completed step, the error of a failed one, ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
}

/// Body of `aob.<tenant>.dlq.<component>`: a message a component could not use.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// Component that refused it (`engine`, `fn.http`, ...).
    pub component: String,
    /// Subject it arrived on.
    pub subject: String,
    /// Why it was refused.
    pub reason: String,
    /// Its body as text (lossy UTF-8, cut to 4 KiB).
    pub body: String,
    /// Its full length in bytes.
    pub len: usize,
    /// When (ms since the Unix epoch).
    pub ts_ms: u64,
    /// The whole body, when it is UTF-8 text of at most [`DeadLetter::KEPT_BYTES`]: what
    /// `aob dlq replay` publishes again. Absent for binary or larger bodies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original: Option<String>,
    /// The message's `Nats-Msg-Id`, when it had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub msg_id: Option<String>,
}

impl DeadLetter {
    /// Largest body kept whole for a replay (512 KiB, so a dead letter stays under the
    /// server's 1 MiB message limit).
    pub const KEPT_BYTES: usize = 512 * 1024;

    /// The body to publish again, if it was kept.
    pub fn replayable(&self) -> Option<&str> {
        self.original.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::de::DeserializeOwned;

    fn roundtrip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(fixture: &str) {
        let parsed: T = serde_json::from_str(fixture).unwrap();
        let text = serde_json::to_string(&parsed).unwrap();
        let again: T = serde_json::from_str(&text).unwrap();
        assert_eq!(parsed, again);
    }

    #[test]
    fn fixtures_roundtrip() {
        roundtrip::<StartCommand>(include_str!("../fixtures/start.json"));
        roundtrip::<Signal>(include_str!("../fixtures/signal_cancel.json"));
        roundtrip::<Signal>(include_str!("../fixtures/signal_timer.json"));
        roundtrip::<Task>(include_str!("../fixtures/task.json"));
        roundtrip::<StepResult>(include_str!("../fixtures/result_completed.json"));
        roundtrip::<StepResult>(include_str!("../fixtures/result_failed.json"));
        roundtrip::<HistoryEvent>(include_str!("../fixtures/history.json"));
    }

    #[test]
    fn start_rejects_unknown_fields() {
        assert!(serde_json::from_str::<StartCommand>(r#"{"workflow":"a","inputs":{}}"#).is_err());
    }
}

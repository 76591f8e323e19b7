//! Run state, one record per run in the `AOB_RUNS` bucket (key `<tenant>.<run_id>`).
//! Only the engine writes it, by compare-and-set; everyone else reads.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::wire::{StepError, StepRef, Task, TimerKind, Verdict};

/// Status of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum RunStatus {
    /// Steps are being scheduled.
    Running,
    /// Every step finished and none failed.
    Completed,
    /// A step failed, or the run timed out.
    Failed,
    /// Cancelled by a signal.
    Cancelled,
    /// A step failed and the completed steps were compensated.
    Compensated,
}

impl RunStatus {
    /// True once the run can change no more.
    pub fn is_terminal(self) -> bool {
        self != RunStatus::Running
    }
}

/// Status of a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum StepStatus {
    /// Not started (waiting for its needs, or for a retry backoff).
    Pending,
    /// A task is out.
    Running,
    /// Parked until a later result (durable timer, approval).
    Waiting,
    /// Done.
    Completed,
    /// Failed for good.
    Failed,
    /// Not run.
    Skipped,
    /// Completed, then undone by its compensation.
    Compensated,
}

impl StepStatus {
    /// True once the step can change no more.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            StepStatus::Completed
                | StepStatus::Failed
                | StepStatus::Skipped
                | StepStatus::Compensated
        )
    }
}

/// Where a step (or one for_each item) is in its life. Stored as its status and attempt
/// (`{"status": "RUNNING", "attempt": 2}`), so records from before phases read as they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "PhaseRepr", into = "PhaseRepr")]
pub enum Phase {
    /// Not started: waiting for its needs (or, for an item, for a free slot).
    NotStarted,
    /// An attempt failed and the next waits for its backoff timer.
    BackingOff {
        /// The attempt the timer will start.
        next_attempt: u32,
    },
    /// A task is out for this attempt.
    Out {
        /// The attempt.
        attempt: u32,
    },
    /// The function reported it waits (a durable timer, later an approval).
    Waiting {
        /// The attempt.
        attempt: u32,
    },
    /// Finished: COMPLETED, FAILED or SKIPPED, after this many attempts (0 if skipped
    /// before one).
    Done {
        /// How it ended.
        status: StepStatus,
        /// Attempts made.
        attempts: u32,
    },
}

/// How a [`Phase`] is stored.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct PhaseRepr {
    status: StepStatus,
    #[serde(default)]
    attempt: u32,
}

impl From<PhaseRepr> for Phase {
    fn from(r: PhaseRepr) -> Phase {
        match r.status {
            StepStatus::Pending if r.attempt == 0 => Phase::NotStarted,
            StepStatus::Pending => Phase::BackingOff {
                next_attempt: r.attempt + 1,
            },
            StepStatus::Running => Phase::Out { attempt: r.attempt },
            StepStatus::Waiting => Phase::Waiting { attempt: r.attempt },
            status => Phase::Done {
                status,
                attempts: r.attempt,
            },
        }
    }
}

impl From<Phase> for PhaseRepr {
    fn from(p: Phase) -> PhaseRepr {
        PhaseRepr {
            status: p.status(),
            attempt: p.attempt(),
        }
    }
}

impl Phase {
    /// The status it shows (PENDING while not started or backing off).
    pub fn status(self) -> StepStatus {
        match self {
            Phase::NotStarted | Phase::BackingOff { .. } => StepStatus::Pending,
            Phase::Out { .. } => StepStatus::Running,
            Phase::Waiting { .. } => StepStatus::Waiting,
            Phase::Done { status, .. } => status,
        }
    }

    /// The latest attempt made (0 before the first).
    pub fn attempt(self) -> u32 {
        match self {
            Phase::NotStarted => 0,
            Phase::BackingOff { next_attempt } => next_attempt.saturating_sub(1),
            Phase::Out { attempt } | Phase::Waiting { attempt } => attempt,
            Phase::Done { attempts, .. } => attempts,
        }
    }

    /// Ended as `status` after the attempts made so far.
    pub fn done(self, status: StepStatus) -> Phase {
        Phase::Done {
            status,
            attempts: self.attempt(),
        }
    }

    /// Started and not finished: out, waiting, or backing off before a retry.
    pub fn is_active(self) -> bool {
        matches!(
            self,
            Phase::BackingOff { .. } | Phase::Out { .. } | Phase::Waiting { .. }
        )
    }

    /// Finished.
    pub fn is_done(self) -> bool {
        matches!(self, Phase::Done { .. })
    }

    /// The attempt out (or waiting) now, if any.
    pub fn attempt_out(self) -> Option<u32> {
        match self {
            Phase::Out { attempt } | Phase::Waiting { attempt } => Some(attempt),
            _ => None,
        }
    }
}

/// What kind of step it is, as its state shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// One attempt at a time.
    Single,
    /// One slot per element of a list.
    ForEach,
    /// Iterations until a condition holds.
    Loop,
}

/// What a step keeps by its shape while it runs: a loop its iteration, a for_each its
/// items and one slot per item. Stored as the fields `iteration`, `items` and `slots`, so
/// records written before read as they are.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(from = "ShapeRepr")]
pub enum ShapeState {
    /// One attempt at a time (also a for_each or loop step before it begins or after it
    /// ends: it keeps nothing then).
    #[default]
    Single,
    /// The current iteration of a loop.
    Loop {
        /// 0-based.
        iteration: u32,
    },
    /// A for_each step running its items.
    ForEach {
        /// The list, when short enough to keep (else evaluated again when needed).
        items: Option<Vec<Value>>,
        /// One per item.
        slots: Vec<Slot>,
    },
}

/// How a [`ShapeState`] is stored.
#[derive(Deserialize)]
struct ShapeRepr {
    #[serde(default)]
    iteration: Option<u32>,
    #[serde(default)]
    items: Option<Vec<Value>>,
    #[serde(default)]
    slots: Vec<Slot>,
}

impl From<ShapeRepr> for ShapeState {
    fn from(r: ShapeRepr) -> ShapeState {
        if !r.slots.is_empty() || r.items.is_some() {
            ShapeState::ForEach {
                items: r.items,
                slots: r.slots,
            }
        } else if let Some(iteration) = r.iteration {
            ShapeState::Loop { iteration }
        } else {
            ShapeState::Single
        }
    }
}

impl Serialize for ShapeState {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = serializer.serialize_map(None)?;
        match self {
            ShapeState::Single => {}
            ShapeState::Loop { iteration } => m.serialize_entry("iteration", iteration)?,
            ShapeState::ForEach { items, slots } => {
                if let Some(items) = items {
                    m.serialize_entry("items", items)?;
                }
                if !slots.is_empty() {
                    m.serialize_entry("slots", slots)?;
                }
            }
        }
        m.end()
    }
}

/// One unit of work of a step: the step itself, one for_each element, or one loop iteration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Slot {
    /// Where this item is (stored as `status` and `attempt`).
    #[serde(flatten)]
    pub phase: Phase,
    /// Output when completed (large values are references).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<Value>,
    /// Last error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<StepError>,
}

impl Slot {
    /// Where this item is.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Its status.
    pub fn status(&self) -> StepStatus {
        self.phase.status()
    }

    /// Its latest attempt (0 before the first).
    pub fn attempt(&self) -> u32 {
        self.phase.attempt()
    }

    /// A slot that has not started.
    pub fn pending() -> Self {
        Slot {
            phase: Phase::NotStarted,
            output: None,
            error: None,
        }
    }
}

/// State of one step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepState {
    /// Where the step is (stored as `status` and `attempt`; for a loop, the attempt of its
    /// current iteration).
    #[serde(flatten)]
    pub phase: Phase,
    /// Output when completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<Value>,
    /// Error when failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<StepError>,
    /// Why it was skipped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// First task published (ms since the Unix epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_ms: Option<u64>,
    /// Reached a terminal status (ms since the Unix epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_ms: Option<u64>,
    /// What it keeps by its shape while it runs (stored as `iteration`, or `items` and
    /// `slots`).
    #[serde(flatten)]
    pub shape: ShapeState,
    /// The run's history position when the step began: a rollback to this step restores
    /// what had finished before it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_seq: Option<u64>,
    /// The run's history position when the step finished (orders compensations).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_seq: Option<u64>,
    /// The open approval request of a waiting `human` step, or of a step whose action a
    /// policy holds for approval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<Box<Approval>>,
    /// Actions of this step a person approved after a policy asked (`tool payments.refund`):
    /// its tasks carry them, so the gateways let them run.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub grants: Vec<String>,
}

/// An approval request: who may decide, how many must agree, the votes so far.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Approval {
    /// What the deciders are asked (rendered from the run context).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<String>,
    /// The editable fields' values, as the last approver left them.
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub values: Value,
    /// Users who may decide.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub users: Vec<String>,
    /// Roles whose holders may decide.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub roles: Vec<String>,
    /// Approvals needed.
    pub required: u32,
    /// Whether the run's starter may decide.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_self: bool,
    /// 0, then one more per escalation.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub round: u32,
    /// When the current deadline passes (ms since the Unix epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_ms: Option<u64>,
    /// Decisions taken.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub votes: Vec<Vote>,
    /// For a request made by a policy: the action held (`tool payments.refund`); approving
    /// it runs the step again with the action allowed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
}

/// One person's decision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Vote {
    /// Who.
    pub by: String,
    /// What.
    pub decision: Verdict,
    /// Their comment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    /// When (ms since the Unix epoch).
    pub ts_ms: u64,
}

/// A run compensating its completed steps (after a failure or a cancel).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Compensation {
    /// Why the run compensates.
    pub reason: String,
    /// How the run ends once every compensation ran.
    pub end: RunStatus,
    /// Steps still to compensate, the next first (reverse completion order). Filled once
    /// no step is running any more.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub queue: Vec<String>,
    /// Whether `queue` was filled.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub planned: bool,
    /// The compensation out now: the compensated step and the attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current: Option<CompensationAttempt>,
    /// Steps whose compensation failed for good.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failed: Vec<String>,
}

/// One attempt of one compensation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompensationAttempt {
    /// The step being compensated.
    pub step: String,
    /// Where the compensation is (out, or backing off before a retry).
    #[serde(flatten)]
    pub phase: Phase,
}

impl StepState {
    /// Where this step is (a for_each step is `Out` while any of its items runs).
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Its status.
    pub fn status(&self) -> StepStatus {
        self.phase.status()
    }

    /// Its latest attempt (0 before the first).
    pub fn attempt(&self) -> u32 {
        self.phase.attempt()
    }

    /// What kind of step its state shows (a for_each or loop step while it runs).
    pub fn shape(&self) -> Shape {
        match self.shape {
            ShapeState::Single => Shape::Single,
            ShapeState::Loop { .. } => Shape::Loop,
            ShapeState::ForEach { .. } => Shape::ForEach,
        }
    }

    /// The current iteration of a loop step.
    pub fn iteration(&self) -> Option<u32> {
        match self.shape {
            ShapeState::Loop { iteration } => Some(iteration),
            _ => None,
        }
    }

    /// A for_each step's list, when kept.
    pub fn items(&self) -> Option<&Vec<Value>> {
        match &self.shape {
            ShapeState::ForEach { items, .. } => items.as_ref(),
            _ => None,
        }
    }

    /// A for_each step's slots (none for other shapes).
    pub fn slots(&self) -> &[Slot] {
        match &self.shape {
            ShapeState::ForEach { slots, .. } => slots,
            _ => &[],
        }
    }

    /// A for_each step's slots, to change (none for other shapes).
    pub fn slots_mut(&mut self) -> &mut [Slot] {
        match &mut self.shape {
            ShapeState::ForEach { slots, .. } => slots,
            _ => &mut [],
        }
    }

    /// A step that has not started.
    pub fn pending() -> Self {
        StepState {
            phase: Phase::NotStarted,
            output: None,
            error: None,
            reason: None,
            started_ms: None,
            finished_ms: None,
            shape: ShapeState::Single,
            started_seq: None,
            finished_seq: None,
            approval: None,
            grants: Vec::new(),
        }
    }
}

/// Side effects recorded with the state that produced them, so a crash between the
/// state write and the publishes loses nothing (see ARCHITECTURE.md, "outbox").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "effect", rename_all = "snake_case")]
pub enum Effect {
    /// Publish a task to `aob.<tenant>.task.<node_type>`.
    Task {
        /// The task.
        task: Box<Task>,
    },
    /// Publish a history event.
    History {
        /// The event.
        event: Box<crate::wire::HistoryEvent>,
    },
    /// Set a durable timer that signals the run at `due_ms`.
    Timer {
        /// What fires.
        timer: TimerKind,
        /// When (ms since the Unix epoch).
        due_ms: u64,
    },
    /// A task as the stored outbox keeps it: which attempt, and its deadline. The task
    /// itself (config and context, possibly large) is rebuilt from the state it was stored
    /// with if the outbox must be published again.
    Launched {
        /// The attempt.
        at: crate::wire::StepRef,
        /// Its deadline (ms since the Unix epoch).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        deadline_ms: Option<u64>,
    },
    /// Delete a timer whose step or run has ended, so it never fires.
    CancelTimer {
        /// Which timer.
        timer: TimerKind,
    },
    /// Publish a message to the engine's own inputs: a child run's start, a signal to a
    /// child, a child's result to its parent.
    Publish {
        /// Subject.
        subject: String,
        /// `Nats-Msg-Id`, so a republished outbox is dropped as a duplicate.
        msg_id: String,
        /// Body.
        body: Value,
    },
}

/// A run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunState {
    /// Run id.
    pub run_id: String,
    /// Tenant.
    pub tenant: String,
    /// Workflow name.
    pub workflow: String,
    /// Pinned workflow version.
    pub version: u32,
    /// Status.
    pub status: RunStatus,
    /// Input (large values are references).
    pub input: Value,
    /// Created (ms since the Unix epoch).
    pub created_ms: u64,
    /// Last change (ms since the Unix epoch).
    pub updated_ms: u64,
    /// Finished (ms since the Unix epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_ms: Option<u64>,
    /// Why the run failed or was cancelled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Steps by id.
    pub steps: BTreeMap<String, StepState>,
    /// Number of history events published so far.
    pub history_seq: u64,
    /// The run's generation: 0 at the start, one more after each rollback. Attempts carry
    /// it, so results from before a rollback are recognised as stale.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub generation: u32,
    /// Effects of the last change, replayed if their publication may not have happened.
    /// Cleared by the next write: a loaded outbox is published at most once more, and only
    /// while the streams still drop it as a duplicate, or for a redelivery of its cause.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outbox: Vec<Effect>,
    /// The event whose transition produced the outbox (see `machine::Event::id`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outbox_cause: Option<String>,
    /// Who started the run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_by: Option<String>,
    /// No new step starts while set.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub paused: bool,
    /// Rollbacks so far (bounded by the workflow's `max_rollbacks`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub rollbacks: u32,
    /// Set while the run compensates its completed steps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compensation: Option<Box<Compensation>>,
    /// The run this one was forked from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forked_from: Option<String>,
    /// The `workflow` step this run is the child of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<crate::wire::ParentRef>,
    /// Ids of the last decisions and rollbacks handled (at most [`SEEN_SIGNALS`]): a
    /// redelivered one changes nothing.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub seen: Vec<String>,
    /// The run's W3C trace context (`traceparent` of the decision that started it): the
    /// parent of decisions on messages that come without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<String>,
}

/// How many signal ids a run remembers (see [`RunState::seen`]).
pub const SEEN_SIGNALS: usize = 64;

/// The run id of the child a `workflow` step's attempt starts: derived from the parent's
/// run and the attempt, so a repeated start is the same run.
pub fn child_run_id(parent_run: &str, at: &StepRef) -> String {
    let id = format!("{parent_run}-{}", at.token());
    if id.len() <= 128 {
        id
    } else {
        let digest = crate::audit::sha256_hex(id.as_bytes());
        format!(
            "{}-{}",
            &parent_run[..parent_run.len().min(60)],
            &digest[..32]
        )
    }
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl RunState {
    /// KV key of a run.
    pub fn key(tenant: &str, run_id: &str) -> String {
        format!("{tenant}.{run_id}")
    }

    /// Outputs of the leaf steps that completed, by step id.
    pub fn outputs(&self) -> BTreeMap<&str, &Value> {
        self.steps
            .iter()
            .filter_map(|(id, s)| s.output.as_ref().map(|o| (id.as_str(), o)))
            .collect()
    }
}

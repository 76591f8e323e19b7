//! Run state, one record per run in the `AOB_RUNS` bucket (key `<tenant>.<run_id>`).
//! Only the engine writes it, by compare-and-set; everyone else reads.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::wire::{StepError, Task, TimerKind};

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
}

impl StepStatus {
    /// True once the step can change no more.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            StepStatus::Completed | StepStatus::Failed | StepStatus::Skipped
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
    /// Current loop iteration (loop steps only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iteration: Option<u32>,
    /// for_each elements (for_each steps only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub items: Option<Vec<Value>>,
    /// One slot per for_each element.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub slots: Vec<Slot>,
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

    /// What kind of step its state shows (a for_each step once it has begun).
    pub fn shape(&self) -> Shape {
        if !self.slots.is_empty() || self.items.is_some() {
            Shape::ForEach
        } else if self.iteration.is_some() {
            Shape::Loop
        } else {
            Shape::Single
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
            iteration: None,
            items: None,
            slots: Vec::new(),
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

//! The audit trail's unit: one [`DecisionRecord`] per decision, published on
//! `aob.<tenant>.audit` and batched into Parquet by the audit sink.
//!
//! The record is versioned ([`SCHEMA_VERSION`]): a reader checks `schema_version` and a new
//! version only ever adds nullable columns. Fields a kind of record does not use are `None`
//! (null in Parquet), never empty strings.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::wire::{ErrorClass, HistoryEvent, HistoryKind, StepError};

/// Version of the record layout written by this code.
pub const SCHEMA_VERSION: u32 = 1;

/// Payloads longer than this (as JSON text) are kept out of the record: the record keeps
/// their digest and, when the payload was offloaded, its reference.
pub const PAYLOAD_INLINE_LIMIT: usize = 8 * 1024;

/// What a record reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuditKind {
    /// A run was created.
    RunStarted,
    /// A start command was refused.
    RunRejected,
    /// A run completed.
    RunCompleted,
    /// A run failed.
    RunFailed,
    /// A run was cancelled.
    RunCancelled,
    /// Running steps were told to stop.
    RunAborted,
    /// The engine published a task for an attempt.
    StepScheduled,
    /// An attempt was parked until a later result.
    StepWaiting,
    /// The engine accepted a step's output.
    StepCompleted,
    /// A step failed for good.
    StepFailed,
    /// A step was skipped (its `when` was false or its trigger rule cannot be met).
    StepSkipped,
    /// An attempt failed and another follows after a backoff.
    StepRetried,
    /// A function ran a task (input, output, duration, error).
    TaskExecuted,
    /// A branch was taken.
    BranchTaken,
    /// A loop started another iteration.
    LoopIteration,
    /// A running step reported a milestone (an agent's turn).
    StepProgress,
    /// A person decided an approval.
    ApprovalDecided,
    /// A policy was evaluated.
    PolicyDecision,
    /// A model was called.
    ModelCall,
    /// An outside tool (HTTP, MCP) was called.
    ToolCall,
    /// A run was rolled back to a checkpoint.
    Rollback,
    /// A compensation ran.
    Compensation,
    /// A `human` step asked people to decide.
    ApprovalRequested,
    /// A decision was refused.
    DecisionRefused,
    /// An approval request expired.
    ApprovalExpired,
    /// An approval request was escalated.
    ApprovalEscalated,
    /// The run was paused.
    RunPaused,
    /// The run was resumed.
    RunResumed,
    /// The run ended after compensating.
    RunCompensated,
}

impl AuditKind {
    /// The name stored in the `event_kind` column.
    pub fn as_str(self) -> &'static str {
        match self {
            AuditKind::RunStarted => "run_started",
            AuditKind::RunRejected => "run_rejected",
            AuditKind::RunCompleted => "run_completed",
            AuditKind::RunFailed => "run_failed",
            AuditKind::RunCancelled => "run_cancelled",
            AuditKind::RunAborted => "run_aborted",
            AuditKind::StepScheduled => "step_scheduled",
            AuditKind::StepWaiting => "step_waiting",
            AuditKind::StepCompleted => "step_completed",
            AuditKind::StepFailed => "step_failed",
            AuditKind::StepSkipped => "step_skipped",
            AuditKind::StepRetried => "step_retried",
            AuditKind::TaskExecuted => "task_executed",
            AuditKind::BranchTaken => "branch_taken",
            AuditKind::LoopIteration => "loop_iteration",
            AuditKind::StepProgress => "step_progress",
            AuditKind::ApprovalDecided => "approval_decided",
            AuditKind::PolicyDecision => "policy_decision",
            AuditKind::ModelCall => "model_call",
            AuditKind::ToolCall => "tool_call",
            AuditKind::Rollback => "rollback",
            AuditKind::Compensation => "compensation",
            AuditKind::ApprovalRequested => "approval_requested",
            AuditKind::DecisionRefused => "decision_refused",
            AuditKind::ApprovalExpired => "approval_expired",
            AuditKind::ApprovalEscalated => "approval_escalated",
            AuditKind::RunPaused => "run_paused",
            AuditKind::RunResumed => "run_resumed",
            AuditKind::RunCompensated => "run_compensated",
        }
    }

    /// The record kind of a history event.
    pub fn of_history(kind: HistoryKind) -> AuditKind {
        match kind {
            HistoryKind::Started => AuditKind::RunStarted,
            HistoryKind::Rejected => AuditKind::RunRejected,
            HistoryKind::StepScheduled => AuditKind::StepScheduled,
            HistoryKind::StepWaiting => AuditKind::StepWaiting,
            HistoryKind::StepCompleted => AuditKind::StepCompleted,
            HistoryKind::StepRetrying => AuditKind::StepRetried,
            HistoryKind::StepFailed => AuditKind::StepFailed,
            HistoryKind::StepSkipped => AuditKind::StepSkipped,
            HistoryKind::LoopIteration => AuditKind::LoopIteration,
            HistoryKind::StepProgress => AuditKind::StepProgress,
            HistoryKind::Abort => AuditKind::RunAborted,
            HistoryKind::Completed => AuditKind::RunCompleted,
            HistoryKind::Failed => AuditKind::RunFailed,
            HistoryKind::Cancelled => AuditKind::RunCancelled,
            HistoryKind::ApprovalRequested => AuditKind::ApprovalRequested,
            HistoryKind::ApprovalDecided => AuditKind::ApprovalDecided,
            HistoryKind::DecisionRefused => AuditKind::DecisionRefused,
            HistoryKind::ApprovalExpired => AuditKind::ApprovalExpired,
            HistoryKind::ApprovalEscalated => AuditKind::ApprovalEscalated,
            HistoryKind::Paused => AuditKind::RunPaused,
            HistoryKind::Resumed => AuditKind::RunResumed,
            HistoryKind::RolledBack => AuditKind::Rollback,
            HistoryKind::CompensationStarted
            | HistoryKind::StepCompensated
            | HistoryKind::CompensationFailed => AuditKind::Compensation,
            HistoryKind::Compensated => AuditKind::RunCompensated,
        }
    }
}

/// One decision. Times are microseconds since the Unix epoch, UTC.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecisionRecord {
    /// Unique and deterministic: the same decision re-emitted after a crash has the same id
    /// (it is also the message's `Nats-Msg-Id`).
    pub record_id: String,
    /// [`SCHEMA_VERSION`] of the writer.
    pub schema_version: u32,
    /// Tenant.
    pub tenant: String,
    /// What this record reports.
    pub event_kind: AuditKind,
    /// Workflow name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow: Option<String>,
    /// Workflow version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow_version: Option<u32>,
    /// Run id.
    pub run_id: String,
    /// Step id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_id: Option<String>,
    /// Node type of the step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_type: Option<String>,
    /// Attempt (1-based).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    /// for_each element index.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub item: Option<u32>,
    /// Loop iteration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iteration: Option<u32>,
    /// Status after the decision (`COMPLETED`, `FAILED`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// Who or what decided: `engine`, `fn.<type>`, or a user id.
    pub actor: String,
    /// The decision, in a word or two (`schedule`, `accept`, `retry`, `approve`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision: Option<String>,
    /// Why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When the decided work started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at_us: Option<i64>,
    /// When it finished (or when the decision was taken).
    pub finished_at_us: i64,
    /// `finished - started`, in microseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_us: Option<i64>,
    /// SHA-256 (hex) of the input as JSON text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_digest: Option<String>,
    /// The input as JSON text, when at most [`PAYLOAD_INLINE_LIMIT`] bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_json: Option<String>,
    /// Where a larger input is kept (a payload-store reference).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_ref: Option<String>,
    /// SHA-256 (hex) of the output as JSON text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_digest: Option<String>,
    /// The output as JSON text, when at most [`PAYLOAD_INLINE_LIMIT`] bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_json: Option<String>,
    /// Where a larger output is kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_ref: Option<String>,
    /// `retryable` or `terminal`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_class: Option<String>,
    /// Error message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_message: Option<String>,
    /// Model name, for model calls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Model provider.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    /// Prompt tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_in: Option<u64>,
    /// Completion tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_out: Option<u64>,
    /// Cost in US dollars.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost_usd: Option<f64>,
    /// Policy that was evaluated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_id: Option<String>,
    /// Its result (`allow`, `deny`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_result: Option<String>,
    /// W3C trace id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    /// W3C span id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub span_id: Option<String>,
}

impl DecisionRecord {
    /// A record with the required fields set and everything else null.
    pub fn new(
        record_id: String,
        tenant: &str,
        run_id: &str,
        kind: AuditKind,
        actor: &str,
        at_us: i64,
    ) -> Self {
        DecisionRecord {
            record_id,
            schema_version: SCHEMA_VERSION,
            tenant: tenant.to_string(),
            event_kind: kind,
            workflow: None,
            workflow_version: None,
            run_id: run_id.to_string(),
            step_id: None,
            node_type: None,
            attempt: None,
            item: None,
            iteration: None,
            status: None,
            actor: actor.to_string(),
            decision: None,
            reason: None,
            started_at_us: None,
            finished_at_us: at_us,
            duration_us: None,
            input_digest: None,
            input_json: None,
            input_ref: None,
            output_digest: None,
            output_json: None,
            output_ref: None,
            error_class: None,
            error_message: None,
            model: None,
            provider: None,
            tokens_in: None,
            tokens_out: None,
            cost_usd: None,
            policy_id: None,
            policy_result: None,
            trace_id: None,
            span_id: None,
        }
    }

    /// Sets the input columns from a value (digest always; the text when small enough; the
    /// reference when the value is an offloaded payload).
    pub fn with_input(mut self, v: &Value) -> Self {
        let (digest, json, reference) = payload_columns(v);
        self.input_digest = Some(digest);
        self.input_json = json;
        self.input_ref = reference;
        self
    }

    /// Sets the output columns, like [`DecisionRecord::with_input`].
    pub fn with_output(mut self, v: &Value) -> Self {
        let (digest, json, reference) = payload_columns(v);
        self.output_digest = Some(digest);
        self.output_json = json;
        self.output_ref = reference;
        self
    }

    /// Sets the error columns.
    pub fn with_error(mut self, e: &StepError) -> Self {
        self.error_class = Some(
            match e.class {
                ErrorClass::Retryable => "retryable",
                ErrorClass::Terminal => "terminal",
            }
            .to_string(),
        );
        self.error_message = Some(e.message.clone());
        self
    }

    /// Checks what serde cannot: ids and required text present, times sane.
    pub fn check(&self) -> Result<(), String> {
        for (name, v) in [
            ("record_id", &self.record_id),
            ("tenant", &self.tenant),
            ("run_id", &self.run_id),
            ("actor", &self.actor),
        ] {
            if v.is_empty() {
                return Err(format!("`{name}` is empty"));
            }
        }
        if self.schema_version == 0 || self.schema_version > SCHEMA_VERSION {
            return Err(format!(
                "schema_version {} is not one this sink writes (1..={SCHEMA_VERSION})",
                self.schema_version
            ));
        }
        if self.finished_at_us <= 0 {
            return Err("`finished_at_us` must be a positive time".into());
        }
        Ok(())
    }

    /// The record of a history event of the engine.
    pub fn of_history(ev: &HistoryEvent, workflow: Option<&str>, version: Option<u32>) -> Self {
        let kind = AuditKind::of_history(ev.kind);
        let mut r = DecisionRecord::new(
            format!("{}.{}.h{}", ev.tenant, ev.run_id, ev.seq),
            &ev.tenant,
            &ev.run_id,
            kind,
            "engine",
            (ev.ts_ms as i64).saturating_mul(1000),
        );
        r.workflow = workflow.map(str::to_string);
        r.workflow_version = version;
        r.step_id = ev.step.clone();
        r.attempt = ev.attempt;
        r.item = ev.item;
        r.iteration = ev.iteration;
        r.reason = ev.message.clone();
        let data = ev.data.as_ref();
        r.node_type = data
            .and_then(|d| d.get("type"))
            .and_then(Value::as_str)
            .map(str::to_string);
        let (status, decision) = match kind {
            AuditKind::RunStarted => ("RUNNING", "start"),
            AuditKind::RunRejected => ("REJECTED", "reject"),
            AuditKind::RunCompleted => ("COMPLETED", "complete"),
            AuditKind::RunFailed => ("FAILED", "fail"),
            AuditKind::RunCancelled => ("CANCELLED", "cancel"),
            AuditKind::RunAborted => ("RUNNING", "abort"),
            AuditKind::StepScheduled => ("RUNNING", "schedule"),
            AuditKind::StepWaiting => ("WAITING", "wait"),
            AuditKind::StepCompleted => ("COMPLETED", "accept"),
            AuditKind::StepFailed => ("FAILED", "fail"),
            AuditKind::StepSkipped => ("SKIPPED", "skip"),
            AuditKind::StepRetried => ("PENDING", "retry"),
            AuditKind::LoopIteration => ("RUNNING", "iterate"),
            AuditKind::ApprovalRequested => ("WAITING", "request_approval"),
            AuditKind::DecisionRefused => ("WAITING", "refuse"),
            AuditKind::ApprovalExpired => ("WAITING", "expire"),
            AuditKind::ApprovalEscalated => ("WAITING", "escalate"),
            AuditKind::RunPaused => ("RUNNING", "pause"),
            AuditKind::RunResumed => ("RUNNING", "resume"),
            AuditKind::Rollback => ("RUNNING", "rollback"),
            AuditKind::RunCompensated => ("COMPENSATED", "compensate"),
            AuditKind::Compensation => match ev.kind {
                HistoryKind::StepCompensated => ("COMPENSATED", "compensate"),
                HistoryKind::CompensationFailed => ("FAILED", "compensate"),
                _ => ("RUNNING", "compensate"),
            },
            _ => ("", ""),
        };
        r.status = Some(status.to_string()).filter(|s| !s.is_empty());
        r.decision = Some(decision.to_string()).filter(|s| !s.is_empty());
        // A person's act (a decision, a pause, a rollback) names them as its actor.
        if let Some(by) = data.and_then(|d| d.get("by")).and_then(Value::as_str)
            && !by.is_empty()
        {
            r.actor = by.to_string();
        }
        if ev.kind == HistoryKind::ApprovalDecided
            && let Some(d) = data.and_then(|d| d.get("decision")).and_then(Value::as_str)
        {
            r.decision = Some(d.to_string());
        }
        if let Some(d) = data {
            if let Some(out) = d.get("output") {
                r = r.with_output(out);
            } else if let Some(outs) = d.get("outputs") {
                r = r.with_output(outs);
            }
            if let Some(e) = d
                .get("error")
                .and_then(|e| serde_json::from_value::<StepError>(e.clone()).ok())
            {
                r = r.with_error(&e);
            }
        }
        r
    }
}

/// Digest, inline text and reference of a payload.
fn payload_columns(v: &Value) -> (String, Option<String>, Option<String>) {
    let text = serde_json::to_string(v).unwrap_or_default();
    let digest = sha256_hex(text.as_bytes());
    let reference = v
        .as_object()
        .filter(|m| m.len() == 1)
        .and_then(|m| m.get("$aob_ref"))
        .and_then(Value::as_str)
        .map(str::to_string);
    let inline = (reference.is_none() && text.len() <= PAYLOAD_INLINE_LIMIT).then_some(text);
    (digest, inline, reference)
}

/// SHA-256 of bytes, lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let d = Sha256::digest(bytes);
    let mut s = String::with_capacity(64);
    for b in d {
        s.push(char::from(b"0123456789abcdef"[(b >> 4) as usize]));
        s.push(char::from(b"0123456789abcdef"[(b & 15) as usize]));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event(kind: HistoryKind, data: Option<Value>) -> HistoryEvent {
        HistoryEvent {
            run_id: "r1".into(),
            tenant: "acme".into(),
            seq: 7,
            ts_ms: 1_700_000_000_123,
            kind,
            step: Some("fetch".into()),
            item: None,
            iteration: None,
            attempt: Some(2),
            message: None,
            data,
        }
    }

    #[test]
    fn history_events_become_records_with_deterministic_ids() {
        let r = DecisionRecord::of_history(
            &event(
                HistoryKind::StepCompleted,
                Some(json!({"output": {"a": 1}})),
            ),
            Some("wf"),
            Some(3),
        );
        assert_eq!(r.record_id, "acme.r1.h7");
        assert_eq!(r.event_kind, AuditKind::StepCompleted);
        assert_eq!(r.finished_at_us, 1_700_000_000_123_000);
        assert_eq!(r.output_json.as_deref(), Some(r#"{"a":1}"#));
        assert_eq!(
            r.output_digest.as_deref(),
            Some(sha256_hex(br#"{"a":1}"#).as_str())
        );
        assert_eq!(r.input_digest, None, "unused columns stay null");
        assert_eq!(r.workflow_version, Some(3));
        assert_eq!(r.attempt, Some(2));
        r.check().unwrap();
    }

    #[test]
    fn failed_steps_carry_the_error_class() {
        let r = DecisionRecord::of_history(
            &event(
                HistoryKind::StepFailed,
                Some(json!({"error": {"class": "terminal", "message": "HTTP 404"}})),
            ),
            None,
            None,
        );
        assert_eq!(r.error_class.as_deref(), Some("terminal"));
        assert_eq!(r.error_message.as_deref(), Some("HTTP 404"));
        assert_eq!(r.status.as_deref(), Some("FAILED"));
    }

    #[test]
    fn large_and_offloaded_payloads_keep_only_digest_and_reference() {
        let big = json!("x".repeat(PAYLOAD_INLINE_LIMIT + 1));
        let r = DecisionRecord::new("id".into(), "t", "r", AuditKind::TaskExecuted, "fn.x", 1)
            .with_output(&big);
        assert!(r.output_json.is_none());
        assert_eq!(r.output_digest.as_ref().map(String::len), Some(64));
        let off = json!({"$aob_ref": "t/r/out"});
        let r = r.with_input(&off);
        assert_eq!(r.input_ref.as_deref(), Some("t/r/out"));
        assert!(r.input_json.is_none());
    }

    #[test]
    fn check_refuses_empty_ids_and_unknown_versions() {
        let mut r = DecisionRecord::new("id".into(), "t", "r", AuditKind::RunStarted, "engine", 1);
        r.check().unwrap();
        r.schema_version = 99;
        assert!(r.check().unwrap_err().contains("schema_version"));
        r.schema_version = 1;
        r.actor.clear();
        assert!(r.check().unwrap_err().contains("actor"));
    }

    #[test]
    fn sha256_matches_a_known_vector() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}

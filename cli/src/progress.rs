//! Human-readable progress lines from a run's history events.
//!
//! [`format_event`] is pure: one event (plus the step's duration when known) to one line.
//! [`Progress`] adds the little memory needed on top: it drops duplicate events and
//! measures step durations from `step_scheduled` to `step_completed`.

use std::collections::HashMap;
use std::time::Duration;

use aob_model::wire::{HistoryEvent, HistoryKind};
use serde_json::Value;

/// Longest message shown on one line before it is cut.
const MAX_MESSAGE: usize = 400;
/// Longest compact JSON shown for run outputs before it is cut.
const MAX_JSON: usize = 600;

/// Formats a duration in milliseconds: `12 ms`, `1.5 s`, `2m 5s`.
pub fn duration(ms: u64) -> String {
    if ms < 1000 {
        format!("{ms} ms")
    } else if ms < 60_000 {
        format!("{:.1} s", ms as f64 / 1000.0)
    } else {
        humantime::format_duration(Duration::from_secs(ms / 1000)).to_string()
    }
}

/// One line of text: newlines and tabs become spaces, and very long text is cut with `…`.
pub fn one_line(text: &str, max: usize) -> String {
    let flat: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if flat.chars().count() <= max {
        flat
    } else {
        let mut cut: String = flat.chars().take(max).collect();
        cut.push('…');
        cut
    }
}

/// Compact JSON on one line, cut when long.
pub fn compact_json(value: &Value, max: usize) -> String {
    one_line(&serde_json::to_string(value).unwrap_or_default(), max)
}

/// `fetch`, `fetch[item 2]`, `poll[iteration 3]`.
pub fn step_label(ev: &HistoryEvent) -> String {
    let step = ev.step.as_deref().unwrap_or("?");
    match (ev.item, ev.iteration) {
        (None, None) => step.to_string(),
        (Some(i), None) => format!("{step}[item {i}]"),
        (None, Some(n)) => format!("{step}[iteration {n}]"),
        (Some(i), Some(n)) => format!("{step}[item {i}, iteration {n}]"),
    }
}

fn message(ev: &HistoryEvent) -> String {
    one_line(
        ev.message.as_deref().unwrap_or("no reason given"),
        MAX_MESSAGE,
    )
}

fn data_u64(ev: &HistoryEvent, key: &str) -> Option<u64> {
    ev.data
        .as_ref()
        .and_then(|d| d.get(key))
        .and_then(Value::as_u64)
}

/// The status word of a terminal event: `COMPLETED`, `FAILED`, `CANCELLED`, `REJECTED`.
pub fn terminal_word(kind: HistoryKind) -> Option<&'static str> {
    match kind {
        HistoryKind::Completed => Some("COMPLETED"),
        HistoryKind::Failed => Some("FAILED"),
        HistoryKind::Cancelled => Some("CANCELLED"),
        HistoryKind::Rejected => Some("REJECTED"),
        HistoryKind::Compensated => Some("COMPENSATED"),
        _ => None,
    }
}

/// One progress line for an event. `took_ms` is the step's duration for `step_completed`
/// and the run's for terminal events, when known.
///
/// Step lines are indented by two spaces; the terminal line is `run <id> <STATUS>` followed
/// by the reason or, for a completed run, the outputs of its last steps on a second line.
pub fn format_event(ev: &HistoryEvent, took_ms: Option<u64>) -> String {
    let label = step_label(ev);
    let took = took_ms
        .map(|ms| format!(" ({})", duration(ms)))
        .unwrap_or_default();
    match ev.kind {
        HistoryKind::Started => {
            let data = ev.data.as_ref();
            let wf = data.and_then(|d| d.get("workflow")).and_then(Value::as_str);
            let version = data.and_then(|d| d.get("version")).and_then(Value::as_u64);
            match (wf, version) {
                (Some(wf), Some(v)) => format!("run {} started: {wf} v{v}", ev.run_id),
                (Some(wf), None) => format!("run {} started: {wf}", ev.run_id),
                _ => format!("run {} started", ev.run_id),
            }
        }
        HistoryKind::StepScheduled => {
            let kind = ev
                .data
                .as_ref()
                .and_then(|d| d.get("type"))
                .and_then(Value::as_str)
                .map(|t| format!(" {t}"))
                .unwrap_or_default();
            format!(
                "  ▸ {label}{kind} scheduled (attempt {})",
                ev.attempt.unwrap_or(1)
            )
        }
        HistoryKind::StepWaiting => {
            let until = data_u64(ev, "until_ms")
                .map(|u| format!(" (resumes in {})", duration(u.saturating_sub(ev.ts_ms))))
                .unwrap_or_default();
            format!("  ⏸ {label} waiting{until}")
        }
        HistoryKind::StepCompleted => match ev
            .data
            .as_ref()
            .and_then(|d| d.get("reused_from"))
            .and_then(Value::as_str)
        {
            Some(run) => format!("  ✓ {label} reused from run {run}"),
            None => format!("  ✓ {label} completed{took}"),
        },
        HistoryKind::StepRetrying => {
            let next = data_u64(ev, "next_attempt").or(ev.attempt.map(|a| u64::from(a) + 1));
            let delay = data_u64(ev, "delay_ms")
                .map(|d| humantime::format_duration(Duration::from_millis(d)).to_string());
            let when = match (next, delay) {
                (Some(n), Some(d)) => format!(" (attempt {n} in {d})"),
                (Some(n), None) => format!(" (attempt {n} next)"),
                (None, Some(d)) => format!(" (next attempt in {d})"),
                (None, None) => String::new(),
            };
            format!("  ↻ {label} retrying: {}{when}", message(ev))
        }
        HistoryKind::StepFailed => format!("  ✗ {label} failed: {}", message(ev)),
        HistoryKind::StepSkipped => format!("  ⤼ {label} skipped: {}", message(ev)),
        HistoryKind::LoopIteration => {
            let next = data_u64(ev, "next")
                .map(|n| format!("; next iteration {n}"))
                .unwrap_or_default();
            format!("  ↺ {label} done{next}")
        }
        HistoryKind::StepProgress => format!("  · {label} {}", message(ev)),
        HistoryKind::Abort => format!("  ■ stopping running steps: {}", message(ev)),
        HistoryKind::Completed => {
            let outputs = ev.data.as_ref().and_then(|d| d.get("outputs"));
            match outputs {
                Some(o) if o.as_object().is_some_and(|m| !m.is_empty()) => {
                    format!(
                        "run {} COMPLETED{took}\n  outputs: {}",
                        ev.run_id,
                        compact_json(o, MAX_JSON)
                    )
                }
                _ => format!("run {} COMPLETED{took}", ev.run_id),
            }
        }
        HistoryKind::ApprovalRequested => {
            let text = |k: &str| {
                ev.data
                    .as_ref()
                    .and_then(|d| d.get(k))
                    .and_then(Value::as_str)
                    .map(str::to_string)
            };
            let mut line = format!("  ✋ {label} {}", message(ev));
            if let Some(due) = data_u64(ev, "deadline_ms") {
                line.push_str(&format!(
                    " (deadline in {})",
                    duration(due.saturating_sub(ev.ts_ms))
                ));
            }
            if let (Some(a), Some(r)) = (text("approve"), text("reject")) {
                line.push_str(&format!("\n    to decide: {a}  |  {r}"));
            }
            line
        }
        HistoryKind::ApprovalDecided => format!("  ✎ {label} {}", message(ev)),
        HistoryKind::DecisionRefused => format!("  ⊘ {label} {}", message(ev)),
        HistoryKind::ApprovalExpired => format!("  ⌛ {label} {}", message(ev)),
        HistoryKind::ApprovalEscalated => format!("  ⇪ {label} {}", message(ev)),
        HistoryKind::Paused => format!("  ⏸ run {}", message(ev)),
        HistoryKind::Resumed => format!("  ▶ run {}", message(ev)),
        HistoryKind::RolledBack => format!("  ⟲ {}", message(ev)),
        HistoryKind::CompensationStarted if ev.step.is_some() => {
            format!("  ↶ {label} compensating")
        }
        HistoryKind::CompensationStarted => format!("  ↶ {}", message(ev)),
        HistoryKind::StepCompensated => format!("  ↶ {label} compensated{took}"),
        HistoryKind::CompensationFailed => format!("  ✗ {}", message(ev)),
        HistoryKind::Failed
        | HistoryKind::Cancelled
        | HistoryKind::Rejected
        | HistoryKind::Compensated => {
            let word = terminal_word(ev.kind).unwrap_or("ENDED");
            format!("run {} {word}{took}: {}", ev.run_id, message(ev))
        }
    }
}

type AttemptKey = (String, Option<u32>, Option<u32>);

/// Turns a run's events into lines, in order, once each.
#[derive(Debug, Default)]
pub struct Progress {
    last_seq: u64,
    started_ms: Option<u64>,
    scheduled: HashMap<AttemptKey, u64>,
    first_scheduled: HashMap<String, u64>,
}

impl Progress {
    /// A tracker that has seen nothing.
    pub fn new() -> Self {
        Progress::default()
    }

    /// The line for `ev`, or `None` when it was already shown (a redelivered event).
    pub fn line(&mut self, ev: &HistoryEvent) -> Option<String> {
        if ev.seq != 0 && ev.seq <= self.last_seq {
            return None;
        }
        self.last_seq = ev.seq;
        let took = match ev.kind {
            HistoryKind::Started => {
                self.started_ms = Some(ev.ts_ms);
                None
            }
            HistoryKind::StepScheduled => {
                let step = ev.step.clone().unwrap_or_default();
                self.first_scheduled.entry(step.clone()).or_insert(ev.ts_ms);
                self.scheduled
                    .insert((step, ev.item, ev.iteration), ev.ts_ms);
                None
            }
            HistoryKind::StepCompleted => {
                let step = ev.step.clone().unwrap_or_default();
                // A whole for_each or loop step completes without an attempt: measure it
                // from its first task.
                let since = if ev.attempt.is_some() {
                    self.scheduled.get(&(step, ev.item, ev.iteration)).copied()
                } else {
                    self.first_scheduled.get(&step).copied()
                };
                since.map(|s| ev.ts_ms.saturating_sub(s))
            }
            k if k.is_terminal() => self.started_ms.map(|s| ev.ts_ms.saturating_sub(s)),
            _ => None,
        };
        Some(format_event(ev, took))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ev(kind: HistoryKind, seq: u64, ts_ms: u64) -> HistoryEvent {
        HistoryEvent {
            run_id: "r1".into(),
            tenant: "default".into(),
            seq,
            ts_ms,
            kind,
            step: None,
            item: None,
            iteration: None,
            attempt: None,
            message: None,
            data: None,
        }
    }

    fn step(
        kind: HistoryKind,
        seq: u64,
        ts_ms: u64,
        id: &str,
        attempt: Option<u32>,
    ) -> HistoryEvent {
        HistoryEvent {
            step: Some(id.into()),
            attempt,
            ..ev(kind, seq, ts_ms)
        }
    }

    #[test]
    fn every_kind_has_a_line() {
        let started = HistoryEvent {
            data: Some(json!({"workflow": "greeting", "version": 3})),
            ..ev(HistoryKind::Started, 1, 0)
        };
        assert_eq!(format_event(&started, None), "run r1 started: greeting v3");

        let scheduled = HistoryEvent {
            data: Some(json!({"type": "http"})),
            ..step(HistoryKind::StepScheduled, 2, 0, "fetch", Some(1))
        };
        assert_eq!(
            format_event(&scheduled, None),
            "  ▸ fetch http scheduled (attempt 1)"
        );

        let waiting = HistoryEvent {
            data: Some(json!({"until_ms": 5_000})),
            ..step(HistoryKind::StepWaiting, 3, 1_000, "pause", Some(1))
        };
        assert_eq!(
            format_event(&waiting, None),
            "  ⏸ pause waiting (resumes in 4.0 s)"
        );

        let done = step(HistoryKind::StepCompleted, 4, 0, "fetch", Some(1));
        assert_eq!(format_event(&done, Some(12)), "  ✓ fetch completed (12 ms)");
        assert_eq!(format_event(&done, None), "  ✓ fetch completed");

        let retrying = HistoryEvent {
            message: Some("HTTP 503 from https://x".into()),
            data: Some(json!({"next_attempt": 2, "delay_ms": 100})),
            ..step(HistoryKind::StepRetrying, 5, 0, "fetch", Some(1))
        };
        assert_eq!(
            format_event(&retrying, None),
            "  ↻ fetch retrying: HTTP 503 from https://x (attempt 2 in 100ms)"
        );

        let failed = HistoryEvent {
            message: Some("boom\nsecond line".into()),
            ..step(HistoryKind::StepFailed, 6, 0, "c", Some(2))
        };
        assert_eq!(
            format_event(&failed, None),
            "  ✗ c failed: boom second line"
        );

        let skipped = HistoryEvent {
            message: Some("needs `a`, which failed".into()),
            ..step(HistoryKind::StepSkipped, 7, 0, "b", None)
        };
        assert_eq!(
            format_event(&skipped, None),
            "  ⤼ b skipped: needs `a`, which failed"
        );

        let iteration = HistoryEvent {
            iteration: Some(0),
            data: Some(json!({"output": {}, "next": 1})),
            ..step(HistoryKind::LoopIteration, 8, 0, "poll", Some(1))
        };
        assert_eq!(
            format_event(&iteration, None),
            "  ↺ poll[iteration 0] done; next iteration 1"
        );

        let abort = HistoryEvent {
            message: Some("cancelled by ada".into()),
            ..ev(HistoryKind::Abort, 9, 0)
        };
        assert_eq!(
            format_event(&abort, None),
            "  ■ stopping running steps: cancelled by ada"
        );

        let completed = HistoryEvent {
            data: Some(json!({"outputs": {"b": {"x": 1}}})),
            ..ev(HistoryKind::Completed, 10, 0)
        };
        assert_eq!(
            format_event(&completed, Some(45)),
            "run r1 COMPLETED (45 ms)\n  outputs: {\"b\":{\"x\":1}}"
        );
        let empty = HistoryEvent {
            data: Some(json!({"outputs": {}})),
            ..ev(HistoryKind::Completed, 10, 0)
        };
        assert_eq!(format_event(&empty, None), "run r1 COMPLETED");

        let run_failed = HistoryEvent {
            message: Some("step `c` failed: boom".into()),
            ..ev(HistoryKind::Failed, 11, 0)
        };
        assert_eq!(
            format_event(&run_failed, Some(1500)),
            "run r1 FAILED (1.5 s): step `c` failed: boom"
        );

        let cancelled = HistoryEvent {
            message: Some("cancelled by ada: no longer needed".into()),
            ..ev(HistoryKind::Cancelled, 12, 0)
        };
        assert_eq!(
            format_event(&cancelled, None),
            "run r1 CANCELLED: cancelled by ada: no longer needed"
        );

        let rejected = HistoryEvent {
            message: Some("workflow `nope` not found in tenant `default`".into()),
            ..ev(HistoryKind::Rejected, 1, 0)
        };
        assert_eq!(
            format_event(&rejected, None),
            "run r1 REJECTED: workflow `nope` not found in tenant `default`"
        );
    }

    #[test]
    fn items_and_iterations_are_labelled() {
        let mut e = step(HistoryKind::StepScheduled, 1, 0, "each", Some(1));
        e.item = Some(2);
        assert_eq!(step_label(&e), "each[item 2]");
        e.iteration = Some(1);
        assert_eq!(step_label(&e), "each[item 2, iteration 1]");
    }

    #[test]
    fn tracker_measures_steps_and_drops_duplicates() {
        let mut p = Progress::new();
        assert!(p.line(&ev(HistoryKind::Started, 1, 1_000)).is_some());
        assert!(
            p.line(&step(HistoryKind::StepScheduled, 2, 1_000, "a", Some(1)))
                .is_some()
        );
        // A redelivered event is shown once.
        assert_eq!(
            p.line(&step(HistoryKind::StepScheduled, 2, 1_000, "a", Some(1))),
            None
        );
        let done = p.line(&step(HistoryKind::StepCompleted, 3, 1_012, "a", Some(1)));
        assert_eq!(done.as_deref(), Some("  ✓ a completed (12 ms)"));
        let end = p.line(&ev(HistoryKind::Completed, 4, 1_050));
        assert_eq!(end.as_deref(), Some("run r1 COMPLETED (50 ms)"));
    }

    #[test]
    fn long_messages_are_cut() {
        let long = "x".repeat(1000);
        let cut = one_line(&long, 10);
        assert_eq!(cut, format!("{}…", "x".repeat(10)));
        assert_eq!(duration(999), "999 ms");
        assert_eq!(duration(125_000), "2m 5s");
    }
}

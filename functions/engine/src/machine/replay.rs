//! Replay: the machine run again over a run's recorded history, to check that it takes the
//! same decisions (before upgrading the engine or a workflow).
//!
//! The history holds every input the machine had: step results (as `step_completed`,
//! `step_failed`, `step_retrying`, `step_waiting` and `loop_iteration` events, with the
//! output or error), decisions, pauses, rollbacks, cancels and fired timers. Replay walks it
//! in order: each recorded event is either one the replayed machine produced itself (and
//! must match), or the trace of an input, which is turned back into that input and applied.
//! Nothing is called: model and tool answers are the recorded outputs.

use super::*;

/// What a replay found.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// Recorded events the replay produced identically.
    pub matched: usize,
    /// Recorded events taken as inputs (results, signals, timers).
    pub inputs: usize,
    /// The first difference, if any.
    pub divergence: Option<Divergence>,
}

/// Where a replay first decided otherwise than the run did.
#[derive(Debug, Clone, PartialEq)]
pub struct Divergence {
    /// Position of the recorded event in the run's history.
    pub seq: u64,
    /// What was recorded there (`step_scheduled draft attempt 1`), if anything.
    pub recorded: String,
    /// What the replay did instead, if anything.
    pub replayed: String,
}

/// One history event in a comparable form.
fn key(ev: &HistoryEvent) -> String {
    let mut s = ev.kind.token().to_string();
    if let Some(step) = &ev.step {
        s.push_str(&format!(" {step}"));
    }
    if let Some(i) = ev.item {
        s.push_str(&format!(" item {i}"));
    }
    if let Some(i) = ev.iteration {
        s.push_str(&format!(" iteration {i}"));
    }
    if let Some(a) = ev.attempt {
        s.push_str(&format!(" attempt {a}"));
    }
    s
}

fn data<'a>(ev: &'a HistoryEvent, k: &str) -> Option<&'a Value> {
    ev.data.as_ref().and_then(|d| d.get(k))
}

fn text(ev: &HistoryEvent, k: &str) -> Option<String> {
    data(ev, k).and_then(Value::as_str).map(str::to_string)
}

/// Replays `history` (the run's events in order) for the run `run` under `def`.
pub fn replay(def: &Compiled, run: &RunState, history: &[HistoryEvent]) -> Report {
    let mut report = Report {
        matched: 0,
        inputs: 0,
        divergence: None,
    };
    let Some(first) = history.first() else {
        return report;
    };
    // A fork's seed is what its reused steps' events recorded.
    let seed: Map<String, Value> = history
        .iter()
        .filter(|e| e.kind == HistoryKind::StepCompleted && data(e, "reused_from").is_some())
        .filter_map(|e| {
            Some((
                e.step.clone()?,
                data(e, "output").cloned().unwrap_or(Value::Null),
            ))
        })
        .collect();
    let cmd = StartCommand {
        workflow: run.workflow.clone(),
        version: Some(def.version),
        input: run.input.clone(),
        run_id: Some(run.run_id.clone()),
        by: run.started_by.clone(),
        fork: run.forked_from.as_ref().map(|r| aob_model::wire::ForkSpec {
            run: r.clone(),
            from: String::new(),
            set: seed,
        }),
        parent: run.parent.clone(),
    };
    let resolve = |_: &str| None;
    let mut state: Option<RunState> = None;
    let mut i = 0usize;
    let mut event = Event::Start {
        tenant: run.tenant.clone(),
        run_id: run.run_id.clone(),
        cmd,
    };
    let mut now = first.ts_ms;
    loop {
        match transition(def, state.take(), event.clone(), now, &resolve) {
            Transition::Changed(next, effects) => {
                for e in effects {
                    let Effect::History { event: produced } = e else {
                        continue;
                    };
                    match history.get(i) {
                        Some(rec) if key(rec) == key(&produced) => {
                            report.matched += 1;
                            i += 1;
                        }
                        other => {
                            report.divergence = Some(Divergence {
                                seq: other.map_or(produced.seq, |r| r.seq),
                                recorded: other.map(key).unwrap_or_else(|| "nothing".into()),
                                replayed: key(&produced),
                            });
                            return report;
                        }
                    }
                }
                state = Some(next);
            }
            _ => {
                let rec = history.get(i.saturating_sub(1));
                report.divergence = Some(Divergence {
                    seq: rec.map_or(0, |r| r.seq),
                    recorded: format!(
                        "{} (taken as {})",
                        rec.map(key).unwrap_or_default(),
                        event.id()
                    ),
                    replayed: "nothing: the replayed run did not take this input".into(),
                });
                return report;
            }
        }
        // The next recorded event the machine has not produced is the trace of an input.
        let Some(rec) = history.get(i) else {
            return report;
        };
        let Some(s) = state.as_ref() else {
            return report;
        };
        let Some(input) = input_of(s, history, i) else {
            report.divergence = Some(Divergence {
                seq: rec.seq,
                recorded: key(rec),
                replayed: "nothing (the replayed run did not produce it)".into(),
            });
            return report;
        };
        report.inputs += 1;
        // The input's own trace is produced again when it is applied.
        event = input;
        now = rec.ts_ms;
    }
}

/// The attempt a recorded step event names, in the replayed run's current generation.
fn at_of(s: &RunState, ev: &HistoryEvent) -> Option<StepRef> {
    Some(StepRef {
        step: ev.step.clone()?,
        item: ev.item,
        iteration: ev.iteration,
        attempt: ev.attempt.unwrap_or(1),
        generation: s.generation,
    })
}

fn result(s: &RunState, ev: &HistoryEvent, outcome: Outcome) -> Option<Event> {
    Some(Event::Result(StepResult {
        tenant: s.tenant.clone(),
        run_id: s.run_id.clone(),
        at: at_of(s, ev)?,
        outcome,
        duration_ms: 0,
    }))
}

fn error_of(ev: &HistoryEvent) -> StepError {
    let raw = data(ev, "error").cloned().or_else(|| ev.data.clone());
    raw.and_then(|v| serde_json::from_value::<StepError>(v).ok())
        .unwrap_or_else(|| StepError::terminal(ev.message.clone().unwrap_or_default()))
}

/// The input whose trace is `history[i]`, for the replayed state `s`.
fn input_of(s: &RunState, history: &[HistoryEvent], i: usize) -> Option<Event> {
    let ev = history.get(i)?;
    match ev.kind {
        HistoryKind::StepCompleted | HistoryKind::StepCompensated => result(
            s,
            ev,
            Outcome::Completed {
                output: data(ev, "output").cloned().unwrap_or(Value::Null),
            },
        ),
        HistoryKind::LoopIteration => result(
            s,
            ev,
            Outcome::Completed {
                output: data(ev, "output").cloned().unwrap_or(Value::Null),
            },
        ),
        // A cancel with compensation starts by abandoning and skipping steps.
        HistoryKind::StepFailed | HistoryKind::StepSkipped
            if ev
                .message
                .as_deref()
                .is_some_and(|m| m.contains("the run compensates (cancelled")) =>
        {
            Some(Event::Signal(Signal::Cancel {
                reason: None,
                by: None,
                compensate: true,
            }))
        }
        HistoryKind::StepFailed | HistoryKind::StepRetrying | HistoryKind::CompensationFailed => {
            result(
                s,
                ev,
                Outcome::Failed {
                    error: error_of(ev),
                },
            )
        }
        HistoryKind::StepWaiting if data(ev, "policy_hold").is_some() => {
            let error = serde_json::from_value(data(ev, "policy_hold")?.clone()).ok()?;
            result(s, ev, Outcome::Failed { error })
        }
        HistoryKind::StepWaiting => {
            // A `human` step's request follows its wait, with what the function rendered.
            let detail = history
                .get(i + 1)
                .filter(|n| n.kind == HistoryKind::ApprovalRequested)
                .map(|n| {
                    json!({
                        "summary": data(n, "summary"),
                        "values": data(n, "values"),
                        "notified": data(n, "notified"),
                    })
                });
            result(
                s,
                ev,
                Outcome::Waiting {
                    until_ms: data(ev, "until_ms").and_then(Value::as_u64),
                    detail,
                },
            )
        }
        HistoryKind::StepScheduled => Some(Event::Signal(Signal::Timer {
            timer: TimerKind::Retry { at: at_of(s, ev)? },
        })),
        HistoryKind::StepProgress => Some(Event::Signal(Signal::Progress {
            at: at_of(s, ev)?,
            seq: ev.seq,
            message: ev.message.clone().unwrap_or_default(),
            data: ev.data.clone().unwrap_or(Value::Null),
        })),
        HistoryKind::ApprovalDecided | HistoryKind::DecisionRefused => {
            Some(Event::Signal(Signal::Decide {
                step: ev.step.clone()?,
                by: text(ev, "by")?,
                roles: data(ev, "roles")
                    .and_then(|v| serde_json::from_value(v.clone()).ok())
                    .unwrap_or_default(),
                decision: serde_json::from_value(data(ev, "decision")?.clone()).ok()?,
                comment: text(ev, "comment"),
                set: data(ev, "set")
                    .and_then(Value::as_object)
                    .cloned()
                    .unwrap_or_default(),
                id: text(ev, "id"),
                request: None,
            }))
        }
        HistoryKind::ApprovalExpired => Some(Event::Signal(Signal::Timer {
            timer: TimerKind::Approval {
                at: StepRef {
                    // The request's attempt: the step's current one.
                    attempt: s.steps.get(ev.step.as_ref()?)?.attempt(),
                    ..at_of(s, ev)?
                },
                round: data(ev, "round").and_then(Value::as_u64).unwrap_or(0) as u32,
            },
        })),
        HistoryKind::Paused => Some(Event::Signal(Signal::Pause { by: text(ev, "by") })),
        HistoryKind::Resumed => Some(Event::Signal(Signal::Resume { by: text(ev, "by") })),
        HistoryKind::RolledBack => Some(Event::Signal(Signal::Rollback {
            to: text(ev, "to")?,
            by: text(ev, "by"),
            reason: None,
            id: None,
        })),

        // A run-wide stop: what ended it says which input it was.
        HistoryKind::Abort
        | HistoryKind::Cancelled
        | HistoryKind::Failed
        | HistoryKind::CompensationStarted => {
            let rest = history.get(i..)?;
            let end = rest.iter().find(|e| e.kind.is_terminal())?;
            let compensate = rest
                .iter()
                .take_while(|e| !e.kind.is_terminal())
                .any(|e| e.kind == HistoryKind::CompensationStarted && e.step.is_none());
            match end.kind {
                HistoryKind::Cancelled => Some(Event::Signal(Signal::Cancel {
                    reason: None,
                    by: None,
                    compensate,
                })),
                HistoryKind::Failed
                    if end
                        .message
                        .as_deref()
                        .is_some_and(|m| m.starts_with("run timed out")) =>
                {
                    Some(Event::Signal(Signal::Timer {
                        timer: TimerKind::RunTimeout,
                    }))
                }
                _ => None,
            }
        }
        _ => None,
    }
}

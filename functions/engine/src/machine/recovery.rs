//! What a step's final failure does beyond failing the run: roll the run back to the
//! checkpoint before a step, or compensate the completed steps.
//!
//! A checkpoint costs nothing to keep: every step records the history position where it
//! began (`started_seq`) and finished (`finished_seq`), and completed outputs never change.
//! "The state before step X" is therefore the steps that finished at or before X began,
//! with their outputs; the rest go back to PENDING under a new generation, so whatever
//! they still had out is stale when it answers.

use super::*;
use aob_model::state::{Compensation, CompensationAttempt};

/// Whether `at` is a compensation attempt: once a run has planned its compensations it is
/// in a generation of its own, and every attempt of that generation compensates.
pub(super) fn is_compensation(state: &RunState, at: &StepRef) -> bool {
    state.compensation.as_ref().is_some_and(|c| c.planned) && at.generation == state.generation
}

/// Where the compensation attempt `at` stands (see [`classify`]).
pub(super) fn standing(state: &RunState, at: &StepRef) -> Standing {
    let Some(c) = state.compensation.as_deref() else {
        return Standing::Stale;
    };
    match &c.current {
        Some(cur) if cur.step == at.step => match cur.phase {
            Phase::Out { attempt } | Phase::Waiting { attempt } if attempt == at.attempt => {
                Standing::Current
            }
            Phase::Out { attempt } | Phase::Waiting { attempt } if at.attempt > attempt => {
                Standing::Ahead
            }
            Phase::BackingOff { next_attempt } if at.attempt >= next_attempt => Standing::Ahead,
            _ => Standing::Stale,
        },
        // Its task went out before the state that started it was written.
        _ if c.queue.contains(&at.step) => Standing::Ahead,
        _ => Standing::Stale,
    }
}

/// The step that compensates `id`, under `id`'s name: its `compensate` step, or the inline
/// action with `id`'s retry policy and timeout.
fn compensation_step(def: &Compiled, id: &str) -> Option<Step> {
    let step = def.step(id)?;
    match step.compensate.as_ref()? {
        aob_model::definition::Compensate::Step { step: other } => {
            let mut s = def.step(other)?.clone();
            s.id = id.to_string();
            Some(s)
        }
        aob_model::definition::Compensate::Action { kind, config } => Some(Step {
            id: id.to_string(),
            kind: kind.clone(),
            needs: Vec::new(),
            when: None,
            trigger: Trigger::AllSuccess,
            retry: step.retry.clone(),
            timeout: step.timeout,
            for_each: None,
            loop_: None,
            compensate: None,
            on_failure: None,
            config: config.clone(),
        }),
    }
}

impl Machine<'_> {
    /// What a final failure of step `id` does.
    pub(super) fn failure_policy(&self, id: &str) -> OnFailure {
        self.def
            .step(id)
            .and_then(|s| s.on_failure.clone())
            .or_else(|| self.def.wf.on_failure.clone())
            .unwrap_or(OnFailure::Fail)
    }

    /// Takes the `on_failure` of step `id`, which has just failed for good.
    pub(super) fn on_final_failure(&mut self, id: &str) {
        let msg = self
            .s
            .steps
            .get(id)
            .and_then(|st| st.error.as_ref())
            .map(|e| e.message.clone())
            .unwrap_or_default();
        let why = format!("step `{id}` failed: {msg}");
        match self.failure_policy(id) {
            OnFailure::Fail => {}
            OnFailure::RollbackTo(to) => {
                let max = self.def.wf.max_rollbacks.unwrap_or(3);
                let refused = if self.s.rollbacks >= max {
                    Some(format!(
                        "the run has rolled back {} times, its `max_rollbacks`",
                        self.s.rollbacks
                    ))
                } else {
                    self.rollback(&to, None, why).err()
                };
                // The failure stands, and says why it was not rolled back.
                if let Some(r) = refused
                    && let Some(e) = self.s.steps.get_mut(id).and_then(|st| st.error.as_mut())
                {
                    e.message = format!("{} (not rolled back to `{to}`: {r})", e.message);
                }
            }
            OnFailure::Compensate { end } => {
                let end = match end {
                    aob_model::definition::CompensatedEnd::Compensated => RunStatus::Compensated,
                    aob_model::definition::CompensatedEnd::Failed => RunStatus::Failed,
                };
                self.start_compensation(why, end, false);
            }
        }
    }

    /// Restores the run to the checkpoint before step `to` and starts a new generation.
    /// `Err` says why not (nothing changed then).
    pub(super) fn rollback(
        &mut self,
        to: &str,
        by: Option<String>,
        reason: String,
    ) -> Result<(), String> {
        if self.s.compensation.is_some() {
            return Err("the run is compensating".into());
        }
        let target = self
            .s
            .steps
            .get(to)
            .ok_or_else(|| format!("this run has no step `{to}`"))?;
        let checkpoint = target.started_seq.or(target.finished_seq).ok_or_else(|| {
            format!("step `{to}` has not run yet: there is no checkpoint before it")
        })?;
        let reset: Vec<String> = self
            .s
            .steps
            .iter()
            .filter(|(_, st)| {
                !(st.status().is_terminal() && st.finished_seq.is_some_and(|f| f <= checkpoint))
            })
            .map(|(id, _)| id.clone())
            .collect();
        let timers = self.timers_of(&reset);
        self.cancel_timers(timers);
        self.cancel_children(Some(&reset), &reason);
        let reopened = self.s.status.is_terminal();
        for id in &reset {
            if let Some(st) = self.s.steps.get_mut(id) {
                *st = StepState::pending();
            }
        }
        self.s.generation += 1;
        self.s.rollbacks += 1;
        self.s.status = RunStatus::Running;
        self.s.finished_ms = None;
        self.s.error = None;
        let data = json!({
            "to": to,
            "by": by,
            "generation": self.s.generation,
            "reset": reset,
            "rollbacks": self.s.rollbacks,
        });
        self.step_event(
            HistoryKind::RolledBack,
            to,
            Some(format!("rolled back to `{to}`: {reason}")),
            Some(data),
        );
        if reopened && let Some(t) = &self.def.wf.timeout {
            self.effects.push(Effect::Timer {
                timer: TimerKind::RunTimeout,
                due_ms: self.now + t.as_millis(),
            });
        }
        Ok(())
    }

    /// The run stops going forward and compensates its completed steps. Steps that wait
    /// (for a timer, a person, a retry) are abandoned; running ones finish first, unless
    /// `abort_running` (a cancel), when they are told to stop.
    pub(super) fn start_compensation(
        &mut self,
        reason: String,
        end: RunStatus,
        abort_running: bool,
    ) {
        if self.s.compensation.is_some() {
            return;
        }
        // Set first: the failures below are abandonments, not failures to act on.
        self.s.compensation = Some(Box::new(Compensation {
            reason: reason.clone(),
            end,
            queue: Vec::new(),
            planned: false,
            current: None,
            failed: Vec::new(),
        }));
        let mut abandoned = Vec::new();
        let mut skipped = Vec::new();
        let mut aborted = false;
        for (id, st) in &self.s.steps {
            match st.phase() {
                Phase::NotStarted => skipped.push(id.clone()),
                Phase::BackingOff { .. } | Phase::Waiting { .. } => abandoned.push(id.clone()),
                Phase::Out { .. } if abort_running || st.shape() != Shape::Single => {
                    aborted = true;
                    abandoned.push(id.clone());
                }
                _ => {}
            }
        }
        let timers = self.timers_of(&abandoned);
        self.cancel_timers(timers);
        self.cancel_children(Some(&abandoned), &reason);
        if aborted {
            self.history(HistoryKind::Abort, None, Some(reason.clone()), None);
        }
        for id in abandoned {
            self.fail_step(
                &id,
                StepError::terminal(format!("abandoned: the run compensates ({reason})")),
                None,
            );
        }
        for id in skipped {
            self.skip(&id, format!("the run compensates ({reason})"));
        }
        self.history(
            HistoryKind::CompensationStarted,
            None,
            Some(format!("compensating: {reason}")),
            Some(json!({"end": end})),
        );
    }

    /// Starts the next compensation, or ends the run when none is left. Waits while a step
    /// still runs: its work must be known before it can be undone.
    pub(super) fn compensate_next(&mut self) {
        loop {
            let Some(c) = self.s.compensation.as_deref() else {
                return;
            };
            if c.current.is_some() {
                return;
            }
            if !c.planned {
                if self.s.steps.values().any(|st| st.phase().is_active()) {
                    return;
                }
                let mut done: Vec<(u64, String)> = self
                    .s
                    .steps
                    .iter()
                    .filter(|(id, st)| {
                        st.status() == StepStatus::Completed
                            && self.def.step(id).is_some_and(|s| s.compensate.is_some())
                    })
                    .map(|(id, st)| (st.finished_seq.unwrap_or(0), id.clone()))
                    .collect();
                // Latest completion first.
                done.sort_by(|a, b| b.cmp(a));
                self.s.generation += 1;
                if let Some(c) = self.s.compensation.as_deref_mut() {
                    c.planned = true;
                    c.queue = done.into_iter().map(|(_, id)| id).collect();
                }
                continue;
            }
            let next = self
                .s
                .compensation
                .as_deref_mut()
                .and_then(|c| (!c.queue.is_empty()).then(|| c.queue.remove(0)));
            match next {
                Some(id) => {
                    if self.launch_compensation(&id, 1) {
                        return;
                    }
                }
                None => return self.finish_compensation(),
            }
        }
    }

    /// Sends attempt `attempt` of the compensation of `id`; false if it has none to send.
    fn launch_compensation(&mut self, id: &str, attempt: u32) -> bool {
        let at = StepRef {
            step: id.to_string(),
            item: None,
            iteration: None,
            attempt,
            generation: self.s.generation,
        };
        let Some(step) = compensation_step(self.def, id) else {
            self.compensation_gave_up(&at, "its compensation is not in the definition".into());
            return false;
        };
        let deadline_ms = step.timeout.map(|t| self.now + t.as_millis());
        let Some(task) = self.compensation_task(&at, deadline_ms) else {
            return false;
        };
        if let Some(c) = self.s.compensation.as_deref_mut() {
            c.current = Some(CompensationAttempt {
                step: id.to_string(),
                phase: Phase::Out { attempt },
            });
        }
        self.send(task);
        self.history(
            HistoryKind::CompensationStarted,
            Some(&at),
            Some(format!("compensating `{id}`")),
            Some(json!({"type": step.kind})),
        );
        true
    }

    /// The task of compensation attempt `at`: the compensating action's config, and a
    /// context with every step's output and the compensated step's as `compensating`.
    pub(super) fn compensation_task(&self, at: &StepRef, deadline_ms: Option<u64>) -> Option<Task> {
        let step = compensation_step(self.def, &at.step)?;
        let mut steps = Map::new();
        for (id, st) in &self.s.steps {
            steps.insert(
                id.clone(),
                json!({"status": st.status(), "output": st.output.clone().unwrap_or(Value::Null)}),
            );
        }
        let compensating = self
            .s
            .steps
            .get(&at.step)
            .map(|st| json!({"step": at.step, "output": st.output.clone().unwrap_or(Value::Null)}))
            .unwrap_or(Value::Null);
        Some(Task {
            tenant: self.s.tenant.clone(),
            run_id: self.s.run_id.clone(),
            workflow: self.s.workflow.clone(),
            version: self.s.version,
            node_type: step.kind.clone(),
            at: at.clone(),
            config: Value::Object(step.config.clone()),
            context: json!({
                "input": self.s.input,
                "steps": steps,
                "run": {"id": self.s.run_id, "workflow": self.s.workflow, "version": self.s.version, "tenant": self.s.tenant},
                "compensating": compensating,
            }),
            deadline_ms,
        })
    }

    /// A compensation attempt answered.
    pub(super) fn on_compensation_result(&mut self, r: StepResult) {
        let step = compensation_step(self.def, &r.at.step);
        if step.as_ref().is_some_and(|s| s.timeout.is_some()) {
            self.effects.push(Effect::CancelTimer {
                timer: TimerKind::StepTimeout { at: r.at.clone() },
            });
        }
        match r.outcome {
            Outcome::Completed { output } => {
                let seq = self.s.history_seq + 1;
                if let Some(st) = self.s.steps.get_mut(&r.at.step) {
                    st.phase = st.phase.done(StepStatus::Compensated);
                    st.finished_seq = Some(seq);
                }
                if let Some(c) = self.s.compensation.as_deref_mut() {
                    c.current = None;
                }
                self.history(
                    HistoryKind::StepCompensated,
                    Some(&r.at),
                    Some(format!("`{}` compensated", r.at.step)),
                    Some(json!({"output": output})),
                );
                self.compensate_next();
            }
            Outcome::Failed { error } => self.compensation_failed(&r.at, error),
            Outcome::Waiting { .. } => {
                if let Some(cur) = self
                    .s
                    .compensation
                    .as_deref_mut()
                    .and_then(|c| c.current.as_mut())
                {
                    cur.phase = Phase::Waiting {
                        attempt: r.at.attempt,
                    };
                }
                self.history(HistoryKind::StepWaiting, Some(&r.at), None, None);
            }
        }
    }

    /// Compensation attempt `at` failed: retried per the step's policy, or given up.
    pub(super) fn compensation_failed(&mut self, at: &StepRef, error: StepError) {
        let retry = compensation_step(self.def, &at.step).and_then(|s| s.retry);
        if let Some(delay) = retry_delay(retry.as_ref(), at, &error) {
            if let Some(cur) = self
                .s
                .compensation
                .as_deref_mut()
                .and_then(|c| c.current.as_mut())
            {
                cur.phase = Phase::BackingOff {
                    next_attempt: at.attempt + 1,
                };
            }
            self.schedule_retry(at, error, delay);
            return;
        }
        self.compensation_gave_up(at, error.message);
        self.compensate_next();
    }

    fn compensation_gave_up(&mut self, at: &StepRef, why: String) {
        if let Some(c) = self.s.compensation.as_deref_mut() {
            c.current = None;
            c.failed.push(at.step.clone());
        }
        self.history(
            HistoryKind::CompensationFailed,
            Some(at),
            Some(format!("compensation of `{}` failed: {why}", at.step)),
            Some(json!({"error": StepError::terminal(why)})),
        );
    }

    /// A compensation's retry timer fired.
    pub(super) fn compensation_retry_due(&mut self, at: StepRef) -> bool {
        let due = self.s.compensation.as_deref().is_some_and(|c| {
            c.current.as_ref().is_some_and(|cur| {
                cur.step == at.step
                    && cur.phase
                        == Phase::BackingOff {
                            next_attempt: at.attempt,
                        }
            })
        });
        if !due || at.generation != self.s.generation {
            return false;
        }
        if !self.launch_compensation(&at.step, at.attempt) {
            self.compensate_next();
        }
        true
    }

    /// Timers of the compensation out now.
    pub(super) fn compensation_timers(&self) -> Vec<TimerKind> {
        let Some(cur) = self
            .s
            .compensation
            .as_deref()
            .and_then(|c| c.current.as_ref())
        else {
            return Vec::new();
        };
        let at = |attempt| StepRef {
            step: cur.step.clone(),
            item: None,
            iteration: None,
            attempt,
            generation: self.s.generation,
        };
        let timeout = compensation_step(self.def, &cur.step).is_some_and(|s| s.timeout.is_some());
        match cur.phase {
            Phase::Out { attempt } | Phase::Waiting { attempt } if timeout => {
                vec![TimerKind::StepTimeout { at: at(attempt) }]
            }
            Phase::BackingOff { next_attempt } => vec![TimerKind::Retry {
                at: at(next_attempt),
            }],
            _ => Vec::new(),
        }
    }

    /// Every compensation ran: the run ends as its definition says (FAILED if one of them
    /// failed for good).
    fn finish_compensation(&mut self) {
        let left = self.outstanding_timers();
        self.cancel_timers(left);
        let Some(c) = self.s.compensation.take() else {
            return;
        };
        let compensated: Vec<&String> = self
            .s
            .steps
            .iter()
            .filter(|(_, st)| st.status() == StepStatus::Compensated)
            .map(|(id, _)| id)
            .collect();
        let data = json!({"compensated": compensated, "compensation_failed": c.failed});
        let (status, kind, why) = if c.failed.is_empty() {
            let kind = match c.end {
                RunStatus::Compensated => HistoryKind::Compensated,
                RunStatus::Cancelled => HistoryKind::Cancelled,
                _ => HistoryKind::Failed,
            };
            (c.end, kind, c.reason.clone())
        } else {
            (
                RunStatus::Failed,
                HistoryKind::Failed,
                format!(
                    "{}; the compensation of {} failed",
                    c.reason,
                    c.failed
                        .iter()
                        .map(|s| format!("`{s}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )
        };
        self.s.status = status;
        self.s.error = Some(why.clone());
        self.s.finished_ms = Some(self.now);
        self.history(kind, None, Some(why), Some(data));
    }
}

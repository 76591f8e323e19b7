//! Runs made of other runs: a `workflow` step's child run, and a fork's reused outputs.

use super::*;
use aob_model::nodes::WorkflowStepConfig;
use aob_model::state::child_run_id;
use aob_model::wire::{ForkSpec, ParentRef};

/// The outputs a fork of `source` from step `from` reuses: those of the steps that
/// completed before `from` began, with `set` put in place of some of them.
pub fn fork_seed(
    source: &RunState,
    from: &str,
    set: &Map<String, Value>,
) -> Result<Map<String, Value>, String> {
    let target = source
        .steps
        .get(from)
        .ok_or_else(|| format!("run {} has no step `{from}`", source.run_id))?;
    let checkpoint = target.started_seq.or(target.finished_seq).ok_or_else(|| {
        format!(
            "step `{from}` never ran in run {}: there is nothing to fork from",
            source.run_id
        )
    })?;
    let mut out = Map::new();
    for (id, st) in &source.steps {
        if st.status() == StepStatus::Completed && st.finished_seq.is_some_and(|f| f <= checkpoint)
        {
            out.insert(id.clone(), st.output.clone().unwrap_or(Value::Null));
        }
    }
    for (id, v) in set {
        if !out.contains_key(id) {
            return Err(format!(
                "`steps.{id}.output` cannot be set: `{id}` is not reused (it did not complete before `{from}` began in run {})",
                source.run_id
            ));
        }
        out.insert(id.clone(), v.clone());
    }
    Ok(out)
}

impl Machine<'_> {
    /// A fork starts with the reused outputs in place, each step recorded as completed.
    pub(super) fn seed(&mut self, fork: &ForkSpec) {
        for (id, output) in &fork.set {
            if !self.s.steps.contains_key(id) {
                continue;
            }
            let seq = self.s.history_seq;
            if let Some(st) = self.s.steps.get_mut(id) {
                st.phase = Phase::Done {
                    status: StepStatus::Completed,
                    attempts: 0,
                };
                st.output = Some(output.clone());
                st.started_seq = Some(seq);
                st.finished_ms = Some(self.now);
            }
            self.step_event(
                HistoryKind::StepCompleted,
                id,
                Some(format!("reused from run {}", fork.run)),
                Some(json!({"output": output, "reused_from": fork.run})),
            );
            self.mark_finished(id);
        }
    }

    /// Starts the child run of a `workflow` step's attempt `at`.
    pub(super) fn launch_child(&mut self, step: &Step, at: StepRef) {
        let cfg: WorkflowStepConfig =
            match serde_json::from_value(Value::Object(step.config.clone())) {
                Ok(c) => c,
                Err(e) => {
                    return self.fail_step(
                        &step.id,
                        StepError::terminal(format!("the step's fields do not parse: {e}")),
                        Some(&at),
                    );
                }
            };
        let input = match &cfg.input {
            Some(t) => {
                let ctx = self.context(&step.id, None, None, true);
                match aob_model::expr::render(t, &ctx) {
                    Ok(v) => v,
                    Err(e) => {
                        return self.fail_step(
                            &step.id,
                            StepError::terminal(format!("`input`: {}", e.message)),
                            Some(&at),
                        );
                    }
                }
            }
            None => json!({}),
        };
        let child = child_run_id(&self.s.run_id, &at);
        let cmd = StartCommand {
            workflow: cfg.workflow.clone(),
            version: cfg.version,
            input,
            run_id: Some(child.clone()),
            by: self.s.started_by.clone(),
            fork: None,
            parent: Some(ParentRef {
                run: self.s.run_id.clone(),
                at: at.clone(),
            }),
        };
        if let Some(st) = self.s.steps.get_mut(&step.id) {
            st.phase = Phase::Out {
                attempt: at.attempt,
            };
        }
        self.effects.push(Effect::Publish {
            subject: aob_streams::subjects::start(&self.s.tenant),
            msg_id: format!("start.{child}"),
            body: serde_json::to_value(&cmd).unwrap_or_default(),
        });
        if let Some(t) = step.timeout {
            self.effects.push(Effect::Timer {
                timer: TimerKind::StepTimeout { at: at.clone() },
                due_ms: self.now + t.as_millis(),
            });
        }
        self.history(
            HistoryKind::StepScheduled,
            Some(&at),
            Some(format!("child run {child}")),
            Some(json!({"type": step.kind, "child_run": child, "workflow": cfg.workflow})),
        );
    }

    /// Tells the child run of attempt `at` to stop (nothing happens if it has ended).
    pub(super) fn cancel_child(&mut self, at: &StepRef, why: &str) {
        let child = child_run_id(&self.s.run_id, at);
        let signal = Signal::Cancel {
            reason: Some(format!("its parent run {}: {why}", self.s.run_id)),
            by: None,
            compensate: false,
        };
        self.effects.push(Effect::Publish {
            subject: aob_streams::subjects::signal(&self.s.tenant, &child),
            msg_id: format!("cancel.{child}"),
            body: serde_json::to_value(&signal).unwrap_or_default(),
        });
    }

    /// Cancels the children of the running `workflow` steps (among `only`, if given).
    pub(super) fn cancel_children(&mut self, only: Option<&[String]>, why: &str) {
        let running: Vec<StepRef> = self
            .s
            .steps
            .iter()
            .filter(|(id, st)| {
                st.status() == StepStatus::Running
                    && only.is_none_or(|o| o.contains(id))
                    && self.def.step(id).is_some_and(|s| s.kind == "workflow")
            })
            .map(|(id, st)| StepRef {
                step: id.clone(),
                item: None,
                iteration: None,
                attempt: st.attempt(),
                generation: self.s.generation,
            })
            .collect();
        for at in running {
            self.cancel_child(&at, why);
        }
    }

    /// This run is a child and has just ended: its parent's step gets the result.
    pub(super) fn tell_parent(&mut self) {
        let Some(p) = self.s.parent.clone() else {
            return;
        };
        let outcome = if self.s.status == RunStatus::Completed {
            Outcome::Completed {
                output: json!({"run_id": self.s.run_id, "outputs": self.leaf_outputs()}),
            }
        } else {
            let status = super::people::status_word(self.s.status);
            Outcome::Failed {
                error: StepError::terminal(format!(
                    "child run {} ({} v{}) ended {status}: {}",
                    self.s.run_id,
                    self.s.workflow,
                    self.s.version,
                    self.s.error.clone().unwrap_or_default()
                ))
                .with_details(json!({"child_run": self.s.run_id, "status": status})),
            }
        };
        let result = StepResult {
            tenant: self.s.tenant.clone(),
            run_id: p.run.clone(),
            at: p.at,
            outcome,
            duration_ms: self.now.saturating_sub(self.s.created_ms),
        };
        self.effects.push(Effect::Publish {
            subject: aob_streams::subjects::result(&self.s.tenant, &p.run),
            msg_id: aob_runtime::nats::result_msg_id(&result),
            body: serde_json::to_value(&result).unwrap_or_default(),
        });
    }
}

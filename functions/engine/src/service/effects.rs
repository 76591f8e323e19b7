//! Effects: sending tasks (early, while the state is written), publishing history events
//! and their audit records, setting and cancelling timers.

use super::*;

impl<S: RunStore> Engine<S> {
    /// Sends the tasks among `effects`; the returned futures resolve to the server's acks.
    pub(super) async fn send_tasks(&self, effects: &[Effect]) -> Result<Vec<PublishAckFuture>> {
        let mut acks = Vec::new();
        for e in effects {
            if let Effect::Task { task } = e {
                acks.push(self.send_task(task).await?);
            }
        }
        Ok(acks)
    }

    /// Sends one task, its context and config offloaded when the body is too large. The
    /// tenant's policies are asked first (when it has any): a step they deny, or one that
    /// needs an approval, is not sent; its attempt fails terminally with the policy's reason,
    /// as if a function had answered. Either way the decision is an audit record.
    pub(super) async fn send_task(&self, task: &Task) -> Result<PublishAckFuture> {
        if self.policies.version(&task.tenant) != "none" {
            let input = aob_policy::Input::in_step(
                aob_policy::Kind::Step,
                &task.tenant,
                aob_policy::RunRef {
                    id: task.run_id.clone(),
                    workflow: task.workflow.clone(),
                    version: task.version,
                },
                aob_policy::StepRef {
                    id: task.at.step.clone(),
                    kind: task.node_type.clone(),
                },
            );
            let decision = self.policies.evaluate(&input);
            let what = format!("step {}", task.at.step);
            let mut record = DecisionRecord::new(
                format!(
                    "{}.{}.{}.policy.step",
                    task.tenant,
                    task.run_id,
                    task.at.token()
                ),
                &task.tenant,
                &task.run_id,
                aob_model::audit::AuditKind::PolicyDecision,
                "engine",
                aob_runtime::now_us(),
            );
            record.workflow = Some(task.workflow.clone());
            record.workflow_version = Some(task.version);
            record.step_id = Some(task.at.step.clone());
            record.node_type = Some(task.node_type.clone());
            record.attempt = Some(task.at.attempt);
            record.item = task.at.item;
            record.iteration = task.at.iteration;
            decision.fill(&what, &mut record);
            let approved = aob_model::wire::approved_actions(&task.context);
            if decision.approved_by(&what, &approved) {
                record.decision = Some(format!("{what}: require_approval, approved by a person"));
            }
            bus::publish_record(&self.js, &record)
                .await?
                .await
                .map_err(|e| {
                    aob_runtime::Error::Nats(format!("policy record not acknowledged: {e}"))
                })?;
            if let Some(error) = decision
                .refusal(&what)
                .filter(|_| !decision.approved_by(&what, &approved))
            {
                let result = StepResult {
                    tenant: task.tenant.clone(),
                    run_id: task.run_id.clone(),
                    at: task.at.clone(),
                    outcome: Outcome::Failed { error },
                    duration_ms: 0,
                };
                let body = serde_json::to_vec(&result).unwrap_or_default();
                return Ok(bus::publish(
                    &self.js,
                    subjects::result(&task.tenant, &task.run_id),
                    &aob_runtime::nats::result_msg_id(&result),
                    body.into(),
                )
                .await?);
            }
        }
        let id = format!("task.{}.{}", task.run_id, task.at.token());
        let subject = subjects::task(&task.tenant, &task.node_type);
        let mut body = serde_json::to_vec(task).unwrap_or_default();
        if body.len() > self.payloads.threshold() {
            let mut task = task.clone();
            let base = format!("{}/{}/{}", task.tenant, task.run_id, task.at.token());
            task.context = self
                .payloads
                .offload_with_threshold(task.context, &format!("{base}.context"), 0)
                .await?;
            task.config = self
                .payloads
                .offload(task.config, &format!("{base}.config"))
                .await?;
            body = serde_json::to_vec(&task).unwrap_or_default();
        }
        Ok(bus::publish(&self.js, subject, &id, body.into()).await?)
    }

    /// Publishes the effects of a transition of `run`; all publishes are sent first, then
    /// their acks awaited together. `sent` holds the acks of the tasks when
    /// [`Self::send_tasks`] sent them already.
    pub(super) async fn publish(
        &self,
        run: &RunState,
        effects: &[Effect],
        sent: Option<Vec<PublishAckFuture>>,
    ) -> Result<()> {
        let tasks_sent = sent.is_some();
        let mut acks = sent.unwrap_or_default();
        for e in effects {
            match e {
                Effect::Task { task } if !tasks_sent => acks.push(self.send_task(task).await?),
                Effect::Publish {
                    subject,
                    msg_id,
                    body,
                } => {
                    let body = serde_json::to_vec(body).unwrap_or_default();
                    acks.push(bus::publish(&self.js, subject.clone(), msg_id, body.into()).await?);
                }
                Effect::Task { .. }
                | Effect::Launched { .. }
                | Effect::Timer { .. }
                | Effect::CancelTimer { .. } => {}
                Effect::History { event } => {
                    let (subject, id, body) = history_message(event);
                    acks.push(bus::publish(&self.js, subject, &id, body.into()).await?);
                    let record =
                        DecisionRecord::of_history(event, Some(&run.workflow), Some(run.version));
                    acks.push(bus::publish_record(&self.js, &record).await?);
                }
            }
        }
        for e in effects {
            match e {
                Effect::Timer { timer, due_ms } => self.set_timer(run, timer, *due_ms).await?,
                Effect::CancelTimer { timer } => {
                    self.timers.cancel(&timer_key(run, timer)).await?;
                }
                _ => {}
            }
        }
        for a in acks {
            a.await
                .map_err(|e| aob_runtime::Error::Nats(format!("publish not acknowledged: {e}")))?;
        }
        Ok(())
    }

    async fn set_timer(
        &self,
        run: &RunState,
        timer: &aob_model::wire::TimerKind,
        due_ms: u64,
    ) -> Result<()> {
        let body = serde_json::to_value(Signal::Timer {
            timer: timer.clone(),
        })
        .unwrap_or_default();
        let t = Timer {
            due_ms,
            subject: subjects::internal_signal(&run.tenant, &run.run_id),
            msg_id: format!("timer.{}.{}", run.run_id, machine::timer_name(timer)),
            body,
            traceparent: aob_runtime::trace::current().or_else(|| run.trace.clone()),
        };
        self.timers.set(&timer_key(run, timer), &t).await?;
        Ok(())
    }
}

/// The `AOB_TIMERS` key of one of a run's timers: `<tenant>.<run>.<name>`.
fn timer_key(run: &RunState, timer: &aob_model::wire::TimerKind) -> String {
    format!(
        "{}.{}.{}",
        run.tenant,
        run.run_id,
        machine::timer_name(timer)
    )
}

/// Subject, message id and body of a history event.
pub fn history_message(event: &HistoryEvent) -> (String, String, Vec<u8>) {
    let subject = subjects::history(&event.tenant, &event.run_id, event.kind.token());
    let id = format!("hist.{}.{}", event.run_id, event.seq);
    (subject, id, serde_json::to_vec(event).unwrap_or_default())
}

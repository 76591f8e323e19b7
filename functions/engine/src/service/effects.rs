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

    /// Sends one task, its context and config offloaded when the body is too large.
    pub(super) async fn send_task(&self, task: &Task) -> Result<PublishAckFuture> {
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

    /// Publishes effects; all publishes are sent first, then their acks awaited together.
    /// `sent` holds the acks of the tasks when [`Self::send_tasks`] sent them already.
    pub(super) async fn publish(
        &self,
        workflow: &str,
        version: u32,
        effects: &[Effect],
        sent: Option<Vec<PublishAckFuture>>,
    ) -> Result<()> {
        let tasks_sent = sent.is_some();
        let mut acks = sent.unwrap_or_default();
        for e in effects {
            match e {
                Effect::Task { task } if !tasks_sent => acks.push(self.send_task(task).await?),
                Effect::Task { .. }
                | Effect::Launched { .. }
                | Effect::Timer { .. }
                | Effect::CancelTimer { .. } => {}
                Effect::History { event } => {
                    let (subject, id, body) = history_message(event);
                    acks.push(bus::publish(&self.js, subject, &id, body.into()).await?);
                    let record = DecisionRecord::of_history(event, Some(workflow), Some(version));
                    acks.push(bus::publish_record(&self.js, &record).await?);
                }
            }
        }
        for e in effects {
            match e {
                Effect::Timer { timer, due_ms } => self.set_timer(effects, timer, *due_ms).await?,
                Effect::CancelTimer { timer } => self.cancel_timer(effects, timer).await?,
                _ => {}
            }
        }
        for a in acks {
            a.await
                .map_err(|e| aob_runtime::Error::Nats(format!("publish not acknowledged: {e}")))?;
        }
        Ok(())
    }

    pub(super) async fn cancel_timer(
        &self,
        effects: &[Effect],
        timer: &aob_model::wire::TimerKind,
    ) -> Result<()> {
        let Some((tenant, run_id)) = run_of(effects) else {
            return Ok(());
        };
        let name = machine::timer_name(timer);
        self.timers
            .cancel(&format!("{tenant}.{run_id}.{name}"))
            .await?;
        Ok(())
    }

    pub(super) async fn set_timer(
        &self,
        effects: &[Effect],
        timer: &aob_model::wire::TimerKind,
        due_ms: u64,
    ) -> Result<()> {
        let Some((tenant, run_id)) = run_of(effects) else {
            return Ok(());
        };
        let name = machine::timer_name(timer);
        let body = serde_json::to_value(Signal::Timer {
            timer: timer.clone(),
        })
        .unwrap_or_default();
        let t = Timer {
            due_ms,
            subject: subjects::internal_signal(&tenant, &run_id),
            msg_id: format!("timer.{run_id}.{name}"),
            body,
        };
        self.timers
            .set(&format!("{tenant}.{run_id}.{name}"), &t)
            .await?;
        Ok(())
    }
}

/// The run an effect list belongs to: every task and history event carries it, and a
/// transition always records at least one history event with its timers.
pub(super) fn run_of(effects: &[Effect]) -> Option<(String, String)> {
    effects.iter().find_map(|e| match e {
        Effect::Task { task } => Some((task.tenant.clone(), task.run_id.clone())),
        Effect::History { event } => Some((event.tenant.clone(), event.run_id.clone())),
        Effect::Launched { .. } | Effect::Timer { .. } | Effect::CancelTimer { .. } => None,
    })
}

/// Subject, message id and body of a history event.
pub fn history_message(event: &HistoryEvent) -> (String, String, Vec<u8>) {
    let subject = subjects::history(&event.tenant, &event.run_id, event.kind.token());
    let id = format!("hist.{}.{}", event.run_id, event.seq);
    (subject, id, serde_json::to_vec(event).unwrap_or_default())
}

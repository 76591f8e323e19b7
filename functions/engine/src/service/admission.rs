//! Admission: whether a start becomes a run. A taken run id is never written to; a start
//! that fails admission is rejected on its run's history (only if no run has that id) and
//! dead-lettered, so `aob dlq replay` can publish it again.

use super::*;

impl<S: RunStore> Engine<S> {
    /// Records why a message was refused: a rejection event for starts, a dead letter always.
    pub(super) async fn refuse(&self, msg: &Message, subject: &str, reason: &str) {
        self.metrics.dead_letters.fetch_add(1, Ordering::Relaxed);
        bus::dead_letter_with_id(
            &self.js,
            "engine",
            subject,
            &msg.payload,
            reason,
            msg_id(msg).as_deref(),
        )
        .await;
        if subject.ends_with(".cmd.start")
            && let Some(tenant) = subjects::tenant_of(subject).filter(|t| subjects::is_token(t))
        {
            // What can be read of a refused body: one parse for both fields.
            let body = serde_json::from_slice::<Value>(&msg.payload).ok();
            let field = |name: &str| body.as_ref()?.get(name)?.as_str();
            let run_id = field("run_id")
                .filter(|r| subjects::is_token(r))
                .map_or_else(|| derived_run_id(msg), str::to_string);
            if let Err(e) = self
                .reject(tenant, &run_id, field("workflow"), reason)
                .await
            {
                // Whether the run exists is unknown: write nothing into it.
                tracing::warn!(%subject, "refused start not announced on its run: {e}");
            }
        }
    }

    /// Publishes a start's rejection on its run's history subject and in the audit, unless
    /// a run with that id exists: a rejection never lands in a run. Errors only when the
    /// store cannot say whether the run exists.
    pub(super) async fn reject(
        &self,
        tenant: &str,
        run_id: &str,
        workflow: Option<&str>,
        reason: &str,
    ) -> Result<()> {
        if self
            .store
            .get(&RunState::key(tenant, run_id))
            .await?
            .is_some()
        {
            self.metrics.rejected.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%tenant, %run_id, "a start reusing the id of an existing run was refused: {reason}");
            return Ok(());
        }
        self.announce_rejection(tenant, run_id, workflow, reason, None)
            .await;
        Ok(())
    }

    /// Publishes the rejection of a start whose run id no run has (the caller knows).
    async fn announce_rejection(
        &self,
        tenant: &str,
        run_id: &str,
        workflow: Option<&str>,
        reason: &str,
        details: Option<Value>,
    ) {
        self.metrics.rejected.fetch_add(1, Ordering::Relaxed);
        let ev = machine::rejection(tenant, run_id, reason, details, now_ms());
        if let Ok(body) = serde_json::to_vec(&ev) {
            let subject = subjects::history(tenant, run_id, ev.kind.token());
            if let Err(e) = bus::publish_acked(
                &self.js,
                subject,
                &format!("hist.{run_id}.rejected"),
                body.into(),
            )
            .await
            {
                tracing::error!("could not publish a rejection: {e}");
            }
        }
        let mut record = DecisionRecord::of_history(&ev, workflow, None);
        record.record_id = format!("{tenant}.{run_id}.rejected");
        let audited = match bus::publish_record(&self.js, &record).await {
            Ok(ack) => ack.await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = audited {
            tracing::error!("could not audit a rejection: {e}");
        }
    }

    /// Admits a start: a run id that is taken is never written to (a repeat of the start
    /// that made the run is dropped, any other start reported); a start that fails
    /// admission is rejected on its run's history subject and dead-lettered. The store is
    /// read once, here: the rejection and the run loop rely on what this read found.
    pub(super) async fn start(
        &self,
        tenant: &str,
        run_id: &str,
        cmd: StartCommand,
        msg: Option<&Message>,
    ) -> Result<bool> {
        let key = RunState::key(tenant, run_id);
        if let Some((bytes, rev)) = self.store.get(&key).await? {
            let mut run = runs::decode(&key, &bytes)?;
            if run.workflow == cmd.workflow
                && cmd.version.is_none_or(|v| v == run.version)
                && self.payloads.hydrate(run.input.clone()).await?
                    == self.payloads.hydrate(cmd.input.clone()).await?
            {
                // The same start again. When its first delivery wrote the run but could not
                // publish what it produced (a stream without a leader, say), the start was
                // not acked and this is its redelivery: the outbox still holds the first
                // tasks, and nothing else would ever send them. They go out now, as any
                // redelivered cause's would, and the outbox is cleared.
                if !run.outbox.is_empty() {
                    let def = self.definition_of(&run).await?;
                    let event = Event::Start {
                        tenant: tenant.to_string(),
                        run_id: run_id.to_string(),
                        cmd,
                    };
                    let lookup =
                        |p: &str| self.resolved.lock().ok().and_then(|m| m.get(p).cloned());
                    self.recover_outbox(&key, &run, &event, &def, &lookup)
                        .await?;
                    run.outbox.clear();
                    run.outbox_cause = None;
                    if let Ok(mut m) = self.runs.lock() {
                        m.remove(&key);
                    }
                    // A conflict means a newer state was written, with its own outbox.
                    let _ = self.write(&key, &run, Some(rev)).await?;
                }
                return Ok(false);
            }
            let reason = format!(
                "run id `{run_id}` is taken by a run of `{}` v{} with another input; this start of `{}` was not applied (use another run id)",
                run.workflow, run.version, cmd.workflow
            );
            self.dead_letter_start(msg, &reason).await;
            return Ok(false);
        }
        let (wf, version) = match self.registry.get(tenant, &cmd.workflow, cmd.version).await {
            Ok(x) => x,
            Err(e @ aob_runtime::Error::WorkflowNotFound { .. }) => {
                let reason = e.to_string();
                self.refuse_start(tenant, run_id, &cmd, msg, &reason, None)
                    .await;
                return Ok(false);
            }
            Err(e) => return Err(e.into()),
        };
        let def = self.compiled(tenant, wf, version)?;
        let mut cmd = cmd;
        if let Some(fork) = cmd.fork.as_mut() {
            // The reused outputs are read here, from the source run's state: a start
            // carries the result, so the run is made from what admission saw.
            let key = RunState::key(tenant, &fork.run);
            let seed = match self.store.get(&key).await? {
                None => Err(format!(
                    "cannot fork run {}: there is no such run",
                    fork.run
                )),
                Some((bytes, _)) => {
                    let source = runs::decode(&key, &bytes)?;
                    if cmd.input.is_null() {
                        cmd.input = source.input.clone();
                    }
                    machine::fork_seed(&source, &fork.from, &fork.set)
                }
            };
            match seed {
                Ok(seed) => {
                    if let Some(fork) = cmd.fork.as_mut() {
                        fork.set = seed;
                    }
                }
                Err(reason) => {
                    self.refuse_start(tenant, run_id, &cmd, msg, &reason, None)
                        .await;
                    return Ok(false);
                }
            }
        }
        if let Some(schema) = &def.wf.input {
            let input = self.payloads.hydrate(cmd.input.clone()).await?;
            let problems = input_problems(schema, &input);
            if !problems.is_empty() {
                let reason = format!(
                    "input does not match the input schema of `{}` v{version}: {}",
                    def.wf.name,
                    problems.join("; ")
                );
                self.refuse_start(
                    tenant,
                    run_id,
                    &cmd,
                    msg,
                    &reason,
                    Some(json!({"errors": problems})),
                )
                .await;
                return Ok(false);
            }
        }
        let workflow = cmd.workflow.clone();
        let parent = cmd.parent.clone();
        cmd.input = self
            .payloads
            .offload(cmd.input, &format!("{tenant}/{run_id}/input"))
            .await?;
        let started = self
            .apply(
                tenant,
                run_id,
                Some(def),
                Event::Start {
                    tenant: tenant.to_string(),
                    run_id: run_id.to_string(),
                    cmd,
                },
            )
            .await;
        match started {
            Err(Error::TooLarge(why)) => {
                self.announce_rejection(tenant, run_id, Some(&workflow), &why, None)
                    .await;
                self.dead_letter_start(msg, &why).await;
                self.tell_parent(tenant, run_id, parent.as_ref(), &why)
                    .await;
                Ok(false)
            }
            other => other,
        }
    }

    /// Refuses a start: its rejection is announced, it is dead-lettered, and a parent
    /// waiting for it as its child hears that the child never started.
    async fn refuse_start(
        &self,
        tenant: &str,
        run_id: &str,
        cmd: &StartCommand,
        msg: Option<&Message>,
        reason: &str,
        details: Option<Value>,
    ) {
        self.announce_rejection(tenant, run_id, Some(&cmd.workflow), reason, details)
            .await;
        self.dead_letter_start(msg, reason).await;
        self.tell_parent(tenant, run_id, cmd.parent.as_ref(), reason)
            .await;
    }

    /// Fails the parent's `workflow` step whose child `run_id` was refused.
    async fn tell_parent(
        &self,
        tenant: &str,
        run_id: &str,
        parent: Option<&aob_model::wire::ParentRef>,
        reason: &str,
    ) {
        let Some(p) = parent else {
            return;
        };
        let result = StepResult {
            tenant: tenant.to_string(),
            run_id: p.run.clone(),
            at: p.at.clone(),
            outcome: Outcome::Failed {
                error: aob_model::wire::StepError::terminal(format!(
                    "child run {run_id} was not started: {reason}"
                )),
            },
            duration_ms: 0,
        };
        let body = serde_json::to_vec(&result).unwrap_or_default();
        if let Err(e) = bus::publish_acked(
            &self.js,
            subjects::result(tenant, &p.run),
            &aob_runtime::nats::result_msg_id(&result),
            body.into(),
        )
        .await
        {
            tracing::error!(parent = %p.run, "could not tell a parent run its child was refused: {e}");
        }
    }

    /// Dead-letters a start the engine will not apply, so `aob dlq ls` shows it and
    /// `aob dlq replay` can publish it again once its cause is fixed.
    pub(super) async fn dead_letter_start(&self, msg: Option<&Message>, reason: &str) {
        let Some(msg) = msg else { return };
        self.metrics.dead_letters.fetch_add(1, Ordering::Relaxed);
        bus::dead_letter_with_id(
            &self.js,
            "engine",
            &msg.subject,
            &msg.payload,
            reason,
            msg_id(msg).as_deref(),
        )
        .await;
    }
}

pub(super) fn input_problems(schema: &Value, input: &Value) -> Vec<String> {
    machine::schema_problems(schema, input, "the workflow's input schema")
}

//! The run loop: load a run (cache, else the store), deal with a stored outbox once, apply
//! the event with the pure machine, keep the state bounded, write it by compare-and-set,
//! retry on a conflict.

use super::*;

impl<S: RunStore> Engine<S> {
    /// Offloads a result's output too large to keep in run state. Called only for a result
    /// the run will accept, so a stale or duplicate result writes nothing.
    pub(super) async fn offload_output(&self, event: &mut Event) -> Result<()> {
        if let Event::Result(r) = event
            && let Outcome::Completed { output } = &mut r.outcome
            && aob_runtime::payload::reference(output).is_none()
            && serde_json::to_vec(output).map(|b| b.len()).unwrap_or(0)
                > if r.at.item.is_some() {
                    self.cfg.item_inline_limit
                } else {
                    self.cfg.state_inline_limit
                }
        {
            let key = format!("{}/{}/{}.state", r.tenant, r.run_id, r.at.token());
            let inline = std::mem::take(output);
            *output = self.offload_always(inline, &key).await?;
        }
        Ok(())
    }

    pub(super) async fn offload_always(&self, value: Value, key: &str) -> Result<Value> {
        if aob_runtime::payload::reference(&value).is_some() {
            return Ok(value);
        }
        Ok(self.payloads.offload_with_threshold(value, key, 0).await?)
    }

    pub(super) fn compiled(
        &self,
        tenant: &str,
        wf: aob_model::Workflow,
        version: u32,
    ) -> Result<Arc<Compiled>> {
        let key = (tenant.to_string(), wf.name.clone(), version);
        if let Some(c) = self.defs.lock().ok().and_then(|m| m.get(&key).cloned()) {
            return Ok(c);
        }
        let c = Arc::new(
            Compiled::new(wf, version).map_err(|message| Error::Corrupt {
                what: format!("workflow {} v{version}", key.1),
                message,
            })?,
        );
        if let Ok(mut m) = self.defs.lock() {
            m.insert(key, c.clone());
        }
        Ok(c)
    }

    pub(super) async fn definition_of(&self, state: &RunState) -> Result<Arc<Compiled>> {
        let key = (state.tenant.clone(), state.workflow.clone(), state.version);
        if let Some(c) = self.defs.lock().ok().and_then(|m| m.get(&key).cloned()) {
            return Ok(c);
        }
        let (wf, version) = self
            .registry
            .get(&state.tenant, &state.workflow, Some(state.version))
            .await?;
        self.compiled(&state.tenant, wf, version)
    }

    pub(super) async fn load(&self, key: &str) -> Result<Option<Loaded>> {
        // Taken out of the cache: only this run's worker touches it, and a successful
        // write puts the next state back.
        if let Some(c) = self.runs.lock().ok().and_then(|mut m| m.remove(key)) {
            return Ok(Some((c.state, c.revision, c.known, true)));
        }
        let known = Instant::now();
        match self.store.get(key).await? {
            None => Ok(None),
            Some((bytes, rev)) => Ok(Some((decode(key, &bytes)?, rev, known, false))),
        }
    }

    /// Applies one event to a run, retrying on compare-and-set conflicts; true when it
    /// changed the run.
    pub(super) async fn apply(
        &self,
        tenant: &str,
        run_id: &str,
        def: Option<Arc<Compiled>>,
        mut event: Event,
    ) -> Result<bool> {
        let key = RunState::key(tenant, run_id);
        // Admission has just read the store and found no run with this id: a start is
        // applied to no state, and a run created meanwhile makes the create conflict.
        let mut fresh_start = matches!(event, Event::Start { .. });
        loop {
            let loaded = if std::mem::take(&mut fresh_start) {
                None
            } else {
                self.load(&key).await?
            };
            let (state, rev, known, from_cache) = match loaded {
                Some((state, rev, known, from_cache)) => (Some(state), rev, known, from_cache),
                None => (None, 0, Instant::now(), false),
            };
            // A message without a trace context of its own (a timer, a person's decision)
            // belongs to its run's trace; the decision is a span of it.
            if let Some(s) = &state {
                aob_runtime::trace::adopt(s.trace.as_deref());
            }
            let mut span = aob_runtime::trace::start(
                format!("engine {}", event.id()),
                opentelemetry::trace::SpanKind::Internal,
                vec![
                    opentelemetry::KeyValue::new("aob.tenant", tenant.to_string()),
                    opentelemetry::KeyValue::new("aob.run_id", run_id.to_string()),
                ],
            );
            let def = match (&def, &state) {
                (Some(d), _) => d.clone(),
                (None, Some(s)) => self.definition_of(s).await?,
                (None, None) if matches!(event, Event::Result(_)) => {
                    return Err(ahead(&key, &event));
                }
                (None, None) => {
                    tracing::debug!(%key, "event for an unknown run ignored");
                    return Ok(false);
                }
            };
            if let Some(s) = &state {
                if let Event::Result(r) = &event
                    && machine::is_current(s, &r.at)
                {
                    self.offload_output(&mut event).await?;
                }
                self.resolve_for_conditions(&def, s, &event).await?;
            }
            let lookup = |p: &str| self.resolved.lock().ok().and_then(|m| m.get(p).cloned());
            // A stored outbox is dealt with once, here, and cleared by the next write.
            let mut recovered = false;
            if let Some(s) = &state
                && !from_cache
                && !s.outbox.is_empty()
            {
                recovered = true;
                self.recover_outbox(&key, s, &event, &def, &lookup).await?;
            }
            let existed = state.is_some();
            let (mut next, effects) =
                match machine::transition(&def, state, event.clone(), now_ms(), &lookup) {
                    machine::Transition::Changed(next, effects) => (next, effects),
                    machine::Transition::Unchanged(unchanged) => {
                        // Stale or duplicate: keep the state cached as it was, its
                        // outbox cleared if this pass dealt with it.
                        span.set("aob.unchanged", true);
                        let Some(mut state) = unchanged else {
                            return Ok(false);
                        };
                        let mut revision = rev;
                        if recovered {
                            state.outbox.clear();
                            state.outbox_cause = None;
                            match self.write(&key, &state, Some(rev)).await? {
                                Ok(r) => revision = r,
                                // Someone wrote a newer state (with its own outbox).
                                Err(_) => return Ok(false),
                            }
                        }
                        if let Ok(mut m) = self.runs.lock() {
                            m.insert(
                                key.clone(),
                                Cached {
                                    state,
                                    revision,
                                    known,
                                },
                            );
                        }
                        return Ok(false);
                    }
                    machine::Transition::Unresolved(paths) => {
                        return Err(Error::Runtime(aob_runtime::Error::Payload(format!(
                            "could not load {} for a condition of run {key}; retrying",
                            paths.join(", ")
                        ))));
                    }
                    // A cached state may be behind the store (another engine wrote): it
                    // stays out of the cache, and the next pass reads the store.
                    machine::Transition::Ahead(_) if from_cache => continue,
                    machine::Transition::Ahead(_) => return Err(ahead(&key, &event)),
                };
            span.set("aob.workflow", next.workflow.clone());
            span.set("aob.run_status", format!("{:?}", next.status));
            // The run's trace: the one its start came with (or began here).
            if next.trace.is_none() {
                next.trace = aob_runtime::trace::current();
            }
            // Tasks go out now, while the state is written (see the module docs).
            let early = if rules::send_tasks_early(known.elapsed(), self.dedup_within) {
                Some(self.send_tasks(&effects).await?)
            } else {
                None
            };
            let mut effects = effects;
            self.bound_outputs(&mut next, &mut effects).await?;
            next.outbox = machine::stored_outbox(&effects);
            next.outbox_cause = Some(event.id());
            let body = encode(&key, &next)?;
            if body.len() > self.cfg.max_state_bytes {
                // Written, the state would be refused by the server and the run would stall
                // in silence: it ends instead, with the reason in its history.
                return self.fail_oversized(&key, &def, body.len()).await;
            }
            let written = self.write_bytes(&key, body, existed.then_some(rev)).await?;
            match written {
                Ok(new_rev) => {
                    let known = Instant::now();
                    self.metrics.events.fetch_add(1, Ordering::Relaxed);
                    // Cached only once published: if publishing fails, the redelivered
                    // event loads the stored state and publishes its outbox again.
                    self.publish(&next, &effects, early).await?;
                    if !next.status.is_terminal()
                        && let Ok(mut m) = self.runs.lock()
                    {
                        m.insert(
                            key.clone(),
                            Cached {
                                state: next,
                                revision: new_rev,
                                known,
                            },
                        );
                    }
                    return Ok(true);
                }
                Err(_conflict) => {
                    self.metrics.cas_conflicts.fetch_add(1, Ordering::Relaxed);
                    if !existed {
                        // Someone created this run already: a duplicate start.
                        if matches!(event, Event::Start { .. }) {
                            return Ok(false);
                        }
                    }
                }
            }
        }
    }

    /// Keeps step outputs the engine assembled (a for_each step's list) out of the run
    /// record and the history when large: offloaded once, the same reference in the state,
    /// the step's `step_completed` event and the run's `completed` event.
    pub(super) async fn bound_outputs(
        &self,
        next: &mut RunState,
        effects: &mut [Effect],
    ) -> Result<()> {
        // Only outputs this transition set can be new: the steps it completed (results
        // were bounded before the transition; what is left is lists the engine assembled).
        let completed: Vec<String> = effects
            .iter()
            .filter_map(|e| match e {
                Effect::History { event }
                    if event.kind == HistoryKind::StepCompleted && event.item.is_none() =>
                {
                    event.step.clone()
                }
                _ => None,
            })
            .collect();
        let mut moved: HashMap<String, Value> = HashMap::new();
        for id in completed {
            let Some(output) = next.steps.get_mut(&id).and_then(|st| st.output.as_mut()) else {
                continue;
            };
            if !output.is_array() {
                continue;
            }
            if aob_runtime::payload::reference(output).is_some()
                || serde_json::to_vec(output).map_or(0, |b| b.len()) <= self.cfg.state_inline_limit
            {
                continue;
            }
            let key = format!("{}/{}/{id}.output", next.tenant, next.run_id);
            let r = self.offload_always(std::mem::take(output), &key).await?;
            *output = r.clone();
            moved.insert(id.clone(), r);
        }
        if moved.is_empty() {
            return Ok(());
        }
        for e in effects.iter_mut() {
            let Effect::History { event } = e else {
                continue;
            };
            let Some(data) = event.data.as_mut() else {
                continue;
            };
            match (event.kind, event.step.as_ref(), event.item) {
                (HistoryKind::StepCompleted, Some(step), None) => {
                    if let Some(r) = moved.get(step) {
                        data["output"] = r.clone();
                    }
                }
                (HistoryKind::Completed, _, _) => {
                    if let Some(outputs) = data.get_mut("outputs").and_then(Value::as_object_mut) {
                        for (id, r) in &moved {
                            if let Some(o) = outputs.get_mut(id) {
                                *o = r.clone();
                            }
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Ends a run whose next state would be larger than `max_state_bytes`, from its stored
    /// state, with the reason.
    pub(super) async fn fail_oversized(
        &self,
        key: &str,
        def: &Compiled,
        size: usize,
    ) -> Result<bool> {
        let why = format!(
            "the run's state would grow to {size} bytes, over the limit of {} (keep large values in step outputs, which travel by reference, or split the work into smaller runs)",
            self.cfg.max_state_bytes
        );
        tracing::warn!(%key, "{why}");
        let Some((state, rev, _, _)) = self.load(key).await? else {
            return Err(Error::TooLarge(why));
        };
        let machine::Transition::Changed(next, effects) =
            machine::fail_run(def, state, why, now_ms())
        else {
            return Ok(false);
        };
        let mut next = next;
        next.outbox = machine::stored_outbox(&effects);
        next.outbox_cause = Some("oversized".to_string());
        if self.write(key, &next, Some(rev)).await?.is_err() {
            // Someone wrote meanwhile: the event is applied again to the newer state.
            return Err(Error::Store(crate::store::StoreError(format!(
                "{key} changed while failing an oversized run"
            ))));
        }
        self.publish(&next, &effects, None).await?;
        Ok(true)
    }

    /// Writes a run state: create-only without a revision, else compare-and-set on it.
    pub(super) async fn write(
        &self,
        key: &str,
        state: &RunState,
        revision: Option<u64>,
    ) -> Result<std::result::Result<u64, crate::store::Conflict>> {
        self.write_bytes(key, encode(key, state)?, revision).await
    }

    /// [`Self::write`] of a state already encoded.
    pub(super) async fn write_bytes(
        &self,
        key: &str,
        body: Vec<u8>,
        revision: Option<u64>,
    ) -> Result<std::result::Result<u64, crate::store::Conflict>> {
        Ok(match revision {
            None => self.store.create(key, body.into()).await?,
            Some(rev) => self.store.update(key, body.into(), rev).await?,
        })
    }

    /// Deals with the outbox of a state read from the store. Its writer publishes it and
    /// only then acks the event that produced it, so the outbox may be unpublished only if
    /// that writer died (or failed to publish) before the ack. Publishing it again is
    /// harmless while the streams still drop the repeats as duplicates, and the event that
    /// produced it comes back within the consumer's ack wait; so it is published again
    /// when it was written within [`Self::dedup_within`], or when `event` is a redelivery
    /// of its cause. Anything older was published long ago: publishing it again would
    /// run a task twice or repeat a run's `completed` event. The caller's next write
    /// clears it either way.
    pub(super) async fn recover_outbox(
        &self,
        key: &str,
        state: &RunState,
        event: &Event,
        def: &Compiled,
        resolve: &(dyn Fn(&str) -> Option<Value> + Sync),
    ) -> Result<()> {
        let age = Duration::from_millis(now_ms().saturating_sub(state.updated_ms));
        let cause = state.outbox_cause.as_deref() == Some(event.id().as_str());
        if rules::republish_outbox(age, self.dedup_within, cause) {
            let mut effects = Vec::with_capacity(state.outbox.len());
            for e in &state.outbox {
                match e {
                    Effect::Launched { at, deadline_ms } => {
                        let task = machine::task_of(def, state, at, *deadline_ms, resolve)
                            .ok_or_else(|| {
                                Error::Runtime(aob_runtime::Error::Payload(format!(
                                    "the task of {} in the outbox of {key} cannot be rebuilt yet",
                                    at.token()
                                )))
                            })?;
                        effects.push(Effect::Task {
                            task: Box::new(task),
                        });
                    }
                    other => effects.push(other.clone()),
                }
            }
            self.publish(state, &effects, None).await?;
        } else {
            self.metrics.outbox_skipped.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%key, ?age, "stored outbox older than the duplicate window: not published again");
        }
        Ok(())
    }

    /// Loads offloaded outputs (and input) that conditions read, so the machine sees values.
    pub(super) async fn resolve_for_conditions(
        &self,
        def: &Compiled,
        state: &RunState,
        event: &Event,
    ) -> Result<()> {
        let mut wanted = Vec::new();
        for id in &def.condition_reads {
            if let Some(p) = state
                .steps
                .get(id)
                .and_then(|s| s.output.as_ref())
                .and_then(aob_runtime::payload::reference)
            {
                wanted.push(p);
            }
        }
        if let Event::Result(StepResult {
            outcome: Outcome::Completed { output },
            ..
        }) = event
            && let Some(p) = aob_runtime::payload::reference(output)
        {
            wanted.push(p);
        }
        if let Some(p) = aob_runtime::payload::reference(&state.input) {
            wanted.push(p);
        }
        // Room for this event's values is made first, so none of them is evicted before
        // the machine reads it.
        if let Ok(mut m) = self.resolved.lock()
            && m.len() + wanted.len() > 1024
        {
            m.clear();
        }
        for p in wanted {
            if self
                .resolved
                .lock()
                .map(|m| m.contains_key(&p))
                .unwrap_or(false)
            {
                continue;
            }
            let r = json!({ aob_runtime::payload::REF_KEY: p });
            // A value that cannot be loaded now fails the event (it is retried): a
            // condition must not decide without it.
            let v = self.payloads.hydrate(r).await?;
            if let Ok(mut m) = self.resolved.lock() {
                m.insert(p, v);
            }
        }
        Ok(())
    }
}

/// A run state as read from the store.
pub(super) fn decode(key: &str, bytes: &[u8]) -> Result<RunState> {
    serde_json::from_slice(bytes).map_err(|e| Error::Corrupt {
        what: format!("run state {key}"),
        message: e.to_string(),
    })
}

/// A run state as stored.
pub(super) fn encode(key: &str, state: &RunState) -> Result<Vec<u8>> {
    serde_json::to_vec(state).map_err(|e| Error::Corrupt {
        what: format!("run state {key}"),
        message: e.to_string(),
    })
}

/// The error that holds a result until its run's stored state catches up.
pub(super) fn ahead(key: &str, event: &Event) -> Error {
    let at = match event {
        Event::Result(r) => r.at.token(),
        _ => String::new(),
    };
    Error::Ahead {
        run: key.to_string(),
        at,
    }
}

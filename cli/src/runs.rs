//! Runs: start (and wait), follow the history, read the state, list, cancel.
//!
//! The pieces here take a JetStream context and a tenant rather than command-line
//! arguments, so that tests and other tools can use them.

use std::process::ExitCode;
use std::time::{Duration, Instant, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use async_nats::HeaderMap;
use async_nats::jetstream::{
    self,
    consumer::{DeliverPolicy, pull},
    kv,
};
use futures::StreamExt;
use serde_json::Value;

use aob_model::state::{RunState, StepState, StepStatus};
use aob_model::wire::{HistoryEvent, HistoryKind, Signal, StartCommand};
use aob_runtime::PayloadStore;
use aob_streams::subjects;

use crate::cli::StartArgs;
use crate::ctx::Ctx;
use crate::progress::{Progress, duration, one_line};

/// How long `--wait` and `watch` stay silent before saying that nothing is happening.
const QUIET_HINT: Duration = Duration::from_secs(5);

/// What to start.
#[derive(Debug, Clone)]
pub struct StartRequest {
    /// Workflow name.
    pub workflow: String,
    /// Version; the latest when `None`.
    pub version: Option<u32>,
    /// Input (offloaded to the payload store when large).
    pub input: Value,
    /// Run id; a new ULID when `None`.
    pub run_id: Option<String>,
    /// Who starts it.
    pub by: Option<String>,
    /// A fork of an earlier run.
    pub fork: Option<aob_model::wire::ForkSpec>,
}

/// A start that JetStream accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Started {
    /// Run id.
    pub run_id: String,
    /// True when JetStream dropped the command as a duplicate of an earlier start with
    /// this run id (within its deduplication window).
    pub duplicate: bool,
}

/// A new run id (a ULID).
pub fn new_run_id() -> String {
    ulid::Ulid::new().to_string()
}

fn check_run_id(id: &str) -> Result<()> {
    if subjects::is_token(id) {
        Ok(())
    } else {
        bail!("run id `{id}` is not valid: use letters, digits, `_` or `-` (at most 128)")
    }
}

/// Publishes a start command with `Nats-Msg-Id` = run id and waits for JetStream's ack.
/// The input goes through the payload store under `<tenant>/<run>/input` when it is larger
/// than the store's threshold.
pub async fn start_run(
    js: &jetstream::Context,
    payloads: &PayloadStore,
    tenant: &str,
    req: StartRequest,
) -> Result<Started> {
    let chosen = req.run_id.is_some();
    let run_id = req.run_id.unwrap_or_else(new_run_id);
    check_run_id(&run_id)?;
    if chosen && let Some(run) = get_state(js, tenant, &run_id).await? {
        // The engine never writes into a run that exists: say so here rather than leave
        // the caller following someone else's run.
        let same = run.workflow == req.workflow
            && req.version.is_none_or(|v| v == run.version)
            && payloads
                .hydrate(run.input.clone())
                .await
                .context("reading the existing run's input")?
                == req.input;
        if !same {
            bail!(
                "run id `{run_id}` is taken by a run of `{}` v{} ({}) with another input; this start was not sent (choose another run id)",
                run.workflow,
                run.version,
                word(&run.status)
            );
        }
        return Ok(Started {
            run_id,
            duplicate: true,
        });
    }
    let input = payloads
        .offload(req.input, &format!("{tenant}/{run_id}/input"))
        .await
        .context("offloading the run input")?;
    let cmd = StartCommand {
        workflow: req.workflow,
        version: req.version,
        input,
        run_id: Some(run_id.clone()),
        by: req.by,
        fork: req.fork,
        parent: None,
    };
    let body = serde_json::to_vec(&cmd)?;
    let subject = subjects::start(tenant);
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Msg-Id", run_id.as_str());
    // The run's trace begins here: the engine's decisions and every step are its spans.
    let span = aob_runtime::trace::start(
        format!("start {}", cmd.workflow),
        opentelemetry::trace::SpanKind::Producer,
        vec![
            opentelemetry::KeyValue::new("aob.tenant", tenant.to_string()),
            opentelemetry::KeyValue::new("aob.run_id", run_id.clone()),
            opentelemetry::KeyValue::new("aob.workflow", cmd.workflow.clone()),
        ],
    );
    if let Some(tp) = span.traceparent() {
        headers.insert(aob_runtime::trace::HEADER, tp.as_str());
    }
    let ack = js
        .publish_with_headers(subject.clone(), headers, body.into())
        .await
        .with_context(|| format!("publishing the start to {subject}"))?
        .await
        .with_context(|| {
            format!(
                "waiting for JetStream to accept the start on {subject} (run `aob streams apply`?)"
            )
        })?;
    Ok(Started {
        run_id,
        duplicate: ack.duplicate,
    })
}

/// A run's history, from its first event, live.
pub struct HistoryFeed {
    run_id: String,
    tenant: String,
    messages: pull::Ordered,
}

impl std::fmt::Debug for HistoryFeed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HistoryFeed")
            .field("tenant", &self.tenant)
            .field("run_id", &self.run_id)
            .finish()
    }
}

impl HistoryFeed {
    /// Opens an ordered consumer on `AOB_HISTORY` for one run, delivering everything from
    /// the start: open it before starting a run, or any time after.
    pub async fn open(js: &jetstream::Context, tenant: &str, run_id: &str) -> Result<Self> {
        check_run_id(run_id)?;
        let stream = js.get_stream(aob_streams::HISTORY).await.map_err(|e| {
            anyhow!(
                "stream {}: {e} (run `aob streams apply` to create the topology)",
                aob_streams::HISTORY
            )
        })?;
        let consumer = stream
            .create_consumer(pull::OrderedConfig {
                // Named, so the filter travels in the request's subject, where a tenant's
                // NATS permissions can pin it to the tenant's runs (`aob infra nats-accounts`).
                name: Some(format!("watch_{}", ulid::Ulid::new())),
                filter_subject: subjects::history_of(tenant, run_id),
                deliver_policy: DeliverPolicy::All,
                ..Default::default()
            })
            .await
            .with_context(|| format!("following the history of run {run_id}"))?;
        let messages = consumer
            .messages()
            .await
            .with_context(|| format!("following the history of run {run_id}"))?;
        Ok(HistoryFeed {
            run_id: run_id.to_string(),
            tenant: tenant.to_string(),
            messages,
        })
    }

    /// The next event; events that do not parse are skipped with a warning.
    pub async fn next(&mut self) -> Result<HistoryEvent> {
        loop {
            let msg = self
                .messages
                .next()
                .await
                .ok_or_else(|| anyhow!("the history of run {} ended unexpectedly", self.run_id))?
                .with_context(|| format!("reading the history of run {}", self.run_id))?;
            match serde_json::from_slice::<HistoryEvent>(&msg.payload) {
                Ok(ev) => return Ok(ev),
                Err(e) => {
                    tracing::warn!(subject = %msg.subject, "skipping a history event that does not parse: {e}")
                }
            }
        }
    }

    /// Reads events until a terminal one, which it returns. Each event's progress line is
    /// passed to `on_line`. Gives up after `timeout`, if given.
    pub async fn follow(
        &mut self,
        timeout: Option<Duration>,
        mut on_line: impl FnMut(&str),
    ) -> Result<HistoryEvent> {
        let begun = Instant::now();
        let mut progress = Progress::new();
        // Until the first event (or the hint), wake up after QUIET_HINT to say why it is quiet.
        let mut hint_due = true;
        let mut started = false;
        loop {
            let mut wait = timeout.map(|t| t.saturating_sub(begun.elapsed()));
            if hint_due {
                wait = Some(wait.map_or(QUIET_HINT, |w| w.min(QUIET_HINT)));
            }
            let ev = match wait {
                Some(w) => match tokio::time::timeout(w, self.next()).await {
                    Ok(ev) => ev?,
                    Err(_) if timeout.is_some_and(|t| begun.elapsed() >= t) => {
                        bail!(
                            "gave up waiting for run {} after {} (if it is running, follow it with `aob run watch {}`)",
                            self.run_id,
                            humantime::format_duration(timeout.unwrap_or_default()),
                            self.run_id
                        )
                    }
                    Err(_) => {
                        hint_due = false;
                        eprintln!(
                            "  … no events yet for run {} in tenant `{}`: is the engine running (`aob dev`), and is the run id right?",
                            self.run_id, self.tenant
                        );
                        continue;
                    }
                },
                None => self.next().await?,
            };
            hint_due = false;
            if ev.kind == HistoryKind::Rejected && started {
                // A start that reused this run's id was refused; the run goes on. (The
                // engine no longer publishes such rejections; older histories may hold one.)
                eprintln!(
                    "  note: a start reusing run id {} was rejected: {}",
                    self.run_id,
                    ev.message.as_deref().unwrap_or("no reason given")
                );
                continue;
            }
            started |= ev.kind == HistoryKind::Started;
            if let Some(line) = progress.line(&ev) {
                on_line(&line);
            }
            if ev.kind.is_terminal() {
                return Ok(ev);
            }
        }
    }
}

/// Starts a run and follows it to its end: the history is subscribed to before the start
/// is published. Returns the start and the terminal event.
pub async fn start_and_wait(
    js: &jetstream::Context,
    payloads: &PayloadStore,
    tenant: &str,
    req: StartRequest,
    timeout: Option<Duration>,
    on_line: impl FnMut(&str),
) -> Result<(Started, HistoryEvent)> {
    let run_id = req.run_id.clone().unwrap_or_else(new_run_id);
    let mut feed = HistoryFeed::open(js, tenant, &run_id).await?;
    let started = start_run(
        js,
        payloads,
        tenant,
        StartRequest {
            run_id: Some(run_id),
            ..req
        },
    )
    .await?;
    let end = feed.follow(timeout, on_line).await?;
    Ok((started, end))
}

/// Exit code for a terminal event: 0 only for a completed run.
pub fn exit_code(end: &HistoryEvent) -> ExitCode {
    if end.kind == HistoryKind::Completed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

async fn runs_bucket(js: &jetstream::Context) -> Result<kv::Store> {
    js.get_key_value(aob_streams::RUNS).await.map_err(|e| {
        anyhow!(
            "bucket {}: {e} (run `aob streams apply` to create the topology)",
            aob_streams::RUNS
        )
    })
}

/// The state of a run, if it exists.
pub async fn get_state(
    js: &jetstream::Context,
    tenant: &str,
    run_id: &str,
) -> Result<Option<RunState>> {
    if !subjects::is_token(run_id) {
        return Ok(None);
    }
    let kv = runs_bucket(js).await?;
    read_state(&kv, &RunState::key(tenant, run_id)).await
}

async fn read_state(kv: &kv::Store, key: &str) -> Result<Option<RunState>> {
    let Some(body) = kv
        .get(key)
        .await
        .with_context(|| format!("reading run {key}"))?
    else {
        return Ok(None);
    };
    let state = serde_json::from_slice(&body)
        .with_context(|| format!("run {key} is stored in a form this aob does not read"))?;
    Ok(Some(state))
}

fn not_found(run_id: &str, tenant: &str) -> anyhow::Error {
    anyhow!("run `{run_id}` not found in tenant `{tenant}`")
}

/// The tenant's runs, newest first (at most `limit`), and how many there are in all.
pub async fn list_states(
    js: &jetstream::Context,
    tenant: &str,
    limit: usize,
) -> Result<(Vec<RunState>, usize)> {
    let kv = runs_bucket(js).await?;
    // Only this tenant's keys (`<tenant>.<run>`) are read: the server filters the bucket's
    // stream by subject, last value per key, so other tenants' runs are never scanned.
    let filter = format!("{tenant}.*");
    let stream = js
        .get_stream(format!("KV_{}", aob_streams::RUNS))
        .await
        .context("listing runs")?;
    let mut counts = stream
        .info_with_subjects(format!("$KV.{}.{filter}", aob_streams::RUNS))
        .await
        .context("listing runs")?;
    let mut keys = 0usize;
    while let Some(c) = counts.next().await {
        c.context("listing runs")?;
        keys += 1;
    }
    let mut states = Vec::with_capacity(keys);
    if keys > 0 {
        let mut watch = kv
            .watch_with_history(&filter)
            .await
            .context("listing runs")?;
        while let Some(entry) = watch.next().await {
            let entry = entry.context("listing runs")?;
            if entry.operation == kv::Operation::Put {
                match serde_json::from_slice::<RunState>(&entry.value) {
                    Ok(s) => states.push(s),
                    Err(e) => tracing::warn!(key = %entry.key, "run state does not parse: {e}"),
                }
            }
            if entry.delta == 0 {
                break;
            }
        }
    }
    states.sort_by(|a, b| {
        b.created_ms
            .cmp(&a.created_ms)
            .then_with(|| b.run_id.cmp(&a.run_id))
    });
    let total = states.len();
    states.truncate(limit);
    Ok((states, total))
}

/// `2025-01-31T12:00:00.123Z`.
pub fn timestamp(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// An enum's serde name (`COMPLETED`, `RUNNING`, ...).
pub fn word<T: serde::Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(Value::String(s)) => s,
        _ => "?".to_string(),
    }
}

fn step_duration(s: &StepState, now: u64) -> String {
    match (s.started_ms, s.finished_ms) {
        (Some(a), Some(b)) => duration(b.saturating_sub(a)),
        (Some(a), None) => format!("{}…", duration(now.saturating_sub(a))),
        _ => String::new(),
    }
}

fn step_note(s: &StepState) -> String {
    let mut note = match (&s.error, &s.reason) {
        // A pending step with an error is waiting for its retry.
        (Some(e), _) if s.status() == StepStatus::Pending => {
            format!("retry pending after: {}", one_line(&e.message, 100))
        }
        (Some(e), _) if s.status() != StepStatus::Completed => one_line(&e.message, 120),
        (_, Some(r)) => one_line(r, 120),
        _ => String::new(),
    };
    if !s.slots().is_empty() {
        let done = s
            .slots()
            .iter()
            .filter(|x| x.status().is_terminal())
            .count();
        let items = format!("items {done}/{} done", s.slots().len());
        note = if note.is_empty() {
            items
        } else {
            format!("{items}; {note}")
        };
    }
    if let Some(i) = s.iteration() {
        let it = format!("iteration {i}");
        note = if note.is_empty() {
            it
        } else {
            format!("{it}; {note}")
        };
    }
    note
}

/// The text of `aob run get`.
pub fn describe(state: &RunState, now: u64) -> String {
    let mut out = String::new();
    let mut field = |k: &str, v: String| {
        out.push_str(&format!("{k:<9} {v}\n"));
    };
    field("run", state.run_id.clone());
    field("status", word(&state.status));
    field("workflow", format!("{}@{}", state.workflow, state.version));
    field("created", timestamp(state.created_ms));
    match state.finished_ms {
        Some(f) => field(
            "finished",
            format!(
                "{} (took {})",
                timestamp(f),
                duration(f.saturating_sub(state.created_ms))
            ),
        ),
        None => field(
            "updated",
            format!(
                "{} (running for {})",
                timestamp(state.updated_ms),
                duration(now.saturating_sub(state.created_ms))
            ),
        ),
    }
    if let Some(e) = &state.error {
        field("error", one_line(e, 300));
    }
    let mut steps: Vec<(&String, &StepState)> = state.steps.iter().collect();
    steps.sort_by_key(|(id, s)| {
        (
            s.started_ms.unwrap_or(u64::MAX),
            s.finished_ms.unwrap_or(u64::MAX),
            id.as_str(),
        )
    });
    let rows: Vec<Vec<String>> = steps
        .into_iter()
        .map(|(id, s)| {
            vec![
                id.clone(),
                word(&s.status()),
                if s.attempt() == 0 {
                    String::new()
                } else {
                    s.attempt().to_string()
                },
                step_duration(s, now),
                step_note(s),
            ]
        })
        .collect();
    out.push('\n');
    out.push_str(&crate::table::render(
        &["STEP", "STATUS", "ATTEMPT", "DURATION", "ERROR/REASON"],
        &rows,
    ));
    out
}

/// The run state as JSON for `--json`: offloaded values loaded, the outbox left out.
pub async fn state_json(
    state: &RunState,
    payloads: impl FnOnce() -> Result<PayloadStore>,
) -> Result<Value> {
    let mut v = serde_json::to_value(state)?;
    if let Value::Object(map) = &mut v {
        map.remove("outbox");
    }
    if aob_runtime::payload::contains_ref(&v) {
        v = payloads()?
            .hydrate(v)
            .await
            .context("loading offloaded values")?;
    }
    Ok(v)
}

/// `aob run start`.
pub async fn cmd_start(ctx: &Ctx, args: StartArgs) -> Result<ExitCode> {
    let input = crate::input::parse_input(args.input.as_deref())?;
    if let Some(id) = &args.run_id {
        check_run_id(id)?;
    }
    let payloads = ctx.payloads()?;
    let client = ctx.connect().await?;
    let js = jetstream::new(client.clone());
    let req = StartRequest {
        workflow: args.name,
        version: args.version,
        input,
        run_id: args.run_id,
        by: Some(crate::people::identity(ctx)),
        fork: None,
    };
    if !args.wait {
        let started = start_run(&js, &payloads, &ctx.tenant, req).await?;
        if started.duplicate {
            eprintln!(
                "note: a start of run {} was already accepted; this one was dropped as a duplicate",
                started.run_id
            );
        }
        say!("{}", started.run_id);
        return Ok(ExitCode::SUCCESS);
    }
    let run_id = req.run_id.clone().unwrap_or_else(new_run_id);
    say!("run {run_id}");
    let req = StartRequest {
        run_id: Some(run_id),
        ..req
    };
    let (started, end) = start_and_wait(&js, &payloads, &ctx.tenant, req, args.timeout, |l| {
        say!("{l}")
    })
    .await?;
    if started.duplicate {
        eprintln!("note: this run id was started before; the history above is that run's");
    }
    Ok(exit_code(&end))
}

/// `aob run get`.
pub async fn cmd_get(ctx: &Ctx, id: &str, json: bool) -> Result<ExitCode> {
    let client = ctx.connect().await?;
    let js = jetstream::new(client);
    let state = get_state(&js, &ctx.tenant, id)
        .await?
        .ok_or_else(|| not_found(id, &ctx.tenant))?;
    if json {
        let v = state_json(&state, || ctx.payloads()).await?;
        say!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        crate::out::text(&describe(&state, aob_runtime::now_ms()));
    }
    Ok(ExitCode::SUCCESS)
}

/// `aob run watch`.
pub async fn cmd_watch(
    ctx: &Ctx,
    id: &str,
    timeout: Option<Duration>,
    tokens: bool,
) -> Result<ExitCode> {
    let client = ctx.connect().await?;
    let js = jetstream::new(client.clone());
    let mut feed = HistoryFeed::open(&js, &ctx.tenant, id).await?;
    // Streamed text is written as it arrives, after a `│ <step>:` mark; the next history
    // line starts on a line of its own.
    let mid_line = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let streaming = if tokens {
        let mut sub = client
            .subscribe(subjects::stream_of_run(&ctx.tenant, id))
            .await
            .with_context(|| format!("following what the steps of run {id} stream"))?;
        let mid_line = mid_line.clone();
        Some(tokio::spawn(async move {
            use std::sync::atomic::Ordering;
            while let Some(msg) = sub.next().await {
                let Ok(e) = serde_json::from_slice::<aob_runtime::context::Emitted>(&msg.payload)
                else {
                    continue;
                };
                if let aob_runtime::context::Emission::Chunk { text } = e.body {
                    if !mid_line.swap(true, Ordering::SeqCst) {
                        crate::out::text(&format!("  │ {}: ", e.at.step));
                    }
                    crate::out::text(&text);
                }
            }
        }))
    } else {
        None
    };
    let end = feed
        .follow(timeout, |l| {
            if mid_line.swap(false, std::sync::atomic::Ordering::SeqCst) {
                crate::out::text("\n");
            }
            say!("{l}")
        })
        .await;
    if let Some(task) = streaming {
        task.abort();
    }
    Ok(exit_code(&end?))
}

/// `aob run list`.
pub async fn cmd_list(ctx: &Ctx, limit: usize) -> Result<ExitCode> {
    let client = ctx.connect().await?;
    let js = jetstream::new(client);
    let (states, total) = list_states(&js, &ctx.tenant, limit).await?;
    if states.is_empty() {
        say!("no runs in tenant `{}`", ctx.tenant);
        return Ok(ExitCode::SUCCESS);
    }
    let now = aob_runtime::now_ms();
    let rows: Vec<Vec<String>> = states
        .iter()
        .map(|s| {
            let took = match s.finished_ms {
                Some(f) => duration(f.saturating_sub(s.created_ms)),
                None => format!("{}…", duration(now.saturating_sub(s.created_ms))),
            };
            vec![
                s.run_id.clone(),
                word(&s.status),
                format!("{}@{}", s.workflow, s.version),
                timestamp(s.created_ms),
                took,
            ]
        })
        .collect();
    crate::out::text(&crate::table::render(
        &["RUN", "STATUS", "WORKFLOW", "CREATED", "DURATION"],
        &rows,
    ));
    if total > states.len() {
        say!("({} of {total} runs; --limit shows more)", states.len());
    }
    Ok(ExitCode::SUCCESS)
}

/// Publishes a cancel signal for a run (message id `cancel.<run>`).
pub async fn cancel_run(
    js: &jetstream::Context,
    tenant: &str,
    run_id: &str,
    reason: Option<String>,
    by: Option<String>,
    compensate: bool,
) -> Result<()> {
    check_run_id(run_id)?;
    let body = serde_json::to_vec(&Signal::Cancel {
        reason,
        by,
        compensate,
    })?;
    let subject = subjects::signal(tenant, run_id);
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Msg-Id", format!("cancel.{run_id}").as_str());
    js.publish_with_headers(subject.clone(), headers, body.into())
        .await
        .with_context(|| format!("publishing the cancel to {subject}"))?
        .await
        .with_context(|| format!("waiting for JetStream to accept the cancel on {subject}"))?;
    Ok(())
}

/// `aob run cancel`.
pub async fn cmd_cancel(
    ctx: &Ctx,
    id: &str,
    reason: Option<String>,
    compensate: bool,
) -> Result<ExitCode> {
    let client = ctx.connect().await?;
    let js = jetstream::new(client);
    let state = get_state(&js, &ctx.tenant, id)
        .await?
        .ok_or_else(|| not_found(id, &ctx.tenant))?;
    if state.status.is_terminal() {
        say!(
            "run {id} is already {}; nothing to cancel",
            word(&state.status)
        );
        return Ok(ExitCode::SUCCESS);
    }
    let by = crate::people::identity(ctx);
    cancel_run(&js, &ctx.tenant, id, reason, Some(by), compensate).await?;
    if compensate {
        say!("cancel requested for {id}; its completed steps will be compensated");
    } else {
        say!("cancel requested for {id}");
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use aob_model::state::{Phase, RunStatus};
    use aob_model::wire::StepError;
    use std::collections::BTreeMap;

    fn state() -> RunState {
        let mut steps = BTreeMap::new();
        steps.insert(
            "a".to_string(),
            StepState {
                phase: Phase::Done {
                    status: StepStatus::Completed,
                    attempts: 1,
                },
                output: Some(serde_json::json!({"n": 1})),
                started_ms: Some(1_000),
                finished_ms: Some(1_012),
                ..StepState::pending()
            },
        );
        steps.insert(
            "b".to_string(),
            StepState {
                phase: Phase::Done {
                    status: StepStatus::Failed,
                    attempts: 2,
                },
                error: Some(StepError::terminal("HTTP 404")),
                started_ms: Some(1_012),
                finished_ms: Some(1_100),
                ..StepState::pending()
            },
        );
        steps.insert(
            "c".to_string(),
            StepState {
                phase: Phase::Done {
                    status: StepStatus::Skipped,
                    attempts: 0,
                },
                reason: Some("needs `b`, which failed".into()),
                finished_ms: Some(1_100),
                ..StepState::pending()
            },
        );
        RunState {
            run_id: "r1".into(),
            tenant: "default".into(),
            workflow: "pair".into(),
            version: 2,
            status: RunStatus::Failed,
            input: serde_json::json!({}),
            created_ms: 1_000,
            updated_ms: 1_100,
            finished_ms: Some(1_100),
            error: Some("step `b` failed: HTTP 404".into()),
            steps,
            history_seq: 7,
            generation: 0,
            outbox: Vec::new(),
            outbox_cause: None,
            started_by: None,
            paused: false,
            rollbacks: 0,
            compensation: None,
            forked_from: None,
            parent: None,
            seen: Vec::new(),
            trace: None,
        }
    }

    #[test]
    fn run_get_text() {
        let text = describe(&state(), 2_000);
        assert!(text.contains("status    FAILED\n"), "{text}");
        assert!(text.contains("workflow  pair@2\n"), "{text}");
        assert!(text.contains("(took 100 ms)"), "{text}");
        let table: Vec<&str> = text
            .lines()
            .skip_while(|l| !l.starts_with("STEP"))
            .collect();
        assert_eq!(table[0], "STEP  STATUS     ATTEMPT  DURATION  ERROR/REASON");
        assert_eq!(table[1], "a     COMPLETED  1        12 ms");
        assert_eq!(table[2], "b     FAILED     2        88 ms     HTTP 404");
        assert_eq!(
            table[3],
            "c     SKIPPED                       needs `b`, which failed"
        );
    }

    #[tokio::test]
    async fn json_leaves_out_the_outbox() {
        let mut s = state();
        s.outbox.push(aob_model::state::Effect::Timer {
            timer: aob_model::wire::TimerKind::RunTimeout,
            due_ms: 5,
        });
        assert!(serde_json::to_value(&s).unwrap().get("outbox").is_some());
        let v = state_json(&s, || bail!("no store needed")).await.unwrap();
        assert!(v.get("outbox").is_none());
        assert_eq!(v["steps"]["a"]["output"]["n"], 1);
    }
}

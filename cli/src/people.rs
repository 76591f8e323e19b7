//! People in the loop from the command line: `aob approvals list`, `aob approve`,
//! `aob reject`, and `aob run pause|resume|rollback|fork|replay`.
//!
//! Decisions and run controls are signals to the engine, which decides whether they are
//! taken; the commands that need an answer wait for it in the run's history.

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use aob_model::state::{RunState, RunStatus, StepStatus};
use aob_model::wire::{ForkSpec, HistoryEvent, HistoryKind, Signal, Verdict};
use async_nats::HeaderMap;
use async_nats::jetstream;
use serde_json::{Map, Value};

use crate::cli::{ApproveArgs, ForkArgs, RejectArgs};
use crate::ctx::Ctx;
use crate::progress::Progress;
use crate::runs::{self, HistoryFeed, StartRequest, get_state, word};

/// Who is acting: `--as` / `AOB_USER`, else `$USER`, else `cli`.
pub fn identity(ctx: &Ctx) -> String {
    ctx.user
        .clone()
        .or_else(|| std::env::var("USER").ok().filter(|u| !u.trim().is_empty()))
        .unwrap_or_else(|| "cli".to_string())
}

/// Publishes a signal to a run and waits for JetStream to accept it.
pub async fn send_signal(
    js: &jetstream::Context,
    tenant: &str,
    run_id: &str,
    signal: &Signal,
    msg_id: &str,
) -> Result<()> {
    let subject = aob_streams::subjects::signal(tenant, run_id);
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Msg-Id", msg_id);
    js.publish_with_headers(subject.clone(), headers, serde_json::to_vec(signal)?.into())
        .await
        .with_context(|| format!("publishing to {subject}"))?
        .await
        .with_context(|| format!("waiting for JetStream to accept the signal on {subject}"))?;
    Ok(())
}

async fn existing(js: &jetstream::Context, ctx: &Ctx, id: &str) -> Result<RunState> {
    get_state(js, &ctx.tenant, id)
        .await?
        .ok_or_else(|| anyhow!("run `{id}` not found in tenant `{}`", ctx.tenant))
}

fn step_list(state: &RunState) -> String {
    state.steps.keys().cloned().collect::<Vec<_>>().join(", ")
}

/// `aob run pause` and `aob run resume`.
pub async fn cmd_pause(ctx: &Ctx, id: &str, pause: bool) -> Result<ExitCode> {
    let js = jetstream::new(ctx.connect().await?);
    let state = existing(&js, ctx, id).await?;
    if state.status.is_terminal() {
        bail!("run {id} has ended ({})", word(&state.status));
    }
    let by = Some(identity(ctx));
    let (signal, what) = if pause {
        (Signal::Pause { by }, "pause")
    } else {
        (Signal::Resume { by }, "resume")
    };
    if state.paused == pause {
        say!(
            "run {id} is already {}",
            if pause { "paused" } else { "not paused" }
        );
        return Ok(ExitCode::SUCCESS);
    }
    let msg_id = format!("{what}.{id}.{}", ulid::Ulid::new());
    send_signal(&js, &ctx.tenant, id, &signal, &msg_id).await?;
    if pause {
        say!("pause requested for {id}: no new step starts until `aob run resume {id}`");
    } else {
        say!("resume requested for {id}");
    }
    Ok(ExitCode::SUCCESS)
}

/// `aob run rollback`.
pub async fn cmd_rollback(
    ctx: &Ctx,
    id: &str,
    to: &str,
    reason: Option<String>,
    wait: bool,
) -> Result<ExitCode> {
    let js = jetstream::new(ctx.connect().await?);
    let state = existing(&js, ctx, id).await?;
    if matches!(state.status, RunStatus::Completed | RunStatus::Compensated) {
        bail!(
            "run {id} is {}: only a running, failed or cancelled run can be rolled back (fork it instead: `aob run fork {id} --from {to}`)",
            word(&state.status)
        );
    }
    if state.compensation.is_some() {
        bail!("run {id} is compensating its steps; it cannot be rolled back now");
    }
    let st = state.steps.get(to).ok_or_else(|| {
        anyhow!(
            "run {id} has no step `{to}` (its steps: {})",
            step_list(&state)
        )
    })?;
    if st.started_seq.is_none() && st.finished_seq.is_none() {
        bail!("step `{to}` of run {id} has not run yet: there is no checkpoint before it");
    }
    let mut feed = if wait {
        Some(HistoryFeed::open(&js, &ctx.tenant, id).await?)
    } else {
        None
    };
    let sid = ulid::Ulid::new().to_string();
    let signal = Signal::Rollback {
        to: to.to_string(),
        by: Some(identity(ctx)),
        reason,
        id: Some(sid.clone()),
    };
    let msg_id = format!("rollback.{id}.{sid}");
    send_signal(&js, &ctx.tenant, id, &signal, &msg_id).await?;
    say!("rollback of {id} to `{to}` requested");
    let Some(feed) = feed.as_mut() else {
        return Ok(ExitCode::SUCCESS);
    };
    let end = follow_after(feed, state.history_seq, None).await?;
    Ok(runs::exit_code(&end))
}

/// Prints a run's events after position `after` until it ends; returns its terminal event.
async fn follow_after(
    feed: &mut HistoryFeed,
    after: u64,
    timeout: Option<Duration>,
) -> Result<HistoryEvent> {
    let begun = Instant::now();
    let mut progress = Progress::new();
    loop {
        let ev = match timeout {
            Some(t) => tokio::time::timeout(t.saturating_sub(begun.elapsed()), feed.next())
                .await
                .map_err(|_| {
                    anyhow!("gave up waiting after {}", humantime::format_duration(t))
                })??,
            None => feed.next().await?,
        };
        if ev.seq <= after {
            continue;
        }
        if let Some(line) = progress.line(&ev) {
            say!("{line}");
        }
        if ev.kind.is_terminal() {
            return Ok(ev);
        }
    }
}

/// Parses `steps.<id>.output=<JSON>`.
fn parse_output_set(s: &str) -> Result<(String, Value)> {
    let (path, value) = s
        .split_once('=')
        .ok_or_else(|| anyhow!("`--set {s}`: write steps.<id>.output=<JSON>"))?;
    let id = path
        .strip_prefix("steps.")
        .and_then(|r| r.strip_suffix(".output"))
        .filter(|id| !id.is_empty())
        .ok_or_else(|| anyhow!("`--set {s}`: the path must be steps.<id>.output"))?;
    let v = crate::input::parse_json(value, &format!("--set {path}"))?;
    Ok((id.to_string(), v))
}

/// `aob run fork`.
pub async fn cmd_fork(ctx: &Ctx, args: ForkArgs) -> Result<ExitCode> {
    let client = ctx.connect().await?;
    let js = jetstream::new(client);
    let source = existing(&js, ctx, &args.id).await?;
    if !source.steps.contains_key(&args.from) {
        bail!(
            "run {} has no step `{}` (its steps: {})",
            args.id,
            args.from,
            step_list(&source)
        );
    }
    let mut set = Map::new();
    for s in &args.set {
        let (id, v) = parse_output_set(s)?;
        set.insert(id, v);
    }
    // Checked here too, so a mistake is said at once rather than as a rejected start.
    aob_engine::machine::fork_seed(&source, &args.from, &set).map_err(|e| anyhow!(e))?;
    let input = match args.input.as_deref() {
        Some(i) => crate::input::parse_input(Some(i))?,
        None => Value::Null,
    };
    let payloads = ctx.payloads()?;
    let req = StartRequest {
        workflow: source.workflow.clone(),
        version: args.version.or(Some(source.version)),
        input,
        run_id: Some(args.run_id.unwrap_or_else(runs::new_run_id)),
        by: Some(identity(ctx)),
        fork: Some(ForkSpec {
            run: args.id.clone(),
            from: args.from.clone(),
            set,
        }),
    };
    if !args.wait {
        let started = runs::start_run(&js, &payloads, &ctx.tenant, req).await?;
        say!("{}", started.run_id);
        return Ok(ExitCode::SUCCESS);
    }
    let run_id = req.run_id.clone().unwrap_or_default();
    say!("run {run_id} (fork of {} from `{}`)", args.id, args.from);
    let (_, end) =
        runs::start_and_wait(&js, &payloads, &ctx.tenant, req, None, |l| say!("{l}")).await?;
    Ok(runs::exit_code(&end))
}

/// Reads a run's history up to its stored state's last event.
pub async fn read_history(
    js: &jetstream::Context,
    tenant: &str,
    state: &RunState,
) -> Result<Vec<HistoryEvent>> {
    let mut feed = HistoryFeed::open(js, tenant, &state.run_id).await?;
    let mut events: Vec<HistoryEvent> = Vec::new();
    while events.last().map_or(0, |e| e.seq) < state.history_seq {
        let ev = tokio::time::timeout(Duration::from_secs(10), feed.next())
            .await
            .map_err(|_| {
                anyhow!(
                    "the history of run {} ends at event {} of {}: it may have been trimmed by the stream's retention",
                    state.run_id,
                    events.last().map_or(0, |e| e.seq),
                    state.history_seq
                )
            })??;
        if ev.seq > events.last().map_or(0, |e| e.seq) {
            events.push(ev);
        }
    }
    Ok(events)
}

/// `aob run replay`.
pub async fn cmd_replay(
    ctx: &Ctx,
    id: &str,
    version: Option<u32>,
    file: Option<&Path>,
) -> Result<ExitCode> {
    let js = jetstream::new(ctx.connect().await?);
    let state = existing(&js, ctx, id).await?;
    let (wf, v, under) = match file {
        Some(f) => {
            let wf = aob_model::load_file(f).map_err(|e| anyhow!("{}: {e}", f.display()))?;
            let v = wf.version.unwrap_or(state.version);
            (wf, v, format!("{} (v{v} as written)", f.display()))
        }
        None => {
            let registry = aob_runtime::registry::Registry::open(&js).await?;
            let (wf, v) = registry
                .get(
                    &ctx.tenant,
                    &state.workflow,
                    version.or(Some(state.version)),
                )
                .await?;
            (wf, v, format!("{} v{v}", state.workflow))
        }
    };
    let def = aob_engine::machine::Compiled::new(wf, v).map_err(|e| anyhow!(e))?;
    let history = read_history(&js, &ctx.tenant, &state).await?;
    let report = aob_engine::machine::replay::replay(&def, &state, &history);
    say!(
        "replayed run {id} ({} v{}) under {under}: {} events",
        state.workflow,
        state.version,
        history.len()
    );
    match report.divergence {
        None => {
            say!(
                "same decisions: all {} recorded events reproduced ({} of them taken as inputs: results, decisions, signals, timers); no function, model or tool was called",
                report.matched,
                report.inputs
            );
            Ok(ExitCode::SUCCESS)
        }
        Some(d) => {
            say!("DIVERGES at event {}:", d.seq);
            say!("  recorded: {}", d.recorded);
            say!("  replayed: {}", d.replayed);
            say!(
                "({} recorded events were reproduced before it)",
                report.matched
            );
            Ok(ExitCode::from(1))
        }
    }
}

/// `aob approvals list`.
pub async fn cmd_approvals(ctx: &Ctx, mine: bool, roles: &[String]) -> Result<ExitCode> {
    let js = jetstream::new(ctx.connect().await?);
    let (states, _) = runs::list_states(&js, &ctx.tenant, usize::MAX).await?;
    let me = identity(ctx);
    let mut rows = Vec::new();
    for s in &states {
        if s.status.is_terminal() {
            continue;
        }
        for (step, st) in &s.steps {
            let Some(a) = st
                .approval
                .as_deref()
                .filter(|_| st.status() == StepStatus::Waiting)
            else {
                continue;
            };
            if mine {
                let may = a.users.contains(&me) || roles.iter().any(|r| a.roles.contains(r));
                let voted = a.votes.iter().any(|v| v.by == me);
                let own = !a.allow_self && s.started_by.as_deref() == Some(me.as_str());
                if !may || voted || own {
                    continue;
                }
            }
            let approvals = a
                .votes
                .iter()
                .filter(|v| v.decision == Verdict::Approve)
                .count();
            let who: Vec<String> = a
                .users
                .iter()
                .cloned()
                .chain(a.roles.iter().map(|r| format!("role:{r}")))
                .collect();
            rows.push(vec![
                s.run_id.clone(),
                s.workflow.clone(),
                step.clone(),
                format!("{approvals}/{}", a.required),
                who.join(","),
                a.deadline_ms
                    .map(runs::timestamp)
                    .unwrap_or_else(|| "-".into()),
                crate::progress::one_line(a.summary.as_deref().unwrap_or(""), 60),
            ]);
        }
    }
    if rows.is_empty() {
        say!(
            "no open approval requests{} in tenant `{}`",
            if mine { " for you" } else { "" },
            ctx.tenant
        );
        return Ok(ExitCode::SUCCESS);
    }
    crate::out::text(&crate::table::render(
        &[
            "RUN", "WORKFLOW", "STEP", "VOTES", "DECIDERS", "DEADLINE", "SUMMARY",
        ],
        &rows,
    ));
    Ok(ExitCode::SUCCESS)
}

/// Parses `field=value`: the value as JSON, else as text.
fn parse_field(s: &str) -> Result<(String, Value)> {
    let (k, v) = s
        .split_once('=')
        .filter(|(k, _)| !k.trim().is_empty())
        .ok_or_else(|| anyhow!("`--set {s}`: write field=value"))?;
    let value = serde_json::from_str(v).unwrap_or_else(|_| Value::String(v.to_string()));
    Ok((k.trim().to_string(), value))
}

/// `aob approve`.
pub async fn cmd_approve(ctx: &Ctx, args: ApproveArgs) -> Result<ExitCode> {
    let mut set = Map::new();
    for s in &args.set {
        let (k, v) = parse_field(s)?;
        set.insert(k, v);
    }
    decide(
        ctx,
        &args.run,
        &args.step,
        Verdict::Approve,
        args.comment,
        set,
        args.roles,
        args.timeout,
    )
    .await
}

/// `aob reject`.
pub async fn cmd_reject(ctx: &Ctx, args: RejectArgs) -> Result<ExitCode> {
    decide(
        ctx,
        &args.run,
        &args.step,
        Verdict::Reject,
        Some(args.reason),
        Map::new(),
        args.roles,
        args.timeout,
    )
    .await
}

/// Sends a decision and waits for the engine to record or refuse it.
#[allow(clippy::too_many_arguments)]
async fn decide(
    ctx: &Ctx,
    run: &str,
    step: &str,
    verdict: Verdict,
    comment: Option<String>,
    set: Map<String, Value>,
    roles: Vec<String>,
    timeout: Duration,
) -> Result<ExitCode> {
    let js = jetstream::new(ctx.connect().await?);
    let state = existing(&js, ctx, run).await?;
    if state.status.is_terminal() {
        bail!(
            "run {run} has ended ({}); its approval requests are closed",
            word(&state.status)
        );
    }
    let st = state.steps.get(step).ok_or_else(|| {
        anyhow!(
            "run {run} has no step `{step}` (its steps: {})",
            step_list(&state)
        )
    })?;
    if st.approval.is_none() {
        bail!(
            "step `{step}` of run {run} has no open approval request (it is {})",
            word(&st.status())
        );
    }
    let id = ulid::Ulid::new().to_string();
    // The request as seen now: if the run rolls back before the decision lands, the engine
    // refuses it rather than apply it to a new request.
    let request = aob_model::wire::StepRef {
        step: step.to_string(),
        item: None,
        iteration: st.iteration(),
        attempt: st.attempt(),
        generation: state.generation,
    }
    .token();
    let mut feed = HistoryFeed::open(&js, &ctx.tenant, run).await?;
    let signal = Signal::Decide {
        step: step.to_string(),
        by: identity(ctx),
        roles,
        decision: verdict,
        comment,
        set,
        id: Some(id.clone()),
        request: Some(request),
    };
    send_signal(
        &js,
        &ctx.tenant,
        run,
        &signal,
        &format!("decide.{run}.{id}"),
    )
    .await?;
    let begun = Instant::now();
    loop {
        let ev = tokio::time::timeout(timeout.saturating_sub(begun.elapsed()), feed.next())
            .await
            .map_err(|_| {
                anyhow!(
                    "the engine did not answer within {} (is it running?); the decision stays queued: `aob run watch {run}` shows when it is taken",
                    humantime::format_duration(timeout)
                )
            })??;
        let ours = ev
            .data
            .as_ref()
            .and_then(|d| d.get("id"))
            .and_then(Value::as_str)
            == Some(id.as_str());
        match ev.kind {
            HistoryKind::ApprovalDecided if ours => {
                say!(
                    "{}: {}",
                    run,
                    ev.message.as_deref().unwrap_or("decision recorded")
                );
                return Ok(ExitCode::SUCCESS);
            }
            HistoryKind::DecisionRefused if ours => {
                let why = ev
                    .data
                    .as_ref()
                    .and_then(|d| d.get("reason"))
                    .and_then(Value::as_str)
                    .unwrap_or("no reason given");
                eprintln!("refused: {why}");
                return Ok(ExitCode::from(1));
            }
            _ => {}
        }
    }
}

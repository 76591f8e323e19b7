//! The scheduling logic as a pure state machine: `(state, event, now) -> (state, effects)`.
//!
//! No I/O and no clock here: time comes in as `now`, offloaded values that conditions
//! read come in through `resolve`. The same event applied twice changes nothing the second
//! time (results for an attempt that is no longer running are stale), which is what makes
//! redelivery safe. A result for an attempt the state has not recorded as started yet is
//! *ahead* of it (the engine sends a task before its state write lands): the caller holds
//! it until the state catches up.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde_json::{Map, Value, json};

use aob_model::definition::{OnFailure, Step, Trigger, Workflow};
use aob_model::expr::Expr;
use aob_model::state::{
    Effect, Phase, RunState, RunStatus, Shape, ShapeState, Slot, StepState, StepStatus,
};
use aob_model::validate::{reads, topo_order};
use aob_model::wire::{
    ErrorClass, HistoryEvent, HistoryKind, Outcome, Signal, StartCommand, StepError, StepRef,
    StepResult, Task, TimerKind,
};

mod children;
mod people;
mod recovery;
pub mod replay;

pub use children::fork_seed;

/// Most elements one for_each step runs. Each costs about 150 bytes of run state while the
/// step runs (its slot, with its output by reference), so this keeps a run record far below
/// the KV value limit of 1 MiB.
pub const MAX_FOR_EACH_ITEMS: usize = 4096;

/// Largest for_each list kept in run state (serialized); a longer one is evaluated again
/// when an element is launched.
pub const ITEMS_INLINE_LIMIT: usize = 16 * 1024;

/// A workflow version ready to schedule: expressions compiled, graph indexed.
#[derive(Debug)]
pub struct Compiled {
    /// The definition.
    pub wf: Workflow,
    /// Its version.
    pub version: u32,
    whens: HashMap<String, Expr>,
    items: HashMap<String, Expr>,
    untils: HashMap<String, Expr>,
    reads: HashMap<String, BTreeSet<String>>,
    /// Position of each step in `wf.steps`.
    index: HashMap<String, usize>,
    /// Forward-path steps (compensation-only steps excluded), dependencies first, as
    /// positions in `wf.steps`.
    order: Vec<usize>,
    /// For each step of `wf.steps`, the positions of its `needs` (`None`: not a step).
    needs: Vec<Vec<Option<usize>>>,
    leaves: Vec<String>,
    /// Steps whose outputs some condition reads (the I/O wrapper resolves those if offloaded).
    pub condition_reads: BTreeSet<String>,
}

impl Compiled {
    /// Compiles a validated workflow.
    pub fn new(wf: Workflow, version: u32) -> Result<Self, String> {
        let mut whens = HashMap::new();
        let mut items = HashMap::new();
        let mut untils = HashMap::new();
        let mut reads_map = HashMap::new();
        let mut condition_reads = BTreeSet::new();
        for s in &wf.steps {
            let e = |src: &str, field: &str| {
                Expr::parse(src).map_err(|e| format!("step `{}` field `{field}`: {e}", s.id))
            };
            if let Some(w) = &s.when {
                whens.insert(s.id.clone(), e(w, "when")?);
                condition_reads.extend(aob_model::expr::referenced_steps(w));
            }
            if let Some(fe) = &s.for_each {
                items.insert(s.id.clone(), e(&fe.items, "for_each.items")?);
                condition_reads.extend(aob_model::expr::referenced_steps(&fe.items));
            }
            if let Some(l) = &s.loop_ {
                untils.insert(s.id.clone(), e(&l.until, "loop.until")?);
                condition_reads.extend(aob_model::expr::referenced_steps(&l.until));
            }
            // The engine renders a child run's input itself: it needs the values.
            if s.kind == "workflow" {
                condition_reads.extend(reads(s));
            }
            reads_map.insert(s.id.clone(), reads(s));
        }
        let ids: BTreeMap<&str, &Step> = wf.steps.iter().map(|s| (s.id.as_str(), s)).collect();
        let comp: BTreeSet<&str> = wf.compensation_steps().into_iter().collect();
        let order: Vec<String> = topo_order(&wf.steps, &ids)
            .into_iter()
            .filter(|s| !comp.contains(s.id.as_str()))
            .map(|s| s.id.clone())
            .collect();
        let needed: BTreeSet<&str> = wf
            .steps
            .iter()
            .flat_map(|s| s.needs.iter().map(String::as_str))
            .collect();
        let leaves = order
            .iter()
            .filter(|id| !needed.contains(id.as_str()))
            .cloned()
            .collect();
        let index: HashMap<String, usize> = wf
            .steps
            .iter()
            .enumerate()
            .map(|(i, s)| (s.id.clone(), i))
            .collect();
        let order = order
            .iter()
            .filter_map(|id| index.get(id).copied())
            .collect();
        let needs = wf
            .steps
            .iter()
            .map(|s| s.needs.iter().map(|n| index.get(n).copied()).collect())
            .collect();
        Ok(Compiled {
            index,
            wf,
            version,
            whens,
            items,
            untils,
            reads: reads_map,
            order,
            needs,
            leaves,
            condition_reads,
        })
    }

    fn step(&self, id: &str) -> Option<&Step> {
        self.index.get(id).and_then(|i| self.wf.steps.get(*i))
    }
}

/// What happened to a run.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A start command for a new run (already checked: workflow found, input valid).
    Start {
        /// Tenant.
        tenant: String,
        /// Run id.
        run_id: String,
        /// The command.
        cmd: StartCommand,
    },
    /// A function's result.
    Result(StepResult),
    /// A signal (cancel, timer).
    Signal(Signal),
}

impl Event {
    /// Names the event within its run, the same on every delivery: what a stored outbox
    /// records as its cause, so a redelivery of that very event can be recognised.
    pub fn id(&self) -> String {
        match self {
            Event::Start { .. } => "start".to_string(),
            Event::Result(r) => {
                let outcome = match r.outcome {
                    Outcome::Completed { .. } => "completed",
                    Outcome::Failed { .. } => "failed",
                    Outcome::Waiting { .. } => "waiting",
                };
                format!("result.{}.{outcome}", r.at.token())
            }
            Event::Signal(Signal::Cancel { .. }) => "cancel".to_string(),
            Event::Signal(Signal::Decide { step, by, id, .. }) => {
                format!("decide.{step}.{by}.{}", id.as_deref().unwrap_or(""))
            }
            Event::Signal(Signal::Pause { .. }) => "pause".to_string(),
            Event::Signal(Signal::Resume { .. }) => "resume".to_string(),
            Event::Signal(Signal::Rollback { to, id, .. }) => {
                format!("rollback.{to}.{}", id.as_deref().unwrap_or(""))
            }
            Event::Signal(Signal::Timer { timer }) => format!("timer.{}", timer_name(timer)),
            Event::Signal(Signal::Progress { at, seq, .. }) => {
                format!("progress.{}.{seq}", at.token())
            }
        }
    }
}

/// The name of a timer within its run: the last part of its `AOB_TIMERS` key and of its
/// message id. One name per attempt and kind, so setting, firing and cancelling agree.
pub fn timer_name(timer: &TimerKind) -> String {
    match timer {
        TimerKind::Retry { at } => format!("retry-{}", at.token()),
        TimerKind::StepTimeout { at } => format!("timeout-{}", at.token()),
        TimerKind::RunTimeout => "run-timeout".to_string(),
        TimerKind::Approval { at, round } => format!("approval-{}-r{round}", at.token()),
    }
}

/// Why `value` does not match `schema`, one line per problem (`/path: message`); `what`
/// names the schema if it is itself invalid.
pub fn schema_problems(schema: &Value, value: &Value, what: &str) -> Vec<String> {
    match jsonschema::validator_for(schema) {
        Ok(v) => v
            .iter_errors(value)
            .map(|e| {
                let path = e.instance_path().to_string();
                if path.is_empty() {
                    e.to_string()
                } else {
                    format!("{path}: {e}")
                }
            })
            .collect(),
        Err(e) => vec![format!("{what} is not valid: {e}")],
    }
}

/// Looks up an offloaded value by its reference path (`None` when not loaded).
pub type Resolve<'a> = &'a dyn Fn(&str) -> Option<Value>;

/// Applies one event. `None` means nothing changed (unknown run, stale or duplicate event).
pub fn apply(
    def: &Compiled,
    state: Option<RunState>,
    event: Event,
    now: u64,
    resolve: Resolve<'_>,
) -> Option<(RunState, Vec<Effect>)> {
    match transition(def, state, event, now, resolve) {
        Transition::Changed(state, effects) => Some((state, effects)),
        Transition::Unchanged(_) | Transition::Ahead(_) | Transition::Unresolved(_) => None,
    }
}

/// What [`transition`] did.
#[derive(Debug)]
pub enum Transition {
    /// The next state and the effects to publish.
    Changed(RunState, Vec<Effect>),
    /// Nothing changed; the state given, untouched.
    Unchanged(Option<RunState>),
    /// A result for an attempt this state has not started yet (or for a run it does not
    /// hold yet): nothing changed, and the result must be applied again later, to a newer
    /// state. The state given comes back untouched.
    Ahead(Option<RunState>),
    /// A condition needed an offloaded value that `resolve` did not have (its load
    /// failed): nothing may be decided without it, so nothing changed, and the event must
    /// be applied again once the values can be loaded. Names the missing references.
    Unresolved(Vec<String>),
}

/// Like [`apply`], but when nothing changed the state comes back, so a caller that owns
/// it need not clone it first.
pub fn transition(
    def: &Compiled,
    state: Option<RunState>,
    event: Event,
    now: u64,
    resolve: Resolve<'_>,
) -> Transition {
    use Transition::Unchanged;
    match (state, event) {
        (
            None,
            Event::Start {
                tenant,
                run_id,
                cmd,
            },
        ) => {
            let state = RunState {
                run_id,
                tenant,
                started_by: cmd.by.clone(),
                seen: Vec::new(),
                trace: None,
                paused: false,
                rollbacks: 0,
                compensation: None,
                forked_from: cmd.fork.as_ref().map(|f| f.run.clone()),
                parent: cmd.parent.clone(),
                workflow: def.wf.name.clone(),
                version: def.version,
                status: RunStatus::Running,
                input: cmd.input,
                created_ms: now,
                updated_ms: now,
                finished_ms: None,
                error: None,
                steps: def
                    .order
                    .iter()
                    .filter_map(|&i| def.wf.steps.get(i))
                    .map(|st| (st.id.clone(), StepState::pending()))
                    .collect(),
                history_seq: 0,
                generation: 0,
                outbox: Vec::new(),
                outbox_cause: None,
            };
            let mut m = Machine::new(def, state, now, resolve);
            let mut data = json!({"workflow": def.wf.name, "version": def.version});
            let mut message = None;
            if let Some(by) = &cmd.by {
                data["by"] = json!(by);
            }
            if let Some(p) = &cmd.parent {
                data["parent"] = json!({"run": p.run, "step": p.at.step});
                message = Some(format!("child of run {} (step `{}`)", p.run, p.at.step));
            }
            if let Some(f) = &cmd.fork {
                data["forked_from"] = json!({"run": f.run, "from": f.from});
                message = Some(format!("fork of run {} from step `{}`", f.run, f.from));
            }
            m.history(HistoryKind::Started, None, message, Some(data));
            if let Some(f) = &cmd.fork {
                m.seed(f);
            }
            if let Some(t) = &def.wf.timeout {
                m.effects.push(Effect::Timer {
                    timer: TimerKind::RunTimeout,
                    due_ms: now + t.as_millis(),
                });
            }
            m.advance();
            m.finish()
        }
        (None, Event::Result(_)) => Transition::Ahead(None),
        (state @ Some(_), Event::Start { .. }) | (state @ None, _) => Unchanged(state),
        // A person may roll a failed or cancelled run back: it runs again.
        (Some(state), Event::Signal(Signal::Rollback { to, by, reason, id }))
            if matches!(state.status, RunStatus::Failed | RunStatus::Cancelled)
                || !state.status.is_terminal() =>
        {
            if id.as_ref().is_some_and(|i| state.seen.contains(i)) {
                return Unchanged(Some(state));
            }
            let mut m = Machine::new(def, state, now, resolve);
            m.remember(id);
            let why = reason.unwrap_or_else(|| format!("rolled back to `{to}` by hand"));
            match m.rollback(&to, by, why) {
                Ok(()) => {
                    m.advance();
                    m.finish()
                }
                Err(e) => {
                    tracing::info!(run = %m.s.run_id, "rollback refused: {e}");
                    Unchanged(Some(m.s))
                }
            }
        }
        (Some(state), _) if state.status.is_terminal() => Unchanged(Some(state)),
        (Some(state), Event::Result(r)) if recovery::is_compensation(&state, &r.at) => {
            match recovery::standing(&state, &r.at) {
                Standing::Ahead => Transition::Ahead(Some(state)),
                Standing::Stale => Unchanged(Some(state)),
                Standing::Current => {
                    let mut m = Machine::new(def, state, now, resolve);
                    m.on_compensation_result(r);
                    m.finish()
                }
            }
        }
        (Some(state), Event::Result(r)) => match classify(&state, &r.at) {
            Standing::Ahead => Transition::Ahead(Some(state)),
            Standing::Stale => Unchanged(Some(state)),
            Standing::Current => {
                let mut m = Machine::new(def, state, now, resolve);
                if m.on_result(r) {
                    m.finish()
                } else {
                    Unchanged(Some(m.s))
                }
            }
        },
        (
            Some(state),
            Event::Signal(Signal::Cancel {
                reason,
                by,
                compensate,
            }),
        ) => {
            let mut m = Machine::new(def, state, now, resolve);
            let why = match (reason, by) {
                (Some(r), Some(b)) => format!("cancelled by {b}: {r}"),
                (Some(r), None) => format!("cancelled: {r}"),
                (None, Some(b)) => format!("cancelled by {b}"),
                (None, None) => "cancelled".to_string(),
            };
            if compensate {
                if m.s.compensation.is_some() {
                    return Unchanged(Some(m.s));
                }
                m.start_compensation(why, RunStatus::Cancelled, true);
                m.advance();
            } else {
                m.end_early(RunStatus::Cancelled, why);
            }
            m.finish()
        }
        (
            Some(state),
            Event::Signal(Signal::Decide {
                step,
                by,
                roles,
                decision,
                comment,
                set,
                id,
                request,
            }),
        ) => {
            if id.as_ref().is_some_and(|i| state.seen.contains(i)) {
                return Unchanged(Some(state));
            }
            let mut m = Machine::new(def, state, now, resolve);
            m.remember(id.clone());
            m.on_decide(people::Decision {
                step,
                by,
                roles,
                verdict: decision,
                comment,
                set,
                id,
                request,
            });
            m.advance();
            m.finish()
        }
        (Some(state), Event::Signal(Signal::Pause { by })) => {
            if state.paused {
                return Unchanged(Some(state));
            }
            let mut m = Machine::new(def, state, now, resolve);
            m.s.paused = true;
            m.history(
                HistoryKind::Paused,
                None,
                Some(match &by {
                    Some(b) => format!("paused by {b}"),
                    None => "paused".to_string(),
                }),
                Some(json!({"by": by})),
            );
            m.finish()
        }
        (Some(state), Event::Signal(Signal::Resume { by })) => {
            if !state.paused {
                return Unchanged(Some(state));
            }
            let mut m = Machine::new(def, state, now, resolve);
            m.s.paused = false;
            m.history(
                HistoryKind::Resumed,
                None,
                Some(match &by {
                    Some(b) => format!("resumed by {b}"),
                    None => "resumed".to_string(),
                }),
                Some(json!({"by": by})),
            );
            m.advance();
            m.finish()
        }
        (Some(state), Event::Signal(Signal::Rollback { .. })) => Unchanged(Some(state)),
        (Some(state), Event::Signal(Signal::Timer { timer })) => {
            let mut m = Machine::new(def, state, now, resolve);
            if m.on_timer(timer) {
                m.finish()
            } else {
                Unchanged(Some(m.s))
            }
        }
        // A report of an attempt the run is past (or not yet at) changes nothing.
        (
            Some(state),
            Event::Signal(Signal::Progress {
                at, message, data, ..
            }),
        ) => {
            match classify(&state, &at) {
                Standing::Current => {}
                // Its task went out before the state that started it was written: held.
                Standing::Ahead => return Transition::Ahead(Some(state)),
                Standing::Stale => return Unchanged(Some(state)),
            }
            let mut m = Machine::new(def, state, now, resolve);
            m.history(
                HistoryKind::StepProgress,
                Some(&at),
                Some(message),
                Some(data),
            );
            m.finish()
        }
    }
}

/// Where a result's attempt stands against a run's state: the one place that decides
/// whether a result is applied, held or dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// The attempt the run has out now: its result is applied.
    Current,
    /// An attempt the run is past (an earlier attempt, iteration or generation, a step
    /// already done, a run that ended): its result changes nothing.
    Stale,
    /// An attempt the state has not started yet (its task went out before the state that
    /// started it was written, or it is of a newer generation): held until it catches up.
    Ahead,
}

/// Classifies the attempt `at` against `state` (see [`Standing`]).
pub fn classify(state: &RunState, at: &StepRef) -> Standing {
    if state.status.is_terminal() || at.generation < state.generation {
        return Standing::Stale;
    }
    if at.generation > state.generation || is_ahead(state, at) {
        return Standing::Ahead;
    }
    if is_current(state, at) {
        Standing::Current
    } else {
        Standing::Stale
    }
}

/// Whether `at` is an attempt the state has not recorded as started: its step (or
/// for_each slot) is pending or out with an earlier attempt or loop iteration.
fn is_ahead(state: &RunState, at: &StepRef) -> bool {
    let Some(st) = state.steps.get(&at.step) else {
        return false;
    };
    match (at.item, st.phase()) {
        // A for_each step that has not begun has started none of its items.
        (Some(_), Phase::NotStarted) => true,
        (Some(i), Phase::Out { .. }) => st.slots().get(i as usize).is_some_and(|s| {
            (s.phase() == Phase::NotStarted || s.phase().is_active()) && s.attempt() < at.attempt
        }),
        (None, p) if p == Phase::NotStarted || p.is_active() => {
            (at.iteration, at.attempt) > (st.iteration(), st.attempt())
        }
        _ => false,
    }
}

/// The task of attempt `at` rebuilt from the state that launched it, as a stored outbox
/// keeps only [`Effect::Launched`]. Its context reads only completed outputs and the input,
/// which do not change, so it is the task that was sent. `None` if the step is gone from
/// the definition or a value could not be resolved.
pub fn task_of(
    def: &Compiled,
    state: &RunState,
    at: &StepRef,
    deadline_ms: Option<u64>,
    resolve: Resolve<'_>,
) -> Option<Task> {
    let m = Machine::new(def, state.clone(), state.updated_ms, resolve);
    if recovery::is_compensation(state, at) {
        let task = m.compensation_task(at, deadline_ms)?;
        return m.missing.borrow().is_empty().then_some(task);
    }
    let step = def.step(&at.step)?;
    let task = m.task(step, at, deadline_ms);
    m.missing.borrow().is_empty().then_some(task)
}

/// The form a stored outbox keeps of effects: tasks as [`Effect::Launched`].
pub fn stored_outbox(effects: &[Effect]) -> Vec<Effect> {
    effects
        .iter()
        .map(|e| match e {
            Effect::Task { task } => Effect::Launched {
                at: task.at.clone(),
                deadline_ms: task.deadline_ms,
            },
            other => other.clone(),
        })
        .collect()
}

/// Ends a run as FAILED with `why`, whatever it was doing: running steps are told to stop
/// (the `abort` event), pending ones skipped, timers cancelled. For what the engine cannot
/// go on with, such as a run whose state would grow past what the store keeps.
pub fn fail_run(def: &Compiled, state: RunState, why: String, now: u64) -> Transition {
    if state.status.is_terminal() {
        return Transition::Unchanged(Some(state));
    }
    let mut m = Machine::new(def, state, now, &|_| None);
    m.end_early(RunStatus::Failed, why);
    m.finish()
}

/// Whether `at` is the attempt the run has out now (running or waiting): a result for it
/// would be applied. A result for any other attempt is stale or ahead.
pub fn is_current(state: &RunState, at: &StepRef) -> bool {
    if state.status.is_terminal() || at.generation != state.generation {
        return false;
    }
    let Some(st) = state.steps.get(&at.step) else {
        return false;
    };
    match at.item {
        Some(i) => {
            matches!(st.phase(), Phase::Out { .. })
                && st
                    .slots()
                    .get(i as usize)
                    .is_some_and(|s| s.phase().attempt_out() == Some(at.attempt))
        }
        None => st.phase().attempt_out() == Some(at.attempt) && st.iteration() == at.iteration,
    }
}

/// The rejection event for a start that cannot become a run.
pub fn rejection(
    tenant: &str,
    run_id: &str,
    reason: &str,
    details: Option<Value>,
    now: u64,
) -> HistoryEvent {
    HistoryEvent {
        run_id: run_id.to_string(),
        tenant: tenant.to_string(),
        seq: 1,
        ts_ms: now,
        kind: HistoryKind::Rejected,
        step: None,
        item: None,
        iteration: None,
        attempt: None,
        message: Some(reason.to_string()),
        data: details,
    }
}

struct Machine<'a> {
    def: &'a Compiled,
    s: RunState,
    now: u64,
    resolve: Resolve<'a>,
    effects: Vec<Effect>,
    /// Steps that failed for good in this transition and whose `on_failure` is not `fail`:
    /// their rollback or compensation is taken by [`Machine::advance`], between passes.
    failures: Vec<String>,
    /// Whether the run had ended before this transition (a child tells its parent once).
    was_terminal: bool,
    /// References conditions needed that `resolve` did not have.
    missing: std::cell::RefCell<Vec<String>>,
    /// for_each lists not kept in state, evaluated at most once per transition.
    items: std::cell::RefCell<HashMap<String, Vec<Value>>>,
}

impl<'a> Machine<'a> {
    fn new(def: &'a Compiled, mut s: RunState, now: u64, resolve: Resolve<'a>) -> Self {
        s.outbox.clear();
        s.outbox_cause = None;
        Machine {
            def,
            failures: Vec::new(),
            was_terminal: s.status.is_terminal(),
            s,
            now,
            resolve,
            effects: Vec::new(),
            missing: std::cell::RefCell::default(),
            items: std::cell::RefCell::default(),
        }
    }

    fn finish(mut self) -> Transition {
        let missing = self.missing.take();
        if !missing.is_empty() {
            return Transition::Unresolved(missing);
        }
        if self.s.status.is_terminal() && !self.was_terminal {
            self.tell_parent();
        }
        self.s.updated_ms = self.now;
        Transition::Changed(self.s, self.effects)
    }

    fn history(
        &mut self,
        kind: HistoryKind,
        at: Option<&StepRef>,
        message: Option<String>,
        data: Option<Value>,
    ) {
        self.s.history_seq += 1;
        self.effects.push(Effect::History {
            event: Box::new(HistoryEvent {
                run_id: self.s.run_id.clone(),
                tenant: self.s.tenant.clone(),
                seq: self.s.history_seq,
                ts_ms: self.now,
                kind,
                step: at.map(|a| a.step.clone()),
                item: at.and_then(|a| a.item),
                iteration: at.and_then(|a| a.iteration),
                attempt: at.map(|a| a.attempt).filter(|a| *a > 0),
                message,
                data,
            }),
        });
    }

    fn step_event(
        &mut self,
        kind: HistoryKind,
        step: &str,
        message: Option<String>,
        data: Option<Value>,
    ) {
        let at = StepRef {
            step: step.to_string(),
            item: None,
            iteration: None,
            attempt: 0,
            generation: self.s.generation,
        };
        self.history(kind, Some(&at), message, data);
    }

    /// The context conditions and templates of `step` read.
    fn context(
        &self,
        step: &str,
        item: Option<&Value>,
        iteration: Option<u32>,
        for_condition: bool,
    ) -> Value {
        let mut steps = Map::new();
        let reads = self.def.reads.get(step);
        for id in reads.into_iter().flatten() {
            if let Some(st) = self.s.steps.get(id) {
                let mut output = st.output.clone().unwrap_or(Value::Null);
                // Only outputs some condition reads are loaded for conditions (the others
                // stay references, which templates resolve in the function).
                if for_condition && self.def.condition_reads.contains(id) {
                    output = self.resolved(output);
                }
                steps.insert(id.clone(), json!({"status": st.status(), "output": output}));
            }
        }
        let input = if for_condition {
            self.resolved(self.s.input.clone())
        } else {
            self.s.input.clone()
        };
        let mut ctx = Map::new();
        ctx.insert("input".into(), input);
        ctx.insert("steps".into(), Value::Object(steps));
        ctx.insert(
            "run".into(),
            json!({"id": self.s.run_id, "workflow": self.s.workflow, "version": self.s.version, "tenant": self.s.tenant}),
        );
        if let Some(i) = item {
            ctx.insert("item".into(), i.clone());
        }
        if let Some(n) = iteration {
            ctx.insert("iteration".into(), json!(n));
        }
        Value::Object(ctx)
    }

    /// The value behind a reference a condition reads. A reference that cannot be
    /// resolved is remembered, and the transition is given up as [`Transition::Unresolved`]:
    /// a condition must never see the reference in place of its value.
    fn resolved(&self, v: Value) -> Value {
        match aob_runtime::payload::reference(&v) {
            Some(path) => match (self.resolve)(&path) {
                Some(value) => value,
                None => {
                    self.missing.borrow_mut().push(path);
                    v
                }
            },
            None => v,
        }
    }

    /// Schedules whatever became ready, skips what cannot run, and ends the run when all
    /// steps are done. Repeats until nothing changes, since skips cascade.
    fn advance(&mut self) {
        if self.s.status.is_terminal() {
            return;
        }
        let def = self.def;
        loop {
            if !self.failures.is_empty() {
                let id = self.failures.remove(0);
                self.on_final_failure(&id);
                continue;
            }
            if self.s.compensation.is_some() {
                self.compensate_next();
                return;
            }
            // Status and attempt of every step by position, read once per pass (the run's
            // map is keyed by id; a pass looks at every pending step and its needs).
            let mut status: Vec<Option<(StepStatus, u32)>> = vec![None; def.wf.steps.len()];
            for (id, st) in &self.s.steps {
                if let Some(slot) = def.index.get(id).and_then(|&i| status.get_mut(i)) {
                    *slot = Some((st.status(), st.attempt()));
                }
            }
            // Another pass is needed only when a step reached a terminal status: a step
            // that merely started (RUNNING, WAITING) makes no other step ready or skipped.
            let mut changed = false;
            for &i in &def.order {
                let (Some(Some((StepStatus::Pending, 0))), Some(step), Some(needs)) =
                    (status.get(i), def.wf.steps.get(i), def.needs.get(i))
                else {
                    continue;
                };
                let of_needs = step.needs.iter().zip(needs).map(|(n, j)| {
                    let st = j.and_then(|j| status.get(j).copied().flatten());
                    (n.as_str(), st.map_or(StepStatus::Skipped, |(s, _)| s))
                });
                match readiness(step, of_needs) {
                    Ready::Wait => continue,
                    Ready::Skip(reason) => self.skip(&step.id, reason),
                    // Paused: nothing new starts (what runs finishes).
                    Ready::Go if self.s.paused => continue,
                    Ready::Go => self.begin(step),
                }
                if !self.failures.is_empty() {
                    // A rollback or compensation changes what the rest of this pass read.
                    changed = true;
                    break;
                }
                let now = self
                    .s
                    .steps
                    .get(&step.id)
                    .map(|st| (st.status(), st.attempt()));
                changed |= now.is_some_and(|(s, _)| s.is_terminal());
                status[i] = now;
            }
            if !changed {
                break;
            }
        }
        if self.s.steps.values().all(|s| s.status().is_terminal()) {
            let failed: Vec<(String, String)> = self
                .s
                .steps
                .iter()
                .filter(|(_, s)| s.status() == StepStatus::Failed)
                .map(|(id, s)| {
                    (
                        id.clone(),
                        s.error
                            .as_ref()
                            .map(|e| e.message.clone())
                            .unwrap_or_default(),
                    )
                })
                .collect();
            self.s.finished_ms = Some(self.now);
            let left = self.outstanding_timers();
            self.cancel_timers(left);
            if let Some((id, msg)) = failed.first() {
                self.s.status = RunStatus::Failed;
                let why = format!("step `{id}` failed: {msg}");
                self.s.error = Some(why.clone());
                self.history(
                    HistoryKind::Failed,
                    None,
                    Some(why),
                    Some(
                        json!({"failed_steps": failed.iter().map(|(i, _)| i).collect::<Vec<_>>()}),
                    ),
                );
            } else {
                self.s.status = RunStatus::Completed;
                let outputs = self.leaf_outputs();
                self.history(
                    HistoryKind::Completed,
                    None,
                    None,
                    Some(json!({"outputs": outputs})),
                );
            }
        }
    }

    /// Remembers a handled signal's id, so that its redelivery changes nothing.
    fn remember(&mut self, id: Option<String>) {
        if let Some(id) = id {
            self.s.seen.push(id);
            let over = self
                .s
                .seen
                .len()
                .saturating_sub(aob_model::state::SEEN_SIGNALS);
            self.s.seen.drain(..over);
        }
    }

    /// Outputs of the leaf steps that completed, by step id: the run's output.
    fn leaf_outputs(&self) -> Map<String, Value> {
        self.def
            .leaves
            .iter()
            .filter_map(|id| {
                self.s
                    .steps
                    .get(id)
                    .and_then(|s| s.output.clone())
                    .map(|o| (id.clone(), o))
            })
            .collect()
    }

    fn skip(&mut self, id: &str, reason: String) {
        if let Some(st) = self.s.steps.get_mut(id) {
            st.phase = st.phase.done(StepStatus::Skipped);
            st.reason = Some(reason.clone());
            st.finished_ms = Some(self.now);
        }
        self.step_event(HistoryKind::StepSkipped, id, Some(reason), None);
        self.mark_finished(id);
    }

    /// Records where in the history a step finished: checkpoints and compensations are
    /// ordered by it.
    fn mark_finished(&mut self, id: &str) {
        let seq = self.s.history_seq;
        if let Some(st) = self.s.steps.get_mut(id) {
            st.finished_seq = Some(seq);
            st.approval = None;
        }
    }

    fn fail_step(&mut self, id: &str, error: StepError, at: Option<&StepRef>) {
        if let Some(st) = self.s.steps.get_mut(id) {
            st.phase = st.phase.done(StepStatus::Failed);
            st.error = Some(error.clone());
            st.finished_ms = Some(self.now);
        }
        let data = serde_json::to_value(&error).ok();
        match at {
            Some(at) => self.history(
                HistoryKind::StepFailed,
                Some(at),
                Some(error.message.clone()),
                data,
            ),
            None => self.step_event(
                HistoryKind::StepFailed,
                id,
                Some(error.message.clone()),
                data,
            ),
        }
        self.mark_finished(id);
        if self.s.compensation.is_none() && self.failure_policy(id) != OnFailure::Fail {
            self.failures.push(id.to_string());
        }
    }

    fn complete_step(&mut self, id: &str, output: Value, at: Option<&StepRef>) {
        if let Some(st) = self.s.steps.get_mut(id) {
            st.phase = st.phase.done(StepStatus::Completed);
            st.output = Some(output.clone());
            st.error = None;
            st.finished_ms = Some(self.now);
        }
        let data = Some(json!({"output": output}));
        match at {
            Some(at) => self.history(HistoryKind::StepCompleted, Some(at), None, data),
            None => self.step_event(HistoryKind::StepCompleted, id, None, data),
        }
        self.mark_finished(id);
    }

    /// A step's needs are met: check `when`, then launch it (plain, for_each or loop).
    fn begin(&mut self, step: &Step) {
        let id = step.id.clone();
        let seq = self.s.history_seq;
        if let Some(st) = self.s.steps.get_mut(&id) {
            st.started_seq = Some(seq);
        }
        if let Some(w) = self.def.whens.get(&id) {
            let ctx = self.context(&id, None, None, true);
            match w.eval_bool(&ctx) {
                Ok(true) => {}
                Ok(false) => return self.skip(&id, format!("`when` is false: {}", w.source())),
                Err(e) => {
                    return self.fail_step(&id, StepError::terminal(format!("`when`: {e}")), None);
                }
            }
        }
        if let Some(expr) = self.def.items.get(&id) {
            let ctx = self.context(&id, None, None, true);
            let items = match expr.eval_list(&ctx) {
                Ok(items) => items,
                Err(e) => {
                    return self.fail_step(
                        &id,
                        StepError::terminal(format!("`for_each.items`: {e}")),
                        None,
                    );
                }
            };
            if items.is_empty() {
                return self.complete_step(&id, json!([]), None);
            }
            if items.len() > MAX_FOR_EACH_ITEMS {
                return self.fail_step(
                    &id,
                    StepError::terminal(format!(
                        "`for_each.items` has {} items; at most {MAX_FOR_EACH_ITEMS} are run by one step (split the list, or run a sub-workflow per batch)",
                        items.len()
                    )),
                    None,
                );
            }
            // A long list is not kept in the run's state: it is evaluated again, from the
            // same completed outputs and input, when an item is launched.
            let keep = serde_json::to_vec(&items).map_or(0, |b| b.len()) <= ITEMS_INLINE_LIMIT;
            if let Some(st) = self.s.steps.get_mut(&id) {
                st.phase = Phase::Out { attempt: 1 };
                st.started_ms = Some(self.now);
                st.shape = ShapeState::ForEach {
                    items: keep.then_some(items.clone()),
                    slots: vec![Slot::pending(); items.len()],
                };
            }
            if !keep {
                self.items.borrow_mut().insert(id.clone(), items);
            }
            self.fill_slots(step);
            return;
        }
        let iteration = step.loop_.as_ref().map(|_| 0);
        if let Some(st) = self.s.steps.get_mut(&id) {
            st.started_ms = Some(self.now);
            if let Some(n) = iteration {
                st.shape = ShapeState::Loop { iteration: n };
            }
        }
        self.launch(
            step,
            StepRef {
                step: id,
                item: None,
                iteration,
                attempt: 1,
                generation: self.s.generation,
            },
        );
    }

    /// Launches pending for_each slots up to the concurrency cap.
    fn fill_slots(&mut self, step: &Step) {
        let cap = step.for_each.as_ref().map_or(1, |f| f.concurrency.max(1)) as usize;
        loop {
            let Some(st) = self.s.steps.get(&step.id) else {
                return;
            };
            // A retrying item holds its place.
            let busy = st.slots().iter().filter(|s| s.phase().is_active()).count();
            if busy >= cap {
                return;
            }
            let Some(next) = st
                .slots()
                .iter()
                .position(|s| s.phase() == Phase::NotStarted)
            else {
                return;
            };
            self.launch(
                step,
                StepRef {
                    step: step.id.clone(),
                    item: Some(next as u32),
                    iteration: None,
                    attempt: 1,
                    generation: self.s.generation,
                },
            );
        }
    }

    /// Publishes the task of one attempt.
    fn launch(&mut self, step: &Step, at: StepRef) {
        if step.kind == "workflow" {
            return self.launch_child(step, at);
        }
        let deadline_ms = step.timeout.map(|t| self.now + t.as_millis());
        let task = self.task(step, &at, deadline_ms);
        let Some(st) = self.s.steps.get_mut(&step.id) else {
            return;
        };
        match at.item {
            Some(i) => {
                if let Some(slot) = st.slots_mut().get_mut(i as usize) {
                    slot.phase = Phase::Out {
                        attempt: at.attempt,
                    };
                }
            }
            None => {
                st.phase = Phase::Out {
                    attempt: at.attempt,
                };
            }
        }
        self.send(task);
        self.history(
            HistoryKind::StepScheduled,
            Some(&at),
            None,
            Some(json!({"type": step.kind})),
        );
    }

    /// Sends a task, with the timer of its deadline if it has one.
    fn send(&mut self, task: Task) {
        let timeout = task.deadline_ms.map(|due_ms| Effect::Timer {
            timer: TimerKind::StepTimeout {
                at: task.at.clone(),
            },
            due_ms,
        });
        self.effects.push(Effect::Task {
            task: Box::new(task),
        });
        self.effects.extend(timeout);
    }

    /// Timers of work under way in `steps` (timeouts, retries, approval deadlines): what a
    /// rollback or a compensation abandons.
    fn timers_of(&self, steps: &[String]) -> Vec<TimerKind> {
        self.outstanding_timers()
            .into_iter()
            .filter(|t| match t {
                TimerKind::StepTimeout { at }
                | TimerKind::Retry { at }
                | TimerKind::Approval { at, .. } => steps.contains(&at.step),
                TimerKind::RunTimeout => false,
            })
            .collect()
    }

    /// The task of attempt `at`: the step's raw config and the context it reads.
    fn task(&self, step: &Step, at: &StepRef, deadline_ms: Option<u64>) -> Task {
        let item = at.item.and_then(|i| self.item(&step.id, i as usize));
        let mut context = self.context(&step.id, item.as_ref(), at.iteration, false);
        if let Some(st) = self.s.steps.get(&step.id)
            && !st.grants.is_empty()
        {
            context["approved"] = json!(st.grants);
        }
        Task {
            tenant: self.s.tenant.clone(),
            run_id: self.s.run_id.clone(),
            workflow: self.s.workflow.clone(),
            version: self.s.version,
            node_type: step.kind.clone(),
            at: at.clone(),
            config: Value::Object(step.config.clone()),
            context,
            deadline_ms,
        }
    }

    /// Element `i` of a for_each step's list: kept in state when short, else evaluated
    /// again (once per transition) from the completed outputs and input it was made of.
    fn item(&self, step: &str, i: usize) -> Option<Value> {
        if let Some(items) = self.s.steps.get(step).and_then(|s| s.items()) {
            return items.get(i).cloned();
        }
        if let Some(items) = self.items.borrow().get(step) {
            return items.get(i).cloned();
        }
        let expr = self.def.items.get(step)?;
        let ctx = self.context(step, None, None, true);
        let items = match expr.eval_list(&ctx) {
            Ok(items) => items,
            Err(e) => {
                // It evaluated when the step began; only a value that could not be loaded
                // now (recorded as missing) can make it fail.
                tracing::debug!(%step, "for_each list not evaluated again: {e}");
                return None;
            }
        };
        let item = items.get(i).cloned();
        self.items.borrow_mut().insert(step.to_string(), items);
        item
    }

    /// The attempt `at` is the one currently out (running or waiting).
    fn is_current(&self, at: &StepRef) -> bool {
        is_current(&self.s, at)
    }

    fn on_result(&mut self, r: StepResult) -> bool {
        if !self.is_current(&r.at) {
            return false;
        }
        let Some(step) = self.def.step(&r.at.step) else {
            return false;
        };
        match r.outcome {
            Outcome::Waiting { until_ms, detail } => {
                let st = self.s.steps.get_mut(&r.at.step);
                match (st, r.at.item) {
                    (Some(st), Some(i)) => {
                        if let Some(slot) = st.slots_mut().get_mut(i as usize) {
                            if slot.status() == StepStatus::Waiting {
                                return false;
                            }
                            slot.phase = Phase::Waiting {
                                attempt: slot.attempt(),
                            };
                        }
                    }
                    (Some(st), None) => {
                        if st.status() == StepStatus::Waiting {
                            return false;
                        }
                        st.phase = Phase::Waiting {
                            attempt: st.attempt(),
                        };
                    }
                    (None, _) => return false,
                }
                self.history(
                    HistoryKind::StepWaiting,
                    Some(&r.at),
                    None,
                    until_ms.map(|u| json!({"until_ms": u})),
                );
                if step.kind == "human" && r.at.item.is_none() {
                    self.request_approval(step, &r.at, detail.unwrap_or(Value::Null));
                }
            }
            Outcome::Completed { output } => {
                self.cancel_step_timeout(step, &r.at);
                self.on_completed(step, &r.at, output)
            }
            Outcome::Failed { error } => {
                self.cancel_step_timeout(step, &r.at);
                let granted = |a: &String| {
                    self.s
                        .steps
                        .get(&step.id)
                        .is_some_and(|st| st.grants.contains(a))
                };
                match people::policy_hold(&error) {
                    Some(action) if r.at.item.is_none() && !granted(&action) => {
                        self.hold_for_approval(step, &r.at, action, error)
                    }
                    _ => self.on_failed(step, &r.at, error),
                }
            }
        }
        self.advance();
        true
    }

    /// Sets the timer of the attempt after `at`, which failed with `error`, due in `delay`
    /// ms, and records the retry.
    fn schedule_retry(&mut self, at: &StepRef, error: StepError, delay: u64) {
        self.effects.push(Effect::Timer {
            timer: TimerKind::Retry {
                at: StepRef {
                    attempt: at.attempt + 1,
                    ..at.clone()
                },
            },
            due_ms: self.now + delay,
        });
        self.history(
            HistoryKind::StepRetrying,
            Some(at),
            Some(error.message.clone()),
            Some(json!({"error": error, "next_attempt": at.attempt + 1, "delay_ms": delay})),
        );
    }

    /// The attempt `at` ended before its deadline: its timeout timer must not fire.
    fn cancel_step_timeout(&mut self, step: &Step, at: &StepRef) {
        if step.timeout.is_some() {
            self.effects.push(Effect::CancelTimer {
                timer: TimerKind::StepTimeout { at: at.clone() },
            });
        }
    }

    /// Timers that guard work still outstanding in the run: step timeouts of attempts out,
    /// retry backoffs, and the run's own timeout. Cancelled when the run ends.
    fn outstanding_timers(&self) -> Vec<TimerKind> {
        let mut out = Vec::new();
        for (id, st) in &self.s.steps {
            let Some(step) = self.def.step(id) else {
                continue;
            };
            let at = |item: Option<u32>, attempt: u32| StepRef {
                step: id.clone(),
                item,
                iteration: if item.is_some() { None } else { st.iteration() },
                attempt,
                generation: self.s.generation,
            };
            if let Some(a) = &st.approval
                && st.status() == StepStatus::Waiting
                && a.deadline_ms.is_some()
            {
                out.push(TimerKind::Approval {
                    at: at(None, st.attempt()),
                    round: a.round,
                });
            }
            let mut one = |item: Option<u32>, status: StepStatus, attempt: u32| match status {
                StepStatus::Running | StepStatus::Waiting if step.timeout.is_some() => {
                    out.push(TimerKind::StepTimeout {
                        at: at(item, attempt),
                    });
                }
                StepStatus::Pending if attempt > 0 => out.push(TimerKind::Retry {
                    at: at(item, attempt + 1),
                }),
                _ => {}
            };
            if st.slots().is_empty() {
                one(None, st.status(), st.attempt());
            } else if st.status() == StepStatus::Running {
                for (i, slot) in st.slots().iter().enumerate() {
                    one(Some(i as u32), slot.status(), slot.attempt());
                }
            }
        }
        out.extend(self.compensation_timers());
        if self.def.wf.timeout.is_some() {
            out.push(TimerKind::RunTimeout);
        }
        out
    }

    fn cancel_timers(&mut self, timers: Vec<TimerKind>) {
        self.effects.extend(
            timers
                .into_iter()
                .map(|timer| Effect::CancelTimer { timer }),
        );
    }

    fn on_completed(&mut self, step: &Step, at: &StepRef, output: Value) {
        let id = step.id.as_str();
        if let Some(i) = at.item {
            let all_done = {
                let Some(st) = self.s.steps.get_mut(id) else {
                    return;
                };
                if let Some(slot) = st.slots_mut().get_mut(i as usize) {
                    slot.phase = slot.phase.done(StepStatus::Completed);
                    slot.output = Some(output.clone());
                    slot.error = None;
                }
                st.slots()
                    .iter()
                    .all(|s| s.status() == StepStatus::Completed)
            };
            // Each item reports its completion (watchers show progress, the audit trail
            // has a record per item); the step's own `step_completed` follows the last.
            self.history(
                HistoryKind::StepCompleted,
                Some(at),
                None,
                Some(json!({"output": output})),
            );
            if all_done {
                let outputs: Vec<Value> = self
                    .s
                    .steps
                    .get_mut(id)
                    .map(|st| {
                        st.slots_mut()
                            .iter_mut()
                            .map(|s| s.output.take().unwrap_or(Value::Null))
                            .collect()
                    })
                    .unwrap_or_default();
                if let Some(st) = self.s.steps.get_mut(id) {
                    st.shape = ShapeState::Single;
                }
                self.complete_step(id, Value::Array(outputs), None);
            } else {
                self.fill_slots(step);
            }
            return;
        }
        if let (Some(l), Some(until)) = (&step.loop_, self.def.untils.get(id)) {
            let iteration = at.iteration.unwrap_or(0);
            if let Some(st) = self.s.steps.get_mut(id) {
                st.output = Some(output.clone());
            }
            let ctx = self.context(id, None, Some(iteration), true);
            match until.eval_bool(&ctx) {
                Ok(true) => self.complete_step(id, output, Some(at)),
                Ok(false) if iteration + 1 >= l.max_iterations => self.fail_step(
                    id,
                    StepError::terminal(format!(
                        "loop reached max_iterations ({}) without `until` becoming true: {}",
                        l.max_iterations,
                        until.source()
                    )),
                    Some(at),
                ),
                Ok(false) => {
                    let next = iteration + 1;
                    if let Some(st) = self.s.steps.get_mut(id) {
                        st.shape = ShapeState::Loop { iteration: next };
                    }
                    self.history(
                        HistoryKind::LoopIteration,
                        Some(at),
                        None,
                        Some(json!({"output": output, "next": next})),
                    );
                    self.launch(
                        step,
                        StepRef {
                            step: id.to_string(),
                            item: None,
                            iteration: Some(next),
                            attempt: 1,
                            generation: self.s.generation,
                        },
                    );
                }
                Err(e) => self.fail_step(
                    id,
                    StepError::terminal(format!("`loop.until`: {e}")),
                    Some(at),
                ),
            }
            return;
        }
        self.complete_step(id, output, Some(at));
    }

    fn on_failed(&mut self, step: &Step, at: &StepRef, error: StepError) {
        if step.kind == "workflow" {
            // A timed-out child is not waited for any more.
            self.cancel_child(at, &error.message);
        }
        let max = step.retry.as_ref().map_or(1, |r| r.max_attempts);
        if let Some(delay) = retry_delay(step.retry.as_ref(), at, &error) {
            if let Some(st) = self.s.steps.get_mut(&step.id) {
                match at.item {
                    Some(i) => {
                        if let Some(slot) = st.slots_mut().get_mut(i as usize) {
                            slot.phase = Phase::BackingOff {
                                next_attempt: slot.attempt() + 1,
                            };
                            slot.error = Some(error.clone());
                        }
                    }
                    None => {
                        st.phase = Phase::BackingOff {
                            next_attempt: st.attempt() + 1,
                        };
                        st.error = Some(error.clone());
                    }
                }
            }
            self.schedule_retry(at, error, delay);
            return;
        }
        let error = match (at.item, error.class) {
            (Some(i), _) => StepError {
                message: format!("item {i}: {}", error.message),
                ..error
            },
            (None, ErrorClass::Retryable) if max > 1 => StepError {
                message: format!("{} (gave up after {} attempts)", error.message, at.attempt),
                ..error
            },
            _ => error,
        };
        // The other items of a failed for_each are abandoned: their timers must not fire.
        let abandoned: Vec<TimerKind> = self
            .outstanding_timers()
            .into_iter()
            .filter(|t| match t {
                TimerKind::StepTimeout { at: o } | TimerKind::Retry { at: o } => {
                    o.step == step.id && o.item.is_some() && o.item != at.item
                }
                TimerKind::RunTimeout | TimerKind::Approval { .. } => false,
            })
            .collect();
        self.cancel_timers(abandoned);
        if let Some(st) = self.s.steps.get_mut(&step.id)
            && st.shape() == Shape::ForEach
        {
            st.shape = ShapeState::Single;
        }
        self.fail_step(&step.id, error, Some(at));
    }

    fn on_timer(&mut self, timer: TimerKind) -> bool {
        match timer {
            TimerKind::Retry { at } if recovery::is_compensation(&self.s, &at) => {
                self.compensation_retry_due(at)
            }
            TimerKind::Retry { at } => {
                let Some(st) = self.s.steps.get(&at.step) else {
                    return false;
                };
                let backing_off = Phase::BackingOff {
                    next_attempt: at.attempt,
                };
                let waiting = at.generation == self.s.generation
                    && match at.item {
                        Some(i) => {
                            matches!(st.phase(), Phase::Out { .. })
                                && st
                                    .slots()
                                    .get(i as usize)
                                    .is_some_and(|s| s.phase() == backing_off)
                        }
                        None => st.phase() == backing_off && st.iteration() == at.iteration,
                    };
                if !waiting {
                    return false;
                }
                let Some(step) = self.def.step(&at.step) else {
                    return false;
                };
                self.launch(step, at);
                true
            }
            TimerKind::StepTimeout { at } if recovery::is_compensation(&self.s, &at) => {
                if recovery::standing(&self.s, &at) != Standing::Current {
                    return false;
                }
                self.compensation_failed(&at, StepError::retryable("compensation timed out"));
                true
            }
            TimerKind::Approval { at, round } => {
                if !self.on_deadline(&at, round) {
                    return false;
                }
                self.advance();
                true
            }
            TimerKind::StepTimeout { at } => {
                if !self.is_current(&at) {
                    return false;
                }
                let Some(step) = self.def.step(&at.step) else {
                    return false;
                };
                let limit = step.timeout.map(|t| t.to_string()).unwrap_or_default();
                self.on_failed(
                    step,
                    &at,
                    StepError::retryable(format!("step timed out after {limit}")),
                );
                self.advance();
                true
            }
            TimerKind::RunTimeout => {
                let limit = self
                    .def
                    .wf
                    .timeout
                    .map(|t| t.to_string())
                    .unwrap_or_default();
                self.end_early(RunStatus::Failed, format!("run timed out after {limit}"));
                true
            }
        }
    }

    /// Cancel or run timeout: running steps are told to stop, nothing new is scheduled.
    fn end_early(&mut self, status: RunStatus, why: String) {
        let left = self.outstanding_timers();
        self.cancel_timers(left);
        self.cancel_children(None, &why);
        self.s.compensation = None;
        let mut running = false;
        for st in self.s.steps.values_mut() {
            match st.status() {
                StepStatus::Running | StepStatus::Waiting => {
                    running = true;
                    st.approval = None;
                    st.phase = st.phase.done(StepStatus::Failed);
                    st.error = Some(StepError::terminal(why.clone()));
                    st.finished_ms = Some(self.now);
                }
                StepStatus::Pending => {
                    st.phase = st.phase.done(StepStatus::Skipped);
                    st.reason = Some(why.clone());
                    st.finished_ms = Some(self.now);
                }
                _ => {}
            }
        }
        if running {
            self.history(HistoryKind::Abort, None, Some(why.clone()), None);
        }
        self.s.status = status;
        self.s.error = Some(why.clone());
        self.s.finished_ms = Some(self.now);
        let kind = if status == RunStatus::Cancelled {
            HistoryKind::Cancelled
        } else {
            HistoryKind::Failed
        };
        self.history(kind, None, Some(why), None);
    }
}

/// How long to wait before the attempt after `at`, which failed with `error`; `None` when
/// there is none (a terminal error, or the policy's attempts are used up). The longer of the
/// backoff and the error's `retry_after_ms`.
fn retry_delay(
    retry: Option<&aob_model::definition::RetryPolicy>,
    at: &StepRef,
    error: &StepError,
) -> Option<u64> {
    let max = retry.map_or(1, |r| r.max_attempts);
    (error.class == ErrorClass::Retryable && at.attempt < max).then(|| {
        retry
            .map_or(0, |r| r.backoff.delay(at.attempt).as_millis() as u64)
            .max(error.retry_after_ms.unwrap_or(0))
    })
}

/// Whether `step` can start, given the status of each of its needs (a need that is not a
/// step counts as SKIPPED).
fn readiness<'a>(step: &Step, needs: impl Iterator<Item = (&'a str, StepStatus)>) -> Ready {
    let statuses: Vec<(&str, StepStatus)> = needs.collect();
    let all_done = statuses.iter().all(|(_, s)| s.is_terminal());
    let any_ok = statuses.iter().any(|(_, s)| *s == StepStatus::Completed);
    let gate = match step.trigger {
        Trigger::AllSuccess => {
            if let Some((n, s)) = statuses
                .iter()
                .find(|(_, s)| matches!(s, StepStatus::Failed | StepStatus::Skipped))
            {
                let what = if *s == StepStatus::Failed {
                    "failed"
                } else {
                    "was skipped"
                };
                return Ready::Skip(format!("needs `{n}`, which {what}"));
            }
            all_done
        }
        Trigger::AllDone => all_done,
        Trigger::OneSuccess => {
            if !any_ok && all_done {
                return Ready::Skip("none of its needs completed".into());
            }
            any_ok
        }
    };
    if !gate {
        return Ready::Wait;
    }
    Ready::Go
}

enum Ready {
    Wait,
    Skip(String),
    Go,
}

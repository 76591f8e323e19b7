//! Canned event sequences through the pure machine, no server.

use serde_json::{Value, json};

use aob_model::state::{Effect, RunState, RunStatus, StepStatus};
use aob_model::wire::{
    HistoryKind, Outcome, Signal, StartCommand, StepError, StepRef, StepResult, Task, TimerKind,
};

use crate::machine::{Compiled, Event, Transition, transition};

mod people;

struct Sim {
    def: Compiled,
    state: Option<RunState>,
    now: u64,
    tasks: Vec<Task>,
    history: Vec<(HistoryKind, Option<String>, Option<u32>)>,
    /// The whole events, for replays.
    events: Vec<aob_model::wire::HistoryEvent>,
    timers: Vec<(TimerKind, u64)>,
    /// Timers cancelled.
    cancelled: Vec<TimerKind>,
    /// Messages published to the engine's inputs (child starts, signals, results).
    published: Vec<(String, Value)>,
    /// References a transition could not resolve.
    unresolved: Vec<String>,
    /// Results found ahead of the state (to be applied again later).
    held: usize,
}

fn no_resolve(_: &str) -> Option<Value> {
    None
}

impl Sim {
    fn new(yaml: &str) -> Sim {
        let wf = aob_model::load_str(yaml, "test.yaml").unwrap();
        Sim {
            def: Compiled::new(wf, 1).unwrap(),
            state: None,
            now: 1_000,
            tasks: Vec::new(),
            history: Vec::new(),
            events: Vec::new(),
            timers: Vec::new(),
            cancelled: Vec::new(),
            published: Vec::new(),
            unresolved: Vec::new(),
            held: 0,
        }
    }

    fn send(&mut self, ev: Event) -> bool {
        match transition(&self.def, self.state.clone(), ev, self.now, &no_resolve) {
            Transition::Unchanged(back) => {
                // A caller that gave up its only copy gets it back as it was.
                assert_eq!(
                    back, self.state,
                    "an unchanged run must come back untouched"
                );
                false
            }
            Transition::Unresolved(paths) => {
                self.unresolved.extend(paths);
                false
            }
            Transition::Ahead(back) => {
                assert_eq!(back, self.state, "a held result leaves the run untouched");
                self.held += 1;
                false
            }
            Transition::Changed(s, effects) => {
                for e in effects {
                    match e {
                        Effect::Task { task } => self.tasks.push(*task),
                        Effect::History { event } => {
                            self.history
                                .push((event.kind, event.step.clone(), event.item));
                            self.events.push(*event);
                        }
                        Effect::Timer { timer, due_ms } => self.timers.push((timer, due_ms)),
                        Effect::CancelTimer { timer } => self.cancelled.push(timer),
                        Effect::Launched { .. } => panic!("the machine emits whole tasks"),
                        Effect::Publish { subject, body, .. } => {
                            self.published.push((subject, body))
                        }
                    }
                }
                self.state = Some(s);
                true
            }
        }
    }

    fn start(&mut self, input: Value) {
        assert!(self.send(Event::Start {
            tenant: "t".into(),
            run_id: "r1".into(),
            cmd: StartCommand {
                workflow: "w".into(),
                version: None,
                input,
                run_id: None,
                by: None,
                fork: None,
                parent: None,
            },
        }));
    }

    /// Takes the tasks published so far.
    fn take(&mut self) -> Vec<Task> {
        std::mem::take(&mut self.tasks)
    }

    fn reply(&mut self, at: &StepRef, outcome: Outcome) -> bool {
        self.send(Event::Result(StepResult {
            tenant: "t".into(),
            run_id: "r1".into(),
            at: at.clone(),
            outcome,
            duration_ms: 1,
        }))
    }

    fn ok(&mut self, task: &Task, output: Value) -> bool {
        self.reply(&task.at, Outcome::Completed { output })
    }

    fn status(&self) -> RunStatus {
        self.state.as_ref().unwrap().status
    }

    fn step(&self, id: &str) -> StepStatus {
        self.state.as_ref().unwrap().steps[id].status()
    }

    fn count(&self, kind: HistoryKind) -> usize {
        self.history.iter().filter(|(k, _, _)| *k == kind).count()
    }
}

fn ids(tasks: &[Task]) -> Vec<&str> {
    tasks.iter().map(|t| t.at.step.as_str()).collect()
}

#[test]
fn sequential_chain_runs_in_order_and_passes_outputs() {
    let mut s = Sim::new(
        "name: w\nsteps:\n  - {id: a, type: transform, output: 1}\n  - {id: b, type: transform, needs: [a], output: '{{ steps.a.output }}'}\n  - {id: c, type: transform, needs: [b], output: 3}\n",
    );
    s.start(json!({}));
    let t = s.take();
    assert_eq!(ids(&t), ["a"]);
    assert!(s.ok(&t[0], json!(1)));
    let t = s.take();
    assert_eq!(ids(&t), ["b"]);
    // b's context carries a's output, and only what b reads.
    assert_eq!(t[0].context["steps"]["a"]["output"], json!(1));
    assert!(t[0].context["steps"].get("c").is_none());
    s.ok(&t[0], json!(2));
    let t = s.take();
    assert_eq!(ids(&t), ["c"]);
    s.ok(&t[0], json!(3));
    assert_eq!(s.status(), RunStatus::Completed);
    assert_eq!(s.count(HistoryKind::Completed), 1);
    // A duplicate result after the end changes nothing.
    assert!(!s.ok(&t[0], json!(3)));
}

#[test]
fn fan_out_join_and_branches() {
    let mut s = Sim::new(
        r#"name: w
steps:
  - {id: root, type: transform, output: {big: true}}
  - {id: left, type: transform, needs: [root], when: "steps.root.output.big", output: L}
  - {id: right, type: transform, needs: [root], when: "!steps.root.output.big", output: R}
  - {id: after_right, type: transform, needs: [right], output: x}
  - {id: join_all, type: transform, needs: [left, right], output: j}
  - {id: join_one, type: transform, needs: [left, right], trigger: one_success, output: o}
  - {id: cleanup, type: transform, needs: [left, right], trigger: all_done, output: c}
"#,
    );
    s.start(json!({}));
    let t = s.take();
    s.ok(&t[0], json!({"big": true}));
    let t = s.take();
    assert_eq!(ids(&t), ["left"]);
    assert_eq!(s.step("right"), StepStatus::Skipped);
    // Skips propagate through all_success, not through one_success or all_done.
    assert_eq!(s.step("after_right"), StepStatus::Skipped);
    assert_eq!(s.step("join_all"), StepStatus::Skipped);
    s.ok(&t[0], json!("L"));
    let mut t = s.take();
    t.sort_by(|a, b| a.at.step.cmp(&b.at.step));
    assert_eq!(ids(&t), ["cleanup", "join_one"]);
    for task in &t {
        s.ok(task, json!(null));
    }
    assert_eq!(s.status(), RunStatus::Completed);
}

#[test]
fn one_success_fires_once_when_both_parents_succeed() {
    let mut s = Sim::new(
        "name: w\nsteps:\n  - {id: a, type: transform, output: 1}\n  - {id: b, type: transform, output: 2}\n  - {id: j, type: transform, needs: [a, b], trigger: one_success, output: 3}\n",
    );
    s.start(json!({}));
    let t = s.take();
    assert_eq!(ids(&t), ["a", "b"]);
    s.ok(&t[0], json!(1));
    assert_eq!(ids(&s.take()), ["j"]);
    s.ok(&t[1], json!(2));
    assert!(s.take().is_empty(), "the join must not fire twice");
}

#[test]
fn for_each_respects_the_cap_and_keeps_order() {
    let mut s = Sim::new(
        "name: w\nsteps:\n  - {id: f, type: transform, for_each: {items: 'input.xs', concurrency: 2}, output: '{{ item }}'}\n",
    );
    s.start(json!({"xs": [10, 20, 30, 40, 50]}));
    let first = s.take();
    assert_eq!(first.len(), 2, "cap of 2");
    assert_eq!(first[0].context["item"], json!(10));
    // Finish the second before the first: order of outputs must still follow the items.
    s.ok(&first[1], json!("b"));
    let t = s.take();
    assert_eq!(t.len(), 1);
    assert_eq!(t[0].at.item, Some(2));
    s.ok(&first[0], json!("a"));
    let mut pending = vec![t[0].clone()];
    pending.extend(s.take());
    let mut outputs = vec!["c", "d", "e"].into_iter();
    while let Some(task) = pending.first().cloned() {
        pending.remove(0);
        s.ok(&task, json!(outputs.next().unwrap()));
        pending.extend(s.take());
    }
    assert_eq!(s.status(), RunStatus::Completed);
    let out = s.state.as_ref().unwrap().steps["f"].output.clone().unwrap();
    assert_eq!(out, json!(["a", "b", "c", "d", "e"]));
    // One `step_completed` per item, in the order they finished, then the step's own.
    let completed: Vec<Option<u32>> = s
        .history
        .iter()
        .filter(|(k, step, _)| *k == HistoryKind::StepCompleted && step.as_deref() == Some("f"))
        .map(|(_, _, item)| *item)
        .collect();
    assert_eq!(
        completed,
        [Some(1), Some(0), Some(2), Some(3), Some(4), None]
    );
}

#[test]
fn for_each_over_an_empty_list_completes_and_a_non_list_fails() {
    let mut s = Sim::new(
        "name: w\nsteps:\n  - {id: f, type: transform, for_each: {items: 'input.xs'}, output: 1}\n",
    );
    s.start(json!({"xs": []}));
    assert_eq!(s.status(), RunStatus::Completed);
    let mut s = Sim::new(
        "name: w\nsteps:\n  - {id: f, type: transform, for_each: {items: 'input.xs'}, output: 1}\n",
    );
    s.start(json!({"xs": 3}));
    assert_eq!(s.status(), RunStatus::Failed);
    assert!(
        s.state
            .as_ref()
            .unwrap()
            .error
            .as_ref()
            .unwrap()
            .contains("must give a list")
    );
}

#[test]
fn loop_runs_until_the_condition_holds_and_is_bounded() {
    let yaml = "name: w\nsteps:\n  - {id: l, type: transform, loop: {until: 'steps.l.output >= 3', max_iterations: 5}, output: '{{ iteration }}'}\n";
    let mut s = Sim::new(yaml);
    s.start(json!({}));
    for i in 0..4 {
        let t = s.take();
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].at.iteration, Some(i));
        assert_eq!(t[0].context["iteration"], json!(i));
        s.ok(&t[0], json!(i));
    }
    assert_eq!(s.status(), RunStatus::Completed);
    assert_eq!(s.count(HistoryKind::LoopIteration), 3);

    let mut s = Sim::new(
        "name: w\nsteps:\n  - {id: l, type: transform, loop: {until: 'false == true', max_iterations: 2}, output: 1}\n",
    );
    s.start(json!({}));
    for _ in 0..2 {
        let t = s.take();
        s.ok(&t[0], json!(1));
    }
    assert_eq!(s.status(), RunStatus::Failed);
    assert!(
        s.state
            .as_ref()
            .unwrap()
            .error
            .as_ref()
            .unwrap()
            .contains("max_iterations (2)")
    );
}

#[test]
fn retries_back_off_through_timers_then_give_up() {
    let mut s = Sim::new(
        "name: w\nsteps:\n  - {id: h, type: http, url: 'http://x', retry: {max_attempts: 3, backoff: {initial: 100ms, max: 150ms, multiplier: 2}}}\n",
    );
    s.start(json!({}));
    let t = s.take();
    assert!(s.reply(
        &t[0].at,
        Outcome::Failed {
            error: StepError::retryable("HTTP 503")
        }
    ));
    assert!(s.take().is_empty(), "no task before the backoff");
    let (timer, due) = s.timers.pop().unwrap();
    assert_eq!(due, s.now + 100);
    assert_eq!(s.step("h"), StepStatus::Pending);
    s.now += 100;
    assert!(s.send(Event::Signal(Signal::Timer {
        timer: timer.clone()
    })));
    // The same timer firing twice does nothing.
    assert!(!s.send(Event::Signal(Signal::Timer { timer })));
    let t = s.take();
    assert_eq!(t[0].at.attempt, 2);
    s.reply(
        &t[0].at,
        Outcome::Failed {
            error: StepError::retryable("HTTP 503"),
        },
    );
    let (timer, due) = s.timers.pop().unwrap();
    assert_eq!(due, s.now + 150, "capped at max");
    s.send(Event::Signal(Signal::Timer { timer }));
    let t = s.take();
    s.reply(
        &t[0].at,
        Outcome::Failed {
            error: StepError::retryable("HTTP 503"),
        },
    );
    assert_eq!(s.status(), RunStatus::Failed);
    assert_eq!(s.count(HistoryKind::StepRetrying), 2);
    assert!(
        s.state.as_ref().unwrap().steps["h"]
            .error
            .as_ref()
            .unwrap()
            .message
            .contains("gave up after 3 attempts")
    );
}

#[test]
fn terminal_errors_do_not_retry_and_skip_dependents() {
    let mut s = Sim::new(
        "name: w\nsteps:\n  - {id: h, type: http, url: 'http://x', retry: {max_attempts: 5}}\n  - {id: next, type: transform, needs: [h], output: 1}\n  - {id: always, type: transform, needs: [h], trigger: all_done, output: 1}\n",
    );
    s.start(json!({}));
    let t = s.take();
    s.reply(
        &t[0].at,
        Outcome::Failed {
            error: StepError::terminal("HTTP 404"),
        },
    );
    assert_eq!(s.step("h"), StepStatus::Failed);
    assert_eq!(s.step("next"), StepStatus::Skipped);
    let t = s.take();
    assert_eq!(ids(&t), ["always"]);
    s.ok(&t[0], json!(1));
    assert_eq!(s.status(), RunStatus::Failed);
}

#[test]
fn step_timeouts_fail_the_attempt_and_late_results_are_ignored() {
    let mut s = Sim::new(
        "name: w\nsteps:\n  - {id: h, type: http, url: 'http://x', timeout: 1s, retry: {max_attempts: 2, backoff: {initial: 10ms}}}\n",
    );
    s.start(json!({}));
    let t = s.take();
    assert_eq!(t[0].deadline_ms, Some(s.now + 1000));
    let (timer, _) = s
        .timers
        .iter()
        .find(|(k, _)| matches!(k, TimerKind::StepTimeout { .. }))
        .cloned()
        .unwrap();
    s.now += 1000;
    assert!(s.send(Event::Signal(Signal::Timer { timer })));
    assert_eq!(s.count(HistoryKind::StepRetrying), 1);
    // The first attempt's late answer is stale.
    assert!(!s.ok(&t[0], json!("late")));
}

#[test]
fn waiting_steps_resume_on_a_later_result() {
    let mut s = Sim::new("name: w\nsteps:\n  - {id: w, type: wait, duration: 1h}\n");
    s.start(json!({}));
    let t = s.take();
    assert!(s.reply(
        &t[0].at,
        Outcome::Waiting {
            until_ms: Some(9),
            detail: None
        }
    ));
    assert_eq!(s.step("w"), StepStatus::Waiting);
    assert!(
        !s.reply(
            &t[0].at,
            Outcome::Waiting {
                until_ms: Some(9),
                detail: None
            }
        ),
        "duplicate waiting is a no-op"
    );
    s.ok(&t[0], json!({"waited_ms": 1}));
    assert_eq!(s.status(), RunStatus::Completed);
}

#[test]
fn cancel_stops_scheduling_and_tells_running_steps() {
    let mut s = Sim::new(
        "name: w\nsteps:\n  - {id: a, type: transform, output: 1}\n  - {id: b, type: transform, needs: [a], output: 2}\n",
    );
    s.start(json!({}));
    let t = s.take();
    assert!(s.send(Event::Signal(Signal::Cancel {
        reason: Some("stop".into()),
        by: Some("ops".into()),
        compensate: false,
    })));
    assert_eq!(s.status(), RunStatus::Cancelled);
    assert_eq!(s.count(HistoryKind::Abort), 1);
    assert_eq!(s.step("b"), StepStatus::Skipped);
    assert!(!s.ok(&t[0], json!(1)), "results after cancel are ignored");
    assert!(s.take().is_empty());
}

#[test]
fn run_timeout_fails_the_run() {
    let mut s = Sim::new("name: w\ntimeout: 5s\nsteps:\n  - {id: a, type: wait, duration: 1h}\n");
    s.start(json!({}));
    let (timer, due) = s
        .timers
        .iter()
        .find(|(k, _)| *k == TimerKind::RunTimeout)
        .cloned()
        .unwrap();
    assert_eq!(due, s.now + 5000);
    s.send(Event::Signal(Signal::Timer { timer }));
    assert_eq!(s.status(), RunStatus::Failed);
    assert!(
        s.state
            .as_ref()
            .unwrap()
            .error
            .as_ref()
            .unwrap()
            .contains("timed out")
    );
}

#[test]
fn a_when_that_errors_fails_the_step_with_the_reason() {
    let mut s =
        Sim::new("name: w\nsteps:\n  - {id: a, type: transform, output: 1, when: 'input.flag'}\n");
    s.start(json!({"flag": "yes"}));
    assert_eq!(s.status(), RunStatus::Failed);
    assert!(
        s.state.as_ref().unwrap().steps["a"]
            .error
            .as_ref()
            .unwrap()
            .message
            .contains("must be true or false")
    );
}

#[test]
fn a_second_start_for_the_same_run_changes_nothing() {
    let mut s = Sim::new("name: w\nsteps:\n  - {id: a, type: transform, output: 1}\n");
    s.start(json!({}));
    let again = Event::Start {
        tenant: "t".into(),
        run_id: "r1".into(),
        cmd: StartCommand {
            workflow: "w".into(),
            version: None,
            input: json!({}),
            run_id: None,
            by: None,
            fork: None,
            parent: None,
        },
    };
    assert!(!s.send(again));
}

#[test]
fn history_sequence_has_no_gaps() {
    let mut s = Sim::new(
        "name: w\nsteps:\n  - {id: a, type: transform, output: 1}\n  - {id: b, type: transform, needs: [a], output: 1}\n",
    );
    s.start(json!({}));
    let t = s.take();
    s.ok(&t[0], json!(1));
    let t = s.take();
    s.ok(&t[0], json!(1));
    assert_eq!(
        s.state.as_ref().unwrap().history_seq as usize,
        s.history.len()
    );
}

/// A result sent ahead of its attempt (the engine sends tasks while their state is still
/// being written) is held, not dropped; an older attempt's result is still stale.
#[test]
fn results_ahead_of_the_state_are_held_and_stale_ones_dropped() {
    let at = |step: &str, item: Option<u32>, iteration: Option<u32>, attempt: u32| StepRef {
        step: step.into(),
        item,
        iteration,
        attempt,
        generation: 0,
    };
    let done = || Outcome::Completed { output: json!(1) };

    // A run not stored yet, and a step whose needs have not completed.
    let mut s = Sim::new(
        "name: w\nsteps:\n  - {id: a, type: transform, output: 1}\n  - {id: b, type: transform, needs: [a], output: 2}\n",
    );
    assert!(!s.reply(&at("b", None, None, 1), done()));
    assert_eq!(
        s.held, 1,
        "a result for a run that is not stored yet is held"
    );
    s.start(json!({}));
    assert!(!s.reply(&at("b", None, None, 1), done()));
    assert_eq!(s.held, 2, "b has not started");
    assert!(!s.reply(&at("nope", None, None, 1), done()));
    assert_eq!(s.held, 2, "an unknown step is stale, not held");
    let a = s.take();
    assert!(s.ok(&a[0], json!(1)));
    let b = s.take();
    assert!(s.ok(&b[0], json!(2)), "applied once the state started it");
    assert_eq!(s.status(), RunStatus::Completed);
    assert!(!s.reply(&at("b", None, None, 2), done()));
    assert_eq!(s.held, 2, "nothing is held for a finished run");

    // Retries: the next attempt is ahead while the backoff runs; the failed one is stale.
    let mut s = Sim::new(
        "name: w\nsteps:\n  - {id: h, type: http, url: 'http://x', retry: {max_attempts: 3}}\n",
    );
    s.start(json!({}));
    let t = s.take();
    let failed = Outcome::Failed {
        error: StepError::retryable("HTTP 503"),
    };
    assert!(s.reply(&t[0].at, failed.clone()));
    assert!(!s.reply(&at("h", None, None, 2), done()));
    assert_eq!(s.held, 1, "attempt 2 is not out yet");
    assert!(!s.reply(&t[0].at, failed));
    assert_eq!(s.held, 1, "attempt 1 is stale");

    // Loops: the next iteration is ahead of the current one.
    let mut s = Sim::new(
        "name: w\nsteps:\n  - {id: l, type: transform, loop: {until: 'steps.l.output >= 3', max_iterations: 5}, output: 1}\n",
    );
    s.start(json!({}));
    assert!(!s.reply(&at("l", None, Some(1), 1), done()));
    assert_eq!(s.held, 1, "iteration 1 while iteration 0 runs");
    assert!(s.reply(&at("l", None, Some(0), 1), done()));
    assert!(s.reply(&at("l", None, Some(1), 1), done()));

    // for_each: an item beyond the concurrency cap has not been launched.
    let mut s = Sim::new(
        "name: w\nsteps:\n  - {id: f, type: transform, for_each: {items: 'input.xs', concurrency: 1}, output: 1}\n",
    );
    s.start(json!({"xs": [1, 2]}));
    assert!(!s.reply(&at("f", Some(1), None, 1), done()));
    assert_eq!(s.held, 1, "item 1 waits for the cap");
    assert!(s.reply(&at("f", Some(0), None, 1), done()));
    assert!(s.reply(&at("f", Some(1), None, 1), done()));
    assert_eq!(s.status(), RunStatus::Completed);
    assert!(!s.reply(&at("f", Some(0), None, 1), done()));
    assert_eq!(s.held, 1);
}

#[test]
fn timers_are_cancelled_when_what_they_guard_ends() {
    // A step timeout goes when its attempt answers; the run timeout when the run ends.
    let mut s = Sim::new(
        "name: w\ntimeout: 11m\nsteps:\n  - {id: a, type: transform, output: 1, timeout: 1m}\n",
    );
    s.start(json!({}));
    let t = s.take();
    assert!(s.ok(&t[0], json!(1)));
    assert_eq!(s.status(), RunStatus::Completed);
    assert!(
        s.cancelled.contains(&TimerKind::StepTimeout {
            at: t[0].at.clone()
        }),
        "{:?}",
        s.cancelled
    );
    assert!(
        s.cancelled.contains(&TimerKind::RunTimeout),
        "{:?}",
        s.cancelled
    );
    // The run timeout, had it fired anyway, changes nothing.
    assert!(!s.send(Event::Signal(Signal::Timer {
        timer: TimerKind::RunTimeout
    })));
}

#[test]
fn cancel_during_backoff_cancels_the_retry_timer() {
    let mut s = Sim::new(
        "name: w\nsteps:\n  - {id: h, type: http, url: 'http://x', retry: {max_attempts: 3, backoff: {initial: 1m}}}\n",
    );
    s.start(json!({}));
    let t = s.take();
    s.reply(
        &t[0].at,
        Outcome::Failed {
            error: StepError::retryable("503"),
        },
    );
    let (retry, _) = s
        .timers
        .iter()
        .find(|(k, _)| matches!(k, TimerKind::Retry { .. }))
        .cloned()
        .unwrap();
    assert!(s.send(Event::Signal(Signal::Cancel {
        reason: None,
        by: None,
        compensate: false,
    })));
    assert!(s.cancelled.contains(&retry), "{:?}", s.cancelled);
    // A retry timer that fires anyway launches nothing.
    assert!(!s.send(Event::Signal(Signal::Timer { timer: retry })));
    assert!(s.take().is_empty());
}

#[test]
fn a_failed_for_each_cancels_the_timeouts_of_its_other_items() {
    let mut s = Sim::new(
        "name: w\nsteps:\n  - {id: f, type: http, url: 'http://x', timeout: 1m, for_each: {items: 'input.xs', concurrency: 3}}\n",
    );
    s.start(json!({"xs": [1, 2, 3]}));
    let t = s.take();
    assert_eq!(t.len(), 3);
    s.reply(
        &t[1].at,
        Outcome::Failed {
            error: StepError::terminal("bad"),
        },
    );
    assert_eq!(s.status(), RunStatus::Failed);
    for other in [&t[0], &t[2]] {
        assert!(
            s.cancelled.contains(&TimerKind::StepTimeout {
                at: other.at.clone()
            }),
            "{:?}",
            s.cancelled
        );
    }
}

#[test]
fn event_ids_tell_apart_what_a_redelivery_must_match() {
    let at = StepRef {
        step: "a".into(),
        item: Some(2),
        iteration: None,
        attempt: 1,
        generation: 0,
    };
    let result = |outcome| {
        Event::Result(StepResult {
            tenant: "t".into(),
            run_id: "r".into(),
            at: at.clone(),
            outcome,
            duration_ms: 0,
        })
        .id()
    };
    let done = result(Outcome::Completed { output: json!(1) });
    let waiting = result(Outcome::Waiting {
        until_ms: None,
        detail: None,
    });
    assert_ne!(done, waiting);
    assert_eq!(done, result(Outcome::Completed { output: json!(2) }));
    let timer = Event::Signal(Signal::Timer {
        timer: TimerKind::StepTimeout { at: at.clone() },
    })
    .id();
    assert_ne!(timer, done);
}

/// A condition reads an output kept by reference whose value could not be loaded: the
/// machine decides nothing (no skip, no wrong branch) and asks for the event again.
#[test]
fn a_condition_never_sees_a_reference_it_could_not_load() {
    let mut s = Sim::new(
        "name: w\nsteps:\n  - {id: a, type: transform, output: 1}\n  - {id: b, type: transform, needs: [a], when: 'steps.a.output.go', output: 2}\n",
    );
    s.start(json!({}));
    let t = s.take();
    let big = json!({"$aob_ref": "payloads/t/r1/a.state.0123.json", "size": 20000});
    assert!(!s.ok(&t[0], big.clone()), "decided without the value");
    assert_eq!(s.unresolved, ["payloads/t/r1/a.state.0123.json"]);
    assert_eq!(s.step("b"), StepStatus::Pending);
    assert_eq!(
        s.step("a"),
        StepStatus::Running,
        "the result is to be applied again"
    );
    // Once the value loads, the same result takes the right branch.
    let state = s.state.clone();
    let resolve = |p: &str| (p == "payloads/t/r1/a.state.0123.json").then(|| json!({"go": true}));
    let next = transition(
        &s.def,
        state,
        Event::Result(StepResult {
            tenant: "t".into(),
            run_id: "r1".into(),
            at: t[0].at.clone(),
            outcome: Outcome::Completed { output: big },
            duration_ms: 1,
        }),
        s.now,
        &resolve,
    );
    let Transition::Changed(state, effects) = next else {
        panic!("not applied: {next:?}")
    };
    assert_eq!(state.steps["b"].status(), StepStatus::Running);
    assert!(effects.iter().any(|e| matches!(e, Effect::Task { .. })));
}

/// The stored outbox keeps a task as its attempt and deadline; rebuilt from the state that
/// launched it, it is the task that was sent, for plain steps and for_each items alike.
#[test]
fn tasks_rebuilt_from_the_stored_outbox_are_the_tasks_sent() {
    let mut s = Sim::new(
        "name: w\nsteps:\n  - {id: a, type: transform, output: 1}\n  - {id: f, type: http, url: 'http://x/{{ item }}', timeout: 1m, needs: [a], for_each: {items: 'input.xs', concurrency: 2}}\n",
    );
    s.start(json!({"xs": ["p", "q", "r"]}));
    let a = s.take();
    let Transition::Changed(state, effects) = transition(
        &s.def,
        s.state.clone(),
        Event::Result(StepResult {
            tenant: "t".into(),
            run_id: "r1".into(),
            at: a[0].at.clone(),
            outcome: Outcome::Completed {
                output: json!({"big": "x".repeat(100)}),
            },
            duration_ms: 1,
        }),
        s.now,
        &no_resolve,
    ) else {
        panic!("not applied")
    };
    let sent: Vec<Task> = effects
        .iter()
        .filter_map(|e| match e {
            Effect::Task { task } => Some((**task).clone()),
            _ => None,
        })
        .collect();
    assert_eq!(sent.len(), 2);
    let stored = crate::machine::stored_outbox(&effects);
    let rebuilt: Vec<Task> = stored
        .iter()
        .filter_map(|e| match e {
            Effect::Launched { at, deadline_ms } => {
                crate::machine::task_of(&s.def, &state, at, *deadline_ms, &no_resolve)
            }
            Effect::Task { .. } => panic!("a whole task in the stored outbox"),
            _ => None,
        })
        .collect();
    assert_eq!(rebuilt, sent);
}

#[test]
fn engine_configuration_comes_from_the_environment_and_names_bad_values() {
    use crate::Config;
    let vars = |pairs: &'static [(&'static str, &'static str)]| {
        move |k: &str| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    };
    let c = Config::from_vars(vars(&[
        ("AOB_ENGINE_WORKERS", "8"),
        ("AOB_HOLD_LIMIT", "2h"),
    ]))
    .unwrap();
    assert_eq!(c.workers, 8);
    assert_eq!(c.hold_limit, std::time::Duration::from_secs(7200));
    assert_eq!(c.max_state_bytes, Config::default().max_state_bytes);
    let e = Config::from_vars(vars(&[("AOB_MAX_STATE_BYTES", "lots")])).unwrap_err();
    assert!(e.to_string().contains("AOB_MAX_STATE_BYTES=`lots`"), "{e}");
    assert!(Config::from_vars(vars(&[("AOB_HOLD_LIMIT", "soon")])).is_err());
}

/// A result of an older generation (from before a rollback) is stale even when its step
/// and attempt match the attempt out now; tokens of later generations differ.
#[test]
fn results_of_an_earlier_generation_are_stale() {
    let mut s = Sim::new("name: w\nsteps:\n  - {id: a, type: transform, output: 1}\n");
    s.start(json!({}));
    let t = s.take();
    assert_eq!(t[0].at.generation, 0);
    // The run moves to generation 1 (as a rollback will) with `a` out again.
    let mut state = s.state.clone().unwrap();
    state.generation = 1;
    s.state = Some(state.clone());
    assert_eq!(
        crate::machine::classify(&state, &t[0].at),
        crate::machine::Standing::Stale
    );
    assert!(
        !s.ok(&t[0], json!("late")),
        "an old generation's result was applied"
    );
    let now = StepRef {
        generation: 1,
        ..t[0].at.clone()
    };
    assert_ne!(now.token(), t[0].at.token());
    assert!(s.reply(&now, Outcome::Completed { output: json!(1) }));
    assert_eq!(s.status(), RunStatus::Completed);
}

/// A small deterministic generator (no dependency): the same seed, the same sequence.
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: usize) -> usize {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 33) as usize) % n.max(1)
    }
}

/// The outcome a simulated function gives a task: `flaky` fails its first attempt (its
/// items too), everything else echoes what it is.
fn outcome_of(task: &Task) -> Outcome {
    if task.at.step.starts_with("flaky") && task.at.attempt == 1 {
        return Outcome::Failed {
            error: StepError::retryable("try again"),
        };
    }
    Outcome::Completed {
        output: json!({"step": task.at.step, "item": task.context.get("item"), "attempt": task.at.attempt}),
    }
}

/// Runs a workflow to its end delivering results and retry timers in the order `rng`
/// picks, each possibly twice, and results ahead of the state again later; returns what
/// the run ended with.
fn run_shuffled(
    yaml: &str,
    rng: &mut Lcg,
) -> (RunStatus, Vec<(String, StepStatus, Option<Value>)>) {
    let mut s = Sim::new(yaml);
    s.start(json!({"xs": [1, 2, 3, 4]}));
    let mut pool: Vec<(Event, bool)> = Vec::new();
    let mut timers_seen = 0;
    for _ in 0..10_000 {
        for task in s.take() {
            let outcome = outcome_of(&task);
            pool.push((
                Event::Result(StepResult {
                    tenant: "t".into(),
                    run_id: "r1".into(),
                    at: task.at.clone(),
                    outcome,
                    duration_ms: 1,
                }),
                false,
            ));
        }
        for (timer, _) in s.timers[timers_seen..].iter().cloned() {
            if matches!(timer, TimerKind::Retry { .. }) {
                pool.push((Event::Signal(Signal::Timer { timer }), false));
            }
        }
        timers_seen = s.timers.len();
        if pool.is_empty() {
            break;
        }
        let i = rng.below(pool.len());
        let (event, duplicated) = pool.swap_remove(i);
        let held = s.held;
        s.send(event.clone());
        if s.held > held {
            // Ahead of the state: delivered again later.
            pool.push((event, duplicated));
        } else if !duplicated && rng.below(3) == 0 {
            pool.push((event, true));
        }
    }
    assert!(s.unresolved.is_empty());
    let state = s.state.clone().unwrap();
    let steps = state
        .steps
        .iter()
        .map(|(id, st)| (id.clone(), st.status(), st.output.clone()))
        .collect();
    (state.status, steps)
}

/// Permuting and duplicating deliveries gives the same final state: whatever order results
/// and retry timers arrive in, and however often, the run ends the same.
#[test]
fn delivery_order_and_duplicates_do_not_change_the_outcome() {
    let yaml = "name: w
steps:
  - {id: a, type: transform, output: 1}
  - {id: flaky, type: http, url: 'http://x', needs: [a], retry: {max_attempts: 3, backoff: {initial: 1s}}}
  - {id: b, type: transform, needs: [a], output: 2}
  - {id: fan, type: transform, needs: [a], for_each: {items: 'input.xs', concurrency: 2}, output: 3}
  - {id: flaky_items, type: http, url: 'http://x', needs: [b], for_each: {items: 'input.xs', concurrency: 3}, retry: {max_attempts: 2, backoff: {initial: 1s}}}
  - {id: join, type: transform, needs: [flaky, fan, flaky_items], output: 4}
  - {id: any, type: transform, needs: [flaky, b], trigger: one_success, output: 5}
";
    let reference = run_shuffled(yaml, &mut Lcg(1));
    assert_eq!(reference.0, RunStatus::Completed, "{reference:?}");
    for seed in 2..60 {
        let got = run_shuffled(yaml, &mut Lcg(seed));
        assert_eq!(got, reference, "seed {seed}");
    }
}

/// for_each items retry on their own, each with its own timer, and the step completes
/// with every item's output in order.
#[test]
fn for_each_items_retry_on_their_own() {
    let mut s = Sim::new(
        "name: w\nsteps:\n  - {id: f, type: http, url: 'http://x', for_each: {items: 'input.xs', concurrency: 3}, retry: {max_attempts: 2, backoff: {initial: 1s}}}\n",
    );
    s.start(json!({"xs": [1, 2, 3]}));
    let t = s.take();
    s.reply(
        &t[1].at,
        Outcome::Failed {
            error: StepError::retryable("503"),
        },
    );
    let retry = s
        .timers
        .iter()
        .find_map(|(k, _)| match k {
            TimerKind::Retry { at } => Some(at.clone()),
            _ => None,
        })
        .unwrap();
    assert_eq!((retry.item, retry.attempt), (Some(1), 2));
    s.ok(&t[0], json!("x0"));
    s.ok(&t[2], json!("x2"));
    assert_eq!(
        s.step("f"),
        StepStatus::Running,
        "waits for the retried item"
    );
    assert!(s.send(Event::Signal(Signal::Timer {
        timer: TimerKind::Retry { at: retry.clone() }
    })));
    let again = s.take();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].at, retry);
    s.ok(&again[0], json!("x1"));
    assert_eq!(s.status(), RunStatus::Completed);
    assert_eq!(
        s.state.as_ref().unwrap().steps["f"].output,
        Some(json!(["x0", "x1", "x2"]))
    );
}

/// An item's timeout fails that attempt (retryable) and retries the item alone.
#[test]
fn a_for_each_item_timeout_retries_that_item() {
    let mut s = Sim::new(
        "name: w\nsteps:\n  - {id: f, type: http, url: 'http://x', timeout: 1s, for_each: {items: 'input.xs', concurrency: 2}, retry: {max_attempts: 2, backoff: {initial: 10ms}}}\n",
    );
    s.start(json!({"xs": [1, 2]}));
    let t = s.take();
    let timeout = TimerKind::StepTimeout {
        at: t[0].at.clone(),
    };
    assert!(s.timers.iter().any(|(k, _)| *k == timeout));
    s.now += 1000;
    assert!(s.send(Event::Signal(Signal::Timer { timer: timeout })));
    assert_eq!(s.count(HistoryKind::StepRetrying), 1);
    // The timed-out attempt's late answer is stale; the other item is unaffected.
    assert!(!s.ok(&t[0], json!("late")));
    assert!(s.ok(&t[1], json!("ok")));
    assert_eq!(s.step("f"), StepStatus::Running);
}

/// A loop iteration that fails retries that iteration, and the loop goes on after.
#[test]
fn a_loop_iteration_retries_then_the_loop_goes_on() {
    let mut s = Sim::new(
        "name: w\nsteps:\n  - {id: l, type: http, url: 'http://x', loop: {until: 'steps.l.output.n >= 2', max_iterations: 5}, retry: {max_attempts: 2, backoff: {initial: 1s}}}\n",
    );
    s.start(json!({}));
    let first = s.take();
    assert_eq!(first[0].at.iteration, Some(0));
    s.reply(
        &first[0].at,
        Outcome::Failed {
            error: StepError::retryable("503"),
        },
    );
    let (retry, _) = s.timers.last().cloned().unwrap();
    assert!(s.send(Event::Signal(Signal::Timer { timer: retry })));
    let again = s.take();
    assert_eq!((again[0].at.iteration, again[0].at.attempt), (Some(0), 2));
    s.ok(&again[0], json!({"n": 1}));
    let next = s.take();
    assert_eq!((next[0].at.iteration, next[0].at.attempt), (Some(1), 1));
    s.ok(&next[0], json!({"n": 2}));
    assert_eq!(s.status(), RunStatus::Completed);
}

fn progress(at: &StepRef, seq: u64) -> Event {
    Event::Signal(Signal::Progress {
        at: at.clone(),
        seq,
        message: format!("turn {}", seq + 1),
        data: json!({"agent_turn": seq + 1}),
    })
}

#[test]
fn progress_of_the_current_attempt_is_history_and_of_any_other_changes_nothing() {
    let mut s = Sim::new(
        "name: w\nsteps:\n  - {id: a, type: transform, output: 1, retry: {max_attempts: 2, backoff: {initial: 10ms}}}\n",
    );
    s.start(json!({}));
    let t = s.take().remove(0);
    assert!(s.send(progress(&t.at, 0)), "the current attempt's report");
    assert_eq!(s.count(HistoryKind::StepProgress), 1);
    // A report of an attempt not started yet is held, not dropped.
    let mut later = t.at.clone();
    later.attempt = 2;
    assert!(!s.send(progress(&later, 0)));
    assert_eq!(s.held, 1);
    // After the step is done, a late report changes nothing.
    assert!(s.ok(&t, json!(1)));
    assert!(!s.send(progress(&t.at, 1)));
    assert_eq!(s.count(HistoryKind::StepProgress), 1);
    assert_eq!(s.status(), RunStatus::Completed);
}

#[test]
fn a_retry_waits_what_the_error_asks_when_that_is_longer_than_the_backoff() {
    let mut s = Sim::new(
        "name: w\nsteps:\n  - {id: m, type: llm, prompt: hi, retry: {max_attempts: 3, backoff: {initial: 100ms}}}\n",
    );
    s.start(json!({}));
    let t = s.take();
    // A provider's Retry-After of 7 s.
    assert!(s.reply(
        &t[0].at,
        Outcome::Failed {
            error: StepError::retryable("429").retry_after(std::time::Duration::from_secs(7))
        }
    ));
    let (timer, due) = s.timers.pop().unwrap();
    assert_eq!(due, s.now + 7_000);
    s.now += 7_000;
    assert!(s.send(Event::Signal(Signal::Timer { timer })));
    let t = s.take();
    assert_eq!(t[0].at.attempt, 2);
    // Shorter than the backoff: the backoff wins.
    assert!(s.reply(
        &t[0].at,
        Outcome::Failed {
            error: StepError::retryable("429").retry_after(std::time::Duration::from_millis(5))
        }
    ));
    let (_, due) = s.timers.pop().unwrap();
    assert_eq!(
        due,
        s.now + 200,
        "the backoff, 100 ms doubled for the second retry"
    );
}

//! Approvals, rollback, compensation, pause, children, fork and replay through the pure
//! machine.

use super::*;
use aob_model::wire::Verdict;

impl Sim {
    fn start_by(&mut self, by: &str) {
        assert!(self.send(Event::Start {
            tenant: "t".into(),
            run_id: "r1".into(),
            cmd: StartCommand {
                workflow: "w".into(),
                version: None,
                input: json!({}),
                run_id: None,
                by: Some(by.into()),
                fork: None,
                parent: None,
            },
        }));
    }

    fn decide(&mut self, step: &str, by: &str, verdict: Verdict, set: Value) -> bool {
        self.send(Event::Signal(Signal::Decide {
            step: step.into(),
            by: by.into(),
            roles: Vec::new(),
            decision: verdict,
            comment: Some(format!("{by} says so")),
            set: set.as_object().cloned().unwrap_or_default(),
            id: None,
            request: None,
        }))
    }

    fn fire(&mut self, timer: TimerKind) -> bool {
        self.send(Event::Signal(Signal::Timer { timer }))
    }

    fn last_message(&self, kind: HistoryKind) -> String {
        self.events
            .iter()
            .rev()
            .find(|e| e.kind == kind)
            .and_then(|e| e.message.clone())
            .unwrap_or_default()
    }

    fn output(&self, id: &str) -> Value {
        self.state.as_ref().unwrap().steps[id]
            .output
            .clone()
            .unwrap_or(Value::Null)
    }

    /// The human task out now, answered `waiting` as the human function does.
    fn park(&mut self, values: Value) -> Task {
        let t = self.take();
        let task = t
            .into_iter()
            .find(|t| t.node_type == "human")
            .expect("a human task");
        assert!(self.reply(
            &task.at,
            Outcome::Waiting {
                until_ms: None,
                detail: Some(json!({"summary": "check it", "values": values})),
            }
        ));
        task
    }

    fn approval_timer(&self) -> (TimerKind, u64) {
        self.timers
            .iter()
            .rev()
            .find(|(k, _)| matches!(k, TimerKind::Approval { .. }))
            .cloned()
            .expect("an approval deadline timer")
    }
}

const REVIEW: &str = "name: w
steps:
  - id: review
    type: human
    approvers: {users: [alice, bob, carol]}
    required: 2
    summary: check it
    fields: {type: object, properties: {amount: {type: number}}, required: [amount]}
    values: {amount: 10}
  - {id: after, type: transform, needs: [review], output: '{{ steps.review.output.values.amount }}'}
";

#[test]
fn two_of_three_approve_with_an_edit_and_every_bad_decision_is_refused() {
    let mut s = Sim::new(REVIEW);
    s.start_by("dave");
    s.park(json!({"amount": 10}));
    assert_eq!(s.step("review"), StepStatus::Waiting);
    assert_eq!(s.count(HistoryKind::ApprovalRequested), 1);

    // Not a decider.
    let before = s.state.clone();
    assert!(s.decide("review", "eve", Verdict::Approve, json!({})));
    assert!(
        s.last_message(HistoryKind::DecisionRefused)
            .contains("`eve` may not decide")
    );
    let unchanged = |a: &Option<RunState>, b: &Option<RunState>| {
        let strip = |s: &Option<RunState>| {
            s.clone().map(|mut s| {
                s.history_seq = 0;
                s.updated_ms = 0;
                s.outbox.clear();
                s.outbox_cause = None;
                s
            })
        };
        strip(a) == strip(b)
    };
    assert!(
        unchanged(&before, &s.state),
        "a refusal changes nothing but the history"
    );

    // An edit that breaks the schema.
    assert!(s.decide(
        "review",
        "alice",
        Verdict::Approve,
        json!({"amount": "lots"})
    ));
    assert!(
        s.last_message(HistoryKind::DecisionRefused)
            .contains("/amount"),
        "{}",
        s.last_message(HistoryKind::DecisionRefused)
    );

    // First approval, with an edit: still waiting for a second.
    assert!(s.decide("review", "alice", Verdict::Approve, json!({"amount": 12})));
    assert_eq!(s.count(HistoryKind::ApprovalDecided), 1);
    assert_eq!(s.step("review"), StepStatus::Waiting);

    // The same person again.
    assert!(s.decide("review", "alice", Verdict::Approve, json!({})));
    assert!(
        s.last_message(HistoryKind::DecisionRefused)
            .contains("already decided")
    );
    assert_eq!(s.count(HistoryKind::ApprovalDecided), 1);

    // Second approval completes the step with the edited values.
    assert!(s.decide("review", "bob", Verdict::Approve, json!({})));
    assert_eq!(s.step("review"), StepStatus::Completed);
    assert_eq!(s.output("review")["values"], json!({"amount": 12}));
    assert_eq!(s.output("review")["approvers"], json!(["alice", "bob"]));
    let t = s.take();
    assert_eq!(ids(&t), vec!["after"]);
    assert_eq!(
        t[0].context["steps"]["review"]["output"]["values"]["amount"],
        json!(12)
    );

    // After the request is closed.
    assert!(s.decide("review", "carol", Verdict::Approve, json!({})));
    assert!(
        s.last_message(HistoryKind::DecisionRefused)
            .contains("no open approval request")
    );
}

#[test]
fn the_starter_may_not_approve_their_own_run_unless_allowed() {
    let wf = |allow: bool| {
        format!(
            "name: w\nsteps:\n  - {{id: review, type: human, approvers: {{users: [alice, bob]}}, allow_self_approval: {allow}}}\n"
        )
    };
    let mut s = Sim::new(&wf(false));
    s.start_by("alice");
    s.park(Value::Null);
    assert!(s.decide("review", "alice", Verdict::Approve, json!({})));
    assert!(
        s.last_message(HistoryKind::DecisionRefused)
            .contains("started this run")
    );
    assert_eq!(s.step("review"), StepStatus::Waiting);
    assert!(s.decide("review", "bob", Verdict::Approve, json!({})));
    assert_eq!(s.status(), RunStatus::Completed);

    let mut s = Sim::new(&wf(true));
    s.start_by("alice");
    s.park(Value::Null);
    assert!(s.decide("review", "alice", Verdict::Approve, json!({})));
    assert_eq!(s.status(), RunStatus::Completed);
}

#[test]
fn a_role_holder_decides_and_one_rejection_fails_the_step() {
    let mut s = Sim::new(
        "name: w\nsteps:\n  - {id: review, type: human, approvers: {roles: [finance]}, required: 2}\n",
    );
    s.start_by("dave");
    s.park(Value::Null);
    assert!(s.send(Event::Signal(Signal::Decide {
        step: "review".into(),
        by: "erin".into(),
        roles: vec!["finance".into()],
        decision: Verdict::Reject,
        comment: Some("the total is wrong".into()),
        set: Default::default(),
        id: Some("d1".into()),
        request: None,
    })));
    assert_eq!(s.step("review"), StepStatus::Failed);
    assert_eq!(s.status(), RunStatus::Failed);
    let err = s.state.as_ref().unwrap().steps["review"]
        .error
        .clone()
        .unwrap();
    assert_eq!(err.message, "rejected by erin: the total is wrong");
}

fn deadline_wf(action: &str) -> String {
    let extra = if action == "escalate" {
        ", to: {users: [boss]}, then: {after: 1h, action: reject}"
    } else {
        ""
    };
    format!(
        "name: w\nsteps:\n  - {{id: review, type: human, approvers: {{users: [alice]}}, deadline: {{after: 10m, action: {action}{extra}}}}}\n  - {{id: after, type: transform, needs: [review], output: done}}\n"
    )
}

#[test]
fn every_deadline_action_is_recorded_as_an_expiry() {
    // approve
    let mut s = Sim::new(&deadline_wf("approve"));
    s.start_by("dave");
    s.park(Value::Null);
    let (timer, due) = s.approval_timer();
    assert_eq!(due, s.now + 600_000);
    s.now = due;
    // A decision at the deadline is too late: the timer decides.
    assert!(s.decide("review", "alice", Verdict::Approve, json!({})));
    assert!(
        s.last_message(HistoryKind::DecisionRefused)
            .contains("expired")
    );
    assert!(s.fire(timer.clone()));
    assert_eq!(s.count(HistoryKind::ApprovalExpired), 1);
    assert_eq!(s.step("review"), StepStatus::Completed);
    assert_eq!(s.output("review")["by_deadline"], json!(true));
    assert!(!s.fire(timer), "a deadline fires once");

    // reject: the step fails as expired, never as a person's rejection
    let mut s = Sim::new(&deadline_wf("reject"));
    s.start_by("dave");
    s.park(Value::Null);
    let (timer, due) = s.approval_timer();
    s.now = due;
    assert!(s.fire(timer));
    assert_eq!(s.step("review"), StepStatus::Failed);
    let err = s.state.as_ref().unwrap().steps["review"]
        .error
        .clone()
        .unwrap();
    assert!(err.message.contains("expired"), "{}", err.message);
    assert!(!err.message.contains("rejected by"), "{}", err.message);
    assert_eq!(s.count(HistoryKind::ApprovalDecided), 0);

    // fail: the run fails
    let mut s = Sim::new(&deadline_wf("fail"));
    s.start_by("dave");
    s.park(Value::Null);
    let (timer, due) = s.approval_timer();
    s.now = due;
    assert!(s.fire(timer));
    assert_eq!(s.status(), RunStatus::Failed);
    assert!(
        s.state
            .as_ref()
            .unwrap()
            .error
            .as_deref()
            .unwrap()
            .contains("expired")
    );

    // escalate: other deciders, a new deadline
    let mut s = Sim::new(&deadline_wf("escalate"));
    s.start_by("dave");
    s.park(Value::Null);
    let (timer, due) = s.approval_timer();
    s.now = due;
    assert!(s.fire(timer));
    assert_eq!(s.count(HistoryKind::ApprovalEscalated), 1);
    let (next, next_due) = s.approval_timer();
    assert_eq!(next_due, s.now + 3_600_000);
    assert!(matches!(next, TimerKind::Approval { round: 1, .. }));
    assert!(s.decide("review", "alice", Verdict::Approve, json!({})));
    assert!(
        s.last_message(HistoryKind::DecisionRefused)
            .contains("may not decide")
    );
    assert!(s.decide("review", "boss", Verdict::Approve, json!({})));
    assert_eq!(s.step("review"), StepStatus::Completed);
    assert!(
        s.cancelled.contains(&next),
        "the next deadline is cancelled"
    );
}

const SEEDS: &str = "name: w
max_rollbacks: 1
steps:
  - {id: draft, type: transform, output: text}
  - {id: review, type: human, needs: [draft], approvers: {users: [alice]}}
  - {id: check, type: validate, needs: [review], value: 1, assert: ['value == 1'], on_fail: {rollback_to: draft}}
";

#[test]
fn a_failed_validation_rolls_back_to_the_draft_and_is_bounded() {
    let mut s = Sim::new(SEEDS);
    s.start_by("dave");
    let t = s.take();
    assert!(s.ok(&t[0], json!("v1")));
    s.park(Value::Null);
    assert!(s.decide("review", "alice", Verdict::Approve, json!({})));
    let check = s.take().remove(0);
    assert_eq!(check.at.generation, 0);
    assert!(s.reply(
        &check.at,
        Outcome::Failed {
            error: StepError::terminal("value is wrong")
        }
    ));
    // Rolled back: a new generation, the draft again, the rest pending.
    assert_eq!(s.count(HistoryKind::RolledBack), 1);
    let st = s.state.clone().unwrap();
    assert_eq!(st.generation, 1);
    assert_eq!(st.status, RunStatus::Running);
    assert_eq!(s.step("review"), StepStatus::Pending);
    let t = s.take();
    assert_eq!(ids(&t), vec!["draft"]);
    assert_eq!(t[0].at.generation, 1);
    // A late answer of the check from before the rollback changes nothing.
    assert!(!s.reply(&check.at, Outcome::Completed { output: json!({}) }));
    // Second pass.
    assert!(s.ok(&t[0], json!("v2")));
    s.park(Value::Null);
    assert!(s.decide("review", "alice", Verdict::Approve, json!({})));
    let check2 = s.take().remove(0);
    assert_eq!(check2.at.generation, 1);
    // It fails again: max_rollbacks (1) is reached, the run fails and says why.
    assert!(s.reply(
        &check2.at,
        Outcome::Failed {
            error: StepError::terminal("still wrong")
        }
    ));
    assert_eq!(s.count(HistoryKind::RolledBack), 1);
    assert_eq!(s.status(), RunStatus::Failed);
    let why = s.state.as_ref().unwrap().error.clone().unwrap();
    assert!(why.contains("max_rollbacks"), "{why}");
}

#[test]
fn a_person_rolls_a_failed_run_back_and_it_completes() {
    let mut s = Sim::new(
        "name: w\nsteps:\n  - {id: a, type: transform, output: 1}\n  - {id: b, type: transform, needs: [a], output: 2}\n",
    );
    s.start(json!({}));
    let a = s.take().remove(0);
    assert!(s.ok(&a, json!(1)));
    let b = s.take().remove(0);
    assert!(s.reply(
        &b.at,
        Outcome::Failed {
            error: StepError::terminal("boom")
        }
    ));
    assert_eq!(s.status(), RunStatus::Failed);
    // To a step that exists and ran: the run reopens from before `b`; `a` is kept.
    assert!(!s.send(Event::Signal(Signal::Rollback {
        to: "nope".into(),
        by: None,
        reason: None,
        id: None,
    })));
    assert!(s.send(Event::Signal(Signal::Rollback {
        to: "b".into(),
        by: Some("ops".into()),
        reason: None,
        id: None,
    })));
    assert_eq!(s.status(), RunStatus::Running);
    assert_eq!(s.step("a"), StepStatus::Completed);
    let b2 = s.take().remove(0);
    assert_eq!((b2.at.step.as_str(), b2.at.generation), ("b", 1));
    assert!(s.ok(&b2, json!(2)));
    assert_eq!(s.status(), RunStatus::Completed);
}

const SAGA: &str = "name: w
on_failure: compensate
steps:
  - {id: a, type: transform, output: 1, compensate: {type: transform, output: undo-a}}
  - {id: b, type: transform, output: 2, compensate: {type: transform, output: undo-b}}
  - {id: c, type: transform, needs: [a], output: 3, compensate: {step: undo_c}}
  - {id: undo_c, type: transform, output: undo-c}
  - {id: slow, type: transform, needs: [b], output: 4, compensate: {type: transform, output: undo-slow}}
  - {id: d, type: transform, needs: [b], output: 5}
";

#[test]
fn compensation_runs_latest_first_after_running_branches_finish() {
    let mut s = Sim::new(SAGA);
    s.start(json!({}));
    let t = s.take();
    let (a, b): (Vec<_>, Vec<_>) = t.into_iter().partition(|t| t.at.step == "a");
    assert!(s.ok(&b[0], json!(2)));
    assert!(s.ok(&a[0], json!(1)));
    let t = s.take();
    let slow = t.iter().find(|t| t.at.step == "slow").unwrap().clone();
    let d = t.iter().find(|t| t.at.step == "d").unwrap().clone();
    let c = t.iter().find(|t| t.at.step == "c").unwrap().clone();
    assert!(s.ok(&c, json!(3)));
    // `d` fails while `slow` still runs: nothing is compensated until `slow` answers.
    assert!(s.reply(
        &d.at,
        Outcome::Failed {
            error: StepError::terminal("no")
        }
    ));
    assert!(s.take().is_empty(), "compensation waits for running steps");
    assert!(s.ok(&slow, json!(4)));
    // Reverse completion order: slow, c, a, b.
    let mut order = Vec::new();
    loop {
        let t = s.take();
        if t.is_empty() {
            break;
        }
        assert_eq!(t.len(), 1, "one compensation at a time");
        let task = &t[0];
        assert_eq!(
            task.at.generation, 1,
            "compensations run in a generation of their own"
        );
        order.push(task.at.step.clone());
        if task.at.step == "c" {
            assert_eq!(
                task.config["output"],
                json!("undo-c"),
                "`compensate: {{step}}` runs that step"
            );
            assert_eq!(task.context["compensating"]["output"], json!(3));
        }
        assert!(s.ok(task, json!("undone")));
    }
    assert_eq!(order, vec!["slow", "c", "a", "b"]);
    assert_eq!(s.status(), RunStatus::Compensated);
    for id in ["a", "b", "c", "slow"] {
        assert_eq!(s.step(id), StepStatus::Compensated, "{id}");
    }
    assert_eq!(s.step("d"), StepStatus::Failed);
}

#[test]
fn a_failed_compensation_is_retried_then_ends_the_run_failed() {
    let mut s = Sim::new(
        "name: w\non_failure: compensate\nsteps:\n  - {id: a, type: transform, output: 1, retry: {max_attempts: 2, backoff: {initial: 1s}}, compensate: {type: transform, output: undo}}\n  - {id: b, type: transform, needs: [a], output: 2}\n",
    );
    s.start(json!({}));
    let a = s.take().remove(0);
    assert!(s.ok(&a, json!(1)));
    let b = s.take().remove(0);
    assert!(s.reply(
        &b.at,
        Outcome::Failed {
            error: StepError::terminal("no")
        }
    ));
    let undo = s.take().remove(0);
    assert!(s.reply(
        &undo.at,
        Outcome::Failed {
            error: StepError::retryable("flaky")
        }
    ));
    let (retry, _) = s.timers.last().cloned().unwrap();
    assert!(matches!(retry, TimerKind::Retry { .. }));
    assert!(s.fire(retry));
    let undo2 = s.take().remove(0);
    assert_eq!(undo2.at.attempt, 2);
    assert!(s.reply(
        &undo2.at,
        Outcome::Failed {
            error: StepError::retryable("flaky")
        }
    ));
    assert_eq!(s.status(), RunStatus::Failed);
    assert!(
        s.state
            .as_ref()
            .unwrap()
            .error
            .as_deref()
            .unwrap()
            .contains("compensation of `a` failed")
    );
}

#[test]
fn cancel_with_compensation_stops_running_steps_and_undoes_completed_ones() {
    let mut s = Sim::new(
        "name: w\nsteps:\n  - {id: a, type: transform, output: 1, compensate: {type: transform, output: undo}}\n  - {id: b, type: transform, needs: [a], output: 2}\n",
    );
    s.start(json!({}));
    let a = s.take().remove(0);
    assert!(s.ok(&a, json!(1)));
    let b = s.take().remove(0);
    assert!(s.send(Event::Signal(Signal::Cancel {
        reason: Some("stop".into()),
        by: None,
        compensate: true
    })));
    assert_eq!(s.count(HistoryKind::Abort), 1);
    let undo = s.take().remove(0);
    assert_eq!(undo.at.step, "a");
    assert!(!s.ok(&b, json!(2)), "the aborted step's answer is stale");
    assert!(s.ok(&undo, json!("undone")));
    assert_eq!(s.status(), RunStatus::Cancelled);
    assert_eq!(s.step("a"), StepStatus::Compensated);
}

#[test]
fn a_paused_run_starts_nothing_new_until_resumed() {
    let mut s = Sim::new(
        "name: w\nsteps:\n  - {id: a, type: transform, output: 1}\n  - {id: b, type: transform, needs: [a], output: 2}\n",
    );
    s.start(json!({}));
    let a = s.take().remove(0);
    assert!(s.send(Event::Signal(Signal::Pause {
        by: Some("ops".into())
    })));
    assert!(
        !s.send(Event::Signal(Signal::Pause { by: None })),
        "paused once"
    );
    assert!(s.ok(&a, json!(1)), "a running step finishes");
    assert!(s.take().is_empty(), "b does not start while paused");
    assert_eq!(s.step("b"), StepStatus::Pending);
    assert!(s.send(Event::Signal(Signal::Resume { by: None })));
    let b = s.take().remove(0);
    assert!(s.ok(&b, json!(2)));
    assert_eq!(s.status(), RunStatus::Completed);
}

#[test]
fn a_child_run_is_started_waited_for_and_cancelled_with_its_parent() {
    let mut s = Sim::new(
        "name: w\nsteps:\n  - {id: sub, type: workflow, workflow: other, input: {n: '{{ input.n }}'}}\n",
    );
    s.start(json!({"n": 7}));
    assert!(
        s.take().is_empty(),
        "no task: the engine starts the child itself"
    );
    let (subject, body) = s.published.remove(0);
    assert_eq!(subject, "aob.t.cmd.start");
    let cmd: StartCommand = serde_json::from_value(body).unwrap();
    assert_eq!(cmd.input, json!({"n": 7}));
    let parent = cmd.parent.clone().unwrap();
    assert_eq!(parent.run, "r1");
    let child = cmd.run_id.unwrap();
    assert_eq!(s.step("sub"), StepStatus::Running);
    assert!(s.send(Event::Signal(Signal::Cancel {
        reason: None,
        by: None,
        compensate: false
    })));
    let (subject, body) = s.published.remove(0);
    assert_eq!(subject, format!("aob.t.cmd.signal.{child}"));
    assert!(matches!(
        serde_json::from_value::<Signal>(body).unwrap(),
        Signal::Cancel { .. }
    ));
}

#[test]
fn a_child_reports_its_end_to_its_parent() {
    let mut s = Sim::new("name: w\nsteps:\n  - {id: a, type: transform, output: 1}\n");
    let at = StepRef {
        step: "sub".into(),
        item: None,
        iteration: None,
        attempt: 1,
        generation: 0,
    };
    assert!(s.send(Event::Start {
        tenant: "t".into(),
        run_id: "child".into(),
        cmd: StartCommand {
            workflow: "w".into(),
            version: None,
            input: json!({}),
            run_id: None,
            by: None,
            fork: None,
            parent: Some(aob_model::wire::ParentRef {
                run: "p1".into(),
                at: at.clone()
            }),
        },
    }));
    let a = s.take().remove(0);
    assert!(s.ok(&a, json!(41)));
    let (subject, body) = s.published.remove(0);
    assert_eq!(subject, "aob.t.result.p1");
    let r: StepResult = serde_json::from_value(body).unwrap();
    assert_eq!(r.at, at);
    assert_eq!(
        r.outcome,
        Outcome::Completed {
            output: json!({"run_id": "child", "outputs": {"a": 41}})
        }
    );
}

#[test]
fn a_fork_reuses_what_finished_before_its_step() {
    let yaml = "name: w\nsteps:\n  - {id: a, type: transform, output: 1}\n  - {id: b, type: transform, needs: [a], output: '{{ steps.a.output }}'}\n  - {id: c, type: transform, needs: [b], output: 3}\n";
    let mut s = Sim::new(yaml);
    s.start(json!({}));
    for _ in 0..3 {
        let t = s.take().remove(0);
        let out = json!(format!("{}-out", t.at.step));
        assert!(s.ok(&t, out));
    }
    let source = s.state.clone().unwrap();
    let seed = crate::machine::fork_seed(&source, "b", &Default::default()).unwrap();
    assert_eq!(seed.keys().collect::<Vec<_>>(), vec!["a"]);
    let mut set = serde_json::Map::new();
    set.insert("c".into(), json!("x"));
    assert!(
        crate::machine::fork_seed(&source, "b", &set)
            .unwrap_err()
            .contains("not reused")
    );

    let mut f = Sim::new(yaml);
    assert!(f.send(Event::Start {
        tenant: "t".into(),
        run_id: "r2".into(),
        cmd: StartCommand {
            workflow: "w".into(),
            version: None,
            input: json!({}),
            run_id: None,
            by: None,
            fork: Some(aob_model::wire::ForkSpec {
                run: "r1".into(),
                from: "b".into(),
                set: seed
            }),
            parent: None,
        },
    }));
    assert_eq!(f.step("a"), StepStatus::Completed);
    let t = f.take();
    assert_eq!(ids(&t), vec!["b"], "only what follows the fork point runs");
    assert_eq!(t[0].context["steps"]["a"]["output"], json!("a-out"));
}

#[test]
fn replay_reaches_the_same_decisions_and_catches_a_changed_definition() {
    let yaml = "name: w
steps:
  - {id: a, type: transform, output: 1, retry: {max_attempts: 2, backoff: {initial: 1s}}}
  - {id: review, type: human, needs: [a], approvers: {users: [alice]}}
  - {id: b, type: transform, needs: [review], when: 'steps.a.output > 0', output: 2}
";
    let mut s = Sim::new(yaml);
    s.start_by("dave");
    let a = s.take().remove(0);
    assert!(s.reply(
        &a.at,
        Outcome::Failed {
            error: StepError::retryable("flaky")
        }
    ));
    let (retry, due) = s.timers.last().cloned().unwrap();
    s.now = due;
    assert!(s.fire(retry));
    let a2 = s.take().remove(0);
    assert!(s.ok(&a2, json!(5)));
    s.park(Value::Null);
    assert!(s.decide("review", "eve", Verdict::Approve, json!({})));
    assert!(s.decide("review", "alice", Verdict::Approve, json!({})));
    let b = s.take().remove(0);
    assert!(s.ok(&b, json!(2)));
    assert_eq!(s.status(), RunStatus::Completed);
    let run = s.state.clone().unwrap();

    let report = crate::machine::replay::replay(&s.def, &run, &s.events);
    assert_eq!(report.divergence, None, "{report:?}");
    assert_eq!(
        report.matched,
        s.events.len(),
        "every recorded event is produced again"
    );
    assert_eq!(
        report.inputs, 7,
        "results, a timer and decisions were taken as inputs"
    );

    // The same history under a definition whose condition changed.
    let changed = aob_model::load_str(&yaml.replace("> 0", "> 10"), "changed.yaml").unwrap();
    let def = Compiled::new(changed, 2).unwrap();
    let report = crate::machine::replay::replay(&def, &run, &s.events);
    let d = report.divergence.expect("a divergence");
    assert!(d.recorded.starts_with("step_scheduled b"), "{d:?}");
    assert!(d.replayed.starts_with("step_skipped b"), "{d:?}");
}

#[test]
fn a_redelivered_decision_or_rollback_changes_nothing_and_a_stale_request_is_refused() {
    let mut s = Sim::new(SEEDS);
    s.start_by("dave");
    let t = s.take();
    assert!(s.ok(&t[0], json!("v1")));
    let task = s.park(Value::Null);
    let decide = |id: &str, request: Option<String>| {
        Event::Signal(Signal::Decide {
            step: "review".into(),
            by: "alice".into(),
            roles: Vec::new(),
            decision: Verdict::Approve,
            comment: None,
            set: Default::default(),
            id: Some(id.into()),
            request,
        })
    };
    assert!(s.send(decide("d1", Some(task.at.token()))));
    assert!(
        !s.send(decide("d1", Some(task.at.token()))),
        "a redelivery is a no-op"
    );
    assert_eq!(s.count(HistoryKind::DecisionRefused), 0);

    let check = s.take().remove(0);
    assert!(s.reply(
        &check.at,
        Outcome::Failed {
            error: StepError::terminal("bad")
        }
    ));
    // A rollback by hand, delivered twice: taken once.
    let rollback = Event::Signal(Signal::Rollback {
        to: "draft".into(),
        by: Some("ops".into()),
        reason: None,
        id: Some("r1".into()),
    });
    let generation = s.state.as_ref().unwrap().generation;
    let t = s.take();
    assert!(s.ok(&t[0], json!("v2")));
    s.park(Value::Null);
    assert!(s.send(rollback.clone()));
    assert_eq!(s.state.as_ref().unwrap().generation, generation + 1);
    assert!(
        !s.send(rollback),
        "a redelivered rollback is not taken again"
    );
    assert_eq!(s.state.as_ref().unwrap().generation, generation + 1);

    // A decision on the request from before the rollback is refused, not applied.
    let t = s.take();
    assert!(s.ok(&t[0], json!("v3")));
    s.park(Value::Null);
    assert!(s.send(decide("d2", Some(task.at.token()))));
    assert!(
        s.last_message(HistoryKind::DecisionRefused)
            .contains("was replaced")
    );
    assert_eq!(s.step("review"), StepStatus::Waiting);
}

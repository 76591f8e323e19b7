//! People in the loop against a real nats-server: approvals decided through the CLI and by
//! signal, an email caught by a real SMTP server (aiosmtpd), approvals and pauses that
//! outlive the engine, rollback after a failed validation, child runs, forks and replays.
//! Model calls go to the scripted provider (a test double speaking the OpenAI protocol).

use std::time::Duration;

use aob_model::state::{RunStatus, StepStatus};
use aob_model::wire::{ForkSpec, HistoryEvent, HistoryKind, Signal, StartCommand, Verdict};
use aob_runtime::nats::ServeConfig;
use aob_scripted_provider::{Script, ScriptedProvider};
use aob_streams::subjects;
use aob_tests::{Fns, Stack};
use serde_json::json;

const T: &str = "people";

const SCRIPT: &str = r#"
rules:
  - when: { contains: "Write the reply" }
    times: 1
    reply: { text: "Dear customer, no.", usage: { input: 20, output: 5 } }
  - when: { contains: "Write the reply" }
    reply: { text: "Dear customer, thanks for writing!", usage: { input: 20, output: 7 } }
"#;

#[allow(clippy::unwrap_used)]
async fn with_models(script: &str) -> (Stack, ScriptedProvider) {
    let mut s = Stack::bare().await.unwrap();
    let double = ScriptedProvider::start(Script::parse(script, "script.yaml").unwrap())
        .await
        .unwrap();
    let models = aob_llm::config::Config::parse(&format!(
        "models:\n  scripted: {{ protocol: openai, base_url: \"{}\", provider: scripted }}\ndefault: {{ model: scripted }}\n",
        double.openai_base_url()
    ))
    .unwrap();
    let engine = s.engine().await.unwrap();
    s.spawn_engine(engine);
    s.spawn_functions(Fns::AllButHttp).await.unwrap();
    s.spawn_agents(
        models,
        aob_tool::ToolsConfig::default(),
        &ServeConfig::default(),
    )
    .await
    .unwrap();
    (s, double)
}

/// The history of a run until its `n`-th event of `kind`.
#[allow(clippy::unwrap_used)]
async fn until_nth(s: &Stack, run: &str, kind: HistoryKind, n: usize) -> Vec<HistoryEvent> {
    let seen = std::sync::atomic::AtomicUsize::new(0);
    s.history_until(
        T,
        run,
        |e| e.kind == kind && seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1 == n,
        Duration::from_secs(60),
    )
    .await
    .unwrap()
}

#[allow(clippy::unwrap_used)]
async fn decide(s: &Stack, run: &str, step: &str, by: &str, verdict: Verdict) {
    let signal = Signal::Decide {
        step: step.into(),
        by: by.into(),
        roles: Vec::new(),
        decision: verdict,
        comment: None,
        set: Default::default(),
        id: Some(ulid::Ulid::new().to_string()),
        request: None,
    };
    s.publish_raw(
        &subjects::signal(T, run),
        Some(&ulid::Ulid::new().to_string()),
        serde_json::to_vec(&signal).unwrap(),
    )
    .await
    .unwrap();
}

fn aob(s: &Stack, args: &[&str]) -> std::process::Output {
    #[allow(clippy::unwrap_used)]
    std::process::Command::new(aob_tests::binary("aob").unwrap())
        .arg("--tenant")
        .arg(T)
        .args(args)
        .env("NATS_URL", s.server.url())
        .env("AOB_PAYLOAD_URL", &s.payload_url)
        .output()
        .unwrap()
}

fn count(events: &[HistoryEvent], kind: HistoryKind) -> usize {
    events.iter().filter(|e| e.kind == kind).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_approval_example_approves_by_cli_rolls_back_once_and_completes_with_an_audit_trail() {
    // The example's replies: the first draft forgets the customer's name.
    let script =
        std::fs::read_to_string(aob_tests::examples_dir().join("agentic/scripted-provider.yaml"))
            .unwrap();
    let (mut s, double) = with_models(&script).await;
    let sink = aob_tests::audit::LocalSink::start(&s.client).unwrap();
    let wf = s.publish_example(T, "approval").await.unwrap();
    let input = json!({"customer": "Ada", "question": "Where is my order 1234?"});
    let run = s.start_run_as(T, &wf, input, Some("alice")).await.unwrap();

    let events = until_nth(&s, &run, HistoryKind::ApprovalRequested, 1).await;
    let req = events.last().unwrap();
    let summary = req.message.clone().unwrap();
    assert!(
        summary.contains("Send this reply to Ada? Your order is on its way."),
        "the summary is rendered from the run context: {summary}"
    );
    // `aob approvals list` shows it; alice started the run and has nothing to decide.
    let out = aob(&s, &["approvals", "list"]);
    let listed = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        listed.contains(&run) && listed.contains("review"),
        "{listed}"
    );
    let out = aob(&s, &["--as", "alice", "approvals", "list", "--mine"]);
    let mine = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(mine.contains("no open approval requests"), "{mine}");
    let out = aob(&s, &["--as", "bob", "approvals", "list", "--mine"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains(&run));

    // Refused with reasons: the starter, someone not asked; then a role holder approves.
    let refused = |out: &std::process::Output, why: &str| {
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(why),
            "{out:?}"
        );
    };
    refused(
        &aob(&s, &["--as", "alice", "approve", &run, "review"]),
        "started this run",
    );
    refused(
        &aob(&s, &["--as", "mallory", "approve", &run, "review"]),
        "may not decide",
    );
    let erin = [
        "--as",
        "erin",
        "approve",
        &run,
        "review",
        "--role",
        "support-lead",
    ];
    let out = aob(&s, &erin);
    assert!(out.status.success(), "{out:?}");
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(said.contains("approved by erin (1 of 1)"), "{said}");

    // The check fails, the run rolls back to the draft, which the model writes again.
    let events = until_nth(&s, &run, HistoryKind::ApprovalRequested, 2).await;
    assert_eq!(count(&events, HistoryKind::RolledBack), 1);
    let summary = events.last().unwrap().message.clone().unwrap();
    assert!(summary.contains("Hello Ada"), "{summary}");
    // An edit that breaks the request's schema is refused; a valid one becomes the output.
    refused(
        &aob(
            &s,
            &[
                "--as",
                "bob",
                "approve",
                &run,
                "review",
                "--set",
                "reply=\"\"",
            ],
        ),
        "/reply",
    );
    let edit = "reply=Hello Ada, it arrives tomorrow.";
    let out = aob(
        &s,
        &["--as", "bob", "approve", &run, "review", "--set", edit],
    );
    assert!(out.status.success(), "{out:?}");
    let (state, events) = s.wait_run(T, &run).await.unwrap();
    assert_eq!(state.status, RunStatus::Completed, "{events:#?}");
    assert_eq!(
        state.steps["send"].output.as_ref().unwrap()["reply"],
        json!("Hello Ada, it arrives tomorrow.")
    );
    assert_eq!(state.generation, 1);
    assert_eq!(state.rollbacks, 1);
    assert_eq!(double.requests().total, 2, "one model call per pass");
    let failed: Vec<_> = events
        .iter()
        .filter(|e| e.kind == HistoryKind::StepFailed)
        .map(|e| e.step.clone().unwrap())
        .collect();
    assert_eq!(failed, vec!["check"]);

    // The audit says who decided what.
    let rows = sink
        .query(
            &s.client,
            &format!(
                "SELECT event_kind, actor, decision FROM TRAIL WHERE run_id = '{run}' \
                 AND event_kind IN ('approval_decided', 'decision_refused', 'rollback') ORDER BY finished_at"
            ),
        )
        .await
        .unwrap();
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            r.iter()
                .map(|v| v.as_str().unwrap_or_default().to_string())
                .collect()
        })
        .collect();
    assert_eq!(
        rows,
        vec![
            vec!["decision_refused", "alice", "refuse"],
            vec!["decision_refused", "mallory", "refuse"],
            vec!["approval_decided", "erin", "approve"],
            vec!["rollback", "engine", "rollback"],
            vec!["decision_refused", "bob", "refuse"],
            vec!["approval_decided", "bob", "approve"],
        ]
    );
    sink.stop().await.unwrap();
    s.stop().await;
}

const HOLD: &str = r#"
name: hold
steps:
  - id: review
    type: human
    approvers: {users: [alice]}
  - {id: after, type: transform, needs: [review], output: "{{ steps.review.output.approvers }}"}
"#;

/// Restarts the engine and the functions (their state is all in the server).
#[allow(clippy::unwrap_used)]
async fn restart(s: &mut Stack) {
    s.stop().await;
    let engine = s.engine().await.unwrap();
    s.spawn_engine(engine);
    s.spawn_functions(Fns::AllButHttp).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approval_and_a_pause_outlive_engine_restarts() {
    let mut s = Stack::start_with(Fns::AllButHttp).await.unwrap();
    s.publish(T, HOLD).await.unwrap();
    let run = s.start_run(T, "hold", json!({})).await.unwrap();
    until_nth(&s, &run, HistoryKind::ApprovalRequested, 1).await;

    restart(&mut s).await;
    let out = aob(&s, &["run", "pause", &run]);
    assert!(out.status.success(), "{out:?}");
    until_nth(&s, &run, HistoryKind::Paused, 1).await;
    decide(&s, &run, "review", "alice", Verdict::Approve).await;
    until_nth(&s, &run, HistoryKind::ApprovalDecided, 1).await;
    s.commands_handled().await.unwrap();
    let state = s.run_state(T, &run).await.unwrap().unwrap();
    assert_eq!(state.steps["review"].status(), StepStatus::Completed);
    assert_eq!(
        state.steps["after"].status(),
        StepStatus::Pending,
        "paused: nothing new starts"
    );

    restart(&mut s).await;
    let state = s.run_state(T, &run).await.unwrap().unwrap();
    assert!(state.paused);
    let out = aob(&s, &["run", "resume", &run]);
    assert!(out.status.success(), "{out:?}");
    let (state, _) = s.wait_run(T, &run).await.unwrap();
    assert_eq!(state.status, RunStatus::Completed);
    assert_eq!(state.steps["after"].output, Some(json!(["alice"])));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approval_request_is_mailed_through_a_real_smtp_server_and_posted_to_a_webhook() {
    let smtp = aob_tests::smtp::SmtpServer::start().await.unwrap();
    let (addr, hooks) = aob_tests::endpoints::serve().await;
    let mut s = Stack::bare().await.unwrap();
    let engine = s.engine().await.unwrap();
    s.spawn_engine(engine);
    s.spawn_handler(aob_human::HumanHandler::new(aob_human::Notifier::new(
        Some(smtp.url.clone()),
        "aob@example.com".into(),
        Some("https://aob.example.com/runs/{run}/steps/{step}".into()),
    )))
    .await
    .unwrap();
    s.publish(
        T,
        &r#"
name: mailed
steps:
  - id: review
    type: human
    approvers: {users: [alice]}
    summary: "Refund {{ input.amount }} EUR to {{ input.customer }}?"
    notify: {email: ["alice@example.com"], webhook: "http://ADDR/webhook"}
"#
        .replace("ADDR", &addr.to_string()),
    )
    .await
    .unwrap();
    let run = s
        .start_run(T, "mailed", json!({"amount": 120, "customer": "ACME"}))
        .await
        .unwrap();
    let events = until_nth(&s, &run, HistoryKind::ApprovalRequested, 1).await;
    let notified = events.last().unwrap().data.as_ref().unwrap()["notified"].clone();
    assert_eq!(
        notified,
        json!([
            "mail:alice@example.com",
            format!("webhook:http://{addr}/webhook")
        ])
    );
    let posted = hooks.posted.lock().unwrap().clone();
    assert_eq!(posted.len(), 1);
    assert_eq!(posted[0]["run_id"], json!(run));
    assert_eq!(posted[0]["summary"], json!("Refund 120 EUR to ACME?"));
    assert_eq!(
        posted[0]["approve"],
        json!(format!("aob approve {run} review"))
    );
    let mail = smtp
        .wait_for(
            &format!("aob approve {run} review"),
            Duration::from_secs(20),
        )
        .await
        .unwrap();
    assert!(mail.contains("alice@example.com"), "{mail}");
    assert!(mail.contains("Refund 120 EUR to ACME?"), "{mail}");
    assert!(
        mail.contains(&format!("https://aob.example.com/runs/{run}/steps/review")),
        "{mail}"
    );
    s.stop().await;
}

const CHILD: &str = r#"
name: child
steps:
  - id: wait_ok
    type: human
    when: "input.ask"
    approvers: {users: [alice]}
  - {id: sum, type: transform, needs: [wait_ok], trigger: all_done, output: "{{ input.n + 1 }}"}
"#;

const PARENT: &str = r#"
name: parent
steps:
  - id: sub
    type: workflow
    workflow: child
    input: {n: "{{ input.n }}", ask: "{{ input.ask }}"}
  - {id: after, type: transform, needs: [sub], output: "{{ steps.sub.output.outputs.sum }}"}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_run_completes_its_parent_step_and_is_cancelled_with_its_parent() {
    let s = Stack::start_with(Fns::AllButHttp).await.unwrap();
    s.publish(T, CHILD).await.unwrap();
    s.publish(T, PARENT).await.unwrap();

    let run = s
        .start_run(T, "parent", json!({"n": 41, "ask": false}))
        .await
        .unwrap();
    let (state, events) = s.wait_run(T, &run).await.unwrap();
    assert_eq!(state.status, RunStatus::Completed, "{events:#?}");
    assert_eq!(state.steps["after"].output, Some(json!(42)));
    let child = state.steps["sub"].output.as_ref().unwrap()["run_id"]
        .as_str()
        .unwrap()
        .to_string();
    let (child_state, child_events) = s.wait_run(T, &child).await.unwrap();
    assert_eq!(child_state.parent.as_ref().unwrap().run, run);
    assert!(
        child_events[0].message.as_deref().unwrap().contains(&run),
        "the child names its parent"
    );

    // A child waiting for a person is cancelled with its parent.
    let run = s
        .start_run(T, "parent", json!({"n": 1, "ask": true}))
        .await
        .unwrap();
    let events = until_nth(&s, &run, HistoryKind::StepScheduled, 1).await;
    let child = events.last().unwrap().data.as_ref().unwrap()["child_run"]
        .as_str()
        .unwrap()
        .to_string();
    until_nth(&s, &child, HistoryKind::ApprovalRequested, 1).await;
    let out = aob(&s, &["run", "cancel", &run]);
    assert!(out.status.success(), "{out:?}");
    let (child_state, _) = s.wait_run(T, &child).await.unwrap();
    assert_eq!(child_state.status, RunStatus::Cancelled);
    assert!(child_state.error.as_deref().unwrap().contains(&run));
    let (state, _) = s.wait_run(T, &run).await.unwrap();
    assert_eq!(state.status, RunStatus::Cancelled);

    // A child that cannot start fails its parent's step with the reason.
    s.publish(
        T,
        "name: orphan\nsteps:\n  - {id: sub, type: workflow, workflow: missing}\n",
    )
    .await
    .unwrap();
    let run = s.start_run(T, "orphan", json!({})).await.unwrap();
    let (state, _) = s.wait_run(T, &run).await.unwrap();
    assert_eq!(state.status, RunStatus::Failed);
    let why = state.steps["sub"].error.clone().unwrap().message;
    assert!(
        why.contains("was not started") && why.contains("missing"),
        "{why}"
    );
}

const DRAFTED: &str = r#"
name: drafted
steps:
  - id: draft
    type: llm
    prompt: "Write the reply to: {{ input.ask }}"
  - id: shape
    type: transform
    needs: [draft]
    when: "size(steps.draft.output.text) > 0"
    output: {reply: "{{ steps.draft.output.text }}", n: "{{ input.n }}"}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fork_reuses_the_recorded_draft_and_a_replay_calls_nothing() {
    let (s, double) = with_models(SCRIPT).await;
    s.publish(T, DRAFTED).await.unwrap();
    let run = s
        .start_run(T, "drafted", json!({"ask": "hi", "n": 1}))
        .await
        .unwrap();
    let (state, _) = s.wait_run(T, &run).await.unwrap();
    assert_eq!(state.status, RunStatus::Completed);
    assert_eq!(double.requests().total, 1);
    let draft = state.steps["draft"].output.clone().unwrap();

    // Fork from `shape` with another input: the draft is reused, `shape` runs live.
    let fork = "fork-1";
    let cmd = StartCommand {
        workflow: "drafted".into(),
        version: None,
        input: json!({"ask": "hi", "n": 2}),
        run_id: Some(fork.into()),
        by: Some("ops".into()),
        fork: Some(ForkSpec {
            run: run.clone(),
            from: "shape".into(),
            set: Default::default(),
        }),
        parent: None,
    };
    s.publish_raw(
        &subjects::start(T),
        Some(fork),
        serde_json::to_vec(&cmd).unwrap(),
    )
    .await
    .unwrap();
    let (forked, events) = s.wait_run(T, fork).await.unwrap();
    assert_eq!(forked.status, RunStatus::Completed, "{events:#?}");
    assert_eq!(forked.steps["draft"].output.as_ref(), Some(&draft));
    assert_eq!(
        forked.steps["shape"].output.as_ref().unwrap()["n"],
        json!(2)
    );
    assert_eq!(
        double.requests().total,
        1,
        "the fork did not call the model"
    );
    assert_eq!(forked.forked_from.as_deref(), Some(run.as_str()));
    // The original run is untouched.
    assert_eq!(s.run_state(T, &run).await.unwrap().unwrap(), state);

    // Replay: the same decisions, with no model call.
    let out = aob(&s, &["run", "replay", &run]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("same decisions"), "{stdout}");
    let out = aob(&s, &["run", "replay", fork]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(
        double.requests().total,
        1,
        "the replays did not call the model"
    );

    // A changed condition in a new version makes a different decision: caught.
    s.publish(T, &DRAFTED.replace("> 0", "> 1000"))
        .await
        .unwrap();
    let out = aob(&s, &["run", "replay", &run, "--version", "2"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("DIVERGES") && stdout.contains("step_skipped shape"),
        "{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_rolls_a_failed_run_back_from_the_cli() {
    let s = Stack::start_with(Fns::AllButHttp).await.unwrap();
    s.publish(
        T,
        r#"
name: flaky
steps:
  - {id: a, type: transform, output: 1}
  - id: b
    type: validate
    needs: [a]
    value: "{{ input.ok }}"
    assert: ["value == true"]
"#,
    )
    .await
    .unwrap();
    let run = s.start_run(T, "flaky", json!({"ok": false})).await.unwrap();
    let (state, _) = s.wait_run(T, &run).await.unwrap();
    assert_eq!(state.status, RunStatus::Failed);
    let out = aob(&s, &["run", "rollback", &run, "--to", "nope"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("has no step `nope`"));
    let out = aob(&s, &["run", "rollback", &run, "--to", "b", "--wait"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    // Still fails (its input is the same), but it ran again, in a new generation.
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("rolled back to `b`"), "{stdout}");
    let state = s.run_state(T, &run).await.unwrap().unwrap();
    assert_eq!(state.generation, 1);
    assert_eq!(
        state.steps["a"].attempt(),
        1,
        "the kept step did not run again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_fires_through_the_timer_service_as_an_expiry() {
    let s = Stack::start_with(Fns::AllButHttp).await.unwrap();
    s.publish(
        T,
        r#"
name: expiring
steps:
  - id: review
    type: human
    approvers: {users: [alice]}
    deadline: {after: 1s, action: escalate, to: {users: [boss]}, then: {after: 1s, action: reject}}
"#,
    )
    .await
    .unwrap();
    let run = s.start_run(T, "expiring", json!({})).await.unwrap();
    let (state, events) = s.wait_run(T, &run).await.unwrap();
    assert_eq!(state.status, RunStatus::Failed, "{events:#?}");
    assert_eq!(count(&events, HistoryKind::ApprovalExpired), 2);
    assert_eq!(count(&events, HistoryKind::ApprovalEscalated), 1);
    assert_eq!(count(&events, HistoryKind::ApprovalDecided), 0);
    let why = state.steps["review"].error.clone().unwrap().message;
    assert!(
        why.contains("expired") && why.contains("the deadline rejects it"),
        "{why}"
    );
}

const SAGA: &str = r#"
name: saga
on_failure: compensate
steps:
  - {id: book_hotel, type: transform, output: hotel, compensate: {type: transform, output: "cancel {{ compensating.output }}"}}
  - {id: book_car, type: transform, output: car, compensate: {type: transform, output: "cancel {{ compensating.output }}"}}
  - {id: book_flight, type: transform, needs: [book_hotel], output: flight, compensate: {type: transform, output: "cancel {{ compensating.output }}"}}
  - id: charge
    type: validate
    needs: [book_flight, book_car]
    value: "{{ input.card }}"
    assert: ["value == 'ok'"]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_saga_compensates_its_branches_latest_first() {
    let s = Stack::start_with(Fns::AllButHttp).await.unwrap();
    s.publish(T, SAGA).await.unwrap();
    let run = s
        .start_run(T, "saga", json!({"card": "declined"}))
        .await
        .unwrap();
    let (state, events) = s.wait_run(T, &run).await.unwrap();
    assert_eq!(state.status, RunStatus::Compensated, "{events:#?}");
    let completed: Vec<String> = events
        .iter()
        .filter(|e| e.kind == HistoryKind::StepCompleted)
        .map(|e| e.step.clone().unwrap())
        .collect();
    let compensated: Vec<String> = events
        .iter()
        .filter(|e| e.kind == HistoryKind::StepCompensated)
        .map(|e| e.step.clone().unwrap())
        .collect();
    let mut reversed = completed.clone();
    reversed.reverse();
    assert_eq!(compensated, reversed, "latest completion first");
    assert_eq!(compensated.len(), 3);
    let undo = events
        .iter()
        .find(|e| e.kind == HistoryKind::StepCompensated && e.step.as_deref() == Some("book_car"))
        .unwrap();
    assert_eq!(undo.data.as_ref().unwrap()["output"], json!("cancel car"));
    for id in ["book_hotel", "book_car", "book_flight"] {
        assert_eq!(state.steps[id].status(), StepStatus::Compensated);
    }
}

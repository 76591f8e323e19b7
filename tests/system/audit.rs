//! The audit trail: every decision of a run becomes a DecisionRecord on AOB_AUDIT.

use std::collections::{BTreeMap, BTreeSet};

use aob_model::audit::{AuditKind, DecisionRecord, sha256_hex};
use aob_model::state::RunStatus;
use aob_tests::Stack;
use serde_json::json;

const T: &str = "default";

/// The records of one run, as published.
async fn records_of(s: &Stack, run: &str) -> Vec<DecisionRecord> {
    let all = s
        .messages(aob_streams::AUDIT, &aob_streams::subjects::audit(T))
        .await
        .unwrap();
    all.into_iter()
        .map(|v| serde_json::from_value::<DecisionRecord>(v).unwrap())
        .filter(|r| r.run_id == run)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_history_event_and_every_task_becomes_one_record() {
    let s = Stack::start().await.unwrap();
    let wf = s.publish_example(T, "chain").await.unwrap();
    let run = s.start_run(T, &wf, json!({"name": "Ada"})).await.unwrap();
    let (state, events) = s.wait_run(T, &run).await.unwrap();
    assert_eq!(state.status, RunStatus::Completed);

    let records = records_of(&s, &run).await;
    let ids: BTreeSet<_> = records.iter().map(|r| r.record_id.clone()).collect();
    assert_eq!(ids.len(), records.len(), "record ids are unique");
    // One record per history event (engine) and one per task (function).
    let by_actor: BTreeMap<&str, usize> = records.iter().fold(BTreeMap::new(), |mut m, r| {
        *m.entry(r.actor.as_str()).or_default() += 1;
        m
    });
    assert_eq!(by_actor.get("engine"), Some(&events.len()), "{by_actor:?}");
    assert_eq!(by_actor.get("fn.transform"), Some(&2), "{by_actor:?}");
    assert_eq!(by_actor.get("fn.validate"), Some(&1), "{by_actor:?}");
    for r in &records {
        r.check().unwrap();
        assert_eq!(r.workflow.as_deref(), Some(wf.as_str()));
        assert_eq!(r.workflow_version, Some(1));
    }
    let kinds: BTreeSet<AuditKind> = records.iter().map(|r| r.event_kind).collect();
    for k in [
        AuditKind::RunStarted,
        AuditKind::StepScheduled,
        AuditKind::TaskExecuted,
        AuditKind::StepCompleted,
        AuditKind::RunCompleted,
    ] {
        assert!(kinds.contains(&k), "no {k:?} in {kinds:?}");
    }
    // The function's record holds the rendered input and the output, with their digests.
    let compose = records
        .iter()
        .find(|r| {
            r.event_kind == AuditKind::TaskExecuted && r.step_id.as_deref() == Some("compose")
        })
        .unwrap();
    let input = compose.input_json.as_deref().unwrap();
    assert!(input.contains("Hello, Ada!"), "{input}");
    assert_eq!(
        compose.input_digest.as_deref(),
        Some(sha256_hex(input.as_bytes()).as_str())
    );
    assert_eq!(compose.node_type.as_deref(), Some("transform"));
    assert_eq!(compose.status.as_deref(), Some("COMPLETED"));
    assert!(compose.duration_us.unwrap() >= 0);
    assert!(
        compose
            .output_json
            .as_deref()
            .unwrap()
            .contains("Hello, Ada!")
    );
    assert_eq!(compose.error_class, None, "unused columns stay null");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_start_is_audited_and_an_http_call_is_a_tool_call() {
    let s = Stack::start().await.unwrap();
    let wf = s.publish_example(T, "chain").await.unwrap();
    // Input that fails the schema: a rejection, audited with the workflow named.
    let run = s.start_run(T, &wf, json!({"name": 5})).await.unwrap();
    let records = loop {
        let r = records_of(&s, &run).await;
        if !r.is_empty() {
            break r;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].event_kind, AuditKind::RunRejected);
    assert_eq!(records[0].workflow.as_deref(), Some(wf.as_str()));
    assert!(records[0].reason.as_deref().unwrap().contains("input"));

    let (addr, _counters) = aob_tests::endpoints::serve().await;
    s.publish(
        T,
        &format!("name: call\nsteps:\n  - {{id: get, type: http, url: 'http://{addr}/missing'}}\n"),
    )
    .await
    .unwrap();
    let run = s.start_run(T, "call", json!({})).await.unwrap();
    let (state, _) = s.wait_run(T, &run).await.unwrap();
    assert_eq!(state.status, RunStatus::Failed);
    let records = records_of(&s, &run).await;
    let call = records.iter().find(|r| r.actor == "fn.http").unwrap();
    assert_eq!(call.event_kind, AuditKind::ToolCall);
    assert_eq!(call.error_class.as_deref(), Some("terminal"));
    assert!(call.error_message.as_deref().unwrap().contains("404"));
}

//! Every control-flow feature end to end, through the examples where one exists.

use std::sync::atomic::Ordering;

use aob_model::state::{RunStatus, StepStatus};
use aob_model::wire::{HistoryKind, Signal};
use aob_tests::{Stack, endpoints};
use serde_json::json;

const T: &str = "default";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_chain_example() {
    let s = Stack::start().await.unwrap();
    let wf = s.publish_example(T, "chain").await.unwrap();
    let run = s.start_run(T, &wf, json!({"name": "Ada"})).await.unwrap();
    let (state, events) = s.wait_run(T, &run).await.unwrap();
    assert_eq!(state.status, RunStatus::Completed, "{events:#?}");
    assert_eq!(
        state.steps["shape"].output,
        Some(json!({"greeting": "Hello, Ada!", "checked": true}))
    );
    let order: Vec<_> = events
        .iter()
        .filter(|e| e.kind == HistoryKind::StepCompleted)
        .filter_map(|e| e.step.clone())
        .collect();
    assert_eq!(order, ["compose", "check", "shape"]);
    // History is gap-free and ordered.
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e.seq, i as u64 + 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fan_out_join_with_a_branch_example() {
    let s = Stack::start().await.unwrap();
    let wf = s.publish_example(T, "fanout").await.unwrap();
    let run = s.start_run(T, &wf, json!({"total": 120})).await.unwrap();
    let (state, events) = s.wait_run(T, &run).await.unwrap();
    assert_eq!(state.status, RunStatus::Completed, "{events:#?}");
    assert_eq!(state.steps["express"].status(), StepStatus::Completed);
    assert_eq!(state.steps["standard"].status(), StepStatus::Skipped);
    assert_eq!(
        state.steps["notify"].output,
        Some(json!({"message": "shipping by courier"}))
    );
    assert_eq!(
        state.steps["audit"].output,
        Some(json!({"branches": ["COMPLETED", "SKIPPED"]}))
    );
    // The other branch.
    let run = s.start_run(T, &wf, json!({"total": 20})).await.unwrap();
    let (state, _) = s.wait_run(T, &run).await.unwrap();
    assert_eq!(
        state.steps["notify"].output,
        Some(json!({"message": "shipping by post"}))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn for_each_example_keeps_order() {
    let s = Stack::start().await.unwrap();
    let wf = s.publish_example(T, "foreach").await.unwrap();
    let run = s
        .start_run(T, &wf, json!({"numbers": [1, 2, 3, 4, 5]}))
        .await
        .unwrap();
    let (state, events) = s.wait_run(T, &run).await.unwrap();
    assert_eq!(state.status, RunStatus::Completed);
    assert_eq!(state.steps["square"].output, Some(json!([1, 4, 9, 16, 25])));
    assert_eq!(state.steps["total"].output, Some(json!(55)));
    // Every item reports its completion with its output; the step's own event comes last.
    let square: Vec<_> = events
        .iter()
        .filter(|e| e.kind == HistoryKind::StepCompleted && e.step.as_deref() == Some("square"))
        .collect();
    assert_eq!(square.len(), 6, "{square:#?}");
    let mut items: Vec<(u32, serde_json::Value)> = square[..5]
        .iter()
        .map(|e| (e.item.unwrap(), e.data.as_ref().unwrap()["output"].clone()))
        .collect();
    items.sort_by_key(|(i, _)| *i);
    assert_eq!(
        items,
        [
            (0, json!(1)),
            (1, json!(4)),
            (2, json!(9)),
            (3, json!(16)),
            (4, json!(25))
        ]
    );
    assert_eq!(square[5].item, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn for_each_never_exceeds_its_cap() {
    let s = Stack::start().await.unwrap();
    let (addr, counters) = endpoints::serve().await;
    s.publish(
        T,
        &format!("name: capped\nsteps:\n  - id: call\n    type: http\n    url: 'http://{addr}/slow/150'\n    for_each: {{items: 'input.xs', concurrency: 3}}\n"),
    )
    .await
    .unwrap();
    let run = s
        .start_run(T, "capped", json!({"xs": [1, 2, 3, 4, 5, 6, 7, 8, 9]}))
        .await
        .unwrap();
    let (state, _) = s.wait_run(T, &run).await.unwrap();
    assert_eq!(state.status, RunStatus::Completed);
    assert_eq!(counters.hits("/slow"), 9);
    let max = counters.max_in_flight.load(Ordering::SeqCst);
    assert!(max <= 3, "cap of 3 exceeded: {max} at once");
    assert!(max >= 2, "items should overlap up to the cap, saw {max}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loop_until_example() {
    let s = Stack::start().await.unwrap();
    let wf = s.publish_example(T, "loop").await.unwrap();
    let run = s
        .start_run(T, &wf, json!({"start": 3, "target": 40}))
        .await
        .unwrap();
    let (state, events) = s.wait_run(T, &run).await.unwrap();
    assert_eq!(state.status, RunStatus::Completed, "{events:#?}");
    // 6, 12, 24, 48: four iterations.
    assert_eq!(
        state.steps["double"].output,
        Some(json!({"iteration": 3, "value": 48}))
    );
    assert_eq!(
        events
            .iter()
            .filter(|e| e.kind == HistoryKind::LoopIteration)
            .count(),
        3
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_then_succeed_example() {
    let s = Stack::start().await.unwrap();
    let (addr, counters) = endpoints::serve().await;
    let wf = s.publish_example(T, "retry").await.unwrap();
    let run = s
        .start_run(T, &wf, json!({"url": format!("http://{addr}/flaky/quote")}))
        .await
        .unwrap();
    let (state, events) = s.wait_run(T, &run).await.unwrap();
    assert_eq!(state.status, RunStatus::Completed, "{events:#?}");
    assert_eq!(counters.hits("/flaky/quote"), 3);
    let retries: Vec<_> = events
        .iter()
        .filter(|e| e.kind == HistoryKind::StepRetrying)
        .collect();
    assert_eq!(retries.len(), 2, "each failed attempt is a history event");
    assert_eq!(retries[0].attempt, Some(1));
    assert_eq!(retries[1].attempt, Some(2));
    assert_eq!(state.steps["fetch"].attempt(), 3);
    assert_eq!(
        state.steps["summarize"].output.as_ref().unwrap()["status"],
        json!(200)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_4xx_is_terminal_and_step_timeouts_retry() {
    let s = Stack::start().await.unwrap();
    let (addr, counters) = endpoints::serve().await;
    s.publish(
        T,
        &format!(
            "name: failing\nsteps:\n  - {{id: nf, type: http, url: 'http://{addr}/missing', retry: {{max_attempts: 3, backoff: {{initial: 10ms}}}}}}\n  - {{id: slow, type: http, url: 'http://{addr}/slow/3000', timeout: 300ms, retry: {{max_attempts: 2, backoff: {{initial: 10ms}}}}}}\n"
        ),
    )
    .await
    .unwrap();
    let run = s.start_run(T, "failing", json!({})).await.unwrap();
    let (state, events) = s.wait_run(T, &run).await.unwrap();
    assert_eq!(state.status, RunStatus::Failed);
    assert_eq!(state.steps["nf"].attempt(), 1, "404 is not retried");
    assert!(
        state.steps["nf"]
            .error
            .as_ref()
            .unwrap()
            .message
            .contains("404")
    );
    assert_eq!(state.steps["slow"].attempt(), 2, "a timeout is retried");
    assert!(
        state.steps["slow"]
            .error
            .as_ref()
            .unwrap()
            .message
            .contains("timed out"),
        "{events:#?}"
    );
    assert!(counters.hits("/slow") >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_is_a_durable_timer_that_holds_no_message() {
    let s = Stack::start().await.unwrap();
    s.publish(T, "name: pause\nsteps:\n  - {id: nap, type: wait, duration: 1500ms}\n  - {id: after, type: transform, needs: [nap], output: done}\n")
        .await
        .unwrap();
    let run = s.start_run(T, "pause", json!({})).await.unwrap();
    s.history_until(
        T,
        &run,
        |e| e.kind == HistoryKind::StepWaiting,
        std::time::Duration::from_secs(30),
    )
    .await
    .unwrap();
    // While it waits: the step is WAITING, the task was acked, and a timer exists.
    let state = s.run_state(T, &run).await.unwrap().unwrap();
    assert_eq!(state.steps["nap"].status(), StepStatus::Waiting);
    let stream = s.js.get_stream(aob_streams::TASKS).await.unwrap();
    let mut c = stream
        .get_consumer::<async_nats::jetstream::consumer::pull::Config>("fn-wait")
        .await
        .unwrap();
    assert_eq!(
        c.info().await.unwrap().num_ack_pending,
        0,
        "no task held while waiting"
    );
    let kv = s.js.get_key_value(aob_streams::TIMERS).await.unwrap();
    assert!(
        kv.get(format!("{T}.{run}.nap-i-1-l-1-a1.wait"))
            .await
            .unwrap()
            .is_some()
    );
    let (state, _) = s.wait_run(T, &run).await.unwrap();
    assert_eq!(state.status, RunStatus::Completed);
    assert_eq!(state.steps["after"].output, Some(json!("done")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_a_run() {
    let s = Stack::start().await.unwrap();
    s.publish(T, "name: long\nsteps:\n  - {id: nap, type: wait, duration: 1h}\n  - {id: after, type: transform, needs: [nap], output: never}\n")
        .await
        .unwrap();
    let run = s.start_run(T, "long", json!({})).await.unwrap();
    s.history_until(
        T,
        &run,
        |e| e.kind == HistoryKind::StepWaiting,
        std::time::Duration::from_secs(30),
    )
    .await
    .unwrap();
    let cancel = Signal::Cancel {
        reason: Some("test".into()),
        by: Some("tester".into()),
        compensate: false,
    };
    s.publish_raw(
        &aob_streams::subjects::signal(T, &run),
        Some("c1"),
        serde_json::to_vec(&cancel).unwrap(),
    )
    .await
    .unwrap();
    let (state, events) = s.wait_run(T, &run).await.unwrap();
    assert_eq!(state.status, RunStatus::Cancelled);
    assert_eq!(state.steps["after"].status(), StepStatus::Skipped);
    assert!(
        events.iter().any(|e| e.kind == HistoryKind::Abort),
        "running steps are told"
    );
    assert!(state.error.unwrap().contains("tester"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_timeout_fails_the_run() {
    let s = Stack::start().await.unwrap();
    s.publish(
        T,
        "name: bounded\ntimeout: 1s\nsteps:\n  - {id: nap, type: wait, duration: 1h}\n",
    )
    .await
    .unwrap();
    let run = s.start_run(T, "bounded", json!({})).await.unwrap();
    let (state, _) = s.wait_run(T, &run).await.unwrap();
    assert_eq!(state.status, RunStatus::Failed);
    assert!(state.error.unwrap().contains("run timed out"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_input_and_output_travel_by_reference() {
    let s = Stack::start().await.unwrap();
    let (addr, _) = endpoints::serve().await;
    s.publish(
        T,
        &format!(
            "name: big\nsteps:\n  - {{id: fetch, type: http, url: 'http://{addr}/big/5000000'}}\n  - id: measure\n    type: transform\n    needs: [fetch]\n    output:\n      out_len: '{{{{ steps.fetch.output.body.data | length }}}}'\n      in_len: '{{{{ input.blob | length }}}}'\n"
        ),
    )
    .await
    .unwrap();
    let blob = "y".repeat(2 * 1024 * 1024);
    let run = s.start_run(T, "big", json!({"blob": blob})).await.unwrap();
    let (state, events) = s.wait_run(T, &run).await.unwrap();
    assert_eq!(state.status, RunStatus::Completed, "{events:#?}");
    assert_eq!(
        state.steps["measure"].output,
        Some(json!({"out_len": 5_000_000, "in_len": 2 * 1024 * 1024}))
    );
    // State and messages hold references, not the values.
    assert!(aob_runtime::payload::reference(&state.input).is_some());
    assert!(
        aob_runtime::payload::reference(state.steps["fetch"].output.as_ref().unwrap()).is_some()
    );
    let hydrated = s
        .payloads
        .hydrate(state.steps["fetch"].output.clone().unwrap())
        .await
        .unwrap();
    assert_eq!(hydrated["body"]["data"].as_str().unwrap().len(), 5_000_000);
}

/// The README's Python (nats-py) snippet, as written, against a test server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_python_snippet_starts_a_run_and_follows_it() {
    let s = Stack::start().await.unwrap();
    s.publish_example(T, "fanout").await.unwrap();
    let readme = std::fs::read_to_string(aob_tests::examples_dir().join("../README.md")).unwrap();
    let after = readme.split("With Python").nth(1).unwrap();
    let code = after
        .split("```python\n")
        .nth(1)
        .and_then(|c| c.split("```").next())
        .unwrap()
        .replace("nats://127.0.0.1:4222", &s.server.url());
    let python = aob_tests::audit::venv_bin("python").unwrap();
    let out = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        tokio::process::Command::new(python)
            .args(["-c", &code])
            .output(),
    )
    .await
    .unwrap()
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.first().copied(), Some("1 started  "), "{stdout}");
    assert!(
        lines.iter().any(|l| l.contains("step_completed notify")),
        "{stdout}"
    );
    assert!(lines.last().unwrap().ends_with("completed  "), "{stdout}");
    let (state, _) = s.wait_run(T, "order-42").await.unwrap();
    assert_eq!(state.status, RunStatus::Completed);
}

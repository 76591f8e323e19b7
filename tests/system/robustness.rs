//! Duplicates, garbage, crashes and races.

use std::sync::Arc;
use std::time::Duration;

use aob_engine::Engine;
use aob_engine::store::{Conflict, NatsStore, RunStore, StoreError};
use aob_model::state::RunStatus;
use aob_model::wire::{HandoffReply, HistoryKind, Outcome, StepRef, StepResult, Task};
use aob_streams::subjects;
use aob_tests::{Fns, Stack, binary, endpoints};
use bytes::Bytes;
use serde_json::json;
use tokio::sync::Barrier;

const T: &str = "default";
const ONE_STEP: &str = "name: one\nsteps:\n  - {id: a, type: transform, output: {ok: true}}\n";
/// A chain of five steps, each adding one to the last.
const FIVE: &str = "name: five\nsteps:\n  - {id: s0, type: transform, output: 0}\n  - {id: s1, type: transform, needs: [s0], output: '{{ steps.s0.output + 1 }}'}\n  - {id: s2, type: transform, needs: [s1], output: '{{ steps.s1.output + 1 }}'}\n  - {id: s3, type: transform, needs: [s2], output: '{{ steps.s2.output + 1 }}'}\n  - {id: s4, type: transform, needs: [s3], output: '{{ steps.s3.output + 1 }}'}\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_msg_id_twice_gives_one_run() {
    let s = Stack::start().await.unwrap();
    s.publish(T, ONE_STEP).await.unwrap();
    // No run_id in the body: the run id comes from the Nats-Msg-Id.
    let body = serde_json::to_vec(&json!({"workflow": "one", "input": {}})).unwrap();
    s.publish_raw(&subjects::start(T), Some("order-17"), body.clone())
        .await
        .unwrap();
    s.publish_raw(&subjects::start(T), Some("order-17"), body)
        .await
        .unwrap();
    let (state, _) = s.wait_run(T, "order-17").await.unwrap();
    assert_eq!(state.status, RunStatus::Completed);
    assert_eq!(
        s.count(aob_streams::CMD, &subjects::start(T))
            .await
            .unwrap(),
        1,
        "JetStream dropped the duplicate"
    );
    assert_eq!(
        s.count(
            aob_streams::HISTORY,
            &subjects::history(T, "order-17", "started")
        )
        .await
        .unwrap(),
        1
    );
    // Beyond dedup: a second start naming the same run id is ignored by the engine.
    let again =
        serde_json::to_vec(&json!({"workflow": "one", "input": {}, "run_id": "order-17"})).unwrap();
    s.publish_raw(&subjects::start(T), Some("another-id"), again)
        .await
        .unwrap();
    s.publish(
        T,
        "name: one\nversion: 9\nsteps:\n  - {id: a, type: transform, output: 1}\n",
    )
    .await
    .unwrap();
    let marker = s.start_run(T, "one", json!({})).await.unwrap();
    s.wait_run(T, &marker).await.unwrap();
    assert_eq!(
        s.count(
            aob_streams::HISTORY,
            &subjects::history(T, "order-17", "started")
        )
        .await
        .unwrap(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_starts_are_rejected_on_the_history_subject() {
    let s = Stack::start().await.unwrap();
    s.publish(T, "name: typed\ninput: {type: object, required: [n], properties: {n: {type: integer}}}\nsteps:\n  - {id: a, type: transform, output: 1}\n")
        .await
        .unwrap();
    let cases = [
        (
            "unknown-wf",
            json!({"workflow": "nope", "run_id": "unknown-wf"}),
            "not found",
        ),
        (
            "bad-input",
            json!({"workflow": "typed", "run_id": "bad-input", "input": {"n": "three"}}),
            "input does not match",
        ),
        (
            "bad-field",
            json!({"workflow": "typed", "run_id": "bad-field", "inputs": {}}),
            "unknown field",
        ),
    ];
    for (run, body, _) in &cases {
        s.publish_raw(
            &subjects::start(T),
            Some(run),
            serde_json::to_vec(body).unwrap(),
        )
        .await
        .unwrap();
    }
    s.publish_raw(
        &subjects::start(T),
        Some("not-json"),
        b"{{{ garbage".to_vec(),
    )
    .await
    .unwrap();
    for (run, _, needle) in &cases {
        let events = s
            .history_until(T, run, |e| e.kind.is_terminal(), Duration::from_secs(30))
            .await
            .unwrap();
        let last = events.last().unwrap();
        assert_eq!(last.kind, HistoryKind::Rejected);
        assert!(
            last.message.as_ref().unwrap().contains(needle),
            "{run}: {:?}",
            last.message
        );
        assert!(
            s.run_state(T, run).await.unwrap().is_none(),
            "a rejected start creates no run"
        );
    }
    // Garbage with only a message id: rejected under that id.
    let events = s
        .history_until(
            T,
            "not-json",
            |e| e.kind.is_terminal(),
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    assert!(
        events[0]
            .message
            .as_ref()
            .unwrap()
            .contains("not a start command")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_every_consumed_subject_is_dead_lettered_and_work_goes_on() {
    let s = Stack::start().await.unwrap();
    s.publish(T, ONE_STEP).await.unwrap();
    let mut subjects_hit = vec![
        subjects::start(T),
        subjects::signal(T, "some-run"),
        subjects::result(T, "some-run"),
    ];
    for t in aob_model::nodes::names() {
        if !aob_model::nodes::ENGINE_TYPES.contains(&t) {
            subjects_hit.push(subjects::task(T, t));
        }
    }
    let garbage: Vec<Vec<u8>> = vec![
        b"\x00\xff\xfe not json".to_vec(),
        b"{\"task\": 1}".to_vec(),
        vec![b'x'; 900 * 1024],
    ];
    let mut n = 0;
    for subject in &subjects_hit {
        for (i, g) in garbage.iter().enumerate() {
            s.publish_raw(subject, Some(&format!("g{n}-{i}")), g.clone())
                .await
                .unwrap();
            n += 1;
        }
    }
    // A real run after the garbage still completes: no consumer is blocked.
    let run = s.start_run(T, "one", json!({})).await.unwrap();
    let (state, _) = s.wait_run(T, &run).await.unwrap();
    assert_eq!(state.status, RunStatus::Completed);
    // Result handoffs are core requests (the engine is serving: the run completed): garbage asked for gets its reason back...
    let handoff = subjects::handoff(T, "some-run");
    for g in &garbage {
        let reply = s
            .client
            .request(handoff.clone(), g.clone().into())
            .await
            .unwrap();
        let reply: HandoffReply = serde_json::from_slice(&reply.payload).unwrap();
        assert!(!reply.settled);
        let reason = reply.reason.unwrap();
        assert!(
            reason.contains("not a step result") || reason.contains("larger than the limit"),
            "{reason}"
        );
    }
    // ...and garbage published without a reply subject is dead-lettered.
    for g in &garbage {
        s.client
            .publish(handoff.clone(), g.clone().into())
            .await
            .unwrap();
        n += 1;
    }
    s.client.flush().await.unwrap();
    subjects_hit.push(handoff);
    // Every garbage message is recorded with its reason.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let letters = s
            .messages(aob_streams::DLQ, &subjects::dlq_of_tenant(T))
            .await
            .unwrap();
        if letters.len() >= n {
            assert_eq!(letters.len(), n, "one dead letter per bad message");
            for l in &letters {
                assert!(!l["reason"].as_str().unwrap().is_empty());
                assert!(subjects_hit.contains(&l["subject"].as_str().unwrap().to_string()));
            }
            assert!(letters.iter().any(|l| {
                l["reason"]
                    .as_str()
                    .unwrap()
                    .contains("larger than the limit")
            }));
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} of {n} dead letters",
            letters.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Nothing is left unacked or waiting for redelivery.
    for (stream, consumer) in [
        (aob_streams::CMD, "engine-cmd"),
        (aob_streams::RESULTS, "engine-results"),
        (aob_streams::TASKS, "fn-http"),
    ] {
        let st = s.js.get_stream(stream).await.unwrap();
        let mut c = st
            .get_consumer::<async_nats::jetstream::consumer::pull::Config>(consumer)
            .await
            .unwrap();
        let info = c.info().await.unwrap();
        assert_eq!(info.num_ack_pending, 0, "{consumer} holds messages");
    }
}

/// Kill the `http` function process mid-step: the task is redelivered to a new process and
/// the run completes; the endpoint applies the effect once (by the idempotency key).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_function_killed_mid_step_loses_nothing_and_applies_once() {
    let s = Stack::start_with(Fns::AllButHttp).await.unwrap();
    let (addr, counters) = endpoints::serve().await;
    s.publish(T, &format!("name: held\nsteps:\n  - {{id: call, type: http, url: 'http://{addr}/hold'}}\n  - {{id: after, type: transform, needs: [call], output: ok}}\n"))
        .await
        .unwrap();
    let spawn = || {
        std::process::Command::new(binary("aob-http").unwrap())
            .env("NATS_URL", s.server.url())
            .env("AOB_PAYLOAD_URL", &s.payload_url)
            .env("RUST_LOG", "warn")
            .spawn()
            .unwrap()
    };
    let mut first = spawn();
    let run = s.start_run(T, "held", json!({})).await.unwrap();
    tokio::time::timeout(Duration::from_secs(30), counters.arrived.notified())
        .await
        .expect("first attempt reached the endpoint");
    first.kill().unwrap();
    first.wait().unwrap();
    let mut second = spawn();
    tokio::time::timeout(Duration::from_secs(30), counters.arrived.notified())
        .await
        .expect("the task was redelivered");
    counters.release_all();
    let (state, events) = s.wait_run(T, &run).await.unwrap();
    second.kill().unwrap();
    let _ = second.wait();
    assert_eq!(state.status, RunStatus::Completed, "{events:#?}");
    assert_eq!(
        counters.hits("/hold:no-key"),
        0,
        "every request carried a key"
    );
    assert_eq!(counters.hits("/hold"), 2, "delivered twice");
    // Both deliveries of the first attempt carry that attempt's key, so the endpoint can
    // recognise the second as a repeat.
    let first_attempt = StepRef {
        step: "call".into(),
        item: None,
        iteration: None,
        attempt: 1,
        generation: 0,
    };
    let expected = format!("{run}.{}", first_attempt.token());
    assert_eq!(counters.hold_keys(), [expected.clone(), expected]);
    assert_eq!(
        counters.applied.lock().unwrap().len(),
        1,
        "effect applied once"
    );
    assert_eq!(
        events
            .iter()
            .filter(|e| e.kind == HistoryKind::StepCompleted && e.step.as_deref() == Some("call"))
            .count(),
        1
    );
}

/// A run store that makes two writers read the same revision before either writes.
struct Racing {
    inner: NatsStore,
    barrier: Barrier,
    armed: std::sync::atomic::AtomicBool,
    /// Told once the armed read is done.
    read: tokio::sync::Notify,
}

impl RunStore for Racing {
    async fn get(&self, key: &str) -> Result<Option<(Bytes, u64)>, StoreError> {
        let r = self.inner.get(key).await;
        if self.armed.load(std::sync::atomic::Ordering::SeqCst) {
            self.read.notify_one();
            self.barrier.wait().await;
        }
        r
    }
    async fn create(&self, key: &str, value: Bytes) -> Result<Result<u64, Conflict>, StoreError> {
        self.inner.create(key, value).await
    }
    async fn update(
        &self,
        key: &str,
        value: Bytes,
        revision: u64,
    ) -> Result<Result<u64, Conflict>, StoreError> {
        self.armed.store(false, std::sync::atomic::Ordering::SeqCst);
        self.inner.update(key, value, revision).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_results_racing_on_a_join_fire_it_once() {
    let s = Stack::bare().await.unwrap();
    // `c` needs only `a`: the engine that loses the race sends c's task before its write
    // fails, then again after re-applying; the second copy is a duplicate.
    s.publish(T, "name: join\nsteps:\n  - {id: a, type: wait, duration: 1h}\n  - {id: b, type: wait, duration: 1h}\n  - {id: j, type: transform, needs: [a, b], output: joined}\n  - {id: c, type: transform, needs: [a], output: after-a}\n")
        .await
        .unwrap();
    let kv = s.js.get_key_value(aob_streams::RUNS).await.unwrap();
    let racing = Racing {
        inner: NatsStore(kv.clone()),
        barrier: Barrier::new(2),
        armed: false.into(),
        read: tokio::sync::Notify::new(),
    };
    let e1 = Arc::new(
        Engine::with_store(
            s.js.clone(),
            racing,
            s.payloads.clone(),
            aob_engine::Config::default(),
        )
        .await
        .unwrap(),
    );
    let e2 = s.engine().await.unwrap();
    // Start the run through e2 (no functions run: the tasks just sit in the stream); e1 has
    // not seen the run, so it reads it from the store and waits at the barrier.
    let run = s.start_run(T, "join", json!({})).await.unwrap();
    let cmd = aob_runtime::nats::bind(&s.js, aob_streams::CMD, aob_streams::ENGINE_CMD)
        .await
        .unwrap();
    let mut batch = cmd.fetch().max_messages(1).messages().await.unwrap();
    let msg = futures::StreamExt::next(&mut batch).await.unwrap().unwrap();
    e2.on_message(msg).await;
    assert!(s.run_state(T, &run).await.unwrap().is_some());
    // Both parents' results arrive together; each engine handles one, racing.
    for step in ["a", "b"] {
        let r = StepResult {
            tenant: T.into(),
            run_id: run.clone(),
            at: StepRef {
                step: step.into(),
                item: None,
                iteration: None,
                attempt: 1,
                generation: 0,
            },
            outcome: Outcome::Completed {
                output: json!(step),
            },
            duration_ms: 0,
        };
        s.publish_raw(
            &subjects::result(T, &run),
            None,
            serde_json::to_vec(&r).unwrap(),
        )
        .await
        .unwrap();
    }
    let res = aob_runtime::nats::bind(&s.js, aob_streams::RESULTS, aob_streams::ENGINE_RESULTS)
        .await
        .unwrap();
    let mut batch = res.fetch().max_messages(2).messages().await.unwrap();
    let m1 = futures::StreamExt::next(&mut batch).await.unwrap().unwrap();
    let m2 = futures::StreamExt::next(&mut batch).await.unwrap().unwrap();
    e1.store()
        .armed
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let racer = {
        let e1 = e1.clone();
        tokio::spawn(async move { e1.on_message(m1).await })
    };
    // Once e1 has read, e2 applies the other result and writes; then e1, holding the older
    // revision, goes on.
    e1.store().read.notified().await;
    e2.on_message(m2).await;
    e1.store().barrier.wait().await;
    racer.await.unwrap();
    assert!(
        e1.metrics
            .cas_conflicts
            .load(std::sync::atomic::Ordering::SeqCst)
            >= 1,
        "the stale write lost and was retried"
    );
    let state = s.run_state(T, &run).await.unwrap().unwrap();
    assert_eq!(
        state.steps["a"].status(),
        aob_model::state::StepStatus::Completed
    );
    assert_eq!(
        state.steps["b"].status(),
        aob_model::state::StepStatus::Completed
    );
    assert_eq!(
        state.steps["j"].status(),
        aob_model::state::StepStatus::Running
    );
    assert_eq!(
        state.steps["c"].status(),
        aob_model::state::StepStatus::Running
    );
    assert_eq!(
        s.count(aob_streams::TASKS, &subjects::task(T, "transform"))
            .await
            .unwrap(),
        2,
        "the join fired once, and c's task sent before the lost write was not repeated"
    );
}

/// Tasks go out while their run's state is being written, so a result can reach the engine
/// before the state that started its attempt. Such a result is held, not dropped. Here it
/// is published before its run exists, and no function runs: only the held result can
/// finish the run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_ahead_of_its_run_is_held_until_the_run_catches_up() {
    let (s, engine) = with_engine(ONE_STEP).await.unwrap();
    let run = "early-1";
    let r = StepResult {
        tenant: T.into(),
        run_id: run.into(),
        at: StepRef {
            step: "a".into(),
            item: None,
            iteration: None,
            attempt: 1,
            generation: 0,
        },
        outcome: Outcome::Completed {
            output: json!("held"),
        },
        duration_ms: 0,
    };
    // Handed over as a function does: the engine cannot apply it yet and says so...
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let body: Bytes = serde_json::to_vec(&r).unwrap().into();
    let reply = loop {
        // Until the engine has subscribed, nobody answers.
        match s
            .client
            .request(subjects::handoff(T, run), body.clone())
            .await
        {
            Ok(reply) => break reply,
            Err(e) => assert!(tokio::time::Instant::now() < deadline, "{e}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let reply: HandoffReply = serde_json::from_slice(&reply.payload).unwrap();
    assert!(!reply.settled, "a result ahead of its run was settled");
    assert!(reply.reason.unwrap().contains("ahead"));
    // ...so the function's transport publishes it to AOB_RESULTS, where it is held.
    aob_runtime::nats::deliver_result(&s.js, &r, Some(Duration::from_secs(2)))
        .await
        .unwrap();
    let held = || {
        engine
            .metrics
            .held
            .load(std::sync::atomic::Ordering::SeqCst)
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while held() == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the early result was not held"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let body = json!({"workflow": "one", "input": {}, "run_id": run});
    s.publish_raw(
        &subjects::start(T),
        Some(run),
        serde_json::to_vec(&body).unwrap(),
    )
    .await
    .unwrap();
    let (state, _) = s.wait_run(T, run).await.unwrap();
    assert_eq!(state.status, RunStatus::Completed);
    assert_eq!(
        state.steps["a"].output,
        Some(json!("held")),
        "the held result finished the step"
    );
    assert_eq!(
        engine
            .metrics
            .dead_letters
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
}

/// The engine applies a result from the copy it reads as the function publishes it; the
/// copy `AOB_RESULTS` stores follows and is acknowledged as a duplicate, not applied twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_are_applied_as_published_and_their_stored_copies_acked() {
    let (mut s, engine) = with_engine(FIVE).await.unwrap();
    // Results published to AOB_RESULTS, not handed over.
    let cfg = aob_runtime::nats::ServeConfig {
        handoff: None,
        ..Default::default()
    };
    s.spawn_functions_with(Fns::AllButHttp, cfg).await.unwrap();
    run_five(&s).await.unwrap();
    let metric = |m: &std::sync::atomic::AtomicU64| m.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        metric(&engine.metrics.early) >= 1,
        "no result was applied from its published copy"
    );
    assert_eq!(metric(&engine.metrics.dead_letters), 0);
    // Every stored copy is acknowledged: nothing is left for the engine's consumer.
    let mut consumer =
        aob_runtime::nats::bind(&s.js, aob_streams::RESULTS, aob_streams::ENGINE_RESULTS)
            .await
            .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let info = consumer.info().await.unwrap();
        if info.num_pending == 0 && info.num_ack_pending == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "stored results left unacknowledged: {} pending, {} unacked",
            info.num_pending,
            info.num_ack_pending
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Functions hand their results to the engine, which answers once the run's stored state
/// holds them: no result is stored in `AOB_RESULTS` on the way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_are_handed_to_the_engine_and_never_stored() {
    let (mut s, engine) = with_engine(FIVE).await.unwrap();
    s.spawn_functions(Fns::AllButHttp).await.unwrap();
    let stored = async || {
        let mut st = s.js.get_stream(aob_streams::RESULTS).await.unwrap();
        st.info().await.unwrap().state.last_sequence
    };
    let before = stored().await;
    run_five(&s).await.unwrap();
    let metric = |m: &std::sync::atomic::AtomicU64| m.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(metric(&engine.metrics.handoffs), 5, "results handed over");
    assert_eq!(metric(&engine.metrics.early), 0);
    assert_eq!(stored().await, before, "a result was stored in AOB_RESULTS");
}

/// With no engine to take it, a function's result is published to `AOB_RESULTS`, where an
/// engine finds it later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_engine_a_result_is_published_to_its_stream() {
    let mut s = Stack::bare().await.unwrap();
    s.spawn_functions(Fns::AllButHttp).await.unwrap();
    let run = "no-engine-1";
    let task = Task {
        tenant: T.into(),
        run_id: run.into(),
        workflow: "one".into(),
        version: 1,
        node_type: "transform".into(),
        at: StepRef {
            step: "a".into(),
            item: None,
            iteration: None,
            attempt: 1,
            generation: 0,
        },
        config: json!({"output": "kept"}),
        context: json!({}),
        deadline_ms: None,
    };
    s.publish_raw(
        &subjects::task(T, "transform"),
        Some("task.no-engine-1"),
        serde_json::to_vec(&task).unwrap(),
    )
    .await
    .unwrap();
    let stream = s.js.get_stream(aob_streams::RESULTS).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let stored = loop {
        if let Ok(m) = stream
            .get_last_raw_message_by_subject(&subjects::result(T, run))
            .await
        {
            break m;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the result was not published to AOB_RESULTS"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let r: StepResult = serde_json::from_slice(&stored.payload).unwrap();
    assert_eq!(
        r.outcome,
        Outcome::Completed {
            output: json!("kept")
        }
    );
}

/// Runs [`FIVE`] to completion and checks that each result was applied once.
async fn run_five(s: &Stack) -> anyhow::Result<()> {
    let run = s.start_run(T, "five", json!({})).await?;
    let (state, events) = s.wait_run(T, &run).await?;
    assert_eq!(state.status, RunStatus::Completed);
    assert_eq!(state.steps["s4"].output, Some(json!(4)));
    let completed = events
        .iter()
        .filter(|e| e.kind == HistoryKind::StepCompleted)
        .count();
    assert_eq!(completed, 5, "each result applied once");
    Ok(())
}

/// A stack with `workflow` published and an engine running, and that engine (for its
/// metrics); no functions yet.
async fn with_engine(workflow: &str) -> anyhow::Result<(Stack, Arc<Engine>)> {
    let mut s = Stack::bare().await?;
    s.publish(T, workflow).await?;
    let engine = s.engine().await?;
    s.spawn_engine(engine.clone());
    Ok((s, engine))
}

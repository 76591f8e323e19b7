//! The engine core under time, restarts and outages: effects are published once, timers
//! end with what they guard, nothing the engine needs is dropped.

use std::time::Duration;

use aob_model::audit::{AuditKind, DecisionRecord};
use aob_model::state::RunStatus;
use aob_model::wire::{HistoryKind, Outcome, Signal, StepRef, StepResult, Task, TimerKind};
use aob_runtime::timers::Timers;
use aob_streams::{Topology, subjects};
use aob_tests::{Fns, Stack, test_topology};
use futures::StreamExt;
use serde_json::json;

const T: &str = "default";
const ONE_STEP: &str = "name: one\nsteps:\n  - {id: a, type: transform, output: {ok: true}}\n";

/// The test topology with a duplicate window of two seconds, so a test can outlive it.
fn short_window() -> Topology {
    Topology {
        duplicate_window: Duration::from_secs(2),
        ..test_topology()
    }
}

/// Waits out the streams' duplicate window. What is tested here is what happens once the
/// server no longer drops a repeated message id, which only the passing of time brings.
async fn outlive_the_duplicate_window(t: &Topology) {
    tokio::time::sleep(t.duplicate_window + Duration::from_millis(500)).await;
}

/// Publishes a signal to a run as AOB would: timer signals on the internal subject.
async fn signal(s: &Stack, run: &str, id: &str, signal: &Signal) -> anyhow::Result<()> {
    let subject = match signal {
        Signal::Timer { .. } => subjects::internal_signal(T, run),
        _ => subjects::signal(T, run),
    };
    s.publish_raw(&subject, Some(id), serde_json::to_vec(signal)?)
        .await
}

/// History events of one kind for a run, as stored.
async fn history_count(s: &Stack, run: &str, kind: HistoryKind) -> anyhow::Result<usize> {
    s.count(
        aob_streams::HISTORY,
        &subjects::history(T, run, kind.token()),
    )
    .await
}

/// Audit records of one kind for a run, as stored.
async fn audit_count(s: &Stack, run: &str, kind: AuditKind) -> anyhow::Result<usize> {
    Ok(s.messages(aob_streams::AUDIT, &subjects::audit(T))
        .await?
        .into_iter()
        .filter_map(|v| serde_json::from_value::<DecisionRecord>(v).ok())
        .filter(|r| r.run_id == run && r.event_kind == kind)
        .count())
}

/// A run whose steps take milliseconds under an 11-minute timeout: its timer is cancelled
/// when it completes, and a late timer firing or any later signal, after the duplicate
/// window, publishes nothing again: one `completed` event, one `run_completed` record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_run_never_publishes_its_effects_again() {
    let topology = short_window();
    let mut s = Stack::bare_with(topology.clone()).await.unwrap();
    let engine = s.engine().await.unwrap();
    assert_eq!(
        engine.dedup_within(),
        Duration::from_secs(1),
        "the engine reads the duplicate window from the streams"
    );
    s.spawn_engine(engine);
    s.spawn_functions(Fns::AllButHttp).await.unwrap();
    s.publish(
        T,
        "name: quick\ntimeout: 11m\nsteps:\n  - {id: a, type: transform, output: 1, timeout: 10m}\n",
    )
    .await
    .unwrap();
    let run = s.start_run(T, "quick", json!({})).await.unwrap();
    let (state, _) = s.wait_run(T, &run).await.unwrap();
    assert_eq!(state.status, RunStatus::Completed);
    // The run's timers went with it (deleted before the final event was acknowledged).
    s.drained(
        aob_streams::RESULTS,
        aob_streams::ENGINE_RESULTS,
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    let timers = Timers::open(&s.js).await.unwrap();
    let step = StepRef {
        step: "a".into(),
        item: None,
        iteration: None,
        attempt: 1,
        generation: 0,
    };
    for name in [
        "run-timeout".to_string(),
        format!("timeout-{}", step.token()),
    ] {
        assert_eq!(
            timers.get(&format!("{T}.{run}.{name}")).await.unwrap(),
            None,
            "timer {name} outlived its run"
        );
    }
    outlive_the_duplicate_window(&topology).await;
    // What the 11-minute timer would do had it not been cancelled, and a later signal.
    let late = Signal::Timer {
        timer: TimerKind::RunTimeout,
    };
    signal(&s, &run, "late-timer", &late).await.unwrap();
    let cancel = Signal::Cancel {
        reason: Some("too late".into()),
        by: None,
        compensate: false,
    };
    signal(&s, &run, "late-cancel", &cancel).await.unwrap();
    s.commands_handled().await.unwrap();
    assert_eq!(
        history_count(&s, &run, HistoryKind::Completed)
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        history_count(&s, &run, HistoryKind::Cancelled)
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        audit_count(&s, &run, AuditKind::RunCompleted)
            .await
            .unwrap(),
        1
    );
    let state = s.run_state(T, &run).await.unwrap().unwrap();
    assert_eq!(state.status, RunStatus::Completed);
    assert!(state.outbox.is_empty(), "{:?}", state.outbox);
}

/// A task out for longer than the duplicate window is not sent again when a restarted
/// engine loads its run: the function would run it twice at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_out_is_not_sent_again_after_the_duplicate_window() {
    let topology = short_window();
    let mut s = Stack::bare_with(topology.clone()).await.unwrap();
    let engine = s.engine().await.unwrap();
    s.spawn_engine(engine);
    s.publish(T, ONE_STEP).await.unwrap();
    let run = s.start_run(T, "one", json!({})).await.unwrap();
    // The test is the transform function: it takes the task and keeps it running.
    let tasks = aob_runtime::nats::bind(
        &s.js,
        aob_streams::TASKS,
        &aob_streams::function_consumer("transform"),
    )
    .await
    .unwrap();
    let take = |expires: Duration| {
        let tasks = tasks.clone();
        async move {
            let mut batch = tasks
                .fetch()
                .max_messages(1)
                .expires(expires)
                .messages()
                .await
                .unwrap();
            match batch.next().await {
                Some(m) => {
                    let m = m.unwrap();
                    m.ack().await.unwrap();
                    Some(m.subject.to_string())
                }
                None => None,
            }
        }
    };
    assert!(
        take(Duration::from_secs(10)).await.is_some(),
        "the task went out"
    );
    // The engine restarts while the step runs, and the window passes.
    s.stop().await;
    outlive_the_duplicate_window(&topology).await;
    let engine = s.engine().await.unwrap();
    s.spawn_engine(engine);
    // Any event of the run makes the new engine load it: here a stale retry timer.
    let stale = Signal::Timer {
        timer: TimerKind::Retry {
            at: StepRef {
                step: "a".into(),
                item: None,
                iteration: None,
                attempt: 7,
                generation: 0,
            },
        },
    };
    signal(&s, &run, "stale-retry", &stale).await.unwrap();
    s.commands_handled().await.unwrap();
    assert_eq!(
        take(Duration::from_secs(1)).await,
        None,
        "the running step's task was sent again"
    );
    let state = s.run_state(T, &run).await.unwrap().unwrap();
    assert_eq!(state.status, RunStatus::Running);
    assert!(state.outbox.is_empty(), "{:?}", state.outbox);
}

/// One timer service fires at a time, the holder of the lease; when it dies without
/// handing the lease over, another takes over within the lease's lifetime and fires
/// what is due, including what came due while nobody fired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_timer_service_fires_and_another_takes_over_when_it_dies() {
    use aob_runtime::timers::{LEASE_KEY, LeaseConfig, Timer};
    let s = Stack::bare().await.unwrap();
    let timers = Timers::open(&s.js).await.unwrap();
    let kv = s.js.get_key_value(aob_streams::TIMERS).await.unwrap();
    let lease = LeaseConfig {
        ttl: Duration::from_millis(900),
        ..LeaseConfig::default()
    };
    let owner = || {
        let kv = kv.clone();
        async move {
            kv.get(LEASE_KEY)
                .await
                .unwrap()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                .and_then(|v| v["owner"].as_str().map(str::to_string))
        }
    };
    let serve = |token: tokio_util::sync::CancellationToken| {
        let (timers, js, lease) = (timers.clone(), s.js.clone(), lease.clone());
        tokio::spawn(async move { timers.serve_with(js, token, lease).await })
    };
    let first = serve(tokio_util::sync::CancellationToken::new());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let a = loop {
        if let Some(o) = owner().await {
            break o;
        }
        assert!(tokio::time::Instant::now() < deadline, "no lease taken");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let second = serve(tokio_util::sync::CancellationToken::new());
    let fired = |n: usize| {
        let s = &s;
        async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            loop {
                let got = s
                    .count(aob_streams::CMD, "aob.default.cmd.signal.timed")
                    .await
                    .unwrap();
                if got >= n {
                    return got;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "{got} of {n} timers fired"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    let timer = |i: u32| Timer {
        due_ms: aob_runtime::now_ms(),
        subject: "aob.default.cmd.signal.timed".into(),
        msg_id: format!("timed-{i}"),
        body: json!({"signal": "cancel"}),
        traceparent: None,
    };
    timers.set("default.timed.one", &timer(1)).await.unwrap();
    assert_eq!(fired(1).await, 1);
    // Three renewals later the first service still holds the lease: the second waits.
    tokio::time::sleep(lease.ttl).await;
    assert_eq!(owner().await.as_deref(), Some(a.as_str()));
    // The first dies without handing over; a timer comes due meanwhile.
    first.abort();
    let _ = first.await;
    timers.set("default.timed.two", &timer(2)).await.unwrap();
    assert_eq!(fired(2).await, 2);
    let b = owner().await.unwrap();
    assert_ne!(b, a, "the second service took the lease over");
    // The key goes once the publish is acknowledged.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while timers.get("default.timed.two").await.unwrap().is_some() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "a fired timer was not deleted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    second.abort();
}

/// Runs `aob` against the stack's server; returns its exit status and standard output.
fn aob(s: &Stack, args: &[&str]) -> anyhow::Result<(bool, String)> {
    let out = std::process::Command::new(aob_tests::binary("aob")?)
        .args(args)
        .env("NATS_URL", s.server.url())
        .env("AOB_PAYLOAD_URL", &s.payload_url)
        .output()?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    ))
}

/// A start for a workflow not published yet is dead-lettered with its reason;
/// `aob dlq ls` shows it, and once the workflow exists `aob dlq replay` starts the run
/// under the id its client was told (the start's message id), and empties the queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_with_their_reasons_and_replayed() {
    let s = Stack::start_with(Fns::AllButHttp).await.unwrap();
    let run = "replayed-1";
    s.publish_raw(
        &subjects::start(T),
        Some(run),
        serde_json::to_vec(&json!({"workflow": "later", "input": {}})).unwrap(),
    )
    .await
    .unwrap();
    let events = s
        .history_until(
            T,
            run,
            |e| e.kind == HistoryKind::Rejected,
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    assert!(events[0].message.as_deref().unwrap().contains("later"));
    let (ok, listed) = aob(&s, &["dlq", "ls"]).unwrap();
    assert!(ok, "{listed}");
    assert!(listed.contains("aob.default.cmd.start"), "{listed}");
    assert!(listed.contains("workflow `later`"), "{listed}");
    s.publish(
        T,
        "name: later\nsteps:\n  - {id: a, type: transform, output: 1}\n",
    )
    .await
    .unwrap();
    let (ok, replayed) = aob(&s, &["dlq", "replay", "--all"]).unwrap();
    assert!(ok, "{replayed}");
    assert!(replayed.contains("1 replayed"), "{replayed}");
    s.history_until(
        T,
        run,
        |e| e.kind == HistoryKind::Completed,
        Duration::from_secs(30),
    )
    .await
    .unwrap();
    let (ok, listed) = aob(&s, &["dlq", "ls"]).unwrap();
    assert!(ok && listed.contains("no dead letters"), "{listed}");
}

/// A run store that fails every call while an outage lasts.
struct Outage {
    inner: aob_engine::store::NatsStore,
    until: std::sync::Mutex<Option<tokio::time::Instant>>,
    /// Calls refused during the outage.
    refused: std::sync::atomic::AtomicU64,
}

impl Outage {
    fn check(&self) -> Result<(), aob_engine::store::StoreError> {
        let down = self
            .until
            .lock()
            .ok()
            .and_then(|u| *u)
            .is_some_and(|u| tokio::time::Instant::now() < u);
        if down {
            self.refused
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Err(aob_engine::store::StoreError("the store is down".into()));
        }
        Ok(())
    }
}

impl aob_engine::store::RunStore for Outage {
    async fn get(
        &self,
        key: &str,
    ) -> Result<Option<(bytes::Bytes, u64)>, aob_engine::store::StoreError> {
        self.check()?;
        self.inner.get(key).await
    }
    async fn create(
        &self,
        key: &str,
        value: bytes::Bytes,
    ) -> Result<Result<u64, aob_engine::store::Conflict>, aob_engine::store::StoreError> {
        self.check()?;
        self.inner.create(key, value).await
    }
    async fn update(
        &self,
        key: &str,
        value: bytes::Bytes,
        revision: u64,
    ) -> Result<Result<u64, aob_engine::store::Conflict>, aob_engine::store::StoreError> {
        self.check()?;
        self.inner.update(key, value, revision).await
    }
}

/// The run store is down for two minutes while runs are under way and more are started.
/// Nothing is dead-lettered (before, results and starts were given up on after about
/// 100 s of failures and their runs stayed RUNNING); afterwards every run completes,
/// each step once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_minute_store_outage_under_load_loses_nothing() {
    const FIVE: &str = "name: five\nsteps:\n  - {id: s0, type: transform, output: 0}\n  - {id: s1, type: transform, needs: [s0], output: '{{ steps.s0.output + 1 }}'}\n  - {id: s2, type: transform, needs: [s1], output: '{{ steps.s1.output + 1 }}'}\n  - {id: s3, type: transform, needs: [s2], output: '{{ steps.s2.output + 1 }}'}\n  - {id: s4, type: transform, needs: [s3], output: '{{ steps.s3.output + 1 }}'}\n";
    let mut s = Stack::bare().await.unwrap();
    let kv = s.js.get_key_value(aob_streams::RUNS).await.unwrap();
    let store = Outage {
        inner: aob_engine::store::NatsStore(kv),
        until: std::sync::Mutex::new(None),
        refused: std::sync::atomic::AtomicU64::new(0),
    };
    let engine = std::sync::Arc::new(
        aob_engine::Engine::with_store(
            s.js.clone(),
            store,
            s.payloads.clone(),
            aob_engine::Config::default(),
        )
        .await
        .unwrap(),
    );
    s.spawn_engine(engine.clone());
    s.spawn_functions(Fns::AllButHttp).await.unwrap();
    s.publish(T, FIVE).await.unwrap();
    let mut runs = Vec::new();
    for _ in 0..20 {
        runs.push(s.start_run(T, "five", json!({})).await.unwrap());
    }
    // The outage begins while those runs are under way...
    s.history_until(
        T,
        &runs[0],
        |e| e.kind == HistoryKind::StepCompleted,
        Duration::from_secs(30),
    )
    .await
    .unwrap();
    let outage = Duration::from_secs(120);
    *engine.store().until.lock().unwrap() = Some(tokio::time::Instant::now() + outage);
    // ...and more are started during it.
    for _ in 0..20 {
        runs.push(s.start_run(T, "five", json!({})).await.unwrap());
    }
    tokio::time::sleep(outage).await;
    for run in &runs {
        let events = s
            .history_until(T, run, |e| e.kind.is_terminal(), Duration::from_secs(120))
            .await
            .unwrap();
        assert_eq!(
            events.last().map(|e| e.kind),
            Some(HistoryKind::Completed),
            "{run}: {events:#?}"
        );
        let steps = events
            .iter()
            .filter(|e| e.kind == HistoryKind::StepCompleted)
            .count();
        assert_eq!(steps, 5, "{run}: each step completes once");
        assert_eq!(
            history_count(&s, run, HistoryKind::Completed)
                .await
                .unwrap(),
            1
        );
    }
    assert!(
        engine
            .store()
            .refused
            .load(std::sync::atomic::Ordering::Relaxed)
            > 20,
        "the outage was felt"
    );
    assert_eq!(
        s.count(aob_streams::DLQ, "aob.*.dlq.>").await.unwrap(),
        0,
        "nothing was dead-lettered"
    );
}

/// Starts that reuse a live run's id never write into it: one that fails admission is
/// not announced on the run's history, one with another input is reported as a dead
/// letter naming the run, and a repeat of the run's own start is dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_reusing_a_live_runs_id_never_writes_into_it() {
    let s = Stack::start_with(Fns::AllButHttp).await.unwrap();
    s.publish(
        T,
        "name: guarded\ninput: {type: object, required: [name]}\nsteps:\n  - {id: w, type: wait, duration: 1h}\n",
    )
    .await
    .unwrap();
    let run = "live-1";
    let start = |id: &str, input: serde_json::Value| {
        let body = json!({"workflow": "guarded", "input": input, "run_id": run});
        let s = &s;
        let id = id.to_string();
        async move {
            s.publish_raw(&subjects::start(T), Some(&id), serde_json::to_vec(&body)?)
                .await
        }
    };
    start("first", json!({"name": "a"})).await.unwrap();
    s.history_until(
        T,
        run,
        |e| e.kind == HistoryKind::StepWaiting,
        Duration::from_secs(30),
    )
    .await
    .unwrap();
    start("bad-input", json!({})).await.unwrap();
    start("other-input", json!({"name": "b"})).await.unwrap();
    start("same-again", json!({"name": "a"})).await.unwrap();
    s.commands_handled().await.unwrap();
    assert_eq!(
        history_count(&s, run, HistoryKind::Rejected).await.unwrap(),
        0,
        "a rejection landed in a live run"
    );
    let state = s.run_state(T, run).await.unwrap().unwrap();
    assert_eq!(state.status, RunStatus::Running);
    assert_eq!(state.input, json!({"name": "a"}));
    let letters = s
        .messages(aob_streams::DLQ, "aob.default.dlq.>")
        .await
        .unwrap();
    let reasons: Vec<&str> = letters
        .iter()
        .filter_map(|l| l["reason"].as_str())
        .collect();
    // The CLI says so before sending anything.
    let out = std::process::Command::new(aob_tests::binary("aob").unwrap())
        .args([
            "run",
            "start",
            "guarded",
            "--run-id",
            run,
            "--input",
            r#"{"name": "c"}"#,
        ])
        .env("NATS_URL", s.server.url())
        .env("AOB_PAYLOAD_URL", &s.payload_url)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("run id `live-1` is taken"), "{err}");
    // Both other starts are reported, naming the run whose id they reused; the repeat
    // of the run's own start is not.
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert!(
        reasons.iter().all(|r| r.contains("`live-1` is taken")),
        "{reasons:?}"
    );
}

/// Takes one task from a function's consumer, as that function would, and acks it.
async fn take_task(s: &Stack, node_type: &str, within: Duration) -> anyhow::Result<Option<Task>> {
    let tasks = aob_runtime::nats::bind(
        &s.js,
        aob_streams::TASKS,
        &aob_streams::function_consumer(node_type),
    )
    .await?;
    let mut batch = tasks
        .fetch()
        .max_messages(1)
        .expires(within)
        .messages()
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    match batch.next().await {
        Some(m) => {
            let m = m.map_err(|e| anyhow::anyhow!("{e}"))?;
            m.ack().await.map_err(|e| anyhow::anyhow!("{e}"))?;
            Ok(Some(serde_json::from_slice(&m.payload)?))
        }
        None => Ok(None),
    }
}

/// A condition reads an output passed by reference whose object cannot be loaded yet:
/// the result is retried until it can, and the run then takes the branch the value says.
/// Before, the condition saw the reference instead of the value and took the wrong branch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_that_cannot_be_loaded_yet_never_picks_a_branch() {
    let mut s = Stack::bare().await.unwrap();
    s.publish(
        T,
        "name: branch\nsteps:\n  - {id: a, type: transform, output: 1}\n  - {id: b, type: transform, needs: [a], when: 'steps.a.output.go', output: 2}\n",
    )
    .await
    .unwrap();
    let engine = s.engine().await.unwrap();
    s.spawn_engine(engine.clone());
    let run = s.start_run(T, "branch", json!({})).await.unwrap();
    // The test is the transform function. Its output for `a` is a reference to an object
    // that is not there yet (written late, or its store briefly unreachable).
    let a = take_task(&s, "transform", Duration::from_secs(10))
        .await
        .unwrap()
        .expect("a's task");
    let rel = format!("payloads/{T}/{run}/late.json");
    let result = StepResult {
        tenant: T.into(),
        run_id: run.clone(),
        at: a.at.clone(),
        outcome: Outcome::Completed {
            output: json!({"$aob_ref": rel, "size": 12}),
        },
        duration_ms: 1,
    };
    aob_runtime::nats::deliver_result(&s.js, &result, None)
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while engine
        .metrics
        .retried
        .load(std::sync::atomic::Ordering::SeqCst)
        == 0
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the result was not retried"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        s.run_state(T, &run).await.unwrap().unwrap().steps["b"].status(),
        aob_model::state::StepStatus::Pending,
        "b was decided without a's value"
    );
    let file = s.data.path().join("payloads").join(&rel);
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    std::fs::write(&file, br#"{"go": true}"#).unwrap();
    let b = take_task(&s, "transform", Duration::from_secs(15))
        .await
        .unwrap()
        .expect("b runs once a's value loads");
    assert_eq!(b.at.step, "b");
}

/// The largest value a run record takes while `run` goes on, watched as it is written.
fn watch_record_size(s: &Stack, run: &str) -> tokio::task::JoinHandle<usize> {
    let js = s.js.clone();
    let key = aob_model::state::RunState::key(T, run);
    tokio::spawn(async move {
        let Ok(kv) = js.get_key_value(aob_streams::RUNS).await else {
            return 0;
        };
        let Ok(mut watch) = kv.watch(&key).await else {
            return 0;
        };
        let mut largest = 0;
        while let Some(Ok(entry)) = watch.next().await {
            largest = largest.max(entry.value.len());
            let done = serde_json::from_slice::<aob_model::state::RunState>(&entry.value)
                .is_ok_and(|r| r.status.is_terminal());
            if done {
                break;
            }
        }
        largest
    })
}

/// A for_each of 1,000 items whose outputs are 10 KB each completes, and its run record
/// stays small all along: item outputs and the step's list of them are kept by
/// reference. (Before, 300 such items stopped the run at 102 with the state write
/// refused, and nothing said so.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_items_with_large_outputs_keep_the_run_record_small() {
    let s = Stack::start_with(Fns::AllButHttp).await.unwrap();
    s.publish(
        T,
        "name: wide\nsteps:\n  - {id: f, type: transform, for_each: {items: 'input.xs', concurrency: 64}, output: '{{ input.pad }}{{ item }}'}\n  - {id: n, type: transform, needs: [f], expr: 'size(steps.f.output)'}\n",
    )
    .await
    .unwrap();
    let xs: Vec<u32> = (0..1000).collect();
    let pad = "x".repeat(10_000);
    let run = aob_runtime::now_ms().to_string();
    let largest = watch_record_size(&s, &run);
    let body = json!({"workflow": "wide", "input": {"xs": xs, "pad": pad}, "run_id": run});
    s.publish_raw(
        &subjects::start(T),
        Some(&run),
        serde_json::to_vec(&body).unwrap(),
    )
    .await
    .unwrap();
    let events = s
        .history_until(T, &run, |e| e.kind.is_terminal(), Duration::from_secs(240))
        .await
        .unwrap();
    let end = events.last().unwrap();
    assert_eq!(end.kind, HistoryKind::Completed, "{:?}", end.message);
    let state = s.run_state(T, &run).await.unwrap().unwrap();
    assert_eq!(state.steps["n"].output, Some(json!(1000)));
    // The documented bound: about 200 bytes per item while the step runs, plus the input.
    let largest = largest.await.unwrap();
    assert!(
        largest < 250 * 1024,
        "the run record reached {largest} bytes"
    );
    // The step's list is one reference, in the state and in the history.
    let reference = |v: &serde_json::Value| aob_runtime::payload::reference(v).is_some();
    assert!(reference(state.steps["f"].output.as_ref().unwrap()));
    let done = events
        .iter()
        .find(|e| {
            e.kind == HistoryKind::StepCompleted
                && e.step.as_deref() == Some("f")
                && e.item.is_none()
        })
        .unwrap();
    assert!(reference(&done.data.as_ref().unwrap()["output"]));
}

/// A run whose state would grow past what the engine writes fails at once, saying why,
/// instead of hanging on a write the server refuses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_whose_state_would_outgrow_the_limit_fails_with_the_reason() {
    let mut s = Stack::bare().await.unwrap();
    let engine = s
        .engine_with(aob_engine::Config {
            max_state_bytes: 6 * 1024,
            ..aob_engine::Config::default()
        })
        .await
        .unwrap();
    s.spawn_engine(engine);
    s.spawn_functions(Fns::AllButHttp).await.unwrap();
    s.publish(
        T,
        "name: grows\nsteps:\n  - {id: f, type: transform, for_each: {items: 'input.xs', concurrency: 4}, output: '{{ input.pad }}{{ item }}'}\n",
    )
    .await
    .unwrap();
    // Item outputs of about 100 bytes stay in the state: 60 of them outgrow 6 KiB.
    let pad = "p".repeat(90);
    let xs: Vec<u32> = (0..60).collect();
    let run = s
        .start_run(T, "grows", json!({"xs": xs, "pad": pad}))
        .await
        .unwrap();
    let (state, events) = s.wait_run(T, &run).await.unwrap();
    assert_eq!(state.status, RunStatus::Failed);
    assert!(
        events.iter().any(|e| e.kind == HistoryKind::StepCompleted),
        "it failed while running, not at its start"
    );
    let why = events.last().unwrap().message.clone().unwrap_or_default();
    assert!(why.contains("over the limit of 6144"), "{why}");
    // A run too large from its start is rejected, saying why.
    let xs: Vec<u32> = (0..400).collect();
    let run = s
        .start_run(T, "grows", json!({"xs": xs, "pad": ""}))
        .await
        .unwrap();
    let events = s
        .history_until(T, &run, |e| e.kind.is_terminal(), Duration::from_secs(30))
        .await
        .unwrap();
    let end = events.last().unwrap();
    assert_eq!(end.kind, HistoryKind::Rejected);
    let why = end.message.clone().unwrap_or_default();
    assert!(why.contains("over the limit of 6144"), "{why}");
}

/// A measurement, not a check (`cargo test -p aob-tests --test system -- --ignored
/// --nocapture recovery`): 300 runs of five steps while the engine process is killed
/// five times and started again at once, with the consumers' ack wait at its old value
/// (30 s) and its new one (6 s). Prints how long the runs took and the longest time no
/// run completed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: run with --ignored --nocapture"]
async fn recovery_after_engine_kills_under_load() {
    const FIVE: &str = "name: five\nsteps:\n  - {id: s0, type: transform, output: 0}\n  - {id: s1, type: transform, needs: [s0], output: '{{ steps.s0.output + 1 }}'}\n  - {id: s2, type: transform, needs: [s1], output: '{{ steps.s1.output + 1 }}'}\n  - {id: s3, type: transform, needs: [s2], output: '{{ steps.s2.output + 1 }}'}\n  - {id: s4, type: transform, needs: [s3], output: '{{ steps.s3.output + 1 }}'}\n";
    for (ack_wait, kills) in [(30, 0), (30, 5), (6, 0), (6, 5)] {
        let topology = Topology {
            ack_wait: Duration::from_secs(ack_wait),
            ..Topology::default()
        };
        let mut s = Stack::bare_with(topology).await.unwrap();
        s.spawn_functions(Fns::AllButHttp).await.unwrap();
        s.publish(T, FIVE).await.unwrap();
        let spawn = || {
            std::process::Command::new(aob_tests::binary("aob-engine").unwrap())
                .env("NATS_URL", s.server.url())
                .env("AOB_PAYLOAD_URL", &s.payload_url)
                .env("RUST_LOG", "error")
                .spawn()
                .unwrap()
        };
        let mut engine = spawn();
        let mut done = s
            .client
            .subscribe(format!("aob.{T}.run.*.completed"))
            .await
            .unwrap();
        let runs = 300;
        let begun = std::time::Instant::now();
        for _ in 0..runs {
            s.start_run(T, "five", json!({})).await.unwrap();
        }
        let mut finished = 0;
        let mut last = std::time::Instant::now();
        let mut longest = Duration::ZERO;
        let mut killed = 0;
        while finished < runs {
            let next = tokio::time::timeout(Duration::from_millis(300), done.next()).await;
            match next {
                Ok(Some(_)) => {
                    finished += 1;
                    longest = longest.max(last.elapsed());
                    last = std::time::Instant::now();
                }
                Ok(None) => panic!("subscription ended"),
                Err(_) => {}
            }
            // Kill at every 50 runs completed, up to `kills` times.
            if killed < kills && finished >= 50 * (killed + 1) {
                engine.kill().unwrap();
                engine.wait().unwrap();
                engine = spawn();
                killed += 1;
            }
            assert!(
                begun.elapsed() < Duration::from_secs(300),
                "{finished} of {runs} runs after 5 minutes"
            );
        }
        longest = longest.max(last.elapsed());
        println!(
            "ack wait {ack_wait:>2} s, {killed} kills: {runs} runs in {:.1} s, longest time without a completion {:.1} s",
            begun.elapsed().as_secs_f64(),
            longest.as_secs_f64()
        );
        engine.kill().unwrap();
        let _ = engine.wait();
    }
}

/// A client cannot forge a timeout: a timer signal on the client signal subject is refused
/// (dead-lettered) and changes nothing; timers fire on the internal subject.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timer_signal_from_a_client_is_refused() {
    let s = Stack::start_with(Fns::AllButHttp).await.unwrap();
    s.publish(
        T,
        "name: long\ntimeout: 1h\nsteps:\n  - {id: w, type: wait, duration: 1h}\n",
    )
    .await
    .unwrap();
    let run = s.start_run(T, "long", json!({})).await.unwrap();
    s.history_until(
        T,
        &run,
        |e| e.kind == HistoryKind::StepWaiting,
        Duration::from_secs(30),
    )
    .await
    .unwrap();
    let forged = Signal::Timer {
        timer: TimerKind::RunTimeout,
    };
    s.publish_raw(
        &subjects::signal(T, &run),
        Some("forged"),
        serde_json::to_vec(&forged).unwrap(),
    )
    .await
    .unwrap();
    s.commands_handled().await.unwrap();
    let state = s.run_state(T, &run).await.unwrap().unwrap();
    assert_eq!(
        state.status,
        RunStatus::Running,
        "a forged timeout ended the run"
    );
    let letters = s
        .messages(aob_streams::DLQ, "aob.default.dlq.engine")
        .await
        .unwrap();
    assert!(
        letters.iter().any(|l| l["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("timer signals are internal")),
        "{letters:?}"
    );
    // The run's own timeout is stored for the internal subject.
    let timer = Timers::open(&s.js)
        .await
        .unwrap()
        .get(&format!("{T}.{run}.run-timeout"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(timer.subject, subjects::internal_signal(T, &run));
}

/// `aob run list` shows the tenant's runs and no other tenant's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_list_reads_one_tenants_runs() {
    let s = Stack::start_with(Fns::AllButHttp).await.unwrap();
    let mut mine = Vec::new();
    let mut theirs = Vec::new();
    for tenant in [T, "acme"] {
        s.publish(tenant, ONE_STEP).await.unwrap();
        for _ in 0..(if tenant == T { 3 } else { 2 }) {
            let run = s.start_run(tenant, "one", json!({})).await.unwrap();
            s.history_until(
                tenant,
                &run,
                |e| e.kind.is_terminal(),
                Duration::from_secs(30),
            )
            .await
            .unwrap();
            if tenant == T {
                mine.push(run)
            } else {
                theirs.push(run)
            }
        }
    }
    let (ok, listed) = aob(&s, &["run", "list"]).unwrap();
    assert!(ok, "{listed}");
    assert!(mine.iter().all(|r| listed.contains(r.as_str())), "{listed}");
    assert!(
        !theirs.iter().any(|r| listed.contains(r.as_str())),
        "{listed}"
    );
    let (ok, listed) = aob(&s, &["--tenant", "acme", "run", "list"]).unwrap();
    assert!(ok, "{listed}");
    assert!(
        theirs.iter().all(|r| listed.contains(r.as_str())),
        "{listed}"
    );
    assert!(
        !mine.iter().any(|r| listed.contains(r.as_str())),
        "{listed}"
    );
}

/// The timer service is supervised: when it cannot go on (its bucket is gone), the engine
/// stops with an error instead of running on without retries, timeouts and waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engine_stops_when_its_timer_service_dies() {
    let s = Stack::bare().await.unwrap();
    let engine = s
        .engine_with(aob_engine::Config {
            timer_lease: aob_runtime::timers::LeaseConfig {
                ttl: Duration::from_millis(300),
                give_up_after: Duration::from_secs(1),
            },
            ..aob_engine::Config::default()
        })
        .await
        .unwrap();
    let running = tokio::spawn(aob_engine::run_with(
        engine,
        s.client.clone(),
        tokio_util::sync::CancellationToken::new(),
    ));
    // The lease is taken: the timer service is up.
    let kv = s.js.get_key_value(aob_streams::TIMERS).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while kv
        .get(aob_runtime::timers::LEASE_KEY)
        .await
        .unwrap()
        .is_none()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no timer lease taken"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    s.js.delete_key_value(aob_streams::TIMERS).await.unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(20), running)
        .await
        .expect("the engine went on without its timer service")
        .unwrap();
    let e = ended.expect_err("the engine stopped without an error");
    assert!(e.to_string().contains("timer service"), "{e}");
}

/// An engine on the memory run store; the server only carries what it publishes.
async fn memory_engine<S: aob_engine::store::RunStore>(
    s: &Stack,
    store: S,
) -> anyhow::Result<std::sync::Arc<aob_engine::Engine<S>>> {
    Ok(std::sync::Arc::new(
        aob_engine::Engine::with_store(
            s.js.clone(),
            store,
            s.payloads.clone(),
            aob_engine::Config::default(),
        )
        .await?,
    ))
}

fn start_of(workflow: &str, run: &str) -> aob_model::wire::StartCommand {
    aob_model::wire::StartCommand {
        workflow: workflow.into(),
        version: None,
        input: json!({}),
        run_id: Some(run.into()),
        by: None,
        fork: None,
        parent: None,
    }
}

fn stored(state: Option<(bytes::Bytes, u64)>) -> anyhow::Result<aob_model::state::RunState> {
    let (bytes, _) = state.ok_or_else(|| anyhow::anyhow!("run not stored"))?;
    Ok(serde_json::from_slice(&bytes)?)
}

fn completed(run: &str, at: StepRef) -> StepResult {
    StepResult {
        tenant: T.into(),
        run_id: run.into(),
        at,
        outcome: Outcome::Completed { output: json!(1) },
        duration_ms: 1,
    }
}

fn first(step: &str) -> StepRef {
    StepRef {
        step: step.into(),
        item: None,
        iteration: None,
        attempt: 1,
        generation: 0,
    }
}

/// The run loop's outbox path, on the memory run store: a stored outbox written within the
/// duplicate window is published again when a restarted engine loads the run (its writer
/// may have died), an older one is not, and the next write clears either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_outbox_path_on_the_memory_store() {
    use aob_engine::store::RunStore;
    let topology = short_window();
    let s = Stack::bare_with(topology.clone()).await.unwrap();
    s.publish(T, ONE_STEP).await.unwrap();
    let engine = memory_engine(&s, aob_engine::store::MemoryStore::default())
        .await
        .unwrap();
    let key = aob_model::state::RunState::key(T, "m1");
    assert!(
        engine
            .handle_start(T, "m1", start_of("one", "m1"))
            .await
            .unwrap()
    );
    assert!(
        !stored(engine.store().get(&key).await.unwrap())
            .unwrap()
            .outbox
            .is_empty()
    );
    let stale = Signal::Timer {
        timer: TimerKind::Retry {
            at: StepRef {
                attempt: 9,
                ..first("a")
            },
        },
    };
    let skipped = || {
        engine
            .metrics
            .outbox_skipped
            .load(std::sync::atomic::Ordering::SeqCst)
    };
    // Restarted at once: the young outbox goes out again (a duplicate the server drops)...
    engine.forget_runs();
    assert!(!engine.handle_signal(T, "m1", stale.clone()).await.unwrap());
    assert_eq!(skipped(), 0);
    // ...and is cleared.
    assert!(
        stored(engine.store().get(&key).await.unwrap())
            .unwrap()
            .outbox
            .is_empty()
    );
    // The run completes: a new outbox, which outlives the window.
    assert!(
        engine
            .handle_result(completed("m1", first("a")))
            .await
            .unwrap()
    );
    assert!(
        !stored(engine.store().get(&key).await.unwrap())
            .unwrap()
            .outbox
            .is_empty()
    );
    outlive_the_duplicate_window(&topology).await;
    engine.forget_runs();
    assert!(!engine.handle_signal(T, "m1", stale).await.unwrap());
    assert_eq!(
        skipped(),
        1,
        "an outbox older than the window was published again"
    );
    assert!(
        stored(engine.store().get(&key).await.unwrap())
            .unwrap()
            .outbox
            .is_empty()
    );
    assert_eq!(
        history_count(&s, "m1", HistoryKind::Completed)
            .await
            .unwrap(),
        1
    );
}

/// A run store whose updates wait until the test lets them through.
struct Gated {
    inner: aob_engine::store::MemoryStore,
    armed: std::sync::atomic::AtomicBool,
    open: tokio::sync::Semaphore,
}

impl aob_engine::store::RunStore for Gated {
    async fn get(
        &self,
        key: &str,
    ) -> Result<Option<(bytes::Bytes, u64)>, aob_engine::store::StoreError> {
        self.inner.get(key).await
    }
    async fn create(
        &self,
        key: &str,
        value: bytes::Bytes,
    ) -> Result<Result<u64, aob_engine::store::Conflict>, aob_engine::store::StoreError> {
        self.inner.create(key, value).await
    }
    async fn update(
        &self,
        key: &str,
        value: bytes::Bytes,
        revision: u64,
    ) -> Result<Result<u64, aob_engine::store::Conflict>, aob_engine::store::StoreError> {
        if self.armed.load(std::sync::atomic::Ordering::SeqCst) {
            let _ = self.open.acquire().await;
        }
        self.inner.update(key, value, revision).await
    }
}

/// The early-task path, on the memory run store: the next step's task goes out while the
/// state that starts it is still being written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_early_task_path_on_the_memory_store() {
    use aob_engine::store::RunStore;
    let s = Stack::bare().await.unwrap();
    s.publish(
        T,
        "name: two\nsteps:\n  - {id: a, type: transform, output: 1}\n  - {id: b, type: transform, needs: [a], output: 2}\n",
    )
    .await
    .unwrap();
    let engine = memory_engine(
        &s,
        Gated {
            inner: aob_engine::store::MemoryStore::default(),
            armed: std::sync::atomic::AtomicBool::new(false),
            open: tokio::sync::Semaphore::new(0),
        },
    )
    .await
    .unwrap();
    assert!(
        engine
            .handle_start(T, "m2", start_of("two", "m2"))
            .await
            .unwrap()
    );
    let tasks = || s.count(aob_streams::TASKS, "aob.default.task.transform");
    assert_eq!(tasks().await.unwrap(), 1);
    engine
        .store()
        .armed
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let applying = {
        let engine = engine.clone();
        tokio::spawn(async move { engine.handle_result(completed("m2", first("a"))).await })
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while tasks().await.unwrap() < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "b's task waited for the state write"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let key = aob_model::state::RunState::key(T, "m2");
    let before = stored(engine.store().get(&key).await.unwrap()).unwrap();
    assert_eq!(
        before.steps["b"].status(),
        aob_model::state::StepStatus::Pending,
        "the write had not landed when the task went out"
    );
    engine.store().open.add_permits(1);
    assert!(applying.await.unwrap().unwrap());
    let after = stored(engine.store().get(&key).await.unwrap()).unwrap();
    assert_eq!(
        after.steps["b"].status(),
        aob_model::state::StepStatus::Running
    );
}

/// The held-result path, on the memory run store: a result for a run the store does not
/// hold yet is ahead (held, not dropped), and applied once the run exists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_held_result_path_on_the_memory_store() {
    let s = Stack::bare().await.unwrap();
    s.publish(T, ONE_STEP).await.unwrap();
    let engine = memory_engine(&s, aob_engine::store::MemoryStore::default())
        .await
        .unwrap();
    let early = engine.handle_result(completed("m3", first("a"))).await;
    assert!(
        matches!(early, Err(aob_engine::service::Error::Ahead { .. })),
        "{early:?}"
    );
    assert!(
        engine
            .handle_start(T, "m3", start_of("one", "m3"))
            .await
            .unwrap()
    );
    assert!(
        engine
            .handle_result(completed("m3", first("a")))
            .await
            .unwrap()
    );
    assert_eq!(
        history_count(&s, "m3", HistoryKind::Completed)
            .await
            .unwrap(),
        1
    );
}

/// A start whose first delivery wrote its run but could not publish the run's first task
/// (the tasks stream had no leader; here, no stream at all) is redelivered, and the
/// redelivery sends the task from the stored outbox: the run completes. Found by the
/// node-kill suite, where such runs stayed RUNNING for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_whose_first_task_could_not_be_published_still_runs() {
    let mut s = Stack::bare().await.unwrap();
    let engine = s.engine().await.unwrap();
    s.spawn_engine(engine);
    s.publish(
        T,
        "name: one\nsteps:\n  - {id: a, type: transform, output: 1}\n",
    )
    .await
    .unwrap();
    s.js.delete_stream(aob_streams::TASKS).await.unwrap();
    let run = s.start_run(T, "one", json!({})).await.unwrap();
    // The run is written with its task in the outbox; the task went nowhere.
    let mut written = false;
    for _ in 0..200 {
        if let Some(state) = s.run_state(T, &run).await.unwrap() {
            assert!(!state.outbox.is_empty(), "{state:?}");
            written = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(written, "the start was never applied");
    // The stream comes back (a leader is elected); the start's redelivery sends the task.
    s.topology.apply(&s.js).await.unwrap();
    s.spawn_functions(Fns::AllButHttp).await.unwrap();
    let (state, _) = tokio::time::timeout(Duration::from_secs(30), s.wait_run(T, &run))
        .await
        .expect("the run's first task was never sent")
        .unwrap();
    assert_eq!(state.status, RunStatus::Completed);
}

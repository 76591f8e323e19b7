//! The engine core under time, restarts and outages: effects are published once, timers
//! end with what they guard, nothing the engine needs is dropped.

use std::time::Duration;

use aob_model::audit::{AuditKind, DecisionRecord};
use aob_model::state::RunStatus;
use aob_model::wire::{HistoryKind, Signal, StepRef, TimerKind};
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

async fn signal(s: &Stack, run: &str, id: &str, signal: &Signal) -> anyhow::Result<()> {
    s.publish_raw(
        &subjects::signal(T, run),
        Some(id),
        serde_json::to_vec(signal)?,
    )
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
    };
    signal(&s, &run, "late-cancel", &cancel).await.unwrap();
    s.drained(
        aob_streams::CMD,
        aob_streams::ENGINE_CMD,
        Duration::from_secs(10),
    )
    .await
    .unwrap();
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
            },
        },
    };
    signal(&s, &run, "stale-retry", &stale).await.unwrap();
    s.drained(
        aob_streams::CMD,
        aob_streams::ENGINE_CMD,
        Duration::from_secs(10),
    )
    .await
    .unwrap();
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

//! The audit trail: every decision of a run becomes a DecisionRecord on AOB_AUDIT.

use std::collections::{BTreeMap, BTreeSet};

use aob_audit::sink::SinkConfig;
use aob_model::audit::{AuditKind, DecisionRecord, sha256_hex};
use aob_model::state::RunStatus;
use aob_tests::Stack;
use aob_tests::audit::{S3Server, SinkProcess};
use serde_json::{Value, json};

const T: &str = "default";

/// The records of one run, as published.
async fn records_of(s: &Stack, run: &str) -> anyhow::Result<Vec<DecisionRecord>> {
    let all = s
        .messages(aob_streams::AUDIT, &aob_streams::subjects::audit(T))
        .await?;
    Ok(all
        .into_iter()
        .filter_map(|v| serde_json::from_value::<DecisionRecord>(v).ok())
        .filter(|r| r.run_id == run)
        .collect())
}

/// Waits, on a consumer of the audit stream, for the first record of a run.
async fn first_record_of(
    s: &Stack,
    run: &str,
    within: std::time::Duration,
) -> anyhow::Result<DecisionRecord> {
    use futures::StreamExt;
    let consumer =
        s.js.get_stream(aob_streams::AUDIT)
            .await?
            .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig {
                filter_subject: aob_streams::subjects::audit(T),
                ..Default::default()
            })
            .await?;
    let mut messages = consumer.messages().await?;
    let wait = async {
        while let Some(m) = messages.next().await {
            if let Ok(r) = serde_json::from_slice::<DecisionRecord>(&m?.payload)
                && r.run_id == run
            {
                return Ok(r);
            }
        }
        anyhow::bail!("the audit stream's consumer ended")
    };
    tokio::time::timeout(within, wait)
        .await
        .map_err(|_| anyhow::anyhow!("no audit record of run {run} within {within:?}"))?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_history_event_and_every_task_becomes_one_record() {
    let s = Stack::start().await.unwrap();
    let wf = s.publish_example(T, "chain").await.unwrap();
    let run = s.start_run(T, &wf, json!({"name": "Ada"})).await.unwrap();
    let (state, events) = s.wait_run(T, &run).await.unwrap();
    assert_eq!(state.status, RunStatus::Completed);

    let records = records_of(&s, &run).await.unwrap();
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
    // The rejection has no run to wait on: wait for its record on the stream.
    first_record_of(&s, &run, std::time::Duration::from_secs(10))
        .await
        .unwrap();
    let records = records_of(&s, &run).await.unwrap();
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
    let records = records_of(&s, &run).await.unwrap();
    let call = records.iter().find(|r| r.actor == "fn.http").unwrap();
    assert_eq!(call.event_kind, AuditKind::ToolCall);
    assert_eq!(call.error_class.as_deref(), Some("terminal"));
    assert!(call.error_message.as_deref().unwrap().contains("404"));
}

/// A model call as the llm function reports it: the columns an auditor asks about.
fn model_call(id: &str, run: &str) -> DecisionRecord {
    let mut r = DecisionRecord::new(
        id.to_string(),
        T,
        run,
        AuditKind::ModelCall,
        "fn.llm",
        aob_runtime::now_us(),
    );
    r.step_id = Some("summarize".into());
    r.model = Some("gpt-4o-mini".into());
    r.provider = Some("openai".into());
    r.tokens_in = Some(1200);
    r.tokens_out = Some(85);
    r.cost_usd = Some(0.00023);
    r.policy_id = Some("pii-redaction".into());
    r.policy_result = Some("allow".into());
    r.with_input(&json!({"prompt": "Summarize"}))
        .with_output(&json!({"text": "Short."}))
}

async fn publish_record(s: &Stack, r: &DecisionRecord) -> anyhow::Result<()> {
    aob_runtime::bus::publish_record(&s.js, r).await?.await?;
    Ok(())
}

/// Waits until the sink has written everything published, then runs the query.
async fn settle(s: &Stack, query: &str) -> anyhow::Result<Vec<Vec<Value>>> {
    aob_tests::audit::drain(&s.client, std::time::Duration::from_secs(60)).await?;
    aob_tests::audit::duckdb(query)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duckdb_reads_the_trail_of_real_runs_from_local_files() {
    let s = Stack::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().display());
    let stop = tokio_util::sync::CancellationToken::new();
    let sink = {
        let (client, stop) = (s.client.clone(), stop.clone());
        tokio::spawn(
            async move { aob_fn_audit::run(client, &url, SinkConfig::default(), stop).await },
        )
    };
    let wf = s.publish_example(T, "chain").await.unwrap();
    let mut runs = Vec::new();
    for name in ["Ada", "Grace"] {
        let run = s.start_run(T, &wf, json!({"name": name})).await.unwrap();
        let (state, _) = s.wait_run(T, &run).await.unwrap();
        assert_eq!(state.status, RunStatus::Completed);
        runs.push(run);
    }
    publish_record(&s, &model_call("acme-llm-1", &runs[0]))
        .await
        .unwrap();
    // Garbage on the audit subject is dead-lettered, not fatal.
    let subject = aob_streams::subjects::audit(T);
    s.publish_raw(&subject, None, b"not json".to_vec())
        .await
        .unwrap();
    s.publish_raw(&subject, None, br#"{"record_id": "x"}"#.to_vec())
        .await
        .unwrap();
    publish_record(&s, &model_call("acme-llm-2", &runs[1]))
        .await
        .unwrap();

    let published = s.count(aob_streams::AUDIT, &subject).await.unwrap() - 2;
    let trail = aob_tests::audit::trail(dir.path());
    let query = format!(
        "SELECT count(*), count(DISTINCT record_id), min(tenant), count(DISTINCT date) FROM {trail}"
    );
    let got = settle(&s, &query).await.unwrap();
    assert_eq!(got[0][0], json!(published), "every record, once");
    assert_eq!(got[0][1], json!(published), "no record id twice");
    assert_eq!(got[0][2], json!(T), "tenant partition");
    // Per run: the same records as on the bus.
    for run in &runs {
        let on_bus = records_of(&s, run).await.unwrap().len();
        let got = aob_tests::audit::duckdb(&format!(
            "SELECT count(*) FROM {trail} WHERE run_id = '{run}'"
        ))
        .unwrap();
        assert_eq!(got[0][0], json!(on_bus), "run {run}");
    }
    // The columns of a model call, typed.
    let got = aob_tests::audit::duckdb(&format!(
        "SELECT model, provider, tokens_in, tokens_out, cost_usd, policy_id, policy_result, \
         typeof(tokens_in), typeof(cost_usd), typeof(finished_at), length(input_digest), error_class \
         FROM {trail} WHERE record_id = 'acme-llm-1'"
    ))
    .unwrap();
    assert_eq!(
        got,
        vec![vec![
            json!("gpt-4o-mini"),
            json!("openai"),
            json!(1200),
            json!(85),
            json!(0.00023),
            json!("pii-redaction"),
            json!("allow"),
            json!("BIGINT"),
            json!("DOUBLE"),
            json!("TIMESTAMP WITH TIME ZONE"),
            json!(64),
            Value::Null,
        ]]
    );
    // Who decided each step of a run, in order.
    let got = aob_tests::audit::duckdb(&format!(
        "SELECT step_id, actor, decision FROM {trail} WHERE run_id = '{}' \
         AND event_kind = 'step_completed' ORDER BY finished_at",
        runs[0]
    ))
    .unwrap();
    let steps: Vec<_> = got.iter().map(|r| r[0].clone()).collect();
    assert_eq!(steps, [json!("compose"), json!("check"), json!("shape")]);
    assert!(
        got.iter()
            .all(|r| r[1] == json!("engine") && r[2] == json!("accept"))
    );
    // Both pieces of garbage were dead-lettered with their reasons.
    let letters = s
        .messages(aob_streams::DLQ, &aob_streams::subjects::dlq(T, "audit"))
        .await
        .unwrap();
    assert_eq!(letters.len(), 2, "{letters:?}");
    stop.cancel();
    sink.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sink_writes_to_an_s3_compatible_server() {
    let s3 = S3Server::start().await.unwrap();
    s3.create_bucket("audit").await.unwrap();
    let s = Stack::start().await.unwrap();
    let _sink = SinkProcess::start(&s.server.url(), "s3://audit/trail", &s3.env()).unwrap();
    let wf = s.publish_example(T, "chain").await.unwrap();
    let run = s.start_run(T, &wf, json!({"name": "Ada"})).await.unwrap();
    let (state, _) = s.wait_run(T, &run).await.unwrap();
    assert_eq!(state.status, RunStatus::Completed);
    publish_record(&s, &model_call("s3-llm-1", &run))
        .await
        .unwrap();
    aob_tests::audit::drain(&s.client, std::time::Duration::from_secs(60))
        .await
        .unwrap();

    let local = tempfile::tempdir().unwrap();
    let n = s3.download("audit", local.path()).await.unwrap();
    assert!(n >= 1);
    let names = aob_tests::audit::duckdb(&format!(
        "SELECT DISTINCT regexp_replace(filename, '^.*/trail/', '') FROM read_parquet('{}/trail/**/*.parquet', filename = true)",
        local.path().display()
    ))
    .unwrap();
    for n in names {
        let n = n[0].as_str().unwrap_or_default().to_string();
        assert!(n.starts_with("tenant=default/date="), "{n}");
    }
    let trail = aob_tests::audit::trail(&local.path().join("trail"));
    let on_bus = records_of(&s, &run).await.unwrap().len();
    let got = aob_tests::audit::duckdb(&format!(
        "SELECT count(*), count(DISTINCT record_id), max(tokens_in) FROM {trail} WHERE run_id = '{run}'"
    ))
    .unwrap();
    assert_eq!(got[0], vec![json!(on_bus), json!(on_bus), json!(1200)]);
}

/// Kills the sink mid-batch and between upload and ack, over and over, while records keep
/// coming; afterwards DuckDB counts every record exactly once.
///
/// Each killed sink is shown to have been at work: a sink with the `after_write` failpoint
/// must exit with an error leaving the intent log in `writing` (objects written, nothing
/// acknowledged), and a sink killed from outside is killed right after it was seen, through
/// a watch of the intent log, entering a given stage of a batch (`writing`, `written`,
/// `done`, in turn).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_sink_loses_and_duplicates_nothing() {
    use futures::StreamExt;
    let s = Stack::bare().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().display());
    let nats = s.server.url();
    let kv =
        s.js.get_key_value(aob_streams::AUDIT_SINK_BUCKET)
            .await
            .unwrap();
    // Small batches that flush often, so kills land in every phase.
    let small = [
        ("AOB_AUDIT_MAX_ROWS", "300".to_string()),
        ("AOB_AUDIT_MAX_AGE", "150ms".to_string()),
    ];
    // A steady stream of records, from two tenants.
    let total = 6_000usize;
    let publisher = {
        let js = s.js.clone();
        tokio::spawn(async move {
            for i in 0..total {
                let tenant = if i % 3 == 0 { "acme" } else { T };
                let mut r = DecisionRecord::new(
                    format!("crash-{i}"),
                    tenant,
                    &format!("run-{}", i / 50),
                    AuditKind::TaskExecuted,
                    "fn.transform",
                    aob_runtime::now_us(),
                );
                r.step_id = Some(format!("s{}", i % 50));
                aob_runtime::bus::publish_record(&js, &r)
                    .await
                    .unwrap()
                    .await
                    .unwrap();
                // Pacing, so that the sinks below are killed while records still arrive.
                if i % 100 == 0 {
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
            }
        })
    };
    let stage = |v: &Value| v["state"].as_str().unwrap_or_default().to_string();
    let stages = ["writing", "written", "done"];
    for round in 0..8 {
        // Updates of the intent log from now on are this round's sink's.
        let mut updates = kv.watch(aob_audit::sink::INTENT_KEY).await.unwrap();
        if round % 2 == 0 {
            // Dies right after writing its objects, before any ack.
            let mut env = small.to_vec();
            env.push(("AOB_AUDIT_FAILPOINT", "after_write".to_string()));
            let mut p = SinkProcess::start(&nats, &url, &env).unwrap();
            let status = p
                .wait_exit(std::time::Duration::from_secs(20))
                .await
                .unwrap();
            assert!(
                !status.success(),
                "round {round}: the failpoint exits with an error"
            );
            let intent: Value = serde_json::from_slice(
                &kv.get(aob_audit::sink::INTENT_KEY).await.unwrap().unwrap(),
            )
            .unwrap();
            assert_eq!(stage(&intent), "writing", "round {round}: {intent}");
            let files = intent["files"].as_array().cloned().unwrap_or_default();
            assert!(!files.is_empty(), "round {round}: {intent}");
            for f in files {
                let f = f.as_str().unwrap_or_default();
                assert!(
                    dir.path().join(f).is_file(),
                    "round {round}: {f} was written"
                );
            }
        } else {
            // Killed right after it is seen entering a stage of a batch.
            let want = stages[(round / 2) % stages.len()];
            let mut p = SinkProcess::start(&nats, &url, &small).unwrap();
            let seen = tokio::time::timeout(std::time::Duration::from_secs(20), async {
                while let Some(entry) = updates.next().await {
                    let entry = entry.unwrap();
                    let v: Value = serde_json::from_slice(&entry.value).unwrap_or(Value::Null);
                    if stage(&v) == want {
                        return true;
                    }
                }
                false
            })
            .await;
            p.kill();
            assert_eq!(
                seen,
                Ok(true),
                "round {round}: the sink never reached `{want}` in 20 s"
            );
        }
    }
    publisher.await.unwrap();
    // A last sink that is left alone, with the topology's short ack wait for redeliveries.
    let _sink = SinkProcess::start(&nats, &url, &small).unwrap();
    let trail = aob_tests::audit::trail(dir.path());
    let query =
        format!("SELECT count(DISTINCT record_id), count(*), count(DISTINCT tenant) FROM {trail}");
    let got = settle(&s, &query).await.unwrap();
    assert_eq!(got[0][0], json!(total), "every record is in the trail");
    assert_eq!(got[0][1], json!(total), "and none twice");
    assert_eq!(got[0][2], json!(2));
}

/// Records numbered `from..from + n` with ids `<prefix>-<i>`, of tenant `default`.
fn numbered(prefix: &str, from: usize, n: usize) -> Vec<DecisionRecord> {
    (from..from + n)
        .map(|i| {
            DecisionRecord::new(
                format!("{prefix}-{i}"),
                T,
                &format!("run-{}", i / 10),
                AuditKind::TaskExecuted,
                "fn.transform",
                aob_runtime::now_us(),
            )
        })
        .collect()
}

/// An in-process sink on its own connection, stopped (flushing first) by [`Sink::stop`].
struct Sink {
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<aob_audit::Result<()>>,
}

impl Sink {
    async fn start(s: &Stack, url: &str) -> anyhow::Result<Sink> {
        let client = s.server.connect().await?;
        let stop = tokio_util::sync::CancellationToken::new();
        let (url, token) = (url.to_string(), stop.clone());
        let task = tokio::spawn(async move {
            aob_fn_audit::run(client, &url, SinkConfig::default(), token).await
        });
        Ok(Sink { stop, task })
    }

    async fn stop(self) -> anyhow::Result<()> {
        self.stop.cancel();
        Ok(self.task.await??)
    }
}

/// Writes `records` and waits until the sink has them in files.
async fn write_through(s: &Stack, records: &[DecisionRecord]) -> anyhow::Result<()> {
    for r in records {
        publish_record(s, r).await?;
    }
    aob_tests::audit::drain(&s.client, std::time::Duration::from_secs(60)).await
}

/// `(rows, distinct record ids, rows whose id starts with each prefix)` of the trail.
fn census(dir: &std::path::Path, prefixes: &[&str]) -> anyhow::Result<Vec<Value>> {
    let trail = aob_tests::audit::trail(dir);
    let per: Vec<String> = prefixes
        .iter()
        .map(|p| format!("count(*) FILTER (WHERE record_id LIKE '{p}-%')"))
        .collect();
    let got = aob_tests::audit::duckdb(&format!(
        "SELECT count(*), count(DISTINCT record_id), {} FROM {trail}",
        per.join(", ")
    ))?;
    got.into_iter()
        .next()
        .ok_or_else(|| anyhow::anyhow!("DuckDB returned no row"))
}

/// `aob streams apply` asks an operator to delete the sink's consumer when its ack policy
/// must change; the consumer it creates again delivers the whole stream from the start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recreating_the_sink_consumer_writes_no_record_twice() {
    let s = Stack::bare().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().display());
    let sink = Sink::start(&s, &url).await.unwrap();
    // Two batches, so that a second pass over the stream would cut them differently.
    write_through(&s, &numbered("first", 0, 120)).await.unwrap();
    write_through(&s, &numbered("second", 0, 80)).await.unwrap();
    sink.stop().await.unwrap();

    let stream = s.js.get_stream(aob_streams::AUDIT).await.unwrap();
    stream
        .delete_consumer(aob_streams::AUDIT_SINK)
        .await
        .unwrap();
    let changes = aob_tests::test_topology().apply(&s.js).await.unwrap();
    assert_eq!(
        changes.iter().map(|d| d.to_string()).collect::<Vec<_>>(),
        [format!(
            "consumer {}/{}: missing",
            aob_streams::AUDIT,
            aob_streams::AUDIT_SINK
        )]
    );
    let mut consumer: async_nats::jetstream::consumer::PullConsumer =
        stream.get_consumer(aob_streams::AUDIT_SINK).await.unwrap();
    let info = consumer.info().await.unwrap();
    assert_eq!(
        (info.ack_floor.stream_sequence, info.num_pending),
        (0, 200),
        "the new consumer delivers everything again"
    );

    let sink = Sink::start(&s, &url).await.unwrap();
    write_through(&s, &numbered("third", 0, 30)).await.unwrap();
    sink.stop().await.unwrap();
    assert_eq!(
        census(dir.path(), &["first", "second", "third"]).unwrap(),
        [json!(230), json!(230), json!(120), json!(80), json!(30)],
        "rows, distinct ids, then rows per batch of records"
    );
}

/// The stream deleted and created again (`aob streams apply` after a `nats stream rm`):
/// sequences restart at 1, and producers publish records again with the ids they had.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recreating_the_audit_stream_writes_no_record_twice() {
    let s = Stack::bare().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().display());
    let old = numbered("old", 0, 100);
    let sink = Sink::start(&s, &url).await.unwrap();
    write_through(&s, &old).await.unwrap();
    sink.stop().await.unwrap();

    s.js.delete_stream(aob_streams::AUDIT).await.unwrap();
    let changes = aob_tests::test_topology().apply(&s.js).await.unwrap();
    assert!(
        changes
            .iter()
            .any(|d| d.to_string() == format!("stream {}: missing", aob_streams::AUDIT)),
        "{changes:?}"
    );
    // New records first, in a batch of their own: they take the sequences the old ones had
    // in the old stream, and their file the name the old one would have without the stream.
    let sink = Sink::start(&s, &url).await.unwrap();
    write_through(&s, &numbered("new", 0, 100)).await.unwrap();
    write_through(&s, &old).await.unwrap();
    write_through(&s, &numbered("new", 100, 50)).await.unwrap();
    sink.stop().await.unwrap();
    assert_eq!(
        census(dir.path(), &["old", "new"]).unwrap(),
        [json!(250), json!(250), json!(100), json!(150)],
        "rows, distinct ids, old rows, new rows"
    );
}

/// The stream is deleted and created again while a sink runs. The running sink stops with
/// an error (its consumer is gone, or it finds the stream recreated at its first delivery)
/// before acknowledging anything of the new stream; the sink started after it writes the
/// new records, and the old ones published again, each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_sink_stops_when_its_stream_is_recreated_and_no_record_is_written_twice() {
    let s = Stack::bare().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().display());
    let old = numbered("old", 0, 60);
    let sink = Sink::start(&s, &url).await.unwrap();
    write_through(&s, &old).await.unwrap();

    s.js.delete_stream(aob_streams::AUDIT).await.unwrap();
    aob_tests::test_topology().apply(&s.js).await.unwrap();
    for r in &numbered("new", 0, 40) {
        publish_record(&s, r).await.unwrap();
    }
    let ended = tokio::time::timeout(std::time::Duration::from_secs(60), sink.task)
        .await
        .expect("the sink went on after its stream was replaced")
        .unwrap();
    // Its consumer went with the stream (or, if it saw the new stream first, it found it
    // recreated): either way it stops, so that a restart starts from what the files hold.
    let e = ended.expect_err("the sink stopped without an error");
    assert!(
        matches!(e, aob_audit::Error::Recreated(_)) || e.to_string().contains("consumer"),
        "stopped for another reason: {e}"
    );
    let sink = Sink::start(&s, &url).await.unwrap();
    aob_tests::audit::drain(&s.client, std::time::Duration::from_secs(60))
        .await
        .unwrap();
    write_through(&s, &old).await.unwrap();
    sink.stop().await.unwrap();
    assert_eq!(
        census(dir.path(), &["old", "new"]).unwrap(),
        [json!(100), json!(100), json!(60), json!(40)],
        "rows, distinct ids, old rows, new rows"
    );
}

//! The audit sink against a real nats-server and a `file://` store.

// Helpers outside `#[test]` functions panic on purpose too.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aob_audit::sink::{FlushReport, INTENT_KEY};
use aob_audit::store::parse_object_path;
use aob_audit::{Date, SinkConfig, object_path};
use aob_model::audit::{AuditKind, DecisionRecord};
use aob_streams::Topology;
use aob_streams::subjects::{AUDIT_FLUSH, audit};
use aob_testkit::NatsServer;
use arrow_array::cast::AsArray;
use async_nats::jetstream;
use object_store::ObjectStore;
use object_store::path::Path;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use tokio_util::sync::CancellationToken;

// 2026-11-21T00:00:00Z
const NOV21_US: i64 = 1_795_219_200 * 1_000_000;

struct Env {
    server: NatsServer,
    client: async_nats::Client,
    js: jetstream::Context,
    dir: tempfile::TempDir,
}

impl Env {
    async fn start(ack_wait: Duration) -> Env {
        let server = NatsServer::start().unwrap();
        let client = server.connect().await.unwrap();
        let js = jetstream::new(client.clone());
        let topology = Topology {
            ack_wait,
            ..Topology::default()
        };
        topology.apply(&js).await.unwrap();
        assert!(topology.diff(&js).await.unwrap().is_empty());
        Env {
            server,
            client,
            js,
            dir: tempfile::tempdir().unwrap(),
        }
    }

    /// Creation time of `AOB_AUDIT` in nanoseconds since the Unix epoch, as object names
    /// carry it.
    async fn stream_created(&self) -> u64 {
        let mut s = self.js.get_stream(aob_streams::AUDIT).await.unwrap();
        let created = s.info().await.unwrap().created.unix_timestamp_nanos();
        u64::try_from(created).unwrap()
    }

    /// The sink's intent log bucket.
    async fn intent_bucket(&self) -> async_nats::jetstream::kv::Store {
        self.js
            .get_key_value(aob_streams::AUDIT_SINK_BUCKET)
            .await
            .unwrap()
    }

    /// Writes the sink's intent log as a sink that stopped at some point would have left it.
    async fn put_intent(&self, intent: serde_json::Value) {
        self.intent_bucket()
            .await
            .put(INTENT_KEY, serde_json::to_vec(&intent).unwrap().into())
            .await
            .unwrap();
    }

    fn url(&self) -> String {
        format!("file://{}", self.dir.path().join("audit").display())
    }

    fn store(&self) -> (Arc<dyn ObjectStore>, Path) {
        aob_audit::open(&self.url()).unwrap()
    }

    /// Starts a sink on its own connection; returns its stop token and task.
    async fn sink(
        &self,
        cfg: SinkConfig,
    ) -> (
        CancellationToken,
        tokio::task::JoinHandle<aob_audit::Result<()>>,
    ) {
        let client = self.server.connect().await.unwrap();
        let stop = CancellationToken::new();
        let url = self.url();
        let token = stop.clone();
        let task = tokio::spawn(async move { aob_fn_audit::run(client, &url, cfg, token).await });
        (stop, task)
    }

    async fn publish(&self, records: &[DecisionRecord]) {
        let mut acks = Vec::new();
        for r in records {
            acks.push(aob_runtime::bus::publish_record(&self.js, r).await.unwrap());
        }
        for a in acks {
            a.await.unwrap();
        }
    }

    async fn publish_raw(&self, subject: &str, body: &[u8]) {
        self.js
            .publish(subject.to_string(), bytes::Bytes::copy_from_slice(body))
            .await
            .unwrap()
            .await
            .unwrap();
    }

    /// Asks the sink to flush; waits for a sink to be subscribed.
    async fn flush(&self) -> FlushReport {
        let deadline = Instant::now() + Duration::from_secs(30);
        let reply = loop {
            match self.client.request(AUDIT_FLUSH, bytes::Bytes::new()).await {
                Ok(r) => break r,
                Err(e)
                    if e.kind() == async_nats::client::RequestErrorKind::NoResponders
                        && Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                Err(e) => panic!("flush request: {e}"),
            }
        };
        serde_json::from_slice(&reply.payload).unwrap_or_else(|e| {
            panic!(
                "flush reply {}: {e}",
                String::from_utf8_lossy(&reply.payload)
            )
        })
    }

    /// Flushes until the files hold `n` rows and nothing is pending.
    async fn flush_until(&self, n: u64, within: Duration) -> Vec<aob_audit::FileInfo> {
        let (store, prefix) = self.store();
        let deadline = Instant::now() + within;
        loop {
            let report = self.flush().await;
            let files = aob_audit::list(&store, &prefix).await.unwrap();
            let rows: u64 = files.iter().map(|f| f.rows).sum();
            if rows >= n && report.pending == 0 {
                return files;
            }
            assert!(
                Instant::now() < deadline,
                "{rows} of {n} rows written, {} pending",
                report.pending
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Every `record_id` in every Parquet file, read with the Parquet reader.
    fn record_ids(&self) -> Vec<String> {
        let mut ids = Vec::new();
        let mut dirs = vec![self.dir.path().join("audit")];
        while let Some(d) = dirs.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    dirs.push(p);
                } else if p.extension().is_some_and(|x| x == "parquet") {
                    let file = std::fs::File::open(&p).unwrap();
                    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
                        .unwrap()
                        .build()
                        .unwrap();
                    for batch in reader {
                        let batch = batch.unwrap();
                        let col = batch
                            .column_by_name("record_id")
                            .unwrap()
                            .as_string::<i32>();
                        ids.extend(col.iter().map(|v| v.unwrap().to_string()));
                    }
                }
            }
        }
        ids
    }
}

fn record(tenant: &str, i: usize, at_us: i64) -> DecisionRecord {
    let mut r = DecisionRecord::new(
        format!("{tenant}.run{}.h{i}", i / 10),
        tenant,
        &format!("run{}", i / 10),
        AuditKind::StepCompleted,
        "engine",
        at_us,
    );
    r.step_id = Some(format!("s{}", i % 10));
    r.attempt = Some(1);
    r
}

fn assert_unique(ids: &[String], n: usize) {
    let set: HashSet<&String> = ids.iter().collect();
    assert_eq!(ids.len(), n, "rows");
    assert_eq!(set.len(), n, "distinct record ids");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_1200_records_of_two_tenants_once_in_the_layout() {
    let env = Env::start(Duration::from_secs(30)).await;
    let records: Vec<DecisionRecord> = (0..1200)
        .map(|i| {
            let tenant = if i % 3 == 0 { "beta" } else { "acme" };
            record(tenant, i, NOV21_US + i as i64 * 1_000_000)
        })
        .collect();
    env.publish(&records).await;
    let cfg = SinkConfig {
        max_rows: 500,
        max_age: Duration::from_secs(3600),
        ..SinkConfig::default()
    };
    let (stop, task) = env.sink(cfg).await;
    let files = env.flush_until(1200, Duration::from_secs(60)).await;

    let (_, prefix) = env.store();
    let total: u64 = files.iter().map(|f| f.rows).sum();
    assert_eq!(total, 1200);
    assert!(
        files.len() >= 4,
        "two tenants, at least two batches: {files:?}"
    );
    for f in &files {
        let name = parse_object_path(&prefix, &f.path)
            .unwrap_or_else(|| panic!("{} does not follow the layout", f.path));
        assert!(["acme", "beta"].contains(&name.tenant.as_str()), "{name:?}");
        assert_eq!(name.date, "2026-11-21");
        assert!(name.first_seq <= name.last_seq);
        assert_eq!(name.stream, Some(env.stream_created().await));
        assert!(f.size > 0 && f.rows > 0);
        assert_eq!(
            f.path,
            object_path(
                &prefix,
                &name.tenant,
                Date::from_unix_micros(NOV21_US),
                name.stream.unwrap(),
                name.first_seq,
                name.last_seq
            )
        );
    }
    assert_unique(&env.record_ids(), 1200);
    // An empty flush still answers.
    let empty = env.flush().await;
    assert!(empty.files.is_empty() && empty.rows == 0, "{empty:?}");
    stop.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_is_dead_lettered_and_the_rest_written() {
    let env = Env::start(Duration::from_secs(30)).await;
    let good: Vec<DecisionRecord> = (0..10).map(|i| record("acme", i, NOV21_US)).collect();
    env.publish(&good[..5]).await;
    env.publish_raw(&audit("acme"), b"{not json").await;
    let beta = serde_json::to_vec(&record("beta", 99, NOV21_US)).unwrap();
    env.publish_raw(&audit("acme"), &beta).await;
    let mut extra = serde_json::to_value(record("acme", 98, NOV21_US)).unwrap();
    extra["surprise"] = serde_json::json!(true);
    env.publish_raw(&audit("acme"), &serde_json::to_vec(&extra).unwrap())
        .await;
    env.publish(&good[5..]).await;
    let (stop, task) = env.sink(SinkConfig::default()).await;
    env.flush_until(10, Duration::from_secs(30)).await;
    assert_unique(&env.record_ids(), 10);
    let mut dlq = env.js.get_stream(aob_streams::DLQ).await.unwrap();
    let info = dlq.info().await.unwrap();
    assert_eq!(info.state.messages, 3, "one dead letter per bad message");
    let last = dlq
        .get_last_raw_message_by_subject("aob.acme.dlq.audit")
        .await
        .unwrap();
    let letter: serde_json::Value = serde_json::from_slice(&last.payload).unwrap();
    assert!(
        letter["reason"].as_str().unwrap().contains("surprise"),
        "{letter}"
    );
    stop.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_batch_is_rewritten_under_the_same_names() {
    let env = Env::start(Duration::from_secs(30)).await;
    let records: Vec<DecisionRecord> = (0..300).map(|i| record("acme", i, NOV21_US)).collect();
    env.publish(&records).await;
    // A sink died after its intent for sequences 1..=200 and part of the objects: one
    // truncated object and one that the rewrite will not produce.
    let (store, prefix) = env.store();
    let day = Date::from_unix_micros(NOV21_US);
    let created = env.stream_created().await;
    let name = object_path(&prefix, "acme", day, created, 1, 200);
    let stale = object_path(&prefix, "acme", Date::from_days(0), created, 1, 3);
    let partial = aob_audit::encode(&records[..3]).unwrap();
    for p in [&name, &stale] {
        object_store::ObjectStoreExt::put(store.as_ref(), p, partial.clone().into())
            .await
            .unwrap();
    }
    env.put_intent(serde_json::json!({
        "first": 1, "last": 200, "count": 200, "state": "writing",
        "seqs": [[1, 200]], "files": [name.to_string(), stale.to_string()]
    }))
    .await;

    let (stop, task) = env.sink(SinkConfig::default()).await;
    let files = env.flush_until(300, Duration::from_secs(30)).await;
    assert_eq!(files[0].path, name);
    assert_eq!(
        files[0].rows, 200,
        "the truncated object was rewritten whole"
    );
    assert!(
        files.iter().all(|f| f.path != stale),
        "the stale object is gone"
    );
    assert_unique(&env.record_ids(), 300);
    let after: serde_json::Value = serde_json::from_slice(
        &env.intent_bucket()
            .await
            .get(INTENT_KEY)
            .await
            .unwrap()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(after["state"], "done");
    assert_eq!(after["done_upto"], 300);
    stop.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_written_batch_is_not_written_again() {
    let env = Env::start(Duration::from_secs(30)).await;
    let records: Vec<DecisionRecord> = (0..100).map(|i| record("acme", i, NOV21_US)).collect();
    env.publish(&records).await;
    // A sink died after writing sequences 1..=60, before acknowledging them.
    let (store, prefix) = env.store();
    let name = object_path(
        &prefix,
        "acme",
        Date::from_unix_micros(NOV21_US),
        env.stream_created().await,
        1,
        60,
    );
    object_store::ObjectStoreExt::put(
        store.as_ref(),
        &name,
        aob_audit::encode(&records[..60]).unwrap().into(),
    )
    .await
    .unwrap();
    env.put_intent(serde_json::json!({
        "first": 1, "last": 60, "count": 60, "state": "written",
        "seqs": [[1, 60]], "files": [name.to_string()]
    }))
    .await;
    let (stop, task) = env.sink(SinkConfig::default()).await;
    let files = env.flush_until(100, Duration::from_secs(30)).await;
    assert_eq!(files.len(), 2, "{files:?}");
    assert_unique(&env.record_ids(), 100);
    stop.cancel();
    task.await.unwrap().unwrap();
}

/// An intent log left by a sink of a stream that was deleted since: its sequences, floor and
/// interrupted batch speak of the old stream, and applied to the new one they would skip new
/// records and rewrite old names with new rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_intent_of_a_deleted_stream_is_not_applied_to_the_new_one() {
    let env = Env::start(Duration::from_secs(30)).await;
    let records: Vec<DecisionRecord> = (0..80).map(|i| record("acme", i, NOV21_US)).collect();
    env.publish(&records).await;
    let created = env.stream_created().await;
    // What the old stream's sink left: one file of 10 rows that are not in the new stream,
    // and an interrupted batch of sequences 1..=40 listing that file.
    let (store, prefix) = env.store();
    let old: Vec<DecisionRecord> = (100..110).map(|i| record("acme", i, NOV21_US)).collect();
    let old_file = object_path(
        &prefix,
        "acme",
        Date::from_unix_micros(NOV21_US),
        created - 1,
        1,
        40,
    );
    object_store::ObjectStoreExt::put(
        store.as_ref(),
        &old_file,
        aob_audit::encode(&old).unwrap().into(),
    )
    .await
    .unwrap();
    env.put_intent(serde_json::json!({
        "first": 1, "last": 40, "count": 40, "state": "writing",
        "seqs": [[1, 40]], "files": [old_file.to_string()],
        "written": [[41, 60]], "floor": 70, "stream": created - 1
    }))
    .await;

    let (stop, task) = env.sink(SinkConfig::default()).await;
    let files = env.flush_until(90, Duration::from_secs(30)).await;
    assert!(
        files.iter().any(|f| f.path == old_file && f.rows == 10),
        "the old stream's file stays as it was: {files:?}"
    );
    assert_unique(&env.record_ids(), 90);
    let after: serde_json::Value = serde_json::from_slice(
        &env.intent_bucket()
            .await
            .get(INTENT_KEY)
            .await
            .unwrap()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(after["stream"], created);
    stop.cancel();
    task.await.unwrap().unwrap();
}

/// Sinks killed over and over (their task dropped mid-await, their connection closed)
/// while records arrive for two tenants across midnight: at a random moment, right after
/// the intent says `writing` (objects half written), or right after it says `written`
/// (acks half sent). Afterwards every record is in exactly one row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_sink_again_and_again_loses_and_repeats_nothing() {
    let env = Env::start(Duration::from_secs(1)).await;
    let kv = env.intent_bucket().await;
    let n = 3000;
    let midnight = NOV21_US + 86_400_000_000;
    let records: Vec<DecisionRecord> = (0..n)
        .map(|i| {
            let tenant = if i % 2 == 0 { "acme" } else { "beta" };
            record(tenant, i, midnight - 1_500_000 + i as i64 * 1000)
        })
        .collect();
    let cfg = SinkConfig {
        max_rows: 170,
        max_age: Duration::from_millis(80),
        ..SinkConfig::default()
    };
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = move |lo: u64, hi: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        lo + seed % (hi - lo)
    };
    let mut left_in = std::collections::HashMap::<String, usize>::new();
    for (round, chunk) in records.chunks(200).enumerate() {
        let mut watch = kv.watch(INTENT_KEY).await.unwrap();
        env.publish(chunk).await;
        let (_stop, task) = env.sink(cfg.clone()).await;
        let kill_on = ["", "writing", "written"][round % 3];
        if kill_on.is_empty() {
            tokio::time::sleep(Duration::from_millis(next(5, 400))).await;
        } else {
            let _ = tokio::time::timeout(Duration::from_secs(5), async {
                while let Some(Ok(e)) = futures::StreamExt::next(&mut watch).await {
                    let v: serde_json::Value = serde_json::from_slice(&e.value).unwrap();
                    if v["state"] == kill_on {
                        return;
                    }
                }
            })
            .await;
        }
        task.abort();
        match task.await {
            Err(e) if e.is_cancelled() => {}
            Ok(Err(aob_audit::Error::Conflict(e))) => {
                eprintln!("a killed sink's write landed late: {e}")
            }
            other => panic!("sink ended with {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(next(20, 150))).await;
        if let Some(v) = kv.get(INTENT_KEY).await.unwrap() {
            let v: serde_json::Value = serde_json::from_slice(&v).unwrap();
            *left_in
                .entry(v["state"].as_str().unwrap().to_string())
                .or_default() += 1;
        }
    }
    eprintln!("intent states left by killed sinks: {left_in:?}");
    assert!(
        left_in.get("writing").is_some_and(|&n| n > 0)
            && left_in.get("written").is_some_and(|&n| n > 0),
        "kills landed mid-write and mid-ack: {left_in:?}"
    );
    let (stop, task) = env.sink(cfg).await;
    let files = env.flush_until(n as u64, Duration::from_secs(120)).await;
    assert_eq!(files.iter().map(|f| f.rows).sum::<u64>(), n as u64);
    let (_, prefix) = env.store();
    let dates: HashSet<String> = files
        .iter()
        .map(|f| parse_object_path(&prefix, &f.path).unwrap().date)
        .collect();
    assert_eq!(dates.len(), 2, "{dates:?}");
    assert_unique(&env.record_ids(), n);
    stop.cancel();
    task.await.unwrap().unwrap();
}

/// Each failpoint stops a sink as if killed at that point of a flush; the next sink repairs
/// or skips what it left, and every record ends up in exactly one row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_failpoint_leaves_each_record_in_exactly_one_row() {
    use aob_audit::sink::Failpoint;
    let env = Env::start(Duration::from_secs(1)).await;
    let kv = env.intent_bucket().await;
    let mut published = 0;
    for (fp, left) in [
        (Failpoint::AfterIntent, "writing"),
        (Failpoint::AfterWrite, "writing"),
        (Failpoint::AfterWritten, "written"),
        (Failpoint::MidAck, "written"),
        (Failpoint::AfterWrite, "writing"),
    ] {
        let records: Vec<DecisionRecord> = (published..published + 250)
            .map(|i| record(if i % 2 == 0 { "acme" } else { "beta" }, i, NOV21_US))
            .collect();
        published += 250;
        env.publish(&records).await;
        let cfg = SinkConfig {
            max_rows: 100,
            failpoint: Some(fp),
            ..SinkConfig::default()
        };
        let (_stop, task) = env.sink(cfg).await;
        let ended = tokio::time::timeout(Duration::from_secs(20), task)
            .await
            .unwrap()
            .unwrap();
        assert!(
            matches!(ended, Err(aob_audit::Error::Failpoint(name)) if name == fp.as_str()),
            "{ended:?}"
        );
        let intent: serde_json::Value =
            serde_json::from_slice(&kv.get(INTENT_KEY).await.unwrap().unwrap()).unwrap();
        assert_eq!(intent["state"], left, "{fp:?}: {intent}");
    }
    let (stop, task) = env.sink(SinkConfig::default()).await;
    env.flush_until(published as u64, Duration::from_secs(60))
        .await;
    assert_unique(&env.record_ids(), published);
    stop.cancel();
    task.await.unwrap().unwrap();
}

/// Takes up to `n` deliveries from the sink's consumer and drops them unacknowledged, as a
/// sink that dies (or a reconnect that loses them) would; returns how many it took.
async fn steal(js: &jetstream::Context, n: usize, wait: Duration) -> usize {
    let consumer: jetstream::consumer::PullConsumer = js
        .get_stream(aob_streams::AUDIT)
        .await
        .unwrap()
        .get_consumer(aob_streams::AUDIT_SINK)
        .await
        .unwrap();
    let mut batch = consumer
        .fetch()
        .max_messages(n)
        .expires(wait)
        .messages()
        .await
        .unwrap();
    let mut took = 0;
    while let Some(m) = futures::StreamExt::next(&mut batch).await {
        if m.is_ok() {
            took += 1;
        }
    }
    took
}

/// The consumer acknowledges a batch with one ack (ack policy `all`), which also
/// acknowledges every earlier delivery. Deliveries this sink never saw, before it started
/// and while it runs, must be written before such an ack passes them: without that, this
/// test loses the stolen records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_the_sink_never_saw_are_written_before_an_ack_passes_them() {
    // A long ack wait: nothing stolen comes back by redelivery during the test.
    let env = Env::start(Duration::from_secs(120)).await;
    let n = 600;
    let records: Vec<DecisionRecord> = (0..n)
        .map(|i| {
            record(
                if i % 3 == 0 { "acme" } else { "beta" },
                i,
                NOV21_US + i as i64,
            )
        })
        .collect();
    env.publish(&records[..200]).await;
    // Delivered to a "sink" that died before this one started.
    assert_eq!(steal(&env.js, 30, Duration::from_secs(2)).await, 30);
    let cfg = SinkConfig {
        max_rows: 50,
        max_age: Duration::from_millis(100),
        ..SinkConfig::default()
    };
    let (stop, task) = env.sink(cfg).await;
    env.flush_until(200, Duration::from_secs(30)).await;
    // While it runs, other pulls on its consumer take some deliveries and drop them.
    let thief = {
        let js = env.js.clone();
        tokio::spawn(async move {
            let mut took = 0;
            for _ in 0..40 {
                took += steal(&js, 3, Duration::from_millis(50)).await;
            }
            took
        })
    };
    for chunk in records[200..].chunks(20) {
        env.publish(chunk).await;
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    let stolen = thief.await.unwrap();
    assert!(
        stolen > 0,
        "the second thief took nothing; the test proves nothing"
    );
    let files = env.flush_until(n as u64, Duration::from_secs(60)).await;
    assert_eq!(files.iter().map(|f| f.rows).sum::<u64>(), n as u64);
    assert_unique(&env.record_ids(), n);
    stop.cancel();
    task.await.unwrap().unwrap();
}

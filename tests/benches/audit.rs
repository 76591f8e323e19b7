//! `cargo bench -p aob-tests --bench audit`: the audit sink's sustained records/s into
//! Parquet (local folder and an S3-compatible server), bytes per record, and the delay from
//! publish to queryable, against a baseline measured on the same server in the same run:
//! a bare pull consumer that only acks the same records.
//!
//! Sizes can be lowered with AOB_BENCH_SCALE (e.g. 0.1) for a quick look.

// The allocator of the `aob-audit` and `aob` binaries.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use async_nats::jetstream::{self, consumer::pull};
use futures::StreamExt;
use object_store::ObjectStore;
use object_store::path::Path;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use aob_audit::sink::SinkConfig;
use aob_model::audit::{AuditKind, DecisionRecord};
use aob_tests::Stack;
use aob_tests::audit::S3Server;

fn scale(n: usize) -> usize {
    aob_tests::bench_scale(n, 10)
}

/// Records per sink run: a whole number of default batches (50,000 rows).
fn sink_records() -> usize {
    scale(200_000).div_ceil(50_000) * 50_000
}

/// A typical function record: rendered input and output inline, digests, a duration.
fn record(i: usize) -> DecisionRecord {
    let tenant = if i.is_multiple_of(4) {
        "acme"
    } else {
        "default"
    };
    let now = aob_runtime::now_us();
    let mut r = DecisionRecord::new(
        format!("bench-{i}"),
        tenant,
        &format!("01JBENCH{:08}", i / 20),
        AuditKind::TaskExecuted,
        "fn.transform",
        now,
    );
    r.workflow = Some("greeting".into());
    r.workflow_version = Some(3);
    r.step_id = Some(format!("step{}", i % 20));
    r.node_type = Some("transform".into());
    r.attempt = Some(1);
    r.status = Some("COMPLETED".into());
    r.decision = Some("completed".into());
    r.started_at_us = Some(now - 850);
    r.duration_us = Some(850);
    r.with_input(&json!({"text": format!("Hello, user {i}!"), "length": i % 97}))
        .with_output(&json!({"greeting": format!("Hello, user {i}!"), "checked": true}))
}

/// Publishes `n` records (ids from `from`), acks awaited in windows.
async fn publish(js: &jetstream::Context, from: usize, n: usize) -> Result<()> {
    let mut acks = Vec::with_capacity(1024);
    for i in from..from + n {
        acks.push(aob_runtime::bus::publish_record(js, &record(i)).await?);
        if acks.len() == 1024 {
            for a in acks.drain(..) {
                a.await?;
            }
        }
    }
    for a in acks {
        a.await?;
    }
    Ok(())
}

/// A bare pull consumer that reads, parses and acks `n` messages of AOB_AUDIT: one ack per
/// message (`every` 1, ack policy explicit, the baseline) or one per `every` messages (ack
/// policy all, as the sink acks a batch: the most any consumer reaches here).
async fn baseline(js: &jetstream::Context, n: usize, every: usize) -> Result<f64> {
    let stream = js.get_stream(aob_streams::AUDIT).await?;
    let ack_policy = if every == 1 {
        jetstream::consumer::AckPolicy::Explicit
    } else {
        jetstream::consumer::AckPolicy::All
    };
    let c = stream
        .create_consumer(pull::Config {
            durable_name: Some("bench-baseline".into()),
            filter_subject: aob_streams::subjects::AUDIT_ALL_TENANTS.into(),
            ack_policy,
            max_ack_pending: 200_000,
            ..Default::default()
        })
        .await?;
    let start = Instant::now();
    let mut msgs = c.stream().max_messages_per_batch(1000).messages().await?;
    for i in 0..n {
        let m = msgs.next().await.context("consumer ended")??;
        let _: DecisionRecord = serde_json::from_slice(&m.payload)?;
        if (i + 1) % every == 0 || i + 1 == n {
            m.ack().await.map_err(|e| anyhow::anyhow!("{e}"))?;
        }
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    drop(msgs);
    stream.delete_consumer("bench-baseline").await?;
    Ok(rate)
}

/// Runs the sink on `store` until everything published is written; returns records/s and
/// bytes per record.
async fn sink_run(
    stack: &Stack,
    store: Arc<dyn ObjectStore>,
    prefix: Path,
    n: usize,
) -> Result<(f64, f64, CancellationToken)> {
    let stop = CancellationToken::new();
    let start = Instant::now();
    {
        let (client, store, prefix, stop) = (
            stack.client.clone(),
            store.clone(),
            prefix.clone(),
            stop.clone(),
        );
        tokio::spawn(async move {
            if let Err(e) =
                aob_audit::sink::serve(client, store, prefix, SinkConfig::default(), stop).await
            {
                eprintln!("sink: {e}");
            }
        });
    }
    // Watched without flush requests (a flush request writes a partial batch and waits
    // for it): `n` is a whole number of batches, so the last one is written by size.
    let mut consumer: jetstream::consumer::PullConsumer = stack
        .js
        .get_stream(aob_streams::AUDIT)
        .await?
        .get_consumer(aob_streams::AUDIT_SINK)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let info = consumer.info().await?;
        if info.num_pending == 0 && info.num_ack_pending == 0 {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the sink did not catch up in 600 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    let files = aob_audit::list(&store, &prefix).await?;
    let rows: u64 = files.iter().map(|f| f.rows).sum();
    anyhow::ensure!(rows == n as u64, "{rows} rows written for {n} records");
    let bytes: u64 = files.iter().map(|f| f.size).sum();
    Ok((rate, bytes as f64 / n as f64, stop))
}

/// Publishes at a steady rate with the sink at its defaults; every 500 ms a marker notes
/// its publish time and the count published so far, and a poller of the files' footers
/// notes when the rows first reach that count.
async fn delay(
    stack: &Stack,
    store: Arc<dyn ObjectStore>,
    prefix: Path,
    from: usize,
) -> Result<Vec<Duration>> {
    let per_tick = 250; // 5,000 records/s in 50 ms ticks
    let ticks: u32 = 240; // 12 s
    let base: u64 = aob_audit::list(&store, &prefix)
        .await?
        .iter()
        .map(|f| f.rows)
        .sum();
    let (marks, mut marks_rx) = tokio::sync::mpsc::unbounded_channel::<(u64, Instant)>();
    let poller = tokio::spawn(async move {
        let mut waiting = std::collections::VecDeque::new();
        let mut delays = Vec::new();
        let mut open = true;
        while open || !waiting.is_empty() {
            loop {
                match marks_rx.try_recv() {
                    Ok(m) => waiting.push_back(m),
                    Err(tokio::sync::mpsc::error::TryRecvError::Empty) => break,
                    Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => {
                        open = false;
                        break;
                    }
                }
            }
            let rows: u64 = match aob_audit::list(&store, &prefix).await {
                Ok(files) => files.iter().map(|f| f.rows).sum::<u64>() - base,
                Err(_) => 0,
            };
            let now = Instant::now();
            while waiting.front().is_some_and(|(upto, _)| *upto <= rows) {
                if let Some((_, at)) = waiting.pop_front() {
                    delays.push(now.saturating_duration_since(at));
                }
            }
            if waiting
                .front()
                .is_some_and(|(_, at)| at.elapsed() > Duration::from_secs(120))
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        delays
    });
    let mut published = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    for t in 0..ticks {
        tick.tick().await;
        publish(&stack.js, from + published as usize, per_tick).await?;
        published += per_tick as u64;
        if t.is_multiple_of(10) {
            let _ = marks.send((published, Instant::now()));
        }
    }
    drop(marks);
    let delays = poller.await?;
    anyhow::ensure!(
        delays.len() == (ticks / 10) as usize,
        "only {} of {} markers became queryable within 2 minutes",
        delays.len(),
        ticks / 10
    );
    Ok(delays)
}

/// The record-id index's work per record in a sink batch: check every row against the
/// folder's ids, then add them; the folder already holds one batch.
async fn index_cost(sample: &[DecisionRecord]) -> Result<f64> {
    let store: Arc<dyn ObjectStore> = Arc::new(object_store::memory::InMemory::new());
    let prefix = Path::from("audit");
    let rows = |from: u64| -> Vec<aob_audit::sink::Row> {
        sample
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let mut r = r.clone();
                r.record_id = format!("{}-{from}", r.record_id);
                (from + i as u64, Arc::new(r))
            })
            .collect()
    };
    let mut index = aob_audit::index::Index::default();
    for f in index.missing(&rows(0)) {
        index.load(&store, &prefix, &f, &[]).await?;
    }
    let mut spent = Duration::ZERO;
    for round in 0..2u64 {
        let batch = rows(round * 1_000_000);
        let t = Instant::now();
        let (kept, _) = index.retain_new(batch);
        let checked = t.elapsed();
        let (groups, _) = aob_audit::sink::group(kept);
        let t = Instant::now();
        let pending = index.pending(&groups);
        index.commit(pending);
        if round == 1 {
            spent = checked + t.elapsed();
        }
    }
    Ok(spent.as_nanos() as f64 / sample.len() as f64)
}

fn pick(mut v: Vec<Duration>, q: f64) -> f64 {
    v.sort();
    let i = ((v.len() as f64 - 1.0) * q).round() as usize;
    v.get(i).map_or(0.0, |d| d.as_secs_f64())
}

#[tokio::main]
async fn main() -> Result<()> {
    let n = sink_records();
    // Local files.
    let stack = Stack::bare().await?;
    publish(&stack.js, 0, n).await?;
    let base = baseline(&stack.js, n, 1).await?;
    let batched = baseline(&stack.js, n, 1000).await?;
    let dir = tempfile::tempdir()?;
    let (store, prefix) = aob_audit::open(&format!("file://{}", dir.path().display()))?;
    let (local, local_bytes, stop) = sink_run(&stack, store.clone(), prefix.clone(), n).await?;
    let delays = delay(&stack, store, prefix, n).await?;
    stop.cancel();

    // Encoding alone: records → Parquet bytes, no bus, no store.
    let sample: Vec<DecisionRecord> = (0..scale(50_000)).map(record).collect();
    let t = Instant::now();
    let encoded = aob_audit::encode(&sample)?;
    let encode_rate = sample.len() as f64 / t.elapsed().as_secs_f64();
    let index_ns = index_cost(&sample).await?;

    // An S3-compatible server (moto).
    let s3 = S3Server::start().await?;
    s3.create_bucket("bench").await?;
    let stack2 = Stack::bare().await?;
    publish(&stack2.js, 0, n).await?;
    let base2 = baseline(&stack2.js, n, 1).await?;
    let (s3_rate, s3_bytes, stop2) =
        sink_run(&stack2, s3.store("bench")?, Path::from("audit"), n).await?;
    stop2.cancel();

    println!(
        "records: {n} per run, ~{} bytes of JSON each",
        serde_json::to_vec(&record(1))?.len()
    );
    println!("{:<44} {:>12} {:>10}", "benchmark", "records/s", "vs base");
    println!(
        "{:<44} {:>12.0} {:>10}",
        "baseline: consume+parse+ack (local server)", base, "1.00x"
    );
    println!(
        "{:<44} {:>12.0} {:>9.2}x",
        "consume+parse, one ack per 1,000 (ceiling)",
        batched,
        batched / base
    );
    println!(
        "{:<44} {:>12.0} {:>9.2}x",
        "sink → local files",
        local,
        local / base
    );
    println!(
        "{:<44} {:>12.0} {:>10}",
        "baseline: consume+parse+ack (2nd server)", base2, "1.00x"
    );
    println!(
        "{:<44} {:>12.0} {:>9.2}x",
        "sink → S3 (moto)",
        s3_rate,
        s3_rate / base2
    );
    println!(
        "{:<44} {:>12.0} {:>9.2}x",
        "encode only (records → Parquet bytes)",
        encode_rate,
        encode_rate / base
    );
    println!("record-id index (check + add, in a sink batch): {index_ns:.0} ns per record");
    println!();
    println!(
        "bytes per record after compression: local {local_bytes:.1}, S3 {s3_bytes:.1}, encode-only {:.1}",
        encoded.len() as f64 / sample.len() as f64
    );
    println!(
        "publish → queryable at default settings (5,000 records/s steady): p50 {:.2} s, max {:.2} s (target <= 5 s)",
        pick(delays.clone(), 0.5),
        pick(delays, 1.0)
    );
    Ok(())
}

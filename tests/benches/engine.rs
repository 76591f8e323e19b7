//! `cargo bench -p aob-tests --bench engine`: per-step latency and throughput of the engine
//! against a floor loop measured on the same nats-server in the same run.
//!
//! (a) floor: consume → KV compare-and-set → publish (await ack) → ack, one chain for
//!     latency and 100 chains at once for throughput;
//! (b) one run of a sequential chain of 200 no-op steps;
//! (c) 1,000 concurrent runs of 10 no-op steps.
//!
//! (a) with one chain and (b) are measured in alternating rounds (`AOB_BENCH_ROUNDS`,
//! default 15), so that both see the machine in the same state; (b)/(a) is the median of
//! the rounds' ratios. Sizes can be lowered with AOB_BENCH_SCALE (e.g. 0.1) for a quick
//! look. `AOB_BENCH_SYNC=always` runs the server with `jetstream { sync_interval: always }`
//! (every stored write fsynced before it is acknowledged).

// The allocator of the `aob` binary, which runs all of this in one process (`aob dev`).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use async_nats::jetstream::{self, AckKind, consumer::pull, kv, stream};
use futures::StreamExt;
use serde_json::json;
use tokio::sync::Mutex;

use aob_model::wire::HistoryEvent;
use aob_tests::Stack;

struct Figures {
    name: String,
    p50_ms: f64,
    p99_ms: f64,
    steps_per_s: f64,
}

fn figures(name: &str, mut per_step: Vec<Duration>, steps: usize, elapsed: Duration) -> Figures {
    per_step.sort();
    let pick = |q: f64| {
        if per_step.is_empty() {
            return 0.0;
        }
        let i = ((per_step.len() as f64 - 1.0) * q).round() as usize;
        per_step[i].as_secs_f64() * 1000.0
    };
    Figures {
        name: name.to_string(),
        p50_ms: pick(0.50),
        p99_ms: pick(0.99),
        steps_per_s: steps as f64 / elapsed.as_secs_f64(),
    }
}

fn scale(n: usize) -> usize {
    aob_tests::bench_scale(n, 2)
}

/// One chain of the floor loop: `steps` hops on subject `bench.<chain>`.
async fn floor_chain(
    js: jetstream::Context,
    kv: kv::Store,
    chain: usize,
    steps: usize,
) -> Result<Vec<Duration>> {
    let subject = format!("bench.{chain}");
    let s = js.get_stream("BENCH").await?;
    let consumer = s
        .create_consumer(pull::Config {
            durable_name: Some(format!("c{chain}")),
            filter_subject: subject.clone(),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ..Default::default()
        })
        .await?;
    let key = format!("k{chain}");
    let mut rev = kv.put(&key, "0".into()).await?;
    let mut msgs = consumer.messages().await?;
    js.publish(subject.clone(), "0".into()).await?.await?;
    let mut lat = Vec::with_capacity(steps);
    let mut last = Instant::now();
    for i in 1..=steps {
        let msg = msgs.next().await.context("stream ended")??;
        rev = kv.update(&key, i.to_string().into(), rev).await?;
        if i < steps {
            js.publish(subject.clone(), i.to_string().into())
                .await?
                .await?;
        }
        msg.ack_with(AckKind::Ack)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let now = Instant::now();
        lat.push(now - last);
        last = now;
    }
    Ok(lat)
}

async fn floor(stack: &Stack, chains: usize, steps: usize) -> Result<(Vec<Duration>, Duration)> {
    let js = stack.js.clone();
    let _ = js.delete_stream("BENCH").await;
    js.create_stream(stream::Config {
        name: "BENCH".into(),
        subjects: vec!["bench.>".into()],
        retention: stream::RetentionPolicy::WorkQueue,
        ..Default::default()
    })
    .await?;
    let kv = js
        .create_key_value(kv::Config {
            bucket: "BENCH_KV".into(),
            history: 1,
            ..Default::default()
        })
        .await?;
    let start = Instant::now();
    let mut handles = Vec::new();
    for c in 0..chains {
        handles.push(tokio::spawn(floor_chain(js.clone(), kv.clone(), c, steps)));
    }
    let mut all = Vec::new();
    for h in handles {
        all.extend(h.await??);
    }
    Ok((all, start.elapsed()))
}

/// Runs `runs` runs of a chain of `steps` no-op steps; per-step latency from the arrival
/// times of consecutive `step_completed` events of each run.
async fn chains(
    stack: &Stack,
    tenant: &str,
    runs: usize,
    steps: usize,
) -> Result<(Vec<Duration>, Duration)> {
    let mut yaml = format!("name: chain{steps}\nsteps:\n");
    for i in 0..steps {
        if i == 0 {
            yaml.push_str("  - {id: s0, type: transform, output: 0}\n");
        } else {
            yaml.push_str(&format!(
                "  - {{id: s{i}, type: transform, needs: [s{}], output: {i}}}\n",
                i - 1
            ));
        }
    }
    stack.publish(tenant, &yaml).await?;
    let arrivals: Arc<Mutex<std::collections::HashMap<String, Vec<Instant>>>> = Arc::default();
    let mut sub = stack
        .client
        .subscribe(format!("aob.{tenant}.run.*.>"))
        .await?;
    // Ended with this call, so that rounds do not add listeners.
    let starts: Arc<Mutex<std::collections::HashMap<String, Instant>>> = Arc::default();
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
    let listener = {
        let arrivals = arrivals.clone();
        tokio::spawn(async move {
            while let Some(m) = sub.next().await {
                let now = Instant::now();
                let Ok(ev) = serde_json::from_slice::<HistoryEvent>(&m.payload) else {
                    continue;
                };
                match ev.kind.token() {
                    "step_completed" => arrivals
                        .lock()
                        .await
                        .entry(ev.run_id)
                        .or_default()
                        .push(now),
                    "completed" | "failed" => {
                        let _ = done_tx.send((ev.run_id, ev.kind.token().to_string()));
                    }
                    _ => {}
                }
            }
        })
    };
    let start = Instant::now();
    for _ in 0..runs {
        let id = ulid::Ulid::new().to_string();
        starts.lock().await.insert(id.clone(), Instant::now());
        let cmd = json!({"workflow": format!("chain{steps}"), "input": {}, "run_id": id});
        stack
            .publish_raw(
                &aob_streams::subjects::start(tenant),
                Some(&id),
                serde_json::to_vec(&cmd)?,
            )
            .await?;
    }
    let mut finished = 0;
    while finished < runs {
        let (run, kind) = tokio::time::timeout(Duration::from_secs(600), done_rx.recv())
            .await
            .context("runs did not finish in 10 minutes")?
            .context("history subscription ended")?;
        anyhow::ensure!(kind == "completed", "run {run} {kind}");
        finished += 1;
    }
    let elapsed = start.elapsed();
    listener.abort();
    let starts = starts.lock().await;
    let mut lat = Vec::new();
    for (run, times) in arrivals.lock().await.iter() {
        let mut prev = starts.get(run).copied();
        for t in times {
            if let Some(p) = prev {
                lat.push(*t - p);
            }
            prev = Some(*t);
        }
    }
    Ok((lat, elapsed))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

#[tokio::main]
async fn main() -> Result<()> {
    // AOB_BENCH_SYNC=always: the server fsyncs every write before acknowledging it, the
    // durability of systems that fsync their log.
    let sync = std::env::var("AOB_BENCH_SYNC")
        .ok()
        .filter(|v| !v.is_empty());
    let stack = match &sync {
        Some(every) => {
            let conf = format!("jetstream {{ sync_interval: {every} }}\n");
            println!("server: jetstream sync_interval {every}");
            Stack::start_on(aob_testkit::NatsServer::start_with_config(&conf)?).await?
        }
        None => Stack::start().await?,
    };
    let rounds: usize = std::env::var("AOB_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(15)
        .max(1);
    let floor_steps = scale(500);
    let n = scale(200);
    let (mut a_lat, mut a_el, mut b_lat, mut b_el) =
        (Vec::new(), Duration::ZERO, Vec::new(), Duration::ZERO);
    let mut ratios = Vec::with_capacity(rounds);
    for round in 1..=rounds {
        let (lat, el) = floor(&stack, 1, floor_steps).await?;
        let a = figures("", lat.clone(), floor_steps, el);
        a_lat.extend(lat);
        a_el += el;
        let (lat, el) = chains(&stack, "benchseq", 1, n).await?;
        let b = figures("", lat.clone(), n, el);
        b_lat.extend(lat);
        b_el += el;
        let ratio = b.p50_ms / a.p50_ms;
        eprintln!(
            "round {round}/{rounds}: (a) p50 {:.3} ms, (b) p50 {:.3} ms, (b)/(a) {ratio:.2}x",
            a.p50_ms, b.p50_ms
        );
        ratios.push(ratio);
    }
    let a = figures("(a) floor loop, 1 chain", a_lat, rounds * floor_steps, a_el);
    let b = figures("(b) 1 run x 200 sequential steps", b_lat, rounds * n, b_el);
    let (lat, el) = floor(&stack, 100, scale(100)).await?;
    let a_par = figures("(a) floor loop, 100 chains", lat, 100 * scale(100), el);
    let runs = scale(1000);
    let (lat, el) = chains(&stack, "benchpar", runs, 10).await?;
    let c = figures("(c) 1000 runs x 10 steps", lat, runs * 10, el);
    println!(
        "{:<36} {:>10} {:>10} {:>12}",
        "benchmark", "p50 ms", "p99 ms", "steps/s"
    );
    for f in [&a, &a_par, &b, &c] {
        println!(
            "{:<36} {:>10.3} {:>10.3} {:>12.0}",
            f.name, f.p50_ms, f.p99_ms, f.steps_per_s
        );
    }
    println!();
    println!(
        "(b)/(a) per-step latency, p50: {:.2}x (median of {rounds} rounds; all rounds pooled: {:.2}x) (target <= 2.5x)",
        median(ratios),
        b.p50_ms / a.p50_ms
    );
    println!(
        "(c)/(a) throughput vs 1-chain floor: {:.0}%  vs 100-chain floor: {:.0}% (target >= 40%)",
        100.0 * c.steps_per_s / a.steps_per_s,
        100.0 * c.steps_per_s / a_par.steps_per_s
    );
    Ok(())
}

//! `cargo bench -p aob-tests --bench cluster`: what replication costs. The same runs of
//! `examples/chain` (three steps: transform, validate, transform) on one nats-server with
//! every stream and bucket R1, and on a three-node JetStream cluster on loopback with
//! everything R3; end-to-end throughput (runs completed per second, from the first start
//! published to the last `completed` event) of each, and the ratio.
//!
//! As in the engine bench, the engine and the functions run in this process, each on its
//! own connection to the (first) server; in the cluster the streams' leaders are spread
//! over the three nodes, so most writes cross a route. The two set-ups are measured in
//! alternating rounds (`AOB_BENCH_ROUNDS`, default 5) after a warm-up, so both see the
//! machine in the same state; the figures are the medians of the rounds. Each round starts
//! `AOB_BENCH_SCALE` x 2,000 runs, 64 starts in flight at a time.

// The allocator of the `aob` binary, which runs all of this in one process (`aob dev`).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use futures::StreamExt;
use serde_json::json;

use aob_streams::Topology;
use aob_tests::cluster::Cluster;
use aob_tests::{Fns, Stack};

const T: &str = "bench";

/// The stack on `server` with `topology`: the engine and the functions in-process.
async fn stack_on(server: aob_testkit::NatsServer, topology: Topology) -> Result<Stack> {
    let mut s = Stack::bare_on(server, topology).await?;
    let engine = s.engine().await?;
    s.spawn_engine(engine);
    s.spawn_functions(Fns::AllButHttp).await?;
    s.publish_example(T, "chain").await?;
    Ok(s)
}

/// One node, everything R1.
async fn single() -> Result<Stack> {
    stack_on(
        aob_testkit::NatsServer::start()?,
        aob_tests::test_topology(),
    )
    .await
}

/// Three nodes, everything R3; the stack runs against the first node, the cluster holds
/// the other two.
async fn three() -> Result<(Stack, Cluster)> {
    let mut cluster = Cluster::start(3)?;
    let topology = Topology {
        replicas: 3,
        ..aob_tests::test_topology()
    };
    let js = async_nats::jetstream::new(cluster.connect().await?);
    cluster
        .apply(&js, &topology, Duration::from_secs(60))
        .await?;
    let mut leaders = Vec::new();
    for s in [aob_streams::HISTORY, aob_streams::TASKS, "KV_AOB_RUNS"] {
        let l = cluster.leader(&js, s, Duration::from_secs(30)).await?;
        leaders.push(format!("{s} on {}", cluster.nodes[l].name));
    }
    eprintln!("3-node cluster: {}", leaders.join(", "));
    let first = cluster.nodes.remove(0).server;
    Ok((stack_on(first, topology).await?, cluster))
}

/// Starts `runs` runs, 64 publishes in flight at a time, and waits for all to complete;
/// returns the time from the first publish to the last completion.
async fn round(s: &Stack, runs: usize) -> Result<Duration> {
    let mut done = s
        .client
        .subscribe(format!("aob.{T}.run.*.completed"))
        .await?;
    let mut failed = s.client.subscribe(format!("aob.{T}.run.*.failed")).await?;
    let begun = Instant::now();
    let publishing = {
        let (js, ids) = (
            s.js.clone(),
            (0..runs)
                .map(|_| ulid::Ulid::new().to_string())
                .collect::<Vec<_>>(),
        );
        tokio::spawn(async move {
            let mut sends = futures::stream::iter(ids)
                .map(|id| {
                    let js = js.clone();
                    async move {
                        let body = serde_json::to_vec(
                            &json!({"workflow": "greeting", "input": {"name": "Ada"}, "run_id": id}),
                        )?;
                        let mut headers = async_nats::HeaderMap::new();
                        headers.insert("Nats-Msg-Id", id.as_str());
                        js.publish_with_headers(
                            aob_streams::subjects::start(T),
                            headers,
                            body.into(),
                        )
                        .await?
                        .await?;
                        anyhow::Ok(())
                    }
                })
                .buffer_unordered(64);
            while let Some(r) = sends.next().await {
                r?;
            }
            anyhow::Ok(())
        })
    };
    let mut seen = std::collections::HashSet::new();
    while seen.len() < runs {
        tokio::select! {
            m = done.next() => {
                let m = m.context("subscription ended")?;
                seen.insert(m.subject.split('.').nth(3).unwrap_or_default().to_string());
            }
            m = failed.next() => {
                anyhow::bail!("a run failed: {:?}", m.map(|m| m.subject));
            }
            _ = tokio::time::sleep(Duration::from_secs(120)) => {
                anyhow::bail!("{} of {runs} runs completed, then nothing for 2 minutes", seen.len());
            }
        }
    }
    let elapsed = begun.elapsed();
    publishing.await??;
    ensure!(seen.len() == runs);
    Ok(elapsed)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

#[tokio::main]
async fn main() -> Result<()> {
    let rounds: usize = std::env::var("AOB_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5)
        .max(1);
    let runs = aob_tests::bench_scale(2000, 10);
    let one = single().await?;
    let (three, _cluster) = three().await?;
    // Warm-up: connections, the workflow in the engine's cache, the stores' first blocks.
    round(&one, runs / 10).await?;
    round(&three, runs / 10).await?;
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for r in 1..=rounds {
        let ta = round(&one, runs).await?;
        let tb = round(&three, runs).await?;
        let (ra, rb) = (
            runs as f64 / ta.as_secs_f64(),
            runs as f64 / tb.as_secs_f64(),
        );
        eprintln!(
            "round {r}/{rounds}: 1 node R1 {ra:.0} runs/s ({:.2} s), 3 nodes R3 {rb:.0} runs/s ({:.2} s), ratio {:.2}",
            ta.as_secs_f64(),
            tb.as_secs_f64(),
            rb / ra
        );
        a.push(ra);
        b.push(rb);
    }
    let ratios: Vec<f64> = a.iter().zip(&b).map(|(x, y)| y / x).collect();
    let (ma, mb) = (median(a), median(b));
    println!(
        "{:<28} {:>10} {:>10}",
        format!("{runs} runs x 3 steps"),
        "runs/s",
        "steps/s"
    );
    for (name, v) in [("1 node, R1", ma), ("3 nodes, R3", mb)] {
        println!("{name:<28} {v:>10.0} {:>10.0}", 3.0 * v);
    }
    println!();
    println!(
        "3-node R3 / 1-node R1 throughput: {:.2}x (ratio of the medians of {rounds} rounds; median of the rounds' ratios {:.2}x)",
        mb / ma,
        median(ratios)
    );
    Ok(())
}

//! The fault suite (slow, not in the default run):
//! `cargo test -p aob-tests --test system -- --ignored --nocapture --test-threads=1 faults`.
//!
//! A three-node JetStream cluster on loopback with every stream and bucket R3; the engine,
//! the `transform` and `validate` functions and the audit sink as separate processes, as
//! deployed; runs of `examples/chain` (`AOB_FAULT_RUNS`, default 1,000) started over ten
//! seconds, 64 publishes at a time, and the node that leads `AOB_HISTORY` (one test) or
//! `AOB_TASKS` (the other) killed with SIGKILL once a third of the starts are in.
//! JetStream stalls for seconds while the cluster elects new leaders; afterwards every run
//! has completed exactly once, its history has no gap and no repeat, its state says
//! COMPLETED, the Parquet audit trail holds every published record once (each run's
//! `run_completed` among them), and the killed node, started again, catches up.
//! `AOB_FAULT_KEEP=1` keeps the processes' and servers' logs and says where;
//! `AOB_FAULT_BIN_DIR` runs the binaries of another build (default: this build's).
//!
//! Each process gets one `NATS_URL`: `aob_runtime::Env::connect` passes it to async-nats
//! as one address (a comma-separated list is refused as an invalid URL). A client learns
//! the cluster's other servers from the first server's INFO (`connect_urls`) and
//! reconnects to one of them when its server dies, so one URL is enough for a process
//! that is already running. Some components are deliberately given the node that will be
//! killed: they must fail over that way.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer::DeliverPolicy};
use futures::StreamExt;
use serde_json::{Value, json};

use aob_model::state::{RunState, RunStatus};
use aob_model::wire::{HistoryEvent, HistoryKind};
use aob_streams::{Topology, subjects};
use aob_tests::cluster::Cluster;

const T: &str = "faults";

/// The streams whose leaders a kill moves, with the run store's bucket.
const WATCHED: [&str; 6] = [
    aob_streams::HISTORY,
    aob_streams::TASKS,
    aob_streams::RESULTS,
    aob_streams::CMD,
    aob_streams::AUDIT,
    "KV_AOB_RUNS",
];

/// An AOB binary running as its own process, its standard error in a log file.
struct Proc {
    name: &'static str,
    node: usize,
    /// Where it serves `/metrics` (`AOB_HTTP_ADDR`).
    http_port: u16,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(
        name: &'static str,
        node: usize,
        nats_url: &str,
        env: &[(&str, String)],
        dir: &Path,
    ) -> Result<Proc> {
        let log = dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log)?;
        // `AOB_FAULT_BIN_DIR`: the binaries of another build (a release build, say).
        let bin = match std::env::var_os("AOB_FAULT_BIN_DIR") {
            Some(dir) => PathBuf::from(dir).join(name),
            None => aob_tests::binary(name)?,
        };
        let mut cmd = Command::new(bin);
        cmd.env("NATS_URL", nats_url)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(file);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().with_context(|| format!("starting {name}"))?;
        Ok(Proc {
            name,
            node,
            http_port: 0,
            child,
            log,
        })
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The last `n` lines of a file.
fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Everything the suite started, so that a failure can show the logs.
struct Suite {
    cluster: Cluster,
    procs: Vec<Proc>,
    data: tempfile::TempDir,
    begun: Instant,
}

impl Suite {
    fn say(&self, what: impl std::fmt::Display) {
        eprintln!(
            "[faults {:>6.1} s] {what}",
            self.begun.elapsed().as_secs_f64()
        );
    }

    /// An error if a component process has exited: none may stop because a node died.
    fn all_alive(&mut self) -> Result<()> {
        for p in &mut self.procs {
            if let Some(status) = p.child.try_wait()? {
                bail!(
                    "{} (on node aob-{}) exited with {status}; its log ends:\n{}",
                    p.name,
                    p.node,
                    tail(&p.log, 40)
                );
            }
        }
        Ok(())
    }

    /// With `AOB_FAULT_KEEP` set, keeps the processes' and the servers' logs (and the
    /// audit files) in a folder that outlives the test, and says where.
    fn keep_logs_if_asked(&mut self) {
        if std::env::var_os("AOB_FAULT_KEEP").is_none() {
            return;
        }
        let dir = self.data.path().to_path_buf();
        for n in &self.cluster.nodes {
            let log = n.server.store_dir().join("nats-server.log");
            let _ = std::fs::copy(&log, dir.join(format!("{}.log", n.name)));
        }
        let Ok(empty) = tempfile::tempdir() else {
            return;
        };
        let kept = std::mem::replace(&mut self.data, empty).keep();
        self.say(format!("logs kept in {}", kept.display()));
    }

    /// The end of every log, for a failure.
    fn logs(&self) -> String {
        let mut out = String::new();
        for p in &self.procs {
            out.push_str(&format!(
                "--- {} (node aob-{}): {}\n{}\n",
                p.name,
                p.node,
                p.log.display(),
                tail(&p.log, 30)
            ));
        }
        for n in &self.cluster.nodes {
            let log = n.server.store_dir().join("nats-server.log");
            out.push_str(&format!(
                "--- {} ({}): {}\n{}\n",
                n.name,
                n.server.url(),
                log.display(),
                tail(&log, 15)
            ));
        }
        out
    }
}

/// Publishes one start, again with the same message id until JetStream acknowledges it
/// (through an election the publish stalls or fails; the server drops a repeat).
async fn publish_start(js: &jetstream::Context, run: &str, i: usize) -> Result<u32> {
    let body = serde_json::to_vec(
        &json!({"workflow": "greeting", "input": {"name": format!("n{i}")}, "run_id": run}),
    )?;
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut retries = 0;
    loop {
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", run);
        let sent = async {
            js.publish_with_headers(subjects::start(T), headers, body.clone().into())
                .await?
                .await?;
            anyhow::Ok(())
        };
        match tokio::time::timeout(Duration::from_secs(10), sent).await {
            Ok(Ok(())) => return Ok(retries),
            Ok(Err(e)) if Instant::now() >= deadline => {
                return Err(e.context(format!("starting run {run}")));
            }
            Err(_) if Instant::now() >= deadline => bail!("starting run {run}: no ack"),
            _ => {
                retries += 1;
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    }
}

/// Per subject, how many messages of `stream` match `filter`.
async fn subject_counts(
    js: &jetstream::Context,
    stream: &str,
    filter: &str,
) -> Result<HashMap<String, usize>> {
    let s = js.get_stream(stream).await?;
    let mut subjects = s.info_with_subjects(filter).await?;
    let mut out = HashMap::new();
    while let Some(entry) = subjects.next().await {
        let (subject, n) = entry?;
        out.insert(subject, n);
    }
    Ok(out)
}

/// Every history event of the tenant, read through an ordered consumer.
async fn history(js: &jetstream::Context) -> Result<Vec<HistoryEvent>> {
    let filter = subjects::history_of_tenant(T);
    let n: usize = subject_counts(js, aob_streams::HISTORY, &filter)
        .await?
        .values()
        .sum();
    let consumer = js
        .get_stream(aob_streams::HISTORY)
        .await?
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            filter_subject: filter,
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        })
        .await?;
    let mut msgs = consumer.messages().await?;
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let msg = tokio::time::timeout(Duration::from_secs(30), msgs.next())
            .await
            .with_context(|| format!("history: {} of {n} events read", out.len()))?
            .context("history consumer ended")??;
        out.push(serde_json::from_slice(&msg.payload)?);
    }
    Ok(out)
}

/// What the consumers hold, where the unfinished runs are and what the processes count:
/// for a stall.
async fn diagnose(suite: &Suite, js: &jetstream::Context, ids: &[String]) -> String {
    let mut out = String::from("consumers (pending, ack pending, waiting pulls, redelivered):\n");
    let consumers = [
        (aob_streams::CMD, aob_streams::ENGINE_CMD.to_string()),
        (
            aob_streams::RESULTS,
            aob_streams::ENGINE_RESULTS.to_string(),
        ),
        (
            aob_streams::TASKS,
            aob_streams::function_consumer("transform"),
        ),
        (
            aob_streams::TASKS,
            aob_streams::function_consumer("validate"),
        ),
        (aob_streams::AUDIT, aob_streams::AUDIT_SINK.to_string()),
    ];
    for (stream, name) in consumers {
        let info = async {
            let mut c = js
                .get_stream(stream)
                .await?
                .get_consumer::<jetstream::consumer::pull::Config>(&name)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let i = c.info().await?.clone();
            anyhow::Ok(format!(
                "  {stream}/{name}: {} {} {} {} (delivered {}, ack floor {}, leader {:?})",
                i.num_pending,
                i.num_ack_pending,
                i.num_waiting,
                i.num_redelivered,
                i.delivered.stream_sequence,
                i.ack_floor.stream_sequence,
                i.cluster.and_then(|c| c.leader)
            ))
        };
        match tokio::time::timeout(Duration::from_secs(10), info).await {
            Ok(Ok(line)) => out.push_str(&line),
            Ok(Err(e)) => out.push_str(&format!("  {stream}/{name}: {e}")),
            Err(_) => out.push_str(&format!("  {stream}/{name}: no answer in 10 s")),
        }
        out.push('\n');
    }
    // The unfinished runs, by where their steps are.
    let mut shapes: BTreeMap<String, usize> = BTreeMap::new();
    if let Ok(kv) = js.get_key_value(aob_streams::RUNS).await {
        for id in ids {
            let shape = match kv.get(RunState::key(T, id)).await {
                Ok(Some(b)) => {
                    let v: Value = serde_json::from_slice(&b).unwrap_or(Value::Null);
                    if v["status"] == "COMPLETED" {
                        continue;
                    }
                    let steps = ["compose", "check", "shape"]
                        .iter()
                        .map(|s| {
                            let st = &v["steps"][s];
                            format!(
                                "{s}:{}#{}",
                                st["status"].as_str().unwrap_or("-"),
                                st["attempt"]
                            )
                        })
                        .collect::<Vec<_>>()
                        .join(" ");
                    let outbox = v["outbox"].as_array().map_or(0, Vec::len);
                    format!("{} {steps} outbox {outbox}", v["status"])
                }
                Ok(None) => "no state".to_string(),
                Err(e) => format!("unreadable: {e}"),
            };
            *shapes.entry(shape).or_default() += 1;
        }
    }
    out.push_str("unfinished runs, by their steps:\n");
    for (shape, n) in shapes {
        out.push_str(&format!("  {n:>5}  {shape}\n"));
    }
    for p in &suite.procs {
        let url = format!("http://127.0.0.1:{}/metrics", p.http_port);
        let text = match tokio::time::timeout(Duration::from_secs(5), reqwest::get(&url)).await {
            Ok(Ok(r)) => r.text().await.unwrap_or_default(),
            Ok(Err(e)) => e.to_string(),
            Err(_) => "no answer".into(),
        };
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.contains("_bucket{"))
            .collect();
        out.push_str(&format!("{} /metrics:\n  {}\n", p.name, lines.join("\n  ")));
    }
    out
}

/// `AOB_FAULT_RUNS`, default 1,000.
fn runs_wanted() -> usize {
    std::env::var("AOB_FAULT_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000)
        .max(1)
}

/// The leader of `AOB_HISTORY` (which often leads other streams too), with the engine and
/// `validate` connected to it, killed while runs are being started and run: nothing is
/// lost, nothing doubled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "slow: the node-kill suite; run with --ignored faults"]
async fn killing_the_history_leader_under_load_loses_and_doubles_nothing() {
    suite(aob_streams::HISTORY, &["aob-engine", "aob-validate"]).await;
}

/// The leader of `AOB_TASKS`, with `transform` and the audit sink connected to it, killed
/// while runs are being started and run: nothing is lost, nothing doubled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "slow: the node-kill suite; run with --ignored faults"]
async fn killing_the_tasks_leader_under_load_loses_and_doubles_nothing() {
    suite(aob_streams::TASKS, &["aob-transform", "aob-audit"]).await;
}

/// Runs the suite killing the leader of `target`; the components named in `on_victim`
/// connect to that node, the others to the two that survive.
async fn suite(target: &'static str, on_victim: &[&str]) {
    let begun = Instant::now();
    let started = Cluster::start(3).and_then(|cluster| {
        Ok(Suite {
            cluster,
            procs: Vec::new(),
            data: tempfile::tempdir()?,
            begun,
        })
    });
    let mut suite = started.unwrap_or_else(|e| panic!("starting the cluster: {e:#}"));
    let outcome = kill_the_leader_under_load(&mut suite, target, on_victim).await;
    suite.keep_logs_if_asked();
    if let Err(e) = outcome {
        panic!("{e:#}\n\nlogs:\n{}", suite.logs());
    }
}

async fn kill_the_leader_under_load(
    suite: &mut Suite,
    target: &str,
    on_victim: &[&str],
) -> Result<()> {
    let runs = runs_wanted();
    let client = suite.cluster.connect().await?;
    let js = jetstream::new(client.clone());
    let topology = Topology {
        replicas: 3,
        ..Topology::default()
    };
    suite
        .cluster
        .apply(&js, &topology, Duration::from_secs(60))
        .await?;
    let wf = aob_model::load_file(&aob_tests::examples_dir().join("chain/workflow.yaml"))?;
    aob_runtime::registry::Registry::open(&js)
        .await?
        .publish(T, &wf)
        .await?;
    let leader = suite
        .cluster
        .leader(&js, target, Duration::from_secs(30))
        .await?;
    suite.say(format!(
        "cluster up, topology applied with 3 replicas; {} leads {target}",
        suite.cluster.nodes[leader].name,
    ));

    // The components, as separate processes: those named on the node that will be
    // killed, the others spread over the two that survive.
    let payload_url = format!("file://{}", suite.data.path().join("payloads").display());
    let audit_dir = suite.data.path().join("audit");
    let common = vec![("AOB_PAYLOAD_URL", payload_url.clone())];
    let others = [(leader + 1) % 3, (leader + 2) % 3];
    let mut next_other = 0;
    for (name, extra) in [
        ("aob-engine", vec![]),
        ("aob-transform", vec![]),
        ("aob-validate", vec![]),
        (
            "aob-audit",
            vec![("AOB_AUDIT_URL", format!("file://{}", audit_dir.display()))],
        ),
    ] {
        let node = if on_victim.contains(&name) {
            leader
        } else {
            next_other += 1;
            others[(next_other - 1) % 2]
        };
        let mut env = common.clone();
        env.extend(extra);
        let http_port = aob_tests::audit::free_port()?;
        env.push(("AOB_HTTP_ADDR", format!("127.0.0.1:{http_port}")));
        let url = suite.cluster.url(node);
        let mut p = Proc::spawn(name, node, &url, &env, suite.data.path())?;
        p.http_port = http_port;
        suite.procs.push(p);
    }
    suite.say(format!(
        "started {}",
        suite
            .procs
            .iter()
            .map(|p| format!("{} on aob-{}", p.name, p.node))
            .collect::<Vec<_>>()
            .join(", ")
    ));

    // Completions as they are published, seen by a client of a node that will not be
    // killed (a core subscription: for progress and to know when to kill, not for the
    // checks, which read the streams).
    let observer = suite.cluster.connect_to(others[1]).await?;
    let completed: Arc<std::sync::Mutex<HashSet<String>>> = Arc::default();
    let mut done_sub = observer
        .subscribe(format!("aob.{T}.run.*.completed"))
        .await?;
    let watcher = {
        let completed = completed.clone();
        tokio::spawn(async move {
            while let Some(m) = done_sub.next().await {
                let run = m.subject.split('.').nth(3).unwrap_or_default().to_string();
                if let Ok(mut c) = completed.lock() {
                    c.insert(run);
                }
            }
        })
    };
    // The stream's count too, every half second, off the loop below: it stalls while the
    // cluster elects, and the live view misses what is published while its client
    // reconnects.
    let stored = Arc::new(AtomicUsize::new(0));
    let counter = {
        let (js, stored, filter) = (
            jetstream::new(observer.clone()),
            stored.clone(),
            format!("aob.{T}.run.*.completed"),
        );
        tokio::spawn(async move {
            loop {
                if let Ok(c) = subject_counts(&js, aob_streams::HISTORY, &filter).await {
                    stored.fetch_max(c.len(), Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    };
    let n_completed = || {
        completed
            .lock()
            .map(|c| c.len())
            .unwrap_or(0)
            .max(stored.load(Ordering::Relaxed))
    };

    // The starts, spread over ten seconds, up to 64 publishes at a time: when the node
    // dies, starts are being published and runs are at every step.
    let ids: Vec<String> = (0..runs).map(|_| ulid::Ulid::new().to_string()).collect();
    let published = Arc::new(AtomicUsize::new(0));
    let retried = Arc::new(AtomicUsize::new(0));
    let started_at = Instant::now();
    let spread = Duration::from_secs(10);
    let publisher = {
        let (js, ids, published, retried) =
            (js.clone(), ids.clone(), published.clone(), retried.clone());
        tokio::spawn(async move {
            let mut sends = futures::stream::iter(ids.into_iter().enumerate())
                .map(|(i, id)| {
                    let js = js.clone();
                    let due = started_at + spread.mul_f64(i as f64 / runs as f64);
                    async move {
                        tokio::time::sleep_until(due.into()).await;
                        publish_start(&js, &id, i).await
                    }
                })
                .buffer_unordered(64);
            while let Some(r) = sends.next().await {
                retried.fetch_add(r? as usize, Ordering::Relaxed);
                published.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(())
        })
    };

    // Kill the leader of the target stream once a third of the starts are acknowledged and
    // runs are completing.
    let mut victim = None;
    let mut diagnosed = false;
    let mut killed_at = None;
    let mut last_report = Instant::now();
    let mut last_count = 0;
    let mut last_progress = Instant::now();
    let mut longest_stall = Duration::ZERO;
    let mut publisher = Some(publisher);
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        suite.all_alive()?;
        if let Some(p) = publisher.as_ref()
            && p.is_finished()
        {
            publisher
                .take()
                .context("publisher")?
                .await?
                .context("publishing the starts")?;
            suite.say(format!(
                "all {runs} starts acknowledged ({} publishes retried)",
                retried.load(Ordering::Relaxed)
            ));
        }
        let n = n_completed();
        if n > last_count {
            last_count = n;
            last_progress = Instant::now();
        }
        longest_stall = longest_stall.max(last_progress.elapsed());
        if victim.is_none() && n >= 1 && published.load(Ordering::Relaxed) >= runs / 3 {
            let v = suite
                .cluster
                .leader(&js, target, Duration::from_secs(30))
                .await?;
            let mut led = Vec::new();
            for s in WATCHED {
                if let Ok(l) = suite.cluster.leader(&js, s, Duration::from_secs(5)).await
                    && l == v
                {
                    led.push(s);
                }
            }
            let on_it: Vec<&str> = suite
                .procs
                .iter()
                .filter(|p| p.node == v)
                .map(|p| p.name)
                .collect();
            suite.cluster.kill(v);
            suite.say(format!(
                "KILLED {} (leader of {}; clients on it: {}) with {n} of {runs} runs completed, {} started",
                suite.cluster.nodes[v].name,
                led.join(", "),
                on_it.join(", "),
                published.load(Ordering::Relaxed)
            ));
            victim = Some(v);
            killed_at = Some((Instant::now(), n));
            // The stall is measured from here.
            last_progress = Instant::now();
            longest_stall = Duration::ZERO;
        }
        if publisher.is_none() && n >= runs {
            break;
        }
        if last_report.elapsed() >= Duration::from_secs(2) {
            last_report = Instant::now();
            suite.say(format!(
                "{} of {runs} started, {n} completed",
                published.load(Ordering::Relaxed)
            ));
        }
        if Instant::now() >= deadline {
            bail!(
                "{n} of {runs} runs completed (as seen live) within 5 minutes; {} started\n{}",
                published.load(Ordering::Relaxed),
                diagnose(suite, &js, &ids).await
            );
        }
        if !diagnosed && victim.is_some() && last_progress.elapsed() > Duration::from_secs(45) {
            diagnosed = true;
            suite.say(format!(
                "no run completed for 45 s:\n{}",
                diagnose(suite, &js, &ids).await
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let elapsed = started_at.elapsed();
    let victim = victim.context("the kill never happened")?;
    let (kill_time, done_then) = killed_at.context("the kill never happened")?;
    suite.say(format!(
        "every run completed {:.1} s after the first start ({:.0} runs/s); the {} left at \
         the kill took {:.1} s; longest time without a new completion after the kill {:.1} s",
        elapsed.as_secs_f64(),
        runs as f64 / elapsed.as_secs_f64(),
        runs - done_then,
        kill_time.elapsed().as_secs_f64(),
        longest_stall.as_secs_f64()
    ));

    watcher.abort();
    counter.abort();
    let events = check_history(suite, &js, &ids).await?;
    check_states(suite, &js, &ids).await?;
    check_audit(suite, &client, &js, &audit_dir, runs, events).await?;

    // The killed node back: it catches up with what was written without it.
    suite.cluster.restart(victim)?;
    suite
        .cluster
        .caught_up(victim, &js, &WATCHED, Duration::from_secs(120))
        .await?;
    suite.say(format!(
        "{} restarted and caught up on {}",
        suite.cluster.nodes[victim].name,
        WATCHED.join(", ")
    ));
    suite.all_alive()?;
    suite.say(format!(
        "done: {runs} runs, wall time of the suite {:.1} s",
        suite.begun.elapsed().as_secs_f64()
    ));
    Ok(())
}

/// Every run completed once, as the history stream tells: one stored `completed` event
/// per run, no run failed, cancelled or rejected, and each run's history numbered 1, 2,
/// 3, ... with no gap and no repeat, each step completed once and `completed` last.
/// Returns the number of history events.
async fn check_history(suite: &Suite, js: &jetstream::Context, ids: &[String]) -> Result<usize> {
    let runs = ids.len();
    // The live view can miss an event published while the test's own client reconnected:
    // the stream decides. Each run's `completed` event is stored once.
    let guard = Instant::now() + Duration::from_secs(120);
    let completions = loop {
        let got = subject_counts(
            js,
            aob_streams::HISTORY,
            &format!("aob.{T}.run.*.completed"),
        )
        .await;
        match got {
            Ok(c) if c.len() >= runs => break c,
            Ok(c) if Instant::now() >= guard => {
                bail!("{} of {runs} runs have a stored completion", c.len())
            }
            Err(e) if Instant::now() >= guard => return Err(e),
            _ => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    };
    let doubled: Vec<_> = completions.iter().filter(|(_, n)| **n != 1).collect();
    ensure!(doubled.is_empty(), "completed more than once: {doubled:?}");
    for end in ["failed", "cancelled", "rejected"] {
        let c = subject_counts(js, aob_streams::HISTORY, &format!("aob.{T}.run.*.{end}")).await?;
        ensure!(c.is_empty(), "runs {end}: {c:?}");
    }

    // Every run's history: 1, 2, 3, ... with no gap and no repeat, each step completed
    // once, one `completed` event, last.
    let events = history(js).await?;
    let mut by_run: HashMap<&str, Vec<&HistoryEvent>> = HashMap::new();
    for e in &events {
        by_run.entry(e.run_id.as_str()).or_default().push(e);
    }
    ensure!(
        by_run.len() == runs,
        "{} runs have a history, {runs} were started",
        by_run.len()
    );
    let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
    for id in ids {
        let evs = by_run
            .get(id.as_str())
            .with_context(|| format!("run {id} has no history"))?;
        let seqs: Vec<u64> = evs.iter().map(|e| e.seq).collect();
        let want: Vec<u64> = (1..=evs.len() as u64).collect();
        ensure!(seqs == want, "run {id}: history sequence {seqs:?}");
        for step in ["compose", "check", "shape"] {
            let n = evs
                .iter()
                .filter(|e| e.kind == HistoryKind::StepCompleted && e.step.as_deref() == Some(step))
                .count();
            ensure!(n == 1, "run {id}: step {step} completed {n} times");
        }
        let last = evs.last().context("empty history")?;
        ensure!(
            last.kind == HistoryKind::Completed,
            "run {id} ends with {:?}",
            last.kind
        );
        for e in evs {
            *kinds.entry(e.kind.token()).or_default() += 1;
        }
    }
    suite.say(format!(
        "history: {} events, gap-free, each run completed once; by kind {kinds:?}",
        events.len()
    ));

    Ok(events.len())
}

/// Every run's state says COMPLETED.
async fn check_states(suite: &Suite, js: &jetstream::Context, ids: &[String]) -> Result<()> {
    let runs = ids.len();
    let kv = js.get_key_value(aob_streams::RUNS).await?;
    let states: Vec<Result<(String, Option<RunStatus>)>> = futures::stream::iter(ids.iter())
        .map(|id| {
            let kv = kv.clone();
            async move {
                let entry = kv.get(RunState::key(T, id)).await?;
                let status = match entry {
                    Some(b) => Some(serde_json::from_slice::<RunState>(&b)?.status),
                    None => None,
                };
                Ok((id.clone(), status))
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    for s in states {
        let (id, status) = s?;
        ensure!(
            status == Some(RunStatus::Completed),
            "run {id}: state {status:?}"
        );
    }
    suite.say(format!("every run's state is COMPLETED ({runs} read)"));

    Ok(())
}

/// Every audit record published (the stream keeps one per record id) is one row of the
/// Parquet files, once; each run's `run_completed` is there once; the engine wrote one
/// record per history event (`events` of them), and every step has its task record.
async fn check_audit(
    suite: &Suite,
    client: &async_nats::Client,
    js: &jetstream::Context,
    audit_dir: &Path,
    runs: usize,
    events: usize,
) -> Result<()> {
    let published_records: usize = subject_counts(js, aob_streams::AUDIT, &subjects::audit(T))
        .await?
        .values()
        .sum();
    aob_tests::audit::drain(client, Duration::from_secs(120)).await?;
    let trail = aob_tests::audit::trail(audit_dir);
    let guard = Instant::now() + Duration::from_secs(120);
    let rows = loop {
        // The sink's report of nothing pending is approximate: wait for the rows.
        let rows = aob_tests::audit::duckdb(&format!(
            "SELECT count(*), count(DISTINCT record_id) FROM {trail}"
        ))?;
        let n = rows[0][0].as_u64().unwrap_or(0) as usize;
        if n >= published_records || Instant::now() >= guard {
            break rows;
        }
        aob_tests::audit::drain(client, Duration::from_secs(30)).await?;
    };
    let (n_rows, n_ids) = (
        rows[0][0].as_u64().unwrap_or(0) as usize,
        rows[0][1].as_u64().unwrap_or(0) as usize,
    );
    ensure!(
        n_rows == n_ids,
        "{n_rows} audit rows for {n_ids} record ids: some record is there twice"
    );
    ensure!(
        n_rows == published_records,
        "{n_rows} audit rows, {published_records} records published"
    );
    let ends = aob_tests::audit::duckdb(&format!(
        "SELECT count(*), count(DISTINCT run_id) FROM {trail} WHERE event_kind = 'run_completed' AND tenant = '{T}'"
    ))?;
    ensure!(
        ends[0] == vec![json!(runs), json!(runs)],
        "run_completed records (rows, runs): {:?}, {runs} runs",
        ends[0]
    );
    // One engine record per history event.
    let engine = aob_tests::audit::duckdb(&format!(
        "SELECT count(*) FROM {trail} WHERE actor = 'engine' AND tenant = '{T}'"
    ))?;
    ensure!(
        engine[0][0] == json!(events),
        "{} engine records for {} history events",
        engine[0][0],
        events
    );
    let tasks = aob_tests::audit::duckdb(&format!(
        "SELECT count(*), count(DISTINCT (run_id, step_id)), max(attempt) FROM {trail} WHERE event_kind = 'task_executed'"
    ))?;
    ensure!(
        tasks[0][1] == json!(3 * runs),
        "task records (rows, steps, highest attempt): {:?}",
        tasks[0]
    );
    suite.say(format!(
        "audit: {n_rows} rows, {n_ids} distinct record ids, as many as published; \
         {runs} run_completed, once each; task_executed (rows, steps, highest attempt) {}",
        Value::Array(tasks[0].clone())
    ));

    Ok(())
}

//! `cargo bench -p aob-tests --bench agents`: what the model and tool gateways add, on a
//! nats-server started for the run, against baselines measured in the same run.
//!
//! (1) a model call: the provider client straight to the scripted provider (a test double
//!     speaking the OpenAI protocol) against the same call through the `llm` handler
//!     (recorded call, breaker, routing; then again with a run budget, which adds the
//!     ledger's reservation and settlement);
//! (2) a tool call to a warm MCP server (`mcp-server-time`): the MCP client straight
//!     against the `tool` handler (name, schema check, limits, breaker);
//! (3) a budget reservation and its settlement against one KV read;
//! (4) 1,000 agents at once, 3 turns each (two tool calls, then an answer), each model
//!     turn answered after 50 ms: wall time against the 150 ms a single agent needs,
//!     throughput and memory.
//!
//! Baselines and measured paths alternate call by call, so both see the machine in the
//! same state. AOB_BENCH_SCALE (e.g. 0.1) lowers the sizes for a quick look.

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use aob_agent::{AgentHandler, ToolResult, Tools};
use aob_llm::chat::{ChatRequest, Message, ToolSpec};
use aob_llm::config::Config;
use aob_llm::gateway::Gateway;
use aob_model::wire::{Outcome, StepError};
use aob_runtime::Handler;
use aob_runtime::context::Context;
use aob_runtime::secrets::Secrets;
use aob_scripted_provider::{Script, ScriptedProvider};
use futures::future::BoxFuture;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

fn pct(v: &mut [Duration], q: f64) -> f64 {
    v.sort();
    if v.is_empty() {
        return 0.0;
    }
    let i = ((v.len() as f64 - 1.0) * q).round() as usize;
    v[i].as_secs_f64() * 1000.0
}

fn line(name: &str, base: &mut [Duration], measured: &mut [Duration]) {
    let (b50, b99) = (pct(base, 0.5), pct(base, 0.99));
    let (m50, m99) = (pct(measured, 0.5), pct(measured, 0.99));
    println!(
        "{name:<44} baseline p50 {b50:>7.3} ms p99 {b99:>7.3} ms | measured p50 {m50:>7.3} ms p99 {m99:>7.3} ms | added p50 {:>6.3} ms p99 {:>6.3} ms",
        m50 - b50,
        m99 - b99
    );
}

fn rss_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn task(node_type: &str, step: &str, run: &str, config: Value) -> aob_model::wire::Task {
    let mut t = aob_testkit::task(node_type, step, config, json!({"input": {}}));
    t.run_id = run.to_string();
    t
}

/// A tool that answers at once, so (4) measures the loop, the gateway and the stores.
struct Echo;

impl Tools for Echo {
    fn specs<'a>(
        &'a self,
        _names: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<(String, ToolSpec)>, StepError>> {
        Box::pin(async {
            Ok(vec![(
                "echo".to_string(),
                ToolSpec {
                    name: "echo".into(),
                    description: "Echoes its arguments".into(),
                    input_schema: json!({"type": "object"}),
                },
            )])
        })
    }
    fn call<'a>(
        &'a self,
        _tenant: &'a str,
        _name: &'a str,
        args: Value,
        _cancel: &'a CancellationToken,
    ) -> BoxFuture<'a, Result<ToolResult, StepError>> {
        Box::pin(async move {
            Ok(ToolResult {
                text: format!("echo {args}"),
                is_error: false,
                output: args,
            })
        })
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let n = aob_tests::bench_scale(1000, 20);
    let agents = aob_tests::bench_scale(1000, 20);
    let server = aob_testkit::NatsServer::start()?;
    let client = server.connect().await?;
    let js = async_nats::jetstream::new(client.clone());
    aob_streams::Topology::default().apply(&js).await?;
    let double = ScriptedProvider::start(Script::parse(
        r#"
rules:
  - when: { contains: "echo {\"n\":1}" }
    delay_ms: 50
    reply: { tool_calls: [{ name: echo, arguments: { n: 2 } }], usage: { input: 50, output: 10 } }
  - when: { contains: "echo {\"n\":2}" }
    delay_ms: 50
    reply: { text: "done", usage: { input: 80, output: 5 } }
  - when: { contains: "agent" }
    delay_ms: 50
    reply: { tool_calls: [{ name: echo, arguments: { n: 1 } }], usage: { input: 30, output: 10 } }
default: { text: "ok", usage: { input: 5, output: 1 } }
"#,
        "bench script",
    )?)
    .await?;
    let models = |extra: &str| {
        Config::parse(&format!(
            "models:\n  m: {{ protocol: openai, base_url: \"{}\", price: {{ input: 1, output: 2 }}, max_output_tokens: 64 }}\ndefault: {{ model: m }}\n{extra}",
            double.openai_base_url()
        ))
        .map_err(|e| anyhow::anyhow!("{e}"))
    };
    let http = reqwest::Client::new();
    println!("agents bench: {n} calls per path, {agents} agents");

    // (1) A model call, straight and through the handler.
    let direct = aob_llm::provider::connect(
        aob_llm::provider::Endpoint {
            protocol: aob_llm::provider::Protocol::Openai,
            base_url: double.openai_base_url().parse()?,
            api_key: None,
            timeout: Duration::from_secs(10),
        },
        http.clone(),
    );
    let plain = aob_llm::handler::LlmHandler::new(Arc::new(
        Gateway::open(&client, models("")?, Secrets::none()).await?,
    ));
    let budgeted = aob_llm::handler::LlmHandler::new(Arc::new(
        Gateway::open(
            &client,
            models("budgets:\n  run: { usd: 1000000 }\n")?,
            Secrets::none(),
        )
        .await?,
    ));
    let (mut base, mut through, mut through_budget) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..n + 20 {
        let req = ChatRequest {
            model: "m".into(),
            system: None,
            messages: vec![Message::user(format!("q{i}"))],
            tools: Vec::new(),
            max_tokens: 64,
            temperature: None,
            json: false,
        };
        let t0 = Instant::now();
        direct
            .chat(&req, None)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let d0 = t0.elapsed();
        let cfg = json!({"prompt": format!("q{i}"), "max_tokens": 64, "stream": false});
        let t = task("llm", "s", &format!("bench-llm-{i}"), cfg.clone());
        let cx = Context::detached(&t);
        let t1 = Instant::now();
        let out = plain
            .handle(t, &cx)
            .await
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let d1 = t1.elapsed();
        let t = task("llm", "s", &format!("bench-llm-b-{i}"), cfg);
        let cx = Context::detached(&t);
        let t2 = Instant::now();
        budgeted
            .handle(t, &cx)
            .await
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let d2 = t2.elapsed();
        anyhow::ensure!(matches!(out, Outcome::Completed { .. }));
        if i >= 20 {
            base.push(d0);
            through.push(d1);
            through_budget.push(d2);
        }
    }
    let mut base2 = base.clone();
    line("(1) model call: llm handler", &mut base, &mut through);
    line(
        "(1) model call: llm handler with a run budget",
        &mut base2,
        &mut through_budget,
    );

    // (2) A tool call to a warm MCP server.
    let tools_yaml = aob_testkit::time_tools_yaml()?;
    let config = aob_tool::ToolsConfig::parse(&tools_yaml, Path::new("tools.yaml"))?;
    let raw = aob_tool::mcp::McpServer::new("time", config.mcp["time"].clone(), Secrets::none())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let gateway = Arc::new(aob_tool::Gateway::new(
        config,
        aob_http::HttpHandler::new()?,
        Secrets::none(),
    )?);
    let handler = aob_tool::ToolHandler::with(gateway.clone());
    let cancel = CancellationToken::new();
    let (mut base, mut through) = (Vec::new(), Vec::new());
    let args = json!({"timezone": "Europe/Paris"});
    for i in 0..n + 20 {
        let t0 = Instant::now();
        raw.call("get_current_time", args.clone(), &cancel)
            .await
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let d0 = t0.elapsed();
        let t = task(
            "tool",
            "t",
            "bench-tool",
            json!({"tool": "time.get_current_time", "arguments": args}),
        );
        let cx = Context::detached(&t);
        let t1 = Instant::now();
        handler
            .handle(t, &cx)
            .await
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let d1 = t1.elapsed();
        if i >= 20 {
            base.push(d0);
            through.push(d1);
        }
    }
    line(
        "(2) tool call to a warm MCP server",
        &mut base,
        &mut through,
    );
    raw.shutdown().await;
    gateway.shutdown().await;

    // (3) A budget reservation and its settlement, against one KV read.
    let kv = js.get_key_value(aob_streams::LEDGER).await?;
    let ledgers = aob_llm::ledger::Ledgers::new(kv.clone());
    let budget = aob_llm::config::Budget {
        usd: Some(1e9),
        tokens: None,
        period: aob_llm::config::Period::Month,
    };
    let (mut base, mut through) = (Vec::new(), Vec::new());
    for i in 0..n + 20 {
        let scopes = [aob_llm::ledger::Scope::tenant(
            "bench",
            budget,
            aob_runtime::now_ms(),
        )];
        let t0 = Instant::now();
        kv.get(&scopes[0].key).await?;
        let d0 = t0.elapsed();
        let id = format!("call-{i}");
        let t1 = Instant::now();
        ledgers
            .reserve(
                &scopes,
                &id,
                aob_llm::ledger::Amount {
                    usd: 0.01,
                    tokens: 100,
                },
                Duration::from_secs(60),
                aob_runtime::now_ms(),
            )
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        ledgers
            .settle(
                &scopes,
                &id,
                aob_llm::ledger::Amount {
                    usd: 0.005,
                    tokens: 60,
                },
            )
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let d1 = t1.elapsed();
        if i >= 20 {
            base.push(d0);
            through.push(d1);
        }
    }
    line(
        "(3) budget: reserve + settle vs one KV read",
        &mut base,
        &mut through,
    );

    // (4) Agents at once, three turns each, 50 ms per model turn.
    let gateway = Arc::new(Gateway::open(&client, models("")?, Secrets::none()).await?);
    let recorder = gateway.recorder().clone();
    let agent = Arc::new(AgentHandler::new(gateway, Arc::new(Echo), recorder));
    let rss_before = rss_kib("VmRSS:");
    let started = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for i in 0..agents {
        let agent = agent.clone();
        set.spawn(async move {
            let t = task(
                "agent",
                "a",
                &format!("bench-agent-{i}"),
                json!({"prompt": "agent task", "tools": ["echo"], "max_turns": 5, "stream": false}),
            );
            let cx = Context::detached(&t);
            let t0 = Instant::now();
            let out = agent.handle(t, &cx).await;
            (t0.elapsed(), out)
        });
    }
    let mut per_run = Vec::with_capacity(agents);
    while let Some(j) = set.join_next().await {
        let (took, out) = j?;
        match out {
            Ok(Outcome::Completed { output }) => {
                anyhow::ensure!(output["turns"] == 3, "{output}");
            }
            other => anyhow::bail!("agent did not complete: {other:?}"),
        }
        per_run.push(took);
    }
    let wall = started.elapsed();
    let requests = double.requests().total;
    println!(
        "(4) {agents} agents x 3 turns (50 ms per model turn): wall {:.2} s (one agent alone needs 0.15 s), {:.0} agents/s, {:.0} model calls/s; per agent p50 {:.0} ms p99 {:.0} ms; RSS {} MiB before, {} MiB after, peak {} MiB",
        wall.as_secs_f64(),
        agents as f64 / wall.as_secs_f64(),
        (3 * agents) as f64 / wall.as_secs_f64(),
        pct(&mut per_run.clone(), 0.5),
        pct(&mut per_run, 0.99),
        rss_before / 1024,
        rss_kib("VmRSS:") / 1024,
        rss_kib("VmHWM:") / 1024,
    );
    println!("scripted provider requests in all: {requests}");
    Ok(())
}

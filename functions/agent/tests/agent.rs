//! The agent loop against a real nats-server, a real MCP server (`mcp-server-time` from
//! PyPI, over stdio, through the tool gateway) and the scripted provider (a test double
//! speaking the OpenAI wire protocol).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use aob_agent::{AgentHandler, ToolResult, Tools};
use aob_llm::chat::ToolSpec;
use aob_llm::config::Config;
use aob_llm::gateway::Gateway;
use aob_model::audit::AuditKind;
use aob_model::wire::{Outcome, StepError, Task};
use aob_runtime::Handler;
use aob_runtime::context::Context;
use aob_runtime::secrets::Secrets;
use aob_scripted_provider::{Script, ScriptedProvider};
use aob_testkit::NatsServer;
use futures::future::BoxFuture;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// The tool gateway, counting the calls that reach it.
struct Counted {
    inner: aob_tool::gateway::Gateway,
    calls: AtomicU64,
}

impl Tools for Counted {
    fn specs<'a>(
        &'a self,
        names: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<(String, ToolSpec)>, StepError>> {
        self.inner.specs(names)
    }
    fn call<'a>(
        &'a self,
        tenant: &'a str,
        name: &'a str,
        args: Value,
        cancel: &'a CancellationToken,
    ) -> BoxFuture<'a, Result<ToolResult, StepError>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Tools::call(&self.inner, tenant, name, args, cancel)
    }
}

const SCRIPT: &str = r#"
rules:
  - when: { has_tool_result: false }
    reply: { tool_calls: [{ name: time__get_current_time, arguments: { timezone: "Europe/Paris" } }], usage: { input: 30, output: 10 } }
  - when: { contains: "Europe/Paris" }
    times: 1
    reply: { tool_calls: [{ name: time__convert_time, arguments: { source_timezone: "Europe/Paris", time: "12:00", target_timezone: "Asia/Tokyo" } }], usage: { input: 60, output: 12 } }
  - when: { has_tool_result: true }
    delay_ms: DELAY
    reply: { text: "Noon in Paris is 20:00 in Tokyo.", usage: { input: 90, output: 9 } }
"#;

struct Env {
    _server: NatsServer,
    client: async_nats::Client,
    double: ScriptedProvider,
}

async fn env(delay_ms: u64) -> Env {
    let server = NatsServer::start().unwrap();
    let client = server.connect().await.unwrap();
    let js = async_nats::jetstream::new(client.clone());
    aob_streams::Topology::default().apply(&js).await.unwrap();
    let script = SCRIPT.replace("DELAY", &delay_ms.to_string());
    let double = ScriptedProvider::start(Script::parse(&script, "agent script").unwrap())
        .await
        .unwrap();
    Env {
        _server: server,
        client,
        double,
    }
}

impl Env {
    async fn agent(&self) -> (AgentHandler, Arc<Counted>) {
        let models = format!(
            "models:\n  m: {{ protocol: openai, base_url: \"{}\", price: {{ input: 1, output: 2 }} }}\ndefault: {{ model: m }}\n",
            self.double.openai_base_url()
        );
        let gateway = Gateway::open(
            &self.client,
            Config::parse(&models).unwrap(),
            Secrets::none(),
        )
        .await
        .unwrap();
        let tools_yaml = aob_testkit::time_tools_yaml().unwrap();
        let config =
            aob_tool::config::ToolsConfig::parse(&tools_yaml, Path::new("tools.yaml")).unwrap();
        let http = aob_http::HttpHandler::new().unwrap();
        let tools = Arc::new(Counted {
            inner: aob_tool::gateway::Gateway::new(config, http, Secrets::none()).unwrap(),
            calls: AtomicU64::new(0),
        });
        let recorder = gateway.recorder().clone();
        (
            AgentHandler::new(Arc::new(gateway), tools.clone(), recorder),
            tools,
        )
    }
}

fn task() -> Task {
    let mut t = aob_testkit::task(
        "agent",
        "draft",
        json!({
            "system": "You answer questions about time.",
            "prompt": "What time is it in Tokyo when it is noon in {{ input.city }}?",
            "tools": ["time.get_current_time", "time.convert_time"],
            "max_turns": 5,
        }),
        json!({"input": {"city": "Paris"}}),
    );
    t.run_id = "agent-run".into();
    t
}

#[tokio::test]
async fn an_agent_calls_two_tools_then_answers() {
    let e = env(0).await;
    let (agent, tools) = e.agent().await;
    let t = task();
    let cx = Context::detached(&t);
    let Outcome::Completed { output } = agent.handle(t, &cx).await.unwrap() else {
        panic!("not completed")
    };
    assert_eq!(output["text"], "Noon in Paris is 20:00 in Tokyo.");
    assert_eq!(output["turns"], 3);
    let log = output["tool_calls"].as_array().unwrap();
    assert_eq!(log.len(), 2, "{output}");
    assert_eq!(log[0]["tool"], "time.get_current_time");
    assert_eq!(log[1]["tool"], "time.convert_time");
    assert!(log.iter().all(|c| c["is_error"] == false), "{output}");
    assert_eq!(tools.calls.load(Ordering::SeqCst), 2);
    assert_eq!(e.double.requests().total, 3);
    // The model saw the real tool result, and what it had left.
    let recent = e.double.requests().recent;
    let second = recent[1].body.to_string();
    assert!(second.contains("Europe/Paris"), "{second}");
    assert!(second.contains("turn(s) including this one"), "{second}");
    // One record per model call and per tool call.
    let records = cx.take_records();
    let kinds: Vec<AuditKind> = records.iter().map(|r| r.event_kind).collect();
    assert_eq!(
        kinds.iter().filter(|k| **k == AuditKind::ModelCall).count(),
        3
    );
    assert_eq!(
        kinds.iter().filter(|k| **k == AuditKind::ToolCall).count(),
        2
    );
    assert_eq!(cx.usage().tokens_in, Some(30 + 60 + 90));
}

#[tokio::test]
async fn a_crashed_agent_resumes_without_repeating_completed_calls() {
    // The third model call hangs: the process is "killed" during the third turn, after
    // two completed turns (two model calls, two tool calls).
    let e = env(30_000).await;
    let (agent, tools) = e.agent().await;
    let t = task();
    let running = tokio::spawn({
        let t = t.clone();
        async move {
            let cx = Context::detached(&t);
            agent.handle(t, &cx).await
        }
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while e.double.requests().total < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "the third turn never started"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    running.abort();
    let _ = running.await;
    assert_eq!(tools.calls.load(Ordering::SeqCst), 2);

    // A new process: a fresh gateway, tool gateway and MCP server, the same run.
    e.double
        .set_script(
            Script::parse(
                &SCRIPT
                    .replace("DELAY", "0")
                    .replace("times: 1\n", "times: 0\n"),
                "s",
            )
            .unwrap(),
        )
        .unwrap();
    let (agent, tools2) = e.agent().await;
    let cx = Context::detached(&t);
    let Outcome::Completed { output } = agent.handle(t.clone(), &cx).await.unwrap() else {
        panic!("not completed")
    };
    assert_eq!(output["text"], "Noon in Paris is 20:00 in Tokyo.");
    assert_eq!(output["turns"], 3);
    assert_eq!(
        tools2.calls.load(Ordering::SeqCst),
        0,
        "no tool call repeated"
    );
    assert_eq!(
        e.double.requests().total,
        4,
        "turns 1 and 2 reused; only the interrupted third turn is asked again"
    );
    let log = output["tool_calls"].as_array().unwrap();
    assert!(log.iter().all(|c| c["reused"] == true), "{output}");
    let calls = output["calls"].as_array().unwrap();
    assert_eq!(
        calls.iter().filter(|c| c["reused"] == true).count(),
        2,
        "{output}"
    );
}

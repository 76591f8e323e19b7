//! Agents end to end: the `llm`, `tool` and `agent` functions behind the engine, model
//! calls answered by the scripted provider (a test double speaking the OpenAI protocol),
//! tools from a real MCP server (`mcp-server-time`), Rego policies in the `AOB_POLICIES`
//! bucket, and the audit trail read back with DuckDB.

use std::path::Path;
use std::sync::Arc;

use aob_model::state::{RunStatus, StepStatus};
use aob_model::wire::{ErrorClass, HistoryKind};
use aob_runtime::nats::ServeConfig;
use aob_scripted_provider::{Script, ScriptedProvider};
use aob_tests::{Fns, Stack};
use serde_json::{Value, json};

/// Rules for these tests, beside the example policies.
const TEST_RULES: &str = r#"
package aob.policies.test_rules

deny contains "steps named forbidden never run" if {
	input.kind == "step"
	input.step.id == "forbidden"
}

deny contains sprintf("tool %s is for acme only", [input.tool.name]) if {
	input.kind == "tool"
	input.tool.name == "time.convert_time"
	input.tenant != "acme"
}

require_approval contains "this step's model calls need a person" if {
	input.kind == "model"
	input.step.id == "needs_ok"
}

require_approval contains "reading the clock needs a person" if {
	input.kind == "tool"
	input.tool.name == "time.get_current_time"
	input.step.id == "held_tool"
}
"#;

const SPEND: &str = r#"
name: spend
steps:
  - id: first
    type: llm
    model: pricey
    prompt: "first question"
  - id: second
    type: llm
    model: pricey
    needs: [first]
    prompt: "second question"
"#;

const GUARDED: &str = r#"
name: guarded
steps:
  - id: forbidden
    type: transform
    output: {x: 1}
  - id: needs_ok
    type: llm
    prompt: "may I?"
  - id: convert
    type: tool
    tool: time.convert_time
    arguments: {source_timezone: UTC, time: "12:00", target_timezone: Asia/Tokyo}
  - id: held_tool
    type: tool
    tool: time.get_current_time
    arguments: {timezone: UTC}
"#;

struct Env {
    s: Stack,
    double: ScriptedProvider,
    tools: Arc<aob_tool::Gateway>,
    sink: aob_tests::audit::LocalSink,
}

#[allow(clippy::unwrap_used, clippy::expect_used)]
async fn env() -> Env {
    let mut s = Stack::bare().await.unwrap();
    // Policies first: the engine and the gateways load them at start.
    let store = s.js.get_key_value(aob_streams::POLICIES).await.unwrap();
    let examples = aob_tests::examples_dir().join("policies/_all");
    let mut modules = serde_json::Map::new();
    modules.insert("test_rules.rego".into(), json!(TEST_RULES));
    modules.insert(
        "spend_cap.rego".into(),
        json!(std::fs::read_to_string(examples.join("spend_cap.rego")).unwrap()),
    );
    store
        .put(
            "_all",
            serde_json::to_vec(&json!({ "modules": modules }))
                .unwrap()
                .into(),
        )
        .await
        .unwrap();

    let script =
        std::fs::read_to_string(aob_tests::examples_dir().join("agentic/scripted-provider.yaml"))
            .unwrap();
    let double = ScriptedProvider::start(Script::parse(&script, "scripted-provider.yaml").unwrap())
        .await
        .unwrap();
    let models = aob_llm::config::Config::parse(&format!(
        "models:\n  \
           scripted: {{ protocol: openai, base_url: \"{u}\", provider: scripted, price: {{ input: 0.15, output: 0.60 }} }}\n  \
           pricey: {{ protocol: openai, base_url: \"{u}\", provider: scripted, price: {{ input: 100000, output: 100000 }} }}\n\
         default: {{ model: scripted }}\n",
        u = double.openai_base_url()
    ))
    .unwrap();
    let tools = aob_tool::ToolsConfig::parse(
        &aob_testkit::time_tools_yaml().unwrap(),
        Path::new("tools.yaml"),
    )
    .unwrap();

    let engine = s.engine().await.unwrap();
    s.spawn_engine(engine);
    s.spawn_functions(Fns::AllButHttp).await.unwrap();
    let tools = s
        .spawn_agents(models, tools, &ServeConfig::default())
        .await
        .unwrap();

    let sink = aob_tests::audit::LocalSink::start(&s.client).unwrap();
    Env {
        s,
        double,
        tools,
        sink,
    }
}

#[allow(clippy::unwrap_used)]
impl Env {
    async fn run(
        &self,
        tenant: &str,
        wf: &str,
        input: Value,
    ) -> (
        aob_model::state::RunState,
        Vec<aob_model::wire::HistoryEvent>,
        String,
    ) {
        let run = self.s.start_run(tenant, wf, input).await.unwrap();
        let (state, events) = self.s.wait_run(tenant, &run).await.unwrap();
        (state, events, run)
    }

    async fn query(&self, sql: &str) -> Vec<Vec<Value>> {
        self.sink.query(&self.s.client, sql).await.unwrap()
    }

    async fn stop(self) {
        self.tools.shutdown().await;
        self.sink.stop().await.unwrap();
    }
}

/// The `step_progress` lines of a run's history, in order.
fn progress_lines(events: &[aob_model::wire::HistoryEvent]) -> Vec<&str> {
    events
        .iter()
        .filter(|ev| ev.kind == HistoryKind::StepProgress)
        .map(|ev| ev.message.as_deref().unwrap_or_default())
        .collect()
}

#[allow(clippy::unwrap_used)]
fn failure(state: &aob_model::state::RunState, step: &str) -> aob_model::wire::StepError {
    let st = &state.steps[step];
    assert_eq!(st.status(), StepStatus::Failed, "{step}: {st:?}");
    st.error.clone().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agentic_example_runs_under_policies_and_duckdb_answers_the_auditor() {
    let e = env().await;
    let input = json!({"text": "When does the Tokyo office open? It is noon in Paris."});
    let wf = e.s.publish_example("acme", "agentic").await.unwrap();
    let wf2 = e.s.publish_example("globex", "agentic").await.unwrap();

    // acme: every step, model call and tool call is allowed.
    let (state, events, run) = e.run("acme", &wf, input.clone()).await;
    assert_eq!(state.status, RunStatus::Completed, "{events:#?}");
    let draft = state.steps["draft"].output.clone().unwrap();
    assert_eq!(draft["turns"], 2, "{draft}");
    assert!(draft["text"].as_str().unwrap().contains("20:00 in Tokyo"));
    // Each agent turn is a history event of the draft step.
    let turns = progress_lines(&events);
    assert_eq!(
        turns,
        [
            "turn 1: scripted called time.convert_time",
            "turn 2: scripted answered"
        ],
        "{events:#?}"
    );
    let step_cost: f64 = ["classify", "draft"]
        .iter()
        .map(|s| {
            state.steps[*s].output.as_ref().unwrap()["usage"]["cost_usd"]
                .as_f64()
                .unwrap()
        })
        .sum();

    // globex: the agent's convert_time call is denied; the step fails terminally.
    let (state, events, denied_run) = e.run("globex", &wf2, input.clone()).await;
    assert_eq!(state.status, RunStatus::Failed, "{events:#?}");
    let err = failure(&state, "draft");
    assert_eq!(err.class, ErrorClass::Terminal);
    assert!(
        err.message
            .contains("tool time.convert_time denied by policy test_rules")
            && err.message.contains("is for acme only"),
        "{}",
        err.message
    );

    // Cost per workflow per tenant.
    let got = e
        .query(
            "SELECT tenant, workflow, count(*), sum(tokens_in), sum(tokens_out), sum(cost_usd) \
             FROM TRAIL WHERE event_kind = 'model_call' AND record_id LIKE '%.call.%' \
             GROUP BY ALL ORDER BY tenant",
        )
        .await;
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(got[0][0], json!("acme"));
    assert_eq!(got[0][1], json!("support-agent"));
    assert_eq!(got[0][2], json!(3), "classify, and two agent turns");
    let acme_cost = got[0][5].as_f64().unwrap();
    assert!(
        (acme_cost - step_cost).abs() < 1e-12,
        "{acme_cost} vs {step_cost}"
    );
    assert_eq!(got[1][0], json!("globex"));
    assert_eq!(
        got[1][2],
        json!(2),
        "classify, and the turn that asked for the tool"
    );

    // Every tool call of the acme run with its policy decision.
    let got = e
        .query(&format!(
            "SELECT step_id, actor, policy_result, starts_with(policy_id, '@') \
             FROM TRAIL WHERE run_id = '{run}' AND event_kind = 'tool_call' ORDER BY finished_at"
        ))
        .await;
    assert_eq!(
        got,
        vec![
            vec![json!("now"), json!("fn.tool"), json!("allow"), json!(true)],
            vec![
                json!("draft"),
                json!("fn.agent"),
                json!("allow"),
                json!(true)
            ],
        ]
    );
    // The denial is in the audit with the policy that decided.
    let got = e
        .query(&format!(
            "SELECT step_id, policy_result, split_part(policy_id, '@', 1), reason \
             FROM TRAIL WHERE run_id = '{denied_run}' AND event_kind = 'policy_decision' \
             AND policy_result <> 'allow'"
        ))
        .await;
    assert_eq!(
        got,
        vec![vec![
            json!("draft"),
            json!("deny"),
            json!("test_rules"),
            json!("tool time.convert_time is for acme only")
        ]]
    );
    e.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_deny_steps_tools_and_models_and_hold_approvals() {
    let e = env().await;
    e.s.publish("globex", GUARDED).await.unwrap();
    let before = e.double.requests().total;
    let run = e.s.start_run("globex", "guarded", json!({})).await.unwrap();
    // The model call and the tool call a policy holds become approval requests.
    let held = std::sync::atomic::AtomicUsize::new(0);
    let events =
        e.s.history_until(
            "globex",
            &run,
            |ev| {
                ev.kind == HistoryKind::ApprovalRequested
                    && held.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 1
            },
            std::time::Duration::from_secs(60),
        )
        .await
        .unwrap();
    let mut actions: Vec<String> = events
        .iter()
        .filter(|ev| ev.kind == HistoryKind::ApprovalRequested)
        .map(|ev| {
            ev.data.as_ref().unwrap()["action"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    actions.sort();
    assert_eq!(
        actions,
        vec!["model scripted", "tool time.get_current_time"]
    );
    assert_eq!(
        e.double.requests().total,
        before,
        "no model was called before the approval"
    );
    for step in ["needs_ok", "held_tool"] {
        let signal = aob_model::wire::Signal::Decide {
            step: step.into(),
            by: "root".into(),
            roles: vec!["admin".into()],
            decision: aob_model::wire::Verdict::Approve,
            comment: None,
            set: Default::default(),
            id: None,
            request: None,
        };
        e.s.publish_raw(
            &aob_streams::subjects::signal("globex", &run),
            Some(&format!("ok-{step}")),
            serde_json::to_vec(&signal).unwrap(),
        )
        .await
        .unwrap();
    }
    let (state, events) = e.s.wait_run("globex", &run).await.unwrap();
    assert_eq!(state.status, RunStatus::Failed, "{events:#?}");

    // A step the policies deny never reaches its function.
    let err = failure(&state, "forbidden");
    assert_eq!(err.class, ErrorClass::Terminal);
    assert!(
        err.message
            .starts_with("step forbidden denied by policy test_rules (version ")
            && err.message.ends_with("): steps named forbidden never run"),
        "{}",
        err.message
    );
    assert!(
        events.iter().any(|ev| ev.kind == HistoryKind::StepFailed
            && ev.step.as_deref() == Some("forbidden")
            && ev
                .message
                .as_deref()
                .is_some_and(|m| m.contains("never run"))),
        "{events:#?}"
    );
    // Once approved, the held calls ran, once each, in a second attempt.
    for step in ["needs_ok", "held_tool"] {
        assert_eq!(state.steps[step].status(), StepStatus::Completed, "{step}");
        assert_eq!(state.steps[step].attempt(), 2, "{step}");
    }
    assert_eq!(
        e.double.requests().total,
        before + 1,
        "the model was called once"
    );
    // A tool step the policies deny.
    let err = failure(&state, "convert");
    assert!(
        err.message
            .contains("tool time.convert_time denied by policy test_rules"),
        "{}",
        err.message
    );

    // The spend cap: the first call costs more than $0.50, the second is refused.
    e.s.publish("acme", SPEND).await.unwrap();
    let (state, events, _) = e.run("acme", "spend", json!({})).await;
    assert_eq!(state.status, RunStatus::Failed, "{events:#?}");
    assert_eq!(state.steps["first"].status(), StepStatus::Completed);
    let err = failure(&state, "second");
    assert!(
        err.message.contains("denied by policy spend_cap")
            && err.message.contains("reached the cap"),
        "{}",
        err.message
    );

    // Every evaluation is in the audit: the step decisions from the engine, the call
    // decisions from the functions.
    let got = e
        .query(&format!(
            "SELECT step_id, actor, policy_result FROM TRAIL \
             WHERE run_id = '{run}' AND event_kind = 'policy_decision' ORDER BY step_id, actor"
        ))
        .await;
    assert_eq!(
        got,
        vec![
            vec![json!("convert"), json!("engine"), json!("allow")],
            vec![json!("convert"), json!("fn.tool"), json!("deny")],
            vec![json!("forbidden"), json!("engine"), json!("deny")],
            vec![json!("held_tool"), json!("engine"), json!("allow")],
            vec![json!("held_tool"), json!("engine"), json!("allow")],
            vec![
                json!("held_tool"),
                json!("fn.tool"),
                json!("require_approval")
            ],
            vec![
                json!("held_tool"),
                json!("fn.tool"),
                json!("require_approval")
            ],
            vec![json!("needs_ok"), json!("engine"), json!("allow")],
            vec![json!("needs_ok"), json!("engine"), json!("allow")],
            vec![
                json!("needs_ok"),
                json!("fn.llm"),
                json!("require_approval")
            ],
            vec![
                json!("needs_ok"),
                json!("fn.llm"),
                json!("require_approval")
            ],
        ]
    );
    // The second evaluation of each held call says a person approved it, and the tool
    // was called once.
    let got = e
        .query(&format!(
            "SELECT step_id, attempt, decision FROM TRAIL WHERE run_id = '{run}' \
             AND event_kind = 'policy_decision' AND actor LIKE 'fn.%' AND step_id <> 'convert' ORDER BY step_id, attempt"
        ))
        .await;
    for row in &got {
        let approved = row[2].as_str().unwrap().ends_with("approved by a person");
        assert_eq!(approved, row[1] == json!(2), "{got:?}");
    }
    let calls = e
        .query(&format!(
            "SELECT count(*) FROM TRAIL WHERE run_id = '{run}' AND step_id = 'held_tool' AND event_kind = 'tool_call' AND status = 'COMPLETED'"
        ))
        .await;
    assert_eq!(calls, vec![vec![json!(1)]]);
    e.stop().await;
}

const KILL_SCRIPT: &str = r#"
rules:
  - when: { has_tool_result: false }
    reply: { tool_calls: [{ name: time__get_current_time, arguments: { timezone: "Europe/Paris" } }], usage: { input: 30, output: 10 } }
  - when: { contains: "Europe/Paris" }
    times: 1
    reply: { tool_calls: [{ name: time__convert_time, arguments: { source_timezone: "Europe/Paris", time: "12:00", target_timezone: "Asia/Tokyo" } }], usage: { input: 60, output: 12 } }
  - when: { has_tool_result: true }
    times: 1
    delay_ms: 60000
    reply: { text: "never sent: the process is killed first" }
  - when: { has_tool_result: true }
    reply: { text: "Noon in Paris is 20:00 in Tokyo.", usage: { input: 90, output: 9 } }
"#;

const T: &str = "acme";

const KILLED: &str = r#"
name: killed
steps:
  - id: draft
    type: agent
    prompt: "What time is it in Tokyo when it is noon in Paris?"
    tools: [time.get_current_time, time.convert_time]
    max_turns: 5
"#;

/// The agent function as a process, killed during its third turn (after two turns whose
/// model answers and tool results were recorded), and started again: the run resumes at
/// the third turn. The double counts the model requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_process_killed_after_its_second_turn_resumes_at_the_third() {
    // The agent binary sends in-progress acks every 2 s, as in production, where the ack
    // wait is 6 s: the test's 2 s would let a busy machine deliver the task twice at once.
    let mut s = Stack::bare_with(aob_streams::Topology {
        ack_wait: std::time::Duration::from_secs(6),
        ..aob_tests::test_topology()
    })
    .await
    .unwrap();
    let engine = s.engine().await.unwrap();
    s.spawn_engine(engine);
    s.spawn_functions(Fns::AllButHttp).await.unwrap();
    let double = ScriptedProvider::start(Script::parse(KILL_SCRIPT, "kill script").unwrap())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("models.yaml");
    std::fs::write(
        &models,
        format!(
            "models:\n  m: {{ protocol: openai, base_url: \"{}\" }}\ndefault: {{ model: m }}\n",
            double.openai_base_url()
        ),
    )
    .unwrap();
    let tools = dir.path().join("tools.yaml");
    std::fs::write(&tools, aob_testkit::time_tools_yaml().unwrap()).unwrap();
    let spawn = || {
        std::process::Command::new(aob_tests::binary("aob-agent").unwrap())
            .env("NATS_URL", s.server.url())
            .env("AOB_PAYLOAD_URL", &s.payload_url)
            .env("AOB_MODELS", &models)
            .env("AOB_TOOLS", &tools)
            .env("RUST_LOG", "warn")
            .spawn()
            .unwrap()
    };
    let mut first = spawn();
    s.publish(T, KILLED).await.unwrap();
    let run = s.start_run(T, "killed", json!({})).await.unwrap();
    // Two turns done, the third asked: the model's third request has arrived.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while double.requests().total < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "the third turn never started"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    first.kill().unwrap();
    first.wait().unwrap();
    let mut second = spawn();
    let (state, events) = s.wait_run(T, &run).await.unwrap();
    second.kill().unwrap();
    let _ = second.wait();
    assert_eq!(state.status, RunStatus::Completed, "{events:#?}");
    let out = state.steps["draft"].output.clone().unwrap();
    assert_eq!(out["text"], "Noon in Paris is 20:00 in Tokyo.");
    assert_eq!(out["turns"], 3);
    // Which turn each request was: the number of tool results it carries. Turns 1 and 2
    // were asked once; the interrupted third again (more than once only if a starved
    // machine let the task be delivered twice at once).
    let mut per_turn = [0usize; 3];
    for r in &double.requests().recent {
        let results = r.body.to_string().matches(r#""role":"tool""#).count();
        per_turn[results.min(2)] += 1;
    }
    assert_eq!(per_turn[0], 1, "turn 1 asked once");
    assert_eq!(per_turn[1], 1, "turn 2 asked once");
    assert!(
        per_turn[2] >= 2,
        "turn 3 asked again after the kill: {per_turn:?}"
    );
    let tools_used = out["tool_calls"].as_array().unwrap();
    assert_eq!(tools_used.len(), 2, "{out}");
    assert!(
        tools_used.iter().all(|t| t["reused"] == true),
        "no tool call made twice: {out}"
    );
    // Each turn is in the history once, although the first two were reported twice.
    let turns = progress_lines(&events);
    assert_eq!(
        turns,
        [
            "turn 1: m called time.get_current_time",
            "turn 2: m called time.convert_time",
            "turn 3: m answered"
        ],
        "{events:#?}"
    );
}

/// `aob run watch` shows a model's text as it streams, then the step's end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aob_run_watch_shows_the_tokens_a_model_streams() {
    let mut s = Stack::start_with(Fns::AllButHttp).await.unwrap();
    // The answer waits a moment, so the watcher (started after the run) is listening.
    let double = ScriptedProvider::start(
        Script::parse(
            "rules:\n  - delay_ms: 1500\n    reply: { text: \"Once upon a time there was a gateway.\" }\n",
            "story script",
        )
        .unwrap(),
    )
    .await
    .unwrap();
    let models = aob_llm::config::Config::parse(&format!(
        "models:\n  m: {{ protocol: anthropic, base_url: \"{}\" }}\ndefault: {{ model: m }}\n",
        double.url()
    ))
    .unwrap();
    let tools = s
        .spawn_agents(
            models,
            aob_tool::ToolsConfig::default(),
            &ServeConfig::default(),
        )
        .await
        .unwrap();
    s.publish(
        T,
        "name: story\nsteps:\n  - {id: tell, type: llm, prompt: \"tell me a story\"}\n",
    )
    .await
    .unwrap();
    let run = s.start_run(T, "story", json!({})).await.unwrap();
    let out = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        tokio::process::Command::new(aob_tests::binary("aob").unwrap())
            .args(["--tenant", T, "run", "watch", &run])
            .env("NATS_URL", s.server.url())
            .output(),
    )
    .await
    .expect("the watch ended with the run")
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("  │ tell: Once upon a time there was a gateway.\n  ✓ tell completed"),
        "{stdout}"
    );
    tools.shutdown().await;
}

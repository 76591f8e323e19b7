//! A `tool` step end to end: a workflow calls `mcp-server-time` over stdio through the
//! tool function, and a call whose arguments fail the tool's schema fails its run.

use std::path::Path;

use aob_model::state::{RunStatus, StepStatus};
use aob_model::wire::ErrorClass;
use aob_runtime::nats::ServeConfig;
use aob_tests::{Fns, Stack};
use serde_json::{Value, json};

const T: &str = "default";

const WORKFLOW: &str = r#"
name: clock
input:
  type: object
  required: [zone]
  properties: {zone: {type: string}}
steps:
  - id: now
    type: tool
    tool: time.get_current_time
    arguments: {timezone: "{{ input.zone }}"}
  - id: report
    type: transform
    needs: [now]
    output:
      tool: "{{ steps.now.output.tool }}"
      text: "{{ steps.now.output.content }}"
"#;

const BROKEN: &str = r#"
name: clock_broken
steps:
  - id: now
    type: tool
    tool: time.get_current_time
    arguments: {timezone: 5}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tool_step_calls_an_mcp_server_and_a_bad_argument_fails_the_run() {
    let config = aob_tool::ToolsConfig::parse(
        &aob_testkit::time_tools_yaml().unwrap(),
        Path::new("tools.yaml"),
    )
    .unwrap();
    let mut s = Stack::start_with(Fns::AllButHttp).await.unwrap();
    let gateway = s
        .spawn_agents(
            aob_llm::config::Config::default(),
            config,
            &ServeConfig::default(),
        )
        .await
        .unwrap();

    s.publish(T, WORKFLOW).await.unwrap();
    let run = s
        .start_run(T, "clock", json!({"zone": "UTC"}))
        .await
        .unwrap();
    let (state, events) = s.wait_run(T, &run).await.unwrap();
    assert_eq!(state.status, RunStatus::Completed, "{events:#?}");
    let out = state.steps["now"].output.clone().unwrap();
    assert_eq!(out["tool"], "time.get_current_time");
    assert_eq!(out["is_error"], false);
    assert_eq!(
        out["arguments_digest"],
        aob_tool::gateway::digest(&json!({"timezone": "UTC"}))
    );
    let answer: Value = serde_json::from_str(out["content"].as_str().unwrap()).unwrap();
    assert_eq!(answer["timezone"], "UTC");
    assert_eq!(
        state.steps["report"].output.as_ref().unwrap()["tool"],
        "time.get_current_time"
    );

    s.publish(T, BROKEN).await.unwrap();
    let run = s.start_run(T, "clock_broken", json!({})).await.unwrap();
    let (state, events) = s.wait_run(T, &run).await.unwrap();
    assert_eq!(state.status, RunStatus::Failed, "{events:#?}");
    let step = &state.steps["now"];
    assert_eq!(step.status(), StepStatus::Failed);
    let error = step.error.clone().unwrap();
    assert_eq!(error.class, ErrorClass::Terminal);
    assert!(
        error.message.contains("argument `/timezone`"),
        "{}",
        error.message
    );

    gateway.shutdown().await;
}

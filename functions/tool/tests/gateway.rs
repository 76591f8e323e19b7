//! The gateway against real servers: `mcp-server-time` (PyPI) over stdio, a Python MCP
//! server (`mcp_test_server.py`, the `mcp` package) over stdio and streamable HTTP, and an
//! axum endpoint behind an HTTP tool. `scripts/setup` installs the Python packages.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use aob_http::{HttpHandler, Policy};
use aob_model::wire::{ErrorClass, Outcome, StepError};
use aob_runtime::Handler;
use aob_runtime::secrets::Secrets;
use aob_tool::{Gateway, ManualClock, ToolHandler, ToolsConfig};
use serde_json::{Value, json};
use tokio::io::AsyncBufReadExt;
use tokio_util::sync::CancellationToken;

fn venv_bin(name: &str) -> PathBuf {
    let p = aob_testkit::venv_dir()
        .map(|v| v.join("bin").join(name))
        .unwrap_or_else(|| PathBuf::from(name));
    assert!(
        p.exists(),
        "{} is missing: run scripts/setup to install the Python MCP packages",
        p.display()
    );
    p
}

fn script() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/mcp_test_server.py")
        .display()
        .to_string()
}

/// A gateway over `yaml`, with a clock the test moves. `{python}`, `{script}` and
/// `{time}` in the text are replaced by the paths of the interpreter, the test server and
/// `mcp-server-time`.
fn gateway(yaml: &str) -> (Arc<Gateway>, Arc<ManualClock>) {
    let text = yaml
        .replace("{python}", &venv_bin("python").display().to_string())
        .replace("{script}", &script())
        .replace("{time}", &venv_bin("mcp-server-time").display().to_string());
    let config = ToolsConfig::parse(&text, Path::new("tools.yaml")).unwrap();
    let http = HttpHandler::with(Policy::default(), Secrets::none()).unwrap();
    let clock = Arc::new(ManualClock::new());
    let gw = Gateway::new(config, http, Secrets::none())
        .unwrap()
        .with_clock(clock.clone());
    (Arc::new(gw), clock)
}

const PY_STDIO: &str = r#"
mcp:
  py:
    command: "{python}"
    args: ["{script}", "stdio"]
"#;

async fn call(gw: &Gateway, tool: &str, args: Value) -> Result<aob_tool::ToolOutput, StepError> {
    gw.call("acme", tool, args, &CancellationToken::new()).await
}

fn retryable(e: &StepError) {
    assert_eq!(e.class, ErrorClass::Retryable, "{e:?}");
}

fn terminal(e: &StepError) {
    assert_eq!(e.class, ErrorClass::Terminal, "{e:?}");
}

/// The Python server over streamable HTTP on a free port it picks; killed on drop.
struct HttpServer {
    url: String,
    _child: tokio::process::Child,
}

impl HttpServer {
    async fn start() -> HttpServer {
        let mut child = tokio::process::Command::new(venv_bin("python"))
            .args([script().as_str(), "http"])
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        // Its first line is the URL, printed once the socket listens.
        let url = tokio::io::BufReader::new(out)
            .lines()
            .next_line()
            .await
            .unwrap()
            .expect("the server printed no URL");
        HttpServer { url, _child: child }
    }
}

#[tokio::test]
async fn time_server_over_stdio_lists_its_two_tools_and_calls_one() {
    let (gw, _) = gateway(
        "mcp:\n  time:\n    command: \"{time}\"\n    args: [\"--local-timezone\", \"UTC\"]\n",
    );
    let tools = gw.list(&[]).await.unwrap();
    let names: Vec<&str> = tools.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(names.contains(&"time.get_current_time"), "{names:?}");
    assert!(names.contains(&"time.convert_time"), "{names:?}");
    let current = tools
        .iter()
        .find(|t| t.name == "time.get_current_time")
        .unwrap();
    assert_eq!(current.model_name, "time__get_current_time");
    assert!(current.description.is_some());
    assert_eq!(current.input_schema["required"], json!(["timezone"]));

    // Listing by name, model-safe names included.
    let picked = gw
        .list(&["time__convert_time".to_string(), "time.*".to_string()])
        .await
        .unwrap();
    assert_eq!(picked.len(), 3);
    assert_eq!(picked[0].name, "time.convert_time");

    let out = call(&gw, "time.get_current_time", json!({"timezone": "UTC"}))
        .await
        .unwrap();
    assert_eq!(out.tool, "time.get_current_time");
    assert!(!out.is_error);
    let answer: Value = serde_json::from_str(&out.content).unwrap();
    assert_eq!(answer["timezone"], "UTC", "{}", out.content);
    assert_eq!(
        out.arguments_digest,
        aob_tool::gateway::digest(&json!({"timezone": "UTC"}))
    );
    // The model-safe name calls the same tool.
    let out = call(&gw, "time__get_current_time", json!({"timezone": "UTC"}))
        .await
        .unwrap();
    assert_eq!(out.tool, "time.get_current_time");
    gw.shutdown().await;
}

#[tokio::test]
async fn arguments_that_fail_the_schema_are_terminal_and_name_the_argument() {
    let (gw, _) = gateway("mcp:\n  time:\n    command: \"{time}\"\n");
    let e = call(&gw, "time.get_current_time", json!({"timezone": 5}))
        .await
        .unwrap_err();
    terminal(&e);
    assert!(
        e.message
            .contains("argument `/timezone`: 5 is not of type \"string\""),
        "{}",
        e.message
    );
    let e = call(&gw, "time.get_current_time", json!({}))
        .await
        .unwrap_err();
    terminal(&e);
    assert!(e.message.contains("argument `/timezone`"), "{}", e.message);
    assert_eq!(e.details.unwrap()["errors"][0]["pointer"], "/timezone");

    // Unknown tools are terminal and list the known ones.
    let e = call(&gw, "time.get_weather", json!({})).await.unwrap_err();
    terminal(&e);
    assert!(
        e.message.contains("unknown tool `time.get_weather`"),
        "{}",
        e.message
    );
    assert!(e.message.contains("time.get_current_time"), "{}", e.message);
    let e = call(&gw, "weather.now", json!({})).await.unwrap_err();
    terminal(&e);
    assert!(e.message.contains("(known: time.*)"), "{}", e.message);
    gw.shutdown().await;
}

#[tokio::test]
async fn streamable_http_server_lists_and_calls() {
    let server = HttpServer::start().await;
    let (gw, _) = gateway(&format!("mcp:\n  py:\n    url: \"{}\"\n", server.url));
    let tools = gw.list(&["py.*".to_string()]).await.unwrap();
    let names: Vec<&str> = tools.iter().map(|t| t.name.as_str()).collect();
    for n in ["py.echo", "py.add", "py.refuse", "py.pid", "py.die"] {
        assert!(names.contains(&n), "{n} not in {names:?}");
    }
    let out = call(&gw, "py.add", json!({"a": 2, "b": 3})).await.unwrap();
    assert_eq!(out.content, "5");
    assert_eq!(out.structured, json!({"result": 5}));
    let out = call(&gw, "py.echo", json!({"text": "hello"}))
        .await
        .unwrap();
    assert_eq!(out.content, "hello");

    // A tool's own error is an output with `is_error` for an agent, and a terminal step
    // error with the tool's text for a step.
    let out = call(&gw, "py.refuse", json!({"reason": "not today"}))
        .await
        .unwrap();
    assert!(out.is_error);
    assert!(out.content.contains("not today"), "{}", out.content);
    let handler = ToolHandler::with(gw.clone());
    let task = aob_testkit::task(
        "tool",
        "ask",
        json!({"tool": "py.refuse", "arguments": {"reason": "not today"}}),
        json!({}),
    );
    let cx = aob_runtime::context::Context::detached(&task);
    let e = handler.handle(task, &cx).await.unwrap_err();
    terminal(&e);
    assert!(
        e.message
            .starts_with("tool `py.refuse` reported an error: "),
        "{}",
        e.message
    );
    assert!(e.message.contains("not today"), "{}", e.message);

    let task = aob_testkit::task(
        "tool",
        "ask",
        json!({"tool": "py.echo", "arguments": {"text": "hi"}}),
        json!({}),
    );
    let cx = aob_runtime::context::Context::detached(&task);
    let Outcome::Completed { output } = handler.handle(task, &cx).await.unwrap() else {
        panic!("not completed")
    };
    assert_eq!(
        output,
        json!({
            "tool": "py.echo",
            "arguments_digest": aob_tool::gateway::digest(&json!({"text": "hi"})),
            "content": "hi",
            "structured": {"result": "hi"},
            "is_error": false
        })
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn a_server_that_dies_mid_call_fails_it_retryable_and_the_next_call_gets_a_fresh_one() {
    let (gw, _) = gateway(PY_STDIO);
    let first = call(&gw, "py.pid", json!({})).await.unwrap().structured["result"].clone();
    assert!(first.is_u64(), "{first}");
    // Warm: the same process answers again.
    let again = call(&gw, "py.pid", json!({})).await.unwrap().structured["result"].clone();
    assert_eq!(first, again);

    let e = call(&gw, "py.die", json!({})).await.unwrap_err();
    retryable(&e);
    assert!(
        e.message.contains("tool `py.die`: the server process"),
        "{}",
        e.message
    );
    assert!(e.message.contains("ended during the call"), "{}", e.message);
    assert!(
        e.message
            .contains("exiting in the middle of a call, as asked"),
        "{}",
        e.message
    );
    assert!(
        e.message
            .contains("the next call starts a fresh connection"),
        "{}",
        e.message
    );

    let fresh = call(&gw, "py.pid", json!({})).await.unwrap().structured["result"].clone();
    assert!(fresh.is_u64(), "{fresh}");
    assert_ne!(first, fresh, "the dead server was not replaced");
    gw.shutdown().await;
}

#[tokio::test]
async fn the_breaker_opens_after_n_failures_and_half_opens_after_the_cool_down() {
    let (gw, clock) = gateway(&format!(
        "{PY_STDIO}breaker: {{ failures: 2, cool_down: 30s }}\n"
    ));
    for _ in 0..2 {
        retryable(&call(&gw, "py.die", json!({})).await.unwrap_err());
    }
    // Open: refused without reaching the server.
    let e = call(&gw, "py.echo", json!({"text": "x"}))
        .await
        .unwrap_err();
    retryable(&e);
    assert_eq!(
        e.message,
        "tool `py.echo`: the circuit breaker of MCP server `py` is open after 2 consecutive failed calls; it may work again in 30s"
    );
    clock.advance(Duration::from_secs(20));
    let e = call(&gw, "py.echo", json!({"text": "x"}))
        .await
        .unwrap_err();
    assert!(
        e.message.ends_with("it may work again in 10s"),
        "{}",
        e.message
    );

    // Half-open after the cool-down: one call goes through; it fails, so it opens again.
    clock.advance(Duration::from_secs(10));
    retryable(&call(&gw, "py.die", json!({})).await.unwrap_err());
    let e = call(&gw, "py.echo", json!({"text": "x"}))
        .await
        .unwrap_err();
    assert!(e.message.contains("is open"), "{}", e.message);
    assert!(e.message.ends_with("in 30s"), "{}", e.message);

    // The next trial succeeds and closes it.
    clock.advance(Duration::from_secs(30));
    assert_eq!(
        call(&gw, "py.echo", json!({"text": "x"}))
            .await
            .unwrap()
            .content,
        "x"
    );
    assert_eq!(
        call(&gw, "py.echo", json!({"text": "y"}))
            .await
            .unwrap()
            .content,
        "y"
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn rate_limits_refuse_the_call_past_them_as_retryable() {
    let (gw, clock) = gateway(&format!(
        "{PY_STDIO}limits:\n  tools: {{ \"py.echo\": {{ per_minute: 2 }} }}\n  tenants: {{ small: {{ per_minute: 1 }} }}\n"
    ));
    for _ in 0..2 {
        call(&gw, "py.echo", json!({"text": "x"})).await.unwrap();
    }
    let e = call(&gw, "py.echo", json!({"text": "x"}))
        .await
        .unwrap_err();
    retryable(&e);
    assert_eq!(
        e.message,
        "tool `py.echo`: its rate limit of 2 calls per minute is used up; it may work again in 30s"
    );
    assert_eq!(e.details.unwrap()["retry_after_ms"], 30_000);
    // Other tools are not limited.
    call(&gw, "py.add", json!({"a": 1, "b": 1})).await.unwrap();
    clock.advance(Duration::from_secs(30));
    call(&gw, "py.echo", json!({"text": "x"})).await.unwrap();

    // Per tenant, across tools.
    let c = CancellationToken::new();
    gw.call("small", "py.add", json!({"a": 1, "b": 2}), &c)
        .await
        .unwrap();
    let e = gw.call("small", "py.pid", json!({}), &c).await.unwrap_err();
    retryable(&e);
    assert_eq!(
        e.message,
        "tool `py.pid`: tenant `small`'s rate limit of 1 tool calls per minute is used up; it may work again in 1m"
    );
    gw.shutdown().await;
}

/// An endpoint for HTTP tools.
async fn orders() -> String {
    use axum::extract::Path as AxPath;
    use axum::routing::get;
    let app = axum::Router::new()
        .route(
            "/orders/{id}",
            get(|AxPath(id): AxPath<String>| async move {
                axum::Json(json!({"id": id, "status": "shipped"}))
            }),
        )
        .route(
            "/down",
            get(|| async { (axum::http::StatusCode::SERVICE_UNAVAILABLE, "down") }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

#[tokio::test]
async fn an_http_tool_checks_its_arguments_and_calls_the_endpoint() {
    let base = orders().await;
    let (gw, _) = gateway(&format!(
        r#"
http:
  lookup_order:
    description: Looks an order up by id
    url: "{base}/orders/{{{{ args.id }}}}"
    input_schema: {{ type: object, required: [id], properties: {{ id: {{ type: string }} }} }}
  flaky:
    url: "{base}/down"
breaker: {{ failures: 2, cool_down: 1m }}
"#
    ));
    let tools = gw.list(&["lookup_order".to_string()]).await.unwrap();
    assert_eq!(
        tools[0].description.as_deref(),
        Some("Looks an order up by id")
    );
    assert_eq!(tools[0].input_schema["required"], json!(["id"]));

    let out = call(&gw, "lookup_order", json!({"id": "42"}))
        .await
        .unwrap();
    assert_eq!(out.structured, json!({"id": "42", "status": "shipped"}));
    assert!(!out.is_error);

    let e = call(&gw, "lookup_order", json!({"id": 42}))
        .await
        .unwrap_err();
    terminal(&e);
    assert!(
        e.message.contains(
            "tool `lookup_order`: invalid arguments: argument `/id`: 42 is not of type \"string\""
        ),
        "{}",
        e.message
    );
    let e = call(&gw, "lookup_order", json!({"order": "42"}))
        .await
        .unwrap_err();
    terminal(&e);
    assert!(e.message.contains("argument `/id`"), "{}", e.message);

    // 5xx is retryable and counts against the tool's own breaker.
    for _ in 0..2 {
        let e = call(&gw, "flaky", json!({})).await.unwrap_err();
        retryable(&e);
        assert!(
            e.message.starts_with("tool `flaky`: HTTP 503"),
            "{}",
            e.message
        );
    }
    let e = call(&gw, "flaky", json!({})).await.unwrap_err();
    assert!(
        e.message
            .contains("the circuit breaker of HTTP tool `flaky` is open"),
        "{}",
        e.message
    );
    // Another tool's breaker is its own.
    call(&gw, "lookup_order", json!({"id": "7"})).await.unwrap();
}

//! The same function binaries on other transports: CloudEvents over HTTP behind `aob bridge
//! http`, and AWS Lambda (the Runtime API of `cargo lambda watch`) behind `aob bridge
//! lambda`; an example workflow runs end to end on each.
// The helpers below serve tests only: a failure is a test failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Stdio};
use std::time::Duration;

use aob_model::state::RunStatus;
use serde_json::{Value, json};

/// A child process killed when dropped.
struct Child(std::process::Child);
impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn port() -> u16 {
    aob_tests::audit::free_port().unwrap()
}

/// A log file in the stack's data directory, for a failing test's post-mortem.
fn log(s: &aob_tests::Stack, name: &str) -> std::fs::File {
    let path = s.data.path().join(format!("{name}.log"));
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap()
}

/// A stack with the engine running in process.
async fn stack_with_engine() -> aob_tests::Stack {
    let mut s = aob_tests::Stack::bare().await.unwrap();
    let engine = s.engine().await.unwrap();
    s.spawn_engine(engine);
    s
}

/// The variables of a function served as CloudEvents over HTTP on port `p`.
fn over_http(p: u16) -> Vec<(&'static str, String)> {
    vec![
        ("AOB_TRANSPORT", "http".to_string()),
        ("PORT", p.to_string()),
    ]
}

/// The headers of a binary-mode CloudEvent with JSON data.
fn event_headers(id: &str, ty: &str) -> reqwest::header::HeaderMap {
    let mut h = reqwest::header::HeaderMap::new();
    for (k, v) in [
        ("ce-specversion", "1.0"),
        ("ce-id", id),
        ("ce-source", "test"),
        ("ce-type", ty),
        ("content-type", "application/json"),
    ] {
        h.insert(k, v.parse().unwrap());
    }
    h
}

/// A binary with the stack's NATS and payload store, and more variables.
fn spawn(s: &aob_tests::Stack, bin: &str, args: &[&str], env: &[(&str, String)]) -> Child {
    let mut c = Command::new(aob_tests::binary(bin).unwrap());
    c.args(args)
        .env("NATS_URL", s.server.url())
        .env("AOB_PAYLOAD_URL", &s.payload_url)
        .env_remove("AOB_TRANSPORT")
        .env_remove("K_SERVICE")
        .env_remove("AWS_LAMBDA_RUNTIME_API")
        .stdout(Stdio::null())
        .stderr(log(s, bin));
    for (k, v) in env {
        c.env(k, v);
    }
    Child(c.spawn().unwrap())
}

/// Waits until `url` answers 200.
async fn until_up(url: &str) {
    for _ in 0..300 {
        if let Ok(r) = reqwest::get(url).await
            && r.status().is_success()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{url} never answered");
}

/// Runs the chain example and checks its output, and that each step's audit record was
/// stored once, by the function that ran it.
async fn chain_runs(s: &aob_tests::Stack, name: &str) -> String {
    let wf = s.publish_example("acme", "chain").await.unwrap();
    let run = s
        .start_run("acme", &wf, json!({"name": name}))
        .await
        .unwrap();
    let (state, _) = tokio::time::timeout(Duration::from_secs(60), s.wait_run("acme", &run))
        .await
        .expect("the run did not finish")
        .unwrap();
    assert_eq!(state.status, RunStatus::Completed, "{state:?}");
    let records = s
        .messages(aob_streams::AUDIT, &aob_streams::subjects::audit("acme"))
        .await
        .unwrap();
    let mut actors: Vec<(String, String)> = records
        .iter()
        .filter(|r| r["run_id"] == json!(run) && r["kind"] != json!("run_event"))
        .filter_map(|r| {
            Some((
                r["step_id"].as_str()?.to_string(),
                r["actor"].as_str()?.to_string(),
            ))
        })
        .filter(|(_, a)| a.starts_with("fn."))
        .collect();
    actors.sort();
    assert_eq!(
        actors,
        vec![
            ("check".to_string(), "fn.validate".to_string()),
            ("compose".to_string(), "fn.transform".to_string()),
            ("shape".to_string(), "fn.transform".to_string()),
        ],
        "one record per step, from the function that ran it"
    );
    run
}

/// The output of the chain's last step.
async fn output(s: &aob_tests::Stack, run: &str) -> Value {
    let state = s.run_state("acme", run).await.unwrap().unwrap();
    state.steps["shape"].output.clone().unwrap_or_default()
}

/// Functions served as CloudEvents over HTTP (`AOB_TRANSPORT=http`), one bridge in front:
/// the chain example completes; while one function is down its tasks wait and are run
/// once it is up; garbage on a task subject is dead-lettered by the bridge; a function
/// answers a structured-mode event too, and refuses what is not a task.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_example_runs_on_cloudevents_functions_behind_the_http_bridge() {
    let s = stack_with_engine().await;
    let (tp, vp, bp) = (port(), port(), port());
    let _transform = spawn(&s, "aob-transform", &[], &over_http(tp));
    let transform_url = format!("http://127.0.0.1:{tp}");
    let validate_url = format!("http://127.0.0.1:{vp}");
    let _bridge = spawn(
        &s,
        "aob",
        &[
            "bridge",
            "http",
            "--route",
            &format!("transform={transform_url}"),
            "--route",
            &format!("validate={validate_url}"),
        ],
        &[("AOB_HTTP_ADDR", format!("127.0.0.1:{bp}"))],
    );
    until_up(&format!("{transform_url}/readyz")).await;
    until_up(&format!("http://127.0.0.1:{bp}/readyz")).await;

    // The validate function is not up yet: its task waits, the run with it.
    let wf = s.publish_example("acme", "chain").await.unwrap();
    let early = s
        .start_run("acme", &wf, json!({"name": "Early"}))
        .await
        .unwrap();
    let metrics = format!("http://127.0.0.1:{bp}/metrics");
    let mut retried = false;
    for _ in 0..200 {
        let text = reqwest::get(&metrics).await.unwrap().text().await.unwrap();
        if text.contains("aob_tasks_total{node_type=\"validate\",outcome=\"retried\"}") {
            retried = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(retried, "the bridge never tried the validate function");
    let state = s.run_state("acme", &early).await.unwrap().unwrap();
    assert_eq!(state.status, RunStatus::Running);
    let _validate = spawn(&s, "aob-validate", &[], &over_http(vp));
    let (state, _) = tokio::time::timeout(Duration::from_secs(60), s.wait_run("acme", &early))
        .await
        .expect("the waiting task was never run")
        .unwrap();
    assert_eq!(state.status, RunStatus::Completed);

    let run = chain_runs(&s, "Ada").await;
    assert_eq!(
        output(&s, &run).await,
        json!({"greeting": "Hello, Ada!", "checked": true})
    );

    // Garbage on a task subject: dead-lettered by the bridge, nothing blocked.
    s.js.publish(
        aob_streams::subjects::task("acme", "transform"),
        "{not a task".into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    chain_runs(&s, "Bo").await;
    let letters = s
        .messages(
            aob_streams::DLQ,
            &aob_streams::subjects::dlq_of_tenant("acme"),
        )
        .await
        .unwrap();
    assert!(
        letters
            .iter()
            .any(|l| l["component"] == json!("fn.transform")
                && l["reason"].as_str().unwrap_or("").contains("not a task")),
        "{letters:?}"
    );

    // Straight to the function: a structured-mode event is answered with a reply event.
    let task = aob_testkit::task("transform", "x", json!({"output": {"n": 7}}), json!({}));
    let http = reqwest::Client::new();
    let resp = http
        .post(&transform_url)
        .header("content-type", "application/cloudevents+json")
        .body(
            json!({
                "specversion": "1.0", "id": "t-1", "source": "test", "type": "dev.aob.task",
                "datacontenttype": "application/json", "data": task,
                "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
            })
            .to_string(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let h = resp.headers().clone();
    assert_eq!(h["ce-type"], "dev.aob.task.reply");
    assert_eq!(h["ce-id"], "t-1.reply");
    assert_eq!(
        h["ce-traceparent"],
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    );
    let reply: Value = resp.json().await.unwrap();
    assert_eq!(reply["result"]["output"], json!({"n": 7}), "{reply}");
    assert_eq!(
        reply["records"][0]["actor"],
        json!("fn.transform"),
        "{reply}"
    );

    // What is not a task is refused, with the reason.
    let resp = http
        .post(&transform_url)
        .body("hello")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    assert!(resp.text().await.unwrap().contains("not a CloudEvent"));
    let resp = http
        .post(&transform_url)
        .headers(event_headers("x", "com.example.other"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    assert!(resp.text().await.unwrap().contains("is not a task"));
    // A task event whose data is no task: answered with a refusal (the bridge
    // dead-letters it), not an error.
    let resp = http
        .post(&transform_url)
        .headers(event_headers("y", "dev.aob.task"))
        .body("{\"nope\": 1}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let reply: Value = resp.json().await.unwrap();
    assert!(
        reply["refused"]
            .as_str()
            .unwrap_or("")
            .contains("not a task"),
        "{reply}"
    );
}

/// The chain example's functions as Lambda functions on the Runtime API emulator of
/// `cargo lambda watch` (installed by scripts/setup), behind `aob bridge lambda`, which
/// invokes them through the AWS SDK with an endpoint override.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_example_runs_on_lambda_functions_behind_the_lambda_bridge() {
    let s = stack_with_engine().await;
    let lp = port();
    let root = aob_tests::examples_dir().join("..");
    let _watch = Child(
        Command::new(aob_tests::audit::venv_bin("cargo-lambda").unwrap())
            .args([
                "lambda",
                "watch",
                "--only-lambda-apis",
                "-A",
                "127.0.0.1",
                "-P",
                &lp.to_string(),
            ])
            .current_dir(&root)
            .stdout(log(&s, "cargo-lambda"))
            .stderr(log(&s, "cargo-lambda"))
            .spawn()
            .unwrap(),
    );
    // The emulator is up once it listens (any path but its APIs would invoke a function).
    for i in 0.. {
        if tokio::net::TcpStream::connect(("127.0.0.1", lp))
            .await
            .is_ok()
        {
            break;
        }
        assert!(i < 600, "cargo lambda watch never came up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let lambda = |name: &str| {
        vec![
            (
                "AWS_LAMBDA_RUNTIME_API",
                format!("http://127.0.0.1:{lp}/.rt/{name}"),
            ),
            ("AWS_LAMBDA_FUNCTION_NAME", name.to_string()),
            ("AWS_LAMBDA_FUNCTION_VERSION", "1".to_string()),
            ("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "512".to_string()),
        ]
    };
    let _transform = spawn(&s, "aob-transform", &[], &lambda("aob-transform"));
    let _validate = spawn(&s, "aob-validate", &[], &lambda("aob-validate"));
    let bp = port();
    let _bridge = spawn(
        &s,
        "aob",
        &[
            "bridge",
            "lambda",
            "--function",
            "transform=aob-transform",
            "--function",
            "validate=aob-validate",
            "--endpoint-url",
            &format!("http://127.0.0.1:{lp}"),
        ],
        &[
            ("AWS_REGION", "us-east-1".to_string()),
            ("AWS_ACCESS_KEY_ID", "test".to_string()),
            ("AWS_SECRET_ACCESS_KEY", "test".to_string()),
            ("AOB_HTTP_ADDR", format!("127.0.0.1:{bp}")),
        ],
    );
    until_up(&format!("http://127.0.0.1:{bp}/readyz")).await;
    let run = chain_runs(&s, "Ada").await;
    assert_eq!(
        output(&s, &run).await,
        json!({"greeting": "Hello, Ada!", "checked": true})
    );
    let metrics = reqwest::get(format!("http://127.0.0.1:{bp}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("aob_tasks_total{node_type=\"transform\",outcome=\"completed\"} 2"),
        "{metrics}"
    );
}

/// A local OTLP receiver (PyPI's oteltest `HttpSink`) writing each span it gets as a JSON
/// line: service, name, trace, span and parent ids (hex), attributes.
const OTLP_SINK: &str = r#"
import base64, json, logging, sys
from google.protobuf.json_format import MessageToDict
from oteltest.sink import HttpSink
from oteltest.sink.handler import RequestHandler

out = open(sys.argv[2], "a", buffering=1)

def hexid(b64):
    return base64.b64decode(b64).hex() if b64 else None

class Spans(RequestHandler):
    def handle_logs(self, request, headers):
        pass
    def handle_metrics(self, request, headers):
        pass
    def handle_trace(self, request, headers):
        for rs in MessageToDict(request).get("resourceSpans", []):
            service = None
            for a in rs.get("resource", {}).get("attributes", []):
                if a["key"] == "service.name":
                    service = a["value"].get("stringValue")
            for ss in rs.get("scopeSpans", []):
                for sp in ss.get("spans", []):
                    attrs = {a["key"]: next(iter(a["value"].values()), None) for a in sp.get("attributes", [])}
                    out.write(json.dumps({
                        "service": service, "name": sp["name"], "trace": hexid(sp.get("traceId")),
                        "span": hexid(sp.get("spanId")), "parent": hexid(sp.get("parentSpanId")),
                        "attrs": attrs,
                    }) + "\n")

HttpSink(Spans(), logging.getLogger("otlp"), port=int(sys.argv[1]), daemon=False).start()
print("ready", flush=True)
"#;

/// One run is one trace at an OTLP receiver: the start command's span is the root; the
/// engine's decisions, the NATS function's calls, and a call through the HTTP bridge to a
/// CloudEvents function (the bridge's span and the function's) all hang from it, every
/// parent known; the run's audit records carry the same trace id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_run_is_one_trace_at_the_otlp_receiver() {
    let s = aob_tests::Stack::bare().await.unwrap();
    let (op, vp) = (port(), port());
    let spans_file = s.data.path().join("spans.jsonl");
    let mut sink = Command::new(aob_tests::audit::venv_bin("python").unwrap())
        .args(["-c", OTLP_SINK, &op.to_string()])
        .arg(&spans_file)
        .stdout(Stdio::piped())
        .stderr(log(&s, "otlp"))
        .spawn()
        .unwrap();
    {
        use std::io::BufRead as _;
        let mut line = String::new();
        std::io::BufReader::new(sink.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready");
    }
    let _sink = Child(sink);
    let otel = vec![
        (
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            format!("http://127.0.0.1:{op}"),
        ),
        ("OTEL_BSP_SCHEDULE_DELAY", "100".to_string()),
    ];
    let with = |more: &[(&'static str, String)]| {
        let mut v = otel.clone();
        v.extend_from_slice(more);
        v
    };
    let _engine = spawn(&s, "aob-engine", &[], &otel);
    let _transform = spawn(&s, "aob-transform", &[], &otel);
    let _validate = spawn(&s, "aob-validate", &[], &with(&over_http(vp)));
    let validate_url = format!("http://127.0.0.1:{vp}");
    let _bridge = spawn(
        &s,
        "aob",
        &[
            "bridge",
            "http",
            "--route",
            &format!("validate={validate_url}"),
        ],
        &otel,
    );
    until_up(&format!("{validate_url}/readyz")).await;
    let wf = s.publish_example("acme", "chain").await.unwrap();
    let out = Command::new(aob_tests::binary("aob").unwrap())
        .args([
            "--tenant",
            "acme",
            "run",
            "start",
            &wf,
            "--input",
            r#"{"name": "Ada"}"#,
            "--wait",
        ])
        .env("NATS_URL", s.server.url())
        .env("AOB_PAYLOAD_URL", &s.payload_url)
        .envs(otel.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = stdout
        .lines()
        .find_map(|l| l.strip_prefix("run "))
        .expect("the run id")
        .trim()
        .to_string();

    // Spans arrive in batches: wait until each part of the run has reported.
    let want = [
        ("aob", "start greeting"),
        ("aob-engine", "engine start"),
        ("aob-transform", "transform compose"),
        ("aob", "validate check"),
        ("aob-validate", "validate check"),
        ("aob-transform", "transform shape"),
    ];
    let mut spans: Vec<Value> = Vec::new();
    for i in 0.. {
        spans = std::fs::read_to_string(&spans_file)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|sp| sp["attrs"]["aob.run_id"] == json!(run))
            .collect();
        let have = |svc: &str, name: &str| {
            spans
                .iter()
                .any(|sp| sp["service"] == json!(svc) && sp["name"] == json!(name))
        };
        if want.iter().all(|(svc, name)| have(svc, name))
            && spans
                .iter()
                .filter(|sp| sp["service"] == json!("aob-engine"))
                .count()
                >= 4
        {
            break;
        }
        assert!(i < 300, "missing spans; have {spans:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let traces: std::collections::BTreeSet<&str> =
        spans.iter().filter_map(|sp| sp["trace"].as_str()).collect();
    assert_eq!(traces.len(), 1, "one run, one trace: {spans:#?}");
    let trace = *traces.iter().next().unwrap();
    let roots: Vec<&Value> = spans.iter().filter(|sp| sp["parent"].is_null()).collect();
    assert_eq!(roots.len(), 1, "{roots:#?}");
    assert_eq!(roots[0]["name"], json!("start greeting"));
    let ids: std::collections::BTreeSet<&str> =
        spans.iter().filter_map(|sp| sp["span"].as_str()).collect();
    // Every parent is a span of the run, reported: no link is broken on the way.
    let all: Vec<Value> = std::fs::read_to_string(&spans_file)
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .collect();
    for sp in &spans {
        if let Some(p) = sp["parent"].as_str() {
            assert!(
                ids.contains(p)
                    || all
                        .iter()
                        .any(|o| o["span"] == json!(p) && o["trace"] == json!(trace)),
                "parent of {sp} not reported"
            );
        }
    }
    // The function behind the bridge is a child of the bridge's span for the same task.
    let bridged = spans
        .iter()
        .find(|sp| sp["service"] == json!("aob") && sp["name"] == json!("validate check"))
        .unwrap();
    let remote = spans
        .iter()
        .find(|sp| sp["service"] == json!("aob-validate"))
        .unwrap();
    assert_eq!(remote["parent"], bridged["span"]);

    // The run's audit records carry the trace.
    let records: Vec<Value> = s
        .messages(aob_streams::AUDIT, &aob_streams::subjects::audit("acme"))
        .await
        .unwrap()
        .into_iter()
        .filter(|r| r["run_id"] == json!(run))
        .collect();
    assert!(records.len() >= 6, "{records:#?}");
    for r in &records {
        assert_eq!(r["trace_id"], json!(trace), "{r}");
        assert!(
            r["span_id"]
                .as_str()
                .is_some_and(|id| ids.contains(id) || id.len() == 16),
            "{r}"
        );
    }
}

/// One request as a broker's ingress took it.
type Taken = (axum::http::HeaderMap, bytes::Bytes);

/// The broker variant, hop by hop. The bridge hands each task to the broker's ingress (here
/// a listener that keeps what it is sent and answers 202, as an ingress does) and acks it;
/// the test then does what the broker's triggers do: it delivers each event to the
/// function named by its `aobnodetype` and sends the reply event to the bridge's
/// `/replies`, which settles it. The chain example completes. Every task carries a token
/// the function copies to its reply: a reply without it, or with another task's, is
/// refused (401). An event the broker gave up on, sent to `/dead-letters`, lands in the
/// dead-letter stream with the task and the broker's reason; garbage is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_variant_forwards_tasks_and_settles_the_replies_it_is_sent() {
    let s = stack_with_engine().await;
    let (tp, vp, lp) = (port(), port(), port());
    let _transform = spawn(&s, "aob-transform", &[], &over_http(tp));
    let _validate = spawn(&s, "aob-validate", &[], &over_http(vp));
    let (taken_tx, mut taken) = tokio::sync::mpsc::unbounded_channel::<Taken>();
    let ingress = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ingress_url = format!("http://{}", ingress.local_addr().unwrap());
    tokio::spawn(async move {
        let app = axum::Router::new().route(
            "/",
            axum::routing::post(move |h: axum::http::HeaderMap, b: bytes::Bytes| {
                let tx = taken_tx.clone();
                async move {
                    let _ = tx.send((h, b));
                    axum::http::StatusCode::ACCEPTED
                }
            }),
        );
        axum::serve(ingress, app).await.unwrap();
    });
    let listen = format!("127.0.0.1:{lp}");
    let _bridge = spawn(
        &s,
        "aob",
        &[
            "bridge",
            "http",
            "--broker",
            &ingress_url,
            "--listen",
            &listen,
            "--type",
            "transform",
            "--type",
            "validate",
        ],
        &[("AOB_BRIDGE_KEY", "a key of the bridge's own".to_string())],
    );
    for i in 0.. {
        if tokio::net::TcpStream::connect(&listen).await.is_ok() {
            break;
        }
        assert!(i < 300, "the bridge never listened");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    until_up(&format!("http://127.0.0.1:{tp}/readyz")).await;
    until_up(&format!("http://127.0.0.1:{vp}/readyz")).await;

    let wf = s.publish_example("acme", "chain").await.unwrap();
    let run = s
        .start_run("acme", &wf, json!({"name": "Ada"}))
        .await
        .unwrap();
    let http = reqwest::Client::new();
    let mut first: Option<Taken> = None;
    // The chain has three steps: three tasks reach the ingress, one after the other.
    for _ in 0..3 {
        let (headers, body) = tokio::time::timeout(Duration::from_secs(30), taken.recv())
            .await
            .expect("no task reached the broker")
            .unwrap();
        assert_eq!(headers["ce-type"], "dev.aob.task");
        let target = match headers["ce-aobnodetype"].to_str().unwrap() {
            "transform" => tp,
            "validate" => vp,
            other => panic!("a task for {other}"),
        };
        assert!(headers.contains_key("ce-aobtoken"), "{headers:?}");
        first.get_or_insert_with(|| (headers.clone(), body.clone()));
        // The trigger's delivery to the function.
        let reply = http
            .post(format!("http://127.0.0.1:{target}/"))
            .headers(headers)
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(reply.status(), 200);
        let (rh, rb) = (reply.headers().clone(), reply.bytes().await.unwrap());
        assert!(
            rh.contains_key("ce-aobtoken"),
            "the reply carries the task's token"
        );
        // Without the token, or with another task's, the same reply is refused.
        let mut forged = rh.clone();
        forged.remove("ce-aobtoken");
        let r = http
            .post(format!("http://{listen}/replies"))
            .headers(forged.clone())
            .body(rb.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
        if let Some((first_headers, _)) = &first
            && first_headers["ce-aobtoken"] != rh["ce-aobtoken"]
        {
            forged.insert("ce-aobtoken", first_headers["ce-aobtoken"].clone());
            let r = http
                .post(format!("http://{listen}/replies"))
                .headers(forged)
                .body(rb.clone())
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 401, "another task's token settles nothing");
        }
        // The replies trigger's delivery to the bridge.
        let settled = http
            .post(format!("http://{listen}/replies"))
            .headers(rh)
            .body(rb)
            .send()
            .await
            .unwrap();
        assert_eq!(settled.status(), 200, "{}", settled.text().await.unwrap());
    }
    let (state, _) = tokio::time::timeout(Duration::from_secs(30), s.wait_run("acme", &run))
        .await
        .expect("the run did not finish")
        .unwrap();
    assert_eq!(state.status, RunStatus::Completed);
    assert_eq!(
        output(&s, &run).await,
        json!({"greeting": "Hello, Ada!", "checked": true})
    );
    // Nothing waits in the tasks' consumers: the bridge acked each once the broker took it.
    s.drained(aob_streams::TASKS, "fn-transform", Duration::from_secs(10))
        .await
        .unwrap();

    // An event the broker could not deliver: dead-lettered with its task and the reason.
    let (mut headers, body) = first.unwrap();
    headers.insert("ce-knativeerrorcode", "503".parse().unwrap());
    let r = http
        .post(format!("http://{listen}/dead-letters"))
        .headers(headers)
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let letters = s
        .messages(
            aob_streams::DLQ,
            &aob_streams::subjects::dlq_of_tenant("acme"),
        )
        .await
        .unwrap();
    let letter = letters
        .iter()
        .find(|l| l["component"] == json!("fn.transform"))
        .unwrap_or_else(|| panic!("{letters:?}"));
    assert!(
        letter["reason"].as_str().unwrap().contains("answered 503"),
        "{letter}"
    );
    assert_eq!(letter["subject"], json!("aob.acme.task.transform"));
    let original: Value = serde_json::from_str(letter["original"].as_str().unwrap()).unwrap();
    assert_eq!(original, serde_json::from_slice::<Value>(&body).unwrap());
    // A dead letter without the token is refused.
    let r = http
        .post(format!("http://{listen}/dead-letters"))
        .headers(event_headers("run.x", "dev.aob.task"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // What is not a reply event is refused.
    let r = http
        .post(format!("http://{listen}/replies"))
        .body("garbage")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
}

/// Configuration mistakes of the transports are said at once, naming the variable, before
/// anything connects: an unknown `AOB_TRANSPORT`, a broker bridge without its key.
#[test]
fn a_bad_transport_or_a_broker_bridge_without_a_key_is_refused_at_once() {
    let nowhere = format!("nats://127.0.0.1:{}", port());
    let out = Command::new(aob_tests::binary("aob-transform").unwrap())
        .env("NATS_URL", &nowhere)
        .env("AOB_TRANSPORT", "knative")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("AOB_TRANSPORT=`knative`"), "{err}");
    let out = Command::new(aob_tests::binary("aob").unwrap())
        .args([
            "bridge",
            "http",
            "--broker",
            "http://127.0.0.1:1/",
            "--listen",
            "127.0.0.1:0",
        ])
        .env("NATS_URL", &nowhere)
        .env_remove("AOB_BRIDGE_KEY")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("AOB_BRIDGE_KEY"), "{err}");
}

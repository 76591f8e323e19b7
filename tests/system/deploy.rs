//! The same function binaries on other transports: CloudEvents over HTTP behind `aob bridge
//! http`, and AWS Lambda (the Runtime API of `cargo lambda watch`) behind `aob bridge
//! lambda`; an example workflow runs end to end on each.

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
    let mut s = aob_tests::Stack::bare().await.unwrap();
    let engine = s.engine().await.unwrap();
    s.spawn_engine(engine);
    let (tp, vp, bp) = (port(), port(), port());
    let http = |p: u16| {
        vec![
            ("AOB_TRANSPORT", "http".to_string()),
            ("PORT", p.to_string()),
        ]
    };
    let _transform = spawn(&s, "aob-transform", &[], &http(tp));
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
        let text = reqwest::get(&metrics)
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if text.contains("aob_tasks_total{node_type=\"validate\",outcome=\"retried\"}") {
            retried = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(retried, "the bridge never tried the validate function");
    let state = s.run_state("acme", &early).await.unwrap().unwrap();
    assert_eq!(state.status, RunStatus::Running);
    let _validate = spawn(&s, "aob-validate", &[], &http(vp));
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
        .messages(aob_streams::DLQ, &aob_streams::subjects::dlq_of_tenant("acme"))
        .await
        .unwrap();
    assert!(
        letters
            .iter()
            .any(|l| l["component"] == json!("fn.transform") && l["reason"].as_str().unwrap_or("").contains("not a task")),
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
    assert_eq!(reply["records"][0]["actor"], json!("fn.transform"), "{reply}");

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
        .header("ce-specversion", "1.0")
        .header("ce-id", "x")
        .header("ce-source", "test")
        .header("ce-type", "com.example.other")
        .header("content-type", "application/json")
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
        .header("ce-specversion", "1.0")
        .header("ce-id", "y")
        .header("ce-source", "test")
        .header("ce-type", "dev.aob.task")
        .header("content-type", "application/json")
        .body("{\"nope\": 1}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let reply: Value = resp.json().await.unwrap();
    assert!(
        reply["refused"].as_str().unwrap_or("").contains("not a task"),
        "{reply}"
    );
}

/// The chain example's functions as Lambda functions on the Runtime API emulator of
/// `cargo lambda watch` (installed by scripts/setup), behind `aob bridge lambda`, which
/// invokes them through the AWS SDK with an endpoint override.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_example_runs_on_lambda_functions_behind_the_lambda_bridge() {
    let mut s = aob_tests::Stack::bare().await.unwrap();
    let engine = s.engine().await.unwrap();
    s.spawn_engine(engine);
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
        if tokio::net::TcpStream::connect(("127.0.0.1", lp)).await.is_ok() {
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

//! The double's own surface: scripting at runtime over HTTP, the request log, `times`,
//! and its answers to malformed requests.
// Helpers outside #[test] functions are test code too.
#![allow(clippy::unwrap_used)]

use aob_scripted_provider::{Reply, Requests, Rule, Script, ScriptedProvider};
use serde_json::{Value, json};

async fn post(url: &str, body: &Value) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(url)
        .json(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

#[tokio::test]
async fn script_replaced_over_http_and_requests_counted_per_model() {
    let double = ScriptedProvider::start(Script::new(vec![Rule::always(Reply::text("first"))]))
        .await
        .unwrap();
    let openai = format!("{}/chat/completions", double.openai_base_url());
    let ask =
        |model: &str| json!({ "model": model, "messages": [{ "role": "user", "content": "hi" }] });
    let (status, body) = post(&openai, &ask("a")).await;
    assert_eq!(
        (status, body["choices"][0]["message"]["content"].clone()),
        (200, json!("first"))
    );

    let http = reqwest::Client::new();
    let script = "rules:\n  - when: { model: b }\n    times: 1\n    reply: { error: { status: 503, message: busy } }\ndefault: { text: second }\n";
    let r = http
        .post(format!("{}/_double/script", double.url()))
        .body(script)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 204);
    let (status, body) = post(&openai, &ask("b")).await;
    assert_eq!(
        (status, body["error"]["message"].clone()),
        (503, json!("busy"))
    );
    // Used up: the default answers now. The path without /v1 is served too.
    let (status, body) = post(&format!("{}/chat/completions", double.url()), &ask("b")).await;
    assert_eq!(
        (status, body["choices"][0]["message"]["content"].clone()),
        (200, json!("second"))
    );

    let bad = http
        .post(format!("{}/_double/script", double.url()))
        .body("rules:\n  - when: { regex: '[' }\n    reply: { text: x }\n")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status().as_u16(), 400);
    assert!(bad.text().await.unwrap().contains("rules[0]"));

    let over_http: Requests = http
        .get(format!("{}/_double/requests", double.url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(over_http, double.requests());
    assert_eq!(over_http.total, 3);
    assert_eq!((over_http.for_model("a"), over_http.for_model("b")), (1, 2));
    assert_eq!(over_http.recent[2].path, "/chat/completions");
    assert_eq!(over_http.recent[0].body, ask("a"));
}

#[tokio::test]
async fn malformed_requests_get_the_protocols_400() {
    let double = ScriptedProvider::start(Script::default()).await.unwrap();
    let (status, body) = post(
        &format!("{}/v1/messages", double.url()),
        &json!({ "model": "m", "messages": [{ "role": "user", "content": "hi" }] }),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(body["type"], "error");
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_tokens")
    );

    let (status, body) = post(
        &format!("{}/v1/chat/completions", double.url()),
        &json!({ "model": "m" }),
    )
    .await;
    assert_eq!(status, 400);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("messages")
    );
    assert_eq!(
        double.requests().total,
        0,
        "malformed requests are not counted"
    );

    // Without a script the double echoes the last user message.
    let (_, body) = post(
        &format!("{}/v1/messages", double.url()),
        &json!({ "model": "m", "max_tokens": 5, "messages": [{ "role": "user", "content": "ping" }] }),
    )
    .await;
    assert_eq!(body["content"][0]["text"], "scripted reply to: ping");
}

#[tokio::test]
async fn the_binary_says_what_it_is_and_serves_a_script_file() {
    let bin = env!("CARGO_BIN_EXE_aob-scripted-provider");
    let help = std::process::Command::new(bin)
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.contains("TEST DOUBLE") && help.contains("--script"),
        "{help}"
    );

    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("script.yaml");
    std::fs::write(&script, "default: { text: from the file }\n").unwrap();
    let mut child = tokio::process::Command::new(bin)
        .args(["--port", "0", "--script"])
        .arg(&script)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdout = tokio::io::BufReader::new(child.stdout.take().unwrap());
    let mut url = String::new();
    tokio::io::AsyncBufReadExt::read_line(&mut stdout, &mut url)
        .await
        .unwrap();
    let (status, body) = post(
        &format!("{}/v1/messages", url.trim()),
        &json!({ "model": "m", "max_tokens": 5, "messages": [{ "role": "user", "content": "hi" }] }),
    )
    .await;
    assert_eq!(
        (status, body["content"][0]["text"].clone()),
        (200, json!("from the file"))
    );
    child.kill().await.unwrap();

    let bad = std::process::Command::new(bin)
        .args(["--script", "/nonexistent/script.yaml"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("/nonexistent/script.yaml"));
}

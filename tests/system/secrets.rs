//! Secrets: a step's credential reaches the endpoint and nothing that is stored.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use aob_audit::sink::SinkConfig;
use aob_model::state::RunStatus;
use aob_runtime::nats::{ServeConfig, serve};
use aob_runtime::secrets::Secrets;
use aob_tests::{Fns, Stack, endpoints};
use futures::StreamExt;
use serde_json::json;
use tokio_util::sync::CancellationToken;

const T: &str = "default";
const REFERENCE: &str = "${secrets.API_TOKEN}";

/// Every file under `dir`.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

fn holds(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

/// What a scan of every stored message found.
#[derive(Debug, Default)]
struct Scan {
    messages: usize,
    with_secret: Vec<String>,
    with_reference: Vec<String>,
    with_scrubbed_echo: Vec<String>,
}

/// Reads every message of every stream on the server (the AOB_* streams, and the streams
/// behind every KV bucket and object store), headers included.
async fn scan_streams(s: &Stack, secret: &str) -> anyhow::Result<Scan> {
    let mut scan = Scan::default();
    let names: Vec<String> =
        s.js.stream_names()
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<_, _>>()?;
    assert!(names.iter().any(|n| n == aob_streams::AUDIT), "{names:?}");
    for name in names {
        let mut stream = s.js.get_stream(&name).await?;
        let state = stream.info().await?.state.clone();
        if state.messages == 0 {
            continue;
        }
        for seq in state.first_sequence..=state.last_sequence {
            // Sequences removed by limits or deletes are gaps.
            let Ok(m) = stream.get_raw_message(seq).await else {
                continue;
            };
            scan.messages += 1;
            let mut bytes = format!("{} {:?} ", m.subject, m.headers).into_bytes();
            bytes.extend_from_slice(&m.payload);
            let at = format!("{name} #{seq} ({})", m.subject);
            if holds(&bytes, secret) {
                scan.with_secret.push(at.clone());
            }
            if holds(&bytes, REFERENCE) {
                scan.with_reference.push(at.clone());
            }
            if holds(&bytes, "Bearer ***") {
                scan.with_scrubbed_echo.push(at);
            }
        }
    }
    Ok(scan)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_value_appears_in_no_stream_bucket_payload_or_parquet_file() {
    let s = Stack::start_with(Fns::AllButHttp).await.unwrap();
    let secret = format!("tok-{}", ulid::Ulid::new());
    let (addr, counters) = endpoints::serve().await;
    counters.expect_token(&secret);

    // The http function reads its secrets from a directory, as Kubernetes mounts them.
    let secrets_dir = tempfile::tempdir().unwrap();
    std::fs::write(secrets_dir.path().join("API_TOKEN"), format!("{secret}\n")).unwrap();
    let http = aob_http::HttpHandler::with(
        aob_http::Policy::default(),
        Secrets::from_dir(secrets_dir.path()),
    )
    .unwrap();
    let stop = CancellationToken::new();
    let function = {
        let (client, payloads, stop) = (
            s.server.connect().await.unwrap(),
            s.payloads.clone(),
            stop.clone(),
        );
        tokio::spawn(async move {
            serve(
                Arc::new(http),
                client,
                payloads,
                ServeConfig::default(),
                stop,
            )
            .await
        })
    };
    let audit_dir = tempfile::tempdir().unwrap();
    let sink = {
        let url = format!("file://{}", audit_dir.path().display());
        let (client, stop) = (s.client.clone(), stop.clone());
        tokio::spawn(
            async move { aob_fn_audit::run(client, &url, SinkConfig::default(), stop).await },
        )
    };

    // The endpoint echoes the header back in a body large enough to be offloaded, and a
    // later step copies the echo into its own output.
    s.publish(
        T,
        &format!(
            "name: secret\nsteps:\n  - id: call\n    type: http\n    url: 'http://{addr}/auth/300000'\n    headers: {{authorization: 'Bearer {REFERENCE}'}}\n  - {{id: copy, type: transform, needs: [call], output: '{{{{ steps.call.output.body.echo }}}}'}}\n"
        ),
    )
    .await
    .unwrap();
    let run = s.start_run(T, "secret", json!({})).await.unwrap();
    let (state, events) = s.wait_run(T, &run).await.unwrap();
    assert_eq!(state.status, RunStatus::Completed, "{events:#?}");
    assert_eq!(
        counters.hits("/auth"),
        1,
        "the endpoint accepted the real token"
    );
    let copied = s
        .payloads
        .hydrate(state.steps["copy"].output.clone().unwrap_or_default())
        .await
        .unwrap();
    assert_eq!(copied, json!("Bearer ***"));
    aob_tests::audit::drain(&s.client, Duration::from_secs(60))
        .await
        .unwrap();

    // Streams and buckets: the reference is stored (in the definition and the audit
    // input), and so is the scrubbed echo (in run state and history); the value nowhere.
    // Work queues (tasks, results) are empty by now: acked messages leave them.
    let scan = scan_streams(&s, &secret).await.unwrap();
    assert!(scan.messages >= 10, "{scan:?}");
    for stream in [
        format!("KV_{}", aob_streams::WORKFLOWS),
        aob_streams::AUDIT.into(),
    ] {
        assert!(
            scan.with_reference.iter().any(|at| at.starts_with(&stream)),
            "no reference in {stream}: {scan:?}"
        );
    }
    assert!(
        scan.with_scrubbed_echo
            .iter()
            .any(|at| at.starts_with(&format!("KV_{}", aob_streams::RUNS))),
        "{scan:?}"
    );
    assert_eq!(
        scan.with_secret,
        Vec::<String>::new(),
        "the secret is stored"
    );

    // Payload files: the offloaded echo is there, scrubbed.
    let payload_files = files(s.data.path());
    let mut echo_seen = false;
    for f in &payload_files {
        let bytes = std::fs::read(f).unwrap();
        assert!(!holds(&bytes, &secret), "{} holds the secret", f.display());
        echo_seen |= holds(&bytes, "\"echo\":\"Bearer ***\"");
    }
    assert!(echo_seen, "no offloaded output among {payload_files:?}");

    // Parquet files: every column of every row, as DuckDB reads them.
    let parquet: Vec<PathBuf> = files(audit_dir.path())
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "parquet"))
        .collect();
    assert!(!parquet.is_empty());
    for f in &parquet {
        let bytes = std::fs::read(f).unwrap();
        assert!(!holds(&bytes, &secret), "{} holds the secret", f.display());
    }
    let trail = aob_tests::audit::trail(audit_dir.path());
    let got = aob_tests::audit::duckdb(&format!(
        "SELECT count(*) FILTER (WHERE run_id = '{run}'), \
                count(*) FILTER (WHERE contains(CAST(t AS VARCHAR), '{secret}')), \
                count(*) FILTER (WHERE contains(CAST(t AS VARCHAR), '{REFERENCE}')) \
         FROM {trail} t"
    ))
    .unwrap();
    let (rows, with_secret, with_reference) = (&got[0][0], &got[0][1], &got[0][2]);
    assert!(rows.as_u64().unwrap() >= 8, "{got:?}");
    assert_eq!(with_secret, &json!(0), "rows holding the secret");
    assert!(with_reference.as_u64().unwrap() >= 1, "{got:?}");
    // The tool call's recorded input names the secret it used; the header is redacted.
    let input = aob_tests::audit::duckdb(&format!(
        "SELECT input_json FROM {trail} WHERE run_id = '{run}' AND event_kind = 'tool_call'"
    ))
    .unwrap();
    let input: serde_json::Value = serde_json::from_str(input[0][0].as_str().unwrap()).unwrap();
    assert_eq!(
        input["headers"]["authorization"],
        json!(format!("*** ({REFERENCE})"))
    );

    stop.cancel();
    function.await.unwrap().unwrap();
    sink.await.unwrap().unwrap();
}

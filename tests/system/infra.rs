//! `aob infra nats-accounts` against a real nats-server running with the accounts it
//! writes: a tenant's user starts and follows its own runs, and is refused results,
//! internal signals, tasks and another tenant's subjects.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use aob_tests::Stack;
use serde_json::json;

/// The `aob` binary with these arguments and `NATS_URL`; exit code and output.
#[allow(clippy::unwrap_used)]
fn aob(url: &str, args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(aob_tests::binary("aob").unwrap())
        .args(args)
        .env("NATS_URL", url)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_user_runs_its_own_workflows_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("generated");
    let (code, _, err) = aob(
        "nats://127.0.0.1:1",
        &[
            "infra",
            "nats-accounts",
            "acme",
            "globex",
            "--out",
            out.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 0, "{err}");
    // The stack's own connections carry no credentials: they are the system user.
    // (`include` paths are relative to the including file: infra/nats/single.conf includes
    // `generated/accounts.conf`; here the text goes in whole.)
    let conf = format!(
        "{}\nno_auth_user: aob\n",
        std::fs::read_to_string(out.join("accounts.conf")).unwrap()
    );
    let server = aob_testkit::NatsServer::start_with_config(&conf).unwrap();
    let s = Stack::start_on(server).await.unwrap();
    s.publish_example("acme", "chain").await.unwrap();
    let pw = std::fs::read_to_string(out.join("tenant-acme.password")).unwrap();
    let acme_url = format!(
        "nats://tenant-acme:{}@127.0.0.1:{}",
        pw.trim(),
        s.server.port()
    );

    // Its own runs: start one and follow it to the end, with the CLI as the tenant.
    let (code, stdout, err) = aob(
        &acme_url,
        &[
            "--tenant",
            "acme",
            "run",
            "start",
            "greeting",
            "--input",
            r#"{"name": "Ada"}"#,
            "--wait",
        ],
    );
    assert_eq!(code, 0, "{stdout}\n{err}");
    assert!(stdout.contains("COMPLETED"), "{stdout}");
    let run = stdout
        .lines()
        .find_map(|l| {
            l.strip_prefix("run ")
                .map(|r| r.split_whitespace().next().unwrap_or_default().to_string())
        })
        .unwrap();
    let (code, stdout, err) = aob(&acme_url, &["--tenant", "acme", "run", "get", &run]);
    assert_eq!(code, 0, "{stdout}\n{err}");

    // Another tenant's runs: nothing to see (the consumer it would need is refused).
    let (code, stdout, _) = aob(
        &acme_url,
        &[
            "--tenant",
            "globex",
            "run",
            "watch",
            &run,
            "--timeout",
            "3s",
        ],
    );
    assert_ne!(code, 0);
    assert!(!stdout.contains("started"), "{stdout}");

    // Subjects a tenant may not touch: each one is a permissions violation.
    let violations = Arc::new(Mutex::new(Vec::<String>::new()));
    let seen = violations.clone();
    let client = async_nats::ConnectOptions::with_user_and_password(
        "tenant-acme".into(),
        pw.trim().to_string(),
    )
    .event_callback(move |e| {
        let seen = seen.clone();
        async move {
            if let async_nats::Event::ServerError(e) = e
                && let Ok(mut v) = seen.lock()
            {
                v.push(e.to_string());
            }
        }
    })
    .connect(s.server.url())
    .await
    .unwrap();
    let forbidden = [
        "aob.acme.result.01X".to_string(),
        "aob.acme.cmd.internal.01X".to_string(),
        "aob.acme.task.transform".to_string(),
        "aob.globex.cmd.start".to_string(),
        "aob.acme.audit".to_string(),
    ];
    for subject in &forbidden {
        client
            .publish(subject.clone(), json!({}).to_string().into())
            .await
            .unwrap();
    }
    let _sub = client.subscribe("aob.globex.run.>").await.unwrap();
    client.flush().await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let got = violations.lock().unwrap().clone();
        let publish_refused = forbidden
            .iter()
            .all(|f| got.iter().any(|g| g.contains(f.as_str())));
        let subscribe_refused = got.iter().any(|g| g.contains("aob.globex.run.>"));
        if publish_refused && subscribe_refused {
            assert!(
                got.iter()
                    .all(|g| g.to_lowercase().contains("permissions violation")),
                "{got:?}"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "violations seen: {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Following another tenant's history with a consumer of its own is refused too.
    let js = async_nats::jetstream::new(client.clone());
    let stream = js.get_stream(aob_streams::HISTORY).await.unwrap();
    let other = stream
        .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig {
            name: Some("peek".into()),
            filter_subject: "aob.globex.run.>".into(),
            ..Default::default()
        })
        .await;
    assert!(
        other.is_err(),
        "a consumer on another tenant's history was created"
    );
}

/// The shipped configurations (one node; three nodes) are accepted by nats-server's own
/// check, with the accounts `aob infra nats-accounts` writes beside them.
#[test]
fn the_shipped_nats_configurations_pass_the_servers_check() {
    let dir = tempfile::tempdir().unwrap();
    let nats = dir.path().join("nats");
    std::fs::create_dir_all(nats.join("cluster")).unwrap();
    let shipped = aob_tests::examples_dir().join("../infra/nats");
    let mut confs = vec!["single.conf".to_string()];
    for i in 1..=3 {
        confs.push(format!("cluster/aob-{i}.conf"));
    }
    for c in &confs {
        std::fs::copy(shipped.join(c), nats.join(c)).unwrap();
    }
    let (code, _, err) = aob(
        "nats://127.0.0.1:1",
        &[
            "infra",
            "nats-accounts",
            "acme",
            "--out",
            nats.join("generated").to_str().unwrap(),
        ],
    );
    assert_eq!(code, 0, "{err}");
    let server = aob_testkit::nats_server_binary().unwrap();
    for c in &confs {
        let out = std::process::Command::new(&server)
            .args(["-t", "-c"])
            .arg(nats.join(c))
            .current_dir(&nats)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{c}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Writes a CA and a server certificate for 127.0.0.1 into `dir` with the system's openssl.
#[allow(clippy::unwrap_used)]
fn certificates(dir: &std::path::Path) {
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    run(&[
        &["req", "-x509"][..],
        &ec,
        &[
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "1",
            "-subj",
            "/CN=aob test CA",
        ],
    ]
    .concat());
    run(&[
        &["req"][..],
        &ec,
        &[
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ],
    ]
    .concat());
    std::fs::write(
        dir.join("san.cnf"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "1",
        "-extfile",
        "san.cnf",
    ]);
}

/// A server with TLS on its client port and a WebSocket listener: a tenant's user works
/// over both, with the same permissions; a client without TLS is turned away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_connect_over_tls_and_websocket_with_the_same_permissions() {
    aob_runtime::init_tls();
    let dir = tempfile::tempdir().unwrap();
    certificates(dir.path());
    let out = dir.path().join("generated");
    let (code, _, err) = aob(
        "nats://127.0.0.1:1",
        &[
            "infra",
            "nats-accounts",
            "acme",
            "--out",
            out.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 0, "{err}");
    let d = dir.path().display();
    let conf = format!(
        "{}\nno_auth_user: aob\ntls {{ cert_file: \"{d}/server.crt\", key_file: \"{d}/server.key\" }}\nwebsocket {{ port: -1, no_tls: true }}\n",
        std::fs::read_to_string(out.join("accounts.conf")).unwrap()
    );
    let server = aob_testkit::NatsServer::start_with_config(&conf).unwrap();
    let log = std::fs::read_to_string(server.store_dir().join("nats-server.log")).unwrap();
    let ws_port: u16 = log
        .lines()
        .find_map(|l| l.split("Listening for websocket clients on ").nth(1))
        .and_then(|rest| rest.rsplit(':').next())
        .and_then(|p| p.trim().parse().ok())
        .expect("the websocket listener's port in the server log");
    let tls_url = format!("tls://127.0.0.1:{}", server.port());
    // The system user, over TLS, applies the topology.
    let system = async_nats::ConnectOptions::new()
        .add_root_certificates(dir.path().join("ca.crt"))
        .require_tls(true)
        .connect(&tls_url)
        .await
        .unwrap();
    aob_streams::Topology::default()
        .apply(&async_nats::jetstream::new(system.clone()))
        .await
        .unwrap();
    // A client that cannot verify the server (no CA given) does not get in.
    let plain = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(2))
        .connect(server.url());
    assert!(
        tokio::time::timeout(Duration::from_secs(5), plain)
            .await
            .map_or(true, |r| r.is_err()),
        "a client that cannot verify the server got in"
    );
    // The CLI (and every function) trusts the CA named by AOB_NATS_CA.
    let ca = dir.path().join("ca.crt");
    let cli = |with_ca: bool| {
        let mut cmd = std::process::Command::new(aob_tests::binary("aob").unwrap());
        cmd.args(["streams", "diff"]).env("NATS_URL", &tls_url);
        if with_ca {
            cmd.env("AOB_NATS_CA", &ca);
        }
        cmd.output().unwrap()
    };
    let with = cli(true);
    assert!(
        with.status.success(),
        "{}",
        String::from_utf8_lossy(&with.stderr)
    );
    assert!(
        !cli(false).status.success(),
        "the server was trusted without its CA"
    );
    let pw = std::fs::read_to_string(out.join("tenant-acme.password")).unwrap();
    let pw = pw.trim().to_string();
    let start = serde_json::to_vec(&json!({"workflow": "w", "input": {}})).unwrap();
    for (how, options, url) in [
        (
            "tls",
            async_nats::ConnectOptions::with_user_and_password("tenant-acme".into(), pw.clone())
                .add_root_certificates(dir.path().join("ca.crt"))
                .require_tls(true),
            tls_url.clone(),
        ),
        (
            "websocket",
            async_nats::ConnectOptions::with_user_and_password("tenant-acme".into(), pw.clone()),
            format!("ws://127.0.0.1:{ws_port}"),
        ),
    ] {
        let client = options.connect(&url).await.unwrap();
        let js = async_nats::jetstream::new(client.clone());
        // Its own start is stored (acknowledged by the stream).
        js.publish("aob.acme.cmd.start", start.clone().into())
            .await
            .unwrap()
            .await
            .unwrap_or_else(|e| panic!("{how}: the start was not stored: {e}"));
        // Another tenant's start is not.
        let other = js
            .publish("aob.globex.cmd.start", start.clone().into())
            .await;
        let stored = match other {
            Ok(ack) => tokio::time::timeout(Duration::from_secs(3), ack)
                .await
                .is_ok_and(|r| r.is_ok()),
            Err(_) => false,
        };
        assert!(!stored, "{how}: another tenant's start was stored");
    }
}

/// The image's Dockerfile passes hadolint (installed by scripts/setup).
#[test]
fn the_dockerfile_passes_hadolint() {
    let hadolint = aob_tests::audit::venv_bin("hadolint").unwrap();
    let dockerfile = aob_tests::examples_dir().join("../infra/docker/Dockerfile");
    let out = std::process::Command::new(hadolint)
        .arg(&dockerfile)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs a Python check and reads the one JSON object it prints.
#[allow(clippy::unwrap_used)]
fn python_json(cmd: &mut std::process::Command) -> serde_json::Value {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// What the chart test's Python side prints: lint findings and, per rendered object, its
/// kind, name, command and validation result.
const CHART_CHECK: &str = r#"
import json, sys
import helm_python as helm
import kubernetes_validate as kv
import yaml

chart = sys.argv[1]
report = helm.lint(chart, strict=True)
values = json.loads(sys.argv[2])
rendered = helm.Chart.load(chart).render(values, name="prod", namespace="aob", is_install=True)
objects = []
for path, text in sorted(rendered.items()):
    if not path.endswith(".yaml"):
        continue
    for doc in yaml.safe_load_all(text):
        if not doc:
            continue
        try:
            kv.validate(doc, kv.latest_version(), strict=True)
            problem = None
        except kv.ValidationError as e:
            problem = str(e).splitlines()[0]
        spec = doc.get("spec", {}).get("template", {}).get("spec", {})
        containers = spec.get("containers", [])
        objects.append({
            "kind": doc["kind"],
            "name": doc["metadata"]["name"],
            "command": containers[0]["command"] if containers else None,
            "env": [e["name"] for e in containers[0].get("env", [])] if containers else [],
            "probes": [containers[0].get(p, {}).get("httpGet", {}).get("path") for p in ("livenessProbe", "readinessProbe")] if containers else [],
            "problem": problem,
        })
print(json.dumps({"lint": report, "objects": objects}))
"#;

/// The Helm chart (infra/helm/aob) lints strictly with Helm 4 (helm-python-sdk, no helm
/// binary), and every object it renders validates against the Kubernetes schemas
/// (kubernetes-validate): one Deployment per function type the build has, the engine, the
/// audit sink, and the hook that applies the topology.
#[test]
fn the_helm_chart_lints_and_renders_valid_manifests() {
    let python = aob_tests::audit::venv_bin("python").unwrap();
    let chart = aob_tests::examples_dir().join("../infra/helm/aob");
    let values = serde_json::json!({
        "nats": {"caSecret": "nats-ca", "urlSecret": "nats-url"},
        "models": {"configMap": "aob-models"},
        "tools": {"configMap": "aob-tools"},
        "envFromSecrets": ["aob-keys"],
        "env": {"AWS_REGION": "eu-west-1"},
        "embeddingModel": {"persistentVolumeClaim": "minilm"},
    });
    let got = python_json(
        std::process::Command::new(python)
            .args(["-c", CHART_CHECK])
            .arg(&chart)
            .arg(values.to_string()),
    );
    let lint = &got["lint"];
    assert_eq!(lint["errors"], serde_json::json!([]), "{lint}");
    let serious: Vec<&serde_json::Value> = lint["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["severity"].as_u64().unwrap_or(0) >= 2)
        .collect();
    assert!(serious.is_empty(), "{lint}");
    let objects = got["objects"].as_array().unwrap();
    for o in objects {
        assert!(o["problem"].is_null(), "{o}");
    }
    let commands: Vec<String> = objects
        .iter()
        .filter(|o| o["kind"] == "Deployment")
        .map(|o| o["command"][0].as_str().unwrap().to_string())
        .collect();
    let mut want: Vec<String> = aob_model::nodes::names()
        .into_iter()
        .filter(|t| !aob_model::nodes::ENGINE_TYPES.contains(t))
        .map(|t| format!("aob-{t}"))
        .collect();
    want.push("aob-engine".into());
    want.push("aob-audit".into());
    let mut have = commands.clone();
    have.sort();
    want.sort();
    assert_eq!(
        have, want,
        "one Deployment per function type, the engine and the sink"
    );
    let job = objects.iter().find(|o| o["kind"] == "Job").unwrap();
    assert_eq!(
        job["command"],
        serde_json::json!(["aob", "streams", "apply", "--replicas", "3"])
    );
    for o in objects.iter().filter(|o| o["kind"] == "Deployment") {
        let env = o["env"].as_array().unwrap();
        assert_eq!(
            o["probes"],
            serde_json::json!(["/healthz", "/readyz"]),
            "{}",
            o["name"]
        );
        for v in [
            "NATS_URL",
            "AOB_HTTP_ADDR",
            "AOB_NATS_CA",
            "AOB_PAYLOAD_URL",
            "AOB_AUDIT_URL",
            "AOB_KB_URL",
            "AOB_MODELS",
            "AOB_TOOLS",
            "AOB_EMBED_MODEL_DIR",
            "AWS_REGION",
        ] {
            assert!(
                env.contains(&serde_json::json!(v)),
                "{} lacks {v}",
                o["name"]
            );
        }
    }
}

/// A child process killed when dropped.
struct Child(std::process::Child);
impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn get(url: &str) -> Option<(u16, String)> {
    let r = reqwest::get(url).await.ok()?;
    let status = r.status().as_u16();
    Some((status, r.text().await.unwrap_or_default()))
}

/// Waits until `url` answers with `status`.
async fn until_status(url: &str, status: u16) -> String {
    for _ in 0..300 {
        if let Some((s, body)) = get(url).await
            && s == status
        {
            return body;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("{url} never answered {status}");
}

/// The engine and a function binary serve /healthz, /readyz and /metrics when
/// AOB_HTTP_ADDR is set: tasks counted by outcome, latency histograms, consumer lag, the
/// engine's counters; readiness follows the NATS connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_metrics_answer_over_http() {
    let mut s = aob_tests::Stack::bare().await.unwrap();
    let port = |_: ()| aob_tests::audit::free_port().unwrap();
    let (engine_port, fn_port, sink_port) = (port(()), port(()), port(()));
    let spawn = |bin: &str, p: u16| {
        Child(
            std::process::Command::new(aob_tests::binary(bin).unwrap())
                .env("NATS_URL", s.server.url())
                .env("AOB_PAYLOAD_URL", &s.payload_url)
                .env("AOB_HTTP_ADDR", format!("127.0.0.1:{p}"))
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap(),
        )
    };
    let _engine = spawn("aob-engine", engine_port);
    let _transform = spawn("aob-transform", fn_port);
    let _sink = Child(
        std::process::Command::new(aob_tests::binary("aob-audit").unwrap())
            .env("NATS_URL", s.server.url())
            .env(
                "AOB_AUDIT_URL",
                format!("file://{}", s.data.path().join("audit").display()),
            )
            .env("AOB_AUDIT_MAX_AGE", "300ms")
            .env("AOB_HTTP_ADDR", format!("127.0.0.1:{sink_port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let base = |p: u16| format!("http://127.0.0.1:{p}");
    until_status(&format!("{}/healthz", base(fn_port)), 200).await;
    until_status(&format!("{}/readyz", base(engine_port)), 200).await;

    s.publish(
        "acme",
        "name: twice\nsteps:\n  - {id: a, type: transform, output: 1}\n  - {id: b, type: transform, needs: [a], output: 2}\n",
    )
    .await
    .unwrap();
    let run = s
        .start_run("acme", "twice", serde_json::json!({}))
        .await
        .unwrap();
    let (state, _) = s.wait_run("acme", &run).await.unwrap();
    assert_eq!(state.status, aob_model::state::RunStatus::Completed);

    let metrics = until_status(&format!("{}/metrics", base(fn_port)), 200).await;
    assert!(
        metrics.contains("aob_tasks_total{node_type=\"transform\",outcome=\"completed\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("aob_task_seconds_count{node_type=\"transform\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("aob_task_seconds_bucket{node_type=\"transform\",le=\"+Inf\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("aob_consumer_pending{stream=\"AOB_TASKS\",consumer=\"fn-transform\"} 0"),
        "{metrics}"
    );
    let engine = until_status(&format!("{}/metrics", base(engine_port)), 200).await;
    let events: u64 = engine
        .lines()
        .find_map(|l| l.strip_prefix("aob_engine_events_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    assert!(events >= 3, "start and two results: {engine}");
    assert!(engine.contains("consumer=\"engine-cmd\""), "{engine}");
    // The audit sink counts the batches it wrote: the run's records, in one or more.
    let mut sink = String::new();
    for _ in 0..200 {
        sink = until_status(&format!("{}/metrics", base(sink_port)), 200).await;
        let rows: u64 = sink
            .lines()
            .find_map(|l| l.strip_prefix("aob_audit_rows_total "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        if rows >= 5 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(!sink.contains("aob_audit_batches_total 0\n"), "{sink}");
    assert!(sink.contains("consumer=\"audit-sink\""), "{sink}");

    // Readiness follows the connection: down with the server, up again after it.
    s.server.stop();
    until_status(&format!("{}/readyz", base(fn_port)), 503).await;
    until_status(&format!("{}/healthz", base(fn_port)), 200).await;
    s.server.start_again().unwrap();
    until_status(&format!("{}/readyz", base(fn_port)), 200).await;
}

/// A server that verifies clients takes an AOB process that shows a certificate its CA
/// signed (`AOB_NATS_CERT`, `AOB_NATS_KEY`) and turns away one that does not; a certificate
/// without its key is a configuration error said at once.
#[test]
fn a_server_that_verifies_clients_takes_only_signed_certificates() {
    let dir = tempfile::tempdir().unwrap();
    certificates(dir.path());
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        "client.key",
        "-out",
        "client.csr",
        "-subj",
        "/CN=aob-engine",
    ]);
    std::fs::write(
        dir.path().join("client.cnf"),
        "extendedKeyUsage=clientAuth\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "client.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "client.crt",
        "-days",
        "1",
        "-extfile",
        "client.cnf",
    ]);
    let d = dir.path().display();
    let server = aob_testkit::NatsServer::start_with_config(&format!(
        "tls {{ cert_file: \"{d}/server.crt\", key_file: \"{d}/server.key\", ca_file: \"{d}/ca.crt\", verify: true }}\n"
    ))
    .unwrap();
    let url = format!("tls://127.0.0.1:{}", server.port());
    let apply = |env: &[(&str, String)]| {
        std::process::Command::new(aob_tests::binary("aob").unwrap())
            .args(["streams", "apply"])
            .env("NATS_URL", &url)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .output()
            .unwrap()
    };
    let ca = ("AOB_NATS_CA", format!("{d}/ca.crt"));
    let cert = ("AOB_NATS_CERT", format!("{d}/client.crt"));
    let key = ("AOB_NATS_KEY", format!("{d}/client.key"));
    let out = apply(std::slice::from_ref(&ca));
    assert!(
        !out.status.success(),
        "no client certificate, no connection"
    );
    let out = apply(&[ca.clone(), cert.clone()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("AOB_NATS_CERT and AOB_NATS_KEY go together"),
        "{err}"
    );
    let out = apply(&[ca, cert, key]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("AOB_TASKS"),
        "{out:?}"
    );
}

/// Three nats-servers clustered on loopback (as `infra/nats/cluster` sets them up), the
/// topology applied with three replicas, and runs going through: every stream is R3, and
/// a run's state written through one node is read through another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_node_cluster_runs_workflows_on_r3_streams() {
    let mut nodes = aob_tests::cluster::Cluster::start(3).unwrap();
    let topology = aob_streams::Topology {
        replicas: 3,
        ..aob_tests::test_topology()
    };
    // The cluster elects its JetStream leader within seconds of forming.
    let js = async_nats::jetstream::new(nodes.connect_to(0).await.unwrap());
    nodes
        .apply(&js, &topology, Duration::from_secs(20))
        .await
        .unwrap();
    let mut tasks = js.get_stream(aob_streams::TASKS).await.unwrap();
    let info = tasks.info().await.unwrap();
    assert_eq!(info.config.num_replicas, 3);
    let cluster = info.cluster.clone().unwrap();
    assert_eq!(
        cluster.replicas.len(),
        2,
        "a leader and two replicas: {cluster:?}"
    );

    let mut s = Stack::bare_on(nodes.nodes.remove(0).server, topology)
        .await
        .unwrap();
    let engine = s.engine().await.unwrap();
    s.spawn_engine(engine);
    s.spawn_functions(aob_tests::Fns::AllButHttp).await.unwrap();
    let wf = s.publish_example("acme", "chain").await.unwrap();
    let run = s
        .start_run("acme", &wf, json!({"name": "Ada"}))
        .await
        .unwrap();
    let (state, _) = s.wait_run("acme", &run).await.unwrap();
    assert_eq!(state.status, aob_model::state::RunStatus::Completed);
    // The run's state, read through another node, is the same.
    let other = async_nats::jetstream::new(nodes.connect_to(1).await.unwrap());
    let kv = other.get_key_value(aob_streams::RUNS).await.unwrap();
    let stored: aob_model::state::RunState = serde_json::from_slice(
        &kv.get(aob_model::state::RunState::key("acme", &run))
            .await
            .unwrap()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(stored.status, aob_model::state::RunStatus::Completed);
}

/// The Knative manifests validate against the Knative and Kubernetes schemas, the SAM
/// template passes cfn-lint with no finding (both by infra/check.py, offline), there is a
/// Knative Service and a Trigger per function type and a Lambda function per type in the
/// template, and every flag the manifests give the bridge is one `aob bridge` takes.
#[test]
fn the_knative_manifests_and_the_sam_template_pass_their_checks() {
    let python = aob_tests::audit::venv_bin("python").unwrap();
    let root = aob_tests::examples_dir().join("..");
    let got = python_json(
        std::process::Command::new(python)
            .arg(root.join("infra/check.py"))
            .arg(&root),
    );
    assert_eq!(got["sam"]["findings"], serde_json::json!([]), "{got}");
    let objects = got["knative"].as_array().unwrap();
    for o in objects {
        assert!(o["problem"].is_null(), "{o}");
    }
    let types: Vec<&str> = aob_model::nodes::names()
        .into_iter()
        .filter(|t| !aob_model::nodes::ENGINE_TYPES.contains(t))
        .collect();
    let named = |kind: &str, name: &str| {
        objects
            .iter()
            .any(|o| o["kind"] == kind && o["name"] == name)
    };
    for t in &types {
        assert!(
            named("Service", &format!("aob-{t}")),
            "no Knative Service for {t}"
        );
        assert!(named("Trigger", &format!("aob-{t}")), "no Trigger for {t}");
    }
    // Functions are reached through the bridge, never from outside the cluster.
    let services = std::fs::read_to_string(root.join("infra/knative/services.yaml")).unwrap();
    assert_eq!(
        services
            .matches("networking.knative.dev/visibility: cluster-local")
            .count(),
        types.len()
    );
    let template = std::fs::read_to_string(root.join("infra/lambda/template.yaml")).unwrap();
    for t in &types {
        assert!(
            template.contains(&format!("FunctionName: aob-{t}\n")),
            "no Lambda function for {t}"
        );
    }
    // The bridge's flags, as the manifests write them, against the binary's own help.
    let help = |mode: &str| {
        let out = std::process::Command::new(aob_tests::binary("aob").unwrap())
            .args(["bridge", mode, "--help"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    for (file, mode) in [
        ("infra/knative/bridge.yaml", "http"),
        ("infra/knative/eventing.yaml", "http"),
        ("infra/lambda/template.yaml", "lambda"),
    ] {
        let text = std::fs::read_to_string(root.join(file)).unwrap();
        let help = help(mode);
        for line in text.lines() {
            let item = line.trim().trim_start_matches("- ").trim();
            if let Some(flag) = item
                .strip_prefix("--")
                .filter(|f| f.starts_with(|c: char| c.is_ascii_lowercase()))
            {
                let flag = flag.split([' ', '=']).next().unwrap_or_default();
                assert!(
                    help.contains(&format!("--{flag}")),
                    "{file}: `aob bridge {mode}` takes no --{flag}"
                );
            }
        }
    }
}

//! Knowledge bases end to end: `aob kb` ingests files with the real all-MiniLM-L6-v2, a
//! `retrieve` step behind the engine finds the right chunk, a changed document replaces its
//! chunks, metadata filters apply, DuckDB reads the chunk files, and the same works with
//! the files in an S3-compatible server (moto).

use std::path::Path;
use std::process::Output;

use aob_model::state::RunStatus;
use aob_tests::{Fns, Stack};
use serde_json::{Value, json};

const T: &str = "kbs";

const DOCS: &[(&str, &str)] = &[
    (
        "offices.md",
        "# Offices\n\nThe Tokyo office opens at 09:00 and closes at 18:00 local time. It is closed on weekends.\n\nThe Paris office opens at 08:30 and closes at 17:30.\n",
    ),
    (
        "billing.md",
        "# Billing\n\nInvoices are sent on the first business day of each month. Payment is due within 30 days.\n\n## Refunds\n\nRefunds are paid back to the original card within 10 business days.\n",
    ),
    (
        "shipping.html",
        "<html><body><h1>Shipping</h1><p>Orders placed before 14:00 ship the same day.</p><p>Express delivery arrives the next business day.</p></body></html>",
    ),
];

fn write_docs(dir: &Path) {
    for (name, text) in DOCS {
        #[allow(clippy::unwrap_used)]
        std::fs::write(dir.join(name), text).unwrap();
    }
}

fn aob(cwd: &Path, env: &[(&str, String)], args: &[&str]) -> Output {
    #[allow(clippy::unwrap_used)]
    let out = std::process::Command::new(aob_tests::binary("aob").unwrap())
        .current_dir(cwd)
        .arg("--tenant")
        .arg(T)
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .unwrap();
    out
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

const ASK: &str = r#"
name: ask
steps:
  - id: find
    type: retrieve
    kb: handbook
    query: "{{ input.q }}"
    top_k: 3
    filter: {lang: "{{ input.lang }}"}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retrieve_step_finds_the_chunk_and_a_changed_document_replaces_its_chunks() {
    let s = Stack::start_with(Fns::AllButHttp).await.unwrap();
    let docs = tempfile::tempdir().unwrap();
    write_docs(docs.path());
    let env = vec![
        ("NATS_URL", s.server.url()),
        ("AOB_KB_URL", s.kb_url.clone()),
    ];
    let d = docs.path();
    let out = aob(
        d,
        &env,
        &["kb", "create", "handbook", "--chunk-size", "300"],
    );
    assert!(out.status.success(), "{out:?}");
    let out = aob(
        d,
        &env,
        &[
            "kb",
            "ingest",
            "handbook",
            "offices.md",
            "billing.md",
            "shipping.html",
            "--meta",
            "lang=en",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let said = stdout(&out);
    assert!(said.contains("offices.md: added"), "{said}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("embedding"),
        "progress is shown"
    );
    std::fs::write(
        d.join("kantine.md"),
        "# Kantine\n\nDie Kantine ist von 11:30 bis 14:00 geöffnet.\n",
    )
    .unwrap();
    let out = aob(
        d,
        &env,
        &[
            "kb",
            "ingest",
            "handbook",
            "kantine.md",
            "--meta",
            "lang=de",
        ],
    );
    assert!(out.status.success(), "{out:?}");

    s.publish(T, ASK).await.unwrap();
    let ask = |q: &str, lang: &str| {
        let (s, q, lang) = (&s, q.to_string(), lang.to_string());
        async move {
            let run = s
                .start_run(T, "ask", json!({"q": q, "lang": lang}))
                .await
                .unwrap();
            let (state, events) = s.wait_run(T, &run).await.unwrap();
            assert_eq!(state.status, RunStatus::Completed, "{events:#?}");
            state.steps["find"].output.clone().unwrap()
        }
    };
    let out = ask("When does the Tokyo office open?", "en").await;
    let first = &out["chunks"][0];
    assert_eq!(first["doc"], json!("offices.md"), "{out:#}");
    assert!(first["text"].as_str().unwrap().contains("09:00"));
    assert_eq!(out["chunk_ids"].as_array().unwrap().len(), 3);
    assert_eq!(out["model"], json!("all-MiniLM-L6-v2"));
    let out = ask("How fast does express shipping arrive?", "en").await;
    assert_eq!(out["chunks"][0]["doc"], json!("shipping.html"), "{out:#}");
    // The filter keeps to one language, whatever the query says.
    let out = ask("When does the office open?", "de").await;
    let docs_found: Vec<&Value> = out["chunks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| &c["doc"])
        .collect();
    assert_eq!(docs_found, vec![&json!("kantine.md")], "{out:#}");

    // Unchanged documents cost nothing; a changed one replaces its chunks.
    let out = aob(
        d,
        &env,
        &[
            "kb",
            "ingest",
            "handbook",
            "offices.md",
            "billing.md",
            "--meta",
            "lang=en",
        ],
    );
    let said = stdout(&out);
    assert!(
        said.contains("offices.md: unchanged") && said.contains("billing.md: unchanged"),
        "{said}"
    );
    let kb_dir = s.data.path().join("kb");
    let files = |dir: &Path| {
        walk(dir)
            .into_iter()
            .filter(|p| p.ends_with(".parquet"))
            .count()
    };
    assert_eq!(files(&kb_dir), 4);
    std::fs::write(d.join("offices.md"), DOCS[0].1.replace("09:00", "10:00")).unwrap();
    let out = aob(
        d,
        &env,
        &[
            "kb",
            "ingest",
            "handbook",
            "offices.md",
            "--meta",
            "lang=en",
        ],
    );
    assert!(stdout(&out).contains("offices.md: replaced"), "{out:?}");
    assert_eq!(files(&kb_dir), 4, "the old chunk file is gone");
    let out = ask("When does the Tokyo office open?", "en").await;
    assert!(
        out["chunks"][0]["text"].as_str().unwrap().contains("10:00"),
        "the new version is searched: {out:#}"
    );

    // `aob kb ls` and `rm`; DuckDB reads the chunk files as they are.
    let out = aob(d, &env, &["kb", "ls", "handbook"]);
    assert!(stdout(&out).contains("kantine.md"), "{out:?}");
    let rows = aob_tests::audit::duckdb(&format!(
        "SELECT doc_id, count(*), min(len(embedding)) FROM read_parquet('{}/**/*.parquet') GROUP BY doc_id ORDER BY doc_id",
        kb_dir.display()
    ))
    .unwrap();
    assert_eq!(rows.len(), 4, "{rows:?}");
    assert!(rows.iter().all(|r| r[2] == json!(384)), "{rows:?}");
    let out = aob(d, &env, &["kb", "rm", "handbook", "--doc", "kantine.md"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(files(&kb_dir), 3);
    let out = ask("When does the office open?", "de").await;
    assert_eq!(out["chunks"], json!([]));
}

fn walk(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p.display().to_string());
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_knowledge_base_in_s3_is_ingested_and_searched() {
    let s3 = aob_tests::audit::S3Server::start().await.unwrap();
    s3.create_bucket("kbs").await.unwrap();
    let s = Stack::bare().await.unwrap();
    let docs = tempfile::tempdir().unwrap();
    write_docs(docs.path());
    let mut env: Vec<(&str, String)> = s3.env();
    env.push(("NATS_URL", s.server.url()));
    env.push(("AOB_KB_URL", "s3://kbs/prefix".into()));
    let d = docs.path();
    assert!(aob(d, &env, &["kb", "create", "handbook"]).status.success());
    let out = aob(
        d,
        &env,
        &["kb", "ingest", "handbook", "offices.md", "billing.md"],
    );
    assert!(out.status.success(), "{out:?}");
    let out = aob(
        d,
        &env,
        &[
            "kb",
            "search",
            "handbook",
            "How long do I have to pay?",
            "--top-k",
            "1",
        ],
    );
    let said = stdout(&out);
    assert!(out.status.success(), "{out:?}");
    assert!(said.contains("billing.md#"), "{said}");
    let store = s3.store("kbs").unwrap();
    let listed: Vec<_> =
        futures::StreamExt::collect::<Vec<_>>(store.list(Some(&"prefix".into()))).await;
    assert_eq!(listed.len(), 2, "one chunk file per document: {listed:?}");
}

const LIBRARIAN: &str = r#"
rules:
  - when: { has_tool_result: false }
    reply:
      tool_calls: [{ name: kb__handbook, arguments: { query: "Tokyo office opening hours" } }]
  - when: { has_tool_result: true, contains: "09:00" }
    reply: { text: "The Tokyo office opens at 09:00 (offices.md)." }
  - when: { has_tool_result: true }
    reply: { text: "The handbook does not say." }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_answers_from_a_knowledge_base_used_as_a_tool() {
    use aob_scripted_provider::{Script, ScriptedProvider};
    let mut s = Stack::bare().await.unwrap();
    let kbs = aob_kb::store::Kbs::open(&s.js, &s.kb_url).await.unwrap();
    kbs.create(
        T,
        "handbook",
        aob_kb::minilm::NAME,
        aob_kb::chunk::ChunkOptions::default(),
    )
    .await
    .unwrap();
    let docs: Vec<aob_kb::store::Document> = DOCS
        .iter()
        .map(|(id, text)| aob_kb::store::Document {
            id: id.to_string(),
            text: aob_kb::extract::text_of(Path::new(id), text.as_bytes()).unwrap(),
            metadata: Default::default(),
        })
        .collect();
    let embedder = aob_kb::embed::Embedder::local().unwrap();
    kbs.ingest(T, "handbook", &embedder, docs, |_| {})
        .await
        .unwrap();

    let double = ScriptedProvider::start(Script::parse(LIBRARIAN, "librarian.yaml").unwrap())
        .await
        .unwrap();
    let models = aob_llm::config::Config::parse(&format!(
        "models:\n  scripted: {{ protocol: openai, base_url: \"{}\" }}\ndefault: {{ model: scripted }}\n",
        double.openai_base_url()
    ))
    .unwrap();
    let engine = s.engine().await.unwrap();
    s.spawn_engine(engine);
    s.spawn_functions(Fns::AllButHttp).await.unwrap();
    let tools = s
        .spawn_agents(
            models,
            aob_tool::ToolsConfig::default(),
            &aob_runtime::nats::ServeConfig::default(),
        )
        .await
        .unwrap();
    s.publish(
        T,
        "name: librarian\nsteps:\n  - {id: answer, type: agent, prompt: 'When does the Tokyo office open?', tools: [kb.handbook], max_turns: 3}\n",
    )
    .await
    .unwrap();
    let run = s.start_run(T, "librarian", json!({})).await.unwrap();
    let (state, events) = s.wait_run(T, &run).await.unwrap();
    assert_eq!(state.status, RunStatus::Completed, "{events:#?}");
    let out = state.steps["answer"].output.clone().unwrap();
    assert_eq!(
        out["text"],
        json!("The Tokyo office opens at 09:00 (offices.md)."),
        "{out:#}"
    );
    assert_eq!(out["tool_calls"][0]["tool"], json!("kb.handbook"));
    tools.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_from_an_openai_compatible_endpoint_serve_ingest_and_search() {
    use aob_scripted_provider::{Script, ScriptedProvider};
    let double = ScriptedProvider::start(Script::parse("rules: []\n", "empty.yaml").unwrap())
        .await
        .unwrap();
    let s = Stack::bare().await.unwrap();
    let docs = tempfile::tempdir().unwrap();
    write_docs(docs.path());
    let models = docs.path().join("models.yaml");
    std::fs::write(
        &models,
        format!(
            "models:\n  hashed: {{ protocol: openai, base_url: \"{}\", model: double-embed, price: {{ input: 0.02, output: 0 }} }}\n",
            double.openai_base_url()
        ),
    )
    .unwrap();
    let env = vec![
        ("NATS_URL", s.server.url()),
        ("AOB_KB_URL", s.kb_url.clone()),
        ("AOB_MODELS", models.display().to_string()),
    ];
    let d = docs.path();
    let out = aob(d, &env, &["kb", "create", "remote", "--model", "nope"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no embedding model `nope`"),
        "{out:?}"
    );
    assert!(
        aob(d, &env, &["kb", "create", "remote", "--model", "hashed"])
            .status
            .success()
    );
    let out = aob(
        d,
        &env,
        &["kb", "ingest", "remote", "offices.md", "billing.md"],
    );
    assert!(out.status.success(), "{out:?}");
    let embed_calls = double.requests().for_model("double-embed");
    assert!(embed_calls >= 1, "the endpoint embedded the chunks");
    // Each document embedded is a priced model call in the audit trail.
    let records = s
        .messages(aob_streams::AUDIT, &aob_streams::subjects::audit(T))
        .await
        .unwrap();
    let ingests: Vec<&Value> = records
        .iter()
        .filter(|r| r["run_id"] == json!("kb:remote") && r["event_kind"] == json!("model_call"))
        .collect();
    assert_eq!(ingests.len(), 2, "{records:#?}");
    for r in ingests {
        assert_eq!(r["model"], json!("hashed"));
        assert!(
            r["tokens_in"].as_u64().unwrap() > 0 && r["cost_usd"].as_f64().unwrap() > 0.0,
            "{r}"
        );
    }
    let out = aob(
        d,
        &env,
        &[
            "kb",
            "search",
            "remote",
            "refunds original card",
            "--top-k",
            "1",
        ],
    );
    assert!(stdout(&out).contains("billing.md#"), "{out:?}");
    assert_eq!(double.requests().for_model("double-embed"), embed_calls + 1);

    // Under a tenant budget too small for it, an ingest is refused before any call.
    let tight = docs.path().join("tight.yaml");
    let text = std::fs::read_to_string(&models).unwrap();
    std::fs::write(
        &tight,
        format!("{text}budgets:\n  tenant: {{ usd: 0.0000001 }}\n"),
    )
    .unwrap();
    let mut env = env.clone();
    env.retain(|(k, _)| *k != "AOB_MODELS");
    env.push(("AOB_MODELS", tight.display().to_string()));
    let calls = double.requests().total;
    let out = aob(d, &env, &["kb", "ingest", "remote", "shipping.html"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("this ingest was not started: budget of tenant kbs"),
        "{err}"
    );
    assert_eq!(double.requests().total, calls, "nothing was embedded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_priced_embedding_query_is_held_against_the_run_budget() {
    use aob_scripted_provider::{Script, ScriptedProvider};
    let double = ScriptedProvider::start(Script::parse("rules: []\n", "empty.yaml").unwrap())
        .await
        .unwrap();
    let mut s = Stack::bare().await.unwrap();
    let config = aob_llm::config::Config::parse(&format!(
        "models:\n  hashed: {{ protocol: openai, base_url: \"{}\", price: {{ input: 1000, output: 0 }} }}\nbudgets:\n  run: {{ usd: 0.05 }}\n",
        double.openai_base_url()
    ))
    .unwrap();
    let kbs = aob_kb::store::Kbs::open(&s.js, &s.kb_url).await.unwrap();
    let embedders = aob_retrieve::Embedders::new(
        config.clone(),
        std::sync::Arc::new(aob_runtime::secrets::Secrets::none()),
    );
    kbs.create(
        T,
        "priced",
        "hashed",
        aob_kb::chunk::ChunkOptions::default(),
    )
    .await
    .unwrap();
    let docs = vec![aob_kb::store::Document {
        id: "billing.md".into(),
        text: DOCS[1].1.into(),
        metadata: Default::default(),
    }];
    kbs.ingest(T, "priced", &embedders.get("hashed").unwrap(), docs, |_| {})
        .await
        .unwrap();
    let gateway =
        aob_llm::gateway::Gateway::open(&s.client, config, aob_runtime::secrets::Secrets::none())
            .await
            .unwrap();
    let engine = s.engine().await.unwrap();
    s.spawn_engine(engine);
    s.spawn_handler(
        aob_retrieve::RetrieveHandler::new(kbs, embedders)
            .with_budgets(std::sync::Arc::new(gateway)),
    )
    .await
    .unwrap();
    s.publish(
        T,
        "name: priced\nsteps:\n  - {id: find, type: retrieve, kb: priced, query: '{{ input.q }}', top_k: 1}\n",
    )
    .await
    .unwrap();
    // A short query fits the run's budget: it is charged and answered.
    let run = s
        .start_run(T, "priced", json!({"q": "refunds"}))
        .await
        .unwrap();
    let (state, events) = s.wait_run(T, &run).await.unwrap();
    assert_eq!(state.status, RunStatus::Completed, "{events:#?}");
    assert_eq!(
        state.steps["find"].output.as_ref().unwrap()["chunks"][0]["doc"],
        json!("billing.md")
    );
    // A long one could cost more than the budget: refused before the endpoint is called.
    let before = double.requests().total;
    let run = s
        .start_run(T, "priced", json!({"q": "refunds ".repeat(40)}))
        .await
        .unwrap();
    let (state, _) = s.wait_run(T, &run).await.unwrap();
    assert_eq!(state.status, RunStatus::Failed);
    let why = state.steps["find"].error.clone().unwrap().message;
    assert!(why.contains("budget of run"), "{why}");
    assert_eq!(
        double.requests().total,
        before,
        "the endpoint was not called"
    );
}

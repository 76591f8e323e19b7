//! `aob dev`: the whole system in one process.
//!
//! [`run_stack`] is the reusable part: given a connection to a NATS server whose topology
//! is applied, it runs the engine (with its timer service), the five functions and, when
//! given an audit URL, the audit sink, until the shutdown token is cancelled.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use async_nats::jetstream;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use aob_runtime::nats::{ServeConfig, serve};
use aob_runtime::timers::Timers;
use aob_runtime::{Env, Handler, PayloadStore};
use aob_streams::Topology;
use aob_testkit::NatsServer;

use crate::cli::DevArgs;
use crate::ctx::{self, Ctx};
use crate::runs::{self, StartRequest};
use crate::workflows::{self, Published};

type Component = (&'static str, Result<()>);

fn spawn_function<H: Handler>(
    set: &mut JoinSet<Component>,
    handler: H,
    client: &async_nats::Client,
    payloads: &PayloadStore,
    stop: &CancellationToken,
) {
    let name = handler.node_type();
    let (client, payloads, stop) = (client.clone(), payloads.clone(), stop.clone());
    set.spawn(async move {
        let res = serve(
            Arc::new(handler),
            client,
            payloads,
            ServeConfig::default(),
            stop,
        )
        .await;
        (name, res.map_err(anyhow::Error::from))
    });
}

/// Runs the engine, its timer service and the transform, validate, http, wait, human, tool, llm and
/// agent functions on `client` until `shutdown` is cancelled, then lets them drain. The
/// topology must be applied. If one component fails, the others are stopped and its error is returned.
pub async fn run_stack(
    client: async_nats::Client,
    payloads: PayloadStore,
    audit_url: Option<String>,
    kb_url: &str,
    models: aob_llm::config::Config,
    shutdown: CancellationToken,
) -> Result<()> {
    let js = jetstream::new(client.clone());
    let secrets = aob_runtime::secrets::Secrets::from_env();
    let retrieve = aob_retrieve::RetrieveHandler::new(
        aob_kb::store::Kbs::open(&js, kb_url)
            .await
            .context("opening the knowledge bases")?,
        aob_retrieve::Embedders::new(
            models.clone(),
            Arc::new(aob_runtime::secrets::Secrets::from_env()),
        ),
    );
    let gateway = Arc::new(
        aob_llm::gateway::Gateway::open(&client, models, secrets)
            .await
            .context("opening the model gateway's buckets")?,
    );
    let retrieve = retrieve.with_budgets(gateway.clone());
    let agent_tools = aob_tool::gateway::Gateway::from_env()
        .context("building the agent's tool gateway from AOB_TOOLS")?;
    let timers = Timers::open(&js)
        .await
        .context("opening the timers bucket for the wait function")?;
    let http = aob_http::HttpHandler::new().context("building the http function's client")?;
    let tool = aob_tool::ToolHandler::new().context("building the tool function from AOB_TOOLS")?;
    let stop = shutdown.child_token();
    let mut set: JoinSet<Component> = JoinSet::new();
    {
        let (client, payloads, stop) = (client.clone(), payloads.clone(), stop.clone());
        let cfg = aob_engine::Config::from_env()?;
        set.spawn(async move {
            let res = aob_engine::run(client, payloads, cfg, stop).await;
            ("engine", res.map_err(anyhow::Error::from))
        });
    }
    if let Some(url) = audit_url {
        let (client, stop) = (client.clone(), stop.clone());
        let cfg = aob_audit::sink::SinkConfig::from_env().context("audit sink settings")?;
        set.spawn(async move {
            let res = aob_fn_audit::run(client, &url, cfg, stop).await;
            ("audit sink", res.map_err(|e| anyhow!("{e}")))
        });
    }
    spawn_function(
        &mut set,
        aob_transform::TransformHandler::new(),
        &client,
        &payloads,
        &stop,
    );
    spawn_function(
        &mut set,
        aob_validate::ValidateHandler::new(),
        &client,
        &payloads,
        &stop,
    );
    spawn_function(&mut set, http, &client, &payloads, &stop);
    let tool = tool.with_guard(gateway.guard().clone());
    spawn_function(&mut set, tool, &client, &payloads, &stop);
    spawn_function(
        &mut set,
        aob_llm::handler::LlmHandler::new(gateway.clone()),
        &client,
        &payloads,
        &stop,
    );
    let recorder = gateway.recorder().clone();
    spawn_function(
        &mut set,
        aob_agent::AgentHandler::new(
            gateway,
            Arc::new(aob_agent::knowledge::WithKnowledge::new(
                Arc::new(agent_tools),
                Some(retrieve.clone()),
            )),
            recorder,
        ),
        &client,
        &payloads,
        &stop,
    );
    spawn_function(
        &mut set,
        aob_wait::WaitHandler::new(timers),
        &client,
        &payloads,
        &stop,
    );
    spawn_function(
        &mut set,
        aob_human::HumanHandler::new(aob_human::Notifier::from_env()),
        &client,
        &payloads,
        &stop,
    );
    spawn_function(&mut set, retrieve, &client, &payloads, &stop);

    let mut failure: Option<anyhow::Error> = None;
    while let Some(joined) = set.join_next().await {
        let err = match joined {
            Ok((_, Ok(()))) if stop.is_cancelled() => continue,
            Ok((name, Ok(()))) => anyhow!("{name} stopped on its own"),
            Ok((name, Err(e))) => e.context(format!("{name} failed")),
            Err(e) => anyhow!("a component panicked: {e}"),
        };
        tracing::error!("{err:#}; stopping the others");
        failure.get_or_insert(err);
        stop.cancel();
    }
    // Bounded: with the server gone, a flush would wait for it forever.
    match tokio::time::timeout(Duration::from_secs(2), client.flush()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!("flushing the NATS connection: {e}"),
        Err(_) => tracing::warn!("flushing the NATS connection: no answer from the server in 2s"),
    }
    failure.map_or(Ok(()), Err)
}

/// Files `aob dev` writes into its data directory for other shells.
struct Handoff {
    files: Vec<PathBuf>,
}

impl Handoff {
    fn write(
        data: &Path,
        url: &str,
        payload_url: &str,
        audit_url: &str,
        kb_url: &str,
    ) -> Result<Self> {
        let url_file = data.join("nats.url");
        std::fs::write(&url_file, format!("{url}\n"))
            .with_context(|| format!("writing {}", url_file.display()))?;
        let env_file = data.join("env");
        std::fs::write(
            &env_file,
            format!(
                "export NATS_URL={url}\nexport AOB_PAYLOAD_URL={payload_url}\nexport AOB_AUDIT_URL={audit_url}\nexport AOB_KB_URL={kb_url}\n"
            ),
        )
        .with_context(|| format!("writing {}", env_file.display()))?;
        Ok(Handoff {
            files: vec![url_file, env_file],
        })
    }
}

impl Drop for Handoff {
    fn drop(&mut self) {
        for f in &self.files {
            let _ = std::fs::remove_file(f);
        }
    }
}

/// Publishes the example workflow, starts one run of it and prints its progress.
async fn run_example(
    ctx: &Ctx,
    client: async_nats::Client,
    payloads: PayloadStore,
    example: (aob_model::Workflow, serde_json::Value, Option<PathBuf>),
    kb_url: &str,
) -> Result<()> {
    let (wf, input, kb_dir) = example;
    let js = jetstream::new(client);
    // An example's knowledge bases (`kb/<name>/` beside it) are ingested first.
    if let Some(dir) = kb_dir {
        let kbs = aob_kb::store::Kbs::open(&js, kb_url).await?;
        let embedder = aob_kb::embed::Embedder::local()?;
        for (name, sub, done) in kbs.ingest_dirs(&ctx.tenant, &dir, &embedder).await? {
            let chunks: usize = done.iter().map(|(_, _, c)| c).sum();
            say!(
                "aob dev: knowledge base {name}: {} document(s) from {}, {chunks} chunk(s) embedded",
                done.len(),
                sub.display()
            );
        }
    }
    match workflows::publish_workflow(&js, &ctx.tenant, &wf).await? {
        Published::New(v) => say!("aob dev: published {} v{v}", wf.name),
        Published::Unchanged(v) => say!("aob dev: {} v{v} is already published", wf.name),
    }
    let run_id = runs::new_run_id();
    say!("run {run_id}");
    let req = StartRequest {
        workflow: wf.name.clone(),
        version: None,
        input,
        run_id: Some(run_id),
        by: Some(crate::people::identity(ctx)),
        fork: None,
    };
    runs::start_and_wait(&js, &payloads, &ctx.tenant, req, None, |l| say!("{l}")).await?;
    Ok(())
}

/// The scripted provider's replies under `aob dev` (the agentic example's).
const SCRIPTED_REPLIES: &str = include_str!("../../examples/agentic/scripted-provider.yaml");

/// A models file whose one model, `scripted`, is the scripted provider at `base_url`.
pub fn scripted_models(base_url: &str) -> Result<aob_llm::config::Config> {
    aob_llm::config::Config::parse(&format!(
        "models:\n  scripted: {{ protocol: openai, base_url: \"{base_url}\", provider: scripted, price: {{ input: 0.15, output: 0.60 }}, max_output_tokens: 1024 }}\ndefault: {{ model: scripted }}\n"
    ))
    .map_err(|e| anyhow!("the scripted provider's models: {e}"))
}

/// `aob dev`.
pub async fn cmd_dev(ctx: &Ctx, explicit_url: Option<&str>, args: DevArgs) -> Result<ExitCode> {
    aob_runtime::init_logging();
    // Check the example before starting anything.
    let example = match &args.example {
        Some(file) => {
            let wf = match workflows::check_file(file) {
                Ok((wf, _)) => wf,
                Err(problems) => {
                    for p in &problems {
                        eprintln!("{p}");
                    }
                    return Err(anyhow!("the example {} is not valid", file.display()));
                }
            };
            let kb_dir = file.parent().map(|p| p.join("kb")).filter(|p| p.is_dir());
            Some((
                wf,
                crate::input::parse_input(args.input.as_deref())?,
                kb_dir,
            ))
        }
        None => None,
    };
    std::fs::create_dir_all(&args.data)
        .with_context(|| format!("creating {}", args.data.display()))?;
    let data = std::fs::canonicalize(&args.data)
        .with_context(|| format!("resolving {}", args.data.display()))?;
    let shutdown = aob_runtime::shutdown_on_signal();

    let explicit_url = explicit_url.map(str::trim).filter(|u| !u.is_empty());
    let (server, url, where_) = match explicit_url {
        Some(u) => (None, u.to_string(), "external server".to_string()),
        None => {
            let dir = data.join("nats");
            let server = tokio::task::spawn_blocking(move || NatsServer::start_in(&dir, 0))
                .await
                .context("starting nats-server")??;
            let url = server.url();
            let store = server.store_dir().display().to_string();
            say!(
                "aob dev: nats-server listening on {url} (store {store}, log {store}/nats-server.log)"
            );
            (Some(server), url, format!("store {store}"))
        }
    };
    let source = if server.is_some() {
        "the nats-server aob dev started"
    } else {
        "--nats-url/NATS_URL (unset it to let aob dev start its own server)"
    };
    let client = ctx::connect(&url, source).await?;
    let js = jetstream::new(client.clone());
    let changes = Topology::default()
        .apply(&js)
        .await
        .context("applying the topology")?;
    if changes.is_empty() {
        say!("aob dev: topology in sync");
    } else {
        say!("aob dev: topology applied ({} changes)", changes.len());
    }

    let env = Env::from_env()?;
    let payload_url =
        std::env::var("AOB_PAYLOAD_URL").unwrap_or_else(|_| ctx::file_url(&data.join("payloads")));
    let payloads = PayloadStore::from_url(&payload_url, env.offload_threshold)?;
    let audit_url = aob_fn_audit::store_url(
        |k| std::env::var(k).ok(),
        Some(&ctx::file_url(&data.join("audit"))),
    )
    .map_err(|e| anyhow!("{e}"))?;
    let kb_url = std::env::var("AOB_KB_URL").unwrap_or_else(|_| ctx::file_url(&data.join("kb")));
    let handoff = match &server {
        Some(_) => Some(Handoff::write(
            &data,
            &url,
            &payload_url,
            &audit_url,
            &kb_url,
        )?),
        None => None,
    };

    // Without a models file, models answer from the scripted provider: a test double, so
    // the agentic example runs with no key and no network.
    let (models, _scripted) = match std::env::var_os(aob_llm::config::ENV) {
        Some(p) if !p.is_empty() => (aob_llm::config::Config::from_env()?, None),
        _ => {
            let script = aob_scripted_provider::Script::parse(
                SCRIPTED_REPLIES,
                "examples/agentic/scripted-provider.yaml",
            )?;
            let double = aob_scripted_provider::ScriptedProvider::start(script).await?;
            say!(
                "aob dev: no AOB_MODELS: model calls go to the scripted provider (a test double, no key, no network) at {}",
                double.url()
            );
            (scripted_models(&double.openai_base_url())?, Some(double))
        }
    };
    let stack = {
        let (client, payloads, audit, kb, shutdown) = (
            client.clone(),
            payloads.clone(),
            audit_url.clone(),
            kb_url.clone(),
            shutdown.clone(),
        );
        tokio::spawn(async move {
            run_stack(client, payloads, Some(audit), &kb, models, shutdown).await
        })
    };
    say!(
        "aob dev: ready — NATS {} ({where_}), payloads {payload_url}, audit {audit_url}; Ctrl-C to stop",
        ctx::redact(&url)
    );
    if server.is_some() {
        say!(
            "aob dev: in another shell: export NATS_URL=$(cat {}/nats.url)",
            data.display()
        );
        say!(
            "         (or `source {}/env` to also set AOB_PAYLOAD_URL, AOB_AUDIT_URL and AOB_KB_URL)",
            data.display()
        );
    }

    if let Some(example) = example {
        let (ctx, client, payloads, stop, kb_url) = (
            ctx.clone(),
            client.clone(),
            payloads.clone(),
            shutdown.clone(),
            kb_url.clone(),
        );
        tokio::spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                res = run_example(&ctx, client, payloads, example, &kb_url) => match res {
                    Ok(()) => say!("aob dev: example done; still serving (Ctrl-C to stop)"),
                    Err(e) => eprintln!("aob dev: example: {e:#}"),
                },
            }
        });
    }

    let res = stack.await;
    shutdown.cancel();
    drop(handoff);
    drop(server);
    match res {
        Ok(Ok(())) => {
            say!("aob dev: stopped");
            Ok(ExitCode::SUCCESS)
        }
        Ok(Err(e)) => Err(e),
        Err(e) => Err(anyhow!("the stack panicked: {e}")),
    }
}

//! Whole-system test support: a real nats-server per test, the topology applied, the
//! engine and every function running in-process (or as child processes), and helpers to
//! publish workflows, start runs and wait for their history.

pub mod audit;
pub mod cluster;
pub mod endpoints;
pub mod smtp;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer::DeliverPolicy};
use futures::StreamExt;
use serde_json::Value;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use aob_engine::Engine;
use aob_engine::store::RunStore;
use aob_model::state::RunState;
use aob_model::wire::{HistoryEvent, StartCommand};
use aob_runtime::PayloadStore;
use aob_runtime::nats::{ServeConfig, serve};
use aob_runtime::registry::Registry;
use aob_streams::{Topology, subjects};
use aob_testkit::NatsServer;

/// Which functions a stack runs in-process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fns {
    /// All of them; `llm`, `agent` and `tool` with nothing configured.
    All,
    /// `transform`, `validate` and `wait` (a test runs `http` as a child process, or the
    /// model and tool functions with its own configuration: [`Stack::spawn_agents`]).
    AllButHttp,
}

/// A running system.
pub struct Stack {
    /// The server (dropping the stack kills it).
    pub server: NatsServer,
    /// A client.
    pub client: async_nats::Client,
    /// JetStream.
    pub js: jetstream::Context,
    /// Payload store shared by every component.
    pub payloads: PayloadStore,
    /// Its URL.
    pub payload_url: String,
    /// Where the knowledge bases' files are (`file://<data>/kb`).
    pub kb_url: String,
    /// Workflow registry.
    pub registry: Registry,
    /// The topology applied.
    pub topology: Topology,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    /// Temporary data.
    pub data: tempfile::TempDir,
}

/// A topology with a short ack wait, so redelivery after a crash happens within a test.
pub fn test_topology() -> Topology {
    Topology {
        ack_wait: Duration::from_secs(2),
        ..Topology::default()
    }
}

impl Stack {
    /// Server, topology, engine and all functions.
    pub async fn start() -> Result<Stack> {
        Stack::start_with(Fns::All).await
    }

    /// Server and topology only; add components with the `spawn_*` methods.
    pub async fn bare() -> Result<Stack> {
        Stack::bare_with(test_topology()).await
    }

    /// Server and a given topology only (a shortened duplicate window, say).
    pub async fn bare_with(topology: Topology) -> Result<Stack> {
        Stack::bare_on(NatsServer::start()?, topology).await
    }

    /// Server, topology, engine and all functions, on a given server (one started with a
    /// configuration, say).
    pub async fn start_on(server: NatsServer) -> Result<Stack> {
        Stack::bare_on(server, test_topology())
            .await?
            .populate(Fns::All)
            .await
    }

    /// A given server and topology only.
    pub async fn bare_on(server: NatsServer, topology: Topology) -> Result<Stack> {
        let client = server.connect().await?;
        let js = jetstream::new(client.clone());
        topology.apply(&js).await?;
        let data = tempfile::tempdir()?;
        let payload_url = format!("file://{}", data.path().join("payloads").display());
        let kb_url = format!("file://{}", data.path().join("kb").display());
        let payloads =
            PayloadStore::from_url(&payload_url, aob_runtime::payload::DEFAULT_THRESHOLD)?;
        let registry = Registry::open(&js).await?;
        Ok(Stack {
            server,
            client,
            js,
            payloads,
            payload_url,
            kb_url,
            registry,
            topology,
            shutdown: CancellationToken::new(),
            tasks: Vec::new(),
            data,
        })
    }

    /// Server, topology, engine and the chosen functions.
    pub async fn start_with(fns: Fns) -> Result<Stack> {
        Stack::bare().await?.populate(fns).await
    }

    /// Adds the engine (with the default settings) and the chosen functions.
    async fn populate(mut self, fns: Fns) -> Result<Stack> {
        let s = &mut self;
        // Each component on its own connection, as when deployed apart.
        let client = s.server.connect().await?;
        let engine = Arc::new(
            Engine::connect(
                client.clone(),
                s.payloads.clone(),
                aob_engine::Config::default(),
            )
            .await?,
        );
        s.spawn_engine_on(engine, client);
        s.spawn_functions(fns).await?;
        Ok(self)
    }

    /// An engine on the stack's client with the default settings, not yet running (call
    /// its `on_message`, or hand it to [`Stack::spawn_engine`]).
    pub async fn engine(&self) -> Result<Arc<Engine>> {
        self.engine_with(aob_engine::Config::default()).await
    }

    /// An engine on the stack's client with the given settings, not yet running.
    pub async fn engine_with(&self, cfg: aob_engine::Config) -> Result<Arc<Engine>> {
        Ok(Arc::new(
            Engine::connect(self.client.clone(), self.payloads.clone(), cfg).await?,
        ))
    }

    /// Waits until the engine has handled every command and signal published so far.
    pub async fn commands_handled(&self) -> Result<()> {
        self.drained(
            aob_streams::CMD,
            aob_streams::ENGINE_CMD,
            Duration::from_secs(10),
        )
        .await
    }

    /// Runs an engine (and the timer service) until the stack stops.
    pub fn spawn_engine<S: RunStore>(&mut self, engine: Arc<Engine<S>>) {
        let client = self.client.clone();
        self.spawn_engine_on(engine, client);
    }

    fn spawn_engine_on<S: RunStore>(&mut self, engine: Arc<Engine<S>>, client: async_nats::Client) {
        let token = self.shutdown.child_token();
        self.tasks.push(tokio::spawn(async move {
            if let Err(e) = aob_engine::run_with(engine, client, token).await {
                eprintln!("engine stopped: {e}");
            }
        }));
    }

    /// Runs the functions in-process.
    pub async fn spawn_functions(&mut self, fns: Fns) -> Result<()> {
        // In-progress acks well inside the test topology's 2 s ack wait, as the defaults
        // (2 s against 6 s) are in production: a task held by a busy machine is not
        // delivered twice.
        let cfg = ServeConfig {
            heartbeat: Duration::from_millis(500),
            ..ServeConfig::default()
        };
        self.spawn_functions_with(fns, cfg).await
    }

    /// Runs the functions in-process with the given transport settings.
    pub async fn spawn_functions_with(&mut self, fns: Fns, cfg: ServeConfig) -> Result<()> {
        let timers = aob_runtime::timers::Timers::open(&self.js).await?;
        self.spawn_fn(aob_transform::TransformHandler::new(), &cfg)
            .await?;
        self.spawn_fn(aob_validate::ValidateHandler::new(), &cfg)
            .await?;
        self.spawn_fn(aob_wait::WaitHandler::new(timers), &cfg)
            .await?;
        // Approval requests without email (a test that mails spawns its own).
        self.spawn_fn(aob_human::HumanHandler::default(), &cfg)
            .await?;
        // Retrieval from the knowledge bases under the stack's data folder, embedded with
        // the local model.
        let kbs = aob_kb::store::Kbs::open(&self.js, &self.kb_url).await?;
        let embedders = aob_retrieve::Embedders::new(
            aob_llm::config::Config::default(),
            Arc::new(aob_runtime::secrets::Secrets::none()),
        );
        self.spawn_fn(aob_retrieve::RetrieveHandler::new(kbs, embedders), &cfg)
            .await?;
        if fns == Fns::All {
            self.spawn_fn(aob_http::HttpHandler::new()?, &cfg).await?;
            // The model and tool functions with nothing configured: every task subject has
            // a consumer, and a step of theirs fails with a reason instead of waiting.
            self.spawn_agents(
                aob_llm::config::Config::default(),
                aob_tool::ToolsConfig::default(),
                &cfg,
            )
            .await?;
        }
        Ok(())
    }

    /// Runs the `llm`, `agent` and `tool` functions with these models and tools; returns
    /// the tool gateway (shut it down to stop its MCP servers).
    pub async fn spawn_agents(
        &mut self,
        models: aob_llm::config::Config,
        tools: aob_tool::ToolsConfig,
        cfg: &ServeConfig,
    ) -> Result<Arc<aob_tool::Gateway>> {
        let client = self.server.connect().await?;
        let secrets = aob_runtime::secrets::Secrets::none();
        let gateway = Arc::new(
            aob_llm::gateway::Gateway::open(&client, models, secrets.clone())
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?,
        );
        let tool_gateway = Arc::new(
            aob_tool::Gateway::new(tools, aob_http::HttpHandler::new()?, secrets)
                .map_err(|e| anyhow::anyhow!("{e}"))?,
        );
        self.spawn_fn(
            aob_tool::ToolHandler::with(tool_gateway.clone()).with_guard(gateway.guard().clone()),
            cfg,
        )
        .await?;
        self.spawn_fn(aob_llm::handler::LlmHandler::new(gateway.clone()), cfg)
            .await?;
        let recorder = gateway.recorder().clone();
        // The stack's knowledge bases are tools too (`kb.<name>`).
        let retrieve = aob_retrieve::RetrieveHandler::new(
            aob_kb::store::Kbs::open(&self.js, &self.kb_url).await?,
            aob_retrieve::Embedders::new(
                aob_llm::config::Config::default(),
                Arc::new(aob_runtime::secrets::Secrets::none()),
            ),
        );
        let tools = Arc::new(aob_agent::knowledge::WithKnowledge::new(
            tool_gateway.clone(),
            Some(retrieve),
        ));
        self.spawn_fn(aob_agent::AgentHandler::new(gateway, tools, recorder), cfg)
            .await?;
        Ok(tool_gateway)
    }

    /// Runs one function in-process with the test transport settings.
    pub async fn spawn_handler<H: aob_runtime::Handler>(&mut self, h: H) -> Result<()> {
        let cfg = ServeConfig {
            heartbeat: Duration::from_millis(500),
            ..ServeConfig::default()
        };
        self.spawn_fn(h, &cfg).await
    }

    async fn spawn_fn<H: aob_runtime::Handler>(&mut self, h: H, cfg: &ServeConfig) -> Result<()> {
        let client = self.server.connect().await?;
        let payloads = self.payloads.clone();
        let token = self.shutdown.child_token();
        let cfg = cfg.clone();
        self.tasks.push(tokio::spawn(async move {
            if let Err(e) = serve(Arc::new(h), client, payloads, cfg, token).await {
                eprintln!("function stopped: {e}");
            }
        }));
        Ok(())
    }

    /// Stops every in-process component and waits for them to drain.
    pub async fn stop(&mut self) {
        self.shutdown.cancel();
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
        // Components spawned later (a restarted engine) run until the next stop.
        self.shutdown = CancellationToken::new();
    }

    /// Validates and publishes a definition; returns its version.
    pub async fn publish(&self, tenant: &str, yaml: &str) -> Result<u32> {
        let wf = aob_model::load_str(yaml, "test.yaml")?;
        Ok(self.registry.publish(tenant, &wf).await?)
    }

    /// Publishes an example from `examples/<name>/workflow.yaml`, with its knowledge bases
    /// (`examples/<name>/kb/<kb>/`) ingested into the stack's, as `aob dev` does.
    pub async fn publish_example(&self, tenant: &str, name: &str) -> Result<String> {
        let path = examples_dir().join(name).join("workflow.yaml");
        let wf = aob_model::load_file(&path)?;
        let kb_dir = examples_dir().join(name).join("kb");
        if kb_dir.is_dir() {
            let kbs = aob_kb::store::Kbs::open(&self.js, &self.kb_url).await?;
            let embedder = aob_kb::embed::Embedder::local()?;
            kbs.ingest_dirs(tenant, &kb_dir, &embedder).await?;
        }
        self.registry.publish(tenant, &wf).await?;
        Ok(wf.name)
    }

    /// Publishes a start command with a `Nats-Msg-Id` and the run id in the body.
    pub async fn start_run(&self, tenant: &str, workflow: &str, input: Value) -> Result<String> {
        self.start_run_as(tenant, workflow, input, None).await
    }

    /// Like [`Stack::start_run`], started by `by`.
    pub async fn start_run_as(
        &self,
        tenant: &str,
        workflow: &str,
        input: Value,
        by: Option<&str>,
    ) -> Result<String> {
        let run_id = ulid::Ulid::new().to_string();
        let input = self
            .payloads
            .offload(input, &format!("{tenant}/{run_id}/input"))
            .await?;
        let cmd = StartCommand {
            workflow: workflow.to_string(),
            version: None,
            input,
            run_id: Some(run_id.clone()),
            by: by.map(str::to_string),
            fork: None,
            parent: None,
        };
        self.publish_raw(
            &subjects::start(tenant),
            Some(&run_id),
            serde_json::to_vec(&cmd)?,
        )
        .await?;
        Ok(run_id)
    }

    /// Publishes any bytes on JetStream, optionally with a `Nats-Msg-Id`.
    pub async fn publish_raw(
        &self,
        subject: &str,
        msg_id: Option<&str>,
        body: Vec<u8>,
    ) -> Result<()> {
        let mut headers = HeaderMap::new();
        if let Some(id) = msg_id {
            headers.insert("Nats-Msg-Id", id);
        }
        self.js
            .publish_with_headers(subject.to_string(), headers, body.into())
            .await?
            .await
            .with_context(|| format!("publishing to {subject}"))?;
        Ok(())
    }

    /// Waits for a run's terminal history event; returns all its history and its state.
    pub async fn wait_run(
        &self,
        tenant: &str,
        run_id: &str,
    ) -> Result<(RunState, Vec<HistoryEvent>)> {
        let events = self
            .history_until(
                tenant,
                run_id,
                |e| e.kind.is_terminal(),
                Duration::from_secs(60),
            )
            .await?;
        let state = self
            .run_state(tenant, run_id)
            .await?
            .context("run has no state")?;
        Ok((state, events))
    }

    /// History of a run from the start until `stop` matches an event.
    pub async fn history_until(
        &self,
        tenant: &str,
        run_id: &str,
        stop: impl Fn(&HistoryEvent) -> bool,
        guard: Duration,
    ) -> Result<Vec<HistoryEvent>> {
        let stream = self.js.get_stream(aob_streams::HISTORY).await?;
        let consumer = stream
            .create_consumer(jetstream::consumer::pull::OrderedConfig {
                filter_subject: subjects::history_of(tenant, run_id),
                deliver_policy: DeliverPolicy::All,
                ..Default::default()
            })
            .await?;
        let mut msgs = consumer.messages().await?;
        let mut out = Vec::new();
        let deadline = tokio::time::Instant::now() + guard;
        loop {
            let next = tokio::time::timeout_at(deadline, msgs.next()).await;
            let Ok(Some(msg)) = next else {
                bail!("run {run_id}: no terminal event within {guard:?}; history so far: {out:#?}")
            };
            let msg = msg?;
            let ev: HistoryEvent = serde_json::from_slice(&msg.payload)?;
            let done = stop(&ev);
            out.push(ev);
            if done {
                return Ok(out);
            }
        }
    }

    /// The run's state.
    pub async fn run_state(&self, tenant: &str, run_id: &str) -> Result<Option<RunState>> {
        let kv = self.js.get_key_value(aob_streams::RUNS).await?;
        Ok(match kv.get(RunState::key(tenant, run_id)).await? {
            Some(b) => Some(serde_json::from_slice(&b)?),
            None => None,
        })
    }

    /// Number of messages in a stream on a subject filter.
    pub async fn count(&self, stream: &str, filter: &str) -> Result<usize> {
        let s = self.js.get_stream(stream).await?;
        let mut subjects = s.info_with_subjects(filter).await?;
        let mut n = 0;
        while let Some(entry) = subjects.next().await {
            n += entry?.1;
        }
        Ok(n)
    }

    /// Messages in a stream on a subject filter, as JSON.
    pub async fn messages(&self, stream: &str, filter: &str) -> Result<Vec<Value>> {
        let n = self.count(stream, filter).await?;
        let s = self.js.get_stream(stream).await?;
        let c = s
            .create_consumer(jetstream::consumer::pull::OrderedConfig {
                filter_subject: filter.to_string(),
                deliver_policy: DeliverPolicy::All,
                ..Default::default()
            })
            .await?;
        let mut msgs = c.messages().await?;
        let mut out = Vec::new();
        while out.len() < n {
            let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(10), msgs.next()).await
            else {
                break;
            };
            out.push(serde_json::from_slice(&m?.payload).unwrap_or(Value::Null));
        }
        Ok(out)
    }
}

impl Stack {
    /// Waits until a durable consumer has delivered everything and holds no message
    /// unacknowledged: whatever was published to its stream before has been handled.
    pub async fn drained(&self, stream: &str, consumer: &str, guard: Duration) -> Result<()> {
        let s = self.js.get_stream(stream).await?;
        let mut c = s
            .get_consumer::<jetstream::consumer::pull::Config>(consumer)
            .await
            .map_err(|e| anyhow::anyhow!("consumer {stream}/{consumer}: {e}"))?;
        let deadline = tokio::time::Instant::now() + guard;
        loop {
            let info = c.info().await?;
            if info.num_pending == 0 && info.num_ack_pending == 0 {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "{stream}/{consumer} not drained within {guard:?}: {} pending, {} unacknowledged",
                    info.num_pending,
                    info.num_ack_pending
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A bench size: `n` times `AOB_BENCH_SCALE` (default 1), at least `min`.
pub fn bench_scale(n: usize, min: usize) -> usize {
    let s: f64 = std::env::var("AOB_BENCH_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1.0);
    ((n as f64 * s).round() as usize).max(min)
}

/// The repository's `examples/` folder. Found from the package folder cargo gives the
/// running test (not the one this was compiled in: a target folder shared by several
/// clones may hold a build made in another clone).
pub fn examples_dir() -> PathBuf {
    let dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
    dir.join("../examples")
}

/// A workspace binary (`aob`, `aob-http`, ...) next to the test executable.
pub fn binary(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .context("no target dir")?;
    let p = dir.join(name);
    if !p.is_file() {
        bail!(
            "{} is missing: build the binaries first (`cargo build --workspace --bins`, as scripts/test does)",
            p.display()
        );
    }
    Ok(p)
}

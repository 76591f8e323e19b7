//! The handler runtime: one [`Handler`] trait for every function, and the transports
//! that serve it: [`nats::serve`], a durable pull consumer; CloudEvents over HTTP and AWS
//! Lambda ([`remote`]), chosen by `AOB_TRANSPORT`. Every transport runs a task through the
//! same delivery contract ([`delivery`]).

pub mod bus;
pub mod context;
pub mod delivery;
pub mod nats;
pub mod payload;
pub mod registry;
pub mod remote;
pub mod secrets;
pub mod telemetry;
pub mod timers;
pub mod trace;
pub mod usage;

use std::future::Future;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aob_model::audit::{AuditKind, DecisionRecord};
use aob_model::expr;
use aob_model::wire::{ErrorClass, Outcome, StepError, StepResult, Task};
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

pub use payload::PayloadStore;

/// What can go wrong in the runtime.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Bad configuration.
    #[error("configuration: {0}")]
    Config(String),
    /// A stream, bucket or consumer is missing: run `aob streams apply`.
    #[error("{0} (run `aob streams apply` to create the topology)")]
    Topology(String),
    /// The server refused or did not answer.
    #[error("nats: {0}")]
    Nats(String),
    /// Reading or writing an offloaded payload failed.
    #[error("payload: {0}")]
    Payload(String),
    /// A workflow is not in the registry.
    #[error("workflow `{name}`{} not found in tenant `{tenant}`", version.map(|v| format!(" version {v}")).unwrap_or_default())]
    WorkflowNotFound {
        /// Tenant.
        tenant: String,
        /// Name.
        name: String,
        /// Version asked for.
        version: Option<u32>,
    },
    /// A definition already exists under this version (versions are immutable).
    #[error(
        "workflow `{name}` version {version} already exists in tenant `{tenant}`; versions are immutable"
    )]
    VersionExists {
        /// Tenant.
        tenant: String,
        /// Name.
        name: String,
        /// Version.
        version: u32,
    },
}

impl Error {
    /// Whether trying again later may succeed: the server or the payload store did not
    /// answer, or the topology is still being applied. Bad configuration, a workflow that
    /// does not exist and a version that does will not change by waiting.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Error::Nats(_) | Error::Payload(_) | Error::Topology(_)
        )
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Microseconds since the Unix epoch.
pub fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A function: turns one task (config rendered, references resolved) into an outcome.
///
/// Return `Err` with [`StepError::retryable`] for transient trouble and
/// [`StepError::terminal`] for anything a retry cannot fix; only the runtime acks.
pub trait Handler: Send + Sync + 'static {
    /// Node type served (`http`, `transform`, ...).
    fn node_type(&self) -> &'static str;
    /// Runs one attempt. `cx` carries the cancellation signal, the emitter for progress and
    /// streamed chunks, the record fields the handler may set, and its secrets.
    fn handle(
        &self,
        task: Task,
        cx: &context::Context,
    ) -> impl Future<Output = Result<Outcome, StepError>> + Send;
    /// The kind of the audit record of one attempt: its node type's (a call to an outside
    /// tool is a `tool_call`).
    fn audit_kind(&self) -> AuditKind {
        aob_model::nodes::node_type(self.node_type())
            .map_or(AuditKind::TaskExecuted, |t| t.audit_kind)
    }
    /// Environment variables the function reads besides the common ones, with their
    /// meaning, for `--help`.
    fn env_vars(&self) -> &'static [(&'static str, &'static str)] {
        &[]
    }
}

/// Resolves references in the task and renders its config templates with its context.
pub async fn prepare(mut task: Task, payloads: &PayloadStore) -> Result<Task, StepError> {
    let hydrate = |v: Value| async move {
        payloads
            .hydrate(v)
            .await
            .map_err(|e| StepError::retryable(format!("loading an offloaded payload: {e}")))
    };
    task.context = hydrate(std::mem::take(&mut task.context)).await?;
    let config = hydrate(std::mem::take(&mut task.config)).await?;
    task.config = render_config(&task.node_type, &config, &task.context)?;
    Ok(task)
}

/// Renders a step config; CEL fields (`expr`, `assert`) and JSON Schemas stay as written.
pub fn render_config(node_type: &str, config: &Value, context: &Value) -> Result<Value, StepError> {
    let Value::Object(map) = config else {
        return Ok(config.clone());
    };
    let mut out = serde_json::Map::with_capacity(map.len());
    for (k, v) in map {
        let keep = aob_model::nodes::node_type(node_type)
            .is_some_and(|t| t.field(k) != aob_model::nodes::Field::Template);
        let rendered = if keep {
            v.clone()
        } else {
            expr::render(v, context)
                .map_err(|e| StepError::terminal(format!("field `{k}`: {e}")))?
        };
        out.insert(k.clone(), rendered);
    }
    Ok(Value::Object(out))
}

/// Runs one task through a handler: prepare, enforce the deadline, honour `cancel`, and
/// offload a large output. Returns `None` when cancelled (the run was aborted).
pub async fn execute<H: Handler>(
    handler: &H,
    task: Task,
    payloads: &PayloadStore,
    cancel: &CancellationToken,
) -> Option<StepResult> {
    execute_audited(handler, task, payloads, cancel)
        .await
        .map(|(r, _)| r)
}

/// Like [`execute`], and also returns the attempt's audit record: who ran it, the rendered
/// input, the output or error, and when.
pub async fn execute_audited<H: Handler>(
    handler: &H,
    task: Task,
    payloads: &PayloadStore,
    cancel: &CancellationToken,
) -> Option<(StepResult, DecisionRecord)> {
    let cx = context::Context::new(
        &task.tenant,
        &task.run_id,
        &task.at,
        cancel.clone(),
        std::sync::Arc::new(context::Discard),
        secrets::Secrets::none(),
    );
    execute_in(handler, task, payloads, &cx).await
}

/// Runs one task through a handler with its context: prepare, enforce the deadline, honour
/// the context's cancellation, offload a large output; returns the result and the
/// attempt's audit record (with what the handler set through the context). `None` when
/// cancelled.
pub async fn execute_in<H: Handler>(
    handler: &H,
    task: Task,
    payloads: &PayloadStore,
    cx: &context::Context,
) -> Option<(StepResult, DecisionRecord)> {
    let cancel = cx.cancelled();
    let started_us = now_us();
    let mut record = DecisionRecord::new(
        format!("{}.{}.{}.task", task.tenant, task.run_id, task.at.token()),
        &task.tenant,
        &task.run_id,
        handler.audit_kind(),
        &format!("fn.{}", handler.node_type()),
        started_us,
    );
    record.workflow = Some(task.workflow.clone());
    record.workflow_version = Some(task.version);
    record.step_id = Some(task.at.step.clone());
    record.node_type = Some(task.node_type.clone());
    record.attempt = Some(task.at.attempt);
    record.item = task.at.item;
    record.iteration = task.at.iteration;
    record.started_at_us = Some(started_us);
    let mut rendered: Option<Value> = None;
    let started = std::time::Instant::now();
    let tenant = task.tenant.clone();
    let run_id = task.run_id.clone();
    let at = task.at.clone();
    let deadline = task
        .deadline_ms
        .map(|d| Duration::from_millis(d.saturating_sub(now_ms())));
    let work = async {
        let task = prepare(task, payloads).await?;
        rendered = Some(task.config.clone());
        match deadline {
            Some(limit) => match tokio::time::timeout(limit, handler.handle(task, cx)).await {
                Ok(r) => r,
                Err(_) => Err(StepError::retryable(format!(
                    "step timed out after {}",
                    humantime::format_duration(limit)
                ))),
            },
            None => handler.handle(task, cx).await,
        }
    };
    // An aborted run wins over work that finishes in the same instant: nobody waits for it.
    let result = tokio::select! {
        biased;
        _ = cancel.cancelled() => return None,
        r = work => r,
    };
    let outcome = match result {
        Ok(Outcome::Completed { output }) => {
            let key = format!("{tenant}/{run_id}/{}.output", at.token());
            match payloads.offload(output, &key).await {
                Ok(output) => Outcome::Completed { output },
                Err(e) => Outcome::Failed {
                    error: StepError::retryable(format!("offloading the output: {e}")),
                },
            }
        }
        Ok(other) => other,
        Err(error) => Outcome::Failed { error },
    };
    let finished_us = now_us();
    cx.usage().apply(&mut record);
    record.finished_at_us = finished_us;
    record.duration_us = Some(finished_us - started_us);
    if let Some(input) = &rendered {
        // Credentials written into headers must not reach the audit trail.
        record = record.with_input(&secrets::redact_config(input));
    }
    record = match &outcome {
        Outcome::Completed { output } => {
            record.status = Some("COMPLETED".into());
            record.decision = Some("completed".into());
            record.with_output(output)
        }
        Outcome::Failed { error } => {
            record.status = Some("FAILED".into());
            record.decision = Some(match error.class {
                ErrorClass::Retryable => "failed, retryable".into(),
                ErrorClass::Terminal => "failed, terminal".into(),
            });
            record.with_error(error)
        }
        Outcome::Waiting { .. } => {
            record.status = Some("WAITING".into());
            record.decision = Some("wait".into());
            record
        }
    };
    Some((
        StepResult {
            tenant,
            run_id,
            at,
            outcome,
            duration_ms: started.elapsed().as_millis() as u64,
        },
        record,
    ))
}

/// A token cancelled on SIGTERM or Ctrl-C, for graceful drain.
pub fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            if let Ok(mut term) = signal(SignalKind::terminate()) {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            } else {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
        tracing::info!("shutting down: draining in-flight work");
        t.cancel();
    });
    token
}

/// Connection settings shared by every component, from the environment.
#[derive(Clone)]
pub struct Env {
    /// NATS URL (`NATS_URL`, default `nats://127.0.0.1:4222`).
    pub nats_url: String,
    /// Payload store URL (`AOB_PAYLOAD_URL`, default `file://<cwd>/.aob/payloads`).
    pub payload_url: String,
    /// Offload threshold in bytes (`AOB_OFFLOAD_THRESHOLD`, default 262144).
    pub offload_threshold: usize,
}

impl std::fmt::Debug for Env {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // NATS URLs can carry credentials.
        f.debug_struct("Env")
            .field("nats_url", &redact(&self.nats_url))
            .field("payload_url", &self.payload_url)
            .field("offload_threshold", &self.offload_threshold)
            .finish()
    }
}

/// The servers of a NATS URL list (`nats://a:4222,nats://b:4222`): a client that knows
/// several can start while one of them is down.
pub fn server_addrs(urls: &str) -> Result<Vec<async_nats::ServerAddr>> {
    urls.split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(|u| {
            u.parse::<async_nats::ServerAddr>()
                .map_err(|e| Error::Config(format!("NATS URL `{}`: {e}", redact(u))))
        })
        .collect()
}

/// A NATS URL (or list of them) without its credentials, for messages.
pub fn redact(urls: &str) -> String {
    let one = |url: &str| match url.rsplit_once('@') {
        Some((scheme_user, host)) => {
            let scheme = scheme_user.split("://").next().unwrap_or("nats");
            format!("{scheme}://***@{host}")
        }
        None => url.to_string(),
    };
    urls.split(',').map(one).collect::<Vec<_>>().join(",")
}

impl Env {
    /// Reads the environment.
    pub fn from_env() -> Result<Self> {
        let nats_url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
        let payload_url = match std::env::var("AOB_PAYLOAD_URL") {
            Ok(u) => u,
            Err(_) => {
                let cwd = std::env::current_dir().map_err(|e| Error::Config(e.to_string()))?;
                format!("file://{}/.aob/payloads", cwd.display())
            }
        };
        let offload_threshold = match std::env::var("AOB_OFFLOAD_THRESHOLD") {
            Ok(v) => v.parse().map_err(|_| {
                Error::Config(format!(
                    "AOB_OFFLOAD_THRESHOLD=`{v}` is not a number of bytes"
                ))
            })?,
            Err(_) => payload::DEFAULT_THRESHOLD,
        };
        Ok(Env {
            nats_url,
            payload_url,
            offload_threshold,
        })
    }

    /// Opens the payload store.
    pub fn payloads(&self) -> Result<PayloadStore> {
        PayloadStore::from_url(&self.payload_url, self.offload_threshold)
    }

    /// Connects to NATS.
    pub async fn connect(&self) -> Result<async_nats::Client> {
        init_tls();
        nats_options()?
            .name("aob")
            .connect(server_addrs(&self.nats_url)?)
            .await
            .map_err(|e| Error::Nats(format!("connecting to {}: {e}", redact(&self.nats_url))))
    }
}

/// Chooses the TLS implementation of the process (aws-lc-rs) before any TLS connection is
/// made. Two are linked (the NATS client's and the HTTP client's), and rustls will not pick
/// one on its own: a `tls://` NATS URL would fail without this. Idempotent.
pub fn init_tls() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    });
}

/// Connection options every AOB client starts from: TLS chosen ([`init_tls`]); with
/// `AOB_NATS_CA`, the CA that signed the server's certificate; with `AOB_NATS_CERT` and
/// `AOB_NATS_KEY`, the client's own certificate, for servers that verify clients.
pub fn nats_options() -> Result<async_nats::ConnectOptions> {
    init_tls();
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    let mut options = async_nats::ConnectOptions::new();
    if let Some(ca) = var("AOB_NATS_CA") {
        options = options.add_root_certificates(ca.into());
    }
    match (var("AOB_NATS_CERT"), var("AOB_NATS_KEY")) {
        (Some(cert), Some(key)) => {
            options = options.add_client_certificate(cert.into(), key.into());
        }
        (None, None) => {}
        _ => {
            return Err(Error::Config(
                "AOB_NATS_CERT and AOB_NATS_KEY go together: set both (the client's certificate and its key) or neither".into(),
            ));
        }
    }
    Ok(options)
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,async_nats=warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// The whole `main` of a function binary: read [`Env`], connect, serve until SIGTERM, drain.
pub async fn run_function<H: Handler>(handler: H) -> Result<()> {
    let (node_type, vars) = (handler.node_type(), handler.env_vars());
    run_function_with(node_type, vars, |_| async move { Ok(handler) }).await
}

/// Like [`run_function`] for a handler that needs the server to be built (it keeps state
/// in buckets): `build` gets the connection. `node_type` and `vars` serve `--help`.
pub async fn run_function_with<H, F, Fut>(
    node_type: &'static str,
    vars: &'static [(&'static str, &'static str)],
    build: F,
) -> Result<()>
where
    H: Handler,
    F: FnOnce(async_nats::Client) -> Fut,
    Fut: Future<Output = std::result::Result<H, Box<dyn std::error::Error + Send + Sync>>>,
{
    let name = format!("aob-{node_type}");
    let about = format!(
        "The `{node_type}` function: takes tasks of that node type from its durable consumer, runs them, hands their results to the engine."
    );
    let mut all = FUNCTION_VARS.to_vec();
    all.extend_from_slice(vars);
    usage::Usage {
        name: &name,
        about: &about,
        vars: &all,
    }
    .handle_args();
    init_logging();
    trace::init(&name)?;
    let env = Env::from_env()?;
    // Checked before connecting: a misspelled transport is said at once.
    let transport = remote::Transport::from_env()?;
    let client = env.connect().await?;
    let payloads = env.payloads()?;
    let handler = build(client.clone())
        .await
        .map_err(|e| Error::Config(e.to_string()))?;
    let shutdown = shutdown_on_signal();
    let handler = std::sync::Arc::new(handler);
    let contract = || delivery::Contract {
        payloads: payloads.clone(),
        max_message_bytes: nats::ServeConfig::default().max_message_bytes,
        heartbeat: nats::ServeConfig::default().heartbeat,
        emitter: nats::emitter(&client),
        secrets: secrets::Secrets::from_env(),
    };
    match transport {
        remote::Transport::Nats => {
            // Health and metrics, with how far behind this function's consumer is.
            let js = async_nats::jetstream::new(client.clone());
            let consumer = aob_streams::function_consumer(node_type);
            let extra: telemetry::Extra = std::sync::Arc::new(move || {
                let (js, consumer) = (js.clone(), consumer.clone());
                Box::pin(async move {
                    telemetry::consumer_lag(&js, &[(aob_streams::TASKS, consumer.as_str())]).await
                })
            });
            telemetry::serve_from_env(&client, Some(extra), shutdown.clone()).await?;
            nats::serve(
                handler,
                client.clone(),
                payloads.clone(),
                nats::ServeConfig::default(),
                shutdown,
            )
            .await?;
        }
        remote::Transport::Http(addr) => {
            let listener = tokio::net::TcpListener::bind(&addr)
                .await
                .map_err(|e| Error::Config(format!("listening on {addr}: {e}")))?;
            remote::serve_http(handler, contract(), client.clone(), listener, shutdown).await?;
        }
        remote::Transport::Lambda => remote::serve_lambda(handler, contract()).await?,
    }
    trace::shutdown();
    client
        .flush()
        .await
        .map_err(|e| Error::Nats(e.to_string()))?;
    Ok(())
}

/// The variables every function reads besides [`usage::COMMON_VARS`].
pub const FUNCTION_VARS: [(&str, &str); 5] = [
    (
        remote::TRANSPORT_VAR,
        "how tasks arrive: `nats` (the durable consumer), `http` (CloudEvents on 0.0.0.0:$PORT, for Knative) or `lambda` (the Lambda Runtime API); default: `lambda` under Lambda, `http` under Knative, else `nats`",
    ),
    ("PORT", "port of the `http` transport (default 8080)"),
    (
        telemetry::ADDR_VAR,
        "address for /healthz, /readyz and /metrics (Prometheus), e.g. 0.0.0.0:9090 (default: not served)",
    ),
    ("AOB_CONCURRENCY", "tasks run at once (default 64)"),
    (
        "AOB_HANDOFF_MS",
        "how long to wait for an engine to take a result directly, in ms; 0 publishes every result to AOB_RESULTS (default 5000)",
    ),
];

/// Deserializes a step config; the error is terminal and names the offending field.
pub fn parse_config<T: DeserializeOwned>(kind: &str, config: &Value) -> Result<T, StepError> {
    let err = match serde_json::from_value::<T>(config.clone()) {
        Ok(c) => return Ok(c),
        Err(e) => e.to_string(),
    };
    let message = match culprit::<T>(config, &err) {
        Some(field) => format!("invalid {kind} config: field `{field}`: {err}"),
        None => format!("invalid {kind} config: {err}"),
    };
    Err(StepError::terminal(message))
}

/// The field responsible for a deserialization error: the one whose removal changes the
/// error, or the one serde names as missing.
fn culprit<T: DeserializeOwned>(config: &Value, err: &str) -> Option<String> {
    if let Value::Object(map) = config {
        for key in map.keys() {
            let mut without = map.clone();
            without.remove(key);
            match serde_json::from_value::<T>(Value::Object(without)) {
                Ok(_) => return Some(key.clone()),
                Err(e) if e.to_string() != err => return Some(key.clone()),
                Err(_) => {}
            }
        }
    }
    let rest = err.split("missing field `").nth(1)?;
    rest.split('`').next().map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn config_rendering_leaves_cel_and_schemas_alone() {
        let ctx = json!({"input": {"n": 2}});
        let cfg = json!({"value": "{{ input.n }}", "assert": ["value > 1"], "schema": {"pattern": "{{x}}"}});
        let out = render_config("validate", &cfg, &ctx).unwrap();
        assert_eq!(out["value"], json!(2));
        assert_eq!(out["assert"], json!(["value > 1"]));
        assert_eq!(out["schema"], json!({"pattern": "{{x}}"}));
        let err =
            render_config("transform", &json!({"output": "{{ input.nope.x }}"}), &ctx).unwrap_err();
        assert_eq!(err.class, aob_model::wire::ErrorClass::Terminal);
        assert!(err.message.contains("field `output`"), "{}", err.message);
    }

    #[test]
    fn config_errors_name_the_field() {
        let e = parse_config::<aob_model::nodes::HttpConfig>(
            "http",
            &json!({"url": "http://x", "timeout": "soon"}),
        )
        .unwrap_err();
        assert_eq!(e.class, aob_model::wire::ErrorClass::Terminal);
        assert!(e.message.contains("field `timeout`"), "{}", e.message);
        let e = parse_config::<aob_model::nodes::HttpConfig>("http", &json!({})).unwrap_err();
        assert!(e.message.contains("field `url`"), "{}", e.message);
    }

    #[test]
    fn credentials_are_redacted() {
        assert_eq!(redact("nats://user:pw@host:4222"), "nats://***@host:4222");
        assert_eq!(
            redact("nats://u:p@a:4222,tls://u:q@b:4222"),
            "nats://***@a:4222,tls://***@b:4222"
        );
        let addrs = server_addrs("nats://127.0.0.1:4222, nats://127.0.0.1:4223").unwrap();
        assert_eq!(addrs.len(), 2);
        let e = server_addrs("nats://u:secret@host:x")
            .unwrap_err()
            .to_string();
        assert!(!e.contains("secret"), "{e}");
    }
}

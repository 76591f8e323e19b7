//! `aob-tool`: the tool gateway. Serves steps of type `tool`, and is the library an agent
//! uses to list and call tools: the tools of MCP servers (spawned over stdio and kept warm,
//! or reached over streamable HTTP) and HTTP tools declared in the tools file.
//!
//! [`Gateway`] does the work: arguments checked against the tool's input schema, per-tool
//! and per-tenant rate limits, a circuit breaker per server and per HTTP tool, then the
//! call. [`ToolHandler`] turns a step into one [`Gateway::call`].

pub mod config;
pub mod gateway;
pub mod guard;
pub mod mcp;

use std::path::PathBuf;
use std::sync::Arc;

use aob_model::nodes::ToolConfig;
use aob_model::wire::{Outcome, StepError, Task};
use serde_json::json;

pub use config::{ToolsConfig, model_name, qualified_name};
pub use gateway::{Clock, Gateway, ManualClock, SystemClock, ToolInfo, ToolOutput};

/// What can go wrong building the gateway or listing tools.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The tools file is unreadable or wrong.
    #[error("tools file {}: {message}", file.display())]
    Config {
        /// The file.
        file: PathBuf,
        /// What is wrong, naming the field.
        message: String,
    },
    /// The HTTP client for HTTP tools could not be built.
    #[error("HTTP tools: {0}")]
    Http(String),
    /// An MCP server could not be reached or listed.
    #[error("{message}")]
    Server {
        /// The server.
        server: String,
        /// Why.
        message: String,
    },
    /// No such tool.
    #[error("unknown tool `{name}` (known: {})", known.join(", "))]
    UnknownTool {
        /// The name asked for.
        name: String,
        /// The names that exist.
        known: Vec<String>,
    },
}

/// `Result` of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What the `tool` function reads from the environment besides the common variables.
pub const ENV_VARS: &[(&str, &str)] = &[
    (
        "AOB_TOOLS",
        "the tools file (YAML): MCP servers, HTTP tools, limits, breaker (unset: no tools)",
    ),
    (
        "AOB_HTTP_ALLOW",
        "CIDRs, addresses or hosts HTTP tools may call even if denied (default none)",
    ),
    (
        "AOB_HTTP_DENY",
        "CIDRs, addresses or hosts denied to HTTP tools besides link-local and metadata addresses",
    ),
    (
        "AOB_SECRETS_DIR",
        "directory of secret files, one per name, read when used",
    ),
    (
        "AOB_SECRET_<NAME>",
        "a secret, when no file of that name exists",
    ),
    (
        "AOB_POLICY_DIR",
        "a directory of Rego policies (`_all/`, `<tenant>/`) besides the AOB_POLICIES bucket",
    ),
];

/// The `tool` function: one [`Gateway::call`] per attempt.
#[derive(Debug, Clone)]
pub struct ToolHandler {
    gateway: Arc<Gateway>,
    guard: aob_llm::policy::Guard,
}

impl ToolHandler {
    /// A handler over the gateway of `AOB_TOOLS`.
    pub fn new() -> Result<Self> {
        Ok(ToolHandler::with(Arc::new(Gateway::from_env()?)))
    }

    /// A handler over a given gateway.
    pub fn with(gateway: Arc<Gateway>) -> Self {
        ToolHandler {
            gateway,
            guard: aob_llm::policy::Guard::none(),
        }
    }

    /// The same handler, asking the tenant's policies before every call.
    pub fn with_guard(mut self, guard: aob_llm::policy::Guard) -> Self {
        self.guard = guard;
        self
    }

    /// Its gateway.
    pub fn gateway(&self) -> &Arc<Gateway> {
        &self.gateway
    }
}

impl aob_runtime::Handler for ToolHandler {
    fn node_type(&self) -> &'static str {
        "tool"
    }

    fn env_vars(&self) -> &'static [(&'static str, &'static str)] {
        ENV_VARS
    }

    async fn handle(
        &self,
        task: Task,
        cx: &aob_runtime::context::Context,
    ) -> Result<Outcome, StepError> {
        let config: ToolConfig = aob_runtime::parse_config("tool", &task.config)?;
        let args = config.arguments.unwrap_or_else(|| json!({}));
        let caller = aob_llm::gateway::Caller::of(&task, task.at.step.clone());
        let decision = self
            .guard
            .check(
                cx,
                &caller,
                aob_llm::policy::Call::Tool { name: &config.tool },
                Some(args.clone()),
                None,
                "policy.tool",
            )
            .await?;
        if let Some(d) = decision {
            cx.set_usage(aob_runtime::context::Usage {
                policy_id: Some(d.column()),
                policy_result: Some(d.outcome.as_str().to_string()),
                ..Default::default()
            });
        }
        let out = self
            .gateway
            .call(&task.tenant, &config.tool, args, cx.cancelled())
            .await?;
        let output = serde_json::to_value(&out).map_err(|e| {
            StepError::terminal(format!("tool `{}`: its output is not JSON: {e}", out.tool))
        })?;
        if out.is_error {
            let text = if out.content.is_empty() {
                "no reason given".to_string()
            } else {
                out.content.clone()
            };
            return Err(StepError::terminal(format!(
                "tool `{}` reported an error: {text}",
                out.tool
            ))
            .with_details(output));
        }
        Ok(Outcome::Completed { output })
    }
}

//! Type-specific step fields of each node type. Validation deserializes a step's extra
//! fields into the matching struct (unknown fields are errors); the function handling the
//! type deserializes its rendered config into the same struct.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::definition::Dur;

/// How a step field of a node type is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    /// Strings are MiniJinja templates over the run context (the default for any field).
    Template,
    /// A CEL expression, passed to the function as written.
    Cel,
    /// A list of assertions (`validate`'s `assert`): CEL, passed as written.
    Assertions,
    /// Data passed as written (a JSON Schema): neither a template nor an expression.
    Data,
    /// Templates the function renders itself (prompts: it records their digest as their
    /// version); checked and read for the task context like any template.
    Prompt,
}

/// Checks the step fields of a node type; on error `(field, message)`.
pub type Check = fn(&Map<String, Value>) -> Result<(), (String, String)>;

/// Everything AOB knows about a node type, in one value. A node type is this descriptor
/// in [`REGISTRY`] plus the function that serves it: validation, the JSON Schema of the
/// definition format, config rendering, the task consumers (`aob streams apply`) and the
/// audit kind of its attempts all read the registry.
#[derive(Debug, Clone, Copy)]
pub struct NodeType {
    /// The `type:` of its steps, and the subject token of its tasks.
    pub name: &'static str,
    /// Fields read other than as templates; every other field is a template.
    pub fields: &'static [(&'static str, Field)],
    /// JSON Schema of its step fields.
    pub schema: fn() -> schemars::Schema,
    /// Checks its step fields.
    pub check: Check,
    /// The audit kind of one attempt.
    pub audit_kind: crate::audit::AuditKind,
}

impl NodeType {
    /// How `field` of a step of this type is read.
    pub fn field(&self, field: &str) -> Field {
        self.fields
            .iter()
            .find(|(f, _)| *f == field)
            .map_or(Field::Template, |(_, k)| *k)
    }
}

/// The node types this build can run.
pub const REGISTRY: &[NodeType] = &[
    NodeType {
        name: "http",
        fields: &[],
        schema: || schemars::schema_for!(HttpConfig),
        check: check_http,
        audit_kind: crate::audit::AuditKind::ToolCall,
    },
    NodeType {
        name: "tool",
        fields: &[],
        schema: || schemars::schema_for!(ToolConfig),
        check: check_tool,
        audit_kind: crate::audit::AuditKind::ToolCall,
    },
    NodeType {
        name: "transform",
        fields: &[("expr", Field::Cel)],
        schema: || schemars::schema_for!(TransformConfig),
        check: check_transform,
        audit_kind: crate::audit::AuditKind::TaskExecuted,
    },
    NodeType {
        name: "validate",
        fields: &[("assert", Field::Assertions), ("schema", Field::Data)],
        schema: || schemars::schema_for!(ValidateConfig),
        check: check_validate,
        audit_kind: crate::audit::AuditKind::TaskExecuted,
    },
    NodeType {
        name: "llm",
        fields: &[
            ("system", Field::Prompt),
            ("prompt", Field::Prompt),
            ("messages", Field::Prompt),
            ("examples", Field::Prompt),
            ("output_schema", Field::Data),
        ],
        schema: || schemars::schema_for!(LlmConfig),
        check: check_llm,
        audit_kind: crate::audit::AuditKind::ModelCall,
    },
    NodeType {
        name: "agent",
        fields: &[
            ("system", Field::Prompt),
            ("prompt", Field::Prompt),
            ("messages", Field::Prompt),
            ("examples", Field::Prompt),
        ],
        schema: || schemars::schema_for!(AgentConfig),
        check: check_agent,
        audit_kind: crate::audit::AuditKind::ModelCall,
    },
    NodeType {
        name: "wait",
        fields: &[],
        schema: || schemars::schema_for!(WaitConfig),
        check: check_wait,
        audit_kind: crate::audit::AuditKind::TaskExecuted,
    },
    NodeType {
        name: "human",
        fields: &[
            ("approvers", Field::Data),
            ("fields", Field::Data),
            ("deadline", Field::Data),
            ("required", Field::Data),
            ("allow_self_approval", Field::Data),
        ],
        schema: || schemars::schema_for!(HumanConfig),
        check: check_human,
        audit_kind: crate::audit::AuditKind::TaskExecuted,
    },
    NodeType {
        name: "retrieve",
        fields: &[
            ("top_k", Field::Data),
            ("min_score", Field::Data),
            ("kb", Field::Data),
        ],
        schema: || schemars::schema_for!(RetrieveConfig),
        check: check_retrieve,
        audit_kind: crate::audit::AuditKind::TaskExecuted,
    },
    NodeType {
        name: "workflow",
        fields: &[("workflow", Field::Data), ("version", Field::Data)],
        schema: || schemars::schema_for!(WorkflowStepConfig),
        check: check_workflow_step,
        audit_kind: crate::audit::AuditKind::TaskExecuted,
    },
];

/// Node types the engine runs itself, with no function and no task subject.
pub const ENGINE_TYPES: &[&str] = &["workflow"];

/// The descriptor of a node type.
pub fn node_type(name: &str) -> Option<&'static NodeType> {
    REGISTRY.iter().find(|t| t.name == name)
}

/// Names of the node types this build can run.
pub fn names() -> Vec<&'static str> {
    REGISTRY.iter().map(|t| t.name).collect()
}

/// `transform`: builds its output from templates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TransformConfig {
    /// Any JSON value; strings are templates (`{{ input.name }}`); a string that is a
    /// single `{{ expression }}` keeps the expression's JSON type.
    #[serde(default)]
    pub output: Option<Value>,
    /// A CEL expression whose value is the output (instead of `output`).
    #[serde(default)]
    pub expr: Option<String>,
}

/// One assertion of a `validate` step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum Assertion {
    /// Just the CEL condition.
    Expr(String),
    /// A CEL condition with the message reported when it is false.
    WithMessage {
        /// CEL condition over the run context and `value`.
        expr: String,
        /// Reason reported when the condition is false.
        #[serde(default)]
        message: Option<String>,
    },
}

impl Assertion {
    /// The CEL source.
    pub fn expr(&self) -> &str {
        match self {
            Assertion::Expr(e) | Assertion::WithMessage { expr: e, .. } => e,
        }
    }
    /// The message for a failed assertion.
    pub fn message(&self) -> String {
        match self {
            Assertion::WithMessage {
                message: Some(m), ..
            } => m.clone(),
            other => format!("assertion `{}` is false", other.expr()),
        }
    }
}

/// `validate`: checks a value against a JSON Schema and CEL assertions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ValidateConfig {
    /// The value to check (templates allowed); defaults to the run input.
    #[serde(default)]
    pub value: Option<Value>,
    /// JSON Schema the value must satisfy.
    #[serde(default)]
    pub schema: Option<Value>,
    /// CEL conditions that must all hold; they see the run context and `value`.
    #[serde(default)]
    pub assert: Vec<Assertion>,
}

/// `http`: calls a URL.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// The URL (template).
    pub url: String,
    /// HTTP method (default `GET`).
    #[serde(default = "default_method")]
    pub method: String,
    /// Request headers (values are templates).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Request body: a JSON value (sent as JSON) or a string (sent as text).
    #[serde(default)]
    pub body: Option<Value>,
    /// Time limit of the request (default `30s`); a timeout is retryable.
    #[serde(default)]
    pub timeout: Option<Dur>,
}

/// `tool`: calls a tool of the tool gateway (an MCP server's tool or a declared HTTP tool).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ToolConfig {
    /// Tool name: `<server>.<tool>` for an MCP server's tool, the plain name for an HTTP
    /// tool (template).
    pub tool: String,
    /// The tool's arguments: an object whose strings are templates, or one `{{ expression }}`
    /// giving an object. Checked against the tool's input schema before the call.
    #[serde(default)]
    pub arguments: Option<Value>,
}

fn check_tool(config: &Map<String, Value>) -> Result<(), (String, String)> {
    checked(config, |c: ToolConfig| {
        if c.tool.trim().is_empty() {
            return Err(("tool".to_string(), "name a tool".to_string()));
        }
        match &c.arguments {
            None | Some(Value::Object(_)) => Ok(()),
            Some(Value::String(s)) if crate::expr::is_template(s) => Ok(()),
            Some(_) => Err((
                "arguments".to_string(),
                "arguments are an object (or a `{{ expression }}` giving one)".to_string(),
            )),
        }
    })
}

fn default_method() -> String {
    "GET".into()
}

/// `wait`: a durable timer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WaitConfig {
    /// How long to wait (e.g. `10s`).
    #[serde(default)]
    pub duration: Option<Dur>,
    /// Wait until this RFC 3339 time (template), e.g. `2026-12-01T09:00:00Z`.
    #[serde(default)]
    pub until: Option<String>,
}

/// `human`: an approval request that people decide on; the step waits as state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HumanConfig {
    /// Who may decide.
    pub approvers: Approvers,
    /// Approvals needed (N of M, default 1); one rejection rejects.
    #[serde(default = "one")]
    pub required: u32,
    /// Whether the run's starter may decide on their own run (default no).
    #[serde(default)]
    pub allow_self_approval: bool,
    /// What the deciders are asked: a template over the run context.
    #[serde(default)]
    pub summary: Option<String>,
    /// JSON Schema of the fields a decider may edit; the edited values are the step's
    /// `values` output.
    #[serde(default)]
    pub fields: Option<Value>,
    /// Initial values of the editable fields (templates).
    #[serde(default)]
    pub values: Option<Value>,
    /// When the request expires, and what happens then.
    #[serde(default)]
    pub deadline: Option<Deadline>,
    /// Who else hears of the request.
    #[serde(default)]
    pub notify: Option<Notify>,
}

fn one() -> u32 {
    1
}

/// Who may decide: listed users, or holders of listed roles.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Approvers {
    /// User ids.
    #[serde(default)]
    pub users: Vec<String>,
    /// Roles.
    #[serde(default)]
    pub roles: Vec<String>,
}

impl Approvers {
    /// Whether a user holding `roles` is one of them.
    pub fn admits(&self, user: &str, roles: &[String]) -> bool {
        self.users.iter().any(|u| u == user) || roles.iter().any(|r| self.roles.contains(r))
    }
}

/// An approval deadline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Deadline {
    /// How long after the request (or the escalation) it expires.
    pub after: Dur,
    /// What happens then.
    pub action: DeadlineAction,
    /// For `escalate`: the new deciders.
    #[serde(default)]
    pub to: Option<Approvers>,
    /// For `escalate`: the next deadline.
    #[serde(default)]
    pub then: Option<Box<Deadline>>,
}

/// What an expired approval request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum DeadlineAction {
    /// The step completes as approved (by the deadline, not by a person).
    Approve,
    /// The step fails as rejected (by the deadline), and its `on_failure` applies.
    Reject,
    /// The request goes to `to`, with the deadline `then`.
    Escalate,
    /// The run fails.
    Fail,
}

/// Notifications of an approval request.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Notify {
    /// Addresses mailed over SMTP (templates).
    #[serde(default)]
    pub email: Vec<String>,
    /// A URL that gets the request as JSON (POST).
    #[serde(default)]
    pub webhook: Option<String>,
}

/// `retrieve`: the chunks of a knowledge base most like a query.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RetrieveConfig {
    /// The knowledge base.
    pub kb: String,
    /// What to look for: a template over the run context.
    pub query: String,
    /// How many chunks (default 5, at most 100).
    #[serde(default)]
    pub top_k: Option<u32>,
    /// Only chunks whose document metadata has these values (a list means any of them);
    /// values are templates.
    #[serde(default)]
    pub filter: Option<Map<String, Value>>,
    /// Only chunks at least this similar (cosine, -1 to 1).
    #[serde(default)]
    pub min_score: Option<f32>,
}

/// `workflow`: runs another workflow as a child run and completes with its outputs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WorkflowStepConfig {
    /// The child workflow's name.
    pub workflow: String,
    /// Its version (default: the latest when the step starts).
    #[serde(default)]
    pub version: Option<u32>,
    /// The child's input (templates over this run's context).
    #[serde(default)]
    pub input: Option<Value>,
}

/// `llm`: one answer from a model, through the model gateway.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LlmConfig {
    /// A configured model name (see the models file); default: the tenant's routing.
    #[serde(default)]
    pub model: Option<String>,
    /// Routing over several models instead of one `model`.
    #[serde(default)]
    pub routing: Option<RoutingConfig>,
    /// The system prompt (a MiniJinja template over the run context).
    #[serde(default)]
    pub system: Option<String>,
    /// The user's message (a template); shorthand for one `messages` entry.
    #[serde(default)]
    pub prompt: Option<String>,
    /// The conversation (contents are templates), after the examples.
    #[serde(default)]
    pub messages: Vec<PromptMessage>,
    /// Few-shot examples: pairs shown to the model before the conversation.
    #[serde(default)]
    pub examples: Vec<Example>,
    /// JSON Schema the answer must satisfy: the model is asked for JSON, the answer is
    /// validated, and the model is asked again with the errors (up to `max_repairs`).
    #[serde(default)]
    pub output_schema: Option<Value>,
    /// How many times an answer that does not fit `output_schema` is sent back (default 2).
    #[serde(default)]
    pub max_repairs: Option<u32>,
    /// Most tokens the model may write (default: the model's `max_output_tokens`).
    #[serde(default)]
    pub max_tokens: Option<u32>,
    /// Sampling temperature.
    #[serde(default)]
    pub temperature: Option<f64>,
    /// Stream the answer's tokens to watchers as they arrive (default true).
    #[serde(default)]
    pub stream: Option<bool>,
}

/// Routing over several models.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RoutingConfig {
    /// `fixed`, `fallback`, `cheapest` or `fastest`.
    pub strategy: String,
    /// Configured model names, in order of preference.
    pub models: Vec<String>,
}

/// One message of a prompt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PromptMessage {
    /// `user` or `assistant`.
    pub role: String,
    /// Its text (a template).
    pub content: String,
}

/// A few-shot example.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Example {
    /// What the user says.
    pub user: String,
    /// What the model should answer.
    pub assistant: String,
}

/// `agent`: a model that calls tools until it answers or reaches a bound.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// A configured model name; default: the tenant's routing.
    #[serde(default)]
    pub model: Option<String>,
    /// Routing over several models instead of one `model`.
    #[serde(default)]
    pub routing: Option<RoutingConfig>,
    /// The system prompt (a template).
    #[serde(default)]
    pub system: Option<String>,
    /// The task (a template); shorthand for one `messages` entry.
    #[serde(default)]
    pub prompt: Option<String>,
    /// The conversation (contents are templates).
    #[serde(default)]
    pub messages: Vec<PromptMessage>,
    /// Few-shot examples.
    #[serde(default)]
    pub examples: Vec<Example>,
    /// The tools it may call, by name in the tools file (`server.tool` for MCP tools).
    #[serde(default)]
    pub tools: Vec<String>,
    /// Most model turns (default 8).
    #[serde(default)]
    pub max_turns: Option<u32>,
    /// Most tokens, in and out, over all turns.
    #[serde(default)]
    pub max_tokens: Option<u64>,
    /// Most US dollars over all turns.
    #[serde(default)]
    pub max_cost_usd: Option<f64>,
    /// Most time spent in model and tool calls (e.g. `2m`).
    #[serde(default)]
    pub max_duration: Option<crate::definition::Dur>,
    /// Most tokens one turn may write (default: the model's `max_output_tokens`).
    #[serde(default)]
    pub max_tokens_per_turn: Option<u32>,
    /// Sampling temperature.
    #[serde(default)]
    pub temperature: Option<f64>,
    /// Stream the model's text to watchers (default true).
    #[serde(default)]
    pub stream: Option<bool>,
}

fn check_agent(config: &Map<String, Value>) -> Result<(), (String, String)> {
    checked(config, |c: AgentConfig| {
        if c.prompt.is_none() && c.messages.is_empty() {
            return Err((
                "prompt".to_string(),
                "an agent step needs `prompt` or `messages`".to_string(),
            ));
        }
        if c.max_turns == Some(0) {
            return Err(("max_turns".to_string(), "must be at least 1".to_string()));
        }
        if c.model.is_some() && c.routing.is_some() {
            return Err((
                "routing".to_string(),
                "give either `model` or `routing`, not both".to_string(),
            ));
        }
        Ok(())
    })
}

/// Routing strategies a step may name.
pub const STRATEGIES: [&str; 4] = ["fixed", "fallback", "cheapest", "fastest"];

fn check_llm(config: &Map<String, Value>) -> Result<(), (String, String)> {
    checked(config, |c: LlmConfig| {
        if c.prompt.is_none() && c.messages.is_empty() {
            return Err((
                "prompt".to_string(),
                "an llm step needs `prompt` or `messages`".to_string(),
            ));
        }
        if c.model.is_some() && c.routing.is_some() {
            return Err((
                "routing".to_string(),
                "give either `model` or `routing`, not both".to_string(),
            ));
        }
        if let Some(r) = &c.routing {
            if !STRATEGIES.contains(&r.strategy.as_str()) {
                return Err((
                    "routing.strategy".to_string(),
                    format!(
                        "unknown strategy `{}` (known: {})",
                        r.strategy,
                        STRATEGIES.join(", ")
                    ),
                ));
            }
            if r.models.is_empty() {
                return Err(("routing.models".to_string(), "names no model".to_string()));
            }
        }
        for (i, m) in c.messages.iter().enumerate() {
            if m.role != "user" && m.role != "assistant" {
                return Err((
                    format!("messages[{i}].role"),
                    format!("`{}` is not `user` or `assistant`", m.role),
                ));
            }
        }
        if let Some(s) = &c.output_schema
            && let Err(e) = jsonschema::validator_for(s)
        {
            return Err((
                "output_schema".to_string(),
                format!("not a valid JSON Schema: {e}"),
            ));
        }
        if let Some(t) = c.temperature
            && !(0.0..=2.0).contains(&t)
        {
            return Err((
                "temperature".to_string(),
                "must be between 0 and 2".to_string(),
            ));
        }
        Ok(())
    })
}

/// Checks the type-specific fields of a step of type `kind`; on error returns
/// `(field, message)`.
pub fn check_config(kind: &str, config: &Map<String, Value>) -> Result<(), (String, String)> {
    match node_type(kind) {
        Some(t) => (t.check)(config),
        None => Err((
            "type".to_string(),
            format!("unknown step type `{kind}` (known: {})", names().join(", ")),
        )),
    }
}

/// Deserializes step fields into a config struct, then runs the type's own checks; a
/// serde error names its field.
fn checked<T: serde::de::DeserializeOwned>(
    config: &Map<String, Value>,
    rules: impl FnOnce(T) -> Result<(), (String, String)>,
) -> Result<(), (String, String)> {
    match serde_json::from_value::<T>(Value::Object(config.clone())) {
        Ok(c) => rules(c),
        Err(e) => Err((field_of_serde_error(&e.to_string()), e.to_string())),
    }
}

fn check_transform(config: &Map<String, Value>) -> Result<(), (String, String)> {
    checked(config, |c: TransformConfig| {
        if c.output.is_none() && c.expr.is_none() {
            Err((
                "output".to_string(),
                "a transform step needs `output` or `expr`".to_string(),
            ))
        } else if c.output.is_some() && c.expr.is_some() {
            Err((
                "expr".to_string(),
                "give either `output` or `expr`, not both".to_string(),
            ))
        } else {
            Ok(())
        }
    })
}

fn check_validate(config: &Map<String, Value>) -> Result<(), (String, String)> {
    checked(config, |c: ValidateConfig| {
        if c.schema.is_none() && c.assert.is_empty() {
            Err((
                "schema".to_string(),
                "a validate step needs `schema` or `assert`".to_string(),
            ))
        } else {
            Ok(())
        }
    })
}

fn check_http(config: &Map<String, Value>) -> Result<(), (String, String)> {
    checked(config, |c: HttpConfig| {
        let m = c.method.to_ascii_uppercase();
        if ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"].contains(&m.as_str()) {
            check_http_secrets(&c)
        } else {
            Err((
                "method".to_string(),
                format!("`{}` is not an HTTP method", c.method),
            ))
        }
    })
}

fn check_wait(config: &Map<String, Value>) -> Result<(), (String, String)> {
    checked(config, |c: WaitConfig| match (&c.duration, &c.until) {
        (None, None) => Err((
            "duration".to_string(),
            "a wait step needs `duration` or `until`".to_string(),
        )),
        (Some(_), Some(_)) => Err((
            "until".to_string(),
            "give either `duration` or `until`, not both".to_string(),
        )),
        _ => Ok(()),
    })
}

fn check_human(config: &Map<String, Value>) -> Result<(), (String, String)> {
    checked(config, |c: HumanConfig| {
        let err = |f: &str, m: String| Err((f.to_string(), m));
        if c.approvers.users.is_empty() && c.approvers.roles.is_empty() {
            return err("approvers", "name at least one user or role".into());
        }
        if c.required == 0 {
            return err("required", "must be at least 1".into());
        }
        if c.approvers.roles.is_empty() && c.required as usize > c.approvers.users.len() {
            return err(
                "required",
                format!(
                    "{} approvals needed but only {} users may decide",
                    c.required,
                    c.approvers.users.len()
                ),
            );
        }
        if let Some(s) = &c.fields
            && let Err(e) = jsonschema::validator_for(s)
        {
            return err("fields", format!("not a valid JSON Schema: {e}"));
        }
        let mut d = c.deadline.as_ref();
        let mut path = "deadline".to_string();
        while let Some(dl) = d {
            if dl.after.0.is_zero() {
                return err(&format!("{path}.after"), "must be longer than zero".into());
            }
            match (dl.action, &dl.to, &dl.then) {
                (DeadlineAction::Escalate, None, _) => {
                    return err(&format!("{path}.to"), "`escalate` needs `to`".into());
                }
                (DeadlineAction::Escalate, Some(_), None) => {
                    return err(
                        &format!("{path}.then"),
                        "`escalate` needs `then`, the next deadline".into(),
                    );
                }
                (DeadlineAction::Escalate, Some(to), _)
                    if to.users.is_empty() && to.roles.is_empty() =>
                {
                    return err(
                        &format!("{path}.to"),
                        "name at least one user or role".into(),
                    );
                }
                (a, Some(_), _) | (a, _, Some(_)) if a != DeadlineAction::Escalate => {
                    return err(
                        &path,
                        "`to` and `then` go with `action: escalate` only".into(),
                    );
                }
                _ => {}
            }
            d = dl.then.as_deref();
            path.push_str(".then");
        }
        Ok(())
    })
}

fn check_retrieve(config: &Map<String, Value>) -> Result<(), (String, String)> {
    checked(config, |c: RetrieveConfig| {
        let err = |f: &str, m: String| Err((f.to_string(), m));
        if c.kb.is_empty()
            || c.kb.len() > 64
            || !c
                .kb
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == '-')
        {
            return err("kb", format!("`{}` is not a knowledge-base name", c.kb));
        }
        if c.top_k.is_some_and(|k| k == 0 || k > 100) {
            return err("top_k", "must be between 1 and 100".into());
        }
        if c.min_score.is_some_and(|s| !(-1.0..=1.0).contains(&s)) {
            return err(
                "min_score",
                "is a cosine similarity, between -1 and 1".into(),
            );
        }
        Ok(())
    })
}

fn check_workflow_step(config: &Map<String, Value>) -> Result<(), (String, String)> {
    checked(config, |c: WorkflowStepConfig| {
        if c.workflow.is_empty()
            || !c
                .workflow
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == '-')
        {
            return Err((
                "workflow".to_string(),
                format!("`{}` is not a workflow name", c.workflow),
            ));
        }
        if c.version == Some(0) {
            return Err(("version".to_string(), "versions start at 1".to_string()));
        }
        Ok(())
    })
}

/// Pulls the field name out of serde's "unknown field `x`" / "missing field `x`" text.
fn field_of_serde_error(msg: &str) -> String {
    for marker in ["unknown field `", "missing field `"] {
        if let Some(rest) = msg.split(marker).nth(1)
            && let Some(end) = rest.find('`')
        {
            return rest[..end].to_string();
        }
    }
    String::new()
}

/// A reference to a secret inside a string: `${secrets.NAME}` (spaces inside the braces
/// allowed). Single braces are plain text to MiniJinja, so a reference survives rendering
/// and reaches the function, which substitutes the value just before it is used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretRef<'a> {
    /// Byte range of the whole reference in the string.
    pub span: std::ops::Range<usize>,
    /// The secret's name.
    pub name: &'a str,
}

/// The secret references in `s`, in order; an error describes a malformed one. A `${...}`
/// that does not start with `secrets.` is plain text.
pub fn secret_refs(s: &str) -> Result<Vec<SecretRef<'_>>, String> {
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(at) = s[from..].find("${") {
        let start = from + at;
        let body_start = start + 2;
        let rest = &s[body_start..];
        let Some(close) = rest.find('}') else {
            if rest.trim_start().starts_with("secrets") {
                return Err(format!(
                    "secret reference `{}` has no closing `}}`; write `${{secrets.NAME}}`",
                    &s[start..]
                ));
            }
            break;
        };
        let inner = rest[..close].trim();
        let end = body_start + close + 1;
        if let Some(name) = inner.strip_prefix("secrets.") {
            if !is_secret_name(name) {
                return Err(format!(
                    "secret reference `{}`: `{name}` is not a secret name (letters, digits and _, not starting with a digit)",
                    &s[start..end]
                ));
            }
            out.push(SecretRef {
                span: start..end,
                name,
            });
        } else if inner == "secrets" || inner.starts_with("secrets") {
            return Err(format!(
                "secret reference `{}` names no secret; write `${{secrets.NAME}}`",
                &s[start..end]
            ));
        }
        from = end;
    }
    Ok(out)
}

/// Secret names are identifiers, so the same name works as a file name and in an
/// environment variable (`AOB_SECRET_<NAME>`).
pub fn is_secret_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Checks the secret references of an `http` step: well formed, and only in header values
/// (a secret in a URL or body would end up in messages, logs and echoing endpoints).
fn check_http_secrets(c: &HttpConfig) -> Result<(), (String, String)> {
    let misplaced = |field: &str| {
        (
            field.to_string(),
            "secret references (`${secrets.NAME}`) are substituted only in `headers` values"
                .to_string(),
        )
    };
    let templated = |s: &str| {
        let squeezed: String = s.split_whitespace().collect();
        squeezed.contains("{{secrets.")
    };
    for (name, value) in &c.headers {
        let field = format!("headers.{name}");
        if templated(value) {
            return Err((
                field,
                "`{{ secrets.NAME }}` is a template and would be rendered into run state; write `${secrets.NAME}`".to_string(),
            ));
        }
        secret_refs(value).map_err(|e| (field, e))?;
    }
    if templated(&c.url)
        || !secret_refs(&c.url)
            .map_err(|e| ("url".to_string(), e))?
            .is_empty()
    {
        return Err(misplaced("url"));
    }
    let mut body_err = None;
    if let Some(body) = &c.body {
        crate::expr::each_string(body, "body", &mut |path, s| {
            if body_err.is_none()
                && (templated(s) || !matches!(secret_refs(s), Ok(v) if v.is_empty()))
            {
                body_err = Some(misplaced(path));
            }
        });
    }
    body_err.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn secret_references_are_found_with_their_spans() {
        let s = "Bearer ${secrets.API_TOKEN} and ${ secrets.other_1 } but not ${HOME}";
        let refs = secret_refs(s).unwrap();
        let names: Vec<_> = refs.iter().map(|r| r.name).collect();
        assert_eq!(names, ["API_TOKEN", "other_1"]);
        assert_eq!(&s[refs[0].span.clone()], "${secrets.API_TOKEN}");
        assert_eq!(&s[refs[1].span.clone()], "${ secrets.other_1 }");
        assert!(
            secret_refs("no references, {{ input.x }}")
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn malformed_secret_references_are_errors() {
        for bad in [
            "${secrets.API-TOKEN}",
            "${secrets.}",
            "${secrets}",
            "Bearer ${secrets.TOKEN",
            "${secrets.9lives}",
        ] {
            assert!(secret_refs(bad).is_err(), "{bad}");
        }
    }

    fn http(config: Value) -> Result<(), (String, String)> {
        let Value::Object(map) = config else {
            panic!("not an object")
        };
        check_config("http", &map)
    }

    #[test]
    fn http_steps_take_secrets_only_in_headers() {
        http(json!({"url": "http://x", "headers": {"authorization": "Bearer ${secrets.T}"}}))
            .unwrap();
        let (field, msg) =
            http(json!({"url": "http://x", "headers": {"authorization": "Bearer ${secrets.T-1}"}}))
                .unwrap_err();
        assert_eq!(field, "headers.authorization");
        assert!(msg.contains("`T-1` is not a secret name"), "{msg}");
        let (field, msg) =
            http(json!({"url": "http://x", "headers": {"x-key": "${{ secrets.T }}"}})).unwrap_err();
        assert_eq!(field, "headers.x-key");
        assert!(msg.contains("write `${secrets.NAME}`"), "{msg}");
        let (field, _) = http(json!({"url": "http://x/?k=${secrets.T}"})).unwrap_err();
        assert_eq!(field, "url");
        let (field, msg) =
            http(json!({"url": "http://x", "body": {"auth": {"pw": "${secrets.T}"}}})).unwrap_err();
        assert_eq!(field, "body.auth.pw");
        assert!(msg.contains("only in `headers`"), "{msg}");
    }

    #[test]
    fn tool_steps_name_a_tool_and_take_object_arguments() {
        let check = |v: Value| check_config("tool", v.as_object().unwrap());
        assert!(
            check(json!({"tool": "time.get_current_time", "arguments": {"timezone": "UTC"}}))
                .is_ok()
        );
        assert!(check(json!({"tool": "lookup_order", "arguments": "{{ input.args }}"})).is_ok());
        assert_eq!(check(json!({"tool": " "})).unwrap_err().0, "tool");
        assert_eq!(
            check(json!({"tool": "t", "arguments": [1]})).unwrap_err().0,
            "arguments"
        );
        assert_eq!(
            check(json!({"tool": "t", "args": {}})).unwrap_err().0,
            "args"
        );
        assert_eq!(check(json!({"arguments": {}})).unwrap_err().0, "tool");
        assert_eq!(
            node_type("tool").unwrap().audit_kind,
            crate::audit::AuditKind::ToolCall
        );
    }
}

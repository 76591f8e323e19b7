//! Type-specific step fields of each node type. Validation deserializes a step's extra
//! fields into the matching struct (unknown fields are errors); the function handling the
//! type deserializes its rendered config into the same struct.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::definition::Dur;

/// Node types this build can run.
pub const NODE_TYPES: &[&str] = &["http", "transform", "validate", "wait"];

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

/// Checks the type-specific fields of a step of type `kind`; on error returns
/// `(field, message)`.
pub fn check_config(kind: &str, config: &Map<String, Value>) -> Result<(), (String, String)> {
    let value = Value::Object(config.clone());
    let res = match kind {
        "transform" => serde_json::from_value::<TransformConfig>(value).map(|c| {
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
        }),
        "validate" => serde_json::from_value::<ValidateConfig>(value).map(|c| {
            if c.schema.is_none() && c.assert.is_empty() {
                Err((
                    "schema".to_string(),
                    "a validate step needs `schema` or `assert`".to_string(),
                ))
            } else {
                Ok(())
            }
        }),
        "http" => serde_json::from_value::<HttpConfig>(value).map(|c| {
            let m = c.method.to_ascii_uppercase();
            if ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"].contains(&m.as_str()) {
                Ok(())
            } else {
                Err((
                    "method".to_string(),
                    format!("`{}` is not an HTTP method", c.method),
                ))
            }
        }),
        "wait" => {
            serde_json::from_value::<WaitConfig>(value).map(|c| match (&c.duration, &c.until) {
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
        other => {
            return Err((
                "type".to_string(),
                format!(
                    "unknown step type `{other}` (known: {})",
                    NODE_TYPES.join(", ")
                ),
            ));
        }
    };
    match res {
        Ok(inner) => inner,
        Err(e) => Err((field_of_serde_error(&e.to_string()), e.to_string())),
    }
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

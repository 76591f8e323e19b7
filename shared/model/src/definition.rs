//! The workflow definition format: one model, read from YAML or JSON.
//!
//! Type-specific step fields sit beside the common ones (`url:` next to `type: http`);
//! they are kept as a JSON map here and checked against the node type's own config struct
//! in [`crate::nodes`] during validation.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

/// A workflow: a named, versioned graph of steps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Workflow {
    /// Name used to start runs (`[A-Za-z0-9_-]`, at most 64 characters).
    pub name: String,
    /// Version number; assigned on publish when omitted (last version + 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u32>,
    /// Free text shown by `aob workflow show`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// JSON Schema that a run's input must satisfy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<Value>,
    /// Run timeout: the run fails when it is still going after this long (e.g. `10m`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Dur>,
    /// What a step's final failure does, unless the step says otherwise (default `fail`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_failure: Option<OnFailure>,
    /// Most rollbacks of one run, automatic and by hand (default 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_rollbacks: Option<u32>,
    /// Who approves a model or tool call that a policy holds for approval (default: the
    /// role `admin`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approvers: Option<crate::nodes::Approvers>,
    /// The steps, in any order; edges come from `needs`.
    pub steps: Vec<Step>,
}

impl Workflow {
    /// The step with this id.
    pub fn step(&self, id: &str) -> Option<&Step> {
        self.steps.iter().find(|s| s.id == id)
    }

    /// Ids of steps referenced as a `compensate: {step: ..}` target: they run only on
    /// rollback, never in the forward path.
    pub fn compensation_steps(&self) -> Vec<&str> {
        self.steps
            .iter()
            .filter_map(|s| match &s.compensate {
                Some(Compensate::Step { step }) => Some(step.as_str()),
                _ => None,
            })
            .collect()
    }
}

/// One step of a workflow.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Step {
    /// Unique id within the workflow: a letter or `_`, then letters, digits or `_`
    /// (so that expressions can say `steps.<id>.output`).
    pub id: String,
    /// Node type (`transform`, `validate`, `http`, `tool`, `llm`, `agent`, `wait`, `human`,
    /// `workflow`).
    #[serde(rename = "type")]
    pub kind: String,
    /// Steps that must finish before this one (see `trigger`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub needs: Vec<String>,
    /// CEL condition over the run context; false marks the step SKIPPED.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<String>,
    /// Join rule over `needs`.
    #[serde(default, skip_serializing_if = "Trigger::is_default")]
    pub trigger: Trigger,
    /// Retries for retryable failures.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryPolicy>,
    /// Time limit of one attempt (e.g. `30s`); an attempt past it fails as retryable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Dur>,
    /// Run the step once per element of a list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub for_each: Option<ForEach>,
    /// Run the step again until a condition holds.
    #[serde(default, rename = "loop", skip_serializing_if = "Option::is_none")]
    pub loop_: Option<LoopSpec>,
    /// What undoes this step on rollback.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compensate: Option<Compensate>,
    /// What this step's final failure does (the workflow's `on_failure` otherwise).
    #[serde(default, alias = "on_fail", skip_serializing_if = "Option::is_none")]
    pub on_failure: Option<OnFailure>,
    /// Type-specific fields (`url`, `output`, `schema`, ...).
    #[serde(flatten)]
    #[schemars(skip)]
    pub config: Map<String, Value>,
}

/// Join rule: when a step with `needs` becomes ready.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    /// Every need COMPLETED; a FAILED or SKIPPED need skips this step.
    #[default]
    AllSuccess,
    /// Every need finished, whatever its status.
    AllDone,
    /// At least one need COMPLETED (runs as soon as the first one does).
    OneSuccess,
}

impl Trigger {
    fn is_default(&self) -> bool {
        *self == Trigger::AllSuccess
    }
}

/// Retry policy for retryable failures (terminal failures never retry).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (default 3).
    #[serde(default = "default_attempts")]
    pub max_attempts: u32,
    /// Delay between attempts.
    #[serde(default)]
    pub backoff: Backoff,
}

fn default_attempts() -> u32 {
    3
}

/// Exponential backoff: `initial * multiplier^(attempt-1)`, capped at `max`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Backoff {
    /// Delay before the second attempt (default `1s`).
    #[serde(default = "default_initial")]
    pub initial: Dur,
    /// Largest delay (default `60s`).
    #[serde(default = "default_max")]
    pub max: Dur,
    /// Growth factor per attempt (default 2.0).
    #[serde(default = "default_multiplier")]
    pub multiplier: f64,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: default_initial(),
            max: default_max(),
            multiplier: default_multiplier(),
        }
    }
}

fn default_initial() -> Dur {
    Dur(Duration::from_secs(1))
}
fn default_max() -> Dur {
    Dur(Duration::from_secs(60))
}
fn default_multiplier() -> f64 {
    2.0
}

impl Backoff {
    /// Delay after the failed attempt number `attempt` (1-based).
    pub fn delay(&self, attempt: u32) -> Duration {
        let exp = attempt.saturating_sub(1).min(64) as i32;
        let ms = self.initial.0.as_millis() as f64 * self.multiplier.max(1.0).powi(exp);
        let capped = ms.min(self.max.0.as_millis() as f64);
        Duration::from_millis(capped.max(0.0) as u64)
    }
}

/// `for_each`: fan out over a list, collecting outputs in order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ForEach {
    /// CEL expression yielding a list; each element is `item` in the step's templates.
    pub items: String,
    /// Most items in flight at once (default 10).
    #[serde(default = "default_concurrency")]
    pub concurrency: u32,
}

fn default_concurrency() -> u32 {
    10
}

/// `loop`: run the step again until `until` holds, at most `max_iterations` times.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LoopSpec {
    /// CEL condition checked after each iteration; it sees the iteration's output as
    /// `steps.<id>.output` and the 0-based `iteration`.
    pub until: String,
    /// Upper bound on iterations; reaching it with `until` still false fails the step.
    pub max_iterations: u32,
}

/// What undoes a step on rollback: another step of the workflow, or an inline action.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum Compensate {
    /// Run the step with this id (it is then not part of the forward path).
    Step {
        /// Id of the compensating step.
        step: String,
    },
    /// Run an inline action of a node type.
    Action {
        /// Node type of the action.
        #[serde(rename = "type")]
        kind: String,
        /// Its type-specific fields.
        #[serde(flatten)]
        #[schemars(skip)]
        config: Map<String, Value>,
    },
}

/// What a step's final failure does.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFailure {
    /// The run fails (the default).
    Fail,
    /// Compensate every completed step that has a `compensate` action, latest first; the
    /// run then ends as `end` says (COMPENSATED unless `failed`).
    Compensate {
        /// `compensated` (default) or `failed`.
        end: CompensatedEnd,
    },
    /// Restore the run to the checkpoint before this step and run again from there, under
    /// a new generation (bounded by the workflow's `max_rollbacks`).
    RollbackTo(String),
}

/// How a compensated run ends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum CompensatedEnd {
    /// COMPENSATED.
    #[default]
    Compensated,
    /// FAILED.
    Failed,
}

impl JsonSchema for OnFailure {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "OnFailure".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "What a step's final failure does: `fail` (the default), `compensate`, `{compensate: {end: compensated|failed}}` or `{rollback_to: <step>}`.",
            "oneOf": [
                {"type": "string", "enum": ["fail", "compensate"]},
                {"type": "object", "properties": {"rollback_to": {"type": "string"}}, "required": ["rollback_to"], "additionalProperties": false},
                {"type": "object", "properties": {"compensate": {"type": "object", "properties": {"end": {"type": "string", "enum": ["compensated", "failed"]}}, "additionalProperties": false}}, "required": ["compensate"], "additionalProperties": false}
            ]
        })
    }
}

impl<'de> Deserialize<'de> for OnFailure {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        const HELP: &str =
            "write `fail`, `compensate`, `{compensate: {end: failed}}` or `{rollback_to: <step>}`";
        match Value::deserialize(d)? {
            Value::String(s) if s == "fail" => Ok(OnFailure::Fail),
            Value::String(s) if s == "compensate" => Ok(OnFailure::Compensate {
                end: CompensatedEnd::Compensated,
            }),
            Value::Object(m) if m.len() == 1 => {
                let (k, v) = m.into_iter().next().ok_or_else(|| D::Error::custom(HELP))?;
                match (k.as_str(), v) {
                    ("rollback_to", Value::String(step)) => Ok(OnFailure::RollbackTo(step)),
                    ("compensate", Value::Object(o)) => {
                        let end = match o.get("end") {
                            None => CompensatedEnd::Compensated,
                            Some(v) => serde_json::from_value(v.clone()).map_err(|_| {
                                D::Error::custom("`compensate.end` is `compensated` or `failed`")
                            })?,
                        };
                        if let Some(k) = o.keys().find(|k| *k != "end") {
                            return Err(D::Error::custom(format!(
                                "unknown field `{k}` in `compensate` (only `end`)"
                            )));
                        }
                        Ok(OnFailure::Compensate { end })
                    }
                    (k, _) => Err(D::Error::custom(format!(
                        "`{k}` is not a failure action; {HELP}"
                    ))),
                }
            }
            other => Err(D::Error::custom(format!(
                "`{other}` is not a failure action; {HELP}"
            ))),
        }
    }
}

/// A duration written as `500ms`, `30s`, `5m`, `1h 30m` (or a number of seconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Dur(pub Duration);

impl Dur {
    /// Milliseconds, saturating.
    pub fn as_millis(&self) -> u64 {
        u64::try_from(self.0.as_millis()).unwrap_or(u64::MAX)
    }
}

impl fmt::Display for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

impl std::str::FromStr for Dur {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        humantime::parse_duration(s.trim()).map(Dur).map_err(|e| {
            format!("`{s}` is not a duration ({e}); write it like `500ms`, `30s` or `5m`")
        })
    }
}

impl Serialize for Dur {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Secs(f64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Secs(s) if s >= 0.0 && s.is_finite() => Ok(Dur(Duration::from_secs_f64(s))),
            Raw::Secs(s) => Err(serde::de::Error::custom(format!("`{s}` is not a duration"))),
            Raw::Text(t) => t.parse().map_err(serde::de::Error::custom),
        }
    }
}

impl JsonSchema for Dur {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Duration".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "A duration such as `500ms`, `30s`, `5m`, `1h 30m`, or a number of seconds.",
            "oneOf": [
                {"type": "string", "pattern": "^\\s*[0-9]+\\s*[a-zA-Zµ]+(\\s*[0-9]+\\s*[a-zA-Zµ]+)*\\s*$"},
                {"type": "number", "minimum": 0}
            ]
        })
    }
}

/// Steps keyed by id, for lookups in validation and scheduling.
pub fn index(steps: &[Step]) -> BTreeMap<&str, &Step> {
    steps.iter().map(|s| (s.id.as_str(), s)).collect()
}

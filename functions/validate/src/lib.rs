//! `aob-validate`: checks a value against a JSON Schema and CEL assertions.

use aob_model::expr::Expr;
use aob_model::nodes::ValidateConfig;
use aob_model::wire::{Outcome, StepError, Task};
use serde_json::{Map, Value, json};

/// The `validate` function.
#[derive(Debug, Clone, Default)]
pub struct ValidateHandler;

/// One reason a value is not valid.
#[derive(Debug, Clone, PartialEq)]
struct Problem {
    /// `schema` or `assert`.
    kind: &'static str,
    /// JSON Pointer into the value (schema problems only; `""` is the value itself).
    path: Option<String>,
    /// What is wrong.
    message: String,
}

impl Problem {
    fn summary(&self) -> String {
        match &self.path {
            Some(p) if !p.is_empty() => format!("{p}: {}", self.message),
            _ => self.message.clone(),
        }
    }

    fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("kind".into(), json!(self.kind));
        if let Some(p) = &self.path {
            m.insert("path".into(), json!(p));
        }
        m.insert("message".into(), json!(self.message));
        Value::Object(m)
    }
}

impl ValidateHandler {
    /// A new handler (it holds no state).
    pub fn new() -> Self {
        ValidateHandler
    }

    /// Checks one task; the output is `{"valid": true, "value": <value>}`.
    pub fn validate(&self, task: &Task) -> Result<Value, StepError> {
        let config: ValidateConfig = aob_runtime::parse_config("validate", &task.config)?;
        // `value: null` (e.g. a template that gave null) is checked as null, not replaced
        // by the input, so look at the key rather than the Option.
        let value = match task.config.get("value") {
            Some(v) => v.clone(),
            None => task.context.get("input").cloned().unwrap_or(Value::Null),
        };

        let mut problems = Vec::new();
        if let Some(schema) = &config.schema {
            problems.extend(schema_problems(schema, &value)?);
        }
        if !config.assert.is_empty() {
            let ctx = assertion_context(&task.context, &value);
            for assertion in &config.assert {
                let holds = Expr::parse(assertion.expr()).and_then(|e| e.eval_bool(&ctx));
                match holds {
                    Ok(true) => {}
                    Ok(false) => problems.push(Problem {
                        kind: "assert",
                        path: None,
                        message: assertion.message(),
                    }),
                    Err(e) => problems.push(Problem {
                        kind: "assert",
                        path: None,
                        message: e.message,
                    }),
                }
            }
        }

        match problems.first() {
            None => Ok(json!({"valid": true, "value": value})),
            Some(first) => {
                let message = format!(
                    "validation failed: {} problem(s): {}",
                    problems.len(),
                    first.summary()
                );
                let errors: Vec<Value> = problems.iter().map(Problem::to_json).collect();
                Err(StepError::terminal(message).with_details(json!({ "errors": errors })))
            }
        }
    }
}

impl aob_runtime::Handler for ValidateHandler {
    fn node_type(&self) -> &'static str {
        "validate"
    }

    async fn handle(
        &self,
        task: Task,
        _cx: &aob_runtime::context::Context,
    ) -> Result<Outcome, StepError> {
        self.validate(&task)
            .map(|output| Outcome::Completed { output })
    }
}

/// Validates `value` against `schema`; an invalid schema is a terminal error.
fn schema_problems(schema: &Value, value: &Value) -> Result<Vec<Problem>, StepError> {
    let validator = jsonschema::validator_for(schema).map_err(|e| {
        StepError::terminal(format!(
            "invalid validate config: field `schema` is not a valid JSON Schema: {e}"
        ))
    })?;
    Ok(validator
        .iter_errors(value)
        .map(|e| Problem {
            kind: "schema",
            path: Some(e.instance_path().as_str().to_string()),
            message: e.to_string(),
        })
        .collect())
}

/// The run context with `value` added, as the assertions see it.
fn assertion_context(context: &Value, value: &Value) -> Value {
    let mut map = match context {
        Value::Object(m) => m.clone(),
        _ => Map::new(),
    };
    map.insert("value".into(), value.clone());
    Value::Object(map)
}

#[cfg(test)]
mod tests {
    use super::*;
    use aob_model::wire::ErrorClass;
    use aob_runtime::Handler;

    fn task(config: Value, context: Value) -> Task {
        aob_testkit::task("validate", "check", config, context)
    }

    async fn run(config: Value, context: Value) -> Result<Value, StepError> {
        let t = task(config, context);
        let cx = aob_runtime::context::Context::detached(&t);
        match ValidateHandler::new().handle(t, &cx).await? {
            Outcome::Completed { output } => Ok(output),
            other => panic!("unexpected outcome {other:?}"),
        }
    }

    fn errors(e: &StepError) -> Vec<Value> {
        e.details
            .as_ref()
            .and_then(|d| d["errors"].as_array())
            .cloned()
            .unwrap_or_default()
    }

    fn person_schema() -> Value {
        json!({
            "type": "object",
            "required": ["name", "age"],
            "properties": {
                "name": {"type": "string"},
                "age": {"type": "integer", "minimum": 0}
            }
        })
    }

    #[tokio::test]
    async fn valid_input_passes_with_the_value_as_output() {
        let ctx = json!({"input": {"name": "ada", "age": 36}});
        let out = run(
            json!({"schema": person_schema(), "assert": ["value.age >= 18"]}),
            ctx,
        )
        .await
        .unwrap();
        assert_eq!(
            out,
            json!({"valid": true, "value": {"name": "ada", "age": 36}})
        );
    }

    #[tokio::test]
    async fn explicit_value_is_checked_instead_of_the_input() {
        let ctx = json!({"input": {"name": "ada", "age": 36}});
        let out = run(json!({"value": 7, "assert": ["value == 7"]}), ctx.clone())
            .await
            .unwrap();
        assert_eq!(out, json!({"valid": true, "value": 7}));

        // A null value is checked as null, not replaced by the input.
        let e = run(json!({"value": null, "schema": {"type": "object"}}), ctx)
            .await
            .unwrap_err();
        assert_eq!(e.class, ErrorClass::Terminal);
        assert_eq!(errors(&e).len(), 1);
    }

    #[tokio::test]
    async fn schema_failures_report_the_path() {
        let ctx = json!({"input": {"name": "ada", "age": "old"}});
        let e = run(json!({"schema": person_schema()}), ctx)
            .await
            .unwrap_err();
        assert_eq!(e.class, ErrorClass::Terminal);
        assert!(
            e.message
                .starts_with("validation failed: 1 problem(s): /age"),
            "{}",
            e.message
        );
        let errs = errors(&e);
        assert_eq!(errs.len(), 1);
        assert_eq!(errs[0]["kind"], "schema");
        assert_eq!(errs[0]["path"], "/age");
        assert!(
            errs[0]["message"].as_str().unwrap().contains("integer"),
            "{errs:?}"
        );
    }

    #[tokio::test]
    async fn failed_assertions_use_their_message() {
        let ctx = json!({"input": {"name": "ada", "age": 12}, "limits": {"min_age": 18}});
        let config = json!({"assert": [
            {"expr": "value.age >= limits.min_age", "message": "too young"},
            "value.name == 'bob'",
            "value.age > 0"
        ]});
        let e = run(config, ctx).await.unwrap_err();
        assert_eq!(e.class, ErrorClass::Terminal);
        assert_eq!(e.message, "validation failed: 2 problem(s): too young");
        let errs = errors(&e);
        assert_eq!(errs.len(), 2);
        assert_eq!(errs[0], json!({"kind": "assert", "message": "too young"}));
        assert_eq!(errs[1]["kind"], "assert");
        assert!(
            errs[1]["message"]
                .as_str()
                .unwrap()
                .contains("value.name == 'bob'"),
            "{errs:?}"
        );
    }

    #[tokio::test]
    async fn assertion_errors_are_reported_as_problems() {
        let ctx = json!({"input": {"age": 12}});
        let e = run(json!({"assert": ["value.age", "value.age >"]}), ctx)
            .await
            .unwrap_err();
        assert_eq!(e.class, ErrorClass::Terminal);
        let errs = errors(&e);
        assert_eq!(errs.len(), 2);
        assert!(
            errs[0]["message"]
                .as_str()
                .unwrap()
                .contains("must be true or false"),
            "{errs:?}"
        );
        assert!(
            errs[1]["message"]
                .as_str()
                .unwrap()
                .contains("not a valid CEL expression"),
            "{errs:?}"
        );
    }

    #[tokio::test]
    async fn schema_and_assertion_problems_are_combined() {
        let ctx = json!({"input": {"name": 5, "age": -1}});
        let e = run(
            json!({"schema": person_schema(), "assert": ["value.age > 0"]}),
            ctx,
        )
        .await
        .unwrap_err();
        let errs = errors(&e);
        let kinds: Vec<&str> = errs.iter().filter_map(|v| v["kind"].as_str()).collect();
        assert_eq!(
            kinds.iter().filter(|k| **k == "schema").count(),
            2,
            "{errs:?}"
        );
        assert_eq!(kinds.last(), Some(&"assert"));
        assert!(
            e.message.starts_with("validation failed: 3 problem(s): "),
            "{}",
            e.message
        );
    }

    #[tokio::test]
    async fn invalid_schema_and_config_are_terminal() {
        let e = run(
            json!({"schema": {"type": "no-such-type"}}),
            json!({"input": 1}),
        )
        .await
        .unwrap_err();
        assert_eq!(e.class, ErrorClass::Terminal);
        assert!(
            e.message.contains("not a valid JSON Schema"),
            "{}",
            e.message
        );

        let e = run(json!({"assert": "value > 1"}), json!({"input": 1}))
            .await
            .unwrap_err();
        assert_eq!(e.class, ErrorClass::Terminal);
        assert!(e.message.contains("field `assert`"), "{}", e.message);
    }

    #[test]
    fn node_type_is_validate() {
        assert_eq!(ValidateHandler::new().node_type(), "validate");
    }
}

//! `aob-transform`: builds a step output from the run context, either from the already
//! rendered `output` template or from a CEL `expr`.

use aob_model::expr::Expr;
use aob_model::nodes::TransformConfig;
use aob_model::wire::{Outcome, StepError, Task};
use serde_json::Value;

/// The `transform` function.
#[derive(Debug, Clone, Default)]
pub struct TransformHandler;

impl TransformHandler {
    /// A new handler (it holds no state).
    pub fn new() -> Self {
        TransformHandler
    }

    /// Computes the output of one task.
    pub fn transform(&self, task: &Task) -> Result<Value, StepError> {
        let config: TransformConfig = aob_runtime::parse_config("transform", &task.config)?;
        // `output: null` is a legitimate output, so look at the key, not the Option.
        let has_output = task.config.get("output").is_some();
        match (has_output, &config.expr) {
            (true, Some(_)) => Err(StepError::terminal(
                "invalid transform config: field `expr`: give either `output` or `expr`, not both",
            )),
            (true, None) => Ok(config.output.unwrap_or(Value::Null)),
            (false, Some(source)) => Expr::parse(source)
                .and_then(|e| e.eval(&task.context))
                .map_err(|e| StepError::terminal(e.message)),
            (false, None) => Err(StepError::terminal(
                "invalid transform config: field `output`: a transform step needs `output` or `expr`",
            )),
        }
    }
}

impl aob_runtime::Handler for TransformHandler {
    fn node_type(&self) -> &'static str {
        "transform"
    }

    async fn handle(
        &self,
        task: Task,
        _cx: &aob_runtime::context::Context,
    ) -> Result<Outcome, StepError> {
        self.transform(&task)
            .map(|output| Outcome::Completed { output })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aob_model::wire::ErrorClass;
    use aob_runtime::Handler;
    use serde_json::json;

    fn task(config: Value, context: Value) -> Task {
        aob_testkit::task("transform", "shape", config, context)
    }

    async fn run(config: Value, context: Value) -> Result<Value, StepError> {
        let t = task(config, context);
        let cx = aob_runtime::context::Context::detached(&t);
        match TransformHandler::new().handle(t, &cx).await? {
            Outcome::Completed { output } => Ok(output),
            other => panic!("unexpected outcome {other:?}"),
        }
    }

    /// Through the delivery contract, as any transport runs it, on the in-memory transport:
    /// the rendered output is settled, the audit record stored, then the task acked.
    #[tokio::test]
    async fn a_task_runs_through_the_delivery_contract() {
        use aob_runtime::delivery::{Contract, Delivered, deliver, memory};
        let t = task(
            json!({"output": "hello {{ input.name }}"}),
            json!({"input": {"name": "ada"}}),
        );
        let d = memory::Delivery::of(&t);
        let contract = Contract {
            payloads: aob_runtime::PayloadStore::from_url("memory:///", 1 << 20).unwrap(),
            max_message_bytes: 1 << 20,
            heartbeat: std::time::Duration::from_secs(60),
            emitter: std::sync::Arc::new(aob_runtime::context::Discard),
            secrets: aob_runtime::secrets::Secrets::none(),
        };
        let out = deliver(&TransformHandler::new(), &d, &contract).await;
        let Delivered::Settled(result) = out else {
            panic!("not settled: {out:?}")
        };
        assert_eq!(
            result.outcome,
            Outcome::Completed {
                output: json!("hello ada")
            }
        );
        let seen = d.seen();
        assert!(seen.acked);
        assert_eq!(seen.audited.len(), 1);
        assert_eq!(seen.audited[0].event_kind.as_str(), "task_executed");
    }

    #[tokio::test]
    async fn output_is_passed_through() {
        let out = run(json!({"output": {"name": "ada", "n": [1, 2]}}), json!({}))
            .await
            .unwrap();
        assert_eq!(out, json!({"name": "ada", "n": [1, 2]}));
        let out = run(json!({"output": null}), json!({})).await.unwrap();
        assert_eq!(out, Value::Null);
    }

    #[tokio::test]
    async fn expr_is_evaluated_against_the_context() {
        let ctx = json!({"input": {"a": 2, "b": 3}, "steps": {"s": {"output": {"xs": [1, 2, 3]}}}});
        let out = run(
            json!({"expr": "{'sum': input.a + input.b, 'n': size(steps.s.output.xs)}"}),
            ctx,
        )
        .await
        .unwrap();
        assert_eq!(out, json!({"sum": 5, "n": 3}));
    }

    #[tokio::test]
    async fn bad_expressions_are_terminal() {
        let e = run(json!({"expr": "input.a +"}), json!({"input": {"a": 1}}))
            .await
            .unwrap_err();
        assert_eq!(e.class, ErrorClass::Terminal);
        assert!(e.message.contains("input.a +"), "{}", e.message);

        let e = run(
            json!({"expr": "input.nope.deeper"}),
            json!({"input": {"a": 1}}),
        )
        .await
        .unwrap_err();
        assert_eq!(e.class, ErrorClass::Terminal);
        assert!(e.message.contains("failed"), "{}", e.message);
    }

    #[tokio::test]
    async fn bad_config_names_the_field() {
        let e = run(json!({"expr": 42}), json!({})).await.unwrap_err();
        assert_eq!(e.class, ErrorClass::Terminal);
        assert!(e.message.contains("field `expr`"), "{}", e.message);

        let e = run(json!({"output": 1, "extra": true}), json!({}))
            .await
            .unwrap_err();
        assert_eq!(e.class, ErrorClass::Terminal);
        assert!(e.message.contains("field `extra`"), "{}", e.message);

        let e = run(json!({}), json!({})).await.unwrap_err();
        assert_eq!(e.class, ErrorClass::Terminal);
        assert!(e.message.contains("`output` or `expr`"), "{}", e.message);

        let e = run(json!({"output": 1, "expr": "1"}), json!({}))
            .await
            .unwrap_err();
        assert_eq!(e.class, ErrorClass::Terminal);
        assert!(e.message.contains("not both"), "{}", e.message);
    }

    #[test]
    fn node_type_is_transform() {
        assert_eq!(TransformHandler::new().node_type(), "transform");
    }
}

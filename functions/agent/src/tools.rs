//! The tool gateway as the agent's [`Tools`]: the same validation, limits and breakers as
//! a `tool` step.

use aob_llm::chat::ToolSpec;
use aob_model::wire::StepError;
use futures::future::BoxFuture;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::{ToolResult, Tools};

impl Tools for aob_tool::gateway::Gateway {
    fn specs<'a>(
        &'a self,
        names: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<(String, ToolSpec)>, StepError>> {
        Box::pin(async move {
            if names.is_empty() {
                return Ok(Vec::new());
            }
            let infos = self
                .list(names)
                .await
                .map_err(|e| StepError::retryable(format!("listing the agent's tools: {e}")))?;
            Ok(infos
                .into_iter()
                .map(|t| {
                    let spec = ToolSpec {
                        name: t.model_name,
                        description: t.description.unwrap_or_default(),
                        input_schema: t.input_schema,
                    };
                    (t.name, spec)
                })
                .collect())
        })
    }

    fn call<'a>(
        &'a self,
        tenant: &'a str,
        name: &'a str,
        args: Value,
        cancel: &'a CancellationToken,
    ) -> BoxFuture<'a, Result<ToolResult, StepError>> {
        Box::pin(async move {
            let out = aob_tool::gateway::Gateway::call(self, tenant, name, args, cancel).await?;
            let text = if out.content.is_empty() && !out.structured.is_null() {
                out.structured.to_string()
            } else {
                out.content.clone()
            };
            Ok(ToolResult {
                text,
                is_error: out.is_error,
                output: json!(out),
            })
        })
    }
}

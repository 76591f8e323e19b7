//! Knowledge bases as an agent's tools: `kb.<name>` in an agent's `tools` searches that
//! knowledge base (the model sees a `kb__<name>` tool taking a `query`), beside the tool
//! gateway's tools.

use std::sync::Arc;

use aob_llm::chat::ToolSpec;
use aob_model::wire::StepError;
use futures::future::BoxFuture;
use serde_json::{Map, Value, json};
use tokio_util::sync::CancellationToken;

use crate::{ToolResult, Tools};

/// The prefix of a knowledge base's tool name.
pub const PREFIX: &str = "kb.";

/// An agent's tools with knowledge bases among them.
pub struct WithKnowledge {
    tools: Arc<dyn Tools>,
    retrieve: Option<aob_retrieve::RetrieveHandler>,
}

impl WithKnowledge {
    /// `tools`, plus the knowledge bases `retrieve` reaches (none without it: an agent
    /// naming one is told why).
    pub fn new(tools: Arc<dyn Tools>, retrieve: Option<aob_retrieve::RetrieveHandler>) -> Self {
        WithKnowledge { tools, retrieve }
    }
}

fn spec(kb: &str) -> ToolSpec {
    ToolSpec {
        name: format!("kb__{kb}"),
        description: format!(
            "Searches the knowledge base `{kb}` and returns the passages most relevant to the query, best first, each with its source."
        ),
        input_schema: json!({
            "type": "object",
            "properties": {
                "query": {"type": "string", "description": "What to look for, in a sentence."},
                "top_k": {"type": "integer", "minimum": 1, "maximum": 10, "description": "How many passages (default 4)."}
            },
            "required": ["query"]
        }),
    }
}

impl Tools for WithKnowledge {
    fn specs<'a>(
        &'a self,
        names: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<(String, ToolSpec)>, StepError>> {
        Box::pin(async move {
            let (kbs, others): (Vec<String>, Vec<String>) =
                names.iter().cloned().partition(|n| n.starts_with(PREFIX));
            let mut out = self.tools.specs(&others).await?;
            for n in kbs {
                if self.retrieve.is_none() {
                    return Err(StepError::terminal(format!(
                        "tool `{n}`: this agent function has no knowledge bases (set AOB_KB_URL)"
                    )));
                }
                let kb = n.trim_start_matches(PREFIX).to_string();
                out.push((n, spec(&kb)));
            }
            Ok(out)
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
            let Some(kb) = name.strip_prefix(PREFIX) else {
                return self.tools.call(tenant, name, args, cancel).await;
            };
            let retrieve = self.retrieve.as_ref().ok_or_else(|| {
                StepError::terminal(format!("tool `{name}`: no knowledge bases here"))
            })?;
            let Some(query) = args.get("query").and_then(Value::as_str) else {
                return Err(StepError::terminal(
                    "`query` is missing: give a sentence to look for",
                ));
            };
            let top_k = args
                .get("top_k")
                .and_then(Value::as_u64)
                .unwrap_or(4)
                .clamp(1, 10) as usize;
            let found = retrieve
                .search(tenant, kb, query, top_k, &Map::new(), None)
                .await?;
            let text = found
                .hits
                .iter()
                .enumerate()
                .map(|(i, h)| {
                    format!(
                        "[{}] {} (score {:.2})\n{}",
                        i + 1,
                        h.entry.chunk_id,
                        h.score,
                        h.entry.text
                    )
                })
                .collect::<Vec<_>>()
                .join("\n\n");
            Ok(ToolResult {
                text: if text.is_empty() {
                    "no passage found".into()
                } else {
                    text
                },
                is_error: false,
                output: json!({"kb": kb, "version": found.version, "chunks": found.hits}),
            })
        })
    }
}

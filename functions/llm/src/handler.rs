//! The `llm` step: render the prompt, call the model through the gateway (streaming the
//! answer's text to watchers), check the answer against `output_schema` and ask again
//! with the errors when it does not fit.

use std::sync::Arc;

use aob_model::nodes::LlmConfig;
use aob_model::wire::{Outcome, StepError, Task};
use aob_runtime::context::{Context, Emission, Usage};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::chat::{ChatRequest, Message};
use crate::config::{Route, Strategy};
use crate::gateway::{Answer, Caller, Gateway};
use crate::record::hex;

/// What the function reads from the environment besides the common variables.
pub const ENV_VARS: &[(&str, &str)] = &[
    (
        crate::config::ENV,
        "the models file: named models, routing, budgets and limits (see the aob-llm README)",
    ),
    (
        "AOB_SECRET_<NAME>",
        "a secret named by an `api_key: ${secrets.NAME}`",
    ),
    (
        "AOB_POLICY_DIR",
        "a directory of Rego policies (`_all/`, `<tenant>/`) besides the AOB_POLICIES bucket",
    ),
];

/// Repairs when a step sets no `max_repairs`.
pub const DEFAULT_MAX_REPAIRS: u32 = 2;

/// The `llm` function.
#[derive(Debug, Clone)]
pub struct LlmHandler {
    gateway: Arc<Gateway>,
}

impl LlmHandler {
    /// A handler over a gateway.
    pub fn new(gateway: Arc<Gateway>) -> Self {
        LlmHandler { gateway }
    }
}

/// A step's routing as the gateway reads it.
pub fn route_of(
    model: Option<&str>,
    routing: Option<&aob_model::nodes::RoutingConfig>,
) -> Option<Route> {
    if let Some(m) = model {
        return Some(Route::Model {
            model: m.to_string(),
        });
    }
    routing.map(|r| Route::Strategy {
        strategy: match r.strategy.as_str() {
            "fallback" => Strategy::Fallback,
            "cheapest" => Strategy::Cheapest,
            "fastest" => Strategy::Fastest,
            _ => Strategy::Fixed,
        },
        models: r.models.clone(),
    })
}

/// Where in its run a task asks: calls are recorded under it.
pub fn scope_of(task: &Task) -> String {
    let mut s = task.at.step.clone();
    if let Some(i) = task.at.iteration {
        s.push_str(&format!("#{i}"));
    }
    if let Some(i) = task.at.item {
        s.push_str(&format!("[{i}]"));
    }
    // A rollback runs the step again for a new answer: each generation has its own calls
    // (retries within one reuse them).
    if task.at.generation > 0 {
        s.push_str(&format!("@g{}", task.at.generation));
    }
    s
}

fn render(field: &str, text: &str, context: &Value) -> Result<String, StepError> {
    match aob_model::expr::render_str(text, context) {
        Ok(Value::String(s)) => Ok(s),
        Ok(other) => Ok(other.to_string()),
        Err(e) => Err(StepError::terminal(format!("field `{field}`: {e}"))),
    }
}

/// The prompt of a step, rendered, and the digest of its templates (their version).
pub fn build_request(c: &LlmConfig, context: &Value) -> Result<(ChatRequest, String), StepError> {
    let mut h = Sha256::new();
    h.update(
        serde_json::to_vec(&json!([
            c.system,
            c.prompt,
            c.messages,
            c.examples,
            c.output_schema
        ]))
        .unwrap_or_default(),
    );
    let template_digest = hex(&h.finalize())[..16].to_string();
    let mut system = match &c.system {
        Some(s) => Some(render("system", s, context)?),
        None => None,
    };
    if let Some(schema) = &c.output_schema {
        let s = system.get_or_insert_with(String::new);
        if !s.is_empty() {
            s.push_str("\n\n");
        }
        s.push_str(&format!(
            "Answer with one JSON value only, no prose, that satisfies this JSON Schema:\n{schema}"
        ));
    }
    let mut messages = Vec::new();
    for (i, ex) in c.examples.iter().enumerate() {
        messages.push(Message::user(render(
            &format!("examples[{i}].user"),
            &ex.user,
            context,
        )?));
        messages.push(Message::assistant(
            render(&format!("examples[{i}].assistant"), &ex.assistant, context)?,
            Vec::new(),
        ));
    }
    for (i, m) in c.messages.iter().enumerate() {
        let text = render(&format!("messages[{i}].content"), &m.content, context)?;
        messages.push(if m.role == "assistant" {
            Message::assistant(text, Vec::new())
        } else {
            Message::user(text)
        });
    }
    if let Some(p) = &c.prompt {
        messages.push(Message::user(render("prompt", p, context)?));
    }
    Ok((
        ChatRequest {
            model: String::new(),
            system,
            messages,
            tools: Vec::new(),
            max_tokens: c.max_tokens.unwrap_or(0),
            temperature: c.temperature,
            json: c.output_schema.is_some(),
        },
        template_digest,
    ))
}

/// Streams the answer's text to the context's emitter while `work` runs.
pub async fn streamed<T>(
    cx: &Context,
    on: bool,
    work: impl AsyncFnOnce(Option<&tokio::sync::mpsc::UnboundedSender<String>>) -> T,
) -> T {
    if !on {
        return work(None).await;
    }
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let forward = async {
        while let Some(text) = rx.recv().await {
            cx.emit(Emission::Chunk { text }).await;
        }
    };
    let call = async move {
        let out = work(Some(&tx)).await;
        drop(tx);
        out
    };
    let (out, ()) = tokio::join!(call, forward);
    out
}

/// The JSON value in a model's answer: the whole text, or the first fenced or braced
/// block in it.
pub fn json_in(text: &str) -> Result<Value, String> {
    let t = text.trim();
    if let Ok(v) = serde_json::from_str(t) {
        return Ok(v);
    }
    let inner = t
        .split("```")
        .nth(1)
        .map(|b| b.trim_start_matches("json").trim());
    if let Some(b) = inner
        && let Ok(v) = serde_json::from_str(b)
    {
        return Ok(v);
    }
    if let (Some(a), Some(z)) = (t.find('{'), t.rfind('}'))
        && a < z
        && let Ok(v) = serde_json::from_str(&t[a..=z])
    {
        return Ok(v);
    }
    Err(match serde_json::from_str::<Value>(t) {
        Err(e) => format!("the answer is not JSON: {e}"),
        Ok(_) => "the answer is not JSON".to_string(),
    })
}

/// What is wrong with `value` against `schema`, one line per error naming where.
pub fn schema_errors(schema: &Value, value: &Value) -> Result<Vec<String>, StepError> {
    let v = jsonschema::validator_for(schema)
        .map_err(|e| StepError::terminal(format!("field `output_schema`: {e}")))?;
    Ok(v.iter_errors(value)
        .map(|e| {
            let at = e.instance_path().to_string();
            format!("{}: {e}", if at.is_empty() { "(root)" } else { &at })
        })
        .collect())
}

/// One call's line in the step output.
pub fn call_json(a: &Answer) -> Value {
    json!({
        "model": a.model,
        "provider": a.provider,
        "digest": a.digest,
        "tokens_in": a.response.usage.input,
        "tokens_out": a.response.usage.output,
        "cached_tokens": a.response.usage.cached_input,
        "cost_usd": a.cost_usd,
        "reused": a.reused,
        "took_ms": a.took_ms,
        "passed_over": a.passed_over,
    })
}

/// Adds a call's tokens and cost to the attempt's DecisionRecord and gives the call a
/// record of its own.
pub fn account(cx: &Context, a: &Answer, total: &mut Usage) {
    total.model = Some(a.model.clone());
    total.provider = Some(a.provider.clone());
    total.tokens_in = Some(total.tokens_in.unwrap_or(0) + a.response.usage.input);
    total.tokens_out = Some(total.tokens_out.unwrap_or(0) + a.response.usage.output);
    // A reused answer was paid for by the attempt that made the call.
    if !a.reused {
        total.cost_usd = Some(total.cost_usd.unwrap_or(0.0) + a.cost_usd);
    } else {
        total.cost_usd.get_or_insert(0.0);
    }
    cx.set_usage(total.clone());
    cx.record(
        aob_model::audit::AuditKind::ModelCall,
        &format!("call.{}", &a.digest[..16]),
        |r| {
            r.model = Some(a.model.clone());
            r.provider = Some(a.provider.clone());
            r.tokens_in = Some(a.response.usage.input);
            r.tokens_out = Some(a.response.usage.output);
            r.cost_usd = Some(if a.reused { 0.0 } else { a.cost_usd });
            r.decision = Some(if a.reused {
                "reused".into()
            } else {
                "called".into()
            });
            r.input_digest = Some(a.digest.clone());
            r.duration_us = Some(a.took_ms as i64 * 1000);
            r.reason = (!a.passed_over.is_empty()).then(|| a.passed_over.join("; "));
            if let Some(d) = &a.policy {
                r.policy_id = Some(d.column());
                r.policy_result = Some(d.outcome.as_str().to_string());
            }
        },
    );
}

impl aob_runtime::Handler for LlmHandler {
    fn node_type(&self) -> &'static str {
        "llm"
    }

    fn env_vars(&self) -> &'static [(&'static str, &'static str)] {
        ENV_VARS
    }

    async fn handle(&self, task: Task, cx: &Context) -> Result<Outcome, StepError> {
        let c: LlmConfig = aob_runtime::parse_config("llm", &task.config)?;
        let (mut req, template_digest) = build_request(&c, &task.context)?;
        let route = route_of(c.model.as_deref(), c.routing.as_ref());
        let scope = scope_of(&task);
        let max_repairs = c.max_repairs.unwrap_or(DEFAULT_MAX_REPAIRS);
        let mut usage = Usage::default();
        let mut calls = Vec::new();
        let mut prompt_digest = None;
        let mut repair = 0;
        loop {
            let caller = Caller::of(&task, format!("{scope}/{repair}"));
            let a = streamed(cx, c.stream.unwrap_or(true), async |tx| {
                self.gateway
                    .call(&caller, route.as_ref(), &req, tx, cx)
                    .await
            })
            .await?;
            prompt_digest.get_or_insert_with(|| a.digest.clone());
            account(cx, &a, &mut usage);
            calls.push(call_json(&a));
            let text = a.response.text.clone();
            let mut out = json!({
                "text": text,
                "model": a.model,
                "provider": a.provider,
                "finish_reason": a.response.finish_reason,
                "usage": {
                    "tokens_in": usage.tokens_in,
                    "tokens_out": usage.tokens_out,
                    "cost_usd": usage.cost_usd,
                },
                "template_digest": template_digest,
                "prompt_digest": prompt_digest,
                "calls": calls,
            });
            let Some(schema) = &c.output_schema else {
                return Ok(Outcome::Completed { output: out });
            };
            let problems = match json_in(&text) {
                Ok(v) => {
                    let errs = schema_errors(schema, &v)?;
                    if errs.is_empty() {
                        out["json"] = v;
                        return Ok(Outcome::Completed { output: out });
                    }
                    errs
                }
                Err(e) => vec![e],
            };
            if repair >= max_repairs {
                return Err(StepError::terminal(format!(
                    "the answer does not satisfy `output_schema` after {} repair(s): {}",
                    repair,
                    problems.join("; ")
                ))
                .with_details(json!({ "last_answer": text, "errors": problems })));
            }
            repair += 1;
            req.messages.push(Message::assistant(text, Vec::new()));
            req.messages.push(Message::user(format!(
                "That answer does not satisfy the JSON Schema: {}. Answer again with JSON only.",
                problems.join("; ")
            )));
        }
    }
}

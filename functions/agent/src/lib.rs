//! `aob-agent`: the tool-calling loop. The model proposes tool calls, the tool gateway
//! runs them, their results go back, until the model answers or a bound is reached (turns,
//! tokens, cost, time). The model is told what it has left every turn.
//!
//! Every turn is durable: model answers and tool results are recorded (the `AOB_CALLS`
//! bucket) as they complete, keyed by the run, the turn and a digest of what was asked.
//! An attempt that starts again after a crash walks the same turns, finds each answer and
//! result recorded, and reaches the first turn that did not complete without calling a
//! model or a tool twice. The budget text the model sees is computed from recorded usage,
//! so the requests of a resumed attempt are the same bytes as the first attempt's.

pub mod knowledge;
pub mod tools;

use std::collections::HashMap;
use std::sync::Arc;

use aob_llm::chat::{ChatRequest, Message, ToolSpec};
use aob_llm::gateway::{Caller, Gateway};
use aob_llm::handler::{account, build_request, call_json, route_of, scope_of, streamed};
use aob_llm::policy::Call;
use aob_llm::record::{Recorder, hex};
use aob_model::audit::AuditKind;
use aob_model::nodes::{AgentConfig, LlmConfig};
use aob_model::wire::{ErrorClass, Outcome, StepError, Task};
use aob_runtime::context::{Context, Emission, Usage};
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

/// What the function reads from the environment besides the common variables.
pub const ENV_VARS: &[(&str, &str)] = &[
    ("AOB_MODELS", "the models file (see the aob-llm README)"),
    ("AOB_TOOLS", "the tools file (see the aob-tool README)"),
    (
        "AOB_KB_URL",
        "where the knowledge bases' files are; an agent's `kb.<name>` tools search them",
    ),
    (
        "AOB_SECRET_<NAME>",
        "secrets named by the models and tools files",
    ),
    (
        "AOB_POLICY_DIR",
        "a directory of Rego policies (`_all/`, `<tenant>/`) besides the AOB_POLICIES bucket",
    ),
];

/// Turns when a step sets no `max_turns`.
pub const DEFAULT_MAX_TURNS: u32 = 8;

/// What a tool call came to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolResult {
    /// The text the model sees.
    pub text: String,
    /// The tool reported an error (the model sees it and may try otherwise).
    pub is_error: bool,
    /// The tool's full output.
    pub output: Value,
}

/// The tools an agent can call: the tool gateway, with its validation, limits and breakers.
pub trait Tools: Send + Sync {
    /// The tools named, as the model sees them, with each one's configured name.
    fn specs<'a>(
        &'a self,
        names: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<(String, ToolSpec)>, StepError>>;
    /// Calls a tool by its configured name. A terminal error (bad arguments, the tool
    /// refused) goes back to the model; a retryable one fails the attempt, and the attempt
    /// after it resumes at this turn.
    fn call<'a>(
        &'a self,
        tenant: &'a str,
        name: &'a str,
        args: Value,
        cancel: &'a CancellationToken,
    ) -> BoxFuture<'a, Result<ToolResult, StepError>>;
}

/// The `agent` function.
#[derive(Clone)]
pub struct AgentHandler {
    gateway: Arc<Gateway>,
    tools: Arc<dyn Tools>,
    recorder: Recorder,
}

impl std::fmt::Debug for AgentHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AgentHandler")
    }
}

/// A recorded tool call.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RecordedTool {
    tool: String,
    result: ToolResult,
    took_ms: u64,
    /// The policy decision that allowed the call (`policy_id` column, result).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    policy: Option<(String, String)>,
}

/// What the loop has used so far.
#[derive(Debug, Clone, Copy, Default)]
struct Used {
    turns: u32,
    tokens: u64,
    cost_usd: f64,
    ms: u64,
}

fn digest_of(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0]);
    }
    hex(&h.finalize())
}

impl AgentHandler {
    /// An agent over the model gateway and the tools; `recorder` keeps tool results.
    pub fn new(gateway: Arc<Gateway>, tools: Arc<dyn Tools>, recorder: Recorder) -> Self {
        AgentHandler {
            gateway,
            tools,
            recorder,
        }
    }

    async fn run_tool(
        &self,
        task: &Task,
        cx: &Context,
        key_parts: &[&str],
        name: &str,
        args: Value,
        policy_suffix: &str,
    ) -> Result<(RecordedTool, bool), StepError> {
        let key = Recorder::key(
            &task.tenant,
            &task.run_id,
            &format!("tool-{}", digest_of(key_parts)),
        );
        if let Some(r) = self
            .recorder
            .get::<RecordedTool>(&key)
            .await
            .map_err(|e| StepError::retryable(e.0))?
        {
            return Ok((r, true));
        }
        // Asked before every live call; a recorded result was allowed when it was made.
        let decision = self
            .gateway
            .guard()
            .check(
                cx,
                &Caller::of(task, scope_of(task)),
                Call::Tool { name },
                Some(args.clone()),
                None,
                policy_suffix,
            )
            .await?;
        let started = std::time::Instant::now();
        let result = match self
            .tools
            .call(&task.tenant, name, args, cx.cancelled())
            .await
        {
            Ok(r) => r,
            // The model can act on a refusal; transient trouble ends the attempt instead.
            Err(e) if e.class == ErrorClass::Terminal => ToolResult {
                text: e.message.clone(),
                is_error: true,
                output: json!({ "error": e.message }),
            },
            Err(e) => return Err(e),
        };
        let rec = RecordedTool {
            tool: name.to_string(),
            result: bounded(result),
            took_ms: started.elapsed().as_millis() as u64,
            policy: decision.map(|d| (d.column(), d.outcome.as_str().to_string())),
        };
        let kept = self
            .recorder
            .put(&key, &rec)
            .await
            .map_err(|e| StepError::retryable(e.0))?;
        // Another delivery recorded first: its result is the one the model sees.
        let rec = if kept {
            rec
        } else {
            self.recorder
                .get::<RecordedTool>(&key)
                .await
                .map_err(|e| StepError::retryable(e.0))?
                .unwrap_or(rec)
        };
        Ok((rec, false))
    }
}

/// Most bytes of a tool's text the model is given (and recorded).
pub const MAX_TOOL_TEXT: usize = 64 * 1024;
/// Most bytes of a tool's full output kept in its record.
pub const MAX_TOOL_OUTPUT: usize = 256 * 1024;

/// A tool result cut to what a record holds (a KV value is at most the server's payload
/// limit, 1 MiB by default) and a model can use: the text to [`MAX_TOOL_TEXT`] with a note
/// of what was cut, the full output dropped above [`MAX_TOOL_OUTPUT`].
fn bounded(mut r: ToolResult) -> ToolResult {
    if r.text.len() > MAX_TOOL_TEXT {
        let mut end = MAX_TOOL_TEXT;
        while !r.text.is_char_boundary(end) {
            end -= 1;
        }
        let cut = r.text.len() - end;
        r.text.truncate(end);
        r.text.push_str(&format!("\n[{cut} more bytes cut]"));
    }
    let size = serde_json::to_vec(&r.output).map_or(0, |v| v.len());
    if size > MAX_TOOL_OUTPUT {
        r.output = json!({ "cut": true, "bytes": size });
    }
    r
}

/// Keeps a turn in the run's history (a `step_progress` event), once however often the
/// attempt runs it.
async fn report(cx: &Context, turn: u32, message: String, data: Value) -> Result<(), StepError> {
    cx.report(u64::from(turn) - 1, message, data)
        .await
        .map_err(|e| StepError::retryable(format!("recording turn {turn} in the history: {e}")))
}

fn left_text(c: &AgentConfig, max_turns: u32, used: &Used) -> String {
    let mut parts = vec![format!(
        "{} turn(s) including this one",
        max_turns.saturating_sub(used.turns)
    )];
    if let Some(t) = c.max_tokens {
        parts.push(format!("{} tokens", t.saturating_sub(used.tokens)));
    }
    if let Some(m) = c.max_cost_usd {
        parts.push(format!("${:.4}", (m - used.cost_usd).max(0.0)));
    }
    if let Some(d) = c.max_duration {
        parts.push(format!(
            "{} s of model and tool time",
            (d.0.as_millis() as u64).saturating_sub(used.ms) / 1000
        ));
    }
    let last = if max_turns.saturating_sub(used.turns) <= 1 {
        " This is your last turn: answer now without calling tools."
    } else {
        ""
    };
    format!("[Left: {}.{last}]", parts.join(", "))
}

fn over_bound(c: &AgentConfig, max_turns: u32, used: &Used) -> Option<String> {
    if used.turns >= max_turns {
        return Some(format!("max_turns ({max_turns})"));
    }
    if let Some(t) = c.max_tokens
        && used.tokens >= t
    {
        return Some(format!("max_tokens ({t}); used {}", used.tokens));
    }
    if let Some(m) = c.max_cost_usd
        && used.cost_usd >= m
    {
        return Some(format!("max_cost_usd (${m}); used ${:.6}", used.cost_usd));
    }
    if let Some(d) = c.max_duration
        && used.ms >= d.0.as_millis() as u64
    {
        return Some(format!(
            "max_duration ({} ms); used {} ms",
            d.0.as_millis(),
            used.ms
        ));
    }
    None
}

impl aob_runtime::Handler for AgentHandler {
    fn node_type(&self) -> &'static str {
        "agent"
    }

    fn env_vars(&self) -> &'static [(&'static str, &'static str)] {
        ENV_VARS
    }

    async fn handle(&self, task: Task, cx: &Context) -> Result<Outcome, StepError> {
        let c: AgentConfig = aob_runtime::parse_config("agent", &task.config)?;
        let prompt = LlmConfig {
            model: None,
            routing: None,
            system: c.system.clone(),
            prompt: c.prompt.clone(),
            messages: c.messages.clone(),
            examples: c.examples.clone(),
            output_schema: None,
            max_repairs: None,
            max_tokens: c.max_tokens_per_turn,
            temperature: c.temperature,
            stream: c.stream,
        };
        let (base, template_digest) = build_request(&prompt, &task.context)?;
        let specs = self.tools.specs(&c.tools).await?;
        let by_model_name: HashMap<String, String> = specs
            .iter()
            .map(|(name, s)| (s.name.clone(), name.clone()))
            .collect();
        let tools: Vec<ToolSpec> = specs.into_iter().map(|(_, s)| s).collect();
        let route = route_of(c.model.as_deref(), c.routing.as_ref());
        let scope = scope_of(&task);
        let max_turns = c.max_turns.unwrap_or(DEFAULT_MAX_TURNS);
        let mut messages = base.messages.clone();
        let mut used = Used::default();
        let mut usage = Usage::default();
        let mut calls = Vec::new();
        let mut tool_log = Vec::new();
        loop {
            if let Some(bound) = over_bound(&c, max_turns, &used) {
                return Err(StepError::terminal(format!(
                    "the agent reached its bound of {bound} after {} turn(s) without a final answer",
                    used.turns
                ))
                .with_details(json!({ "turns": used.turns, "tool_calls": tool_log })));
            }
            let left = left_text(&c, max_turns, &used);
            let last_turn = max_turns.saturating_sub(used.turns) <= 1;
            used.turns += 1;
            let turn = used.turns;
            let system = match &base.system {
                Some(s) => format!("{s}\n\n{left}"),
                None => left,
            };
            let mut max_tokens = base.max_tokens;
            if let Some(t) = c.max_tokens {
                let rest = t.saturating_sub(used.tokens).min(u64::from(u32::MAX)) as u32;
                max_tokens = if max_tokens == 0 {
                    rest
                } else {
                    max_tokens.min(rest)
                };
            }
            let req = ChatRequest {
                model: String::new(),
                system: Some(system),
                messages: messages.clone(),
                tools: if last_turn { Vec::new() } else { tools.clone() },
                max_tokens,
                temperature: base.temperature,
                json: false,
            };
            let caller = Caller::of(&task, format!("{scope}/turn{turn}"));
            let a = streamed(cx, c.stream.unwrap_or(true), async |tx| {
                self.gateway
                    .call(&caller, route.as_ref(), &req, tx, cx)
                    .await
            })
            .await?;
            account(cx, &a, &mut usage);
            used.tokens += a.response.usage.input + a.response.usage.output;
            used.cost_usd += a.cost_usd;
            used.ms += a.took_ms;
            calls.push(call_json(&a));
            let proposed: Vec<String> = a
                .response
                .tool_calls
                .iter()
                .map(|t| t.name.clone())
                .collect();
            let turn_data = json!({
                "agent_turn": turn,
                "model": a.model,
                "reused": a.reused,
                "tool_calls": proposed,
                "tokens": a.response.usage.input + a.response.usage.output,
                "cost_usd": a.cost_usd,
            });
            cx.emit(Emission::Event {
                data: turn_data.clone(),
            })
            .await;
            if a.response.tool_calls.is_empty() {
                report(
                    cx,
                    turn,
                    format!("turn {turn}: {} answered", a.model),
                    turn_data,
                )
                .await?;
                return Ok(Outcome::Completed {
                    output: json!({
                        "text": a.response.text,
                        "turns": turn,
                        "model": a.model,
                        "provider": a.provider,
                        "usage": {
                            "tokens_in": usage.tokens_in,
                            "tokens_out": usage.tokens_out,
                            "cost_usd": usage.cost_usd,
                            "ms": used.ms,
                        },
                        "tool_calls": tool_log,
                        "calls": calls,
                        "template_digest": template_digest,
                    }),
                });
            }
            messages.push(Message::assistant(
                a.response.text.clone(),
                a.response.tool_calls.clone(),
            ));
            for (i, call) in a.response.tool_calls.iter().enumerate() {
                let args_text = call.arguments.to_string();
                let args_digest = digest_of(&[&args_text]);
                let (rec, reused) = match by_model_name.get(&call.name) {
                    None => (
                        RecordedTool {
                            tool: call.name.clone(),
                            result: ToolResult {
                                text: format!(
                                    "unknown tool `{}`; the tools are: {}",
                                    call.name,
                                    by_model_name.keys().cloned().collect::<Vec<_>>().join(", ")
                                ),
                                is_error: true,
                                output: Value::Null,
                            },
                            took_ms: 0,
                            policy: None,
                        },
                        false,
                    ),
                    Some(name) => {
                        let turn_s = turn.to_string();
                        self.run_tool(
                            &task,
                            cx,
                            &[&scope, &turn_s, &call.id, name, &args_text],
                            name,
                            call.arguments.clone(),
                            &format!("policy.tool.{turn}.{i}"),
                        )
                        .await?
                    }
                };
                used.ms += rec.took_ms;
                cx.record(AuditKind::ToolCall, &format!("tool.{turn}.{i}"), |r| {
                    r.decision = Some(if rec.result.is_error {
                        "tool error".into()
                    } else if reused {
                        "reused".into()
                    } else {
                        "called".into()
                    });
                    r.reason = Some(format!("turn {turn}: {}", rec.tool));
                    r.input_digest = Some(args_digest.clone());
                    r.duration_us = Some(rec.took_ms as i64 * 1000);
                    if let Some((id, result)) = &rec.policy {
                        r.policy_id = Some(id.clone());
                        r.policy_result = Some(result.clone());
                    }
                });
                tool_log.push(json!({
                    "turn": turn,
                    "tool": rec.tool,
                    "arguments_digest": args_digest,
                    "is_error": rec.result.is_error,
                    "reused": reused,
                }));
                messages.push(Message::tool(
                    &call.id,
                    rec.result.text.clone(),
                    rec.result.is_error,
                ));
            }
            let called: Vec<String> = tool_log
                .iter()
                .filter(|t| t["turn"] == turn)
                .map(|t| {
                    let tool = t["tool"].as_str().unwrap_or("?");
                    if t["is_error"] == true {
                        format!("{tool} (error)")
                    } else {
                        tool.to_string()
                    }
                })
                .collect();
            report(
                cx,
                turn,
                format!("turn {turn}: {} called {}", a.model, called.join(", ")),
                turn_data,
            )
            .await?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_huge_tool_result_is_cut_to_what_a_record_and_a_model_take() {
        let big = "é".repeat(MAX_TOOL_TEXT); // two bytes each: the cut falls inside one
        let r = bounded(ToolResult {
            text: big.clone(),
            is_error: false,
            output: json!({ "blob": "x".repeat(MAX_TOOL_OUTPUT) }),
        });
        assert!(r.text.len() < MAX_TOOL_TEXT + 64);
        assert!(
            r.text.ends_with("more bytes cut]"),
            "{}",
            &r.text[r.text.len() - 40..]
        );
        assert_eq!(r.output["cut"], true);
        assert!(serde_json::to_vec(&r).unwrap().len() < 1024 * 1024 / 4);
        let small = bounded(ToolResult {
            text: "ok".into(),
            is_error: false,
            output: json!({"a": 1}),
        });
        assert_eq!(small.text, "ok");
        assert_eq!(small.output, json!({"a": 1}));
    }
}

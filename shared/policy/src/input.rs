//! The input document a policy sees as `input`, and the decision it comes to.

use serde::{Deserialize, Serialize};

/// What is about to happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A workflow step is about to be dispatched.
    Step,
    /// A model is about to be called.
    Model,
    /// A tool is about to be called.
    Tool,
}

/// The run the action belongs to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunRef {
    /// Run id.
    pub id: String,
    /// Workflow name.
    pub workflow: String,
    /// Workflow version the run is pinned to.
    pub version: u32,
}

/// The step the action belongs to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepRef {
    /// Step id in the workflow.
    pub id: String,
    /// Node type (`transform`, `llm`, `tool`, ...).
    #[serde(rename = "type")]
    pub kind: String,
}

/// The model about to be called.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelRef {
    /// Model name as the provider knows it.
    pub name: String,
    /// Provider name (`openai`, `anthropic`, ...).
    pub provider: String,
}

/// The tool about to be called.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolRef {
    /// Tool name (`payments.refund`).
    pub name: String,
}

/// What was spent so far, before this action.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spend {
    /// US dollars spent by this run.
    #[serde(default)]
    pub run_usd: f64,
    /// Tokens used by this run.
    #[serde(default)]
    pub run_tokens: u64,
    /// US dollars spent by the tenant in the current budget period.
    #[serde(default)]
    pub tenant_usd: f64,
    /// Tokens used by the tenant in the current budget period.
    #[serde(default)]
    pub tenant_tokens: u64,
}

/// The `input` document of a policy evaluation. Absent parts are `null` in Rego, so a rule
/// reading them is undefined rather than an error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Input {
    /// What is about to happen.
    pub kind: Kind,
    /// Tenant the run belongs to; picks the policy set.
    pub tenant: String,
    /// The user who started the run, when known.
    #[serde(default)]
    pub user: Option<String>,
    /// The run.
    #[serde(default)]
    pub run: Option<RunRef>,
    /// The step.
    #[serde(default)]
    pub step: Option<StepRef>,
    /// The model, for `kind: model`.
    #[serde(default)]
    pub model: Option<ModelRef>,
    /// The tool, for `kind: tool`.
    #[serde(default)]
    pub tool: Option<ToolRef>,
    /// The arguments of the call (tool arguments, the step's input), as JSON.
    #[serde(default)]
    pub arguments: Option<serde_json::Value>,
    /// Spend so far.
    #[serde(default)]
    pub spend: Option<Spend>,
}

impl Input {
    /// An input about an action inside a step of a run: the kind, the tenant, the run
    /// (`id`, workflow, version) and the step (`id`, node type).
    pub fn in_step(kind: Kind, tenant: &str, run: RunRef, step: StepRef) -> Self {
        Input {
            run: Some(run),
            step: Some(step),
            ..Input::new(kind, tenant)
        }
    }

    /// An input with only the kind and the tenant.
    pub fn new(kind: Kind, tenant: impl Into<String>) -> Self {
        Input {
            kind,
            tenant: tenant.into(),
            user: None,
            run: None,
            step: None,
            model: None,
            tool: None,
            arguments: None,
            spend: None,
        }
    }
}

/// How an evaluation came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// No policy objected.
    Allow,
    /// A policy denied the action (or failed to evaluate: policies fail closed).
    Deny,
    /// A policy asks a human to approve the action first.
    RequireApproval,
}

impl Outcome {
    /// `allow`, `deny` or `require_approval`, as in the audit trail.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Allow => "allow",
            Outcome::Deny => "deny",
            Outcome::RequireApproval => "require_approval",
        }
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The decision of a tenant's policy set on one [`Input`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    /// Deny wins over require_approval, which wins over allow.
    pub outcome: Outcome,
    /// The reason the deciding policy gave (its first, in sorted order); `None` on allow.
    pub reason: Option<String>,
    /// The id of the module that decided (`tool_tenants` for `package aob.policies.tool_tenants`);
    /// `None` on allow.
    pub policy_id: Option<String>,
    /// A short digest of the tenant's policy set (`none` when it has no policies), for the
    /// audit trail: two decisions with the same version were taken by the same Rego text.
    pub version: String,
}

impl Decision {
    /// Allowed by the policy set of `version`.
    pub fn allow(version: impl Into<String>) -> Self {
        Decision {
            outcome: Outcome::Allow,
            reason: None,
            policy_id: None,
            version: version.into(),
        }
    }

    /// A `require_approval` decision on `what` that a person has approved (`approved` lists
    /// the approved actions): the action may go on.
    pub fn approved_by(&self, what: &str, approved: &[String]) -> bool {
        self.outcome == Outcome::RequireApproval && approved.iter().any(|a| a == what)
    }

    /// True unless denied or waiting for approval.
    pub fn is_allowed(&self) -> bool {
        self.outcome == Outcome::Allow
    }

    /// The step error that stops `what` (`tool payments.refund`, `model gpt-4o`, `step
    /// draft`), or `None` when it may go on. A denial is terminal with the policy's reason.
    /// An action that needs approval does not run either: the engine turns this refusal
    /// into an approval request on the step, and runs the step again once a person approved
    /// (the action is then in the task's `approved` list, see [`Decision::approved_by`]).
    pub fn refusal(&self, what: &str) -> Option<aob_model::wire::StepError> {
        let by = match &self.policy_id {
            Some(id) => format!("policy {id} (version {})", self.version),
            None => format!("policies (version {})", self.version),
        };
        let reason = self.reason.as_deref().unwrap_or("no reason given");
        let message = match self.outcome {
            Outcome::Allow => return None,
            Outcome::Deny => format!("{what} denied by {by}: {reason}"),
            Outcome::RequireApproval => {
                format!("{what} requires approval by {by}: {reason}; it was not run")
            }
        };
        Some(
            aob_model::wire::StepError::terminal(message).with_details(serde_json::json!({
                "policy": {
                    "outcome": self.outcome.as_str(),
                    "policy_id": self.policy_id,
                    "version": self.version,
                    "reason": self.reason,
                    "action": what,
                }
            })),
        )
    }

    /// The `policy_id` column of the decision: the deciding module and the set's version
    /// (`spend_cap@1a2b3c4d5e6f`), or only the version on allow (`@1a2b3c4d5e6f`).
    pub fn column(&self) -> String {
        match &self.policy_id {
            Some(id) => format!("{id}@{}", self.version),
            None => format!("@{}", self.version),
        }
    }

    /// Writes the decision into an audit record: `policy_id` (the deciding module, or the
    /// set's version on allow: `<id>@<version>`), `policy_result`, the reason and what was
    /// decided about.
    pub fn fill(&self, what: &str, r: &mut aob_model::audit::DecisionRecord) {
        r.policy_id = Some(self.column());
        r.policy_result = Some(self.outcome.as_str().to_string());
        r.decision = Some(format!("{what}: {}", self.outcome.as_str()));
        r.reason.clone_from(&self.reason);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_input_parses_serializes_and_parses_again() {
        let text = r#"{
            "kind": "tool", "tenant": "acme", "user": "ada",
            "run": {"id": "r1", "workflow": "refunds", "version": 3},
            "step": {"id": "refund", "type": "tool"},
            "model": null, "tool": {"name": "payments.refund"},
            "arguments": {"amount": 1200},
            "spend": {"run_usd": 0.12, "run_tokens": 900, "tenant_usd": 4.5, "tenant_tokens": 70000}
        }"#;
        let input: Input = serde_json::from_str(text).unwrap();
        assert_eq!(input.kind, Kind::Tool);
        assert_eq!(input.step.as_ref().unwrap().kind, "tool");
        let again: Input = serde_json::from_value(serde_json::to_value(&input).unwrap()).unwrap();
        assert_eq!(again, input);
        // Absent parts are written as null, so policies see every key.
        let minimal = serde_json::to_value(Input::new(Kind::Step, "acme")).unwrap();
        assert_eq!(minimal["spend"], serde_json::Value::Null);
        assert_eq!(minimal["kind"], "step");
    }

    #[test]
    fn unknown_fields_are_refused() {
        let err = serde_json::from_str::<Input>(r#"{"kind": "tool", "tenant": "a", "tol": {}}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("tol"), "{err}");
    }
}

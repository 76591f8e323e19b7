//! Policy before a call: the tenant's Rego policies are asked before every model call and
//! every tool call, with what the run spent so far; each decision is an audit record of
//! its own, and a denial (or a call that needs approval) stops the call with the policy's
//! reason.

use aob_model::audit::AuditKind;
use aob_model::wire::StepError;
use aob_policy::{Input, Kind, Policies, Spend};
use aob_runtime::context::Context;

use crate::gateway::Caller;
use crate::ledger::{self, Ledgers};

/// The policies and where spending is counted.
#[derive(Clone)]
pub struct Guard {
    /// The tenants' policies.
    pub policies: Policies,
    /// The budget ledgers, for `spend` (without them, policies see no spend).
    pub ledgers: Option<Ledgers>,
}

impl std::fmt::Debug for Guard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Guard")
    }
}

/// What is about to be called.
#[derive(Debug, Clone)]
pub enum Call<'a> {
    /// A model, by configured name, and its provider.
    Model {
        /// Name.
        name: &'a str,
        /// Provider.
        provider: &'a str,
    },
    /// A tool, by configured name.
    Tool {
        /// Name.
        name: &'a str,
    },
}

impl Guard {
    /// No policies: everything is allowed and nothing recorded.
    pub fn none() -> Self {
        Guard {
            policies: Policies::none(),
            ledgers: None,
        }
    }

    /// The policies of `AOB_POLICY_DIR` and the `AOB_POLICIES` bucket (reloaded on every
    /// change), and the ledgers of the `AOB_LEDGER` bucket, on `client`'s server.
    pub async fn open(client: &async_nats::Client) -> Result<Self, crate::kv::StoreError> {
        let js = async_nats::jetstream::new(client.clone());
        // The watch task lives as long as the policies' handles.
        let (policies, _watch) = Policies::from_env(&js)
            .await
            .map_err(|e| crate::kv::StoreError(format!("policies: {e}")))?;
        let ledgers = js.get_key_value(aob_streams::LEDGER).await.map_err(|e| {
            crate::kv::StoreError(format!(
                "opening bucket {} (run `aob streams apply`): {e}",
                aob_streams::LEDGER
            ))
        })?;
        Ok(Guard {
            policies,
            ledgers: Some(Ledgers::new(ledgers)),
        })
    }

    /// What the run spent so far (its ledger counts every model call, budget or not).
    pub async fn run_spend(&self, tenant: &str, run: &str) -> Result<Spend, StepError> {
        let Some(ledgers) = &self.ledgers else {
            return Ok(Spend::default());
        };
        let l = ledgers
            .get(&ledger::Scope::run(tenant, run, ledger::UNLIMITED))
            .await
            .map_err(|e| StepError::retryable(e.0))?;
        Ok(Spend {
            run_usd: l.spent.usd,
            run_tokens: l.spent.tokens,
            ..Spend::default()
        })
    }

    /// Asks the policies of the caller's tenant about `call` (when it has any), records the
    /// decision under `suffix` on the attempt's context, and returns the error that stops
    /// the call, if it may not go. Without `spend`, the run's is read. An allowed call gets
    /// the decision back (to put on the call's own record); `None` when the tenant has no
    /// policies.
    pub async fn check(
        &self,
        cx: &Context,
        task: &Caller,
        call: Call<'_>,
        arguments: Option<serde_json::Value>,
        spend: Option<Spend>,
        suffix: &str,
    ) -> Result<Option<aob_policy::Decision>, StepError> {
        if self.policies.version(&task.tenant) == "none" {
            return Ok(None);
        }
        let spend = match spend {
            Some(s) => s,
            None => self.run_spend(&task.tenant, &task.run_id).await?,
        };
        let kind = match call {
            Call::Model { .. } => Kind::Model,
            Call::Tool { .. } => Kind::Tool,
        };
        let mut input = Input::in_step(
            kind,
            &task.tenant,
            aob_policy::RunRef {
                id: task.run_id.clone(),
                workflow: task.workflow.clone(),
                version: task.version,
            },
            aob_policy::StepRef {
                id: task.step.clone(),
                kind: task.node_type.clone(),
            },
        );
        let what = match call {
            Call::Model { name, provider } => {
                input.model = Some(aob_policy::ModelRef {
                    name: name.to_string(),
                    provider: provider.to_string(),
                });
                format!("model {name}")
            }
            Call::Tool { name } => {
                input.tool = Some(aob_policy::ToolRef {
                    name: name.to_string(),
                });
                format!("tool {name}")
            }
        };
        input.arguments = arguments;
        input.spend = Some(spend);
        let decision = self.policies.evaluate(&input);
        let approved = decision.approved_by(&what, &task.approved);
        cx.record(AuditKind::PolicyDecision, suffix, |r| {
            decision.fill(&what, r);
            if approved {
                r.decision = Some(format!("{what}: require_approval, approved by a person"));
            }
            if let Call::Model { name, provider } = call {
                r.model = Some(name.to_string());
                r.provider = Some(provider.to_string());
            }
        });
        if approved {
            return Ok(Some(decision));
        }
        match decision.refusal(&what) {
            Some(e) => Err(e),
            None => Ok(Some(decision)),
        }
    }
}

//! One model call through the gateway: choose a model by the route, reuse a recorded
//! answer if there is one, else check the breaker, the shared rate limits and the budgets,
//! call the provider (streaming if asked), record the answer, settle the budget.

use std::sync::Arc;
use std::time::{Duration, Instant};

use aob_model::wire::StepError;
use aob_runtime::context::Context;
use aob_runtime::secrets::Secrets;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc::UnboundedSender;

use crate::breaker::{Breakers, Latency};
use crate::chat::{ChatRequest, ChatResponse, ProviderError, TokenUsage};
use crate::config::{BreakerConfig, Config, ModelConfig, Route, Strategy};
use crate::ledger::{self, Amount, Ledgers};
use crate::limits::{self, Windows};
use crate::policy::{Call, Guard};
use crate::provider::{Endpoint, Provider};
use crate::record::{self, Recorded, Recorder};

/// Builds the client of one endpoint (the real protocols; tests may count calls).
pub type Connect = Arc<dyn Fn(Endpoint) -> Box<dyn Provider> + Send + Sync>;

/// The gateway's shared state: configuration, clients, and the stores that make calls
/// durable, budgets and limits hold.
pub struct Gateway {
    /// The configuration.
    pub config: Arc<Config>,
    connect: Connect,
    secrets: Secrets,
    breakers: Breakers,
    latency: Latency,
    ledgers: Ledgers,
    windows: Windows,
    recorder: Recorder,
    guard: Guard,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway").finish_non_exhaustive()
    }
}

/// Who asks, and where in their run.
#[derive(Debug, Clone)]
pub struct Caller {
    /// Tenant.
    pub tenant: String,
    /// Run.
    pub run_id: String,
    /// Workflow name.
    pub workflow: String,
    /// Workflow version.
    pub version: u32,
    /// The step's id.
    pub step: String,
    /// The step's node type (`llm`, `agent`).
    pub node_type: String,
    /// The step and its position (`step`, item, iteration) and, within the step, which
    /// call (`repair 1`, `turn 3`): calls are recorded under it.
    pub scope: String,
    /// Only recorded answers may be used: a replay never calls a live model.
    pub replay: bool,
    /// Actions a person approved for this step (`tool payments.refund`, `model gpt-4o`):
    /// a policy's `require_approval` on them is satisfied.
    pub approved: Vec<String>,
}

impl Caller {
    /// The caller of a task: its run and step; `scope` names the call within the step
    /// (`<step>/0`, `<step>/turn3`).
    pub fn of(task: &aob_model::wire::Task, scope: String) -> Self {
        Caller {
            tenant: task.tenant.clone(),
            run_id: task.run_id.clone(),
            workflow: task.workflow.clone(),
            version: task.version,
            step: task.at.step.clone(),
            node_type: task.node_type.clone(),
            scope,
            replay: false,
            approved: aob_model::wire::approved_actions(&task.context),
        }
    }
}

/// A model's answer, with what it cost.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Answer {
    /// The configured model name.
    pub model: String,
    /// Its provider.
    pub provider: String,
    /// The answer.
    pub response: ChatResponse,
    /// Cost in US dollars (of the original call, when reused).
    pub cost_usd: f64,
    /// The answer was recorded earlier and reused: nothing was paid now.
    pub reused: bool,
    /// Digest of the request (the recorded call's key).
    pub digest: String,
    /// How long the provider took, in ms.
    pub took_ms: u64,
    /// Models tried before this one, and why each was passed over.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub passed_over: Vec<String>,
    /// The policy decision that allowed the call (none when the tenant has no policies,
    /// or the answer was reused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<aob_policy::Decision>,
}

/// An upper bound of the prompt's tokens: a token is at least one byte in every
/// tokenizer in use, plus a few tokens of framing per message.
pub fn input_bound(req: &ChatRequest) -> u64 {
    let mut bytes = req.system.as_ref().map_or(0, String::len) as u64;
    for m in &req.messages {
        bytes += m.content.len() as u64 + 8;
        for c in &m.tool_calls {
            bytes += c.name.len() as u64 + c.arguments.to_string().len() as u64 + 8;
        }
    }
    for t in &req.tools {
        bytes += t.name.len() as u64 + t.description.len() as u64;
        bytes += t.input_schema.to_string().len() as u64 + 8;
    }
    bytes + 16
}

impl Gateway {
    /// A gateway over `config` whose stores live in the given buckets.
    pub fn new(
        config: Config,
        connect: Connect,
        secrets: Secrets,
        ledgers: Ledgers,
        windows: Windows,
        recorder: Recorder,
    ) -> Self {
        Gateway {
            config: Arc::new(config),
            connect,
            secrets,
            breakers: Breakers::default(),
            latency: Latency::default(),
            ledgers,
            windows,
            recorder,
            guard: Guard::none(),
        }
    }

    /// The same gateway, asking `policies` before every model call.
    pub fn with_policies(mut self, policies: aob_policy::Policies) -> Self {
        self.guard = Guard {
            policies,
            ledgers: Some(self.ledgers.clone()),
        };
        self
    }

    /// The policies it asks, with its ledgers (the agent asks them before tool calls).
    pub fn guard(&self) -> &Guard {
        &self.guard
    }

    /// A gateway over `config` whose stores are the topology's buckets on `client`'s
    /// server, calling providers over the real protocols.
    pub async fn open(
        client: &async_nats::Client,
        config: Config,
        secrets: Secrets,
    ) -> Result<Self, crate::kv::StoreError> {
        let js = async_nats::jetstream::new(client.clone());
        let bucket = |name: &'static str| {
            let js = js.clone();
            async move {
                js.get_key_value(name).await.map_err(|e| {
                    crate::kv::StoreError(format!(
                        "opening bucket {name} (run `aob streams apply`): {e}"
                    ))
                })
            }
        };
        let http = reqwest::Client::builder()
            .user_agent(concat!("aob-llm/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| crate::kv::StoreError(format!("building the HTTP client: {e}")))?;
        let connect: Connect = Arc::new(move |e| crate::provider::connect(e, http.clone()));
        // The watch task lives as long as the policies' handles: as long as the gateway.
        let (policies, _watch) = aob_policy::Policies::from_env(&js)
            .await
            .map_err(|e| crate::kv::StoreError(format!("policies: {e}")))?;
        Ok(Gateway::new(
            config,
            connect,
            secrets,
            Ledgers::new(bucket(aob_streams::LEDGER).await?),
            Windows::new(bucket(aob_streams::LIMITS).await?),
            Recorder::new(bucket(aob_streams::CALLS).await?),
        )
        .with_policies(policies))
    }

    /// The recorded calls.
    pub fn recorder(&self) -> &Recorder {
        &self.recorder
    }

    /// The breakers (for tests and status).
    pub fn breakers(&self) -> &Breakers {
        &self.breakers
    }

    /// The ledgers.
    pub fn ledgers(&self) -> &Ledgers {
        &self.ledgers
    }

    /// The budgets that apply to a call of `caller`.
    pub fn budget_scopes(&self, caller: &Caller, now_ms: u64) -> Vec<ledger::Scope> {
        let c = &self.config;
        let mut scopes = Vec::new();
        let tenant_budget = c
            .tenants
            .get(&caller.tenant)
            .and_then(|t| t.budget)
            .or(c.budgets.tenant);
        if let Some(b) = tenant_budget {
            scopes.push(ledger::Scope::tenant(&caller.tenant, b, now_ms));
        }
        if let Some(b) = c.budgets.workflows.get(&caller.workflow) {
            scopes.push(ledger::Scope::workflow(
                &caller.tenant,
                &caller.workflow,
                *b,
                now_ms,
            ));
        }
        // Without a limit, the run's ledger is kept for the tenant's policies (they read
        // what a run spent); a tenant without policies saves the two round trips.
        match c.budgets.run {
            Some(b) => scopes.push(ledger::Scope::run(&caller.tenant, &caller.run_id, b)),
            None if self.guard.policies.version(&caller.tenant) != "none" => scopes.push(
                ledger::Scope::run(&caller.tenant, &caller.run_id, ledger::UNLIMITED),
            ),
            None => {}
        }
        scopes
    }

    /// The candidates of a route in the order they are tried.
    fn order(&self, tenant: &str, route: &Route) -> Vec<String> {
        let (strategy, mut names) = route.candidates();
        match strategy {
            Strategy::Fixed => names.truncate(1),
            Strategy::Fallback => {}
            Strategy::Cheapest => names.sort_by(|a, b| {
                let p = |n: &str| {
                    self.config
                        .model(tenant, n)
                        .map_or(f64::MAX, |m| m.price.input + m.price.output)
                };
                p(a).total_cmp(&p(b))
            }),
            Strategy::Fastest => names.sort_by(|a, b| {
                let l = |n: &str| self.latency.of(n).unwrap_or(0.0);
                l(a).total_cmp(&l(b))
            }),
        }
        names
    }

    /// Calls a model for `caller` by `route` (the tenant's default when `None`). `req`'s
    /// `model` is set per candidate; its `max_tokens` is capped by the model's limit.
    pub async fn call(
        &self,
        caller: &Caller,
        route: Option<&Route>,
        req: &ChatRequest,
        stream: Option<&UnboundedSender<String>>,
        cx: &Context,
    ) -> Result<Answer, StepError> {
        let route = match route.or_else(|| self.config.default_route(&caller.tenant)) {
            Some(r) => r.clone(),
            None => {
                return Err(StepError::terminal(format!(
                    "no model: the step names none and tenant {} has no default (set `default` in the models file)",
                    caller.tenant
                )));
            }
        };
        let names = self.order(&caller.tenant, &route);
        let mut planned = Vec::with_capacity(names.len());
        for name in &names {
            let Some(m) = self.config.model(&caller.tenant, name) else {
                return Err(StepError::terminal(format!(
                    "unknown model `{name}` (known to tenant {}: {})",
                    caller.tenant,
                    self.config.model_names(&caller.tenant).join(", ")
                )));
            };
            let mut r = req.clone();
            r.model = m.model_id(name).to_string();
            r.max_tokens = if r.max_tokens == 0 {
                m.max_output()
            } else {
                r.max_tokens.min(m.max_output())
            };
            let digest = record::digest(&format!("{}\n{name}", caller.scope), &r);
            planned.push((name.clone(), m, r, digest));
        }
        // A recorded answer from any candidate wins: after a crash the call that was paid
        // for is used, whichever model it was.
        for (name, _, _, digest) in &planned {
            let key = Recorder::key(&caller.tenant, &caller.run_id, digest);
            let got: Option<Recorded> = self
                .recorder
                .get(&key)
                .await
                .map_err(|e| StepError::retryable(e.0))?;
            if let Some(rec) = got {
                // A crash between recording and settling left the hold: settle it now.
                let now = aob_runtime::now_ms();
                let scopes = self.budget_scopes(caller, now);
                let spent = Amount {
                    usd: rec.cost_usd,
                    tokens: rec.response.usage.input + rec.response.usage.output,
                };
                self.ledgers
                    .settle(&scopes, &key, spent)
                    .await
                    .map_err(|e| StepError::retryable(e.0))?;
                return Ok(Answer {
                    model: name.clone(),
                    provider: rec.provider,
                    response: rec.response,
                    cost_usd: rec.cost_usd,
                    reused: true,
                    digest: digest.clone(),
                    took_ms: rec.took_ms,
                    passed_over: Vec::new(),
                    policy: None,
                });
            }
        }
        if caller.replay {
            return Err(StepError::terminal(format!(
                "replay: no recorded answer for this call (models {}, digest {}); a replay never calls a live model",
                names.join(", "),
                planned.first().map_or("-", |p| p.3.as_str())
            )));
        }
        let mut passed_over = Vec::new();
        let mut last: Option<StepError> = None;
        let mut first_refusal: Option<StepError> = None;
        for (name, m, r, digest) in planned {
            match self
                .try_model(caller, &name, m, &r, &digest, stream, cx)
                .await
            {
                Ok(mut a) => {
                    a.passed_over = passed_over;
                    return Ok(a);
                }
                Err(Attempt::Stop(e)) => return Err(e),
                Err(Attempt::Refused(e)) => {
                    passed_over.push(format!("{name}: {}", e.message));
                    first_refusal.get_or_insert(e);
                }
                Err(Attempt::Next(e)) => {
                    passed_over.push(format!("{name}: {}", e.message));
                    last = Some(e);
                }
            }
        }
        // Out of candidates: a budget refusal is final; otherwise the last trouble decides.
        let e = first_refusal.or(last).unwrap_or_else(|| {
            StepError::terminal("no model to call: the route is empty".to_string())
        });
        let message = if passed_over.len() > 1 {
            format!("every model failed: {}", passed_over.join("; "))
        } else {
            e.message.clone()
        };
        Err(StepError { message, ..e })
    }

    #[allow(clippy::too_many_arguments)]
    async fn try_model(
        &self,
        caller: &Caller,
        name: &str,
        m: &ModelConfig,
        req: &ChatRequest,
        digest: &str,
        stream: Option<&UnboundedSender<String>>,
        cx: &Context,
    ) -> Result<Answer, Attempt> {
        let provider = m.provider_name();
        let policy = self
            .ask_policies(caller, name, &provider, req, digest, cx)
            .await?;
        let pcfg = self
            .config
            .providers
            .get(&provider)
            .copied()
            .unwrap_or_default();
        let bcfg: BreakerConfig = pcfg.breaker.unwrap_or_default();
        let input = input_bound(req);
        // The bound is generous (a token per byte); only refuse what cannot fit whatever
        // the tokenizer (four bytes a token).
        if let Some(window) = m.context_window
            && input / 4 > window
        {
            return Err(Attempt::Next(StepError::terminal(format!(
                "the prompt (about {} tokens) does not fit model {name}'s context window of {window}",
                input / 4
            ))));
        }
        if let Err(open) = self.breakers.admit(&provider, &bcfg) {
            return Err(Attempt::Next(
                StepError::retryable(open.to_string()).retry_after(open.retry_after),
            ));
        }
        let now = aob_runtime::now_ms();
        let worst_tokens = input + u64::from(req.max_tokens);
        let lscopes = self.limit_scopes(&caller.tenant, name, m, &provider);
        match self.windows.acquire(&lscopes, worst_tokens, now).await {
            Ok(Ok(())) => {}
            Ok(Err(ex)) => {
                return Err(Attempt::Next(
                    StepError::retryable(ex.to_string()).retry_after(ex.retry_after),
                ));
            }
            Err(e) => return Err(Attempt::Stop(StepError::retryable(e.0))),
        }
        let key = Recorder::key(&caller.tenant, &caller.run_id, digest);
        let bscopes = self.budget_scopes(caller, now);
        let worst = Amount {
            usd: m.price.cost(&TokenUsage {
                input,
                output: u64::from(req.max_tokens),
                cached_input: 0,
            }),
            tokens: worst_tokens,
        };
        let hold_for = m.timeout() * 2 + Duration::from_secs(60);
        match self
            .ledgers
            .reserve(&bscopes, &key, worst, hold_for, now)
            .await
        {
            Ok(Ok(())) => {}
            Ok(Err(refusal)) => {
                let _ = self.windows.correct(&lscopes, worst_tokens, 0, now).await;
                return Err(Attempt::Refused(StepError::terminal(refusal.to_string())));
            }
            Err(e) => return Err(Attempt::Stop(StepError::retryable(e.0))),
        }
        let api_key = match &m.api_key {
            None => None,
            Some(k) => match self.secrets.substitute(k) {
                Ok((v, _)) => Some(v),
                Err(e) => {
                    let _ = self.ledgers.release(&bscopes, &key).await;
                    return Err(Attempt::Stop(StepError::terminal(format!(
                        "model {name}: api_key: {e}"
                    ))));
                }
            },
        };
        let base_url = match url::Url::parse(&m.base_url) {
            Ok(u) => u,
            Err(e) => {
                let _ = self.ledgers.release(&bscopes, &key).await;
                return Err(Attempt::Stop(StepError::terminal(format!(
                    "model {name}: base_url: {e}"
                ))));
            }
        };
        let client = (self.connect)(Endpoint {
            protocol: m.protocol,
            base_url,
            api_key,
            timeout: m.timeout(),
        });
        let started = Instant::now();
        let got = client.chat(req, stream).await;
        let took = started.elapsed();
        match got {
            Ok(response) => {
                self.breakers.record(&provider, &bcfg, true);
                self.latency.observe(name, took);
                let cost = m.price.cost(&response.usage);
                let rec = Recorded {
                    model: name.to_string(),
                    provider: provider.clone(),
                    response: response.clone(),
                    cost_usd: cost,
                    took_ms: took.as_millis() as u64,
                    at_ms: aob_runtime::now_ms(),
                };
                // Recorded before the result is sent: from then on, a retry pays nothing
                // (and settles the holds itself, should this process stop first).
                let used = response.usage.input + response.usage.output;
                let spent = Amount {
                    usd: cost,
                    tokens: used,
                };
                let (recorded, settled, _) = tokio::join!(
                    self.recorder.put(&key, &rec),
                    self.ledgers.settle(&bscopes, &key, spent),
                    self.windows.correct(&lscopes, worst_tokens, used, now),
                );
                let kept = recorded.map_err(|e| Attempt::Stop(StepError::retryable(e.0)))?;
                settled.map_err(|e| Attempt::Stop(StepError::retryable(e.0)))?;
                // A duplicate delivery recorded its answer first: that one is the answer.
                let response = if kept {
                    response
                } else {
                    self.recorder
                        .get::<Recorded>(&key)
                        .await
                        .map_err(|e| Attempt::Stop(StepError::retryable(e.0)))?
                        .map_or(response, |r| r.response)
                };
                Ok(Answer {
                    model: name.to_string(),
                    provider,
                    response,
                    cost_usd: cost,
                    reused: false,
                    digest: digest.to_string(),
                    took_ms: took.as_millis() as u64,
                    passed_over: Vec::new(),
                    policy,
                })
            }
            Err(e) => {
                if e.is_retryable() {
                    self.breakers.record(&provider, &bcfg, false);
                }
                let _ = self.ledgers.release(&bscopes, &key).await;
                let _ = self.windows.correct(&lscopes, worst_tokens, 0, now).await;
                Err(Attempt::Next(provider_error(name, &e)))
            }
        }
    }

    /// Asks the tenant's policies about calling model `name` (when it has any), with what
    /// the run and the tenant spent, and records the decision; a refusal is returned as the
    /// step error that stops the call.
    async fn ask_policies(
        &self,
        caller: &Caller,
        name: &str,
        provider: &str,
        req: &ChatRequest,
        digest: &str,
        cx: &Context,
    ) -> Result<Option<aob_policy::Decision>, Attempt> {
        if self.guard.policies.version(&caller.tenant) == "none" {
            return Ok(None);
        }
        let mut spend = aob_policy::Spend::default();
        for scope in self.budget_scopes(caller, aob_runtime::now_ms()) {
            let l = self
                .ledgers
                .get(&scope)
                .await
                .map_err(|e| Attempt::Stop(StepError::retryable(e.0)))?;
            if scope.key.starts_with("run.") {
                spend.run_usd = l.spent.usd;
                spend.run_tokens = l.spent.tokens;
            } else if scope.key.starts_with("tenant.") {
                spend.tenant_usd = l.spent.usd;
                spend.tenant_tokens = l.spent.tokens;
            }
        }
        let arguments = serde_json::json!({
            "max_tokens": req.max_tokens,
            "tools": req.tools.iter().map(|t| t.name.clone()).collect::<Vec<_>>(),
        });
        match self
            .guard
            .check(
                cx,
                caller,
                Call::Model { name, provider },
                Some(arguments),
                Some(spend),
                &format!("policy.{}", &digest[..16]),
            )
            .await
        {
            Ok(d) => Ok(d),
            Err(e) if e.class == aob_model::wire::ErrorClass::Terminal => Err(Attempt::Refused(e)),
            Err(e) => Err(Attempt::Stop(e)),
        }
    }

    fn limit_scopes(
        &self,
        tenant: &str,
        name: &str,
        m: &ModelConfig,
        provider: &str,
    ) -> Vec<limits::Scope> {
        let mut v = Vec::new();
        if let Some(p) = self.config.providers.get(provider)
            && p.limits.is_set()
        {
            v.push(limits::Scope::new("provider", provider, p.limits));
        }
        if m.limits.is_set() {
            v.push(limits::Scope::new("model", name, m.limits));
        }
        if let Some(t) = self.config.tenants.get(tenant)
            && t.limits.is_set()
        {
            v.push(limits::Scope::new("tenant", tenant, t.limits));
        }
        v
    }
}

/// How one candidate came out, other than an answer.
enum Attempt {
    /// Try the next candidate.
    Next(StepError),
    /// Refused by a budget: try the next (a cheaper model may fit), but this is final if
    /// none does.
    Refused(StepError),
    /// Stop here (the stores failed, or the configuration is wrong).
    Stop(StepError),
}

/// A provider's error as a step error: retryable unless the request itself was refused;
/// a rate limit asks for the wait the provider named.
pub fn provider_error(model: &str, e: &ProviderError) -> StepError {
    let msg = format!("model {model}: {e}");
    match e {
        ProviderError::Rejected(_) => StepError::terminal(msg),
        ProviderError::RateLimited {
            retry_after: Some(d),
        } => StepError::retryable(msg).retry_after(*d),
        _ => StepError::retryable(msg),
    }
}

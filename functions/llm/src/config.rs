//! The gateway's configuration: named models, per-tenant defaults and routing, budgets and
//! rate limits. One YAML file named by `AOB_MODELS`:
//!
//! ```yaml
//! models:
//!   fast:
//!     protocol: openai                       # or anthropic
//!     base_url: https://api.openai.com/v1
//!     api_key: ${secrets.OPENAI_API_KEY}     # a secret reference, resolved per call
//!     model: gpt-4o-mini                     # the provider's id (default: the name)
//!     price: { input: 0.15, output: 0.60, cached_input: 0.075 }   # USD per million tokens
//!     context_window: 128000
//!     max_output_tokens: 4096
//!     timeout: 60s
//!     limits: { requests_per_minute: 500, tokens_per_minute: 200000 }
//! default: { model: fast }                   # routing when a step names none
//! tenants:
//!   acme:
//!     default: { strategy: fallback, models: [smart, fast] }
//!     limits: { requests_per_minute: 100 }
//!     budget: { usd: 50, tokens: 2000000, period: month }
//! budgets:
//!   tenant: { usd: 100, period: month }      # every tenant without its own
//!   workflows: { support: { usd: 5, period: day } }
//!   run: { usd: 1 }                          # every run
//! providers:
//!   openai: { limits: { requests_per_minute: 3000 }, breaker: { failures: 5, cool_down: 30s } }
//! ```

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use aob_model::definition::Dur;
use serde::{Deserialize, Serialize};

use crate::provider::Protocol;

/// The environment variable naming the configuration file.
pub const ENV: &str = "AOB_MODELS";

/// The whole file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Named models.
    #[serde(default)]
    pub models: BTreeMap<String, ModelConfig>,
    /// Routing for steps that name no model, for tenants without their own.
    #[serde(default)]
    pub default: Option<Route>,
    /// Per-tenant settings.
    #[serde(default)]
    pub tenants: BTreeMap<String, TenantConfig>,
    /// Budgets that apply to every tenant, workflow or run.
    #[serde(default)]
    pub budgets: Budgets,
    /// Per-provider limits and breaker settings, by provider name.
    #[serde(default)]
    pub providers: BTreeMap<String, ProviderConfig>,
}

/// One named model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Wire protocol.
    pub protocol: Protocol,
    /// Base URL of the endpoint.
    pub base_url: String,
    /// The API key: a `${secrets.NAME}` reference (or nothing for a local server).
    #[serde(default)]
    pub api_key: Option<String>,
    /// The provider's model id; defaults to the configured name.
    #[serde(default)]
    pub model: Option<String>,
    /// Provider name, for breakers, limits and the audit (default: the endpoint's host).
    #[serde(default)]
    pub provider: Option<String>,
    /// Prices in USD per million tokens.
    #[serde(default)]
    pub price: Price,
    /// Context window in tokens (a prompt that cannot fit is refused before the call).
    #[serde(default)]
    pub context_window: Option<u64>,
    /// Largest `max_tokens` a step may ask for, and the default (default 1024).
    #[serde(default)]
    pub max_output_tokens: Option<u32>,
    /// Time limit of one call (default 60 s).
    #[serde(default)]
    pub timeout: Option<Dur>,
    /// Rate limits of this model, across every instance of the gateway.
    #[serde(default)]
    pub limits: Limits,
}

impl ModelConfig {
    /// The provider's model id.
    pub fn model_id<'a>(&'a self, name: &'a str) -> &'a str {
        self.model.as_deref().unwrap_or(name)
    }
    /// The provider name: configured, or the endpoint's host.
    pub fn provider_name(&self) -> String {
        if let Some(p) = &self.provider {
            return p.clone();
        }
        url::Url::parse(&self.base_url)
            .ok()
            .and_then(|u| u.host_str().map(str::to_string))
            .unwrap_or_else(|| self.base_url.clone())
    }
    /// Default and largest output tokens.
    pub fn max_output(&self) -> u32 {
        self.max_output_tokens.unwrap_or(DEFAULT_MAX_TOKENS)
    }
    /// Time limit of one call.
    pub fn timeout(&self) -> Duration {
        self.timeout.map_or(DEFAULT_TIMEOUT, |d| d.0)
    }
}

/// `max_tokens` when neither step nor model sets it.
pub const DEFAULT_MAX_TOKENS: u32 = 1024;
/// Time limit of a call when the model sets none.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// Prices in USD per million tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Price {
    /// Per million prompt tokens.
    #[serde(default)]
    pub input: f64,
    /// Per million completion tokens.
    #[serde(default)]
    pub output: f64,
    /// Per million prompt tokens served from the provider's cache (default: `input`).
    #[serde(default)]
    pub cached_input: Option<f64>,
}

impl Price {
    /// The cost of a call that used these tokens.
    pub fn cost(&self, u: &crate::chat::TokenUsage) -> f64 {
        let cached = u.cached_input.min(u.input);
        let fresh = u.input - cached;
        (fresh as f64 * self.input
            + cached as f64 * self.cached_input.unwrap_or(self.input)
            + u.output as f64 * self.output)
            / 1_000_000.0
    }
}

/// Requests and tokens per minute.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Requests per minute.
    #[serde(default)]
    pub requests_per_minute: Option<u64>,
    /// Tokens (in + out) per minute.
    #[serde(default)]
    pub tokens_per_minute: Option<u64>,
}

impl Limits {
    /// Whether any limit is set.
    pub fn is_set(&self) -> bool {
        self.requests_per_minute.is_some() || self.tokens_per_minute.is_some()
    }
}

/// How a step's model is chosen.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Route {
    /// One model, by name.
    Model {
        /// The model.
        model: String,
    },
    /// A strategy over a list of models.
    Strategy {
        /// How to choose.
        strategy: Strategy,
        /// The candidates, in order of preference.
        models: Vec<String>,
    },
}

impl Route {
    /// The candidates in the order they are tried.
    pub fn candidates(&self) -> (Strategy, Vec<String>) {
        match self {
            Route::Model { model } => (Strategy::Fixed, vec![model.clone()]),
            Route::Strategy { strategy, models } => (*strategy, models.clone()),
        }
    }
}

/// A routing strategy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// The first model only.
    Fixed,
    /// In order; the next on an error, a timeout or an open breaker.
    Fallback,
    /// Lowest price first (then as `fallback`).
    Cheapest,
    /// Lowest observed latency first (then as `fallback`).
    Fastest,
}

/// Per-tenant settings.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    /// Routing for steps that name no model.
    #[serde(default)]
    pub default: Option<Route>,
    /// Models only this tenant sees (and overrides of shared ones).
    #[serde(default)]
    pub models: BTreeMap<String, ModelConfig>,
    /// The tenant's rate limits, across all its models.
    #[serde(default)]
    pub limits: Limits,
    /// The tenant's budget (instead of `budgets.tenant`).
    #[serde(default)]
    pub budget: Option<Budget>,
}

/// A spending limit.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Budget {
    /// Most US dollars.
    #[serde(default)]
    pub usd: Option<f64>,
    /// Most tokens (in + out).
    #[serde(default)]
    pub tokens: Option<u64>,
    /// The period it renews over (default `total`: never).
    #[serde(default)]
    pub period: Period,
}

/// What a budget renews over (UTC).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Period {
    /// Never renews.
    #[default]
    Total,
    /// Each UTC day.
    Day,
    /// Each UTC month.
    Month,
}

/// Budgets for every tenant, workflow or run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Budgets {
    /// Each tenant without its own `tenants.<t>.budget`.
    #[serde(default)]
    pub tenant: Option<Budget>,
    /// Per workflow name (in every tenant).
    #[serde(default)]
    pub workflows: BTreeMap<String, Budget>,
    /// Each run (a step's `budget` may lower it).
    #[serde(default)]
    pub run: Option<Budget>,
}

/// Per-provider settings.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    /// Rate limits across all the provider's models.
    #[serde(default)]
    pub limits: Limits,
    /// Circuit breaker.
    #[serde(default)]
    pub breaker: Option<BreakerConfig>,
}

/// When a breaker opens and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerConfig {
    /// Consecutive failures that open it.
    pub failures: u32,
    /// How long it stays open before one trial call (half-open).
    pub cool_down: Dur,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            failures: 5,
            cool_down: Dur(Duration::from_secs(30)),
        }
    }
}

/// A configuration error, naming the file and what is wrong.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {message}")]
pub struct ConfigError {
    /// The file.
    pub file: String,
    /// What is wrong.
    pub message: String,
}

impl Config {
    /// Reads and checks the file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: file.clone(),
            message: e.to_string(),
        })?;
        Config::parse(&text).map_err(|message| ConfigError { file, message })
    }

    /// The file named by `AOB_MODELS`, or an empty configuration when it is unset.
    pub fn from_env() -> Result<Self, ConfigError> {
        match std::env::var_os(ENV) {
            Some(p) if !p.is_empty() => Config::load(Path::new(&p)),
            _ => Ok(Config::default()),
        }
    }

    /// Parses and checks configuration text; the error names the field.
    pub fn parse(text: &str) -> Result<Self, String> {
        let c: Config = serde_yaml_ng::from_str(text).map_err(|e| e.to_string())?;
        c.check()?;
        Ok(c)
    }

    fn check(&self) -> Result<(), String> {
        let check_models = |prefix: &str, models: &BTreeMap<String, ModelConfig>| {
            for (name, m) in models {
                url::Url::parse(&m.base_url)
                    .map_err(|e| format!("{prefix}models.{name}.base_url: {e}"))?;
                if let Some(k) = &m.api_key
                    && !aob_model::nodes::secret_refs(k).is_ok_and(|r| !r.is_empty())
                {
                    return Err(format!(
                        "{prefix}models.{name}.api_key: give a secret reference such as `${{secrets.OPENAI_API_KEY}}`, not the key itself"
                    ));
                }
            }
            Ok::<(), String>(())
        };
        check_models("", &self.models)?;
        let route_ok = |at: &str, r: &Route, extra: &BTreeMap<String, ModelConfig>| {
            let (_, names) = r.candidates();
            if names.is_empty() {
                return Err(format!("{at}: names no model"));
            }
            for n in names {
                if !self.models.contains_key(&n) && !extra.contains_key(&n) {
                    return Err(format!(
                        "{at}: unknown model `{n}` (known: {})",
                        self.models
                            .keys()
                            .chain(extra.keys())
                            .cloned()
                            .collect::<Vec<_>>()
                            .join(", ")
                    ));
                }
            }
            Ok(())
        };
        if let Some(r) = &self.default {
            route_ok("default", r, &BTreeMap::new())?;
        }
        for (t, tc) in &self.tenants {
            check_models(&format!("tenants.{t}."), &tc.models)?;
            if let Some(r) = &tc.default {
                route_ok(&format!("tenants.{t}.default"), r, &tc.models)?;
            }
        }
        Ok(())
    }

    /// The model `name` as tenant `tenant` sees it.
    pub fn model(&self, tenant: &str, name: &str) -> Option<&ModelConfig> {
        self.tenants
            .get(tenant)
            .and_then(|t| t.models.get(name))
            .or_else(|| self.models.get(name))
    }

    /// Every model name tenant `tenant` can use.
    pub fn model_names(&self, tenant: &str) -> Vec<String> {
        let mut names: Vec<String> = self.models.keys().cloned().collect();
        if let Some(t) = self.tenants.get(tenant) {
            names.extend(t.models.keys().cloned());
        }
        names.sort();
        names.dedup();
        names
    }

    /// Routing for a step of `tenant` that names none.
    pub fn default_route(&self, tenant: &str) -> Option<&Route> {
        self.tenants
            .get(tenant)
            .and_then(|t| t.default.as_ref())
            .or(self.default.as_ref())
    }
}

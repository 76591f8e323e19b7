//! `aob-retrieve`: the `retrieve` step. Embeds the rendered query with the knowledge
//! base's model, searches its chunks by exact cosine and answers with the best ones. Each
//! knowledge base is loaded once per version (its manifest's revision) and kept warm.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use aob_kb::embed::Embedder;
use aob_kb::search::Index;
use aob_kb::store::Kbs;
use aob_model::audit::{AuditKind, sha256_hex};
use aob_model::nodes::RetrieveConfig;
use aob_model::wire::{Outcome, StepError, Task};
use aob_runtime::secrets::Secrets;
use serde_json::json;

/// Environment variables the function reads.
pub const ENV_VARS: &[(&str, &str)] = &[
    (
        "AOB_KB_URL",
        "object store of the knowledge bases' chunk files (file://, s3://, gs://, az://)",
    ),
    (
        "AOB_MODELS",
        "models file: embedding models other than all-MiniLM-L6-v2 are OpenAI-compatible models of it",
    ),
    (
        "AOB_EMBED_MODEL_DIR",
        "folder of all-MiniLM-L6-v2 (model.safetensors, tokenizer.json); default: the scripts/setup virtualenv",
    ),
];

/// The embedding models a deployment knows: all-MiniLM-L6-v2 in process, and the
/// OpenAI-compatible models of the models file.
#[derive(Debug, Clone)]
pub struct Embedders {
    models: aob_llm::config::Config,
    secrets: Arc<Secrets>,
    local: Arc<Mutex<Option<Embedder>>>,
    http: reqwest::Client,
}

impl Embedders {
    /// With these models and secrets.
    pub fn new(models: aob_llm::config::Config, secrets: Arc<Secrets>) -> Self {
        Embedders {
            models,
            secrets,
            local: Arc::default(),
            http: reqwest::Client::new(),
        }
    }

    /// The embedder of model `name`; the local model is loaded on first use.
    pub fn get(&self, name: &str) -> Result<Embedder, String> {
        if name == aob_kb::minilm::NAME {
            let mut local = self.local.lock().map_err(|e| e.to_string())?;
            if let Some(e) = local.as_ref() {
                return Ok(e.clone());
            }
            let e = Embedder::local().map_err(|e| e.to_string())?;
            *local = Some(e.clone());
            return Ok(e);
        }
        let m = self.models.models.get(name).ok_or_else(|| {
            format!(
                "no embedding model `{name}`: use {} or a model of the models file (AOB_MODELS)",
                aob_kb::minilm::NAME
            )
        })?;
        if m.protocol != aob_llm::provider::Protocol::Openai {
            return Err(format!(
                "model `{name}` does not speak the OpenAI protocol, which embeddings need"
            ));
        }
        let key = match &m.api_key {
            Some(k) => Some(
                self.secrets
                    .substitute(k)
                    .map_err(|e| format!("model {name}: api_key: {e}"))?
                    .0,
            ),
            None => None,
        };
        Ok(Embedder::Remote {
            name: name.to_string(),
            base_url: m.base_url.clone(),
            key,
            model: m.model.clone().unwrap_or_else(|| name.to_string()),
            http: self.http.clone(),
        })
    }

    /// The models file these embedders were made from.
    pub fn models(&self) -> &aob_llm::config::Config {
        &self.models
    }

    /// What embedding `tokens` tokens with model `name` costs, for a priced model of the
    /// models file (the local model costs nothing: `None`).
    pub fn cost(&self, name: &str, tokens: u64) -> Option<f64> {
        self.models.models.get(name).map(|m| {
            m.price.cost(&aob_llm::chat::TokenUsage {
                input: tokens,
                output: 0,
                cached_input: 0,
            })
        })
    }
}

type Warm = HashMap<(String, String), (u64, Arc<Index>)>;

/// The `retrieve` function.
#[derive(Clone)]
pub struct RetrieveHandler {
    kbs: Kbs,
    embedders: Embedders,
    warm: Arc<Mutex<Warm>>,
    budgets: Option<Arc<aob_llm::gateway::Gateway>>,
}

impl std::fmt::Debug for RetrieveHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RetrieveHandler")
    }
}

impl RetrieveHandler {
    /// A handler over these knowledge bases.
    pub fn new(kbs: Kbs, embedders: Embedders) -> Self {
        RetrieveHandler {
            kbs,
            embedders,
            warm: Arc::default(),
            budgets: None,
        }
    }

    /// Queries embedded by a priced endpoint are held against, then charged to, the
    /// budgets of the model gateway's configuration (tenant, workflow, run), as model
    /// calls are.
    pub fn with_budgets(mut self, gateway: Arc<aob_llm::gateway::Gateway>) -> Self {
        self.budgets = Some(gateway);
        self
    }

    /// A knowledge base at its current version: its manifest is read once, its files only
    /// when the version is new to this process. A missing knowledge base is terminal, a
    /// store that fails retryable.
    pub async fn index(&self, tenant: &str, kb: &str) -> Result<Loaded, StepError> {
        let (manifest, version) = self.kbs.must_get(tenant, kb).await.map_err(|e| match e {
            // No such knowledge base: a retry cannot help. The bucket failing can.
            aob_kb::Error::Document(m) => StepError::terminal(m),
            other => StepError::retryable(other.to_string()),
        })?;
        let key = (tenant.to_string(), kb.to_string());
        let warm = self
            .warm
            .lock()
            .ok()
            .and_then(|w| w.get(&key).cloned())
            .filter(|(r, _)| *r == version);
        let index = match warm {
            Some((_, ix)) => ix,
            None => {
                let ix = Arc::new(
                    self.kbs
                        .load_version(&manifest)
                        .await
                        .map_err(|e| StepError::retryable(e.to_string()))?,
                );
                if let Ok(mut w) = self.warm.lock() {
                    w.insert(key, (version, ix.clone()));
                }
                tracing::info!(%tenant, %kb, chunks = ix.len(), version, "knowledge base loaded");
                ix
            }
        };
        Ok(Loaded {
            index,
            model: manifest.model,
            version,
        })
    }
}

/// A knowledge base in memory.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// Its chunks.
    pub index: Arc<Index>,
    /// Its embedding model.
    pub model: String,
    /// Its version (its manifest's revision).
    pub version: u64,
}

/// What a search found, with what the query cost.
#[derive(Debug, Clone)]
pub struct Found {
    /// The chunks, best first.
    pub hits: Vec<aob_kb::search::Hit>,
    /// The knowledge base's embedding model.
    pub model: String,
    /// The knowledge base's version (its manifest's revision).
    pub version: u64,
    /// Tokens of the query.
    pub tokens: u64,
}

impl RetrieveHandler {
    /// The `top_k` chunks of knowledge base `kb` most like `query`.
    pub async fn search(
        &self,
        tenant: &str,
        kb: &str,
        query: &str,
        top_k: usize,
        filter: &serde_json::Map<String, serde_json::Value>,
        min_score: Option<f32>,
    ) -> Result<Found, StepError> {
        let kb = self.index(tenant, kb).await?;
        self.query(&kb, query, top_k, filter, min_score).await
    }

    /// Embeds `query` with the knowledge base's model and searches it.
    async fn query(
        &self,
        kb: &Loaded,
        query: &str,
        top_k: usize,
        filter: &serde_json::Map<String, serde_json::Value>,
        min_score: Option<f32>,
    ) -> Result<Found, StepError> {
        let embedder = self.embedders.get(&kb.model).map_err(StepError::terminal)?;
        let embedded = embedder
            .embed(&[query.to_string()])
            .await
            .map_err(|e| StepError::retryable(e.to_string()))?;
        let q = embedded.vectors.into_iter().next().unwrap_or_default();
        let hits = kb
            .index
            .search(&q, top_k, filter, min_score)
            .map_err(StepError::terminal)?;
        Ok(Found {
            hits,
            model: kb.model.clone(),
            version: kb.version,
            tokens: embedded.tokens,
        })
    }
}

impl aob_runtime::Handler for RetrieveHandler {
    fn node_type(&self) -> &'static str {
        "retrieve"
    }

    fn env_vars(&self) -> &'static [(&'static str, &'static str)] {
        ENV_VARS
    }

    async fn handle(
        &self,
        task: Task,
        cx: &aob_runtime::context::Context,
    ) -> Result<Outcome, StepError> {
        let c: RetrieveConfig = aob_runtime::parse_config("retrieve", &task.config)?;
        let filter = c.filter.clone().unwrap_or_default();
        let kb = self.index(&task.tenant, &c.kb).await?;
        // A query to a remote endpoint is a paid call: it is held against the budgets first.
        let tokens = c.query.len() as u64 / 3 + 16;
        let held = match (&self.budgets, self.embedders.cost(&kb.model, tokens)) {
            (Some(gw), Some(usd)) => {
                let caller =
                    aob_llm::gateway::Caller::of(&task, format!("{}/embed", task.at.token()));
                let now = aob_runtime::now_ms();
                let scopes = gw.budget_scopes(&caller, now);
                let key = format!("{}.{}.embed.{}", task.tenant, task.run_id, task.at.token());
                let worst = aob_llm::ledger::Amount { usd, tokens };
                match gw
                    .ledgers()
                    .reserve(
                        &scopes,
                        &key,
                        worst,
                        std::time::Duration::from_secs(300),
                        now,
                    )
                    .await
                {
                    Ok(Ok(())) => Some((gw.clone(), scopes, key)),
                    Ok(Err(refusal)) => return Err(StepError::terminal(refusal.to_string())),
                    Err(e) => return Err(StepError::retryable(e.0)),
                }
            }
            _ => None,
        };
        let found = self
            .query(
                &kb,
                &c.query,
                c.top_k.unwrap_or(5) as usize,
                &filter,
                c.min_score,
            )
            .await;
        let found = match (found, &held) {
            (Ok(f), Some((gw, scopes, key))) => {
                let spent = aob_llm::ledger::Amount {
                    usd: self.embedders.cost(&f.model, f.tokens).unwrap_or(0.0),
                    tokens: f.tokens,
                };
                gw.ledgers()
                    .settle(scopes, key, spent)
                    .await
                    .map_err(|e| StepError::retryable(e.0))?;
                f
            }
            (Ok(f), None) => f,
            (Err(e), held) => {
                if let Some((gw, scopes, key)) = held {
                    let _ = gw.ledgers().release(scopes, key).await;
                }
                return Err(e);
            }
        };
        let Found {
            hits,
            model,
            version,
            tokens,
        } = found;
        let query_digest = sha256_hex(c.query.as_bytes());
        let ids: Vec<&str> = hits.iter().map(|h| h.entry.chunk_id.as_str()).collect();
        let cost = self.embedders.cost(&model, tokens);
        cx.set_usage(aob_runtime::context::Usage {
            model: Some(model.clone()),
            tokens_in: Some(tokens),
            cost_usd: cost,
            ..Default::default()
        });
        cx.record(AuditKind::TaskExecuted, "retrieval", |r| {
            r.decision = Some("retrieve".into());
            r.input_digest = Some(query_digest.clone());
            r.reason = Some(format!("{} v{version}: {}", c.kb, ids.join(", ")));
            r.model = Some(model.clone());
        });
        Ok(Outcome::Completed {
            output: json!({
                "kb": c.kb,
                "version": version,
                "model": model,
                "query_digest": query_digest,
                "chunk_ids": ids,
                "chunks": hits,
            }),
        })
    }
}

//! Where embeddings come from: all-MiniLM-L6-v2 in process (no key, no network: what
//! `aob dev` uses), or any OpenAI-compatible `/v1/embeddings` endpoint (OpenAI, Ollama,
//! vLLM, Text Embeddings Inference).

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use crate::minilm::MiniLm;
use crate::{Error, Result};

/// An embedding model.
#[derive(Debug, Clone)]
pub enum Embedder {
    /// all-MiniLM-L6-v2, computed here.
    Local(Arc<MiniLm>),
    /// An OpenAI-compatible endpoint.
    Remote {
        /// The configured name (what knowledge bases record).
        name: String,
        /// `https://api.openai.com/v1` (the `/embeddings` path is added).
        base_url: String,
        /// The API key, if the endpoint wants one.
        key: Option<String>,
        /// The model name the endpoint knows.
        model: String,
        /// The client.
        http: reqwest::Client,
    },
}

/// Texts embedded, with what they cost in tokens (as the endpoint counted them; the local
/// model counts its own).
#[derive(Debug, Clone, PartialEq)]
pub struct Embedded {
    /// One vector per text, in order.
    pub vectors: Vec<Vec<f32>>,
    /// Input tokens.
    pub tokens: u64,
}

impl Embedder {
    /// The local model, loaded from [`crate::minilm::model_dir`].
    pub fn local() -> Result<Self> {
        Ok(Embedder::Local(Arc::new(MiniLm::load(
            &crate::minilm::model_dir()?,
        )?)))
    }

    /// The model's name, as recorded with the chunks.
    pub fn model(&self) -> &str {
        match self {
            Embedder::Local(_) => crate::minilm::NAME,
            Embedder::Remote { name, .. } => name,
        }
    }

    /// Embeds `texts` (in batches, for a remote endpoint).
    pub async fn embed(&self, texts: &[String]) -> Result<Embedded> {
        match self {
            Embedder::Local(m) => {
                let m = m.clone();
                let texts = texts.to_vec();
                tokio::task::spawn_blocking(move || {
                    let tokens = texts.iter().map(|t| t.len() as u64 / 4 + 2).sum();
                    // One thread per core, each on a contiguous share, order kept.
                    let threads = std::thread::available_parallelism()
                        .map_or(1, |n| n.get())
                        .min(texts.len())
                        .max(1);
                    let share = texts.len().div_ceil(threads).max(1);
                    let vectors = std::thread::scope(|s| {
                        let parts: Vec<_> = texts
                            .chunks(share)
                            .map(|part| {
                                let m = &m;
                                s.spawn(move || part.iter().map(|t| m.embed(t)).collect::<Vec<_>>())
                            })
                            .collect();
                        let mut all = Vec::with_capacity(texts.len());
                        for h in parts {
                            all.extend(h.join().map_err(|_| {
                                Error::Embed("the local model stopped on a text".into())
                            })?);
                        }
                        Ok(all)
                    })?;
                    Ok(Embedded { vectors, tokens })
                })
                .await
                .map_err(|e| Error::Embed(format!("the local model stopped: {e}")))?
            }
            Embedder::Remote {
                base_url,
                key,
                model,
                http,
                ..
            } => {
                let mut out = Embedded {
                    vectors: Vec::with_capacity(texts.len()),
                    tokens: 0,
                };
                for batch in texts.chunks(64) {
                    let url = format!("{}/embeddings", base_url.trim_end_matches('/'));
                    let mut req = http
                        .post(&url)
                        .timeout(Duration::from_secs(60))
                        .json(&json!({"model": model, "input": batch}));
                    if let Some(k) = key {
                        req = req.bearer_auth(k);
                    }
                    let resp = req
                        .send()
                        .await
                        .map_err(|e| Error::Embed(format!("{url}: {e}")))?;
                    let status = resp.status();
                    let body: Value = resp
                        .json()
                        .await
                        .map_err(|e| Error::Embed(format!("{url} answered {status}: {e}")))?;
                    if !status.is_success() {
                        return Err(Error::Embed(format!("{url} answered {status}: {body}")));
                    }
                    let mut data: Vec<(u64, Vec<f32>)> = body
                        .get("data")
                        .and_then(Value::as_array)
                        .ok_or_else(|| Error::Embed(format!("{url}: no `data` in the answer")))?
                        .iter()
                        .enumerate()
                        .map(|(i, d)| {
                            let index = d.get("index").and_then(Value::as_u64).unwrap_or(i as u64);
                            let v = d
                                .get("embedding")
                                .and_then(Value::as_array)
                                .map(|a| {
                                    a.iter()
                                        .filter_map(Value::as_f64)
                                        .map(|x| x as f32)
                                        .collect()
                                })
                                .unwrap_or_default();
                            (index, v)
                        })
                        .collect();
                    if data.len() != batch.len() {
                        return Err(Error::Embed(format!(
                            "{url}: {} embeddings for {} texts",
                            data.len(),
                            batch.len()
                        )));
                    }
                    data.sort_by_key(|(i, _)| *i);
                    out.vectors.extend(data.into_iter().map(|(_, v)| v));
                    out.tokens += body
                        .pointer("/usage/prompt_tokens")
                        .and_then(Value::as_u64)
                        .unwrap_or(0);
                }
                Ok(out)
            }
        }
    }
}

//! `aob kb create|ingest|ls|rm|search`: knowledge bases from the command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use aob_kb::chunk::ChunkOptions;
use aob_kb::store::{Document, Kbs, Outcome, Progress};
use async_nats::jetstream;
use serde_json::{Map, Value};

use crate::ctx::Ctx;

/// Where the knowledge bases' files are: `AOB_KB_URL`, default `file://<cwd>/.aob/kb`.
pub fn kb_url() -> Result<String> {
    if let Ok(u) = std::env::var("AOB_KB_URL")
        && !u.trim().is_empty()
    {
        return Ok(u);
    }
    let cwd = std::env::current_dir().context("the current directory")?;
    Ok(crate::ctx::file_url(&cwd.join(".aob/kb")))
}

async fn open(ctx: &Ctx) -> Result<Kbs> {
    let js = jetstream::new(ctx.connect().await?);
    Ok(Kbs::open(&js, &kb_url()?).await?)
}

fn embedders() -> Result<aob_retrieve::Embedders> {
    let models = aob_llm::config::Config::from_env().map_err(|e| anyhow!("{e}"))?;
    Ok(aob_retrieve::Embedders::new(
        models,
        Arc::new(aob_runtime::secrets::Secrets::from_env()),
    ))
}

/// Parses `key=value` (the value JSON, else text).
fn pairs(items: &[String], flag: &str) -> Result<Map<String, Value>> {
    let mut m = Map::new();
    for s in items {
        let (k, v) = s
            .split_once('=')
            .filter(|(k, _)| !k.trim().is_empty())
            .ok_or_else(|| anyhow!("`{flag} {s}`: write key=value"))?;
        m.insert(
            k.trim().to_string(),
            serde_json::from_str(v).unwrap_or_else(|_| Value::String(v.to_string())),
        );
    }
    Ok(m)
}

fn plural(n: usize, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

/// `aob kb create`.
pub async fn cmd_create(
    ctx: &Ctx,
    name: &str,
    model: &str,
    size: usize,
    overlap: usize,
) -> Result<ExitCode> {
    // The model must be one the deployment can reach.
    embedders()?.get(model).map_err(|e| anyhow!(e))?;
    let kbs = open(ctx).await?;
    kbs.create(&ctx.tenant, name, model, ChunkOptions { size, overlap })
        .await?;
    say!("created knowledge base {name} ({model}, chunks of {size} characters, overlap {overlap})");
    Ok(ExitCode::SUCCESS)
}

/// `aob kb ingest`.
pub async fn cmd_ingest(
    ctx: &Ctx,
    name: &str,
    files: &[PathBuf],
    meta: &[String],
) -> Result<ExitCode> {
    let metadata = pairs(meta, "--meta")?;
    let kbs = open(ctx).await?;
    let (manifest, _) = kbs.must_get(&ctx.tenant, name).await?;
    // The models file is read once: the embedder, the budget and the records use it.
    let models = embedders()?;
    let embedder = models.get(&manifest.model).map_err(|e| anyhow!(e))?;
    let mut docs = Vec::with_capacity(files.len());
    for f in files {
        let bytes = std::fs::read(f).with_context(|| format!("reading {}", f.display()))?;
        let text = aob_kb::extract::text_of(f, &bytes)?;
        if text.trim().is_empty() {
            bail!("{}: no text in it", f.display());
        }
        docs.push(Document {
            id: f.to_string_lossy().into_owned(),
            text,
            metadata: metadata.clone(),
        });
    }
    // A priced endpoint: the ingest's worst case is held against the tenant's budget first.
    let hold = hold_tenant_budget(ctx, &models, &manifest.model, &docs).await?;
    let total = docs.len();
    let mut n = 0;
    let (mut chunks, mut unchanged) = (0usize, 0usize);
    let mut embedded: Vec<(String, String, usize, u64)> = Vec::new();
    let started = std::time::Instant::now();
    let ingested = kbs
        .ingest(&ctx.tenant, name, &embedder, docs, |p| match p {
            Progress::Embedding { doc, chunks } => {
                eprintln!("  [{}/{total}] {doc}: embedding {chunks} chunks…", n + 1);
            }
            Progress::Done {
                doc,
                outcome,
                chunks: c,
                tokens,
                digest,
            } => {
                if outcome != Outcome::Unchanged {
                    embedded.push((doc.clone(), digest, c, tokens));
                }
                n += 1;
                let what = match outcome {
                    Outcome::Added => format!("added, {}", plural(c, "chunk")),
                    Outcome::Replaced => format!("replaced, {}", plural(c, "chunk")),
                    Outcome::Unchanged => "unchanged".to_string(),
                };
                if outcome == Outcome::Unchanged {
                    unchanged += 1;
                }
                chunks += c;
                say!("  [{n}/{total}] {doc}: {what}");
            }
        })
        .await;
    if let Err(e) = ingested {
        // Nothing more will be spent: the hold goes back to the budget.
        if let Some((ledgers, scope, key)) = &hold {
            let _ = ledgers.release(std::slice::from_ref(scope), key).await;
        }
        return Err(e.into());
    }
    let secs = started.elapsed().as_secs_f64();
    record_ingest(ctx, &models, name, &manifest.model, &embedded).await?;
    if let Some((ledgers, scope, key)) = hold {
        let tokens: u64 = embedded.iter().map(|(_, _, _, t)| t).sum();
        ledgers
            .settle(
                &[scope],
                &key,
                aob_llm::ledger::Amount {
                    usd: models.cost(&manifest.model, tokens).unwrap_or(0.0),
                    tokens,
                },
            )
            .await
            .map_err(|e| anyhow!("settling the ingest's cost: {}", e.0))?;
    }
    say!(
        "{name}: {total} document(s), {chunks} chunk(s) embedded with {}, {unchanged} unchanged, in {secs:.1} s",
        manifest.model
    );
    Ok(ExitCode::SUCCESS)
}

type Hold = (aob_llm::ledger::Ledgers, aob_llm::ledger::Scope, String);

/// Holds an ingest's worst case (every character a token, the overlap included) against
/// the tenant's budget of the models file, for a priced model; `None` when nothing is to
/// be held. A refusal is an error that says which budget.
async fn hold_tenant_budget(
    ctx: &Ctx,
    models: &aob_retrieve::Embedders,
    model: &str,
    docs: &[Document],
) -> Result<Option<Hold>> {
    let tokens: u64 = docs.iter().map(|d| d.text.len() as u64 * 5 / 4 + 16).sum();
    let Some(usd) = models.cost(model, tokens) else {
        return Ok(None);
    };
    let config = models.models();
    let budget = config
        .tenants
        .get(&ctx.tenant)
        .and_then(|t| t.budget)
        .or(config.budgets.tenant);
    let Some(budget) = budget else {
        return Ok(None);
    };
    let js = jetstream::new(ctx.connect().await?);
    let kv = js.get_key_value(aob_streams::LEDGER).await.map_err(|e| {
        anyhow!(
            "bucket {}: {e} (run `aob streams apply`)",
            aob_streams::LEDGER
        )
    })?;
    let ledgers = aob_llm::ledger::Ledgers::new(kv);
    let now = aob_runtime::now_ms();
    let scope = aob_llm::ledger::Scope::tenant(&ctx.tenant, budget, now);
    let key = format!("kb-ingest.{}", ulid::Ulid::new());
    let worst = aob_llm::ledger::Amount { usd, tokens };
    match ledgers
        .reserve(
            std::slice::from_ref(&scope),
            &key,
            worst,
            std::time::Duration::from_secs(3600),
            now,
        )
        .await
        .map_err(|e| anyhow!("{}", e.0))?
    {
        Ok(()) => Ok(Some((ledgers, scope, key))),
        Err(refusal) => bail!("this ingest was not started: {refusal}"),
    }
}

/// One `model_call` record per document embedded, in the audit trail like any model call:
/// run id `kb:<name>`, the person ingesting as actor, tokens and (for a priced endpoint)
/// cost.
async fn record_ingest(
    ctx: &Ctx,
    models: &aob_retrieve::Embedders,
    name: &str,
    model: &str,
    embedded: &[(String, String, usize, u64)],
) -> Result<()> {
    if embedded.is_empty() {
        return Ok(());
    }
    let js = jetstream::new(ctx.connect().await?);
    let by = crate::people::identity(ctx);
    let mut acks = Vec::new();
    for (doc, digest, chunks, tokens) in embedded {
        let mut r = aob_model::audit::DecisionRecord::new(
            format!(
                "{}.kb.{name}.{}",
                ctx.tenant,
                &digest[..digest.len().min(32)]
            ),
            &ctx.tenant,
            &format!("kb:{name}"),
            aob_model::audit::AuditKind::ModelCall,
            &by,
            aob_runtime::now_us(),
        );
        r.decision = Some("embed".into());
        r.reason = Some(format!("ingest {doc} into {name}: {chunks} chunk(s)"));
        r.model = Some(model.to_string());
        r.tokens_in = Some(*tokens);
        r.cost_usd = models.cost(model, *tokens);
        r.input_digest = Some(digest.clone());
        acks.push(aob_runtime::bus::publish_record(&js, &r).await?);
    }
    for a in acks {
        a.await
            .context("the audit stream did not take an ingest record")?;
    }
    Ok(())
}

/// `aob kb ls`.
pub async fn cmd_ls(ctx: &Ctx, name: Option<&str>) -> Result<ExitCode> {
    let kbs = open(ctx).await?;
    match name {
        None => {
            let all = kbs.list(&ctx.tenant).await?;
            if all.is_empty() {
                say!("no knowledge bases in tenant `{}`", ctx.tenant);
                return Ok(ExitCode::SUCCESS);
            }
            let rows: Vec<Vec<String>> = all
                .iter()
                .map(|m| {
                    vec![
                        m.name.clone(),
                        m.model.clone(),
                        m.docs.len().to_string(),
                        m.docs
                            .values()
                            .map(|d| d.chunks as u64)
                            .sum::<u64>()
                            .to_string(),
                    ]
                })
                .collect();
            crate::out::text(&crate::table::render(
                &["NAME", "MODEL", "DOCUMENTS", "CHUNKS"],
                &rows,
            ));
        }
        Some(name) => {
            let (m, rev) = kbs.must_get(&ctx.tenant, name).await?;
            say!(
                "{name}: {}, {} dimensions, chunks of {} (overlap {}), version {rev}",
                m.model,
                m.dims,
                m.chunking.size,
                m.chunking.overlap
            );
            let rows: Vec<Vec<String>> = m
                .docs
                .iter()
                .map(|(id, d)| {
                    vec![
                        id.clone(),
                        d.chunks.to_string(),
                        d.chars.to_string(),
                        crate::runs::timestamp(d.ingested_ms),
                        Value::Object(d.metadata.clone()).to_string(),
                    ]
                })
                .collect();
            crate::out::text(&crate::table::render(
                &["DOCUMENT", "CHUNKS", "CHARS", "INGESTED", "METADATA"],
                &rows,
            ));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `aob kb rm`.
pub async fn cmd_rm(ctx: &Ctx, name: &str, doc: &str) -> Result<ExitCode> {
    let kbs = open(ctx).await?;
    if kbs.remove_doc(&ctx.tenant, name, doc).await? {
        say!("removed {doc} from {name}");
        Ok(ExitCode::SUCCESS)
    } else {
        bail!("{name} has no document `{doc}` (`aob kb ls {name}` lists them)")
    }
}

/// `aob kb search`.
pub async fn cmd_search(
    ctx: &Ctx,
    name: &str,
    query: &str,
    top_k: usize,
    filter: &[String],
) -> Result<ExitCode> {
    let filter = pairs(filter, "--filter")?;
    let kbs = open(ctx).await?;
    let (index, manifest, _) = kbs.load(&ctx.tenant, name).await?;
    let embedder = embedders()?.get(&manifest.model).map_err(|e| anyhow!(e))?;
    let q = embedder.embed(&[query.to_string()]).await?;
    let hits = index
        .search(
            q.vectors.first().map_or(&[][..], |v| v),
            top_k,
            &filter,
            None,
        )
        .map_err(|e| anyhow!(e))?;
    for h in hits {
        say!(
            "{:.3}  {}  {}",
            h.score,
            h.entry.chunk_id,
            crate::progress::one_line(&h.entry.text, 100)
        );
    }
    Ok(ExitCode::SUCCESS)
}

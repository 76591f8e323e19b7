//! Knowledge bases as state and files: the manifest of each (its model, chunking and
//! documents) in the `AOB_KB` bucket, written by compare-and-set; the chunks of each
//! document version as one Parquet file in object storage
//! (`<prefix>/tenant=<t>/kb=<name>/<doc>-<id>-<digest>.parquet`).
//!
//! Ingesting writes a document's new file first, then points the manifest at it, then
//! deletes the old file: a crash leaves at worst an unreferenced file, never a manifest
//! pointing at nothing. A document whose text, metadata, model and chunking are unchanged
//! (same digest) costs nothing.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_nats::jetstream::{self, kv};
use futures::StreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::chunk::{ChunkOptions, chunk};
use crate::embed::Embedder;
use crate::parquet_io::{Row, decode, doc_path, encode};
use crate::search::{Entry, Index};
use crate::{Error, Result};

/// A knowledge base.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Its name.
    pub name: String,
    /// The embedding model (`all-MiniLM-L6-v2`, or a model of the models file).
    pub model: String,
    /// Embedding dimensions (known after the first document).
    #[serde(default)]
    pub dims: usize,
    /// How documents are cut.
    pub chunking: ChunkOptions,
    /// Created (ms since the Unix epoch).
    pub created_ms: u64,
    /// Documents by id.
    #[serde(default)]
    pub docs: BTreeMap<String, Doc>,
}

/// One document of a knowledge base.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Doc {
    /// Digest of what its chunks were made from (text, metadata, model, chunking).
    pub digest: String,
    /// Its chunk file.
    pub path: String,
    /// Chunks.
    pub chunks: u32,
    /// Characters of text.
    pub chars: u64,
    /// Ingested (ms since the Unix epoch).
    pub ingested_ms: u64,
    /// Metadata, on every chunk (filters match it).
    #[serde(default)]
    pub metadata: Map<String, Value>,
}

/// A document to ingest.
#[derive(Debug, Clone, PartialEq)]
pub struct Document {
    /// Its id (a file name, a URL).
    pub id: String,
    /// Its text.
    pub text: String,
    /// Its metadata.
    pub metadata: Map<String, Value>,
}

/// What happened to one document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// New.
    Added,
    /// Changed: its chunks were replaced.
    Replaced,
    /// Unchanged: nothing was done.
    Unchanged,
}

/// Progress of an ingest, for people watching.
#[derive(Debug, Clone, PartialEq)]
pub enum Progress {
    /// A document is being chunked and embedded.
    Embedding {
        /// The document.
        doc: String,
        /// Its chunks.
        chunks: usize,
    },
    /// A document is done.
    Done {
        /// The document.
        doc: String,
        /// What happened.
        outcome: Outcome,
        /// Its chunks.
        chunks: usize,
        /// Tokens embedded (as the model counted them).
        tokens: u64,
        /// The digest of the version ingested.
        digest: String,
    },
}

/// Knowledge bases: their manifests and files.
#[derive(Debug, Clone)]
pub struct Kbs {
    kv: kv::Store,
    objects: Arc<dyn ObjectStore>,
    prefix: Path,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn nats(e: impl std::fmt::Display) -> Error {
    Error::Store(format!("bucket {}: {e}", aob_streams::KB))
}

fn objects(e: impl std::fmt::Display) -> Error {
    Error::Store(format!("knowledge-base store: {e}"))
}

/// Checks a knowledge base's name: letters, digits, `_` and `-`, at most 64.
pub fn check_name(name: &str) -> Result<()> {
    if !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        Ok(())
    } else {
        Err(Error::Document(format!(
            "`{name}` is not a knowledge-base name: use letters, digits, `_` or `-` (at most 64)"
        )))
    }
}

impl Kbs {
    /// Opens the bucket and the object store at `url` (`file://`, `s3://`, `gs://`,
    /// `az://`, as for the audit).
    pub async fn open(js: &jetstream::Context, url: &str) -> Result<Self> {
        let kv = js.get_key_value(aob_streams::KB).await.map_err(|e| {
            Error::Store(format!(
                "bucket {}: {e} (run `aob streams apply`)",
                aob_streams::KB
            ))
        })?;
        let (objects, prefix) = aob_audit::store::open_as(url, "knowledge-base store")
            .map_err(|e| Error::Store(e.to_string()))?;
        Ok(Kbs {
            kv,
            objects,
            prefix,
        })
    }

    fn key(tenant: &str, name: &str) -> String {
        format!("{tenant}.{name}")
    }

    /// Creates a knowledge base; an error if one has that name.
    pub async fn create(
        &self,
        tenant: &str,
        name: &str,
        model: &str,
        chunking: ChunkOptions,
    ) -> Result<Manifest> {
        check_name(name)?;
        let m = Manifest {
            name: name.to_string(),
            model: model.to_string(),
            dims: 0,
            chunking,
            created_ms: now_ms(),
            docs: BTreeMap::new(),
        };
        let body = serde_json::to_vec(&m).map_err(|e| Error::Store(e.to_string()))?;
        self.kv
            .create(Self::key(tenant, name), body.into())
            .await
            .map_err(|e| match e.kind() {
                kv::CreateErrorKind::AlreadyExists => Error::Document(format!(
                    "a knowledge base `{name}` exists already in tenant `{tenant}`"
                )),
                _ => nats(e),
            })?;
        Ok(m)
    }

    /// A knowledge base and its revision.
    pub async fn get(&self, tenant: &str, name: &str) -> Result<Option<(Manifest, u64)>> {
        let Some(entry) = self.kv.entry(Self::key(tenant, name)).await.map_err(nats)? else {
            return Ok(None);
        };
        if entry.operation != kv::Operation::Put {
            return Ok(None);
        }
        let m = serde_json::from_slice(&entry.value)
            .map_err(|e| Error::Store(format!("knowledge base {name}: {e}")))?;
        Ok(Some((m, entry.revision)))
    }

    /// A knowledge base that must exist.
    pub async fn must_get(&self, tenant: &str, name: &str) -> Result<(Manifest, u64)> {
        self.get(tenant, name).await?.ok_or_else(|| {
            Error::Document(format!(
                "no knowledge base `{name}` in tenant `{tenant}` (`aob kb create {name}` makes one)"
            ))
        })
    }

    /// The tenant's knowledge bases.
    pub async fn list(&self, tenant: &str) -> Result<Vec<Manifest>> {
        let mut keys = self.kv.keys().await.map_err(nats)?;
        let mut out = Vec::new();
        let prefix = format!("{tenant}.");
        while let Some(k) = keys.next().await {
            let k = k.map_err(nats)?;
            if let Some(name) = k.strip_prefix(&prefix)
                && let Some((m, _)) = self.get(tenant, name).await?
            {
                out.push(m);
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Applies `change` to the manifest by compare-and-set, again on a conflict.
    async fn update(
        &self,
        tenant: &str,
        name: &str,
        mut change: impl FnMut(&mut Manifest),
    ) -> Result<Manifest> {
        for _ in 0..20 {
            let (mut m, rev) = self.must_get(tenant, name).await?;
            change(&mut m);
            let body = serde_json::to_vec(&m).map_err(|e| Error::Store(e.to_string()))?;
            match self
                .kv
                .update(Self::key(tenant, name), body.into(), rev)
                .await
            {
                Ok(_) => return Ok(m),
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => continue,
                Err(e) => return Err(nats(e)),
            }
        }
        Err(Error::Store(format!(
            "knowledge base {name}: too many concurrent changes, try again"
        )))
    }

    /// Ingests documents: new and changed ones are chunked, embedded and written; unchanged
    /// ones are skipped.
    pub async fn ingest(
        &self,
        tenant: &str,
        name: &str,
        embedder: &Embedder,
        docs: Vec<Document>,
        mut progress: impl FnMut(Progress),
    ) -> Result<Vec<(String, Outcome, usize)>> {
        let (manifest, _) = self.must_get(tenant, name).await?;
        if embedder.model() != manifest.model {
            return Err(Error::Document(format!(
                "knowledge base {name} is embedded with {}, not {}",
                manifest.model,
                embedder.model()
            )));
        }
        let mut out = Vec::new();
        for doc in docs {
            let digest = aob_model::audit::sha256_hex(
                serde_json::to_string(&(
                    &doc.text,
                    &doc.metadata,
                    &manifest.model,
                    &manifest.chunking,
                ))
                .unwrap_or_default()
                .as_bytes(),
            );
            let (current, _) = self.must_get(tenant, name).await?;
            if current
                .docs
                .get(&doc.id)
                .is_some_and(|d| d.digest == digest)
            {
                progress(Progress::Done {
                    doc: doc.id.clone(),
                    outcome: Outcome::Unchanged,
                    chunks: 0,
                    tokens: 0,
                    digest,
                });
                out.push((doc.id, Outcome::Unchanged, 0));
                continue;
            }
            let chunks = chunk(&doc.text, manifest.chunking);
            progress(Progress::Embedding {
                doc: doc.id.clone(),
                chunks: chunks.len(),
            });
            // The heading says where a chunk sits: it is embedded with the text.
            let texts: Vec<String> = chunks
                .iter()
                .map(|c| {
                    if c.heading.is_empty() {
                        c.text.clone()
                    } else {
                        format!("{}\n{}", c.heading, c.text)
                    }
                })
                .collect();
            let embedded = embedder.embed(&texts).await?;
            let tokens = embedded.tokens;
            let rows: Vec<Row> = chunks
                .into_iter()
                .zip(embedded.vectors)
                .map(|(c, embedding)| Row {
                    entry: Entry {
                        chunk_id: format!("{}#{}", doc.id, c.position),
                        doc: doc.id.clone(),
                        position: c.position,
                        heading: c.heading,
                        text: c.text,
                        metadata: doc.metadata.clone(),
                    },
                    embedding,
                })
                .collect();
            let dims = rows.first().map_or(manifest.dims, |r| r.embedding.len());
            if manifest.dims != 0 && dims != manifest.dims {
                return Err(Error::Embed(format!(
                    "{} gave {dims} dimensions; knowledge base {name} has {}",
                    embedder.model(),
                    manifest.dims
                )));
            }
            let path = doc_path(&self.prefix, tenant, name, &doc.id, &digest);
            let bytes = encode(&rows, &manifest.model, &digest)?;
            self.objects
                .put(&path, PutPayload::from(bytes))
                .await
                .map_err(objects)?;
            let entry = Doc {
                digest: digest.clone(),
                path: path.to_string(),
                chunks: rows.len() as u32,
                chars: doc.text.chars().count() as u64,
                ingested_ms: now_ms(),
                metadata: doc.metadata.clone(),
            };
            let id = doc.id.clone();
            let mut old = None;
            self.update(tenant, name, |m| {
                old = None;
                if m.dims == 0 {
                    m.dims = dims;
                }
                if let Some(prev) = m.docs.insert(id.clone(), entry.clone()) {
                    old = Some(prev.path);
                }
            })
            .await?;
            let outcome = if let Some(old) = old.filter(|o| *o != entry.path) {
                // Replaced: the old file is no longer referenced.
                if let Err(e) = self.objects.delete(&Path::from(old.as_str())).await {
                    tracing::warn!(%old, "an old chunk file was not deleted: {e}");
                }
                Outcome::Replaced
            } else if current.docs.contains_key(&doc.id) {
                Outcome::Replaced
            } else {
                Outcome::Added
            };
            progress(Progress::Done {
                doc: doc.id.clone(),
                outcome,
                chunks: rows.len(),
                tokens,
                digest: digest.clone(),
            });
            out.push((doc.id, outcome, rows.len()));
        }
        Ok(out)
    }

    /// Ingests the text, Markdown and HTML files of `dir` (document ids: their file names)
    /// into knowledge base `name`, made with `embedder`'s model if it does not exist yet.
    /// What an example ships as `kb/<name>/`.
    pub async fn ingest_dir(
        &self,
        tenant: &str,
        name: &str,
        dir: &std::path::Path,
        embedder: &Embedder,
    ) -> Result<Vec<(String, Outcome, usize)>> {
        if self.get(tenant, name).await?.is_none() {
            self.create(tenant, name, embedder.model(), ChunkOptions::default())
                .await?;
        }
        let mut files: Vec<std::path::PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| Error::Document(format!("{}: {e}", dir.display())))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.is_file()
                    && matches!(
                        p.extension().and_then(|e| e.to_str()),
                        Some("md" | "txt" | "html" | "htm")
                    )
            })
            .collect();
        files.sort();
        let mut docs = Vec::with_capacity(files.len());
        for f in files {
            let bytes =
                std::fs::read(&f).map_err(|e| Error::Document(format!("{}: {e}", f.display())))?;
            docs.push(Document {
                id: f
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                text: crate::extract::text_of(&f, &bytes)?,
                metadata: Map::new(),
            });
        }
        self.ingest(tenant, name, embedder, docs, |_| {}).await
    }

    /// Ingests every folder of `root` (an example's `kb/`) as the knowledge base of its
    /// name, in name order; what each came to.
    pub async fn ingest_dirs(
        &self,
        tenant: &str,
        root: &std::path::Path,
        embedder: &Embedder,
    ) -> Result<Vec<(String, std::path::PathBuf, Vec<(String, Outcome, usize)>)>> {
        let mut dirs: Vec<std::path::PathBuf> = std::fs::read_dir(root)
            .map_err(|e| Error::Document(format!("{}: {e}", root.display())))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_dir())
            .collect();
        dirs.sort();
        let mut out = Vec::with_capacity(dirs.len());
        for dir in dirs {
            let name = dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let done = self.ingest_dir(tenant, &name, &dir, embedder).await?;
            out.push((name, dir, done));
        }
        Ok(out)
    }

    /// Removes a document; false if it was not there.
    pub async fn remove_doc(&self, tenant: &str, name: &str, doc: &str) -> Result<bool> {
        let mut removed = None;
        self.update(tenant, name, |m| removed = m.docs.remove(doc))
            .await?;
        match removed {
            Some(d) => {
                if let Err(e) = self.objects.delete(&Path::from(d.path.as_str())).await {
                    tracing::warn!(path = %d.path, "a chunk file was not deleted: {e}");
                }
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Reads every chunk of a knowledge base into an index; with the manifest it was read
    /// from and its revision.
    pub async fn load(&self, tenant: &str, name: &str) -> Result<(Index, Manifest, u64)> {
        let (m, rev) = self.must_get(tenant, name).await?;
        Ok((self.load_version(&m).await?, m, rev))
    }

    /// Reads the chunk files a manifest names into an index.
    pub async fn load_version(&self, m: &Manifest) -> Result<Index> {
        let mut index = Index::new(m.dims);
        for (id, d) in &m.docs {
            let bytes = self
                .objects
                .get(&Path::from(d.path.as_str()))
                .await
                .map_err(objects)?
                .bytes()
                .await
                .map_err(objects)?;
            for row in decode(bytes)? {
                index
                    .push(row.entry, row.embedding)
                    .map_err(|e| Error::Format(format!("document {id}: {e}")))?;
            }
        }
        Ok(index)
    }
}

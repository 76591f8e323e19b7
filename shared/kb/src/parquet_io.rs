//! The chunk files of a knowledge base: one Parquet file per document version, under
//! `<prefix>/tenant=<t>/kb=<name>/`, that DuckDB (or any Parquet reader) reads as it is.
//!
//! | column | type |
//! |---|---|
//! | `chunk_id` (`<doc>#<position>`), `doc_id`, `heading`, `text`, `metadata` (JSON), `model`, `doc_digest` | `Utf8` |
//! | `position` | `UInt32` |
//! | `embedding` | `List<Float32>` |

use std::sync::{Arc, LazyLock};

use arrow_array::builder::{Float32Builder, ListBuilder};
use arrow_array::{
    Array, ArrayRef, Float32Array, ListArray, RecordBatch, StringArray, UInt32Array,
};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use bytes::Bytes;
use object_store::path::Path;
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use crate::search::Entry;
use crate::{Error, Result};

/// A chunk with its embedding.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// The chunk.
    pub entry: Entry,
    /// Its embedding (as the model gave it).
    pub embedding: Vec<f32>,
}

static SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    let utf8 = |n: &str| Field::new(n, DataType::Utf8, false);
    Arc::new(Schema::new(vec![
        utf8("chunk_id"),
        utf8("doc_id"),
        Field::new("position", DataType::UInt32, false),
        utf8("heading"),
        utf8("text"),
        utf8("metadata"),
        utf8("model"),
        utf8("doc_digest"),
        Field::new(
            "embedding",
            DataType::List(Arc::new(Field::new("item", DataType::Float32, true))),
            false,
        ),
    ]))
});

/// Where the chunks of one version of a document go.
pub fn doc_path(prefix: &Path, tenant: &str, kb: &str, doc: &str, digest: &str) -> Path {
    let safe: String = doc
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .take(80)
        .collect();
    let id = &aob_model::audit::sha256_hex(doc.as_bytes())[..8];
    let version = &digest[..digest.len().min(16)];
    prefix
        .clone()
        .join(format!("tenant={tenant}"))
        .join(format!("kb={kb}"))
        .join(format!("{safe}-{id}-{version}.parquet"))
}

/// Encodes the chunks of one document version.
pub fn encode(rows: &[Row], model: &str, doc_digest: &str) -> Result<Bytes> {
    let strings = |f: &dyn Fn(&Row) -> String| -> ArrayRef {
        Arc::new(StringArray::from_iter_values(rows.iter().map(f)))
    };
    let mut emb = ListBuilder::new(Float32Builder::new());
    for r in rows {
        emb.values().append_slice(&r.embedding);
        emb.append(true);
    }
    let columns: Vec<ArrayRef> = vec![
        strings(&|r| r.entry.chunk_id.clone()),
        strings(&|r| r.entry.doc.clone()),
        Arc::new(UInt32Array::from_iter_values(
            rows.iter().map(|r| r.entry.position),
        )),
        strings(&|r| r.entry.heading.clone()),
        strings(&|r| r.entry.text.clone()),
        strings(&|r| serde_json::Value::Object(r.entry.metadata.clone()).to_string()),
        strings(&|_| model.to_string()),
        strings(&|_| doc_digest.to_string()),
        Arc::new(emb.finish()),
    ];
    let batch =
        RecordBatch::try_new(SCHEMA.clone(), columns).map_err(|e| Error::Format(e.to_string()))?;
    let mut out = Vec::new();
    let mut writer = ArrowWriter::try_new(
        &mut out,
        SCHEMA.clone(),
        Some(aob_audit::schema::writer_properties()),
    )
    .map_err(|e| Error::Format(e.to_string()))?;
    writer
        .write(&batch)
        .map_err(|e| Error::Format(e.to_string()))?;
    writer.close().map_err(|e| Error::Format(e.to_string()))?;
    Ok(Bytes::from(out))
}

/// Decodes a chunk file.
pub fn decode(bytes: Bytes) -> Result<Vec<Row>> {
    let bad = |e: String| Error::Format(format!("a chunk file does not read: {e}"));
    let reader = ParquetRecordBatchReaderBuilder::try_new(bytes)
        .map_err(|e| bad(e.to_string()))?
        .build()
        .map_err(|e| bad(e.to_string()))?;
    let mut out = Vec::new();
    for batch in reader {
        let batch = batch.map_err(|e| bad(e.to_string()))?;
        let col = |name: &str| -> Result<&StringArray> {
            batch
                .column_by_name(name)
                .and_then(|c| c.as_any().downcast_ref::<StringArray>())
                .ok_or_else(|| bad(format!("no text column `{name}`")))
        };
        let (ids, docs, headings, texts, metas) = (
            col("chunk_id")?,
            col("doc_id")?,
            col("heading")?,
            col("text")?,
            col("metadata")?,
        );
        let positions = batch
            .column_by_name("position")
            .and_then(|c| c.as_any().downcast_ref::<UInt32Array>())
            .ok_or_else(|| bad("no column `position`".into()))?;
        let emb = batch
            .column_by_name("embedding")
            .and_then(|c| c.as_any().downcast_ref::<ListArray>())
            .ok_or_else(|| bad("no column `embedding`".into()))?;
        for i in 0..batch.num_rows() {
            let v = emb.value(i);
            let v = v
                .as_any()
                .downcast_ref::<Float32Array>()
                .ok_or_else(|| bad("`embedding` is not a list of floats".into()))?;
            let metadata = serde_json::from_str::<serde_json::Value>(metas.value(i))
                .ok()
                .and_then(|m| m.as_object().cloned())
                .unwrap_or_default();
            out.push(Row {
                entry: Entry {
                    chunk_id: ids.value(i).to_string(),
                    doc: docs.value(i).to_string(),
                    position: positions.value(i),
                    heading: headings.value(i).to_string(),
                    text: texts.value(i).to_string(),
                    metadata,
                },
                embedding: v.values().to_vec(),
            });
        }
    }
    Ok(out)
}

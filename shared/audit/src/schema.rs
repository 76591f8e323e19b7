//! The Arrow schema of a [`DecisionRecord`] and its Parquet encoding.
//!
//! One column per record field, with the field's name, in the record's order, except for
//! the times: `started_at_us` and `finished_at_us` become `started_at` and `finished_at`,
//! `Timestamp(Microsecond, "UTC")`, so query engines see real timestamps. `duration_us`
//! stays a plain `Int64` of microseconds.
//!
//! | column | Arrow type | null |
//! |---|---|---|
//! | `record_id`, `tenant`, `event_kind`, `run_id`, `actor` | `Utf8` | no |
//! | `schema_version` | `UInt32` | no |
//! | `workflow_version`, `attempt`, `item`, `iteration` | `UInt32` | yes |
//! | `started_at` | `Timestamp(Microsecond, "UTC")` | yes |
//! | `finished_at` | `Timestamp(Microsecond, "UTC")` | no |
//! | `duration_us`, `tokens_in`, `tokens_out` | `Int64` | yes |
//! | `cost_usd` | `Float64` | yes |
//! | every other field | `Utf8` | yes |
//!
//! Fields a kind of record does not use are null, never empty strings. The record's
//! [`SCHEMA_VERSION`] is stored in the Arrow schema metadata and in the Parquet key-value
//! metadata under [`SCHEMA_VERSION_KEY`]; a later version only adds nullable columns.

use std::sync::{Arc, LazyLock};

use aob_model::audit::{DecisionRecord, SCHEMA_VERSION};
use arrow_array::{
    ArrayRef, Float64Array, Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray,
    UInt32Array,
};
use arrow_schema::{DataType, Field, Schema, SchemaRef, TimeUnit};
use bytes::Bytes;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;

use crate::Result;

/// Metadata key (Arrow schema and Parquet footer) holding the record schema version.
pub const SCHEMA_VERSION_KEY: &str = "aob.schema_version";

/// Most rows in one Parquet row group.
///
/// A sink file holds at most 50,000 rows by default, so this gives a handful of row groups
/// per file: enough for DuckDB and other readers to scan row groups in parallel and to skip
/// them by their statistics (`finished_at`, `run_id`), while each group still holds enough
/// rows for dictionary encoding and ZSTD to work well. It also bounds the writer's memory
/// per column chunk when records carry large inline payloads (up to 8 KiB each).
pub const ROW_GROUP_ROWS: usize = 16_384;

/// ZSTD level: the library default, a good ratio at a fraction of the higher levels' CPU.
const ZSTD_LEVEL: i32 = 3;

static SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    let utf8 = |name: &str, nullable: bool| Field::new(name, DataType::Utf8, nullable);
    let u32f = |name: &str, nullable: bool| Field::new(name, DataType::UInt32, nullable);
    let i64f = |name: &str| Field::new(name, DataType::Int64, true);
    let ts = |name: &str, nullable: bool| {
        Field::new(
            name,
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            nullable,
        )
    };
    let fields = vec![
        utf8("record_id", false),
        u32f("schema_version", false),
        utf8("tenant", false),
        utf8("event_kind", false),
        utf8("workflow", true),
        u32f("workflow_version", true),
        utf8("run_id", false),
        utf8("step_id", true),
        utf8("node_type", true),
        u32f("attempt", true),
        u32f("item", true),
        u32f("iteration", true),
        utf8("status", true),
        utf8("actor", false),
        utf8("decision", true),
        utf8("reason", true),
        ts("started_at", true),
        ts("finished_at", false),
        i64f("duration_us"),
        utf8("input_digest", true),
        utf8("input_json", true),
        utf8("input_ref", true),
        utf8("output_digest", true),
        utf8("output_json", true),
        utf8("output_ref", true),
        utf8("error_class", true),
        utf8("error_message", true),
        utf8("model", true),
        utf8("provider", true),
        i64f("tokens_in"),
        i64f("tokens_out"),
        Field::new("cost_usd", DataType::Float64, true),
        utf8("policy_id", true),
        utf8("policy_result", true),
        utf8("trace_id", true),
        utf8("span_id", true),
    ];
    Arc::new(
        Schema::new(fields).with_metadata(
            [(SCHEMA_VERSION_KEY.to_string(), SCHEMA_VERSION.to_string())]
                .into_iter()
                .collect::<arrow_schema::Metadata>(),
        ),
    )
});

/// The Arrow schema of the audit Parquet files (see the module documentation).
pub fn schema() -> SchemaRef {
    SCHEMA.clone()
}

/// Converts records to one Arrow record batch of [`schema`].
pub fn to_batch(records: &[DecisionRecord]) -> Result<RecordBatch> {
    let refs: Vec<&DecisionRecord> = records.iter().collect();
    to_batch_of(&refs)
}

/// Like [`to_batch`], over borrowed records.
pub fn to_batch_of(records: &[&DecisionRecord]) -> Result<RecordBatch> {
    let utf8 = |f: &dyn Fn(&DecisionRecord) -> Option<&str>| -> ArrayRef {
        Arc::new(records.iter().map(|r| f(r)).collect::<StringArray>())
    };
    let u32s = |f: &dyn Fn(&DecisionRecord) -> Option<u32>| -> ArrayRef {
        Arc::new(records.iter().map(|r| f(r)).collect::<UInt32Array>())
    };
    let i64s = |f: &dyn Fn(&DecisionRecord) -> Option<i64>| -> ArrayRef {
        Arc::new(records.iter().map(|r| f(r)).collect::<Int64Array>())
    };
    let ts = |f: &dyn Fn(&DecisionRecord) -> Option<i64>| -> ArrayRef {
        Arc::new(
            records
                .iter()
                .map(|r| f(r))
                .collect::<TimestampMicrosecondArray>()
                .with_timezone("UTC"),
        )
    };
    // Token counts are u64 in the record; no real count comes near i64::MAX, so the cast
    // saturates rather than fails.
    let tokens = |v: Option<u64>| v.map(|n| i64::try_from(n).unwrap_or(i64::MAX));
    let columns: Vec<ArrayRef> = vec![
        utf8(&|r| Some(&r.record_id)),
        u32s(&|r| Some(r.schema_version)),
        utf8(&|r| Some(&r.tenant)),
        utf8(&|r| Some(r.event_kind.as_str())),
        utf8(&|r| r.workflow.as_deref()),
        u32s(&|r| r.workflow_version),
        utf8(&|r| Some(&r.run_id)),
        utf8(&|r| r.step_id.as_deref()),
        utf8(&|r| r.node_type.as_deref()),
        u32s(&|r| r.attempt),
        u32s(&|r| r.item),
        u32s(&|r| r.iteration),
        utf8(&|r| r.status.as_deref()),
        utf8(&|r| Some(&r.actor)),
        utf8(&|r| r.decision.as_deref()),
        utf8(&|r| r.reason.as_deref()),
        ts(&|r| r.started_at_us),
        ts(&|r| Some(r.finished_at_us)),
        i64s(&|r| r.duration_us),
        utf8(&|r| r.input_digest.as_deref()),
        utf8(&|r| r.input_json.as_deref()),
        utf8(&|r| r.input_ref.as_deref()),
        utf8(&|r| r.output_digest.as_deref()),
        utf8(&|r| r.output_json.as_deref()),
        utf8(&|r| r.output_ref.as_deref()),
        utf8(&|r| r.error_class.as_deref()),
        utf8(&|r| r.error_message.as_deref()),
        utf8(&|r| r.model.as_deref()),
        utf8(&|r| r.provider.as_deref()),
        i64s(&|r| tokens(r.tokens_in)),
        i64s(&|r| tokens(r.tokens_out)),
        Arc::new(records.iter().map(|r| r.cost_usd).collect::<Float64Array>()),
        utf8(&|r| r.policy_id.as_deref()),
        utf8(&|r| r.policy_result.as_deref()),
        utf8(&|r| r.trace_id.as_deref()),
        utf8(&|r| r.span_id.as_deref()),
    ];
    Ok(RecordBatch::try_new(schema(), columns)?)
}

/// Writer settings of every audit file: ZSTD, row groups of at most [`ROW_GROUP_ROWS`],
/// `created_by` naming this crate, and the schema version in the key-value metadata.
pub fn writer_properties() -> WriterProperties {
    let level = ZstdLevel::try_new(ZSTD_LEVEL).unwrap_or_default();
    WriterProperties::builder()
        .set_compression(Compression::ZSTD(level))
        .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
        .set_created_by(format!(
            "aob-audit version {} (parquet-rs)",
            env!("CARGO_PKG_VERSION")
        ))
        .set_key_value_metadata(Some(vec![KeyValue::new(
            SCHEMA_VERSION_KEY.to_string(),
            SCHEMA_VERSION.to_string(),
        )]))
        .build()
}

/// Encodes records as one Parquet file (see [`writer_properties`]).
pub fn encode(records: &[DecisionRecord]) -> Result<Bytes> {
    let refs: Vec<&DecisionRecord> = records.iter().collect();
    encode_of(&refs)
}

/// Like [`encode`], over borrowed records.
pub fn encode_of(records: &[&DecisionRecord]) -> Result<Bytes> {
    let mut out = Vec::new();
    let mut writer = ArrowWriter::try_new(&mut out, schema(), Some(writer_properties()))?;
    // Converting in row-group-sized slices keeps one Arrow copy of at most a row group.
    for chunk in records.chunks(ROW_GROUP_ROWS) {
        writer.write(&to_batch_of(chunk)?)?;
    }
    writer.close()?;
    Ok(Bytes::from(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use aob_model::audit::AuditKind;
    use arrow_array::Array;
    use arrow_array::cast::AsArray;
    use arrow_array::types::{Float64Type, Int64Type, TimestampMicrosecondType, UInt32Type};
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

    /// Every field set. A struct literal, so a field added to the record breaks this test
    /// until the schema has its column.
    fn full() -> DecisionRecord {
        DecisionRecord {
            record_id: "acme.r1.h7".into(),
            schema_version: SCHEMA_VERSION,
            tenant: "acme".into(),
            event_kind: AuditKind::ModelCall,
            workflow: Some("wf".into()),
            workflow_version: Some(3),
            run_id: "r1".into(),
            step_id: Some("ask".into()),
            node_type: Some("llm".into()),
            attempt: Some(2),
            item: Some(4),
            iteration: Some(5),
            status: Some("COMPLETED".into()),
            actor: "fn.llm".into(),
            decision: Some("accept".into()),
            reason: Some("because".into()),
            started_at_us: Some(1_700_000_000_000_000),
            finished_at_us: 1_700_000_000_250_000,
            duration_us: Some(250_000),
            input_digest: Some("d-in".into()),
            input_json: Some("{\"q\":1}".into()),
            input_ref: Some("payloads/in.json".into()),
            output_digest: Some("d-out".into()),
            output_json: Some("{\"a\":2}".into()),
            output_ref: Some("payloads/out.json".into()),
            error_class: Some("retryable".into()),
            error_message: Some("slow".into()),
            model: Some("m-1".into()),
            provider: Some("p".into()),
            tokens_in: Some(11),
            tokens_out: Some(u64::MAX),
            cost_usd: Some(0.125),
            policy_id: Some("pol".into()),
            policy_result: Some("allow".into()),
            trace_id: Some("t".repeat(32)),
            span_id: Some("s".repeat(16)),
        }
    }

    fn minimal() -> DecisionRecord {
        DecisionRecord::new(
            "acme.r1.h8".into(),
            "acme",
            "r1",
            AuditKind::RunStarted,
            "engine",
            1_700_000_001_000_000,
        )
    }

    fn read(bytes: Bytes) -> (Vec<RecordBatch>, parquet::file::metadata::ParquetMetaData) {
        let builder = ParquetRecordBatchReaderBuilder::try_new(bytes).unwrap();
        let meta = builder.metadata().as_ref().clone();
        let batches = builder
            .build()
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        (batches, meta)
    }

    #[test]
    fn one_column_per_field_with_the_field_names() {
        let json = serde_json::to_value(full()).unwrap();
        let mut fields: Vec<String> = json
            .as_object()
            .unwrap()
            .keys()
            .map(|k| match k.as_str() {
                "started_at_us" => "started_at".to_string(),
                "finished_at_us" => "finished_at".to_string(),
                other => other.to_string(),
            })
            .collect();
        let columns: Vec<String> = schema().fields().iter().map(|f| f.name().clone()).collect();
        assert_eq!(columns, fields, "same names, same order");
        fields.sort();
        fields.dedup();
        assert_eq!(fields.len(), columns.len());
        let s = schema();
        assert_eq!(
            s.metadata.get(SCHEMA_VERSION_KEY).map(String::as_str),
            Some("1")
        );
        for (name, nullable) in [
            ("record_id", false),
            ("schema_version", false),
            ("tenant", false),
            ("run_id", false),
            ("actor", false),
            ("event_kind", false),
            ("finished_at", false),
            ("started_at", true),
            ("workflow", true),
            ("cost_usd", true),
        ] {
            assert_eq!(
                s.field_with_name(name).unwrap().is_nullable(),
                nullable,
                "{name}"
            );
        }
    }

    #[test]
    fn records_round_trip_through_parquet() {
        let bytes = encode(&[full(), minimal()]).unwrap();
        assert_eq!(&bytes[..4], b"PAR1");
        let (batches, meta) = read(bytes);
        assert_eq!(batches.len(), 1);
        let b = &batches[0];
        assert_eq!(b.num_rows(), 2);
        // The schema read back is the one written, timestamps included.
        assert_eq!(b.schema().fields(), schema().fields());
        assert_eq!(
            b.schema()
                .field_with_name("finished_at")
                .unwrap()
                .data_type(),
            &DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
        );
        let col = |name: &str| b.column_by_name(name).unwrap().clone();
        let text = |name: &str| {
            let c = col(name);
            let a = c.as_string::<i32>();
            (0..a.len())
                .map(|i| (!a.is_null(i)).then(|| a.value(i).to_string()))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            text("record_id"),
            [Some("acme.r1.h7".into()), Some("acme.r1.h8".into())]
        );
        assert_eq!(
            text("event_kind"),
            [Some("model_call".into()), Some("run_started".into())]
        );
        assert_eq!(text("workflow"), [Some("wf".into()), None]);
        assert_eq!(text("output_json"), [Some("{\"a\":2}".into()), None]);
        assert_eq!(text("span_id")[1], None);
        let started = col("started_at");
        let started = started.as_primitive::<TimestampMicrosecondType>();
        assert_eq!(started.value(0), 1_700_000_000_000_000);
        assert!(started.is_null(1), "unused fields are null");
        let finished = col("finished_at");
        let finished = finished.as_primitive::<TimestampMicrosecondType>();
        assert_eq!(
            finished.values().to_vec(),
            [1_700_000_000_250_000, 1_700_000_001_000_000]
        );
        let attempt = col("attempt");
        let attempt = attempt.as_primitive::<UInt32Type>();
        assert_eq!((attempt.value(0), attempt.is_null(1)), (2, true));
        let version = col("schema_version");
        assert_eq!(
            version.as_primitive::<UInt32Type>().values().to_vec(),
            [1, 1]
        );
        let tokens = col("tokens_out");
        assert_eq!(
            tokens.as_primitive::<Int64Type>().value(0),
            i64::MAX,
            "saturated"
        );
        let cost = col("cost_usd");
        let cost = cost.as_primitive::<Float64Type>();
        assert_eq!((cost.value(0), cost.is_null(1)), (0.125, true));
        let duration = col("duration_us");
        assert_eq!(duration.as_primitive::<Int64Type>().value(0), 250_000);
        // Footer: who wrote it, which record version, ZSTD.
        let file = meta.file_metadata();
        assert!(file.created_by().unwrap().starts_with("aob-audit version "));
        let kv = file.key_value_metadata().unwrap();
        assert!(
            kv.iter()
                .any(|k| k.key == SCHEMA_VERSION_KEY && k.value.as_deref() == Some("1"))
        );
        // (The level is not stored in the file.)
        assert!(matches!(
            meta.row_group(0).column(0).compression(),
            Compression::ZSTD(_)
        ));
    }

    #[test]
    fn large_files_are_split_into_row_groups() {
        let n = 2 * ROW_GROUP_ROWS + 5;
        let base = minimal();
        let records: Vec<DecisionRecord> = (0..n)
            .map(|i| DecisionRecord {
                record_id: format!("id-{i}"),
                ..base.clone()
            })
            .collect();
        let (batches, meta) = read(encode(&records).unwrap());
        assert_eq!(meta.file_metadata().num_rows(), n as i64);
        let sizes: Vec<i64> = meta.row_groups().iter().map(|g| g.num_rows()).collect();
        assert_eq!(sizes, [ROW_GROUP_ROWS as i64, ROW_GROUP_ROWS as i64, 5]);
        assert_eq!(batches.iter().map(RecordBatch::num_rows).sum::<usize>(), n);
    }

    #[test]
    fn encoding_is_deterministic() {
        // A rewrite of an interrupted batch overwrites an object with the same bytes.
        let records = [full(), minimal(), full()];
        assert_eq!(encode(&records).unwrap(), encode(&records).unwrap());
    }

    #[test]
    fn an_empty_batch_is_a_valid_file() {
        let (batches, meta) = read(encode(&[]).unwrap());
        assert_eq!(meta.file_metadata().num_rows(), 0);
        assert!(batches.iter().all(|b| b.num_rows() == 0));
    }
}

//! Where audit files go: opening a store from a URL, the object layout, and listing.
//!
//! Layout: `<prefix>/tenant=<tenant>/date=<YYYY-MM-DD>/<stream>-<first_seq>-<last_seq>.parquet`,
//! the date being the UTC day of the records' `finished_at`, `stream` the creation time of
//! the `AOB_AUDIT` stream in nanoseconds since the Unix epoch (sequences restart when the
//! stream is created again, so without it a new file could overwrite an old one), and the
//! sequences the first and last `AOB_AUDIT` stream sequence of the rows in the file, each
//! number zero-padded to 20 digits (the width of `u64::MAX`). The padding makes the
//! lexicographic order of names, which is the order object stores list them in, the order
//! of the stream; the `key=value` directories
//! are Hive partitions, so `read_parquet('<root>/**/*.parquet', hive_partitioning = true)`
//! in DuckDB can prune by tenant and date.

use std::sync::Arc;

use arrow_array::cast::AsArray;
use bytes::Bytes;
use futures::StreamExt;
use futures::future::{BoxFuture, FutureExt};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::ArrowReaderOptions;
use parquet::arrow::async_reader::{
    AsyncFileReader, MetadataFetch, ParquetRecordBatchStreamBuilder,
};
use parquet::errors::ParquetError;
use parquet::file::metadata::{ParquetMetaData, ParquetMetaDataReader};

use crate::{Error, Result};

/// A calendar day (UTC).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Date {
    /// Year.
    pub year: i32,
    /// Month, 1 to 12.
    pub month: u32,
    /// Day, 1 to 31.
    pub day: u32,
}

impl Date {
    /// The UTC day of a time given in microseconds since the Unix epoch.
    pub fn from_unix_micros(us: i64) -> Date {
        Date::from_days(us.div_euclid(86_400_000_000))
    }

    /// The day `days` days after 1970-01-01 (proleptic Gregorian calendar).
    pub fn from_days(days: i64) -> Date {
        // Howard Hinnant's `civil_from_days`: eras of 400 years starting on March 1st.
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097); // [0, 146096]
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365]
        let mp = (5 * doy + 2) / 153; // [0, 11], March = 0
        let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
        let year = yoe + era * 400 + i64::from(month <= 2);
        Date {
            year: year.clamp(i64::from(i32::MIN), i64::from(i32::MAX)) as i32,
            month,
            day,
        }
    }
}

impl std::fmt::Display for Date {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:04}-{:02}-{:02}", self.year, self.month, self.day)
    }
}

/// The object holding the rows of one tenant and day whose sequences in the stream created
/// at `stream` (nanoseconds since the Unix epoch) run from `first_seq` to `last_seq` (see
/// the module documentation).
pub fn object_path(
    prefix: &Path,
    tenant: &str,
    date: Date,
    stream: u64,
    first_seq: u64,
    last_seq: u64,
) -> Path {
    let mut parts = partition_parts(prefix, tenant, date);
    parts.push(format!(
        "{stream:020}-{first_seq:020}-{last_seq:020}.parquet"
    ));
    Path::from_iter(parts)
}

/// The folder of one tenant and day: `<prefix>/tenant=<tenant>/date=<YYYY-MM-DD>`.
pub fn partition_path(prefix: &Path, tenant: &str, date: Date) -> Path {
    Path::from_iter(partition_parts(prefix, tenant, date))
}

fn partition_parts(prefix: &Path, tenant: &str, date: Date) -> Vec<String> {
    let mut parts: Vec<String> = prefix.parts().map(|p| p.as_ref().to_string()).collect();
    parts.push(format!("tenant={tenant}"));
    parts.push(format!("date={date}"));
    parts
}

/// The parts of an object name made by [`object_path`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectName {
    /// Tenant.
    pub tenant: String,
    /// Day, `YYYY-MM-DD`.
    pub date: String,
    /// Creation time of the stream the rows came from, in nanoseconds since the Unix
    /// epoch; `None` for a name from before streams were named (`<first>-<last>.parquet`).
    pub stream: Option<u64>,
    /// First stream sequence in the file.
    pub first_seq: u64,
    /// Last stream sequence in the file.
    pub last_seq: u64,
}

/// Parses a path made by [`object_path`] under `prefix`; `None` when it is not one.
pub fn parse_object_path(prefix: &Path, path: &Path) -> Option<ObjectName> {
    let mut rest = path.prefix_match(prefix)?;
    let tenant = rest.next()?.as_ref().strip_prefix("tenant=")?.to_string();
    let date = rest.next()?.as_ref().strip_prefix("date=")?.to_string();
    let file = rest.next()?;
    if rest.next().is_some() {
        return None;
    }
    let numbers: Vec<&str> = file.as_ref().strip_suffix(".parquet")?.split('-').collect();
    let (stream, first, last) = match numbers[..] {
        [first, last] => (None, first, last),
        [stream, first, last] => (Some(stream), first, last),
        _ => return None,
    };
    let digits = |s: &str| s.len() == 20 && s.bytes().all(|b| b.is_ascii_digit());
    if stream.is_some_and(|s| !digits(s)) {
        return None;
    }
    let date_ok = date.len() == 10
        && date.bytes().enumerate().all(|(i, b)| {
            if i == 4 || i == 7 {
                b == b'-'
            } else {
                b.is_ascii_digit()
            }
        });
    if tenant.is_empty() || !date_ok || !digits(first) || !digits(last) {
        return None;
    }
    Some(ObjectName {
        tenant,
        date,
        stream: match stream {
            Some(s) => Some(s.parse().ok()?),
            None => None,
        },
        first_seq: first.parse().ok()?,
        last_seq: last.parse().ok()?,
    })
}

const URL_FORMS: &str = "expected file:///absolute/dir, s3://bucket/prefix, gs://bucket/prefix, \
                         az://container/prefix or memory:///";

/// Opens the store named by `url` and returns it with the prefix the audit files go under.
///
/// - `file:///abs/dir`: a directory (created when missing); the prefix is empty.
/// - `s3://bucket/prefix`: settings from the environment (`AWS_ENDPOINT_URL` or
///   `AWS_ENDPOINT`, `AWS_ALLOW_HTTP`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
///   `AWS_REGION`, ...). Requests are path-style unless `AWS_VIRTUAL_HOSTED_STYLE_REQUEST`
///   is `true`, so S3-compatible servers (MinIO, moto) work with just an endpoint.
/// - `gs://bucket/prefix`: settings from `GOOGLE_*` variables.
/// - `az://container/prefix` (also `azure://`, `abfs://`, `abfss://`): settings from
///   `AZURE_*` variables.
/// - `memory:///`: in memory, for tests.
pub fn open(url: &str) -> Result<(Arc<dyn ObjectStore>, Path)> {
    open_as(url, "audit store")
}

/// Like [`open`], for another use of object storage; `what` names it in errors
/// (`knowledge-base store`).
pub fn open_as(url: &str, what: &str) -> Result<(Arc<dyn ObjectStore>, Path)> {
    let bad = |problem: String| Error::Config(format!("{what} URL `{url}`: {problem}"));
    let parsed = url::Url::parse(url).map_err(|e| bad(format!("not a URL ({e}); {URL_FORMS}")))?;
    let prefix = || {
        Path::from_url_path(parsed.path())
            .map_err(|e| bad(format!("bad path `{}`: {e}", parsed.path())))
    };
    let built = |r: object_store::Result<Arc<dyn ObjectStore>>| {
        r.map_err(|e| bad(format!("cannot configure the store: {e}")))
    };
    match parsed.scheme() {
        "file" => {
            if parsed
                .host_str()
                .is_some_and(|h| !h.is_empty() && h != "localhost")
            {
                return Err(bad(format!(
                    "`{}` is read as a host name; write an absolute path with three slashes: file:///absolute/dir",
                    parsed.host_str().unwrap_or_default()
                )));
            }
            let dir = parsed
                .to_file_path()
                .map_err(|()| bad("not an absolute file path".into()))?;
            std::fs::create_dir_all(&dir)
                .map_err(|e| bad(format!("cannot create {}: {e}", dir.display())))?;
            let fs = object_store::local::LocalFileSystem::new_with_prefix(&dir)
                .map_err(|e| bad(format!("cannot open {}: {e}", dir.display())))?;
            Ok((Arc::new(fs), Path::default()))
        }
        "s3" | "s3a" => {
            if parsed.host_str().unwrap_or_default().is_empty() {
                return Err(bad("no bucket name: write s3://bucket/prefix".into()));
            }
            let store = object_store::aws::AmazonS3Builder::from_env()
                .with_url(url)
                .build()
                .map(|s| Arc::new(s) as Arc<dyn ObjectStore>);
            Ok((built(store)?, prefix()?))
        }
        "gs" => {
            if parsed.host_str().unwrap_or_default().is_empty() {
                return Err(bad("no bucket name: write gs://bucket/prefix".into()));
            }
            let store = object_store::gcp::GoogleCloudStorageBuilder::from_env()
                .with_url(url)
                .build()
                .map(|s| Arc::new(s) as Arc<dyn ObjectStore>);
            Ok((built(store)?, prefix()?))
        }
        "az" | "azure" | "abfs" | "abfss" => {
            if parsed.host_str().unwrap_or_default().is_empty() {
                return Err(bad("no container name: write az://container/prefix".into()));
            }
            let store = object_store::azure::MicrosoftAzureBuilder::from_env()
                .with_url(url)
                .build()
                .map(|s| Arc::new(s) as Arc<dyn ObjectStore>);
            Ok((built(store)?, prefix()?))
        }
        "memory" => Ok((Arc::new(object_store::memory::InMemory::new()), prefix()?)),
        other => Err(bad(format!("unsupported scheme `{other}`; {URL_FORMS}"))),
    }
}

/// One audit file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileInfo {
    /// Object path.
    pub path: Path,
    /// Size in bytes.
    pub size: u64,
    /// Rows, from the Parquet footer.
    pub rows: u64,
}

/// Lists the Parquet files under `prefix`, in name order, reading only their footers.
pub async fn list(store: &Arc<dyn ObjectStore>, prefix: &Path) -> Result<Vec<FileInfo>> {
    let scope = (!prefix.as_ref().is_empty()).then_some(prefix);
    let mut objects = store.list(scope);
    let mut out = Vec::new();
    while let Some(meta) = objects.next().await {
        let meta = meta.map_err(|e| Error::Store(format!("listing {prefix}: {e}")))?;
        if meta.location.extension() != Some("parquet") {
            continue;
        }
        let footer = ParquetMetaDataReader::new()
            .load_and_finish(
                Ranged {
                    store: store.as_ref(),
                    path: &meta.location,
                },
                meta.size,
            )
            .await
            .map_err(|e| Error::Store(format!("reading the footer of {}: {e}", meta.location)))?;
        out.push(FileInfo {
            path: meta.location,
            size: meta.size,
            rows: u64::try_from(footer.file_metadata().num_rows()).unwrap_or(0),
        });
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

/// Calls `each` with the `record_id` of every row of the Parquet file at `path` (of `size`
/// bytes), reading only the footer and that column's pages.
pub async fn for_each_record_id(
    store: &Arc<dyn ObjectStore>,
    path: &Path,
    size: u64,
    mut each: impl FnMut(&str),
) -> Result<()> {
    let failed =
        |e: &dyn std::fmt::Display| Error::Store(format!("reading the record ids of {path}: {e}"));
    let reader = Owned {
        store: store.clone(),
        path: path.clone(),
        size,
    };
    let builder = ParquetRecordBatchStreamBuilder::new(reader)
        .await
        .map_err(|e| failed(&e))?;
    let mask = ProjectionMask::columns(builder.parquet_schema(), ["record_id"]);
    let mut batches = builder
        .with_projection(mask)
        .build()
        .map_err(|e| failed(&e))?;
    while let Some(batch) = batches.next().await {
        let batch = batch.map_err(|e| failed(&e))?;
        let ids = batch
            .column_by_name("record_id")
            .and_then(|c| c.as_string_opt::<i32>())
            .ok_or_else(|| failed(&"no `record_id` column of type Utf8"))?;
        ids.iter().flatten().for_each(&mut each);
    }
    Ok(())
}

/// One object, read by ranges, owned so that a Parquet stream can hold it.
struct Owned {
    store: Arc<dyn ObjectStore>,
    path: Path,
    size: u64,
}

impl AsyncFileReader for Owned {
    fn get_bytes(
        &mut self,
        range: std::ops::Range<u64>,
    ) -> BoxFuture<'_, parquet::errors::Result<Bytes>> {
        async move {
            self.store
                .get_range(&self.path, range)
                .await
                .map_err(|e| ParquetError::External(Box::new(e)))
        }
        .boxed()
    }

    fn get_metadata<'a>(
        &'a mut self,
        _options: Option<&'a ArrowReaderOptions>,
    ) -> BoxFuture<'a, parquet::errors::Result<Arc<ParquetMetaData>>> {
        async move {
            let footer = ParquetMetaDataReader::new()
                .load_and_finish(
                    Ranged {
                        store: self.store.as_ref(),
                        path: &self.path,
                    },
                    self.size,
                )
                .await?;
            Ok(Arc::new(footer))
        }
        .boxed()
    }
}

/// Byte ranges of one object, for the Parquet footer reader (a footer is read with one or
/// two range requests, never the whole file).
struct Ranged<'a> {
    store: &'a dyn ObjectStore,
    path: &'a Path,
}

impl MetadataFetch for Ranged<'_> {
    fn fetch(
        &mut self,
        range: std::ops::Range<u64>,
    ) -> BoxFuture<'_, parquet::errors::Result<Bytes>> {
        async move {
            let mut got = self
                .store
                .get_ranges(self.path, std::slice::from_ref(&range))
                .await
                .map_err(|e| ParquetError::External(Box::new(e)))?;
            got.pop()
                .ok_or_else(|| ParquetError::General(format!("no bytes for {range:?}")))
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aob_model::audit::{AuditKind, DecisionRecord};
    use object_store::{ObjectStoreExt, PutPayload};

    #[test]
    fn days_are_utc_calendar_days() {
        let d = |us: i64| Date::from_unix_micros(us).to_string();
        assert_eq!(d(0), "1970-01-01");
        assert_eq!(d(-1), "1969-12-31");
        assert_eq!(d(1_795_219_200_000_000), "2026-11-21");
        assert_eq!(d(1_795_219_200_000_000 - 1), "2026-11-20");
        assert_eq!(d(951_782_400_000_000), "2000-02-29");
        assert_eq!(d(4_107_542_400_000_000), "2100-03-01");
        assert_eq!(d(253_402_300_799_999_999), "9999-12-31");
    }

    #[test]
    fn object_names_sort_by_sequence_and_parse_back() {
        let date = Date::from_unix_micros(1_795_219_200_000_000);
        let stream = 1_795_219_200_123_456_789;
        let p = object_path(&Path::from("audit/v1"), "acme", date, stream, 7, 1_234);
        assert_eq!(
            p.to_string(),
            "audit/v1/tenant=acme/date=2026-11-21/01795219200123456789-00000000000000000007-00000000000000001234.parquet"
        );
        let later = object_path(
            &Path::from("audit/v1"),
            "acme",
            date,
            stream,
            1_235,
            u64::MAX,
        );
        let next_stream = object_path(&Path::from("audit/v1"), "acme", date, stream + 1, 1, 1);
        assert!(
            later.to_string() < next_stream.to_string(),
            "a stream created later sorts after"
        );
        assert!(
            p.to_string() < later.to_string(),
            "zero padding keeps stream order"
        );
        assert!(
            later
                .to_string()
                .ends_with("00000000000000001235-18446744073709551615.parquet")
        );
        let root = object_path(&Path::default(), "t", date, 5, 1, 2);
        assert_eq!(
            root.to_string(),
            "tenant=t/date=2026-11-21/00000000000000000005-00000000000000000001-00000000000000000002.parquet"
        );
        assert_eq!(
            parse_object_path(&Path::from("audit/v1"), &p),
            Some(ObjectName {
                tenant: "acme".into(),
                date: "2026-11-21".into(),
                stream: Some(stream),
                first_seq: 7,
                last_seq: 1_234
            })
        );
        // Names from before the stream was part of them still parse.
        assert_eq!(
            parse_object_path(
                &Path::default(),
                &Path::from(
                    "tenant=t/date=2026-11-21/00000000000000000001-00000000000000000002.parquet"
                )
            )
            .map(|n| (n.stream, n.first_seq, n.last_seq)),
            Some((None, 1, 2))
        );
        assert_eq!(
            parse_object_path(&Path::default(), &Path::from("tenant=t/x.parquet")),
            None
        );
        assert_eq!(
            parse_object_path(
                &Path::default(),
                &Path::from("tenant=t/date=2026-11-21/1-2.parquet")
            ),
            None
        );
    }

    #[test]
    fn bad_urls_say_what_is_wrong() {
        let err = |u: &str| open(u).err().map(|e| e.to_string()).unwrap_or_default();
        let e = err("not a url");
        assert!(e.contains("`not a url`") && e.contains("file:///"), "{e}");
        let e = err("ftp://host/dir");
        assert!(e.contains("unsupported scheme `ftp`"), "{e}");
        let e = err("file://relative/dir");
        assert!(e.contains("three slashes"), "{e}");
        let e = err("s3:///prefix-only");
        assert!(
            e.contains("`s3:///prefix-only`") && e.contains("bucket"),
            "{e}"
        );
    }

    #[test]
    fn cloud_urls_give_their_prefix() {
        let (_, prefix) = open("s3://bucket/audit/v1").unwrap();
        assert_eq!(prefix.as_ref(), "audit/v1");
        let (_, prefix) = open("memory:///x/y").unwrap();
        assert_eq!(prefix.as_ref(), "x/y");
    }

    #[tokio::test]
    async fn file_urls_create_the_directory_and_list_reads_footers() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("audit/nested");
        let (store, prefix) = open(&format!("file://{}", dir.display())).unwrap();
        assert!(dir.is_dir());
        assert_eq!(prefix.as_ref(), "");
        assert!(list(&store, &prefix).await.unwrap().is_empty());
        let date = Date::from_unix_micros(1_795_219_200_000_000);
        let rec = |i: u32| {
            DecisionRecord::new(
                format!("r{i}"),
                "acme",
                "run",
                AuditKind::TaskExecuted,
                "fn.http",
                1_795_219_200_000_000,
            )
        };
        let three = crate::encode(&[rec(1), rec(2), rec(3)]).unwrap();
        let one = crate::encode(&[rec(4)]).unwrap();
        let (a, b) = (
            object_path(&prefix, "acme", date, 9, 1, 3),
            object_path(&prefix, "acme", date, 9, 4, 4),
        );
        store
            .put(&b, PutPayload::from_bytes(one.clone()))
            .await
            .unwrap();
        store
            .put(&a, PutPayload::from_bytes(three.clone()))
            .await
            .unwrap();
        store
            .put(
                &Path::from("notes.txt"),
                PutPayload::from_static(b"not parquet"),
            )
            .await
            .unwrap();
        assert!(
            dir.join(a.to_string()).is_file(),
            "paths are relative to the directory"
        );
        let mut ids = Vec::new();
        for_each_record_id(&store, &a, three.len() as u64, |id| {
            ids.push(id.to_string())
        })
        .await
        .unwrap();
        assert_eq!(ids, ["r1", "r2", "r3"]);
        let files = list(&store, &prefix).await.unwrap();
        assert_eq!(
            files,
            [
                FileInfo {
                    path: a,
                    size: three.len() as u64,
                    rows: 3
                },
                FileInfo {
                    path: b,
                    size: one.len() as u64,
                    rows: 1
                },
            ]
        );
        // A prefix inside the store lists only below it.
        let (store, prefix) = open(&format!("file://{}", tmp.path().display())).unwrap();
        assert_eq!(list(&store, &prefix).await.unwrap().len(), 2);
        let under = list(&store, &Path::from("audit/nested/tenant=acme"))
            .await
            .unwrap();
        assert_eq!(under.len(), 2);
        assert!(
            list(&store, &Path::from("elsewhere"))
                .await
                .unwrap()
                .is_empty()
        );
    }
}

//! The audit sink: `AOB_AUDIT` → Parquet objects, every record exactly once.
//!
//! The sink pulls from the durable consumer `audit-sink`, keeps good records in a batch
//! keyed by stream sequence, and flushes the batch when it holds `max_rows` records or
//! `max_bytes` of JSON, when its oldest record is `max_age` old, or when asked on
//! [`AUDIT_FLUSH`]. A flush groups the batch by tenant and UTC day and writes one object
//! per group, named by the group's first and last stream sequence ([`object_path`]).
//!
//! # Exactly-once rows
//!
//! Messages are acknowledged only after the objects holding them are durable, so nothing
//! is lost. One ack covers a batch (ack policy `all`); ARCHITECTURE.md explains why it
//! never covers a record that is not durable. Duplicates are prevented by an intent log,
//! the key [`INTENT_KEY`] in the bucket `AOB_AUDIT_SINK`, written by compare-and-set
//! ([`Intent`]):
//!
//! 1. before writing, `state: "writing"` with the exact set of sequences of the batch
//!    (`seqs`, as ranges) and the object names (`files`);
//! 2. after every object is written, `state: "written"`;
//! 3. after the batch is acknowledged (and the ack flushed to the server),
//!    `state: "done"`.
//!
//! On start, a `writing` intent means the last process died before any ack of that batch:
//! its records are read back from the stream by sequence, grouped the same way and written
//! again under the same names, overwriting whatever part was written (names listed in the
//! intent that the rewrite does not produce, which only happens if a record vanished from
//! the stream, are deleted). Every sequence whose rows are durable is kept in `written`
//! until the consumer's ack floor passes it: a redelivered message whose sequence is at or
//! below the ack floor, or in `written`, is not written again (the next ack covers it).
//!
//! The intent also names the stream it speaks of (`stream`, the creation time of
//! `AOB_AUDIT`) and keeps `floor`, the highest ack floor the consumer ever reached in that
//! stream: every sequence at or below it is durable or dead-lettered. A consumer deleted and
//! created again (as `aob streams apply` asks for on some upgrades) starts from an ack floor
//! of 0 and delivers everything again; the sink skips it by `floor` and `written`. A stream
//! created again restarts its sequences, so all of that is forgotten when `stream` differs,
//! and what keeps a record from a second row then is the record-id index
//! ([`crate::index`]): before a batch is written, rows whose `record_id` already is in a
//! file of their tenant and day are left out. Object names carry the stream's creation
//! time, so a new stream's files never overwrite an old one's.
//!
//! Why not just "skip every sequence ≤ the last completed batch's last sequence"
//! (`done_upto`, still recorded for operators)? Batches are not contiguous in sequence:
//! a sequence can come back after later ones were written (a redelivery after the ack
//! wait, or a delivery read back after a gap), and skipping by `done_upto` would then drop
//! it.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aob_model::audit::DecisionRecord;
use aob_streams::subjects::{self, AUDIT_FLUSH};
use async_nats::jetstream::{self, consumer::PullConsumer, kv};
use bytes::Bytes;
use futures::StreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::index::Index;
use crate::store::{Date, object_path};
use crate::{Error, Result};

/// Key of the intent record in the `AOB_AUDIT_SINK` bucket.
pub const INTENT_KEY: &str = "intent";

/// Largest record message accepted, in bytes; larger ones are dead-lettered.
pub const MAX_MESSAGE_BYTES: usize = 1024 * 1024;

/// Most sequence ranges in one batch: a batch this fragmented (many interleaved
/// redeliveries) is flushed early so that its intent record stays small.
pub const MAX_RANGES: usize = 2048;

/// A record with its stream sequence.
pub type Row = (u64, Arc<DecisionRecord>);

/// Component name in dead letters (`aob.<tenant>.dlq.audit`).
pub const COMPONENT: &str = "audit";

/// When a batch is flushed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkConfig {
    /// Rows (`AOB_AUDIT_MAX_ROWS`, default 50,000).
    pub max_rows: usize,
    /// Bytes of record JSON (`AOB_AUDIT_MAX_BYTES`, default 64 MiB).
    pub max_bytes: usize,
    /// Longest a record waits from its publish to being in an object (`AOB_AUDIT_MAX_AGE`,
    /// default `5s`): a batch is written when its oldest record is 4/5 of this old.
    pub max_age: Duration,
    /// For crash tests only (`AOB_AUDIT_FAILPOINT`): stop as if killed at this point of the
    /// first batch flushed.
    pub failpoint: Option<Failpoint>,
}

impl Default for SinkConfig {
    fn default() -> Self {
        SinkConfig {
            max_rows: 50_000,
            max_bytes: 64 * 1024 * 1024,
            max_age: Duration::from_secs(5),
            failpoint: None,
        }
    }
}

/// A point of a flush where a crash test makes the sink stop as if killed: [`serve`]
/// returns [`Error::Failpoint`] at once, sending nothing more (the binary then exits with an
/// error). Failpoints apply to batches from the consumer, not to the rewrite of an
/// interrupted batch at start, so a sink with a failpoint still repairs what the last one
/// left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failpoint {
    /// `after_intent`: the `writing` intent is recorded, no object is written.
    AfterIntent,
    /// `after_write`: every object is written, the intent still says `writing`.
    AfterWrite,
    /// `after_written`: the intent says `written`, no message is acknowledged.
    AfterWritten,
    /// `mid_ack`: half of the batch is acknowledged (and the acks flushed to the server).
    MidAck,
}

impl Failpoint {
    /// Its name in `AOB_AUDIT_FAILPOINT`.
    pub fn as_str(self) -> &'static str {
        match self {
            Failpoint::AfterIntent => "after_intent",
            Failpoint::AfterWrite => "after_write",
            Failpoint::AfterWritten => "after_written",
            Failpoint::MidAck => "mid_ack",
        }
    }
}

impl std::str::FromStr for Failpoint {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        [
            Failpoint::AfterIntent,
            Failpoint::AfterWrite,
            Failpoint::AfterWritten,
            Failpoint::MidAck,
        ]
        .into_iter()
        .find(|f| f.as_str() == s.trim())
        .ok_or_else(|| {
            Error::Config(format!(
                "AOB_AUDIT_FAILPOINT=`{s}` is not one of after_intent, after_write, after_written, mid_ack"
            ))
        })
    }
}

impl SinkConfig {
    /// The defaults, overridden by `AOB_AUDIT_MAX_ROWS`, `AOB_AUDIT_MAX_BYTES` (bytes) and
    /// `AOB_AUDIT_MAX_AGE` (a duration such as `5s` or `500ms`).
    pub fn from_env() -> Result<Self> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// Like [`SinkConfig::from_env`], reading variables through `get`; also reads the test
    /// knob `AOB_AUDIT_FAILPOINT` ([`Failpoint`]).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let mut cfg = SinkConfig::default();
        let count = |name: &str, v: String| -> Result<usize> {
            match v.trim().parse::<usize>() {
                Ok(n) if n > 0 => Ok(n),
                _ => Err(Error::Config(format!(
                    "{name}=`{v}` is not a positive whole number"
                ))),
            }
        };
        if let Some(v) = get("AOB_AUDIT_MAX_ROWS") {
            cfg.max_rows = count("AOB_AUDIT_MAX_ROWS", v)?;
        }
        if let Some(v) = get("AOB_AUDIT_MAX_BYTES") {
            cfg.max_bytes = count("AOB_AUDIT_MAX_BYTES", v)?;
        }
        if let Some(v) = get("AOB_AUDIT_MAX_AGE") {
            cfg.max_age = humantime::parse_duration(v.trim())
                .ok()
                .filter(|d| !d.is_zero())
                .ok_or_else(|| {
                    Error::Config(format!(
                        "AOB_AUDIT_MAX_AGE=`{v}` is not a duration above zero (e.g. `5s`, `500ms`)"
                    ))
                })?;
        }
        if let Some(v) = get("AOB_AUDIT_FAILPOINT").filter(|v| !v.trim().is_empty()) {
            cfg.failpoint = Some(v.parse()?);
        }
        Ok(cfg)
    }
}

/// A set of stream sequences as sorted, disjoint, non-adjacent inclusive ranges; serialized
/// as `[[first, last], ...]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Ranges(Vec<[u64; 2]>);

impl Ranges {
    /// The set of the given sequences (any order, duplicates allowed).
    pub fn of(seqs: impl IntoIterator<Item = u64>) -> Ranges {
        let mut v: Vec<u64> = seqs.into_iter().collect();
        v.sort_unstable();
        let mut out: Vec<[u64; 2]> = Vec::new();
        for s in v {
            match out.last_mut() {
                Some(r) if s <= r[1].saturating_add(1) => r[1] = r[1].max(s),
                _ => out.push([s, s]),
            }
        }
        Ranges(out)
    }

    /// Sorts and merges ranges read from elsewhere.
    pub fn normalized(self) -> Ranges {
        let mut v = self.0;
        v.retain(|r| r[0] <= r[1]);
        v.sort_unstable();
        let mut out: Vec<[u64; 2]> = Vec::with_capacity(v.len());
        for r in v {
            match out.last_mut() {
                Some(last) if r[0] <= last[1].saturating_add(1) => last[1] = last[1].max(r[1]),
                _ => out.push(r),
            }
        }
        Ranges(out)
    }

    /// True when `seq` is in the set.
    pub fn contains(&self, seq: u64) -> bool {
        let i = self.0.partition_point(|r| r[1] < seq);
        self.0.get(i).is_some_and(|r| r[0] <= seq)
    }

    /// Adds every sequence of `other`.
    pub fn union(&mut self, other: &Ranges) {
        let mut v = std::mem::take(&mut self.0);
        v.extend_from_slice(&other.0);
        *self = Ranges(v).normalized();
    }

    /// Removes every sequence up to and including `floor`.
    pub fn prune_upto(&mut self, floor: u64) {
        self.0.retain(|r| r[1] > floor);
        if let Some(first) = self.0.first_mut() {
            first[0] = first[0].max(floor.saturating_add(1));
        }
    }

    /// Number of ranges.
    pub fn ranges(&self) -> usize {
        self.0.len()
    }

    /// Number of sequences.
    pub fn count(&self) -> u64 {
        self.0.iter().map(|r| r[1] - r[0] + 1).sum()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Smallest and largest sequence.
    pub fn bounds(&self) -> Option<(u64, u64)> {
        Some((self.0.first()?[0], self.0.last()?[1]))
    }

    /// Every sequence, ascending.
    pub fn seqs(&self) -> impl Iterator<Item = u64> + '_ {
        self.0.iter().flat_map(|r| r[0]..=r[1])
    }
}

/// Stage of the batch described by an [`Intent`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IntentState {
    /// Objects are being written; none of the batch's messages is acknowledged.
    Writing,
    /// Every object is durable; acknowledgements are being sent.
    Written,
    /// Every message of the batch is acknowledged.
    Done,
}

/// The intent record (`AOB_AUDIT_SINK` / `intent`), JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Intent {
    /// Smallest stream sequence of the batch.
    pub first: u64,
    /// Largest stream sequence of the batch.
    pub last: u64,
    /// Rows written for the batch.
    pub count: u64,
    /// Stage.
    pub state: IntentState,
    /// Exactly the stream sequences of the batch.
    #[serde(default)]
    pub seqs: Ranges,
    /// The batch's object paths.
    #[serde(default)]
    pub files: Vec<String>,
    /// Sequences whose rows are durable and that may still be redelivered (above the
    /// consumer's ack floor when last pruned).
    #[serde(default)]
    pub written: Ranges,
    /// Largest `last` of a completed batch; informational only (see the module docs).
    #[serde(default)]
    pub done_upto: u64,
    /// Creation time of the `AOB_AUDIT` stream the sequences belong to, in nanoseconds
    /// since the Unix epoch; 0 in an intent written before the field existed (taken to be
    /// the current stream).
    #[serde(default)]
    pub stream: u64,
    /// Highest ack floor of the consumer seen in that stream: every sequence up to it is
    /// durable (or dead-lettered), even if the consumer was created again since.
    #[serde(default)]
    pub floor: u64,
}

/// The rows of one object: one tenant, one UTC day.
#[derive(Debug, Clone)]
pub struct Group {
    /// Tenant.
    pub tenant: String,
    /// Day of `finished_at`.
    pub date: Date,
    /// Stream sequence of the first row.
    pub first_seq: u64,
    /// Stream sequence of the last row.
    pub last_seq: u64,
    /// Rows, in stream order.
    pub records: Vec<Arc<DecisionRecord>>,
}

impl Group {
    /// Object path of the group under `prefix`, for the stream created at `stream`.
    pub fn path(&self, prefix: &Path, stream: u64) -> Path {
        object_path(
            prefix,
            &self.tenant,
            self.date,
            stream,
            self.first_seq,
            self.last_seq,
        )
    }
}

/// Splits records (with their stream sequences) into groups by tenant and UTC day, ordered
/// by tenant then day. The result depends only on the set of `(sequence, record)` pairs,
/// never on their order, so a rewrite of the same set gives the same objects. A record
/// whose `record_id` already appeared at a lower sequence is left out; the second value
/// counts those.
pub fn group(records: impl IntoIterator<Item = Row>) -> (Vec<Group>, usize) {
    let mut all: Vec<Row> = records.into_iter().collect();
    all.sort_by_key(|(s, _)| *s);
    all.dedup_by_key(|(s, _)| *s);
    let mut seen = HashSet::with_capacity(all.len());
    let mut dropped = 0;
    let mut groups: BTreeMap<(String, Date), Group> = BTreeMap::new();
    for (seq, r) in all {
        if !seen.insert(r.record_id.clone()) {
            dropped += 1;
            continue;
        }
        let date = Date::from_unix_micros(r.finished_at_us);
        let g = groups
            .entry((r.tenant.clone(), date))
            .or_insert_with(|| Group {
                tenant: r.tenant.clone(),
                date,
                first_seq: seq,
                last_seq: seq,
                records: Vec::new(),
            });
        g.last_seq = seq;
        g.records.push(r);
    }
    (groups.into_values().collect(), dropped)
}

/// Parses and checks one audit message; the error is the dead-letter reason.
pub fn parse_record(subject: &str, body: &[u8]) -> std::result::Result<DecisionRecord, String> {
    if body.len() > MAX_MESSAGE_BYTES {
        return Err(format!(
            "audit record of {} bytes is larger than the limit of {MAX_MESSAGE_BYTES}",
            body.len()
        ));
    }
    let record: DecisionRecord =
        serde_json::from_slice(body).map_err(|e| format!("not a decision record: {e}"))?;
    record.check()?;
    let tenant = subjects::tenant_of(subject).unwrap_or_default();
    if record.tenant != tenant {
        return Err(format!(
            "record of tenant `{}` arrived on a subject of tenant `{tenant}`",
            record.tenant
        ));
    }
    if !subjects::is_token(&record.tenant) {
        return Err(format!(
            "tenant `{}` is not a valid subject token",
            record.tenant
        ));
    }
    Ok(record)
}

/// What the sink of this process has written since it started, for `/metrics`.
static WRITTEN: [std::sync::atomic::AtomicU64; 5] =
    [const { std::sync::atomic::AtomicU64::new(0) }; 5];
const BATCHES: usize = 0;
const ROWS: usize = 1;
const BYTES: usize = 2;
const REFUSED: usize = 3;
const MICROS: usize = 4;

fn count(what: usize, n: u64) {
    WRITTEN[what].fetch_add(n, std::sync::atomic::Ordering::Relaxed);
}

/// The sink's counters as Prometheus text: batches written, rows, bytes, records refused
/// (dead-lettered) and the time spent writing batches.
pub fn metrics() -> String {
    let get = |i: usize| WRITTEN[i].load(std::sync::atomic::Ordering::Relaxed);
    format!(
        "# HELP aob_audit_batches_total Audit batches written to object storage and acknowledged.\n\
         # TYPE aob_audit_batches_total counter\naob_audit_batches_total {}\n\
         # HELP aob_audit_rows_total Rows written in those batches.\n\
         # TYPE aob_audit_rows_total counter\naob_audit_rows_total {}\n\
         # HELP aob_audit_bytes_total Bytes of Parquet written.\n\
         # TYPE aob_audit_bytes_total counter\naob_audit_bytes_total {}\n\
         # HELP aob_audit_refused_total Records that were not DecisionRecords, dead-lettered.\n\
         # TYPE aob_audit_refused_total counter\naob_audit_refused_total {}\n\
         # HELP aob_audit_batch_seconds_total Time spent writing and acknowledging batches.\n\
         # TYPE aob_audit_batch_seconds_total counter\naob_audit_batch_seconds_total {}\n",
        get(BATCHES),
        get(ROWS),
        get(BYTES),
        get(REFUSED),
        get(MICROS) as f64 / 1e6,
    )
}

/// What one flush wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlushReport {
    /// Object paths written.
    pub files: Vec<String>,
    /// Rows written.
    pub rows: usize,
    /// Records not yet acknowledged by the sink after the flush (delivered to a sink that
    /// died, still in flight, or not yet delivered); poll until 0 to wait for a quiet
    /// stream. Approximate: the server may not have processed the last acks yet.
    #[serde(default)]
    pub pending: u64,
}

/// A message as it arrived: parsed when its batch is written, on the writer's task, so
/// that the task reading the consumer does as little as possible per message.
struct Raw {
    subject: async_nats::Subject,
    payload: Bytes,
}

/// One message in the batch.
struct Entry {
    raw: Raw,
    /// The delivery, kept only for the `mid_ack` failpoint.
    msg: Option<jetstream::Message>,
}

/// The records waiting for a flush, by stream sequence.
#[derive(Default)]
struct Batch {
    entries: BTreeMap<u64, Entry>,
    /// The newest delivery of the highest sequence delivered to this sink: acknowledging it
    /// (ack policy `all`) acknowledges the whole batch once the batch is durable.
    top: Option<(u64, jetstream::Message)>,
    bytes: usize,
    ranges: usize,
    oldest: Option<Instant>,
    /// When the first record of the batch arrived here.
    first_arrival: Option<Instant>,
}

/// The `Instant` of a wall-clock time in nanoseconds since the Unix epoch (now, for a
/// time in the future or one the clock cannot place).
fn instant_of(unix_ns: i128) -> Instant {
    let now = Instant::now();
    let now_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i128);
    u64::try_from((now_ns - unix_ns).max(0))
        .ok()
        .and_then(|lag| now.checked_sub(Duration::from_nanos(lag)))
        .unwrap_or(now)
}

/// Keeps in `slot` whichever delivery has the higher sequence (the later one on a tie).
fn keep_highest(slot: &mut Option<(u64, jetstream::Message)>, seq: u64, msg: jetstream::Message) {
    if slot.as_ref().is_none_or(|(s, _)| seq >= *s) {
        *slot = Some((seq, msg));
    }
}

impl Batch {
    /// Adds a message; `published` is when it was published, for the age of the batch.
    fn insert(&mut self, seq: u64, published: Instant, raw: Raw, msg: Option<jetstream::Message>) {
        let before = seq
            .checked_sub(1)
            .is_some_and(|s| self.entries.contains_key(&s));
        let after = seq
            .checked_add(1)
            .is_some_and(|s| self.entries.contains_key(&s));
        match (before, after) {
            (true, true) => self.ranges = self.ranges.saturating_sub(1),
            (false, false) => self.ranges += 1,
            _ => {}
        }
        self.bytes += raw.payload.len();
        // Age counts from the publish, not from the arrival here.
        self.oldest = Some(self.oldest.map_or(published, |o| o.min(published)));
        self.first_arrival.get_or_insert_with(Instant::now);
        self.entries.insert(seq, Entry { raw, msg });
    }

    fn full(&self, cfg: &SinkConfig) -> bool {
        self.entries.len() >= cfg.max_rows
            || self.bytes >= cfg.max_bytes
            || self.ranges > MAX_RANGES
    }
}

/// Retry delays for transient failures (NATS, object store): 250 ms doubling to 30 s.
struct Backoff(Duration);

impl Backoff {
    fn new() -> Self {
        Backoff(Duration::from_millis(250))
    }

    /// Sleeps before the next attempt; `Err` when the failure is fatal or on shutdown.
    async fn wait(&mut self, shutdown: &CancellationToken, what: &str, e: Error) -> Result<()> {
        if matches!(e, Error::Conflict(_) | Error::Config(_)) {
            return Err(e);
        }
        tracing::warn!("{what} failed, retrying in {:?}: {e}", self.0);
        tokio::select! {
            _ = shutdown.cancelled() => return Err(Error::Shutdown),
            _ = tokio::time::sleep(self.0) => {}
        }
        self.0 = (self.0 * 2).min(Duration::from_secs(30));
        Ok(())
    }
}

/// A batch taken for writing.
struct Cut {
    raws: Vec<(u64, Raw)>,
    /// Every sequence of the batch, messages to dead-letter included.
    seqs: Ranges,
    /// The delivery whose acknowledgement acknowledges the batch.
    ack: Option<jetstream::Message>,
    /// For the `mid_ack` failpoint: a delivery from the middle of the batch.
    mid: Option<jetstream::Message>,
}

/// Writes batches and keeps the intent log. It works on one batch at a time, on a task of
/// its own, while the sink gathers the next batch.
struct Writer {
    client: async_nats::Client,
    js: jetstream::Context,
    consumer: PullConsumer,
    kv: kv::Store,
    store: Arc<dyn ObjectStore>,
    prefix: Path,
    cfg: SinkConfig,
    /// Revision of the intent key for compare-and-set; `None` when the key never existed.
    revision: Option<u64>,
    /// Durable sequences that may still be redelivered.
    written: Ranges,
    /// The consumer's ack floor when last read: every sequence up to it is acknowledged.
    floor: u64,
    done_upto: u64,
    /// Creation time of `AOB_AUDIT` (ns since the Unix epoch): part of every object name.
    stream: u64,
    /// Record ids already in the files.
    index: Index,
}

/// A flush running on its own task; it hands the writer back. Dropping it (the sink
/// stopped or was dropped) aborts the task, so that a flush never outlives its sink.
struct Flight(tokio::task::JoinHandle<(Writer, Result<FlushReport>)>);

impl Drop for Flight {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Gathers records from the consumer into batches and hands them to the [`Writer`].
///
/// Acknowledgements use the consumer's ack policy `all`: acknowledging sequence `s`
/// acknowledges every delivered message up to `s`, so one ack covers a batch. That is only
/// safe if every message at or below `s` that the server counts as delivered is durable.
/// The sink keeps a horizon: every stream sequence at or below it has been seen here (read,
/// adopted from the stream, or known durable), and every seen sequence is durable once the
/// batches before it are written. A batch's ack sequence never exceeds the horizon when
/// the batch was cut. Deliveries this sink never saw (delivered to a sink that died, or
/// lost on a reconnect) are found by their consumer sequence: the server numbers every
/// delivery of the consumer, so a gap means a delivery went elsewhere, and the sink then
/// reads every sequence up to the consumer's delivered sequence from the stream itself
/// ("adopts" it) before it acks past it.
struct Sink {
    writer: Option<Writer>,
    flight: Option<Flight>,
    /// Sequences of the batch in flight.
    flying: Ranges,
    /// The writer's durable set and ack floor when it last came back.
    durable: Ranges,
    floor: u64,
    cfg: SinkConfig,
    consumer: PullConsumer,
    stream: jetstream::stream::Stream,
    batch: Batch,
    /// A redelivery of a durable record, acknowledged with the next batch.
    held: Option<(u64, jetstream::Message)>,
    /// Every stream sequence up to here has been seen by this sink.
    horizon: u64,
    /// Highest consumer (delivery) sequence seen.
    last_delivery: u64,
    /// Creation time of `AOB_AUDIT` when the sink started.
    created: u64,
}

/// Serves the audit sink until `shutdown`: pulls `audit-sink`, writes Parquet objects under
/// `prefix` in `store`, answers flush requests on [`AUDIT_FLUSH`] (`aob.audit.flush`). On
/// shutdown the current batch is flushed (one attempt) before returning.
///
/// Fails when the topology is missing (`aob streams apply`), when the intent log is
/// unreadable, or when another sink changes the intent log.
pub async fn serve(
    client: async_nats::Client,
    store: Arc<dyn ObjectStore>,
    prefix: Path,
    cfg: SinkConfig,
    shutdown: CancellationToken,
) -> Result<()> {
    let js = jetstream::new(client.clone());
    let consumer =
        aob_runtime::nats::bind(&js, aob_streams::AUDIT, aob_streams::AUDIT_SINK).await?;
    let topology = |what: &str, e: &dyn std::fmt::Display| {
        Error::Runtime(aob_runtime::Error::Topology(format!("{what}: {e}")))
    };
    let kv = js
        .get_key_value(aob_streams::AUDIT_SINK_BUCKET)
        .await
        .map_err(|e| topology(&format!("bucket {}", aob_streams::AUDIT_SINK_BUCKET), &e))?;
    let stream = js
        .get_stream(aob_streams::AUDIT)
        .await
        .map_err(|e| topology(&format!("stream {}", aob_streams::AUDIT), &e))?;
    let created = created_ns(stream.cached_info().created.unix_timestamp_nanos());
    let mut writer = Writer {
        client: client.clone(),
        js: js.clone(),
        consumer: consumer.clone(),
        kv,
        store,
        prefix,
        cfg: cfg.clone(),
        revision: None,
        written: Ranges::default(),
        floor: 0,
        done_upto: 0,
        stream: created,
        index: Index::default(),
    };
    match writer.recover(&stream, &shutdown).await {
        Ok(()) => {}
        Err(Error::Shutdown) => return Ok(()),
        Err(e) => return Err(e),
    }
    let mut sink = Sink {
        durable: writer.written.clone(),
        floor: writer.floor,
        writer: Some(writer),
        flight: None,
        flying: Ranges::default(),
        cfg,
        consumer,
        stream,
        batch: Batch::default(),
        held: None,
        horizon: 0,
        last_delivery: 0,
        created,
    };
    // What the last sink was given but did not acknowledge is read from the stream now, so
    // that this sink's acknowledgements never pass a record that is not durable.
    match sink.catch_up(&shutdown).await {
        Ok(()) => {}
        Err(Error::Shutdown) => return Ok(()),
        Err(e) => return Err(e),
    }
    let mut flushes = client
        .queue_subscribe(AUDIT_FLUSH, "aob-audit".to_string())
        .await
        .map_err(|e| Error::Nats(format!("subscribing to {AUDIT_FLUSH}: {e}")))?;
    let mut messages = sink
        .consumer
        .stream()
        .max_messages_per_batch(1000)
        .expires(aob_runtime::nats::PULL_EXPIRES)
        .heartbeat(aob_runtime::nats::PULL_HEARTBEAT)
        .messages()
        .await
        .map_err(|e| Error::Nats(format!("consuming {}: {e}", aob_streams::AUDIT_SINK)))?;
    tracing::info!(
        max_rows = sink.cfg.max_rows,
        max_bytes = sink.cfg.max_bytes,
        max_age = %humantime::format_duration(sink.cfg.max_age),
        horizon = sink.horizon,
        "audit sink serving"
    );
    loop {
        // Written when the oldest record is 4/5 of max_age old, so that it is queryable
        // within max_age of its publish; but not before the batch has gathered for 1/5 of
        // max_age, so that a backlog of old records is written in full batches.
        let due = sink.batch.oldest.map(|t| {
            let by_age = t + sink.cfg.max_age.mul_f64(0.8);
            let gathered = sink
                .batch
                .first_arrival
                .map_or(by_age, |f| f + sink.cfg.max_age.mul_f64(0.2));
            by_age.max(gathered)
        });
        let age = async move {
            match due {
                Some(d) => tokio::time::sleep_until(d.into()).await,
                None => std::future::pending().await,
            }
        };
        let flight = async {
            match sink.flight.as_mut() {
                Some(f) => (&mut f.0).await,
                None => std::future::pending().await,
            }
        };
        let step = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            landed = flight => {
                sink.flight = None;
                sink.landed(landed).map(|_| ())
            }
            req = flushes.next() => {
                let Some(req) = req else {
                    return Err(Error::Nats(format!("subscription to {AUDIT_FLUSH} ended")));
                };
                let result = sink.flush_now(&shutdown).await;
                if let Some(reply) = req.reply {
                    let body = match &result {
                        Ok(report) => serde_json::to_vec(report).unwrap_or_default(),
                        Err(e) => serde_json::to_vec(&serde_json::json!({"error": e.to_string()}))
                            .unwrap_or_default(),
                    };
                    if let Err(e) = client.publish(reply, body.into()).await {
                        tracing::warn!("could not answer a flush request: {e}");
                    }
                }
                result.map(|_| ())
            }
            m = messages.next() => match m {
                Some(Ok(msg)) => match sink.accept(msg, &shutdown).await {
                    Ok(()) if sink.batch.full(&sink.cfg) => sink.launch(&shutdown).await.map(|_| ()),
                    other => other,
                },
                Some(Err(e)) => {
                    tracing::warn!("audit consumer error: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    Ok(())
                }
                None => {
                    return Err(Error::Nats(format!(
                        "the {} consumer stream ended",
                        aob_streams::AUDIT_SINK
                    )))
                }
            },
            // After messages: a backlog fills batches by size; a live stream flushes by age.
            _ = age => sink.launch(&shutdown).await.map(|_| ()),
        };
        match step {
            Ok(()) => {}
            Err(Error::Shutdown) => return Ok(()),
            Err(e) => return Err(e),
        }
    }
    // Graceful stop: write what is held, so the next sink has nothing to wait for.
    match sink.flush_now(&shutdown).await {
        Ok(_) | Err(Error::Shutdown) => {}
        Err(e) => return Err(e),
    }
    let _ = client.flush().await;
    tracing::info!("audit sink stopped");
    Ok(())
}

impl Sink {
    /// Adopts what the consumer delivered before this sink started.
    async fn catch_up(&mut self, shutdown: &CancellationToken) -> Result<()> {
        let info = self.consumer_info(shutdown).await?;
        self.floor = self.floor.max(info.ack_floor.stream_sequence);
        self.horizon = self.floor;
        self.last_delivery = info.delivered.consumer_sequence;
        let upto = info.delivered.stream_sequence;
        if upto > self.horizon {
            tracing::info!(
                from = self.horizon + 1,
                upto,
                "reading records delivered to an earlier sink but not acknowledged"
            );
        }
        self.adopt(upto, shutdown).await
    }

    /// Fails when `AOB_AUDIT` is not the stream this sink started on; otherwise, when
    /// `delivery` is not above the last one, the consumer was created again and numbers its
    /// deliveries afresh.
    async fn check_stream(&mut self, delivery: u64, shutdown: &CancellationToken) -> Result<()> {
        let mut backoff = Backoff::new();
        let created = loop {
            match self.stream.info().await {
                Ok(info) => break created_ns(info.created.unix_timestamp_nanos()),
                Err(e) => {
                    backoff
                        .wait(
                            shutdown,
                            "reading the audit stream's state",
                            Error::Nats(e.to_string()),
                        )
                        .await?
                }
            }
        };
        if created != self.created {
            return Err(Error::Recreated(format!(
                "the stream {} was deleted and created again while the audit sink ran (created \
                 {} ns, now {created} ns after the Unix epoch); restart the sink, which then \
                 skips records already in the files by their record_id",
                aob_streams::AUDIT,
                self.created
            )));
        }
        if delivery <= self.last_delivery {
            tracing::info!(
                was = self.last_delivery,
                now = delivery,
                "the {} consumer was created again; records up to the floor of the intent log \
                 are skipped",
                aob_streams::AUDIT_SINK
            );
            // Numbered afresh: a gap from 0 means deliveries went elsewhere, as at start.
            self.last_delivery = 0;
        }
        Ok(())
    }

    async fn consumer_info(
        &mut self,
        shutdown: &CancellationToken,
    ) -> Result<jetstream::consumer::Info> {
        let mut backoff = Backoff::new();
        loop {
            match self.consumer.info().await {
                Ok(info) => return Ok(info.clone()),
                Err(e) => {
                    backoff
                        .wait(
                            shutdown,
                            "reading the audit consumer's state",
                            Error::Nats(e.to_string()),
                        )
                        .await?
                }
            }
        }
    }

    /// True when `seq` is durable or being written.
    fn settled(&self, seq: u64) -> bool {
        seq <= self.floor || self.durable.contains(seq) || self.flying.contains(seq)
    }

    /// Reads every sequence above the horizon up to `upto` that this sink has not seen from
    /// the stream into the batch; raises the horizon to `upto`.
    async fn adopt(&mut self, upto: u64, shutdown: &CancellationToken) -> Result<()> {
        if upto <= self.horizon {
            return Ok(());
        }
        let wanted: Vec<u64> = (self.horizon + 1..=upto)
            .filter(|s| !self.settled(*s) && !self.batch.entries.contains_key(s))
            .collect();
        let stream = self.stream.clone();
        let mut fetched = std::pin::pin!(fetch_all(&stream, wanted, shutdown));
        while let Some((seq, got)) = fetched.next().await {
            if let Some((raw, published)) = got? {
                self.batch.insert(seq, published, raw, None);
            }
            if self.batch.full(&self.cfg) {
                self.launch(shutdown).await?;
            }
        }
        self.horizon = upto;
        Ok(())
    }

    /// Takes one delivered message: skips what is durable or already batched, batches the
    /// rest (raw: the writer parses it and dead-letters garbage).
    async fn accept(
        &mut self,
        msg: jetstream::Message,
        shutdown: &CancellationToken,
    ) -> Result<()> {
        let (seq, delivery, published) = match msg.info() {
            Ok(info) => (
                info.stream_sequence,
                info.consumer_sequence,
                instant_of(info.published.unix_timestamp_nanos()),
            ),
            Err(e) => {
                tracing::warn!("message without JetStream metadata on {}: {e}", msg.subject);
                return Ok(());
            }
        };
        if delivery <= self.last_delivery || self.last_delivery == 0 {
            // The first delivery, or one numbered below an earlier one: the consumer was
            // created again, maybe with the stream. The floor and the durable set speak of
            // the stream this sink started on; in another stream they would skip records.
            self.check_stream(delivery, shutdown).await?;
        }
        if delivery > self.last_delivery.saturating_add(1) {
            // A delivery went elsewhere or was lost: adopt what the consumer has delivered.
            let info = self.consumer_info(shutdown).await?;
            tracing::info!(
                expected = self.last_delivery + 1,
                got = delivery,
                upto = info.delivered.stream_sequence,
                "deliveries missed by this sink; reading them from the stream"
            );
            self.adopt(info.delivered.stream_sequence, shutdown).await?;
        }
        self.last_delivery = self.last_delivery.max(delivery);
        if self.settled(seq) {
            // Durable already (an ack was lost or passed over) or being written: the next
            // batch's ack covers it; with nothing outstanding, ack it now.
            if self.batch.entries.is_empty() && self.flight.is_none() {
                let _ = msg.ack().await;
            } else {
                keep_highest(&mut self.held, seq, msg);
            }
            self.horizon = self.horizon.max(seq);
            return Ok(());
        }
        if self.batch.entries.contains_key(&seq) {
            // Redelivered while batched (the ack wait passed): keep the newest delivery.
            keep_highest(&mut self.batch.top, seq, msg);
            return Ok(());
        }
        // Sequences between the horizon and this one that were never delivered here do not
        // exist for this consumer (the delivery sequence shows nothing was missed).
        self.horizon = self.horizon.max(seq);
        let keep = (self.cfg.failpoint == Some(Failpoint::MidAck)).then(|| msg.clone());
        let raw = Raw {
            subject: msg.subject.clone(),
            payload: msg.payload.clone(),
        };
        self.batch.insert(seq, published, raw, keep);
        keep_highest(&mut self.batch.top, seq, msg);
        Ok(())
    }

    /// Takes back the writer from a finished flight.
    fn landed(
        &mut self,
        landed: std::result::Result<(Writer, Result<FlushReport>), tokio::task::JoinError>,
    ) -> Result<FlushReport> {
        let (writer, report) =
            landed.map_err(|e| Error::Store(format!("the audit flush task failed: {e}")))?;
        self.durable = writer.written.clone();
        self.floor = self.floor.max(writer.floor);
        self.flying = Ranges::default();
        self.writer = Some(writer);
        report
    }

    /// Waits for the flight in the air, if any.
    async fn land(&mut self) -> Result<FlushReport> {
        match self.flight.take() {
            Some(mut f) => {
                let landed = (&mut f.0).await;
                self.landed(landed)
            }
            None => Ok(FlushReport::default()),
        }
    }

    /// Waits for the flight in the air, then sends the batch off to be written while the
    /// next one gathers. Returns the report of the flight that landed.
    async fn launch(&mut self, shutdown: &CancellationToken) -> Result<FlushReport> {
        let landed = self.land().await?;
        let batch = std::mem::take(&mut self.batch);
        let held = self.held.take();
        if batch.entries.is_empty() && held.is_none() {
            return Ok(landed);
        }
        let seqs = Ranges::of(batch.entries.keys().copied());
        let half = batch.entries.len() / 2;
        let mut mid = None;
        let mut raws = Vec::with_capacity(batch.entries.len());
        for (i, (seq, e)) in batch.entries.into_iter().enumerate() {
            if i >= half && mid.is_none() {
                mid = e.msg;
            }
            raws.push((seq, e.raw));
        }
        let mut ack = batch.top;
        if let Some((s, m)) = held {
            keep_highest(&mut ack, s, m);
        }
        let cut = Cut {
            raws,
            seqs: seqs.clone(),
            ack: ack.map(|(_, m)| m),
            mid,
        };
        let Some(mut writer) = self.writer.take() else {
            return Err(Error::Store("the audit writer is missing".into()));
        };
        let shutdown = shutdown.clone();
        self.flying = seqs;
        self.flight = Some(Flight(tokio::spawn(async move {
            let report = writer.write(cut, &shutdown).await;
            (writer, report)
        })));
        Ok(landed)
    }

    /// Writes everything gathered and waits until it is durable and acknowledged.
    async fn flush_now(&mut self, shutdown: &CancellationToken) -> Result<FlushReport> {
        let earlier = self.launch(shutdown).await?;
        let launched = self.flight.is_some();
        let mut report = self.land().await?;
        if !launched && let Some(w) = self.writer.as_mut() {
            // Nothing to write: report what is still pending.
            report.pending = w.refresh_floor().await;
            self.floor = self.floor.max(w.floor);
        }
        report.files.splice(0..0, earlier.files);
        report.rows += earlier.rows;
        Ok(report)
    }
}

impl Writer {
    /// Reads the intent log; rewrites an interrupted batch.
    async fn recover(
        &mut self,
        stream: &jetstream::stream::Stream,
        shutdown: &CancellationToken,
    ) -> Result<()> {
        let mut backoff = Backoff::new();
        let entry = loop {
            match self.kv.entry(INTENT_KEY).await {
                Ok(e) => break e,
                Err(e) => {
                    backoff
                        .wait(
                            shutdown,
                            "reading the intent log",
                            Error::Nats(e.to_string()),
                        )
                        .await?
                }
            }
        };
        self.revision = entry.as_ref().map(|e| e.revision);
        self.refresh_floor().await;
        let Some(entry) = entry.filter(|e| e.operation == kv::Operation::Put) else {
            return Ok(());
        };
        let intent: Intent = serde_json::from_slice(&entry.value).map_err(|e| {
            Error::Config(format!(
                "the intent log {}/{INTENT_KEY} is not readable ({e}); inspect it with \
                 `nats kv get {} {INTENT_KEY}`",
                aob_streams::AUDIT_SINK_BUCKET,
                aob_streams::AUDIT_SINK_BUCKET
            ))
        })?;
        if intent.stream != 0 && intent.stream != self.stream {
            // Sequences of another stream mean nothing here. What that stream's sink wrote
            // stays in the files, where the record-id index finds it.
            tracing::warn!(
                was = intent.stream,
                now = self.stream,
                state = ?intent.state,
                files = ?intent.files,
                "{} was created again since the intent log was written; its sequences are \
                 forgotten, records already in the files are skipped by record_id{}",
                aob_streams::AUDIT,
                if intent.state == IntentState::Writing {
                    " (the interrupted batch cannot be read again: its objects written so \
                     far stay, the rest of it went with the old stream)"
                } else {
                    ""
                }
            );
            return Ok(());
        }
        self.written = intent.written.clone().normalized();
        self.done_upto = intent.done_upto;
        self.floor = self.floor.max(intent.floor);
        let seqs = intent.seqs.clone().normalized();
        match intent.state {
            IntentState::Writing => self.replay(stream, &intent, seqs, shutdown).await?,
            IntentState::Written | IntentState::Done => self.written.union(&seqs),
        }
        self.written.prune_upto(self.floor);
        tracing::info!(
            state = ?intent.state,
            first = intent.first,
            last = intent.last,
            ack_floor = self.floor,
            "audit sink recovered its intent log"
        );
        Ok(())
    }

    /// Writes again the batch of an intent left in `writing`, reading it from the stream.
    async fn replay(
        &mut self,
        stream: &jetstream::stream::Stream,
        intent: &Intent,
        seqs: Ranges,
        shutdown: &CancellationToken,
    ) -> Result<()> {
        let started = Instant::now();
        let fetched: Vec<(u64, Result<Fetched>)> =
            fetch_all(stream, seqs.seqs(), shutdown).collect().await;
        let mut raws = Vec::with_capacity(fetched.len());
        let mut missing = 0u64;
        for (seq, f) in fetched {
            match f? {
                Some((raw, _)) => raws.push((seq, raw)),
                None => missing += 1,
            }
        }
        // Refused messages were dead-lettered before the interrupted batch's intent.
        let (entries, _) = parse_all(raws).await?;
        if missing > 0 {
            tracing::warn!(
                missing,
                "records of the interrupted batch are no longer in {} (retention?); the rewrite leaves them out",
                aob_streams::AUDIT
            );
        }
        let report = self
            .write_set(entries, seqs.clone(), &intent.files, false, shutdown)
            .await?;
        self.complete(&report.0, seqs, shutdown).await?;
        tracing::info!(
            files = report.0.files.len(),
            rows = report.0.rows,
            bytes = report.1,
            ms = started.elapsed().as_millis() as u64,
            first = intent.first,
            last = intent.last,
            "rewrote the audit batch interrupted by the last sink"
        );
        Ok(())
    }

    /// Writes a batch, acknowledges it, and records it as done.
    async fn write(&mut self, cut: Cut, shutdown: &CancellationToken) -> Result<FlushReport> {
        if cut.seqs.is_empty() {
            // Only a redelivery of something durable to acknowledge.
            if let Some(m) = cut.ack {
                let _ = m.ack().await;
            }
            let pending = self.refresh_floor().await;
            return Ok(FlushReport {
                pending,
                ..FlushReport::default()
            });
        }
        let started = Instant::now();
        let (rows, refused) = parse_all(cut.raws).await?;
        for (_, raw, reason) in &refused {
            aob_runtime::bus::dead_letter(
                &self.js,
                COMPONENT,
                raw.subject.as_str(),
                &raw.payload,
                reason,
            )
            .await;
        }
        let (mut report, bytes) = self
            .write_set(rows, cut.seqs.clone(), &[], true, shutdown)
            .await?;
        self.failpoint(Failpoint::AfterWritten)?;
        // Every object is durable: acknowledge, then make sure the server has the ack.
        if self.cfg.failpoint == Some(Failpoint::MidAck) {
            if let Some(m) = &cut.mid {
                let _ = m.ack().await;
            }
            let _ = self.client.flush().await;
            self.failpoint(Failpoint::MidAck)?;
        }
        if let Some(m) = &cut.ack
            && let Err(e) = m.ack().await
        {
            tracing::warn!("ack not sent (the records will be redelivered and skipped): {e}");
        }
        if let Err(e) = self.client.flush().await {
            tracing::warn!("acks not confirmed (records may be redelivered and skipped): {e}");
        }
        let (first, last) = cut.seqs.bounds().unwrap_or_default();
        report.pending = self.complete(&report, cut.seqs, shutdown).await?;
        count(BATCHES, 1);
        count(ROWS, report.rows as u64);
        count(BYTES, bytes);
        count(REFUSED, refused.len() as u64);
        count(MICROS, started.elapsed().as_micros() as u64);
        tracing::info!(
            files = report.files.len(),
            rows = report.rows,
            bytes,
            ms = started.elapsed().as_millis() as u64,
            first,
            last,
            "flushed audit batch"
        );
        Ok(report)
    }

    /// Stops here when the configured failpoint is `at`.
    fn failpoint(&self, at: Failpoint) -> Result<()> {
        if self.cfg.failpoint == Some(at) {
            tracing::error!("failpoint {}: stopping as if killed", at.as_str());
            return Err(Error::Failpoint(at.as_str()));
        }
        Ok(())
    }

    /// Steps 1 and 2 of a flush: intent `writing`, every object, intent `written`. `stale`
    /// are names of an earlier attempt to delete when this one does not produce them;
    /// `failpoints` says whether crash-test failpoints apply. Returns the report and the
    /// bytes written.
    async fn write_set(
        &mut self,
        entries: Vec<Row>,
        seqs: Ranges,
        stale: &[String],
        failpoints: bool,
        shutdown: &CancellationToken,
    ) -> Result<(FlushReport, u64)> {
        // The objects of an interrupted batch (`stale`) are not in the index: this batch
        // writes them again, and must group its rows as the interrupted attempt did.
        for folder in self.index.missing(&entries) {
            let mut backoff = Backoff::new();
            while let Err(e) = self
                .index
                .load(&self.store, &self.prefix, &folder, stale)
                .await
            {
                backoff
                    .wait(shutdown, "reading the record ids of an audit folder", e)
                    .await?;
            }
        }
        let (entries, known) = self.index.retain_new(entries);
        if known > 0 {
            tracing::info!(
                known,
                "left out records whose record_id is already in the files"
            );
        }
        let (groups, dropped) = group(entries);
        if dropped > 0 {
            tracing::info!(
                dropped,
                "left out records repeating a record_id of the batch"
            );
        }
        let pending = self.index.pending(&groups);
        let paths: Vec<Path> = groups
            .iter()
            .map(|g| g.path(&self.prefix, self.stream))
            .collect();
        let files: Vec<String> = paths.iter().map(|p| p.to_string()).collect();
        let stale: Vec<&String> = stale.iter().filter(|s| !files.contains(s)).collect();
        let rows: usize = groups.iter().map(|g| g.records.len()).sum();
        let (first, last) = seqs.bounds().unwrap_or_default();
        let mut intent = Intent {
            first,
            last,
            count: rows as u64,
            state: IntentState::Writing,
            seqs,
            files: files
                .iter()
                .cloned()
                .chain(stale.iter().map(|s| s.to_string()))
                .collect(),
            written: self.written.clone(),
            done_upto: self.done_upto,
            stream: self.stream,
            floor: self.floor,
        };
        self.put_intent(&intent, shutdown).await?;
        if failpoints {
            self.failpoint(Failpoint::AfterIntent)?;
        }
        let mut bytes = 0u64;
        for (g, path) in groups.into_iter().zip(&paths) {
            let records = g.records;
            let body = tokio::task::spawn_blocking(move || {
                let refs: Vec<&DecisionRecord> = records.iter().map(|r| r.as_ref()).collect();
                crate::schema::encode_of(&refs)
            })
            .await
            .map_err(|e| Error::Store(format!("encoding {path}: {e}")))??;
            bytes += body.len() as u64;
            self.put_object(path, body, shutdown).await?;
        }
        for s in stale {
            match Path::parse(s.as_str()) {
                Ok(p) => self.delete_object(&p, shutdown).await?,
                Err(e) => tracing::warn!("not deleting `{s}`, not an object path: {e}"),
            }
        }
        self.index.commit(pending);
        if failpoints {
            self.failpoint(Failpoint::AfterWrite)?;
        }
        intent.state = IntentState::Written;
        intent.files = files.clone();
        self.put_intent(&intent, shutdown).await?;
        Ok((
            FlushReport {
                files,
                rows,
                pending: 0,
            },
            bytes,
        ))
    }

    /// Step 3 of a flush, after the acks: remember the sequences as durable, prune by the
    /// ack floor, intent `done`. Returns the consumer's pending count.
    async fn complete(
        &mut self,
        report: &FlushReport,
        seqs: Ranges,
        shutdown: &CancellationToken,
    ) -> Result<u64> {
        self.written.union(&seqs);
        let pending = self.refresh_floor().await;
        self.written.prune_upto(self.floor);
        let (first, last) = seqs.bounds().unwrap_or_default();
        self.done_upto = self.done_upto.max(last);
        let intent = Intent {
            first,
            last,
            count: report.rows as u64,
            state: IntentState::Done,
            seqs,
            files: report.files.clone(),
            written: self.written.clone(),
            done_upto: self.done_upto,
            stream: self.stream,
            floor: self.floor,
        };
        self.put_intent(&intent, shutdown).await?;
        Ok(pending)
    }

    /// Reads the consumer's ack floor; returns its pending count (0 when unknown).
    async fn refresh_floor(&mut self) -> u64 {
        match self.consumer.get_info().await {
            Ok(info) => {
                self.floor = self.floor.max(info.ack_floor.stream_sequence);
                info.num_pending + info.num_ack_pending as u64
            }
            Err(e) => {
                tracing::warn!("reading the audit consumer's state: {e}");
                0
            }
        }
    }

    /// Writes the intent by compare-and-set, retrying transient failures.
    async fn put_intent(&mut self, intent: &Intent, shutdown: &CancellationToken) -> Result<()> {
        let body = Bytes::from(
            serde_json::to_vec(intent).map_err(|e| Error::Nats(format!("intent: {e}")))?,
        );
        let mut backoff = Backoff::new();
        loop {
            let attempt = match self.revision {
                Some(rev) => {
                    self.kv
                        .update(INTENT_KEY, body.clone(), rev)
                        .await
                        .map_err(|e| match e.kind() {
                            kv::UpdateErrorKind::WrongLastRevision => conflict(&e),
                            _ => Error::Nats(format!("writing the intent log: {e}")),
                        })
                }
                None => {
                    self.kv
                        .create(INTENT_KEY, body.clone())
                        .await
                        .map_err(|e| match e.kind() {
                            kv::CreateErrorKind::AlreadyExists => conflict(&e),
                            _ => Error::Nats(format!("writing the intent log: {e}")),
                        })
                }
            };
            match attempt {
                Ok(rev) => {
                    self.revision = Some(rev);
                    return Ok(());
                }
                Err(e) => backoff.wait(shutdown, "writing the intent log", e).await?,
            }
        }
    }

    async fn put_object(
        &self,
        path: &Path,
        body: Bytes,
        shutdown: &CancellationToken,
    ) -> Result<()> {
        let mut backoff = Backoff::new();
        loop {
            match self
                .store
                .put(path, PutPayload::from_bytes(body.clone()))
                .await
            {
                Ok(_) => return Ok(()),
                Err(e) => {
                    backoff
                        .wait(
                            shutdown,
                            "writing an audit object",
                            Error::Store(format!("writing {path}: {e}")),
                        )
                        .await?
                }
            }
        }
    }

    async fn delete_object(&self, path: &Path, shutdown: &CancellationToken) -> Result<()> {
        let mut backoff = Backoff::new();
        loop {
            match self.store.delete(path).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => return Ok(()),
                Err(e) => {
                    backoff
                        .wait(
                            shutdown,
                            "deleting a stale audit object",
                            Error::Store(format!("deleting {path}: {e}")),
                        )
                        .await?
                }
            }
        }
    }
}

/// A stream's creation time (nanoseconds since the Unix epoch) as a `u64` (0 before 1970).
fn created_ns(unix_ns: i128) -> u64 {
    u64::try_from(unix_ns).unwrap_or(0)
}

fn conflict(e: &dyn std::fmt::Display) -> Error {
    Error::Conflict(format!(
        "the intent log {}/{INTENT_KEY} changed under this sink ({e}): another audit sink is \
         running on the `{}` consumer; run exactly one",
        aob_streams::AUDIT_SINK_BUCKET,
        aob_streams::AUDIT_SINK
    ))
}

/// Parses a batch's messages off the async runtime: good records, and refused messages
/// with the reason.
async fn parse_all(raws: Vec<(u64, Raw)>) -> Result<(Vec<Row>, Vec<(u64, Raw, String)>)> {
    tokio::task::spawn_blocking(move || {
        let mut rows = Vec::with_capacity(raws.len());
        let mut refused = Vec::new();
        for (seq, raw) in raws {
            match parse_record(raw.subject.as_str(), &raw.payload) {
                Ok(r) => rows.push((seq, Arc::new(r))),
                Err(reason) => refused.push((seq, raw, reason)),
            }
        }
        (rows, refused)
    })
    .await
    .map_err(|e| Error::Store(format!("parsing audit records: {e}")))
}

/// A message read back from the stream, with its publish time; `None` when gone.
type Fetched = Option<(Raw, Instant)>;

/// Reads messages of the audit stream by sequence, 32 at a time, in the order given.
fn fetch_all<'a>(
    stream: &'a jetstream::stream::Stream,
    seqs: impl IntoIterator<Item = u64> + 'a,
    shutdown: &'a CancellationToken,
) -> impl futures::Stream<Item = (u64, Result<Fetched>)> + 'a {
    futures::stream::iter(seqs)
        .map(move |seq| async move { (seq, fetch(stream, seq, shutdown).await) })
        .buffered(32)
}

/// Reads one message of the audit stream by sequence with its publish time, retrying
/// transient failures; `None` when there is no such message (never stored, deleted, or
/// past retention).
async fn fetch(
    stream: &jetstream::stream::Stream,
    seq: u64,
    shutdown: &CancellationToken,
) -> Result<Fetched> {
    let mut backoff = Backoff::new();
    loop {
        match stream.get_raw_message(seq).await {
            Ok(m) => {
                let published = instant_of(m.time.unix_timestamp_nanos());
                return Ok(Some((
                    Raw {
                        subject: m.subject,
                        payload: m.payload,
                    },
                    published,
                )));
            }
            Err(e) if e.kind() == jetstream::stream::RawMessageErrorKind::NoMessageFound => {
                return Ok(None);
            }
            Err(e) => {
                backoff
                    .wait(
                        shutdown,
                        "reading the audit stream",
                        Error::Nats(format!(
                            "reading {} sequence {seq}: {e}",
                            aob_streams::AUDIT
                        )),
                    )
                    .await?
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aob_model::audit::AuditKind;

    const DAY_US: i64 = 86_400_000_000;
    // 2026-11-21T00:00:00Z
    const NOV21: i64 = 1_795_219_200 * 1_000_000;

    fn rec(id: &str, tenant: &str, at_us: i64) -> Arc<DecisionRecord> {
        Arc::new(DecisionRecord::new(
            id.into(),
            tenant,
            "run1",
            AuditKind::StepCompleted,
            "engine",
            at_us,
        ))
    }

    #[test]
    fn a_batch_straddling_two_tenants_and_two_days_makes_four_objects() {
        // Seqs 10..=17, interleaved tenants, midnight between 13 and 14.
        let input = vec![
            (10, rec("a1", "acme", NOV21 - 10)),
            (11, rec("b1", "beta", NOV21 - 5)),
            (12, rec("a2", "acme", NOV21 - 1)),
            (13, rec("b2", "beta", NOV21 - 1)),
            (14, rec("a3", "acme", NOV21)),
            (15, rec("b3", "beta", NOV21 + 1)),
            (17, rec("a4", "acme", NOV21 + DAY_US - 1)),
        ];
        let mut shuffled = input.clone();
        shuffled.reverse();
        let (groups, dropped) = group(shuffled);
        assert_eq!(dropped, 0);
        let prefix = Path::from("audit");
        let names: Vec<String> = groups
            .iter()
            .map(|g| g.path(&prefix, 3).to_string())
            .collect();
        assert_eq!(
            names,
            [
                "audit/tenant=acme/date=2026-11-20/00000000000000000003-00000000000000000010-00000000000000000012.parquet",
                "audit/tenant=acme/date=2026-11-21/00000000000000000003-00000000000000000014-00000000000000000017.parquet",
                "audit/tenant=beta/date=2026-11-20/00000000000000000003-00000000000000000011-00000000000000000013.parquet",
                "audit/tenant=beta/date=2026-11-21/00000000000000000003-00000000000000000015-00000000000000000015.parquet",
            ]
        );
        let ids: Vec<Vec<&str>> = groups
            .iter()
            .map(|g| g.records.iter().map(|r| r.record_id.as_str()).collect())
            .collect();
        assert_eq!(
            ids,
            [
                vec!["a1", "a2"],
                vec!["a3", "a4"],
                vec!["b1", "b2"],
                vec!["b3"]
            ]
        );
        // The same set in another order gives the same objects.
        let (again, _) = group(input);
        let again: Vec<String> = again
            .iter()
            .map(|g| g.path(&prefix, 3).to_string())
            .collect();
        assert_eq!(again, names);
    }

    #[test]
    fn repeated_record_ids_and_sequences_are_written_once() {
        let (groups, dropped) = group(vec![
            (5, rec("x", "t", NOV21)),
            (3, rec("x", "t", NOV21)),
            (4, rec("y", "t", NOV21)),
            (4, rec("y", "t", NOV21)),
        ]);
        assert_eq!(dropped, 1);
        assert_eq!(groups.len(), 1);
        assert_eq!((groups[0].first_seq, groups[0].last_seq), (3, 4));
        assert_eq!(groups[0].records.len(), 2);
    }

    #[test]
    fn ranges_merge_prune_and_answer_membership() {
        let mut r = Ranges::of([7, 1, 2, 3, 9, 8, 3, 20]);
        assert_eq!(r, Ranges(vec![[1, 3], [7, 9], [20, 20]]));
        assert_eq!(r.count(), 7);
        assert_eq!(r.bounds(), Some((1, 20)));
        assert!(r.contains(1) && r.contains(8) && r.contains(20));
        assert!(!r.contains(0) && !r.contains(4) && !r.contains(21));
        r.union(&Ranges::of([4, 5, 6, 10]));
        assert_eq!(r, Ranges(vec![[1, 10], [20, 20]]));
        r.prune_upto(5);
        assert_eq!(r, Ranges(vec![[6, 10], [20, 20]]));
        r.prune_upto(15);
        assert_eq!(r, Ranges(vec![[20, 20]]));
        assert_eq!(r.seqs().collect::<Vec<_>>(), [20]);
        let messy = Ranges(vec![[9, 12], [1, 2], [3, 4], [5, 1]]).normalized();
        assert_eq!(messy, Ranges(vec![[1, 4], [9, 12]]));
    }

    #[test]
    fn the_intent_record_reads_as_documented() {
        let i: Intent = serde_json::from_str(
            r#"{"first": 3, "last": 9, "count": 5, "state": "writing", "seqs": [[3,5],[8,9]]}"#,
        )
        .unwrap();
        assert_eq!(i.state, IntentState::Writing);
        assert_eq!(i.seqs.count(), 5);
        assert!(i.written.is_empty() && i.files.is_empty() && i.done_upto == 0);
        let back: serde_json::Value = serde_json::to_value(&i).unwrap();
        assert_eq!(back["seqs"], serde_json::json!([[3, 5], [8, 9]]));
        assert_eq!(back["state"], "writing");
    }

    #[test]
    fn bad_messages_are_refused_with_a_reason() {
        let good = serde_json::to_vec(&*rec("id", "acme", NOV21)).unwrap();
        assert!(parse_record("aob.acme.audit", &good).is_ok());
        let e = parse_record("aob.beta.audit", &good).unwrap_err();
        assert!(e.contains("tenant `acme`"), "{e}");
        assert!(
            parse_record("aob.acme.audit", b"{")
                .unwrap_err()
                .contains("not a decision record")
        );
        let mut extra: serde_json::Value = serde_json::from_slice(&good).unwrap();
        extra["surprise"] = 1.into();
        let e = parse_record("aob.acme.audit", &serde_json::to_vec(&extra).unwrap()).unwrap_err();
        assert!(e.contains("surprise"), "{e}");
        let mut empty = (*rec("id", "acme", NOV21)).clone();
        empty.actor.clear();
        let e = parse_record("aob.acme.audit", &serde_json::to_vec(&empty).unwrap()).unwrap_err();
        assert!(e.contains("actor"), "{e}");
        let big = vec![b' '; MAX_MESSAGE_BYTES + 1];
        assert!(
            parse_record("aob.acme.audit", &big)
                .unwrap_err()
                .contains("larger")
        );
    }

    #[test]
    fn config_from_the_environment() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert_eq!(
            SinkConfig::from_lookup(env(&[])).unwrap(),
            SinkConfig::default()
        );
        let c = SinkConfig::from_lookup(env(&[
            ("AOB_AUDIT_MAX_ROWS", "500"),
            ("AOB_AUDIT_MAX_BYTES", "1048576"),
            ("AOB_AUDIT_MAX_AGE", "250ms"),
        ]))
        .unwrap();
        assert_eq!(
            (c.max_rows, c.max_bytes, c.max_age),
            (500, 1 << 20, Duration::from_millis(250))
        );
        let e = SinkConfig::from_lookup(env(&[("AOB_AUDIT_MAX_AGE", "soon")])).unwrap_err();
        assert!(e.to_string().contains("AOB_AUDIT_MAX_AGE=`soon`"), "{e}");
        let c = SinkConfig::from_lookup(env(&[("AOB_AUDIT_FAILPOINT", "after_write")])).unwrap();
        assert_eq!(c.failpoint, Some(Failpoint::AfterWrite));
        let e = SinkConfig::from_lookup(env(&[("AOB_AUDIT_FAILPOINT", "later")])).unwrap_err();
        assert!(e.to_string().contains("after_intent, after_write"), "{e}");
        let e = SinkConfig::from_lookup(env(&[("AOB_AUDIT_MAX_ROWS", "0")])).unwrap_err();
        assert!(e.to_string().contains("AOB_AUDIT_MAX_ROWS"), "{e}");
    }
}

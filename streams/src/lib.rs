//! The NATS topology of AOB as code: streams, KV buckets and durable consumers.
//!
//! [`Topology::apply`] creates what is missing and updates what drifted, so applying twice
//! changes nothing; [`Topology::diff`] reports drift without changing anything. Functions
//! never create streams at run time: they bind to what this crate made.

pub mod subjects;

use std::time::Duration;

use async_nats::jetstream::{
    self,
    consumer::{self, AckPolicy, DeliverPolicy},
    kv,
    stream::{self, RetentionPolicy, StorageType},
};

/// Command stream: starts and signals.
pub const CMD: &str = "AOB_CMD";
/// Task stream (work queue): one subject per node type.
pub const TASKS: &str = "AOB_TASKS";
/// Step results (work queue) for the engine.
pub const RESULTS: &str = "AOB_RESULTS";
/// Run history, for watchers and replay.
pub const HISTORY: &str = "AOB_HISTORY";
/// Audit records.
pub const AUDIT: &str = "AOB_AUDIT";
/// Messages that components could not use, with the reason.
pub const DLQ: &str = "AOB_DLQ";
/// KV: workflow definitions, immutable per version.
pub const WORKFLOWS: &str = "AOB_WORKFLOWS";
/// KV: run state, written by the engine only, by compare-and-set.
pub const RUNS: &str = "AOB_RUNS";
/// KV: durable timers.
pub const TIMERS: &str = "AOB_TIMERS";
/// KV: the audit sink's intent log (key `intent`), which makes its Parquet rows exactly-once.
pub const AUDIT_SINK_BUCKET: &str = "AOB_AUDIT_SINK";
/// KV: recorded model and tool calls (key `<tenant>.<run>.<digest>`), so a retry or a
/// replay reuses a response instead of calling and paying again.
pub const CALLS: &str = "AOB_CALLS";
/// KV: budget ledgers (spent and reserved, per tenant, workflow and run), written by
/// compare-and-set.
pub const LEDGER: &str = "AOB_LEDGER";
/// KV: rate-limit windows shared by every instance of a gateway; entries expire.
pub const LIMITS: &str = "AOB_LIMITS";
/// KV: Rego policies per tenant (key `<tenant>`), reloaded by the functions on change.
pub const POLICIES: &str = "AOB_POLICIES";
/// KV: knowledge bases (key `<tenant>.<kb>`): their model and documents, the chunk files of
/// each in object storage; written by compare-and-set.
pub const KB: &str = "AOB_KB";

/// Engine consumer of [`CMD`].
pub const ENGINE_CMD: &str = "engine-cmd";
/// Engine consumer of [`RESULTS`].
pub const ENGINE_RESULTS: &str = "engine-results";
/// Audit sink consumer of [`AUDIT`].
pub const AUDIT_SINK: &str = "audit-sink";

/// Most unacknowledged audit records: several sink batches (50,000 rows by default), since
/// the sink acks a batch only once its Parquet objects are written.
pub const AUDIT_SINK_MAX_ACK_PENDING: i64 = 200_000;

/// Durable consumer name of a function type.
pub fn function_consumer(node_type: &str) -> String {
    format!("fn-{node_type}")
}

/// What can go wrong applying the topology.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The server refused or did not answer.
    #[error("{what}: {source}")]
    Nats {
        /// What was being done.
        what: String,
        /// The server's answer.
        source: async_nats::Error,
    },
    /// A change the server cannot make in place.
    #[error("{0}")]
    Immutable(String),
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

fn nats<E: Into<async_nats::Error>>(what: impl Into<String>) -> impl FnOnce(E) -> Error {
    let what = what.into();
    move |e| Error::Nats {
        what,
        source: e.into(),
    }
}

/// Settings of the topology.
#[derive(Debug, Clone)]
pub struct Topology {
    /// Replicas of every stream and bucket (1 for one server, 3 for a cluster).
    pub replicas: usize,
    /// How long commands, history, audit and dead letters are kept.
    pub retention: Duration,
    /// Deduplication window of `Nats-Msg-Id`.
    pub duplicate_window: Duration,
    /// How long a delivered message may stay unacknowledged before redelivery, for the
    /// engine and the functions (default 6 s): it bounds how long work held by a process
    /// that died waits before another takes it. Functions send in-progress acks while a
    /// step runs longer (every 2 s by default), so a long step is not redelivered.
    pub ack_wait: Duration,
    /// The audit sink's ack wait (default 30 s): it acknowledges a batch only once the
    /// batch's Parquet objects are written, which can take longer than `ack_wait`.
    pub audit_ack_wait: Duration,
    /// Deliveries of a task before it is given up on (functions). The engine's consumers
    /// and the audit sink's never give up: the engine dead-letters what it cannot use
    /// itself, and holds what it needs however long the wait.
    pub max_deliver: i64,
    /// Node types that get a function consumer.
    pub node_types: Vec<String>,
}

impl Default for Topology {
    fn default() -> Self {
        Topology {
            replicas: 1,
            retention: Duration::from_secs(7 * 24 * 3600),
            duplicate_window: Duration::from_secs(10 * 60),
            ack_wait: Duration::from_secs(6),
            audit_ack_wait: Duration::from_secs(30),
            max_deliver: 20,
            node_types: aob_model::nodes::names()
                .into_iter()
                .filter(|t| !aob_model::nodes::ENGINE_TYPES.contains(t))
                .map(str::to_string)
                .collect(),
        }
    }
}

/// One difference between the wanted topology and the server's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Drift {
    /// `stream AOB_CMD`, `bucket AOB_RUNS`, `consumer AOB_TASKS/fn-http`.
    pub object: String,
    /// What differs (`missing`, or `field: server → wanted`).
    pub change: String,
}

impl std::fmt::Display for Drift {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.object, self.change)
    }
}

impl Topology {
    /// Stream configurations.
    pub fn streams(&self) -> Vec<stream::Config> {
        let s = |name: &str, subject: &str, retention: RetentionPolicy, max_age: Duration| {
            stream::Config {
                name: name.to_string(),
                subjects: vec![subject.to_string()],
                retention,
                storage: StorageType::File,
                num_replicas: self.replicas,
                max_age,
                duplicate_window: self.duplicate_window,
                ..Default::default()
            }
        };
        // Work queues carry one parked message each (see `parked`), which never expires.
        let queue = |name: &str, subject: &str, park: &str| stream::Config {
            subjects: vec![subject.to_string(), park.to_string()],
            allow_message_ttl: true,
            ..s(name, subject, RetentionPolicy::WorkQueue, self.retention)
        };
        vec![
            s(CMD, "aob.*.cmd.>", RetentionPolicy::Limits, self.retention),
            queue(TASKS, "aob.*.task.>", subjects::PARK_TASKS),
            queue(RESULTS, "aob.*.result.>", subjects::PARK_RESULTS),
            s(
                HISTORY,
                "aob.*.run.>",
                RetentionPolicy::Limits,
                self.retention,
            ),
            s(
                AUDIT,
                subjects::AUDIT_ALL_TENANTS,
                RetentionPolicy::Limits,
                self.retention,
            ),
            s(DLQ, "aob.*.dlq.>", RetentionPolicy::Limits, self.retention),
        ]
    }

    /// The work-queue streams and the subject of their parked message.
    ///
    /// A work-queue stream of a single sequential run drains after every step, and when it
    /// drains the server's file store deletes its block file and creates a new one on the
    /// next message (two `unlinkat`s per step, a sixth of the server's time in a
    /// sequential chain). One message that no consumer reads keeps each queue from ever
    /// draining; it is published with `Nats-TTL: never`, so the stream's `max_age` does
    /// not remove it. BENCHMARKS.md has the measurement.
    pub fn parked(&self) -> [(&'static str, &'static str); 2] {
        [
            (TASKS, subjects::PARK_TASKS),
            (RESULTS, subjects::PARK_RESULTS),
        ]
    }

    /// Bucket configurations.
    pub fn buckets(&self) -> Vec<kv::Config> {
        let b = |name: &str, history: i64| kv::Config {
            bucket: name.to_string(),
            history,
            storage: StorageType::File,
            num_replicas: self.replicas,
            ..Default::default()
        };
        vec![
            b(WORKFLOWS, 1),
            b(RUNS, 1),
            b(TIMERS, 1),
            b(AUDIT_SINK_BUCKET, 1),
            b(CALLS, 1),
            b(LEDGER, 1),
            kv::Config {
                // A window lasts a minute; two minutes keeps the one before for the check.
                max_age: Duration::from_secs(120),
                ..b(LIMITS, 1)
            },
            b(POLICIES, 10),
            b(KB, 5),
        ]
    }

    /// Durable pull consumers, with their stream.
    pub fn consumers(&self) -> Vec<(&'static str, consumer::pull::Config)> {
        let c = |name: String, filter: String, max_ack_pending: i64| consumer::pull::Config {
            durable_name: Some(name),
            filter_subject: filter,
            ack_policy: AckPolicy::Explicit,
            deliver_policy: DeliverPolicy::All,
            ack_wait: self.ack_wait,
            max_deliver: self.max_deliver,
            max_ack_pending,
            num_replicas: self.replicas,
            ..Default::default()
        };
        let engine = |name: String, filter: String| consumer::pull::Config {
            max_deliver: -1,
            ..c(name, filter, 10_000)
        };
        let mut out = vec![
            (CMD, engine(ENGINE_CMD.into(), "aob.*.cmd.>".into())),
            (
                RESULTS,
                engine(ENGINE_RESULTS.into(), "aob.*.result.>".into()),
            ),
        ];
        for t in &self.node_types {
            out.push((
                TASKS,
                c(function_consumer(t), subjects::task_all_tenants(t), 10_000),
            ));
        }
        // The audit sink never gives up on a record: a record must not be dropped because
        // the sink was down for a while, and bad records are dead-lettered by the sink.
        out.push((
            AUDIT,
            consumer::pull::Config {
                max_deliver: -1,
                ack_wait: self.audit_ack_wait,
                // One ack per batch: see the audit sink for why that is safe.
                ack_policy: AckPolicy::All,
                ..c(
                    AUDIT_SINK.into(),
                    subjects::AUDIT_ALL_TENANTS.into(),
                    AUDIT_SINK_MAX_ACK_PENDING,
                )
            },
        ));
        out
    }

    /// Creates what is missing and updates what drifted; returns what it changed.
    pub async fn apply(&self, js: &jetstream::Context) -> Result<Vec<Drift>> {
        let drift = self.diff(js).await?;
        for cfg in self.streams() {
            if drift
                .iter()
                .any(|d| d.object == format!("stream {}", cfg.name))
            {
                let name = cfg.name.clone();
                match js.get_stream(&name).await {
                    Ok(_) => js
                        .update_stream(cfg)
                        .await
                        .map(|_| ())
                        .map_err(nats(format!("updating stream {name}")))?,
                    Err(_) => js
                        .create_stream(cfg)
                        .await
                        .map(|_| ())
                        .map_err(nats(format!("creating stream {name}")))?,
                }
            }
        }
        for (stream, subject) in self.parked() {
            if drift
                .iter()
                .any(|d| d.object == format!("parked message {stream}/{subject}"))
            {
                let mut headers = async_nats::HeaderMap::new();
                headers.insert("Nats-TTL", "never");
                js.publish_with_headers(
                    subject,
                    headers,
                    "parked: keeps this work queue from draining".into(),
                )
                .await
                .map_err(nats(format!("parking a message in {stream}")))?
                .await
                .map_err(nats(format!("parking a message in {stream}")))?;
            }
        }
        for cfg in self.buckets() {
            if drift
                .iter()
                .any(|d| d.object == format!("bucket {}", cfg.bucket))
            {
                let name = cfg.bucket.clone();
                js.create_or_update_key_value(cfg)
                    .await
                    .map_err(nats(format!("creating bucket {name}")))?;
            }
        }
        for (stream, cfg) in self.consumers() {
            let name = cfg.durable_name.clone().unwrap_or_default();
            if drift
                .iter()
                .any(|d| d.object == format!("consumer {stream}/{name}"))
            {
                let s = js
                    .get_stream(stream)
                    .await
                    .map_err(nats(format!("opening stream {stream}")))?;
                if let Ok(have) = s.consumer_info(&name).await {
                    if have.config.ack_policy != cfg.ack_policy {
                        return Err(Error::Immutable(format!(
                            "consumer {stream}/{name} has ack policy {:?} and {:?} is wanted; \
                             a server cannot change a consumer's ack policy: stop what reads \
                             it, let it drain, delete it (`nats consumer rm {stream} {name}`) \
                             and apply again",
                            have.config.ack_policy, cfg.ack_policy
                        )));
                    }
                    s.update_consumer(cfg)
                        .await
                        .map_err(nats(format!("updating consumer {stream}/{name}")))?;
                } else {
                    s.create_consumer(cfg)
                        .await
                        .map_err(nats(format!("creating consumer {stream}/{name}")))?;
                }
            }
        }
        Ok(drift)
    }

    /// Differences between the wanted topology and the server's; empty when in sync.
    pub async fn diff(&self, js: &jetstream::Context) -> Result<Vec<Drift>> {
        let mut out = Vec::new();
        for want in self.streams() {
            let object = format!("stream {}", want.name);
            match js.get_stream(&want.name).await {
                Err(_) => out.push(Drift {
                    object,
                    change: "missing".into(),
                }),
                Ok(mut s) => {
                    let have = s
                        .info()
                        .await
                        .map_err(nats(format!("reading {object}")))?
                        .config
                        .clone();
                    let mut changes = Vec::new();
                    cmp(&mut changes, "subjects", &have.subjects, &want.subjects);
                    cmp(&mut changes, "retention", &have.retention, &want.retention);
                    cmp(&mut changes, "storage", &have.storage, &want.storage);
                    cmp(
                        &mut changes,
                        "allow_msg_ttl",
                        &have.allow_message_ttl,
                        &want.allow_message_ttl,
                    );
                    cmp(
                        &mut changes,
                        "replicas",
                        &have.num_replicas,
                        &want.num_replicas,
                    );
                    cmp(&mut changes, "max_age", &have.max_age, &want.max_age);
                    cmp(
                        &mut changes,
                        "duplicate_window",
                        &have.duplicate_window,
                        &want.duplicate_window,
                    );
                    out.extend(changes.into_iter().map(|change| Drift {
                        object: object.clone(),
                        change,
                    }));
                }
            }
        }
        for (stream, subject) in self.parked() {
            let present = match js.get_stream(stream).await {
                Ok(s) => match s.get_last_raw_message_by_subject(subject).await {
                    Ok(_) => true,
                    Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => false,
                    Err(e) => {
                        return Err(Error::Nats {
                            what: format!("reading the parked message of {stream}"),
                            source: e.into(),
                        });
                    }
                },
                Err(_) => false,
            };
            if !present {
                out.push(Drift {
                    object: format!("parked message {stream}/{subject}"),
                    change: "missing".into(),
                });
            }
        }
        for want in self.buckets() {
            let object = format!("bucket {}", want.bucket);
            match js.get_stream(format!("KV_{}", want.bucket)).await {
                Err(_) => out.push(Drift {
                    object,
                    change: "missing".into(),
                }),
                Ok(mut s) => {
                    let have = s
                        .info()
                        .await
                        .map_err(nats(format!("reading {object}")))?
                        .config
                        .clone();
                    let mut changes = Vec::new();
                    cmp(
                        &mut changes,
                        "history",
                        &have.max_messages_per_subject,
                        &want.history,
                    );
                    cmp(&mut changes, "storage", &have.storage, &want.storage);
                    cmp(
                        &mut changes,
                        "replicas",
                        &have.num_replicas,
                        &want.num_replicas,
                    );
                    out.extend(changes.into_iter().map(|change| Drift {
                        object: object.clone(),
                        change,
                    }));
                }
            }
        }
        for (stream, want) in self.consumers() {
            let name = want.durable_name.clone().unwrap_or_default();
            let object = format!("consumer {stream}/{name}");
            let Ok(s) = js.get_stream(stream).await else {
                out.push(Drift {
                    object,
                    change: "missing".into(),
                });
                continue;
            };
            match s.consumer_info(&name).await {
                Err(_) => out.push(Drift {
                    object,
                    change: "missing".into(),
                }),
                Ok(info) => {
                    let have = info.config;
                    let mut changes = Vec::new();
                    cmp(
                        &mut changes,
                        "filter_subject",
                        &have.filter_subject,
                        &want.filter_subject,
                    );
                    cmp(&mut changes, "ack_wait", &have.ack_wait, &want.ack_wait);
                    cmp(
                        &mut changes,
                        "ack_policy",
                        &have.ack_policy,
                        &want.ack_policy,
                    );
                    cmp(
                        &mut changes,
                        "max_deliver",
                        &have.max_deliver,
                        &want.max_deliver,
                    );
                    cmp(
                        &mut changes,
                        "max_ack_pending",
                        &have.max_ack_pending,
                        &want.max_ack_pending,
                    );
                    out.extend(changes.into_iter().map(|change| Drift {
                        object: object.clone(),
                        change,
                    }));
                }
            }
        }
        Ok(out)
    }
}

fn cmp<T: PartialEq + std::fmt::Debug>(out: &mut Vec<String>, field: &str, have: &T, want: &T) {
    if have != want {
        out.push(format!("{field}: {have:?} → {want:?}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_audit_sink_never_gives_up_and_has_its_bucket() {
        let t = Topology::default();
        let consumers = t.consumers();
        let (stream, sink) = consumers
            .iter()
            .find(|(_, c)| c.durable_name.as_deref() == Some(AUDIT_SINK))
            .unwrap();
        assert_eq!(*stream, AUDIT);
        assert_eq!(sink.filter_subject, "aob.*.audit");
        assert_eq!(sink.ack_policy, AckPolicy::All);
        assert_eq!(sink.ack_wait, t.audit_ack_wait);
        assert_eq!(sink.max_deliver, -1);
        assert!(sink.max_ack_pending >= 50_000);
        // The engine never gives up either; functions keep the topology's limit.
        for (_, c) in &consumers {
            let name = c.durable_name.as_deref().unwrap_or_default();
            let want = if name.starts_with("fn-") {
                t.max_deliver
            } else {
                -1
            };
            assert_eq!(c.max_deliver, want, "{name}");
        }
        let bucket = t
            .buckets()
            .into_iter()
            .find(|b| b.bucket == AUDIT_SINK_BUCKET)
            .unwrap();
        assert_eq!(bucket.history, 1);
    }
}

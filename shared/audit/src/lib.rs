//! The audit trail as Parquet.
//!
//! - [`mod@schema`]: the Arrow schema of a [`DecisionRecord`](aob_model::audit::DecisionRecord)
//!   ([`schema()`]), record batches ([`to_batch`]) and Parquet bytes ([`encode`]).
//! - [`mod@store`]: object stores from URLs ([`open`]), the object layout ([`object_path`]) and
//!   listing files with their row counts from the footers ([`list`]).
//! - [`mod@index`]: the record ids already in the files, per tenant and day, which keep a
//!   record published again under a new sequence from a second row.
//! - [`mod@sink`]: the service that moves `AOB_AUDIT` into Parquet objects with every record
//!   written exactly once, across crashes ([`sink::serve`]).

pub mod index;
pub mod schema;
pub mod sink;
pub mod store;

pub use schema::{encode, schema, to_batch};
pub use sink::SinkConfig;
pub use store::{Date, FileInfo, list, object_path, open};

/// What can go wrong.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Bad configuration (a URL, an environment variable).
    #[error("configuration: {0}")]
    Config(String),
    /// Building an Arrow batch failed.
    #[error("arrow: {0}")]
    Arrow(#[from] arrow_schema::ArrowError),
    /// Writing or reading Parquet failed.
    #[error("parquet: {0}")]
    Parquet(#[from] parquet::errors::ParquetError),
    /// The object store refused or did not answer.
    #[error("object store: {0}")]
    Store(String),
    /// The NATS server refused or did not answer.
    #[error("nats: {0}")]
    Nats(String),
    /// A stream, bucket or consumer is missing, or another runtime error.
    #[error(transparent)]
    Runtime(#[from] aob_runtime::Error),
    /// The intent log changed under the sink: another sink is running on the same consumer.
    #[error("{0}")]
    Conflict(String),
    /// The `AOB_AUDIT` stream was deleted and created again under the running sink.
    #[error("{0}")]
    Recreated(String),
    /// A crash test's failpoint was reached (see [`sink::Failpoint`]).
    #[error("stopped at failpoint {0}")]
    Failpoint(&'static str),
    /// Shutdown was requested while an operation was being retried.
    #[error("shut down before the operation succeeded")]
    Shutdown,
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

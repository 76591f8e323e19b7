//! Knowledge bases: documents cut into chunks ([`chunk`]), embedded ([`embed`]: an
//! OpenAI-compatible `/v1/embeddings` endpoint, or all-MiniLM-L6-v2 in process,
//! [`minilm`]), kept as Parquet in object storage next to the audit ([`parquet_io`]), and
//! searched by exact cosine in memory ([`search`]). No vector database.

pub mod chunk;
pub mod embed;
pub mod extract;
pub mod minilm;
pub mod parquet_io;
pub mod search;
pub mod store;

/// What can go wrong.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The embedding model could not be loaded.
    #[error("embedding model: {0}")]
    Model(String),
    /// An embeddings endpoint failed.
    #[error("embeddings: {0}")]
    Embed(String),
    /// A chunk file could not be written or read.
    #[error("{0}")]
    Format(String),
    /// A document could not be read, or a request does not fit the knowledge base.
    #[error("{0}")]
    Document(String),
    /// The bucket or the object store failed.
    #[error("{0}")]
    Store(String),
}

/// A result of this crate.
pub type Result<T> = std::result::Result<T, Error>;

//! Token indexes over Datanets in infini-gram's on-disk format.
//!
//! [`build`] writes shards (`tokenized.s`, `offset.s`, `table.s`, `metadata.s`, `metaoff.s`)
//! and builds their suffix arrays with libsais; [`engine`] memory-maps them and answers
//! infini-gram's queries (count, find, n-gram and ∞-gram probabilities, next-token
//! distributions, documents, maximal-span attribution); [`attribution`] turns the spans of a
//! model output into per-contribution credit; [`substring`] finds documents repeating long spans
//! of earlier ones (ExactSubstr); [`tokenizer`] trains byte-level BPE tokenizers.

pub mod attribution;
pub mod build;
pub mod docmap;
pub mod engine;
pub mod substring;
pub mod tokenizer;

pub use attribution::{credit, Credit};
pub use build::{
    build_from_tokenized, merge_shards, pointer_width, write_table, ShardSummary, ShardWriter,
};
pub use docmap::{write_document_map, DocRef, DocumentMap};
pub use engine::{AttributeParams, Index, Span};
pub use substring::{substring_duplicates, SubstringDuplicate};
pub use tokenizer::TextTokenizer;

/// The document separator token (and the reason vocabularies stop at 65,535 tokens).
pub const DOC_SEP: u16 = u16::MAX;

/// Errors of index construction and queries.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("cannot open {0}: {1}")]
    Open(std::path::PathBuf, std::io::Error),
    #[error("malformed index: {0}")]
    Format(String),
    #[error("suffix-array construction failed: {0}")]
    Build(String),
    #[error("{shard}: building it needs {needed} bytes of memory, over the budget of {budget} (split the input into more shards or raise the budget)")]
    Budget {
        shard: std::path::PathBuf,
        needed: u64,
        budget: u64,
    },
    #[error("{0}")]
    Query(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
}

/// Result of this crate.
pub type Result<T, E = IndexError> = std::result::Result<T, E>;

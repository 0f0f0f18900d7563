//! The Datanet store: Hive-partitioned Parquet on object storage, made visible by atomic commits.
//!
//! Layout under the store root (a local directory by default, `s3://bucket/prefix` for S3):
//!
//! ```text
//! datanets/<name>/day=YYYY-MM-DD/part-<topic>-<partition>-<first offset>-<last offset>.parquet
//! tables/<name>/day=YYYY-MM-DD/part-….parquet          engine tables (rejections, …)
//! _staging/<job>/<source>/<topic>/<partition>/…        files written but not yet committed
//! _checkpoints/<job>/<source>/<topic>/<partition>/<seq>.json   the commit log
//! ```
//!
//! A checkpoint of one partition's pipeline writes its files to `_staging`, then creates the next
//! commit record with a create-if-absent put (a second writer of the same partition is fenced
//! out), then moves the staged files into place. Readers list `datanets/` and `tables/` and so see
//! committed files only; a file name is a function of the partition and offset range, so a replay
//! after a crash writes the same name. On restart the last record is rolled forward (files it
//! names but that were not moved yet are moved) and staging leftovers are deleted.

pub mod commit;
pub mod layout;
pub mod sink;
pub mod store;

pub use commit::{CommitLog, CommitRecord, CommittedFile, PartitionKey};
pub use layout::{TableKind, TableRef};
pub use sink::{EncodedFile, TableSink, TableSinkConfig};
pub use store::{Store, StoreError};

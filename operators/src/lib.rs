//! The operator contract of the ledgerflow runtime, and the stages that transform data.
//!
//! A job is a DAG of sources, stages and sinks. Every stage implements [`Operator`]: it receives
//! Arrow [`RecordBatch`](arrow_array::RecordBatch)es and [`Signal`]s on one ordered stream per
//! Kafka partition and emits batches to its downstream stages through a [`Collector`]. Rows it
//! refuses go to the job's rejections (table and dead-letter topic) through
//! [`OperatorContext::reject`], never silently away.
//!
//! Stages are registered by name with a typed config (see `ledgerflow::registry`), and declare
//! their output schema at plan time through [`StageFactory::output_schema`], so a mismatch fails
//! `ledgerflow validate` rather than a running job.

pub mod band_runs;
pub mod batch_verify;
pub mod decode;
pub mod dedup;
pub mod filter;
pub mod key_runs;
pub mod metrics;
pub mod minhash;
pub mod operator;
pub mod quality;
pub mod rejection;
pub mod rows;
pub mod runs;
pub mod signature;
pub mod state;
pub mod verify;

pub use operator::{
    Barrier, Collector, Message, Operator, OperatorContext, OperatorError, Positions, Settled,
    Signal, StageEnv, StageFactory,
};
pub use rejection::{Rejection, RejectionBatchBuilder};

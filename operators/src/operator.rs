//! The operator trait, the messages operators exchange, and their context.
//!
//! # Rules every operator keeps
//!
//! These are the runtime's contract, in the manner of DataFusion's `ExecutionPlan` rules:
//!
//! 1. **Data and signals share one ordered stream.** An operator sees [`Message::Data`] and
//!    [`Message::Signal`] in the order the source emitted them for its partition. A barrier is
//!    seen after every row that precedes it at the source and before any row that follows.
//! 2. **Decisions are a function of the input log and the restored state.** Use the Kafka record
//!    timestamp (`kafka_timestamp`), never the wall clock, for expiry, windows and epochs; no
//!    randomness that is not seeded from the data. A replay after a crash then decides the same.
//! 3. **State is snapshotted on barriers.** [`Operator::on_barrier`] returns the bytes that, given
//!    to [`Operator::restore`] on a fresh instance, rebuild the operator as of that barrier.
//! 4. **Errors travel, they do not panic.** Bad input rows are rejected with a reason through
//!    [`OperatorContext::reject`]; an `Err` from a hook is for failures of the operator itself
//!    (it stops the job, which restarts from the last checkpoint). Never `unwrap` input data.
//! 5. **No detached work.** Operators run on the CPU runtime, one instance per partition; they do
//!    not `tokio::spawn`, block on I/O, or keep threads of their own.
//! 6. **Nothing is lost.** Every input row is either emitted downstream or rejected.

use std::sync::Arc;

use arrow_array::RecordBatch;
use arrow_schema::SchemaRef;
use ledgerflow_schemas::contribution::SigningDomain;

use crate::rejection::Rejection;
use crate::state::StateDb;

/// A checkpoint barrier: everything before it is part of checkpoint `checkpoint`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Barrier {
    /// Monotonic checkpoint number of this partition's pipeline.
    pub checkpoint: u64,
    /// First source offset covered by this checkpoint (inclusive).
    pub first_offset: i64,
    /// Next source offset to read after this checkpoint (exclusive end).
    pub next_offset: i64,
    /// Whether this is the last barrier before the pipeline stops.
    pub is_final: bool,
}

/// Control messages that travel in-band with the data.
#[derive(Debug, Clone, PartialEq)]
pub enum Signal {
    Barrier(Barrier),
    /// Event time (ms since the epoch, from Kafka record timestamps) up to which input is complete.
    Watermark(i64),
    /// A reward epoch `n` has closed in event time.
    EpochTick(u64),
    EndOfData,
}

/// What flows on an edge of the DAG.
#[derive(Debug, Clone)]
pub enum Message {
    Data(RecordBatch),
    Signal(Signal),
}

impl Message {
    /// Rows carried (0 for signals); channels are bounded by this.
    pub fn rows(&self) -> usize {
        match self {
            Message::Data(b) => b.num_rows(),
            Message::Signal(_) => 0,
        }
    }
}

/// Failures of an operator itself (not of its input, which is rejected row by row).
#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    /// The operator's state could not be restored from a snapshot: a bug or a corrupt store.
    #[error("cannot restore state of `{stage}`: {detail}")]
    Restore { stage: String, detail: String },
    /// Arrow refused to build a batch: a bug.
    #[error("arrow error in `{stage}`: {source}")]
    Arrow {
        stage: String,
        #[source]
        source: arrow_schema::ArrowError,
    },
    /// The outside world failed (a store, a broker); retrying from the last checkpoint may help.
    #[error("`{stage}`: {detail}")]
    External { stage: String, detail: String },
}

/// Per-instance context: the stage's name, partition, and where rejections go.
#[derive(Debug)]
pub struct OperatorContext {
    /// The stage's name in the job file.
    pub stage: String,
    /// The Kafka partition this instance serves.
    pub partition: i32,
    rejections: Vec<Rejection>,
    counts: Vec<(&'static str, &'static str, u64)>,
}

impl OperatorContext {
    pub fn new(stage: impl Into<String>, partition: i32) -> Self {
        Self {
            stage: stage.into(),
            partition,
            rejections: Vec::new(),
            counts: Vec::new(),
        }
    }

    /// Refuse one input row; it goes to the `rejections` table and the dead-letter topic.
    pub fn reject(&mut self, mut rejection: Rejection) {
        if rejection.stage.is_empty() {
            rejection.stage = self.stage.clone();
        }
        self.rejections.push(rejection);
    }

    /// Adds `n` to the counter metric `name` with label `kind=kind` (and this stage).
    pub fn count(&mut self, name: &'static str, kind: &'static str, n: u64) {
        self.counts.push((name, kind, n));
    }

    /// Takes the counts gathered since the last call.
    pub fn take_counts(&mut self) -> Vec<(&'static str, &'static str, u64)> {
        std::mem::take(&mut self.counts)
    }

    /// Takes the rejections gathered since the last call.
    pub fn take_rejections(&mut self) -> Vec<Rejection> {
        std::mem::take(&mut self.rejections)
    }
}

/// Where an operator puts its output batches.
#[derive(Debug, Default)]
pub struct Collector {
    batches: Vec<RecordBatch>,
    deferred: Vec<RecordBatch>,
}

impl Collector {
    pub fn collect(&mut self, batch: RecordBatch) {
        if batch.num_rows() > 0 {
            self.batches.push(batch);
        }
    }

    pub fn take(&mut self) -> Vec<RecordBatch> {
        std::mem::take(&mut self.batches)
    }

    /// Hands input rows back undecided: the runtime delivers them to the stage again once
    /// everything it emitted so far has settled downstream (see [`Operator::on_settled`]).
    pub fn defer(&mut self, batch: RecordBatch) {
        if batch.num_rows() > 0 {
            self.deferred.push(batch);
        }
    }

    pub fn take_deferred(&mut self) -> Vec<RecordBatch> {
        std::mem::take(&mut self.deferred)
    }
}

/// Kafka positions (partition, offset) of rows.
pub type Positions = std::collections::HashSet<(i32, i64)>;

/// What became of rows since the last [`Operator::on_settled`].
#[derive(Debug, Default)]
pub struct Settled {
    /// Refused by some stage.
    pub refused: Positions,
    /// Written to a sink.
    pub kept: Positions,
    /// Nothing is in flight any more: a row neither refused nor kept was dropped on purpose
    /// (or its stage holds it), and waiting for it would never end.
    pub all: bool,
}

impl Settled {
    pub fn clear(&mut self) {
        self.refused.clear();
        self.kept.clear();
        self.all = false;
    }
}

/// A stage: turns input batches into output batches, with hooks for the runtime's signals.
pub trait Operator: Send {
    /// Processes one batch from the stage's input.
    fn process_batch(
        &mut self,
        batch: RecordBatch,
        ctx: &mut OperatorContext,
        out: &mut Collector,
    ) -> Result<(), OperatorError>;

    /// Called on a checkpoint barrier after every batch before it; returns the state snapshot.
    fn on_barrier(
        &mut self,
        _barrier: &Barrier,
        _ctx: &mut OperatorContext,
        _out: &mut Collector,
    ) -> Result<Option<Vec<u8>>, OperatorError> {
        Ok(None)
    }

    /// Rebuilds state from a snapshot taken by [`Operator::on_barrier`].
    fn restore(&mut self, _snapshot: &[u8], ctx: &OperatorContext) -> Result<(), OperatorError> {
        Err(OperatorError::Restore {
            stage: ctx.stage.clone(),
            detail: "this operator keeps no state but a snapshot was found".into(),
        })
    }

    /// Event time has advanced to `_event_time_ms`.
    fn on_watermark(
        &mut self,
        _event_time_ms: i64,
        _ctx: &mut OperatorContext,
        _out: &mut Collector,
    ) -> Result<(), OperatorError> {
        Ok(())
    }

    /// Reward epoch `_epoch` has closed.
    fn on_epoch(
        &mut self,
        _epoch: u64,
        _ctx: &mut OperatorContext,
        _out: &mut Collector,
    ) -> Result<(), OperatorError> {
        Ok(())
    }

    /// The batches in flight have gone as far as they go: `settled` says which rows (by Kafka
    /// position, from every stage) were refused and which were written to a sink since the last
    /// call, so a stage that remembers what it passed can forget what the pipeline did not keep.
    /// Rows [`Collector::defer`]red are delivered again after this.
    fn on_settled(
        &mut self,
        _settled: &Settled,
        _ctx: &mut OperatorContext,
    ) -> Result<(), OperatorError> {
        Ok(())
    }

    /// The input has ended; emit what is left.
    fn close(
        &mut self,
        _ctx: &mut OperatorContext,
        _out: &mut Collector,
    ) -> Result<(), OperatorError> {
        Ok(())
    }
}

/// What the runtime gives a stage when it makes instances: job-wide settings and shared state.
#[derive(Debug, Clone, Default)]
pub struct StageEnv {
    /// The job's name.
    pub job: String,
    /// The EIP-712 domain contributions are signed in (the job's `signing:` section).
    pub signing: SigningDomain,
    /// The job's durable state store, opened when any stage is [`StageFactory::stateful`].
    pub state: Option<Arc<StateDb>>,
}

impl StageEnv {
    /// The state store, or an error naming `stage` when the runtime opened none.
    pub fn state(&self, stage: &str) -> Result<&Arc<StateDb>, OperatorError> {
        self.state.as_ref().ok_or_else(|| OperatorError::External {
            stage: stage.to_string(),
            detail: "this stage keeps state but the job has no state store".into(),
        })
    }
}

/// The plan-time side of a stage: checks its inputs' schemas and makes one instance per partition.
pub trait StageFactory: Send + Sync {
    /// The schema of what the stage emits, given its inputs' schemas; `Err` explains a mismatch.
    fn output_schema(&self, inputs: &[SchemaRef]) -> Result<SchemaRef, String>;
    /// A fresh instance for one partition's pipeline. Instances of a stateful stage share one
    /// state, made at the first call with a given `env.state`.
    fn instantiate(&self, stage: &str, env: &StageEnv) -> Result<Box<dyn Operator>, OperatorError>;
    /// Whether the stage keeps durable state shared across partitions (in `env.state`).
    fn stateful(&self) -> bool {
        false
    }
}

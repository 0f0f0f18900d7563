//! One partition's pipeline: the job's operators and sinks, fed by the source in order, committing
//! a checkpoint of its own on every barrier.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use arrow_array::RecordBatch;
use bytes::Bytes;
use ledgerflow_kafka::DeadLetterProducer;
use ledgerflow_operators::metrics::{self, micros, Registry, Value};
use ledgerflow_operators::StageEnv;
use ledgerflow_operators::{
    Barrier, Collector, Message, Operator, OperatorContext, Rejection, RejectionBatchBuilder,
    Settled, Signal,
};
use ledgerflow_schemas::tables::{
    penalty_schema, rejection_schema, PENALTIES_TABLE, REJECTIONS_TABLE,
};
use ledgerflow_store::layout::part_file_name;
use ledgerflow_store::{
    CommitLog, CommitRecord, CommittedFile, PartitionKey, Store, TableRef, TableSink,
};
use rdkafka::producer::DeliveryFuture;

use super::channel::RowReceiver;
use super::RunError;
use crate::plan::Plan;
use crate::registry::Built;
use crate::spec::{JobSpec, PenaltyPolicy};

/// Builds `penalties` rows.
#[derive(Default)]
struct PenaltyBatchBuilder {
    epoch: arrow_array::builder::UInt64Builder,
    contributor: arrow_array::builder::StringBuilder,
    datanet: arrow_array::builder::StringBuilder,
    reason: arrow_array::builder::StringBuilder,
    points: arrow_array::builder::UInt32Builder,
    evidence: arrow_array::builder::StringBuilder,
    topic: arrow_array::builder::StringBuilder,
    partition: arrow_array::builder::Int32Builder,
    offset: arrow_array::builder::Int64Builder,
    timestamp: Vec<i64>,
}

impl PenaltyBatchBuilder {
    fn push(&mut self, r: &Rejection, who: &str, points: u32, epoch_seconds: u64) {
        let secs = r.kafka_timestamp_ms.max(0) as u64 / 1000;
        self.epoch.append_value(secs / epoch_seconds.max(1));
        self.contributor.append_value(who);
        self.datanet.append_option(r.datanet.as_deref());
        self.reason.append_value(&r.reason);
        self.points.append_value(points);
        self.evidence.append_option(r.content_hash.as_deref());
        self.topic.append_value(&r.kafka_topic);
        self.partition.append_value(r.kafka_partition);
        self.offset.append_value(r.kafka_offset);
        self.timestamp.push(r.kafka_timestamp_ms);
    }

    fn is_empty(&self) -> bool {
        self.timestamp.is_empty()
    }

    fn finish(&mut self) -> RecordBatch {
        let ts = arrow_array::TimestampMillisecondArray::from(std::mem::take(&mut self.timestamp))
            .with_timezone("UTC");
        let columns: Vec<arrow_array::ArrayRef> = vec![
            Arc::new(self.epoch.finish()),
            Arc::new(self.contributor.finish()),
            Arc::new(self.datanet.finish()),
            Arc::new(self.reason.finish()),
            Arc::new(self.points.finish()),
            Arc::new(self.evidence.finish()),
            Arc::new(self.topic.finish()),
            Arc::new(self.partition.finish()),
            Arc::new(self.offset.finish()),
            Arc::new(ts),
        ];
        RecordBatch::try_new(penalty_schema(), columns)
            .expect("penalty columns follow penalty_schema by construction")
    }
}

enum Node {
    Source,
    Op(Box<dyn Operator>, OperatorContext),
    Sink(Box<TableSink>),
}

struct NodeMetrics {
    rows_in: Arc<Value>,
    rows_out: Arc<Value>,
    busy: Arc<Value>,
}

/// What a partition's pipeline reports after each commit.
#[derive(Debug, Clone)]
pub struct Committed {
    pub partition: i32,
    pub next_offset: i64,
    pub rows_in: u64,
    pub rows_rejected: u64,
}

pub struct PartitionPipeline {
    key: PartitionKey,
    store: Store,
    log: CommitLog,
    worker: String,
    nodes: Vec<Node>,
    names: Vec<String>,
    node_metrics: Vec<NodeMetrics>,
    downstream: Vec<Vec<usize>>,
    order: Vec<usize>,
    source: usize,
    rejections: TableSink,
    rejections_builder: RejectionBatchBuilder,
    penalties: TableSink,
    policy: PenaltyPolicy,
    dead_letter: Option<DeadLetterProducer>,
    pending_dead_letters: Vec<DeliveryFuture>,
    seq: u64,
    rows_in: u64,
    rows_rejected: u64,
    /// Some stage keeps state: tell stages which rows were refused and kept
    /// ([`Operator::on_settled`]); without one, nothing is collected for it.
    stateful: bool,
    metrics: Registry,
    committed_tx: std::sync::mpsc::Sender<Committed>,
}

impl PartitionPipeline {
    /// Builds the pipeline of `key` and restores its operators from the last commit.
    #[allow(clippy::too_many_arguments)]
    pub async fn new(
        spec: &JobSpec,
        plan: &Plan,
        key: PartitionKey,
        store: Store,
        last: Option<&CommitRecord>,
        worker: &str,
        dead_letter: Option<DeadLetterProducer>,
        metrics: Registry,
        committed_tx: std::sync::mpsc::Sender<Committed>,
        env: &StageEnv,
    ) -> Result<Self, RunError> {
        let mut nodes = Vec::with_capacity(spec.nodes.len());
        let mut names = Vec::with_capacity(spec.nodes.len());
        let mut node_metrics = Vec::with_capacity(spec.nodes.len());
        let mut source = 0;
        for (i, n) in spec.nodes.iter().enumerate() {
            names.push(n.name.clone());
            let labels = [("stage", n.name.as_str())];
            node_metrics.push(NodeMetrics {
                rows_in: metrics.series(metrics::ROWS_IN, &labels),
                rows_out: metrics.series(metrics::ROWS_OUT, &labels),
                busy: metrics.series(metrics::BUSY_SECONDS, &labels),
            });
            nodes.push(match &n.built {
                Built::Kafka(_) => {
                    source = i;
                    Node::Source
                }
                Built::Stage(f) => {
                    let ctx = OperatorContext::new(n.name.clone(), key.partition);
                    let mut op = f.instantiate(&n.name, env)?;
                    if let Some(path) = last.and_then(|r| r.state.get(&n.name)) {
                        let bytes = store.get(path).await?.ok_or_else(|| {
                            RunError::Corrupt(format!("state snapshot {path} is missing"))
                        })?;
                        op.restore(&bytes, &ctx)?;
                    }
                    Node::Op(op, ctx)
                }
                Built::DatanetSource(_)
                | Built::Tokenize(_)
                | Built::TokenIndex(_)
                | Built::Train(_)
                | Built::Serve(_) => {
                    return Err(RunError::Setup(format!(
                        "`{}` is a batch node; batch jobs run with crate::batch",
                        n.name
                    )))
                }
                Built::Datanet(c) => Node::Sink(Box::new(TableSink::new(
                    TableRef::datanet(&c.datanet),
                    c.input_schema(),
                    c.zstd_level,
                    c.row_group_rows,
                ))),
            });
        }
        Ok(Self {
            log: CommitLog::new(store.clone(), key.clone()),
            key,
            store,
            worker: worker.to_string(),
            nodes,
            names,
            node_metrics,
            downstream: plan.downstream.clone(),
            order: plan.order.clone(),
            source,
            rejections: TableSink::new(
                TableRef::engine(REJECTIONS_TABLE),
                rejection_schema(),
                3,
                64 * 1024,
            ),
            rejections_builder: RejectionBatchBuilder::default(),
            penalties: TableSink::new(
                TableRef::engine(PENALTIES_TABLE),
                penalty_schema(),
                3,
                64 * 1024,
            ),
            policy: spec.header.penalties.clone(),
            dead_letter,
            pending_dead_letters: Vec::new(),
            seq: last.map_or(0, |r| r.seq),
            rows_in: 0,
            rows_rejected: 0,
            stateful: env.state.is_some(),
            metrics,
            committed_tx,
        })
    }

    /// Runs until `EndOfData` or the source goes away; the last barrier commits everything.
    pub async fn run(mut self, mut rx: RowReceiver) -> Result<(), RunError> {
        while let Some(item) = rx.recv().await {
            match &item.message {
                Message::Data(batch) => {
                    self.rows_in += batch.num_rows() as u64;
                    self.push_from(self.source, batch.clone())?;
                }
                Message::Signal(Signal::Barrier(b)) => self.checkpoint(b).await?,
                Message::Signal(Signal::EndOfData) => {
                    self.close()?;
                    return Ok(());
                }
                Message::Signal(Signal::Watermark(t)) => {
                    let t = *t;
                    self.each_op(|op, ctx, out| op.on_watermark(t, ctx, out))?
                }
                Message::Signal(Signal::EpochTick(e)) => {
                    let e = *e;
                    self.each_op(|op, ctx, out| op.on_epoch(e, ctx, out))?
                }
            }
        }
        Ok(())
    }

    /// Delivers `batch`, the output of node `from`, to everything downstream of it. When the
    /// queue has drained, every stage hears which rows were refused and which kept
    /// ([`Operator::on_settled`]), then the rows stages deferred are delivered again, until none
    /// is left.
    fn push_from(&mut self, from: usize, batch: RecordBatch) -> Result<(), RunError> {
        // (node, batch, first delivery: counted in rows_in)
        let mut queue: VecDeque<(usize, RecordBatch, bool)> = VecDeque::new();
        self.node_metrics[from]
            .rows_out
            .add(batch.num_rows() as u64);
        for &d in &self.downstream[from] {
            queue.push_back((d, batch.clone(), true));
        }
        let mut settled = Settled::default();
        let mut last_deferred = usize::MAX;
        loop {
            let mut deferred: Vec<(usize, RecordBatch)> = Vec::new();
            // Stages that deferred rows this round: what reaches them after waits too, so each
            // stage still sees its rows in order.
            let mut holding = vec![false; self.nodes.len()];
            while let Some((i, batch, first)) = queue.pop_front() {
                let m = &self.node_metrics[i];
                if first {
                    m.rows_in.add(batch.num_rows() as u64);
                }
                if holding[i] {
                    deferred.push((i, batch));
                    continue;
                }
                let started = Instant::now();
                match &mut self.nodes[i] {
                    Node::Source => {}
                    Node::Sink(sink) => {
                        sink.write(&batch)?;
                        if self.stateful {
                            settled.kept.extend(positions(&batch));
                        }
                    }
                    Node::Op(op, ctx) => {
                        let mut out = Collector::default();
                        op.process_batch(batch, ctx, &mut out)?;
                        let rejected = ctx.take_rejections();
                        for (name, kind, n) in ctx.take_counts() {
                            self.metrics
                                .series(name, &[("stage", &ctx.stage), ("kind", kind)])
                                .add(n);
                        }
                        for b in out.take() {
                            m.rows_out.add(b.num_rows() as u64);
                            for &d in &self.downstream[i] {
                                queue.push_back((d, b.clone(), true));
                            }
                        }
                        let held = out.take_deferred();
                        holding[i] = !held.is_empty();
                        deferred.extend(held.into_iter().map(|b| (i, b)));
                        if self.stateful {
                            settled.refused.extend(
                                rejected.iter().map(|r| (r.kafka_partition, r.kafka_offset)),
                            );
                        }
                        self.reject(rejected)?;
                    }
                }
                self.node_metrics[i].busy.add(micros(started.elapsed()));
            }
            // Deferred rows wait for rows that never settle (a stage dropped them): stop waiting.
            let waiting: usize = deferred.iter().map(|(_, b)| b.num_rows()).sum();
            settled.all = deferred.is_empty() || waiting >= last_deferred;
            last_deferred = waiting;
            for node in &mut self.nodes {
                if let Node::Op(op, ctx) = node {
                    op.on_settled(&settled, ctx)?;
                }
            }
            settled.clear();
            if deferred.is_empty() {
                return Ok(());
            }
            queue.extend(deferred.into_iter().map(|(i, b)| (i, b, false)));
        }
    }

    fn each_op(
        &mut self,
        mut f: impl FnMut(
            &mut Box<dyn Operator>,
            &mut OperatorContext,
            &mut Collector,
        ) -> Result<(), ledgerflow_operators::OperatorError>,
    ) -> Result<(), RunError> {
        for idx in self.order.clone() {
            let (out, rejected) = match &mut self.nodes[idx] {
                Node::Op(op, ctx) => {
                    let mut out = Collector::default();
                    f(op, ctx, &mut out)?;
                    (out.take(), ctx.take_rejections())
                }
                _ => continue,
            };
            self.reject(rejected)?;
            for b in out {
                self.push_from(idx, b)?;
            }
        }
        Ok(())
    }

    fn reject(&mut self, rejected: Vec<Rejection>) -> Result<(), RunError> {
        if rejected.is_empty() {
            return Ok(());
        }
        for r in &rejected {
            self.metrics
                .series(
                    metrics::REJECTIONS,
                    &[("stage", &r.stage), ("reason", &r.reason)],
                )
                .add(1);
            self.rejections_builder.push(r);
            if let Some(dl) = &self.dead_letter {
                self.pending_dead_letters.push(dl.send(r)?);
            }
        }
        self.rows_rejected += rejected.len() as u64;
        let batch = self.rejections_builder.finish();
        self.rejections.write(&batch)?;
        let mut penalties = PenaltyBatchBuilder::default();
        for r in &rejected {
            let points = self.policy.points_for(&r.reason);
            if points == 0 {
                continue;
            }
            for who in &r.penalise {
                penalties.push(r, who, points, self.policy.epoch_seconds);
                self.metrics
                    .series(metrics::PENALTY_POINTS, &[("reason", &r.reason)])
                    .add(u64::from(points));
            }
        }
        if !penalties.is_empty() {
            self.penalties.write(&penalties.finish())?;
        }
        Ok(())
    }

    fn close(&mut self) -> Result<(), RunError> {
        self.each_op(|op, ctx, out| op.close(ctx, out))
    }

    /// Snapshots every operator, stages files, confirms dead letters, and commits.
    async fn checkpoint(&mut self, b: &Barrier) -> Result<(), RunError> {
        let started = Instant::now();
        if b.is_final {
            self.close()?;
        }
        let name = part_file_name(
            &self.key.topic,
            self.key.partition,
            b.first_offset,
            b.next_offset - 1,
        );
        let seq = self.seq + 1;
        let mut snapshots: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        let mut files = Vec::new();
        for idx in self.order.clone() {
            let (snapshot, out, rejected) = match &mut self.nodes[idx] {
                Node::Op(op, ctx) => {
                    let mut out = Collector::default();
                    let s = op.on_barrier(b, ctx, &mut out)?;
                    (s, out.take(), ctx.take_rejections())
                }
                _ => continue,
            };
            self.reject(rejected)?;
            for batch in out {
                self.push_from(idx, batch)?;
            }
            if let Some(s) = snapshot {
                snapshots.insert(self.names[idx].clone(), s);
            }
        }
        for node in &mut self.nodes {
            if let Node::Sink(sink) = node {
                files.extend(sink.finish(&name)?);
            }
        }
        files.extend(self.rejections.finish(&name)?);
        files.extend(self.penalties.finish(&name)?);

        let staging = format!("{}/{:020}", self.key.staging_dir(), b.next_offset);
        let mut committed = Vec::with_capacity(files.len());
        let mut rows_by_table: BTreeMap<String, u64> = BTreeMap::new();
        for f in files {
            let staged = format!("{staging}/{}", f.path);
            let bytes = f.bytes.len() as u64;
            self.store.put(&staged, f.bytes).await?;
            *rows_by_table.entry(f.table.name.clone()).or_default() += f.rows;
            committed.push(CommittedFile {
                table: f.table,
                path: f.path,
                staged,
                rows: f.rows,
                bytes,
            });
        }
        let mut state = BTreeMap::new();
        for (stage, bytes) in snapshots {
            let path = format!("{}/{seq:020}/{stage}.bin", self.key.state_dir());
            self.store.put(&path, Bytes::from(bytes)).await?;
            state.insert(stage, path);
        }
        if let Some(dl) = &self.dead_letter {
            dl.confirm(std::mem::take(&mut self.pending_dead_letters))
                .await?;
        }
        let record = CommitRecord {
            format: 1,
            job: self.key.job.clone(),
            source: self.key.source.clone(),
            topic: self.key.topic.clone(),
            partition: self.key.partition,
            seq,
            first_offset: b.first_offset,
            next_offset: b.next_offset,
            files: committed,
            state,
            rows_in: self.rows_in,
            rows_rejected: self.rows_rejected,
            worker: self.worker.clone(),
        };
        self.log.commit(&record).await?;
        self.seq = seq;
        let elapsed = started.elapsed();
        self.metrics.series(metrics::CHECKPOINTS, &[]).add(1);
        self.metrics
            .series(metrics::CHECKPOINT_SECONDS, &[])
            .add(micros(elapsed));
        self.metrics
            .series(metrics::CHECKPOINT_LAST_SECONDS, &[])
            .set(micros(elapsed));
        for (table, rows) in rows_by_table {
            self.metrics
                .series(metrics::COMMITTED_ROWS, &[("table", &table)])
                .add(rows);
        }
        tracing::debug!(
            partition = self.key.partition,
            seq,
            next_offset = b.next_offset,
            rows_in = self.rows_in,
            rejected = self.rows_rejected,
            ms = elapsed.as_millis() as u64,
            "checkpoint committed"
        );
        let _ = self.committed_tx.send(Committed {
            partition: self.key.partition,
            next_offset: b.next_offset,
            rows_in: self.rows_in,
            rows_rejected: self.rows_rejected,
        });
        self.rows_in = 0;
        self.rows_rejected = 0;
        Ok(())
    }
}

/// The Kafka positions of the rows of `batch`, when it has them.
fn positions(batch: &RecordBatch) -> impl Iterator<Item = (i32, i64)> + '_ {
    use arrow_array::cast::AsArray;
    use arrow_array::types::{Int32Type, Int64Type};
    let p = batch
        .column_by_name("kafka_partition")
        .and_then(|c| c.as_primitive_opt::<Int32Type>());
    let o = batch
        .column_by_name("kafka_offset")
        .and_then(|c| c.as_primitive_opt::<Int64Type>());
    p.zip(o)
        .into_iter()
        .flat_map(|(p, o)| p.values().iter().copied().zip(o.values().iter().copied()))
}

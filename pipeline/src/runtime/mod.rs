//! Running a job: a Kafka source thread, one pipeline per assigned partition on the CPU runtime,
//! checkpoints on barriers, graceful stop on Ctrl-C or when the source has been idle.
//!
//! Threads: the source thread polls Kafka (librdkafka's own threads do the network I/O) and cuts
//! record batches; pipelines run on a dedicated CPU runtime so decoding and Parquet encoding never
//! delay polling; the I/O runtime serves `/metrics` and signals. Source and pipelines are joined
//! by channels bounded by rows.

pub mod channel;
pub mod partition;
pub mod serve_metrics;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ledgerflow_kafka::{DeadLetterProducer, PartitionHandler, RecordBatcher, SourceConsumer};
use ledgerflow_operators::metrics::{self, Registry};
use ledgerflow_operators::state::StateDb;
use ledgerflow_operators::{Barrier, Message, Signal, StageEnv};
use ledgerflow_store::{CommitLog, PartitionKey, Store};
use rdkafka::Message as _;

use crate::plan::Plan;
use crate::registry::Built;
use crate::spec::JobSpec;
use channel::{row_channel, ByteBudget, RowSender};
use partition::{Committed, PartitionPipeline};

/// Why a run failed. Operator and store errors stop the job; it restarts from its last commit.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Operator(#[from] ledgerflow_operators::OperatorError),
    #[error(transparent)]
    Store(#[from] ledgerflow_store::StoreError),
    #[error(transparent)]
    Kafka(#[from] ledgerflow_kafka::KafkaError),
    #[error("corrupt state: {0}")]
    Corrupt(String),
    #[error("partition {partition}'s pipeline failed: {detail}")]
    Pipeline { partition: i32, detail: String },
    #[error("{0}")]
    Setup(String),
}

/// How to run a job.
pub struct RunOptions {
    pub store: Store,
    /// Stop once no record arrived for this long (after joining the group), committing first.
    pub until_idle: Option<Duration>,
    /// Serve `/metrics` here.
    pub metrics_addr: Option<String>,
    /// A name for this process in commit records and logs.
    pub worker: String,
    /// Print a progress line to stderr every second.
    pub progress: bool,
    /// Bootstrap servers to use when the source says `embedded`.
    pub embedded_bootstrap: Option<String>,
    /// Rows in flight between the source and one partition's pipeline.
    pub channel_rows: usize,
}

/// What a run did.
#[derive(Debug, Default, Clone)]
pub struct RunSummary {
    pub records_read: u64,
    pub records_rejected: u64,
    pub checkpoints: u64,
    pub partitions: Vec<i32>,
    /// From the first record read to the final commit.
    pub active: Option<Duration>,
}

struct PartitionState {
    batcher: RecordBatcher,
    tx: RowSender,
    task: tokio::task::JoinHandle<Result<(), RunError>>,
    checkpoint: u64,
    first_offset: i64,
    next_offset: i64,
    rows_since_barrier: u64,
    bytes_since_barrier: u64,
    last_barrier: Instant,
    first_buffered: Option<Instant>,
    resume: Option<ResumeCheck>,
}

/// Verifies that a resumed partition really starts at its committed offset. Kafka returns the
/// record batch that holds the requested offset (the client drops what precedes it); a broker
/// that answers with a later batch would make us skip records silently, so when the first record
/// is past the resume point we seek further back, drop what is already committed, and only
/// accept a gap the log itself has (retention, compaction, transaction markers).
struct ResumeCheck {
    at: i64,
    rewind: i64,
    tries: u32,
}

enum Resume {
    Take,
    Drop,
    SeekTo(i64),
}

impl ResumeCheck {
    fn check(&mut self, offset: i64, partition: i32) -> (Resume, bool) {
        use std::cmp::Ordering::*;
        match offset.cmp(&self.at) {
            Less => (Resume::Drop, false),
            Equal => (Resume::Take, true),
            Greater if self.tries < 12 && self.at > 0 => {
                self.rewind = (self.rewind * 4).max((offset - self.at) * 2).max(1024);
                self.tries += 1;
                let target = (self.at - self.rewind).max(0);
                tracing::warn!(
                    partition,
                    resume = self.at,
                    first_delivered = offset,
                    seek_to = target,
                    "the broker answered past the resume offset; reading from further back"
                );
                (Resume::SeekTo(target), false)
            }
            Greater => {
                tracing::warn!(
                    partition,
                    resume = self.at,
                    first_delivered = offset,
                    "offsets {}..{} are not in the log; going on from {offset}",
                    self.at,
                    offset - 1
                );
                (Resume::Take, true)
            }
        }
    }
}

struct Shared {
    spec: Arc<JobSpec>,
    plan: Arc<Plan>,
    source_name: String,
    store: Store,
    worker: String,
    channel_rows: usize,
    /// Bytes of batches in flight between the source and every partition's pipeline.
    in_flight: ByteBudget,
    cpu: tokio::runtime::Handle,
    io: tokio::runtime::Handle,
    dead_letter: Option<DeadLetterProducer>,
    metrics: Registry,
    env: StageEnv,
    committed_tx: Mutex<std::sync::mpsc::Sender<Committed>>,
    partitions: Mutex<HashMap<i32, PartitionState>>,
    joined: AtomicBool,
    errors: Mutex<Vec<RunError>>,
    summary: Mutex<RunSummary>,
    last_event: Mutex<Instant>,
}

/// Record bytes read and not yet checkpointed, over every partition in `parts`.
fn buffered_bytes(parts: &HashMap<i32, PartitionState>) -> u64 {
    parts.values().map(|s| s.bytes_since_barrier).sum()
}

impl Shared {
    fn key(&self, topic: &str, partition: i32) -> PartitionKey {
        PartitionKey {
            job: self.spec.header.name.clone(),
            source: self.source_name.clone(),
            topic: topic.to_string(),
            partition,
        }
    }

    fn fail(&self, e: RunError) {
        tracing::error!(error = %e, "job failing");
        self.errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(e);
    }

    /// Recovers a partition from its commit log and starts its pipeline; returns where to resume.
    fn start_partition(&self, topic: &str, partition: i32) -> Result<Option<i64>, RunError> {
        let key = self.key(topic, partition);
        let log = CommitLog::new(self.store.clone(), key.clone());
        let last = self.io.block_on(log.recover())?;
        let committed_tx = self
            .committed_tx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let pipeline = self.io.block_on(PartitionPipeline::new(
            &self.spec,
            &self.plan,
            key,
            self.store.clone(),
            last.as_ref(),
            &self.worker,
            self.dead_letter.clone(),
            self.metrics.clone(),
            committed_tx,
            &self.env,
        ))?;
        let (tx, rx) = row_channel(self.channel_rows, self.in_flight.clone());
        let task = self.cpu.spawn(pipeline.run(rx));
        let resume = last.as_ref().map(|r| r.next_offset);
        tracing::info!(topic, partition, resume_offset = ?resume, worker = %self.worker, "partition assigned");
        self.partitions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                partition,
                PartitionState {
                    batcher: RecordBatcher::new(topic, partition),
                    tx,
                    task,
                    checkpoint: last.as_ref().map_or(0, |r| r.seq),
                    first_offset: resume.unwrap_or(-1),
                    next_offset: resume.unwrap_or(-1),
                    rows_since_barrier: 0,
                    bytes_since_barrier: 0,
                    last_barrier: Instant::now(),
                    first_buffered: None,
                    resume: resume.map(|at| ResumeCheck {
                        at,
                        rewind: 0,
                        tries: 0,
                    }),
                },
            );
        self.summary
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .partitions
            .push(partition);
        Ok(resume)
    }

    /// Sends the buffered batch of `p` down its pipeline.
    fn flush(&self, st: &mut PartitionState) -> Result<(), RunError> {
        if st.batcher.is_empty() {
            return Ok(());
        }
        let batch = st.batcher.finish();
        st.first_buffered = None;
        st.tx
            .blocking_send(&self.io, Message::Data(batch))
            .map_err(|_| RunError::Pipeline {
                partition: st.batcher_partition(),
                detail: "pipeline stopped".into(),
            })
    }

    /// Flushes and sends a barrier if anything was read since the last one.
    fn barrier(&self, st: &mut PartitionState, is_final: bool) -> Result<(), RunError> {
        self.flush(st)?;
        st.last_barrier = Instant::now();
        if st.rows_since_barrier == 0 {
            return Ok(());
        }
        st.checkpoint += 1;
        let b = Barrier {
            checkpoint: st.checkpoint,
            first_offset: st.first_offset,
            next_offset: st.next_offset,
            is_final,
        };
        st.first_offset = st.next_offset;
        st.rows_since_barrier = 0;
        st.bytes_since_barrier = 0;
        st.tx
            .blocking_send(&self.io, Message::Signal(Signal::Barrier(b)))
            .map_err(|_| RunError::Pipeline {
                partition: st.batcher_partition(),
                detail: "pipeline stopped".into(),
            })
    }

    /// Checkpoints the partitions holding the most uncheckpointed bytes until at most `target`
    /// bytes are left over all of them.
    fn relieve_memory(
        &self,
        parts: &mut HashMap<i32, PartitionState>,
        target: u64,
    ) -> Result<(), RunError> {
        let mut by_size: Vec<(u64, i32)> = parts
            .iter()
            .map(|(p, s)| (s.bytes_since_barrier, *p))
            .collect();
        by_size.sort_unstable_by(|a, b| b.cmp(a));
        let mut total: u64 = by_size.iter().map(|(b, _)| b).sum();
        for (bytes, p) in by_size {
            if total <= target || bytes == 0 {
                break;
            }
            if let Some(st) = parts.get_mut(&p) {
                tracing::debug!(partition = p, bytes, total, "memory budget: checkpointing");
                self.barrier(st, false)?;
            }
            total -= bytes;
        }
        Ok(())
    }

    /// Final barrier, end of data, and wait for the pipeline's last commit.
    fn stop_partition(&self, mut st: PartitionState) -> Result<(), RunError> {
        let p = st.batcher_partition();
        let sent = self.barrier(&mut st, true).and_then(|()| {
            st.tx
                .blocking_send(&self.io, Message::Signal(Signal::EndOfData))
                .map_err(|_| RunError::Pipeline {
                    partition: p,
                    detail: "pipeline stopped".into(),
                })
        });
        drop(st.tx);
        let joined = self.io.block_on(st.task);
        match joined {
            Ok(Ok(())) => sent,
            Ok(Err(e)) => Err(e),
            Err(e) => Err(RunError::Pipeline {
                partition: p,
                detail: format!("panicked: {e}"),
            }),
        }
    }
}

impl PartitionState {
    fn batcher_partition(&self) -> i32 {
        self.batcher.partition()
    }
}

struct Handler(Arc<Shared>);

impl PartitionHandler for Handler {
    fn on_assign(&self, topic: &str, partitions: &[i32]) -> Vec<Option<i64>> {
        self.0.joined.store(true, Ordering::SeqCst);
        *self.0.last_event.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        partitions
            .iter()
            .map(|&p| match self.0.start_partition(topic, p) {
                Ok(r) => r,
                Err(e) => {
                    self.0.fail(e);
                    None
                }
            })
            .collect()
    }

    fn on_revoke(&self, topic: &str, partitions: &[i32]) {
        for p in partitions {
            let st = self
                .0
                .partitions
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(p);
            if let Some(st) = st {
                tracing::info!(topic, partition = p, "partition revoked; committing it");
                if let Err(e) = self.0.stop_partition(st) {
                    self.0.fail(e);
                }
            }
        }
    }
}

/// Job-wide settings for stage instances; opens the state store when a stage keeps state.
fn stage_env(spec: &JobSpec, store: &Store) -> Result<StageEnv, RunError> {
    let signing = spec.header.signing.domain().map_err(RunError::Setup)?;
    let stateful = spec
        .nodes
        .iter()
        .any(|n| matches!(&n.built, Built::Stage(f) if f.stateful()));
    let state = if stateful {
        let dir = state_dir(spec, store)?;
        let db = StateDb::open(&dir, spec.header.state.cache_bytes as usize)
            .map_err(|e| RunError::Setup(e.to_string()))?;
        db.set_max_pending_bytes(spec.header.state.max_pending_bytes as usize);
        tracing::info!(path = %db.path().display(), "state store open");
        Some(db)
    } else {
        None
    };
    Ok(StageEnv {
        job: spec.header.name.clone(),
        signing,
        state,
    })
}

/// Where a job's state store lives: `state.dir`; else `<store>/_state/<job>` for a local store,
/// and for an object store a local cache directory named after the store's URL
/// (`$LEDGERFLOW_STATE_ROOT`, else `$XDG_CACHE_HOME/ledgerflow/state`, else
/// `~/.cache/ledgerflow/state`).
pub fn state_dir(spec: &JobSpec, store: &Store) -> Result<std::path::PathBuf, RunError> {
    if let Some(d) = spec.header.state.dir.as_deref().filter(|d| !d.is_empty()) {
        return Ok(std::path::PathBuf::from(d));
    }
    let url = store.url();
    if url.scheme() == "file" {
        if let Ok(root) = url.to_file_path() {
            return Ok(root.join("_state").join(&spec.header.name));
        }
    }
    let root = std::env::var_os("LEDGERFLOW_STATE_ROOT")
        .map(std::path::PathBuf::from)
        .or_else(|| {
            std::env::var_os("XDG_CACHE_HOME")
                .map(|c| std::path::PathBuf::from(c).join("ledgerflow/state"))
        })
        .or_else(|| {
            std::env::var_os("HOME")
                .map(|h| std::path::PathBuf::from(h).join(".cache/ledgerflow/state"))
        })
        .ok_or_else(|| {
            RunError::Setup(format!(
                "job `{}` has stateful stages and its store {url} is not local: set `state.dir`",
                spec.header.name
            ))
        })?;
    let name: String = url
        .as_str()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    Ok(root.join(name).join(&spec.header.name))
}

/// Runs `spec` until Ctrl-C / SIGTERM, until idle, or until a failure.
pub fn run_job(
    spec: JobSpec,
    plan: Plan,
    opts: RunOptions,
    io: tokio::runtime::Handle,
    shutdown: Arc<AtomicBool>,
) -> Result<RunSummary, RunError> {
    let (source_name, source) = spec
        .nodes
        .iter()
        .find_map(|n| match &n.built {
            Built::Kafka(c) => Some((n.name.clone(), c.clone())),
            _ => None,
        })
        .ok_or_else(|| RunError::Setup("the job has no kafka source".into()))?;
    let brokers = if source.brokers == ledgerflow_kafka::EMBEDDED {
        opts.embedded_bootstrap.clone().ok_or_else(|| {
            RunError::Setup(
                "the source says `brokers: embedded` but no embedded broker runs".into(),
            )
        })?
    } else {
        source.brokers.clone()
    };
    let group = source
        .group_id
        .clone()
        .unwrap_or_else(|| format!("ledgerflow-{}", spec.header.name));
    let dead_letter = match &source.dead_letter_topic {
        Some(t) => Some(DeadLetterProducer::new(&brokers, t)?),
        None => None,
    };
    let cpu_threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let cpu = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cpu_threads)
        .thread_name("ledgerflow-cpu")
        .enable_all()
        .build()
        .map_err(|e| RunError::Setup(format!("cannot start the CPU runtime: {e}")))?;
    let metrics = Registry::default();
    if let Some(addr) = &opts.metrics_addr {
        let bound = io
            .block_on(serve_metrics::serve(addr, metrics.clone()))
            .map_err(|e| RunError::Setup(format!("cannot serve metrics on {addr}: {e}")))?;
        tracing::info!(%bound, "serving /metrics");
        eprintln!("metrics=http://{bound}/metrics");
    }
    let (committed_tx, committed_rx) = std::sync::mpsc::channel::<Committed>();
    let ckpt = spec.header.checkpoint.clone();
    let env = stage_env(&spec, &opts.store)?;
    let shared = Arc::new(Shared {
        spec: Arc::new(spec),
        plan: Arc::new(plan),
        source_name,
        store: opts.store.clone(),
        worker: opts.worker.clone(),
        channel_rows: opts.channel_rows,
        in_flight: ByteBudget::new(ckpt.max_total_bytes),
        cpu: cpu.handle().clone(),
        io: io.clone(),
        dead_letter,
        metrics: metrics.clone(),
        env,
        committed_tx: Mutex::new(committed_tx),
        partitions: Mutex::new(HashMap::new()),
        joined: AtomicBool::new(false),
        errors: Mutex::new(Vec::new()),
        summary: Mutex::new(RunSummary::default()),
        last_event: Mutex::new(Instant::now()),
    });
    let consumer =
        SourceConsumer::new(&source, &brokers, &group, Arc::new(Handler(shared.clone())))?;
    tracing::info!(job = %shared.spec.header.name, %brokers, topic = %source.topic, %group, worker = %opts.worker, "job started");

    let lag = consumer.lag();
    let lag_gauge = metrics.series(metrics::CONSUMER_LAG, &[("topic", &source.topic)]);
    let bytes_read = metrics.series(metrics::SOURCE_BYTES, &[("topic", &source.topic)]);
    let linger = Duration::from_millis(source.batch_linger_ms);
    let interval = Duration::from_secs_f64(ckpt.interval_seconds);
    let started = Instant::now();
    let mut progress = Progress::new(opts.progress);
    let mut records: u64 = 0;
    let mut first_record: Option<Instant> = None;
    let mut last_housekeeping = Instant::now();
    let mut last_drain_check = Instant::now();
    // Record bytes read and not yet checkpointed, over every partition held (an upper bound
    // between housekeeping ticks, which recount it).
    let mut buffered: u64 = 0;
    let outcome: Result<(), RunError> = loop {
        if let Some(e) = shared
            .errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop()
        {
            break Err(e);
        }
        if shutdown.load(Ordering::SeqCst) {
            tracing::info!("stop requested; taking a final checkpoint");
            break Ok(());
        }
        match consumer.poll(Duration::from_millis(20)) {
            Some(Ok(m)) => {
                let mut parts = shared.partitions.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(st) = parts.get_mut(&m.partition()) {
                    if let Some(check) = &mut st.resume {
                        let (what, verified) = check.check(m.offset(), m.partition());
                        if verified {
                            st.resume = None;
                        }
                        match what {
                            Resume::Take => {}
                            Resume::Drop => continue,
                            Resume::SeekTo(target) => {
                                if let Err(e) = consumer.seek(&source.topic, m.partition(), target)
                                {
                                    break Err(e.into());
                                }
                                continue;
                            }
                        }
                    }
                    let offset = st.batcher.push(&m);
                    let len = m.payload_len() as u64;
                    if st.first_offset < 0 {
                        st.first_offset = offset;
                    }
                    st.next_offset = offset + 1;
                    st.rows_since_barrier += 1;
                    st.bytes_since_barrier += len;
                    st.first_buffered.get_or_insert_with(Instant::now);
                    bytes_read.add(len);
                    records += 1;
                    first_record.get_or_insert_with(Instant::now);
                    let result = if st.rows_since_barrier >= ckpt.max_rows
                        || st.bytes_since_barrier >= ckpt.max_bytes
                    {
                        shared.barrier(st, false)
                    } else if st.batcher.len() >= source.batch_max_rows {
                        shared.flush(st)
                    } else {
                        Ok(())
                    };
                    if let Err(e) = result {
                        break Err(e);
                    }
                    buffered += len;
                }
                if buffered >= ckpt.max_total_bytes {
                    if let Err(e) = shared.relieve_memory(&mut parts, ckpt.max_total_bytes / 2) {
                        break Err(e);
                    }
                    buffered = buffered_bytes(&parts);
                }
                drop(parts);
                *shared.last_event.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
            }
            Some(Err(e)) => tracing::warn!(error = %e, "consumer error"),
            None => {}
        }
        if last_housekeeping.elapsed() >= Duration::from_millis(10) {
            last_housekeeping = Instant::now();
            let mut parts = shared.partitions.lock().unwrap_or_else(|p| p.into_inner());
            let mut failed = None;
            for st in parts.values_mut() {
                let r = if st.last_barrier.elapsed() >= interval {
                    shared.barrier(st, false)
                } else if st.first_buffered.is_some_and(|t| t.elapsed() >= linger) {
                    shared.flush(st)
                } else {
                    Ok(())
                };
                if let Err(e) = r {
                    failed = Some(e);
                    break;
                }
            }
            buffered = buffered_bytes(&parts);
            drop(parts);
            if let Some(e) = failed {
                break Err(e);
            }
            let mut offsets = Vec::new();
            while let Ok(c) = committed_rx.try_recv() {
                offsets.push((c.partition, c.next_offset));
                let mut s = shared.summary.lock().unwrap_or_else(|p| p.into_inner());
                s.checkpoints += 1;
                s.records_rejected += c.rows_rejected;
            }
            if !offsets.is_empty() {
                consumer.commit_for_visibility(&source.topic, &offsets);
            }
            // One lock of each map: this runs on every housekeeping tick.
            let held: Vec<i32> = shared
                .partitions
                .lock()
                .unwrap_or_else(|x| x.into_inner())
                .keys()
                .copied()
                .collect();
            let total_lag: i64 = lag
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .filter(|(p, _)| held.contains(p))
                .map(|(_, l)| *l)
                .sum();
            lag_gauge.set(total_lag.max(0) as u64);
            progress.tick(records, total_lag, &metrics, started);
            if let Some(idle) = opts.until_idle {
                let quiet = shared
                    .last_event
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .elapsed();
                if shared.joined.load(Ordering::SeqCst)
                    && quiet >= idle
                    && last_drain_check.elapsed() >= Duration::from_secs(1)
                {
                    last_drain_check = Instant::now();
                    match undrained_partitions(
                        &consumer,
                        &shared,
                        &source.topic,
                        source.start == ledgerflow_kafka::StartFrom::Latest,
                    ) {
                        Ok(waiting) if waiting.is_empty() => {
                            tracing::info!(
                                idle_s = idle.as_secs_f64(),
                                "source idle and topic drained; finishing"
                            );
                            break Ok(());
                        }
                        Ok(waiting) => tracing::info!(
                            partitions = ?waiting,
                            "source idle, but these partitions hold records no one has committed yet \
                             (held by another member, or by a dead one until its session times out); waiting"
                        ),
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot check whether the topic is drained")
                        }
                    }
                }
            }
        }
    };

    // Final checkpoint of every partition we still hold, then leave the group.
    let held: Vec<(i32, PartitionState)> = shared
        .partitions
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .drain()
        .collect();
    let mut result = outcome;
    for (_, st) in held {
        let r = if result.is_ok() {
            shared.stop_partition(st)
        } else {
            st.task.abort();
            Ok(())
        };
        if let Err(e) = r {
            if result.is_ok() {
                result = Err(e);
            }
        }
    }
    consumer.close(Duration::from_secs(10));
    if let Some(e) = shared
        .errors
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .pop()
    {
        if result.is_ok() {
            result = Err(e);
        }
    }
    let mut final_offsets = Vec::new();
    while let Ok(c) = committed_rx.try_recv() {
        final_offsets.push((c.partition, c.next_offset));
        let mut s = shared.summary.lock().unwrap_or_else(|p| p.into_inner());
        s.checkpoints += 1;
        s.records_rejected += c.rows_rejected;
    }
    progress.finish(records, &metrics, started);
    cpu.shutdown_timeout(Duration::from_secs(5));
    result?;
    let mut summary = shared
        .summary
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    summary.records_read = records;
    summary.active = first_record.map(|t| t.elapsed());
    Ok(summary)
}

/// Partitions of `topic` with records that are neither read by us nor committed by anyone.
fn undrained_partitions(
    consumer: &SourceConsumer,
    shared: &Shared,
    topic: &str,
    starts_at_end: bool,
) -> Result<Vec<i32>, RunError> {
    let marks = consumer.watermarks(topic, Duration::from_secs(5))?;
    let mut waiting = Vec::new();
    for (p, low, high) in marks {
        if high <= low {
            continue;
        }
        let ours = shared
            .partitions
            .lock()
            .unwrap_or_else(|x| x.into_inner())
            .get(&p)
            .map(|st| st.next_offset);
        let done = match ours {
            Some(next) => next >= high,
            None => {
                let log = CommitLog::new(shared.store.clone(), shared.key(topic, p));
                match shared.io.block_on(log.latest())? {
                    Some(rec) => rec.next_offset >= high,
                    // Never committed: nothing to wait for only if this source starts at the end.
                    None => starts_at_end,
                }
            }
        };
        if !done {
            waiting.push(p);
        }
    }
    Ok(waiting)
}

/// The progress line: rate, lag and committed rows, redrawn in place on a terminal.
struct Progress {
    enabled: bool,
    last: Instant,
    last_records: u64,
}

impl Progress {
    fn new(enabled: bool) -> Self {
        Self {
            enabled,
            last: Instant::now(),
            last_records: 0,
        }
    }

    fn tick(&mut self, records: u64, lag: i64, metrics: &Registry, started: Instant) {
        if !self.enabled || self.last.elapsed() < Duration::from_secs(1) {
            return;
        }
        let rate = (records - self.last_records) as f64 / self.last.elapsed().as_secs_f64();
        self.last = Instant::now();
        self.last_records = records;
        eprint!(
            "\r\x1b[2K{:>7.1}s  read {records}  {rate:>9.0} rec/s  lag {lag}  committed {}  rejected {}",
            started.elapsed().as_secs_f64(),
            metrics.total(metrics::COMMITTED_ROWS, &[]) - metrics.total(metrics::COMMITTED_ROWS, &[("table", "rejections")]),
            metrics.total(metrics::REJECTIONS, &[]),
        );
    }

    fn finish(&mut self, records: u64, metrics: &Registry, started: Instant) {
        if self.enabled {
            self.last = Instant::now() - Duration::from_secs(2);
            self.tick(records, 0, metrics, started);
            eprintln!();
        }
    }
}

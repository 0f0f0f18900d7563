//! The source's consumer: a consumer-group member whose partition assignments are handed to the
//! runtime, which decides where each partition resumes (its last committed checkpoint) and
//! finishes a partition's checkpoint before giving it up.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arrow_array::builder::{BinaryBuilder, Int64Builder};
use arrow_array::{ArrayRef, Int32Array, RecordBatch, StringArray, TimestampMillisecondArray};
use ledgerflow_schemas::tables::kafka_record_schema;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaResult;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::statistics::Statistics;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::ClientContext;

use crate::config::{KafkaSourceConfig, StartFrom};
use crate::KafkaError;

/// What the runtime does when the group moves partitions.
pub trait PartitionHandler: Send + Sync + 'static {
    /// `partitions` of `topic` are now ours; returns, for each, the offset to resume from
    /// (`None`: no checkpoint yet, start as configured).
    fn on_assign(&self, topic: &str, partitions: &[i32]) -> Vec<Option<i64>>;
    /// `partitions` are being taken away: every record already polled from them must be
    /// checkpointed (or dropped, uncommitted) before this returns.
    fn on_revoke(&self, topic: &str, partitions: &[i32]);
}

/// Consumer lag per partition, from librdkafka's statistics.
pub type LagMap = Arc<Mutex<HashMap<i32, i64>>>;

pub struct SourceContext {
    handler: Arc<dyn PartitionHandler>,
    start: StartFrom,
    lag: LagMap,
}

impl ClientContext for SourceContext {
    fn stats(&self, statistics: Statistics) {
        let mut lag = self.lag.lock().unwrap_or_else(|p| p.into_inner());
        for topic in statistics.topics.values() {
            for (p, part) in &topic.partitions {
                if *p >= 0 && part.consumer_lag >= 0 {
                    lag.insert(*p, part.consumer_lag);
                }
            }
        }
    }
}

impl ConsumerContext for SourceContext {
    fn rebalance(
        &self,
        base: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let mut by_topic: HashMap<String, Vec<i32>> = HashMap::new();
        for e in tpl.elements() {
            by_topic
                .entry(e.topic().to_string())
                .or_default()
                .push(e.partition());
        }
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                for (topic, parts) in &by_topic {
                    let resume = self.handler.on_assign(topic, parts);
                    for (p, off) in parts.iter().zip(resume) {
                        let offset = match (off, self.start) {
                            (Some(o), _) => Offset::Offset(o),
                            (None, StartFrom::Earliest) => Offset::Beginning,
                            (None, StartFrom::Latest) => Offset::End,
                        };
                        if let Err(e) = tpl.set_partition_offset(topic, *p, offset) {
                            tracing::error!(%topic, partition = p, error = %e, "cannot set resume offset");
                        }
                    }
                }
                if let Err(e) = base.assign(tpl) {
                    tracing::error!(error = %e, "assign failed");
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                for (topic, parts) in &by_topic {
                    self.handler.on_revoke(topic, parts);
                }
                if let Err(e) = base.unassign() {
                    tracing::error!(error = %e, "unassign failed");
                }
            }
            other => {
                tracing::error!(error = ?other, "rebalance error; giving up every partition");
                let all: Vec<(String, Vec<i32>)> = by_topic.into_iter().collect();
                for (topic, parts) in &all {
                    self.handler.on_revoke(topic, parts);
                }
                let _ = base.unassign();
            }
        }
    }
}

/// The source's group member.
pub struct SourceConsumer {
    consumer: BaseConsumer<SourceContext>,
    lag: LagMap,
}

impl SourceConsumer {
    /// Joins `group` and subscribes to the configured topic.
    pub fn new(
        config: &KafkaSourceConfig,
        brokers: &str,
        group: &str,
        handler: Arc<dyn PartitionHandler>,
    ) -> Result<Self, KafkaError> {
        let lag = LagMap::default();
        let mut cc = ClientConfig::new();
        cc.set("bootstrap.servers", brokers)
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false")
            .set("auto.offset.reset", "earliest")
            .set("statistics.interval.ms", "1000")
            .set("fetch.wait.max.ms", "50")
            .set("queued.max.messages.kbytes", "65536")
            .set("partition.assignment.strategy", "range,roundrobin")
            .set("session.timeout.ms", "30000")
            .set("max.poll.interval.ms", "300000");
        for (k, v) in &config.properties {
            cc.set(k, v);
        }
        let consumer: BaseConsumer<SourceContext> = cc
            .create_with_context(SourceContext {
                handler,
                start: config.start,
                lag: lag.clone(),
            })
            .map_err(KafkaError::client("creating consumer"))?;
        consumer
            .subscribe(&[config.topic.as_str()])
            .map_err(KafkaError::client(format!(
                "subscribing to {}",
                config.topic
            )))?;
        Ok(Self { consumer, lag })
    }

    /// Next record, or `None` after `timeout` (rebalance callbacks run inside this call).
    pub fn poll(&self, timeout: Duration) -> Option<KafkaResult<BorrowedMessage<'_>>> {
        self.consumer.poll(timeout)
    }

    /// Total consumer lag over the partitions we hold (from the last statistics).
    pub fn lag(&self) -> LagMap {
        self.lag.clone()
    }

    /// Moves the fetch position of an assigned partition.
    pub fn seek(&self, topic: &str, partition: i32, offset: i64) -> Result<(), KafkaError> {
        self.consumer
            .seek(
                topic,
                partition,
                Offset::Offset(offset),
                Duration::from_secs(10),
            )
            .map_err(KafkaError::client(format!(
                "seeking {topic}/{partition} to {offset}"
            )))
    }

    /// Records `offsets` (partition → next offset) as the group's committed position, for
    /// visibility in lag tools; the store's commit log stays authoritative.
    pub fn commit_for_visibility(&self, topic: &str, offsets: &[(i32, i64)]) {
        let mut tpl = TopicPartitionList::new();
        for (p, o) in offsets {
            let _ = tpl.add_partition_offset(topic, *p, Offset::Offset(*o));
        }
        if let Err(e) = self
            .consumer
            .commit(&tpl, rdkafka::consumer::CommitMode::Async)
        {
            tracing::debug!(error = %e, "visibility commit failed");
        }
    }

    /// Every partition of `topic` with its (low, high) watermarks, straight from the broker.
    pub fn watermarks(
        &self,
        topic: &str,
        timeout: Duration,
    ) -> Result<Vec<(i32, i64, i64)>, KafkaError> {
        let md = self
            .consumer
            .fetch_metadata(Some(topic), timeout)
            .map_err(KafkaError::client(format!("metadata of {topic}")))?;
        let mut out = Vec::new();
        for t in md.topics().iter().filter(|t| t.name() == topic) {
            for p in t.partitions() {
                let (lo, hi) = self
                    .consumer
                    .fetch_watermarks(topic, p.id(), timeout)
                    .map_err(KafkaError::client(format!(
                        "watermarks of {topic}/{}",
                        p.id()
                    )))?;
                out.push((p.id(), lo, hi));
            }
        }
        Ok(out)
    }

    /// Leaves the group, serving the revoke callback, and waits at most `timeout` for the
    /// consumer to close. A broker that never answers must not keep a finished job alive: then
    /// the handle is abandoned to the exiting process.
    pub fn close(self, timeout: Duration) {
        if self.consumer.close_queue().is_ok() {
            let deadline = std::time::Instant::now() + timeout;
            while !self.consumer.closed() && std::time::Instant::now() < deadline {
                let _ = self.consumer.poll(Duration::from_millis(50));
            }
            if !self.consumer.closed() {
                tracing::warn!(
                    "consumer did not close in {timeout:?}; leaving it to the process exit"
                );
                std::mem::forget(self);
            }
        }
    }
}

/// Accumulates one partition's records into a batch of `kafka_record_schema`.
pub struct RecordBatcher {
    topic: String,
    partition: i32,
    keys: BinaryBuilder,
    values: BinaryBuilder,
    offsets: Int64Builder,
    timestamps: Vec<i64>,
    value_bytes: usize,
}

impl RecordBatcher {
    pub fn new(topic: &str, partition: i32) -> Self {
        Self {
            topic: topic.to_string(),
            partition,
            keys: BinaryBuilder::new(),
            values: BinaryBuilder::new(),
            offsets: Int64Builder::new(),
            timestamps: Vec::new(),
            value_bytes: 0,
        }
    }

    /// Adds one record; returns its offset.
    pub fn push(&mut self, m: &BorrowedMessage<'_>) -> i64 {
        self.keys.append_option(m.key());
        let payload = m.payload();
        self.value_bytes += payload.map_or(0, <[u8]>::len);
        self.values.append_option(payload);
        self.offsets.append_value(m.offset());
        self.timestamps.push(m.timestamp().to_millis().unwrap_or(0));
        m.offset()
    }

    pub fn len(&self) -> usize {
        self.timestamps.len()
    }

    pub fn partition(&self) -> i32 {
        self.partition
    }

    pub fn is_empty(&self) -> bool {
        self.timestamps.is_empty()
    }

    /// Value bytes buffered.
    pub fn bytes(&self) -> usize {
        self.value_bytes
    }

    pub fn finish(&mut self) -> RecordBatch {
        let n = self.timestamps.len();
        self.value_bytes = 0;
        let columns: Vec<ArrayRef> = vec![
            Arc::new(self.keys.finish()),
            Arc::new(self.values.finish()),
            Arc::new(StringArray::from(vec![self.topic.as_str(); n])),
            Arc::new(Int32Array::from(vec![self.partition; n])),
            Arc::new(self.offsets.finish()),
            Arc::new(
                TimestampMillisecondArray::from(std::mem::take(&mut self.timestamps))
                    .with_timezone("UTC"),
            ),
        ];
        RecordBatch::try_new(kafka_record_schema(), columns)
            .expect("record columns follow kafka_record_schema by construction")
    }
}

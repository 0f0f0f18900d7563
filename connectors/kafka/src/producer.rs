//! Producing: the bulk producer behind `ledgerflow produce`, and the dead-letter producer.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError as RdError;
use rdkafka::message::{DeliveryResult, Header, OwnedHeaders};
use rdkafka::producer::{
    BaseRecord, DeliveryFuture, FutureProducer, FutureRecord, Producer, ProducerContext,
    ThreadedProducer,
};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientContext;

use ledgerflow_operators::Rejection;

use crate::KafkaError;

#[derive(Default)]
struct DeliveryCounter {
    delivered: AtomicU64,
    failed: AtomicU64,
    first_error: std::sync::Mutex<Option<String>>,
}

struct CountingContext(Arc<DeliveryCounter>);

impl ClientContext for CountingContext {}

impl ProducerContext for CountingContext {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(_) => {
                self.0.delivered.fetch_add(1, Ordering::Relaxed);
            }
            Err((e, _)) => {
                self.0.failed.fetch_add(1, Ordering::Relaxed);
                let mut first = self.0.first_error.lock().unwrap_or_else(|p| p.into_inner());
                first.get_or_insert_with(|| e.to_string());
            }
        }
    }
}

/// A fast, acknowledged producer: every record sent is confirmed by the broker before `finish`
/// returns, or `finish` says how many failed.
pub struct BulkProducer {
    producer: ThreadedProducer<CountingContext>,
    counter: Arc<DeliveryCounter>,
    sent: u64,
}

impl BulkProducer {
    /// `compression`: `none`, `lz4`, `zstd`, … (librdkafka names).
    pub fn new(brokers: &str, compression: &str) -> Result<Self, KafkaError> {
        let counter = Arc::new(DeliveryCounter::default());
        let producer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("linger.ms", "10")
            .set("batch.size", "1000000")
            .set("queue.buffering.max.kbytes", "262144")
            .set("queue.buffering.max.messages", "1000000")
            .set("compression.codec", compression)
            .set("acks", "all")
            .set("enable.idempotence", "false")
            .create_with_context(CountingContext(counter.clone()))
            .map_err(KafkaError::client("creating producer"))?;
        Ok(Self {
            producer,
            counter,
            sent: 0,
        })
    }

    /// Queues one record, waiting while the local queue is full.
    pub fn send(&mut self, topic: &str, key: &[u8], value: &[u8]) -> Result<(), KafkaError> {
        let mut record = BaseRecord::to(topic).key(key).payload(value);
        loop {
            match self.producer.send(record) {
                Ok(()) => {
                    self.sent += 1;
                    return Ok(());
                }
                Err((RdError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err((e, _)) => return Err(KafkaError::client(format!("producing to {topic}"))(e)),
            }
        }
    }

    /// Waits for every acknowledgement; returns the number delivered.
    pub fn finish(self, timeout: Duration) -> Result<u64, KafkaError> {
        self.producer
            .flush(timeout)
            .map_err(KafkaError::client("flushing producer"))?;
        let failed = self.counter.failed.load(Ordering::Relaxed);
        let delivered = self.counter.delivered.load(Ordering::Relaxed);
        if failed > 0 || delivered != self.sent {
            let first = self
                .counter
                .first_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
                .unwrap_or_default();
            return Err(KafkaError::Broker(format!(
                "{failed} of {} records were not delivered (first error: {first})",
                self.sent
            )));
        }
        Ok(delivered)
    }
}

/// Header names on dead-letter records.
pub mod headers {
    pub const REASON: &str = "ledgerflow.reason";
    pub const DETAIL: &str = "ledgerflow.detail";
    pub const STAGE: &str = "ledgerflow.stage";
    pub const SOURCE_TOPIC: &str = "ledgerflow.source.topic";
    pub const SOURCE_PARTITION: &str = "ledgerflow.source.partition";
    pub const SOURCE_OFFSET: &str = "ledgerflow.source.offset";
    pub const SOURCE_TIMESTAMP: &str = "ledgerflow.source.timestamp_ms";
}

/// Copies refused records to a dead-letter topic: original key and bytes, the reason and the
/// source position in headers. Records are acknowledged before the checkpoint that refused them
/// commits (at-least-once: a replay after a crash may copy a record twice).
#[derive(Clone)]
pub struct DeadLetterProducer {
    producer: FutureProducer,
    topic: String,
}

impl DeadLetterProducer {
    pub fn new(brokers: &str, topic: &str) -> Result<Self, KafkaError> {
        let producer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("linger.ms", "5")
            .set("acks", "all")
            .create()
            .map_err(KafkaError::client("creating dead-letter producer"))?;
        Ok(Self {
            producer,
            topic: topic.to_string(),
        })
    }

    /// Queues a copy of the refused record; await the future before committing.
    pub fn send(&self, r: &Rejection) -> Result<DeliveryFuture, KafkaError> {
        let partition = r.kafka_partition.to_string();
        let offset = r.kafka_offset.to_string();
        let ts = r.kafka_timestamp_ms.to_string();
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: headers::REASON,
                value: Some(r.reason.as_bytes()),
            })
            .insert(Header {
                key: headers::DETAIL,
                value: Some(r.detail.as_bytes()),
            })
            .insert(Header {
                key: headers::STAGE,
                value: Some(r.stage.as_bytes()),
            })
            .insert(Header {
                key: headers::SOURCE_TOPIC,
                value: Some(r.kafka_topic.as_bytes()),
            })
            .insert(Header {
                key: headers::SOURCE_PARTITION,
                value: Some(partition.as_bytes()),
            })
            .insert(Header {
                key: headers::SOURCE_OFFSET,
                value: Some(offset.as_bytes()),
            })
            .insert(Header {
                key: headers::SOURCE_TIMESTAMP,
                value: Some(ts.as_bytes()),
            });
        let empty: &[u8] = &[];
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&self.topic)
            .payload(r.raw.as_deref().unwrap_or(empty))
            .headers(headers)
            .timestamp(r.kafka_timestamp_ms);
        if let Some(k) = r.key.as_deref() {
            record = record.key(k);
        }
        self.producer
            .send_result(record)
            .map_err(|(e, _)| KafkaError::client(format!("queueing to {}", self.topic))(e))
    }

    /// Awaits the acknowledgements of `pending`.
    pub async fn confirm(&self, pending: Vec<DeliveryFuture>) -> Result<(), KafkaError> {
        for f in pending {
            match f.await {
                Ok(Ok(_)) => {}
                Ok(Err((e, _))) => {
                    return Err(KafkaError::client(format!("delivering to {}", self.topic))(
                        e,
                    ))
                }
                Err(_) => {
                    return Err(KafkaError::Broker(format!(
                        "dead-letter producer for {} was dropped",
                        self.topic
                    )))
                }
            }
        }
        Ok(())
    }
}

//! Kafka for ledgerflow: the source's consumer (with exactly-once hand-off on rebalances), the
//! dead-letter producer, a fast bulk producer, and the embedded broker (librdkafka's mock cluster).

pub mod broker;
pub mod config;
pub mod consumer;
pub mod producer;

pub use broker::EmbeddedBroker;
pub use config::{KafkaSourceConfig, StartFrom};
pub use consumer::{PartitionHandler, RecordBatcher, SourceConsumer};
pub use producer::{BulkProducer, DeadLetterProducer};

/// The broker list that means "start librdkafka's mock cluster in this process".
pub const EMBEDDED: &str = "embedded";

/// Failures talking to Kafka.
#[derive(Debug, thiserror::Error)]
pub enum KafkaError {
    #[error("kafka ({context}): {source}")]
    Client {
        context: String,
        #[source]
        source: rdkafka::error::KafkaError,
    },
    #[error("embedded broker: {0}")]
    Broker(String),
}

impl KafkaError {
    pub fn client(context: impl Into<String>) -> impl FnOnce(rdkafka::error::KafkaError) -> Self {
        let context = context.into();
        move |source| KafkaError::Client { context, source }
    }
}

//! Configuration of a `kafka` source.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::Deserialize;

/// Where a partition with no committed checkpoint starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "snake_case")]
pub enum StartFrom {
    #[default]
    Earliest,
    Latest,
}

/// Configuration of a `kafka` source.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct KafkaSourceConfig {
    /// Bootstrap servers (`host:port,…`), or `embedded` for an in-process broker.
    pub brokers: String,
    /// The topic read.
    pub topic: String,
    /// Consumer group; processes of one job in one group split the partitions.
    /// Default: `ledgerflow-<job name>`.
    #[serde(default)]
    pub group_id: Option<String>,
    /// Where a partition with no checkpoint yet starts.
    #[serde(default)]
    pub start: StartFrom,
    /// Topic that refused records are copied to, with the reason in headers. Default: none.
    #[serde(default)]
    pub dead_letter_topic: Option<String>,
    /// Most records in one batch handed to the pipeline.
    #[serde(default = "default_batch_max_rows")]
    pub batch_max_rows: usize,
    /// Longest a partial batch waits for more records, in milliseconds.
    #[serde(default = "default_batch_linger_ms")]
    pub batch_linger_ms: u64,
    /// Extra librdkafka properties (e.g. `security.protocol`), passed as they are.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
}

fn default_batch_max_rows() -> usize {
    8192
}

fn default_batch_linger_ms() -> u64 {
    20
}

impl KafkaSourceConfig {
    /// Problems serde cannot see.
    pub fn check(&self) -> Result<(), String> {
        if self.brokers.trim().is_empty() {
            return Err("brokers is empty".into());
        }
        if self.topic.trim().is_empty() {
            return Err("topic is empty".into());
        }
        if self.batch_max_rows == 0 {
            return Err("batch_max_rows must be at least 1".into());
        }
        if self.dead_letter_topic.as_deref() == Some(self.topic.as_str()) {
            return Err("dead_letter_topic must differ from topic".into());
        }
        Ok(())
    }
}

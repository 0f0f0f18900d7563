//! Refused input: one [`Rejection`] per row, kept in the `rejections` table and sent to the
//! dead-letter topic with its original bytes.

use std::sync::Arc;

use arrow_array::builder::{Float64Builder, Int32Builder, Int64Builder, StringBuilder};
use arrow_array::{ArrayRef, RecordBatch, TimestampMillisecondArray};
use bytes::Bytes;
use ledgerflow_schemas::tables::rejection_schema;

/// Why and where one input row was refused.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Rejection {
    pub content_hash: Option<String>,
    pub contributor: Option<String>,
    pub datanet: Option<String>,
    /// A stable, machine-readable reason: `malformed`, `schema`, `oversized`, `quality:<rule>` …
    pub reason: String,
    pub duplicate_of: Option<String>,
    pub similarity: Option<f64>,
    /// A sentence for people: what exactly was wrong.
    pub detail: String,
    /// The stage that refused it (filled in by the context when empty).
    pub stage: String,
    pub kafka_topic: String,
    pub kafka_partition: i32,
    pub kafka_offset: i64,
    pub kafka_timestamp_ms: i64,
    /// The original Kafka key and value, for the dead-letter topic.
    pub key: Option<Bytes>,
    pub raw: Option<Bytes>,
    /// Contributors to penalise for this refusal, under the job's penalty policy. Only stages
    /// that have verified the signature name anyone: an unauthenticated `contributor` field
    /// could name a victim.
    pub penalise: Vec<String>,
}

/// Builds `rejections` rows.
#[derive(Default)]
pub struct RejectionBatchBuilder {
    content_hash: StringBuilder,
    contributor: StringBuilder,
    datanet: StringBuilder,
    reason: StringBuilder,
    duplicate_of: StringBuilder,
    similarity: Float64Builder,
    detail: StringBuilder,
    stage: StringBuilder,
    topic: StringBuilder,
    partition: Int32Builder,
    offset: Int64Builder,
    timestamp: Vec<i64>,
}

impl RejectionBatchBuilder {
    pub fn push(&mut self, r: &Rejection) {
        self.content_hash.append_option(r.content_hash.as_deref());
        self.contributor.append_option(r.contributor.as_deref());
        self.datanet.append_option(r.datanet.as_deref());
        self.reason.append_value(&r.reason);
        self.duplicate_of.append_option(r.duplicate_of.as_deref());
        self.similarity.append_option(r.similarity);
        self.detail.append_value(&r.detail);
        self.stage.append_value(&r.stage);
        self.topic.append_value(&r.kafka_topic);
        self.partition.append_value(r.kafka_partition);
        self.offset.append_value(r.kafka_offset);
        self.timestamp.push(r.kafka_timestamp_ms);
    }

    pub fn len(&self) -> usize {
        self.timestamp.len()
    }

    pub fn is_empty(&self) -> bool {
        self.timestamp.is_empty()
    }

    pub fn finish(&mut self) -> RecordBatch {
        let ts = TimestampMillisecondArray::from(std::mem::take(&mut self.timestamp))
            .with_timezone("UTC");
        let columns: Vec<ArrayRef> = vec![
            Arc::new(self.content_hash.finish()),
            Arc::new(self.contributor.finish()),
            Arc::new(self.datanet.finish()),
            Arc::new(self.reason.finish()),
            Arc::new(self.duplicate_of.finish()),
            Arc::new(self.similarity.finish()),
            Arc::new(self.detail.finish()),
            Arc::new(self.stage.finish()),
            Arc::new(self.topic.finish()),
            Arc::new(self.partition.finish()),
            Arc::new(self.offset.finish()),
            Arc::new(ts),
        ];
        RecordBatch::try_new(rejection_schema(), columns)
            .expect("rejection columns follow rejection_schema by construction")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_rows_of_the_schema() {
        let mut b = RejectionBatchBuilder::default();
        b.push(&Rejection {
            reason: "malformed".into(),
            detail: "not JSON".into(),
            stage: "decode".into(),
            kafka_topic: "t".into(),
            ..Default::default()
        });
        let batch = b.finish();
        assert_eq!(batch.num_rows(), 1);
        assert_eq!(batch.schema(), rejection_schema());
    }
}

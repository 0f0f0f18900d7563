//! Reading contribution batches (the Datanet row schema) column by column, refusing rows with a
//! full rejection record, and keeping the rest.

use arrow_array::cast::AsArray;
use arrow_array::types::{Int32Type, Int64Type, TimestampMillisecondType, UInt64Type};
use arrow_array::{
    Array, Int32Array, Int64Array, RecordBatch, StringArray, TimestampMillisecondArray,
    UInt32Array, UInt64Array,
};
use arrow_schema::SchemaRef;
use bytes::Bytes;
use ledgerflow_schemas::tables::{contribution_schema, missing_columns};

use crate::operator::{Collector, OperatorContext, OperatorError};
use crate::rejection::Rejection;
use crate::state::Decision;

/// The columns of a batch of contribution rows.
pub struct Rows<'a> {
    pub content_hash: &'a StringArray,
    pub datanet: &'a StringArray,
    pub contributor: &'a StringArray,
    pub content: &'a StringArray,
    pub metadata: &'a StringArray,
    pub nonce: &'a UInt64Array,
    pub issued_at: &'a UInt64Array,
    pub expires_at: &'a UInt64Array,
    pub signature: &'a StringArray,
    pub topic: &'a StringArray,
    pub partition: &'a Int32Array,
    pub offset: &'a Int64Array,
    pub timestamp: &'a TimestampMillisecondArray,
}

impl<'a> Rows<'a> {
    pub fn new(batch: &'a RecordBatch, stage: &str) -> Result<Self, OperatorError> {
        let col = |name: &str| {
            batch
                .column_by_name(name)
                .ok_or_else(|| OperatorError::External {
                    stage: stage.to_string(),
                    detail: format!("input has no column `{name}`"),
                })
        };
        Ok(Rows {
            content_hash: col("content_hash")?.as_string::<i32>(),
            datanet: col("datanet")?.as_string::<i32>(),
            contributor: col("contributor")?.as_string::<i32>(),
            content: col("content")?.as_string::<i32>(),
            metadata: col("metadata")?.as_string::<i32>(),
            nonce: col("nonce")?.as_primitive::<UInt64Type>(),
            issued_at: col("issued_at")?.as_primitive::<UInt64Type>(),
            expires_at: col("expires_at")?.as_primitive::<UInt64Type>(),
            signature: col("signature")?.as_string::<i32>(),
            topic: col("kafka_topic")?.as_string::<i32>(),
            partition: col("kafka_partition")?.as_primitive::<Int32Type>(),
            offset: col("kafka_offset")?.as_primitive::<Int64Type>(),
            timestamp: col("kafka_timestamp")?.as_primitive::<TimestampMillisecondType>(),
        })
    }

    pub fn len(&self) -> usize {
        self.content.len()
    }

    pub fn is_empty(&self) -> bool {
        self.content.is_empty()
    }

    pub fn metadata(&self, i: usize) -> Option<&'a str> {
        (!self.metadata.is_null(i)).then(|| self.metadata.value(i))
    }

    /// The contribution message of row `i` again (canonical metadata), for the dead-letter topic.
    pub fn message_json(&self, i: usize) -> String {
        let metadata = self
            .metadata(i)
            .and_then(|m| serde_json::from_str::<serde_json::Value>(m).ok());
        let mut v = serde_json::json!({
            "datanet": self.datanet.value(i),
            "contributor": self.contributor.value(i),
            "content": self.content.value(i),
            "nonce": self.nonce.value(i),
            "issued_at": self.issued_at.value(i),
            "expires_at": self.expires_at.value(i),
            "signature": self.signature.value(i),
        });
        if let Some(m) = metadata {
            v["metadata"] = m;
        }
        v.to_string()
    }

    /// A rejection of row `i`. `authenticated`: the signature has been verified, so the
    /// contributor can be penalised for it.
    pub fn rejection(&self, i: usize, decision: &Decision, authenticated: bool) -> Rejection {
        let Decision::Reject {
            reason,
            detail,
            duplicate_of,
            similarity,
            also_penalise,
        } = decision
        else {
            panic!("rejection() of an accepted row")
        };
        let contributor = self.contributor.value(i).to_string();
        let mut penalise = Vec::new();
        if authenticated {
            penalise.push(contributor.clone());
            penalise.extend(also_penalise.iter().cloned());
        }
        Rejection {
            content_hash: Some(self.content_hash.value(i).to_string()),
            contributor: Some(contributor),
            datanet: Some(self.datanet.value(i).to_string()),
            reason: reason.clone(),
            duplicate_of: duplicate_of.clone(),
            similarity: *similarity,
            detail: detail.clone(),
            kafka_topic: self.topic.value(i).to_string(),
            kafka_partition: self.partition.value(i),
            kafka_offset: self.offset.value(i),
            kafka_timestamp_ms: self.timestamp.value(i),
            key: None,
            raw: Some(Bytes::from(self.message_json(i))),
            penalise,
            ..Default::default()
        }
    }
}

/// Sends the rows `decisions` accept downstream and refuses the others; `authenticated(i)`: the
/// signature of row `i` has been verified, so its contributor can be penalised.
pub fn route(
    batch: &RecordBatch,
    rows: &Rows<'_>,
    decisions: &[Decision],
    authenticated: impl Fn(usize) -> bool,
    ctx: &mut OperatorContext,
    out: &mut Collector,
) -> Result<(), OperatorError> {
    let mut keep = Vec::with_capacity(decisions.len());
    for (i, d) in decisions.iter().enumerate() {
        match d {
            Decision::Accept => keep.push(i as u32),
            d => ctx.reject(rows.rejection(i, d, authenticated(i))),
        }
    }
    let kept = keep_rows(batch, &keep).map_err(|source| OperatorError::Arrow {
        stage: ctx.stage.clone(),
        source,
    })?;
    out.collect(kept);
    Ok(())
}

/// The rows of `batch` at `keep` (all of it when nothing was dropped).
pub fn keep_rows(
    batch: &RecordBatch,
    keep: &[u32],
) -> Result<RecordBatch, arrow_schema::ArrowError> {
    if keep.len() == batch.num_rows() {
        return Ok(batch.clone());
    }
    arrow::compute::take_record_batch(batch, &UInt32Array::from(keep.to_vec()))
}

/// Plan-time check shared by the stages that read and write contribution rows.
pub fn contribution_passthrough(inputs: &[SchemaRef]) -> Result<SchemaRef, String> {
    let [input] = inputs else {
        return Err(format!("takes exactly one input, got {}", inputs.len()));
    };
    let missing = missing_columns(&contribution_schema(), input);
    if missing.is_empty() {
        Ok(input.clone())
    } else {
        Err(format!(
            "its input must be contribution rows (from `decode_contributions`): {}",
            missing.join("; ")
        ))
    }
}

//! `decode_contributions`: raw Kafka records → Datanet rows.
//!
//! Checks the shape of each message (see `ledgerflow_schemas::contribution`), lowercases
//! addresses and hashes, canonicalises `metadata` (RFC 8785) and computes the content hash.
//! It does not verify signatures (that is the `verify` stage); it refuses, with a reason:
//! `oversized` (value larger than `max_message_bytes`), `malformed` (not a JSON object),
//! `schema` (a missing, unknown or mistyped field, a bad address or signature encoding) and
//! `unknown_datanet` (when `datanets` is set and the message names another).

use std::sync::Arc;

use arrow_array::builder::{StringBuilder, UInt64Builder};
use arrow_array::cast::AsArray;
use arrow_array::types::{Int32Type, Int64Type, TimestampMillisecondType};
use arrow_array::{Array, ArrayRef, RecordBatch, TimestampMillisecondArray};
use arrow_schema::SchemaRef;
use bytes::Bytes;
use ledgerflow_schemas::contribution::{keccak256, Contribution};
use ledgerflow_schemas::hex0x;
use ledgerflow_schemas::keccak::keccak256_many;
use ledgerflow_schemas::tables::{contribution_schema, kafka_record_schema, missing_columns};
use schemars::JsonSchema;
use serde::Deserialize;

use crate::operator::{
    Collector, Operator, OperatorContext, OperatorError, StageEnv, StageFactory,
};
use crate::rejection::Rejection;

/// Configuration of a `decode_contributions` stage.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DecodeConfig {
    /// Largest record value accepted, in bytes; larger ones are rejected as `oversized`.
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
    /// Datanets this stage accepts; a message naming another is rejected as `unknown_datanet`.
    /// Empty (the default) accepts any.
    #[serde(default)]
    pub datanets: Vec<String>,
}

fn default_max_message_bytes() -> usize {
    1 << 20
}

impl Default for DecodeConfig {
    fn default() -> Self {
        Self {
            max_message_bytes: default_max_message_bytes(),
            datanets: Vec::new(),
        }
    }
}

impl StageFactory for DecodeConfig {
    fn output_schema(&self, inputs: &[SchemaRef]) -> Result<SchemaRef, String> {
        let [input] = inputs else {
            return Err(format!("takes exactly one input, got {}", inputs.len()));
        };
        let missing = missing_columns(&kafka_record_schema(), input);
        if missing.is_empty() {
            Ok(contribution_schema())
        } else {
            Err(format!(
                "its input must be raw Kafka records (a `kafka` source): {}",
                missing.join("; ")
            ))
        }
    }

    fn instantiate(&self, _: &str, _: &StageEnv) -> Result<Box<dyn Operator>, OperatorError> {
        Ok(Box::new(DecodeContributions {
            config: self.clone(),
        }))
    }
}

/// The operator; see the module docs.
pub struct DecodeContributions {
    config: DecodeConfig,
}

/// One message decoded into its column values.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodedRow {
    pub content_hash: String,
    pub datanet: String,
    pub contributor: String,
    pub content: String,
    pub metadata: Option<String>,
    pub nonce: u64,
    pub issued_at: u64,
    pub expires_at: u64,
    pub signature: String,
}

/// A refusal: the reason code, a sentence, and what could be read of the message.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodeError {
    pub reason: &'static str,
    pub detail: String,
    pub content_hash: Option<String>,
    pub contributor: Option<String>,
    pub datanet: Option<String>,
}

impl DecodeError {
    fn new(reason: &'static str, detail: impl Into<String>) -> Self {
        Self {
            reason,
            detail: detail.into(),
            content_hash: None,
            contributor: None,
            datanet: None,
        }
    }
}

/// Decodes one record value. Never panics, whatever the bytes.
pub fn decode_message(value: &[u8], config: &DecodeConfig) -> Result<DecodedRow, DecodeError> {
    let mut row = decode_unhashed(value, config)?;
    row.content_hash = hex0x::encode(&keccak256(row.content.as_bytes()));
    Ok(row)
}

/// [`decode_message`] without the content hash of a row decoded (an empty string): a batch's
/// hashes are computed together ([`keccak256_many`]). A refusal has its hash.
fn decode_unhashed(value: &[u8], config: &DecodeConfig) -> Result<DecodedRow, DecodeError> {
    if value.len() > config.max_message_bytes {
        return Err(DecodeError::new(
            "oversized",
            format!(
                "message is {} bytes, more than max_message_bytes = {}",
                value.len(),
                config.max_message_bytes
            ),
        ));
    }
    let c: Contribution<'_> = serde_json::from_slice(value).map_err(|e| {
        use serde_json::error::Category;
        match e.classify() {
            Category::Data => DecodeError::new("schema", e.to_string()),
            Category::Io | Category::Syntax | Category::Eof => {
                DecodeError::new("malformed", format!("not a JSON object: {e}"))
            }
        }
    })?;
    let refuse = |reason: &'static str, detail: String| DecodeError {
        reason,
        detail,
        content_hash: Some(hex0x::encode(&c.content_hash())),
        contributor: None,
        datanet: Some(c.datanet.to_string()),
    };
    let contributor = match hex0x::decode_fixed::<20>(&c.contributor) {
        Some(a) if c.contributor.starts_with("0x") => hex0x::encode(&a),
        _ => {
            return Err(refuse(
                "schema",
                format!(
                    "contributor {:?} is not a 0x-prefixed 20-byte hex address",
                    truncate(&c.contributor, 60)
                ),
            ))
        }
    };
    let with_contributor = |mut e: DecodeError| {
        e.contributor = Some(contributor.clone());
        e
    };
    if c.datanet.is_empty() {
        return Err(with_contributor(refuse(
            "schema",
            "datanet is empty".into(),
        )));
    }
    if !config.datanets.is_empty() && !config.datanets.iter().any(|d| *d == c.datanet) {
        return Err(with_contributor(refuse(
            "unknown_datanet",
            format!(
                "datanet {:?} is not one of {:?}",
                truncate(&c.datanet, 60),
                config.datanets
            ),
        )));
    }
    let signature = match hex0x::decode_fixed::<65>(&c.signature) {
        Some(s) if c.signature.starts_with("0x") => hex0x::encode(&s),
        _ => {
            return Err(with_contributor(refuse(
                "schema",
                "signature is not 0x-prefixed hex of 65 bytes (r‖s‖v)".into(),
            )))
        }
    };
    let metadata = match &c.metadata {
        None | Some(serde_json::Value::Null) | Some(serde_json::Value::Object(_)) => c
            .canonical_metadata()
            .map_err(|e| with_contributor(refuse("schema", e.to_string())))?,
        Some(_) => {
            return Err(with_contributor(refuse(
                "schema",
                "metadata must be a JSON object or null".into(),
            )))
        }
    };
    Ok(DecodedRow {
        datanet: c.datanet.to_string(),
        content: c.content.into_owned(),
        metadata,
        nonce: c.nonce,
        issued_at: c.issued_at,
        expires_at: c.expires_at,
        signature,
        contributor,
        content_hash: String::new(),
    })
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

impl Operator for DecodeContributions {
    fn process_batch(
        &mut self,
        batch: RecordBatch,
        ctx: &mut OperatorContext,
        out: &mut Collector,
    ) -> Result<(), OperatorError> {
        let col = |name: &str| {
            batch
                .column_by_name(name)
                .ok_or_else(|| OperatorError::External {
                    stage: ctx.stage.clone(),
                    detail: format!("input has no column `{name}`"),
                })
        };
        let keys = col("key")?.as_binary::<i32>().clone();
        let values = col("value")?.as_binary::<i32>().clone();
        let topics = col("kafka_topic")?.as_string::<i32>().clone();
        let partitions = col("kafka_partition")?.as_primitive::<Int32Type>().clone();
        let offsets = col("kafka_offset")?.as_primitive::<Int64Type>().clone();
        let timestamps = col("kafka_timestamp")?
            .as_primitive::<TimestampMillisecondType>()
            .clone();

        let n = batch.num_rows();
        let bytes_hint = values.values().len();
        let mut content_hash = StringBuilder::with_capacity(n, n * 66);
        let mut datanet = StringBuilder::with_capacity(n, n * 8);
        let mut contributor = StringBuilder::with_capacity(n, n * 42);
        let mut content = StringBuilder::with_capacity(n, bytes_hint);
        let mut metadata = StringBuilder::with_capacity(n, n * 32);
        let mut nonce = UInt64Builder::with_capacity(n);
        let mut issued_at = UInt64Builder::with_capacity(n);
        let mut expires_at = UInt64Builder::with_capacity(n);
        let mut signature = StringBuilder::with_capacity(n, n * 132);
        let mut keep: Vec<u32> = Vec::with_capacity(n);

        let decoded: Vec<Result<DecodedRow, DecodeError>> = (0..n)
            .map(|i| {
                let value = if values.is_null(i) {
                    &[][..]
                } else {
                    values.value(i)
                };
                decode_unhashed(value, &self.config)
            })
            .collect();
        let contents: Vec<&[u8]> = decoded
            .iter()
            .filter_map(|r| r.as_ref().ok().map(|row| row.content.as_bytes()))
            .collect();
        let mut hashes = keccak256_many(&contents).into_iter();
        for (i, result) in decoded.into_iter().enumerate() {
            let value = if values.is_null(i) {
                &[][..]
            } else {
                values.value(i)
            };
            match result {
                Ok(row) => {
                    let hash = hashes.next().expect("one hash per row decoded");
                    content_hash.append_value(hex0x::encode(&hash));
                    datanet.append_value(&row.datanet);
                    contributor.append_value(&row.contributor);
                    content.append_value(&row.content);
                    metadata.append_option(row.metadata.as_deref());
                    nonce.append_value(row.nonce);
                    issued_at.append_value(row.issued_at);
                    expires_at.append_value(row.expires_at);
                    signature.append_value(&row.signature);
                    keep.push(i as u32);
                }
                Err(e) => ctx.reject(Rejection {
                    content_hash: e.content_hash,
                    contributor: e.contributor,
                    datanet: e.datanet,
                    reason: e.reason.to_string(),
                    detail: e.detail,
                    kafka_topic: topics.value(i).to_string(),
                    kafka_partition: partitions.value(i),
                    kafka_offset: offsets.value(i),
                    kafka_timestamp_ms: timestamps.value(i),
                    key: (!keys.is_null(i)).then(|| Bytes::copy_from_slice(keys.value(i))),
                    raw: Some(Bytes::copy_from_slice(value)),
                    ..Default::default()
                }),
            }
        }
        let arrow_err = |source| OperatorError::Arrow {
            stage: ctx.stage.clone(),
            source,
        };
        let take = |a: &dyn Array| -> Result<ArrayRef, OperatorError> {
            if keep.len() == n {
                Ok(arrow_array::make_array(a.to_data()))
            } else {
                arrow::compute::take(a, &arrow_array::UInt32Array::from(keep.clone()), None)
                    .map_err(arrow_err)
            }
        };
        let ts: TimestampMillisecondArray = timestamps.clone();
        let columns: Vec<ArrayRef> = vec![
            Arc::new(content_hash.finish()),
            Arc::new(datanet.finish()),
            Arc::new(contributor.finish()),
            Arc::new(content.finish()),
            Arc::new(metadata.finish()),
            Arc::new(nonce.finish()),
            Arc::new(issued_at.finish()),
            Arc::new(expires_at.finish()),
            Arc::new(signature.finish()),
            take(&topics)?,
            take(&partitions)?,
            take(&offsets)?,
            take(&ts)?,
        ];
        let batch = RecordBatch::try_new(contribution_schema(), columns).map_err(arrow_err)?;
        out.collect(batch);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const GOOD: &str = r#"{"datanet":"legal","contributor":"0xAbCdEf0000000000000000000000000000000001","content":"The court held.","metadata":{"z":1,"a":"b"},"nonce":17,"issued_at":1764000000,"expires_at":1764086400,"signature":"0x"#;

    fn good() -> String {
        format!("{GOOD}{}\"}}", "11".repeat(65))
    }

    #[test]
    fn decodes_and_normalises() {
        let row = decode_message(good().as_bytes(), &DecodeConfig::default()).unwrap();
        assert_eq!(
            row.contributor,
            "0xabcdef0000000000000000000000000000000001"
        );
        assert_eq!(row.metadata.as_deref(), Some(r#"{"a":"b","z":1}"#));
        assert_eq!(row.nonce, 17);
        assert!(row.content_hash.starts_with("0x") && row.content_hash.len() == 66);
    }

    #[test]
    fn reasons() {
        let cfg = DecodeConfig::default();
        let reason = |v: &str| decode_message(v.as_bytes(), &cfg).err().map(|e| e.reason);
        assert_eq!(reason("not json"), Some("malformed"));
        assert_eq!(reason("{\"datanet\":"), Some("malformed"));
        assert_eq!(reason("[1,2]"), Some("schema"));
        assert_eq!(reason("{}"), Some("schema"));
        assert_eq!(reason(&good().replace("0xAbCd", "0xZZCd")), Some("schema"));
        assert_eq!(
            reason(&good().replace("\"nonce\":17", "\"nonce\":-1")),
            Some("schema")
        );
        assert_eq!(
            reason(&good().replace("{\"z\":1,\"a\":\"b\"}", "[1]")),
            Some("schema")
        );
        assert_eq!(reason(&good()), None);
        let only_medical = DecodeConfig {
            datanets: vec!["medical".into()],
            ..Default::default()
        };
        let e = decode_message(good().as_bytes(), &only_medical).unwrap_err();
        assert_eq!(e.reason, "unknown_datanet");
        assert_eq!(e.datanet.as_deref(), Some("legal"));
        let tiny = DecodeConfig {
            max_message_bytes: 10,
            ..Default::default()
        };
        assert_eq!(
            decode_message(good().as_bytes(), &tiny).unwrap_err().reason,
            "oversized"
        );
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_message(&bytes, &DecodeConfig::default());
        }

        #[test]
        fn mutated_messages_never_panic(pos in 0usize..400, byte in any::<u8>()) {
            let mut v = good().into_bytes();
            let p = pos % v.len();
            v[p] = byte;
            let _ = decode_message(&v, &DecodeConfig::default());
        }

        #[test]
        fn arbitrary_json_strings_never_panic(content in ".*", contributor in ".*", signature in ".*") {
            let msg = serde_json::json!({"datanet":"legal","contributor":contributor,"content":content,
                "nonce":1,"issued_at":1,"expires_at":2,"signature":signature});
            let _ = decode_message(msg.to_string().as_bytes(), &DecodeConfig::default());
        }
    }
}

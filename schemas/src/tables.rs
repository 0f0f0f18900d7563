//! Arrow schemas of the engine's messages and tables.
//!
//! Datanet and engine tables are stored Hive-partitioned by `day` (the UTC day of the Kafka
//! record timestamp); the partition column lives in the path, not in the files.

use std::sync::{Arc, LazyLock};

use arrow_schema::{DataType, Field, Schema, SchemaRef, TimeUnit};

/// Name of the Hive partition column of every stored table.
pub const PARTITION_COLUMN: &str = "day";
/// Name of the engine's rejections table.
pub const REJECTIONS_TABLE: &str = "rejections";

fn kafka_timestamp() -> Field {
    Field::new(
        "kafka_timestamp",
        DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
        false,
    )
}

fn kafka_position() -> [Field; 3] {
    [
        Field::new("kafka_topic", DataType::Utf8, false),
        Field::new("kafka_partition", DataType::Int32, false),
        Field::new("kafka_offset", DataType::Int64, false),
    ]
}

static KAFKA_RECORD: LazyLock<SchemaRef> = LazyLock::new(|| {
    let mut fields = vec![
        Field::new("key", DataType::Binary, true),
        Field::new("value", DataType::Binary, true),
    ];
    fields.extend(kafka_position());
    fields.push(kafka_timestamp());
    Arc::new(Schema::new(fields))
});

/// What a Kafka source emits: one row per record, bytes untouched.
pub fn kafka_record_schema() -> SchemaRef {
    KAFKA_RECORD.clone()
}

static CONTRIBUTION: LazyLock<SchemaRef> = LazyLock::new(|| {
    let mut fields = vec![
        Field::new("content_hash", DataType::Utf8, false),
        Field::new("datanet", DataType::Utf8, false),
        Field::new("contributor", DataType::Utf8, false),
        Field::new("content", DataType::Utf8, false),
        Field::new("metadata", DataType::Utf8, true),
        Field::new("nonce", DataType::UInt64, false),
        Field::new("issued_at", DataType::UInt64, false),
        Field::new("expires_at", DataType::UInt64, false),
        Field::new("signature", DataType::Utf8, false),
    ];
    fields.extend(kafka_position());
    fields.push(kafka_timestamp());
    Arc::new(Schema::new(fields))
});

/// A Datanet row: one accepted contribution. `metadata` is RFC 8785 canonical JSON.
pub fn contribution_schema() -> SchemaRef {
    CONTRIBUTION.clone()
}

static REJECTION: LazyLock<SchemaRef> = LazyLock::new(|| {
    let mut fields = vec![
        Field::new("content_hash", DataType::Utf8, true),
        Field::new("contributor", DataType::Utf8, true),
        Field::new("datanet", DataType::Utf8, true),
        Field::new("reason", DataType::Utf8, false),
        Field::new("duplicate_of", DataType::Utf8, true),
        Field::new("similarity", DataType::Float64, true),
        Field::new("detail", DataType::Utf8, false),
        Field::new("stage", DataType::Utf8, false),
    ];
    fields.extend(kafka_position());
    fields.push(kafka_timestamp());
    Arc::new(Schema::new(fields))
});

/// A row of the `rejections` table: what was refused, by which stage, why, and where it came from.
pub fn rejection_schema() -> SchemaRef {
    REJECTION.clone()
}

/// Name of the engine's penalties table.
pub const PENALTIES_TABLE: &str = "penalties";

static PENALTY: LazyLock<SchemaRef> = LazyLock::new(|| {
    let mut fields = vec![
        Field::new("epoch", DataType::UInt64, false),
        Field::new("contributor", DataType::Utf8, false),
        Field::new("datanet", DataType::Utf8, true),
        Field::new("reason", DataType::Utf8, false),
        Field::new("points", DataType::UInt32, false),
        Field::new("evidence", DataType::Utf8, true),
    ];
    fields.extend(kafka_position());
    fields.push(kafka_timestamp());
    Arc::new(Schema::new(fields))
});

/// A row of the `penalties` table: points charged to a contributor in a reward epoch, for a
/// refusal (`reason`) of the contribution whose content hash is `evidence`.
pub fn penalty_schema() -> SchemaRef {
    PENALTY.clone()
}

/// Name of the engine's table of exact-substring duplicates found by the token index.
pub const SUBSTRING_DUPLICATES_TABLE: &str = "substring_duplicates";

static SUBSTRING_DUPLICATE: LazyLock<SchemaRef> = LazyLock::new(|| {
    let mut fields = vec![
        Field::new("content_hash", DataType::Utf8, false),
        Field::new("contributor", DataType::Utf8, false),
        Field::new("datanet", DataType::Utf8, false),
        Field::new("duplicate_of", DataType::Utf8, false),
        Field::new("duplicate_of_contributor", DataType::Utf8, false),
        Field::new("span_offset", DataType::UInt64, false),
        Field::new("span_tokens", DataType::UInt64, false),
    ];
    fields.extend(kafka_position());
    fields.push(kafka_timestamp());
    Arc::new(Schema::new(fields))
});

/// A row of `substring_duplicates`: an accepted contribution (with its Kafka position) that
/// repeats `span_tokens` tokens, from token `span_offset` on, of the earlier `duplicate_of`.
pub fn substring_duplicate_schema() -> SchemaRef {
    SUBSTRING_DUPLICATE.clone()
}

/// Name of the engine's table of token columns: each indexed contribution as its Datanet's
/// tokenizer encodes it.
pub const TOKENS_TABLE: &str = "tokens";

static TOKENS: LazyLock<SchemaRef> = LazyLock::new(|| {
    let mut fields = vec![
        Field::new("content_hash", DataType::Utf8, false),
        Field::new("contributor", DataType::Utf8, false),
        Field::new("datanet", DataType::Utf8, false),
        Field::new("tokenizer", DataType::Utf8, false),
        Field::new(
            "tokens",
            DataType::List(Arc::new(Field::new("item", DataType::UInt16, false))),
            false,
        ),
        Field::new("token_count", DataType::UInt32, false),
    ];
    fields.extend(kafka_position());
    fields.push(kafka_timestamp());
    Arc::new(Schema::new(fields))
});

/// A row of `tokens`: the token ids of one committed contribution of `datanet` (its document in
/// the token index, without the separator), `tokenizer` naming the tokenizer that produced them
/// (`0x` keccak256 of its `tokenizer.json`), with the contribution's Kafka position.
pub fn token_schema() -> SchemaRef {
    TOKENS.clone()
}

/// Name of the engine's table of attribution scores (read by the reward epochs).
pub const ATTRIBUTIONS_TABLE: &str = "attributions";

static ATTRIBUTION: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("output_id", DataType::Utf8, false),
        Field::new("datanet", DataType::Utf8, false),
        Field::new("content_hash", DataType::Utf8, false),
        Field::new("contributor", DataType::Utf8, false),
        Field::new("method", DataType::Utf8, false),
        Field::new("score", DataType::Float64, false),
        Field::new(
            "created_at",
            DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
            false,
        ),
    ]))
});

/// A row of `attributions`: the share (`score`, summing to 1 over an output's rows of one
/// method) of model output `output_id` credited to one contribution, by `method` (`span`:
/// suffix-array span matching; `gradient`: gradient influence). Partitioned by the UTC day of
/// `created_at`, the time of the output.
pub fn attribution_schema() -> SchemaRef {
    ATTRIBUTION.clone()
}

/// Name of the engine's table of model inferences (written by the serving stage, read by the
/// reward epochs for their fees).
pub const INFERENCES_TABLE: &str = "inferences";

static INFERENCE: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("request_id", DataType::Utf8, false),
        Field::new("model", DataType::Utf8, false),
        Field::new("adapter_generation", DataType::Utf8, true),
        Field::new("datanet", DataType::Utf8, true),
        Field::new("prompt", DataType::Utf8, false),
        Field::new("output", DataType::Utf8, false),
        Field::new("prompt_tokens", DataType::UInt32, false),
        Field::new("completion_tokens", DataType::UInt32, false),
        Field::new("time_to_first_token_ms", DataType::Float64, true),
        Field::new("total_ms", DataType::Float64, true),
        Field::new("fee", DataType::Decimal128(38, 0), true),
        Field::new(
            "created_at",
            DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
            false,
        ),
    ]))
});

/// A row of `inferences`: one answered request (`request_id` is the `output_id` of its
/// `attributions`), the model or adapter generation that answered it, tokens, timing, and the
/// `fee` paid for it in the reward token's base units (part of its epoch's pool). Partitioned by
/// the UTC day of `created_at`.
pub fn inference_schema() -> SchemaRef {
    INFERENCE.clone()
}

/// Name of the engine's model registry.
pub const MODELS_TABLE: &str = "models";

static MODEL: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("id", DataType::Utf8, false),
        Field::new("kind", DataType::Utf8, false),
        Field::new("parent", DataType::Utf8, true),
        Field::new("datanet", DataType::Utf8, false),
        Field::new("manifest", DataType::Utf8, false),
        Field::new("manifest_keccak256", DataType::Utf8, false),
        Field::new("training_contributions", DataType::UInt64, false),
        Field::new("hyperparameters", DataType::Utf8, false),
        Field::new("train_loss", DataType::Float64, false),
        Field::new("val_loss", DataType::Float64, false),
        Field::new("val_perplexity", DataType::Float64, false),
        Field::new("unigram_perplexity", DataType::Float64, false),
        Field::new("artifact_uri", DataType::Utf8, false),
        Field::new("content_hash", DataType::Utf8, false),
        Field::new(
            "created_at",
            DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
            false,
        ),
    ]))
});

/// A row of `models`: a trained model (`kind` `base`, or `adapter` of `parent`), the Datanet and
/// the exact list of contributions it was trained on (`manifest`, one content hash per line,
/// and its keccak256), its hyperparameters (JSON), losses and perplexities (with a unigram model
/// of the same Datanet on the same validation tokens), where its safetensors are, and their
/// keccak256 (the model's generation). Partitioned by the UTC day of `created_at`.
pub fn model_schema() -> SchemaRef {
    MODEL.clone()
}

/// Names of the columns of `required` missing from `actual` or of another type, for plan-time checks.
pub fn missing_columns(required: &Schema, actual: &Schema) -> Vec<String> {
    required
        .fields()
        .iter()
        .filter_map(|f| match actual.field_with_name(f.name()) {
            Ok(a) if a.data_type() == f.data_type() => None,
            Ok(a) => Some(format!(
                "`{}` is {} but {} is required",
                f.name(),
                a.data_type(),
                f.data_type()
            )),
            Err(_) => Some(format!("`{}` ({}) is missing", f.name(), f.data_type())),
        })
        .collect()
}

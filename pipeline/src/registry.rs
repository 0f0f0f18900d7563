//! Every source, stage and sink a job can name, in one explicit list.
//!
//! An entry's config is a typed struct (`deny_unknown_fields`, documented fields): its JSON
//! Schema checks job files key by key and becomes part of `schemas/job.schema.json`.

use std::fmt;
use std::sync::Arc;

use ledgerflow_kafka::KafkaSourceConfig;
use ledgerflow_operators::decode::DecodeConfig;
use ledgerflow_operators::dedup::{ExactConfig, ExactStage, NearConfig, NearStage};
use ledgerflow_operators::quality::QualityConfig;
use ledgerflow_operators::verify::{VerifyConfig, VerifyStage};
use ledgerflow_operators::StageFactory;
use ledgerflow_store::TableSinkConfig;
use serde_json::Value;

/// Where a node sits in the DAG.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Source,
    Stage,
    Sink,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Source => "source",
            Role::Stage => "stage",
            Role::Sink => "sink",
        })
    }
}

/// A node's typed config, ready to run.
#[derive(Clone)]
pub enum Built {
    Kafka(KafkaSourceConfig),
    Stage(Arc<dyn StageFactory>),
    Datanet(TableSinkConfig),
    /// Batch jobs (see [`crate::batch`]).
    DatanetSource(crate::batch::DatanetSourceConfig),
    Tokenize(crate::batch::TokenizeConfig),
    TokenIndex(crate::batch::TokenIndexConfig),
    /// Model jobs (see [`crate::batch::run_models_job`]).
    Train(crate::batch::TrainStageConfig),
    Serve(crate::batch::ServeSinkConfig),
}

/// One registered source, stage or sink type.
pub struct Entry {
    pub name: &'static str,
    pub role: Role,
    pub doc: &'static str,
    pub schema: fn() -> schemars::Schema,
    pub build: fn(Value) -> Result<Built, String>,
}

fn parse<T: serde::de::DeserializeOwned>(v: Value) -> Result<T, String> {
    serde_json::from_value(v).map_err(|e| e.to_string())
}

static REGISTRY: &[Entry] = &[
    Entry {
        name: "kafka",
        role: Role::Source,
        doc: "Reads a Kafka topic as raw records, one pipeline per partition, resuming from the job's last checkpoint.",
        schema: || schemars::schema_for!(KafkaSourceConfig),
        build: |v| {
            let c: KafkaSourceConfig = parse(v)?;
            c.check()?;
            Ok(Built::Kafka(c))
        },
    },
    Entry {
        name: "decode_contributions",
        role: Role::Stage,
        doc: "Decodes signed contribution messages into Datanet rows; refuses malformed ones with a reason.",
        schema: || schemars::schema_for!(DecodeConfig),
        build: |v| Ok(Built::Stage(Arc::new(parse::<DecodeConfig>(v)?))),
    },
    Entry {
        name: "verify_signatures",
        role: Role::Stage,
        doc: "Verifies each contribution's EIP-712 signature, validity window, nonce (replays) and rate limit.",
        schema: || schemars::schema_for!(VerifyConfig),
        build: |v| {
            let c: VerifyConfig = parse(v)?;
            c.check()?;
            Ok(Built::Stage(Arc::new(VerifyStage::new(c))))
        },
    },
    Entry {
        name: "dedup_exact",
        role: Role::Stage,
        doc: "Refuses contributions whose normalised text a Datanet already holds (and floods of them).",
        schema: || schemars::schema_for!(ExactConfig),
        build: |v| Ok(Built::Stage(Arc::new(ExactStage::new(parse::<ExactConfig>(v)?)))),
    },
    Entry {
        name: "dedup_near",
        role: Role::Stage,
        doc: "Refuses near duplicates of accepted contributions: MinHash LSH on word n-grams (and floods of them).",
        schema: || schemars::schema_for!(NearConfig),
        build: |v| {
            let c: NearConfig = parse(v)?;
            c.check()?;
            Ok(Built::Stage(Arc::new(NearStage::new(c))))
        },
    },
    Entry {
        name: "quality_filter",
        role: Role::Stage,
        doc: "Gopher, FineWeb and C4 quality rules, language allow-list and size limits; masks PII.",
        schema: || schemars::schema_for!(QualityConfig),
        build: |v| {
            let c: QualityConfig = parse(v)?;
            c.check()?;
            Ok(Built::Stage(Arc::new(c)))
        },
    },
    Entry {
        name: "datanet",
        role: Role::Sink,
        doc: "Writes rows into a Datanet: Hive-partitioned Parquet (zstd), committed exactly once.",
        schema: || schemars::schema_for!(TableSinkConfig),
        build: |v| {
            let c: TableSinkConfig = parse(v)?;
            c.check()?;
            Ok(Built::Datanet(c))
        },
    },
    Entry {
        name: "datanet",
        role: Role::Source,
        doc: "Batch: the files a Datanet committed since the job's last run (for `tokenize` and `token_index`).",
        schema: || schemars::schema_for!(crate::batch::DatanetSourceConfig),
        build: |v| {
            let c: crate::batch::DatanetSourceConfig = parse(v)?;
            c.check()?;
            Ok(Built::DatanetSource(c))
        },
    },
    Entry {
        name: "tokenize",
        role: Role::Stage,
        doc: "Batch: token ids of each contribution with the Datanet's byte-level BPE tokenizer (trained on the first run).",
        schema: || schemars::schema_for!(crate::batch::TokenizeConfig),
        build: |v| {
            let c: crate::batch::TokenizeConfig = parse(v)?;
            c.check()?;
            Ok(Built::Tokenize(c))
        },
    },
    Entry {
        name: "token_index",
        role: Role::Sink,
        doc: "Batch: the Datanet's suffix-array index in infini-gram's format (new shards, merges of small shards, exact-substring duplicates as penalties).",
        schema: || schemars::schema_for!(crate::batch::TokenIndexConfig),
        build: |v| {
            let c: crate::batch::TokenIndexConfig = parse(v)?;
            c.check()?;
            Ok(Built::TokenIndex(c))
        },
    },
    Entry {
        name: "train",
        role: Role::Stage,
        doc: "Batch: trains a base model on its input `datanet` (its `tokens`; run the index job first), or a LoRA adapter of its input `train` stage's model on `datanet`; registers it in `models`.",
        schema: || schemars::schema_for!(crate::batch::TrainStageConfig),
        build: |v| {
            let c: crate::batch::TrainStageConfig = parse(v)?;
            c.check()?;
            Ok(Built::Train(c))
        },
    },
    Entry {
        name: "serve",
        role: Role::Sink,
        doc: "Batch: serves every model of the registry (its inputs' models included) over the OpenAI-compatible HTTP API, until ctrl-c or `for_seconds`.",
        schema: || schemars::schema_for!(crate::batch::ServeSinkConfig),
        build: |v| {
            let c: crate::batch::ServeSinkConfig = parse(v)?;
            c.check()?;
            Ok(Built::Serve(c))
        },
    },
];

/// Every registered type.
pub fn registry() -> &'static [Entry] {
    REGISTRY
}

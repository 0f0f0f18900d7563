//! Batch jobs over committed Datanet data: a `datanet` source (the files committed since the
//! job's last run), a `tokenize` stage (the Datanet's byte-level BPE tokenizer, trained on the
//! first run) and a `token_index` sink (shards in infini-gram's format, merges of small shards,
//! exact-substring duplicates as penalties).
//!
//! ```yaml
//! sources:
//!   committed: { type: datanet, datanet: legal }
//! stages:
//!   tokenize: { type: tokenize, inputs: [committed], vocab_size: 16384 }
//! sinks:
//!   index: { type: token_index, inputs: [tokenize], memory_mib: 4096 }
//! ```
//!
//! Each run is one pass: `ledgerflow run jobs/index.yaml` returns when the new data is indexed
//! (run it per reward epoch, or from a scheduler).

use std::sync::{Arc, LazyLock};

use anyhow::{bail, Result};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use schemars::JsonSchema;
use serde::Deserialize;

use crate::registry::Built;
use crate::spec::JobSpec;
use crate::tokens::{DatanetIndexOptions, DatanetIndexReport, MergePolicy};

/// The `datanet` source: what a Datanet committed since the job's last run.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DatanetSourceConfig {
    /// The Datanet read.
    pub datanet: String,
}

impl DatanetSourceConfig {
    pub fn check(&self) -> Result<(), String> {
        if !ledgerflow_store::layout::valid_table_name(&self.datanet) {
            return Err(format!(
                "datanet {:?} is not a valid name (lowercase letters, digits and _, starting with a letter)",
                self.datanet
            ));
        }
        Ok(())
    }
}

/// The `tokenize` stage: token ids of each contribution's content, with the Datanet's tokenizer
/// (byte-level BPE, trained on the Datanet by the first run and stored with its index).
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenizeConfig {
    /// Vocabulary of the tokenizer trained on the first run (256 to 65,535).
    #[serde(default = "default_vocab_size")]
    pub vocab_size: usize,
    /// Pairs seen fewer times are not merged while training.
    #[serde(default = "default_min_frequency")]
    pub min_frequency: u64,
}

fn default_vocab_size() -> usize {
    16_384
}
fn default_min_frequency() -> u64 {
    2
}

impl TokenizeConfig {
    pub fn check(&self) -> Result<(), String> {
        if !(256..=65_535).contains(&self.vocab_size) {
            return Err(format!(
                "vocab_size {} is outside [256, 65535] (tokens are u16; 65535 separates documents)",
                self.vocab_size
            ));
        }
        Ok(())
    }
}

/// Merging of small shards.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MergeConfig {
    /// A run of at least this many consecutive small shards becomes one shard (0: never).
    #[serde(default = "default_merge_factor")]
    pub factor: usize,
    /// Shards of fewer tokens than this are small.
    #[serde(default = "default_small_shard_tokens")]
    pub small_shard_tokens: u64,
}

fn default_merge_factor() -> usize {
    4
}
fn default_small_shard_tokens() -> u64 {
    16 << 20
}

impl Default for MergeConfig {
    fn default() -> Self {
        Self {
            factor: default_merge_factor(),
            small_shard_tokens: default_small_shard_tokens(),
        }
    }
}

/// Exact-substring duplicates (Lee et al.'s ExactSubstr).
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SubstringConfig {
    /// New contributions repeating a span of at least this many tokens of an earlier one are
    /// `duplicate_substring` penalties (points from the job's `penalties`).
    #[serde(default = "default_min_tokens")]
    pub min_tokens: usize,
}

fn default_min_tokens() -> usize {
    50
}

impl Default for SubstringConfig {
    fn default() -> Self {
        Self {
            min_tokens: default_min_tokens(),
        }
    }
}

/// The `token_index` sink: the Datanet's suffix-array index in infini-gram's format, at
/// `<store>/indexes/<datanet>`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenIndexConfig {
    /// Memory one shard may use while its suffix array is built, in MiB; shards are cut to fit.
    #[serde(default = "default_memory_mib")]
    pub memory_mib: u64,
    /// Threads for suffix-array construction (default: all cores).
    #[serde(default)]
    pub threads: Option<usize>,
    #[serde(default)]
    pub merge: MergeConfig,
    /// `null` turns the pass off.
    #[serde(default = "default_substring")]
    pub substring_duplicates: Option<SubstringConfig>,
}

fn default_memory_mib() -> u64 {
    4096
}
fn default_substring() -> Option<SubstringConfig> {
    Some(SubstringConfig::default())
}

impl TokenIndexConfig {
    pub fn check(&self) -> Result<(), String> {
        if self.memory_mib == 0 {
            return Err("memory_mib must be at least 1".into());
        }
        if self
            .substring_duplicates
            .as_ref()
            .is_some_and(|s| s.min_tokens < 2)
        {
            return Err("substring_duplicates.min_tokens must be at least 2".into());
        }
        Ok(())
    }
}

static TOKENIZED: LazyLock<SchemaRef> = LazyLock::new(|| {
    let base = ledgerflow_schemas::tables::contribution_schema();
    let mut fields: Vec<Field> = base.fields().iter().map(|f| f.as_ref().clone()).collect();
    fields.push(Field::new(
        "tokens",
        DataType::List(Arc::new(Field::new_list_field(DataType::UInt16, false))),
        false,
    ));
    Arc::new(Schema::new(fields))
});

/// What `tokenize` produces: Datanet rows with their token ids.
pub fn tokenized_schema() -> SchemaRef {
    TOKENIZED.clone()
}

/// Whether `built` is a node of a batch job.
pub fn is_batch(built: &Built) -> bool {
    matches!(
        built,
        Built::DatanetSource(_) | Built::Tokenize(_) | Built::TokenIndex(_)
    )
}

/// Whether the job is a batch job (its source is a `datanet`).
pub fn is_batch_job(spec: &JobSpec) -> bool {
    spec.nodes
        .iter()
        .any(|n| matches!(n.built, Built::DatanetSource(_)))
}

/// Runs a batch index job once: the Datanet's new committed files are tokenized and indexed.
pub async fn run_index_job(
    spec: &JobSpec,
    store: &ledgerflow_store::Store,
) -> Result<DatanetIndexReport> {
    let (mut source, mut tokenize, mut sink) = (None, None, None);
    for n in &spec.nodes {
        match &n.built {
            Built::DatanetSource(c) => source = Some(c),
            Built::Tokenize(c) => tokenize = Some(c),
            Built::TokenIndex(c) => sink = Some(c),
            _ => bail!(
                "{}: `{}` cannot run in a batch job (its source is a datanet)",
                spec.file,
                n.name
            ),
        }
    }
    let (Some(source), Some(tokenize), Some(sink)) = (source, tokenize, sink) else {
        bail!(
            "{}: a batch job is a `datanet` source, a `tokenize` stage and a `token_index` sink",
            spec.file
        );
    };
    let opts = DatanetIndexOptions {
        vocab_size: tokenize.vocab_size,
        min_frequency: tokenize.min_frequency,
        memory_budget: sink.memory_mib << 20,
        threads: sink
            .threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
        merge: MergePolicy {
            factor: sink.merge.factor,
            small_shard_tokens: sink.merge.small_shard_tokens,
        },
        substring_min_tokens: sink.substring_duplicates.as_ref().map(|s| s.min_tokens),
    };
    crate::tokens::build_datanet_index(store, &source.datanet, &opts, Some(&spec.header.penalties))
        .await
}

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

/// The `train` stage: a base model trained from scratch on its input `datanet` source, or a
/// LoRA adapter of its input `train` stage's model.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TrainStageConfig {
    /// For an adapter: the Datanet it learns (default: its base's Datanet).
    #[serde(default)]
    pub datanet: Option<String>,
    /// Model sizes (a base model; an adapter takes its base's).
    #[serde(default)]
    pub model: ledgerflow_models::ModelConfig,
    #[serde(default)]
    pub train: ledgerflow_models::TrainConfig,
    /// Rank, alpha and targets (an adapter).
    #[serde(default)]
    pub lora: ledgerflow_models::LoraConfig,
    /// For an adapter: build its gradient index right after training (projected per-example
    /// gradients of its training contributions at each checkpoint, the `gradients` table).
    #[serde(default)]
    pub gradient_index: Option<GradientIndexConfig>,
}

/// The gradient index a `train` stage builds after an adapter.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GradientIndexConfig {
    /// Dimensions of the random projection (TRAK).
    #[serde(default = "default_k")]
    pub k: usize,
    #[serde(default = "default_projection_seed")]
    pub seed: u64,
}

fn default_k() -> usize {
    512
}
fn default_projection_seed() -> u64 {
    0x7a4a
}

impl TrainStageConfig {
    pub fn check(&self) -> Result<(), String> {
        if let Some(d) = &self.datanet {
            DatanetSourceConfig { datanet: d.clone() }.check()?;
        }
        if self.train.steps == 0 || self.train.batch_size == 0 || self.train.seq_len == 0 {
            return Err(
                "train.steps, train.batch_size and train.seq_len must be at least 1".into(),
            );
        }
        if self.train.seq_len > self.model.max_seq_len {
            return Err(format!(
                "train.seq_len {} is longer than model.max_seq_len {}",
                self.train.seq_len, self.model.max_seq_len
            ));
        }
        let sized = ledgerflow_models::ModelConfig {
            vocab_size: 1,
            ..self.model.clone()
        };
        sized.check().map_err(|e| format!("model: {e}"))?;
        if self.gradient_index.as_ref().is_some_and(|g| g.k == 0) {
            return Err("gradient_index.k must be at least 1".into());
        }
        self.lora.check()
    }

    fn file(&self) -> crate::train::TrainFile {
        crate::train::TrainFile {
            model: self.model.clone(),
            train: self.train.clone(),
            lora: self.lora.clone(),
        }
    }
}

/// The `serve` sink: `ledgerflow serve` over the registry once the job's models are trained.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ServeSinkConfig {
    #[serde(default = "default_port")]
    pub port: u16,
    #[serde(default = "default_host")]
    pub host: String,
    /// Memory for resident adapters' tensors, in MiB.
    #[serde(default = "default_budget")]
    pub adapter_budget_mib: usize,
    #[serde(default = "default_max_batch")]
    pub max_batch: usize,
    /// Stop after this many seconds (0, the default: until ctrl-c).
    #[serde(default)]
    pub for_seconds: u64,
    /// How answers of adapters with a gradient index are credited by gradient: `method`
    /// (tracin, cosine or datainf), `top_k`, `threshold` (normalised scores below it earn
    /// nothing), `damping` (DataInf's).
    #[serde(default)]
    pub gradient_attribution: crate::attribution::ScoreOptions,
}

fn default_port() -> u16 {
    8000
}
fn default_host() -> String {
    "127.0.0.1".into()
}
fn default_budget() -> usize {
    256
}
fn default_max_batch() -> usize {
    32
}

impl ServeSinkConfig {
    pub fn check(&self) -> Result<(), String> {
        if self.max_batch == 0 || self.adapter_budget_mib == 0 {
            return Err("max_batch and adapter_budget_mib must be at least 1".into());
        }
        if let Err(e) = self.gradient_attribution.check() {
            return Err(format!("gradient_attribution: {e}"));
        }
        Ok(())
    }
}

/// Whether `built` is a node of a batch job.
pub fn is_batch(built: &Built) -> bool {
    matches!(
        built,
        Built::DatanetSource(_)
            | Built::Tokenize(_)
            | Built::TokenIndex(_)
            | Built::Train(_)
            | Built::Serve(_)
    )
}

/// Whether a batch job trains or serves models.
pub fn is_models_job(spec: &JobSpec) -> bool {
    spec.nodes
        .iter()
        .any(|n| matches!(n.built, Built::Train(_) | Built::Serve(_)))
}

/// Runs a models job once: every `train` stage in order (a base on its `datanet` source, an
/// adapter of its upstream `train`), then the `serve` sink if any. Returns the trained models.
pub fn run_models_job(
    spec: &JobSpec,
    store: &ledgerflow_store::Store,
    rt: &tokio::runtime::Runtime,
    progress: bool,
) -> Result<serde_json::Value> {
    if spec
        .nodes
        .iter()
        .any(|n| matches!(n.built, Built::Tokenize(_) | Built::TokenIndex(_)))
    {
        bail!(
            "{}: index and train in separate jobs (run the index job first: `train` reads its tokens)",
            spec.file
        );
    }
    let index: std::collections::HashMap<&str, usize> = spec
        .nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (n.name.as_str(), i))
        .collect();
    // (model id, Datanet) of each node done.
    let mut done: Vec<Option<(String, String)>> = vec![None; spec.nodes.len()];
    let mut trained = Vec::new();
    let mut serve = None;
    let mut remaining: Vec<usize> = (0..spec.nodes.len()).collect();
    while !remaining.is_empty() {
        let before = remaining.len();
        let mut next = Vec::new();
        for i in remaining {
            let n = &spec.nodes[i];
            let ups: Vec<usize> = n
                .inputs
                .iter()
                .filter_map(|(x, _)| index.get(x.as_str()).copied())
                .collect();
            if ups.iter().any(|&u| done[u].is_none()) {
                next.push(i);
                continue;
            }
            match &n.built {
                Built::DatanetSource(c) => done[i] = Some((String::new(), c.datanet.clone())),
                Built::Train(c) => {
                    let (up_id, up_datanet) = done[ups[0]].clone().expect("done");
                    let mut shown = std::time::Instant::now();
                    let name = n.name.clone();
                    let mut bar = |step: usize, steps: usize, loss: f64, tps: f64, left: f64| {
                        if progress && (shown.elapsed().as_millis() > 500 || step == steps) {
                            shown = std::time::Instant::now();
                            eprintln!("{name}: step {step}/{steps} loss {loss:.4} {tps:.0} tokens/s ETA {left:.0}s");
                        }
                    };
                    let t = if up_id.is_empty() {
                        crate::train::train_base(rt, store, &up_datanet, &c.file(), &mut bar)?
                    } else {
                        let datanet = c.datanet.clone().unwrap_or(up_datanet.clone());
                        crate::train::train_adapter(
                            rt,
                            store,
                            &datanet,
                            &up_id,
                            &c.file(),
                            &mut bar,
                        )?
                    };
                    let datanet = c.datanet.clone().unwrap_or(up_datanet);
                    let index = match (&c.gradient_index, up_id.is_empty()) {
                        (Some(g), false) => Some(crate::attribution::build_index(
                            rt, store, &t.id, g.k, g.seed,
                        )?),
                        (Some(_), true) => bail!(
                            "{}: `{}` trains a base model; gradient_index is for adapters",
                            spec.file,
                            n.name
                        ),
                        _ => None,
                    };
                    trained.push(serde_json::json!({
                        "gradient_index": index,
                        "stage": n.name, "id": t.id, "kind": if up_id.is_empty() { "base" } else { "adapter" },
                        "parent": if up_id.is_empty() { None } else { Some(up_id.clone()) },
                        "datanet": datanet, "content_hash": t.content_hash,
                        "val_perplexity": t.report.val_perplexity,
                        "unigram_perplexity": t.report.unigram_perplexity,
                        "base_perplexity": t.report.base_perplexity,
                        "tokens_per_second": t.report.tokens_per_second,
                    }));
                    done[i] = Some((t.id, datanet));
                }
                Built::Serve(c) => {
                    serve = Some(c.clone());
                    done[i] = Some((String::new(), String::new()));
                }
                _ => bail!("{}: `{}` cannot run in a models job", spec.file, n.name),
            }
        }
        if next.len() == before {
            bail!("{}: the job's nodes form a cycle", spec.file);
        }
        remaining = next;
    }
    let report = serde_json::json!({ "job": spec.header.name, "models": trained });
    if let Some(c) = serve {
        println!("{report}");
        rt.block_on(async {
            let opts = crate::serve::ServeOptions {
                listen: format!("{}:{}", c.host, c.port),
                api_key: std::env::var("LEDGERFLOW_API_KEY").ok(),
                adapter_budget_bytes: c.adapter_budget_mib << 20,
                max_batch: c.max_batch,
                attribution: true,
                kafka: None,
                gradient: c.gradient_attribution.clone(),
            };
            let (server, handle) = crate::serve::start(
                store.clone(),
                opts,
                crate::serve::until(
                    (c.for_seconds > 0).then(|| std::time::Duration::from_secs(c.for_seconds)),
                ),
            )
            .await?;
            println!(
                "listening on http://{} ({} models: {})",
                server.addr,
                server.models.len(),
                server.models.join(", ")
            );
            use std::io::Write as _;
            std::io::stdout().flush()?;
            handle.await?;
            anyhow::Ok(())
        })?;
        return Ok(serde_json::Value::Null);
    }
    Ok(report)
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

//! `ledgerflow train`: a base model trained from scratch on a Datanet's token columns (the
//! `tokens` table the index build writes), saved as safetensors in the store and registered in
//! the `models` table with the exact contributions it was trained on.

use std::sync::Arc;

use anyhow::{bail, Context, Result};
use arrow::array::{Array, AsArray};
use arrow_schema::DataType;
use bytes::Bytes;
use ledgerflow_models::{Corpus, ModelConfig, TrainConfig, TrainReport};
use ledgerflow_store::Store;
use serde::{Deserialize, Serialize};

/// A training config file (`--config`): model sizes and training settings.
#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TrainFile {
    #[serde(default)]
    pub model: ModelConfig,
    #[serde(default)]
    pub train: TrainConfig,
}

/// The documents of `datanet` in the `tokens` table, in Kafka order: (content hash, tokens).
pub async fn datanet_documents(store: &Store, datanet: &str) -> Result<Vec<(String, Vec<u16>)>> {
    let ctx = crate::sql::session_with_partitions(store, 1).await?;
    if !ctx.table_exist("tokens")? {
        bail!("the store has no `tokens` table: run `ledgerflow index build --datanet {datanet}` first");
    }
    let sql = format!(
        "SELECT content_hash, tokens FROM tokens WHERE datanet = '{}' \
         ORDER BY kafka_topic, kafka_partition, kafka_offset",
        datanet.replace('\'', "''")
    );
    let mut docs = Vec::new();
    for b in ctx.sql(&sql).await?.collect().await? {
        let hashes = arrow::compute::cast(b.column(0), &DataType::Utf8)?;
        let hashes = hashes.as_string::<i32>();
        let lists = b.column(1).as_list::<i32>();
        for i in 0..b.num_rows() {
            let values = lists.value(i);
            let ids = values.as_primitive::<arrow::datatypes::UInt16Type>();
            docs.push((hashes.value(i).to_string(), ids.values().to_vec()));
        }
    }
    if docs.is_empty() {
        bail!("Datanet `{datanet}` has no tokenized contributions (run `ledgerflow index build --datanet {datanet}`)");
    }
    Ok(docs)
}

/// What `train_base` made.
#[derive(Debug, Clone, Serialize)]
pub struct Trained {
    pub id: String,
    pub content_hash: String,
    pub artifact_uri: String,
    pub training_contributions: usize,
    pub report: TrainReport,
}

/// Trains a base model on `datanet` and registers it.
pub fn train_base(
    rt: &tokio::runtime::Runtime,
    store: &Store,
    datanet: &str,
    file: &TrainFile,
    progress: ledgerflow_models::train::Progress<'_>,
) -> Result<Trained> {
    let dir = crate::tokens::datanet_index_dir(store, datanet)?;
    let tokenizer = ledgerflow_index::TextTokenizer::load(&dir.join("tokenizer.json"))
        .with_context(|| format!("no tokenizer for `{datanet}`: run `ledgerflow index build --datanet {datanet}` first"))?;
    let docs = rt.block_on(datanet_documents(store, datanet))?;
    let mut cfg = file.model.clone();
    cfg.vocab_size = tokenizer.vocab_size();
    cfg.check().map_err(anyhow::Error::msg)?;
    let corpus = Corpus::split(&docs, tokenizer.eos_id() as u32, file.train.val_fraction);
    let (varmap, report) =
        ledgerflow_models::train(&cfg, &file.train, &corpus, &candle_device()?, progress)?;
    let tmp = tempfile::NamedTempFile::new()?;
    varmap.save(tmp.path())?;
    let weights = std::fs::read(tmp.path())?;
    let hash = ledgerflow_schemas::contribution::keccak256(&weights);
    let content_hash = ledgerflow_schemas::hex0x::encode(&hash);
    let id = format!("{datanet}-base-{}", &hex::encode(hash)[..12]);
    let dir = format!("models/{id}");
    let manifest: String = corpus.train_docs.iter().map(|h| format!("{h}\n")).collect();
    let manifest_hash = ledgerflow_schemas::hex0x::encode(
        &ledgerflow_schemas::contribution::keccak256(manifest.as_bytes()),
    );
    let hyper = serde_json::json!({ "model": cfg, "train": file.train });
    let mut curve = String::from("step,loss,learning_rate\n");
    for (s, l, lr) in &report.curve {
        curve.push_str(&format!("{s},{l},{lr}\n"));
    }
    rt.block_on(async {
        store
            .put(&format!("{dir}/model.safetensors"), Bytes::from(weights))
            .await?;
        store
            .put(
                &format!("{dir}/config.json"),
                Bytes::from(serde_json::to_vec_pretty(&hyper)?),
            )
            .await?;
        store
            .put(
                &format!("{dir}/training_contributions.txt"),
                Bytes::from(manifest),
            )
            .await?;
        store
            .put(&format!("{dir}/loss_curve.csv"), Bytes::from(curve))
            .await?;
        anyhow::Ok(())
    })?;
    let artifact_uri = format!("{}{dir}/model.safetensors", store.url());
    register(
        rt,
        store,
        &Registered {
            id: &id,
            datanet,
            manifest: &format!("{dir}/training_contributions.txt"),
            manifest_hash: &manifest_hash,
            contributions: corpus.train_docs.len(),
            hyperparameters: &hyper.to_string(),
            report: &report,
            artifact_uri: &artifact_uri,
            content_hash: &content_hash,
        },
    )?;
    Ok(Trained {
        id,
        content_hash,
        artifact_uri,
        training_contributions: corpus.train_docs.len(),
        report,
    })
}

/// The device models run on: CPU, or the first CUDA GPU when built with the `cuda` feature.
pub fn candle_device() -> Result<candle_core::Device> {
    #[cfg(feature = "cuda")]
    {
        Ok(candle_core::Device::new_cuda(0)?)
    }
    #[cfg(not(feature = "cuda"))]
    {
        Ok(candle_core::Device::Cpu)
    }
}

struct Registered<'a> {
    id: &'a str,
    datanet: &'a str,
    manifest: &'a str,
    manifest_hash: &'a str,
    contributions: usize,
    hyperparameters: &'a str,
    report: &'a TrainReport,
    artifact_uri: &'a str,
    content_hash: &'a str,
}

/// Writes the model's row of `models` (one file per model).
fn register(rt: &tokio::runtime::Runtime, store: &Store, r: &Registered<'_>) -> Result<()> {
    use arrow_array::{
        ArrayRef, Float64Array, RecordBatch, StringArray, TimestampMillisecondArray, UInt64Array,
    };
    let s = |v: &str| -> ArrayRef { Arc::new(StringArray::from(vec![v])) };
    let f = |v: f64| -> ArrayRef { Arc::new(Float64Array::from(vec![v])) };
    let columns: Vec<ArrayRef> = vec![
        s(r.id),
        s("base"),
        Arc::new(StringArray::from(vec![None::<&str>])),
        s(r.datanet),
        s(r.manifest),
        s(r.manifest_hash),
        Arc::new(UInt64Array::from(vec![r.contributions as u64])),
        s(r.hyperparameters),
        f(r.report.train_loss),
        f(r.report.val_loss),
        f(r.report.val_perplexity),
        f(r.report.unigram_perplexity),
        s(r.artifact_uri),
        s(r.content_hash),
        Arc::new(
            TimestampMillisecondArray::from(vec![chrono::Utc::now().timestamp_millis()])
                .with_timezone("UTC"),
        ),
    ];
    let batch = RecordBatch::try_new(ledgerflow_schemas::tables::model_schema(), columns)?;
    rt.block_on(crate::tokens::put_table_file(
        store,
        ledgerflow_schemas::tables::MODELS_TABLE,
        &batch,
        "created_at",
        &format!("{}.parquet", r.id),
    ))
}

/// Reads a `--config` file (YAML), every problem with its key.
pub fn load_train_file(path: &std::path::Path) -> Result<TrainFile> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let value: serde_json::Value = match marked_yaml::parse_yaml(0, &text) {
        Ok(node) => yaml_to_json(&node),
        Err(e) => bail!("{}: invalid YAML: {e}", path.display()),
    };
    serde_json::from_value(value).with_context(|| format!("{}", path.display()))
}

fn yaml_to_json(node: &marked_yaml::Node) -> serde_json::Value {
    use marked_yaml::Node;
    match node {
        Node::Scalar(s) => {
            let t = s.as_str();
            if let Ok(i) = t.parse::<i64>() {
                serde_json::json!(i)
            } else if let Ok(f) = t.parse::<f64>() {
                serde_json::json!(f)
            } else if t == "true" || t == "false" {
                serde_json::json!(t == "true")
            } else {
                serde_json::json!(t)
            }
        }
        Node::Sequence(seq) => serde_json::Value::Array(seq.iter().map(yaml_to_json).collect()),
        Node::Mapping(map) => serde_json::Value::Object(
            map.iter()
                .map(|(k, v)| (k.as_str().to_string(), yaml_to_json(v)))
                .collect(),
        ),
    }
}

//! `ledgerflow train`: a base model trained from scratch on a Datanet's token columns (the
//! `tokens` table the index build writes), saved as safetensors in the store and registered in
//! the `models` table with the exact contributions it was trained on.

use std::sync::Arc;

use anyhow::{bail, Context, Result};
use arrow::array::{Array, AsArray};
use arrow_schema::DataType;
use bytes::Bytes;
use ledgerflow_models::{Corpus, LoraConfig, ModelConfig, TrainConfig, TrainReport};
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
    /// Rank, alpha and targets of an adapter (`--adapter-of`).
    #[serde(default)]
    pub lora: LoraConfig,
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

/// The documents of `datanet` as text, in Kafka order: (content hash, content). Adapters read
/// these and tokenize them with their base model's tokenizer.
pub async fn datanet_texts(store: &Store, datanet: &str) -> Result<Vec<(String, String)>> {
    let ctx = crate::sql::session_with_partitions(store, 1).await?;
    if !ctx.table_exist(datanet)? {
        bail!("the store has no Datanet `{datanet}`");
    }
    let sql = format!(
        "SELECT content_hash, content FROM \"{}\" ORDER BY kafka_topic, kafka_partition, kafka_offset",
        datanet.replace('"', "\"\"")
    );
    let mut docs = Vec::new();
    for b in ctx.sql(&sql).await?.collect().await? {
        let hashes = arrow::compute::cast(b.column(0), &DataType::Utf8)?;
        let texts = arrow::compute::cast(b.column(1), &DataType::Utf8)?;
        let (hashes, texts) = (hashes.as_string::<i32>(), texts.as_string::<i32>());
        for i in 0..b.num_rows() {
            docs.push((hashes.value(i).to_string(), texts.value(i).to_string()));
        }
    }
    if docs.is_empty() {
        bail!("Datanet `{datanet}` has no contributions");
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

/// What a base model of `file` trains on in `datanet`: its sizes (the vocabulary of the
/// Datanet's tokenizer) and the Datanet's token streams split for training and validation.
pub fn base_corpus(
    rt: &tokio::runtime::Runtime,
    store: &Store,
    datanet: &str,
    file: &TrainFile,
) -> Result<(ModelConfig, Corpus)> {
    let dir = crate::tokens::datanet_index_dir(store, datanet)?;
    let tokenizer = ledgerflow_index::TextTokenizer::load(&dir.join("tokenizer.json"))
        .with_context(|| format!("no tokenizer for `{datanet}`: run `ledgerflow index build --datanet {datanet}` first"))?;
    let docs = rt.block_on(datanet_documents(store, datanet))?;
    let mut cfg = file.model.clone();
    cfg.vocab_size = tokenizer.vocab_size();
    cfg.check().map_err(anyhow::Error::msg)?;
    let corpus = Corpus::split(&docs, tokenizer.eos_id() as u32, file.train.val_fraction);
    Ok((cfg, corpus))
}

/// Trains a base model on `datanet` and registers it.
pub fn train_base(
    rt: &tokio::runtime::Runtime,
    store: &Store,
    datanet: &str,
    file: &TrainFile,
    progress: ledgerflow_models::train::Progress<'_>,
) -> Result<Trained> {
    let (cfg, corpus) = base_corpus(rt, store, datanet, file)?;
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
        store
            .put(
                &format!("{dir}/loss_curve.png"),
                Bytes::from(crate::chart::loss_png(&report.curve)?),
            )
            .await?;
        store
            .put(
                &format!("{dir}/tokenizer.json"),
                Bytes::from(std::fs::read(
                    crate::tokens::datanet_index_dir(store, datanet)?.join("tokenizer.json"),
                )?),
            )
            .await?;
        anyhow::Ok(())
    })?;
    let artifact_uri = format!("{}{dir}/model.safetensors", store.url());
    register(
        rt,
        store,
        &Registered {
            id: &id,
            kind: "base",
            parent: None,
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

/// A registered model, as `models` holds it.
#[derive(Debug, Clone, Serialize)]
pub struct ModelRow {
    pub id: String,
    pub kind: String,
    pub parent: Option<String>,
    pub datanet: String,
    pub artifact_uri: String,
    pub content_hash: String,
    pub hyperparameters: String,
    pub val_perplexity: f64,
    pub created_at_ms: i64,
}

impl ModelRow {
    /// The model's folder in the store (`models/<id>`).
    pub fn dir(&self) -> String {
        format!("models/{}", self.id)
    }
}

/// Every model of the registry, oldest first.
pub async fn registry(store: &Store) -> Result<Vec<ModelRow>> {
    let ctx = crate::sql::session_with_partitions(store, 1).await?;
    let sql = "SELECT id, kind, parent, datanet, artifact_uri, content_hash, hyperparameters, \
               val_perplexity, CAST(created_at AS BIGINT) AS t FROM models ORDER BY created_at, id";
    let mut out = Vec::new();
    for b in ctx.sql(sql).await?.collect().await? {
        let col = |i: usize| arrow::compute::cast(b.column(i), &DataType::Utf8);
        let cols = (0..7)
            .map(col)
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let text: Vec<_> = cols.iter().map(|c| c.as_string::<i32>()).collect();
        let ppl = arrow::compute::cast(b.column(7), &DataType::Float64)?;
        let ppl = ppl.as_primitive::<arrow::datatypes::Float64Type>();
        let t = arrow::compute::cast(b.column(8), &DataType::Int64)?;
        let t = t.as_primitive::<arrow::datatypes::Int64Type>();
        for i in 0..b.num_rows() {
            out.push(ModelRow {
                id: text[0].value(i).to_string(),
                kind: text[1].value(i).to_string(),
                parent: (!text[2].is_null(i)).then(|| text[2].value(i).to_string()),
                datanet: text[3].value(i).to_string(),
                artifact_uri: text[4].value(i).to_string(),
                content_hash: text[5].value(i).to_string(),
                hyperparameters: text[6].value(i).to_string(),
                val_perplexity: ppl.value(i),
                created_at_ms: t.value(i),
            });
        }
    }
    Ok(out)
}

/// A base model loaded from the store: its config, its frozen weights and its tokenizer.
pub struct LoadedBase {
    pub row: ModelRow,
    pub cfg: ModelConfig,
    pub model: ledgerflow_models::Transformer,
    pub tokenizer: ledgerflow_index::TextTokenizer,
}

/// Loads base model `id` (frozen: its tensors are not variables).
pub async fn load_base(
    store: &Store,
    row: &ModelRow,
    device: &candle_core::Device,
) -> Result<LoadedBase> {
    if row.kind != "base" {
        bail!("model `{}` is an {}, not a base model", row.id, row.kind);
    }
    let dir = row.dir();
    let get = |name: &'static str| {
        let path = format!("{dir}/{name}");
        async move {
            store
                .get(&path)
                .await?
                .with_context(|| format!("the store has no {path}"))
        }
    };
    let hyper: serde_json::Value = serde_json::from_slice(&get("config.json").await?)?;
    let cfg: ModelConfig = serde_json::from_value(hyper["model"].clone())
        .with_context(|| format!("{dir}/config.json has no valid `model`"))?;
    let weights = get("model.safetensors").await?;
    let tok = get("tokenizer.json").await?;
    let tokenizer = ledgerflow_index::TextTokenizer::from_json(std::str::from_utf8(&tok)?)?;
    let vb = candle_nn::VarBuilder::from_buffered_safetensors(
        weights.to_vec(),
        candle_core::DType::F32,
        device,
    )?;
    let model = ledgerflow_models::Transformer::new(&cfg, vb)?;
    Ok(LoadedBase {
        row: row.clone(),
        cfg,
        model,
        tokenizer,
    })
}

/// Finds `id` in the registry.
pub fn find<'a>(models: &'a [ModelRow], id: &str) -> Result<&'a ModelRow> {
    models.iter().rev().find(|m| m.id == id).with_context(|| {
        let known: Vec<&str> = models.iter().map(|m| m.id.as_str()).collect();
        format!(
            "no model `{id}` in the registry (known: {})",
            known.join(", ")
        )
    })
}

/// Trains a LoRA adapter of base model `base_id` on `datanet` (its text, tokenized with the
/// base's tokenizer) and registers it (`kind` adapter, `parent` the base).
pub fn train_adapter(
    rt: &tokio::runtime::Runtime,
    store: &Store,
    datanet: &str,
    base_id: &str,
    file: &TrainFile,
    progress: ledgerflow_models::train::Progress<'_>,
) -> Result<Trained> {
    let device = candle_device()?;
    let models = rt.block_on(registry(store))?;
    let row = find(&models, base_id)?.clone();
    let base = rt.block_on(load_base(store, &row, &device))?;
    file.lora.check().map_err(anyhow::Error::msg)?;
    let texts = rt.block_on(datanet_texts(store, datanet))?;
    let docs: Vec<(String, Vec<u16>)> = texts
        .into_iter()
        .map(|(h, t)| Ok((h, base.tokenizer.encode(&t)?)))
        .collect::<Result<_>>()?;
    let corpus = Corpus::split(
        &docs,
        base.tokenizer.eos_id() as u32,
        file.train.val_fraction,
    );
    let (varmap, report) = ledgerflow_models::train_adapter(
        &base.model,
        &file.lora,
        &file.train,
        &corpus,
        &device,
        progress,
    )?;
    let weights = ledgerflow_models::lora::safetensors_bytes(&varmap)?;
    let hash = ledgerflow_schemas::contribution::keccak256(&weights);
    let content_hash = ledgerflow_schemas::hex0x::encode(&hash);
    let id = format!("{datanet}-lora-{}", &hex::encode(hash)[..12]);
    let dir = format!("models/{id}");
    let manifest: String = corpus.train_docs.iter().map(|h| format!("{h}\n")).collect();
    let manifest_hash = ledgerflow_schemas::hex0x::encode(
        &ledgerflow_schemas::contribution::keccak256(manifest.as_bytes()),
    );
    let hyper = serde_json::json!({ "base": base_id, "lora": file.lora, "train": file.train });
    let mut curve = String::from("step,loss,learning_rate\n");
    for (s, l, lr) in &report.curve {
        curve.push_str(&format!("{s},{l},{lr}\n"));
    }
    rt.block_on(async {
        let put = |name: &str, bytes: Vec<u8>| {
            let path = format!("{dir}/{name}");
            async move { store.put(&path, Bytes::from(bytes)).await }
        };
        put("adapter_model.safetensors", weights).await?;
        put(
            "adapter_config.json",
            serde_json::to_vec_pretty(&file.lora.peft_json(base_id))?,
        )
        .await?;
        put("config.json", serde_json::to_vec_pretty(&hyper)?).await?;
        put("training_contributions.txt", manifest.into_bytes()).await?;
        put("loss_curve.csv", curve.into_bytes()).await?;
        put("loss_curve.png", crate::chart::loss_png(&report.curve)?).await?;
        // Snapshots for TracIn over checkpoints (`train.checkpoints`).
        let mut listed = Vec::new();
        for ((step, lr), snap) in report.checkpoints.iter().zip(&report.snapshots) {
            let views: Vec<(&str, &candle_core::Tensor)> =
                snap.iter().map(|(n, t)| (n.as_str(), t)).collect();
            let bytes = safetensors::serialize(views, None)?;
            let file = format!("checkpoints/step-{step:08}.safetensors");
            put(&file, bytes).await?;
            listed.push(serde_json::json!({ "step": step, "learning_rate": lr, "file": file }));
        }
        put("checkpoints.json", serde_json::to_vec_pretty(&listed)?).await?;
        anyhow::Ok(())
    })?;
    let artifact_uri = format!("{}{dir}/adapter_model.safetensors", store.url());
    register(
        rt,
        store,
        &Registered {
            id: &id,
            kind: "adapter",
            parent: Some(base_id),
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

/// The Rust side of the training benchmark (`benchmarks/train.sh`, `ledgerflow train-reference`):
/// trains a base model on `datanet` exactly as `ledgerflow train` does (default settings,
/// `steps` if given; not registered), and writes what the PyTorch side needs to train the same
/// model on the same batches from the same initial weights:
///
///   OUT/init.safetensors  the seeded initial parameters (the names of `ModelConfig::parameters`)
///   OUT/batches.u32       every step's batch, `steps × batch_size × (seq_len + 1)` u32 LE
///   OUT/run.json          model and training settings, and the learning rate of every step
///   OUT/ours.json         our loss per step, seconds and tokens/s of the training loop, device
pub fn train_reference(
    store: &Store,
    datanet: &str,
    out: &std::path::Path,
    steps: Option<usize>,
) -> Result<()> {
    let mut file = TrainFile::default();
    if let Some(s) = steps {
        file.train.steps = s;
    }
    std::fs::create_dir_all(out)?;
    let rt = tokio::runtime::Runtime::new()?;
    let (cfg, corpus) = base_corpus(&rt, store, datanet, &file)?;
    let tc = file.train;
    let device = candle_device()?;

    let varmap = candle_nn::VarMap::new();
    ledgerflow_models::model::init_seeded(&varmap, &cfg, tc.seed, &device)?;
    varmap.save(out.join("init.safetensors"))?;
    let mut bytes = Vec::with_capacity(tc.steps * tc.batch_size * (tc.seq_len + 1) * 4);
    for batch in ledgerflow_models::train::batches(&tc, &corpus) {
        bytes.extend(batch.iter().flat_map(|t| t.to_le_bytes()));
    }
    std::fs::write(out.join("batches.u32"), bytes)?;
    let lrs: Vec<f64> = (0..tc.steps).map(|s| tc.lr_at(s)).collect();
    let run = serde_json::json!({ "model": cfg, "train": tc, "learning_rates": lrs });
    std::fs::write(out.join("run.json"), serde_json::to_vec_pretty(&run)?)?;

    let (_, report) =
        ledgerflow_models::train(&cfg, &tc, &corpus, &device, &mut |_, _, _, _, _| {})?;
    let ours = serde_json::json!({
        "losses": report.curve.iter().map(|c| c.1).collect::<Vec<_>>(),
        "seconds": report.seconds,
        "tokens_per_second": report.tokens_per_second,
        "val_loss": report.val_loss,
        "threads": candle_core::utils::get_num_threads(),
        "device": format!("{:?}", device.location()),
    });
    std::fs::write(out.join("ours.json"), serde_json::to_vec_pretty(&ours)?)?;
    eprintln!(
        "ours: {} steps, {:.2} s, {:.0} tokens/s, final loss {:.4}",
        tc.steps,
        report.seconds,
        report.tokens_per_second,
        report.curve.last().map_or(f64::NAN, |c| c.1)
    );
    Ok(())
}

/// The device models run on, from `LEDGERFLOW_DEVICE`: `cpu`, `cuda` (GPU 0) or `cuda:N`. Unset
/// or empty: the first CUDA GPU when built with the `cuda` feature, else the CPU.
pub fn candle_device() -> Result<candle_core::Device> {
    let choice = std::env::var("LEDGERFLOW_DEVICE").unwrap_or_default();
    match gpu_ordinal(&choice)? {
        None => Ok(candle_core::Device::Cpu),
        #[cfg(feature = "cuda")]
        Some(n) => Ok(candle_core::Device::new_cuda(n)
            .with_context(|| format!("LEDGERFLOW_DEVICE: CUDA GPU {n}"))?),
        #[cfg(not(feature = "cuda"))]
        Some(_) => bail!(
            "LEDGERFLOW_DEVICE={choice:?}: this ledgerflow was built without the `cuda` feature \
             (cargo build --release -p ledgerflow --features cuda)"
        ),
    }
}

/// `LEDGERFLOW_DEVICE`'s value → the CUDA GPU it names, or `None` for the CPU.
fn gpu_ordinal(choice: &str) -> Result<Option<usize>> {
    Ok(match choice.trim() {
        "" if cfg!(feature = "cuda") => Some(0),
        "" | "cpu" => None,
        "cuda" => Some(0),
        c => match c.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => Some(n),
            _ => bail!(
                "LEDGERFLOW_DEVICE={c:?}: expected `cpu`, `cuda` or `cuda:N` (N a GPU ordinal)"
            ),
        },
    })
}

struct Registered<'a> {
    id: &'a str,
    kind: &'a str,
    parent: Option<&'a str>,
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
        s(r.kind),
        Arc::new(StringArray::from(vec![r.parent])),
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

#[cfg(test)]
mod tests {
    use super::gpu_ordinal;

    #[test]
    fn device_choice() {
        assert_eq!(gpu_ordinal("cpu").unwrap(), None);
        assert_eq!(gpu_ordinal(" cuda ").unwrap(), Some(0));
        assert_eq!(gpu_ordinal("cuda:3").unwrap(), Some(3));
        assert_eq!(
            gpu_ordinal("").unwrap(),
            cfg!(feature = "cuda").then_some(0)
        );
        for bad in ["gpu", "cuda:", "cuda:x", "CUDA"] {
            let e = gpu_ordinal(bad).unwrap_err().to_string();
            assert!(
                e.contains("expected `cpu`, `cuda` or `cuda:N`"),
                "{bad}: {e}"
            );
        }
    }
}

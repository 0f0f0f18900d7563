//! Gradient attribution over the store: `ledgerflow attribution index` computes, for every
//! training contribution of a LoRA adapter and every saved checkpoint, the exact per-example
//! gradient of its loss with respect to the adapter, projected to k dimensions (TRAK), and
//! writes the `gradients` table; `ledgerflow attribution score` takes a model output's gradient
//! the same way and scores every contribution (TracIn over checkpoints, or gradient cosine),
//! keeps the top k, sums per contributor, normalises per output and writes `attributions` rows
//! with method `gradient`. `ledgerflow attribution eval` measures the methods against
//! retraining on a logistic-regression model.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, LazyLock};

use anyhow::{bail, Context, Result};
use arrow::array::AsArray;
use arrow_schema::{DataType, Field, Schema, SchemaRef, TimeUnit};
use candle_core::{Device, Tensor};
use ledgerflow_models::influence::{per_example_grads, ExampleGrads, Projector};
use ledgerflow_models::{Adapter, LoraConfig, TrainConfig};
use ledgerflow_store::Store;
use serde_json::{json, Value};

use crate::train::{find, load_base, registry, LoadedBase, ModelRow};

/// Name of the engine table of projected gradients.
pub const GRADIENTS_TABLE: &str = "gradients";

/// The `gradients` table: one row per (contribution, checkpoint) of an adapter and the
/// projection's seed, and the projected gradient. Each adapter's file stores the gradient as a
/// fixed-size list of k f32 (`FixedSizeList<f32, k>`: readers of the file — Arrow, polars,
/// pyarrow — get a `[rows, k]` block); [`gradient_table_schema`] is the SQL table over every
/// adapter's file, where the same column is a list (adapters indexed with different k share
/// the table; DataFusion casts each file's fixed-size list on reading).
pub fn gradient_schema(k: usize) -> SchemaRef {
    gradient_schema_with(DataType::FixedSizeList(
        Arc::new(Field::new_list_field(DataType::Float32, false)),
        k as i32,
    ))
}

/// The `gradients` SQL table: [`gradient_schema`] with the gradient as `List<f32>`.
pub fn gradient_table_schema() -> SchemaRef {
    gradient_schema_with(DataType::List(Arc::new(Field::new_list_field(
        DataType::Float32,
        false,
    ))))
}

fn gradient_schema_with(gradient: DataType) -> SchemaRef {
    static BASE: LazyLock<Vec<Field>> = LazyLock::new(|| {
        vec![
            Field::new("content_hash", DataType::Utf8, false),
            Field::new("contributor", DataType::Utf8, false),
            Field::new("datanet", DataType::Utf8, false),
            Field::new("model", DataType::Utf8, false),
            Field::new("generation", DataType::Utf8, false),
            Field::new("checkpoint", DataType::UInt32, false),
            Field::new("learning_rate", DataType::Float64, false),
            Field::new("projection_seed", DataType::UInt64, false),
        ]
    });
    let mut fields = BASE.clone();
    fields.push(Field::new("gradient", gradient, false));
    fields.push(Field::new(
        "created_at",
        DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
        false,
    ));
    Arc::new(Schema::new(fields))
}

/// The file of one adapter version's gradients: one file per generation (the version's
/// content hash in its name), so indexing a new version of an adapter never replaces the
/// gradients of the version still being served, and a reader of one generation reads one file
/// (the others are pruned by the `generation` column's statistics). Indexing the same version
/// again on the same day replaces its file.
fn gradient_file(adapter_id: &str, generation: &str) -> String {
    let g: String = generation
        .trim_start_matches("0x")
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .take(16)
        .collect();
    format!("{adapter_id}.{g}.parquet")
}

/// An adapter ready for gradients: its base, its settings and its checkpoints.
struct Loaded {
    row: ModelRow,
    base: LoadedBase,
    train: TrainConfig,
    /// (step, learning rate, adapter in exact form)
    checkpoints: Vec<(u32, f64, Adapter)>,
}

async fn load(store: &Store, adapter_id: &str, device: &Device) -> Result<Loaded> {
    let models = registry(store).await?;
    let row = find(&models, adapter_id)?.clone();
    if row.kind != "adapter" {
        bail!(
            "`{adapter_id}` is a {} model: gradient attribution runs on LoRA adapters",
            row.kind
        );
    }
    let parent = row.parent.clone().context("the adapter has no parent")?;
    let base = load_base(store, find(&models, &parent)?, device).await?;
    let hyper: Value = serde_json::from_str(&row.hyperparameters)?;
    let lora: LoraConfig = serde_json::from_value(hyper["lora"].clone())?;
    let train: TrainConfig = serde_json::from_value(hyper["train"].clone())?;
    let dir = row.dir();
    let listed: Vec<Value> = match store.get(&format!("{dir}/checkpoints.json")).await? {
        Some(b) => serde_json::from_slice(&b)?,
        None => vec![],
    };
    let mut checkpoints = Vec::new();
    let mut read = |step: u32, lr: f64, bytes: &[u8]| -> Result<()> {
        let tensors: Vec<(String, Tensor)> = candle_core::safetensors::load_buffer(bytes, device)?
            .into_iter()
            .collect();
        checkpoints.push((step, lr, Adapter::from_named(&tensors, &lora, &base.model)?));
        Ok(())
    };
    if listed.is_empty() {
        // Only the final weights: one checkpoint at the last step's learning rate.
        let bytes = store
            .get(&format!("{dir}/adapter_model.safetensors"))
            .await?
            .context("the adapter's weights are not in the store")?;
        read(
            train.steps as u32,
            train.lr_at(train.steps.saturating_sub(1)),
            &bytes,
        )?;
    } else {
        for c in &listed {
            let file = c["file"].as_str().context("checkpoints.json: no file")?;
            let bytes = store
                .get(&format!("{dir}/{file}"))
                .await?
                .with_context(|| format!("{dir}/{file} is not in the store"))?;
            read(
                c["step"].as_u64().unwrap_or(0) as u32,
                c["learning_rate"].as_f64().unwrap_or(0.0),
                &bytes,
            )?;
        }
    }
    Ok(Loaded {
        row,
        base,
        train,
        checkpoints,
    })
}

/// A window of `ids` for a gradient: the first `len + 1` tokens (u32).
fn window(ids: &[u16], len: usize) -> Vec<u32> {
    ids.iter().take(len + 1).map(|&t| u32::from(t)).collect()
}

/// Projected per-example gradients of `windows` (any lengths ≥ 2; batched by length) at one
/// checkpoint: one row per window, in order. On the CPU the batches run side by side, one per
/// rayon worker: candle runs its element-wise ops and reductions on one thread, so batch
/// parallelism keeps every core busy where parallel gemms alone leave them waiting (a gemm
/// called from a busy worker keeps its work on that worker). Each batch's result does not
/// depend on which thread ran it.
fn projected(
    base: &LoadedBase,
    adapter: &Adapter,
    windows: &[Vec<u32>],
    k: usize,
    seed: u64,
    batch: usize,
    device: &Device,
) -> Result<Vec<Vec<f32>>> {
    use rayon::prelude::*;
    let mut by_len: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (i, w) in windows.iter().enumerate() {
        by_len.entry(w.len()).or_default().push(i);
    }
    // Longest first, so that the last jobs to start are the short ones.
    let jobs: Vec<(usize, &[usize])> = by_len
        .iter()
        .rev()
        .flat_map(|(&len, idx)| idx.chunks(batch.max(1)).map(move |c| (len, c)))
        .collect();
    let grads = |&(len, chunk): &(usize, &[usize])| -> Result<ExampleGrads> {
        let flat: Vec<u32> = chunk.iter().flat_map(|&i| windows[i].clone()).collect();
        let t = Tensor::from_vec(flat, (chunk.len(), len), device)?;
        Ok(per_example_grads(&base.model, adapter, &t)?)
    };
    let Some(first) = jobs.first() else {
        return Ok(Vec::new());
    };
    // The first batch names the parameter blocks the projector needs.
    let g = grads(first)?;
    let projector = Projector::new(&g.params, k, seed, device)?;
    let run = |job: &(usize, &[usize]), g: Option<ExampleGrads>| -> Result<Vec<Vec<f32>>> {
        let g = match g {
            Some(g) => g,
            None => grads(job)?,
        };
        Ok(projector.project(&g)?.to_vec2::<f32>()?)
    };
    let mut results = vec![run(first, Some(g))?];
    if device.is_cpu() {
        results.extend(
            jobs[1..]
                .par_iter()
                .map(|job| run(job, None))
                .collect::<Result<Vec<_>>>()?,
        );
    } else {
        for job in &jobs[1..] {
            results.push(run(job, None)?);
        }
    }
    let mut out = vec![Vec::new(); windows.len()];
    for ((_, chunk), rows) in jobs.iter().zip(results) {
        for (&i, row) in chunk.iter().zip(rows) {
            out[i] = row;
        }
    }
    Ok(out)
}

/// `ledgerflow attribution index`: the `gradients` rows of every training contribution of
/// `adapter_id` at every checkpoint.
pub fn build_index(
    rt: &tokio::runtime::Runtime,
    store: &Store,
    adapter_id: &str,
    k: usize,
    seed: u64,
) -> Result<Value> {
    if k == 0 {
        bail!("--k must be at least 1");
    }
    let device = crate::train::candle_device()?;
    let started = std::time::Instant::now();
    let l = rt.block_on(load(store, adapter_id, &device))?;
    let manifest = rt
        .block_on(store.get(&format!("{}/training_contributions.txt", l.row.dir())))?
        .context("the adapter's training manifest is not in the store")?;
    let wanted: HashSet<&str> = std::str::from_utf8(&manifest)?.lines().collect();
    let docs = rt.block_on(datanet_rows(store, &l.row.datanet))?;
    let docs: Vec<(String, String, Vec<u32>)> = docs
        .into_iter()
        .filter(|(h, _, _)| wanted.contains(h.as_str()))
        .map(|(h, who, text)| {
            let ids = l.base.tokenizer.encode(&text)?;
            Ok((h, who, window(&ids, l.train.seq_len)))
        })
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .filter(|d| d.2.len() >= 2)
        .collect();
    if docs.is_empty() {
        bail!(
            "none of the adapter's training contributions is in Datanet `{}`",
            l.row.datanet
        );
    }
    let windows: Vec<Vec<u32>> = docs.iter().map(|d| d.2.clone()).collect();
    let mut rows: Vec<GradRow> = Vec::new();
    let computing = std::time::Instant::now();
    for (step, lr, adapter) in &l.checkpoints {
        let g = projected(&l.base, adapter, &windows, k, seed, 32, &device)?;
        rows.extend(g.into_iter().enumerate().map(|(i, v)| (i, *step, *lr, v)));
    }
    let gradient_seconds = computing.elapsed().as_secs_f64();
    let batch = gradient_batch(&l.row, &docs, &rows, k, seed)?;
    rt.block_on(crate::tokens::put_table_file(
        store,
        GRADIENTS_TABLE,
        &batch,
        "created_at",
        &gradient_file(adapter_id, &l.row.content_hash),
    ))?;
    Ok(json!({
        "model": adapter_id,
        "generation": l.row.content_hash,
        "contributions": docs.len(),
        "checkpoints": l.checkpoints.iter().map(|c| json!({"step": c.0, "learning_rate": c.1})).collect::<Vec<_>>(),
        "k": k,
        "rows": rows.len(),
        "seconds": started.elapsed().as_secs_f64(),
        "gradients_per_second": rows.len() as f64 / started.elapsed().as_secs_f64().max(1e-9),
        // The per-example gradients and their projection alone (no loading, tokenizing or
        // writing).
        "gradient_seconds": gradient_seconds,
        "gradients_per_second_computing": rows.len() as f64 / gradient_seconds.max(1e-9),
    }))
}

/// A projected gradient: (document index, checkpoint step, learning rate, values).
type GradRow = (usize, u32, f64, Vec<f32>);

fn gradient_batch(
    row: &ModelRow,
    docs: &[(String, String, Vec<u32>)],
    rows: &[GradRow],
    k: usize,
    seed: u64,
) -> Result<arrow_array::RecordBatch> {
    use arrow_array::{
        ArrayRef, FixedSizeListArray, Float32Array, Float64Array, RecordBatch, StringArray,
        TimestampMillisecondArray, UInt32Array, UInt64Array,
    };
    let n = rows.len();
    let text = |f: &dyn Fn(&GradRow) -> String| -> ArrayRef {
        Arc::new(StringArray::from_iter_values(rows.iter().map(f)))
    };
    if let Some(r) = rows.iter().find(|r| r.3.len() != k) {
        bail!("a projected gradient of {} values for k = {k}", r.3.len());
    }
    let values = Float32Array::from_iter_values(rows.iter().flat_map(|r| r.3.iter().copied()));
    let list = FixedSizeListArray::try_new(
        Arc::new(Field::new_list_field(DataType::Float32, false)),
        k as i32,
        Arc::new(values),
        None,
    )?;
    let now = chrono::Utc::now().timestamp_millis();
    let columns: Vec<ArrayRef> = vec![
        text(&|r| docs[r.0].0.clone()),
        text(&|r| docs[r.0].1.clone()),
        text(&|_| row.datanet.clone()),
        text(&|_| row.id.clone()),
        text(&|_| row.content_hash.clone()),
        Arc::new(UInt32Array::from_iter_values(rows.iter().map(|r| r.1))),
        Arc::new(Float64Array::from_iter_values(rows.iter().map(|r| r.2))),
        Arc::new(UInt64Array::from_iter_values(std::iter::repeat_n(seed, n))),
        Arc::new(list),
        Arc::new(
            TimestampMillisecondArray::from_iter_values(std::iter::repeat_n(now, n))
                .with_timezone("UTC"),
        ),
    ];
    Ok(RecordBatch::try_new(gradient_schema(k), columns)?)
}

/// (content hash, contributor, content) of a Datanet, in Kafka order.
async fn datanet_rows(store: &Store, datanet: &str) -> Result<Vec<(String, String, String)>> {
    let ctx = crate::sql::session_with_partitions(store, 1).await?;
    let sql = format!(
        "SELECT content_hash, contributor, content FROM \"{}\" ORDER BY kafka_topic, kafka_partition, kafka_offset",
        datanet.replace('"', "\"\"")
    );
    let mut out = Vec::new();
    for b in ctx.sql(&sql).await?.collect().await? {
        let cols: Vec<_> = (0..3)
            .map(|i| arrow::compute::cast(b.column(i), &DataType::Utf8))
            .collect::<std::result::Result<_, _>>()?;
        let s: Vec<_> = cols.iter().map(|c| c.as_string::<i32>()).collect();
        for i in 0..b.num_rows() {
            out.push((
                s[0].value(i).to_string(),
                s[1].value(i).to_string(),
                s[2].value(i).to_string(),
            ));
        }
    }
    Ok(out)
}

/// One indexed gradient.
struct Indexed {
    content_hash: String,
    contributor: String,
    checkpoint: u32,
    learning_rate: f64,
    seed: u64,
    gradient: Vec<f32>,
}

async fn read_index(store: &Store, adapter_id: &str, generation: &str) -> Result<Vec<Indexed>> {
    let ctx = crate::sql::session_with_partitions(store, 1).await?;
    if !ctx.table_exist(GRADIENTS_TABLE)? {
        bail!("the store has no `gradients` table: run `ledgerflow attribution index --adapter {adapter_id}` first");
    }
    let sql = format!(
        "SELECT content_hash, contributor, checkpoint, learning_rate, projection_seed, gradient FROM gradients \
         WHERE model = '{m}' AND generation = '{g}' \
         AND created_at = (SELECT max(created_at) FROM gradients WHERE model = '{m}' AND generation = '{g}') \
         ORDER BY checkpoint, content_hash",
        m = adapter_id.replace('\'', "''"),
        g = generation.replace('\'', "''")
    );
    let mut out = Vec::new();
    for b in ctx.sql(&sql).await?.collect().await? {
        let hash = arrow::compute::cast(b.column(0), &DataType::Utf8)?;
        let who = arrow::compute::cast(b.column(1), &DataType::Utf8)?;
        let (hash, who) = (hash.as_string::<i32>(), who.as_string::<i32>());
        let step = b.column(2).as_primitive::<arrow::datatypes::UInt32Type>();
        let lr = b.column(3).as_primitive::<arrow::datatypes::Float64Type>();
        let seed = b.column(4).as_primitive::<arrow::datatypes::UInt64Type>();
        let grads = b.column(5).as_list::<i32>();
        for i in 0..b.num_rows() {
            let v = grads.value(i);
            out.push(Indexed {
                content_hash: hash.value(i).to_string(),
                contributor: who.value(i).to_string(),
                checkpoint: step.value(i),
                learning_rate: lr.value(i),
                seed: seed.value(i),
                gradient: v
                    .as_primitive::<arrow::datatypes::Float32Type>()
                    .values()
                    .to_vec(),
            });
        }
    }
    if out.is_empty() {
        bail!("no gradients of `{adapter_id}` at generation {generation}: run `ledgerflow attribution index --adapter {adapter_id}`");
    }
    Ok(out)
}

/// How to score an output: the `attribution score` / `attribution inferences` flags, the
/// `serve` command's `--gradient-*` flags and a `serve` stage's `gradient_attribution:`.
#[derive(
    Debug, Clone, PartialEq, clap::Args, serde::Serialize, serde::Deserialize, schemars::JsonSchema,
)]
#[serde(deny_unknown_fields)]
pub struct ScoreOptions {
    /// `tracin` (Σ over checkpoints of the learning rate times the dot product), `cosine`, or
    /// `datainf` (DataInf's closed-form inverse Hessian at the last checkpoint).
    #[arg(long = "method", default_value = "tracin")]
    #[serde(default = "default_method")]
    pub method: String,
    /// Contributions credited per output (the highest scores).
    #[arg(long = "top-k", default_value_t = 10)]
    #[serde(default = "default_top_k")]
    pub top_k: usize,
    /// Normalised scores below it earn nothing (the attribution threshold, a governance
    /// parameter).
    #[arg(long = "threshold", default_value_t = 0.0)]
    #[serde(default)]
    pub threshold: f64,
    /// DataInf's damping: λ = damping · the mean squared norm of the training gradients.
    #[arg(long = "damping", default_value_t = 0.1)]
    #[serde(default = "default_damping")]
    pub damping: f64,
}

fn default_method() -> String {
    "tracin".into()
}
fn default_top_k() -> usize {
    10
}
fn default_damping() -> f64 {
    0.1
}

impl Default for ScoreOptions {
    fn default() -> Self {
        Self {
            method: default_method(),
            top_k: default_top_k(),
            threshold: 0.0,
            damping: default_damping(),
        }
    }
}

impl ScoreOptions {
    /// Problems with the options, if any.
    pub fn check(&self) -> Result<(), String> {
        check_method(&self.method).map_err(|e| e.to_string())?;
        if self.top_k == 0 {
            return Err("top_k must be at least 1".into());
        }
        if !(0.0..=1.0).contains(&self.threshold) {
            return Err(format!(
                "threshold {} is not between 0 and 1",
                self.threshold
            ));
        }
        if self.damping.is_nan() || self.damping <= 0.0 {
            return Err(format!("damping {} must be above 0", self.damping));
        }
        Ok(())
    }
}

/// An adapter's gradient index loaded for scoring outputs.
pub struct Scorer {
    l: Loaded,
    device: Device,
    /// (content hash, contributor) of the index's rows, in row order.
    names: Vec<(String, String)>,
    /// Per checkpoint: (step, learning rate, projected training gradients in `names` order as
    /// one row-major `[rows, k]` matrix, their norms).
    checkpoints: Vec<(u32, f64, Vec<f32>, Vec<f32>)>,
    k: usize,
    seed: u64,
}

impl Scorer {
    /// Loads `adapter_id`'s checkpoints and its rows of `gradients`.
    /// (From a thread outside the runtime's workers: it blocks on `rt`.)
    pub fn open(rt: &tokio::runtime::Handle, store: &Store, adapter_id: &str) -> Result<Self> {
        let device = crate::train::candle_device()?;
        let l = rt.block_on(load(store, adapter_id, &device))?;
        let index = rt.block_on(read_index(store, adapter_id, &l.row.content_hash))?;
        let (k, seed) = (index[0].gradient.len(), index[0].seed);
        let mut by_ckpt: BTreeMap<u32, (f64, Vec<Indexed>)> = BTreeMap::new();
        for r in index {
            by_ckpt
                .entry(r.checkpoint)
                .or_insert((r.learning_rate, vec![]))
                .1
                .push(r);
        }
        let names: Vec<(String, String)> = by_ckpt
            .values()
            .next()
            .map(|(_, rows)| {
                rows.iter()
                    .map(|r| (r.content_hash.clone(), r.contributor.clone()))
                    .collect()
            })
            .unwrap_or_default();
        let mut checkpoints = Vec::new();
        for (step, (lr, rows)) in by_ckpt {
            if !l.checkpoints.iter().any(|c| c.0 == step) {
                bail!("the index has checkpoint {step}, which the adapter's files do not");
            }
            if rows.len() != names.len()
                || rows.iter().zip(&names).any(|(r, n)| r.content_hash != n.0)
            {
                bail!("checkpoint {step} does not cover the same contributions as the others");
            }
            let norms: Vec<f32> = rows
                .iter()
                .map(|r| r.gradient.iter().map(|x| x * x).sum::<f32>().sqrt())
                .collect();
            let flat: Vec<f32> = rows.into_iter().flat_map(|r| r.gradient).collect();
            checkpoints.push((step, lr, flat, norms));
        }
        Ok(Self {
            l,
            device,
            names,
            checkpoints,
            k,
            seed,
        })
    }

    pub fn generation(&self) -> &str {
        &self.l.row.content_hash
    }

    pub fn datanet(&self) -> &str {
        &self.l.row.datanet
    }

    /// The contributions behind `text` (a prompt and its output, as the model saw them), as
    /// `{contributions: [{content_hash, contributor, score}], contributors: […]}` with scores
    /// normalised to sum to 1.
    pub fn score(&self, text: &str, opts: &ScoreOptions) -> Result<Value> {
        opts.check().map_err(anyhow::Error::msg)?;
        let ids = self.l.base.tokenizer.encode(text)?;
        if ids.len() < 2 {
            bail!("the text has fewer than two tokens");
        }
        // The same window as the training contributions': the first `seq_len + 1` tokens.
        let test = vec![window(&ids, self.l.train.seq_len)];
        // One pass over each checkpoint's index (bandwidth-bound dot products).
        let n = self.names.len();
        let threads = std::thread::available_parallelism().map_or(1, |t| t.get());
        let mut total = vec![0f64; n];
        let mut dots = vec![0f32; n];
        let mut lrs = Vec::new();
        // DataInf is the influence at the trained model: the last checkpoint alone.
        let used = match opts.method.as_str() {
            "datainf" => &self.checkpoints[self.checkpoints.len().saturating_sub(1)..],
            _ => &self.checkpoints[..],
        };
        for (step, lr, flat, norms) in used {
            let (_, _, adapter) = self
                .l
                .checkpoints
                .iter()
                .find(|c| c.0 == *step)
                .expect("checked at open");
            let t = projected(
                &self.l.base,
                adapter,
                &test,
                self.k,
                self.seed,
                1,
                &self.device,
            )?;
            ledgerflow_models::scores::dot_rows(flat, self.k, &t[0], &mut dots, threads);
            let tn = t[0].iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-30);
            match opts.method.as_str() {
                "tracin" => total
                    .iter_mut()
                    .zip(&dots)
                    .for_each(|(t, d)| *t += lr * *d as f64),
                "cosine" => {
                    for i in 0..n {
                        total[i] += (dots[i] / (norms[i].max(1e-30) * tn)) as f64;
                    }
                }
                _ => {
                    let r = datainf_direction(flat, self.k, norms, &dots, &t[0], opts.damping);
                    ledgerflow_models::scores::dot_rows(flat, self.k, &r.0, &mut dots, threads);
                    total
                        .iter_mut()
                        .zip(&dots)
                        .for_each(|(t, d)| *t += *d as f64 * r.1);
                }
            }
            lrs.push(*lr);
        }
        let s = [total];
        let mut ranked: Vec<(usize, f64)> = s[0]
            .iter()
            .copied()
            .enumerate()
            .filter(|(_, v)| *v > 0.0)
            .collect();
        ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
        ranked.truncate(opts.top_k);
        let total: f64 = ranked.iter().map(|r| r.1).sum();
        let mut contributions: Vec<Value> = Vec::new();
        let mut per: HashMap<&str, f64> = HashMap::new();
        if total > 0.0 {
            let kept: Vec<(usize, f64)> = ranked
                .iter()
                .map(|&(i, v)| (i, v / total))
                .filter(|(_, v)| *v >= opts.threshold)
                .collect();
            let kept_total: f64 = kept.iter().map(|r| r.1).sum();
            for (i, v) in kept {
                let v = v / kept_total;
                let (hash, who) = &self.names[i];
                contributions.push(
                    json!({ "content_hash": hash, "contributor": who, "score": v, "raw": s[0][i] }),
                );
                *per.entry(who.as_str()).or_default() += v;
            }
        }
        let mut contributors: Vec<(&str, f64)> = per.into_iter().collect();
        contributors.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(b.0)));
        Ok(json!({
            "method": opts.method,
            "model": self.l.row.id,
            "generation": self.l.row.content_hash,
            "checkpoints": lrs.len(),
            "k": self.k,
            "tokens": test[0].len(),
            "contributions": contributions,
            "contributors": contributors.iter().map(|(a, v)| json!({ "contributor": a, "score": v })).collect::<Vec<_>>(),
        }))
    }
}

/// The scoring methods over a gradient index.
pub const METHODS: [&str; 3] = ["tracin", "cosine", "datainf"];

fn check_method(method: &str) -> Result<()> {
    if !METHODS.contains(&method) {
        bail!("method `{method}` is not one of {}", METHODS.join(", "));
    }
    Ok(())
}

/// DataInf over one checkpoint's projected index (the projection as one layer): with
/// `λ = damping · mean‖g‖²` and `c_k = ⟨v, g_k⟩ / (λ + ‖g_k‖²)`, the direction
/// `r = n·v − Σ c_k g_k` and the factor `1/(nλ)`; the score of row `i` is `⟨g_i, r⟩/(nλ)`
/// (`scores::datainf` on the index, in two passes over it).
fn datainf_direction(
    flat: &[f32],
    k: usize,
    norms: &[f32],
    dots: &[f32],
    v: &[f32],
    damping: f64,
) -> (Vec<f32>, f64) {
    let n = norms.len();
    let sq: Vec<f64> = norms.iter().map(|x| (*x as f64) * (*x as f64)).collect();
    let lambda = (damping * sq.iter().sum::<f64>() / n.max(1) as f64).max(1e-12);
    let mut r: Vec<f64> = v.iter().map(|x| n as f64 * *x as f64).collect();
    for (row, (d, s)) in flat.chunks(k).zip(dots.iter().zip(&sq)) {
        let c = *d as f64 / (lambda + s);
        for (r, g) in r.iter_mut().zip(row) {
            *r -= c * *g as f64;
        }
    }
    (
        r.into_iter().map(|x| x as f32).collect(),
        1.0 / (n as f64 * lambda),
    )
}

/// `ledgerflow attribution score`: [`Scorer::score`] for one text.
pub fn score(
    rt: &tokio::runtime::Runtime,
    store: &Store,
    adapter_id: &str,
    text: &str,
    opts: &ScoreOptions,
) -> Result<Value> {
    Scorer::open(rt.handle(), store, adapter_id)?.score(text, opts)
}

/// `ledgerflow attribution inferences`: every answer of `adapter_id` in `inferences` that has
/// no `gradient` attribution yet (prompt and output as the model saw them) scored and written
/// to `attributions` with method `gradient` — what the reward epochs read at epoch close.
pub fn attribute_inferences(
    rt: &tokio::runtime::Runtime,
    store: &Store,
    adapter_id: &str,
    opts: &ScoreOptions,
) -> Result<Value> {
    let scorer = Scorer::open(rt.handle(), store, adapter_id)?;
    let pending = rt.block_on(async {
        let ctx = crate::sql::session_with_partitions(store, 1).await?;
        let done = if ctx.table_exist("attributions")? {
            "AND request_id NOT IN (SELECT DISTINCT output_id FROM attributions WHERE method = 'gradient')"
        } else {
            ""
        };
        let sql = format!(
            "SELECT request_id, prompt, output, CAST(created_at AS BIGINT) AS t FROM inferences \
             WHERE model = '{}' AND (adapter_generation IS NULL OR adapter_generation = '{}') {done} ORDER BY created_at, request_id",
            adapter_id.replace('\'', "''"),
            scorer.generation().replace('\'', "''"),
        );
        let mut out = Vec::new();
        for b in ctx.sql(&sql).await?.collect().await? {
            let cols: Vec<_> = (0..3)
                .map(|i| arrow::compute::cast(b.column(i), &DataType::Utf8))
                .collect::<std::result::Result<_, _>>()?;
            let s: Vec<_> = cols.iter().map(|c| c.as_string::<i32>()).collect();
            let t = arrow::compute::cast(b.column(3), &DataType::Int64)?;
            let t = t.as_primitive::<arrow::datatypes::Int64Type>();
            for i in 0..b.num_rows() {
                out.push((s[0].value(i).to_string(), format!("{}{}", s[1].value(i), s[2].value(i)), t.value(i)));
            }
        }
        anyhow::Ok(out)
    })?;
    let mut results = Vec::with_capacity(pending.len());
    for (id, text, at) in &pending {
        results.push((id.as_str(), scorer.score(text, opts)?, *at));
    }
    let datanet = scorer.datanet().to_string();
    let rows: Vec<(&str, &str, &Value, i64)> = results
        .iter()
        .map(|(id, r, at)| (*id, datanet.as_str(), r, *at))
        .collect();
    let written = match rows.first() {
        Some((first, ..)) => {
            let key =
                hex::encode(&ledgerflow_schemas::contribution::keccak256(first.as_bytes())[..12]);
            rt.block_on(crate::tokens::record_attribution_batch(
                store,
                &rows,
                "gradient",
                &format!("gradient-{adapter_id}-{key}-{}.parquet", rows.len()),
            ))?
        }
        None => 0,
    };
    Ok(json!({ "model": adapter_id, "inferences": pending.len(), "rows": written }))
}

/// `ledgerflow attribution bench`: scoring against an index of `rows × k` f32 (one query per
/// pass) as a fraction of this machine's read bandwidth with the same threads.
pub fn bench_scoring(rows: usize, k: usize, threads: usize, repeats: usize) -> Result<Value> {
    let mut x = 0x9e37_79b9u32;
    let index: Vec<f32> = (0..rows * k)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 8) as f32 / (1 << 24) as f32 - 0.5
        })
        .collect();
    let query: Vec<f32> = (0..k).map(|i| (i as f32 * 0.37).sin()).collect();
    let bandwidth = ledgerflow_models::scores::read_bandwidth(&index, threads, repeats);
    let mut out = vec![0f32; rows];
    let mut best = f64::MAX;
    for _ in 0..repeats {
        let t = std::time::Instant::now();
        ledgerflow_models::scores::dot_rows(&index, k, &query, &mut out, threads);
        best = best.min(t.elapsed().as_secs_f64());
    }
    std::hint::black_box(&out);
    let bytes = (rows * k * 4) as f64;
    let mut r = json!({
        "rows": rows, "k": k, "threads": threads, "index_bytes": bytes,
        "read_bandwidth_gb_s": bandwidth / 1e9,
        "scoring_seconds": best,
        "scoring_gb_s": bytes / best / 1e9,
        "scores_per_second": rows as f64 / best,
        "fraction_of_bandwidth": bytes / best / bandwidth,
    });
    let device = crate::train::candle_device()?;
    if !device.is_cpu() {
        r["gpu"] = bench_scoring_on(&device, index, k, &query, &out, repeats)?;
    }
    Ok(r)
}

/// The same scoring on a GPU: the index resident in device memory, one query per pass as a
/// matrix-vector product, against the device's copy bandwidth (bytes read + written by a
/// device-to-device copy of the index into a buffer allocated beforehand). Checks the scores
/// against the CPU's.
fn bench_scoring_on(
    device: &candle_core::Device,
    index: Vec<f32>,
    k: usize,
    query: &[f32],
    cpu_scores: &[f32],
    repeats: usize,
) -> Result<Value> {
    use candle_core::Tensor;
    let rows = index.len() / k;
    let bytes = (rows * k * 4) as f64;
    let index = Tensor::from_vec(index, (rows, k), device)?;
    let q = Tensor::from_slice(query, (k, 1), device)?;
    let time = |f: &dyn Fn() -> Result<Tensor>| -> Result<(f64, Tensor)> {
        let mut out = f()?; // warm-up: kernel loading, library handles
        device.synchronize()?;
        let mut best = f64::MAX;
        for _ in 0..repeats.max(1) {
            let t = std::time::Instant::now();
            out = f()?;
            device.synchronize()?;
            best = best.min(t.elapsed().as_secs_f64());
        }
        Ok((best, out))
    };
    let dst = Tensor::zeros((rows, k), candle_core::DType::F32, device)?;
    let (copy, _) = time(&|| {
        dst.slice_set(&index, 0, 0)?;
        Ok(dst.clone())
    })?;
    let (best, scores) = time(&|| Ok(index.matmul(&q)?))?;
    let scores = scores.flatten_all()?.to_vec1::<f32>()?;
    let max_abs_diff = scores
        .iter()
        .zip(cpu_scores)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    let bandwidth = 2.0 * bytes / copy;
    Ok(json!({
        "device": format!("{:?}", device.location()),
        "copy_bandwidth_gb_s": bandwidth / 1e9,
        "scoring_seconds": best,
        "scoring_gb_s": bytes / best / 1e9,
        "scores_per_second": rows as f64 / best,
        "fraction_of_bandwidth": bytes / best / bandwidth,
        "max_abs_diff_vs_cpu": max_abs_diff,
    }))
}

/// `ledgerflow attribution eval`: each method against retraining on logistic regression.
pub fn eval(
    train: usize,
    test: usize,
    dims: usize,
    subsets: usize,
    seed: u64,
    export: Option<&std::path::Path>,
) -> Result<Value> {
    if train < 10 || test == 0 || dims == 0 || subsets < 2 {
        bail!("need --train ≥ 10, --test ≥ 1, --dims ≥ 1 and --subsets ≥ 2");
    }
    let p = ledgerflow_models::logreg::Problem::generate(train, test, dims, seed);
    if let Some(path) = export {
        // The problem, its optimum and every method's scores, for an outside implementation
        // (benchmarks/attribution_dattri.py) to score the same model on the same data.
        let w = p.fit(&(0..train).collect::<Vec<_>>(), None);
        let scores: serde_json::Map<String, Value> =
            ledgerflow_models::logreg::method_scores(&p, &w)
                .into_iter()
                .map(|(m, s)| (m, serde_json::json!(s)))
                .collect();
        let doc = serde_json::json!({
            "model": "logistic regression without bias: mean log-loss + l2/2 |w|^2",
            "x": p.x, "y": p.y, "test_x": p.test_x, "test_y": p.test_y, "l2": p.l2,
            "w": w,
            "datainf_damping": ledgerflow_models::logreg::DATAINF_DAMPING,
            "scores": scores,
        });
        std::fs::write(path, serde_json::to_vec(&doc)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(serde_json::to_value(ledgerflow_models::logreg::evaluate(
        &p,
        subsets,
        seed ^ 1,
    ))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// DataInf over a flat index in two passes equals `scores::datainf` on the same rows.
    #[test]
    fn datainf_over_the_index_equals_the_reference() {
        let (n, k) = (40, 6);
        let mut x = 0x9e37_79b9u32;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x as f32 / u32::MAX as f32) - 0.5
        };
        let rows: Vec<Vec<f32>> = (0..n).map(|_| (0..k).map(|_| next()).collect()).collect();
        let v: Vec<f32> = (0..k).map(|_| next()).collect();
        let flat: Vec<f32> = rows.iter().flatten().copied().collect();
        let norms: Vec<f32> = rows
            .iter()
            .map(|r| r.iter().map(|a| a * a).sum::<f32>().sqrt())
            .collect();
        let mut dots = vec![0f32; n];
        ledgerflow_models::scores::dot_rows(&flat, k, &v, &mut dots, 1);
        let (r, factor) = datainf_direction(&flat, k, &norms, &dots, &v, 0.1);
        let mut ours = vec![0f32; n];
        ledgerflow_models::scores::dot_rows(&flat, k, &r, &mut ours, 1);
        let reference = ledgerflow_models::scores::datainf(&[rows], &[vec![v]], 0.1);
        for (a, b) in ours.iter().zip(&reference[0]) {
            let a = *a as f64 * factor;
            assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{a} against {b}");
        }
    }

    /// Each adapter's file keeps the gradient as `FixedSizeList<f32, k>`; the SQL table reads
    /// adapters of different k side by side as lists, values unchanged.
    #[tokio::test]
    async fn gradient_files_are_fixed_size_and_share_the_table() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().to_str().unwrap()).unwrap();
        let docs = vec![
            ("0xaa".to_string(), "0x01".to_string(), vec![1u32, 2]),
            ("0xbb".to_string(), "0x02".to_string(), vec![3u32, 4]),
        ];
        // Two adapters of different k, and a second version of the first (same id, another
        // generation): three files, none replacing another.
        for (id, generation, k) in [
            ("a-lora-1", "0xaaaa01", 3usize),
            ("a-lora-2", "0xbbbb02", 5),
            ("a-lora-1", "0xaaaa03", 4),
        ] {
            let row = ModelRow {
                id: id.into(),
                kind: "adapter".into(),
                parent: Some("a-base".into()),
                datanet: "a".into(),
                artifact_uri: String::new(),
                content_hash: generation.into(),
                hyperparameters: "{}".into(),
                val_perplexity: 1.0,
                created_at_ms: 0,
            };
            let rows: Vec<GradRow> = (0..2)
                .map(|i| (i, 7, 0.1, (0..k).map(|j| (i * 10 + j) as f32).collect()))
                .collect();
            let batch = gradient_batch(&row, &docs, &rows, k, 42).unwrap();
            assert_eq!(
                batch
                    .schema()
                    .field_with_name("gradient")
                    .unwrap()
                    .data_type(),
                &DataType::FixedSizeList(
                    Arc::new(Field::new_list_field(DataType::Float32, false)),
                    k as i32
                )
            );
            crate::tokens::put_table_file(
                &store,
                GRADIENTS_TABLE,
                &batch,
                "created_at",
                &gradient_file(id, generation),
            )
            .await
            .unwrap();
            // A wrong length is refused, not written.
            let mut bad = rows.clone();
            bad[1].3.pop();
            assert!(gradient_batch(&row, &docs, &bad, k, 42).is_err());
        }
        let got = read_index(&store, "a-lora-2", "0xbbbb02").await.unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[1].gradient, vec![10.0, 11.0, 12.0, 13.0, 14.0]);
        assert_eq!(got[1].contributor, "0x02");
        let got = read_index(&store, "a-lora-1", "0xaaaa01").await.unwrap();
        assert_eq!(got[0].gradient, vec![0.0, 1.0, 2.0]);
        let got = read_index(&store, "a-lora-1", "0xaaaa03").await.unwrap();
        assert_eq!(got[0].gradient, vec![0.0, 1.0, 2.0, 3.0]);
        assert_eq!(
            gradient_file("a-lora-1", "0xaaaa03"),
            "a-lora-1.aaaa03.parquet"
        );
    }

    #[test]
    fn score_options_are_checked() {
        assert!(ScoreOptions::default().check().is_ok());
        let bad = ScoreOptions {
            method: "shapley".into(),
            ..Default::default()
        };
        assert!(bad.check().unwrap_err().contains("tracin, cosine, datainf"));
        let bad = ScoreOptions {
            threshold: 1.5,
            ..Default::default()
        };
        assert!(bad.check().is_err());
    }
}

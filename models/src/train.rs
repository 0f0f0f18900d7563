//! Training a base model from scratch: seeded windows of a Datanet's token stream, AdamW with
//! linear warm-up and cosine decay, global gradient-norm clipping, validation perplexity against
//! a unigram model of the same Datanet on the same tokens.

use std::time::Instant;

use candle_core::{Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::lora::{Adapter, LoraConfig};
use crate::model::{init_seeded, ModelConfig, Rows, Transformer};

/// How to train (what `train:` in a config file sets).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    #[serde(default = "steps")]
    pub steps: usize,
    #[serde(default = "batch_size")]
    pub batch_size: usize,
    /// Tokens per training window.
    #[serde(default = "seq_len")]
    pub seq_len: usize,
    /// Peak learning rate, reached after `warmup_steps`, then cosine-decayed to
    /// `min_learning_rate` at the last step.
    #[serde(default = "learning_rate")]
    pub learning_rate: f64,
    #[serde(default = "min_learning_rate")]
    pub min_learning_rate: f64,
    #[serde(default = "warmup_steps")]
    pub warmup_steps: usize,
    #[serde(default = "weight_decay")]
    pub weight_decay: f64,
    /// Global gradient-norm clip.
    #[serde(default = "grad_clip")]
    pub grad_clip: f64,
    #[serde(default = "seed")]
    pub seed: u64,
    /// Share of contributions held out for validation (by content hash).
    #[serde(default = "val_fraction")]
    pub val_fraction: f64,
    /// Validation windows (at most) for the perplexity.
    #[serde(default = "eval_windows")]
    pub eval_windows: usize,
    /// Snapshots of the trained parameters kept at evenly spaced steps (the last at the final
    /// step) with their learning rates, for TracIn over checkpoints; 0 keeps none.
    #[serde(default)]
    pub checkpoints: usize,
}

fn steps() -> usize {
    300
}
fn batch_size() -> usize {
    16
}
fn seq_len() -> usize {
    64
}
fn learning_rate() -> f64 {
    3e-3
}
fn min_learning_rate() -> f64 {
    3e-4
}
fn warmup_steps() -> usize {
    20
}
fn weight_decay() -> f64 {
    0.01
}
fn grad_clip() -> f64 {
    1.0
}
fn seed() -> u64 {
    7
}
fn val_fraction() -> f64 {
    0.1
}
fn eval_windows() -> usize {
    256
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            steps: steps(),
            batch_size: batch_size(),
            seq_len: seq_len(),
            learning_rate: learning_rate(),
            min_learning_rate: min_learning_rate(),
            warmup_steps: warmup_steps(),
            weight_decay: weight_decay(),
            grad_clip: grad_clip(),
            seed: seed(),
            val_fraction: val_fraction(),
            eval_windows: eval_windows(),
            checkpoints: 0,
        }
    }
}

impl TrainConfig {
    /// The learning rate of `step` (0-based): linear warm-up, then cosine decay.
    pub fn lr_at(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return self.learning_rate * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let span = self.steps.saturating_sub(self.warmup_steps).max(1) as f64;
        let t = ((step - self.warmup_steps) as f64 / span).min(1.0);
        self.min_learning_rate
            + 0.5
                * (self.learning_rate - self.min_learning_rate)
                * (1.0 + (std::f64::consts::PI * t).cos())
    }
}

/// A Datanet's documents as one token stream each for training and validation (documents
/// joined by the end-of-text token), and which contributions went where.
#[derive(Debug, Clone, Default)]
pub struct Corpus {
    pub train: Vec<u32>,
    pub val: Vec<u32>,
    /// Content hashes of the training and the validation documents, in stream order.
    pub train_docs: Vec<String>,
    pub val_docs: Vec<String>,
}

impl Corpus {
    /// Splits `(content hash, tokens)` documents: a document is held out when the FNV-1a hash
    /// of its content hash falls in the first `val_fraction` of the range.
    pub fn split(docs: &[(String, Vec<u16>)], eos: u32, val_fraction: f64) -> Corpus {
        let mut c = Corpus::default();
        for (hash, tokens) in docs {
            let h = hash.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
            });
            let held_out = (h % 10_000) < (val_fraction * 10_000.0) as u64;
            let (stream, names) = if held_out {
                (&mut c.val, &mut c.val_docs)
            } else {
                (&mut c.train, &mut c.train_docs)
            };
            stream.extend(tokens.iter().map(|&t| t as u32));
            stream.push(eos);
            names.push(hash.clone());
        }
        c
    }
}

/// What a training run measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainReport {
    pub steps: usize,
    pub tokens_seen: u64,
    /// Mean training loss of the last 10 steps.
    pub train_loss: f64,
    pub val_loss: f64,
    pub val_perplexity: f64,
    /// A unigram model of the training stream (add-one smoothed) on the same validation tokens.
    pub unigram_perplexity: f64,
    /// For an adapter: its base model's perplexity on the same validation tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_perplexity: Option<f64>,
    pub val_tokens: usize,
    /// (step, loss, learning rate) of every step.
    pub curve: Vec<(usize, f64, f64)>,
    pub seconds: f64,
    pub tokens_per_second: f64,
    /// (step, learning rate) of each snapshot in `snapshots`.
    #[serde(default)]
    pub checkpoints: Vec<(usize, f64)>,
    /// The trained parameters at each checkpoint (name, copy), in `checkpoints` order.
    #[serde(skip)]
    pub snapshots: Vec<Vec<(String, Tensor)>>,
}

/// Progress of one step: (step, steps, loss, tokens per second, seconds left).
pub type Progress<'a> = &'a mut dyn FnMut(usize, usize, f64, f64, f64);

fn err(e: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::msg(e.to_string())
}

/// Trains a model of `cfg` from scratch on `corpus`; returns its parameters and the report.
pub fn train(
    cfg: &ModelConfig,
    tc: &TrainConfig,
    corpus: &Corpus,
    device: &Device,
    progress: Progress<'_>,
) -> candle_core::Result<(VarMap, TrainReport)> {
    check_sizes(cfg, tc, corpus)?;
    let varmap = VarMap::new();
    init_seeded(&varmap, cfg, tc.seed, device)?;
    let model = Transformer::new(
        cfg,
        VarBuilder::from_varmap(&varmap, candle_core::DType::F32, device),
    )?;
    let loss = |w: &Tensor| model.loss(w);
    let report = fit(
        cfg,
        named_vars(&varmap),
        tc,
        corpus,
        device,
        progress,
        &loss,
    )?;
    Ok((varmap, report))
}

/// Trains a LoRA adapter of the frozen `base` (its tensors are not variables, so no gradient
/// reaches them) on `corpus`; returns the adapter's PEFT-named variables and the report, with
/// the base model's perplexity on the same validation tokens.
pub fn train_adapter(
    base: &Transformer,
    lora: &LoraConfig,
    tc: &TrainConfig,
    corpus: &Corpus,
    device: &Device,
    progress: Progress<'_>,
) -> candle_core::Result<(VarMap, TrainReport)> {
    check_sizes(&base.cfg, tc, corpus)?;
    let varmap = VarMap::new();
    let adapter = Adapter::init(base, lora, tc.seed, &varmap, device)?;
    let loss = |w: &Tensor| base.loss_rows(w, &Rows::all(&adapter));
    let mut report = fit(
        &base.cfg,
        named_vars(&varmap),
        tc,
        corpus,
        device,
        progress,
        &loss,
    )?;
    let (base_loss, _, _) = evaluate(&|w| base.loss(w), &base.cfg, tc, corpus, device)?;
    report.base_perplexity = Some(base_loss.exp());
    Ok((varmap, report))
}

/// The variables of `varmap` by name, in name order (a fixed order for the optimiser).
fn named_vars(varmap: &VarMap) -> Vec<(String, candle_core::Var)> {
    let data = varmap.data().lock().expect("varmap");
    let mut v: Vec<(String, candle_core::Var)> =
        data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn check_sizes(cfg: &ModelConfig, tc: &TrainConfig, corpus: &Corpus) -> candle_core::Result<()> {
    if tc.steps == 0 || tc.batch_size == 0 || tc.seq_len == 0 {
        return Err(err("steps, batch_size and seq_len must be at least 1"));
    }
    if tc.seq_len > cfg.max_seq_len {
        return Err(err(format!(
            "seq_len {} is longer than max_seq_len {}",
            tc.seq_len, cfg.max_seq_len
        )));
    }
    if corpus.train.len() < tc.seq_len + 2 {
        return Err(err(format!(
            "{} training tokens is not enough for one window of {}",
            corpus.train.len(),
            tc.seq_len
        )));
    }
    if corpus.val.len() < tc.seq_len + 1 {
        return Err(err(format!(
            "{} validation tokens is not enough for one window of {} (more data, or a larger val_fraction)",
            corpus.val.len(),
            tc.seq_len
        )));
    }
    Ok(())
}

/// The training batches of `tc` over `corpus`, one per step: `batch_size` windows of
/// `seq_len + 1` tokens at seeded random offsets, flattened row by row. What [`train`] and
/// [`train_adapter`] train on, and what the PyTorch side of the training benchmark replays.
pub fn batches<'a>(tc: &'a TrainConfig, corpus: &'a Corpus) -> impl Iterator<Item = Vec<u32>> + 'a {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(tc.seed ^ 0x5eed);
    let window = tc.seq_len + 1;
    (0..tc.steps).map(move |_| {
        let mut batch = Vec::with_capacity(tc.batch_size * window);
        for _ in 0..tc.batch_size {
            let start = rng.gen_range(0..corpus.train.len() - window);
            batch.extend_from_slice(&corpus.train[start..start + window]);
        }
        batch
    })
}

/// AdamW (decoupled weight decay, bias-corrected moments: `torch.optim.AdamW`'s update) after
/// clipping the global gradient norm to `grad_clip`. On the CPU the whole update runs in one
/// pass over each variable's values, on a CUDA GPU in one kernel per variable; elsewhere as
/// candle's `AdamW` on tensors.
enum Optimiser {
    Cpu {
        vars: Vec<candle_core::Var>,
        moments: Vec<(Vec<f32>, Vec<f32>)>,
        t: i32,
        weight_decay: f64,
    },
    /// f32 variables on a CUDA GPU: fused kernels ([`crate::cuda::AdamW`]).
    #[cfg(feature = "cuda")]
    Cuda {
        vars: Vec<candle_core::Var>,
        adamw: crate::cuda::AdamW,
        t: i32,
        weight_decay: f64,
    },
    Tensors {
        vars: Vec<candle_core::Var>,
        adamw: AdamW,
    },
}

const BETA1: f64 = 0.9;
const BETA2: f64 = 0.999;
const EPS: f64 = 1e-8;

/// The f32 scalars of AdamW's step `t` (from 1) after clipping the global gradient norm `norm`
/// to `clip`, for the loop on the CPU and the kernel on a GPU alike: each value becomes
/// `p·decay − lr·(m·c1)/(√(v·c2) + eps)` with `m`, `v` the moments of `g·g_scale`.
#[derive(Clone, Copy)]
pub(crate) struct AdamWScalars {
    pub g_scale: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub c1: f32,
    pub c2: f32,
    pub lr: f32,
    pub decay: f32,
    pub eps: f32,
}

impl AdamWScalars {
    fn at(t: i32, lr: f64, weight_decay: f64, norm: f64, clip: f64) -> Self {
        Self {
            g_scale: if norm > clip {
                (clip / norm) as f32
            } else {
                1.0
            },
            beta1: BETA1 as f32,
            beta2: BETA2 as f32,
            c1: (1.0 / (1.0 - BETA1.powi(t))) as f32,
            c2: (1.0 / (1.0 - BETA2.powi(t))) as f32,
            lr: lr as f32,
            decay: (1.0 - lr * weight_decay) as f32,
            eps: EPS as f32,
        }
    }
}

impl Optimiser {
    fn new(vars: Vec<candle_core::Var>, tc: &TrainConfig) -> candle_core::Result<Self> {
        if vars
            .iter()
            .all(|v| v.device().is_cpu() && v.dtype() == candle_core::DType::F32)
        {
            let moments = vars
                .iter()
                .map(|v| (vec![0f32; v.elem_count()], vec![0f32; v.elem_count()]))
                .collect();
            return Ok(Self::Cpu {
                vars,
                moments,
                t: 0,
                weight_decay: tc.weight_decay,
            });
        }
        #[cfg(feature = "cuda")]
        if let Some(adamw) = crate::ops::cuda_kernels()
            .then(|| crate::cuda::AdamW::new(&vars))
            .transpose()?
            .flatten()
        {
            return Ok(Self::Cuda {
                vars,
                adamw,
                t: 0,
                weight_decay: tc.weight_decay,
            });
        }
        let adamw = AdamW::new(
            vars.clone(),
            ParamsAdamW {
                lr: tc.lr_at(0),
                beta1: BETA1,
                beta2: BETA2,
                eps: EPS,
                weight_decay: tc.weight_decay,
            },
        )?;
        Ok(Self::Tensors { vars, adamw })
    }

    fn step(
        &mut self,
        mut grads: candle_core::backprop::GradStore,
        lr: f64,
        clip: f64,
    ) -> candle_core::Result<()> {
        match self {
            Self::Cpu {
                vars,
                moments,
                t,
                weight_decay,
            } => {
                let gs: Vec<Option<Vec<f32>>> = vars
                    .iter()
                    .map(|v| {
                        grads
                            .get(v.as_tensor())
                            .map(|g| g.flatten_all()?.to_vec1::<f32>())
                            .transpose()
                    })
                    .collect::<candle_core::Result<_>>()?;
                let norm = gs
                    .iter()
                    .flatten()
                    .flat_map(|g| g.iter())
                    .map(|&x| x as f64 * x as f64)
                    .sum::<f64>()
                    .sqrt();
                *t += 1;
                let s = AdamWScalars::at(*t, lr, *weight_decay, norm, clip);
                let (b1, b2) = (s.beta1, s.beta2);
                for ((var, g), (m, v)) in vars.iter().zip(&gs).zip(moments.iter_mut()) {
                    let Some(g) = g else { continue };
                    let mut theta = var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
                    for (((p, &g), m), v) in
                        theta.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut())
                    {
                        let g = g * s.g_scale;
                        *m = b1 * *m + (1.0 - b1) * g;
                        *v = b2 * *v + (1.0 - b2) * g * g;
                        *p = *p * s.decay - s.lr * (*m * s.c1) / ((*v * s.c2).sqrt() + s.eps);
                    }
                    var.set(&Tensor::from_vec(theta, var.shape(), var.device())?)?;
                }
                Ok(())
            }
            #[cfg(feature = "cuda")]
            Self::Cuda {
                vars,
                adamw,
                t,
                weight_decay,
            } => {
                let gs = vars
                    .iter()
                    .map(|v| grads.get(v.as_tensor()).map(Tensor::contiguous).transpose())
                    .collect::<candle_core::Result<Vec<_>>>()?;
                let norm = adamw.norm(&gs)?;
                *t += 1;
                adamw.update(
                    vars,
                    &gs,
                    AdamWScalars::at(*t, lr, *weight_decay, norm, clip),
                )
            }
            Self::Tensors { vars, adamw } => {
                // One read back from the device for the global norm, not one per variable.
                let sums = vars
                    .iter()
                    .filter_map(|v| grads.get(v.as_tensor()))
                    .map(|g| g.sqr()?.sum_all())
                    .collect::<candle_core::Result<Vec<_>>>()?;
                let norm = if sums.is_empty() {
                    0.0
                } else {
                    (Tensor::stack(&sums, 0)?.sum_all()?.to_scalar::<f32>()? as f64).sqrt()
                };
                if norm > clip {
                    for v in vars.iter() {
                        if let Some(g) = grads.get(v.as_tensor()) {
                            let g = (g * (clip / norm))?;
                            grads.insert(v.as_tensor(), g);
                        }
                    }
                }
                adamw.set_learning_rate(lr);
                adamw.step(&grads)
            }
        }
    }
}

/// A batch's mean loss as a graph (`[batch, time + 1]` windows in).
type LossFn<'a> = dyn Fn(&Tensor) -> candle_core::Result<Tensor> + Sync + 'a;

/// Micro-batches of a CPU step. candle runs element-wise ops and reductions on one thread
/// (`ledgerflow::tune_threads` turns its spinning pool off), so a step runs as this many
/// micro-batches side by side on rayon's threads, their gradients averaged — a fixed number,
/// so that the result does not depend on the machine's cores (CPU training stays
/// deterministic for a seed).
const MICRO_BATCHES: usize = 4;

/// The batch's mean loss and the gradients of `vars`: in [`MICRO_BATCHES`] equal parts on
/// the CPU (the mean of the parts' means is the batch mean: every window has the same length),
/// in one pass elsewhere.
fn loss_and_grads(
    windows: &Tensor,
    vars: &[candle_core::Var],
    device: &Device,
    loss_of: &LossFn<'_>,
) -> candle_core::Result<(f64, candle_core::backprop::GradStore)> {
    use rayon::prelude::*;
    let n = windows.dim(0)?;
    if !device.is_cpu() || n < MICRO_BATCHES || n % MICRO_BATCHES != 0 {
        let loss = loss_of(windows)?;
        let grads = loss.backward()?;
        return Ok((loss.to_scalar::<f32>()? as f64, grads));
    }
    let rows = n / MICRO_BATCHES;
    let parts = (0..MICRO_BATCHES)
        .into_par_iter()
        .map(|i| {
            let loss = loss_of(&windows.narrow(0, i * rows, rows)?)?;
            let grads = loss.backward()?;
            Ok((loss.to_scalar::<f32>()? as f64, grads))
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    let mut parts = parts.into_iter();
    let (mut total, mut grads) = parts.next().expect("at least one micro-batch");
    let rest: Vec<_> = parts.collect();
    let scale = 1.0 / MICRO_BATCHES as f64;
    for v in vars {
        let mut sum = grads.get(v.as_tensor()).cloned();
        for (_, g) in &rest {
            if let Some(g) = g.get(v.as_tensor()) {
                sum = Some(match sum {
                    Some(s) => (s + g)?,
                    None => g.clone(),
                });
            }
        }
        if let Some(s) = sum {
            grads.insert(v.as_tensor(), (s * scale)?);
        }
    }
    total += rest.iter().map(|(l, _)| l).sum::<f64>();
    Ok((total * scale, grads))
}

/// The training loop shared by base models and adapters: seeded random windows, AdamW on
/// `vars`, warm-up + cosine, global-norm clipping; then the validation report.
fn fit(
    cfg: &ModelConfig,
    named: Vec<(String, candle_core::Var)>,
    tc: &TrainConfig,
    corpus: &Corpus,
    device: &Device,
    progress: Progress<'_>,
    loss_of: &LossFn<'_>,
) -> candle_core::Result<TrainReport> {
    let (names, vars): (Vec<String>, Vec<candle_core::Var>) = named.into_iter().unzip();
    let mut opt = Optimiser::new(vars.clone(), tc)?;
    let window = tc.seq_len + 1;
    let started = Instant::now();
    let mut curve = Vec::with_capacity(tc.steps);
    let (mut checkpoints, mut snapshots) = (Vec::new(), Vec::new());
    for (step, batch) in batches(tc, corpus).enumerate() {
        let windows = Tensor::from_vec(batch, (tc.batch_size, window), device)?;
        let (l, grads) = loss_and_grads(&windows, &vars, device, loss_of)?;
        let lr = tc.lr_at(step);
        opt.step(grads, lr, tc.grad_clip)?;
        curve.push((step, l, lr));
        let k = tc.checkpoints.min(tc.steps);
        if k > 0 && (1..=k).any(|c| c * tc.steps / k == step + 1) {
            checkpoints.push((step + 1, lr));
            snapshots.push(
                names
                    .iter()
                    .zip(&vars)
                    .map(|(n, v)| Ok((n.clone(), v.as_tensor().copy()?)))
                    .collect::<candle_core::Result<Vec<_>>>()?,
            );
        }
        let secs = started.elapsed().as_secs_f64();
        let tps = ((step + 1) * tc.batch_size * tc.seq_len) as f64 / secs.max(1e-9);
        let left = secs / (step + 1) as f64 * (tc.steps - step - 1) as f64;
        progress(step + 1, tc.steps, l, tps, left);
    }
    let seconds = started.elapsed().as_secs_f64();
    let (val_loss, val_tokens, unigram) = evaluate(loss_of, cfg, tc, corpus, device)?;
    let tail = curve.len().clamp(1, 10);
    let train_loss = curve.iter().rev().take(tail).map(|c| c.1).sum::<f64>() / tail as f64;
    let tokens_seen = (tc.steps * tc.batch_size * tc.seq_len) as u64;
    Ok(TrainReport {
        steps: tc.steps,
        tokens_seen,
        train_loss,
        val_loss,
        val_perplexity: val_loss.exp(),
        unigram_perplexity: unigram,
        base_perplexity: None,
        val_tokens,
        curve,
        seconds,
        tokens_per_second: tokens_seen as f64 / seconds.max(1e-9),
        checkpoints,
        snapshots,
    })
}

/// Validation loss over consecutive windows of the held-out stream, and the unigram
/// perplexity of the training stream's token counts on exactly the tokens predicted.
fn evaluate(
    loss_of: &dyn Fn(&Tensor) -> candle_core::Result<Tensor>,
    cfg: &ModelConfig,
    tc: &TrainConfig,
    corpus: &Corpus,
    device: &Device,
) -> candle_core::Result<(f64, usize, f64)> {
    let window = tc.seq_len + 1;
    let n = ((corpus.val.len() - 1) / tc.seq_len)
        .min(tc.eval_windows)
        .max(1);
    let mut counts = vec![1u64; cfg.vocab_size];
    for &t in &corpus.train {
        counts[t as usize] += 1;
    }
    let total: u64 = counts.iter().sum();
    let (mut loss_sum, mut tokens, mut unigram_nll) = (0f64, 0usize, 0f64);
    for chunk in (0..n).collect::<Vec<_>>().chunks(tc.batch_size) {
        let mut batch = Vec::with_capacity(chunk.len() * window);
        for &w in chunk {
            let s = w * tc.seq_len;
            batch.extend_from_slice(&corpus.val[s..s + window]);
        }
        for w in batch.chunks(window) {
            for &t in &w[1..] {
                unigram_nll -= (counts[t as usize] as f64 / total as f64).ln();
            }
        }
        let windows = Tensor::from_vec(batch, (chunk.len(), window), device)?;
        let l = loss_of(&windows)?.to_scalar::<f32>()? as f64;
        let k = chunk.len() * tc.seq_len;
        loss_sum += l * k as f64;
        tokens += k;
    }
    Ok((
        loss_sum / tokens as f64,
        tokens,
        (unigram_nll / tokens as f64).exp(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The one-pass AdamW of the test device (the CPU's loop, or the CUDA kernels), with
    /// clipping, equals candle's tensor AdamW over several steps.
    #[test]
    fn fused_adamw_equals_candle_adamw() {
        let dev = crate::test_device();
        let tc = TrainConfig {
            weight_decay: 0.05,
            ..Default::default()
        };
        let init = Tensor::randn(0f32, 1.0, (3, 5), &dev).unwrap();
        let make = || candle_core::Var::from_tensor(&init.copy().unwrap()).unwrap();
        let (a, b) = (make(), make());
        let mut fused = Optimiser::new(vec![a.clone()], &tc).unwrap();
        let mut tensors = Optimiser::Tensors {
            vars: vec![b.clone()],
            adamw: AdamW::new(
                vec![b.clone()],
                ParamsAdamW {
                    lr: 0.01,
                    beta1: BETA1,
                    beta2: BETA2,
                    eps: EPS,
                    weight_decay: tc.weight_decay,
                },
            )
            .unwrap(),
        };
        assert!(!matches!(fused, Optimiser::Tensors { .. }));
        for step in 0..5 {
            // A loss whose gradient norm is above the clip on some steps and below on others.
            let w = Tensor::full(if step % 2 == 0 { 3f32 } else { 0.01 }, (3, 5), &dev).unwrap();
            let loss = |v: &candle_core::Var| {
                (v.as_tensor() * &w)
                    .unwrap()
                    .sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap()
            };
            fused
                .step(loss(&a).backward().unwrap(), 0.01 * (step + 1) as f64, 1.0)
                .unwrap();
            tensors
                .step(loss(&b).backward().unwrap(), 0.01 * (step + 1) as f64, 1.0)
                .unwrap();
        }
        let (x, y) = (
            a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            b.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        for (x, y) in x.iter().zip(&y) {
            assert!((x - y).abs() < 1e-5, "{x} against {y}");
        }
        assert_ne!(x, init.flatten_all().unwrap().to_vec1::<f32>().unwrap());
    }

    /// A stream with structure a model can learn and a unigram cannot: each document cycles
    /// through a fixed sequence from a random start.
    fn corpus() -> (ModelConfig, Corpus) {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let docs: Vec<(String, Vec<u16>)> = (0..200)
            .map(|i| {
                let start: u16 = rng.gen_range(0..30);
                let tokens = (0..40).map(|k| 1 + (start + k * 7) % 31).collect();
                (format!("0x{i:064x}"), tokens)
            })
            .collect();
        let cfg = ModelConfig {
            vocab_size: 32,
            d_model: 32,
            n_layers: 1,
            n_heads: 2,
            d_ff: 64,
            max_seq_len: 32,
            ..Default::default()
        };
        (cfg, Corpus::split(&docs, 0, 0.15))
    }

    #[test]
    fn loss_falls_and_beats_a_unigram_model_deterministically() {
        let (cfg, corpus) = corpus();
        let tc = TrainConfig {
            steps: 60,
            batch_size: 8,
            seq_len: 16,
            warmup_steps: 5,
            learning_rate: 1e-2,
            eval_windows: 32,
            ..Default::default()
        };
        let mut seen = 0;
        let (_, r) = train(
            &cfg,
            &tc,
            &corpus,
            &crate::test_device(),
            &mut |s, _, _, _, _| seen = s,
        )
        .unwrap();
        assert_eq!(seen, 60);
        let first = r.curve[..5].iter().map(|c| c.1).sum::<f64>() / 5.0;
        assert!(r.train_loss < first * 0.5, "{first} → {}", r.train_loss);
        assert!(
            r.val_perplexity < r.unigram_perplexity / 3.0,
            "{} vs unigram {}",
            r.val_perplexity,
            r.unigram_perplexity
        );
        // The same seed, the same run.
        let (_, again) = train(
            &cfg,
            &tc,
            &corpus,
            &crate::test_device(),
            &mut |_, _, _, _, _| {},
        )
        .unwrap();
        assert_eq!(
            r.curve.iter().map(|c| c.1).collect::<Vec<_>>(),
            again.curve.iter().map(|c| c.1).collect::<Vec<_>>()
        );
    }

    #[test]
    fn the_schedule_warms_up_then_decays() {
        let tc = TrainConfig {
            steps: 100,
            warmup_steps: 10,
            learning_rate: 1.0,
            min_learning_rate: 0.1,
            ..Default::default()
        };
        assert!((tc.lr_at(0) - 0.1).abs() < 1e-12);
        assert!((tc.lr_at(9) - 1.0).abs() < 1e-12);
        assert!((tc.lr_at(10) - 1.0).abs() < 1e-12);
        assert!((tc.lr_at(55) - 0.55).abs() < 1e-9);
        assert!((tc.lr_at(100) - 0.1).abs() < 1e-12);
    }

    /// The composed rotary embedding and RMSNorm have gradients that match finite differences.
    #[test]
    fn gradients_match_finite_differences() {
        let cfg = ModelConfig {
            vocab_size: 11,
            d_model: 8,
            n_layers: 1,
            n_heads: 2,
            d_ff: 12,
            max_seq_len: 8,
            ..Default::default()
        };
        let device = crate::test_device();
        let varmap = VarMap::new();
        init_seeded(&varmap, &cfg, 3, &device).unwrap();
        let model = Transformer::new(
            &cfg,
            VarBuilder::from_varmap(&varmap, candle_core::DType::F32, &device),
        )
        .unwrap();
        let windows =
            Tensor::from_vec(vec![1u32, 4, 2, 9, 3, 7, 5, 10, 0, 6], (2, 5), &device).unwrap();
        let loss = model.loss(&windows).unwrap();
        let grads = loss.backward().unwrap();
        let data = varmap.data().lock().unwrap();
        for name in [
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.0.input_layernorm.weight",
        ] {
            let var = data.get(name).unwrap();
            let g = grads
                .get(var.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let base = var
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            for i in [0usize, 3, 5] {
                let eps = 1e-2f32;
                let mut plus = base.clone();
                plus[i] += eps;
                var.set(&Tensor::from_vec(plus, var.shape(), &device).unwrap())
                    .unwrap();
                let lp = model.loss(&windows).unwrap().to_scalar::<f32>().unwrap();
                let mut minus = base.clone();
                minus[i] -= eps;
                var.set(&Tensor::from_vec(minus, var.shape(), &device).unwrap())
                    .unwrap();
                let lm = model.loss(&windows).unwrap().to_scalar::<f32>().unwrap();
                var.set(&Tensor::from_vec(base.clone(), var.shape(), &device).unwrap())
                    .unwrap();
                let fd = (lp - lm) / (2.0 * eps);
                assert!(
                    (fd - g[i]).abs() < 2e-3 + 0.05 * g[i].abs(),
                    "{name}[{i}]: {fd} vs {}",
                    g[i]
                );
            }
        }
    }
}

//! A decoder-only transformer in candle: token embeddings, pre-norm blocks of causal
//! self-attention with rotary positions and a SwiGLU MLP, RMSNorm, and a language-model head.
//!
//! Parameter names follow the LLaMA layout of Hugging Face checkpoints
//! (`model.layers.0.self_attn.q_proj.weight`, …), so adapters can use PEFT's names. Every
//! operation is composed from differentiable tensor ops (candle's fused rope and rms-norm kernels
//! have no backward pass), so the same code trains and serves, on CPU or under `cuda`.

use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::{Embedding, Linear, VarBuilder, VarMap};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// Sizes of a model (what `train:` in a job file sets).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Tokens of the tokenizer (set from the Datanet's tokenizer when training).
    #[serde(default)]
    pub vocab_size: usize,
    #[serde(default = "d_model")]
    pub d_model: usize,
    #[serde(default = "n_layers")]
    pub n_layers: usize,
    #[serde(default = "n_heads")]
    pub n_heads: usize,
    /// Hidden size of the SwiGLU MLP.
    #[serde(default = "d_ff")]
    pub d_ff: usize,
    /// Longest sequence the rotary tables cover.
    #[serde(default = "max_seq_len")]
    pub max_seq_len: usize,
    #[serde(default = "rope_theta")]
    pub rope_theta: f64,
    #[serde(default = "norm_eps")]
    pub norm_eps: f64,
}

fn d_model() -> usize {
    128
}
fn n_layers() -> usize {
    2
}
fn n_heads() -> usize {
    4
}
fn d_ff() -> usize {
    344
}
fn max_seq_len() -> usize {
    256
}
fn rope_theta() -> f64 {
    10_000.0
}
fn norm_eps() -> f64 {
    1e-5
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            vocab_size: 0,
            d_model: d_model(),
            n_layers: n_layers(),
            n_heads: n_heads(),
            d_ff: d_ff(),
            max_seq_len: max_seq_len(),
            rope_theta: rope_theta(),
            norm_eps: norm_eps(),
        }
    }
}

impl ModelConfig {
    pub fn head_dim(&self) -> usize {
        self.d_model / self.n_heads
    }

    /// Problems with the sizes, if any.
    pub fn check(&self) -> std::result::Result<(), String> {
        if self.vocab_size == 0 {
            return Err("vocab_size must be at least 1".into());
        }
        if self.n_heads == 0 || self.d_model % self.n_heads != 0 {
            return Err(format!(
                "d_model {} must be a multiple of n_heads {}",
                self.d_model, self.n_heads
            ));
        }
        if self.head_dim() % 2 != 0 {
            return Err(format!(
                "the head size {} must be even (rotary positions rotate pairs)",
                self.head_dim()
            ));
        }
        if self.n_layers == 0 || self.d_ff == 0 || self.max_seq_len == 0 {
            return Err("n_layers, d_ff and max_seq_len must be at least 1".into());
        }
        Ok(())
    }

    /// Every parameter's name and shape, in a fixed order.
    pub fn parameters(&self) -> Vec<(String, Vec<usize>)> {
        let (d, f, v) = (self.d_model, self.d_ff, self.vocab_size);
        let mut out = vec![("model.embed_tokens.weight".to_string(), vec![v, d])];
        for i in 0..self.n_layers {
            let p = format!("model.layers.{i}");
            out.push((format!("{p}.input_layernorm.weight"), vec![d]));
            for m in ["q_proj", "k_proj", "v_proj", "o_proj"] {
                out.push((format!("{p}.self_attn.{m}.weight"), vec![d, d]));
            }
            out.push((format!("{p}.post_attention_layernorm.weight"), vec![d]));
            out.push((format!("{p}.mlp.gate_proj.weight"), vec![f, d]));
            out.push((format!("{p}.mlp.up_proj.weight"), vec![f, d]));
            out.push((format!("{p}.mlp.down_proj.weight"), vec![d, f]));
        }
        out.push(("model.norm.weight".to_string(), vec![d]));
        out.push(("lm_head.weight".to_string(), vec![v, d]));
        out
    }
}

/// Fills `varmap` with freshly initialised parameters from `seed` (normal, σ = 0.02; output
/// projections scaled by 1/√(2·layers) as in GPT-2; norms at 1). candle's CPU generator cannot
/// be seeded, so the values come from ChaCha and are the same on every machine.
pub fn init_seeded(varmap: &VarMap, cfg: &ModelConfig, seed: u64, device: &Device) -> Result<()> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut data = varmap.data().lock().expect("varmap");
    for (name, shape) in cfg.parameters() {
        let n: usize = shape.iter().product();
        let t = if name.ends_with("norm.weight") {
            Tensor::ones(shape, DType::F32, device)?
        } else {
            let std = if name.ends_with("o_proj.weight") || name.ends_with("down_proj.weight") {
                0.02 / (2.0 * cfg.n_layers as f64).sqrt()
            } else {
                0.02
            };
            // Box–Muller: two uniforms, one standard normal.
            let values: Vec<f32> = (0..n)
                .map(|_| {
                    let u1: f64 = 1.0 - rng.gen::<f64>();
                    let u2: f64 = rng.gen();
                    ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos() * std) as f32
                })
                .collect();
            Tensor::from_vec(values, shape, device)?
        };
        data.insert(name, candle_core::Var::from_tensor(&t)?);
    }
    Ok(())
}

struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn new(vb: VarBuilder<'_>, d: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: vb.get(d, "weight")?,
            eps,
        })
    }
}

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
        x.broadcast_div(&(ms + self.eps)?.sqrt()?)?
            .broadcast_mul(&self.weight)
    }
}

/// Rotary positions on `x` (`[batch, heads, time, head_dim]`), the halves convention of LLaMA:
/// `x·cos + rotate_half(x)·sin`.
fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?
}

struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    heads: usize,
    head_dim: usize,
}

impl Attention {
    fn forward(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (b, t, c) = x.dims3()?;
        let split = |l: &Linear| -> Result<Tensor> {
            l.forward(x)?
                .reshape((b, t, self.heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = rope(&split(&self.q)?, cos, sin)?;
        let k = rope(&split(&self.k)?, cos, sin)?;
        let v = split(&self.v)?;
        let scores = (q.matmul(&k.t()?)? / (self.head_dim as f64).sqrt())?;
        let att = candle_nn::ops::softmax(&scores.broadcast_add(mask)?, D::Minus1)?;
        let y = att.matmul(&v)?.transpose(1, 2)?.reshape((b, t, c))?;
        self.o.forward(&y)
    }
}

struct Mlp {
    gate: Linear,
    up: Linear,
    down: Linear,
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = (self.gate.forward(x)?.silu()? * self.up.forward(x)?)?;
        self.down.forward(&h)
    }
}

struct Block {
    attn_norm: RmsNorm,
    attn: Attention,
    mlp_norm: RmsNorm,
    mlp: Mlp,
}

/// The model.
pub struct Transformer {
    pub cfg: ModelConfig,
    embed: Embedding,
    blocks: Vec<Block>,
    norm: RmsNorm,
    head: Linear,
    cos: Tensor,
    sin: Tensor,
}

impl Transformer {
    /// The model over the parameters `vb` holds (or creates).
    pub fn new(cfg: &ModelConfig, vb: VarBuilder<'_>) -> Result<Self> {
        cfg.check().map_err(candle_core::Error::msg)?;
        let (d, f) = (cfg.d_model, cfg.d_ff);
        let lin = |vb: VarBuilder<'_>, i: usize, o: usize| candle_nn::linear_no_bias(i, o, vb);
        let mut blocks = Vec::with_capacity(cfg.n_layers);
        for i in 0..cfg.n_layers {
            let vb = vb.pp(format!("model.layers.{i}"));
            let a = vb.pp("self_attn");
            let m = vb.pp("mlp");
            blocks.push(Block {
                attn_norm: RmsNorm::new(vb.pp("input_layernorm"), d, cfg.norm_eps)?,
                attn: Attention {
                    q: lin(a.pp("q_proj"), d, d)?,
                    k: lin(a.pp("k_proj"), d, d)?,
                    v: lin(a.pp("v_proj"), d, d)?,
                    o: lin(a.pp("o_proj"), d, d)?,
                    heads: cfg.n_heads,
                    head_dim: cfg.head_dim(),
                },
                mlp_norm: RmsNorm::new(vb.pp("post_attention_layernorm"), d, cfg.norm_eps)?,
                mlp: Mlp {
                    gate: lin(m.pp("gate_proj"), d, f)?,
                    up: lin(m.pp("up_proj"), d, f)?,
                    down: lin(m.pp("down_proj"), f, d)?,
                },
            });
        }
        let hd = cfg.head_dim();
        let inv: Vec<f32> = (0..hd / 2)
            .map(|i| 1.0 / cfg.rope_theta.powf(2.0 * i as f64 / hd as f64) as f32)
            .collect();
        let inv = Tensor::from_vec(inv, (1, hd / 2), vb.device())?;
        let pos = Tensor::arange(0u32, cfg.max_seq_len as u32, vb.device())?
            .to_dtype(DType::F32)?
            .reshape((cfg.max_seq_len, 1))?;
        let freqs = pos.broadcast_mul(&inv)?;
        let freqs = Tensor::cat(&[&freqs, &freqs], D::Minus1)?;
        Ok(Self {
            cfg: cfg.clone(),
            embed: candle_nn::embedding(cfg.vocab_size, d, vb.pp("model.embed_tokens"))?,
            blocks,
            norm: RmsNorm::new(vb.pp("model.norm"), d, cfg.norm_eps)?,
            head: lin(vb.pp("lm_head"), d, cfg.vocab_size)?,
            cos: freqs.cos()?,
            sin: freqs.sin()?,
        })
    }

    /// Logits `[batch, time, vocab]` of token ids `[batch, time]` (u32).
    pub fn forward(&self, tokens: &Tensor) -> Result<Tensor> {
        let (_, t) = tokens.dims2()?;
        if t > self.cfg.max_seq_len {
            candle_core::bail!(
                "{t} tokens is more than max_seq_len {}",
                self.cfg.max_seq_len
            );
        }
        let cos = self.cos.narrow(0, 0, t)?;
        let sin = self.sin.narrow(0, 0, t)?;
        let mask: Vec<f32> = (0..t * t)
            .map(|k| {
                if k % t > k / t {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect();
        let mask = Tensor::from_vec(mask, (t, t), tokens.device())?;
        let mut x = self.embed.forward(tokens)?;
        for b in &self.blocks {
            let h = b
                .attn
                .forward(&b.attn_norm.forward(&x)?, &cos, &sin, &mask)?;
            x = (x + h)?;
            let h = b.mlp.forward(&b.mlp_norm.forward(&x)?)?;
            x = (x + h)?;
        }
        self.head.forward(&self.norm.forward(&x)?)
    }

    /// Mean next-token cross-entropy of `[batch, time + 1]` windows.
    pub fn loss(&self, windows: &Tensor) -> Result<Tensor> {
        let (b, t1) = windows.dims2()?;
        let input = windows.narrow(1, 0, t1 - 1)?;
        let target = windows.narrow(1, 1, t1 - 1)?;
        let logits = self.forward(&input)?;
        candle_nn::loss::cross_entropy(
            &logits.reshape((b * (t1 - 1), self.cfg.vocab_size))?,
            &target.reshape(b * (t1 - 1))?,
        )
    }
}

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
        crate::ops::rms_norm(x, &self.weight, self.eps)
    }
}

/// A linear projection without bias, with its module path (`model.layers.0.self_attn.q_proj`)
/// so LoRA adapters can find their low-rank pair for it.
struct Proj {
    linear: Linear,
    path: String,
}

impl Proj {
    /// `x·Wᵀ` for the whole batch (one base matmul), plus each adapter's scaled `x·Aᵀ·Bᵀ` on
    /// its rows.
    fn forward(&self, x: &Tensor, rows: &Rows<'_>) -> Result<Tensor> {
        if let (Some(capture), [(adapter, None)]) = (&rows.capture, &rows.groups[..]) {
            if let Some(pair) = adapter.pair(&self.path) {
                let tap =
                    std::sync::Arc::new(std::sync::Mutex::new(crate::ops::LoraTap::default()));
                let fused = crate::ops::lora_linear_tapped(
                    x,
                    &self.linear,
                    &pair.at,
                    &pair.bt,
                    pair.scale,
                    tap.clone(),
                )?;
                if let Some((y, h)) = fused {
                    capture.borrow_mut().push(Captured {
                        path: self.path.clone(),
                        x: x.clone(),
                        h,
                        grad: OutputGrad::Tap(tap),
                    });
                    return Ok(y);
                }
            }
        }
        let mut y = crate::ops::linear(x, &self.linear)?;
        if let Some(per_row) = &rows.per_row {
            #[cfg(feature = "cuda")]
            if let Some(out) = self.gathered_cuda(x, &y, per_row)? {
                return Ok(out);
            }
            if let Some(d) = self.gathered_delta(x, per_row)? {
                y = (y + d)?;
            }
            return Ok(y);
        }
        for (adapter, idx) in &rows.groups {
            let Some(pair) = adapter.pair(&self.path) else {
                continue;
            };
            y = match idx {
                None if rows.capture.is_some() => {
                    // Keep what per-example gradients need: the input, the rank-r activation
                    // and the low-rank output (whose gradient is the layer's output gradient).
                    // candle keeps gradients of variables only: a zero variable added to the
                    // output receives exactly the output's gradient.
                    let h = x.broadcast_matmul(&pair.at)?;
                    let d = (h.broadcast_matmul(&pair.bt)? * pair.scale)?;
                    let probe = candle_core::Var::zeros(d.shape(), d.dtype(), d.device())?;
                    let probe = probe.as_tensor().clone();
                    if let Some(c) = &rows.capture {
                        c.borrow_mut().push(Captured {
                            path: self.path.clone(),
                            x: x.clone(),
                            h: h.clone(),
                            grad: OutputGrad::Probe(probe.clone()),
                        });
                    }
                    ((y + d)? + probe)?
                }
                None => (y + pair.delta(x)?)?,
                Some(idx) => {
                    let d = pair.delta(&x.index_select(idx, 0)?)?;
                    y.index_add(idx, &d, 0)?
                }
            };
        }
        Ok(y)
    }
}

impl Proj {
    /// `y` plus every row's own low-rank product in one CUDA kernel (serving: nothing tracked
    /// for gradients, each pair with its scale folded in); `None` where that does not apply.
    #[cfg(feature = "cuda")]
    fn gathered_cuda(
        &self,
        x: &Tensor,
        y: &Tensor,
        per_row: &[Option<&dyn LowRank>],
    ) -> Result<Option<Tensor>> {
        if !x.device().is_cuda() || !crate::ops::cuda_kernels() || x.track_op() || x.rank() != 3 {
            return Ok(None);
        }
        let mut pairs = Vec::with_capacity(per_row.len());
        for a in per_row {
            match a.and_then(|a| a.pair(&self.path)) {
                Some(p) if p.scale != 1.0 => return Ok(None),
                Some(p) => pairs.push(Some((&p.at, &p.bt))),
                None => pairs.push(None),
            }
        }
        crate::cuda::lora_gathered(x, y, &pairs)
    }

    /// Every row's own low-rank product in two batched matmuls (the BGMV of Punica/S-LoRA):
    /// each row's `Aᵀ` and `scale·Bᵀ` stacked into `[batch, in, r]` and `[batch, r, out]`,
    /// zeros for rows without a pair here, ranks padded to the widest.
    fn gathered_delta(
        &self,
        x: &Tensor,
        per_row: &[Option<&dyn LowRank>],
    ) -> Result<Option<Tensor>> {
        let pairs: Vec<Option<&LoraPair>> = per_row
            .iter()
            .map(|a| a.and_then(|a| a.pair(&self.path)))
            .collect();
        let Some(rank) = pairs.iter().flatten().map(|p| p.rank()).max() else {
            return Ok(None);
        };
        let (out, inp) = self.linear.weight().dims2()?;
        let (mut at, mut bt) = (
            Vec::with_capacity(pairs.len()),
            Vec::with_capacity(pairs.len()),
        );
        for p in &pairs {
            match p {
                Some(p) => {
                    let r = p.rank();
                    let (a, b) = if p.scale == 1.0 {
                        (p.at.clone(), p.bt.clone())
                    } else {
                        (p.at.clone(), (&p.bt * p.scale)?)
                    };
                    if r == rank {
                        at.push(a);
                        bt.push(b);
                    } else {
                        at.push(a.pad_with_zeros(1, 0, rank - r)?);
                        bt.push(b.pad_with_zeros(0, 0, rank - r)?);
                    }
                }
                None => {
                    at.push(Tensor::zeros((inp, rank), x.dtype(), x.device())?);
                    bt.push(Tensor::zeros((rank, out), x.dtype(), x.device())?);
                }
            }
        }
        let at = Tensor::stack(&at, 0)?;
        let bt = Tensor::stack(&bt, 0)?;
        Ok(Some(x.matmul(&at)?.matmul(&bt)?))
    }
}

/// One low-rank pair of an adapter, `ΔW = scale · B·A` (`A` `[rank, in]`, `B` `[out, rank]`),
/// kept as `Aᵀ` `[in, rank]` and `Bᵀ` `[rank, out]` so `x·ΔWᵀ = scale · (x·Aᵀ)·Bᵀ`. While
/// training they are transposed views of the variables (gradients flow, updates show); a served
/// adapter holds them contiguous with the scale folded into `Bᵀ` (`scale` 1).
#[derive(Clone)]
pub struct LoraPair {
    pub at: Tensor,
    pub bt: Tensor,
    pub scale: f64,
}

impl LoraPair {
    /// A pair for serving from PEFT's `A` and `B`.
    pub fn serving(a: &Tensor, b: &Tensor, scale: f64) -> Result<Self> {
        Ok(Self {
            at: a.t()?.contiguous()?,
            bt: (b.t()? * scale)?.contiguous()?,
            scale: 1.0,
        })
    }

    pub fn rank(&self) -> usize {
        self.at.dims()[1]
    }

    fn delta(&self, x: &Tensor) -> Result<Tensor> {
        let d = x.broadcast_matmul(&self.at)?.broadcast_matmul(&self.bt)?;
        if self.scale == 1.0 {
            Ok(d)
        } else {
            d * self.scale
        }
    }
}

/// Low-rank pairs by module path: what an adapter adds to a base model.
pub trait LowRank {
    fn pair(&self, path: &str) -> Option<&LoraPair>;
}

/// Which adapter each row of a batch uses: groups of (adapter, row indices `u32`), `None` for
/// every row. Rows in no group run on the base model alone.
///
/// Or, with `per_row`, each row's adapter (`None`: the base alone): every adapter's product then
/// runs in two batched matmuls over the whole batch whatever the number of adapters.
#[derive(Default)]
pub struct Rows<'a> {
    pub groups: Vec<(&'a dyn LowRank, Option<Tensor>)>,
    pub per_row: Option<Vec<Option<&'a dyn LowRank>>>,
    /// When set (with one adapter on every row), each adapted projection records its
    /// [`Captured`] tensors in forward order.
    pub capture: Option<std::cell::RefCell<Vec<Captured>>>,
}

/// What an adapted projection saw in one forward pass: its input `x` `[batch, time, in]`, the
/// rank-r activation `h = x·Aᵀ` `[batch, time, r]`, and where its output gradient will be.
#[derive(Clone)]
pub struct Captured {
    pub path: String,
    pub x: Tensor,
    pub h: Tensor,
    pub grad: OutputGrad,
}

/// Where a captured projection's output gradient `[batch, time, out]` is found after the
/// backward pass.
#[derive(Clone)]
pub enum OutputGrad {
    /// A zero variable added to the output (candle keeps the gradients of variables only).
    Probe(Tensor),
    /// The fused CPU op's tap (`ops::lora_linear_tapped`), which also keeps `s·δ·B`.
    Tap(std::sync::Arc<std::sync::Mutex<crate::ops::LoraTap>>),
}

impl<'a> Rows<'a> {
    /// The base model alone.
    pub fn base() -> Self {
        Self::default()
    }
    /// One adapter on every row.
    pub fn all(adapter: &'a dyn LowRank) -> Self {
        Self {
            groups: vec![(adapter, None)],
            per_row: None,
            capture: None,
        }
    }
}

struct Attention {
    q: Proj,
    k: Proj,
    v: Proj,
    o: Proj,
    heads: usize,
    head_dim: usize,
}

impl Attention {
    fn forward(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, rows: &Rows<'_>) -> Result<Tensor> {
        let (b, t, c) = x.dims3()?;
        let split = |l: &Proj| -> Result<Tensor> {
            l.forward(x, rows)?
                .reshape((b, t, self.heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = crate::ops::rope(&split(&self.q)?, cos, sin)?;
        let k = crate::ops::rope(&split(&self.k)?, cos, sin)?;
        let v = split(&self.v)?;
        let att =
            crate::ops::causal_softmax(&q.matmul(&k.t()?)?, 1.0 / (self.head_dim as f64).sqrt())?;
        let y = att.matmul(&v)?.transpose(1, 2)?.reshape((b, t, c))?;
        self.o.forward(&y, rows)
    }

    /// Attention of `x` (`[batch, new, d]`) where row `i` continues `caches[i]` from position
    /// `starts[i]`; appends the new keys and values to the caches.
    fn forward_cached(
        &self,
        x: &Tensor,
        tables: (&Tensor, &Tensor),
        starts: &[usize],
        caches: &mut [&mut LayerCache],
        rows: &Rows<'_>,
    ) -> Result<Tensor> {
        let (b, t, c) = x.dims3()?;
        let split = |l: &Proj| -> Result<Tensor> {
            l.forward(x, rows)?
                .reshape((b, t, self.heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let (q, k, v) = (split(&self.q)?, split(&self.k)?, split(&self.v)?);
        let mut out = Vec::with_capacity(b);
        for (i, cache) in caches.iter_mut().enumerate() {
            let cos = tables.0.narrow(0, starts[i], t)?;
            let sin = tables.1.narrow(0, starts[i], t)?;
            let qi = crate::ops::rope(&q.narrow(0, i, 1)?, &cos, &sin)?;
            let ki = crate::ops::rope(&k.narrow(0, i, 1)?, &cos, &sin)?;
            let vi = v.narrow(0, i, 1)?;
            let (ki, vi) = match cache.kv.take() {
                Some((pk, pv)) => (
                    Tensor::cat(&[&pk, &ki], 2)?.contiguous()?,
                    Tensor::cat(&[&pv, &vi], 2)?.contiguous()?,
                ),
                None => (ki.contiguous()?, vi.contiguous()?),
            };
            let mut scores = (qi.matmul(&ki.t()?)? / (self.head_dim as f64).sqrt())?;
            if t > 1 {
                let mask = crate::ops::causal_mask(t, ki.dim(2)?, x.device())?;
                scores = scores.broadcast_add(&mask)?;
            }
            let att = candle_nn::ops::softmax_last_dim(&scores)?;
            out.push(att.matmul(&vi)?);
            cache.kv = Some((ki, vi));
        }
        let y = Tensor::cat(&out, 0)?.transpose(1, 2)?.reshape((b, t, c))?;
        self.o.forward(&y, rows)
    }
}

/// Keys and values of one layer for one sequence (`[1, heads, time, head_dim]`).
#[derive(Default, Clone)]
pub struct LayerCache {
    kv: Option<(Tensor, Tensor)>,
}

/// The key/value cache of one sequence being generated.
#[derive(Default, Clone)]
pub struct KvCache {
    layers: Vec<LayerCache>,
    /// Tokens the cache holds.
    pub len: usize,
}

impl KvCache {
    /// Bytes the cached keys and values take.
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .filter_map(|l| l.kv.as_ref())
            .map(|(k, v)| (k.elem_count() + v.elem_count()) * 4)
            .sum()
    }
}

struct Mlp {
    gate: Proj,
    up: Proj,
    down: Proj,
}

impl Mlp {
    fn forward(&self, x: &Tensor, rows: &Rows<'_>) -> Result<Tensor> {
        let h = crate::ops::swiglu(&self.gate.forward(x, rows)?, &self.up.forward(x, rows)?)?;
        self.down.forward(&h, rows)
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
        let proj = |vb: &VarBuilder<'_>, name: &str, i: usize, o: usize| -> Result<Proj> {
            let vb = vb.pp(name);
            Ok(Proj {
                path: vb.prefix(),
                linear: candle_nn::linear_no_bias(i, o, vb)?,
            })
        };
        let mut blocks = Vec::with_capacity(cfg.n_layers);
        for i in 0..cfg.n_layers {
            let vb = vb.pp(format!("model.layers.{i}"));
            let a = vb.pp("self_attn");
            let m = vb.pp("mlp");
            blocks.push(Block {
                attn_norm: RmsNorm::new(vb.pp("input_layernorm"), d, cfg.norm_eps)?,
                attn: Attention {
                    q: proj(&a, "q_proj", d, d)?,
                    k: proj(&a, "k_proj", d, d)?,
                    v: proj(&a, "v_proj", d, d)?,
                    o: proj(&a, "o_proj", d, d)?,
                    heads: cfg.n_heads,
                    head_dim: cfg.head_dim(),
                },
                mlp_norm: RmsNorm::new(vb.pp("post_attention_layernorm"), d, cfg.norm_eps)?,
                mlp: Mlp {
                    gate: proj(&m, "gate_proj", d, f)?,
                    up: proj(&m, "up_proj", d, f)?,
                    down: proj(&m, "down_proj", f, d)?,
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

    /// Module paths of the projections an adapter may target, with their (in, out) sizes.
    pub fn projections(&self) -> Vec<(String, usize, usize)> {
        let mut out = Vec::new();
        for b in &self.blocks {
            for p in [
                &b.attn.q,
                &b.attn.k,
                &b.attn.v,
                &b.attn.o,
                &b.mlp.gate,
                &b.mlp.up,
                &b.mlp.down,
            ] {
                let (o, i) = p.linear.weight().dims2().unwrap_or((0, 0));
                out.push((p.path.clone(), i, o));
            }
        }
        out
    }

    /// Logits `[batch, time, vocab]` of token ids `[batch, time]` (u32), on the base model.
    pub fn forward(&self, tokens: &Tensor) -> Result<Tensor> {
        self.forward_rows(tokens, &Rows::base())
    }

    /// Logits `[batch, time, vocab]` of token ids `[batch, time]` with the adapters of `rows`.
    pub fn forward_rows(&self, tokens: &Tensor, rows: &Rows<'_>) -> Result<Tensor> {
        let (_, t) = tokens.dims2()?;
        if t > self.cfg.max_seq_len {
            candle_core::bail!(
                "{t} tokens is more than max_seq_len {}",
                self.cfg.max_seq_len
            );
        }
        let cos = self.cos.narrow(0, 0, t)?;
        let sin = self.sin.narrow(0, 0, t)?;
        let mut x = self.embed.forward(tokens)?;
        for b in &self.blocks {
            let h = b
                .attn
                .forward(&b.attn_norm.forward(&x)?, &cos, &sin, rows)?;
            x = (x + h)?;
            let h = b.mlp.forward(&b.mlp_norm.forward(&x)?, rows)?;
            x = (x + h)?;
        }
        crate::ops::linear(&self.norm.forward(&x)?, &self.head)
    }

    /// One step of generation for a batch of sequences: `tokens` `[batch, new]` continue the
    /// sequences whose caches are `caches` (row `i` ↔ `caches[i]`), each with its adapter per
    /// `rows`. Returns the logits of each row's last new token (`[batch, vocab]`) and extends the
    /// caches. The projections and the MLP run once for the whole batch; attention runs per row
    /// over its own cache.
    pub fn forward_cached(
        &self,
        tokens: &Tensor,
        caches: &mut [&mut KvCache],
        rows: &Rows<'_>,
    ) -> Result<Tensor> {
        let (b, t) = tokens.dims2()?;
        if caches.len() != b {
            candle_core::bail!("{} caches for a batch of {b}", caches.len());
        }
        let starts: Vec<usize> = caches.iter().map(|c| c.len).collect();
        if let Some(s) = starts.iter().find(|s| **s + t > self.cfg.max_seq_len) {
            candle_core::bail!(
                "{} tokens is more than max_seq_len {}",
                s + t,
                self.cfg.max_seq_len
            );
        }
        for c in caches.iter_mut() {
            c.layers.resize(self.blocks.len(), LayerCache::default());
        }
        let mut x = self.embed.forward(tokens)?;
        for (l, blk) in self.blocks.iter().enumerate() {
            let mut layer: Vec<&mut LayerCache> =
                caches.iter_mut().map(|c| &mut c.layers[l]).collect();
            let h = blk.attn.forward_cached(
                &blk.attn_norm.forward(&x)?,
                (&self.cos, &self.sin),
                &starts,
                &mut layer,
                rows,
            )?;
            x = (x + h)?;
            let h = blk.mlp.forward(&blk.mlp_norm.forward(&x)?, rows)?;
            x = (x + h)?;
        }
        for c in caches.iter_mut() {
            c.len += t;
        }
        let last = x.narrow(1, t - 1, 1)?.squeeze(1)?;
        self.head.forward(&self.norm.forward(&last)?)
    }

    /// Mean next-token cross-entropy of `[batch, time + 1]` windows.
    pub fn loss(&self, windows: &Tensor) -> Result<Tensor> {
        self.loss_rows(windows, &Rows::base())
    }

    /// [`Transformer::loss`] with the adapters of `rows`.
    pub fn loss_rows(&self, windows: &Tensor, rows: &Rows<'_>) -> Result<Tensor> {
        let (b, t1) = windows.dims2()?;
        let input = windows.narrow(1, 0, t1 - 1)?;
        let target = windows.narrow(1, 1, t1 - 1)?;
        let logits = self.forward_rows(&input, rows)?;
        crate::ops::cross_entropy(
            &logits.reshape((b * (t1 - 1), self.cfg.vocab_size))?,
            &target.reshape(b * (t1 - 1))?,
        )
    }
}

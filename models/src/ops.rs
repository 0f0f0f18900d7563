//! Fused kernels for the training step, each with its backward pass: cross-entropy over
//! logits, RMSNorm, the causal softmax of attention scores, rotary positions and SwiGLU. candle
//! composes these from five to ten element-wise ops, each allocating a tensor the size of its
//! input (for the cross-entropy of a 1,024 × 4,000 batch: 16 MB each, forward and backward);
//! here each is one pass forward and one backward: loops on the CPU, and on a GPU (`cuda`) the
//! kernels of [`crate::cuda`]. Other dtypes and devices run the composed ops.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

fn f32s<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("{what}: expected f32");
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("{what}: expected a contiguous tensor"),
    }
}

/// `eᵛ` for `v ≤ 0` as straight-line code the compiler vectorises (libm's `expf` is a scalar
/// call per element: a tenth of a per-example gradient batch went to it): Cody–Waite reduction
/// to r ∈ [−ln2/2, ln2/2], Cephes' degree-6 polynomial for eʳ (within 2 ulp of `expf` over the
/// range), 2ⁿ by the exponent bits, 0 below e⁻⁸⁷ (and for −∞).
#[inline(always)]
fn exp_nonpositive(v: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // n = round(v·log₂e) by the 1.5·2²³ trick (no `floor`: without SSE4.1 it is a libm call);
    // t's low mantissa bits hold n.
    let t = v * LOG2E + 12_582_912.0;
    let n = t - 12_582_912.0;
    let r = v - n * LN2_HI - n * LN2_LO;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let e = p * r * r + r + 1.0;
    // 2ⁿ from the bits of t (n ≥ −126 where v ≥ −87.33; below, the result is 0).
    let ni = (t.to_bits() as i32).wrapping_sub(0x4B40_0000);
    let bits = (ni.wrapping_add(127) as u32).wrapping_shl(23);
    if v < -87.33 {
        0.0
    } else {
        e * f32::from_bits(bits)
    }
}

/// `o[i] = exp(x[i]·scale − shift)` for `x[i]·scale ≤ shift`, and the sum of the `o[i]` (in
/// eight lanes): the inner loop of the fused softmaxes.
fn exp_shifted_sum(o: &mut [f32], x: &[f32], scale: f32, shift: f32) -> f32 {
    for (o, &x) in o.iter_mut().zip(x) {
        *o = exp_nonpositive(x * scale - shift);
    }
    let mut lanes = [0f32; 8];
    let mut chunks = o.chunks_exact(8);
    for c in &mut chunks {
        for (l, v) in lanes.iter_mut().zip(c) {
            *l += v;
        }
    }
    lanes.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
}

/// Rows per parallel task: about 32 K elements each.
fn rows_per_task(width: usize) -> usize {
    (32 * 1024 / width.max(1)).max(1)
}

/// Whether `t` takes the fused ops: f32 on the CPU, or on a CUDA GPU (built with `cuda`: the
/// kernels of [`crate::cuda`]). Other dtypes and devices compose candle's ops.
fn fused(t: &Tensor) -> bool {
    t.dtype() == candle_core::DType::F32
        && (t.device().is_cpu() || (t.device().is_cuda() && cuda_kernels()))
}

/// Whether the CUDA kernels are in use: built with `cuda`, and not turned off by
/// `LEDGERFLOW_CUDA_KERNELS=0` (candle's composed ops and `AdamW` instead — to measure what the
/// kernels gain, or to rule them out).
pub fn cuda_kernels() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    cfg!(feature = "cuda")
        && *ON.get_or_init(|| std::env::var("LEDGERFLOW_CUDA_KERNELS").map_or(true, |v| v != "0"))
}

/// Mean cross-entropy of `logits` `[n, vocab]` against `targets` `[n]` (u32): the same value
/// and gradient as `candle_nn::loss::cross_entropy`. The forward pass also writes the gradient
/// `(softmax − onehot)/n` (one pass over the logits instead of two), which the backward pass
/// scales. On a GPU the backward pass recomputes it in one kernel instead.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    if !fused(logits) {
        return candle_nn::loss::cross_entropy(logits, targets);
    }
    logits.contiguous()?.apply_op2(
        &targets.contiguous()?,
        CrossEntropy {
            grad: std::sync::Mutex::new(None),
        },
    )
}

struct CrossEntropy {
    /// `(softmax − onehot)/n`, written by the forward pass, taken by the backward pass.
    grad: std::sync::Mutex<Option<(Vec<f32>, Shape)>>,
}

fn targets_of<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [u32]> {
    let CpuStorage::U32(v) = s else {
        candle_core::bail!("cross-entropy: targets must be u32");
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("cross-entropy: targets must be contiguous"),
    }
}

impl CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "ledgerflow-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, vocab) = l1.shape().dims2()?;
        let (x, t) = (f32s(s1, l1, "cross-entropy")?, targets_of(s2, l2)?);
        if t.len() != n {
            candle_core::bail!("cross-entropy: {} targets for {n} rows", t.len());
        }
        if let Some(bad) = t.iter().find(|&&t| t as usize >= vocab) {
            candle_core::bail!("cross-entropy: target {bad} is outside the vocabulary of {vocab}");
        }
        let inv_n = 1.0 / n as f32;
        let mut grad = vec![0f32; x.len()];
        let rows = rows_per_task(vocab);
        let total: f64 = grad
            .par_chunks_mut(vocab * rows)
            .zip(x.par_chunks(vocab * rows))
            .zip(t.par_chunks(rows))
            .map(|((o, x), t)| {
                let mut loss = 0f64;
                for ((o, row), &t) in o.chunks_mut(vocab).zip(x.chunks(vocab)).zip(t) {
                    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let sum = exp_shifted_sum(o, row, 1.0, max);
                    let k = inv_n / sum;
                    o.iter_mut().for_each(|o| *o *= k);
                    o[t as usize] -= inv_n;
                    loss += (max + sum.ln() - row[t as usize]) as f64;
                }
                loss
            })
            .sum();
        *self.grad.lock().expect("cross-entropy gradient") = Some((grad, l1.shape().clone()));
        Ok((
            CpuStorage::F32(vec![(total / n as f64) as f32]),
            Shape::from(()),
        ))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::cross_entropy(s1, l1, s2, l2)
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        if !logits.device().is_cpu() {
            // The GPU recomputes the softmax in one kernel rather than keep a copy of the
            // logits' size, and scales by the loss's gradient where it lies.
            let g = logits.apply_op3_no_bwd(targets, &grad.reshape(1)?, &CrossEntropyGrad)?;
            return Ok((Some(g), None));
        }
        let Some((g, shape)) = self.grad.lock().expect("cross-entropy gradient").take() else {
            candle_core::bail!("cross-entropy: backward pass run twice");
        };
        let g = Tensor::from_vec(g, shape, logits.device())?;
        let scale = grad.to_scalar::<f32>()?;
        Ok((
            Some(if scale == 1.0 { g } else { (g * scale as f64)? }),
            None,
        ))
    }
}

/// `scale · (softmax(logits) − onehot(targets))/n`: the gradient of [`cross_entropy`] on a GPU.
struct CrossEntropyGrad;

impl CustomOp3 for CrossEntropyGrad {
    fn name(&self) -> &'static str {
        "ledgerflow-cross-entropy-grad"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("cross-entropy: the CPU keeps its gradient from the forward pass")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::cross_entropy_grad(s1, l1, s2, l2, s3, l3)
    }
}

/// `x·Wᵀ` for a frozen weight `w` `[out, in]` (not a variable), `x` `[…, in]`: the same
/// product as `candle_nn::Linear`, with a backward pass that gives `x` its gradient and nothing
/// else. candle's matmul backward also computes the gradient of the right-hand side, tracked or
/// not — for a frozen base under a LoRA adapter, the whole base's weight gradients (the LM
/// head's alone is as many FLOPs as its forward product), each in a zero-filled buffer, then
/// dropped. A variable `w`, an `x` without a gradient, or another device takes `Linear`'s path.
pub fn linear(x: &Tensor, layer: &candle_nn::Linear) -> Result<Tensor> {
    use candle_nn::Module;
    let w = layer.weight();
    // CPU only for now: the same op would serve CUDA (its forward is the storage matmul candle's
    // own `matmul` calls), but it has not run on a GPU yet.
    if w.is_variable() || !x.track_op() || layer.bias().is_some() || !x.device().is_cpu() {
        return layer.forward(x);
    }
    let (rows, dims) = as_rows(x)?;
    rows.apply_op2(&w.t()?, FrozenMatmul)?
        .reshape(with_last(&dims, w.dim(0)?))
}

/// `x` `[…, k]` as a contiguous `[m, k]` matrix, and its dims.
fn as_rows(x: &Tensor) -> Result<(Tensor, Vec<usize>)> {
    let dims = x.dims().to_vec();
    let k = *dims.last().unwrap_or(&0);
    Ok((
        x.contiguous()?.reshape((x.elem_count() / k.max(1), k))?,
        dims,
    ))
}

/// `dims` with its last entry replaced by `n`.
fn with_last(dims: &[usize], n: usize) -> Vec<usize> {
    let mut out = dims.to_vec();
    if let Some(l) = out.last_mut() {
        *l = n;
    }
    out
}

/// `x·wt` for `x` `[m, k]` and a frozen `wt` `[k, n]` (a transposed weight): candle's own
/// matmul forward; backward, the gradient of `x` only.
struct FrozenMatmul;

impl FrozenMatmul {
    fn bmnk(l1: &Layout, l2: &Layout) -> Result<(usize, usize, usize, usize)> {
        let (m, k) = l1.shape().dims2()?;
        let (k2, n) = l2.shape().dims2()?;
        if k != k2 {
            candle_core::bail!("frozen matmul: [{m}, {k}] by [{k2}, {n}]");
        }
        Ok((1, m, n, k))
    }
}

impl CustomOp2 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "ledgerflow-frozen-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let bmnk = Self::bmnk(l1, l2)?;
        Ok((s1.matmul(s2, bmnk, l1, l2)?, Shape::from((bmnk.1, bmnk.2))))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        wt: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(grad.matmul(&wt.t()?)?), None))
    }
}

/// What [`lora_linear_tapped`] keeps of one adapted projection for per-example gradients:
/// its rank-r activation `h = x·Aᵀ` `[m, r]` (forward), its output gradient `δ` `[m, out]` and
/// `s·δ·B` `[m, r]` (backward).
#[derive(Default)]
pub struct LoraTap {
    pub h: Option<Tensor>,
    pub delta: Option<Tensor>,
    pub gh: Option<Tensor>,
}

/// `x·Wᵀ + s·(x·Aᵀ)·Bᵀ` for a frozen base weight `w` `[out, in]` and a LoRA pair (`at`
/// `[in, r]`, `bt` `[r, out]`) in one graph node, for per-example gradients: returns the output
/// and the rank-r activation `h` `[…, r]`; the backward pass keeps the output gradient in `tap`,
/// and gives `x` its gradient `δ·W + s·δ·B·A` and nothing else (candle would also compute,
/// zero-fill and sum gradients for `W`, `A`, `B`, `h` and the low-rank product, none of which
/// is wanted here). `None` where it does not apply (not the CPU, not f32, a bias or a variable
/// base weight): the caller then composes the ops.
pub fn lora_linear_tapped(
    x: &Tensor,
    layer: &candle_nn::Linear,
    at: &Tensor,
    bt: &Tensor,
    scale: f64,
    tap: std::sync::Arc<std::sync::Mutex<LoraTap>>,
) -> Result<Option<(Tensor, Tensor)>> {
    let w = layer.weight();
    if !x.device().is_cpu()
        || x.dtype() != candle_core::DType::F32
        || w.is_variable()
        || layer.bias().is_some()
    {
        return Ok(None);
    }
    let (rows, dims) = as_rows(x)?;
    // A one-element variable as third argument puts the op in the graph even where nothing
    // before it is (the first layer under a frozen embedding); its gradient is never asked for.
    let anchor = candle_core::Var::zeros(1, x.dtype(), x.device())?;
    let y = rows.apply_op3(
        &w.t()?,
        anchor.as_tensor(),
        LoraMatmul {
            at: at.clone(),
            bt: bt.clone(),
            scale,
            tap: tap.clone(),
        },
    )?;
    let h = tap.lock().expect("lora tap").h.take();
    let h = h.ok_or_else(|| candle_core::Error::msg("lora tap: no activation"))?;
    Ok(Some((
        y.reshape(with_last(&dims, w.dim(0)?))?,
        h.reshape(with_last(&dims, at.dim(1)?))?,
    )))
}

struct LoraMatmul {
    at: Tensor,
    bt: Tensor,
    scale: f64,
    tap: std::sync::Arc<std::sync::Mutex<LoraTap>>,
}

fn cpu_storage<'a>(s: &'a candle_core::Storage, what: &str) -> Result<&'a CpuStorage> {
    match s {
        candle_core::Storage::Cpu(c) => Ok(c),
        _ => candle_core::bail!("{what}: expected a CPU tensor"),
    }
}

impl CustomOp3 for LoraMatmul {
    fn name(&self) -> &'static str {
        "ledgerflow-lora-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        _anchor: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let bmnk = FrozenMatmul::bmnk(l1, l2)?;
        let (_, m, n, k) = bmnk;
        let base = s1.matmul(s2, bmnk, l1, l2)?;
        let (at_s, at_l) = self.at.storage_and_layout();
        let (bt_s, bt_l) = self.bt.storage_and_layout();
        let (k2, r) = at_l.shape().dims2()?;
        let (r2, n2) = bt_l.shape().dims2()?;
        if (k2, r2, n2) != (k, r, n) {
            candle_core::bail!(
                "lora matmul: A [{k2}, {r}] and B [{r2}, {n2}] for [{m}, {k}] → {n}"
            );
        }
        let h = s1.matmul(cpu_storage(&at_s, "lora A")?, (1, m, r, k), l1, at_l)?;
        let d = h.matmul(
            cpu_storage(&bt_s, "lora B")?,
            (1, m, n, r),
            &Layout::contiguous((m, r)),
            bt_l,
        )?;
        let (CpuStorage::F32(mut out), CpuStorage::F32(d), CpuStorage::F32(h)) = (base, d, h)
        else {
            candle_core::bail!("lora matmul: expected f32");
        };
        // The composed ops' rounding: (h·Bᵀ)·s, then added.
        let s = self.scale as f32;
        out.iter_mut().zip(&d).for_each(|(o, d)| *o += d * s);
        self.tap.lock().expect("lora tap").h =
            Some(Tensor::from_vec(h, (m, r), &candle_core::Device::Cpu)?);
        Ok((CpuStorage::F32(out), Shape::from((m, n))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        wt: &Tensor,
        _anchor: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let gh = (grad.matmul(&self.bt.t()?)? * self.scale)?;
        // The first layer's input (the frozen embedding) needs no gradient.
        let dx = if x.track_op() {
            Some((grad.matmul(&wt.t()?)? + gh.matmul(&self.at.t()?)?)?)
        } else {
            None
        };
        let mut tap = self.tap.lock().expect("lora tap");
        tap.delta = Some(grad.clone());
        tap.gh = Some(gh);
        Ok((dx, None, None))
    }
}

/// The logistic function σ(x) = 1/(1 + e⁻ˣ), from `exp_nonpositive(−|x|)` (no overflow for
/// any x).
#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    let e = exp_nonpositive(-x.abs());
    let d = 1.0 / (1.0 + e);
    if x >= 0.0 {
        d
    } else {
        e * d
    }
}

/// SwiGLU's product `silu(gate)·up` with its backward pass in one op each way (candle's SiLU
/// backward alone is ten allocating ops): `∂gate = g·up·σ(gate)·(1 + gate·(1 − σ(gate)))`,
/// `∂up = g·silu(gate)`. f32 on the CPU or a CUDA GPU; otherwise candle's ops.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if !fused(gate) || up.dtype() != gate.dtype() || gate.dims() != up.dims() {
        return gate.silu()? * up;
    }
    gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)
}

struct SwiGlu;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "ledgerflow-swiglu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (g, u) = (f32s(s1, l1, "swiglu")?, f32s(s2, l2, "swiglu")?);
        let mut out = vec![0f32; g.len()];
        let n = rows_per_task(1) / 4;
        out.par_chunks_mut(n)
            .zip(g.par_chunks(n).zip(u.par_chunks(n)))
            .for_each(|(o, (g, u))| {
                for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
                    *o = g * sigmoid(g) * u;
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::swiglu(s1, l1, s2, l2)
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        #[cfg(feature = "cuda")]
        if gate.device().is_cuda() {
            let (dg, du) = crate::cuda::swiglu_grad(gate, up, &grad)?;
            return Ok((Some(dg), Some(du)));
        }
        let (gs, gl) = gate.storage_and_layout();
        let (us, ul) = up.storage_and_layout();
        let (ds, dl) = grad.storage_and_layout();
        let g = f32s(cpu_storage(&gs, "swiglu")?, gl, "swiglu")?;
        let u = f32s(cpu_storage(&us, "swiglu")?, ul, "swiglu")?;
        let d = f32s(cpu_storage(&ds, "swiglu")?, dl, "swiglu")?;
        let (mut dg, mut du) = (vec![0f32; g.len()], vec![0f32; g.len()]);
        let n = rows_per_task(1) / 4;
        dg.par_chunks_mut(n)
            .zip(du.par_chunks_mut(n))
            .zip(g.par_chunks(n).zip(u.par_chunks(n)).zip(d.par_chunks(n)))
            .for_each(|((dg, du), ((g, u), d))| {
                for ((((dg, du), &g), &u), &d) in dg.iter_mut().zip(du).zip(g).zip(u).zip(d) {
                    let s = sigmoid(g);
                    let silu = g * s;
                    *dg = d * u * (s * (1.0 + g * (1.0 - s)));
                    *du = d * silu;
                }
            });
        let shape = gate.shape().clone();
        Ok((
            Some(Tensor::from_vec(dg, shape.clone(), gate.device())?),
            Some(Tensor::from_vec(du, shape, gate.device())?),
        ))
    }
}

/// RMSNorm over the last dimension, `x / √(mean(x²) + eps) · weight`, with its backward pass.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    if !fused(x) || weight.dtype() != x.dtype() {
        let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
        return x.broadcast_div(&(ms + eps)?.sqrt()?)?.broadcast_mul(weight);
    }
    x.contiguous()?
        .apply_op2(&weight.contiguous()?, RmsNorm { eps: eps as f32 })
}

struct RmsNorm {
    eps: f32,
}

fn inv_rms(row: &[f32], eps: f32) -> f32 {
    let ms = row.iter().map(|x| x * x).sum::<f32>() / row.len() as f32;
    1.0 / (ms + eps).sqrt()
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "ledgerflow-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w) = (f32s(s1, l1, "rms-norm")?, f32s(s2, l2, "rms-norm")?);
        let d = w.len();
        if l1.shape().dims().last() != Some(&d) {
            candle_core::bail!("rms-norm: {:?} against a weight of {d}", l1.shape());
        }
        let mut out = vec![0f32; x.len()];
        let rows = rows_per_task(d);
        out.par_chunks_mut(d * rows)
            .zip(x.par_chunks(d * rows))
            .for_each(|(o, x)| {
                for (o, x) in o.chunks_mut(d).zip(x.chunks(d)) {
                    let r = inv_rms(x, self.eps);
                    for ((o, x), w) in o.iter_mut().zip(x).zip(w) {
                        *o = x * r * w;
                    }
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::rms_norm(s1, l1, s2, l2, self.eps)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let d = w.dim(0)?;
        let rows = x.elem_count() / d;
        let both = x.apply_op3_no_bwd(w, &grad.contiguous()?, &RmsNormGrad { eps: self.eps })?;
        let dx = both.narrow(0, 0, rows)?.reshape(x.shape())?;
        let dw = both.narrow(0, rows, 1)?.reshape(d)?;
        Ok((Some(dx), Some(dw)))
    }
}

/// The gradients of RMSNorm as `[rows + 1, d]`: `dx` row by row, then `dweight`.
/// With `r = 1/√(mean(x²) + eps)` and `g = dy·w`: `dx = r·g − x·r³·Σ(g·x)/d`, `dw = Σ dy·x·r`.
struct RmsNormGrad {
    eps: f32,
}

impl CustomOp3 for RmsNormGrad {
    fn name(&self) -> &'static str {
        "ledgerflow-rms-norm-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w) = (f32s(s1, l1, "rms-norm")?, f32s(s2, l2, "rms-norm")?);
        let dy = f32s(s3, l3, "rms-norm")?;
        let d = w.len();
        let n = x.len() / d;
        let mut out = vec![0f32; x.len() + d];
        let (dx, dw) = out.split_at_mut(x.len());
        let chunk = rows_per_task(d) * d;
        dx.par_chunks_mut(chunk)
            .zip(x.par_chunks(chunk).zip(dy.par_chunks(chunk)))
            .for_each(|(dx, (x, dy))| {
                for (dx, (x, dy)) in dx.chunks_mut(d).zip(x.chunks(d).zip(dy.chunks(d))) {
                    let r = inv_rms(x, self.eps);
                    let gx: f32 = dy.iter().zip(w).zip(x).map(|((g, w), x)| g * w * x).sum();
                    let k = r * r * r * gx / d as f32;
                    for (((dx, &g), &w), &x) in dx.iter_mut().zip(dy).zip(w).zip(x) {
                        *dx = r * g * w - x * k;
                    }
                }
            });
        for (x, dy) in x.chunks(d).zip(dy.chunks(d)) {
            let r = inv_rms(x, self.eps);
            for ((dw, &x), &g) in dw.iter_mut().zip(x).zip(dy) {
                *dw += g * x * r;
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((n + 1, d))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::rms_norm_grad(s1, l1, s2, l2, s3, l3, self.eps)
    }
}

/// The additive causal mask `[t, total]` of `t` new queries after `total − t` cached keys: 0
/// where query `i` may see key `j` (`j ≤ total − t + i`), −∞ elsewhere.
pub fn causal_mask(t: usize, total: usize, device: &candle_core::Device) -> Result<Tensor> {
    let past = total - t;
    let mask: Vec<f32> = (0..t * total)
        .map(|k| {
            if k % total > past + k / total {
                f32::NEG_INFINITY
            } else {
                0.0
            }
        })
        .collect();
    Tensor::from_vec(mask, (t, total), device)
}

/// `softmax(scale · scores)` over the last dimension with a causal mask: `scores` is
/// `[…, t, t]` and query `i` sees keys `0..=i` (the others get probability 0).
pub fn causal_softmax(scores: &Tensor, scale: f64) -> Result<Tensor> {
    let t = scores.dim(D::Minus1)?;
    if !fused(scores) {
        let mask = causal_mask(t, t, scores.device())?.to_dtype(scores.dtype())?;
        let masked = (scores * scale)?.broadcast_add(&mask)?;
        // candle-nn's fused kernel has no backward pass (gradients would not reach the
        // queries and keys): the composed softmax when a gradient may be asked for.
        return if masked.track_op() {
            candle_nn::ops::softmax(&masked, D::Minus1)
        } else {
            candle_nn::ops::softmax_last_dim(&masked)
        };
    }
    if scores.dim(D::Minus2)? != t {
        candle_core::bail!(
            "causal softmax: expected square scores, got {:?}",
            scores.shape()
        );
    }
    scores.contiguous()?.apply_op1(CausalSoftmax {
        scale: scale as f32,
    })
}

struct CausalSoftmax {
    scale: f32,
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "ledgerflow-causal-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32s(s, l, "causal softmax")?;
        let t = l.shape().dims().last().copied().unwrap_or(1);
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(t * t)
            .zip(x.par_chunks(t * t))
            .for_each(|(o, x)| {
                for (i, (o, x)) in o.chunks_mut(t).zip(x.chunks(t)).enumerate() {
                    let (o, x) = (&mut o[..=i], &x[..=i]);
                    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max) * self.scale;
                    let sum = exp_shifted_sum(o, x, self.scale, max);
                    let k = 1.0 / sum;
                    o.iter_mut().for_each(|o| *o *= k);
                }
            });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::causal_softmax(s, l, self.scale)
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let g = res.apply_op2_no_bwd(
            &grad.contiguous()?,
            &CausalSoftmaxGrad { scale: self.scale },
        )?;
        Ok(Some(g))
    }
}

/// `scale · y·(dy − Σ y·dy)` on the causal part of each row.
struct CausalSoftmaxGrad {
    scale: f32,
}

impl CustomOp2 for CausalSoftmaxGrad {
    fn name(&self) -> &'static str {
        "ledgerflow-causal-softmax-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (y, dy) = (
            f32s(s1, l1, "causal softmax")?,
            f32s(s2, l2, "causal softmax")?,
        );
        let t = l1.shape().dims().last().copied().unwrap_or(1);
        let mut out = vec![0f32; y.len()];
        out.par_chunks_mut(t * t)
            .zip(y.par_chunks(t * t).zip(dy.par_chunks(t * t)))
            .for_each(|(o, (y, dy))| {
                for (i, (o, (y, dy))) in o
                    .chunks_mut(t)
                    .zip(y.chunks(t).zip(dy.chunks(t)))
                    .enumerate()
                {
                    let (o, y, dy) = (&mut o[..=i], &y[..=i], &dy[..=i]);
                    let dot: f32 = y.iter().zip(dy).map(|(y, g)| y * g).sum();
                    for ((o, &y), &g) in o.iter_mut().zip(y).zip(dy) {
                        *o = self.scale * y * (g - dot);
                    }
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::causal_softmax_grad(s1, l1, s2, l2, self.scale)
    }
}

/// Rotary positions on `x` `[…, t, head_dim]` (contiguous) with `cos`/`sin` `[t, head_dim]`,
/// LLaMA's halves convention: `x·cos + rotate_half(x)·sin` with `rotate_half(x) = [−x₂, x₁]`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if !fused(x) || cos.dtype() != x.dtype() {
        let half = x.dim(D::Minus1)? / 2;
        let x1 = x.narrow(D::Minus1, 0, half)?;
        let x2 = x.narrow(D::Minus1, half, half)?;
        let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        return x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?;
    }
    x.contiguous()?.apply_op3(
        &cos.contiguous()?,
        &sin.contiguous()?,
        Rope { inverse: false },
    )
}

/// With `inverse`, the transpose of the rotation (the backward pass): for `j` in the first half
/// `dx_j = dy_j·cos_j + dy_{j+h}·sin_{j+h}`, in the second `dx_j = dy_j·cos_j − dy_{j−h}·sin_{j−h}`.
struct Rope {
    inverse: bool,
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "ledgerflow-rope"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32s(s1, l1, "rope")?;
        let (cos, sin) = (f32s(s2, l2, "rope")?, f32s(s3, l3, "rope")?);
        let dims = l1.shape().dims();
        let (t, hd) = match dims {
            [.., t, hd] => (*t, *hd),
            _ => candle_core::bail!("rope: {:?} has fewer than two dimensions", dims),
        };
        if cos.len() != t * hd || sin.len() != t * hd || hd % 2 != 0 {
            candle_core::bail!("rope: tables of {} for {t} × {hd}", cos.len());
        }
        let half = hd / 2;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(t * hd)
            .zip(x.par_chunks(t * hd))
            .for_each(|(o, x)| {
                for (p, (o, x)) in o.chunks_mut(hd).zip(x.chunks(hd)).enumerate() {
                    let (c, s) = (&cos[p * hd..(p + 1) * hd], &sin[p * hd..(p + 1) * hd]);
                    for j in 0..half {
                        let (a, b) = (x[j], x[j + half]);
                        if self.inverse {
                            o[j] = a * c[j] + b * s[j + half];
                            o[j + half] = b * c[j + half] - a * s[j];
                        } else {
                            o[j] = a * c[j] - b * s[j];
                            o[j + half] = b * c[j + half] + a * s[j + half];
                        }
                    }
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::rope(s1, l1, s2, l2, s3, l3, self.inverse)
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dx = grad
            .contiguous()?
            .apply_op3_no_bwd(cos, sin, &Rope { inverse: true })?;
        Ok((Some(dx), None, None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The fused SwiGLU equals candle's `silu(gate)·up`, value and both gradients.
    #[test]
    fn swiglu_equals_the_composed_ops() {
        let dev = crate::test_device();
        let g = Var::from_tensor(&Tensor::randn(0f32, 4.0, (5, 7, 40), &dev).unwrap()).unwrap();
        let u = Var::from_tensor(&Tensor::randn(0f32, 1.0, (5, 7, 40), &dev).unwrap()).unwrap();
        let probe = Tensor::randn(0f32, 1.0, (5, 7, 40), &dev).unwrap();
        let run = |fused: bool| {
            let y = if fused {
                swiglu(g.as_tensor(), u.as_tensor()).unwrap()
            } else {
                (g.as_tensor().silu().unwrap() * u.as_tensor()).unwrap()
            };
            let loss = (&y * &probe).unwrap().sum_all().unwrap();
            let grads = loss.backward().unwrap();
            (
                y,
                grads.get(g.as_tensor()).unwrap().clone(),
                grads.get(u.as_tensor()).unwrap().clone(),
            )
        };
        let (y1, dg1, du1) = run(true);
        let (y2, dg2, du2) = run(false);
        close(&y1, &y2, 1e-5);
        close(&dg1, &dg2, 1e-5);
        close(&du1, &du2, 1e-5);
        // σ at the extremes: no overflow, no NaN.
        for (x, want) in [(-200.0f32, 0.0f32), (200.0, 1.0), (0.0, 0.5)] {
            assert!((sigmoid(x) - want).abs() <= 1e-7, "σ({x}) = {}", sigmoid(x));
        }
    }

    /// The vectorised exp is within 2 ulp of the exact value over the softmaxes' whole range,
    /// is 0 for −∞ and below e⁻⁸⁷, and its sum is the sum.
    #[test]
    fn the_vectorised_exp_is_exact_to_two_ulp() {
        let n = 200_001;
        let x: Vec<f32> = (0..n)
            .map(|i| -90.0 * i as f32 / (n - 1) as f32)
            .chain([f32::NEG_INFINITY, -0.0, -1e-30])
            .collect();
        let mut o = vec![0f32; x.len()];
        let sum = exp_shifted_sum(&mut o, &x, 1.0, 0.0);
        let mut want_sum = 0f64;
        for (&v, &got) in x.iter().zip(&o) {
            let want = (v as f64).exp();
            want_sum += want;
            if v < -87.33 {
                assert_eq!(got, 0.0, "exp({v})");
            } else {
                let ulp = f32::EPSILON as f64 * want;
                assert!(
                    (got as f64 - want).abs() <= 2.0 * ulp,
                    "exp({v}) = {got}, want {want}"
                );
            }
        }
        // f32 accumulation over 200,000 terms, as any f32 sum of them.
        assert!(
            ((sum as f64) - want_sum).abs() <= 1e-4 * want_sum,
            "{sum} against {want_sum}"
        );
        // Scale and shift as the attention softmax uses them.
        let mut o = [0f32; 3];
        exp_shifted_sum(&mut o, &[2.0, 4.0, 6.0], 0.5, 3.0);
        for (got, want) in o.iter().zip([(-2.0f64).exp(), (-1.0f64).exp(), 1.0]) {
            assert!((*got as f64 - want).abs() <= 2.0 * f32::EPSILON as f64 * want);
        }
    }

    fn close(a: &Tensor, b: &Tensor, tol: f32) {
        let (a, b) = (
            a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            b.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        assert_eq!(a.len(), b.len());
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            assert!(
                (x - y).abs() <= tol * (1.0 + y.abs()),
                "element {i}: {x} against {y}"
            );
        }
    }

    /// Each fused op gives the composed op's value and gradients, on the test device (the
    /// CPU's loops, or the CUDA kernels against candle's composed ops on the GPU): small sizes,
    /// and sizes past one warp's 32 lanes per row.
    #[test]
    fn fused_ops_equal_the_composed_ones() {
        fused_ops_check(6, 4, 10, 5, 8, 1e-5);
        fused_ops_check(20, 16, 130, 70, 32, 1e-4);
    }

    /// `a × b` rows of width `d` through RMSNorm and cross-entropy (vocabulary `d`), causal
    /// softmax over `t × t` scores, rotary positions on `t × hd`.
    fn fused_ops_check(a: usize, b: usize, d: usize, t: usize, hd: usize, tol: f32) {
        let dev = crate::test_device();
        let x = Var::from_tensor(&(Tensor::randn(0f32, 2.0, (a, b, d), &dev).unwrap())).unwrap();
        let w = Var::from_tensor(&Tensor::randn(1f32, 0.3, d, &dev).unwrap()).unwrap();
        let probe = Tensor::randn(0f32, 1.0, (a, b, d), &dev).unwrap();
        let n = (a * b) as u32;
        let targets =
            Tensor::from_vec((0..n).map(|i| i * 7 % d as u32).collect(), a * b, &dev).unwrap();

        // RMSNorm, then cross-entropy of its output as logits.
        let run = |fused: bool| {
            let y = if fused {
                rms_norm(x.as_tensor(), w.as_tensor(), 1e-5).unwrap()
            } else {
                let ms = x.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
                x.broadcast_div(&(ms + 1e-5).unwrap().sqrt().unwrap())
                    .unwrap()
                    .broadcast_mul(w.as_tensor())
                    .unwrap()
            };
            let logits = (y * &probe).unwrap().reshape((a * b, d)).unwrap();
            let loss = if fused {
                cross_entropy(&logits, &targets).unwrap()
            } else {
                candle_nn::loss::cross_entropy(&logits, &targets).unwrap()
            };
            // A loss gradient other than 1, as a scaled loss would pass.
            let g = (loss.clone() * 0.5).unwrap().backward().unwrap();
            (
                loss,
                g.get(x.as_tensor()).unwrap().clone(),
                g.get(w.as_tensor()).unwrap().clone(),
            )
        };
        let (l1, dx1, dw1) = run(true);
        let (l2, dx2, dw2) = run(false);
        close(&l1, &l2, tol);
        close(&dx1, &dx2, 10.0 * tol);
        close(&dw1, &dw2, 10.0 * tol);

        // Causal softmax against scale, mask and softmax composed.
        let s = Var::from_tensor(&Tensor::randn(0f32, 3.0, (2, 3, t, t), &dev).unwrap()).unwrap();
        let probe = Tensor::randn(0f32, 1.0, (2, 3, t, t), &dev).unwrap();
        let run = |fused: bool| {
            let y = if fused {
                causal_softmax(s.as_tensor(), 0.5).unwrap()
            } else {
                let mask = causal_mask(t, t, &dev).unwrap();
                candle_nn::ops::softmax(
                    &(s.as_tensor() * 0.5).unwrap().broadcast_add(&mask).unwrap(),
                    D::Minus1,
                )
                .unwrap()
            };
            let l = (&y * &probe).unwrap().sum_all().unwrap();
            (y, l.backward().unwrap().get(s.as_tensor()).unwrap().clone())
        };
        let (y1, g1) = run(true);
        let (y2, g2) = run(false);
        close(&y1, &y2, tol / 10.0);
        close(&g1, &g2, tol);

        // Rotary positions against narrow, negate, concatenate, multiply and add.
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, t, hd), &dev).unwrap()).unwrap();
        let angles = Tensor::randn(0f32, 1.0, (t, hd), &dev).unwrap();
        let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
        let probe = Tensor::randn(0f32, 1.0, (2, 3, t, hd), &dev).unwrap();
        let half = hd / 2;
        let run = |fused: bool| {
            let y = if fused {
                rope(x.as_tensor(), &cos, &sin).unwrap()
            } else {
                let x1 = x.narrow(D::Minus1, 0, half).unwrap();
                let x2 = x.narrow(D::Minus1, half, half).unwrap();
                let rotated = Tensor::cat(&[&x2.neg().unwrap(), &x1], D::Minus1).unwrap();
                (x.broadcast_mul(&cos).unwrap() + rotated.broadcast_mul(&sin).unwrap()).unwrap()
            };
            let l = (&y * &probe).unwrap().sum_all().unwrap();
            (y, l.backward().unwrap().get(x.as_tensor()).unwrap().clone())
        };
        let (y1, g1) = run(true);
        let (y2, g2) = run(false);
        close(&y1, &y2, tol / 10.0);
        close(&g1, &g2, tol);
    }

    /// The paths other devices take (here: f64 on the CPU, which takes them too) must pass
    /// gradients: the fused f32 CPU kernels' gradients against theirs, in f32.
    #[test]
    fn fallback_paths_have_the_same_gradients() {
        let dev = Device::Cpu;
        let f64s = |t: &Tensor| t.to_dtype(candle_core::DType::F64).unwrap();
        let f32s = |t: &Tensor| t.to_dtype(candle_core::DType::F32).unwrap();
        let s = Tensor::randn(0f32, 3.0, (2, 3, 6, 6), &dev).unwrap();
        let probe = Tensor::randn(0f32, 1.0, (2, 3, 6, 6), &dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (2, 3, 6, 8), &dev).unwrap();
        let w = Tensor::randn(1f32, 0.1, 8, &dev).unwrap();
        let (cos, sin) = (
            Tensor::randn(0f32, 1.0, (6, 8), &dev).unwrap(),
            Tensor::randn(0f32, 1.0, (6, 8), &dev).unwrap(),
        );
        let grads = |wide: bool| {
            let cast = |t: &Tensor| if wide { f64s(t) } else { t.clone() };
            let (sv, xv) = (
                Var::from_tensor(&cast(&s)).unwrap(),
                Var::from_tensor(&cast(&x)).unwrap(),
            );
            let att = causal_softmax(sv.as_tensor(), 0.5).unwrap();
            let normed = rms_norm(xv.as_tensor(), &cast(&w), 1e-5).unwrap();
            let rotated = rope(&normed, &cast(&cos), &cast(&sin)).unwrap();
            let l = ((&att * &cast(&probe)).unwrap().sum_all().unwrap()
                + (&rotated
                    * &cast(
                        &probe
                            .narrow(3, 0, 6)
                            .unwrap()
                            .pad_with_zeros(3, 0, 2)
                            .unwrap(),
                    ))
                    .unwrap()
                    .sum_all()
                    .unwrap())
            .unwrap();
            let g = l.backward().unwrap();
            (
                f32s(g.get(sv.as_tensor()).expect("softmax gradient")),
                f32s(g.get(xv.as_tensor()).expect("norm and rotary gradient")),
            )
        };
        let (gs32, gx32) = grads(false);
        let (gs64, gx64) = grads(true);
        close(&gs32, &gs64, 1e-4);
        close(&gx32, &gx64, 1e-4);
    }

    #[test]
    fn cross_entropy_refuses_targets_outside_the_vocabulary() {
        let dev = Device::Cpu;
        let logits = Tensor::zeros((2, 3), candle_core::DType::F32, &dev).unwrap();
        let t = Tensor::from_vec(vec![0u32, 3], 2, &dev).unwrap();
        let e = cross_entropy(&logits, &t).unwrap_err().to_string();
        assert!(e.contains("outside the vocabulary"), "{e}");
    }
}

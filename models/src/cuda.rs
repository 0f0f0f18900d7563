//! CUDA kernels for the fused ops of [`crate::ops`] and for the optimiser's step, so that a
//! training step on a GPU runs one kernel where candle composes five to fifteen (the step of our
//! default model is bound by kernel launches, not by arithmetic). Written in CUDA C, compiled
//! once per process by NVRTC (no build-time toolchain beyond the one `cuda` already needs), f32
//! and contiguous inputs only; every kernel is checked against the CPU's fused op and candle's
//! composed ops by the unit tests run with `LEDGERFLOW_DEVICE=cuda`.

use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDevice, CudaStorage, WrapErr};
use candle_core::{Layout, Result, Shape, Tensor};

const SOURCE: &str = r#"
#define NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// σ(x) without overflow for any x.
__device__ __forceinline__ float sigm(float x) {
    float e = expf(-fabsf(x));
    float d = 1.0f / (1.0f + e);
    return x >= 0.0f ? d : e * d;
}

// Row kernels run one warp per row: blockDim (32, k), row = blockIdx.x * k + threadIdx.y.
#define ROW_OR_RETURN(rows) \
    const int row = blockIdx.x * blockDim.y + threadIdx.y; \
    if (row >= (rows)) return; \
    const int lane = threadIdx.x;

// softmax(scale · x) over each row of [.., t, t] where query i sees keys 0..=i.
extern "C" __global__ void lf_causal_softmax(const float* x, float* y, int rows, int t, float scale) {
    ROW_OR_RETURN(rows)
    const int i = row % t;
    const float* xr = x + (size_t)row * t;
    float* yr = y + (size_t)row * t;
    float m = NEG_INF;
    for (int j = lane; j <= i; j += 32) m = fmaxf(m, xr[j]);
    m = warp_max(m) * scale;
    float s = 0.0f;
    for (int j = lane; j <= i; j += 32) {
        float e = expf(xr[j] * scale - m);
        yr[j] = e;
        s += e;
    }
    const float k = 1.0f / warp_sum(s);
    for (int j = lane; j < t; j += 32) yr[j] = j <= i ? yr[j] * k : 0.0f;
}

// scale · y·(dy − Σ y·dy) on the causal part of each row, 0 beyond it.
extern "C" __global__ void lf_causal_softmax_grad(const float* y, const float* dy, float* out, int rows, int t, float scale) {
    ROW_OR_RETURN(rows)
    const int i = row % t;
    const size_t b = (size_t)row * t;
    float dot = 0.0f;
    for (int j = lane; j <= i; j += 32) dot += y[b + j] * dy[b + j];
    dot = warp_sum(dot);
    for (int j = lane; j < t; j += 32) out[b + j] = j <= i ? scale * y[b + j] * (dy[b + j] - dot) : 0.0f;
}

extern "C" __global__ void lf_swiglu(const float* g, const float* u, float* o, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float x = g[i];
    o[i] = x * sigm(x) * u[i];
}

// [∂gate ; ∂up] as 2n values.
extern "C" __global__ void lf_swiglu_grad(const float* g, const float* u, const float* d, float* o, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float x = g[i], s = sigm(x);
    o[i] = d[i] * u[i] * (s * (1.0f + x * (1.0f - s)));
    o[n + i] = d[i] * x * s;
}

extern "C" __global__ void lf_rms_norm(const float* x, const float* w, float* y, int rows, int d, float eps) {
    ROW_OR_RETURN(rows)
    const float* xr = x + (size_t)row * d;
    float ss = 0.0f;
    for (int j = lane; j < d; j += 32) ss += xr[j] * xr[j];
    const float r = 1.0f / sqrtf(warp_sum(ss) / d + eps);
    for (int j = lane; j < d; j += 32) y[(size_t)row * d + j] = xr[j] * r * w[j];
}

// dx = r·dy·w − x·r³·Σ(dy·w·x)/d per row; each row's r to `rs` for the weight's gradient.
extern "C" __global__ void lf_rms_norm_grad(const float* x, const float* w, const float* dy, float* dx, float* rs, int rows, int d, float eps) {
    ROW_OR_RETURN(rows)
    const size_t b = (size_t)row * d;
    float ss = 0.0f, gx = 0.0f;
    for (int j = lane; j < d; j += 32) {
        ss += x[b + j] * x[b + j];
        gx += dy[b + j] * w[j] * x[b + j];
    }
    ss = warp_sum(ss);
    gx = warp_sum(gx);
    const float r = 1.0f / sqrtf(ss / d + eps);
    const float k = r * r * r * gx / d;
    for (int j = lane; j < d; j += 32) dx[b + j] = r * dy[b + j] * w[j] - x[b + j] * k;
    if (lane == 0) rs[row] = r;
}

// dw = Σ_rows dy·x·r: blockDim (32, 8), 32 columns per block, the rows split over threadIdx.y
// and summed in a fixed order (deterministic).
extern "C" __global__ void lf_rms_norm_grad_weight(const float* x, const float* dy, const float* rs, float* dw, int rows, int d) {
    __shared__ float part[8][33];
    const int c = blockIdx.x * 32 + threadIdx.x;
    float s = 0.0f;
    if (c < d)
        for (int r = threadIdx.y; r < rows; r += 8) s += dy[(size_t)r * d + c] * x[(size_t)r * d + c] * rs[r];
    part[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y == 0 && c < d) {
        float t = 0.0f;
        for (int k = 0; k < 8; k++) t += part[k][threadIdx.x];
        dw[c] = t;
    }
}

// Rotary positions (LLaMA's halves) on [.., t, hd], one thread per pair (j, j + hd/2); with
// `inverse` the transposed rotation (the backward pass).
extern "C" __global__ void lf_rope(const float* x, const float* cs, const float* sn, float* o, int pairs, int t, int hd, int inverse) {
    const int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= pairs) return;
    const int half = hd / 2, row = idx / half, j = idx % half, p = row % t;
    const float* c = cs + (size_t)p * hd;
    const float* s = sn + (size_t)p * hd;
    const size_t b = (size_t)row * hd;
    const float a = x[b + j], e = x[b + j + half];
    if (inverse) {
        o[b + j] = a * c[j] + e * s[j + half];
        o[b + j + half] = e * c[j + half] - a * s[j];
    } else {
        o[b + j] = a * c[j] - e * s[j];
        o[b + j + half] = e * c[j + half] + a * s[j + half];
    }
}

// Each row's −log softmax(x)[target] (NaN for a target outside the vocabulary).
extern "C" __global__ void lf_cross_entropy_rows(const float* x, const unsigned int* t, float* loss, int rows, int v) {
    ROW_OR_RETURN(rows)
    const float* xr = x + (size_t)row * v;
    float m = NEG_INF;
    for (int j = lane; j < v; j += 32) m = fmaxf(m, xr[j]);
    m = warp_max(m);
    float s = 0.0f;
    for (int j = lane; j < v; j += 32) s += expf(xr[j] - m);
    s = warp_sum(s);
    if (lane == 0) {
        const unsigned int tr = t[row];
        loss[row] = tr < (unsigned int)v ? m + logf(s) - xr[tr] : __int_as_float(0x7fc00000);
    }
}

// scale[0] · (softmax(x) − onehot(target)) / rows.
extern "C" __global__ void lf_cross_entropy_grad(const float* x, const unsigned int* t, const float* scale, float* g, int rows, int v) {
    ROW_OR_RETURN(rows)
    const float* xr = x + (size_t)row * v;
    float* gr = g + (size_t)row * v;
    float m = NEG_INF;
    for (int j = lane; j < v; j += 32) m = fmaxf(m, xr[j]);
    m = warp_max(m);
    float s = 0.0f;
    for (int j = lane; j < v; j += 32) s += expf(xr[j] - m);
    s = warp_sum(s);
    const float k = scale[0] / rows, ks = k / s;
    const unsigned int tr = t[row];
    for (int j = lane; j < v; j += 32) gr[j] = expf(xr[j] - m) * ks - ((unsigned int)j == tr ? k : 0.0f);
}

// out[slot] = Σ a (mean: divided by n) in f64, one block of 256 threads, fixed order.
extern "C" __global__ void lf_sum(const float* a, float* out, int n, int slot, int squares, int mean) {
    __shared__ double part[256];
    double s = 0.0;
    for (int i = threadIdx.x; i < n; i += 256) s += squares ? (double)a[i] * a[i] : (double)a[i];
    part[threadIdx.x] = s;
    __syncthreads();
    for (int k = 128; k > 0; k >>= 1) {
        if (threadIdx.x < k) part[threadIdx.x] += part[threadIdx.x + k];
        __syncthreads();
    }
    if (threadIdx.x == 0) out[slot] = (float)(mean ? part[0] / n : part[0]);
}

// Mixed-adapter LoRA (BGMV): o = y + (x·Aᵀ_b)·Bᵀ_b for every token of batch row b, one block per
// token; table[3b], table[3b + 1] point at row b's Aᵀ [in, r] and Bᵀ [r, out] (scale folded in),
// table[3b + 2] is r (0: the base alone, o = y). r ≤ 64.
extern "C" __global__ void lf_lora_gathered(const float* x, const float* y, float* o, const unsigned long long* table, int t, int in, int out) {
    __shared__ float h[64];
    const int token = blockIdx.x, b = token / t;
    const float* at = (const float*)table[3 * b];
    const float* bt = (const float*)table[3 * b + 1];
    const int r = (int)table[3 * b + 2];
    const float* xr = x + (size_t)token * in;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
    for (int k = warp; k < r; k += warps) {
        float s = 0.0f;
        for (int i = lane; i < in; i += 32) s += xr[i] * at[(size_t)i * r + k];
        s = warp_sum(s);
        if (lane == 0) h[k] = s;
    }
    __syncthreads();
    const float* yr = y + (size_t)token * out;
    float* orow = o + (size_t)token * out;
    for (int j = threadIdx.x; j < out; j += blockDim.x) {
        float d = 0.0f;
        for (int k = 0; k < r; k++) d += h[k] * bt[(size_t)k * out + j];
        orow[j] = yr[j] + d;
    }
}

// One AdamW step (torch.optim.AdamW's update) of a variable, its gradient scaled by the clip.
extern "C" __global__ void lf_adamw(float* p, const float* g, float* m, float* v, int n,
                                    float g_scale, float b1, float b2, float c1, float c2,
                                    float lr, float decay, float eps) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float gi = g[i] * g_scale;
    const float mi = b1 * m[i] + (1.0f - b1) * gi;
    const float vi = b2 * v[i] + (1.0f - b2) * gi * gi;
    m[i] = mi;
    v[i] = vi;
    p[i] = p[i] * decay - lr * (mi * c1) / (sqrtf(vi * c2) + eps);
}
"#;

/// The kernels' PTX, compiled by NVRTC on first use.
fn ptx() -> Result<&'static str> {
    static PTX: std::sync::OnceLock<std::result::Result<String, String>> =
        std::sync::OnceLock::new();
    PTX.get_or_init(|| {
        candle_core::cuda_backend::cudarc::nvrtc::compile_ptx(SOURCE)
            .map(|p| p.to_src())
            .map_err(|e| format!("{e:?}"))
    })
    .as_deref()
    .map_err(|e| candle_core::Error::Msg(format!("compiling ledgerflow's CUDA kernels: {e}")))
}

fn launch_cfg(grid: usize, block: (u32, u32)) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (grid.max(1) as u32, 1, 1),
        block_dim: (block.0, block.1, 1),
        shared_mem_bytes: 0,
    }
}

/// One warp per row, four rows per block.
fn rows_cfg(rows: usize) -> LaunchConfig {
    launch_cfg(rows.div_ceil(4), (32, 4))
}

fn elems_cfg(n: usize) -> LaunchConfig {
    launch_cfg(n.div_ceil(256), (256, 1))
}

fn int(n: usize, what: &str) -> Result<i32> {
    i32::try_from(n).map_err(|_| candle_core::Error::Msg(format!("{what}: {n} is too large")))
}

/// The contiguous f32 view of `s` under `l`.
fn view<'a>(s: &'a CudaStorage, l: &Layout, what: &str) -> Result<CudaView<'a, f32>> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{what}: input must be contiguous")))?;
    Ok(s.as_cuda_slice::<f32>()?.slice(a..b))
}

fn views<'a>(s: &'a CudaStorage, l: &Layout, what: &str) -> Result<CudaView<'a, u32>> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{what}: input must be contiguous")))?;
    Ok(s.as_cuda_slice::<u32>()?.slice(a..b))
}

/// An uninitialised buffer of `n` f32 that the kernel about to run writes in full.
fn output(dev: &CudaDevice, n: usize) -> Result<CudaSlice<f32>> {
    // SAFETY: every caller launches a kernel that writes each of the `n` values.
    unsafe { dev.alloc::<f32>(n.max(1)) }
}

fn wrap(s: CudaSlice<f32>, dev: &CudaDevice) -> CudaStorage {
    CudaStorage::wrap_cuda_slice(s, dev.clone())
}

macro_rules! launch {
    ($dev:expr, $name:literal, $cfg:expr, $($arg:expr),+ $(,)?) => {{
        let func = $dev.get_or_load_custom_func($name, "ledgerflow", ptx()?)?;
        let mut b = func.builder();
        $( b.arg($arg); )+
        // SAFETY: the arguments match the kernel's signature in `SOURCE`, and every buffer
        // holds what the grid reads and writes.
        unsafe { b.launch($cfg) }.w()?;
    }};
}

/// `[.., t, t]` scores → causal softmax of `scale ·` them.
pub fn causal_softmax(s: &CudaStorage, l: &Layout, scale: f32) -> Result<(CudaStorage, Shape)> {
    let dev = &s.device;
    let x = view(s, l, "causal softmax")?;
    let t = l.shape().dims().last().copied().unwrap_or(1);
    let rows = l.shape().elem_count() / t.max(1);
    let y = output(dev, rows * t)?;
    let (r, ti) = (int(rows, "causal softmax")?, int(t, "causal softmax")?);
    launch!(
        dev,
        "lf_causal_softmax",
        rows_cfg(rows),
        &x,
        &y,
        &r,
        &ti,
        &scale
    );
    Ok((wrap(y, dev), l.shape().clone()))
}

pub fn causal_softmax_grad(
    y: &CudaStorage,
    ly: &Layout,
    dy: &CudaStorage,
    ldy: &Layout,
    scale: f32,
) -> Result<(CudaStorage, Shape)> {
    let dev = &y.device;
    let (yv, dv) = (view(y, ly, "softmax grad")?, view(dy, ldy, "softmax grad")?);
    let t = ly.shape().dims().last().copied().unwrap_or(1);
    let rows = ly.shape().elem_count() / t.max(1);
    let out = output(dev, rows * t)?;
    let (r, ti) = (int(rows, "softmax grad")?, int(t, "softmax grad")?);
    launch!(
        dev,
        "lf_causal_softmax_grad",
        rows_cfg(rows),
        &yv,
        &dv,
        &out,
        &r,
        &ti,
        &scale
    );
    Ok((wrap(out, dev), ly.shape().clone()))
}

pub fn swiglu(
    g: &CudaStorage,
    lg: &Layout,
    u: &CudaStorage,
    lu: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let dev = &g.device;
    let (gv, uv) = (view(g, lg, "swiglu")?, view(u, lu, "swiglu")?);
    let n = lg.shape().elem_count();
    let out = output(dev, n)?;
    let ni = int(n, "swiglu")?;
    launch!(dev, "lf_swiglu", elems_cfg(n), &gv, &uv, &out, &ni);
    Ok((wrap(out, dev), lg.shape().clone()))
}

/// SwiGLU's gradients `(∂gate, ∂up)` for contiguous f32 CUDA tensors of one shape.
pub fn swiglu_grad(gate: &Tensor, up: &Tensor, grad: &Tensor) -> Result<(Tensor, Tensor)> {
    let n = gate.elem_count();
    let both = {
        let (gs, gl) = gate.storage_and_layout();
        let (us, ul) = up.storage_and_layout();
        let (ds, dl) = grad.storage_and_layout();
        let (
            candle_core::Storage::Cuda(gs),
            candle_core::Storage::Cuda(us),
            candle_core::Storage::Cuda(ds),
        ) = (&*gs, &*us, &*ds)
        else {
            candle_core::bail!("swiglu grad: expected CUDA tensors");
        };
        let dev = &gs.device;
        let (gv, uv, dv) = (
            view(gs, gl, "swiglu grad")?,
            view(us, ul, "swiglu grad")?,
            view(ds, dl, "swiglu grad")?,
        );
        let out = output(dev, 2 * n)?;
        let ni = int(n, "swiglu grad")?;
        launch!(
            dev,
            "lf_swiglu_grad",
            elems_cfg(n),
            &gv,
            &uv,
            &dv,
            &out,
            &ni
        );
        Tensor::from_storage(
            candle_core::Storage::Cuda(wrap(out, dev)),
            2 * n,
            candle_core::op::BackpropOp::none(),
            false,
        )
    };
    let shape = gate.shape().clone();
    Ok((
        both.narrow(0, 0, n)?.reshape(shape.clone())?,
        both.narrow(0, n, n)?.reshape(shape)?,
    ))
}

pub fn rms_norm(
    x: &CudaStorage,
    lx: &Layout,
    w: &CudaStorage,
    lw: &Layout,
    eps: f32,
) -> Result<(CudaStorage, Shape)> {
    let dev = &x.device;
    let (xv, wv) = (view(x, lx, "rms-norm")?, view(w, lw, "rms-norm")?);
    let d = lw.shape().elem_count();
    if lx.shape().dims().last() != Some(&d) {
        candle_core::bail!("rms-norm: {:?} against a weight of {d}", lx.shape());
    }
    let rows = lx.shape().elem_count() / d.max(1);
    let y = output(dev, rows * d)?;
    let (r, di) = (int(rows, "rms-norm")?, int(d, "rms-norm")?);
    launch!(
        dev,
        "lf_rms_norm",
        rows_cfg(rows),
        &xv,
        &wv,
        &y,
        &r,
        &di,
        &eps
    );
    Ok((wrap(y, dev), lx.shape().clone()))
}

/// RMSNorm's gradients as `[rows + 1, d]` (`dx` row by row, then `dweight`), as on the CPU.
#[allow(clippy::too_many_arguments)]
pub fn rms_norm_grad(
    x: &CudaStorage,
    lx: &Layout,
    w: &CudaStorage,
    lw: &Layout,
    dy: &CudaStorage,
    ldy: &Layout,
    eps: f32,
) -> Result<(CudaStorage, Shape)> {
    let dev = &x.device;
    let (xv, wv, dv) = (
        view(x, lx, "rms-norm grad")?,
        view(w, lw, "rms-norm grad")?,
        view(dy, ldy, "rms-norm grad")?,
    );
    let d = lw.shape().elem_count();
    let rows = lx.shape().elem_count() / d.max(1);
    let mut out = output(dev, (rows + 1) * d)?;
    let rs = output(dev, rows)?;
    let (r, di) = (int(rows, "rms-norm grad")?, int(d, "rms-norm grad")?);
    {
        let mut dx = out.slice_mut(0..rows * d);
        launch!(
            dev,
            "lf_rms_norm_grad",
            rows_cfg(rows),
            &xv,
            &wv,
            &dv,
            &mut dx,
            &rs,
            &r,
            &di,
            &eps
        );
    }
    {
        let mut dw = out.slice_mut(rows * d..(rows + 1) * d);
        launch!(
            dev,
            "lf_rms_norm_grad_weight",
            launch_cfg(d.div_ceil(32), (32, 8)),
            &xv,
            &dv,
            &rs,
            &mut dw,
            &r,
            &di
        );
    }
    Ok((wrap(out, dev), Shape::from((rows + 1, d))))
}

#[allow(clippy::too_many_arguments)]
pub fn rope(
    x: &CudaStorage,
    lx: &Layout,
    cos: &CudaStorage,
    lc: &Layout,
    sin: &CudaStorage,
    ls: &Layout,
    inverse: bool,
) -> Result<(CudaStorage, Shape)> {
    let dev = &x.device;
    let (xv, cv, sv) = (
        view(x, lx, "rope")?,
        view(cos, lc, "rope")?,
        view(sin, ls, "rope")?,
    );
    let (t, hd) = match lx.shape().dims() {
        [.., t, hd] => (*t, *hd),
        dims => candle_core::bail!("rope: {:?} has fewer than two dimensions", dims),
    };
    if lc.shape().elem_count() != t * hd || ls.shape().elem_count() != t * hd || hd % 2 != 0 {
        candle_core::bail!("rope: tables of {} for {t} × {hd}", lc.shape().elem_count());
    }
    let n = lx.shape().elem_count();
    let out = output(dev, n)?;
    let pairs = n / 2;
    let (p, ti, hdi, inv) = (
        int(pairs, "rope")?,
        int(t, "rope")?,
        int(hd, "rope")?,
        inverse as i32,
    );
    launch!(
        dev,
        "lf_rope",
        elems_cfg(pairs),
        &xv,
        &cv,
        &sv,
        &out,
        &p,
        &ti,
        &hdi,
        &inv
    );
    Ok((wrap(out, dev), lx.shape().clone()))
}

/// Mean cross-entropy of `[n, vocab]` logits against u32 targets (NaN where a target is
/// outside the vocabulary: the GPU does not stop to say which).
pub fn cross_entropy(
    x: &CudaStorage,
    lx: &Layout,
    t: &CudaStorage,
    lt: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let dev = &x.device;
    let (rows, v) = lx.shape().dims2()?;
    if lt.shape().elem_count() != rows {
        candle_core::bail!(
            "cross-entropy: {} targets for {rows} rows",
            lt.shape().elem_count()
        );
    }
    let (xv, tv) = (
        view(x, lx, "cross-entropy")?,
        views(t, lt, "cross-entropy")?,
    );
    let losses = output(dev, rows)?;
    let (r, vi) = (int(rows, "cross-entropy")?, int(v, "cross-entropy")?);
    launch!(
        dev,
        "lf_cross_entropy_rows",
        rows_cfg(rows),
        &xv,
        &tv,
        &losses,
        &r,
        &vi
    );
    let out = output(dev, 1)?;
    let (zero, one) = (0i32, 1i32);
    launch!(
        dev,
        "lf_sum",
        launch_cfg(1, (256, 1)),
        &losses,
        &out,
        &r,
        &zero,
        &zero,
        &one
    );
    Ok((wrap(out, dev), Shape::from(())))
}

/// The gradient of [`cross_entropy`] scaled by the one-element `scale` (the loss's own
/// gradient, left on the device).
pub fn cross_entropy_grad(
    x: &CudaStorage,
    lx: &Layout,
    t: &CudaStorage,
    lt: &Layout,
    scale: &CudaStorage,
    ls: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let dev = &x.device;
    let (rows, v) = lx.shape().dims2()?;
    let (xv, tv, sv) = (
        view(x, lx, "cross-entropy grad")?,
        views(t, lt, "cross-entropy grad")?,
        view(scale, ls, "cross-entropy grad")?,
    );
    let g = output(dev, rows * v)?;
    let (r, vi) = (
        int(rows, "cross-entropy grad")?,
        int(v, "cross-entropy grad")?,
    );
    launch!(
        dev,
        "lf_cross_entropy_grad",
        rows_cfg(rows),
        &xv,
        &tv,
        &sv,
        &g,
        &r,
        &vi
    );
    Ok((wrap(g, dev), lx.shape().clone()))
}

/// The widest rank [`lora_gathered`] takes.
pub const GATHERED_MAX_RANK: usize = 64;

/// `y + (x·Aᵀ_b)·Bᵀ_b` on every token of batch row `b` in one kernel (the BGMV of
/// Punica/S-LoRA), for `x` `[batch, t, in]`, `y` `[batch, t, out]` and each row's pair (`Aᵀ`
/// `[in, r]`, `Bᵀ` `[r, out]` with the scale folded in, contiguous; `None`: the base alone),
/// where composing it costs two stacks of every row's matrices and two batched matmuls per
/// projection. No gradient (serving). `None` where it does not apply: not f32 on a CUDA GPU, a
/// rank above [`GATHERED_MAX_RANK`], or shapes that do not fit.
pub fn lora_gathered(
    x: &Tensor,
    y: &Tensor,
    pairs: &[Option<(&Tensor, &Tensor)>],
) -> Result<Option<Tensor>> {
    use candle_core::cuda_backend::cudarc::driver::DevicePtr;
    let candle_core::Device::Cuda(dev) = x.device() else {
        return Ok(None);
    };
    let (batch, t, inp) = x.dims3()?;
    let (_, _, out) = y.dims3()?;
    if pairs.len() != batch
        || y.dims()[..2] != x.dims()[..2]
        || x.dtype() != candle_core::DType::F32
        || y.dtype() != candle_core::DType::F32
    {
        return Ok(None);
    }
    // Every row's matrices checked, then read-locked until the kernel is enqueued.
    let mut matrices = Vec::with_capacity(2 * batch);
    for (at, bt) in pairs.iter().flatten() {
        let r = at.dim(1)?;
        if at.dims() != [inp, r]
            || bt.dims() != [r, out]
            || r > GATHERED_MAX_RANK
            || !at.is_contiguous()
            || !bt.is_contiguous()
            || at.dtype() != candle_core::DType::F32
            || bt.dtype() != candle_core::DType::F32
        {
            return Ok(None);
        }
        matrices.extend([*at, *bt]);
    }
    let locked: Vec<_> = matrices.iter().map(|m| m.storage_and_layout()).collect();
    let mut slices = Vec::with_capacity(locked.len());
    for (s, l) in &locked {
        let candle_core::Storage::Cuda(s) = &**s else {
            return Ok(None);
        };
        slices.push((s.as_cuda_slice::<f32>()?, l.start_offset()));
    }
    let stream = dev.cuda_stream();
    // The pointers, and the guards that record their reads once the kernel is enqueued.
    let reads: Vec<_> = slices
        .iter()
        .map(|(s, offset)| {
            let (ptr, read) = s.device_ptr(&stream);
            (ptr + (offset * std::mem::size_of::<f32>()) as u64, read)
        })
        .collect();
    let mut table = Vec::with_capacity(3 * batch);
    let mut next = reads.iter().map(|(ptr, _)| *ptr);
    for p in pairs {
        match p {
            Some((at, _)) => {
                let (a, b) = (next.next(), next.next());
                table.extend([a.unwrap_or(0), b.unwrap_or(0), at.dim(1)? as u64]);
            }
            None => table.extend([0, 0, 0]),
        }
    }
    let table = dev.clone_htod(&table)?;
    let (x, y) = (x.contiguous()?, y.contiguous()?);
    let o = {
        let (xs, xl) = x.storage_and_layout();
        let (ys, yl) = y.storage_and_layout();
        let (candle_core::Storage::Cuda(xs), candle_core::Storage::Cuda(ys)) = (&*xs, &*ys) else {
            return Ok(None);
        };
        let (xv, yv) = (view(xs, xl, "lora")?, view(ys, yl, "lora")?);
        let o = output(dev, batch * t * out)?;
        let (ti, ii, oi) = (int(t, "lora")?, int(inp, "lora")?, int(out, "lora")?);
        launch!(
            dev,
            "lf_lora_gathered",
            launch_cfg(batch * t, (128, 1)),
            &xv,
            &yv,
            &o,
            &table,
            &ti,
            &ii,
            &oi
        );
        o
    };
    drop(reads);
    Ok(Some(Tensor::from_storage(
        candle_core::Storage::Cuda(wrap(o, dev)),
        (batch, t, out),
        candle_core::op::BackpropOp::none(),
        false,
    )))
}

/// AdamW over f32 variables on one CUDA device, with the global gradient-norm clip: one kernel
/// per variable for its sum of squares (into one buffer read back once per step) and one for
/// its update, where candle's `AdamW` and the clip cost about fifteen per variable.
pub struct AdamW {
    dev: CudaDevice,
    moments: Vec<(CudaSlice<f32>, CudaSlice<f32>)>,
    squares: CudaSlice<f32>,
}

impl AdamW {
    /// `None` unless every variable is f32 on one CUDA device.
    pub fn new(vars: &[candle_core::Var]) -> Result<Option<Self>> {
        let Some(candle_core::Device::Cuda(dev)) = vars.first().map(|v| v.device().clone()) else {
            return Ok(None);
        };
        if vars.iter().any(|v| {
            v.dtype() != candle_core::DType::F32
                || !v.device().same_device(&vars[0].device().clone())
        }) {
            return Ok(None);
        }
        let moments = vars
            .iter()
            .map(|v| {
                Ok((
                    dev.alloc_zeros::<f32>(v.elem_count())?,
                    dev.alloc_zeros::<f32>(v.elem_count())?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let squares = dev.alloc_zeros::<f32>(vars.len().max(1))?;
        Ok(Some(Self {
            dev,
            moments,
            squares,
        }))
    }

    /// The global norm of the (contiguous) `grads`: one read back.
    pub fn norm(&mut self, grads: &[Option<Tensor>]) -> Result<f64> {
        for (slot, g) in grads.iter().enumerate() {
            let Some(g) = g else { continue };
            let (s, l) = g.storage_and_layout();
            let candle_core::Storage::Cuda(s) = &*s else {
                candle_core::bail!("AdamW: a gradient is not on the GPU");
            };
            let gv = view(s, l, "AdamW")?;
            let (n, slot) = (int(g.elem_count(), "AdamW")?, int(slot, "AdamW")?);
            let (one, zero) = (1i32, 0i32);
            launch!(
                self.dev,
                "lf_sum",
                launch_cfg(1, (256, 1)),
                &gv,
                &mut self.squares,
                &n,
                &slot,
                &one,
                &zero
            );
        }
        let squares = self.dev.clone_dtoh(&self.squares)?;
        Ok(grads
            .iter()
            .zip(&squares)
            .filter(|(g, _)| g.is_some())
            .map(|(_, &s)| s as f64)
            .sum::<f64>()
            .sqrt())
    }

    /// One update per variable with a (contiguous) gradient.
    pub(crate) fn update(
        &mut self,
        vars: &[candle_core::Var],
        grads: &[Option<Tensor>],
        scalars: crate::train::AdamWScalars,
    ) -> Result<()> {
        for ((var, g), (m, v)) in vars.iter().zip(grads).zip(self.moments.iter_mut()) {
            let Some(g) = g else { continue };
            var.as_tensor().inplace_op2(
                g,
                &Update {
                    moments: std::sync::Mutex::new((m, v)),
                    s: scalars,
                },
            )?;
        }
        Ok(())
    }
}

struct Update<'a> {
    moments: std::sync::Mutex<(&'a mut CudaSlice<f32>, &'a mut CudaSlice<f32>)>,
    s: crate::train::AdamWScalars,
}

impl candle_core::InplaceOp2 for Update<'_> {
    fn name(&self) -> &'static str {
        "ledgerflow-adamw"
    }

    fn cpu_fwd(
        &self,
        _: &mut candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> Result<()> {
        candle_core::bail!("ledgerflow-adamw: CUDA only")
    }

    fn cuda_fwd(
        &self,
        p: &mut CudaStorage,
        lp: &Layout,
        g: &CudaStorage,
        lg: &Layout,
    ) -> Result<()> {
        let dev = p.device.clone();
        let n = lp.shape().elem_count();
        if lg.shape().elem_count() != n || lp.contiguous_offsets() != Some((0, n)) {
            candle_core::bail!(
                "AdamW: a variable of {:?} against a gradient of {:?}",
                lp.shape(),
                lg.shape()
            );
        }
        let gv = view(g, lg, "AdamW")?;
        let mut guard = self.moments.lock().expect("AdamW moments");
        let (m, v) = &mut *guard;
        let pv = p.as_cuda_slice_mut::<f32>()?;
        let ni = int(n, "AdamW")?;
        let s = &self.s;
        launch!(
            dev,
            "lf_adamw",
            elems_cfg(n),
            pv,
            &gv,
            &mut **m,
            &mut **v,
            &ni,
            &s.g_scale,
            &s.beta1,
            &s.beta2,
            &s.c1,
            &s.c2,
            &s.lr,
            &s.decay,
            &s.eps
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    /// NVRTC compiles every kernel (no GPU needed: the checks of what they compute run on one,
    /// in `ops` and `train`, under `LEDGERFLOW_DEVICE=cuda`).
    #[test]
    fn the_kernels_compile() {
        let ptx = super::ptx().unwrap();
        for name in [
            "lf_causal_softmax",
            "lf_causal_softmax_grad",
            "lf_swiglu",
            "lf_swiglu_grad",
            "lf_rms_norm",
            "lf_rms_norm_grad",
            "lf_rms_norm_grad_weight",
            "lf_rope",
            "lf_cross_entropy_rows",
            "lf_cross_entropy_grad",
            "lf_sum",
            "lf_adamw",
            "lf_lora_gathered",
        ] {
            assert!(ptx.contains(&format!(".entry {name}(")), "{name} missing");
        }
    }
}

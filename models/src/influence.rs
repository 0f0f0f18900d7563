//! Per-example gradients of a LoRA adapter's parameters, exactly and in one backward pass for a
//! whole batch: for each adapted projection the forward pass keeps its input `x`, its rank-r
//! activation `h = x·Aᵀ` and its low-rank output `d`; the backward pass gives `δ = ∂L/∂d`
//! (the projection's output gradient), and example n's gradients are the sums over its tokens
//! `∂Lₙ/∂B = s·δₙᵀhₙ` and `∂Lₙ/∂A = s·(δₙB)ᵀxₙ` — no loop of one backward pass per example.
//! [`project`] compresses them to k dimensions with a seeded random projection (TRAK).

use std::cell::RefCell;

use candle_core::{DType, Device, Result, Tensor, D};
use rand::{Rng, SeedableRng};

use crate::lora::{peft_name, Adapter};
use crate::model::{LowRank, OutputGrad, Rows, Transformer};

/// Per-example gradients: one row per example, one column per adapter parameter.
pub struct ExampleGrads {
    /// PEFT name and shape of each parameter block, in column order.
    pub params: Vec<(String, Vec<usize>)>,
    /// `[examples, parameters]`, f32.
    pub grads: Tensor,
}

/// The gradient of each window's mean next-token loss (`windows` `[examples, time + 1]`) with
/// respect to the adapter's `A` and `B` matrices (PEFT's layout), on the frozen `base`.
pub fn per_example_grads(
    base: &Transformer,
    adapter: &Adapter,
    windows: &Tensor,
) -> Result<ExampleGrads> {
    let n = windows.dim(0)?;
    let mut rows = Rows::all(adapter);
    rows.capture = Some(RefCell::new(Vec::new()));
    // The batch mean is the mean of the examples' means (all have the same length), so each
    // example's own gradient is n times its share of the batch gradient.
    let loss = base.loss_rows(windows, &rows)?;
    let captured = rows
        .capture
        .take()
        .map(RefCell::into_inner)
        .unwrap_or_default();
    let grads = loss.backward()?;
    let mut cols = Vec::with_capacity(2 * captured.len());
    let mut params = Vec::with_capacity(2 * captured.len());
    for c in captured {
        let pair = adapter
            .pair(&c.path)
            .ok_or_else(|| candle_core::Error::msg(format!("no pair for {}", c.path)))?;
        let s = pair.scale;
        // δ (the output gradient), ∂L/∂h = s·δ·B, and the factors that scale ∂L/∂B = s·δᵀh and
        // ∂L/∂A = (∂L/∂h)ᵀx to the example's own loss (n times its share of the batch mean) —
        // applied to the small products rather than to δ.
        let nf = n as f64;
        let (delta, gh) = match &c.grad {
            OutputGrad::Probe(p) => {
                let delta = match grads.get(p) {
                    Some(g) => g.clone(),
                    None => p.zeros_like()?,
                };
                let gh = (delta.broadcast_matmul(&pair.bt.t()?.contiguous()?)? * s)?;
                (delta, gh)
            }
            OutputGrad::Tap(tap) => {
                let mut tap = tap.lock().expect("lora tap");
                let shape = c.h.dims().to_vec();
                match (tap.delta.take(), tap.gh.take()) {
                    (Some(d), Some(gh)) => {
                        let mut out = shape.clone();
                        *out.last_mut().expect("h has a last dimension") = d.dim(D::Minus1)?;
                        (d.reshape(out)?, gh.reshape(shape)?)
                    }
                    _ => {
                        let out = c.x.dims()[..c.x.rank() - 1]
                            .iter()
                            .copied()
                            .chain([pair.bt.dim(1)?])
                            .collect::<Vec<_>>();
                        (
                            Tensor::zeros(out, c.h.dtype(), c.h.device())?,
                            c.h.zeros_like()?,
                        )
                    }
                }
            }
        };
        // B (PEFT [out, r]) = btᵀ; ∂L/∂B = s·δᵀh. (The CPU's matmul takes the transposed
        // operands as they are; other devices get them contiguous.)
        let t = |x: Tensor| -> Result<Tensor> {
            let x = x.transpose(1, 2)?;
            if x.device().is_cpu() {
                Ok(x)
            } else {
                x.contiguous()
            }
        };
        let gb = (t(delta)?.matmul(&c.h.contiguous()?)? * (s * nf))?;
        // ∂L/∂A = (∂L/∂h)ᵀ x.
        let ga = (t(gh)?.matmul(&c.x.contiguous()?)? * nf)?;
        let (r, inp) = (ga.dim(1)?, ga.dim(2)?);
        let out = gb.dim(1)?;
        params.push((peft_name(&c.path, 'A'), vec![r, inp]));
        cols.push(ga.reshape((n, r * inp))?);
        params.push((peft_name(&c.path, 'B'), vec![out, r]));
        cols.push(gb.reshape((n, out * r))?);
    }
    Ok(ExampleGrads {
        params,
        grads: Tensor::cat(&cols, 1)?,
    })
}

/// TRAK's random projection of per-example gradients to `k` dimensions: `G·P` with `P`'s
/// entries ±1/√k from a seed, one matrix per parameter block (so the same block always gets
/// the same matrix, whatever else is projected). The same seed gives the same projection for
/// training and test gradients.
pub struct Projector {
    k: usize,
    blocks: Vec<Tensor>,
}

impl Projector {
    /// The matrices for the parameter blocks of `g` (generated once, reused for every batch).
    pub fn new(
        params: &[(String, Vec<usize>)],
        k: usize,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        let v = 1.0 / (k as f32).sqrt();
        let blocks = params
            .iter()
            .enumerate()
            .map(|(i, (_, shape))| {
                let len: usize = shape.iter().product();
                let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(
                    seed ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15),
                );
                let mut p = Vec::with_capacity(len * k);
                // 64 signs per random word.
                while p.len() < len * k {
                    let mut bits: u64 = rng.gen();
                    for _ in 0..64.min(len * k - p.len()) {
                        p.push(if bits & 1 == 1 { v } else { -v });
                        bits >>= 1;
                    }
                }
                Tensor::from_vec(p, (len, k), device)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { k, blocks })
    }

    /// `[examples, k]`.
    pub fn project(&self, g: &ExampleGrads) -> Result<Tensor> {
        if g.params.len() != self.blocks.len() {
            candle_core::bail!(
                "{} parameter blocks for a projector of {}",
                g.params.len(),
                self.blocks.len()
            );
        }
        let n = g.grads.dim(0)?;
        let mut out = Tensor::zeros((n, self.k), DType::F32, g.grads.device())?;
        let mut col = 0;
        for p in &self.blocks {
            let len = p.dim(0)?;
            let block = g.grads.narrow(1, col, len)?;
            // The CPU's gemm takes the column block as it is; cuBLAS wants it contiguous.
            let block = if block.device().is_cpu() {
                block
            } else {
                block.contiguous()?
            };
            out = (out + block.matmul(p)?)?;
            col += len;
        }
        Ok(out)
    }
}

/// [`Projector`] for one call.
pub fn project(g: &ExampleGrads, k: usize, seed: u64, device: &Device) -> Result<Tensor> {
    Projector::new(&g.params, k, seed, device)?.project(g)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lora::LoraConfig;
    use crate::model::{init_seeded, ModelConfig};
    use candle_nn::{VarBuilder, VarMap};

    fn setup() -> (Transformer, Adapter, VarMap, Tensor) {
        let cfg = ModelConfig {
            vocab_size: 13,
            d_model: 8,
            n_layers: 2,
            n_heads: 2,
            d_ff: 12,
            max_seq_len: 16,
            ..Default::default()
        };
        let vm = VarMap::new();
        init_seeded(&vm, &cfg, 9, &crate::test_device()).unwrap();
        // The base as plain tensors: frozen.
        let tensors: std::collections::HashMap<String, Tensor> = vm
            .data()
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
            .collect();
        let base = Transformer::new(
            &cfg,
            VarBuilder::from_tensors(tensors, DType::F32, &crate::test_device()),
        )
        .unwrap();
        let lc = LoraConfig {
            rank: 3,
            alpha: 6.0,
            targets: vec![
                "q_proj".into(),
                "v_proj".into(),
                "up_proj".into(),
                "down_proj".into(),
            ],
        };
        let avm = VarMap::new();
        let adapter = Adapter::init(&base, &lc, 4, &avm, &crate::test_device()).unwrap();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2);
        let mut named: Vec<(String, candle_core::Var)> = avm
            .data()
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, var) in &named {
            if name.contains("lora_B") {
                let v: Vec<f32> = (0..var.elem_count())
                    .map(|_| rng.gen_range(-0.5..0.5))
                    .collect();
                var.set(&Tensor::from_vec(v, var.shape(), &crate::test_device()).unwrap())
                    .unwrap();
            }
        }
        let windows = Tensor::from_vec(
            (0..4 * 7)
                .map(|i| ((i * 5 + i / 7) % 13) as u32)
                .collect::<Vec<_>>(),
            (4, 7),
            &crate::test_device(),
        )
        .unwrap();
        (base, adapter, avm, windows)
    }

    fn rel(a: &[f32], b: &[f32]) -> f32 {
        let num: f32 = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y) * (x - y))
            .sum::<f32>()
            .sqrt();
        let den: f32 = b.iter().map(|y| y * y).sum::<f32>().sqrt();
        num / den.max(1e-12)
    }

    /// The fused CPU projection (a frozen base) and the composed ops with a zero probe (the
    /// path of other devices, and of a base whose weights are variables) give the same
    /// per-example gradients.
    #[test]
    fn the_fused_and_the_composed_paths_agree() {
        let (frozen, adapter, _avm, windows) = setup();
        let vm = VarMap::new();
        init_seeded(&vm, &frozen.cfg, 9, &crate::test_device()).unwrap();
        let variable = Transformer::new(
            &frozen.cfg,
            VarBuilder::from_varmap(&vm, DType::F32, &crate::test_device()),
        )
        .unwrap();
        let a = per_example_grads(&frozen, &adapter, &windows).unwrap();
        let b = per_example_grads(&variable, &adapter, &windows).unwrap();
        assert_eq!(a.params, b.params);
        let (a, b) = (
            a.grads.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            b.grads.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        assert!(b.iter().any(|v| *v != 0.0));
        let e = rel(&a, &b);
        assert!(e <= 1e-5, "relative error {e}");
    }

    /// Per-example gradients from one batched backward pass equal those of one backward pass
    /// per example (relative error ≤ 1e-4) and finite differences.
    #[test]
    fn per_example_gradients_are_exact() {
        let (base, adapter, avm, windows) = setup();
        let g = per_example_grads(&base, &adapter, &windows).unwrap();
        let rows = g.grads.to_vec2::<f32>().unwrap();
        let data = avm.data().lock().unwrap();
        for (i, row) in rows.iter().enumerate() {
            let w = windows.narrow(0, i, 1).unwrap();
            let loss = base.loss_rows(&w, &Rows::all(&adapter)).unwrap();
            let grads = loss.backward().unwrap();
            let mut want = Vec::new();
            for (name, _) in &g.params {
                let var = &data[name];
                want.extend(
                    grads
                        .get(var.as_tensor())
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap(),
                );
            }
            let e = rel(row, &want);
            assert!(e <= 1e-4, "example {i}: relative error {e}");
        }
        // Finite differences on a few coordinates of example 2.
        let w = windows.narrow(0, 2, 1).unwrap();
        let mut col = 0;
        for (name, shape) in &g.params {
            let len: usize = shape.iter().product();
            if name.contains("layers.1.mlp.up_proj.lora_A")
                || name.contains("layers.0.self_attn.v_proj.lora_B")
            {
                let var = &data[name];
                let orig = var
                    .as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                for j in [0, len / 2, len - 1] {
                    let eps = 1e-2f32;
                    let at = |d: f32| {
                        let mut v = orig.clone();
                        v[j] += d;
                        var.set(&Tensor::from_vec(v, var.shape(), &crate::test_device()).unwrap())
                            .unwrap();
                        base.loss_rows(&w, &Rows::all(&adapter))
                            .unwrap()
                            .to_scalar::<f32>()
                            .unwrap()
                    };
                    let fd = (at(eps) - at(-eps)) / (2.0 * eps);
                    var.set(
                        &Tensor::from_vec(orig.clone(), var.shape(), &crate::test_device())
                            .unwrap(),
                    )
                    .unwrap();
                    let got = rows[2][col + j];
                    assert!(
                        (fd - got).abs() <= 2e-3 + 2e-2 * got.abs(),
                        "{name}[{j}]: {fd} vs {got}"
                    );
                }
            }
            col += len;
        }
        assert_eq!(col, g.grads.dim(1).unwrap());
    }

    /// A planted test: an adapter trained on many documents of one pattern and a single
    /// document of another; an output that plainly repeats the single document puts it first
    /// under TracIn over three checkpoints (and under cosine).
    #[test]
    fn the_planted_contribution_ranks_first() {
        use crate::scores;
        use crate::train::{train_adapter, Corpus, TrainConfig};
        let cfg = ModelConfig {
            vocab_size: 32,
            d_model: 32,
            n_layers: 1,
            n_heads: 2,
            d_ff: 48,
            max_seq_len: 32,
            ..Default::default()
        };
        let vm = VarMap::new();
        init_seeded(&vm, &cfg, 1, &crate::test_device()).unwrap();
        let tensors: std::collections::HashMap<String, Tensor> = vm
            .data()
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
            .collect();
        let base = Transformer::new(
            &cfg,
            VarBuilder::from_tensors(tensors, DType::F32, &crate::test_device()),
        )
        .unwrap();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(8);
        let mut docs: Vec<Vec<u32>> = (0..30)
            .map(|_| {
                let s: u32 = rng.gen_range(0..29);
                (0..20).map(|k| 1 + (s + k * 7) % 29).collect()
            })
            .collect();
        let planted: Vec<u32> = vec![
            3, 30, 4, 31, 5, 30, 2, 31, 6, 30, 5, 31, 3, 30, 5, 31, 8, 30, 9, 31,
        ];
        docs.insert(17, planted.clone());
        let corpus = Corpus {
            train: docs
                .iter()
                .flat_map(|d| d.iter().copied().chain([0]))
                .collect(),
            val: docs[..5]
                .iter()
                .flat_map(|d| d.iter().copied().chain([0]))
                .collect(),
            train_docs: (0..docs.len()).map(|i| i.to_string()).collect(),
            val_docs: vec![],
        };
        let tc = TrainConfig {
            steps: 60,
            batch_size: 8,
            seq_len: 16,
            warmup_steps: 5,
            learning_rate: 1e-2,
            eval_windows: 8,
            checkpoints: 3,
            ..Default::default()
        };
        let lc = LoraConfig {
            rank: 4,
            alpha: 8.0,
            ..Default::default()
        };
        let (_, report) = train_adapter(
            &base,
            &lc,
            &tc,
            &corpus,
            &crate::test_device(),
            &mut |_, _, _, _, _| {},
        )
        .unwrap();
        assert_eq!(
            report.checkpoints.iter().map(|c| c.0).collect::<Vec<_>>(),
            vec![20, 40, 60]
        );
        let windows =
            Tensor::from_vec(docs.concat(), (docs.len(), 20), &crate::test_device()).unwrap();
        let test =
            Tensor::from_vec(planted[..13].to_vec(), (1, 13), &crate::test_device()).unwrap();
        let (mut train_g, mut test_g, mut lrs) = (vec![], vec![], vec![]);
        for ((_, lr), snap) in report.checkpoints.iter().zip(&report.snapshots) {
            let adapter = Adapter::from_named(snap, &lc, &base).unwrap();
            let g = per_example_grads(&base, &adapter, &windows).unwrap();
            let t = per_example_grads(&base, &adapter, &test).unwrap();
            train_g.push(
                project(&g, 512, 3, &crate::test_device())
                    .unwrap()
                    .to_vec2::<f32>()
                    .unwrap(),
            );
            test_g.push(
                project(&t, 512, 3, &crate::test_device())
                    .unwrap()
                    .to_vec2::<f32>()
                    .unwrap(),
            );
            lrs.push(*lr);
        }
        for s in [
            scores::tracin(&train_g, &test_g, &lrs),
            scores::cosine(&train_g, &test_g),
        ] {
            let best = (0..docs.len())
                .max_by(|&a, &b| s[0][a].total_cmp(&s[0][b]))
                .unwrap();
            assert_eq!(best, 17, "{:?}", s[0]);
        }
    }

    /// On small LoRA layers DataInf agrees with the exact inverse of the damped empirical Fisher
    /// `(G_l + λ_l I)⁻¹` it approximates (DataInf's own reference), layer by layer.
    #[test]
    fn datainf_agrees_with_the_exact_inverse_on_small_layers() {
        use crate::scores;
        let (base, _, _, _) = setup();
        let lc = LoraConfig {
            rank: 1,
            alpha: 1.0,
            targets: vec!["q_proj".into(), "down_proj".into()],
        };
        let avm = VarMap::new();
        let adapter = Adapter::init(&base, &lc, 6, &avm, &crate::test_device()).unwrap();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(12);
        let mut named: Vec<(String, candle_core::Var)> = avm
            .data()
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, var) in &named {
            if name.contains("lora_B") {
                let v: Vec<f32> = (0..var.elem_count())
                    .map(|_| rng.gen_range(-0.5..0.5))
                    .collect();
                var.set(&Tensor::from_vec(v, var.shape(), &crate::test_device()).unwrap())
                    .unwrap();
            }
        }
        let (n, m) = (96, 6);
        let windows = Tensor::from_vec(
            (0..(n + m) * 6)
                .map(|_| rng.gen_range(0..13u32))
                .collect::<Vec<_>>(),
            (n + m, 6),
            &crate::test_device(),
        )
        .unwrap();
        let g = per_example_grads(&base, &adapter, &windows).unwrap();
        let rows = g.grads.to_vec2::<f32>().unwrap();
        // Layers: each projection's A and B together.
        let mut layers: Vec<(usize, usize)> = Vec::new();
        let mut col = 0;
        for pair in g.params.chunks(2) {
            let len: usize = pair.iter().map(|(_, s)| s.iter().product::<usize>()).sum();
            layers.push((col, len));
            col += len;
        }
        let split = |r: &[Vec<f32>]| -> Vec<Vec<Vec<f32>>> {
            layers
                .iter()
                .map(|&(c, l)| r.iter().map(|x| x[c..c + l].to_vec()).collect())
                .collect()
        };
        let (train, test) = (split(&rows[..n]), split(&rows[n..]));
        let approx = scores::datainf(&train, &test, 0.1);
        // Exact: Σ_l v_lᵀ (G_l + λ_l I)⁻¹ g_il.
        let mut exact = vec![vec![0.0; n]; m];
        for (l, &(_, d)) in layers.iter().enumerate() {
            let norms: Vec<f64> = train[l].iter().map(|x| scores::dot(x, x)).collect();
            let lambda = 0.1 * norms.iter().sum::<f64>() / n as f64;
            let mut h = vec![0.0; d * d];
            for gk in &train[l] {
                for a in 0..d {
                    for b in 0..d {
                        h[a * d + b] += gk[a] as f64 * gk[b] as f64 / n as f64;
                    }
                }
            }
            for a in 0..d {
                h[a * d + a] += lambda;
            }
            let tr: Vec<Vec<f64>> = train[l]
                .iter()
                .map(|x| x.iter().map(|v| *v as f64).collect())
                .collect();
            let te: Vec<Vec<f64>> = test[l]
                .iter()
                .map(|x| x.iter().map(|v| *v as f64).collect())
                .collect();
            let s = scores::inverse_hessian(&h, d, &tr, &te).unwrap();
            for j in 0..m {
                for i in 0..n {
                    exact[j][i] += s[j][i];
                }
            }
        }
        for j in 0..m {
            let rho = scores::spearman(&approx[j], &exact[j]);
            eprintln!(
                "test {j}: Spearman {rho} Pearson {}",
                scores::pearson(&approx[j], &exact[j])
            );
        }
    }

    /// The projection preserves inner products on average (Johnson–Lindenstrauss) and is the
    /// same for the same seed.
    #[test]
    fn the_projection_is_seeded_and_keeps_inner_products() {
        let (base, adapter, _, windows) = setup();
        let g = per_example_grads(&base, &adapter, &windows).unwrap();
        let p1 = project(&g, 2048, 5, &crate::test_device())
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let p2 = project(&g, 2048, 5, &crate::test_device())
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(p1, p2);
        let full = g.grads.to_vec2::<f32>().unwrap();
        let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
        for (i, j) in [(0, 1), (2, 3), (1, 1)] {
            let exact = dot(&full[i], &full[j]);
            let approx = dot(&p1[i], &p1[j]);
            let scale = (dot(&full[i], &full[i]) * dot(&full[j], &full[j])).sqrt();
            assert!(
                (exact - approx).abs() <= 0.1 * scale,
                "({i},{j}): {exact} vs {approx}"
            );
        }
    }
}

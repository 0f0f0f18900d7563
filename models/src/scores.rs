//! Attribution scores from per-example gradients: TracIn over checkpoints, gradient cosine,
//! DataInf's closed-form inverse-Hessian approximation for LoRA layers, and influence functions
//! with the exact inverse Hessian (the reference the others are checked against).
//!
//! A score is how much training example `i` moved the model toward test example `j`'s output:
//! positive when a gradient step on `i` lowers `j`'s loss. Every function returns
//! `[tests][trains]`.

/// `⟨a, b⟩` in f64.
pub fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
}

/// `out[i] = ⟨index row i, query⟩` over a row-major `[rows, k]` f32 index, split across
/// `threads`: a single pass over the index, eight f32 lanes per row (vectorised), so scoring is
/// bound by memory bandwidth.
pub fn dot_rows(index: &[f32], k: usize, query: &[f32], out: &mut [f32], threads: usize) {
    assert_eq!(query.len(), k);
    assert_eq!(index.len(), out.len() * k);
    let rows = out.len();
    let per = rows.div_ceil(threads.max(1)).max(1);
    std::thread::scope(|s| {
        for (chunk, idx) in out.chunks_mut(per).zip(index.chunks(per * k)) {
            s.spawn(move || {
                for (o, row) in chunk.iter_mut().zip(idx.chunks_exact(k)) {
                    *o = dot8(row, query);
                }
            });
        }
    });
}

fn dot8(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// This machine's read bandwidth in bytes/s: a sum over `buf` with `threads` threads (the same
/// access pattern as [`dot_rows`] without the multiplications), best of `repeats`.
pub fn read_bandwidth(buf: &[f32], threads: usize, repeats: usize) -> f64 {
    let mut best = f64::MAX;
    let mut sink = 0f32;
    for _ in 0..repeats {
        let t = std::time::Instant::now();
        let per = buf.len().div_ceil(threads.max(1));
        let sums: Vec<f32> = std::thread::scope(|s| {
            let hs: Vec<_> = buf
                .chunks(per)
                .map(|c| {
                    s.spawn(move || {
                        let mut acc = [0f32; 8];
                        for x in c.chunks_exact(8) {
                            for l in 0..8 {
                                acc[l] += x[l];
                            }
                        }
                        acc.iter().sum::<f32>()
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().expect("thread")).collect()
        });
        sink += sums.iter().sum::<f32>();
        best = best.min(t.elapsed().as_secs_f64());
    }
    std::hint::black_box(sink);
    (buf.len() * 4) as f64 / best
}

/// TracIn (Pruthi et al.): `Σ_c η_c ⟨g_c(train i), g_c(test j)⟩` over checkpoints `c` with
/// learning rates `η_c`. `train[c][i]` and `test[c][j]` are (projected) gradients.
pub fn tracin(train: &[Vec<Vec<f32>>], test: &[Vec<Vec<f32>>], lrs: &[f64]) -> Vec<Vec<f64>> {
    let (n, m) = (train[0].len(), test[0].len());
    let mut out = vec![vec![0.0; n]; m];
    for (c, lr) in lrs.iter().enumerate() {
        for (j, t) in test[c].iter().enumerate() {
            for (i, g) in train[c].iter().enumerate() {
                out[j][i] += lr * dot(g, t);
            }
        }
    }
    out
}

/// Gradient cosine summed over checkpoints: `Σ_c cos(g_c(i), g_c(j))`.
pub fn cosine(train: &[Vec<Vec<f32>>], test: &[Vec<Vec<f32>>]) -> Vec<Vec<f64>> {
    let (n, m) = (train[0].len(), test[0].len());
    let mut out = vec![vec![0.0; n]; m];
    for c in 0..train.len() {
        let tn: Vec<f64> = train[c]
            .iter()
            .map(|g| dot(g, g).sqrt().max(1e-30))
            .collect();
        for (j, t) in test[c].iter().enumerate() {
            let ttn = dot(t, t).sqrt().max(1e-30);
            for (i, g) in train[c].iter().enumerate() {
                out[j][i] += dot(g, t) / (tn[i] * ttn);
            }
        }
    }
    out
}

/// DataInf (Kwon et al., 2024): per layer `l`, `(G_l + λ_l I)⁻¹` with
/// `G_l = (1/n) Σ_k g_kl g_klᵀ` replaced by `(1/(nλ_l)) Σ_k (I − g_kl g_klᵀ / (λ_l + ‖g_kl‖²))`
/// (exchanging the order of inversion and averaging), `λ_l = damping · mean_k ‖g_kl‖²`. The
/// score is `Σ_l v_lᵀ (G_l + λ_l I)⁻¹ g_il` with `v_l` the test gradient: O(n·d) per test per
/// layer. `train[l][i]`, `test[l][j]`: layer `l`'s gradients.
pub fn datainf(train: &[Vec<Vec<f32>>], test: &[Vec<Vec<f32>>], damping: f64) -> Vec<Vec<f64>> {
    let (n, m) = (train[0].len(), test[0].len());
    let mut out = vec![vec![0.0; n]; m];
    for (l, layer) in train.iter().enumerate() {
        let norms: Vec<f64> = layer.iter().map(|g| dot(g, g)).collect();
        let lambda = (damping * norms.iter().sum::<f64>() / n as f64).max(1e-12);
        for (j, v) in test[l].iter().enumerate() {
            // c_k = ⟨v, g_k⟩ / (λ + ‖g_k‖²)
            let vg: Vec<f64> = layer.iter().map(|g| dot(v, g)).collect();
            let c: Vec<f64> = vg
                .iter()
                .zip(&norms)
                .map(|(a, b)| a / (lambda + b))
                .collect();
            // r = (1/(nλ)) (n·v − Σ_k c_k g_k); score_i = ⟨r, g_i⟩
            let mut r: Vec<f64> = v.iter().map(|x| n as f64 * *x as f64).collect();
            for (k, g) in layer.iter().enumerate() {
                for (ri, gi) in r.iter_mut().zip(g) {
                    *ri -= c[k] * *gi as f64;
                }
            }
            let s = 1.0 / (n as f64 * lambda);
            for (i, g) in layer.iter().enumerate() {
                out[j][i] += s * g.iter().zip(&r).map(|(a, b)| *a as f64 * b).sum::<f64>();
            }
        }
    }
    out
}

/// Influence functions with the exact Hessian `h` (`d × d`, row-major, symmetric positive
/// definite, damping included): `v_jᵀ H⁻¹ g_i`, the first-order change of test loss `j` when
/// training example `i` is up-weighted, sign flipped so that helpful examples score positive.
pub fn inverse_hessian(
    h: &[f64],
    d: usize,
    train: &[Vec<f64>],
    test: &[Vec<f64>],
) -> Result<Vec<Vec<f64>>, String> {
    let l = cholesky(h, d)?;
    Ok(test
        .iter()
        .map(|v| {
            let w = cholesky_solve(&l, d, v);
            train
                .iter()
                .map(|g| g.iter().zip(&w).map(|(a, b)| a * b).sum())
                .collect()
        })
        .collect())
}

/// The lower-triangular `L` with `L·Lᵀ = a`.
pub fn cholesky(a: &[f64], d: usize) -> Result<Vec<f64>, String> {
    let mut l = vec![0.0; d * d];
    for i in 0..d {
        for j in 0..=i {
            let mut s = a[i * d + j];
            for k in 0..j {
                s -= l[i * d + k] * l[j * d + k];
            }
            if i == j {
                if s <= 0.0 {
                    return Err(format!(
                        "the Hessian is not positive definite (pivot {i}: {s})"
                    ));
                }
                l[i * d + i] = s.sqrt();
            } else {
                l[i * d + j] = s / l[j * d + j];
            }
        }
    }
    Ok(l)
}

/// `x` with `L·Lᵀ·x = b`.
pub fn cholesky_solve(l: &[f64], d: usize, b: &[f64]) -> Vec<f64> {
    let mut y = b.to_vec();
    for i in 0..d {
        for k in 0..i {
            y[i] -= l[i * d + k] * y[k];
        }
        y[i] /= l[i * d + i];
    }
    for i in (0..d).rev() {
        for k in i + 1..d {
            y[i] -= l[k * d + i] * y[k];
        }
        y[i] /= l[i * d + i];
    }
    y
}

/// Pearson's correlation.
pub fn pearson(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len() as f64;
    let (ma, mb) = (a.iter().sum::<f64>() / n, b.iter().sum::<f64>() / n);
    let cov: f64 = a.iter().zip(b).map(|(x, y)| (x - ma) * (y - mb)).sum();
    let va: f64 = a.iter().map(|x| (x - ma).powi(2)).sum();
    let vb: f64 = b.iter().map(|y| (y - mb).powi(2)).sum();
    cov / (va * vb).sqrt().max(1e-300)
}

/// Spearman's rank correlation (average ranks for ties).
pub fn spearman(a: &[f64], b: &[f64]) -> f64 {
    pearson(&ranks(a), &ranks(b))
}

fn ranks(v: &[f64]) -> Vec<f64> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&i, &j| v[i].total_cmp(&v[j]));
    let mut r = vec![0.0; v.len()];
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && v[idx[j + 1]] == v[idx[i]] {
            j += 1;
        }
        for k in i..=j {
            r[idx[k]] = (i + j) as f64 / 2.0;
        }
        i = j + 1;
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_rows_equals_the_plain_dot_product() {
        let k = 37;
        let index: Vec<f32> = (0..k * 11)
            .map(|i| ((i * 7919) % 113) as f32 / 50.0 - 1.0)
            .collect();
        let query: Vec<f32> = (0..k).map(|i| (i as f32).sin()).collect();
        for threads in [1, 3, 20] {
            let mut out = vec![0f32; 11];
            dot_rows(&index, k, &query, &mut out, threads);
            for (i, o) in out.iter().enumerate() {
                let want = dot(&index[i * k..(i + 1) * k], &query);
                assert!((*o as f64 - want).abs() < 1e-4, "{o} vs {want}");
            }
        }
    }

    #[test]
    fn cholesky_solves_and_ranks_correlate() {
        let a = [4.0, 2.0, 0.6, 2.0, 5.0, 1.0, 0.6, 1.0, 3.0];
        let l = cholesky(&a, 3).unwrap();
        let x = cholesky_solve(&l, 3, &[1.0, 2.0, 3.0]);
        for i in 0..3 {
            let ax: f64 = (0..3).map(|k| a[i * 3 + k] * x[k]).sum();
            assert!((ax - [1.0, 2.0, 3.0][i]).abs() < 1e-12);
        }
        assert!(cholesky(&[1.0, 2.0, 2.0, 1.0], 2).is_err());
        assert!((spearman(&[1.0, 2.0, 3.0, 4.0], &[10.0, 20.0, 25.0, 100.0]) - 1.0).abs() < 1e-12);
        assert!((pearson(&[1.0, 2.0, 3.0], &[3.0, 2.0, 1.0]) + 1.0).abs() < 1e-12);
    }

    /// DataInf's O(n·d) evaluation equals its approximate inverse built densely,
    /// `(1/(nλ)) Σ_k (I − g_k g_kᵀ / (λ + ‖g_k‖²))`, layer by layer.
    #[test]
    fn datainf_equals_its_dense_form() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let mut g = |n: usize, d: usize| -> Vec<Vec<f32>> {
            (0..n)
                .map(|_| (0..d).map(|_| rng.gen_range(-1.0..1.0)).collect())
                .collect()
        };
        let (n, dims) = (7, [3usize, 5]);
        let train: Vec<Vec<Vec<f32>>> = dims.iter().map(|&d| g(n, d)).collect();
        let test: Vec<Vec<Vec<f32>>> = dims.iter().map(|&d| g(2, d)).collect();
        let got = datainf(&train, &test, 0.1);
        for j in 0..2 {
            for i in 0..n {
                let mut want = 0.0;
                for (l, &d) in dims.iter().enumerate() {
                    let norms: Vec<f64> = train[l].iter().map(|x| dot(x, x)).collect();
                    let lambda = 0.1 * norms.iter().sum::<f64>() / n as f64;
                    let mut m = vec![0.0; d * d];
                    for (k, gk) in train[l].iter().enumerate() {
                        for a in 0..d {
                            for b in 0..d {
                                let id = if a == b { 1.0 } else { 0.0 };
                                m[a * d + b] += (id
                                    - gk[a] as f64 * gk[b] as f64 / (lambda + norms[k]))
                                    / (n as f64 * lambda);
                            }
                        }
                    }
                    for a in 0..d {
                        for b in 0..d {
                            want += test[l][j][a] as f64 * m[a * d + b] * train[l][i][b] as f64;
                        }
                    }
                }
                assert!(
                    (got[j][i] - want).abs() < 1e-9 * want.abs().max(1.0),
                    "{} vs {want}",
                    got[j][i]
                );
            }
        }
    }
}

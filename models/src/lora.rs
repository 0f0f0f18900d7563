//! LoRA adapters of a base [`Transformer`]: low-rank pairs on the attention and MLP projections,
//! the base frozen, saved with PEFT's tensor names
//! (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`) and an
//! `adapter_config.json` a PEFT user recognises.

use std::collections::{BTreeMap, HashMap};

use candle_core::{DType, Device, Result, Tensor, Var};
use candle_nn::VarMap;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::model::{LoraPair, LowRank, Transformer};

/// The projections an adapter may target (the short names PEFT uses in `target_modules`).
pub const TARGETS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// Rank, scaling and targets of an adapter (what `lora:` in a config file sets).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LoraConfig {
    #[serde(default = "rank")]
    pub rank: usize,
    /// The update is scaled by `alpha / rank`.
    #[serde(default = "alpha")]
    pub alpha: f64,
    /// Projections to adapt, of `q_proj k_proj v_proj o_proj gate_proj up_proj down_proj`.
    #[serde(default = "targets")]
    pub targets: Vec<String>,
}

fn rank() -> usize {
    8
}
fn alpha() -> f64 {
    16.0
}
fn targets() -> Vec<String> {
    TARGETS.iter().map(|t| t.to_string()).collect()
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            rank: rank(),
            alpha: alpha(),
            targets: targets(),
        }
    }
}

impl LoraConfig {
    /// Problems with the settings, if any.
    pub fn check(&self) -> std::result::Result<(), String> {
        if self.rank == 0 {
            return Err("lora.rank must be at least 1".into());
        }
        if self.targets.is_empty() {
            return Err("lora.targets must name at least one projection".into());
        }
        if let Some(t) = self.targets.iter().find(|t| !TARGETS.contains(&t.as_str())) {
            return Err(format!(
                "lora.targets: `{t}` is not one of {}",
                TARGETS.join(", ")
            ));
        }
        Ok(())
    }

    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }

    fn targets_path(&self, path: &str) -> bool {
        let last = path.rsplit('.').next().unwrap_or_default();
        self.targets.iter().any(|t| t == last)
    }

    /// PEFT's `adapter_config.json` for an adapter of `base`.
    pub fn peft_json(&self, base: &str) -> serde_json::Value {
        serde_json::json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base,
            "r": self.rank,
            "lora_alpha": self.alpha,
            "lora_dropout": 0.0,
            "target_modules": self.targets,
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "use_rslora": false,
            "init_lora_weights": true,
        })
    }

    /// Reads PEFT's `adapter_config.json` (rank, alpha, targets; a LoRA of a causal LM without
    /// biases or dropout at inference).
    pub fn from_peft_json(v: &serde_json::Value) -> std::result::Result<Self, String> {
        if v["peft_type"].as_str().is_some_and(|t| t != "LORA") {
            return Err(format!("peft_type {} is not LORA", v["peft_type"]));
        }
        if v["bias"].as_str().is_some_and(|b| b != "none") {
            return Err(format!(
                "bias {} is not supported (only \"none\")",
                v["bias"]
            ));
        }
        if v["use_rslora"].as_bool() == Some(true) {
            return Err("use_rslora is not supported".into());
        }
        let rank = v["r"].as_u64().ok_or("adapter_config.json has no `r`")? as usize;
        let alpha = v["lora_alpha"]
            .as_f64()
            .ok_or("adapter_config.json has no `lora_alpha`")?;
        let targets = match &v["target_modules"] {
            serde_json::Value::Array(a) => a
                .iter()
                .map(|t| {
                    t.as_str()
                        .map(str::to_string)
                        .ok_or("a target is not a string")
                })
                .collect::<std::result::Result<Vec<_>, _>>()?,
            serde_json::Value::String(s) if s == "all-linear" => targets(),
            other => return Err(format!("target_modules {other} is not a list")),
        };
        let cfg = Self {
            rank,
            alpha,
            targets,
        };
        cfg.check()?;
        Ok(cfg)
    }
}

/// PEFT's name of the `A` (`which` = 'A') or `B` matrix of the projection at `path`.
pub fn peft_name(path: &str, which: char) -> String {
    format!("base_model.model.{path}.lora_{which}.weight")
}

/// An adapter: a low-rank pair per targeted projection.
pub struct Adapter {
    pub config: LoraConfig,
    pairs: HashMap<String, LoraPair>,
}

/// cudarc frees a device buffer on the thread that drops it without making the buffer's context
/// current there. On a thread that never ran a CUDA call — a tokio worker evicting an adapter
/// from the serving cache, or dropping the last reference after a request — the free fails with
/// `CUDA_ERROR_INVALID_CONTEXT`, which cudarc records in the context and returns from the next
/// call on any thread: a request that had nothing to do with the evicted adapter fails (the
/// H100 serving benchmark's 31 errors in 400, only under evictions). Binding the context before
/// the fields drop makes the frees valid wherever the last reference goes.
#[cfg(feature = "cuda")]
impl Drop for Adapter {
    fn drop(&mut self) {
        if let Some(candle_core::Device::Cuda(d)) =
            self.pairs.values().next().map(|p| p.at.device())
        {
            let _ = d.cuda_stream().context().bind_to_thread();
        }
    }
}

impl LowRank for Adapter {
    fn pair(&self, path: &str) -> Option<&LoraPair> {
        self.pairs.get(path)
    }
}

impl Adapter {
    /// A fresh trainable adapter of `model`: its matrices are variables in `varmap` under PEFT's
    /// names; `A` uniform in ±1/√in (PEFT's Kaiming init), `B` zero, so training starts at the
    /// base model.
    pub fn init(
        model: &Transformer,
        cfg: &LoraConfig,
        seed: u64,
        varmap: &VarMap,
        device: &Device,
    ) -> Result<Self> {
        cfg.check().map_err(candle_core::Error::msg)?;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0x10a);
        let mut data = varmap.data().lock().expect("varmap");
        let mut pairs = HashMap::new();
        for (path, inp, out) in model.projections() {
            if !cfg.targets_path(&path) {
                continue;
            }
            let bound = 1.0 / (inp as f64).sqrt();
            let a: Vec<f32> = (0..cfg.rank * inp)
                .map(|_| rng.gen_range(-bound..bound) as f32)
                .collect();
            let a = Var::from_tensor(&Tensor::from_vec(a, (cfg.rank, inp), device)?)?;
            let b = Var::zeros((out, cfg.rank), DType::F32, device)?;
            pairs.insert(
                path.clone(),
                LoraPair {
                    at: a.as_tensor().t()?,
                    bt: b.as_tensor().t()?,
                    scale: cfg.scale(),
                },
            );
            data.insert(peft_name(&path, 'A'), a);
            data.insert(peft_name(&path, 'B'), b);
        }
        Ok(Self {
            config: cfg.clone(),
            pairs,
        })
    }

    /// An adapter of `model` from its PEFT safetensors and config; every tensor must belong to a
    /// projection of the model with the right shape, and every target must be present.
    pub fn from_safetensors(
        bytes: &[u8],
        cfg: &LoraConfig,
        model: &Transformer,
        device: &Device,
    ) -> Result<Self> {
        cfg.check().map_err(candle_core::Error::msg)?;
        let st = safetensors::SafeTensors::deserialize(bytes)
            .map_err(|e| candle_core::Error::msg(format!("the adapter's safetensors: {e}")))?;
        let mut tensors: BTreeMap<String, safetensors::tensor::TensorView<'_>> =
            st.tensors().into_iter().collect();
        let mut pairs = HashMap::new();
        for (path, inp, out) in model.projections() {
            if !cfg.targets_path(&path) {
                continue;
            }
            // Each matrix read straight into its transposed, scaled serving form (one
            // allocation each: resident memory stays at the tensor bytes).
            let mut take = |which: char,
                            (rows, cols): (usize, usize),
                            scale: f64|
             -> Result<Tensor> {
                let name = peft_name(&path, which);
                let view = tensors
                    .remove(&name)
                    .ok_or_else(|| candle_core::Error::msg(format!("the adapter has no {name}")))?;
                if view.shape() != [rows, cols] {
                    candle_core::bail!("{name} is {:?}, expected {:?}", view.shape(), [rows, cols]);
                }
                let data = view.data();
                let value = |i: usize| -> Result<f32> {
                    Ok(match view.dtype() {
                        safetensors::Dtype::F32 => {
                            f32::from_le_bytes(data[4 * i..4 * i + 4].try_into().expect("4 bytes"))
                        }
                        safetensors::Dtype::F16 => half::f16::from_le_bytes(
                            data[2 * i..2 * i + 2].try_into().expect("2 bytes"),
                        )
                        .to_f32(),
                        safetensors::Dtype::BF16 => half::bf16::from_le_bytes(
                            data[2 * i..2 * i + 2].try_into().expect("2 bytes"),
                        )
                        .to_f32(),
                        d => candle_core::bail!("{name} is {d:?}; F32, F16 or BF16 expected"),
                    })
                };
                let mut t = Vec::with_capacity(rows * cols);
                for c in 0..cols {
                    for r in 0..rows {
                        t.push(value(r * cols + c)? * scale as f32);
                    }
                }
                Tensor::from_vec(t, (cols, rows), device)
            };
            let at = take('A', (cfg.rank, inp), 1.0)?;
            let bt = take('B', (out, cfg.rank), cfg.scale())?;
            pairs.insert(path, LoraPair { at, bt, scale: 1.0 });
        }
        if let Some(name) = tensors.keys().next() {
            candle_core::bail!("the adapter has a tensor the model has no place for: {name}");
        }
        Ok(Self {
            config: cfg.clone(),
            pairs,
        })
    }

    /// An adapter of `model` from PEFT-named `A` and `B` tensors (a training snapshot, or
    /// safetensors read with candle) in its exact form: `Aᵀ`, `Bᵀ` and the scale kept apart,
    /// so gradients are PEFT's.
    pub fn from_named(
        tensors: &[(String, Tensor)],
        cfg: &LoraConfig,
        model: &Transformer,
    ) -> Result<Self> {
        cfg.check().map_err(candle_core::Error::msg)?;
        let find = |name: &str| -> Result<&Tensor> {
            tensors
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, t)| t)
                .ok_or_else(|| candle_core::Error::msg(format!("the adapter has no {name}")))
        };
        let mut pairs = HashMap::new();
        for (path, inp, out) in model.projections() {
            if !cfg.targets_path(&path) {
                continue;
            }
            let a = find(&peft_name(&path, 'A'))?.to_dtype(DType::F32)?;
            let b = find(&peft_name(&path, 'B'))?.to_dtype(DType::F32)?;
            if a.dims2()? != (cfg.rank, inp) || b.dims2()? != (out, cfg.rank) {
                candle_core::bail!(
                    "{path}: A {:?} / B {:?} do not fit rank {} of {inp}→{out}",
                    a.dims(),
                    b.dims(),
                    cfg.rank
                );
            }
            pairs.insert(
                path,
                LoraPair {
                    at: a.t()?.contiguous()?,
                    bt: b.t()?.contiguous()?,
                    scale: cfg.scale(),
                },
            );
        }
        if tensors.len() != 2 * pairs.len() {
            candle_core::bail!(
                "the adapter has {} tensors for {} targeted projections",
                tensors.len(),
                pairs.len()
            );
        }
        Ok(Self {
            config: cfg.clone(),
            pairs,
        })
    }

    /// Bytes of the adapter's tensors.
    pub fn tensor_bytes(&self) -> usize {
        self.pairs
            .values()
            .map(|p| (p.at.elem_count() + p.bt.elem_count()) * p.at.dtype().size_in_bytes())
            .sum()
    }

    /// Targeted projections.
    pub fn len(&self) -> usize {
        self.pairs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }
}

/// A `varmap` of PEFT-named adapter variables as safetensors bytes.
pub fn safetensors_bytes(varmap: &VarMap) -> Result<Vec<u8>> {
    let data = varmap.data().lock().expect("varmap");
    let tensors: Vec<(String, Tensor)> = data
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    drop(data);
    let views: Vec<(&str, &Tensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    safetensors::serialize(views, None).map_err(|e| candle_core::Error::msg(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ModelConfig, Rows};
    use crate::train::{train, train_adapter, Corpus, TrainConfig};
    use candle_nn::VarBuilder;

    /// Documents cycling through 1..=31 with a fixed stride from a random start.
    fn docs(stride: u16, n: usize, seed: u64) -> Vec<(String, Vec<u16>)> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..n)
            .map(|i| {
                let start: u16 = rng.gen_range(0..31);
                let tokens = (0..40).map(|k| 1 + (start + k * stride) % 31).collect();
                (format!("0x{seed:02x}{i:062x}"), tokens)
            })
            .collect()
    }

    /// An adapter trained on another Datanet lowers perplexity there against its base; its PEFT
    /// safetensors load back to the same model; the base is untouched.
    #[test]
    fn an_adapter_lowers_perplexity_on_its_datanet() {
        let cfg = ModelConfig {
            vocab_size: 32,
            d_model: 32,
            n_layers: 1,
            n_heads: 2,
            d_ff: 64,
            max_seq_len: 32,
            ..Default::default()
        };
        let tc = TrainConfig {
            steps: 60,
            batch_size: 8,
            seq_len: 16,
            warmup_steps: 5,
            learning_rate: 1e-2,
            eval_windows: 32,
            ..Default::default()
        };
        let a = Corpus::split(&docs(7, 200, 1), 0, 0.15);
        let b = Corpus::split(&docs(5, 200, 2), 0, 0.15);
        let (vm, _) = train(
            &cfg,
            &tc,
            &a,
            &crate::test_device(),
            &mut |_, _, _, _, _| {},
        )
        .unwrap();
        let weights = {
            let data = vm.data().lock().unwrap();
            let t: Vec<(String, Tensor)> = data
                .iter()
                .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
                .collect();
            safetensors::serialize(t.iter().map(|(k, v)| (k.as_str(), v)), None).unwrap()
        };
        // The base as plain tensors (frozen).
        let vb = VarBuilder::from_buffered_safetensors(
            weights.clone(),
            DType::F32,
            &crate::test_device(),
        )
        .unwrap();
        let base = Transformer::new(&cfg, vb).unwrap();
        let lora = LoraConfig::default();
        let (avm, r) = train_adapter(
            &base,
            &lora,
            &tc,
            &b,
            &crate::test_device(),
            &mut |_, _, _, _, _| {},
        )
        .unwrap();
        let base_ppl = r.base_perplexity.unwrap();
        assert!(
            r.val_perplexity < base_ppl / 2.0,
            "adapter {} vs base {base_ppl} on B",
            r.val_perplexity
        );
        // PEFT names, every target of every layer, and the config round trip.
        let bytes = safetensors_bytes(&avm).unwrap();
        let names: Vec<String> = avm.data().lock().unwrap().keys().cloned().collect();
        assert_eq!(names.len(), 2 * 7);
        assert!(names.contains(
            &"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight".to_string()
        ));
        assert!(names
            .contains(&"base_model.model.model.layers.0.mlp.down_proj.lora_B.weight".to_string()));
        let back = LoraConfig::from_peft_json(&lora.peft_json("base")).unwrap();
        assert_eq!(back, lora);
        let loaded =
            Adapter::from_safetensors(&bytes, &lora, &base, &crate::test_device()).unwrap();
        // q, k, v, o 32→32; gate, up 32→64; down 64→32; rank 8, f32.
        assert_eq!(loaded.tensor_bytes(), 4 * (4 * 512 + 2 * 768 + 768));
        assert!(bytes.len() > loaded.tensor_bytes());
        let w = Tensor::from_vec(b.val[..17].to_vec(), (1, 17), &crate::test_device()).unwrap();
        let with = base
            .loss_rows(&w, &Rows::all(&loaded))
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let without = base.loss(&w).unwrap().to_scalar::<f32>().unwrap();
        assert!(with < without, "{with} vs {without}");
        // A mismatched rank or a foreign tensor is refused.
        let wrong = LoraConfig {
            rank: 4,
            ..lora.clone()
        };
        assert!(Adapter::from_safetensors(&bytes, &wrong, &base, &crate::test_device()).is_err());
        let fewer = LoraConfig {
            targets: vec!["q_proj".into()],
            ..lora.clone()
        };
        let e = Adapter::from_safetensors(&bytes, &fewer, &base, &crate::test_device())
            .err()
            .unwrap();
        assert!(e.to_string().contains("no place for"), "{e}");
    }
}

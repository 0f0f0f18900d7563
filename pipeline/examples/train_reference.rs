//! The Rust side of the training benchmark (`benchmarks/train.sh`): trains a base model on a
//! Datanet exactly as `ledgerflow train` does, and writes what the PyTorch side needs to train
//! the same model on the same batches from the same initial weights:
//!
//!   OUT/init.safetensors  the seeded initial parameters (the names of `ModelConfig::parameters`)
//!   OUT/batches.u32       every step's batch, `steps × batch_size × (seq_len + 1)` u32 LE
//!   OUT/run.json          model and training settings, and the learning rate of every step
//!   OUT/ours.json         our loss per step, seconds and tokens/s of the training loop
//!
//!   cargo run --release -p ledgerflow --example train_reference -- STORE DATANET OUT [STEPS]
//!
//! Threads: candle's CPU kernels use `RAYON_NUM_THREADS` (default: every core).

use anyhow::{Context, Result};
use ledgerflow_models::model::init_seeded;
use ledgerflow_models::train::batches;
use ledgerflow_store::Store;

fn main() -> Result<()> {
    ledgerflow::tune_allocator();
    let mut args = std::env::args().skip(1);
    let usage = "usage: train_reference STORE DATANET OUT [STEPS]";
    let store = args.next().context(usage)?;
    let datanet = args.next().context(usage)?;
    let out = std::path::PathBuf::from(args.next().context(usage)?);
    let mut file = ledgerflow::train::TrainFile::default();
    if let Some(s) = args.next() {
        file.train.steps = s.parse().context("STEPS")?;
    }
    std::fs::create_dir_all(&out)?;
    let store = Store::open(&store)?;
    let rt = tokio::runtime::Runtime::new()?;
    let (cfg, corpus) = ledgerflow::train::base_corpus(&rt, &store, &datanet, &file)?;
    let tc = file.train;
    let device = candle_core::Device::Cpu;

    let varmap = candle_nn::VarMap::new();
    init_seeded(&varmap, &cfg, tc.seed, &device)?;
    varmap.save(out.join("init.safetensors"))?;
    let mut bytes = Vec::with_capacity(tc.steps * tc.batch_size * (tc.seq_len + 1) * 4);
    for batch in batches(&tc, &corpus) {
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
    });
    std::fs::write(out.join("ours.json"), serde_json::to_vec_pretty(&ours)?)?;
    println!(
        "ours: {} steps, {:.2} s, {:.0} tokens/s, final loss {:.4}",
        tc.steps,
        report.seconds,
        report.tokens_per_second,
        report.curve.last().map_or(f64::NAN, |c| c.1)
    );
    Ok(())
}

//! Models as pipeline stages, with candle: [`model`] is a decoder-only transformer (RMSNorm,
//! rotary positions, SwiGLU) and [`train`] trains it from scratch on a Datanet's tokens,
//! deterministically on CPU for a seed.

#[cfg(feature = "cuda")]
#[allow(unsafe_code)] // kernel launches and device buffers the kernels fill: FFI by nature
pub mod cuda;
pub mod generate;
pub mod influence;
pub mod logreg;
pub mod lora;
pub mod model;
pub mod ops;
pub mod scores;
pub mod train;

pub use lora::{Adapter, LoraConfig};
pub use model::{KvCache, ModelConfig, Rows, Transformer};
pub use train::{train, train_adapter, Corpus, TrainConfig, TrainReport};

/// The device the unit tests run on: the CPU, or — built with `cuda` and run with
/// `LEDGERFLOW_DEVICE=cuda` — the first CUDA GPU, so that the same checks (per-example gradients
/// against backward passes and finite differences, training, LoRA, generation) run there too.
#[cfg(test)]
pub(crate) fn test_device() -> candle_core::Device {
    #[cfg(feature = "cuda")]
    if std::env::var("LEDGERFLOW_DEVICE").is_ok_and(|d| d.starts_with("cuda")) {
        return candle_core::Device::new_cuda(0).expect("CUDA GPU 0");
    }
    candle_core::Device::Cpu
}

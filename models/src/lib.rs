//! Models as pipeline stages, with candle: [`model`] is a decoder-only transformer (RMSNorm,
//! rotary positions, SwiGLU) and [`train`] trains it from scratch on a Datanet's tokens,
//! deterministically on CPU for a seed.

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

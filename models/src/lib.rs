//! Models as pipeline stages, with candle: [`model`] is a decoder-only transformer (RMSNorm,
//! rotary positions, SwiGLU) and [`train`] trains it from scratch on a Datanet's tokens,
//! deterministically on CPU for a seed.

pub mod model;
pub mod train;

pub use model::{ModelConfig, Transformer};
pub use train::{train, Corpus, TrainConfig, TrainReport};

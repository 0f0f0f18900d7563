//! The data-availability layer of reward epochs: each epoch's data is published to EigenDA.
//!
//! [`codec`] is EigenDA's payload encoding, version 0 — what eigenda-proxy and EigenDA's own
//! clients (`api/clients/v2/coretypes` in Layr-Labs/eigenda) put in a blob.

pub mod codec;

pub use codec::{decode, encode, CodecError};

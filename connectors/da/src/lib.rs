//! The data-availability layer of reward epochs: each epoch's data is published to EigenDA.
//!
//! [`codec`] is EigenDA's payload encoding, version 0 — what eigenda-proxy and EigenDA's own
//! clients (`api/clients/v2/coretypes` in Layr-Labs/eigenda) put in a blob. [`altda`] is the
//! OP Stack alt-DA server API that eigenda-proxy serves: a client, and a loopback server.

pub mod altda;
pub mod codec;

pub use altda::{AltDaClient, DaError};
pub use codec::{decode, encode, CodecError};

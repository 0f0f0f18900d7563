//! Reward settlement for ledgerflow's reward epochs.
//!
//! [`merkle`] builds the cumulative reward tree of an epoch — leaves `(address, uint256)` —
//! exactly as OpenZeppelin's `StandardMerkleTree` does (`@openzeppelin/merkle-tree`), so its
//! root and proofs are accepted by OpenZeppelin's `MerkleProof` on chain; [`amount`] holds the
//! 256-bit amounts.

pub mod amount;
pub mod merkle;
pub mod split;

pub use amount::Amount;
pub use merkle::{Account, Bytes32Tree, Hash, Leaf, MerkleError, StandardMerkleTree};
pub use split::largest_remainder;

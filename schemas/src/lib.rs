//! Arrow schemas of every ledgerflow table and message, and the signed contribution format.
//!
//! Everything that crosses a crate boundary or lands on disk is described here, once:
//! the raw Kafka record batch a source emits ([`tables::kafka_record_schema`]), the Datanet table
//! ([`tables::contribution_schema`]), the `rejections` table ([`tables::rejection_schema`]), and
//! the contribution message with its EIP-712 typed-data hash ([`contribution`]).
//!
//! ```
//! use ledgerflow_schemas::contribution::{Contribution, SigningDomain};
//! let c: Contribution = serde_json::from_str(r#"{"datanet":"legal","contributor":"0x0000000000000000000000000000000000000001",
//!   "content":"hello","nonce":1,"issued_at":1,"expires_at":2,"signature":"0x00"}"#).unwrap();
//! let digest = c.signing_digest(&SigningDomain::default()).unwrap();
//! assert_eq!(digest.len(), 32);
//! ```

pub mod contribution;
pub mod hex0x;
pub mod keccak;
pub mod tables;

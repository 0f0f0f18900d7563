//! The contribution message (a Kafka value) and its EIP-712 typed-data hash.
//!
//! ```json
//! {"datanet":"legal","contributor":"0x…","content":"…","metadata":{…},"nonce":17,
//!  "issued_at":1764000000,"expires_at":1764086400,"signature":"0x…"}
//! ```
//!
//! The signature is over the EIP-712 digest of
//! `Contribution(string datanet,bytes32 contentHash,bytes32 metadataHash,uint256 nonce,uint64 issuedAt,uint64 expiresAt)`
//! in the domain `EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)`
//! with name `"ledgerflow"` and version `"1"`. `contentHash` is keccak256 of the UTF-8 content
//! exactly as sent; `metadataHash` is keccak256 of the RFC 8785 canonical JSON of `metadata`, or
//! 32 zero bytes when it is absent or null.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use sha3::{Digest, Keccak256};

/// The EIP-712 type string of the signing domain.
pub const DOMAIN_TYPE: &str =
    "EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)";
/// The EIP-712 type string of a contribution.
pub const CONTRIBUTION_TYPE: &str = "Contribution(string datanet,bytes32 contentHash,bytes32 metadataHash,uint256 nonce,uint64 issuedAt,uint64 expiresAt)";
/// Domain name every ledgerflow signature is made in.
pub const DOMAIN_NAME: &str = "ledgerflow";
/// Domain version.
pub const DOMAIN_VERSION: &str = "1";

/// keccak256 of `data`.
pub fn keccak256(data: &[u8]) -> [u8; 32] {
    Keccak256::digest(data).into()
}

/// A contribution as it travels on Kafka. Fields borrow from the message where they can.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Contribution<'a> {
    #[serde(borrow)]
    pub datanet: Cow<'a, str>,
    #[serde(borrow)]
    pub contributor: Cow<'a, str>,
    #[serde(borrow)]
    pub content: Cow<'a, str>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<serde_json::Value>,
    pub nonce: u64,
    pub issued_at: u64,
    pub expires_at: u64,
    #[serde(borrow)]
    pub signature: Cow<'a, str>,
}

/// Why the metadata of a contribution could not be hashed.
#[derive(Debug, thiserror::Error)]
#[error("metadata cannot be canonicalised (RFC 8785): {0}")]
pub struct MetadataError(String);

impl Contribution<'_> {
    /// keccak256 of the content bytes, exactly as sent.
    pub fn content_hash(&self) -> [u8; 32] {
        keccak256(self.content.as_bytes())
    }

    /// The RFC 8785 canonical JSON of the metadata, `None` when absent or null.
    pub fn canonical_metadata(&self) -> Result<Option<String>, MetadataError> {
        match &self.metadata {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(v) => serde_json_canonicalizer::to_string(v)
                .map(Some)
                .map_err(|e| MetadataError(e.to_string())),
        }
    }

    /// keccak256 of the canonical metadata JSON, or 32 zero bytes when there is none.
    pub fn metadata_hash(&self) -> Result<[u8; 32], MetadataError> {
        Ok(match self.canonical_metadata()? {
            None => [0u8; 32],
            Some(json) => keccak256(json.as_bytes()),
        })
    }

    /// The EIP-712 struct hash of this contribution.
    pub fn struct_hash(&self) -> Result<[u8; 32], MetadataError> {
        Ok(contribution_struct_hash(
            &self.datanet,
            &self.content_hash(),
            &self.metadata_hash()?,
            self.nonce,
            self.issued_at,
            self.expires_at,
        ))
    }

    /// The 32-byte digest the contributor signs: keccak256(0x1901 ‖ domainSeparator ‖ structHash).
    pub fn signing_digest(&self, domain: &SigningDomain) -> Result<[u8; 32], MetadataError> {
        Ok(eip712_digest(&domain.separator(), &self.struct_hash()?))
    }
}

/// The EIP-712 struct hash from already-hashed fields.
pub fn contribution_struct_hash(
    datanet: &str,
    content_hash: &[u8; 32],
    metadata_hash: &[u8; 32],
    nonce: u64,
    issued_at: u64,
    expires_at: u64,
) -> [u8; 32] {
    keccak256(&contribution_struct_encoding(
        &keccak256(datanet.as_bytes()),
        content_hash,
        metadata_hash,
        nonce,
        issued_at,
        expires_at,
    ))
}

/// `encodeData` of a contribution, whose keccak256 is its struct hash: the type hash, then
/// keccak256 of the datanet, the content and metadata hashes, and the three numbers as 32-byte
/// words.
pub fn contribution_struct_encoding(
    datanet_hash: &[u8; 32],
    content_hash: &[u8; 32],
    metadata_hash: &[u8; 32],
    nonce: u64,
    issued_at: u64,
    expires_at: u64,
) -> [u8; 224] {
    static TYPE_HASH: std::sync::LazyLock<[u8; 32]> =
        std::sync::LazyLock::new(|| keccak256(CONTRIBUTION_TYPE.as_bytes()));
    let mut enc = [0u8; 224];
    enc[..32].copy_from_slice(&*TYPE_HASH);
    enc[32..64].copy_from_slice(datanet_hash);
    enc[64..96].copy_from_slice(content_hash);
    enc[96..128].copy_from_slice(metadata_hash);
    enc[128..160].copy_from_slice(&u256_word(nonce));
    enc[160..192].copy_from_slice(&u256_word(issued_at));
    enc[192..].copy_from_slice(&u256_word(expires_at));
    enc
}

/// keccak256(0x19 0x01 ‖ domainSeparator ‖ structHash).
pub fn eip712_digest(domain_separator: &[u8; 32], struct_hash: &[u8; 32]) -> [u8; 32] {
    keccak256(&eip712_digest_input(domain_separator, struct_hash))
}

/// 0x19 0x01 ‖ domainSeparator ‖ structHash, the bytes [`eip712_digest`] hashes.
pub fn eip712_digest_input(domain_separator: &[u8; 32], struct_hash: &[u8; 32]) -> [u8; 66] {
    let mut buf = [0u8; 66];
    buf[0] = 0x19;
    buf[1] = 0x01;
    buf[2..34].copy_from_slice(domain_separator);
    buf[34..].copy_from_slice(struct_hash);
    buf
}

fn u256_word(v: u64) -> [u8; 32] {
    let mut w = [0u8; 32];
    w[24..].copy_from_slice(&v.to_be_bytes());
    w
}

/// The EIP-712 domain contributions are signed in (a job's `signing:` section).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SigningDomain {
    pub chain_id: u64,
    pub verifying_contract: [u8; 20],
}

impl Default for SigningDomain {
    /// chainId 31337 (anvil) and the zero address.
    fn default() -> Self {
        Self {
            chain_id: 31337,
            verifying_contract: [0u8; 20],
        }
    }
}

impl SigningDomain {
    /// The domain separator: hashStruct(EIP712Domain).
    pub fn separator(&self) -> [u8; 32] {
        let mut enc = Vec::with_capacity(5 * 32);
        enc.extend_from_slice(&keccak256(DOMAIN_TYPE.as_bytes()));
        enc.extend_from_slice(&keccak256(DOMAIN_NAME.as_bytes()));
        enc.extend_from_slice(&keccak256(DOMAIN_VERSION.as_bytes()));
        enc.extend_from_slice(&u256_word(self.chain_id));
        let mut addr = [0u8; 32];
        addr[12..].copy_from_slice(&self.verifying_contract);
        enc.extend_from_slice(&addr);
        keccak256(&enc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_hashes_are_the_published_ones() {
        // keccak256("EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)")
        assert_eq!(
            hex::encode(keccak256(DOMAIN_TYPE.as_bytes())),
            "8b73c3c69bb8fe3d512ecc4cf759cc79239f7b179b0ffacaa9a75d522b39400f"
        );
    }

    #[test]
    fn metadata_absent_or_null_hashes_to_zero() {
        let mut c: Contribution<'_> = serde_json::from_str(
            r#"{"datanet":"d","contributor":"0x00","content":"x","nonce":1,"issued_at":1,"expires_at":2,"signature":"0x"}"#,
        )
        .unwrap();
        assert_eq!(c.metadata_hash().unwrap(), [0u8; 32]);
        c.metadata = Some(serde_json::Value::Null);
        assert_eq!(c.metadata_hash().unwrap(), [0u8; 32]);
        c.metadata = Some(serde_json::json!({"b": 1, "a": [true, "x"]}));
        assert_eq!(
            c.canonical_metadata().unwrap().unwrap(),
            r#"{"a":[true,"x"],"b":1}"#
        );
    }

    #[test]
    fn unknown_fields_are_refused() {
        let r: Result<Contribution<'_>, _> = serde_json::from_str(
            r#"{"datanet":"d","contributor":"0x00","content":"x","nonce":1,"issued_at":1,"expires_at":2,"signature":"0x","extra":1}"#,
        );
        assert!(r.is_err());
    }
}

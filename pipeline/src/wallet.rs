//! TEST WALLETS: secp256k1 keys derived from a public seed, for generating fixtures and
//! benchmarks. Anyone who knows the seed knows the keys: never send them real funds.
//! Real keys come from the environment or a keystore file, never from job YAML or logs.

use k256::ecdsa::SigningKey;
use ledgerflow_schemas::contribution::keccak256;

/// A wallet whose key is derived from a seed (see the module docs).
pub struct TestWallet {
    key: SigningKey,
    address: [u8; 20],
}

impl TestWallet {
    /// The `index`-th test wallet of `seed`: key = keccak256("ledgerflow test wallet" ‖ seed ‖ index ‖ attempt).
    pub fn derive(seed: u64, index: u64) -> TestWallet {
        for attempt in 0u32.. {
            let mut material = b"ledgerflow test wallet".to_vec();
            material.extend_from_slice(&seed.to_le_bytes());
            material.extend_from_slice(&index.to_le_bytes());
            material.extend_from_slice(&attempt.to_le_bytes());
            if let Ok(key) = SigningKey::from_slice(&keccak256(&material)) {
                let address = address_of(&key);
                return TestWallet { key, address };
            }
        }
        unreachable!("a valid secp256k1 scalar is found within a few attempts")
    }

    pub fn address(&self) -> [u8; 20] {
        self.address
    }

    /// A 65-byte `r ‖ s ‖ v` signature of a 32-byte digest, low-s, v ∈ {27, 28}.
    pub fn sign_digest(&self, digest: &[u8; 32]) -> [u8; 65] {
        let (sig, recid) = self
            .key
            .sign_prehash_recoverable(digest)
            .expect("signing a 32-byte prehash cannot fail");
        let (sig, recid) = match sig.normalize_s() {
            Some(low) => (
                low,
                k256::ecdsa::RecoveryId::from_byte(recid.to_byte() ^ 1).unwrap_or(recid),
            ),
            None => (sig, recid),
        };
        let mut out = [0u8; 65];
        out[..64].copy_from_slice(&sig.to_bytes());
        out[64] = 27 + recid.to_byte();
        out
    }
}

/// The Ethereum address of a key: the last 20 bytes of keccak256 of the uncompressed public key.
pub fn address_of(key: &SigningKey) -> [u8; 20] {
    let point = key.verifying_key().to_encoded_point(false);
    let hash = keccak256(&point.as_bytes()[1..]);
    let mut a = [0u8; 20];
    a.copy_from_slice(&hash[12..]);
    a
}

#[cfg(test)]
mod tests {
    use super::*;
    use k256::ecdsa::{RecoveryId, Signature, VerifyingKey};

    #[test]
    fn known_key_has_known_address() {
        // The well-known first anvil/hardhat account.
        let key = SigningKey::from_slice(
            &hex::decode("ac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80")
                .unwrap(),
        )
        .unwrap();
        assert_eq!(
            hex::encode(address_of(&key)),
            "f39fd6e51aad88f6f4ce6ab8827279cfffb92266"
        );
    }

    #[test]
    fn signatures_recover_to_the_signer() {
        let w = TestWallet::derive(7, 3);
        let digest = keccak256(b"hello");
        let sig = w.sign_digest(&digest);
        let s = Signature::from_slice(&sig[..64]).unwrap();
        assert!(s.normalize_s().is_none(), "low-s");
        let recid = RecoveryId::from_byte(sig[64] - 27).unwrap();
        let vk = VerifyingKey::recover_from_prehash(&digest, &s, recid).unwrap();
        let point = vk.to_encoded_point(false);
        assert_eq!(&keccak256(&point.as_bytes()[1..])[12..], &w.address());
        assert_eq!(TestWallet::derive(7, 3).address(), w.address());
        assert_ne!(TestWallet::derive(8, 3).address(), w.address());
    }
}

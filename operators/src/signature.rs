//! Recovering and checking the signer of a 65-byte `r ‖ s ‖ v` secp256k1 signature, as Ethereum
//! wallets make them (EIP-712 typed data, `eth_signTypedData_v4`).
//!
//! Recovery runs on libsecp256k1 (the `secp256k1` crate), the library Bitcoin Core and most
//! Ethereum clients use; `benchmarks/signatures.sh` measures it against the library's own rate.
//! Rules, as OpenZeppelin's `ECDSA.recover` applies them:
//! - `v` is 27 or 28 (0 and 1 are accepted as the same recovery ids);
//! - `s` must be in the lower half of the curve order (EIP-2: a high-s twin of a valid
//!   signature is malleable and refused);
//! - `r` and `s` must be non-zero scalars below the order.

use ledgerflow_schemas::contribution::{keccak256, Contribution, SigningDomain};
use ledgerflow_schemas::hex0x;
use secp256k1::ecdsa::{RecoverableSignature, RecoveryId};
use secp256k1::Message;

/// Half the secp256k1 group order n, big-endian: the largest `s` a signature may carry.
const HALF_ORDER: [u8; 32] = [
    0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
    0x5d, 0x57, 0x6e, 0x73, 0x57, 0xa4, 0x50, 0x1d, 0xdf, 0xe9, 0x2f, 0x46, 0x68, 0x1b, 0x20, 0xa0,
];

/// Why a signature was refused. The `Display` text is the evidence stored in `rejections`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("signature is not 65 bytes of 0x-hex (r ‖ s ‖ v): {0}")]
    Encoding(String),
    #[error("v must be 27 or 28 (or 0/1), got {0}")]
    BadV(u8),
    #[error("s is in the upper half of the curve order (malleable high-s signature)")]
    HighS,
    #[error("r or s is zero or not below the curve order")]
    OutOfRange,
    #[error("no public key recovers from this signature and digest")]
    Unrecoverable,
}

/// Parses `0x` + 130 hex digits.
pub fn parse_signature_hex(s: &str) -> Result<[u8; 65], SignatureError> {
    let digits = s
        .strip_prefix("0x")
        .or_else(|| s.strip_prefix("0X"))
        .ok_or_else(|| SignatureError::Encoding("missing 0x prefix".into()))?;
    if digits.len() != 130 {
        return Err(SignatureError::Encoding(format!(
            "{} hex digits, expected 130",
            digits.len()
        )));
    }
    let mut out = [0u8; 65];
    if !hex0x::decode_into(digits.as_bytes(), &mut out) {
        // The slow decoder, for the message naming the bad digit.
        hex::decode_to_slice(digits, &mut out)
            .map_err(|e| SignatureError::Encoding(e.to_string()))?;
    }
    Ok(out)
}

/// The Ethereum address that signed `digest` with `signature` (`r ‖ s ‖ v`).
pub fn recover_signer(digest: &[u8; 32], signature: &[u8; 65]) -> Result<[u8; 20], SignatureError> {
    Ok(address_of_uncompressed(&recover_public_key(
        digest, signature,
    )?))
}

/// The rules checked before any curve arithmetic (`v`, low `s`); returns the recovery id (the
/// y parity of R).
pub(crate) fn screen(signature: &[u8; 65]) -> Result<u8, SignatureError> {
    let v = signature[64];
    let recid = match v {
        27 | 28 => v - 27,
        0 | 1 => v,
        _ => return Err(SignatureError::BadV(v)),
    };
    let s: &[u8; 32] = signature[32..64].try_into().expect("32 bytes");
    if s > &HALF_ORDER {
        return Err(SignatureError::HighS);
    }
    Ok(recid)
}

/// The public key (uncompressed, `0x04 ‖ x ‖ y`) that signed `digest` with `signature`.
pub fn recover_public_key(
    digest: &[u8; 32],
    signature: &[u8; 65],
) -> Result<[u8; 65], SignatureError> {
    let recid = screen(signature)?;
    let recid =
        RecoveryId::try_from(i32::from(recid)).map_err(|_| SignatureError::BadV(signature[64]))?;
    let sig = RecoverableSignature::from_compact(&signature[..64], recid)
        .map_err(|_| SignatureError::OutOfRange)?;
    // from_compact accepts r = 0 / s = 0 (overflowing values are reduced); libsecp256k1's
    // recovery then fails on them, which is reported as unrecoverable.
    let key = sig
        .recover_ecdsa(Message::from_digest(*digest))
        .map_err(|_| SignatureError::Unrecoverable)?;
    Ok(key.serialize_uncompressed())
}

/// A contribution whose signature does not hold, with the `rejections` reason code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SignatureCheckError {
    /// `bad_signature`: unparsable, malformed, high-s or unrecoverable.
    Bad(SignatureError),
    /// `signer_mismatch`: a valid signature by someone other than `contributor`.
    Mismatch { recovered: [u8; 20] },
    /// `schema`: the fields that are signed cannot be hashed (contributor not an address,
    /// metadata not canonicalisable).
    Unhashable(String),
}

impl SignatureCheckError {
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Bad(_) => "bad_signature",
            Self::Mismatch { .. } => "signer_mismatch",
            Self::Unhashable(_) => "schema",
        }
    }

    pub fn detail(&self, claimed: &str) -> String {
        match self {
            Self::Bad(e) => e.to_string(),
            Self::Mismatch { recovered } => format!(
                "signed by 0x{}, not by the contributor {claimed}",
                hex::encode(recovered)
            ),
            Self::Unhashable(e) => e.clone(),
        }
    }
}

/// Checks that `c` carries its contributor's EIP-712 signature in `domain`; returns the signer.
pub fn check_contribution(
    c: &Contribution<'_>,
    domain: &SigningDomain,
) -> Result<[u8; 20], SignatureCheckError> {
    let claimed = parse_address(&c.contributor).map_err(SignatureCheckError::Unhashable)?;
    let signature = parse_signature_hex(&c.signature).map_err(SignatureCheckError::Bad)?;
    let digest = c
        .signing_digest(domain)
        .map_err(|e| SignatureCheckError::Unhashable(e.to_string()))?;
    let recovered = recover_signer(&digest, &signature).map_err(SignatureCheckError::Bad)?;
    if recovered == claimed {
        Ok(recovered)
    } else {
        Err(SignatureCheckError::Mismatch { recovered })
    }
}

/// Parses a `0x` + 40 hex digit address (either case).
pub fn parse_address(s: &str) -> Result<[u8; 20], String> {
    let digits = s
        .strip_prefix("0x")
        .filter(|d| d.len() == 40)
        .ok_or_else(|| format!("contributor {s:?} is not a 0x-prefixed 20-byte address"))?;
    let mut out = [0u8; 20];
    hex::decode_to_slice(digits, &mut out)
        .map_err(|e| format!("contributor {s:?} is not hex: {e}"))?;
    Ok(out)
}

/// The address of an uncompressed public key (`0x04 ‖ x ‖ y`): the last 20 bytes of keccak256(x ‖ y).
pub fn address_of_uncompressed(point: &[u8; 65]) -> [u8; 20] {
    let hash = keccak256(&point[1..]);
    let mut a = [0u8; 20];
    a.copy_from_slice(&hash[12..]);
    a
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    // The well-known first anvil/hardhat development key and its address (public test data).
    const KEY: &str = "ac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80";
    const ADDRESS: &str = "f39fd6e51aad88f6f4ce6ab8827279cfffb92266";

    fn sign(digest: &[u8; 32]) -> [u8; 65] {
        let secret =
            secp256k1::SecretKey::from_secret_bytes(hex::decode(KEY).unwrap().try_into().unwrap())
                .unwrap();
        let sig = secp256k1::ecdsa::RecoverableSignature::sign_ecdsa_recoverable(
            Message::from_digest(*digest),
            &secret,
        );
        let (recid, compact) = sig.serialize_compact();
        let mut out = [0u8; 65];
        out[..64].copy_from_slice(&compact);
        out[64] = 27 + u8::from(recid);
        out
    }

    #[test]
    fn recovers_the_signer_with_v_27_28_and_0_1() {
        let digest = keccak256(b"hello");
        let mut sig = sign(&digest);
        assert_eq!(hex::encode(recover_signer(&digest, &sig).unwrap()), ADDRESS);
        sig[64] -= 27;
        assert_eq!(hex::encode(recover_signer(&digest, &sig).unwrap()), ADDRESS);
        sig[64] = 29;
        assert_eq!(recover_signer(&digest, &sig), Err(SignatureError::BadV(29)));
    }

    #[test]
    fn another_digest_recovers_another_address() {
        let sig = sign(&keccak256(b"hello"));
        let other = recover_signer(&keccak256(b"hellp"), &sig);
        assert!(other.map_or(true, |a| hex::encode(a) != ADDRESS));
    }

    #[test]
    fn high_s_twin_is_refused() {
        let digest = keccak256(b"malleable");
        let sig = sign(&digest);
        // s' = n - s, v flipped: the same signer, but malleable, so refused.
        let n = num_order();
        let s = &sig[32..64];
        let mut twin = sig;
        let mut borrow = 0i32;
        for i in (0..32).rev() {
            let d = i32::from(n[i]) - i32::from(s[i]) - borrow;
            twin[32 + i] = d.rem_euclid(256) as u8;
            borrow = i32::from(d < 0);
        }
        twin[64] = if sig[64] == 27 { 28 } else { 27 };
        assert_eq!(recover_signer(&digest, &twin), Err(SignatureError::HighS));
    }

    fn num_order() -> [u8; 32] {
        hex::decode("fffffffffffffffffffffffffffffffebaaedce6af48a03bbfd25e8cd0364141")
            .unwrap()
            .try_into()
            .unwrap()
    }

    #[test]
    fn half_order_is_n_over_two() {
        // n = 2·HALF + 1
        let n = num_order();
        let mut doubled = [0u8; 32];
        let mut carry = 1u16; // the + 1
        for i in (0..32).rev() {
            let v = u16::from(HALF_ORDER[i]) * 2 + carry;
            doubled[i] = v as u8;
            carry = v >> 8;
        }
        assert_eq!(doubled, n);
    }

    #[test]
    fn zero_and_oversized_scalars_are_refused() {
        let digest = keccak256(b"x");
        let mut sig = [0u8; 65];
        sig[64] = 27;
        assert!(recover_signer(&digest, &sig).is_err());
        let mut sig = [0xffu8; 65];
        sig[32] = 0x10; // s small enough to pass the high-s check, r above the order
        sig[64] = 28;
        assert!(recover_signer(&digest, &sig).is_err());
    }

    #[test]
    fn hex_parsing() {
        assert!(parse_signature_hex("0x").is_err());
        assert!(parse_signature_hex(&format!("0x{}", "zz".repeat(65))).is_err());
        assert!(parse_signature_hex(&"ab".repeat(65)).is_err());
        assert_eq!(
            parse_signature_hex(&format!("0x{}", "ab".repeat(65))).unwrap(),
            [0xab; 65]
        );
    }

    proptest! {
        #[test]
        fn arbitrary_signatures_never_panic(digest in any::<[u8; 32]>(), sig in proptest::collection::vec(any::<u8>(), 65)) {
            let sig: [u8; 65] = sig.try_into().unwrap();
            let _ = recover_signer(&digest, &sig);
        }

        #[test]
        fn arbitrary_text_never_panics_the_parser(s in ".{0,200}") {
            let _ = parse_signature_hex(&s);
        }
    }
}

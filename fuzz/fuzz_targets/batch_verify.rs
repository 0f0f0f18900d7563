//! Arbitrary (digest, signature) claims against a known key through the batch check: an answer,
//! never a panic, and a claim is proven only if recovering its signature gives the key.
#![no_main]

use ledgerflow_operators::batch_verify::{prove, Claim, KnownKey};
use ledgerflow_operators::signature::recover_public_key;
use libfuzzer_sys::fuzz_target;

const fn digit(c: u8) -> u8 {
    if c <= b'9' {
        c - b'0'
    } else {
        c - b'a' + 10
    }
}

/// The generator, uncompressed: the public key of the secret key 1 (a TEST key).
const G: [u8; 65] = {
    let hex = b"0479be667ef9dcbbac55a06295ce870b07029bfcdb2dce28d959f2815b16f81798483ada7726a3c4655da4fbfc0e1108a8fd17b448a68554199c47d08ffb10d4b8";
    let mut out = [0u8; 65];
    let mut i = 0;
    while i < 65 {
        out[i] = digit(hex[2 * i]) << 4 | digit(hex[2 * i + 1]);
        i += 1;
    }
    out
};

fuzz_target!(|data: &[u8]| {
    let key = KnownKey::from_uncompressed(&G).expect("the generator is a point");
    let items: Vec<([u8; 32], [u8; 65])> = data
        .chunks_exact(97)
        .map(|c| {
            (
                c[..32].try_into().expect("32 bytes"),
                c[32..].try_into().expect("65 bytes"),
            )
        })
        .collect();
    let claims: Vec<Claim<'_>> = items
        .iter()
        .map(|(digest, signature)| Claim {
            digest: *digest,
            signature,
            signer: [0; 20],
            key: &key,
        })
        .collect();
    for (proven, (digest, signature)) in prove(&claims).into_iter().zip(&items) {
        if proven {
            assert_eq!(recover_public_key(digest, signature), Ok(G));
        }
    }
});

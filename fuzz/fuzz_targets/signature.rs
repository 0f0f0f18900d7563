//! Arbitrary digests and 65-byte signatures through recovery (v, high-s and curve checks), and
//! arbitrary strings through the signature and address parsers: an answer, never a panic.
#![no_main]

use ledgerflow_operators::signature::{parse_address, parse_signature_hex, recover_signer};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() >= 97 {
        let digest: [u8; 32] = data[..32].try_into().expect("32 bytes");
        let sig: [u8; 65] = data[32..97].try_into().expect("65 bytes");
        let _ = recover_signer(&digest, &sig);
    }
    let text = String::from_utf8_lossy(data);
    if let Ok(sig) = parse_signature_hex(&text) {
        let _ = recover_signer(&[0x5a; 32], &sig);
    }
    let _ = parse_address(&text);
});

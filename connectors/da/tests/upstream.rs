//! The codec against Layr-Labs' own Rust implementation of EigenDA's payload encoding
//! (`rust-eigenda-v2-common`, from eigenda-client-rs): for payloads of every length around the
//! 31-byte chunk and power-of-two boundaries, and random contents, our blob is byte for byte the
//! one their `Payload::to_blob(PayloadForm::Coeff)` makes (its `serialize()` leaves out the
//! trailing zero symbols up to `blob_length_symbols`, which ours writes), their decoder reads our
//! blobs back, and ours reads theirs.

use proptest::prelude::*;
use rust_eigenda_v2_common::{Blob, Payload, PayloadForm};

/// Their blob, with its trailing zero symbols written out.
fn theirs(payload: &[u8]) -> Vec<u8> {
    let blob = Payload::new(payload.to_vec())
        .to_blob(PayloadForm::Coeff)
        .expect("their encoder");
    let mut bytes = blob.serialize();
    assert!(bytes.len() <= blob.blob_length_symbols * 32);
    bytes.resize(blob.blob_length_symbols * 32, 0);
    bytes
}

fn check(payload: &[u8]) {
    let ours = ledgerflow_da::encode(payload).unwrap();
    assert_eq!(ours, theirs(payload), "{} bytes", payload.len());
    let blob = Blob::deserialize_blob(ours.clone(), ours.len() / 32).unwrap();
    let back = blob.to_payload(PayloadForm::Coeff).unwrap().serialize();
    assert_eq!(back, payload, "their decoder, {} bytes", payload.len());
    assert_eq!(ledgerflow_da::decode(&theirs(payload)).unwrap(), payload);
}

#[test]
fn every_length_around_the_boundaries() {
    let mut lengths: Vec<usize> = (0..=200).collect();
    for symbols in [2usize, 4, 8, 16, 64, 1024, 8192] {
        let max = ledgerflow_da::codec::max_payload(symbols);
        lengths.extend(max.saturating_sub(2)..=max + 2);
    }
    for n in lengths {
        let payload: Vec<u8> = (0..n).map(|i| (i * 131 + n) as u8 | 0x80).collect();
        check(&payload);
    }
    // All ones (every chunk's high bits set) and all zeros.
    check(&[0xff; 4000]);
    check(&[0x00; 4000]);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn random_payloads_encode_like_upstream(payload in proptest::collection::vec(any::<u8>(), 0..20_000)) {
        check(&payload);
    }
}

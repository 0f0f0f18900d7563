//! `ledgerflow da encode | ledgerflow da decode` round-trips arbitrary bytes through EigenDA's
//! version-0 payload encoding, and `da decode` refuses malformed input with its reason, writing
//! nothing to stdout.

mod common;

use std::io::Write;
use std::process::{Output, Stdio};

use common::*;
use rand::{Rng, SeedableRng};

fn da(what: &str, input: &[u8]) -> Output {
    let mut child = ledgerflow()
        .args(["da", what])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn round_trips_and_refuses_malformed_payloads() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    for len in [0usize, 1, 30, 31, 32, 62, 63, 1000, 100_000] {
        let payload: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
        let encoded = da("encode", &payload);
        assert!(encoded.status.success());
        let symbols = encoded.stdout.len() / 32;
        assert!(symbols.is_power_of_two());
        assert_eq!(encoded.stdout.len() % 32, 0);
        assert_eq!(&encoded.stdout[2..6], &(len as u32).to_be_bytes());
        let decoded = da("decode", &encoded.stdout);
        assert!(decoded.status.success(), "{len} bytes");
        assert_eq!(decoded.stdout, payload, "{len} bytes");
    }
    let good = da("encode", b"epoch 7").stdout;
    for (bad, reason) in [
        (good[..40].to_vec(), "power of two"),
        ([&[1u8][..], &good[1..]].concat(), "bad header"),
        (
            [&good[..32], &[9u8][..], &good[33..]].concat(),
            "bad padding",
        ),
        (
            [&good[..5], &[99u8][..], &good[6..]].concat(),
            "wrong length",
        ),
    ] {
        let out = da("decode", &bad);
        assert!(!out.status.success());
        assert!(out.stdout.is_empty());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(reason), "{reason}: {err}");
    }
}

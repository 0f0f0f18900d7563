//! Signature recovery per core, side by side on the same signatures (one thread each):
//!   libsecp256k1   the `secp256k1` crate's own recover (the reference rate)
//!   ledgerflow     `recover_signer`: v / high-s checks, recovery, keccak256 → address
//!   k256           RustCrypto's pure-Rust recovery (context only)
//!   ledgerflow+eip712  `check_contribution`: the EIP-712 digest of a whole message, then the above
//!   ledgerflow batch   `batch_verify::prove` over batches of 4,096 signatures whose signers' keys
//!                  are known (what the verify stage does for contributors seen before)
//!
//!   cargo run --release -p ledgerflow --example bench_signatures [COUNT] [ROUNDS]
//! Prints a Markdown table (recoveries/s per core, ratio to libsecp256k1).

use std::hint::black_box;
use std::time::Instant;

use ledgerflow::gen::{write_contributions, GenOptions};
use ledgerflow::wallet::TestWallet;
use ledgerflow_operators::batch_verify::{prove, Claim, KnownKey, MIN_BATCH};
use ledgerflow_operators::signature::{check_contribution, recover_public_key, recover_signer};
use ledgerflow_schemas::contribution::{keccak256, Contribution, SigningDomain};

fn main() {
    let mut args = std::env::args().skip(1);
    let count: usize = args.next().map_or(5000, |a| a.parse().expect("COUNT"));
    let rounds: usize = args.next().map_or(5, |a| a.parse().expect("ROUNDS"));

    // TEST wallets derived from a public seed.
    let wallets: Vec<TestWallet> = (0..64).map(|i| TestWallet::derive(99, i)).collect();
    let cases: Vec<([u8; 32], [u8; 65])> = (0..count)
        .map(|i| {
            let digest = keccak256(format!("bench {i}").as_bytes());
            (digest, wallets[i % wallets.len()].sign_digest(&digest))
        })
        .collect();
    let parsed: Vec<_> = cases
        .iter()
        .map(|(d, s)| {
            let recid = secp256k1::ecdsa::RecoveryId::try_from(i32::from(s[64] - 27)).unwrap();
            let sig =
                secp256k1::ecdsa::RecoverableSignature::from_compact(&s[..64], recid).unwrap();
            (secp256k1::Message::from_digest(*d), sig)
        })
        .collect();
    let k256_cases: Vec<_> = cases
        .iter()
        .map(|(d, s)| {
            let sig = k256::ecdsa::Signature::from_slice(&s[..64]).unwrap();
            let recid = k256::ecdsa::RecoveryId::from_byte(s[64] - 27).unwrap();
            (*d, sig, recid)
        })
        .collect();
    let mut jsonl = Vec::new();
    write_contributions(
        &GenOptions {
            count: count as u64,
            seed: 99,
            contributors: 64,
            content_bytes: 1000,
            ..Default::default()
        },
        &mut jsonl,
    )
    .unwrap();
    let messages: Vec<&[u8]> = jsonl
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .collect();
    let domain = SigningDomain::default();
    let keys: Vec<KnownKey> = cases[..wallets.len()]
        .iter()
        .map(|(d, s)| KnownKey::from_uncompressed(&recover_public_key(d, s).unwrap()).unwrap())
        .collect();
    let claims: Vec<Claim<'_>> = cases
        .iter()
        .enumerate()
        .map(|(i, (d, s))| Claim {
            digest: *d,
            signature: s,
            signer: wallets[i % wallets.len()].address(),
            key: &keys[i % wallets.len()],
        })
        .collect();
    assert!(count >= MIN_BATCH, "COUNT below the smallest batch");

    type Bench<'a> = (&'a str, Box<dyn Fn() + 'a>);
    let benches: Vec<Bench<'_>> = vec![
        (
            "libsecp256k1",
            Box::new(|| {
                for (m, s) in &parsed {
                    black_box(s.recover_ecdsa(*m).unwrap());
                }
            }),
        ),
        (
            "ledgerflow",
            Box::new(|| {
                for (d, s) in &cases {
                    black_box(recover_signer(d, s).unwrap());
                }
            }),
        ),
        (
            "k256",
            Box::new(|| {
                for (d, s, r) in &k256_cases {
                    black_box(k256::ecdsa::VerifyingKey::recover_from_prehash(d, s, *r).unwrap());
                }
            }),
        ),
        (
            "ledgerflow+eip712",
            Box::new(|| {
                for m in &messages {
                    let c: Contribution<'_> = serde_json::from_slice(m).unwrap();
                    black_box(check_contribution(&c, &domain).unwrap());
                }
            }),
        ),
        (
            "ledgerflow batch",
            Box::new(|| {
                for chunk in claims.chunks(4096) {
                    assert!(black_box(prove(chunk)).iter().all(|p| *p));
                }
            }),
        ),
    ];
    // Rounds interleave the contenders so drift hits them alike; the best round counts.
    let mut best = vec![f64::MAX; benches.len()];
    for _ in 0..rounds {
        for (i, (_, f)) in benches.iter().enumerate() {
            let t = Instant::now();
            f();
            best[i] = best[i].min(t.elapsed().as_secs_f64());
        }
    }
    println!("count={count} rounds={rounds} (best round; one thread)\n");
    println!("| implementation | recoveries/s per core | µs each | vs libsecp256k1 |");
    println!("| --- | --- | --- | --- |");
    for (i, (name, _)) in benches.iter().enumerate() {
        let rate = count as f64 / best[i];
        println!(
            "| {name} | {rate:.0} | {:.2} | {:.2} |",
            1e6 / rate,
            best[0] / best[i]
        );
    }
}

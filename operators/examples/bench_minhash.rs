//! MinHash signatures per second on one core: word 5-gram shingling and 112 permutations (the
//! `dedup_near` defaults) over the contents of a contributions file, best of ROUNDS.
//!   cargo run --release -p ledgerflow-operators --example bench_minhash -- FILE [ROUNDS] [NUM_PERM]
//! `benchmarks/minhash.sh` runs it beside rensa and datasketch on the same file.

use std::time::Instant;

use ledgerflow_operators::minhash::MinHasher;

fn main() {
    let mut args = std::env::args().skip(1);
    let file = args
        .next()
        .expect("usage: bench_minhash FILE [ROUNDS] [NUM_PERM]");
    let rounds: usize = args.next().map_or(5, |r| r.parse().expect("ROUNDS"));
    let num_perm: usize = args.next().map_or(112, |r| r.parse().expect("NUM_PERM"));
    let docs: Vec<String> = std::fs::read_to_string(&file)
        .expect("read FILE")
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["content"].as_str().map(str::to_string))
        .collect();
    let mut hasher = MinHasher::new(num_perm, 5, 42);
    let mut best = f64::INFINITY;
    let mut checksum = 0u64;
    for _ in 0..rounds {
        let t = Instant::now();
        for d in &docs {
            let s = hasher.signature(d);
            checksum = checksum.wrapping_add(s.0[0]);
        }
        best = best.min(t.elapsed().as_secs_f64());
    }
    println!(
        "ledgerflow {} docs {:.0} docs/s (best of {rounds}, {num_perm} hashes, checksum {checksum:x})",
        docs.len(),
        docs.len() as f64 / best
    );
}

//! count queries per second on an index, one thread (the `benchmarks/index.sh` side of ours).
//!
//! usage: bench_query INDEX_DIR QUERIES.txt ROUNDS → "ledgerflow N queries/s total_count"

use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, dir, path, rounds] = &args[..] else {
        eprintln!("usage: bench_query INDEX_DIR QUERIES.txt ROUNDS");
        std::process::exit(2);
    };
    let index = ledgerflow_index::Index::open(dir.as_ref(), 0).expect("open index");
    let queries: Vec<Vec<u16>> = std::fs::read_to_string(path)
        .expect("queries")
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.split(',').map(|t| t.parse().expect("token")).collect())
        .collect();
    let (mut best, mut total) = (0f64, 0u64);
    for _ in 0..rounds.parse::<usize>().expect("rounds") {
        let t = Instant::now();
        total = queries.iter().map(|q| index.count(q).count).sum();
        best = best.max(queries.len() as f64 / t.elapsed().as_secs_f64());
    }
    println!("ledgerflow {best:.0} queries/s {total}");
}

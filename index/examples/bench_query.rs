//! count and attribute queries on an index, one thread (the `benchmarks/index.sh` side of ours).
//!
//! usage: bench_query INDEX_DIR QUERIES.txt OUTPUTS.txt ROUNDS
//! prints "ledgerflow count QPS queries/s median_us P50 p99_us P99 total N" (each query timed
//! on its own, best round) and "ledgerflow attribute median_ms M spans S" (maximal spans of each
//! 200-token output, min_len 4, max_cnt 1000), as `benchmarks/index_query.py` does.

use std::time::Instant;

fn read(path: &str) -> Vec<Vec<u16>> {
    std::fs::read_to_string(path)
        .expect("queries")
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.split(',').map(|t| t.parse().expect("token")).collect())
        .collect()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, dir, path, outputs, rounds] = &args[..] else {
        eprintln!("usage: bench_query INDEX_DIR QUERIES.txt OUTPUTS.txt ROUNDS");
        std::process::exit(2);
    };
    let rounds: usize = rounds.parse().expect("rounds");
    let index = ledgerflow_index::Index::open(dir.as_ref(), 0).expect("open index");
    let (queries, outputs) = (read(path), read(outputs));
    let (mut best, mut lat, mut total) = (0f64, Vec::new(), 0u64);
    for _ in 0..rounds {
        let mut times = Vec::with_capacity(queries.len());
        total = 0;
        let t0 = Instant::now();
        for q in &queries {
            let t = Instant::now();
            total += index.count(q).count;
            times.push(t.elapsed().as_secs_f64());
        }
        let qps = queries.len() as f64 / t0.elapsed().as_secs_f64();
        if qps > best {
            times.sort_by(f64::total_cmp);
            (best, lat) = (qps, times);
        }
    }
    let (p50, p99) = (lat[lat.len() / 2] * 1e6, lat[lat.len() * 99 / 100] * 1e6);
    println!(
        "ledgerflow count {best:.0} queries/s median_us {p50:.1} p99_us {p99:.1} total {total}"
    );
    let params = ledgerflow_index::AttributeParams {
        min_len: 4,
        max_cnt: 1000,
        ..Default::default()
    };
    let (mut best_att, mut spans) = (f64::MAX, 0);
    for _ in 0..rounds {
        let mut times = Vec::with_capacity(outputs.len());
        spans = 0;
        for ids in &outputs {
            let t = Instant::now();
            spans += index.attribute(ids, &params).len();
            times.push(t.elapsed().as_secs_f64());
        }
        times.sort_by(f64::total_cmp);
        best_att = best_att.min(times[times.len() / 2] * 1e3);
    }
    println!("ledgerflow attribute median_ms {best_att:.3} spans {spans}");
}

//! Quality rules per second on one core over the contents of a contributions file, with and
//! without language identification, best of ROUNDS.
//!   cargo run --release -p ledgerflow-operators --example bench_quality -- FILE [ROUNDS]

use std::time::Instant;

use ledgerflow_operators::quality::{check_text, QualityConfig};

fn main() {
    let mut args = std::env::args().skip(1);
    let file = args.next().expect("usage: bench_quality FILE [ROUNDS]");
    let rounds: usize = args.next().map_or(3, |r| r.parse().expect("ROUNDS"));
    let docs: Vec<String> = std::fs::read_to_string(&file)
        .expect("read FILE")
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["content"].as_str().map(str::to_string))
        .collect();
    let config = QualityConfig {
        min_words: 5,
        min_sentences: 1,
        ..Default::default()
    };
    for (label, langs) in [
        ("rules", vec![]),
        ("rules+language", vec![whatlang::Lang::Eng]),
    ] {
        let mut best = f64::INFINITY;
        let mut fired = 0;
        for _ in 0..rounds {
            let t = Instant::now();
            fired = docs
                .iter()
                .filter(|d| check_text(d, &config, &langs).is_some())
                .count();
            best = best.min(t.elapsed().as_secs_f64());
        }
        println!(
            "{label}: {} docs {:.0} docs/s, {:.1} µs each ({fired} refused)",
            docs.len(),
            docs.len() as f64 / best,
            best * 1e6 / docs.len() as f64
        );
    }
}

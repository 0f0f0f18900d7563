//! `ledgerflow index build --from-tokenized` without the rest of the CLI (what
//! `benchmarks/index.sh` times, so the benchmark builds only this crate).
//!
//! usage: build_index INPUT_DIR OUT_DIR THREADS

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, input, out, threads] = &args[..] else {
        eprintln!("usage: build_index INPUT_DIR OUT_DIR THREADS");
        std::process::exit(2);
    };
    let shards = ledgerflow_index::build_from_tokenized(
        input.as_ref(),
        out.as_ref(),
        threads.parse().expect("threads"),
        u64::MAX,
    )
    .expect("build");
    println!("{}", serde_json::to_string(&shards).expect("json"));
}

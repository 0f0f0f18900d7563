//! ledgerflow: YAML DAG jobs that stream signed contributions from Kafka into Parquet Datanets,
//! exactly once, with SQL over them.
//!
//! - [`spec`]: job files, checked with positions and hints; [`registry`]: every node type.
//! - [`plan`]: the DAG (inputs, cycles, schemas); [`runtime`]: running it with checkpoints.
//! - [`sql`]: read-only DataFusion over a store; [`gen`]: deterministic signed test data.
//! - [`tokens`]: `ledgerflow index` (infini-gram-compatible token indexes and their queries);
//!   [`batch`]: batch jobs that tokenize and index committed Datanet data.
//! - [`epoch`]: reward epochs, from close to settled on the L2 and published to EigenDA.
//! - [`train`]: base models trained on a Datanet (`ledgerflow-models`, candle) and registered.

pub mod attribution;
pub mod batch;
pub mod chart;
pub mod epoch;
pub mod gen;
pub mod job_schema;
pub mod naming;
pub mod plan;
pub mod planted;
#[cfg(feature = "polars")]
pub use ledgerflow_polars as polars_frame;
pub mod registry;
pub mod runtime;
pub mod serve;
pub mod spec;
pub mod sql;
pub mod tokens;
pub mod train;
pub mod wallet;

/// Keeps large freed blocks in the process heap instead of returning them to the kernel. A
/// training or gradient step allocates and frees tensors of megabytes (logits, activations,
/// their gradients) many times; with glibc's defaults each comes from a fresh `mmap` and is
/// faulted in page by page, which cost about a quarter of a CPU training step (measured with
/// `benchmarks/train.sh`). Blocks up to 256 MiB come from the heap, and up to 1 GiB of free heap
/// is kept. The binary and the benchmark examples call this first thing.
#[allow(unsafe_code)]
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before other threads start.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

/// The job the quick start runs (also `jobs/quickstart.yaml`).
pub const QUICKSTART_JOB: &str = include_str!("../../jobs/quickstart.yaml");

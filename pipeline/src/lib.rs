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
///
/// The binary's allocator is mimalloc, which hands memory unused for a second back to the kernel
/// (`purge_delay`). The streaming stages free and allocate batch buffers of megabytes all the
/// time, so the same pages went back and were faulted in again, zeroed by the kernel. The
/// cleaning job at 1,000,000 contributions (dev build, three runs each, alternating) spent 79.3
/// CPU-seconds on average with purging and 75.9 without (system time 9.0 → 6.2), 46.3 s → 44.8 s
/// of wall time, at a peak RSS of 820 MB → 930 MB. Purging is off unless `MIMALLOC_PURGE_DELAY`
/// (milliseconds) says otherwise.
#[allow(unsafe_code)]
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before other threads start.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
    /// `mi_option_purge_delay` in mimalloc's `mi_option_e` (v2 and v3 alike).
    const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets one allocator option; no memory is read or written.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    }
}

/// candle's CPU backend runs element-wise ops and reductions on its own pool of spinning
/// workers (`CANDLE_NUM_THREADS`, every core by default), one call at a time: its workers spin
/// between ops and a second thread's ops wait on the first's. Measured here (2 cores, projected
/// per-example gradients): 38 % of all CPU time in that spinning and 129 gradients/s, against
/// 300/s with the pool off and the batches run side by side on rayon (gemm still uses rayon's
/// threads). So the binary turns it off unless `CANDLE_NUM_THREADS` is set; the work that can
/// use more cores parallelises above candle. Called first thing, before any thread starts.
pub fn tune_threads() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}

/// The job the quick start runs (also `jobs/quickstart.yaml`).
pub const QUICKSTART_JOB: &str = include_str!("../../jobs/quickstart.yaml");

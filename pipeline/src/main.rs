//! The `ledgerflow` command.

use std::io::{BufRead, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// mimalloc: the stages allocate and free many small buffers per record on every thread
/// (rows, hashes, decisions); glibc's allocator spent ~7 % of the cleaning job's CPU on it.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use clap::{Parser, Subcommand};

use ledgerflow::gen::{write_contributions, GenOptions};
use ledgerflow::plan::Plan;
use ledgerflow::runtime::{run_job, RunOptions};
use ledgerflow::spec;
use ledgerflow::sql::{self, OutputFormat};
use ledgerflow_kafka::{BulkProducer, EmbeddedBroker};
use ledgerflow_schemas::contribution::keccak256;
use ledgerflow_store::Store;

#[derive(Parser)]
#[command(
    name = "ledgerflow",
    version,
    about = "Stream signed contributions from Kafka into Parquet Datanets, exactly once, with SQL over them."
)]
struct Cli {
    /// Log filter (tracing EnvFilter syntax), e.g. `info`, `ledgerflow=debug`.
    #[arg(long, global = true, env = "LEDGERFLOW_LOG")]
    log: Option<String>,
    /// Logs as JSON lines instead of text.
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs the whole thing on embedded defaults: broker, data, ingest job, SQL.
    Quickstart {
        #[arg(long, default_value_t = 10_000)]
        count: u64,
        #[arg(long, env = "LEDGERFLOW_STORE", default_value = "./data/quickstart")]
        store: String,
    },
    /// Starts the embedded Kafka-protocol broker (librdkafka's mock cluster) until Ctrl-C.
    Broker {
        #[arg(long, default_value_t = 19092)]
        port: u16,
        /// Topics to create, as NAME or NAME:PARTITIONS.
        #[arg(long = "topic")]
        topics: Vec<String>,
        /// Partitions of topics created with --topic NAME.
        #[arg(long, default_value_t = 4)]
        partitions: i32,
    },
    /// Generates test data.
    Gen {
        #[command(subcommand)]
        what: GenCommand,
    },
    /// Produces a JSON-lines file to a topic, one record per line, keyed by content hash.
    Produce {
        #[arg(long, env = "KAFKA_BROKERS")]
        brokers: String,
        #[arg(long, env = "CONTRIBUTIONS_TOPIC")]
        topic: String,
        #[arg(long)]
        file: PathBuf,
        /// librdkafka compression codec.
        #[arg(long, default_value = "none")]
        compression: String,
    },
    /// Checks the EIP-712 signatures of a JSON-lines file of contribution messages; prints one
    /// line per refused message (FILE:LINE: reason: detail) and exits 1 if there is any.
    Verify {
        file: PathBuf,
        /// chainId of the signing domain.
        #[arg(long, default_value_t = 31337)]
        chain_id: u64,
        /// verifyingContract of the signing domain.
        #[arg(long, default_value = "0x0000000000000000000000000000000000000000")]
        verifying_contract: String,
    },
    /// Checks job files; reports every problem with file, line, column, key and a hint.
    Validate {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Runs a job until Ctrl-C (or until its source is idle, with --until-idle).
    Run {
        file: PathBuf,
        /// Store root: a directory, file:// or s3:// URL. Default: the job's `store`, else ./data.
        #[arg(long, env = "LEDGERFLOW_STORE")]
        store: Option<String>,
        /// Stop once no record arrived for this many seconds, after a final checkpoint.
        #[arg(long, value_name = "SECONDS")]
        until_idle: Option<f64>,
        /// Serve Prometheus metrics at this address (e.g. 127.0.0.1:9464).
        #[arg(long, env = "LEDGERFLOW_METRICS")]
        metrics: Option<String>,
        /// This worker's name in commit records (default: host-pid).
        #[arg(long)]
        worker: Option<String>,
        /// Progress line on stderr: auto (when it is a terminal), always or never.
        #[arg(long, default_value = "auto")]
        progress: String,
    },
    /// Runs read-only SQL over every Datanet and engine table.
    Sql {
        query: String,
        #[arg(long, env = "LEDGERFLOW_STORE", default_value = "./data")]
        store: String,
        #[arg(long, value_enum, default_value = "table")]
        format: OutputFormat,
    },
    /// Lists and describes Datanets.
    Datanet {
        #[command(subcommand)]
        what: DatanetCommand,
    },
    /// Prints the JSON Schema of job files.
    Schema,
    /// Token indexes in infini-gram's format: build them, query them.
    Index {
        #[command(subcommand)]
        what: IndexCommand,
    },
    /// Which contributions of a Datanet a text (a model output) repeats: its maximal spans in
    /// the Datanet's token index and the contributions they credit, as JSON.
    Attribute {
        #[arg(long)]
        datanet: String,
        #[arg(long)]
        text: String,
        #[arg(long, env = "LEDGERFLOW_STORE", default_value = "./data")]
        store: String,
        /// Shortest span, in tokens.
        #[arg(long, default_value_t = 4)]
        min_len: usize,
        /// Spans occurring more often are dropped.
        #[arg(long, default_value_t = 1000)]
        max_cnt: u64,
        /// Record the credits as `attributions` rows (method `span`) of this model output.
        #[arg(long)]
        output_id: Option<String>,
        /// When the output was made (RFC 3339; default: now): the `created_at` of its rows.
        #[arg(long, requires = "output_id")]
        created_at: Option<String>,
        /// Also record the output as an inference of this model (a row of `inferences`, request
        /// id = the output id, the text as its output), e.g. from a model server of your own.
        #[arg(long, requires = "output_id")]
        model: Option<String>,
        /// The inference's prompt.
        #[arg(long, requires = "model", default_value = "")]
        prompt: String,
        /// The fee paid for the inference, in the reward token's base units (part of its
        /// epoch's pool).
        #[arg(long, requires = "model")]
        fee: Option<String>,
    },
    /// The reward contracts on the L2 chain.
    Contracts {
        #[command(subcommand)]
        what: ContractsCommand,
    },
    /// EigenDA's payload codec (version 0), standard input to standard output.
    Da {
        #[command(subcommand)]
        what: DaCommand,
    },
    /// Cumulative reward trees: OpenZeppelin's StandardMerkleTree of `address,uint256` leaves.
    Rewards {
        #[command(subcommand)]
        what: RewardsCommand,
    },
    /// Trains a base model from scratch on a Datanet's token columns (run `index build` first);
    /// saves it as safetensors in the store, registers it in `models`, and prints a JSON report
    /// and, as the last line, the new model's id.
    Train {
        #[arg(long)]
        datanet: String,
        /// Train a LoRA adapter of this base model (its id in `models`) instead of a base model;
        /// the base stays frozen and the Datanet's text is tokenized with the base's tokenizer.
        #[arg(long)]
        adapter_of: Option<String>,
        /// Training steps (overrides the config file's `train.steps`).
        #[arg(long)]
        steps: Option<usize>,
        /// YAML with `model:` (sizes), `train:` (steps, batch_size, seq_len, learning_rate,
        /// min_learning_rate, warmup_steps, weight_decay, grad_clip, seed, val_fraction,
        /// eval_windows) and `lora:` (rank, alpha, targets).
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long, env = "LEDGERFLOW_STORE", default_value = "./data")]
        store: String,
        /// Progress line on stderr: auto (when it is a terminal), always or never.
        #[arg(long, default_value = "auto")]
        progress: String,
    },
    /// The training benchmark's Rust side (benchmarks/train.sh): trains a base model on DATANET
    /// as `train` does (not registered) and writes its initial weights, every step's batch, the
    /// settings and its loss curve and speed to OUT, for the PyTorch side to replay.
    #[command(hide = true)]
    TrainReference {
        store: String,
        datanet: String,
        out: PathBuf,
        steps: Option<usize>,
    },
    /// Gradient attribution of a LoRA adapter's outputs to its training contributions.
    Attribution {
        #[command(subcommand)]
        what: AttributionCommand,
    },
    /// Serves every model of the store's registry over an OpenAI-compatible HTTP API
    /// (`/v1/completions`, `/v1/chat/completions`, `/v1/models`, `/v1/load_lora_adapter`,
    /// `/v1/unload_lora_adapter`, `/health`, `/metrics`); prints `listening on http://…`.
    Serve {
        #[arg(long, default_value_t = 8000)]
        port: u16,
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        #[arg(long, env = "LEDGERFLOW_STORE", default_value = "./data")]
        store: String,
        /// Bearer token for loading and unloading adapters (from the environment, never a file
        /// in the repository).
        #[arg(long, env = "LEDGERFLOW_API_KEY", hide_env_values = true)]
        api_key: Option<String>,
        /// Memory for resident adapters (their tensor bytes), in MiB; the least recently used
        /// are evicted beyond it.
        #[arg(long, default_value_t = 256)]
        adapter_budget_mib: usize,
        /// Sequences per engine step.
        #[arg(long, default_value_t = 32)]
        max_batch: usize,
        /// Do not credit answers to contributions (span matching against the Datanet index).
        #[arg(long)]
        no_attribution: bool,
        /// Stop after this many seconds (default: run until ctrl-c).
        #[arg(long)]
        for_seconds: Option<u64>,
        /// Also answer requests from Kafka (bootstrap servers).
        #[arg(long, requires_all = ["request_topic", "response_topic"])]
        kafka_brokers: Option<String>,
        /// Topic of JSON requests (the body of /v1/completions, with an optional `id`).
        #[arg(long)]
        request_topic: Option<String>,
        /// Topic the responses go to, keyed by request id.
        #[arg(long)]
        response_topic: Option<String>,
        #[arg(long, default_value = "ledgerflow-serve")]
        kafka_group: String,
        /// How answers of adapters with a gradient index are credited.
        #[command(
            flatten,
            next_help_heading = "Gradient attribution (adapters with a gradient index)"
        )]
        gradient: ledgerflow::attribution::ScoreOptions,
    },
    /// Reward epochs of a job's `epochs:` section: closed → computed → published → submitted →
    /// settled, each step once across crashes.
    Epoch {
        #[command(subcommand)]
        what: EpochCommand,
    },
}

/// A job with an `epochs:` section, and its store.
#[derive(clap::Args)]
struct JobArgs {
    /// The job file.
    #[arg(long)]
    job: PathBuf,
    /// Store root. Default: the job's `store`, else ./data.
    #[arg(long, env = "LEDGERFLOW_STORE")]
    store: Option<String>,
}

impl JobArgs {
    fn epochs(&self) -> Result<ledgerflow::epoch::Epochs> {
        let spec = spec::load(&self.job).map_err(|d| anyhow::anyhow!("{d}"))?;
        epochs_of(&spec, self.store.clone())
    }
}

fn epochs_of(spec: &spec::JobSpec, store: Option<String>) -> Result<ledgerflow::epoch::Epochs> {
    let cfg = spec
        .header
        .epochs
        .clone()
        .with_context(|| format!("{} has no `epochs:` section", spec.file))?;
    let store = store
        .or_else(|| spec.header.store.clone())
        .unwrap_or_else(|| "./data".into());
    Ok(ledgerflow::epoch::Epochs::new(
        Store::open(&store)?,
        &spec.header.name,
        cfg,
    ))
}

#[derive(Subcommand)]
enum EpochCommand {
    /// Every epoch up to the open one: window, state, root, pool, settlement.
    List {
        #[command(flatten)]
        job: JobArgs,
    },
    /// Epoch N's journal (state, roots, DA commitment, transactions, gas, L1 fee) as JSON.
    Status {
        epoch: u64,
        #[command(flatten)]
        job: JobArgs,
    },
    /// Settles every closed epoch in order (the settler key from LEDGERFLOW_SETTLER_KEY or a
    /// keystore in LEDGERFLOW_SETTLER_KEYSTORE), then waits for the next to close, until Ctrl-C.
    Run {
        #[command(flatten)]
        job: JobArgs,
        /// Stop once every closed epoch is settled.
        #[arg(long)]
        once: bool,
    },
}

#[derive(Subcommand)]
enum ContractsCommand {
    /// Deploys the test token, its voting wrapper, timelock, governor, reward parameters, Datanet
    /// registry and EpochRewards (for a local chain such as anvil), funds the reward pool, and
    /// prints the deployment as JSON. The deployer key comes from LEDGERFLOW_DEPLOYER_KEY.
    Deploy {
        #[arg(long, env = "LEDGERFLOW_RPC")]
        rpc: String,
        /// The account that settles epochs (default: the deployer).
        #[arg(long)]
        settler: Option<String>,
        /// Tokens minted to EpochRewards, in base units.
        #[arg(long, default_value = "1000000000000000000000000000")]
        reward_pool: String,
        /// Also write the deployment JSON here.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum DaCommand {
    /// Encodes the bytes on stdin as an EigenDA payload (32-byte header, a zero byte before
    /// every 31 bytes, padded to a power of two of 32-byte symbols).
    Encode,
    /// Decodes an encoded payload on stdin; malformed input (header, padding, length) fails
    /// with the reason and writes nothing.
    Decode,
    /// Serves the OP Stack alt-DA API (`POST /put`, `GET /get/0x…`) on loopback, keeping each
    /// payload as the EigenDA blob eigenda-proxy would disperse; prints its URL, runs until
    /// Ctrl-C. For tests and local runs (docker-compose runs eigenda-proxy's memstore).
    /// Publishes stdin to an alt-DA server (eigenda-proxy); prints the commitment as 0x hex.
    Put {
        #[arg(long, env = "LEDGERFLOW_DA_URL")]
        url: String,
    },
    /// Reads the payload behind a commitment from an alt-DA server to stdout.
    Get {
        commitment: String,
        #[arg(long, env = "LEDGERFLOW_DA_URL")]
        url: String,
    },
    Serve {
        #[arg(long, default_value = "127.0.0.1:3100")]
        listen: String,
        /// Also keep the blobs in this directory (they survive a restart).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum RewardsCommand {
    /// Prints the root of the tree of a CSV of `address,amount` lines (amounts: integers in the
    /// token's smallest unit; an `address,amount` header is allowed).
    Tree {
        #[arg(long)]
        leaves: PathBuf,
        /// Also writes the tree in `@openzeppelin/merkle-tree`'s dump format
        /// (`StandardMerkleTree.load` reads it).
        #[arg(long)]
        dump: Option<PathBuf>,
    },
    /// Prints the amount and Merkle proof of ADDRESS (its first leaf) as JSON.
    Proof {
        address: String,
        #[command(flatten)]
        leaves: LeavesArgs,
    },
    /// Settles epoch N on chain with the root of a leaves file (the settler key comes from
    /// LEDGERFLOW_SETTLER_KEY); prints the transaction as JSON.
    Settle {
        #[arg(long)]
        epoch: u64,
        #[arg(long)]
        leaves: PathBuf,
        #[command(flatten)]
        chain: ChainArgs,
        /// keccak256 of the epoch's published data and of its DA certificate.
        #[arg(
            long,
            default_value = "0x0000000000000000000000000000000000000000000000000000000000000000"
        )]
        data_hash: String,
        #[arg(
            long,
            default_value = "0x0000000000000000000000000000000000000000000000000000000000000000"
        )]
        da_commitment: String,
    },
    /// Claims ADDRESS's rewards with its proof from a leaves file; the transaction is sent (and
    /// paid for) by the key in LEDGERFLOW_CLAIM_KEY. Prints what was paid as JSON.
    Claim {
        address: String,
        #[command(flatten)]
        leaves: LeavesArgs,
        #[command(flatten)]
        chain: ChainArgs,
    },
    /// ADDRESS's reward token balance and what EpochRewards has paid it, as JSON.
    Status {
        address: String,
        #[command(flatten)]
        chain: ChainArgs,
    },
}

/// Which leaves: a CSV file, or a settled epoch of a job.
#[derive(clap::Args)]
struct LeavesArgs {
    /// A CSV of `address,amount` leaves.
    #[arg(long, required_unless_present = "epoch", conflicts_with = "epoch")]
    leaves: Option<PathBuf>,
    /// The cumulative leaves of epoch N of `--job`.
    #[arg(long, requires = "job")]
    epoch: Option<u64>,
    /// The job whose epochs `--epoch` counts (and whose `epochs.chain` claims default to).
    #[arg(long)]
    job: Option<PathBuf>,
    #[arg(long, env = "LEDGERFLOW_STORE")]
    store: Option<String>,
}

impl LeavesArgs {
    /// The leaves' CSV text and a name for messages.
    fn read(&self) -> Result<(String, String)> {
        if let Some(path) = &self.leaves {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            return Ok((text, path.display().to_string()));
        }
        let (Some(n), Some(job)) = (self.epoch, &self.job) else {
            bail!("give --leaves FILE, or --epoch N with --job FILE");
        };
        let epochs = JobArgs {
            job: job.clone(),
            store: self.store.clone(),
        }
        .epochs()?;
        let path = epochs.artifact(n, "leaves.csv");
        let bytes = io_runtime()?
            .block_on(epochs.store.get(&path))?
            .with_context(|| format!("epoch {n} is not computed yet (no {path})"))?;
        Ok((String::from_utf8(bytes.to_vec())?, path))
    }
}

/// Which deployment, on which chain (default: the `epochs.chain` of `--job`).
#[derive(clap::Args)]
struct ChainArgs {
    /// The JSON `contracts deploy` printed (or wrote with `--out`).
    #[arg(long)]
    deployment: Option<PathBuf>,
    #[arg(long, env = "LEDGERFLOW_RPC")]
    rpc: Option<String>,
}

impl ChainArgs {
    fn resolve(&self, job: Option<&Path>) -> Result<(String, ledgerflow_chain::Deployment)> {
        let from_job = match job {
            Some(j) => spec::load(j)
                .map_err(|d| anyhow::anyhow!("{d}"))?
                .header
                .epochs
                .map(|e| e.chain),
            None => None,
        };
        let rpc = self
            .rpc
            .clone()
            .or_else(|| from_job.as_ref().map(|c| c.rpc.clone()))
            .context("give --rpc (or LEDGERFLOW_RPC)")?;
        let deployment = self
            .deployment
            .clone()
            .or_else(|| from_job.as_ref().map(|c| PathBuf::from(&c.deployment)))
            .context("give --deployment")?;
        Ok((rpc, ledgerflow_chain::Deployment::read(&deployment)?))
    }
}

#[derive(Subcommand)]
enum IndexCommand {
    /// Indexes a Datanet (`--datanet`: new committed data becomes new shards; the first build
    /// trains its tokenizer), or builds the suffix array (`table.s`) of every shard of
    /// infini-gram's tokenizing step (`--from-tokenized`: `tokenized.s`, `offset.s`, optional
    /// `metadata.s` / `metaoff.s`).
    Build {
        /// The Datanet to index, into `<store>/indexes/<datanet>`.
        #[arg(long, conflicts_with_all = ["from_tokenized", "out"], required_unless_present = "from_tokenized")]
        datanet: Option<String>,
        #[arg(long, env = "LEDGERFLOW_STORE", default_value = "./data")]
        store: String,
        /// Vocabulary of the tokenizer the first build trains (at most 65,535).
        #[arg(long, default_value_t = 16_384)]
        vocab_size: usize,
        /// Folder of infini-gram's tokenized files.
        #[arg(long, requires = "out")]
        from_tokenized: Option<PathBuf>,
        /// Index folder to write (may be the input folder).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Threads for suffix-array construction (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
        /// Memory one shard may use while it is built, in MiB.
        #[arg(long, default_value_t = 4096)]
        memory_mib: u64,
        /// With --datanet: merge runs of at least this many consecutive small shards (0: never).
        #[arg(long, default_value_t = 4)]
        merge_factor: usize,
        /// With --datanet: shards of fewer tokens than this are small.
        #[arg(long, default_value_t = 16 << 20)]
        small_shard_tokens: u64,
        /// With --datanet: new documents repeating a span of at least this many tokens of an
        /// earlier one are `duplicate_substring` penalties (0: no such pass).
        #[arg(long, default_value_t = 50)]
        substring_min_tokens: usize,
    },
    /// The document of a Datanet index holding a contribution (by content hash), as JSON.
    Doc {
        #[arg(long)]
        datanet: String,
        #[arg(long)]
        content_hash: String,
        #[arg(long, env = "LEDGERFLOW_STORE", default_value = "./data")]
        store: String,
    },
    /// Queries an index; prints JSON shaped like infini-gram's results.
    Query {
        #[arg(long)]
        index: PathBuf,
        /// The token id the document separator reads as in next-token results.
        #[arg(long, default_value_t = 0)]
        eos: u16,
        #[command(subcommand)]
        query: QueryCommand,
    },
}

#[derive(Subcommand)]
enum QueryCommand {
    /// Occurrences of the tokens.
    Count {
        #[arg(long, value_parser = parse_token_list)]
        tokens: TokenList,
    },
    /// Rank range of the tokens in each shard.
    Find {
        #[arg(long, value_parser = parse_token_list)]
        tokens: TokenList,
    },
    /// P(cont | tokens).
    Prob {
        #[arg(long, value_parser = parse_token_list)]
        tokens: TokenList,
        #[arg(long)]
        cont: u16,
    },
    /// Distribution of the next token after the tokens.
    Ntd {
        #[arg(long, value_parser = parse_token_list)]
        tokens: TokenList,
        #[arg(long, default_value_t = 1000)]
        max_support: u64,
    },
    /// ∞-gram probability of cont after the longest occurring suffix of the tokens.
    InfgramProb {
        #[arg(long, value_parser = parse_token_list)]
        tokens: TokenList,
        #[arg(long)]
        cont: u16,
    },
    /// ∞-gram next-token distribution.
    InfgramNtd {
        #[arg(long, value_parser = parse_token_list)]
        tokens: TokenList,
        #[arg(long, default_value_t = 1000)]
        max_support: u64,
    },
    /// The document at a rank of a shard.
    Doc {
        #[arg(long)]
        shard: usize,
        #[arg(long)]
        rank: u64,
        #[arg(long, default_value_t = 1000)]
        max_disp_len: u64,
    },
    /// Maximal spans of the tokens in the index and the contributions they credit.
    Attribute {
        #[arg(long, value_parser = parse_token_list)]
        tokens: TokenList,
        /// Shortest span, in tokens.
        #[arg(long, default_value_t = 1)]
        min_len: usize,
        /// Spans occurring more often are dropped.
        #[arg(long, default_value_t = 1000)]
        max_cnt: u64,
        /// Tokens a span may end at but not cross (comma-separated).
        #[arg(long, value_parser = parse_token_list, default_value = "")]
        delim: TokenList,
    },
}

/// A comma-separated list of token ids.
#[derive(Clone, Debug)]
struct TokenList(Vec<u16>);

fn parse_token_list(s: &str) -> Result<TokenList, String> {
    ledgerflow::tokens::parse_tokens(s)
        .map(TokenList)
        .map_err(|e| format!("{e:#}"))
}

#[derive(Subcommand)]
enum AttributionCommand {
    /// Projected per-example gradients of every training contribution of an adapter at every
    /// saved checkpoint (`train.checkpoints`), written to the `gradients` table.
    Index {
        #[arg(long)]
        adapter: String,
        /// Dimensions of the random projection (TRAK).
        #[arg(long, default_value_t = 512)]
        k: usize,
        #[arg(long, default_value_t = 0x7a4a)]
        seed: u64,
        #[arg(long, env = "LEDGERFLOW_STORE", default_value = "./data")]
        store: String,
    },
    /// The contributions behind a model output by gradient (run `index` first); with
    /// `--output-id`, written to `attributions` with method `gradient`.
    Score {
        #[arg(long)]
        adapter: String,
        /// The prompt and output as the model saw them.
        #[arg(long)]
        text: String,
        #[command(flatten)]
        opts: ledgerflow::attribution::ScoreOptions,
        #[arg(long)]
        output_id: Option<String>,
        #[arg(long, env = "LEDGERFLOW_STORE", default_value = "./data")]
        store: String,
    },
    /// Every answer of the adapter in `inferences` without a gradient attribution yet, scored
    /// and written to `attributions` (method `gradient`); run it before an epoch closes.
    Inferences {
        #[arg(long)]
        adapter: String,
        #[command(flatten)]
        opts: ledgerflow::attribution::ScoreOptions,
        #[arg(long, env = "LEDGERFLOW_STORE", default_value = "./data")]
        store: String,
    },
    /// Scoring speed: dot products over a `rows × k` index against this machine's measured
    /// read bandwidth (same threads); on a GPU too when one is the device (`LEDGERFLOW_DEVICE`).
    Bench {
        #[arg(long, default_value_t = 1_000_000)]
        rows: usize,
        #[arg(long, default_value_t = 256)]
        k: usize,
        #[arg(long, default_value_t = 2)]
        threads: usize,
        #[arg(long, default_value_t = 5)]
        repeats: usize,
    },
    /// Each method against retraining, on an L2 logistic regression small enough to retrain
    /// hundreds of times: leave-one-out Pearson/Spearman and the linear datamodeling score.
    Eval {
        #[arg(long, default_value_t = 200)]
        train: usize,
        #[arg(long, default_value_t = 30)]
        test: usize,
        #[arg(long, default_value_t = 8)]
        dims: usize,
        /// Random half subsets retrained for the LDS.
        #[arg(long, default_value_t = 50)]
        subsets: usize,
        #[arg(long, default_value_t = 3)]
        seed: u64,
        /// Also write the problem (training and test points, labels, L2), its optimum and every
        /// method's scores as JSON to this file (what benchmarks/attribution_dattri.py reads).
        #[arg(long)]
        export: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum GenCommand {
    /// Signed contribution messages as JSON lines.
    Contributions {
        #[arg(long, default_value_t = 1000)]
        count: u64,
        #[arg(long, default_value = "legal")]
        datanet: String,
        #[arg(long, default_value_t = 7)]
        seed: u64,
        /// Distinct contributor wallets (test wallets derived from the seed).
        #[arg(long, default_value_t = 1000)]
        contributors: u64,
        /// Approximate content length in bytes.
        #[arg(long, default_value_t = 1000)]
        content_bytes: usize,
        /// Share of lines that are not valid messages.
        #[arg(long, default_value_t = 0.0)]
        malformed_rate: f64,
        /// Output file (default: stdout).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Share of lines that are planted cases for the cleaning stages (duplicates, near
        /// duplicates, bad signatures, replays, floods, junk); needs `--manifest`.
        #[arg(long, requires = "manifest")]
        planted: Option<f64>,
        /// Where to write the decision each planted line must get (tab-separated).
        #[arg(long, requires = "planted")]
        manifest: Option<PathBuf>,
    },
    /// Synthetic `attributions` rows (model outputs crediting contributors with scores summing
    /// to 1) written to a store, for reward-epoch runs and benchmarks. Contributors are
    /// synthetic addresses (the same for every seed; no keys behind them).
    Attributions {
        #[arg(long, env = "LEDGERFLOW_STORE", default_value = "./data")]
        store: String,
        #[arg(long, default_value = "legal")]
        datanet: String,
        #[arg(long, default_value_t = 1000)]
        contributors: u64,
        #[arg(long, default_value_t = 1000)]
        outputs: u64,
        #[arg(long, default_value_t = 10)]
        per_output: u64,
        /// `created_at` from (RFC 3339) ...
        #[arg(long)]
        from: String,
        /// ... to (exclusive).
        #[arg(long)]
        to: String,
        #[arg(long, default_value_t = 7)]
        seed: u64,
    },
}

#[derive(Subcommand)]
enum DatanetCommand {
    /// Every Datanet and engine table with its files and size.
    List {
        #[arg(long, env = "LEDGERFLOW_STORE", default_value = "./data")]
        store: String,
    },
    /// One Datanet: schema, rows, contributors, days, files.
    Describe {
        name: String,
        #[arg(long, env = "LEDGERFLOW_STORE", default_value = "./data")]
        store: String,
    },
    /// The inclusion proof of a contribution in the content root its Datanet anchored in
    /// `DatanetRegistry` for its epoch, as JSON (`included(datanet, epoch, hash, proof)`).
    Proof {
        content_hash: String,
        #[command(flatten)]
        job: JobArgs,
    },
}

fn main() {
    ledgerflow::tune_allocator();
    ledgerflow::tune_threads();
    let cli = Cli::parse();
    let default_level = match cli.command {
        Command::Run { .. } | Command::Quickstart { .. } | Command::Broker { .. } => "info",
        _ => "warn",
    };
    let directives = cli.log.as_deref().unwrap_or(default_level);
    let mut filter = tracing_subscriber::EnvFilter::try_new(directives)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    if !directives.contains("rdkafka::consumer") {
        // rdkafka's consumer destructor closes the queue a second time after our own orderly
        // close and logs the (expected) "broker handle destroyed" as an error on every exit.
        if let Ok(d) = "rdkafka::consumer::base_consumer=off".parse() {
            filter = filter.add_directive(d);
        }
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if cli.log_json {
        builder.json().init();
    } else {
        builder.init();
    }
    match real_main(cli.command) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    }
}

fn io_runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("ledgerflow-io")
        .enable_all()
        .build()
        .context("starting the I/O runtime")
}

/// Sets the flag on Ctrl-C or SIGTERM.
fn shutdown_on_signal(rt: &tokio::runtime::Runtime) -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    let f = flag.clone();
    rt.spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending::<()>().await } } => {}
        }
        f.store(true, Ordering::SeqCst);
    });
    flag
}

fn real_main(command: Command) -> Result<i32> {
    match command {
        Command::Quickstart { count, store } => quickstart(count, &store).map(|()| 0),
        Command::Broker {
            port,
            topics,
            partitions,
        } => {
            let rt = io_runtime()?;
            let broker = rt.block_on(EmbeddedBroker::start(Some(port)))?;
            for t in &topics {
                let (name, n) = match t.split_once(':') {
                    Some((n, p)) => (
                        n,
                        p.parse::<i32>()
                            .with_context(|| format!("partitions in {t:?}"))?,
                    ),
                    None => (t.as_str(), partitions),
                };
                broker.create_topic(name, n)?;
            }
            println!("bootstrap={}", broker.bootstrap());
            std::io::stdout().flush()?;
            let stop = shutdown_on_signal(&rt);
            while !stop.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(100));
            }
            Ok(0)
        }
        Command::Gen {
            what:
                GenCommand::Attributions {
                    store,
                    datanet,
                    contributors,
                    outputs,
                    per_output,
                    from,
                    to,
                    seed,
                },
        } => {
            let ms = |t: &str| -> Result<i64> {
                Ok(chrono::DateTime::parse_from_rfc3339(t)
                    .with_context(|| format!("{t:?} is not RFC 3339"))?
                    .timestamp_millis())
            };
            let opts = ledgerflow::gen::AttributionGen {
                datanet,
                contributors,
                outputs,
                per_output,
                from_ms: ms(&from)?,
                to_ms: ms(&to)?,
                seed,
            };
            let store = Store::open(&store)?;
            let rows =
                io_runtime()?.block_on(ledgerflow::gen::write_attributions(&store, &opts))?;
            println!("{}", serde_json::json!({"attributions": rows}));
            Ok(0)
        }
        Command::Gen {
            what:
                GenCommand::Contributions {
                    count,
                    datanet,
                    seed,
                    contributors,
                    content_bytes,
                    malformed_rate,
                    out,
                    planted,
                    manifest,
                },
        } => {
            let opts = GenOptions {
                count,
                datanet,
                seed,
                contributors,
                content_bytes,
                malformed_rate,
                ..Default::default()
            };
            let started = Instant::now();
            if let (Some(rate), Some(manifest)) = (planted, &manifest) {
                let out = out.as_ref().context("--planted needs --out FILE")?;
                let mut w = BufWriter::with_capacity(
                    1 << 20,
                    std::fs::File::create(out)
                        .with_context(|| format!("creating {}", out.display()))?,
                );
                let mut m = BufWriter::new(
                    std::fs::File::create(manifest)
                        .with_context(|| format!("creating {}", manifest.display()))?,
                );
                let n = ledgerflow::planted::write_planted(&opts, rate, &mut w, &mut m)?;
                w.flush()?;
                m.flush()?;
                eprintln!(
                    "generated {count} contributions, {n} of them planted cases, in {:.1}s; expectations in {}",
                    started.elapsed().as_secs_f64(),
                    manifest.display()
                );
                return Ok(0);
            }
            let valid = match &out {
                Some(path) => {
                    let f = std::fs::File::create(path)
                        .with_context(|| format!("creating {}", path.display()))?;
                    let mut w = BufWriter::with_capacity(1 << 20, f);
                    let v = write_contributions(&opts, &mut w)?;
                    w.flush()?;
                    v
                }
                None => {
                    let stdout = std::io::stdout();
                    let mut w = BufWriter::new(stdout.lock());
                    let v = write_contributions(&opts, &mut w)?;
                    w.flush()?;
                    v
                }
            };
            eprintln!(
                "generated {count} lines ({valid} valid contributions) in {:.1}s",
                started.elapsed().as_secs_f64()
            );
            Ok(0)
        }
        Command::Produce {
            brokers,
            topic,
            file,
            compression,
        } => {
            let n = produce_file(&brokers, &topic, &file, &compression)?;
            println!("produced {n} records to {topic}");
            Ok(0)
        }
        Command::Verify {
            file,
            chain_id,
            verifying_contract,
        } => verify_file(&file, chain_id, &verifying_contract),
        Command::Validate { files } => {
            let mut failed = 0;
            for f in &files {
                match spec::load(f) {
                    Ok(s) => {
                        let count = |r| s.nodes.iter().filter(|n| n.role == r).count();
                        use ledgerflow::registry::Role;
                        println!(
                            "{}: ok (job `{}`: {} source, {} stages, {} sinks)",
                            f.display(),
                            s.header.name,
                            count(Role::Source),
                            count(Role::Stage),
                            count(Role::Sink)
                        );
                    }
                    Err(d) => {
                        failed += 1;
                        eprintln!("{d}");
                    }
                }
            }
            Ok(if failed > 0 { 1 } else { 0 })
        }
        Command::Run {
            file,
            store,
            until_idle,
            metrics,
            worker,
            progress,
        } => {
            let spec = spec::load(&file).map_err(|d| anyhow::anyhow!("{d}"))?;
            if spec.nodes.is_empty() && spec.header.epochs.is_some() {
                // A job of reward epochs only: `run` is `epoch run`.
                let epochs = epochs_of(&spec, store)?;
                return run_epochs(&io_runtime()?, epochs, until_idle.is_some());
            }
            let plan = Plan::new(&spec).map_err(|d| anyhow::anyhow!("{}", spec::Diagnostics(d)))?;
            let store_url = store
                .or_else(|| spec.header.store.clone())
                .unwrap_or_else(|| "./data".into());
            let store = Store::open(&store_url)?;
            let rt = io_runtime()?;
            if ledgerflow::batch::is_models_job(&spec) {
                let show = match progress.as_str() {
                    "always" => true,
                    "never" => false,
                    _ => std::io::IsTerminal::is_terminal(&std::io::stderr()),
                };
                let report = ledgerflow::batch::run_models_job(&spec, &store, &rt, show)?;
                if !report.is_null() {
                    println!("{report}");
                }
                return Ok(0);
            }
            if ledgerflow::batch::is_batch_job(&spec) {
                let report = rt.block_on(ledgerflow::batch::run_index_job(&spec, &store))?;
                println!("{}", serde_json::to_string(&report)?);
                return Ok(0);
            }
            let stop = shutdown_on_signal(&rt);
            let uses_embedded = spec.nodes.iter().any(|n| matches!(&n.built, ledgerflow::registry::Built::Kafka(c) if c.brokers == ledgerflow_kafka::EMBEDDED));
            let broker = if uses_embedded {
                Some(rt.block_on(EmbeddedBroker::start(None))?)
            } else {
                None
            };
            if let Some(b) = &broker {
                eprintln!("embedded broker: bootstrap={}", b.bootstrap());
            }
            let progress = match progress.as_str() {
                "always" => true,
                "never" => false,
                _ => std::io::IsTerminal::is_terminal(&std::io::stderr()),
            };
            let metrics = metrics
                .or_else(|| spec.header.metrics.listen.clone())
                .filter(|s| !s.is_empty());
            let opts = RunOptions {
                store,
                until_idle: until_idle.map(Duration::from_secs_f64),
                metrics_addr: metrics,
                worker: worker.unwrap_or_else(default_worker),
                progress,
                embedded_bootstrap: broker.as_ref().map(|b| b.bootstrap().to_string()),
                channel_rows: 64 * 1024,
            };
            let started = Instant::now();
            let summary = run_job(spec, plan, opts, rt.handle().clone(), stop)?;
            eprintln!(
                "done: read {} records, rejected {}, {} checkpoints over partitions {:?} in {:.1}s (active {:.2}s)",
                summary.records_read,
                summary.records_rejected,
                summary.checkpoints,
                summary.partitions,
                started.elapsed().as_secs_f64(),
                summary.active.map_or(0.0, |d| d.as_secs_f64())
            );
            drop(broker);
            Ok(0)
        }
        Command::Sql {
            query,
            store,
            format,
        } => {
            let store = Store::open(&store)?;
            let rt = io_runtime()?;
            let batches = rt.block_on(sql::query(&store, &query))?;
            let mut text = sql::format(&batches, format)?;
            if !text.ends_with('\n') {
                text.push('\n');
            }
            // A reader that stops early (`| head`) is not an error.
            match std::io::Write::write_all(&mut std::io::stdout().lock(), text.as_bytes()) {
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
                _ => Ok(0),
            }
        }
        Command::Datanet { what } => datanet(what),
        Command::Index { what } => index_command(what).map(|()| 0),
        Command::Attribute {
            datanet,
            text,
            store,
            min_len,
            max_cnt,
            output_id,
            created_at,
            model,
            prompt,
            fee,
        } => {
            let store = Store::open(&store)?;
            let dir = ledgerflow::tokens::datanet_index_dir(&store, &datanet)?;
            let params = ledgerflow_index::AttributeParams {
                min_len,
                max_cnt,
                ..Default::default()
            };
            let mut result = ledgerflow::tokens::attribute_text(&dir, &text, &params)?;
            if let Some(id) = output_id {
                let at = match created_at {
                    Some(t) => chrono::DateTime::parse_from_rfc3339(&t)
                        .with_context(|| format!("--created-at {t:?} is not RFC 3339"))?
                        .timestamp_millis(),
                    None => chrono::Utc::now().timestamp_millis(),
                };
                let rt = io_runtime()?;
                let rows = rt.block_on(ledgerflow::tokens::record_attributions(
                    &store, &datanet, &id, &result, at,
                ))?;
                result["recorded"] = serde_json::json!({ "output_id": id, "rows": rows });
                if let Some(model) = model {
                    let fee = fee
                        .map(|f| {
                            f.parse::<u128>()
                                .ok()
                                .filter(|v| *v < 10u128.pow(38))
                                .with_context(|| {
                                    format!(
                                        "--fee {f:?} is not an amount in base units below 10^38"
                                    )
                                })
                        })
                        .transpose()?;
                    let inference = ledgerflow::tokens::Inference {
                        request_id: &id,
                        model: &model,
                        adapter_generation: None,
                        datanet: &datanet,
                        prompt: &prompt,
                        output: &text,
                        prompt_tokens: 0,
                        completion_tokens: result["tokens"].as_u64().unwrap_or(0) as u32,
                        time_to_first_token_ms: None,
                        total_ms: None,
                        fee,
                        created_at_ms: at,
                    };
                    rt.block_on(ledgerflow::tokens::record_inference(&store, &inference))?;
                    result["recorded"]["inference"] = serde_json::json!(true);
                }
            }
            println!("{result}");
            Ok(0)
        }
        Command::Rewards { what } => rewards_command(what).map(|()| 0),
        Command::Contracts { what } => contracts_command(what).map(|()| 0),
        Command::Epoch { what } => epoch_command(what),
        Command::TrainReference {
            store,
            datanet,
            out,
            steps,
        } => {
            ledgerflow::train::train_reference(&Store::open(&store)?, &datanet, &out, steps)?;
            Ok(0)
        }
        Command::Train {
            datanet,
            adapter_of,
            steps,
            config,
            store,
            progress,
        } => {
            let mut file = match &config {
                Some(p) => ledgerflow::train::load_train_file(p)?,
                None => ledgerflow::train::TrainFile::default(),
            };
            if let Some(n) = steps {
                file.train.steps = n;
            }
            let show = match progress.as_str() {
                "always" => true,
                "never" => false,
                _ => std::io::IsTerminal::is_terminal(&std::io::stderr()),
            };
            let store = Store::open(&store)?;
            let rt = io_runtime()?;
            let mut last = Instant::now();
            let mut bar = |step: usize, steps: usize, loss: f64, tps: f64, left: f64| {
                if show && (last.elapsed() > Duration::from_millis(200) || step == steps) {
                    last = Instant::now();
                    let done = step * 30 / steps.max(1);
                    eprint!(
                        "\r[{}{}] step {step}/{steps} loss {loss:.4} {tps:.0} tokens/s ETA {left:.0}s ",
                        "#".repeat(done),
                        " ".repeat(30 - done)
                    );
                    if step == steps {
                        eprintln!();
                    }
                }
            };
            let trained = match &adapter_of {
                Some(base) => {
                    ledgerflow::train::train_adapter(&rt, &store, &datanet, base, &file, &mut bar)?
                }
                None => ledgerflow::train::train_base(&rt, &store, &datanet, &file, &mut bar)?,
            };
            let mut report = serde_json::to_value(&trained)?;
            report["report"]
                .as_object_mut()
                .expect("an object")
                .remove("curve");
            println!("{report}");
            println!("{}", trained.id);
            Ok(0)
        }
        Command::Attribution { what } => {
            match what {
                AttributionCommand::Eval {
                    train,
                    test,
                    dims,
                    subsets,
                    seed,
                    export,
                } => {
                    let r = ledgerflow::attribution::eval(
                        train,
                        test,
                        dims,
                        subsets,
                        seed,
                        export.as_deref(),
                    )?;
                    println!("{}", serde_json::to_string_pretty(&r)?);
                }
                AttributionCommand::Bench {
                    rows,
                    k,
                    threads,
                    repeats,
                } => {
                    let r = ledgerflow::attribution::bench_scoring(rows, k, threads, repeats)?;
                    println!("{r}");
                }
                AttributionCommand::Inferences {
                    adapter,
                    opts,
                    store,
                } => {
                    let store = Store::open(&store)?;
                    let rt = io_runtime()?;
                    let r = ledgerflow::attribution::attribute_inferences(
                        &rt, &store, &adapter, &opts,
                    )?;
                    println!("{r}");
                }
                AttributionCommand::Index {
                    adapter,
                    k,
                    seed,
                    store,
                } => {
                    let store = Store::open(&store)?;
                    let rt = io_runtime()?;
                    let r = ledgerflow::attribution::build_index(&rt, &store, &adapter, k, seed)?;
                    println!("{r}");
                }
                AttributionCommand::Score {
                    adapter,
                    text,
                    opts,
                    output_id,
                    store,
                } => {
                    let store = Store::open(&store)?;
                    let rt = io_runtime()?;
                    let mut r =
                        ledgerflow::attribution::score(&rt, &store, &adapter, &text, &opts)?;
                    if let Some(id) = output_id {
                        let models = rt.block_on(ledgerflow::train::registry(&store))?;
                        let datanet = ledgerflow::train::find(&models, &adapter)?.datanet.clone();
                        let key = hex::encode(
                            &ledgerflow_schemas::contribution::keccak256(id.as_bytes())[..12],
                        );
                        let n = rt.block_on(ledgerflow::tokens::record_attribution_batch(
                            &store,
                            &[(&id, &datanet, &r, chrono::Utc::now().timestamp_millis())],
                            "gradient",
                            &format!("gradient-{datanet}-{key}.parquet"),
                        ))?;
                        r["recorded"] = serde_json::json!({ "output_id": id, "rows": n });
                    }
                    println!("{r}");
                }
            }
            Ok(0)
        }
        Command::Serve {
            port,
            host,
            store,
            api_key,
            adapter_budget_mib,
            max_batch,
            no_attribution,
            for_seconds,
            kafka_brokers,
            request_topic,
            response_topic,
            kafka_group,
            gradient,
        } => {
            let store = Store::open(&store)?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(
                    std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 8)),
                )
                .thread_name("ledgerflow-serve")
                .enable_all()
                .build()?;
            rt.block_on(async {
                let opts = ledgerflow::serve::ServeOptions {
                    listen: format!("{host}:{port}"),
                    api_key,
                    adapter_budget_bytes: adapter_budget_mib << 20,
                    max_batch,
                    attribution: !no_attribution,
                    kafka: kafka_brokers.map(|brokers| ledgerflow::serve::KafkaServing {
                        brokers,
                        requests: request_topic.unwrap_or_default(),
                        responses: response_topic.unwrap_or_default(),
                        group: kafka_group,
                    }),
                    gradient,
                };
                let (server, handle) = ledgerflow::serve::start(
                    store,
                    opts,
                    ledgerflow::serve::until(for_seconds.map(Duration::from_secs)),
                )
                .await?;
                println!(
                    "listening on http://{} ({} models: {})",
                    server.addr,
                    server.models.len(),
                    server.models.join(", ")
                );
                use std::io::Write as _;
                std::io::stdout().flush()?;
                handle.await?;
                anyhow::Ok(())
            })?;
            Ok(0)
        }
        Command::Da {
            what: DaCommand::Serve { listen, dir },
        } => {
            let rt = io_runtime()?;
            let addr = rt.block_on(ledgerflow_da::altda::serve(&listen, dir))?;
            println!("http://{addr}");
            std::io::stdout().flush()?;
            let stop = shutdown_on_signal(&rt);
            while !stop.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(100));
            }
            Ok(0)
        }
        Command::Da {
            what: DaCommand::Get { commitment, url },
        } => {
            let digits = commitment.trim().trim_start_matches("0x");
            let c = hex::decode(digits).with_context(|| format!("{commitment:?} is not hex"))?;
            let payload = io_runtime()?.block_on(ledgerflow_da::AltDaClient::new(&url).get(&c))?;
            std::io::stdout().lock().write_all(&payload)?;
            Ok(0)
        }
        Command::Da {
            what: DaCommand::Put { url },
        } => {
            let mut input = Vec::new();
            std::io::Read::read_to_end(&mut std::io::stdin().lock(), &mut input)?;
            let c = io_runtime()?.block_on(ledgerflow_da::AltDaClient::new(&url).put(input))?;
            println!("0x{}", hex::encode(c));
            Ok(0)
        }
        Command::Da { what } => {
            let mut input = Vec::new();
            std::io::Read::read_to_end(&mut std::io::stdin().lock(), &mut input)?;
            let output = match what {
                DaCommand::Encode => ledgerflow_da::encode(&input)?,
                DaCommand::Decode => ledgerflow_da::decode(&input)
                    .with_context(|| format!("decoding {} bytes from stdin", input.len()))?,
                DaCommand::Serve { .. } | DaCommand::Get { .. } | DaCommand::Put { .. } => {
                    unreachable!("handled above")
                }
            };
            let mut out = std::io::stdout().lock();
            out.write_all(&output)?;
            out.flush()?;
            Ok(0)
        }
        Command::Schema => {
            println!(
                "{}",
                serde_json::to_string_pretty(&ledgerflow::job_schema::job_schema())?
            );
            Ok(0)
        }
    }
}

fn default_worker() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!("{}-{}", host.trim(), std::process::id())
}

/// Produces every line of `file` to `topic`, keyed by the content hash of the contribution (or of
/// the line, when it is not one).
fn produce_file(brokers: &str, topic: &str, file: &Path, compression: &str) -> Result<u64> {
    let f = std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?;
    let mut producer = BulkProducer::new(brokers, compression)?;
    let mut reader = std::io::BufReader::with_capacity(1 << 20, f);
    let mut line = Vec::new();
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line)? == 0 {
            break;
        }
        let value = line.strip_suffix(b"\n").unwrap_or(&line);
        if value.is_empty() {
            continue;
        }
        let key = content_key(value);
        producer.send(topic, key.as_bytes(), value)?;
    }
    Ok(producer.finish(Duration::from_secs(120))?)
}

/// The record key: `0x` hex of keccak256(content), or of the whole value if it has no content.
fn content_key(value: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct OnlyContent<'a> {
        #[serde(borrow)]
        content: std::borrow::Cow<'a, str>,
    }
    match serde_json::from_slice::<OnlyContent<'_>>(value) {
        Ok(c) => ledgerflow_schemas::hex0x::encode(&keccak256(c.content.as_bytes())),
        Err(_) => ledgerflow_schemas::hex0x::encode(&keccak256(value)),
    }
}

/// `datanet proof`: the epoch and Datanet whose anchored content root holds `hash`, and its proof.
fn datanet_proof(content_hash: &str, job: &JobArgs) -> Result<serde_json::Value> {
    use ledgerflow_rewards::merkle::hex0x;
    let epochs = job.epochs()?;
    let rt = io_runtime()?;
    let digits = content_hash.trim().trim_start_matches("0x");
    let wanted: [u8; 32] = hex::decode(digits)
        .ok()
        .and_then(|b| b.try_into().ok())
        .with_context(|| format!("{content_hash:?} is not a 32-byte 0x hex content hash"))?;
    for n in rt.block_on(epochs.journaled())?.into_iter().rev() {
        let Some(j) = rt.block_on(epochs.journal(n))? else {
            continue;
        };
        let Some(c) = j.computed else { continue };
        for d in &c.datanets {
            let values = rt.block_on(epochs.contents(n, &d.datanet))?;
            let Some(i) = values.iter().position(|v| v == &wanted) else {
                continue;
            };
            let tree = ledgerflow_rewards::Bytes32Tree::of(values)?;
            let proof = tree.proof(i).expect("a leaf of the tree");
            let anchored = j
                .transactions
                .iter()
                .any(|t| matches!(&t.action, ledgerflow::epoch::Action::Anchor { datanet } if datanet == &d.datanet) && t.confirmed.is_some());
            return Ok(serde_json::json!({
                "content_hash": hex0x(wanted),
                "datanet": d.datanet,
                "epoch": n,
                "root": hex0x(tree.root()),
                "anchored": anchored,
                "proof": proof.iter().map(hex0x).collect::<Vec<_>>(),
            }));
        }
    }
    bail!(
        "{} is in no content root of job `{}` computed so far",
        hex0x(wanted),
        epochs.job
    )
}

fn datanet(what: DatanetCommand) -> Result<i32> {
    let rt = io_runtime()?;
    match what {
        DatanetCommand::Proof { content_hash, job } => {
            println!("{}", datanet_proof(&content_hash, &job)?);
            Ok(0)
        }
        DatanetCommand::List { store } => {
            let store = Store::open(&store)?;
            let tables = rt.block_on(sql::list_tables(&store))?;
            println!(
                "{:<24} {:<8} {:>7} {:>12} {:>6}",
                "name", "kind", "files", "bytes", "days"
            );
            for t in tables {
                let kind = match t.kind {
                    ledgerflow_store::TableKind::Datanet => "datanet",
                    ledgerflow_store::TableKind::Engine => "engine",
                };
                println!(
                    "{:<24} {:<8} {:>7} {:>12} {:>6}",
                    t.name,
                    kind,
                    t.files,
                    t.bytes,
                    t.days.len()
                );
            }
            Ok(0)
        }
        DatanetCommand::Describe { name, store } => {
            let store = Store::open(&store)?;
            let tables = rt.block_on(sql::list_tables(&store))?;
            let Some(t) = tables
                .iter()
                .find(|t| t.name == name && t.kind == ledgerflow_store::TableKind::Datanet)
            else {
                let names: Vec<&str> = tables
                    .iter()
                    .filter(|t| t.kind == ledgerflow_store::TableKind::Datanet)
                    .map(|t| t.name.as_str())
                    .collect();
                bail!(
                    "no Datanet `{name}` in {} (Datanets: {})",
                    store.url(),
                    if names.is_empty() {
                        "none".to_string()
                    } else {
                        names.join(", ")
                    }
                );
            };
            println!("datanet   {}", t.name);
            println!("location  {}datanets/{}/", store.url(), t.name);
            println!("files     {} ({} bytes)", t.files, t.bytes);
            println!("days      {}", t.days.join(", "));
            let stats = rt.block_on(sql::query(
                &store,
                &format!(
                    "SELECT count(*) AS rows, count(DISTINCT contributor) AS contributors, \
                 min(kafka_timestamp) AS first_record, max(kafka_timestamp) AS last_record, \
                 sum(length(content)) AS content_bytes FROM {name}"
                ),
            ))?;
            print!("{}", sql::format(&stats, OutputFormat::Table)?);
            println!();
            println!("schema (partitioned by day):");
            for f in ledgerflow_schemas::tables::contribution_schema().fields() {
                println!(
                    "  {:<16} {}{}",
                    f.name(),
                    f.data_type(),
                    if f.is_nullable() { " (nullable)" } else { "" }
                );
            }
            Ok(0)
        }
    }
}

fn verify_file(file: &Path, chain_id: u64, verifying_contract: &str) -> Result<i32> {
    use ledgerflow_operators::decode::{decode_message, DecodeConfig};
    use ledgerflow_operators::signature::{check_contribution, parse_address};
    use ledgerflow_schemas::contribution::{Contribution, SigningDomain};

    let domain = SigningDomain {
        chain_id,
        verifying_contract: parse_address(verifying_contract)
            .map_err(|e| anyhow::anyhow!("--verifying-contract: {e}"))?,
    };
    let f = std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?;
    let config = DecodeConfig::default();
    let (mut total, mut refused) = (0u64, 0u64);
    let stdout = std::io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    for (i, line) in std::io::BufReader::new(f).split(b'\n').enumerate() {
        let line = line.with_context(|| format!("reading {}", file.display()))?;
        if line.is_empty() {
            continue;
        }
        total += 1;
        let verdict = match decode_message(&line, &config) {
            Err(e) => Err((e.reason, e.detail)),
            Ok(row) => match serde_json::from_slice::<Contribution<'_>>(&line) {
                Err(e) => Err(("schema", e.to_string())),
                Ok(c) => check_contribution(&c, &domain)
                    .map(|_| ())
                    .map_err(|e| (e.reason(), e.detail(&row.contributor))),
            },
        };
        if let Err((reason, detail)) = verdict {
            refused += 1;
            writeln!(out, "{}:{}: {reason}: {detail}", file.display(), i + 1)?;
        }
    }
    writeln!(
        out,
        "{}: {} of {total} signatures verified, {refused} refused",
        file.display(),
        total - refused
    )?;
    Ok(i32::from(refused > 0))
}

fn quickstart(count: u64, store_url: &str) -> Result<()> {
    let rt = io_runtime()?;
    let broker = rt.block_on(EmbeddedBroker::start(None))?;
    let topic = "contributions.legal";
    broker.create_topic(topic, 4)?;
    eprintln!(
        "[1/4] embedded broker at {} with topic {topic} (4 partitions)",
        broker.bootstrap()
    );

    let opts = GenOptions {
        count,
        datanet: "legal".into(),
        seed: 7,
        contributors: 200,
        malformed_rate: 0.01,
        ..Default::default()
    };
    let mut lines = Vec::new();
    let valid = write_contributions(&opts, &mut lines)?;
    let mut producer = BulkProducer::new(broker.bootstrap(), "none")?;
    for line in lines.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        producer.send(topic, content_key(line).as_bytes(), line)?;
    }
    producer.finish(Duration::from_secs(60))?;
    eprintln!(
        "[2/4] produced {count} signed contributions from 200 test wallets ({} planted malformed)",
        count - valid
    );

    let spec = spec::parse(
        "jobs/quickstart.yaml",
        ledgerflow::QUICKSTART_JOB,
        &|k| match k {
            "CONTRIBUTIONS_TOPIC" => Some(topic.to_string()),
            _ => std::env::var(k).ok(),
        },
    )
    .map_err(|d| anyhow::anyhow!("{d}"))?;
    let plan = Plan::new(&spec).map_err(|d| anyhow::anyhow!("{}", spec::Diagnostics(d)))?;
    let store = Store::open(store_url)?;
    let stop = shutdown_on_signal(&rt);
    let summary = run_job(
        spec,
        plan,
        RunOptions {
            store: store.clone(),
            until_idle: Some(Duration::from_secs(2)),
            metrics_addr: None,
            worker: default_worker(),
            progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
            embedded_bootstrap: Some(broker.bootstrap().to_string()),
            channel_rows: 64 * 1024,
        },
        rt.handle().clone(),
        stop,
    )?;
    eprintln!(
        "[3/4] ingested {} records ({} rejected) into {}datanets/legal/ in {} checkpoints",
        summary.records_read,
        summary.records_rejected,
        store.url(),
        summary.checkpoints
    );

    for q in [
        "SELECT count(*) AS contributions, count(DISTINCT contributor) AS contributors FROM legal",
        "SELECT contributor, count(*) AS contributions FROM legal GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT 5",
        "SELECT reason, count(*) AS rejected FROM rejections GROUP BY 1 ORDER BY 2 DESC",
    ] {
        println!("> {q}");
        let batches = rt.block_on(sql::query(&store, q))?;
        println!("{}", sql::format(&batches, OutputFormat::Table)?);
    }
    eprintln!("[4/4] try: ledgerflow sql --store {store_url} \"SELECT * FROM legal LIMIT 3\"");
    Ok(())
}

fn index_command(what: IndexCommand) -> Result<()> {
    use ledgerflow::tokens::{self, Query};
    match what {
        IndexCommand::Build {
            datanet,
            store,
            vocab_size,
            from_tokenized,
            out,
            threads,
            memory_mib,
            merge_factor,
            small_shard_tokens,
            substring_min_tokens,
        } => {
            let threads = threads
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
            let started = Instant::now();
            let (Some(from_tokenized), Some(out)) = (from_tokenized, out) else {
                let datanet = datanet.context("--datanet or --from-tokenized")?;
                let store = Store::open(&store)?;
                let opts = ledgerflow::tokens::DatanetIndexOptions {
                    vocab_size,
                    min_frequency: 2,
                    memory_budget: memory_mib << 20,
                    threads,
                    merge: ledgerflow::tokens::MergePolicy {
                        factor: merge_factor,
                        small_shard_tokens,
                    },
                    substring_min_tokens: (substring_min_tokens > 0)
                        .then_some(substring_min_tokens),
                };
                let policy = ledgerflow::spec::PenaltyPolicy::default();
                let report = io_runtime()?.block_on(ledgerflow::tokens::build_datanet_index(
                    &store,
                    &datanet,
                    &opts,
                    Some(&policy),
                ))?;
                println!("{}", serde_json::to_string(&report)?);
                return Ok(());
            };
            let shards = ledgerflow_index::build_from_tokenized(
                &from_tokenized,
                &out,
                threads,
                memory_mib << 20,
            )?;
            let tokens: u64 = shards.iter().map(|s| s.tokens).sum();
            println!(
                "{}",
                serde_json::json!({
                    "index": out,
                    "shards": shards,
                    "tokens": tokens,
                    "seconds": started.elapsed().as_secs_f64(),
                })
            );
            Ok(())
        }
        IndexCommand::Doc {
            datanet,
            content_hash,
            store,
        } => {
            let store = Store::open(&store)?;
            let dir = tokens::datanet_index_dir(&store, &datanet)?;
            println!("{}", tokens::document_by_hash(&dir, &content_hash)?);
            Ok(())
        }
        IndexCommand::Query { index, eos, query } => {
            let index = tokens::open(&index, eos)?;
            let (ids, query) = match query {
                QueryCommand::Count { tokens } => (tokens.0, Query::Count),
                QueryCommand::Find { tokens } => (tokens.0, Query::Find),
                QueryCommand::Prob { tokens, cont } => (tokens.0, Query::Prob { cont }),
                QueryCommand::Ntd {
                    tokens,
                    max_support,
                } => (tokens.0, Query::Ntd { max_support }),
                QueryCommand::InfgramProb { tokens, cont } => {
                    (tokens.0, Query::InfgramProb { cont })
                }
                QueryCommand::InfgramNtd {
                    tokens,
                    max_support,
                } => (tokens.0, Query::InfgramNtd { max_support }),
                QueryCommand::Doc {
                    shard,
                    rank,
                    max_disp_len,
                } => (
                    Vec::new(),
                    Query::Doc {
                        shard,
                        rank,
                        max_disp_len,
                    },
                ),
                QueryCommand::Attribute {
                    tokens,
                    min_len,
                    max_cnt,
                    delim,
                } => (
                    tokens.0,
                    Query::Attribute(ledgerflow_index::AttributeParams {
                        delim_ids: delim.0,
                        min_len,
                        max_cnt,
                        bow_ids: None,
                    }),
                ),
            };
            let result = tokens::run_query(&index, &ids, &query)?;
            println!("{result}");
            Ok(())
        }
    }
}

fn rewards_tree(leaves: &Path) -> Result<ledgerflow_rewards::StandardMerkleTree> {
    let text =
        std::fs::read_to_string(leaves).with_context(|| format!("reading {}", leaves.display()))?;
    let leaves_read = ledgerflow_rewards::merkle::parse_leaves_csv(&text)
        .with_context(|| format!("{}", leaves.display()))?;
    Ok(ledgerflow_rewards::StandardMerkleTree::of(leaves_read)?)
}

fn b256(text: &str, what: &str) -> Result<ledgerflow_chain::primitives::B256> {
    text.parse()
        .with_context(|| format!("{what} {text:?} is not 32 bytes of 0x hex"))
}

fn contracts_command(what: ContractsCommand) -> Result<()> {
    match what {
        ContractsCommand::Deploy {
            rpc,
            settler,
            reward_pool,
            out,
        } => {
            let key = ledgerflow_chain::signer_from_env("LEDGERFLOW_DEPLOYER_KEY")?;
            let settler = match settler {
                Some(a) => ledgerflow_rewards::merkle::parse_address(&a)
                    .map_err(anyhow::Error::msg)?
                    .into(),
                None => key.address(),
            };
            let pool = ledgerflow_rewards::Amount::parse(&reward_pool)?;
            let opts = ledgerflow_chain::DeployOptions {
                settler,
                reward_pool: ledgerflow_chain::primitives::U256::from_be_bytes(pool.0),
                attribution_threshold: 10_000,
                emission: ledgerflow_chain::primitives::U256::from(1_000u64)
                    * ledgerflow_chain::primitives::U256::from(10u64)
                        .pow(ledgerflow_chain::primitives::U256::from(18u64)),
                timelock_delay: 2 * 86_400,
                voting_delay: 1,
                voting_period: 50_400,
            };
            let deployment = io_runtime()?.block_on(ledgerflow_chain::deploy(&rpc, key, &opts))?;
            let json = serde_json::to_string_pretty(&deployment)?;
            if let Some(path) = out {
                std::fs::write(&path, &json)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            println!("{json}");
        }
    }
    Ok(())
}

/// The tree of a leaves CSV (`name` for messages), and ADDRESS's first leaf in it with its proof.
fn leaf_and_proof(
    address: &str,
    text: &str,
    name: &str,
) -> Result<(
    ledgerflow_rewards::Account,
    ledgerflow_rewards::StandardMerkleTree,
    ledgerflow_rewards::Leaf,
    Vec<ledgerflow_rewards::Hash>,
)> {
    use ledgerflow_rewards::merkle::{checksum_address, parse_address};
    let account = parse_address(address).map_err(anyhow::Error::msg)?;
    let leaves =
        ledgerflow_rewards::merkle::parse_leaves_csv(text).with_context(|| name.to_string())?;
    let tree = ledgerflow_rewards::StandardMerkleTree::of(leaves)?;
    let index = tree
        .position(&account)
        .with_context(|| format!("{} has no leaf in {name}", checksum_address(&account)))?;
    let leaf = tree.leaves()[index];
    let proof = tree.proof(index).expect("a leaf of the tree");
    Ok((account, tree, leaf, proof))
}

fn epoch_command(what: EpochCommand) -> Result<i32> {
    let rt = io_runtime()?;
    match what {
        EpochCommand::List { job } => {
            let epochs = job.epochs()?;
            let list = rt.block_on(epochs.list())?;
            let short = |v: &serde_json::Value| match v.as_str() {
                Some(s) if s.len() > 14 => format!("{}…", &s[..12]),
                Some(s) => s.to_string(),
                None => "-".into(),
            };
            println!(
                "{:>6}  {:<24}  {:<24}  {:<9}  {:<13}  {:>6}  {:<13}",
                "epoch", "start", "end", "state", "root", "paid", "settle tx"
            );
            for e in &list {
                println!(
                    "{:>6}  {:<24}  {:<24}  {:<9}  {:<13}  {:>6}  {:<13}",
                    e["epoch"].as_u64().unwrap_or_default(),
                    e["start"].as_str().unwrap_or_default(),
                    e["end"].as_str().unwrap_or_default(),
                    e["state"].as_str().unwrap_or_default(),
                    short(&e["root"]),
                    e["contributors_paid"]
                        .as_u64()
                        .map_or("-".into(), |n| n.to_string()),
                    short(&e["settle_tx"]),
                );
            }
            Ok(0)
        }
        EpochCommand::Status { epoch, job } => {
            let epochs = job.epochs()?;
            match rt.block_on(epochs.journal(epoch))? {
                Some(j) => println!("{}", serde_json::to_string_pretty(&j)?),
                None => {
                    let (from, to) = epochs.cfg.window(epoch).map_err(anyhow::Error::msg)?;
                    let closes = epochs.cfg.closes_at_ms(epoch).map_err(anyhow::Error::msg)?;
                    let closed = rt
                        .block_on(epochs.watermark())?
                        .is_some_and(|w| w >= closes);
                    println!(
                        "{}",
                        serde_json::json!({"epoch": epoch, "state": if closed { "closed" } else { "open" }, "start_ms": from, "end_ms": to})
                    );
                }
            }
            Ok(0)
        }
        EpochCommand::Run { job, once } => {
            let epochs = job.epochs()?;
            run_epochs(&rt, epochs, once)
        }
    }
}

/// `epoch run`: settles closed epochs; with `once`, stops when none is left.
fn run_epochs(
    rt: &tokio::runtime::Runtime,
    epochs: ledgerflow::epoch::Epochs,
    once: bool,
) -> Result<i32> {
    let key = ledgerflow_chain::signer_from_env("LEDGERFLOW_SETTLER_KEY")?;
    let poll = Duration::from_secs_f64(epochs.cfg.poll_seconds);
    let _lock = epochs_lock(&epochs)?;
    let settler = rt.block_on(ledgerflow::epoch::Settler::connect(epochs, key))?;
    let stop = shutdown_on_signal(rt);
    loop {
        let started = Instant::now();
        let settled = rt.block_on(settler.run_once())?;
        for n in &settled {
            let j = rt
                .block_on(settler.epochs.journal(*n))?
                .context("a settled epoch has a journal")?;
            println!(
                "{}",
                serde_json::json!({
                    "epoch": n,
                    "state": j.state,
                    "root": j.computed.as_ref().map(|c| c.root.to_string()),
                    "contributors_paid": j.computed.as_ref().map(|c| c.contributors_paid),
                    "da_commitment": j.published.as_ref().map(|p| p.commitment.clone()),
                    "settle_tx": j.settlement.as_ref().map(|s| s.transaction.to_string()),
                    "settle_gas": j.settlement.as_ref().map(|s| s.gas_used),
                    "gas_used": j.total_gas_used,
                    "l1_fee_wei": j.total_l1_fee,
                    "seconds": started.elapsed().as_secs_f64(),
                })
            );
        }
        if once || stop.load(Ordering::SeqCst) {
            return Ok(0);
        }
        let until = Instant::now() + poll;
        while Instant::now() < until && !stop.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(100));
        }
        if stop.load(Ordering::SeqCst) {
            return Ok(0);
        }
    }
}

/// One settler per job and local store: an exclusive `flock` on `epochs/<job>.lock`, held
/// until the process exits (a second `epoch run` fails at once instead of racing the first).
#[allow(unsafe_code)]
fn epochs_lock(epochs: &ledgerflow::epoch::Epochs) -> Result<Option<std::fs::File>> {
    use std::os::fd::AsRawFd;
    let url = epochs.store.url();
    if url.scheme() != "file" {
        return Ok(None);
    }
    let dir = url
        .to_file_path()
        .map_err(|_| anyhow::anyhow!("{url} is not a local path"))?
        .join("epochs");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("{}.lock", epochs.job));
    let file =
        std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    // SAFETY: flock on a descriptor this function owns.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        bail!(
            "another `epoch run` holds {} (one settler per job and store)",
            path.display()
        );
    }
    Ok(Some(file))
}

fn rewards_command(what: RewardsCommand) -> Result<()> {
    use ledgerflow_rewards::merkle::{checksum_address, hex0x, parse_address};
    match what {
        RewardsCommand::Settle {
            epoch,
            leaves,
            chain,
            data_hash,
            da_commitment,
        } => {
            let tree = rewards_tree(&leaves)?;
            let total = tree.leaves().iter().try_fold(
                ledgerflow_chain::primitives::U256::ZERO,
                |sum, l| {
                    sum.checked_add(ledgerflow_chain::primitives::U256::from_be_bytes(
                        l.amount.0,
                    ))
                },
            );
            let total = total.context("the leaves' amounts add up to more than a uint256")?;
            let key = ledgerflow_chain::signer_from_env("LEDGERFLOW_SETTLER_KEY")?;
            let (rpc, deployment) = chain.resolve(None)?;
            let mined = io_runtime()?.block_on(ledgerflow_chain::settle(
                &rpc,
                key,
                &deployment,
                epoch,
                tree.root().into(),
                b256(&data_hash, "--data-hash")?,
                b256(&da_commitment, "--da-commitment")?,
                total,
            ))?;
            println!(
                "{}",
                serde_json::json!({"epoch": epoch, "root": hex0x(tree.root()), "total_cumulative": total.to_string(), "transaction": mined})
            );
        }
        RewardsCommand::Claim {
            address,
            leaves,
            chain,
        } => {
            let (text, name) = leaves.read()?;
            let (account, _tree, leaf, proof) = leaf_and_proof(&address, &text, &name)?;
            let key = ledgerflow_chain::signer_from_env("LEDGERFLOW_CLAIM_KEY")?;
            let (rpc, deployment) = chain.resolve(leaves.job.as_deref())?;
            let (paid, mined) = io_runtime()?.block_on(ledgerflow_chain::claim(
                &rpc,
                key,
                &deployment,
                account.into(),
                ledgerflow_chain::primitives::U256::from_be_bytes(leaf.amount.0),
                proof.into_iter().map(Into::into).collect(),
            ))?;
            println!(
                "{}",
                serde_json::json!({"account": checksum_address(&account), "cumulative": leaf.amount.to_string(), "paid": paid.to_string(), "transaction": mined})
            );
        }
        RewardsCommand::Status { address, chain } => {
            let account = parse_address(&address).map_err(anyhow::Error::msg)?;
            let (rpc, deployment) = chain.resolve(None)?;
            let (balance, claimed) = io_runtime()?.block_on(ledgerflow_chain::reward_status(
                &rpc,
                &deployment,
                account.into(),
            ))?;
            println!(
                "{}",
                serde_json::json!({"account": checksum_address(&account), "balance": balance.to_string(), "claimed": claimed.to_string()})
            );
        }
        RewardsCommand::Tree { leaves, dump } => {
            let tree = rewards_tree(&leaves)?;
            if let Some(path) = dump {
                std::fs::write(&path, serde_json::to_vec(&tree.dump())?)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            println!("{}", hex0x(tree.root()));
        }
        RewardsCommand::Proof { address, leaves } => {
            let (text, name) = leaves.read()?;
            let (account, tree, leaf, proof) = leaf_and_proof(&address, &text, &name)?;
            println!(
                "{}",
                serde_json::json!({
                    "account": checksum_address(&account),
                    "amount": leaf.amount.to_string(),
                    "leaf": hex0x(leaf.hash()),
                    "proof": proof.iter().map(hex0x).collect::<Vec<_>>(),
                    "root": hex0x(tree.root()),
                })
            );
        }
    }
    Ok(())
}

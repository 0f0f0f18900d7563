//! Helpers shared by the integration tests: the `ledgerflow` binary, the services started by
//! `scripts/test.sh`, and the outside Kafka client.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

/// The `ledgerflow` binary: cargo's own for the `ledgerflow` package's tests; for other crates
/// (`ledgerflow-polars`) `LEDGERFLOW_BIN`, else the debug build in the cargo target directory.
pub fn bin() -> PathBuf {
    if let Some(b) = option_env!("CARGO_BIN_EXE_ledgerflow") {
        return b.into();
    }
    let bin = std::env::var_os("LEDGERFLOW_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| repo_root().join("target"))
                .join("debug/ledgerflow")
        });
    assert!(
        bin.exists(),
        "{} is missing: build it first (cargo build -p ledgerflow) or set LEDGERFLOW_BIN",
        bin.display()
    );
    bin
}

/// The workspace root (the directory holding `Cargo.lock`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .find(|p| p.join("Cargo.lock").exists())
        .expect("inside the workspace")
        .to_path_buf()
}

/// A service `scripts/test.sh` starts or installs, named by `var`; `None` (skip) when run
/// outside it, a failure when the script asked for services and this one is not there.
fn service(var: &str, what: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(v) if !v.is_empty() => Some(v),
        _ if std::env::var("LEDGERFLOW_REQUIRE_SERVICES").is_ok() => {
            panic!("{var} is not set: run the tests with scripts/test.sh")
        }
        _ => {
            eprintln!("skipped: no {what} (run scripts/test.sh to provide it)");
            None
        }
    }
}

/// The Tansu broker started by `scripts/test.sh`.
pub fn tansu() -> Option<String> {
    service("LEDGERFLOW_TEST_TANSU", "Tansu broker")
}

pub fn python() -> String {
    std::env::var("LEDGERFLOW_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// Runs a command, panicking with its output if it fails.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("spawn");
    if !out.status.success() {
        panic!(
            "{cmd:?} failed with {}\nstdout:\n{}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

pub fn ledgerflow() -> Command {
    let mut c = Command::new(bin());
    c.current_dir(repo_root()).stdin(Stdio::null());
    c
}

/// The outside client (confluent-kafka).
pub fn kafka_client(args: &[&str]) -> Output {
    let script = repo_root().join("tests/support/kafka_client.py");
    run_ok(Command::new(python()).arg(script).args(args))
}

/// Creates `topic` with `partitions` and its dead-letter topic `<topic>.dlq` (one partition)
/// through the outside client.
pub fn create_topic_with_dlq(brokers: &str, topic: &str, partitions: u32) {
    for (name, n) in [(topic.to_string(), partitions), (format!("{topic}.dlq"), 1)] {
        kafka_client(&[
            "create",
            "--brokers",
            brokers,
            "--topic",
            &name,
            "--partitions",
            &n.to_string(),
        ]);
    }
}

/// A topic name no other test uses.
pub fn unique_topic(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{prefix}.{}.{}", std::process::id(), nanos % 1_000_000_000)
}

/// Generates contributions into `path`; returns the number of valid ones.
pub fn gen(path: &Path, count: u64, seed: u64, malformed_rate: f64, content_bytes: usize) {
    run_ok(ledgerflow().args([
        "gen",
        "contributions",
        "--count",
        &count.to_string(),
        "--seed",
        &seed.to_string(),
        "--malformed-rate",
        &malformed_rate.to_string(),
        "--content-bytes",
        &content_bytes.to_string(),
        "--contributors",
        "300",
        "--datanet",
        "legal",
        "--out",
        path.to_str().unwrap(),
    ]));
}

/// Runs SQL through the CLI and returns the rows as JSON objects.
pub fn sql(store: &Path, query: &str) -> Vec<serde_json::Value> {
    sql_at(store.to_str().unwrap(), &[], query)
}

/// [`sql`] against a store URL, with extra environment (e.g. [`s3_env`]).
pub fn sql_at(store: &str, env: &[(&str, String)], query: &str) -> Vec<serde_json::Value> {
    let mut c = ledgerflow();
    c.args(["sql", "--store", store, "--format", "json", query]);
    c.envs(env.iter().map(|(k, v)| (*k, v)));
    let out = run_ok(&mut c);
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "sql output is not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// The first cell of the first row, as an integer.
pub fn first_int(rows: &[serde_json::Value]) -> i64 {
    let row = rows[0].as_object().unwrap();
    row.values().next().unwrap().as_i64().unwrap()
}

/// One integer cell.
pub fn sql_count(store: &Path, query: &str) -> i64 {
    first_int(&sql(store, query))
}

/// `ledgerflow run jobs/ingest.yaml` against `brokers`/`topic`, writing to `store`.
/// The engine tests send short generated texts, so quality minimums are set for short form.
pub fn ingest_command(brokers: &str, topic: &str, store: &Path, group: &str) -> Command {
    let mut c = job_command("jobs/ingest.yaml", brokers, topic, store, group);
    c.env("MIN_WORDS", "5").env("MIN_SENTENCES", "1");
    c
}

/// `ledgerflow run JOB` (one of the ingest jobs) against `brokers`/`topic`, writing to `store`.
pub fn job_command(job: &str, brokers: &str, topic: &str, store: &Path, group: &str) -> Command {
    let mut c = ledgerflow();
    c.args(["run", job, "--progress", "never"])
        .env("KAFKA_BROKERS", brokers)
        .env("CONTRIBUTIONS_TOPIC", topic)
        .env("LEDGERFLOW_STORE", store)
        .env("KAFKA_GROUP", group)
        .env("LEDGERFLOW_LOG", "info");
    c
}

/// The S3-compatible server (moto) started by `scripts/test.sh`, as its endpoint URL.
pub fn s3_endpoint() -> Option<String> {
    service("LEDGERFLOW_TEST_S3", "S3-compatible server")
}

/// The `AWS_*` environment that points a client at `endpoint` (moto accepts any key).
pub fn s3_env(endpoint: &str) -> [(&'static str, String); 4] {
    [
        ("AWS_ENDPOINT_URL", endpoint.to_string()),
        ("AWS_ACCESS_KEY_ID", "ledgerflow-test".into()),
        ("AWS_SECRET_ACCESS_KEY", "ledgerflow-test".into()),
        ("AWS_REGION", "us-east-1".into()),
    ]
}

/// A new, empty bucket on the S3-compatible server (made with the outside client, boto3):
/// `(endpoint, bucket)`; `None` (skip) outside `scripts/test.sh`.
pub fn fresh_bucket(tag: &str) -> Option<(String, String)> {
    let endpoint = s3_endpoint()?;
    // Bucket names: lowercase, digits and dashes.
    let bucket = unique_topic(tag).replace('.', "-");
    let script = format!(
        "import boto3\n\
         s3 = boto3.client('s3', endpoint_url='{endpoint}', aws_access_key_id='t', \
         aws_secret_access_key='t', region_name='us-east-1')\n\
         s3.create_bucket(Bucket='{bucket}')\n"
    );
    run_ok(Command::new(python()).args(["-c", &script]));
    Some((endpoint, bucket))
}

/// `ledgerflow broker` in its own process on a free port with `topic` (`NAME:PARTITIONS`):
/// the process and its bootstrap address.
pub fn spawn_broker(topic: &str) -> (Child, String) {
    let mut broker = ledgerflow()
        .args(["broker", "--port", "0", "--topic", topic])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(broker.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    let bootstrap = first
        .trim()
        .strip_prefix("bootstrap=")
        .expect("the first line names the bootstrap")
        .to_string();
    (broker, bootstrap)
}

/// `ledgerflow produce` of `file` to `topic`.
pub fn produce(brokers: &str, topic: &str, file: &Path) -> Output {
    run_ok(ledgerflow().args([
        "produce",
        "--brokers",
        brokers,
        "--topic",
        topic,
        "--file",
        file.to_str().unwrap(),
    ]))
}

/// `node_modules` with the outside wallet library (ethers) installed by `scripts/test.sh`.
pub fn node_modules() -> Option<String> {
    service("LEDGERFLOW_NODE_MODULES", "ethers from npm")
}

/// The anvil node (`--network optimism`) started by `scripts/test.sh`, as an RPC URL.
pub fn anvil() -> Option<String> {
    service("LEDGERFLOW_TEST_ANVIL", "anvil from npm")
}

/// The node_modules holding forge, cast, anvil, solc and OpenZeppelin's contracts.
pub fn chain_modules() -> Option<String> {
    service("LEDGERFLOW_CHAIN_MODULES", "forge, cast and solc from npm")
}

//! Helpers shared by the integration tests: the `ledgerflow` binary, the services started by
//! `scripts/test.sh`, and the outside Kafka client.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_ledgerflow")
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The Tansu broker started by `scripts/test.sh`; `None` (skip) when run outside it, a failure
/// when the script asked for services and none is there.
pub fn tansu() -> Option<String> {
    match std::env::var("LEDGERFLOW_TEST_TANSU") {
        Ok(b) if !b.is_empty() => Some(b),
        _ if std::env::var("LEDGERFLOW_REQUIRE_SERVICES").is_ok() => {
            panic!("LEDGERFLOW_TEST_TANSU is not set: run the tests with scripts/test.sh")
        }
        _ => {
            eprintln!("skipped: no Tansu broker (run scripts/test.sh to start one)");
            None
        }
    }
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
    let out = run_ok(ledgerflow().args([
        "sql",
        "--store",
        store.to_str().unwrap(),
        "--format",
        "json",
        query,
    ]));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "sql output is not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// One integer cell.
pub fn sql_count(store: &Path, query: &str) -> i64 {
    let rows = sql(store, query);
    let row = rows[0].as_object().unwrap();
    row.values().next().unwrap().as_i64().unwrap()
}

/// `ledgerflow run jobs/ingest.yaml` against `brokers`/`topic`, writing to `store`.
pub fn ingest_command(brokers: &str, topic: &str, store: &Path, group: &str) -> Command {
    let mut c = ledgerflow();
    c.args(["run", "jobs/ingest.yaml", "--progress", "never"])
        .env("KAFKA_BROKERS", brokers)
        .env("CONTRIBUTIONS_TOPIC", topic)
        .env("LEDGERFLOW_STORE", store)
        .env("KAFKA_GROUP", group)
        .env("LEDGERFLOW_LOG", "info");
    c
}

/// The S3-compatible server (moto) started by `scripts/test.sh`, as its endpoint URL; `None`
/// (skip) outside it.
pub fn s3_endpoint() -> Option<String> {
    match std::env::var("LEDGERFLOW_TEST_S3") {
        Ok(e) if !e.is_empty() => Some(e),
        _ if std::env::var("LEDGERFLOW_REQUIRE_SERVICES").is_ok() => {
            panic!("LEDGERFLOW_TEST_S3 is not set: run the tests with scripts/test.sh")
        }
        _ => {
            eprintln!("skipped: no S3-compatible server (run scripts/test.sh to start one)");
            None
        }
    }
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

/// Creates `bucket` on the S3-compatible server with the outside client (boto3).
pub fn create_bucket(endpoint: &str, bucket: &str) {
    let script = format!(
        "import boto3\n\
         s3 = boto3.client('s3', endpoint_url='{endpoint}', aws_access_key_id='t', \
         aws_secret_access_key='t', region_name='us-east-1')\n\
         s3.create_bucket(Bucket='{bucket}')\n"
    );
    run_ok(Command::new(python()).args(["-c", &script]));
}

/// `node_modules` with the outside wallet library (ethers) installed by `scripts/test.sh`;
/// `None` (skip) outside it.
pub fn node_modules() -> Option<String> {
    match std::env::var("LEDGERFLOW_NODE_MODULES") {
        Ok(p) if !p.is_empty() => Some(p),
        _ if std::env::var("LEDGERFLOW_REQUIRE_SERVICES").is_ok() => {
            panic!("LEDGERFLOW_NODE_MODULES is not set: run the tests with scripts/test.sh")
        }
        _ => {
            eprintln!("skipped: no ethers from npm (run scripts/test.sh to install it)");
            None
        }
    }
}

//! A Datanet (and an engine table) as a polars `LazyFrame`, agreeing with the SQL engine row for
//! row, on a local store and on S3 (moto, started by `scripts/test.sh`). The data is written by
//! the `ledgerflow` binary's quick start, so it is built first (`scripts/test.sh` does).

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use ledgerflow_polars as polars_frame;
use ledgerflow_store::Store;
use polars::prelude::*;

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The engine's binary: `LEDGERFLOW_BIN`, else the debug build in the cargo target directory.
fn ledgerflow() -> Command {
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
    let mut c = Command::new(bin);
    c.current_dir(repo_root()).stdin(Stdio::null());
    c
}

fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn python() -> String {
    std::env::var("LEDGERFLOW_PYTHON").unwrap_or_else(|_| "python3".into())
}

fn s3_endpoint() -> Option<String> {
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

fn check(store_url: &str, env: &[(&'static str, String)]) {
    let mut qs = ledgerflow();
    qs.args(["quickstart", "--count", "3000", "--store", store_url]);
    qs.envs(env.iter().map(|(k, v)| (*k, v)));
    run_ok(&mut qs);
    let sql_rows = |q: &str| -> Vec<serde_json::Value> {
        let mut c = ledgerflow();
        c.args(["sql", "--store", store_url, "--format", "json", q]);
        c.envs(env.iter().map(|(k, v)| (*k, v)));
        serde_json::from_slice(&run_ok(&mut c).stdout).unwrap()
    };

    for (k, v) in env {
        std::env::set_var(k, v);
    }
    let store = Store::open(store_url).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let legal = rt.block_on(polars_frame::datanet(&store, "legal")).unwrap();

    let schema = legal.clone().collect_schema().unwrap();
    assert_eq!(schema.get("day"), Some(&DataType::Date), "{schema:?}");
    assert_eq!(schema.get("nonce"), Some(&DataType::UInt64));

    let df = legal
        .clone()
        .group_by([col("contributor")])
        .agg([len().alias("n")])
        .sort(
            ["n", "contributor"],
            SortMultipleOptions::default().with_order_descending_multi([true, false]),
        )
        .limit(5)
        .collect()
        .unwrap();
    let want = sql_rows(
        "SELECT contributor, count(*) AS n FROM legal GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT 5",
    );
    let contributors = df.column("contributor").unwrap().str().unwrap();
    let counts = df.column("n").unwrap().cast(&DataType::Int64).unwrap();
    let counts = counts.i64().unwrap();
    assert_eq!(df.height(), want.len());
    for (i, w) in want.iter().enumerate() {
        assert_eq!(contributors.get(i), w["contributor"].as_str());
        assert_eq!(counts.get(i), w["n"].as_i64());
    }

    let total = legal
        .select([
            len().alias("n"),
            col("content_hash").n_unique().alias("distinct"),
        ])
        .collect()
        .unwrap();
    let n = total.column("n").unwrap().cast(&DataType::Int64).unwrap();
    let distinct = total
        .column("distinct")
        .unwrap()
        .cast(&DataType::Int64)
        .unwrap();
    let want_n = sql_rows("SELECT count(*) AS n FROM legal")[0]["n"].as_i64();
    assert_eq!(n.i64().unwrap().get(0), want_n);
    assert_eq!(distinct.i64().unwrap().get(0), want_n);

    let rejections = rt
        .block_on(polars_frame::engine_table(&store, "rejections"))
        .unwrap()
        .filter(col("reason").eq(lit("malformed")))
        .collect()
        .unwrap();
    let want_rej = sql_rows("SELECT count(*) AS n FROM rejections WHERE reason = 'malformed'")[0]
        ["n"]
        .as_i64()
        .unwrap();
    assert_eq!(rejections.height() as i64, want_rej);
    assert!(want_rej > 0);

    let missing = rt.block_on(polars_frame::datanet(&store, "medical"));
    let err = missing
        .err()
        .expect("an empty Datanet is an error")
        .to_string();
    assert!(err.contains("medical"), "{err}");
}

#[test]
fn datanet_as_lazyframe_local() {
    let dir = tempfile::tempdir().unwrap();
    check(dir.path().join("store").to_str().unwrap(), &[]);
}

#[test]
fn datanet_as_lazyframe_s3() {
    let Some(endpoint) = s3_endpoint() else {
        return;
    };
    let bucket = format!("lf-polars-{}", std::process::id());
    run_ok(Command::new(python()).args([
        "-c",
        &format!(
            "import boto3; boto3.client('s3', endpoint_url='{endpoint}', aws_access_key_id='t', \
             aws_secret_access_key='t', region_name='us-east-1').create_bucket(Bucket='{bucket}')"
        ),
    ]));
    let env = [
        ("AWS_ENDPOINT_URL", endpoint.clone()),
        ("AWS_ACCESS_KEY_ID", "ledgerflow-test".to_string()),
        ("AWS_SECRET_ACCESS_KEY", "ledgerflow-test".to_string()),
        ("AWS_REGION", "us-east-1".to_string()),
    ];
    check(&format!("s3://{bucket}/p"), &env);
}

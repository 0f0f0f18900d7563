//! A Datanet (and an engine table) as a polars `LazyFrame`, agreeing with the SQL engine row for
//! row, on a local store and on S3 (moto, started by `scripts/test.sh`). The data is written by
//! the `ledgerflow` binary's quick start, so it is built first (`scripts/test.sh` does).

#[path = "../../../tests/common/mod.rs"]
mod common;

use common::*;
use ledgerflow_polars as polars_frame;
use ledgerflow_store::Store;
use polars::prelude::*;

fn check(store_url: &str, env: &[(&'static str, String)]) {
    let mut qs = ledgerflow();
    qs.args(["quickstart", "--count", "3000", "--store", store_url]);
    qs.envs(env.iter().map(|(k, v)| (*k, v)));
    run_ok(&mut qs);
    let sql_rows = |q: &str| sql_at(store_url, env, q);

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
    let Some((endpoint, bucket)) = fresh_bucket("lf-polars") else {
        return;
    };
    check(&format!("s3://{bucket}/p"), &s3_env(&endpoint));
}

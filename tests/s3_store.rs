//! The store on an S3-compatible server (moto, started on loopback by `scripts/test.sh`): the
//! object operations the commit protocol relies on (create-if-absent fencing above all), and a
//! whole ingest job writing its Datanet, rejections and checkpoints to `s3://`, read back by SQL.

mod common;

use bytes::Bytes;
use common::*;
use ledgerflow_store::{Store, StoreError};

#[test]
fn object_operations_and_create_if_absent_on_s3() {
    let Some((endpoint, bucket)) = fresh_bucket("lf-ops") else {
        return;
    };
    for (k, v) in s3_env(&endpoint) {
        std::env::set_var(k, v);
    }
    let store = Store::open(&format!("s3://{bucket}/root/")).unwrap();
    assert_eq!(store.url().as_str(), format!("s3://{bucket}/root/"));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        store
            .put_new("a/one.json", Bytes::from_static(b"1"))
            .await
            .unwrap();
        // The fencing every checkpoint depends on: a second writer of the same name loses.
        match store.put_new("a/one.json", Bytes::from_static(b"2")).await {
            Err(StoreError::Conflict { .. }) => {}
            other => panic!("expected a conflict, got {other:?}"),
        }
        assert_eq!(
            store.get("a/one.json").await.unwrap().unwrap(),
            Bytes::from_static(b"1")
        );
        store
            .put("a/two.json", Bytes::from_static(b"22"))
            .await
            .unwrap();
        store.rename("a/two.json", "b/two.json").await.unwrap();
        assert!(!store.exists("a/two.json").await.unwrap());
        let listed = store.list("").await.unwrap();
        assert_eq!(
            listed,
            vec![("a/one.json".to_string(), 1), ("b/two.json".to_string(), 2)]
        );
        store.delete("a/one.json").await.unwrap();
        store.delete("a/one.json").await.unwrap(); // deleting what is gone is fine
        assert_eq!(store.get("a/one.json").await.unwrap(), None);
    });
}

#[test]
fn ingest_job_writes_its_datanet_to_s3() {
    let Some((endpoint, bucket)) = fresh_bucket("lf-ingest") else {
        return;
    };
    let url = format!("s3://{bucket}/prod");
    let env = s3_env(&endpoint);

    let mut qs = ledgerflow();
    qs.args(["quickstart", "--count", "4000", "--store", &url]);
    qs.envs(env.iter().map(|(k, v)| (*k, v)));
    run_ok(&mut qs);

    let n = |q: &str| first_int(&sql_at(&url, &env, q));
    let valid = n("SELECT count(*) FROM legal");
    let rejected = n("SELECT count(*) FROM rejections");
    assert_eq!(valid + rejected, 4000);
    assert!(rejected > 0, "the quick start plants malformed records");
    assert_eq!(n("SELECT count(DISTINCT content_hash) FROM legal"), valid);

    // The layout is the same as on a local disk: Hive-partitioned, committed files only.
    let mut list = ledgerflow();
    list.args(["datanet", "describe", "legal", "--store", &url]);
    list.envs(env.iter().map(|(k, v)| (*k, v)));
    let text = String::from_utf8_lossy(&run_ok(&mut list).stdout).to_string();
    assert!(
        text.contains(&format!("s3://{bucket}/prod/datanets/legal/")),
        "{text}"
    );
    assert!(text.contains(&valid.to_string()), "{text}");

    let store = {
        for (k, v) in &env {
            std::env::set_var(k, v);
        }
        Store::open(&url).unwrap()
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let files = rt.block_on(store.list("")).unwrap();
    assert!(files
        .iter()
        .any(|(p, _)| p.starts_with("datanets/legal/day=") && p.ends_with(".parquet")));
    assert!(files.iter().any(|(p, _)| p.starts_with("_checkpoints/")));
    assert!(
        !files.iter().any(|(p, _)| p.starts_with("_staging/")),
        "staged files are renamed or cleaned up at commit"
    );
}

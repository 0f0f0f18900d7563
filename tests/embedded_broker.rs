//! The user's path of the README on the embedded broker: `broker`, `gen`, `produce`, `validate`,
//! `run --until-idle`, `sql` in three formats, `datanet list/describe`; and the one-command
//! quick start.

mod common;

use common::*;

#[test]
fn broker_gen_produce_run_sql() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("c.jsonl");
    let store = dir.path().join("data");
    gen(&data, 3000, 7, 0.0, 800);

    let (mut broker, bootstrap) = spawn_broker("contributions.legal:4");
    let out = produce(&bootstrap, "contributions.legal", &data);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "produced 3000 records to contributions.legal"
    );

    let out = run_ok(ledgerflow().args(["validate", "jobs/ingest.yaml"]));
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok"));
    run_ok(
        ledgerflow()
            .args([
                "run",
                "jobs/ingest.yaml",
                "--until-idle",
                "2",
                "--progress",
                "never",
            ])
            .env("KAFKA_BROKERS", &bootstrap)
            .env("CONTRIBUTIONS_TOPIC", "contributions.legal")
            .env("LEDGERFLOW_STORE", &store)
            .env("MIN_WORDS", "5")
            .env("MIN_SENTENCES", "1"),
    );
    broker.kill().unwrap();
    broker.wait().unwrap();

    assert_eq!(sql_count(&store, "SELECT count(*) FROM legal"), 3000);
    let top = sql(
        &store,
        "SELECT contributor, count(*) AS n FROM legal GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT 5",
    );
    assert_eq!(top.len(), 5);
    for r in &top {
        let c = r["contributor"].as_str().unwrap();
        assert!(c.starts_with("0x") && c.len() == 42 && c == c.to_lowercase());
    }
    for (format, check) in [("csv", "contributor,n"), ("table", "| contributor")] {
        let out = run_ok(ledgerflow().args([
            "sql",
            "--store",
            store.to_str().unwrap(),
            "--format",
            format,
            "SELECT contributor, count(*) AS n FROM legal GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT 5",
        ]));
        assert!(
            String::from_utf8_lossy(&out.stdout).contains(check),
            "{format}"
        );
    }
    // Read-only: no DDL, no writes.
    let out = ledgerflow()
        .args([
            "sql",
            "--store",
            store.to_str().unwrap(),
            "CREATE TABLE x AS SELECT 1",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let out = ledgerflow()
        .args([
            "sql",
            "--store",
            store.to_str().unwrap(),
            "COPY legal TO '/tmp/x.csv'",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());

    let out = run_ok(ledgerflow().args(["datanet", "list", "--store", store.to_str().unwrap()]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines()
            .any(|l| l.starts_with("legal ") && l.contains("datanet")),
        "{text}"
    );
    let out = run_ok(ledgerflow().args([
        "datanet",
        "describe",
        "legal",
        "--store",
        store.to_str().unwrap(),
    ]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("3000"), "{text}");
    assert!(text.contains("content_hash"), "{text}");
    let out = ledgerflow()
        .args([
            "datanet",
            "describe",
            "nope",
            "--store",
            store.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("legal"));
}

#[test]
fn quickstart_runs_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("qs");
    let out = run_ok(ledgerflow().args([
        "quickstart",
        "--count",
        "3000",
        "--store",
        store.to_str().unwrap(),
    ]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("contributions"), "{text}");
    let valid = sql_count(&store, "SELECT count(*) FROM legal");
    let rejected = sql_count(&store, "SELECT count(*) FROM rejections");
    assert_eq!(valid + rejected, 3000);
    assert!(rejected > 0, "the quick start plants malformed records");
}

/// The per-process memory budget: with many partitions and a long checkpoint interval, the
/// record bytes held across partitions force checkpoints of the largest ones, and the data is
/// still written exactly once.
#[test]
fn memory_budget_checkpoints_the_largest_partitions() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("c.jsonl");
    let store = dir.path().join("data");
    gen(&data, 4000, 21, 0.0, 800);
    let (mut broker, bootstrap) = spawn_broker("contributions.legal:8");
    produce(&bootstrap, "contributions.legal", &data);
    let out = run_ok(
        ledgerflow()
            .args([
                "run",
                "jobs/ingest.yaml",
                "--until-idle",
                "2",
                "--progress",
                "never",
            ])
            .env("KAFKA_BROKERS", &bootstrap)
            .env("CONTRIBUTIONS_TOPIC", "contributions.legal")
            .env("LEDGERFLOW_STORE", &store)
            .env("MIN_WORDS", "5")
            .env("MIN_SENTENCES", "1")
            .env("CHECKPOINT_INTERVAL_SECONDS", "600")
            .env("CHECKPOINT_MAX_TOTAL_BYTES", "250000"),
    );
    broker.kill().unwrap();
    broker.wait().unwrap();
    // ~5.6 MB of records against a 250 kB budget: the 8 partitions cannot wait for the final
    // checkpoint alone.
    let stderr = String::from_utf8_lossy(&out.stderr);
    let done = stderr
        .lines()
        .find(|l| l.starts_with("done:"))
        .expect("summary line");
    let checkpoints: u64 = done
        .split(" checkpoints over partitions")
        .next()
        .and_then(|head| head.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no checkpoint count in {done:?}"));
    assert!(checkpoints > 8, "{done}");
    assert_eq!(sql_count(&store, "SELECT count(*) FROM legal"), 4000);
    assert_eq!(
        sql_count(&store, "SELECT count(DISTINCT content_hash) FROM legal"),
        4000
    );
}

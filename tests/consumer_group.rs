//! Scale-out: two `ledgerflow run` processes of one job (`jobs/ingest_raw.yaml`, which keeps no
//! state across partitions) in one consumer group split the partitions and together write every
//! contribution exactly once. The cleaning job refuses a second process (its state is one per job).

mod common;

use std::time::Duration;

use common::*;

#[test]
fn two_processes_split_partitions_exactly_once() {
    let Some(brokers) = tansu() else { return };
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("c.jsonl");
    let store = dir.path().join("store");
    let total = 60_000i64;
    gen(&data, total as u64, 31, 0.0, 500);
    let topic = unique_topic("group");
    let group = format!("g-{topic}");
    kafka_client(&[
        "create",
        "--brokers",
        &brokers,
        "--topic",
        &topic,
        "--partitions",
        "4",
    ]);

    let spawn = |worker: &str| {
        job_command("jobs/ingest_raw.yaml", &brokers, &topic, &store, &group)
            .args(["--until-idle", "8", "--worker", worker])
            .env("CHECKPOINT_INTERVAL_SECONDS", "0.5")
            .env("KAFKA_SESSION_TIMEOUT_MS", "6000")
            .spawn()
            .unwrap()
    };
    let mut a = spawn("worker-a");
    std::thread::sleep(Duration::from_secs(2));
    let mut b = spawn("worker-b");
    // Let the group settle on two members before data arrives.
    std::thread::sleep(Duration::from_secs(6));
    kafka_client(&[
        "produce",
        "--brokers",
        &brokers,
        "--topic",
        &topic,
        "--file",
        data.to_str().unwrap(),
    ]);
    assert!(a.wait().unwrap().success());
    assert!(b.wait().unwrap().success());

    assert_eq!(sql_count(&store, "SELECT count(*) FROM legal"), total);
    assert_eq!(
        sql_count(&store, "SELECT count(DISTINCT content_hash) FROM legal"),
        total
    );
    assert_eq!(sql_count(&store, "SELECT count(*) FROM rejections"), 0);

    // Both workers committed checkpoints, each for partitions it held.
    let mut workers = std::collections::BTreeMap::<String, std::collections::BTreeSet<i64>>::new();
    for entry in walk(&store.join("_checkpoints")) {
        let rec: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&entry).unwrap()).unwrap();
        if rec["files"].as_array().is_some_and(|f| !f.is_empty()) {
            workers
                .entry(rec["worker"].as_str().unwrap().to_string())
                .or_default()
                .insert(rec["partition"].as_i64().unwrap());
        }
    }
    assert_eq!(workers.len(), 2, "both processes wrote data: {workers:?}");
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else if p.extension().is_some_and(|x| x == "json") {
                out.push(p);
            }
        }
    }
    out
}

//! Exactly-once across crashes: 200,000 contributions, the job killed with SIGKILL at random
//! moments (at least five times) and restarted; at the end every contribution is in the Datanet
//! exactly once and nothing was rejected.

mod common;

use std::time::{Duration, Instant};

use common::*;
use rand::{Rng, SeedableRng};

#[test]
fn kill_9_five_times_loses_and_duplicates_nothing() {
    let Some(brokers) = tansu() else { return };
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("c.jsonl");
    let store = dir.path().join("store");
    let total = 200_000i64;
    gen(&data, total as u64, 23, 0.0, 300);
    let topic = unique_topic("crash");
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
    kafka_client(&[
        "produce",
        "--brokers",
        &brokers,
        "--topic",
        &topic,
        "--file",
        data.to_str().unwrap(),
    ]);

    let mut rng = rand::rngs::StdRng::seed_from_u64(0x1ed6e5);
    let mut kills = 0;
    let started = Instant::now();
    while kills < 6 {
        let mut child = ingest_command(&brokers, &topic, &store, &group)
            .args(["--until-idle", "4"])
            .env("CHECKPOINT_INTERVAL_SECONDS", "0.3")
            .env("KAFKA_SESSION_TIMEOUT_MS", "6000")
            .env("LEDGERFLOW_LOG", "warn")
            .spawn()
            .unwrap();
        let wait = Duration::from_millis(rng.gen_range(1500..6000));
        std::thread::sleep(wait);
        match child.try_wait().unwrap() {
            Some(status) => {
                assert!(status.success(), "the job failed on its own");
                break; // finished before we could kill it: nothing left to do
            }
            None => {
                child.kill().unwrap(); // SIGKILL
                child.wait().unwrap();
                kills += 1;
                let so_far = sql_count(&store, "SELECT count(*) FROM legal");
                eprintln!("kill #{kills} after {wait:?}: {so_far} rows committed");
                assert!(so_far <= total);
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "taking too long"
        );
    }
    assert!(
        kills >= 5,
        "only {kills} kills happened before the job finished"
    );
    // A last, uninterrupted run finishes the topic.
    run_ok(
        ingest_command(&brokers, &topic, &store, &group)
            .args(["--until-idle", "4"])
            .env("KAFKA_SESSION_TIMEOUT_MS", "6000"),
    );
    assert_eq!(sql_count(&store, "SELECT count(*) FROM legal"), total);
    assert_eq!(
        sql_count(&store, "SELECT count(DISTINCT content_hash) FROM legal"),
        total
    );
    assert_eq!(sql_count(&store, "SELECT count(*) FROM rejections"), 0);
    // Offsets are contiguous per partition: nothing skipped, nothing twice.
    let gaps = sql(
        &store,
        "SELECT kafka_partition, count(*) AS n, min(kafka_offset) AS lo, max(kafka_offset) AS hi \
         FROM legal GROUP BY 1 ORDER BY 1",
    );
    for g in gaps {
        assert_eq!(
            g["n"].as_i64().unwrap(),
            g["hi"].as_i64().unwrap() - g["lo"].as_i64().unwrap() + 1,
            "{g}"
        );
    }
}

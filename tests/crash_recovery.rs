//! Exactly-once across crashes: 200,000 contributions, the job killed with SIGKILL at random
//! moments (at least five times) and restarted; at the end every contribution is in the Datanet
//! exactly once and nothing was rejected.
//!
//! The broker is `ledgerflow broker` (librdkafka's mock cluster) in a separate process, with 32
//! partitions because the mock keeps only about 5 MB per partition. Tansu 0.6 does not serve this
//! test: its consumer group never gets over a SIGKILLed member, and a fetch from an offset inside
//! a record batch returns the next batch (the runtime detects and corrects that, see
//! `ResumeCheck`, but the stuck group cannot be worked around).

mod common;

use std::time::{Duration, Instant};

use common::*;
use rand::{Rng, SeedableRng};

#[test]
fn kill_9_five_times_loses_and_duplicates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("c.jsonl");
    let store = dir.path().join("store");
    let total = 200_000i64;
    gen(&data, total as u64, 23, 0.0, 200);
    let topic = "crash".to_string();
    let group = "g-crash".to_string();
    let (mut broker, brokers) = spawn_broker("crash:32");
    produce(&brokers, &topic, &data);

    let mut rng = rand::rngs::StdRng::seed_from_u64(0x1ed6e5);
    let mut kills = 0;
    let started = Instant::now();
    while kills < 6 {
        let mut child = ingest_command(&brokers, &topic, &store, &group)
            .args(["--until-idle", "4", "--log-json"])
            .env("CHECKPOINT_INTERVAL_SECONDS", "0.3")
            .env("KAFKA_SESSION_TIMEOUT_MS", "6000")
            .env("LEDGERFLOW_LOG", "info,rdkafka=off")
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Kill while it works: a random moment after the group handed it partitions.
        let stderr = child.stderr.take().unwrap();
        let (assigned_tx, assigned_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in
                std::io::BufRead::lines(std::io::BufReader::new(stderr)).map_while(Result::ok)
            {
                if line.contains("partition assigned") {
                    let _ = assigned_tx.send(());
                }
            }
        });
        let _ = assigned_rx.recv_timeout(Duration::from_secs(60));
        let wait = Duration::from_millis(rng.gen_range(100..2500));
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
                let so_far = if store.join("datanets/legal").exists() {
                    sql_count(&store, "SELECT count(*) FROM legal")
                } else {
                    0
                };
                eprintln!("kill #{kills} {wait:?} after assignment: {so_far} rows committed");
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
    broker.kill().unwrap();
    broker.wait().unwrap();
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

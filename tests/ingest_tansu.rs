//! Against a real, separate broker (Tansu) with an outside client (confluent-kafka) producing:
//! N contributions in, N rows out; malformed records in `rejections` and on the dead-letter
//! topic with their reason; Prometheus metrics while the job runs.

mod common;

use std::io::{BufRead, BufReader};
use std::process::Stdio;

use common::*;

#[test]
fn n_in_n_out_with_dead_letters_and_metrics() {
    let Some(brokers) = tansu() else { return };
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("c.jsonl");
    let store = dir.path().join("store");
    let total = 20_000u64;
    gen(&data, total, 11, 0.01, 600);
    let lines = std::fs::read_to_string(&data).unwrap();
    let valid = lines
        .lines()
        .filter(|l| {
            ledgerflow_operators::decode::decode_message(l.as_bytes(), &Default::default()).is_ok()
        })
        .count() as i64;
    let malformed = total as i64 - valid;
    assert!(malformed > 100, "planted {malformed} malformed");

    let topic = unique_topic("contributions.legal");
    create_topic_with_dlq(&brokers, &topic, 4);
    let out = kafka_client(&[
        "produce",
        "--brokers",
        &brokers,
        "--topic",
        &topic,
        "--file",
        data.to_str().unwrap(),
    ]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        total.to_string()
    );

    let mut child = ingest_command(&brokers, &topic, &store, &format!("g-{topic}"))
        .args(["--until-idle", "3", "--metrics", "127.0.0.1:0"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The metrics address is printed first; scrape it while the job runs.
    let stderr = child.stderr.take().unwrap();
    let mut reader = BufReader::new(stderr);
    let mut line = String::new();
    let mut metrics_url = None;
    while reader.read_line(&mut line).unwrap() > 0 {
        if let Some(u) = line.trim().strip_prefix("metrics=") {
            metrics_url = Some(u.to_string());
            break;
        }
        line.clear();
    }
    let metrics_url = metrics_url.expect("metrics address printed");
    // Keep reading the job's log (so its stderr never blocks) while scraping.
    let log = std::thread::spawn(move || {
        reader
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<String>>()
    });
    let mut body = String::new();
    for _ in 0..100 {
        body = http_get(&metrics_url);
        if body.contains("ledgerflow_operator_rows_in_total{stage=\"decode\"}") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(
        body.contains("# TYPE ledgerflow_operator_rows_in_total counter"),
        "{body}"
    );
    assert!(body.contains("ledgerflow_consumer_lag_messages"), "{body}");
    let rest = log.join().unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "job failed:\n{}", rest.join("\n"));

    assert_eq!(sql_count(&store, "SELECT count(*) FROM legal"), valid);
    assert_eq!(
        sql_count(&store, "SELECT count(DISTINCT content_hash) FROM legal"),
        valid
    );
    assert_eq!(
        sql_count(&store, "SELECT count(*) FROM rejections"),
        malformed
    );
    let reasons = sql(
        &store,
        "SELECT reason, count(*) AS n FROM rejections GROUP BY 1 ORDER BY 1",
    );
    let names: Vec<&str> = reasons
        .iter()
        .map(|r| r["reason"].as_str().unwrap())
        .collect();
    assert!(
        names.iter().all(|r| ["malformed", "schema"].contains(r)),
        "{names:?}"
    );
    // Every rejection names where it came from.
    assert_eq!(
        sql_count(&store, &format!("SELECT count(*) FROM rejections WHERE kafka_topic = '{topic}' AND kafka_offset >= 0 AND detail <> ''")),
        malformed
    );

    // The dead-letter topic holds the original bytes and the reason in headers.
    let out = kafka_client(&[
        "consume",
        "--brokers",
        &brokers,
        "--topic",
        &format!("{topic}.dlq"),
        "--expect",
        &malformed.to_string(),
    ]);
    let records: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.len() as i64, malformed);
    for r in &records {
        let h = &r["headers"];
        assert!(["malformed", "schema"].contains(&h["ledgerflow.reason"].as_str().unwrap()));
        assert_eq!(h["ledgerflow.source.topic"].as_str().unwrap(), topic);
        assert!(h["ledgerflow.source.offset"]
            .as_str()
            .unwrap()
            .parse::<i64>()
            .is_ok());
        assert!(
            lines.lines().any(|l| l == r["value"].as_str().unwrap()),
            "original bytes kept"
        );
    }

    // DuckDB and pyarrow read the Datanet as it is (Hive-partitioned Parquet).
    let script = format!(
        "import duckdb, pyarrow.dataset as ds\n\
         n = duckdb.connect().execute(\"SELECT count(*) FROM read_parquet('{0}/datanets/legal/*/*.parquet', hive_partitioning=true)\").fetchone()[0]\n\
         m = ds.dataset('{0}/datanets/legal', format='parquet', partitioning='hive').count_rows()\n\
         print(n, m)",
        store.display()
    );
    let out = run_ok(std::process::Command::new(python()).args(["-c", &script]));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("{valid} {valid}")
    );
}

fn http_get(url: &str) -> String {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_once('/').unwrap();
    let mut s = std::net::TcpStream::connect(host).unwrap();
    write!(
        s,
        "GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body
}

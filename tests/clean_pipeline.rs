//! The cleaning pipeline of `jobs/ingest.yaml` (decode → verify → exact → near → quality) on a
//! generated stream with planted cases: exact and near duplicates of known Jaccard, texts that
//! share half their words (must pass), invalid signatures, replays, expired messages, floods from
//! several contributors, junk and malformed messages. Every line must be decided as planted
//! (`ledgerflow gen contributions --planted`), and the decisions must not change when the job is
//! killed with SIGKILL in the middle and restarted.
//!
//! Decisions depend on arrival order (the first arrival wins), so the topics have one partition
//! and Kafka offsets are line numbers. `LEDGERFLOW_PLANTED_COUNT` scales the Tansu run (the
//! benchmark runs it with 1,000,000).

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use rand::{Rng, SeedableRng};

#[derive(Debug, Clone, PartialEq)]
struct Decided {
    reason: String,
    duplicate_of: Option<String>,
}

fn gen_planted(
    dir: &Path,
    count: u64,
    rate: f64,
    content_bytes: usize,
) -> (std::path::PathBuf, BTreeMap<i64, Decided>) {
    let data = dir.join("planted.jsonl");
    let manifest = dir.join("planted.tsv");
    run_ok(ledgerflow().args([
        "gen",
        "contributions",
        "--count",
        &count.to_string(),
        "--seed",
        "42",
        "--contributors",
        "200",
        "--content-bytes",
        &content_bytes.to_string(),
        "--planted",
        &rate.to_string(),
        "--manifest",
        manifest.to_str().unwrap(),
        "--out",
        data.to_str().unwrap(),
    ]));
    let expected = std::fs::read_to_string(&manifest)
        .unwrap()
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            (
                f[0].parse::<i64>().unwrap(),
                Decided {
                    reason: f[1].to_string(),
                    duplicate_of: (f[2] != "-").then(|| f[2].to_string()),
                },
            )
        })
        .collect();
    (data, expected)
}

/// What the job decided, by Kafka offset: `accept` for rows of the Datanet, else the reason.
fn decisions(store: &Path) -> BTreeMap<i64, Vec<Decided>> {
    let mut out: BTreeMap<i64, Vec<Decided>> = BTreeMap::new();
    for r in sql(store, "SELECT kafka_offset FROM legal") {
        out.entry(r["kafka_offset"].as_i64().unwrap())
            .or_default()
            .push(Decided {
                reason: "accept".into(),
                duplicate_of: None,
            });
    }
    for r in sql(
        store,
        "SELECT kafka_offset, reason, duplicate_of FROM rejections",
    ) {
        out.entry(r["kafka_offset"].as_i64().unwrap())
            .or_default()
            .push(Decided {
                reason: r["reason"].as_str().unwrap().to_string(),
                duplicate_of: r["duplicate_of"].as_str().map(str::to_string),
            });
    }
    out
}

/// Every line decided once, as planted; returns the count by reason.
fn check(
    expected: &BTreeMap<i64, Decided>,
    got: &BTreeMap<i64, Vec<Decided>>,
) -> BTreeMap<String, usize> {
    let mut wrong = Vec::new();
    let mut by_reason: BTreeMap<String, usize> = BTreeMap::new();
    for (offset, want) in expected {
        *by_reason.entry(want.reason.clone()).or_default() += 1;
        let reason_ok = |d: &Decided| {
            d.reason == want.reason || (want.reason == "malformed" && d.reason == "schema")
        };
        match got.get(offset).map(Vec::as_slice) {
            Some([d])
                if reason_ok(d)
                    && (want.duplicate_of.is_none() || d.duplicate_of == want.duplicate_of) => {}
            other => wrong.push(format!(
                "offset {offset}: planted {want:?}, decided {other:?}"
            )),
        }
    }
    let extra: Vec<_> = got.keys().filter(|k| !expected.contains_key(k)).collect();
    assert!(
        extra.is_empty(),
        "decisions for offsets never sent: {extra:?}"
    );
    assert!(
        wrong.is_empty(),
        "{} of {} lines decided otherwise than planted, e.g.:\n{}",
        wrong.len(),
        expected.len(),
        wrong
            .iter()
            .take(20)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    by_reason
}

/// The `contributors` view agrees with the tables it summarises, and its reputation is the
/// credibility update c ← 0.85·c + 0.15·outcome over each contributor's decisions in order.
fn check_contributors(store: &Path) {
    assert_eq!(
        sql_count(
            store,
            "SELECT CAST(sum(accepted) AS BIGINT) FROM contributors"
        ),
        sql_count(store, "SELECT count(*) FROM legal")
    );
    assert_eq!(
        sql_count(
            store,
            "SELECT CAST(sum(penalty_points) AS BIGINT) FROM contributors"
        ),
        sql_count(
            store,
            "SELECT CAST(coalesce(sum(points), 0) AS BIGINT) FROM penalties"
        )
    );
    let top = sql(
        store,
        "SELECT address, reputation, rejected_by_reason FROM contributors ORDER BY rejected DESC, address LIMIT 1",
    );
    let address = top[0]["address"].as_str().unwrap().to_string();
    let outcomes = sql(
        store,
        &format!(
            "SELECT outcome FROM (\
               SELECT kafka_timestamp AS ts, kafka_partition AS p, kafka_offset AS o, 1.0 AS outcome FROM legal WHERE contributor = '{address}' \
               UNION ALL SELECT kafka_timestamp, kafka_partition, kafka_offset, 0.0 FROM rejections WHERE contributor = '{address}' \
                 AND reason NOT IN ('malformed', 'schema', 'oversized', 'unknown_datanet', 'bad_signature', 'signer_mismatch')) \
             ORDER BY ts, p, o"
        ),
    );
    let mut c = 0.5f64;
    for o in &outcomes {
        c = 0.85 * c + 0.15 * o["outcome"].as_f64().unwrap();
    }
    let got = top[0]["reputation"].as_f64().unwrap();
    assert!(
        (got - c).abs() < 1e-9,
        "{address}: view says {got}, the update rule {c}"
    );
    assert!(!top[0]["rejected_by_reason"].as_str().unwrap().is_empty());
}

fn check_penalties(store: &Path, by_reason: &BTreeMap<String, usize>) {
    // Each flood copy penalises its sender, and each flooded original its contributor once.
    let floods = by_reason.get("flood").copied().unwrap_or(0) as i64;
    let clusters = sql_count(
        store,
        "SELECT count(DISTINCT duplicate_of) FROM rejections WHERE reason = 'flood'",
    );
    let flood_penalties = sql_count(
        store,
        "SELECT count(*) FROM penalties WHERE reason = 'flood'",
    );
    assert_eq!(flood_penalties, floods + clusters);
    let points = sql_count(
        store,
        "SELECT CAST(sum(points) AS BIGINT) FROM penalties WHERE reason = 'flood'",
    );
    assert_eq!(points, 10 * (floods + clusters));
    // Refusals before the signature holds penalise no one.
    assert_eq!(
        sql_count(
            store,
            "SELECT count(*) FROM penalties WHERE reason IN ('bad_signature', 'signer_mismatch', 'malformed', 'schema')"
        ),
        0
    );
    let dup = by_reason.get("duplicate_exact").copied().unwrap_or(0) as i64;
    assert_eq!(
        sql_count(
            store,
            "SELECT count(*) FROM penalties WHERE reason = 'duplicate_exact'"
        ),
        dup
    );
}

#[test]
fn every_planted_case_is_decided_as_planted() {
    let Some(brokers) = tansu() else { return };
    let count: u64 = std::env::var("LEDGERFLOW_PLANTED_COUNT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let (data, expected) = gen_planted(dir.path(), count, 0.2, 1000);
    let topic = unique_topic("planted");
    create_topic_with_dlq(&brokers, &topic, 1);
    kafka_client(&[
        "produce",
        "--brokers",
        &brokers,
        "--topic",
        &topic,
        "--file",
        data.to_str().unwrap(),
    ]);
    run_ok(
        job_command(
            "jobs/ingest.yaml",
            &brokers,
            &topic,
            &store,
            &format!("g-{topic}"),
        )
        .args(["--until-idle", "3"]),
    );
    let by_reason = check(&expected, &decisions(&store));
    eprintln!("decided as planted: {by_reason:?}");
    for reason in [
        "duplicate_exact",
        "duplicate_near",
        "replay",
        "flood",
        "signer_mismatch",
        "bad_signature",
        "expired",
        "quality:min_words",
        "quality:c4_lorem_ipsum",
    ] {
        assert!(
            by_reason.get(reason).copied().unwrap_or(0) > 0,
            "nothing planted as {reason}"
        );
    }
    check_penalties(&store, &by_reason);
    check_contributors(&store);
    // Near duplicates carry their estimated similarity.
    assert_eq!(
        sql_count(&store, "SELECT count(*) FROM rejections WHERE reason = 'duplicate_near' AND (similarity < 0.8 OR similarity > 1.0 OR similarity IS NULL)"),
        0
    );
}

#[test]
fn kill_9_mid_stream_decides_exactly_as_planted() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    // The embedded broker keeps about 5 MB per partition: 4,000 texts of ~700 bytes.
    let (data, expected) = gen_planted(dir.path(), 4000, 0.3, 700);
    let (mut broker, brokers) = spawn_broker("planted:1");
    produce(&brokers, "planted", &data);
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
    let mut kills = 0;
    let started = Instant::now();
    for round in 0.. {
        let group = format!("g-planted-{round}");
        let mut child = job_command("jobs/ingest.yaml", &brokers, "planted", &store, &group)
            .args(["--until-idle", "3"])
            .env("CHECKPOINT_INTERVAL_SECONDS", "0.2")
            .env("CHECKPOINT_MAX_ROWS", "300")
            .env("LEDGERFLOW_LOG", "warn")
            .spawn()
            .unwrap();
        if kills < 3 {
            std::thread::sleep(Duration::from_millis(rng.gen_range(800..2500)));
            if child.try_wait().unwrap().is_none() {
                child.kill().unwrap();
                child.wait().unwrap();
                kills += 1;
                continue;
            }
        }
        let status = child.wait().unwrap();
        assert!(status.success(), "the job failed");
        break;
    }
    assert!(started.elapsed() < Duration::from_secs(600));
    eprintln!("killed {kills} times");
    let by_reason = check(&expected, &decisions(&store));
    check_penalties(&store, &by_reason);
    broker.kill().unwrap();
    broker.wait().unwrap();
}

//! Token indexes against infini-gram itself (the `infini-gram` wheel from PyPI, offline):
//! on the same generated `tokenized.s` files, `ledgerflow index build --from-tokenized` writes
//! `table.s` byte-identical to infini-gram's indexer (`python -m infini_gram.indexing`, which
//! splits each shard into parts and merges them), and every query of our engine returns what
//! infini-gram's engine returns: count, find, prob, next-token distributions (exact and
//! approximate), ∞-gram probability and distribution, documents by rank, and maximal-span
//! attribution.

mod common;

use std::fs;
use std::path::Path;
use std::process::Command;

use common::*;
use ledgerflow::tokens::{run_query, Query};
use ledgerflow_index::{AttributeParams, Index, ShardWriter};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};

const EOS: u16 = 2;

/// `None` (skip) without a Python that has infini-gram; a failure under `scripts/test.sh`.
fn reference_python() -> Option<String> {
    let py = python();
    let ok = Command::new(&py)
        .args(["-c", "import infini_gram.engine, infini_gram.indexing"])
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        return Some(py);
    }
    if std::env::var("LEDGERFLOW_REQUIRE_SERVICES").is_ok() {
        panic!("{py} cannot import infini_gram: run the tests with scripts/test.sh");
    }
    eprintln!("skipped: no Python with infini-gram (run scripts/test.sh to provide it)");
    None
}

/// A token from a skewed vocabulary spread over both bytes (ids below 300 and above 65,000),
/// so that ordering by stored bytes and ordering by token value disagree.
fn token(rng: &mut ChaCha8Rng) -> u16 {
    let u: f64 = rng.gen();
    let i = (600.0 * u * u * u) as u16;
    if i < 300 {
        i
    } else {
        65_000 + (i - 300)
    }
}

/// Writes three shards of generated documents (one above infini-gram's 100,000-byte part
/// overlap, so its indexer really merges parts); some documents repeat spans of earlier ones.
fn generate(dir: &Path) -> Vec<Vec<u16>> {
    let mut rng = ChaCha8Rng::seed_from_u64(42);
    let mut all: Vec<Vec<u16>> = Vec::new();
    for (s, docs) in [(0usize, 1500usize), (1, 300), (2, 40)] {
        let mut w = ShardWriter::new(dir, s, "generated");
        for _ in 0..docs {
            let len = rng.gen_range(1..300);
            let mut doc: Vec<u16> = (0..len).map(|_| token(&mut rng)).collect();
            if !all.is_empty() && rng.gen_bool(0.3) {
                let src = &all[rng.gen_range(0..all.len())];
                let a = rng.gen_range(0..src.len());
                let b = (a + rng.gen_range(1..80)).min(src.len());
                let at = rng.gen_range(0..=doc.len());
                doc.splice(at..at, src[a..b].iter().copied());
            }
            let i = all.len();
            w.add_document(
                &doc,
                &json!({"content_hash": format!("0x{i:064x}"), "contributor": format!("0x{:040x}", i % 17)}),
            )
            .unwrap();
            all.push(doc);
        }
        w.finish(1).unwrap();
        fs::remove_file(dir.join(format!("table.{s}"))).unwrap();
    }
    all
}

/// A query as the reference script takes it, and the same query for our engine.
fn queries(docs: &[Vec<u16>], index: &Index) -> Vec<(Value, Vec<u16>, Query)> {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let mut out = Vec::new();
    let span = |rng: &mut ChaCha8Rng, max: usize| {
        let d = &docs[rng.gen_range(0..docs.len())];
        let a = rng.gen_range(0..d.len());
        let b = (a + rng.gen_range(1..=max)).min(d.len());
        d[a..b].to_vec()
    };
    for i in 0..300 {
        let ids = if i % 5 == 0 {
            (0..rng.gen_range(1..4)).map(|_| token(&mut rng)).collect()
        } else {
            span(&mut rng, 12)
        };
        out.push((
            json!({"kind": "count", "ids": ids}),
            ids.clone(),
            Query::Count,
        ));
        out.push((json!({"kind": "find", "ids": ids}), ids, Query::Find));
    }
    out.push((json!({"kind": "count", "ids": []}), vec![], Query::Count));
    for _ in 0..150 {
        let ids = span(&mut rng, 6);
        let cont = if rng.gen_bool(0.5) {
            token(&mut rng)
        } else {
            EOS
        };
        out.push((
            json!({"kind": "prob", "ids": ids, "cont": cont}),
            ids.clone(),
            Query::Prob { cont },
        ));
        let mut long = (0..rng.gen_range(0..4))
            .map(|_| token(&mut rng))
            .collect::<Vec<_>>();
        long.extend(&ids);
        out.push((
            json!({"kind": "infgram_prob", "ids": long, "cont": cont}),
            long,
            Query::InfgramProb { cont },
        ));
    }
    for i in 0..120 {
        let ids = if i % 4 == 0 {
            vec![]
        } else {
            span(&mut rng, 3)
        };
        let max_support = [3u64, 10, 1000][i % 3];
        out.push((
            json!({"kind": "ntd", "ids": ids, "max_support": max_support}),
            ids.clone(),
            Query::Ntd { max_support },
        ));
        let mut long = vec![token(&mut rng)];
        long.extend(&ids);
        out.push((
            json!({"kind": "infgram_ntd", "ids": long, "max_support": max_support}),
            long,
            Query::InfgramNtd { max_support },
        ));
    }
    for i in 0..100 {
        let s = i % index.shards().len();
        let rank = rng.gen_range(0..index.shards()[s].tok_cnt());
        let max_disp_len = [1u64, 7, 50, 1000][i % 4];
        out.push((
            json!({"kind": "doc", "s": s, "rank": rank, "max_disp_len": max_disp_len}),
            vec![],
            Query::Doc {
                shard: s,
                rank,
                max_disp_len,
            },
        ));
    }
    for i in 0..12 {
        // A model "output": spans of several documents with invented tokens between them.
        let mut ids = Vec::new();
        for _ in 0..rng.gen_range(1..5) {
            ids.extend(span(&mut rng, 40));
            ids.extend((0..rng.gen_range(0..3)).map(|_| token(&mut rng)));
        }
        let (min_len, max_cnt, delim) = match i % 3 {
            0 => (1usize, 1000u64, vec![]),
            1 => (4, 10, vec![]),
            _ => (2, 100, vec![0u16, 1]),
        };
        out.push((
            json!({"kind": "attribute", "ids": ids, "min_len": min_len, "max_cnt": max_cnt, "delim": delim}),
            ids,
            Query::Attribute(AttributeParams { delim_ids: delim, min_len, max_cnt, bow_ids: None }),
        ));
    }
    out
}

/// Equal JSON, numbers compared as f64 within 1e-9 (relative).
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
            x == y || (x - y).abs() <= 1e-9 * x.abs().max(y.abs())
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same(a, b))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w)))
        }
        _ => a == b,
    }
}

#[test]
fn index_and_queries_match_infini_gram() {
    let Some(py) = reference_python() else { return };
    let work = tempfile::tempdir().unwrap();
    let tokenized = work.path().join("tokenized");
    let ours = work.path().join("ours");
    let reference = work.path().join("reference");
    let empty = work.path().join("raw");
    fs::create_dir_all(&tokenized).unwrap();
    fs::create_dir_all(&empty).unwrap();
    let docs = generate(&tokenized);

    // infini-gram's indexer on a copy of the tokenized files (it finds them and skips its own
    // tokenizing step, then runs rust_indexing make-part / merge / concat).
    fs::create_dir_all(&reference).unwrap();
    for entry in fs::read_dir(&tokenized).unwrap() {
        let entry = entry.unwrap();
        fs::copy(entry.path(), reference.join(entry.file_name())).unwrap();
    }
    // It raises its open-file limit to --ulimit (default 1,048,576): ask for what is allowed.
    // The large shard is indexed as infini-gram indexes big shards, in two parts (--cpus 2)
    // merged with its 100,000-byte overlap; the small ones in one part (--cpus 1), because with
    // parts shorter than that overlap its merge underflows (`len - hacksize` on a usize) and
    // writes some suffixes twice. Shards that already have a table are skipped by its indexer.
    let index_with = |cpus: &str| {
        run_ok(
            Command::new("sh")
                .arg("-c")
                .arg(r#"exec "$0" -m infini_gram.indexing --data_dir "$1" --save_dir "$2" --mem 1 --cpus "$3" --shards 3 --token_dtype u16 --ulimit "$(ulimit -Hn)""#)
                .arg(&py)
                .arg(&empty)
                .arg(&reference)
                .arg(cpus),
        )
    };
    for s in [1, 2] {
        fs::write(reference.join(format!("table.{s}")), b"placeholder").unwrap();
    }
    index_with("2");
    for s in [1, 2] {
        fs::remove_file(reference.join(format!("table.{s}"))).unwrap();
    }
    index_with("1");
    assert!(
        fs::metadata(tokenized.join("tokenized.0")).unwrap().len() > 200_000,
        "shard 0 must be large enough for infini-gram to merge parts"
    );

    let out = run_ok(
        ledgerflow()
            .args(["index", "build", "--from-tokenized"])
            .arg(&tokenized)
            .arg("--out")
            .arg(&ours),
    );
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["shards"].as_array().unwrap().len(), 3, "{summary}");

    for s in 0..3 {
        let a = fs::read(ours.join(format!("table.{s}"))).unwrap();
        let b = fs::read(reference.join(format!("table.{s}"))).unwrap();
        assert_eq!(a.len(), b.len(), "table.{s} sizes");
        if let Some(i) = a.iter().zip(&b).position(|(x, y)| x != y) {
            panic!("table.{s} differs from infini-gram's first at byte {i}");
        }
    }

    let index = Index::open(&ours, EOS).unwrap();
    let qs = queries(&docs, &index);
    let qfile = work.path().join("queries.json");
    fs::write(
        &qfile,
        serde_json::to_vec(&qs.iter().map(|q| &q.0).collect::<Vec<_>>()).unwrap(),
    )
    .unwrap();
    let out = run_ok(
        Command::new(&py)
            .arg(repo_root().join("tests/support/infini_gram_ref.py"))
            .arg(&reference)
            .arg(&qfile)
            .arg(EOS.to_string()),
    );
    let expected: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(expected.len(), qs.len());
    let mut kinds = std::collections::BTreeMap::<String, usize>::new();
    for ((q, ids, query), want) in qs.iter().zip(&expected) {
        let mut got = run_query(&index, ids, query).unwrap();
        if let Query::Attribute(_) = query {
            // Our extra field; the spans are what infini-gram returns.
            got.as_object_mut().unwrap().remove("contributions");
        }
        assert!(
            same(&got, want),
            "query {q}\nours:     {got}\ninfini-gram: {want}"
        );
        *kinds
            .entry(q["kind"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    eprintln!("matched infini-gram on {kinds:?}");
    let approx = expected
        .iter()
        .filter(|r| r["approx"] == json!(true))
        .count();
    assert!(
        approx > 0,
        "no approximate next-token distribution was exercised"
    );
    let spans: usize = expected
        .iter()
        .filter_map(|r| r["spans"].as_array())
        .map(Vec::len)
        .sum();
    assert!(spans > 10, "attribution found only {spans} spans");

    // The CLI prints the same JSON as the library.
    let probe = &docs[10][..docs[10].len().min(4)];
    let list = probe
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let out = run_ok(
        ledgerflow()
            .args(["index", "query", "--index"])
            .arg(&ours)
            .args(["--eos", "2", "count", "--tokens", &list]),
    );
    let cli: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(cli, serde_json::to_value(index.count(probe)).unwrap());
    assert!(cli["count"].as_u64().unwrap() >= 1);
}

fn sql_json(store: &Path, query: &str) -> Vec<Value> {
    let out = run_ok(
        ledgerflow()
            .args(["sql", query, "--format", "json", "--store"])
            .arg(store),
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn build_datanet(store: &Path, extra: &[&str]) -> Value {
    let out = run_ok(
        ledgerflow()
            .args([
                "index",
                "build",
                "--datanet",
                "legal",
                "--vocab-size",
                "2000",
            ])
            .args(extra)
            .arg("--store")
            .arg(store),
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `ledgerflow attribute` of `text` in the Datanet `legal`, recorded as output `output_id`.
fn attribute_recorded(store: &Path, text: &str, output_id: &str) -> Value {
    let out = run_ok(
        ledgerflow()
            .args([
                "attribute",
                "--datanet",
                "legal",
                "--output-id",
                output_id,
                "--text",
            ])
            .arg(text)
            .arg("--store")
            .arg(store),
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A store holding the quickstart's Datanet `legal` (300 contributions), in a temporary folder
/// that lives as long as the returned guard.
fn quickstart_store() -> (tempfile::TempDir, std::path::PathBuf) {
    let work = tempfile::tempdir().unwrap();
    let store = work.path().join("store");
    run_ok(
        ledgerflow()
            .args(["quickstart", "--count", "300", "--store"])
            .arg(&store),
    );
    (work, store)
}

/// A Datanet indexed with its own tokenizer: every accepted contribution becomes a document
/// with its content hash and contributor, a contribution's own text attributes to it first,
/// and data committed later becomes a new shard without touching the old ones.
#[test]
fn datanet_index_attributes_texts_to_their_contributions() {
    let (_work, store) = quickstart_store();
    let rows = sql_json(&store, "SELECT count(*) AS n FROM legal")[0]["n"]
        .as_u64()
        .unwrap();
    let first = build_datanet(&store, &[]);
    assert_eq!(first["tokenizer_trained"], json!(true), "{first}");
    assert_eq!(first["new_documents"].as_u64().unwrap(), rows, "{first}");
    assert_eq!(first["shards"], json!(1), "{first}");
    assert_eq!(first["substring_duplicates"], json!([]), "{first}");
    let index_dir = store.join("indexes/legal");
    let table = fs::read(index_dir.join("gen-1/table.0")).unwrap();

    let picked = &sql_json(
        &store,
        "SELECT content_hash, contributor, content FROM legal ORDER BY content_hash LIMIT 1",
    )[0];
    let text = picked["content"].as_str().unwrap();
    let result = attribute_recorded(&store, text, "output-1");
    let top = &result["contributions"][0];
    assert_eq!(top["content_hash"], picked["content_hash"], "{result}");
    assert_eq!(top["contributor"], picked["contributor"], "{result}");
    let total: f64 = result["contributions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["score"].as_f64().unwrap())
        .sum();
    assert!((total - 1.0).abs() < 1e-9, "scores sum to {total}");
    let longest = result["spans"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["length"].as_u64().unwrap())
        .max()
        .unwrap();
    assert_eq!(
        longest,
        result["tokens"].as_u64().unwrap(),
        "the whole text is one span: {result}"
    );
    // The credits, recorded as `attributions` rows of the output.
    let recorded = &sql_json(
        &store,
        "SELECT count(*) AS n, sum(score) AS total, min(method) AS method, max(content_hash) FILTER (WHERE score = (SELECT max(score) FROM attributions)) AS top FROM attributions WHERE output_id = 'output-1'",
    )[0];
    assert_eq!(
        recorded["n"].as_u64().unwrap() as usize,
        result["contributions"].as_array().unwrap().len()
    );
    assert!((recorded["total"].as_f64().unwrap() - 1.0).abs() < 1e-9);
    assert_eq!(recorded["method"], json!("span"));
    assert_eq!(recorded["top"], picked["content_hash"]);
    // Recording the same output again replaces its rows.
    attribute_recorded(&store, text, "output-1");
    assert_eq!(
        sql_json(&store, "SELECT count(*) AS n FROM attributions")[0]["n"],
        recorded["n"]
    );

    // The content-hash map finds the contribution's document.
    let out = run_ok(
        ledgerflow()
            .args(["index", "doc", "--datanet", "legal", "--content-hash"])
            .arg(picked["content_hash"].as_str().unwrap())
            .arg("--store")
            .arg(&store),
    );
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["text"], picked["content"], "{doc}");
    assert_eq!(
        doc["metadata"]["contributor"], picked["contributor"],
        "{doc}"
    );

    // Nothing new: nothing changes.
    let again = build_datanet(&store, &[]);
    assert_eq!(
        (
            again["new_files"].clone(),
            again["shards"].clone(),
            again["generation"].clone()
        ),
        (json!(0), json!(1), json!(1)),
        "{again}"
    );

    // A newly committed file (here a copy of one) becomes shard 1 of the next generation;
    // shard 0 is left as it was, and every copied document of 50 tokens or more repeats an
    // earlier one: a `duplicate_substring` penalty.
    let day_file = fs::read_dir(store.join("datanets/legal"))
        .unwrap()
        .flat_map(|d| fs::read_dir(d.unwrap().path()).unwrap())
        .map(|f| f.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "parquet"))
        .unwrap();
    let copy = |name: &str| fs::copy(&day_file, day_file.with_file_name(name)).unwrap();
    copy("zz-later-commit.parquet");
    let later = build_datanet(&store, &[]);
    assert_eq!(later["new_files"], json!(1), "{later}");
    assert_eq!(later["tokenizer_trained"], json!(false), "{later}");
    assert_eq!(later["shards"], json!(2), "{later}");
    assert_eq!(later["generation"], json!(2), "{later}");
    assert!(
        !index_dir.join("gen-1").exists(),
        "the old generation is removed"
    );
    assert!(!fs::read(index_dir.join("gen-2/table.1"))
        .unwrap()
        .is_empty());
    assert_eq!(
        fs::read(index_dir.join("gen-2/table.0")).unwrap(),
        table,
        "shard 0 was rebuilt"
    );
    let index = ledgerflow::tokens::open(&index_dir, 0).unwrap();
    assert_eq!(index.shards().len(), 2);
    let copied = later["new_documents"].as_u64().unwrap();
    let long_enough = (0..copied)
        .filter(|&d| {
            index
                .doc_by_ix(index.shards()[0].doc_cnt() + d, 0)
                .unwrap()
                .doc_len
                >= 50
        })
        .count();
    assert!(long_enough > 0);
    let dups = later["substring_duplicates"].as_array().unwrap();
    assert_eq!(dups.len(), long_enough, "{later}");
    for d in dups {
        // A copy repeats its original whole.
        assert_eq!(d["content_hash"], d["duplicate_of"], "{d}");
        assert_eq!(d["offset"], json!(0), "{d}");
    }
    let charged = &sql_json(
        &store,
        "SELECT count(*) AS n, sum(points) AS points FROM penalties WHERE reason = 'duplicate_substring'",
    )[0];
    assert_eq!(charged["n"].as_u64().unwrap() as usize, long_enough);
    assert_eq!(charged["points"].as_u64().unwrap() as usize, long_enough);
    assert_eq!(
        sql_json(&store, "SELECT count(*) AS n FROM substring_duplicates")[0]["n"]
            .as_u64()
            .unwrap() as usize,
        long_enough
    );
    let probe: Vec<u16> = index
        .doc_by_ix(index.shards()[0].doc_cnt(), 8)
        .unwrap()
        .token_ids;
    let found = index.find(&probe);
    let (a, b) = found.segment_by_shard[1];
    let (before, in_copy) = (found.cnt, b - a);
    assert!(in_copy >= 1);
    drop(index);

    // A third small shard: with --merge-factor 3 the three become one, and queries see the
    // same documents.
    copy("zzz-third-commit.parquet");
    let merged = build_datanet(&store, &["--merge-factor", "3"]);
    assert_eq!(merged["merged"], json!([[0, 1, 2]]), "{merged}");
    assert_eq!(merged["shards"], json!(1), "{merged}");
    let index = ledgerflow::tokens::open(&index_dir, 0).unwrap();
    assert_eq!(index.shards().len(), 1);
    assert_eq!(index.total_docs(), rows + 2 * copied);
    assert_eq!(index.count(&probe).count, before + in_copy);
}

/// The index job end to end: Datanet → tokenizer → index (`ledgerflow run jobs/index.yaml`),
/// then a text quoting three known contributions attributes to their three contributors first,
/// and the credits land in `attributions`.
#[test]
fn index_job_attributes_a_quoting_text_to_its_three_contributors() {
    let (_work, store) = quickstart_store();
    let job = repo_root().join("jobs/index.yaml");
    let run = |store: &Path| -> Value {
        let out = run_ok(ledgerflow().arg("run").arg(&job).arg("--store").arg(store));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let first = run(&store);
    assert_eq!(first["tokenizer_trained"], json!(true), "{first}");
    assert_eq!(first["generation"], json!(1), "{first}");
    let rows = sql_json(&store, "SELECT count(*) AS n FROM legal")[0]["n"]
        .as_u64()
        .unwrap();
    assert_eq!(first["new_documents"].as_u64().unwrap(), rows);
    // The token column: one row per indexed contribution, by one tokenizer, holding exactly the
    // tokens of the index (each document there is its tokens after one separator).
    let tokens_table = || {
        sql_json(
            &store,
            "SELECT count(*) AS n, count(DISTINCT content_hash) AS hashes, \
             count(DISTINCT tokenizer) AS tokenizers, sum(token_count) AS tokens, \
             sum(CASE WHEN array_length(tokens) = token_count THEN 0 ELSE 1 END) AS bad FROM tokens",
        )[0]
        .clone()
    };
    let manifest: Value = serde_json::from_slice(
        &std::fs::read(store.join("indexes/legal/ledgerflow.json")).unwrap(),
    )
    .unwrap();
    let indexed: u64 = manifest["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["tokens"].as_u64().unwrap())
        .sum();
    let t = tokens_table();
    assert_eq!(
        (
            t["n"].as_u64(),
            t["hashes"].as_u64(),
            t["tokenizers"].as_u64(),
            t["bad"].as_u64()
        ),
        (Some(rows), Some(rows), Some(1), Some(0)),
        "{t}"
    );
    assert_eq!(t["tokens"].as_u64().unwrap() + rows, indexed, "{t}");
    // Nothing committed since: the next run changes nothing.
    let again = run(&store);
    assert_eq!(
        (again["new_files"].clone(), again["generation"].clone()),
        (json!(0), json!(1))
    );
    assert_eq!(tokens_table(), t);

    // Three contributions by three contributors, each quoted for 25 words.
    let all = sql_json(
        &store,
        "SELECT content_hash, contributor, content FROM legal ORDER BY content_hash",
    );
    let mut picked: Vec<&Value> = Vec::new();
    for row in &all {
        if picked.len() < 3
            && picked
                .iter()
                .all(|p| p["contributor"] != row["contributor"])
        {
            picked.push(row);
        }
    }
    let quote = |row: &Value| -> String {
        let words: Vec<&str> = row["content"]
            .as_str()
            .unwrap()
            .split_whitespace()
            .collect();
        let from = words.len() / 4;
        words[from..(from + 25).min(words.len())].join(" ")
    };
    let text = format!(
        "As the record shows, {} Moreover, {} Finally, {}",
        quote(picked[0]),
        quote(picked[1]),
        quote(picked[2])
    );
    let result = attribute_recorded(&store, &text, "answer-3");
    let top = sql_json(
        &store,
        "SELECT contributor, sum(score) AS score FROM attributions WHERE output_id = 'answer-3' \
         GROUP BY contributor ORDER BY score DESC, contributor LIMIT 3",
    );
    let mut got: Vec<&str> = top
        .iter()
        .map(|r| r["contributor"].as_str().unwrap())
        .collect();
    let mut want: Vec<&str> = picked
        .iter()
        .map(|r| r["contributor"].as_str().unwrap())
        .collect();
    got.sort_unstable();
    want.sort_unstable();
    assert_eq!(got, want, "{result}");
    let share: f64 = top.iter().map(|r| r["score"].as_f64().unwrap()).sum();
    assert!(
        share > 0.5,
        "the three quoted contributors hold {share} of the credit: {result}"
    );
}

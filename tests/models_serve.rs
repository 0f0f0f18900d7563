//! Models end to end: quick-start contributions → Datanet `legal` → index → a base model trained
//! from scratch → two LoRA adapters → `ledgerflow serve`: completions and chat (plain and
//! streamed) for each adapter with attribution, rows in `inferences` and `attributions`,
//! adapters hot-swapped under a running stream, and 1,000 adapters under Zipf traffic with a
//! memory budget that forces evictions.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::{ledgerflow, run_ok, sql};
use serde_json::{json, Value};

/// One HTTP/1.1 request (`Connection: close`): status and body.
fn http(
    addr: &str,
    method: &str,
    path: &str,
    body: Option<&Value>,
    token: Option<&str>,
) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let raw = String::from_utf8(raw).unwrap();
    let (head, rest) = raw.split_once("\r\n\r\n").unwrap();
    let status: u16 = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(rest)
    } else {
        rest.to_string()
    };
    (status, body)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    loop {
        let (len, rest) = s.split_once("\r\n").unwrap();
        let n = usize::from_str_radix(len.trim(), 16).unwrap();
        if n == 0 {
            return out;
        }
        out.push_str(&rest[..n]);
        s = &rest[n + 2..];
    }
}

fn post(addr: &str, path: &str, body: Value) -> Value {
    let (status, text) = http(addr, "POST", path, Some(&body), None);
    assert_eq!(status, 200, "{path} {body}: {text}");
    serde_json::from_str(&text).unwrap()
}

/// The `data:` payloads of a server-sent event stream.
fn events(body: &str) -> Vec<String> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
        .map(str::to_string)
        .collect()
}

struct Serving {
    child: Child,
    addr: String,
}

impl Drop for Serving {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(store: &Path, extra: &[&str]) -> Serving {
    let mut child = ledgerflow()
        .args(["serve", "--port", "0", "--store"])
        .arg(store)
        .args(extra)
        .env("LEDGERFLOW_API_KEY", "test-admin-token")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .strip_prefix("listening on http://")
        .unwrap_or_else(|| panic!("serve said: {line:?}"))
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    Serving { child, addr }
}

fn train(store: &Path, args: &[&str], config: &Path) -> (String, Value) {
    let out = run_ok(
        ledgerflow()
            .arg("train")
            .args(args)
            .arg("--config")
            .arg(config)
            .arg("--store")
            .arg(store),
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let report: Value = serde_json::from_str(lines[lines.len() - 2]).unwrap();
    (lines[lines.len() - 1].to_string(), report)
}

#[test]
fn train_base_and_adapters_then_serve_them_with_attribution() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    run_ok(
        ledgerflow()
            .args(["quickstart", "--count", "300", "--store"])
            .arg(&store),
    );
    run_ok(
        ledgerflow()
            .args([
                "index",
                "build",
                "--datanet",
                "legal",
                "--vocab-size",
                "1000",
                "--store",
            ])
            .arg(&store),
    );
    let config = dir.path().join("model.yaml");
    std::fs::write(
        &config,
        "model: {d_model: 64, n_layers: 2, n_heads: 4, d_ff: 172, max_seq_len: 128}\n\
         train: {steps: 60, batch_size: 8, seq_len: 64, learning_rate: 0.005, warmup_steps: 5, eval_windows: 32, checkpoints: 2}\n\
         lora: {rank: 8, alpha: 16}\n",
    )
    .unwrap();
    let (base, report) = train(&store, &["--datanet", "legal"], &config);
    assert!(base.starts_with("legal-base-"), "{base}");
    let r = &report["report"];
    assert!(
        r["val_perplexity"].as_f64().unwrap() < r["unigram_perplexity"].as_f64().unwrap(),
        "{r}"
    );
    let (a1, r1) = train(
        &store,
        &["--datanet", "legal", "--adapter-of", &base, "--steps", "20"],
        &config,
    );
    let adapter2 = dir.path().join("adapter2.yaml");
    std::fs::write(
        &adapter2,
        "model: {d_model: 64, n_layers: 2, n_heads: 4, d_ff: 172, max_seq_len: 128}\n\
         train: {steps: 20, batch_size: 8, seq_len: 64, learning_rate: 0.01, warmup_steps: 2, seed: 11, eval_windows: 32}\n\
         lora: {rank: 4, alpha: 8, targets: [q_proj, v_proj]}\n",
    )
    .unwrap();
    let (a2, _) = train(
        &store,
        &["--datanet", "legal", "--adapter-of", &base],
        &adapter2,
    );
    assert!(a1.starts_with("legal-lora-") && a2.starts_with("legal-lora-") && a1 != a2);
    // The adapter continued training on the Datanet: not worse than its base there.
    let r1 = &r1["report"];
    assert!(
        r1["val_perplexity"].as_f64().unwrap() <= r1["base_perplexity"].as_f64().unwrap() * 1.001,
        "{r1}"
    );

    // The registry and the artifacts.
    let rows = sql(
        &store,
        "SELECT id, kind, parent, content_hash FROM models ORDER BY kind, id",
    );
    assert_eq!(rows.len(), 3, "{rows:?}");
    let adapters: Vec<&Value> = rows.iter().filter(|r| r["kind"] == "adapter").collect();
    assert!(adapters.iter().all(|r| r["parent"] == base.as_str()));
    let gen1 = rows.iter().find(|r| r["id"] == a1.as_str()).unwrap()["content_hash"]
        .as_str()
        .unwrap()
        .to_string();
    let peft: Value = serde_json::from_slice(
        &std::fs::read(store.join(format!("models/{a2}/adapter_config.json"))).unwrap(),
    )
    .unwrap();
    assert_eq!(peft["peft_type"], "LORA");
    assert_eq!(peft["r"], 4);
    assert_eq!(peft["target_modules"], json!(["q_proj", "v_proj"]));
    assert_eq!(peft["base_model_name_or_path"], base.as_str());
    let st = std::fs::read(store.join(format!("models/{a2}/adapter_model.safetensors"))).unwrap();
    let header_len = u64::from_le_bytes(st[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&st[8..8 + header_len]).unwrap();
    let names: Vec<&String> = header
        .as_object()
        .unwrap()
        .keys()
        .filter(|k| *k != "__metadata__")
        .collect();
    assert_eq!(names.len(), 2 * 2 * 2, "{names:?}");
    assert!(header
        .get("base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight")
        .is_some());
    // Gradient attribution of a1 (two checkpoints): a training contribution's own text puts it
    // first, under TracIn, cosine and DataInf; recorded with method `gradient`.
    let index: Value = serde_json::from_slice(
        &run_ok(
            ledgerflow()
                .args([
                    "attribution",
                    "index",
                    "--adapter",
                    &a1,
                    "--k",
                    "256",
                    "--store",
                ])
                .arg(&store),
        )
        .stdout,
    )
    .unwrap();
    assert_eq!(index["checkpoints"].as_array().unwrap().len(), 2, "{index}");
    let n = index["contributions"].as_u64().unwrap();
    assert!(n > 100, "{index}");
    assert_eq!(index["rows"].as_u64().unwrap(), 2 * n);
    let manifest =
        std::fs::read_to_string(store.join(format!("models/{a1}/training_contributions.txt")))
            .unwrap();
    let picked = manifest.lines().nth(5).unwrap();
    let doc = &sql(
        &store,
        &format!("SELECT content, contributor FROM legal WHERE content_hash = '{picked}'"),
    )[0];
    for method in ["tracin", "cosine", "datainf"] {
        let scored: Value = serde_json::from_slice(
            &run_ok(
                ledgerflow()
                    .args([
                        "attribution",
                        "score",
                        "--adapter",
                        &a1,
                        "--method",
                        method,
                        "--output-id",
                        &format!("grad-{method}"),
                        "--text",
                    ])
                    .arg(doc["content"].as_str().unwrap())
                    .arg("--store")
                    .arg(&store),
            )
            .stdout,
        )
        .unwrap();
        // TracIn and cosine put the contribution first. DataInf's inverse Fisher (damping 0.1)
        // also weighs each gradient against the directions the others share, so the text's own
        // contribution is near the top rather than first (2nd of ~1,600 here, at 99.7 % of the
        // top score).
        let within = if method == "datainf" { 3 } else { 1 };
        let rank = scored["contributions"]
            .as_array()
            .unwrap()
            .iter()
            .position(|c| c["content_hash"] == picked);
        assert!(rank.is_some_and(|r| r < within), "{method}: {scored}");
        let total: f64 = scored["contributions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["score"].as_f64().unwrap())
            .sum();
        assert!((total - 1.0).abs() < 1e-9);
        assert!(scored["recorded"]["rows"].as_u64().unwrap() > 0);
        // DataInf is the influence at the trained adapter: its last checkpoint only.
        let checkpoints = if method == "datainf" { 1 } else { 2 };
        assert_eq!(scored["checkpoints"], checkpoints, "{method}: {scored}");
    }
    let rows = sql(&store, "SELECT count(*) AS n FROM attributions WHERE method = 'gradient' AND output_id = 'grad-tracin'");
    assert!(rows[0]["n"].as_i64().unwrap() > 0);
    let png = std::fs::read(store.join(format!("models/{base}/loss_curve.png"))).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    assert!(store.join(format!("models/{base}/tokenizer.json")).exists());

    // The embedded Kafka-protocol broker for the request and response topics.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut broker = ledgerflow()
        .args([
            "broker",
            "--port",
            &port.to_string(),
            "--topic",
            "inference.requests:2",
            "--topic",
            "inference.responses:1",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(broker.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let bootstrap = line.trim().strip_prefix("bootstrap=").unwrap().to_string();
    let broker = Serving {
        child: broker,
        addr: bootstrap.clone(),
    };
    let server = serve(
        &store,
        &[
            "--adapter-budget-mib",
            "64",
            "--kafka-brokers",
            &bootstrap,
            "--request-topic",
            "inference.requests",
            "--response-topic",
            "inference.responses",
        ],
    );
    let addr = server.addr.as_str();
    let (status, body) = http(addr, "GET", "/health", None, None);
    assert_eq!((status, body.as_str()), (200, "ok"));
    let models: Value =
        serde_json::from_str(&http(addr, "GET", "/v1/models", None, None).1).unwrap();
    let listed: Vec<(String, Value)> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["id"].as_str().unwrap().to_string(), m["parent"].clone()))
        .collect();
    assert!(listed.contains(&(base.clone(), Value::Null)));
    assert!(listed.contains(&(a1.clone(), json!(base))));
    assert!(listed.contains(&(a2.clone(), json!(base))));

    // A prompt from the Datanet, a completion from each adapter (greedy).
    let text = sql(
        &store,
        "SELECT content FROM legal ORDER BY content_hash LIMIT 1",
    )[0]["content"]
        .as_str()
        .unwrap()
        .to_string();
    let prompt: String = text
        .split_whitespace()
        .take(12)
        .collect::<Vec<_>>()
        .join(" ");
    let mut ids = Vec::new();
    let mut outputs = Vec::new();
    for model in [&a1, &a2] {
        let r = post(
            addr,
            "/v1/completions",
            json!({ "model": model, "prompt": prompt, "max_tokens": 24, "temperature": 0 }),
        );
        assert_eq!(r["object"], "text_completion");
        assert_eq!(
            r["usage"]["completion_tokens"].as_u64().unwrap()
                + r["usage"]["prompt_tokens"].as_u64().unwrap(),
            r["usage"]["total_tokens"].as_u64().unwrap()
        );
        let out = r["choices"][0]["text"].as_str().unwrap().to_string();
        assert!(!out.is_empty(), "{r}");
        let a = &r["attribution"];
        assert_eq!(a["method"], "span");
        assert_eq!(a["datanet"], "legal");
        assert!(a["error"].is_null(), "{a}");
        let credits = a["contributions"].as_array().unwrap();
        assert!(
            !credits.is_empty(),
            "no contribution credited for {out:?}: {a}"
        );
        let total: f64 = credits.iter().map(|c| c["score"].as_f64().unwrap()).sum();
        assert!((total - 1.0).abs() < 1e-6, "{a}");
        // a1 has a gradient index (built above): its answers carry TracIn credits too; a2 not.
        if *model == a1 {
            let g = &a["gradient"];
            assert_eq!(g["method"], "tracin", "{a}");
            assert!(!g["contributions"].as_array().unwrap().is_empty(), "{a}");
        } else {
            assert!(a["gradient"].is_null(), "{a}");
        }
        ids.push(r["id"].as_str().unwrap().to_string());
        outputs.push(out);
    }
    // The same inference from Kafka: a request topic in, a response topic out.
    {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
        use rdkafka::{ClientConfig, Message};
        let producer: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", &broker.addr)
            .create()
            .unwrap();
        for (i, model) in [&a1, &a2].iter().enumerate() {
            let body = json!({ "id": format!("kafka-{i}"), "model": model, "prompt": prompt, "max_tokens": 24, "temperature": 0 }).to_string();
            producer
                .send(
                    BaseRecord::to("inference.requests")
                        .key(&format!("kafka-{i}"))
                        .payload(&body),
                )
                .unwrap();
        }
        producer
            .send(
                BaseRecord::to("inference.requests")
                    .key("kafka-bad")
                    .payload("not json"),
            )
            .unwrap();
        producer.flush(Duration::from_secs(10)).unwrap();
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &broker.addr)
            .set("group.id", "models-serve-test")
            .set("auto.offset.reset", "earliest")
            .create()
            .unwrap();
        consumer.subscribe(&["inference.responses"]).unwrap();
        let mut answers = std::collections::BTreeMap::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while answers.len() < 3 {
            assert!(Instant::now() < deadline, "Kafka answers: {answers:?}");
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
                let v: Value = serde_json::from_slice(m.payload().unwrap()).unwrap();
                answers.insert(String::from_utf8_lossy(m.key().unwrap()).into_owned(), v);
            }
        }
        for (i, out) in outputs.iter().enumerate() {
            let a = &answers[&format!("kafka-{i}")];
            assert_eq!(a["choices"][0]["text"].as_str().unwrap(), out, "{a}");
            assert_eq!(a["request_id"], format!("kafka-{i}"));
            assert!(!a["attribution"]["contributions"]
                .as_array()
                .unwrap()
                .is_empty());
            ids.push(format!("kafka-{i}"));
        }
        assert!(answers["kafka-bad"]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not JSON"));
    }
    // Streamed: the same text in pieces, a usage chunk with the attribution, then [DONE].
    let (status, body) = http(
        addr,
        "POST",
        "/v1/completions",
        Some(
            &json!({ "model": a1, "prompt": prompt, "max_tokens": 24, "temperature": 0, "stream": true }),
        ),
        None,
    );
    assert_eq!(status, 200, "{body}");
    let ev = events(&body);
    assert_eq!(ev.last().unwrap(), "[DONE]");
    let usage: Value = serde_json::from_str(&ev[ev.len() - 2]).unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert!(usage["usage"]["completion_tokens"].as_u64().unwrap() > 0);
    assert_eq!(usage["attribution"]["generation"], gen1.as_str());
    let streamed: String = ev[..ev.len() - 2]
        .iter()
        .map(|e| {
            serde_json::from_str::<Value>(e).unwrap()["choices"][0]["text"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(streamed, outputs[0]);
    // Chat, plain and streamed.
    let chat = post(
        addr,
        "/v1/chat/completions",
        json!({ "model": a2, "messages": [{"role": "user", "content": prompt}], "max_tokens": 8, "temperature": 0 }),
    );
    assert_eq!(chat["object"], "chat.completion");
    assert_eq!(chat["choices"][0]["message"]["role"], "assistant");
    let (_, body) = http(
        addr,
        "POST",
        "/v1/chat/completions",
        Some(
            &json!({ "model": a2, "messages": [{"role": "user", "content": prompt}], "max_tokens": 8, "temperature": 0, "stream": true }),
        ),
        None,
    );
    let ev = events(&body);
    let first: Value = serde_json::from_str(&ev[0]).unwrap();
    assert_eq!(first["object"], "chat.completion.chunk");
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    let streamed: String = ev[1..ev.len() - 2]
        .iter()
        .filter_map(|e| {
            serde_json::from_str::<Value>(e).unwrap()["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect();
    assert_eq!(
        streamed,
        chat["choices"][0]["message"]["content"].as_str().unwrap()
    );
    // Errors in OpenAI's shape.
    let (status, body) = http(
        addr,
        "POST",
        "/v1/completions",
        Some(&json!({ "model": "nope", "prompt": "x" })),
        None,
    );
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("does not exist"));
    let (status, _) = http(
        addr,
        "POST",
        "/v1/completions",
        Some(&json!({ "model": a1, "prompt": prompt, "max_tokens": 500 })),
        None,
    );
    assert_eq!(status, 400);

    // Loading needs the bearer token; a name can be pointed at another version.
    let load = |name: &str, path: &str, token: Option<&str>| {
        http(
            addr,
            "POST",
            "/v1/load_lora_adapter",
            Some(&json!({ "lora_name": name, "lora_path": path })),
            token,
        )
    };
    assert_eq!(load("hot", &a1, None).0, 401);
    assert_eq!(load("hot", &a1, Some("wrong")).0, 401);
    let (status, body) = load("hot", &a1, Some("test-admin-token"));
    assert_eq!(status, 200, "{body}");
    // Hot swap under a running stream: the stream stays on the version it started with.
    let mut s = TcpStream::connect(addr).unwrap();
    let req = json!({ "model": "hot", "prompt": prompt, "max_tokens": 90, "temperature": 0, "stream": true }).to_string();
    write!(
        s,
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{req}",
        req.len()
    )
    .unwrap();
    let mut reader = BufReader::new(s.try_clone().unwrap());
    let mut line = String::new();
    while !line.starts_with("data:") {
        line.clear();
        reader.read_line(&mut line).unwrap();
    }
    let (status, body) = load("hot", &a2, Some("test-admin-token"));
    assert_eq!(status, 200, "{body}");
    let mut rest = String::new();
    reader.read_to_string(&mut rest).unwrap();
    let usage_line = rest.lines().rfind(|l| l.contains("\"usage\"")).unwrap();
    let usage: Value = serde_json::from_str(usage_line.trim_start_matches("data:").trim()).unwrap();
    assert_eq!(
        usage["attribution"]["generation"],
        gen1.as_str(),
        "the stream moved to the new version"
    );
    let after = post(
        addr,
        "/v1/completions",
        json!({ "model": "hot", "prompt": prompt, "max_tokens": 4, "temperature": 0 }),
    );
    assert_ne!(after["attribution"]["generation"], gen1.as_str());
    let (status, _) = http(
        addr,
        "POST",
        "/v1/unload_lora_adapter",
        Some(&json!({ "lora_name": "hot" })),
        Some("test-admin-token"),
    );
    assert_eq!(status, 200);
    assert_eq!(
        http(
            addr,
            "POST",
            "/v1/completions",
            Some(&json!({ "model": "hot", "prompt": "x" })),
            None
        )
        .0,
        404
    );

    // Metrics per adapter.
    let (_, metrics) = http(addr, "GET", "/metrics", None, None);
    assert!(
        metrics.contains(&format!(
            "ledgerflow_adapter_hits_total{{adapter=\"{a1}\"}}"
        )),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!(
            "ledgerflow_adapter_resident{{adapter=\"{a1}\"}} 1"
        )),
        "{metrics}"
    );
    assert!(metrics.contains("ledgerflow_time_to_first_token_seconds_count"));

    // Every answer is in `inferences` with its adapter version, and credited in `attributions`.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let q = format!(
            "SELECT request_id, model, adapter_generation, datanet, completion_tokens, time_to_first_token_ms FROM inferences WHERE request_id IN ('{}', '{}', '{}', '{}') ORDER BY model = '{a1}' DESC, request_id",
            ids[0], ids[1], ids[2], ids[3]
        );
        let rows = sql(&store, &q);
        if rows.len() == 4 {
            assert_eq!(rows[0]["adapter_generation"], gen1.as_str());
            assert_eq!(rows[0]["datanet"], "legal");
            assert!(rows[0]["time_to_first_token_ms"].as_f64().unwrap() > 0.0);
            let credited = sql(&store, &format!("SELECT count(*) AS n FROM attributions WHERE output_id = '{}' AND method = 'span'", ids[0]));
            assert!(credited[0]["n"].as_i64().unwrap() > 0);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "inferences not recorded: {rows:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // The server credited a1's answers by gradient itself.
    let credited = sql(
        &store,
        &format!(
            "SELECT count(*) AS n FROM attributions WHERE method = 'gradient' AND output_id = '{}'",
            ids[0]
        ),
    );
    assert!(credited[0]["n"].as_i64().unwrap() > 0);
    // At epoch close: a2 gets its gradient index, then its recorded answers (plain, Kafka,
    // chat, streamed chat) their gradient attributions, once.
    let run = |args: &[&str]| -> Value {
        serde_json::from_slice(&run_ok(ledgerflow().args(args).arg("--store").arg(&store)).stdout)
            .unwrap()
    };
    run(&["attribution", "index", "--adapter", &a2, "--k", "128"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while sql(
        &store,
        &format!("SELECT count(*) AS n FROM inferences WHERE model = '{a2}'"),
    )[0]["n"]
        != 4
    {
        assert!(
            Instant::now() < deadline,
            "a2's inferences not all recorded"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let first = run(&["attribution", "inferences", "--adapter", &a2]);
    assert_eq!(first["inferences"], 4, "{first}");
    assert!(
        first["rows"].as_u64().unwrap() >= first["inferences"].as_u64().unwrap(),
        "{first}"
    );
    let again = run(&["attribution", "inferences", "--adapter", &a2]);
    assert_eq!(again["inferences"], 0, "{again}");
    let credited = sql(
        &store,
        &format!(
            "SELECT count(*) AS n FROM attributions WHERE method = 'gradient' AND output_id = '{}'",
            ids[1]
        ),
    );
    assert!(credited[0]["n"].as_i64().unwrap() > 0);
    drop(server);
    drop(broker);

    // 1,000 adapters (versions of a1 with one weight changed each, in local folders) under Zipf
    // traffic from 8 clients with room for 100 in memory.
    let fleet = dir.path().join("fleet");
    let src = store.join(format!("models/{a1}"));
    let weights = std::fs::read(src.join("adapter_model.safetensors")).unwrap();
    let cfg = std::fs::read(src.join("adapter_config.json")).unwrap();
    let hl = u64::from_le_bytes(weights[..8].try_into().unwrap()) as usize;
    for i in 0..1000u32 {
        let d = fleet.join(format!("a{i:04}"));
        std::fs::create_dir_all(&d).unwrap();
        let mut w = weights.clone();
        // The first float of the data: a different small value per adapter.
        w[8 + hl..8 + hl + 4].copy_from_slice(&(i as f32 * 1e-4).to_le_bytes());
        std::fs::write(d.join("adapter_model.safetensors"), w).unwrap();
        std::fs::write(d.join("adapter_config.json"), &cfg).unwrap();
    }
    let per_adapter = weights.len() - 8 - hl;
    let budget_mib = ((per_adapter * 100) >> 20).max(1).to_string();
    let server = serve(
        &store,
        &["--adapter-budget-mib", &budget_mib, "--no-attribution"],
    );
    let addr = server.addr.clone();
    for i in 0..1000u32 {
        let d = fleet.join(format!("a{i:04}"));
        let (status, body) = http(
            &addr,
            "POST",
            "/v1/load_lora_adapter",
            Some(&json!({ "lora_name": format!("a{i:04}"), "lora_path": d })),
            Some("test-admin-token"),
        );
        assert_eq!(status, 200, "{body}");
    }
    let listed: Value =
        serde_json::from_str(&http(&addr, "GET", "/v1/models", None, None).1).unwrap();
    assert_eq!(listed["data"].as_array().unwrap().len(), 3 + 1000);
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let addr = addr.clone();
            std::thread::spawn(move || {
                let mut x = t * 7919 + 1;
                for _ in 0..40 {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let u = ((x >> 11) as f64 / (1u64 << 53) as f64).max(1e-12);
                    // Zipf(s = 1.1) over 1,000 ranks by inversion of the continuous CDF.
                    let rank =
                        ((1.0 - u * (1.0 - 1000f64.powf(-0.1))).powf(-1.0 / 0.1)).floor() as u32;
                    let name = format!("a{:04}", rank.clamp(1, 1000) - 1);
                    let (status, body) = http(
                        &addr,
                        "POST",
                        "/v1/completions",
                        Some(&json!({ "model": name, "prompt": "the parties", "max_tokens": 4 })),
                        None,
                    );
                    assert_eq!(status, 200, "{name}: {body}");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let (_, metrics) = http(&addr, "GET", "/metrics", None, None);
    let total = |m: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| l.starts_with(&format!("ledgerflow_adapter_{m}{{")))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
            .sum()
    };
    assert_eq!(
        total("hits_total") + total("misses_total"),
        320.0,
        "{metrics}"
    );
    assert!(
        total("evictions_total") > 0.0,
        "the budget forced no eviction"
    );
    assert!(total("resident") <= 101.0);
    assert!(metrics.contains("ledgerflow_request_errors_total 0"));

    // Eight concurrent requests for a cold adapter: one load.
    let cold = fleet.join("cold");
    std::fs::create_dir_all(&cold).unwrap();
    let mut w = weights.clone();
    w[8 + hl..8 + hl + 4].copy_from_slice(&0.5f32.to_le_bytes());
    std::fs::write(cold.join("adapter_model.safetensors"), w).unwrap();
    std::fs::write(cold.join("adapter_config.json"), &cfg).unwrap();
    let (status, body) = http(
        &addr,
        "POST",
        "/v1/load_lora_adapter",
        Some(&json!({ "lora_name": "cold", "lora_path": cold })),
        Some("test-admin-token"),
    );
    assert_eq!(status, 200, "{body}");
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(8));
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let (addr, barrier) = (addr.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                let (status, body) = http(
                    &addr,
                    "POST",
                    "/v1/completions",
                    Some(&json!({ "model": "cold", "prompt": "the parties", "max_tokens": 2 })),
                    None,
                );
                assert_eq!(status, 200, "{body}");
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let (_, metrics) = http(&addr, "GET", "/metrics", None, None);
    let value = |m: &str| -> f64 {
        let key = format!("ledgerflow_adapter_{m}{{adapter=\"cold\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&key))
            .unwrap()
            .parse()
            .unwrap()
    };
    assert_eq!(value("loads_total"), 1.0, "{metrics}");
    assert_eq!(value("hits_total") + value("misses_total"), 8.0);
}

/// `jobs/models.yaml` as shipped (fewer steps): a base and an adapter trained and registered,
/// then the registry served until `SERVE_SECONDS`.
#[test]
fn the_models_job_trains_and_serves() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    run_ok(
        ledgerflow()
            .args(["quickstart", "--count", "200", "--store"])
            .arg(&store),
    );
    run_ok(
        ledgerflow()
            .args(["run", "jobs/index.yaml", "--store"])
            .arg(&store)
            .env("DATANET", "legal"),
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = ledgerflow()
        .args(["run", "jobs/models.yaml", "--store"])
        .arg(&store)
        .env("TRAIN_STEPS", "30")
        .env("ADAPTER_STEPS", "10")
        .env("SERVE_PORT", port.to_string())
        .env("SERVE_SECONDS", "60")
        .env("GRADIENT_METHOD", "cosine")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut report = String::new();
    out.read_line(&mut report).unwrap();
    let report: Value = serde_json::from_str(&report).unwrap_or_else(|e| panic!("{report:?}: {e}"));
    let models = report["models"].as_array().unwrap();
    assert_eq!(models.len(), 2, "{report}");
    assert_eq!(
        (models[0]["stage"].as_str(), models[0]["kind"].as_str()),
        (Some("base"), Some("base"))
    );
    assert_eq!(models[1]["kind"], "adapter");
    assert_eq!(models[1]["parent"], models[0]["id"]);
    let mut listening = String::new();
    out.read_line(&mut listening).unwrap();
    assert!(
        listening.starts_with(&format!("listening on http://127.0.0.1:{port}")),
        "{listening}"
    );
    let addr = format!("127.0.0.1:{port}");
    let listed: Value =
        serde_json::from_str(&http(&addr, "GET", "/v1/models", None, None).1).unwrap();
    assert_eq!(listed["data"].as_array().unwrap().len(), 2, "{listed}");
    let r = post(
        &addr,
        "/v1/completions",
        json!({ "model": models[1]["id"], "prompt": "The parties", "max_tokens": 8, "temperature": 0 }),
    );
    assert_eq!(r["attribution"]["generation"], models[1]["content_hash"]);
    // The job built the adapter's gradient index: its answers carry TracIn credits.
    assert_eq!(
        models[1]["gradient_index"]["checkpoints"]
            .as_array()
            .unwrap()
            .len(),
        3
    );
    assert_eq!(r["attribution"]["gradient"]["checkpoints"], 3, "{r}");
    // The serve sink's `gradient_attribution.method` (GRADIENT_METHOD).
    assert_eq!(r["attribution"]["gradient"]["method"], "cosine", "{r}");
    let _ = child.kill();
    let _ = child.wait();
    let rows = sql(
        &store,
        "SELECT kind, count(*) AS n FROM models GROUP BY kind ORDER BY kind",
    );
    assert_eq!(
        rows,
        vec![
            json!({"kind": "adapter", "n": 1}),
            json!({"kind": "base", "n": 1})
        ]
    );
}

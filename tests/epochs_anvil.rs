//! Reward epochs end to end on a real chain (anvil `--network optimism`, started by
//! `scripts/test.sh`) with the alt-DA loopback server (`ledgerflow da serve`):
//!
//! - the state machine killed at every step of two epochs (`LEDGERFLOW_EPOCH_CRASH`, an abort
//!   like `kill -9`) and restarted each time settles every epoch exactly once, with the same
//!   roots and cumulative amounts as a run that never crashed, and every epoch's data readable
//!   from DA under the commitment `settle` recorded;
//! - contributions → Datanet → index → inferences with their attributions and fees in two
//!   epochs → both settled (the settler key in a keystore that `cast wallet import` wrote), the
//!   Datanet's content roots anchored → contributors claim with `ledgerflow rewards claim
//!   --epoch` and with `cast` from outside; balances equal the cumulative rewards, a second
//!   claim pays nothing, each pool is the emission plus the epoch's fees, and `ledgerflow
//!   datanet proof` passes `DatanetRegistry.included` on chain.
//!
//! Keys are TEST wallets derived from fixed labels and funded with `anvil_setBalance`.

#[path = "common/chain.rs"]
mod chain;
mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use chain::*;
use common::*;
use serde_json::Value;

/// A deployment on the shared anvil, its settler, and a DA server of our own.
struct Chain {
    rpc: String,
    modules: String,
    settler: String,
    deployment: PathBuf,
    deployed: Value,
    da: Child,
    da_url: String,
}

impl Drop for Chain {
    fn drop(&mut self) {
        let _ = self.da.kill();
        let _ = self.da.wait();
    }
}

fn setup(label: &str, dir: &Path) -> Option<Chain> {
    let (Some(rpc), Some(modules)) = (anvil(), chain_modules()) else {
        return None;
    };
    let settler = test_key(&format!("{label} settler"));
    fund(&modules, &rpc, &[&settler]);
    let deployment = dir.join(format!("{label}-deployment.json"));
    let deployed = json(run_ok(
        ledgerflow()
            .args(["contracts", "deploy", "--rpc", &rpc, "--out"])
            .arg(&deployment)
            .env("LEDGERFLOW_DEPLOYER_KEY", &settler),
    ));
    // `finalized` (two blocks behind the head here) must cover the deployment.
    run_ok(cast(&modules).args(["rpc", "anvil_mine", "3", "--rpc-url", &rpc]));
    let mut da = ledgerflow()
        .args(["da", "serve", "--listen", "127.0.0.1:0", "--dir"])
        .arg(dir.join(format!("{label}-da")))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(da.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    Some(Chain {
        rpc,
        modules,
        settler,
        deployment,
        deployed,
        da,
        da_url: line.trim().to_owned(),
    })
}

/// `jobs/rewards.yaml` pointed at a deployment, its DA server and a store, epoch 1 starting at
/// `start`.
struct Job {
    env: Vec<(&'static str, String)>,
}

impl Job {
    fn new(chain: &Chain, store: &Path, start: &str) -> Job {
        let job = Job {
            env: vec![
                ("EPOCH_START", start.to_owned()),
                ("LEDGERFLOW_RPC", chain.rpc.clone()),
                (
                    "LEDGERFLOW_DEPLOYMENT",
                    chain.deployment.display().to_string(),
                ),
                ("LEDGERFLOW_DA_URL", chain.da_url.clone()),
                ("LEDGERFLOW_STORE", store.display().to_string()),
            ],
        };
        run_ok(&mut job.command(&["validate", "jobs/rewards.yaml"]));
        job
    }

    /// `ledgerflow ARGS` with the job's environment (and `--job jobs/rewards.yaml` appended
    /// when `with_job`).
    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = ledgerflow();
        cmd.current_dir(repo_root())
            .args(args)
            .env_remove("LEDGERFLOW_EPOCH_CRASH");
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd
    }

    fn with_job(&self, args: &[&str]) -> Command {
        let mut cmd = self.command(args);
        cmd.args(["--job", "jobs/rewards.yaml"]);
        cmd
    }
}

fn epoch_run(chain: &Chain, job: &Job) -> Command {
    let mut cmd = job.with_job(&["epoch", "run", "--once"]);
    cmd.env("LEDGERFLOW_SETTLER_KEY", &chain.settler);
    cmd
}

fn status(job: &Job, n: u64) -> Value {
    json(run_ok(&mut job.with_job(&[
        "epoch",
        "status",
        &n.to_string(),
    ])))
}

fn call(chain: &Chain, to: &str, sig: &str, args: &[&str]) -> String {
    let out = text(run_ok(
        cast(&chain.modules)
            .args(["call", to, sig])
            .args(args)
            .args(["--rpc-url", &chain.rpc]),
    ));
    out.split_whitespace().next().unwrap_or_default().to_owned()
}

/// The `Settled` events of a deployment, as (epoch, root, dataHash, daCommitment).
fn settled_events(chain: &Chain) -> Vec<(u64, String, String, String)> {
    let out = run_ok(cast(&chain.modules).args([
        "logs",
        "--json",
        "--from-block",
        "0",
        "--address",
        chain.deployed["epoch_rewards"].as_str().unwrap(),
        "Settled(uint64 indexed,bytes32,bytes32,bytes32,uint256)",
        "--rpc-url",
        &chain.rpc,
    ]));
    let logs: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    logs.iter()
        .map(|l| {
            let epoch = u64::from_str_radix(
                l["topics"][1].as_str().unwrap().trim_start_matches("0x"),
                16,
            )
            .unwrap();
            let data = l["data"].as_str().unwrap().trim_start_matches("0x");
            let word = |i: usize| format!("0x{}", &data[64 * i..64 * (i + 1)]);
            (epoch, word(0), word(1), word(2))
        })
        .collect()
}

/// Attributions of synthetic outputs over epochs 1–3 and one record at 03:30 (event time that
/// closes epochs 1–3 and not 4).
fn epoch_store(store: &Path) {
    for (from, to, outputs, seed) in [
        ("2026-01-01T00:00:00Z", "2026-01-01T03:00:00Z", "600", "7"),
        ("2026-01-01T03:30:00Z", "2026-01-01T03:31:00Z", "1", "8"),
    ] {
        run_ok(
            ledgerflow()
                .args([
                    "gen",
                    "attributions",
                    "--contributors",
                    "300",
                    "--outputs",
                    outputs,
                    "--per-output",
                    "6",
                    "--from",
                    from,
                    "--to",
                    to,
                    "--seed",
                    seed,
                    "--store",
                ])
                .arg(store),
        );
    }
}

#[test]
fn killed_at_every_step_each_epoch_settles_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let Some(chain) = setup("epochs-crash", dir.path()) else {
        return;
    };
    let store = dir.path().join("store");
    epoch_store(&store);
    let job = Job::new(&chain, &store, "2026-01-01T00:00:00Z");
    let points = [
        "computing",
        "computed",
        "put",
        "published",
        "signed",
        "broadcast",
        "confirmed",
        "settled",
    ];
    for epoch in [1, 2] {
        for point in points {
            let out = epoch_run(&chain, &job)
                .env("LEDGERFLOW_EPOCH_CRASH", format!("{point}@{epoch}"))
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(
                !out.status.success()
                    && stderr.contains(&format!("aborting at `{point}` of epoch {epoch}")),
                "no crash at {point}@{epoch}: {stderr}"
            );
        }
    }
    let out = run_ok(&mut epoch_run(&chain, &job));
    let settled: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        settled
            .iter()
            .map(|s| s["epoch"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        vec![3],
        "the last run settles what is left"
    );
    // Nothing left: a further run does nothing.
    assert!(run_ok(&mut epoch_run(&chain, &job)).stdout.is_empty());

    // Exactly one Settled event per epoch, matching each journal.
    let events = settled_events(&chain);
    assert_eq!(
        events.iter().map(|e| e.0).collect::<Vec<_>>(),
        vec![1, 2, 3],
        "{events:?}"
    );
    let rewards = chain.deployed["epoch_rewards"].as_str().unwrap();
    assert_eq!(call(&chain, rewards, "epoch()(uint64)", &[]), "3");

    // The same epochs settled by a run that never crashed, on another deployment.
    let reference_chain = setup("epochs-reference", dir.path()).unwrap();
    let reference_store = dir.path().join("reference-store");
    epoch_store(&reference_store);
    let reference_job = Job::new(&reference_chain, &reference_store, "2026-01-01T00:00:00Z");
    run_ok(&mut epoch_run(&reference_chain, &reference_job));
    for (n, root, data_hash, commitment_hash) in &events {
        let j = status(&job, *n);
        let r = status(&reference_job, *n);
        assert_eq!(j["state"], "settled");
        assert_eq!(j["computed"]["root"], r["computed"]["root"], "epoch {n}");
        assert_eq!(
            j["computed"]["total_cumulative"], r["computed"]["total_cumulative"],
            "epoch {n}"
        );
        assert_eq!(
            std::fs::read(store.join(format!("epochs/rewards/{n:08}/leaves.csv"))).unwrap(),
            std::fs::read(reference_store.join(format!("epochs/rewards/{n:08}/leaves.csv")))
                .unwrap(),
            "epoch {n}'s leaves"
        );
        assert_eq!(&j["computed"]["root"], root);
        assert_eq!(&j["computed"]["data_hash"], data_hash);
        assert_eq!(&j["published"]["commitment_hash"], commitment_hash);
        let settles: Vec<&Value> = j["transactions"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|t| t["action"]["kind"] == "settle")
            .collect();
        assert_eq!(settles.len(), 1, "epoch {n} signed one settle: {j}");
        assert!(j["settlement"]["gas_used"].as_u64().unwrap() > 21_000);
        assert!(j["settlement"]["l1_fee"]["fee"].as_u64().unwrap() > 0);

        // The epoch's data, read back from DA under the journaled commitment.
        let payload = run_ok(
            ledgerflow()
                .args(["da", "get", j["published"]["commitment"].as_str().unwrap()])
                .args(["--url", &chain.da_url]),
        )
        .stdout;
        assert_eq!(
            ledgerflow_rewards::merkle::hex0x(ledgerflow_schemas::contribution::keccak256(
                &payload
            )),
            *data_hash
        );
        let body = zstd_decode(&payload);
        let manifest: Value = serde_json::from_str(body.lines().next().unwrap()).unwrap();
        assert_eq!(manifest["epoch"], *n);
        assert_eq!(&manifest["root"], root);
        assert!(manifest["params"]["block_hash"]
            .as_str()
            .unwrap()
            .starts_with("0x"));
    }
    let total = status(&job, 3)["computed"]["total_cumulative"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        call(&chain, rewards, "totalCumulative()(uint192)", &[]),
        total,
        "paid once: the cumulative total on chain is the uncrashed run's"
    );
    // Three epochs of the chain's emission (1000 tokens each), all of it allocated.
    assert_eq!(total, (3_000u128 * 10u128.pow(18)).to_string());
}

fn zstd_decode(bytes: &[u8]) -> String {
    String::from_utf8(zstd::decode_all(bytes).unwrap()).unwrap()
}

fn sql_rows(store: &Path, query: &str) -> Vec<Value> {
    json(run_ok(
        ledgerflow()
            .args(["sql", query, "--format", "json", "--store"])
            .arg(store),
    ))
    .as_array()
    .unwrap()
    .clone()
}

/// `attribute` the text of a contribution as model output `id`, made at `at`, recorded as an
/// inference that paid `fee`.
fn attribute(store: &Path, text: &str, id: &str, at: &str, fee: u128) -> Value {
    json(run_ok(
        ledgerflow()
            .args(["attribute", "--datanet", "legal", "--output-id", id])
            .args(["--created-at", at, "--text", text])
            .args(["--model", "base", "--prompt", "Summarise the clause."])
            .args(["--fee", &fee.to_string(), "--store"])
            .arg(store),
    ))
}

#[test]
fn contributions_to_two_settled_epochs_and_claims() {
    let dir = tempfile::tempdir().unwrap();
    let Some(chain) = setup("epochs-e2e", dir.path()) else {
        return;
    };
    let claimer = test_key("epochs-e2e claimer");
    fund(&chain.modules, &chain.rpc, &[&claimer]);
    let store = dir.path().join("store");
    run_ok(
        ledgerflow()
            .args(["quickstart", "--count", "200", "--store"])
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
                "2000",
                "--store",
            ])
            .arg(&store),
    );
    // Epoch 1 starts ten minutes before the contributions arrived.
    let first = sql_rows(
        &store,
        "SELECT CAST(min(kafka_timestamp) AS BIGINT) AS t FROM legal",
    )[0]["t"]
        .as_i64()
        .unwrap();
    let start = first - 600_000;
    let at = |offset_minutes: i64| {
        chrono::DateTime::from_timestamp_millis(start + offset_minutes * 60_000)
            .unwrap()
            .to_rfc3339()
    };
    let picked = sql_rows(
        &store,
        "SELECT content_hash, contributor, content FROM legal ORDER BY content_hash LIMIT 3",
    );
    let (a, b, c) = (&picked[0], &picked[1], &picked[2]);
    let content = |v: &Value| v["content"].as_str().unwrap().to_owned();
    // Epoch 1: an output drawn from a's text; epoch 2: from b's and from c's; an output in
    // epoch 3 is the event time that closes epoch 2.
    let credited = attribute(&store, &content(a), "out-1", &at(5), 1);
    assert_eq!(
        credited["contributions"][0]["contributor"],
        a["contributor"]
    );
    assert_eq!(credited["recorded"]["inference"], true);
    attribute(&store, &content(b), "out-2", &at(65), 20 * 10u128.pow(18));
    attribute(&store, &content(c), "out-3", &at(70), 30 * 10u128.pow(18));
    attribute(&store, &content(c), "out-4", &at(131), 1);
    assert_eq!(
        sql_rows(&store, "SELECT count(*) AS n FROM inferences")[0]["n"],
        4
    );

    let job = Job::new(
        &chain,
        &store,
        &chrono::DateTime::from_timestamp_millis(start)
            .unwrap()
            .to_rfc3339(),
    );
    // The settler signs from an encrypted keystore that cast (outside) wrote.
    let keystores = dir.path().join("keystores");
    std::fs::create_dir_all(&keystores).unwrap();
    run_ok(
        cast(&chain.modules)
            .args([
                "wallet",
                "import",
                "settler",
                "--private-key",
                &chain.settler,
                "--unsafe-password",
                "TEST password",
                "-k",
            ])
            .arg(&keystores),
    );
    let password = dir.path().join("password");
    std::fs::write(&password, "TEST password\n").unwrap();
    let out = run_ok(
        epoch_run(&chain, &job)
            .env_remove("LEDGERFLOW_SETTLER_KEY")
            .env("LEDGERFLOW_SETTLER_KEYSTORE", keystores.join("settler"))
            .env("LEDGERFLOW_SETTLER_KEYSTORE_PASSWORD_FILE", &password),
    );
    let settled: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(settled.len(), 2, "{settled:?}");
    // Each epoch's pool: the chain's emission (1000 tokens) plus its inferences' fees.
    let e18 = 10u128.pow(18);
    assert_eq!(
        status(&job, 1)["computed"]["pool"],
        (1000 * e18 + 1).to_string()
    );
    assert_eq!(
        status(&job, 2)["computed"]["pool"],
        (1050 * e18).to_string()
    );
    let listed = text(run_ok(&mut job.with_job(&["epoch", "list"])));
    assert_eq!(listed.matches("settled").count(), 2, "{listed}");
    assert!(listed.contains(" open "), "{listed}");

    // Epoch 1 anchored the Datanet's contributions; a's inclusion proof holds on chain.
    let one = status(&job, 1);
    assert_eq!(one["computed"]["datanets"][0]["datanet"], "legal", "{one}");
    assert_eq!(
        one["computed"]["datanets"][0]["contributions"],
        sql_rows(&store, "SELECT count(*) AS n FROM legal")[0]["n"]
    );
    let proof = json(run_ok(&mut job.with_job(&[
        "datanet",
        "proof",
        a["content_hash"].as_str().unwrap(),
    ])));
    assert_eq!(proof["epoch"], 1);
    assert_eq!(proof["anchored"], true);
    let siblings = |p: &Value| {
        format!(
            "[{}]",
            p["proof"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_str().unwrap())
                .collect::<Vec<_>>()
                .join(",")
        )
    };
    let registry = chain.deployed["datanet_registry"].as_str().unwrap();
    assert_eq!(
        call(
            &chain,
            registry,
            "included(string,uint64,bytes32,bytes32[])(bool)",
            &[
                "legal",
                "1",
                a["content_hash"].as_str().unwrap(),
                &siblings(&proof)
            ],
        ),
        "true"
    );
    assert_eq!(
        call(
            &chain,
            registry,
            "included(string,uint64,bytes32,bytes32[])(bool)",
            &[
                "legal",
                "2",
                a["content_hash"].as_str().unwrap(),
                &siblings(&proof)
            ],
        ),
        "false",
        "not in epoch 2's root"
    );

    // Claims: a with `ledgerflow rewards claim --epoch 2`, b from outside with cast.
    let token = chain.deployed["token"].as_str().unwrap();
    let rewards = chain.deployed["epoch_rewards"].as_str().unwrap();
    let balance = |who: &str| call(&chain, token, "balanceOf(address)(uint256)", &[who]);
    let proof_of = |who: &str| {
        json(run_ok(
            &mut job.with_job(&["rewards", "proof", who, "--epoch", "2"]),
        ))
    };
    let claim = |who: &str, epoch: &str| {
        job.with_job(&["rewards", "claim", who, "--epoch", epoch])
            .env("LEDGERFLOW_CLAIM_KEY", &claimer)
            .output()
            .unwrap()
    };
    let claim_a = || claim(a["contributor"].as_str().unwrap(), "2");
    let a_leaf = proof_of(a["contributor"].as_str().unwrap());
    let paid = json(claim_a());
    assert_eq!(paid["paid"], a_leaf["amount"], "{paid}");
    assert_eq!(
        balance(a["contributor"].as_str().unwrap()),
        a_leaf["amount"]
    );
    let again = claim_a();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("NothingToClaim"));

    let b_leaf = proof_of(b["contributor"].as_str().unwrap());
    assert!(b_leaf["amount"].as_str().unwrap().parse::<u128>().unwrap() > 0);
    run_ok(cast(&chain.modules).args([
        "send",
        rewards,
        "claim(address,uint256,bytes32[])",
        b["contributor"].as_str().unwrap(),
        b_leaf["amount"].as_str().unwrap(),
        &siblings(&b_leaf),
        "--private-key",
        &claimer,
        "--rpc-url",
        &chain.rpc,
    ]));
    assert_eq!(
        balance(b["contributor"].as_str().unwrap()),
        b_leaf["amount"]
    );
    // a's epoch-1 leaf is in the previous root, which the contract still accepts: the claim
    // is refused for having nothing left to pay, not for a bad proof.
    let old = claim(a["contributor"].as_str().unwrap(), "1");
    let stderr = String::from_utf8_lossy(&old.stderr);
    assert!(
        !old.status.success() && stderr.contains("NothingToClaim"),
        "{stderr}"
    );
}

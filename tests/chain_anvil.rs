//! The reward contracts on a real chain (anvil `--network optimism`, started by
//! `scripts/test.sh`): `ledgerflow contracts deploy`, two epochs settled from leaves files with
//! `ledgerflow rewards settle`, contributors paid through `ledgerflow rewards claim` and from
//! outside with `cast send` (npm `@foundry-rs/cast-linux-amd64`); balances equal the cumulative
//! amounts, a second claim pays nothing, an epoch cannot be settled twice. And the committed
//! contract artifacts (what the Rust bindings are generated from) equal a fresh forge build.
//!
//! The keys are TEST wallets, derived here from fixed labels (never use them elsewhere), and
//! funded with `anvil_setBalance`.

#[path = "common/chain.rs"]
mod chain;
mod common;

use std::path::Path;
use std::process::Command;

use chain::*;
use common::*;

fn write_leaves(path: &Path, leaves: &[(&str, u128)]) {
    let mut csv = String::from("address,amount\n");
    for (a, v) in leaves {
        csv.push_str(&format!("{a},{v}\n"));
    }
    std::fs::write(path, csv).unwrap();
}

#[test]
fn deploy_settle_two_epochs_and_claim_from_ledgerflow_and_cast() {
    let (Some(rpc), Some(modules)) = (anvil(), chain_modules()) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let settler = test_key("settler");
    let claimer = test_key("claimer");
    fund(&modules, &rpc, &[&settler, &claimer]);
    let deployment = dir.path().join("deployment.json");
    let deployed = json(run_ok(
        ledgerflow()
            .args(["contracts", "deploy", "--rpc", &rpc, "--out"])
            .arg(&deployment)
            .env("LEDGERFLOW_DEPLOYER_KEY", &settler),
    ));
    let rewards = deployed["epoch_rewards"].as_str().unwrap().to_owned();
    let token = deployed["token"].as_str().unwrap().to_owned();

    let (a, b, c) = (
        "0x1111111111111111111111111111111111111111",
        "0x2222222222222222222222222222222222222222",
        "0x3333333333333333333333333333333333333333",
    );
    let settle = |epoch: u64, leaves: &Path| {
        ledgerflow()
            .args([
                "rewards",
                "settle",
                "--epoch",
                &epoch.to_string(),
                "--rpc",
                &rpc,
            ])
            .arg("--leaves")
            .arg(leaves)
            .arg("--deployment")
            .arg(&deployment)
            .env("LEDGERFLOW_SETTLER_KEY", &settler)
            .output()
            .unwrap()
    };
    let claim = |account: &str, leaves: &Path| {
        ledgerflow()
            .args(["rewards", "claim", account, "--rpc", &rpc])
            .arg("--leaves")
            .arg(leaves)
            .arg("--deployment")
            .arg(&deployment)
            .env("LEDGERFLOW_CLAIM_KEY", &claimer)
            .output()
            .unwrap()
    };
    let balance = |account: &str| -> u128 {
        let out = text(run_ok(cast(&modules).args([
            "call",
            &token,
            "balanceOf(address)(uint256)",
            account,
            "--rpc-url",
            &rpc,
        ])));
        out.split_whitespace().next().unwrap().parse().unwrap()
    };

    let one = dir.path().join("epoch-1.csv");
    write_leaves(&one, &[(a, 1_000), (b, 2_000), (c, 3_000)]);
    let settled = settle(1, &one);
    assert!(
        settled.status.success(),
        "{}",
        String::from_utf8_lossy(&settled.stderr)
    );
    let paid = json(claim(a, &one));
    assert_eq!(paid["paid"], "1000", "{paid}");

    let two = dir.path().join("epoch-2.csv");
    write_leaves(&two, &[(a, 1_500), (b, 2_000), (c, 7_000)]);
    assert!(settle(2, &two).status.success());
    // Epoch 2 again: refused before anything is sent.
    let again = settle(2, &two);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("last settled epoch is 2"));

    assert_eq!(json(claim(a, &two))["paid"], "500");
    // b claims with the epoch-1 leaf (the previous root) and then has nothing left.
    assert_eq!(json(claim(b, &one))["paid"], "2000");
    let nothing = claim(b, &two);
    assert!(!nothing.status.success());
    assert!(
        String::from_utf8_lossy(&nothing.stderr).contains("NothingToClaim"),
        "{}",
        String::from_utf8_lossy(&nothing.stderr)
    );

    // c claims from outside: cast sends the proof ledgerflow printed.
    let proof = json(run_ok(
        ledgerflow()
            .args(["rewards", "proof", c, "--leaves"])
            .arg(&two),
    ));
    let siblings: Vec<&str> = proof["proof"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    run_ok(cast(&modules).args([
        "send",
        &rewards,
        "claim(address,uint256,bytes32[])",
        c,
        "7000",
        &format!("[{}]", siblings.join(",")),
        "--private-key",
        &claimer,
        "--rpc-url",
        &rpc,
    ]));
    assert_eq!(
        (balance(a), balance(b), balance(c)),
        (1_500, 2_000, 7_000),
        "balances equal the cumulative amounts"
    );
    let status = json(run_ok(
        ledgerflow()
            .args(["rewards", "status", c, "--rpc", &rpc, "--deployment"])
            .arg(&deployment),
    ));
    assert_eq!(
        (status["balance"].as_str(), status["claimed"].as_str()),
        (Some("7000"), Some("7000"))
    );
}

#[test]
fn committed_artifacts_equal_a_fresh_forge_build() {
    let Some(modules) = chain_modules() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    run_ok(
        Command::new(repo_root().join("contracts/export.sh"))
            .arg(dir.path())
            .env("LEDGERFLOW_CHAIN_MODULES", &modules),
    );
    for entry in std::fs::read_dir(repo_root().join("contracts/artifacts")).unwrap() {
        let path = entry.unwrap().path();
        let fresh = dir.path().join(path.file_name().unwrap());
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            std::fs::read_to_string(&fresh).unwrap(),
            "{} is stale: run contracts/export.sh",
            path.display()
        );
    }
}

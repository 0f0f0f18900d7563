//! Reward trees against OpenZeppelin's own `StandardMerkleTree` (`@openzeppelin/merkle-tree`
//! from npm, installed by `scripts/test.sh`): for random leaf sets — one leaf, powers of two and
//! their neighbours, repeated accounts and leaves, zero and 256-bit amounts — `ledgerflow
//! rewards tree` prints the same root and dumps the same tree (every node, every value's tree
//! index), and `ledgerflow rewards proof` prints the same proof for each account.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use rand::{Rng, SeedableRng};
use serde_json::Value;

/// A CSV of `n` leaves: accounts from a pool small enough to repeat, some leaves repeated
/// outright, amounts from 0 to 2^256 - 1.
fn leaf_set(n: usize, seed: u64) -> String {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let pool: Vec<String> = (0..n.max(2) * 3 / 4 + 1)
        .map(|_| {
            let bytes: [u8; 20] = rng.gen();
            ledgerflow_rewards::merkle::checksum_address(&bytes)
        })
        .collect();
    let mut lines = vec!["address,amount".to_owned()];
    for i in 0..n {
        if i > 0 && rng.gen_bool(0.05) {
            let again = lines[rng.gen_range(1..lines.len())].clone();
            lines.push(again);
            continue;
        }
        let account = &pool[rng.gen_range(0..pool.len())];
        let amount = match rng.gen_range(0..4) {
            0 => ledgerflow_rewards::Amount::ZERO,
            1 => ledgerflow_rewards::Amount::from(rng.gen::<u64>() as u128),
            2 => ledgerflow_rewards::Amount::from(rng.gen::<u128>()),
            _ => ledgerflow_rewards::Amount(rng.gen()),
        };
        lines.push(format!("{account},{amount}"));
    }
    lines.join("\n") + "\n"
}

fn openzeppelin(modules: &str, csv: &Path) -> Value {
    let out = run_ok(
        Command::new("node")
            .arg(repo_root().join("tests/support/merkle_tree.mjs"))
            .arg(csv)
            .env("NODE_PATH", modules),
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn roots_dumps_and_proofs_equal_openzeppelins() {
    let Some(modules) = node_modules() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    for (k, n) in [1usize, 2, 3, 4, 5, 7, 8, 9, 16, 17, 100, 255, 1000, 4097]
        .into_iter()
        .enumerate()
    {
        let csv = dir.path().join(format!("leaves-{n}.csv"));
        std::fs::write(&csv, leaf_set(n, 1000 + k as u64)).unwrap();
        let reference = openzeppelin(&modules, &csv);
        let dump = dir.path().join(format!("dump-{n}.json"));
        let out = run_ok(
            ledgerflow()
                .args(["rewards", "tree", "--leaves"])
                .arg(&csv)
                .arg("--dump")
                .arg(&dump),
        );
        let root = String::from_utf8(out.stdout).unwrap();
        assert_eq!(root.trim(), reference["root"], "root of {n} leaves");
        let ours: Value = serde_json::from_slice(&std::fs::read(&dump).unwrap()).unwrap();
        assert_eq!(ours, reference["dump"], "dump of {n} leaves");

        // Proofs by account (its first leaf) for up to 20 accounts.
        let text = std::fs::read_to_string(&csv).unwrap();
        let values: Vec<&str> = text.lines().skip(1).collect();
        let mut seen = std::collections::HashSet::new();
        for (i, line) in values.iter().enumerate() {
            let account = line.split(',').next().unwrap();
            if !seen.insert(account) || seen.len() > 20 {
                continue;
            }
            let out = run_ok(
                ledgerflow()
                    .args(["rewards", "proof", account, "--leaves"])
                    .arg(&csv),
            );
            let proof: Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(
                proof["proof"], reference["proofs"][i],
                "proof of leaf {i} of {n}"
            );
            assert_eq!(proof["root"], reference["root"]);
            assert_eq!(proof["amount"], line.split(',').nth(1).unwrap());
        }
    }
}

#[test]
fn bad_leaf_files_fail_with_their_line() {
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("bad.csv");
    std::fs::write(
        &csv,
        "address,amount\n0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed,10\n0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed,1.5\n",
    )
    .unwrap();
    let out = ledgerflow()
        .args(["rewards", "tree", "--leaves"])
        .arg(&csv)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.csv") && err.contains("line 3") && err.contains("1.5"),
        "{err}"
    );
    let out = ledgerflow()
        .args([
            "rewards",
            "proof",
            "0xfB6916095ca1df60bB79Ce92cE3Ea74c37c5d359",
            "--leaves",
        ])
        .arg(dir.path().join("missing.csv"))
        .output()
        .unwrap();
    assert!(!out.status.success());
}

/// DatanetRegistry's content trees (leaves `["bytes32"]`) against the npm package: same root,
/// same dump, same proofs, including repeated values.
#[test]
fn content_trees_equal_openzeppelins() {
    let Some(modules) = node_modules() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(77);
    for n in [1usize, 2, 3, 6, 33, 1000] {
        let mut values: Vec<[u8; 32]> = (0..n).map(|_| rng.gen()).collect();
        if n > 3 {
            values[n - 1] = values[1];
        }
        let text: String = values
            .iter()
            .map(|v| ledgerflow_rewards::merkle::hex0x(v) + "\n")
            .collect();
        let file = dir.path().join(format!("contents-{n}.txt"));
        std::fs::write(&file, text).unwrap();
        let reference = openzeppelin(&modules, &file);
        let ours = ledgerflow_rewards::merkle::Bytes32Tree::of(values.clone()).unwrap();
        assert_eq!(
            ledgerflow_rewards::merkle::hex0x(ours.root()),
            reference["root"],
            "{n}"
        );
        assert_eq!(ours.dump(), reference["dump"], "dump of {n}");
        for i in 0..n {
            let proof: Vec<String> = ours
                .proof(i)
                .unwrap()
                .iter()
                .map(ledgerflow_rewards::merkle::hex0x)
                .collect();
            assert_eq!(
                serde_json::json!(proof),
                reference["proofs"][i],
                "proof {i} of {n}"
            );
        }
    }
}

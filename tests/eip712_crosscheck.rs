//! EIP-712 signatures against an outside wallet library (ethers v6 from npm): what `gen` signs
//! verifies in ethers, what ethers signs verifies in `ledgerflow verify`, in the default domain
//! and in another one, with metadata that exercises RFC 8785 canonicalisation; both sides agree
//! on which tampered messages fail.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

fn ethers(modules: &str, args: &[&str]) -> String {
    let script = repo_root().join("tests/support/eip712.mjs");
    let out = run_ok(
        Command::new("node")
            .arg(script)
            .args(args)
            .env("NODE_PATH", modules),
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `ledgerflow verify`: (exit code, stdout).
fn verify(file: &Path, extra: &[&str]) -> (i32, String) {
    let out = ledgerflow()
        .arg("verify")
        .arg(file)
        .args(extra)
        .output()
        .unwrap();
    (
        out.status.code().unwrap(),
        String::from_utf8(out.stdout).unwrap(),
    )
}

fn rewrite(src: &Path, dst: &Path, f: impl Fn(usize, &mut serde_json::Value)) {
    let text = std::fs::read_to_string(src).unwrap();
    let mut out = String::new();
    for (i, line) in text.lines().enumerate() {
        let mut v: serde_json::Value = serde_json::from_str(line).unwrap();
        f(i, &mut v);
        out.push_str(&serde_json::to_string(&v).unwrap());
        out.push('\n');
    }
    std::fs::write(dst, out).unwrap();
}

#[test]
fn ours_verify_in_ethers_and_ethers_verify_in_ours() {
    let Some(modules) = node_modules() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let ours = dir.path().join("ours.jsonl");
    gen(&ours, 300, 11, 0.0, 300);

    // gen → ethers.verifyTypedData
    assert_eq!(
        ethers(&modules, &["verify", ours.to_str().unwrap()]).trim(),
        "ok 300 bad 0"
    );
    let (code, text) = verify(&ours, &[]);
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("300 of 300 signatures verified, 0 refused"),
        "{text}"
    );

    // Tampered copies: both libraries refuse exactly the same lines.
    let tampered = dir.path().join("tampered.jsonl");
    rewrite(&ours, &tampered, |i, v| match i {
        4 => v["content"] = format!("{}!", v["content"].as_str().unwrap()).into(),
        9 => v["nonce"] = (v["nonce"].as_u64().unwrap() + 1).into(),
        14 => v["metadata"]["lang"] = "fr".into(),
        19 => v["datanet"] = "medical".into(),
        _ => {}
    });
    let theirs = ethers(&modules, &["verify", tampered.to_str().unwrap()]);
    let mut their_bad: Vec<usize> = theirs
        .lines()
        .filter_map(|l| l.strip_prefix("bad "))
        .filter_map(|l| l.split(' ').next()?.parse().ok())
        .collect();
    their_bad.sort();
    assert_eq!(their_bad, vec![5, 10, 15, 20], "{theirs}");
    let (code, text) = verify(&tampered, &[]);
    assert_eq!(code, 1);
    let mut our_bad: Vec<usize> = text
        .lines()
        .filter(|l| l.contains(": signer_mismatch: "))
        .map(|l| l.split(':').nth(1).unwrap().parse().unwrap())
        .collect();
    our_bad.sort();
    assert_eq!(our_bad, their_bad, "{text}");

    // ethers signs (metadata that needs RFC 8785: key order, unicode, exponents, nesting) →
    // ledgerflow verify.
    let tricky = dir.path().join("tricky.jsonl");
    rewrite(&ours, &tricky, |i, v| {
        if i % 3 == 0 {
            v["metadata"] = serde_json::from_str(
                r#"{"z":1,"a":"é \u2028 \ud83d\ude00","n":1e21,"f":0.5,"neg":-0.0,"arr":[3,{"b":null,"a":true}],"big":12345678901234567890}"#,
            )
            .unwrap();
        } else if i % 3 == 1 {
            v["metadata"] = serde_json::Value::Null;
        } else {
            v.as_object_mut().unwrap().remove("metadata");
        }
    });
    let signed = dir.path().join("signed.jsonl");
    assert_eq!(
        ethers(
            &modules,
            &["sign", tricky.to_str().unwrap(), signed.to_str().unwrap()]
        )
        .trim(),
        "signed 300"
    );
    let (code, text) = verify(&signed, &[]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("300 of 300 signatures verified"), "{text}");

    // Another domain: chainId and verifyingContract are part of what is signed.
    let contract = "0x5fbdb2315678afecb367f032d93f642f64180aa3";
    let other = dir.path().join("other-domain.jsonl");
    ethers(
        &modules,
        &[
            "sign",
            tricky.to_str().unwrap(),
            other.to_str().unwrap(),
            "10",
            contract,
        ],
    );
    let (code, text) = verify(
        &other,
        &["--chain-id", "10", "--verifying-contract", contract],
    );
    assert_eq!(code, 0, "{text}");
    let (code, text) = verify(&other, &[]);
    assert_eq!(code, 1);
    assert_eq!(text.matches(": signer_mismatch: ").count(), 300, "{text}");
}

//! Helpers of the tests against the chain (anvil, cast): TEST keys, funding, command output.
//! Included with `#[path = "common/chain.rs"] mod chain;` by the tests that need them (it uses
//! crates the `ledgerflow-polars` tests, which share `common/mod.rs`, do not have).
#![allow(dead_code)]

use std::process::{Command, Output};

use crate::common::run_ok;

/// `cast` from the npm chain tools.
pub fn cast(modules: &str) -> Command {
    Command::new(format!("{modules}/@foundry-rs/cast-linux-amd64/bin/cast"))
}

/// A TEST private key: keccak256 of a label (never use it anywhere else).
pub fn test_key(label: &str) -> String {
    format!(
        "0x{}",
        hex::encode(ledgerflow_schemas::contribution::keccak256(
            format!("ledgerflow TEST wallet: {label}").as_bytes()
        ))
    )
}

/// A command's stdout, trimmed.
pub fn text(out: Output) -> String {
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// A command's stdout as JSON.
pub fn json(out: Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: stdout {:?} stderr {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// The address of a private key, by cast.
pub fn address_of(modules: &str, key: &str) -> String {
    text(run_ok(cast(modules).args([
        "wallet",
        "address",
        "--private-key",
        key,
    ])))
}

/// Gives the account of each key 100 ether on anvil (no transaction: `anvil_setBalance`).
pub fn fund(modules: &str, rpc: &str, keys: &[&str]) {
    for key in keys {
        run_ok(cast(modules).args([
            "rpc",
            "anvil_setBalance",
            &address_of(modules, key),
            "0x56BC75E2D63100000",
            "--rpc-url",
            rpc,
        ]));
    }
}

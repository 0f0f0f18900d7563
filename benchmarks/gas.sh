#!/usr/bin/env bash
# Gas of EpochRewards: a steady-state `settle` and a first claim at 131,072 leaves, each as the
# gas its own transaction would use (execution with cold storage + intrinsic gas), measured by
# the forge test `test_gas_settle_and_claim_at_131072_leaves` (proofs from `ledgerflow rewards`).
#   benchmarks/gas.sh          (after scripts/test.sh has installed forge and solc from npm)
set -euo pipefail
cd "$(dirname "$0")/.."
. benchmarks/lib.sh
build_binaries
modules=${LEDGERFLOW_CHAIN_MODULES:-$cache/chain/node_modules}
ln -sfn "$modules" contracts/node_modules
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd contracts && LEDGERFLOW_CHAIN_MODULES=$modules LEDGERFLOW_BIN=$lf LEDGERFLOW_FORGE_TMP=$tmp \
  "$modules/@foundry-rs/forge-linux-amd64/bin/forge" test --use ./solc.sh --offline -vvvv \
  --match-test test_gas_settle_and_claim_at_131072_leaves) | grep -E "log_gas|PASS|FAIL"

#!/usr/bin/env bash
# Builds the contracts with forge (offline, npm solc behind solc.sh) and writes what `ledgerflow`
# deploys to artifacts/<Name>.json: the ABI and the creation bytecode. The Rust bindings are
# generated from these files at compile time, so they are committed; tests/chain_anvil.rs checks
# that they equal a fresh build.
#   LEDGERFLOW_CHAIN_MODULES=…/node_modules contracts/export.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")"
modules=${LEDGERFLOW_CHAIN_MODULES:?set LEDGERFLOW_CHAIN_MODULES (scripts/test.sh installs forge and solc from npm)}
ln -sfn "$modules" node_modules
dest=${1:-artifacts}
"$modules/@foundry-rs/forge-linux-amd64/bin/forge" build --use ./solc.sh --offline --quiet
mkdir -p "$dest"
python3 - "$dest" <<'PY'
import json, sys
dest = sys.argv[1]
for src, name in [
    ("EpochRewards.sol", "EpochRewards"), ("OpenToken.sol", "OpenToken"), ("StakedOpen.sol", "StakedOpen"),
    ("RewardParams.sol", "RewardParams"), ("RewardGovernor.sol", "RewardGovernor"),
    ("DatanetRegistry.sol", "DatanetRegistry"), ("TimelockController.sol", "TimelockController"),
]:
    a = json.load(open(f"out/{src}/{name}.json"))
    with open(f"{dest}/{name}.json", "w") as f:
        json.dump({"abi": a["abi"], "bytecode": {"object": a["bytecode"]["object"]}}, f, indent=1, sort_keys=True)
        f.write("\n")
PY

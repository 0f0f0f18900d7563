#!/usr/bin/env bash
# Reward epochs from close to settled on anvil (`--network optimism`): CONTRIBUTORS contributors
# credited by synthetic model outputs (`ledgerflow gen attributions`, every contributor at least
# once) in each of three hourly epochs; `ledgerflow epoch run --once --job jobs/rewards.yaml`
# settles the three (policy SQL, largest-remainder split, cumulative tree, payload to the
# alt-DA loopback server and read back, `settle`). Prints each epoch's seconds per step (from
# its journal), its whole time, and the gas of its settle (epoch 3 is the steady state).
#   benchmarks/epoch.sh [CONTRIBUTORS]       default 100000
# NO_BUILD=1 uses the binaries as built; PROFILE=dev for a dev build. Needs the npm chain tools
# that scripts/test.sh installs (LEDGERFLOW_CHAIN_MODULES).
set -euo pipefail
cd "$(dirname "$0")/.."
. benchmarks/lib.sh
build_binaries
n=${1:-100000}
modules=${LEDGERFLOW_CHAIN_MODULES:-$cache/chain/node_modules}
out=benchmarks/out/epoch
rm -rf "$out" && mkdir -p "$out"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
port=$(free_port)
"$modules/@foundry-rs/anvil-linux-amd64/bin/anvil" --network optimism --slots-in-an-epoch 1 \
  --host 127.0.0.1 --port "$port" > "$out/anvil.log" 2>&1 &
anvil_pid=$!
"$lf" da serve --listen 127.0.0.1:0 > "$out/da.url" 2> "$out/da.log" &
da_pid=$!
trap 'kill $anvil_pid $da_pid 2>/dev/null || true' EXIT
for _ in $(seq 100); do [ -s "$out/da.url" ] && grep -q Listening "$out/anvil.log" && break; sleep 0.1; done
export LEDGERFLOW_RPC=http://127.0.0.1:$port LEDGERFLOW_DA_URL=$(cat "$out/da.url")
# anvil's first dev account (a TEST key every anvil prints; never use it elsewhere).
export LEDGERFLOW_DEPLOYER_KEY=0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80
export LEDGERFLOW_SETTLER_KEY=$LEDGERFLOW_DEPLOYER_KEY
export LEDGERFLOW_DEPLOYMENT=$out/deployment.json LEDGERFLOW_STORE=$out/store
export EPOCH_START=2026-01-01T00:00:00Z
"$lf" contracts deploy --out "$LEDGERFLOW_DEPLOYMENT" > /dev/null
"$modules/@foundry-rs/cast-linux-amd64/bin/cast" rpc anvil_mine 3 --rpc-url "$LEDGERFLOW_RPC" > /dev/null
for e in 0 1 2; do
  "$lf" gen attributions --contributors "$n" --outputs $((n / 2)) --per-output 4 --seed $((7 + e)) \
    --from "2026-01-01T0$e:00:00Z" --to "2026-01-01T0$e:59:59Z" > /dev/null
done
# The record that closes epoch 3 (event time 03:30).
"$lf" gen attributions --contributors 1 --outputs 1 --per-output 1 --seed 99 \
  --from 2026-01-01T03:30:00Z --to 2026-01-01T03:30:01Z > /dev/null
echo "contributors per epoch: $n; attributions per epoch: $((n * 2))"
/usr/bin/time -f "%e %M" -o "$out/run.time" "$lf" epoch run --once --job jobs/rewards.yaml > "$out/run.jsonl"
read -r wall rss < "$out/run.time"
echo "| epoch | compute s | publish s | settle s | close → settled s | leaves | payload KB | settle gas | L1 fee (gwei, Fjord) |"
echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
for e in 1 2 3; do
  "$lf" epoch status $e --job jobs/rewards.yaml | python3 -c '
import json, sys
j = json.load(sys.stdin)
s = j["seconds"]
print("| %d | %.2f | %.2f | %.2f | %.2f | %d | %.0f | %d | %.1f |" % (
    j["epoch"], s["compute"], s["publish"], s["settle"], sum(s.values()), j["computed"]["leaves"],
    j["computed"]["payload_bytes"] / 1e3, j["settlement"]["gas_used"],
    int(j["settlement"]["l1_fee"]["fee"]) / 1e9))'
done
echo
echo "whole run (3 epochs, one process): $wall s, peak RSS $((rss / 1024)) MB"

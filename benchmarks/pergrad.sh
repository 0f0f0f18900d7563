#!/usr/bin/env bash
# Projected per-example gradients against PyTorch's torch.func.vmap(grad) on the CPU, same
# model, same threads, in one run: a quick-start Datanet (2,000 contributions) → index (vocab
# 4,000) → base model (default sizes, 100 steps) → rank-8 adapter on all seven projections (30
# steps) → `ledgerflow attribution index --k 512` (exact per-example gradients of the adapter's
# A and B for every training contribution, projected to 512 dimensions) against
# benchmarks/pergrad_torch.py on the same weights, the same window lengths, the same batch (32)
# and the same kind of projection. Prints gradients/s of both and the ratio.
#   benchmarks/pergrad.sh [THREADS]      default every core
# LEDGERFLOW_DEVICE=cuda (a `--features cuda` build) runs both sides on the GPU.
# Needs torch and numpy in $LEDGERFLOW_PYTHON (default python3).
# NO_BUILD=1 uses the binaries as built; PROFILE=dev for a dev build.
set -euo pipefail
cd "$(dirname "$0")/.."
. benchmarks/lib.sh
build_binaries
threads=${1:-$(nproc)}
py=${LEDGERFLOW_PYTHON:-python3}
out=benchmarks/out/pergrad
rm -rf "$out" && mkdir -p "$out"
store=$out/store
model_store "$store"
base_and_adapter "$store"
echo "$adapter" > "$out/adapter.txt"
# The lengths of the windows the index computes: each training contribution's first 65 tokens.
"$lf" sql --store "$store" --format csv \
  "SELECT CAST(content_hash AS VARCHAR) AS h, cardinality(tokens) AS n FROM tokens WHERE datanet = 'legal'" \
  > "$out/lengths.csv"
"$py" - "$out/lengths.csv" "$store/models/$adapter/training_contributions.txt" > "$out/lengths.txt" <<'PY'
import csv, sys
train = set(open(sys.argv[2]).read().split())
for row in csv.DictReader(open(sys.argv[1])):
    if row["h"] in train and int(row["n"]) >= 2:
        print(min(int(row["n"]), 65))
PY
RAYON_NUM_THREADS=$threads "$lf" attribution index --adapter "$adapter" --k 512 --store "$store" > "$out/ours.json"
"$py" benchmarks/pergrad_torch.py "$store/models/$base" "$store/models/$adapter" "$out/lengths.txt" "$threads" 512 32 "${LEDGERFLOW_DEVICE:-cpu}" > "$out/torch.json"
"$py" - "$out" <<'PY'
import json, os, sys
d = sys.argv[1]
ours = json.load(open(os.path.join(d, "ours.json")))
ref = json.load(open(os.path.join(d, "torch.json")))
assert ours["rows"] == ref["examples"], (ours["rows"], ref["examples"])
print(f"(ours end to end, with loading, tokenizing and writing the index: {ours['seconds']:.2f} s)")
print(f"device: {ref['device']}")
print("| implementation | threads | examples | parameters | k | seconds | gradients/s | ratio to PyTorch |")
print("| --- | --- | --- | --- | --- | --- | --- | --- |")
print(f"| ledgerflow (batched exact, candle) | {ref['threads']} | {ours['rows']} | {ref['parameters']} | {ours['k']} | "
      f"{ours['gradient_seconds']:.2f} | {ours['gradients_per_second_computing']:.1f} | {ours['gradients_per_second_computing'] / ref['per_second']:.2f} |")
print(f"| PyTorch {ref['torch']} vmap(grad) + projection | {ref['threads']} | {ref['examples']} | {ref['parameters']} | {ref['k']} | "
      f"{ref['seconds']:.2f} | {ref['per_second']:.1f} | 1.00 |")
PY

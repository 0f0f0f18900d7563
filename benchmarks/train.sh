#!/usr/bin/env bash
# Training throughput against PyTorch on the CPU, same model, same batches, same threads, in one
# run: a quick-start Datanet (2,000 contributions) → index (vocab 4,000) → the Rust side
# (`ledgerflow train-reference`: `ledgerflow train`'s code on the Datanet, default sizes) writes
# its initial weights and every step's batch, then PyTorch (eager, from PyPI) trains the same
# model from the same weights on the same batches. Prints tokens/s of both, the ratio, and how
# far apart the two loss curves are (an outside check of our forward, backward and AdamW).
#   benchmarks/train.sh [STEPS] [THREADS]      default 60, every core
# LEDGERFLOW_DEVICE=cuda (a `--features cuda` build) runs both sides on the GPU.
# Needs torch and numpy in $LEDGERFLOW_PYTHON (default python3).
# NO_BUILD=1 uses the binaries as built; PROFILE=dev for a dev build.
set -euo pipefail
cd "$(dirname "$0")/.."
. benchmarks/lib.sh
build_binaries
steps=${1:-60} threads=${2:-$(nproc)}
py=${LEDGERFLOW_PYTHON:-python3}
out=${TRAIN_OUT:-benchmarks/out/train}
rm -rf "$out" && mkdir -p "$out"
store=$out/store
model_store "$store"
RAYON_NUM_THREADS=$threads "$lf" train-reference "$store" legal "$out/run" "$steps"
"$py" benchmarks/train_torch.py "$out/run" "$threads" "${LEDGERFLOW_DEVICE:-cpu}"
"$py" - "$out/run" <<'PY'
import json, os, sys
d = sys.argv[1]
ours, ref = (json.load(open(os.path.join(d, f))) for f in ("ours.json", "torch.json"))
diff = [abs(a - b) for a, b in zip(ours["losses"], ref["losses"])]
print()
print("| trainer | device | threads | seconds | tokens/s | ratio to PyTorch | final loss |")
print("| --- | --- | --- | --- | --- | --- | --- |")
for name, r in (("ledgerflow (candle)", ours), (f"PyTorch {ref['torch']} eager", ref)):
    print(f"| {name} | {r.get('device', 'cpu')} | {r['threads']} | {r['seconds']:.2f} | {r['tokens_per_second']:,.0f} | "
          f"{r['tokens_per_second'] / ref['tokens_per_second']:.2f} | {r['losses'][-1]:.4f} |")
print()
print(f"loss curves: max |ours - torch| {max(diff[:10]):.2e} over the first 10 steps, "
      f"{max(diff):.2e} over all {len(diff)}")
PY

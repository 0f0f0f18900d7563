#!/usr/bin/env bash
# The `cuda` build's checks and GPU benchmarks, in one run on a machine with an NVIDIA GPU:
#   pergrad           projected per-example gradients against torch.func.vmap(grad) on the same
#                     GPU (benchmarks/pergrad.sh);
#   gradients-vs-cpu  the same binary's index of that adapter on the CPU: relative error of the
#                     GPU's projected per-example gradients against the CPU's (after pergrad);
#   train             training tokens/s against PyTorch eager on the same GPU, and how far apart
#                     the two loss curves are (benchmarks/train.sh, TRAIN_STEPS, default 300);
#   train-composed    the same as train with LEDGERFLOW_CUDA_KERNELS=0: candle's composed ops and
#                     AdamW instead of our CUDA kernels (what the kernels gain, same binary);
#   train-cpu         the same training on the CPU, both sides (same binary, same batches): how far
#                     our GPU and CPU loss curves are apart, and PyTorch's (after train);
#   scoring           scoring over a 1,000,000 × 256 index in GPU memory against the GPU's copy
#                     bandwidth, scores checked against the CPU's (`attribution bench`);
#   serve             1,000 adapters under Zipf traffic against one adapter, cold loads, resident
#                     bytes per adapter (benchmarks/serve.sh 400 16 32).
# Build first (on a machine with CUDA's nvcc; set CUDA_COMPUTE_CAP when it has no GPU):
#   cargo build -p ledgerflow --features cuda --bin ledgerflow
#   benchmarks/gpu.sh [STEP…]         default: all seven, in that order
# Uses the dev build (PROFILE=release for a release build) without rebuilding; torch and numpy
# from $LEDGERFLOW_PYTHON (default python3). Everything is written to benchmarks/out/gpu.
set -uo pipefail
cd "$(dirname "$0")/.."
export NO_BUILD=1 PROFILE=${PROFILE:-dev} LEDGERFLOW_DEVICE=${LEDGERFLOW_DEVICE:-cuda}
export LEDGERFLOW_PYTHON=${LEDGERFLOW_PYTHON:-python3}
steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(pergrad gradients-vs-cpu train train-composed train-cpu scoring serve)
out=benchmarks/out/gpu
mkdir -p "$out"
. benchmarks/lib.sh
build_binaries
export out lf
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
if ! command -v curl > /dev/null; then
  # serve.sh loads adapters and reads /metrics with curl: a stand-in for the flags it uses.
  mkdir -p "$out/bin"
  cat > "$out/bin/curl" <<'PY'
#!/usr/bin/env python3
import sys, urllib.request
a, i, headers, data, out, fail = sys.argv[1:], 0, {}, None, None, False
while i < len(a):
    if a[i] == "-H": k, v = a[i + 1].split(":", 1); headers[k.strip()] = v.strip(); i += 2
    elif a[i] == "-d": data = a[i + 1].encode(); i += 2
    elif a[i] == "-o": out = a[i + 1]; i += 2
    elif a[i].startswith("-"): fail |= "f" in a[i]; i += 1
    else: url = a[i]; i += 1
try:
    body = urllib.request.urlopen(urllib.request.Request(url, data, headers)).read()
except Exception as e:
    print(e, file=sys.stderr); sys.exit(22 if fail else 0)
if out is None: sys.stdout.buffer.write(body)
elif out != "/dev/null": open(out, "wb").write(body)
PY
  chmod +x "$out/bin/curl"
  export PATH=$PWD/$out/bin:$PATH
fi

# The GPU's projected per-example gradients against the CPU's, same binary, same store.
gradients-vs-cpu() {
  local pg=benchmarks/out/pergrad
  rm -rf "$out/cpu-store" && cp -r "$pg/store" "$out/cpu-store"
  LEDGERFLOW_DEVICE=cpu "$lf" attribution index --adapter "$(cat "$pg/adapter.txt")" --k 512 \
    --store "$out/cpu-store" || return
  local q="SELECT content_hash, checkpoint, gradient FROM gradients WHERE created_at = (SELECT max(created_at) FROM gradients) ORDER BY content_hash, checkpoint"
  "$lf" sql --store "$pg/store" --format ndjson "$q" > "$out/gradients-gpu.ndjson" || return
  "$lf" sql --store "$out/cpu-store" --format ndjson "$q" > "$out/gradients-cpu.ndjson" || return
  "$LEDGERFLOW_PYTHON" - "$out/gradients-gpu.ndjson" "$out/gradients-cpu.ndjson" <<'PY'
import json, math, sys
gpu, cpu = ([json.loads(l) for l in open(f) if l.strip()] for f in sys.argv[1:3])
assert len(gpu) == len(cpu) > 0, (len(gpu), len(cpu))
errs = []
for a, b in zip(gpu, cpu):
    assert (a["content_hash"], a["checkpoint"]) == (b["content_hash"], b["checkpoint"])
    d = math.sqrt(sum((x - y) ** 2 for x, y in zip(a["gradient"], b["gradient"])))
    errs.append(d / max(math.sqrt(sum(y * y for y in b["gradient"])), 1e-30))
errs.sort()
print(f"{len(errs)} projected gradients, GPU against CPU: relative error median {errs[len(errs) // 2]:.2e}, max {errs[-1]:.2e}")
PY
}
pergrad() { benchmarks/pergrad.sh; }
train() { benchmarks/train.sh "${TRAIN_STEPS:-300}"; }
train-composed() {
  LEDGERFLOW_CUDA_KERNELS=0 TRAIN_OUT=benchmarks/out/train-composed benchmarks/train.sh "${TRAIN_STEPS:-300}"
}
scoring() {
  "$lf" attribution bench --rows 1000000 --k 256 --threads "$(nproc)" || return
  # The GPU's memory bandwidth as PyTorch measures it on a buffer of the index's size.
  "$LEDGERFLOW_PYTHON" - <<'PY'
import torch
n = 256_000_000
a = torch.rand(n, device="cuda")
b = torch.empty_like(a)
def best(f):
    f(); torch.cuda.synchronize()
    times = []
    for _ in range(10):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(); f(); e.record(); e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    return min(times)
copy, read = best(lambda: b.copy_(a)), best(lambda: a.sum())
print(f"torch {torch.__version__}: copy {2 * 4 * n / copy / 1e9:.0f} GB/s (read + written), "
      f"sum {4 * n / read / 1e9:.0f} GB/s (read), over {4 * n / 1e9:.3f} GB")
PY
}
train-cpu() {
  LEDGERFLOW_DEVICE=cpu TRAIN_OUT=benchmarks/out/train-cpu benchmarks/train.sh "${TRAIN_STEPS:-300}" || return
  "$LEDGERFLOW_PYTHON" - benchmarks/out/train/run benchmarks/out/train-cpu/run <<'PY'
import json, sys
gpu, cpu = sys.argv[1:3]
for f, name in (("ours.json", "ledgerflow"), ("torch.json", "PyTorch")):
    a, b = (json.load(open(f"{d}/{f}"))["losses"] for d in (gpu, cpu))
    d = [abs(x - y) for x, y in zip(a, b)]
    print(f"{name}: GPU against CPU loss curve: max |diff| {max(d[:10]):.2e} over the first 10 steps, "
          f"{max(d):.2e} over all {len(d)}; final {a[-1]:.4f} / {b[-1]:.4f}")
PY
}
serve() {
  benchmarks/serve.sh 400 16 32
  local rc=$?
  grep -h -i -m 5 'error\|panic' benchmarks/out/serve/serve-*.log
  return $rc
}
export -f gradients-vs-cpu pergrad train train-composed train-cpu scoring serve

for name in "${steps[@]}"; do
  case $name in
    pergrad | train | train-composed | train-cpu) limit=240 ;; serve) limit=300 ;; *) limit=120 ;;
  esac
  printf '\n== %s\n' "$name"
  t0=$SECONDS
  timeout "$limit" bash -c "$name" > "$out/$name.log" 2>&1
  rc=$?
  tail -n 25 "$out/$name.log"
  printf '== %s: rc %s, %s s\n' "$name" "$rc" "$((SECONDS - t0))"
done

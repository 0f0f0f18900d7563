#!/usr/bin/env bash
# Serving 1,000 LoRA adapters on one base against the same load on one adapter, in one run:
# quick-start Datanet → index → base model (default sizes) → one rank-8 adapter → 1,000 adapter
# versions (copies with one weight changed, so 1,000 distinct content hashes) loaded by
# `/v1/load_lora_adapter`. Then, on one server: N requests from C clients on one adapter, the
# same N under Zipf(1.1) over the 1,000 with a budget for 100 resident (misses and evictions),
# cold-load p50/p99 from /metrics, and resident memory per adapter (RSS growth with all 1,000
# resident over their tensor bytes).
#   benchmarks/serve.sh [REQUESTS] [CLIENTS] [MAX_TOKENS]     default 400 16 32
# NO_BUILD=1 uses the binaries as built; PROFILE=dev for a dev build.
set -euo pipefail
cd "$(dirname "$0")/.."
. benchmarks/lib.sh
build_binaries
n=${1:-400} c=${2:-16} t=${3:-32}
py=${LEDGERFLOW_PYTHON:-python3}
out=benchmarks/out/serve
rm -rf "$out" && mkdir -p "$out"
store=$out/store
model_store "$store"
base_and_adapter "$store"
src=$store/models/$adapter
tensor_bytes=$("$py" - "$src" "$out/fleet" <<'PY'
import os, struct, sys
src, fleet = sys.argv[1], sys.argv[2]
w = open(os.path.join(src, "adapter_model.safetensors"), "rb").read()
cfg = open(os.path.join(src, "adapter_config.json"), "rb").read()
hl = struct.unpack("<Q", w[:8])[0]
for i in range(1000):
    d = os.path.join(fleet, f"a{i:04d}")
    os.makedirs(d, exist_ok=True)
    b = bytearray(w)
    b[8 + hl:12 + hl] = struct.pack("<f", i * 1e-4)
    open(os.path.join(d, "adapter_model.safetensors"), "wb").write(b)
    open(os.path.join(d, "adapter_config.json"), "wb").write(cfg)
print(len(w) - 8 - hl)
PY
)
serve_and_load() { # BUDGET_MIB → starts the server, loads the fleet; sets $pid $addr
  export LEDGERFLOW_API_KEY=bench-token
  "$lf" serve --port 0 --store "$store" --no-attribution --adapter-budget-mib "$1" > "$out/serve.url" 2> "$out/serve-$1.log" &
  pid=$!
  for _ in $(seq 300); do [ -s "$out/serve.url" ] && break; sleep 0.1; done
  addr=$(sed -n 's|listening on http://\([^ ]*\).*|\1|p' "$out/serve.url")
  for i in $(seq -f %04g 0 999); do
    curl -sf -o /dev/null -H "Authorization: Bearer bench-token" -H 'Content-Type: application/json' \
      -d "{\"lora_name\":\"a$i\",\"lora_path\":\"$PWD/$out/fleet/a$i\"}" "http://$addr/v1/load_lora_adapter"
  done
}
rss_kb() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
# GPU memory of process PID in MiB (under `cuda`, where the adapters live), or nothing
gpu_mib() {
  command -v nvidia-smi > /dev/null || return 0
  nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits 2>/dev/null \
    | awk -F', *' -v p="$1" '$1 == p {print $2}'
}
seq -f a%04g 0 999 > "$out/fleet.txt"
echo a0000 > "$out/one.txt"
per=$(( (tensor_bytes * 100) >> 20 )); [ "$per" -ge 1 ] || per=1
serve_and_load "$per"
trap 'kill $pid 2>/dev/null || true' EXIT
"$py" benchmarks/serve_load.py "$addr" "$out/one.txt" --requests 32 --clients "$c" --max-tokens "$t" > /dev/null  # warm-up
one=$("$py" benchmarks/serve_load.py "$addr" "$out/one.txt" --requests "$n" --clients "$c" --max-tokens "$t")
zipf=$("$py" benchmarks/serve_load.py "$addr" "$out/fleet.txt" --requests "$n" --clients "$c" --max-tokens "$t" --zipf 1.1)
curl -s "http://$addr/metrics" > "$out/metrics.txt"
kill $pid; wait $pid 2>/dev/null || true
# Memory: all 1,000 resident (budget for all), RSS before (request path warmed on the base
# model) and after touching each adapter once.
serve_and_load 4096
echo "$base" > "$out/base.txt"
"$py" benchmarks/serve_load.py "$addr" "$out/base.txt" --requests 200 --clients 1 --max-tokens 1 > /dev/null  # warm the request path
before=$(rss_kb $pid) gpu_before=$(gpu_mib $pid)
for i in $(seq -f %04g 0 999); do
  curl -sf -o /dev/null -H 'Content-Type: application/json' \
    -d "{\"model\":\"a$i\",\"prompt\":\"The\",\"max_tokens\":1}" "http://$addr/v1/completions"
done
after=$(rss_kb $pid) gpu_after=$(gpu_mib $pid)
resident=$(curl -s "http://$addr/metrics" | awk '/^ledgerflow_adapter_resident\{/ {s += $2} END {print s}')
kill $pid; wait $pid 2>/dev/null || true
echo "single adapter:   $one"
echo "1,000, Zipf(1.1): $zipf"
grep -E '^ledgerflow_adapter_load_seconds|^ledgerflow_engine_step' "$out/metrics.txt"
echo "adapter tensor bytes: $tensor_bytes; resident: $resident; RSS growth $(( (after - before) * 1024 / 1000 )) bytes per adapter"
if [ -n "$gpu_before" ] && [ -n "$gpu_after" ]; then
  echo "GPU memory growth $(( (gpu_after - gpu_before) * 1048576 / 1000 )) bytes per adapter ($gpu_before → $gpu_after MiB)"
fi
"$py" -c "import json,sys; a=json.loads(sys.argv[1]); b=json.loads(sys.argv[2]); print('Zipf/single tokens/s: %.3f' % (b['tokens_per_s']/a['tokens_per_s']))" "$one" "$zipf"

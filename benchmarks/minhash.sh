#!/usr/bin/env bash
# MinHash signatures per core, same documents and hash count: ledgerflow's `dedup_near` hasher
# against rensa and datasketch (from PyPI) in one run.
#   benchmarks/minhash.sh [COUNT] [CONTENT_BYTES] [ROUNDS]      defaults: 20000 1000 5
# NO_BUILD=1 uses the binaries as built; PROFILE=dev for a dev build.
set -euo pipefail
cd "$(dirname "$0")/.."
. benchmarks/lib.sh
count=${1:-20000} bytes=${2:-1000} rounds=${3:-5}
venv=$cache/bench-venv
if ! [ -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import rensa, datasketch" 2>/dev/null; then
  python3 -m venv "$venv" >&2
  "$venv/bin/pip" install -q "rensa==0.5.0" "datasketch==2.0.0" >&2
fi
profile=${PROFILE:-release}
if [ -z "${NO_BUILD:-}" ]; then
  # The hasher lives in ledgerflow-operators: its example builds without the query engine.
  cargo build --profile "$profile" -p ledgerflow-operators --example bench_minhash >&2
  [ -x "$CARGO_TARGET_DIR/debug/ledgerflow" ] || [ -x "$CARGO_TARGET_DIR/release/ledgerflow" ] ||
    cargo build -p ledgerflow >&2
fi
bindir=$CARGO_TARGET_DIR/$([ "$profile" = dev ] && echo debug || echo "$profile")
lf=$CARGO_TARGET_DIR/release/ledgerflow
[ -x "$lf" ] || lf=$CARGO_TARGET_DIR/debug/ledgerflow
data=$(contributions "$count" "$bytes")
example=$bindir/examples/bench_minhash
echo "# $count documents of ~$bytes bytes, 112 hashes, word 5-grams, one core, best of $rounds"
ours=$(taskset -c 0 "$example" "$data" "$rounds" 112)
peers=$(taskset -c 0 "$venv/bin/python" benchmarks/minhash.py "$data" "$rounds" 112)
echo "$ours"
echo "$peers"
rate() { grep "^$1 " <<<"$2" | grep -o '[0-9]* docs/s' | tr -dc '0-9'; }
o=$(rate ledgerflow "$ours")
echo
echo "| implementation | docs/s | ledgerflow vs it |"
echo "| --- | --- | --- |"
printf "| ledgerflow (shingling + 112 hashes) | %s | 1.00 |\n" "$o"
for p in rensa rensa-digest-only datasketch; do
  r=$(rate "$p" "$peers")
  printf "| %s | %s | %.2f |\n" "$p" "$r" "$(echo "$o / $r" | bc -l)"
done

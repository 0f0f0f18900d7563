#!/usr/bin/env bash
# Coverage-guided fuzzing of the verifiers and filters: cargo-fuzz (libFuzzer) on nightly Rust,
# targets in fuzz/fuzz_targets (decode + signature check, quality rules + PII masking + MinHash,
# signature recovery and parsers, batch signature checks). A crash leaves its input in
# fuzz/artifacts/<target>/.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET…]     default 60 s, every target
#
# Installs cargo-fuzz once into the tool cache; corpora grow across runs under the cache, seeded
# with generated contributions (valid, planted junk and malformed ones).
set -euo pipefail
cd "$(dirname "$0")/.."
cache=${LEDGERFLOW_CACHE:-$HOME/.cache/ledgerflow}
secs=${1:-60}
shift || true
export PATH=$cache/tools/bin:$PATH
if ! rustup toolchain list | grep -q '^nightly'; then
  echo "fuzzing needs a nightly toolchain: rustup toolchain install nightly" >&2
  exit 2
fi
command -v cargo-fuzz > /dev/null || cargo install cargo-fuzz --locked --root "$cache/tools"

# Seeds: generated messages (whole lines for the decoder, contents for the text filters).
seeds=$cache/fuzz-seeds
if ! [ -d "$seeds" ]; then
  mkdir -p "$seeds/lines" "$seeds/texts"
  tmp=$(mktemp -d)
  CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$cache/target} cargo run -q -p ledgerflow -- gen contributions \
    --count 64 --seed 3 --planted 0.5 --manifest "$tmp/m.tsv" --out "$tmp/p.jsonl"
  python3 - "$tmp/p.jsonl" "$seeds" <<'PY'
import json, sys
lines = open(sys.argv[1], encoding="utf-8").read().splitlines()
for i, line in enumerate(lines):
    open(f"{sys.argv[2]}/lines/{i:03}", "w", encoding="utf-8").write(line)
    try:
        text = json.loads(line)["content"]
    except Exception:
        continue
    open(f"{sys.argv[2]}/texts/{i:03}", "w", encoding="utf-8").write(text)
PY
  rm -rf "$tmp"
fi

cd fuzz
export CARGO_TARGET_DIR=$cache/fuzz-target
targets=("$@")
[ ${#targets[@]} -eq 0 ] && mapfile -t targets < <(cargo +nightly fuzz list)
for t in "${targets[@]}"; do
  corpus=$cache/fuzz-corpus/$t
  mkdir -p "$corpus"
  case $t in
    decode_verify) seed=$seeds/lines ;;
    *) seed=$seeds/texts ;;
  esac
  echo "== $t: ${secs}s" >&2
  log=$cache/fuzz-$t.log
  status=0
  cargo +nightly fuzz run "$t" "$corpus" "$seed" -- -max_total_time="$secs" -max_len=8192 \
    -print_final_stats=1 > "$log" 2>&1 || status=$?
  grep -E 'stat::number_of_executed_units|stat::peak_rss|Done [0-9]+ runs|panicked|ERROR|SUMMARY|Test unit written' "$log" >&2 || true
  if [ "$status" -ne 0 ]; then
    echo "$t failed (exit $status); log: $log, inputs in fuzz/artifacts/$t" >&2
    exit 1
  fi
done

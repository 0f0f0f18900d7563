#!/usr/bin/env bash
# Suffix-array index construction and count queries: ledgerflow against infini-gram's own
# indexer and engine (the `infini-gram` wheel from PyPI) in one run, on the same tokenized file.
#   benchmarks/index.sh [DOCS] [CONTENT_BYTES] [QUERIES]      defaults: 200000 1000 10000
# NO_BUILD=1 uses the binaries as built; PROFILE=dev for a dev build.
set -euo pipefail
cd "$(dirname "$0")/.."
. benchmarks/lib.sh
docs=${1:-200000} bytes=${2:-1000} nq=${3:-10000}
venv=$cache/venv
if ! "$venv/bin/python" -c "import infini_gram.engine, numpy" 2>/dev/null; then
  "$venv/bin/pip" install -q "infini-gram==2.6.0" numpy >&2
fi
profile=${PROFILE:-release}
[ -z "${NO_BUILD:-}" ] && cargo build --profile "$profile" -p ledgerflow-index --examples >&2
bindir=$CARGO_TARGET_DIR/$([ "$profile" = dev ] && echo debug || echo "$profile")
# The generator only: any build of the CLI will do.
lf=$CARGO_TARGET_DIR/release/ledgerflow
[ -x "$lf" ] || lf=$CARGO_TARGET_DIR/debug/ledgerflow
[ -x "$lf" ] || cargo build -p ledgerflow >&2
data=$(contributions "$docs" "$bytes")
out=benchmarks/out/index-$docs-$bytes
rm -rf "$out" && mkdir -p "$out/tokenized" "$out/empty" "$out/reference" "$out/ours"
python3 benchmarks/index_tokenize.py "$data" "$out/tokenized" "$nq"
# Both indexers write table.0 beside a copy of the same tokenized.0 / offset.0.
cp "$out/tokenized/tokenized.0" "$out/tokenized/offset.0" "$out/reference/"
cp "$out/tokenized/tokenized.0" "$out/tokenized/offset.0" "$out/ours/"
sync
size=$(stat -c %s "$out/tokenized/tokenized.0")
echo "# tokenized.0: $size bytes ($((size / 2)) tokens), 2 cores"
rows=()
rows+=("$(measure infini-gram "$venv/bin/python" -m infini_gram.indexing --data_dir "$PWD/$out/empty" \
  --save_dir "$PWD/$out/reference" --mem 16 --cpus 2 --token_dtype u16 --ulimit "$(ulimit -Hn)")")
# The code of `ledgerflow index build --from-tokenized`, as an example of its crate.
rows+=("$(measure ledgerflow "$bindir/examples/build_index" "$out/ours" "$out/ours" 2)")
cmp "$out/ours/table.0" "$out/reference/table.0" && echo "table.0: byte-identical to infini-gram's"
echo
echo "| indexer | wall s | CPU s | peak RSS MB | tokens/s | speed vs infini-gram |"
echo "| --- | --- | --- | --- | --- | --- |"
base=
for r in "${rows[@]}"; do
  read -r name wall cpu rss <<<"$r"
  [ -z "$base" ] && base=$wall
  printf "| %s | %.2f | %.2f | %.0f | %.0f | %.2f |\n" "$name" "$wall" "$cpu" "$(echo "$rss / 1024" | bc -l)" \
    "$(echo "$size / 2 / $wall" | bc -l)" "$(echo "$base / $wall" | bc -l)"
done
echo
echo "# $nq count queries (1-20 tokens, from the corpus) and 100 attribute queries (200-token outputs), one thread, best of 3"
theirs=$(taskset -c 0 "$venv/bin/python" benchmarks/index_query.py "$out/reference" "$out/tokenized/queries.txt" "$out/tokenized/outputs.txt" 3)
ours=$(taskset -c 0 "$bindir/examples/bench_query" "$out/ours" "$out/tokenized/queries.txt" "$out/tokenized/outputs.txt" 3)
echo "$theirs"; echo "$ours"
field() { awk -v k="$2" '{for (i = 1; i < NF; i++) if ($i == k) print $(i + 1)}' <<<"$1"; }
[ "$(field "$theirs" total)" = "$(field "$ours" total)" ] && echo "same total count"
[ "$(field "$theirs" spans)" = "$(field "$ours" spans)" ] && echo "same number of attributed spans"
printf "count throughput, ledgerflow vs infini-gram: %.2f\n" "$(echo "$(field "$ours" count) / $(field "$theirs" count)" | bc -l)"
printf "count median latency: ledgerflow %s us, infini-gram %s us (%.2fx lower)\n" "$(field "$ours" median_us)" "$(field "$theirs" median_us)" "$(echo "$(field "$theirs" median_us) / $(field "$ours" median_us)" | bc -l)"
printf "attribute median latency (200 tokens): ledgerflow %s ms, infini-gram %s ms (%.2fx lower)\n" "$(field "$ours" median_ms)" "$(field "$theirs" median_ms)" "$(echo "$(field "$theirs" median_ms) / $(field "$ours" median_ms)" | bc -l)"

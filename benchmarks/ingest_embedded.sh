#!/usr/bin/env bash
# End-to-end ingest against kcat on the embedded broker (`ledgerflow broker`, librdkafka's mock
# cluster behind a fixed-port forwarder), side by side on the same topic:
#   kcat        kcat -C -o beginning -e > /dev/null   (Debian's kcat; its librdkafka 2.0 works here)
#   ledgerflow  jobs/ingest.yaml: decode → Parquet Datanet (zstd), committed exactly once
#
#   benchmarks/ingest_embedded.sh [COUNT] [CONTENT_BYTES] [PARTITIONS]   defaults: 200000 1000 96
#   PROFILE=dev / NO_BUILD=1 as in benchmarks/ingest.sh
# The mock cluster keeps at most 5 MB (and 100,000 messages) per partition and drops the oldest
# beyond that, so COUNT × ~1.4 KB must fit in PARTITIONS × 5 MB: 1,000,000 messages of 1 KB do
# not fit at any sane partition count; that size is measured on Tansu (benchmarks/ingest.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmarks/lib.sh
count=${1:-200000}
size=${2:-1000}
partitions=${3:-96}
build_binaries --bin ledgerflow
command -v kcat >/dev/null || { echo "kcat is not installed (apt-get install kcat)" >&2; exit 1; }
out=benchmarks/out/embedded; mkdir -p "$out"
data=$(contributions "$count" "$size")
bytes=$(stat -c %s "$data")
if (( bytes > partitions * 5 * 1024 * 1024 * 9 / 10 )); then
  echo "$bytes bytes do not fit in $partitions partitions of the mock cluster (5 MB each): use more partitions" >&2
  exit 1
fi

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$lf" broker --port "$port" --topic "bench:$partitions" --topic bench.dlq:1 > "$out/broker.stdout" 2> "$out/broker.log" &
broker=$!
trap 'kill $broker 2>/dev/null || true' EXIT
b=127.0.0.1:$port
for _ in $(seq 1 100); do grep -q bootstrap= "$out/broker.stdout" 2>/dev/null && break; sleep 0.1; done
"$lf" produce --brokers "$b" --topic bench --file "$data" >&2

rows=()
rows+=("$(measure kcat kcat -C -b "$b" -t bench -o beginning -e -q)")
got=$(wc -l < "$out/kcat.stdout")
rm -rf "$out/store"
rows+=("$(measure ledgerflow env KAFKA_BROKERS="$b" CONTRIBUTIONS_TOPIC=bench LEDGERFLOW_STORE="$out/store" LEDGERFLOW_LOG=warn \
  "$lf" run jobs/ingest.yaml --until-idle 1 --progress never)")
committed=$("$lf" sql --store "$out/store" --format csv "SELECT count(*) AS n FROM legal" | tail -1)

echo "count=$count content_bytes=$size partitions=$partitions file_bytes=$bytes kcat_read=$got committed=$committed"
echo
table "$count" "$bytes" "${rows[@]}"
read -r _ kcat_wall _ <<<"${rows[0]}"
active_line "$count" "$kcat_wall" "$out/ledgerflow.stderr"

#!/usr/bin/env bash
# End-to-end ingest benchmark, side by side on the same topic of the same broker (Tansu on
# loopback, memory storage):
#   raw     a plain librdkafka consumer reading every record and dropping it (examples/raw_consume.rs;
#           the "kcat -C -e > /dev/null" of the issue: Debian's kcat is too old for Tansu)
#   ledgerflow  jobs/ingest_raw.yaml: decode → Parquet Datanet (zstd), committed exactly once
#   ledgerflow-clean  jobs/ingest.yaml: decode → verify → exact → near → quality → Datanet
#   python  confluent-kafka + json + pyarrow, zstd Parquet (context only)
#
#   benchmarks/ingest.sh [COUNT] [CONTENT_BYTES]      defaults: 1000000 1000
#   PROFILE=dev benchmarks/ingest.sh …                 use the dev build (dependencies at opt-level 2)
#   NO_BUILD=1 benchmarks/ingest.sh …                  use the binaries already built for PROFILE
# Prints a Markdown table: wall time, messages/s, MB/s, CPU-seconds per million, peak RSS, ratio.
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmarks/lib.sh
count=${1:-1000000}
size=${2:-1000}
build_binaries --bin ledgerflow --example raw_consume
raw=$bindir/examples/raw_consume
py=${LEDGERFLOW_PYTHON:-$cache/venv/bin/python}
tansu=${TANSU:-$cache/tools/bin/tansu}
out=benchmarks/out; mkdir -p "$out"
data=$(contributions "$count" "$size")
bytes=$(stat -c %s "$data")

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$tansu" broker --listener-url "tcp://127.0.0.1:$port" --advertised-listener-url "tcp://127.0.0.1:$port" \
  --storage-engine memory://tansu/ > "$out/tansu.log" 2>&1 &
broker=$!
trap 'kill $broker 2>/dev/null || true' EXIT
b=127.0.0.1:$port
for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
"$py" tests/support/kafka_client.py create --brokers "$b" --topic bench --partitions 4
"$py" tests/support/kafka_client.py create --brokers "$b" --topic bench.dlq --partitions 1
"$lf" produce --brokers "$b" --topic bench --file "$data" >&2

rows=()
rows+=("$(measure raw "$raw" "$b" bench "$count")")
rm -rf "$out/store" "$out/store-clean"
rows+=("$(measure ledgerflow env KAFKA_BROKERS="$b" CONTRIBUTIONS_TOPIC=bench LEDGERFLOW_STORE="$out/store" LEDGERFLOW_LOG=warn \
  "$lf" run jobs/ingest_raw.yaml --until-idle 1 --progress never)")
rows+=("$(measure ledgerflow-clean env KAFKA_BROKERS="$b" CONTRIBUTIONS_TOPIC=bench LEDGERFLOW_STORE="$out/store-clean" LEDGERFLOW_LOG=warn \
  "$lf" run jobs/ingest.yaml --until-idle 1 --progress never)")
rm -rf "$out/py"
rows+=("$(measure python "$py" benchmarks/python_ingest.py --brokers "$b" --topic bench --expect "$count" --out "$out/py")")
committed=$("$lf" sql --store "$out/store" --format csv "SELECT count(*) AS n FROM legal" | tail -1)
clean=$("$lf" sql --store "$out/store-clean" --format csv "SELECT count(*) AS n FROM legal" | tail -1)
state=$(stat -c %s "$out/store-clean/_state/ingest/state.redb")

echo "count=$count content_bytes=$size file_bytes=$bytes committed=$committed committed_clean=$clean"
printf "cleaning state: %d bytes on disk, %.0f bytes per accepted contribution\n" "$state" "$(echo "$state / $clean" | bc -l)"
echo
table "$count" "$bytes" "${rows[@]}"
read -r _ raw_wall _ <<<"${rows[0]}"
read -r _ plain_wall _ <<<"${rows[1]}"
read -r _ clean_wall _ <<<"${rows[2]}"
active_line "$count" "$raw_wall" "$out/ledgerflow.stderr"
printf "cleaning pipeline vs plain ingest (wall): %.2f\n" "$(echo "$plain_wall / $clean_wall" | bc -l)"

#!/usr/bin/env bash
# End-to-end ingest benchmark, side by side on the same topic of the same broker:
#   raw consume by kcat (embedded broker) or a librdkafka consumer (Tansu)  vs  ledgerflow's
#   ingest job (decode → Parquet Datanet, committed)  vs  a Python baseline (confluent-kafka + pyarrow).
#
#   benchmarks/ingest.sh [COUNT] [CONTENT_BYTES]      defaults: 1000000 1000
# Prints a Markdown table: messages/s, MB/s, CPU-seconds per million, peak RSS, and ratios.
set -euo pipefail
cd "$(dirname "$0")/.."
count=${1:-1000000}
size=${2:-1000}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/ledgerflow/target}
cargo build --release -p ledgerflow >&2
lf=$CARGO_TARGET_DIR/release/ledgerflow
py=${LEDGERFLOW_PYTHON:-$HOME/.cache/ledgerflow/venv/bin/python}
out=benchmarks/out; mkdir -p "$out"
data=$out/contributions-$count-$size.jsonl
if ! [ -s "$data" ]; then
  "$lf" gen contributions --count "$count" --content-bytes "$size" --seed 7 --out "$data" >&2
fi
bytes=$(stat -c %s "$data")

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$lf" broker --port "$port" --topic bench:4 > "$out/broker.out" 2>"$out/broker.log" &
broker=$!
trap 'kill $broker 2>/dev/null || true' EXIT
for _ in $(seq 1 50); do grep -q bootstrap= "$out/broker.out" 2>/dev/null && break; sleep 0.1; done
b=127.0.0.1:$port
"$lf" produce --brokers "$b" --topic bench --file "$data" >&2

measure() { # name, command… → "name wall_s cpu_s maxrss_kb"
  local name=$1; shift
  /usr/bin/time -f "%e %U %S %M" -o "$out/$name.time" "$@" > "$out/$name.stdout" 2> "$out/$name.stderr"
  read -r wall user sys rss < "$out/$name.time"
  echo "$name $wall $(echo "$user + $sys" | bc) $rss"
}

rows=()
rows+=("$(measure kcat kcat -C -b "$b" -t bench -o beginning -e -q)")
rm -rf "$out/store"
rows+=("$(measure ledgerflow env KAFKA_BROKERS="$b" CONTRIBUTIONS_TOPIC=bench LEDGERFLOW_STORE="$out/store" LEDGERFLOW_LOG=warn \
  "$lf" run jobs/ingest.yaml --until-idle 1 --progress never)")
active=$(grep -o 'active [0-9.]*s' "$out/ledgerflow.stderr" | tr -dc '0-9.')
rm -rf "$out/py"
rows+=("$(measure python "$py" benchmarks/python_ingest.py --brokers "$b" --topic bench --expect "$count" --out "$out/py")")
committed=$("$lf" sql --store "$out/store" --format csv "SELECT count(*) AS n FROM legal" | tail -1)

echo "count=$count content_bytes=$size file_bytes=$bytes committed=$committed ledgerflow_active_s=$active"
echo
echo "| consumer | wall s | msgs/s | MB/s | CPU s per 1M msgs | peak RSS MB | rate vs raw |"
echo "| --- | --- | --- | --- | --- | --- | --- |"
raw_rate=
for r in "${rows[@]}"; do
  read -r name wall cpu rss <<<"$r"
  rate=$(echo "$count / $wall" | bc -l)
  [ -z "$raw_rate" ] && raw_rate=$rate
  printf "| %s | %.2f | %.0f | %.1f | %.2f | %.0f | %.2f |\n" "$name" "$wall" "$rate" \
    "$(echo "$bytes / $wall / 1000000" | bc -l)" "$(echo "$cpu * 1000000 / $count" | bc -l)" \
    "$(echo "$rss / 1024" | bc -l)" "$(echo "$rate / $raw_rate" | bc -l)"
done
if [ -n "$active" ]; then
  printf "\nledgerflow from first record to final commit (without group join and the idle wait): %.2f s, %.0f msgs/s, %.2f of raw\n" \
    "$active" "$(echo "$count / $active" | bc -l)" "$(echo "$count / $active / $raw_rate" | bc -l)"
fi

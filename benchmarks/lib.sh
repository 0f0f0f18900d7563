# Shared by the benchmark scripts: timing a command and printing the side-by-side table.
# shellcheck shell=bash

cache=${LEDGERFLOW_CACHE:-$HOME/.cache/ledgerflow}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$cache/target}

# build_binaries CARGO_TARGET_ARGS… → builds them for PROFILE (release by default; `dev` for the
# dev build) unless NO_BUILD is set, and sets $bindir (where they are) and $lf (the CLI).
build_binaries() {
  local profile=${PROFILE:-release}
  bindir=$CARGO_TARGET_DIR/$([ "$profile" = dev ] && echo debug || echo "$profile")
  if [ -z "${NO_BUILD:-}" ]; then
    cargo build --profile "$profile" -p ledgerflow "$@" >&2
  fi
  lf=$bindir/ledgerflow
}

# contributions COUNT CONTENT_BYTES → the path of a generated file of that size (made once, seed 7)
contributions() {
  local data=benchmarks/out/contributions-$1-$2.jsonl
  mkdir -p benchmarks/out
  if ! [ -s "$data" ]; then
    "$lf" gen contributions --count "$1" --content-bytes "$2" --seed 7 --out "$data" >&2
  fi
  echo "$data"
}

# measure NAME COMMAND… → prints "NAME wall_s cpu_s maxrss_kb"; output in $out/NAME.{stdout,stderr}
measure() {
  local name=$1; shift
  /usr/bin/time -f "%e %U %S %M" -o "$out/$name.time" "$@" > "$out/$name.stdout" 2> "$out/$name.stderr"
  read -r wall user sys rss < "$out/$name.time"
  echo "$name $wall $(echo "$user + $sys" | bc) $rss"
}

# table COUNT BYTES ROW… (rows from measure; the first is the baseline) → Markdown table
table() {
  local count=$1 bytes=$2; shift 2
  echo "| consumer | wall s | msgs/s | MB/s | CPU s per 1M msgs | peak RSS MB | rate vs ${1%% *} |"
  echo "| --- | --- | --- | --- | --- | --- | --- |"
  local base= r name wall cpu rss rate
  for r in "$@"; do
    read -r name wall cpu rss <<<"$r"
    rate=$(echo "$count / $wall" | bc -l)
    [ -z "$base" ] && base=$rate
    printf "| %s | %.2f | %.0f | %.1f | %.2f | %.0f | %.2f |\n" "$name" "$wall" "$rate" \
      "$(echo "$bytes / $wall / 1000000" | bc -l)" "$(echo "$cpu * 1000000 / $count" | bc -l)" \
      "$(echo "$rss / 1024" | bc -l)" "$(echo "$rate / $base" | bc -l)"
  done
}

# active_line COUNT BASELINE_WALL_S STDERR_FILE → the engine's own first-record-to-final-commit rate
active_line() {
  local count=$1 base_wall=$2 active
  active=$(grep -o 'active [0-9.]*s' "$3" | tr -dc '0-9.')
  [ -z "$active" ] && return 0
  printf "\nledgerflow from its first record to its final commit (without the group join and the idle wait): %.2f s, %.0f msgs/s, %.2f of the baseline\n" \
    "$active" "$(echo "$count / $active" | bc -l)" "$(echo "$base_wall / $active" | bc -l)"
}

# model_store STORE → a quick-start store of 2,000 contributions in Datanet `legal`, indexed with
# a 4,000-token vocabulary (what the model benchmarks train on)
model_store() {
  "$lf" quickstart --count 2000 --store "$1" > /dev/null 2>&1
  "$lf" index build --datanet legal --vocab-size 4000 --store "$1" > /dev/null
}

# base_and_adapter STORE → sets $base (a base model of the default sizes, 100 steps) and $adapter
# (a rank-8 adapter of it on all seven projections, 30 steps) trained on `legal` in STORE
base_and_adapter() {
  base=$("$lf" train --datanet legal --steps 100 --store "$1" --progress never | tail -1)
  adapter=$("$lf" train --datanet legal --adapter-of "$base" --steps 30 --store "$1" --progress never | tail -1)
}

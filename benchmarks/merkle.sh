#!/usr/bin/env bash
# Reward Merkle trees: `ledgerflow rewards tree` against OpenZeppelin's StandardMerkleTree
# (@openzeppelin/merkle-tree from npm) on the same CSV of `address,amount` leaves, same root.
#   benchmarks/merkle.sh [SIDE_BY_SIDE_LEAVES] [OURS_ALONE_LEAVES]    defaults: 131072 1000000
# NO_BUILD=1 uses the binaries as built; PROFILE=dev for a dev build.
set -euo pipefail
cd "$(dirname "$0")/.."
. benchmarks/lib.sh
n=${1:-131072} big=${2:-1000000}
node_dir=$cache/node
if ! [ -f "$node_dir/node_modules/@openzeppelin/merkle-tree/package.json" ]; then
  mkdir -p "$node_dir"
  npm install --prefix "$node_dir" --no-audit --no-fund --silent @openzeppelin/merkle-tree@1.0.8 >&2
fi
profile=${PROFILE:-release}
[ -z "${NO_BUILD:-}" ] && cargo build --profile "$profile" -p ledgerflow-rewards --examples >&2
bindir=$CARGO_TARGET_DIR/$([ "$profile" = dev ] && echo debug || echo "$profile")
# The code of `ledgerflow rewards tree`, as an example of its crate (the CLI's release build is long).
tree=$bindir/examples/reward_tree
out=benchmarks/out/merkle
rm -rf "$out" && mkdir -p "$out"
# Deterministic leaves: random 20-byte accounts (lowercase hex) and amounts below 2^96.
leaves() {
  python3 - "$1" "$2" <<'PY'
import random, sys
n, path = int(sys.argv[1]), sys.argv[2]
rng = random.Random(42)
with open(path, "w") as f:
    f.write("address,amount\n")
    for _ in range(n):
        f.write("0x%040x,%d\n" % (rng.getrandbits(160), rng.getrandbits(96)))
PY
}
leaves "$n" "$out/leaves-$n.csv"
leaves "$big" "$out/leaves-$big.csv"
echo "# $n leaves side by side, then ours alone on $big leaves; $(nproc) cores"
rows=()
rows+=("$(measure openzeppelin env NODE_PATH="$node_dir/node_modules" node tests/support/merkle_tree.mjs --time "$out/leaves-$n.csv")")
rows+=("$(measure ledgerflow "$tree" "$out/leaves-$n.csv")")
theirs=$(awk '{print $6}' "$out/openzeppelin.stdout")
ours=$(cat "$out/ledgerflow.stdout")
[ "$theirs" = "$ours" ] && echo "same root: $ours" || { echo "ROOTS DIFFER: $theirs vs $ours"; exit 1; }
echo "openzeppelin in-process build: $(awk '{print $4}' "$out/openzeppelin.stdout") ms"
rows+=("$(measure "ledgerflow-$big" "$tree" "$out/leaves-$big.csv")")
echo
echo "| tree | leaves | wall s | CPU s | peak RSS MB | speed vs openzeppelin |"
echo "| --- | --- | --- | --- | --- | --- |"
base=
for r in "${rows[@]}"; do
  read -r name wall cpu rss <<<"$r"
  leaves=$n; [ "$name" = "ledgerflow-$big" ] && leaves=$big
  [ -z "$base" ] && base=$wall
  speed=$(echo "$base / $wall * $leaves / $n" | bc -l)
  printf "| %s | %d | %.2f | %.2f | %.0f | %.2f |\n" "${name%-*}" "$leaves" "$wall" "$cpu" "$(echo "$rss / 1024" | bc -l)" "$speed"
done

#!/usr/bin/env bash
# Installs what the tests need (once, cached under ~/.cache/ledgerflow), starts the services they
# talk to on loopback, runs every test, and stops the services.
#
#   scripts/test.sh            everything (what CI runs)
#   scripts/test.sh --quick    unit tests only (no services)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
cache=${LEDGERFLOW_CACHE:-$HOME/.cache/ledgerflow}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$cache/target}
tools=$cache/tools
mkdir -p "$tools"

log() { printf '\n== %s\n' "$*" >&2; }

# The engine's build leaves out polars, whose dependencies would change the feature choices of
# shared crates (and so rebuild DataFusion); it is built and tested on its own below.
engine=(--workspace --exclude ledgerflow-polars)

if [[ "${1:-}" == "--quick" ]]; then
  cargo test "${engine[@]}" --lib --bins
  exit 0
fi

log "tools"
if ! [ -x "$tools/bin/tansu" ]; then
  log "installing tansu (a Kafka-protocol broker; about 8 minutes, once)"
  cargo install tansu --version 0.6.0 --no-default-features --features dynostore --root "$tools"
fi
venv=$cache/venv
if ! [ -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import confluent_kafka, pyarrow, duckdb, moto.server, boto3, infini_gram.engine, numpy' 2>/dev/null; then
  log "installing the outside clients (confluent-kafka, pyarrow, duckdb, moto[server], infini-gram from PyPI)"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check confluent-kafka pyarrow duckdb 'moto[server]' boto3 \
    infini-gram==2.6.0 numpy
fi
export LEDGERFLOW_PYTHON=$venv/bin/python
node_dir=$cache/node
if ! [ -f "$node_dir/node_modules/ethers/package.json" ] || ! [ -f "$node_dir/node_modules/canonicalize/package.json" ] \
  || ! [ -f "$node_dir/node_modules/@openzeppelin/merkle-tree/package.json" ]; then
  log "installing the outside references from npm (ethers, canonicalize, @openzeppelin/merkle-tree)"
  mkdir -p "$node_dir"
  npm install --prefix "$node_dir" --no-audit --no-fund --silent ethers@6.17.0 canonicalize@2.1.0 \
    @openzeppelin/merkle-tree@1.0.8
fi
export LEDGERFLOW_NODE_MODULES=$node_dir/node_modules
chain_dir=$cache/chain
if ! [ -x "$chain_dir/node_modules/@foundry-rs/forge-linux-amd64/bin/forge" ] \
  || ! [ -x "$chain_dir/node_modules/@foundry-rs/cast-linux-amd64/bin/cast" ] \
  || ! [ -f "$chain_dir/node_modules/solc/package.json" ] \
  || ! [ -f "$chain_dir/node_modules/@openzeppelin/contracts/package.json" ]; then
  log "installing forge, anvil, cast, solc and @openzeppelin/contracts from npm"
  mkdir -p "$chain_dir"
  npm install --prefix "$chain_dir" --no-audit --no-fund --silent @foundry-rs/forge-linux-amd64@1.7.1 \
    @foundry-rs/anvil-linux-amd64@1.7.1 @foundry-rs/cast-linux-amd64@1.7.1 solc@0.8.37 @openzeppelin/contracts@5.7.0
fi
export LEDGERFLOW_CHAIN_MODULES=$chain_dir/node_modules

log "format"
cargo fmt --all -- --check

log "build"
cargo build "${engine[@]}" --all-targets

log "services"
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# background NAME PORT COMMAND… → runs COMMAND (output in $work/NAME.log), stops it on exit, and
# waits up to 10 s for PORT on loopback to accept connections.
background() {
  local name=$1 port=$2; shift 2
  "$@" >"$work/$name.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 1 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then break; fi
    sleep 0.1
  done
}
tansu_port=$(free_port)
background tansu "$tansu_port" "$tools/bin/tansu" broker \
  --listener-url "tcp://127.0.0.1:$tansu_port" \
  --advertised-listener-url "tcp://127.0.0.1:$tansu_port" \
  --storage-engine memory://tansu/
export LEDGERFLOW_TEST_TANSU=127.0.0.1:$tansu_port
log "tansu on $LEDGERFLOW_TEST_TANSU"
s3_port=$(free_port)
background moto "$s3_port" "$venv/bin/python" -m moto.server -H 127.0.0.1 -p "$s3_port"
export LEDGERFLOW_TEST_S3=http://127.0.0.1:$s3_port
log "S3-compatible server (moto) on $LEDGERFLOW_TEST_S3"
anvil_port=$(free_port)
# --slots-in-an-epoch 1: `finalized` trails the head by two blocks (reward epochs read their
# parameters at the finalized block).
background anvil "$anvil_port" "$LEDGERFLOW_CHAIN_MODULES/@foundry-rs/anvil-linux-amd64/bin/anvil" \
  --network optimism --slots-in-an-epoch 1 --host 127.0.0.1 --port "$anvil_port"
export LEDGERFLOW_TEST_ANVIL=http://127.0.0.1:$anvil_port
log "anvil (OP Stack) on $LEDGERFLOW_TEST_ANVIL"
export LEDGERFLOW_REQUIRE_SERVICES=1

log "tests"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run "${engine[@]}" --no-fail-fast --test-threads 2 || { tail -50 "$work/tansu.log" >&2; exit 1; }
  cargo test "${engine[@]}" --doc
else
  cargo test "${engine[@]}" --no-fail-fast -- --test-threads 2 || { tail -50 "$work/tansu.log" >&2; exit 1; }
fi

log "contracts: forge tests, offline (solc from npm behind contracts/solc.sh; proofs from ledgerflow via ffi)"
ln -sfn "$LEDGERFLOW_CHAIN_MODULES" contracts/node_modules
(cd contracts && LEDGERFLOW_BIN=$CARGO_TARGET_DIR/debug/ledgerflow LEDGERFLOW_FORGE_TMP=$work \
  "$LEDGERFLOW_CHAIN_MODULES/@foundry-rs/forge-linux-amd64/bin/forge" test --use ./solc.sh --offline)

log "the polars feature (off by default; a long build the first time)"
# Its own build: polars' feature choices for shared crates stay out of the engine's build.
LEDGERFLOW_BIN=$CARGO_TARGET_DIR/debug/ledgerflow cargo test --profile polars-test -p ledgerflow-polars -- --test-threads 2
cargo check --profile polars-test -p ledgerflow --features polars --lib   # the re-export as ledgerflow::polars_frame

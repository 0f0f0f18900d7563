#!/usr/bin/env bash
# Signature recovery per core: ledgerflow's verifier against libsecp256k1's own rate (the
# `secp256k1` crate) and RustCrypto's k256, on the same signatures in one run.
#   benchmarks/signatures.sh [COUNT] [ROUNDS]      defaults: 5000 5
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-${LEDGERFLOW_CACHE:-$HOME/.cache/ledgerflow}/target}
profile=${PROFILE:-release}
exec cargo run --quiet --profile "$profile" -p ledgerflow --example bench_signatures -- "${1:-5000}" "${2:-5}"

#!/usr/bin/env bash
# Runs the `cuda` build on a lent GPU machine whose only input is this working tree: the binaries
# travel in target/debug as xz files (the carry is limited to 64 MiB; a stripped dev `ledgerflow`
# with `cuda` is ~200 MB, ~35 MB packed). On the build machine (no GPU; CUDA at $CUDA):
#   PATH=$CUDA/bin:$PATH CUDA_COMPUTE_CAP=90 CUDARC_CUDA_VERSION=13000 LIBRARY_PATH=$CUDA/stubs \
#     cargo build -p ledgerflow --features cuda --bin ledgerflow
#   … cargo test -p ledgerflow-models --features cuda --no-run          # the models test binary
#   mkdir -p target/debug && strip -o target/debug/ledgerflow $CARGO_TARGET_DIR/debug/ledgerflow
#   strip -o target/debug/gpu_ops $CARGO_TARGET_DIR/debug/deps/ledgerflow_models-<hash>
#   xz -6 target/debug/ledgerflow target/debug/gpu_ops
# Then, carrying `target`: benchmarks/gpu_device.sh [gpu.sh STEPS…]. It unpacks, points
# LD_LIBRARY_PATH at the CUDA libraries PyTorch's wheels bring, runs the models unit tests on the
# GPU (LEDGERFLOW_DEVICE=cuda) and benchmarks/gpu.sh; logs go to $OUT/gpu (what comes back).
set -u
cd "$(dirname "$0")/.."
for f in target/debug/*.xz; do
  [ -e "$f" ] || continue
  python3 -c "import lzma,sys; open(sys.argv[2],'wb').write(lzma.open(sys.argv[1]).read())" "$f" "${f%.xz}"
  chmod +x "${f%.xz}"
done
libs=$(python3 - <<'PY'
import glob, os, site
dirs = set()
for base in site.getsitepackages() + ["/usr/local/cuda/lib64", "/usr/lib/x86_64-linux-gnu"]:
    for pat in ("libcublas.so.13", "libcublasLt.so.13", "libcudart.so.13", "libcurand.so.10", "libnvrtc.so.13"):
        for p in glob.glob(os.path.join(base, "**", pat), recursive=True):
            dirs.add(os.path.dirname(p))
print(":".join(sorted(dirs)))
PY
)
export LD_LIBRARY_PATH=$libs:${LD_LIBRARY_PATH:-}
ldd target/debug/ledgerflow | grep "not found"
export CARGO_TARGET_DIR=$PWD/target OUT=${OUT:-$PWD/benchmarks/out/device}
mkdir -p "$OUT/gpu" benchmarks/out && rm -rf benchmarks/out/gpu && ln -s "$OUT/gpu" benchmarks/out/gpu
if [ -x target/debug/gpu_ops ]; then
  echo "== models tests on the GPU"
  (cd models && LEDGERFLOW_DEVICE=cuda timeout 150 ../target/debug/gpu_ops --test-threads 1) > "$OUT/gpu/tests.log" 2>&1
  echo "rc $?"; grep -E "FAILED|panicked|test result" "$OUT/gpu/tests.log" | head -20
fi
benchmarks/gpu.sh "$@"
cp benchmarks/out/serve/metrics.txt "$OUT/gpu/" 2>/dev/null
echo "total ${SECONDS}s"

#!/usr/bin/env bash
# The product path on the GPU machine, in one device call (about 6-9 minutes):
#   bash scripts/gpu_product_run.sh
# Builds the Python extension with CUDA there (16 cores; SQLite, xxHash and hiredis headers and libraries
# from build-gpudeps/, staged on the CPU machine by `scripts/gpu_product_run.sh --stage-deps`;
# carry ["build-gpudeps"]), runs the gpu pytest suite for the product path and the kernels
# (tests/python/test_gpu_backend.py, test_cuda_gpu.py) and the TTFT benchmark through the public
# API (python -m kv_agent.bench.gpu_product_ttft). Logs and results go to $OUT (./out/gpu).
# GPU_BENCH_ARGS passes options to the benchmark; GPU_BENCH=0 skips it.
set -uo pipefail
cd "$(dirname "$0")/.."
DEPS=build-gpudeps
if [ "${1:-}" = --stage-deps ]; then
  rm -rf "$DEPS" && mkdir -p "$DEPS/include" "$DEPS/lib"
  cp /usr/include/sqlite3.h /usr/include/sqlite3ext.h /usr/include/xxhash.h "$DEPS/include/"
  cp -r /usr/include/hiredis "$DEPS/include/"
  for l in libsqlite3.so.0 libxxhash.so.0 libhiredis.so.0.14; do
    # plain copies under the soname and the link name (links travel as links)
    cp -L "/usr/lib/x86_64-linux-gnu/$l" "$DEPS/lib/$l" && cp "$DEPS/lib/$l" "$DEPS/lib/${l%%.so*}.so"
  done
  ls -la "$DEPS"/*
  exit 0
fi
OUT=${OUT:-$PWD/out/gpu}
mkdir -p "$OUT"
status=0
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; nvcc --version | tail -2
  git rev-parse HEAD 2>/dev/null; } > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"
export LD_LIBRARY_PATH="$PWD/$DEPS/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
t0=$(date +%s)
(cmake -S . -B build-gpupy -G Ninja -DCMAKE_BUILD_TYPE=Release -DKVAGENT_BUILD_PYTHON=ON -DKVAGENT_BUILD_TESTS=OFF \
   -DKVAGENT_BUILD_BENCH=OFF -DKVAGENT_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DPython_EXECUTABLE="$(command -v python3)" \
   -DSQLite3_INCLUDE_DIR="$PWD/$DEPS/include" -DSQLite3_LIBRARY="$PWD/$DEPS/lib/libsqlite3.so" \
   -DXXHASH_INCLUDE_DIR="$PWD/$DEPS/include" -DXXHASH_LIBRARY="$PWD/$DEPS/lib/libxxhash.so" \
   -DHIREDIS_INCLUDE_DIR="$PWD/$DEPS/include" -DHIREDIS_LIBRARY="$PWD/$DEPS/lib/libhiredis.so" &&
 cmake --build build-gpupy -j"$(nproc)") > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; echo BUILD FAILED; exit 1; }
echo "extension built in $(( $(date +%s) - t0 )) s"
cp build-gpupy/bindings/_core*.so python/kv_agent/
export PYTHONPATH=$PWD/python PYTHONUNBUFFERED=1
timeout 300 python3 -m pytest tests/python/test_gpu_backend.py tests/python/test_cuda_gpu.py -q -p no:cacheprovider \
  -rs > "$OUT/pytest_gpu.log" 2>&1 || status=1
tail -15 "$OUT/pytest_gpu.log"
if [ "${GPU_BENCH:-1}" != 0 ]; then
  # shellcheck disable=SC2086
  timeout "${GPU_BENCH_TIMEOUT:-360}" python3 -m kv_agent.bench.gpu_product_ttft --out "$OUT" ${GPU_BENCH_ARGS:-} \
    2>&1 | tee "$OUT/bench.log" || status=1
fi
echo "gpu_product_run status: $status"
exit $status

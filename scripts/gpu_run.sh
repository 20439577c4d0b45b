#!/usr/bin/env bash
# Run on the GPU machine, from the repository root, in one call (about 2-6 minutes):
#   bash scripts/gpu_run.sh
# Uses prebuilt binaries from build-gpubundle/ (made by scripts/gpu_prebuild.sh on the CPU machine
# and carried along) when present; otherwise configures and builds here (Release, sm_90), which
# needs GTest, SQLite and xxHash development files on this machine. Then runs the CUDA unit and
# gpu tests, the gpu pytest suite (when the bundle holds the Python extension), the KV benchmark
# and the index search benchmark; logs and CSVs go to $OUT (default ./out/gpu).
# GPU_RUN_BENCH=0 skips the benchmarks; GPU_RUN_PYTEST=0 skips pytest; PYTEST_TARGETS narrows it.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out/gpu}
mkdir -p "$OUT"
BUNDLE=build-gpubundle
status=0

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv || true
  nvcc --version | tail -2 || true
  uname -m
} > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

if [ -x "$BUNDLE/cuda_kv_move_test" ]; then
  BIN=$BUNDLE
  export LD_LIBRARY_PATH="$PWD/$BUNDLE/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  echo "using prebuilt binaries from $BUNDLE (commit $(cat $BUNDLE/COMMIT 2>/dev/null), tree $(git rev-parse HEAD 2>/dev/null))" \
    | tee "$OUT/build.log"
else
  BUILD=build-gpu
  (cmake -S . -B $BUILD -G Ninja -DCMAKE_BUILD_TYPE=Release -DKVAGENT_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
     -DKVAGENT_BUILD_BENCH=OFF -DKVAGENT_BUILD_PYTHON=OFF &&
   cmake --build $BUILD -j"$(nproc)" --target core_test cuda_nodevice_test cuda_kv_move_test cuda_device_tier_test \
     cuda_store_device_test cuda_index_test cuda_kv_bench cuda_index_bench) > "$OUT/build.log" 2>&1
  rc=$?
  tail -20 "$OUT/build.log"
  if [ $rc -ne 0 ]; then
    echo "BUILD FAILED (rc=$rc): see $OUT/build.log; run scripts/gpu_prebuild.sh on the CPU machine and carry build-gpubundle"
    exit 1
  fi
  BIN=$BUILD/stage
  mkdir -p $BIN
  cp $BUILD/tests/cpp/core/core_test $BUILD/tests/cpp/cuda/cuda_nodevice_test $BUILD/tests/cpp/cuda/cuda_kv_move_test \
    $BUILD/tests/cpp/cuda/cuda_device_tier_test $BUILD/tests/cpp/cuda/cuda_store_device_test \
    $BUILD/tests/cpp/cuda/bench_cuda/cuda_kv_bench \
    $BUILD/tests/cpp/cuda/bench_cuda/cuda_index_bench $BUILD/tests/cpp/cuda_index/cuda_index_test $BIN/
fi

: > "$OUT/tests.log"
summary=""
for t in cuda_nodevice_test cuda_kv_move_test cuda_device_tier_test cuda_store_device_test cuda_index_test; do
  echo "=== $t" >> "$OUT/tests.log"
  if [ ! -x "$BIN/$t" ]; then
    summary+="$t: not in $BIN (skipped)"$'\n'
    continue
  fi
  timeout 240 "$BIN/$t" --gtest_color=no > "$OUT/$t.tmp" 2>&1
  rc=$?
  cat "$OUT/$t.tmp" >> "$OUT/tests.log"
  echo "=== $t rc=$rc" >> "$OUT/tests.log"
  summary+="$t rc=$rc: $(grep -E '^\[  (PASSED|FAILED)  \] [0-9]+ test' "$OUT/$t.tmp" | tr '\n' ' ')"$'\n'
  summary+="$(grep -E '^\[  FAILED  \] [A-Za-z]' "$OUT/$t.tmp" | grep -v ' ms)$' | head -10)"$'\n'
  rm -f "$OUT/$t.tmp"
  [ $rc -ne 0 ] && status=1
done

# The gpu pytest suite against the bundle's extension (built with CUDA by gpu_prebuild.sh).
if [ "${GPU_RUN_PYTEST:-1}" != 0 ] && ls "$BIN"/_core*.so > /dev/null 2>&1; then
  cp "$BIN"/_core*.so python/kv_agent/
  PYTHONPATH=$PWD/python timeout 300 "${PYTHON:-python3}" -m pytest ${PYTEST_TARGETS:-tests/python} -m gpu -q -p no:cacheprovider --continue-on-collection-errors \
    > "$OUT/pytest_gpu.log" 2>&1
  rc=$?
  summary+="pytest -m gpu rc=$rc: $(tail -1 "$OUT/pytest_gpu.log")"$'\n'
  [ $rc -ne 0 ] && status=1
fi

: > "$OUT/bench.log"
for b in cuda_kv_bench cuda_index_bench; do
  [ "${GPU_RUN_BENCH:-1}" = 0 ] && break
  echo "=== $b" | tee -a "$OUT/bench.log"
  if [ -x "$BIN/$b" ]; then
    timeout 300 "$BIN/$b" --csv "$OUT/$b.csv" > "$OUT/$b.log" 2>&1
    rc=$?
  else
    echo "$BIN/$b missing (rebuild the bundle with scripts/gpu_prebuild.sh)" > "$OUT/$b.log"
    rc=127
  fi
  cat "$OUT/$b.log" >> "$OUT/bench.log"
  echo "=== $b rc=$rc" >> "$OUT/bench.log"
  [ $rc -ne 0 ] && status=1
done

echo
echo "---- tests"
printf '%s' "$summary"
echo "---- benchmarks"
tail -22 "$OUT/cuda_kv_bench.log" 2>/dev/null
echo "---- cuda_index_bench"
tail -16 "$OUT/cuda_index_bench.log" 2>/dev/null
echo "gpu_run status: $status"
exit $status

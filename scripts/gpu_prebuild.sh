#!/usr/bin/env bash
# Run on the CPU machine (x86-64, nvcc, no GPU) before a GPU session: builds the CUDA tests and
# benchmark in Release for sm_90 and stages them, with the two shared libraries the GPU image
# may lack (SQLite, xxHash), in build-gpubundle/ (git-ignored). Carry that folder to the GPU
# machine (device run: carry ["build-gpubundle"]); scripts/gpu_run.sh uses it when present.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build-gpurel}
BUNDLE=build-gpubundle
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DKVAGENT_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
  -DKVAGENT_BUILD_BENCH=OFF -DKVAGENT_BUILD_PYTHON=OFF
cmake --build "$BUILD" -j"${JOBS:-2}" --target core_test cuda_nodevice_test cuda_kv_move_test cuda_device_tier_test \
  cuda_index_test cuda_kv_bench cuda_index_bench
rm -rf "$BUNDLE"
mkdir -p "$BUNDLE/lib"
cp "$BUILD"/tests/cpp/core/core_test "$BUILD"/tests/cpp/cuda/cuda_nodevice_test "$BUILD"/tests/cpp/cuda/cuda_kv_move_test \
  "$BUILD"/tests/cpp/cuda/cuda_device_tier_test "$BUILD"/tests/cpp/cuda/bench_cuda/cuda_kv_bench \
  "$BUILD"/tests/cpp/cuda/bench_cuda/cuda_index_bench "$BUILD"/tests/cpp/cuda_index/cuda_index_test "$BUNDLE"/
# The Python extension for the GPU image's Python (3.12 there), for the end-to-end TTFT benchmark
# (python -m kv_agent.bench.gpu_ttft); PY312 names a Python 3.12 with nanobind installed.
if [ -n "${PY312:-}" ]; then
  cmake -S . -B build-py312 -G Ninja -DCMAKE_BUILD_TYPE=Release -DKVAGENT_BUILD_PYTHON=ON -DKVAGENT_BUILD_TESTS=OFF \
    -DKVAGENT_BUILD_BENCH=OFF -DKVAGENT_CUDA=OFF -DPython_EXECUTABLE="$PY312"
  cmake --build build-py312 -j"${JOBS:-2}"
  cp build-py312/bindings/_core*.so "$BUNDLE"/
fi
# Shared libraries the binaries need beyond glibc and libstdc++ (the driver comes with the GPU host).
for exe in "$BUNDLE"/cuda_kv_bench "$BUNDLE"/cuda_kv_move_test; do
  ldd "$exe" | awk '/libsqlite3|libxxhash|libcudart/ {print $3}'
done | sort -u | while read -r lib; do cp -L "$lib" "$BUNDLE/lib/"; done
git rev-parse HEAD > "$BUNDLE/COMMIT"
du -sh "$BUNDLE"
ls -la "$BUNDLE" "$BUNDLE/lib"

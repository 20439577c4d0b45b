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
  cuda_kv_bench
rm -rf "$BUNDLE"
mkdir -p "$BUNDLE/lib"
cp "$BUILD"/tests/cpp/core/core_test "$BUILD"/tests/cpp/cuda/cuda_nodevice_test "$BUILD"/tests/cpp/cuda/cuda_kv_move_test \
  "$BUILD"/tests/cpp/cuda/cuda_device_tier_test "$BUILD"/tests/cpp/cuda/bench_cuda/cuda_kv_bench "$BUNDLE"/
# Shared libraries the binaries need beyond glibc and libstdc++ (the driver comes with the GPU host).
for exe in "$BUNDLE"/cuda_kv_bench "$BUNDLE"/cuda_kv_move_test; do
  ldd "$exe" | awk '/libsqlite3|libxxhash|libcudart/ {print $3}'
done | sort -u | while read -r lib; do cp -L "$lib" "$BUNDLE/lib/"; done
git rev-parse HEAD > "$BUNDLE/COMMIT"
du -sh "$BUNDLE"
ls -la "$BUNDLE" "$BUNDLE/lib"

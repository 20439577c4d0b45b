#!/usr/bin/env bash
# Run on the CPU machine (x86-64, nvcc, no GPU) before a GPU session: builds the CUDA tests and
# benchmark in Release for sm_90 and stages them, with the two shared libraries the GPU image
# may lack (SQLite, xxHash), in build-gpubundle/ (git-ignored). Carry that folder to the GPU
# machine (device run: carry ["build-gpubundle"]); scripts/gpu_run.sh uses it when present.
# TARGETS overrides the C++ programs built and staged (default: all tests and benchmarks below).
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build-gpurel}
BUNDLE=build-gpubundle
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DKVAGENT_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
  -DKVAGENT_BUILD_BENCH=OFF -DKVAGENT_BUILD_PYTHON=OFF
TARGETS=${TARGETS:-"core_test cuda_nodevice_test cuda_kv_move_test cuda_device_tier_test cuda_store_device_test
  cuda_index_test cuda_kv_bench cuda_index_bench"}
# shellcheck disable=SC2086
cmake --build "$BUILD" -j"${JOBS:-2}" --target $TARGETS
rm -rf "$BUNDLE"
mkdir -p "$BUNDLE/lib"
for t in $TARGETS; do
  find "$BUILD"/tests -name "$t" -type f -perm -u+x -exec cp {} "$BUNDLE"/ \;
done
# The Python extension for the GPU image's Python (3.12 there), for the end-to-end TTFT benchmark
# (python -m kv_agent.bench.gpu_ttft) and the gpu pytest suite; PY312 names a Python 3.12 with
# nanobind installed. PY_CUDA=ON (default) builds the CUDA bindings in (kv_agent.cuda,
# Store.get_device); the extension then needs libcudart, staged in lib/ below.
if [ -n "${PY312:-}" ]; then
  cmake -S . -B build-py312 -G Ninja -DCMAKE_BUILD_TYPE=Release -DKVAGENT_BUILD_PYTHON=ON -DKVAGENT_BUILD_TESTS=OFF \
    -DKVAGENT_BUILD_BENCH=OFF -DKVAGENT_CUDA="${PY_CUDA:-ON}" -DCMAKE_CUDA_ARCHITECTURES=90 -DPython_EXECUTABLE="$PY312"
  cmake --build build-py312 -j"${JOBS:-2}"
  cp build-py312/bindings/_core*.so "$BUNDLE"/
fi
# Shared libraries the binaries need beyond glibc and libstdc++ (the driver comes with the GPU host).
for exe in "$BUNDLE"/cuda_*_test "$BUNDLE"/cuda_*_bench "$BUNDLE"/_core*.so; do
  [ -e "$exe" ] || continue
  ldd "$exe" | awk '/libsqlite3|libxxhash|libcudart/ {print $3}'
done | sort -u | while read -r lib; do cp -L "$lib" "$BUNDLE/lib/"; done
git rev-parse HEAD > "$BUNDLE/COMMIT"
du -sh "$BUNDLE"
ls -la "$BUNDLE" "$BUNDLE/lib"

#!/usr/bin/env bash
# Builds llama.cpp's own static libraries (ggml CPU backend + llama; no server, tools, examples
# or tests) from the sources vendored in the llama-cpp-python sdist on PyPI, and installs them
# under build-deps/llama.cpp-install (ignored by git), where CMake's KVAGENT_LLAMA_CPP=AUTO finds
# them (cmake/KvagentLlamaCpp.cmake). Does nothing when that installation is already there for
# this version. Uses ccache when installed; runs the compiler under `nice`.
#
#   scripts/build_llama_cpp.sh [PYTHON]     PYTHON: the interpreter whose pip downloads the sdist
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-python3}
VER=0.3.36  # llama-cpp-python; its vendor/llama.cpp is the llama.cpp we build
DEPS=build-deps
SRC=$DEPS/llama_cpp_python-$VER/vendor/llama.cpp
INSTALL=$PWD/$DEPS/llama.cpp-install
STAMP=$INSTALL/.kvagent-llama-cpp-python-$VER
JOBS=${JOBS:-$(nproc)}

if [ -f "$STAMP" ]; then
  exit 0
fi
mkdir -p "$DEPS"
if [ ! -f "$SRC/CMakeLists.txt" ]; then
  echo "llama.cpp: fetching llama-cpp-python==$VER sdist (sources only)"
  # --no-binary for this package only: its build requirements come as wheels. The build
  # backend (scikit-build-core) is the one installed in PY's environment (requirements-dev.txt).
  "$PY" -m pip download -q --no-deps --no-build-isolation --no-binary llama-cpp-python \
    "llama-cpp-python==$VER" -d "$DEPS"
  tar xzf "$DEPS/llama_cpp_python-$VER.tar.gz" -C "$DEPS" \
    --exclude='*/vendor/llama.cpp/models' --exclude='*/vendor/llama.cpp/docs' \
    --exclude='*/vendor/llama.cpp/tools' --exclude='*/vendor/llama.cpp/examples' --exclude='*/vendor/llama.cpp/.git' \
    "llama_cpp_python-$VER/vendor/llama.cpp"
fi

LAUNCHER=()
if command -v ccache >/dev/null; then
  export CCACHE_BASEDIR=${CCACHE_BASEDIR:-$PWD} CCACHE_NOHASHDIR=${CCACHE_NOHASHDIR:-1}
  LAUNCHER=(-DCMAKE_C_COMPILER_LAUNCHER=ccache -DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
fi
echo "llama.cpp: building ggml (CPU) + llama static libraries with $JOBS jobs (several minutes on 2 cores)"
cmake -S "$SRC" -B "$DEPS/llama.cpp-build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DBUILD_SHARED_LIBS=OFF -DCMAKE_POSITION_INDEPENDENT_CODE=ON \
  -DLLAMA_BUILD_COMMON=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF -DGGML_NATIVE=ON \
  -DCMAKE_INSTALL_PREFIX="$INSTALL" "${LAUNCHER[@]}" >/dev/null
nice -n 10 cmake --build "$DEPS/llama.cpp-build" -j "$JOBS"
cmake --install "$DEPS/llama.cpp-build" >/dev/null
touch "$STAMP"
echo "llama.cpp: installed in $INSTALL"

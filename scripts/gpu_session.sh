#!/usr/bin/env bash
# One device call: CUDA tests + KV benchmark (scripts/gpu_run.sh), then the end-to-end TTFT
# benchmark (python -m kv_agent.bench.gpu_ttft) with the prebuilt Python 3.12 extension.
# Prepare on the CPU machine: PY312=/path/to/python3.12-with-nanobind bash scripts/gpu_prebuild.sh
# Run: device run(command="bash scripts/gpu_session.sh", carry=["build-gpubundle"]).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out/gpu}
mkdir -p "$OUT"
timeout "${GPU_RUN_TIMEOUT:-330}" bash scripts/gpu_run.sh
echo "gpu_run rc=$?"
if ls build-gpubundle/_core*.so >/dev/null 2>&1; then
  cp build-gpubundle/_core*.so python/kv_agent/
  export LD_LIBRARY_PATH="$PWD/build-gpubundle/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  PYTHONPATH=python PYTHONUNBUFFERED=1 timeout "${TTFT_TIMEOUT:-240}" python3 -m kv_agent.bench.gpu_ttft \
    --out "$OUT" --repeats "${TTFT_REPEATS:-2}" ${TTFT_ARGS:-}
  echo "gpu_ttft rc=$?"
else
  echo "no prebuilt Python extension in build-gpubundle: TTFT benchmark skipped"
fi

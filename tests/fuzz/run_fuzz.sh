#!/usr/bin/env bash
# Runs each libFuzzer target for a bounded time from its checked-in seeds (tests/fuzz/corpus/<t>/)
# plus the corpus it grew before (<build>/corpus/<t>/); prints the executions per target and
# fails on the first crash, leak or sanitizer report (the input is kept in <build>/artifacts/).
#   tests/fuzz/run_fuzz.sh <build-dir> <seconds-per-target> [target...]
# FUZZ_RUNS=N also stops a target after N executions (a long campaign: docs/benchmarks.md).
set -euo pipefail
build=$1 secs=$2
shift 2
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(disk_record_fuzz key_summary_fuzz model_spec_fuzz segment_meta_fuzz catalog_fuzz wire_fuzz)
src=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$build/artifacts"
for t in "${targets[@]}"; do
  mkdir -p "$build/corpus/$t"
  log="$build/artifacts/$t.log"
  echo "== $t: ${secs} s"
  if ! "$build/tests/fuzz/$t" -max_total_time="$secs" ${FUZZ_RUNS:+-runs=$FUZZ_RUNS} -print_final_stats=1 -timeout=10 -rss_limit_mb=2048 \
      -artifact_prefix="$build/artifacts/$t-" "$build/corpus/$t" "$src/corpus/$t" >"$log" 2>&1; then
    grep -E "ERROR|SUMMARY|Test unit written" "$log" || tail -n 30 "$log"
    echo "FAILED: $t (log: $log)"
    exit 1
  fi
  grep -E "stat::number_of_executed_units|stat::peak_rss_mb" "$log" | tr '\n' ' '
  echo
done

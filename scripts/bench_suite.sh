#!/usr/bin/env bash
# Benchmark several variants of the training step in one go (docs/PERF.md).
#
#   scripts/bench_suite.sh OUT_DIR 'NAME|ENV|BENCH ARGS' ['NAME|ENV|BENCH ARGS' ...]
#
# e.g. scripts/bench_suite.sh runs/perf \
#   'base||--config configs/stage2.py --batch 64' \
#   'kv|XLA_FLAGS=--xla_gpu_enable_command_buffer=|--config configs/stage2.py --batch 64 --config.model.fusion_kv_sharing=True'
#
# Phase 1 compiles the variants (`--compile_only`, PARALLEL at a time) into JAX's persistent
# compilation cache; phase 2 loads each executable from the cache and times it alone. XLA's
# per-fusion autotuning results land in the same cache, so later compilations reuse them; since
# autotuning runs on the one GPU, parallel compilations mostly wait for each other. PARALLEL=0
# skips phase 1: each variant compiles and runs in one process, one after the other (the fastest
# way through a few variants on one GPU; each then has TIME_TIMEOUT seconds).
# Results: OUT_DIR/bench.jsonl (one row per variant), OUT_DIR/compile.jsonl, OUT_DIR/<NAME>.log,
# and the Markdown table on stdout. Variants whose compilation fails or outlasts COMPILE_TIMEOUT
# seconds are reported and skipped; timing runs stop after TIME_TIMEOUT (300) seconds.
# PYTHON (default python3) runs the benchmark.
set -uo pipefail

if [[ $# -lt 2 ]]; then
  sed -n 2,17p "$0"; exit 2
fi
out=$1; shift
mkdir -p "$out"
py=${PYTHON:-python3}
parallel=${PARALLEL:-4}
compile_timeout=${COMPILE_TIMEOUT:-420}
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$out/jax_cache}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
export JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=-1

names=(); envs=(); args=()
for spec in "$@"; do
  IFS='|' read -r name env arg <<<"$spec"
  if [[ -z $name || -z $arg || $name =~ [^A-Za-z0-9_.-] ]]; then
    echo "error: variant '$spec' must read 'NAME|ENV|BENCH ARGS' with NAME in [A-Za-z0-9_.-]" >&2
    exit 2
  fi
  names+=("$name"); envs+=("$env"); args+=("$arg")
done

run_variant() {  # seconds, index, extra bench args...
  local limit=$1 i=$2; shift 2
  # shellcheck disable=SC2086  # ENV and ARGS are word lists on purpose.
  timeout "$limit" env ${envs[$i]} "$py" -m nas_jax.bench ${args[$i]} --label "${names[$i]}" "$@"
}

if (( parallel > 0 )); then
  echo "== phase 1: compiling ${#names[@]} variant(s), $parallel at a time (cache $JAX_COMPILATION_CACHE_DIR)"
  t0=$SECONDS
  running=0
  for i in "${!names[@]}"; do
    run_variant "$compile_timeout" "$i" --compile_only --json_out "$out/compile.jsonl" \
        >"$out/${names[$i]}.log" 2>&1 &
    running=$((running + 1))
    if (( running >= parallel )); then wait -n; running=$((running - 1)); fi
  done
  wait
  echo "   compiled in $((SECONDS - t0)) s"
fi

echo "== phase 2: timing each variant alone"
for i in "${!names[@]}"; do
  if (( parallel > 0 )) && ! grep -q "compile only" "$out/${names[$i]}.log"; then
    echo "   ${names[$i]}: compilation failed or timed out (see $out/${names[$i]}.log); skipped"
    continue
  fi
  t=$SECONDS
  if run_variant "${TIME_TIMEOUT:-300}" "$i" --json_out "$out/bench.jsonl" >>"$out/${names[$i]}.log" 2>&1; then
    echo "   ${names[$i]}: done in $((SECONDS - t)) s"
  else
    echo "   ${names[$i]}: FAILED (see $out/${names[$i]}.log)"; tail -5 "$out/${names[$i]}.log"
  fi
done

"$py" - "$out/bench.jsonl" <<'EOF'
import json, os, sys
from nas_jax.bench import markdown_table
path = sys.argv[1]
rows = [json.loads(l) for l in open(path)] if os.path.exists(path) else []
print(markdown_table(rows) if rows else "no variant was timed")
EOF

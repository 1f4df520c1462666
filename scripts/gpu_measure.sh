#!/usr/bin/env bash
# The GPU measurements recorded in docs/ABLATION.md and docs/PERF.md, one part per call (each fits a
# 10-minute slot on one H200; the ablation resumes where an earlier call stopped):
#
#   bash scripts/gpu_measure.sh ablation   # the paper's Table 4 in miniature, 3 seeds (nas_jax.ablate)
#   bash scripts/gpu_measure.sh bench      # stage-2 step, batch 64, unrolled vs scanned layer stacks
#   bash scripts/gpu_measure.sh eval       # evaluation throughput and each benchmark's projected time
#   bash scripts/gpu_measure.sh kernels    # LayerNorm / attention / GELU kernels: ours vs tokamax
#
# Results go to $OUT (default runs/gpu_out). Wheels the machine lacks (grain, ml_collections,
# array_record, tensorboardX, portpicker; for `kernels` tokamax and its dependencies, listed in
# docs/PERF.md) are installed from ./.whl when that folder exists.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$PWD/runs/jax_cache}
OUT=${OUT:-runs/gpu_out}
mkdir -p "$OUT" runs
SECONDS_LEFT=${SECONDS_LEFT:-540}

case "${1:-}" in
  ablation)
    # Stops itself (SIGINT: every run saves) before the slot ends; a second call resumes it.
    timeout -s INT "$SECONDS_LEFT" python3 -m nas_jax.ablate --workdir runs/ablation --seeds 3 \
        --parallel 6 || true
    python3 -m nas_jax.ablate --workdir runs/ablation --seeds 3 --report_only || true
    cp runs/ablation/ablation.md runs/ablation/ablation.json runs/ablation/ablation.png "$OUT"/ 2>/dev/null || true
    ;;
  bench)
    for scan in False True; do
      python3 -m nas_jax.bench --config configs/stage2.py --batch 64 --steps 25 --warmup 3 \
          --config.model.attention=cudnn --config.model.scan_layers=$scan \
          --label "stage2 cudnn scan_layers=$scan" --json_out "$OUT/bench.jsonl"
    done
    ;;
  eval)
    python3 -m nas_jax.benchmarks.throughput --config configs/stage2.py --batch 256,512,1024,2048 \
        --json_out "$OUT/eval_throughput.jsonl"
    ;;
  kernels)
    # Capped at 170 s (SIGINT; kernels.jsonl keeps every cell measured by then); the table also
    # goes to kernels.md.
    timeout -s INT 170 python3 scripts/kernel_bench.py --json_out "$OUT/kernels.jsonl" \
        | tee "$OUT/kernels.md"
    ;;
  *)
    echo "usage: bash scripts/gpu_measure.sh ablation|bench|eval|kernels" >&2
    exit 2
    ;;
esac

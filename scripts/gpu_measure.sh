#!/usr/bin/env bash
# The GPU measurements recorded in docs/ABLATION.md and docs/PERF.md, one part per call (each fits a
# 10-minute slot on one H200; the ablation resumes where an earlier call stopped):
#
#   bash scripts/gpu_measure.sh ablation   # the paper's Table 4 in miniature, 3 seeds (nas_jax.ablate)
#   bash scripts/gpu_measure.sh bench      # stage-2 step, batch 64, unrolled vs scanned layer stacks
#   bash scripts/gpu_measure.sh eval       # evaluation throughput and each benchmark's projected time
#   bash scripts/gpu_measure.sh startup    # python -m nas_jax.train as a user runs it: start-up,
#                                          # loop rate, checkpoint stalls; cold, then from the cache
#   bash scripts/gpu_measure.sh scaling    # (2 GPUs) stage-2 step on 1 and 2 GPUs, unrolled and
#                                          # stacked layouts, the latency-hiding scheduler (~12 min:
#                                          # more than one 10-minute device call)
#   bash scripts/gpu_measure.sh fp8        # model.fp8: stage-2 step bf16 vs FP8, and two short
#                                          # trainings' losses side by side (fp8_curves.md)
#   bash scripts/gpu_measure.sh kernels    # LayerNorm / attention / GELU kernels: ours vs tokamax
#                                          # (KERNEL_ARGS="--only gelu": one part)
#   bash scripts/gpu_measure.sh tokamax    # stage-2 step with model.attention=tokamax (text and
#                                          # fusion layers) beside cudnn
#   bash scripts/gpu_measure.sh fusions    # tokamax step with XLA's gemm-fusion variants (GELU
#                                          # form, cuBLAS only, Triton for every dot; cuDNN
#                                          # LayerNorm, cuBLASLt in command buffers: VARIANTS=...),
#                                          # HLO counted
#   bash scripts/gpu_measure.sh round3     # the fastest settings, then with the MLM heads on the
#                                          # masked positions only (mlm.max_masked)
#   bash scripts/gpu_measure.sh residual   # model.residual_dtype: the fastest settings' bench
#                                          # with a float32 and a bfloat16 residual stream, and
#                                          # their loss curves (ablation model, from scratch)
#   bash scripts/gpu_measure.sh distances  # model.dictionary.distances: float32 and TF32 loss curves
#   bash scripts/gpu_measure.sh gelu       # the tanh GELU's own backward: the fastest settings
#                                          # bench (bfloat16 residual stream), HLO epilogues counted
#   bash scripts/gpu_measure.sh best       # the fastest settings: a training run as a user runs
#                                          # it, then (PROFILE=0: not) the bench with a profile;
#                                          # BEST_EXTRA: more config flags for both; TRAIN=0: the
#                                          # profiled bench only
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

tokamax_env() {
  # tokamax imports xprof.cli.tools at the top level for its own profiler timing (unused here),
  # and xprof is not carried: an empty stub package stands in for it on this machine only.
  # jax_triton is not needed by the Pallas attention kernel and is left out.
  rm -rf /tmp/site/jax_triton*
  mkdir -p /tmp/xprof_stub/xprof/cli
  touch /tmp/xprof_stub/xprof/__init__.py /tmp/xprof_stub/xprof/cli/__init__.py
  echo "get_kernel_stats_tool = None  # stub (scripts/gpu_measure.sh)" > /tmp/xprof_stub/xprof/cli/tools.py
  echo "[gpu_measure] xprof is a stub here: /tmp/xprof_stub"
  export PYTHONPATH=${PYTHONPATH:-$PWD}:/tmp/xprof_stub
}

hlo_counts() {
  # hlo_counts NAME FILE: the cuBLASLt epilogues, custom-call targets and fusion kinds of the
  # optimised train-step HLO dumped to runs/hlo_NAME, appended to FILE.
  local name=$1 hlo
  for hlo in runs/hlo_$name/*train_step*after_optimizations.txt; do
    [ -f "$hlo" ] || continue
    { echo "$name: $(basename "$hlo")"
      grep -o '"epilogue":"[A-Z_]*"' "$hlo" | sort | uniq -c || true
      grep -o 'custom_call_target="[^"]*"' "$hlo" | sort | uniq -c || true
      grep -o '"kind":"__[a-z_]*"' "$hlo" | sort | uniq -c || true
    } | tee -a "$2"
  done
}

loss_curves() {
  # loss_curves NAME KEY LABEL=VALUE LABEL=VALUE: the ablation's stage-1 model (width 256, 4 + 4
  # layers, VD, bf16, batch 128) from scratch for 500 steps, once per --config.KEY=VALUE, side by
  # side on the one GPU; then $OUT/NAME_curves.md (ablate.curve_table), each run's log and
  # metrics. If the slot runs out, SIGTERM (not SIGINT: background jobs ignore it) makes each run
  # save and stop, and the table covers what was logged.
  local name=$1 key=$2; shift 2
  local left=$((SECONDS_LEFT - SECONDS - 30)) run label dirs=""
  [ "$left" -ge 60 ] || left=60
  rm -rf "runs/${name}_curves"
  for run in "$@"; do
    label=${run%%=*}
    XLA_PYTHON_CLIENT_MEM_FRACTION=0.4 timeout -k 30 "$left" python3 -m nas_jax.train \
        --config configs/ablation.py:stage1_vd --workdir "runs/${name}_curves/$label" \
        --config.$key=${run#*=} --config.total_steps=500 --config.optim.schedule_steps=-1 \
        --config.log_every=10 --config.eval.enabled=False --config.checkpoint.every=0 \
        > "$OUT/${name}_train_$label.log" 2>&1 &
  done
  wait
  for run in "$@"; do
    label=${run%%=*}
    cp "runs/${name}_curves/$label/metrics.jsonl" "$OUT/${name}_metrics_$label.jsonl" \
        2>/dev/null || true
    dirs="$dirs'$label': 'runs/${name}_curves/$label', "
  done
  python3 -c "from nas_jax.ablate import curve_table; print(curve_table({$dirs}))" \
      | tee "$OUT/${name}_curves.md"
}

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
  startup)
    # The full stage-2 model (ViT-B/16 256 px + BERT-base, NVA on, cuDNN attention) on the
    # synthetic world, batch 64, 300 steps, a checkpoint every 100. Run 1 starts with an empty
    # compilation cache and saves with orbax's own blocking copy (checkpoint.snapshot=False, the
    # behaviour before); run 2, a new workdir with the same config, loads its programs from the
    # cache and saves from a device-side snapshot (the default).
    rm -rf runs/startup
    A="--config configs/stage1.py --config.stage=2 --config.nva.enabled=True
       --config.data.source=synthetic --config.data.vocab=synthetic --config.data.batch_size=64
       --config.data.num_workers=12 --config.data.image_dtype=uint8 --config.model.attention=cudnn
       --config.total_steps=300 --config.checkpoint.every=100 --config.log_every=20
       --config.eval.enabled=False --config.stage2_steps=0"
    export JAX_COMPILATION_CACHE_DIR=$PWD/runs/startup/jax_cache
    for run in 1 2; do
      snap=$([ $run = 1 ] && echo False || echo True)
      t0=$(date +%s.%N)
      python3 -m nas_jax.train $A --config.checkpoint.snapshot=$snap --workdir runs/startup/run$run \
          2>&1 | tr '\r' '\n' | grep -v "it/s\]$" | tee "$OUT/startup_run$run.log"
      echo "run $run: process wall $(python3 -c "import time; print(round(time.time() - $t0, 1))") s"
    done
    python3 -m nas_jax.metrics_writer --summary runs/startup/run1 runs/startup/run2 \
        | tee "$OUT/startup_summary.md"
    ;;
  scaling)
    # Batch 64 per GPU. The 1-GPU row runs on the first GPU only; the others on all of them.
    B="--config configs/stage2.py --steps 25 --warmup 3 --config.model.attention=cudnn"
    n=$(python3 -c "import jax; print(jax.device_count())")
    CUDA_VISIBLE_DEVICES=0 python3 -m nas_jax.bench $B --batch 64 --label "1 GPU" \
        --json_out "$OUT/scaling.jsonl"
    python3 -m nas_jax.bench $B --batch $((64 * n)) --label "$n GPUs" --json_out "$OUT/scaling.jsonl"
    CUDA_VISIBLE_DEVICES=0 python3 -m nas_jax.bench $B --batch 64 --config.model.stacked_layout=True \
        --label "1 GPU, stacked" --json_out "$OUT/scaling.jsonl"
    python3 -m nas_jax.bench $B --batch $((64 * n)) --config.model.stacked_layout=True \
        --label "$n GPUs, stacked" --json_out "$OUT/scaling.jsonl"
    XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true" python3 -m nas_jax.bench $B \
        --batch $((64 * n)) --config.model.stacked_layout=True \
        --label "$n GPUs, stacked, latency-hiding scheduler" --json_out "$OUT/scaling.jsonl"
    ;;
  fp8)
    # (a) The stage-2 step with the layers' matmuls in bf16, then FP8: two full compilations (no
    # compilation cache: comparable compile times, and the FP8 step's optimised HLO is dumped, which
    # a cache hit would skip). fp8_hlo.txt counts its custom calls and fusions by kind: cuBLASLt
    # FP8 gemm calls show that XLA rewrote the float8 products (or Triton gemm fusions took them).
    rm -rf runs/fp8_hlo
    for fp8 in False True; do
      dump=""
      [ "$fp8" = True ] && dump="--xla_dump_to=runs/fp8_hlo --xla_dump_hlo_module_re=train_step"
      XLA_FLAGS="${XLA_FLAGS:-} $dump" JAX_ENABLE_COMPILATION_CACHE=false \
          python3 -m nas_jax.bench --config configs/stage2.py --batch 64 --steps 25 --warmup 3 \
          --config.model.attention=cudnn --config.model.fp8=$fp8 \
          --label "stage2 cudnn fp8=$fp8" --json_out "$OUT/bench.jsonl" \
          || echo "[fp8] the fp8=$fp8 bench failed: see above" >&2
    done
    for hlo in runs/fp8_hlo/*train_step*after_optimizations.txt; do
      [ -f "$hlo" ] || continue
      { echo "$hlo: custom calls, fusion kinds"
        grep -o 'custom_call_target="[^"]*"' "$hlo" | sort | uniq -c || true
        grep -o '"kind":"__[a-z_]*"' "$hlo" | sort | uniq -c || true
      } | tee -a "$OUT/fp8_hlo.txt"
    done
    # (b) Loss curves, bf16 and FP8 side by side (loss_curves above).
    loss_curves fp8 model.fp8 bf16=False fp8=True
    ;;
  kernels)
    # Capped at 170 s (SIGINT; kernels.jsonl keeps every cell measured by then); the table also
    # goes to kernels.md.
    timeout -s INT 170 python3 scripts/kernel_bench.py ${KERNEL_ARGS:-} --json_out "$OUT/kernels.jsonl" \
        | tee "$OUT/kernels.md"
    ;;
  tokamax)
    # The stage-2 step (stage2.py: stacked layout, ViT on cuDNN) with the text and fusion layers'
    # attention on cuDNN, then on tokamax's Pallas-Triton kernel.
    tokamax_env
    B="--config configs/stage2.py --batch 64 --steps 25 --warmup 3"
    for attn in ${ATTENTION:-cudnn tokamax}; do
      python3 -m nas_jax.bench $B --config.model.attention=$attn \
          --label "stage2 attention=$attn" --json_out "$OUT/tokamax.jsonl" \
          || echo "[tokamax] the attention=$attn bench failed: see above" >&2
    done
    ;;
  fusions)
    # XLA's own gemm fusions with tokamax attention: the exact GELU (default), the tanh GELU
    # (cuBLASLt has a GELU epilogue for this form only), either with cuBLAS alone (Triton gemm
    # autotuning off: XLA's gemm rewriter then fuses bias and GELU epilogues), and Triton gemm
    # fusions for every dot. Each variant's optimised train-step HLO is dumped, and fusions.txt
    # counts its cuBLASLt epilogues and fusion kinds.
    tokamax_env
    B="--config configs/stage2.py --batch 64 --steps 25 --warmup 3 --config.model.attention=tokamax"
    T="--config.model.vit.gelu=tanh --config.model.bert.gelu=tanh"
    variant() {  # name, XLA flags, extra bench flags...
      local name=$1 flags=$2; shift 2
      rm -rf "runs/hlo_$name"
      XLA_FLAGS="${XLA_FLAGS:-} $flags --xla_dump_to=runs/hlo_$name --xla_dump_hlo_module_re=train_step" \
          JAX_ENABLE_COMPILATION_CACHE=false python3 -m nas_jax.bench $B "$@" \
          --label "stage2 tokamax $name" --json_out "$OUT/fusions.jsonl" \
          || echo "[fusions] $name failed: see above" >&2
      hlo_counts "$name" "$OUT/fusions.txt"
    }
    for v in ${VARIANTS:-exact tanh tanh_cublas exact_cublas exact_triton_any}; do
      case $v in
        exact) variant exact "" ;;
        tanh) variant tanh "" $T ;;
        tanh_cublas) variant tanh_cublas "--xla_gpu_enable_triton_gemm=false" $T ;;
        exact_cublas) variant exact_cublas "--xla_gpu_enable_triton_gemm=false" ;;
        exact_triton_any) variant exact_triton_any "--xla_gpu_triton_gemm_any=true" ;;
        # Round 4 (docs/PERF.md): XLA's cuDNN LayerNorm rewrite, and cuBLASLt calls recorded
        # into command buffers (the cuBLAS-only step dispatches ~570 of them).
        tanh_cublas_cudnn_ln) variant tanh_cublas_cudnn_ln \
            "--xla_gpu_enable_triton_gemm=false --xla_gpu_enable_cudnn_layer_norm=true" $T ;;
        tanh_cublas_cmdbuf_lt) variant tanh_cublas_cmdbuf_lt \
            "--xla_gpu_enable_triton_gemm=false --xla_gpu_enable_command_buffer=+CUBLASLT" $T ;;
        tanh_cmdbuf_lt) variant tanh_cmdbuf_lt "--xla_gpu_enable_command_buffer=+CUBLASLT" $T ;;
        exact_cmdbuf_lt) variant exact_cmdbuf_lt "--xla_gpu_enable_command_buffer=+CUBLASLT" ;;
      esac
    done
    ;;
  round3)
    # Issue 18, third round: the MLM heads on the masked positions only (mlm.max_masked=12, what
    # the stage configs' -1 means at 25 tokens) with the fastest settings of the second round
    # (tokamax text/fusion attention, tanh GELU, cuBLAS gemms): `base` (no cap) and `mlm12`;
    # with XLA's default gemms (`tanh_mlm12`) and with the exact GELU (`exact_mlm12`). One bench
    # each, no compilation cache. (The ViT's query tail on XLA, docs/PERF.md, was measured with
    # the `base` command and NAS_JAX_CUDNN_QUERY_TAIL=0 / 1 at commit c3434b8.)
    tokamax_env
    B="--config configs/stage2.py --batch 64 --steps 25 --warmup 3 --config.model.attention=tokamax"
    T="--config.model.vit.gelu=tanh --config.model.bert.gelu=tanh"
    M="--config.mlm.max_masked=12"
    CUBLAS="--xla_gpu_enable_triton_gemm=false"
    TRITON="--xla_gpu_enable_triton_gemm=true"   # XLA's default, spelt out
    for v in ${VARIANTS:-base mlm12 tanh_mlm12 exact_mlm12}; do
      case $v in
        base) flags=$CUBLAS; extra="$T --config.mlm.max_masked=0" ;;
        mlm12) flags=$CUBLAS; extra="$T $M" ;;
        tanh_mlm12) flags=$TRITON; extra="$T $M" ;;
        exact_mlm12) flags=$TRITON; extra="$M" ;;
      esac
      XLA_FLAGS="${XLA_FLAGS:-} $flags" JAX_ENABLE_COMPILATION_CACHE=false python3 -m nas_jax.bench \
          $B $extra --label "stage2 tokamax $v" --json_out "$OUT/round3.jsonl" \
          || echo "[round3] $v failed: see above" >&2
    done
    ;;
  residual)
    # model.residual_dtype=bfloat16 (the residual stream between the ViT / BERT layers in
    # bfloat16): (a) the stage-2 bench with the fastest pipelined settings (tokamax attention,
    # tanh GELU, cuBLAS gemms), float32 stream then bfloat16; (b) loss curves of both streams
    # side by side (loss_curves above), for what is left of the slot. RESIDUALS="bfloat16": one
    # stream only; GEMMS=default: XLA's default gemms (Triton autotuning on) instead of cuBLAS
    # only; CURVES=0: the benches only.
    tokamax_env
    B="--config configs/stage2.py --batch 64 --steps 25 --warmup 3 --config.model.attention=tokamax
       --config.model.vit.gelu=tanh --config.model.bert.gelu=tanh"
    flags=${XLA_FLAGS:-}  # XLA reads a blank XLA_FLAGS as a file name: never leave it " ".
    [ "${GEMMS:-cublas}" = default ] || flags="$flags --xla_gpu_enable_triton_gemm=false"
    for r in ${RESIDUALS:-float32 bfloat16}; do
      XLA_FLAGS="$flags" python3 -m nas_jax.bench $B \
          --config.model.residual_dtype=$r \
          --label "stage2 fastest, residual $r, ${GEMMS:-cublas} gemms" \
          --json_out "$OUT/residual.jsonl" || echo "[residual] the $r bench failed: see above" >&2
    done
    [ "${CURVES:-1}" = 1 ] || exit 0
    loss_curves residual model.residual_dtype float32=float32 bfloat16=bfloat16
    ;;
  distances)
    # model.dictionary.distances='tf32' (the dictionary's patch-to-code product on TF32 tensor
    # cores): loss curves of the float32 and TF32 products side by side (loss_curves above).
    loss_curves distances model.dictionary.distances float32=float32 tf32=tf32
    ;;
  gelu)
    # The tanh GELU with its own backward (models/activations.py), which leaves the training
    # forward's GELU to the matmul's cuBLASLt epilogue (BIAS_GELU_AUX): the stage-2 bench with the
    # fastest settings and the bfloat16 residual stream, no compilation cache, its optimised HLO
    # dumped and counted in gelu.txt. LABEL names the row (the control: the same part run at the
    # commit before the change).
    tokamax_env
    name=gelu_${LABEL:-new}
    rm -rf "runs/hlo_$name"
    dump="--xla_dump_to=runs/hlo_$name --xla_dump_hlo_module_re=train_step"
    XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_triton_gemm=false $dump" JAX_ENABLE_COMPILATION_CACHE=false \
        python3 -m nas_jax.bench --config configs/stage2.py --batch 64 --steps 25 --warmup 3 \
        --config.model.attention=tokamax --config.model.vit.gelu=tanh --config.model.bert.gelu=tanh \
        --config.model.residual_dtype=bfloat16 --label "stage2 fastest, residual bf16, $name" \
        --json_out "$OUT/gelu.jsonl" || echo "[gelu] the $name bench failed: see above" >&2
    hlo_counts "$name" "$OUT/gelu.txt"
    ;;
  best)
    # The fastest settings measured (docs/PERF.md): tokamax attention in the text and fusion
    # layers, tanh GELU, cuBLAS gemms (Triton gemm autotuning off, so XLA's gemm rewriter fuses
    # the bias and tanh-GELU epilogues). (a) python -m nas_jax.train as a user runs it: the full
    # stage-2 model on the synthetic world, batch 64, 300 steps, a save every 100. (b) the bench
    # with a profile (command buffers off, so kernels are attributed to ops): top_ops.md.
    tokamax_env
    export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_triton_gemm=false"
    F="--config.model.attention=tokamax --config.model.vit.gelu=tanh --config.model.bert.gelu=tanh
       ${BEST_EXTRA:-}"
    rm -rf runs/best
    if [ "${TRAIN:-1}" = 1 ]; then
      t0=$(date +%s.%N)
      python3 -m nas_jax.train --config configs/stage1.py --config.stage=2 --config.nva.enabled=True \
          --config.data.source=synthetic --config.data.vocab=synthetic --config.data.batch_size=64 \
          --config.data.num_workers=12 --config.data.image_dtype=uint8 $F \
          --config.total_steps=300 --config.checkpoint.every=100 --config.log_every=20 \
          --config.eval.enabled=False --config.stage2_steps=0 --workdir runs/best/train \
          2>&1 | tr '\r' '\n' | grep -v "it/s\]$" | tee "$OUT/best_train.log"
      echo "train: process wall $(python3 -c "import time; print(round(time.time() - $t0, 1))") s"
      python3 -m nas_jax.metrics_writer --summary runs/best/train | tee "$OUT/best_summary.md"
    fi
    [ "${PROFILE:-1}" = 1 ] || exit 0
    XLA_FLAGS="$XLA_FLAGS --xla_gpu_enable_command_buffer=" python3 -m nas_jax.bench \
        --config configs/stage2.py --batch 64 --steps 25 --warmup 3 $F \
        --label "stage2 best, profiled" --json_out "$OUT/best.jsonl" --profile_dir runs/best/prof
    cp runs/best/prof/top_ops.md "$OUT/best_top_ops.md" 2>/dev/null || true
    ;;
  *)
    parts="ablation|bench|eval|startup|scaling|fp8|kernels|tokamax|fusions|round3|residual"
    parts="$parts|distances|gelu|best"
    echo "usage: bash scripts/gpu_measure.sh $parts" >&2
    exit 2
    ;;
esac

#!/usr/bin/env bash
# One host, all its accelerators: ONE process drives every local GPU/TPU chip (JAX's default).
#
#   bash launch/single_host.sh configs/stage1.py runs/stage1 [--config.a.b=v ...]
#   bash launch/single_host.sh configs/demo.py runs/demo                  # laptop / CPU demo
#   CUDA_VISIBLE_DEVICES=0,1,2,3 bash launch/single_host.sh configs/stage1.py runs/s1 --config.accum_steps=2
#
# The global batch (config.data.batch_size) is split over all local devices; with fewer devices
# than the paper's 8×64, keep batch_size=512 and raise --config.accum_steps (see docs/SCALING.md).
# FSDP: --config.mesh.fsdp=N shards parameters and optimiser state over N devices.
# At start the trainer logs "process 0/1, <local> local / <global> global devices (<platform>),
# mesh {'data': .., 'fsdp': ..}".
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:?usage: launch/single_host.sh CONFIG WORKDIR [--config.key=value ...]}
WORKDIR=${2:?usage: launch/single_host.sh CONFIG WORKDIR [--config.key=value ...]}
shift 2
PY=${PYTHON:-.venv/bin/python}
# shellcheck source=launch/xla_env.sh
source launch/xla_env.sh
echo "[launch] host $(hostname): single process; CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-all}; XLA_FLAGS=${XLA_FLAGS:-}"
exec "$PY" -m nas_jax.train --config "$CONFIG" --workdir "$WORKDIR" "$@"
